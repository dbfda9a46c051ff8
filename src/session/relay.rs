//! The message-level relay between a client and its pinned server connection.
//!
//! Bytes are forwarded as they arrive; only frame headers are scanned, plus the few frames
//! whose content pgtenant tracks: ReadyForQuery (transaction state, request boundaries),
//! ParameterStatus (so the pool knows the server's reported settings) and the client's
//! Terminate (never forwarded: it would kill a pooled connection, design/protocol.md trap 2).
//! One task serves both directions; while a write to the server is pending the server side
//! keeps draining, so a client that pipelines heavily cannot deadlock the pair.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::error::ClientError;
use crate::pool::ServerConn;
use crate::protocol::frame::{take_cstr, FrameScanner, ScanEvent};
use crate::protocol::tags;

/// Read buffers grow in steps of this many bytes and are reused for the whole session.
const READ_CHUNK: usize = 16 * 1024;
/// Frames from the server are trusted up to PostgreSQL's own limit.
const MAX_SERVER_FRAME: u32 = i32::MAX as u32;

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate.
    Terminated,
    /// The client closed its connection (or it broke) without Terminate.
    ClientClosed,
    /// The client broke the protocol; the error has to be sent to it.
    ClientViolation(ClientError),
    /// The server closed the connection or failed; the client already got whatever the server
    /// said (e.g. a FATAL ErrorResponse) and the connection must be destroyed.
    ServerClosed,
    /// pgtenant is shutting down and the session reached an idle point outside a transaction.
    Shutdown,
}

/// Counters a session reports when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Simple Query, Sync and FunctionCall messages: one per request/response cycle.
    pub queries: u64,
    pub client_bytes: u64,
    pub server_bytes: u64,
}

/// Request-cycle state tracked across both directions.
#[derive(Debug, Default)]
pub struct Cycle {
    /// Query/Sync/FunctionCall forwarded whose ReadyForQuery has not come back yet.
    pub awaiting_ready: u32,
    /// Extended-protocol messages forwarded since the last Sync.
    pub unsynced: bool,
}

impl Cycle {
    /// The server connection is between requests: nothing in flight, nothing half-sent.
    pub fn idle(&self) -> bool {
        self.awaiting_ready == 0 && !self.unsynced
    }
}

pub struct Relay<'a, C> {
    pub client: &'a mut C,
    pub client_buf: &'a mut BytesMut,
    pub server: &'a mut ServerConn,
    pub max_client_frame: u32,
    pub cycle: Cycle,
    pub stats: RelayStats,
    /// Called once per batch with the number of queries seen (a metric handle, usually).
    pub on_queries: &'a (dyn Fn(u64) + Send + Sync),
}

