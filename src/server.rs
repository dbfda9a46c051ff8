//! The listener: shared state, accept loop, admin endpoint, graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// Everything a reload replaces, built together and swapped whole. A session loads one
/// snapshot at its start and keeps its `Arc` to the end, so the config, routing, pool, guard
/// and context it started with never change under it, and a reload never drops it.
pub struct Runtime {
    pub config: Arc<Config>,
    pub router: Router,
    pub verifier: JwtVerifier,
    pub pools: Pools,
    /// Signed tenant contexts of the upstreams with `context = "signed"`, by upstream name.
    pub contexts: HashMap<String, Arc<SignedContext>>,
    /// SQL guards of the shared upstreams with `guard = true`, by upstream name.
    pub guards: HashMap<String, Arc<Guard>>,
    /// The live tenant directory (`[directory]`), kept across reloads that leave it unchanged.
    pub directory: Option<Arc<crate::tenant::Directory>>,
}

impl Runtime {
    /// Builds everything from `config`; `previous` lends the pools of unchanged upstreams.
    fn build(config: Config, previous: Option<&Runtime>) -> anyhow::Result<Runtime> {
        config.validate()?;
        let verifier = JwtVerifier::from_config_reusing(&config.jwt, previous.map(|p| &p.verifier))
            .context("[jwt]")?;
        verifier.self_test().context("JWT crypto self-test")?;
        let pools = match previous {
            Some(prev) => prev.pools.reload(&prev.config, &config),
            None => Pools::from_config(&config),
        }
        .context("[upstreams]")?;
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
        let directory = crate::tenant::Directory::for_config(
            &config,
            previous.and_then(|p| Some((p.directory.as_ref()?, &*p.config))),
        )
        .map_err(|e| anyhow::anyhow!("[directory]: {e}"))?;
        Ok(Runtime {
            directory,
            router: Router::from_config(&config),
            config: Arc::new(config),
            verifier,
            pools,
            contexts,
            guards,
        })
    }
}

/// State every session reads. What a reload replaces is in `runtime`; the rest (the client
/// listener's TLS, the connection-limit semaphores, cancel keys, the audit trail) lives as
/// long as the process.
pub struct Shared {
    runtime: ArcSwap<Runtime>,
    pub cancels: CancelRegistry,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub pre_auth: Arc<Semaphore>,
    pub clients: Arc<Semaphore>,
    pub shutdown: watch::Receiver<bool>,
    /// The audit trail, when `[audit]` is configured.
    pub audit: Option<Arc<crate::audit::Audit>>,
    /// Reloads run one at a time: each builds on the snapshot it replaces.
    reloading: tokio::sync::Mutex<()>,
    /// Live sessions and the console's pauses and suspensions (process-local).
    pub sessions: Arc<crate::session::registry::SessionRegistry>,
    /// The config file `serve` was started with: the console's RELOAD re-reads it.
    config_path: Mutex<Option<PathBuf>>,
    /// Set by the console's SHUTDOWN; `run` (and `ProxyHandle::stop_requested`) watch it.
    stop_requested: watch::Sender<bool>,
}

impl Shared {
    /// The current snapshot, for one session or request: load it once and keep it.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// The current config (part of `runtime()`).
    pub fn config(&self) -> Arc<Config> {
        self.runtime.load().config.clone()
    }

