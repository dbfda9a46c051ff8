//! Named prepared statements across server connections, against a real PostgreSQL: the
//! statements pgbench `-M prepared` (libpq) and tokio-postgres send run once on a direct
//! connection per client and once through `pgtenant::prepared` over two server connections
//! taken in turn; each client must get the same answers, and each server connection's
//! `pg_prepared_statements` must be what `ServerStatements` says.

use bytes::BytesMut;
use pgtenant::embedded_pg::TempPg;
use pgtenant::prepared::{PreparedConfig, PreparedStatements, ServerAction, ServerStatements};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SELECT: &str = "SELECT abalance FROM prep_accounts WHERE aid = $1";
const UPDATE: &str = "UPDATE prep_accounts SET abalance = abalance + $1 WHERE aid = $2";
const BROKEN: &str = "SELECT no_such_column FROM prep_accounts";

struct Backend {
    stream: UnixStream,
}

impl Backend {
    async fn connect(pg: &TempPg) -> Backend {
        let path = pg.socket_dir.join(format!(".s.PGSQL.{}", pg.port));
        let mut stream = UnixStream::connect(path).await.expect("connect");
        let mut startup = BytesMut::new();
        frontend::startup_message(
            [("user", "postgres"), ("database", "postgres")],
            &mut startup,
        )
        .unwrap();
        stream.write_all(&startup).await.unwrap();
        let mut b = Backend { stream };
        b.read_until_ready(1).await;
        b
    }

    async fn read_frame(&mut self) -> Vec<u8> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).await.expect("read");
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut frame = head.to_vec();
        frame.resize(1 + len, 0);
        self.stream.read_exact(&mut frame[5..]).await.expect("read");
        frame
    }

    /// Every frame up to the `n`th ReadyForQuery.
    async fn read_until_ready(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut seen = 0;
        while seen < n {
            let f = self.read_frame().await;
            seen += usize::from(f[0] == b'Z');
            frames.push(f);
        }
        frames
    }

    /// Sends `bytes`, returns the frames of the answer (one ReadyForQuery per cycle).
    async fn exchange(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.stream.write_all(bytes).await.unwrap();
        self.read_until_ready(cycles(bytes)).await
    }

    async fn prepared_names(&mut self) -> Vec<String> {
        let mut q = BytesMut::new();
        frontend::query("SELECT name FROM pg_prepared_statements ORDER BY 1", &mut q).unwrap();
        let frames = self.exchange(&q).await;
        let mut names: Vec<String> = frames
            .iter()
            .filter(|f| f[0] == b'D')
            .map(|f| String::from_utf8_lossy(&f[11..]).into_owned())
            .collect();
        names.sort();
        names
    }
}

/// Request cycles in a batch: one ReadyForQuery per Sync and per simple Query.
fn cycles(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    while !bytes.is_empty() {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        n += usize::from(matches!(bytes[0], b'S' | b'Q'));
        bytes = &bytes[1 + len..];
    }
    n
}

/// Comparable form of an answer: frames as bytes, errors as SQLSTATE + message (pgtenant's
/// own errors carry no file/line fields).
fn normalize(frames: &[Vec<u8>]) -> Vec<String> {
    frames
        .iter()
        .map(|f| {
            if f[0] != b'E' {
                return format!("{:?}", String::from_utf8_lossy(f));
            }
            let field = |code: u8| pgtenant::protocol::messages::error_field(&f[5..], code);
            format!(
                "E {} {}",
                field(b'C').unwrap_or("?"),
                field(b'M').unwrap_or("?")
            )
        })
        .collect()
}

fn split(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        out.push(bytes[..1 + len].to_vec());
        bytes = &bytes[1 + len..];
    }
    out
}

struct Conn {
    backend: Backend,
    statements: ServerStatements,
}

/// One client: its own direct connection (the reference) and its prepared statements.
struct Client {
    direct: Backend,
    ps: PreparedStatements,
    /// Rewrites the last batch took (more than one: frames were held back).
    rounds: usize,
}

impl Client {
    async fn new(pg: &TempPg, cfg: &PreparedConfig) -> Client {
        Client {
            direct: Backend::connect(pg).await,
            ps: PreparedStatements::new(cfg),
            rounds: 0,
        }
    }

