//! The collector as a process, over HTTP: hostile input, tokens, retries, exact answers,
//! and `kill -9` during a burst of ingests.

#![allow(
    clippy::unwrap_used,
    clippy::many_single_char_names,
    clippy::type_complexity,
    reason = "test code: a failed unwrap is a failed test; short names in table-driven cases"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{
    COLLECTOR, OTHER_TOKEN, READER, Server, T0, TOKEN, W, batch, dir, http, report, write_secret,
};
use pathprobe_collector::store::Store as _;
use pathprobe_proto::event::{
    EventKind, PathEvent, Signature, TraceHop, TraceProtocol, TraceRecord,
};
use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::{PathKind, WindowReport};

#[test]
fn hostile_input_gets_the_right_status_and_never_crashes_the_server() {
    let d = dir("hostile");
    let s = Server::start(&d);
    let good = report(1, "ams-01", "er", PathKind::Expressroute, T0, &[1000, 2000]);
    let good_json = String::from_utf8(good.to_json().unwrap()).unwrap();

    let cases: Vec<(&str, Option<&str>, Vec<u8>, u16, &str)> = vec![
        (
            "truncated JSON",
            Some(TOKEN),
            format!("[{}", &good_json[..good_json.len() / 2]).into_bytes(),
            400,
            "not a JSON array",
        ),
        (
            "not V2",
            Some(TOKEN),
            format!(
                "[{}]",
                // The two-sample histogram's plain V2 form: base64 of its cookie, "HISTE".
                good_json.replace(
                    &good_json
                        [good_json.find("HISTE").unwrap()..good_json.find("HISTE").unwrap() + 12],
                    "bm90IGEgaGlzdG9ncmFt"
                )
            )
            .into_bytes(),
            400,
            "rtt_ns histogram",
        ),
        (
            "future version",
            Some(TOKEN),
            format!(
                "[{}]",
                good_json.replacen("\"version\":1", "\"version\":7", 1)
            )
            .into_bytes(),
            400,
            "newer than this build",
        ),
        (
            "100 MB body",
            Some(TOKEN),
            vec![b' '; 100_000_000],
            413,
            "send fewer reports",
        ),
        (
            "no token",
            None,
            batch(std::slice::from_ref(&good)),
            401,
            "bearer token",
        ),
        (
            "wrong token",
            Some("nottherighttokenatall123"),
            batch(std::slice::from_ref(&good)),
            401,
            "bearer token",
        ),
        (
            "another agent's token",
            Some(OTHER_TOKEN),
            batch(std::slice::from_ref(&good)),
            403,
            "the sender is `fra-01`",
        ),
    ];
    for (what, token, body, status, needle) in cases {
        let (got, text) = http(s.addr, "POST", "/v1/reports", token, &body);
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(needle), "{what}: {text}");
    }
    // Still up, and nothing was stored by any of them.
    let (status, text) = http(s.addr, "GET", "/v1/paths", Some(READER), b"");
    assert_eq!((status, text.as_str()), (200, "[]"));
    let (status, text) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&[good]));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"accepted\":1"), "{text}");
    let (_, metrics) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    assert!(
        metrics.contains("pathprobe_collector_requests_rejected_total{reason=\"unauthorized\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pathprobe_collector_requests_rejected_total{reason=\"too_large\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("pathprobe_rtt_seconds_count{agent=\"ams-01\",kind=\"expressroute\",path=\"er\",site=\"ams\"} 2"), "{metrics}");
}

