//! Frame reading and scanning.
//!
//! A frame is `tag: u8, len: i32 (includes itself), body`. The relay never decodes rows:
//! `FrameScanner` walks headers in a byte buffer, reports the frames a caller asked to see
//! whole, and lets every other byte stream through unbuffered, even frames larger than the
//! buffer.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(u32),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("expected message type '{}', got '{}'", *expected as char, *got as char)]
    UnexpectedTag { expected: u8, got: u8 },
}

/// Reads one whole frame into `buf` (appended after whatever it holds; the frame starts at
/// `buf[0]` only if `buf` held no partial data). Rejects a length over `max` before
/// allocating. Returns the tag and the body length. Not cancel-safe.
pub async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: u32,
) -> Result<(u8, usize), ReadFrameError> {
    while buf.len() < 5 {
        if stream.read_buf(buf).await? == 0 {
            return Err(FrameError::Truncated.into());
        }
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    check_len(len, max)?;
    let total = 1 + len as usize;
    buf.reserve(total.saturating_sub(buf.len()));
    while buf.len() < total {
        if stream.read_buf(buf).await? == 0 {
            return Err(FrameError::Truncated.into());
        }
    }
    Ok((tag, len as usize - 4))
}

#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn check_len(len: u32, max: u32) -> Result<(), FrameError> {
    if len < 4 || len > i32::MAX as u32 {
        return Err(FrameError::BadLength(len));
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(())
}

/// What the scanner saw while walking a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEvent<'a> {
    /// A frame whose tag the caller wants whole; `body` is complete; `at` is its offset.
    Whole { tag: u8, at: usize, body: &'a [u8] },
    /// Start of any other frame (at offset `at`); its body streams through.
    Header { tag: u8, at: usize },
}

/// Walks frame boundaries across successive reads of one direction of a connection.
#[derive(Debug)]
pub struct FrameScanner {
    /// Bytes of the current frame's body still to stream through.
    remaining_body: usize,
    max_len: u32,
}

impl FrameScanner {
    pub fn new(max_len: u32) -> Self {
        FrameScanner {
            remaining_body: 0,
            max_len,
        }
    }

    /// True when the scanner sits on a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.remaining_body == 0
    }

    /// Bytes of a frame's body still to stream through before the next frame starts.
    pub fn pending_body(&self) -> usize {
        self.remaining_body
    }

    /// Scans `buf[..]`, calling `on_event` per frame. Returns how many bytes may be forwarded
    /// now: everything except a trailing partial header or a partial frame the caller wants
    /// whole (those wait for more bytes). `wants_whole(tag)` selects the frames reported whole.
    pub fn scan(
        &mut self,
        buf: &[u8],
        wants_whole: impl Fn(u8) -> bool,
        mut on_event: impl FnMut(ScanEvent<'_>),
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        loop {
            if self.remaining_body > 0 {
                let take = self.remaining_body.min(buf.len() - pos);
                self.remaining_body -= take;
                pos += take;
                if self.remaining_body > 0 {
                    return Ok(pos);
                }
            }
            let rest = &buf[pos..];
            if rest.len() < 5 {
                return Ok(pos);
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
            check_len(len, self.max_len)?;
            let total = 1 + len as usize;
            if wants_whole(tag) {
                if rest.len() < total {
                    return Ok(pos);
                }
                on_event(ScanEvent::Whole {
                    tag,
                    at: pos,
                    body: &rest[5..total],
                });
                pos += total;
            } else {
                on_event(ScanEvent::Header { tag, at: pos });
                pos += 5;
                self.remaining_body = total - 5;
            }
        }
    }
}

/// Reads a NUL-terminated string from the front of `body`.
pub fn take_cstr<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = body.iter().position(|b| *b == 0)?;
    let s = &body[..end];
    body.advance(end + 1);
    Some(s)
}

/// A whole frame `tag` + length + `body`, for tests across the crate.
#[cfg(test)]
pub(crate) fn test_frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_frame as frame;

    #[test]
    fn streams_large_frames_and_holds_partial_whole_frames() {
        let mut data = frame(b'D', &[7u8; 100]);
        data.extend(frame(b'Z', b"I"));
        let mut s = FrameScanner::new(1 << 20);
        let mut seen = Vec::new();
        // Feed in two pieces: the first ends inside the 'D' body.
        let n = s
            .scan(&data[..50], |t| t == b'Z', |e| seen.push(format!("{e:?}")))
            .unwrap();
        assert_eq!(n, 50);
        assert!(!s.at_boundary());
        // Second piece ends inside the 'Z' frame: hold it back.
        let upto = data.len() - 2;
        let n2 = s
            .scan(
                &data[50..upto],
                |t| t == b'Z',
                |e| seen.push(format!("{e:?}")),
            )
            .unwrap();
        assert_eq!(50 + n2, 105);
        assert!(s.at_boundary());
        let n3 = s
            .scan(&data[105..], |t| t == b'Z', |e| seen.push(format!("{e:?}")))
            .unwrap();
        assert_eq!(n3, 6);
        assert_eq!(seen.len(), 2);
        assert!(seen[1].contains("Whole"));
    }

    #[test]
    fn rejects_bad_and_oversized_lengths() {
        let mut s = FrameScanner::new(1000);
        let mut bad = vec![b'Q'];
        bad.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            s.scan(&bad, |_| true, |_| {}),
            Err(FrameError::BadLength(3))
        );
        let mut big = vec![b'Q'];
        big.extend_from_slice(&5000u32.to_be_bytes());
        assert!(matches!(
            FrameScanner::new(1000).scan(&big, |_| false, |_| {}),
            Err(FrameError::TooLarge {
                len: 5000,
                max: 1000
            })
        ));
    }

    #[tokio::test]
    async fn read_frame_caps_before_allocating() {
        let mut data: &[u8] = &[b'p', 0x7f, 0xff, 0xff, 0xff];
        let mut buf = BytesMut::new();
        let err = read_frame(&mut data, &mut buf, 65536).await.unwrap_err();
        assert!(matches!(
            err,
            ReadFrameError::Frame(FrameError::TooLarge { .. })
        ));
        assert!(buf.capacity() < 65536);
        let ok = frame(b'p', b"tok\0");
        let mut r: &[u8] = &ok;
        let mut buf = BytesMut::new();
        assert_eq!(read_frame(&mut r, &mut buf, 100).await.unwrap(), (b'p', 4));
    }
}