    /// Replaces the snapshot with one built from `new`. On any error the running snapshot
    /// stays and the error is returned (and logged). Running sessions keep their snapshot.
    pub async fn reload(&self, mut new: Config) -> anyhow::Result<()> {
        let _one_at_a_time = self.reloading.lock().await;
        let current = self.runtime.load_full();
        keep_restart_only(&current.config, &mut new);
        let built = match Runtime::build(new, Some(&current)) {
            // A new jwks_url must deliver its keys before the snapshot may serve.
            Ok(next) => next.verifier.start().await.map(|()| next).context("[jwt]"),
            Err(e) => Err(e),
        };
        let result = match built {
            Ok(next) => {
                let kept: Vec<&str> = next
                    .config
                    .upstreams
                    .keys()
                    .filter(|name| next.pools.shares_pool_with(&current.pools, name))
                    .map(String::as_str)
                    .collect();
                info!(
                    upstreams = next.config.upstreams.len(),
                    pools_kept = ?kept,
                    "config reloaded; new sessions use it"
                );
                self.runtime.store(Arc::new(next));
                Ok(())
            }
            Err(e) => {
                warn!(
                    error = format!("{e:#}"),
                    "config reload rejected; the running config stays"
                );
                Err(e)
            }
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "result" => label).increment(1);
        result
    }

