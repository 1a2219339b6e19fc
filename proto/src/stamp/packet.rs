//! Checked, zero-copy views of STAMP test packets (RFC 8762 §4.2, §4.3, with the SSID of
//! RFC 8972 §3) and their validated representations.
//!
//! A view is built with `new_checked` on input (after which no accessor panics) or with
//! `new_unchecked` on a buffer the caller sized with [`Mode::base_len`]. Multi-octet fields
//! are big-endian on the wire; the API is in host order.

use super::auth::{AuthKey, HMAC_LEN};
use super::time::ErrorEstimate;
use crate::{Error, Result};

/// Unauthenticated or authenticated mode (RFC 8762 §4.2.1 and §4.2.2). Both ends of a
/// session use the same mode; the base packets of both directions have the same length, so
/// a reflector never sends more than it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// 44-octet base packets.
    #[default]
    Unauthenticated,
    /// 112-octet base packets whose last 16 octets are an HMAC-SHA-256-128.
    Authenticated,
}

/// Base packet length in unauthenticated mode.
pub const UNAUTH_BASE_LEN: usize = 44;
/// Base packet length in authenticated mode.
pub const AUTH_BASE_LEN: usize = 112;
/// Where the HMAC starts in authenticated packets of either direction; it covers every
/// octet before it (RFC 8762 §4.4).
pub const AUTH_HMAC_OFFSET: usize = 96;

impl Mode {
    /// Length of the base packet, before any TLV.
    pub const fn base_len(self) -> usize {
        match self {
            Self::Unauthenticated => UNAUTH_BASE_LEN,
            Self::Authenticated => AUTH_BASE_LEN,
        }
    }
}

/// Field offsets of the Session-Sender packet.
///
/// ```text
/// unauthenticated (RFC 8762 §4.2.1)        authenticated (RFC 8762 §4.2.2)
///  0 Sequence Number (4)                     0 Sequence Number (4)
///  4 Timestamp (8)                           4 MBZ (12)
/// 12 Error Estimate (2)                     16 Timestamp (8)
/// 14 SSID (2, RFC 8972)                     24 Error Estimate (2)
/// 16 MBZ (28)                               26 SSID (2, RFC 8972)
///                                           28 MBZ (68)
///                                           96 HMAC (16)
/// ```
#[derive(Debug, Clone, Copy)]
struct SenderLayout {
    timestamp: usize,
    error_estimate: usize,
    ssid: usize,
}

const fn sender_layout(mode: Mode) -> SenderLayout {
    match mode {
        Mode::Unauthenticated => SenderLayout {
            timestamp: 4,
            error_estimate: 12,
            ssid: 14,
        },
        Mode::Authenticated => SenderLayout {
            timestamp: 16,
            error_estimate: 24,
            ssid: 26,
        },
    }
}

/// Field offsets of the Session-Reflector packet.
///
/// ```text
/// unauthenticated (RFC 8762 §4.3.1)        authenticated (RFC 8762 §4.3.2)
///  0 Sequence Number (4)                     0 Sequence Number (4)
///  4 Timestamp T3 (8)                        4 MBZ (12)
/// 12 Error Estimate (2)                     16 Timestamp T3 (8)
/// 14 SSID (2, RFC 8972)                     24 Error Estimate (2)
/// 16 Receive Timestamp T2 (8)               26 SSID (2, RFC 8972)
/// 24 Session-Sender Sequence Number (4)     28 MBZ (4)
/// 28 Session-Sender Timestamp (8)           32 Receive Timestamp T2 (8)
/// 36 Session-Sender Error Estimate (2)      40 MBZ (8)
/// 38 MBZ (2)                                48 Session-Sender Sequence Number (4)
/// 40 Session-Sender TTL (1)                 52 MBZ (12)
/// 41 MBZ (3)                                64 Session-Sender Timestamp (8)
///                                           72 Session-Sender Error Estimate (2)
///                                           74 MBZ (6)
///                                           80 Session-Sender TTL (1)
///                                           81 MBZ (15)
///                                           96 HMAC (16)
/// ```
#[derive(Debug, Clone, Copy)]
struct ReflectorLayout {
    timestamp: usize,
    error_estimate: usize,
    ssid: usize,
    receive_timestamp: usize,
    sender_sequence_number: usize,
    sender_timestamp: usize,
    sender_error_estimate: usize,
    sender_ttl: usize,
}

