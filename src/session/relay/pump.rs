//! One attachment's I/O steps: the split halves of both connections, the server side's
//! state, and pgtenant's own answers for the client. Every write to the server keeps
//! relaying what the server sends back meanwhile, so a client that pipelines heavily
//! cannot deadlock the pair.

use std::ops::Range;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::server_side::ServerSide;
use super::{prepared_violation, ClientPlan, CompletedStatement, Cycle, RelayEnd, RelayStats};

pub(super) struct Pump<'s, CR, CW, SR, SW> {
    pub client_r: CR,
    pub client_w: CW,
    pub server_r: SR,
    pub server_w: SW,
    pub server_side: ServerSide<'s>,
    /// pgtenant's own answers due to the client (reused).
    pub local: BytesMut,
    /// Transaction mode with statement renaming: the client bytes as rewritten for this
    /// connection (reused), and client bytes planned but held back until an earlier cycle
    /// is answered (see `prepared::PreparedStatements::rewrite`).
    pub rewritten: BytesMut,
    pub held: BytesMut,
}

/// The relay's bookkeeping that the server's answers update.
pub(super) struct Books<'b> {
    pub cycle: &'b mut Cycle,
    pub stats: &'b mut RelayStats,
    pub on_statement: Option<&'b (dyn Fn(CompletedStatement) + Send + Sync)>,
}

impl Books<'_> {
    /// Hands the statements the server completed to the audit callback.
    fn report_statements(&mut self) {
        if let (Some(tracker), Some(report)) = (self.cycle.tracker.as_mut(), self.on_statement) {
            for done in tracker.completed.drain(..) {
                report(done);
            }
        }
    }
}

impl<CR, CW, SR, SW> Pump<'_, CR, CW, SR, SW>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    /// Relays the result of one read from the server to the client.
    pub async fn on_server_read(
        &mut self,
        read: std::io::Result<usize>,
        books: &mut Books<'_>,
    ) -> Result<(), RelayEnd> {
        let forwarded = self
            .server_side
            .on_read(read, &mut self.client_w, books.cycle, books.stats)
            .await;
        books.report_statements();
        forwarded
    }

    /// Writes `ranges` of `out` to the server, then flushes.
    pub async fn write_server(
        &mut self,
        out: &[u8],
        ranges: impl Iterator<Item = Range<usize>>,
        books: &mut Books<'_>,
    ) -> Result<(), RelayEnd> {
        for range in ranges {
            let mut off = range.start;
            while off < range.end {
                tokio::select! {
                    written = self.server_w.write(&out[off..range.end]) => match written {
                        Ok(0) | Err(_) => return Err(RelayEnd::ServerClosed),
                        Ok(n) => off += n,
                    },
                    read = self.server_r.read_buf(self.server_side.buf) => {
                        let forwarded = self
                            .server_side
                            .on_read(read, &mut self.client_w, books.cycle, books.stats)
                            .await;
                        books.report_statements();
                        forwarded?;
                    }
                }
            }
        }
        self.server_w
            .flush()
            .await
            .map_err(|_| RelayEnd::ServerClosed)
    }

    /// Sends pgtenant's own answers that are due (and clears them).
    pub async fn flush_local(&mut self) -> Result<(), RelayEnd> {
        if self.local.is_empty() {
            return Ok(());
        }
        let sent = self.client_w.write_all(&self.local).await;
        if sent.is_err() || self.client_w.flush().await.is_err() {
            return Err(RelayEnd::ClientClosed);
        }
        self.local.clear();
        Ok(())
    }

    /// Forwards the client bytes `plan` selected from `client_buf` (after `prefix`,
    /// pgtenant's setup, in the same write): as they are, or rewritten for this connection
    /// by the named-statement layer (what must wait is held back).
    pub async fn forward_planned(
        &mut self,
        plan: &ClientPlan,
        client_buf: &[u8],
        prefix: Option<BytesMut>,
        books: &mut Books<'_>,
    ) -> Result<(), RelayEnd> {
        let Some(p) = self.server_side.prep.as_mut() else {
            return match prefix {
                Some(mut bytes) => {
                    for range in plan.forwarded() {
                        bytes.extend_from_slice(&client_buf[range]);
                    }
                    self.write_server(&bytes, std::iter::once(0..bytes.len()), books)
                        .await
                }
                None => self.write_server(client_buf, plan.forwarded(), books).await,
            };
        };
        self.rewritten.clear();
        if let Some(bytes) = prefix {
            self.rewritten.extend_from_slice(&bytes);
        }
        for range in plan.forwarded() {
            if !self.held.is_empty() {
                self.held.extend_from_slice(&client_buf[range]);
                continue;
            }
            let taken = p
                .rewrite_planned(&client_buf[range.clone()], &mut self.rewritten)
                .map_err(|e| RelayEnd::ClientViolation(prepared_violation(e)))?;
            self.held
                .extend_from_slice(&client_buf[range.start + taken..range.end]);
        }
        p.stmts.drain_due(&mut self.local);
        self.send_rewritten(books).await
    }

    /// Offers held-back client bytes again once a ReadyForQuery came (what they waited for
    /// may be answered now). Returns whether anything was sent.
    pub async fn release_held(&mut self, books: &mut Books<'_>) -> Result<bool, RelayEnd> {
        let Some(p) = self.server_side.prep.as_mut() else {
            return Ok(false);
        };
        if self.held.is_empty() || !std::mem::take(&mut p.ready_seen) {
            return Ok(false);
        }
        self.rewritten.clear();
        let taken = p
            .rewrite_planned(&self.held, &mut self.rewritten)
            .map_err(|e| RelayEnd::ClientViolation(prepared_violation(e)))?;
        self.held.advance(taken);
        // Locally answered messages first in line go out before anything the server
        // answers to what follows them.
        p.stmts.drain_due(&mut self.local);
        self.send_rewritten(books).await?;
        Ok(true)
    }

    /// The local answers already due, `rewritten`, then the `Cycle`'s own answers that
    /// are due.
    async fn send_rewritten(&mut self, books: &mut Books<'_>) -> Result<(), RelayEnd> {
        self.flush_local().await?;
        let rewritten = std::mem::take(&mut self.rewritten);
        let sent = self
            .write_server(&rewritten, std::iter::once(0..rewritten.len()), books)
            .await;
        self.rewritten = rewritten;
        sent?;
        self.answer_due_locals(books.cycle).await
    }

    /// Sends pgtenant's own answers that nothing else is waiting before (refusals).
    pub async fn answer_due_locals(&mut self, cycle: &mut Cycle) -> Result<(), RelayEnd> {
        cycle.take_due_locals(*self.server_side.tx_status, &mut self.local);
        self.flush_local().await
    }
}
