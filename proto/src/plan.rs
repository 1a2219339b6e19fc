//! What an agent runs, in the shape agent.toml writes it: the `[reflector]`, `[[path]]`,
//! `[[drill]]` and `[[capacity]]` sections. The agent checks them and turns them into its plan
//! (`pathprobe_agent::plan`); the collector's fleet planner writes them, expanded per
//! agent, into the [`FleetPlan`] it serves (`GET /v1/plan`), so both ends share one
//! definition and an agent reads a fleet plan exactly as it reads its own file.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::capacity::{Direction, Shape};
use crate::rate::{self, Rate};
use crate::report::{PathKind, ProbeProtocol};

/// A failover drill at a set time: the options of `failover --drill`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// When the drill starts (RFC 3339); required in the file, now for `failover`.
    pub start: Option<String>,
    /// How long the maintenance window lasts; required in the file, until Ctrl-C for
    /// `failover`.
    pub duration: Option<String>,
    /// The longest outage that passes [default: 10s].
    pub max_outage: Option<String>,
    pub min_outage: Option<String>,
    pub settle: Option<String>,
    /// Three path switches within this long are flapping [default: 60s].
    pub flap_window: Option<String>,
    pub window: Option<String>,
    pub timeout: Option<String>,
    #[serde(default)]
    pub dscp: u8,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
}

/// A capacity test at a set time, in a window, against a far end that consents (its
/// reflector takes part in capacity tests: `allow_capacity`): the options of `capacity`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacitySection {
    /// The path name of its stage reports.
    pub name: String,
    /// The path kind of its stage reports [default: other].
    pub kind: Option<PathKind>,
    /// The far agent's reflector, `HOST:PORT`.
    pub target: String,
    pub control: Option<SocketAddr>,
    pub load_to: Option<SocketAddr>,
    /// When the window opens (RFC 3339).
    pub start: Option<String>,
    /// How long the window lasts: the whole test must fit in it, and is stopped at its end.
    pub duration: Option<String>,
    /// The load of the last stage, the most the test offers (`500mbit`).
    pub max_rate: String,
    /// The load of the first stage [default: 10mbit].
    pub start_rate: Option<String>,
    /// Stages from `start_rate` to `max_rate` [default: 5].
    pub steps: Option<u32>,
    /// Search for the knee (bisection to 5%) instead of the staircase.
    #[serde(default)]
    pub search: bool,
    /// Length of each stage [default: 5s].
    pub stage_duration: Option<String>,
    /// Which way to load the path, seen from this agent [default: up].
    pub direction: Option<Direction>,
    /// UDP payload octets of the load [default: 1372].
    pub size: Option<usize>,
    /// STAMP probes a second under the load [default: 100].
    pub probe_rate: Option<u32>,
    /// TCP goodput stages with these numbers of streams.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_streams: Vec<u32>,
    /// The far reflector's key file, when it has keys.
    pub auth_key_file: Option<PathBuf>,
    /// A stage passes with at least this much delivered [default: 95%].
    pub min_delivered: Option<String>,
    /// ...and at most this much lost [default: 1%].
    pub max_loss: Option<String>,
    /// ...and a p99 RTT at most this times the idle p99 [default: 3]...
    pub rtt_factor: Option<f64>,
    /// ...or the idle p99 plus this, whichever is larger [default: 1ms].
    pub rtt_allowance: Option<String>,
    /// The rate the traffic needs, for the recommendation [default: the capacity found].
    pub need: Option<String>,
    /// Headroom on top of the need [default: 30%].
    pub headroom: Option<String>,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
}

