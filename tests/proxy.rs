//! End-to-end tests of the core proxy against a real PostgreSQL, with real clients
//! (tokio-postgres, psql, pgbench, and a raw socket for protocol abuse).

mod common;

use std::time::{Duration, Instant};

use common::raw;
use pgtenant::demo::data;
use tokio::io::AsyncWriteExt;
use tokio_postgres::NoTls;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_rejections_carry_the_right_sqlstate() {
    let proxy = common::start_proxy(|c| c.tenants.default = None).await;
    let secret = common::env().demo.jwt_secret.as_bytes().to_vec();
    let t = now();
    let cases: Vec<(&str, String, &str)> = vec![
        ("garbage", "not-a-jwt".into(), "28P01"),
        (
            "wrong key",
            hs256(
                b"another-secret-that-is-long-enough!!",
                serde_json::json!({"tenant_id": "acme", "sub": "a", "exp": t + 600}),
            ),
            "28P01",
        ),
        (
            "expired",
            hs256(
                &secret,
                serde_json::json!({"tenant_id": "acme", "sub": "a", "exp": t - 3600, "iat": t - 7200}),
            ),
            "28P01",
        ),
        (
            "no exp",
            hs256(
                &secret,
                serde_json::json!({"tenant_id": "acme", "sub": "a"}),
            ),
            "28P01",
        ),
        (
            "not yet valid",
            hs256(
                &secret,
                serde_json::json!({"tenant_id": "acme", "sub": "a", "exp": t + 7200, "nbf": t + 3600}),
            ),
            "28P01",
        ),
        (
            "missing tenant",
            hs256(&secret, serde_json::json!({"sub": "a", "exp": t + 600})),
            "28000",
        ),
        (
            "tenant not a string",
            hs256(
                &secret,
                serde_json::json!({"tenant_id": 42, "sub": "a", "exp": t + 600}),
            ),
            "28000",
        ),
        (
            "tenant fails pattern",
            hs256(
                &secret,
                serde_json::json!({"tenant_id": "acme'; --", "sub": "a", "exp": t + 600}),
            ),
            "28000",
        ),
        (
            "unknown tenant, no default",
            common::token("nosuchtenant", "a"),
            "28000",
        ),
    ];
    for (name, token, code) in cases {
        let err = common::try_connect(proxy.addr, &token)
            .await
            .expect_err(name);
        assert_eq!(common::sqlstate(&err), code, "{name}: {err:?}");
        let text = format!("{err:?}");
        assert!(
            !text.contains(&token) || token.len() < 12,
            "{name}: token echoed in {text}"
        );
    }
    // The proxy still serves a valid token afterwards.
    let client = common::connect(proxy.addr, "acme").await;
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedicated_tenants_reach_their_own_database() {
    let proxy = common::start_proxy(|_| {}).await;
    for tenant in ["acme", "techstart"] {
        let expected = data::dedicated(tenant).unwrap();
        let client = common::connect(proxy.addr, tenant).await;
        let row = client
            .query_one(
                "SELECT current_database(), current_user, (SELECT count(*) FROM iam_user)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), expected.database);
        assert_eq!(row.get::<_, String>(1), expected.role);
        assert_eq!(row.get::<_, i64>(2), expected.users.len() as i64);
        let emails: Vec<String> = client
            .query("SELECT email FROM iam_user", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(emails.iter().all(|e| e.contains(tenant)), "{emails:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_tenants_see_only_their_rows() {
    let proxy = common::start_proxy(|_| {}).await;
    for t in data::SHARED {
        let client = common::connect(proxy.addr, t.tenant).await;
        let rows = client
            .query("SELECT tenant_id FROM customers", &[])
            .await
            .unwrap();
        assert_eq!(rows.len(), t.customers.len(), "{}", t.tenant);
        assert!(rows.iter().all(|r| r.get::<_, String>(0) == t.tenant));
        let setting: String = client
            .query_one("SELECT current_setting('app.current_tenant_id')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(setting, t.tenant);
        assert_eq!(
            client
                .query_one("SELECT current_database()", &[])
                .await
                .unwrap()
                .get::<_, String>(0),
            data::SHARED_DATABASE
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_cannot_choose_the_tenant() {
    let proxy = common::start_proxy(|_| {}).await;
    let mut cfg = common::conn_config(proxy.addr, &common::token("medcorp", "mallory"));
    cfg.options("-c app.current_tenant_id=globex -c row_security=off");
    let (client, conn) = cfg.connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = client
        .query("SELECT tenant_id FROM customers", &[])
        .await
        .unwrap();
    assert!(!rows.is_empty());
    assert!(rows.iter().all(|r| r.get::<_, String>(0) == "medcorp"));
    // A bare custom-setting startup parameter is dropped too (raw client; libpq can't send it).
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&raw::startup_packet(
        3,
        0,
        &[
            ("user", "app"),
            ("database", "app"),
            ("app.current_tenant_id", "globex"),
        ],
    ))
    .await
    .unwrap();
    let (tag, _) = raw::read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'R');
    let mut pw = common::token("medcorp", "mallory").into_bytes();
    pw.push(0);
    s.write_all(&raw::frame(b'p', &pw)).await.unwrap();
    while raw::read_message(&mut s).await.unwrap().0 != b'Z' {}
    s.write_all(&raw::frame(
        b'Q',
        b"SELECT current_setting('app.current_tenant_id')\0",
    ))
    .await
    .unwrap();
    let mut value = None;
    loop {
        let (tag, body) = raw::read_message(&mut s).await.unwrap();
        if tag == b'D' {
            value = Some(String::from_utf8_lossy(&body[6..]).into_owned());
        }
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(value.as_deref(), Some("medcorp"));
}

/// Pool size 1: tenant B gets the very server connection tenant A used, and finds none of
/// A's rows or session state (temp table, prepared statement, setting, open transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_server_connection_carries_nothing_across_tenants() {
    let proxy = common::start_proxy(|c| {
        c.upstreams.get_mut("shared").unwrap().pool_size = 1;
    })
    .await;

    let a = common::connect(proxy.addr, "medcorp").await;
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute(
        "CREATE TEMP TABLE leak(x int); INSERT INTO leak VALUES (1);
         PREPARE leaked AS SELECT 1;
         SET work_mem = '7MB';
         DECLARE c CURSOR WITH HOLD FOR SELECT 1;
         BEGIN; INSERT INTO customers (tenant_id, name, email) VALUES ('medcorp', 'uncommitted', 'x@y');",
    )
    .await
    .unwrap();
    drop(a); // leaves mid-transaction

    // Wait for the release to finish before the next checkout (pool of one).
    let b = common::connect(proxy.addr, "globex").await;
    let pid_b: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid_a, pid_b, "the test needs the same server connection");
    let row = b
        .query_one(
            "SELECT to_regclass('pg_temp.leak') IS NULL,
                    (SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaked'),
                    (SELECT count(*) FROM pg_cursors WHERE name = 'c'),
                    current_setting('work_mem'),
                    current_setting('app.current_tenant_id')",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "temp table survived");
    assert_eq!(row.get::<_, i64>(1), 0, "prepared statement survived");
    assert_eq!(row.get::<_, i64>(2), 0, "cursor survived");
    assert_ne!(row.get::<_, String>(3), "7MB", "setting survived");
    assert_eq!(row.get::<_, String>(4), "globex");
    let rows = b
        .query("SELECT tenant_id, name FROM customers", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), data::shared("globex").unwrap().customers.len());
    assert!(rows.iter().all(|r| r.get::<_, String>(0) == "globex"));
    drop(b);

    // A's uncommitted insert was rolled back.
    let a2 = common::connect(proxy.addr, "medcorp").await;
    let n: i64 = a2
        .query_one(
            "SELECT count(*) FROM customers WHERE name = 'uncommitted'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_parameters_and_errors() {
    let proxy = common::start_proxy(|_| {}).await;
    let client = common::connect(proxy.addr, "initech").await;
    let stmt = client
        .prepare("SELECT name FROM customers WHERE name LIKE $1 ORDER BY name")
        .await
        .unwrap();
    for _ in 0..3 {
        let rows = client.query(&stmt, &[&"In%"]).await.unwrap();
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            names,
            vec!["Initrode".to_string(), "Intertrode".to_string()]
        );
    }
    // A server error passes through unchanged and the session stays usable.
    let err = client.query("SELECT 1/0", &[]).await.unwrap_err();
    assert_eq!(common::sqlstate(&err), "22012");
    let n: i64 = client
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, data::shared("initech").unwrap().customers.len() as i64);
    // Transactions work across the relay.
    client
        .batch_execute("BEGIN; SELECT 1; ROLLBACK")
        .await
        .unwrap();
    // Large result: 200k rows streamed.
    let rows = client
        .query(
            "SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    use futures_util::{SinkExt, StreamExt};
    let proxy = common::start_proxy(|_| {}).await;
    let client = common::connect(proxy.addr, "techstart").await;
    client
        .batch_execute("CREATE TEMP TABLE copied (id int, payload text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY copied FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut sent = 0usize;
    for chunk in 0..50 {
        let mut buf = String::new();
        for i in 0..1000 {
            buf.push_str(&format!("{}\t{}\n", chunk * 1000 + i, "p".repeat(50)));
        }
        sent += buf.len();
        sink.send(bytes::Bytes::from(buf)).await.unwrap();
    }
    let rows = sink.finish().await.unwrap();
    assert_eq!(rows, 50_000);
    let stream = client.copy_out("COPY copied TO STDOUT").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        received += chunk.unwrap().len();
    }
    assert_eq!(received, sent);
    // A COPY error (bad data) passes through and leaves the session usable.
    let sink = client.copy_in("COPY copied FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n"))
        .await
        .unwrap();
    let err = sink.finish().await.unwrap_err();
    assert_eq!(common::sqlstate(&err), "22P02");
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_only_the_running_query() {
    let proxy = common::start_proxy(|_| {}).await;
    let client = common::connect(proxy.addr, "acme").await;
    let bystander = common::connect(proxy.addr, "acme").await;
    let token = client.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(NoTls).await
    });
    let err = client
        .simple_query("SELECT pg_sleep(30)")
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    canceller.await.unwrap().unwrap();
    // The cancelled session and the other one both work.
    client.simple_query("SELECT 1").await.unwrap();
    bystander.simple_query("SELECT 1").await.unwrap();
    // A CancelRequest with an unknown key is ignored.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut pkt = 16u32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&80_877_102u32.to_be_bytes());
    pkt.extend_from_slice(&12345i32.to_be_bytes());
    pkt.extend_from_slice(&678i32.to_be_bytes());
    s.write_all(&pkt).await.unwrap();
    bystander.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_over_tls_and_tls_require() {
    let proxy = common::start_proxy(|_| {}).await;
    let token = common::token("medcorp", "dr.grey");
    let out = common::psql(
        proxy.addr,
        &token,
        "sslmode=require",
        &["-c", "SELECT count(*) FROM customers"],
    )
    .await;
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(
        common::stdout(&out),
        data::shared("medcorp").unwrap().customers.len().to_string()
    );

    let strict = common::start_proxy(|c| c.listen.tls = pgtenant::config::TlsMode::Require).await;
    let out = common::psql(strict.addr, &token, "sslmode=disable", &["-c", "SELECT 1"]).await;
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("TLS is required"),
        "{}",
        common::stderr(&out)
    );
    let out = common::psql(strict.addr, &token, "sslmode=require", &["-c", "SELECT 1"]).await;
    assert!(out.status.success(), "{}", common::stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_53300_naming_the_pool() {
    let proxy = common::start_proxy(|c| {
        let shared = c.upstreams.get_mut("shared").unwrap();
        shared.pool_size = 1;
        shared.checkout_timeout = Duration::from_millis(400);
    })
    .await;
    let holder = common::connect(proxy.addr, "medcorp").await;
    holder.simple_query("SELECT 1").await.unwrap();
    let started = Instant::now();
    let err = common::try_connect(proxy.addr, &common::token("globex", "g"))
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err), "53300");
    assert!(format!("{err:?}").contains("shared"), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    drop(holder);
    // Once the holder leaves, the pool serves again.
    let mut ok = false;
    for _ in 0..20 {
        if common::try_connect(proxy.addr, &common::token("globex", "g"))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "pool did not recover after the holder left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_and_oversized_frames_get_08p01() {
    let proxy = common::start_proxy(|_| {}).await;
    // A startup packet with an impossible protocol version.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&raw::startup_packet(9, 9, &[("user", "x")]))
        .await
        .unwrap();
    let (code, _) = raw::read_error(&mut s).await.expect("an error, not a hang");
    assert!(code == "08P01" || code == "0A000", "{code}");

    // A declared length far over the cap before any body: refused without allocating.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .unwrap();
    let answer = raw::read_error(&mut s).await;
    assert!(
        answer.as_ref().is_none_or(|(c, _)| c == "08P01"),
        "{answer:?}"
    );

    // After authentication: an oversized frame.
    let mut s = raw::login(proxy.addr, &common::token("acme", "a")).await;
    let mut huge = vec![b'Q'];
    huge.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
    s.write_all(&huge).await.unwrap();
    let (code, msg) = raw::read_error(&mut s)
        .await
        .expect("an error after oversized frame");
    assert_eq!(code, "08P01", "{msg}");

    // A password message that is not a password.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&raw::startup_packet(
        3,
        0,
        &[("user", "x"), ("database", "y")],
    ))
    .await
    .unwrap();
    raw::read_message(&mut s).await.unwrap();
    s.write_all(&raw::frame(b'Q', b"SELECT 1\0")).await.unwrap();
    let (code, _) = raw::read_error(&mut s).await.unwrap();
    assert_eq!(code, "08P01");

    // Truncated garbage, then close: no crash; the proxy keeps serving.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0, 0, 0]).await.unwrap();
    drop(s);
    let client = common::connect(proxy.addr, "acme").await;
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_is_negotiated_down() {
    let proxy = common::start_proxy(|_| {}).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&raw::startup_packet(
        3,
        2,
        &[
            ("user", "app"),
            ("database", "app"),
            ("_pq_.test_option", "1"),
        ],
    ))
    .await
    .unwrap();
    let (tag, body) = raw::read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'v', "NegotiateProtocolVersion expected");
    assert_eq!(&body[..4], &0i32.to_be_bytes());
    assert_eq!(&body[4..8], &1i32.to_be_bytes());
    assert!(String::from_utf8_lossy(&body[8..]).contains("_pq_.test_option"));
    let (tag, _) = raw::read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'R');
}

async fn pgbench(
    addr: std::net::SocketAddr,
    token: &str,
    db: &str,
    protocol: &str,
) -> (bool, String) {
    let pg = common::env().pg;
    let out = tokio::process::Command::new(pg.pgbench_path())
        .args(["-n", "-S", "-M", protocol, "-c", "4", "-j", "2", "-T", "2"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &addr.port().to_string(),
            "-U",
            "app",
            db,
        ])
        .env("PGPASSWORD", token)
        .output()
        .await
        .unwrap();
    let text = format!("{}\n{}", common::stdout(&out), common::stderr(&out));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_in_every_protocol_mode_without_failures() {
    let proxy = common::start_proxy(|_| {}).await;
    let token = common::token("bench", "bench");
    for protocol in ["simple", "extended", "prepared"] {
        let (ok, text) = pgbench(proxy.addr, &token, "bench_db", protocol).await;
        assert!(ok, "pgbench -M {protocol}: {text}");
        let processed: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            processed > 100,
            "pgbench -M {protocol} processed {processed}: {text}"
        );
        if let Some(failed) = text
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions: "))
        {
            assert!(failed.starts_with("0 "), "pgbench -M {protocol}: {failed}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints() {
    let proxy = common::start_proxy(|_| {}).await;
    let admin = proxy.admin_addr.unwrap();
    let client = common::connect(proxy.addr, "globex").await;
    client.simple_query("SELECT 1").await.unwrap();
    let _ = common::try_connect(proxy.addr, "garbage-token").await;
    let get = |path: &str| {
        let url = format!("http://{admin}{path}");
        async move { common::http_get(&url).await }
    };
    assert!(get("/healthz").await.0 == 200);
    assert!(get("/readyz").await.0 == 200);
    let (status, body) = get("/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "pgtenant_sessions_total{tenant=\"globex\",upstream=\"shared\"}",
        "pgtenant_auth_failures_total{reason=",
        "pgtenant_queries_total{tenant=\"globex\",upstream=\"shared\"}",
        "pgtenant_pool_connections{upstream=\"shared\"}",
        "pgtenant_pool_idle_connections{upstream=\"shared\"}",
        "pgtenant_pool_waiting_clients{upstream=\"shared\"}",
        "pgtenant_client_connections{tenant=\"globex\",upstream=\"shared\"}",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    assert!(!body.contains(&common::env().demo.jwt_secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_transactions_finish_then_sends_57p01() {
    let proxy = common::start_proxy(|c| c.limits.shutdown_timeout = Duration::from_secs(10)).await;
    let addr = proxy.addr;
    let in_tx = common::connect(addr, "medcorp").await;
    let idle = common::connect(addr, "globex").await;
    in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New sessions are refused; the idle session is ended with 57P01.
    assert!(common::try_connect(addr, &common::token("acme", "a"))
        .await
        .is_err());
    let err = idle.simple_query("SELECT 1").await.unwrap_err();
    assert!(err.code().is_none_or(|c| c.code() == "57P01"), "{err:?}");
    // The open transaction finishes normally, then that session ends too.
    in_tx.simple_query("SELECT 2").await.unwrap();
    in_tx.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("drained")
        .unwrap();
    assert!(in_tx.simple_query("SELECT 3").await.is_err());
}
