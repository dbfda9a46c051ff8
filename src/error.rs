//! The edge: every error a client can see, mapped to SQLSTATE, message and metric label in
//! one place. Module errors convert into `ClientError`; only this file chooses SQLSTATEs.
//! Server ErrorResponses are relayed unchanged and never pass through here.

use tokio_postgres::error::SqlState;

use crate::auth::AuthError;
use crate::pool::{PoolError, ServerError};
use crate::protocol::frame::{FrameError, ReadFrameError};
use crate::protocol::messages::Severity;
use crate::tenant::{DirectoryError, ResolveError, RouteError};

/// SQLSTATE of a statement refused in transaction mode because it needs session state on the
/// server (`session_features = "refuse"`): feature_not_supported.
pub const SESSION_FEATURE_REFUSED: &str = "0A000";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("TLS is required: connect with sslmode=require")]
    TlsRequired,
    #[error("pgtenant refuses a password over a plaintext connection from a non-loopback address: connect with sslmode=require")]
    CleartextRefused,
    #[error("authentication timed out")]
    AuthTimeout,
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Route(#[from] RouteError),
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("too many client connections to pgtenant")]
    TooManyClients,
    #[error("pgtenant is shutting down")]
    ShuttingDown,
    #[error("pgtenant cannot record more audit events (audit spool full, on_full = fail_closed); new sessions are refused until the audit trail drains")]
    AuditFull,
    #[error("the tenant context could not be established on the server connection")]
    Context(ServerError),
    #[error("the server connection was lost")]
    ServerLost,
    #[error("client connection lost: {0}")]
    ClientIo(#[from] std::io::Error),
    /// An administrator ended the session from the console (KILL/SUSPEND TENANT).
    #[error("terminating connection: {0}")]
    Killed(String),
    #[error(
        "tenant \"{0}\" is suspended: new sessions are refused until an administrator resumes it"
    )]
    TenantSuspended(String),
    #[error("session ended: the token expired; reconnect with a new token")]
    TokenExpired,
    #[error("session ended: it reached [jwt] session_max_lifetime; reconnect")]
    LifetimeReached,
    #[error("the console needs a token with the admin claim")]
    NotAdmin,
    /// A console command failed; the console session goes on (severity ERROR).
    #[error("{0}")]
    Console(#[from] crate::console::ConsoleError),
    #[error("{0}")]
    Directory(#[from] DirectoryError),
}

impl From<ResolveError> for ClientError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Route(e) => ClientError::Route(e),
            ResolveError::Directory(e) => ClientError::Directory(e),
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Protocol(format!("invalid frontend message: {e}"))
    }
}

impl From<ReadFrameError> for ClientError {
    fn from(e: ReadFrameError) -> Self {
        match e {
            ReadFrameError::Io(io) => ClientError::ClientIo(io),
            ReadFrameError::Frame(f) => f.into(),
        }
    }
}

/// What the client is sent: severity, SQLSTATE and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub severity: Severity,
    pub code: String,
    pub message: String,
}

