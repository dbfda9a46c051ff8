//! Fault tests: PostgreSQL restarts and outages under the proxy. This binary has its own
//! cluster (one per test binary), and its tests run one at a time since they stop it.

mod common;

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// Serializes the tests of this binary: they all restart the one cluster.
static CLUSTER: Mutex<()> = Mutex::const_new(());

async fn until_ok<F, Fut, T, E>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_recover_after_postgres_restarts() {
    let _serial = CLUSTER.lock().await;
    let proxy = common::start_proxy(|c| c.upstreams.get_mut("shared").unwrap().pool_size = 2).await;
    // Fill the pool with idle connections, then restart PostgreSQL under them.
    for _ in 0..2 {
        let c = common::connect(proxy.addr, "medcorp").await;
        c.simple_query("SELECT 1").await.unwrap();
    }
    for mode in ["fast", "immediate"] {
        common::env().pg.restart(mode).unwrap();
        // The very next session succeeds: dead pooled connections are detected at checkout.
        let client = until_ok("first session after restart", || async {
            let c = common::try_connect(proxy.addr, &common::token("medcorp", "m")).await?;
            c.query("SELECT tenant_id FROM customers", &[]).await
        })
        .await;
        assert!(
            client.iter().all(|r| r.get::<_, String>(0) == "medcorp"),
            "{mode}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_queries_fail_cleanly_when_postgres_restarts() {
    let _serial = CLUSTER.lock().await;
    let proxy = common::start_proxy(|_| {}).await;
    let mut sleepers = Vec::new();
    for _ in 0..4 {
        let c = common::connect(proxy.addr, "globex").await;
        sleepers.push(tokio::spawn(async move {
            c.simple_query("SELECT pg_sleep(30)").await.map(|_| ())
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    common::env().pg.restart("fast").unwrap();
    for s in sleepers {
        let res = tokio::time::timeout(Duration::from_secs(15), s)
            .await
            .expect("no hang")
            .unwrap();
        let err = res.expect_err("the query was interrupted");
        // 57P01 from PostgreSQL, relayed; or the connection closed (08006).
        let code = err.code().map(|c| c.code().to_string());
        assert!(
            matches!(code.as_deref(), Some("57P01") | Some("08006") | None),
            "{err:?}"
        );
    }
    let rows = until_ok("session after restart", || async {
        let c = common::try_connect(proxy.addr, &common::token("globex", "g")).await?;
        c.query("SELECT tenant_id FROM customers", &[]).await
    })
    .await;
    assert!(rows.iter().all(|r| r.get::<_, String>(0) == "globex"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_fails_fast_and_heals() {
    let _serial = CLUSTER.lock().await;
    let proxy = common::start_proxy(|c| {
        c.upstreams.get_mut("acme").unwrap().checkout_timeout = Duration::from_secs(5);
    })
    .await;
    let pg = common::env().pg;
    pg.stop_server("fast").unwrap();
    let started = Instant::now();
    let err = common::try_connect(proxy.addr, &common::token("acme", "a"))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    pg.start_server().unwrap();
    let code = common::sqlstate(&err);
    assert!(code == "08001" || code == "08006", "{err:?}");
    assert!(
        elapsed < Duration::from_secs(4),
        "took {elapsed:?}: not fast"
    );
    let client = until_ok("session after upstream came back", || async {
        let c = common::try_connect(proxy.addr, &common::token("acme", "a")).await?;
        c.query_one("SELECT current_database()", &[]).await
    })
    .await;
    assert_eq!(client.get::<_, String>(0), "acme_db");
}
