//! The live tenant directory (`[directory]`): a query against a metadata database says which
//! upstream serves a tenant, or describes a dedicated database of its own. Answers are cached
//! with a TTL and forgotten at once on `NOTIFY <channel>`; concurrent lookups of one tenant
//! share one query; while the metadata database is unreachable cached answers serve up to
//! `max_staleness`, then lookups fail closed.
//!
//! - `config`: `DirectoryConfig`, `DirectoryCredentials`
//! - `lookup`: the metadata connection, the query, `Entry`/`DirRow`
//! - `cache`: cached answers, invalidation epoch, in-flight lookups
//! - `listen`: the LISTEN task (invalidation, health, the staleness gauge)
//! - `route`: a directory row → `Route` and, for described databases, their pools

mod cache;
pub mod config;
mod listen;
mod lookup;
mod route;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::config::Config;
use crate::metrics as m;
use crate::pool::{PoolStats, Pools};

use super::{Route, RouteError, Router, TenantId};
use cache::{Cache, Flight, FlightResult, Scope};
pub use config::{DirectoryConfig, DirectoryCredentials};
pub use lookup::{DirRow, Entry, FetchError, APPLICATION_NAME};

/// After the metadata database failed to answer, lookups during this long do not try again:
/// a down database costs sessions no waiting, and a recovered one is used within this delay.
pub const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Why the directory refused a tenant. Messages never contain passwords.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// The tenant's row says `active = false` (or NULL).
    #[error("tenant suspended")]
    Suspended,
    /// No usable answer: the metadata database is unreachable and nothing cached is young
    /// enough (`max_staleness`).
    #[error("tenant directory unavailable")]
    Unavailable,
    /// The tenant's row cannot be used (unknown upstream or credentials, no database, ...).
    #[error("the tenant directory entry of tenant \"{tenant}\" is invalid: {reason}")]
    Invalid { tenant: String, reason: String },
}

/// Where `resolve` sends a session.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub route: Route,
    /// The pool set of a directory-described database; `None`: the runtime's own pools.
    pub pools: Option<Arc<Pools>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

/// The route of a verified tenant: the directory first (authoritative for the tenants it has
/// a row for), then the static `[tenants]` map and default.
pub async fn resolve(
    router: &Router,
    directory: Option<&Directory>,
    config: &Config,
    tenant: &TenantId,
) -> Result<Resolved, ResolveError> {
    if let Some(directory) = directory {
        if let Entry::Found(row) = directory.lookup(tenant).await? {
            return Ok(directory.route_for(tenant, &row, config)?);
        }
    }
    Ok(Resolved {
        route: router.route(tenant)?,
        pools: None,
    })
}

/// The running directory: cache, metadata connection, LISTEN task and the pools of
/// directory-described databases. Dropping it stops the LISTEN task.
pub struct Directory {
    inner: Arc<Inner>,
    listener: JoinHandle<()>,
}

struct Inner {
    config: DirectoryConfig,
    db: lookup::MetadataDb,
    cache: Cache,
    health: listen::Health,
    /// Directory queries sent to the metadata database.
    queries: AtomicU64,
    /// Lookups answered from a cache entry past its TTL because the database did not answer.
    stale_served: AtomicU64,
    /// Pools of directory-described databases by their upstream name, made on first use.
    pools: Mutex<std::collections::HashMap<String, Arc<Pools>>>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("metadata", &self.inner.db.addr)
            .field("cached", &self.inner.cache.len())
            .finish_non_exhaustive()
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Directory {
    /// The directory for `config`: `previous`'s when its `[directory]` and template upstream
    /// are unchanged (cache, connections and pools survive a reload), a new one otherwise,
    /// `None` without `[directory]`. Must run inside a tokio runtime (spawns the LISTEN task).
    pub fn for_config(
        config: &Config,
        previous: Option<(&Arc<Directory>, &Config)>,
    ) -> Result<Option<Arc<Directory>>, String> {
        let Some(dir) = &config.directory else {
            return Ok(None);
        };
        if let Some((running, old)) = previous {
            if unchanged(old, config) {
                return Ok(Some(running.clone()));
            }
        }
        Directory::start(dir.clone()).map(|d| Some(Arc::new(d)))
    }

    /// Checks the config and starts the LISTEN task; the query connection is made on the
    /// first lookup.
    pub fn start(config: DirectoryConfig) -> Result<Directory, String> {
        let db = lookup::MetadataDb::new(&config.url, &config.query, config.lookup_timeout)?;
        let listen_config = lookup::connect_config(&config.url, config.lookup_timeout)?;
        let inner = Arc::new(Inner {
            db,
            cache: Cache::default(),
            health: listen::Health::new(),
            queries: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            pools: Mutex::new(Default::default()),
            config,
        });
        let listener = tokio::spawn(listen::run(inner.clone(), listen_config));
        Ok(Directory { inner, listener })
    }

    /// What the directory says about `tenant`: cached while fresh, else asked (one query
    /// for all concurrent lookups of the tenant), else a cached answer within
    /// `max_staleness`, else `Unavailable`. An inactive row is `Suspended`.
    pub async fn lookup(&self, tenant: &TenantId) -> Result<Entry, DirectoryError> {
        let started = Instant::now();
        let (result, outcome) = self.inner.lookup(tenant.as_str()).await;
        metrics::counter!(m::DIRECTORY_LOOKUPS_TOTAL, "result" => outcome).increment(1);
        metrics::histogram!(m::DIRECTORY_LOOKUP_SECONDS).record(started.elapsed().as_secs_f64());
        match result? {
            Entry::Found(row) if !row.active => Err(DirectoryError::Suspended),
            entry => Ok(entry),
        }
    }

    /// Forgets `tenant`'s cached answer (all with `None`), as a NOTIFY does.
    pub fn invalidate(&self, tenant: Option<&str>) {
        self.inner
            .invalidate(tenant.map_or(Scope::All, |_| Scope::Tenant), tenant);
    }

    /// Directory queries sent so far.
    pub fn queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }

