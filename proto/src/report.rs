//! The window report an agent sends to the collector: one per path per window, with u64
//! counters and one histogram per metric. JSON, with histograms as base64 HdrHistogram V2
//! (deflated, V2+DEFLATE, when the V2 form is over [`crate::hist::DEFLATE_ABOVE`] octets).
//!
//! ```json
//! {"version":1,"report_id":"…32 hex…","agent_id":"ams-dc1-01","site":"ams",
//!  "path":{"name":"er-primary","kind":"expressroute","local":"10.1.0.4:40000",
//!          "remote":"10.20.0.4:862","protocol":"stamp","dscp":46,"packet_size":44},
//!  "window":{"start_unix_ns":…,"end_unix_ns":…},
//!  "timestamping":{"rx":"kernel","tx":"userspace"},
//!  "owd_clock":{"state":"estimated","offset_ns":-1200,"samples":50},
//!  "counters":{"sent":100,"received":99,…},
//!  "histograms":{"rtt_ns":"HISTEwAA…","ipdv_ns":"…"}}
//! ```
//!
//! The version is read first: a report from a newer agent is refused with
//! [`Error::UnsupportedVersion`], never half-read.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::event::{self, PathEvent, Signature};
use crate::hist::{self, Compact, Metric};
use crate::{Error, Result};

/// The report format this build writes and the newest it reads.
pub const REPORT_VERSION: u32 = 1;

/// Longest agent id, site or path name.
pub const MAX_NAME_LEN: usize = 64;

/// The highest probe rate a window can claim: 10^7 probes a second, far above any one
/// sender (the engine tops out near 10^6/s). Every packet counter and histogram count of a
/// window is bounded by this rate over the window's length (at least one second).
pub const MAX_PROBES_PER_SECOND: u64 = 10_000_000;

/// The longest window a report may cover.
pub const MAX_WINDOW_NS: u64 = 3_600_000_000_000;

/// How far past the receiver's clock a window may end (agent clocks drift; NTP keeps them
/// within milliseconds, so five minutes is a broken clock, not drift).
pub const MAX_FUTURE_NS: u64 = 300_000_000_000;

/// Most extra copies of one answer a window can count as duplicates: a path that copies
/// every packet more often than this is a forwarding loop, not a measurement.
pub const MAX_COPIES_PER_ANSWER: u64 = 16;

/// Largest probe payload whose octets the counters can add (a UDP datagram).
const MAX_PROBE_OCTETS: u64 = 65_535;

/// What kind of path a probe measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    /// An Azure ExpressRoute circuit: private, the primary path.
    Expressroute,
    /// A site-to-site IPsec VPN over the internet: the backup path.
    Vpn,
    /// The public internet without a tunnel.
    Internet,
    /// Anything else.
    Other,
}

/// How a path is probed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeProtocol {
    /// STAMP over UDP (RFC 8762).
    #[default]
    Stamp,
    /// Half-open TCP handshake timing from a raw socket.
    TcpSyn,
    /// Full `connect()` timing.
    TcpConnect,
}

macro_rules! names {
    ($ty:ty, $($variant:ident = $name:literal),+) => {
        impl $ty {
            /// Every value.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];
            /// The name used in JSON, configuration and on the command line.
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok(Self::$variant),)+
                    other => Err(format!(
                        "unknown {} `{other}`: use one of {}",
                        stringify!($ty),
                        [$($name),+].join(", ")
                    )),
                }
            }
        }
    };
}

names!(
    PathKind,
    Expressroute = "expressroute",
    Vpn = "vpn",
    Internet = "internet",
    Other = "other"
);
names!(
    ProbeProtocol,
    Stamp = "stamp",
    TcpSyn = "tcp-syn",
    TcpConnect = "tcp-connect"
);

/// The path a report describes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PathInfo {
    pub name: String,
    pub kind: PathKind,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub protocol: ProbeProtocol,
    /// DSCP the probes were sent with (0 to 63).
    pub dscp: u8,
    /// UDP payload or TCP segment size of a probe, in octets; 0 for `tcp-connect`, whose
    /// SYN the kernel builds.
    pub packet_size: u16,
}

/// The measurement window, in nanoseconds since 1970 (wall clock), end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
}

/// Where a timestamp was taken, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimestampSource {
    /// By the NIC (`SO_TIMESTAMPING` hardware stamps).
    Hardware,
    /// By the kernel (`SO_TIMESTAMPING` software stamps or `SO_TIMESTAMPNS`).
    Kernel,
    /// By pathprobe itself, around the system call.
    Userspace,
}

/// How the window's receive and transmit timestamps were taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Timestamping {
    pub rx: TimestampSource,
    pub tx: TimestampSource,
}

/// The state of the clocks behind one-way delay. One-way delay is never reported without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ClockState {
    /// Both clocks are synchronized (kernel NTP/PTP status); the sum of their maximum
    /// errors bounds the one-way delay error.
    Synchronized { max_error_ns: u64 },
    /// Clocks not known to be synchronized: the offset was estimated from the lowest-RTT
    /// samples (assuming a symmetric path at minimum delay) and removed.
    Estimated { offset_ns: i64, samples: u32 },
    /// No one-way delay this window.
    Unavailable,
}

