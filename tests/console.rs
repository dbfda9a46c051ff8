//! The admin console (virtual database `pgtenant`) driven by real clients (psql and
//! tokio-postgres) against a real PostgreSQL: SHOW, KILL/SUSPEND/PAUSE/RESUME on live
//! sessions, RELOAD from the config file, SHUTDOWN of the real binary, and
//! `[jwt] session_max_lifetime = "token"`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtenant::config::SessionLifetime;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use common::serve::{self, Serve};

const CONSOLE_DB: &str = "pgtenant";

fn admin_token() -> String {
    common::token_with(
        "ops",
        "admin@ops.example",
        3600,
        &[("pgtenant_admin".into(), json!(true))],
    )
}

/// A client whose connection task's outcome is kept: a FATAL the server sends while the
/// client is idle ends the connection task with that error.
async fn connect_watched(
    addr: SocketAddr,
    password: &str,
    dbname: &str,
) -> Result<(Client, JoinHandle<Result<(), tokio_postgres::Error>>), tokio_postgres::Error> {
    let mut cfg = common::conn_config(addr, password);
    cfg.dbname(dbname);
    let (client, connection) = cfg.connect(NoTls).await?;
    Ok((client, tokio::spawn(connection)))
}

async fn console(addr: SocketAddr) -> Client {
    connect_watched(addr, &admin_token(), CONSOLE_DB)
        .await
        .expect("console connects")
        .0
}

async fn tenant(
    addr: SocketAddr,
    tenant: &str,
) -> (Client, JoinHandle<Result<(), tokio_postgres::Error>>) {
    let token = common::token(tenant, &format!("user@{tenant}"));
    connect_watched(addr, &token, "app")
        .await
        .unwrap_or_else(|e| panic!("connect as {tenant}: {e:?}"))
}

/// Rows of a console command as column name → value maps.
async fn rows(client: &Client, sql: &str) -> Vec<Vec<(String, Option<String>)>> {
    let messages = client.simple_query(sql).await.expect(sql);
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), r.get(i).map(str::to_string)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn field<'a>(row: &'a [(String, Option<String>)], name: &str) -> Option<&'a str> {
    row.iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