    /// Runs `batch` directly and through pgtenant on `conn`; asserts equal answers.
    async fn run(&mut self, conn: &mut Conn, batch: &[u8], what: &str) -> Vec<String> {
        let expected = normalize(&self.direct.exchange(batch).await);
        let got = self.proxied(conn, batch).await;
        assert_eq!(got, expected, "{what}");
        got
    }

    /// Runs `batch` through pgtenant only. Frames the rewriter holds back (they depend on
    /// a change in flight) are offered again once the answers are in, as the relay does.
    async fn proxied(&mut self, conn: &mut Conn, batch: &[u8]) -> Vec<String> {
        let mut to_client = BytesMut::new();
        let mut rest = batch;
        let mut rounds = 0;
        while !rest.is_empty() {
            rounds += 1;
            assert!(rounds < 10, "the rewriter does not progress");
            let mut to_server = BytesMut::new();
            let n = self
                .ps
                .rewrite(rest, &mut conn.statements, &mut to_server)
                .expect("rewrite");
            rest = &rest[n..];
            self.ps.drain_due(&mut to_client);
            for frame in conn.backend.exchange(&to_server).await {
                let action = self.ps.on_server_message(
                    frame[0],
                    &frame[5..],
                    &mut conn.statements,
                    &mut to_client,
                );
                match action {
                    ServerAction::Forward => to_client.extend_from_slice(&frame),
                    ServerAction::Drop => {}
                    ServerAction::Replace(b) => to_client.extend_from_slice(&b),
                    ServerAction::Abort => panic!("no hidden cycle here"),
                }
            }
            self.ps.drain_due(&mut to_client);
        }
        assert!(self.ps.idle(), "answers left over");
        self.rounds = rounds;
        normalize(&split(&to_client))
    }
}

async fn check_server_names(conn: &mut Conn) {
    let mut ours: Vec<String> = conn.statements.names().map(|n| n.to_string()).collect();
    ours.sort();
    assert_eq!(conn.backend.prepared_names().await, ours);
}

fn b(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut m = BytesMut::new();
    build(&mut m);
    m
}

type SerializeResult = Result<IsNull, Box<dyn std::error::Error + Sync + Send>>;

/// A binary int4 parameter.
fn int4(v: i32, buf: &mut BytesMut) -> SerializeResult {
    buf.extend_from_slice(&v.to_be_bytes());
    Ok(IsNull::No)
}

/// libpq's PQsendQueryPrepared (pgbench -M prepared): Bind, Describe portal, Execute, Sync.
fn libpq_exec(stmt: &str, params: &[i32]) -> BytesMut {
    b(|m| {
        frontend::bind("", stmt, [1i16], params.iter().copied(), int4, [0i16], m)
            .map_err(|_| "bind")
            .unwrap();
        frontend::describe(b'P', "", m).unwrap();
        frontend::execute("", 0, m).unwrap();
        frontend::sync(m);
    })
}

/// libpq's PQsendPrepare: Parse, Sync.
fn libpq_prepare(name: &str, sql: &str) -> BytesMut {
    b(|m| {
        frontend::parse(name, sql, [], m).unwrap();
        frontend::sync(m);
    })
}

/// tokio-postgres `prepare`: Parse with types, Describe statement, Sync.
fn tokio_prepare(name: &str, sql: &str, types: &[u32]) -> BytesMut {
    b(|m| {
        frontend::parse(name, sql, types.iter().copied(), m).unwrap();
        frontend::describe(b'S', name, m).unwrap();
        frontend::sync(m);
    })
}

/// tokio-postgres `query`: Bind (binary results), Execute, Sync.
fn tokio_query(stmt: &str, params: &[i32]) -> BytesMut {
    b(|m| {
        frontend::bind("", stmt, [1i16], params.iter().copied(), int4, [1i16], m)
            .map_err(|_| "bind")
            .unwrap();
        frontend::execute("", 0, m).unwrap();
        frontend::sync(m);
    })
}

