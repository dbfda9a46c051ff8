//! The bookkeeping of a transaction-mode pool, without I/O: which idle connection carries
//! which tenant, how many connections each tenant holds, and the fair wait queues. Generic
//! over the connection type so the decisions are unit-tested without a server.
//!
//! Order of preference for a checkout of tenant T (under both caps):
//! 1. an idle connection that carries T's context (affinity, newest first: LIFO keeps the
//!    working set small and lets surplus connections age out);
//! 2. an idle connection that carries no tenant at all (new or already reset);
//! 3. a new connection, if the pool is under `size`;
//! 4. another tenant's idle connection, oldest first, to be reset before use (a switch).
//!
//! Nothing is granted to a tenant at its cap, so a tenant saturating its quota leaves the
//! rest of the pool to the others. Waiters queue per tenant (FIFO) and are served
//! round-robin across tenants.

use std::collections::{HashMap, VecDeque};

/// Tenant-keyed maps, looked up several times per checkout and check-in under the pool's
/// lock: a fast hasher (keys are tenant ids, not attacker-chosen in bulk: a client cannot
/// pick its tenant, its token does).
type TenantMap<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;
use std::sync::Arc;
use std::time::Instant;

/// An idle connection and what it carries.
#[derive(Debug)]
pub struct Idle<C, K> {
    pub conn: C,
    /// The tenant whose context (and settings `K`) the connection carries; `None`: no
    /// tenant context at all (just connected, or reset).
    pub carried: Option<(Arc<str>, K)>,
    pub since: Instant,
}

/// What a checkout is given.
#[derive(Debug)]
pub enum Grant<C, K> {
    /// An idle connection (to be checked, and reset when it carries another tenant).
    Idle(Idle<C, K>),
    /// A slot to open a new connection in (already counted in `open`).
    Open,
}

#[derive(Debug)]
struct Waiter<T> {
    id: u64,
    tx: T,
}

/// The pool's state under its mutex. `T` is the waiter's reply channel.
#[derive(Debug)]
pub struct State<C, K, T> {
    pub size: u32,
    pub tenant_cap: u32,
    /// Established and connecting connections.
    pub open: u32,
    pub idle: Vec<Idle<C, K>>,
    /// Connections held (checked out or connecting) per tenant.
    held: TenantMap<u32>,
    queues: TenantMap<VecDeque<Waiter<T>>>,
    /// Tenants with waiters, in the order they are served next.
    turn: VecDeque<Arc<str>>,
    next_id: u64,
}

impl<C, K, T> State<C, K, T> {
    pub fn new(size: u32, tenant_cap: u32) -> Self {
        State {
            size,
            tenant_cap: tenant_cap.clamp(1, size.max(1)),
            open: 0,
            idle: Vec::new(),
            held: TenantMap::default(),
            queues: TenantMap::default(),
            turn: VecDeque::new(),
            next_id: 0,
        }
    }

    pub fn held(&self, tenant: &str) -> u32 {
        self.held.get(tenant).copied().unwrap_or(0)
    }

    pub fn waiting(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// A grant for `tenant` if one is possible now (counted as held), in the order of the
    /// module doc. A tenant with waiters of its own gets nothing here: they come first.
    pub fn try_take(&mut self, tenant: &Arc<str>) -> Option<Grant<C, K>> {
        if self.queues.get(tenant).is_some_and(|q| !q.is_empty()) {
            return None;
        }
        self.pick(tenant)
    }

    fn pick(&mut self, tenant: &Arc<str>) -> Option<Grant<C, K>> {
        if self.held(tenant) >= self.tenant_cap {
            return None;
        }
        let same = self
            .idle
            .iter()
            .rposition(|i| i.carried.as_ref().is_some_and(|(t, _)| t == tenant));
        let clean = || self.idle.iter().rposition(|i| i.carried.is_none());
        let grant = if let Some(at) = same.or_else(clean) {
            Grant::Idle(self.idle.remove(at))
        } else if self.open < self.size {
            self.open += 1;
            Grant::Open
        } else if !self.idle.is_empty() {
            // Oldest first: the tenant that used it least recently loses it.
            Grant::Idle(self.idle.remove(0))
        } else {
            return None;
        };
        *self.held.entry(tenant.clone()).or_insert(0) += 1;
        Some(grant)
    }

    /// Queues a waiter for `tenant`; returns its id (for `cancel`).
    pub fn enqueue(&mut self, tenant: &Arc<str>, tx: T) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let queue = self.queues.entry(tenant.clone()).or_default();
        if queue.is_empty() {
            self.turn.push_back(tenant.clone());
        }
        queue.push_back(Waiter { id, tx });
        id
    }