/// The window's u64 counters. Loss, reordering and duplication are counted separately
/// (RFC 4737 style): a late packet is never loss, a duplicate never a receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Counters {
    /// Probes sent.
    pub sent: u64,
    /// Distinct probes answered within the late timeout.
    pub received: u64,
    /// Probes with no answer within the late timeout.
    pub lost: u64,
    /// Extra copies of answers already counted.
    pub duplicated: u64,
    /// Answers that arrived after one with a higher sequence number.
    pub reordered: u64,
    /// Answers that arrived after the late timeout (already counted as lost).
    pub late: u64,
    /// Send slots of the schedule that passed before the probe could be sent.
    pub send_slots_missed: u64,
    /// Records dropped because a ring between threads was full.
    pub ring_drops: u64,
    /// Answers that could not be parsed or authenticated, or that echo a sequence number
    /// never sent.
    pub malformed: u64,
    /// One-way delays that came out negative (clock error larger than the delay) and were
    /// recorded as 0.
    pub owd_clamped: u64,
    /// Answers that refused the probe (a TCP RST: nothing listens on the port). They are
    /// counted in `received` too, since they crossed the path and time it.
    pub refused: u64,
    /// Probe octets sent (UDP payload).
    pub bytes_sent: u64,
    /// Probe octets received (UDP payload).
    pub bytes_received: u64,
    /// The exact sums of the samples of the RTT, IPDV and one-way delay histograms, ns
    /// (the histograms hold each sample only to 0.1%): what an exported histogram's `sum`
    /// is. 0 from agents older than these fields.
    #[serde(skip_serializing_if = "is_zero")]
    pub rtt_sum_ns: u128,
    #[serde(skip_serializing_if = "is_zero")]
    pub ipdv_sum_ns: u128,
    #[serde(skip_serializing_if = "is_zero")]
    pub owd_fwd_sum_ns: u128,
    #[serde(skip_serializing_if = "is_zero")]
    pub owd_rev_sum_ns: u128,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
const fn is_zero(v: &u128) -> bool {
    *v == 0
}

impl Counters {
    /// Adds `other` into `self`; refuses (changing nothing) if any counter would overflow.
    pub fn merge(&mut self, other: &Self) -> Result<()> {
        let add = |a: u64, b: u64, name| {
            a.checked_add(b).ok_or_else(|| Error::Merge {
                what: "counters",
                reason: format!("`{name}` would exceed 2^64"),
            })
        };
        let add_sum = |a: u128, b: u128, name| {
            a.checked_add(b).ok_or_else(|| Error::Merge {
                what: "counters",
                reason: format!("`{name}` would exceed 2^128"),
            })
        };
        *self = Self {
            sent: add(self.sent, other.sent, "sent")?,
            received: add(self.received, other.received, "received")?,
            lost: add(self.lost, other.lost, "lost")?,
            duplicated: add(self.duplicated, other.duplicated, "duplicated")?,
            reordered: add(self.reordered, other.reordered, "reordered")?,
            late: add(self.late, other.late, "late")?,
            send_slots_missed: add(
                self.send_slots_missed,
                other.send_slots_missed,
                "send_slots_missed",
            )?,
            ring_drops: add(self.ring_drops, other.ring_drops, "ring_drops")?,
            malformed: add(self.malformed, other.malformed, "malformed")?,
            owd_clamped: add(self.owd_clamped, other.owd_clamped, "owd_clamped")?,
            refused: add(self.refused, other.refused, "refused")?,
            bytes_sent: add(self.bytes_sent, other.bytes_sent, "bytes_sent")?,
            bytes_received: add(self.bytes_received, other.bytes_received, "bytes_received")?,
            rtt_sum_ns: add_sum(self.rtt_sum_ns, other.rtt_sum_ns, "rtt_sum_ns")?,
            ipdv_sum_ns: add_sum(self.ipdv_sum_ns, other.ipdv_sum_ns, "ipdv_sum_ns")?,
            owd_fwd_sum_ns: add_sum(self.owd_fwd_sum_ns, other.owd_fwd_sum_ns, "owd_fwd_sum_ns")?,
            owd_rev_sum_ns: add_sum(self.owd_rev_sum_ns, other.owd_rev_sum_ns, "owd_rev_sum_ns")?,
        };
        Ok(())
    }

    /// The exact sum of the samples of `metric`'s histogram, ns, for the metrics that
    /// carry one (RTT, IPDV, one-way delay).
    pub const fn sum_of(&self, metric: Metric) -> Option<u128> {
        match metric {
            Metric::Rtt => Some(self.rtt_sum_ns),
            Metric::Ipdv => Some(self.ipdv_sum_ns),
            Metric::OwdForward => Some(self.owd_fwd_sum_ns),
            Metric::OwdReverse => Some(self.owd_rev_sum_ns),
            Metric::RttScheduled | Metric::LossRun | Metric::Throughput => None,
        }
    }

