//! `serve --otlp URL`: windows ingested into the collector leave as OTLP/HTTP requests that
//! decode with the opentelemetry-proto types into the same windows (once each, delta
//! temporality, exact counts and sums), whose merged exponential histograms give each
//! kind's p99 within the stated error of `compare`'s exact one. The receiver here is the
//! test's own HTTP listener: it refuses the first request with 503, as a busy
//! OpenTelemetry Collector does, and the collector tries again.

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "test code: a failed unwrap is a failed test; figures far below 2^52"
)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{READER, Server, TOKEN, W, batch, dir, exact_p99, http, report};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, metric};
use pathprobe_collector::native::{Exponential, Native, RELATIVE_ERROR};
use pathprobe_proto::report::{PathKind, WindowReport};
use prost::Message as _;

const OTLP_TOKEN: &str = "otlp-token-0123456789abcdef";

/// Accepts OTLP/HTTP requests; the first is answered 503, the rest 200. Each request
/// accepted goes to `tx`: its `Authorization` header and its body.
fn receiver() -> (u16, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut first = true;
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut conn = conn;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let request_line = line.trim().to_string();
                let mut length = 0;
                let mut content_type = String::new();
                let mut authorization = String::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim();
                    if h.is_empty() {
                        break;
                    }
                    let (name, value) = h.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "content-type" => content_type = value.trim().to_string(),
                        "authorization" => authorization = value.trim().to_string(),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                assert_eq!(request_line, "POST /v1/metrics HTTP/1.1");
                assert_eq!(content_type, "application/x-protobuf");
                let status = if first {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                if !first {
                    tx.send((authorization, body)).unwrap();
                }
                first = false;
                // An empty ExportMetricsServiceResponse.
                write!(conn, "HTTP/1.1 {status}\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n").unwrap();
            }
        }
    });
    (port, rx)
}

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match &a.value.as_ref()?.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

/// Every window's RTT point, by (path, start), with its kind: each must come once, with
/// the window's times, its exact count and sum, from its agent's resource.
fn gather(
    bodies: &mpsc::Receiver<(String, Vec<u8>)>,
    sent: &[WindowReport],
) -> BTreeMap<(String, u64), (String, Native)> {
    let mut points: BTreeMap<(String, u64), (String, Native)> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while points.len() < sent.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (authorization, body) = bodies
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("only {} of {} windows arrived", points.len(), sent.len()));
        assert_eq!(authorization, format!("Bearer {OTLP_TOKEN}"));
        let req = ExportMetricsServiceRequest::decode(body.as_slice()).unwrap();
        for rm in &req.resource_metrics {
            let res = rm.resource.as_ref().unwrap();
            assert_eq!(
                attr(&res.attributes, "pathprobe.agent").as_deref(),
                Some("ams-01")
            );
            assert_eq!(
                attr(&res.attributes, "pathprobe.site").as_deref(),
                Some("ams")
            );
            assert_eq!(
                attr(&res.attributes, "deployment.environment").as_deref(),
                Some("test")
            );
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                if m.name == "pathprobe.probes.sent" {
                    let Some(metric::Data::Sum(sum)) = &m.data else {
                        panic!("{m:?}")
                    };
                    assert!(sum.is_monotonic);
                    assert_eq!(
                        sum.aggregation_temporality,
                        AggregationTemporality::Delta as i32
                    );
                }
                if m.name != "pathprobe.rtt" {
                    continue;
                }
                assert_eq!(m.unit, "s");
                let Some(metric::Data::ExponentialHistogram(eh)) = &m.data else {
                    panic!("{m:?}")
                };
                assert_eq!(
                    eh.aggregation_temporality,
                    AggregationTemporality::Delta as i32
                );
                for p in &eh.data_points {
                    let path = attr(&p.attributes, "path").unwrap();
                    let kind = attr(&p.attributes, "kind").unwrap();
                    let window = sent
                        .iter()
                        .find(|r| {
                            r.path.name == path && r.window.start_unix_ns == p.start_time_unix_nano
                        })
                        .unwrap();
                    assert_eq!(p.time_unix_nano, window.window.end_unix_ns);
                    assert_eq!(p.count, window.counters.received, "every sample, exactly");
                    let exact_sum = window.counters.rtt_sum_ns as f64 * 1e-9;
                    assert!((p.sum.unwrap() - exact_sum).abs() <= exact_sum * 1e-12);
                    let b = p.positive.clone().unwrap();
                    let e = Exponential {
                        scale: p.scale,
                        zero_threshold: p.zero_threshold,
                        zero_count: p.zero_count,
                        count: p.count,
                        sum: p.sum.unwrap(),
                        offset: b.offset,
                        bucket_counts: b.bucket_counts,
                    };
                    let again = points.insert(
                        (path.clone(), p.start_time_unix_nano),
                        (kind, e.to_native()),
                    );
                    assert!(
                        again.is_none(),
                        "the window of {path} at {} came twice",
                        p.start_time_unix_nano
                    );
                }
            }
        }
    }
    points
}

