//! Transaction pooling (`pool_mode = "transaction"`) against a real PostgreSQL: many
//! tenants' clients over two server connections never see another tenant's context or
//! rows; session state pins (or is refused) and never leaks; tracked SETs survive moves;
//! the per-tenant cap keeps one tenant from starving another; pgbench runs clean.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use pgtenant::config::{Config, PoolMode, SessionFeatures};
use rand::{Rng, SeedableRng};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage};

const SETTING: &str = "app.current_tenant_id";
const TENANTS: [&str; 3] = ["medcorp", "globex", "initech"];

fn txn_mode(c: &mut Config, pool_size: u32) {
    let up = c.upstreams.get_mut("shared").expect("shared upstream");
    up.pool_mode = PoolMode::Transaction;
    up.pool_size = pool_size;
}

/// Sessions give their connection back just after relaying ReadyForQuery: a test that
/// depends on which idle connection comes next waits until all are back.
async fn wait_until_no_connection_in_use(proxy: &pgtenant::server::ProxyHandle) {
    for _ in 0..250 {
        let text = common::proxy_metrics(proxy).await;
        if common::serve::metric(&text, "pgtenant_pool_in_use_connections") == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server connections still in use after 5 s");
}

/// The first column of the first row of a simple query.
async fn simple_value(client: &Client, sql: &str) -> String {
    let rows = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

/// The context and the RLS-visible tenants, through the extended protocol with the
/// unnamed statement (no pinning): (setting, distinct tenant_ids seen, rows).
async fn extended_check(client: &Client) -> (String, Vec<String>, i64) {
    let rows = client
        .query_typed(
            "SELECT current_setting($1), coalesce(array_agg(DISTINCT tenant_id), '{}'), count(*) FROM customers",
            &[(&SETTING, Type::TEXT)],
        )
        .await
        .expect("extended check");
    (rows[0].get(0), rows[0].get(1), rows[0].get(2))
}

fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default()
}

async fn simple_check(client: &Client) -> (String, Vec<String>) {
    let setting = simple_value(client, &format!("SELECT current_setting('{SETTING}')")).await;
    let seen = simple_value(
        client,
        "SELECT coalesce(string_agg(DISTINCT tenant_id, ','), '') FROM customers",
    )
    .await;
    (
        setting,
        seen.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tenants_share_two_connections_without_crossing() {
    let proxy = common::start_proxy(|c| txn_mode(c, 2)).await;
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let tenant = TENANTS[i as usize % TENANTS.len()];
        let addr = proxy.addr;
        tasks.push(tokio::spawn(
            async move { client_run(addr, tenant, i).await },
        ));
    }
    let mut pids = HashSet::new();
    for t in tasks {
        pids.extend(t.await.expect("client task"));
    }
    assert!(pids.len() <= 2, "pool_size 2, saw backends {pids:?}");
    assert_eq!(pids.len(), 2, "both server connections were used");
}

/// One client's randomized mix; every statement checks the context and the visible rows.
/// Returns the backend pids it ran on.
async fn client_run(addr: SocketAddr, tenant: &str, seed: u64) -> HashSet<i32> {
    let client = common::connect(addr, tenant).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pids = HashSet::new();
    for step in 0..12 {
        let check = |setting: &str, seen: &[String]| {
            assert_eq!(
                setting, tenant,
                "client {seed} step {step}: wrong tenant context"
            );
            assert_eq!(
                seen,
                [tenant.to_string()],
                "client {seed} step {step}: foreign rows"
            );
        };
        match rng.gen_range(0..3) {
            0 => {
                let (setting, seen) = simple_check(&client).await;
                check(&setting, &seen);
            }
            1 => {
                let (setting, seen, rows) = extended_check(&client).await;
                check(&setting, &seen);
                assert!(rows > 0);
            }
            _ => {
                client.batch_execute("BEGIN").await.expect("begin");
                let (setting, seen, _) = extended_check(&client).await;
                check(&setting, &seen);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..5))).await;
                let (setting, seen) = simple_check(&client).await;
                check(&setting, &seen);
                client.batch_execute("COMMIT").await.expect("commit");
            }
        }
        let pid: i32 = simple_value(&client, "SELECT pg_backend_pid()")
            .await
            .parse()
            .unwrap();
        pids.insert(pid);
    }
    pids
}

