//! Byte-level tests of the rewriter and the answer FIFO, against a model of a PostgreSQL
//! backend's extended protocol (prepared statements, portals, skip-until-Sync). The same
//! client messages run once directly on one model backend and once through pgtenant over
//! several model backends; the client must see the same answers.

use std::collections::HashMap;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::answers::ServerAction;
use super::*;
use crate::protocol::frame::take_cstr;
use crate::protocol::messages::{self, error_field, Severity};

// ---- client frames -------------------------------------------------------------------

fn parse(buf: &mut BytesMut, name: &str, sql: &str) {
    frontend::parse(name, sql, [], buf).unwrap();
}

fn bind(buf: &mut BytesMut, portal: &str, stmt: &str, value: &str) {
    frontend::bind(
        portal,
        stmt,
        [0i16],
        [value],
        |v, b| {
            b.extend_from_slice(v.as_bytes());
            Ok(IsNull::No)
        },
        [1i16],
        buf,
    )
    .map_err(|_| "bind")
    .unwrap();
}

fn describe(buf: &mut BytesMut, kind: u8, name: &str) {
    frontend::describe(kind, name, buf).unwrap();
}

fn execute(buf: &mut BytesMut, portal: &str) {
    frontend::execute(portal, 0, buf).unwrap();
}

fn close(buf: &mut BytesMut, kind: u8, name: &str) {
    frontend::close(kind, name, buf).unwrap();
}

fn query(buf: &mut BytesMut, sql: &str) {
    frontend::query(sql, buf).unwrap();
}

fn sync(buf: &mut BytesMut) {
    frontend::sync(buf);
}

/// Splits a byte stream into (tag, body) frames.
fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        out.push((bytes[0], bytes[5..1 + len].to_vec()));
        bytes = &bytes[1 + len..];
    }
    out
}

fn cstrs(body: &[u8]) -> Vec<String> {
    let mut rest = body;
    let mut out = Vec::new();
    while let Some(s) = take_cstr(&mut rest) {
        out.push(String::from_utf8_lossy(s).into_owned());
    }
    out
}

/// The messages sent to the server, readable: `P name|sql`, `B portal|stmt`, `D S name`...
fn sent(bytes: &[u8]) -> Vec<String> {
    frames(bytes)
        .into_iter()
        .map(|(tag, body)| match tag {
            b'P' => {
                let s = cstrs(&body);
                format!("P {}|{}", s[0], s[1])
            }
            b'B' => {
                let s = cstrs(&body);
                format!("B {}|{}", s[0], s[1])
            }
            b'D' | b'C' => format!(
                "{} {} {}",
                tag as char,
                body[0] as char,
                cstrs(&body[1..])[0]
            ),
            b'Q' => format!("Q {}", cstrs(&body)[0]),
            t => (t as char).to_string(),
        })
        .collect()
}

/// The client-visible answers, readable: tags, errors as `E:<sqlstate>`.
fn seen(bytes: &[u8]) -> Vec<String> {
    frames(bytes)
        .into_iter()
        .map(|(tag, body)| match tag {
            b'E' => format!("E:{}", error_field(&body, b'C').unwrap_or("?")),
            t => (t as char).to_string(),
        })
        .collect()
}

// ---- a model backend -----------------------------------------------------------------

/// What a PostgreSQL backend does with extended-protocol messages, for the parts that
/// matter here. SQL containing `bad` fails to parse; `nodata` describes as NoData.
#[derive(Default)]
struct Backend {
    statements: HashMap<String, String>,
    portals: HashMap<String, String>,
    skipping: bool,
    /// Emulates pgtenant's per-client bound when the model stands for "one connection".
    max_named: Option<usize>,
}

impl Backend {
    fn error(out: &mut BytesMut, code: &str) {
        messages::error_response(out, Severity::Error, code, "model");
    }

    fn run(&mut self, bytes: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        for (tag, body) in frames(bytes) {
            if tag == b'S' {
                self.skipping = false;
                self.portals.clear();
                messages::ready_for_query(&mut out, b'I');
                continue;
            }
            if self.skipping {
                continue;
            }
            if let Err(code) = self.message(tag, &body, &mut out) {
                Self::error(&mut out, code);
                if tag == b'Q' {
                    self.portals.clear();
                    messages::ready_for_query(&mut out, b'I');
                } else {
                    self.skipping = true;
                }
            }
        }
        out
    }