    /// Sets the sum of `metric` (ignored for a metric that carries none).
    pub const fn set_sum(&mut self, metric: Metric, sum: u128) {
        match metric {
            Metric::Rtt => self.rtt_sum_ns = sum,
            Metric::Ipdv => self.ipdv_sum_ns = sum,
            Metric::OwdForward => self.owd_fwd_sum_ns = sum,
            Metric::OwdReverse => self.owd_rev_sum_ns = sum,
            Metric::RttScheduled | Metric::LossRun | Metric::Throughput => {}
        }
    }

    /// Lost as a percentage of probes whose fate is known (received + lost); `None` before
    /// any is.
    #[allow(clippy::cast_precision_loss)] // a percentage; 2^53 probes are far away
    pub fn loss_pct(&self) -> Option<f64> {
        let known = self.received.checked_add(self.lost)?;
        (known > 0).then(|| self.lost as f64 * 100.0 / known as f64)
    }
}

/// A report's unique id (128 random bits from the agent); the collector uses it to
/// acknowledge a retried report without counting it twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReportId(pub [u8; 16]);

impl fmt::Display for ReportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for ReportId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidField {
            field: "report_id",
            reason: format!("`{s}` is not 32 hexadecimal digits"),
        };
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(id))
    }
}

impl Serialize for ReportId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReportId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One window of one path, validated, with its histograms in form `H`: decoded
/// ([`WindowReport`], for agents and queries) or still encoded ([`EncodedReport`], for
/// ingest, which never needs the buckets and must not pay 230 KiB per latency histogram).
#[derive(Debug, Clone, PartialEq)]
pub struct Report<H> {
    pub report_id: ReportId,
    pub agent_id: String,
    pub site: Option<String>,
    pub path: PathInfo,
    pub window: Window,
    pub timestamping: Timestamping,
    pub owd_clock: ClockState,
    pub counters: Counters,
    /// Metrics recorded this window; a metric with no samples may be absent.
    pub histograms: BTreeMap<Metric, H>,
    /// What the window saw of the path's hops and DSCP; `None` when nothing answered.
    pub signature: Option<Signature>,
    /// Events raised when the window closed ([`crate::event`]).
    pub events: Vec<PathEvent>,
    /// The version of the collector's fleet plan the agent measured under
    /// ([`crate::plan::FleetPlan`]); `None` for an agent that plans itself.
    pub plan_version: Option<String>,
}

/// A report whose histograms are decoded.
pub type WindowReport = Report<Histogram<u64>>;

/// A report whose histograms are still compact ([`Compact`]): an agent's window on its
/// way out, encoded without building full histograms.
pub type CompactReport = Report<Compact>;

/// A report whose histograms are kept as the V2 (+DEFLATE) blobs they arrived in, each
/// checked completely and counted.
pub type EncodedReport = Report<Encoded>;

/// A histogram blob that [`hist::count`] has checked completely, and its total count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub blob: Vec<u8>,
    pub count: u64,
}

/// What validation needs of a histogram: its total count.
pub trait Counted {
    fn total_count(&self) -> u64;
}

impl Counted for Histogram<u64> {
    fn total_count(&self) -> u64 {
        self.len()
    }
}

impl Counted for Compact {
    fn total_count(&self) -> u64 {
        self.len()
    }
}

/// How a histogram of a report is written out: compressed V2.
pub trait EncodeHist {
    fn encode_hist(&self, metric: Metric) -> Result<Vec<u8>>;
}

impl EncodeHist for Histogram<u64> {
    fn encode_hist(&self, metric: Metric) -> Result<Vec<u8>> {
        hist::encode(metric, self)
    }
}

impl EncodeHist for Compact {
    fn encode_hist(&self, metric: Metric) -> Result<Vec<u8>> {
        self.check_form(metric)?;
        self.encode()
    }
}

impl Counted for Encoded {
    fn total_count(&self) -> u64 {
        self.count
    }
}

/// The report as it travels.
#[derive(Serialize, Deserialize)]
struct Wire {
    version: u32,
    report_id: ReportId,
    agent_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    site: Option<String>,
    path: PathInfo,
    window: Window,
    timestamping: Timestamping,
    owd_clock: ClockState,
    counters: Counters,
    #[serde(default)]
    histograms: BTreeMap<Metric, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<Signature>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    events: Vec<PathEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    plan_version: Option<String>,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

fn json_error(e: &serde_json::Error) -> Error {
    Error::Json(format!("{e}"))
}

impl<H> Report<H> {
    /// The same report with no histograms, of any form (to be filled in by the caller).
    fn without_histograms<G>(self) -> Report<G> {
        Report {
            report_id: self.report_id,
            agent_id: self.agent_id,
            site: self.site,
            path: self.path,
            window: self.window,
            timestamping: self.timestamping,
            owd_clock: self.owd_clock,
            counters: self.counters,
            histograms: BTreeMap::new(),
            signature: self.signature,
            events: self.events,
            plan_version: self.plan_version,
        }
    }
}

impl<H: Counted + CheckForm + EncodeHist> Report<H> {
    /// Encodes as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let histograms = self
            .histograms
            .iter()
            .map(|(&m, h)| Ok((m, BASE64.encode(h.encode_hist(m)?))))
            .collect::<Result<_>>()?;
        let wire = Wire {
            version: REPORT_VERSION,
            report_id: self.report_id,
            agent_id: self.agent_id.clone(),
            site: self.site.clone(),
            path: self.path.clone(),
            window: self.window,
            timestamping: self.timestamping,
            owd_clock: self.owd_clock,
            counters: self.counters,
            histograms,
            signature: self.signature,
            events: self.events.clone(),
            plan_version: self.plan_version.clone(),
        };
        serde_json::to_vec(&wire).map_err(|e| json_error(&e))
    }
}

