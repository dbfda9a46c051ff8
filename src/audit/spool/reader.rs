//! The reading half of the spool: hands out published records and acknowledges committed ones.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use super::frame::{Frame, ReadCache};
use super::{ack, framed_len, io_err, Batch, Position, Shared, SpoolError, SpoolStats};

/// The shipping half: reads published records in order and acknowledges committed batches.
#[derive(Debug)]
pub struct SpoolReader {
    shared: Arc<Shared>,
    /// Everything before this is in the audit table.
    acked: Position,
    /// Where the next read_batch starts.
    pos: Position,
    /// Batches handed out since `acked` (end, records, framed bytes incl. skipped ones), so
    /// commit() can subtract exactly what it acknowledges, whatever the batch boundaries.
    handed_out: VecDeque<(Position, u64, u64)>,
    /// The segment being read, and a window of its bytes.
    open: Option<OpenSegment>,
    cache: ReadCache,
}

/// The segment file the reader has open (kept between calls).
#[derive(Debug)]
struct OpenSegment {
    segment: u64,
    file: File,
    path: PathBuf,
}

impl SpoolReader {
    /// The reader of a freshly opened spool, starting at the acknowledged position `start`.
    pub(super) fn new(shared: Arc<Shared>, start: Position) -> Self {
        SpoolReader {
            shared,
            acked: start,
            pos: start,
            handed_out: VecDeque::new(),
            open: None,
            cache: ReadCache::default(),
        }
    }

    /// The next records after the read position, at most `max_records` and (except for a single
    /// oversized record) at most `max_bytes` of payload. None when nothing new is published.
    /// A damaged record is logged, counted in `corrupt_records`, and the rest of its segment
    /// skipped (in any segment: see `skip_corrupt`).
    pub fn read_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Option<Batch>, SpoolError> {
        let start = self.pos;
        let mut records = Vec::new();
        let mut payload_bytes = 0usize;
        let mut consumed = 0u64;
        while records.len() < max_records {
            let Some(limit) = self.readable_end() else {
                break;
            };
            self.open_segment()?;
            let Some(seg) = self.open.as_ref() else { break };
            match self
                .cache
                .record(&seg.file, &seg.path, self.pos.offset, limit)?
            {
                Frame::Record(payload) => {
                    if !records.is_empty() && payload_bytes + payload.len() > max_bytes {
                        break;
                    }
                    payload_bytes += payload.len();
                    records.push(payload.to_vec());
                    let framed = framed_len(payload.len());
                    self.pos.offset += framed;
                    consumed += framed;
                }
                Frame::Corrupt(why) => consumed += self.skip_corrupt(limit, why),
            }
        }
        if self.pos == start {
            return Ok(None);
        }
        self.handed_out
            .push_back((self.pos, records.len() as u64, consumed));
        if records.is_empty() {
            // Only a damaged stretch was skipped; the next batch's end covers it.
            return Ok(None);
        }
        Ok(Some(Batch {
            records,
            end: self.pos,
        }))
    }

    /// The batch ending at `end` committed in the audit table: advances the acknowledged
    /// position, deletes segment files entirely acknowledged (never the writer's current one),
    /// updates the stats, and persists the ack position. `end` must be the end of a batch handed
    /// out since the last rewind; an older one is ignored. The acknowledgment is taken in memory
    /// even when persisting it or deleting a file fails (the error is then returned): that only
    /// means replays after a restart.
    pub fn commit(&mut self, end: Position) -> Result<(), SpoolError> {
        if end <= self.acked {
            return Ok(());
        }
        self.acked = end;
        if self.pos < end {
            self.pos = end;
        }
        let (records, bytes) = self.take_handed_out(end);
        let deletable = self.acknowledge(end, records, bytes);
        let persisted = ack::persist_ack(&self.shared, end);
        let deleted = self.delete_segments(&deletable);
        persisted.and(deleted)
    }

    /// Back to the acknowledged position (after a failed shipment the caller may re-read).
    pub fn rewind(&mut self) {
        self.pos = self.acked;
        self.handed_out.clear();
    }

    pub fn stats(&self) -> Arc<SpoolStats> {
        Arc::clone(&self.shared.stats)
    }

    pub fn notifier(&self) -> Arc<Notify> {
        Arc::clone(&self.shared.notify)
    }

