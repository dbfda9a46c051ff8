//! The local spool: segmented append-only files where every audit event is written before it
//! is shipped, and removed only after the batch that carried it committed.
//!
//! Why it exists: the audit trail promises that no access goes unrecorded. The audit database
//! may be slow, down, or far away, so events are first made durable here (`append` returns only
//! after the write, and after `sync_data` when fsync is on), and only the shipper's commit in the
//! audit table lets the spool forget them. While the database is down the spool grows (up to
//! `max_bytes`, then `Full`); when it is back the spool drains in order; after `kill -9` a restart
//! replays everything past the last persisted acknowledgment. Replays may duplicate rows the table
//! already holds; the table's unique event key makes that harmless. Losing a record is never fine,
//! which is why every doubt below (a stale ack file, an ack that does not fall on a record
//! boundary) resolves towards replaying more.
//!
//! On disk, in the spool directory (mode 0700, locked by one process through `lock`):
//! - `00000000000000000001.seg`, …: records framed as `u32 LE length | u32 LE crc32 | payload`;
//!   a record never spans two segments;
//! - `ack`: the acknowledged position (`u64 LE segment | u64 LE offset | u32 LE crc32`), replaced
//!   atomically through `ack.tmp` + rename.
//!
//! The writer (one std thread) and the reader (the shipping task) share the published end of
//! every segment behind a mutex: the reader never reads past it, so it never sees half a batch,
//! and a failed write the writer rolled back is invisible to it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// Frame header: payload length and CRC, both u32 LE.
const HEADER_BYTES: u64 = 8;
/// Larger lengths are garbage: during recovery a torn or overwritten header must not make us
/// allocate or skip gigabytes. Appends of larger records are refused.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;
/// How much the reader and the recovery scan read from a segment at once.
const READ_CHUNK_BYTES: u64 = 256 * 1024;
const SEGMENT_SUFFIX: &str = ".seg";
const ACK_FILE: &str = "ack";
const ACK_TMP_FILE: &str = "ack.tmp";
const LOCK_FILE: &str = "lock";
const ACK_FILE_BYTES: usize = 20;

/// Sizes and durability of the spool (from `[audit]`).
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// A new segment file is started once the current one reached this size.
    pub segment_bytes: u64,
    /// Unshipped (framed) bytes, at most; past this `append` returns `Full`.
    pub max_bytes: u64,
    /// `sync_data` after every appended batch and every persisted ack.
    pub fsync: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("audit spool is full ({used} of {max} bytes)")]
    Full { used: u64, max: u64 },
    #[error("audit spool {dir} is in use by another process")]
    Locked { dir: PathBuf },
    #[error("audit spool I/O on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A place in the spool: a byte offset in a segment file, always on a record boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// Records handed to the shipper; `end` is what it passes to `commit` once they are in the table.
#[derive(Debug)]
pub struct Batch {
    pub records: Vec<Vec<u8>>,
    pub end: Position,
}

/// Read by the metrics code at any time (atomics; no locks).
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Framed bytes appended and not yet committed (incl. recovered ones).
    pub unshipped_bytes: AtomicU64,
    pub unshipped_records: AtomicU64,
    /// Segment files on disk.
    pub segments: AtomicU64,
    pub corrupt_records: AtomicU64,
    /// Records found unacknowledged at `open()`.
    pub recovered_records: AtomicU64,
    /// Unix time in microseconds at which the oldest unacknowledged record was appended
    /// (0 = none). Recovered records count as appended at the segment file's mtime.
    pub oldest_unshipped_us: AtomicU64,
}

/// One append (or, after recovery, one segment's unacknowledged records) not yet entirely
/// acknowledged: tells commit() when the oldest unshipped record was appended.
#[derive(Debug)]
struct AppendMark {
    end: Position,
    appended_us: u64,
}

/// What writer and reader both change, under one mutex (held only for bookkeeping, never I/O).
#[derive(Debug, Default)]
struct State {
    /// Published end of every segment file on disk; the last one is the writer's current.
    segments: BTreeMap<u64, u64>,
    /// Appends not yet entirely acknowledged, oldest first.
    appends: VecDeque<AppendMark>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    opts: SpoolOptions,
    stats: Arc<SpoolStats>,
    notify: Arc<Notify>,
    state: Mutex<State>,
    /// Holds the directory lock for as long as either half lives.
    _lock: File,
}

