//! `pathprobe-agent`: what runs on each site's servers and Azure VMs.
//!
//! The STAMP reflector ([`reflector`]); the probe [`engine`] (one timetable and three
//! threads for every path: sender, receiver, aggregator) with its sans-IO accounting ([`engine::session`]) and the probe kinds that run on it ([`probe`]:
//! STAMP, `tcp-syn`, `tcp-connect`), pinned to their path ([`pin`]), over batched
//! kernel-timestamped sockets ([`sys`]); the path's signature and
//! its change events ([`watch`]), with a [`trace`] of the new route; the long-running agent
//! ([`daemon`]), which runs a validated [`plan`] and pushes every window report to the
//! collector through [`delivery`]; and packet decoding for people ([`decode`]).

pub mod capacity;
pub mod daemon;
pub mod decode;
pub mod delivery;
#[cfg(feature = "demo")]
pub mod demo;
pub mod emulate;
pub mod engine;
mod error;
pub mod failover;
pub mod fleet;
pub mod hexbytes;
pub mod keyfile;
pub mod output;
pub mod pin;
pub mod plan;
pub mod probe;
pub mod reflector;
pub mod sys;
pub mod trace;
pub mod watch;

pub use error::{Error, Result};
