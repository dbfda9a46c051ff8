//! The signed tenant context end to end: `rls install` on the shared database, policies on
//! `pgtenant.current_tenant()`, the proxy entering the context by bind parameters on every
//! pin. With no SQL guard at all, the attacks that switch a plain setting change nothing.
//! This binary has its own cluster, so replacing the demo's policies affects no other test.

mod common;

use pgtenant::config::ContextMode;
use pgtenant::demo::data;
use pgtenant::isolation::signed::{self, SignedContextConfig};
use tokio::sync::OnceCell;

/// Installs the signed context once and returns (key_id, key_hex).
async fn installed() -> &'static (String, String) {
    static KEY: OnceCell<(String, String)> = OnceCell::const_new();
    KEY.get_or_init(|| async {
        let pg = common::env().pg;
        let admin_url = format!(
            "host={} port={} user=postgres dbname=saas",
            pg.socket_dir.display(),
            pg.port
        );
        let report = signed::install(
            &admin_url,
            "pgtenant",
            "pgtenant_ctx_owner",
            data::POOL_ROLE,
            None,
        )
        .await
        .expect("rls install");
        // Idempotent: a second run keeps the key.
        let again = signed::install(
            &admin_url,
            "pgtenant",
            "pgtenant_ctx_owner",
            data::POOL_ROLE,
            None,
        )
        .await
        .expect("rls install again");
        assert!(again.new_key.is_none());
        let admin = pg.admin_client("saas").await.unwrap();
        for table in ["customers", "invoices"] {
            admin
                .batch_execute(&format!("DROP POLICY tenant_isolation ON {table}"))
                .await
                .unwrap();
            admin
                .batch_execute(&signed::policy_sql("pgtenant", table, "tenant_id").unwrap())
                .await
                .unwrap();
        }
        let key = report.new_key.expect("first install creates a key");
        (key.key_id, key.key_hex)
    })
    .await
}

async fn signed_proxy(pool_size: u32) -> pgtenant::server::ProxyHandle {
    let (key_id, key_hex) = installed().await.clone();
    common::start_proxy(move |c| {
        let shared = c.upstreams.get_mut("shared").unwrap();
        shared.pool_size = pool_size;
        // The boundary must hold without the SQL guard (defence in depth, not the boundary).
        shared.guard = false;
        shared.context = ContextMode::Signed;
        shared.signed_context = Some(
            toml::from_str::<SignedContextConfig>(&format!(
                "key_id = \"{key_id}\"\nkey = \"{key_hex}\""
            ))
            .unwrap(),
        );
    })
    .await
}

