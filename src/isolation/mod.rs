//! Tenant isolation on shared upstreams (design/isolation.md).
//!
//! - `signed`: the signed tenant context that a client cannot write (SQL install script,
//!   key management, the proxy's `enter`/`leave` round trips): the security boundary
//! - `guard`: the SQL guard, which blocks statements that would change or clear the tenant
//!   context (or the session's identity) before they reach the server: a first line with
//!   clear errors and metrics, not the boundary
//! - `doctor`: `pgtenant doctor`, inspects a shared upstream for misconfigurations that break
//!   row-level-security isolation ("Hardening checklist")

pub mod doctor;
pub mod guard;
pub mod signed;
