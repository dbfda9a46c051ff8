//! The audit trail: every access written to an audit table, spooled locally first so nothing
//! is lost while the audit database is slow or away.
//!
//! - `event`: `AuditEvent` (built on the hot path) and `AuditRecord` (one table row)
//! - `config`: `[audit]`
//! - `spool`: segmented append-only files; events are removed after their batch committed
//! - `schema`: the table's DDL and `pgtenant audit init`
//! - `ship`: batched, idempotent INSERTs from the audit role's own connection

pub mod config;
pub mod event;
pub mod schema;
pub mod ship;
pub mod spool;

pub use config::{AuditConfig, AuditLevel, AuditSink, FsyncMode, OnFull};
pub use event::{
    AuditEvent, AuditRecord, EventKind, SessionInfo, SessionTotals, StatementInfo, TokenRef,
};

#[cfg(test)]
pub(crate) mod tests;