impl Shared {
    /// The bookkeeping stays consistent across a panic (every update is a few assignments), so a
    /// poisoned lock is still usable; refusing it would stop auditing for good.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn segment_path(&self, segment: u64) -> PathBuf {
        segment_path(&self.dir, segment)
    }

    fn sync_dir(&self) -> Result<(), SpoolError> {
        if self.opts.fsync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}{SEGMENT_SUFFIX}"))
}

/// A new file's directory entry is durable only once the directory itself is synced.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn now_us() -> u64 {
    // 0 means "none" in the stats, so a clock before 1970 still reports something.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .max(1)
}

fn mtime_us(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_us, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
        })
}

fn framed_len(payload_len: usize) -> u64 {
    HEADER_BYTES + payload_len as u64
}

// ---------------------------------------------------------------------------------------------
// open + recovery
// ---------------------------------------------------------------------------------------------

/// Opens (creating, mode 0700) the spool directory, takes an exclusive lock on it, recovers
/// after a crash (a torn record at the tail of the last segment is truncated away), and returns
/// the writer and reader halves. The reader starts at the persisted acknowledged position when
/// it is valid, else at the first record of the oldest segment.
pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(SpoolWriter, SpoolReader), SpoolError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let lock = lock_dir(dir)?;
    // A leftover of a commit interrupted before its rename; the `ack` file is still whole.
    remove_if_exists(&dir.join(ACK_TMP_FILE))?;

    let mut segments = list_segments(dir)?;
    let ack = read_ack(dir);
    if segments.is_empty() {
        // Continue the numbering past the ack so that a stale ack can never point into new data.
        let first = ack.map_or(1, |a| a.segment + 1);
        create_segment(dir, first)?;
        sync_dir(dir)?;
        segments.push(first);
    }
    let recovered = recover(dir, &segments, ack)?;

    let stats = Arc::new(SpoolStats::default());
    stats
        .segments
        .store(recovered.segments.len() as u64, Ordering::Relaxed);
    stats
        .unshipped_bytes
        .store(recovered.bytes, Ordering::Relaxed);
    stats
        .unshipped_records
        .store(recovered.records, Ordering::Relaxed);
    stats
        .recovered_records
        .store(recovered.records, Ordering::Relaxed);
    let oldest = recovered.marks.front().map_or(0, |m| m.appended_us);
    stats.oldest_unshipped_us.store(oldest, Ordering::Relaxed);

    let (current, current_end) = recovered
        .segments
        .last_key_value()
        .map(|(s, e)| (*s, *e))
        .ok_or_else(|| io_err(dir)(io::Error::other("no segment after recovery")))?;
    let path = segment_path(dir, current);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;

    let shared = Arc::new(Shared {
        dir: dir.to_path_buf(),
        opts,
        stats,
        notify: Arc::new(Notify::new()),
        state: Mutex::new(State {
            segments: recovered.segments,
            appends: recovered.marks,
        }),
        _lock: lock,
    });
    let writer = SpoolWriter {
        shared: Arc::clone(&shared),
        segment: current,
        end: current_end,
        file,
        rotate_next: false,
        dir_unsynced: false,
    };
    let reader = SpoolReader {
        shared,
        acked: recovered.start,
        pos: recovered.start,
        handed_out: VecDeque::new(),
        open: None,
        cache: ReadCache::default(),
    };
    Ok((writer, reader))
}

fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(SpoolError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

fn remove_if_exists(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

/// Segment sequence numbers found in the directory, ascending.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let seq = name
            .to_str()
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            segments.push(seq);
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

fn create_segment(dir: &Path, segment: u64) -> Result<File, SpoolError> {
    let path = segment_path(dir, segment);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path))
}

