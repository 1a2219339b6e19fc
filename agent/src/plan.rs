//! The agent plan: everything an agent runs (its paths, drills, reflector and collector),
//! validated once, from every source it can come from, into one type ([`AgentPlan`]).
//!
//! Sources, highest first: the command line, the environment (`PATHPROBE_*`, which clap
//! reads for each flag), the TOML file, then the defaults. The daemon builds its plan from
//! all four, and again on `SIGHUP`; `probe` builds a path's plan ([`PathSection::plan`])
//! from its flags through the same checks; the demo builds one in code. The collector's
//! fleet plan ([`crate::fleet`]) comes in the same sections, and is laid under the file.
//!
//! Relative file names (spool, token and key files) are relative to the config file.
//!
//! ```toml
//! agent_id = "ams-dc1-01"       # default: the host name (--agent-id, PATHPROBE_AGENT_ID)
//! site = "ams"
//!
//! [collector]
//! url = "https://collector.example.net:8862"   # http:// only to loopback, or with:
//! # insecure_http = true        # reports and token in clear beyond loopback (warned hourly)
//! token_file = "agent.token"    # or token = "..."; mode 0600
//! # ca_file = "corp-ca.pem"     # the CA of the collector's certificate (default: the system's)
//! # client_cert = "agent.pem"   # mutual TLS, for a collector with --client-ca
//! # client_key = "agent.key"
//! spool_dir = "spool"           # the default
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
//!
//! [[capacity]]                  # a capacity test in a window (`capacity`), against a far
//! name = "er-size"              # reflector that consents ([reflector] allow_capacity)
//! target = "10.1.0.4:862"
//! start = "2026-11-29T03:00:00Z"
//! duration = "30m"              # the whole test must fit; it is stopped at the window's end
//! max_rate = "500mbit"          # the last stage; start_rate, steps, stage_duration,
//! direction = "both"            # search, tcp_streams... as `capacity`'s flags
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pathprobe_proto::report::{PathKind, ProbeProtocol};
use pathprobe_proto::stamp::{Mode, TimestampFormat};
use serde::Deserialize;

use crate::delivery::{self, Destination, TlsClient};
use crate::failover::{self, FailoverConfig, PinnedPath, StreamTiming};
use crate::probe::ProbeConfig;
use crate::reflector::{self, ReflectorConfig};
use crate::{Error, Result, keyfile};

pub use pathprobe_proto::plan::{
    CapacitySection, DrillSection, FleetPlan, PathSection, ReflectorSection,
    default_max_rate_others,
};
use pathprobe_proto::plan::{DEFAULT_CAPACITY_MAX_RATE, DEFAULT_CAPACITY_MAX_STAGE};

use crate::capacity::client;
use crate::capacity::knee::Thresholds;
use crate::capacity::rate;

/// The configuration file as written (relative files anchored at the file).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// The agent's name in reports [default: the host name].
    pub agent_id: Option<String>,
    pub site: Option<String>,
    pub collector: Option<CollectorSection>,
    pub reflector: Option<ReflectorSection>,
    #[serde(default, rename = "path")]
    pub paths: Vec<PathSection>,
    #[serde(default, rename = "drill")]
    pub drills: Vec<DrillSection>,
    #[serde(default, rename = "capacity")]
    pub capacity: Vec<CapacitySection>,
}

/// Where reports go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSection {
    pub url: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    #[serde(default)]
    pub insecure_http: bool,
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    #[serde(default = "default_spool_max")]
    pub spool_max_reports: usize,
    /// Follow the collector's fleet plan (`GET /v1/plan`) [default: when this file lists
    /// no path, drill or reflector]. See [`crate::fleet`] for how the two layer.
    pub fleet: Option<bool>,
    /// How often the fleet plan is asked for [default: 30s].
    pub plan_poll: Option<String>,
}

const fn default_spool_max() -> usize {
    100_000
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from("spool")
}

/// A reflector's keys: from one file (for every SSID) or a directory (per SSID); `None`
/// for unauthenticated mode.
pub fn load_ring(file: Option<&Path>, dir: Option<&Path>) -> Result<Option<keyfile::KeyRing>> {
    match (file, dir) {
        (Some(f), _) => Ok(Some(keyfile::KeyRing::single(keyfile::load_all(f)?))),
        (None, Some(d)) => keyfile::KeyRing::from_dir(d).map(Some),
        (None, None) => Ok(None),
    }
}

/// What the agent makes of a `[reflector]` section.
pub trait ReflectorSectionExt {
    /// The reflector this section asks for; errors name the file and line.
    fn plan(&self, file: &Path, text: &str) -> Result<ReflectorConfig>;
    /// The reply DSCP policy; what is wrong with it otherwise.
    fn reply_dscp(&self) -> std::result::Result<reflector::ReplyDscp, String>;
    /// The capacity tests it takes part in, and their caps; the field and what is wrong
    /// with it otherwise.
    fn capacity_caps(
        &self,
    ) -> std::result::Result<Option<reflector::CapacityCaps>, (&'static str, String)>;
}

impl ReflectorSectionExt for ReflectorSection {
    fn plan(&self, file: &Path, text: &str) -> Result<ReflectorConfig> {
        let r = self;
        if r.refuse_replays && r.auth_key_file.is_none() && r.auth_key_dir.is_none() {
            let at = line_of(text, &[Key::Name("reflector"), Key::Name("refuse_replays")]);
            return Err(Error::Config(format!(
                "{}{at}: [reflector] refuse_replays needs auth_key_file or auth_key_dir: without authentication anyone can make a new request, so there is nothing to refuse",
                file.display()
            )));
        }
        if r.auth_key_file.is_some() && r.auth_key_dir.is_some() {
            let at = line_of(text, &[Key::Name("reflector"), Key::Name("auth_key_dir")]);
            return Err(Error::Config(format!(
                "{}{at}: [reflector] has both auth_key_file and auth_key_dir: keep one (put the file in the directory as default.key)",
                file.display()
            )));
        }
        let reply_dscp = r.reply_dscp().map_err(|reason| {
            let at = line_of(text, &[Key::Name("reflector"), Key::Name("reply_dscp")]);
            Error::Config(format!(
                "{}{at}: [reflector] reply_dscp: {reason}",
                file.display()
            ))
        })?;
        let capacity = r.capacity_caps().map_err(|(field, reason)| {
            let at = line_of(text, &[Key::Name("reflector"), Key::Name(field)]);
            Error::Config(format!(
                "{}{at}: [reflector] {field}: {reason}",
                file.display()
            ))
        })?;
        Ok(ReflectorConfig {
            listen: r.listen,
            keys: load_ring(r.auth_key_file.as_deref(), r.auth_key_dir.as_deref())?
                .map(|ring| std::sync::Arc::new(keyfile::LiveRing::new(ring))),
            stateful: r.stateful,
            max_rate_per_source: r.max_rate_per_source,
            reply_dscp,
            timestamp_format: TimestampFormat::Ntp,
            admission: reflector::Admission {
                max_rate_total: r.max_rate_total,
                allow: r.allow.clone(),
                max_rate_others: r.max_rate_others,
            },
            refuse_replays: r.refuse_replays,
            capacity,
        })
    }

