//! `pathprobe-agent capacity`: flags, progress, output.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::outbox::{CollectorArgs, Outbox, keep_report};
use indicatif::{ProgressBar, ProgressStyle};
use pathprobe_agent::capacity::client::{self, Event, Plan};
use pathprobe_agent::capacity::knee::Thresholds;
use pathprobe_agent::capacity::rate::{self, Rate};
use pathprobe_agent::capacity::wire::Direction;
use pathprobe_agent::capacity::{present, sizing};
use pathprobe_agent::output::Labels;
use pathprobe_proto::report::{ProbeProtocol, TimestampSource, Timestamping};

use super::{PinArgs, ReportArgs, duration, no_answer, resolve, stop_on_signals};

pub fn rate_arg(v: &str) -> Result<Rate, String> {
    rate::parse(v)
}

/// `95%` or `0.95`.
fn fraction(v: &str) -> Result<f64, String> {
    rate::parse_fraction(v)
}

/// Which way to load the path.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DirectionArg {
    /// From here to the far end.
    Up,
    /// From the far end to here.
    Down,
    /// Both at once.
    Both,
}

#[derive(Debug, clap::Args)]
#[allow(clippy::struct_excessive_bools)]
pub struct CapacityArgs {
    /// The far agent's reflector, HOST:PORT; it must run with --allow-capacity (control on
    /// TCP at this port, load on UDP and TCP one port above).
    #[arg(long, env = "PATHPROBE_TARGET")]
    target: String,
    /// Where the far agent's control listens, if not at --target's address (a relay or
    /// NAT in front of it that carries only UDP).
    #[arg(long, env = "PATHPROBE_CAPACITY_CONTROL")]
    control: Option<SocketAddr>,
    /// Where to send upload load, if the far agent's load port (--target's port + 1) is
    /// mapped elsewhere.
    #[arg(long, env = "PATHPROBE_CAPACITY_LOAD_TO")]
    load_to: Option<SocketAddr>,
    #[command(flatten)]
    pin: PinArgs,
    /// Load of the first stage (IP bits: 50mbit, 1gbit).
    #[arg(long, default_value = "10mbit", value_parser = rate_arg, env = "PATHPROBE_CAPACITY_START")]
    start: Rate,
    /// Load of the last stage.
    #[arg(long, default_value = "100mbit", value_parser = rate_arg, env = "PATHPROBE_CAPACITY_MAX")]
    max: Rate,
    /// Stages from --start to --max, evenly spaced.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50), env = "PATHPROBE_CAPACITY_STEPS")]
    steps: u32,
    /// Search for the knee between --start and --max (bisection to 5%) instead of the
    /// staircase.
    #[arg(long, env = "PATHPROBE_CAPACITY_SEARCH")]
    search: bool,
    /// Length of each stage.
    #[arg(long, default_value = "5s", value_parser = duration, env = "PATHPROBE_CAPACITY_STAGE_DURATION")]
    stage_duration: Duration,
    /// Which way to load the path, seen from here.
    #[arg(
        long,
        value_enum,
        default_value = "up",
        env = "PATHPROBE_CAPACITY_DIRECTION"
    )]
    direction: DirectionArg,
    /// UDP payload octets of the load (1372: 1,400-octet IPv4 packets, the largest an
    /// ExpressRoute gateway forwards unfragmented).
    #[arg(long, default_value_t = 1372, env = "PATHPROBE_CAPACITY_SIZE")]
    size: usize,
    /// STAMP probes per second under the load (the latency of every stage).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000), env = "PATHPROBE_CAPACITY_PROBE_RATE")]
    probe_rate: u32,
    /// Also measure TCP goodput with these numbers of parallel streams, like 1,4,16.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=64), env = "PATHPROBE_CAPACITY_TCP_STREAMS")]
    tcp_streams: Vec<u32>,
    /// The far reflector's authentication key (hexadecimal file), when it has one: proves
    /// to it that this test may run, and authenticates the STAMP stream under load.
    #[arg(long, env = "PATHPROBE_AUTH_KEY_FILE")]
    auth_key_file: Option<std::path::PathBuf>,
    /// A stage passes only if at least this much of the offered load arrives.
    #[arg(long, default_value = "95%", value_parser = fraction, env = "PATHPROBE_CAPACITY_MIN_DELIVERED")]
    min_delivered: f64,
    /// A stage passes only if at most this much of the load is lost.
    #[arg(long, default_value = "1%", value_parser = fraction, env = "PATHPROBE_CAPACITY_MAX_LOSS")]
    max_loss: f64,
    /// A stage passes only if its p99 RTT is at most this times the idle p99...
    #[arg(long, default_value_t = 3.0, env = "PATHPROBE_CAPACITY_RTT_FACTOR")]
    rtt_factor: f64,
    /// ...or the idle p99 plus this, whichever is larger.
    #[arg(long, default_value = "1ms", value_parser = duration, env = "PATHPROBE_CAPACITY_RTT_ALLOWANCE")]
    rtt_allowance: Duration,
    /// The rate the traffic needs, for the recommendation [default: the measured capacity].
    #[arg(long, value_parser = rate_arg, env = "PATHPROBE_CAPACITY_NEED")]
    need: Option<Rate>,
    /// Headroom on top of the need.
    #[arg(long, default_value = "30%", value_parser = fraction, env = "PATHPROBE_CAPACITY_HEADROOM")]
    headroom: f64,
    /// Print one JSON object per stage and a summary object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    report: ReportArgs,
    /// Stage reports go to a collector too (so that `compare` shows the path's throughput).
    #[command(flatten)]
    collector: CollectorArgs,
}