impl WindowReport {
    /// Decodes and validates a JSON report. The version is checked before anything else.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let encoded = EncodedReport::from_json(bytes)?;
        let histograms = encoded
            .histograms
            .iter()
            .map(|(&m, e)| Ok((m, hist::decode(m, &e.blob)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            histograms,
            ..encoded.without_histograms()
        })
    }
}

impl EncodedReport {
    /// Decodes and validates a JSON report, checking every histogram blob completely
    /// without building it. The version is checked before anything else.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let VersionOnly { version } = serde_json::from_slice(bytes).map_err(|e| json_error(&e))?;
        if version > REPORT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: REPORT_VERSION,
            });
        }
        if version == 0 {
            return Err(Error::InvalidField {
                field: "version",
                reason: "0 is not a report version; versions start at 1".to_string(),
            });
        }
        let wire: Wire = serde_json::from_slice(bytes).map_err(|e| json_error(&e))?;
        let histograms = wire
            .histograms
            .iter()
            .map(|(&m, b64)| {
                let blob = BASE64.decode(b64).map_err(|e| Error::Histogram {
                    metric: m.key(),
                    reason: format!("not base64: {e}"),
                })?;
                let count = hist::count(m, &blob)?;
                Ok((m, Encoded { blob, count }))
            })
            .collect::<Result<_>>()?;
        let report = Self {
            report_id: wire.report_id,
            agent_id: wire.agent_id,
            site: wire.site,
            path: wire.path,
            window: wire.window,
            timestamping: wire.timestamping,
            owd_clock: wire.owd_clock,
            counters: wire.counters,
            histograms,
            signature: wire.signature,
            events: wire.events,
            plan_version: wire.plan_version,
        };
        report.validate()?;
        Ok(report)
    }
}

/// The histogram check that depends on the form: configuration for decoded ones (encoded
/// ones were checked against it while counted).
pub trait CheckForm {
    fn check_form(&self, metric: Metric) -> Result<()>;
}

impl CheckForm for Histogram<u64> {
    fn check_form(&self, metric: Metric) -> Result<()> {
        metric.check(self)
    }
}

impl CheckForm for Compact {
    fn check_form(&self, metric: Metric) -> Result<()> {
        if self.metric() == metric {
            Ok(())
        } else {
            Err(Error::Histogram {
                metric: metric.key(),
                reason: format!("holds a histogram of {}", self.metric().key()),
            })
        }
    }
}

impl CheckForm for Encoded {
    fn check_form(&self, _metric: Metric) -> Result<()> {
        Ok(())
    }
}

impl<H: Counted + CheckForm> Report<H> {
    /// Checks the fields that JSON typing alone does not.
    pub fn validate(&self) -> Result<()> {
        check_name("agent_id", &self.agent_id)?;
        if let Some(v) = &self.plan_version {
            check_name("plan_version", v)?;
        }
        if let Some(site) = &self.site {
            check_name("site", site)?;
        }
        check_name("path.name", &self.path.name)?;
        if self.path.dscp > 63 {
            return Err(Error::InvalidField {
                field: "path.dscp",
                reason: format!("{} is not a DSCP (0 to 63)", self.path.dscp),
            });
        }
        // A tcp-connect probe is a SYN the kernel builds: its size is the kernel's, and 0.
        if self.path.packet_size == 0 && self.path.protocol != ProbeProtocol::TcpConnect {
            return Err(Error::InvalidField {
                field: "path.packet_size",
                reason: "must be at least 1 octet".to_string(),
            });
        }
        if self.window.end_unix_ns <= self.window.start_unix_ns {
            return Err(Error::InvalidField {
                field: "window",
                reason: format!(
                    "ends ({}) before it starts ({})",
                    self.window.end_unix_ns, self.window.start_unix_ns
                ),
            });
        }
        let has_owd = self.histograms.contains_key(&Metric::OwdForward)
            || self.histograms.contains_key(&Metric::OwdReverse);
        if has_owd && self.owd_clock == ClockState::Unavailable {
            return Err(Error::InvalidField {
                field: "owd_clock",
                reason: "one-way delay histograms are present but the clock state is `unavailable`"
                    .to_string(),
            });
        }
        let length = self.window.end_unix_ns - self.window.start_unix_ns;
        if length > MAX_WINDOW_NS {
            return Err(Error::InvalidField {
                field: "window",
                reason: format!(
                    "lasts {} s; a window lasts at most {} s",
                    length / 1_000_000_000,
                    MAX_WINDOW_NS / 1_000_000_000
                ),
            });
        }
        for (m, h) in &self.histograms {
            h.check_form(*m)?;
        }
        check_counts(&self.counters, length, |m| {
            self.histograms.get(&m).map_or(0, Counted::total_count)
        })?;
        event::validate(self.signature.as_ref(), &self.events)
    }

