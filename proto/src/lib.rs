//! `pathprobe-proto`: the wire formats of pathprobe and nothing else.
//!
//! - [`stamp`]: STAMP test packets (RFC 8762, RFC 8972 TLVs), checked zero-copy views,
//!   validated representations and the reflector's packet logic.
//! - [`hist`]: the one histogram configuration per metric and the V2 codec (V2+DEFLATE
//!   above 512 octets).
//! - [`report`]: the versioned window report an agent sends to the collector.
//! - [`event`]: a path's signature (hop counts, DSCP) and the events it raises.
//! - [`ingest`]: what the collector answers to a batch of reports.
//! - [`capacity`]: the load datagram and the control messages of a capacity test.
//! - [`rate`]: bit rates (`50mbit`) and fractions (`95%`) as people write them.
//! - [`plan`]: agent.toml's sections, which the fleet planner serves too.
//!
//! No sockets, threads or clock reads: time is always an argument.

pub mod capacity;
#[cfg(feature = "client")]
pub mod client;
mod error;
pub mod event;
pub mod hist;
pub mod ingest;
pub mod plan;
pub mod rate;
pub mod report;
pub mod secrets;
pub mod stamp;

pub use error::{Error, Result};