/// What a session can see of server-side session state on its connection.
async fn leftover_state(client: &Client) -> String {
    simple_value(
        client,
        "SELECT concat_ws('|',
            (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
            (SELECT count(*) FROM pg_listening_channels()),
            (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
            (SELECT count(*) FROM pg_cursors),
            (SELECT count(*) FROM pg_prepared_statements),
            current_setting('search_path'))",
    )
    .await
}

const CLEAN: &str = "0|0|0|0|0|\"$user\", public";

const FEATURES: [&str; 5] = [
    "CREATE TEMP TABLE scratch (x int)",
    "LISTEN chan",
    "SELECT pg_advisory_lock(42)",
    "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
    "PREPARE p AS SELECT 1",
];

fn allow_listen(c: &mut Config) {
    c.upstreams
        .get_mut("shared")
        .expect("shared")
        .guard_rules
        .block_listen = false;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_pins_and_never_leaks_to_another_tenant() {
    let proxy = common::start_proxy(|c| {
        txn_mode(c, 2);
        allow_listen(c);
    })
    .await;
    let admin = proxy.admin_addr.expect("admin");
    let pinned_before = pinned_count(admin).await;

    let a = common::connect(proxy.addr, "medcorp").await;
    for sql in FEATURES {
        a.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    a.batch_execute("SET search_path = pg_temp, public")
        .await
        .expect("set");
    // Pinned: the state stays visible to this client over later transactions.
    let a_pid = simple_value(&a, "SELECT pg_backend_pid()").await;
    assert_eq!(leftover_state(&a).await, "1|1|1|1|1|pg_temp, public");
    assert_eq!(simple_value(&a, "SELECT count(*) FROM scratch").await, "0");
    assert_eq!(simple_value(&a, "SELECT pg_backend_pid()").await, a_pid);
    assert!(
        pinned_count(admin).await >= pinned_before + 1.0,
        "metric counts the pin"
    );

    // Another tenant meanwhile, on the other connection: nothing of it.
    let b = common::connect(proxy.addr, "globex").await;
    assert_eq!(leftover_state(&b).await, CLEAN);
    drop(a);

    // After the pinned client left, its connection (reset) serves other tenants. Two
    // concurrent transactions need both connections, so one of them is a's old backend.
    let b2 = common::connect(proxy.addr, "initech").await;
    let mut reused = false;
    for _ in 0..50 {
        b.batch_execute("BEGIN").await.expect("begin");
        b2.batch_execute("BEGIN").await.expect("begin");
        for c in [&b, &b2] {
            assert_eq!(leftover_state(c).await, CLEAN);
            reused |= simple_value(c, "SELECT pg_backend_pid()").await == a_pid;
        }
        b.batch_execute("COMMIT").await.expect("commit");
        b2.batch_execute("COMMIT").await.expect("commit");
        if reused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reused,
        "the pinned connection came back to the pool after a reset"
    );
}

async fn pinned_count(admin: SocketAddr) -> f64 {
    let (_, text) = common::http_get(&format!("http://{admin}/metrics")).await;
    common::serve::metric(&text, "pgtenant_pinned_sessions_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_mode_answers_0a000_and_the_session_goes_on() {
    let proxy = common::start_proxy(|c| {
        txn_mode(c, 2);
        allow_listen(c);
        c.upstreams
            .get_mut("shared")
            .expect("shared")
            .session_features = SessionFeatures::Refuse;
    })
    .await;
    let client = common::connect(proxy.addr, "medcorp").await;
    for sql in FEATURES {
        let e = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(common::sqlstate(&e), "0A000", "{sql}");
        assert!(message(&e).contains("transaction pooling"), "{e:?}");
        assert_eq!(simple_value(&client, "SELECT 1").await, "1");
    }
    assert_eq!(leftover_state(&client).await, CLEAN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_settings_survive_a_move_and_do_not_leak() {
    let proxy = common::start_proxy(|c| txn_mode(c, 2)).await;
    let c = common::connect(proxy.addr, "initech").await;
    c.batch_execute("SET application_name = 'moved-app'; SET search_path = public, pg_catalog")
        .await
        .expect("set");
    let first_pid = simple_value(&c, "SELECT pg_backend_pid()").await;
    // Another client of the same tenant takes c's idle connection (affinity) and holds it.
    let e = common::connect(proxy.addr, "initech").await;
    wait_until_no_connection_in_use(&proxy).await;
    e.batch_execute("BEGIN").await.expect("begin");
    let e_pid = simple_value(&e, "SELECT pg_backend_pid()").await;
    assert_eq!(
        e_pid, first_pid,
        "the same tenant's idle connection is preferred"
    );
    let e_app = simple_value(&e, "SELECT current_setting('application_name')").await;
    assert_ne!(e_app, "moved-app", "c's SET does not reach e");
    assert_eq!(
        simple_value(&e, "SELECT current_setting('search_path')").await,
        "\"$user\", public"
    );
    // c moves to the other connection, with its settings.
    assert_ne!(simple_value(&c, "SELECT pg_backend_pid()").await, first_pid);
    assert_eq!(
        simple_value(&c, "SELECT current_setting('application_name')").await,
        "moved-app"
    );
    assert_eq!(
        simple_value(&c, "SELECT current_setting('search_path')").await,
        "public, pg_catalog"
    );
    e.batch_execute("COMMIT").await.expect("commit");
    c.batch_execute("RESET application_name")
        .await
        .expect("reset");
    assert_ne!(
        simple_value(&c, "SELECT current_setting('application_name')").await,
        "moved-app"
    );
    // A SET in a rolled-back transaction and a SET that failed change nothing, so nothing
    // of theirs is re-applied when c moves (a bad value re-applied would fail the move).
    c.batch_execute("BEGIN; SET search_path = rolled_back; ROLLBACK")
        .await
        .expect("rolled back");
    let err = c
        .batch_execute("SET statement_timeout = 'not a duration'")
        .await
        .expect_err("invalid value");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("22023"),
        "{err}"
    );
    let c_pid = simple_value(&c, "SELECT pg_backend_pid()").await;
    // e takes c's connection, the most recently returned.
    wait_until_no_connection_in_use(&proxy).await;
    e.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(simple_value(&e, "SELECT pg_backend_pid()").await, c_pid);
    assert_ne!(simple_value(&c, "SELECT pg_backend_pid()").await, c_pid);
    assert_eq!(
        simple_value(&c, "SELECT current_setting('search_path')").await,
        "public, pg_catalog"
    );
    assert_eq!(
        simple_value(&c, "SELECT current_setting('statement_timeout')").await,
        "0"
    );
    e.batch_execute("COMMIT").await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_cap_does_not_starve_another() {
    let proxy = common::start_proxy(|c| {
        txn_mode(c, 2);
        let up = c.upstreams.get_mut("shared").expect("shared");
        up.max_server_connections_per_tenant = Some(1);
        up.checkout_timeout = Duration::from_secs(1);
    })
    .await;
    let a1 = common::connect(proxy.addr, "medcorp").await;
    let a2 = common::connect(proxy.addr, "medcorp").await;
    let b = common::connect(proxy.addr, "globex").await;
    a1.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(simple_check(&a1).await.0, "medcorp");
    // a2 waits for medcorp's only slot while b's transactions run on the other connection.
    let waiting = tokio::spawn(async move { a2.simple_query("SELECT 1").await.map(drop) });
    for _ in 0..5 {
        b.batch_execute("BEGIN").await.expect("b begin");
        assert_eq!(
            simple_check(&b).await,
            ("globex".into(), vec!["globex".into()])
        );
        b.batch_execute("COMMIT").await.expect("b commit");
    }
    let e = waiting.await.expect("task").expect_err("a2 times out");
    assert_eq!(common::sqlstate(&e), "53300");
    assert!(message(&e).contains("tenant \"medcorp\""), "{e:?}");
    a1.batch_execute("COMMIT").await.expect("a1 commit");
}

async fn pgbench(addr: SocketAddr, mode: &str, clients: &str) -> String {
    let env = common::env();
    let out = tokio::process::Command::new(env.pg.pgbench_path())
        // `-M prepared` prepares with a synchronous PQprepare that blocks its whole pgbench
        // thread while it waits for a server connection, and with it the thread's other
        // clients, which may hold all of them mid-transaction: one thread per client.
        .args(["-n", "-M", mode, "-c", clients, "-j", clients, "-t", "40"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-U",
            "app",
            "saas",
        ])
        .env("PGPASSWORD", common::token("initech", "peter"))
        .output()
        .await
        .expect("pgbench runs");
    let text = format!("{}{}", common::stdout(&out), common::stderr(&out));
    assert!(out.status.success(), "pgbench -M {mode}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_clean_in_transaction_mode() {
    let proxy = common::start_proxy(|c| txn_mode(c, 4)).await;
    // Named statements are renamed per server connection, not pinned: 16 clients of
    // `-M prepared` share 4 connections like the others.
    for mode in ["simple", "extended", "prepared"] {
        let text = pgbench(proxy.addr, mode, "16").await;
        assert!(
            text.contains("number of transactions actually processed: 640/640"),
            "{mode}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
    }
    let text = common::proxy_metrics(&proxy).await;
    assert!(
        common::serve::metric(&text, "pgtenant_prepared_statements_cache_hits_total") > 0.0,
        "clients of one tenant share server-side statements"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_backend_of_the_running_transaction() {
    let proxy = common::start_proxy(|c| txn_mode(c, 2)).await;
    let client = common::connect(proxy.addr, "medcorp").await;
    let cancel = client.cancel_token();
    let sleeper =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await.map(drop) });
    // A cancel before the query is attached finds no target and does nothing: send until
    // one lands.
    while !sleeper.is_finished() {
        cancel
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel sent");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = sleeper.await.expect("task").expect_err("cancelled");
    assert_eq!(common::sqlstate(&e), "57014");
}

/// `(column, value)` pairs of every row of a console command.
async fn console_rows(admin: &Client, sql: &str) -> Vec<Vec<(String, String)>> {
    let messages = admin.simple_query(sql).await.expect(sql);
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn has(row: &[(String, String)], name: &str, value: &str) -> bool {
    row.iter().any(|(k, v)| k == name && v == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pause_kill_and_show_pools_work_in_transaction_mode() {
    let proxy = common::start_proxy(|c| {
        txn_mode(c, 2);
        let up = c.upstreams.get_mut("shared").expect("shared");
        up.checkout_timeout = Duration::from_secs(10);
    })
    .await;
    let admin_token = common::token_with(
        "ops",
        "admin@ops.example",
        3600,
        &[("pgtenant_admin".into(), serde_json::json!(true))],
    );
    let mut cfg = common::conn_config(proxy.addr, &admin_token);
    cfg.dbname("pgtenant");
    let (admin, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("console");
    tokio::spawn(conn);
    let token = common::token("medcorp", "m");
    let (m, m_conn) = common::conn_config(proxy.addr, &token)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("medcorp");
    let m_task = tokio::spawn(m_conn);
    let g = common::connect(proxy.addr, "globex").await;
    assert_eq!(simple_value(&g, "SELECT 1").await, "1");
    // Two idle sessions, no server connection in use: they hold none between transactions.
    // (A session gives its connection back just after relaying ReadyForQuery, so the
    // console may look a moment before that.)
    let mut shared = Vec::new();
    for _ in 0..100 {
        let pools = console_rows(&admin, "SHOW POOLS").await;
        shared = pools
            .into_iter()
            .find(|r| has(r, "upstream", "shared"))
            .expect("shared pool listed");
        if has(&shared, "in_use", "0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (column, value) in [("pool_size", "2"), ("in_use", "0"), ("sessions", "2")] {
        assert!(has(&shared, column, value), "{column}: {shared:?}");
    }
    admin.simple_query("PAUSE medcorp").await.expect("pause");
    let held = tokio::spawn(async move {
        let v = simple_value(&m, "SELECT 42").await;
        (v, m)
    });
    // The detached session holds its request (and no server connection) while paused.
    let mut waiting = false;
    for _ in 0..300 {
        let clients = console_rows(&admin, "SHOW CLIENTS").await;
        waiting = clients
            .iter()
            .any(|r| has(r, "tenant", "medcorp") && has(r, "state", "waiting"));
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waiting, "the paused request waits");
    assert!(!held.is_finished());
    assert_eq!(
        simple_value(&g, "SELECT 1").await,
        "1",
        "globex is not paused"
    );
    admin.simple_query("RESUME medcorp").await.expect("resume");
    let (value, m) = held.await.expect("task");
    assert_eq!(value, "42");

    // KILL ends a detached (idle) session at once.
    admin
        .simple_query("KILL TENANT medcorp")
        .await
        .expect("kill");
    let ended = m_task.await.expect("task").expect_err("killed");
    assert_eq!(common::sqlstate(&ended), "57P01");
    drop(m);
    assert_eq!(simple_value(&g, "SELECT 2").await, "2");

    // KILL also reaches a session waiting in the pool's queue (both connections are held
    // by globex transactions): it ends at once, not after checkout_timeout (10 s here).
    let g2 = common::connect(proxy.addr, "globex").await;
    let (w, w_conn) = common::conn_config(proxy.addr, &token)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("medcorp again");
    let w_task = tokio::spawn(w_conn);
    g.batch_execute("BEGIN").await.expect("begin");
    g2.batch_execute("BEGIN").await.expect("begin");
    assert_eq!(simple_value(&g2, "SELECT 3").await, "3");
    let waiting = tokio::spawn(async move { w.simple_query("SELECT 1").await.map(drop) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "no server connection is free");
    let asked = std::time::Instant::now();
    admin
        .simple_query("KILL TENANT medcorp")
        .await
        .expect("kill");
    // The error answers the request in flight; the connection then closes.
    let ended = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("ended within 3 s")
        .expect("task")
        .expect_err("killed");
    assert_eq!(common::sqlstate(&ended), "57P01");
    assert!(asked.elapsed() < Duration::from_secs(3));
    assert!(w_task.await.expect("task").is_err(), "the session ended");
    g.batch_execute("COMMIT").await.expect("commit");
    g2.batch_execute("COMMIT").await.expect("commit");
}

// ---- Named prepared statements across server connections (`prepared`, relay wiring) ----

/// A raw-protocol session's answers up to ReadyForQuery: (tags, SQLSTATEs of errors).
async fn raw_cycle(s: &mut tokio::net::TcpStream, frames: &[Vec<u8>]) -> (String, Vec<String>) {
    use tokio::io::AsyncWriteExt;
    s.write_all(&frames.concat()).await.expect("send");
    let (mut tags, mut codes) = (String::new(), Vec::new());
    loop {
        let (tag, body) = common::raw::read_message(s).await.expect("answer");
        tags.push(tag as char);
        if tag == b'E' {
            let code = body
                .split(|b| *b == 0)
                .find_map(|f| f.strip_prefix(b"C"))
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .unwrap_or_default();
            codes.push(code);
        }
        if tag == b'Z' {
            return (tags, codes);
        }
    }
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for s in [name, sql] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.extend_from_slice(&0u16.to_be_bytes());
    common::raw::frame(b'P', &body)
}

/// Bind (no parameters, text results) + Execute of the unnamed portal.
fn bind_execute(name: &str) -> Vec<Vec<u8>> {
    let mut body = vec![0u8];
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut exec = vec![0u8];
    exec.extend_from_slice(&0u32.to_be_bytes());
    vec![
        common::raw::frame(b'B', &body),
        common::raw::frame(b'E', &exec),
    ]
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    common::raw::frame(b'C', &body)
}

fn sync() -> Vec<u8> {
    common::raw::frame(b'S', &[])
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    common::raw::frame(b'Q', &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_clients_across_connections_per_tenant() {
    let proxy = common::start_proxy(|c| txn_mode(c, 2)).await;
    let mut tasks = Vec::new();
    for i in 0..6usize {
        let tenant = TENANTS[i % TENANTS.len()];
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let client = common::connect(addr, tenant).await;
            // The same text for every tenant (shared server-side per connection) ...
            let shared = client
                .prepare_typed(
                    "SELECT current_setting($1), coalesce(array_agg(DISTINCT tenant_id), '{}'), count(*) FROM customers",
                    &[Type::TEXT],
                )
                .await
                .expect("prepare shared");
            // ... and one only this tenant prepares.
            let own = client
                .prepare(&format!("SELECT $1::int + 1, '{tenant}'::text"))
                .await
                .expect("prepare own");
            let mut pids = HashSet::new();
            for step in 0..15i32 {
                let row = client.query_one(&shared, &[&SETTING]).await.expect("shared");
                let (setting, seen): (String, Vec<String>) = (row.get(0), row.get(1));
                assert_eq!(setting, tenant, "client {i} step {step}: context");
                assert_eq!(seen, [tenant.to_string()], "client {i} step {step}: rows");
                let row = client.query_one(&own, &[&step]).await.expect("own");
                assert_eq!(row.get::<_, i32>(0), step + 1);
                assert_eq!(row.get::<_, String>(1), tenant);
                if step % 3 == 0 {
                    // A transaction holding a connection forces others onto the other one.
                    client.batch_execute("BEGIN").await.expect("begin");
                    let row = client.query_one(&shared, &[&SETTING]).await.expect("in tx");
                    assert_eq!(row.get::<_, String>(0), tenant);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    client.batch_execute("COMMIT").await.expect("commit");
                }
                let pid: i32 = simple_value(&client, "SELECT pg_backend_pid()")
                    .await
                    .parse()
                    .unwrap();
                pids.insert(pid);
            }
            pids
        }));
    }
    let mut pids = HashSet::new();
    for t in tasks {
        pids.extend(t.await.expect("client task"));
    }
    assert_eq!(pids.len(), 2, "statements ran on both connections");
    let text = common::proxy_metrics(&proxy).await;
    assert!(
        common::serve::metric(&text, "pgtenant_prepared_statements_reparsed_total") > 0.0,
        "statements were re-prepared on the connection a client moved to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_cannot_execute_a_statement_prepared_before_a_switch() {
    // One connection: tenant b's session gets a's backend after a switch (DISCARD ALL).
    let proxy = common::start_proxy(|c| txn_mode(c, 1)).await;
    let mut a = common::raw::login(proxy.addr, &common::token("medcorp", "alice")).await;
    let (tags, codes) = raw_cycle(
        &mut a,
        &[parse("secret", "SELECT count(*) FROM customers"), sync()],
    )
    .await;
    assert_eq!((tags.as_str(), codes.len()), ("1Z", 0), "a prepared");
    let (tags, _) = raw_cycle(&mut a, &[bind_execute("secret").concat(), sync()]).await;
    assert_eq!(tags, "2DCZ", "a ran its statement");
    // Divides by zero (an error) unless a's statement is prepared on the backend.
    let (tags, codes) = raw_cycle(
        &mut a,
        &[query(
            "SELECT 1 / count(*) FROM pg_prepared_statements WHERE name LIKE 'pgt_%'",
        )],
    )
    .await;
    assert_eq!(tags, "TDCZ", "a's statement is on the backend: {codes:?}");

    let mut b = common::raw::login(proxy.addr, &common::token("globex", "bob")).await;
    let (tags, codes) = raw_cycle(&mut b, &[bind_execute("secret").concat(), sync()]).await;
    assert_eq!(tags, "EZ", "b's Bind of a's name is refused");
    assert_eq!(codes, ["26000"]);
    let client_b = common::connect(proxy.addr, "globex").await;
    assert_eq!(
        simple_value(&client_b, "SELECT count(*) FROM pg_prepared_statements").await,
        "0",
        "nothing of a's is prepared on the switched backend"
    );
    drop(client_b);
    // a's statement still works for a (re-prepared after the switch back).
    let (tags, codes) = raw_cycle(&mut a, &[bind_execute("secret").concat(), sync()]).await;
    assert_eq!((tags.as_str(), codes.len()), ("2DCZ", 0), "{codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_deallocate_through_the_proxy() {
    let proxy = common::start_proxy(|c| txn_mode(c, 2)).await;
    let mut s = common::raw::login(proxy.addr, &common::token("initech", "peter")).await;
    let run = |name: &str| [bind_execute(name).concat(), sync()];
    assert_eq!(
        raw_cycle(&mut s, &[parse("q", "SELECT 1"), sync()]).await.0,
        "1Z"
    );
    assert_eq!(raw_cycle(&mut s, &run("q")).await.0, "2DCZ");
    // A duplicate name is refused like PostgreSQL does.
    let (tags, codes) = raw_cycle(&mut s, &[parse("q", "SELECT 2"), sync()]).await;
    assert_eq!((tags.as_str(), codes), ("EZ", vec!["42P05".to_string()]));
    // Close: gone for this client.
    assert_eq!(
        raw_cycle(&mut s, &[close_statement("q"), sync()]).await.0,
        "3Z"
    );
    let (tags, codes) = raw_cycle(&mut s, &run("q")).await;
    assert_eq!((tags.as_str(), codes), ("EZ", vec!["26000".to_string()]));
    // The name is free again; DEALLOCATE drops it.
    assert_eq!(
        raw_cycle(&mut s, &[parse("q", "SELECT 3"), sync()]).await.0,
        "1Z"
    );
    let (tags, codes) = raw_cycle(&mut s, &[query("DEALLOCATE q")]).await;
    assert_eq!((tags.as_str(), codes.len()), ("CZ", 0));
    let (tags, codes) = raw_cycle(&mut s, &run("q")).await;
    assert_eq!((tags.as_str(), codes), ("EZ", vec!["26000".to_string()]));
    // DEALLOCATE ALL.
    assert_eq!(
        raw_cycle(
            &mut s,
            &[parse("q1", "SELECT 4"), parse("q2", "SELECT 5"), sync()]
        )
        .await
        .0,
        "11Z"
    );
    assert_eq!(raw_cycle(&mut s, &[query("DEALLOCATE ALL")]).await.0, "CZ");
    for name in ["q1", "q2"] {
        let (tags, codes) = raw_cycle(&mut s, &run(name)).await;
        assert_eq!(
            (tags.as_str(), codes),
            ("EZ", vec!["26000".to_string()]),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_named_statement_layer_engages_mid_stream_or_pins() {
    let proxy = common::start_proxy(|c| txn_mode(c, 2)).await;
    let mut s = common::raw::login(proxy.addr, &common::token("initech", "peter")).await;
    // Unnamed traffic, then a named statement in the same write: the first cycle goes out
    // as it is, the second after the layer engaged (on the same connection).
    let frames = [
        parse("", "SELECT 1"),
        bind_execute("").concat(),
        sync(),
        parse("n1", "SELECT 2"),
        bind_execute("n1").concat(),
        sync(),
    ];
    let wait = Duration::from_secs(5);
    let first = tokio::time::timeout(wait, raw_cycle(&mut s, &frames)).await;
    assert_eq!(first.expect("no hang").0, "12DCZ");
    let second = tokio::time::timeout(wait, raw_cycle(&mut s, &[])).await;
    assert_eq!(second.expect("no hang").0, "12DCZ");
    assert_eq!(
        raw_cycle(&mut s, &[bind_execute("n1").concat(), sync()])
            .await
            .0,
        "2DCZ"
    );

    // A named statement inside a cycle whose first messages already reached the server
    // (answers read after Flush): the session is pinned instead, and nothing hangs.
    let mut p = common::raw::login(proxy.addr, &common::token("initech", "peter")).await;
    {
        use tokio::io::AsyncWriteExt;
        let flush = common::raw::frame(b'H', &[]);
        p.write_all(&[parse("", "SELECT 3"), bind_execute("").concat(), flush].concat())
            .await
            .expect("send");
        let mut tags = String::new();
        while !tags.ends_with('C') {
            let (tag, _) = tokio::time::timeout(wait, common::raw::read_message(&mut p))
                .await
                .expect("no hang")
                .expect("answer");
            tags.push(tag as char);
        }
        assert_eq!(tags, "12DC");
    }
    let rest = [parse("n2", "SELECT 4"), bind_execute("n2").concat(), sync()];
    let done = tokio::time::timeout(wait, raw_cycle(&mut p, &rest)).await;
    assert_eq!(done.expect("no hang"), ("12DCZ".to_string(), vec![]));
    assert_eq!(
        raw_cycle(&mut p, &[bind_execute("n2").concat(), sync()])
            .await
            .0,
        "2DCZ"
    );
    let text = common::proxy_metrics(&proxy).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("pgtenant_pinned_sessions_total")
                && l.contains("reason=\"named_statement_mid_cycle\"")),
        "pinned, with its reason"
    );
}
