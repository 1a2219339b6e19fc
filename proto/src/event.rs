//! What a path looked like in a window (its signature: hop counts and DSCP each way), and
//! the events an agent raises when that changes. Both travel inside a window report
//! ([`crate::report::WindowReport`]): the signature of the window, and the events raised
//! when it closed.
//!
//! ```json
//! "signature":{"fwd_hops":1,"rev_hops":1,"dscp_sent":46,"dscp_far":46,"dscp_back":46},
//! "events":[{"kind":"signature_change","at_unix_ns":…,
//!            "before":{"fwd_hops":1,…},"after":{"fwd_hops":2,…},
//!            "summary":"forward hops 1 → 2, reverse hops 1 → 2",
//!            "trace":{"protocol":"udp","reached":true,
//!                     "hops":[{"ttl":1,"addr":"10.20.1.2","rtt_us":15123.4,"reached":false},…]}}]
//! ```

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most events one report may carry.
pub const MAX_EVENTS: usize = 64;
/// Most hops of a trace attached to an event.
pub const MAX_TRACE_HOPS: usize = 64;
/// Longest summary or trace error text.
pub const MAX_TEXT_LEN: usize = 512;

/// What a window saw of the path's route and marking (RFC 8972: the reflected
/// Session-Sender TTL and the Class-of-Service TLV). A field is absent when the probes
/// could not see it: a TCP answer carries no far-end TTL or DSCP, a STAMP probe too short
/// for the Class-of-Service TLV carries no DSCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Routers between us and the far end: the TTL we sent minus the TTL the far end
    /// received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwd_hops: Option<u8>,
    /// Routers on the way back: how far the answer's TTL is below the far end's initial
    /// TTL (the nearest of 64, 128 and 255 at or above it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev_hops: Option<u8>,
    /// The DSCP we sent.
    pub dscp_sent: u8,
    /// The DSCP the far end received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp_far: Option<u8>,
    /// The DSCP the far end's answer arrived with (it was asked to send `dscp_sent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp_back: Option<u8>,
}

impl Signature {
    /// The far end's initial TTL guessed from a received one: the nearest common initial
    /// value (64 for Linux and macOS, 128 for Windows, 255 for network gear) at or above it.
    pub const fn hops_below_initial(ttl: u8) -> u8 {
        let initial = if ttl <= 64 {
            64
        } else if ttl <= 128 {
            128
        } else {
            255
        };
        initial - ttl
    }

    /// A DSCP changed on the way: forward (what the far end received) or back (what its
    /// answer arrived with).
    pub fn remarked(&self) -> bool {
        self.dscp_far.is_some_and(|d| d != self.dscp_sent)
            || self.dscp_back.is_some_and(|d| d != self.dscp_sent)
    }

    /// Whether any figure both signatures know differs: a figure one of them lacks (no
    /// answers that window, or a probe that cannot see it) is no change.
    pub fn differs(&self, other: &Self) -> bool {
        !self.changes(other).is_empty()
    }

    /// The figures that differ between `self` (before) and `after`, for people:
    /// `forward hops 1 → 2`.
    pub fn changes(&self, after: &Self) -> Vec<String> {
        let mut out = Vec::new();
        let mut field = |name: &str, a: Option<u8>, b: Option<u8>| {
            if let (Some(a), Some(b)) = (a, b)
                && a != b
            {
                out.push(format!("{name} {a} → {b}"));
            }
        };
        field("forward hops", self.fwd_hops, after.fwd_hops);
        field("reverse hops", self.rev_hops, after.rev_hops);
        field("DSCP sent", Some(self.dscp_sent), Some(after.dscp_sent));
        field("DSCP at the far end", self.dscp_far, after.dscp_far);
        field("DSCP back", self.dscp_back, after.dscp_back);
        out
    }

    fn validate(&self, field: &'static str) -> Result<()> {
        for d in [Some(self.dscp_sent), self.dscp_far, self.dscp_back]
            .into_iter()
            .flatten()
        {
            if d > 63 {
                return Err(Error::InvalidField {
                    field,
                    reason: format!("{d} is not a DSCP (0 to 63)"),
                });
            }
        }
        Ok(())
    }
}

