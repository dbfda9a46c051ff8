//! Tenant isolation on shared upstreams (design/isolation.md).
//!
//! - `signed`: the signed tenant context that a client cannot write (SQL install script,
//!   key management, the proxy's `enter`/`leave` round trips)
//! - `doctor`: `pgtenant doctor`, inspects a shared upstream for misconfigurations that break
//!   row-level-security isolation ("Hardening checklist")

pub mod doctor;
pub mod signed;
