//! SCRATCH (deleted before the final commit): checks src/pool against a hand-made cluster.
//! Env: PGDIR (initdb dir containing data/, ca.crt; socket dir), PGPORT.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgtenant::config::{Config, ServerTlsMode, UpstreamConfig};
use pgtenant::pool::{
    PoolError, Pools, ServerConn, ServerError, ServerStream, ServerTls, UpstreamTarget,
};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn port() -> u16 {
    std::env::var("PGPORT").unwrap().parse().unwrap()
}
fn pgdir() -> String {
    std::env::var("PGDIR").unwrap()
}

fn pg_ctl(args: &str) {
    let d = pgdir();
    let cmd = format!(
        "runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D {d}/data -l {d}/log -o '-p {} -k {d} -c listen_addresses=127.0.0.1 -c ssl=on' -w {args}",
        port()
    );
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

fn upstream_cfg(
    url: &str,
    pool_size: u32,
    checkout_ms: u64,
    tls: ServerTlsMode,
    ca: bool,
) -> UpstreamConfig {
    let toml = format!(
        r#"kind = "shared"
url = "{url}"
pool_size = {pool_size}
checkout_timeout = "{checkout_ms}ms"
connect_timeout = "2s"
tls = "{}"
{}"#,
        match tls {
            ServerTlsMode::Disable => "disable",
            ServerTlsMode::Prefer => "prefer",
            ServerTlsMode::Require => "require",
        },
        if ca {
            format!("tls_ca_file = \"{}/ca.crt\"", pgdir())
        } else {
            String::new()
        }
    );
    toml::from_str(&toml).unwrap()
}

fn pools(url: &str, pool_size: u32, checkout_ms: u64) -> Pools {
    pools_with(url, pool_size, checkout_ms, "")
}

fn pools_with(url: &str, pool_size: u32, checkout_ms: u64, extra: &str) -> Pools {
    let text = format!(
        r#"
[listen]
[jwt]
secret = "0123456789abcdef0123456789abcdef"
[upstreams.main]
kind = "shared"
url = "{url}"
pool_size = {pool_size}
checkout_timeout = "{checkout_ms}ms"
connect_timeout = "2s"
{extra}
"#
    );
    let cfg = Config::parse(&text).unwrap();
    cfg.validate().unwrap();
    Pools::from_config(&cfg).unwrap()
}

async fn connect(url: &str, tls: ServerTlsMode, ca: bool) -> Result<ServerConn, ServerError> {
    let cfg = upstream_cfg(url, 1, 1000, tls, ca);
    let t = UpstreamTarget::from_url(url).unwrap();
    ServerConn::connect(
        "t".into(),
        &t,
        &ServerTls::from_config(&cfg).unwrap(),
        Duration::from_secs(3),
    )
    .await
}

/// Runs a query and returns the first column of the first row (raw, test-only reader).
async fn query_one(conn: &mut ServerConn, sql: &str) -> Option<String> {
    let mut out = BytesMut::new();
    frontend::query(sql, &mut out).unwrap();
    conn.stream.write_all(&out).await.unwrap();
    conn.stream.flush().await.unwrap();
    let mut value = None;
    loop {
        match Message::parse(&mut conn.read_buf).unwrap() {
            Some(Message::DataRow(row)) if value.is_none() => {
                let mut ranges = fallible(&row);
                value = ranges.remove(0);
            }
            Some(Message::ErrorResponse(_)) => panic!("error for {sql}"),
            Some(Message::ReadyForQuery(b)) => {
                conn.tx_status = b.status();
                return value;
            }
            Some(_) => {}
            None => {
                let n = conn.stream.read_buf(&mut conn.read_buf).await.unwrap();
                assert!(n > 0, "eof");
            }
        }
    }
}

fn fallible(row: &postgres_protocol::message::backend::DataRowBody) -> Vec<Option<String>> {
    // DataRowRanges is a FallibleIterator; walk the buffer by hand instead.
    let buf = row.buffer();
    let mut out = vec![];
    let mut i = 0;
    while i + 4 <= buf.len() {
        let len = i32::from_be_bytes(buf[i..i + 4].try_into().unwrap());
        i += 4;
        if len < 0 {
            out.push(None);
        } else {
            out.push(Some(
                String::from_utf8_lossy(&buf[i..i + len as usize]).into_owned(),
            ));
            i += len as usize;
        }
    }
    out
}

fn url(user: &str, pw: &str) -> String {
    format!("postgres://{user}:{pw}@127.0.0.1:{}/app", port())
}

/// TCP forwarder. Connections accepted before `arm()` are closed as soon as the client
/// sends anything (they looked alive while idle); later ones work.
struct Fwd {
    port: u16,
    accepted: Arc<AtomicU64>,
    kill_below: Arc<AtomicU64>,
}
impl Fwd {
    fn arm(&self) {
        self.kill_below
            .store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}
async fn forwarder(target: u16) -> Fwd {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let kill_below = Arc::new(AtomicU64::new(0));
    let (acc, kb) = (accepted.clone(), kill_below.clone());
    tokio::spawn(async move {
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let seq = acc.fetch_add(1, Ordering::SeqCst);
            let kb = kb.clone();
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(("127.0.0.1", target))
                    .await
                    .unwrap();
                let (mut cr, mut cw) = c.split();
                let (mut sr, mut sw) = s.split();
                let up = async {
                    let mut b = [0u8; 8192];
                    loop {
                        let n = cr.read(&mut b).await.unwrap_or(0);
                        if n == 0 || seq < kb.load(Ordering::SeqCst) {
                            return;
                        }
                        sw.write_all(&b[..n]).await.unwrap();
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    Fwd {
        port,
        accepted,
        kill_below,
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter("pgtenant=debug")
        .init();
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();

    // --- logins
    for (user, pw) in [
        ("scram_user", "scram-pw"),
        ("md5_user", "md5-pw"),
        ("clear_user", "clear-pw"),
    ] {
        let mut c = connect(&url(user, pw), ServerTlsMode::Disable, false)
            .await
            .unwrap();
        assert!(c.backend_pid > 0 && c.backend_secret != 0);
        assert_eq!(
            c.params.get("application_name").map(String::as_str),
            Some("pgtenant")
        );
        assert!(c.params.contains_key("server_version"));
        assert_eq!(
            query_one(&mut c, "select current_user").await.as_deref(),
            Some(user)
        );
        println!(
            "OK login {user}: pid {} params {}",
            c.backend_pid,
            c.params.len()
        );
    }
    for (user, bad) in [
        ("scram_user", "WRONG-secret-1"),
        ("md5_user", "WRONG-secret-2"),
        ("clear_user", "WRONG-secret-3"),
    ] {
        let e = connect(&url(user, bad), ServerTlsMode::Disable, false)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ServerError::AuthFailed(_)), "{e:?}");
        assert!(text.contains("28P01") && !text.contains("WRONG"), "{text}");
        println!("OK wrong password {user}: {text}");
    }
    let e = connect(
        &format!("postgres://scram_user:scram-pw@127.0.0.1:{}/nodb", port()),
        ServerTlsMode::Disable,
        false,
    )
    .await
    .unwrap_err();
    println!("OK unknown database: {e}");

    // --- TLS
    for (mode, ca) in [
        (ServerTlsMode::Require, true),
        (ServerTlsMode::Require, false),
        (ServerTlsMode::Prefer, false),
    ] {
        let mut c = connect(&url("scram_user", "scram-pw"), mode, ca)
            .await
            .unwrap();
        assert!(matches!(c.stream, ServerStream::Tls(_)));
        assert_eq!(
            query_one(
                &mut c,
                "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()"
            )
            .await
            .as_deref(),
            Some("true")
        );
        println!("OK TLS {mode:?} ca={ca} (SCRAM-SHA-256 while PLUS offered)");
    }
    // Host name verified against the certificate's SANs; unknown CA refused.
    let c = connect(
        &format!("postgres://scram_user:scram-pw@localhost:{}/app", port()),
        ServerTlsMode::Require,
        true,
    )
    .await
    .unwrap();
    assert!(matches!(c.stream, ServerStream::Tls(_)));
    drop(c);
    let other = {
        let mut cfg = upstream_cfg(
            &url("scram_user", "scram-pw"),
            1,
            1000,
            ServerTlsMode::Require,
            false,
        );
        cfg.tls_ca_file = Some(format!("{}/other-ca.crt", pgdir()).into());
        ServerTls::from_config(&cfg).unwrap()
    };
    let t = UpstreamTarget::from_url(&url("scram_user", "scram-pw")).unwrap();
    let e = ServerConn::connect("t".into(), &t, &other, Duration::from_secs(3))
        .await
        .unwrap_err();
    assert!(matches!(e, ServerError::Tls(_)), "{e:?}");
    println!("OK TLS with a CA that did not sign the server cert → {e}");
    let mut cfg = upstream_cfg(
        &url("scram_user", "scram-pw"),
        1,
        1000,
        ServerTlsMode::Require,
        false,
    );
    cfg.tls_ca_file = Some("/nonexistent/ca.pem".into());
    println!(
        "OK missing CA file → {}",
        ServerTls::from_config(&cfg).err().unwrap()
    );

    // --- apply_settings, errors, reset
    let mut c = connect(
        &url("scram_user", "scram-pw"),
        ServerTlsMode::Disable,
        false,
    )
    .await
    .unwrap();
    let pid = c.backend_pid;
    c.apply_settings(&[
        ("app.current_tenant_id", "acme'; drop table x; --"),
        ("application_name", "tenant-app"),
    ])
    .await
    .unwrap();
    assert_eq!(c.params["application_name"], "tenant-app");
    assert_eq!(
        query_one(&mut c, "select current_setting('app.current_tenant_id')")
            .await
            .as_deref(),
        Some("acme'; drop table x; --")
    );
    println!(
        "OK apply_settings sets app.current_tenant_id + application_name (ParameterStatus tracked)"
    );

    let e = c
        .apply_settings(&[("nodot_bad_setting", "1")])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ServerError::Db { code, .. } if code == "42704"),
        "{e:?}"
    );
    assert!(!c.broken && c.tx_status == b'I');
    assert_eq!(query_one(&mut c, "select 7").await.as_deref(), Some("7"));
    println!("OK setting error → {e}; connection still usable");

    let e = c.simple_query("select 1/0").await.unwrap_err();
    println!("OK simple_query error → {e}");
    c.simple_query("BEGIN; CREATE TEMP TABLE tt(x int); PREPARE p AS SELECT 1")
        .await
        .unwrap();
    assert_eq!(c.tx_status, b'T');
    c.reset().await.unwrap();
    assert_eq!(c.tx_status, b'I');
    assert_eq!(
        query_one(
            &mut c,
            "select current_setting('app.current_tenant_id', true)"
        )
        .await
        .as_deref(),
        Some("")
    );
    assert_eq!(
        query_one(&mut c, "select count(*) from pg_prepared_statements")
            .await
            .as_deref(),
        Some("0")
    );
    c.simple_query("BEGIN").await.unwrap();
    let _ = c.simple_query("select 1/0").await;
    assert_eq!(c.tx_status, b'E');
    c.reset().await.unwrap();
    assert_eq!(c.tx_status, b'I');
    assert_eq!(c.backend_pid, pid);
    println!("OK reset after BEGIN (T) and failed tx (E) → I; tenant setting cleared; prepared statements gone");
    // COPY FROM STDIN through simple_query is failed, not hung.
    let e = c.simple_query("COPY (select 1) TO STDOUT").await;
    assert!(e.is_ok());
    c.simple_query("CREATE TEMP TABLE ci(x int)").await.unwrap();
    let e = c.simple_query("COPY ci FROM STDIN").await.unwrap_err();
    assert!(!c.broken);
    println!("OK COPY FROM STDIN in simple_query → {e}");

    // --- bind parameters: the value is not in pg_stat_activity
    let mut spy = connect(
        &url("scram_user", "scram-pw"),
        ServerTlsMode::Disable,
        false,
    )
    .await
    .unwrap();
    c.apply_settings(&[("app.current_tenant_id", "secret-tenant-42")])
        .await
        .unwrap();
    let seen = query_one(
        &mut spy,
        &format!("select query from pg_stat_activity where pid = {pid}"),
    )
    .await
    .unwrap();
    assert!(
        seen.contains("set_config($1,$2,false)") && !seen.contains("secret-tenant-42"),
        "{seen}"
    );
    println!("OK pg_stat_activity shows: {seen}");

    // --- pool: exhausted
    let p = pools(&url("scram_user", "scram-pw"), 1, 800);
    let held = p.checkout("main").await.unwrap();
    let t = Instant::now();
    let p2 = &p;
    let (e, stats) = tokio::join!(p2.checkout("main"), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        p2.stats()
    });
    let e = e.unwrap_err();
    assert!(
        matches!(e, PoolError::Exhausted { waited_ms, .. } if waited_ms >= 790),
        "{e:?}"
    );
    assert_eq!(stats[0].pending_waiters, 1);
    assert_eq!((stats[0].connections, stats[0].idle), (1, 0));
    println!(
        "OK exhausted after {:?}: {e}; stats during wait {:?}",
        t.elapsed(),
        stats[0]
    );
    drop(held);
    assert!(matches!(
        p.checkout("nope").await,
        Err(PoolError::UnknownUpstream(_))
    ));
    // Dirty connection (in transaction) is destroyed at check-in, clean one reused.
    let mut a = p.checkout("main").await.unwrap();
    let pid_a = a.backend_pid;
    a.simple_query("BEGIN").await.unwrap();
    drop(a);
    let mut b = p.checkout("main").await.unwrap();
    assert_ne!(b.backend_pid, pid_a);
    assert_eq!(query_one(&mut b, "select 1").await.as_deref(), Some("1"));
    let pid_b = b.backend_pid;
    b.reset().await.unwrap();
    drop(b);
    let b = p.checkout("main").await.unwrap();
    assert_eq!(b.backend_pid, pid_b);
    drop(b);
    println!("OK in-transaction conn destroyed at check-in; reset conn reused");

    // --- unreachable: fail fast
    let bad = pools(
        "postgres://scram_user:VERY-SECRET-PW@127.0.0.1:1/app",
        2,
        5000,
    );
    let t = Instant::now();
    let e = bad.checkout("main").await.unwrap_err();
    let el = t.elapsed();
    assert!(
        matches!(e, PoolError::Unreachable { .. }) && el < Duration::from_millis(500),
        "{e:?} {el:?}"
    );
    assert!(!e.to_string().contains("VERY-SECRET"));
    let t2 = Instant::now();
    let e2 = bad.checkout("main").await.unwrap_err();
    println!(
        "OK unreachable in {el:?}: {e}; again (backoff) in {:?}",
        t2.elapsed()
    );
    let _ = e2;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _ = bad.checkout("main").await.unwrap_err();
    // Auth failure through the pool is also fast.
    let badpw = pools(
        "postgres://scram_user:WRONG-PW-XYZ@127.0.0.1:55432/app",
        2,
        5000,
    );
    let t = Instant::now();
    let e = badpw.checkout("main").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(500) && !e.to_string().contains("WRONG-PW"),
        "{e}"
    );
    println!("OK bad password through the pool in {:?}: {e}", t.elapsed());
    let rendered = recorder.render();
    let line: Vec<_> = rendered
        .lines()
        .filter(|l| l.starts_with("pgtenant_upstream_connect_errors_total"))
        .collect();
    println!("OK metric: {line:?}");

    // --- restart while idle in the pool
    let p = pools(&url("scram_user", "scram-pw"), 2, 3000);
    let c1 = p
        .checkout_ready("main", &[("app.current_tenant_id", "t1")])
        .await
        .unwrap();
    let old_pid = c1.backend_pid;
    drop(c1); // (not reset: setting stays, still clean I status)
    pg_ctl("stop -m fast");
    let t = Instant::now();
    let e = p
        .checkout_ready("main", &[("app.current_tenant_id", "t1")])
        .await
        .unwrap_err();
    println!(
        "OK while down: {e} after {:?}; stats {:?}",
        t.elapsed(),
        p.stats()
    );
    pg_ctl("start");
    tokio::time::sleep(RECOVER_WAIT).await;
    let mut c2 = p
        .checkout_ready("main", &[("app.current_tenant_id", "t2")])
        .await
        .unwrap();
    assert_ne!(c2.backend_pid, old_pid);
    assert_eq!(
        query_one(&mut c2, "select current_setting('app.current_tenant_id')")
            .await
            .as_deref(),
        Some("t2")
    );
    c2.reset().await.unwrap();
    drop(c2);
    println!("OK after restart: new session works at once");

    // Restart with the idle conn never touched while down (stop+start, then checkout).
    let c3 = p.checkout("main").await.unwrap();
    let pid3 = c3.backend_pid;
    drop(c3);
    pg_ctl("stop -m immediate");
    pg_ctl("start");
    let t = Instant::now();
    let mut c4 = p
        .checkout_ready("main", &[("app.current_tenant_id", "t4")])
        .await
        .unwrap();
    assert_ne!(c4.backend_pid, pid3);
    assert_eq!(query_one(&mut c4, "select 1").await.as_deref(), Some("1"));
    println!(
        "OK immediate crash + start: checkout_ready succeeded in {:?} (dead idle conn skipped)",
        t.elapsed()
    );
    drop(c4);

    // --- TLS pool: idle check does not misfire on TLS; restart detected on TLS too
    let p = pools_with(
        &url("scram_user", "scram-pw"),
        2,
        3000,
        &format!("tls = \"require\"\ntls_ca_file = \"{}/ca.crt\"", pgdir()),
    );
    let mut a = p
        .checkout_ready("main", &[("app.current_tenant_id", "tls1")])
        .await
        .unwrap();
    assert!(matches!(a.stream, ServerStream::Tls(_)));
    let tpid = a.backend_pid;
    assert_eq!(
        query_one(&mut a, "select current_setting('app.current_tenant_id')")
            .await
            .as_deref(),
        Some("tls1")
    );
    a.reset().await.unwrap();
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let a = p.checkout("main").await.unwrap();
    assert_eq!(a.backend_pid, tpid, "healthy idle TLS conn must be reused");
    drop(a);
    pg_ctl("restart -m fast");
    let mut a = p
        .checkout_ready("main", &[("app.current_tenant_id", "tls2")])
        .await
        .unwrap();
    assert_ne!(a.backend_pid, tpid);
    assert_eq!(
        query_one(&mut a, "select current_setting('app.current_tenant_id')")
            .await
            .as_deref(),
        Some("tls2")
    );
    drop(a);
    println!("OK TLS pool: idle conn reused; after restart replaced transparently");

    // --- slow upstream (accepts TCP, never answers)
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sport = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = vec![];
        loop {
            let (c, _) = silent.accept().await.unwrap();
            held.push(c);
        }
    });
    let p = pools(&format!("postgres://u:pw@127.0.0.1:{sport}/app"), 2, 800);
    let t = Instant::now();
    let e = p.checkout("main").await.unwrap_err();
    println!(
        "OK silent upstream, checkout 800ms < connect 2s → {e} after {:?}",
        t.elapsed()
    );
    let p = pools(&format!("postgres://u:pw@127.0.0.1:{sport}/app"), 2, 5000);
    let t = Instant::now();
    let e = p.checkout("main").await.unwrap_err();
    assert!(
        matches!(e, PoolError::Unreachable { .. }) && t.elapsed() < Duration::from_millis(2500)
    );
    println!(
        "OK silent upstream, connect 2s < checkout 5s → {e} after {:?}",
        t.elapsed()
    );

    // --- checkout_ready retry: connections look alive while idle but die on first write.
    let fwd = forwarder(port()).await;
    let p = pools(
        &format!("postgres://scram_user:scram-pw@127.0.0.1:{}/app", fwd.port),
        3,
        3000,
    );
    let a = p
        .checkout_ready("main", &[("app.current_tenant_id", "x")])
        .await
        .unwrap();
    drop(a);
    fwd.arm();
    let mut raw = p.checkout("main").await.unwrap();
    let e = raw
        .apply_settings(&[("app.current_tenant_id", "y")])
        .await
        .unwrap_err();
    assert!(raw.broken);
    println!("OK dead-on-use pooled conn (plain checkout): apply_settings → {e}");
    drop(raw);
    // Two idle connections in the pool, both doomed.
    let a = p.checkout("main").await.unwrap();
    let b = p.checkout("main").await.unwrap();
    let (pa, pb) = (a.backend_pid, b.backend_pid);
    drop(a);
    drop(b);
    assert_eq!(p.stats()[0].idle, 2);
    fwd.arm();
    let t = Instant::now();
    let mut c = p
        .checkout_ready("main", &[("app.current_tenant_id", "z")])
        .await
        .unwrap();
    assert!(c.backend_pid != pa && c.backend_pid != pb);
    assert_eq!(
        query_one(&mut c, "select current_setting('app.current_tenant_id')")
            .await
            .as_deref(),
        Some("z")
    );
    println!(
        "OK checkout_ready skipped 2 dead-on-use conns in {:?}; stats {:?}",
        t.elapsed(),
        p.stats()
    );
    drop(c);
    // Three doomed → gives up with Unreachable.
    let conns = [
        p.checkout("main").await.unwrap(),
        p.checkout("main").await.unwrap(),
        p.checkout("main").await.unwrap(),
    ];
    drop(conns);
    fwd.arm();
    let e = p
        .checkout_ready("main", &[("app.current_tenant_id", "z")])
        .await
        .unwrap_err();
    println!("OK 3 dead conns → {e}");
    println!("ALL OK");
}

const RECOVER_WAIT: Duration = Duration::from_millis(600);
