//! The audit trail against real PostgreSQL: exact counts, an audit database outage under
//! load, `kill -9` with unshipped events, fail-closed and fail-open with a full spool, and
//! rows a client cannot roll back.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgtenant::audit::{AuditConfig, OnFull};
use pgtenant::config::Config;
use pgtenant::embedded_pg::TempPg;
use tokio_postgres::Client;

use common::serve::{self, metric, Serve};

const WRITER: &str = "pgtenant_audit";
const WRITER_PASSWORD: &str = "audit-writer-pw-3f9a";

/// An audit database `audit` on `pg` with table `table`, set up by `pgtenant audit init`'s code.
/// The demo cluster already has the writer role (with the demo's password); a fresh cluster
/// gets it with `WRITER_PASSWORD`.
async fn audit_db(pg: &TempPg, table: &str) -> String {
    let demo = common::env();
    let password = if std::ptr::eq(pg, demo.pg) {
        demo.demo.logins[WRITER].clone()
    } else {
        WRITER_PASSWORD.to_string()
    };
    let admin = pg.admin_client("postgres").await.unwrap();
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = 'audit'", &[])
        .await
        .unwrap();
    if exists.is_none() {
        // Tests of one binary race here; a concurrent creation is fine.
        let _ = admin.batch_execute("CREATE DATABASE audit").await;
    }
    let url = pg.tcp_url(WRITER, &password, "audit");
    let table = pgtenant::audit::schema::TableName::parse(table).unwrap();
    // Concurrent inits of the same role may collide once; the second attempt sees it.
    let mut last = None;
    for _ in 0..3 {
        match pgtenant::audit::schema::init(&admin_url(pg), &url, &table).await {
            Ok(_) => return url,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("audit init: {:?}", last);
}

fn admin_url(pg: &TempPg) -> String {
    format!(
        "host={} port={} user=postgres dbname=postgres",
        pg.socket_dir.display(),
        pg.port
    )
}

fn audit_config(url: &str, table: &str, spool: &Path) -> AuditConfig {
    let mut c: AuditConfig = toml::from_str(&format!(
        "url = {}\ntable = {}\nspool_dir = {}",
        toml::Value::String(url.into()),
        toml::Value::String(table.into()),
        toml::Value::String(spool.display().to_string())
    ))
    .unwrap();
    c.ship_timeout = Duration::from_secs(2);
    c
}

fn with_audit(c: &mut Config, audit: AuditConfig) {
    c.audit = Some(audit);
}

async fn count(admin: &Client, table: &str, filter: &str) -> i64 {
    admin
        .query_one(&format!("SELECT count(*) FROM {table} WHERE {filter}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Polls until `filter` matches exactly `expected` rows (20 s), then asserts it.
async fn wait_rows(admin: &Client, table: &str, filter: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = count(admin, table, filter).await;
        if n == expected {
            return;
        }
        if Instant::now() > deadline || n > expected {
            panic!("{table} WHERE {filter}: {n} rows, expected {expected}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_unique_keys(admin: &Client, table: &str) {
    let row = admin
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (event_instance, event_seq)),
                        count(DISTINCT (session_id, event, access_time, coalesce(command_tag, ''), coalesce(sqlstate, '')))
                   FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    let (all, keys, contents): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(all, keys, "duplicate event keys in {table}");
    assert_eq!(
        all, contents,
        "the same event stored twice under different keys in {table}"
    );
}

/// One session's statements: 4 succeed (simple, extended, a two-statement string), 1 fails.
async fn run_statements(client: &Client) {
    client.simple_query("SELECT 1").await.unwrap();
    let n: i32 = client
        .query_one("SELECT $1::int", &[&7])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 7);
    client.batch_execute("SELECT 1; SELECT 2").await.unwrap();
    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(common::sqlstate(&err), "22012");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_and_statement_becomes_exactly_one_row() {
    let env = common::env();
    let table = "audit_counts";
    let url = audit_db(env.pg, table).await;
    let spool = tempfile::tempdir().unwrap();
    let proxy =
        common::start_proxy(|c| with_audit(c, audit_config(&url, table, spool.path()))).await;

    // 2 sessions each of a dedicated (acme) and a shared (medcorp) tenant.
    for tenant in ["acme", "medcorp", "acme", "medcorp"] {
        let client = common::connect(proxy.addr, tenant).await;
        run_statements(&client).await;
        if tenant == "medcorp" {
            // Blocked by the isolation guard: an audit event, not a statement.
            let e = client
                .simple_query("SET app.current_tenant_id = 'globex'")
                .await
                .unwrap_err();
            assert_eq!(common::sqlstate(&e), "42501");
        }
    }
    let forged = common::token("acme", "mallory").replace('.', "x.");
    let e = common::try_connect(proxy.addr, &forged)
        .await
        .err()
        .unwrap();
    assert_eq!(common::sqlstate(&e), "28P01");

    let admin = env.pg.admin_client("audit").await.unwrap();
    wait_rows(&admin, table, "event = 'session_end'", 4).await;
    wait_rows(&admin, table, "event = 'statement'", 20).await;
    wait_rows(&admin, table, "event = 'session_start'", 4).await;
    wait_rows(&admin, table, "event = 'blocked'", 2).await;
    wait_rows(&admin, table, "event = 'auth_failure'", 1).await;
    for tenant in ["acme", "medcorp"] {
        let user = format!("user@{tenant}");
        let who = format!("tenant_id = '{tenant}' AND user_id = '{user}' AND event = 'statement'");
        assert_eq!(count(&admin, table, &who).await, 10, "{tenant}");
        assert_eq!(
            count(&admin, table, &format!("{who} AND success AND command_tag = 'SELECT 1' AND rows = 1 AND operation = 'SELECT'")).await,
            8,
            "{tenant}: 4 per session (simple, extended, and both of the two-statement string)"
        );
        assert_eq!(
            count(
                &admin,
                table,
                &format!("{who} AND NOT success AND sqlstate = '22012' AND command_tag IS NULL")
            )
            .await,
            2,
            "{tenant}"
        );
        // Every session's events carry the same session id, upstream and client.
        assert_eq!(
            count(&admin, table, &format!(
                "tenant_id = '{tenant}' AND upstream = '{}' AND client_ip = '127.0.0.1' AND user_agent = 'pgtenant-tests' AND session_id IS NOT NULL",
                if tenant == "acme" { "acme" } else { "shared" }
            )).await,
            // start + 5 statements + end per session, and medcorp's blocked SET.
            if tenant == "acme" { 14 } else { 16 }
        );
    }
    // Every statement has a fingerprint; executions of one shape share it; shapes differ.
    assert_eq!(
        count(&admin, table, "event = 'statement' AND fingerprint IS NULL").await,
        0
    );
    let distinct = |filter: &'static str| {
        let admin = &admin;
        async move {
            admin
                .query_one(
                    &format!("SELECT count(DISTINCT fingerprint) FROM {table} WHERE event = 'statement' AND {filter}"),
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(distinct("sqlstate = '22012'").await, 1);
    assert_eq!(distinct("sqlstate IS NULL AND duration_us >= 0 AND fingerprint IN (SELECT fingerprint FROM audit_counts WHERE sqlstate = '22012')").await, 0);
    assert!(distinct("true").await >= 2);
    // No statement text unless log_statement_text = true.
    assert_eq!(count(&admin, table, "statement IS NOT NULL").await, 0);
    let blocked = admin
        .query_one(
            &format!(
                "SELECT sqlstate, reason, tenant_id FROM {table} WHERE event = 'blocked' LIMIT 1"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(blocked.get::<_, String>(0), "42501");
    assert_eq!(blocked.get::<_, String>(2), "medcorp");
    assert!(!blocked.get::<_, String>(1).is_empty());
    // The failed login: its SQLSTATE and a token hash, never the token.
    let failure = admin
        .query_one(
            &format!("SELECT sqlstate, token_sha256, tenant_id, row_to_json(t)::text FROM {table} t WHERE event = 'auth_failure'"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(failure.get::<_, String>(0), "28P01");
    assert_eq!(failure.get::<_, String>(1).len(), 16);
    assert_eq!(failure.get::<_, Option<String>>(2), None);
    let whole_row: String = failure.get(3);
    for part in forged.split('.') {
        assert!(!whole_row.contains(part), "token part in the audit row");
    }
    // Session ends carry totals.
    assert_eq!(
        count(&admin, table, "event = 'session_end' AND statements >= 5 AND client_bytes > 0 AND server_bytes > 0 AND duration_us > 0").await,
        4
    );
    assert_unique_keys(&admin, table).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_text_is_kept_only_when_asked_and_truncated() {
    let env = common::env();
    let table = "audit_text";
    let url = audit_db(env.pg, table).await;
    let spool = tempfile::tempdir().unwrap();
    let proxy = common::start_proxy(|c| {
        let mut a = audit_config(&url, table, spool.path());
        a.log_statement_text = true;
        a.statement_text_max_bytes = 20;
        with_audit(c, a)
    })
    .await;
    let client = common::connect(proxy.addr, "globex").await;
    client
        .batch_execute("SELECT 'a rather long literal value here'; SELECT 2")
        .await
        .unwrap();
    drop(client);
    let admin = env.pg.admin_client("audit").await.unwrap();
    wait_rows(&admin, table, "event = 'statement'", 2).await;
    let texts: Vec<String> = admin
        .query(
            &format!("SELECT statement FROM {table} WHERE event = 'statement' ORDER BY event_seq"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        texts,
        vec!["SELECT 'a rather lon".to_string(), "SELECT 2".to_string()]
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_roll_back_its_audit_rows() {
    let env = common::env();
    let table = "audit_rollback";
    let url = audit_db(env.pg, table).await;
    let spool = tempfile::tempdir().unwrap();
    let proxy =
        common::start_proxy(|c| with_audit(c, audit_config(&url, table, spool.path()))).await;
    let client = common::connect(proxy.addr, "techstart").await;
    client
        .batch_execute(
            "BEGIN; CREATE TABLE audit_rb (x int); INSERT INTO audit_rb VALUES (1), (2); ROLLBACK",
        )
        .await
        .unwrap();
    // The table never existed: the client's transaction rolled back...
    let e = client
        .simple_query("SELECT * FROM audit_rb")
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&e), "42P01");
    drop(client);
    // ...but its audit rows were written by pgtenant's own connection.
    let admin = env.pg.admin_client("audit").await.unwrap();
    wait_rows(&admin, table, "event = 'session_end'", 1).await;
    for (tag, rows) in [
        ("BEGIN", "IS NULL"),
        ("CREATE TABLE", "IS NULL"),
        ("INSERT 0 2", "= 2"),
        ("ROLLBACK", "IS NULL"),
    ] {
        assert_eq!(
            count(
                &admin,
                table,
                &format!("command_tag = '{tag}' AND rows {rows} AND tenant_id = 'techstart'")
            )
            .await,
            1,
            "{tag}"
        );
    }
    assert_eq!(
        count(
            &admin,
            table,
            "event = 'statement' AND table_name = 'audit_rb' AND operation = 'INSERT'"
        )
        .await,
        1
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_database_outage_under_load_loses_and_duplicates_nothing() {
    common::env();
    let audit_pg = TempPg::start_async().await.unwrap();
    let table = "audit_tenant_access";
    let url = audit_db(&audit_pg, table).await;
    let spool = tempfile::tempdir().unwrap();
    let proxy =
        common::start_proxy(|c| with_audit(c, audit_config(&url, table, spool.path()))).await;
    let audit = proxy.shared.audit.clone().unwrap();

    // Some events shipped while it is up...
    let client = common::connect(proxy.addr, "acme").await;
    client.simple_query("SELECT 1").await.unwrap();
    drop(client);
    let admin = audit_pg.admin_client("audit").await.unwrap();
    wait_rows(&admin, table, "true", 3).await;
    drop(admin);

    // ...then it goes away while 4 clients keep working: the service goes on.
    audit_pg.stop_server("fast").unwrap();
    let sessions = 4;
    let per_session = 50;
    let mut load = Vec::new();
    for i in 0..sessions {
        let addr = proxy.addr;
        load.push(tokio::spawn(async move {
            let tenant = ["acme", "medcorp", "globex", "techstart"][i];
            let client = common::connect(addr, tenant).await;
            for _ in 0..per_session {
                client.query_one("SELECT $1::int", &[&1]).await.unwrap();
            }
        }));
    }
    for l in load {
        l.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written_while_down = audit.written();
    assert_eq!(
        written_while_down, 3,
        "nothing can be written while the database is down"
    );
    assert_eq!(audit.dropped(), 0);

    audit_pg.start_server().unwrap();
    let admin = audit_pg.admin_client("audit").await.unwrap();
    let expected = 3 + (sessions * (per_session + 2)) as i64;
    wait_rows(&admin, table, "true", expected).await;
    assert_eq!(
        count(
            &admin,
            table,
            "event = 'statement' AND command_tag = 'SELECT 1'"
        )
        .await,
        1 + (sessions * per_session) as i64
    );
    assert_unique_keys(&admin, table).await;
    assert_eq!(audit.dropped(), 0);
    proxy.stop().await;
}

/// The audit url of a database that is not there: shipping always fails.
fn unreachable_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("postgres://{WRITER}:{WRITER_PASSWORD}@127.0.0.1:{port}/audit")
}

fn tiny_spool(url: &str, spool: &Path, on_full: OnFull) -> AuditConfig {
    let mut a = audit_config(url, "audit_tenant_access", spool);
    a.spool_max_bytes = 16 * 1024;
    a.spool_segment_bytes = 4096;
    a.on_full = on_full;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_statements_and_sessions_when_the_spool_is_full() {
    let spool = tempfile::tempdir().unwrap();
    let proxy = common::start_proxy(|c| {
        with_audit(
            c,
            tiny_spool(&unreachable_url(), spool.path(), OnFull::FailClosed),
        )
    })
    .await;
    let audit = proxy.shared.audit.clone().unwrap();
    let client = common::connect(proxy.addr, "acme").await;
    let mut refused = None;
    for i in 0..2000 {
        match client.simple_query("SELECT 1").await {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (after, e) = refused.expect("a full spool must refuse statements");
    assert!(after > 5, "refused too early: after {after} statements");
    assert_eq!(common::sqlstate(&e), "57P03");
    assert!(
        e.to_string().contains("audit") || format!("{e:?}").contains("audit"),
        "{e:?}"
    );
    // The session stays usable for when the spool drains; new sessions are refused.
    let e = common::try_connect(proxy.addr, &common::token("acme", "a"))
        .await
        .err()
        .unwrap();
    assert_eq!(common::sqlstate(&e), "57P03");
    assert!(!audit.accepting());
    assert_eq!(
        audit.dropped(),
        0,
        "fail_closed keeps every event it accepted"
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_keeps_serving_and_counts_drops() {
    let spool = tempfile::tempdir().unwrap();
    let proxy = common::start_proxy(|c| {
        with_audit(
            c,
            tiny_spool(&unreachable_url(), spool.path(), OnFull::FailOpen),
        )
    })
    .await;
    let audit = proxy.shared.audit.clone().unwrap();
    let client = common::connect(proxy.addr, "acme").await;
    for _ in 0..300 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    // The writer thread reports drops asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    while audit.dropped() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        audit.dropped() > 0,
        "a full spool in fail_open drops and counts"
    );
    assert!(audit.accepting());
    common::try_connect(proxy.addr, &common::token("acme", "a"))
        .await
        .unwrap();
}

// ---- kill -9: a real pgtenant process ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_unshipped_events_then_restart_replays_them_exactly_once() {
    common::env();
    let audit_pg = TempPg::start_async().await.unwrap();
    let table = "audit_tenant_access";
    let url = audit_db(&audit_pg, table).await;
    audit_pg.stop_server("fast").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let spool: PathBuf = dir.path().join("spool");
    let (addr, admin) = (serve::free_addr(), serve::free_addr());
    let mut text = serve::config_text(addr, admin);
    text.push_str(&format!(
        "\n[audit]\nurl = {}\nspool_dir = {}\nship_timeout = \"1s\"\n",
        toml::Value::String(url.clone()),
        toml::Value::String(spool.display().to_string())
    ));
    let config = dir.path().join("pgtenant.toml");
    std::fs::write(&config, &text).unwrap();

    let first = Serve::start(&config, addr, admin).await;
    let sessions = 3;
    let per_session = 10;
    for tenant in ["acme", "medcorp", "bench"].iter().take(sessions) {
        let client = common::connect(addr, tenant).await;
        for _ in 0..per_session {
            client.simple_query("SELECT 1").await.unwrap();
        }
    }
    let expected = (sessions * (per_session + 2)) as f64;
    // Every event is in the spool (written, not shipped) before the kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = first.metrics().await;
        if metric(&body, "pgtenant_audit_events_spooled_total") >= expected {
            assert_eq!(metric(&body, "pgtenant_audit_events_written_total"), 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "events not spooled: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill(); // SIGKILL

    audit_pg.start_server().unwrap();
    let second = Serve::start(&config, addr, admin).await;
    let audit = audit_pg.admin_client("audit").await.unwrap();
    wait_rows(&audit, table, "true", expected as i64).await;
    assert_eq!(
        count(
            &audit,
            table,
            "event = 'statement' AND command_tag = 'SELECT 1'"
        )
        .await,
        (sessions * per_session) as i64
    );
    assert_unique_keys(&audit, table).await;
    let body = second.metrics().await;
    assert_eq!(
        metric(&body, "pgtenant_audit_events_replayed_total"),
        expected,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_sink_keeps_a_dedicated_tenants_events_in_its_own_database() {
    let env = common::env();
    let central_table = "audit_central_sink";
    let central = audit_db(env.pg, central_table).await;
    // acme's own database gets the table too, written by the same insert-only role.
    let acme_url = env.pg.tcp_url(WRITER, &env.demo.logins[WRITER], "acme_db");
    pgtenant::audit::schema::init(
        &admin_url(env.pg),
        &acme_url,
        &pgtenant::audit::schema::TableName::parse(central_table).unwrap(),
    )
    .await
    .unwrap();
    let spool = tempfile::tempdir().unwrap();
    let proxy = common::start_proxy(|c| {
        let mut a = audit_config(&central, central_table, spool.path());
        a.sink = pgtenant::audit::AuditSink::Tenant;
        with_audit(c, a);
        c.upstreams.get_mut("acme").unwrap().audit_url = Some(acme_url.clone());
    })
    .await;
    for tenant in ["acme", "globex"] {
        let client = common::connect(proxy.addr, tenant).await;
        client.simple_query("SELECT 1").await.unwrap();
    }
    let audit = env.pg.admin_client("audit").await.unwrap();
    let acme_db = env.pg.admin_client("acme_db").await.unwrap();
    wait_rows(&acme_db, central_table, "tenant_id = 'acme'", 3).await;
    wait_rows(&audit, central_table, "tenant_id = 'globex'", 3).await;
    assert_eq!(count(&audit, central_table, "tenant_id = 'acme'").await, 0);
    assert_eq!(
        count(&acme_db, central_table, "tenant_id <> 'acme'").await,
        0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_every_event_into_the_table() {
    let env = common::env();
    let table = "audit_shutdown";
    let url = audit_db(env.pg, table).await;
    let spool = tempfile::tempdir().unwrap();
    let proxy =
        common::start_proxy(|c| with_audit(c, audit_config(&url, table, spool.path()))).await;
    let sessions = 3;
    let per_session = 40;
    for tenant in ["acme", "globex", "initech"] {
        let client = common::connect(proxy.addr, tenant).await;
        for _ in 0..per_session {
            client.simple_query("SELECT 1").await.unwrap();
        }
    }
    // No waiting for the drain: stop() itself must ship what is queued and spooled.
    proxy.stop().await;
    let admin = env.pg.admin_client("audit").await.unwrap();
    assert_eq!(
        count(&admin, table, "true").await,
        (sessions * (per_session + 2)) as i64,
        "every event is in the table when stop() returns"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_level_records_sessions_and_blocks_but_no_statements() {
    let env = common::env();
    let table = "audit_session_level";
    let url = audit_db(env.pg, table).await;
    let spool = tempfile::tempdir().unwrap();
    let proxy = common::start_proxy(|c| {
        let mut a = audit_config(&url, table, spool.path());
        a.level = pgtenant::audit::AuditLevel::Session;
        with_audit(c, a)
    })
    .await;
    let client = common::connect(proxy.addr, "medcorp").await;
    run_statements(&client).await;
    let e = client.simple_query("RESET ALL").await.unwrap_err();
    assert_eq!(common::sqlstate(&e), "42501");
    drop(client);
    proxy.stop().await;
    let admin = env.pg.admin_client("audit").await.unwrap();
    assert_eq!(count(&admin, table, "event = 'session_start'").await, 1);
    assert_eq!(
        count(&admin, table, "event = 'session_end' AND statements >= 5").await,
        1
    );
    assert_eq!(
        count(&admin, table, "event = 'blocked' AND tenant_id = 'medcorp'").await,
        1
    );
    assert_eq!(count(&admin, table, "event = 'statement'").await, 0);
}
