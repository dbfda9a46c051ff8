//! Pools of raw, authenticated server connections (bb8), one pool per upstream.
//!
//! The relay speaks the wire protocol on these connections directly; tokio-postgres is
//! not involved on the data path.

mod target;

pub use target::UpstreamTarget;
