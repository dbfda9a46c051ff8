//! The deployment files in deploy/ stay in step with the code: the Grafana dashboard names
//! only series src/metrics.rs defines, and the pgtenant.toml of docker-compose and of the
//! Kubernetes ConfigMap parse and validate with the real config loader. Cheap: no network,
//! no database, no external tool (scripts/validate-deploy.sh runs those).

mod common;

use std::path::{Path, PathBuf};

use pgtenant::config::Config;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every `expr` string anywhere in the dashboard (panels, rows' nested panels, targets).
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn dashboard_uses_only_defined_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/pgtenant-dashboard.json"))
            .expect("dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "dashboard has panels"
    );
    let mut found = Vec::new();
    exprs(&dashboard, &mut found);
    let mut names = 0;
    for expr in &found {
        for (name, defined) in common::metric_references(expr) {
            assert!(
                defined,
                "the dashboard names {name}, which src/metrics.rs does not define (in {expr})"
            );
            names += 1;
        }
    }
    assert!(names >= 20, "only {names} metric references found");
    // The panels the deployment promises.
    for required in [
        "pgtenant_sessions_total",
        "pgtenant_auth_failures_total",
        "pgtenant_isolation_violations_total",
        "pgtenant_pool_connections",
        "pgtenant_pool_idle_connections",
        "pgtenant_pool_waiting_clients",
        "pgtenant_pool_checkout_seconds_bucket",
        "pgtenant_query_duration_seconds_bucket",
        "pgtenant_audit_spool_events",
        "pgtenant_audit_spool_bytes",
        "pgtenant_audit_oldest_unshipped_seconds",
        "pgtenant_audit_events_dropped_total",
        "pgtenant_config_reloads_total",
    ] {
        assert!(
            found.iter().any(|e| e.contains(required)),
            "no dashboard panel queries {required}"
        );
    }
}

/// Sets every `${VAR}` the text references (same values in every test: tests run in
/// parallel in one process) and returns the names.
fn set_referenced_env(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}").expect("regex");
    let names: Vec<String> = re.captures_iter(text).map(|c| c[1].to_string()).collect();
    for name in &names {
        let value = match name.as_str() {
            // A number in the TOML (`[cluster] replica_id`), the pod ordinal in Kubernetes.
            "PGTENANT_REPLICA_ID" => "3".to_string(),
            _ => format!("test-value-for-{name}-0123456789abcdef"),
        };
        std::env::set_var(name, value);
    }
    names
}

fn parse_and_validate(what: &str, text: &str) -> Config {
    let vars = set_referenced_env(text);
    assert!(
        vars.iter().any(|v| v.contains("PASSWORD")),
        "{what}: secrets should come from ${{VAR}} references"
    );
    let config = Config::parse(text).unwrap_or_else(|e| panic!("{what}: parse: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("{what}: validate: {e}"));
    config
}

#[test]
fn compose_config_parses_and_validates() {
    let text = read("deploy/compose/pgtenant.toml");
    let config = parse_and_validate("deploy/compose/pgtenant.toml", &text);
    assert!(
        config.admin.is_some(),
        "compose config needs [admin] for Prometheus"
    );
    assert!(config.audit.is_some(), "compose config has [audit]");
    // The hosts the compose services provide, the ports the Dockerfile exposes.
    assert!(
        text.contains("@postgres:5432/"),
        "upstreams point at the postgres service"
    );
    assert!(text.contains("0.0.0.0:6432") && text.contains("0.0.0.0:9930"));
    // Every variable the file references is passed to the pgtenant service.
    let compose = read("deploy/docker-compose.yml");
    for var in set_referenced_env(&text) {
        assert!(
            compose.contains(&format!("{var}:")),
            "docker-compose.yml does not pass {var}"
        );
    }
    // The init script creates the roles and databases the config logs in to.
    let init = read("deploy/compose/initdb/pgtenant-demo.psql");
    for needle in [
        "CREATE ROLE pgtenant LOGIN",
        "CREATE ROLE acme_app LOGIN",
        "CREATE ROLE pgtenant_audit LOGIN",
        "CREATE DATABASE saas",
        "CREATE DATABASE acme_db",
        "CREATE DATABASE audit",
        "\"audit_tenant_access\"",
    ] {
        assert!(init.contains(needle), "pgtenant-demo.psql lacks {needle}");
    }
}

/// The block scalar `pgtenant.toml: |` of the ConfigMap, de-indented. Plain string handling:
/// the lines after the key that are indented deeper than it (or blank).
fn configmap_toml(yaml: &str) -> String {
    let mut lines = yaml.lines();
    let key_indent = loop {
        let line = lines
            .next()
            .expect("configmap.yaml has a `pgtenant.toml: |` key");
        if line.trim_start() == "pgtenant.toml: |" {
            break line.len() - line.trim_start().len();
        }
    };
    let mut block: Vec<&str> = Vec::new();
    for line in lines {
        let indent = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && indent <= key_indent {
            break;
        }
        block.push(line);
    }
    let indent = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .expect("non-empty pgtenant.toml block");
    block
        .iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn kubernetes_configmap_config_parses_and_validates() {
    let yaml = read("deploy/kubernetes/configmap.yaml");
    let text = configmap_toml(&yaml);
    assert!(text.starts_with("[listen]"), "extracted block:\n{text}");
    let config = parse_and_validate("deploy/kubernetes/configmap.yaml", &text);
    assert!(
        config.admin.is_some(),
        "probes and ServiceMonitor need [admin]"
    );
    assert!(
        text.contains("0.0.0.0:9930"),
        "admin listens on the probed port"
    );
    // Every variable is a key of the Secret the StatefulSet loads with envFrom.
    let secret = read("deploy/kubernetes/secret.yaml");
    let sts = read("deploy/kubernetes/statefulset.yaml");
    for var in set_referenced_env(&text) {
        if var == "PGTENANT_REPLICA_ID" {
            assert!(
                sts.contains(&format!("- name: {var}"))
                    && sts.contains("metadata.labels['apps.kubernetes.io/pod-index']"),
                "statefulset.yaml derives {var} from the pod ordinal"
            );
            continue;
        }
        assert!(
            secret.contains(&format!("  {var}: ")),
            "secret.yaml has no {var}"
        );
    }
    // Cancel forwarding: this pod's id from its ordinal, every possible pod as a peer.
    let cluster = config.cluster.as_ref().expect("[cluster]");
    assert_eq!(cluster.replica_id, 3);
    let hpa = read("deploy/kubernetes/hpa.yaml");
    let max: usize = hpa
        .lines()
        .find_map(|l| l.trim().strip_prefix("maxReplicas:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("hpa.yaml maxReplicas");
    assert_eq!(cluster.peers.len(), max, "one peer per possible replica");
    for (i, peer) in cluster.peers.iter().enumerate() {
        assert_eq!(usize::from(peer.id), i);
        assert_eq!(peer.addr, format!("pgtenant-{i}.pgtenant-headless:6432"));
    }
    // The probes target the admin endpoints.
    assert!(sts.contains("path: /readyz") && sts.contains("path: /healthz"));
}
