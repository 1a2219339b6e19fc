//! Root-only tests through the namespace lab (`pathprobe_tests::lab`): the paths carry the
//! configured delay, jitter, loss and rate for UDP, TCP and ICMP alike, and the service
//! address prefers ExpressRoute and falls back to the VPN when ER fails.
//!
//! Tolerances come from a baseline run through the same path just before, with only a
//! fixed delay configured (the lab's own latency: veth, forwarding hops, the NFQUEUE round
//! trip and the emulator's timed release), and from sampling statistics, never from the
//! result.

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::float_cmp,
    reason = "test code"
)]

use std::net::Ipv4Addr;
use std::process::Command;

use pathprobe_tests::lab::{
    AZURE_ER, AZURE_VPN, Failure, Lab, Path, PathConfig, Proc, SERVICE, STAMP_PORT, root_or_skip,
};

/// The lab tests time paths: never two at once on this machine's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Probes `to` from on-prem; the summary, or `None` when nothing answered (exit code 2).
fn try_probe(lab: &Lab, to: Ipv4Addr, count: u32, rate: u32) -> Option<serde_json::Value> {
    lab.probe(&[
        "--window",
        "60s",
        "--timeout",
        "500ms",
        "--target",
        &format!("{to}:{STAMP_PORT}"),
        "--count",
        &count.to_string(),
        "--rate",
        &rate.to_string(),
    ])
}

fn probe(lab: &Lab, to: Ipv4Addr, count: u32, rate: u32) -> serde_json::Value {
    try_probe(lab, to, count, rate).unwrap_or_else(|| panic!("nothing answered from {to}"))
}

fn rtt(v: &serde_json::Value, q: &str) -> f64 {
    v["rtt_us"][q].as_f64().unwrap()
}

/// Probes per accuracy run.
const N: u32 = 1000;

/// One path's settings and what they add up to.
struct Case {
    path: Path,
    to: Ipv4Addr,
    cfg: PathConfig,
    delay_us: f64,
    jitter_us: f64,
}

/// The lab's own latency on one path (over what is configured).
struct Baseline {
    min: f64,
    p99: f64,
    max: f64,
}

#[test]
#[ignore = "needs root: network namespaces and iptables (CI runs it as root)"]
fn root_lab_paths_carry_the_configured_delay_jitter_and_loss() {
    if !root_or_skip("root_lab_paths_carry_the_configured_delay_jitter_and_loss") {
        return;
    }
    let _serial = one_at_a_time();
    let mut lab = Lab::new(&PathConfig::default(), &PathConfig::default());
    let _r = lab.reflector();
    // Each path has its delay both ways, uniform jitter ±J in one direction and 5% loss
    // in one direction; between them both directions are covered.
    let cases = [
        Case {
            path: Path::Er,
            to: AZURE_ER,
            cfg: PathConfig {
                fwd: "delay=3ms".into(),
                rev: "delay=1ms,jitter=1ms,reorder=yes,loss=5%".into(),
                ..PathConfig::default()
            },
            delay_us: 4_000.0,
            jitter_us: 1_000.0,
        },
        Case {
            path: Path::Vpn,
            to: AZURE_VPN,
            cfg: PathConfig {
                fwd: "delay=12ms,jitter=3ms,reorder=yes,loss=5%".into(),
                rev: "delay=6ms".into(),
                ..PathConfig::default()
            },
            delay_us: 18_000.0,
            jitter_us: 3_000.0,
        },
    ];
    for case in &cases {
        // The lab's own latency on this path, measured just before, through the same
        // timed-release code: 1 ms each way configured, RTT minus 2 ms.
        lab.emulate(case.path, &PathConfig::both("delay=1ms"));
        let delayed = probe(&lab, case.to, N, 200);
        assert_eq!(delayed["lost"], 0, "nothing lost, only delayed: {delayed}");
        let base = Baseline {
            min: rtt(&delayed, "min") - 2_000.0,
            p99: rtt(&delayed, "p99") - 2_000.0,
            max: rtt(&delayed, "max") - 2_000.0,
        };
        lab.emulate(case.path, &case.cfg);
        let v = probe(&lab, case.to, N, 200);
        let (d, j) = (case.delay_us, case.jitter_us);
        let (min, p50, p90, p99) = (
            rtt(&v, "min"),
            rtt(&v, "p50"),
            rtt(&v, "p90"),
            rtt(&v, "p99"),
        );
        // RTT = D + U(-J, J) + the lab's own latency e, with e in [base min, base p99]
        // (99% of the time). Sampling: the standard error of the median of n uniform
        // draws is J/sqrt(n); of the 90th percentile 0.6 J/sqrt(n); allow 4 of each.
        let n = f64::from(N);
        let se50 = 4.0 * j / n.sqrt();
        let se90 = 4.0 * 0.6 * j / n.sqrt();
        let ctx = format!("{:?}: {v}", case.path);
        assert!(
            p50 >= d + base.min - se50 && p50 <= d + base.p99 + se50,
            "median {p50} µs, expected {d} µs + [{}, {}] ± {se50:.0}; {ctx}",
            base.min,
            base.p99
        );
        assert!(min >= d - j, "min {min} below D - J; {ctx}");
        // The p99 bound needs its own statistics: the sample p99 of the lab's latency e
        // is itself an estimate, and e's tail shifts between runs. Bound by the baseline's
        // largest sample instead: a new draw of e exceeds the largest of N earlier draws
        // with probability 1/(N + 1), so the N samples here hold about one such, and the
        // p99 (the 1% = N/100 highest) can pass D + J + that maximum only if N/100 of them
        // do: with N = 1,000, 10 where one is expected (Poisson: about 10^-7).
        assert!(
            p99 <= d + j + base.max,
            "p99 {p99} above D + J + the lab's largest latency {}; {ctx}",
            base.max
        );
        // The jitter: p90 - p50 of U(-J, J) is 0.8 J; the lab's own spread moves it by at
        // most its (p99 - min).
        let spread = p90 - p50;
        let tol = se50 + se90 + (base.p99 - base.min);
        assert!(
            (spread - 0.8 * j).abs() <= tol,
            "p90 - p50 = {spread} µs, expected {} ± {tol:.0}; {ctx}",
            0.8 * j
        );
        // 5% of N lost, within 4 binomial standard deviations.
        let lost = v["lost"].as_f64().unwrap();
        let sd = (n * 0.05 * 0.95).sqrt();
        assert!(
            (lost - n * 0.05).abs() <= 4.0 * sd,
            "{lost} lost of {N}, expected {} ± {:.0}; {ctx}",
            n * 0.05,
            4.0 * sd
        );
    }
}

