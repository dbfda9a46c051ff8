//! Transaction mode: the relay's side of `crate::prepared` (named statements across server
//! connections). Client frames the `Cycle` forwards are rewritten for the attached
//! connection; server frames are checked against the answers the client is owed. The call
//! sequence is the one `prepared`'s module doc prescribes; session mode never gets here.

use bytes::BytesMut;

use crate::prepared::{self, PreparedError, PreparedStatements, ServerAction, ServerStatements};

/// One attachment's view of the client's statements and the connection's.
pub(super) struct Prep<'s> {
    pub stmts: &'s mut PreparedStatements,
    pub server: &'s mut ServerStatements,
    /// Local answers due before the server frame being handled (reused, usually empty).
    pub pre: BytesMut,
    /// Bytes left of a client frame whose body streams through (CopyData and the like):
    /// they need no rewriting and are copied as they come.
    stream_left: usize,
    /// A ReadyForQuery arrived since held-back client bytes were last offered.
    pub ready_seen: bool,
}

impl<'s> Prep<'s> {
    pub fn new(stmts: &'s mut PreparedStatements, server: &'s mut ServerStatements) -> Self {
        Prep {
            stmts,
            server,
            pre: BytesMut::new(),
            stream_left: 0,
            ready_seen: false,
        }
    }

    /// Rewrites planned client bytes into `out`. The bytes start at a frame boundary or
    /// inside a streamed body; frames `wants_whole_client` selects are complete (the
    /// `Cycle` planned them whole). Returns how many bytes were taken: fewer than all when
    /// `rewrite` must wait for an earlier cycle's answer (the rest is held back).
    pub fn rewrite_planned(
        &mut self,
        bytes: &[u8],
        out: &mut BytesMut,
    ) -> Result<usize, PreparedError> {
        let mut at = 0;
        while at < bytes.len() {
            if self.stream_left > 0 {
                let n = self.stream_left.min(bytes.len() - at);
                out.extend_from_slice(&bytes[at..at + n]);
                self.stream_left -= n;
                at += n;
                continue;
            }
            let tag = bytes[at];
            if prepared::wants_whole_client(tag) {
                // A run of whole frames goes to `rewrite` in one call.
                let mut end = at;
                while end < bytes.len() && prepared::wants_whole_client(bytes[end]) {
                    end += frame_len(&bytes[end..]).ok_or(PreparedError::Malformed(tag))?;
                }
                let end = end.min(bytes.len());
                let taken = self.stmts.rewrite(&bytes[at..end], self.server, out)?;
                at += taken;
                if at < end {
                    return Ok(at);
                }
            } else {
                let total = frame_len(&bytes[at..]).ok_or(PreparedError::Malformed(tag))?;
                let n = total.min(bytes.len() - at);
                out.extend_from_slice(&bytes[at..at + n]);
                self.stream_left = total - n;
                at += n;
            }
        }
        Ok(at)
    }

    /// One server frame (`body` empty when it streams through): appends the local answers
    /// due before it to `pre` and says what to do with the frame.
    pub fn on_server(&mut self, tag: u8, body: &[u8]) -> ServerAction {
        self.stmts
            .on_server_message(tag, body, self.server, &mut self.pre)
    }
}

/// Length of the frame at the front of `bytes` (tag included), from its header.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let len = bytes.get(1..5)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    (len >= 4).then_some(1 + len)
}
