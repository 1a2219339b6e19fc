//! Window reports on their way to the collector: every report is written to a bounded
//! on-disk queue first, then delivered in order; it leaves the queue only when the collector
//! has acknowledged it (stored durably). Since each report carries its id, a delivery whose
//! acknowledgement was lost is retried and the collector ignores the copy: in order, none
//! lost, none counted twice.
//!
//! What can go wrong, and what happens:
//! - **The spool cannot be written at start** (permissions, a read-only or pseudo file
//!   system): [`Spool::open`] fails with the directory and the fix, and the agent exits.
//! - **A write fails later** (disk full, permissions changed): the report is held in memory,
//!   behind the files already queued and in order with them, up to [`MAX_HELD`] reports;
//!   every failed write is counted ([`Spool::write_errors`]) and the caller logs it. Each
//!   later push tries the disk again first. Held reports are delivered too, so a read-only
//!   disk does not stop delivery. What must be dropped is counted ([`Spool::dropped`]).
//! - **A spooled file is not one valid report** (empty, truncated, oversized, or a report
//!   with more after it): it is set aside in `rejected/` before it joins a batch, under a
//!   name that never overwrites another, with the reason in a `.reason` file beside it.
//! - **The collector refuses one report** (its answer names the report by index): that
//!   report is set aside likewise, and the rest go on.
//! - **A batch is too large for the collector**: the batch is halved until it fits; a single
//!   report that never fits is set aside.
//! - **The collector refuses every batch** (a wrong token): [`Step::Refused`], never called
//!   "unreachable"; reports stay queued.

use std::collections::VecDeque;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use pathprobe_proto::ingest::Accepted;
use pathprobe_proto::report::EncodedReport;

use super::upload::{Delivery, Uploader};
use crate::{Error, Result};

/// Reports per request.
pub const BATCH: usize = 100;

/// Most reports held in memory while the spool cannot be written: at one report per path
/// every 10 s, almost three hours of ten paths.
pub const MAX_HELD: usize = 10_000;

/// Largest spooled file taken as a report: far above any real one (seven dense histograms
/// of a few hundred KiB), far below what a collector takes in a request.
pub const MAX_REPORT_OCTETS: u64 = 4 << 20;

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// A queued report: a file on disk, or held in memory while the disk refused it.
#[derive(Debug)]
enum Entry {
    File(PathBuf),
    Held(Vec<u8>),
}

/// A report ready to send, read and checked.
#[derive(Debug, Clone)]
pub struct Queued {
    pub body: Vec<u8>,
    /// Where it waits, for messages.
    pub origin: String,
}

/// The on-disk queue: one file per report, named by a sequence number, then what is held
/// in memory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max: usize,
    next: u64,
    queued: VecDeque<Entry>,
    /// Reports in `queued` that are held in memory (always at its end).
    held: usize,
    /// Reports currently sent per batch (halved when the collector says too large).
    batch: usize,
    /// Reports dropped (oldest first) because the queue or the memory hold was full.
    pub dropped: u64,
    /// Writes to the spool that failed.
    pub write_errors: u64,
    /// Reports set aside in `rejected/`.
    pub rejected: u64,
}

