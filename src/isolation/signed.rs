//! The signed tenant context: a per-backend tenant that the client cannot write
//! (design/isolation.md, "The tenant context the client cannot write").
//!
//! The database side is plain SQL plus pgcrypto ([`sql::install_sql`]): a schema owned by a
//! NOLOGIN role holds HMAC keys and an unlogged table of per-backend context; the pool role
//! may only EXECUTE `enter`, `current_tenant`, `leave` and `backend_identity`. Policies read
//! `(SELECT <schema>.current_tenant())`.
//!
//! The proxy side, per server connection:
//! 1. once: [`SignedContext::identity`] reads (pid, backend start in µs);
//! 2. on every pin: [`SignedContext::enter`] signs
//!    `v1|tenant|pid|backend_start_micros|seq|exp` with the configured key and sends
//!    `SELECT <schema>.enter($1..$5)` with bind parameters (never literals, so no proof is
//!    in `pg_stat_activity`, `pg_stat_statements` or the statement log);
//! 3. on release: ROLLBACK if needed, [`SignedContext::leave`], DISCARD ALL. DISCARD ALL
//!    does NOT clear this context (it is a table row, not a setting).
//!
//! Any error from `enter`/`leave` means the connection must be destroyed, not reused.
//!
//! # Keys
//! The operator creates keys with `pgtenant rls install` / `rotate-key` ([`install`],
//! [`rotate_key`]): 32 random bytes, inserted into `<schema>.context_keys` and shown once
//! (or written to `--key-file` as `<key_id>:<hex>`). The proxy holds the active key in its
//! config ([`SignedContextConfig`]), e.g.
//! ```toml
//! [upstreams.shared.signed_context]
//! schema = "pgtenant"
//! key_id = "k1767225600-3f9a"
//! key = "${PGTENANT_CONTEXT_KEY}"       # 64 hex characters
//! # or: key_file = "/etc/pgtenant/context.key"   # "<key_id>:<hex>", mode 0600
//! ttl = "24h"
//! ```
//! Rotation: `rotate-key` adds a key (the previous one stays valid), switch the proxies to
//! it, and the next `rotate-key --retire-older` (or [`retire_key`]) retires the older ones.
//!
//! # Operational notes
//! - Keep `log_parameter_max_length = 0` and `log_parameter_max_length_on_error = 0` on the
//!   server: otherwise a failing `enter` logs its bind parameters (the MAC, not the key).
//! - Every pin is one write to an unlogged table: one transaction ID per `enter` and per
//!   `leave` (with a tenant set). Read-only workloads now consume XIDs; autovacuum handles
//!   it, but watch `age(datfrozenxid)` at very high pin rates.
//! - Not usable behind a transaction-pooling middlebox (pgbouncer transaction mode)
//!   between pgtenant and PostgreSQL: the context belongs to one server backend.
//! - Not usable on a hot standby (the context table is written).
//! - A snapshot imported with `SET TRANSACTION SNAPSHOT` cannot resurrect an older tenant:
//!   `current_tenant()` accepts only the latest row version (xmax = 0). The flip side: a
//!   client that rolls back its own `leave()`/`enter()` call sees no tenant until the next
//!   pin (fails closed). Revoking `pg_export_snapshot()` from PUBLIC is a further option.
//! - `current_tenant()` returns NULL after `exp`: a session pinned longer than the TTL
//!   sees zero rows unless the proxy calls `enter` again at an idle point.
//! - Policies are permissive and OR-ed: when moving a table to the signed form, drop
//!   the old `current_setting(...)` policies, or `SET` still opens the table.
//! - The key table is in every `pg_dump` of the schema: a leaked key lets any tenant
//!   forge a context. Protect dumps; rotate after restoring a dump elsewhere.
//! - With the default schema name `pgtenant` and a pool role also named `pgtenant`, the
//!   default `search_path` (`"$user", public`) puts this schema first for the pool role:
//!   an application's unqualified `current_tenant()`, `enter()`, `leave()` or a table
//!   named `context_keys` / `backend_context` would resolve here. Use another schema
//!   name in that case.
//! - Cost (PostgreSQL 15, measured by the tests): `enter` about 50 µs of server time
//!   plus one round trip and one XID; `current_tenant()` about 12–25 µs per query (the
//!   backend-status snapshot grows with the number of backends), once per query thanks
//!   to the sub-select in the policy.

