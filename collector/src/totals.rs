//! Every path's cumulative figures since its first stored window: what `/metrics` shows
//! and remote write pushes.
//!
//! They start from the store ([`Totals::from_store`]: each path's windows merged
//! exactly, and its events), and each report stored afterwards is added once
//! ([`Contribution`]), so a counter never goes down across a restart of the collector.
//! Histograms are native histograms at [`crate::native::SCHEMA`], in seconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use pathprobe_proto::event::{CapacityRecord, EventKind, PathEvent};
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::report::{Counters, EncodedReport};

use crate::Result;
use crate::native::{Native, index_of, upper_bound};
use crate::promwire::{scrape, write};
use crate::store::{Selector, Store};

/// Nanoseconds to seconds.
const NS: f64 = 1e-9;

/// The histograms exported, with their family name and help.
pub const HISTOGRAMS: [(Metric, &str, &str); 4] = [
    (
        Metric::Rtt,
        "pathprobe_rtt_seconds",
        "Probe round-trip time.",
    ),
    (
        Metric::Ipdv,
        "pathprobe_ipdv_seconds",
        "IP packet delay variation between consecutive probes (RFC 3393).",
    ),
    (
        Metric::OwdForward,
        "pathprobe_owd_forward_seconds",
        "One-way delay to the reflector, from windows whose clocks were synchronized or whose offset was estimated (see compare for which).",
    ),
    (
        Metric::OwdReverse,
        "pathprobe_owd_reverse_seconds",
        "One-way delay back from the reflector, from windows whose clocks were synchronized or whose offset was estimated (see compare for which).",
    ),
];

/// The outage-duration histogram.
pub const OUTAGE: (&str, &str) = (
    "pathprobe_outage_duration_seconds",
    "How long traffic was lost in each failover, failback and outage.",
);

/// A counter: its name, help and value.
type CounterOf = (&'static str, &'static str, fn(&PathTotals) -> u64);

/// The counters exported per path.
pub const COUNTERS: [CounterOf; 10] = [
    ("pathprobe_probes_sent_total", "Probes sent.", |p| {
        p.counters.sent
    }),
    (
        "pathprobe_probes_received_total",
        "Distinct probes answered within the late timeout.",
        |p| p.counters.received,
    ),
    (
        "pathprobe_probes_lost_total",
        "Probes with no answer within the late timeout.",
        |p| p.counters.lost,
    ),
    (
        "pathprobe_probes_reordered_total",
        "Answers that arrived after one with a higher sequence number.",
        |p| p.counters.reordered,
    ),
    (
        "pathprobe_probes_duplicated_total",
        "Extra copies of answers already counted.",
        |p| p.counters.duplicated,
    ),
    (
        "pathprobe_probes_late_total",
        "Answers that arrived after the late timeout (counted as lost too).",
        |p| p.counters.late,
    ),
    (
        "pathprobe_probes_refused_total",
        "Probes refused (a TCP RST), counted as received too.",
        |p| p.counters.refused,
    ),
    (
        "pathprobe_failovers_total",
        "Moves of traffic from the primary path to the backup.",
        |p| p.failovers,
    ),
    (
        "pathprobe_failbacks_total",
        "Moves of traffic back to the primary.",
        |p| p.failbacks,
    ),
    (
        "pathprobe_outages_total",
        "Losses of traffic that came back on the same path.",
        |p| p.outages,
    ),
];

/// A gauge of the last capacity test: name, help, value.
type GaugeOf = (&'static str, &'static str, fn(&Capacity) -> Option<f64>);

