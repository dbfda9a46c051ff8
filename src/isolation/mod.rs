//! Tenant isolation on shared upstreams (design/isolation.md).
//!
//! - `signed`: the signed tenant context that a client cannot write (SQL install script,
//!   key management, the proxy's `enter`/`leave` round trips)

pub mod signed;
