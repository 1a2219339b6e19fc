//! Root-only: `pathprobe-agent trace` in the lab sees each path's routers (one on the
//! ExpressRoute-like path, two gateways on the VPN-like one), over UDP and TCP, and sees the
//! service address move from one to the other when ER's link goes down.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::net::Ipv4Addr;

use pathprobe_tests::lab::{
    AZURE_ER, AZURE_VPN, Failure, Lab, Path, PathConfig, Proc, SERVICE, STAMP_PORT, root_or_skip,
};

fn trace(lab: &Lab, proto: &str, to: Ipv4Addr, port: u16) -> serde_json::Value {
    let o = lab
        .agent("onprem")
        .args(["trace", "--json", "--queries", "2", "--proto", proto])
        .args(["--target", &format!("{to}:{port}")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The addresses of the hops, in order.
fn hops(t: &serde_json::Value) -> Vec<String> {
    t["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["addr"].as_str().unwrap_or("*").to_string())
        .collect()
}

#[test]
#[ignore = "needs root: network namespaces and raw sockets (CI runs it as root)"]
fn root_trace_sees_each_paths_routers_and_the_failover() {
    if !root_or_skip("root_trace_sees_each_paths_routers_and_the_failover") {
        return;
    }
    let lab = Lab::new(
        &PathConfig::both("delay=2ms"),
        &PathConfig::both("delay=5ms"),
    );
    let _r = lab.reflector();
    let _listener = Proc::start(
        lab.exec("azure", "iperf3")
            .args(["-s", "--forceflush", "-p", "5201"]),
        "Server listening",
    );
    // ER: its router, then the target (answering STAMP).
    let er = trace(&lab, "udp", AZURE_ER, STAMP_PORT);
    assert_eq!(hops(&er), ["10.10.1.2", "10.10.2.2"], "{er}");
    assert_eq!(er["reached"], true);
    // The last hop's RTT carries the emulated 4 ms; the router before the emulator none.
    let last = er["hops"][1]["rtt_us"][0].as_f64().unwrap();
    assert!(last >= 4_000.0, "{er}");
    // VPN: both gateways, then the target; TCP sees the same hops.
    let vpn = trace(&lab, "udp", AZURE_VPN, STAMP_PORT);
    assert_eq!(hops(&vpn), ["10.20.1.2", "10.20.2.2", "10.20.3.2"], "{vpn}");
    let tcp = trace(&lab, "tcp", AZURE_VPN, 5201);
    assert_eq!(hops(&tcp), hops(&vpn), "{tcp}");
    // The service address goes over ER; with ER's link down, over the VPN's two gateways.
    let before = trace(&lab, "udp", SERVICE, STAMP_PORT);
    assert_eq!(hops(&before), ["10.10.1.2", "10.1.0.1"], "{before}");
    lab.fail(Path::Er, Failure::LinkDown);
    let after = trace(&lab, "udp", SERVICE, STAMP_PORT);
    assert_eq!(
        hops(&after),
        ["10.20.1.2", "10.20.2.2", "10.1.0.1"],
        "{after}"
    );
}

#[test]
#[ignore = "needs root: network namespaces and raw sockets (CI runs it as root)"]
fn root_a_route_change_raises_a_signature_event_with_a_trace_and_remarking_is_flagged() {
    if !root_or_skip(
        "root_a_route_change_raises_a_signature_event_with_a_trace_and_remarking_is_flagged",
    ) {
        return;
    }
    let lab = Lab::new(
        &PathConfig::both("delay=2ms"),
        &PathConfig::both("delay=5ms"),
    );
    let _r = lab.reflector();
    // The second VPN gateway bleaches DSCP, as the internet under a VPN commonly does.
    let o = lab
        .exec("vpn2", "iptables")
        .args([
            "-t",
            "mangle",
            "-A",
            "FORWARD",
            "-j",
            "DSCP",
            "--set-dscp",
            "0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reports = std::env::temp_dir().join(format!("pathprobe-signature-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&reports);
    let probe = lab
        .agent("onprem")
        .args(["probe", "--json", "--rate", "100", "--duration", "7s"])
        .args(["--window", "1s", "--dscp", "46", "--path-name", "service"])
        .args(["--target", &format!("{SERVICE}:{STAMP_PORT}")])
        .arg("--report-dir")
        .arg(&reports)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    lab.fail(Path::Er, Failure::LinkDown);
    let o = probe.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &lines[0]["signature"];
    assert_eq!(
        (first["fwd_hops"].as_u64(), first["rev_hops"].as_u64()),
        (Some(1), Some(1)),
        "ER: one router each way: {first}"
    );
    assert_eq!(first["dscp_far"], 46, "ER keeps the marking: {first}");
    let events: Vec<&serde_json::Value> = lines
        .iter()
        .flat_map(|l| l["events"].as_array().into_iter().flatten())
        .collect();
    let changes: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "signature_change")
        .collect();
    assert_eq!(changes.len(), 1, "one route change, one event: {events:?}");
    let change = changes[0];
    assert_eq!(change["before"]["fwd_hops"], 1, "{change}");
    assert_eq!(change["after"]["fwd_hops"], 2, "{change}");
    assert_eq!(change["after"]["rev_hops"], 2, "{change}");
    assert!(
        change["summary"]
            .as_str()
            .unwrap()
            .contains("forward hops 1 → 2"),
        "{change}"
    );
    // The trace run at the change shows the route now: both VPN gateways.
    assert_eq!(
        hops(&change["trace"]),
        ["10.20.1.2", "10.20.2.2", "10.1.0.1"],
        "{change}"
    );
    assert_eq!(change["trace"]["reached"], true);
    // The VPN re-marks EF to 0, both ways, and that is flagged.
    let remark: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "dscp_remarked")
        .collect();
    assert_eq!(remark.len(), 1, "{events:?}");
    assert_eq!(remark[0]["after"]["dscp_far"], 0, "{}", remark[0]);
    assert_eq!(remark[0]["after"]["dscp_back"], 0, "{}", remark[0]);
    // The same events are in the window reports the collector would get.
    let mut reported = Vec::new();
    for entry in std::fs::read_dir(&reports).unwrap() {
        let r = pathprobe_proto::report::WindowReport::from_json(
            &std::fs::read(entry.unwrap().path()).unwrap(),
        )
        .unwrap();
        reported.extend(r.events);
    }
    reported.sort_by_key(|e| e.kind);
    let kinds: Vec<_> = reported.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["signature_change", "dscp_remarked"]);
    let trace = reported[0].trace.as_ref().unwrap();
    assert_eq!(trace.hops.len(), 3);
    let _ = std::fs::remove_dir_all(&reports);
}