mod admin;
mod conn;
pub mod sql;

#[cfg(test)]
mod tests;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use serde::Deserialize;

pub use admin::{
    install, install_on, retire_key, rotate_key, rotate_key_on, InstallReport, NewKey,
};
pub use conn::BackendIdentity;
pub use sql::{enter_sql, identity_sql, install_sql, leave_sql, policy_sql};

/// Smallest accepted key, in bytes.
pub const MIN_KEY_BYTES: usize = 32;
/// Longest context lifetime a [`SignedContext`] accepts.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Version tag at the start of every signed message.
pub const MESSAGE_VERSION: &str = "v1";

/// Why a key could not be used. Messages never contain key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextKeyError {
    #[error("context key id {0:?} must match [A-Za-z0-9_.-]{{1,64}}")]
    BadKeyId(String),
    #[error("context key {0:?} is shorter than {MIN_KEY_BYTES} bytes")]
    TooShort(String),
    #[error("context key {0:?} is not hex")]
    NotHex(String),
    #[error("context key file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("signed_context: {0}")]
    Config(String),
}

/// Holds one HMAC-SHA256 key and signs `enter` proofs. `Debug` shows the key id only.
pub struct ContextSigner {
    key_id: String,
    key: hmac::Key,
}

impl std::fmt::Debug for ContextSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ContextSigner {
    /// A signer for key `key_id` (`[A-Za-z0-9_.-]{1,64}`, as in the key table) with
    /// `secret` of at least 32 bytes.
    pub fn new(key_id: &str, secret: &[u8]) -> Result<Self, ContextKeyError> {
        if !valid_key_id(key_id) {
            return Err(ContextKeyError::BadKeyId(key_id.to_owned()));
        }
        if secret.len() < MIN_KEY_BYTES {
            return Err(ContextKeyError::TooShort(key_id.to_owned()));
        }
        Ok(ContextSigner {
            key_id: key_id.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// From the hex form printed by `rls install` / `rotate-key` (surrounding whitespace
    /// ignored).
    pub fn from_hex(key_id: &str, key_hex: &str) -> Result<Self, ContextKeyError> {
        let secret =
            hex_decode(key_hex.trim()).ok_or_else(|| ContextKeyError::NotHex(key_id.to_owned()))?;
        Self::new(key_id, &secret)
    }

    /// From a key file: one line `<key_id>:<hex>` as written by `--key-file`.
    pub fn from_key_file(path: &Path) -> Result<Self, ContextKeyError> {
        let file_err = |reason: String| ContextKeyError::File {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let (key_id, hex) = text
            .trim()
            .split_once(':')
            .ok_or_else(|| file_err("expected one line <key_id>:<hex>".into()))?;
        Self::from_hex(key_id, hex)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The MAC (64 lowercase hex characters) of [`canonical_message`] for these values.
    pub fn sign(
        &self,
        tenant: &str,
        pid: i32,
        backend_start_micros: i64,
        seq: i64,
        exp_unix: i64,
    ) -> String {
        let msg = canonical_message(tenant, pid, backend_start_micros, seq, exp_unix);
        hex_encode(hmac::sign(&self.key, msg.as_bytes()).as_ref())
    }
}

/// The signed message, version 1:
/// `v1|<tenant>|<pid>|<backend_start_micros>|<seq>|<exp_unix>` (integers in decimal).
/// `enter` rebuilds exactly this from its arguments and the server's own pid and
/// backend start; see [`sql`] for why it parses uniquely.
pub fn canonical_message(
    tenant: &str,
    pid: i32,
    backend_start_micros: i64,
    seq: i64,
    exp_unix: i64,
) -> String {
    format!("{MESSAGE_VERSION}|{tenant}|{pid}|{backend_start_micros}|{seq}|{exp_unix}")
}

/// A strictly increasing sequence number for `enter`, shared by the whole process: at
/// least the current time in microseconds since the Unix epoch, and greater than every
/// value returned before. Time-based, so it keeps increasing across proxy restarts
/// (should a backend outlive the proxy's connection to it); only per-backend
/// monotonicity matters, and a process-wide counter gives it.
pub fn next_seq() -> i64 {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = now_micros();
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev.saturating_add(1));
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => prev = actual,
        }
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The five bind parameters of `enter`, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct Proof {
    pub tenant: String,
    pub seq: i64,
    pub exp: i64,
    pub key_id: String,
    pub mac: String,
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proof")
            .field("tenant", &self.tenant)
            .field("seq", &self.seq)
            .field("exp", &self.exp)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// `[upstreams.<name>.signed_context]`: how a shared upstream's proxy signs contexts.
/// Exactly one of `key_file` or (`key_id` and `key`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedContextConfig {
    /// Schema of the installed objects. Default `pgtenant`.
    #[serde(default = "SignedContextConfig::default_schema")]
    pub schema: String,
    /// Id of the signing key, as in `<schema>.context_keys`.
    pub key_id: Option<String>,
    /// The key in hex (use `${ENV_VAR}`).
    pub key: Option<String>,
    /// A file `<key_id>:<hex>` as written by `rls install --key-file`.
    pub key_file: Option<PathBuf>,
    /// Lifetime of a context after `enter`. Default 24h.
    #[serde(with = "humantime_serde", default = "SignedContextConfig::default_ttl")]
    pub ttl: Duration,
}

impl SignedContextConfig {
    fn default_schema() -> String {
        sql::DEFAULT_SCHEMA.into()
    }
    fn default_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }

    /// Loads the key (reads `key_file`) and builds the [`SignedContext`].
    pub fn build(&self) -> Result<SignedContext, ContextKeyError> {
        let signer = match (&self.key_file, &self.key_id, &self.key) {
            (Some(path), None, None) => ContextSigner::from_key_file(path)?,
            (None, Some(id), Some(key)) => ContextSigner::from_hex(id, key)?,
            _ => {
                return Err(ContextKeyError::Config(
                    "set either key_file, or key_id and key".into(),
                ))
            }
        };
        SignedContext::new(&self.schema, signer, self.ttl)
    }
}

/// Everything the proxy needs for one shared upstream: schema, signer, TTL, and the three
/// statements. Cheap to share (`Arc`) between sessions.
#[derive(Debug)]
pub struct SignedContext {
    schema: String,
    signer: ContextSigner,
    ttl: Duration,
    enter_sql: String,
    leave_sql: String,
    identity_sql: String,
}

impl SignedContext {
    pub fn new(
        schema: &str,
        signer: ContextSigner,
        ttl: Duration,
    ) -> Result<Self, ContextKeyError> {
        sql::ident("schema", schema).map_err(|e| ContextKeyError::Config(e.to_string()))?;
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(ContextKeyError::Config(
                "ttl must be between 1s and 366 days".into(),
            ));
        }
        Ok(SignedContext {
            schema: schema.to_owned(),
            signer,
            ttl,
            enter_sql: enter_sql(schema),
            leave_sql: leave_sql(schema),
            identity_sql: identity_sql(schema),
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn signer(&self) -> &ContextSigner {
        &self.signer
    }

    /// A fresh proof for `tenant` on the backend `id`: the next sequence number and
    /// `exp = now + ttl`.
    pub fn proof(&self, id: &BackendIdentity, tenant: &str) -> Proof {
        let seq = next_seq();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let exp = now_unix().saturating_add(ttl);
        Proof {
            tenant: tenant.to_owned(),
            seq,
            exp,
            key_id: self.signer.key_id.clone(),
            mac: self
                .signer
                .sign(tenant, id.pid, id.backend_start_micros, seq, exp),
        }
    }
}

fn valid_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];
    const HOUR_FOR_TEST: Duration = Duration::from_secs(3600);

    #[test]
    fn mac_is_hmac_sha256_of_the_canonical_message() {
        let s = ContextSigner::new("k1", &KEY).unwrap();
        let msg = canonical_message("acme", 4242, 1_700_000_000_123_456, 99, 1_800_000_000);
        assert_eq!(msg, "v1|acme|4242|1700000000123456|99|1800000000");
        let expected = hex_encode(
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &KEY), msg.as_bytes()).as_ref(),
        );
        let mac = s.sign("acme", 4242, 1_700_000_000_123_456, 99, 1_800_000_000);
        assert_eq!(mac, expected);
        assert_eq!(mac.len(), 64);
        assert!(mac
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        // Every field is bound.
        assert_ne!(
            mac,
            s.sign("acmf", 4242, 1_700_000_000_123_456, 99, 1_800_000_000)
        );
        assert_ne!(
            mac,
            s.sign("acme", 4243, 1_700_000_000_123_456, 99, 1_800_000_000)
        );
        assert_ne!(
            mac,
            s.sign("acme", 4242, 1_700_000_000_123_457, 99, 1_800_000_000)
        );
        assert_ne!(
            mac,
            s.sign("acme", 4242, 1_700_000_000_123_456, 100, 1_800_000_000)
        );
        assert_ne!(
            mac,
            s.sign("acme", 4242, 1_700_000_000_123_456, 99, 1_800_000_001)
        );
    }

    #[test]
    fn rfc4231_test_case_2() {
        // HMAC-SHA256 with key "Jefe" is too short for us; check the primitive via
        // aws-lc-rs directly and our hex encoding of it.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let tag = hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            hex_encode(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(
            ContextSigner::new("k1", &[0u8; 31]).unwrap_err(),
            ContextKeyError::TooShort("k1".into())
        );
        assert!(matches!(
            ContextSigner::new("bad id", &KEY),
            Err(ContextKeyError::BadKeyId(_))
        ));
        assert!(matches!(
            ContextSigner::from_hex("k1", "zz"),
            Err(ContextKeyError::NotHex(_))
        ));
        let hex = hex_encode(&KEY);
        let s = ContextSigner::from_hex("k1", &format!(" {hex}\n")).unwrap();
        assert_eq!(s.key_id(), "k1");
        assert!(!format!("{s:?}").contains(&hex));
        assert_eq!(hex_decode(&hex).unwrap(), KEY);
        assert!(hex_decode("abc").is_none());
        assert!(hex_decode("é1").is_none());
    }

    #[test]
    fn key_file_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctx.key");
        std::fs::write(&path, format!("k9:{}\n", hex_encode(&KEY))).unwrap();
        let cfg: SignedContextConfig = toml::from_str(&format!(
            "key_file = {:?}\nttl = \"2h\"",
            path.to_str().unwrap()
        ))
        .unwrap();
        let ctx = cfg.build().unwrap();
        assert_eq!(ctx.schema(), "pgtenant");
        assert_eq!(ctx.ttl(), Duration::from_secs(7200));
        assert_eq!(ctx.signer().key_id(), "k9");
        let cfg: SignedContextConfig = toml::from_str(&format!(
            "schema = \"ctx\"\nkey_id = \"k1\"\nkey = \"{}\"",
            hex_encode(&KEY)
        ))
        .unwrap();
        assert_eq!(cfg.build().unwrap().schema(), "ctx");
        let both: SignedContextConfig = toml::from_str(&format!(
            "key_file = \"/x\"\nkey_id = \"k1\"\nkey = \"{}\"",
            hex_encode(&KEY)
        ))
        .unwrap();
        assert!(matches!(both.build(), Err(ContextKeyError::Config(_))));
        assert!(toml::from_str::<SignedContextConfig>("keyy = \"x\"").is_err());
    }

