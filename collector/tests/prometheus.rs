//! Against a real Prometheus (Debian's `prometheus`, started here on loopback with
//! `--web.enable-remote-write-receiver --enable-feature=native-histograms`): windows
//! ingested into the collector reach it by remote write and by scraping `/metrics` in
//! protobuf, and `histogram_quantile` over them lies within the stated error of the exact
//! p99 that `compare` prints; counters survive a restart of the collector; and a receiver
//! away for a minute gets every window once when it is back.
//!
//! Skipped, with a message, where no Prometheus is installed (`.ci/run` installs it).

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::float_cmp,
    reason = "test code: a failed unwrap is a failed test; counts far below 2^52 are exact floats"
)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{READER, Server, TOKEN, W, batch, dir, exact_p99, http, report};
use pathprobe_collector::native::RELATIVE_ERROR;
use pathprobe_proto::report::{PathKind, WindowReport};

const PROMETHEUS: &str = "/usr/bin/prometheus";

fn prometheus_binary() -> Option<PathBuf> {
    let p =
        std::env::var_os("PATHPROBE_PROMETHEUS").map_or_else(|| PROMETHEUS.into(), PathBuf::from);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: no Prometheus at {} (apt-get install prometheus, as .ci/run does, or set PATHPROBE_PROMETHEUS)",
            p.display()
        );
        None
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus on loopback, receiving remote writes and scraping the collector at
/// `scrape` (with the reader token) every second.
struct Prometheus {
    bin: PathBuf,
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn new(bin: PathBuf, dir: &Path, port: u16, scrape: SocketAddr) -> Self {
        std::fs::create_dir_all(dir.join("tsdb")).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: pathprobe\n    authorization:\n      credentials: {READER}\n    static_configs:\n      - targets: ['{scrape}']\n"
            ),
        )
        .unwrap();
        let mut p = Self {
            bin,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: dir.to_path_buf(),
        };
        p.start();
        p
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("prometheus.log")).unwrap();
        let child = Command::new(&self.bin)
            .arg(format!(
                "--config.file={}",
                self.dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={}", self.addr))
            .arg("--web.enable-remote-write-receiver")
            .arg("--enable-feature=native-histograms")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_mins(1);
        while http(self.addr, "GET", "/-/ready", None, b"").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "Prometheus did not become ready: {}",
                std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: it writes its head block's WAL and exits.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    /// An instant query's result vector (`data.result`).
    fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let enc: String = url::form_urlencoded::byte_serialize(q.as_bytes()).collect();
        // Through ureq: Prometheus sends larger answers chunked.
        let mut resp = ureq::get(format!("http://{}/api/v1/query?query={enc}", self.addr))
            .call()
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        let body = resp.body_mut().read_to_string().unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single scalar an instant query gives, once it gives one (polling up to 60 s).
    fn value(&self, q: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if let Some(v) = self.query(q).first()
                && let Some(s) = v["value"][1].as_str()
            {
                return s.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no answer to {q}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until `q` gives `want`.
    fn wait_for(&self, q: &str, want: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = self
                .query(q)
                .first()
                .and_then(|v| v["value"][1].as_str().map(str::to_string));
            if got.as_deref().and_then(|s| s.parse::<f64>().ok()) == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{q} is {got:?}, not {want}, after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A reproducible spread of RTTs around `base_us`, with a tail.
fn rtts(seed: u64, n: usize, base_us: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x % 10_000) as f64 / 10_000.0;
            // Mostly within 30% of the base, the top 3% up to 5 times it.
            let factor = if u > 0.97 {
                1.0 + (u - 0.97) * 130.0
            } else {
                0.85 + u * 0.3
            };
            (base_us as f64 * factor * 1_000.0) as u64
        })
        .collect()
}

/// `n` windows of `W` from `start` for ER paths `er` and `er-b` and VPN path `vpn`.
fn windows(first_id: u32, n: u32, start: u64) -> Vec<WindowReport> {
    let mut out = Vec::new();
    for k in 0..n {
        let t = start + u64::from(k) * W;
        let id = first_id + k * 3;
        out.push(report(
            id,
            "ams-01",
            "er",
            PathKind::Expressroute,
            t,
            &rtts(id.into(), 200, 2_000),
        ));
        out.push(report(
            id + 1,
            "ams-01",
            "er-b",
            PathKind::Expressroute,
            t,
            &rtts((id + 1).into(), 150, 2_400),
        ));
        out.push(report(
            id + 2,
            "ams-01",
            "vpn",
            PathKind::Vpn,
            t,
            &rtts((id + 2).into(), 200, 14_000),
        ));
    }
    out
}

fn now_ns() -> u64 {
    pathprobe_collector::now_ns()
}

fn ingest(s: &Server, reports: &[WindowReport]) {
    for chunk in reports.chunks(30) {
        let (status, body) = http(s.addr, "POST", "/v1/reports", Some(TOKEN), &batch(chunk));
        assert_eq!(status, 200, "{body}");
    }
}

fn assert_within(what: &str, got: f64, exact: f64) {
    let err = (got - exact).abs() / exact;
    eprintln!(
        "{what}: Prometheus {got:.9} s, compare {exact:.9} s, error {:.4}%",
        err * 100.0
    );
    assert!(
        err <= RELATIVE_ERROR * (1.0 + 1e-9),
        "{what}: Prometheus says {got} s, compare {exact} s: error {err} beyond {RELATIVE_ERROR}"
    );
}

/// Over remote write (`source="rw"`) and the scrape (`job="pathprobe"`): the RTT p99 of
/// each kind (both ER paths merged inside Prometheus) within the bound of compare's, the
/// count exact, the sum the agents'.
fn check_figures(s: &Server, prom: &Prometheus, first: &[WindowReport], start: u64) {
    // Remote write: both ER paths merged inside Prometheus, and the VPN.
    let to = start + 20 * W;
    for (kind, sel) in [
        (
            "expressroute",
            "source=\"rw\",site=\"ams\",kind=\"expressroute\"",
        ),
        ("vpn", "source=\"rw\",site=\"ams\",kind=\"vpn\""),
        (
            "expressroute",
            "job=\"pathprobe\",site=\"ams\",kind=\"expressroute\"",
        ),
        ("vpn", "job=\"pathprobe\",site=\"ams\",kind=\"vpn\""),
    ] {
        let exact = exact_p99(s.addr, kind, start, to);
        let q = format!("histogram_quantile(0.99, sum(pathprobe_rtt_seconds{{{sel}}}))");
        assert_within(&q, prom.value(&q), exact);
        // The count is every sample, exactly; the sum the agents' exact sum.
        let want: usize = first
            .iter()
            .filter(|r| r.path.kind.to_string() == kind)
            .map(|r| r.counters.received as usize)
            .sum();
        let q = format!("histogram_count(sum(pathprobe_rtt_seconds{{{sel}}}))");
        assert_eq!(prom.value(&q), want as f64, "{q}");
        let sum: u128 = first
            .iter()
            .filter(|r| r.path.kind.to_string() == kind)
            .map(|r| r.counters.rtt_sum_ns)
            .sum();
        let q = format!("histogram_sum(sum(pathprobe_rtt_seconds{{{sel}}}))");
        let got = prom.value(&q);
        assert!(((got - sum as f64 * 1e-9) / got).abs() < 1e-9, "{q}: {got}");
    }
}

/// Every query of the Grafana dashboard (`examples/grafana/pathprobe.json`, in Grafana's
/// provisioning format: a dashboard model with its datasource as a variable) runs on this
/// Prometheus, with the variables filled in as Grafana would, and the panels of the data
/// given (quantiles, heatmap, loss) have series.
fn grafana_queries_run(prom: &Prometheus) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/grafana/pathprobe.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(dash["uid"], "pathprobe-er-vpn");
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "site", "kind"]);
    let mut ran = 0;
    for panel in dash["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$site", "ams")
                .replace("$kind", "expressroute")
                .replace("$__rate_interval", "2m")
                .replace("$__range", "1h");
            let result = prom.query(&expr);
            let title = panel["title"].as_str().unwrap();
            if [
                "RTT p50 and p99: ExpressRoute against VPN",
                "RTT heatmap: $kind",
                "Loss %",
            ]
            .contains(&title)
            {
                assert!(!result.is_empty(), "{title}: {expr} gives no series");
            }
            ran += 1;
        }
    }
    assert!(ran >= 10, "{ran} queries");
    let provisioning = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/grafana/provisioning/dashboards/pathprobe.yaml"
    );
    assert!(
        std::fs::read_to_string(provisioning)
            .unwrap()
            .contains("apiVersion: 1")
    );
}

