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
