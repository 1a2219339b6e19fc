//! What `probe` prints: a line (or a JSON object) per window, and a summary of all windows
//! merged exactly; and the `proto` window report of each window.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use hdrhistogram::Histogram;
use pathprobe_proto::event::{PathEvent, Signature};
use pathprobe_proto::hist::{self, Metric, Micros};
use pathprobe_proto::report::{
    CheckForm, ClockState, CompactReport, Counted, Counters, PathInfo, Report, ReportId,
    Timestamping, Window, WindowReport,
};
use serde::Serialize;

use crate::Result;
use crate::engine::session::WindowStats;
use crate::watch::Observed;

/// Jitter (IPDV magnitude) percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Jitter {
    pub p50: f64,
    pub p99: f64,
}

/// One-way delay percentiles in microseconds, with the clock state behind them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Owd {
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// `synchronized` or `estimated`.
    pub clock: &'static str,
    /// The clock offset removed, when estimated.
    pub offset_us: Option<f64>,
}

#[allow(clippy::cast_precision_loss)] // display: microseconds of at most 100 s
fn us(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

/// A window, or the summary of all windows, as printed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// `window` or `summary`.
    #[serde(rename = "type")]
    pub record: &'static str,
    pub path: String,
    pub path_kind: String,
    pub start: String,
    pub end: String,
    pub windows: u64,
    /// `sent`, `received`, `lost`, `duplicated`, `reordered`, `late`, ... at the top level.
    #[serde(flatten)]
    pub counters: Counters,
    pub loss_pct: Option<f64>,
    pub longest_loss_run: Option<u64>,
    pub rtt_us: Option<Micros>,
    /// RTT from the scheduled send time (coordinated omission).
    pub rtt_sched_us: Option<Micros>,
    pub ipdv_us: Option<Jitter>,
    pub owd_fwd_us: Option<Owd>,
    pub owd_rev_us: Option<Owd>,
    pub timestamping: Timestamping,
    /// Hop counts and DSCP each way ([`crate::watch`]): the window's, or in a summary the
    /// last known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
    /// Events raised when the window closed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<PathEvent>,
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// How a probe run is labelled in its output.
#[derive(Debug, Clone)]
pub struct Labels {
    pub path: PathInfo,
    pub agent_id: String,
    pub site: Option<String>,
    pub timestamping: Timestamping,
}

/// The printed figures of `w` (`record` is `window` or `summary`; `windows` how many were
/// merged into it).
pub fn figures(labels: &Labels, w: &WindowStats, record: &'static str, windows: u64) -> Figures {
    let c = &w.counters;
    let h = |m| w.summary(m);
    let (clock, offset_us) = match w.owd_clock {
        ClockState::Synchronized { .. } => ("synchronized", None),
        ClockState::Estimated { offset_ns, .. } => {
            #[allow(clippy::cast_precision_loss)]
            let o = offset_ns as f64 / 1_000.0;
            ("estimated", Some(o))
        }
        ClockState::Unavailable => ("unavailable", None),
    };
    let owd = |m| {
        let s = h(m)?;
        Some(Owd {
            min: us(s.min),
            p50: us(s.p50),
            p99: us(s.p99),
            max: us(s.max),
            clock,
            offset_us,
        })
    };
    Figures {
        record,
        path: labels.path.name.clone(),
        path_kind: labels.path.kind.to_string(),
        start: rfc3339(w.start_wall_ns),
        end: rfc3339(w.end_wall_ns),
        windows,
        counters: *c,
        loss_pct: c.loss_pct(),
        longest_loss_run: h(Metric::LossRun).map(|s| s.max),
        rtt_us: h(Metric::Rtt).map(|s| s.micros()),
        rtt_sched_us: h(Metric::RttScheduled).map(|s| s.micros()),
        ipdv_us: h(Metric::Ipdv).map(|s| Jitter {
            p50: us(s.p50),
            p99: us(s.p99),
        }),
        owd_fwd_us: owd(Metric::OwdForward),
        owd_rev_us: owd(Metric::OwdReverse),
        timestamping: labels.timestamping,
        signature: None,
        events: Vec::new(),
    }
}

/// The printed figures of window `w` with what the watcher saw in it.
pub fn window_figures(labels: &Labels, w: &WindowStats, o: &Observed) -> Figures {
    let mut f = figures(labels, w, "window", 1);
    f.signature = o.signature;
    f.events.clone_from(&o.events);
    f
}

fn hops(h: Option<u8>) -> String {
    h.map_or_else(|| "?".to_string(), |h| h.to_string())
}

/// A signature for people: `hops 1 out, 1 back; DSCP 46 → 46 far, 46 back`.
pub fn signature_text(s: &Signature) -> String {
    let dscp = |d: Option<u8>| d.map_or_else(|| "?".to_string(), |d| d.to_string());
    format!(
        "hops {} out, {} back; DSCP {} sent, {} at the far end, {} back{}",
        hops(s.fwd_hops),
        hops(s.rev_hops),
        s.dscp_sent,
        dscp(s.dscp_far),
        dscp(s.dscp_back),
        if s.remarked() { " (RE-MARKED)" } else { "" }
    )
}

/// An event for people, its trace one hop per line.
pub fn event_text(e: &PathEvent) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "event {} at {}: {}",
        e.kind,
        rfc3339(e.at_unix_ns),
        e.summary
    );
    if let Some(t) = &e.trace {
        let _ = write!(
            out,
            "\n  trace ({}, {}):",
            match t.protocol {
                pathprobe_proto::event::TraceProtocol::Udp => "udp",
                pathprobe_proto::event::TraceProtocol::Tcp => "tcp",
            },
            if t.reached { "reached" } else { "not reached" }
        );
        for h in &t.hops {
            let addr = h.addr.map_or_else(|| "*".to_string(), |a| a.to_string());
            let rtt = h
                .rtt_us
                .map_or_else(|| "*".to_string(), |r| format!("{:.3} ms", r / 1000.0));
            let _ = write!(out, "\n  {:>3}  {addr:<40} {rtt}", h.ttl);
        }
    }
    if let Some(err) = &e.trace_error {
        let _ = write!(out, "\n  no trace: {err}");
    }
    out
}

