//! A capacity test for people and programs: the stage table, the JSON objects (one per
//! stage, then the summary with `capacity_bps`, the knee and the recommendation), and one
//! collector report per stage (its STAMP stream's histograms plus the delivered-rate
//! histogram).

use std::fmt::Write as _;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use pathprobe_proto::event::{
    CapacityRecord, CapacityStage, EventKind, MAX_CAPACITY_STAGES, MAX_CONCLUSION_LINES,
    MAX_TEXT_LEN, PathEvent,
};
use pathprobe_proto::hist::{Metric, Summary};
use pathprobe_proto::report::WindowReport;
use serde_json::{Value, json};

use super::client::{DirResult, Run, StageResult, Stamped, TcpResult};
use super::knee::Thresholds;
use super::rate::Rate;
use super::sizing::Recommendation;
use crate::Result;
use crate::engine::session::WindowStats;
use crate::output::{self, Labels};

#[allow(clippy::cast_precision_loss)]
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn rtt(w: Option<&Stamped>) -> Option<Summary> {
    w.and_then(|w| w.window.histograms.get(&Metric::Rtt))
        .and_then(Summary::of)
}

fn dir_json(d: &DirResult) -> Value {
    json!({
        "sent": d.sent,
        "received": d.received,
        "duplicates": d.duplicates,
        "loss_pct": d.loss * 100.0,
        "delivered_bps": d.delivered_bps,
        "interval_bps": d.interval_bps,
    })
}

/// One stage as a JSON object (`record: "stage"`).
pub fn stage_json(s: &StageResult) -> Value {
    let r = rtt(s.stamp.as_ref());
    json!({
        "record": "stage",
        "stage": s.number,
        "offered_bps": s.offered_bps,
        "delivered_bps": s.outcome.delivered_bps,
        "loss_pct": s.outcome.loss * 100.0,
        "up": s.up.as_ref().map(dir_json),
        "down": s.down.as_ref().map(dir_json),
        "rtt_us": r.map(|r| json!({
            "p50": us(r.p50), "p90": us(r.p90), "p99": us(r.p99), "max": us(r.max)
        })),
        "ipdv_us": s
            .stamp
            .as_ref()
            .and_then(|st| st.window.histograms.get(&Metric::Ipdv))
            .and_then(Summary::of)
            .map(|j| json!({ "p50": us(j.p50), "p99": us(j.p99) })),
        "passed": s.judgement.passed(),
        "judgement": s.judgement,
        "sender_short": s.sender_short,
        // The load generator's own p99 lateness, allowed on top of the RTT limit.
        "sender_late_p99_us": us(s.outcome.sender_late_p99_ns),
        // Failed on a moment's RTT spike alone; the next stage measured this rate again.
        "remeasured": s.outcome.remeasured,
    })
}

fn tcp_json(t: &TcpResult) -> Value {
    json!({
        "streams": t.streams,
        "direction": t.direction,
        "goodput_bps": t.goodput_bps,
        "bytes": t.bytes,
    })
}

/// The summary object (`record: "capacity"`).
pub fn summary_json(run: &Run, th: &Thresholds, rec: Option<&Recommendation>) -> Value {
    let k = &run.knee;
    json!({
        "record": "capacity",
        "capacity_bps": k.capacity_bps,
        "knee": {
            "stage": k.stage.map(|i| run.stages[i].number),
            "offered_bps": k.stage.map(|i| run.stages[i].offered_bps),
            "capacity_bps": k.capacity_bps,
            "saturated": k.saturated,
            "rtt_inflates_at_bps": k.rtt_inflates_at_bps,
            "max_delivered_bps": k.max_delivered_bps,
        },
        "idle_rtt_p99_us": us(run.idle_p99_ns),
        "thresholds": {
            "min_delivered_pct": th.min_delivered * 100.0,
            "max_loss_pct": th.max_loss * 100.0,
            "rtt_factor": th.rtt_factor,
            "rtt_allowance_us": us(th.rtt_allowance_ns),
            "rtt_limit_us": us(th.rtt_limit_ns(run.idle_p99_ns)),
        },
        "recommendation": rec,
        "stages": run.stages.len(),
        "tcp": run.tcp.iter().map(tcp_json).collect::<Vec<_>>(),
        "stopped_early": run.stopped_early,
    })
}

fn rate_cell(bps: u64) -> String {
    Rate(bps).to_string()
}

/// A stage's verdict: `ok`, or what failed, and whether this machine fell short or the
/// stage was measured again.
fn stage_verdict(s: &StageResult) -> String {
    let j = s.judgement;
    let mut verdict = if j.passed() {
        "ok".to_string()
    } else {
        let why: Vec<&str> = [
            (j.delivered_ok, "delivered"),
            (j.loss_ok, "loss"),
            (j.rtt_ok, "RTT"),
        ]
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, what)| *what)
        .collect();
        format!("fail: {}", why.join(", "))
    };
    if s.sender_short {
        verdict.push_str(" (sender fell short)");
    }
    if s.outcome.remeasured {
        verdict.push_str(" (a spike: measured again)");
    }
    verdict
}

