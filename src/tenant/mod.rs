//! Tenant identity and routing: which upstream serves a verified tenant (the live
//! `directory` first when configured, then the static `Router`).

pub mod directory;
mod router;

pub use directory::{resolve, Directory, DirectoryConfig, DirectoryError, ResolveError, Resolved};
pub use router::{Route, RouteError, Router};

use std::fmt;
use std::sync::Arc;

/// A tenant id taken from a verified JWT and checked against the configured pattern.
/// Only constructed by `auth`, so holding one means the id passed validation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// Wraps an id that already matched the tenant pattern.
    pub fn new_validated(id: &str) -> Self {
        TenantId(Arc::from(id))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}