#[test]
fn retries_are_acknowledged_and_never_counted_twice() {
    let d = dir("retry");
    let s = Server::start(&d);
    let reports: Vec<_> = (0..5)
        .map(|i| {
            report(
                i,
                "ams-01",
                "er",
                PathKind::Expressroute,
                T0 + u64::from(i) * W,
                &[1000],
            )
        })
        .collect();
    let (_, first) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&reports));
    assert!(first.contains("\"accepted\":5,\"duplicates\":0"), "{first}");
    let (_, again) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&reports));
    assert!(again.contains("\"accepted\":0,\"duplicates\":5"), "{again}");
    let (_, paths) = http(s.addr, "GET", "/v1/paths", Some(READER), b"");
    assert!(paths.contains("\"windows\":5"), "{paths}");
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, checked step by step")]
fn events_are_served_by_path_kind_and_range_and_shown_by_compare() {
    let d = dir("events");
    let s = Server::start(&d);
    let sig = |hops| Signature {
        fwd_hops: Some(hops),
        rev_hops: Some(hops),
        dscp_sent: 46,
        dscp_far: Some(46),
        dscp_back: Some(46),
    };
    let mut er = report(1, "ams-01", "er", PathKind::Expressroute, T0, &[1000]);
    er.signature = Some(sig(2));
    er.events = vec![PathEvent {
        kind: EventKind::SignatureChange,
        at_unix_ns: T0 + W,
        before: Some(sig(1)),
        after: Some(sig(2)),
        summary: "forward hops 1 → 2, reverse hops 1 → 2".into(),
        trace: Some(TraceRecord {
            protocol: TraceProtocol::Udp,
            reached: true,
            hops: vec![
                TraceHop {
                    ttl: 1,
                    addr: Some("10.20.1.2".parse().unwrap()),
                    rtt_us: Some(15_000.0),
                    reached: false,
                },
                TraceHop {
                    ttl: 2,
                    addr: Some("10.1.0.1".parse().unwrap()),
                    rtt_us: Some(30_000.0),
                    reached: true,
                },
            ],
        }),
        trace_error: None,
        capacity: None,
        outage: None,
    }];
    let vpn = report(2, "ams-01", "vpn", PathKind::Vpn, T0, &[2000]);
    let (status, _) = http(
        s.addr,
        "POST",
        "/v1/reports",
        Some(TOKEN),
        &batch(&[er, vpn]),
    );
    assert_eq!(status, 200);
    let range = format!(
        "from={}&to={}",
        T0 / 1_000_000_000,
        (T0 + 2 * W) / 1_000_000_000
    );
    let get = |q: &str| {
        let (status, body) = http(
            s.addr,
            "GET",
            &format!("/v1/events?{q}&{range}"),
            Some(READER),
            b"",
        );
        (
            status,
            serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
            body,
        )
    };
    let (status, all, body) = get("kind=signature_change");
    assert_eq!(status, 200, "{body}");
    assert_eq!(all.as_array().unwrap().len(), 1, "{body}");
    assert_eq!(all[0]["path"], "er");
    assert_eq!(all[0]["kind"], "signature_change");
    assert_eq!(all[0]["after"]["fwd_hops"], 2);
    assert_eq!(all[0]["trace"]["hops"][1]["addr"], "10.1.0.1");
    let (_, none, _) = get("path=vpn");
    assert_eq!(none.as_array().unwrap().len(), 0);
    let (_, by_kind, _) = get("path=expressroute&kind=signature_change");
    assert_eq!(by_kind.as_array().unwrap().len(), 1);
    let (status, _, body) = get("kind=outage!");
    assert_eq!(status, 400);
    assert!(body.contains("signature_change"), "{body}");
    let (status, _, body) = get("limit=0");
    assert_eq!(status, 400, "{body}");
    let (status, cmp) = http(
        s.addr,
        "GET",
        &format!("/v1/compare?a=expressroute&b=vpn&{range}"),
        Some(READER),
        b"",
    );
    assert_eq!(status, 200, "{cmp}");
    let cmp: serde_json::Value = serde_json::from_str(&cmp).unwrap();
    assert_eq!(cmp["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        cmp["events"][0]["summary"],
        "forward hops 1 → 2, reverse hops 1 → 2"
    );
    // The command line shows the same event with its route.
    let out = Command::new(COLLECTOR)
        .args(["compare", "--a", "expressroute", "--b", "vpn", "--db"])
        .arg(d.join("store.db"))
        .args(["--from", &(T0 / 1_000_000_000).to_string()])
        .args(["--to", &((T0 + 2 * W) / 1_000_000_000).to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("signature_change: forward hops 1 → 2"),
        "{text}"
    );
    assert!(text.contains("trace: 10.20.1.2 → 10.1.0.1"), "{text}");
}

#[test]
fn compare_equals_one_histogram_of_every_sample() {
    let d = dir("compare");
    let s = Server::start(&d);
    let mut all_er = Vec::new();
    let mut all_vpn = Vec::new();
    let mut reports = Vec::new();
    for i in 0..400u32 {
        // ExpressRoute around 2 ms, VPN around 30 ms with a tail.
        let er: Vec<u64> = (0..20)
            .map(|k| 2_000_000 + u64::from((i * 37 + k * 11) % 400) * 1_000)
            .collect();
        let vpn: Vec<u64> = (0..20)
            .map(|k| 30_000_000 + u64::from((i * 53 + k * 17) % 900) * 20_000)
            .collect();
        let start = T0 + u64::from(i) * W;
        reports.push(report(
            i,
            "ams-01",
            "er-primary",
            PathKind::Expressroute,
            start,
            &er,
        ));
        reports.push(report(
            i,
            "ams-01",
            "vpn-backup",
            PathKind::Vpn,
            start,
            &vpn,
        ));
        all_er.extend(er);
        all_vpn.extend(vpn);
    }
    for chunk in reports.chunks(100) {
        let (status, text) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(chunk));
        assert_eq!(status, 200, "{text}");
    }
    let to = T0 + 400 * W;
    let o = Command::new(COLLECTOR)
        .args(["compare", "--a", "expressroute", "--b", "vpn", "--json"])
        .args([
            "--from",
            &(T0 / 1_000_000_000).to_string(),
            "--to",
            &(to / 1_000_000_000).to_string(),
        ])
        .arg("--db")
        .arg(d.join("store.db"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let row = |name: &str| {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["figure"] == name)
            .unwrap()
            .clone()
    };
    for (side, samples) in [("a", &all_er), ("b", &all_vpn)] {
        let mut h = Metric::Rtt.new_histogram();
        for &x in samples {
            h.record(x).unwrap();
        }
        for (figure, q) in [
            ("RTT p50 µs", 0.5),
            ("RTT p90 µs", 0.9),
            ("RTT p99 µs", 0.99),
            ("RTT p99.9 µs", 0.999),
        ] {
            #[allow(clippy::cast_precision_loss)]
            let want = h.value_at_quantile(q) as f64 / 1000.0;
            assert_eq!(row(figure)[side].as_f64(), Some(want), "{side} {figure}");
        }
    }
    assert_eq!(row("windows")["a"].as_f64(), Some(400.0));
    let ratio = row("RTT p50 µs")["ratio"].as_f64().unwrap();
    assert!(ratio > 10.0, "VPN p50 over ExpressRoute p50: {ratio}");
    // The same over HTTP, and the histogram export reads back.
    let q = format!(
        "/v1/compare?a=er-primary&b=vpn-backup&from={}&to={}",
        T0 / 1_000_000_000,
        to / 1_000_000_000
    );
    let (status, text) = http(s.addr, "GET", &q, Some(READER), b"");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"figure\":\"RTT p99 µs\""), "{text}");
    let q = format!(
        "/v1/histogram?path=er-primary&metric=rtt_ns&format=log&from={}&to={}",
        T0 / 1_000_000_000,
        to / 1_000_000_000
    );
    let (status, log) = http(s.addr, "GET", &q, Some(READER), b"");
    assert_eq!(status, 200, "{log}");
    let line = log.lines().find(|l| l.contains("HISTF")).unwrap();
    let blob = line.rsplit(',').next().unwrap();
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, blob).unwrap();
    let h = pathprobe_proto::hist::decode(Metric::Rtt, &bytes).unwrap();
    assert_eq!(h.len(), all_er.len() as u64);
}

#[test]
fn every_acknowledged_report_survives_kill_9() {
    let d = dir("kill9");
    let mut s = Server::start(&d);
    let batches: Vec<Vec<WindowReport>> = (0..60u32)
        .map(|b| {
            (0..50)
                .map(|i| {
                    report(
                        b * 50 + i,
                        "ams-01",
                        "er",
                        PathKind::Expressroute,
                        T0 + u64::from(b * 50 + i) * W,
                        &[1000, 5000],
                    )
                })
                .collect()
        })
        .collect();
    // A burst from another thread; kill -9 in the middle of it.
    let addr = s.addr;
    let bodies: Vec<Vec<u8>> = batches.iter().map(|b| batch(b)).collect();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&progress);
    let sender = std::thread::spawn(move || {
        let mut acked = 0;
        for body in &bodies {
            let (status, _) = http(addr, "POST", "/v1/reports", Some(TOKEN), body);
            if status != 200 {
                break;
            }
            acked += 1;
            seen.store(acked, std::sync::atomic::Ordering::SeqCst);
        }
        acked
    });
    while progress.load(std::sync::atomic::Ordering::SeqCst) < 5 {
        std::thread::sleep(Duration::from_millis(1));
    }
    s.kill9();
    let acked = sender.join().unwrap();
    assert!(
        acked > 0 && acked < batches.len(),
        "the kill should land mid-burst ({acked} acked)"
    );
    // Restart on the same file; the agents retry everything.
    let s = Server::start(&d);
    for (i, b) in batches.iter().enumerate() {
        let (status, text) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(b));
        assert_eq!(status, 200, "{text}");
        if i < acked {
            assert!(
                text.contains("\"accepted\":0,\"duplicates\":50"),
                "acknowledged batch {i} was lost: {text}"
            );
        }
    }
    let (_, paths) = http(s.addr, "GET", "/v1/paths", Some(READER), b"");
    assert!(
        paths.contains(&format!("\"windows\":{}", 60 * 50)),
        "exactly once: {paths}"
    );
}

/// The JSON of `r` with `edit` applied to it: inputs no agent of ours writes.
fn edited(r: &WindowReport, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_slice(&r.to_json().unwrap()).unwrap();
    edit(&mut v);
    v.to_string()
}

