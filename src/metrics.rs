//! Every metric name, described in one place, and the Prometheus recorder.
//!
//! Hot paths hold `metrics::Counter` handles created once per session and only do atomic
//! adds; label lookups happen at session start.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::MetricsConfig;

pub const CLIENT_CONNECTIONS: &str = "pgtenant_client_connections";
pub const SESSIONS_TOTAL: &str = "pgtenant_sessions_total";
pub const AUTH_FAILURES_TOTAL: &str = "pgtenant_auth_failures_total";
pub const SESSIONS_REFUSED_TOTAL: &str = "pgtenant_sessions_refused_total";
pub const QUERIES_TOTAL: &str = "pgtenant_queries_total";
pub const QUERY_DURATION_SECONDS: &str = "pgtenant_query_duration_seconds";
pub const CLIENT_BYTES_TOTAL: &str = "pgtenant_client_bytes_total";
pub const SERVER_BYTES_TOTAL: &str = "pgtenant_server_bytes_total";
pub const POOL_CONNECTIONS: &str = "pgtenant_pool_connections";
pub const POOL_SIZE: &str = "pgtenant_pool_size";
pub const POOL_IN_USE: &str = "pgtenant_pool_in_use_connections";
pub const POOL_IDLE: &str = "pgtenant_pool_idle_connections";
pub const POOL_WAITING: &str = "pgtenant_pool_waiting_clients";
pub const POOL_CHECKOUT_SECONDS: &str = "pgtenant_pool_checkout_seconds";
/// Transaction mode: time a transaction waited for a server connection (by upstream, tenant).
pub const POOL_WAIT_SECONDS: &str = "pgtenant_pool_wait_seconds";
/// Transaction mode: idle connections of one tenant reset (DISCARD ALL) for another.
pub const POOL_TENANT_SWITCHES_TOTAL: &str = "pgtenant_pool_tenant_switches_total";
/// Transaction mode: checkouts served by an idle connection already carrying the tenant.
pub const POOL_AFFINITY_HITS_TOTAL: &str = "pgtenant_pool_affinity_hits_total";
/// Transaction mode: sessions pinned to one server connection by a session-only feature.
pub const PINNED_SESSIONS_TOTAL: &str = "pgtenant_pinned_sessions_total";
/// Transaction mode: statements refused because they need session state (`session_features = "refuse"`).
pub const SESSION_FEATURES_REFUSED_TOTAL: &str = "pgtenant_session_features_refused_total";
pub const SERVER_RESETS_TOTAL: &str = "pgtenant_server_resets_total";
pub const UPSTREAM_CONNECT_ERRORS: &str = "pgtenant_upstream_connect_errors_total";
pub const CANCEL_REQUESTS: &str = "pgtenant_cancel_requests_total";
pub const BUILD_INFO: &str = "pgtenant_build_info";
pub const CONTEXT_FAILURES_TOTAL: &str = "pgtenant_context_failures_total";
pub const ISOLATION_VIOLATIONS_TOTAL: &str = "pgtenant_isolation_violations_total";
pub const AUDIT_EVENTS_SPOOLED_TOTAL: &str = "pgtenant_audit_events_spooled_total";
pub const AUDIT_EVENTS_WRITTEN_TOTAL: &str = "pgtenant_audit_events_written_total";
pub const AUDIT_EVENTS_DUPLICATE_TOTAL: &str = "pgtenant_audit_events_duplicate_total";
pub const AUDIT_EVENTS_REPLAYED_TOTAL: &str = "pgtenant_audit_events_replayed_total";
pub const AUDIT_EVENTS_DROPPED_TOTAL: &str = "pgtenant_audit_events_dropped_total";
pub const AUDIT_SPOOL_BYTES: &str = "pgtenant_audit_spool_bytes";
pub const AUDIT_SPOOL_EVENTS: &str = "pgtenant_audit_spool_events";
pub const AUDIT_OLDEST_UNSHIPPED_SECONDS: &str = "pgtenant_audit_oldest_unshipped_seconds";
pub const AUDIT_BATCH_SECONDS: &str = "pgtenant_audit_batch_seconds";
pub const AUDIT_SHIP_ERRORS_TOTAL: &str = "pgtenant_audit_ship_errors_total";
pub const AUDIT_REFUSED_TOTAL: &str = "pgtenant_audit_refused_total";
pub const CONFIG_RELOADS_TOTAL: &str = "pgtenant_config_reloads_total";
pub const DIRECTORY_LOOKUPS_TOTAL: &str = "pgtenant_directory_lookups_total";
pub const DIRECTORY_QUERIES_TOTAL: &str = "pgtenant_directory_queries_total";
pub const DIRECTORY_INVALIDATIONS_TOTAL: &str = "pgtenant_directory_invalidations_total";
pub const DIRECTORY_STALENESS_SECONDS: &str = "pgtenant_directory_staleness_seconds";
pub const DIRECTORY_LOOKUP_SECONDS: &str = "pgtenant_directory_lookup_seconds";
pub const JWKS_REFRESHES_TOTAL: &str = "pgtenant_jwks_refreshes_total";
pub const JWKS_KEYS: &str = "pgtenant_jwks_keys";
pub const JWKS_AGE_SECONDS: &str = "pgtenant_jwks_age_seconds";
pub const SESSIONS_ENDED_TOTAL: &str = "pgtenant_sessions_ended_total";
pub const CONSOLE_COMMANDS_TOTAL: &str = "pgtenant_console_commands_total";
// Named prepared statements across server connections (`prepared`), by upstream; emitted
// by the relay from `prepared::Counters`.
pub const PREPARED_REPARSED_TOTAL: &str = "pgtenant_prepared_statements_reparsed_total";
pub const PREPARED_EVICTED_TOTAL: &str = "pgtenant_prepared_statements_evicted_total";
pub const PREPARED_CACHE_HITS_TOTAL: &str = "pgtenant_prepared_statements_cache_hits_total";

