//! `JwksSource`: the key set behind `[jwt] jwks_url`. The keys sit in an `ArcSwap`, so a
//! verification reads them without locking; a background task fetches the document every
//! `jwks_refresh_interval`; a token whose `kid` is unknown triggers one shared fetch
//! (single-flight, at most once per `jwks_min_refetch_interval`, bounded by
//! `jwks_fetch_timeout`); after `jwks_max_staleness` without a successful fetch the keys are
//! no longer used and tokens are refused with a retryable error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use jsonwebtoken::Algorithm;
use tracing::{debug, info, warn};

use super::jwks_fetch::{FetchError, JwksEndpoint};
use super::keys::{parse_jwks, KeySet};
use super::AuthError;
use crate::config::JwtConfig;
use crate::metrics as m;

/// A JWKS document larger than this is refused (real ones are a few KiB).
pub(crate) const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The background task wakes at least this often to keep `pgtenant_jwks_age_seconds` fresh.
const AGE_TICK: Duration = Duration::from_secs(5);

/// One successfully fetched key set.
pub(crate) struct Fetched {
    pub(crate) keys: KeySet,
    body: Bytes,
}

/// The timing knobs of `[jwt]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    refresh: Duration,
    max_staleness: Duration,
    fetch_timeout: Duration,
    min_refetch: Duration,
}

/// The key set of a `jwks_url`, kept fresh. Shared by the verifiers of successive config
/// snapshots while the URL settings do not change.
pub struct JwksSource {
    endpoint: JwksEndpoint,
    allowed: Vec<Algorithm>,
    timing: Timing,
    /// What must be equal for a reload to keep this source.
    settings: String,
    current: ArcSwapOption<Fetched>,
    /// Time of the last successful fetch (unchanged documents count), as nanoseconds since
    /// `epoch`; 0 = never.
    last_success: AtomicU64,
    epoch: Instant,
    /// Completed fetch attempts: a task that queued for `refresh` sees whether a fetch
    /// finished while it waited.
    attempts: AtomicU64,
    /// Held while fetching: one fetch at a time. Holds when the last kid-miss fetch began.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    loop_started: AtomicBool,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("url", &self.endpoint)
            .field("keys", &self.current.load().as_ref().map(|c| &c.keys))
            .finish()
    }
}

impl JwksSource {
    /// Checks the URL settings; no I/O (see [`JwksSource::start`]).
    pub(crate) fn new(
        cfg: &JwtConfig,
        url: &str,
        allowed: &[Algorithm],
    ) -> Result<JwksSource, AuthError> {
        let endpoint = JwksEndpoint::new(url, cfg.jwks_allow_http, cfg.jwks_ca_file.as_deref())
            .map_err(AuthError::Config)?;
        let timing = Timing {
            refresh: cfg.jwks_refresh_interval,
            max_staleness: cfg.jwks_max_staleness,
            fetch_timeout: cfg.jwks_fetch_timeout,
            min_refetch: cfg.jwks_min_refetch_interval,
        };
        if timing.refresh.is_zero() || timing.fetch_timeout.is_zero() {
            return Err(AuthError::Config(
                "jwt.jwks_refresh_interval and jwt.jwks_fetch_timeout must be above zero".into(),
            ));
        }
        if timing.max_staleness < timing.refresh {
            return Err(AuthError::Config(
                "jwt.jwks_max_staleness must be at least jwt.jwks_refresh_interval".into(),
            ));
        }
        Ok(JwksSource {
            settings: format!(
                "{url}|{timing:?}|{}|{:?}|{allowed:?}",
                cfg.jwks_allow_http, cfg.jwks_ca_file
            ),
            endpoint,
            allowed: allowed.to_vec(),
            timing,
            current: ArcSwapOption::empty(),
            last_success: AtomicU64::new(0),
            epoch: Instant::now(),
            attempts: AtomicU64::new(0),
            refresh: tokio::sync::Mutex::new(None),
            loop_started: AtomicBool::new(false),
        })
    }

    /// Whether `other` was built from the same settings (a reload may keep this source).
    pub(crate) fn same_settings(&self, other: &JwksSource) -> bool {
        self.settings == other.settings
    }

