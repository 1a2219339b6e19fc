//! Capacity tests on loopback: consent and caps at the far end, a full run's JSON and
//! reports, and hostile control input that never takes the far end down.

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::many_single_char_names,
    reason = "test code: a failed unwrap is a failed test; short names in control exchanges"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::WindowReport;

mod common;

use common::{AGENT, Collector, Reflector};
use pathprobe_collector::store::Store as _;

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

/// A control connection and its reader, with a read timeout.
fn connect(r: &Reflector) -> (TcpStream, BufReader<TcpStream>) {
    let c = TcpStream::connect(r.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let rd = BufReader::new(c.try_clone().unwrap());
    (c, rd)
}

/// True when the far end closed the connection: the end of the stream, or a reset (a
/// close with our unread line still in its buffer), never a timeout.
fn closed(rd: &mut BufReader<TcpStream>) -> bool {
    let mut rest = String::new();
    match rd.read_line(&mut rest) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

const HELLO: &str = "{\"op\":\"hello\",\"version\":1,\"session\":7}\n";

/// A capacity test of one short stage; retried while the far end is still giving back the
/// slot of a connection that just closed (bounded).
fn one_stage(r: &Reflector, extra: &[&str]) -> Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut args = vec![
            "--start",
            "5mbit",
            "--max",
            "5mbit",
            "--steps",
            "1",
            "--stage-duration",
            "1s",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = capacity(&r.addr.to_string(), &args);
        if o.status.success()
            || !stderr(&o).contains("busy")
            || std::time::Instant::now() > deadline
        {
            return o;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hostile_control_input_gets_errors_and_the_far_end_keeps_serving() {
    let r = Reflector::start(&["--allow-capacity", "--capacity-max-rate", "100mbit"]);
    // Before hello: anything else, a line that is not a request, a wrong version or an
    // overlong line gets its error, and the session ends there.
    let long = format!("{}\n", "x".repeat(10_000));
    for (line, needle) in [
        ("{\"op\":\"result\",\"id\":1}\n", "hello"),
        ("not json at all\n", "not a capacity request"),
        (
            "{\"op\":\"hello\",\"version\":99,\"session\":1}\n",
            "version 99",
        ),
        (long.as_str(), "too long"),
    ] {
        let (mut c, mut rd) = connect(&r);
        let a = say(&mut c, &mut rd, line);
        assert_eq!(a["ok"], false, "{a}");
        assert!(
            a["error"].as_str().unwrap().contains(needle),
            "{needle}: {a}"
        );
        assert!(closed(&mut rd), "{needle}: the session ends");
    }
    // After hello: requests beyond the caps are refused and the session goes on.
    let (mut c, mut rd) = connect(&r);
    let a = say(&mut c, &mut rd, HELLO);
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
    // While it holds the slot, another test is told the far end is busy.
    let other = capacity(&r.addr.to_string(), &["--stage-duration", "1s"]);
    assert_eq!(other.status.code(), Some(1));
    assert!(stderr(&other).contains("busy"), "{}", stderr(&other));
    // A malformed line ends the session; then a real test runs.
    let a = say(&mut c, &mut rd, "{\"op\":\"stage\"\n");
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("not a capacity request"),
        "{a}"
    );
    assert!(closed(&mut rd));
    let o = one_stage(&r, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The adversarial run: a silent TCP connection held the single slot for 60 s, and a
/// garbage line every 30 s kept it for more than 90 s. Now the slot goes only to a valid
/// hello, and a session silent for 10 s (beyond its stage) is closed.
#[test]
fn only_a_hello_takes_the_slot_and_a_silent_session_is_closed() {
    let r = Reflector::start(&["--allow-capacity"]);
    let (_silent, mut silent_rd) = connect(&r);
    let (mut babbler, mut babbler_rd) = connect(&r);
    let a = say(&mut babbler, &mut babbler_rd, "garbage\n");
    assert_eq!(a["ok"], false, "{a}");
    assert!(closed(&mut babbler_rd), "garbage ends the connection");
    // Neither holds the slot: a real test runs beside the silent connection.
    let o = one_stage(&r, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A session that said hello and then nothing is closed after the idle time.
    let (mut c, mut rd) = connect(&r);
    let a = say(&mut c, &mut rd, HELLO);
    assert_eq!(a["ok"], true, "{a}");
    let t = std::time::Instant::now();
    let mut line = String::new();
    let _ = rd.read_line(&mut line);
    assert!(line.contains("no request within the idle time"), "{line}");
    assert!(closed(&mut rd));
    let idle = t.elapsed();
    assert!(
        idle >= Duration::from_secs(9) && idle < Duration::from_secs(20),
        "{idle:?}"
    );
    // The silent one was closed too, holding nothing.
    let mut rest = String::new();
    let _ = silent_rd.read_line(&mut rest);
    assert!(rest.contains("idle"), "{rest}");
}

/// With `--auth-key-file`, the reflector's capacity test asks for an HMAC over a fresh
/// challenge; a keyless hello got "ok" before.
#[test]
fn a_keyed_reflector_takes_only_tests_that_prove_its_key() {
    let dir = std::env::temp_dir().join(format!("pathprobe-capkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (good, bad) = (dir.join("good.key"), dir.join("bad.key"));
    common::write_secret(
        &good,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    );
    common::write_secret(
        &bad,
        "ff112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    );
    let r = Reflector::start(&[
        "--allow-capacity",
        "--auth-key-file",
        good.to_str().unwrap(),
    ]);
    // A keyless hello is asked to prove the key, and gets no slot for answering otherwise.
    let (mut c, mut rd) = connect(&r);
    let a = say(&mut c, &mut rd, HELLO);
    assert!(
        a["challenge"].as_str().is_some_and(|h| h.len() == 32),
        "{a}"
    );
    assert!(a.get("sink_port").is_none(), "{a}");
    let a = say(
        &mut c,
        &mut rd,
        "{\"op\":\"auth\",\"proof\":\"00000000000000000000000000000000\"}\n",
    );
    assert!(
        a["error"]
            .as_str()
            .unwrap()
            .contains("authentication failed"),
        "{a}"
    );
    assert!(closed(&mut rd));
    let o = one_stage(&r, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--auth-key-file"), "{}", stderr(&o));
    let o = one_stage(&r, &["--auth-key-file", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("authentication failed"),
        "{}",
        stderr(&o)
    );
    let o = one_stage(&r, &["--auth-key-file", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The adversarial run: with `--capacity-max-rate 10mbit`, a TCP download reached
/// 36,796 Mbit/s on loopback. Now TCP stages are paced to the far end's cap, both ways.
#[test]
fn tcp_stages_hold_the_far_ends_rate_cap() {
    let cap = 10e6;
    let r = Reflector::start(&["--allow-capacity", "--capacity-max-rate", "10mbit"]);
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
            "2s",
            "--direction",
            "both",
            "--tcp-streams",
            "1,2",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let sum: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let tcp = sum["tcp"].as_array().unwrap();
    assert_eq!(tcp.len(), 4, "{sum}");
    for t in tcp {
        let got = t["goodput_bps"].as_f64().unwrap();
        eprintln!(
            "{} streams {}: {:.2} Mbit/s",
            t["streams"],
            t["direction"],
            got / 1e6
        );
        assert!(got <= 1.05 * cap, "{t}: above the cap");
        // Paced, not starved: loopback carries the cap easily.
        assert!(got >= 0.8 * cap, "{t}");
    }
}

#[test]
fn stage_reports_reach_the_collector_and_wait_when_it_is_away() {
    const TOKEN: &str = "capacity-test-token-0123456789";
    let dir = std::env::temp_dir().join(format!("pathprobe-capacity-col-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::write_secret(&dir.join("tokens"), &format!("cap-agent {TOKEN}\n"));
    common::write_secret(&dir.join("token"), TOKEN);
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
    let store =
        pathprobe_collector::store::SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
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