    fn capacity_caps(
        &self,
    ) -> std::result::Result<Option<reflector::CapacityCaps>, (&'static str, String)> {
        let r = self;
        if !r.allow_capacity {
            if r.capacity_max_rate.is_some() || r.capacity_max_stage.is_some() {
                let field = if r.capacity_max_rate.is_some() {
                    "capacity_max_rate"
                } else {
                    "capacity_max_stage"
                };
                return Err((
                    field,
                    "caps a capacity test, but allow_capacity is not set: add allow_capacity = true, or remove it".to_string(),
                ));
            }
            return Ok(None);
        }
        let max_rate = rate::parse(
            r.capacity_max_rate
                .as_deref()
                .unwrap_or(DEFAULT_CAPACITY_MAX_RATE),
        )
        .map_err(|e| ("capacity_max_rate", e))?;
        let stage = r
            .capacity_max_stage
            .as_deref()
            .unwrap_or(DEFAULT_CAPACITY_MAX_STAGE);
        let max_stage = humantime::parse_duration(stage).map_err(|e| {
            (
                "capacity_max_stage",
                format!("\"{stage}\" is not a duration ({e}): write it like 60s"),
            )
        })?;
        Ok(Some(reflector::CapacityCaps {
            max_rate_bps: max_rate.bps(),
            max_stage,
        }))
    }

    fn reply_dscp(&self) -> std::result::Result<reflector::ReplyDscp, String> {
        self.reply_dscp
            .as_deref()
            .map_or(Ok(reflector::ReplyDscp::Copy), str::parse)
    }
}

/// `value` as a duration, or `default` without one; `owner` names the section in errors
/// (like ``path `vpn` `` or ``drill `svc` ``).
fn duration(
    file: &Path,
    owner: &str,
    field: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration> {
    value.map_or(Ok(default), |v| {
        humantime::parse_duration(v).map_err(|e| {
            Error::Config(format!(
                "{}: {owner}: {field} = \"{v}\" is not a duration ({e}): write it like 10s, 500ms or 1h",
                file.display()
            ))
        })
    })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Settings from the command line or the environment: they win over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub agent_id: Option<String>,
    pub site: Option<String>,
    /// The collector's URL: replaces `[collector] url`, or makes a `[collector]`.
    pub collector: Option<String>,
    pub token_file: Option<PathBuf>,
    pub spool: Option<PathBuf>,
    /// `--ca-file`: replaces `[collector] ca_file`.
    pub ca_file: Option<PathBuf>,
    /// `--insecure-http`: as `[collector] insecure_http = true`.
    pub insecure_http: bool,
}

/// One path to probe, checked: its name and kind in reports, and how to probe it.
#[derive(Debug, Clone, PartialEq)]
pub struct PathPlan {
    pub name: String,
    pub kind: PathKind,
    pub probe: ProbeConfig,
}

/// One drill, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct DrillPlan {
    pub name: String,
    pub proto: ProbeProtocol,
    /// The service address as written.
    pub target: String,
    pub dscp: u8,
    /// When it starts, as written and in ns since 1970.
    pub start: String,
    pub start_ns: u64,
    pub failover: FailoverConfig,
}

/// One scheduled capacity test, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityPlan {
    pub name: String,
    pub kind: PathKind,
    /// When its window opens, as written and in ns since 1970, and how long it lasts.
    pub start: String,
    pub start_ns: u64,
    pub length_ns: u64,
    pub test: client::Plan,
    /// The rate the traffic needs (bits/s), for the recommendation [default: the capacity].
    pub need_bps: Option<u64>,
    pub headroom: f64,
}

/// Everything an agent runs, checked: what the daemon supervises.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPlan {
    pub agent_id: String,
    pub site: Option<String>,
    pub collector: Option<Destination>,
    pub reflector: Option<ReflectorConfig>,
    pub paths: Vec<PathPlan>,
    pub drills: Vec<DrillPlan>,
    pub capacity: Vec<CapacityPlan>,
    /// It follows the collector's fleet plan, asking this often.
    pub fleet_poll: Option<Duration>,
    /// The version of the fleet plan it was built with (every report carries it).
    pub plan_version: Option<String>,
}

/// The host's name, the default agent id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "agent".to_string())
}

impl AgentFile {
    /// Reads `file` (syntax and type errors carry the line), with relative files anchored
    /// at it; the text too, for the lines of later errors.
    pub fn read(file: &Path) -> Result<(Self, String)> {
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
        let base = file.parent().unwrap_or_else(|| Path::new("."));
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(c) = &mut cfg.collector {
            anchor(&mut c.spool_dir);
            c.token_file.as_mut().map(anchor);
            c.ca_file.as_mut().map(anchor);
            c.client_cert.as_mut().map(anchor);
            c.client_key.as_mut().map(anchor);
        }
        if let Some(r) = &mut cfg.reflector {
            r.auth_key_file.as_mut().map(anchor);
            r.auth_key_dir.as_mut().map(anchor);
        }
        for p in &mut cfg.paths {
            p.auth_key_file.as_mut().map(anchor);
        }
        for c in &mut cfg.capacity {
            c.auth_key_file.as_mut().map(anchor);
        }
        Ok((cfg, text))
    }
}

