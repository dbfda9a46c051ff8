//! Pools of raw, authenticated server connections (bb8), one pool per upstream.
//!
//! The relay speaks the wire protocol on these connections directly; tokio-postgres is
//! not involved on the data path.
//!
//! - `target`: where to connect (parsed upstream URL)
//! - `tls`: rustls client config per upstream, `ServerStream`
//! - `server_conn`: `ServerConn`: connect + authenticate, session settings, reset
//! - `manager`: the bb8 `ManageConnection` and the connect-failure record
//! - `checkout`: `Pools`: checkout with fail-fast, `checkout_ready`, stats
//! - `wire`: pure frame/message helpers
//! - `txn_pool`: `TxnPool` (`pool_mode = "transaction"`): per-transaction leases with
//!   tenant affinity, a per-tenant cap and fair waiting
//!
//! A session's life with a server connection:
//! ```text
//! let mut conn = pools.checkout_ready(upstream, &[(tenant_setting, tenant_id)]).await?;
//! ... relay (continue from conn.read_buf; keep tx_status/params/broken current) ...
//! let _ = conn.reset().await;   // before the guard drops: check-in is synchronous
//! drop(conn);                   // back to the pool if clean, destroyed otherwise
//! ```

mod checkout;
mod manager;
mod server_conn;
mod target;
mod tls;
pub mod txn_pool;
pub(crate) mod wire;

pub use checkout::{
    PoolError, PoolStats, PooledServer, Pools, MAX_SETUP_ATTEMPTS, RECONNECT_BACKOFF,
};
pub use manager::{ServerConnManager, UPSTREAM_CONNECT_ERRORS};
pub use server_conn::{ServerConn, ServerError, APPLICATION_NAME, RESET_TIMEOUT};
pub use target::UpstreamTarget;
pub(crate) use tls::encrypt_only_client_config;
pub use tls::{ServerStream, ServerTls};
pub use txn_pool::{Acquired, Settings, TxnLease, TxnPool};

#[cfg(test)]
mod tests;
