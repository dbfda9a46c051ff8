//! Transaction mode: a detached session waiting for its client's next request, while
//! obeying shutdown, the console (PAUSE holds the request, KILL ends the session) and the
//! session deadline. No server connection is held here.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::protocol::tags;
use crate::session::lifetime::Expiry;
use crate::session::registry::{Control, LiveStats, SessionState};
use crate::session::relay::RelayEnd;
use crate::session::signals::{Signal, Signals};
use crate::session::ClientConn;

/// A request this large starts streaming before it is complete.
const STREAM_FROM: usize = 8 * 1024;
/// First read of a detached client: small, so idle clients stay small.
const IDLE_READ: usize = 1024;

pub(super) struct Waiter {
    deadline: Option<(tokio::time::Instant, Expiry)>,
    expired: bool,
}

impl Waiter {
    pub fn new(deadline: Option<(tokio::time::Instant, Expiry)>) -> Self {
        Waiter {
            deadline,
            expired: false,
        }
    }

    /// Returns once the client's next request is ready to go to a server connection (a
    /// whole first message, or a large one's start), or how the session ends instead.
    /// Cancel-safe.
    pub async fn next_request(
        &mut self,
        conn: &mut ClientConn,
        live: &LiveStats,
        signals: &mut Signals,
    ) -> Result<(), RelayEnd> {
        let mut paused = match signals.control() {
            Control::Kill(reason) => return Err(RelayEnd::Killed(reason)),
            Control::Paused => true,
            Control::Run => false,
        };
        let mut draining = signals.draining();
        let far = tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365 * 30);
        let expiry = tokio::time::sleep_until(self.deadline.map_or(far, |(at, _)| at));
        tokio::pin!(expiry);
        let mut first = [0u8; IDLE_READ];
        loop {
            // Between transactions is where draining and expired sessions end.
            if draining {
                return Err(RelayEnd::Shutdown);
            }
            if let (true, Some((_, why))) = (self.expired, self.deadline) {
                return Err(RelayEnd::Expired(why));
            }
            let buf = &conn.read_buf;
            if !paused && request_ready(buf) {
                // A Terminate needs no server connection.
                return match buf.first() {
                    Some(&tags::TERMINATE) => Err(RelayEnd::Terminated),
                    _ => Ok(()),
                };
            }
            live.set_state(match (paused, buf.is_empty()) {
                (true, true) => SessionState::Paused,
                (true, false) => SessionState::Waiting,
                (false, _) => SessionState::Idle,
            });
            // A detached client's buffer is freed (`Loop::serve`); the first read of its next
            // request lands on the stack and is copied, so an idle client holds no buffer.
            let unbuffered = conn.read_buf.capacity() == 0;
            if !unbuffered && conn.read_buf.capacity() - conn.read_buf.len() < 64 {
                conn.read_buf.reserve(IDLE_READ);
            }
            let hold = paused && !conn.read_buf.is_empty();
            tokio::select! {
                biased;
                signal = signals.next() => match signal {
                    Signal::Shutdown => draining = true,
                    Signal::Control(Control::Kill(reason)) => return Err(RelayEnd::Killed(reason)),
                    Signal::Control(Control::Paused) => paused = true,
                    Signal::Control(Control::Run) => paused = false,
                },
                () = &mut expiry, if self.deadline.is_some() && !self.expired => {
                    self.expired = true;
                }
                read = read_some(&mut conn.io, &mut conn.read_buf, &mut first), if !hold => match read {
                    Ok(0) | Err(_) => return Err(RelayEnd::ClientClosed),
                    Ok(_) => {}
                },
            }
        }
    }
}

/// Reads into `buf`; a buffer without capacity is not allocated until bytes arrive (they
/// are read into `first` and copied). Cancel-safe.
async fn read_some<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    first: &mut [u8],
) -> std::io::Result<usize> {
    if buf.capacity() > 0 {
        return io.read_buf(buf).await;
    }
    let n = io.read(first).await?;
    buf.extend_from_slice(&first[..n]);
    Ok(n)
}

/// A whole first message is buffered, or enough of a large one to start streaming it.
fn request_ready(buf: &BytesMut) -> bool {
    let Some(len) = buf.get(1..5) else {
        return false;
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    buf.len() > len || buf.len() >= STREAM_FROM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_ready_when_its_first_message_is_whole() {
        assert!(!request_ready(&BytesMut::from(&b"Q\0\0"[..])));
        assert!(!request_ready(&BytesMut::from(&b"Q\0\0\0\x09SELE"[..])));
        assert!(request_ready(&BytesMut::from(&b"Q\0\0\0\x09SELEC"[..])));
        assert!(request_ready(&BytesMut::from(&b"X\0\0\0\x04"[..])));
    }
}