impl Spool {
    /// Opens the queue in `dir` (created if needed), keeping what an earlier run left, and
    /// checks that it can be written: a spool that cannot is refused now, not found out
    /// when the first window is lost.
    pub fn open(dir: &Path, max: usize) -> Result<Self> {
        let unwritable = |e: std::io::Error| Error::Spool {
            dir: dir.to_owned(),
            source: e,
        };
        fs::create_dir_all(dir.join("rejected")).map_err(unwritable)?;
        let probe = dir.join(format!(".write-check-{}", std::process::id()));
        fs::File::create(&probe)
            .and_then(|mut f| f.write_all(b"ok").and_then(|()| f.sync_all()))
            .and_then(|()| fs::remove_file(&probe))
            .map_err(unwritable)?;
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
            queued: queued.into_iter().map(|(_, p)| Entry::File(p)).collect(),
            held: 0,
            batch: BATCH,
            dropped: 0,
            write_errors: 0,
            rejected: 0,
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

    /// Reports held in memory because the spool could not be written.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_file(&mut self, report_json: &[u8]) -> std::io::Result<PathBuf> {
        let name = self.dir.join(format!("{:020}.json", self.next));
        let tmp = self.dir.join(format!("{:020}.tmp", self.next));
        let written = fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(report_json)?;
            f.sync_all()
        });
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &name)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.next += 1;
        Ok(name)
    }

    /// Writes what is held in memory to disk, oldest first, until a write fails.
    fn persist_held(&mut self) -> std::io::Result<()> {
        while self.held > 0 {
            let at = self.queued.len() - self.held;
            let Some(Entry::Held(bytes)) = self.queued.get(at) else {
                break;
            };
            let bytes = bytes.clone();
            let name = self.write_file(&bytes)?;
            self.queued[at] = Entry::File(name);
            self.held -= 1;
        }
        Ok(())
    }

    /// Appends a report: durably (written, synced, then renamed into place) when the disk
    /// takes it; else held in memory, in order, and the write error is returned for the
    /// caller to log (counted in `write_errors`). The report is queued either way. When the
    /// queue is full the oldest report is dropped and counted.
    pub fn push(&mut self, report_json: &[u8]) -> Result<()> {
        self.queued.push_back(Entry::Held(report_json.to_vec()));
        self.held += 1;
        let persisted = self.persist_held();
        while self.queued.len() > self.max || self.held > MAX_HELD {
            let oldest_held = self.queued.len() - self.held;
            let victim = if self.queued.len() > self.max {
                0
            } else {
                oldest_held
            };
            if let Some(Entry::File(p)) = self.queued.remove(victim) {
                let _ = fs::remove_file(p);
            } else {
                self.held -= 1;
            }
            self.dropped += 1;
        }
        persisted.map_err(|source| {
            self.write_errors += 1;
            Error::Io {
                what: format!(
                    "write a report to the spool {} ({} held in memory until it can)",
                    self.dir.display(),
                    self.held
                ),
                source,
            }
        })
    }

    /// Tries the disk again for what is held in memory.
    pub fn retry_writes(&mut self) -> Result<()> {
        self.persist_held().map_err(|source| {
            self.write_errors += 1;
            Error::Io {
                what: format!("write held reports to the spool {}", self.dir.display()),
                source,
            }
        })
    }

    /// The oldest `n` reports, read and checked; a file that is not one valid report is set
    /// aside in `rejected/` (with the reason) and skipped.
    pub fn front(&mut self, n: usize) -> Vec<Queued> {
        let mut out = Vec::with_capacity(n.min(self.queued.len()));
        let mut i = 0;
        while out.len() < n && i < self.queued.len() {
            let checked = match &self.queued[i] {
                Entry::Held(bytes) => Ok(Queued {
                    body: bytes.clone(),
                    origin: "a report held in memory".to_string(),
                }),
                Entry::File(p) => read_report(p).map(|body| Queued {
                    body,
                    origin: p.display().to_string(),
                }),
            };
            match checked {
                Ok(q) => {
                    out.push(q);
                    i += 1;
                }
                Err(reason) => self.reject(i, &reason),
            }
        }
        out
    }

    /// Removes the oldest `n` (delivered) reports.
    pub fn pop(&mut self, n: usize) {
        for _ in 0..n {
            match self.queued.pop_front() {
                Some(Entry::File(p)) => {
                    let _ = fs::remove_file(p);
                }
                Some(Entry::Held(_)) => self.held -= 1,
                None => break,
            }
        }
    }

    /// Moves the `i`th oldest report to `rejected/`, out of the queue, under a name no other
    /// rejected file has, with `reason` in a `.reason` file beside it.
    pub fn reject(&mut self, i: usize, reason: &str) {
        let Some(entry) = self.queued.remove(i) else {
            return;
        };
        self.rejected += 1;
        let stem = match &entry {
            Entry::File(p) => p
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("report")
                .to_string(),
            Entry::Held(_) => {
                self.held -= 1;
                "held".to_string()
            }
        };
        let to = self.rejected_name(&stem);
        let moved = match &entry {
            Entry::File(p) => fs::rename(p, &to),
            Entry::Held(bytes) => fs::write(&to, bytes),
        };
        let note = to.with_extension("reason");
        match moved.and_then(|()| fs::write(&note, format!("{reason}\n"))) {
            Ok(()) => {
                tracing::error!(file = %to.display(), reason, "report set aside in rejected/");
            }
            Err(e) => {
                tracing::error!(reason, error = %e, "a refused report could not be set aside in rejected/ and is dropped");
                if let Entry::File(p) = entry {
                    let _ = fs::remove_file(p);
                }
            }
        }
    }

    /// `rejected/TIME-STEM.json`, with `-N` added until no file has the name: spool file
    /// names restart at 0 when the queue is empty, so the name alone is not unique.
    fn rejected_name(&self, stem: &str) -> PathBuf {
        let now = crate::sys::realtime_ns();
        let dir = self.dir.join("rejected");
        let mut candidate = dir.join(format!("{now:020}-{stem}.json"));
        let mut n = 1;
        while candidate.exists() || candidate.with_extension("reason").exists() {
            candidate = dir.join(format!("{now:020}-{stem}-{n}.json"));
            n += 1;
        }
        candidate
    }

    /// One delivery attempt of the oldest batch: delivered reports leave the queue,
    /// refused ones are set aside, a batch too large is halved. What happened, for the
    /// caller's log and back-off.
    pub fn deliver_once(&mut self, uploader: &Uploader) -> Step {
        let batch = self.front(self.batch);
        if batch.is_empty() {
            return Step::Idle;
        }
        match uploader.deliver(&batch) {
            Delivery::Delivered(a) => {
                self.pop(batch.len());
                self.batch = BATCH;
                Step::Delivered(a, batch.len())
            }
            Delivery::Rejected { index, message } => {
                let origin = batch
                    .get(index)
                    .map_or_else(String::new, |q| q.origin.clone());
                self.reject(index, &message);
                Step::Rejected { origin, message }
            }
            Delivery::TooLarge(message) if batch.len() > 1 => {
                self.batch = (batch.len() / 2).max(1);
                Step::Halved {
                    now: self.batch,
                    message,
                }
            }
            Delivery::TooLarge(message) => {
                let origin = batch[0].origin.clone();
                self.reject(0, &message);
                Step::Rejected { origin, message }
            }
            Delivery::Refused(m) => Step::Refused(m),
            Delivery::Unreachable(m) => Step::Unreachable(m),
        }
    }
}

