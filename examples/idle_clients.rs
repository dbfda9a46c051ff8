//! Opens N concurrent idle, authenticated client connections to a PostgreSQL endpoint (a
//! proxy: pgtenant with a JWT password, or PgBouncer), keeps them open, and reports the
//! proxy process's RSS before and after and the memory per idle client; then checks that a
//! fresh client can still run a query while all of them are open. Driven by
//! `scripts/idle-clients.sh`, which starts the proxies and raises `ulimit -n`.
//!
//! ```text
//! cargo run --release --example idle_clients -- --port 6432 --user bench_app \
//!     --password "$TOKEN" --dbname bench_db --pid "$PROXY_PID" --clients 10000
//! ```
//!
//! Prints `key=value` lines (the script turns them into a table). The password never
//! appears in the output or in error messages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Parser)]
struct Args {
    /// A name for the report line (e.g. "pgtenant").
    #[arg(long, default_value = "proxy")]
    target: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    user: String,
    /// The password (a JWT for pgtenant). Read from IDLE_PASSWORD when not given.
    #[arg(long, env = "IDLE_PASSWORD", hide_env_values = true)]
    password: String,
    #[arg(long)]
    dbname: String,
    /// The proxy's process id, for its RSS (/proc/PID/status).
    #[arg(long)]
    pid: u32,
    /// Idle clients to open.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Give up opening more clients after this many failures.
    #[arg(long, default_value_t = 100)]
    max_failures: usize,
    /// Deadline for one client's connect + authentication, and for the fresh client's query.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    timeout: Duration,
    /// How long to hold the clients open before measuring RSS.
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    settle: Duration,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .map(Duration::from_secs_f64)
        .map_err(|e| format!("seconds: {e}"))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn conn_config(a: &Args) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&a.host)
        .port(a.port)
        .user(&a.user)
        .password(&a.password)
        .dbname(&a.dbname)
        .application_name("idle_clients")
        .connect_timeout(a.timeout);
    c
}

/// Connects and authenticates; the connection task runs until the client is dropped.
async fn open(config: &tokio_postgres::Config, timeout: Duration) -> Result<Client, String> {
    let connect = tokio::time::timeout(timeout, config.connect(NoTls)).await;
    let (client, connection) = match connect {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(describe(&e)),
        Err(_) => return Err(format!("connect timed out after {timeout:?}")),
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// An error's SQLSTATE and message (never the configuration, which holds the password).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Opens up to `a.clients` clients, `a.concurrency` at a time; stops early after
/// `a.max_failures` failures. Returns the open clients and the failures by message.
async fn open_all(
    a: &Args,
    config: &tokio_postgres::Config,
) -> (Vec<Client>, BTreeMap<String, usize>) {
    let permits = Arc::new(Semaphore::new(a.concurrency));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.clients {
        if failures.load(Ordering::Relaxed) >= a.max_failures {
            break;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (config, timeout, failures) = (config.clone(), a.timeout, failures.clone());
        tasks.spawn(async move {
            let r = open(&config, timeout).await;
            if r.is_err() {
                failures.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
            r
        });
    }
    let mut clients = Vec::with_capacity(a.clients);
    let mut errors = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.expect("connect task") {
            Ok(c) => clients.push(c),
            Err(e) => *errors.entry(without_numbers(&e)).or_insert(0) += 1,
        }
    }
    (clients, errors)
}

/// Groups errors that differ only in numbers ("after waiting 5001 ms"); the SQLSTATE at the
/// start stays.
fn without_numbers(e: &str) -> String {
    let (code, rest) = e.split_at(e.find(' ').unwrap_or(0));
    let mut out = String::from(code);
    let mut in_number = false;
    for ch in rest.chars() {
        if ch.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            out.push(ch);
            in_number = false;
        }
    }
    out
}

/// A fresh client's `SELECT 1` while everything else is open: "ok" or why not.
async fn fresh_query(config: &tokio_postgres::Config, timeout: Duration) -> String {
    let client = match open(config, timeout).await {
        Ok(c) => c,
        Err(e) => return format!("connect failed: {e}"),
    };
    match tokio::time::timeout(timeout, client.query_one("SELECT 1", &[])).await {
        Ok(Ok(row)) if row.get::<_, i32>(0) == 1 => "ok".into(),
        Ok(Ok(_)) => "wrong result".into(),
        Ok(Err(e)) => format!("query failed: {}", describe(&e)),
        Err(_) => format!("query timed out after {timeout:?}"),
    }
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    let config = conn_config(&a);

    // Warm up: one client through, so pools and lazily built state exist before "before".
    if let Ok(c) = open(&config, a.timeout).await {
        let _ = c.simple_query("SELECT 1").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(a.pid).unwrap_or(0);

    let started = Instant::now();
    let (clients, errors) = open_all(&a, &config).await;
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(a.settle).await;
    let after = rss_kib(a.pid).unwrap_or(0);
    let fresh = fresh_query(&config, a.timeout).await;
    // Still open? A proxy may have closed some while the others were being opened.
    let alive = clients.iter().filter(|c| !c.is_closed()).count();

    let per_client = if alive > 0 {
        format!("{:.1}", after.saturating_sub(before) as f64 / alive as f64)
    } else {
        "-".into()
    };
    let failed: usize = errors.values().sum();
    let errors: Vec<String> = errors
        .iter()
        .map(|(e, n)| format!("{n} x {}", e.replace('\n', " ")))
        .collect();
    let report = [
        ("target", a.target.clone()),
        ("requested", a.clients.to_string()),
        ("connected", clients.len().to_string()),
        ("alive", alive.to_string()),
        ("failed", failed.to_string()),
        ("open_secs", format!("{open_secs:.1}")),
        ("rss_before_kib", before.to_string()),
        ("rss_after_kib", after.to_string()),
        ("kib_per_client", per_client),
        ("fresh_query", fresh),
        ("errors", errors.join("; ")),
    ];
    for (k, v) in report {
        println!("{k}={v}");
    }
    drop(clients);
}