fn encode_ack(pos: Position) -> [u8; ACK_FILE_BYTES] {
    let mut buf = [0u8; ACK_FILE_BYTES];
    buf[..8].copy_from_slice(&pos.segment.to_le_bytes());
    buf[8..16].copy_from_slice(&pos.offset.to_le_bytes());
    let crc = crc32fast::hash(&buf[..16]);
    buf[16..].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The persisted acknowledged position; None when missing or damaged (then everything is
/// replayed, which is only duplicates).
fn read_ack(dir: &Path) -> Option<Position> {
    let bytes = fs::read(dir.join(ACK_FILE)).ok()?;
    let decoded = decode_ack(&bytes);
    if decoded.is_none() {
        tracing::warn!(dir = %dir.display(), "audit spool ack file is damaged; replaying from the oldest segment");
    }
    decoded
}

fn decode_ack(bytes: &[u8]) -> Option<Position> {
    let bytes: &[u8; ACK_FILE_BYTES] = bytes.try_into().ok()?;
    let (body, crc) = bytes.split_at(16);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let (seg, off) = body.split_at(8);
    Some(Position {
        segment: u64::from_le_bytes(seg.try_into().ok()?),
        offset: u64::from_le_bytes(off.try_into().ok()?),
    })
}

/// What `open` found on disk.
#[derive(Debug)]
struct Recovered {
    start: Position,
    segments: BTreeMap<u64, u64>,
    marks: VecDeque<AppendMark>,
    records: u64,
    bytes: u64,
}

/// Truncates the torn tail of the last segment, checks the ack against the records on disk,
/// deletes segments the ack covers entirely, and counts what is left to ship.
fn recover(dir: &Path, segments: &[u64], ack: Option<Position>) -> Result<Recovered, SpoolError> {
    let (&oldest, &last) = match (segments.first(), segments.last()) {
        (Some(first), Some(last)) => (first, last),
        _ => return Err(io_err(dir)(io::Error::other("no segment to recover"))),
    };
    truncate_torn_tail(dir, last)?;

    let start = match ack {
        // Older segments were deleted after being acknowledged: nothing before `oldest` is left.
        Some(a) if a.segment < oldest => Position {
            segment: oldest,
            offset: 0,
        },
        Some(a) if segments.binary_search(&a.segment).is_ok() => a,
        Some(a) => {
            tracing::warn!(dir = %dir.display(), ack = ?a, "audit spool ack names no segment on disk; replaying from the oldest segment");
            Position {
                segment: oldest,
                offset: 0,
            }
        }
        None => Position {
            segment: oldest,
            offset: 0,
        },
    };
    match count_from(dir, segments, start)? {
        Some(rec) => {
            delete_before(dir, segments, start.segment)?;
            Ok(rec)
        }
        None => {
            tracing::warn!(dir = %dir.display(), ack = ?start, "audit spool ack is not on a record boundary; replaying from the oldest segment");
            count_from(
                dir,
                segments,
                Position {
                    segment: oldest,
                    offset: 0,
                },
            )?
            .ok_or_else(|| io_err(dir)(io::Error::other("segment start is not a record boundary")))
        }
    }
}

/// A crash mid-append leaves part of a batch at the end of the last segment (or, on some file
/// systems, zeros). Nothing past the last intact record was ever published, so it goes.
fn truncate_torn_tail(dir: &Path, segment: u64) -> Result<(), SpoolError> {
    let path = segment_path(dir, segment);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    let scan = scan_segment(&file, &path, len, 0)?;
    if scan.valid_end < len {
        tracing::warn!(
            segment = %path.display(),
            bytes = len - scan.valid_end,
            "audit spool: truncating a torn record at the tail of the last segment"
        );
        file.set_len(scan.valid_end).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
    }
    Ok(())
}

/// Counts the records from `start` to the end of the spool; None when `start` does not fall on
/// a record boundary of its segment.
fn count_from(
    dir: &Path,
    segments: &[u64],
    start: Position,
) -> Result<Option<Recovered>, SpoolError> {
    let mut rec = Recovered {
        start,
        segments: BTreeMap::new(),
        marks: VecDeque::new(),
        records: 0,
        bytes: 0,
    };
    for &segment in segments.iter().filter(|s| **s >= start.segment) {
        let path = segment_path(dir, segment);
        let file = File::open(&path).map_err(io_err(&path))?;
        let meta = file.metadata().map_err(io_err(&path))?;
        let len = meta.len();
        let from = if segment == start.segment {
            start.offset
        } else {
            0
        };
        // Scanning from 0 (not from `from`) is what proves `from` is a record boundary.
        let scan = scan_segment(&file, &path, len, from)?;
        if !scan.boundary {
            return Ok(None);
        }
        if scan.valid_end < len {
            // Only possible in an older segment (the last one was truncated): the reader will
            // report it as corrupt when it gets there.
            tracing::warn!(segment = %path.display(), offset = scan.valid_end, "audit spool segment holds a damaged record");
        }
        rec.segments.insert(segment, len);
        rec.records += scan.records_from;
        rec.bytes += len - from;
        if len > from {
            rec.marks.push_back(AppendMark {
                end: Position {
                    segment,
                    offset: len,
                },
                appended_us: mtime_us(&meta),
            });
        }
    }
    Ok(Some(rec))
}

/// Segments older than the acknowledged one were entirely shipped; a crash came between the ack
/// and their deletion.
fn delete_before(dir: &Path, segments: &[u64], segment: u64) -> Result<(), SpoolError> {
    for &old in segments.iter().filter(|s| **s < segment) {
        remove_if_exists(&segment_path(dir, old))?;
    }
    Ok(())
}

#[derive(Debug)]
struct Scan {
    /// Offset of the first record that is torn or damaged (= file length when none is).
    valid_end: u64,
    /// Intact records at or after the offset asked about.
    records_from: u64,
    /// Whether the offset asked about is a record boundary within the intact records.
    boundary: bool,
}

/// Walks a segment's records from its start, checking every CRC.
fn scan_segment(file: &File, path: &Path, len: u64, from: u64) -> Result<Scan, SpoolError> {
    let mut cache = ReadCache::default();
    let mut scan = Scan {
        valid_end: 0,
        records_from: 0,
        boundary: from == 0,
    };
    let mut offset = 0;
    while offset < len {
        match cache.record(file, path, offset, len)? {
            Frame::Record(payload) => {
                if offset >= from {
                    scan.records_from += 1;
                }
                offset += framed_len(payload.len());
                scan.boundary |= offset == from;
            }
            Frame::Corrupt(_) => break,
        }
    }
    scan.valid_end = offset;
    Ok(scan)
}

// ---------------------------------------------------------------------------------------------
// reading frames
// ---------------------------------------------------------------------------------------------

/// One frame read from a segment.
enum Frame<'a> {
    Record(&'a [u8]),
    Corrupt(&'static str),
}

/// A window of one segment file's bytes, so reading many small records costs few syscalls.
/// It only ever holds published bytes, which are never rewritten, so it stays valid until the
/// segment is deleted.
#[derive(Debug, Default)]
struct ReadCache {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_offset: u64,
}

impl ReadCache {
    fn clear(&mut self) {
        self.buf.clear();
        self.buf_offset = 0;
    }

    /// `len` bytes at `offset`; never reads past `limit` (the published end).
    fn bytes(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        len: u64,
        limit: u64,
    ) -> Result<&[u8], SpoolError> {
        let cached_end = self.buf_offset + self.buf.len() as u64;
        if offset < self.buf_offset || offset + len > cached_end {
            let want = len.max(READ_CHUNK_BYTES.min(limit.saturating_sub(offset)));
            let want = usize::try_from(want).map_err(|e| io_err(path)(io::Error::other(e)))?;
            self.buf.resize(want, 0);
            self.buf_offset = offset;
            if let Err(e) = file.read_exact_at(&mut self.buf, offset) {
                self.clear();
                return Err(io_err(path)(e));
            }
        }
        let start = usize::try_from(offset - self.buf_offset)
            .map_err(|e| io_err(path)(io::Error::other(e)))?;
        let len = usize::try_from(len).map_err(|e| io_err(path)(io::Error::other(e)))?;
        Ok(&self.buf[start..start + len])
    }

    /// The frame at `offset`, which must be below `limit`.
    fn record(
        &mut self,
        file: &File,
        path: &Path,
        offset: u64,
        limit: u64,
    ) -> Result<Frame<'_>, SpoolError> {
        if offset + HEADER_BYTES > limit {
            return Ok(Frame::Corrupt("truncated header"));
        }
        let header = self.bytes(file, path, offset, HEADER_BYTES, limit)?;
        let (len, crc) = header.split_at(4);
        let (len, crc) = match (<[u8; 4]>::try_from(len), <[u8; 4]>::try_from(crc)) {
            (Ok(l), Ok(c)) => (u32::from_le_bytes(l) as usize, u32::from_le_bytes(c)),
            _ => return Ok(Frame::Corrupt("short header")),
        };
        // Empty records are refused by append, so a zero length is a zero-filled torn tail.
        if len == 0 || len > MAX_RECORD_BYTES {
            return Ok(Frame::Corrupt("implausible length"));
        }
        if offset + framed_len(len) > limit {
            return Ok(Frame::Corrupt("truncated payload"));
        }
        let payload = self.bytes(file, path, offset + HEADER_BYTES, len as u64, limit)?;
        if crc32fast::hash(payload) != crc {
            return Ok(Frame::Corrupt("CRC mismatch"));
        }
        Ok(Frame::Record(payload))
    }
}

// ---------------------------------------------------------------------------------------------
// writer
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// reader
// ---------------------------------------------------------------------------------------------

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
        let persisted = self.persist_ack(end);
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

    /// Writes the ack file atomically: a torn ack file would only cause replays, but a rename
    /// never leaves one.
    fn persist_ack(&self, end: Position) -> Result<(), SpoolError> {
        let tmp = self.shared.dir.join(ACK_TMP_FILE);
        let path = self.shared.dir.join(ACK_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all_at(&encode_ack(end), 0)
            .map_err(io_err(&tmp))?;
        if self.shared.opts.fsync {
            file.sync_data().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.shared.sync_dir()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    const BIG: u64 = 1 << 30;

    fn opts(segment_bytes: u64, max_bytes: u64) -> SpoolOptions {
        SpoolOptions {
            segment_bytes,
            max_bytes,
            fsync: false,
        }
    }

    /// Payloads of varying length that say which record they are.
    fn rec(i: usize) -> Vec<u8> {
        format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 13)).into_bytes()
    }

    fn seq(payload: &[u8]) -> usize {
        let s = std::str::from_utf8(payload).unwrap();
        let start = s.find(':').unwrap() + 1;
        let end = s.find(',').unwrap();
        s[start..end].parse().unwrap()
    }

    fn framed(range: std::ops::Range<usize>) -> u64 {
        range.map(|i| framed_len(rec(i).len())).sum()
    }

    fn append_range(w: &mut SpoolWriter, range: std::ops::Range<usize>) {
        let recs: Vec<Vec<u8>> = range.map(rec).collect();
        let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        w.append(&refs).unwrap();
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        files
    }

    /// Reads everything published, committing each batch when `commit` is set; returns the seqs.
    fn drain(r: &mut SpoolReader, max_records: usize, commit: bool) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some(batch) = r.read_batch(max_records, 1 << 20).unwrap() {
            assert!(!batch.records.is_empty() && batch.records.len() <= max_records);
            out.extend(batch.records.iter().map(|p| seq(p)));
            if commit {
                r.commit(batch.end).unwrap();
            }
        }
        out
    }

    fn load(a: &AtomicU64) -> u64 {
        a.load(Ordering::SeqCst)
    }

    #[test]
    fn round_trip_across_rotations_deletes_acknowledged_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        let (mut w, mut r) = open(&dir, opts(256, BIG)).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );

        let mut n = 0;
        for size in (1..=7).cycle().take(50) {
            append_range(&mut w, n..n + size);
            n += size;
        }
        let files = seg_files(&dir);
        assert!(
            files.len() > 5,
            "expected rotations, got {} segments",
            files.len()
        );
        assert_eq!(load(&w.stats().segments), files.len() as u64);
        // Rotation happens only once a segment reached segment_bytes, so each closed one ends
        // past it by less than one batch.
        for f in &files[..files.len() - 1] {
            let len = fs::metadata(f).unwrap().len();
            assert!(
                (256..256 + 7 * 64).contains(&len),
                "segment {f:?} has {len} bytes"
            );
        }

        let first = files[0].clone();
        let mut got = Vec::new();
        while let Some(batch) = r.read_batch(5, 1 << 20).unwrap() {
            got.extend(batch.records.iter().map(|p| seq(p)));
            r.commit(batch.end).unwrap();
            if batch.end.segment > 1 {
                assert!(
                    !first.exists(),
                    "first segment kept after the ack moved past it"
                );
            }
        }
        assert_eq!(got, (0..n).collect::<Vec<_>>());
        assert_eq!(
            seg_files(&dir).len(),
            1,
            "only the writer's segment remains"
        );
        let stats = r.stats();
        assert_eq!(load(&stats.segments), 1);
        assert_eq!(load(&stats.unshipped_bytes), 0);
        assert_eq!(load(&stats.unshipped_records), 0);
        assert_eq!(load(&stats.oldest_unshipped_us), 0);

        // The writer keeps going in its segment after everything was acknowledged.
        append_range(&mut w, n..n + 3);
        assert_eq!(drain(&mut r, 10, true), vec![n, n + 1, n + 2]);
    }

    #[test]
    fn batch_respects_max_bytes_except_for_one_oversized_record() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
        let small = vec![b'a'; 100];
        let huge = vec![b'b'; 1000];
        w.append(&[&small, &small, &small, &huge, &small]).unwrap();
        let sizes = |b: &Batch| b.records.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(
            sizes(&r.read_batch(100, 250).unwrap().unwrap()),
            vec![100, 100]
        );
        assert_eq!(sizes(&r.read_batch(100, 250).unwrap().unwrap()), vec![100]);
        assert_eq!(sizes(&r.read_batch(100, 250).unwrap().unwrap()), vec![1000]);
        assert_eq!(sizes(&r.read_batch(100, 250).unwrap().unwrap()), vec![100]);
        assert!(r.read_batch(100, 250).unwrap().is_none());
        assert!(r.read_batch(0, 250).unwrap().is_none());
    }

    #[test]
    fn reopen_replays_from_the_ack_position_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (mut w, mut r) = open(dir, opts(128, BIG)).unwrap();
            for i in 0..10 {
                append_range(&mut w, i * 3..i * 3 + 3);
            }
            for _ in 0..3 {
                let batch = r.read_batch(4, 1 << 20).unwrap().unwrap();
                r.commit(batch.end).unwrap();
            }
            // Read but never committed: must come back.
            assert_eq!(r.read_batch(4, 1 << 20).unwrap().unwrap().records.len(), 4);
        }
        for _ in 0..2 {
            let (_w, mut r) = open(dir, opts(128, BIG)).unwrap();
            let stats = r.stats();
            assert_eq!(load(&stats.recovered_records), 18);
            assert_eq!(load(&stats.unshipped_records), 18);
            assert_eq!(load(&stats.unshipped_bytes), framed(12..30));
            assert_eq!(drain(&mut r, 5, false), (12..30).collect::<Vec<_>>());
        }

        // Without a (valid) ack file, replay starts at the oldest segment: duplicates, no loss.
        for damage in [None, Some(b"garbage".to_vec())] {
            match damage {
                None => fs::remove_file(dir.join(ACK_FILE)).unwrap(),
                Some(bytes) => fs::write(dir.join(ACK_FILE), bytes).unwrap(),
            }
            let oldest = fs::read(&seg_files(dir)[0]).unwrap();
            let first_in_oldest =
                seq(&oldest[8..8 + u32::from_le_bytes(oldest[..4].try_into().unwrap()) as usize]);
            assert!(first_in_oldest <= 12);
            let (_w, mut r) = open(dir, opts(128, BIG)).unwrap();
            assert_eq!(
                drain(&mut r, 5, false),
                (first_in_oldest..30).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn ack_off_a_record_boundary_replays_from_the_oldest_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (mut w, mut r) = open(dir, opts(4096, BIG)).unwrap();
            append_range(&mut w, 0..5);
            let batch = r.read_batch(2, 1 << 20).unwrap().unwrap();
            r.commit(batch.end).unwrap();
            let bad = Position {
                segment: batch.end.segment,
                offset: batch.end.offset + 1,
            };
            fs::write(dir.join(ACK_FILE), encode_ack(bad)).unwrap();
        }
        let (_w, mut r) = open(dir, opts(4096, BIG)).unwrap();
        assert_eq!(drain(&mut r, 10, false), (0..5).collect::<Vec<_>>());
    }

    #[test]
    fn torn_tail_is_truncated_and_intact_records_survive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (mut w, _r) = open(dir, opts(1 << 20, BIG)).unwrap();
            for i in 0..10 {
                append_range(&mut w, i..i + 1);
            }
        }
        let seg = seg_files(dir).pop().unwrap();
        let full_len = fs::metadata(&seg).unwrap().len();
        assert_eq!(full_len, framed(0..10));

        // A crash in the middle of the last record's write.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(full_len - 3)
            .unwrap();
        {
            let (mut w, mut r) = open(dir, opts(1 << 20, BIG)).unwrap();
            assert_eq!(fs::metadata(&seg).unwrap().len(), framed(0..9));
            assert_eq!(load(&r.stats().recovered_records), 9);
            assert_eq!(drain(&mut r, 100, false), (0..9).collect::<Vec<_>>());
            // New appends continue right after the last intact record.
            append_range(&mut w, 9..10);
            assert_eq!(drain(&mut r, 100, false), vec![9]);
        }
        assert_eq!(fs::metadata(&seg).unwrap().len(), full_len);

        // Garbage after the last record: a header with a wrong CRC, then zeros, then junk.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&5u32.to_le_bytes()).unwrap();
        f.write_all(&0xdead_beefu32.to_le_bytes()).unwrap();
        f.write_all(b"hello").unwrap();
        f.write_all(&[0u8; 16]).unwrap();
        f.write_all(&[0xff; 13]).unwrap();
        drop(f);
        let (_w, mut r) = open(dir, opts(1 << 20, BIG)).unwrap();
        assert_eq!(fs::metadata(&seg).unwrap().len(), full_len);
        assert_eq!(drain(&mut r, 100, false), (0..10).collect::<Vec<_>>());
        assert_eq!(load(&r.stats().corrupt_records), 0);
    }

    #[test]
    fn full_spool_refuses_whole_batches_until_a_commit_frees_space() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let payload = [b'p'; 42]; // 50 bytes framed
        let (mut w, mut r) = open(dir, opts(4096, 200)).unwrap();
        w.append(&[&payload, &payload]).unwrap();
        w.append(&[&payload]).unwrap();

        let seg = seg_files(dir).pop().unwrap();
        // One more record would fit, two do not: the batch is refused as a whole.
        match w.append(&[&payload, &payload]) {
            Err(SpoolError::Full { used, max }) => assert_eq!((used, max), (150, 200)),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(fs::metadata(&seg).unwrap().len(), 150);
        assert_eq!(load(&w.stats().unshipped_records), 3);
        w.append(&[&payload]).unwrap();
        assert!(matches!(
            w.append(&[&payload]),
            Err(SpoolError::Full {
                used: 200,
                max: 200
            })
        ));
        assert_eq!(fs::metadata(&seg).unwrap().len(), 200);

        let batch = r.read_batch(2, 1 << 20).unwrap().unwrap();
        assert!(r.read_batch(10, 1 << 20).unwrap().is_some());
        // Reading alone frees nothing: only a commit does.
        assert!(matches!(
            w.append(&[&payload]),
            Err(SpoolError::Full { .. })
        ));
        r.commit(batch.end).unwrap();
        w.append(&[&payload, &payload]).unwrap();
        assert!(matches!(
            w.append(&[&payload]),
            Err(SpoolError::Full { .. })
        ));
        r.rewind();
        let records: usize = std::iter::from_fn(|| r.read_batch(10, 1 << 20).unwrap())
            .map(|b| b.records.len())
            .sum();
        assert_eq!(records, 4, "the refused records must not be in the spool");
    }

    #[test]
    fn empty_and_oversized_records_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
        let err = w.append(&[b"ok", b""]).unwrap_err();
        assert!(
            matches!(&err, SpoolError::Io { source, .. } if source.kind() == ErrorKind::InvalidInput),
            "{err}"
        );
        let huge = vec![0u8; MAX_RECORD_BYTES + 1];
        assert!(w.append(&[&huge]).is_err());
        assert!(r.read_batch(10, 1 << 20).unwrap().is_none());
        assert_eq!(fs::metadata(&seg_files(tmp.path())[0]).unwrap().len(), 0);
    }

    #[test]
    fn second_open_of_a_live_spool_is_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (w, r) = open(dir, opts(4096, BIG)).unwrap();
        assert!(
            matches!(open(dir, opts(4096, BIG)), Err(SpoolError::Locked { dir: d }) if d == dir)
        );
        drop(w);
        // The reader alone still holds the lock.
        assert!(matches!(
            open(dir, opts(4096, BIG)),
            Err(SpoolError::Locked { .. })
        ));
        drop(r);
        assert!(open(dir, opts(4096, BIG)).is_ok());
    }

    #[test]
    fn stats_are_exact() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let fsync = SpoolOptions {
            segment_bytes: 4096,
            max_bytes: BIG,
            fsync: true,
        };
        let (mut w, mut r) = open(dir, fsync).unwrap();
        let stats = w.stats();
        assert_eq!(load(&stats.segments), 1);
        assert_eq!(load(&stats.oldest_unshipped_us), 0);

        let t0 = now_us();
        append_range(&mut w, 0..3);
        let t1 = now_us();
        std::thread::sleep(Duration::from_millis(3));
        let t2 = now_us();
        append_range(&mut w, 3..5);
        assert_eq!(load(&stats.unshipped_bytes), framed(0..5));
        assert_eq!(load(&stats.unshipped_records), 5);
        let oldest_a = load(&stats.oldest_unshipped_us);
        assert!((t0..=t1).contains(&oldest_a), "{t0} <= {oldest_a} <= {t1}");

        // Part of the first append acknowledged: its time is still the oldest.
        let batch = r.read_batch(2, 1 << 20).unwrap().unwrap();
        r.commit(batch.end).unwrap();
        assert_eq!(load(&stats.unshipped_records), 3);
        assert_eq!(load(&stats.unshipped_bytes), framed(2..5));
        assert_eq!(load(&stats.oldest_unshipped_us), oldest_a);

        // The first append done: the second one's time.
        let batch = r.read_batch(1, 1 << 20).unwrap().unwrap();
        r.commit(batch.end).unwrap();
        assert_eq!(load(&stats.unshipped_records), 2);
        assert_eq!(load(&stats.unshipped_bytes), framed(3..5));
        assert!(load(&stats.oldest_unshipped_us) >= t2);

        // A re-read after rewind is not counted twice.
        r.read_batch(1, 1 << 20).unwrap().unwrap();
        r.rewind();
        let batch = r.read_batch(10, 1 << 20).unwrap().unwrap();
        assert_eq!(batch.records.len(), 2);
        r.commit(batch.end).unwrap();
        assert_eq!(load(&stats.unshipped_records), 0);
        assert_eq!(load(&stats.unshipped_bytes), 0);
        assert_eq!(load(&stats.oldest_unshipped_us), 0);
        // A stale commit changes nothing.
        r.commit(Position {
            segment: 0,
            offset: 0,
        })
        .unwrap();
        assert_eq!(load(&stats.unshipped_records), 0);

        append_range(&mut w, 5..9);
        drop((w, r));
        let seg = seg_files(dir).pop().unwrap();
        let mtime = mtime_us(&fs::metadata(&seg).unwrap());
        let (_w, r) = open(dir, fsync).unwrap();
        let stats = r.stats();
        assert_eq!(load(&stats.recovered_records), 4);
        assert_eq!(load(&stats.unshipped_records), 4);
        assert_eq!(load(&stats.unshipped_bytes), framed(5..9));
        assert_eq!(load(&stats.oldest_unshipped_us), mtime);
        assert_eq!(load(&stats.segments), 1);
    }

    #[test]
    fn corrupt_record_in_an_older_segment_skips_the_rest_of_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        {
            let (mut w, _r) = open(dir, opts(128, BIG)).unwrap();
            for i in 0..30 {
                append_range(&mut w, i..i + 1);
            }
        }
        let files = seg_files(dir);
        assert!(files.len() >= 3);
        let first_len = fs::metadata(&files[0]).unwrap().len();
        let in_first = (0..30)
            .take_while(|&i| framed(0..i + 1) <= first_len)
            .count();
        assert!(in_first >= 3);
        // Flip a payload byte of the second record.
        let mut bytes = fs::read(&files[0]).unwrap();
        bytes[usize::try_from(framed(0..1)).unwrap() + 9] ^= 0x55;
        fs::write(&files[0], bytes).unwrap();

        let (_w, mut r) = open(dir, opts(128, BIG)).unwrap();
        let expected: Vec<usize> = std::iter::once(0).chain(in_first..30).collect();
        assert_eq!(drain(&mut r, 4, true), expected);
        let stats = r.stats();
        assert_eq!(load(&stats.corrupt_records), 1);
        assert_eq!(load(&stats.unshipped_bytes), 0);
        assert_eq!(load(&stats.unshipped_records), 0);
        assert_eq!(seg_files(dir).len(), 1);
    }

    #[test]
    fn concurrent_writer_and_reader_see_every_record_once_in_order() {
        const N: usize = 10_000;
        let tmp = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
        let writer = std::thread::spawn(move || {
            let mut n = 0;
            let mut size = 0;
            while n < N {
                size = size % 17 + 1;
                let end = (n + size).min(N);
                append_range(&mut w, n..end);
                n = end;
            }
            w
        });

        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::with_capacity(N);
        let mut batches = 0;
        while got.len() < N {
            assert!(
                Instant::now() < deadline,
                "only {} records after 60s",
                got.len()
            );
            match r.read_batch(100, 2048).unwrap() {
                None => std::thread::yield_now(),
                Some(batch) => {
                    batches += 1;
                    if batches % 7 == 0 {
                        // A failed shipment: these come again after the rewind.
                        r.rewind();
                        continue;
                    }
                    got.extend(batch.records.iter().map(|p| seq(p)));
                    r.commit(batch.end).unwrap();
                }
            }
        }
        let w = writer.join().unwrap();
        assert_eq!(got, (0..N).collect::<Vec<_>>());
        assert!(r.read_batch(100, 2048).unwrap().is_none());
        let stats = w.stats();
        assert_eq!(load(&stats.unshipped_records), 0);
        assert_eq!(load(&stats.unshipped_bytes), 0);
        assert_eq!(load(&stats.segments), 1);
        assert_eq!(seg_files(tmp.path()).len(), 1);
    }

    #[tokio::test]
    async fn append_signals_the_notifier() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut w, mut r) = open(tmp.path(), opts(4096, BIG)).unwrap();
        let notify = r.notifier();
        assert!(Arc::ptr_eq(&notify, &w.notifier()));
        let waiter = tokio::spawn(async move {
            notify.notified().await;
            r.read_batch(10, 1 << 20).unwrap().map(|b| b.records.len())
        });
        tokio::task::yield_now().await;
        append_range(&mut w, 0..2);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, Some(2));
    }
}