fn refusal(body: &str) -> pathprobe_proto::ingest::Refused {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Windows stored, and windows not yet rolled up, read from the store beside the server.
fn store_counts(d: &Path) -> (u64, u64) {
    pathprobe_collector::store::SqliteStore::open_read_only(&d.join("store.db"))
        .unwrap()
        .counts()
        .unwrap()
}

/// The adversarial run: `sent = 2^64 - 1` and buckets of 2^62 were accepted with a 200,
/// after which no rollup of the path succeeded and compare answered 503 for good, even for
/// the 7,003 reports of another agent.
#[test]
fn reports_no_sender_can_produce_are_refused_and_rollups_go_on() {
    let d = dir("poison");
    let s = Server::start_with(&d, &[]);
    let good = report(1, "ams-01", "er", PathKind::Expressroute, T0, &[1000, 2000]);
    let max_sent = edited(&good, |v| v["counters"]["sent"] = u64::MAX.into());
    let (status, body) = http(
        s.addr,
        "POST",
        "/v1/reports",
        Some(TOKEN),
        format!("[{max_sent}]").as_bytes(),
    );
    assert_eq!(status, 400, "{body}");
    let r = refusal(&body);
    assert_eq!((r.index, r.retry), (Some(0), false));
    assert!(r.error.contains("counters.sent"), "{body}");

    let mut huge = Metric::Rtt.new_histogram();
    huge.record_n(1_500, 1 << 62).unwrap();
    let huge = pathprobe_proto::hist::encode(Metric::Rtt, &huge).unwrap();
    let huge_buckets = edited(&good, |v| {
        use base64::Engine as _;
        v["histograms"]["rtt_ns"] = base64::engine::general_purpose::STANDARD
            .encode(&huge)
            .into();
    });
    let (status, body) = http(
        s.addr,
        "POST",
        "/v1/reports",
        Some(TOKEN),
        format!(
            "[{},{huge_buckets}]",
            String::from_utf8(good.to_json().unwrap()).unwrap()
        )
        .as_bytes(),
    );
    assert_eq!(status, 400, "{body}");
    let r = refusal(&body);
    assert_eq!(r.index, Some(1));
    assert!(r.error.contains("rtt_ns"), "{body}");

    // Another agent's 7,003 reports are stored and rolled up, and compare answers.
    let others: Vec<WindowReport> = (0..7_003)
        .map(|i| {
            report(
                100 + i,
                "fra-01",
                "vpn",
                PathKind::Vpn,
                T0 + u64::from(i) * W,
                &[3_000 + u64::from(i % 100)],
            )
        })
        .collect();
    for chunk in others.chunks(1_000) {
        let (status, body) = http(
            s.addr,
            "POST",
            "/v1/reports",
            Some(OTHER_TOKEN),
            &batch(chunk),
        );
        assert_eq!(status, 200, "{body}");
    }
    let deadline = std::time::Instant::now() + Duration::from_mins(2);
    while store_counts(&d) != (7_003, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            store_counts(&d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let q = format!(
        "/v1/compare?a=vpn&b=er&from={}&to={}",
        T0 / 1_000_000_000,
        (T0 + 7_003 * W) / 1_000_000_000
    );
    let (status, body) = http(s.addr, "GET", &q, Some(READER), b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let windows = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["figure"] == "windows")
        .unwrap();
    assert_eq!(windows["a"], 7_003.0, "{body}");
}

/// A report whose window ends more than five minutes ahead of the collector's clock, or
/// starts before what it keeps, or lasts more than an hour, is refused and named.
#[test]
fn windows_outside_the_horizon_are_refused() {
    let d = dir("horizon");
    let s = Server::start_with(&d, &["--max-report-age", "1d"]);
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap();
    for (start, want) in [
        (now + 10 * 60 * 1_000_000_000, "agent's clock"),
        (now - 2 * 86_400 * 1_000_000_000, "too old"),
    ] {
        let r = report(1, "ams-01", "er", PathKind::Expressroute, start, &[1000]);
        let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&[r]));
        assert_eq!(status, 400, "{body}");
        let r = refusal(&body);
        assert_eq!(r.reason, pathprobe_proto::ingest::Reason::Horizon);
        assert!(r.error.contains(want), "{body}");
    }
    let ok = report(2, "ams-01", "er", PathKind::Expressroute, now - W, &[1000]);
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&[ok]));
    assert_eq!(status, 200, "{body}");
}

/// Each bound a token holder meets is refused with its limit named: reports per batch,
/// paths per agent, concurrent ingests.
#[test]
fn limits_are_refused_with_the_limit_named() {
    let d = dir("limits");
    let s = Server::start_with(
        &d,
        &[
            "--max-batch",
            "10",
            "--max-paths-per-agent",
            "3",
            "--max-concurrent-ingests",
            "1",
        ],
    );
    let many: Vec<WindowReport> = (0..11)
        .map(|i| {
            report(
                i,
                "ams-01",
                "er",
                PathKind::Expressroute,
                T0 + u64::from(i) * W,
                &[1000],
            )
        })
        .collect();
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&many));
    assert_eq!(status, 413, "{body}");
    let r = refusal(&body);
    assert_eq!(r.limit, Some(10));
    assert!(r.error.contains("at most 10"), "{body}");

    let paths: Vec<WindowReport> = (0..4)
        .map(|i| {
            report(
                20 + i,
                "ams-01",
                &format!("p{i}"),
                PathKind::Vpn,
                T0,
                &[1000],
            )
        })
        .collect();
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&paths));
    assert_eq!(status, 422, "{body}");
    let r = refusal(&body);
    assert_eq!((r.index, r.limit), (Some(3), Some(3)));
    assert!(r.error.contains("--max-paths-per-agent"), "{body}");
    // Nothing of the refused batch was stored; three paths fit.
    let (status, body) = http(
        s.addr,
        "POST",
        "/v1/reports",
        Some(TOKEN),
        &batch(&paths[..3]),
    );
    assert_eq!(status, 200, "{body}");

    // One ingest at a time: a request whose body is still arriving holds the only place.
    let (_slow, body) = hold_the_place(s.addr, TOKEN);
    let r = refusal(&body);
    assert!(r.retry && r.limit == Some(1), "{body}");
    assert!(r.error.contains("--max-concurrent-ingests"), "{body}");
}

/// Sends a batch's head and one octet of its 100-octet body with `token`, so that it holds
/// an ingest place, and returns it with the body of the 503 that another batch then gets.
/// The slow request can itself meet the place taken, by a probing batch that is being
/// stored at that moment, and be refused; it is then sent again.
fn hold_the_place(addr: SocketAddr, token: &str) -> (TcpStream, String) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(
            format!(
                "POST /v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n["
            )
            .as_bytes(),
        )
        .unwrap();
        slow.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        loop {
            assert!(std::time::Instant::now() < deadline, "no 503 within 10 s");
            let (status, body) = http(addr, "POST", "/v1/reports", Some(TOKEN), b"[]");
            if status == 503 {
                return (slow, body);
            }
            // The slow request may not have reached the gate yet, or was refused there.
            assert_eq!(status, 200, "{body}");
            // An answer already (or the connection closed): the slow request was refused.
            match slow.read_exact(&mut [0u8; 1]) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                _ => break,
            }
        }
    }
}

