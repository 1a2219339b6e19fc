//! Byte-literal fixtures for every STAMP field, at zero, typical and maximum values, in both
//! directions and both modes, written from the figures of RFC 8762 §4.2 and §4.3 (with the
//! SSID of RFC 8972 §3), not from our own encoder.

use super::auth::AuthKey;
use super::packet::{Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr};
use super::reflect::{ReflectInput, finish, prepare};
use super::time::{ErrorEstimate, TimestampFormat};
use super::tlv::{TlvIter, TlvReflectInfo, TlvWriter, tlv_type};
use crate::Error;
use proptest::prelude::*;

/// 2026-11-26T09:30:00.25Z: Unix 1,795,685,400 s = NTP 0xeeb27a98 s; 0.25 s = 0x40000000.
const T_UNIX_NS: u64 = 1_795_685_400_250_000_000;
const T_NTP: u64 = 0xeeb2_7a98_4000_0000;
const T_PTP: u64 = (0x6b07_fc18 << 32) + 250_000_000;

/// S=1, Z=0, Scale=0x0c, Multiplier=0x2a.
const EE_NTP: u16 = 0x8c2a;
/// S=0, Z=1, Scale=0x01, Multiplier=0x03.
const EE_PTP: u16 = 0x4103;

#[rustfmt::skip]
const SENDER_UNAUTH: [u8; 44] = [
    0x00, 0x00, 0x30, 0x39,                         // Sequence Number 12345
    0xee, 0xb2, 0x7a, 0x98, 0x40, 0x00, 0x00, 0x00, // Timestamp (NTP)
    0x8c, 0x2a,                                     // Error Estimate
    0xbe, 0xef,                                     // SSID
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,       // MBZ (28)
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn sender_repr() -> SenderRepr {
    SenderRepr {
        sequence_number: 12345,
        timestamp: T_NTP,
        error_estimate: ErrorEstimate::from_u16(EE_NTP),
        ssid: 0xbeef,
    }
}

#[rustfmt::skip]
const REFLECTOR_UNAUTH: [u8; 44] = [
    0x00, 0x00, 0x00, 0x07,                         // Sequence Number 7
    0x6b, 0x07, 0xfc, 0x18, 0x0e, 0xe6, 0xb2, 0x80, // Timestamp T3 (PTP)
    0x41, 0x03,                                     // Error Estimate
    0xbe, 0xef,                                     // SSID
    0x6b, 0x07, 0xfc, 0x18, 0x0e, 0xe6, 0xb2, 0x80, // Receive Timestamp T2 (PTP)
    0x00, 0x00, 0x30, 0x39,                         // Session-Sender Sequence Number
    0xee, 0xb2, 0x7a, 0x98, 0x40, 0x00, 0x00, 0x00, // Session-Sender Timestamp
    0x8c, 0x2a,                                     // Session-Sender Error Estimate
    0x00, 0x00,                                     // MBZ
    0x3f,                                           // Session-Sender TTL 63
    0x00, 0x00, 0x00,                               // MBZ
];

fn reflector_repr() -> ReflectorRepr {
    ReflectorRepr {
        sequence_number: 7,
        timestamp: T_PTP,
        error_estimate: ErrorEstimate::from_u16(EE_PTP),
        ssid: 0xbeef,
        receive_timestamp: T_PTP,
        sender_sequence_number: 12345,
        sender_timestamp: T_NTP,
        sender_error_estimate: ErrorEstimate::from_u16(EE_NTP),
        sender_ttl: 63,
    }
}

/// Fields of the authenticated sender packet, as (offset, octets).
const SENDER_AUTH_FIELDS: [(usize, &[u8]); 4] = [
    (0, &[0x00, 0x00, 0x30, 0x39]),
    (16, &[0xee, 0xb2, 0x7a, 0x98, 0x40, 0x00, 0x00, 0x00]),
    (24, &[0x8c, 0x2a]),
    (26, &[0xbe, 0xef]),
];

/// Fields of the authenticated reflector packet, as (offset, octets).
const REFLECTOR_AUTH_FIELDS: [(usize, &[u8]); 9] = [
    (0, &[0x00, 0x00, 0x00, 0x07]),
    (16, &[0x6b, 0x07, 0xfc, 0x18, 0x0e, 0xe6, 0xb2, 0x80]),
    (24, &[0x41, 0x03]),
    (26, &[0xbe, 0xef]),
    (32, &[0x6b, 0x07, 0xfc, 0x18, 0x0e, 0xe6, 0xb2, 0x80]),
    (48, &[0x00, 0x00, 0x30, 0x39]),
    (64, &[0xee, 0xb2, 0x7a, 0x98, 0x40, 0x00, 0x00, 0x00]),
    (72, &[0x8c, 0x2a]),
    (80, &[0x3f]),
];

fn place(fields: &[(usize, &[u8])]) -> [u8; 112] {
    let mut b = [0u8; 112];
    for (at, bytes) in fields {
        b[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    b
}

#[test]
fn fixture_timestamps_are_the_fixture_time() {
    assert_eq!(TimestampFormat::Ntp.encode(T_UNIX_NS), Ok(T_NTP));
    assert_eq!(TimestampFormat::Ptp.encode(T_UNIX_NS), Ok(T_PTP));
    assert_eq!(TimestampFormat::Ptp.decode(T_PTP), Ok(T_UNIX_NS));
}

#[test]
fn sender_unauthenticated_typical() {
    let p = SenderPacket::new_checked(&SENDER_UNAUTH[..], Mode::Unauthenticated).unwrap();
    assert_eq!(SenderRepr::parse(&p), sender_repr());
    assert_eq!(sender_repr().timestamp_unix_nanos(), Ok(T_UNIX_NS));
    let mut buf = [0xffu8; 44];
    sender_repr().emit(&mut SenderPacket::new_unchecked(
        &mut buf[..],
        Mode::Unauthenticated,
    ));
    assert_eq!(buf, SENDER_UNAUTH);
}

#[test]
fn reflector_unauthenticated_typical() {
    let p = ReflectorPacket::new_checked(&REFLECTOR_UNAUTH[..], Mode::Unauthenticated).unwrap();
    assert_eq!(ReflectorRepr::parse(&p), reflector_repr());
    assert_eq!(
        reflector_repr().timestamps_unix_nanos(),
        Ok([T_UNIX_NS, T_UNIX_NS, T_UNIX_NS])
    );
    let mut buf = [0xffu8; 44];
    reflector_repr().emit(&mut ReflectorPacket::new_unchecked(
        &mut buf[..],
        Mode::Unauthenticated,
    ));
    assert_eq!(buf, REFLECTOR_UNAUTH);
}

#[test]
fn sender_authenticated_typical() {
    let expected = place(&SENDER_AUTH_FIELDS);
    let p = SenderPacket::new_checked(&expected[..], Mode::Authenticated).unwrap();
    assert_eq!(SenderRepr::parse(&p), sender_repr());
    let mut buf = [0xffu8; 112];
    sender_repr().emit(&mut SenderPacket::new_unchecked(
        &mut buf[..],
        Mode::Authenticated,
    ));
    assert_eq!(buf, expected);
}

#[test]
fn reflector_authenticated_typical() {
    let expected = place(&REFLECTOR_AUTH_FIELDS);
    let p = ReflectorPacket::new_checked(&expected[..], Mode::Authenticated).unwrap();
    assert_eq!(ReflectorRepr::parse(&p), reflector_repr());
    let mut buf = [0xffu8; 112];
    reflector_repr().emit(&mut ReflectorPacket::new_unchecked(
        &mut buf[..],
        Mode::Authenticated,
    ));
    assert_eq!(buf, expected);
}

#[test]
fn all_zero_packets_read_as_zero() {
    for mode in [Mode::Unauthenticated, Mode::Authenticated] {
        let zero = vec![0u8; mode.base_len()];
        let s = SenderRepr::parse(&SenderPacket::new_checked(&zero[..], mode).unwrap());
        assert_eq!(
            s,
            SenderRepr {
                error_estimate: ErrorEstimate::from_u16(0),
                ..SenderRepr::default()
            }
        );
        let r = ReflectorRepr::parse(&ReflectorPacket::new_checked(&zero[..], mode).unwrap());
        assert_eq!(r.sequence_number, 0);
        assert_eq!(r.sender_ttl, 0);
        assert_eq!(r.receive_timestamp, 0);
        assert_eq!(r.error_estimate.to_u16(), 0);
    }
}

#[test]
fn all_ones_packets_read_as_maximum() {
    for mode in [Mode::Unauthenticated, Mode::Authenticated] {
        let ones = vec![0xffu8; mode.base_len()];
        let s = SenderRepr::parse(&SenderPacket::new_checked(&ones[..], mode).unwrap());
        assert_eq!(s.sequence_number, u32::MAX);
        assert_eq!(s.timestamp, u64::MAX);
        assert_eq!(s.error_estimate.to_u16(), 0xffff);
        assert_eq!(s.ssid, u16::MAX);
        let r = ReflectorRepr::parse(&ReflectorPacket::new_checked(&ones[..], mode).unwrap());
        assert_eq!(r.sequence_number, u32::MAX);
        assert_eq!(r.timestamp, u64::MAX);
        assert_eq!(r.receive_timestamp, u64::MAX);
        assert_eq!(r.sender_sequence_number, u32::MAX);
        assert_eq!(r.sender_timestamp, u64::MAX);
        assert_eq!(r.sender_error_estimate.to_u16(), 0xffff);
        assert_eq!(r.sender_ttl, 255);
        assert_eq!(r.ssid, u16::MAX);
    }
}

#[test]
fn maximum_values_emit_into_their_fields_only() {
    // Every field at its maximum, MBZ stays zero: the exact octets set are the fields.
    let max = ReflectorRepr {
        sequence_number: u32::MAX,
        timestamp: u64::MAX,
        error_estimate: ErrorEstimate::from_u16(0xffff),
        ssid: u16::MAX,
        receive_timestamp: u64::MAX,
        sender_sequence_number: u32::MAX,
        sender_timestamp: u64::MAX,
        sender_error_estimate: ErrorEstimate::from_u16(0xffff),
        sender_ttl: u8::MAX,
    };
    let mut buf = [0u8; 44];
    max.emit(&mut ReflectorPacket::new_unchecked(
        &mut buf[..],
        Mode::Unauthenticated,
    ));
    #[rustfmt::skip]
    let expected: [u8; 44] = [
        0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0x00, 0x00,
        0xff, 0x00, 0x00, 0x00,
    ];
    assert_eq!(buf, expected);
    let mut auth = [0u8; 112];
    max.emit(&mut ReflectorPacket::new_unchecked(
        &mut auth[..],
        Mode::Authenticated,
    ));
    let set: Vec<usize> = (0..112).filter(|&i| auth[i] != 0).collect();
    let fields: Vec<usize> = [0..4, 16..28, 32..40, 48..52, 64..74, 80..81]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(set, fields);
}

#[test]
fn short_packets_are_refused() {
    assert_eq!(
        SenderPacket::new_checked(&SENDER_UNAUTH[..43], Mode::Unauthenticated).unwrap_err(),
        Error::Truncated {
            what: "STAMP Session-Sender packet",
            len: 43,
            needed: 44
        }
    );
    assert!(ReflectorPacket::new_checked(&[0u8; 111][..], Mode::Authenticated).is_err());
}

fn key() -> AuthKey {
    AuthKey::new(b"pathprobe test key 0123456789abc").unwrap()
}

fn signed_sender() -> [u8; 112] {
    let mut buf = [0u8; 112];
    let mut p = SenderPacket::new_unchecked(&mut buf[..], Mode::Authenticated);
    sender_repr().emit(&mut p);
    p.sign(&key());
    buf
}

#[test]
fn authenticated_hmac_covers_the_first_96_octets() {
    let buf = signed_sender();
    assert_eq!(buf[..96], place(&SENDER_AUTH_FIELDS)[..96]);
    assert_eq!(buf[96..], key().tag(&buf[..96]));
    let p = SenderPacket::new_checked(&buf[..], Mode::Authenticated).unwrap();
    assert!(p.verify(&key()).is_ok());
}

#[test]
fn authenticated_sender_fails_on_any_flipped_bit() {
    let good = signed_sender();
    for bit in 0..good.len() * 8 {
        let mut bad = good;
        bad[bit / 8] ^= 1 << (bit % 8);
        let p = SenderPacket::new_checked(&bad[..], Mode::Authenticated).unwrap();
        assert_eq!(
            p.verify(&key()),
            Err(Error::AuthenticationFailed),
            "bit {bit}"
        );
    }
}

#[test]
fn authenticated_reflector_fails_on_any_flipped_bit() {
    let mut good = [0u8; 112];
    let mut p = ReflectorPacket::new_unchecked(&mut good[..], Mode::Authenticated);
    reflector_repr().emit(&mut p);
    p.sign(&key());
    for bit in 0..good.len() * 8 {
        let mut bad = good;
        bad[bit / 8] ^= 1 << (bit % 8);
        let p = ReflectorPacket::new_checked(&bad[..], Mode::Authenticated).unwrap();
        assert_eq!(
            p.verify(&key()),
            Err(Error::AuthenticationFailed),
            "bit {bit}"
        );
    }
}

#[test]
fn authenticated_packet_fails_with_another_key() {
    let buf = signed_sender();
    let other = AuthKey::new(b"another key, also 32 octets long").unwrap();
    let p = SenderPacket::new_checked(&buf[..], Mode::Authenticated).unwrap();
    assert_eq!(p.verify(&other), Err(Error::AuthenticationFailed));
}

fn reflect_input(key: Option<&AuthKey>) -> ReflectInput<'_> {
    ReflectInput {
        key,
        sequence_number: Some(7),
        receive_timestamp: T_PTP,
        error_estimate: ErrorEstimate::from_u16(EE_PTP),
        received_ttl: 63,
        tlv: TlvReflectInfo::default(),
    }
}

#[test]
fn reflection_of_the_fixture_is_the_fixture() {
    let mut reply = [0xaau8; 64];
    let r = prepare(&SENDER_UNAUTH, &reflect_input(None), &mut reply).unwrap();
    assert_eq!(r.len, 44);
    assert_eq!(r.request, sender_repr());
    finish(&mut reply[..r.len], T_PTP, None).unwrap();
    assert_eq!(reply[..44], REFLECTOR_UNAUTH);
    assert!(
        reply[44..].iter().all(|&b| b == 0xaa),
        "wrote past the reply"
    );
}

#[test]
fn stateless_reflection_copies_the_sender_sequence_number() {
    let mut reply = [0u8; 44];
    let input = ReflectInput {
        sequence_number: None,
        ..reflect_input(None)
    };
    prepare(&SENDER_UNAUTH, &input, &mut reply).unwrap();
    assert_eq!(reply[..4], SENDER_UNAUTH[..4]);
}

#[test]
fn authenticated_reflection_is_the_fixture_plus_hmac() {
    let k = key();
    let request = signed_sender();
    let mut reply = [0u8; 112];
    let r = prepare(&request, &reflect_input(Some(&k)), &mut reply).unwrap();
    finish(&mut reply[..r.len], T_PTP, Some(&k)).unwrap();
    assert_eq!(reply[..96], place(&REFLECTOR_AUTH_FIELDS)[..96]);
    let p = ReflectorPacket::new_checked(&reply[..], Mode::Authenticated).unwrap();
    assert!(p.verify(&k).is_ok());
}

#[test]
fn unauthenticated_request_gets_no_authenticated_reply() {
    let k = key();
    let mut request = signed_sender();
    request[0] ^= 1;
    let mut reply = [0u8; 112];
    assert_eq!(
        prepare(&request, &reflect_input(Some(&k)), &mut reply),
        Err(Error::AuthenticationFailed)
    );
    assert_eq!(reply, [0u8; 112], "nothing written for a forged request");
}

#[test]
fn reflection_with_tlvs_echoes_unknown_and_answers_known() {
    let mut request = [0u8; 44 + 8 + 8 + 6];
    let mut p = SenderPacket::new_unchecked(&mut request[..], Mode::Unauthenticated);
    sender_repr().emit(&mut p);
    let mut w = TlvWriter::new(p.tlvs_mut());
    w.class_of_service(super::tlv::ClassOfService {
        dscp1: 46,
        ..Default::default()
    })
    .unwrap();
    w.extra_padding(8).unwrap();
    w.push(250, &[9, 9]).unwrap();
    let mut reply = [0u8; 66];
    let mut input = reflect_input(None);
    input.tlv.received_tos = 46 << 2;
    let r = prepare(&request, &input, &mut reply).unwrap();
    assert_eq!(r.len, request.len());
    assert_eq!(r.tlvs.unrecognized, 1);
    let tlvs: Vec<_> = TlvIter::new(&reply[44..])
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tlvs.iter()
            .map(|t| (t.tlv_type, t.flags))
            .collect::<Vec<_>>(),
        [
            (tlv_type::CLASS_OF_SERVICE, 0),
            (tlv_type::EXTRA_PADDING, 0),
            (250, super::tlv::FLAG_U)
        ]
    );
    assert_eq!(tlvs[0].value, [0b1011_1010, 0b1110_0000, 0, 0]);
    assert_eq!(tlvs[2].value, [9, 9]);
}

/// An authenticated request with a Class-of-Service TLV (DSCP1 EF) and an HMAC TLV, as
/// RFC 8972 §4.2 and §4.8 lay them out: U set by the sender, and an HMAC (computed apart,
/// with Python's `hmac`) over the Sequence Number field and the Class-of-Service TLV.
#[rustfmt::skip]
const HMAC_TLV_REQUEST_TLVS: [u8; 28] = [
    0x80, 0x04, 0x00, 0x04, 0xb8, 0x00, 0x00, 0x00, // U, Class of Service, DSCP1 46
    0x80, 0x08, 0x00, 0x10,                         // U, HMAC, 16 octets
    0xb3, 0x8d, 0x81, 0xb5, 0x14, 0xf9, 0xe0, 0x09,
    0x04, 0x32, 0x33, 0xae, 0x6e, 0x55, 0x28, 0x96,
];

/// The reply's: Class of Service answered (DSCP2 0, RP 0), flags clear, and the HMAC over
/// the reply's Sequence Number (7, stateful) and its Class-of-Service TLV.
#[rustfmt::skip]
const HMAC_TLV_REPLY_TLVS: [u8; 28] = [
    0x00, 0x04, 0x00, 0x04, 0xb8, 0x00, 0x00, 0x00,
    0x00, 0x08, 0x00, 0x10,
    0x86, 0x0b, 0xb9, 0xdb, 0x14, 0x91, 0x13, 0x77,
    0x20, 0x11, 0xa7, 0xb1, 0xcb, 0x0f, 0xba, 0xa6,
];

fn request_with_hmac_tlv() -> [u8; 140] {
    let mut buf = [0u8; 140];
    let mut p = SenderPacket::new_unchecked(&mut buf[..], Mode::Authenticated);
    sender_repr().emit(&mut p);
    let mut w = TlvWriter::new(p.tlvs_mut());
    w.class_of_service(super::tlv::ClassOfService {
        dscp1: 46,
        ..Default::default()
    })
    .unwrap();
    let at = w.hmac_placeholder().unwrap();
    super::tlv::sign_hmac_tlv(&mut buf, 112, at, &key());
    SenderPacket::new_unchecked(&mut buf[..], Mode::Authenticated).sign(&key());
    buf
}

#[test]
fn hmac_tlv_request_is_laid_out_as_rfc_8972_says() {
    assert_eq!(request_with_hmac_tlv()[112..], HMAC_TLV_REQUEST_TLVS);
}

#[test]
fn hmac_tlv_is_checked_and_the_reply_signed_over_its_own_tlvs() {
    let request = request_with_hmac_tlv();
    let mut reply = [0u8; 140];
    let r = prepare(&request, &reflect_input(Some(&key())), &mut reply).unwrap();
    assert!(!r.tlv_integrity_failed);
    assert_eq!(reply[112..], HMAC_TLV_REPLY_TLVS);
    finish(&mut reply, T_PTP, Some(&key())).unwrap();
    assert_eq!(
        super::tlv::check_hmac_tlv(&reply, 112, &key()),
        super::tlv::HmacTlvCheck::Verified {
            integrity_failed: false
        }
    );
}

#[test]
fn a_tlv_altered_on_the_way_comes_back_unanswered_and_flagged_i() {
    // An on-path attacker asks for CS6 replies: the base HMAC still verifies (it covers
    // no TLV), the HMAC TLV does not.
    let mut request = request_with_hmac_tlv();
    request[116] = 48 << 2;
    SenderPacket::new_unchecked(&mut request[..], Mode::Authenticated).sign(&key());
    let mut reply = [0u8; 140];
    let r = prepare(&request, &reflect_input(Some(&key())), &mut reply).unwrap();
    assert!(r.tlv_integrity_failed);
    let tlvs: Vec<_> = TlvIter::new(&reply[112..]).map(Result::unwrap).collect();
    assert!(
        tlvs.iter().all(|t| t.flags == super::tlv::FLAG_I),
        "{tlvs:?}"
    );
    assert_eq!(tlvs[0].value, &request[116..120], "returned as it came");
    assert_eq!(
        super::tlv::check_hmac_tlv(&reply, 112, &key()),
        super::tlv::HmacTlvCheck::Verified {
            integrity_failed: true
        },
        "the sender can trust the reflector's word that its TLVs were altered"
    );
    // And a reply altered on its way back fails at the sender.
    reply[116] ^= 4;
    assert_eq!(
        super::tlv::check_hmac_tlv(&reply, 112, &key()),
        super::tlv::HmacTlvCheck::Failed
    );
}

#[test]
fn an_hmac_tlv_with_a_tlv_after_it_fails() {
    use super::tlv::{HmacTlvAt, find_hmac_tlv};
    let hmac = [
        0x80, 8, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let cos = [0x80, 4, 0, 4, 0, 0, 0, 0];
    let pad = [0x80, 1, 0, 2, 0, 0];
    let area = |parts: &[&[u8]]| parts.concat();
    assert_eq!(find_hmac_tlv(&area(&[&cos, &hmac])), HmacTlvAt::At(8));
    assert_eq!(find_hmac_tlv(&area(&[&cos, &hmac, &pad])), HmacTlvAt::At(8));
    assert_eq!(
        find_hmac_tlv(&area(&[&cos, &hmac, &[0; 6]])),
        HmacTlvAt::At(8)
    );
    assert_eq!(find_hmac_tlv(&area(&[&hmac, &cos])), HmacTlvAt::Misplaced);
    assert_eq!(find_hmac_tlv(&area(&[&hmac, &hmac])), HmacTlvAt::Misplaced);
    assert_eq!(
        find_hmac_tlv(&[0x80, 8, 0, 4, 0, 0, 0, 0]),
        HmacTlvAt::Misplaced,
        "an HMAC of 4 octets"
    );
    assert_eq!(find_hmac_tlv(&area(&[&cos, &pad])), HmacTlvAt::Absent);
    // Misplaced in a request: every TLV flagged I, nothing answered.
    let mut request = [0u8; 112 + 28];
    request[..112].copy_from_slice(&signed_sender());
    request[112..132].copy_from_slice(&hmac);
    request[132..].copy_from_slice(&cos);
    SenderPacket::new_unchecked(&mut request[..], Mode::Authenticated).sign(&key());
    let mut reply = [0u8; 140];
    let r = prepare(&request, &reflect_input(Some(&key())), &mut reply).unwrap();
    assert!(r.tlv_integrity_failed);
    assert_eq!(reply[112], super::tlv::FLAG_I);
    assert_eq!(reply[132], super::tlv::FLAG_I);
}

#[test]
fn an_hmac_tlv_in_unauthenticated_mode_is_unrecognized() {
    let mut request = [0u8; 44 + 20];
    request[..44].copy_from_slice(&SENDER_UNAUTH);
    request[44..48].copy_from_slice(&[0x80, 8, 0, 16]);
    let mut reply = [0u8; 64];
    let r = prepare(&request, &reflect_input(None), &mut reply).unwrap();
    assert_eq!(r.tlvs.unrecognized, 1);
    assert_eq!(reply[44], super::tlv::FLAG_U);
}

fn arb_sender() -> impl Strategy<Value = SenderRepr> {
    (any::<u32>(), any::<u64>(), any::<u16>(), any::<u16>()).prop_map(|(s, t, e, i)| SenderRepr {
        sequence_number: s,
        timestamp: t,
        error_estimate: ErrorEstimate::from_u16(e),
        ssid: i,
    })
}

fn arb_reflector() -> impl Strategy<Value = ReflectorRepr> {
    (
        (any::<u32>(), any::<u64>(), any::<u16>(), any::<u16>()),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u16>(),
            any::<u8>(),
        ),
    )
        .prop_map(|((s, t, e, i), (rt, ss, st, se, ttl))| ReflectorRepr {
            sequence_number: s,
            timestamp: t,
            error_estimate: ErrorEstimate::from_u16(e),
            ssid: i,
            receive_timestamp: rt,
            sender_sequence_number: ss,
            sender_timestamp: st,
            sender_error_estimate: ErrorEstimate::from_u16(se),
            sender_ttl: ttl,
        })
}

fn arb_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Unauthenticated), Just(Mode::Authenticated)]
}

