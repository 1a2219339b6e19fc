//! Summaries of window reports, merged exactly per path: what `pathprobe-collector inspect`
//! prints for report files (an agent's spool, a captured upload).

use std::collections::BTreeMap;

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use pathprobe_proto::hist::{Metric, Micros, Summary};
use pathprobe_proto::report::{Aggregate, ClockState, Counters, PathKind, WindowReport};
use serde::Serialize;

use crate::{Error, Result};

/// One path's windows, merged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathSummary {
    pub path: String,
    pub kind: PathKind,
    pub windows: u64,
    pub from_unix_ns: u64,
    pub to_unix_ns: u64,
    pub counters: Counters,
    pub loss_pct: Option<f64>,
    pub longest_loss_run: Option<u64>,
    pub rtt_us: Option<Micros>,
    pub ipdv_us: Option<Micros>,
    pub owd_fwd_us: Option<Micros>,
    pub owd_rev_us: Option<Micros>,
    /// `synchronized`, `estimated` or `mixed` when one-way delay is present.
    pub owd_clock: Option<&'static str>,
}

#[derive(Default)]
struct PathAcc {
    agg: Aggregate,
    from: u64,
    to: u64,
    clocks: (bool, bool),
}

/// Merges reports per (path name, kind). `origin` names each report in errors.
pub fn summarize<'a>(
    reports: impl IntoIterator<Item = (&'a str, &'a WindowReport)>,
) -> Result<Vec<PathSummary>> {
    let mut paths: BTreeMap<(String, PathKind), PathAcc> = BTreeMap::new();
    for (origin, r) in reports {
        let acc = paths
            .entry((r.path.name.clone(), r.path.kind))
            .or_insert_with(|| PathAcc {
                from: u64::MAX,
                ..PathAcc::default()
            });
        acc.agg.add(r).map_err(|source| Error::Report {
            origin: origin.to_owned(),
            source,
        })?;
        acc.from = acc.from.min(r.window.start_unix_ns);
        acc.to = acc.to.max(r.window.end_unix_ns);
        match r.owd_clock {
            ClockState::Synchronized { .. } => acc.clocks.0 = true,
            ClockState::Estimated { .. } => acc.clocks.1 = true,
            ClockState::Unavailable => {}
        }
    }
    Ok(paths
        .into_iter()
        .map(|((path, kind), acc)| {
            let summary = |m| acc.agg.histograms.get(&m).and_then(Summary::of);
            let has_owd =
                summary(Metric::OwdForward).is_some() || summary(Metric::OwdReverse).is_some();
            PathSummary {
                path,
                kind,
                windows: acc.agg.windows,
                from_unix_ns: acc.from,
                to_unix_ns: acc.to,
                counters: acc.agg.counters,
                loss_pct: acc.agg.counters.loss_pct(),
                longest_loss_run: summary(Metric::LossRun).map(|s| s.max),
                rtt_us: summary(Metric::Rtt).map(|s| s.micros()),
                ipdv_us: summary(Metric::Ipdv).map(|s| s.micros()),
                owd_fwd_us: summary(Metric::OwdForward).map(|s| s.micros()),
                owd_rev_us: summary(Metric::OwdReverse).map(|s| s.micros()),
                owd_clock: has_owd.then_some(match acc.clocks {
                    (true, false) => "synchronized",
                    (false, true) => "estimated",
                    _ => "mixed",
                }),
            }
        })
        .collect())
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

/// A table with one column per path and one row per figure.
pub fn render(summaries: &[PathSummary]) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    let mut header = vec![String::new()];
    header.extend(summaries.iter().map(|s| format!("{} ({})", s.path, s.kind)));
    t.set_header(header);
    let mut row = |label: &str, f: &dyn Fn(&PathSummary) -> String| {
        let mut r = vec![label.to_string()];
        r.extend(summaries.iter().map(f));
        t.add_row(r);
    };
    row("windows", &|s| s.windows.to_string());
    row("probes sent", &|s| s.counters.sent.to_string());
    row("received", &|s| s.counters.received.to_string());
    row("lost", &|s| s.counters.lost.to_string());
    row("loss %", &|s| {
        s.loss_pct.map_or("-".into(), |p| format!("{p:.3}"))
    });
    row("longest loss run", &|s| {
        s.longest_loss_run.map_or("-".into(), |n| n.to_string())
    });
    row("reordered", &|s| s.counters.reordered.to_string());
    row("duplicated", &|s| s.counters.duplicated.to_string());
    row("late", &|s| s.counters.late.to_string());
    row("send slots missed", &|s| {
        s.counters.send_slots_missed.to_string()
    });
    row("ring drops", &|s| s.counters.ring_drops.to_string());
    for (label, pick) in [
        ("RTT min µs", (|m: &Micros| m.min) as fn(&Micros) -> f64),
        ("RTT p50 µs", |m| m.p50),
        ("RTT p90 µs", |m| m.p90),
        ("RTT p99 µs", |m| m.p99),
        ("RTT p99.9 µs", |m| m.p999),
        ("RTT max µs", |m| m.max),
    ] {
        row(label, &|s| cell(s.rtt_us.as_ref().map(pick)));
    }
    row("IPDV p50 µs", &|s| cell(s.ipdv_us.map(|m| m.p50)));
    row("IPDV p99 µs", &|s| cell(s.ipdv_us.map(|m| m.p99)));
    row("OWD fwd p50 µs", &|s| cell(s.owd_fwd_us.map(|m| m.p50)));
    row("OWD rev p50 µs", &|s| cell(s.owd_rev_us.map(|m| m.p50)));
    row("OWD clock", &|s| s.owd_clock.unwrap_or("-").to_string());
    t.to_string()
}