/// What [`Spool::deliver_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing was queued.
    Idle,
    /// A batch of this many was stored.
    Delivered(Accepted, usize),
    /// One report was refused and set aside; the rest wait.
    Rejected { origin: String, message: String },
    /// The collector found the batch too large: now this many per batch; try again now.
    Halved { now: usize, message: String },
    /// The collector answered but takes nothing now (busy, a store error, a wrong token);
    /// try again later.
    Refused(String),
    /// No answer from the collector; try again later.
    Unreachable(String),
}

/// Reads a spooled file and checks that it is exactly one valid report.
fn read_report(p: &Path) -> std::result::Result<Vec<u8>, String> {
    let len = fs::metadata(p)
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?
        .len();
    if len > MAX_REPORT_OCTETS {
        return Err(format!(
            "{} has {len} octets, more than any report ({MAX_REPORT_OCTETS})",
            p.display()
        ));
    }
    let body = fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    EncodedReport::from_json(&body)
        .map_err(|e| format!("{} is not one valid report: {e}", p.display()))?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pathprobe-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn contents(s: &mut Spool) -> Vec<String> {
        s.queued
            .iter()
            .map(|e| match e {
                Entry::File(p) => fs::read_to_string(p).unwrap(),
                Entry::Held(b) => String::from_utf8(b.clone()).unwrap(),
            })
            .collect()
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
        assert_eq!(contents(&mut s), ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_counts() {
        let d = dir("full");
        let mut s = Spool::open(&d, 2).unwrap();
        for i in 0..5 {
            s.push(format!("{i}").as_bytes()).unwrap();
        }
        assert_eq!((s.len(), s.dropped), (2, 3));
        assert_eq!(contents(&mut s), ["3", "4"]);
    }

    #[test]
    fn a_spool_that_cannot_be_written_is_refused_at_open() {
        // A file where the directory should be, and a pseudo file system.
        let d = dir("notadir");
        fs::write(&d, b"x").unwrap();
        let err = Spool::open(&d, 10).unwrap_err().to_string();
        assert!(err.contains("cannot be written"), "{err}");
        assert!(err.contains("spool_dir"), "{err}");
        let err = Spool::open(Path::new("/proc/spool"), 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/proc/spool"), "{err}");
    }

    /// The adversarial run: with the spool made unwritable mid-run, the uploader died and
    /// every window was lost. Now each report is held in memory, in order, and written
    /// when the disk takes writes again.
    #[test]
    fn reports_are_held_in_memory_while_the_spool_refuses_writes() {
        let d = dir("held");
        let mut s = Spool::open(&d, 100).unwrap();
        s.push(b"a").unwrap();
        // Writes fail: the directory is gone and a file stands in its place.
        fs::remove_dir_all(&d).unwrap();
        fs::write(&d, b"not a directory").unwrap();
        assert!(s.push(b"b").is_err());
        assert!(s.push(b"c").is_err());
        assert_eq!((s.len(), s.held(), s.write_errors), (3, 2, 2));
        assert_eq!(
            s.front(10).len(),
            2,
            "the file of `a` is gone with its directory"
        );
        fs::remove_file(&d).unwrap();
        fs::create_dir_all(d.join("rejected")).unwrap();
        s.retry_writes().unwrap();
        assert_eq!(s.held(), 0);
        assert!(s.queued.iter().all(|e| matches!(e, Entry::File(_))));
        assert_eq!(contents(&mut s), ["b", "c"]);
    }

    #[test]
    fn the_memory_hold_is_bounded_and_counts_what_it_drops() {
        let d = dir("heldmax");
        let mut s = Spool::open(&d, MAX_HELD * 2).unwrap();
        fs::remove_dir_all(&d).unwrap();
        fs::write(&d, b"x").unwrap();
        for i in 0..MAX_HELD + 5 {
            let _ = s.push(format!("{i}").as_bytes());
        }
        assert_eq!((s.held(), s.dropped), (MAX_HELD, 5));
        let _ = fs::remove_file(&d);
    }

    #[test]
    fn rejected_files_never_overwrite_each_other_and_carry_their_reason() {
        let d = dir("reject");
        for round in 0..2 {
            // Each round starts from an empty queue, so both files are named 0000…0.json.
            let mut s = Spool::open(&d, 10).unwrap();
            s.push(format!("{{\"round\":{round}}}").as_bytes()).unwrap();
            assert!(s.front(10).is_empty(), "not a report: set aside");
        }
        let mut names: Vec<_> = fs::read_dir(d.join("rejected"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        let json: Vec<_> = names
            .iter()
            .filter(|p| p.extension().unwrap() == "json")
            .collect();
        assert_eq!(json.len(), 2, "{names:?}");
        let bodies: Vec<_> = json
            .iter()
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        assert!(bodies.contains(&"{\"round\":0}".to_string()));
        assert!(bodies.contains(&"{\"round\":1}".to_string()));
        let reason = fs::read_to_string(json[0].with_extension("reason")).unwrap();
        assert!(reason.contains("not one valid report"), "{reason}");
    }

    /// A valid report's JSON.
    fn valid_report(id: u8) -> Vec<u8> {
        use pathprobe_proto::hist::Metric;
        use pathprobe_proto::report::{
            ClockState, Counters, PathInfo, PathKind, ProbeProtocol, ReportId, TimestampSource,
            Timestamping, Window, WindowReport,
        };
        let mut rtt = Metric::Rtt.new_histogram();
        rtt.record(1_000).unwrap();
        WindowReport {
            report_id: ReportId([id; 16]),
            agent_id: "a".into(),
            site: None,
            path: PathInfo {
                name: "er".into(),
                kind: PathKind::Expressroute,
                local: "127.0.0.1:1".parse().unwrap(),
                remote: "127.0.0.1:2".parse().unwrap(),
                protocol: ProbeProtocol::Stamp,
                dscp: 0,
                packet_size: 52,
            },
            window: Window {
                start_unix_ns: 1_000_000_000,
                end_unix_ns: 2_000_000_000,
            },
            timestamping: Timestamping {
                rx: TimestampSource::Kernel,
                tx: TimestampSource::Kernel,
            },
            owd_clock: ClockState::Unavailable,
            counters: Counters {
                sent: 1,
                received: 1,
                ..Counters::default()
            },
            histograms: [(Metric::Rtt, rtt)].into(),
            signature: None,
            events: Vec::new(),
            plan_version: None,
        }
        .to_json()
        .unwrap()
    }

    /// The adversarial run: a truncated, empty or 16 MB file at the head of the spool
    /// turned every batch into a 400 or 413, and a valid report followed by `,{}` shifted
    /// the index the collector named so that 13 valid reports went to rejected/. Now each
    /// file is checked alone before it joins a batch.
    #[test]
    fn files_that_are_not_one_report_are_set_aside_before_they_join_a_batch() {
        let d = dir("corrupt");
        let mut s = Spool::open(&d, 100).unwrap();
        let good = valid_report(1);
        let mut with_more = good.clone();
        with_more.extend_from_slice(b",{}");
        s.push(&[]).unwrap();
        s.push(&good[..good.len() / 2]).unwrap();
        s.push(&with_more).unwrap();
        s.push(&vec![b' '; 16 << 20]).unwrap();
        s.push(&good).unwrap();
        s.push(&valid_report(2)).unwrap();
        let batch = s.front(BATCH);
        assert_eq!(batch.len(), 2, "only the two valid reports are sent");
        assert_eq!(batch[0].body, good);
        assert_eq!(s.len(), 2);
        assert_eq!(s.rejected, 4);
        let reasons: Vec<String> = fs::read_dir(d.join("rejected"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "reason"))
            .map(|p| fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(reasons.len(), 4);
        assert!(
            reasons.iter().any(|r| r.contains("more than any report")),
            "{reasons:?}"
        );
        assert!(reasons.iter().all(|r| !r.is_empty()));
    }
}
