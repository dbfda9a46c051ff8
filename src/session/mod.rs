//! One client connection: handshake → JWT → route → checkout (with tenant context) → relay →
//! release. The per-session decisions live here; bytes move in `relay`.

mod audit_tap;
mod client;
mod filter;
mod handshake;
mod lifetime;
pub mod registry;
pub mod relay;
mod signals;
mod txn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::audit::{EventKind, SessionTotals};
use crate::auth::Identity;
use crate::cancel::CancelTarget;
use crate::config::UpstreamKind;
use crate::error::ClientError;
use crate::isolation::signed::{BackendIdentity, SignedContext};
use crate::metrics as m;
use crate::pool::PooledServer;
use crate::protocol::messages;
use crate::server::{Runtime, Shared};
use crate::tenant::DirectoryError;

pub use audit_tap::SessionAudit;
pub use client::ClientConn;
pub use handshake::StartupParams;

use handshake::{Hello, Refused};
use registry::{NewSession, SessionHandle};
use relay::{Relay, RelayEnd};

/// Serves one accepted TCP connection to its end. Never panics on client input; every
/// refusal is a FATAL ErrorResponse with a SQLSTATE.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let Ok(pre_auth) = shared.pre_auth.clone().try_acquire_owned() else {
        m_refused("pre_auth_limit");
        return;
    };
    // One snapshot for the whole session: a reload changes what later sessions get, never
    // this one's verifier, route, pool, guard or context.
    let rt = shared.runtime();
    let config = &rt.config;
    let hello = tokio::time::timeout(
        config.limits.auth_timeout,
        handshake::handshake(tcp, peer, config, shared.tls.clone()),
    )
    .await;
    let audit = shared.audit.as_deref();
    let (mut conn, params, token) = match hello {
        Err(_elapsed) => {
            m_auth_failure("timeout");
            if let Some(audit) = audit {
                audit_tap::auth_failure(audit, peer, None, &ClientError::AuthTimeout);
            }
            return;
        }
        Ok(Ok(Hello::Gone)) => return,
        Ok(Ok(Hello::Cancel(key))) => {
            shared.cancels.cancel(key, config.cluster.as_ref()).await;
            return;
        }
        Ok(Err(Refused { conn, error })) => {
            m_auth_failure(error.label());
            if let Some(audit) = audit {
                audit_tap::auth_failure(audit, peer, None, &error);
            }
            if let Some(mut conn) = conn {
                conn.send_error(&error).await;
            }
            return;
        }
        Ok(Ok(Hello::Session {
            conn,
            params,
            token,
        })) => (conn, params, token),
    };

    // No server connection is opened before the JWT verifies (design/reliability.md).
    let identity = match rt.verifier.verify_async(&token).await {
        Ok(id) => id,
        Err(e) => {
            let error = ClientError::from(e);
            m_auth_failure(error.label());
            if let Some(audit) = audit {
                audit_tap::auth_failure(audit, peer, Some(&token), &error);
            }
            debug!(peer = %peer, reason = error.label(), "authentication failed");
            conn.send_error(&error).await;
            return;
        }
    };
    drop(token);
    drop(pre_auth);
    let mut session_audit = shared
        .audit
        .clone()
        .map(|audit| SessionAudit::new(audit, &identity, peer, params.application_name.as_deref()));
    let Ok(_client_slot) = shared.clients.clone().try_acquire_owned() else {
        m_refused("too_many_clients");
        if let Some(a) = &session_audit {
            a.refused(EventKind::SessionRefused, &ClientError::TooManyClients);
        }
        conn.send_error(&ClientError::TooManyClients).await;
        return;
    };
    let console = &rt.config.console;
    if console.enabled && params.database == console.database {
        crate::console::serve(*conn, &identity, &shared, &rt, session_audit.as_ref()).await;
        return;
    }
    if let Err(error) = run_session(
        &mut conn,
        &params,
        &identity,
        &shared,
        &rt,
        session_audit.as_mut(),
    )
    .await
    {
        if !matches!(error, ClientError::ClientIo(_)) {
            conn.send_error(&error).await;
        }
    }
}