/// The last capacity test's figures.
#[allow(clippy::cast_precision_loss)] // rates and times for Prometheus
pub const CAPACITY: [GaugeOf; 5] = [
    (
        "pathprobe_capacity_bits_per_second",
        "The last capacity test's knee: what its highest passing stage delivered.",
        |c| c.record.capacity_bps.map(|b| b as f64),
    ),
    (
        "pathprobe_capacity_max_delivered_bits_per_second",
        "The most any stage of the last capacity test delivered (the bottleneck under overload).",
        |c| Some(c.record.max_delivered_bps as f64),
    ),
    (
        "pathprobe_capacity_saturated",
        "1 when a stage of the last capacity test failed, so its capacity is the knee; 0 when it is only a lower bound.",
        |c| Some(f64::from(u8::from(c.record.saturated))),
    ),
    (
        "pathprobe_capacity_circuit_bits_per_second",
        "The smallest ExpressRoute circuit that carries the last capacity test's figure with its headroom.",
        |c| c.record.er_circuit_bps.map(|b| b as f64),
    ),
    (
        "pathprobe_capacity_test_timestamp_seconds",
        "When the last capacity test ended (seconds since 1970).",
        |c| Some(c.at_ns as f64 * NS),
    ),
];

/// The labels of a path's series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathKey {
    pub agent: String,
    pub site: String,
    pub path: String,
    pub kind: String,
}

impl PathKey {
    /// `(name, value)` pairs, in label-name order.
    pub fn pairs(&self) -> [(&'static str, &str); 4] {
        [
            ("agent", &self.agent),
            ("kind", &self.kind),
            ("path", &self.path),
            ("site", &self.site),
        ]
    }
}

/// A path's last capacity test.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub at_ns: u64,
    pub record: CapacityRecord,
}

/// A path's cumulative figures.
#[derive(Debug, Clone, Default)]
pub struct PathTotals {
    pub counters: Counters,
    /// For each of [`HISTOGRAMS`] that recorded anything.
    pub histograms: BTreeMap<Metric, Native>,
    pub failovers: u64,
    pub failbacks: u64,
    pub outages: u64,
    pub outage: Native,
    pub capacity: Option<Capacity>,
    /// The time of the last sample pushed by remote write, ms (its samples must rise).
    pub pushed_ms: i64,
}

/// What one stored report adds.
#[derive(Debug, Clone)]
pub struct Contribution {
    pub key: PathKey,
    pub start_ns: u64,
    pub end_ns: u64,
    pub totals: PathTotals,
}

impl Contribution {
    /// The report's figures (its histograms read from their checked blobs). A capacity
    /// test's stage (a report with a throughput histogram) measured the path under a load
    /// of its own making: only its events count, not its probes.
    pub fn of(r: &EncodedReport) -> Self {
        let stage = r.histograms.contains_key(&Metric::Throughput);
        let mut totals = PathTotals {
            counters: if stage {
                Counters::default()
            } else {
                r.counters
            },
            ..PathTotals::default()
        };
        for &(m, _, _) in HISTOGRAMS.iter().filter(|_| !stage) {
            let Some(e) = r.histograms.get(&m) else {
                continue;
            };
            let mut ranges = Vec::new();
            if hist::for_each_range(m, &e.blob, &mut |lo, hi, n| ranges.push((lo, hi, n))).is_ok() {
                totals
                    .histograms
                    .insert(m, Native::from_ranges(ranges, NS, r.counters.sum_of(m)));
            }
        }
        for e in &r.events {
            totals.add_event(e);
        }
        Self {
            key: PathKey {
                agent: r.agent_id.clone(),
                site: r.site.clone().unwrap_or_default(),
                path: r.path.name.clone(),
                kind: r.path.kind.to_string(),
            },
            start_ns: r.window.start_unix_ns,
            end_ns: r.window.end_unix_ns,
            totals,
        }
    }
}

impl PathTotals {
    fn add_event(&mut self, e: &PathEvent) {
        match e.kind {
            EventKind::Failover => self.failovers += 1,
            EventKind::Failback => self.failbacks += 1,
            EventKind::Outage => self.outages += 1,
            EventKind::CapacityTest => {
                if let Some(record) = &e.capacity
                    && self
                        .capacity
                        .as_ref()
                        .is_none_or(|c| c.at_ns <= e.at_unix_ns)
                {
                    self.capacity = Some(Capacity {
                        at_ns: e.at_unix_ns,
                        record: record.clone(),
                    });
                }
                return;
            }
            _ => return,
        }
        if let Some(o) = &e.outage {
            self.outage.add(&single(o.outage_ms / 1_000.0));
        }
    }

