//! The one error type of `pathprobe-proto`.

use thiserror::Error;

/// Everything that can go wrong when reading or writing a wire format.
///
/// Variants carry what failed and where, so that a log line or a CLI message can name the
/// problem without the caller adding context.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// A packet or buffer is shorter than the structure it must hold.
    #[error("{what} needs {needed} octets but only {len} are present")]
    Truncated {
        what: &'static str,
        len: usize,
        needed: usize,
    },
    /// A PTPv2 truncated timestamp whose nanoseconds field is not below `10^9`.
    #[error("PTP timestamp nanoseconds field {0} is out of range (must be below 1,000,000,000)")]
    PtpNanosOutOfRange(u32),
    /// An NTP timestamp from before 1970, which no pathprobe peer can have sent.
    #[error("NTP timestamp seconds field {0:#010x} is before 1970")]
    NtpBeforeUnixEpoch(u32),
    /// A time that cannot be written in the requested timestamp format.
    #[error("{unix_nanos} ns since 1970 cannot be written as a {format} timestamp")]
    TimestampOutOfRange {
        unix_nanos: u64,
        format: &'static str,
    },
    /// The HMAC of an authenticated packet does not match.
    #[error(
        "HMAC check failed: the packet was altered in transit or the two ends use different keys"
    )]
    AuthenticationFailed,
    /// An authentication key that HMAC-SHA-256 as STAMP uses it cannot accept.
    #[error("authentication key of {len} octets is too short: use at least {min} random octets")]
    KeyTooShort { len: usize, min: usize },
    /// A TLV that cannot be read.
    #[error("TLV at octet {offset}: {reason}")]
    MalformedTlv { offset: usize, reason: &'static str },
    /// An encoded histogram that cannot be decoded or does not fit the metric's configuration.
    #[error("{metric} histogram: {reason}")]
    Histogram {
        metric: &'static str,
        reason: String,
    },
    /// Two histograms or reports that cannot be merged exactly.
    #[error("cannot merge {what}: {reason}")]
    Merge { what: &'static str, reason: String },
    /// A report written by a newer pathprobe than this one.
    #[error(
        "report format version {found} is newer than this build understands (up to {supported}): upgrade the collector before the agents"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    /// A report that is not valid JSON for its version.
    #[error("report is not valid: {0}")]
    Json(String),
    /// A report field whose value is not allowed.
    #[error("report field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
