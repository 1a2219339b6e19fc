//! What the collector's process tests share: a collector started as `serve` (with agent
//! and reader tokens), a plain HTTP/1.1 exchange, and window reports to send it.

#![allow(dead_code, reason = "each test binary uses its own share of these")]
#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::{
    ClockState, Counters, PathInfo, PathKind, ProbeProtocol, ReportId, TimestampSource,
    Timestamping, Window, WindowReport,
};

pub const COLLECTOR: &str = env!("CARGO_BIN_EXE_pathprobe-collector");
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef";
pub const OTHER_TOKEN: &str = "fedcba9876543210fedcba9876543210";
/// A reader's: queries and `/metrics` take it.
pub const READER: &str = "reader-0123456789abcdef01234567";
pub const T0: u64 = 1_795_680_000_000_000_000;
pub const W: u64 = 10_000_000_000;

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &["--max-body", "1000000"])
    }

    /// A collector with these extra `serve` flags. Fixtures are dated November 2026, so
    /// the horizon of what it keeps reaches back far enough for them.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        let tokens = dir.join("tokens");
        write_secret(
            &tokens,
            &format!("# agent token\nams-01 {TOKEN}\nfra-01 {OTHER_TOKEN}\nreader noc {READER}\n"),
        );
        let mut child = Command::new(COLLECTOR)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .args(
                (!extra.contains(&"--max-report-age"))
                    .then_some(["--max-report-age", "36500d"])
                    .into_iter()
                    .flatten(),
            )
            .arg("--db")
            .arg(dir.join("store.db"))
            .arg("--tokens")
            .arg(&tokens)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().unwrap().unwrap();
            if let Some(a) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("listen="))
            {
                break a.parse().unwrap();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, addr }
    }

    /// The collector's peak resident memory (`VmHWM`), in octets.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    pub fn kill9(&mut self) {
        // SIGKILL: no chance to flush or shut down cleanly.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a secret the way an operator must: readable by its owner only.
pub fn write_secret(path: &Path, text: &str) {
    pathprobe_tests::pki::write(path, text, true);
}

pub fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pathprobe-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A minimal HTTP/1.1 exchange: returns (status, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    // A server killed mid-burst refuses or resets: status 0.
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    if s.write_all(head.as_bytes()).is_err() {
        return (0, String::new());
    }
    // The server may answer (413) and close before it has read all of a large body.
    for chunk in body.chunks(1 << 16) {
        if s.write_all(chunk).is_err() {
            break;
        }
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn report(
    id: u32,
    agent: &str,
    name: &str,
    kind: PathKind,
    start: u64,
    rtts: &[u64],
) -> WindowReport {
    let mut rtt = Metric::Rtt.new_histogram();
    for &r in rtts {
        rtt.record(r).unwrap();
    }
    let mut rid = [0u8; 16];
    rid[..4].copy_from_slice(&id.to_be_bytes());
    rid[4] = kind as u8;
    WindowReport {
        report_id: ReportId(rid),
        agent_id: agent.into(),
        site: Some("ams".into()),
        path: PathInfo {
            name: name.into(),
            kind,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.1.0.4:862".parse().unwrap(),
            protocol: ProbeProtocol::Stamp,
            dscp: 46,
            packet_size: 44,
        },
        window: Window {
            start_unix_ns: start,
            end_unix_ns: start + W,
        },
        timestamping: Timestamping {
            rx: TimestampSource::Kernel,
            tx: TimestampSource::Kernel,
        },
        owd_clock: ClockState::Unavailable,
        counters: Counters {
            sent: rtts.len() as u64 + 1,
            received: rtts.len() as u64,
            lost: 1,
            rtt_sum_ns: rtts.iter().map(|&r| u128::from(r)).sum(),
            ..Counters::default()
        },
        histograms: [(Metric::Rtt, rtt)].into(),
        signature: None,
        events: Vec::new(),
        plan_version: None,
    }
}

pub fn batch(reports: &[WindowReport]) -> Vec<u8> {
    let parts: Vec<String> = reports
        .iter()
        .map(|r| String::from_utf8(r.to_json().unwrap()).unwrap())
        .collect();
    format!("[{}]", parts.join(",")).into_bytes()
}

/// `compare`'s exact RTT p99 of `kind` at site ams over `[from_ns, to_ns]` (whole seconds
/// around it), in seconds: what an export's quantiles are held to.
pub fn exact_p99(addr: SocketAddr, kind: &str, from_ns: u64, to_ns: u64) -> f64 {
    let (status, body) = http(
        addr,
        "GET",
        &format!(
            "/v1/compare?a={kind}&b=vpn&site=ams&from={}&to={}",
            from_ns / 1_000_000_000,
            to_ns / 1_000_000_000 + 1
        ),
        Some(READER),
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let row = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["figure"] == "RTT p99 µs")
        .unwrap()
        .clone();
    row["a"].as_f64().unwrap() / 1e6
}
