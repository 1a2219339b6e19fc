//! Cost of the wire formats on the hot path: building a probe, reflecting it, reading the
//! reply, and shipping a window's histograms.
//!
//! `cargo bench -p pathprobe-benches --bench wire`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::stamp::reflect::{ReflectInput, finish, prepare};
use pathprobe_proto::stamp::tlv::TlvReflectInfo;
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr,
};

fn request(mode: Mode, key: Option<&AuthKey>) -> Vec<u8> {
    pathprobe_benches::stamp_request(mode, key, 1, 0xeeb2_7a98_4000_0000)
}

fn stamp(c: &mut Criterion) {
    let key = AuthKey::new(&[0x42; 32]).expect("32-octet key");
    for (name, mode, key) in [
        ("unauthenticated", Mode::Unauthenticated, None),
        ("authenticated", Mode::Authenticated, Some(&key)),
    ] {
        let req = request(mode, key);
        let repr = SenderRepr::parse(&SenderPacket::new_checked(&req[..], mode).expect("valid"));
        let mut out = vec![0u8; mode.base_len()];
        c.bench_function(&format!("stamp/{name}/sender_emit"), |b| {
            b.iter(|| {
                let mut p = SenderPacket::new_unchecked(&mut out[..], mode);
                black_box(&repr).emit(&mut p);
                if let Some(k) = key {
                    p.sign(k);
                }
            });
        });
        let input = ReflectInput {
            key,
            sequence_number: None,
            receive_timestamp: 1,
            error_estimate: ErrorEstimate::default(),
            received_ttl: 64,
            tlv: TlvReflectInfo::default(),
        };
        let mut reply = vec![0u8; 1500];
        c.bench_function(&format!("stamp/{name}/reflect"), |b| {
            b.iter(|| {
                let r = prepare(black_box(&req), &input, &mut reply).expect("valid request");
                finish(&mut reply[..r.len], 2, key).expect("prepared");
            });
        });
        let r = prepare(&req, &input, &mut reply).expect("valid request");
        finish(&mut reply[..r.len], 2, key).expect("prepared");
        let reply = reply[..r.len].to_vec();
        c.bench_function(&format!("stamp/{name}/reply_parse"), |b| {
            b.iter(|| {
                let p = ReflectorPacket::new_checked(black_box(&reply[..]), mode).expect("valid");
                if let Some(k) = key {
                    p.verify(k).expect("signed");
                }
                black_box(ReflectorRepr::parse(&p))
            });
        });
    }
}

fn histograms(c: &mut Criterion) {
    // A busy window: 10 s at 10,000 probes/s of RTTs spread over 20 us to 80 ms.
    let mut window = Metric::Rtt.new_histogram();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..100_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        window.saturating_record(20_000 + state % 80_000_000);
    }
    c.bench_function("hist/record", |b| {
        let mut r = Metric::Rtt.new_histogram();
        let mut v = 0u64;
        b.iter(|| {
            v = v.wrapping_add(7_919) % 80_000_000;
            r.saturating_record(black_box(v));
        });
    });
    let bytes = hist::encode(Metric::Rtt, &window).expect("encodes");
    println!(
        "hist/encoded_size: {} octets for {} samples",
        bytes.len(),
        window.len()
    );
    c.bench_function("hist/encode", |b| {
        b.iter(|| hist::encode(Metric::Rtt, black_box(&window)).expect("encodes"));
    });
    c.bench_function("hist/decode", |b| {
        b.iter(|| hist::decode(Metric::Rtt, black_box(&bytes)).expect("decodes"));
    });
    let other = window.clone();
    c.bench_function("hist/merge", |b| {
        let mut acc = Metric::Rtt.new_histogram();
        b.iter(|| hist::merge(Metric::Rtt, &mut acc, black_box(&other)).expect("merges"));
    });
}

criterion_group!(benches, stamp, histograms);
criterion_main!(benches);
