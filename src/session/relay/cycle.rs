//! Request/response bookkeeping for one session, and the per-frame decisions on the client's
//! messages. Pure (no I/O), so it is unit-tested directly.
//!
//! Every client message that the server answers with ReadyForQuery (Query, Sync,
//! FunctionCall) adds an `Expect` to a FIFO; every ReadyForQuery from the server removes one.
//! A statement the filter refuses is never forwarded: pgtenant answers it itself, in order,
//! right after everything the client sent before it has been answered.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::protocol::frame::{take_cstr, FrameError, FrameScanner, ScanEvent};
use crate::protocol::messages::{self, Severity};
use crate::protocol::tags;

use super::statements::StatementTracker;

/// Decides whether a client statement may reach the server.
pub trait ClientFilter: Send + Sync {
    /// SQL text of a simple Query or a Parse. `Some` refuses it.
    fn check_sql(&self, sql: &str) -> Option<Refusal>;
    /// A FunctionCall ('F') message. `Some` refuses it.
    fn check_function_call(&self) -> Option<Refusal>;
    /// A Parse: its statement name (empty for the unnamed statement) and SQL text. By
    /// default only the text is checked.
    fn check_parse(&self, _name: &[u8], sql: &str) -> Option<Refusal> {
        self.check_sql(sql)
    }
    /// A Bind or Execute (running a statement prepared earlier). `Some` refuses it, and the
    /// rest of the batch until Sync, as PostgreSQL does after an error.
    fn check_execution(&self) -> Option<Refusal> {
        None
    }
}

/// pgtenant's answer to a refused message: an ERROR (the session goes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn error_response(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(64 + self.message.len());
        messages::error_response(&mut buf, Severity::Error, self.code, &self.message);
        buf.freeze()
    }
}

/// What the answer to one request cycle will be.
#[derive(Debug)]
enum Expect {
    /// The server answers, ending with ReadyForQuery; the request arrived at this instant.
    Server(Instant),
    /// The server answers; pgtenant's ErrorResponse goes right before its ReadyForQuery
    /// (a refused Parse inside a batch whose earlier messages were forwarded).
    ServerWithError(Bytes, Instant),
    /// pgtenant answers alone (ErrorResponse + ReadyForQuery) once it is first in line.
    Local(Bytes),
}

/// A refused Parse: skip the client's messages until Sync, as PostgreSQL does after an error.
#[derive(Debug)]
struct Discard {
    error: Bytes,
    /// Messages of this batch were already forwarded, so the server must see the Sync.
    forward_sync: bool,
}

#[derive(Debug, Default)]
pub struct Cycle {
    expects: VecDeque<Expect>,
    /// Extended-protocol messages forwarded since the last Sync.
    unsynced: bool,
    discarding: Option<Discard>,
    /// Follows statements to their results (audit at statement level); `None` when off.
    pub tracker: Option<Box<StatementTracker>>,
    /// Records request-to-ReadyForQuery time of every server-answered query when set.
    pub query_seconds: Option<metrics::Histogram>,
    /// Transaction mode: the frames `prepared::PreparedStatements::rewrite` needs are
    /// planned whole (see `prepared::wants_whole_client`).
    pub whole_for_prepared: bool,
}

/// What to do with a batch of client bytes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientPlan {
    /// Bytes `0..consumed` of the buffer are handled by this plan.
    pub consumed: usize,
    /// Ranges inside `0..consumed` that must not reach the server.
    pub dropped: Vec<Range<usize>>,
    /// The client sent Terminate (at `consumed`): end the session after forwarding.
    pub terminate: bool,
    /// Request cycles started (Query, Sync, FunctionCall), for metrics.
    pub queries: u64,
}

