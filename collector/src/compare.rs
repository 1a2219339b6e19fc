//! ExpressRoute vs VPN, side by side: the figures of two path selections over one time
//! range, each computed from the exact merge of their windows, with the difference (b − a)
//! and ratio (b / a) of every figure, and what happened in the range: the events of either
//! side (route and marking changes) and every failover, failback and outage of the site
//! (those belong to the service path a failover run probes, and concern both sides).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use pathprobe_proto::hist::{Metric, Summary};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::Result;
use pathprobe_proto::event::EventKind;

use crate::store::{EventRow, Merged, Selector, Store};

/// Most events a comparison takes per side and per failover kind, and lists three times
/// this at most (the newest are cut; `/v1/events` has them all).
pub const MAX_EVENTS: usize = 100;

/// One figure of both sides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub figure: Cow<'static, str>,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// b − a.
    pub diff: Option<f64>,
    /// b / a.
    pub ratio: Option<f64>,
}

/// A comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub site: Option<String>,
    pub from: String,
    pub to: String,
    /// How the one-way delays' clocks were known on each side: `synchronized`,
    /// `estimated`, `mixed` or `unavailable`.
    pub owd_clock_a: Cow<'static, str>,
    pub owd_clock_b: Cow<'static, str>,
    pub rows: Vec<Row>,
    /// Events of either side in the range, oldest first.
    pub events: Vec<EventRow>,
}

#[allow(clippy::cast_precision_loss)] // figures for people; counts far below 2^53
fn f(v: u64) -> f64 {
    v as f64
}

fn clock(m: &Merged) -> &'static str {
    match (m.synchronized_windows, m.estimated_windows) {
        (0, 0) => "unavailable",
        (_, 0) => "synchronized",
        (0, _) => "estimated",
        _ => "mixed",
    }
}

/// The figures of one side, in row order.
fn figures(m: &Merged) -> Vec<(&'static str, Option<f64>)> {
    let c = &m.aggregate.counters;
    let s = |metric| m.aggregate.histograms.get(&metric).and_then(Summary::of);
    let us = |metric, pick: fn(&Summary) -> u64| s(metric).map(|x| f(pick(&x)) / 1_000.0);
    let known = c.received + c.lost;
    let pct = |n: u64| (known > 0).then(|| 100.0 * f(n) / f(known));
    let per_received = |n: u64| (c.received > 0).then(|| 100.0 * f(n) / f(c.received));
    let mbps = |pick: fn(&Summary) -> u64| s(Metric::Throughput).map(|x| f(pick(&x)) / 1e6);
    vec![
        ("paths", Some(f(m.paths.len() as u64))),
        ("windows", Some(f(m.aggregate.windows))),
        ("probes sent", Some(f(c.sent))),
        ("probes received", Some(f(c.received))),
        ("loss %", pct(c.lost)),
        ("longest loss run", s(Metric::LossRun).map(|x| f(x.max))),
        ("reordered %", per_received(c.reordered)),
        ("duplicated %", per_received(c.duplicated)),
        ("RTT min µs", us(Metric::Rtt, |x| x.min)),
        ("RTT p50 µs", us(Metric::Rtt, |x| x.p50)),
        ("RTT p90 µs", us(Metric::Rtt, |x| x.p90)),
        ("RTT p99 µs", us(Metric::Rtt, |x| x.p99)),
        ("RTT p99.9 µs", us(Metric::Rtt, |x| x.p999)),
        ("RTT max µs", us(Metric::Rtt, |x| x.max)),
        ("jitter (IPDV) p50 µs", us(Metric::Ipdv, |x| x.p50)),
        ("jitter (IPDV) p99 µs", us(Metric::Ipdv, |x| x.p99)),
        ("one-way forward p50 µs", us(Metric::OwdForward, |x| x.p50)),
        ("one-way forward p99 µs", us(Metric::OwdForward, |x| x.p99)),
        ("one-way reverse p50 µs", us(Metric::OwdReverse, |x| x.p50)),
        ("one-way reverse p99 µs", us(Metric::OwdReverse, |x| x.p99)),
        ("throughput p50 Mbit/s", mbps(|x| x.p50)),
        ("throughput p99 Mbit/s", mbps(|x| x.p99)),
        ("throughput max Mbit/s", mbps(|x| x.max)),
    ]
}

/// A time as RFC 3339, to the second.
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// Compares the windows of `a` and `b` starting in `[from_ns, to_ns)`.
pub fn compare(
    store: &dyn Store,
    a: &Selector,
    b: &Selector,
    from_ns: u64,
    to_ns: u64,
) -> Result<Comparison> {
    compare_merged(store, a, b, from_ns, to_ns).map(|(c, _, _)| c)
}