    #[test]
    fn proofs_have_increasing_seq_and_ttl_expiry() {
        let ctx = SignedContext::new(
            "pgtenant",
            ContextSigner::new("k1", &KEY).unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
        for bad in [Duration::ZERO, MAX_TTL + Duration::from_secs(1)] {
            let signer = ContextSigner::new("k1", &KEY).unwrap();
            assert!(SignedContext::new("pgtenant", signer, bad).is_err());
        }
        let signer = ContextSigner::new("k1", &KEY).unwrap();
        assert!(SignedContext::new("Bad", signer, HOUR_FOR_TEST).is_err());
        let id = BackendIdentity {
            pid: 1,
            backend_start_micros: 2,
        };
        let a = ctx.proof(&id, "t");
        let b = ctx.proof(&id, "t");
        assert!(b.seq > a.seq);
        assert!(a.seq >= 1_600_000_000_000_000, "seq is time-based");
        assert!((a.exp - now_unix() - 60).abs() <= 1);
        assert_eq!(a.mac, ctx.signer().sign("t", 1, 2, a.seq, a.exp));
        assert!(!format!("{a:?}").contains(&a.mac));
        let mut last = 0;
        for _ in 0..10_000 {
            let s = next_seq();
            assert!(s > last);
            last = s;
        }
    }
}
