//! The one error type of `pathprobe-agent`'s library.

use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong in the agent's library code.
#[derive(Debug, Error)]
pub enum Error {
    /// A key file that cannot be read.
    #[error(
        "cannot read key file {}: {source}; create one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {}`",
        path.display(),
        path.display()
    )]
    KeyFileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A key file whose contents are not a usable key.
    #[error("key file {}: {reason}", path.display())]
    KeyFileFormat { path: PathBuf, reason: String },
    /// Text that should be hexadecimal octets and is not.
    #[error("{0}")]
    Hex(String),
    /// A wire-format error.
    #[error(transparent)]
    Proto(#[from] pathprobe_proto::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
