//! Open-time recovery: finds the segments, truncates a torn tail, checks the ack against the
//! records on disk, and counts what is left to ship.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

use super::frame::{Frame, ReadCache};
use super::{
    framed_len, io_err, mtime_us, remove_if_exists, segment_path, AppendMark, Position, SpoolError,
    SEGMENT_SUFFIX,
};

/// Segment sequence numbers found in the directory, ascending.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
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

/// What `open` found on disk.
#[derive(Debug)]
pub(super) struct Recovered {
    pub(super) start: Position,
    pub(super) segments: BTreeMap<u64, u64>,
    pub(super) marks: VecDeque<AppendMark>,
    pub(super) records: u64,
    pub(super) bytes: u64,
}

/// Truncates the torn tail of the last segment, checks the ack against the records on disk,
/// deletes segments the ack covers entirely, and counts what is left to ship.
pub(super) fn recover(
    dir: &Path,
    segments: &[u64],
    ack: Option<Position>,
) -> Result<Recovered, SpoolError> {
    let (&oldest, &last) = match (segments.first(), segments.last()) {
        (Some(first), Some(last)) => (first, last),
        _ => return Err(io_err(dir)(io::Error::other("no segment to recover"))),
    };
    truncate_torn_tail(dir, last)?;

    let from_oldest = Position {
        segment: oldest,
        offset: 0,
    };
    let start = match ack {
        // Older segments were deleted after being acknowledged: nothing before `oldest` is left.
        Some(a) if a.segment < oldest => from_oldest,
        Some(a) if segments.binary_search(&a.segment).is_ok() => a,
        Some(a) => {
            tracing::warn!(dir = %dir.display(), ack = ?a, "audit spool ack names no segment on disk; replaying from the oldest segment");
            from_oldest
        }
        None => from_oldest,
    };
    match count_from(dir, segments, start)? {
        Some(rec) => {
            delete_before(dir, segments, start.segment)?;
            Ok(rec)
        }
        None => {
            tracing::warn!(dir = %dir.display(), ack = ?start, "audit spool ack is not on a record boundary; replaying from the oldest segment");
            count_from(dir, segments, from_oldest)?.ok_or_else(|| {
                io_err(dir)(io::Error::other("segment start is not a record boundary"))
            })
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