    fn message(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) -> Result<(), &'static str> {
        let s = cstrs(body);
        match tag {
            b'P' => {
                let named = self.statements.keys().filter(|k| !k.is_empty()).count();
                if !s[0].is_empty() && self.statements.contains_key(&s[0]) {
                    return Err("42P05");
                }
                if !s[0].is_empty() && self.max_named.is_some_and(|m| named >= m) {
                    return Err("53400");
                }
                if s[1].contains("bad") {
                    return Err("42601");
                }
                self.statements.insert(s[0].clone(), s[1].clone());
                out.extend_from_slice(b"1\0\0\0\x04");
            }
            b'B' => {
                let sql = self.statements.get(&s[1]).ok_or("26000")?;
                self.portals.insert(s[0].clone(), sql.clone());
                out.extend_from_slice(b"2\0\0\0\x04");
            }
            b'D' => {
                let name = &cstrs(&body[1..])[0];
                let sql = match body[0] {
                    b'S' => {
                        let sql = self.statements.get(name).ok_or("26000")?;
                        out.extend_from_slice(b"t\0\0\0\x06\0\0");
                        sql
                    }
                    _ => self.portals.get(name).ok_or("34000")?,
                };
                let tag = if sql.contains("nodata") { b'n' } else { b'T' };
                out.extend_from_slice(&[tag, 0, 0, 0, 4]);
            }
            b'E' => {
                self.portals.get(&s[0]).ok_or("34000")?;
                out.extend_from_slice(b"D\0\0\0\x06\0\0");
                out.extend_from_slice(b"C\0\0\0\x0dSELECT 1\0");
            }
            b'C' => {
                let name = cstrs(&body[1..])[0].clone();
                if body[0] == b'S' {
                    self.statements.remove(&name);
                } else {
                    self.portals.remove(&name);
                }
                out.extend_from_slice(b"3\0\0\0\x04");
            }
            b'Q' => {
                match deallocate::parse(s[0].as_bytes()) {
                    Some(deallocate::Target::All) => self.statements.clear(),
                    Some(deallocate::Target::Name(n)) => {
                        let n = String::from_utf8(n).unwrap();
                        self.statements.remove(&n).ok_or("26000")?;
                    }
                    None if s[0].contains("bad") => return Err("42601"),
                    None => {}
                }
                out.extend_from_slice(b"C\0\0\0\x06X\0");
                self.portals.clear();
                messages::ready_for_query(out, b'I');
            }
            _ => {}
        }
        Ok(())
    }
}

// ---- pgtenant in between -------------------------------------------------------------

struct Conn {
    statements: ServerStatements,
    backend: Backend,
}

fn conn(max: usize) -> Conn {
    Conn {
        statements: ServerStatements::new(max),
        backend: Backend::default(),
    }
}

/// Rewrites `client_bytes`, runs them on `conn`'s backend, relays the answers back.
/// Returns (what the server got, what the client saw).
/// When the rewriter holds frames back, they are offered again after the answers.
fn round_trip(
    ps: &mut PreparedStatements,
    conn: &mut Conn,
    client_bytes: &[u8],
) -> (BytesMut, BytesMut) {
    let mut all_sent = BytesMut::new();
    let mut to_client = BytesMut::new();
    let mut rest = client_bytes;
    for _ in 0..100 {
        let mut to_server = BytesMut::new();
        let n = ps
            .rewrite(rest, &mut conn.statements, &mut to_server)
            .unwrap();
        ps.drain_due(&mut to_client);
        let answers = conn.backend.run(&to_server);
        relay_answers(ps, &mut conn.statements, &answers, &mut to_client);
        all_sent.extend_from_slice(&to_server);
        rest = &rest[n..];
        if rest.is_empty() {
            return (all_sent, to_client);
        }
    }
    panic!("the rewriter never took the rest: {:?}", sent(rest));
}

fn relay_answers(
    ps: &mut PreparedStatements,
    server: &mut ServerStatements,
    answers: &[u8],
    to_client: &mut BytesMut,
) {
    let mut rest = answers;
    while !rest.is_empty() {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let (frame, tail) = rest.split_at(1 + len);
        match ps.on_server_message(frame[0], &frame[5..], server, to_client) {
            ServerAction::Forward => to_client.extend_from_slice(frame),
            ServerAction::Drop => {}
            ServerAction::Replace(b) => to_client.extend_from_slice(&b),
            ServerAction::Abort => to_client.extend_from_slice(b"<abort>"),
        }
        rest = tail;
    }
    ps.drain_due(to_client);
}

fn cfg(per_client: usize, per_server: usize) -> PreparedConfig {
    PreparedConfig {
        max_prepared_statements: per_client,
        max_server_prepared_statements: per_server,
    }
}

fn batch(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut b = BytesMut::new();
    build(&mut b);
    b
}

fn name_of(sql: &str) -> String {
    let def = StatementDef::new(sql.as_bytes(), &[0, 0]);
    ServerName {
        hash: def.hash,
        probe: 0,
    }
    .to_string()
}

mod model;
mod scenarios;
