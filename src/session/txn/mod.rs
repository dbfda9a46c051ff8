//! Transaction mode (`pool_mode = "transaction"`): the session holds a server connection
//! only from its next request until the server is idle again outside a transaction.
//!
//! The invariant, restated for this mode: before a client's request reaches a server
//! connection, that connection carries exactly this client's tenant context. How:
//! - the pool hands out a connection that carries this tenant's context (affinity) or no
//!   tenant context at all (new, or reset with a confirmed `DISCARD ALL` when it served
//!   another tenant) — never another tenant's;
//! - unless it already carries exactly this client's settings, pgtenant's setup
//!   (`RESET ALL` when it carries other settings, then `set_config` of the tenant setting and
//!   the client's settings, bind parameters only) goes out in the same write, before the
//!   client's frames; its answers are consumed and checked (no error, and the tenant setting
//!   reads back as the tenant) before any answer reaches the client;
//! - a failed setup destroys the connection and ends the session. The client's frames that
//!   followed may have run, but only on a connection that carried no tenant context (new or
//!   DISCARDed: RLS policies see no tenant) or this same tenant's: never another tenant's.
//!
//! Session-only features pin the session to its connection (or are refused), see
//! `features`; the pinned connection is reset with DISCARD ALL when the session ends.

mod client_state;
pub mod features;
mod wait;

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tracing::{info, warn};

use crate::cancel::{CancelSlot, CancelTarget, ClientKey};
use crate::error::ClientError;
use crate::metrics as m;
use crate::pool::{PoolError, TxnLease, TxnPool};
use crate::prepared::{Counters, PreparedStatements, ServerStatements};
use crate::protocol::messages;

use super::registry::{Control, SessionHandle, SessionState};
use super::relay::{self, Attach, Relay, RelayEnd};
use super::signals::{Signal, Signals};
use super::{end_label, filter, lifetime, m_ended, m_refused, totals, ClientConn, SessionAudit};
use crate::audit::EventKind;
use crate::auth::Identity;
use crate::server::{Runtime, Shared};

pub use client_state::{ClientSettings, FeatureFilter};
use features::{Feature, SettingChange};

/// Everything `run` needs from `run_session`.
pub(super) struct Start<'a> {
    pub conn: &'a mut ClientConn,
    pub identity: &'a Identity,
    pub shared: &'a Shared,
    pub rt: &'a Runtime,
    pub audit: Option<&'a SessionAudit>,
    pub session: SessionHandle,
    pub upstream: Arc<str>,
    pub pool: Arc<TxnPool>,
    pub settings: ClientSettings,
}

