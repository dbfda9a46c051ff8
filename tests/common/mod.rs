//! Test harness: one throwaway PostgreSQL per test binary, provisioned with the demo
//! tenants, and proxies started in-process on free ports.
#![allow(dead_code)]

pub mod raw;
pub mod serve;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use pgtenant::config::Config;
use pgtenant::demo::DemoEnv;
use pgtenant::embedded_pg::TempPg;
use pgtenant::server::ProxyHandle;
use tokio_postgres::{Client, NoTls};

pub struct Env {
    pub pg: &'static TempPg,
    pub demo: DemoEnv,
    _workdir: tempfile::TempDir,
}

/// The provisioned cluster, started on first use. Provisioning runs on its own runtime:
/// each `#[tokio::test]` has a runtime of its own that ends with the test.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        std::thread::spawn(|| {
            let pg = TempPg::shared().expect("start PostgreSQL");
            let workdir = tempfile::tempdir().expect("workdir");
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let demo = rt
                .block_on(pgtenant::demo::provision(
                    pg,
                    workdir.path(),
                    "127.0.0.1:0",
                    "127.0.0.1:0",
                ))
                .expect("provision demo");
            rt.block_on(async {
                // Temp tables are revoked in the demo (hardening); the state-leak tests need them.
                let admin = pg.admin_client("postgres").await.expect("admin");
                admin
                    .batch_execute("GRANT TEMP ON DATABASE saas TO pgtenant")
                    .await
                    .expect("grant");
            });
            // pgbench tables in the shared database (no tenant column): pgbench through a
            // shared upstream exercises pinning and the tenant setting on every session.
            let init = std::process::Command::new(pg.pgbench_path())
                .args(["-i", "-s", "1", "-q", "-h"])
                .arg(&pg.socket_dir)
                .args(["-p", &pg.port.to_string(), "-U", "postgres", "saas"])
                .output()
                .expect("pgbench -i");
            assert!(
                init.status.success(),
                "{}",
                String::from_utf8_lossy(&init.stderr)
            );
            rt.block_on(async {
                let saas = pg.admin_client("saas").await.expect("admin saas");
                saas.batch_execute(
                    "GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches,
                       pgbench_tellers, pgbench_history TO pgtenant",
                )
                .await
                .expect("grant pgbench tables");
            });
            Env {
                pg,
                demo,
                _workdir: workdir,
            }
        })
        .join()
        .expect("provisioning thread")
    })
}

/// The demo config with listeners on free ports, adjusted by `tweak`.
pub fn config(tweak: impl FnOnce(&mut Config)) -> Config {
    let env = env();
    let mut cfg = Config::load(&env.demo.config_path).expect("demo config loads");
    cfg.listen.addr = "127.0.0.1:0".parse().expect("addr");
    if let Some(admin) = cfg.admin.as_mut() {
        admin.addr = "127.0.0.1:0".parse().expect("addr");
    }
    // Every proxy gets a spool of its own: a spool directory is locked by its process.
    if let Some(audit) = cfg.audit.as_mut() {
        let dir = tempfile::tempdir().expect("spool dir");
        audit.spool_dir = dir.keep();
    }
    tweak(&mut cfg);
    cfg.validate().expect("test config valid");
    cfg
}

pub async fn start_proxy(tweak: impl FnOnce(&mut Config)) -> ProxyHandle {
    pgtenant::server::spawn(config(tweak))
        .await
        .expect("proxy starts")
}

/// A valid token for `tenant` (default claims, 1 h).
pub fn token(tenant: &str, user: &str) -> String {
    token_with(tenant, user, 3600, &[])
}

pub fn token_with(
    tenant: &str,
    user: &str,
    ttl: u64,
    extra: &[(String, serde_json::Value)],
) -> String {
    pgtenant::auth::issue_hs256(
        env().demo.jwt_secret.as_bytes(),
        "tenant_id",
        tenant,
        Some(user),
        ttl,
        extra,
    )
    .expect("token")
}

pub fn conn_config(addr: SocketAddr, password: &str) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(addr.port())
        .user("app")
        .dbname("app")
        .password(password)
        .application_name("pgtenant-tests")
        .connect_timeout(Duration::from_secs(10));
    c
}

/// Connects through the proxy as `tenant` and drives the connection in the background.
pub async fn connect(addr: SocketAddr, tenant: &str) -> Client {
    try_connect(addr, &token(tenant, &format!("user@{tenant}")))
        .await
        .unwrap_or_else(|e| panic!("connect as {tenant}: {e:?}"))
}

pub async fn try_connect(
    addr: SocketAddr,
    password: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = conn_config(addr, password).connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The SQLSTATE of a failed connect or query.
pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no code: {e:?}"))
}

/// Runs psql through the proxy with `token` as password. `conninfo_extra` like "sslmode=require".
/// Async: the proxy under test runs on the same runtime and must keep running meanwhile.
pub async fn psql(addr: SocketAddr, token: &str, conninfo_extra: &str, args: &[&str]) -> Output {
    let pg = env().pg;
    tokio::process::Command::new(pg.psql_path())
        .arg(format!(
            "host=127.0.0.1 port={} user=app dbname=app {conninfo_extra}",
            addr.port()
        ))
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At"])
        .args(args)
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGSSLMODE")
        .output()
        .await
        .expect("run psql")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// The `/metrics` text of an in-process proxy (its config must have `[admin]`).
pub async fn proxy_metrics(proxy: &ProxyHandle) -> String {
    let admin = proxy.admin_addr.expect("the proxy has an admin listener");
    http_get(&format!("http://{admin}/metrics")).await.1
}

/// A tiny HTTP/1.0 GET over TCP (no client crate needed for three endpoints).
pub async fn http_get(url: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Every `pgtenant_` series `text` names (histogram `_bucket`/`_count`/`_sum` taken back to
/// their base name), each with whether `src/metrics.rs` defines it. For the files that query
/// metrics by name (alert rules, dashboards), so a renamed metric cannot leave them stale.
pub fn metric_references(text: &str) -> Vec<(String, bool)> {
    let known = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs"),
    )
    .expect("read src/metrics.rs");
    let re = regex::Regex::new(r"pgtenant_[a-z_]+").expect("regex");
    re.find_iter(text)
        .map(|m| {
            let name = m.as_str();
            let base = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_count"))
                .or_else(|| name.strip_suffix("_sum"))
                .unwrap_or(name);
            (name.to_string(), known.contains(&format!("\"{base}\"")))
        })
        .collect()
}
