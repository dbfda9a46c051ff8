//! The audit trail: every access written to an audit table, spooled locally first so nothing
//! is lost while the audit database is slow or away.
//!
//! Path of an event: a session calls `Audit::record` (never blocks: a queue push) → the
//! `writer` thread assigns the event key, fingerprints the statement and appends the batch to
//! the `spool` (one write + fsync per batch) → a `drain` task per destination reads the spool in
//! order, `ship`s each batch with one idempotent INSERT from the audit role's own connection,
//! and only then acknowledges it, which lets the spool delete it.
//!
//! - `event`: `AuditEvent` (built on the hot path) and `AuditRecord` (one table row)
//! - `config`: `[audit]`
//! - `summary`: fingerprints, tables and statement type, cached by statement `shape`
//! - `spool`: segmented append-only files; events are removed after their batch committed
//! - `schema`: the table's DDL and `pgtenant audit init`
//! - `ship`: batched, idempotent INSERTs from the audit role's own connection

pub mod config;
mod drain;
pub mod event;
pub mod schema;
mod shape;
pub mod ship;
pub mod spool;
pub mod summary;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinHandle;

pub use config::{AuditConfig, AuditLevel, AuditSink, FsyncMode, OnFull};
pub use event::{
    AuditEvent, AuditRecord, EventKind, SessionInfo, SessionTotals, StatementInfo, TokenRef,
};

use crate::metrics as m;

/// State shared by the sessions, the writer thread and the drain tasks.
#[derive(Debug, Default)]
pub(crate) struct AuditShared {
    /// Events in the queue, not yet taken by the writer.
    queued: AtomicUsize,
    /// The last append found the spool full (or failing).
    spool_full: AtomicBool,
    /// Shutdown began: the writer ends once the queue is empty.
    closing: AtomicBool,
    writer_done: AtomicBool,
    /// The flush deadline passed: drains stop retrying (their batches stay spooled).
    stop_shipping: AtomicBool,
    dropped: AtomicU64,
    written: AtomicU64,
}

/// The running audit trail. Cheap to share; `record` is the only call on the hot path.
pub struct Audit {
    config: Arc<AuditConfig>,
    /// `Sender` is `Sync`: sessions push without a lock.
    tx: Sender<AuditEvent>,
    shared: Arc<AuditShared>,
    next_session: AtomicU64,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    drains: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("level", &self.config.level)
            .field("table", &self.config.table)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// Opens the spool(s) (replaying what a previous run left), starts the writer thread and
    /// one drain task per destination. `tenant_urls`: dedicated upstreams whose events go to
    /// their own database (`sink = "tenant"`), by upstream name.
    pub fn start(
        config: AuditConfig,
        tenant_urls: &BTreeMap<String, String>,
    ) -> anyhow::Result<Arc<Audit>> {
        let config = Arc::new(config);
        let table = schema::TableName::parse(&config.table).map_err(anyhow::Error::msg)?;
        let shared = Arc::new(AuditShared::default());
        let instance = format!("{:016x}", rand::random::<u64>());
        let options = || spool::SpoolOptions {
            segment_bytes: config.spool_segment_bytes,
            max_bytes: config.spool_max_bytes,
            fsync: config.fsync == FsyncMode::Batch,
        };
        let mut drains = Vec::new();
        let mut open = |label: String, dir: std::path::PathBuf, url: &str| {
            let (writer, reader) = spool::open(&dir, options())
                .with_context(|| format!("audit spool {}", dir.display()))?;
            let shipper = ship::Shipper::new(url, table.clone(), config.ship_timeout)
                .with_context(|| format!("audit destination {label}"))?;
            drains.push(drain::Drain {
                label: label.clone(),
                reader,
                shipper,
                shared: shared.clone(),
                batch_size: config.batch_size,
            });
            anyhow::Ok(writer::SpoolTarget { label, writer })
        };
        let central = open(
            "central".into(),
            config.spool_dir.join("central"),
            &config.url,
        )?;
        let mut tenants = HashMap::new();
        if config.sink == AuditSink::Tenant {
            for (upstream, url) in tenant_urls {
                let target = open(
                    format!("tenant:{upstream}"),
                    config.spool_dir.join(format!("tenant-{upstream}")),
                    url,
                )?;
                tenants.insert(upstream.clone(), target);
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = writer::Writer {
            rx,
            shared: shared.clone(),
            config: config.clone(),
            instance,
            central,
            tenants,
            seq: 0,
            summarizer: Default::default(),
        };
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("pgtenant-audit".into())
            .spawn(move || {
                thread.run();
                writer_shared.writer_done.store(true, Ordering::Release);
            })
            .context("starting the audit writer thread")?;
        let drains = drains.into_iter().map(|d| tokio::spawn(d.run())).collect();
        Ok(Arc::new(Audit {
            config,
            tx,
            shared,
            next_session: AtomicU64::new(1),
            writer: Mutex::new(Some(writer)),
            drains: Mutex::new(drains),
        }))
    }

    pub fn level(&self) -> AuditLevel {
        self.config.level
    }

    /// A session id, unique within this process.
    pub fn new_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues an event. Never blocks; when the queue is at capacity the event is dropped and
    /// counted (with `fail_closed`, `accepting()` is false long before that for new work).
    pub fn record(&self, event: AuditEvent) {
        if self.shared.writer_done.load(Ordering::Acquire) {
            self.count_drop("closed");
            return;
        }
        if self.shared.queued.load(Ordering::Acquire) >= self.config.queue_capacity {
            self.count_drop("queue_full");
            return;
        }
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(event).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            self.count_drop("closed");
        }
    }

    fn count_drop(&self, reason: &'static str) {
        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::AUDIT_EVENTS_DROPPED_TOTAL, "reason" => reason).increment(1);
    }

    /// False when `on_full = "fail_closed"` and the spool (or the queue) cannot take more:
    /// new sessions get 57P03 and statements are refused.
    pub fn accepting(&self) -> bool {
        self.config.on_full == OnFull::FailOpen || !self.is_full()
    }

    /// The spool refused the last batch, or the queue is at capacity.
    pub fn is_full(&self) -> bool {
        self.shared.spool_full.load(Ordering::Acquire)
            || self.shared.queued.load(Ordering::Acquire) >= self.config.queue_capacity
    }

    /// Events dropped so far (fail_open, or at shutdown).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Rows inserted into audit tables so far by this process.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Shutdown: every queued event reaches the spool, then the drains ship until the spool is
    /// empty or `deadline` passes (what is left stays spooled for the next start). True when
    /// everything was shipped.
    pub async fn close(&self, deadline: Duration) -> bool {
        let started = Instant::now();
        self.shared.closing.store(true, Ordering::Release);
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        let drains: Vec<_> = match self.drains.lock() {
            Ok(mut d) => d.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        let left = deadline.saturating_sub(started.elapsed());
        let all = futures_util::future::join_all(drains);
        let finished = tokio::time::timeout(left, all).await.is_ok();
        if !finished {
            self.shared.stop_shipping.store(true, Ordering::Release);
        }
        finished
    }
}

#[cfg(test)]
pub(crate) mod tests;
