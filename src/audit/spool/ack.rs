//! The ack file: the acknowledged position, persisted so a restart replays only what follows it.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{io_err, Position, Shared, SpoolError, ACK_FILE, ACK_FILE_BYTES, ACK_TMP_FILE};

pub(super) fn encode_ack(pos: Position) -> [u8; ACK_FILE_BYTES] {
    let mut buf = [0u8; ACK_FILE_BYTES];
    buf[..8].copy_from_slice(&pos.segment.to_le_bytes());
    buf[8..16].copy_from_slice(&pos.offset.to_le_bytes());
    let crc = crc32fast::hash(&buf[..16]);
    buf[16..].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The persisted acknowledged position; None when missing or damaged (then everything is
/// replayed, which is only duplicates).
pub(super) fn read_ack(dir: &Path) -> Option<Position> {
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

/// Writes the ack file atomically: a torn ack file would only cause replays, but a rename
/// never leaves one.
pub(super) fn persist_ack(shared: &Shared, end: Position) -> Result<(), SpoolError> {
    let tmp = shared.dir.join(ACK_TMP_FILE);
    let path = shared.dir.join(ACK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all_at(&encode_ack(end), 0)
        .map_err(io_err(&tmp))?;
    if shared.opts.fsync {
        file.sync_data().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    shared.sync_dir()
}
