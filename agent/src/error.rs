//! The one error type of `pathprobe-agent`'s library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// A system call that failed.
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A spool directory the agent cannot write.
    #[error(
        "the spool {} cannot be written: {source}; give the agent's user write access to it, or set spool_dir (--spool) to a writable directory",
        dir.display()
    )]
    Spool {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// A port below 1024 without the privilege to bind it.
    #[error(
        "binding UDP {addr} needs root or CAP_NET_BIND_SERVICE (ports below 1024 are privileged): run as root, grant it with `setcap cap_net_bind_service=+ep $(which pathprobe-agent)`, or use another port, e.g. --listen {suggestion}"
    )]
    Privileged {
        addr: SocketAddr,
        suggestion: SocketAddr,
    },
    /// Something else already listens there.
    #[error(
        "UDP {addr} is already in use: another reflector (or router daemon) listens there; stop it or choose another --listen port"
    )]
    AddrInUse { addr: SocketAddr },
    /// A setting that cannot work.
    #[error("{0}")]
    Config(String),
    /// The target never answered.
    #[error(
        "no reply from {target} within {after:?}: check that a STAMP reflector runs there (`pathprobe-agent reflect`), that UDP to its port is allowed both ways, and the --auth-key-file on both ends"
    )]
    NoReply { target: SocketAddr, after: Duration },
    /// The target's host said nothing listens on the port (ICMP port unreachable).
    #[error(
        "{target} answered \"port unreachable\": no reflector listens on that port; start one with `pathprobe-agent reflect --listen {target}`"
    )]
    Unreachable { target: SocketAddr },
    /// A wire-format error.
    #[error(transparent)]
    Proto(#[from] pathprobe_proto::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
