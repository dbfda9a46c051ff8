//! The signed tenant context against a real PostgreSQL (a private `TempPg` with the demo
//! provisioned): install, RLS with the signed policy, attacks, rotation, the proxy's
//! round trips on a `ServerConn`, and the cost per `enter`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::conn::query_rows;
use super::sql::{enter_sql, identity_sql, policy_sql, DEFAULT_OWNER, DEFAULT_SCHEMA};
use super::*;
use crate::demo::data::{MD5_ROLE, POOL_ROLE, SHARED_DATABASE};
use crate::demo::{provision, DemoEnv};
use crate::embedded_pg::TempPg;
use crate::pool::{ServerConn, ServerError, ServerTls, UpstreamTarget};

const S: &str = DEFAULT_SCHEMA;
const HOUR: Duration = Duration::from_secs(3600);

struct Fixture {
    pg: TempPg,
    env: DemoEnv,
    key: NewKey,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn admin_conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname={SHARED_DATABASE}",
            self.pg.socket_dir.display(),
            self.pg.port
        )
    }

    fn ctx(&self) -> SignedContext {
        let signer = ContextSigner::from_hex(&self.key.key_id, &self.key.key_hex).unwrap();
        SignedContext::new(S, signer, HOUR).unwrap()
    }

    fn pool_url(&self) -> String {
        self.pg
            .tcp_url(POOL_ROLE, &self.env.logins[POOL_ROLE], SHARED_DATABASE)
    }
}

/// One private cluster for this file's tests: the demo provisioned, the signed context
/// installed in schema `pgtenant`, and the demo's setting-based policies on `customers`
/// and `invoices` replaced by the signed form.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let pg = TempPg::start().unwrap();
                pg.stop_when_process_exits();
                let dir = tempfile::tempdir().unwrap();
                let env = provision(&pg, dir.path(), "127.0.0.1:6432", "127.0.0.1:9930")
                    .await
                    .unwrap();
                let admin_url = format!(
                    "host={} port={} user=postgres dbname={SHARED_DATABASE}",
                    pg.socket_dir.display(),
                    pg.port
                );
                let report = install(&admin_url, S, DEFAULT_OWNER, POOL_ROLE, None)
                    .await
                    .unwrap();
                let key = report.new_key.unwrap();
                assert_eq!(report.active_keys, std::slice::from_ref(&key.key_id));
                let admin = pg.admin_client(SHARED_DATABASE).await.unwrap();
                // Permissive policies are OR-ed: the old setting-based ones must go.
                let mut sql = String::from(
                    "DROP POLICY tenant_isolation ON customers;
                     DROP POLICY tenant_isolation ON invoices;\n",
                );
                sql += &policy_sql(S, "customers", "tenant_id").unwrap();
                sql += &policy_sql(S, "invoices", "tenant_id").unwrap();
                admin.batch_execute(&sql).await.unwrap();
                Fixture {
                    pg,
                    env,
                    key,
                    _dir: dir,
                }
            })
        })
        .join()
        .unwrap()
    })
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn identity(c: &Client, schema: &str) -> BackendIdentity {
    let row = c.query_one(&identity_sql(schema), &[]).await.unwrap();
    BackendIdentity {
        pid: row.get(0),
        backend_start_micros: row.get(1),
    }
}

/// `enter` with bind parameters, as the proxy sends it.
async fn enter(c: &Client, schema: &str, p: &Proof) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        &enter_sql(schema),
        &[&p.tenant, &p.seq, &p.exp, &p.key_id, &p.mac],
    )
    .await
}

