//! The transaction-mode pool of one upstream (`pool_mode = "transaction"`): server
//! connections are lent per transaction, with tenant affinity, a per-tenant cap and fair
//! waiting (see `state` for the order of preference). bb8 cannot express affinity or
//! per-tenant fairness, so this pool is its own; it reuses `ServerConn` for connect,
//! authentication, TLS, reset and the idle liveness check.
//!
//! Isolation: a connection is handed out either carrying the same tenant's context (an
//! affinity hit), or carrying no tenant context at all (new, or reset with `DISCARD ALL`
//! here before it is handed out). It never reaches a client while it carries another
//! tenant's context or session state; the caller then applies the client's context.

mod state;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::checkout::{PoolError, PoolStats, RECONNECT_BACKOFF};
use super::manager::{ConnectErrorSink, Health};
use super::server_conn::ServerConn;
use super::target::UpstreamTarget;
use super::tls::ServerTls;
use crate::config::{SessionFeatures, UpstreamConfig};
use crate::metrics as m;

use state::{Grant, Idle, State};

/// The client settings a connection carries, as applied (`set_config` pairs, the tenant
/// setting first on shared upstreams). Compared by value for affinity.
pub type Settings = Arc<[(String, String)]>;

type Reply = oneshot::Sender<Grant<ServerConn, Settings>>;

/// A checkout gives up on connections that die during checks after this many tries.
const MAX_ATTEMPTS: u32 = 4;

/// How a lease was obtained (for metrics, and to know whether setup is needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// An idle connection already carrying this tenant's context.
    Affinity,
    /// An idle connection carrying no tenant context.
    Clean,
    /// A new connection.
    New,
    /// Another tenant's idle connection, reset with DISCARD ALL before use.
    Switched,
}

pub struct TxnPool {
    name: Arc<str>,
    target: Arc<UpstreamTarget>,
    tls: ServerTls,
    connect_timeout: Duration,
    checkout_timeout: Duration,
    idle_timeout: Duration,
    health: Arc<Health>,
    sink: ConnectErrorSink,
    state: Mutex<State<ServerConn, Settings, Reply>>,
    switches: metrics::Counter,
    affinity_hits: metrics::Counter,
    session_features: SessionFeatures,
}

impl std::fmt::Debug for TxnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnPool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A server connection lent to one client for (at least) one transaction. Dropping it
/// returns the connection to the pool if it is clean (not `dirty`, not broken, idle, no
/// unread bytes), tagged with `carried`; otherwise the connection is destroyed.
pub struct TxnLease {
    conn: Option<ServerConn>,
    pool: Arc<TxnPool>,
    tenant: Arc<str>,
    /// The tenant context and settings the connection carries now; `None`: none at all.
    /// Whoever changes them on the connection keeps this current.
    pub carried: Option<Settings>,
    /// The connection holds session state beyond `carried` (a pinned client's temp tables,
    /// LISTEN, ...): it is destroyed at drop unless `reset` cleans it first.
    pub dirty: bool,
    pub acquired: Acquired,
    /// Time spent waiting in the queue and preparing the connection.
    pub waited: Duration,
}

impl std::fmt::Debug for TxnLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnLease")
            .field("conn", &self.conn)
            .field("tenant", &self.tenant)
            .field("acquired", &self.acquired)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for TxnLease {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("lease holds its connection until drop")
    }
}

impl std::ops::DerefMut for TxnLease {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("lease holds its connection until drop")
    }
}

impl TxnLease {
    /// ROLLBACK if needed and DISCARD ALL: afterwards the connection carries nothing and may
    /// go back to the pool. On failure it stays marked broken and is destroyed at drop.
    pub async fn reset(&mut self) -> Result<(), super::ServerError> {
        self.carried = None;
        self.reset_inner().await?;
        self.dirty = false;
        Ok(())
    }

    async fn reset_inner(&mut self) -> Result<(), super::ServerError> {
        let conn = &mut **self;
        conn.reset().await
    }
}

impl Drop for TxnLease {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let clean =
            !self.dirty && !conn.broken && conn.read_buf.is_empty() && conn.tx_status == b'I';
        let idle = clean.then(|| Idle {
            conn,
            carried: self.carried.take().map(|s| (self.tenant.clone(), s)),
            since: Instant::now(),
        });
        self.pool.check_in(&self.tenant, idle);
    }
}

