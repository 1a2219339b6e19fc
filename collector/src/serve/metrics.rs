//! `GET /metrics`: Prometheus text exposition of what was ingested and refused, per path
//! (RTT in classic buckets, ratios, counters; at most `max_metric_paths` label sets) and
//! for the store.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::ingest::Reason;
use pathprobe_proto::report::Counters;

use super::AppState;
use super::listen::ConnCounts;
use super::pool::QueryPool;

/// Classic Prometheus buckets for latency, in seconds.
const LATENCY_BUCKETS_S: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// A path's figures for `/metrics`: classic RTT buckets (a few hundred octets, where the
/// report's histogram is 230 KiB) and counters.
#[derive(Debug, Default, Clone)]
pub(super) struct PathMetrics {
    pub(super) labels: String,
    /// Samples at or below each of [`LATENCY_BUCKETS_S`].
    rtt_le: [u64; LATENCY_BUCKETS_S.len()],
    rtt_count: u64,
    /// Sum of the samples' bucket values (each within 0.1% of the sample), ns.
    rtt_sum_ns: u128,
    counters: Counters,
}

impl PathMetrics {
    /// Adds a report's counters and its RTT histogram blob (checked when it was read).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub(super) fn add(&mut self, counters: &Counters, rtt_blob: Option<&[u8]>) {
        let _ = self.counters.merge(counters);
        let Some(blob) = rtt_blob else { return };
        let le_ns = LATENCY_BUCKETS_S.map(|le| (le * 1e9) as u64);
        let _ = hist::for_each_bucket(Metric::Rtt, blob, &mut |value, n| {
            for (i, &le) in le_ns.iter().enumerate() {
                if value <= le {
                    self.rtt_le[i] = self.rtt_le[i].saturating_add(n);
                }
            }
            self.rtt_count = self.rtt_count.saturating_add(n);
            self.rtt_sum_ns = self
                .rtt_sum_ns
                .saturating_add(u128::from(value) * u128::from(n));
        });
    }
}

#[derive(Debug, Default)]
pub(super) struct Metrics {
    ingested: u64,
    duplicates: u64,
    pub(super) rejected: BTreeMap<Reason, u64>,
    paths: BTreeMap<String, PathMetrics>,
    /// Reports of paths beyond `max_metric_paths`, left out of `/metrics`.
    paths_left_out: u64,
}

impl AppState {
    /// Adds the reports of a stored batch to `/metrics`, keeping at most
    /// `max_metric_paths` label sets.
    pub(super) fn record(
        &self,
        figures: Vec<(String, PathMetrics)>,
        accepted: u64,
        duplicates: u64,
    ) {
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.ingested += accepted;
        m.duplicates += duplicates;
        for (key, figures) in figures {
            let full = m.paths.len() >= self.limits.max_metric_paths;
            match m.paths.get_mut(&key) {
                Some(p) => {
                    let _ = p.counters.merge(&figures.counters);
                    for (a, b) in p.rtt_le.iter_mut().zip(figures.rtt_le) {
                        *a = a.saturating_add(b);
                    }
                    p.rtt_count = p.rtt_count.saturating_add(figures.rtt_count);
                    p.rtt_sum_ns = p.rtt_sum_ns.saturating_add(figures.rtt_sum_ns);
                }
                None if full => m.paths_left_out += 1,
                None => {
                    m.paths.insert(key, figures);
                }
            }
        }
    }
}

