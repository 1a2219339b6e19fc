//! A STAMP exchange over real UDP sockets on loopback, sender and reflector both built from
//! `pathprobe-proto` alone: the packets a sender emits are what a reflector accepts, and the
//! reply carries back exactly what the sender and the network gave it.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::UdpSocket;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pathprobe_proto::stamp::reflect::{ReflectInput, finish, prepare};
use pathprobe_proto::stamp::tlv::{
    ClassOfService, FLAG_U, TlvIter, TlvReflectInfo, TlvWriter, tlv_type,
};
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr,
    TimestampFormat,
};

const PACKETS: u32 = 200;

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// Answers `PACKETS` requests (stateful: its own sequence numbers from 1000), then returns.
fn reflector(sock: UdpSocket, key: Option<AuthKey>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let ee = ErrorEstimate::from_error_nanos(false, TimestampFormat::Ptp, 1_000_000);
        let mut buf = [0u8; 1500];
        let mut reply = [0u8; 1500];
        for seq in 0..PACKETS {
            let (n, from) = sock
                .recv_from(&mut buf)
                .expect("request within the timeout");
            let t2 = TimestampFormat::Ptp.encode(now_ns()).unwrap();
            let input = ReflectInput {
                key: key.as_ref(),
                sequence_number: Some(1000 + seq),
                receive_timestamp: t2,
                error_estimate: ee,
                received_ttl: 64,
                tlv: TlvReflectInfo::default(),
            };
            let r = prepare(&buf[..n], &input, &mut reply).expect("a valid request");
            let t3 = TimestampFormat::Ptp.encode(now_ns()).unwrap();
            finish(&mut reply[..r.len], t3, key.as_ref()).unwrap();
            sock.send_to(&reply[..r.len], from).unwrap();
        }
    })
}

fn exchange(key: Option<&AuthKey>, size: usize) {
    let mode = if key.is_some() {
        Mode::Authenticated
    } else {
        Mode::Unauthenticated
    };
    let refl = UdpSocket::bind("127.0.0.1:0").unwrap();
    refl.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let refl_addr = refl.local_addr().unwrap();
    let handle = reflector(refl, key.cloned());

    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    sender
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let ee = ErrorEstimate::from_error_nanos(false, TimestampFormat::Ntp, 1_000_000);
    let mut buf = vec![0u8; size];
    let mut rx = [0u8; 1500];
    for seq in 0..PACKETS {
        let t1_ns = now_ns();
        let repr = SenderRepr {
            sequence_number: seq,
            timestamp: TimestampFormat::Ntp.encode(t1_ns).unwrap(),
            error_estimate: ee,
            ssid: 0x5151,
        };
        let mut p = SenderPacket::new_unchecked(&mut buf[..], mode);
        repr.emit(&mut p);
        let area = p.tlvs_mut();
        area.fill(0);
        let mut w = TlvWriter::new(area);
        w.class_of_service(ClassOfService {
            dscp1: 46,
            ..ClassOfService::default()
        })
        .unwrap();
        w.push(251, b"experimental").unwrap();
        if let Some(k) = key {
            p.sign(k);
        }
        sender.send_to(&buf, refl_addr).unwrap();

        let (n, _) = sender.recv_from(&mut rx).expect("reply within the timeout");
        let t4_ns = now_ns();
        assert_eq!(n, size, "the reply is exactly as long as the request");
        let reply = ReflectorPacket::new_checked(&rx[..n], mode).unwrap();
        if let Some(k) = key {
            reply.verify(k).expect("the reply's HMAC verifies");
        }
        let r = ReflectorRepr::parse(&reply);
        assert_eq!(r.sequence_number, 1000 + seq);
        assert_eq!(r.sender_sequence_number, seq);
        assert_eq!(r.sender_timestamp, repr.timestamp);
        assert_eq!(r.sender_error_estimate, ee);
        assert_eq!(r.ssid, 0x5151);
        assert_eq!(r.sender_ttl, 64);
        let [t1, t2, t3] = r.timestamps_unix_nanos().unwrap();
        assert_eq!(t1, t1_ns, "T1 comes back to the nanosecond");
        assert!(t2 <= t3, "T2 {t2} after T3 {t3}");
        let rtt = (t4_ns - t1) - (t3 - t2);
        assert!(rtt < 1_000_000_000, "loopback RTT of {rtt} ns");

        let tlvs: Vec<_> = TlvIter::new(reply.tlvs())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(tlvs[0].tlv_type, tlv_type::CLASS_OF_SERVICE);
        assert_eq!(ClassOfService::parse(tlvs[0].value).unwrap().dscp1, 46);
        assert_eq!((tlvs[1].tlv_type, tlvs[1].flags), (251, FLAG_U));
        assert_eq!(tlvs[1].value, b"experimental");
    }
    handle.join().unwrap();
}

#[test]
fn unauthenticated_exchange_over_loopback() {
    exchange(None, 44 + 8 + 16 + 20);
}

#[test]
fn authenticated_exchange_over_loopback() {
    exchange(Some(&AuthKey::new(&[0x42; 32]).unwrap()), 112 + 8 + 16);
}