    /// Adds another path's (or window's) figures.
    pub fn add(&mut self, other: &Self) {
        let _ = self.counters.merge(&other.counters);
        for (m, h) in &other.histograms {
            self.histograms.entry(*m).or_default().add(h);
        }
        self.failovers += other.failovers;
        self.failbacks += other.failbacks;
        self.outages += other.outages;
        self.outage.add(&other.outage);
        if let Some(c) = &other.capacity
            && self.capacity.as_ref().is_none_or(|k| k.at_ns <= c.at_ns)
        {
            self.capacity = Some(c.clone());
        }
    }
}

/// A native histogram of one sample `v`.
fn single(v: f64) -> Native {
    let mut n = Native {
        count: 1,
        sum: v.max(0.0),
        ..Native::default()
    };
    if v > 0.0 {
        n.buckets.push((index_of(v, n.schema), 1));
    } else {
        n.zero_count = 1;
    }
    n
}

/// Every path's cumulative figures, for at most `max_paths` label sets.
#[derive(Debug, Default)]
pub struct Totals {
    pub paths: BTreeMap<PathKey, PathTotals>,
    max_paths: usize,
    /// Reports of paths beyond `max_paths`, left out.
    pub left_out: u64,
}

/// Most events of a kind read back at start.
const MAX_EVENTS: usize = 10_000_000;

impl Totals {
    /// Empty, keeping at most `max_paths` label sets.
    pub fn new(max_paths: usize) -> Self {
        Self {
            max_paths,
            ..Self::default()
        }
    }

    /// Everything `store` holds, merged exactly per path.
    pub fn from_store(store: &dyn Store, max_paths: usize) -> Result<Self> {
        let mut t = Self::new(max_paths);
        // Every stored path, through the index (`paths` would count each one's windows
        // too), in `paths`' order: the label sets kept past `max_paths` are the same.
        let mut rows = store.latest()?;
        rows.sort_by(|a, b| (&a.site, &a.name, &a.agent_id).cmp(&(&b.site, &b.name, &b.agent_id)));
        for row in rows {
            let merged = store.path_totals(row.path_id)?;
            // A capacity test's path: its stages' probes ran under its own load.
            let stages = merged
                .aggregate
                .histograms
                .contains_key(&Metric::Throughput);
            let mut p = PathTotals {
                counters: if stages {
                    Counters::default()
                } else {
                    merged.aggregate.counters
                },
                ..PathTotals::default()
            };
            for &(m, _, _) in HISTOGRAMS.iter().filter(|_| !stages) {
                if let Some(h) = merged.aggregate.histograms.get(&m) {
                    p.histograms.insert(
                        m,
                        Native::from_hdr(h, NS, merged.aggregate.counters.sum_of(m)),
                    );
                }
            }
            let key = PathKey {
                agent: row.agent_id,
                site: row.site,
                path: row.name,
                kind: row.kind,
            };
            t.add(key, &p);
        }
        let all = Selector {
            name_or_kind: String::new(),
            site: None,
        };
        for kind in [
            EventKind::Failover,
            EventKind::Failback,
            EventKind::Outage,
            EventKind::CapacityTest,
        ] {
            let events = store.events(&all, 0, u64::MAX, Some(kind), MAX_EVENTS)?;
            if events.len() == MAX_EVENTS {
                tracing::warn!(
                    kind = kind.as_str(),
                    "more than {MAX_EVENTS} events of one kind: /metrics counts the first {MAX_EVENTS}"
                );
            }
            for row in events {
                let key = PathKey {
                    agent: row.agent_id,
                    site: row.site,
                    path: row.path,
                    kind: row.path_kind,
                };
                let mut p = PathTotals::default();
                p.add_event(&row.event);
                t.add(key, &p);
            }
        }
        Ok(t)
    }

