//! The FIFO of answers the client is owed, one entry per message sent to the server or
//! answered locally, in the order the client sent them.
//!
//! Each server entry knows which server frame ends its answer, whether its frames reach the
//! client (an injected Parse's ParseComplete does not), what replaces its ErrorResponse, and
//! how to roll back what the rewriter assumed when it was sent (`Undo`). Local entries are
//! emitted as soon as they are first in line.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::protocol::tags;

use super::client::{ClientStatements, StatementDef};
use super::server::{ServerName, ServerStatements};

/// What the relay does with one server frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAction {
    /// Relay it to the client.
    Forward,
    /// Swallow it: it answers a message pgtenant added.
    Drop,
    /// Send these bytes to the client instead (pgtenant's own ErrorResponse).
    Replace(Bytes),
    /// A request cycle the relay added itself (`hidden_cycle`) failed: what follows in the
    /// pipeline would run without it (say, without the tenant context). The relay ends the
    /// session and destroys the server connection; the frame is pgtenant's business only.
    Abort,
}

/// The server frame that ends the answer to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ends {
    ParseComplete,
    BindComplete,
    CloseComplete,
    /// RowDescription or NoData (after ParameterDescription for a statement).
    Describe,
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// ReadyForQuery of a Sync: where the server stops skipping after an error.
    Sync,
    /// ReadyForQuery of a simple Query or FunctionCall (skipped after an error, too).
    Query,
}

impl Ends {
    fn ended_by(self, tag: u8) -> bool {
        match self {
            Ends::ParseComplete => tag == tags::PARSE_COMPLETE,
            Ends::BindComplete => tag == tags::BIND_COMPLETE,
            Ends::CloseComplete => tag == tags::CLOSE_COMPLETE,
            Ends::Describe => matches!(tag, tags::ROW_DESCRIPTION | tags::NO_DATA),
            Ends::Execute => matches!(
                tag,
                tags::COMMAND_COMPLETE | tags::EMPTY_QUERY_RESPONSE | tags::PORTAL_SUSPENDED
            ),
            Ends::Sync | Ends::Query => tag == tags::READY_FOR_QUERY,
        }
    }

    /// An error inside a simple Query (or at Sync) does not start a skip until Sync.
    fn answers_until_ready(self) -> bool {
        matches!(self, Ends::Sync | Ends::Query)
    }
}

/// An answer pgtenant gives itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Local {
    /// The connection already had the statement, so the client's Parse was not sent.
    ParseComplete,
    /// A client Close of a named statement (the server copy stays cached).
    CloseComplete,
}

