//! What an audit event holds: in memory as the session produces it (`AuditEvent`, cheap to
//! build on the hot path), and flat as it is spooled and shipped (`AuditRecord`, one row of the
//! audit table).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The kinds of event, as stored in the `event` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A session was authenticated, routed and given a server connection.
    SessionStart,
    /// A session ended (duration, bytes, statements).
    SessionEnd,
    /// A client failed to authenticate (bad token, unknown tenant, timeout).
    AuthFailure,
    /// An authenticated session was refused (pool exhausted, upstream down, context failed,
    /// audit spool full).
    SessionRefused,
    /// A statement ran (level = "statement"): command tag or SQLSTATE.
    Statement,
    /// The isolation guard refused a statement.
    Blocked,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionStart => "session_start",
            EventKind::SessionEnd => "session_end",
            EventKind::AuthFailure => "auth_failure",
            EventKind::SessionRefused => "session_refused",
            EventKind::Statement => "statement",
            EventKind::Blocked => "blocked",
        }
    }
}

/// Who and where, shared by every event of one session (one allocation per session).
#[derive(Debug, Clone, Default)]
pub struct SessionInfo {
    /// pgtenant's id for this client connection, unique within the instance.
    pub session_id: u64,
    pub tenant: Option<String>,
    pub user: Option<String>,
    pub upstream: Option<String>,
    pub client_addr: Option<SocketAddr>,
    pub application_name: Option<String>,
}

/// One event as the session produces it. Statement text is shared (`Arc<str>`), never copied
/// per execution; the fingerprint and table names are computed off the hot path.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub time: SystemTime,
    pub kind: EventKind,
    pub session: Arc<SessionInfo>,
    pub statement: Option<StatementInfo>,
    pub success: bool,
    /// SQLSTATE of the failure, if any.
    pub sqlstate: Option<String>,
    /// Why: an auth failure reason, a guard rule, a refusal label.
    pub reason: Option<String>,
    /// Session end: the session's totals.
    pub totals: Option<SessionTotals>,
    /// Auth failures: the token's `kid`, `jti` and a SHA-256 prefix, never the token.
    pub token: Option<TokenRef>,
}

#[derive(Debug, Clone)]
pub struct StatementInfo {
    /// The text of the Query or prepared statement that ran.
    pub sql: Arc<str>,
    /// Which statement of a multi-statement simple Query this is (0-based).
    pub index: u32,
    /// `SELECT 5`, `INSERT 0 1`, ...; `None` when it failed.
    pub command_tag: Option<String>,
    pub duration: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SessionTotals {
    pub duration: Duration,
    pub client_bytes: u64,
    pub server_bytes: u64,
    pub statements: u64,
}

#[derive(Debug, Clone, Default)]
pub struct TokenRef {
    pub kid: Option<String>,
    pub jti: Option<String>,
    /// First 16 hex digits of SHA-256 over the token: correlates retries, reveals nothing.
    pub sha256_prefix: Option<String>,
}

impl AuditEvent {
    /// An event with only the essentials set; callers fill in the rest.
    pub fn new(kind: EventKind, session: Arc<SessionInfo>, success: bool) -> Self {
        AuditEvent {
            time: SystemTime::now(),
            kind,
            session,
            statement: None,
            success,
            sqlstate: None,
            reason: None,
            totals: None,
            token: None,
        }
    }
}

/// One row of the audit table: what is spooled (as JSON) and shipped. Field names are the
/// table's column names. Empty fields are left out of the JSON (a statement event is about
/// half as long), and read back as empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unique event key: instance id + sequence. Replays are absorbed by a unique index.
    pub event_instance: String,
    pub event_seq: i64,
    /// Microseconds since the Unix epoch (stored as timestamptz `access_time`).
    pub access_time_us: i64,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_port: Option<i32>,
    /// The client's application_name (the seeds' `user_agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// First table the statement names (schema-qualified as written), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_name: Option<String>,
    /// Every table the statement names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// SELECT, INSERT, UPDATE, DELETE, ... (first word of the command tag, or of the statement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<i64>,
    /// Normalized statement fingerprint (hex); literals never reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Statement text, only with `log_statement_text = true`, truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statements: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_fields_are_left_out_of_the_spooled_json_and_read_back_empty() {
        let mut record = crate::audit::tests::sample_record();
        record.tenant_id = None;
        record.tables.clear();
        let json = serde_json::to_string(&record).unwrap();
        assert!(
            !json.contains("tenant_id") && !json.contains("\"tables\""),
            "{json}"
        );
        let back: AuditRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
    }
}