async fn one(client: &Client, sql: &str) -> String {
    let messages = client.simple_query(sql).await.expect(sql);
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

/// Polls `check` until it holds (a wait for a state, not a timing assertion).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The SQLSTATE a connection task ended with.
async fn ended_with(task: JoinHandle<Result<(), tokio_postgres::Error>>) -> String {
    match tokio::time::timeout(Duration::from_secs(60), task).await {
        Ok(Ok(Err(e))) => common::sqlstate(&e),
        other => format!("connection did not end with an error: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_admin_tokens_get_28000_and_admins_get_the_console() {
    let proxy = common::start_proxy(|_| {}).await;
    let plain = common::token("acme", "alice@acme.example");
    let err = connect_watched(proxy.addr, &plain, CONSOLE_DB)
        .await
        .expect_err("a token without the admin claim is refused");
    assert_eq!(common::sqlstate(&err), "28000");
    let not_true = common::token_with(
        "acme",
        "alice@acme.example",
        3600,
        &[("pgtenant_admin".into(), json!("yes"))],
    );
    let err = connect_watched(proxy.addr, &not_true, CONSOLE_DB)
        .await
        .expect_err("the claim must be true");
    assert_eq!(common::sqlstate(&err), "28000");

    let admin = console(proxy.addr).await;
    let help = rows(&admin, "show help").await;
    assert!(help
        .iter()
        .any(|r| field(r, "command") == Some("KILL TENANT t")));
    // Unknown commands are errors; the console session goes on.
    let err = admin.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(common::sqlstate(&err), "42601");
    // The extended protocol is refused the same way.
    let err = admin.query("SHOW CLIENTS", &[]).await.unwrap_err();
    assert_eq!(common::sqlstate(&err), "0A000");
    assert!(!rows(&admin, "SHOW POOLS").await.is_empty());

    let (_, metrics) = common::http_get(&format!(
        "http://{}/metrics",
        proxy.admin_addr.expect("admin")
    ))
    .await;
    assert!(
        metrics.contains("pgtenant_auth_failures_total{reason=\"not_admin\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgtenant_console_commands_total{command=\"show_pools\"}"),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_commands_list_live_sessions_in_psql_and_tokio_postgres() {
    let proxy = common::start_proxy(|_| {}).await;
    let (acme, _a) = tenant(proxy.addr, "acme").await;
    let (globex, _g) = tenant(proxy.addr, "globex").await;
    let acme_pid = one(&acme, "SELECT pg_backend_pid()").await;
    one(&globex, "SELECT 1").await;

    // psql, as an operator would run it: an aligned table with the column headers.
    let out = tokio::process::Command::new(common::env().pg.psql_path())
        .arg(format!(
            "host=127.0.0.1 port={} user=admin dbname={CONSOLE_DB}",
            proxy.addr.port()
        ))
        .args(["-X", "-c", "SHOW CLIENTS", "-c", "SHOW POOLS"])
        .env("PGPASSWORD", admin_token())
        .env_remove("PGSSLMODE")
        .output()
        .await
        .expect("psql");
    let stdout = common::stdout(&out);
    assert!(out.status.success(), "{}", common::stderr(&out));
    for expected in [
        "tenant",
        "upstream",
        "state",
        "acme",
        "globex",
        "shared",
        "pgtenant-tests",
        "pool_size",
        "in_use",
        "(2 rows)",
    ] {
        assert!(stdout.contains(expected), "{expected} missing:\n{stdout}");
    }

    let admin = console(proxy.addr).await;
    let clients = rows(&admin, "SHOW CLIENTS").await;
    let acme_row = clients
        .iter()
        .find(|r| field(r, "tenant") == Some("acme"))
        .expect("acme listed");
    assert_eq!(field(acme_row, "backend_pid"), Some(acme_pid.as_str()));
    assert_eq!(field(acme_row, "user"), Some("user@acme"));
    assert_eq!(field(acme_row, "state"), Some("idle"));
    let servers = rows(&admin, "SHOW SERVERS").await;
    assert!(servers
        .iter()
        .any(|r| field(r, "backend_pid") == Some(acme_pid.as_str())
            && field(r, "upstream") == Some("acme")));
    let tenants = rows(&admin, "SHOW TENANTS").await;
    let globex_row = tenants
        .iter()
        .find(|r| field(r, "tenant") == Some("globex"))
        .expect("globex listed");
    assert_eq!(field(globex_row, "upstream"), Some("shared"));
    assert_eq!(field(globex_row, "sessions"), Some("1"));
    assert_eq!(field(globex_row, "state"), Some("running"));
    // Several commands in one Query; STATS counts the queries relayed so far.
    let messages = admin
        .simple_query("SHOW STATS; SHOW POOLS")
        .await
        .expect("two commands");
    let completions = messages
        .iter()
        .filter(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)))
        .count();
    assert_eq!(completions, 2);
    let stats = rows(&admin, "SHOW STATS").await;
    let acme_stats = stats
        .iter()
        .find(|r| field(r, "tenant") == Some("acme"))
        .expect("acme stats");
    assert!(
        field(acme_stats, "queries")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let pools = rows(&admin, "SHOW POOLS").await;
    let acme_pool = pools
        .iter()
        .find(|r| field(r, "upstream") == Some("acme"))
        .expect("acme pool");
    assert_eq!(field(acme_pool, "in_use"), Some("1"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_config_redacts_the_jwt_secret_and_passwords() {
    let secret = common::env().demo.jwt_secret.clone();
    let proxy = common::start_proxy(|cfg| {
        cfg.jwt.secret = Some(secret.clone());
        cfg.jwt.secret_file = None;
    })
    .await;
    let admin = console(proxy.addr).await;
    let config = rows(&admin, "SHOW CONFIG").await;
    let text: String = config
        .iter()
        .map(|r| {
            format!(
                "{}={}\n",
                field(r, "key").unwrap_or(""),
                field(r, "value").unwrap_or("")
            )
        })
        .collect();
    assert!(!text.contains(&secret), "the JWT secret leaked:\n{text}");
    assert!(text.contains("jwt.secret=(redacted)"), "{text}");
    assert!(text.contains("tenants.acme=acme"), "{text}");
    // Every upstream URL of the demo has a password; none is shown.
    let cfg = common::config(|_| {});
    for up in cfg.upstreams.values() {
        let url = url::Url::parse(&up.url).unwrap();
        if let Some(pw) = url.password() {
            assert!(
                !text.contains(&format!(":{pw}@")),
                "a password leaked:\n{text}"
            );
        }
    }
    assert!(text.contains(":redacted@"), "{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_tenant_ends_its_sessions_and_spares_the_others() {
    let proxy = common::start_proxy(|_| {}).await;
    let (busy, busy_task) = tenant(proxy.addr, "acme").await;
    let (in_tx, in_tx_task) = tenant(proxy.addr, "acme").await;
    let (globex, _g) = tenant(proxy.addr, "globex").await;
    let busy_pid = one(&busy, "SELECT pg_backend_pid()").await;
    in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let sleeping = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(600)").await });

    let admin = console(proxy.addr).await;
    eventually("the sleep is active", async || {
        rows(&admin, "SHOW CLIENTS").await.iter().any(|r| {
            field(r, "backend_pid") == Some(busy_pid.as_str())
                && field(r, "state") == Some("active")
        })
    })
    .await;
    admin.simple_query("KILL TENANT acme").await.expect("kill");

    // Mid-query and mid-transaction alike: FATAL 57P01.
    let err = sleeping.await.unwrap().unwrap_err();
    assert_eq!(common::sqlstate(&err), "57P01", "{err:?}");
    assert_eq!(ended_with(in_tx_task).await, "57P01");
    let _ = busy_task.await;
    // The other tenant's session goes on.
    assert_eq!(one(&globex, "SELECT 40 + 2").await, "42");
    // The killed server connections were destroyed: the busy backend is gone.
    let pg = common::env().pg.admin_client("postgres").await.unwrap();
    eventually("the killed backend exits", async || {
        let pid: i32 = busy_pid.parse().unwrap();
        pg.query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .is_none()
    })
    .await;
    assert!(!rows(&admin, "SHOW CLIENTS")
        .await
        .iter()
        .any(|r| field(r, "tenant") == Some("acme")));
    // KILL does not suspend: acme may connect again.
    let (again, _) = tenant(proxy.addr, "acme").await;
    assert_eq!(one(&again, "SELECT current_database()").await, "acme_db");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_refuses_new_sessions_until_resume() {
    let proxy = common::start_proxy(|_| {}).await;
    let (_open, open_task) = tenant(proxy.addr, "acme").await;
    let admin = console(proxy.addr).await;
    admin
        .simple_query("SUSPEND TENANT acme")
        .await
        .expect("suspend");
    assert_eq!(ended_with(open_task).await, "57P01");

    let token = common::token("acme", "alice@acme.example");
    let err = connect_watched(proxy.addr, &token, "app")
        .await
        .expect_err("refused");
    assert_eq!(common::sqlstate(&err), "28000");
    let message = err
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("suspended"), "{err:?}");
    let tenants = rows(&admin, "SHOW TENANTS").await;
    let acme = tenants
        .iter()
        .find(|r| field(r, "tenant") == Some("acme"))
        .expect("acme");
    assert_eq!(field(acme, "state"), Some("suspended"));
    // Others are not affected.
    let (globex, _) = tenant(proxy.addr, "globex").await;
    assert_eq!(one(&globex, "SELECT 1").await, "1");

    admin.simple_query("RESUME acme").await.expect("resume");
    let (back, _) = tenant(proxy.addr, "acme").await;
    assert_eq!(one(&back, "SELECT current_database()").await, "acme_db");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_requests_at_transaction_boundaries_until_resume() {
    let proxy = common::start_proxy(|_| {}).await;
    let (idle, _i) = tenant(proxy.addr, "acme").await;
    let (in_tx, _t) = tenant(proxy.addr, "acme").await;
    let (globex, _g) = tenant(proxy.addr, "globex").await;
    let idle_pid = one(&idle, "SELECT pg_backend_pid()").await;
    in_tx.batch_execute("BEGIN").await.unwrap();
    let admin = console(proxy.addr).await;
    admin.simple_query("PAUSE acme").await.expect("pause");

    // A transaction in progress finishes.
    assert_eq!(one(&in_tx, "SELECT 7").await, "7");
    in_tx
        .batch_execute("COMMIT")
        .await
        .expect("commit while paused");
    // Another tenant is not paused.
    assert_eq!(one(&globex, "SELECT 1").await, "1");

    let resumed = Arc::new(AtomicBool::new(false));
    let seen = resumed.clone();
    let held = tokio::spawn(async move {
        let value = one(&idle, "SELECT 42").await;
        (value, seen.load(Ordering::SeqCst))
    });
    // A new session of the paused tenant waits before it gets a server connection.
    let addr = proxy.addr;
    let newcomer = tokio::spawn(async move {
        let (c, _) = tenant(addr, "acme").await;
        one(&c, "SELECT 1").await
    });
    eventually("the held query and the new session wait", async || {
        let clients = rows(&admin, "SHOW CLIENTS").await;
        let waiting = |r: &&Vec<(String, Option<String>)>| {
            field(r, "tenant") == Some("acme") && field(r, "state") == Some("waiting")
        };
        clients
            .iter()
            .filter(waiting)
            .any(|r| field(r, "backend_pid") == Some(idle_pid.as_str()))
            && clients.iter().filter(waiting).count() == 2
    })
    .await;
    assert!(!held.is_finished() && !newcomer.is_finished());
    let tenants = rows(&admin, "SHOW TENANTS").await;
    assert!(tenants
        .iter()
        .any(|r| field(r, "tenant") == Some("acme") && field(r, "state") == Some("paused")));

    resumed.store(true, Ordering::SeqCst);
    admin.simple_query("RESUME acme").await.expect("resume");
    let (value, after_resume) = held.await.unwrap();
    assert_eq!(value, "42");
    assert!(after_resume, "the held query completed before RESUME");
    assert_eq!(newcomer.await.unwrap(), "1");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_file_and_rejects_an_invalid_one() {
    let (addr, admin_addr) = (serve::free_addr(), serve::free_addr());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgtenant.toml");
    let text = serve::config_text(addr, admin_addr);
    let unrouted = text.replacen("default = \"shared\"\n", "", 1);
    assert_ne!(unrouted, text);
    std::fs::write(&path, &unrouted).unwrap();
    let proxy = pgtenant::server::spawn(pgtenant::config::Config::load(&path).unwrap())
        .await
        .expect("proxy starts");
    proxy.shared.set_config_path(&path);
    let globex = common::token("globex", "hank@globex.example");
    let err = common::try_connect(addr, &globex)
        .await
        .expect_err("unrouted");
    assert_eq!(common::sqlstate(&err), "28000");

    let admin = console(addr).await;
    let routed = unrouted.replacen("[tenants]\n", "[tenants]\nglobex = \"shared\"\n", 1);
    std::fs::write(&path, &routed).unwrap();
    admin.simple_query("RELOAD").await.expect("reload");
    let g = common::try_connect(addr, &globex)
        .await
        .expect("routed after RELOAD");
    assert_eq!(one(&g, "SELECT current_database()").await, "saas");
    assert!(rows(&admin, "SHOW CONFIG")
        .await
        .iter()
        .any(|r| field(r, "key") == Some("tenants.globex")));

    // An invalid file: an error naming the reason, and the running config stays.
    let broken = routed.replacen("globex = \"shared\"", "globex = \"no_such_upstream\"", 1);
    std::fs::write(&path, &broken).unwrap();
    let err = admin.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(common::sqlstate(&err), "F0000");
    let message = err
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("no_such_upstream"), "{message}");
    let g2 = common::try_connect(addr, &globex)
        .await
        .expect("old config kept");
    assert_eq!(one(&g2, "SELECT current_database()").await, "saas");
    // The console session survived the failed command.
    assert!(!rows(&admin, "SHOW POOLS").await.is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_pgtenant_serve_gracefully() {
    let (addr, admin_addr) = (serve::free_addr(), serve::free_addr());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgtenant.toml");
    std::fs::write(&path, serve::config_text(addr, admin_addr)).unwrap();
    let mut child = Serve::start(&path, addr, admin_addr).await;
    let (acme, acme_task) = tenant(addr, "acme").await;
    assert_eq!(one(&acme, "SELECT 1").await, "1");

    let out = common::psql(
        addr,
        &admin_token(),
        &format!("dbname={CONSOLE_DB}"),
        &["-c", "SHUTDOWN"],
    )
    .await;
    assert!(out.status.success(), "{}", common::stderr(&out));
    // The idle session is ended the way SIGTERM ends it.
    assert_eq!(ended_with(acme_task).await, "57P01");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "pgtenant did not exit: {}",
            child.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status:?}: {}", child.log_text());
    let log = child.log_text();
    assert!(log.contains("SHUTDOWN from the admin console"), "{log}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_end_sessions_at_transaction_boundaries() {
    let proxy = common::start_proxy(|cfg| {
        cfg.jwt.session_max_lifetime = Some(SessionLifetime::Token);
        cfg.jwt.leeway_secs = 0;
    })
    .await;
    let ttl = 3;
    let token = common::token_with("acme", "alice@acme.example", ttl, &[]);
    let expires = Instant::now() + Duration::from_secs(ttl);
    let (_idle, idle_task) = connect_watched(proxy.addr, &token, "app").await.unwrap();
    let (in_tx, in_tx_task) = connect_watched(proxy.addr, &token, "app").await.unwrap();
    in_tx.batch_execute("BEGIN").await.unwrap();
    one(&in_tx, "SELECT 1").await;

    // The idle session gets the FATAL once the token expires.
    assert_eq!(ended_with(idle_task).await, "28000");
    // Past exp, the open transaction still runs and commits; then the session ends.
    tokio::time::sleep_until(expires.into()).await;
    assert!(!in_tx_task.is_finished(), "ended inside its transaction");
    assert_eq!(one(&in_tx, "SELECT 2").await, "2");
    in_tx
        .batch_execute("COMMIT")
        .await
        .expect("COMMIT completes first");
    assert_eq!(ended_with(in_tx_task).await, "28000");

    let (_, metrics) = common::http_get(&format!(
        "http://{}/metrics",
        proxy.admin_addr.expect("admin")
    ))
    .await;
    assert!(
        metrics.contains("pgtenant_sessions_ended_total{reason=\"token_expired\"}"),
        "{metrics}"
    );
    proxy.stop().await;
}
