//! Which statements one server connection has prepared, under which names; bounded LRU.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::client::StatementDef;

/// A server-side statement name: `pgt_<hash as 16 hex digits>`, plus `_<probe>` when another
/// statement with the same hash already holds the plain name on that connection. Copy and
/// allocation-free; formatted only when written into a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerName {
    pub hash: u64,
    pub probe: u32,
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.probe {
            0 => write!(f, "pgt_{:016x}", self.hash),
            n => write!(f, "pgt_{:016x}_{n}", self.hash),
        }
    }
}

#[derive(Debug)]
struct Slot {
    def: Arc<StatementDef>,
    /// Tick of the last use (LRU order).
    used: u64,
    /// Epoch of the last Bind: a portal built from it may still be open until the
    /// transaction ends. PostgreSQL keeps such a portal when its statement is closed
    /// (tests/prepared.rs checks it; the protocol docs say the opposite), so this is
    /// caution: an eviction never touches a statement the open transaction uses.
    bound: u64,
}

/// Statements prepared on one server connection. Names are recorded when their `Parse` is
/// sent and rolled back if the server skips or fails it (see `answers`).
#[derive(Debug)]
pub struct ServerStatements {
    slots: HashMap<ServerName, Slot>,
    tick: u64,
    /// Advances at every ReadyForQuery 'I' (no transaction, so no portal is open).
    epoch: u64,
    max: usize,
}

impl ServerStatements {
    pub fn new(max: usize) -> Self {
        ServerStatements {
            slots: HashMap::new(),
            tick: 0,
            epoch: 1,
            max: max.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The names recorded as prepared (any order).
    pub fn names(&self) -> impl Iterator<Item = ServerName> + '_ {
        self.slots.keys().copied()
    }

    pub fn contains(&self, name: ServerName) -> bool {
        self.slots.contains_key(&name)
    }

    /// The name `def` has (or would get) on this connection, and whether it is prepared.
    /// Probes past names whose hash matches but whose content differs (a collision).
    pub fn resolve(&self, def: &StatementDef) -> (ServerName, bool) {
        let mut name = ServerName {
            hash: def.hash,
            probe: 0,
        };
        loop {
            match self.slots.get(&name) {
                None => return (name, false),
                Some(slot) if slot.def.same_content(def) => return (name, true),
                Some(_) => name.probe += 1,
            }
        }
    }

    /// The connection was reset (`DISCARD ALL`): nothing is prepared any more.
    pub fn clear(&mut self) {
        self.slots.clear();
    }

    /// The server reported ReadyForQuery outside a transaction: no portal survives.
    pub fn on_idle(&mut self) {
        self.epoch += 1;
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    pub(super) fn touch(&mut self, name: ServerName) {
        let tick = self.next_tick();
        if let Some(slot) = self.slots.get_mut(&name) {
            slot.used = tick;
        }
    }

    /// A Bind uses it: not evicted before the transaction ends.
    pub(super) fn protect(&mut self, name: ServerName) {
        let epoch = self.epoch;
        if let Some(slot) = self.slots.get_mut(&name) {
            slot.bound = epoch;
        }
    }

    pub(super) fn insert(&mut self, name: ServerName, def: Arc<StatementDef>) {
        let used = self.next_tick();
        self.slots.insert(
            name,
            Slot {
                def,
                used,
                bound: 0,
            },
        );
    }

    pub(super) fn remove(&mut self, name: ServerName) -> Option<Arc<StatementDef>> {
        self.slots.remove(&name).map(|s| s.def)
    }

    /// Undo of an eviction the server skipped: the statement is still there.
    pub(super) fn restore(&mut self, name: ServerName, def: Arc<StatementDef>) {
        if !self.slots.contains_key(&name) {
            self.insert(name, def);
        }
    }

    /// Makes room for one more statement: removes and returns the least recently used one
    /// that no open portal may depend on. None when there is room, or when every statement
    /// is protected (the bound is then exceeded until the transaction ends).
    /// `keep` names statements that must not go either.
    pub(super) fn evict_for_insert(
        &mut self,
        keep: impl Fn(ServerName) -> bool,
    ) -> Option<(ServerName, Arc<StatementDef>)> {
        if self.slots.len() < self.max {
            return None;
        }
        let epoch = self.epoch;
        let victim = self
            .slots
            .iter()
            .filter(|(name, s)| s.bound != epoch && !keep(**name))
            .min_by_key(|(_, s)| s.used)
            .map(|(name, _)| *name)?;
        self.remove(victim).map(|def| (victim, def))
    }

    /// `DEALLOCATE ALL` / `DISCARD ALL` by the client: everything, for a possible undo.
    pub(super) fn take_all(&mut self) -> Vec<(ServerName, Arc<StatementDef>)> {
        self.slots.drain().map(|(n, s)| (n, s.def)).collect()
    }
}
