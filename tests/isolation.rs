//! Isolation under load: many clients of several tenants interleaved over a pool of one or
//! two server connections; no client ever sees another tenant's row or state.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pgtenant::demo::data;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_interleaving_never_shows_foreign_rows() {
    for pool_size in [1u32, 2] {
        let proxy = common::start_proxy(|c| {
            let shared = c.upstreams.get_mut("shared").unwrap();
            shared.pool_size = pool_size;
            shared.checkout_timeout = std::time::Duration::from_secs(20);
        })
        .await;
        let statements = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for worker in 0..6u64 {
            let tenant = data::SHARED[worker as usize % data::SHARED.len()].tenant;
            let addr = proxy.addr;
            let statements = statements.clone();
            workers.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(worker * 7919 + u64::from(pool_size));
                for session in 0..25 {
                    let client = common::connect(addr, tenant).await;
                    let marker = format!("w{worker}s{session}");
                    for step in 0..rng.gen_range(5..15) {
                        match rng.gen_range(0..6) {
                            0 => {
                                let rows = client.query("SELECT tenant_id FROM customers", &[]).await.unwrap();
                                assert!(rows.iter().all(|r| r.get::<_, String>(0) == tenant));
                            }
                            1 => {
                                let rows = client
                                    .query("SELECT i.tenant_id FROM invoices i JOIN customers c USING (tenant_id)", &[])
                                    .await
                                    .unwrap();
                                assert!(rows.iter().all(|r| r.get::<_, String>(0) == tenant));
                            }
                            2 => {
                                // Insert and delete own rows inside a transaction; roll back half the time.
                                let tx = if rng.gen_bool(0.5) { "ROLLBACK" } else { "COMMIT" };
                                client
                                    .batch_execute(&format!(
                                        "BEGIN; INSERT INTO customers (tenant_id, name, email) VALUES ('{tenant}', '{marker}', 'x@{tenant}');
                                         DELETE FROM customers WHERE name = '{marker}'; {tx}"
                                    ))
                                    .await
                                    .unwrap();
                            }
                            3 => {
                                // Writing a row for another tenant is refused by the policy.
                                let other = if tenant == "medcorp" { "globex" } else { "medcorp" };
                                let err = client
                                    .batch_execute(&format!(
                                        "INSERT INTO customers (tenant_id, name, email) VALUES ('{other}', '{marker}', 'x')"
                                    ))
                                    .await
                                    .unwrap_err();
                                assert_eq!(common::sqlstate(&err), "42501");
                            }
                            4 => {
                                let setting: String = client
                                    .query_one("SELECT current_setting('app.current_tenant_id')", &[])
                                    .await
                                    .unwrap()
                                    .get(0);
                                assert_eq!(setting, tenant);
                            }
                            _ => {
                                // Session state that must not leak to the next tenant on this backend.
                                client
                                    .batch_execute(&format!(
                                        "CREATE TEMP TABLE IF NOT EXISTS mine_{worker} (x text); PREPARE p_{worker}_{session}_{step} AS SELECT 1"
                                    ))
                                    .await
                                    .unwrap();
                                let leaked: i64 = client
                                    .query_one(
                                        &format!("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'p\\_%' AND name NOT LIKE 'p\\_{worker}\\_%'"),
                                        &[],
                                    )
                                    .await
                                    .unwrap()
                                    .get(0);
                                assert_eq!(leaked, 0, "another client's prepared statement is visible");
                                let foreign_temp: i64 = client
                                    .query_one(
                                        &format!("SELECT count(*) FROM pg_class WHERE relpersistence = 't' AND relname LIKE 'mine\\_%' AND relname <> 'mine_{worker}' AND pg_table_is_visible(oid)"),
                                        &[],
                                    )
                                    .await
                                    .unwrap()
                                    .get(0);
                                assert_eq!(foreign_temp, 0, "another client's temp table is visible");
                            }
                        }
                        statements.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        assert!(statements.load(Ordering::Relaxed) > 1000);
    }
}

/// The SQL guard in `context = "setting"` mode: each attack is refused with 42501 naming the
/// rule, counted in the metric, and the session stays usable with its tenant unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_refuses_setting_attacks_and_the_session_goes_on() {
    let proxy = common::start_proxy(|_| {}).await;
    let client = common::connect(proxy.addr, "medcorp").await;
    let attacks = [
        ("SET app.current_tenant_id = 'globex'", "tenant_setting"),
        ("set SESSION \"APP\".\"current_tenant_id\" TO 'globex'", "tenant_setting"),
        ("SET LOCAL app.current_tenant_id = 'globex'", "tenant_setting"),
        ("SET /* hidden */ app . current_tenant_id = 'globex'", "tenant_setting"),
        ("RESET app.current_tenant_id", "tenant_setting"),
        ("RESET ALL", "reset_all"),
        ("DISCARD ALL", "discard"),
        ("SELECT set_config('app.current_tenant_id', 'globex', false)", "set_config"),
        ("SELECT pg_catalog.SET_CONFIG(lower('APP.CURRENT_TENANT_ID'), 'globex', false)", "set_config"),
        ("WITH x AS (SELECT set_config('app.current_tenant_id', 'globex', false)) SELECT * FROM x", "set_config"),
        ("SELECT * FROM customers WHERE set_config('app.current_tenant_id', 'globex', false) IS NOT NULL", "set_config"),
        ("PREPARE p AS SELECT set_config('app.current_tenant_id', 'globex', false)", "set_config"),
        ("DO $$ BEGIN PERFORM set_config('app.current_tenant_id', 'globex', false); END $$", "do_block"),
        ("SET ROLE saas_owner", "set_role"),
        ("SET SESSION AUTHORIZATION saas_owner", "session_authorization"),
        ("ALTER ROLE pgtenant SET search_path = evil", "alter_role"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "create_function"),
        ("LISTEN tenant_events", "listen"),
        ("COPY customers TO PROGRAM 'cat'", "copy_program"),
        ("SELECT 1; SET app.current_tenant_id = 'globex'", "tenant_setting"),
    ];
    for (sql, rule) in attacks {
        let err = client.simple_query(sql).await.expect_err(sql);
        assert_eq!(common::sqlstate(&err), "42501", "{sql}: {err:?}");
        assert!(
            format!("{err:?}").contains(rule),
            "{sql}: message should name {rule}: {err:?}"
        );
        // Extended protocol (Parse) is checked too.
        let err = client.query(sql, &[]).await.expect_err(sql);
        assert_eq!(common::sqlstate(&err), "42501", "extended {sql}: {err:?}");
        let rows = client
            .query("SELECT tenant_id FROM customers", &[])
            .await
            .unwrap();
        assert!(
            !rows.is_empty() && rows.iter().all(|r| r.get::<_, String>(0) == "medcorp"),
            "after {sql}"
        );
    }
    // A blocked statement inside a transaction does not end it.
    client.batch_execute("BEGIN").await.unwrap();
    client.simple_query("RESET ALL").await.unwrap_err();
    client.batch_execute("SELECT 1; COMMIT").await.unwrap();
    // Ordinary settings and statements pass.
    client
        .batch_execute(
            "SET application_name = 'ok'; SET search_path = public; SHOW app.current_tenant_id",
        )
        .await
        .unwrap();

    let (_, metrics) =
        common::http_get(&format!("http://{}/metrics", proxy.admin_addr.unwrap())).await;
    assert!(
        metrics.contains(
            "pgtenant_isolation_violations_total{tenant=\"medcorp\",rule=\"set_config\"}"
        ),
        "{metrics}"
    );
}

/// A pipeline with a refused statement in the middle: answers stay in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_keep_pipelined_answers_in_order() {
    let proxy = common::start_proxy(|_| {}).await;
    let client = common::connect(proxy.addr, "globex").await;
    let (a, b, c) = tokio::join!(
        client.query_one("SELECT 1::int", &[]),
        client.query_one(
            "SELECT set_config('app.current_tenant_id', 'medcorp', false)",
            &[]
        ),
        client.query_one("SELECT count(*) FROM customers", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(common::sqlstate(&b.unwrap_err()), "42501");
    assert_eq!(
        c.unwrap().get::<_, i64>(0),
        data::shared("globex").unwrap().customers.len() as i64
    );
}