/// A peer could hold the ingest places with requests whose body never comes: with no
/// token, no place is taken at all (401 at once); with one, the place is given back at
/// `--body-timeout`, with a refusal the agent retries.
#[test]
fn a_body_that_never_arrives_holds_no_ingest_place() {
    let d = dir("slow-body");
    let s = Server::start_with(
        &d,
        &["--max-concurrent-ingests", "1", "--body-timeout", "1s"],
    );
    // Without a token: refused before it can take the place.
    let mut anonymous = TcpStream::connect(s.addr).unwrap();
    anonymous
        .write_all(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[")
        .unwrap();
    anonymous
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut head = [0u8; 12];
    anonymous.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 401", "{}", String::from_utf8_lossy(&head));
    for _ in 0..3 {
        let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), b"[]");
        assert_eq!(status, 200, "{body}");
    }
    // With a token: it holds the place until its body is a second late, then is refused.
    let (mut slow, _) = hold_the_place(s.addr, TOKEN);
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("did not arrive within 1s (--body-timeout)"),
        "{answer}"
    );
    assert!(answer.contains("\"retry\":true"), "{answer}");
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), b"[]");
    assert_eq!(status, 200, "the place is free again: {body}");
}

/// One 10.8 MB batch of 10,000 reports took the collector to 2.27 GB, and never back. Now
/// the largest batch the limits allow (1,000 reports, each of its own path, with dense
/// histograms), posted 20 times, keeps its peak resident memory under 300 MB.
#[test]
fn twenty_of_the_largest_batches_keep_the_collector_under_300_mb() {
    let d = dir("memory");
    let s = Server::start_with(&d, &[]);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut reports = Vec::new();
    for i in 0..1_000u32 {
        let mut r = report(i, "ams-01", &format!("path-{i}"), PathKind::Vpn, T0, &[]);
        let (mut rtt, mut sched) = (
            Metric::Rtt.new_histogram(),
            Metric::RttScheduled.new_histogram(),
        );
        for _ in 0..500 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 1_000 + x % 5_000_000_000;
            rtt.record(v).unwrap();
            sched.record(v + x % 1_000).unwrap();
        }
        r.counters.sent = 501;
        r.counters.received = 500;
        r.histograms = [(Metric::Rtt, rtt), (Metric::RttScheduled, sched)].into();
        reports.push(String::from_utf8(r.to_json().unwrap()).unwrap());
    }
    let template = format!("[{}]", reports.join(","));
    assert!(template.len() < 16 << 20, "{} octets", template.len());
    for round in 0..20u32 {
        // New report ids each round, so every batch is stored, not acknowledged as a retry.
        let body = template.replace(
            "\"report_id\":\"00",
            &format!("\"report_id\":\"{round:02x}"),
        );
        let (status, text) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), body.as_bytes());
        assert_eq!(status, 200, "round {round}: {text}");
        eprintln!("round {round}: peak RSS {} MB", s.peak_rss() >> 20);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["accepted"], 1_000, "round {round}: {text}");
    }
    let (status, metrics) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    assert_eq!(status, 200);
    let peak = s.peak_rss();
    eprintln!(
        "collector peak RSS after 20 batches of 1,000 reports ({} octets each): {} MB; /metrics {} octets",
        template.len(),
        peak >> 20,
        metrics.len()
    );
    assert!(peak < 300 << 20, "peak RSS {} MB", peak >> 20);
}

/// Agents' tokens ingest only, readers' tokens query only, and every query and `/metrics`
/// needs a reader's.
#[test]
fn queries_need_a_reader_token_and_ingest_an_agent_token() {
    let d = dir("roles");
    let s = Server::start(&d);
    let good = report(1, "ams-01", "er", PathKind::Expressroute, T0, &[1000]);
    for path in [
        "/v1/paths",
        "/metrics",
        "/v1/compare?a=er&b=vpn",
        "/v1/events",
        "/v1/histogram?path=er",
    ] {
        let (status, body) = http(s.addr, "GET", path, None, b"");
        assert_eq!(status, 401, "{path} without a token: {body}");
        assert!(body.contains("reader token"), "{path}: {body}");
        let (status, body) = http(s.addr, "GET", path, Some(TOKEN), b"");
        assert_eq!(status, 403, "{path} with an agent's token: {body}");
        assert!(
            body.contains("may send reports but not query"),
            "{path}: {body}"
        );
    }
    let (status, body) = http(
        s.addr,
        "POST",
        "/v1/reports",
        Some(READER),
        &batch(std::slice::from_ref(&good)),
    );
    assert_eq!(status, 403, "a reader's token does not ingest: {body}");
    assert!(body.contains("may query but not send reports"), "{body}");
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&[good]));
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(s.addr, "GET", "/v1/paths", Some(READER), b"");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"agent_id\":\"ams-01\""), "{body}");
    let (_, metrics) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    assert!(
        metrics.contains("pathprobe_collector_requests_rejected_total{reason=\"unauthorized\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pathprobe_collector_requests_rejected_total{reason=\"forbidden\"} 6"),
        "{metrics}"
    );
}

