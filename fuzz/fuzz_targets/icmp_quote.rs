//! Whatever a raw ICMP socket hands `trace`: an error quoting one of our UDP or TCP probes,
//! or `None`, never a panic; what it reads comes from where RFC 792 puts it.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use pathprobe_agent::trace::parse_icmp;

fuzz_target!(|data: &[u8]| {
    let Some(q) = parse_icmp(data) else {
        return;
    };
    // Only Destination Unreachable (3) and Time Exceeded (11), quoting UDP or TCP.
    assert!(matches!(q.icmp_type, 3 | 11), "{q:?}");
    assert!(matches!(q.protocol, 6 | 17), "{q:?}");
    // The sender is the outer header's source (octets 12..16).
    assert_eq!(
        q.from,
        Ipv4Addr::new(data[12], data[13], data[14], data[15])
    );
    // The quoted header follows the outer header and the 8 octets of ICMP header.
    let outer = usize::from(data[0] & 0x0f) * 4;
    let inner = &data[outer + 8..];
    assert_eq!(q.protocol, inner[9]);
    assert_eq!(
        q.dst,
        Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19])
    );
});