    /// Fetches the first key set unless there is one, then starts the background refresh
    /// (once). An error means the keys could not be loaded: `serve` and reloads fail on it.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), AuthError> {
        if self.current.load().is_none() {
            let _one = self.refresh.lock().await;
            if self.current.load().is_none() {
                self.fetch().await.map_err(|e| {
                    AuthError::Config(format!(
                        "jwt.jwks_url: the first fetch of {} failed: {e}",
                        self.endpoint.shown()
                    ))
                })?;
            }
        }
        if !self.loop_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(refresh_loop(Arc::downgrade(self)));
        }
        Ok(())
    }

    /// The keys, unless none were ever fetched or the last success is older than
    /// `jwks_max_staleness` (fail closed: the issuer may have revoked a key since).
    pub(crate) fn keys(&self) -> Result<Arc<Fetched>, AuthError> {
        let current = self.current.load_full().ok_or(AuthError::KeysUnavailable)?;
        match self.age() {
            Some(age) if age <= self.timing.max_staleness => Ok(current),
            _ => Err(AuthError::KeysUnavailable),
        }
    }

    /// The keys if fetched (stale or not), for the startup self test.
    pub(crate) fn loaded(&self) -> Option<Arc<Fetched>> {
        self.current.load_full()
    }

    /// Time since the last successful fetch.
    fn age(&self) -> Option<Duration> {
        match self.last_success.load(Ordering::Acquire) {
            0 => None,
            at => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(at)),
            ),
        }
    }

    /// A token named a `kid` we do not have (or the keys are stale): fetch again, shared with
    /// every task that asks meanwhile, at most once per `jwks_min_refetch_interval`, and
    /// never longer than about twice `jwks_fetch_timeout` (queueing behind a running fetch,
    /// then perhaps our own). The caller then looks again.
    pub(crate) async fn refresh_after_miss(&self) {
        let seen = self.attempts.load(Ordering::Acquire);
        let shared_fetch = async {
            let mut last_miss = self.refresh.lock().await;
            if self.attempts.load(Ordering::Acquire) != seen {
                return; // a fetch finished while we queued: use its result
            }
            if last_miss.is_some_and(|at| at.elapsed() < self.timing.min_refetch) {
                debug!("unknown kid: JWKS fetched recently, not again yet");
                return;
            }
            *last_miss = Some(Instant::now());
            let _ = self.fetch().await;
        };
        let bound = self.timing.fetch_timeout.saturating_mul(2);
        let _ = tokio::time::timeout(bound, shared_fetch).await;
    }

    /// One fetch within `jwks_fetch_timeout`; on success the key set is replaced (or kept,
    /// when the document is unchanged). Call with `refresh` held.
    async fn fetch(&self) -> Result<(), FetchError> {
        let timeout = self.timing.fetch_timeout;
        let result = match tokio::time::timeout(timeout, self.endpoint.get(MAX_JWKS_BYTES)).await {
            Ok(Ok(body)) => self.install(body),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(FetchError::Timeout(timeout)),
        };
        self.attempts.fetch_add(1, Ordering::AcqRel);
        let label = match &result {
            Ok(true) => "ok",
            Ok(false) => "unchanged",
            Err(e) => {
                warn!(url = self.endpoint.shown(), error = %e, "JWKS fetch failed; the previous keys stay until jwt.jwks_max_staleness");
                "error"
            }
        };
        metrics::counter!(m::JWKS_REFRESHES_TOTAL, "result" => label).increment(1);
        self.report_age();
        result.map(|_| ())
    }

    /// Parses and stores `body`; `Ok(false)` when it equals the current document.
    fn install(&self, body: Bytes) -> Result<bool, FetchError> {
        let changed = match self.current.load().as_ref() {
            Some(current) if current.body == body => false,
            _ => {
                let source = format!("jwt.jwks_url {}", self.endpoint.shown());
                let keys =
                    parse_jwks(&body, &source, &self.allowed).map_err(FetchError::Invalid)?;
                let count = keys.keys().len();
                info!(url = self.endpoint.shown(), keys = ?keys, "JWKS loaded");
                metrics::gauge!(m::JWKS_KEYS).set(count as f64);
                self.current.store(Some(Arc::new(Fetched { keys, body })));
                true
            }
        };
        let now = self.epoch.elapsed().as_nanos().max(1);
        self.last_success
            .store(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Release);
        Ok(changed)
    }

    fn report_age(&self) {
        if let Some(age) = self.age() {
            metrics::gauge!(m::JWKS_AGE_SECONDS).set(age.as_secs_f64());
        }
    }
}

/// Refreshes every `jwks_refresh_interval` (after a failure, every `jwks_min_refetch_interval`
/// at most) until the source is dropped (a reload with other URL settings, and the last
/// session of the old snapshot gone).
async fn refresh_loop(source: Weak<JwksSource>) {
    let Some(mut next) = source.upgrade().map(|s| Instant::now() + s.timing.refresh) else {
        return;
    };
    loop {
        tokio::time::sleep(next.saturating_duration_since(Instant::now()).min(AGE_TICK)).await;
        let Some(s) = source.upgrade() else { return };
        s.report_age();
        if Instant::now() < next {
            continue;
        }
        let ok = {
            let _one = s.refresh.lock().await;
            s.fetch().await.is_ok()
        };
        let t = s.timing;
        next = Instant::now()
            + if ok {
                t.refresh
            } else {
                t.refresh.min(t.min_refetch.max(Duration::from_secs(1)))
            };
    }
}
