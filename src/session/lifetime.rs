//! `[jwt] session_max_lifetime`: when a session must end, and what the client is told.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::SessionLifetime;
use crate::error::ClientError;

/// Why a session's deadline exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The token expired (`exp` plus the verifier's leeway).
    Token,
    /// `session_max_lifetime` as a duration.
    Lifetime,
}

impl Expiry {
    pub fn error(self) -> ClientError {
        match self {
            Expiry::Token => ClientError::TokenExpired,
            Expiry::Lifetime => ClientError::LifetimeReached,
        }
    }
}

/// The instant a session that starts now must end, per `[jwt] session_max_lifetime`.
pub fn session_deadline(
    jwt: &crate::config::JwtConfig,
    expires_at: u64,
) -> Option<(tokio::time::Instant, Expiry)> {
    deadline(
        jwt.session_max_lifetime,
        expires_at,
        jwt.leeway_secs,
        SystemTime::now(),
    )
    .map(|(left, why)| (tokio::time::Instant::now() + left, why))
}

/// How long from `now` the session may run, or `None` without a limit. A token is valid
/// until `exp + leeway` (as the verifier accepts it), so that is when its session ends.
pub fn deadline(
    limit: Option<SessionLifetime>,
    expires_at: u64,
    leeway_secs: u64,
    now: SystemTime,
) -> Option<(Duration, Expiry)> {
    match limit? {
        SessionLifetime::Fixed(d) => Some((d, Expiry::Lifetime)),
        SessionLifetime::Token => {
            let end = UNIX_EPOCH + Duration::from_secs(expires_at.saturating_add(leeway_secs));
            let left = end.duration_since(now).unwrap_or(Duration::ZERO);
            Some((left, Expiry::Token))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(deadline(None, 1_010, 0, now), None);
        assert_eq!(
            deadline(Some(SessionLifetime::Token), 1_010, 5, now),
            Some((Duration::from_secs(15), Expiry::Token))
        );
        // Already past: end at the first idle point.
        assert_eq!(
            deadline(Some(SessionLifetime::Token), 900, 0, now),
            Some((Duration::ZERO, Expiry::Token))
        );
        let hour = Duration::from_secs(3600);
        assert_eq!(
            deadline(Some(SessionLifetime::Fixed(hour)), 1_010, 0, now),
            Some((hour, Expiry::Lifetime))
        );
    }

    #[test]
    fn config_values_parse() {
        #[derive(serde::Deserialize)]
        struct T {
            v: SessionLifetime,
        }
        let parse = |s: &str| toml::from_str::<T>(&format!("v = {s:?}")).map(|t| t.v);
        assert_eq!(parse("token").unwrap(), SessionLifetime::Token);
        assert_eq!(
            parse("90m").unwrap(),
            SessionLifetime::Fixed(Duration::from_secs(5400))
        );
        assert!(parse("soon").is_err());
        assert!(parse("0s").is_err());
    }
}