/// Each kind's windows merged from their OTLP points: the p99 within the bound of
/// compare's exact one.
fn p99_within_the_bound(
    server: &Server,
    points: &BTreeMap<(String, u64), (String, Native)>,
    start: u64,
) {
    for kind in ["expressroute", "vpn"] {
        let mut merged = Native::default();
        for (k, n) in points.values() {
            if k == kind {
                merged.add(n);
            }
        }
        let exact = exact_p99(server.addr, kind, start, start + 6 * W);
        let est = merged.quantile(0.99).unwrap();
        let err = (est - exact).abs() / exact;
        eprintln!(
            "{kind}: OTLP p99 {est:.9} s, compare {exact:.9} s, error {:.4}%",
            err * 100.0
        );
        assert!(
            err <= RELATIVE_ERROR * (1.0 + 1e-9),
            "{kind}: {est} against {exact}"
        );
    }
}

#[test]
fn otlp_windows_decode_once_each_into_the_exact_quantiles() {
    let (port, bodies) = receiver();
    let scratch = dir("otlp");
    let url = format!("http://127.0.0.1:{port}/v1/metrics");
    let token = scratch.join("otlp-token");
    common::write_secret(&token, &format!("{OTLP_TOKEN}\n"));
    let server = Server::start_with(
        &scratch,
        &[
            "--max-body",
            "10000000",
            "--otlp",
            &url,
            "--otlp-attribute",
            "deployment.environment=test",
            "--otlp-bearer-file",
            token.to_str().unwrap(),
        ],
    );
    let start = pathprobe_collector::now_ns() - 20 * W;
    let mut sent = Vec::new();
    for k in 0..6_u32 {
        let t = start + u64::from(k) * W;
        let spread = |seed: u32, base: u64| -> Vec<u64> {
            (0..150_u64)
                .map(|i| base + (i * 7_919 + u64::from(seed) * 104_729) % (base / 2) + i * i * 40)
                .collect()
        };
        sent.push(report(
            10 * k + 1,
            "ams-01",
            "er",
            PathKind::Expressroute,
            t,
            &spread(k, 2_000_000),
        ));
        sent.push(report(
            10 * k + 2,
            "ams-01",
            "er-b",
            PathKind::Expressroute,
            t,
            &spread(k + 50, 2_600_000),
        ));
        sent.push(report(
            10 * k + 3,
            "ams-01",
            "vpn",
            PathKind::Vpn,
            t,
            &spread(k + 90, 13_000_000),
        ));
    }
    for chunk in sent.chunks(9) {
        let (status, body) = http(
            server.addr,
            "POST",
            "/v1/reports",
            Some(TOKEN),
            &batch(chunk),
        );
        assert_eq!(status, 200, "{body}");
    }
    // A retry of the first batch is acknowledged and not exported again.
    let (status, body) = http(
        server.addr,
        "POST",
        "/v1/reports",
        Some(TOKEN),
        &batch(&sent[..9]),
    );
    assert_eq!(
        (status, body.contains("\"duplicates\":9")),
        (200, true),
        "{body}"
    );

    let points = gather(&bodies, &sent);
    // Nothing more: the retried batch was not exported again.
    assert!(bodies.recv_timeout(Duration::from_secs(2)).is_err());

    p99_within_the_bound(&server, &points, start);
    let (_, m) = http(server.addr, "GET", "/metrics", Some(READER), b"");
    assert!(
        m.contains("pathprobe_collector_otlp_failed_tries_total 1"),
        "{m}"
    );
    assert!(
        m.contains("pathprobe_collector_otlp_queue_requests 0"),
        "{m}"
    );
}

/// Export flags that cannot work are refused at start, naming the flag and the fix.
#[test]
fn bad_export_flags_are_refused_with_the_fix() {
    let scratch = dir("export-flags");
    let db = scratch.join("store.db");
    let run = |extra: &[&str]| -> String {
        let out = std::process::Command::new(common::COLLECTOR)
            .args(["serve", "--listen", "127.0.0.1:0", "--open-read", "--db"])
            .arg(&db)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&[
        "--remote-write",
        "ftp://prometheus.example.net/api/v1/write",
    ]);
    assert!(
        e.contains("--remote-write ftp://") && e.contains("write it like https://"),
        "{e}"
    );
    let e = run(&[
        "--remote-write",
        "http://127.0.0.1:9/w",
        "--remote-write-label",
        "site=x",
    ]);
    assert!(e.contains("one of the series' own labels"), "{e}");
    let missing = scratch.join("no-such-token");
    let e = run(&[
        "--otlp",
        "http://127.0.0.1:9/v1/metrics",
        "--otlp-bearer-file",
        missing.to_str().unwrap(),
    ]);
    assert!(
        e.contains("--otlp-bearer-file") && e.contains("no-such-token"),
        "{e}"
    );
    let e = run(&[
        "--remote-write",
        "http://prometheus.example.net/api/v1/write",
        "--remote-write-bearer-file",
        missing.to_str().unwrap(),
    ]);
    assert!(e.contains("in clear beyond this host"), "{e}");
}