/// `serve` with these arguments, expected to refuse to start: what it said.
fn refused_start(args: &[&str]) -> String {
    let o = Command::new(COLLECTOR)
        .arg("serve")
        .args(args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "it started: {args:?}");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn secrets_others_can_read_and_open_reads_beyond_loopback_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let d = dir("secrets");
    let tokens = d.join("tokens");
    std::fs::write(&tokens, format!("ams-01 {TOKEN}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
    let db = d.join("store.db");
    let base = ["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()];
    let said = refused_start(&[&base[..], &["--tokens", tokens.to_str().unwrap()]].concat());
    assert!(
        said.contains("mode 0644") && said.contains(&format!("chmod 600 {}", tokens.display())),
        "{said}"
    );
    // Accepted when the operator says so: it starts (and is stopped here).
    let mut child = Command::new(COLLECTOR)
        .args([
            "serve",
            "--allow-world-readable-secrets",
            "--tokens",
            tokens.to_str().unwrap(),
        ])
        .args(base)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("collector serving")));
    child.kill().unwrap();
    child.wait().unwrap();

    let said = refused_start(&[
        "--listen",
        "0.0.0.0:0",
        "--db",
        db.to_str().unwrap(),
        "--open-read",
    ]);
    assert!(
        said.contains("--open-read on 0.0.0.0:0 without TLS"),
        "{said}"
    );
    let said = refused_start(
        &[
            &base[..],
            &[
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
            ],
        ]
        .concat(),
    );
    assert!(
        said.contains("/nonexistent/cert.pem") && said.contains("check the path"),
        "{said}"
    );
}

/// `token new` prints a token and a digest line: with the line in the tokens file (and not
/// the token), the token ingests.
#[test]
fn a_new_tokens_digest_line_lets_its_token_in() {
    let o = Command::new(COLLECTOR)
        .args(["token", "new", "--agent", "ams-01"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).unwrap();
    let token = out
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap()
        .to_string();
    let line = out.lines().last().unwrap().to_string();
    assert!(
        line.starts_with("ams-01 sha256:") && !line.contains(&token),
        "{out}"
    );
    let d = dir("digest");
    let tokens = d.join("tokens");
    write_secret(&tokens, &format!("{line}\nreader noc {READER}\n"));
    let mut child = Command::new(COLLECTOR)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-report-age",
            "36500d",
        ])
        .arg("--db")
        .arg(d.join("store.db"))
        .arg("--tokens")
        .arg(&tokens)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: SocketAddr = lines
        .find_map(|l| {
            l.unwrap()
                .split_whitespace()
                .find_map(|w| w.strip_prefix("listen=").map(str::to_string))
        })
        .unwrap()
        .parse()
        .unwrap();
    std::thread::spawn(move || lines.for_each(drop));
    let good = report(1, "ams-01", "er", PathKind::Expressroute, T0, &[1000]);
    let (status, body) = http(addr, "POST", "/v1/reports", Some(&token), &batch(&[good]));
    assert_eq!(status, 200, "{body}");
    let digest = line.split_whitespace().nth(1).unwrap();
    let (status, _) = http(addr, "POST", "/v1/reports", Some(digest), b"[]");
    assert_eq!(status, 401, "the digest is not the token");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// How long after `start` the server closed `s` (it reads until end of stream), or `None`
/// if it was still open at `within`.
fn closed_after(mut s: TcpStream, start: std::time::Instant, within: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut sink = Vec::new();
    match s.read_to_end(&mut sink) {
        Ok(_) => Some(start.elapsed()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(start.elapsed()),
        Err(_) => None,
    }
}

/// Slowloris and idle connections: the first request's head must come within
/// `--header-timeout`, a kept-alive connection's next one within `--idle-timeout`, and
/// past `--max-connections` a connection is closed at once; 500 slow connections do not
/// delay an agent's ingest.
#[test]
fn slow_silent_and_idle_connections_are_closed_and_ingest_goes_on() {
    let d = dir("slowloris");
    let s = Server::start_with(&d, &["--header-timeout", "2s", "--idle-timeout", "3s"]);
    let one = |i: u32| {
        batch(&[report(
            i,
            "ams-01",
            "er",
            PathKind::Expressroute,
            T0 + u64::from(i) * W,
            &[1000],
        )])
    };
    // The ingest's own time, unloaded, sets the tolerance on a busy machine.
    let t = std::time::Instant::now();
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &one(1));
    assert_eq!(status, 200, "{body}");
    let limit = Duration::from_secs(1).max(t.elapsed() * 20);

    // 500 connections: half silent, half sending a header line and stopping.
    let started = std::time::Instant::now();
    let slow: Vec<TcpStream> = (0..500)
        .map(|i| {
            let mut c = TcpStream::connect(s.addr).unwrap();
            if i % 2 == 0 {
                c.write_all(b"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Le")
                    .unwrap();
            }
            c
        })
        .collect();
    let t = std::time::Instant::now();
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &one(2));
    let took = t.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(
        took < limit,
        "the ingest took {took:?} beside 500 slow connections (limit {limit:?})"
    );

    // Each slow connection is closed at the header timeout, not before.
    for c in slow {
        let after = closed_after(c, started, Duration::from_secs(10)).expect("still open 10 s on");
        assert!(
            after >= Duration::from_millis(1_900),
            "closed after {after:?}, before the 2 s timeout"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    // A kept-alive connection: answered, then closed after 3 s idle.
    let mut k = TcpStream::connect(s.addr).unwrap();
    k.write_all(
        format!("GET /v1/paths HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut first = [0u8; 12];
    k.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let idle = std::time::Instant::now();
    let after =
        closed_after(k, idle, Duration::from_secs(10)).expect("the idle connection stayed open");
    assert!(
        after >= Duration::from_millis(2_900) && after < Duration::from_secs(8),
        "closed {after:?} after its answer"
    );

    let (_, metrics) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    let timed_out = sample(
        &metrics,
        "pathprobe_collector_connections_refused_total{reason=\"header_timeout\"}",
    );
    assert!(timed_out >= 500, "{metrics}");
}

/// The value of the sample `key` (name and labels) in a `/metrics` text.
fn sample(metrics: &str, key: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {metrics}"))
}

/// Past `--max-connections` a connection is closed at once, and counted.
#[test]
fn connections_past_the_limit_are_closed_at_once_and_counted() {
    let d = dir("max-conn");
    let s = Server::start_with(&d, &["--max-connections", "10", "--header-timeout", "30s"]);
    let held: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    // The ten are accepted (and hold their places) once a request on an eleventh is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http(s.addr, "GET", "/v1/paths", Some(READER), b"").0 != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the eleventh connection was served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let over: Vec<Option<Duration>> = (0..10)
        .map(|_| {
            let c = TcpStream::connect(s.addr).unwrap();
            closed_after(c, std::time::Instant::now(), Duration::from_secs(2))
        })
        .collect();
    assert!(
        over.iter().all(Option::is_some),
        "a connection past the limit stayed open: {over:?}"
    );
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (status, m) = http(s.addr, "GET", "/metrics", Some(READER), b"");
        if status == 200 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the places were not given back"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "pathprobe_collector_connections_refused_total{reason=\"max_connections\"} ",
            )
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    assert!(refused >= 11, "{metrics}");
}

/// `paths` paths (ExpressRoute and VPN in turn, named `er-N` and `vpn-N`) of `windows`
/// windows each from `T0`, stored in the store at `db` and rolled up.
fn fill(db: &Path, paths: u32, windows: u32) {
    let mut db = pathprobe_collector::store::sqlite::Db::open(db).unwrap();
    let kinds = [(PathKind::Expressroute, "er"), (PathKind::Vpn, "vpn")];
    for path in 0..paths {
        let (kind, name) = kinds[path as usize % 2];
        let name = format!("{name}-{path}");
        let all: Vec<WindowReport> = (0..windows)
            .map(|w| {
                let rtt = 1_000 + u64::from(w % 97) * 10 + u64::from(path % 2) * 20_000;
                let start = T0 + u64::from(w) * W;
                report(
                    path * 100_000 + w,
                    "ams-01",
                    &name,
                    kind,
                    start,
                    &[rtt, rtt + 5],
                )
            })
            .collect();
        for chunk in all.chunks(500) {
            db.ingest(chunk, 0).unwrap();
        }
    }
    while db.roll_up(10_000).unwrap() > 0 {}
}

/// The 99th percentile of `v` (sorted here).
fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100).saturating_sub(1)]
}

/// Eight clients running day-long compares as fast as they are answered do not delay an
/// agent's acknowledgements: queries run on their own, lower-priority threads, a few at a
/// time, and the rest get a 503 with `Retry-After`.
#[test]
fn ingest_stays_quick_while_eight_clients_run_day_long_compares() {
    const DAY: u32 = 8_640; // 10 s windows
    let d = dir("query-flood");
    fill(&d.join("store.db"), 4, DAY);
    let s = Server::start(&d);
    let next = std::sync::atomic::AtomicU32::new(1_000_000);
    let ingest = || {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let b = batch(&[report(
            i,
            "ams-01",
            "er-0",
            PathKind::Expressroute,
            T0 + u64::from(DAY + i - 1_000_000) * W,
            &[1000],
        )]);
        let t = std::time::Instant::now();
        let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &b);
        assert_eq!(status, 200, "{body}");
        t.elapsed()
    };
    let mut quiet: Vec<Duration> = (0..40).map(|_| ingest()).collect();
    let limit = Duration::from_millis(100).max(p99(&mut quiet) * 4);

    let q = format!(
        "/v1/compare?a=expressroute&b=vpn&from={}&to={}",
        T0 / 1_000_000_000,
        (T0 + u64::from(DAY) * W) / 1_000_000_000
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (answered, busy) = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    );
    let mut loaded = Vec::new();
    std::thread::scope(|sc| {
        for _ in 0..8 {
            sc.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, body) = http(s.addr, "GET", &q, Some(READER), b"");
                    match status {
                        200 => answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                        503 => {
                            assert!(body.contains("--max-concurrent-queries"), "{body}");
                            // Sooner than its Retry-After says, to keep the pressure on,
                            // but not a new connection every few microseconds: that is a
                            // connection flood, not eight people comparing.
                            std::thread::sleep(Duration::from_millis(20));
                            busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        }
                        other => panic!("compare: {other} {body}"),
                    };
                }
            });
        }
        let until = std::time::Instant::now() + Duration::from_secs(8);
        while std::time::Instant::now() < until {
            loaded.push(ingest());
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let worst = p99(&mut loaded);
    let answered = answered.into_inner();
    eprintln!(
        "ingest p99 {worst:?} beside 8 compare clients over 8 s ({} ingests; {answered} compares answered, {} told to retry); unloaded p99 {:?}",
        loaded.len(),
        busy.load(std::sync::atomic::Ordering::Relaxed),
        p99(&mut quiet)
    );
    assert!(answered >= 4, "only {answered} compares answered in 8 s");
    assert!(
        worst < limit,
        "ingest p99 {worst:?} beside 8 compare clients (limit {limit:?}; {answered} compares answered, {} busy)",
        busy.into_inner()
    );
    let (_, metrics) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    assert!(
        sample(
            &metrics,
            "pathprobe_collector_queries_refused_total{reason=\"busy\"}"
        ) > 0,
        "eight clients, two places: some were told to retry"
    );
    let (status, body) = http(s.addr, "GET", "/v1/events?since=400d", Some(READER), b"");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("--max-query-range"), "{body}");
}

