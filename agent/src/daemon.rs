//! `pathprobe-agent run --config agent.toml`: the long-running agent. It reflects (if
//! configured), probes every configured path, and pushes every window report to the
//! collector through the on-disk spool, so reports survive a collector outage or an agent
//! restart and arrive in order, once.
//!
//! Relative file names (spool, token and key files) are relative to the config file.
//!
//! ```toml
//! agent_id = "ams-dc1-01"
//! site = "ams"
//!
//! [collector]
//! url = "http://127.0.0.1:8862"
//! token = "..."                 # or token_file = "agent.token"
//! spool_dir = "spool"
//! spool_max_reports = 100000
//!
//! [reflector]                   # optional
//! listen = "0.0.0.0:862"
//!
//! [[path]]
//! name = "expressroute"
//! kind = "expressroute"
//! target = "10.1.0.4:862"
//! rate = 10                     # or interval = "100ms"
//! dscp = 46
//! bind = "10.0.0.1:0"           # or interface = "eth1", fwmark = 100
//! # proto = "tcp-syn"           # or "tcp-connect"; STAMP by default; target = any listener
//!
//! [[drill]]                     # a failover drill in a maintenance window (`failover --drill`)
//! name = "service"
//! target = "10.1.0.1:862"       # the service address, routed over either path
//! primary = "10.10.2.2:862"     # optional: reflectors only one path reaches (or pinned
//! backup = "10.20.3.2:862"      # to it: "HOST:PORT,bind=ADDR" / ",interface=IF" / ",fwmark=N")
//! start = "2026-11-28T02:00:00Z"
//! duration = "2h"               # the window; the drill ends once traffic is back on the primary
//! max_outage = "10s"
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use pathprobe_proto::report::{PathInfo, PathKind, ProbeProtocol};
use pathprobe_proto::stamp::{Mode, TimestampFormat};
use serde::Deserialize;

use crate::failover::{self, Failover, FailoverConfig, PinnedPath, StreamTiming, Verdict};
use crate::output::{self, Labels};
use crate::probe::{ProbeConfig, Prober};
use crate::reflector::{self, ReflectorConfig, ReflectorStats};
use crate::spool::{BATCH, Delivery, Spool, Uploader};
use crate::{Error, Result, keyfile};

/// The configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub agent_id: String,
    pub site: Option<String>,
    pub collector: Option<CollectorSection>,
    pub reflector: Option<ReflectorSection>,
    #[serde(default, rename = "path")]
    pub paths: Vec<PathSection>,
    #[serde(default, rename = "drill")]
    pub drills: Vec<DrillSection>,
}

/// A failover drill at a set time: the options of `failover --drill`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSection {
    /// The path name of its reports.
    pub name: String,
    /// `stamp` (the default) or `tcp-syn`.
    #[serde(default)]
    pub proto: ProbeProtocol,
    pub target: String,
    /// Probes per second to the service [default: 1,000].
    pub rate: Option<u32>,
    pub primary: Option<String>,
    pub backup: Option<String>,
    /// Probes per second to each pinned reflector [default: 20].
    pub pinned_rate: Option<u32>,
    /// When the drill starts (RFC 3339).
    pub start: String,
    /// How long the maintenance window lasts.
    pub duration: String,
    /// The longest outage that passes [default: 10s].
    pub max_outage: Option<String>,
    pub min_outage: Option<String>,
    pub settle: Option<String>,
    pub window: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub dscp: u8,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
}

/// Where reports go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSection {
    pub url: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub spool_dir: PathBuf,
    #[serde(default = "default_spool_max")]
    pub spool_max_reports: usize,
}

const fn default_spool_max() -> usize {
    100_000
}

/// The reflector, if this agent answers probes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReflectorSection {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub stateful: bool,
    pub auth_key_file: Option<PathBuf>,
    #[serde(default = "default_max_rate")]
    pub max_rate_per_source: u32,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 862))
}

const fn default_max_rate() -> u32 {
    250_000
}

