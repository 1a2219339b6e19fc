//! The Session-Reflector's packet work (RFC 8762 §4.3), without sockets or clocks: the
//! caller passes T2 in, gets a reply of the request's length, and stamps T3 last.

use super::auth::AuthKey;
use super::packet::{Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr};
use super::time::ErrorEstimate;
use super::tlv::{
    HmacTlvAt, TlvReflectInfo, TlvReflectOutcome, find_hmac_tlv, flag_integrity_failed,
    reflect_tlvs, sign_hmac_tlv, verify_hmac_tlv_at,
};
use crate::{Error, Result};

/// What the reflector knows about one received test packet and about itself.
#[derive(Debug, Clone, Copy)]
pub struct ReflectInput<'k> {
    /// The key in authenticated mode; `None` for unauthenticated mode.
    pub key: Option<&'k AuthKey>,
    /// The reflector's own Sequence Number in stateful mode (RFC 8762 §4.3.1); `None` in
    /// stateless mode, where the reply carries the sender's.
    pub sequence_number: Option<u32>,
    /// T2, raw, in `error_estimate.format`.
    pub receive_timestamp: u64,
    /// The reflector clock's Error Estimate, for T2 and T3.
    pub error_estimate: ErrorEstimate,
    /// TTL or Hop Limit the test packet arrived with.
    pub received_ttl: u8,
    /// TLV answers.
    pub tlv: TlvReflectInfo,
}

impl ReflectInput<'_> {
    /// The mode the key implies.
    pub const fn mode(&self) -> Mode {
        if self.key.is_some() {
            Mode::Authenticated
        } else {
            Mode::Unauthenticated
        }
    }
}

/// A prepared reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reflection {
    /// Length of the reply: always the request's length.
    pub len: usize,
    /// The request as read.
    pub request: SenderRepr,
    /// What the TLV pass found.
    pub tlvs: TlvReflectOutcome,
    /// Authenticated mode: the request's HMAC TLV failed (or was misplaced), and its TLVs
    /// came back unanswered, flagged I.
    pub tlv_integrity_failed: bool,
}

/// Builds the reply to `request` in `reply[..request.len()]`, all but T3 and the base
/// packet's HMAC.
///
/// In authenticated mode the request's HMAC is checked first, and a request that fails it
/// gets no reply ([`Error::AuthenticationFailed`]). A request's HMAC TLV is checked too:
/// when it verifies, the reply's HMAC TLV is signed over the reply's TLVs; when it fails,
/// the TLVs come back as they came, flagged I, and the reply is signed all the same. A request shorter than the mode's base
/// packet is refused ([`Error::Truncated`]). Stamp T3 and sign with [`finish`] just before
/// sending.
pub fn prepare(request: &[u8], input: &ReflectInput<'_>, reply: &mut [u8]) -> Result<Reflection> {
    verify(request, input.key)?;
    prepare_verified(request, input, reply)
}

/// Checks a request's length for the mode `key` implies and, in authenticated mode, its
/// HMAC: what a reflector must know before it spends anything (a rate-limit token, a
/// session) on the request.
pub fn verify(request: &[u8], key: Option<&AuthKey>) -> Result<()> {
    let mode = if key.is_some() {
        Mode::Authenticated
    } else {
        Mode::Unauthenticated
    };
    let packet = SenderPacket::new_checked(request, mode)?;
    if let Some(key) = key {
        packet.verify(key)?;
    }
    Ok(())
}

/// [`prepare`] for a request [`verify`] has passed: the HMAC is not computed twice.
pub fn prepare_verified(
    request: &[u8],
    input: &ReflectInput<'_>,
    reply: &mut [u8],
) -> Result<Reflection> {
    let mode = input.mode();
    let packet = SenderPacket::new_checked(request, mode)?;
    let len = request.len();
    let Some(reply) = reply.get_mut(..len) else {
        return Err(Error::Truncated {
            what: "reply buffer",
            len: reply.len(),
            needed: len,
        });
    };
    let sender = SenderRepr::parse(&packet);
    let repr = ReflectorRepr {
        sequence_number: input.sequence_number.unwrap_or(sender.sequence_number),
        timestamp: 0,
        error_estimate: input.error_estimate,
        ssid: sender.ssid,
        receive_timestamp: input.receive_timestamp,
        sender_sequence_number: sender.sequence_number,
        sender_timestamp: sender.timestamp,
        sender_error_estimate: sender.error_estimate,
        sender_ttl: input.received_ttl,
    };
    let mut out = ReflectorPacket::new_unchecked(&mut *reply, mode);
    repr.emit(&mut out);
    let info = TlvReflectInfo {
        authenticated: input.key.is_some(),
        ..input.tlv
    };
    let tlvs = reflect_tlvs(packet.tlvs(), out.tlvs_mut(), &info);
    let mut tlv_integrity_failed = false;
    if let Some(key) = input.key {
        let base = mode.base_len();
        match find_hmac_tlv(&request[base..]) {
            HmacTlvAt::Absent => {}
            HmacTlvAt::At(at) => {
                if !verify_hmac_tlv_at(request, base, at, key) {
                    flag_integrity_failed(&request[base..], &mut reply[base..]);
                    tlv_integrity_failed = true;
                }
                // Signed either way: the sender learns, from an answer it can trust,
                // that its TLVs were altered on the way.
                sign_hmac_tlv(reply, base, at, key);
            }
            HmacTlvAt::Misplaced => {
                flag_integrity_failed(&request[base..], &mut reply[base..]);
                tlv_integrity_failed = true;
            }
        }
    }
    Ok(Reflection {
        len,
        request: sender,
        tlvs,
        tlv_integrity_failed,
    })
}

/// Writes T3 (raw, in the reflector's format) and, in authenticated mode, the HMAC.
pub fn finish(reply: &mut [u8], transmit_timestamp: u64, key: Option<&AuthKey>) -> Result<()> {
    let mode = if key.is_some() {
        Mode::Authenticated
    } else {
        Mode::Unauthenticated
    };
    let mut out = ReflectorPacket::new_checked(reply, mode)?;
    out.set_timestamp(transmit_timestamp);
    if let Some(key) = key {
        out.sign(key);
    }
    Ok(())
}
