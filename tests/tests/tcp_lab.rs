//! Root-only: TCP probes over the lab's ExpressRoute-like path. `tcp-syn` times the path
//! like STAMP does, a closed port is RST-counted, a blackholed one is loss, and the far end
//! keeps no half-open connection (its own socket table says so).

#![allow(clippy::unwrap_used, clippy::cast_precision_loss, reason = "test code")]

use std::net::Ipv4Addr;

use pathprobe_tests::lab::{AZURE_ER, Lab, PathConfig, Proc, STAMP_PORT, root_or_skip};

/// Probes `to:port` from on-prem with `proto`; the summary, or `None` when nothing at all
/// answered (exit code 2).
fn probe(lab: &Lab, proto: &str, to: Ipv4Addr, port: u16, count: u32) -> Option<serde_json::Value> {
    lab.probe(&[
        "--proto",
        proto,
        "--rate",
        "100",
        "--window",
        "60s",
        "--timeout",
        "500ms",
        "--target",
        &format!("{to}:{port}"),
        "--count",
        &count.to_string(),
    ])
}

fn f(v: &serde_json::Value, q: &str) -> f64 {
    v["rtt_us"][q].as_f64().unwrap()
}

#[test]
#[ignore = "needs root: network namespaces, iptables and raw sockets (CI runs it as root)"]
fn root_tcp_syn_agrees_with_stamp_counts_rsts_and_loses_blackholed_probes() {
    if !root_or_skip("root_tcp_syn_agrees_with_stamp_counts_rsts_and_loses_blackholed_probes") {
        return;
    }
    let lab = Lab::new(&PathConfig::both("delay=5ms"), &PathConfig::default());
    let _r = lab.reflector();
    let _listener = Proc::start(
        lab.exec("azure", "iperf3")
            .args(["-s", "--forceflush", "-p", "5201"]),
        "Server listening",
    );
    let stamp = probe(&lab, "stamp", AZURE_ER, STAMP_PORT, 300).unwrap();
    let syn = probe(&lab, "tcp-syn", AZURE_ER, 5201, 300).unwrap();
    assert_eq!(syn["lost"], 0, "{syn}");
    assert_eq!(syn["refused"], 0, "{syn}");
    // Both cross the same 10 ms of emulated delay. Their medians may differ by the lab's
    // own latency spread as STAMP saw it (p99 - min) plus 100 µs for the far end's kernel
    // answering a SYN rather than our reflector answering a datagram.
    let tol = f(&stamp, "p99") - f(&stamp, "min") + 100.0;
    let (a, b) = (f(&syn, "p50"), f(&stamp, "p50"));
    assert!(
        (a - b).abs() <= tol,
        "tcp-syn p50 {a} µs against STAMP's {b} µs (tolerance {tol:.0} µs)"
    );
    eprintln!("tcp-syn p50 {a:.1} µs, STAMP p50 {b:.1} µs, tolerance {tol:.0} µs");
    assert!(a >= 10_000.0, "the emulated 10 ms RTT: {a}");
    // Nothing left half-open at the far end: its socket table has no SYN-RECV entry.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let ss = lab
        .exec("azure", "ss")
        .args(["-Htan", "state", "syn-recv"])
        .output()
        .unwrap();
    assert!(ss.status.success());
    assert!(
        String::from_utf8_lossy(&ss.stdout).trim().is_empty(),
        "half-open at the far end: {}",
        String::from_utf8_lossy(&ss.stdout)
    );
    // A port nothing listens on answers RST: counted, not lost.
    let closed = probe(&lab, "tcp-syn", AZURE_ER, 5998, 50).unwrap();
    assert_eq!(
        (closed["received"].as_u64(), closed["refused"].as_u64()),
        (Some(50), Some(50)),
        "{closed}"
    );
    // A blackholed port answers nothing: loss.
    let drop = lab
        .exec("azure", "iptables")
        .args(["-A", "INPUT", "-p", "tcp", "--dport", "5999", "-j", "DROP"])
        .status()
        .unwrap();
    assert!(drop.success());
    let lost =
        probe(&lab, "tcp-syn", AZURE_ER, 5999, 20).map_or(20, |v| v["lost"].as_u64().unwrap());
    assert_eq!(lost, 20, "every probe to a blackholed port is lost");
    // tcp-connect sees the same.
    let connect = probe(&lab, "tcp-connect", AZURE_ER, 5201, 100).unwrap();
    assert_eq!(connect["lost"], 0, "{connect}");
    assert!(f(&connect, "p50") >= 10_000.0, "{connect}");
}
