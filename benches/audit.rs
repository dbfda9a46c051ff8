//! Criterion benchmarks of the audit trail's per-statement costs: the relay's statement
//! tracking (on the session's task) and the writer thread's summary (fingerprint, tables).

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgtenant::audit::summary::Summarizer;
use pgtenant::protocol::tags;
use pgtenant::session::relay::StatementTracker;

fn cstrs(parts: &[&str]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain(std::iter::once(0)))
        .collect()
}

fn tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit_tracker");
    let query = cstrs(&["SELECT abalance FROM pgbench_accounts WHERE aid = 48211;"]);
    let complete = cstrs(&["SELECT 1"]);
    g.bench_function("simple_query_to_completion", |b| {
        let mut t = StatementTracker::default();
        b.iter(|| {
            let now = Instant::now();
            t.on_client_frame(tags::QUERY, black_box(&query), now);
            t.expect_ready();
            t.on_server_frame(tags::COMMAND_COMPLETE, black_box(&complete), now);
            t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
            black_box(t.completed.pop())
        })
    });
    let bind = cstrs(&["", "P0_1"]);
    let execute = cstrs(&[""]);
    g.bench_function("prepared_execute_to_completion", |b| {
        let mut t = StatementTracker::default();
        let now = Instant::now();
        t.on_client_frame(
            tags::PARSE,
            &cstrs(&[
                "P0_1",
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            ]),
            now,
        );
        b.iter(|| {
            let now = Instant::now();
            t.on_client_frame(tags::BIND, black_box(&bind), now);
            t.on_client_frame(tags::EXECUTE, black_box(&execute), now);
            t.expect_ready();
            t.on_server_frame(tags::COMMAND_COMPLETE, black_box(&complete), now);
            t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
            black_box(t.completed.pop())
        })
    });
    g.finish();
}

fn summary(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit_summary");
    g.bench_function("literal_free_text_cached", |b| {
        let mut s = Summarizer::default();
        b.iter(|| {
            s.summarize(black_box(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
            ))
        })
    });
    g.bench_function("new_literal_same_shape", |b| {
        let mut s = Summarizer::default();
        let mut aid = 0u32;
        b.iter(|| {
            aid = aid.wrapping_add(7919);
            let sql = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};");
            s.summarize(black_box(&sql))
        })
    });
    g.bench_function("uncached_parse_and_fingerprint", |b| {
        let mut aid = 0u32;
        b.iter(|| {
            aid = aid.wrapping_add(1);
            // A fresh summarizer: every call parses and fingerprints.
            let mut s = Summarizer::default();
            s.summarize(black_box(&format!(
                "UPDATE pgbench_accounts SET abalance = abalance + {aid} WHERE aid = 1"
            )))
        })
    });
    g.finish();
}

criterion_group!(benches, tracker, summary);
criterion_main!(benches);
