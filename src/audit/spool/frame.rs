//! Reading frames (`u32 LE length | u32 LE crc32 | payload`) from a segment file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{framed_len, io_err, SpoolError, HEADER_BYTES, MAX_RECORD_BYTES, READ_CHUNK_BYTES};

/// One frame read from a segment.
pub(super) enum Frame<'a> {
    Record(&'a [u8]),
    Corrupt(&'static str),
}

/// A window of one segment file's bytes, so reading many small records costs few syscalls.
/// It only ever holds published bytes, which are never rewritten, so it stays valid until the
/// segment is deleted.
#[derive(Debug, Default)]
pub(super) struct ReadCache {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_offset: u64,
}

impl ReadCache {
    pub(super) fn clear(&mut self) {
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
    pub(super) fn record(
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
