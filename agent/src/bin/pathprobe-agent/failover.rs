//! `pathprobe-agent failover`: the outage when traffic moves between ExpressRoute and the
//! VPN, and the drill around a maintenance window.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::ValueEnum;
use pathprobe_agent::engine::session::WindowStats;
use pathprobe_agent::failover::{self, FailoverConfig, FailoverRun, PinnedPath, Verdict};
use pathprobe_agent::output::{self, Labels};
use pathprobe_agent::plan::{DrillSection, DrillSectionExt as _};
use pathprobe_agent::watch::Observed;
use pathprobe_proto::event::{EventKind, Outage, PathEvent};
use pathprobe_proto::report::ProbeProtocol;
use serde::Serialize;

use super::{PinArgs, ReportArgs, duration, no_answer, stop_on_signals};
use crate::outbox::{CollectorArgs, Outbox, keep_report};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FailoverProto {
    Stamp,
    TcpSyn,
}

#[derive(Debug, clap::Args)]
#[allow(clippy::struct_excessive_bools)]
pub struct FailoverArgs {
    /// The service: an address routing reaches over either path, HOST:PORT (a STAMP
    /// reflector, or with --proto tcp-syn any TCP listener).
    #[arg(long, env = "PATHPROBE_TARGET")]
    target: String,
    /// How to probe the service.
    #[arg(long, value_enum, default_value = "stamp", env = "PATHPROBE_PROTO")]
    proto: FailoverProto,
    /// Probes per second to the service: the outage is measured to 1/rate.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=100_000), env = "PATHPROBE_RATE")]
    rate: u32,
    /// A reflector over the primary path (ExpressRoute) only: low-rate probes there tell
    /// which path is alive and what it looks like. HOST:PORT of an address only that path
    /// reaches, or pinned to it: HOST:PORT,bind=ADDR / ,interface=NAME / ,fwmark=N.
    #[arg(long, env = "PATHPROBE_PRIMARY")]
    primary: Option<PinnedPath>,
    /// A reflector over the backup path (the VPN) only, like --primary.
    #[arg(long, env = "PATHPROBE_BACKUP")]
    backup: Option<PinnedPath>,
    /// Probes per second to each of --primary and --backup.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000), env = "PATHPROBE_PINNED_RATE")]
    pinned_rate: u32,
    /// Stop after this long [default: until Ctrl-C, or a drill's end].
    #[arg(long, value_parser = duration, env = "PATHPROBE_DURATION")]
    duration: Option<Duration>,
    /// Lost probes spanning at least this long are an outage (shorter runs are ordinary
    /// loss); at least two probe intervals.
    #[arg(long, default_value = "20ms", value_parser = duration, env = "PATHPROBE_MIN_OUTAGE")]
    min_outage: Duration,
    /// How long before and after an event its RTT and loss figures cover.
    #[arg(long, default_value = "10s", value_parser = duration, env = "PATHPROBE_SETTLE")]
    settle: Duration,
    /// Three path switches within this long are flagged as flapping.
    #[arg(long, default_value = "60s", value_parser = duration, env = "PATHPROBE_FLAP_WINDOW")]
    flap_window: Duration,
    /// Drill: wait for the primary to fail, measure, wait for traffic to come back to it,
    /// and judge every outage against --max-outage (exit code 0 pass, 4 fail, 5 the
    /// primary never failed or never came back).
    #[arg(long)]
    drill: bool,
    /// The longest outage a drill accepts (10 s: what Microsoft quotes for ExpressRoute
    /// with BFD).
    #[arg(long, default_value = "10s", value_parser = duration, env = "PATHPROBE_MAX_OUTAGE")]
    max_outage: Duration,
    /// Window length: one line (or JSON object) and one report per window.
    #[arg(long, default_value = "10s", value_parser = duration, env = "PATHPROBE_WINDOW")]
    window: Duration,
    /// How long a probe may wait for its answer before it counts as lost.
    #[arg(long, default_value = "1s", value_parser = duration, env = "PATHPROBE_TIMEOUT")]
    timeout: Duration,
    /// DSCP of the probes (0 to 63).
    #[arg(long, default_value_t = 0, env = "PATHPROBE_DSCP")]
    dscp: u8,
    #[command(flatten)]
    pin: PinArgs,
    /// Print one JSON object per window and per event, and a summary (or the drill's
    /// verdict).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    report: ReportArgs,
    #[command(flatten)]
    collector: CollectorArgs,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// The failover settings of the flags: the same conversion and checks as a `[[drill]]`
/// of the agent's config, then what only the command has (no drill verdict without
/// `--drill`, and giving up on a service that never answers).
fn config(args: &FailoverArgs) -> anyhow::Result<FailoverConfig> {
    let text = |d: Duration| humantime::format_duration(d).to_string();
    let section = DrillSection {
        name: args.report.path_name.clone(),
        proto: match args.proto {
            FailoverProto::Stamp => ProbeProtocol::Stamp,
            FailoverProto::TcpSyn => ProbeProtocol::TcpSyn,
        },
        target: args.target.clone(),
        rate: Some(args.rate),
        primary: args.primary.as_ref().map(ToString::to_string),
        backup: args.backup.as_ref().map(ToString::to_string),
        pinned_rate: Some(args.pinned_rate),
        start: None,
        duration: args.duration.map(text),
        max_outage: Some(text(args.max_outage)),
        min_outage: Some(text(args.min_outage)),
        settle: Some(text(args.settle)),
        flap_window: Some(text(args.flap_window)),
        window: Some(text(args.window.max(Duration::from_nanos(1)))),
        timeout: Some(text(args.timeout)),
        dscp: args.dscp,
        bind: args.pin.bind,
        interface: args.pin.interface.clone(),
        fwmark: args.pin.fwmark,
    };
    let mut cfg = section.plan(Path::new("the command line"))?.failover;
    // A drill may wait long for the primary to fail, but a service that never answers at
    // all is a wrong address.
    let no_reply = nanos(args.timeout).max(3_000_000_000);
    for p in [
        Some(&mut cfg.service),
        cfg.primary.as_mut(),
        cfg.backup.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        p.no_reply_ns = no_reply;
    }
    if !args.drill {
        cfg.drill_max_outage_ns = None;
    }
    Ok(cfg)
}

/// An event as `--json` prints it: the outage's figures at the top level.
#[derive(Serialize)]
struct EventLine<'a> {
    #[serde(rename = "type")]
    record: &'static str,
    kind: EventKind,
    start: String,
    end: String,
    #[serde(flatten)]
    outage: &'a Outage,
    summary: &'a str,
}

