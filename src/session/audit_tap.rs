//! The session's side of the audit trail: builds events from what the session knows and hands
//! them to `Audit::record` (a queue push, never a wait), and refuses work when a fail-closed
//! audit trail cannot take more.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{
    Audit, AuditEvent, AuditLevel, EventKind, SessionInfo, SessionTotals, StatementInfo, TokenRef,
};
use crate::auth::Identity;
use crate::error::ClientError;
use crate::metrics as m;

use super::relay::{ClientFilter, CompletedStatement, Refusal};

/// One session's audit context: who it is and where the events go.
#[derive(Clone)]
pub struct SessionAudit {
    pub audit: Arc<Audit>,
    pub info: Arc<SessionInfo>,
    pub token: TokenRef,
}

impl SessionAudit {
    pub fn new(
        audit: Arc<Audit>,
        identity: &Identity,
        peer: SocketAddr,
        app: Option<&str>,
    ) -> Self {
        let info = SessionInfo {
            session_id: audit.new_session_id(),
            tenant: Some(identity.tenant.as_str().to_string()),
            user: Some(identity.user.clone()),
            upstream: None,
            client_addr: Some(peer),
            application_name: app.map(str::to_string),
        };
        SessionAudit {
            audit,
            info: Arc::new(info),
            token: TokenRef {
                kid: identity.kid.clone(),
                jti: identity.jti.clone(),
                sha256_prefix: None,
            },
        }
    }

    /// The routed upstream is known: later events carry it.
    pub fn set_upstream(&mut self, upstream: &str) {
        Arc::make_mut(&mut self.info).upstream = Some(upstream.to_string());
    }

    pub fn statements(&self) -> bool {
        self.audit.level() == AuditLevel::Statement
    }

    pub fn session_start(&self) {
        let mut event = AuditEvent::new(EventKind::SessionStart, self.info.clone(), true);
        event.token = Some(self.token.clone());
        self.audit.record(event);
    }

    /// An authenticated session that did not get a server connection, or a verified token
    /// whose tenant has no route.
    pub fn refused(&self, kind: EventKind, error: &ClientError) {
        let mut event = AuditEvent::new(kind, self.info.clone(), false);
        event.sqlstate = Some(error.sqlstate().code().to_string());
        event.reason = Some(error.label().to_string());
        event.token = Some(self.token.clone());
        self.audit.record(event);
    }

    pub fn session_end(&self, totals: SessionTotals, end: &str) {
        let mut event = AuditEvent::new(EventKind::SessionEnd, self.info.clone(), true);
        event.totals = Some(totals);
        event.reason = Some(end.to_string());
        self.audit.record(event);
    }

    pub fn statement(&self, done: CompletedStatement) {
        let success = done.sqlstate.is_none();
        let mut event = AuditEvent::new(EventKind::Statement, self.info.clone(), success);
        event.sqlstate = done.sqlstate;
        event.statement = Some(StatementInfo {
            sql: done.sql,
            index: done.index,
            command_tag: done.command_tag,
            duration: done.duration,
        });
        self.audit.record(event);
    }

    /// A statement the isolation guard refused.
    pub fn blocked(&self, sql: &str, refusal: &Refusal, rule: &str) {
        let mut event = AuditEvent::new(EventKind::Blocked, self.info.clone(), false);
        event.sqlstate = Some(refusal.code.to_string());
        event.reason = Some(rule.to_string());
        event.statement = Some(StatementInfo {
            sql: Arc::from(sql),
            index: 0,
            command_tag: None,
            duration: Duration::ZERO,
        });
        self.audit.record(event);
    }

    /// Fail-closed: a new session may start only while the audit trail can take events.
    pub fn admit(&self) -> Result<(), ClientError> {
        if self.audit.accepting() {
            return Ok(());
        }
        metrics::counter!(m::AUDIT_REFUSED_TOTAL, "what" => "session").increment(1);
        Err(ClientError::AuditFull)
    }
}

/// An authentication failure before any session exists: no token text, only its `kid` and a
/// SHA-256 prefix that correlates retries of the same token.
pub fn auth_failure(audit: &Audit, peer: SocketAddr, token: Option<&str>, error: &ClientError) {
    let info = SessionInfo {
        session_id: audit.new_session_id(),
        client_addr: Some(peer),
        ..SessionInfo::default()
    };
    let mut event = AuditEvent::new(EventKind::AuthFailure, Arc::new(info), false);
    event.sqlstate = Some(error.sqlstate().code().to_string());
    event.reason = Some(error.label().to_string());
    event.token = token.map(token_ref);
    audit.record(event);
}

fn token_ref(token: &str) -> TokenRef {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let prefix: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The header is not verified: its kid is only a hint, bounded like a verified one.
    let kid = jsonwebtoken::decode_header(token)
        .ok()
        .and_then(|h| h.kid)
        .filter(|k| k.len() <= crate::auth::MAX_KID_LEN);
    TokenRef {
        kid,
        jti: None,
        sha256_prefix: Some(prefix),
    }
}

/// Refuses statements while a fail-closed audit trail cannot take more events.
pub struct AuditGate<'a> {
    pub audit: &'a Audit,
}

impl AuditGate<'_> {
    fn check(&self) -> Option<Refusal> {
        if self.audit.accepting() {
            return None;
        }
        metrics::counter!(m::AUDIT_REFUSED_TOTAL, "what" => "statement").increment(1);
        Some(Refusal {
            code: "57P03",
            message: "pgtenant: the audit trail cannot record more events (audit spool full, on_full = fail_closed); statements are refused until it drains".into(),
        })
    }
}

impl ClientFilter for AuditGate<'_> {
    fn check_sql(&self, _sql: &str) -> Option<Refusal> {
        self.check()
    }
    fn check_function_call(&self) -> Option<Refusal> {
        self.check()
    }
    fn check_execution(&self) -> Option<Refusal> {
        self.check()
    }
}

/// Filters applied in order; the first refusal wins.
pub struct FilterChain<'a> {
    pub filters: Vec<&'a dyn ClientFilter>,
}

impl ClientFilter for FilterChain<'_> {
    fn check_sql(&self, sql: &str) -> Option<Refusal> {
        self.filters.iter().find_map(|f| f.check_sql(sql))
    }
    fn check_function_call(&self) -> Option<Refusal> {
        self.filters.iter().find_map(|f| f.check_function_call())
    }
    fn check_execution(&self) -> Option<Refusal> {
        self.filters.iter().find_map(|f| f.check_execution())
    }
    fn check_parse(&self, name: &[u8], sql: &str) -> Option<Refusal> {
        self.filters.iter().find_map(|f| f.check_parse(name, sql))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ref_never_holds_the_token() {
        let token = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ4In0.c2ln";
        let r = token_ref(token);
        assert_eq!(r.kid.as_deref(), Some("k1"));
        let prefix = r.sha256_prefix.unwrap();
        assert_eq!(prefix.len(), 16);
        assert!(!token.contains(&prefix));
        assert_eq!(token_ref("not a jwt").kid, None);
    }
}
