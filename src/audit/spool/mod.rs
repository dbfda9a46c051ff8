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

mod ack;
mod frame;
mod reader;
mod recovery;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

pub use reader::SpoolReader;
pub use writer::SpoolWriter;

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
// open
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

    let mut segments = recovery::list_segments(dir)?;
    let ack = ack::read_ack(dir);
    if segments.is_empty() {
        // Continue the numbering past the ack so that a stale ack can never point into new data.
        let first = ack.map_or(1, |a| a.segment + 1);
        create_segment(dir, first)?;
        sync_dir(dir)?;
        segments.push(first);
    }
    let recovered = recovery::recover(dir, &segments, ack)?;

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
    let writer = SpoolWriter::new(Arc::clone(&shared), current, current_end, file);
    let reader = SpoolReader::new(shared, recovered.start);
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