/// What happened to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The hop count or DSCP of a path changed: routing moved, or marking did.
    SignatureChange,
    /// The path re-marks our DSCP (on the way out or back). ExpressRoute quality of service depends on the
    /// marking surviving end to end.
    DscpRemarked,
    /// Traffic moved from the primary path to the backup ([`Outage`] says how long it
    /// was lost).
    Failover,
    /// Traffic moved back to the primary.
    Failback,
    /// Traffic moved between paths that are not known as primary and backup.
    PathChange,
    /// Traffic was lost and came back on the same path.
    Outage,
    /// A path of the fleet plan sent no report for 3 of its windows (raised by the
    /// collector: the agent, or its probing, stopped).
    PathSilent,
    /// A silent path reports again.
    PathResumed,
    /// A capacity test finished: its stages, knee and recommendation ([`CapacityRecord`]),
    /// on the report of its last stage.
    CapacityTest,
}

impl EventKind {
    /// Every kind.
    pub const ALL: &'static [Self] = &[
        Self::SignatureChange,
        Self::DscpRemarked,
        Self::Failover,
        Self::Failback,
        Self::PathChange,
        Self::Outage,
        Self::PathSilent,
        Self::PathResumed,
        Self::CapacityTest,
    ];

    /// The name used in JSON and queries.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SignatureChange => "signature_change",
            Self::DscpRemarked => "dscp_remarked",
            Self::Failover => "failover",
            Self::Failback => "failback",
            Self::PathChange => "path_change",
            Self::Outage => "outage",
            Self::PathSilent => "path_silent",
            Self::PathResumed => "path_resumed",
            Self::CapacityTest => "capacity_test",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown event kind `{s}`: use one of {}", names.join(", "))
            })
    }
}

/// Which probes a trace sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceProtocol {
    Udp,
    Tcp,
}

/// One hop of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceHop {
    pub ttl: u8,
    /// Who answered; absent when nothing did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    /// The best RTT of the hop's queries, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<f64>,
    /// The far end itself answered at this hop.
    pub reached: bool,
}

/// A trace run when the event was raised, so the event shows which routers the path
/// crosses now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    pub protocol: TraceProtocol,
    pub reached: bool,
    pub hops: Vec<TraceHop>,
}

/// The probes a path carried on one side of a transition: how many, how many were lost,
/// the RTT, and the path's hop counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// From and to (ns since 1970, scheduled send times).
    pub from_unix_ns: u64,
    pub to_unix_ns: u64,
    pub probes: u64,
    pub lost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_pct: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p90_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p99_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwd_hops: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev_hops: Option<u8>,
}

/// One answered probe at the edge of an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeProbe {
    /// The probe's number in its session.
    pub seq: u64,
    /// Its scheduled send time (ns since 1970).
    pub sent_unix_ns: u64,
}

/// How traffic to a service was lost and which path carried it before and after: a
/// failover, a failback, or an outage on one path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Traffic lost: from the first probe lost to the first answered after, to the probe
    /// interval (0 when the move lost nothing).
    pub outage_ms: f64,
    /// Scheduled send time of the first probe lost (of the first on the new path when none
    /// was), and of the first answered after (ns since 1970).
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// The path that carried traffic before and after: `primary`, `backup`, or
    /// `unknown` when neither pinned path matches.
    pub path_before: String,
    pub path_after: String,
    /// The last answer before and the first after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply_before: Option<EdgeProbe>,
    pub first_reply_after: EdgeProbe,
    /// Inside the transition (the outage and a second either side): probes lost,
    /// answers reordered, extra copies.
    pub lost: u64,
    pub reordered: u64,
    pub duplicated: u64,
    /// The probes before and after (up to the settle time either side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Segment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Segment>,
    /// This is the third path switch or more within the flapping window.
    pub flapping: bool,
}

/// One event of one path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathEvent {
    pub kind: EventKind,
    /// When it was seen: the end of the window that showed it (ns since 1970).
    pub at_unix_ns: u64,
    /// The signature before (absent for a path's first window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Signature>,
    /// The signature after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Signature>,
    /// One line for people.
    pub summary: String,
    /// The trace run when it was raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceRecord>,
    /// Why there is no trace, when one was wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_error: Option<String>,
    /// For a failover, failback or outage: how long traffic was lost and where it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage: Option<Outage>,
    /// For a capacity test: its stages and what they came to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<CapacityRecord>,
}

