//! Pushing every stored window, once, to a metrics engine:
//!
//! - `--remote-write URL`: a Prometheus remote-write receiver (Prometheus, Mimir, Thanos,
//!   Azure Monitor's managed Prometheus), as the path's cumulative native histograms and
//!   counters at the window's end ([`crate::totals::Totals::write_series`]), a
//!   snappy-compressed `WriteRequest`;
//! - `--otlp URL`: an OTLP/HTTP receiver (an OpenTelemetry Collector, Azure Monitor), as
//!   the window's own exponential histograms and sums, delta temporality
//!   ([`crate::otlp`]).
//!
//! Requests go through a queue on disk (`--remote-write-queue DIR`, `--otlp-queue DIR`):
//! one file per stored batch (written aside and renamed in), named by a rising sequence
//! number, sent oldest first by one thread. So they arrive in order, through an outage of
//! the receiver and a restart of the collector.
//!
//! - 2xx: sent, the file is removed.
//! - No answer, 429, or a 5xx (remote write) or 502/503/504 (OTLP, as its specification
//!   says): retried after a back-off (half a second, doubling to [`MAX_BACKOFF`]).
//! - Any other refusal (say an out-of-order sample): dropped, counted and logged with the
//!   receiver's reason, and the queue goes on.
//! - The queue past its bound (`--remote-write-max-queue`, `--otlp-max-queue`): the oldest
//!   requests are dropped, counted and logged. A remote-write sample is cumulative, so a
//!   dropped one loses that time's resolution, not its counts (the next sample carries
//!   them); an OTLP request is a delta, so its windows are lost to that receiver.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use pathprobe_proto::client::{TlsClient, cleartext_beyond_loopback, explain};
use prost::Message as _;

use crate::promwire::write;
use crate::{Error, Result};

/// The longest wait between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// The first wait after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The default bound of the queue on disk.
pub const DEFAULT_MAX_QUEUE: u64 = 512 << 20;

/// What a receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Prometheus remote write 1.0.
    RemoteWrite,
    /// OTLP/HTTP, protobuf.
    Otlp,
}

impl Protocol {
    /// Its flag, for messages.
    pub const fn flag(self) -> &'static str {
        match self {
            Self::RemoteWrite => "--remote-write",
            Self::Otlp => "--otlp",
        }
    }

    /// Its name in log lines and in `/metrics`.
    const fn name(self) -> &'static str {
        match self {
            Self::RemoteWrite => "remote_write",
            Self::Otlp => "otlp",
        }
    }

    /// Whether an answer `status` (not 2xx) is worth a retry.
    const fn retries(self, status: u16) -> bool {
        match self {
            Self::RemoteWrite => status == 429 || status >= 500,
            Self::Otlp => matches!(status, 429 | 502 | 503 | 504),
        }
    }
}

/// Where and how to push.
#[derive(Debug, Clone)]
pub struct PushConfig {
    pub protocol: Protocol,
    /// The receiver: `https://`, or `http://` (beyond loopback only without credentials,
    /// which would cross in clear).
    pub url: String,
    /// A bearer token's file (mode 0600).
    pub bearer_file: Option<PathBuf>,
    /// Basic authentication: the user, and the password's file (mode 0600).
    pub basic: Option<(String, PathBuf)>,
    /// CA certificates (PEM) to check the receiver against, in place of the system's.
    pub ca_file: Option<PathBuf>,
    /// Labels added to every series (`region=westeurope`); OTLP resource attributes.
    pub labels: Vec<(String, String)>,
    /// The queue's directory.
    pub queue_dir: PathBuf,
    /// Most octets the queue holds.
    pub max_queue: u64,
}

/// Labels of the series themselves: an extra label may not take one.
const OWN_LABELS: [&str; 5] = ["__name__", "agent", "kind", "path", "site"];