fn event_json(e: &PathEvent) -> Option<String> {
    let o = e.outage.as_ref()?;
    serde_json::to_string(&EventLine {
        record: "event",
        kind: e.kind,
        start: rfc3339(o.start_unix_ns),
        end: rfc3339(o.end_unix_ns),
        outage: o,
        summary: &e.summary,
    })
    .ok()
}

/// An event for people.
pub fn event_text(e: &PathEvent) -> String {
    let Some(o) = &e.outage else {
        return output::event_text(e);
    };
    format!(
        "{} {} to {}: {} (lost {}; within a second of it, reordered {} and duplicated {})",
        e.kind.as_str().to_uppercase(),
        rfc3339(o.start_unix_ns),
        rfc3339(o.end_unix_ns),
        e.summary,
        o.lost,
        o.reordered,
        o.duplicated
    )
}

fn emit_window(
    args: &FailoverArgs,
    labels: &Labels,
    w: &WindowStats,
    seen: &Observed,
    outbox: Option<&mut Outbox>,
) -> anyhow::Result<()> {
    let f = output::window_figures(labels, w, seen);
    {
        let mut o = std::io::stdout().lock();
        if args.json {
            writeln!(o, "{}", serde_json::to_string(&f)?)?;
        } else {
            writeln!(o, "{}", output::line(&f))?;
        }
    }
    keep_report(args.report.report_dir.as_deref(), outbox, || {
        Ok(output::report(labels, w, seen)?)
    })
}

