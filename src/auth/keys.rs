//! Verification keys: loads the HMAC secret, PEM public key or JWKS file named in the
//! config and binds every key to the algorithms it may verify, so the token's `alg` header
//! can only pick among those (RFC 8725 §3.1; the RS256-public-key-as-HS256-secret attack
//! needs a key that accepts both families).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde_json::Value;

use super::claims::StrictValue;
use super::{AuthError, MAX_KID_LEN};
use crate::config::JwtConfig;

/// HMAC secrets shorter than this are refused (RFC 7518 §3.2 asks for the hash size; 32
/// bytes covers HS256 and is what `isolation.md` requires for all HS algorithms).
pub(crate) const MIN_HMAC_SECRET_LEN: usize = 32;

/// RSA moduli shorter than this are refused at load (`isolation.md`, NIST SP 800-131A).
pub(crate) const MIN_RSA_BITS: usize = 2048;

/// Key files are small; a larger file is a mistake (wrong path), not a key.
const MAX_KEY_FILE_LEN: u64 = 1024 * 1024;

/// What a key is, which fixes the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Hmac,
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Every JWS algorithm that makes sense with this key. ES256 is bound to P-256 and
    /// ES384 to P-384 (RFC 7518 §3.4), so a curve cannot be paired with the wrong hash.
    pub(crate) fn algorithms(self) -> &'static [Algorithm] {
        use Algorithm::*;
        match self {
            KeyKind::Hmac => &[HS256, HS384, HS512],
            KeyKind::Rsa => &[RS256, RS384, RS512, PS256, PS384, PS512],
            KeyKind::EcP256 => &[ES256],
            KeyKind::EcP384 => &[ES384],
            KeyKind::Ed25519 => &[EdDSA],
        }
    }

    fn describe(self) -> &'static str {
        match self {
            KeyKind::Hmac => "an HMAC secret",
            KeyKind::Rsa => "an RSA key",
            KeyKind::EcP256 => "an EC P-256 key",
            KeyKind::EcP384 => "an EC P-384 key",
            KeyKind::Ed25519 => "an Ed25519 key",
        }
    }
}

/// One key and the algorithms it may verify: allow-list ∩ key kind (∩ the JWK's `alg`).
pub(crate) struct VerifyKey {
    pub(crate) kid: Option<String>,
    pub(crate) kind: KeyKind,
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) decoding: DecodingKey,
}

/// The configured keys and how a token selects one.
pub(crate) enum KeySet {
    /// `secret`, `secret_file` or `public_key_file`: one key, the token's `kid` is not used
    /// for selection (only recorded for audit).
    Single(VerifyKey),
    /// `jwks_file`: the token's `kid` selects the key; without a `kid` only a one-key set works.
    Jwks {
        keys: Vec<VerifyKey>,
        by_kid: HashMap<String, usize>,
    },
}

impl std::fmt::Debug for KeySet {
    /// Key ids and kinds only: no key material, even though `DecodingKey` redacts its own.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys().iter().map(|k| (k.kid.as_deref(), k.kind)))
            .finish()
    }
}

impl KeySet {
    /// Loads the one configured key source. Every failure is a config error naming the
    /// file and the problem, never the secret or the key bytes.
    pub(crate) fn load(cfg: &JwtConfig, allowed: &[Algorithm]) -> Result<KeySet, AuthError> {
        match (
            &cfg.secret,
            &cfg.secret_file,
            &cfg.public_key_file,
            &cfg.jwks_file,
        ) {
            (Some(secret), None, None, None) => {
                hmac_key(secret.as_bytes().to_vec(), "jwt.secret", allowed).map(KeySet::Single)
            }
            (None, Some(path), None, None) => {
                let mut bytes = read_key_file(path)?;
                strip_one_newline(&mut bytes);
                hmac_key(bytes, "jwt.secret_file", allowed).map(KeySet::Single)
            }
            (None, None, Some(path), None) => pem_key(path, allowed).map(KeySet::Single),
            (None, None, None, Some(path)) => jwks(path, allowed),
            _ => Err(config(
                "[jwt] needs exactly one of secret, secret_file, public_key_file, jwks_file, jwks_url",
            )),
        }
    }