/// One path to probe: the options of `probe`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSection {
    pub name: String,
    pub kind: PathKind,
    /// `stamp` (the default), `tcp-syn` or `tcp-connect`.
    #[serde(default)]
    pub proto: ProbeProtocol,
    pub target: String,
    pub rate: Option<u32>,
    pub interval: Option<String>,
    pub size: Option<usize>,
    #[serde(default)]
    pub dscp: u8,
    pub ttl: Option<u8>,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
    pub window: Option<String>,
    pub timeout: Option<String>,
    pub auth_key_file: Option<PathBuf>,
    #[serde(default)]
    pub ssid: u16,
}

fn duration(
    file: &Path,
    path: &str,
    field: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration> {
    value.map_or(Ok(default), |v| {
        humantime::parse_duration(v).map_err(|e| {
            Error::Config(format!(
                "{}: path `{path}`: {field} = \"{v}\" is not a duration ({e}): write it like 10s, 500ms or 1h",
                file.display()
            ))
        })
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl AgentConfig {
    /// Reads and checks `file`. Syntax and type errors carry the line and column; other
    /// errors name the path and field.
    pub fn load(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
            what: format!("read the config file {}", file.display()),
            source,
        })?;
        let mut cfg: Self = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map_or_else(String::new, |l| format!(":{l}"));
            Error::Config(format!("{}{at}: {}", file.display(), e.message()))
        })?;
        // Relative files are relative to the config file, not to where the agent started.
        let base = file.parent().unwrap_or_else(|| Path::new("."));
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(c) = &mut cfg.collector {
            anchor(&mut c.spool_dir);
            c.token_file.as_mut().map(anchor);
        }
        if let Some(r) = &mut cfg.reflector {
            r.auth_key_file.as_mut().map(anchor);
        }
        for p in &mut cfg.paths {
            p.auth_key_file.as_mut().map(anchor);
        }
        if cfg.paths.is_empty() && cfg.reflector.is_none() && cfg.drills.is_empty() {
            return Err(Error::Config(format!(
                "{}: nothing to do: add a [reflector] section, a [[path]] or a [[drill]]",
                file.display()
            )));
        }
        for p in &cfg.paths {
            cfg.probe_config(file, p)?;
        }
        for d in &cfg.drills {
            Self::drill_config(file, d)?;
        }
        Ok(cfg)
    }

    /// The settings of one `[[drill]]`, and when it starts (ns since 1970).
    pub fn drill_config(file: &Path, d: &DrillSection) -> Result<(FailoverConfig, u64)> {
        let bad = |reason: String| {
            Error::Config(format!("{}: drill `{}`: {reason}", file.display(), d.name))
        };
        let dur = |field: &str, v: Option<&str>, default: Duration| {
            duration(file, &d.name, field, v, default)
                .map_err(|e| Error::Config(e.to_string().replace("path `", "drill `")))
        };
        let resolve = |field: &str, t: &str| -> Result<SocketAddr> {
            t.to_socket_addrs()
                .map_err(|e| {
                    bad(format!(
                        "{field} = \"{t}\" does not resolve ({e}): write it as HOST:PORT"
                    ))
                })?
                .next()
                .ok_or_else(|| bad(format!("{field} = \"{t}\" resolves to no address")))
        };
        if !matches!(d.proto, ProbeProtocol::Stamp | ProbeProtocol::TcpSyn) {
            return Err(bad(format!(
                "proto = \"{}\": a drill probes with stamp or tcp-syn",
                d.proto
            )));
        }
        let start = drill_start(&d.start).map_err(bad)?;
        let length = dur("duration", Some(&d.duration), Duration::ZERO)?;
        let late = nanos(dur(
            "timeout",
            d.timeout.as_deref(),
            Duration::from_secs(1),
        )?);
        let window = nanos(dur("window", d.window.as_deref(), Duration::from_secs(10))?);
        let timing = StreamTiming {
            dscp: d.dscp,
            duration_ns: Some(nanos(length)),
            window_ns: window,
            late_timeout_ns: late,
            // A drill waits for the primary to fail: silence shows as loss.
            no_reply_ns: u64::MAX,
        };
        let stream = |field: &str, pin: &PinnedPath, rate: u32, protocol| {
            if rate == 0 {
                return Err(bad("rates must be at least 1".to_string()));
            }
            let cfg = timing.stream(resolve(field, &pin.target)?, pin, rate, protocol);
            cfg.validate().map_err(|e| bad(e.to_string()))?;
            Ok(cfg)
        };
        let pinned_rate = d.pinned_rate.unwrap_or(20);
        let pinned = |field: &str, t: &Option<String>| {
            t.as_deref()
                .map(|t| {
                    let p: PinnedPath = t.parse().map_err(|e| bad(format!("{field}: {e}")))?;
                    stream(field, &p, pinned_rate, ProbeProtocol::Stamp)
                })
                .transpose()
        };
        let service = PinnedPath {
            target: d.target.clone(),
            bind: d.bind,
            interface: d.interface.clone(),
            fwmark: d.fwmark,
        };
        let cfg = FailoverConfig {
            service: stream("target", &service, d.rate.unwrap_or(1_000), d.proto)?,
            primary: pinned("primary", &d.primary)?,
            backup: pinned("backup", &d.backup)?,
            min_outage_ns: nanos(dur(
                "min_outage",
                d.min_outage.as_deref(),
                Duration::from_millis(20),
            )?),
            settle_ns: nanos(dur("settle", d.settle.as_deref(), Duration::from_secs(10))?),
            flap_window_ns: 60_000_000_000,
            drill_max_outage_ns: Some(nanos(dur(
                "max_outage",
                d.max_outage.as_deref(),
                Duration::from_secs(10),
            )?)),
        };
        failover::validate(&cfg).map_err(|e| bad(e.to_string()))?;
        Ok((cfg, start))
    }

    /// The prober settings of one `[[path]]`.
    pub fn probe_config(&self, file: &Path, p: &PathSection) -> Result<ProbeConfig> {
        let bad = |reason: String| {
            Error::Config(format!("{}: path `{}`: {reason}", file.display(), p.name))
        };
        let target = p
            .target
            .to_socket_addrs()
            .map_err(|e| {
                bad(format!(
                    "target = \"{}\" does not resolve ({e}): write it as HOST:PORT",
                    p.target
                ))
            })?
            .next()
            .ok_or_else(|| bad(format!("target = \"{}\" resolves to no address", p.target)))?;
        let interval = match (p.rate, &p.interval) {
            (Some(_), Some(_)) => return Err(bad("give rate or interval, not both".to_string())),
            (Some(0), None) => return Err(bad("rate must be at least 1".to_string())),
            (Some(r), None) => Duration::from_nanos(1_000_000_000 / u64::from(r)),
            (None, i) => duration(
                file,
                &p.name,
                "interval",
                i.as_deref(),
                Duration::from_millis(100),
            )?,
        };
        let key = p.auth_key_file.as_deref().map(keyfile::load).transpose()?;
        let size = crate::probe::default_size(if key.is_some() {
            Mode::Authenticated
        } else {
            Mode::Unauthenticated
        });
        let cfg = ProbeConfig {
            protocol: p.proto,
            target,
            bind: p.bind,
            interface: p.interface.clone(),
            fwmark: p.fwmark,
            interval_ns: nanos(interval),
            count: None,
            duration_ns: None,
            size: p.size.unwrap_or(size),
            dscp: p.dscp,
            ttl: p.ttl,
            key,
            window_ns: nanos(duration(
                file,
                &p.name,
                "window",
                p.window.as_deref(),
                Duration::from_secs(10),
            )?),
            late_timeout_ns: nanos(duration(
                file,
                &p.name,
                "timeout",
                p.timeout.as_deref(),
                Duration::from_secs(1),
            )?),
            // A daemon never gives up on a path: a silent target shows as 100% loss.
            no_reply_ns: u64::MAX,
            ssid: p.ssid,
            route_each_probe: false,
        };
        cfg.validate().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }
}

