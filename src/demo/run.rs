//! `pgtenant demo`: throwaway PostgreSQL + demo tenants + the proxy, until Ctrl-C.

use anyhow::Context;

use crate::cli::DemoArgs;
use crate::config::Config;
use crate::embedded_pg::TempPg;

use super::{instructions, provision};

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    eprintln!("pgtenant demo: starting a throwaway PostgreSQL (initdb into a temp dir)...");
    let mut pg = TempPg::start_async()
        .await
        .context("starting the demo PostgreSQL")?;
    let workdir = tempfile::Builder::new()
        .prefix("pgtenant-demo-")
        .tempdir()
        .context("creating the demo work directory")?;
    let env = provision(&pg, workdir.path(), &args.listen, &args.admin)
        .await
        .context("creating demo tenants")?;
    let config = Config::load(&env.config_path)?;
    let tenant_claim = config.jwt.tenant_claim.clone();
    let proxy = crate::server::spawn(config).await?;

    let secret = env.jwt_secret.clone();
    let mint = |tenant: &str, user: &str| {
        crate::auth::issue_hs256(
            secret.as_bytes(),
            &tenant_claim,
            tenant,
            Some(user),
            8 * 3600,
            &[],
        )
        .unwrap_or_else(|e| format!("<token error: {e}>"))
    };
    println!("{}", instructions(&env, proxy.addr.port(), &mint));
    println!("PostgreSQL (throwaway) listens on 127.0.0.1:{}", pg.port);
    println!("Press Ctrl-C to stop and remove everything.");

    crate::server::wait_for_signal().await;
    eprintln!("pgtenant demo: stopping");
    proxy.stop().await;
    pg.stop()?;
    drop(workdir);
    Ok(())
}