    /// Checks that the window lies within what a receiver at `now_ns` keeps: it starts no
    /// earlier than `earliest_ns` (the retention start) and ends at most
    /// [`MAX_FUTURE_NS`] after `now_ns`.
    pub fn check_horizon(&self, now_ns: u64, earliest_ns: u64) -> Result<()> {
        if self.window.start_unix_ns < earliest_ns {
            return Err(Error::InvalidField {
                field: "window",
                reason: format!(
                    "starts {} s before the oldest time this collector keeps: the report is too old to store",
                    (earliest_ns - self.window.start_unix_ns) / 1_000_000_000
                ),
            });
        }
        let ahead = self.window.end_unix_ns.saturating_sub(now_ns);
        if ahead > MAX_FUTURE_NS {
            return Err(Error::InvalidField {
                field: "window",
                reason: format!(
                    "ends {} s after the collector's clock (at most {} s is allowed): fix the agent's clock (NTP)",
                    ahead / 1_000_000_000,
                    MAX_FUTURE_NS / 1_000_000_000
                ),
            });
        }
        Ok(())
    }
}

/// The most probes (or samples) a window of `length_ns` can count: [`MAX_PROBES_PER_SECOND`]
/// over the window, and at least over one second.
pub fn max_probes(length_ns: u64) -> u64 {
    let ns = u128::from(length_ns.max(1_000_000_000));
    u64::try_from(ns * u128::from(MAX_PROBES_PER_SECOND) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// The counters must agree with each other, with the window's length, and with the total
/// count of each histogram (`count_of`, 0 for an absent one): what a real sender can have
/// produced, so that no accepted report can make a merge overflow.
pub fn check_counts(c: &Counters, length_ns: u64, count_of: impl Fn(Metric) -> u64) -> Result<()> {
    let bad = |field: &'static str, reason: String| Err(Error::InvalidField { field, reason });
    let limit = max_probes(length_ns);
    for (name, v) in [
        ("counters.sent", c.sent),
        ("counters.received", c.received),
        ("counters.lost", c.lost),
        ("counters.duplicated", c.duplicated),
        ("counters.reordered", c.reordered),
        ("counters.late", c.late),
        ("counters.send_slots_missed", c.send_slots_missed),
        ("counters.ring_drops", c.ring_drops),
        ("counters.malformed", c.malformed),
        ("counters.owd_clamped", c.owd_clamped),
        ("counters.refused", c.refused),
    ] {
        if v > limit {
            return bad(
                name,
                format!(
                    "{v} is more than {MAX_PROBES_PER_SECOND} probes a second could give in a window of {length_ns} ns (at most {limit})"
                ),
            );
        }
    }
    // Each probe sent is received, lost, or still undecided: never more than one of them.
    if c.received + c.lost > c.sent {
        return bad(
            "counters",
            format!(
                "received ({}) + lost ({}) exceeds sent ({})",
                c.received, c.lost, c.sent
            ),
        );
    }
    for (name, v, most) in [
        ("counters.reordered", c.reordered, c.received),
        ("counters.refused", c.refused, c.received),
        (
            "counters.duplicated",
            c.duplicated,
            c.received * MAX_COPIES_PER_ANSWER,
        ),
        ("counters.owd_clamped", c.owd_clamped, 2 * c.received),
        (
            "counters.bytes_sent",
            c.bytes_sent,
            c.sent * MAX_PROBE_OCTETS,
        ),
        (
            "counters.bytes_received",
            c.bytes_received,
            c.received * MAX_PROBE_OCTETS,
        ),
    ] {
        if v > most {
            return bad(
                name,
                format!("{v} is more than the received and sent counts allow ({most})"),
            );
        }
    }
    // A histogram holds one sample per answer (RTT), per pair of neighbours (IPDV), per
    // loss run ended (at most one per answer, and one at the end), or per sample interval.
    for m in Metric::ALL {
        let n = count_of(m);
        let (ok, rule) = match m {
            Metric::Rtt => (n == c.received, "equal `received`"),
            // Optional: senders without a schedule (one-shot tools) leave it out.
            Metric::RttScheduled => (n == 0 || n == c.received, "be absent or equal `received`"),
            Metric::OwdForward | Metric::OwdReverse => (n <= c.received, "be at most `received`"),
            Metric::Ipdv => (n <= 2 * c.received, "be at most twice `received`"),
            Metric::LossRun => (n <= c.received + 1, "be at most `received` + 1"),
            Metric::Throughput => (n <= limit, "fit the window's length"),
        };
        if !ok {
            return Err(Error::Histogram {
                metric: m.key(),
                reason: format!(
                    "holds {n} samples but must {rule} ({} received, {} sent)",
                    c.received, c.sent
                ),
            });
        }
        // Each sample is at most the metric's highest value.
        if let Some(sum) = c.sum_of(m) {
            let most = u128::from(n) * u128::from(m.config().highest);
            if sum > most {
                return bad(
                    "counters",
                    format!(
                        "the {} sum {sum} is more than its {n} samples can add up to ({most})",
                        m.key()
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Checks an agent id, site or path name: 1 to [`MAX_NAME_LEN`] letters, digits, `.`, `_`,
/// `-` or `:` (so that it is safe as a label and in a URL).
pub fn check_name(field: &'static str, value: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':');
    if value.is_empty() || value.len() > MAX_NAME_LEN || !value.chars().all(ok_char) {
        return Err(Error::InvalidField {
            field,
            reason: format!(
                "`{}` must be 1 to {MAX_NAME_LEN} characters of letters, digits, '.', '_', '-' or ':'",
                value.escape_default()
            ),
        });
    }
    Ok(())
}

/// Windows added together exactly: counters summed, histograms merged bucket by bucket.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Aggregate {
    /// Windows added.
    pub windows: u64,
    pub counters: Counters,
    pub histograms: BTreeMap<Metric, Histogram<u64>>,
}

impl Aggregate {
    /// Adds one window; on error the aggregate is unchanged.
    pub fn add(&mut self, report: &WindowReport) -> Result<()> {
        let mut counters = self.counters;
        counters.merge(&report.counters)?;
        let mut merged = Vec::with_capacity(report.histograms.len());
        for (&m, h) in &report.histograms {
            let mut into = self
                .histograms
                .get(&m)
                .cloned()
                .unwrap_or_else(|| m.new_histogram());
            hist::merge(m, &mut into, h)?;
            merged.push((m, into));
        }
        self.counters = counters;
        self.histograms.extend(merged);
        self.windows += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(samples: &[u64]) -> WindowReport {
        let mut rtt = Metric::Rtt.new_histogram();
        let mut fwd = Metric::OwdForward.new_histogram();
        for &s in samples {
            rtt.saturating_record(s);
            fwd.saturating_record(s / 2);
        }
        WindowReport {
            report_id: ReportId([7; 16]),
            agent_id: "ams-dc1-01".into(),
            site: Some("ams".into()),
            path: PathInfo {
                name: "er-primary".into(),
                kind: PathKind::Expressroute,
                local: "10.1.0.4:40000".parse().unwrap(),
                remote: "[2001:db8::4]:862".parse().unwrap(),
                protocol: ProbeProtocol::Stamp,
                dscp: 46,
                packet_size: 44,
            },
            window: Window {
                start_unix_ns: 1_795_685_400_000_000_000,
                end_unix_ns: 1_795_685_410_000_000_000,
            },
            timestamping: Timestamping {
                rx: TimestampSource::Kernel,
                tx: TimestampSource::Userspace,
            },
            owd_clock: ClockState::Estimated {
                offset_ns: -1200,
                samples: 50,
            },
            counters: Counters {
                sent: samples.len() as u64 + 1,
                received: samples.len() as u64,
                lost: 1,
                ..Counters::default()
            },
            histograms: [(Metric::Rtt, rtt), (Metric::OwdForward, fwd)].into(),
            signature: Some(Signature {
                fwd_hops: Some(2),
                rev_hops: Some(2),
                dscp_sent: 46,
                dscp_far: Some(46),
                dscp_back: Some(46),
            }),
            events: vec![PathEvent {
                kind: event::EventKind::SignatureChange,
                at_unix_ns: 1_795_685_410_000_000_000,
                before: Some(Signature {
                    fwd_hops: Some(1),
                    rev_hops: Some(1),
                    dscp_sent: 46,
                    dscp_far: Some(46),
                    dscp_back: Some(46),
                }),
                after: None,
                summary: "forward hops 1 → 2, reverse hops 1 → 2".into(),
                trace: Some(event::TraceRecord {
                    protocol: event::TraceProtocol::Udp,
                    reached: true,
                    hops: vec![event::TraceHop {
                        ttl: 1,
                        addr: Some("10.20.1.2".parse().unwrap()),
                        rtt_us: Some(15_123.5),
                        reached: false,
                    }],
                }),
                trace_error: None,
                capacity: None,
                outage: None,
            }],
            plan_version: None,
        }
    }

    fn json(r: &WindowReport) -> serde_json::Value {
        serde_json::from_slice(&r.to_json().unwrap()).unwrap()
    }

    #[test]
    fn json_shape_is_as_documented() {
        let v = json(&sample(&[1000, 2000]));
        assert_eq!(v["version"], 1);
        assert_eq!(v["report_id"], "07070707070707070707070707070707");
        assert_eq!(v["path"]["kind"], "expressroute");
        assert_eq!(v["path"]["remote"], "[2001:db8::4]:862");
        assert_eq!(v["path"]["protocol"], "stamp");
        assert_eq!(v["timestamping"]["rx"], "kernel");
        assert_eq!(v["owd_clock"]["state"], "estimated");
        assert_eq!(v["owd_clock"]["offset_ns"], -1200);
        assert_eq!(v["counters"]["lost"], 1);
        // Base64 of the plain V2 cookie (a two-sample histogram's short form is not
        // deflated; a long one's would start "HISTF", the V2+DEFLATE cookie).
        assert!(
            v["histograms"]["rtt_ns"]
                .as_str()
                .unwrap()
                .starts_with("HISTE")
        );
        assert!(v["histograms"].get("ipdv_ns").is_none());
        assert_eq!(v["signature"]["fwd_hops"], 2);
        assert_eq!(v["events"][0]["kind"], "signature_change");
        assert_eq!(v["events"][0]["trace"]["hops"][0]["addr"], "10.20.1.2");
    }

    #[test]
    fn a_compact_report_writes_the_same_json_as_the_full_one() {
        let samples = [1_000, 2_000, 2_001, 35_000_000, 7];
        let full = sample(&samples);
        let mut rtt = Compact::new(Metric::Rtt);
        let mut fwd = Compact::new(Metric::OwdForward);
        for &s in &samples {
            rtt.record(s);
            fwd.record(s / 2);
        }
        let compact = Report {
            histograms: [(Metric::Rtt, rtt), (Metric::OwdForward, fwd.clone())].into(),
            ..full.clone().without_histograms()
        };
        assert_eq!(compact.to_json().unwrap(), full.to_json().unwrap());
        // A compact histogram filed under another metric is refused.
        let wrong = Report {
            histograms: [(Metric::Rtt, fwd)].into(),
            ..full.without_histograms()
        };
        let err = wrong.to_json().unwrap_err().to_string();
        assert!(err.contains("owd_fwd_ns"), "{err}");
    }

    #[test]
    fn a_report_without_signature_or_events_still_reads() {
        let mut v = json(&sample(&[1]));
        let o = v.as_object_mut().unwrap();
        o.remove("signature");
        o.remove("events");
        let r = WindowReport::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(r.signature, None);
        assert!(r.events.is_empty());
    }

    #[test]
    fn round_trip() {
        let r = sample(&[10, 20, 30_000]);
        assert_eq!(WindowReport::from_json(&r.to_json().unwrap()).unwrap(), r);
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let mut v = json(&sample(&[1]));
        v["version"] = 2.into();
        v["something_new"] = "x".into();
        let err = WindowReport::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(
            err,
            Error::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        assert!(err.to_string().contains("upgrade the collector"));
    }

    #[test]
    fn missing_version_is_refused() {
        let mut v = json(&sample(&[1]));
        v.as_object_mut().unwrap().remove("version");
        let err = WindowReport::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
    }

    #[test]
    fn invalid_fields_are_named() {
        for (pointer, value, field) in [
            ("/agent_id", serde_json::json!(""), "agent_id"),
            ("/agent_id", serde_json::json!("a b"), "agent_id"),
            ("/path/dscp", serde_json::json!(64), "path.dscp"),
            ("/window/end_unix_ns", serde_json::json!(0), "window"),
            (
                "/owd_clock",
                serde_json::json!({"state": "unavailable"}),
                "owd_clock",
            ),
        ] {
            let mut v = json(&sample(&[1]));
            *v.pointer_mut(pointer).unwrap() = value;
            let err = WindowReport::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidField { field: f, .. } if *f == field),
                "{pointer}: {err}"
            );
        }
    }

    #[test]
    fn corrupt_histogram_is_named() {
        let mut v = json(&sample(&[1]));
        v["histograms"]["rtt_ns"] = "bm90IGEgaGlzdG9ncmFt".into();
        let err = WindowReport::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Histogram {
                    metric: "rtt_ns",
                    ..
                }
            ),
            "{err}"
        );
        v["histograms"]["rtt_ns"] = "%%%".into();
        let err = WindowReport::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
    }

    #[test]
    fn truncated_json_is_an_error_not_a_panic() {
        let bytes = sample(&[1, 2, 3]).to_json().unwrap();
        for cut in (0..bytes.len()).step_by(7) {
            assert!(WindowReport::from_json(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn report_id_text_round_trip() {
        let id = ReportId([0xab; 16]);
        assert_eq!(id.to_string().parse::<ReportId>().unwrap(), id);
        assert!("abc".parse::<ReportId>().is_err());
        assert!("zz".repeat(16).parse::<ReportId>().is_err());
        assert!("é".repeat(16).parse::<ReportId>().is_err());
    }

    #[test]
    fn names_parse_and_print() {
        for k in PathKind::ALL {
            assert_eq!(k.as_str().parse::<PathKind>().unwrap(), *k);
        }
        let err = "mpls".parse::<PathKind>().unwrap_err();
        assert!(err.contains("expressroute, vpn, internet, other"), "{err}");
        assert_eq!(
            "tcp-syn".parse::<ProbeProtocol>(),
            Ok(ProbeProtocol::TcpSyn)
        );
    }

    #[test]
    fn counter_overflow_is_refused_and_changes_nothing() {
        let mut a = Counters {
            sent: u64::MAX,
            ..Counters::default()
        };
        let before = a;
        let one = Counters {
            sent: 1,
            lost: 1,
            ..Counters::default()
        };
        assert!(a.merge(&one).is_err());
        assert_eq!(a, before);
    }

    fn refusal(v: &serde_json::Value) -> Error {
        WindowReport::from_json(&serde_json::to_vec(v).unwrap()).unwrap_err()
    }

    /// The adversarial run's first input: `sent = 2^64 - 1` was accepted and then made every
    /// rollup of the path fail.
    #[test]
    fn counters_no_sender_can_produce_are_refused() {
        let mut v = json(&sample(&[1, 2]));
        v["counters"]["sent"] = u64::MAX.into();
        let err = refusal(&v);
        assert!(err.to_string().contains("counters.sent"), "{err}");
        for (field, value) in [
            ("received", 10u64), // more received than sent
            ("lost", 3),         // received + lost > sent
            ("reordered", 3),    // more reordered than received
            ("refused", 3),      // more refused than received
            ("duplicated", 33),  // more copies than 16 per answer
            ("bytes_received", 1 << 40),
        ] {
            let mut v = json(&sample(&[1, 2]));
            v["counters"][field] = value.into();
            let err = refusal(&v);
            assert!(
                matches!(err, Error::InvalidField { .. }),
                "{field} = {value}: {err}"
            );
        }
        // 10^7 probes a second over a 10 s window is the most a window can claim.
        let mut v = json(&sample(&[]));
        v["counters"]["sent"] = 100_000_001u64.into();
        v["counters"]["lost"] = 0.into();
        assert!(refusal(&v).to_string().contains("at most 100000000"));
        v["counters"]["sent"] = 100_000_000u64.into();
        WindowReport::from_json(&serde_json::to_vec(&v).unwrap()).unwrap();
    }

    /// The second input: buckets of 2^62 were accepted and broke every merged answer.
    #[test]
    fn histogram_counts_must_match_the_counters() {
        let mut huge = Metric::Rtt.new_histogram();
        huge.record_n(1_000, 1 << 62).unwrap();
        let mut v = json(&sample(&[1_000]));
        v["histograms"]["rtt_ns"] = BASE64
            .encode(hist::encode(Metric::Rtt, &huge).unwrap())
            .into();
        let err = refusal(&v);
        assert!(
            matches!(
                err,
                Error::Histogram {
                    metric: "rtt_ns",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("equal `received`"), "{err}");
        // A report with replies but no RTT histogram is refused too.
        let mut v = json(&sample(&[1_000]));
        v["histograms"].as_object_mut().unwrap().remove("rtt_ns");
        assert!(matches!(refusal(&v), Error::Histogram { .. }));
    }

    #[test]
    fn a_window_longer_than_an_hour_is_refused() {
        let mut v = json(&sample(&[1]));
        v["window"]["end_unix_ns"] = (1_795_685_400_000_000_000u64 + MAX_WINDOW_NS + 1).into();
        assert!(refusal(&v).to_string().contains("at most 3600 s"));
    }

    #[test]
    fn the_horizon_refuses_old_and_future_windows() {
        let r = sample(&[1]);
        let end = r.window.end_unix_ns;
        r.check_horizon(end, r.window.start_unix_ns).unwrap();
        r.check_horizon(end - MAX_FUTURE_NS, 0).unwrap();
        let future = r.check_horizon(end - MAX_FUTURE_NS - 1_000_000_000, 0);
        assert!(future.unwrap_err().to_string().contains("agent's clock"));
        let old = r.check_horizon(end, r.window.start_unix_ns + 1);
        assert!(old.unwrap_err().to_string().contains("too old"));
    }

    #[test]
    fn an_encoded_report_counts_what_the_decoded_one_holds() {
        let r = sample(&[10, 20, 30_000]);
        let bytes = r.to_json().unwrap();
        let e = EncodedReport::from_json(&bytes).unwrap();
        assert_eq!(e.histograms[&Metric::Rtt].count, 3);
        assert_eq!(
            hist::decode(Metric::Rtt, &e.histograms[&Metric::Rtt].blob).unwrap(),
            r.histograms[&Metric::Rtt]
        );
        assert_eq!(e.counters, r.counters);
    }

    #[test]
    fn loss_pct_counts_only_known_fates() {
        let c = Counters {
            sent: 10,
            received: 3,
            lost: 1,
            ..Counters::default()
        };
        assert_eq!(c.loss_pct(), Some(25.0));
        assert_eq!(Counters::default().loss_pct(), None);
    }

    proptest! {
        // Merging two reports decoded from JSON gives exactly the histogram that recorded
        // every sample of both windows, and counters that add up.
        #[test]
        fn merged_reports_equal_recording_both(a in proptest::collection::vec(1u64..10_000_000_000, 1..100),
                                               b in proptest::collection::vec(1u64..10_000_000_000, 1..100)) {
            let ra = WindowReport::from_json(&sample(&a).to_json().unwrap()).unwrap();
            let rb = WindowReport::from_json(&sample(&b).to_json().unwrap()).unwrap();
            let mut agg = Aggregate::default();
            agg.add(&ra).unwrap();
            agg.add(&rb).unwrap();
            let mut both = Metric::Rtt.new_histogram();
            for &s in a.iter().chain(&b) { both.record(s).unwrap(); }
            prop_assert_eq!(&agg.histograms[&Metric::Rtt], &both);
            prop_assert_eq!(agg.counters.received, (a.len() + b.len()) as u64);
            prop_assert_eq!(agg.windows, 2);
        }

        #[test]
        fn from_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = WindowReport::from_json(&bytes);
        }
    }
}