/// The end of a run: a summary, or a drill's report and verdict.
#[derive(Serialize)]
struct Summary<'a> {
    #[serde(rename = "type")]
    record: &'static str,
    events: usize,
    switches: usize,
    worst_outage_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verdict: Option<Verdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_outage_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failover_outage_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failback_outage_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

#[allow(clippy::cast_precision_loss)] // milliseconds
fn summary(args: &FailoverArgs, run: &FailoverRun) -> Summary<'static> {
    let outages = || run.events.iter().filter_map(|e| e.outage.as_ref());
    let first = |k: EventKind| {
        run.events
            .iter()
            .find(|e| e.kind == k)
            .and_then(|e| e.outage.as_ref())
            .map(|o| o.outage_ms)
    };
    let verdict = args
        .drill
        .then(|| failover::verdict(run, nanos(args.max_outage)));
    Summary {
        record: if args.drill { "drill" } else { "summary" },
        events: run.events.len(),
        switches: outages().filter(|o| o.path_before != o.path_after).count(),
        worst_outage_ms: outages().map(|o| o.outage_ms).reduce(f64::max),
        verdict,
        max_outage_ms: args.drill.then(|| args.max_outage.as_nanos() as f64 / 1e6),
        failover_outage_ms: first(EventKind::Failover),
        failback_outage_ms: first(EventKind::Failback),
        note: match verdict {
            Some(Verdict::Pass) => {
                Some("the primary failed and came back; every outage was within the target")
            }
            Some(Verdict::Fail) => Some("an outage was longer than the target"),
            Some(Verdict::Incomplete) => Some(
                "traffic did not leave the primary and come back within the run: no failover was measured",
            ),
            None => None,
        },
    }
}

fn summary_text(s: &Summary<'_>) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"));
    let mut out = format!(
        "{} event(s), {} path switch(es); worst outage {}; failover {}; failback {}\n",
        s.events,
        s.switches,
        ms(s.worst_outage_ms),
        ms(s.failover_outage_ms),
        ms(s.failback_outage_ms)
    );
    if let Some(v) = s.verdict {
        let _ = writeln!(
            out,
            "drill verdict: {} against a target of {} ({})",
            match v {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::Incomplete => "INCOMPLETE",
            },
            ms(s.max_outage_ms),
            s.note.unwrap_or_default()
        );
    }
    out
}

pub fn run(args: &FailoverArgs) -> anyhow::Result<ExitCode> {
    let session = failover::Failover::open(config(args)?)?;
    let mut outbox = args.collector.outbox("failover")?;
    let stop = stop_on_signals()?;
    let service = &session.service;
    let labels = args.report.labels(
        service.local,
        service.config().target,
        service.config().protocol,
        args.dscp,
        service.packet_size(),
        service.timestamping,
    )?;
    let mut failure: Option<anyhow::Error> = None;
    let result = session.run(
        &stop,
        |w, seen| {
            if let Err(e) = emit_window(args, &labels, w, seen, outbox.as_mut()) {
                failure.get_or_insert(e);
            }
        },
        |e| {
            let line = if args.json {
                event_json(e).unwrap_or_default()
            } else {
                event_text(e)
            };
            println!("{line}");
        },
    );
    // Whatever happened, what was measured goes to the collector.
    if let Some(o) = outbox.as_mut() {
        o.deliver("report")?;
    }
    let run = match result {
        Ok(run) => run,
        Err(e) => return no_answer(e),
    };
    if let Some(e) = failure {
        return Err(e);
    }
    let s = summary(args, &run);
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        print!("{}", summary_text(&s));
    }
    Ok(match s.verdict {
        Some(Verdict::Fail) => ExitCode::from(4),
        Some(Verdict::Incomplete) => ExitCode::from(5),
        _ => ExitCode::SUCCESS,
    })
}