fn close_statement(name: &str) -> BytesMut {
    b(|m| {
        frontend::close(b'S', name, m).unwrap();
        frontend::sync(m);
    })
}

fn query(sql: &str) -> BytesMut {
    b(|m| frontend::query(sql, m).unwrap())
}

#[tokio::test]
async fn two_clients_over_two_server_connections_get_single_connection_answers() {
    let pg = TempPg::shared().expect("PostgreSQL");
    let admin = pg.admin_client("postgres").await.unwrap();
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS prep_accounts;
             CREATE TABLE prep_accounts (aid int PRIMARY KEY, abalance int NOT NULL);
             INSERT INTO prep_accounts SELECT g, g * 10 FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    let cfg = PreparedConfig {
        max_prepared_statements: 5,
        max_server_prepared_statements: 2,
    };
    let mut conns = Vec::new();
    for _ in 0..2 {
        conns.push(Conn {
            backend: Backend::connect(pg).await,
            statements: ServerStatements::new(cfg.max_server_prepared_statements),
        });
    }
    let (a, rest) = conns.split_at_mut(1);
    let (a, bb) = (&mut a[0], &mut rest[0]);
    let mut bench = Client::new(pg, &cfg).await; // pgbench -M prepared
    let mut tokio = Client::new(pg, &cfg).await; // tokio-postgres

    // pgbench prepares on A, runs on B (re-Parse) and on A (cached there).
    assert_eq!(
        bench
            .run(a, &libpq_prepare("P_0", SELECT), "prepare")
            .await
            .len(),
        2
    );
    let got = bench.run(bb, &libpq_exec("P_0", &[7]), "exec on B").await;
    assert!(got.iter().any(|f| f.contains("SELECT 1")), "{got:?}");
    bench.run(a, &libpq_exec("P_0", &[8]), "exec on A").await;
    assert_eq!(bench.ps.take_counters().reparsed, 1);

    // tokio-postgres prepares the same text with a typed parameter: a different statement
    // (types are part of it); ParameterDescription + RowDescription reach it.
    let got = tokio
        .run(bb, &tokio_prepare("s0", SELECT, &[23]), "tokio prepare")
        .await;
    assert!(got[1].starts_with("\"t"), "{got:?}");
    tokio
        .run(a, &tokio_query("s0", &[9]), "tokio query on A")
        .await;
    // The same text and types as pgbench's: answered from B's cache, no Parse sent.
    tokio
        .run(bb, &libpq_prepare("same", SELECT), "shared statement")
        .await;
    assert_eq!(tokio.ps.take_counters().hits, 1);
    tokio
        .run(a, &tokio_query("same", &[10]), "shared statement on A")
        .await;

    // Updates through a second statement; pgbench's transaction in one pipeline.
    bench
        .run(a, &libpq_prepare("P_1", UPDATE), "prepare update")
        .await;
    bench
        .run(bb, &libpq_exec("P_1", &[5, 1]), "update on B")
        .await;

    // Prepare and use in one pipeline (libpq pipeline mode): the Bind waits for the
    // Parse's answer, then goes out; the client sees one connection's answers.
    let got = tokio
        .run(
            a,
            &b(|m| {
                frontend::parse("pipe", UPDATE, [], m).unwrap();
                frontend::sync(m);
                m.extend_from_slice(&tokio_query("pipe", &[1, 2]));
            }),
            "pipelined prepare and execute",
        )
        .await;
    assert!(got.iter().any(|f| f.contains("UPDATE 1")), "{got:?}");
    assert_eq!(tokio.rounds, 2, "the Bind waited for the Parse's answer");

    // A statement that fails to parse, with Bind and Execute behind it in the pipeline.
    let got = bench
        .run(
            a,
            &b(|m| {
                frontend::parse("P_2", BROKEN, [], m).unwrap();
                frontend::bind("", "P_2", [], Vec::<i32>::new(), int4, [], m)
                    .map_err(|_| "bind")
                    .unwrap();
                frontend::execute("", 0, m).unwrap();
                frontend::sync(m);
            }),
            "broken parse",
        )
        .await;
    assert!(got[0].starts_with("E 42703"), "{got:?}");
    bench
        .run(bb, &libpq_exec("P_2", &[]), "never prepared")
        .await;
    // Re-Parse of an existing name, and the batch behind it.
    let got = bench
        .run(
            bb,
            &b(|m| {
                frontend::parse("P_0", UPDATE, [], m).unwrap();
                frontend::sync(m);
            }),
            "duplicate",
        )
        .await;
    assert!(got[0].starts_with("E 42P05"), "{got:?}");

    // Close of a statement inside a transaction, then Execute of a portal made from it:
    // PostgreSQL keeps the portal (the protocol docs say otherwise), and so does pgtenant.
    tokio.run(a, &query("BEGIN"), "begin").await;
    let got = tokio
        .run(
            a,
            &b(|m| {
                frontend::bind("cur", "same", [1i16], [3i32], int4, [0i16], m)
                    .map_err(|_| "bind")
                    .unwrap();
                frontend::close(b'S', "same", m).unwrap();
                frontend::execute("cur", 0, m).unwrap();
                frontend::sync(m);
            }),
            "portal after its statement's Close",
        )
        .await;
    assert!(got.iter().any(|f| f.contains("SELECT 1")), "{got:?}");
    tokio.run(a, &query("ROLLBACK"), "rollback").await;
    tokio
        .run(a, &libpq_prepare("same", SELECT), "prepare again")
        .await;

    // Close and DEALLOCATE, on connections with and without the statement.
    tokio.run(a, &close_statement("s0"), "close").await;
    tokio.run(bb, &tokio_query("s0", &[1]), "closed").await;
    bench.run(bb, &query("DEALLOCATE P_0"), "deallocate").await;
    bench.run(a, &libpq_exec("P_0", &[1]), "deallocated").await;
    bench
        .run(a, &query("DEALLOCATE p_1"), "deallocate by folded name")
        .await;
    bench
        .run(a, &query("DEALLOCATE nonexistent"), "deallocate unknown")
        .await;

    // A failed transaction: the refusal aborts it as PostgreSQL's own would.
    bench
        .run(a, &libpq_prepare("P_3", SELECT), "prepare again")
        .await;
    bench.run(bb, &query("BEGIN"), "begin on B").await;
    let got = bench
        .run(bb, &libpq_exec("nope", &[1]), "unknown in tx")
        .await;
    assert_eq!(
        got.last().map(|z| z.ends_with("E\"")),
        Some(true),
        "{got:?}"
    );
    bench.run(bb, &libpq_exec("P_3", &[1]), "aborted tx").await;
    bench
        .run(bb, &query("DEALLOCATE P_3"), "deallocate in aborted tx")
        .await;
    bench.run(bb, &query("ROLLBACK"), "rollback").await;
    bench
        .run(
            a,
            &libpq_exec("P_3", &[2]),
            "still there after the failed DEALLOCATE",
        )
        .await;

    // The per-client bound (5): 53400 (pgtenant's own limit, so no reference to compare
    // with), the rest of the batch skipped, and room again after a Close.
    for (i, sql) in ["SELECT 1", "SELECT 2", "SELECT 3"].iter().enumerate() {
        tokio
            .run(a, &libpq_prepare(&format!("x{i}"), sql), "fill")
            .await;
    }
    assert_eq!(tokio.ps.client().len(), 5);
    let over = b(|m| {
        frontend::parse("x9", "SELECT 9", [], m).unwrap();
        frontend::bind("", "x9", [], Vec::<i32>::new(), int4, [], m)
            .map_err(|_| "bind")
            .unwrap();
        frontend::execute("", 0, m).unwrap();
        frontend::sync(m);
    });
    let got = tokio.proxied(bb, &over).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("E 53400"), "{got:?}");
    tokio.run(a, &close_statement("x0"), "make room").await;
    assert_eq!(tokio.proxied(bb, &over).await.len(), 5);

    // Everything pgtenant believes is prepared on each connection is exactly what is.
    check_server_names(a).await;
    check_server_names(bb).await;
    assert!(a.statements.len() <= 2 && bb.statements.len() <= 2);
    assert!(bench.ps.take_counters().evicted + tokio.ps.take_counters().evicted > 0);
}
