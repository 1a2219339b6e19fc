//! `GET /metrics`: every path's cumulative figures ([`crate::totals`]: RTT, IPDV and
//! one-way delay histograms, probe and event counters, the last capacity test; at most
//! `max_metric_paths` label sets) and the collector's own. A scraper that asks for
//! protobuf in `Accept` gets native histograms; any other gets text with classic
//! buckets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use pathprobe_proto::ingest::Reason;
use prost::Message as _;

use super::AppState;
use super::listen::ConnCounts;
use super::pool::QueryPool;
use crate::promwire;
use crate::totals::{Contribution, Totals};

#[derive(Debug, Default)]
pub(super) struct Metrics {
    ingested: u64,
    duplicates: u64,
    pub(super) rejected: BTreeMap<Reason, u64>,
}

impl AppState {
    /// Adds the reports stored now (`fresh`, once each) to the cumulative figures, and
    /// hands them to remote write and OTLP.
    pub(super) fn record(&self, fresh: Vec<Contribution>, accepted: u64, duplicates: u64) {
        {
            let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
            m.ingested += accepted;
            m.duplicates += duplicates;
        }
        if let Some(otlp) = &self.otlp
            && !fresh.is_empty()
        {
            otlp.enqueue(&crate::otlp::request(&fresh, otlp.extra_labels()).encode_to_vec());
        }
        let mut t = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let mut series = Vec::new();
        for c in fresh {
            let kept = t.add(c.key.clone(), &c.totals);
            if kept && let Some(rw) = &self.remote_write {
                let at_ms = i64::try_from(c.end_ns / 1_000_000).unwrap_or(i64::MAX);
                series.extend(t.write_series(&c.key, at_ms, rw.extra_labels()));
            }
        }
        // Queued with the totals held: each path's samples in the order of their times.
        if let Some(rw) = &self.remote_write
            && !series.is_empty()
        {
            rw.enqueue_series(series);
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
    totals: &Totals,
    store_bytes: u64,
    quarantined: u64,
    conns: &ConnCounts,
    queries: &QueryPool,
) -> String {
    let mut out = String::new();
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
            totals.left_out,
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

pub(super) async fn metrics(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let protobuf = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(promwire::wants_protobuf);
    let m = st.metrics.lock().unwrap_or_else(PoisonError::into_inner);
    let totals = st.totals.lock().unwrap_or_else(PoisonError::into_inner);
    let mut own = exposition(
        &m,
        &totals,
        st.store.size_bytes(),
        st.quarantined.load(Ordering::Relaxed),
        &st.conns,
        &st.queries,
    );
    let paths = if protobuf {
        Err(totals.families())
    } else {
        let mut text = String::new();
        totals.text(&mut text);
        Ok(text)
    };
    drop((m, totals));
    if let Some(f) = &st.fleet {
        f.exposition(&mut own);
    }
    for push in [&st.remote_write, &st.otlp].into_iter().flatten() {
        push.exposition(&mut own);
    }
    match paths {
        Ok(mut text) => {
            text.push_str(&own);
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }
        // The paths' families with native histograms, then the collector's own counters
        // and gauges, read back from their text.
        Err(families) => {
            let mut body = Vec::new();
            for f in families.iter().chain(&promwire::text_families(&own)) {
                let _ = f.encode_length_delimited(&mut body);
            }
            (
                [(header::CONTENT_TYPE, promwire::SCRAPE_CONTENT_TYPE)],
                body,
            )
                .into_response()
        }
    }
}
