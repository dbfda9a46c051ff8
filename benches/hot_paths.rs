//! Criterion benchmarks of the per-message hot paths: frame scanning on both relay
//! directions and JWT verification at session start.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgtenant::protocol::frame::FrameScanner;
use pgtenant::protocol::tags;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// What the server sends for a pgbench `-S` transaction in extended mode.
fn select_response() -> Vec<u8> {
    let mut v = frame(b'1', b"");
    v.extend(frame(b'2', b""));
    v.extend(frame(b'T', &[0u8; 27]));
    v.extend(frame(
        b'D',
        &[0, 1, 0, 0, 0, 5, b'1', b'2', b'3', b'4', b'5'],
    ));
    v.extend(frame(b'C', b"SELECT 1\0"));
    v.extend(frame(b'Z', b"I"));
    v
}

fn scan(c: &mut Criterion) {
    let resp = select_response();
    let mut g = c.benchmark_group("frame_scan");
    g.throughput(Throughput::Bytes(resp.len() as u64));
    g.bench_function("server_select_response", |b| {
        let mut s = FrameScanner::new(i32::MAX as u32);
        b.iter(|| {
            let mut ready = 0;
            let n = s
                .scan(
                    black_box(&resp),
                    |t| t == tags::READY_FOR_QUERY || t == tags::PARAMETER_STATUS,
                    |_| ready += 1,
                )
                .expect("valid frames");
            black_box((n, ready))
        })
    });
    let big: Vec<u8> = (0..1000).flat_map(|_| frame(b'D', &[7u8; 120])).collect();
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("server_1000_data_rows", |b| {
        let mut s = FrameScanner::new(i32::MAX as u32);
        b.iter(|| {
            s.scan(black_box(&big), |t| t == tags::READY_FOR_QUERY, |_| {})
                .expect("valid")
        })
    });
    g.finish();
}

fn jwt(c: &mut Criterion) {
    let secret = "0123456789abcdef0123456789abcdef0123456789abcdef";
    let cfg: pgtenant::config::Config = pgtenant::config::Config::parse(&format!(
        "[listen]\n[jwt]\nsecret = \"{secret}\"\n[upstreams.s]\nkind = \"shared\"\nurl = \"postgres://u:p@h/d\"\n"
    ))
    .expect("bench config");
    let verifier = pgtenant::auth::JwtVerifier::from_config(&cfg.jwt).expect("verifier");
    let token = pgtenant::auth::issue_hs256(
        secret.as_bytes(),
        "tenant_id",
        "acme",
        Some("alice@acme.com"),
        3600,
        &[],
    )
    .expect("token");
    c.bench_function("jwt_verify_hs256", |b| {
        b.iter(|| verifier.verify(black_box(&token)).expect("valid"))
    });
}

criterion_group!(benches, scan, jwt);
criterion_main!(benches);
