//! `pathprobe-collector`: receives agents' window reports and answers how paths compare.
//!
//! So far: exact per-path summaries of report files ([`inspect`]).

mod error;
pub mod inspect;
pub mod store;

pub use error::{Error, Result};
