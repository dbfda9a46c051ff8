//! One client's named prepared statements: client name → definition.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// What a `Parse` defines: the SQL text and the parameter-type block, both as the client
/// sent them (never decoded, so the server sees exactly the same bytes).
#[derive(Debug, PartialEq, Eq)]
pub struct StatementDef {
    /// SQL text without its NUL.
    pub query: Box<[u8]>,
    /// The `Parse` body after the text: Int16 count, then that many Int32 type OIDs.
    pub param_types: Box<[u8]>,
    /// Hash of both, the base of the server name.
    pub hash: u64,
}

impl StatementDef {
    pub fn new(query: &[u8], param_types: &[u8]) -> Arc<StatementDef> {
        Arc::new(StatementDef {
            query: query.into(),
            param_types: param_types.into(),
            hash: content_hash(query, param_types),
        })
    }

    /// Same text and types (a hash match alone may be a collision).
    pub fn same_content(&self, other: &StatementDef) -> bool {
        std::ptr::eq(self, other)
            || self.hash == other.hash
                && self.query == other.query
                && self.param_types == other.param_types
    }
}

/// Deterministic within the process (SipHash with fixed keys), so every client computes the
/// same server name for the same statement. Collisions are resolved by `ServerStatements`.
pub(super) fn content_hash(query: &[u8], param_types: &[u8]) -> u64 {
    #[allow(deprecated)] // SipHasher: stable, keyed with zeros on purpose (see above).
    let mut h = std::hash::SipHasher::new();
    query.hash(&mut h);
    param_types.hash(&mut h);
    h.finish()
}

/// The client's statements, bounded: one `Parse` past `max` is refused (53400) rather than
/// forgetting an older statement the client still expects to exist.
#[derive(Debug)]
pub struct ClientStatements {
    map: HashMap<Box<[u8]>, Arc<StatementDef>>,
    max: usize,
}

impl ClientStatements {
    pub fn new(max: usize) -> Self {
        ClientStatements {
            map: HashMap::new(),
            max,
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<&Arc<StatementDef>> {
        self.map.get(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.map.len() >= self.max
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub(super) fn insert(&mut self, name: &[u8], def: Arc<StatementDef>) {
        self.map.insert(name.into(), def);
    }

    pub(super) fn remove(&mut self, name: &[u8]) -> Option<Arc<StatementDef>> {
        self.map.remove(name)
    }

    /// Undo of a `Parse` that did not happen: removes `name` only if it still holds `def`
    /// (a later, pipelined Close + Parse of the same name must survive).
    pub(super) fn remove_if_same(&mut self, name: &[u8], def: &Arc<StatementDef>) {
        if self.map.get(name).is_some_and(|d| Arc::ptr_eq(d, def)) {
            self.map.remove(name);
        }
    }

    /// Undo of a `Close` that did not happen.
    pub(super) fn restore(&mut self, name: Box<[u8]>, def: Arc<StatementDef>) {
        self.map.entry(name).or_insert(def);
    }

    /// `DEALLOCATE ALL`: everything, for a possible undo.
    pub(super) fn take_all(&mut self) -> Vec<(Box<[u8]>, Arc<StatementDef>)> {
        self.map.drain().collect()
    }
}
