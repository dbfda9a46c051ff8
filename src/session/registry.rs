//! Live sessions: who is connected, through which server connection, doing what; and the
//! per-session control channel behind the console's PAUSE, RESUME, KILL and SUSPEND.
//!
//! Registering, ending and controlling a session take a mutex (once per session or per
//! console command); the relay itself only does relaxed atomic stores into its
//! [`LiveStats`]. Pauses and suspensions are process-local: every replica needs the command.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::sync::watch;

use crate::error::ClientError;
use crate::tenant::TenantId;

/// What the console wants a session to do; the relay watches it beside shutdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Run,
    /// Hold the next request at a transaction boundary (transactions in progress finish).
    Paused,
    /// End now, even mid-transaction; the text says why (sent to the client).
    Kill(Arc<str>),
}

/// What a session is doing, as SHOW CLIENTS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SessionState {
    /// Authenticated, getting its server connection.
    Connecting = 0,
    /// Held by PAUSE with a request waiting (or before it got a server connection).
    Waiting = 1,
    Idle = 2,
    /// A request is in flight.
    Active = 3,
    InTransaction = 4,
    FailedTransaction = 5,
    /// Held by PAUSE at a transaction boundary.
    Paused = 6,
}

impl SessionState {
    fn from_u8(v: u8) -> SessionState {
        match v {
            1 => SessionState::Waiting,
            2 => SessionState::Idle,
            3 => SessionState::Active,
            4 => SessionState::InTransaction,
            5 => SessionState::FailedTransaction,
            6 => SessionState::Paused,
            _ => SessionState::Connecting,
        }
    }

    /// From a ReadyForQuery status byte, for a session between requests.
    pub fn from_tx_status(status: u8) -> SessionState {
        match status {
            b'T' => SessionState::InTransaction,
            b'E' => SessionState::FailedTransaction,
            _ => SessionState::Idle,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Connecting => "connecting",
            SessionState::Waiting => "waiting",
            SessionState::Idle => "idle",
            SessionState::Active => "active",
            SessionState::InTransaction => "idle in transaction",
            SessionState::FailedTransaction => "idle in transaction (aborted)",
            SessionState::Paused => "paused",
        }
    }
}

/// Counters the session's own task writes (relaxed stores) and the console reads.
#[derive(Debug, Default)]
pub struct LiveStats {
    state: AtomicU8,
    server_id: AtomicU64,
    backend_pid: AtomicI32,
    queries: AtomicU64,
    client_bytes: AtomicU64,
    server_bytes: AtomicU64,
}