/// The label value shared by tenants beyond the cap (and by all with `tenant_labels = false`).
pub const OTHER_TENANT: &str = "other";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static TENANT_LABELS: TenantLabels = TenantLabels::new(1000);

/// Installs the process-wide recorder once and returns its handle (idempotent, so several
/// proxies in one test process share it).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
                .expect("static bucket list is non-empty")
                .install_recorder()
                .unwrap_or_else(|_| {
                    // Someone else installed a recorder: render an empty one.
                    PrometheusBuilder::new().build_recorder().handle()
                });
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Applies `[metrics]` to the process-wide tenant labels (the recorder is process-wide too;
/// the last proxy started in a process wins). Tenants already labelled keep their label.
pub fn configure(cfg: &MetricsConfig) {
    let cap = if cfg.tenant_labels {
        cfg.max_tenant_labels
    } else {
        0
    };
    TENANT_LABELS.set_cap(cap);
}

/// A bounded tenant label: the tenant id for the first `[metrics] max_tenant_labels` tenants
/// seen, `other` afterwards (and always with `tenant_labels = false`), so cardinality cannot
/// explode. Called once per session, not per statement.
pub fn tenant_label(tenant: &str) -> String {
    TENANT_LABELS.label(tenant)
}

/// The first `cap` distinct tenants get their own label value, later ones `other`.
pub struct TenantLabels {
    cap: AtomicUsize,
    seen: Mutex<Option<HashSet<String>>>,
}

impl TenantLabels {
    pub const fn new(cap: usize) -> Self {
        Self {
            cap: AtomicUsize::new(cap),
            seen: Mutex::new(None),
        }
    }

    pub fn set_cap(&self, cap: usize) {
        self.cap.store(cap, Ordering::Relaxed);
    }

    pub fn label(&self, tenant: &str) -> String {
        let cap = self.cap.load(Ordering::Relaxed);
        if cap == 0 {
            return OTHER_TENANT.to_string();
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let seen = seen.get_or_insert_with(HashSet::new);
        if seen.contains(tenant) {
            return tenant.to_string();
        }
        if seen.len() < cap {
            seen.insert(tenant.to_string());
            return tenant.to_string();
        }
        OTHER_TENANT.to_string()
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        CLIENT_CONNECTIONS,
        "Client sessions currently open, by tenant and upstream."
    );
    describe_counter!(
        SESSIONS_TOTAL,
        "Client sessions started, by tenant and upstream."
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        "Failed client authentications, by reason."
    );
    describe_counter!(
        SESSIONS_REFUSED_TOTAL,
        "Authenticated sessions refused (pool, upstream), by reason."
    );
    describe_counter!(
        QUERIES_TOTAL,
        "Queries relayed (simple Query, Sync, FunctionCall), by tenant and upstream."
    );
    describe_histogram!(
        QUERY_DURATION_SECONDS,
        Unit::Seconds,
        "Time from a query (simple Query, Sync, FunctionCall) reaching pgtenant to the server's ReadyForQuery, by tenant and upstream; guard-refused queries are not included."
    );
    describe_counter!(
        CLIENT_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed from clients to servers, by upstream (added when a session ends)."
    );
    describe_counter!(
        SERVER_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed from servers to clients, by upstream (added when a session ends)."
    );
    describe_gauge!(
        POOL_CONNECTIONS,
        "Server connections in the pool, by upstream."
    );
    describe_gauge!(
        POOL_SIZE,
        "Configured pool_size (the most server connections the pool opens), by upstream."
    );
    describe_gauge!(
        POOL_IN_USE,
        "Server connections checked out to sessions, by upstream."
    );
    describe_gauge!(
        POOL_IDLE,
        "Idle server connections in the pool, by upstream."
    );
    describe_gauge!(
        POOL_WAITING,
        "Clients waiting for a server connection, by upstream."
    );
    describe_histogram!(
        POOL_CHECKOUT_SECONDS,
        Unit::Seconds,
        "Time to obtain a ready server connection (the tenant context included), by upstream and tenant."
    );
    describe_counter!(
        SERVER_RESETS_TOTAL,
        "Server connections released, by result (reset, destroyed)."
    );
    describe_counter!(
        UPSTREAM_CONNECT_ERRORS,
        "Failed connection attempts to an upstream."
    );
    describe_counter!(
        CANCEL_REQUESTS,
        "CancelRequests received, by result (forwarded, unknown_key, throttled, failed; with [cluster]: forwarded_peer, unknown_peer, peer_failed, peer_loop)."
    );
    describe_counter!(
        ISOLATION_VIOLATIONS_TOTAL,
        "Statements refused by the isolation guard, by tenant and rule."
    );
    describe_counter!(
        CONTEXT_FAILURES_TOTAL,
        "Signed tenant context enter/leave failures, by upstream and step; the connection is destroyed."
    );
    describe_counter!(
        AUDIT_EVENTS_SPOOLED_TOTAL,
        "Audit events appended to the local spool, by sink."
    );
    describe_counter!(
        AUDIT_EVENTS_WRITTEN_TOTAL,
        "Audit rows inserted into the audit table, by sink."
    );
    describe_counter!(
        AUDIT_EVENTS_DUPLICATE_TOTAL,
        "Replayed audit events the table already held (absorbed by the event key), by sink."
    );
    describe_counter!(
        AUDIT_EVENTS_REPLAYED_TOTAL,
        "Audit events found unshipped in the spool at start and replayed, by sink."
    );
    describe_counter!(
        AUDIT_EVENTS_DROPPED_TOTAL,
        "Audit events lost, by reason (queue_full, spool_full, spool_io, closed, undecodable). Alert on any."
    );
    describe_gauge!(
        AUDIT_SPOOL_BYTES,
        Unit::Bytes,
        "Bytes in the audit spool not yet shipped, by sink."
    );
    describe_gauge!(
        AUDIT_SPOOL_EVENTS,
        "Audit events in the spool not yet shipped, by sink."
    );
    describe_gauge!(
        AUDIT_OLDEST_UNSHIPPED_SECONDS,
        Unit::Seconds,
        "Age of the oldest audit event not yet in the audit table (0 when none), by sink."
    );
    describe_histogram!(
        AUDIT_BATCH_SECONDS,
        Unit::Seconds,
        "Time to insert one batch of audit rows, by sink."
    );
    describe_counter!(
        AUDIT_SHIP_ERRORS_TOTAL,
        "Failed attempts to ship an audit batch (the batch stays spooled and is retried), by sink."
    );
    describe_counter!(
        AUDIT_REFUSED_TOTAL,
        "Sessions and statements refused because the audit spool was full (fail_closed), by what."
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Config reloads (SIGHUP or ProxyHandle::reload), by result (ok, error: the running config stayed)."
    );
    describe_counter!(
        DIRECTORY_LOOKUPS_TOTAL,
        "Tenant directory lookups, by result (hit, negative: cached \"no row\", miss: asked the metadata database, stale: served past the TTL while it was unreachable, error: refused)."
    );
    describe_counter!(
        DIRECTORY_QUERIES_TOTAL,
        "Directory queries sent to the metadata database (concurrent lookups of one tenant share one)."
    );
    describe_counter!(
        DIRECTORY_INVALIDATIONS_TOTAL,
        "Directory cache invalidations, by scope (tenant, all: from NOTIFY; reconnect: the LISTEN connection was made again)."
    );
    describe_gauge!(
        DIRECTORY_STALENESS_SECONDS,
        Unit::Seconds,
        "Seconds since the last successful contact with the tenant directory's metadata database; 0 while it is reachable."
    );
    describe_histogram!(
        DIRECTORY_LOOKUP_SECONDS,
        Unit::Seconds,
        "Time to resolve a tenant through the directory (cache hits included)."
    );
    describe_counter!(
        JWKS_REFRESHES_TOTAL,
        "Fetches of [jwt] jwks_url, by result (ok: new keys, unchanged, error: the previous keys stay)."
    );
    describe_gauge!(
        JWKS_KEYS,
        "Usable keys in the key set fetched from [jwt] jwks_url."
    );
    describe_gauge!(
        JWKS_AGE_SECONDS,
        Unit::Seconds,
        "Time since the last successful fetch of [jwt] jwks_url; past jwks_max_staleness tokens are refused."
    );
    describe_counter!(
        SESSIONS_ENDED_TOTAL,
        "Client sessions that ended after they started relaying, by reason (terminated, client_closed, server_closed, shutdown, killed, token_expired, lifetime, protocol)."
    );
    describe_counter!(
        CONSOLE_COMMANDS_TOTAL,
        "Admin console commands run, by command (show_clients, pause, kill_tenant, ...; unknown for parse errors)."
    );
    describe_counter!(
        PREPARED_REPARSED_TOTAL,
        "Parses pgtenant sent because a server connection lacked a client's named prepared statement, by upstream."
    );
    describe_counter!(
        PREPARED_EVICTED_TOTAL,
        "Prepared statements closed on a server connection to stay within max_server_prepared_statements, by upstream."
    );
    describe_counter!(
        PREPARED_CACHE_HITS_TOTAL,
        "Client Parses of a named statement answered by pgtenant because the server connection already had it, by upstream."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_txn_pool();
}

/// The transaction-mode pool's metrics.
fn describe_txn_pool() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_histogram!(
        POOL_WAIT_SECONDS,
        Unit::Seconds,
        "Transaction mode: time from a client's request to a server connection being ready for it (queue wait, connect or switch), by upstream and tenant."
    );
    describe_counter!(
        POOL_TENANT_SWITCHES_TOTAL,
        "Transaction mode: idle server connections reset with DISCARD ALL to serve another tenant, by upstream."
    );
    describe_counter!(
        POOL_AFFINITY_HITS_TOTAL,
        "Transaction mode: checkouts served by an idle server connection already carrying the tenant's context, by upstream."
    );
    describe_counter!(
        PINNED_SESSIONS_TOTAL,
        "Transaction mode: sessions pinned to their server connection until they end, by upstream and reason (the session-only feature)."
    );
    describe_counter!(
        SESSION_FEATURES_REFUSED_TOTAL,
        "Transaction mode with session_features = \"refuse\": statements refused (0A000), by upstream and feature."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_capped_with_an_other_bucket() {
        let labels = TenantLabels::new(2);
        assert_eq!(labels.label("acme"), "acme");
        assert_eq!(labels.label("globex"), "globex");
        assert_eq!(labels.label("initech"), "other");
        assert_eq!(
            labels.label("acme"),
            "acme",
            "a labelled tenant keeps its label"
        );
        assert_eq!(labels.label("initech"), "other");
        assert_eq!(labels.label("umbrella"), "other");
    }

    #[test]
    fn tenant_labels_off_means_everyone_is_other() {
        let labels = TenantLabels::new(1000);
        labels.set_cap(0);
        assert_eq!(labels.label("acme"), "other");
        assert_eq!(labels.label("globex"), "other");
    }

    #[test]
    fn metrics_config_defaults_and_parses() {
        let d = MetricsConfig::default();
        assert!(d.tenant_labels);
        assert_eq!(d.max_tenant_labels, 1000);
        let c: MetricsConfig =
            toml::from_str("tenant_labels = false\nmax_tenant_labels = 5").expect("parses");
        assert_eq!(
            c,
            MetricsConfig {
                tenant_labels: false,
                max_tenant_labels: 5
            }
        );
        assert!(toml::from_str::<MetricsConfig>("max_tenants = 5").is_err());
    }
}
