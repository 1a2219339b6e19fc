//! Whatever a raw TCP socket hands `probe --proto tcp-syn`: a SYN-ACK or RST from the target
//! to one of our ports, or `None`, never a panic. The target and the port are taken from the
//! input itself, so the fuzzer reaches past the address checks.
#![no_main]

use std::net::{Ipv4Addr, SocketAddrV4};

use libfuzzer_sys::fuzz_target;
use pathprobe_agent::probe::tcp::parse_answer;

fuzz_target!(|data: &[u8]| {
    if data.len() < 20 {
        assert_eq!(
            parse_answer(data, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 80), &[80]),
            None
        );
        return;
    }
    let src = Ipv4Addr::new(data[12], data[13], data[14], data[15]);
    let hl = usize::from(data[0] & 0x0f) * 4;
    let port = |at: usize| {
        data.get(hl + at..hl + at + 2)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    let (target_port, our_port) = (port(0), port(2));
    let target = SocketAddrV4::new(src, target_port);
    let Some(a) = parse_answer(data, target, &[our_port, 1]) else {
        return;
    };
    // An answer is addressed to one of our ports, and is a SYN-ACK or an RST.
    assert!(a.port == our_port || a.port == 1, "{a:?}");
    let flags = data[hl + 13];
    let rst = flags & 0x04 != 0;
    assert_eq!(a.refused, rst);
    assert!(rst || flags & 0x12 == 0x12, "{a:?}");
    assert_eq!(a.ttl, data[8]);
});