/// The session in transaction mode, from its first server connection (which validates the
/// settings and provides the greeting's ParameterStatus values) to its end.
pub(super) async fn run(start: Start<'_>) -> Result<(), ClientError> {
    let Start {
        conn,
        identity,
        shared,
        rt,
        audit,
        session,
        upstream,
        pool,
        mut settings,
    } = start;
    let tenant: Arc<str> = identity.tenant.as_str().into();
    let started = Instant::now();
    let first = match first_lease(&pool, &tenant, &mut settings).await {
        Ok(lease) => lease,
        Err(error) => {
            m_refused(error.label());
            if let Some(a) = audit {
                a.refused(EventKind::SessionRefused, &error);
            }
            return Err(error);
        }
    };
    let tenant_label = m::tenant_label(identity.tenant.as_str());
    let labels = [
        ("tenant", tenant_label.clone()),
        ("upstream", upstream.to_string()),
    ];
    metrics::histogram!(m::POOL_CHECKOUT_SECONDS, &labels).record(started.elapsed().as_secs_f64());
    metrics::counter!(m::SESSIONS_TOTAL, &labels).increment(1);
    let open = metrics::gauge!(m::CLIENT_CONNECTIONS, &labels);
    open.increment(1.0);
    info!(
        tenant = %identity.tenant, user = %identity.user, upstream = %upstream,
        peer = %conn.peer, server = first.id, pool_mode = "transaction", "session started"
    );
    if let Some(a) = audit {
        a.session_start();
    }
    let key = shared.cancels.register();
    let deadline = lifetime::session_deadline(&rt.config.jwt, identity.expires_at);

    let features = FeatureFilter::new(pool.session_features(), &upstream);
    let filters = filter::SessionFilters::new(rt, &upstream, &tenant_label, audit);
    let mut chain = filters.chain();
    // Last: a statement the guard refuses must not pin or change tracked settings.
    chain.filters.push(&features);
    let statement_audit = audit.filter(|a| a.statements());
    let on_statement = |done: relay::CompletedStatement| {
        if let Some(a) = statement_audit {
            a.statement(done);
        }
    };
    let queries = metrics::counter!(m::QUERIES_TOTAL, &labels);
    let mut cycle = relay::Cycle::with_tracking(statement_audit.is_some());
    cycle.query_seconds = Some(metrics::histogram!(m::QUERY_DURATION_SECONDS, &labels));
    let mut ctx = Loop {
        conn,
        shared,
        key,
        cancel_slot: shared.cancels.slot(key),
        pool: &pool,
        tenant: &tenant,
        settings,
        features: &features,
        filter: &chain,
        on_statement: statement_audit
            .map(|_| &on_statement as &(dyn Fn(relay::CompletedStatement) + Send + Sync)),
        on_queries: &|n| queries.increment(n),
        wait_seconds: metrics::histogram!(m::POOL_WAIT_SECONDS, &labels),
        session: &session,
        deadline,
        cycle: Some(cycle),
        stats: Default::default(),
        prepared: PreparedStatements::new(&rt.config.prepared_statements),
        prepared_engaged: false,
        signals: Signals::new(shared.shutdown.clone(), Some(session.control.clone())),
        max_server_statements: rt.config.prepared_statements.max_server_prepared_statements,
        prepared_metrics: PreparedMetrics::new(&upstream),
    };
    let started_relay = Instant::now();
    let result = ctx.serve(first).await;
    shared.cancels.remove(key);
    open.decrement(1.0);
    let label = record_end(
        &session,
        audit,
        &upstream,
        ctx.stats,
        started_relay,
        &result,
    );
    info!(tenant = %identity.tenant, upstream = %upstream, queries = ctx.stats.queries, end = label, "session ended");
    drop(session);
    match result? {
        RelayEnd::ClientViolation(e) => Err(e),
        RelayEnd::Shutdown => Err(ClientError::ShuttingDown),
        RelayEnd::Killed(reason) => Err(ClientError::Killed(reason.to_string())),
        RelayEnd::Expired(why) => Err(why.error()),
        RelayEnd::ServerClosed => Err(ClientError::ServerLost),
        RelayEnd::Terminated | RelayEnd::ClientClosed | RelayEnd::Detached | RelayEnd::Engage => {
            Ok(())
        }
    }
}

/// Byte counters, live stats, the end metric and the audit event; returns the end label.
fn record_end(
    session: &SessionHandle,
    audit: Option<&SessionAudit>,
    upstream: &str,
    stats: relay::RelayStats,
    started: Instant,
    result: &Result<RelayEnd, ClientError>,
) -> &'static str {
    super::record_relay_totals(session, upstream, stats);
    let label = match result {
        Ok(end) => end_label(end),
        Err(e) => e.label(),
    };
    m_ended(label);
    if let Some(a) = audit {
        a.session_end(totals(started, stats), label);
    }
    label
}

/// The session's first connection, with its settings applied in a round trip (so a bad
/// setting fails the session before it starts, as in session mode).
async fn first_lease(
    pool: &Arc<TxnPool>,
    tenant: &Arc<str>,
    settings: &mut ClientSettings,
) -> Result<TxnLease, ClientError> {
    let mut lease = pool.checkout(tenant).await?;
    let want = settings.snapshot();
    if lease.carried.as_ref() == Some(&want) {
        return Ok(lease);
    }
    let applied = async {
        if lease.carried.is_some() {
            lease.simple_query("RESET ALL").await?;
        }
        let pairs: Vec<(&str, &str)> = want.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        lease.apply_settings(&pairs).await
    };
    let timeout = pool.setup_timeout();
    let result = tokio::time::timeout(timeout, applied).await;
    lease.carried = None;
    match result {
        Ok(Ok(())) => {
            lease.carried = Some(want);
            Ok(lease)
        }
        Ok(Err(source)) => {
            lease.dirty = true;
            Err(ClientError::Pool(PoolError::Setup {
                pool: pool.name().to_string(),
                source,
            }))
        }
        Err(_) => {
            lease.dirty = true;
            Err(ClientError::Pool(PoolError::Unreachable {
                pool: pool.name().to_string(),
                reason: format!("no answer to the session settings within {timeout:?}"),
            }))
        }
    }
}

