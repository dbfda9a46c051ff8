//! pgtenant: a tenant-aware PostgreSQL wire-protocol proxy.
//!
//! Clients connect as to PostgreSQL with a JWT as the password. pgtenant verifies it,
//! takes the tenant from its claims, and either routes the session to the tenant's own
//! database or pins a pooled connection to a shared database with the tenant context set.
//!
//! Layout (see ARCHITECTURE.md):
//! - `config`: TOML config, env expansion, validation
//! - `protocol`: frames and messages; no I/O policy, no tenant knowledge
//! - `auth`: JWT verification, keys; returns an `Identity`
//! - `tenant`: `TenantId`, routing of tenants to upstreams
//! - `isolation`: the signed tenant context on shared upstreams
//! - `pool`: server connections (bb8 manager), checkout, reset
//! - `prepared`: named prepared statements across server connections (rename, re-Parse)
//! - `isolation`: the SQL guard (blocks statements that would change the tenant context)
//! - `cluster`: replica ids in cancel keys, forwarding cancels to peers
//! - `session`: one client: startup → auth → route → checkout → relay
//! - `server`: listener, accept loop, shutdown
//! - `console`: the admin console (virtual database `pgtenant`: SHOW, PAUSE, KILL, RELOAD, ...)
//! - `audit`: audit events, the local spool, shipping to the audit table
//! - `metrics`, `admin`: metric names and the HTTP endpoint
//! - `error`: every error mapped to SQLSTATE at the edge
//! - `isolation`: `doctor`, the database-side isolation checks of shared upstreams
//! - `embedded_pg`: a throwaway PostgreSQL cluster (`TempPg`) for the demo and tests
//! - `demo`: demo data provisioning and config for `pgtenant demo`

#![deny(clippy::unwrap_used, clippy::dbg_macro, clippy::todo)]
// Tests may unwrap: a panic there is a failed test, not a crashed proxy.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cancel;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod console;
pub mod demo;
pub mod embedded_pg;
pub mod error;
pub mod isolation;
pub mod metrics;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod server;
pub mod session;
pub mod tenant;
pub mod tls;