const fn reflector_layout(mode: Mode) -> ReflectorLayout {
    match mode {
        Mode::Unauthenticated => ReflectorLayout {
            timestamp: 4,
            error_estimate: 12,
            ssid: 14,
            receive_timestamp: 16,
            sender_sequence_number: 24,
            sender_timestamp: 28,
            sender_error_estimate: 36,
            sender_ttl: 40,
        },
        Mode::Authenticated => ReflectorLayout {
            timestamp: 16,
            error_estimate: 24,
            ssid: 26,
            receive_timestamp: 32,
            sender_sequence_number: 48,
            sender_timestamp: 64,
            sender_error_estimate: 72,
            sender_ttl: 80,
        },
    }
}

const SEQUENCE_NUMBER: usize = 0;

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

fn write(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn check_len(what: &'static str, len: usize, mode: Mode) -> Result<()> {
    let needed = mode.base_len();
    if len < needed {
        return Err(Error::Truncated { what, len, needed });
    }
    Ok(())
}

fn verify_hmac(buf: &[u8], mode: Mode, key: &AuthKey) -> Result<()> {
    match mode {
        Mode::Unauthenticated => Err(Error::AuthenticationFailed),
        Mode::Authenticated => key.verify(
            &buf[..AUTH_HMAC_OFFSET],
            &buf[AUTH_HMAC_OFFSET..AUTH_HMAC_OFFSET + HMAC_LEN],
        ),
    }
}

fn sign_hmac(buf: &mut [u8], mode: Mode, key: &AuthKey) {
    if mode == Mode::Authenticated {
        let tag = key.tag(&buf[..AUTH_HMAC_OFFSET]);
        write(buf, AUTH_HMAC_OFFSET, &tag);
    }
}

/// The methods both views share: construction, the sequence number, the TLV area, the HMAC.
macro_rules! common_view {
    ($view:ident, $what:literal) => {
        impl<T: AsRef<[u8]>> $view<T> {
            /// Wraps a buffer without checking its length; accessors panic on a short buffer.
            pub const fn new_unchecked(buffer: T, mode: Mode) -> Self {
                Self { buffer, mode }
            }

            /// Wraps a received buffer, checking that it holds a whole base packet.
            pub fn new_checked(buffer: T, mode: Mode) -> Result<Self> {
                check_len($what, buffer.as_ref().len(), mode)?;
                Ok(Self { buffer, mode })
            }

            /// The buffer.
            pub fn into_inner(self) -> T {
                self.buffer
            }

            /// The mode the packet was read in.
            pub const fn mode(&self) -> Mode {
                self.mode
            }

            /// Sequence Number (a reflector's own in stateful mode, a copy of the sender's
            /// in stateless mode).
            pub fn sequence_number(&self) -> u32 {
                read_u32(self.buffer.as_ref(), SEQUENCE_NUMBER)
            }

            /// The octets after the base packet: TLVs, or zero padding from an RFC 8762
            /// peer.
            pub fn tlvs(&self) -> &[u8] {
                &self.buffer.as_ref()[self.mode.base_len()..]
            }

            /// The whole packet.
            pub fn as_bytes(&self) -> &[u8] {
                self.buffer.as_ref()
            }

            /// Checks the HMAC in constant time. An unauthenticated packet never verifies.
            pub fn verify(&self, key: &AuthKey) -> Result<()> {
                verify_hmac(self.buffer.as_ref(), self.mode, key)
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $view<T> {
            /// Sets the Sequence Number.
            pub fn set_sequence_number(&mut self, value: u32) {
                write(self.buffer.as_mut(), SEQUENCE_NUMBER, &value.to_be_bytes());
            }

            /// The TLV area, to be written by a [`super::tlv::TlvWriter`].
            pub fn tlvs_mut(&mut self) -> &mut [u8] {
                let base = self.mode.base_len();
                &mut self.buffer.as_mut()[base..]
            }

            /// Writes the HMAC over the base packet (authenticated mode; no-op otherwise).
            /// Call it after the last change to the base packet, T3 included.
            pub fn sign(&mut self, key: &AuthKey) {
                sign_hmac(self.buffer.as_mut(), self.mode, key);
            }
        }
    };
}

/// A Session-Sender test packet: base packet, then TLVs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderPacket<T: AsRef<[u8]>> {
    buffer: T,
    mode: Mode,
}

common_view!(SenderPacket, "STAMP Session-Sender packet");

impl<T: AsRef<[u8]>> SenderPacket<T> {
    /// Timestamp T1 as the raw 64-bit field; its format is `error_estimate().format`.
    pub fn timestamp(&self) -> u64 {
        read_u64(self.buffer.as_ref(), sender_layout(self.mode).timestamp)
    }

    /// Error Estimate of T1.
    pub fn error_estimate(&self) -> ErrorEstimate {
        ErrorEstimate::from_u16(read_u16(
            self.buffer.as_ref(),
            sender_layout(self.mode).error_estimate,
        ))
    }

    /// Session-Sender Identifier (RFC 8972 §3); zero from an RFC 8762-only sender.
    pub fn ssid(&self) -> u16 {
        read_u16(self.buffer.as_ref(), sender_layout(self.mode).ssid)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> SenderPacket<T> {
    /// Sets the raw Timestamp field.
    pub fn set_timestamp(&mut self, raw: u64) {
        let at = sender_layout(self.mode).timestamp;
        write(self.buffer.as_mut(), at, &raw.to_be_bytes());
    }

    /// Sets the Error Estimate.
    pub fn set_error_estimate(&mut self, value: ErrorEstimate) {
        let at = sender_layout(self.mode).error_estimate;
        write(self.buffer.as_mut(), at, &value.to_u16().to_be_bytes());
    }

    /// Sets the SSID.
    pub fn set_ssid(&mut self, value: u16) {
        let at = sender_layout(self.mode).ssid;
        write(self.buffer.as_mut(), at, &value.to_be_bytes());
    }
}

/// The meaning of a Session-Sender base packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SenderRepr {
    pub sequence_number: u32,
    /// T1, raw; its format is `error_estimate.format`.
    pub timestamp: u64,
    pub error_estimate: ErrorEstimate,
    pub ssid: u16,
}

impl SenderRepr {
    /// Reads the base packet of a checked view.
    pub fn parse<T: AsRef<[u8]>>(packet: &SenderPacket<T>) -> Self {
        Self {
            sequence_number: packet.sequence_number(),
            timestamp: packet.timestamp(),
            error_estimate: packet.error_estimate(),
            ssid: packet.ssid(),
        }
    }

    /// Writes the base packet, zeroing every MBZ octet and the HMAC field; the TLV area is
    /// left as it is.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut SenderPacket<T>) {
        let base = packet.mode.base_len();
        packet.buffer.as_mut()[..base].fill(0);
        packet.set_sequence_number(self.sequence_number);
        packet.set_timestamp(self.timestamp);
        packet.set_error_estimate(self.error_estimate);
        packet.set_ssid(self.ssid);
    }

    /// T1 in nanoseconds since 1970.
    pub fn timestamp_unix_nanos(&self) -> Result<u64> {
        self.error_estimate.format.decode(self.timestamp)
    }
}

/// A Session-Reflector test packet: base packet, then TLVs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReflectorPacket<T: AsRef<[u8]>> {
    buffer: T,
    mode: Mode,
}

common_view!(ReflectorPacket, "STAMP Session-Reflector packet");

impl<T: AsRef<[u8]>> ReflectorPacket<T> {
    /// Timestamp T3 (transmit), raw; its format is `error_estimate().format`.
    pub fn timestamp(&self) -> u64 {
        read_u64(self.buffer.as_ref(), reflector_layout(self.mode).timestamp)
    }

    /// Error Estimate of T2 and T3.
    pub fn error_estimate(&self) -> ErrorEstimate {
        ErrorEstimate::from_u16(read_u16(
            self.buffer.as_ref(),
            reflector_layout(self.mode).error_estimate,
        ))
    }

    /// SSID, copied from the sender's packet.
    pub fn ssid(&self) -> u16 {
        read_u16(self.buffer.as_ref(), reflector_layout(self.mode).ssid)
    }

    /// Receive Timestamp T2, raw; its format is `error_estimate().format`.
    pub fn receive_timestamp(&self) -> u64 {
        read_u64(
            self.buffer.as_ref(),
            reflector_layout(self.mode).receive_timestamp,
        )
    }

    /// Session-Sender Sequence Number.
    pub fn sender_sequence_number(&self) -> u32 {
        read_u32(
            self.buffer.as_ref(),
            reflector_layout(self.mode).sender_sequence_number,
        )
    }

    /// Session-Sender Timestamp T1, raw; its format is `sender_error_estimate().format`.
    pub fn sender_timestamp(&self) -> u64 {
        read_u64(
            self.buffer.as_ref(),
            reflector_layout(self.mode).sender_timestamp,
        )
    }

    /// Session-Sender Error Estimate.
    pub fn sender_error_estimate(&self) -> ErrorEstimate {
        ErrorEstimate::from_u16(read_u16(
            self.buffer.as_ref(),
            reflector_layout(self.mode).sender_error_estimate,
        ))
    }

    /// Session-Sender TTL: the TTL or Hop Limit of the sender's packet as it arrived.
    pub fn sender_ttl(&self) -> u8 {
        self.buffer.as_ref()[reflector_layout(self.mode).sender_ttl]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ReflectorPacket<T> {
    /// Sets the raw transmit Timestamp T3.
    pub fn set_timestamp(&mut self, raw: u64) {
        let at = reflector_layout(self.mode).timestamp;
        write(self.buffer.as_mut(), at, &raw.to_be_bytes());
    }

    /// Sets the Error Estimate.
    pub fn set_error_estimate(&mut self, value: ErrorEstimate) {
        let at = reflector_layout(self.mode).error_estimate;
        write(self.buffer.as_mut(), at, &value.to_u16().to_be_bytes());
    }

    /// Sets the SSID.
    pub fn set_ssid(&mut self, value: u16) {
        let at = reflector_layout(self.mode).ssid;
        write(self.buffer.as_mut(), at, &value.to_be_bytes());
    }

    /// Sets the raw Receive Timestamp T2.
    pub fn set_receive_timestamp(&mut self, raw: u64) {
        let at = reflector_layout(self.mode).receive_timestamp;
        write(self.buffer.as_mut(), at, &raw.to_be_bytes());
    }

    /// Sets the Session-Sender Sequence Number.
    pub fn set_sender_sequence_number(&mut self, value: u32) {
        let at = reflector_layout(self.mode).sender_sequence_number;
        write(self.buffer.as_mut(), at, &value.to_be_bytes());
    }

    /// Sets the raw Session-Sender Timestamp.
    pub fn set_sender_timestamp(&mut self, raw: u64) {
        let at = reflector_layout(self.mode).sender_timestamp;
        write(self.buffer.as_mut(), at, &raw.to_be_bytes());
    }

    /// Sets the Session-Sender Error Estimate.
    pub fn set_sender_error_estimate(&mut self, value: ErrorEstimate) {
        let at = reflector_layout(self.mode).sender_error_estimate;
        write(self.buffer.as_mut(), at, &value.to_u16().to_be_bytes());
    }

    /// Sets the Session-Sender TTL.
    pub fn set_sender_ttl(&mut self, value: u8) {
        let at = reflector_layout(self.mode).sender_ttl;
        self.buffer.as_mut()[at] = value;
    }
}

/// The meaning of a Session-Reflector base packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ReflectorRepr {
    pub sequence_number: u32,
    /// T3, raw; format `error_estimate.format`.
    pub timestamp: u64,
    pub error_estimate: ErrorEstimate,
    pub ssid: u16,
    /// T2, raw; format `error_estimate.format`.
    pub receive_timestamp: u64,
    pub sender_sequence_number: u32,
    /// T1 as the sender wrote it; format `sender_error_estimate.format`.
    pub sender_timestamp: u64,
    pub sender_error_estimate: ErrorEstimate,
    pub sender_ttl: u8,
}

impl ReflectorRepr {
    /// Reads the base packet of a checked view.
    pub fn parse<T: AsRef<[u8]>>(packet: &ReflectorPacket<T>) -> Self {
        Self {
            sequence_number: packet.sequence_number(),
            timestamp: packet.timestamp(),
            error_estimate: packet.error_estimate(),
            ssid: packet.ssid(),
            receive_timestamp: packet.receive_timestamp(),
            sender_sequence_number: packet.sender_sequence_number(),
            sender_timestamp: packet.sender_timestamp(),
            sender_error_estimate: packet.sender_error_estimate(),
            sender_ttl: packet.sender_ttl(),
        }
    }

    /// Writes the base packet, zeroing every MBZ octet and the HMAC field; the TLV area is
    /// left as it is.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut ReflectorPacket<T>) {
        let base = packet.mode.base_len();
        packet.buffer.as_mut()[..base].fill(0);
        packet.set_sequence_number(self.sequence_number);
        packet.set_timestamp(self.timestamp);
        packet.set_error_estimate(self.error_estimate);
        packet.set_ssid(self.ssid);
        packet.set_receive_timestamp(self.receive_timestamp);
        packet.set_sender_sequence_number(self.sender_sequence_number);
        packet.set_sender_timestamp(self.sender_timestamp);
        packet.set_sender_error_estimate(self.sender_error_estimate);
        packet.set_sender_ttl(self.sender_ttl);
    }

    /// T1, T2 and T3 in nanoseconds since 1970, each read in its own format.
    pub fn timestamps_unix_nanos(&self) -> Result<[u64; 3]> {
        let f = self.error_estimate.format;
        Ok([
            self.sender_error_estimate
                .format
                .decode(self.sender_timestamp)?,
            f.decode(self.receive_timestamp)?,
            f.decode(self.timestamp)?,
        ])
    }
}
