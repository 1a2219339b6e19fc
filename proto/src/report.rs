//! The window report an agent sends to the collector: one per path per window, with u64
//! counters and one histogram per metric. JSON, with histograms as base64 V2+DEFLATE.
//!
//! ```json
//! {"version":1,"report_id":"…32 hex…","agent_id":"ams-dc1-01","site":"ams",
//!  "path":{"name":"er-primary","kind":"expressroute","local":"10.1.0.4:40000",
//!          "remote":"10.20.0.4:862","protocol":"stamp","dscp":46,"packet_size":44},
//!  "window":{"start_unix_ns":…,"end_unix_ns":…},
//!  "timestamping":{"rx":"kernel","tx":"userspace"},
//!  "owd_clock":{"state":"estimated","offset_ns":-1200,"samples":50},
//!  "counters":{"sent":100,"received":99,…},
//!  "histograms":{"rtt_ns":"HISTFAAA…","ipdv_ns":"…"}}
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
use crate::hist::{self, Metric};
use crate::{Error, Result};

/// The report format this build writes and the newest it reads.
pub const REPORT_VERSION: u32 = 1;

/// Longest agent id, site or path name.
pub const MAX_NAME_LEN: usize = 64;

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
        };
        Ok(())
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

/// One window of one path, decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowReport {
    pub report_id: ReportId,
    pub agent_id: String,
    pub site: Option<String>,
    pub path: PathInfo,
    pub window: Window,
    pub timestamping: Timestamping,
    pub owd_clock: ClockState,
    pub counters: Counters,
    /// Metrics recorded this window; a metric with no samples may be absent.
    pub histograms: BTreeMap<Metric, Histogram<u64>>,
    /// What the window saw of the path's hops and DSCP; `None` when nothing answered.
    pub signature: Option<Signature>,
    /// Events raised when the window closed ([`crate::event`]).
    pub events: Vec<PathEvent>,
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
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

fn json_error(e: &serde_json::Error) -> Error {
    Error::Json(format!("{e}"))
}

impl WindowReport {
    /// Encodes as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let histograms = self
            .histograms
            .iter()
            .map(|(&m, h)| Ok((m, BASE64.encode(hist::encode(m, h)?))))
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
        };
        serde_json::to_vec(&wire).map_err(|e| json_error(&e))
    }

    /// Decodes and validates a JSON report. The version is checked before anything else.
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
                Ok((m, hist::decode(m, &blob)?))
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
        };
        report.validate()?;
        Ok(report)
    }

    /// Checks the fields that JSON typing alone does not.
    pub fn validate(&self) -> Result<()> {
        check_name("agent_id", &self.agent_id)?;
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
        for (m, h) in &self.histograms {
            m.check(h)?;
        }
        event::validate(self.signature.as_ref(), &self.events)
    }
}

fn check_name(field: &'static str, value: &str) -> Result<()> {
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
                outage: None,
            }],
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
        // HdrHistogram's own tools recognise "HISTF" as base64 of the V2+DEFLATE cookie.
        assert!(
            v["histograms"]["rtt_ns"]
                .as_str()
                .unwrap()
                .starts_with("HISTF")
        );
        assert!(v["histograms"].get("ipdv_ns").is_none());
        assert_eq!(v["signature"]["fwd_hops"], 2);
        assert_eq!(v["events"][0]["kind"], "signature_change");
        assert_eq!(v["events"][0]["trace"]["hops"][0]["addr"], "10.20.1.2");
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
