//! TCP probes on loopback: `tcp-connect` (no privileges) and `tcp-syn` (raw sockets, as
//! root): answered by a listener, refused (RST-counted) by a closed port, no connection
//! left half-open, and `tcp-syn` without CAP_NET_RAW says what to use instead.

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::{SocketAddr, TcpListener};
use std::process::Command;

mod common;

use common::AGENT;

/// A listener that accepts and drops connections, on an ephemeral loopback port.
fn listener() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    addr
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn probe(proto: &str, target: SocketAddr, count: u32) -> serde_json::Value {
    let o = Command::new(AGENT)
        .args([
            "probe", "--proto", proto, "--json", "--rate", "200", "--window", "60s",
        ])
        .args([
            "--target",
            &target.to_string(),
            "--count",
            &count.to_string(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

/// Connections to `port` in SYN-RECV on this host (from /proc/net/tcp).
fn half_open_on(port: u16) -> usize {
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&format!(":{port:04X}")) && f[3] == "03"
        })
        .count()
}

#[test]
fn tcp_connect_times_a_listener_and_counts_a_closed_port_as_refused() {
    let open = probe("tcp-connect", listener(), 100);
    assert_eq!(open["received"], 100, "{open}");
    assert_eq!(open["refused"], 0, "{open}");
    assert_eq!(
        open["owd_fwd_us"],
        serde_json::Value::Null,
        "no far-end clock"
    );
    assert!(open["rtt_us"]["p50"].as_f64().unwrap() > 0.0);
    let closed = probe("tcp-connect", closed_port(), 50);
    assert_eq!(closed["received"], 50, "an RST answers: {closed}");
    assert_eq!(closed["refused"], 50, "{closed}");
    assert_eq!(closed["lost"], 0, "{closed}");
}

#[test]
fn tcp_connect_windows_become_valid_collector_reports() {
    let dir = std::env::temp_dir().join(format!("pathprobe-tcp-reports-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = Command::new(AGENT)
        .args([
            "probe",
            "--proto",
            "tcp-connect",
            "--rate",
            "100",
            "--count",
            "50",
        ])
        .args(["--window", "200ms", "--target", &listener().to_string()])
        .arg("--report-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut received = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let r = pathprobe_proto::report::WindowReport::from_json(
            &std::fs::read(e.unwrap().path()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            r.path.protocol,
            pathprobe_proto::report::ProbeProtocol::TcpConnect
        );
        received += r.counters.received;
    }
    assert_eq!(received, 50, "every answer is in a report");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tcp_syn_without_cap_net_raw_names_tcp_connect() {
    let o = common::unprivileged(AGENT)
        .args([
            "probe",
            "--proto",
            "tcp-syn",
            "--target",
            "127.0.0.1:9",
            "--count",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("CAP_NET_RAW") && err.contains("--proto tcp-connect"),
        "{err}"
    );
}

#[test]
fn tcp_probes_refuse_stamp_only_settings() {
    let key = std::env::temp_dir().join(format!("pathprobe-tcp-key-{}", std::process::id()));
    common::write_secret(&key, "00112233445566778899aabbccddeeff");
    let o = Command::new(AGENT)
        .args(["probe", "--proto", "tcp-connect", "--target", "127.0.0.1:9"])
        .arg("--auth-key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no authenticated mode"));
    let _ = std::fs::remove_file(key);
}

#[test]
#[ignore = "needs root: raw sockets (CI runs it as root)"]
fn root_tcp_syn_times_a_listener_counts_rsts_and_leaves_nothing_half_open() {
    if !common::is_root() {
        eprintln!("SKIPPED: tcp-syn needs CAP_NET_RAW; CI runs it as root");
        return;
    }
    let target = listener();
    let open = probe("tcp-syn", target, 200);
    assert_eq!(open["received"], 200, "{open}");
    assert_eq!(open["refused"], 0, "{open}");
    assert_eq!(open["timestamping"]["rx"], "kernel");
    // Our RST (and the kernel's) closed every half-open connection.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(half_open_on(target.port()), 0, "no SYN-RECV left behind");
    let closed = probe("tcp-syn", closed_port(), 50);
    assert_eq!(closed["received"], 50, "{closed}");
    assert_eq!(closed["refused"], 50, "{closed}");
    // tcp-syn and tcp-connect time the same loopback path alike (both well under 1 ms).
    let connect = probe("tcp-connect", target, 200);
    let (a, b) = (
        open["rtt_us"]["p50"].as_f64().unwrap(),
        connect["rtt_us"]["p50"].as_f64().unwrap(),
    );
    assert!(
        a < 1000.0 && b < 1000.0,
        "loopback: syn {a} µs, connect {b} µs"
    );
}

#[test]
fn trace_without_cap_net_raw_says_so() {
    let o = common::unprivileged(AGENT)
        .args(["trace", "--target", "127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("CAP_NET_RAW"), "{err}");
}

#[test]
#[ignore = "needs root: raw sockets (CI runs it as root)"]
fn root_trace_reaches_a_loopback_reflector_and_a_closed_port() {
    if !common::is_root() {
        eprintln!("SKIPPED: trace needs CAP_NET_RAW; CI runs it as root");
        return;
    }
    let r = common::Reflector::start(&[]);
    for target in [r.addr, closed_port()] {
        let o = Command::new(AGENT)
            .args([
                "trace",
                "--json",
                "--queries",
                "2",
                "--target",
                &target.to_string(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(t["reached"], true, "{t}");
        assert_eq!(
            t["hops"].as_array().unwrap().len(),
            1,
            "loopback is one hop: {t}"
        );
        assert_eq!(t["hops"][0]["addr"], "127.0.0.1");
    }
}
