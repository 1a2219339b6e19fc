//! STAMP probes: the Session-Sender of RFC 8762, on the shared engine
//! ([`crate::engine::mux`]): what a probe carries and what an answer shows.
//!
//! ```text
//! sender thread --sendmmsg--> socket --> reflector --> socket --recvmmsg--> receiver thread
//!      | TxRec (Sent / Failed / Missed)                    RxRec (TxStamp / Reply) |
//!      +-----------> ArrayQueue ----> aggregator <---------------- ArrayQueue <------+
//!                                      Tracker per path: windows, histograms, counters
//! ```
//!
//! Every probe is the base packet, a Class-of-Service TLV asking the far end which DSCP it
//! received, and padding to the configured size; in authenticated mode an HMAC TLV
//! (RFC 8972 §4.8) closes the TLVs and the base packet is signed. The engine
//! keeps the schedule, sends every due probe of a socket in one batch, verifies each answer
//! whole before it counts, and dates it by its kernel receive stamp.

use std::net::SocketAddr;

use pathprobe_proto::stamp::tlv::{
    ClassOfService, HEADER_LEN, HMAC_TLV_LEN, TlvIter, TlvWriter, sign_hmac_tlv, tlv_type,
};
use pathprobe_proto::stamp::{AuthKey, ErrorEstimate};
use pathprobe_proto::stamp::{SenderPacket, SenderRepr};

use super::{COS_TLV_LEN, ProbeConfig};

/// Writes probe `seq` with T1 into `buf` (exactly `cfg.size` octets): base packet, a
/// Class-of-Service TLV asking for our DSCP back (when it fits with nothing or a whole TLV
/// after it), one Extra Padding TLV for the rest (zero fill when fewer than 4 octets
/// remain), and in authenticated mode the HMAC TLV and the HMAC, each signed with `key`
/// (the path's current one).
pub(crate) fn build_probe(
    cfg: &ProbeConfig,
    key: Option<&AuthKey>,
    buf: &mut [u8],
    seq: u32,
    t1: u64,
    ee: ErrorEstimate,
) {
    let mode = cfg.mode();
    let mut p = SenderPacket::new_unchecked(&mut buf[..cfg.size], mode);
    SenderRepr {
        sequence_number: seq,
        timestamp: t1,
        error_estimate: ee,
        ssid: cfg.ssid,
    }
    .emit(&mut p);
    let area = p.tlvs_mut();
    area.fill(0);
    // Authenticated, any TLVs at all end with the HMAC TLV (`validate` leaves room for it).
    let hmac_tlv = key.filter(|_| !area.is_empty());
    let len = area.len() - hmac_tlv.map_or(0, |_| HMAC_TLV_LEN);
    let mut w = TlvWriter::new(area);
    // The writes cannot fail: each fits in what is left of the area.
    if len == COS_TLV_LEN || len >= COS_TLV_LEN + HEADER_LEN {
        let _ = w.class_of_service(ClassOfService {
            dscp1: cfg.dscp,
            ..ClassOfService::default()
        });
    }
    let rest = len - w.len();
    if rest >= HEADER_LEN {
        let _ = w.extra_padding(rest);
    }
    let at = hmac_tlv.and_then(|_| w.hmac_placeholder().ok());
    if let Some(k) = key {
        let packet = &mut buf[..cfg.size];
        if let Some(at) = at {
            sign_hmac_tlv(packet, mode.base_len(), at, k);
        }
        SenderPacket::new_unchecked(packet, mode).sign(k);
    }
}

/// An address with an IPv4-mapped IPv6 address written as IPv4.
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or(a, |ip| SocketAddr::new(ip.into(), v6.port())),
        SocketAddr::V4(_) => a,
    }
}

/// DSCP2 of a reply's Class-of-Service TLV: the DSCP the far end received. Not from a TLV
/// the reflector flagged as unrecognized, malformed (it echoes those unchanged) or failing
/// its integrity check.
pub(crate) fn far_dscp(tlvs: &[u8]) -> Option<u8> {
    TlvIter::new(tlvs)
        .map_while(Result::ok)
        .find(|t| t.tlv_type == tlv_type::CLASS_OF_SERVICE)
        .filter(|t| !t.unrecognized() && !t.malformed() && !t.integrity_failed())
        .and_then(|t| ClassOfService::parse(t.value).ok())
        .map(|c| c.dscp2)
}