/// A drill's start time in ns since 1970, or what is wrong with it.
fn drill_start(start: &str) -> std::result::Result<u64, String> {
    humantime::parse_rfc3339_weak(start)
        .map_err(|e| {
            format!("start = \"{start}\" is not a time ({e}): write it like 2026-11-28T02:00:00Z")
        })
        .map(|t| t.duration_since(std::time::UNIX_EPOCH).map_or(0, nanos))
}

fn token(c: &CollectorSection) -> Result<Option<String>> {
    match (&c.token, &c.token_file) {
        (Some(_), Some(_)) => Err(Error::Config(
            "[collector]: give token or token_file, not both".to_string(),
        )),
        (Some(t), None) => Ok(Some(t.clone())),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|source| Error::Io {
                what: format!("read the collector token file {}", f.display()),
                source,
            }),
        (None, None) => Ok(None),
    }
}

/// On the way out: delivers what it can in one pass, leaving the rest spooled for the next
/// start.
fn flush(spool: &mut Spool, uploader: &Uploader) {
    while !spool.is_empty() {
        let batch = spool.front(BATCH);
        match uploader.deliver(&batch) {
            Delivery::Delivered => spool.pop(batch.len()),
            Delivery::Rejected { index, .. } => spool.reject(index),
            Delivery::Retry(_) => break,
        }
    }
    if !spool.is_empty() {
        tracing::warn!(
            spooled = spool.len(),
            "collector unreachable at shutdown: reports stay spooled for the next start"
        );
    }
}