impl AgentPlan {
    /// The plan of the config `file` under `over`. Errors name the file and line, or the
    /// flag, and say how to fix it.
    pub fn load(file: &Path, over: &Overrides) -> Result<Self> {
        let (cfg, text) = AgentFile::read(file)?;
        Self::new(file, &text, cfg, over)
    }

    /// The plan of the config `file` (or of the flags alone, without one) under `over`,
    /// with the collector's fleet plan laid under it when it follows one.
    pub fn load_with_fleet(
        file: Option<&Path>,
        over: &Overrides,
        fleet: Option<&FleetPlan>,
    ) -> Result<Self> {
        match file {
            Some(f) => {
                let (cfg, text) = AgentFile::read(f)?;
                Self::layered(f, &text, cfg, over, fleet)
            }
            None => Self::layered(
                Path::new("the command line"),
                "",
                AgentFile::default(),
                over,
                fleet,
            ),
        }
    }

    /// The plan of `cfg` (read from `origin`, whose TOML `text` gives the lines in errors;
    /// empty for a plan built in code) under `over`.
    pub fn new(origin: &Path, text: &str, cfg: AgentFile, over: &Overrides) -> Result<Self> {
        Self::layered(origin, text, cfg, over, None)
    }

    /// [`Self::new`], with `fleet` laid under the file when the file follows a fleet plan
    /// ([`crate::fleet`]: the local file wins, name by name).
    pub fn layered(
        origin: &Path,
        text: &str,
        mut cfg: AgentFile,
        over: &Overrides,
        fleet: Option<&FleetPlan>,
    ) -> Result<Self> {
        let file = origin;
        if let Some(id) = &over.agent_id {
            check_name("agent_id", id)
                .map_err(|e| Error::Config(format!("--agent-id (PATHPROBE_AGENT_ID): {e}")))?;
        }
        if let Some(site) = &over.site {
            check_name("site", site)
                .map_err(|e| Error::Config(format!("--site (PATHPROBE_SITE): {e}")))?;
        }
        cfg.check_names(file, text)?;
        let agent_id = cfg.agent_id(file, over)?;
        cfg.apply_collector_flags(file, over)?;
        let fleet_poll = cfg.fleet_poll(file)?;
        if fleet_poll.is_some()
            && let Some(f) = fleet
        {
            cfg.lay_over(f);
        }
        let site = over.site.clone().or_else(|| cfg.site.clone());
        if fleet_poll.is_none()
            && cfg.paths.is_empty()
            && cfg.reflector.is_none()
            && cfg.drills.is_empty()
            && cfg.capacity.is_empty()
        {
            return Err(Error::Config(format!(
                "{}: nothing to do: add a [reflector] section, a [[path]], a [[drill]] or a [[capacity]]",
                file.display()
            )));
        }
        let reflector = cfg
            .reflector
            .as_ref()
            .map(|r| r.plan(file, text))
            .transpose()?;
        let collector = cfg
            .collector
            .as_ref()
            .map(|c| c.destination(file, text, over.collector.is_some()))
            .transpose()?;
        let paths = cfg
            .paths
            .iter()
            .map(|p| p.plan(file))
            .collect::<Result<Vec<_>>>()?;
        cfg.check_windows(file, text)?;
        let drills = cfg
            .drills
            .iter()
            .map(|d| d.plan(file))
            .collect::<Result<Vec<_>>>()?;
        let capacity = cfg
            .capacity
            .iter()
            .map(|c| c.plan(file))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            agent_id,
            site,
            collector,
            reflector,
            paths,
            drills,
            capacity,
            fleet_poll,
            plan_version: fleet
                .filter(|_| fleet_poll.is_some())
                .map(|f| f.version.clone()),
        })
    }
}

impl CollectorSection {
    /// Where reports go, checked; `from_flag` when the URL came from `--collector`.
    fn destination(&self, file: &Path, text: &str, from_flag: bool) -> Result<Destination> {
        let c = self;
        check_collector_url(&c.url, c.insecure_http).map_err(|reason| {
            let at = line_of(text, &[Key::Name("collector"), Key::Name("url")]);
            Error::Config(if from_flag {
                format!("--collector (PATHPROBE_COLLECTOR): {reason}")
            } else {
                format!("{}{at}: [collector] url: {reason}", file.display())
            })
        })?;
        if c.spool_max_reports == 0 {
            return Err(Error::Config(format!(
                "{}{}: [collector] spool_max_reports must be at least 1",
                file.display(),
                line_of(
                    text,
                    &[Key::Name("collector"), Key::Name("spool_max_reports")]
                )
            )));
        }
        Ok(Destination {
            url: c.url.clone(),
            token: delivery::read_token(
                c.token.as_deref(),
                c.token_file.as_deref(),
                &format!("{} [collector]", file.display()),
            )?,
            spool_dir: c.spool_dir.clone(),
            spool_max: c.spool_max_reports,
            tls: TlsClient {
                ca_file: c.ca_file.clone(),
                client_cert: c.client_cert.clone(),
                client_key: c.client_key.clone(),
            },
            insecure_http: c.insecure_http,
        })
    }
}

impl AgentFile {
    /// How often the fleet plan is asked for, when this file follows one: `[collector]
    /// fleet`, or by default when the file lists nothing to run.
    fn fleet_poll(&self, file: &Path) -> Result<Option<Duration>> {
        let Some(c) = &self.collector else {
            return Ok(None);
        };
        let nothing_local = self.paths.is_empty()
            && self.drills.is_empty()
            && self.capacity.is_empty()
            && self.reflector.is_none();
        if !c.fleet.unwrap_or(nothing_local) {
            return Ok(None);
        }
        duration(
            file,
            "[collector]",
            "plan_poll",
            c.plan_poll.as_deref(),
            crate::fleet::DEFAULT_POLL,
        )
        .map(Some)
    }

