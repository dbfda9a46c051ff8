//! `jwks_url`: keys served by a tiny HTTP server on loopback whose document the test can
//! change and whose requests it counts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::EncodingKey;
use rcgen::PKCS_ECDSA_P256_SHA256;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::keys::{ec_jwk, ec_pair, rsa_pair};
use super::*;
use crate::error::ClientError;

/// What the server does with the next request.
#[derive(Clone)]
enum Reply {
    Json(String),
    Status(u16),
    /// Accept, read the request, never answer.
    Hang,
}

/// A one-path HTTP/1.1 server: every request gets the current `Reply`; `hits` counts them.
struct JwksServer {
    url: String,
    reply: Arc<Mutex<Reply>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(reply: Reply) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let reply = Arc::new(Mutex::new(reply));
        let hits = Arc::new(AtomicUsize::new(0));
        let (r, h) = (reply.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (r, h) = (r.clone(), h.clone());
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
                    let reply = r.lock().unwrap().clone();
                    let response = match reply {
                        Reply::Json(body) => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        Reply::Status(code) => format!(
                            "HTTP/1.1 {code} Nope\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        ),
                        Reply::Hang => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                    };
                    let _ = s.write_all(response.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        JwksServer { url, reply, hits }
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn doc(keys: &[serde_json::Value]) -> Reply {
    Reply::Json(json!({ "keys": keys }).to_string())
}

fn url_cfg(url: &str, algorithms: &[&str]) -> JwtConfig {
    JwtConfig {
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        secret: None,
        jwks_url: Some(url.into()),
        jwks_fetch_timeout: Duration::from_millis(500),
        ..hs_cfg()
    }
}

async fn started(cfg: &JwtConfig) -> JwtVerifier {
    let v = JwtVerifier::from_config(cfg).unwrap();
    v.start().await.unwrap();
    v
}

fn es256(kid: &str, key: &EncodingKey) -> String {
    sign(&json!({"alg": "ES256", "kid": kid}), &good_claims(), key)
}

#[tokio::test]
async fn served_rs256_and_es256_keys_verify() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let rsa = rsa_pair();
    let comps = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(
        aws_lc_rs::signature::KeyPair::public_key(&rsa.kp),
    );
    let rsa_jwk =
        json!({"kty": "RSA", "kid": "r1", "use": "sig", "n": b64(&comps.n), "e": b64(&comps.e)});
    let server = JwksServer::start(doc(&[ec_jwk(&k1, "e1"), rsa_jwk])).await;
    let v = JwtVerifier::from_config(&url_cfg(&server.url, &["ES256", "RS256"])).unwrap();
    // Not started: no keys yet, and the refusal is the retryable one.
    let token = es256("e1", &e1);
    let err = v.verify(&token).unwrap_err();
    assert_eq!(err.reason(), "jwks_unavailable");
    v.start().await.unwrap();
    v.self_test().unwrap();
    assert_eq!(server.hits(), 1);

    assert_eq!(v.verify(&token).unwrap().kid.as_deref(), Some("e1"));
    let rs = sign(
        &json!({"alg": "RS256", "kid": "r1"}),
        &good_claims(),
        &rsa.enc,
    );
    assert_eq!(v.verify_async(&rs).await.unwrap().tenant.as_str(), "acme");
    // Known kids never fetch.
    assert_eq!(server.hits(), 1);
    // A wrong signature under a known kid is still a bad signature, not a refresh.
    let forged = es256("e1", &rsa_pair_ec_other());
    assert_eq!(
        v.verify_async(&forged).await.unwrap_err().reason(),
        "bad_signature"
    );
    assert_eq!(server.hits(), 1);
}

/// An ES256 signing key unrelated to any served key.
fn rsa_pair_ec_other() -> EncodingKey {
    ec_pair(&PKCS_ECDSA_P256_SHA256).1
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_by_one_kid_miss_fetch() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let (k2, e2, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let server = JwksServer::start(doc(&[ec_jwk(&k1, "k1")])).await;
    let v = started(&url_cfg(&server.url, &["ES256"])).await;
    assert_eq!(server.hits(), 1);

    server.set(doc(&[ec_jwk(&k1, "k1"), ec_jwk(&k2, "k2")]));
    let new = es256("k2", &e2);
    // The sync path never fetches.
    assert_eq!(v.verify(&new).unwrap_err().reason(), "unknown_kid");
    assert_eq!(server.hits(), 1);
    assert_eq!(
        v.verify_async(&new).await.unwrap().kid.as_deref(),
        Some("k2")
    );
    assert_eq!(server.hits(), 2, "one fetch for the miss");
    // Both keys work now without fetching.
    assert!(v.verify(&es256("k1", &e1)).is_ok());
    assert!(v.verify(&new).is_ok());
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn concurrent_misses_share_one_fetch() {
    let (k1, _, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let (k3, e3, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let server = JwksServer::start(doc(&[ec_jwk(&k1, "k1")])).await;
    let v = Arc::new(started(&url_cfg(&server.url, &["ES256"])).await);
    server.set(doc(&[ec_jwk(&k1, "k1"), ec_jwk(&k3, "k3")]));
    let token = Arc::new(es256("k3", &e3));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (v, token) = (v.clone(), token.clone());
            tokio::spawn(async move { v.verify_async(&token).await.map(|id| id.kid) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().as_deref(), Some("k3"));
    }
    assert_eq!(server.hits(), 2, "start + one shared fetch for 50 misses");
}

#[tokio::test]
async fn unknown_kids_fetch_at_most_once_per_interval() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let server = JwksServer::start(doc(&[ec_jwk(&k1, "k1")])).await;
    let v = started(&url_cfg(&server.url, &["ES256"])).await;
    let bogus = es256("nobody", &e1);
    let err = v.verify_async(&bogus).await.unwrap_err();
    assert_eq!(err.reason(), "unknown_kid");
    assert_eq!(ClientError::from(err).to_wire().code, "28P01");
    assert_eq!(server.hits(), 2);
    for other in ["nobody", "someone-else", "nobody"] {
        let err = v.verify_async(&es256(other, &e1)).await.unwrap_err();
        assert_eq!(err.reason(), "unknown_kid");
    }
    assert_eq!(
        server.hits(),
        2,
        "misses within jwks_min_refetch_interval do not fetch"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_cannot_hold_verification() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let server = JwksServer::start(doc(&[ec_jwk(&k1, "k1")])).await;
    let v = started(&url_cfg(&server.url, &["ES256"])).await;
    server.set(Reply::Hang);
    // The miss refresh times out (fetch_timeout 500 ms): the token is refused, not stuck.
    let outcome = tokio::time::timeout(Duration::from_secs(30), v.verify_async(&es256("k2", &e1)))
        .await
        .expect("verify_async returned");
    assert_eq!(outcome.unwrap_err().reason(), "unknown_kid");
    assert_eq!(server.hits(), 2);
    // Known kids are unaffected.
    assert!(v.verify_async(&es256("k1", &e1)).await.is_ok());

    // A first fetch that hangs fails the start with a clear error.
    let hung = JwtVerifier::from_config(&url_cfg(&server.url, &["ES256"])).unwrap();
    let err = hung.start().await.unwrap_err().to_string();
    assert!(
        err.contains("first fetch") && err.contains("timed out"),
        "{err}"
    );
}

#[tokio::test]
async fn cached_keys_serve_until_max_staleness_then_tokens_are_refused() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let server = JwksServer::start(doc(&[ec_jwk(&k1, "k1")])).await;
    let cfg = JwtConfig {
        jwks_refresh_interval: Duration::from_millis(200),
        jwks_max_staleness: Duration::from_millis(1500),
        jwks_min_refetch_interval: Duration::from_millis(200),
        ..url_cfg(&server.url, &["ES256"])
    };
    let v = started(&cfg).await;
    let token = es256("k1", &e1);
    server.set(Reply::Status(503));
    // The issuer is down; the cached key keeps working for now.
    assert!(v.verify_async(&token).await.is_ok());
    // Wait for the background refresh to have failed past max_staleness.
    let mut refused = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Err(e) = v.verify_async(&token).await {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("stale keys are refused eventually");
    assert_eq!(err.reason(), "jwks_unavailable");
    assert!(!err.is_invalid_token());
    let wire = ClientError::from(err).to_wire();
    assert_eq!(wire.code, "57P03", "retryable, not a bad password");
    assert!(wire.message.contains("try again"), "{}", wire.message);
    assert!(server.hits() > 2, "the background task kept retrying");

    // The issuer is back: the next attempt refreshes and the token verifies again.
    server.set(doc(&[ec_jwk(&k1, "k1")]));
    let mut recovered = false;
    for _ in 0..50 {
        if v.verify_async(&token).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered);
}

#[tokio::test]
async fn fetched_documents_get_the_jwks_file_rules() {
    let (k1, _, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let dup = JwksServer::start(doc(&[ec_jwk(&k1, "k1"), ec_jwk(&k1, "k1")])).await;
    let err = JwtVerifier::from_config(&url_cfg(&dup.url, &["ES256"]))
        .unwrap()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("duplicate kid"), "{err}");

    let big = JwksServer::start(Reply::Json(" ".repeat(2 * 1024 * 1024))).await;
    let err = JwtVerifier::from_config(&url_cfg(&big.url, &["ES256"]))
        .unwrap()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("larger than"), "{err}");

    let missing = JwksServer::start(Reply::Status(404)).await;
    let err = JwtVerifier::from_config(&url_cfg(&missing.url, &["ES256"]))
        .unwrap()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("404"), "{err}");

    // One key source only, and http only to loopback.
    let both = JwtConfig {
        secret: Some(SECRET.into()),
        ..url_cfg(&dup.url, &["ES256"])
    };
    assert!(JwtVerifier::from_config(&both).is_err());
    let remote_http = url_cfg("http://idp.example.com/jwks", &["ES256"]);
    let err = JwtVerifier::from_config(&remote_http)
        .unwrap_err()
        .to_string();
    assert!(err.contains("https"), "{err}");
}

#[tokio::test]
async fn a_reload_with_the_same_url_keeps_the_fetched_keys() {
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let server = JwksServer::start(doc(&[ec_jwk(&k1, "k1")])).await;
    let cfg = url_cfg(&server.url, &["ES256"]);
    let first = started(&cfg).await;
    let same = JwtVerifier::from_config_reusing(&cfg, Some(&first)).unwrap();
    same.start().await.unwrap();
    assert!(same.verify(&es256("k1", &e1)).is_ok());
    assert_eq!(server.hits(), 1, "kept source: no new fetch");

    let changed = JwtConfig {
        jwks_fetch_timeout: Duration::from_secs(1),
        ..cfg
    };
    let other = JwtVerifier::from_config_reusing(&changed, Some(&first)).unwrap();
    other.start().await.unwrap();
    assert_eq!(server.hits(), 2, "other settings: a source of its own");
}

#[tokio::test]
async fn https_verifies_the_server_against_the_configured_ca() {
    crate::tls::install_crypto_provider();
    let (k1, e1, _) = ec_pair(&PKCS_ECDSA_P256_SHA256);
    let (cert_pem, key_pem) = crate::tls::self_signed(&["localhost"]).unwrap();
    let cert = temp_file(cert_pem.as_bytes());
    let acceptor = {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = json!({ "keys": [ec_jwk(&k1, "k1")] }).to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(response.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let url = format!("https://localhost:{port}/jwks");

    // The built-in web roots do not know this certificate: no keys, no start.
    let err = JwtVerifier::from_config(&url_cfg(&url, &["ES256"]))
        .unwrap()
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS"), "{err}");

    let with_ca = JwtConfig {
        jwks_ca_file: Some(cert.path().to_path_buf()),
        ..url_cfg(&url, &["ES256"])
    };
    let v = started(&with_ca).await;
    assert!(v.verify(&es256("k1", &e1)).is_ok());
}
