//! `JwtVerifier`: checks a compact JWS token against the configured keys and rules and
//! returns an `Identity`; `issue_hs256` makes tokens for `pgtenant token` and tests.
//!
//! Order of checks, cheapest and least trusting first: size → header (own strict parse:
//! `crit`, `alg`, `kid`) → key selection → signature and registered claims (jsonwebtoken)
//! → `iat` → tenant and user claims. Nothing from the payload is looked at before the
//! signature has been verified.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{get_current_timestamp, Algorithm, EncodingKey, Header, Validation};
use rand::RngCore;
use regex::Regex;
use serde_json::{Map, Value};

use super::claims::{numeric_date, ClaimPath, StrictClaims, StrictValue};
use super::jwks_url::JwksSource;
use super::keys::{config, parse_algorithms, KeySet, MIN_HMAC_SECRET_LEN};
use super::{AuthError, Identity, MAX_KID_LEN, MAX_TOKEN_LEN, MAX_USER_LEN};
use crate::config::JwtConfig;
use crate::tenant::TenantId;

/// Leeway above this is refused, matching `Config::validate` (`isolation.md` wants ≤ 30 s by
/// default; more than a few minutes hides broken clocks and stretches stolen tokens).
const MAX_LEEWAY_SECS: u64 = 300;

/// Hard cap on a tenant id, whatever `tenant_pattern` allows: it becomes a bind parameter,
/// a metric label and a log field.
const MAX_TENANT_LEN: usize = 255;

/// Verifies client tokens. Built once from the config (and again on reload); `verify` is
/// synchronous, allocation-light and safe to share across tasks (`Send + Sync`).
pub struct JwtVerifier {
    keys: Keys,
    /// One `Validation` per allowed algorithm: jsonwebtoken refuses a `Validation` whose
    /// algorithms span key families, and one per algorithm pins `alg` exactly.
    validations: HashMap<Algorithm, Validation>,
    leeway: u64,
    tenant_claim: ClaimPath,
    user_claim: ClaimPath,
    /// `tenant_pattern`, anchored as `^(?:...)$` so an unanchored pattern cannot match a
    /// substring of a hostile id.
    tenant_re: Regex,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys)
            .field("algorithms", &self.validations.keys().collect::<Vec<_>>())
            .field("leeway", &self.leeway)
            .field("tenant_claim", &self.tenant_claim.name())
            .field("user_claim", &self.user_claim.name())
            .field("tenant_pattern", &self.tenant_re.as_str())
            .finish()
    }
}

/// Where the keys come from: loaded once from the config, or kept fresh from `jwks_url`.
#[derive(Debug)]
enum Keys {
    Static(KeySet),
    Remote(Arc<JwksSource>),
}