/// All windows merged exactly: counters added, histograms added bucket by bucket. The clock
/// state is `synchronized` only if every window's was.
pub fn merge(windows: &[WindowStats]) -> Result<Option<WindowStats>> {
    let (Some(first), Some(last)) = (windows.first(), windows.last()) else {
        return Ok(None);
    };
    let mut counters = Counters::default();
    let mut histograms: BTreeMap<Metric, Histogram<u64>> = BTreeMap::new();
    let mut clock = ClockState::Unavailable;
    for w in windows {
        counters.merge(&w.counters)?;
        for (&m, h) in &w.histograms {
            let into = histograms.entry(m).or_insert_with(|| m.new_histogram());
            hist::merge(m, into, h)?;
        }
        clock = match (clock, w.owd_clock) {
            (c, ClockState::Unavailable) | (ClockState::Unavailable, c) => c,
            (
                ClockState::Synchronized { max_error_ns: a },
                ClockState::Synchronized { max_error_ns: b },
            ) => ClockState::Synchronized {
                max_error_ns: a.max(b),
            },
            (
                ClockState::Estimated { samples: a, .. },
                ClockState::Estimated {
                    offset_ns,
                    samples: b,
                },
            ) => ClockState::Estimated {
                offset_ns,
                samples: a.saturating_add(b),
            },
            (ClockState::Synchronized { .. }, e @ ClockState::Estimated { .. })
            | (e @ ClockState::Estimated { .. }, ClockState::Synchronized { .. }) => e,
        };
    }
    Ok(Some(WindowStats {
        compact: BTreeMap::new(),
        index: first.index,
        start_wall_ns: first.start_wall_ns,
        end_wall_ns: last.end_wall_ns,
        counters,
        histograms,
        owd_clock: clock,
        // Marks are not added up: the summary shows the watcher's last known signature.
        marks: last.marks,
    }))
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"))
}

/// One line per window for a terminal.
pub fn line(f: &Figures) -> String {
    use std::fmt::Write as _;
    let loss = f
        .loss_pct
        .map_or_else(|| "-".to_string(), |p| format!("{p:.3}%"));
    let rtt = f.rtt_us.as_ref().map_or_else(
        || "rtt -".to_string(),
        |r| {
            format!(
                "rtt min/p50/p99/max {:.1}/{:.1}/{:.1}/{:.1} µs",
                r.min, r.p50, r.p99, r.max
            )
        },
    );
    let ipdv = f.ipdv_us.as_ref().map_or_else(String::new, |j| {
        format!(" ipdv p50/p99 {:.1}/{:.1} µs", j.p50, j.p99)
    });
    let owd = match (&f.owd_fwd_us, &f.owd_rev_us) {
        (Some(a), Some(b)) => format!(
            " owd p50 fwd/rev {:.1}/{:.1} µs ({})",
            a.p50, b.p50, a.clock
        ),
        _ => String::new(),
    };
    // Said only when they happen: this machine did not keep up.
    let mut behind = String::new();
    if f.counters.send_slots_missed > 0 {
        let _ = write!(behind, " missed {}", f.counters.send_slots_missed);
    }
    if f.counters.ring_drops > 0 {
        let _ = write!(behind, " ring-drops {}", f.counters.ring_drops);
    }
    format!(
        "{} {} sent {} recv {} lost {} ({loss}) reord {} dup {} late {}{behind} | {rtt}{ipdv}{owd}",
        f.end,
        f.path,
        f.counters.sent,
        f.counters.received,
        f.counters.lost,
        f.counters.reordered,
        f.counters.duplicated,
        f.counters.late
    )
}

