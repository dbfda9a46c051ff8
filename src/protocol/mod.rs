//! PostgreSQL wire protocol: frame headers, tags, and the few backend messages pgtenant
//! writes itself. No I/O policy and no tenant knowledge lives here.

pub mod frame;
pub mod messages;
pub mod tags;

pub use frame::{read_frame, FrameError, FrameScanner, ScanEvent};