    /// Remembers the config file to re-read on the console's RELOAD.
    pub fn set_config_path(&self, path: &Path) {
        *self.config_path.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.to_owned());
    }

    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_path
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads, checks and applies the config file at `path` (SIGHUP and the console's
    /// RELOAD). On any error the running config stays; the error says why.
    pub async fn reload_file(&self, path: &Path) -> anyhow::Result<()> {
        let rejected = |error: anyhow::Error| {
            warn!(config = %path.display(), error = format!("{error:#}"), "config reload rejected; the running config stays");
            metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "result" => "error")
                .increment(1);
            error
        };
        let new = Config::load(path).map_err(|e| rejected(e.into()))?;
        // A reload may add or repoint a shared upstream: it gets the checks a start would run.
        doctor_on_start(&new).await.map_err(rejected)?;
        // `reload` logs and counts its own outcome.
        self.reload(new).await
    }

    /// The console's SHUTDOWN: the same graceful stop as SIGTERM.
    pub fn request_stop(&self) {
        self.stop_requested.send_replace(true);
    }

    /// Resolves once the console asked for SHUTDOWN.
    pub async fn stop_requested(&self) {
        let mut rx = self.stop_requested.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Copies into `new` what only a restart can change (bound listeners and their TLS, the
/// connection-limit semaphores, runtime threads, metric labels, the running audit trail),
/// with a warning when the file asks for something else.
fn keep_restart_only(running: &Config, new: &mut Config) {
    fn keep<T: Clone>(section: &str, running: &T, new: &mut T, differs: bool) {
        if differs {
            warn!(section, "changed, but not reloadable; restart to apply it");
        }
        *new = running.clone();
    }
    // The sections have no PartialEq; their Debug text is a faithful enough comparison for a
    // warning.
    let listen_differs = format!("{:?}", running.listen) != format!("{:?}", new.listen);
    keep("[listen]", &running.listen, &mut new.listen, listen_differs);
    let admin_differs = format!("{:?}", running.admin) != format!("{:?}", new.admin);
    keep("[admin]", &running.admin, &mut new.admin, admin_differs);
    let runtime_differs = running.runtime.worker_threads != new.runtime.worker_threads;
    keep(
        "[runtime]",
        &running.runtime,
        &mut new.runtime,
        runtime_differs,
    );
    let metrics_differs = running.metrics != new.metrics;
    keep(
        "[metrics]",
        &running.metrics,
        &mut new.metrics,
        metrics_differs,
    );
    let audit_differs = format!("{:?}", running.audit) != format!("{:?}", new.audit);
    keep("[audit]", &running.audit, &mut new.audit, audit_differs);
    // Issued cancel keys carry the replica id; the peer list reloads.
    let replica = |c: &Config| c.cluster.as_ref().map_or(0, |c| c.replica_id);
    if replica(running) != replica(new) {
        warn!(
            section = "[cluster]",
            "replica_id needs a restart; the peer list is reloaded"
        );
        let id = replica(running);
        new.cluster.get_or_insert_with(Default::default).replica_id = id;
    }
    let (old_l, new_l) = (&running.limits, &mut new.limits);
    if old_l.max_client_connections != new_l.max_client_connections
        || old_l.max_pre_auth_connections != new_l.max_pre_auth_connections
    {
        warn!(
            section = "[limits]",
            "max_client_connections and max_pre_auth_connections need a restart; the other limits are reloaded"
        );
        new_l.max_client_connections = old_l.max_client_connections;
        new_l.max_pre_auth_connections = old_l.max_pre_auth_connections;
    }
}

/// A running proxy: its bound addresses and a way to stop it.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    accept_task: JoinHandle<()>,
}

impl ProxyHandle {
    /// Stops accepting; sessions end at their next idle point with 57P01.
    pub fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Applies `new` to sessions that start from now on; see `Shared::reload`.
    pub async fn reload(&self, new: Config) -> anyhow::Result<()> {
        self.shared.reload(new).await
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
    // Everything reloadable first, so a bad config fails before the audit trail or a
    // listener starts.
    let runtime = Runtime::build(config, None)?;
    runtime.verifier.start().await.context("[jwt]")?;
    let config = runtime.config.clone();
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
    let audit = match &config.audit {
        Some(audit_config) => {
            let tenant_urls = config
                .upstreams
                .iter()
                .filter_map(|(name, up)| up.audit_url.clone().map(|url| (name.clone(), url)))
                .collect();
            Some(
                crate::audit::Audit::start(audit_config.clone(), &tenant_urls)
                    .context("[audit]")?,
            )
        }
        None => None,
    };
    let listener = TcpListener::bind(config.listen.addr)
        .await
        .with_context(|| format!("binding {}", config.listen.addr))?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let shared = Arc::new(Shared {
        pre_auth: Arc::new(Semaphore::new(config.limits.max_pre_auth_connections)),
        clients: Arc::new(Semaphore::new(config.limits.max_client_connections)),
        runtime: ArcSwap::from_pointee(runtime),
        reloading: tokio::sync::Mutex::new(()),
        sessions: Default::default(),
        config_path: Mutex::new(None),
        stop_requested: watch::channel(false).0,
        cancels: CancelRegistry::new(config.cluster.as_ref().map_or(0, |c| c.replica_id)),
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
    // The console's SHUTDOWN closes the listener and drains sessions even without `run`
    // (which also waits for the drain and flushes the audit trail).
    // The task holds no strong reference: a dropped ProxyHandle still closes the listener.
    let shutdown_tx = Arc::new(shutdown_tx);
    let stopper = Arc::downgrade(&shutdown_tx);
    let mut stop_rx = shared.stop_requested.subscribe();
    tokio::spawn(async move {
        if stop_rx.wait_for(|stop| *stop).await.is_ok() {
            if let Some(tx) = stopper.upgrade() {
                let _ = tx.send(true);
            }
        }
    });
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

/// Runs until SIGINT or SIGTERM, then shuts down gracefully; SIGHUP re-reads the config
/// file at `path` and reloads it. Runs the doctor's isolation checks first (`[doctor] on_start`).
pub async fn run(config: Config, path: &Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed first: SIGHUP's default action would kill a process still starting.
    let mut hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    doctor_on_start(&config).await?;
    let handle = spawn(config).await?;
    handle.shared.set_config_path(path);
    // One future for the whole run: a SIGTERM arriving during a reload is not lost.
    let stop = wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            () = handle.shared.stop_requested() => {
                info!("SHUTDOWN from the admin console");
                break;
            }
            hup = hangups.recv() => match hup {
                Some(()) => reload_from_file(&handle, path).await,
                None => {
                    (&mut stop).await;
                    break;
                }
            },
        }
    }
    info!("shutting down");
    handle.stop().await;
    Ok(())
}

/// SIGHUP: load, check and apply the file; on any error the running config stays.
async fn reload_from_file(handle: &ProxyHandle, path: &Path) {
    info!(config = %path.display(), "SIGHUP: reloading the config");
    // `reload_file` logs and counts its own outcome.
    let _ = handle.shared.reload_file(path).await;
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
