//! Any datagram, read as either side's packet in either mode and reflected: no panic, and a
//! reply is exactly as long as its request and reads back as a reflector packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pathprobe_proto::stamp::reflect::{ReflectInput, finish, prepare};
use pathprobe_proto::stamp::tlv::TlvReflectInfo;
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr,
};

fuzz_target!(|data: &[u8]| {
    let key = AuthKey::new(&[7u8; 32]).expect("a 32-octet key");
    for mode in [Mode::Unauthenticated, Mode::Authenticated] {
        if let Ok(p) = SenderPacket::new_checked(data, mode) {
            let r = SenderRepr::parse(&p);
            let _ = r.timestamp_unix_nanos();
            let _ = p.verify(&key);
        }
        if let Ok(p) = ReflectorPacket::new_checked(data, mode) {
            let _ = ReflectorRepr::parse(&p).timestamps_unix_nanos();
        }
    }
    // The same datagram with a valid base HMAC, so that the authenticated reflection gets
    // past it to the TLVs and their HMAC TLV.
    let mut signed = data.to_vec();
    if let Ok(mut p) = SenderPacket::new_checked(&mut signed[..], Mode::Authenticated) {
        p.sign(&key);
    }
    for (k, data) in [(None, data), (Some(&key), data), (Some(&key), &signed[..])] {
        let input = ReflectInput {
            key: k,
            sequence_number: None,
            receive_timestamp: 0x0123_4567_89ab_cdef,
            error_estimate: ErrorEstimate::default(),
            received_ttl: 61,
            tlv: TlvReflectInfo::default(),
        };
        let mut reply = vec![0u8; data.len()];
        if let Ok(r) = prepare(data, &input, &mut reply) {
            assert_eq!(r.len, data.len());
            finish(&mut reply, 1, k).expect("a prepared reply can be finished");
            let mode = if k.is_some() {
                Mode::Authenticated
            } else {
                Mode::Unauthenticated
            };
            let back = ReflectorPacket::new_checked(&reply[..], mode).expect("reply parses");
            assert_eq!(
                back.sender_sequence_number(),
                u32::from_be_bytes([data[0], data[1], data[2], data[3]])
            );
        }
    }
});