/// `compare`, `paths`, `events` and `histogram` asked of a collector over HTTPS with a
/// reader token print exactly what they print reading the store itself.
#[test]
fn the_cli_asks_a_remote_collector_over_https_and_prints_what_it_prints_locally() {
    let d = dir("remote");
    let ca = pathprobe_tests::pki::Ca::new(&d, "corp");
    let cert = ca.server(&d, "server");
    fill(&d.join("store.db"), 4, 360);
    let s = Server::start_with(
        &d,
        &[
            "--tls-cert",
            cert.cert.to_str().unwrap(),
            "--tls-key",
            cert.key.to_str().unwrap(),
        ],
    );
    let reader = d.join("reader.token");
    write_secret(&reader, READER);
    let agent = d.join("agent.token");
    write_secret(&agent, TOKEN);
    let url = format!("https://localhost:{}", s.addr.port());
    let (from, to) = (
        (T0 / 1_000_000_000).to_string(),
        ((T0 + 360 * W) / 1_000_000_000).to_string(),
    );
    let cli = |args: &[&str], remote: Option<&Path>| {
        let mut c = Command::new(COLLECTOR);
        c.args(args);
        match remote {
            Some(token) => c
                .args([
                    "--collector",
                    &url,
                    "--ca-file",
                    ca.cert_pem.to_str().unwrap(),
                ])
                .arg("--token-file")
                .arg(token),
            None => c.arg("--db").arg(d.join("store.db")),
        };
        let o = c.output().unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let range = ["--from", from.as_str(), "--to", to.as_str()];
    let questions: Vec<Vec<&str>> = vec![
        [
            &["compare", "--a", "expressroute", "--b", "vpn"][..],
            &range[..],
        ]
        .concat(),
        [
            &["compare", "--a", "expressroute", "--b", "vpn", "--json"][..],
            &range[..],
        ]
        .concat(),
        vec!["paths", "--json"],
        [&["events", "--json"][..], &range[..]].concat(),
        [
            &["histogram", "--path", "er-0", "--format", "log"][..],
            &range[..],
        ]
        .concat(),
    ];
    for q in &questions {
        let (ok, local, err) = cli(q, None);
        assert!(ok, "{q:?} locally: {err}");
        let (ok, remote, err) = cli(q, Some(&reader));
        assert!(ok, "{q:?} remotely: {err}");
        assert_eq!(remote, local, "{q:?}");
        assert!(!local.trim().is_empty(), "{q:?} printed nothing");
    }
    let (ok, _, err) = cli(&["paths"], Some(&agent));
    assert!(
        !ok && err.contains("answered 403") && err.contains("reader token"),
        "{err}"
    );
    let (ok, _, err) = cli(
        &[&["compare", "--a", "er", "--b", "vpn", "--since", "400d"][..]].concat(),
        Some(&reader),
    );
    assert!(
        !ok && err.contains("answered 400") && err.contains("--max-query-range"),
        "{err}"
    );
    let o = Command::new(COLLECTOR)
        .args(["paths", "--collector", &url])
        .arg("--token-file")
        .arg(&reader)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("signed by a CA") && err.contains("--ca-file"),
        "{err}"
    );
}

/// A service manager's reload (SIGHUP) of a collector without TLS is logged, and it serves
/// on.
#[test]
fn sighup_without_tls_does_not_stop_the_collector() {
    let d = dir("hup");
    let s = Server::start(&d);
    let ok = Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = http(s.addr, "GET", "/v1/paths", Some(READER), b"");
    assert_eq!(status, 200, "{body}");
}