/// A per-path gauge: name, help, value.
type Gauge = (&'static str, &'static str, fn(&Counters) -> Option<f64>);
/// A per-path counter: what, value.
type CounterFigure = (&'static str, fn(&Counters) -> u64);

#[allow(clippy::cast_precision_loss)] // ratios for Prometheus
const GAUGES: [Gauge; 2] = [
    (
        "pathprobe_loss_ratio",
        "Probes lost over probes whose fate is known.",
        |c| {
            let known = c.received + c.lost;
            (known > 0).then(|| c.lost as f64 / known as f64)
        },
    ),
    (
        "pathprobe_reorder_ratio",
        "Replies reordered over replies received.",
        |c| (c.received > 0).then(|| c.reordered as f64 / c.received as f64),
    ),
];

const COUNTERS: [CounterFigure; 6] = [
    ("sent", |c| c.sent),
    ("received", |c| c.received),
    ("lost", |c| c.lost),
    ("duplicated", |c| c.duplicated),
    ("reordered", |c| c.reordered),
    ("late", |c| c.late),
];

/// Per-path series: the RTT histogram in classic buckets, ratios and counters.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn path_series(out: &mut String, m: &Metrics) {
    let _ = writeln!(
        out,
        "# HELP pathprobe_rtt_seconds Probe round-trip time, from the reports received since the collector started."
    );
    let _ = writeln!(out, "# TYPE pathprobe_rtt_seconds histogram");
    for p in m.paths.values().filter(|p| p.rtt_count > 0) {
        for (le, n) in LATENCY_BUCKETS_S.iter().zip(p.rtt_le) {
            let _ = writeln!(
                out,
                "pathprobe_rtt_seconds_bucket{{{},le=\"{le}\"}} {n}",
                p.labels
            );
        }
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_bucket{{{},le=\"+Inf\"}} {}",
            p.labels, p.rtt_count
        );
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_sum{{{}}} {}",
            p.labels,
            p.rtt_sum_ns as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_count{{{}}} {}",
            p.labels, p.rtt_count
        );
    }
    for (name, help, f) in GAUGES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in m.paths.values() {
            if let Some(v) = f(&p.counters) {
                let _ = writeln!(out, "{name}{{{}}} {v}", p.labels);
            }
        }
    }
    for (what, f) in COUNTERS {
        let name = format!("pathprobe_probes_{what}_total");
        let _ = writeln!(
            out,
            "# HELP {name} Probes {what}, from the reports received since the collector started.\n# TYPE {name} counter"
        );
        for p in m.paths.values() {
            let _ = writeln!(out, "{name}{{{}}} {}", p.labels, f(&p.counters));
        }
    }
}

/// A counter family `name` with one sample per reason.
fn reasons(
    out: &mut String,
    name: &str,
    help: &str,
    counts: impl Iterator<Item = (&'static str, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (reason, n) in counts {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
    }
}

/// The whole exposition: per-path series, then the collector's own health.
fn exposition(
    m: &Metrics,
    store_bytes: u64,
    quarantined: u64,
    conns: &ConnCounts,
    queries: &QueryPool,
) -> String {
    let mut out = String::new();
    path_series(&mut out, m);
    for (name, kind, help, value) in [
        (
            "pathprobe_collector_reports_ingested_total",
            "counter",
            "Reports stored.",
            m.ingested,
        ),
        (
            "pathprobe_collector_reports_duplicate_total",
            "counter",
            "Reports received again and ignored.",
            m.duplicates,
        ),
        (
            "pathprobe_collector_store_bytes",
            "gauge",
            "Size of the store's files.",
            store_bytes,
        ),
        (
            "pathprobe_collector_windows_quarantined",
            "gauge",
            "Stored windows set aside because they cannot be merged (see the store's quarantine table).",
            quarantined,
        ),
        (
            "pathprobe_collector_metric_paths_left_out_total",
            "counter",
            "Reports of paths left out of these metrics because --max-metric-paths series are kept already.",
            m.paths_left_out,
        ),
        (
            "pathprobe_collector_connections_open",
            "gauge",
            "Connections open now (at most --max-connections).",
            conns.open.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    reasons(
        &mut out,
        "pathprobe_collector_requests_rejected_total",
        "Requests refused (reports, and queries without a reader token), by reason.",
        Reason::ALL
            .into_iter()
            .map(|r| (r.as_str(), m.rejected.get(&r).copied().unwrap_or(0))),
    );
    reasons(
        &mut out,
        "pathprobe_collector_connections_refused_total",
        "Connections closed by a limit before a request was answered, by reason.",
        conns.refusals().into_iter(),
    );
    reasons(
        &mut out,
        "pathprobe_collector_queries_refused_total",
        "Queries refused by a query limit, by reason (busy: no free place; timeout; range; limit).",
        queries.refusals(),
    );
    out
}

pub(super) async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = exposition(
        &st.metrics.lock().unwrap_or_else(PoisonError::into_inner),
        st.store.size_bytes(),
        st.quarantined.load(Ordering::Relaxed),
        &st.conns,
        &st.queries,
    );
    let mut text = text;
    if let Some(f) = &st.fleet {
        f.exposition(&mut text);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
