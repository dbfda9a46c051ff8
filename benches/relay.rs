//! The relay's per-request cost: the `Cycle` decisions on the batch pgbench `-M extended`
//! sends per transaction (Parse/Bind/Describe/Execute/Sync), with and without the SQL
//! guard as the client filter, and a whole `Relay` round trip of a select: client bytes in
//! through an in-memory duplex, out to a fake server over loopback TCP, its response back.
//!
//! `cargo bench --bench relay`

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};

use pgtenant::isolation::guard::{Guard, GuardConfig};
use pgtenant::pool::{ServerConn, ServerStream};
use pgtenant::protocol::frame::FrameScanner;
use pgtenant::session::relay::{ClientFilter, Cycle, Refusal, Relay};

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// What pgbench `-M extended -S` sends per transaction.
fn extended_batch() -> Vec<u8> {
    let mut parse = vec![0u8]; // unnamed statement
    parse.extend_from_slice(SELECT.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]); // no parameter types
    let mut bind = vec![0u8, 0u8]; // unnamed portal, unnamed statement
    bind.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 5]); // no formats, 1 parameter of 5 bytes
    bind.extend_from_slice(b"12345");
    bind.extend_from_slice(&[0, 0]); // no result formats
    let mut v = frame(b'P', &parse);
    v.extend(frame(b'B', &bind));
    v.extend(frame(b'D', b"P\0"));
    v.extend(frame(b'E', &[0, 0, 0, 0, 0]));
    v.extend(frame(b'S', b""));
    v
}

/// The server's answer to `extended_batch`.
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

/// The SQL guard as a shared upstream's filter (without the session's metrics and audit).
struct GuardOnly(Guard);

impl ClientFilter for GuardOnly {
    fn check_sql(&self, sql: &str) -> Option<Refusal> {
        self.0.check(sql).err().map(|v| Refusal {
            code: "42501",
            message: v.rule.message().to_string(),
        })
    }
    fn check_function_call(&self) -> Option<Refusal> {
        None
    }
}

fn cycle(c: &mut Criterion) {
    let batch = extended_batch();
    let guard = GuardOnly(Guard::new(GuardConfig::default()));
    let mut g = c.benchmark_group("relay_cycle");
    g.throughput(Throughput::Elements(1));
    for (name, filter) in [
        ("extended_batch_no_filter", None),
        (
            "extended_batch_guard_cached",
            Some(&guard as &dyn ClientFilter),
        ),
    ] {
        g.bench_function(name, |b| {
            let mut cycle = Cycle::default();
            let mut scan = FrameScanner::new(1 << 20);
            b.iter(|| {
                let plan = cycle
                    .plan_client(&mut scan, black_box(&batch), filter)
                    .expect("valid batch");
                let forwarded: usize = plan.forwarded().map(|r| r.len()).sum();
                black_box(cycle.on_server_ready(Instant::now()));
                black_box((plan.consumed, forwarded))
            })
        });
    }
    g.finish();
}

/// A server that answers every complete `request` it reads with `response`.
async fn fake_server(listener: TcpListener, request: usize, response: Vec<u8>) {
    let (mut s, _) = listener.accept().await.expect("accept");
    s.set_nodelay(true).expect("nodelay");
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        match s.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while buf.len() >= request {
            let _ = buf.split_to(request);
            out.extend_from_slice(&response);
        }
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

/// A relay between `client` (its far end is returned) and a fake server on loopback.
async fn relay_pair(request: usize, response: Vec<u8>) -> DuplexStream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(fake_server(listener, request, response));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let (client_end, mut proxy_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut server = ServerConn {
            stream: ServerStream::Plain(tcp),
            read_buf: BytesMut::with_capacity(16 * 1024),
            backend_pid: 1,
            backend_secret: 1,
            backend_start_micros: None,
            params: Default::default(),
            tx_status: b'I',
            broken: false,
            cancel_addr: addr,
            id: 1,
            upstream: Arc::from("bench"),
            prepared: None,
        };
        let mut client_buf = BytesMut::with_capacity(16 * 1024);
        let (_keep, shutdown) = tokio::sync::watch::channel(false);
        let mut relay = Relay {
            client: &mut proxy_end,
            client_buf: &mut client_buf,
            server: &mut server,
            max_client_frame: 1 << 26,
            cycle: Cycle::default(),
            stats: Default::default(),
            on_queries: &|_| {},
            filter: None,
            on_statement: None,
            watches: None,
            attach: None,
        };
        relay.run(shutdown).await;
    });
    client_end
}

fn relay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (batch, response) = (extended_batch(), select_response());
    let mut g = c.benchmark_group("relay_roundtrip");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for depth in [1usize, 16] {
        let mut client = rt.block_on(relay_pair(batch.len(), response.clone()));
        let request: Vec<u8> = batch.repeat(depth);
        let mut answer = vec![0u8; response.len() * depth];
        g.throughput(Throughput::Elements(depth as u64));
        let name = if depth == 1 {
            "select_extended".to_string()
        } else {
            format!("select_extended_pipelined_{depth}")
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        client.write_all(&request).await.expect("write");
                        client.read_exact(&mut answer).await.expect("read");
                    }
                    start.elapsed()
                })
            })
        });
        assert_eq!(
            answer,
            response.repeat(depth),
            "the relay forwards the response"
        );
    }
    g.finish();
}

criterion_group!(benches, cycle, relay);
criterion_main!(benches);
