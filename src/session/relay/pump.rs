//! One attachment's I/O steps: the split halves of both connections, the server side's
//! state, and pgtenant's own answers for the client. Every write to the server keeps
//! relaying what the server sends back meanwhile, so a client that pipelines heavily
//! cannot deadlock the pair.

use std::ops::Range;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::server_side::ServerSide;
use super::{CompletedStatement, Cycle, RelayEnd, RelayStats};

pub(super) struct Pump<'s, CR, CW, SR, SW> {
    pub client_r: CR,
    pub client_w: CW,
    pub server_r: SR,
    pub server_w: SW,
    pub server_side: ServerSide<'s>,
    /// pgtenant's own answers due to the client (reused).
    pub local: BytesMut,
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

    /// Transaction mode with statement renaming: the local answers already due, the
    /// rewritten client bytes, then the `Cycle`'s own answers that are due.
    pub async fn send_rewritten(
        &mut self,
        rewritten: &[u8],
        books: &mut Books<'_>,
    ) -> Result<(), RelayEnd> {
        self.flush_local().await?;
        self.write_server(rewritten, std::iter::once(0..rewritten.len()), books)
            .await?;
        self.answer_due_locals(books.cycle).await
    }

    /// Sends pgtenant's own answers that nothing else is waiting before (refusals).
    pub async fn answer_due_locals(&mut self, cycle: &mut Cycle) -> Result<(), RelayEnd> {
        cycle.take_due_locals(*self.server_side.tx_status, &mut self.local);
        self.flush_local().await
    }
}