impl Local {
    fn write(self, out: &mut BytesMut) {
        let tag = match self {
            Local::ParseComplete => tags::PARSE_COMPLETE,
            Local::CloseComplete => tags::CLOSE_COMPLETE,
        };
        out.extend_from_slice(&[tag, 0, 0, 0, 4]);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OnError {
    Forward,
    Replace(Bytes),
    Drop,
    Abort,
}

/// What to roll back when the message fails or the server skips it.
#[derive(Debug)]
pub(super) enum Undo {
    Nothing,
    /// A Parse sent to the server did not happen.
    ForgetServer(ServerName),
    /// A client Parse did not happen (only if the name still holds this definition).
    ForgetClient(Box<[u8]>, Arc<StatementDef>),
    /// A client Close / DEALLOCATE did not happen.
    RestoreClient(Box<[u8]>, Arc<StatementDef>),
    /// A Close sent to the server (eviction, DEALLOCATE) did not happen.
    RestoreServer(ServerName, Arc<StatementDef>),
    /// Several of the above, rolled back last first.
    All(Vec<Undo>),
}

impl Undo {
    fn apply(self, state: &mut State<'_>) {
        match self {
            Undo::Nothing => {}
            Undo::ForgetServer(name) => {
                state.server.remove(name);
            }
            Undo::ForgetClient(name, def) => state.client.remove_if_same(&name, &def),
            Undo::RestoreClient(name, def) => state.client.restore(name, def),
            Undo::RestoreServer(name, def) => state.server.restore(name, def),
            Undo::All(undos) => undos.into_iter().rev().for_each(|u| u.apply(state)),
        }
    }
}

#[derive(Debug)]
pub(super) enum Step {
    Local(Local),
    Server {
        ends: Ends,
        /// Whether the answer's frames reach the client.
        forward: bool,
        on_error: OnError,
    },
}

#[derive(Debug)]
pub(super) struct Entry {
    pub step: Step,
    pub undo: Undo,
}

impl Entry {
    /// A client message forwarded as it is (or renamed): answers relayed, nothing to undo.
    pub fn relayed(ends: Ends) -> Entry {
        Entry {
            step: Step::Server {
                ends,
                forward: true,
                on_error: OnError::Forward,
            },
            undo: Undo::Nothing,
        }
    }

    /// A message pgtenant added: its answer is swallowed.
    pub fn hidden(ends: Ends, on_error: OnError, undo: Undo) -> Entry {
        Entry {
            step: Step::Server {
                ends,
                forward: false,
                on_error,
            },
            undo,
        }
    }

    pub fn local(local: Local, undo: Undo) -> Entry {
        Entry {
            step: Step::Local(local),
            undo,
        }
    }

    fn ends_cycle(&self) -> bool {
        matches!(
            self.step,
            Step::Server {
                ends: Ends::Sync | Ends::Query,
                ..
            }
        )
    }

    fn is_sync(&self) -> bool {
        matches!(
            self.step,
            Step::Server {
                ends: Ends::Sync,
                ..
            }
        )
    }
}

/// The statement maps the answers update.
pub(super) struct State<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
}

#[derive(Debug, Default)]
pub(super) struct Answers {
    queue: VecDeque<Entry>,
    /// The server failed a message and no Sync was sent since: it ignores everything
    /// until the next Sync, so entries pushed now are rolled back at once.
    skipping: bool,
    /// Request cycles (Sync, Query, FunctionCall) sent, and answered or skipped.
    cycles_sent: u64,
    cycles_done: u64,
    /// Statement names changed in a cycle still in flight.
    pub unsettled: Unsettled,
}

/// Names whose last change (Parse, Close, eviction, DEALLOCATE) belongs to a request cycle
/// whose answer has not arrived: the server may still skip it after an error. A message of
/// a later cycle that depends on such a name waits (see `Answers::blocked`), so it is
/// rewritten against what really happened, as PostgreSQL would run it.
#[derive(Debug, Default)]
pub(super) struct Unsettled {
    /// Name → number of the cycle that settles it.
    client: HashMap<Box<[u8]>, u64>,
    server: HashMap<ServerName, u64>,
    /// DEALLOCATE ALL / DISCARD ALL: every name.
    all: u64,
}

impl Answers {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn push(&mut self, entry: Entry, state: &mut State<'_>) {
        if self.skipping {
            if !entry.is_sync() {
                entry.undo.apply(state);
                return;
            }
            self.skipping = false;
        }
        if entry.ends_cycle() {
            self.cycles_sent += 1;
        }
        self.queue.push_back(entry);
    }

    /// Forgets settled names once nothing is in flight.
    pub fn settle_if_idle(&mut self) {
        if self.queue.is_empty() {
            self.unsettled = Unsettled::default();
        }
    }

    /// A change made now is settled by the next cycle sent.
    pub fn note_client(&mut self, name: &[u8]) {
        let at = self.cycles_sent + 1;
        self.unsettled.client.insert(name.into(), at);
    }

    pub fn note_server(&mut self, name: ServerName) {
        let at = self.cycles_sent + 1;
        self.unsettled.server.insert(name, at);
    }

    pub fn note_all(&mut self) {
        self.unsettled.all = self.cycles_sent + 1;
    }

    /// Whether a change settled by cycle `at` is in an earlier cycle still unanswered.
    fn pending(&self, at: u64) -> bool {
        at <= self.cycles_sent && at > self.cycles_done
    }

    /// A message using these names must wait for earlier cycles to be answered.
    pub fn blocked(&self, client: Option<&[u8]>, server: Option<ServerName>) -> bool {
        let u = &self.unsettled;
        self.pending(u.all)
            || client.is_some_and(|n| u.client.get(n).is_some_and(|at| self.pending(*at)))
            || server.is_some_and(|n| u.server.get(&n).is_some_and(|at| self.pending(*at)))
    }

