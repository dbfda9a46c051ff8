//! Server → client direction: scan what the server sent, keep the connection's state
//! (transaction status, reported parameters) current, and forward it, with pgtenant's own
//! answers spliced in at request boundaries.

use std::collections::BTreeMap;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::protocol::frame::{take_cstr, FrameScanner, ScanEvent};
use crate::protocol::tags;

use super::prepared_io::Prep;
use super::setup::{SetupAnswer, SetupProgress};
use super::{Cycle, RelayEnd, RelayStats};
use crate::error::ClientError;
use crate::prepared::{self, ServerAction};

pub(super) struct ServerSide<'s> {
    pub buf: &'s mut BytesMut,
    pub params: &'s mut BTreeMap<String, String>,
    pub tx_status: &'s mut u8,
    pub scan: &'s mut FrameScanner,
    /// Reused when pgtenant's answers have to be spliced into the server's bytes.
    pub out: BytesMut,
    /// Transaction mode: answers to pgtenant's setup still expected before the client's.
    pub setup: Option<SetupAnswer>,
    /// Transaction mode: named statements across connections; `None` in session mode.
    pub prep: Option<Prep<'s>>,
}

impl ServerSide<'_> {
    /// Handles the result of one read from the server: a closed or failed server ends the
    /// relay; otherwise the new bytes are forwarded.
    pub async fn on_read<W: AsyncWrite + Unpin>(
        &mut self,
        read: std::io::Result<usize>,
        client_w: &mut W,
        cycle: &mut Cycle,
        stats: &mut RelayStats,
    ) -> Result<(), RelayEnd> {
        match read {
            Ok(0) | Err(_) => Err(RelayEnd::ServerClosed),
            Ok(_) => {
                if !self.setup_done()? {
                    return Ok(());
                }
                self.forward(client_w, cycle, stats).await
            }
        }
    }

    /// Consumes the setup's answers first: nothing reaches the client before the setup is
    /// known to have succeeded. A failed setup ends the relay (the connection is destroyed).
    fn setup_done(&mut self) -> Result<bool, RelayEnd> {
        let Some(setup) = self.setup.as_mut() else {
            return Ok(true);
        };
        let params = &mut *self.params;
        match setup.consume(self.buf, &mut |k, v| {
            params.insert(k, v);
        }) {
            SetupProgress::Pending => Ok(false),
            SetupProgress::Done => {
                self.setup = None;
                Ok(true)
            }
            SetupProgress::Failed(e) => Err(RelayEnd::ClientViolation(ClientError::Context(e))),
        }
    }

    /// Scans the server's bytes, updates state, and forwards every complete byte.
    async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        client_w: &mut W,
        cycle: &mut Cycle,
        stats: &mut RelayStats,
    ) -> Result<(), RelayEnd> {
        let params = &mut *self.params;
        let tx_status = &mut *self.tx_status;
        let tracking = cycle.tracker.is_some();
        let mut prep = self.prep.as_mut();
        let preparing = prep.is_some();
        let now = std::time::Instant::now();
        // (start, end, bytes): `buf[start..end]` is replaced by `bytes` (an insert when
        // start == end). Rare: around refused statements and statement renaming.
        let mut splices: Vec<(usize, usize, Bytes)> = Vec::new();
        let mut abort = false;
        let n = self
            .scan
            .scan(
                self.buf,
                |tag| {
                    tag == tags::READY_FOR_QUERY
                        || tag == tags::PARAMETER_STATUS
                        || (preparing && prepared::wants_whole_server(tag))
                        || (tracking
                            && matches!(
                                tag,
                                tags::COMMAND_COMPLETE
                                    | tags::ERROR_RESPONSE
                                    | tags::EMPTY_QUERY_RESPONSE
                                    | tags::PORTAL_SUSPENDED
                            ))
                },
                |event| {
                    let (tag, at, body, whole) = match event {
                        ScanEvent::Whole { tag, at, body } => (tag, at, body, true),
                        ScanEvent::Header { tag, at } => (tag, at, &[][..], false),
                    };
                    let mut forward = true;
                    if let Some(p) = prep.as_deref_mut() {
                        let action = p.on_server(tag, body);
                        if !p.pre.is_empty() {
                            splices.push((at, at, p.pre.split().freeze()));
                        }
                        let end = at + 5 + body.len();
                        match action {
                            ServerAction::Forward => {}
                            // Only whole frames may be dropped or replaced.
                            ServerAction::Drop if whole => {
                                splices.push((at, end, Bytes::new()));
                                forward = false;
                            }
                            ServerAction::Replace(bytes) if whole => {
                                splices.push((at, end, bytes));
                                forward = false;
                            }
                            _ => abort = true,
                        }
                        if tag == tags::READY_FOR_QUERY {
                            p.ready_seen = true;
                        }
                    }
                    if !whole {
                        return;
                    }
                    if let Some(tracker) = cycle.tracker.as_mut() {
                        tracker.on_server_frame(tag, body, now);
                    }
                    if tag == tags::PARAMETER_STATUS {
                        record_parameter(params, body);
                        return;
                    }
                    if tag != tags::READY_FOR_QUERY {
                        return;
                    }
                    if let Some(status) = body.first() {
                        *tx_status = *status;
                    }
                    // A ReadyForQuery pgtenant added (dropped here) ends no client cycle.
                    if !forward {
                        return;
                    }
                    if let Some(error) = cycle.on_server_ready(now) {
                        splices.push((at, at, error));
                    }
                    let mut due = BytesMut::new();
                    cycle.take_due_locals(*tx_status, &mut due);
                    if !due.is_empty() {
                        splices.push((at + 6, at + 6, due.freeze()));
                    }
                },
            )
            .map_err(|_| RelayEnd::ServerClosed)?;
        if abort {
            // The prepared layer lost track of what the server answers (or a hidden cycle
            // failed): the connection's state is unknown, so it is destroyed.
            return Err(RelayEnd::ServerClosed);
        }
        if let Some(p) = self.prep.as_mut() {
            p.stmts.drain_due(&mut p.pre);
            if !p.pre.is_empty() {
                splices.push((n, n, p.pre.split().freeze()));
            }
        }
        if n == 0 && splices.is_empty() {
            return Ok(());
        }
        stats.server_bytes += n as u64;
        let wrote = if splices.is_empty() {
            client_w.write_all(&self.buf[..n]).await
        } else {
            self.out.clear();
            let mut from = 0;
            for (start, end, bytes) in &splices {
                self.out.extend_from_slice(&self.buf[from..*start]);
                self.out.extend_from_slice(bytes);
                from = *end;
            }
            self.out.extend_from_slice(&self.buf[from..n]);
            client_w.write_all(&self.out).await
        };
        if wrote.is_err() || client_w.flush().await.is_err() {
            return Err(RelayEnd::ClientClosed);
        }
        self.buf.advance(n);
        Ok(())
    }
}

fn record_parameter(params: &mut BTreeMap<String, String>, mut body: &[u8]) {
    let (Some(name), Some(value)) = (take_cstr(&mut body), take_cstr(&mut body)) else {
        return;
    };
    params.insert(
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    );
}