    /// Adds `p` to the path `key`; false (and counted) when `max_paths` are kept already.
    pub fn add(&mut self, key: PathKey, p: &PathTotals) -> bool {
        let full = self.paths.len() >= self.max_paths;
        match self.paths.get_mut(&key) {
            Some(t) => t.add(p),
            None if full => {
                self.left_out += 1;
                return false;
            }
            None => {
                self.paths.insert(key, p.clone());
            }
        }
        true
    }
}

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn text_labels(k: &PathKey) -> String {
    let mut s = String::new();
    for (i, (n, v)) in k.pairs().into_iter().enumerate() {
        let _ = write!(s, "{}{n}=\"{}\"", if i > 0 { "," } else { "" }, escape(v));
    }
    s
}

/// Classic buckets (seconds) for the text format.
pub const CLASSIC_BUCKETS_S: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// The native histogram's counts at or below each classic bound: a native bucket counts
/// below a bound when its top is at or below it (so a bound is off by at most one native
/// bucket, 0.27%).
fn classic(n: &Native) -> [u64; CLASSIC_BUCKETS_S.len()] {
    let mut out = [0; CLASSIC_BUCKETS_S.len()];
    for (k, &le) in CLASSIC_BUCKETS_S.iter().enumerate() {
        out[k] = n.zero_count
            + n.buckets
                .iter()
                .take_while(|&&(i, _)| upper_bound(i, n.schema) <= le)
                .map(|b| b.1)
                .sum::<u64>();
    }
    out
}

