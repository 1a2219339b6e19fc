//! The one error type of `pathprobe-collector`'s library.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong in the collector's library code.
#[derive(Debug, Error)]
pub enum Error {
    /// A report file that cannot be read.
    #[error("cannot read report file {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A report that cannot be decoded or merged.
    #[error("report {origin}: {source}")]
    Report {
        origin: String,
        source: pathprobe_proto::Error,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