/// The stage table.
fn stage_table(run: &Run) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED);
    t.set_header([
        "stage",
        "offered",
        "delivered",
        "loss %",
        "RTT p50 µs",
        "RTT p99 µs",
        "verdict",
    ]);
    for s in &run.stages {
        let r = rtt(s.stamp.as_ref());
        let verdict = stage_verdict(s);
        t.add_row([
            s.number.to_string(),
            rate_cell(s.offered_bps),
            rate_cell(s.outcome.delivered_bps),
            format!("{:.2}", s.outcome.loss * 100.0),
            r.map_or("-".into(), |r| format!("{:.1}", us(r.p50))),
            r.map_or("-".into(), |r| format!("{:.1}", us(r.p99))),
            verdict,
        ]);
    }
    t
}

/// The pass marks, the knee and the TCP goodput, one line each.
fn verdict(out: &mut String, run: &Run, th: &Thresholds) -> std::fmt::Result {
    let k = &run.knee;
    writeln!(
        out,
        "idle RTT p99 {:.1} µs; a stage passes with ≥ {:.0}% delivered, ≤ {:.1}% loss and RTT p99 ≤ {:.1} µs",
        us(run.idle_p99_ns),
        th.min_delivered * 100.0,
        th.max_loss * 100.0,
        us(th.rtt_limit_ns(run.idle_p99_ns))
    )?;
    match (k.stage, k.capacity_bps) {
        (Some(i), Some(c)) if k.saturated => writeln!(
            out,
            "usable capacity: {} (stage {}, offered {}); the path saturates above it (most delivered: {})",
            Rate(c),
            run.stages[i].number,
            Rate(run.stages[i].offered_bps),
            Rate(k.max_delivered_bps)
        )?,
        (Some(_), Some(c)) => writeln!(
            out,
            "usable capacity: at least {}: every stage passed; raise --max to find the knee",
            Rate(c)
        )?,
        _ => writeln!(
            out,
            "no stage passed: the path carries less than --start ({}) cleanly",
            Rate(run.stages.first().map_or(0, |s| s.offered_bps))
        )?,
    }
    if let Some(at) = k.rtt_inflates_at_bps {
        writeln!(
            out,
            "latency inflates (bufferbloat) from {} offered",
            Rate(at)
        )?;
    }
    if let Some(why) = &run.stopped_early {
        writeln!(out, "note: {why}")?;
    }
    for tcp in &run.tcp {
        writeln!(
            out,
            "TCP {}, {} stream{}: {} goodput",
            if tcp.direction.up() { "up" } else { "down" },
            tcp.streams,
            if tcp.streams == 1 { "" } else { "s" },
            Rate(tcp.goodput_bps)
        )?;
    }
    Ok(())
}

/// What to buy, a few lines.
fn recommendation(out: &mut String, r: &Recommendation) -> std::fmt::Result {
    writeln!(
        out,
        "to carry {} with {:.0}% headroom ({}, {} packets/s):",
        Rate(r.need_bps),
        r.headroom * 100.0,
        Rate(r.required_bps),
        r.required_pps
    )?;
    writeln!(
        out,
        "  ExpressRoute circuit: {}",
        r.er_circuit_bps
            .map_or("none is large enough".into(), |c| Rate(c).to_string())
    )?;
    writeln!(
        out,
        "  ExpressRoute gateway: {} (or ErGwScale with {} scale unit{})",
        r.er_gateway.map_or("none is large enough", |g| g.sku),
        r.er_scale_units,
        if r.er_scale_units == 1 { "" } else { "s" }
    )?;
    writeln!(
        out,
        "  VPN gateway: {}",
        r.vpn_gateway.map_or("none is large enough", |g| g.sku)
    )?;
    for n in &r.notes {
        writeln!(out, "  note: {n}")?;
    }
    Ok(())
}

/// The stage table, the verdict and the recommendation, for a terminal.
pub fn text(run: &Run, th: &Thresholds, rec: Option<&Recommendation>) -> String {
    let mut out = stage_table(run).to_string();
    out.push('\n');
    // Writing into a String cannot fail.
    let _ = verdict(&mut out, run, th);
    if let Some(r) = rec {
        let _ = recommendation(&mut out, r);
    }
    out
}

