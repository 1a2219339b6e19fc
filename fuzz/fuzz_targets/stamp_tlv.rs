//! Any TLV area: iteration stays in bounds, reflection keeps the length and the TLV
//! boundaries, typed values and the HMAC TLV's checks never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pathprobe_proto::stamp::AuthKey;
use pathprobe_proto::stamp::tlv::{
    ClassOfService, HmacTlvAt, TimestampInformation, TlvIter, TlvReflectInfo, check_hmac_tlv,
    check_request_hmac_tlv, find_hmac_tlv, flag_integrity_failed, reflect_tlvs,
};

fuzz_target!(|data: &[u8]| {
    let mut bounds = Vec::new();
    for tlv in TlvIter::new(data) {
        let Ok(t) = tlv else { break };
        assert!(t.offset + 4 + t.value.len() <= data.len());
        let _ = ClassOfService::parse(t.value);
        let _ = TimestampInformation::parse(t.value);
        bounds.push((t.offset, t.tlv_type, t.value.len()));
    }
    let info = TlvReflectInfo {
        received_tos: data.first().copied().unwrap_or(0),
        ..TlvReflectInfo::default()
    };
    let mut reply = vec![0u8; data.len()];
    reflect_tlvs(data, &mut reply, &info);
    let back: Vec<_> = TlvIter::new(&reply)
        .map_while(Result::ok)
        .map(|t| (t.offset, t.tlv_type, t.value.len()))
        .collect();
    assert_eq!(bounds, back);
    if let HmacTlvAt::At(at) = find_hmac_tlv(data) {
        assert!(at + 20 <= data.len());
    }
    let key = AuthKey::new(&[7u8; 32]).expect("a 32-octet key");
    let mut packet = vec![0u8; 112];
    packet.extend_from_slice(data);
    let _ = check_hmac_tlv(&packet, 112, &key);
    let _ = check_request_hmac_tlv(&packet, 112, &key);
    let mut flagged = vec![0u8; data.len()];
    flag_integrity_failed(data, &mut flagged);
});