/// The summary as a two-column table.
pub fn table(f: &Figures) -> String {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(vec![
        format!("{} ({})", f.path, f.path_kind),
        format!("{} to {}", f.start, f.end),
    ]);
    let count = |v: u64| v.to_string();
    let rows: Vec<(&str, String)> = vec![
        ("windows", count(f.windows)),
        ("probes sent", count(f.counters.sent)),
        ("received", count(f.counters.received)),
        ("lost", count(f.counters.lost)),
        (
            "loss %",
            f.loss_pct.map_or("-".into(), |p| format!("{p:.3}")),
        ),
        (
            "longest loss run",
            f.longest_loss_run.map_or("-".into(), count),
        ),
        ("refused (TCP RST)", count(f.counters.refused)),
        ("reordered", count(f.counters.reordered)),
        ("duplicated", count(f.counters.duplicated)),
        ("late", count(f.counters.late)),
        ("send slots missed", count(f.counters.send_slots_missed)),
        ("ring drops", count(f.counters.ring_drops)),
        ("malformed replies", count(f.counters.malformed)),
        ("RTT min µs", cell(f.rtt_us.map(|r| r.min))),
        ("RTT p50 µs", cell(f.rtt_us.map(|r| r.p50))),
        ("RTT p90 µs", cell(f.rtt_us.map(|r| r.p90))),
        ("RTT p99 µs", cell(f.rtt_us.map(|r| r.p99))),
        ("RTT p99.9 µs", cell(f.rtt_us.map(|r| r.p999))),
        ("RTT max µs", cell(f.rtt_us.map(|r| r.max))),
        ("RTT mean µs", cell(f.rtt_us.map(|r| r.mean))),
        (
            "RTT from schedule p99 µs",
            cell(f.rtt_sched_us.map(|r| r.p99)),
        ),
        ("IPDV p50 µs", cell(f.ipdv_us.map(|j| j.p50))),
        ("IPDV p99 µs", cell(f.ipdv_us.map(|j| j.p99))),
        ("OWD forward p50 µs", cell(f.owd_fwd_us.map(|o| o.p50))),
        ("OWD reverse p50 µs", cell(f.owd_rev_us.map(|o| o.p50))),
        (
            "OWD clock",
            f.owd_fwd_us.map_or("unavailable", |o| o.clock).to_string(),
        ),
        (
            "timestamps rx / tx",
            format!("{:?} / {:?}", f.timestamping.rx, f.timestamping.tx).to_lowercase(),
        ),
        (
            "path signature",
            f.signature
                .as_ref()
                .map_or_else(|| "-".to_string(), signature_text),
        ),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    t.to_string()
}

/// The `proto` report of a window with its signature and events, with a fresh random id.
pub fn report(labels: &Labels, w: &WindowStats, o: &Observed) -> Result<WindowReport> {
    report_with(labels, w, o, w.histograms.clone())
}

/// The `proto` report of a window whose histograms are still compact, taken from it
/// (the engine's windows on their way out: kilobytes, encoded without building full
/// histograms). Its JSON is the octets [`report`] would write.
pub fn compact_report(labels: &Labels, w: &mut WindowStats, o: &Observed) -> Result<CompactReport> {
    let histograms = std::mem::take(&mut w.compact);
    report_with(labels, w, o, histograms)
}

/// The report of `w` with `histograms` as its histograms.
fn report_with<H: Counted + CheckForm>(
    labels: &Labels,
    w: &WindowStats,
    o: &Observed,
    histograms: BTreeMap<Metric, H>,
) -> Result<Report<H>> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id)
        .map_err(|e| crate::Error::Config(format!("no randomness for a report id: {e}")))?;
    let report = Report {
        report_id: ReportId(id),
        agent_id: labels.agent_id.clone(),
        site: labels.site.clone(),
        path: labels.path.clone(),
        window: Window {
            start_unix_ns: w.start_wall_ns,
            end_unix_ns: w.end_wall_ns.max(w.start_wall_ns + 1),
        },
        timestamping: labels.timestamping,
        owd_clock: w.owd_clock,
        counters: w.counters,
        histograms,
        signature: o.signature,
        events: o.events.clone(),
        plan_version: None,
    };
    report.validate()?;
    Ok(report)
}