async fn current(c: &Client, schema: &str) -> Option<String> {
    c.query_one(&format!("SELECT {schema}.current_tenant()"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Tenants of the visible `customers` rows, sorted, and the visible invoice count.
async fn visible(c: &Client) -> (Vec<String>, i64) {
    let tenants = c
        .query("SELECT tenant_id FROM customers ORDER BY tenant_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let invoices = c
        .query_one("SELECT count(*) FROM invoices", &[])
        .await
        .unwrap()
        .get(0);
    (tenants, invoices)
}

fn sqlstate(r: Result<impl std::fmt::Debug, tokio_postgres::Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_else(|| panic!("no SQLSTATE: {e}")),
    }
}

fn message(r: Result<impl std::fmt::Debug, tokio_postgres::Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default(),
    }
}

fn medcorp() -> (Vec<String>, i64) {
    (vec!["medcorp".to_owned(); 3], 6)
}

fn exp_in(secs: i64) -> i64 {
    now_unix() + secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_signed_install_is_idempotent_and_locked_down() {
    let f = fixture();
    let mut admin = connect(&f.admin_conninfo()).await;
    for _ in 0..2 {
        let again = install_on(&mut admin, S, DEFAULT_OWNER, POOL_ROLE, None)
            .await
            .unwrap();
        assert!(again.new_key.is_none(), "a second install creates no key");
        assert_eq!(again.active_keys, std::slice::from_ref(&f.key.key_id));
        assert!(again
            .policy_example
            .contains("USING (tenant_id = (SELECT pgtenant.current_tenant()))"));
    }
    let q = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap() }
    };
    // Owner: NOLOGIN, INHERIT, in pg_read_all_stats, nobody a member of it.
    let row = q(
        "SELECT rolcanlogin, rolinherit, rolsuper, rolbypassrls, rolconnlimit,
                   pg_has_role(oid, 'pg_read_all_stats', 'USAGE'),
                   (SELECT count(*) FROM pg_auth_members WHERE roleid = r.oid)
                 FROM pg_roles r WHERE rolname = 'pgtenant_ctx_owner'",
    )
    .await;
    assert!(!row.get::<_, bool>(0));
    assert!(row.get::<_, bool>(1));
    assert!(!row.get::<_, bool>(2) && !row.get::<_, bool>(3));
    assert_eq!(row.get::<_, i32>(4), 0);
    assert!(row.get::<_, bool>(5));
    assert_eq!(row.get::<_, i64>(6), 0);
    // Every function: owner's, SECURITY DEFINER except _hmac, search_path pinned.
    let rows = admin
        .query(
            "SELECT p.proname, p.prosecdef, coalesce(array_to_string(p.proconfig, ','), ''),
                    pg_get_userbyid(p.proowner)
             FROM pg_proc p WHERE p.pronamespace = 'pgtenant'::regnamespace ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        names,
        [
            "_hmac",
            "backend_identity",
            "current_tenant",
            "enter",
            "leave"
        ]
    );
    for r in &rows {
        let name: String = r.get(0);
        assert_eq!(r.get::<_, String>(3), "pgtenant_ctx_owner", "{name}");
        if name != "_hmac" {
            assert!(r.get::<_, bool>(1), "{name} is SECURITY DEFINER");
            assert_eq!(r.get::<_, String>(2), "search_path=pg_catalog, pg_temp");
        }
    }
    // Privileges: the pool role executes the four functions and reads nothing; another
    // login role (md5_user) has no access at all.
    let row = q("SELECT
        has_function_privilege('pgtenant', 'pgtenant.enter(text,bigint,bigint,text,text)', 'EXECUTE'),
        has_function_privilege('pgtenant', 'pgtenant.current_tenant()', 'EXECUTE'),
        has_function_privilege('pgtenant', 'pgtenant.leave()', 'EXECUTE'),
        has_function_privilege('pgtenant', 'pgtenant.backend_identity()', 'EXECUTE'),
        has_function_privilege('pgtenant', 'pgtenant._hmac(bytea,bytea)', 'EXECUTE'),
        has_table_privilege('pgtenant', 'pgtenant.context_keys', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER'),
        has_table_privilege('pgtenant', 'pgtenant.backend_context', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER'),
        has_schema_privilege('pgtenant', 'pgtenant', 'CREATE'),
        has_schema_privilege('md5_user', 'pgtenant', 'USAGE'),
        has_function_privilege('md5_user', 'pgtenant.enter(text,bigint,bigint,text,text)', 'EXECUTE'),
        (SELECT relpersistence FROM pg_class WHERE oid = 'pgtenant.backend_context'::regclass)::text")
    .await;
    for i in 0..4 {
        assert!(row.get::<_, bool>(i), "pool role lacks EXECUTE #{i}");
    }
    for i in 4..10 {
        assert!(!row.get::<_, bool>(i), "unexpected privilege #{i}");
    }
    assert_eq!(row.get::<_, String>(10), "u", "context table is UNLOGGED");

    // Refusals before anything changes.
    let err = install_on(&mut admin, S, DEFAULT_OWNER, "no_such_role", None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    let existing = tempfile::NamedTempFile::new().unwrap();
    assert!(install_on(
        &mut admin,
        S,
        DEFAULT_OWNER,
        POOL_ROLE,
        Some(existing.path())
    )
    .await
    .is_err());
    assert!(
        install_on(&mut admin, "bad;name", DEFAULT_OWNER, POOL_ROLE, None)
            .await
            .is_err()
    );
    // A schema prepared by someone else is not adopted.
    admin
        .batch_execute("CREATE SCHEMA squatted AUTHORIZATION md5_user")
        .await
        .unwrap();
    let err = install_on(&mut admin, "squatted", DEFAULT_OWNER, POOL_ROLE, None)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("refusing to take it over"),
        "{err:#}"
    );
    // The owner must have no members: the script refuses to continue.
    admin
        .batch_execute("GRANT pgtenant_ctx_owner TO md5_user")
        .await
        .unwrap();
    let err = install_on(&mut admin, S, DEFAULT_OWNER, POOL_ROLE, None)
        .await
        .unwrap_err();
    admin
        .batch_execute("REVOKE pgtenant_ctx_owner FROM md5_user")
        .await
        .unwrap();
    assert!(format!("{err:#}").contains("has members"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_signed_context_holds_under_attack() {
    let f = fixture();
    let ctx = f.ctx();
    let signer = ctx.signer();
    let a = connect(&f.pool_url()).await;
    let b = connect(&f.pool_url()).await;
    let id_a = identity(&a, S).await;
    let id_b = identity(&b, S).await;
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id_a.pid, pid_a);
    assert_ne!(id_a.pid, id_b.pid);

    // No context yet: NULL, zero rows (fails closed).
    assert_eq!(current(&a, S).await, None);
    assert_eq!(visible(&a).await, (vec![], 0));

    let p1 = ctx.proof(&id_a, "medcorp");
    enter(&a, S, &p1).await.unwrap();
    assert_eq!(current(&a, S).await.as_deref(), Some("medcorp"));
    assert_eq!(visible(&a).await, medcorp());

    // Settings are not the context any more.
    for sql in [
        "SET app.current_tenant_id = 'globex'",
        "SELECT set_config('app.current_tenant_id', 'globex', false)",
        "RESET ALL",
        "SET search_path = public",
        // DISCARD ALL does not clear the context: the proxy calls leave()/enter() itself.
        "DISCARD ALL",
    ] {
        a.batch_execute(sql).await.unwrap();
        assert_eq!(current(&a, S).await.as_deref(), Some("medcorp"), "{sql}");
        assert_eq!(visible(&a).await, medcorp(), "after {sql}");
    }
    // Writing another tenant's row: WITH CHECK.
    let r = a
        .execute(
            "INSERT INTO customers (tenant_id, name, email) VALUES ('globex', 'x', 'x@x')",
            &[],
        )
        .await;
    assert_eq!(sqlstate(r), "42501");

    // Forged MAC.
    let forged = Proof {
        mac: "0".repeat(64),
        ..ctx.proof(&id_a, "globex")
    };
    let r = enter(&a, S, &forged).await;
    assert_eq!(sqlstate(r), "28000");
    // A valid MAC (for medcorp) with the tenant swapped.
    let valid = ctx.proof(&id_a, "medcorp");
    let swapped = Proof {
        tenant: "globex".into(),
        ..valid.clone()
    };
    let r = enter(&a, S, &swapped).await;
    assert!(message(r).contains("bad signature"));
    // Replay of the accepted proof (same seq).
    let r = enter(&a, S, &p1).await;
    assert!(message(r).contains("sequence not increasing"));
    // Accept a newer proof, then a correctly signed one with a lower seq.
    enter(&a, S, &valid).await.unwrap();
    let lower_seq = valid.seq - 1;
    let exp = exp_in(600);
    let lower = Proof {
        tenant: "globex".into(),
        seq: lower_seq,
        exp,
        key_id: signer.key_id().into(),
        mac: signer.sign(
            "globex",
            id_a.pid,
            id_a.backend_start_micros,
            lower_seq,
            exp,
        ),
    };
    let r = enter(&a, S, &lower).await;
    assert!(message(r).contains("sequence not increasing"));
    // Expired, correctly signed, fresh seq.
    let (seq, exp) = (next_seq(), exp_in(-1));
    let expired = Proof {
        tenant: "globex".into(),
        seq,
        exp,
        key_id: signer.key_id().into(),
        mac: signer.sign("globex", id_a.pid, id_a.backend_start_micros, seq, exp),
    };
    let r = enter(&a, S, &expired).await;
    assert!(message(r).contains("expired"));
    // Out of timestamp range, correctly signed: 28000, not a range error.
    let (seq, exp) = (next_seq(), sql::MAX_EXP_UNIX + 1);
    let far = Proof {
        tenant: "globex".into(),
        seq,
        exp,
        key_id: signer.key_id().into(),
        mac: signer.sign("globex", id_a.pid, id_a.backend_start_micros, seq, exp),
    };
    let r = enter(&a, S, &far).await;
    assert!(message(r).contains("malformed"));
    // A proof for backend b, used on a (fails), then on b (works there).
    let for_b = ctx.proof(&id_b, "globex");
    let r = enter(&a, S, &for_b).await;
    assert!(message(r).contains("bad signature"));
    // Same pid, another backend start (a pid reused by a later backend).
    let (seq, exp) = (next_seq(), exp_in(600));
    let old_start = id_a.backend_start_micros - 1;
    let other_start = Proof {
        tenant: "globex".into(),
        seq,
        exp,
        key_id: signer.key_id().into(),
        mac: signer.sign("globex", id_a.pid, old_start, seq, exp),
    };
    assert!(message(enter(&a, S, &other_start).await).contains("bad signature"));
    // Unknown key id, NULLs, empty tenant, oversized tenant: refused, never a silent no-op.
    let unknown = Proof {
        key_id: "nokey".into(),
        ..ctx.proof(&id_a, "globex")
    };
    assert!(message(enter(&a, S, &unknown).await).contains("unknown or retired key"));
    let r = a
        .batch_execute("SELECT pgtenant.enter(NULL, NULL, NULL, NULL, NULL)")
        .await;
    assert_eq!(sqlstate(r), "28000");
    let r = enter(&a, S, &ctx.proof(&id_a, "")).await;
    assert!(message(r).contains("malformed"));
    let r = enter(&a, S, &ctx.proof(&id_a, &"x".repeat(257))).await;
    assert!(message(r).contains("malformed"));
    // After all of that: still medcorp, nothing else.
    assert_eq!(current(&a, S).await.as_deref(), Some("medcorp"));
    assert_eq!(visible(&a).await, medcorp());
    enter(&b, S, &for_b).await.unwrap();
    assert_eq!(current(&b, S).await.as_deref(), Some("globex"));
    assert_eq!(visible(&b).await, (vec!["globex".to_owned(); 2], 4));
    assert_eq!(current(&a, S).await.as_deref(), Some("medcorp"));

    // Direct access to the tables, and to the owner's objects and role.
    for sql in [
        "SELECT * FROM pgtenant.backend_context",
        "INSERT INTO pgtenant.backend_context VALUES (pg_backend_pid(), now(), 9000000000000000000, 'globex', 'infinity', 'x')",
        "UPDATE pgtenant.backend_context SET tenant = 'globex'",
        "DELETE FROM pgtenant.backend_context",
        "TRUNCATE pgtenant.backend_context",
        "SELECT * FROM pgtenant.context_keys",
        "SELECT pgtenant._hmac('\\x00', '\\x00')",
        "CREATE OR REPLACE FUNCTION pgtenant.current_tenant() RETURNS text LANGUAGE sql AS $$ SELECT 'globex' $$",
        "ALTER FUNCTION pgtenant.current_tenant() OWNER TO pgtenant",
        "CREATE FUNCTION pgtenant.x() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        "SET ROLE pgtenant_ctx_owner",
        "GRANT pgtenant_ctx_owner TO pgtenant",
        "ALTER TABLE customers DISABLE ROW LEVEL SECURITY",
        "SET row_security = off; SELECT * FROM customers",
    ] {
        let r = a.batch_execute(sql).await;
        assert_eq!(sqlstate(r), "42501", "{sql}");
    }
    // No key in any function's source.
    let defs: String = a
        .query_one(
            "SELECT string_agg(pg_get_functiondef(p.oid), E'\\n')
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'pgtenant'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(defs.contains("v1|"), "function sources are readable");
    assert!(!defs.contains(&f.key.key_hex));
    // The statement the proxy sends carries no proof: pg_stat_activity shows placeholders.
    let query: String = b
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE pid = $1",
            &[&id_a.pid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!query.contains(&valid.mac));

    // Parallel query: the policy's sub-select runs in the leader only.
    a.batch_execute(
        "SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0;
         SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
         SET force_parallel_mode = on; SET enable_indexscan = off; SET enable_bitmapscan = off",
    )
    .await
    .unwrap();
    let plan: Vec<String> = a
        .query("EXPLAIN (COSTS OFF) SELECT tenant_id FROM customers", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(plan.iter().any(|l| l.contains("Gather")), "{plan:?}");
    assert_eq!(visible(&a).await, medcorp());
    a.batch_execute("RESET ALL").await.unwrap();

    // leave(): NULL, zero rows; the old proofs stay dead (seq is kept).
    a.batch_execute("SELECT pgtenant.leave()").await.unwrap();
    assert_eq!(current(&a, S).await, None);
    assert_eq!(visible(&a).await, (vec![], 0));
    assert!(message(enter(&a, S, &valid).await).contains("sequence not increasing"));
    // A client rolling back its own leave(): no tenant until the next enter (fails closed).
    enter(&a, S, &ctx.proof(&id_a, "medcorp")).await.unwrap();
    a.batch_execute("BEGIN; SELECT pgtenant.leave(); ROLLBACK")
        .await
        .unwrap();
    assert_eq!(current(&a, S).await, None);
    assert_eq!(visible(&a).await, (vec![], 0));
    enter(&a, S, &ctx.proof(&id_a, "medcorp")).await.unwrap();
    assert_eq!(visible(&a).await, medcorp());

    // Another login role cannot even reach the schema.
    let url =
        f.pg.tcp_url(MD5_ROLE, &f.env.logins[MD5_ROLE], SHARED_DATABASE);
    let other = connect(&url).await;
    let r = other
        .batch_execute("SELECT pgtenant.current_tenant()")
        .await;
    assert_eq!(sqlstate(r), "42501");
}

/// An older version of this backend's row, seen through a snapshot exported before the
/// proxy re-pinned the backend, must not count: `current_tenant()` requires xmax = 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_signed_imported_snapshot_cannot_resurrect_an_earlier_tenant() {
    let f = fixture();
    let ctx = f.ctx();
    let admin = connect(&f.admin_conninfo()).await;
    // What a function without the xmax check would see (superuser-owned, test only).
    admin
        .batch_execute(
            "CREATE OR REPLACE FUNCTION public.naive_tenant() RETURNS text
             LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
                 SELECT c.tenant FROM pgtenant.backend_context c
                 WHERE c.pid = pg_backend_pid()
                   AND c.backend_start = (SELECT backend_start FROM pg_stat_get_activity(pg_backend_pid()))
                   AND c.expires_at > clock_timestamp() $$;
             GRANT EXECUTE ON FUNCTION public.naive_tenant() TO pgtenant",
        )
        .await
        .unwrap();
    let victim_pin = connect(&f.pool_url()).await; // the backend the proxy re-pins
    let exporter = connect(&f.pool_url()).await; // the attacker's second connection
    let id = identity(&victim_pin, S).await;
    enter(&victim_pin, S, &ctx.proof(&id, "medcorp"))
        .await
        .unwrap();

    exporter
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let snapshot: String = exporter
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .unwrap()
        .get(0);
    // Release and re-pin to the attacker's tenant.
    victim_pin
        .batch_execute("SELECT pgtenant.leave()")
        .await
        .unwrap();
    victim_pin.batch_execute("DISCARD ALL").await.unwrap();
    enter(&victim_pin, S, &ctx.proof(&id, "globex"))
        .await
        .unwrap();
    assert_eq!(current(&victim_pin, S).await.as_deref(), Some("globex"));

    // The attacker, now on that backend, imports the old snapshot.
    victim_pin
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .unwrap();
    let naive: Option<String> = victim_pin
        .query_one("SELECT public.naive_tenant()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        naive.as_deref(),
        Some("medcorp"),
        "the attack is real without xmax = 0"
    );
    assert_eq!(current(&victim_pin, S).await, None);
    assert_eq!(visible(&victim_pin).await, (vec![], 0));
    victim_pin.batch_execute("COMMIT").await.unwrap();
    exporter.batch_execute("COMMIT").await.unwrap();
    assert_eq!(current(&victim_pin, S).await.as_deref(), Some("globex"));
    admin
        .batch_execute("DROP FUNCTION public.naive_tenant()")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_signed_key_rotation_and_missing_stats_privilege() {
    const RS: &str = "pgtenant_rot";
    const RO: &str = "pgtenant_rot_owner";
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut admin = connect(&f.admin_conninfo()).await;
    let k1_file = dir.path().join("k1.key");
    let report = install_on(&mut admin, RS, RO, POOL_ROLE, Some(&k1_file))
        .await
        .unwrap();
    let k1 = report.new_key.unwrap();
    let text = std::fs::read_to_string(&k1_file).unwrap();
    assert_eq!(text, format!("{}:{}\n", k1.key_id, k1.key_hex));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&k1_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let ctx1 =
        SignedContext::new(RS, ContextSigner::from_key_file(&k1_file).unwrap(), HOUR).unwrap();

    let c = connect(&f.pool_url()).await;
    let id = identity(&c, RS).await;
    enter(&c, RS, &ctx1.proof(&id, "initech")).await.unwrap();
    assert_eq!(current(&c, RS).await.as_deref(), Some("initech"));

    // Rotation 1: k2 added, k1 still valid.
    let k2 = rotate_key_on(&mut admin, RS, true, None).await.unwrap();
    let ctx2 = SignedContext::new(
        RS,
        ContextSigner::from_hex(&k2.key_id, &k2.key_hex).unwrap(),
        HOUR,
    )
    .unwrap();
    enter(&c, RS, &ctx1.proof(&id, "initech")).await.unwrap();
    enter(&c, RS, &ctx2.proof(&id, "globex")).await.unwrap();
    assert_eq!(current(&c, RS).await.as_deref(), Some("globex"));

    // Rotation 2 with retire_older: k3 and k2 valid, k1 retired.
    let (k3_id, k3_hex) = rotate_key(&f.admin_conninfo(), RS, true, None)
        .await
        .unwrap();
    let ctx3 =
        SignedContext::new(RS, ContextSigner::from_hex(&k3_id, &k3_hex).unwrap(), HOUR).unwrap();
    let active: Vec<String> = admin
        .query(
            &format!("SELECT key_id FROM {RS}.context_keys WHERE retired_at IS NULL ORDER BY created_at DESC"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(active, [k3_id.clone(), k2.key_id.clone()]);
    let r = enter(&c, RS, &ctx1.proof(&id, "medcorp")).await;
    assert!(message(r).contains("unknown or retired key"));
    assert_eq!(current(&c, RS).await.as_deref(), Some("globex"));
    enter(&c, RS, &ctx2.proof(&id, "medcorp")).await.unwrap();
    enter(&c, RS, &ctx3.proof(&id, "initech")).await.unwrap();
    assert_eq!(current(&c, RS).await.as_deref(), Some("initech"));
    // Explicit retirement.
    retire_key(&admin, RS, &k2.key_id).await.unwrap();
    assert!(retire_key(&admin, RS, &k2.key_id).await.is_err());
    let r = enter(&c, RS, &ctx2.proof(&id, "medcorp")).await;
    assert_eq!(sqlstate(r), "28000");
    // A re-install keeps the keys and creates none.
    let again = install_on(&mut admin, RS, RO, POOL_ROLE, None)
        .await
        .unwrap();
    assert!(again.new_key.is_none());
    assert_eq!(again.active_keys, std::slice::from_ref(&k3_id));

    // Gotcha: without pg_read_all_stats the owner cannot see backend_start; every proof
    // fails (closed) and current_tenant() is NULL. Re-running install repairs it.
    admin
        .batch_execute(&format!("REVOKE pg_read_all_stats FROM {RO}"))
        .await
        .unwrap();
    let r = enter(&c, RS, &ctx3.proof(&id, "initech")).await;
    assert!(message(r).contains("backend start time not visible"));
    assert_eq!(current(&c, RS).await, None);
    install_on(&mut admin, RS, RO, POOL_ROLE, None)
        .await
        .unwrap();
    enter(&c, RS, &ctx3.proof(&id, "initech")).await.unwrap();
    assert_eq!(current(&c, RS).await.as_deref(), Some("initech"));
    // NOINHERIT has the same effect.
    admin
        .batch_execute(&format!("ALTER ROLE {RO} NOINHERIT"))
        .await
        .unwrap();
    assert_eq!(current(&c, RS).await, None);
    install_on(&mut admin, RS, RO, POOL_ROLE, None)
        .await
        .unwrap();
    assert_eq!(current(&c, RS).await.as_deref(), Some("initech"));
}

async fn raw_text(conn: &mut ServerConn, sql: &str) -> Option<String> {
    let rows = query_rows(conn, sql, &[], &[]).await.unwrap();
    rows[0][0]
        .as_ref()
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
}

async fn xid_horizon(admin: &Client) -> i64 {
    admin
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn micros_each(total: Duration, n: u32) -> f64 {
    total.as_secs_f64() * 1e6 / f64::from(n)
}

/// The proxy's path: a raw `ServerConn`, identity once, `enter` on pin, `reset` (DISCARD
/// ALL) and `leave` on release. Also measures the cost per round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_signed_server_conn_pin_release_and_cost() {
    let f = fixture();
    let ctx = f.ctx();
    let target = UpstreamTarget::from_url(&f.pool_url()).unwrap();
    let mut conn = ServerConn::connect(
        "shared".into(),
        &target,
        &ServerTls::disabled(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut cached = None;
    ctx.pin(&mut conn, &mut cached, "initech").await.unwrap();
    let id = cached.unwrap();
    assert_eq!(id.pid, conn.backend_pid);
    assert_eq!(
        raw_text(&mut conn, "SELECT pgtenant.current_tenant()")
            .await
            .as_deref(),
        Some("initech")
    );
    assert_eq!(
        raw_text(&mut conn, "SELECT count(*) FROM customers")
            .await
            .as_deref(),
        Some("4")
    );
    // DISCARD ALL (reset) keeps the context: release must call leave().
    conn.reset().await.unwrap();
    assert_eq!(
        raw_text(&mut conn, "SELECT pgtenant.current_tenant()")
            .await
            .as_deref(),
        Some("initech")
    );
    ctx.leave(&mut conn).await.unwrap();
    assert_eq!(
        raw_text(&mut conn, "SELECT pgtenant.current_tenant()").await,
        None
    );
    assert_eq!(
        raw_text(&mut conn, "SELECT count(*) FROM customers")
            .await
            .as_deref(),
        Some("0")
    );
    ctx.pin(&mut conn, &mut cached, "globex").await.unwrap();
    assert_eq!(
        raw_text(&mut conn, "SELECT count(*) FROM customers")
            .await
            .as_deref(),
        Some("2")
    );
    // A refused proof: ServerError::Db 28000; the connection answered ReadyForQuery.
    let bogus =
        SignedContext::new(S, ContextSigner::new("nokey", &[1u8; 32]).unwrap(), HOUR).unwrap();
    match bogus.enter(&mut conn, &id, "medcorp").await {
        Err(ServerError::Db { code, message, .. }) => {
            assert_eq!(code, "28000");
            assert!(message.contains("unknown or retired key"));
        }
        other => panic!("expected 28000, got {other:?}"),
    }
    assert!(!conn.broken);
    assert_eq!(
        raw_text(&mut conn, "SELECT pgtenant.current_tenant()")
            .await
            .as_deref(),
        Some("globex")
    );

    // Cost: N round trips each over this one connection (debug build client side), and
    // the server-side time per call from pg_stat_user_functions.
    const N: u32 = 1000;
    let admin = connect(&f.admin_conninfo()).await;
    for sql in [
        "ALTER SYSTEM SET track_functions = 'all'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    query_rows(&mut conn, "SELECT 1", &[], &[]).await.unwrap(); // takes the reload
    let t = Instant::now();
    for _ in 0..N {
        query_rows(&mut conn, "SELECT 1", &[], &[]).await.unwrap();
    }
    let select1 = t.elapsed();
    let xid0 = xid_horizon(&admin).await;
    let t = Instant::now();
    for _ in 0..N {
        ctx.enter(&mut conn, &id, "globex").await.unwrap();
    }
    let enters = t.elapsed();
    let xid1 = xid_horizon(&admin).await;
    let t = Instant::now();
    for _ in 0..N {
        ctx.enter(&mut conn, &id, "globex").await.unwrap();
        ctx.leave(&mut conn).await.unwrap();
    }
    let cycles = t.elapsed();
    let t = Instant::now();
    for _ in 0..N {
        query_rows(&mut conn, "SELECT pgtenant.current_tenant()", &[], &[])
            .await
            .unwrap();
    }
    let currents = t.elapsed();
    let t = Instant::now();
    for _ in 0..N {
        ctx.identity(&mut conn).await.unwrap();
    }
    let identities = t.elapsed();
    eprintln!(
        "signed context cost over {N} round trips each: SELECT 1 {:.0} µs, enter {:.0} µs, \
         enter+leave {:.0} µs, current_tenant() {:.0} µs, backend_identity() {:.0} µs; \
         XIDs consumed by {N} enters: {}",
        micros_each(select1, N),
        micros_each(enters, N),
        micros_each(cycles, N),
        micros_each(currents, N),
        micros_each(identities, N),
        xid1 - xid0,
    );
    assert!(xid1 - xid0 >= i64::from(N), "each enter is a write");
    assert!(!conn.broken);
    drop(conn); // the backend flushes its function statistics when it exits
    let mut server_side = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rows = admin
            .query(
                "SELECT funcname, calls, round((total_time * 1000 / calls)::numeric, 1)::text
                 FROM pg_stat_user_functions
                 WHERE schemaname = 'pgtenant' AND calls >= 1000 ORDER BY funcname",
                &[],
            )
            .await
            .unwrap();
        if rows.len() >= 4 {
            server_side = rows
                .iter()
                .map(|r| format!("{} {} µs", r.get::<_, String>(0), r.get::<_, String>(2)))
                .collect::<Vec<_>>()
                .join(", ");
            break;
        }
    }
    eprintln!("signed context server-side time per call: {server_side}");
    for sql in [
        "ALTER SYSTEM RESET track_functions",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
}