/// `GET /v1/plan`: an agent's token gets its own plan (and a 304 for its `ETag`); a reader's
/// token, another agent's id, no token and an absurd query are refused with the reason,
/// and none of them stops the collector.
#[test]
fn the_fleet_plan_goes_to_its_agent_alone() {
    let d = dir("plan");
    let fleet = d.join("fleet.toml");
    std::fs::write(
        &fleet,
        "[[site]]\nname = \"ams\"\nagents = [\"ams-01\", \"fra-01\"]\n\n[[site]]\nname = \"weu\"\nagents = [\"weu-01\"]\n\n[[reflector]]\nagent = \"weu-01\"\naddresses = { vpn = \"10.2.0.4:862\" }\n\n[[template]]\nname = \"vpn\"\nkind = \"vpn\"\n\n[[mesh]]\nfrom = { sites = [\"ams\"] }\nto = { sites = [\"weu\"] }\ntemplates = [\"vpn\"]\n",
    )
    .unwrap();
    let fleet_arg = fleet.to_str().unwrap();
    let s = Server::start_with(&d, &["--fleet", fleet_arg]);
    let (status, body) = http(s.addr, "GET", "/v1/plan", Some(TOKEN), b"");
    assert_eq!(status, 200, "{body}");
    let plan: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plan["agent_id"], "ams-01");
    assert_eq!(plan["path"][0]["name"], "vpn-weu-01");
    let version = plan["version"].as_str().unwrap().to_string();

    // Its ETag again: nothing changed.
    let mut c = TcpStream::connect(s.addr).unwrap();
    write!(
        c,
        "GET /v1/plan HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nIf-None-Match: \"{version}\"\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    c.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 304"), "{resp}");

    let refused = [
        ("/v1/plan", None, 401, "token"),
        (
            "/v1/plan",
            Some(READER),
            403,
            "may query but not send reports",
        ),
        (
            "/v1/plan?agent=fra-01",
            Some(TOKEN),
            403,
            "not the agent asked for",
        ),
        (
            &format!("/v1/plan?agent={}", "x".repeat(8000)),
            Some(TOKEN),
            403,
            "not the agent asked for",
        ),
        (
            "/v1/plan?agent=%ff%fe",
            Some(TOKEN),
            403,
            "not the agent asked for",
        ),
    ];
    for (path, token, want, says) in refused {
        let (status, body) = http(s.addr, "GET", path, token, b"");
        let shown = &path[..path.len().min(40)];
        assert_eq!(status, want, "{shown}: {body}");
        assert!(body.contains(says), "{shown}: {body}");
    }
    // The other agent gets its own, the collector still answers.
    let (status, body) = http(s.addr, "GET", "/v1/plan", Some(OTHER_TOKEN), b"");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"agent_id\":\"fra-01\""), "{body}");
}

/// A service manager's soft open-files limit (1,024 under systemd; 256 here) would refuse
/// connections long before `--max-connections`: serve raises it to fit them.
#[test]
fn serve_raises_its_open_files_limit_to_fit_max_connections() {
    let d = dir("nofile");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {COLLECTOR} serve --listen 127.0.0.1:0 --open-read --max-connections 2000 --db {}",
            d.join("store.db").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = String::new();
    while !said.contains("listen=") {
        let line = lines.next().unwrap().unwrap();
        said.push_str(&line);
        said.push('\n');
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    if hard >= 2064 {
        assert!(soft >= 2064, "soft limit {soft}: {said}");
    } else {
        assert_eq!(soft, hard, "raised as far as it goes");
        assert!(said.contains("raise it (LimitNOFILE="), "{said}");
    }
}

/// Window `i`'s RTTs in the dashboard tests: 10 from 1 ms, spread by `i`.
fn dash_samples(i: u64) -> Vec<u64> {
    (0..10)
        .map(|j| 1_000_000 + j * (1_000 + 50_000 * i))
        .collect()
}

/// A collector holding 30 windows of 10 s of `expressroute` at `ams` (window `i` with
/// [`dash_samples`]), and their range as a query.
fn dash_server(name: &str) -> (Server, String) {
    let s = Server::start(&dir(name));
    let reports: Vec<WindowReport> = (0..30_u32)
        .map(|i| {
            let at = T0 + u64::from(i) * W;
            report(
                9_000 + i,
                "ams-01",
                "er",
                PathKind::Expressroute,
                at,
                &dash_samples(i.into()),
            )
        })
        .collect();
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&reports));
    assert_eq!(status, 200, "{body}");
    let range = format!(
        "from={}&to={}",
        T0 / 1_000_000_000,
        (T0 + 30 * W) / 1_000_000_000
    );
    (s, range)
}

