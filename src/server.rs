//! The listener: shared state, accept loop, admin endpoint, graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::auth::JwtVerifier;
use crate::cancel::CancelRegistry;
use crate::config::{Config, ContextMode, TlsMode, UpstreamKind};
use crate::isolation::guard::{Guard, GuardConfig};
use crate::isolation::signed::SignedContext;
use crate::pool::Pools;
use crate::tenant::Router;

/// State every session reads. Config and routing are snapshots swapped whole on reload.
pub struct Shared {
    config: ArcSwap<Config>,
    router: ArcSwap<Router>,
    pub verifier: JwtVerifier,
    pub pools: Pools,
    /// Signed tenant contexts of the upstreams with `context = "signed"`, by upstream name.
    pub contexts: HashMap<String, Arc<SignedContext>>,
    /// SQL guards of the shared upstreams with `guard = true`, by upstream name.
    pub guards: HashMap<String, Arc<Guard>>,
    pub cancels: CancelRegistry,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub pre_auth: Arc<Semaphore>,
    pub clients: Arc<Semaphore>,
    pub shutdown: watch::Receiver<bool>,
    /// The audit trail, when `[audit]` is configured.
    pub audit: Option<Arc<crate::audit::Audit>>,
}

impl Shared {
    /// The config snapshot for one session or request; read once, not per message.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn router(&self) -> Arc<Router> {
        self.router.load_full()
    }
}

/// A running proxy: its bound addresses and a way to stop it.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl ProxyHandle {
    /// Stops accepting; sessions end at their next idle point with 57P01.
    pub fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Shuts down: stops accepting, then waits up to `limits.shutdown_timeout` for sessions
    /// to reach an idle point outside a transaction (they get 57P01 there).
    pub async fn stop(self) {
        self.shutdown();
        let _ = self.accept_task.await;
        let config = self.shared.config();
        let all = u32::try_from(config.limits.max_client_connections).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(
            config.limits.shutdown_timeout,
            self.shared.clients.acquire_many(all),
        )
        .await;
        if drained.is_err() {
            warn!(
                open = all as usize - self.shared.clients.available_permits(),
                "shutdown deadline passed with sessions still open; closing them"
            );
        }
        close_audit(&self.shared, config.limits.shutdown_timeout).await;
    }
}

/// Spools every queued audit event and ships what the deadline allows; the rest stays in the
/// spool for the next start.
async fn close_audit(shared: &Shared, deadline: std::time::Duration) {
    if let Some(audit) = &shared.audit {
        if audit.close(deadline).await {
            info!("audit trail flushed");
        } else {
            warn!("audit events remain in the spool; they are shipped at the next start");
        }
    }
}

/// Binds the listeners and starts serving in the background.
pub async fn spawn(config: Config) -> anyhow::Result<ProxyHandle> {
    crate::tls::install_crypto_provider();
    let metrics_handle = crate::metrics::install();
    crate::metrics::configure(&config.metrics);
    let verifier = JwtVerifier::from_config(&config.jwt).context("[jwt]")?;
    verifier.self_test().context("JWT crypto self-test")?;
    let tls = match (
        &config.listen.tls_cert,
        &config.listen.tls_key,
        config.listen.tls,
    ) {
        (_, _, TlsMode::Disable) => None,
        (Some(cert), Some(key), _) => {
            Some(crate::tls::acceptor(cert, key).context("[listen] TLS")?)
        }
        _ => None,
    };
    let pools = Pools::from_config(&config).context("[upstreams]")?;
    let mut contexts = HashMap::new();
    let mut guards = HashMap::new();
    for (name, up) in &config.upstreams {
        if up.kind == UpstreamKind::Shared && up.guard {
            let rules = GuardConfig {
                tenant_setting: up.tenant_setting.clone(),
                ..up.guard_rules.clone()
            };
            guards.insert(name.clone(), Arc::new(Guard::new(rules)));
        }
        if let (ContextMode::Signed, Some(signed)) = (up.context, &up.signed_context) {
            let ctx = signed
                .build()
                .with_context(|| format!("[upstreams.{name}.signed_context]"))?;
            contexts.insert(name.clone(), Arc::new(ctx));
        }
    }
    let audit = match &config.audit {
        Some(audit_config) => {
            let tenant_urls = config
                .upstreams
                .iter()
                .filter_map(|(name, up)| up.audit_url.clone().map(|url| (name.clone(), url)))
                .collect();
            Some(crate::audit::Audit::start(audit_config.clone(), &tenant_urls).context("[audit]")?)
        }
        None => None,
    };
    let listener = TcpListener::bind(config.listen.addr)
        .await
        .with_context(|| format!("binding {}", config.listen.addr))?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let shared = Arc::new(Shared {
        router: ArcSwap::from_pointee(Router::from_config(&config)),
        pre_auth: Arc::new(Semaphore::new(config.limits.max_pre_auth_connections)),
        clients: Arc::new(Semaphore::new(config.limits.max_client_connections)),
        config: ArcSwap::from_pointee(config),
        verifier,
        pools,
        contexts,
        guards,
        cancels: CancelRegistry::default(),
        tls,
        shutdown: shutdown_rx.clone(),
        audit,
    });

    let admin_addr = match shared.config().admin.as_ref() {
        Some(admin) => Some(
            crate::admin::spawn(
                admin.addr,
                shared.clone(),
                metrics_handle,
                shutdown_rx.clone(),
            )
            .await
            .with_context(|| format!("binding admin listener {}", admin.addr))?,
        ),
        None => None,
    };

    let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
    info!(%addr, admin = ?admin_addr, "pgtenant listening");
    Ok(ProxyHandle {
        addr,
        admin_addr,
        shared,
        shutdown_tx,
        accept_task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                info!("listener closed for shutdown");
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(crate::session::serve(tcp, peer, shared.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully. Runs the doctor's isolation
/// checks first (`[doctor] on_start`).
pub async fn run(config: Config) -> anyhow::Result<()> {
    doctor_on_start(&config).await?;
    let handle = spawn(config).await?;
    wait_for_signal().await;
    info!("shutting down");
    handle.stop().await;
    Ok(())
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn doctor_on_start(config: &Config) -> anyhow::Result<()> {
    use crate::config::{DoctorOnStart, UpstreamKind};
    use crate::isolation::doctor;
    let mode = config.doctor.on_start;
    let has_shared = config
        .upstreams
        .values()
        .any(|u| u.kind == UpstreamKind::Shared);
    if mode == DoctorOnStart::Off || !has_shared {
        return Ok(());
    }
    let mut opts = doctor::DoctorOptions::default();
    if let Some(column) = &config.doctor.tenant_column {
        opts.tenant_column = column.clone();
    }
    // One signed schema for the run: the first upstream in signed mode names it.
    opts.signed_schema = config
        .upstreams
        .values()
        .find_map(|u| u.signed_context.as_ref().map(|s| s.schema.clone()));
    let findings = doctor::check_config(config, &opts).await?;
    for f in findings
        .iter()
        .filter(|f| f.severity >= doctor::Severity::Warning)
    {
        warn!(upstream = %f.upstream, check = f.check, severity = %f.severity, object = ?f.object, "{}", f.message);
    }
    if doctor::has_fatal(&findings) && mode == DoctorOnStart::Refuse {
        anyhow::bail!(
            "isolation checks found fatal problems (see above; `pgtenant doctor` for details); \
             fix them or set [doctor] on_start = \"warn\""
        );
    }
    Ok(())
}