    /// Removes a waiter that gave up; false when it was already served.
    pub fn cancel(&mut self, tenant: &str, id: u64) -> bool {
        let Some(queue) = self.queues.get_mut(tenant) else {
            return false;
        };
        let Some(at) = queue.iter().position(|w| w.id == id) else {
            return false;
        };
        queue.remove(at);
        if queue.is_empty() {
            self.queues.remove(tenant);
            self.turn.retain(|t| &**t != tenant);
        }
        true
    }

    /// A held connection of `tenant` comes back: idle again (`Some`) or destroyed (`None`).
    pub fn check_in(&mut self, tenant: &str, idle: Option<Idle<C, K>>) {
        self.unhold(tenant);
        match idle {
            Some(idle) => self.idle.push(idle),
            None => self.open = self.open.saturating_sub(1),
        }
    }

    /// Gives a grant that could not be delivered back.
    pub fn undo(&mut self, tenant: &str, grant: Grant<C, K>) {
        match grant {
            Grant::Idle(idle) => self.check_in(tenant, Some(idle)),
            Grant::Open => self.check_in(tenant, None),
        }
    }

    fn unhold(&mut self, tenant: &str) {
        if let Some(n) = self.held.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(tenant);
            }
        }
    }

    /// Serves waiters while anything can be granted: one waiter per tenant per round, tenants
    /// in turn. Returns the (waiter, grant, tenant) triples to deliver; delivery happens
    /// under the same lock by the caller, which calls `undo` for a waiter that is gone.
    pub fn dispatch(&mut self) -> Vec<(T, Grant<C, K>, Arc<str>)> {
        let mut out = Vec::new();
        loop {
            let mut served = false;
            let mut i = 0;
            // A tenant that cannot be served keeps its place; a served one goes to the back.
            while i < self.turn.len() {
                let tenant = self.turn[i].clone();
                let Some(grant) = self.pick(&tenant) else {
                    i += 1;
                    continue;
                };
                self.turn.remove(i);
                let waiter = self.queues.get_mut(&tenant).and_then(VecDeque::pop_front);
                match waiter {
                    Some(w) => {
                        out.push((w.tx, grant, tenant.clone()));
                        served = true;
                    }
                    None => self.undo(&tenant, grant),
                }
                if self.queues.get(&tenant).is_some_and(|q| !q.is_empty()) {
                    self.turn.push_back(tenant);
                } else {
                    self.queues.remove(&tenant);
                }
            }
            if !served {
                return out;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type S = State<&'static str, (), &'static str>;

    fn t(name: &str) -> Arc<str> {
        name.into()
    }

    fn idle(conn: &'static str, tenant: Option<&str>) -> Idle<&'static str, ()> {
        Idle {
            conn,
            carried: tenant.map(|t| (t.into(), ())),
            since: Instant::now(),
        }
    }

    fn conn_of(g: Grant<&'static str, ()>) -> &'static str {
        match g {
            Grant::Idle(i) => i.conn,
            Grant::Open => "new",
        }
    }

    #[test]
    fn affinity_first_then_clean_then_new_then_switch() {
        let mut s = S::new(3, 3);
        s.open = 2;
        s.idle.push(idle("a1", Some("a")));
        s.idle.push(idle("clean", None));
        assert_eq!(conn_of(s.try_take(&t("a")).unwrap()), "a1");
        s.idle.push(idle("a2", Some("a")));
        // b has no connection of its own: the clean one before a new one.
        assert_eq!(conn_of(s.try_take(&t("b")).unwrap()), "clean");
        // Then a new one while under the pool size.
        assert_eq!(conn_of(s.try_take(&t("b")).unwrap()), "new");
        assert_eq!(s.open, 3);
        // Full: b takes a's idle connection (a switch).
        assert_eq!(conn_of(s.try_take(&t("b")).unwrap()), "a2");
        assert!(s.try_take(&t("c")).is_none());
    }

    #[test]
    fn affinity_is_lifo_and_switches_take_the_oldest() {
        let mut s = S::new(3, 3);
        s.open = 3;
        s.idle.push(idle("a-old", Some("a")));
        s.idle.push(idle("b-old", Some("b")));
        s.idle.push(idle("a-new", Some("a")));
        assert_eq!(conn_of(s.try_take(&t("a")).unwrap()), "a-new");
        assert_eq!(conn_of(s.try_take(&t("c")).unwrap()), "a-old");
    }

    #[test]
    fn a_tenant_at_its_cap_gets_nothing_even_with_idle_connections() {
        let mut s = S::new(4, 2);
        assert!(s.try_take(&t("a")).is_some());
        assert!(s.try_take(&t("a")).is_some());
        assert_eq!(s.held("a"), 2);
        assert!(s.try_take(&t("a")).is_none(), "cap 2");
        assert!(s.try_take(&t("b")).is_some(), "b is not limited by a's cap");
        s.check_in("a", Some(idle("a1", Some("a"))));
        assert_eq!(s.held("a"), 1);
        assert_eq!(conn_of(s.try_take(&t("a")).unwrap()), "a1");
    }

    #[test]
    fn waiters_are_served_round_robin_across_tenants_fifo_within() {
        let mut s = S::new(1, 1);
        assert!(matches!(s.try_take(&t("x")), Some(Grant::Open)));
        s.enqueue(&t("a"), "a1");
        s.enqueue(&t("a"), "a2");
        s.enqueue(&t("a"), "a3");
        s.enqueue(&t("b"), "b1");
        s.enqueue(&t("c"), "c1");
        assert!(
            s.try_take(&t("a")).is_none(),
            "a new arrival does not jump its tenant's queue"
        );
        let mut order = Vec::new();
        let mut current = t("x");
        for _ in 0..5 {
            s.check_in(&current, Some(idle("conn", Some(&current))));
            let served = s.dispatch();
            assert_eq!(served.len(), 1, "one connection, one waiter");
            let (who, _, tenant) = served.into_iter().next().unwrap();
            order.push(who);
            current = tenant;
        }
        assert_eq!(order, ["a1", "b1", "c1", "a2", "a3"]);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_capped_tenants_waiter_does_not_block_others() {
        let mut s = S::new(2, 1);
        assert!(s.try_take(&t("a")).is_some());
        assert!(s.try_take(&t("b")).is_some());
        s.enqueue(&t("a"), "a-extra");
        s.enqueue(&t("b"), "b-next");
        // b's connection comes back: a is still at its cap, so b's waiter gets it.
        s.check_in("b", Some(idle("b1", Some("b"))));
        let served = s.dispatch();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].0, "b-next");
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn cancelled_waiters_leave_the_queue_and_undo_returns_the_grant() {
        let mut s = S::new(1, 1);
        assert!(s.try_take(&t("a")).is_some());
        let id = s.enqueue(&t("b"), "b1");
        assert!(s.cancel("b", id));
        assert!(!s.cancel("b", id), "already gone");
        s.check_in("a", None);
        assert!(s.dispatch().is_empty());
        assert_eq!(s.open, 0);
        let g = s.try_take(&t("b")).unwrap();
        assert_eq!(s.held("b"), 1);
        s.undo("b", g);
        assert_eq!((s.held("b"), s.open), (0, 0));
    }
}