    /// Chooses the key for a token's `kid`.
    pub(crate) fn select(&self, kid: Option<&str>) -> Result<&VerifyKey, AuthError> {
        match self {
            KeySet::Single(key) => Ok(key),
            KeySet::Jwks { keys, by_kid } => match kid {
                Some(kid) => match by_kid.get(kid) {
                    Some(&i) => Ok(&keys[i]),
                    // A one-key set whose key has no kid accepts any kid: nothing to mix up.
                    None if keys.len() == 1 && keys[0].kid.is_none() => Ok(&keys[0]),
                    None => Err(AuthError::UnknownKid),
                },
                None if keys.len() == 1 => Ok(&keys[0]),
                None => Err(AuthError::MissingKid),
            },
        }
    }

    pub(crate) fn keys(&self) -> &[VerifyKey] {
        match self {
            KeySet::Single(key) => std::slice::from_ref(key),
            KeySet::Jwks { keys, .. } => keys,
        }
    }
}

/// Parses `jwt.algorithms`. `none` and unknown names are config errors; an empty list too.
pub(crate) fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, AuthError> {
    if names.is_empty() {
        return Err(config("jwt.algorithms is empty"));
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if name.eq_ignore_ascii_case("none") {
            return Err(config("jwt.algorithms: \"none\" is never allowed"));
        }
        let alg = Algorithm::from_str(name)
            .map_err(|_| config(format!("jwt.algorithms: unknown algorithm {name:?}")))?;
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    Ok(out)
}

pub(crate) fn config(msg: impl Into<String>) -> AuthError {
    AuthError::Config(msg.into())
}

fn read_key_file(path: &Path) -> Result<Vec<u8>, AuthError> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| config(format!("cannot read {shown}: {e}")))?;
    if meta.len() > MAX_KEY_FILE_LEN {
        return Err(config(format!(
            "{shown} is larger than {MAX_KEY_FILE_LEN} bytes"
        )));
    }
    std::fs::read(path).map_err(|e| config(format!("cannot read {shown}: {e}")))
}

/// Editors and `echo` add one line ending to secret files; it is not part of the secret.
fn strip_one_newline(bytes: &mut Vec<u8>) {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
}

/// Every allowed algorithm must fit a single key: a mixed list such as
/// `["RS256", "HS256"]` with one RSA key is the classic key-confusion setup, so refuse it.
fn single_key_algorithms(
    kind: KeyKind,
    allowed: &[Algorithm],
    source: &str,
) -> Result<Vec<Algorithm>, AuthError> {
    if let Some(bad) = allowed.iter().find(|a| !kind.algorithms().contains(a)) {
        return Err(config(format!(
            "jwt.algorithms has {bad:?}, which cannot be used with {} ({source})",
            kind.describe()
        )));
    }
    Ok(allowed.to_vec())
}

fn hmac_key(secret: Vec<u8>, source: &str, allowed: &[Algorithm]) -> Result<VerifyKey, AuthError> {
    if secret.len() < MIN_HMAC_SECRET_LEN {
        return Err(config(format!(
            "{source} is shorter than {MIN_HMAC_SECRET_LEN} bytes; use a random secret of at least {MIN_HMAC_SECRET_LEN} bytes"
        )));
    }
    let algorithms = single_key_algorithms(KeyKind::Hmac, allowed, source)?;
    // RFC 7518 §3.2 wants a key as long as the hash; 32 bytes is our floor for all HS*.
    for (alg, want) in [(Algorithm::HS384, 48), (Algorithm::HS512, 64)] {
        if algorithms.contains(&alg) && secret.len() < want {
            tracing::warn!(
                "{source} is shorter than {want} bytes, the size RFC 7518 asks for {alg:?}"
            );
        }
    }
    let decoding = DecodingKey::from_secret(&secret);
    Ok(VerifyKey {
        kid: None,
        kind: KeyKind::Hmac,
        algorithms,
        decoding,
    })
}

