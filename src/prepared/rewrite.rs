//! Client frames → server frames: statement names renamed, missing statements re-prepared,
//! known ones not prepared twice, named Close answered locally, refusals made in-band.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::protocol::frame::take_cstr;
use crate::protocol::messages::{self, Severity};
use crate::protocol::tags;

use super::answers::{Answers, Ends, Entry, Local, OnError, State, Undo};
use super::client::{ClientStatements, StatementDef};
use super::deallocate::{self, Target};
use super::server::{ServerName, ServerStatements};
use super::{Counters, PreparedError, StatementRefusal};

/// A statement name pgtenant never prepares: describing it always fails (26000), which makes
/// the server abort the transaction and skip to Sync for a refusal, exactly as PostgreSQL
/// would for the refused message. Its ErrorResponse is replaced by pgtenant's.
const NEVER_PREPARED: &str = "pgt_none";

const DESCRIBE_STATEMENT: u8 = b'S';

/// Whether a frame was rewritten, or has to wait until earlier cycles are answered.
pub(super) enum Flow {
    Done,
    Wait,
}

pub(super) struct Rewriter<'a> {
    pub client: &'a mut ClientStatements,
    pub answers: &'a mut Answers,
    pub counters: &'a mut Counters,
    pub server: &'a mut ServerStatements,
    pub out: &'a mut BytesMut,
}