/// Which path carried a probe run to the service: the one whose router counted its
/// packets. Returns the path and the summary.
fn service_path(lab: &Lab) -> (Path, serde_json::Value) {
    let (er0, vpn0) = (lab.packets_in(Path::Er), lab.packets_in(Path::Vpn));
    let v = probe(lab, SERVICE, 100, 100);
    let (er, vpn) = (
        lab.packets_in(Path::Er) - er0,
        lab.packets_in(Path::Vpn) - vpn0,
    );
    // 100 probes and nothing much else (an ARP exchange or two).
    let path = match (er >= 100, vpn >= 100) {
        (true, false) if vpn < 10 => Path::Er,
        (false, true) if er < 10 => Path::Vpn,
        _ => panic!("the service's traffic split: {er} packets over ER, {vpn} over the VPN"),
    };
    (path, v)
}

#[test]
#[ignore = "needs root: network namespaces and iptables (CI runs it as root)"]
fn root_lab_service_prefers_expressroute_and_falls_back_to_vpn() {
    if !root_or_skip("root_lab_service_prefers_expressroute_and_falls_back_to_vpn") {
        return;
    }
    let _serial = one_at_a_time();
    let lab = Lab::new(
        &PathConfig::both("delay=1ms"),
        &PathConfig::both("delay=10ms"),
    );
    let _r = lab.reflector();

    let (path, v) = service_path(&lab);
    assert_eq!(path, Path::Er, "ER is preferred");
    assert!(rtt(&v, "p50") < 10_000.0, "ER's RTT is 2 ms: {v}");

    lab.fail(Path::Er, Failure::LinkDown);
    let (path, v) = service_path(&lab);
    assert_eq!(
        path,
        Path::Vpn,
        "ER's link down: the VPN carries the service"
    );
    assert!(rtt(&v, "p50") >= 20_000.0, "the VPN's RTT is 20 ms: {v}");
    assert_eq!(v["lost"], 0, "{v}");

    lab.heal(Path::Er);
    let (path, v) = service_path(&lab);
    assert_eq!(path, Path::Er, "back on ER once its link is up");
    // And answered: a router whose link went down lost its routes through it, and the
    // traffic must not just reach ER but cross it.
    assert_eq!(v["lost"], 0, "{v}");

    // A blackhole: routing does not notice, the traffic is lost on ER...
    lab.fail(Path::Er, Failure::Blackhole);
    let (er0, vpn0) = (lab.packets_in(Path::Er), lab.packets_in(Path::Vpn));
    let answered = try_probe(&lab, SERVICE, 20, 20).map_or(0, |v| v["received"].as_u64().unwrap());
    assert_eq!(answered, 0, "a blackholed ER answers nothing");
    assert!(lab.packets_in(Path::Er) - er0 >= 20, "they went into ER");
    assert!(lab.packets_in(Path::Vpn) - vpn0 < 10, "and not to the VPN");
    // ...until the route is withdrawn.
    lab.withdraw(Path::Er);
    let (path, v) = service_path(&lab);
    assert_eq!(path, Path::Vpn, "ER withdrawn: the VPN carries the service");
    assert_eq!(v["lost"], 0, "{v}");

    lab.heal(Path::Er);
    let (path, v) = service_path(&lab);
    assert_eq!(path, Path::Er, "back on ER once healed");
    assert_eq!(v["lost"], 0, "{v}");

    // The pinned addresses never move: the VPN address is reached over the VPN even
    // while ER is fine.
    let (er0, vpn0) = (lab.packets_in(Path::Er), lab.packets_in(Path::Vpn));
    probe(&lab, AZURE_VPN, 50, 100);
    assert!(lab.packets_in(Path::Vpn) - vpn0 >= 50);
    assert!(lab.packets_in(Path::Er) - er0 < 10);
}