impl ClientError {
    /// SQLSTATE for this error (see design/isolation.md's table).
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ClientError::Protocol(_) => SqlState::PROTOCOL_VIOLATION,
            ClientError::Unsupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
            ClientError::TlsRequired | ClientError::CleartextRefused => {
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            }
            ClientError::AuthTimeout => SqlState::PROTOCOL_VIOLATION,
            // Retryable: the issuer's key set is out of reach, the token may be fine.
            ClientError::Auth(AuthError::KeysUnavailable) => SqlState::CANNOT_CONNECT_NOW,
            ClientError::Auth(e) if e.is_invalid_token() => SqlState::INVALID_PASSWORD,
            ClientError::Auth(_) | ClientError::Route(_) => {
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            }
            ClientError::Pool(PoolError::Exhausted { .. }) => SqlState::TOO_MANY_CONNECTIONS,
            ClientError::Pool(PoolError::TenantExhausted { .. }) => SqlState::TOO_MANY_CONNECTIONS,
            ClientError::Pool(PoolError::Unreachable { .. }) => {
                SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION
            }
            ClientError::Pool(PoolError::UnknownUpstream(_)) => SqlState::INTERNAL_ERROR,
            ClientError::Pool(PoolError::Setup {
                source: ServerError::Db { code, .. },
                ..
            }) => SqlState::from_code(code),
            ClientError::Pool(PoolError::Setup { .. }) => SqlState::CONNECTION_FAILURE,
            ClientError::TooManyClients => SqlState::TOO_MANY_CONNECTIONS,
            ClientError::ShuttingDown => SqlState::ADMIN_SHUTDOWN,
            ClientError::AuditFull => SqlState::CANNOT_CONNECT_NOW,
            ClientError::Context(ServerError::Db { code, .. }) if code == "28000" => {
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            }
            ClientError::Context(_) => SqlState::CANNOT_CONNECT_NOW,
            ClientError::ServerLost | ClientError::ClientIo(_) => SqlState::CONNECTION_FAILURE,
            ClientError::Directory(DirectoryError::Suspended) => {
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            }
            // Retryable: the metadata database may be back in a moment.
            ClientError::Directory(DirectoryError::Unavailable) => SqlState::CANNOT_CONNECT_NOW,
            ClientError::Directory(DirectoryError::Invalid { .. }) => SqlState::INTERNAL_ERROR,
            ClientError::Killed(_) => SqlState::ADMIN_SHUTDOWN,
            ClientError::TenantSuspended(_) | ClientError::TokenExpired | ClientError::NotAdmin => {
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            }
            ClientError::LifetimeReached => SqlState::ADMIN_SHUTDOWN,
            ClientError::Console(e) => console_sqlstate(e),
        }
    }

    /// The message sent to the client. Internal detail (I/O errors of the server side,
    /// addresses) is summarized; nothing here may contain a token or password.
    pub fn to_wire(&self) -> WireError {
        let message = match self {
            ClientError::Pool(PoolError::Setup {
                source: ServerError::Db { message, .. },
                ..
            }) => {
                format!("could not apply the session's settings: {message}")
            }
            ClientError::Pool(PoolError::Setup { pool, .. }) => {
                format!("server connection from pool \"{pool}\" failed while preparing the session")
            }
            other => other.to_string(),
        };
        let severity = match self {
            ClientError::Console(_) => Severity::Error,
            _ => Severity::Fatal,
        };
        WireError {
            severity,
            code: self.sqlstate().code().to_string(),
            message,
        }
    }

    /// Metric label for auth failures and refused sessions.
    pub fn label(&self) -> &'static str {
        match self {
            ClientError::Protocol(_) => "protocol",
            ClientError::Unsupported(_) => "unsupported",
            ClientError::TlsRequired => "tls_required",
            ClientError::CleartextRefused => "cleartext_refused",
            ClientError::AuthTimeout => "timeout",
            ClientError::Auth(e) => e.reason(),
            ClientError::Route(_) => "unknown_tenant",
            ClientError::Pool(PoolError::Exhausted { .. }) => "pool_exhausted",
            ClientError::Pool(PoolError::TenantExhausted { .. }) => "tenant_pool_exhausted",
            ClientError::Pool(PoolError::Unreachable { .. }) => "upstream_unreachable",
            ClientError::Pool(PoolError::UnknownUpstream(_)) => "unknown_upstream",
            ClientError::Pool(PoolError::Setup { .. }) => "server_setup",
            ClientError::TooManyClients => "too_many_clients",
            ClientError::ShuttingDown => "shutting_down",
            ClientError::AuditFull => "audit_full",
            ClientError::Context(_) => "context",
            ClientError::ServerLost => "server_lost",
            ClientError::ClientIo(_) => "client_io",
            ClientError::Directory(DirectoryError::Suspended) => "tenant_suspended",
            ClientError::Directory(DirectoryError::Unavailable) => "directory_unavailable",
            ClientError::Directory(DirectoryError::Invalid { .. }) => "directory_invalid",
            ClientError::Killed(_) => "killed",
            ClientError::TenantSuspended(_) => "tenant_suspended",
            ClientError::TokenExpired => "token_expired",
            ClientError::LifetimeReached => "lifetime",
            ClientError::NotAdmin => "not_admin",
            ClientError::Console(_) => "console",
        }
    }
}

