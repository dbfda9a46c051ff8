//! `pgtenant demo`: a throwaway PostgreSQL with dedicated and shared tenants, and a config
//! to run the proxy against it.
//!
//! - `data`: the dataset (tenants, roles, rows), shared with tests as the source of truth
//! - `provision`: creates it on a [`crate::embedded_pg::TempPg`] and writes the config,
//!   JWT secret and TLS files; prints ready-to-paste client commands

pub mod data;
pub mod provision;
mod run;

pub use provision::{instructions, provision, DemoEnv};
pub use run::run;

#[cfg(test)]
mod tests;
