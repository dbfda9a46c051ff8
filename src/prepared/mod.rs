//! Named prepared statements across server connections (transaction pooling).
//!
//! A client's named statements (`Parse` with a name) live in pgtenant, not on one server
//! connection: `ClientStatements` maps the client's names to their definition (SQL text and
//! parameter types, raw bytes), and each server connection's `ServerStatements` records which
//! definitions are prepared there under a deterministic server name (`pgt_` + 64-bit hash of
//! text and types, in hex; `_<n>` appended on a hash collision). Clients of one tenant that
//! prepare the same statement share one server-side statement per connection.
//!
//! Pure (no I/O, no metrics): the relay feeds client frames and server frame tags in, gets
//! bytes and decisions out, and emits the counters of [`Counters`].
//!
//! # How the relay uses it (the exact sequence)
//! 1. After the `Cycle` decided which client frames to forward, pass those frames, whole
//!    (see [`wants_whole_client`]), to [`PreparedStatements::rewrite`] with the attached
//!    connection's `ServerStatements`; send `out` to the server instead of the client's
//!    bytes. Frames of other tags (CopyData, CopyDone, CopyFail) need no rewriting and may
//!    stream past, in order. `rewrite` may take fewer bytes than offered (a frame depends on
//!    a statement change still in flight): keep the rest, read no further client frames
//!    past it, and offer it again after the next ReadyForQuery is relayed. The connection
//!    stays attached meanwhile (answers are owed, so the relay is not idle).
//! 2. Call [`PreparedStatements::drain_due`] into the client output right after (a Parse or
//!    Close answered locally may be due at once, e.g. `Parse` + `Flush`).
//! 3. For every server frame, in order: [`PreparedStatements::on_server_message`] with its
//!    tag (and body when whole; the relay must see ParseComplete, CloseComplete,
//!    ErrorResponse and ReadyForQuery whole, see [`wants_whole_server`]). It first appends
//!    any locally synthesized answers that come before this frame to the client output, then
//!    says what to do with the frame: forward it, drop it, send a replacement, or abort
//!    the session (a `hidden_cycle` of the relay's own failed).
//! 4. After the last frame of a server read, [`PreparedStatements::drain_due`] again.
//! 5. When the pool resets a connection (`DISCARD ALL`), call `ServerStatements::clear`.
//!    A connection may return to the pool only when [`PreparedStatements::idle`] holds (the
//!    `Cycle` idle rule already implies it). `ServerStatements` lives with the connection
//!    (beside `ServerConn`), `PreparedStatements` with the client session.
//! 6. Emit [`Counters`] (from `take_counters`) as `pgtenant_prepared_statements_*`.
//!
//! `Cycle` keeps its own FIFO of ReadyForQuery expectations; it stays right if the relay
//! feeds it only the frames this layer forwards: every ReadyForQuery pgtenant adds (the
//! hidden Sync of a `DEALLOCATE`, a `hidden_cycle`) comes back as `Drop`, and pgtenant's
//! in-band refusals still end with the server's own ReadyForQuery. The audit
//! `StatementTracker` keeps seeing the client's own frames and names.
//!
//! A client's definition has no fixed server name: the name is resolved per connection
//! (`ServerStatements::resolve`), because a hash collision probes past names another
//! statement holds on that connection.
//!
//! Every message sent to the server pushes one entry (in order) onto an answer FIFO that
//! knows how the server answers it; a message answered locally pushes a local entry, emitted
//! as soon as it is first in line. When the server answers an extended-protocol message
//! with ErrorResponse it skips everything up to Sync: the entries in between are dropped and
//! their optimistic effects (client names added or closed, server names recorded or
//! evicted) are rolled back, so the client stream is what one PostgreSQL connection sends.
//!
//! Refusals (duplicate name 42P05, unknown name 26000, too many statements 53400) must abort
//! the transaction like PostgreSQL does, so they are answered in-band: pgtenant sends a
//! `Describe` of a name that never exists (`pgt_none`) in the refused message's place and
//! replaces the server's ErrorResponse with its own; the server then skips to Sync itself.

mod answers;
mod client;
mod deallocate;
mod rewrite;
mod server;

#[cfg(test)]
mod tests;

pub use answers::ServerAction;
pub use client::{ClientStatements, StatementDef};
pub use server::{ServerName, ServerStatements};

use bytes::BytesMut;
use serde::Deserialize;

use crate::protocol::frame::take_cstr;
use crate::protocol::tags;

use answers::Answers;

/// `[prepared_statements]`: bounds of the statement caches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreparedConfig {
    /// Named statements one client may hold at most; one more `Parse` fails with 53400.
    /// Default 1000.
    #[serde(default = "PreparedConfig::default_per_client")]
    pub max_prepared_statements: usize,
    /// Statements kept prepared per server connection; past it the least recently used one
    /// is closed (and re-prepared when needed). Default 250.
    #[serde(default = "PreparedConfig::default_per_server")]
    pub max_server_prepared_statements: usize,
}

impl Default for PreparedConfig {
    fn default() -> Self {
        Self {
            max_prepared_statements: Self::default_per_client(),
            max_server_prepared_statements: Self::default_per_server(),
        }
    }
}

impl PreparedConfig {
    fn default_per_client() -> usize {
        1000
    }
    fn default_per_server() -> usize {
        250
    }
}

/// A client message pgtenant refuses as PostgreSQL would (SQLSTATE chosen in `error.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatementRefusal {
    #[error("prepared statement \"{0}\" already exists")]
    Duplicate(String),
    #[error("prepared statement \"{0}\" does not exist")]
    Missing(String),
    #[error("too many prepared statements: this session may hold at most {0} (close some first)")]
    TooMany(usize),
}

