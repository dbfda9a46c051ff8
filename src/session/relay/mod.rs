//! The message-level relay between a client and its pinned server connection.
//!
//! Bytes are forwarded as they arrive; only frame headers are scanned, plus the few frames
//! whose content pgtenant acts on: ReadyForQuery (transaction state, request boundaries),
//! ParameterStatus (so the pool knows the server's reported settings), the client's
//! Terminate (never forwarded: it would kill a pooled connection, design/protocol.md trap 2),
//! and, when a `ClientFilter` is set, the client's Query/Parse/FunctionCall.
//! One task serves both directions; while a write to the server is pending the server side
//! keeps draining, so a client that pipelines heavily cannot deadlock the pair.

mod cycle;
mod engage;
mod prepared_io;
mod pump;
mod server_side;
pub mod setup;
pub mod statements;

pub use cycle::{ClientFilter, ClientPlan, Cycle, Refusal};
pub use setup::SetupAnswer;
pub use statements::{CompletedStatement, StatementTracker};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::watch;

use std::sync::Arc;

use crate::error::ClientError;
use crate::pool::ServerConn;
use crate::prepared::PreparedStatements;
use crate::protocol::frame::FrameScanner;

use super::lifetime::Expiry;
use super::registry::{Control, LiveStats, SessionState};
use super::signals::{Signal, Signals};

use engage::EngagePoint;
use prepared_io::Prep;
use pump::{Books, Pump};
use server_side::ServerSide;

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
    /// The console killed the session (it ends at once, even mid-request).
    Killed(Arc<str>),
    /// The session's deadline passed and it reached an idle point outside a transaction.
    Expired(Expiry),
    /// Transaction mode: the server connection reached an idle point outside a transaction
    /// with nothing in flight and nothing pending from the client; it can be returned.
    Detached,
    /// Transaction mode: the client sent its first frame that needs the named-statement
    /// layer (`engage`); everything before it was answered. Re-attach the same connection
    /// with the layer on (the client's bytes wait in its buffer).
    Engage,
}

/// Transaction mode: one attachment of a server connection to the session.
pub struct Attach<'a> {
    /// pgtenant's setup (tenant context, client settings) and what it must answer. The
    /// bytes go out in the same write as, and before, the client's first frames.
    pub setup: Option<(BytesMut, SetupAnswer)>,
    /// True once a session-only feature pinned the session: it keeps the connection.
    pub pinned: &'a (dyn Fn() -> bool + Send + Sync),
    /// The client's named statements; the connection's are `ServerConn::prepared`, which
    /// must be `Some` then. `None` relays Parse/Bind/... unchanged.
    pub prepared: Option<&'a mut PreparedStatements>,
    /// With `prepared` `None`: watch for the first frame that needs the layer and end with
    /// `RelayEnd::Engage` before it; the callback pins the session where that cannot be
    /// done (see `engage`). `None`: relay everything unchanged.
    pub lazy: Option<&'a (dyn Fn() + Send + Sync)>,
}

/// What the relay watches for its session besides shutdown: the console's control channel,
/// the deadline, and where it publishes its state and counters (relaxed stores, no locks).
pub struct Watches<'a> {
    /// Shutdown and the console's control channel (the relay's `shutdown` argument is
    /// not watched then).
    pub signals: &'a mut Signals,
    pub live: &'a LiveStats,
    pub deadline: Option<(tokio::time::Instant, Expiry)>,
}

/// Counters a session reports when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    /// Simple Query, Sync and FunctionCall messages: one per request/response cycle.
    pub queries: u64,
    pub client_bytes: u64,
    pub server_bytes: u64,
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
    /// Inspects client statements (shared upstreams); `None` forwards everything.
    pub filter: Option<&'a dyn ClientFilter>,
    /// Receives every statement the server completed, when `cycle.tracker` is set (audit).
    pub on_statement: Option<&'a (dyn Fn(CompletedStatement) + Send + Sync)>,
    /// The session's control channel, deadline and live stats; `None` for a bare relay.
    pub watches: Option<Watches<'a>>,
    /// Transaction mode: end with `RelayEnd::Detached` at the next idle point; `None` in
    /// session mode.
    pub attach: Option<Attach<'a>>,
}

