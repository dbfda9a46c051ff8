//! Config reload (`ProxyHandle::reload`, SIGHUP on `pgtenant serve`): new sessions get the
//! new tenants, upstreams and JWT keys; sessions already open keep theirs; an invalid config
//! is rejected and the running one stays.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pgtenant::config::Config;
use tokio_postgres::Client;

use common::serve::{self, metric, Serve};

/// The demo config with nothing routed to `globex` (it reaches `shared` only through
/// `tenants.default` in the demo).
fn without_globex(cfg: &mut Config) {
    cfg.tenants.default = None;
    cfg.tenants.map.remove("globex");
}

async fn one(client: &Client, sql: &str) -> String {
    let rows = client.simple_query(sql).await.expect(sql);
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

async fn refused_with(addr: SocketAddr, password: &str) -> String {
    match common::try_connect(addr, password).await {
        Ok(_) => "connected".into(),
        Err(e) => common::sqlstate(&e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_routes_new_sessions_and_keeps_open_ones() {
    let proxy = common::start_proxy(without_globex).await;
    let globex = common::token("globex", "hank@globex.example");
    assert_eq!(refused_with(proxy.addr, &globex).await, "28000");

    // Opened before the reload: acme's upstream is untouched, techstart's is removed by it.
    let acme = common::connect(proxy.addr, "acme").await;
    let techstart = common::connect(proxy.addr, "techstart").await;
    assert_eq!(one(&acme, "SELECT current_database()").await, "acme_db");
    let before = proxy.shared.runtime();

    let new = common::config(|cfg| {
        without_globex(cfg);
        cfg.tenants.map.insert("globex".into(), "shared".into());
        cfg.tenants.map.remove("techstart");
        cfg.upstreams.remove("techstart");
        if let Some(bench) = cfg.upstreams.get_mut("bench") {
            bench.pool_size += 1;
        }
    });
    proxy.reload(new).await.expect("reload");

    let after = proxy.shared.runtime();
    // Unchanged upstreams keep their pool (and its idle connections); a changed one does not.
    assert!(after.pools.shares_pool_with(&before.pools, "acme"));
    assert!(after.pools.shares_pool_with(&before.pools, "shared"));
    assert!(!after.pools.shares_pool_with(&before.pools, "bench"));
    assert!(after.pools.target("techstart").is_none());

    let g = common::try_connect(proxy.addr, &globex)
        .await
        .expect("globex is routed after the reload");
    assert_eq!(one(&g, "SELECT current_database()").await, "saas");
    // The sessions opened before the reload were not dropped and still work.
    assert_eq!(one(&acme, "SELECT current_database()").await, "acme_db");
    assert_eq!(one(&techstart, "SELECT 40 + 2").await, "42");
    let new_techstart = common::token("techstart", "someone@techstart.example");
    assert_eq!(refused_with(proxy.addr, &new_techstart).await, "28000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_rejected_and_the_running_config_stays() {
    let proxy = common::start_proxy(|_| {}).await;
    let admin = proxy.admin_addr.expect("demo config has [admin]");
    let errors = "pgtenant_config_reloads_total{result=\"error\"}";
    let (_, body) = common::http_get(&format!("http://{admin}/metrics")).await;
    let errors_before = metric(&body, errors);

    let mut bad = common::config(|_| {});
    bad.tenants
        .map
        .insert("globex".into(), "no_such_upstream".into());
    let err = proxy.reload(bad).await.expect_err("unknown upstream");
    assert!(format!("{err:#}").contains("no_such_upstream"), "{err:#}");

    let mut bad_jwt = common::config(|_| {});
    bad_jwt.jwt.secret = Some("short".into());
    bad_jwt.jwt.secret_file = None;
    proxy.reload(bad_jwt).await.expect_err("secret too short");

    // Old routing: globex through `tenants.default`, acme to its own database.
    let g = common::connect(proxy.addr, "globex").await;
    assert_eq!(one(&g, "SELECT current_database()").await, "saas");
    let acme = common::connect(proxy.addr, "acme").await;
    assert_eq!(one(&acme, "SELECT current_database()").await, "acme_db");

    let (_, body) = common::http_get(&format!("http://{admin}/metrics")).await;
    assert!(metric(&body, errors) >= errors_before + 2.0, "{body}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_the_jwt_key_for_new_sessions() {
    let proxy = common::start_proxy(|_| {}).await;
    let old_token = common::token("acme", "alice@acme.example");
    let open = common::try_connect(proxy.addr, &old_token)
        .await
        .expect("old key works before the rotation");

    let new_secret = "a-brand-new-hs256-secret-of-at-least-32-bytes";
    let new = common::config(|cfg| {
        cfg.jwt.secret = Some(new_secret.into());
        cfg.jwt.secret_file = None;
    });
    proxy.reload(new).await.expect("reload");

    assert_eq!(refused_with(proxy.addr, &old_token).await, "28P01");
    let new_token = pgtenant::auth::issue_hs256(
        new_secret.as_bytes(),
        "tenant_id",
        "acme",
        Some("alice@acme.example"),
        3600,
        &[],
    )
    .expect("token");
    let fresh = common::try_connect(proxy.addr, &new_token)
        .await
        .expect("new key works after the rotation");
    assert_eq!(one(&fresh, "SELECT current_database()").await, "acme_db");
    // Authenticated before the rotation: not dropped.
    assert_eq!(one(&open, "SELECT 1").await, "1");
    proxy.stop().await;
}

async fn eventually(log: &Path, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_of_pgtenant_serve() {
    let (addr, admin) = (serve::free_addr(), serve::free_addr());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pgtenant.toml");
    let text = serve::config_text(addr, admin);
    std::fs::write(&config, &text).unwrap();
    let child = Serve::start(&config, addr, admin).await;
    let log = child.log.clone();
    let globex = common::token("globex", "hank@globex.example");
    let open = common::try_connect(addr, &globex)
        .await
        .expect("globex via default");

    // Unroute globex (and every other tenant on the default) in the file, then SIGHUP.
    let unrouted = text.replacen("default = \"shared\"\n", "", 1);
    assert_ne!(
        unrouted, text,
        "the demo config routes the default to shared"
    );
    std::fs::write(&config, &unrouted).unwrap();
    child.signal(Signal::SIGHUP);
    eventually(&log, "SIGHUP did not unroute globex", async || {
        refused_with(addr, &globex).await == "28000"
    })
    .await;
    assert_eq!(one(&open, "SELECT current_database()").await, "saas");

    // An unparsable file: rejected, counted, and the running config stays.
    std::fs::write(&config, "this is [not toml").unwrap();
    child.signal(Signal::SIGHUP);
    eventually(&log, "the bad file was not counted", async || {
        let (_, body) = common::http_get(&format!("http://{admin}/metrics")).await;
        metric(&body, "pgtenant_config_reloads_total{result=\"error\"}") >= 1.0
    })
    .await;
    let acme = common::connect(addr, "acme").await;
    assert_eq!(one(&acme, "SELECT current_database()").await, "acme_db");
    assert_eq!(refused_with(addr, &globex).await, "28000");
    let (_, body) = common::http_get(&format!("http://{admin}/metrics")).await;
    assert_eq!(
        metric(&body, "pgtenant_config_reloads_total{result=\"ok\"}"),
        1.0,
        "{body}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("config reload rejected"), "{logged}");
}
