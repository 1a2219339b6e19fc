//! STAMP test packets: RFC 8762 with the RFC 8972 extensions.

pub mod auth;
pub mod packet;
pub mod reflect;
pub mod time;
pub mod tlv;

#[cfg(test)]
mod fixtures;

pub use auth::{AuthKey, HMAC_LEN};
pub use packet::{
    AUTH_BASE_LEN, AUTH_HMAC_OFFSET, Mode, ReflectorPacket, ReflectorRepr, SenderPacket,
    SenderRepr, UNAUTH_BASE_LEN,
};
pub use time::{ErrorEstimate, TimestampFormat};

/// The IANA-assigned STAMP port (RFC 8762 §4.1).
pub const DEFAULT_PORT: u16 = 862;
