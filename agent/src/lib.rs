//! `pathprobe-agent`: what runs on each site's servers and Azure VMs.
//!
//! The STAMP reflector ([`reflector`]) and prober ([`probe`]) with their sans-IO accounting
//! ([`session`]) over batched kernel-timestamped sockets ([`sys`]); the path's signature and
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
mod error;
pub mod failover;
pub mod hexbytes;
pub mod keyfile;
pub mod output;
pub mod plan;
pub mod probe;
pub mod reflector;
pub mod session;
pub mod sys;
pub mod tcp;
pub mod trace;
pub mod watch;

pub use error::{Error, Result};