    /// Lays the fleet plan under this file: its paths, drills, capacity tests, reflector
    /// and site, each replaced by a local one of the same name.
    fn lay_over(&mut self, f: &FleetPlan) {
        self.paths = laid_over(
            &f.paths,
            std::mem::take(&mut self.paths),
            |p| &p.name,
            "path",
        );
        self.drills = laid_over(
            &f.drills,
            std::mem::take(&mut self.drills),
            |d| &d.name,
            "drill",
        );
        self.capacity = laid_over(
            &f.capacity,
            std::mem::take(&mut self.capacity),
            |c| &c.name,
            "capacity",
        );
        if self.reflector.is_none() {
            self.reflector.clone_from(&f.reflector);
        }
        if self.site.is_none() {
            self.site = Some(f.site.clone());
        }
    }
}

impl AgentFile {
    /// `--collector`, `--token-file` and `--spool` over the `[collector]` section (or as
    /// one, when the file has none).
    fn apply_collector_flags(&mut self, file: &Path, over: &Overrides) -> Result<()> {
        if let Some(url) = &over.collector {
            let c = self.collector.get_or_insert_with(|| CollectorSection {
                url: url.clone(),
                token: None,
                token_file: None,
                ca_file: None,
                client_cert: None,
                client_key: None,
                insecure_http: false,
                spool_dir: file
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join(default_spool_dir()),
                spool_max_reports: default_spool_max(),
                fleet: None,
                plan_poll: None,
            });
            c.url.clone_from(url);
        }
        if let Some(c) = &mut self.collector {
            if let Some(t) = &over.token_file {
                c.token = None;
                c.token_file = Some(t.clone());
            }
            if let Some(d) = &over.spool {
                c.spool_dir.clone_from(d);
            }
            if let Some(ca) = &over.ca_file {
                c.ca_file = Some(ca.clone());
            }
            c.insecure_http |= over.insecure_http;
        } else if over.token_file.is_some()
            || over.spool.is_some()
            || over.ca_file.is_some()
            || over.insecure_http
        {
            return Err(Error::Config(
                "--token-file, --spool, --ca-file and --insecure-http need a collector: give --collector or a [collector] section".to_string(),
            ));
        }
        Ok(())
    }
}

impl AgentFile {
    /// The agent id: the flag's, the file's, or the host name, which must make one.
    fn agent_id(&self, file: &Path, over: &Overrides) -> Result<String> {
        if let Some(id) = over.agent_id.clone().or_else(|| self.agent_id.clone()) {
            return Ok(id);
        }
        let host = host_name();
        check_name("agent_id", &host).map_err(|e| {
            Error::Config(format!(
                "{}: no agent_id, and the host name does not make one ({e}): set agent_id in the file, or --agent-id",
                file.display()
            ))
        })?;
        Ok(host)
    }

    /// Every `[[drill]]` and `[[capacity]]` of the file says when its window opens and
    /// how long it lasts.
    fn check_windows(&self, file: &Path, text: &str) -> Result<()> {
        let drills = self
            .drills
            .iter()
            .map(|d| ("drill", &d.name, &d.start, &d.duration));
        let tests = self
            .capacity
            .iter()
            .map(|c| ("capacity", &c.name, &c.start, &c.duration));
        let mut index = std::collections::HashMap::new();
        for (table, name, start, length) in drills.chain(tests) {
            let i = *index
                .entry(table)
                .and_modify(|i| *i += 1)
                .or_insert(0_usize);
            for (field, given) in [("start", start.is_some()), ("duration", length.is_some())] {
                if !given {
                    let at = line_of(text, &[Key::Name(table), Key::At(i), Key::Name("name")]);
                    return Err(Error::Config(format!(
                        "{}{at}: {table} `{name}`: {field} is missing: a [[{table}]] runs in a maintenance window, so give start = \"2026-11-28T02:00:00Z\" and duration = \"2h\"",
                        file.display(),
                    )));
                }
            }
        }
        Ok(())
    }

    /// The agent id, the site and every path and drill name follow the rules reports do
    /// (so that no window fails later for its name), and no two paths or drills share a
    /// name. Errors give the file and line.
    fn check_names(&self, file: &Path, text: &str) -> Result<()> {
        let at = |keys: &[Key<'_>]| format!("{}{}", file.display(), line_of(text, keys));
        let named = |field: &'static str, value: &str, keys: &[Key<'_>]| {
            check_name(field, value).map_err(|e| Error::Config(format!("{}: {e}", at(keys))))
        };
        if let Some(id) = &self.agent_id {
            named("agent_id", id, &[Key::Name("agent_id")])?;
        }
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
            )
            .chain(
                self.capacity
                    .iter()
                    .enumerate()
                    .map(|(i, c)| ("capacity", i, &c.name)),
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
                    "{}: {table} name `{name}` is used already (at{first_at}): every path, drill and capacity test needs a name of its own, since its reports are found by it",
                    at(&keys)
                )));
            }
        }
        Ok(())
    }
}

/// What the agent makes of a `[[drill]]` section.
pub trait DrillSectionExt {
    /// When the drill starts (ns since 1970; now without a start) and how long it may run
    /// (ns; until stopped without a duration).
    fn window(&self, file: &Path) -> Result<(u64, Option<u64>)>;
    /// The checked settings of this `[[drill]]` (or of `failover`'s flags); `file` names
    /// the source in errors.
    fn plan(&self, file: &Path) -> Result<DrillPlan>;
}