    /// Client names whose change in an earlier cycle is unanswered (the client's count of
    /// statements is uncertain by this much).
    pub fn pending_client_changes(&self) -> usize {
        (self.unsettled.client.values())
            .filter(|at| self.pending(**at))
            .count()
    }

    /// Whether any name is unsettled in an earlier cycle (for DEALLOCATE ALL).
    pub fn any_blocked(&self) -> bool {
        let u = &self.unsettled;
        self.pending(u.all)
            || u.client.values().any(|at| self.pending(*at))
            || u.server.values().any(|at| self.pending(*at))
    }

    /// Emits the local answers at the head of the queue.
    pub fn drain_due(&mut self, out: &mut BytesMut) {
        while let Some(Entry {
            step: Step::Local(local),
            ..
        }) = self.queue.front()
        {
            local.write(out);
            self.queue.pop_front();
        }
    }

    pub fn on_server_message(
        &mut self,
        tag: u8,
        body: &[u8],
        state: &mut State<'_>,
        out: &mut BytesMut,
    ) -> ServerAction {
        if matches!(
            tag,
            tags::NOTICE_RESPONSE | tags::PARAMETER_STATUS | tags::NOTIFICATION_RESPONSE
        ) {
            // Asynchronous: they belong to no message.
            return ServerAction::Forward;
        }
        self.drain_due(out);
        if tag == tags::READY_FOR_QUERY && body.first() == Some(&b'I') {
            state.server.on_idle();
        }
        let Some(Entry {
            step: Step::Server { ends, forward, .. },
            ..
        }) = self.queue.front()
        else {
            // Nothing expected (a FATAL error, or a frame of a message we do not track).
            return ServerAction::Forward;
        };
        let (ends, forward) = (*ends, *forward);
        if tag == tags::ERROR_RESPONSE {
            return self.on_error(ends, state);
        }
        if ends.ended_by(tag) {
            self.queue.pop_front();
            if ends.answers_until_ready() {
                self.cycles_done += 1;
            }
        }
        if forward {
            ServerAction::Forward
        } else {
            ServerAction::Drop
        }
    }

    /// The server answered the head message with ErrorResponse.
    fn on_error(&mut self, ends: Ends, state: &mut State<'_>) -> ServerAction {
        if ends.answers_until_ready() {
            // Part of a simple Query's answer (or a commit failing at Sync); it still ends
            // with ReadyForQuery. Roll back what the Query assumed (DEALLOCATE).
            let Some(head) = self.queue.front_mut() else {
                return ServerAction::Forward;
            };
            std::mem::replace(&mut head.undo, Undo::Nothing).apply(state);
            return error_action(&head.step);
        }
        let Some(failed) = self.queue.pop_front() else {
            return ServerAction::Forward;
        };
        let action = error_action(&failed.step);
        // The server now skips every message until Sync: they never happened. Their
        // effects are rolled back last first (an injected Parse may re-add a name that an
        // eviction before it removed).
        let mut undone = vec![failed.undo];
        loop {
            match self.queue.front() {
                Some(e) if e.is_sync() => break,
                Some(e) => {
                    // A skipped simple Query never gets its ReadyForQuery.
                    self.cycles_done += u64::from(e.ends_cycle());
                    undone.extend(self.queue.pop_front().map(|e| e.undo));
                }
                None => {
                    self.skipping = true;
                    break;
                }
            }
        }
        undone.into_iter().rev().for_each(|u| u.apply(state));
        action
    }
}

fn error_action(step: &Step) -> ServerAction {
    match step {
        Step::Server {
            on_error: OnError::Replace(bytes),
            ..
        } => ServerAction::Replace(bytes.clone()),
        Step::Server {
            on_error: OnError::Drop,
            ..
        } => ServerAction::Drop,
        Step::Server {
            on_error: OnError::Abort,
            ..
        } => ServerAction::Abort,
        _ => ServerAction::Forward,
    }
}