/// [`compare`], and each side's merged windows (for the dashboard's distributions, so
/// they come from the very histograms the figures do).
pub fn compare_merged(
    store: &dyn Store,
    a: &Selector,
    b: &Selector,
    from_ns: u64,
    to_ns: u64,
) -> Result<(Comparison, Merged, Merged)> {
    let ma = store.query(a, from_ns, to_ns)?;
    let mb = store.query(b, from_ns, to_ns)?;
    let mut events = store.events(a, from_ns, to_ns, None, MAX_EVENTS)?;
    events.extend(store.events(b, from_ns, to_ns, None, MAX_EVENTS)?);
    let site = Selector {
        name_or_kind: String::new(),
        site: a.site.clone(),
    };
    for kind in [
        EventKind::Failover,
        EventKind::Failback,
        EventKind::Outage,
        EventKind::PathChange,
    ] {
        events.extend(store.events(&site, from_ns, to_ns, Some(kind), MAX_EVENTS)?);
    }
    let key = |e: &EventRow| {
        (
            e.event.at_unix_ns,
            e.site.clone(),
            e.agent_id.clone(),
            e.path.clone(),
            e.event.kind,
            e.event.summary.clone(),
        )
    };
    events.sort_by_cached_key(key);
    // An event found twice (a path both selectors match, a failover of side a) is listed
    // once.
    events.dedup();
    events.truncate(3 * MAX_EVENTS);
    let rows = figures(&ma)
        .into_iter()
        .zip(figures(&mb))
        .map(|((figure, a), (_, b))| Row {
            figure: figure.into(),
            a,
            b,
            diff: a.zip(b).map(|(a, b)| b - a),
            ratio: a.zip(b).and_then(|(a, b)| (a != 0.0).then(|| b / a)),
        })
        .collect();
    let c = Comparison {
        a: a.name_or_kind.clone(),
        b: b.name_or_kind.clone(),
        site: a.site.clone(),
        from: rfc3339(from_ns),
        to: rfc3339(to_ns),
        owd_clock_a: clock(&ma).into(),
        owd_clock_b: clock(&mb).into(),
        rows,
        events,
    };
    Ok((c, ma, mb))
}

/// A figure as the table prints it: `-` for none, whole numbers without decimals, else
/// three decimals.
pub fn cell(v: Option<f64>) -> String {
    match v {
        None => "-".to_string(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// The comparison as a table for a terminal.
pub fn table(c: &Comparison) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(vec![
        format!("{} to {}", c.from, c.to),
        c.a.clone(),
        c.b.clone(),
        "b − a".to_string(),
        "b / a".to_string(),
    ]);
    for r in &c.rows {
        t.add_row(vec![
            r.figure.to_string(),
            cell(r.a),
            cell(r.b),
            cell(r.diff),
            r.ratio
                .map_or_else(|| "-".to_string(), |x| format!("{x:.2}×")),
        ]);
    }
    let mut out = t.to_string();
    let _ = write!(
        out,
        "\none-way delay clocks: {} {}, {} {} (estimated = offset taken from the lowest-RTT probes)",
        c.a, c.owd_clock_a, c.b, c.owd_clock_b
    );
    if c.events.is_empty() {
        out.push_str("\nevents: none in this range");
    } else {
        let _ = write!(
            out,
            "\nevents ({}):\n{}",
            c.events.len(),
            events_text(&c.events)
        );
    }
    out
}

/// Events for people, one per line (two with a trace: the routers it crossed).
pub fn events_text(events: &[EventRow]) -> String {
    let mut out = String::new();
    for e in events {
        let _ = writeln!(
            out,
            "  {}  {} ({}, site {}, agent {})  {}: {}",
            rfc3339(e.event.at_unix_ns),
            e.path,
            e.path_kind,
            e.site,
            e.agent_id,
            e.event.kind,
            e.event.summary
        );
        if let Some(t) = &e.event.trace {
            let hops: Vec<String> = t
                .hops
                .iter()
                .map(|h| h.addr.map_or_else(|| "*".to_string(), |a| a.to_string()))
                .collect();
            let _ = writeln!(
                out,
                "      trace: {}{}",
                hops.join(" → "),
                if t.reached { "" } else { " (not reached)" }
            );
        } else if let Some(err) = &e.event.trace_error {
            let _ = writeln!(out, "      no trace: {err}");
        }
    }
    out
}

/// The comparison as CSV: `figure,a,b,diff,ratio`.
pub fn csv(c: &Comparison) -> String {
    let num = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut out = format!("figure,{},{},diff,ratio\n", c.a, c.b);
    for r in &c.rows {
        let _ = writeln!(
            out,
            "\"{}\",{},{},{},{}",
            r.figure,
            num(r.a),
            num(r.b),
            num(r.diff),
            num(r.ratio)
        );
    }
    out
}