impl DrillSectionExt for DrillSection {
    fn window(&self, file: &Path) -> Result<(u64, Option<u64>)> {
        let start = self
            .start
            .as_deref()
            .map(drill_start)
            .transpose()
            .map_err(|reason| {
                Error::Config(format!(
                    "{}: drill `{}`: {reason}",
                    file.display(),
                    self.name
                ))
            })?
            .unwrap_or_else(crate::sys::realtime_ns);
        let length = self
            .duration
            .as_deref()
            .map(|v| {
                let owner = format!("drill `{}`", self.name);
                duration(file, &owner, "duration", Some(v), Duration::ZERO)
            })
            .transpose()?;
        Ok((start, length.map(nanos)))
    }

    fn plan(&self, file: &Path) -> Result<DrillPlan> {
        let d = self;
        let bad = |reason: String| {
            Error::Config(format!("{}: drill `{}`: {reason}", file.display(), d.name))
        };
        let owner = format!("drill `{}`", d.name);
        let dur = |field: &str, v: Option<&str>, default: Duration| {
            duration(file, &owner, field, v, default)
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
        let (start, length) = d.window(file)?;
        let late = nanos(dur(
            "timeout",
            d.timeout.as_deref(),
            Duration::from_secs(1),
        )?);
        let window = nanos(dur("window", d.window.as_deref(), Duration::from_secs(10))?);
        let timing = StreamTiming {
            dscp: d.dscp,
            duration_ns: length,
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
            flap_window_ns: nanos(dur(
                "flap_window",
                d.flap_window.as_deref(),
                Duration::from_mins(1),
            )?),
            drill_max_outage_ns: Some(nanos(dur(
                "max_outage",
                d.max_outage.as_deref(),
                Duration::from_secs(10),
            )?)),
        };
        failover::validate(&cfg).map_err(|e| bad(e.to_string()))?;
        Ok(DrillPlan {
            name: d.name.clone(),
            proto: d.proto,
            target: d.target.clone(),
            dscp: d.dscp,
            start: d.start.clone().unwrap_or_else(|| "now".to_string()),
            start_ns: start,
            failover: cfg,
        })
    }
}

/// What the agent makes of a `[[capacity]]` section.
pub trait CapacitySectionExt {
    /// The checked test; `file` names the source in errors.
    fn plan(&self, file: &Path) -> Result<CapacityPlan>;
    /// Its probe rate, load datagram size and RTT factor, checked.
    fn load_settings(&self) -> std::result::Result<(u32, usize, f64), String>;
}

impl CapacitySectionExt for CapacitySection {
    fn load_settings(&self) -> std::result::Result<(u32, usize, f64), String> {
        let probe_rate = self.probe_rate.unwrap_or(100);
        if !(1..=100_000).contains(&probe_rate) {
            return Err(format!(
                "probe_rate = {probe_rate}: give 1 to 100000 probes a second"
            ));
        }
        let size = self.size.unwrap_or(1372);
        let sizes = crate::capacity::wire::HEADER_LEN..=crate::capacity::server::MAX_SIZE;
        if !sizes.contains(&size) {
            return Err(format!(
                "size = {size}: give {} to {} octets of UDP payload",
                sizes.start(),
                sizes.end()
            ));
        }
        let rtt_factor = self.rtt_factor.unwrap_or(3.0);
        if rtt_factor.is_nan() || rtt_factor < 1.0 {
            return Err(format!(
                "rtt_factor = {rtt_factor} is below 1: a stage could never pass"
            ));
        }
        Ok((probe_rate, size, rtt_factor))
    }