/// The header fields we act on, from our own strict parse.
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl JwtVerifier {
    /// Builds a verifier: parses the algorithm allow-list, loads and checks the keys (HMAC
    /// secrets ≥ 32 bytes, RSA ≥ 2048 bits, key family must fit every allowed algorithm),
    /// compiles the tenant pattern. All errors are [`AuthError::Config`].
    ///
    /// When `audience` is not configured, tokens that carry `aud` are refused (RFC 7519
    /// §4.1.3: a recipient not named in `aud` must reject); configure it if your issuer
    /// sets one.
    ///
    /// With `jwks_url` nothing is fetched here: call [`JwtVerifier::start`] before use.
    pub fn from_config(cfg: &JwtConfig) -> Result<JwtVerifier, AuthError> {
        Self::from_config_reusing(cfg, None)
    }

    /// As [`JwtVerifier::from_config`], but keeps `previous`'s `jwks_url` key source (its
    /// keys and refresh task) when the URL settings did not change: for reloads.
    pub fn from_config_reusing(
        cfg: &JwtConfig,
        previous: Option<&JwtVerifier>,
    ) -> Result<JwtVerifier, AuthError> {
        let allowed = parse_algorithms(&cfg.algorithms)?;
        let keys = match &cfg.jwks_url {
            None => Keys::Static(KeySet::load(cfg, &allowed)?),
            Some(url) => {
                let others = [
                    cfg.secret.is_some(),
                    cfg.secret_file.is_some(),
                    cfg.public_key_file.is_some(),
                    cfg.jwks_file.is_some(),
                ];
                if others.contains(&true) {
                    return Err(config("[jwt] needs exactly one of secret, secret_file, public_key_file, jwks_file, jwks_url"));
                }
                let fresh = JwksSource::new(cfg, url, &allowed)?;
                match previous.map(|p| &p.keys) {
                    Some(Keys::Remote(old)) if old.same_settings(&fresh) => {
                        Keys::Remote(old.clone())
                    }
                    _ => Keys::Remote(Arc::new(fresh)),
                }
            }
        };
        if cfg.leeway_secs > MAX_LEEWAY_SECS {
            return Err(config(format!(
                "jwt.leeway_secs above {MAX_LEEWAY_SECS} is refused"
            )));
        }
        for (name, value) in [("issuer", &cfg.issuer), ("audience", &cfg.audience)] {
            if value.as_deref() == Some("") {
                return Err(config(format!(
                    "jwt.{name} is empty (unset environment variable?)"
                )));
            }
        }
        let tenant_claim = ClaimPath::parse(&cfg.tenant_claim)
            .map_err(|m| config(format!("jwt.tenant_claim: {m}")))?;
        let user_claim = ClaimPath::parse(&cfg.user_claim)
            .map_err(|m| config(format!("jwt.user_claim: {m}")))?;
        let tenant_re = Regex::new(&format!("^(?:{})$", cfg.tenant_pattern))
            .map_err(|e| config(format!("jwt.tenant_pattern: {e}")))?;
        let validations = allowed
            .iter()
            .map(|alg| (*alg, validation(*alg, cfg)))
            .collect();
        Ok(JwtVerifier {
            keys,
            validations,
            leeway: cfg.leeway_secs,
            tenant_claim,
            user_claim,
            tenant_re,
        })
    }

    /// With `jwks_url`: fetches the first key set (unless a reused source has one) and starts
    /// its background refresh. A no-op for keys from the config file. An error means no
    /// key set could be loaded; `serve` refuses to start on it.
    pub async fn start(&self) -> Result<(), AuthError> {
        match &self.keys {
            Keys::Static(_) => Ok(()),
            Keys::Remote(source) => source.start().await,
        }
    }

    /// [`JwtVerifier::verify`], plus what only an async caller can do: with `jwks_url`, a
    /// token whose `kid` is unknown (or keys that went stale) triggers one shared, rate
    /// limited, time bounded refresh of the key set and a second look. The fast path (known
    /// kid) does not await.
    pub async fn verify_async(&self, token: &str) -> Result<Identity, AuthError> {
        let first = self.verify(token);
        match (&first, &self.keys) {
            (Err(AuthError::UnknownKid | AuthError::KeysUnavailable), Keys::Remote(source)) => {
                source.refresh_after_miss().await;
                self.verify(token)
            }
            _ => first,
        }
    }

    /// Verifies `token` and extracts the identity. Errors with `is_invalid_token()` are
    /// problems with the token (28P01); the others mean a genuine token grants no access
    /// (28000). Never logs or returns the token. With `jwks_url` this never fetches: an
    /// unknown `kid` is refused (see [`JwtVerifier::verify_async`]).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLarge);
        }
        let header = parse_header(token)?;
        let validation = self
            .validations
            .get(&header.alg)
            .ok_or(AuthError::AlgorithmNotAllowed)?;
        match &self.keys {
            Keys::Static(keys) => self.verify_with(keys, token, header, validation),
            Keys::Remote(source) => {
                let fetched = source.keys()?;
                self.verify_with(&fetched.keys, token, header, validation)
            }
        }
    }

    fn verify_with(
        &self,
        keys: &KeySet,
        token: &str,
        header: TokenHeader,
        validation: &Validation,
    ) -> Result<Identity, AuthError> {
        let key = keys.select(header.kid.as_deref())?;
        if !key.algorithms.contains(&header.alg) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let data = jsonwebtoken::decode::<StrictClaims>(token, &key.decoding, validation)
            .map_err(map_jwt_error)?;
        let claims = data.claims.0;

        check_iat(&claims, get_current_timestamp(), self.leeway)?;
        // `exp` is required and was validated above; a miss here would be a crate change.
        let expires_at = claims
            .get("exp")
            .and_then(numeric_date)
            .ok_or(AuthError::MissingRegisteredClaim("exp"))?;
        let tenant = self.tenant(&claims)?;
        let user = self.user(&claims)?;
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| short_printable(j, MAX_USER_LEN))
            .map(str::to_owned);
        Ok(Identity {
            tenant,
            user,
            kid: header.kid,
            jti,
            expires_at,
            claims: Value::Object(claims),
        })
    }

    /// Exercises the crypto backend once at startup, so a build without a jsonwebtoken
    /// backend feature (which panics on first use in 10.x) or a broken backend fails at boot
    /// rather than on the first client: issues and verifies a throwaway HS256 token with a
    /// random key, checks that a wrong key is refused, and that every configured key is
    /// accepted by the backend for each of its algorithms (and refuses a garbage signature).
    pub fn self_test(&self) -> Result<(), AuthError> {
        std::panic::catch_unwind(AssertUnwindSafe(|| self.self_test_inner())).unwrap_or(Err(
            AuthError::Backend(
                "the crypto backend panicked (is a jsonwebtoken backend feature enabled?)",
            ),
        ))
    }

    fn self_test_inner(&self) -> Result<(), AuthError> {
        let mut secret = [0u8; 32];
        let mut other = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        rand::thread_rng().fill_bytes(&mut other);
        let token = issue_hs256(
            &secret,
            "tenant_id",
            "self-test",
            Some("self-test"),
            60,
            &[],
        )
        .map_err(|_| AuthError::Backend("HS256 signing failed"))?;
        let validation = Validation::new(Algorithm::HS256);
        let decoded = jsonwebtoken::decode::<StrictClaims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(&secret),
            &validation,
        )
        .map_err(|_| AuthError::Backend("HS256 verification of a fresh token failed"))?;
        if decoded.claims.0.get("tenant_id").and_then(Value::as_str) != Some("self-test") {
            return Err(AuthError::Backend("HS256 round trip lost a claim"));
        }
        let wrong = jsonwebtoken::decode::<StrictClaims>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(&other),
            &validation,
        );
        if !matches!(
            wrong.as_ref().map_err(|e| e.kind()),
            Err(ErrorKind::InvalidSignature)
        ) {
            return Err(AuthError::Backend(
                "HS256 accepted a token signed with another key",
            ));
        }
        let msg = b"pgtenant.self-test";
        let remote = match &self.keys {
            Keys::Remote(source) => source.loaded(),
            Keys::Static(_) => None,
        };
        let keys = match (&self.keys, &remote) {
            (Keys::Static(keys), _) => keys.keys(),
            (Keys::Remote(_), Some(fetched)) => fetched.keys.keys(),
            // Not fetched yet: `start` parses the keys with the same rules.
            (Keys::Remote(_), None) => &[],
        };
        for key in keys {
            for alg in &key.algorithms {
                match jsonwebtoken::crypto::verify("AAAA", msg, &key.decoding, *alg) {
                    Ok(false) => {}
                    Ok(true) => {
                        return Err(AuthError::Backend("a key accepted a garbage signature"))
                    }
                    Err(_) => {
                        return Err(AuthError::Backend(
                            "the crypto backend refuses a configured key for its algorithm",
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    fn tenant(&self, claims: &Map<String, Value>) -> Result<TenantId, AuthError> {
        let name = self.tenant_claim.name();
        match self.tenant_claim.lookup(claims) {
            None => Err(AuthError::MissingClaim {
                claim: name.to_owned(),
            }),
            Some(Value::String(id)) => {
                if short_printable(id, MAX_TENANT_LEN) && self.tenant_re.is_match(id) {
                    Ok(TenantId::new_validated(id))
                } else {
                    Err(AuthError::InvalidTenant)
                }
            }
            Some(_) => Err(AuthError::TenantNotString {
                claim: name.to_owned(),
            }),
        }
    }

    fn user(&self, claims: &Map<String, Value>) -> Result<String, AuthError> {
        let name = self.user_claim.name();
        let user = match self.user_claim.lookup(claims) {
            None => {
                return Err(AuthError::MissingClaim {
                    claim: name.to_owned(),
                })
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => {
                return Err(AuthError::InvalidUser {
                    claim: name.to_owned(),
                })
            }
        };
        if short_printable(&user, MAX_USER_LEN) {
            Ok(user)
        } else {
            Err(AuthError::InvalidUser {
                claim: name.to_owned(),
            })
        }
    }
}

/// Non-empty, at most `max` bytes, no control characters (these values reach logs).
fn short_printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// The jsonwebtoken settings for one algorithm: exp required, nbf checked, our leeway,
/// iss/aud required and matched when configured (the crate skips absent ones otherwise).
fn validation(alg: Algorithm, cfg: &JwtConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.validate_aud = true;
    let mut required = vec!["exp"];
    if let Some(iss) = &cfg.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if let Some(aud) = &cfg.audience {
        v.set_audience(&[aud]);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

/// Parses the JOSE header ourselves (strictly: no duplicate members) to enforce what the
/// crate does not: `crit` refused, `alg` mapped to our error before key selection, `kid`
/// bounded. `jku`, `x5u`, `jwk` and `x5c` are never read: keys come only from the config.
fn parse_header(token: &str) -> Result<TokenHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("expected three dot-separated parts"));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed("header is not base64url"))?;
    let Ok(StrictValue(Value::Object(header))) = serde_json::from_slice(&bytes) else {
        return Err(AuthError::Malformed(
            "header is not a JSON object (or has duplicate members)",
        ));
    };
    if header.contains_key("crit") {
        return Err(AuthError::CritHeader);
    }
    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            // "none" and names the crate does not know are refused here, not parsed later.
            Algorithm::from_str(name).map_err(|_| AuthError::AlgorithmNotAllowed)?
        }
        Some(_) => return Err(AuthError::Malformed("header \"alg\" is not a string")),
        None => return Err(AuthError::Malformed("header has no \"alg\"")),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) if !kid.is_empty() && kid.len() <= MAX_KID_LEN => {
            Some(kid.clone())
        }
        Some(_) => {
            return Err(AuthError::Malformed(
                "header \"kid\" must be a string of 1 to 256 bytes",
            ))
        }
    };
    Ok(TokenHeader { alg, kid })
}

/// `iat` in the future (beyond leeway) means a skewed or forged issuer clock; jsonwebtoken
/// does not look at `iat`, so we do.
fn check_iat(claims: &Map<String, Value>, now: u64, leeway: u64) -> Result<(), AuthError> {
    let Some(raw) = claims.get("iat") else {
        return Ok(());
    };
    let iat = numeric_date(raw).ok_or(AuthError::InvalidRegisteredClaim("iat"))?;
    if iat > now.saturating_add(leeway) {
        return Err(AuthError::IssuedInFuture);
    }
    Ok(())
}

/// Maps jsonwebtoken's errors to ours, dropping their text (JSON errors can quote input).
fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidToken => AuthError::Malformed("not a JWS compact token"),
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingRegisteredClaim(registered(c)),
        ErrorKind::InvalidClaimFormat(c) => AuthError::InvalidRegisteredClaim(registered(c)),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed,
        ErrorKind::Base64(_) => AuthError::Malformed("payload or signature is not base64url"),
        ErrorKind::Json(_) | ErrorKind::Utf8(_) => AuthError::Malformed(
            "header or claims are not a valid JSON object (duplicate members are refused)",
        ),
        _ => AuthError::VerificationFailed,
    }
}

