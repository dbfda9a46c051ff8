//! The spool writer: one thread that takes events from the sessions' queue, turns them into
//! table rows (event key, fingerprint, tables) and appends them to the spool in batches, one
//! write and one fsync per batch (group commit).
//!
//! A thread, not a task: fingerprinting and fsync are CPU and blocking I/O that must not sit
//! on the runtime's workers, which relay the sessions.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tracing::{error, warn};

use super::event::{AuditEvent, AuditRecord, EventKind};
use super::spool::{SpoolError, SpoolWriter};
use super::summary::{StatementSummary, Summarizer};
use super::{AuditConfig, AuditShared, OnFull};
use crate::metrics as m;
use crate::session::relay::statements::rows_of;

/// Events taken from the queue per batch, at most.
const MAX_BATCH_EVENTS: usize = 8192;

/// Where one destination's records go.
pub(super) struct SpoolTarget {
    pub label: String,
    pub writer: SpoolWriter,
}

pub(super) struct Writer {
    pub rx: Receiver<AuditEvent>,
    pub shared: Arc<AuditShared>,
    pub config: Arc<AuditConfig>,
    pub instance: String,
    pub central: SpoolTarget,
    /// Dedicated upstreams whose events go to the tenant's own database, by upstream name.
    pub tenants: HashMap<String, SpoolTarget>,
    pub seq: i64,
    pub summarizer: Summarizer,
}

impl Writer {
    pub fn run(mut self) {
        let mut events = Vec::with_capacity(1024);
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(event) => events.push(event),
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.closing.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Group commit: let the window fill, so many sessions' events share one write
            // and one fsync. Sleeping (not waiting on the queue) also means sessions pushing
            // events meanwhile never have to wake this thread.
            std::thread::sleep(self.config.flush_interval);
            while events.len() < MAX_BATCH_EVENTS {
                match self.rx.try_recv() {
                    Ok(event) => events.push(event),
                    Err(_) => break,
                }
            }
            self.shared.queued.fetch_sub(events.len(), Ordering::AcqRel);
            self.write(&mut events);
        }
    }

    fn write(&mut self, events: &mut Vec<AuditEvent>) {
        let mut central = Vec::with_capacity(events.len());
        let mut tenants: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for event in events.drain(..) {
            let record = self.record_of(event);
            let Ok(bytes) = serde_json::to_vec(&record) else {
                continue;
            };
            match record
                .upstream
                .as_deref()
                .filter(|u| self.tenants.contains_key(*u))
            {
                Some(upstream) => tenants.entry(upstream.to_string()).or_default().push(bytes),
                None => central.push(bytes),
            }
        }
        if !central.is_empty() {
            append(&mut self.central, &central, &self.shared, &self.config);
        }
        for (upstream, records) in tenants {
            if let Some(target) = self.tenants.get_mut(&upstream) {
                append(target, &records, &self.shared, &self.config);
            }
        }
    }

    fn record_of(&mut self, event: AuditEvent) -> AuditRecord {
        self.seq += 1;
        let s = &event.session;
        let mut record = AuditRecord {
            event_instance: self.instance.clone(),
            event_seq: self.seq,
            access_time_us: event
                .time
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0),
            event: event.kind.as_str().to_string(),
            tenant_id: s.tenant.clone(),
            user_id: s.user.clone(),
            session_id: (s.session_id != 0).then_some(s.session_id as i64),
            upstream: s.upstream.clone(),
            client_ip: s.client_addr.map(|a| a.ip().to_string()),
            client_port: s.client_addr.map(|a| i32::from(a.port())),
            user_agent: s.application_name.clone(),
            table_name: None,
            tables: Vec::new(),
            operation: session_operation(event.kind).map(str::to_string),
            success: event.success,
            sqlstate: event.sqlstate,
            command_tag: None,
            rows: None,
            duration_us: None,
            fingerprint: None,
            statement: None,
            reason: event.reason,
            token_kid: None,
            token_jti: None,
            token_sha256: None,
            client_bytes: None,
            server_bytes: None,
            statements: None,
        };
        if let Some(token) = event.token {
            record.token_kid = token.kid;
            record.token_jti = token.jti;
            record.token_sha256 = token.sha256_prefix;
        }
        if let Some(t) = event.totals {
            record.duration_us = Some(t.duration.as_micros() as i64);
            record.client_bytes = Some(t.client_bytes as i64);
            record.server_bytes = Some(t.server_bytes as i64);
            record.statements = Some(t.statements as i64);
        }
        if let Some(st) = event.statement {
            let summaries = self.summarizer.summarize(&st.sql);
            let fallback = StatementSummary::default();
            let summary = summaries
                .get(st.index as usize)
                .or(summaries.last())
                .unwrap_or(&fallback);
            record.fingerprint = summary.fingerprint.clone();
            record.table_name = summary.tables.first().cloned();
            record.tables = summary.tables.clone();
            record.operation = st
                .command_tag
                .as_deref()
                .and_then(|t| t.split(' ').next())
                .map(str::to_string)
                .or_else(|| summary.keyword.clone());
            record.rows = st
                .command_tag
                .as_deref()
                .and_then(rows_of)
                .map(|r| r as i64);
            record.command_tag = st.command_tag;
            record.duration_us = Some(st.duration.as_micros() as i64);
            if self.config.log_statement_text {
                let text = st.sql.get(summary.range.clone()).unwrap_or(&st.sql).trim();
                record.statement = Some(truncate(text, self.config.statement_text_max_bytes));
            }
        }
        record
    }
}

/// The seeds' `operation` column for events that are not statements.
fn session_operation(kind: EventKind) -> Option<&'static str> {
    match kind {
        EventKind::SessionStart | EventKind::SessionRefused => Some("CONNECT"),
        EventKind::SessionEnd => Some("DISCONNECT"),
        EventKind::AuthFailure => Some("AUTHENTICATE"),
        EventKind::Statement | EventKind::Blocked => None,
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Appends one batch, applying `on_full` when the spool cannot take it.
fn append(
    target: &mut SpoolTarget,
    records: &[Vec<u8>],
    shared: &AuditShared,
    config: &AuditConfig,
) {
    let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
    // When the last "still full" warning was logged: one a minute, not one per retry.
    let mut warned_at: Option<Instant> = None;
    loop {
        let reason = match target.writer.append(&refs) {
            Ok(()) => {
                metrics::counter!(m::AUDIT_EVENTS_SPOOLED_TOTAL, "sink" => target.label.clone())
                    .increment(records.len() as u64);
                shared.spool_full.store(false, Ordering::Release);
                return;
            }
            Err(SpoolError::Full { .. }) => "spool_full",
            Err(e) => {
                error!(sink = %target.label, error = %e, "audit spool write failed");
                "spool_io"
            }
        };
        shared.spool_full.store(true, Ordering::Release);
        let closing = shared.closing.load(Ordering::Acquire);
        if config.on_full == OnFull::FailOpen || closing {
            metrics::counter!(m::AUDIT_EVENTS_DROPPED_TOTAL, "reason" => reason)
                .increment(records.len() as u64);
            shared
                .dropped
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            warn!(sink = %target.label, events = records.len(), reason, "audit events dropped (on_full = fail_open or shutting down)");
            return;
        }
        // fail_closed: keep these events and wait for the shipper to make room; new
        // sessions and statements are refused meanwhile (see `Audit::accepting`).
        if warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            warn!(sink = %target.label, "audit spool full; new sessions and statements are refused until it drains");
            warned_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