/// The tracked-parameter changes a transaction really made, read back from the server
/// connection it ran on (idle, outside a transaction): a `SET` in a rolled-back
/// transaction or one that failed leaves nothing to re-apply. Falls back to the changes as
/// parsed when the read-back fails (the connection is then marked broken and destroyed).
async fn confirm_changes(
    lease: &mut TxnLease,
    parsed: Vec<SettingChange>,
    timeout: std::time::Duration,
) -> Vec<SettingChange> {
    let Some(names) = client_state::read_back_names(&parsed) else {
        return parsed;
    };
    let rows = tokio::time::timeout(
        timeout,
        lease.query_rows(client_state::READ_BACK_SQL, &[TEXT_ARRAY_OID], &[&names]),
    )
    .await;
    match rows {
        Ok(Ok(rows)) => match client_state::read_back_changes(&rows) {
            Some(mut confirmed) => {
                // RESET ALL also drops client settings that are not tracked parameters.
                if parsed.contains(&SettingChange::ResetAll) {
                    confirmed.insert(0, SettingChange::ResetAll);
                }
                // A name with no row is not a parameter of this server: nothing to keep.
                for change in &parsed {
                    if let SettingChange::Set(name, _) | SettingChange::Reset(name) = change {
                        let found = confirmed.iter().any(|c| {
                            matches!(c, SettingChange::Set(n, _) | SettingChange::Reset(n) if n == name)
                        });
                        if !found {
                            confirmed.push(SettingChange::Reset(name.clone()));
                        }
                    }
                }
                confirmed
            }
            None => {
                lease.broken = true;
                parsed
            }
        },
        Ok(Err(e)) => {
            warn!(server = lease.id, error = %e, "reading back the client's settings failed");
            lease.broken = true;
            parsed
        }
        Err(_) => {
            lease.broken = true;
            parsed
        }
    }
}

/// `text[]`, the type of `READ_BACK_SQL`'s parameter.
const TEXT_ARRAY_OID: u32 = 1009;

/// The per-session state of the attach/detach loop.
struct Loop<'a> {
    conn: &'a mut ClientConn,
    shared: &'a Shared,
    key: ClientKey,
    /// Where `key` points (repointed on every attach).
    cancel_slot: Arc<CancelSlot>,
    pool: &'a Arc<TxnPool>,
    tenant: &'a Arc<str>,
    settings: ClientSettings,
    features: &'a FeatureFilter<'a>,
    filter: &'a dyn relay::ClientFilter,
    on_statement: Option<&'a (dyn Fn(relay::CompletedStatement) + Send + Sync)>,
    on_queries: &'a (dyn Fn(u64) + Send + Sync),
    wait_seconds: metrics::Histogram,
    session: &'a SessionHandle,
    deadline: Option<(tokio::time::Instant, lifetime::Expiry)>,
    /// Kept across attachments (pending answers, the statement tracker).
    cycle: Option<relay::Cycle>,
    stats: relay::RelayStats,
    /// The client's named statements (kept across attachments; each connection has its own
    /// `ServerConn::prepared`).
    prepared: PreparedStatements,
    /// The client sent a frame that needs `prepared` (until then its frames are relayed
    /// unchanged: the layer costs CPU on every message, see `relay::engage`).
    prepared_engaged: bool,
    /// Shutdown and the console, watched by the waiter and the relay in turn.
    signals: Signals,
    max_server_statements: usize,
    prepared_metrics: PreparedMetrics,
}

/// `pgtenant_prepared_statements_*` of this session's upstream.
struct PreparedMetrics {
    reparsed: metrics::Counter,
    evicted: metrics::Counter,
    hits: metrics::Counter,
}

