//! `pathprobe-collector inspect` on report files.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::{
    ClockState, Counters, PathInfo, PathKind, ProbeProtocol, ReportId, TimestampSource,
    Timestamping, Window, WindowReport,
};

fn report(id: u8, name: &str, kind: PathKind, rtts_ns: &[u64], lost: u64) -> WindowReport {
    let mut rtt = Metric::Rtt.new_histogram();
    for &r in rtts_ns {
        rtt.record(r).unwrap();
    }
    let mut runs = Metric::LossRun.new_histogram();
    if lost > 0 {
        runs.record(lost).unwrap();
    }
    let start = 1_795_685_400_000_000_000 + u64::from(id) * 10_000_000_000;
    WindowReport {
        report_id: ReportId([id; 16]),
        agent_id: "ams-dc1-01".into(),
        site: Some("ams".into()),
        path: PathInfo {
            name: name.into(),
            kind,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:862".parse().unwrap(),
            protocol: ProbeProtocol::Stamp,
            dscp: 0,
            packet_size: 44,
        },
        window: Window {
            start_unix_ns: start,
            end_unix_ns: start + 10_000_000_000,
        },
        timestamping: Timestamping {
            rx: TimestampSource::Kernel,
            tx: TimestampSource::Userspace,
        },
        owd_clock: ClockState::Unavailable,
        counters: Counters {
            sent: rtts_ns.len() as u64 + lost,
            received: rtts_ns.len() as u64,
            lost,
            ..Counters::default()
        },
        histograms: [(Metric::Rtt, rtt), (Metric::LossRun, runs)].into(),
        signature: None,
        events: Vec::new(),
        plan_version: None,
    }
}

fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pathprobe-inspect-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_owned()
}

fn collector(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pathprobe-collector"))
        .args(args)
        .output()
        .expect("the collector binary runs")
}

#[test]
fn windows_of_a_path_merge_exactly() {
    let tmp = dir("merge");
    let first: Vec<u64> = (1..=500).map(|i| i * 1_000).collect();
    let second: Vec<u64> = (501..=1000).map(|i| i * 1_000).collect();
    let f1 = write(
        &tmp,
        "1.json",
        &report(1, "er", PathKind::Expressroute, &first, 2)
            .to_json()
            .unwrap(),
    );
    let f2 = write(
        &tmp,
        "2.json",
        &report(2, "er", PathKind::Expressroute, &second, 5)
            .to_json()
            .unwrap(),
    );
    let f3 = write(
        &tmp,
        "3.json",
        &report(3, "vpn", PathKind::Vpn, &[40_000_000], 0)
            .to_json()
            .unwrap(),
    );
    let o = collector(&["inspect", "--json", &f1, &f2, &f3]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let er = &v[0];
    assert_eq!(er["path"], "er");
    assert_eq!(er["windows"], 2);
    assert_eq!(er["counters"]["received"], 1000);
    assert_eq!(er["counters"]["lost"], 7);
    assert_eq!(er["longest_loss_run"], 5);
    // The median of 1..=1000 ms-scale samples recorded in one histogram.
    let mut one = Metric::Rtt.new_histogram();
    for r in first.iter().chain(&second) {
        one.record(*r).unwrap();
    }
    #[allow(clippy::cast_precision_loss)]
    let p50_us = one.value_at_quantile(0.5) as f64 / 1000.0;
    #[allow(clippy::cast_precision_loss)]
    let p99_us = one.value_at_quantile(0.99) as f64 / 1000.0;
    assert_eq!(er["rtt_us"]["p50"].as_f64(), Some(p50_us));
    assert_eq!(er["rtt_us"]["p99"].as_f64(), Some(p99_us));
    assert_eq!(v[1]["path"], "vpn");
    assert_eq!(v[1]["loss_pct"], 0.0);

    let table = collector(&["inspect", &f1, &f2, &f3]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("er (expressroute)") && text.contains("vpn (vpn)"),
        "{text}"
    );
    assert!(text.contains("RTT p99 µs"), "{text}");
}

#[test]
fn a_corrupt_report_is_named_with_its_file() {
    let d = dir("corrupt");
    let good = write(
        &d,
        "good.json",
        &report(1, "er", PathKind::Expressroute, &[1], 0)
            .to_json()
            .unwrap(),
    );
    let bad = write(&d, "bad.json", b"{\"version\":1,\"report_id\":");
    let o = collector(&["inspect", &good, &bad]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.json") && err.contains("not valid"),
        "{err}"
    );
}

#[test]
fn a_report_from_the_future_says_to_upgrade() {
    let d = dir("future");
    let mut v: serde_json::Value = serde_json::from_slice(
        &report(1, "er", PathKind::Expressroute, &[1], 0)
            .to_json()
            .unwrap(),
    )
    .unwrap();
    v["version"] = 9.into();
    let f = write(&d, "future.json", &serde_json::to_vec(&v).unwrap());
    let o = collector(&["inspect", &f]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("version 9") && err.contains("upgrade"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let o = collector(&["inspect", "/nonexistent/r.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/r.json"));
}
