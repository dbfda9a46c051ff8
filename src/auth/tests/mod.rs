//! Unit tests for JWT verification. Helpers here build tokens by hand (any header, any
//! payload) so every rejection path can be reached; the suites are split by topic.

mod issue;
mod jwks_url;
mod keys;
mod rules;

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{get_current_timestamp, Algorithm, EncodingKey};
use serde_json::{json, Value};

use super::{AuthError, JwtVerifier};
use crate::config::JwtConfig;

/// A 40-byte test secret; long and distinctive so leak checks can search for it.
pub(super) const SECRET: &str = "test-secret-0123456789-abcdefghij-KLMNOP";

pub(super) fn now() -> u64 {
    get_current_timestamp()
}

/// The config for an HS256 verifier with defaults as in `config.rs`.
pub(super) fn hs_cfg() -> JwtConfig {
    JwtConfig {
        algorithms: vec!["HS256".into()],
        secret: Some(SECRET.into()),
        secret_file: None,
        public_key_file: None,
        jwks_file: None,
        issuer: None,
        audience: None,
        tenant_claim: "tenant_id".into(),
        user_claim: "sub".into(),
        leeway_secs: 30,
        tenant_pattern: JwtConfig::default_tenant_pattern(),
        jwks_url: None,
        jwks_refresh_interval: JwtConfig::default_jwks_refresh(),
        jwks_max_staleness: JwtConfig::default_jwks_staleness(),
        jwks_fetch_timeout: JwtConfig::default_jwks_timeout(),
        jwks_min_refetch_interval: JwtConfig::default_jwks_miss(),
        jwks_allow_http: false,
        jwks_ca_file: None,
        session_max_lifetime: None,
    }
}

/// The same config with the key source replaced by a public key or JWKS file.
pub(super) fn file_cfg(algorithms: &[&str], pem: Option<&Path>, jwks: Option<&Path>) -> JwtConfig {
    JwtConfig {
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        secret: None,
        public_key_file: pem.map(Path::to_path_buf),
        jwks_file: jwks.map(Path::to_path_buf),
        ..hs_cfg()
    }
}

pub(super) fn verifier(cfg: &JwtConfig) -> JwtVerifier {
    JwtVerifier::from_config(cfg).unwrap()
}

/// Claims that pass every check of `hs_cfg()`.
pub(super) fn good_claims() -> Value {
    let now = now();
    json!({"tenant_id": "acme", "sub": "alice", "iat": now, "exp": now + 300})
}

/// `good_claims()` with members added or replaced.
pub(super) fn claims_with(changes: Value) -> Value {
    let mut claims = good_claims();
    for (k, v) in changes.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

pub(super) fn claims_without(name: &str) -> Value {
    let mut claims = good_claims();
    claims.as_object_mut().unwrap().remove(name);
    claims
}

pub(super) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs raw header and payload text, so tests can send JSON that no serializer would.
pub(super) fn sign_raw(header: &str, payload: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{sig}")
}

/// Signs `claims` under `header` (which must name the `alg`).
pub(super) fn sign(header: &Value, claims: &Value, key: &EncodingKey) -> String {
    let alg: Algorithm = serde_json::from_value(header["alg"].clone()).unwrap();
    sign_raw(&header.to_string(), &claims.to_string(), key, alg)
}

/// An HS256 token with the test secret.
pub(super) fn hs(claims: &Value) -> String {
    sign(
        &json!({"alg": "HS256", "typ": "JWT"}),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// Asserts a verification failure of the expected kind and SQLSTATE class, and that its
/// message leaks neither the token nor the secret.
#[track_caller]
pub(super) fn assert_rejected(
    v: &JwtVerifier,
    token: &str,
    expected: &str,
    invalid_token: bool,
) -> AuthError {
    let err = v.verify(token).expect_err("token should be rejected");
    assert_eq!(err.reason(), expected, "wrong reason for error: {err}");
    assert_eq!(
        err.is_invalid_token(),
        invalid_token,
        "wrong SQLSTATE class for: {err}"
    );
    assert_no_leak(&err.to_string(), token);
    err
}

/// The message contains neither the secret nor any sizable piece of the token.
#[track_caller]
pub(super) fn assert_no_leak(message: &str, token: &str) {
    assert!(!message.contains(SECRET), "secret leaked: {message}");
    if !token.is_empty() {
        assert!(!message.contains(token), "token leaked: {message}");
    }
    for part in token.split('.').filter(|p| p.len() >= 8) {
        assert!(!message.contains(part), "token part leaked: {message}");
    }
}

/// Writes `contents` to a fresh temp file that lives as long as the returned handle.
pub(super) fn temp_file(contents: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(contents).unwrap();
    f.flush().unwrap();
    f
}

/// PEM-armours DER bytes under `label`, 64 columns as OpenSSL writes it.
pub(super) fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}
