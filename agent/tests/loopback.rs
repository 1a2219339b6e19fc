//! Reflector and prober as separate processes on loopback, checked through what they print
//! and, for the reflector, through raw STAMP requests built with `proto`.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pathprobe_proto::stamp::tlv::{ClassOfService, TlvIter, TlvWriter, tlv_type};
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr,
};

mod common;

use common::Reflector;

const AGENT: &str = env!("CARGO_BIN_EXE_pathprobe-agent");

fn probe(args: &[&str]) -> Output {
    Command::new(AGENT)
        .arg("probe")
        .args(args)
        .output()
        .unwrap()
}

/// Probes, requires success, and returns the summary (the last JSON line).
fn probe_summary(args: &[&str]) -> serde_json::Value {
    let o = probe(args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    json_lines(&o).pop().unwrap()
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn key_file(name: &str, hex: &str) -> String {
    let dir = std::env::temp_dir().join(format!("pathprobe-loopback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    common::write_secret(&p, hex);
    p.to_str().unwrap().to_owned()
}

#[test]
fn every_probe_is_counted_and_windows_add_up_to_the_summary() {
    let r = Reflector::start(&[]);
    let target = r.addr.to_string();
    let o = probe(&[
        "--target",
        &target,
        "--rate",
        "1000",
        "--count",
        "1500",
        "--window",
        "500ms",
        "--json",
        "--path-name",
        "er",
        "--path-kind",
        "expressroute",
        "--size",
        "200",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&o);
    let (windows, summary) = lines.split_at(lines.len() - 1);
    let summary = &summary[0];
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["path"], "er");
    assert_eq!(summary["path_kind"], "expressroute");
    assert_eq!(summary["sent"], 1500);
    assert_eq!(summary["received"], 1500);
    assert_eq!(summary["lost"], 0);
    assert_eq!(summary["loss_pct"], 0.0);
    assert_eq!(summary["duplicated"], 0);
    assert_eq!(summary["timestamping"]["rx"], "kernel");
    assert_eq!(summary["timestamping"]["tx"], "kernel");
    assert!(
        windows.len() >= 3,
        "1.5 s in 500 ms windows: {}",
        windows.len()
    );
    let sum = |k: &str| windows.iter().map(|w| w[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("sent"), 1500);
    assert_eq!(sum("received"), 1500);
    assert_eq!(summary["windows"].as_u64().unwrap(), windows.len() as u64);
    let rtt = &summary["rtt_us"];
    for k in ["min", "p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(rtt[k].as_f64().unwrap() > 0.0, "rtt {k}");
    }
    assert!(
        rtt["p50"].as_f64().unwrap() < 10_000.0,
        "loopback p50 {rtt}"
    );
    assert!(
        rtt["min"].as_f64() <= rtt["p50"].as_f64() && rtt["p50"].as_f64() <= rtt["max"].as_f64()
    );
    assert!(summary["rtt_sched_us"]["p50"].as_f64() >= rtt["p50"].as_f64());
    assert!(summary["ipdv_us"]["p99"].as_f64().is_some());
    assert!(matches!(
        summary["owd_fwd_us"]["clock"].as_str(),
        Some("estimated" | "synchronized")
    ));
}

#[test]
fn ipv6_probes_are_answered_and_timed_by_the_kernel() {
    let r = Reflector::start_on("[::1]:0", &[]);
    let summary = probe_summary(&[
        "--target",
        &r.addr.to_string(),
        "--rate",
        "500",
        "--count",
        "200",
        "--json",
        "--dscp",
        "46",
    ]);
    assert_eq!(
        (summary["sent"].as_u64(), summary["received"].as_u64()),
        (Some(200), Some(200))
    );
    assert_eq!(summary["timestamping"]["rx"], "kernel");
}

#[test]
fn authenticated_probes_need_the_same_key() {
    let good = key_file(
        "good",
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    );
    let bad = key_file(
        "bad",
        "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    );
    let r = Reflector::start(&["--auth-key-file", &good]);
    let target = r.addr.to_string();
    let summary = probe_summary(&[
        "--target",
        &target,
        "--rate",
        "200",
        "--count",
        "100",
        "--json",
        "--auth-key-file",
        &good,
    ]);
    assert_eq!(
        (summary["sent"].as_u64(), summary["received"].as_u64()),
        (Some(100), Some(100))
    );

    let start = Instant::now();
    let o = probe(&[
        "--target",
        &target,
        "--rate",
        "50",
        "--count",
        "500",
        "--auth-key-file",
        &bad,
        "--no-reply-timeout",
        "1s",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no reply from") && err.contains("--auth-key-file"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "gave up in {:?}",
        start.elapsed()
    );
}

#[test]
fn a_closed_port_ends_at_once_with_exit_code_2() {
    // Find a free port, then leave it closed.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let o = probe(&["--target", &format!("127.0.0.1:{port}"), "--count", "100"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("port unreachable") && err.contains("pathprobe-agent reflect"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_silent_target_ends_with_a_clear_message_not_a_hang() {
    // A socket that receives and never answers, as a firewall that drops would.
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = sink.local_addr().unwrap().to_string();
    let start = Instant::now();
    let o = probe(&[
        "--target",
        &target,
        "--rate",
        "20",
        "--no-reply-timeout",
        "1s",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no reply from"));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn bad_flags_are_named() {
    for (args, needle) in [
        (
            vec!["--target", "127.0.0.1:862", "--size", "20"],
            "--size 20 is out of range",
        ),
        (
            vec!["--target", "127.0.0.1:862", "--duration", "ten"],
            "write it like 10s",
        ),
        (vec!["--target", "localhost", "--count", "1"], "HOST:PORT"),
        (
            vec!["--target", "127.0.0.1:862", "--dscp", "64"],
            "--dscp 64 is not a DSCP",
        ),
    ] {
        let o = probe(&args);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn binding_port_862_without_privilege_says_what_to_do() {
    // As root (CI), drop to `nobody` for the attempt, so the refusal really happens.
    let mut cmd = common::unprivileged(AGENT);
    let o = cmd
        .args(["reflect", "--listen", "127.0.0.1:862"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("CAP_NET_BIND_SERVICE") && err.contains("--listen 127.0.0.1:8620"),
        "{err}"
    );
}

#[test]
fn a_probe_too_short_for_class_of_service_still_sees_hops_but_no_far_dscp() {
    let r = Reflector::start(&[]);
    let summary = probe_summary(&[
        "--target",
        &r.addr.to_string(),
        "--rate",
        "500",
        "--count",
        "100",
        "--json",
        "--size",
        "44",
        "--dscp",
        "10",
    ]);
    let sig = &summary["signature"];
    assert_eq!(sig["fwd_hops"], 0, "{summary}");
    assert_eq!(sig["rev_hops"], 0);
    assert_eq!(sig["dscp_sent"], 10);
    assert!(sig.get("dscp_far").is_none(), "{sig}");
    // Without the TLV the reflector answers with the DSCP it received.
    assert_eq!(sig["dscp_back"], 10);
}

#[test]
fn window_reports_decode_and_add_up_to_the_summary() {
    let r = Reflector::start(&[]);
    let dir = std::env::temp_dir().join(format!("pathprobe-reports-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let summary = probe_summary(&[
        "--target",
        &r.addr.to_string(),
        "--rate",
        "500",
        "--count",
        "600",
        "--window",
        "400ms",
        "--json",
        "--report-dir",
        dir.to_str().unwrap(),
        "--agent-id",
        "test-agent",
        "--site",
        "lab",
        "--path-name",
        "vpn-backup",
        "--path-kind",
        "vpn",
        "--dscp",
        "46",
    ]);
    let mut agg = pathprobe_proto::report::Aggregate::default();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let report = pathprobe_proto::report::WindowReport::from_json(
            &std::fs::read(entry.unwrap().path()).unwrap(),
        )
        .unwrap();
        assert_eq!(report.agent_id, "test-agent");
        assert_eq!(report.site.as_deref(), Some("lab"));
        assert_eq!(report.path.name, "vpn-backup");
        assert_eq!(report.path.dscp, 46);
        assert_eq!(report.path.remote, r.addr);
        assert!(
            report
                .histograms
                .contains_key(&pathprobe_proto::hist::Metric::Rtt)
        );
        // Loopback: no router either way, and the DSCP arrives as sent both ways (the
        // default probe size has room for the Class-of-Service TLV).
        assert_eq!(
            report.signature,
            Some(pathprobe_proto::event::Signature {
                fwd_hops: Some(0),
                rev_hops: Some(0),
                dscp_sent: 46,
                dscp_far: Some(46),
                dscp_back: Some(46),
            })
        );
        assert!(report.events.is_empty(), "{:?}", report.events);
        agg.add(&report).unwrap();
    }
    assert_eq!(agg.windows, summary["windows"].as_u64().unwrap());
    assert_eq!(agg.counters.sent, 600);
    assert_eq!(agg.counters.received, summary["received"].as_u64().unwrap());
    let rtt = &agg.histograms[&pathprobe_proto::hist::Metric::Rtt];
    #[allow(clippy::cast_precision_loss)]
    let p99_us = rtt.value_at_quantile(0.99) as f64 / 1000.0;
    assert_eq!(
        summary["rtt_us"]["p99"].as_f64(),
        Some(p99_us),
        "the summary is the exact merge"
    );
}

/// Sends raw requests and returns the replies (up to `expect`, within 2 s).
fn exchange(r: &Reflector, requests: &[Vec<u8>], tos: u32, expect: usize) -> Vec<Vec<u8>> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_tos_v4(tos).unwrap();
    s.set_ttl_v4(33).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let s: UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for q in requests {
        s.send_to(q, r.addr).unwrap();
    }
    let mut replies = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(2);
    while replies.len() < expect && Instant::now() < deadline {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            replies.push(buf[..n].to_vec());
        }
    }
    replies
}

fn request(seq: u32, ssid: u16, size: usize, cos: Option<u8>, key: Option<&AuthKey>) -> Vec<u8> {
    let mode = if key.is_some() {
        Mode::Authenticated
    } else {
        Mode::Unauthenticated
    };
    let mut b = vec![0u8; size];
    let mut p = SenderPacket::new_unchecked(&mut b[..], mode);
    SenderRepr {
        sequence_number: seq,
        timestamp: 0xeeb2_7a98_0000_0000 + u64::from(seq),
        error_estimate: ErrorEstimate::default(),
        ssid,
    }
    .emit(&mut p);
    if let Some(d) = cos {
        TlvWriter::new(p.tlvs_mut())
            .class_of_service(ClassOfService {
                dscp1: d,
                ..ClassOfService::default()
            })
            .unwrap();
    }
    if let Some(k) = key {
        p.sign(k);
    }
    b
}

#[test]
fn stateless_reflector_echoes_fields_ttl_and_dscp() {
    let r = Reflector::start(&[]);
    let reqs: Vec<_> = (100..105)
        .map(|s| request(s, 7, 60, Some(46), None))
        .collect();
    // Sent as AF21 (DSCP 18) with ECT(0).
    let replies = exchange(&r, &reqs, (18 << 2) | 2, 5);
    assert_eq!(replies.len(), 5);
    for (q, a) in reqs.iter().zip(&replies) {
        assert_eq!(a.len(), q.len(), "reply as long as the request");
        let p = ReflectorPacket::new_checked(&a[..], Mode::Unauthenticated).unwrap();
        let rr = ReflectorRepr::parse(&p);
        assert_eq!(
            rr.sequence_number, rr.sender_sequence_number,
            "stateless copies the number"
        );
        assert_eq!(
            rr.sender_timestamp,
            0xeeb2_7a98_0000_0000 + u64::from(rr.sender_sequence_number)
        );
        assert_eq!(rr.ssid, 7);
        assert_eq!(rr.sender_ttl, 33);
        let [_, t2, t3] = rr.timestamps_unix_nanos().unwrap();
        assert!(t3 >= t2);
        let cos = TlvIter::new(p.tlvs()).next().unwrap().unwrap();
        assert_eq!(cos.tlv_type, tlv_type::CLASS_OF_SERVICE);
        let c = ClassOfService::parse(cos.value).unwrap();
        assert_eq!((c.dscp1, c.dscp2, c.ecn, c.reverse_path), (46, 18, 2, 0));
    }
}

#[test]
fn stateful_reflector_numbers_each_session() {
    let r = Reflector::start(&["--stateful"]);
    let reqs: Vec<_> = [500, 900, 77]
        .iter()
        .map(|&s| request(s, 1, 44, None, None))
        .collect();
    let replies = exchange(&r, &reqs, 0, 3);
    let seqs: Vec<u32> = replies
        .iter()
        .map(|a| {
            ReflectorRepr::parse(
                &ReflectorPacket::new_checked(&a[..], Mode::Unauthenticated).unwrap(),
            )
            .sequence_number
        })
        .collect();
    assert_eq!(seqs, [0, 1, 2]);
}

#[test]
fn malformed_and_forged_requests_get_no_reply() {
    let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let r = Reflector::start(&["--auth-key-file", &key_file("auth", hex)]);
    let key = AuthKey::new(&hex::decode(hex).unwrap()).unwrap();
    let other = AuthKey::new(&[9; 32]).unwrap();
    let good = request(1, 0, 112, None, Some(&key));
    let mut forged = good.clone();
    forged[20] ^= 1;
    let reqs = vec![
        vec![0u8; 43],                          // too short
        request(2, 0, 112, None, Some(&other)), // wrong key
        forged,                                 // altered after signing
        request(3, 0, 44, None, None),          // unauthenticated to an authenticated reflector
        good,
    ];
    let replies = exchange(&r, &reqs, 0, 5);
    assert_eq!(replies.len(), 1, "only the good request is answered");
    let p = ReflectorPacket::new_checked(&replies[0][..], Mode::Authenticated).unwrap();
    assert!(p.verify(&key).is_ok());
    assert_eq!(ReflectorRepr::parse(&p).sender_sequence_number, 1);
}

#[test]
fn the_per_source_cap_limits_a_flood() {
    let r = Reflector::start(&["--max-rate-per-source", "100"]);
    let reqs: Vec<_> = (0..400).map(|s| request(s, 0, 44, None, None)).collect();
    let replies = exchange(&r, &reqs, 0, 400);
    // A bucket of 10 (a tenth of a second) plus 100/s while the burst lasts.
    assert!(
        (10..=60).contains(&replies.len()),
        "{} replies",
        replies.len()
    );
}

/// The adversarial run: 112-octet garbage from the prober's own address (spoofable off
/// loopback) took the rate cap's tokens before the HMAC was checked, and cost the
/// authenticated prober 91.8% loss. Now only requests that pass the HMAC are charged.
#[test]
fn garbage_from_the_probers_address_costs_an_authenticated_prober_nothing() {
    let key = key_file(
        "flood",
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    );
    let r = Reflector::start(&["--auth-key-file", &key, "--max-rate-per-source", "1000"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (stop, to) = (std::sync::Arc::clone(&stop), r.addr);
        std::thread::spawn(move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let garbage = [0x5au8; 112];
            // Bounded: at most 200,000 datagrams or until the probe is done.
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 200_000 {
                let _ = s.send_to(&garbage, to);
                sent += 1;
                if sent.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(500));
                }
            }
            sent
        })
    };
    let o = probe(&[
        "--target",
        &r.addr.to_string(),
        "--rate",
        "200",
        "--count",
        "400",
        "--json",
        "--auth-key-file",
        &key,
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flooded = flood.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = json_lines(&o).pop().unwrap();
    // Far more garbage than the cap's 1,000/s went by; every probe was answered.
    assert!(flooded > 4_000, "{flooded}");
    assert_eq!(summary["received"], 400, "{summary}");
}

/// An unauthenticated sender could have replies marked with any DSCP (CS6 and CS7 were
/// tried). `--reply-dscp 0` stops that; `copy`, the default, honours the request.
#[test]
fn reply_dscp_policy_decides_what_replies_carry() {
    for (policy, want) in [(None, 48), (Some("0"), 0), (Some("10"), 10)] {
        let r = Reflector::start(&policy.map(|p| vec!["--reply-dscp", p]).unwrap_or_default());
        let summary = probe_summary(&[
            "--target",
            &r.addr.to_string(),
            "--rate",
            "500",
            "--count",
            "50",
            "--json",
            "--dscp",
            "48",
        ]);
        let sig = &summary["signature"];
        assert_eq!(sig["dscp_far"], 48, "{policy:?}: {sig}");
        assert_eq!(sig["dscp_back"], want, "{policy:?}: {sig}");
    }
    let o = Command::new(AGENT)
        .args(["reflect", "--reply-dscp", "64"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("0 to 63"));
}

/// One captured authenticated request sent 200 times: with `--refuse-replays` it is
/// answered once (the adversarial run had 198 of 200 answered); probes run as before.
#[test]
fn replays_of_an_authenticated_request_are_answered_once() {
    use pathprobe_proto::stamp::{AuthKey, ErrorEstimate, Mode, SenderPacket, SenderRepr};
    let hex = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    let key_path = key_file("replay", hex);
    let key = AuthKey::new(&(0..32u8).collect::<Vec<_>>()).unwrap();
    let mut packet = vec![0u8; Mode::Authenticated.base_len()];
    {
        let mut p = SenderPacket::new_unchecked(&mut packet[..], Mode::Authenticated);
        SenderRepr {
            sequence_number: 42,
            timestamp: 0x1234_5678_0000_0000,
            error_estimate: ErrorEstimate::default(),
            ssid: 9,
        }
        .emit(&mut p);
        p.sign(&key);
    }
    let answers = |extra: &[&str]| {
        let r = Reflector::start(&[&["--auth-key-file", key_path.as_str()][..], extra].concat());
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for _ in 0..200 {
            s.send_to(&packet, r.addr).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut buf = [0u8; 512];
        let mut n = 0;
        while s.recv(&mut buf).is_ok() {
            n += 1;
        }
        let summary = probe_summary(&[
            "--target",
            &r.addr.to_string(),
            "--rate",
            "500",
            "--count",
            "200",
            "--json",
            "--auth-key-file",
            &key_path,
        ]);
        (n, summary["received"].as_u64())
    };
    assert_eq!(
        answers(&[]),
        (200, Some(200)),
        "without --refuse-replays, every copy"
    );
    assert_eq!(
        answers(&["--refuse-replays"]),
        (1, Some(200)),
        "with it, once"
    );
}
