//! Statement tracking for the audit trail: which statement each server result belongs to.
//!
//! Pure bookkeeping beside `Cycle`: the client's Query/Parse/Bind/Execute/Close frames tell
//! which SQL text will run (prepared statements and portals are followed by name), and the
//! server's CommandComplete/ErrorResponse/ReadyForQuery frames close them in order. Only
//! frames that reach the server are fed in, so a statement pgtenant refused itself never
//! waits for a server result. Nothing here decodes rows.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::frame::take_cstr;
use crate::protocol::tags;

/// Prepared statements or portals remembered per session, at most; past this the oldest
/// names are forgotten (their executions are audited with an empty text).
const MAX_NAMES: usize = 4096;

/// A statement whose result the server reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedStatement {
    pub sql: Arc<str>,
    /// Position within a multi-statement simple Query (0-based); 0 for extended protocol.
    pub index: u32,
    /// CommandComplete tag when it succeeded.
    pub command_tag: Option<String>,
    /// SQLSTATE when it failed.
    pub sqlstate: Option<String>,
    pub duration: Duration,
}

#[derive(Debug)]
enum Pending {
    /// A simple Query: one result per statement it holds, until ReadyForQuery.
    Simple {
        sql: Arc<str>,
        next_index: u32,
        started: Instant,
    },
    /// One Execute: its portal's statement.
    Execute { sql: Arc<str>, started: Instant },
    /// A ReadyForQuery from the server is due here (after a Query, Sync or FunctionCall).
    Boundary,
}

#[derive(Debug, Default)]
pub struct StatementTracker {
    prepared: Names,
    portals: Names,
    pending: VecDeque<Pending>,
    /// After an error, the server skips everything until the next ReadyForQuery.
    skipping: bool,
    /// Statements completed since the caller last drained them.
    pub completed: Vec<CompletedStatement>,
}

/// name → SQL text, bounded.
#[derive(Debug, Default)]
struct Names {
    map: HashMap<Box<[u8]>, Arc<str>>,
    order: VecDeque<Box<[u8]>>,
}

impl Names {
    fn insert(&mut self, name: &[u8], sql: Arc<str>) {
        if self.map.insert(name.into(), sql).is_none() && !name.is_empty() {
            self.order.push_back(name.into());
            while self.order.len() > MAX_NAMES {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
    fn get(&self, name: &[u8]) -> Option<Arc<str>> {
        self.map.get(name).cloned()
    }
    fn remove(&mut self, name: &[u8]) {
        if self.map.remove(name).is_some() {
            self.order.retain(|n| &**n != name);
        }
    }
}

fn empty() -> Arc<str> {
    Arc::from("")
}

impl StatementTracker {
    /// A client frame that is being forwarded to the server, seen whole.
    pub fn on_client_frame(&mut self, tag: u8, mut body: &[u8], now: Instant) {
        match tag {
            tags::QUERY => {
                let sql = take_cstr(&mut body).map(text).unwrap_or_else(empty);
                self.pending.push_back(Pending::Simple {
                    sql,
                    next_index: 0,
                    started: now,
                });
            }
            tags::PARSE => {
                if let (Some(name), Some(sql)) = (take_cstr(&mut body), take_cstr(&mut body)) {
                    self.prepared.insert(name, text(sql));
                }
            }
            tags::BIND => {
                if let (Some(portal), Some(stmt)) = (take_cstr(&mut body), take_cstr(&mut body)) {
                    let sql = self.prepared.get(stmt).unwrap_or_else(empty);
                    self.portals.insert(portal, sql);
                }
            }
            tags::EXECUTE => {
                let sql = take_cstr(&mut body)
                    .and_then(|portal| self.portals.get(portal))
                    .unwrap_or_else(empty);
                self.pending
                    .push_back(Pending::Execute { sql, started: now });
            }
            tags::CLOSE => {
                if let Some((&kind, mut rest)) = body.split_first() {
                    if let Some(name) = take_cstr(&mut rest) {
                        match kind {
                            b'S' => self.prepared.remove(name),
                            b'P' => self.portals.remove(name),
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A Query, Sync or FunctionCall was forwarded: the server answers it with ReadyForQuery.
    pub fn expect_ready(&mut self) {
        self.pending.push_back(Pending::Boundary);
    }

    /// A server frame, seen whole: CommandComplete, ErrorResponse, EmptyQueryResponse,
    /// PortalSuspended or ReadyForQuery.
    pub fn on_server_frame(&mut self, tag: u8, body: &[u8], now: Instant) {
        match tag {
            tags::COMMAND_COMPLETE if !self.skipping => {
                let command_tag =
                    take_cstr(&mut &body[..]).map(|t| String::from_utf8_lossy(t).into_owned());
                self.complete(command_tag, None, now);
            }
            tags::ERROR_RESPONSE if !self.skipping => {
                let sqlstate = error_code(body);
                self.complete(None, Some(sqlstate.unwrap_or_else(|| "XX000".into())), now);
                // Whatever else this request held is skipped by the server.
                self.skipping = true;
            }
            tags::EMPTY_QUERY_RESPONSE | tags::PORTAL_SUSPENDED if !self.skipping => {
                if matches!(self.pending.front(), Some(Pending::Execute { .. })) {
                    self.pending.pop_front();
                }
            }
            tags::READY_FOR_QUERY => {
                self.skipping = false;
                while let Some(p) = self.pending.pop_front() {
                    if matches!(p, Pending::Boundary) {
                        break;
                    }
                }
            }
            _ => {}
        }
    }

    fn complete(&mut self, command_tag: Option<String>, sqlstate: Option<String>, now: Instant) {
        let (sql, index, started) = match self.pending.front_mut() {
            Some(Pending::Simple {
                sql,
                next_index,
                started,
            }) => {
                let index = *next_index;
                *next_index += 1;
                let out = (sql.clone(), index, *started);
                // The next statement of the same Query starts when this one ended.
                *started = now;
                out
            }
            Some(Pending::Execute { .. }) => match self.pending.pop_front() {
                Some(Pending::Execute { sql, started }) => (sql, 0, started),
                _ => return,
            },
            // A result outside any statement (e.g. an error for a Parse without Execute).
            Some(Pending::Boundary) | None => return,
        };
        self.completed.push(CompletedStatement {
            sql,
            index,
            command_tag,
            sqlstate,
            duration: now.saturating_duration_since(started),
        });
    }
}

fn text(bytes: &[u8]) -> Arc<str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Arc::from(s),
        Err(_) => Arc::from(String::from_utf8_lossy(bytes).as_ref()),
    }
}

/// The SQLSTATE ('C' field) of an ErrorResponse body.
fn error_code(mut body: &[u8]) -> Option<String> {
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            return None;
        }
        body = rest;
        let value = take_cstr(&mut body)?;
        if field == b'C' {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
    }
    None
}

/// Rows from a CommandComplete tag (`SELECT 5`, `INSERT 0 5`, `UPDATE 3`, `COPY 10`).
pub fn rows_of(command_tag: &str) -> Option<u64> {
    let mut words = command_tag.split(' ');
    let verb = words.next()?;
    if !matches!(
        verb,
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY"
    ) {
        return None;
    }
    command_tag.rsplit(' ').next()?.parse().ok()
}

#[cfg(test)]
mod tests;
