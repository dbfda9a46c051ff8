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
                for session in 0..12 {
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
        assert!(statements.load(Ordering::Relaxed) > 500);
    }
}