impl<C: AsyncRead + AsyncWrite + Unpin> Relay<'_, C> {
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> RelayEnd {
        let ServerConn {
            stream,
            read_buf: server_buf,
            params,
            tx_status,
            prepared: server_prepared,
            ..
        } = &mut *self.server;
        let (server_r, server_w) = tokio::io::split(stream);
        let (client_r, client_w) = tokio::io::split(&mut *self.client);
        let client_buf = &mut *self.client_buf;
        let mut client_scan = FrameScanner::new(self.max_client_frame);
        let mut server_scan = FrameScanner::new(MAX_SERVER_FRAME);
        let (mut prefix, setup, pinned, prep, mut lazy) = match self.attach.take() {
            Some(Attach {
                setup,
                pinned,
                prepared,
                lazy,
            }) => {
                let (bytes, answer) = setup.unzip();
                let prep = prepared
                    .zip(server_prepared.as_mut())
                    .map(|(c, s)| Prep::new(c, s));
                let lazy = lazy.filter(|_| prep.is_none());
                (bytes, answer, Some(pinned), prep, lazy)
            }
            None => (None, None, None, None, None),
        };
        // Client bytes wait (unread, unplanned) until the layer is engaged.
        let mut engage_when_idle = false;
        // Watching for the layer needs the same frames whole as the layer itself.
        self.cycle.whole_for_prepared = prep.is_some() || lazy.is_some();
        let mut pump = Pump {
            client_r,
            client_w,
            server_r,
            server_w,
            server_side: ServerSide {
                buf: server_buf,
                params,
                tx_status,
                scan: &mut server_scan,
                out: BytesMut::new(),
                setup,
                prep,
            },
            local: BytesMut::new(),
            rewritten: BytesMut::new(),
            held: BytesMut::new(),
        };
        let mut books = Books {
            cycle: &mut self.cycle,
            stats: &mut self.stats,
            on_statement: self.on_statement,
        };
        let (mut signals, live, deadline) = match self.watches.take() {
            Some(w) => (Some(w.signals), Some(w.live), w.deadline),
            None => (None, None, None),
        };
        let mut draining = match signals.as_deref() {
            Some(s) => s.draining(),
            None => *shutdown.borrow(),
        };
        let mut paused = false;
        if let Some(s) = signals.as_deref() {
            match s.control() {
                Control::Kill(reason) => return RelayEnd::Killed(reason),
                Control::Paused => paused = true,
                Control::Run => {}
            }
        }
        let mut expired = false;
        let expiry = tokio::time::sleep_until(deadline.map_or_else(far_future, |(at, _)| at));
        tokio::pin!(expiry);

        // Pipelined bytes that arrived with the password are forwarded first.
        let mut pending_client_bytes = !client_buf.is_empty();
        loop {
            // Drain: end the session between requests and outside a transaction, so a
            // transaction in progress gets to finish (up to the shutdown deadline). An
            // expired session ends at the same points.
            let at_boundary = books.cycle.idle() && *pump.server_side.tx_status == b'I';
            if at_boundary && draining {
                return RelayEnd::Shutdown;
            }
            if let (true, true, Some((_, why))) = (at_boundary, expired, deadline) {
                return RelayEnd::Expired(why);
            }
            // Transaction mode: give the connection back between transactions. Not with
            // client bytes pending (they continue on this connection), not with server
            // bytes unread or setup answers outstanding (its state would be unknown).
            if let Some(pinned) = pinned {
                if at_boundary
                    && !pending_client_bytes
                    && client_buf.is_empty()
                    && pump.server_side.buf.is_empty()
                    && pump.server_side.setup.is_none()
                    && pump.held.is_empty()
                    && pump
                        .server_side
                        .prep
                        .as_ref()
                        .is_none_or(|p| p.stmts.idle())
                    && !pinned()
                {
                    return RelayEnd::Detached;
                }
            }
            if engage_when_idle
                && books.cycle.idle()
                && pump.server_side.setup.is_none()
                && pump.server_side.buf.is_empty()
            {
                return RelayEnd::Engage;
            }
            // Held-back client bytes go on once a ReadyForQuery came (what they waited for
            // may be answered now); new client bytes wait behind them.
            match pump.release_held(&mut books).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(end) => return end,
            }
            let blocked = !pump.held.is_empty() || engage_when_idle;
            // PAUSE holds the next request at a transaction boundary: at most one read of
            // it is taken in (so SHOW CLIENTS can tell a held request), none is forwarded.
            let hold = paused && at_boundary;
            if let Some(live) = live {
                live.set_state(if hold && client_buf.is_empty() {
                    SessionState::Paused
                } else if hold {
                    SessionState::Waiting
                } else if books.cycle.idle() {
                    SessionState::from_tx_status(*pump.server_side.tx_status)
                } else {
                    SessionState::Active
                });
                live.publish(
                    books.stats.queries,
                    books.stats.client_bytes,
                    books.stats.server_bytes,
                );
            }
            if !pending_client_bytes || hold || blocked {
                reserve(client_buf);
                reserve(pump.server_side.buf);
                tokio::select! {
                    biased;
                    changed = shutdown.changed(), if !draining && signals.is_none() => {
                        draining = changed.is_err() || *shutdown.borrow();
                        continue;
                    }
                    signal = next_signal(signals.as_deref_mut()) => {
                        let was_paused = paused;
                        match signal {
                            Signal::Shutdown => draining = true,
                            Signal::Control(Control::Kill(reason)) => return RelayEnd::Killed(reason),
                            Signal::Control(Control::Paused) => paused = true,
                            Signal::Control(Control::Run) => paused = false,
                        }
                        // A request held while paused goes on now.
                        if was_paused && !paused && !client_buf.is_empty() {
                            pending_client_bytes = true;
                        }
                        continue;
                    }
                    () = &mut expiry, if deadline.is_some() && !expired => {
                        expired = true;
                        continue;
                    }
                    read = pump.server_r.read_buf(pump.server_side.buf) => {
                        if let Err(end) = pump.on_server_read(read, &mut books).await {
                            return end;
                        }
                        continue;
                    }
                    read = pump.client_r.read_buf(client_buf), if (!hold || client_buf.is_empty()) && !blocked => {
                        match read {
                            Ok(0) | Err(_) => return RelayEnd::ClientClosed,
                            Ok(_) => {}
                        }
                        if hold {
                            pending_client_bytes = true;
                            continue;
                        }
                    }
                }
            }
            pending_client_bytes = false;

            let mut limit = client_buf.len();
            if let Some(pin_session) = lazy {
                let skip = client_scan.pending_body();
                let point = client_buf.get(skip..).map_or(EngagePoint::None, |bytes| {
                    engage::engage_point(bytes, books.cycle.mid_cycle(), books.cycle.discarding())
                });
                match point {
                    EngagePoint::None => {}
                    EngagePoint::At(at) => {
                        limit = skip + at;
                        engage_when_idle = true;
                        lazy = None;
                    }
                    EngagePoint::Pin => {
                        pin_session();
                        lazy = None;
                    }
                }
            }
            let plan =
                match books
                    .cycle
                    .plan_client(&mut client_scan, &client_buf[..limit], self.filter)
                {
                    Ok(plan) => plan,
                    Err(e) => return RelayEnd::ClientViolation(e.into()),
                };
            if plan.queries > 0 {
                books.stats.queries += plan.queries;
                (self.on_queries)(plan.queries);
            }
            books.stats.client_bytes += plan.forwarded().map(|r| r.len() as u64).sum::<u64>();
            let sent = pump
                .forward_planned(&plan, client_buf, prefix.take(), &mut books)
                .await;
            if let Err(end) = sent {
                return end;
            }
            client_buf.advance(plan.consumed);
            // pgtenant's own answers that nothing else is waiting before.
            if let Err(end) = pump.answer_due_locals(books.cycle).await {
                return end;
            }
            if plan.terminate {
                return RelayEnd::Terminated;
            }
        }
    }
}

fn prepared_violation(e: crate::prepared::PreparedError) -> ClientError {
    ClientError::Protocol(e.to_string())
}

/// The session's next signal; never without `Signals` (a bare relay).
async fn next_signal(signals: Option<&mut Signals>) -> Signal {
    match signals {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// A deadline that never comes, for a session without one (about 30 years out).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365 * 30)
}

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}
