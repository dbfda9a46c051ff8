//! `[jwt] jwks_url` end to end: tokens signed with keys served over HTTP on loopback open
//! sessions through the proxy; a rotated key is picked up on the first token that names it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves the current JWKS text to every GET and counts the requests.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let body = Arc::new(Mutex::new(body));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = b.lock().unwrap().clone();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        JwksServer { url, body, hits }
    }

    fn set(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

struct Signer {
    kid: String,
    pair: KeyPair,
}

impl Signer {
    fn new(kid: &str) -> Signer {
        Signer {
            kid: kid.into(),
            pair: KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        }
    }

    fn jwk(&self) -> serde_json::Value {
        let point = self.pair.public_key_raw();
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
               "x": b64(&point[1..33]), "y": b64(&point[33..])})
    }

    fn token(&self, tenant: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({"tenant_id": tenant, "sub": "jwks-user", "iat": now, "exp": now + 600});
        let key = EncodingKey::from_ec_pem(self.pair.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}

fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

fn use_jwks_url(cfg: &mut pgtenant::config::Config, url: &str) {
    cfg.jwt.algorithms = vec!["ES256".into()];
    cfg.jwt.secret = None;
    cfg.jwt.secret_file = None;
    cfg.jwt.jwks_url = Some(url.into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_open_with_keys_from_the_url_and_follow_a_rotation() {
    let k1 = Signer::new("k1");
    let k2 = Signer::new("k2");
    let server = JwksServer::start(jwks(&[&k1])).await;
    let proxy = common::start_proxy(|cfg| use_jwks_url(cfg, &server.url)).await;
    assert_eq!(server.hits(), 1, "fetched once at start");

    let client = common::try_connect(proxy.addr, &k1.token("acme"))
        .await
        .expect("a k1 token opens a session");
    let row = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap();
    assert!(!row.get::<_, String>(0).is_empty());

    // The issuer rotates: k2 is published, and the first k2 token triggers one fetch.
    server.set(jwks(&[&k1, &k2]));
    let rotated = common::try_connect(proxy.addr, &k2.token("acme"))
        .await
        .expect("a k2 token opens a session after one refresh");
    rotated.simple_query("SELECT 1").await.unwrap();
    assert_eq!(server.hits(), 2);

    // psql with a k2 token: no further fetch.
    let out = common::psql(proxy.addr, &k2.token("acme"), "", &["-c", "SELECT 7"]).await;
    assert_eq!(common::stdout(&out), "7", "{}", common::stderr(&out));
    assert_eq!(server.hits(), 2);

    // A kid the issuer never published: refused as a bad password, without another fetch
    // so soon (jwks_min_refetch_interval).
    let stranger = Signer::new("k9");
    let err = common::try_connect(proxy.addr, &stranger.token("acme"))
        .await
        .expect_err("unknown kid");
    assert_eq!(common::sqlstate(&err), "28P01");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert_eq!(
        message.as_deref(),
        Some("token signed with an unknown key id")
    );
    assert_eq!(server.hits(), 2);

    let text = common::proxy_metrics(&proxy).await;
    assert!(
        common::serve::metric(&text, r#"pgtenant_jwks_refreshes_total{result="ok"}"#) >= 2.0,
        "{text}"
    );
    assert!(text.contains("pgtenant_jwks_keys"), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn serve_refuses_to_start_when_the_first_fetch_fails() {
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", dead.local_addr().unwrap());
    drop(dead);
    let cfg = common::config(|cfg| {
        use_jwks_url(cfg, &url);
        cfg.jwt.jwks_fetch_timeout = Duration::from_secs(1);
    });
    let err = match pgtenant::server::spawn(cfg).await {
        Ok(_) => panic!("serve started without keys"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("jwks_url") && err.contains("first fetch"),
        "{err}"
    );
}