fn plan(args: &CapacityArgs, target: SocketAddr) -> anyhow::Result<Plan> {
    if args.rtt_factor < 1.0 {
        anyhow::bail!(
            "--rtt-factor {} is below 1: a stage could never pass",
            args.rtt_factor
        );
    }
    Ok(Plan {
        target,
        control: args.control,
        load_to: args.load_to,
        bind: args.pin.bind,
        interface: args.pin.interface.clone(),
        fwmark: args.pin.fwmark,
        start_bps: args.start.bps(),
        max_bps: args.max.bps(),
        steps: args.steps,
        search: args.search,
        stage: args.stage_duration,
        direction: match args.direction {
            DirectionArg::Up => Direction::Up,
            DirectionArg::Down => Direction::Down,
            DirectionArg::Both => Direction::Both,
        },
        size: args.size,
        probe_rate: args.probe_rate,
        tcp_streams: args.tcp_streams.clone(),
        key: args
            .auth_key_file
            .as_deref()
            .map(pathprobe_agent::keyfile::load)
            .transpose()?,
        thresholds: Thresholds {
            min_delivered: args.min_delivered,
            max_loss: args.max_loss,
            rtt_factor: args.rtt_factor,
            rtt_allowance_ns: u64::try_from(args.rtt_allowance.as_nanos()).unwrap_or(u64::MAX),
        },
    })
}

fn labels(args: &CapacityArgs, target: SocketAddr) -> anyhow::Result<Labels> {
    args.report.labels(
        args.pin
            .bind
            .unwrap_or_else(|| SocketAddr::new(target.ip(), 0)),
        target,
        ProbeProtocol::Stamp,
        0,
        u16::try_from(pathprobe_proto::stamp::Mode::Unauthenticated.base_len()).unwrap_or(44),
        // Each stage's report takes the sources its own STAMP stream had.
        Timestamping {
            rx: TimestampSource::Userspace,
            tx: TimestampSource::Userspace,
        },
    )
}

/// One line of progress.
fn event_line(e: &Event<'_>, stage: Duration) -> String {
    let way = |d: Direction| if d.up() && !d.down() { "up" } else { "down" };
    match e {
        Event::Idle => format!("idle: measuring the resting RTT for {stage:?}"),
        Event::Stage {
            number,
            offered_bps,
        } => format!("stage {number}: offering {}", Rate(*offered_bps)),
        Event::StageDone(s) => format!(
            "stage {} at {}: delivered {}, loss {:.2}%, {}",
            s.number,
            Rate(s.offered_bps),
            Rate(s.outcome.delivered_bps),
            s.outcome.loss * 100.0,
            if s.judgement.passed() {
                "ok"
            } else if s.outcome.remeasured {
                "failed on an RTT spike alone (its median within the limit): measuring it again"
            } else {
                "failed"
            }
        ),
        Event::Tcp { streams, direction } => {
            format!("TCP {} with {streams} streams", way(*direction))
        }
        Event::TcpDone(t) => format!(
            "TCP {} with {} streams: {}",
            way(t.direction),
            t.streams,
            Rate(t.goodput_bps)
        ),
    }
}

pub fn run(args: &CapacityArgs) -> anyhow::Result<ExitCode> {
    let target = resolve(&args.target)?;
    let plan = plan(args, target)?;
    let labels = labels(args, target)?;
    let mut outbox = args.collector.outbox("capacity")?;
    let stop = stop_on_signals()?;
    // A spinner with the current stage on a terminal; log lines otherwise.
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let mut failure: Option<anyhow::Error> = None;
    let mut on_event = |e: Event<'_>| {
        let msg = event_line(&e, plan.stage);
        let done = matches!(e, Event::StageDone(_) | Event::TcpDone(_));
        if let Some(b) = &bar {
            if done {
                b.println(&msg);
            } else {
                b.set_message(msg);
            }
        } else {
            tracing::info!("{msg}");
        }
        if let Event::StageDone(s) = e
            && let Err(err) = emit_stage(args, &labels, s, outbox.as_mut())
        {
            failure.get_or_insert(err);
        }
    };
    let result = client::run(&plan, &stop, &mut on_event);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // Whatever happened, what was measured goes to the collector.
    if let Some(o) = outbox.as_mut() {
        o.deliver("stage report")?;
    }
    let run = match result {
        Ok(r) => r,
        Err(e) => return no_answer(e),
    };
    if let Some(e) = failure {
        return Err(e);
    }
    let ip_packet = args.size + if target.is_ipv4() { 28 } else { 48 };
    let need = args.need.or(run.knee.capacity_bps.map(Rate));
    let rec = need.map(|n| sizing::recommend(n, args.headroom, ip_packet));
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&present::summary_json(&run, &plan.thresholds, rec.as_ref()))?
        );
    } else {
        print!("{}", present::text(&run, &plan.thresholds, rec.as_ref()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a finished stage (JSON mode) and writes its report where asked.
fn emit_stage(
    args: &CapacityArgs,
    labels: &Labels,
    s: &client::StageResult,
    outbox: Option<&mut Outbox>,
) -> anyhow::Result<()> {
    if args.json {
        let mut o = std::io::stdout().lock();
        writeln!(o, "{}", serde_json::to_string(&present::stage_json(s))?)?;
    }
    keep_report(args.report.report_dir.as_deref(), outbox, || {
        Ok(present::stage_report(labels, s)?)
    })
}