impl ClientPlan {
    /// The byte ranges to forward, in order.
    pub fn forwarded(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let mut start = 0;
        let mut drops = self.dropped.iter();
        let mut done = false;
        std::iter::from_fn(move || loop {
            if done {
                return None;
            }
            match drops.next() {
                Some(d) => {
                    let seg = start..d.start;
                    start = d.end;
                    if !seg.is_empty() {
                        return Some(seg);
                    }
                }
                None => {
                    done = true;
                    let seg = start..self.consumed;
                    return (!seg.is_empty()).then_some(seg);
                }
            }
        })
    }
}

impl Cycle {
    /// A cycle that follows statements to their results (for the audit trail) when `tracking`.
    pub fn with_tracking(tracking: bool) -> Self {
        Cycle {
            tracker: tracking.then(Box::default),
            ..Default::default()
        }
    }

    /// Nothing in flight and nothing half-sent: the server connection is between requests.
    pub fn idle(&self) -> bool {
        self.expects.is_empty() && !self.unsynced && self.discarding.is_none()
    }

    /// Extended-protocol messages were forwarded since the last Sync.
    pub fn mid_cycle(&self) -> bool {
        self.unsynced
    }

    /// Client messages are being skipped until Sync after a refusal.
    pub fn discarding(&self) -> bool {
        self.discarding.is_some()
    }

    /// Walks the client's frames in `buf` and decides, per frame, forward or refuse.
    pub fn plan_client(
        &mut self,
        scan: &mut FrameScanner,
        buf: &[u8],
        filter: Option<&dyn ClientFilter>,
    ) -> Result<ClientPlan, FrameError> {
        let mut plan = ClientPlan::default();
        let discarding = std::cell::Cell::new(self.discarding.is_some());
        let inspect = filter.is_some();
        let tracking = self.tracker.is_some();
        let prepared = self.whole_for_prepared;
        let now = Instant::now();
        let mut stop_at = None;
        let scanned = scan.scan(
            buf,
            |tag| {
                discarding.get()
                    || tag == tags::TERMINATE
                    || (inspect
                        && matches!(
                            tag,
                            tags::QUERY
                                | tags::PARSE
                                | tags::FUNCTION_CALL
                                | tags::BIND
                                | tags::EXECUTE
                        ))
                    || (tracking
                        && matches!(
                            tag,
                            tags::QUERY | tags::PARSE | tags::BIND | tags::EXECUTE | tags::CLOSE
                        ))
                    || (prepared && crate::prepared::wants_whole_client(tag))
            },
            |event| {
                if stop_at.is_some() {
                    return;
                }
                match event {
                    ScanEvent::Whole {
                        tag: tags::TERMINATE,
                        at,
                        ..
                    } => stop_at = Some(at),
                    ScanEvent::Whole { tag, at, body } => {
                        let frame = at..at + 5 + body.len();
                        self.on_whole(tag, frame, body, filter, now, &mut plan);
                        discarding.set(self.discarding.is_some());
                    }
                    ScanEvent::Header { tag, .. } => self.on_streamed(tag, now, &mut plan),
                }
            },
        )?;
        match stop_at {
            Some(at) => {
                plan.consumed = at;
                plan.terminate = true;
            }
            None => plan.consumed = scanned,
        }
        Ok(plan)
    }

    /// A frame whose body streams through (not inspected).
    fn on_streamed(&mut self, tag: u8, now: Instant, plan: &mut ClientPlan) {
        match tag {
            tags::QUERY | tags::FUNCTION_CALL => {
                self.expect_server(Expect::Server(now));
                plan.queries += 1;
            }
            tags::SYNC => {
                self.expect_server(Expect::Server(now));
                self.unsynced = false;
                plan.queries += 1;
            }
            tags::PARSE
            | tags::BIND
            | tags::EXECUTE
            | tags::DESCRIBE
            | tags::CLOSE
            | tags::FLUSH => self.unsynced = true,
            _ => {}
        }
    }

