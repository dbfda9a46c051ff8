//! Pool tests against a scripted fake server on loopback (no PostgreSQL needed): startup
//! packet contents, TLS negotiation fallbacks, auth outcomes, settings round trip, idle
//! liveness, and checkout errors.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::{Config, ServerTlsMode, UpstreamConfig};

use crate::protocol::frame::test_frame as msg;

fn auth(code: i32, extra: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(extra);
    msg(b'R', &body)
}

fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

fn error(severity: &str, code: &str, message: &str) -> Vec<u8> {
    msg(
        b'E',
        format!("S{severity}\0V{severity}\0C{code}\0M{message}\0\0").as_bytes(),
    )
}

/// Auth OK + parameters + key data + ReadyForQuery.
fn startup_ok() -> Vec<u8> {
    let mut v = auth(0, &[]);
    v.extend(msg(b'S', b"server_version\x0015.0\0"));
    v.extend(msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
    v.extend(ready(b'I'));
    v
}

/// Reads a length-prefixed untagged packet (startup, SSLRequest).
async fn read_untagged(s: &mut TcpStream) -> Vec<u8> {
    let len = s.read_i32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    body
}

async fn read_tagged(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let tag = s.read_u8().await.unwrap();
    let len = s.read_i32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (tag, body)
}

/// One-connection fake server running `script`; returns its port.
async fn fake<F, Fut>(script: F) -> u16
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        script(s).await;
    });
    port
}

fn target(port: u16) -> UpstreamTarget {
    UpstreamTarget::from_url(&format!("postgres://app:s3cret-pw@127.0.0.1:{port}/db")).unwrap()
}

fn upstream_config(port: u16, tls: ServerTlsMode) -> UpstreamConfig {
    toml::from_str(&format!(
        "kind = \"shared\"\nurl = \"postgres://app:pw@127.0.0.1:{port}/db\"\ntls = \"{}\"",
        format!("{tls:?}").to_lowercase()
    ))
    .unwrap()
}

async fn connect(port: u16, tls: &ServerTls) -> Result<ServerConn, ServerError> {
    ServerConn::connect("up".into(), &target(port), tls, Duration::from_secs(2)).await
}

