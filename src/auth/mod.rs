//! JWT verification: the client's password is a JWT; this module checks it and returns an
//! [`Identity`] (tenant, user, audit fields) or an [`AuthError`] that maps to a SQLSTATE.
//!
//! The rules follow RFC 8725 and `design/isolation.md` ("JWT rules"), tightening
//! jsonwebtoken's defaults (`design/protocol.md`, trap 12):
//! - the header's `alg` must be in the configured allow-list *and* fit the selected key;
//!   `none` is never accepted, and keys are bound to their algorithm family at load time;
//! - `exp` is required, `nbf` is validated, `iat` may not lie in the future, leeway comes
//!   from the config; `iss`/`aud` are required when configured;
//! - `crit` headers are refused, `jku`/`x5u`/`jwk`/`x5c` are never followed, `kid` is an
//!   opaque bounded string;
//! - the token's size is capped and JSON objects with duplicate members are refused, so a
//!   second `tenant_id` cannot hide behind the first;
//! - the tenant claim must be a string matching the anchored `tenant_pattern`.
//!
//! Error messages reach clients verbatim, so they say why a token failed but never echo the
//! token, claim values, secrets or key material.

mod claims;
mod error;
mod jwks_fetch;
mod jwks_url;
mod jwt;
mod keys;

#[cfg(test)]
mod tests;

pub use error::AuthError;
pub use jwks_url::JwksSource;
pub use jwt::{issue_hs256, JwtVerifier};

use crate::tenant::TenantId;

/// Longest compact token accepted. Real tokens are a few hundred bytes to a few KiB; the cap
/// bounds base64 and JSON work done before the signature is checked.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Longest `kid` accepted; it is an opaque map key that ends up in audit records.
pub const MAX_KID_LEN: usize = 256;

/// Longest user name or `jti` kept; both go to audit records and logs.
pub const MAX_USER_LEN: usize = 256;

/// The value of the claim `name` (dots address nested claims, as for `tenant_claim`) in a
/// verified token's claims; `None` when absent or when `name` is not a valid claim path.
pub fn claim<'a>(claims: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    let path = claims::ClaimPath::parse(name).ok()?;
    path.lookup(claims.as_object()?)
}

/// Who a verified token speaks for. Holds no token text, so it is safe to log and audit.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The tenant, already checked against `tenant_pattern`.
    pub tenant: TenantId,
    /// From `user_claim` (default `sub`); numbers are rendered as decimal text.
    pub user: String,
    /// The header's key id, for audit (which key signed this session's token).
    pub kid: Option<String>,
    /// The token id, for audit; `None` when absent, not a string, or longer than
    /// [`MAX_USER_LEN`].
    pub jti: Option<String>,
    /// `exp`, unix seconds: the session layer may end sessions that outlive their token.
    pub expires_at: u64,
    /// Every claim of the verified token, for policies that need more than tenant and user.
    pub claims: serde_json::Value,
}
