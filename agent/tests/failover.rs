//! `pathprobe-agent failover` on loopback: an emulated blackout of known length is measured
//! to the probe interval, named, and kept by the collector; a drill that sees no failure
//! says so; bad flags are named.

#![allow(clippy::unwrap_used, clippy::cast_precision_loss, reason = "test code")]

use std::process::{Command, Output};

mod common;
use common::{AGENT, Collector, Reflector, emulator};
use pathprobe_collector::store::Store as _;

fn failover(args: &[&str]) -> Output {
    Command::new(AGENT)
        .arg("failover")
        .args(args)
        .output()
        .unwrap()
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_scheduled_blackout_is_measured_to_the_probe_interval_and_reaches_the_collector() {
    const TOKEN: &str = "failover-test-token-0123456789";
    let dir = std::env::temp_dir().join(format!("pathprobe-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::write_secret(&dir.join("tokens"), &format!("fo-agent {TOKEN}\n"));
    common::write_secret(&dir.join("token"), TOKEN);
    let addr = common::free_tcp();
    let col = Collector::start(&dir, addr);
    let r = Reflector::start(&[]);
    // Forward traffic is dropped for exactly 500 ms, 1.5 s after the emulator starts.
    let em = emulator(r.addr, "delay=1ms,blackout=1500ms+500ms", "delay=1ms");
    let o = failover(&[
        "--target",
        &em.1.to_string(),
        "--primary",
        // Pinned by source address too, as where both paths reach the same reflector.
        &format!("{},bind=127.0.0.1", r.addr),
        "--rate",
        "1000",
        "--duration",
        "4s",
        "--settle",
        "1s",
        "--window",
        "1s",
        "--json",
        "--path-name",
        "service",
        "--agent-id",
        "fo-agent",
        "--collector",
        &format!("http://{addr}"),
        "--token-file",
        dir.join("token").to_str().unwrap(),
        "--spool",
        dir.join("spool").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&o);
    let events: Vec<_> = lines.iter().filter(|l| l["type"] == "event").collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = events[0];
    assert_eq!(e["kind"], "outage");
    let ms = e["outage_ms"].as_f64().unwrap();
    // 1,000 probes/s: within two probe intervals of the 500 ms injected.
    assert!((ms - 500.0).abs() <= 2.0, "outage {ms} ms");
    assert_eq!(
        (e["path_before"].as_str(), e["path_after"].as_str()),
        (Some("primary"), Some("primary"))
    );
    for k in ["start", "end", "last_reply_before", "first_reply_after"] {
        assert!(!e[k].is_null(), "{k} in {e}");
    }
    let lost = e["lost"].as_u64().unwrap();
    assert!((498..=502).contains(&lost), "{lost}");
    // Before and after: the loopback path, fully answered.
    assert_eq!(e["before"]["lost"], 0, "{e}");
    assert!(e["after"]["rtt_p50_us"].as_f64().unwrap() > 1_000.0, "{e}");
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["worst_outage_ms"].as_f64(), Some(ms));
    // The collector has the event, once, with its figures.
    col.stop();
    let store =
        pathprobe_collector::store::SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
    let sel = pathprobe_collector::store::Selector {
        name_or_kind: "service".into(),
        site: None,
    };
    let stored = store.events(&sel, 0, u64::MAX, None, 100).unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let outage = stored[0].event.outage.as_ref().unwrap();
    assert!((outage.outage_ms - ms).abs() < 1e-9);
    assert_eq!(outage.path_before, "primary");
    // `compare expressroute vpn` shows it: a failover run's events concern both paths.
    let side = |n: &str| pathprobe_collector::store::Selector {
        name_or_kind: n.into(),
        site: None,
    };
    let c = pathprobe_collector::compare::compare(
        &store,
        &side("expressroute"),
        &side("vpn"),
        0,
        u64::MAX,
    )
    .unwrap();
    assert_eq!(c.events.len(), 1, "{:?}", c.events);
    assert!(
        pathprobe_collector::compare::table(&c).contains("service (other"),
        "{}",
        pathprobe_collector::compare::table(&c)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_drill_that_sees_no_failure_is_incomplete_and_says_so() {
    let r = Reflector::start(&[]);
    let o = failover(&[
        "--target",
        &r.addr.to_string(),
        "--rate",
        "200",
        "--drill",
        "--duration",
        "1s",
        "--settle",
        "200ms",
    ]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("drill verdict: INCOMPLETE"), "{out}");
    assert!(out.contains("no failover was measured"), "{out}");
}

#[test]
fn bad_failover_flags_are_named() {
    let r = Reflector::start(&[]);
    let o = failover(&["--target", &r.addr.to_string(), "--min-outage", "1ms"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--min-outage") && err.contains("two probe intervals"),
        "{err}"
    );
    let o = failover(&["--target", &r.addr.to_string(), "--rate", "0"]);
    assert_eq!(o.status.code(), Some(2));
    let o = failover(&[
        "--target",
        &r.addr.to_string(),
        "--primary",
        "127.0.0.1:1,mark=1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--primary") && err.contains("fwmark=N"),
        "{err}"
    );
    let o = failover(&["--target", "127.0.0.1:1", "--duration", "5s"]);
    assert_eq!(o.status.code(), Some(2), "a closed port: nothing answers");
}
