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
use crate::spool::{Spool, Step, Uploader};
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
    /// `copy` (the default), `keep` or a DSCP from 0 to 63: see `reflect --reply-dscp`.
    pub reply_dscp: Option<String>,
}

impl ReflectorSection {
    /// The reply DSCP policy; what is wrong with it otherwise.
    pub fn reply_dscp(&self) -> std::result::Result<reflector::ReplyDscp, String> {
        self.reply_dscp
            .as_deref()
            .map_or(Ok(reflector::ReplyDscp::Copy), str::parse)
    }
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
        cfg.check_names(file, &text)?;
        if let Some(r) = &cfg.reflector {
            r.reply_dscp().map_err(|reason| {
                let at = line_of(&text, &[Key::Name("reflector"), Key::Name("reply_dscp")]);
                Error::Config(format!(
                    "{}{at}: [reflector] reply_dscp: {reason}",
                    file.display()
                ))
            })?;
        }
        if let Some(c) = &cfg.collector {
            check_collector_url(&c.url).map_err(|reason| {
                let at = line_of(&text, &[Key::Name("collector"), Key::Name("url")]);
                Error::Config(format!(
                    "{}{}: [collector] url: {reason}",
                    file.display(),
                    at
                ))
            })?;
            if c.spool_max_reports == 0 {
                return Err(Error::Config(format!(
                    "{}{}: [collector] spool_max_reports must be at least 1",
                    file.display(),
                    line_of(
                        &text,
                        &[Key::Name("collector"), Key::Name("spool_max_reports")]
                    )
                )));
            }
        }
        for p in &cfg.paths {
            cfg.probe_config(file, p)?;
        }
        for d in &cfg.drills {
            Self::drill_config(file, d)?;
        }
        Ok(cfg)
    }

    /// The agent id, the site and every path and drill name follow the rules reports do
    /// (so that no window fails later for its name), and no two paths or drills share a
    /// name. Errors give the file and line.
    fn check_names(&self, file: &Path, text: &str) -> Result<()> {
        let at = |keys: &[Key<'_>]| format!("{}{}", file.display(), line_of(text, keys));
        let named = |field: &'static str, value: &str, keys: &[Key<'_>]| {
            check_name(field, value).map_err(|e| Error::Config(format!("{}: {e}", at(keys))))
        };
        named("agent_id", &self.agent_id, &[Key::Name("agent_id")])?;
        if let Some(site) = &self.site {
            named("site", site, &[Key::Name("site")])?;
        }
        let mut seen = std::collections::HashMap::new();
        let all_names = self
            .paths
            .iter()
            .enumerate()
            .map(|(i, p)| ("path", i, &p.name))
            .chain(
                self.drills
                    .iter()
                    .enumerate()
                    .map(|(i, d)| ("drill", i, &d.name)),
            );
        for (table, i, name) in all_names {
            let keys = [Key::Name(table), Key::At(i), Key::Name("name")];
            named("name", name, &keys)?;
            if let Some((first_table, first)) = seen.insert(name.clone(), (table, i)) {
                let first_at = line_of(
                    text,
                    &[Key::Name(first_table), Key::At(first), Key::Name("name")],
                );
                return Err(Error::Config(format!(
                    "{}: {table} name `{name}` is used already (at{first_at}): every path and drill needs a name of its own, since its reports are found by it",
                    at(&keys)
                )));
            }
        }
        Ok(())
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

/// One step into a TOML document: a table key or an array index.
#[derive(Debug, Clone, Copy)]
enum Key<'a> {
    Name(&'a str),
    At(usize),
}

/// `:LINE` of the value at `keys` in the TOML `text`, or nothing when it cannot be found.
fn line_of(text: &str, keys: &[Key<'_>]) -> String {
    let Ok(root) = toml::de::DeTable::parse(text) else {
        return String::new();
    };
    let root = toml::Spanned::new(0..text.len(), toml::de::DeValue::Table(root.into_inner()));
    let mut at = &root;
    for k in keys {
        let next = match *k {
            Key::Name(n) => at.get_ref().get(n),
            Key::At(i) => at.get_ref().get(i),
        };
        let Some(next) = next else {
            return String::new();
        };
        at = next;
    }
    let start = at.span().start.min(text.len());
    format!(":{}", text[..start].matches('\n').count() + 1)
}

/// A name as reports carry it, checked with the rules of `proto`.
fn check_name(field: &'static str, value: &str) -> std::result::Result<(), String> {
    pathprobe_proto::report::check_name(field, value).map_err(|e| e.to_string())
}

/// The collector's address: `http://HOST:PORT`.
fn check_collector_url(url: &str) -> std::result::Result<(), String> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| format!("\"{url}\" is not a URL ({e}): write it like http://10.0.0.5:8862"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "\"{url}\": this build sends reports over plain HTTP only (TLS is not built in yet): use http:// on a network you trust"
            ));
        }
        Some(other) => {
            return Err(format!(
                "\"{url}\": `{other}://` is not how reports travel: write it like http://10.0.0.5:8862"
            ));
        }
        None => {
            return Err(format!(
                "\"{url}\" has no scheme: write it like http://10.0.0.5:8862"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "\"{url}\" names no host: write it like http://10.0.0.5:8862"
        ));
    }
    Ok(())
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