impl PreparedMetrics {
    fn new(upstream: &str) -> Self {
        PreparedMetrics {
            reparsed: metrics::counter!(m::PREPARED_REPARSED_TOTAL, "upstream" => upstream.to_string()),
            evicted: metrics::counter!(m::PREPARED_EVICTED_TOTAL, "upstream" => upstream.to_string()),
            hits: metrics::counter!(m::PREPARED_CACHE_HITS_TOTAL, "upstream" => upstream.to_string()),
        }
    }

    fn emit(&self, c: Counters) {
        for (counter, n) in [
            (&self.reparsed, c.reparsed),
            (&self.evicted, c.evicted),
            (&self.hits, c.hits),
        ] {
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

impl Loop<'_> {
    /// Greets the client on the first connection, then attaches a connection per
    /// transaction until the session ends.
    async fn serve(&mut self, first: TxnLease) -> Result<RelayEnd, ClientError> {
        let mut hello = BytesMut::with_capacity(512);
        messages::auth_ok(&mut hello);
        for (name, value) in &first.params {
            messages::parameter_status(&mut hello, name, value);
        }
        messages::backend_key_data(&mut hello, self.key.pid, self.key.secret);
        messages::ready_for_query(&mut hello, b'I');
        // The first connection goes back before the client says anything: an idle client
        // holds no server connection.
        drop(first);
        self.conn.write_flush(&hello).await?;
        let mut waiter = wait::Waiter::new(self.deadline);
        loop {
            // No server buffers are held while detached; the client buffer (also the
            // handshake's, before the first request) is freed too when empty (memory per
            // idle client; `wait` reads the next request's first bytes on the stack).
            if self.conn.read_buf.is_empty() {
                self.conn.read_buf = BytesMut::new();
            }
            let live = &self.session.entry.live;
            live.set_server(0, 0);
            if let Err(end) = waiter
                .next_request(self.conn, live, &mut self.signals)
                .await
            {
                return Ok(end);
            }
            live.set_state(SessionState::Waiting);
            let mut lease = match self.checkout().await? {
                Ok(lease) => lease,
                Err(end) => return Ok(end),
            };
            self.wait_seconds.record(lease.waited.as_secs_f64());
            let end = loop {
                let (end, back) = self.attach(lease).await;
                lease = back;
                if !matches!(end, RelayEnd::Engage) {
                    break end;
                }
                // The client named a statement: from here on its frames go through the
                // named-statement layer, starting on this same connection.
                self.prepared_engaged = true;
            };
            if !matches!(end, RelayEnd::Detached) {
                self.finish(lease, &end).await;
                return Ok(end);
            }
            drop(lease);
        }
    }

    /// A server connection for the client's pending request. While it waits in the pool's
    /// queue (up to `checkout_timeout`) the session still obeys KILL and shutdown; PAUSE
    /// needs nothing here (the relay holds the request at once when attached).
    async fn checkout(&mut self) -> Result<Result<TxnLease, RelayEnd>, ClientError> {
        let checkout = self.pool.checkout(self.tenant);
        tokio::pin!(checkout);
        loop {
            tokio::select! {
                biased;
                lease = &mut checkout => return Ok(Ok(lease?)),
                signal = self.signals.next() => match signal {
                    Signal::Shutdown => return Ok(Err(RelayEnd::Shutdown)),
                    Signal::Control(Control::Kill(reason)) => {
                        return Ok(Err(RelayEnd::Killed(reason)))
                    }
                    Signal::Control(Control::Paused | Control::Run) => {}
                },
            }
        }
    }

    /// Relays one attachment: the setup (when needed) goes out with the client's frames.
    async fn attach(&mut self, mut lease: TxnLease) -> (RelayEnd, TxnLease) {
        let setup = self.settings.setup_for(lease.carried.as_ref());
        let setup_sent = setup.is_some();
        // Until the setup is confirmed the connection's settings are unknown: a failure
        // destroys it (`dirty`), a success sets `carried` below.
        if setup_sent {
            lease.carried = None;
            lease.dirty = true;
        }
        self.cancel_slot.set(Some(CancelTarget {
            addr: lease.cancel_addr,
            pid: lease.backend_pid,
            secret: lease.backend_secret,
        }));
        let live = &self.session.entry.live;
        live.set_server(lease.id, lease.backend_pid);
        let features = self.features;
        let pinned = move || features.pinned();
        let pin_unsynced = move || features.pin(Feature::NamedMidCycle);
        // The connection's statements travel with it through the pool (emptied whenever it
        // is reset with DISCARD ALL, i.e. on every tenant switch).
        let max_server = self.max_server_statements;
        lease
            .prepared
            .get_or_insert_with(|| ServerStatements::new(max_server));
        let mut relay = Relay {
            client: &mut self.conn.io,
            client_buf: &mut self.conn.read_buf,
            server: &mut lease,
            max_client_frame: self.conn.max_frame,
            cycle: self.cycle.take().unwrap_or_default(),
            stats: self.stats,
            on_queries: self.on_queries,
            filter: Some(self.filter),
            on_statement: self.on_statement,
            watches: Some(relay::Watches {
                signals: &mut self.signals,
                live,
                deadline: self.deadline,
            }),
            attach: Some(Attach {
                setup,
                pinned: &pinned,
                prepared: self.prepared_engaged.then_some(&mut self.prepared),
                lazy: Some(&pin_unsynced),
            }),
        };
        let end = relay.run(self.shared.shutdown.clone()).await;
        let cycle_idle = relay.cycle.idle();
        self.cycle = Some(relay.cycle);
        self.stats = relay.stats;
        // Owed statement answers mean the connection is mid-request, like a busy cycle.
        let idle = cycle_idle && self.prepared.idle();
        self.prepared_metrics.emit(self.prepared.take_counters());
        if matches!(end, RelayEnd::Killed(_)) && !idle {
            // As in session mode: a killed session's query in flight is cancelled before
            // its connection is destroyed.
            self.shared.cancels.cancel(self.key, None).await;
        }
        self.cancel_slot.set(None);
        // Stopped to engage the named-statement layer, possibly inside a transaction: the
        // SETs seen so far are settled at the next detach (the same connection goes on).
        if !matches!(end, RelayEnd::Engage) {
            let changes = self.features.take_changes();
            let changes = match end {
                RelayEnd::Detached if !changes.is_empty() => {
                    confirm_changes(&mut lease, changes, self.pool.setup_timeout()).await
                }
                _ => changes,
            };
            for change in changes {
                self.settings.apply(change);
            }
        }
        if lease.broken {
            // The read-back failed: the connection's state is unknown.
            lease.dirty = true;
        } else if matches!(end, RelayEnd::Detached | RelayEnd::Engage) {
            // Detached (or stopped to engage the named-statement layer) only after the
            // setup's answers were consumed and checked, and the client's tracked SETs ran on
            // this connection: it carries the client's current settings now. (Never pinned:
            // a pinned session does not detach.)
            lease.carried = Some(self.settings.snapshot());
            lease.dirty = false;
        } else if setup_sent {
            // Ended before (or without) a confirmed setup: its answers may still be in
            // flight, so no reset round trip could be trusted. Destroy it.
            lease.dirty = true;
            lease.broken = true;
        } else if idle {
            lease.carried = Some(self.settings.snapshot());
            lease.dirty = features.pinned();
        } else {
            lease.dirty = true;
        }
        (end, lease)
    }

    /// The session ends while attached: keep a clean connection (a pinned one after DISCARD
    /// ALL), destroy anything doubtful.
    async fn finish(&mut self, mut lease: TxnLease, end: &RelayEnd) {
        let idle = self.cycle.as_ref().is_some_and(relay::Cycle::idle) && self.prepared.idle();
        let reusable = idle
            && !matches!(
                end,
                RelayEnd::ServerClosed | RelayEnd::Killed(_) | RelayEnd::ClientViolation(_)
            );
        if !reusable {
            lease.dirty = true;
            lease.broken = true;
            return;
        }
        if lease.dirty {
            if let Err(e) = lease.reset().await {
                warn!(server = lease.id, error = %e, "pinned server connection could not be reset; destroying it");
            }
        }
    }
}