impl TxnPool {
    pub(crate) fn build(
        name: Arc<str>,
        up: &UpstreamConfig,
        target: Arc<UpstreamTarget>,
        tls: ServerTls,
        health: Arc<Health>,
    ) -> TxnPool {
        let sink = ConnectErrorSink::new(name.clone(), target.addr().into(), health.clone());
        TxnPool {
            switches: metrics::counter!(m::POOL_TENANT_SWITCHES_TOTAL, "upstream" => name.to_string()),
            affinity_hits: metrics::counter!(m::POOL_AFFINITY_HITS_TOTAL, "upstream" => name.to_string()),
            name,
            target,
            tls,
            connect_timeout: up.connect_timeout,
            checkout_timeout: up.checkout_timeout,
            idle_timeout: up.idle_timeout,
            health,
            sink,
            state: Mutex::new(State::new(up.pool_size, up.tenant_cap())),
            session_features: up.session_features,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// What a session-only feature does in this pool's sessions.
    pub fn session_features(&self) -> SessionFeatures {
        self.session_features
    }

    /// Deadline for a settings round trip on a connection of this pool.
    pub fn setup_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// A connection for `tenant`, waiting up to `checkout_timeout` in the fair queue.
    ///
    /// Errors: `TenantExhausted` (53300, names the tenant) after the wait; `Unreachable` when
    /// a connect fails (at once within `RECONNECT_BACKOFF` of a failure while nothing is
    /// connected). Dead idle connections are destroyed and replaced transparently.
    /// Cancel-safe: a cancelled wait leaves the queue and returns anything it was granted.
    pub async fn checkout(self: &Arc<Self>, tenant: &Arc<str>) -> Result<TxnLease, PoolError> {
        let started = Instant::now();
        let deadline = started + self.checkout_timeout;
        let mut last_error = String::new();
        for _ in 0..MAX_ATTEMPTS {
            let grant = self.wait_grant(tenant, started, deadline).await?;
            match self.prepare(tenant, grant).await {
                Ok(mut lease) => {
                    lease.waited = started.elapsed();
                    if lease.acquired == Acquired::Affinity {
                        self.affinity_hits.increment(1);
                    }
                    return Ok(lease);
                }
                Err(Retry::Fail(e)) => return Err(e),
                Err(Retry::Again(why)) => last_error = why,
            }
        }
        Err(PoolError::Unreachable {
            pool: self.name.to_string(),
            reason: format!(
                "{MAX_ATTEMPTS} server connections failed their checks, last: {last_error}"
            ),
        })
    }

    /// A grant, at once or from the queue.
    async fn wait_grant(
        &self,
        tenant: &Arc<str>,
        started: Instant,
        deadline: Instant,
    ) -> Result<Grant<ServerConn, Settings>, PoolError> {
        let (rx, id) = {
            let mut state = self.lock();
            if let Some(failure) = self.health.last_failure() {
                if state.open == 0 && failure.at.elapsed() < RECONNECT_BACKOFF {
                    return Err(self.unreachable(failure.reason.to_string()));
                }
            }
            if let Some(grant) = state.try_take(tenant) {
                return Ok(grant);
            }
            let (tx, rx) = oneshot::channel();
            (rx, state.enqueue(tenant, tx))
        };
        let mut waiting = Waiting {
            pool: self,
            tenant,
            id,
            rx: Some(rx),
        };
        let rx = waiting.rx.as_mut().expect("set above");
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(Ok(grant)) => {
                waiting.rx = None;
                Ok(grant)
            }
            // The sender is only dropped with the pool; treat it as a timeout.
            Ok(Err(_)) | Err(_) => {
                drop(waiting);
                let state = self.lock();
                Err(PoolError::TenantExhausted {
                    pool: self.name.to_string(),
                    tenant: tenant.to_string(),
                    waited_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    held: state.held(tenant),
                    cap: state.tenant_cap,
                })
            }
        }
    }

    /// Turns a grant into a usable lease: liveness check, age check, switch reset, or connect.
    async fn prepare(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        grant: Grant<ServerConn, Settings>,
    ) -> Result<TxnLease, Retry> {
        let mut lease = TxnLease {
            conn: None,
            pool: self.clone(),
            tenant: tenant.clone(),
            carried: None,
            dirty: false,
            acquired: Acquired::New,
            waited: Duration::ZERO,
        };
        let idle = match grant {
            Grant::Open => {
                // The slot is released if the connect fails or is cancelled: a lease without
                // a connection does nothing at drop.
                let slot = OpenSlot {
                    pool: self,
                    tenant,
                    armed: true,
                };
                let connected = ServerConn::connect(
                    self.name.clone(),
                    &self.target,
                    &self.tls,
                    self.connect_timeout,
                )
                .await;
                match connected {
                    Ok(conn) => {
                        slot.disarm();
                        self.health_ok();
                        lease.conn = Some(conn);
                        return Ok(lease);
                    }
                    Err(e) => {
                        drop(slot);
                        let reason = e.to_string();
                        bb8::ErrorSink::sink(&self.sink, e);
                        return Err(Retry::Fail(self.unreachable(reason)));
                    }
                }
            }
            Grant::Idle(idle) => idle,
        };
        let expired = !self.idle_timeout.is_zero() && idle.since.elapsed() > self.idle_timeout;
        let (same, carried) = match idle.carried {
            Some((t, s)) => (&t == tenant, Some(s)),
            None => (false, None),
        };
        lease.conn = Some(idle.conn);
        if expired {
            lease.dirty = true;
            return Err(Retry::Again("idle connection past idle_timeout".into()));
        }
        if let Err(e) = lease.check_idle().await {
            return Err(Retry::Again(e.to_string()));
        }
        if same {
            lease.carried = carried;
            lease.acquired = Acquired::Affinity;
        } else if carried.is_none() {
            lease.acquired = Acquired::Clean;
        } else {
            // Another tenant's connection: DISCARD ALL before anything of this tenant's
            // reaches it (temp tables, prepared statements, cursors, advisory locks,
            // settings including the tenant setting, LISTEN). Only a confirmed reset lets
            // it through; a failed one destroys it.
            lease
                .reset()
                .await
                .map_err(|e| Retry::Again(e.to_string()))?;
            lease.acquired = Acquired::Switched;
            self.switches.increment(1);
        }
        Ok(lease)
    }

    fn health_ok(&self) {
        self.health.record_success();
    }

    /// A lease ends (or a grant is abandoned): the connection goes idle or is destroyed, and
    /// the freed capacity goes to waiters.
    fn check_in(&self, tenant: &str, idle: Option<Idle<ServerConn, Settings>>) {
        let mut state = self.lock();
        state.check_in(tenant, idle);
        Self::deliver(&mut state);
    }

    /// Hands out what can be granted now, under the lock (so a waiter's cleanup sees either
    /// its queue entry or the grant in its channel, never neither).
    fn deliver(state: &mut MutexGuard<'_, State<ServerConn, Settings, Reply>>) {
        for (tx, grant, tenant) in state.dispatch() {
            if let Err(grant) = tx.send(grant) {
                state.undo(&tenant, grant);
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.lock();
        PoolStats {
            name: self.name.clone(),
            size: state.size,
            connections: state.open,
            idle: u32::try_from(state.idle.len()).unwrap_or(u32::MAX),
            pending_waiters: state.waiting() as u64,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<ServerConn, Settings, Reply>> {
        // A panic under this lock cannot leave the counts half-updated in a way that matters
        // more than stopping the pool would; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unreachable(&self, reason: String) -> PoolError {
        PoolError::Unreachable {
            pool: self.name.to_string(),
            reason,
        }
    }
}

/// A reserved slot for a connection being opened; released at drop unless disarmed.
struct OpenSlot<'a> {
    pool: &'a TxnPool,
    tenant: &'a str,
    armed: bool,
}

impl OpenSlot<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.check_in(self.tenant, None);
        }
    }
}

enum Retry {
    /// The connection died during its checks: try another.
    Again(String),
    Fail(PoolError),
}

/// A queued checkout. Dropped before it was served (timeout, cancellation), it leaves the
/// queue, or gives back the grant that raced in.
struct Waiting<'a> {
    pool: &'a TxnPool,
    tenant: &'a Arc<str>,
    id: u64,
    rx: Option<oneshot::Receiver<Grant<ServerConn, Settings>>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut state = self.pool.lock();
        if state.cancel(self.tenant, self.id) {
            return;
        }
        if let Ok(grant) = rx.try_recv() {
            state.undo(self.tenant, grant);
            TxnPool::deliver(&mut state);
        }
    }
}

#[cfg(test)]
mod tests;
