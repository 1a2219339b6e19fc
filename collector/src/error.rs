//! The one error type of `pathprobe-collector`'s library.

use std::net::SocketAddr;
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
    /// The store cannot be opened.
    #[error("cannot open the store {}: {source}; check the path and its permissions", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// There is no store there.
    #[error("no store at {}: start `pathprobe-collector serve --db {}` first, or check --db", path.display(), path.display())]
    Missing { path: PathBuf },
    /// The store was written by another version.
    #[error(
        "the store has schema version {found} but this build knows {expected}: use the pathprobe-collector that wrote it, or a newer one"
    )]
    SchemaVersion { found: i64, expected: i64 },
    /// A store operation failed.
    #[error("store: cannot {what}: {source}")]
    Db {
        what: String,
        source: rusqlite::Error,
    },
    /// Stored data that does not decode.
    #[error("store holds corrupt data ({what}): {source}")]
    Corrupt {
        what: String,
        source: pathprobe_proto::Error,
    },
    /// A setting or a file that cannot work; the message says where and why.
    #[error("{0}")]
    Config(String),
    /// The listening address cannot be used.
    #[error(
        "cannot serve on {addr}: {source}; choose another --listen address or stop what uses it"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A report that would give its agent more paths than the collector keeps for one.
    #[error(
        "report {index} would give agent `{agent}` more than {limit} paths: remove paths from its configuration, or raise --max-paths-per-agent on the collector"
    )]
    TooManyPaths {
        index: usize,
        agent: String,
        limit: u64,
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