#[tokio::test]
async fn startup_sends_only_allowed_parameters_and_cleartext_password() {
    let port = fake(|mut s| async move {
        let startup = read_untagged(&mut s).await;
        assert_eq!(&startup[..4], &[0, 3, 0, 0]);
        let text = String::from_utf8_lossy(&startup[4..]).into_owned();
        assert_eq!(
            text,
            "user\0app\0database\0db\0application_name\0pgtenant\0\0"
        );
        s.write_all(&auth(3, &[])).await.unwrap();
        let (tag, body) = read_tagged(&mut s).await;
        assert_eq!((tag, &body[..]), (b'p', &b"s3cret-pw\0"[..]));
        s.write_all(&startup_ok()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let conn = connect(port, &ServerTls::disabled()).await.unwrap();
    assert_eq!((conn.backend_pid, conn.backend_secret), (42, 7));
    assert_eq!(conn.params["server_version"], "15.0");
    assert!(!conn.broken && conn.tx_status == b'I' && conn.read_buf.is_empty());
}

#[tokio::test]
async fn md5_password_is_hashed() {
    let port = fake(|mut s| async move {
        read_untagged(&mut s).await;
        s.write_all(&auth(5, &[1, 2, 3, 4])).await.unwrap();
        let (_, body) = read_tagged(&mut s).await;
        let expected =
            postgres_protocol::authentication::md5_hash(b"app", b"s3cret-pw", [1, 2, 3, 4]);
        assert_eq!(&body[..body.len() - 1], expected.as_bytes());
        s.write_all(&startup_ok()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    connect(port, &ServerTls::disabled()).await.unwrap();
}

#[tokio::test]
async fn auth_failure_carries_server_message_not_password() {
    let port = fake(|mut s| async move {
        read_untagged(&mut s).await;
        s.write_all(&auth(3, &[])).await.unwrap();
        read_tagged(&mut s).await;
        let e = error(
            "FATAL",
            "28P01",
            "password authentication failed for user \"app\"",
        );
        s.write_all(&e).await.unwrap();
    })
    .await;
    let err = connect(port, &ServerTls::disabled()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ServerError::AuthFailed(_)), "{err:?}");
    assert!(text.contains("28P01") && text.contains("password authentication failed"));
    assert!(!text.contains("s3cret"));
}

#[tokio::test]
async fn unsupported_auth_methods_are_named() {
    for (code, extra, name) in [
        (7, &b""[..], "GSSAPI"),
        (10, &b"OAUTHBEARER\0\0"[..], "OAUTHBEARER"),
    ] {
        let port = fake(move |mut s| async move {
            read_untagged(&mut s).await;
            s.write_all(&auth(code, extra)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        })
        .await;
        let err = connect(port, &ServerTls::disabled()).await.unwrap_err();
        assert!(matches!(err, ServerError::UnsupportedAuth(_)), "{err:?}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[tokio::test]
async fn tls_prefer_falls_back_and_require_fails_on_refusal() {
    let script = |mut s: TcpStream| async move {
        let req = read_untagged(&mut s).await;
        assert_eq!(req, 80_877_103i32.to_be_bytes());
        s.write_all(b"N").await.unwrap();
        read_untagged(&mut s).await;
        s.write_all(&startup_ok()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let port = fake(script).await;
    let prefer = ServerTls::from_config(&upstream_config(port, ServerTlsMode::Prefer)).unwrap();
    let conn = connect(port, &prefer).await.unwrap();
    assert!(matches!(conn.stream, ServerStream::Plain(_)));

    let port = fake(script).await;
    let require = ServerTls::from_config(&upstream_config(port, ServerTlsMode::Require)).unwrap();
    let err = connect(port, &require).await.unwrap_err();
    assert!(matches!(err, ServerError::Tls(_)), "{err:?}");
}

#[tokio::test]
async fn connect_timeout_covers_a_silent_server() {
    let port = fake(|s| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(s);
    })
    .await;
    let t = target(port);
    let start = Instant::now();
    let err = ServerConn::connect(
        "up".into(),
        &t,
        &ServerTls::disabled(),
        Duration::from_millis(200),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ServerError::ConnectTimeout), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn settings_travel_as_bind_parameters_and_params_are_tracked() {
    let port = fake(|mut s| async move {
        read_untagged(&mut s).await;
        s.write_all(&startup_ok()).await.unwrap();
        let (tag, parse) = read_tagged(&mut s).await;
        assert_eq!(tag, b'P');
        let parse = String::from_utf8_lossy(&parse).into_owned();
        assert!(parse.contains("set_config($1,$2,false), set_config($3,$4,false)"));
        assert!(!parse.contains("acme"));
        let (tag, bind) = read_tagged(&mut s).await;
        assert_eq!(tag, b'B');
        assert!(String::from_utf8_lossy(&bind).contains("acme"));
        assert_eq!(read_tagged(&mut s).await.0, b'E');
        assert_eq!(read_tagged(&mut s).await.0, b'S');
        let mut reply = msg(b'1', b"");
        reply.extend(msg(b'2', b""));
        reply.extend(msg(b'S', b"application_name\0tenant-app\0"));
        reply.extend(msg(b'D', b"\0\x02\0\0\0\x04acme\0\0\0\x0atenant-app"));
        reply.extend(msg(b'C', b"SELECT 1\0"));
        reply.extend(ready(b'I'));
        s.write_all(&reply).await.unwrap();
        // Second call: the server rejects the setting.
        for _ in 0..4 {
            read_tagged(&mut s).await;
        }
        let mut reply = error("ERROR", "42704", "unrecognized configuration parameter");
        reply.extend(ready(b'I'));
        s.write_all(&reply).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    })
    .await;
    let mut conn = connect(port, &ServerTls::disabled()).await.unwrap();
    conn.apply_settings(&[]).await.unwrap();
    conn.apply_settings(&[
        ("app.current_tenant_id", "acme"),
        ("application_name", "tenant-app"),
    ])
    .await
    .unwrap();
    assert_eq!(conn.params["application_name"], "tenant-app");
    let err = conn.apply_settings(&[("bad", "x")]).await.unwrap_err();
    assert!(
        matches!(&err, ServerError::Db { code, .. } if code == "42704"),
        "{err:?}"
    );
    assert!(
        !conn.broken,
        "a plain ERROR followed by ReadyForQuery leaves the connection usable"
    );
}

#[tokio::test]
async fn idle_check_detects_fatal_and_close() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let port = fake(|mut s| async move {
        read_untagged(&mut s).await;
        s.write_all(&startup_ok()).await.unwrap();
        // Harmless while idle: a notice and a parameter change.
        let mut idle = msg(b'N', b"SNOTICE\0Mhello\0\0");
        idle.extend(msg(b'S', b"TimeZone\0UTC\0"));
        s.write_all(&idle).await.unwrap();
        rx.await.unwrap();
        let e = error(
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        );
        s.write_all(&e).await.unwrap();
    })
    .await;
    let mut conn = connect(port, &ServerTls::disabled()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.check_idle().await.unwrap();
    assert_eq!(conn.params["TimeZone"], "UTC");
    assert!(conn.read_buf.is_empty());
    tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = conn.check_idle().await.unwrap_err();
    assert!(
        matches!(&err, ServerError::Db { code, .. } if code == "57P01"),
        "{err:?}"
    );
    assert!(conn.broken);
}

fn pools_for(port: u16, pool_size: u32, checkout_ms: u64) -> Pools {
    let text = format!(
        "[listen]\n[jwt]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\
         [upstreams.main]\nkind = \"shared\"\nurl = \"postgres://app:s3cret-pw@127.0.0.1:{port}/db\"\n\
         pool_size = {pool_size}\ncheckout_timeout = \"{checkout_ms}ms\"\n"
    );
    Pools::from_config(&Config::parse(&text).unwrap()).unwrap()
}

#[tokio::test]
async fn unreachable_upstream_fails_fast_without_the_password() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let pools = pools_for(port, 2, 5000);
    let start = Instant::now();
    let err = pools.checkout("main").await.unwrap_err();
    assert!(matches!(err, PoolError::Unreachable { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert!(!err.to_string().contains("s3cret"));
    // Within the backoff: refused without a new attempt.
    assert!(matches!(
        pools.checkout("main").await,
        Err(PoolError::Unreachable { .. })
    ));
    assert!(matches!(
        pools.checkout("other").await,
        Err(PoolError::UnknownUpstream(_))
    ));
    assert_eq!(pools.stats()[0].pending_waiters, 0);
}

#[tokio::test]
async fn held_connection_exhausts_a_pool_of_one() {
    let port = fake(|mut s| async move {
        read_untagged(&mut s).await;
        s.write_all(&startup_ok()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let pools = pools_for(port, 1, 300);
    let held = pools.checkout("main").await.unwrap();
    let err = pools.checkout("main").await.unwrap_err();
    assert!(
        matches!(err, PoolError::Exhausted { waited_ms, .. } if waited_ms >= 290),
        "{err:?}"
    );
    let stats = pools.stats();
    assert_eq!((stats[0].connections, stats[0].idle), (1, 0));
    drop(held);
    assert_eq!(pools.stats()[0].idle, 1);
}

#[tokio::test]
async fn dirty_connection_is_destroyed_at_checkin() {
    let port = fake(|mut s| async move {
        read_untagged(&mut s).await;
        s.write_all(&startup_ok()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let pools = pools_for(port, 1, 300);
    let mut conn = pools.checkout("main").await.unwrap();
    conn.tx_status = b'T';
    drop(conn);
    assert_eq!(pools.stats()[0].connections, 0);
}

#[test]
fn futures_and_pools_are_send() {
    fn send<T: Send + Sync>(_: &T) {}
    fn send_fut<T: Send>(_: T) {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let pools = pools_for(1, 1, 100);
    send(&pools);
    send_fut(pools.checkout("main"));
    send_fut(pools.checkout_ready("main", &[("a.b", "c")]));
}
