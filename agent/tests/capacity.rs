//! Capacity tests on loopback: consent and caps at the far end, a full run's JSON and
//! reports, and hostile control input that never takes the far end down.

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::WindowReport;

mod common;

use common::{AGENT, Collector, Reflector};

fn capacity(target: &str, args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(["capacity", "--target", target])
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn capacity_needs_the_far_ends_consent() {
    let r = Reflector::start(&[]);
    let o = capacity(&r.addr.to_string(), &["--stage-duration", "1s"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--allow-capacity"), "{}", stderr(&o));
}

#[test]
fn the_far_end_enforces_its_caps() {
    let r = Reflector::start(&[
        "--allow-capacity",
        "--capacity-max-rate",
        "100mbit",
        "--capacity-max-stage",
        "10s",
    ]);
    let target = r.addr.to_string();
    let o = capacity(&target, &["--max", "200mbit", "--stage-duration", "1s"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--capacity-max-rate") && stderr(&o).contains("100.0 Mbit/s"),
        "{}",
        stderr(&o)
    );
    let o = capacity(&target, &["--max", "50mbit", "--stage-duration", "20s"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--capacity-max-stage"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_capacity_flags_name_the_fix() {
    for (args, needle) in [
        (&["--max", "50mbps"][..], "ambiguous"),
        (&["--start", "fast"][..], "like 50mbit"),
        (&["--max-loss", "150%"][..], "between 0% and 100%"),
        (&["--steps", "0"][..], "--steps"),
        (&["--direction", "sideways"][..], "up"),
    ] {
        let o = capacity("127.0.0.1:9", args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    let o = capacity("127.0.0.1:9", &["--start", "100mbit", "--max", "10mbit"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--start"), "{}", stderr(&o));
}

#[test]
fn a_staircase_on_loopback_reports_every_stage_and_a_recommendation() {
    let r = Reflector::start(&["--allow-capacity"]);
    let dir = std::env::temp_dir().join(format!("pathprobe-capacity-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = capacity(
        &r.addr.to_string(),
        &[
            "--start",
            "10mbit",
            "--max",
            "30mbit",
            "--steps",
            "3",
            "--stage-duration",
            "1s",
            "--direction",
            "both",
            "--tcp-streams",
            "1,2",
            "--need",
            "40mbit",
            "--json",
            "--path-name",
            "lo",
            "--report-dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "three stages and the summary");
    for (i, (s, want)) in lines[..3].iter().zip([10e6, 20e6, 30e6]).enumerate() {
        assert_eq!(s["record"], "stage");
        assert_eq!(s["stage"], i + 1);
        assert_eq!(s["offered_bps"].as_u64().unwrap(), want as u64);
        // Loopback carries 30 Mbit/s each way without loss.
        for dir in ["up", "down"] {
            let d = &s[dir];
            assert_eq!(d["received"], d["sent"], "stage {i} {dir}: {s}");
            let got = d["delivered_bps"].as_f64().unwrap();
            assert!(
                (got - want).abs() < 0.05 * want,
                "stage {i} {dir}: {got} of {want}"
            );
            assert!(!d["interval_bps"].as_array().unwrap().is_empty());
        }
        assert_eq!(s["passed"], true, "{s}");
        // RTT and jitter under the load, from the STAMP stream.
        assert!(s["rtt_us"]["p99"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["ipdv_us"]["p99"].is_number(), "{s}");
    }
    let sum = &lines[3];
    assert_eq!(sum["record"], "capacity");
    assert_eq!(sum["knee"]["stage"], 3);
    assert_eq!(sum["knee"]["saturated"], false);
    let cap = sum["capacity_bps"].as_f64().unwrap();
    assert!((cap - 30e6).abs() < 1.5e6, "{cap}");
    // 40 Mbit/s + 30% = 52 Mbit/s: the 100 Mbit/s circuit, the smallest gateways.
    let rec = &sum["recommendation"];
    assert_eq!(rec["required_bps"], 52_000_000);
    assert_eq!(rec["er_circuit_bps"], 100_000_000);
    assert_eq!(rec["er_gateway"]["sku"], "Standard / ErGw1Az");
    assert_eq!(rec["vpn_gateway"]["sku"], "VpnGw1");
    // TCP: 1 and 2 streams, each way, with goodput.
    let tcp = sum["tcp"].as_array().unwrap();
    assert_eq!(tcp.len(), 4, "{sum}");
    for t in tcp {
        assert!(t["goodput_bps"].as_f64().unwrap() > 10e6, "{t}");
    }
    // One collector report per stage, with RTT and throughput histograms.
    let reports: Vec<WindowReport> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| WindowReport::from_json(&std::fs::read(e.unwrap().path()).unwrap()).unwrap())
        .collect();
    assert_eq!(reports.len(), 3);
    for rep in &reports {
        assert_eq!(rep.path.name, "lo");
        assert!(rep.histograms.contains_key(&Metric::Rtt));
        let t = &rep.histograms[&Metric::Throughput];
        assert!(t.len() >= 5, "100 ms intervals of a 1 s stage: {}", t.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends one control line and reads the answer.
fn say(c: &mut TcpStream, r: &mut BufReader<TcpStream>, line: &str) -> serde_json::Value {
    c.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    r.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn hostile_control_input_gets_errors_and_the_far_end_keeps_serving() {
    let r = Reflector::start(&["--allow-capacity", "--capacity-max-rate", "100mbit"]);
    let mut c = TcpStream::connect(r.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rd = BufReader::new(c.try_clone().unwrap());
    let a = say(&mut c, &mut rd, "{\"op\":\"result\",\"id\":1}\n");
    assert_eq!(a["ok"], false);
    assert!(a["error"].as_str().unwrap().contains("hello"), "{a}");
    let a = say(&mut c, &mut rd, "not json at all\n");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("not a capacity request"),
        "{a}"
    );
    let a = say(
        &mut c,
        &mut rd,
        "{\"op\":\"hello\",\"version\":99,\"session\":1}\n",
    );
    assert!(a["error"].as_str().unwrap().contains("version 99"), "{a}");
    let a = say(
        &mut c,
        &mut rd,
        "{\"op\":\"hello\",\"version\":1,\"session\":7}\n",
    );
    assert_eq!(a["ok"], true, "{a}");
    for (line, needle) in [
        (
            r#"{"op":"stage","id":1,"direction":"down","rate_bps":1000000000000,"size":1000,"duration_ms":1000,"client_port":9}"#,
            "cap",
        ),
        (
            r#"{"op":"stage","id":1,"direction":"up","rate_bps":1000000,"size":3,"duration_ms":1000,"client_port":9}"#,
            "octets",
        ),
        (
            r#"{"op":"stage","id":1,"direction":"up","rate_bps":1000000,"size":100,"duration_ms":0,"client_port":9}"#,
            "stage",
        ),
        (
            r#"{"op":"tcp","id":1,"direction":"up","streams":100000,"duration_ms":1000}"#,
            "streams",
        ),
        (r#"{"op":"tcp_result","id":42}"#, "no TCP stage"),
    ] {
        let a = say(&mut c, &mut rd, &format!("{line}\n"));
        assert_eq!(a["ok"], false, "{line}: {a}");
        assert!(a["error"].as_str().unwrap().contains(needle), "{line}: {a}");
    }
    // A line longer than the limit ends the conversation.
    let long = format!("{}\n", "x".repeat(10_000));
    c.write_all(long.as_bytes()).unwrap();
    let mut answer = String::new();
    rd.read_line(&mut answer).unwrap();
    assert!(answer.contains("too long"), "{answer}");
    drop(c);
    // A second client while the first is connected is told the far end is busy; after
    // it leaves, a real test runs.
    let busy = TcpStream::connect(r.addr).unwrap();
    let other = capacity(&r.addr.to_string(), &["--stage-duration", "1s"]);
    assert_eq!(other.status.code(), Some(1));
    assert!(stderr(&other).contains("busy"), "{}", stderr(&other));
    drop(busy);
    std::thread::sleep(Duration::from_millis(200));
    let o = capacity(
        &r.addr.to_string(),
        &[
            "--start",
            "5mbit",
            "--max",
            "5mbit",
            "--steps",
            "1",
            "--stage-duration",
            "1s",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn stage_reports_reach_the_collector_and_wait_when_it_is_away() {
    const TOKEN: &str = "capacity-test-token-0123456789";
    let dir = std::env::temp_dir().join(format!("pathprobe-capacity-col-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokens"), format!("cap-agent {TOKEN}\n")).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let r = Reflector::start(&["--allow-capacity"]);
    let addr = common::free_tcp();
    let spool = dir.join("spool");
    let run = |steps: &str| {
        capacity(
            &r.addr.to_string(),
            &[
                "--start",
                "5mbit",
                "--max",
                "10mbit",
                "--steps",
                steps,
                "--stage-duration",
                "1s",
                "--path-name",
                "er",
                "--path-kind",
                "expressroute",
                "--agent-id",
                "cap-agent",
                "--collector",
                &format!("http://{addr}"),
                "--token-file",
                dir.join("token").to_str().unwrap(),
                "--spool",
                spool.to_str().unwrap(),
            ],
        )
    };
    // No collector yet: the run measures, fails to deliver, and says where the reports wait.
    let o = run("1");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did not take the stage reports") && stderr(&o).contains("--spool"),
        "{}",
        stderr(&o)
    );
    // With the collector up, the next run delivers its own two stages and the waiting one.
    let col = Collector::start(&dir, addr);
    let o = run("2");
    assert!(o.status.success(), "{}", stderr(&o));
    col.stop();
    let store = pathprobe_collector::store::Store::open_read_only(&dir.join("store.db")).unwrap();
    let merged = store
        .query(
            &pathprobe_collector::store::Selector {
                name_or_kind: "er".to_string(),
                site: None,
            },
            0,
            u64::MAX,
        )
        .unwrap();
    assert_eq!(merged.aggregate.windows, 3, "every stage, once");
    let t = &merged.aggregate.histograms[&Metric::Throughput];
    assert!(
        t.len() >= 3 * 5,
        "100 ms delivered-rate samples: {}",
        t.len()
    );
    let p50 = t.value_at_quantile(0.5) as f64;
    assert!((4e6..=11e6).contains(&p50), "throughput p50 {p50}");
    let _ = std::fs::remove_dir_all(&dir);
}
