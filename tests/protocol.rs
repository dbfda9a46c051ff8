//! Wire-protocol features through the relay, driven by a raw socket where real clients
//! can't express them: FunctionCall, notices and notifications, GSSENC refusal, PG17 direct
//! TLS, the pre-auth deadline; plus the pool's md5 and cleartext server logins and pgbench
//! on a shared upstream.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw;
use pgtenant::config::{UpstreamConfig, UpstreamKind};
use pgtenant::demo::data;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a simple query and collects (tag, body) messages up to ReadyForQuery.
async fn query(s: &mut TcpStream, sql: &str) -> Vec<(u8, Vec<u8>)> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    s.write_all(&raw::frame(b'Q', &body)).await.unwrap();
    let mut out = Vec::new();
    loop {
        let m = raw::read_message(s)
            .await
            .expect("message before ReadyForQuery");
        let done = m.0 == b'Z';
        out.push(m);
        if done {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_call_is_relayed() {
    let proxy = common::start_proxy(|_| {}).await;
    let mut s = raw::login(proxy.addr, &common::token("acme", "a")).await;
    // FunctionCall pg_backend_pid() (oid 2026), no arguments, text result.
    let mut body = 2026u32.to_be_bytes().to_vec();
    body.extend_from_slice(&0u16.to_be_bytes()); // argument formats
    body.extend_from_slice(&0u16.to_be_bytes()); // arguments
    body.extend_from_slice(&0u16.to_be_bytes()); // result format: text
    s.write_all(&raw::frame(b'F', &body)).await.unwrap();
    let (tag, result) = raw::read_message(&mut s).await.unwrap();
    assert_eq!(tag, b'V', "FunctionCallResponse expected");
    let len = i32::from_be_bytes(result[..4].try_into().unwrap());
    let pid: i32 = String::from_utf8_lossy(&result[4..4 + len as usize])
        .parse()
        .unwrap();
    assert!(pid > 0);
    assert_eq!(raw::read_message(&mut s).await.unwrap().0, b'Z');
    // The session goes on.
    let msgs = query(&mut s, "SELECT pg_backend_pid()").await;
    let row = msgs.iter().find(|m| m.0 == b'D').unwrap();
    assert_eq!(String::from_utf8_lossy(&row.1[6..]), pid.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_and_notifications_are_relayed() {
    let proxy = common::start_proxy(|_| {}).await;
    let mut listener = raw::login(proxy.addr, &common::token("techstart", "l")).await;
    let notice = query(
        &mut listener,
        "DO $$ BEGIN RAISE NOTICE 'hello from techstart'; END $$",
    )
    .await;
    let n = notice.iter().find(|m| m.0 == b'N').expect("NoticeResponse");
    assert!(String::from_utf8_lossy(&n.1).contains("hello from techstart"));

    query(&mut listener, "LISTEN tenant_events").await;
    let notifier = common::connect(proxy.addr, "techstart").await;
    notifier
        .simple_query("NOTIFY tenant_events, 'payload-42'")
        .await
        .unwrap();
    let (tag, body) = raw::read_message(&mut listener)
        .await
        .expect("notification");
    assert_eq!(tag, b'A');
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("tenant_events") && text.contains("payload-42"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gssenc_is_refused_and_startup_continues() {
    let proxy = common::start_proxy(|_| {}).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut gss = 8u32.to_be_bytes().to_vec();
    gss.extend_from_slice(&80_877_104u32.to_be_bytes());
    s.write_all(&gss).await.unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'N');
    s.write_all(&raw::startup_packet(
        3,
        0,
        &[("user", "u"), ("database", "d")],
    ))
    .await
    .unwrap();
    assert_eq!(raw::read_message(&mut s).await.unwrap().0, b'R');
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_works() {
    pgtenant::tls::install_crypto_provider();
    let proxy = common::start_proxy(|_| {}).await;
    let pem = std::fs::read(&common::env().demo.tls_cert).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // No SSLRequest: the TLS ClientHello is the first byte (PostgreSQL 17 sslnegotiation=direct).
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("direct TLS handshake");
    tls.write_all(&raw::startup_packet(
        3,
        0,
        &[("user", "u"), ("database", "d")],
    ))
    .await
    .unwrap();
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R');
    assert_eq!(
        &head[5..9],
        &3i32.to_be_bytes(),
        "cleartext password request over TLS"
    );
    let mut pw = common::token("globex", "g").into_bytes();
    pw.push(0);
    tls.write_all(&raw::frame(b'p', &pw)).await.unwrap();
    tls.write_all(&raw::frame(b'Q', b"SELECT count(*) FROM customers\0"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("SELECT 1") && Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    let expected = data::shared("globex").unwrap().customers.len().to_string();
    assert!(String::from_utf8_lossy(&seen).contains(&expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_at_the_pre_auth_deadline() {
    let proxy = common::start_proxy(|c| c.limits.auth_timeout = Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed by the deadline");
    assert_eq!(n.unwrap_or(0), 0);
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Half a handshake is cut off too: startup sent, password never.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&raw::startup_packet(
        3,
        0,
        &[("user", "u"), ("database", "d")],
    ))
    .await
    .unwrap();
    assert_eq!(raw::read_message(&mut s).await.unwrap().0, b'R');
    assert!(
        raw::read_message(&mut s).await.is_none(),
        "closed without a password"
    );
}

/// The pool logs in to PostgreSQL with md5 and with cleartext passwords as well as SCRAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_logs_in_with_md5_and_cleartext() {
    let env = common::env();
    let proxy = common::start_proxy(|c| {
        let base = c.upstreams["shared"].clone();
        for role in [data::MD5_ROLE, data::CLEARTEXT_ROLE] {
            let pw = env.demo.logins[role].clone();
            let up = UpstreamConfig {
                url: env.pg.tcp_url(role, &pw, data::SHARED_DATABASE),
                kind: UpstreamKind::Shared,
                ..base.clone()
            };
            c.upstreams.insert(role.to_string(), up);
        }
        c.tenants
            .map
            .insert("medcorp".into(), data::MD5_ROLE.into());
        c.tenants
            .map
            .insert("globex".into(), data::CLEARTEXT_ROLE.into());
    })
    .await;
    for (tenant, role) in [
        ("medcorp", data::MD5_ROLE),
        ("globex", data::CLEARTEXT_ROLE),
    ] {
        let client = common::connect(proxy.addr, tenant).await;
        let row = client
            .query_one("SELECT current_user, count(*) FROM customers", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), role);
        assert_eq!(
            row.get::<_, i64>(1),
            data::shared(tenant).unwrap().customers.len() as i64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_on_a_shared_upstream() {
    let env = common::env();
    let proxy = common::start_proxy(|_| {}).await;
    let token = common::token("initech", "peter");
    for protocol in ["simple", "extended", "prepared"] {
        let out = tokio::process::Command::new(env.pg.pgbench_path())
            .args([
                "-n", "-S", "-M", protocol, "-c", "4", "-j", "2", "-t", "200",
            ])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.addr.port().to_string(),
                "-U",
                "app",
                "saas",
            ])
            .env("PGPASSWORD", &token)
            .output()
            .await
            .unwrap();
        let text = format!("{}{}", common::stdout(&out), common::stderr(&out));
        assert!(out.status.success(), "pgbench -M {protocol}: {text}");
        assert!(
            text.contains("number of transactions actually processed: 800/800"),
            "{text}"
        );
    }
}