impl LiveStats {
    pub fn set_state(&self, state: SessionState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> SessionState {
        SessionState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_server(&self, id: u64, backend_pid: i32) {
        self.server_id.store(id, Ordering::Relaxed);
        self.backend_pid.store(backend_pid, Ordering::Relaxed);
    }

    /// The server connection (pgtenant's id, backend pid), once checked out.
    pub fn server(&self) -> Option<(u64, i32)> {
        let id = self.server_id.load(Ordering::Relaxed);
        (id != 0).then(|| (id, self.backend_pid.load(Ordering::Relaxed)))
    }

    /// The relay's running totals (absolute values, not increments).
    pub fn publish(&self, queries: u64, client_bytes: u64, server_bytes: u64) {
        self.queries.store(queries, Ordering::Relaxed);
        self.client_bytes.store(client_bytes, Ordering::Relaxed);
        self.server_bytes.store(server_bytes, Ordering::Relaxed);
    }

    pub fn totals(&self) -> Totals {
        Totals {
            sessions: 1,
            queries: self.queries.load(Ordering::Relaxed),
            client_bytes: self.client_bytes.load(Ordering::Relaxed),
            server_bytes: self.server_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Sums for SHOW STATS.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub sessions: u64,
    pub queries: u64,
    pub client_bytes: u64,
    pub server_bytes: u64,
}

impl Totals {
    fn add(&mut self, other: Totals) {
        self.sessions += other.sessions;
        self.queries += other.queries;
        self.client_bytes += other.client_bytes;
        self.server_bytes += other.server_bytes;
    }
}

/// What a session tells the registry when it registers.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub tenant: TenantId,
    pub user: String,
    pub upstream: Arc<str>,
    pub peer: SocketAddr,
    pub application_name: Option<String>,
    /// The token's `exp`, unix seconds.
    pub token_expires_at: u64,
}

/// One live session as the console sees it.
#[derive(Debug)]
pub struct SessionEntry {
    pub id: u64,
    pub info: NewSession,
    pub connected_at: SystemTime,
    pub live: LiveStats,
    control: watch::Sender<Control>,
}

/// Pauses and suspensions in force.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holds {
    pub all_paused: bool,
    pub paused: BTreeSet<String>,
    pub suspended: BTreeSet<String>,
}

impl Holds {
    fn control_for(&self, tenant: &str) -> Control {
        if self.all_paused || self.paused.contains(tenant) {
            Control::Paused
        } else {
            Control::Run
        }
    }
}

#[derive(Debug, Default)]
pub struct SessionRegistry {
    next_id: AtomicU64,
    sessions: DashMap<u64, Arc<SessionEntry>>,
    /// Also serializes registration against PAUSE/SUSPEND, so no new session slips past one.
    holds: Mutex<Holds>,
    /// Totals of ended sessions by (tenant, upstream).
    ended: Mutex<BTreeMap<(String, String), Totals>>,
}

impl SessionRegistry {
    fn holds(&self) -> MutexGuard<'_, Holds> {
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session, or refuses it when its tenant is suspended. A session of a paused
    /// tenant starts paused: [`SessionHandle::wait_runnable`] holds it.
    pub fn register(self: &Arc<Self>, info: NewSession) -> Result<SessionHandle, ClientError> {
        let holds = self.holds();
        if holds.suspended.contains(info.tenant.as_str()) {
            return Err(ClientError::TenantSuspended(
                info.tenant.as_str().to_string(),
            ));
        }
        let (tx, rx) = watch::channel(holds.control_for(info.tenant.as_str()));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(SessionEntry {
            id,
            info,
            connected_at: SystemTime::now(),
            live: LiveStats::default(),
            control: tx,
        });
        self.sessions.insert(id, entry.clone());
        drop(holds);
        Ok(SessionHandle {
            entry,
            registry: self.clone(),
            control: rx,
        })
    }

    /// Live sessions, oldest first.
    pub fn sessions(&self) -> Vec<Arc<SessionEntry>> {
        let mut all: Vec<_> = self.sessions.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|e| e.id);
        all
    }

    pub fn current_holds(&self) -> Holds {
        self.holds().clone()
    }

    /// Totals by (tenant, upstream): ended sessions plus the live ones so far.
    pub fn totals(&self) -> BTreeMap<(String, String), (Totals, u64)> {
        let mut out: BTreeMap<(String, String), (Totals, u64)> = self
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, t)| (k.clone(), (*t, 0)))
            .collect();
        for s in self.sessions() {
            let key = (
                s.info.tenant.as_str().to_string(),
                s.info.upstream.to_string(),
            );
            let slot = out.entry(key).or_default();
            slot.0.add(s.live.totals());
            slot.1 += 1;
        }
        out
    }

    /// PAUSE: `None` pauses every tenant. Returns the sessions now paused.
    pub fn pause(&self, tenant: Option<&str>) -> usize {
        let mut holds = self.holds();
        match tenant {
            None => holds.all_paused = true,
            Some(t) => {
                holds.paused.insert(t.to_string());
            }
        }
        self.apply(&holds, tenant)
    }

    /// RESUME: `None` lifts every pause (suspensions stay until their tenant is named);
    /// a tenant lifts its pause and its suspension.
    pub fn resume(&self, tenant: Option<&str>) -> usize {
        let mut holds = self.holds();
        match tenant {
            None => {
                holds.all_paused = false;
                holds.paused.clear();
            }
            Some(t) => {
                holds.paused.remove(t);
                holds.suspended.remove(t);
            }
        }
        self.apply(&holds, tenant)
    }

    /// KILL TENANT: ends every session of `tenant` now. Returns how many.
    pub fn kill_tenant(&self, tenant: &str, reason: &str) -> usize {
        let _holds = self.holds();
        self.kill_locked(tenant, reason)
    }

    /// SUSPEND TENANT: KILL, and refuse its new sessions until RESUME names it.
    pub fn suspend_tenant(&self, tenant: &str, reason: &str) -> usize {
        let mut holds = self.holds();
        holds.suspended.insert(tenant.to_string());
        self.kill_locked(tenant, reason)
    }

    fn kill_locked(&self, tenant: &str, reason: &str) -> usize {
        let reason: Arc<str> = Arc::from(reason);
        let mut n = 0;
        for s in self.sessions.iter() {
            if s.info.tenant.as_str() == tenant {
                s.control.send_replace(Control::Kill(reason.clone()));
                n += 1;
            }
        }
        n
    }

    /// Sends every session of `tenant` (all when `None`) the control its holds now call for;
    /// a killed session stays killed. Returns the sessions now paused.
    fn apply(&self, holds: &Holds, tenant: Option<&str>) -> usize {
        let mut paused = 0;
        for s in self.sessions.iter() {
            let t = s.info.tenant.as_str();
            if tenant.is_some_and(|only| only != t) {
                continue;
            }
            let want = holds.control_for(t);
            s.control.send_if_modified(|c| {
                if matches!(c, Control::Kill(_)) || *c == want {
                    return false;
                }
                *c = want.clone();
                true
            });
            if matches!(*s.control.borrow(), Control::Paused) {
                paused += 1;
            }
        }
        paused
    }

    fn end(&self, entry: &SessionEntry) {
        self.sessions.remove(&entry.id);
        let key = (
            entry.info.tenant.as_str().to_string(),
            entry.info.upstream.to_string(),
        );
        self.ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .add(entry.live.totals());
    }
}

