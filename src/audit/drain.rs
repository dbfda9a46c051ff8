//! The spool drain: one task per destination reads spooled batches in order, ships them, and
//! acknowledges a batch only after its INSERT committed. While the audit database is away it
//! retries with backoff and the spool grows; nothing is skipped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use super::event::AuditRecord;
use super::ship::Shipper;
use super::spool::{SpoolReader, SpoolStats};
use super::AuditShared;
use crate::metrics as m;

/// Payload bytes read per batch, at most.
const MAX_BATCH_BYTES: usize = 8 << 20;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(super) struct Drain {
    pub label: String,
    pub reader: SpoolReader,
    pub shipper: Shipper,
    pub shared: Arc<AuditShared>,
    pub batch_size: usize,
}

impl Drain {
    pub async fn run(mut self) {
        let notify = self.reader.notifier();
        let stats = self.reader.stats();
        let replayed = stats.recovered_records.load(Ordering::Relaxed);
        // Records a previous run left unacknowledged may already be in the table: ship them
        // idempotent. After them, batches are new to the table and go as plain INSERTs.
        let mut maybe_shipped = replayed;
        if replayed > 0 {
            info!(sink = %self.label, events = replayed, "replaying audit events left in the spool");
            metrics::counter!(m::AUDIT_EVENTS_REPLAYED_TOTAL, "sink" => self.label.clone())
                .increment(replayed);
        }
        loop {
            publish_gauges(&self.label, &stats);
            let batch = match self.reader.read_batch(self.batch_size, MAX_BATCH_BYTES) {
                Ok(Some(batch)) => batch,
                Ok(None) => {
                    if self.shared.closing.load(Ordering::Acquire)
                        && self.shared.writer_done.load(Ordering::Acquire)
                    {
                        return;
                    }
                    // A missed wake-up costs at most this long.
                    let _ =
                        tokio::time::timeout(Duration::from_millis(250), notify.notified()).await;
                    continue;
                }
                Err(e) => {
                    warn!(sink = %self.label, error = %e, "reading the audit spool failed");
                    self.reader.rewind();
                    tokio::time::sleep(MAX_BACKOFF).await;
                    continue;
                }
            };
            let records = decode(&self.label, &batch.records);
            let replay = maybe_shipped > 0;
            maybe_shipped = maybe_shipped.saturating_sub(batch.records.len() as u64);
            if !self.ship_until_committed(&records, replay, &stats).await {
                return;
            }
            if let Err(e) = self.reader.commit(batch.end) {
                // The rows are in the table; a failed acknowledgement only means a replay.
                warn!(sink = %self.label, error = %e, "acknowledging a shipped audit batch failed");
            }
        }
    }

    /// Retries until the batch committed. False when shutdown asked to stop first (the batch
    /// stays in the spool for the next start).
    async fn ship_until_committed(
        &mut self,
        records: &[AuditRecord],
        replay: bool,
        stats: &SpoolStats,
    ) -> bool {
        let mut backoff = MIN_BACKOFF;
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            // After a failure the batch may have committed anyway (a lost reply): idempotent.
            match self.shipper.ship(records, replay || failures > 0).await {
                Ok(outcome) => {
                    metrics::histogram!(m::AUDIT_BATCH_SECONDS, "sink" => self.label.clone())
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!(m::AUDIT_EVENTS_WRITTEN_TOTAL, "sink" => self.label.clone())
                        .increment(outcome.inserted);
                    if outcome.duplicates > 0 {
                        metrics::counter!(m::AUDIT_EVENTS_DUPLICATE_TOTAL, "sink" => self.label.clone())
                            .increment(outcome.duplicates);
                    }
                    self.shared
                        .written
                        .fetch_add(outcome.inserted, Ordering::Relaxed);
                    if failures > 0 {
                        info!(sink = %self.label, after_failures = failures, "audit database reachable again; draining the spool");
                    }
                    return true;
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!(m::AUDIT_SHIP_ERRORS_TOTAL, "sink" => self.label.clone())
                        .increment(1);
                    // One line per outage and then every 50 tries, not one per retry.
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(sink = %self.label, error = %e, failures, "shipping audit events failed; they stay in the spool");
                    }
                }
            }
            publish_gauges(&self.label, stats);
            if self.shared.stop_shipping.load(Ordering::Acquire) {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn decode(label: &str, raw: &[Vec<u8>]) -> Vec<AuditRecord> {
    raw.iter()
        .filter_map(|bytes| match serde_json::from_slice(bytes) {
            Ok(record) => Some(record),
            Err(e) => {
                // The CRC matched, so this is not disk damage but a record this version
                // cannot read; it is counted as lost rather than blocking the spool forever.
                warn!(sink = %label, error = %e, "skipping an undecodable audit spool record");
                metrics::counter!(m::AUDIT_EVENTS_DROPPED_TOTAL, "reason" => "undecodable")
                    .increment(1);
                None
            }
        })
        .collect()
}

fn publish_gauges(label: &str, stats: &SpoolStats) {
    metrics::gauge!(m::AUDIT_SPOOL_BYTES, "sink" => label.to_string())
        .set(stats.unshipped_bytes.load(Ordering::Relaxed) as f64);
    metrics::gauge!(m::AUDIT_SPOOL_EVENTS, "sink" => label.to_string())
        .set(stats.unshipped_records.load(Ordering::Relaxed) as f64);
    let oldest = stats.oldest_unshipped_us.load(Ordering::Relaxed);
    let age = if oldest == 0 {
        0.0
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(oldest);
        now.saturating_sub(oldest) as f64 / 1e6
    };
    metrics::gauge!(m::AUDIT_OLDEST_UNSHIPPED_SECONDS, "sink" => label.to_string()).set(age);
}
