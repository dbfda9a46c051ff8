//! Every metric name, described in one place, and the Prometheus recorder.
//!
//! Hot paths hold `metrics::Counter` handles created once per session and only do atomic
//! adds; label lookups happen at session start.

use std::sync::OnceLock;

use dashmap::DashSet;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const CLIENT_CONNECTIONS: &str = "pgtenant_client_connections";
pub const SESSIONS_TOTAL: &str = "pgtenant_sessions_total";
pub const AUTH_FAILURES_TOTAL: &str = "pgtenant_auth_failures_total";
pub const SESSIONS_REFUSED_TOTAL: &str = "pgtenant_sessions_refused_total";
pub const QUERIES_TOTAL: &str = "pgtenant_queries_total";
pub const CLIENT_BYTES_TOTAL: &str = "pgtenant_client_bytes_total";
pub const SERVER_BYTES_TOTAL: &str = "pgtenant_server_bytes_total";
pub const POOL_CONNECTIONS: &str = "pgtenant_pool_connections";
pub const POOL_IDLE: &str = "pgtenant_pool_idle_connections";
pub const POOL_WAITING: &str = "pgtenant_pool_waiting_clients";
pub const POOL_CHECKOUT_SECONDS: &str = "pgtenant_pool_checkout_seconds";
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

/// At most this many distinct tenant label values; later tenants share `other`.
const MAX_TENANT_LABELS: usize = 1000;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static TENANT_LABELS: OnceLock<DashSet<String>> = OnceLock::new();

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

/// A bounded tenant label: the tenant id for the first `MAX_TENANT_LABELS` tenants seen,
/// `other` afterwards, so cardinality cannot explode.
pub fn tenant_label(tenant: &str) -> String {
    let seen = TENANT_LABELS.get_or_init(DashSet::new);
    if seen.contains(tenant) {
        return tenant.to_string();
    }
    if seen.len() < MAX_TENANT_LABELS {
        seen.insert(tenant.to_string());
        return tenant.to_string();
    }
    "other".to_string()
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
    describe_counter!(
        CLIENT_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed from clients to servers, by upstream."
    );
    describe_counter!(
        SERVER_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed from servers to clients, by upstream."
    );
    describe_gauge!(
        POOL_CONNECTIONS,
        "Server connections in the pool, by upstream."
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
        "Time to obtain a ready server connection, by upstream."
    );
    describe_counter!(
        SERVER_RESETS_TOTAL,
        "Server connections released, by result (reset, destroyed)."
    );
    describe_counter!(
        UPSTREAM_CONNECT_ERRORS,
        "Failed connection attempts to an upstream."
    );
    describe_counter!(CANCEL_REQUESTS, "CancelRequests received, by result.");
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
        "Audit events lost, by reason (queue_full, spool_full, spool_io, closed). Alert on any."
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
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
}