pub(crate) fn m_auth_failure(reason: &'static str) {
    metrics::counter!(m::AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
}

fn m_refused(reason: &'static str) {
    metrics::counter!(m::SESSIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
}

async fn run_session(
    conn: &mut ClientConn,
    params: &StartupParams,
    identity: &Identity,
    shared: &Shared,
    rt: &Runtime,
    mut audit: Option<&mut SessionAudit>,
) -> Result<(), ClientError> {
    let directory = rt.directory.as_deref();
    let resolved = crate::tenant::resolve(&rt.router, directory, &rt.config, &identity.tenant);
    let (route, pools) = match resolved.await {
        Ok(resolved) => (resolved.route, resolved.pools),
        Err(e) => {
            let error = ClientError::from(e);
            // Unknown or suspended tenants fail authentication; a directory that cannot
            // answer refuses the session.
            let kind = match &error {
                ClientError::Route(_) | ClientError::Directory(DirectoryError::Suspended) => {
                    m_auth_failure(error.label());
                    EventKind::AuthFailure
                }
                _ => {
                    m_refused(error.label());
                    EventKind::SessionRefused
                }
            };
            if let Some(a) = &audit {
                a.refused(kind, &error);
            }
            return Err(error);
        }
    };
    // A database described by the directory has a pool of its own.
    let pools = pools.as_deref().unwrap_or(&rt.pools);
    let upstream = route.upstream.clone();
    if let Some(a) = audit.as_mut() {
        a.set_upstream(&upstream);
        if let Err(error) = a.admit() {
            m_refused(error.label());
            a.refused(EventKind::SessionRefused, &error);
            return Err(error);
        }
    }
    let audit = audit.map(|a| &*a);
    let session = register(shared, identity, params, &upstream, conn.peer, audit).await?;

    // Settings applied with bind parameters before any client byte reaches the server:
    // the tenant context (shared upstreams) and the client's allow-listed parameters.
    let mut settings: Vec<(&str, &str)> = Vec::with_capacity(params.forwarded.len() + 1);
    if let (UpstreamKind::Shared, Some(setting)) = (route.kind, route.tenant_setting.as_deref()) {
        settings.push((setting, identity.tenant.as_str()));
    }
    // A multibyte client encoding such as SJIS lets SQL hide inside what the guard parses as
    // a string literal: guarded upstreams keep the server's UTF8.
    let guarded = rt.guards.contains_key(&*upstream);
    settings.extend(
        params
            .forwarded
            .iter()
            .filter(|(k, v)| {
                !(guarded && k.eq_ignore_ascii_case("client_encoding") && !is_utf8_name(v))
            })
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );

    // Transaction mode: a server connection per transaction (session/txn).
    if let Some(pool) = pools.txn(&upstream) {
        let tenant_pair = match (route.kind, route.tenant_setting.as_deref()) {
            (UpstreamKind::Shared, Some(setting)) => Some((setting, identity.tenant.as_str())),
            _ => None,
        };
        let skip = usize::from(tenant_pair.is_some());
        return txn::run(txn::Start {
            conn,
            identity,
            shared,
            rt,
            audit,
            session,
            upstream: upstream.clone(),
            pool: pool.clone(),
            settings: txn::ClientSettings::new(tenant_pair, &settings[skip..]),
        })
        .await;
    }
    let started = Instant::now();
    let mut server = match pools.checkout_ready(&upstream, &settings).await {
        Ok(server) => server,
        Err(e) => {
            let error = ClientError::from(e);
            m_refused(error.label());
            if let Some(a) = audit {
                a.refused(EventKind::SessionRefused, &error);
            }
            return Err(error);
        }
    };
    let context = rt.contexts.get(&*upstream).cloned();
    if let Some(ctx) = &context {
        if let Err(e) = enter_signed_context(ctx, &mut server, identity).await {
            metrics::counter!(m::CONTEXT_FAILURES_TOTAL, "upstream" => upstream.to_string(), "step" => "enter")
                .increment(1);
            warn!(upstream = %upstream, server = server.id, error = %e, "signed tenant context refused; destroying the server connection");
            server.broken = true;
            drop(server);
            let error = ClientError::Context(e);
            m_refused(error.label());
            if let Some(a) = audit {
                a.refused(EventKind::SessionRefused, &error);
            }
            return Err(error);
        }
    }
    let checkout_seconds = started.elapsed().as_secs_f64();
    session.entry.live.set_server(server.id, server.backend_pid);
    let deadline = lifetime::session_deadline(&rt.config.jwt, identity.expires_at);

    let key = shared.cancels.register();
    shared.cancels.set_target(
        key,
        Some(CancelTarget {
            addr: server.cancel_addr,
            pid: server.backend_pid,
            secret: server.backend_secret,
        }),
    );

    let tenant_label = m::tenant_label(identity.tenant.as_str());
    let labels = [
        ("tenant", tenant_label.clone()),
        ("upstream", upstream.to_string()),
    ];
    // Per tenant too (bounded by `[metrics] max_tenant_labels`): one tenant waiting on a
    // saturated pool shows up on its own.
    metrics::histogram!(m::POOL_CHECKOUT_SECONDS, &labels).record(checkout_seconds);
    metrics::counter!(m::SESSIONS_TOTAL, &labels).increment(1);
    let open = metrics::gauge!(m::CLIENT_CONNECTIONS, &labels);
    open.increment(1.0);
    info!(
        tenant = %identity.tenant, user = %identity.user, upstream = %upstream,
        peer = %conn.peer, application_name = params.application_name.as_deref().unwrap_or(""),
        server = server.id, "session started"
    );
    if let Some(a) = audit {
        a.session_start();
    }

    let filters = filter::SessionFilters::new(rt, &upstream, &tenant_label, audit);
    let chain = filters.chain();
    let filter = match chain.filters.len() {
        0 => None,
        1 => chain.filters.first().copied(),
        _ => Some(&chain as &dyn relay::ClientFilter),
    };
    let statement_audit = audit.filter(|a| a.statements());
    let on_statement = |done: relay::CompletedStatement| {
        if let Some(a) = statement_audit {
            a.statement(done);
        }
    };
    let started_relay = Instant::now();
    let mut signals = signals::Signals::new(shared.shutdown.clone(), Some(session.control.clone()));
    let result = greet_and_relay(
        conn,
        &mut server,
        key,
        shared,
        &labels,
        Inspect {
            filter,
            on_statement: statement_audit
                .map(|_| &on_statement as &(dyn Fn(relay::CompletedStatement) + Send + Sync)),
        },
        relay::Watches {
            signals: &mut signals,
            live: &session.entry.live,
            deadline,
        },
    )
    .await;

    // A killed session's query in flight is cancelled before its connection is destroyed:
    // a backend busy in a long statement would not notice the closed socket until it writes.
    if let Ok(RelayOutcome {
        end: RelayEnd::Killed(_),
        server_idle: false,
        ..
    }) = &result
    {
        // The key is this replica's own, so no peer list is needed.
        shared.cancels.cancel(key, None).await;
    }
    shared.cancels.remove(key);
    open.decrement(1.0);
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            release(server, false, context.as_deref()).await;
            m_ended(e.label());
            if let Some(a) = audit {
                a.session_end(totals(started_relay, Default::default()), e.label());
            }
            return Err(e);
        }
    };
    let stats = outcome.stats;
    record_relay_totals(&session, &upstream, stats);
    m_ended(end_label(&outcome.end));
    if let Some(a) = audit {
        a.session_end(totals(started_relay, stats), end_label(&outcome.end));
    }
    info!(
        tenant = %identity.tenant, upstream = %upstream, queries = stats.queries,
        client_bytes = stats.client_bytes, server_bytes = stats.server_bytes,
        end = ?outcome.end, "session ended"
    );
    // A killed session's server connection is destroyed even when idle: incident response
    // does not trust what the session may have left behind.
    let reusable =
        outcome.server_idle && !matches!(outcome.end, RelayEnd::ServerClosed | RelayEnd::Killed(_));
    release(server, reusable, context.as_deref()).await;
    drop(session);
    match outcome.end {
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

fn totals(started: Instant, stats: relay::RelayStats) -> SessionTotals {
    SessionTotals {
        duration: started.elapsed(),
        client_bytes: stats.client_bytes,
        server_bytes: stats.server_bytes,
        statements: stats.queries,
    }
}

/// How a session ended, for its audit event.
fn end_label(end: &RelayEnd) -> &'static str {
    match end {
        RelayEnd::Terminated => "terminated",
        RelayEnd::ClientClosed => "client_closed",
        RelayEnd::ClientViolation(e) => e.label(),
        RelayEnd::ServerClosed => "server_closed",
        RelayEnd::Shutdown => "shutdown",
        RelayEnd::Killed(_) => "killed",
        RelayEnd::Expired(why) => why.error().label(),
        RelayEnd::Detached => "detached",
        RelayEnd::Engage => "engage",
    }
}

fn m_ended(reason: &'static str) {
    metrics::counter!(m::SESSIONS_ENDED_TOTAL, "reason" => reason).increment(1);
}

/// Enters the session in the registry (refused while its tenant is suspended) and waits
/// while its tenant is paused.
async fn register(
    shared: &Shared,
    identity: &Identity,
    params: &StartupParams,
    upstream: &Arc<str>,
    peer: SocketAddr,
    audit: Option<&SessionAudit>,
) -> Result<SessionHandle, ClientError> {
    let refused = |error: ClientError| {
        m_refused(error.label());
        if let Some(a) = audit {
            a.refused(EventKind::SessionRefused, &error);
        }
        error
    };
    let mut session = shared
        .sessions
        .register(NewSession {
            tenant: identity.tenant.clone(),
            user: identity.user.clone(),
            upstream: upstream.clone(),
            peer,
            application_name: params.application_name.clone(),
            token_expires_at: identity.expires_at,
        })
        .map_err(refused)?;
    session
        .wait_runnable(&mut shared.shutdown.clone())
        .await
        .map_err(refused)?;
    Ok(session)
}

struct RelayOutcome {
    end: RelayEnd,
    /// The server connection was between requests when the relay ended.
    server_idle: bool,
    stats: relay::RelayStats,
}

/// What looks at the client's statements: the filter chain and the statement audit.
struct Inspect<'a> {
    filter: Option<&'a dyn relay::ClientFilter>,
    on_statement: Option<&'a (dyn Fn(relay::CompletedStatement) + Send + Sync)>,
}