/// Loads one PEM public key, detecting RSA, EC or Ed25519. Private keys and certificates
/// are refused: the proxy must never hold signing material, and a certificate would
/// silently trust whatever key it carries without checking its chain.
fn pem_key(path: &Path, allowed: &[Algorithm]) -> Result<VerifyKey, AuthError> {
    let shown = path.display();
    let pem = read_key_file(path)?;
    check_pem_label(&pem).map_err(|m| config(format!("jwt.public_key_file {shown}: {m}")))?;
    let (decoding, kind) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        (k, KeyKind::Rsa)
    } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        let kind = ec_kind_from_point(k.as_bytes()).ok_or_else(|| {
            config(format!(
                "jwt.public_key_file {shown}: EC key is not an uncompressed P-256 or P-384 point"
            ))
        })?;
        (k, kind)
    } else if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        if k.as_bytes().len() != 32 {
            return Err(config(format!(
                "jwt.public_key_file {shown}: not an Ed25519 key"
            )));
        }
        (k, KeyKind::Ed25519)
    } else {
        return Err(config(format!(
            "jwt.public_key_file {shown}: not a supported public key (RSA, EC P-256/P-384, Ed25519)"
        )));
    };
    if kind == KeyKind::Rsa {
        let bits = match decoding.kind() {
            DecodingKeyKind::SecretOrDer(der) => rsa_modulus_bits(der),
            DecodingKeyKind::RsaModulusExponent { n, .. } => Some(bit_len(n)),
        };
        check_rsa_bits(bits).map_err(|m| config(format!("jwt.public_key_file {shown}: {m}")))?;
    }
    let algorithms = single_key_algorithms(kind, allowed, "jwt.public_key_file")?;
    Ok(VerifyKey {
        kid: None,
        kind,
        algorithms,
        decoding,
    })
}

/// Requires exactly one `-----BEGIN PUBLIC KEY-----` or `-----BEGIN RSA PUBLIC KEY-----`.
fn check_pem_label(pem: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM text file".to_string())?;
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .collect();
    match labels.as_slice() {
        [] => Err("no PEM block found".into()),
        [label] if label.contains("PRIVATE") => {
            Err("holds a private key; give pgtenant only the public key".into())
        }
        ["PUBLIC KEY"] | ["RSA PUBLIC KEY"] => Ok(()),
        [label] => Err(format!(
            "PEM block {label:?} is not a public key (for a certificate, extract its key with `openssl x509 -pubkey -noout`)"
        )),
        _ => Err("holds several PEM blocks; put exactly one public key in the file".into()),
    }
}

/// The curve of an uncompressed SEC1 point, from its length.
fn ec_kind_from_point(point: &[u8]) -> Option<KeyKind> {
    match (point.first(), point.len()) {
        (Some(4), 65) => Some(KeyKind::EcP256),
        (Some(4), 97) => Some(KeyKind::EcP384),
        _ => None,
    }
}

fn check_rsa_bits(bits: Option<usize>) -> Result<(), String> {
    match bits {
        Some(b) if b >= MIN_RSA_BITS => Ok(()),
        Some(b) => Err(format!(
            "RSA key has {b} bits; at least {MIN_RSA_BITS} are required"
        )),
        None => Err("RSA public key cannot be parsed".into()),
    }
}

/// Bits in a big-endian unsigned integer, ignoring leading zero bytes.
fn bit_len(n: &[u8]) -> usize {
    let n = match n.iter().position(|b| *b != 0) {
        Some(i) => &n[i..],
        None => return 0,
    };
    (n.len() - 1) * 8 + (8 - n[0].leading_zeros() as usize)
}

/// Modulus size of a DER `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`
/// (PKCS#1, which is also what an SPKI's bit string holds).
fn rsa_modulus_bits(der: &[u8]) -> Option<usize> {
    let (tag, seq, _) = der_tlv(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, modulus, rest) = der_tlv(seq)?;
    let (etag, _, _) = der_tlv(rest)?;
    (tag == 0x02 && etag == 0x02).then(|| bit_len(modulus))
}

/// Splits one DER TLV into (tag, contents, rest). Definite lengths up to 4 bytes only.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Loads a JWKS file. Keys that are not for us (encryption keys, unsupported key types or
/// curves, algorithms outside the allow-list) are skipped with a warning so a provider's
/// full JWKS can be used as is; keys that claim to be usable but are broken or weak are
/// config errors, as are duplicate kids and kid-less keys in a multi-key set.
fn jwks(path: &Path, allowed: &[Algorithm]) -> Result<KeySet, AuthError> {
    let bytes = read_key_file(path)?;
    parse_jwks(
        &bytes,
        &format!("jwt.jwks_file {}", path.display()),
        allowed,
    )
    .map_err(config)
}

