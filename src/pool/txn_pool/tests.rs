//! The transaction-mode pool with real server connections (the shared `TempPg`): affinity,
//! the switch reset, the per-tenant cap and its 53300, dead idle connections.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::embedded_pg::TempPg;

const ROLE: &str = "txn_pool_test";
const PASSWORD: &str = "txn-pool-pw";

async fn pool(size: u32, cap: u32) -> Arc<TxnPool> {
    let pg = TempPg::shared().expect("PostgreSQL");
    let admin = pg.admin_client("postgres").await.expect("admin");
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
               CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}';
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             GRANT TEMP ON DATABASE postgres TO {ROLE};"
        ))
        .await
        .expect("role");
    let up: UpstreamConfig = toml::from_str(&format!(
        "kind = \"shared\"\nurl = \"{}\"\npool_size = {size}\nmax_server_connections_per_tenant = {cap}\ncheckout_timeout = \"500ms\"\npool_mode = \"transaction\"",
        pg.tcp_url(ROLE, PASSWORD, "postgres")
    ))
    .expect("config");
    let target = Arc::new(UpstreamTarget::from_url(&up.url).expect("url"));
    let tls = ServerTls::from_config(&up).expect("tls");
    Arc::new(TxnPool::build(
        "up".into(),
        &up,
        target,
        tls,
        Arc::new(Health::new()),
    ))
}

fn t(name: &str) -> Arc<str> {
    name.into()
}

fn settings(tenant: &str) -> Settings {
    Arc::from(vec![("app.t".to_string(), tenant.to_string())])
}

#[tokio::test]
async fn affinity_hit_keeps_the_connection_and_a_switch_resets_it() {
    let pool = pool(1, 1).await;
    let mut lease = pool.checkout(&t("a")).await.expect("checkout");
    assert_eq!(lease.acquired, Acquired::New);
    lease
        .simple_query("CREATE TEMP TABLE leftover (x int); SET application_name = 'a-app'")
        .await
        .expect("state");
    let pid = lease.backend_pid;
    lease.carried = Some(settings("a"));
    drop(lease);

    let lease = pool.checkout(&t("a")).await.expect("again");
    assert_eq!(lease.acquired, Acquired::Affinity);
    assert_eq!(lease.carried, Some(settings("a")));
    assert_eq!(lease.backend_pid, pid);
    drop(lease);

    // The only connection goes to b: same backend, reset first.
    let mut lease = pool.checkout(&t("b")).await.expect("b");
    assert_eq!(lease.acquired, Acquired::Switched);
    assert_eq!(lease.backend_pid, pid);
    assert_eq!(lease.carried, None);
    let rows = lease
        .query_rows(
            "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())::text || current_setting('application_name')",
            &[],
            &[],
        )
        .await
        .expect("query");
    let text = String::from_utf8_lossy(&rows[0][6..]).into_owned();
    assert_eq!(
        text, "0pgtenant",
        "DISCARD ALL dropped a's temp table and setting"
    );
    assert_eq!(pool.stats().connections, 1);
}

#[tokio::test]
async fn the_tenant_cap_makes_the_extra_checkout_wait_then_53300() {
    let pool = pool(2, 1).await;
    let held = pool.checkout(&t("a")).await.expect("a");
    let err = pool.checkout(&t("a")).await.expect_err("a at its cap");
    match err {
        PoolError::TenantExhausted {
            tenant, held, cap, ..
        } => assert_eq!((tenant.as_str(), held, cap), ("a", 1, 1)),
        other => panic!("{other:?}"),
    }
    // b is not limited by a's cap.
    let b = pool.checkout(&t("b")).await.expect("b");
    assert_eq!(pool.stats().connections, 2);
    // A waiter is served when a's lease comes back.
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(&t("a")).await.map(|l| l.backend_pid) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pid = held.backend_pid;
    drop(held);
    assert_eq!(waiter.await.expect("task").expect("served"), pid);
    drop(b);
    assert_eq!(pool.stats().pending_waiters, 0);
}

#[tokio::test]
async fn dirty_or_dead_connections_are_destroyed_and_replaced() {
    let pool = pool(1, 1).await;
    let mut lease = pool.checkout(&t("a")).await.expect("a");
    let pid = lease.backend_pid;
    lease.dirty = true;
    drop(lease);
    assert_eq!(pool.stats().connections, 0, "a dirty lease is destroyed");

    let lease = pool.checkout(&t("a")).await.expect("a");
    assert_ne!(lease.backend_pid, pid);
    let pid = lease.backend_pid;
    drop(lease);
    let pg = TempPg::shared().expect("PostgreSQL");
    let admin = pg.admin_client("postgres").await.expect("admin");
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lease = pool.checkout(&t("a")).await.expect("replaced");
    assert_ne!(
        lease.backend_pid, pid,
        "the dead idle connection was replaced"
    );
}
