//! What an agent runs, in the shape agent.toml writes it: the `[reflector]`, `[[path]]`
//! and `[[drill]]` sections. The agent checks them and turns them into its plan
//! (`pathprobe_agent::plan`); the collector's fleet planner writes them, expanded per
//! agent, into the [`FleetPlan`] it serves (`GET /v1/plan`), so both ends share one
//! definition and an agent reads a fleet plan exactly as it reads its own file.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

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
}

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
        }
    }
}

/// One agent's plan from the collector's fleet file, as `GET /v1/plan` serves it. Its
/// sections are those of agent.toml; `version` names the plan (it changes whenever the
/// expansion for this agent does), and every report measured under it carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}
