//! The pools (one bb8 pool per upstream) and checkout: bounded wait, fail-fast when the
//! upstream is down, dead idle connections skipped, and `checkout_ready` that applies the
//! session settings and retries on a connection that turns out to be dead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bb8::{QueueStrategy, RunError};

use super::manager::{ConnectErrorSink, Health, ServerConnManager};
use super::server_conn::ServerError;
use super::target::UpstreamTarget;
use super::tls::ServerTls;
use crate::config::{Config, PoolMode, UpstreamConfig};

/// A checked-out server connection. Dropping it checks the connection back in
/// synchronously: run [`super::ServerConn::reset`] first (or set `broken`).
pub type PooledServer = bb8::PooledConnection<'static, ServerConnManager>;

/// After a failed connect, checkouts of a pool with no live connection fail at once for
/// this long instead of trying again: a down upstream sees at most one attempt per pool
/// per interval from new sessions, and a recovered one is used within this delay.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// `checkout_ready` tries at most this many connections whose setup fails on a dead
/// connection before giving up.
pub const MAX_SETUP_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool \"{pool}\" has no free server connection after waiting {waited_ms} ms")]
    Exhausted { pool: String, waited_ms: u64 },
    /// `reason` never contains the upstream password.
    #[error("upstream \"{pool}\" is unreachable: {reason}")]
    Unreachable { pool: String, reason: String },
    /// Transaction mode: the tenant waited `checkout_timeout` in the fair queue.
    #[error("tenant \"{tenant}\" has no free server connection in pool \"{pool}\" after waiting {waited_ms} ms ({held} of its max_server_connections_per_tenant = {cap} in use)")]
    TenantExhausted {
        pool: String,
        tenant: String,
        waited_ms: u64,
        held: u32,
        cap: u32,
    },
    #[error("unknown upstream \"{0}\"")]
    UnknownUpstream(String),
    /// The server rejected the session settings on a healthy connection (`source` is
    /// usually `ServerError::Db`); the connection went back to the pool.
    #[error("server connection from pool \"{pool}\" could not be set up: {source}")]
    Setup {
        pool: String,
        #[source]
        source: ServerError,
    },
}

/// A snapshot of one pool, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    pub name: Arc<str>,
    /// `pool_size`: the most server connections the pool opens.
    pub size: u32,
    /// Established server connections, idle or checked out.
    pub connections: u32,
    pub idle: u32,
    /// Checkouts in progress (waiting for a connection or for one to be established).
    pub pending_waiters: u64,
}

/// All upstream pools, built once from the config. Pools connect lazily: no server
/// connection exists before the first checkout.
pub struct Pools {
    /// `Arc` so a reload can carry an unchanged upstream's pool (and its idle server
    /// connections) into the new snapshot while old sessions still hold the old one.
    pools: HashMap<Arc<str>, Arc<UpstreamPool>>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.pools.keys()).finish()
    }
}

struct UpstreamPool {
    name: Arc<str>,
    pool: bb8::Pool<ServerConnManager>,
    target: Arc<UpstreamTarget>,
    health: Arc<Health>,
    checkout_timeout: Duration,
    /// Deadline for the session settings round trip in `checkout_ready`.
    setup_timeout: Duration,
    waiters: AtomicU64,
    size: u32,
    /// `pool_mode = "transaction"`: this pool lends connections per transaction instead
    /// (the bb8 pool then stays empty: it connects lazily).
    txn: Option<Arc<super::TxnPool>>,
}

impl Pools {
    /// Builds one lazily-connecting pool per `[upstreams.NAME]`: max size `pool_size`, no
    /// minimum idle, no test round trip on checkout, `idle_timeout` (zero = never), bb8's
    /// default 30 min max lifetime, LIFO reuse (idle surplus ages out), no background
    /// connect retries (see `RECONNECT_BACKOFF`). Must run inside a tokio runtime.
    pub fn from_config(cfg: &Config) -> Result<Pools, ServerError> {
        let mut pools = HashMap::new();
        for (name, up) in &cfg.upstreams {
            let pool = UpstreamPool::build(name, up)?;
            pools.insert(pool.name.clone(), Arc::new(pool));
        }
        Ok(Pools { pools })
    }

    /// The pools for `new` after a reload from `old` (the config these pools were built
    /// from): an upstream whose pool settings are unchanged keeps its pool, so its idle
    /// server connections survive; the others get a fresh pool. Upstreams absent from `new`
    /// are left out (sessions still holding the old `Pools` keep using them until they end).
    pub fn reload(&self, old: &Config, new: &Config) -> Result<Pools, ServerError> {
        let mut pools = HashMap::new();
        for (name, up) in &new.upstreams {
            let kept = old
                .upstreams
                .get(name)
                .filter(|before| same_pool_settings(before, up))
                .and_then(|_| self.pools.get(name.as_str()));
            let pool = match kept {
                Some(pool) => pool.clone(),
                None => Arc::new(UpstreamPool::build(name, up)?),
            };
            pools.insert(pool.name.clone(), pool);
        }
        Ok(Pools { pools })
    }

