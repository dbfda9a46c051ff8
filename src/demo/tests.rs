//! Provisions a real throwaway cluster and checks isolation and authentication directly
//! (no proxy): what the demo promises must already hold at the database.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::data::{self, CLEARTEXT_ROLE, INVOICES_PER_CUSTOMER, MD5_ROLE, POOL_ROLE};
use super::{instructions, provision, DemoEnv};
use crate::config::{Config, UpstreamKind};
use crate::embedded_pg::TempPg;

async fn connect(
    pg: &TempPg,
    env: &DemoEnv,
    role: &str,
    db: &str,
) -> Result<Client, tokio_postgres::Error> {
    let url = pg.tcp_url(role, &env.logins[role], db);
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

fn code(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

#[tokio::test]
async fn provisioned_demo_isolates_tenants_and_accepts_every_password_method() {
    let pg = TempPg::start_async().await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let env = provision(&pg, work.path(), "127.0.0.1:6432", "127.0.0.1:9930")
        .await
        .unwrap();

    // The config loads and routes as documented.
    let cfg = Config::load(&env.config_path).unwrap();
    assert_eq!(cfg.tenants.default.as_deref(), Some("shared"));
    assert_eq!(cfg.upstreams["shared"].kind, UpstreamKind::Shared);
    assert_eq!(cfg.upstreams["shared"].pool_size, 10);
    for d in data::DEDICATED {
        assert_eq!(cfg.tenants.map[d.tenant], d.tenant);
        assert_eq!(cfg.upstreams[d.tenant].kind, UpstreamKind::Dedicated);
    }
    assert_eq!(
        std::fs::read_to_string(cfg.jwt.secret_file.unwrap())
            .unwrap()
            .trim(),
        env.jwt_secret
    );
    assert_eq!(env.jwt_secret.len(), 96);
    let cert = std::fs::read(&env.tls_cert).unwrap();
    assert_eq!(rustls_pemfile::certs(&mut &cert[..]).count(), 1);
    let key = std::fs::read(&env.tls_key).unwrap();
    assert!(rustls_pemfile::private_key(&mut &key[..])
        .unwrap()
        .is_some());

    // The pool role over TCP (SCRAM): no tenant, no rows.
    let pool = connect(&pg, &env, POOL_ROLE, "saas").await.unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM customers").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM invoices").await, 0);

    // Each shared tenant sees exactly its own rows.
    for s in data::SHARED {
        pool.batch_execute(&format!("SET app.current_tenant_id = '{}'", s.tenant))
            .await
            .unwrap();
        let rows = pool
            .query("SELECT tenant_id FROM customers", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), s.customers.len(), "{}", s.tenant);
        assert!(rows.iter().all(|r| r.get::<_, String>(0) == s.tenant));
        let invoices = count(&pool, "SELECT count(*) FROM invoices").await;
        assert_eq!(invoices as usize, s.customers.len() * INVOICES_PER_CUSTOMER);
        let helper: String = pool
            .query_one("SELECT current_tenant_id()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(helper, s.tenant);
    }

    // Writes: own tenant works (sequence usage granted), another tenant's or '' does not.
    pool.batch_execute("SET app.current_tenant_id = 'medcorp'")
        .await
        .unwrap();
    pool.batch_execute("BEGIN; INSERT INTO customers (tenant_id, name, email) VALUES ('medcorp', 'New', 'n@x.example'); ROLLBACK")
        .await
        .unwrap();
    let err = pool
        .batch_execute(
            "INSERT INTO customers (tenant_id, name, email) VALUES ('globex', 'X', 'x@x.example')",
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let err = pool
        .batch_execute(
            "INSERT INTO customers (tenant_id, name, email) VALUES ('', 'X', 'x@x.example')",
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    // After RESET the setting is '' (not NULL): RLS would admit '' rows, the CHECK does not.
    pool.batch_execute("RESET app.current_tenant_id")
        .await
        .unwrap();
    assert_eq!(count(&pool, "SELECT count(*) FROM customers").await, 0);
    let err = pool
        .batch_execute(
            "INSERT INTO customers (tenant_id, name, email) VALUES ('', 'X', 'x@x.example')",
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::CHECK_VIOLATION), "{err}");
    // No DDL in public, no way into a dedicated database.
    let err = pool
        .batch_execute("CREATE TABLE sneaky (x int)")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let err = connect(&pg, &env, POOL_ROLE, "acme_db")
        .await
        .err()
        .unwrap();
    assert_eq!(code(&err), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");

    // Hardening checklist for the pool role, as the superuser sees it.
    let admin = pg.admin_client("saas").await.unwrap();
    let row = admin
        .query_one(
            "SELECT rolsuper, rolbypassrls, rolcreatedb, rolcreaterole,
                    (SELECT count(*) FROM pg_auth_members WHERE member = r.oid),
                    (SELECT count(*) FROM pg_class WHERE relowner = r.oid),
                    has_schema_privilege(r.oid, 'public', 'CREATE')
             FROM pg_roles r WHERE rolname = $1",
            &[&POOL_ROLE],
        )
        .await
        .unwrap();
    let flags: [bool; 4] = [row.get(0), row.get(1), row.get(2), row.get(3)];
    assert_eq!(
        flags, [false; 4],
        "superuser, bypassrls, createdb, createrole"
    );
    assert_eq!(
        (row.get::<_, i64>(4), row.get::<_, i64>(5)),
        (0, 0),
        "memberships, owned relations"
    );
    assert!(!row.get::<_, bool>(6), "CREATE on public");
    let forced = count(
        &admin,
        "SELECT count(*) FROM pg_class WHERE relname IN ('customers', 'invoices')
           AND relrowsecurity AND relforcerowsecurity AND relowner = 'saas_owner'::regrole",
    )
    .await;
    assert_eq!(forced, 2);

    // md5 and cleartext logins; the md5 verifier is really md5, and a wrong password fails.
    let verifier: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&MD5_ROLE],
        )
        .await
        .unwrap()
        .get(0);
    assert!(verifier.starts_with("md5"), "{verifier}");
    for role in [MD5_ROLE, CLEARTEXT_ROLE] {
        let c = connect(&pg, &env, role, "saas").await.unwrap();
        c.batch_execute("SET app.current_tenant_id = 'globex'")
            .await
            .unwrap();
        assert_eq!(
            count(&c, "SELECT count(*) FROM customers").await,
            2,
            "{role}"
        );
    }
    let methods: BTreeMap<String, String> = admin
        .query(
            "SELECT user_name[1], auth_method FROM pg_hba_file_rules
             WHERE type = 'host' AND address = '127.0.0.1'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(methods[MD5_ROLE], "md5");
    assert_eq!(methods[CLEARTEXT_ROLE], "password");
    assert_eq!(methods["all"], "scram-sha-256");
    let bad = pg.tcp_url(MD5_ROLE, "wrong", "saas");
    let err = tokio_postgres::connect(&bad, NoTls).await.err().unwrap();
    assert_eq!(code(&err), Some(&SqlState::INVALID_PASSWORD), "{err}");

    // Dedicated tenants see their own database.
    let acme = connect(&pg, &env, "acme_app", "acme_db").await.unwrap();
    let emails = acme.query("SELECT email FROM iam_user", &[]).await.unwrap();
    assert_eq!(emails.len(), 3);
    assert!(emails
        .iter()
        .all(|r| r.get::<_, String>(0).ends_with("@acme.com")));
    assert_eq!(
        count(
            &acme,
            "SELECT count(*) FROM assets WHERE name LIKE 'acme-%'"
        )
        .await,
        4
    );
    let err = connect(&pg, &env, "acme_app", "techstart_db")
        .await
        .err()
        .unwrap();
    assert_eq!(code(&err), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let bench = connect(&pg, &env, "bench_app", "bench_db").await.unwrap();
    assert_eq!(
        count(&bench, "SELECT count(*) FROM pgbench_accounts").await,
        data::PGBENCH_ACCOUNTS
    );
}

#[test]
fn instructions_name_every_tenant_with_its_token() {
    let env = DemoEnv {
        workdir: PathBuf::from("/w"),
        config_path: PathBuf::from("/w/pgtenant.toml"),
        config_text: String::new(),
        jwt_secret: "00".repeat(48),
        dedicated_tenants: vec![],
        shared_tenants: vec![],
        tls_cert: PathBuf::from("/w/dev-cert.pem"),
        tls_key: PathBuf::from("/w/dev-key.pem"),
        listen: "0.0.0.0:6432".parse().unwrap(),
        admin: "127.0.0.1:9930".parse().unwrap(),
        logins: BTreeMap::new(),
        audit_conninfo: "host=/s port=5 user=postgres dbname=audit".into(),
    };
    let text = instructions(&env, 7000, &|tenant, user| {
        format!("TOKEN[{tenant}|{user}]")
    });
    for d in data::DEDICATED {
        assert!(
            text.contains(&format!("TOKEN[{}|{}]", d.tenant, d.demo_user)),
            "{text}"
        );
    }
    for s in data::SHARED {
        assert!(
            text.contains(&format!("TOKEN[{}|{}]", s.tenant, s.demo_user)),
            "{text}"
        );
    }
    assert!(
        text.contains("host=127.0.0.1 port=7000 user=alice@acme.com dbname=acme_db"),
        "{text}"
    );
    assert!(
        text.contains("pgbench -n -S") && text.contains("-p 7000 -U bench bench_db"),
        "{text}"
    );
    assert!(
        text.contains("psql \"host=/s port=5 user=postgres dbname=audit\"")
            && text.contains("FROM audit_tenant_access"),
        "{text}"
    );
}