/// `iperf3 -c to` from on-prem with `args` (a server must listen); the JSON result.
fn iperf3(lab: &Lab, to: Ipv4Addr, port: u16, args: &[&str]) -> serde_json::Value {
    let o = lab
        .exec("onprem", "iperf3")
        .args(["-c", &to.to_string(), "-p", &port.to_string(), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "iperf3 failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn iperf3_server(lab: &Lab, port: u16) -> Proc {
    Proc::start(
        lab.exec("azure", "iperf3")
            .args(["-s", "--forceflush", "-p", &port.to_string()]),
        "Server listening",
    )
}

#[test]
#[ignore = "needs root: network namespaces and iptables (CI runs it as root)"]
fn root_lab_delays_tcp_and_icmp_like_udp() {
    if !root_or_skip("root_lab_delays_tcp_and_icmp_like_udp") {
        return;
    }
    let _serial = one_at_a_time();
    let lab = Lab::new(
        &PathConfig::both("delay=5ms"),
        &PathConfig::both("delay=15ms"),
    );
    // ICMP: ping's average RTT is the configured 10 ms / 30 ms plus the lab's own latency
    // (well under a millisecond).
    for (to, want_ms) in [(AZURE_ER, 10.0), (AZURE_VPN, 30.0)] {
        let o = lab
            .exec("onprem", "ping")
            .args(["-c", "5", "-i", "0.2", "-q", &to.to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
        let out = String::from_utf8_lossy(&o.stdout);
        // rtt min/avg/max/mdev = 10.123/10.200/10.301/0.050 ms
        let avg: f64 = out
            .lines()
            .find_map(|l| l.split(" = ").nth(1))
            .and_then(|v| v.split('/').nth(1))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no rtt line in {out}"));
        assert!(
            avg >= want_ms && avg < want_ms + 1.0,
            "ping {to}: {avg} ms, expected {want_ms} ms + < 1 ms"
        );
    }
    // TCP: the kernel's smoothed RTT of a light iperf3 stream (1 Mbit/s, so nothing
    // queues) is the configured RTT.
    let _s = iperf3_server(&lab, 5201);
    for (to, want_us) in [(AZURE_ER, 10_000.0), (AZURE_VPN, 30_000.0)] {
        let v = iperf3(&lab, to, 5201, &["-t", "1", "-b", "1M"]);
        let min_rtt = v["end"]["streams"][0]["sender"]["min_rtt"]
            .as_f64()
            .unwrap();
        assert!(
            min_rtt >= want_us && min_rtt < want_us + 1_000.0,
            "TCP to {to}: min RTT {min_rtt} µs, expected {want_us} µs + < 1 ms"
        );
    }
}

#[test]
#[ignore = "needs root: network namespaces and iptables (CI runs it as root)"]
fn root_lab_tbf_limits_each_path_to_its_rate() {
    if !root_or_skip("root_lab_tbf_limits_each_path_to_its_rate") {
        return;
    }
    let _serial = one_at_a_time();
    let rated = |fwd: &str, rev: &str, rate: &str| PathConfig {
        fwd: fwd.into(),
        rev: rev.into(),
        rate_fwd: Some(rate.into()),
        rate_rev: Some(rate.into()),
    };
    let lab = Lab::new(
        &rated("delay=1ms", "delay=1ms", "100mbit"),
        &rated("delay=5ms", "delay=5ms", "20mbit"),
    );
    let _s = iperf3_server(&lab, 5201);
    for (to, rate) in [(AZURE_ER, 100e6), (AZURE_VPN, 20e6)] {
        let v = iperf3(&lab, to, 5201, &["-t", "3"]);
        let got = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap();
        // TCP over a tbf with a 50 ms queue fills it; headers (TCP/IP/Ethernet, about
        // 4.5% at 1500 octets) are counted by tbf and not by iperf3's goodput.
        assert!(
            got <= rate && got >= 0.85 * rate,
            "TCP to {to}: {got:.0} bit/s through a {rate:.0} bit/s tbf"
        );
    }
}

/// `ping` and `iperf3` must exist for the lab tests (.ci/run installs them).
#[test]
#[ignore = "needs root: the namespace lab's tools (CI runs it as root)"]
fn root_lab_tools_are_installed() {
    for tool in ["ip", "tc", "iptables", "sysctl", "ping", "iperf3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing: .ci/run installs it with apt-get");
    }
}