impl Rewriter<'_> {
    /// Returns how many bytes of `frames` were rewritten (see `PreparedStatements::rewrite`).
    pub fn run(mut self, frames: &[u8]) -> Result<usize, PreparedError> {
        self.answers.settle_if_idle();
        let mut at = 0;
        while let Some(&tag) = frames.get(at) {
            let len = frames
                .get(at + 1..at + 5)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .filter(|len| *len >= 4 && at + *len < frames.len())
                .ok_or(PreparedError::Malformed(tag))?;
            let frame = &frames[at..at + 1 + len];
            match self.frame(tag, frame) {
                None => return Err(PreparedError::Malformed(tag)),
                Some(Flow::Wait) => break,
                Some(Flow::Done) => at += frame.len(),
            }
        }
        Ok(at)
    }

    /// Whether one more statement may or may not fit, depending on changes in flight.
    fn bound_uncertain(&self) -> bool {
        let (len, max) = (self.client.len(), self.client.max());
        let pending = self.answers.pending_client_changes();
        pending > 0 && len.saturating_sub(pending) < max && len + pending >= max
    }

    /// Whether a message using these names must wait for earlier cycles' answers.
    fn blocked(&self, client: &[u8], server: Option<ServerName>) -> bool {
        self.answers.blocked(Some(client), server)
    }

    /// One frame; `None` when its body is malformed.
    fn frame(&mut self, tag: u8, frame: &[u8]) -> Option<Flow> {
        let body = &frame[5..];
        match tag {
            tags::PARSE => self.parse(frame, body),
            tags::BIND => self.bind(frame, body),
            tags::DESCRIBE => self.describe(frame, body),
            tags::CLOSE => self.close(frame, body),
            tags::QUERY => self.query(frame, body),
            tags::EXECUTE => self.relay(frame, Ends::Execute),
            tags::SYNC => self.relay(frame, Ends::Sync),
            tags::FUNCTION_CALL => self.relay(frame, Ends::Query),
            // Flush, copy data: no answer of their own.
            _ => {
                self.out.extend_from_slice(frame);
                Some(Flow::Done)
            }
        }
    }

    fn push(&mut self, entry: Entry) {
        self.answers.push(
            entry,
            &mut State {
                client: self.client,
                server: self.server,
            },
        );
    }

    fn relay(&mut self, frame: &[u8], ends: Ends) -> Option<Flow> {
        self.out.extend_from_slice(frame);
        self.push(Entry::relayed(ends));
        Some(Flow::Done)
    }

    fn parse(&mut self, frame: &[u8], body: &[u8]) -> Option<Flow> {
        let mut rest = body;
        let name = take_cstr(&mut rest)?;
        let query = take_cstr(&mut rest)?;
        if name.is_empty() {
            // The unnamed statement lives on this connection only, until the next one.
            return self.relay(frame, Ends::ParseComplete);
        }
        let def = StatementDef::new(query, rest);
        let (server_name, present) = self.server.resolve(&def);
        if self.blocked(name, Some(server_name)) {
            return Some(Flow::Wait);
        }
        if self.client.get(name).is_some() {
            return self.refuse(StatementRefusal::Duplicate(lossy(name)));
        }
        if self.bound_uncertain() {
            return Some(Flow::Wait);
        }
        if self.client.is_full() {
            return self.refuse(StatementRefusal::TooMany(self.client.max()));
        }
        self.client.insert(name, def.clone());
        self.answers.note_client(name);
        let forget_client = Undo::ForgetClient(name.into(), def.clone());
        if present {
            self.server.touch(server_name);
            self.counters.hits += 1;
            self.push(Entry::local(Local::ParseComplete, forget_client));
            return Some(Flow::Done);
        }
        self.make_room();
        put_parse(self.out, server_name, &def);
        self.server.insert(server_name, def);
        self.answers.note_server(server_name);
        self.push(Entry {
            undo: Undo::All(vec![forget_client, Undo::ForgetServer(server_name)]),
            ..Entry::relayed(Ends::ParseComplete)
        });
        Some(Flow::Done)
    }

    fn bind(&mut self, frame: &[u8], body: &[u8]) -> Option<Flow> {
        let mut rest = body;
        let portal = take_cstr(&mut rest)?;
        let statement = take_cstr(&mut rest)?;
        if statement.is_empty() {
            return self.relay(frame, Ends::BindComplete);
        }
        let Some(def) = self.client.get(statement).cloned() else {
            if self.blocked(statement, None) {
                return Some(Flow::Wait);
            }
            return self.refuse(StatementRefusal::Missing(lossy(statement)));
        };
        if self.blocked(statement, Some(self.server.resolve(&def).0)) {
            return Some(Flow::Wait);
        }
        let server_name = self.ensure(&def);
        self.server.protect(server_name);
        // Parameter formats and values are copied as they are, never decoded.
        put_frame(self.out, tags::BIND, |b| {
            put_cstr(b, portal);
            put_name(b, server_name);
            b.extend_from_slice(rest);
        });
        self.push(Entry::relayed(Ends::BindComplete));
        Some(Flow::Done)
    }

    fn describe(&mut self, frame: &[u8], body: &[u8]) -> Option<Flow> {
        let (&kind, mut rest) = body.split_first()?;
        let name = take_cstr(&mut rest)?;
        if kind != DESCRIBE_STATEMENT || name.is_empty() {
            return self.relay(frame, Ends::Describe);
        }
        let Some(def) = self.client.get(name).cloned() else {
            if self.blocked(name, None) {
                return Some(Flow::Wait);
            }
            return self.refuse(StatementRefusal::Missing(lossy(name)));
        };
        if self.blocked(name, Some(self.server.resolve(&def).0)) {
            return Some(Flow::Wait);
        }
        let server_name = self.ensure(&def);
        put_describe_statement(self.out, |b| put_name(b, server_name));
        self.push(Entry::relayed(Ends::Describe));
        Some(Flow::Done)
    }

    fn close(&mut self, frame: &[u8], body: &[u8]) -> Option<Flow> {
        let (&kind, mut rest) = body.split_first()?;
        let name = take_cstr(&mut rest)?;
        if kind != DESCRIBE_STATEMENT || name.is_empty() {
            // Portals and the unnamed statement belong to this connection.
            return self.relay(frame, Ends::CloseComplete);
        }
        if self.blocked(name, None) {
            return Some(Flow::Wait);
        }
        // The server copy stays cached for other clients; closing an unknown name is no
        // error in PostgreSQL either.
        let undo = match self.client.remove(name) {
            Some(def) => {
                self.answers.note_client(name);
                Undo::RestoreClient(name.into(), def)
            }
            None => Undo::Nothing,
        };
        self.push(Entry::local(Local::CloseComplete, undo));
        Some(Flow::Done)
    }

    fn query(&mut self, frame: &[u8], body: &[u8]) -> Option<Flow> {
        let sql = take_cstr(&mut &body[..])?;
        match deallocate::parse(sql) {
            None => self.relay(frame, Ends::Query),
            Some(Target::All) => {
                if self.answers.any_blocked() {
                    return Some(Flow::Wait);
                }
                self.answers.note_all();
                // The server drops its statements too (DEALLOCATE ALL / DISCARD ALL).
                let mut undo: Vec<Undo> = (self.client.take_all().into_iter())
                    .map(|(n, d)| Undo::RestoreClient(n, d))
                    .collect();
                undo.extend(
                    (self.server.take_all().into_iter()).map(|(n, d)| Undo::RestoreServer(n, d)),
                );
                self.out.extend_from_slice(frame);
                self.push(Entry {
                    undo: Undo::All(undo),
                    ..Entry::relayed(Ends::Query)
                });
                Some(Flow::Done)
            }
            Some(Target::Name(name)) => match self.client.get(&name).cloned() {
                _ if self.blocked(&name, None) => Some(Flow::Wait),
                // Unknown to pgtenant: the server answers (26000, or an SQL-level PREPARE).
                None => self.relay(frame, Ends::Query),
                Some(def) if self.blocked(&name, Some(self.server.resolve(&def).0)) => {
                    Some(Flow::Wait)
                }
                Some(def) => {
                    self.deallocate_one(name, def);
                    Some(Flow::Done)
                }
            },
        }
    }

    /// `DEALLOCATE name` of a statement pgtenant renamed: runs `DEALLOCATE <server name>` so
    /// the client gets the server's own answer (and its error in a failed transaction).
    fn deallocate_one(&mut self, name: Vec<u8>, def: Arc<StatementDef>) {
        self.client.remove(&name);
        let name_for_note = name.clone();
        let mut undo = vec![Undo::RestoreClient(name.into(), def.clone())];
        let (server_name, present) = self.server.resolve(&def);
        if present {
            self.server.remove(server_name);
            undo.push(Undo::RestoreServer(server_name, def));
        } else {
            // Prepare it first, in a cycle of its own: if that fails (failed transaction),
            // the server must not skip the DEALLOCATE, which then reports the error itself.
            put_parse(self.out, server_name, &def);
            self.push(Entry::hidden(
                Ends::ParseComplete,
                OnError::Drop,
                Undo::Nothing,
            ));
            put_frame(self.out, tags::SYNC, |_| {});
            self.push(Entry::hidden(Ends::Sync, OnError::Drop, Undo::Nothing));
        }
        self.answers.note_client(&name_for_note);
        self.answers.note_server(server_name);
        put_frame(self.out, tags::QUERY, |b| {
            let _ = write!(b, "DEALLOCATE {server_name}");
            b.put_u8(0);
        });
        self.push(Entry {
            undo: Undo::All(undo),
            ..Entry::relayed(Ends::Query)
        });
    }

    /// The server name of `def` on this connection, injecting a Parse when it lacks it.
    fn ensure(&mut self, def: &Arc<StatementDef>) -> ServerName {
        let (server_name, present) = self.server.resolve(def);
        if present {
            self.server.touch(server_name);
            return server_name;
        }
        self.make_room();
        put_parse(self.out, server_name, def);
        self.server.insert(server_name, def.clone());
        self.answers.note_server(server_name);
        self.counters.reparsed += 1;
        // Its error (e.g. a table dropped since) is the client's message's error.
        self.push(Entry::hidden(
            Ends::ParseComplete,
            OnError::Forward,
            Undo::ForgetServer(server_name),
        ));
        server_name
    }

    /// Closes the least recently used statement when the connection is at its bound.
    fn make_room(&mut self) {
        // Not one whose Parse an earlier cycle still in flight sent: if the server skips
        // that Parse, the eviction's rollback would restore a statement it never had.
        let answers = &*self.answers;
        let keep = |name| answers.blocked(None, Some(name));
        if let Some((victim, def)) = self.server.evict_for_insert(keep) {
            put_frame(self.out, tags::CLOSE, |b| {
                b.put_u8(DESCRIBE_STATEMENT);
                put_name(b, victim);
            });
            self.counters.evicted += 1;
            self.answers.note_server(victim);
            self.push(Entry::hidden(
                Ends::CloseComplete,
                OnError::Forward,
                Undo::RestoreServer(victim, def),
            ));
        }
    }

    /// Answers a client message with pgtenant's error, in band (see `NEVER_PREPARED`).
    fn refuse(&mut self, refusal: StatementRefusal) -> Option<Flow> {
        let mut error = BytesMut::with_capacity(96);
        let code = crate::error::statement_refusal_sqlstate(&refusal);
        messages::error_response(
            &mut error,
            Severity::Error,
            code.code(),
            &refusal.to_string(),
        );
        put_describe_statement(self.out, |b| put_cstr(b, NEVER_PREPARED.as_bytes()));
        self.push(Entry::hidden(
            Ends::Describe,
            OnError::Replace(error.freeze()),
            Undo::Nothing,
        ));
        Some(Flow::Done)
    }
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Appends a frame: tag, length placeholder, body written by `body`, then patches the length.
fn put_frame(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.extend_from_slice(s);
    out.put_u8(0);
}

fn put_name(out: &mut BytesMut, name: ServerName) {
    // Writing into a BytesMut cannot fail.
    let _ = write!(out, "{name}");
    out.put_u8(0);
}

fn put_parse(out: &mut BytesMut, name: ServerName, def: &StatementDef) {
    put_frame(out, tags::PARSE, |b| {
        put_name(b, name);
        put_cstr(b, &def.query);
        b.extend_from_slice(&def.param_types);
    });
}

fn put_describe_statement(out: &mut BytesMut, name: impl FnOnce(&mut BytesMut)) {
    put_frame(out, tags::DESCRIBE, |b| {
        b.put_u8(DESCRIBE_STATEMENT);
        name(b);
    });
}