/// A stage as a collector report: the STAMP stream's window with the delivered-rate
/// histogram (100 ms intervals; the upload direction when it was loaded, else download).
/// `labels` name the path; the stage's own STAMP stream supplies the local address and
/// the timestamp sources.
pub fn stage_report(labels: &Labels, s: &StageResult) -> Result<WindowReport> {
    let mut labels = labels.clone();
    if let Some(st) = &s.stamp {
        labels.timestamping = st.timestamping;
        labels.path.local = st.local;
    }
    let mut w = s.stamp.as_ref().map_or_else(
        || WindowStats {
            compact: std::collections::BTreeMap::new(),
            index: 0,
            start_wall_ns: s.start_wall_ns,
            end_wall_ns: s.end_wall_ns,
            counters: pathprobe_proto::report::Counters::default(),
            histograms: std::collections::BTreeMap::new(),
            owd_clock: pathprobe_proto::report::ClockState::Unavailable,
            marks: crate::engine::session::Marks::default(),
        },
        |st| st.window.clone(),
    );
    let intervals =
        s.up.as_ref()
            .or(s.down.as_ref())
            .map(|d| d.interval_bps.as_slice())
            .unwrap_or_default();
    if !intervals.is_empty() {
        let mut h = Metric::Throughput.new_histogram();
        for &bps in intervals {
            h.saturating_record(bps);
        }
        w.histograms.insert(Metric::Throughput, h);
    }
    output::report(&labels, &w, &crate::watch::Observed::default())
}

/// The run as the collector keeps it: every stage, the knee and the recommendation, and
/// the lines [`text`] prints under its table.
pub fn record(run: &Run, th: &Thresholds, rec: Option<&Recommendation>) -> CapacityRecord {
    let k = &run.knee;
    let mut lines = String::new();
    let _ = verdict(&mut lines, run, th);
    if let Some(r) = rec {
        let _ = recommendation(&mut lines, r);
    }
    CapacityRecord {
        stages: run
            .stages
            .iter()
            .take(MAX_CAPACITY_STAGES)
            .map(|s| {
                let r = rtt(s.stamp.as_ref());
                CapacityStage {
                    number: u32::try_from(s.number).unwrap_or(u32::MAX),
                    offered_bps: s.offered_bps,
                    delivered_bps: s.outcome.delivered_bps,
                    loss_pct: (s.outcome.loss * 100.0).clamp(0.0, 100.0),
                    rtt_p50_us: r.map(|r| us(r.p50)),
                    rtt_p99_us: r.map(|r| us(r.p99)),
                    passed: s.judgement.passed(),
                    verdict: stage_verdict(s),
                }
            })
            .collect(),
        capacity_bps: k.capacity_bps,
        saturated: k.saturated,
        max_delivered_bps: k.max_delivered_bps,
        rtt_inflates_at_bps: k.rtt_inflates_at_bps,
        idle_rtt_p99_us: us(run.idle_p99_ns),
        rtt_limit_us: us(th.rtt_limit_ns(run.idle_p99_ns)),
        er_circuit_bps: rec.and_then(|r| r.er_circuit_bps),
        er_gateway: rec
            .and_then(|r| r.er_gateway.as_ref())
            .map(|g| g.sku.to_string()),
        vpn_gateway: rec
            .and_then(|r| r.vpn_gateway.as_ref())
            .map(|g| g.sku.to_string()),
        conclusion: lines
            .lines()
            .map(|l| l.chars().take(MAX_TEXT_LEN / 4).collect())
            .take(MAX_CONCLUSION_LINES)
            .collect(),
    }
}

/// The run's `capacity_test` event, raised at `at_unix_ns` (the run's end): its record,
/// and the capacity line as its summary.
pub fn result_event(
    run: &Run,
    th: &Thresholds,
    rec: Option<&Recommendation>,
    at_unix_ns: u64,
) -> PathEvent {
    let record = record(run, th, rec);
    let summary = record
        .conclusion
        .iter()
        .find(|l| l.starts_with("usable capacity") || l.starts_with("no stage passed"))
        .cloned()
        .unwrap_or_else(|| "capacity test done".to_string());
    PathEvent {
        capacity: Some(record),
        ..PathEvent::new(EventKind::CapacityTest, at_unix_ns, summary)
    }
}

/// The stage reports of a run, in order, the last carrying the run's `capacity_test`
/// event ([`result_event`]), for the collector.
pub fn reports(
    labels: &Labels,
    run: &Run,
    th: &Thresholds,
    rec: Option<&Recommendation>,
    at_unix_ns: u64,
) -> Result<Vec<WindowReport>> {
    let mut out = run
        .stages
        .iter()
        .map(|s| stage_report(labels, s))
        .collect::<Result<Vec<_>>>()?;
    if let Some(last) = out.last_mut() {
        last.events.push(result_event(run, th, rec, at_unix_ns));
    }
    Ok(out)
}