impl Totals {
    /// The per-path series in the text format, histograms in classic buckets.
    #[allow(clippy::cast_precision_loss)]
    pub fn text(&self, out: &mut String) {
        let hists = HISTOGRAMS
            .iter()
            .map(|&(m, name, help)| (name, help, Some(m)))
            .chain(std::iter::once((OUTAGE.0, OUTAGE.1, None)));
        for (name, help, metric) in hists {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (k, p) in &self.paths {
                let h = match metric {
                    Some(m) => p.histograms.get(&m),
                    None => (p.outage.count > 0).then_some(&p.outage),
                };
                let Some(h) = h else { continue };
                let l = text_labels(k);
                for (le, n) in CLASSIC_BUCKETS_S.iter().zip(classic(h)) {
                    let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le}\"}} {n}");
                }
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
            }
        }
        for (name, help, f) in COUNTERS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (k, p) in &self.paths {
                let _ = writeln!(out, "{name}{{{}}} {}", text_labels(k), f(p));
            }
        }
        for (name, help, f) in CAPACITY {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (k, p) in &self.paths {
                if let Some(v) = p.capacity.as_ref().and_then(f) {
                    let _ = writeln!(out, "{name}{{{}}} {v}", text_labels(k));
                }
            }
        }
    }

    /// The per-path families for the protobuf exposition, histograms native.
    #[allow(clippy::cast_precision_loss)]
    pub fn families(&self) -> Vec<scrape::MetricFamily> {
        let labels = |k: &PathKey| -> Vec<scrape::LabelPair> {
            k.pairs()
                .into_iter()
                .map(|(n, v)| scrape::LabelPair {
                    name: Some(n.to_string()),
                    value: Some(v.to_string()),
                })
                .collect()
        };
        let family = |name: &str, help: &str, t: scrape::MetricType, metric| scrape::MetricFamily {
            name: Some(name.to_string()),
            help: Some(help.to_string()),
            r#type: Some(t as i32),
            metric,
        };
        let mut out = Vec::new();
        for (m, name, help) in HISTOGRAMS {
            let metric = self
                .paths
                .iter()
                .filter_map(|(k, p)| {
                    p.histograms.get(&m).map(|h| scrape::Metric {
                        label: labels(k),
                        histogram: Some(h.to_scrape()),
                        ..scrape::Metric::default()
                    })
                })
                .collect();
            out.push(family(name, help, scrape::MetricType::Histogram, metric));
        }
        let metric = self
            .paths
            .iter()
            .filter(|(_, p)| p.outage.count > 0)
            .map(|(k, p)| scrape::Metric {
                label: labels(k),
                histogram: Some(p.outage.to_scrape()),
                ..scrape::Metric::default()
            })
            .collect();
        out.push(family(
            OUTAGE.0,
            OUTAGE.1,
            scrape::MetricType::Histogram,
            metric,
        ));
        for (name, help, f) in COUNTERS {
            let metric = self
                .paths
                .iter()
                .map(|(k, p)| scrape::Metric {
                    label: labels(k),
                    counter: Some(scrape::Counter {
                        value: Some(f(p) as f64),
                    }),
                    ..scrape::Metric::default()
                })
                .collect();
            out.push(family(name, help, scrape::MetricType::Counter, metric));
        }
        for (name, help, f) in CAPACITY {
            let metric = self
                .paths
                .iter()
                .filter_map(|(k, p)| {
                    p.capacity.as_ref().and_then(f).map(|v| scrape::Metric {
                        label: labels(k),
                        gauge: Some(scrape::Gauge { value: Some(v) }),
                        ..scrape::Metric::default()
                    })
                })
                .collect();
            out.push(family(name, help, scrape::MetricType::Gauge, metric));
        }
        out
    }

    /// The remote-write series of the path `key` as they stand, at `at_ms` (raised past
    /// the last sample pushed for the path, which must rise), with `extra` labels; empty
    /// for a path left out.
    #[allow(clippy::cast_precision_loss)]
    pub fn write_series(
        &mut self,
        key: &PathKey,
        at_ms: i64,
        extra: &[(String, String)],
    ) -> Vec<write::TimeSeries> {
        let Some(p) = self.paths.get_mut(key) else {
            return Vec::new();
        };
        let at = at_ms.max(p.pushed_ms.saturating_add(1));
        p.pushed_ms = at;
        let labels = |name: &str| -> Vec<write::Label> {
            let mut l: Vec<write::Label> = key
                .pairs()
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .chain(extra.iter().cloned())
                .chain(std::iter::once(("__name__".to_string(), name.to_string())))
                .map(|(name, value)| write::Label { name, value })
                .collect();
            l.sort();
            l
        };
        let p = &*p;
        let mut out = Vec::new();
        for (m, name, _) in HISTOGRAMS {
            if let Some(h) = p.histograms.get(&m) {
                out.push(write::TimeSeries {
                    labels: labels(name),
                    histograms: vec![h.to_write(at)],
                    ..write::TimeSeries::default()
                });
            }
        }
        if p.outage.count > 0 {
            out.push(write::TimeSeries {
                labels: labels(OUTAGE.0),
                histograms: vec![p.outage.to_write(at)],
                ..write::TimeSeries::default()
            });
        }
        for (name, _, f) in COUNTERS {
            out.push(write::TimeSeries {
                labels: labels(name),
                samples: vec![write::Sample {
                    value: f(p) as f64,
                    timestamp: at,
                }],
                ..write::TimeSeries::default()
            });
        }
        if let Some(c) = &p.capacity {
            for (name, _, f) in CAPACITY {
                if let Some(value) = f(c) {
                    out.push(write::TimeSeries {
                        labels: labels(name),
                        samples: vec![write::Sample {
                            value,
                            timestamp: at,
                        }],
                        ..write::TimeSeries::default()
                    });
                }
            }
        }
        out
    }
}