/// How long a path or the uploader waits after a failure before it tries again, at most.
const MAX_BACKOFF: Duration = Duration::from_mins(1);

/// On the way out: delivers what it can, leaving the rest spooled for the next start.
fn flush(spool: &mut Spool, uploader: &Uploader) {
    while let Step::Delivered(..) | Step::Rejected { .. } | Step::Halved { .. } =
        spool.deliver_once(uploader)
    {}
    if spool.held() > 0 {
        tracing::error!(
            held = spool.held(),
            dir = %spool.dir().display(),
            "reports held in memory are lost at shutdown: the spool could not be written and the collector did not take them"
        );
    }
    let on_disk = spool.len() - spool.held();
    if on_disk > 0 {
        tracing::warn!(
            spooled = on_disk,
            "the collector did not take every report at shutdown: they stay spooled for the next start"
        );
    }
}

/// Queues a report; a spool that cannot be written is logged and counted, and the report
/// is held in memory meanwhile.
fn enqueue(spool: &mut Spool, report: &[u8]) {
    let held = spool.held();
    let pushed = spool.push(report);
    if held > 0 && spool.held() == 0 {
        tracing::info!(written = held, dir = %spool.dir().display(), "the spool takes writes again: held reports written");
    }
    if let Err(e) = pushed {
        tracing::error!(
            error = %e,
            write_errors = spool.write_errors,
            held = spool.held(),
            "cannot write to the spool: reports are held in memory until it can be written"
        );
    }
}