impl CapacitySection {
    /// The stages it asks for, the defaults filled in (those of `capacity`'s flags); the
    /// field and what is wrong with it otherwise.
    pub fn shape(&self) -> Result<Shape, (&'static str, String)> {
        let bits = |field, v: &str| rate::parse(v).map(Rate::bps).map_err(|e| (field, e));
        let max_bps = bits("max_rate", &self.max_rate)?;
        let start_bps = bits("start_rate", self.start_rate.as_deref().unwrap_or("10mbit"))?;
        if start_bps > max_bps {
            return Err((
                "start_rate",
                format!(
                    "{} is above max_rate {}: the first stage is the lightest",
                    Rate(start_bps),
                    Rate(max_bps)
                ),
            ));
        }
        let steps = self.steps.unwrap_or(5);
        if !(1..=50).contains(&steps) {
            return Err(("steps", format!("{steps}: give 1 to 50 stages")));
        }
        let text = self.stage_duration.as_deref().unwrap_or("5s");
        let stage = humantime::parse_duration(text).map_err(|e| {
            (
                "stage_duration",
                format!("\"{text}\" is not a duration ({e}): write it like 5s"),
            )
        })?;
        if stage.is_zero() {
            return Err(("stage_duration", "must be above zero".to_string()));
        }
        if let Some(n) = self.tcp_streams.iter().find(|n| !(1..=64).contains(*n)) {
            return Err(("tcp_streams", format!("{n} streams: give 1 to 64")));
        }
        Ok(Shape {
            start_bps,
            max_bps,
            steps,
            search: self.search,
            stage,
            direction: self.direction.unwrap_or(Direction::Up),
            tcp_stages: self.tcp_streams.len(),
        })
    }
}

/// The reflector, if this agent answers probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReflectorSection {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub stateful: bool,
    /// Authenticated mode: the key(s) for every SSID (one per line, newest first).
    pub auth_key_file: Option<PathBuf>,
    /// Authenticated mode: a key file per SSID (`000a.key`) and `default.key`.
    pub auth_key_dir: Option<PathBuf>,
    #[serde(default = "default_max_rate")]
    pub max_rate_per_source: u32,
    /// `copy` (the default), `keep` or a DSCP from 0 to 63: see `reflect --reply-dscp`.
    pub reply_dscp: Option<String>,
    /// Most replies a second over all sources (0: no cap): see `reflect --max-rate-total`.
    #[serde(default)]
    pub max_rate_total: u32,
    /// The configured senders' prefixes, answered first: see `reflect --allow`.
    #[serde(default)]
    pub allow: Vec<IpNet>,
    /// Most replies a second to all other sources together, with `allow`.
    #[serde(default = "default_max_rate_others")]
    pub max_rate_others: u32,
    /// Authenticated mode: refuse replayed requests (see `reflect --refuse-replays`).
    #[serde(default)]
    pub refuse_replays: bool,
    /// Take part in capacity tests (see `reflect --allow-capacity`): the consent a
    /// `[[capacity]]` against this reflector needs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_capacity: bool,
    /// The highest load a capacity test may ask of it [default: 1gbit].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_max_rate: Option<String>,
    /// The longest stage a capacity test may ask of it [default: 60s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_max_stage: Option<String>,
}

/// `reflect --capacity-max-rate`'s default.
pub const DEFAULT_CAPACITY_MAX_RATE: &str = "1gbit";
/// `reflect --capacity-max-stage`'s default.
pub const DEFAULT_CAPACITY_MAX_STAGE: &str = "60s";

/// `reflect --max-rate-others`'s default.
pub const fn default_max_rate_others() -> u32 {
    1_000
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 862))
}

pub const fn default_max_rate() -> u32 {
    250_000
}

/// One path to probe: the options of `probe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl Default for ReflectorSection {
    /// What `[reflector]` alone asks for.
    fn default() -> Self {
        Self {
            listen: default_listen(),
            stateful: false,
            auth_key_file: None,
            auth_key_dir: None,
            max_rate_per_source: default_max_rate(),
            reply_dscp: None,
            max_rate_total: 0,
            allow: Vec::new(),
            max_rate_others: default_max_rate_others(),
            refuse_replays: false,
            allow_capacity: false,
            capacity_max_rate: None,
            capacity_max_stage: None,
        }
    }
}

/// One agent's plan from the collector's fleet file, as `GET /v1/plan` serves it. Its
/// sections are those of agent.toml; `version` names the plan (it changes whenever the
/// expansion for this agent does), and every report measured under it carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPlan {
    pub version: String,
    pub agent_id: String,
    pub site: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflector: Option<ReflectorSection>,
    #[serde(default, rename = "path", skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathSection>,
    #[serde(default, rename = "drill", skip_serializing_if = "Vec::is_empty")]
    pub drills: Vec<DrillSection>,
    #[serde(default, rename = "capacity", skip_serializing_if = "Vec::is_empty")]
    pub capacity: Vec<CapacitySection>,
}
