//! The directory cache: answers by tenant with the time they were fetched, invalidation with
//! an epoch so that a lookup racing a NOTIFY cannot store what the NOTIFY just revoked, and
//! the in-flight lookups that concurrent sessions of one tenant share.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::lookup::{Entry, FetchError};

/// The result every waiter of one in-flight lookup receives.
pub(super) type FlightResult = Result<Entry, FetchError>;

#[derive(Debug, Clone)]
pub(super) struct Cached {
    pub entry: Entry,
    pub fetched: Instant,
}

impl Cached {
    /// Young enough to answer without asking: `ttl` for rows, `negative_ttl` for "no row".
    pub fn is_fresh(&self, now: Instant, ttl: Duration, negative_ttl: Duration) -> bool {
        let limit = match self.entry {
            Entry::Absent => negative_ttl,
            Entry::Found(_) => ttl,
        };
        now.saturating_duration_since(self.fetched) < limit
    }

    /// Still usable while the metadata database cannot be asked.
    pub fn within_staleness(&self, now: Instant, max_staleness: Duration) -> bool {
        now.saturating_duration_since(self.fetched) <= max_staleness
    }
}

/// What an invalidation covered, for the metric's `scope` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    Tenant,
    All,
    /// Everything, because the LISTEN connection was (re)made and notifications may have
    /// been missed.
    Reconnect,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::All => "all",
            Scope::Reconnect => "reconnect",
        }
    }
}

/// Either join the lookup already running for a tenant or run it (the leader).
pub(super) enum Flight {
    Join(watch::Receiver<Option<FlightResult>>),
    Lead {
        tx: watch::Sender<Option<FlightResult>>,
        rx: watch::Receiver<Option<FlightResult>>,
        /// The epoch the leader's answer belongs to; see [`Cache::store`].
        epoch: u64,
    },
}

#[derive(Default)]
pub(super) struct Cache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Cached>,
    /// Bumped by every invalidation.
    epoch: u64,
    flights: HashMap<String, watch::Receiver<Option<FlightResult>>>,
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, tenant: &str) -> Option<Cached> {
        self.lock().entries.get(tenant).cloned()
    }

    /// Joins the running lookup of `tenant` or registers a new one whose leader is the caller.
    pub fn flight(&self, tenant: &str) -> Flight {
        let mut inner = self.lock();
        if let Some(rx) = inner.flights.get(tenant) {
            return Flight::Join(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inner.flights.insert(tenant.to_owned(), rx.clone());
        Flight::Lead {
            tx,
            rx,
            epoch: inner.epoch,
        }
    }

    /// Stores a leader's answer (unless an invalidation happened since it started: then the
    /// answer may predate the change and is only handed to its waiters) and ends the flight.
    pub fn store(
        &self,
        tenant: &str,
        epoch: u64,
        result: &FlightResult,
        fetched: Instant,
        rx: &watch::Receiver<Option<FlightResult>>,
    ) {
        let mut inner = self.lock();
        if let (Ok(entry), true) = (result, inner.epoch == epoch) {
            inner.entries.insert(
                tenant.to_owned(),
                Cached {
                    entry: entry.clone(),
                    fetched,
                },
            );
        }
        if inner
            .flights
            .get(tenant)
            .is_some_and(|f| f.same_channel(rx))
        {
            inner.flights.remove(tenant);
        }
    }

    /// Ends a flight without storing anything (the leader was cancelled).
    pub fn abandon(&self, tenant: &str, rx: &watch::Receiver<Option<FlightResult>>) {
        let mut inner = self.lock();
        if inner
            .flights
            .get(tenant)
            .is_some_and(|f| f.same_channel(rx))
        {
            inner.flights.remove(tenant);
        }
    }

    /// Forgets `tenant` (or everything with `None`); lookups running now are not joined by
    /// later sessions and their answers are not stored.
    pub fn invalidate(&self, tenant: Option<&str>) {
        let mut inner = self.lock();
        inner.epoch += 1;
        match tenant {
            Some(t) => {
                inner.entries.remove(t);
                inner.flights.remove(t);
            }
            None => {
                inner.entries.clear();
                inner.flights.clear();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }
}
