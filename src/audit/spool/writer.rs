//! The appending half of the spool.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::Notify;

use super::{
    create_segment, framed_len, io_err, now_us, AppendMark, Position, Shared, SpoolError,
    SpoolStats, MAX_RECORD_BYTES,
};

/// The appending half; lives on the spool writer thread.
#[derive(Debug)]
pub struct SpoolWriter {
    shared: Arc<Shared>,
    segment: u64,
    /// Published end of the current segment: where the next batch goes.
    end: u64,
    file: File,
    /// A failed write could not be rolled back: the current segment may hold garbage past `end`,
    /// so the next batch goes to a new segment (where recovery cannot mistake it for records).
    rotate_next: bool,
    /// A segment was created and the directory not yet synced.
    dir_unsynced: bool,
}

impl SpoolWriter {
    /// The writer of a freshly opened spool, appending to `segment` at its published `end`.
    pub(super) fn new(shared: Arc<Shared>, segment: u64, end: u64, file: File) -> Self {
        SpoolWriter {
            shared,
            segment,
            end,
            file,
            rotate_next: false,
            dir_unsynced: false,
        }
    }

    /// Appends records as one batch: all or nothing. `Full` when unshipped bytes + this batch
    /// would exceed `max_bytes` (nothing written). Empty records and records over
    /// `MAX_RECORD_BYTES` are refused (`Io` with `InvalidInput`): recovery would take them for
    /// a torn tail. After success the reader can see the records and the notifier is signalled.
    pub fn append(&mut self, records: &[&[u8]]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        self.check_records(records)?;
        let framed: u64 = records.iter().map(|r| framed_len(r.len())).sum();
        let stats = &self.shared.stats;
        let used = stats.unshipped_bytes.load(Ordering::Acquire);
        if used.saturating_add(framed) > self.shared.opts.max_bytes {
            return Err(SpoolError::Full {
                used,
                max: self.shared.opts.max_bytes,
            });
        }
        if self.rotate_next || (self.end > 0 && self.end >= self.shared.opts.segment_bytes) {
            self.rotate()?;
        }
        if self.dir_unsynced {
            // The new segment's name must be durable before records in it are reported written.
            self.shared.sync_dir()?;
            self.dir_unsynced = false;
        }
        self.write_batch(records, framed)?;
        self.publish(records.len() as u64, framed);
        Ok(())
    }

    pub fn stats(&self) -> Arc<SpoolStats> {
        Arc::clone(&self.shared.stats)
    }

    pub fn notifier(&self) -> Arc<Notify> {
        Arc::clone(&self.shared.notify)
    }

    fn check_records(&self, records: &[&[u8]]) -> Result<(), SpoolError> {
        match records
            .iter()
            .find(|r| r.is_empty() || r.len() > MAX_RECORD_BYTES)
        {
            None => Ok(()),
            Some(bad) => Err(SpoolError::Io {
                path: self.shared.dir.clone(),
                source: io::Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "audit record of {} bytes (must be 1..={MAX_RECORD_BYTES})",
                        bad.len()
                    ),
                ),
            }),
        }
    }

    /// Starts the next segment. The old one is complete: every batch in it was synced already.
    /// The directory is synced by the caller, and retried by the next append if that fails, so
    /// that a failure here never leaves a created file the writer does not know about.
    fn rotate(&mut self) -> Result<(), SpoolError> {
        let next = self.segment + 1;
        self.file = create_segment(&self.shared.dir, next)?;
        self.segment = next;
        self.end = 0;
        self.rotate_next = false;
        self.dir_unsynced = self.shared.opts.fsync;
        self.shared.state().segments.insert(next, 0);
        self.shared.stats.segments.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One positioned write of the whole batch (then sync). Written at `end`, not appended, so a
    /// failed attempt is simply overwritten by the next one.
    fn write_batch(&mut self, records: &[&[u8]], framed: u64) -> Result<(), SpoolError> {
        let mut buf = Vec::with_capacity(usize::try_from(framed).unwrap_or(0));
        for record in records {
            // check_records bounded every length to MAX_RECORD_BYTES, which fits in u32.
            buf.extend_from_slice(&(record.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(record).to_le_bytes());
            buf.extend_from_slice(record);
        }
        let written = self.file.write_all_at(&buf, self.end);
        let synced = written.and_then(|()| {
            if self.shared.opts.fsync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = synced {
            self.roll_back();
            return Err(io_err(&self.shared.segment_path(self.segment))(e));
        }
        Ok(())
    }

    /// Removes what a failed batch left behind, so a crash now cannot resurrect records the
    /// caller was told were not written.
    fn roll_back(&mut self) {
        if let Err(e) = self.file.set_len(self.end) {
            tracing::warn!(segment = %self.shared.segment_path(self.segment).display(), error = %e,
                "audit spool: could not roll back a failed append; continuing in a new segment");
            self.rotate_next = true;
        }
    }

    /// Makes the batch visible to the reader and counts it.
    fn publish(&mut self, records: u64, framed: u64) {
        self.end += framed;
        let end = Position {
            segment: self.segment,
            offset: self.end,
        };
        let now = now_us();
        {
            let mut state = self.shared.state();
            state.segments.insert(self.segment, self.end);
            state.appends.push_back(AppendMark {
                end,
                appended_us: now,
            });
            // Under the lock, so commit() cannot interleave and leave a stale oldest time.
            let stats = &self.shared.stats;
            stats.unshipped_bytes.fetch_add(framed, Ordering::AcqRel);
            stats
                .unshipped_records
                .fetch_add(records, Ordering::Relaxed);
            if stats.oldest_unshipped_us.load(Ordering::Relaxed) == 0 {
                stats.oldest_unshipped_us.store(now, Ordering::Relaxed);
            }
        }
        self.shared.notify.notify_one();
    }
}