impl<C: AsyncRead + AsyncWrite + Unpin> Relay<'_, C> {
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> RelayEnd {
        let ServerConn {
            stream,
            read_buf: server_buf,
            params,
            tx_status,
            ..
        } = &mut *self.server;
        let (mut server_r, mut server_w) = tokio::io::split(stream);
        let (mut client_r, mut client_w) = tokio::io::split(&mut *self.client);
        let client_buf = &mut *self.client_buf;
        let mut client_scan = FrameScanner::new(self.max_client_frame);
        let mut server_scan = FrameScanner::new(MAX_SERVER_FRAME);
        let mut server_side = ServerSide {
            buf: server_buf,
            params,
            tx_status,
            scan: &mut server_scan,
        };
        let mut draining = *shutdown.borrow();

        // Pipelined bytes that arrived with the password are forwarded first.
        let mut pending_client_bytes = !client_buf.is_empty();
        loop {
            // Drain: end the session between requests and outside a transaction, so a
            // transaction in progress gets to finish (up to the shutdown deadline).
            if draining && self.cycle.idle() && *server_side.tx_status == b'I' {
                return RelayEnd::Shutdown;
            }
            if !pending_client_bytes {
                reserve(client_buf);
                reserve(server_side.buf);
                tokio::select! {
                    biased;
                    changed = shutdown.changed(), if !draining => {
                        draining = changed.is_err() || *shutdown.borrow();
                        continue;
                    }
                    read = server_r.read_buf(server_side.buf) => {
                        match read {
                            Ok(0) | Err(_) => return RelayEnd::ServerClosed,
                            Ok(_) => {}
                        }
                        if let Err(end) = server_side
                            .forward(&mut client_w, &mut self.cycle, &mut self.stats)
                            .await
                        {
                            return end;
                        }
                        continue;
                    }
                    read = client_r.read_buf(client_buf) => {
                        match read {
                            Ok(0) | Err(_) => return RelayEnd::ClientClosed,
                            Ok(_) => {}
                        }
                    }
                }
            }
            pending_client_bytes = false;

            // Client → server: scan headers, stop at Terminate.
            let mut terminate_at = None;
            let mut queries = 0u64;
            let cycle = &mut self.cycle;
            let scanned = client_scan.scan(
                client_buf,
                |tag| tag == tags::TERMINATE,
                |event| match event {
                    ScanEvent::Whole { at, .. } => {
                        terminate_at.get_or_insert(at);
                    }
                    ScanEvent::Header { tag, .. } => match tag {
                        tags::QUERY | tags::FUNCTION_CALL => {
                            cycle.awaiting_ready += 1;
                            queries += 1;
                        }
                        tags::SYNC => {
                            cycle.awaiting_ready += 1;
                            cycle.unsynced = false;
                            queries += 1;
                        }
                        tags::PARSE
                        | tags::BIND
                        | tags::EXECUTE
                        | tags::DESCRIBE
                        | tags::CLOSE
                        | tags::FLUSH => cycle.unsynced = true,
                        _ => {}
                    },
                },
            );
            let forward_len = match (scanned, terminate_at) {
                (Err(e), _) => return RelayEnd::ClientViolation(e.into()),
                (Ok(_), Some(at)) => at,
                (Ok(n), None) => n,
            };
            if queries > 0 {
                self.stats.queries += queries;
                (self.on_queries)(queries);
            }
            self.stats.client_bytes += forward_len as u64;
            // Write to the server while still draining what it sends back.
            let mut off = 0;
            while off < forward_len {
                tokio::select! {
                    written = server_w.write(&client_buf[off..forward_len]) => match written {
                        Ok(0) | Err(_) => return RelayEnd::ServerClosed,
                        Ok(n) => off += n,
                    },
                    read = server_r.read_buf(server_side.buf) => {
                        match read {
                            Ok(0) | Err(_) => return RelayEnd::ServerClosed,
                            Ok(_) => {}
                        }
                        if let Err(end) = server_side
                            .forward(&mut client_w, &mut self.cycle, &mut self.stats)
                            .await
                        {
                            return end;
                        }
                    }
                }
            }
            if server_w.flush().await.is_err() {
                return RelayEnd::ServerClosed;
            }
            client_buf.advance(forward_len);
            if terminate_at.is_some() {
                return RelayEnd::Terminated;
            }
        }
    }
}

/// Server → client direction: its buffer and the connection state it updates.
struct ServerSide<'s> {
    buf: &'s mut BytesMut,
    params: &'s mut std::collections::BTreeMap<String, String>,
    tx_status: &'s mut u8,
    scan: &'s mut FrameScanner,
}

impl ServerSide<'_> {
    /// Scans what the server sent, updates transaction state and reported parameters, and
    /// forwards every complete byte to the client.
    async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        client_w: &mut W,
        cycle: &mut Cycle,
        stats: &mut RelayStats,
    ) -> Result<(), RelayEnd> {
        let params = &mut *self.params;
        let tx_status = &mut *self.tx_status;
        let n = self
            .scan
            .scan(
                self.buf,
                |tag| tag == tags::READY_FOR_QUERY || tag == tags::PARAMETER_STATUS,
                |event| {
                    if let ScanEvent::Whole { tag, body, .. } = event {
                        if tag == tags::READY_FOR_QUERY {
                            cycle.awaiting_ready = cycle.awaiting_ready.saturating_sub(1);
                            if let Some(status) = body.first() {
                                *tx_status = *status;
                            }
                        } else {
                            record_parameter(params, body);
                        }
                    }
                },
            )
            .map_err(|_| RelayEnd::ServerClosed)?;
        if n == 0 {
            return Ok(());
        }
        stats.server_bytes += n as u64;
        let wrote = client_w.write_all(&self.buf[..n]).await;
        if wrote.is_err() || client_w.flush().await.is_err() {
            return Err(RelayEnd::ClientClosed);
        }
        self.buf.advance(n);
        Ok(())
    }
}

fn record_parameter(params: &mut std::collections::BTreeMap<String, String>, mut body: &[u8]) {
    let (Some(name), Some(value)) = (take_cstr(&mut body), take_cstr(&mut body)) else {
        return;
    };
    params.insert(
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    );
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}