/// A registered session, owned by its task; ending it (drop) removes it from the registry.
pub struct SessionHandle {
    pub entry: Arc<SessionEntry>,
    registry: Arc<SessionRegistry>,
    pub control: watch::Receiver<Control>,
}

impl SessionHandle {
    /// Waits while the session is paused (before it has a server connection). Errors when it
    /// is killed meanwhile or pgtenant shuts down. Cancel-safe.
    pub async fn wait_runnable(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ClientError> {
        loop {
            let control = self.control.borrow_and_update().clone();
            match control {
                Control::Run => return Ok(()),
                Control::Kill(reason) => return Err(ClientError::Killed(reason.to_string())),
                Control::Paused => {}
            }
            self.entry.live.set_state(SessionState::Waiting);
            tokio::select! {
                changed = self.control.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = shutdown.wait_for(|down| *down) => return Err(ClientError::ShuttingDown),
            }
            self.entry.live.set_state(SessionState::Connecting);
        }
    }

    /// The kill reason, if the console killed this session.
    pub fn killed(&self) -> Option<Arc<str>> {
        match &*self.control.borrow() {
            Control::Kill(reason) => Some(reason.clone()),
            _ => None,
        }
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.registry.end(&self.entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(tenant: &str) -> NewSession {
        NewSession {
            tenant: TenantId::new_validated(tenant),
            user: "u".into(),
            upstream: Arc::from("shared"),
            peer: "127.0.0.1:1".parse().unwrap(),
            application_name: None,
            token_expires_at: 0,
        }
    }

    #[test]
    fn pause_resume_and_kill_reach_the_right_sessions() {
        let r = Arc::new(SessionRegistry::default());
        let a = r.register(new("acme")).unwrap();
        let g = r.register(new("globex")).unwrap();
        assert_eq!(r.pause(Some("acme")), 1);
        assert_eq!(*a.control.borrow(), Control::Paused);
        assert_eq!(*g.control.borrow(), Control::Run);
        // A new acme session starts paused.
        let a2 = r.register(new("acme")).unwrap();
        assert_eq!(*a2.control.borrow(), Control::Paused);
        assert_eq!(r.resume(Some("acme")), 0);
        assert_eq!(*a.control.borrow(), Control::Run);
        assert_eq!(r.kill_tenant("globex", "why"), 1);
        assert_eq!(g.killed().as_deref(), Some("why"));
        // A killed session stays killed through PAUSE/RESUME.
        r.pause(None);
        r.resume(None);
        assert_eq!(g.killed().as_deref(), Some("why"));
        assert_eq!(*a.control.borrow(), Control::Run);
    }

    #[test]
    fn suspend_refuses_new_sessions_until_resumed_by_name() {
        let r = Arc::new(SessionRegistry::default());
        let a = r.register(new("acme")).unwrap();
        assert_eq!(r.suspend_tenant("acme", "suspended"), 1);
        assert!(a.killed().is_some());
        assert!(matches!(
            r.register(new("acme")),
            Err(ClientError::TenantSuspended(t)) if t == "acme"
        ));
        r.resume(None);
        assert!(r.register(new("acme")).is_err(), "RESUME alone keeps it");
        r.resume(Some("acme"));
        assert!(r.register(new("acme")).is_ok());
    }

    #[test]
    fn totals_survive_the_session() {
        let r = Arc::new(SessionRegistry::default());
        let a = r.register(new("acme")).unwrap();
        a.entry.live.publish(3, 100, 200);
        assert_eq!(r.totals()[&("acme".into(), "shared".into())].1, 1);
        drop(a);
        assert!(r.sessions().is_empty());
        let (t, open) = r.totals()[&("acme".into(), "shared".into())];
        assert_eq!(open, 0);
        assert_eq!(
            t,
            Totals {
                sessions: 1,
                queries: 3,
                client_bytes: 100,
                server_bytes: 200
            }
        );
    }
}