/// Parses a `--remote-write-label NAME=VALUE`.
pub fn parse_label(s: &str) -> std::result::Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| {
        format!("--remote-write-label {s}: write it as NAME=VALUE, like region=westeurope")
    })?;
    let valid = name
        .chars()
        .enumerate()
        .all(|(i, c)| c == '_' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
    if name.is_empty() || !valid || name.starts_with("__") {
        return Err(format!(
            "--remote-write-label {s}: `{name}` is not a Prometheus label name (letters, digits and _, not starting with a digit or __)"
        ));
    }
    if OWN_LABELS.contains(&name) {
        return Err(format!(
            "--remote-write-label {s}: `{name}` is one of the series' own labels (agent, site, path, kind): choose another name"
        ));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Parses an `--otlp-attribute NAME=VALUE`.
pub fn parse_attribute(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() && !name.contains(char::is_whitespace) => {
            Ok((name.to_string(), value.to_string()))
        }
        _ => Err(format!(
            "--otlp-attribute {s}: write it as NAME=VALUE, like deployment.environment=prod"
        )),
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// `(sequence, octets)` of the files waiting, oldest first.
    files: VecDeque<(u64, u64)>,
    bytes: u64,
    next: u64,
}

/// Figures for `/metrics`.
#[derive(Debug, Default)]
struct Figures {
    sent: AtomicU64,
    failed_tries: AtomicU64,
    dropped_rejected: AtomicU64,
    dropped_full: AtomicU64,
    dropped_unreadable: AtomicU64,
    last_sent_ns: AtomicU64,
}

/// The queue and its sender.
#[derive(Debug)]
pub struct Push {
    cfg: PushConfig,
    auth: Option<String>,
    http: ureq::Agent,
    queue: Mutex<Queue>,
    wake: Condvar,
    figures: Figures,
    stop: AtomicBool,
}

fn read_secret(path: &Path, what: &str) -> Result<String> {
    let s =
        pathprobe_proto::secrets::read_trimmed(path, what, "check the path and its permissions")
            .map_err(Error::Config)?;
    if s.is_empty() {
        return Err(Error::Config(format!(
            "{what} {} is empty: put the secret in it",
            path.display()
        )));
    }
    Ok(s)
}

fn file_of(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.rw"))
}

impl Push {
    /// Checks the settings and the secrets' files, and reads back the queue left on disk.
    pub fn open(cfg: PushConfig) -> Result<Arc<Self>> {
        let flag = cfg.protocol.flag();
        let uri: ureq::http::Uri = cfg.url.parse().map_err(|e| {
            Error::Config(format!(
                "{flag} {} is not a URL ({e}): write it like {}",
                cfg.url,
                example(cfg.protocol)
            ))
        })?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if !cleartext_beyond_loopback(&cfg.url) => {}
            Some("http") if cfg.bearer_file.is_none() && cfg.basic.is_none() => {}
            Some("http") => {
                return Err(Error::Config(format!(
                    "{flag} {} would send its credentials in clear beyond this host: use https://",
                    cfg.url
                )));
            }
            _ => {
                return Err(Error::Config(format!(
                    "{flag} {}: write it like {}",
                    cfg.url,
                    example(cfg.protocol)
                )));
            }
        }
        let auth = match (&cfg.bearer_file, &cfg.basic) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(format!(
                    "{flag}-bearer-file and {flag}-user go apart: give one way to sign in"
                )));
            }
            (Some(f), None) => Some(format!(
                "Bearer {}",
                read_secret(f, &format!("{flag}-bearer-file"))?
            )),
            (None, Some((user, f))) => {
                use base64::Engine as _;
                let pass = read_secret(f, &format!("{flag}-password-file"))?;
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
                ))
            }
            (None, None) => None,
        };
        let tls = TlsClient {
            ca_file: cfg.ca_file.clone(),
            ..TlsClient::default()
        };
        let http = tls.agent(&cfg.url, TIMEOUT).map_err(Error::Config)?;
        let queue = Self::recover(&cfg.queue_dir, flag)?;
        if !queue.files.is_empty() {
            tracing::info!(
                to = flag,
                requests = queue.files.len(),
                octets = queue.bytes,
                dir = %cfg.queue_dir.display(),
                "the push resumes its queue"
            );
        }
        Ok(Arc::new(Self {
            cfg,
            auth,
            http,
            queue: Mutex::new(queue),
            wake: Condvar::new(),
            figures: Figures::default(),
            stop: AtomicBool::new(false),
        }))
    }

    /// The queue's files, oldest first; a file cut short by a crash (never renamed in)
    /// is removed.
    fn recover(dir: &Path, flag: &str) -> Result<Queue> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Config(format!(
                "cannot create the queue {} of {flag}: {e}; give {flag}-queue a directory the collector may write",
                dir.display()
            ))
        })?;
        let mut q = Queue::default();
        let entries = std::fs::read_dir(dir).map_err(|e| {
            Error::Config(format!(
                "cannot read the queue {} of {flag}: {e}",
                dir.display()
            ))
        })?;
        let mut files = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if let Some(seq) = name.strip_suffix(".rw").and_then(|s| s.parse::<u64>().ok()) {
                let len = entry.metadata().map_or(0, |m| m.len());
                files.push((seq, len));
            }
        }
        files.sort_unstable();
        q.next = files.last().map_or(0, |f| f.0 + 1);
        q.bytes = files.iter().map(|f| f.1).sum();
        q.files = files.into();
        Ok(q)
    }

    /// The labels added to every series.
    pub fn extra_labels(&self) -> &[(String, String)] {
        &self.cfg.labels
    }

    /// Queues `series` as one remote-write request (snappy-compressed).
    pub fn enqueue_series(&self, series: Vec<write::TimeSeries>) {
        let body = write::WriteRequest {
            timeseries: series,
            metadata: crate::totals::metadata(),
        }
        .encode_to_vec();
        match snap::raw::Encoder::new().compress_vec(&body) {
            Ok(c) => self.enqueue(&c),
            Err(e) => {
                tracing::error!(error = %e, "remote write: cannot compress a request; it is dropped");
                self.figures
                    .dropped_unreadable
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues `body` as one request, after every request queued before it. Remote write
    /// calls it with the totals held, so that each path's samples are queued in the order
    /// of their times.
    pub fn enqueue(&self, body: &[u8]) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = q.next;
        q.next += 1;
        let (tmp, path) = (
            self.cfg.queue_dir.join(format!("{seq:020}.tmp")),
            file_of(&self.cfg.queue_dir, seq),
        );
        if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::error!(error = %e, to = self.cfg.protocol.flag(), dir = %self.cfg.queue_dir.display(), "cannot queue a request (disk full?); it is dropped");
            let _ = std::fs::remove_file(&tmp);
            self.figures.dropped_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let len = body.len() as u64;
        q.files.push_back((seq, len));
        q.bytes += len;
        let mut dropped = 0_u64;
        while q.bytes > self.cfg.max_queue && q.files.len() > 1 {
            if let Some((old, n)) = q.files.pop_front() {
                let _ = std::fs::remove_file(file_of(&self.cfg.queue_dir, old));
                q.bytes -= n;
                dropped += 1;
            }
        }
        drop(q);
        if dropped > 0 {
            self.figures
                .dropped_full
                .fetch_add(dropped, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                to = self.cfg.protocol.flag(),
                max = self.cfg.max_queue,
                "the queue is full; its oldest requests are dropped (the receiver is away)"
            );
        }
        self.wake.notify_one();
    }

    /// Sends the queue, oldest first, until [`Push::stop`].
    pub fn run(&self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let next = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Some(&f) = q.files.front() {
                        break f;
                    }
                    q = self
                        .wake
                        .wait_timeout(q, Duration::from_secs(1))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            };
            match self.send(next.0) {
                Sent::Done | Sent::Dropped => {
                    backoff = FIRST_BACKOFF;
                    self.remove(next);
                }
                Sent::Retry => {
                    self.figures.failed_tries.fetch_add(1, Ordering::Relaxed);
                    // The whole back-off: requests queued meanwhile (which wake this
                    // thread) must not turn it into a retry per ingested batch.
                    let until = std::time::Instant::now() + backoff;
                    let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    while !self.stop.load(Ordering::Relaxed) {
                        let left = until.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        q = self
                            .wake
                            .wait_timeout(q, left)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    drop(q);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Ends [`Push::run`] (the queue stays on disk).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify_all();
    }

    fn remove(&self, (seq, len): (u64, u64)) {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        // The queue may have dropped it meanwhile.
        if q.files.front() == Some(&(seq, len)) {
            q.files.pop_front();
            q.bytes -= len;
        }
        let _ = std::fs::remove_file(file_of(&self.cfg.queue_dir, seq));
    }

    fn send(&self, seq: u64) -> Sent {
        let body = match std::fs::read(file_of(&self.cfg.queue_dir, seq)) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, seq, to = self.cfg.protocol.flag(), "a queued request cannot be read; it is dropped");
                self.figures
                    .dropped_unreadable
                    .fetch_add(1, Ordering::Relaxed);
                return Sent::Dropped;
            }
        };
        let mut req = self
            .http
            .post(&self.cfg.url)
            .header("Content-Type", "application/x-protobuf");
        if self.cfg.protocol == Protocol::RemoteWrite {
            req = req
                .header("Content-Encoding", "snappy")
                .header("X-Prometheus-Remote-Write-Version", "0.1.0");
        }
        req = req.header(
            "User-Agent",
            concat!("pathprobe-collector/", env!("CARGO_PKG_VERSION")),
        );
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let resp = match req.send(&body[..]) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(
                    to = self.cfg.protocol.flag(),
                    "{}; retrying",
                    explain(&e, &self.cfg.url)
                );
                return Sent::Retry;
            }
        };
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            self.figures.sent.fetch_add(1, Ordering::Relaxed);
            self.figures
                .last_sent_ns
                .store(crate::now_ns(), Ordering::Relaxed);
            return Sent::Done;
        }
        let said: String = resp
            .into_body()
            .read_to_string()
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        if self.cfg.protocol.retries(status) {
            tracing::warn!(
                status,
                said = said.trim(),
                to = self.cfg.protocol.flag(),
                "the receiver is busy or failing; retrying"
            );
            Sent::Retry
        } else {
            tracing::error!(status, said = said.trim(), url = %self.cfg.url, "the receiver refused a request; it is dropped");
            self.figures
                .dropped_rejected
                .fetch_add(1, Ordering::Relaxed);
            Sent::Dropped
        }
    }

    /// Requests waiting.
    pub fn depth(&self) -> usize {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .files
            .len()
    }

    /// Its figures for `/metrics`.
    pub fn exposition(&self, out: &mut String) {
        let f = &self.figures;
        let (depth, bytes) = {
            let q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            (q.files.len() as u64, q.bytes)
        };
        let p = self.cfg.protocol.name();
        for (what, kind, help, value) in [
            (
                "requests_sent_total",
                "counter",
                "Requests the receiver accepted.",
                f.sent.load(Ordering::Relaxed),
            ),
            (
                "failed_tries_total",
                "counter",
                "Tries that failed and were retried (no answer, 429 or 5xx).",
                f.failed_tries.load(Ordering::Relaxed),
            ),
            (
                "queue_requests",
                "gauge",
                "Requests waiting in the queue on disk.",
                depth,
            ),
            (
                "queue_bytes",
                "gauge",
                "Octets the queue holds (at most its --...-max-queue).",
                bytes,
            ),
            (
                "last_sent_seconds",
                "gauge",
                "When the receiver last accepted a request (seconds since 1970; 0 for never).",
                f.last_sent_ns.load(Ordering::Relaxed) / 1_000_000_000,
            ),
        ] {
            let name = format!("pathprobe_collector_{p}_{what}");
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let name = format!("pathprobe_collector_{p}_dropped_total");
        let _ = writeln!(
            out,
            "# HELP {name} Requests dropped, by reason (rejected: a 4xx from the receiver; queue_full; unreadable).\n# TYPE {name} counter"
        );
        for (reason, n) in [
            ("rejected", &f.dropped_rejected),
            ("queue_full", &f.dropped_full),
            ("unreadable", &f.dropped_unreadable),
        ] {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

/// A URL to show in a message.
const fn example(p: Protocol) -> &'static str {
    match p {
        Protocol::RemoteWrite => "https://prometheus.example.net/api/v1/write",
        Protocol::Otlp => "https://otel-collector.example.net:4318/v1/metrics",
    }
}

enum Sent {
    Done,
    Dropped,
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_labels_are_checked() {
        assert_eq!(
            parse_label("region=westeurope").unwrap(),
            ("region".to_string(), "westeurope".to_string())
        );
        assert!(parse_label("region").unwrap_err().contains("NAME=VALUE"));
        assert!(
            parse_label("9x=1")
                .unwrap_err()
                .contains("not a Prometheus label name")
        );
        assert!(
            parse_label("__name__=x")
                .unwrap_err()
                .contains("label name")
        );
        assert!(parse_label("site=x").unwrap_err().contains("own labels"));
    }

    fn cfg(dir: &Path, max_queue: u64) -> PushConfig {
        PushConfig {
            protocol: Protocol::RemoteWrite,
            url: "http://127.0.0.1:9/api/v1/write".to_string(),
            bearer_file: None,
            basic: None,
            ca_file: None,
            labels: Vec::new(),
            queue_dir: dir.to_path_buf(),
            max_queue,
        }
    }

    fn series(n: usize) -> Vec<write::TimeSeries> {
        vec![
            write::TimeSeries {
                labels: vec![write::Label {
                    name: "__name__".into(),
                    value: "x".repeat(n),
                }],
                ..write::TimeSeries::default()
            };
            1
        ]
    }

    #[test]
    fn the_queue_survives_a_restart_in_order_and_drops_its_oldest_when_full() {
        let dir = std::env::temp_dir().join(format!("pathprobe-rwq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rw = Push::open(cfg(&dir, u64::MAX)).unwrap();
        for n in 1..=3 {
            rw.enqueue_series(series(n));
        }
        std::fs::write(dir.join("00000000000000000009.tmp"), b"cut short").unwrap();
        drop(rw);
        let rw = Push::open(cfg(&dir, u64::MAX)).unwrap();
        let q = rw.queue.lock().unwrap();
        assert_eq!(
            q.files.iter().map(|f| f.0).collect::<Vec<_>>(),
            [0, 1, 2],
            "in order, and the file cut short is gone"
        );
        assert!(!dir.join("00000000000000000009.tmp").exists());
        assert_eq!(q.next, 3);
        drop(q);
        drop(rw);
        // A bound of one request's size keeps only the newest.
        let rw = Push::open(cfg(&dir, 1)).unwrap();
        rw.enqueue_series(series(4));
        assert_eq!(rw.depth(), 1);
        assert_eq!(rw.figures.dropped_full.load(Ordering::Relaxed), 3);
        let mut text = String::new();
        rw.exposition(&mut text);
        assert!(
            text.contains(
                "pathprobe_collector_remote_write_dropped_total{reason=\"queue_full\"} 3"
            ),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
