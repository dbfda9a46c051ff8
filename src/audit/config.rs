//! `[audit]`: where events go, how much is recorded, and what happens when the spool is full.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit database, logged in as a role that may only INSERT into `table`
    /// (`pgtenant audit init` sets it up). Never a tenant's connection: a client could roll
    /// its own rows back.
    pub url: String,
    /// Table name, optionally schema-qualified. Default `audit_tenant_access` (the seeds' name).
    #[serde(default = "AuditConfig::default_table")]
    pub table: String,
    /// `session` (session start/end, auth failures, blocked statements) or `statement`
    /// (plus one event per executed statement). Default `statement`.
    #[serde(default)]
    pub level: AuditLevel,
    /// Append-only local spool: every event is written here before it is shipped.
    #[serde(default = "AuditConfig::default_spool_dir")]
    pub spool_dir: PathBuf,
    /// The spool refuses more events past this size. Default 1 GiB.
    #[serde(default = "AuditConfig::default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// A spool segment file is closed and a new one started past this size. Default 16 MiB.
    #[serde(default = "AuditConfig::default_segment_bytes")]
    pub spool_segment_bytes: u64,
    /// `batch` (default): fsync the spool after every appended batch, so events survive a
    /// power loss too; `off`: leave it to the OS (events still survive `kill -9`).
    #[serde(default)]
    pub fsync: FsyncMode,
    /// What happens when the spool cannot take more. Default `fail_closed`.
    #[serde(default)]
    pub on_full: OnFull,
    /// Events waiting in memory for the spool writer, at most; past this the spool counts
    /// as full. Default 100000.
    #[serde(default = "AuditConfig::default_queue_capacity")]
    pub queue_capacity: usize,
    /// Events are collected this long before one write (and fsync) appends them to the spool:
    /// the group-commit window. Longer costs fewer fsyncs, shorter narrows what a `kill -9`
    /// can lose (events not yet written). Default 10ms.
    #[serde(
        with = "humantime_serde",
        default = "AuditConfig::default_flush_interval"
    )]
    pub flush_interval: Duration,
    /// Rows per INSERT into the audit table, at most. Default 2000.
    #[serde(default = "AuditConfig::default_batch_size")]
    pub batch_size: usize,
    /// Store the statement text (truncated to `statement_text_max_bytes`). Default false:
    /// only the normalized fingerprint, which holds no literals.
    #[serde(default)]
    pub log_statement_text: bool,
    /// Default 1024.
    #[serde(default = "AuditConfig::default_statement_text_max")]
    pub statement_text_max_bytes: usize,
    /// `central` (default): every event goes to `url`. `tenant`: events of sessions on a
    /// dedicated upstream with an `audit_url` go to that tenant's own database instead.
    #[serde(default)]
    pub sink: AuditSink,
    /// Connect and statement deadline towards the audit database. Default 5s.
    #[serde(
        with = "humantime_serde",
        default = "AuditConfig::default_ship_timeout"
    )]
    pub ship_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AuditLevel {
    Session,
    #[default]
    Statement,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// New sessions get 57P03 and statements are refused until the spool has room.
    #[default]
    FailClosed,
    /// Service goes on; events that do not fit are dropped and counted.
    FailOpen,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    #[default]
    Batch,
    Off,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuditSink {
    #[default]
    Central,
    Tenant,
}

impl AuditConfig {
    fn default_table() -> String {
        "audit_tenant_access".into()
    }
    fn default_spool_dir() -> PathBuf {
        "/var/lib/pgtenant/spool".into()
    }
    fn default_spool_max_bytes() -> u64 {
        1 << 30
    }
    fn default_segment_bytes() -> u64 {
        16 << 20
    }
    fn default_queue_capacity() -> usize {
        100_000
    }
    fn default_batch_size() -> usize {
        2000
    }
    fn default_flush_interval() -> Duration {
        Duration::from_millis(10)
    }
    fn default_statement_text_max() -> usize {
        1024
    }
    fn default_ship_timeout() -> Duration {
        Duration::from_secs(5)
    }

    /// Checks that do not need I/O.
    pub fn validate(&self) -> Result<(), String> {
        crate::pool::UpstreamTarget::from_url(&self.url).map_err(|e| format!("audit.url: {e}"))?;
        super::schema::TableName::parse(&self.table).map_err(|e| format!("audit.table: {e}"))?;
        if self.spool_segment_bytes < 4096 || self.spool_segment_bytes > self.spool_max_bytes {
            return Err(
                "audit.spool_segment_bytes must be at least 4096 and at most spool_max_bytes"
                    .into(),
            );
        }
        if self.batch_size == 0 || self.batch_size > 50_000 {
            return Err("audit.batch_size must be between 1 and 50000".into());
        }
        if self.flush_interval > Duration::from_secs(1) {
            return Err(
                "audit.flush_interval above 1s is refused (events wait in memory that long)".into(),
            );
        }
        if self.queue_capacity == 0 {
            return Err("audit.queue_capacity must be at least 1".into());
        }
        Ok(())
    }
}