/// Delivers spooled reports until `stop` is set and `rx` is closed. Nothing the collector,
/// the disk or a report does ends it: it logs, counts and tries again.
fn upload(
    mut spool: Spool,
    section: &CollectorSection,
    token: Option<String>,
    rx: &mpsc::Receiver<Vec<u8>>,
    stop: &AtomicBool,
) {
    let uploader = Uploader::new(&section.url, token);
    let mut backoff = Duration::from_millis(500);
    let mut retry_at = std::time::Instant::now();
    let mut reported_drops = 0;
    let mut disk_retry_at = std::time::Instant::now();
    if !spool.is_empty() {
        tracing::info!(spooled = spool.len(), dir = %section.spool_dir.display(), "delivering reports left from an earlier run");
    }
    loop {
        let wait = if spool.is_empty() {
            Duration::from_millis(500)
        } else {
            retry_at
                .saturating_duration_since(std::time::Instant::now())
                .min(Duration::from_millis(500))
        };
        match rx.recv_timeout(wait) {
            Ok(r) => enqueue(&mut spool, &r),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if stop.load(Ordering::Relaxed) {
                    flush(&mut spool, &uploader);
                    return;
                }
                std::thread::sleep(wait);
            }
        }
        while let Ok(r) = rx.try_recv() {
            enqueue(&mut spool, &r);
        }
        if spool.held() > 0 && std::time::Instant::now() >= disk_retry_at {
            match spool.retry_writes() {
                Ok(()) => {
                    tracing::info!(dir = %section.spool_dir.display(), "the spool takes writes again: held reports written");
                }
                Err(e) => {
                    tracing::debug!(error = %e, held = spool.held(), "the spool still cannot be written");
                }
            }
            disk_retry_at = std::time::Instant::now() + Duration::from_secs(5);
        }
        if spool.dropped > reported_drops {
            tracing::error!(
                dropped = spool.dropped,
                max = section.spool_max_reports,
                held = spool.held(),
                "spool full: oldest reports dropped"
            );
            reported_drops = spool.dropped;
        }
        if spool.is_empty() || std::time::Instant::now() < retry_at {
            continue;
        }
        let later = |backoff: &mut Duration, retry_at: &mut std::time::Instant| {
            *retry_at = std::time::Instant::now() + *backoff;
            *backoff = (*backoff * 2).min(Duration::from_secs(30));
        };
        match spool.deliver_once(&uploader) {
            Step::Idle => {}
            Step::Delivered(a, n) => {
                backoff = Duration::from_millis(500);
                tracing::debug!(
                    delivered = n,
                    accepted = a.accepted,
                    duplicates = a.duplicates,
                    spooled = spool.len(),
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
                tracing::warn!(collector = %section.url, error = %why, spooled = spool.len(), retry_in = ?backoff, "the collector refused the batch: reports kept in the spool");
                later(&mut backoff, &mut retry_at);
            }
            Step::Unreachable(why) => {
                tracing::warn!(collector = %section.url, error = %why, spooled = spool.len(), retry_in = ?backoff, "collector unreachable: reports kept in the spool");
                later(&mut backoff, &mut retry_at);
            }
        }
    }
}

/// Sleeps `d` in short steps; false if `stop` was set meanwhile.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(d));
    }
    !stop.load(Ordering::Relaxed)
}

