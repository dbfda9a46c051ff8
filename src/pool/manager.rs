//! The bb8 manager for server connections, and the per-upstream record of connect
//! failures that lets checkouts fail fast when the upstream is down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::server_conn::{ServerConn, ServerError};
use super::target::UpstreamTarget;
use super::tls::ServerTls;

/// Metric: connect attempts to an upstream that failed (label `upstream`).
pub const UPSTREAM_CONNECT_ERRORS: &str = "pgtenant_upstream_connect_errors_total";

/// Creates and judges [`ServerConn`]s for one upstream.
///
/// bb8 never calls `is_valid` here (pools are built with `test_on_check_out(false)`):
/// [`super::Pools::checkout`] runs the same cheap check itself, so that a dead idle
/// connection is skipped without its error being mistaken for a connect failure.
pub struct ServerConnManager {
    upstream: Arc<str>,
    target: Arc<UpstreamTarget>,
    tls: ServerTls,
    connect_timeout: Duration,
    health: Arc<Health>,
}

impl ServerConnManager {
    pub(crate) fn new(
        upstream: Arc<str>,
        target: Arc<UpstreamTarget>,
        tls: ServerTls,
        connect_timeout: Duration,
        health: Arc<Health>,
    ) -> Self {
        ServerConnManager {
            upstream,
            target,
            tls,
            connect_timeout,
            health,
        }
    }
}

impl bb8::ManageConnection for ServerConnManager {
    type Connection = ServerConn;
    type Error = ServerError;

    async fn connect(&self) -> Result<ServerConn, ServerError> {
        let conn = ServerConn::connect(
            self.upstream.clone(),
            &self.target,
            &self.tls,
            self.connect_timeout,
        )
        .await?;
        self.health.record_success();
        Ok(conn)
    }

    /// No round trip: polls the socket once (see [`ServerConn::check_idle`]).
    async fn is_valid(&self, conn: &mut ServerConn) -> Result<(), ServerError> {
        conn.check_idle().await
    }

    /// Synchronous, at check-in: anything but a clean idle connection is destroyed.
    fn has_broken(&self, conn: &mut ServerConn) -> bool {
        conn.broken || !conn.read_buf.is_empty() || conn.tx_status != b'I'
    }
}

/// The last connect failure of one upstream; waiters watch it to fail fast.
#[derive(Debug)]
pub(crate) struct Health {
    last_failure: watch::Sender<Option<ConnectFailure>>,
}

#[derive(Debug, Clone)]
pub(crate) struct ConnectFailure {
    pub at: Instant,
    /// `ServerError` text prefixed with host:port; never contains the password.
    pub reason: Arc<str>,
}

impl Health {
    pub(crate) fn new() -> Self {
        Health {
            last_failure: watch::Sender::new(None),
        }
    }

    fn record_failure(&self, reason: String) {
        self.last_failure.send_replace(Some(ConnectFailure {
            at: Instant::now(),
            reason: reason.into(),
        }));
    }

    /// Clears the failure (waking watchers only if there was one).
    pub(crate) fn record_success(&self) {
        self.last_failure.send_if_modified(|f| f.take().is_some());
    }

    pub(crate) fn last_failure(&self) -> Option<ConnectFailure> {
        self.last_failure.borrow().clone()
    }

    /// A receiver that has seen the current value: `changed()` fires on the next event.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<ConnectFailure>> {
        self.last_failure.subscribe()
    }
}

/// bb8 error sink: bb8 reports background connect failures only here (a waiter in
/// `get()` would otherwise just time out). Records the failure, counts it, logs it.
#[derive(Debug, Clone)]
pub(crate) struct ConnectErrorSink {
    upstream: Arc<str>,
    addr: Arc<str>,
    health: Arc<Health>,
}

impl ConnectErrorSink {
    pub(crate) fn new(upstream: Arc<str>, addr: Arc<str>, health: Arc<Health>) -> Self {
        ConnectErrorSink {
            upstream,
            addr,
            health,
        }
    }
}

impl bb8::ErrorSink<ServerError> for ConnectErrorSink {
    fn sink(&self, error: ServerError) {
        metrics::counter!(UPSTREAM_CONNECT_ERRORS, "upstream" => self.upstream.to_string())
            .increment(1);
        let reason = format!("connecting to {}: {error}", self.addr);
        tracing::warn!(upstream = %self.upstream, %reason, "server connection failed");
        self.health.record_failure(reason);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<ServerError>> {
        Box::new(self.clone())
    }
}