    /// A frame seen whole: inspected, or skipped while discarding until Sync.
    fn on_whole(
        &mut self,
        tag: u8,
        frame: Range<usize>,
        body: &[u8],
        filter: Option<&dyn ClientFilter>,
        now: Instant,
        plan: &mut ClientPlan,
    ) {
        if let Some(discard) = self.discarding.take() {
            if tag != tags::SYNC {
                self.discarding = Some(discard);
                plan.dropped.push(frame);
                return;
            }
            plan.queries += 1;
            self.unsynced = false;
            if discard.forward_sync {
                self.expect_server(Expect::ServerWithError(discard.error, now));
            } else {
                plan.dropped.push(frame);
                self.expects.push_back(Expect::Local(discard.error));
            }
            return;
        }
        let refusal = match (tag, filter) {
            (tags::QUERY, Some(f)) => sql_of(body, false).and_then(|sql| f.check_sql(sql)),
            (tags::PARSE, Some(f)) => {
                parse_of(body).and_then(|(name, sql)| f.check_parse(name, sql))
            }
            (tags::FUNCTION_CALL, Some(f)) => f.check_function_call(),
            (tags::BIND | tags::EXECUTE, Some(f)) => f.check_execution(),
            _ => None,
        };
        match (tag, refusal) {
            (tags::PARSE | tags::BIND | tags::EXECUTE, Some(refusal)) => {
                plan.dropped.push(frame);
                self.discarding = Some(Discard {
                    error: refusal.error_response(),
                    forward_sync: self.unsynced,
                });
            }
            (tags::QUERY | tags::FUNCTION_CALL, Some(refusal)) => {
                plan.dropped.push(frame);
                plan.queries += 1;
                self.expects
                    .push_back(Expect::Local(refusal.error_response()));
            }
            _ => {
                if let Some(tracker) = self.tracker.as_mut() {
                    tracker.on_client_frame(tag, body, now);
                }
                self.on_streamed(tag, now, plan)
            }
        }
    }

    /// The server will answer with ReadyForQuery.
    fn expect_server(&mut self, expect: Expect) {
        self.expects.push_back(expect);
        if let Some(tracker) = self.tracker.as_mut() {
            tracker.expect_ready();
        }
    }

    /// The server sent ReadyForQuery. Returns an error to insert before it, if one is due.
    /// `now` is the time the server's bytes were read (one clock read serves the whole read).
    pub fn on_server_ready(&mut self, now: Instant) -> Option<Bytes> {
        let (error, started) = match self.expects.pop_front() {
            Some(Expect::ServerWithError(error, started)) => (Some(error), started),
            Some(Expect::Server(started)) => (None, started),
            // A Local entry cannot be first here (they are emitted as soon as they are);
            // keep it rather than lose an answer.
            Some(local @ Expect::Local(_)) => {
                self.expects.push_front(local);
                return None;
            }
            None => return None,
        };
        if let Some(h) = &self.query_seconds {
            h.record(now.saturating_duration_since(started).as_secs_f64());
        }
        error
    }

    /// Appends pgtenant's own answers that are now first in line (ErrorResponse +
    /// ReadyForQuery with the session's current transaction status) to `out`.
    pub fn take_due_locals(&mut self, tx_status: u8, out: &mut BytesMut) {
        while let Some(Expect::Local(_)) = self.expects.front() {
            if let Some(Expect::Local(error)) = self.expects.pop_front() {
                out.extend_from_slice(&error);
                messages::ready_for_query(out, tx_status);
            }
        }
    }
}

/// The statement name and SQL text of a Parse body.
fn parse_of(body: &[u8]) -> Option<(&[u8], &str)> {
    let mut rest = body;
    let name = take_cstr(&mut rest)?;
    Some((name, std::str::from_utf8(take_cstr(&mut rest)?).ok()?))
}

/// The SQL text of a Query body, or of a Parse body (after the statement name).
fn sql_of(body: &[u8], parse: bool) -> Option<&str> {
    let mut rest = body;
    if parse {
        take_cstr(&mut rest)?;
    }
    // Text that is not UTF-8 is left to the server, which rejects it for a UTF-8 database.
    std::str::from_utf8(take_cstr(&mut rest)?).ok()
}

#[cfg(test)]
mod tests;