    /// One pool named `name` that connects to `target` with `up`'s pool settings (its `url`
    /// is not read). For upstreams described at run time, such as tenant directory rows.
    pub fn single(
        name: &str,
        up: &UpstreamConfig,
        target: UpstreamTarget,
    ) -> Result<Pools, ServerError> {
        let pool = UpstreamPool::build_for(name, up, target)?;
        let mut pools = HashMap::new();
        pools.insert(pool.name.clone(), Arc::new(pool));
        Ok(Pools { pools })
    }

    /// Whether `upstream`'s pool is the very same object in both (a reload kept it).
    pub fn shares_pool_with(&self, other: &Pools, upstream: &str) -> bool {
        match (self.pools.get(upstream), other.pools.get(upstream)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// A connection from `upstream`'s pool, waiting up to its `checkout_timeout`.
    ///
    /// Errors: `Exhausted` when every connection stayed busy; `Unreachable` as soon as a
    /// connect attempt fails while the pool holds no live connection (or within
    /// `RECONNECT_BACKOFF` of such a failure), or when none could be established in time;
    /// `UnknownUpstream`. Idle connections the server has closed (restart, idle timeout)
    /// are discarded and replaced transparently. Cancel-safe.
    pub async fn checkout(&self, upstream: &str) -> Result<PooledServer, PoolError> {
        let pool = self.pool(upstream)?;
        pool.checkout(Instant::now() + pool.checkout_timeout).await
    }

    /// What a session calls: `checkout`, then `apply_settings(settings)`. When the
    /// settings round trip finds the connection dead (I/O error, FATAL, or no answer within
    /// the upstream's `connect_timeout`), that connection is destroyed and another one is
    /// tried, up to `MAX_SETUP_ATTEMPTS` in all, within one `checkout_timeout`. A server
    /// error on a healthy connection (e.g. an invalid setting) is returned as
    /// `PoolError::Setup` without retrying.
    pub async fn checkout_ready(
        &self,
        upstream: &str,
        settings: &[(&str, &str)],
    ) -> Result<PooledServer, PoolError> {
        let pool = self.pool(upstream)?;
        let deadline = Instant::now() + pool.checkout_timeout;
        let mut last_error = String::new();
        for attempt in 1..=MAX_SETUP_ATTEMPTS {
            let mut conn = pool.checkout(deadline).await?;
            let applied = tokio::time::timeout(pool.setup_timeout, conn.apply_settings(settings));
            match applied.await {
                Ok(Ok(())) => return Ok(conn),
                Ok(Err(source)) if !conn.broken => {
                    return Err(PoolError::Setup {
                        pool: pool.name.to_string(),
                        source,
                    })
                }
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => {
                    conn.broken = true;
                    last_error = format!("no answer within {:?}", pool.setup_timeout);
                }
            }
            tracing::info!(
                upstream = %pool.name,
                conn = conn.id,
                attempt,
                error = %last_error,
                "server connection died during setup; trying another"
            );
        }
        Err(PoolError::Unreachable {
            pool: pool.name.to_string(),
            reason: format!(
                "{MAX_SETUP_ATTEMPTS} server connections failed during setup, last: {last_error}"
            ),
        })
    }

    /// One entry per upstream, sorted by name.
    pub fn stats(&self) -> Vec<PoolStats> {
        let mut stats: Vec<PoolStats> = self
            .pools
            .values()
            .map(|p| {
                if let Some(txn) = &p.txn {
                    return txn.stats();
                }
                let state = p.pool.state();
                PoolStats {
                    name: p.name.clone(),
                    size: p.size,
                    connections: state.connections,
                    idle: state.idle_connections,
                    pending_waiters: p.waiters.load(Ordering::Relaxed),
                }
            })
            .collect();
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        stats
    }

    /// The transaction-mode pool of `upstream`, when it has `pool_mode = "transaction"`.
    pub fn txn(&self, upstream: &str) -> Option<&Arc<super::TxnPool>> {
        self.pools.get(upstream).and_then(|p| p.txn.as_ref())
    }

    pub fn target(&self, upstream: &str) -> Option<&UpstreamTarget> {
        self.pools.get(upstream).map(|p| &*p.target)
    }

    fn pool(&self, upstream: &str) -> Result<&UpstreamPool, PoolError> {
        self.pools
            .get(upstream)
            .map(|p| &**p)
            .ok_or_else(|| PoolError::UnknownUpstream(upstream.to_owned()))
    }
}

/// Everything `UpstreamPool::build` reads: when these are equal, the old pool's connections
/// are exactly what a new pool would open. (Guard, context and tenant settings are applied
/// per session, so they may change without replacing the pool.)
fn same_pool_settings(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    a.url == b.url
        && a.pool_size == b.pool_size
        && a.checkout_timeout == b.checkout_timeout
        && a.connect_timeout == b.connect_timeout
        && a.idle_timeout == b.idle_timeout
        && a.tls == b.tls
        && a.tls_ca_file == b.tls_ca_file
        && a.pool_mode == b.pool_mode
        && a.max_server_connections_per_tenant == b.max_server_connections_per_tenant
        && a.session_features == b.session_features
}

impl UpstreamPool {
    fn build(name: &str, up: &UpstreamConfig) -> Result<UpstreamPool, ServerError> {
        let invalid = |m: String| ServerError::Config(format!("upstreams.{name}: {m}"));
        let target = UpstreamTarget::from_url(&up.url).map_err(|e| invalid(format!("url: {e}")))?;
        Self::build_for(name, up, target)
    }

    fn build_for(
        name: &str,
        up: &UpstreamConfig,
        target: UpstreamTarget,
    ) -> Result<UpstreamPool, ServerError> {
        let invalid = |m: String| ServerError::Config(format!("upstreams.{name}: {m}"));
        if up.pool_size == 0 {
            return Err(invalid("pool_size must be at least 1".into()));
        }
        if up.checkout_timeout.is_zero() || up.connect_timeout.is_zero() {
            return Err(invalid(
                "checkout_timeout and connect_timeout must be above zero".into(),
            ));
        }
        let name: Arc<str> = name.into();
        let target = Arc::new(target);
        let tls = ServerTls::from_config(up)?;
        let health = Arc::new(Health::new());
        let txn = (up.pool_mode == PoolMode::Transaction).then(|| {
            Arc::new(super::TxnPool::build(
                name.clone(),
                up,
                target.clone(),
                tls.clone(),
                health.clone(),
            ))
        });
        let manager = ServerConnManager::new(
            name.clone(),
            target.clone(),
            tls,
            up.connect_timeout,
            health.clone(),
        );
        let sink = ConnectErrorSink::new(name.clone(), target.addr().into(), health.clone());
        let pool = bb8::Pool::builder()
            .max_size(up.pool_size)
            .min_idle(None)
            .test_on_check_out(false)
            .idle_timeout((!up.idle_timeout.is_zero()).then_some(up.idle_timeout))
            .connection_timeout(up.checkout_timeout)
            .retry_connection(false)
            .queue_strategy(QueueStrategy::Lifo)
            .error_sink(Box::new(sink))
            .build_unchecked(manager);
        Ok(UpstreamPool {
            name,
            pool,
            target,
            health,
            checkout_timeout: up.checkout_timeout,
            setup_timeout: up.connect_timeout,
            waiters: AtomicU64::new(0),
            size: up.pool_size,
            txn,
        })
    }

    async fn checkout(&self, deadline: Instant) -> Result<PooledServer, PoolError> {
        let started = Instant::now();
        let mut failures = self.health.subscribe();
        if let Some(reason) = self.recent_failure() {
            return Err(self.unreachable(reason));
        }
        let _waiting = WaiterGuard::enter(&self.waiters);
        loop {
            let get = tokio::time::timeout_at(deadline.into(), self.pool.get_owned());
            tokio::pin!(get);
            let mut watching = true;
            let got = loop {
                tokio::select! {
                    got = &mut get => break got,
                    changed = failures.changed(), if watching => {
                        if changed.is_err() {
                            watching = false;
                            continue;
                        }
                        let failure = failures.borrow_and_update().clone();
                        if let Some(f) = failure {
                            if self.pool.state().connections == 0 {
                                return Err(self.unreachable(f.reason.to_string()));
                            }
                        }
                    }
                }
            };
            let mut conn = match got {
                Ok(Ok(conn)) => conn,
                Ok(Err(RunError::User(e))) => return Err(self.unreachable(e.to_string())),
                Ok(Err(RunError::TimedOut)) | Err(_) => return Err(self.timed_out(started)),
            };
            match conn.check_idle().await {
                Ok(()) => return Ok(conn),
                // `broken` is set: dropping destroys it and frees its slot.
                Err(e) => tracing::info!(
                    upstream = %self.name,
                    conn = conn.id,
                    error = %e,
                    "discarding dead idle server connection"
                ),
            }
        }
    }

    /// The last connect failure, if it is recent and nothing is connected now.
    fn recent_failure(&self) -> Option<String> {
        let failure = self.health.last_failure()?;
        let recent = failure.at.elapsed() < RECONNECT_BACKOFF;
        (recent && self.pool.state().connections == 0).then(|| failure.reason.to_string())
    }

    fn timed_out(&self, started: Instant) -> PoolError {
        let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if self.pool.state().connections > 0 {
            return PoolError::Exhausted {
                pool: self.name.to_string(),
                waited_ms,
            };
        }
        let reason = match self.health.last_failure() {
            Some(f) if f.at >= started => f.reason.to_string(),
            _ => format!(
                "no connection to {} could be established within {waited_ms} ms",
                self.target.addr()
            ),
        };
        self.unreachable(reason)
    }

    fn unreachable(&self, reason: String) -> PoolError {
        PoolError::Unreachable {
            pool: self.name.to_string(),
            reason,
        }
    }
}

/// Counts a checkout in progress for `PoolStats::pending_waiters`, also when cancelled.
struct WaiterGuard<'a>(&'a AtomicU64);

impl<'a> WaiterGuard<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        WaiterGuard(counter)
    }
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