/// A registered claim name as a `'static` string for the error (the crate only reports these).
fn registered(name: &str) -> &'static str {
    match name {
        "exp" => "exp",
        "nbf" => "nbf",
        "iat" => "iat",
        "iss" => "iss",
        "aud" => "aud",
        "sub" => "sub",
        _ => "registered claim",
    }
}

/// Issues an HS256 token for `pgtenant token` and tests: the tenant at `tenant_claim`
/// (dots make nested objects: "app.tenant" → `{"app":{"tenant":...}}`), `sub` when given,
/// `iat` = now, `exp` = now + `ttl_secs`, plus `extra` claims (e.g. `iss`, `aud`, `jti`).
/// Extra claims may not collide with the ones set here. The secret must be at least 32
/// bytes, as for verification.
pub fn issue_hs256(
    secret: &[u8],
    tenant_claim: &str,
    tenant: &str,
    sub: Option<&str>,
    ttl_secs: u64,
    extra: &[(String, Value)],
) -> Result<String, AuthError> {
    if secret.len() < MIN_HMAC_SECRET_LEN {
        return Err(AuthError::Issue(format!(
            "secret is shorter than {MIN_HMAC_SECRET_LEN} bytes"
        )));
    }
    if tenant.is_empty() {
        return Err(AuthError::Issue("tenant is empty".into()));
    }
    let path = ClaimPath::parse(tenant_claim)
        .map_err(|m| AuthError::Issue(format!("tenant claim: {m}")))?;
    let root = &path.segments()[0];
    let reserved = |name: &str| {
        name == "iat"
            || name == "exp"
            || name == root
            || name == path.name()
            || (sub.is_some() && name == "sub")
    };
    let mut claims = Map::new();
    for (name, value) in extra {
        if reserved(name) {
            return Err(AuthError::Issue(format!(
                "extra claim {name:?} collides with a claim set by the issuer"
            )));
        }
        if claims.insert(name.clone(), value.clone()).is_some() {
            return Err(AuthError::Issue(format!(
                "extra claim {name:?} is given twice"
            )));
        }
    }
    let mut nested = Value::String(tenant.to_owned());
    for seg in path.segments()[1..].iter().rev() {
        nested = Value::Object(Map::from_iter([(seg.clone(), nested)]));
    }
    claims.insert(root.clone(), nested);
    if let Some(sub) = sub {
        claims.insert("sub".into(), Value::String(sub.to_owned()));
    }
    let now = get_current_timestamp();
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), now.saturating_add(ttl_secs).into());
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Value::Object(claims),
        &EncodingKey::from_secret(secret),
    )
    .map_err(|_| AuthError::Issue("signing failed".into()))
}