fn get_json(s: &Server, q: &str) -> serde_json::Value {
    let (status, body) = http(s.addr, "GET", q, Some(READER), b"");
    assert_eq!(status, 200, "{q}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn rtt_hist(values: &[u64]) -> hdrhistogram::Histogram<u64> {
    let mut h = Metric::Rtt.new_histogram();
    for &v in values {
        h.record(v).unwrap();
    }
    h
}

#[allow(clippy::cast_precision_loss, reason = "test figures far below 2^52")]
fn micros(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

/// `/v1/series`, against figures computed here from the samples sent: per window, and per
/// rollup bucket, where it agrees with `/v1/compare`.
#[test]
fn the_series_is_exact_per_window_and_per_rollup_bucket() {
    let (s, range) = dash_server("dash-series");
    let per_window = get_json(
        &s,
        &format!("/v1/series?path=expressroute&site=ams&columns=100&{range}"),
    );
    assert_eq!(per_window["resolution"], "window");
    let cols = per_window["columns"].as_array().unwrap();
    assert_eq!(cols.len(), 30);
    for (i, c) in (0_u64..).zip(cols) {
        let h = rtt_hist(&dash_samples(i));
        assert_eq!(c["start_ns"].as_u64(), Some(T0 + i * W));
        assert_eq!(
            c["rtt_us"]["p99"].as_f64(),
            Some(micros(h.value_at_quantile(0.99))),
            "window {i}"
        );
        assert_eq!(
            c["rtt_us"]["p50"].as_f64(),
            Some(micros(h.value_at_quantile(0.5)))
        );
        assert_eq!(c["loss_pct"].as_f64(), Some(100.0 / 11.0));
        assert_eq!(c["owd_clock"], "unavailable");
    }
    // Three columns at most: one ten-minute bucket holds all 30 windows, merged exactly.
    let all: Vec<u64> = (0..30).flat_map(dash_samples).collect();
    let merged = rtt_hist(&all);
    let coarse = get_json(
        &s,
        &format!("/v1/series?path=expressroute&columns=3&{range}"),
    );
    assert_eq!(coarse["resolution"], "10m");
    let c = &coarse["columns"][0];
    assert_eq!(
        (c["windows"].as_u64(), c["received"].as_u64()),
        (Some(30), Some(300))
    );
    assert_eq!(
        c["rtt_us"]["p99"].as_f64(),
        Some(micros(merged.value_at_quantile(0.99)))
    );
    let cmp = get_json(&s, &format!("/v1/compare?a=expressroute&b=vpn&{range}"));
    let p99 = cmp["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["figure"] == "RTT p99 µs")
        .unwrap()["a"]
        .as_f64();
    assert_eq!(
        c["rtt_us"]["p99"].as_f64(),
        p99,
        "the series agrees with compare"
    );
    for (q, says) in [
        (
            format!("/v1/series?path=er&columns=0&{range}"),
            "columns=0 is out of range",
        ),
        (
            format!("/v1/heatmap?path=er&bins=5000&{range}"),
            "bins=5000 is out of range",
        ),
        ("/v1/series?columns=5".to_string(), "path"),
    ] {
        let (status, body) = http(s.addr, "GET", &q, Some(READER), b"");
        assert_eq!(status, 400, "{q}: {body}");
        assert!(body.contains(says), "{q}: {body}");
    }
}

/// `/v1/cdf` and `/v1/heatmap`, against the histogram of every sample sent: the CDF has
/// every bucket and compare's p99, the heatmap counts every sample in one bin.
#[test]
fn the_cdf_and_the_heatmap_hold_every_sample() {
    let (s, range) = dash_server("dash-cdf");
    let all: Vec<u64> = (0..30).flat_map(dash_samples).collect();
    let merged = rtt_hist(&all);
    let cdf = get_json(&s, &format!("/v1/cdf?path=expressroute&{range}"));
    assert_eq!(cdf["count"].as_u64(), Some(300));
    assert_eq!(
        cdf["rtt_us"]["p99"].as_f64(),
        Some(micros(merged.value_at_quantile(0.99)))
    );
    let points = cdf["points"].as_array().unwrap();
    assert_eq!(points.len(), merged.iter_recorded().count());
    assert_eq!(points.last().unwrap()[1].as_f64(), Some(1.0));
    let fractions: Vec<f64> = points.iter().map(|p| p[1].as_f64().unwrap()).collect();
    assert!(
        fractions.windows(2).all(|w| w[0] < w[1]),
        "rising: {fractions:?}"
    );

    let heat = get_json(
        &s,
        &format!("/v1/heatmap?path=expressroute&columns=100&bins=12&{range}"),
    );
    let edges = heat["edges_us"].as_array().unwrap();
    assert_eq!(edges.len(), 13);
    assert_eq!(
        edges[0].as_f64(),
        Some(micros(merged.lowest_equivalent(merged.min())))
    );
    assert_eq!(edges[12].as_f64(), Some(micros(merged.max())));
    let columns = heat["columns"].as_array().unwrap();
    assert_eq!(columns.len(), 30);
    for c in columns {
        let counts: u64 = c["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(counts, 10, "every sample in one bin: {c}");
    }
    // Window 0's RTTs are all within 10 µs of 1 ms: all in the first bin; the widest
    // window reaches the last.
    assert_eq!(columns[0]["counts"][0].as_u64(), Some(10));
    assert!(columns[29]["counts"][11].as_u64().unwrap() >= 1);
}

/// `compare --plot`: the SVG of both sides' RTT distributions, from the store and from a
/// collector, with compare's p99 in its legend; nothing to plot is an error that says so.
#[test]
fn compare_plots_both_distributions_as_svg() {
    let (s, _) = dash_server("dash-plot");
    let d = dir("dash-plot-out");
    let from = (T0 / 1_000_000_000).to_string();
    let to = ((T0 + 30 * W) / 1_000_000_000).to_string();
    let reader = d.join("reader.token");
    write_secret(&reader, READER);
    let url = format!("http://{}", s.addr);
    let store = std::env::temp_dir()
        .join(format!("pathprobe-serve-dash-plot-{}", std::process::id()))
        .join("store.db");
    let store = store.to_str().unwrap();
    let token = reader.to_str().unwrap();
    for (name, source) in [
        ("db.svg", vec!["--db", store]),
        (
            "remote.svg",
            vec!["--collector", &url, "--token-file", token],
        ),
    ] {
        let svg = d.join(name);
        let out = Command::new(COLLECTOR)
            .args([
                "compare",
                "--a",
                "expressroute",
                "--b",
                "vpn",
                "--from",
                &from,
                "--to",
                &to,
            ])
            .args(&source)
            .arg("--plot")
            .arg(&svg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<svg") && text.trim_end().ends_with("</svg>"),
            "{name}"
        );
        let all: Vec<u64> = (0..30).flat_map(dash_samples).collect();
        let p99 = pathprobe_collector::plot::latency_label(micros(
            rtt_hist(&all).value_at_quantile(0.99),
        ));
        assert!(
            text.contains("expressroute: p50 ")
                && text.contains(&format!("p99 {p99} (300 probes)")),
            "{name}: the legend has compare's p99 {p99}"
        );
        assert!(text.contains("vpn: no RTT in the range"), "{name}");
    }
    let out = Command::new(COLLECTOR)
        .args([
            "compare", "--a", "vpn", "--b", "internet", "--from", &from, "--to", &to, "--db", store,
        ])
        .arg("--plot")
        .arg(d.join("empty.svg"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to plot"), "{err}");
}

/// `/v1/grid`: each site's paths by kind over the last 15 minutes, judged by the stated
/// rule: a degraded ExpressRoute is a warning, a healthy one ok, a path gone quiet silent.
#[test]
fn the_grid_judges_each_site_and_kind_by_the_stated_rule() {
    let d = dir("grid");
    let s = Server::start_with(&d, &["--grid-threshold", "expressroute=20ms,5%"]);
    let now = pathprobe_collector::now_ns();
    let ms = 1_000_000;
    let healthy: Vec<u64> = vec![2 * ms; 100];
    let degraded: Vec<u64> = (0..100)
        .map(|i| if i < 90 { 10 * ms } else { 25 * ms })
        .collect();
    let mut fra = report(
        1,
        "fra-01",
        "er",
        PathKind::Expressroute,
        now - 2 * W,
        &healthy,
    );
    fra.site = Some("fra".into());
    let (status, body) = http(
        s.addr,
        "POST",
        "/v1/reports",
        Some(OTHER_TOKEN),
        &batch(&[fra]),
    );
    assert_eq!(status, 200, "{body}");
    let reports = [
        report(
            2,
            "ams-01",
            "er",
            PathKind::Expressroute,
            now - 2 * W,
            &degraded,
        ),
        // The VPN's last window ended ten minutes ago: silent, whatever its figures.
        report(3, "ams-01", "vpn", PathKind::Vpn, now - 60 * W, &healthy),
    ];
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(&reports));
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(s.addr, "GET", "/v1/grid", Some(READER), b"");
    assert_eq!(status, 200, "{body}");
    let g: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(g["kinds"], serde_json::json!(["expressroute", "vpn"]));
    let cell = |site: &str, kind: &str| {
        g["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["site"] == site)
            .unwrap()["cells"][kind]
            .clone()
    };
    assert_eq!(cell("fra", "expressroute")["state"], "ok", "{body}");
    let ams = cell("ams", "expressroute");
    assert_eq!(ams["state"], "warning", "p99 25 ms over 20 ms: {body}");
    let p50 = micros(rtt_hist(&degraded).value_at_quantile(0.5));
    assert_eq!(
        ams["rtt_p50_us"].as_f64(),
        Some(p50),
        "10 ms, as its histogram holds it"
    );
    assert_eq!(cell("ams", "vpn")["state"], "silent", "{body}");
    assert_eq!(
        cell("ams", "vpn")["silent_paths"],
        serde_json::json!(["ams-01/vpn"])
    );
    assert!(
        g["rule_text"]
            .as_str()
            .unwrap()
            .contains("expressroute 20 ms, 5%"),
        "{body}"
    );
    let (status, body) = http(s.addr, "GET", "/v1/grid", None, b"");
    assert_eq!(status, 401, "{body}");
}
