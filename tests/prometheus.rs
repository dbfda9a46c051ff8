//! The metrics as an operator sees them: a real Prometheus (the Debian package `prometheus`,
//! installed by .ci/run) scrapes pgtenant's `/metrics` every second while the test drives
//! traffic, and every assertion goes through Prometheus's HTTP query API. The alert rules in
//! deploy/prometheus/ are checked with `promtool check rules`.
//!
//! Metrics are process-global (one recorder per test process), so this binary holds a single
//! proxy test.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgtenant::config::ContextMode;
use pgtenant::isolation::signed::SignedContextConfig;
use serde_json::Value;

const ACME_SESSIONS: usize = 3;
const MEDCORP_SESSIONS: usize = 2;

/// A Prometheus server child process, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("prometheus dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: pgtenant\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let addr = free_addr();
        let log = dir.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `prometheus` ({e}); install the Debian package prometheus (.ci/run does)")
            });
        Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query; `None` while Prometheus is not answering yet.
    async fn query(&self, promql: &str) -> Option<Vec<(Value, f64)>> {
        let q = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = try_http_get(self.addr, &format!("/api/v1/query?query={q}")).await?;
        if status != 200 {
            return None;
        }
        let json: Value = serde_json::from_str(&body).ok()?;
        let result = json["data"]["result"].as_array()?;
        Some(
            result
                .iter()
                .filter_map(|r| {
                    let v = r["value"][1].as_str()?.parse::<f64>().ok()?;
                    Some((r["metric"].clone(), v))
                })
                .collect(),
        )
    }

    /// Polls `promql` until its single result satisfies `ok` (30 s), and returns the value.
    async fn eventually(&self, admin: SocketAddr, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        loop {
            if let Some(result) = self.query(promql).await {
                if let [(_, v)] = result.as_slice() {
                    if ok(*v) {
                        return *v;
                    }
                }
                last = Some(result);
            }
            if Instant::now() > deadline {
                let (_, metrics) = common::http_get(&format!("http://{admin}/metrics")).await;
                panic!(
                    "{promql}: last result {last:?}\n--- /metrics ---\n{metrics}\n--- prometheus log ---\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr")
}

/// HTTP/1.0 GET that tolerates a server not listening yet.
async fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = buf.split_once("\r\n\r\n")?;
    Some((status, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_isolation_series() {
    const ACME_POOL_SIZE: u32 = 7;
    // An upstream nobody listens on, for the connect-error series.
    let proxy = common::start_proxy(|c| {
        let mut ghost = c.upstreams["acme"].clone();
        ghost.url = "postgres://ghost:ghost@127.0.0.1:1/ghost".into();
        ghost.connect_timeout = Duration::from_secs(1);
        ghost.checkout_timeout = Duration::from_secs(2);
        c.upstreams.insert("ghost".into(), ghost);
        c.tenants.map.insert("ghost".into(), "ghost".into());
        // A signed-context upstream whose schema was never installed: `enter` fails.
        let mut signed = c.upstreams["shared"].clone();
        signed.context = ContextMode::Signed;
        signed.signed_context = Some(
            toml::from_str::<SignedContextConfig>(&format!(
                "key_id = \"k1\"\nkey = \"{}\"",
                "ab".repeat(32)
            ))
            .expect("signed context config"),
        );
        c.upstreams.insert("signed".into(), signed);
        c.tenants.map.insert("signedco".into(), "signed".into());
        c.upstreams.get_mut("acme").expect("acme upstream").pool_size = ACME_POOL_SIZE;
    })
    .await;
    let admin = proxy.admin_addr.expect("the demo config has [admin]");
    let prom = Prometheus::start(admin);

    // Sessions of a dedicated and a shared tenant, one simple Query each.
    for _ in 0..ACME_SESSIONS {
        let client = common::connect(proxy.addr, "acme").await;
        client.batch_execute("SELECT 1").await.expect("acme query");
    }
    for i in 0..MEDCORP_SESSIONS {
        let client = common::connect(proxy.addr, "medcorp").await;
        client
            .batch_execute("SELECT 1")
            .await
            .expect("medcorp query");
        if i == 0 {
            // Blocked by the guard; the session goes on.
            let err = client
                .batch_execute("SET app.current_tenant_id = 'globex'")
                .await
                .expect_err("guard blocks");
            assert_eq!(common::sqlstate(&err), "42501");
        }
    }
    // A token signed with the wrong key, and one that is not a JWT at all.
    let forged = pgtenant::auth::issue_hs256(
        b"not-the-demo-secret-not-the-demo-secret",
        "tenant_id",
        "acme",
        Some("mallory"),
        3600,
        &[],
    )
    .expect("token");
    for (password, reason) in [
        (forged.as_str(), "bad_signature"),
        ("not-a-jwt", "malformed"),
    ] {
        let err = common::try_connect(proxy.addr, password)
            .await
            .expect_err("refused");
        assert_eq!(common::sqlstate(&err), "28P01", "{reason}");
    }
    // A tenant routed to an unreachable upstream: 08001.
    let err = common::try_connect(proxy.addr, &common::token("ghost", "u"))
        .await
        .expect_err("unreachable");
    assert_eq!(common::sqlstate(&err), "08001");
    // A tenant whose signed context cannot be entered.
    let err = common::try_connect(proxy.addr, &common::token("signedco", "u"))
        .await
        .expect_err("context refused");
    let code = common::sqlstate(&err);
    assert!(code == "28000" || code == "57P03", "{err:?}");

    let exact = |n: usize| move |v: f64| v == n as f64;
    let at_least = |n: f64| move |v: f64| v >= n;

    prom.eventually(admin, r#"up{job="pgtenant"}"#, exact(1))
        .await;
    prom.eventually(
        admin,
        &format!(
            r#"pgtenant_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        ),
        exact(1),
    )
    .await;

    // Sessions and queries by tenant and upstream.
    prom.eventually(
        admin,
        r#"sum(pgtenant_sessions_total{tenant="acme",upstream="acme"})"#,
        exact(ACME_SESSIONS),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_sessions_total{tenant="medcorp",upstream="shared"})"#,
        exact(MEDCORP_SESSIONS),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_queries_total{tenant="acme",upstream="acme"})"#,
        exact(ACME_SESSIONS),
    )
    .await;
    // Two SELECTs and the blocked SET.
    prom.eventually(
        admin,
        r#"sum(pgtenant_queries_total{tenant="medcorp",upstream="shared"})"#,
        at_least(MEDCORP_SESSIONS as f64),
    )
    .await;
    // Query duration: one sample per server-answered query (the refused SET is answered
    // by pgtenant and not timed).
    prom.eventually(
        admin,
        r#"sum(pgtenant_query_duration_seconds_count{tenant="acme",upstream="acme"})"#,
        exact(ACME_SESSIONS),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_query_duration_seconds_count{tenant="medcorp",upstream="shared"})"#,
        exact(MEDCORP_SESSIONS),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_query_duration_seconds_bucket{tenant="acme",le="+Inf"})"#,
        exact(ACME_SESSIONS),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_client_connections{tenant=~"acme|medcorp"})"#,
        exact(0),
    )
    .await;

    // The guard block, by tenant and rule; nothing for the dedicated tenant.
    prom.eventually(
        admin,
        r#"pgtenant_isolation_violations_total{tenant="medcorp",rule="tenant_setting"}"#,
        exact(1),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_isolation_violations_total) or vector(0)"#,
        exact(1),
    )
    .await;

    // Auth failures by reason.
    prom.eventually(
        admin,
        r#"sum(pgtenant_auth_failures_total{reason="bad_signature"})"#,
        exact(1),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_auth_failures_total{reason="malformed"})"#,
        exact(1),
    )
    .await;

    // Bytes relayed, added at each session's end (3 acme sessions of one small query each).
    for series in ["pgtenant_client_bytes_total", "pgtenant_server_bytes_total"] {
        prom.eventually(
            admin,
            &format!(r#"sum({series}{{upstream="acme"}})"#),
            at_least(30.0),
        )
        .await;
    }

    // Upstream connect errors and the refused session.
    prom.eventually(
        admin,
        r#"sum(pgtenant_upstream_connect_errors_total{upstream="ghost"})"#,
        at_least(1.0),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_sessions_refused_total{reason="upstream_unreachable"})"#,
        exact(1),
    )
    .await;

    // The signed context failure, by upstream and step.
    prom.eventually(
        admin,
        r#"pgtenant_context_failures_total{upstream="signed",step="enter"}"#,
        exact(1),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_sessions_refused_total{reason="context"})"#,
        exact(1),
    )
    .await;

    // Pools: connections, idle, waiting, checkout-time histogram per upstream.
    prom.eventually(
        admin,
        r#"pgtenant_pool_connections{upstream="acme"}"#,
        at_least(1.0),
    )
    .await;
    prom.eventually(
        admin,
        r#"pgtenant_pool_idle_connections{upstream="acme"}"#,
        at_least(1.0),
    )
    .await;
    // Every session has ended, so nothing is checked out; the size is the config's.
    prom.eventually(
        admin,
        r#"pgtenant_pool_in_use_connections{upstream="acme"}"#,
        exact(0),
    )
    .await;
    prom.eventually(
        admin,
        r#"pgtenant_pool_size{upstream="acme"}"#,
        exact(ACME_POOL_SIZE as usize),
    )
    .await;
    prom.eventually(
        admin,
        r#"pgtenant_pool_waiting_clients{upstream="shared"}"#,
        exact(0),
    )
    .await;
    prom.eventually(
        admin,
        r#"pgtenant_pool_checkout_seconds_count{upstream="acme",tenant="acme"}"#,
        exact(ACME_SESSIONS),
    )
    .await;
    prom.eventually(
        admin,
        r#"pgtenant_pool_checkout_seconds_bucket{upstream="acme",tenant="acme",le="+Inf"}"#,
        exact(ACME_SESSIONS),
    )
    .await;

    // Audit (the demo config has [audit]): spooled, written, nothing dropped, all shipped.
    prom.eventually(
        admin,
        r#"sum(pgtenant_audit_events_spooled_total)"#,
        at_least(1.0),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_audit_events_written_total)"#,
        at_least(1.0),
    )
    .await;
    prom.eventually(
        admin,
        r#"sum(pgtenant_audit_events_dropped_total) or vector(0)"#,
        exact(0),
    )
    .await;
    prom.eventually(
        admin,
        r#"max(pgtenant_audit_oldest_unshipped_seconds)"#,
        at_least(0.0),
    )
    .await;
    prom.eventually(admin, r#"max(pgtenant_audit_spool_events)"#, at_least(0.0))
        .await;

    // No series has a tenant label beyond the demo tenants and `other`.
    let tenants = prom
        .query(r#"count by (tenant) ({__name__=~"pgtenant_.+", tenant!=""})"#)
        .await
        .expect("query");
    for (labels, _) in &tenants {
        let t = labels["tenant"].as_str().unwrap_or_default();
        assert!(
            ["acme", "medcorp", "other"].contains(&t),
            "unexpected tenant label {t}"
        );
    }

    proxy.shutdown();
    drop(prom);
}

/// The alert rules shipped in deploy/ are valid Prometheus rules and use real series names.
#[test]
fn promtool_accepts_the_alert_rules() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `promtool` ({e}); install the Debian package prometheus (.ci/run does)"
            )
        });
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every pgtenant_ series an expression names exists in src/metrics.rs.
    let text = std::fs::read_to_string(&rules).expect("read rules");
    for (name, defined) in common::metric_references(&text) {
        assert!(
            defined,
            "alerts.yml names {name}, which src/metrics.rs does not define"
        );
    }
}