/// Probes one path until `stop`: a target that is down, a socket that cannot be opened yet
/// or a session that ends (even by a panic) is logged, and the path is tried again with
/// back-off. It never gives up while the agent runs.
fn probe_path(
    cfg: &AgentConfig,
    probe: &ProbeConfig,
    p: &PathSection,
    first: Option<Prober>,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Vec<u8>>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut opened = first;
    while !stop.load(Ordering::Relaxed) {
        let prober = match opened
            .take()
            .map_or_else(|| Prober::open(probe.clone()), Ok)
        {
            Ok(prober) => prober,
            Err(e) => {
                tracing::error!(path = %p.name, error = %e, retry_in = ?backoff, "cannot open the path: trying again");
                if !pause(backoff, stop) {
                    break;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
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
        let started = std::time::Instant::now();
        let session = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::watch::run_watched(&prober, stop, false, |w, seen| {
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
            })
        }));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match session {
            Ok(Ok(_)) => {
                tracing::warn!(path = %p.name, retry_in = ?backoff, "probing ended: starting again");
            }
            Ok(Err(e)) => {
                tracing::error!(path = %p.name, error = %e, retry_in = ?backoff, "probing stopped: starting again");
            }
            Err(_) => {
                tracing::error!(path = %p.name, retry_in = ?backoff, "the probing thread panicked: starting again");
            }
        }
        // A session that ran a while was healthy: start the back-off over.
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_secs(1);
        }
        if !pause(backoff, stop) {
            break;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs the agent until `stop` is set. What cannot work is refused before anything
/// starts: an unwritable spool, an unreadable token or key, a reflector port in use, a
/// path the agent lacks the privilege for. After that the agent never gives up on a
/// path; it returns an error (exit non-zero) only when a part it cannot run without, the
/// reflector, stops.
pub fn run(file: &Path, cfg: &AgentConfig, stop: &AtomicBool) -> Result<()> {
    let mut paths = Vec::with_capacity(cfg.paths.len());
    for p in &cfg.paths {
        let probe = cfg.probe_config(file, p)?;
        // A setting the agent cannot use (a privilege it lacks) is refused now; anything
        // else (an address not up yet) is tried again by the path's thread.
        let first = match Prober::open(probe.clone()) {
            Ok(prober) => Some(prober),
            Err(e @ Error::Config(_)) => {
                return Err(Error::Config(format!("path `{}`: {e}", p.name)));
            }
            Err(e) => {
                tracing::error!(path = %p.name, error = %e, "cannot open the path yet: it will be tried again");
                None
            }
        };
        paths.push((p, probe, first));
    }
    let reflector = cfg
        .reflector
        .as_ref()
        .map(|r| -> Result<_> {
            let rc = ReflectorConfig {
                listen: r.listen,
                key: r.auth_key_file.as_deref().map(keyfile::load).transpose()?,
                stateful: r.stateful,
                max_rate_per_source: r.max_rate_per_source,
                reply_dscp: r.reply_dscp().map_err(Error::Config)?,
                timestamp_format: TimestampFormat::Ntp,
            };
            let sock = reflector::bind(rc.listen)?;
            Ok((rc, sock))
        })
        .transpose()?;
    let collector = cfg
        .collector
        .as_ref()
        .map(|c| {
            Ok::<_, Error>((
                c,
                token(c)?,
                Spool::open(&c.spool_dir, c.spool_max_reports)?,
            ))
        })
        .transpose()?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let stats = ReflectorStats::default();
    std::thread::scope(|s| -> Result<()> {
        let uploader =
            collector.map(|(c, t, spool)| s.spawn(move || upload(spool, c, t, &rx, stop)));
        let reflecting = reflector.as_ref().map(|(rc, sock)| {
            tracing::info!(listen = %rc.listen, "reflecting");
            let stats = &stats;
            s.spawn(move || reflector::run(sock, rc, stop, stats))
        });
        for (p, probe, first) in paths {
            let tx = tx.clone();
            s.spawn(move || probe_path(cfg, &probe, p, first, stop, &tx));
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
        supervise(reflecting, uploader, stop)
    })
}

/// Watches the parts the agent cannot run without (the paths look after themselves) until
/// `stop`; when one ends, stops everything and says why (exit non-zero).
fn supervise(
    reflecting: Option<std::thread::ScopedJoinHandle<'_, Result<()>>>,
    uploader: Option<std::thread::ScopedJoinHandle<'_, ()>>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut failure = None;
    while !stop.load(Ordering::Relaxed) {
        if reflecting
            .as_ref()
            .is_some_and(std::thread::ScopedJoinHandle::is_finished)
        {
            failure = Some("the reflector stopped");
            break;
        }
        if uploader
            .as_ref()
            .is_some_and(std::thread::ScopedJoinHandle::is_finished)
        {
            failure = Some("the uploader stopped");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if failure.is_some() {
        stop.store(true, Ordering::Relaxed);
    }
    let mut outcome = Ok(());
    if let Some(r) = reflecting {
        match r.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => outcome = Err(Error::Config(format!("the reflector stopped: {e}"))),
            Err(_) => outcome = Err(Error::Config("the reflector thread panicked".to_string())),
        }
    }
    if let Some(u) = uploader
        && u.join().is_err()
    {
        outcome = Err(Error::Config(
            "the uploader thread panicked; reports stay spooled for the next start".to_string(),
        ));
    }
    match (failure, outcome) {
        (_, Err(e)) => Err(e),
        (Some(what), Ok(())) => Err(Error::Config(format!(
            "{what} while the agent had work: it exits so that its service manager restarts it"
        ))),
        (None, Ok(())) => Ok(()),
    }
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