/// Most stages a capacity record holds, and lines of its conclusion.
pub const MAX_CAPACITY_STAGES: usize = 64;
pub const MAX_CONCLUSION_LINES: usize = 16;

/// One stage of a capacity test: the load offered, what arrived, and the RTT of the STAMP
/// probes under it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityStage {
    /// Its place in the run, from 1.
    pub number: u32,
    pub offered_bps: u64,
    pub delivered_bps: u64,
    pub loss_pct: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p50_us: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p99_us: Option<f64>,
    pub passed: bool,
    /// `ok`, or what failed (`fail: delivered, loss, RTT`), as the agent prints it.
    pub verdict: String,
}

/// What a capacity test found: carried by its `capacity_test` event, on the report of its
/// last stage (each stage's window is a report of the test's path).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityRecord {
    pub stages: Vec<CapacityStage>,
    /// The knee: what the highest passing stage delivered, the path's usable capacity;
    /// absent when no stage passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bps: Option<u64>,
    /// A stage failed, so the capacity is the knee (otherwise only a lower bound).
    pub saturated: bool,
    /// The most any stage delivered: the bottleneck's rate under overload.
    pub max_delivered_bps: u64,
    /// The lowest offered rate whose RTT p99 broke its limit (bufferbloat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_inflates_at_bps: Option<u64>,
    /// The idle RTT p99, and the RTT p99 a stage may reach and pass.
    pub idle_rtt_p99_us: f64,
    pub rtt_limit_us: f64,
    /// What to buy: the smallest ExpressRoute circuit, and the gateways, that carry the
    /// capacity (or the need given) with the headroom asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub er_circuit_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub er_gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpn_gateway: Option<String>,
    /// The verdict and the recommendation for people, a line each, as the agent prints
    /// them.
    pub conclusion: Vec<String>,
}

impl CapacityRecord {
    fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(Error::InvalidField { field, reason });
        if self.stages.len() > MAX_CAPACITY_STAGES {
            return bad(
                "events.capacity.stages",
                format!(
                    "{} stages; at most {MAX_CAPACITY_STAGES}",
                    self.stages.len()
                ),
            );
        }
        if self.conclusion.len() > MAX_CONCLUSION_LINES {
            return bad(
                "events.capacity.conclusion",
                format!(
                    "{} lines; at most {MAX_CONCLUSION_LINES}",
                    self.conclusion.len()
                ),
            );
        }
        let figure = |v: f64| v.is_finite() && v >= 0.0;
        for st in &self.stages {
            let ok = figure(st.loss_pct)
                && st.loss_pct <= 100.0
                && [st.rtt_p50_us, st.rtt_p99_us]
                    .into_iter()
                    .flatten()
                    .all(figure);
            if !ok {
                return bad(
                    "events.capacity.stages",
                    format!(
                        "stage {}: loss must be 0 to 100% and RTTs finite µs, 0 or more",
                        st.number
                    ),
                );
            }
            check_text("events.capacity.stages.verdict", &st.verdict)?;
        }
        if !figure(self.idle_rtt_p99_us) || !figure(self.rtt_limit_us) {
            return bad(
                "events.capacity.idle_rtt_p99_us",
                "RTTs must be finite µs, 0 or more".to_string(),
            );
        }
        for g in [&self.er_gateway, &self.vpn_gateway].into_iter().flatten() {
            check_text("events.capacity.gateway", g)?;
        }
        self.conclusion
            .iter()
            .try_for_each(|l| check_text("events.capacity.conclusion", l))
    }
}

impl Outage {
    fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(Error::InvalidField {
                field,
                reason: reason.to_string(),
            })
        };
        if !self.outage_ms.is_finite() || self.outage_ms < 0.0 {
            return bad(
                "events.outage.outage_ms",
                "must be a finite number, 0 or more",
            );
        }
        if self.end_unix_ns < self.start_unix_ns {
            return bad("events.outage.end_unix_ns", "is before start_unix_ns");
        }
        for (field, name) in [
            ("events.outage.path_before", &self.path_before),
            ("events.outage.path_after", &self.path_after),
        ] {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                return bad(field, "must be 1 to 64 characters, no control characters");
            }
        }
        for seg in [&self.before, &self.after].into_iter().flatten() {
            let figures = [seg.loss_pct, seg.rtt_p50_us, seg.rtt_p90_us, seg.rtt_p99_us];
            if figures
                .into_iter()
                .flatten()
                .any(|v| !v.is_finite() || v < 0.0)
            {
                return bad(
                    "events.outage.before/after",
                    "figures must be finite numbers, 0 or more",
                );
            }
        }
        Ok(())
    }
}

