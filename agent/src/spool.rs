//! Window reports on their way to the collector: every report is written to a bounded
//! on-disk queue first, then delivered in order; it leaves the queue only when the collector
//! has acknowledged it (stored durably). A report the collector refuses as malformed is
//! moved aside to `rejected/` rather than blocking the queue. Since each report carries its
//! id, a delivery whose acknowledgement was lost is retried and the collector ignores the
//! copy: in order, none lost, none counted twice.

use std::collections::VecDeque;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

/// Reports per request.
pub const BATCH: usize = 100;

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// The on-disk queue: one file per report, named by a sequence number.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max: usize,
    next: u64,
    queued: VecDeque<PathBuf>,
    /// Reports dropped (oldest first) because the queue was full.
    pub dropped: u64,
}

impl Spool {
    /// Opens the queue in `dir` (created if needed), keeping what an earlier run left.
    pub fn open(dir: &Path, max: usize) -> Result<Self> {
        fs::create_dir_all(dir.join("rejected"))
            .map_err(io(format!("create the spool {}", dir.display())))?;
        let mut queued: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(io(format!("read the spool {}", dir.display())))?
            .filter_map(std::result::Result::ok)
            .filter_map(|e| {
                let p = e.path();
                let seq = p.file_stem()?.to_str()?.parse::<u64>().ok()?;
                (p.extension()? == "json").then_some((seq, p))
            })
            .collect();
        queued.sort();
        let next = queued.last().map_or(0, |(s, _)| s + 1);
        Ok(Self {
            dir: dir.to_owned(),
            max: max.max(1),
            next,
            queued: queued.into_iter().map(|(_, p)| p).collect(),
            dropped: 0,
        })
    }

    /// Reports waiting.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Appends a report durably (written, synced, then renamed into place). When the queue
    /// is full the oldest report is dropped and counted.
    pub fn push(&mut self, report_json: &[u8]) -> Result<()> {
        let name = self.dir.join(format!("{:020}.json", self.next));
        let tmp = self.dir.join(format!("{:020}.tmp", self.next));
        let mut f = fs::File::create(&tmp).map_err(io(format!("write {}", tmp.display())))?;
        f.write_all(report_json)
            .and_then(|()| f.sync_all())
            .map_err(io(format!("write {}", tmp.display())))?;
        fs::rename(&tmp, &name).map_err(io(format!("rename {}", tmp.display())))?;
        self.next += 1;
        self.queued.push_back(name);
        while self.queued.len() > self.max {
            if let Some(old) = self.queued.pop_front() {
                let _ = fs::remove_file(old);
                self.dropped += 1;
            }
        }
        Ok(())
    }

    /// The oldest `n` reports' files.
    pub fn front(&self, n: usize) -> Vec<PathBuf> {
        self.queued.iter().take(n).cloned().collect()
    }

    /// Removes the oldest `n` (delivered) reports.
    pub fn pop(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(p) = self.queued.pop_front() {
                let _ = fs::remove_file(p);
            }
        }
    }

    /// Moves the `i`th oldest report to `rejected/`, out of the queue.
    pub fn reject(&mut self, i: usize) {
        if let Some(p) = self.queued.remove(i) {
            let to = self
                .dir
                .join("rejected")
                .join(p.file_name().unwrap_or_default());
            let _ = fs::rename(&p, to);
        }
    }
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// All were stored.
    Delivered,
    /// The collector refused report `index` of the batch as malformed.
    Rejected { index: usize, message: String },
    /// Nothing was stored; try again later.
    Retry(String),
}

/// Delivers batches to a collector's `POST /v1/reports`.
#[derive(Debug)]
pub struct Uploader {
    url: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl Uploader {
    /// An uploader to the collector at `base_url` (e.g. `http://127.0.0.1:8862`).
    pub fn new(base_url: &str, token: Option<String>) -> Self {
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(15)))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            url: format!("{}/v1/reports", base_url.trim_end_matches('/')),
            token,
            http,
        }
    }

    /// Sends the reports in `files` as one batch.
    pub fn deliver(&self, files: &[PathBuf]) -> Delivery {
        let mut body = Vec::from(&b"["[..]);
        for (i, f) in files.iter().enumerate() {
            match fs::read(f) {
                Ok(r) => {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&r);
                }
                Err(e) => {
                    return Delivery::Rejected {
                        index: i,
                        message: format!("cannot read spooled {}: {e}", f.display()),
                    };
                }
            }
        }
        body.push(b']');
        let mut req = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = match req.send(&body[..]) {
            Ok(r) => r,
            Err(e) => return Delivery::Retry(e.to_string()),
        };
        let status = resp.status().as_u16();
        let text = resp.into_body().read_to_string().unwrap_or_default();
        match status {
            200 => Delivery::Delivered,
            400 => match refused_index(&text) {
                Some(index) if index < files.len() => Delivery::Rejected {
                    index,
                    message: text,
                },
                // Not about one report: nothing to set aside; keep it and retry later.
                _ => Delivery::Retry(format!("HTTP 400: {}", text.trim())),
            },
            _ => Delivery::Retry(format!("HTTP {status}: {}", text.trim())),
        }
    }
}

/// The report a 400 names: the collector answers `{"error": "report N: ..."}`.
fn refused_index(body: &str) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let rest = v.get("error")?.as_str()?.strip_prefix("report ")?;
    rest.split(':').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pathprobe-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_queue_keeps_order_across_a_restart() {
        let d = dir("order");
        {
            let mut s = Spool::open(&d, 10).unwrap();
            for i in 0..3 {
                s.push(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
            }
            s.pop(1);
        }
        let mut s = Spool::open(&d, 10).unwrap();
        assert_eq!(s.len(), 2);
        s.push(b"{\"n\":3}").unwrap();
        let contents: Vec<String> = s
            .front(10)
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(contents, ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let d = dir("full");
        let mut s = Spool::open(&d, 2).unwrap();
        for i in 0..5 {
            s.push(format!("{i}").as_bytes()).unwrap();
        }
        assert_eq!((s.len(), s.dropped), (2, 3));
        let contents: Vec<String> = s
            .front(10)
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(contents, ["3", "4"]);
    }

    #[test]
    fn a_rejected_report_is_moved_aside() {
        let d = dir("reject");
        let mut s = Spool::open(&d, 10).unwrap();
        s.push(b"a").unwrap();
        s.push(b"b").unwrap();
        s.reject(0);
        assert_eq!(s.len(), 1);
        assert_eq!(fs::read_dir(d.join("rejected")).unwrap().count(), 1);
    }

    #[test]
    fn only_an_error_naming_a_report_sets_one_aside() {
        assert_eq!(
            refused_index(r#"{"error":"report 3: report field `agent_id`: bad"}"#),
            Some(3)
        );
        assert_eq!(
            refused_index(r#"{"error":"the body is not a JSON array of window reports: x"}"#),
            None
        );
        assert_eq!(refused_index("not json"), None);
    }

    #[test]
    fn an_unreachable_collector_means_retry() {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir("unreachable");
        let mut s = Spool::open(&d, 10).unwrap();
        s.push(b"{}").unwrap();
        let u = Uploader::new(&format!("http://127.0.0.1:{port}"), None);
        assert!(matches!(u.deliver(&s.front(1)), Delivery::Retry(_)));
        assert_eq!(s.len(), 1);
    }
}