    fn plan(&self, file: &Path) -> Result<CapacityPlan> {
        let c = self;
        let bad = |reason: String| {
            Error::Config(format!(
                "{}: capacity `{}`: {reason}",
                file.display(),
                c.name
            ))
        };
        let owner = format!("capacity `{}`", c.name);
        let dur = |field: &str, v: Option<&str>, default: Duration| {
            duration(file, &owner, field, v, default)
        };
        let bits = |field: &str, v: &str| {
            rate::parse(v)
                .map(rate::Rate::bps)
                .map_err(|e| bad(format!("{field}: {e}")))
        };
        let part = |field: &str, v: Option<&str>, default: f64| {
            v.map_or(Ok(default), |v| {
                rate::parse_fraction(v).map_err(|e| bad(format!("{field}: {e}")))
            })
        };
        let target = c
            .target
            .to_socket_addrs()
            .map_err(|e| {
                bad(format!(
                    "target = \"{}\" does not resolve ({e}): write it as HOST:PORT",
                    c.target
                ))
            })?
            .next()
            .ok_or_else(|| bad(format!("target = \"{}\" resolves to no address", c.target)))?;
        let start = c.start.as_deref().unwrap_or_default();
        let start_ns = drill_start(start).map_err(bad)?;
        let length = dur("duration", c.duration.as_deref(), Duration::ZERO)?;
        let shape = c
            .shape()
            .map_err(|(field, reason)| bad(format!("{field}: {reason}")))?;
        let (probe_rate, size, rtt_factor) = c.load_settings().map_err(bad)?;
        let test = client::Plan {
            target,
            control: c.control,
            load_to: c.load_to,
            bind: c.bind,
            interface: c.interface.clone(),
            fwmark: c.fwmark,
            start_bps: shape.start_bps,
            max_bps: shape.max_bps,
            steps: shape.steps,
            search: shape.search,
            stage: shape.stage,
            direction: shape.direction,
            size,
            probe_rate,
            tcp_streams: c.tcp_streams.clone(),
            thresholds: Thresholds {
                min_delivered: part("min_delivered", c.min_delivered.as_deref(), 0.95)?,
                max_loss: part("max_loss", c.max_loss.as_deref(), 0.01)?,
                rtt_factor,
                rtt_allowance_ns: nanos(dur(
                    "rtt_allowance",
                    c.rtt_allowance.as_deref(),
                    Duration::from_millis(1),
                )?),
            },
            key: c.auth_key_file.as_deref().map(keyfile::load).transpose()?,
        };
        let longest = test.longest();
        if longest > length {
            return Err(bad(format!(
                "the test can take up to {} (its stages, each measured twice when an RTT spike fails it, and the idle and TCP stages), longer than its window of {}: lengthen duration, or shorten stage_duration or steps",
                humantime::format_duration(longest),
                humantime::format_duration(length)
            )));
        }
        Ok(CapacityPlan {
            name: c.name.clone(),
            kind: c.kind.unwrap_or(PathKind::Other),
            start: start.to_string(),
            start_ns,
            length_ns: nanos(length),
            test,
            need_bps: c.need.as_deref().map(|v| bits("need", v)).transpose()?,
            headroom: part("headroom", c.headroom.as_deref(), 0.3)?,
        })
    }
}

/// What the agent makes of a `[[path]]` section.
pub trait PathSectionExt {
    /// The checked settings of this `[[path]]` (or of `probe`'s flags); `file` names the
    /// source in errors.
    fn plan(&self, file: &Path) -> Result<PathPlan>;
}

impl PathSectionExt for PathSection {
    fn plan(&self, file: &Path) -> Result<PathPlan> {
        let p = self;
        let owner = format!("path `{}`", p.name);
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
                &owner,
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
                &owner,
                "window",
                p.window.as_deref(),
                Duration::from_secs(10),
            )?),
            late_timeout_ns: nanos(duration(
                file,
                &owner,
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
        Ok(PathPlan {
            name: p.name.clone(),
            kind: p.kind,
            probe: cfg,
        })
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

/// The fleet's sections with the local ones over them: a local one replaces the fleet's
/// of its name, the others are added.
fn laid_over<T: Clone>(
    fleet: &[T],
    local: Vec<T>,
    name: impl Fn(&T) -> &String,
    what: &str,
) -> Vec<T> {
    let mut out = fleet.to_vec();
    for l in local {
        if let Some(f) = out.iter_mut().find(|f| name(f) == name(&l)) {
            tracing::info!(name = %name(&l), "the local [[{what}]] replaces the fleet plan's");
            *f = l;
        } else {
            out.push(l);
        }
    }
    out
}

/// A name as reports carry it, checked with the rules of `proto`.
fn check_name(field: &'static str, value: &str) -> std::result::Result<(), String> {
    pathprobe_proto::report::check_name(field, value).map_err(|e| e.to_string())
}

/// The collector's address: `http://HOST:PORT`.
fn check_collector_url(url: &str, insecure_http: bool) -> std::result::Result<(), String> {
    let uri: ureq::http::Uri = url.parse().map_err(|e| {
        format!("\"{url}\" is not a URL ({e}): write it like https://collector.example.net:8862")
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
                "\"{url}\": `{other}://` is not how reports travel: write it like https://collector.example.net:8862"
            ));
        }
        None => {
            return Err(format!(
                "\"{url}\" has no scheme: write it like https://collector.example.net:8862"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "\"{url}\" names no host: write it like https://collector.example.net:8862"
        ));
    }
    if delivery::cleartext_beyond_loopback(url) && !insecure_http {
        return Err(format!(
            "\"{url}\" would send reports and the agent's token in clear beyond this host: use https:// (the collector's --tls-cert), or set insecure_http = true in [collector] (--insecure-http) on a network you trust"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pathprobe-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        // Token and key files among them: readable by their owner alone, as they must be.
        pathprobe_tests::pki::write(&p, text, true);
        p
    }

    #[test]
    fn a_syntax_error_names_file_and_line() {
        let p = write(
            "syntax.toml",
            "agent_id = \"a\"\n\n[[path]]\nname = \"er\"\nrate = ten\n",
        );
        let err = AgentPlan::load(&p, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("syntax.toml:5"), "{err}");
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_line() {
        let p = write(
            "unknown.toml",
            "agent_id = \"a\"\n[reflector]\nlisten = \"127.0.0.1:8620\"\nlisen = 1\n",
        );
        let err = AgentPlan::load(&p, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown.toml:4") && err.contains("lisen"),
            "{err}"
        );
    }

    #[test]
    fn a_capacity_test_is_checked_field_by_field_and_must_fit_its_window() {
        let test = |extra: &str| {
            let p = write(
                "capacity.toml",
                &format!(
                    "agent_id = \"a\"\n[[capacity]]\nname = \"er-size\"\ntarget = \"127.0.0.1:8620\"\nmax_rate = \"50mbit\"\n{extra}"
                ),
            );
            AgentPlan::load(&p, &Overrides::default())
        };
        let window = "start = \"2026-11-28T02:00:00Z\"\nduration = \"10m\"\n";
        let ok = test(&format!(
            "{window}direction = \"both\"\ntcp_streams = [1, 4]\n"
        ))
        .unwrap();
        let c = &ok.capacity[0];
        assert_eq!(c.start_ns, 1_795_831_200_000_000_000);
        assert_eq!(c.length_ns, 600_000_000_000);
        assert_eq!(
            c.kind,
            PathKind::Other,
            "its own kind: loaded RTT stays out of the path's"
        );
        let t = &c.test;
        assert_eq!(
            (t.start_bps, t.max_bps, t.steps),
            (10_000_000, 50_000_000, 5)
        );
        assert_eq!(
            t.stage,
            Duration::from_secs(5),
            "the defaults of `capacity`"
        );
        assert_eq!(t.direction, crate::capacity::wire::Direction::Both);
        assert_eq!((t.size, t.probe_rate), (1372, 100));
        assert!((t.thresholds.min_delivered - 0.95).abs() < 1e-9);
        assert!((c.headroom - 0.3).abs() < 1e-9);
        let err = |extra: &str| test(extra).unwrap_err().to_string();
        let e = err("duration = \"10m\"\n");
        assert!(
            e.contains("capacity.toml:3:") && e.contains("capacity `er-size`: start is missing"),
            "{e}"
        );
        let e = err(&window.replace("10m", "30s"));
        assert!(
            e.contains("can take up to 1m 20s") && e.contains("window of 30s"),
            "{e}"
        );
        let e = err(&format!("{window}start_rate = \"80mbit\"\n"));
        assert!(
            e.contains("start_rate: 80.0 Mbit/s is above max_rate 50.0 Mbit/s"),
            "{e}"
        );
        let e = err(&format!("{window}max_loss = \"half\"\n"));
        assert!(e.contains("max_loss: `half` is not a fraction"), "{e}");
        let e = err(&format!("{window}steps = 0\n"));
        assert!(e.contains("steps: 0: give 1 to 50 stages"), "{e}");
        let e = err(&format!("{window}max_rate_ = 1\n"));
        assert!(
            e.contains("capacity.toml:8") && e.contains("max_rate_"),
            "{e}"
        );
        let e = err(&format!(
            "{window}[[path]]\nname = \"er-size\"\nkind = \"vpn\"\ntarget = \"127.0.0.1:8620\"\n"
        ));
        assert!(e.contains("name `er-size` is used already"), "{e}");
    }

    #[test]
    fn a_reflector_takes_part_in_capacity_tests_only_when_it_says_so() {
        let refl = |extra: &str| {
            let p = write(
                "refl-capacity.toml",
                &format!("agent_id = \"a\"\n[reflector]\nlisten = \"127.0.0.1:8620\"\n{extra}"),
            );
            AgentPlan::load(&p, &Overrides::default())
        };
        assert_eq!(refl("").unwrap().reflector.unwrap().capacity, None);
        assert_eq!(
            refl("allow_capacity = true\n")
                .unwrap()
                .reflector
                .unwrap()
                .capacity,
            Some(reflector::CapacityCaps {
                max_rate_bps: 1_000_000_000,
                max_stage: Duration::from_mins(1),
            }),
            "the caps of `reflect --allow-capacity`"
        );
        let e = refl("capacity_max_rate = \"100mbit\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refl-capacity.toml:4: [reflector] capacity_max_rate")
                && e.contains("add allow_capacity = true"),
            "{e}"
        );
        let e = refl("allow_capacity = true\ncapacity_max_rate = \"100mbps\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ambiguous"), "{e}");
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
        let ok = AgentPlan::load(
            &drill("start = \"2026-11-28T02:00:00Z\"\n"),
            &Overrides::default(),
        )
        .unwrap();
        let cfg = &ok.drills[0].failover;
        assert_eq!(ok.drills[0].start_ns, 1_795_831_200_000_000_000);
        assert_eq!(
            cfg.service.interval_ns, 1_000_000,
            "1,000 probes/s by default"
        );
        assert_eq!(
            cfg.drill_max_outage_ns,
            Some(10_000_000_000),
            "10 s by default"
        );
        let err = AgentPlan::load(&drill("start = \"Saturday 2am\"\n"), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("drill `svc`: start") && err.contains("2026-11-28T02:00:00Z"),
            "{err}"
        );
        let err = AgentPlan::load(
            &drill("start = \"2026-11-28T02:00:00Z\"\nmax_outage = \"soon\"\n"),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("drill `svc`: max_outage"), "{err}");
        let err = AgentPlan::load(
            &drill("start = \"2026-11-28T02:00:00Z\"\nproto = \"tcp-connect\"\n"),
            &Overrides::default(),
        )
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
        let err = AgentPlan::load(&p, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("path `vpn`: window") && err.contains("10s"),
            "{err}"
        );
        let p = write(
            "size.toml",
            "agent_id = \"a\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"127.0.0.1:8620\"\nsize = 9000\n",
        );
        let err = AgentPlan::load(&p, &Overrides::default())
            .unwrap_err()
            .to_string();
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
        let cfg = AgentPlan::load(&p, &Overrides::default()).unwrap();
        assert_eq!(cfg.paths[0].probe.protocol, ProbeProtocol::TcpConnect);
        let p = write(
            "badproto.toml",
            "agent_id = \"a\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"127.0.0.1:443\"\nproto = \"icmp\"\n",
        );
        let err = AgentPlan::load(&p, &Overrides::default())
            .unwrap_err()
            .to_string();
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
        let cfg = AgentPlan::load(&p, &Overrides::default()).unwrap();
        assert_eq!(
            cfg.collector.unwrap().spool_dir,
            p.parent().unwrap().join("spool")
        );
    }

    #[test]
    fn the_example_config_loads() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agent.toml");
        let cfg = AgentPlan::load(&p, &Overrides::default()).unwrap();
        assert_eq!(cfg.paths.len(), 2);
        assert_eq!(cfg.paths[0].kind, PathKind::Expressroute);
    }

    #[test]
    fn the_command_line_wins_over_the_file_and_the_file_over_the_defaults() {
        let p = write(
            "layers.toml",
            "site = \"ams\"\n[collector]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n[reflector]\nlisten = \"127.0.0.1:8620\"\n",
        );
        let plain = AgentPlan::load(&p, &Overrides::default()).unwrap();
        assert_eq!(
            plain.agent_id,
            host_name(),
            "no agent_id anywhere: the host name"
        );
        assert_eq!(plain.site.as_deref(), Some("ams"));
        let c = plain.collector.unwrap();
        assert_eq!(
            c.spool_dir,
            p.parent().unwrap().join("spool"),
            "the default spool"
        );
        assert_eq!(c.token.as_deref(), Some("t"));
        assert_eq!(c.spool_max, 100_000);

        let token = write("layers.token", "from-file\n");
        let over = Overrides {
            agent_id: Some("cli-agent".into()),
            site: Some("fra".into()),
            collector: Some("http://127.0.0.1:2".into()),
            token_file: Some(token),
            spool: Some(PathBuf::from("/tmp/elsewhere")),
            ..Overrides::default()
        };
        let layered = AgentPlan::load(&p, &over).unwrap();
        assert_eq!(layered.agent_id, "cli-agent");
        assert_eq!(layered.site.as_deref(), Some("fra"));
        let c = layered.collector.unwrap();
        assert_eq!(c.url, "http://127.0.0.1:2");
        assert_eq!(
            c.token.as_deref(),
            Some("from-file"),
            "the flag's token file replaces the inline token"
        );
        assert_eq!(c.spool_dir, PathBuf::from("/tmp/elsewhere"));
    }

    #[test]
    fn a_collector_may_come_from_the_command_line_alone() {
        let p = write(
            "nocollector.toml",
            "agent_id = \"a\"\n[reflector]\nlisten = \"127.0.0.1:8620\"\n",
        );
        let over = Overrides {
            collector: Some("http://127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let c = AgentPlan::load(&p, &over).unwrap().collector.unwrap();
        assert_eq!(c.url, "http://127.0.0.1:3");
        assert_eq!(c.spool_dir, p.parent().unwrap().join("spool"));
        let lonely = Overrides {
            spool: Some(PathBuf::from("/tmp/x")),
            ..Overrides::default()
        };
        let err = AgentPlan::load(&p, &lonely).unwrap_err().to_string();
        assert!(err.contains("need a collector"), "{err}");
        let https = Overrides {
            collector: Some("https://127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let c = AgentPlan::load(&p, &https).unwrap().collector.unwrap();
        assert_eq!(c.url, "https://127.0.0.1:3");
        let clear = Overrides {
            collector: Some("http://10.0.0.5:8862".into()),
            ..Overrides::default()
        };
        let err = AgentPlan::load(&p, &clear).unwrap_err().to_string();
        assert!(
            err.contains("--collector") && err.contains("insecure_http = true"),
            "{err}"
        );
        let allowed = Overrides {
            insecure_http: true,
            ..clear
        };
        let c = AgentPlan::load(&p, &allowed).unwrap().collector.unwrap();
        assert!(c.insecure_http, "--insecure-http allows it");
        let bad = Overrides {
            collector: Some("ftp://127.0.0.1:3".into()),
            ..Overrides::default()
        };
        let err = AgentPlan::load(&p, &bad).unwrap_err().to_string();
        assert!(err.contains("--collector"), "{err}");
        let bad_id = Overrides {
            agent_id: Some("has space".into()),
            ..Overrides::default()
        };
        let err = AgentPlan::load(&p, &bad_id).unwrap_err().to_string();
        assert!(err.contains("--agent-id"), "{err}");
    }

    #[test]
    fn a_changed_key_file_changes_the_plan() {
        let key = write("plan.key", &"ab".repeat(32));
        let text = format!(
            "agent_id = \"a\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"127.0.0.1:8620\"\nauth_key_file = \"{}\"\n",
            key.display()
        );
        let p = write("keyed.toml", &text);
        let first = AgentPlan::load(&p, &Overrides::default()).unwrap();
        assert_eq!(first, AgentPlan::load(&p, &Overrides::default()).unwrap());
        std::fs::write(&key, "cd".repeat(32)).unwrap();
        let second = AgentPlan::load(&p, &Overrides::default()).unwrap();
        assert_ne!(
            first.paths[0], second.paths[0],
            "a new key changes the plan (the daemon rekeys the running path)"
        );
    }

    #[test]
    fn a_reflector_key_directory_loads_and_a_new_key_changes_only_the_keys() {
        let dir =
            std::env::temp_dir().join(format!("pathprobe-config-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("000a.key");
        pathprobe_tests::pki::write(&key, &"ab".repeat(32), true);
        let p = write(
            "keydir.toml",
            &format!(
                "agent_id = \"a\"\n[reflector]\nlisten = \"127.0.0.1:8620\"\nauth_key_dir = \"{}\"\n",
                dir.display()
            ),
        );
        let first = AgentPlan::load(&p, &Overrides::default())
            .unwrap()
            .reflector
            .unwrap();
        assert_eq!(first.keys.as_ref().unwrap().get().for_ssid(10).len(), 1);
        assert!(first.keys.as_ref().unwrap().get().for_ssid(11).is_empty());
        std::fs::write(&key, format!("{}\n{}\n", "cd".repeat(32), "ab".repeat(32))).unwrap();
        let second = AgentPlan::load(&p, &Overrides::default())
            .unwrap()
            .reflector
            .unwrap();
        assert_ne!(first, second);
        assert!(
            first.differs_only_in_keys(&second),
            "the running reflector takes the keys"
        );
        let moved = ReflectorConfig {
            stateful: true,
            ..second.clone()
        };
        assert!(
            !first.differs_only_in_keys(&moved),
            "a changed reflector starts again"
        );
        let both = write(
            "bothkeys.toml",
            &format!(
                "agent_id = \"a\"\n[reflector]\nauth_key_file = \"{}\"\nauth_key_dir = \"{}\"\n",
                key.display(),
                dir.display()
            ),
        );
        let err = AgentPlan::load(&both, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bothkeys.toml:4") && err.contains("keep one"),
            "{err}"
        );
    }

    #[test]
    fn a_drill_in_the_file_needs_its_window_and_the_flags_need_none() {
        let p = write(
            "nowindow.toml",
            "agent_id = \"a\"\n[[drill]]\nname = \"svc\"\ntarget = \"127.0.0.1:8620\"\nduration = \"1h\"\n",
        );
        let err = AgentPlan::load(&p, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nowindow.toml:3") && err.contains("start is missing"),
            "{err}"
        );
        let flags = DrillSection {
            name: "svc".into(),
            proto: ProbeProtocol::Stamp,
            target: "127.0.0.1:8620".into(),
            rate: Some(100),
            primary: Some("127.0.0.2:862,fwmark=7".into()),
            backup: None,
            pinned_rate: None,
            start: None,
            duration: None,
            max_outage: None,
            min_outage: None,
            settle: None,
            flap_window: Some("30s".into()),
            window: None,
            timeout: None,
            dscp: 46,
            bind: None,
            interface: None,
            fwmark: None,
        };
        let before = crate::sys::realtime_ns();
        let d = flags.plan(Path::new("the command line")).unwrap();
        assert!(d.start_ns >= before, "no start: now");
        assert_eq!(
            d.failover.service.duration_ns, None,
            "no duration: until stopped"
        );
        assert_eq!(d.failover.flap_window_ns, 30_000_000_000);
        assert_eq!(d.failover.primary.unwrap().fwmark, Some(7));
    }
}
