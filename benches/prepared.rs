//! Criterion benchmark of the prepared-statement layer on pgbench `-M prepared`'s steady
//! state: the client's Bind/Describe/Execute/Sync rewritten for a connection that has the
//! statement, and the server's answer walked through the answer FIFO.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgtenant::prepared::{PreparedConfig, PreparedStatements, ServerAction, ServerStatements};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        out.push((bytes[0], bytes[5..1 + len].to_vec()));
        bytes = &bytes[1 + len..];
    }
    out
}

fn steady_state(c: &mut Criterion) {
    let mut ps = PreparedStatements::new(&PreparedConfig::default());
    let mut server = ServerStatements::new(250);
    let mut out = BytesMut::new();
    let mut prepare = BytesMut::new();
    frontend::parse("P_0", SELECT, [], &mut prepare).unwrap();
    frontend::sync(&mut prepare);
    ps.rewrite(&prepare, &mut server, &mut out).unwrap();
    let mut sink = BytesMut::new();
    for (tag, body) in [(b'1', vec![]), (b'Z', vec![b'I'])] {
        ps.on_server_message(tag, &body, &mut server, &mut sink);
    }
    let mut exec = BytesMut::new();
    frontend::bind(
        "",
        "P_0",
        [0i16],
        ["12345"],
        |v, b| {
            b.extend_from_slice(v.as_bytes());
            Ok(IsNull::No)
        },
        [0i16],
        &mut exec,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::describe(b'P', "", &mut exec).unwrap();
    frontend::execute("", 0, &mut exec).unwrap();
    frontend::sync(&mut exec);
    let answer =
        frames(b"2\0\0\0\x04T\0\0\0\x06\0\0D\0\0\0\x06\0\0C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I");
    c.bench_function("prepared_bind_execute_sync_round_trip", |b| {
        b.iter(|| {
            out.clear();
            sink.clear();
            ps.rewrite(black_box(&exec), &mut server, &mut out).unwrap();
            ps.drain_due(&mut sink);
            for (tag, body) in &answer {
                let action = ps.on_server_message(*tag, body, &mut server, &mut sink);
                debug_assert_eq!(action, ServerAction::Forward);
            }
            black_box(out.len())
        })
    });
}

criterion_group!(benches, steady_state);
criterion_main!(benches);