    /// The published end of the read position's segment, once the position is moved to where
    /// there is something to read; None when everything published was read.
    fn readable_end(&mut self) -> Option<u64> {
        let state = self.shared.state();
        loop {
            let end = state.segments.get(&self.pos.segment).copied();
            if let Some(end) = end.filter(|e| self.pos.offset < *e) {
                return Some(end);
            }
            // At the end of a segment (or at one that is gone): the next one, if any.
            match state.segments.range(self.pos.segment + 1..).next() {
                Some((&next, _)) => {
                    self.pos = Position {
                        segment: next,
                        offset: 0,
                    }
                }
                None => return None,
            }
        }
    }

    /// Opens the read position's segment unless it is the one open already.
    fn open_segment(&mut self) -> Result<(), SpoolError> {
        let segment = self.pos.segment;
        if self.open.as_ref().is_none_or(|o| o.segment != segment) {
            let path = self.shared.segment_path(segment);
            let file = File::open(&path).map_err(io_err(&path))?;
            self.cache.clear();
            self.open = Some(OpenSegment {
                segment,
                file,
                path,
            });
        }
        Ok(())
    }

    /// After a damaged record nothing in its segment can be trusted to be framed right, so the
    /// rest of the segment (as far as published) is skipped. This applies to the writer's current
    /// segment too: what the reader sees there was written whole and synced, so damage means the
    /// disk changed under us, and stalling the spool forever on it would be worse. Returns the
    /// bytes skipped.
    fn skip_corrupt(&mut self, limit: u64, why: &str) -> u64 {
        tracing::warn!(
            segment = %self.shared.segment_path(self.pos.segment).display(),
            offset = self.pos.offset,
            skipped_bytes = limit - self.pos.offset,
            reason = why,
            "audit spool: damaged record; skipping the rest of the segment"
        );
        self.shared
            .stats
            .corrupt_records
            .fetch_add(1, Ordering::Relaxed);
        let skipped = limit - self.pos.offset;
        self.pos.offset = limit;
        skipped
    }

    /// Records and framed bytes of the batches handed out that end at or before `end`.
    fn take_handed_out(&mut self, end: Position) -> (u64, u64) {
        let (mut records, mut bytes) = (0, 0);
        while let Some(&(batch_end, r, b)) = self.handed_out.front() {
            if batch_end > end {
                break;
            }
            records += r;
            bytes += b;
            self.handed_out.pop_front();
        }
        (records, bytes)
    }

    /// Updates the shared bookkeeping and stats for an acknowledgment up to `end`; returns the
    /// segments now entirely acknowledged (already removed from the published map).
    fn acknowledge(&mut self, end: Position, records: u64, bytes: u64) -> Vec<u64> {
        let mut state = self.shared.state();
        while state.appends.front().is_some_and(|m| m.end <= end) {
            state.appends.pop_front();
        }
        let stats = &self.shared.stats;
        sub_saturating(&stats.unshipped_bytes, bytes);
        sub_saturating(&stats.unshipped_records, records);
        let oldest = state.appends.front().map_or(0, |m| m.appended_us);
        stats.oldest_unshipped_us.store(oldest, Ordering::Relaxed);

        let current = state.segments.last_key_value().map(|(s, _)| *s);
        let deletable: Vec<u64> = state
            .segments
            .iter()
            .filter(|(s, e)| **s < end.segment || (**s == end.segment && end.offset >= **e))
            .map(|(s, _)| *s)
            .filter(|s| Some(*s) != current)
            .collect();
        for s in &deletable {
            state.segments.remove(s);
        }
        deletable
    }

    /// Deletes acknowledged segment files; the writer never touches them again.
    fn delete_segments(&mut self, segments: &[u64]) -> Result<(), SpoolError> {
        let mut result = Ok(());
        for &segment in segments {
            if self.open.as_ref().is_some_and(|o| o.segment == segment) {
                self.open = None;
                self.cache.clear();
            }
            let path = self.shared.segment_path(segment);
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.shared.stats.segments.fetch_sub(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // Left on disk; the next open() deletes it as acknowledged.
                    tracing::warn!(segment = %path.display(), error = %e, "audit spool: could not delete an acknowledged segment");
                    result = Err(io_err(&path)(e));
                }
            }
        }
        result
    }
}

/// Never wraps below zero (which would report an absurd backlog), and keeps the writer's
/// concurrent additions.
fn sub_saturating(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}