    /// Lookups answered by a cached entry past its TTL because the database did not answer.
    pub fn stale_served(&self) -> u64 {
        self.inner.stale_served.load(Ordering::Relaxed)
    }

    /// Whether the LISTEN connection is up (invalidations arrive).
    pub fn listening(&self) -> bool {
        self.inner.health.listening()
    }

    /// Pool stats of the directory-described databases, for the pool gauges.
    pub fn pool_stats(&self) -> Vec<PoolStats> {
        let pools = self.inner.pools.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats: Vec<PoolStats> = pools.values().flat_map(|p| p.stats()).collect();
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        stats
    }

    fn route_for(
        &self,
        tenant: &TenantId,
        row: &DirRow,
        config: &Config,
    ) -> Result<Resolved, DirectoryError> {
        route::resolve_row(&self.inner, row, config).map_err(|reason| {
            tracing::warn!(tenant = %tenant, %reason, "unusable tenant directory row");
            DirectoryError::Invalid {
                tenant: tenant.to_string(),
                reason,
            }
        })
    }
}

impl Inner {
    /// The answer and the `result` label of the lookup metric.
    async fn lookup(
        self: &Arc<Self>,
        tenant: &str,
    ) -> (Result<Entry, DirectoryError>, &'static str) {
        let cfg = &self.config;
        if let Some(cached) = self.cache.get(tenant) {
            if cached.is_fresh(Instant::now(), cfg.ttl, cfg.negative_ttl) {
                let label = match cached.entry {
                    Entry::Absent => "negative",
                    Entry::Found(_) => "hit",
                };
                return (Ok(cached.entry), label);
            }
        }
        match self.fetch_shared(tenant).await {
            Ok(entry) => (Ok(entry), "miss"),
            Err(FetchError::Invalid(reason)) => {
                tracing::warn!(%tenant, %reason, "tenant directory answer unusable");
                let error = DirectoryError::Invalid {
                    tenant: tenant.to_owned(),
                    reason,
                };
                (Err(error), "error")
            }
            Err(FetchError::Unavailable(reason)) => {
                // Read again: an invalidation since the TTL check must not be undone here.
                let stale = self
                    .cache
                    .get(tenant)
                    .filter(|c| c.within_staleness(Instant::now(), cfg.max_staleness));
                match stale {
                    Some(cached) => {
                        self.stale_served.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%tenant, %reason, "metadata database unavailable; serving the cached directory entry");
                        (Ok(cached.entry), "stale")
                    }
                    None => {
                        tracing::warn!(%tenant, %reason, "tenant directory unavailable; refusing the session");
                        (Err(DirectoryError::Unavailable), "error")
                    }
                }
            }
        }
    }

    /// One query per tenant at a time: the first caller spawns it (so a cancelled session
    /// does not cancel it for the others), every caller waits for its answer.
    async fn fetch_shared(self: &Arc<Self>, tenant: &str) -> FlightResult {
        let mut rx = match self.cache.flight(tenant) {
            Flight::Join(rx) => rx,
            Flight::Lead { tx, rx, epoch } => {
                let inner = self.clone();
                let key = tenant.to_owned();
                let flight = rx.clone();
                tokio::spawn(async move {
                    let result = inner.fetch(&key).await;
                    inner
                        .cache
                        .store(&key, epoch, &result, Instant::now(), &flight);
                    tx.send_replace(Some(result));
                });
                rx
            }
        };
        let answer = rx.wait_for(Option::is_some).await.map(|v| v.clone());
        match answer {
            Ok(Some(result)) => result,
            _ => {
                self.cache.abandon(tenant, &rx);
                Err(FetchError::Unavailable(
                    "the directory lookup did not finish".into(),
                ))
            }
        }
    }

    /// Asks the metadata database, unless it failed within `RETRY_BACKOFF`.
    async fn fetch(&self, tenant: &str) -> FlightResult {
        if let Some(reason) = self.health.recent_query_failure(RETRY_BACKOFF) {
            return Err(FetchError::Unavailable(reason));
        }
        self.queries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::DIRECTORY_QUERIES_TOTAL).increment(1);
        let result = self.db.fetch(tenant).await;
        match &result {
            Err(FetchError::Unavailable(reason)) => self.health.record_query_failure(reason),
            _ => self.health.record_ok(),
        }
        result
    }

    fn invalidate(&self, scope: Scope, tenant: Option<&str>) {
        self.cache.invalidate(tenant);
        metrics::counter!(m::DIRECTORY_INVALIDATIONS_TOTAL, "scope" => scope.label()).increment(1);
    }
}

/// Whether a reload from `old` to `new` may keep the running directory: same `[directory]`,
/// same template upstream (described databases inherit its pool settings).
fn unchanged(old: &Config, new: &Config) -> bool {
    let template = |c: &Config| {
        c.directory
            .as_ref()
            .and_then(|d| d.template.as_ref())
            .and_then(|t| c.upstreams.get(t))
            // No PartialEq on UpstreamConfig; its Debug text covers every field. Compared
            // only, never logged.
            .map(|up| format!("{up:?}"))
    };
    old.directory == new.directory && template(old) == template(new)
}
