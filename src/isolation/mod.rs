//! Tenant isolation on shared upstreams.
//!
//! - `guard`: the SQL guard, which blocks statements that would change or clear the tenant
//!   context (or the session's identity) before they reach the server. A first line of
//!   defence with clear errors and metrics; the security property itself comes from a
//!   tenant context the client cannot write (see `design/isolation.md`).

pub mod guard;