/// What `/metrics` shows once the receiver is back: the tries kept to the back-off, and
/// nothing dropped.
fn after_the_outage(m: &str, stopped: Instant) {
    // The tries through the outage kept to the back-off (0.5, 1, 2, 4, then every 8 s),
    // however many batches were queued meanwhile.
    let tries: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("pathprobe_collector_remote_write_failed_tries_total "))
        .unwrap()
        .parse()
        .unwrap();
    let most = 5.0 + stopped.elapsed().as_secs_f64() / 8.0 + 1.0;
    assert!(
        tries >= 1.0 && tries <= most,
        "{tries} tries in {:?} (at most {most})",
        stopped.elapsed()
    );
    for reason in ["rejected", "queue_full", "unreadable"] {
        assert!(
            m.contains(&format!(
                "pathprobe_collector_remote_write_dropped_total{{reason=\"{reason}\"}} 0"
            )),
            "nothing dropped: {m}"
        );
    }
}

#[test]
fn remote_write_and_scrape_agree_with_compare_within_the_bound_and_survive_outages() {
    let Some(bin) = prometheus_binary() else {
        return;
    };
    let d = dir("prometheus");
    let port = free_port();
    let write_url = format!("http://127.0.0.1:{port}/api/v1/write");
    let flags = [
        "--max-body",
        "10000000",
        "--remote-write",
        &write_url,
        "--remote-write-label",
        "source=rw",
    ];
    let mut s = Server::start_with(&d, &flags);
    let mut prom = Prometheus::new(bin, &d.join("prom"), port, s.addr);

    // 20 windows per path, the last ending 100 s ago; 4 more follow during the outage.
    let start = now_ns() - 30 * W;
    let first = windows(1, 20, start);
    ingest(&s, &first);
    let total_windows = 20.0;
    let rw =
        |name: &str, path: &str| format!("{name}{{source=\"rw\",site=\"ams\",path=\"{path}\"}}");
    prom.wait_for(
        &format!(
            "count_over_time({}[1h])",
            rw("pathprobe_probes_sent_total", "er")
        ),
        total_windows,
        Duration::from_mins(1),
    );

    check_figures(&s, &prom, &first, start);
    grafana_queries_run(&prom);
    // The scrape reached it as native histograms (protobuf), with the collector's own
    // figures beside them.
    assert!(prom.value("pathprobe_collector_reports_ingested_total{job=\"pathprobe\"}") >= 60.0);

    // A restart of the collector: the counters it shows are not lower than before.
    let (_, before) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    let sent = |text: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with("pathprobe_probes_sent_total{") && l.contains("path=\"er\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let sent_before = sent(&before);
    assert_eq!(sent_before, 20 * 201);
    s.kill9();
    let addr_before = s.addr;
    drop(s);
    let s = Server::start_with(&d, &flags);
    let (_, after) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    assert_eq!(
        sent(&after),
        sent_before,
        "a restart keeps the counters: {after}"
    );
    assert_ne!(addr_before, s.addr);

    // The receiver away for a minute: every window stored meanwhile arrives once.
    prom.stop();
    let stopped = Instant::now();
    let second = windows(1_000, 4, start + 20 * W);
    // In twelve batches: each wakes the sender, which must still keep to its back-off.
    for r in &second {
        ingest(&s, std::slice::from_ref(r));
    }
    let (_, m) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    assert!(
        m.lines().any(
            |l| l.starts_with("pathprobe_collector_remote_write_queue_requests ")
                && !l.ends_with(" 0")
        ),
        "the queue holds what the receiver has not taken: {m}"
    );
    std::thread::sleep(Duration::from_mins(1).saturating_sub(stopped.elapsed()));
    prom.start();
    prom.wait_for(
        &format!(
            "count_over_time({}[1h])",
            rw("pathprobe_probes_sent_total", "er")
        ),
        total_windows + 4.0,
        Duration::from_mins(1),
    );
    prom.wait_for(
        &rw("pathprobe_probes_sent_total", "er"),
        f64::from(24 * 201),
        Duration::from_secs(10),
    );
    let (_, m) = http(s.addr, "GET", "/metrics", Some(READER), b"");
    after_the_outage(&m, stopped);
}