/// Remote write's metadata: each family's type and help.
pub fn metadata() -> Vec<write::MetricMetadata> {
    let meta = |t: write::MetadataType, name: &str, help: &str| write::MetricMetadata {
        r#type: t as i32,
        metric_family_name: name.to_string(),
        help: help.to_string(),
        unit: String::new(),
    };
    HISTOGRAMS
        .iter()
        .map(|&(_, n, h)| meta(write::MetadataType::Histogram, n, h))
        .chain(std::iter::once(meta(
            write::MetadataType::Histogram,
            OUTAGE.0,
            OUTAGE.1,
        )))
        .chain(
            COUNTERS
                .iter()
                .map(|&(n, h, _)| meta(write::MetadataType::Counter, n, h)),
        )
        .chain(
            CAPACITY
                .iter()
                .map(|&(n, h, _)| meta(write::MetadataType::Gauge, n, h)),
        )
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use pathprobe_proto::report::{
        ClockState, PathInfo, PathKind, ProbeProtocol, ReportId, TimestampSource, Timestamping,
        Window, WindowReport,
    };

    const T0: u64 = 1_795_680_000_000_000_000;

    fn report(id: u8, throughput: bool, events: Vec<PathEvent>) -> EncodedReport {
        let mut rtt = Metric::Rtt.new_histogram();
        for v in [2_000_000, 2_100_000, 9_000_000] {
            rtt.record(v).unwrap();
        }
        let mut histograms: BTreeMap<Metric, hdrhistogram::Histogram<u64>> =
            [(Metric::Rtt, rtt)].into();
        if throughput {
            let mut t = Metric::Throughput.new_histogram();
            t.record(50_000_000).unwrap();
            histograms.insert(Metric::Throughput, t);
        }
        let r = WindowReport {
            report_id: ReportId([id; 16]),
            agent_id: "ams-01".into(),
            site: Some("ams".into()),
            path: PathInfo {
                name: "er".into(),
                kind: PathKind::Expressroute,
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.1.0.4:862".parse().unwrap(),
                protocol: ProbeProtocol::Stamp,
                dscp: 46,
                packet_size: 44,
            },
            window: Window {
                start_unix_ns: T0,
                end_unix_ns: T0 + 10_000_000_000,
            },
            timestamping: Timestamping {
                rx: TimestampSource::Kernel,
                tx: TimestampSource::Kernel,
            },
            owd_clock: ClockState::Unavailable,
            counters: Counters {
                sent: 4,
                received: 3,
                lost: 1,
                rtt_sum_ns: 13_100_000,
                ..Counters::default()
            },
            histograms,
            signature: None,
            events,
            plan_version: None,
        };
        EncodedReport::from_json(&r.to_json().unwrap()).unwrap()
    }

    #[test]
    fn a_window_adds_its_counts_sum_and_events() {
        let failover = PathEvent::new(EventKind::Failover, T0, "failover".into());
        let c = Contribution::of(&report(1, false, vec![failover]));
        assert_eq!(c.totals.counters.sent, 4);
        let rtt = &c.totals.histograms[&Metric::Rtt];
        assert_eq!(rtt.count, 3);
        assert!((rtt.sum - 0.0131).abs() < 1e-12, "{}", rtt.sum);
        assert_eq!(c.totals.failovers, 1);
        let mut t = Totals::new(1);
        assert!(t.add(c.key.clone(), &c.totals));
        assert!(t.add(c.key.clone(), &c.totals));
        assert_eq!(t.paths[&c.key].counters.sent, 8);
        assert_eq!(t.paths[&c.key].histograms[&Metric::Rtt].count, 6);
        let mut other = c.key.clone();
        other.path = "vpn".into();
        assert!(!t.add(other, &c.totals), "past max_paths");
        assert_eq!(t.left_out, 1);
    }

    #[test]
    fn a_capacity_stage_adds_its_result_not_its_probes_under_load() {
        let c = Contribution::of(&report(2, true, Vec::new()));
        assert_eq!(c.totals.counters, Counters::default());
        assert!(c.totals.histograms.is_empty());
    }
}
