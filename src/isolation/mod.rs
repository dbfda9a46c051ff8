//! Tenant isolation on shared upstreams: checks that the database enforces it.
//!
//! - `doctor`: `pgtenant doctor`, inspects a shared upstream for misconfigurations that break
//!   row-level-security isolation (design/isolation.md, "Hardening checklist")

pub mod doctor;