async fn visible_tenants(client: &tokio_postgres::Client) -> Vec<String> {
    let mut t: Vec<String> = client
        .query("SELECT DISTINCT tenant_id FROM customers UNION SELECT DISTINCT tenant_id FROM invoices", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    t.sort();
    t.dedup();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_attacks_change_nothing_under_the_signed_context() {
    let proxy = signed_proxy(2).await;
    let client = common::connect(proxy.addr, "medcorp").await;
    assert_eq!(visible_tenants(&client).await, vec!["medcorp".to_string()]);
    let attacks = [
        "SET app.current_tenant_id = 'globex'",
        "SET SESSION \"app\".\"current_tenant_id\" TO 'globex'",
        "SELECT set_config('app.current_tenant_id', 'globex', false)",
        "SELECT set_config(lower('APP.CURRENT_TENANT_ID'), 'glo' || 'bex', false)",
        "DO $$ BEGIN PERFORM set_config('app.current_tenant_id', 'globex', false); END $$",
        "RESET app.current_tenant_id",
        "RESET ALL",
        "DISCARD ALL",
        "SET row_security = off",
        "SET ROLE saas_owner",
        "SET ROLE pgtenant_ctx_owner",
        "SELECT pgtenant.leave()",
        "SELECT pgtenant.enter('globex', 9223372036854775000, 4102444800, 'k', '00')",
        "UPDATE pgtenant.backend_context SET tenant = 'globex'",
        "SELECT * FROM pgtenant.context_keys",
    ];
    // Not here: `ALTER ROLE pgtenant SET ...` succeeds for the pool role itself and degrades
    // every later backend (not isolation: availability); the guard refuses it (alter_role)
    // and `pgtenant doctor` reports role settings (pool_role_settings).
    let mut left = false;
    for attack in attacks {
        let _ = client.batch_execute(attack).await;
        if attack.contains("row_security") {
            // Off makes RLS-affected queries fail (42501) rather than bypass: closed.
            let err = client
                .query("SELECT * FROM customers", &[])
                .await
                .unwrap_err();
            assert_eq!(common::sqlstate(&err), "42501");
            client.batch_execute("SET row_security = on").await.unwrap();
        }
        let seen = visible_tenants(&client).await;
        // Either still medcorp, or nothing at all (after leave()): never another tenant.
        assert!(
            seen.is_empty() || seen == vec!["medcorp".to_string()],
            "after {attack:?} the session sees {seen:?}"
        );
        if attack.contains("leave()") {
            left = true;
        }
        if seen.is_empty() {
            assert!(left, "only leave() may clear the context, not {attack:?}");
        }
    }
    let err = client
        .batch_execute("INSERT INTO customers (tenant_id, name, email) VALUES ('globex', 'x', 'y')")
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "42501");
}

/// One server connection: each new session enters its own tenant; the previous tenant's
/// context never survives into the next session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pin_enters_the_new_tenant_on_a_reused_backend() {
    let proxy = signed_proxy(1).await;
    let mut backend = None;
    for round in 0..3 {
        for t in data::SHARED {
            let client = common::connect(proxy.addr, t.tenant).await;
            let pid: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                *backend.get_or_insert(pid),
                pid,
                "pool of one reuses the backend"
            );
            assert_eq!(
                visible_tenants(&client).await,
                vec![t.tenant.to_string()],
                "round {round}"
            );
            let current: Option<String> = client
                .query_one("SELECT pgtenant.current_tenant()", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(current.as_deref(), Some(t.tenant));
            // Leaves the context cleared mid-session; the next pin must still enter afresh.
            if round == 1 {
                client
                    .batch_execute("SELECT pgtenant.leave()")
                    .await
                    .unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_refused_with_28000_and_no_connection_without_context() {
    installed().await;
    let proxy = common::start_proxy(|c| {
        let shared = c.upstreams.get_mut("shared").unwrap();
        shared.context = ContextMode::Signed;
        shared.signed_context = Some(
            toml::from_str::<SignedContextConfig>(&format!(
                "key_id = \"not-a-key\"\nkey = \"{}\"",
                "ab".repeat(32)
            ))
            .unwrap(),
        );
    })
    .await;
    let err = common::try_connect(proxy.addr, &common::token("medcorp", "m"))
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "28000", "{err:?}");
    // Dedicated tenants are unaffected.
    let acme = common::connect(proxy.addr, "acme").await;
    acme.simple_query("SELECT 1").await.unwrap();
}

/// The same attacks sent through the extended protocol (Parse/Bind/Execute), guard off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_attacks_change_nothing() {
    let proxy = signed_proxy(2).await;
    let client = common::connect(proxy.addr, "initech").await;
    let attacks = [
        (
            "SELECT set_config($1, $2, false)",
            vec!["app.current_tenant_id", "globex"],
        ),
        (
            "SELECT set_config('app.current_tenant_id', $1, false)",
            vec!["medcorp"],
        ),
        (
            "SELECT pgtenant.enter($1, 1, 4102444800, 'k', $2)",
            vec!["globex", "00"],
        ),
    ];
    for (sql, params) in attacks {
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let _ = client.query(sql, &params).await;
        assert_eq!(
            visible_tenants(&client).await,
            vec!["initech".to_string()],
            "after {sql}"
        );
    }
    for sql in [
        "RESET ALL",
        "DISCARD ALL",
        "SET app.current_tenant_id = 'globex'",
    ] {
        let _ = client.query(sql, &[]).await;
        assert_eq!(
            visible_tenants(&client).await,
            vec!["initech".to_string()],
            "after {sql}"
        );
    }
}

/// Many clients of three tenants interleaved over one and two server connections, each
/// also trying to switch its tenant by setting: zero foreign rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_interleaving_with_attacks_never_shows_foreign_rows() {
    use rand::{Rng, SeedableRng};
    for pool_size in [1u32, 2] {
        let proxy = signed_proxy(pool_size).await;
        let mut workers = Vec::new();
        for worker in 0..6u64 {
            let tenant = data::SHARED[worker as usize % data::SHARED.len()].tenant;
            let addr = proxy.addr;
            workers.push(tokio::spawn(async move {
                let mut rng =
                    rand::rngs::StdRng::seed_from_u64(worker + 100 * u64::from(pool_size));
                let mut statements = 0u32;
                for _ in 0..25 {
                    let client = common::connect(addr, tenant).await;
                    for _ in 0..rng.gen_range(5..12) {
                        if rng.gen_bool(0.3) {
                            let other = data::SHARED[rng.gen_range(0..data::SHARED.len())].tenant;
                            let attack = match rng.gen_range(0..4) {
                                0 => format!("SET app.current_tenant_id = '{other}'"),
                                1 => format!(
                                    "SELECT set_config('app.current_tenant_id', '{other}', false)"
                                ),
                                2 => "RESET ALL".to_string(),
                                _ => "DISCARD ALL".to_string(),
                            };
                            let _ = client.batch_execute(&attack).await;
                        }
                        let seen = visible_tenants(&client).await;
                        assert_eq!(seen, vec![tenant.to_string()], "worker {worker}");
                        statements += 1;
                    }
                }
                statements
            }));
        }
        let mut total = 0;
        for w in workers {
            total += w.await.unwrap();
        }
        assert!(total > 1000, "{total}");
    }
}