/// Delivers spooled reports until `stop` is set and `rx` is closed.
fn upload(
    section: &CollectorSection,
    token: Option<String>,
    rx: &mpsc::Receiver<Vec<u8>>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut spool = Spool::open(&section.spool_dir, section.spool_max_reports)?;
    let uploader = Uploader::new(&section.url, token);
    let mut backoff = Duration::from_millis(500);
    let mut retry_at = std::time::Instant::now();
    let mut reported_drops = 0;
    if !spool.is_empty() {
        tracing::info!(spooled = spool.len(), dir = %section.spool_dir.display(), "delivering reports left from an earlier run");
    }
    loop {
        let wait = if spool.is_empty() {
            Duration::from_millis(500)
        } else {
            retry_at.saturating_duration_since(std::time::Instant::now())
        };
        match rx.recv_timeout(wait) {
            Ok(r) => spool.push(&r)?,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if stop.load(Ordering::Relaxed) {
                    flush(&mut spool, &uploader);
                    return Ok(());
                }
                if spool.is_empty() {
                    return Ok(());
                }
                // Every prober has ended; keep delivering what is spooled.
                std::thread::sleep(wait);
            }
        }
        while let Ok(r) = rx.try_recv() {
            spool.push(&r)?;
        }
        if spool.dropped > reported_drops {
            tracing::error!(
                dropped = spool.dropped,
                max = section.spool_max_reports,
                "spool full: oldest reports dropped"
            );
            reported_drops = spool.dropped;
        }
        if spool.is_empty() || std::time::Instant::now() < retry_at {
            continue;
        }
        let batch = spool.front(BATCH);
        match uploader.deliver(&batch) {
            Delivery::Delivered => {
                spool.pop(batch.len());
                backoff = Duration::from_millis(500);
                tracing::debug!(
                    delivered = batch.len(),
                    spooled = spool.len(),
                    "reports delivered"
                );
            }
            Delivery::Rejected { index, message } => {
                tracing::error!(report = %batch.get(index).map(|p| p.display().to_string()).unwrap_or_default(), %message, "collector refused a report: moved to rejected/");
                spool.reject(index);
            }
            Delivery::Retry(why) => {
                tracing::warn!(collector = %section.url, error = %why, spooled = spool.len(), retry_in = ?backoff, "collector unreachable: reports kept in the spool");
                retry_at = std::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Runs the agent until `stop` is set.
pub fn run(file: &Path, cfg: &AgentConfig, stop: &AtomicBool) -> Result<()> {
    let probers = cfg
        .paths
        .iter()
        .map(|p| Ok((p, Prober::open(cfg.probe_config(file, p)?)?)))
        .collect::<Result<Vec<_>>>()?;
    let reflector = cfg
        .reflector
        .as_ref()
        .map(|r| -> Result<_> {
            let rc = ReflectorConfig {
                listen: r.listen,
                key: r.auth_key_file.as_deref().map(keyfile::load).transpose()?,
                stateful: r.stateful,
                max_rate_per_source: r.max_rate_per_source,
                timestamp_format: TimestampFormat::Ntp,
            };
            let sock = reflector::bind(rc.listen)?;
            Ok((rc, sock))
        })
        .transpose()?;
    let collector = cfg
        .collector
        .as_ref()
        .map(|c| Ok::<_, Error>((c, token(c)?)))
        .transpose()?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let stats = ReflectorStats::default();
    std::thread::scope(|s| -> Result<()> {
        let uploader = collector.map(|(c, t)| s.spawn(move || upload(c, t, &rx, stop)));
        if let Some((rc, sock)) = &reflector {
            tracing::info!(listen = %rc.listen, "reflecting");
            let stats = &stats;
            s.spawn(move || {
                if let Err(e) = reflector::run(sock, rc, stop, stats) {
                    tracing::error!(error = %e, "reflector stopped");
                }
            });
        }
        for (p, prober) in &probers {
            let tx = tx.clone();
            let labels = Labels {
                path: PathInfo {
                    name: p.name.clone(),
                    kind: p.kind,
                    local: prober.local,
                    remote: prober.config().target,
                    protocol: p.proto,
                    dscp: p.dscp,
                    packet_size: prober.packet_size(),
                },
                agent_id: cfg.agent_id.clone(),
                site: cfg.site.clone(),
                timestamping: prober.timestamping,
            };
            tracing::info!(path = %p.name, target = %p.target, "probing");
            s.spawn(move || {
                let result = crate::watch::run_watched(prober, stop, |w, seen| {
                    let f = output::window_figures(&labels, w, seen);
                    tracing::info!("{}", output::line(&f));
                    for e in &seen.events {
                        tracing::warn!(path = %labels.path.name, "{}", output::event_text(e));
                    }
                    match output::report(&labels, w, seen).and_then(|r| Ok(r.to_json()?)) {
                        Ok(json) => {
                            let _ = tx.send(json);
                        }
                        Err(e) => tracing::error!(error = %e, "cannot build a window report"),
                    }
                });
                if let Err(e) = result {
                    tracing::error!(path = %labels.path.name, error = %e, "probing stopped");
                }
            });
        }
        for d in &cfg.drills {
            let tx = tx.clone();
            s.spawn(move || {
                if let Err(e) = drill(file, cfg, d, stop, &tx) {
                    tracing::error!(drill = %d.name, error = %e, "the drill stopped");
                }
            });
        }
        drop(tx);
        if let Some(u) = uploader {
            u.join()
                .map_err(|_| Error::Config("the uploader thread panicked".to_string()))??;
        }
        Ok(())
    })
}

/// Runs one `[[drill]]`: waits for its start, runs it (reports to `tx`), logs each event
/// and the verdict.
fn drill(
    file: &Path,
    cfg: &AgentConfig,
    d: &DrillSection,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let (mut fc, start) = AgentConfig::drill_config(file, d)?;
    let length = fc.service.duration_ns.unwrap_or(0);
    let now = crate::sys::realtime_ns();
    if now >= start.saturating_add(length) {
        tracing::warn!(drill = %d.name, start = %d.start, "the drill's window has passed: not run");
        return Ok(());
    }
    tracing::info!(drill = %d.name, start = %d.start, "drill scheduled");
    while crate::sys::realtime_ns() < start {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Started late (the agent came up inside the window): only what is left of it.
    let left = start
        .saturating_add(length)
        .saturating_sub(crate::sys::realtime_ns());
    for p in [
        Some(&mut fc.service),
        fc.primary.as_mut(),
        fc.backup.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        p.duration_ns = Some(left.max(1));
    }
    let max_outage = fc.drill_max_outage_ns.unwrap_or(u64::MAX);
    let session = Failover::open(fc)?;
    let service = &session.service;
    let labels = Labels {
        path: PathInfo {
            name: d.name.clone(),
            kind: PathKind::Other,
            local: service.local,
            remote: service.config().target,
            protocol: d.proto,
            dscp: d.dscp,
            packet_size: service.packet_size(),
        },
        agent_id: cfg.agent_id.clone(),
        site: cfg.site.clone(),
        timestamping: service.timestamping,
    };
    tracing::info!(drill = %d.name, target = %d.target, "drill started: waiting for the primary to fail");
    let run = session.run(
        stop,
        |w, seen| match output::report(&labels, w, seen).and_then(|r| Ok(r.to_json()?)) {
            Ok(json) => {
                let _ = tx.send(json);
            }
            Err(e) => tracing::error!(error = %e, "cannot build a window report"),
        },
        |e| tracing::warn!(drill = %d.name, "{}", e.summary),
    )?;
    match failover::verdict(&run, max_outage) {
        Verdict::Pass => {
            tracing::info!(drill = %d.name, "drill passed: the primary failed and came back, every outage within max_outage");
        }
        Verdict::Fail => {
            tracing::error!(drill = %d.name, "drill FAILED: an outage was longer than max_outage");
        }
        Verdict::Incomplete => {
            tracing::warn!(drill = %d.name, "drill incomplete: traffic did not leave the primary and come back within the window");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pathprobe-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_syntax_error_names_file_and_line() {
        let p = write(
            "syntax.toml",
            "agent_id = \"a\"\n\n[[path]]\nname = \"er\"\nrate = ten\n",
        );
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(err.contains("syntax.toml:5"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_line() {
        let p = write(
            "unknown.toml",
            "agent_id = \"a\"\n[reflector]\nlisten = \"127.0.0.1:8620\"\nlisen = 1\n",
        );
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("unknown.toml:4") && err.contains("lisen"),
            "{err}"
        );
    }

    #[test]
    fn a_drill_is_checked_field_by_field() {
        let drill = |extra: &str| {
            write(
                "drill.toml",
                &format!(
                    "agent_id = \"a\"\n[[drill]]\nname = \"svc\"\ntarget = \"127.0.0.1:8620\"\nduration = \"1h\"\n{extra}"
                ),
            )
        };
        let ok = AgentConfig::load(&drill("start = \"2026-11-28T02:00:00Z\"\n")).unwrap();
        let (cfg, start) =
            AgentConfig::drill_config(Path::new("drill.toml"), &ok.drills[0]).unwrap();
        assert_eq!(start, 1_795_831_200_000_000_000);
        assert_eq!(
            cfg.service.interval_ns, 1_000_000,
            "1,000 probes/s by default"
        );
        assert_eq!(
            cfg.drill_max_outage_ns,
            Some(10_000_000_000),
            "10 s by default"
        );
        let err = AgentConfig::load(&drill("start = \"Saturday 2am\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("drill `svc`: start") && err.contains("2026-11-28T02:00:00Z"),
            "{err}"
        );
        let err = AgentConfig::load(&drill(
            "start = \"2026-11-28T02:00:00Z\"\nmax_outage = \"soon\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("drill `svc`: max_outage"), "{err}");
        let err = AgentConfig::load(&drill(
            "start = \"2026-11-28T02:00:00Z\"\nproto = \"tcp-connect\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("stamp or tcp-syn"), "{err}");
    }

    #[test]
    fn a_bad_value_names_the_path_and_field() {
        let p = write(
            "value.toml",
            "agent_id = \"a\"\n[[path]]\nname = \"vpn\"\nkind = \"vpn\"\ntarget = \"127.0.0.1:8620\"\nwindow = \"ten seconds\"\n",
        );
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("path `vpn`: window") && err.contains("10s"),
            "{err}"
        );
        let p = write(
            "size.toml",
            "agent_id = \"a\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"127.0.0.1:8620\"\nsize = 9000\n",
        );
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("path `er`") && err.contains("--size 9000"),
            "{err}"
        );
    }

    #[test]
    fn a_path_may_probe_over_tcp_and_a_wrong_protocol_names_its_line() {
        let p = write(
            "proto.toml",
            "agent_id = \"a\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"127.0.0.1:443\"\nproto = \"tcp-connect\"\n",
        );
        let cfg = AgentConfig::load(&p).unwrap();
        assert_eq!(cfg.paths[0].proto, ProbeProtocol::TcpConnect);
        let p = write(
            "badproto.toml",
            "agent_id = \"a\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"127.0.0.1:443\"\nproto = \"icmp\"\n",
        );
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("badproto.toml:6") && err.contains("tcp-syn"),
            "{err}"
        );
    }

    #[test]
    fn relative_files_are_relative_to_the_config() {
        let p = write(
            "rel.toml",
            "agent_id = \"a\"\n[collector]\nurl = \"http://127.0.0.1:1\"\nspool_dir = \"spool\"\n[reflector]\nlisten = \"127.0.0.1:8620\"\n",
        );
        let cfg = AgentConfig::load(&p).unwrap();
        assert_eq!(
            cfg.collector.unwrap().spool_dir,
            p.parent().unwrap().join("spool")
        );
    }

    #[test]
    fn the_example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let cfg = AgentConfig::load(&p).unwrap();
        assert_eq!(cfg.paths.len(), 2);
        assert_eq!(cfg.paths[0].kind, PathKind::Expressroute);
    }
}