fn check_text(field: &'static str, text: &str) -> Result<()> {
    if text.len() > MAX_TEXT_LEN || text.chars().any(char::is_control) {
        return Err(Error::InvalidField {
            field,
            reason: format!("must be at most {MAX_TEXT_LEN} octets with no control characters"),
        });
    }
    Ok(())
}

impl PathEvent {
    /// An event of `kind` at `at_unix_ns` with its summary, and none of the optional
    /// parts (signatures, trace, outage, capacity record).
    pub fn new(kind: EventKind, at_unix_ns: u64, summary: String) -> Self {
        Self {
            kind,
            at_unix_ns,
            before: None,
            after: None,
            summary,
            trace: None,
            trace_error: None,
            outage: None,
            capacity: None,
        }
    }

    /// Checks the fields that JSON typing alone does not.
    pub fn validate(&self) -> Result<()> {
        if let Some(s) = &self.before {
            s.validate("events.before")?;
        }
        if let Some(s) = &self.after {
            s.validate("events.after")?;
        }
        check_text("events.summary", &self.summary)?;
        if let Some(e) = &self.trace_error {
            check_text("events.trace_error", e)?;
        }
        if let Some(o) = &self.outage {
            o.validate()?;
        }
        if let Some(c) = &self.capacity {
            c.validate()?;
        }
        if let Some(t) = &self.trace {
            if t.hops.len() > MAX_TRACE_HOPS {
                return Err(Error::InvalidField {
                    field: "events.trace.hops",
                    reason: format!("{} hops; at most {MAX_TRACE_HOPS}", t.hops.len()),
                });
            }
            if t.hops
                .iter()
                .any(|h| h.rtt_us.is_some_and(|r| !r.is_finite() || r < 0.0))
            {
                return Err(Error::InvalidField {
                    field: "events.trace.hops.rtt_us",
                    reason: "must be a finite number of µs, 0 or more".to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Checks a report's signature and events.
pub(crate) fn validate(signature: Option<&Signature>, events: &[PathEvent]) -> Result<()> {
    if let Some(s) = signature {
        s.validate("signature")?;
    }
    if events.len() > MAX_EVENTS {
        return Err(Error::InvalidField {
            field: "events",
            reason: format!("{} events; at most {MAX_EVENTS} per report", events.len()),
        });
    }
    events.iter().try_for_each(PathEvent::validate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(fwd: u8, rev: u8, far: u8) -> Signature {
        Signature {
            fwd_hops: Some(fwd),
            rev_hops: Some(rev),
            dscp_sent: 46,
            dscp_far: Some(far),
            dscp_back: Some(46),
        }
    }

    #[test]
    fn initial_ttl_is_the_nearest_common_value_above() {
        assert_eq!(Signature::hops_below_initial(64), 0);
        assert_eq!(Signature::hops_below_initial(62), 2);
        assert_eq!(Signature::hops_below_initial(120), 8);
        assert_eq!(Signature::hops_below_initial(250), 5);
        assert_eq!(Signature::hops_below_initial(1), 63);
    }

    #[test]
    fn a_figure_only_one_side_knows_is_no_change() {
        let a = sig(1, 1, 46);
        let mut b = a;
        b.fwd_hops = None;
        b.dscp_far = None;
        assert!(!a.differs(&b));
        b.rev_hops = Some(2);
        assert_eq!(a.changes(&b), vec!["reverse hops 1 → 2"]);
    }

    #[test]
    fn remarking_is_seen_either_way() {
        assert!(!sig(1, 1, 46).remarked());
        assert!(sig(1, 1, 0).remarked());
        let mut back = sig(1, 1, 46);
        back.dscp_back = Some(10);
        assert!(back.remarked());
    }

    #[test]
    fn hostile_events_are_refused_by_field() {
        let good = PathEvent {
            kind: EventKind::SignatureChange,
            at_unix_ns: 1,
            before: Some(sig(1, 1, 46)),
            after: Some(sig(2, 2, 46)),
            summary: "forward hops 1 → 2".to_string(),
            trace: Some(TraceRecord {
                protocol: TraceProtocol::Udp,
                reached: true,
                hops: vec![TraceHop {
                    ttl: 1,
                    addr: Some("10.0.0.1".parse().unwrap()),
                    rtt_us: Some(12.5),
                    reached: true,
                }],
            }),
            trace_error: None,
            capacity: None,
            outage: None,
        };
        assert!(validate(None, std::slice::from_ref(&good)).is_ok());
        let mut bad = good.clone();
        bad.after = Some(sig(2, 2, 64));
        assert!(matches!(
            validate(None, &[bad]),
            Err(Error::InvalidField {
                field: "events.after",
                ..
            })
        ));
        let mut bad = good.clone();
        bad.summary = "a\nb".to_string();
        assert!(validate(None, &[bad]).is_err());
        let mut bad = good.clone();
        if let Some(t) = bad.trace.as_mut() {
            t.hops[0].rtt_us = Some(f64::NAN);
        }
        assert!(validate(None, &[bad]).is_err());
        let many = vec![good; MAX_EVENTS + 1];
        assert!(matches!(
            validate(None, &many),
            Err(Error::InvalidField {
                field: "events",
                ..
            })
        ));
    }

    #[test]
    fn kinds_parse_and_print() {
        for &k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert!(
            "outage!"
                .parse::<EventKind>()
                .unwrap_err()
                .contains("signature_change")
        );
    }

    fn capacity_event() -> PathEvent {
        let stage = CapacityStage {
            number: 1,
            offered_bps: 10_000_000,
            delivered_bps: 9_900_000,
            loss_pct: 0.5,
            rtt_p50_us: Some(2_000.0),
            rtt_p99_us: Some(2_500.0),
            passed: true,
            verdict: "ok".into(),
        };
        PathEvent {
            kind: EventKind::CapacityTest,
            at_unix_ns: 1,
            before: None,
            after: None,
            summary: "usable capacity: at least 9.9 Mbit/s".into(),
            trace: None,
            trace_error: None,
            outage: None,
            capacity: Some(CapacityRecord {
                stages: vec![stage],
                capacity_bps: Some(9_900_000),
                saturated: false,
                max_delivered_bps: 9_900_000,
                rtt_inflates_at_bps: None,
                idle_rtt_p99_us: 2_000.0,
                rtt_limit_us: 6_000.0,
                er_circuit_bps: Some(50_000_000),
                er_gateway: Some("Standard / ErGw1Az".into()),
                vpn_gateway: Some("VpnGw1".into()),
                conclusion: vec!["usable capacity: at least 9.9 Mbit/s".into()],
            }),
        }
    }

    #[test]
    fn a_capacity_record_round_trips_and_its_figures_are_checked() {
        let good = capacity_event();
        assert!(good.validate().is_ok());
        let json = serde_json::to_string(&good).unwrap();
        assert_eq!(serde_json::from_str::<PathEvent>(&json).unwrap(), good);
        let edit = |f: fn(&mut CapacityRecord)| {
            let mut e = capacity_event();
            f(e.capacity.as_mut().unwrap());
            e.validate()
        };
        assert!(edit(|c| c.stages[0].loss_pct = 101.0).is_err());
        assert!(edit(|c| c.stages[0].rtt_p99_us = Some(f64::INFINITY)).is_err());
        assert!(edit(|c| c.idle_rtt_p99_us = -1.0).is_err());
        assert!(edit(|c| c.conclusion.push("a\nb".into())).is_err());
        assert!(edit(|c| c.conclusion = vec![String::new(); MAX_CONCLUSION_LINES + 1]).is_err());
        assert!(
            edit(|c| {
                let st = c.stages[0].clone();
                c.stages = vec![st; MAX_CAPACITY_STAGES + 1];
            })
            .is_err()
        );
        assert!(edit(|c| c.vpn_gateway = Some("x".repeat(MAX_TEXT_LEN + 1))).is_err());
    }
}
