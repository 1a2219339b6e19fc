//! Delivery: the one way every report reaches the collector, whichever part of the agent
//! made it (the daemon's paths and drills, `capacity`, `failover`, the demo).
//!
//! A report is written to the on-disk [`spool`] first, then sent in batches by the
//! [`upload`]er; the collector's typed answer decides what leaves the queue. A
//! [`Courier`] owns one spool and one uploader and does both, with the back-off and the
//! log lines, so the daemon's long-running uploader ([`run`]) and a command's last
//! delivery ([`Courier::drain`]) cannot drift apart.

pub mod spool;
pub mod upload;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use pathprobe_proto::client::{TlsClient, cleartext_beyond_loopback};
pub use spool::{Spool, Step};
pub use upload::{Delivery, Uploader};

use crate::{Error, Result};

/// Where reports go: the collector, the agent's token, and the spool they wait in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The collector's base URL (`http://HOST:PORT`).
    pub url: String,
    pub token: Option<String>,
    pub spool_dir: PathBuf,
    /// Most reports the spool keeps; past it the oldest are dropped and counted.
    pub spool_max: usize,
    /// For an `https://` collector.
    pub tls: TlsClient,
    /// Plain `http://` beyond loopback, allowed explicitly (`insecure_http = true`): warned
    /// about every hour.
    pub insecure_http: bool,
}

/// How often an agent that sends in clear beyond loopback says so.
const CLEARTEXT_WARNING: Duration = Duration::from_hours(1);

/// The agent's token: given inline, or read from `file` (trimmed). `what` names the
/// setting in the error, the way the user wrote it.
pub fn read_token(inline: Option<&str>, file: Option<&Path>, what: &str) -> Result<Option<String>> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(Error::Config(format!(
            "{what}: give the token or a token file, not both"
        ))),
        (Some(t), None) => Ok(Some(t.to_string())),
        (None, Some(f)) => {
            pathprobe_proto::secrets::check_mode(f, &format!("the collector token file ({what})"))
                .map_err(Error::Config)?;
            std::fs::read_to_string(f)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|source| Error::Io {
                what: format!(
                    "read the collector token file {} ({what}): put this agent's token from the collector's tokens file in it",
                    f.display()
                ),
                source,
            })
        }
        (None, None) => Ok(None),
    }
}

/// What a [`Courier::drain`] could not deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undelivered {
    /// Why the collector did not take them.
    pub why: String,
    /// Reports still waiting.
    pub left: usize,
    /// Where they wait.
    pub dir: PathBuf,
}

/// Longest wait between delivery attempts while the collector is away or refuses.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// First wait after a failed attempt; doubled after each further one.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// How often held reports are tried on the disk again.
const DISK_RETRY: Duration = Duration::from_secs(5);

/// One spool and one uploader: queues reports, delivers them in order, and logs what the
/// collector and the disk do.
#[derive(Debug)]
pub struct Courier {
    spool: Spool,
    uploader: Uploader,
    url: String,
    backoff: Duration,
    retry_at: Instant,
    disk_retry_at: Instant,
    reported_drops: u64,
}

impl Courier {
    /// Opens the spool (refusing one that cannot be written) and keeps what an earlier run
    /// left there, to deliver first.
    pub fn open(to: &Destination) -> Result<Self> {
        let spool = Spool::open(&to.spool_dir, to.spool_max)?;
        if !spool.is_empty() {
            tracing::info!(spooled = spool.len(), dir = %to.spool_dir.display(), "delivering reports left from an earlier run");
        }
        let now = Instant::now();
        Ok(Self {
            spool,
            uploader: Uploader::new(&to.url, to.token.clone(), &to.tls)?,
            url: to.url.clone(),
            backoff: FIRST_RETRY,
            retry_at: now,
            disk_retry_at: now,
            reported_drops: 0,
        })
    }

    /// Reports waiting (on disk and held in memory).
    pub fn waiting(&self) -> usize {
        self.spool.len()
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        self.spool.dir()
    }

    /// Queues one report (JSON): durably when the disk takes it, else held in memory
    /// until it does (logged and counted).
    pub fn push(&mut self, report: &[u8]) {
        let held = self.spool.held();
        let pushed = self.spool.push(report);
        if held > 0 && self.spool.held() == 0 {
            tracing::info!(written = held, dir = %self.spool.dir().display(), "the spool takes writes again: held reports written");
        }
        if let Err(e) = pushed {
            tracing::error!(
                error = %e,
                write_errors = self.spool.write_errors,
                held = self.spool.held(),
                "cannot write to the spool: reports are held in memory until it can be written"
            );
        }
        self.report_drops();
    }

    fn report_drops(&mut self) {
        if self.spool.dropped > self.reported_drops {
            tracing::error!(
                dropped = self.spool.dropped,
                held = self.spool.held(),
                "spool full: oldest reports dropped"
            );
            self.reported_drops = self.spool.dropped;
        }
    }