/// The client sent a frame that cannot be parsed; the session ends with 08P01.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreparedError {
    #[error("malformed {} message", *.0 as char)]
    Malformed(u8),
}

/// Events since the caller last took them (for `pgtenant_prepared_statements_*`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Parses pgtenant injected because the connection lacked a client's statement.
    pub reparsed: u64,
    /// Statements closed on a server connection to stay within its bound.
    pub evicted: u64,
    /// Client Parses answered locally: the connection already had the statement.
    pub hits: u64,
}

/// One client's prepared statements and the answers it is owed.
#[derive(Debug)]
pub struct PreparedStatements {
    client: ClientStatements,
    answers: Answers,
    counters: Counters,
}

impl PreparedStatements {
    pub fn new(cfg: &PreparedConfig) -> Self {
        PreparedStatements {
            client: ClientStatements::new(cfg.max_prepared_statements),
            answers: Answers::default(),
            counters: Counters::default(),
        }
    }

    /// The client's statements (for inspection and tests).
    pub fn client(&self) -> &ClientStatements {
        &self.client
    }

    /// Nothing is owed to the client: every answer was relayed or synthesized.
    pub fn idle(&self) -> bool {
        self.answers.is_empty()
    }

    /// Takes the counters accumulated since the last call.
    pub fn take_counters(&mut self) -> Counters {
        std::mem::take(&mut self.counters)
    }

    /// Rewrites a run of complete client frames for the connection `server` into `out`.
    /// Frames that need no change are copied as they are. Returns how many bytes of
    /// `frames` it took: fewer than all when a frame depends on a statement changed in an
    /// earlier request cycle whose answer has not arrived (the server may still skip that
    /// change after an error). The relay keeps the rest and offers it again after the next
    /// ReadyForQuery it relays; the steady state (Bind/Execute/Sync of known statements)
    /// never waits. Errors: a malformed frame (08P01 for the client).
    pub fn rewrite(
        &mut self,
        frames: &[u8],
        server: &mut ServerStatements,
        out: &mut BytesMut,
    ) -> Result<usize, PreparedError> {
        rewrite::Rewriter {
            client: &mut self.client,
            answers: &mut self.answers,
            counters: &mut self.counters,
            server,
            out,
        }
        .run(frames)
    }

    /// The relay wrote a request cycle of its own into the server stream right here (e.g.
    /// the tenant context as a simple Query, pipelined before the client's first message):
    /// its answers, up to and including its ReadyForQuery, are dropped; an ErrorResponse
    /// yields `ServerAction::Abort`. Call it in stream order, between `rewrite` calls.
    pub fn hidden_cycle(&mut self, server: &mut ServerStatements) {
        let entry = answers::Entry::hidden(
            answers::Ends::Query,
            answers::OnError::Abort,
            answers::Undo::Nothing,
        );
        self.answers.push(
            entry,
            &mut answers::State {
                client: &mut self.client,
                server,
            },
        );
    }

    /// A server frame (`body` is its body when the relay holds it whole, else empty).
    /// Appends the local answers due before it to `client_out`, then says what to do with it.
    pub fn on_server_message(
        &mut self,
        tag: u8,
        body: &[u8],
        server: &mut ServerStatements,
        client_out: &mut BytesMut,
    ) -> ServerAction {
        self.answers.on_server_message(
            tag,
            body,
            &mut answers::State {
                client: &mut self.client,
                server,
            },
            client_out,
        )
    }

    /// Appends the locally synthesized answers that are first in line to `client_out`.
    pub fn drain_due(&mut self, client_out: &mut BytesMut) {
        self.answers.drain_due(client_out);
    }
}

/// Whether a client frame needs this layer: it names a statement (a Parse, Bind, Describe
/// or Close of a named statement), or is a `DEALLOCATE` / `DISCARD ALL` the layer
/// recognizes. Until a client sends one, transaction mode relays its frames as they are
/// (the layer is engaged lazily, see `session::relay::engage`). A malformed body engages
/// (the layer reports it).
pub fn engages(tag: u8, body: &[u8]) -> bool {
    let mut rest = body;
    let named = |name: Option<&[u8]>| name.is_none_or(|n| !n.is_empty());
    match tag {
        tags::PARSE => named(take_cstr(&mut rest)),
        tags::BIND => named(take_cstr(&mut rest).and_then(|_| take_cstr(&mut rest))),
        tags::DESCRIBE | tags::CLOSE => match rest.split_first() {
            Some((b'P', _)) => false,
            Some((b'S', name)) => name.first().is_none_or(|b| *b != 0),
            _ => true,
        },
        tags::QUERY => take_cstr(&mut rest).is_none_or(|sql| deallocate::parse(sql).is_some()),
        _ => false,
    }
}

/// Client frames `rewrite` must see whole (the others need no rewriting).
pub fn wants_whole_client(tag: u8) -> bool {
    matches!(
        tag,
        tags::PARSE
            | tags::BIND
            | tags::DESCRIBE
            | tags::CLOSE
            | tags::EXECUTE
            | tags::SYNC
            | tags::FLUSH
            | tags::QUERY
            | tags::FUNCTION_CALL
    )
}

/// Server frames the relay must hand over whole (it may drop or replace them).
pub fn wants_whole_server(tag: u8) -> bool {
    matches!(
        tag,
        tags::PARSE_COMPLETE | tags::CLOSE_COMPLETE | tags::ERROR_RESPONSE | tags::READY_FOR_QUERY
    )
}