proptest! {
    #[test]
    fn sender_repr_round_trip(repr in arb_sender(), mode in arb_mode()) {
        let mut buf = vec![0u8; mode.base_len()];
        repr.emit(&mut SenderPacket::new_unchecked(&mut buf[..], mode));
        prop_assert_eq!(SenderRepr::parse(&SenderPacket::new_checked(&buf[..], mode).unwrap()), repr);
    }

    #[test]
    fn reflector_repr_round_trip(repr in arb_reflector(), mode in arb_mode()) {
        let mut buf = vec![0u8; mode.base_len()];
        repr.emit(&mut ReflectorPacket::new_unchecked(&mut buf[..], mode));
        prop_assert_eq!(ReflectorRepr::parse(&ReflectorPacket::new_checked(&buf[..], mode).unwrap()), repr);
    }

    #[test]
    fn reply_is_never_larger_than_request(request in proptest::collection::vec(any::<u8>(), 0..600), authenticated: bool) {
        let k = key();
        let input = reflect_input(authenticated.then_some(&k));
        let mut reply = vec![0u8; 2048];
        match prepare(&request, &input, &mut reply) {
            Ok(r) => prop_assert_eq!(r.len, request.len()),
            Err(_) => prop_assert!(reply.iter().all(|&b| b == 0)),
        }
    }
}
