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
    let console = proxy.shared.config().console.clone();
    if console.enabled {
        let claim_value = match &console.admin_value {
            Some(v) => serde_json::Value::String(v.clone()),
            None => serde_json::Value::Bool(true),
        };
        let admin = crate::auth::issue_hs256(
            secret.as_bytes(),
            &tenant_claim,
            "ops",
            Some("admin@demo"),
            8 * 3600,
            &[(console.admin_claim.clone(), claim_value)],
        )
        .unwrap_or_else(|e| format!("<token error: {e}>"));
        println!(
            "Admin console (SHOW CLIENTS, SHOW POOLS, PAUSE, KILL TENANT ...; SHOW HELP lists them):\n  PGPASSWORD='{admin}' psql \"host=127.0.0.1 port={} user=admin dbname={}\" -c 'SHOW CLIENTS'\n",
            proxy.addr.port(),
            console.database
        );
    }
    println!("PostgreSQL (throwaway) listens on 127.0.0.1:{}", pg.port);
    println!("Press Ctrl-C to stop and remove everything.");

    tokio::select! {
        () = crate::server::wait_for_signal() => {}
        () = proxy.shared.stop_requested() => {}
    }
    eprintln!("pgtenant demo: stopping");
    proxy.stop().await;
    pg.stop()?;
    drop(workdir);
    Ok(())
}