    /// How long until [`Self::tend`] has something to do (at most `idle`).
    pub fn next_due(&self, idle: Duration) -> Duration {
        if self.spool.is_empty() {
            idle
        } else {
            self.retry_at
                .saturating_duration_since(Instant::now())
                .min(idle)
        }
    }

    /// One delivery attempt, logged; what it came to.
    fn attempt(&mut self) -> Step {
        let step = self.spool.deliver_once(&self.uploader);
        match &step {
            Step::Idle => {}
            Step::Delivered(a, n) => {
                self.backoff = FIRST_RETRY;
                tracing::debug!(
                    delivered = n,
                    accepted = a.accepted,
                    duplicates = a.duplicates,
                    spooled = self.spool.len(),
                    "reports delivered"
                );
            }
            Step::Rejected { origin, message } => {
                tracing::error!(report = %origin, %message, "the collector refused a report for good: set aside in rejected/");
            }
            Step::Halved { now, message } => {
                tracing::warn!(%message, per_batch = now, "the collector found the batch too large: sending fewer reports per batch");
            }
            Step::Refused(why) => {
                tracing::warn!(collector = %self.url, error = %why, spooled = self.spool.len(), retry_in = ?self.backoff, "the collector refused the batch: reports kept in the spool");
            }
            Step::Unreachable(why) => {
                tracing::warn!(collector = %self.url, error = %why, spooled = self.spool.len(), retry_in = ?self.backoff, "collector unreachable: reports kept in the spool");
            }
        }
        if matches!(step, Step::Refused(_) | Step::Unreachable(_)) {
            self.retry_at = Instant::now() + self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_RETRY);
        }
        step
    }

    /// What is due now: held reports tried on the disk again (every few seconds), and one
    /// delivery attempt unless the collector is in back-off.
    pub fn tend(&mut self) {
        let now = Instant::now();
        if self.spool.held() > 0 && now >= self.disk_retry_at {
            match self.spool.retry_writes() {
                Ok(()) => {
                    tracing::info!(dir = %self.spool.dir().display(), "the spool takes writes again: held reports written");
                }
                Err(e) => {
                    tracing::debug!(error = %e, held = self.spool.held(), "the spool still cannot be written");
                }
            }
            self.disk_retry_at = now + DISK_RETRY;
        }
        self.report_drops();
        if !self.spool.is_empty() && now >= self.retry_at {
            self.attempt();
        }
    }

    /// Delivers everything queued now, ignoring back-off; stops at the first batch the
    /// collector does not take (refused or unreachable) and says why.
    pub fn drain(&mut self) -> std::result::Result<(), Undelivered> {
        loop {
            let why = match self.attempt() {
                Step::Idle => return Ok(()),
                Step::Delivered(..) | Step::Halved { .. } | Step::Rejected { .. } => continue,
                Step::Refused(why) => format!("it refused them: {why}"),
                Step::Unreachable(why) => format!("it did not answer: {why}"),
            };
            return Err(Undelivered {
                why,
                left: self.spool.len(),
                dir: self.spool.dir().to_owned(),
            });
        }
    }

    /// On the way out: delivers what it can and says what stays behind (held reports are
    /// lost; spooled ones wait for the next start).
    pub fn close(mut self) {
        let _ = self.drain();
        if self.spool.held() > 0 {
            tracing::error!(
                held = self.spool.held(),
                dir = %self.spool.dir().display(),
                "reports held in memory are lost at shutdown: the spool could not be written and the collector did not take them"
            );
        }
        let on_disk = self.spool.len() - self.spool.held();
        if on_disk > 0 {
            tracing::warn!(
                spooled = on_disk,
                dir = %self.spool.dir().display(),
                "the collector did not take every report at shutdown: they stay spooled for the next start"
            );
        }
    }
}

/// The long-running uploader: queues what arrives on `rx` and delivers it until `stop` is
/// set; then queues what is left in `rx` and delivers what it can ([`Courier::close`]).
/// Whoever stops it stops the senders first, so that their last reports are in `rx`.
/// Nothing the collector, the disk or a report does ends it: it logs, counts and tries
/// again.
pub fn run(mut courier: Courier, rx: &mpsc::Receiver<Vec<u8>>, stop: &AtomicBool) {
    let idle = Duration::from_millis(500);
    let cleartext = cleartext_beyond_loopback(&courier.url);
    let mut warned: Option<Instant> = None;
    loop {
        if cleartext && warned.is_none_or(|at| at.elapsed() >= CLEARTEXT_WARNING) {
            tracing::warn!(collector = %courier.url, "reports and the agent's token travel in clear (insecure_http = true): serve the collector over TLS and use https://");
            warned = Some(Instant::now());
        }
        // Short waits while idle, so that a stop is seen within a tenth of a second.
        match rx.recv_timeout(courier.next_due(idle).min(Duration::from_millis(100))) {
            Ok(r) => courier.push(&r),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        while let Ok(r) = rx.try_recv() {
            courier.push(&r);
        }
        if stop.load(Ordering::Relaxed) {
            while let Ok(r) = rx.try_recv() {
                courier.push(&r);
            }
            courier.close();
            return;
        }
        courier.tend();
    }
}