/// SQLSTATE of a client message the prepared-statement layer refuses in band (severity
/// ERROR, the session goes on), the codes PostgreSQL itself uses for the same refusals.
pub fn statement_refusal_sqlstate(e: &crate::prepared::StatementRefusal) -> SqlState {
    use crate::prepared::StatementRefusal;
    match e {
        StatementRefusal::Duplicate(_) => SqlState::DUPLICATE_PSTATEMENT,
        StatementRefusal::Missing(_) => SqlState::INVALID_SQL_STATEMENT_NAME,
        StatementRefusal::TooMany(_) => SqlState::CONFIGURATION_LIMIT_EXCEEDED,
    }
}

fn console_sqlstate(e: &crate::console::ConsoleError) -> SqlState {
    use crate::console::ConsoleError;
    match e {
        ConsoleError::Syntax(_) => SqlState::SYNTAX_ERROR,
        ConsoleError::Unsupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
        ConsoleError::Reload(_) => SqlState::CONFIG_FILE_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_follow_the_design_table() {
        let cases: Vec<(ClientError, &str)> = vec![
            (ClientError::Protocol("x".into()), "08P01"),
            (FrameError::TooLarge { len: 10, max: 5 }.into(), "08P01"),
            (ClientError::Unsupported("replication".into()), "0A000"),
            (ClientError::TlsRequired, "28000"),
            (ClientError::CleartextRefused, "28000"),
            (RouteError::UnknownTenant("t".into()).into(), "28000"),
            (
                PoolError::Exhausted {
                    pool: "shared".into(),
                    waited_ms: 5,
                }
                .into(),
                "53300",
            ),
            (
                PoolError::Unreachable {
                    pool: "shared".into(),
                    reason: "refused".into(),
                }
                .into(),
                "08001",
            ),
            (ClientError::ShuttingDown, "57P01"),
            (DirectoryError::Suspended.into(), "28000"),
            (DirectoryError::Unavailable.into(), "57P03"),
            (
                DirectoryError::Invalid {
                    tenant: "t".into(),
                    reason: "r".into(),
                }
                .into(),
                "XX000",
            ),
            (ClientError::AuditFull, "57P03"),
            (AuthError::KeysUnavailable.into(), "57P03"),
            (AuthError::UnknownKid.into(), "28P01"),
            (ClientError::Killed("tenant t killed".into()), "57P01"),
            (ClientError::TenantSuspended("t".into()), "28000"),
            (ClientError::TokenExpired, "28000"),
            (ClientError::LifetimeReached, "57P01"),
            (ClientError::NotAdmin, "28000"),
            (
                crate::console::ConsoleError::Syntax("x".into()).into(),
                "42601",
            ),
            (
                crate::console::ConsoleError::Unsupported("x".into()).into(),
                "0A000",
            ),
            (
                crate::console::ConsoleError::Reload("x".into()).into(),
                "F0000",
            ),
            (
                PoolError::Setup {
                    pool: "shared".into(),
                    source: ServerError::Db {
                        code: "22023".into(),
                        message: "bad TimeZone".into(),
                        severity: "ERROR".into(),
                    },
                }
                .into(),
                "22023",
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.to_wire().code, code, "{err:?}");
        }
    }

    #[test]
    fn directory_refusals_say_what_happened() {
        let suspended = ClientError::from(DirectoryError::Suspended).to_wire();
        assert_eq!(suspended.message, "tenant suspended");
        let down = ClientError::from(DirectoryError::Unavailable).to_wire();
        assert_eq!(down.message, "tenant directory unavailable");
    }

    #[test]
    fn console_errors_keep_the_session() {
        let e: ClientError = crate::console::ConsoleError::Syntax("x".into()).into();
        assert_eq!(e.to_wire().severity, Severity::Error);
        assert_eq!(ClientError::NotAdmin.to_wire().severity, Severity::Fatal);
    }

    #[test]
    fn exhausted_message_names_the_pool() {
        let e: ClientError = PoolError::Exhausted {
            pool: "shared".into(),
            waited_ms: 5000,
        }
        .into();
        assert!(e.to_wire().message.contains("shared"));
    }
}
