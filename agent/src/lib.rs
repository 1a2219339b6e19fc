//! `pathprobe-agent`: what runs on each site's servers and Azure VMs.
//!
//! So far: reading STAMP packets ([`decode`]) and STAMP keys ([`keyfile`]).

pub mod decode;
mod error;
pub mod hexbytes;
pub mod keyfile;
pub mod output;
pub mod probe;
pub mod reflector;
pub mod session;
pub mod sys;

pub use error::{Error, Result};
