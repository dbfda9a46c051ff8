//! Verdicts by statement text: a bounded concurrent map.
//!
//! Applications repeat a small set of statement texts (ORMs, prepared statements), so
//! caching the verdict skips the parse for all but the first. Bounds: texts longer than
//! `max_text` are not cached, and when the map reaches `max_entries` or `max_bytes` of
//! text it is cleared and refills with what is in use. Clearing is O(entries) but happens
//! once per `max_entries` inserts; a workload of ever-new texts gains nothing from any
//! cache, and a workload of repeated ones refills in one parse per text.

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use super::Verdict;

/// Limits of the verdict cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Entries before the cache is cleared. 0 disables the cache.
    pub max_entries: usize,
    /// Total bytes of cached text before the cache is cleared.
    pub max_bytes: usize,
    /// Longer texts are checked every time.
    pub max_text: usize,
}

impl Default for CacheLimits {
    /// 10,000 entries, 16 MiB of text, texts up to 8 KiB.
    fn default() -> Self {
        CacheLimits {
            max_entries: 10_000,
            max_bytes: 16 << 20,
            max_text: 8 << 10,
        }
    }
}

pub(super) struct VerdictCache {
    map: DashMap<Box<str>, Verdict>,
    /// Bytes of text in `map`; approximate under concurrent clears, never unbounded.
    bytes: AtomicUsize,
    limits: CacheLimits,
}

impl VerdictCache {
    pub fn new(limits: CacheLimits) -> Self {
        VerdictCache {
            map: DashMap::new(),
            bytes: AtomicUsize::new(0),
            limits,
        }
    }

    pub fn get(&self, sql: &str) -> Option<Verdict> {
        if !self.cacheable(sql) {
            return None;
        }
        self.map.get(sql).map(|v| v.clone())
    }

    pub fn insert(&self, sql: &str, verdict: &Verdict) {
        if !self.cacheable(sql) {
            return;
        }
        let bytes = self.bytes.fetch_add(sql.len(), Ordering::Relaxed) + sql.len();
        if self.map.len() >= self.limits.max_entries || bytes > self.limits.max_bytes {
            self.map.clear();
            self.bytes.store(sql.len(), Ordering::Relaxed);
        }
        if self.map.insert(sql.into(), verdict.clone()).is_some() {
            // Another session cached the same text meanwhile.
            self.bytes.fetch_sub(sql.len(), Ordering::Relaxed);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn cacheable(&self, sql: &str) -> bool {
        self.limits.max_entries > 0 && sql.len() <= self.limits.max_text
    }
}
