//! `AuthError`: why a token was refused, as a client-safe message, a SQLSTATE class and a
//! metric label.

/// Why authentication failed or the verifier could not be built.
///
/// `Display` goes to clients verbatim: every message states the reason and none contains
/// the token, a claim value, a secret or key material. Claim *names* (from the config or
/// the registered set) may appear; claim *values* never do.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The compact token exceeds [`super::MAX_TOKEN_LEN`].
    #[error("token is too large")]
    TooLarge,
    /// Not a well-formed JWS compact token; the detail is a fixed string, never parser output
    /// (serde errors can quote input).
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is `none`, unknown, outside the allow-list, or unfit for the key.
    #[error("token algorithm is not allowed")]
    AlgorithmNotAllowed,
    /// The header lists `crit` extensions; none are supported, so RFC 7515 says reject.
    #[error("token header has critical extensions (\"crit\"), which are not supported")]
    CritHeader,
    /// The token's `kid` names no configured key.
    #[error("token signed with an unknown key id")]
    UnknownKid,
    /// The token has no `kid` but several keys are configured, so none can be chosen.
    #[error("token has no key id (\"kid\") and several keys are configured")]
    MissingKid,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token expired")]
    Expired,
    /// `nbf` lies in the future beyond the leeway.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iat` lies in the future beyond the leeway: a clock problem or a forged lifetime.
    #[error("token was issued in the future")]
    IssuedInFuture,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    /// A registered claim the config requires (`exp`, or `iss`/`aud` when configured) is
    /// absent, or present with a type jsonwebtoken cannot read (it reports both alike).
    #[error("token has no valid \"{0}\" claim")]
    MissingRegisteredClaim(&'static str),
    /// A registered claim (`exp`, `nbf`, `iat`) that is not a NumericDate.
    #[error("token claim \"{0}\" has an invalid format")]
    InvalidRegisteredClaim(&'static str),
    /// The crypto backend refused the key for this algorithm, or another verification
    /// failure the crate does not classify further.
    #[error("token could not be verified")]
    VerificationFailed,
    /// The token is valid but lacks the tenant or user claim. The name comes from the config.
    #[error("token is missing claim \"{claim}\"")]
    MissingClaim { claim: String },
    /// The tenant claim is a number, array, object, bool or null.
    #[error("token claim \"{claim}\" must be a string")]
    TenantNotString { claim: String },
    /// The tenant claim does not match `tenant_pattern`. The value is not echoed.
    #[error("tenant id does not match the allowed pattern")]
    InvalidTenant,
    /// The user claim is empty, too long, has control characters, or is not a string/number.
    #[error("token claim \"{claim}\" is not a valid user name")]
    InvalidUser { claim: String },
    /// The JWT configuration or a key file is unusable. Raised by `from_config` only, so it
    /// goes to the operator's log, not to clients.
    #[error("invalid JWT configuration: {0}")]
    Config(String),
    /// The crypto backend failed its startup self test.
    #[error("JWT crypto backend self test failed: {0}")]
    Backend(&'static str),
    /// `issue_hs256` was given unusable input.
    #[error("cannot issue token: {0}")]
    Issue(String),
    /// `jwks_url`: no key set is usable (never fetched, or every fetch failed for longer
    /// than `jwks_max_staleness`). Not the token's fault, and worth retrying.
    #[error("the token signing keys are unavailable (the key set could not be refreshed); try again later")]
    KeysUnavailable,
}

impl AuthError {
    /// true → SQLSTATE 28P01 (invalid_password): the token itself is bad, expired, forged or
    /// unverifiable. false → 28000 (invalid_authorization_specification): the token is
    /// genuine but grants no access (missing or unacceptable tenant/user claim); also false
    /// for configuration and backend errors, which are not about a client's token.
    pub fn is_invalid_token(&self) -> bool {
        match self {
            AuthError::TooLarge
            | AuthError::Malformed(_)
            | AuthError::AlgorithmNotAllowed
            | AuthError::CritHeader
            | AuthError::UnknownKid
            | AuthError::MissingKid
            | AuthError::BadSignature
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::IssuedInFuture
            | AuthError::WrongIssuer
            | AuthError::WrongAudience
            | AuthError::MissingRegisteredClaim(_)
            | AuthError::InvalidRegisteredClaim(_)
            | AuthError::VerificationFailed => true,
            AuthError::MissingClaim { .. }
            | AuthError::TenantNotString { .. }
            | AuthError::InvalidTenant
            | AuthError::InvalidUser { .. }
            | AuthError::Config(_)
            | AuthError::Backend(_)
            | AuthError::Issue(_)
            | AuthError::KeysUnavailable => false,
        }
    }

    /// Short stable label for metrics (`reason="..."`); a fixed set, never derived from input.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::TooLarge => "too_large",
            AuthError::Malformed(_) | AuthError::InvalidRegisteredClaim(_) => "malformed",
            AuthError::AlgorithmNotAllowed => "algorithm",
            AuthError::CritHeader => "crit_header",
            AuthError::UnknownKid => "unknown_kid",
            AuthError::MissingKid => "missing_kid",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::IssuedInFuture => "issued_in_future",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingRegisteredClaim(_) => "missing_registered_claim",
            AuthError::VerificationFailed => "verification_failed",
            AuthError::MissingClaim { .. } => "missing_claim",
            AuthError::TenantNotString { .. } | AuthError::InvalidTenant => "invalid_tenant",
            AuthError::InvalidUser { .. } => "invalid_user",
            AuthError::Config(_) => "config",
            AuthError::Backend(_) => "crypto_backend",
            AuthError::Issue(_) => "issue",
            AuthError::KeysUnavailable => "jwks_unavailable",
        }
    }
}