/// Parses a JWKS document (a file's or one fetched from `jwks_url`) with the rules of
/// [`jwks`]. Errors start with `source` and never quote key material.
pub(crate) fn parse_jwks(
    bytes: &[u8],
    source: &str,
    allowed: &[Algorithm],
) -> Result<KeySet, String> {
    let StrictValue(doc) = serde_json::from_slice(bytes)
        .map_err(|_| format!("{source}: not valid JSON (or has duplicate members)"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{source}: no \"keys\" array"))?;

    let mut keys: Vec<VerifyKey> = Vec::new();
    let mut by_kid = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(key) = jwk_key(entry, allowed).map_err(|m| format!("{source}: key #{i}: {m}"))?
        else {
            continue;
        };
        if let Some(kid) = &key.kid {
            if by_kid.insert(kid.clone(), keys.len()).is_some() {
                return Err(format!("{source}: duplicate kid {kid:?}"));
            }
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(format!(
            "{source}: no key usable with jwt.algorithms {allowed:?}"
        ));
    }
    if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
        return Err(format!(
            "{source}: every key needs a \"kid\" when the set has several"
        ));
    }
    Ok(KeySet::Jwks { keys, by_kid })
}

/// One JWKS entry: `Ok(None)` when it is not a signature key we can use, `Err` when broken.
fn jwk_key(entry: &Value, allowed: &[Algorithm]) -> Result<Option<VerifyKey>, String> {
    let kid = match entry.get("kid") {
        None => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= MAX_KID_LEN => Some(k.clone()),
        Some(_) => {
            return Err(format!(
                "\"kid\" must be a string of 1 to {MAX_KID_LEN} bytes"
            ))
        }
    };
    let skip = |why: &str| {
        tracing::warn!(kid = ?kid, "JWKS key skipped: {why}");
        Ok(None)
    };
    let str_field = |name: &str| entry.get(name).and_then(Value::as_str);
    if let Some(usage) = str_field("use") {
        if usage != "sig" {
            return skip("\"use\" is not \"sig\"");
        }
    }
    if let Some(ops) = entry.get("key_ops").and_then(Value::as_array) {
        if !ops.iter().any(|op| op.as_str() == Some("verify")) {
            return skip("\"key_ops\" lacks \"verify\"");
        }
    }
    let jwk_alg = match str_field("alg") {
        None => None,
        Some(name) => match Algorithm::from_str(name) {
            Ok(alg) => Some(alg),
            Err(_) => return skip("its \"alg\" is not a supported signature algorithm"),
        },
    };
    match (str_field("kty"), str_field("crv")) {
        (Some("RSA"), _) | (Some("oct"), _) => {}
        (Some("EC"), Some("P-256" | "P-384")) | (Some("OKP"), Some("Ed25519")) => {}
        _ => return skip("unsupported key type or curve"),
    }
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|_| "not a valid JWK")?;
    let kind = jwk_kind(&jwk)?;
    let algorithms: Vec<Algorithm> = allowed
        .iter()
        .copied()
        .filter(|a| kind.algorithms().contains(a) && jwk_alg.is_none_or(|j| j == *a))
        .collect();
    if algorithms.is_empty() {
        return skip("no algorithm in jwt.algorithms fits this key");
    }
    let decoding =
        DecodingKey::from_jwk(&jwk).map_err(|_| "key parameters are not valid base64url")?;
    Ok(Some(VerifyKey {
        kid,
        kind,
        algorithms,
        decoding,
    }))
}

/// Checks key sizes and returns the kind; the key type and curve were screened already.
fn jwk_kind(jwk: &Jwk) -> Result<KeyKind, String> {
    let b64 = |s: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| "key parameter is not base64url".to_string())
    };
    match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let bits = bit_len(&b64(&p.n)?);
            check_rsa_bits(Some(bits))?;
            Ok(KeyKind::Rsa)
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (kind, len) = match p.curve {
                EllipticCurve::P256 => (KeyKind::EcP256, 32),
                EllipticCurve::P384 => (KeyKind::EcP384, 48),
                _ => return Err("unsupported EC curve".into()),
            };
            if b64(&p.x)?.len() != len || b64(&p.y)?.len() != len {
                return Err("EC coordinates have the wrong length for the curve".into());
            }
            Ok(kind)
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 || b64(&p.x)?.len() != 32 {
                return Err("not an Ed25519 public key".into());
            }
            Ok(KeyKind::Ed25519)
        }
        AlgorithmParameters::OctetKey(p) => {
            if b64(&p.value)?.len() < MIN_HMAC_SECRET_LEN {
                return Err(format!(
                    "symmetric key is shorter than {MIN_HMAC_SECRET_LEN} bytes"
                ));
            }
            Ok(KeyKind::Hmac)
        }
    }
}