/// Sends AuthenticationOk, the server's ParameterStatus values, pgtenant's BackendKeyData and
/// ReadyForQuery, then relays until the session ends.
async fn greet_and_relay(
    conn: &mut ClientConn,
    server: &mut PooledServer,
    key: crate::cancel::ClientKey,
    shared: &Shared,
    labels: &[(&'static str, String)],
    Inspect {
        filter,
        on_statement,
    }: Inspect<'_>,
    watches: relay::Watches<'_>,
) -> Result<RelayOutcome, ClientError> {
    let mut hello = BytesMut::with_capacity(512);
    messages::auth_ok(&mut hello);
    for (name, value) in &server.params {
        messages::parameter_status(&mut hello, name, value);
    }
    messages::backend_key_data(&mut hello, key.pid, key.secret);
    messages::ready_for_query(&mut hello, server.tx_status);
    conn.write_flush(&hello).await?;

    let queries = metrics::counter!(m::QUERIES_TOTAL, labels);
    let on_queries = &|n| queries.increment(n);
    let mut cycle = relay::Cycle::with_tracking(on_statement.is_some());
    cycle.query_seconds = Some(metrics::histogram!(m::QUERY_DURATION_SECONDS, labels));
    let mut relay = Relay {
        client: &mut conn.io,
        client_buf: &mut conn.read_buf,
        server,
        max_client_frame: conn.max_frame,
        cycle,
        stats: Default::default(),
        on_queries,
        filter,
        on_statement,
        watches: Some(watches),
        attach: None,
    };
    let end = relay.run(shared.shutdown.clone()).await;
    Ok(RelayOutcome {
        end,
        server_idle: relay.cycle.idle(),
        stats: relay.stats,
    })
}

/// Returns the server connection to its pool clean, or destroys it. Runs before the bb8
/// guard drops, since check-in is synchronous (design/protocol.md trap 8).
async fn release(mut server: PooledServer, reusable: bool, context: Option<&SignedContext>) {
    let outcome = if !reusable || server.broken || !server.read_buf.is_empty() {
        server.broken = true;
        "destroyed"
    } else if let Some(Err(e)) = leave_signed_context(context, &mut server).await {
        metrics::counter!(m::CONTEXT_FAILURES_TOTAL, "upstream" => server.upstream.to_string(), "step" => "leave")
            .increment(1);
        warn!(server = server.id, error = %e, "leaving the signed tenant context failed; destroying the server connection");
        server.broken = true;
        "destroyed"
    } else if server.reset().await.is_ok() {
        "reset"
    } else {
        warn!(
            server = server.id,
            "server connection could not be reset; destroying it"
        );
        server.broken = true;
        "destroyed"
    };
    metrics::counter!(m::SERVER_RESETS_TOTAL, "result" => outcome).increment(1);
}

/// Signs and applies the tenant context (bind parameters only); the backend identity is read
/// once per server connection and cached on it.
async fn enter_signed_context(
    ctx: &SignedContext,
    server: &mut PooledServer,
    identity: &Identity,
) -> Result<(), crate::pool::ServerError> {
    let mut cached = server.backend_start_micros.map(|micros| BackendIdentity {
        pid: server.backend_pid,
        backend_start_micros: micros,
    });
    let entered = ctx.pin(server, &mut cached, identity.tenant.as_str()).await;
    server.backend_start_micros = cached.map(|c| c.backend_start_micros);
    entered
}

/// `leave()` before the reset: DISCARD ALL does not clear the signed context.
async fn leave_signed_context(
    context: Option<&SignedContext>,
    server: &mut PooledServer,
) -> Option<Result<(), crate::pool::ServerError>> {
    match context {
        Some(ctx) => Some(ctx.leave(server).await),
        None => None,
    }
}

fn is_utf8_name(encoding: &str) -> bool {
    let e = encoding.trim().to_ascii_lowercase().replace(['-', '_'], "");
    e == "utf8" || e == "unicode"
}

/// A session's relayed bytes into the metrics (added once, at its end) and its final
/// counters into the registry; shared by session and transaction mode.
fn record_relay_totals(session: &SessionHandle, upstream: &str, stats: relay::RelayStats) {
    metrics::counter!(m::CLIENT_BYTES_TOTAL, "upstream" => upstream.to_string())
        .increment(stats.client_bytes);
    metrics::counter!(m::SERVER_BYTES_TOTAL, "upstream" => upstream.to_string())
        .increment(stats.server_bytes);
    session
        .entry
        .live
        .publish(stats.queries, stats.client_bytes, stats.server_bytes);
}
