//! The `pathprobe-agent` command.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

mod capacity;
#[cfg(feature = "demo")]
mod demo;
mod failover;
mod outbox;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use pathprobe_agent::capacity::rate::Rate;
use pathprobe_agent::decode::{self, Direction};
use pathprobe_agent::emulate::link::{LinkConfig, Profile};
use pathprobe_agent::emulate::nfqueue::{NfqueueConfig, NfqueueEmulator};
use pathprobe_agent::emulate::{Emulator, EmulatorConfig, EmulatorStats};
use pathprobe_agent::fleet;
use pathprobe_agent::output::{self, Labels};
use pathprobe_agent::plan::{AgentPlan, FleetPlan, Overrides, PathSection, PathSectionExt as _};
use pathprobe_agent::probe::{self, ProbeConfig};
use pathprobe_agent::reflector::{self, ReflectorConfig, ReflectorStats};
use pathprobe_agent::{Error, hexbytes, keyfile};
use pathprobe_proto::report::{PathInfo, PathKind, ProbeProtocol};
use pathprobe_proto::stamp::TimestampFormat;

/// pathprobe agent: measures network paths (ExpressRoute, VPN, ...) with STAMP probes.
#[derive(Debug, Parser)]
#[command(name = "pathprobe-agent", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Accept token and key files that others can read (mode wider than 0600).
    #[arg(long, global = true, env = "PATHPROBE_ALLOW_WORLD_READABLE_SECRETS")]
    allow_world_readable_secrets: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer STAMP probes: an RFC 8762 Session-Reflector (any RFC 8762 sender works).
    Reflect(ReflectArgs),
    /// Probe a reflector: an RFC 8762 Session-Sender that measures the path.
    Probe(Box<ProbeArgs>),
    /// The whole system on this machine in one command: a reflector, an ExpressRoute-like and
    /// a VPN-like emulated path, a collector and an agent probing both; then the comparison.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Drive a path at rising load: where it saturates, where its latency inflates, and
    /// which ExpressRoute circuit and gateway sizes the traffic needs.
    Capacity(Box<capacity::CapacityArgs>),
    /// Measure how long traffic to a service is lost when routing moves it between the
    /// primary path (ExpressRoute) and the backup (the VPN), and back; --drill around a
    /// maintenance window gives a verdict against --max-outage.
    Failover(Box<failover::FailoverArgs>),
    /// The routers a path crosses and the RTT to each (TTL-limited UDP or TCP probes, one
    /// flow for the whole run, ICMP read from a raw socket: needs CAP_NET_RAW).
    Trace(TraceArgs),
    /// Emulate a path: delay, jitter, loss, rate, duplication, outages; for UDP through a
    /// relay, or (root) for all IP traffic behind iptables NFQUEUE rules.
    Emulate(EmulateArgs),
    /// Run as the long-running agent: reflect, probe every configured path, and push every
    /// window report to the collector (spooled on disk while it is away).
    ///
    /// Settings come from the flags, then the environment, then the file, then the
    /// defaults. SIGHUP reads the file again: changed paths and drills restart, new ones
    /// start, removed ones stop (their last window delivered), unchanged ones run on.
    Run(RunArgs),
    /// Decode a STAMP test packet (the UDP payload, in hex) field by field.
    ///
    /// Paste the payload from a capture (Wireshark: Copy > as Hex Stream; tcpdump -X) to see
    /// what a sender or reflector, ours or a router's, put in each field.
    Decode(DecodeArgs),
}

/// `run`: the config file, and what the command line or environment set over it.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The agent's TOML configuration. Without one (or with one that lists no path, drill
    /// or reflector) the agent follows the collector's fleet plan: give --collector and
    /// --token-file.
    #[arg(long, env = "PATHPROBE_CONFIG", required_unless_present = "collector")]
    config: Option<PathBuf>,
    /// Agent id for reports, over the file's agent id [default: the host name].
    #[arg(long, env = "PATHPROBE_AGENT_ID")]
    agent_id: Option<String>,
    /// Site name for reports, over the file's site.
    #[arg(long, env = "PATHPROBE_SITE")]
    site: Option<String>,
    /// The collector (like <http://10.0.0.5:8862>), over the file's [collector] url.
    #[arg(long, env = "PATHPROBE_COLLECTOR")]
    collector: Option<String>,
    /// The agent's collector token, in this file, over the token (file) in the config.
    #[arg(long, env = "PATHPROBE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where reports wait for the collector, over the spool folder in the config.
    #[arg(long, env = "PATHPROBE_SPOOL")]
    spool: Option<PathBuf>,
    /// The CA (PEM) that signed an https:// collector's certificate, over the CA file of
    /// the config's [collector] section [default: the system's CAs].
    #[arg(long, env = "PATHPROBE_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Allow an http:// collector beyond loopback: reports and token in clear.
    #[arg(long, env = "PATHPROBE_INSECURE_HTTP")]
    insecure_http: bool,
}

/// `run`: the agent, until SIGINT or SIGTERM; SIGHUP reloads the file. Following a fleet
/// plan, it asks the collector for it every `plan_poll` and applies each new one.
fn run_agent(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let over = Overrides {
        agent_id: args.agent_id.clone(),
        site: args.site.clone(),
        collector: args.collector.clone(),
        token_file: args.token_file.clone(),
        spool: args.spool.clone(),
        ca_file: args.ca_file.clone(),
        insecure_http: args.insecure_http,
    };
    let config = args.config.as_deref();
    let local = AgentPlan::load_with_fleet(config, &over, None)?;
    let current: Mutex<Option<FleetPlan>> = Mutex::new(None);
    let mut source = match (local.fleet_poll, &local.collector) {
        (Some(poll), Some(to)) => Some((fleet::PlanSource::new(to, &local.agent_id)?, poll)),
        _ => None,
    };
    if let Some((src, _)) = source.as_mut() {
        if let Some(cached) = src.cached() {
            tracing::info!(plan_version = %cached.version, "starting on the cached fleet plan");
            *current.lock().unwrap_or_else(PoisonError::into_inner) = Some(cached);
        }
        if let Err(e) = take(src.poll(), &current) {
            tracing::warn!(error = %e, "cannot fetch the fleet plan yet: running on what there is, asking again");
        }
    }
    let plan = AgentPlan::load_with_fleet(
        config,
        &over,
        current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref(),
    )?;
    let stop = stop_on_signals()?;
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
        .context("cannot install the SIGHUP handler")?;
    let fleet_changed = AtomicBool::new(false);
    let mut reload =
        || {
            let hangup = hup.swap(false, Ordering::Relaxed);
            let changed = fleet_changed.swap(false, Ordering::Relaxed);
            (hangup || changed).then(|| {
            if hangup {
                tracing::info!(config = ?args.config, "SIGHUP: reading the configuration again");
            }
            let fleet_plan = current.lock().unwrap_or_else(PoisonError::into_inner).clone();
            AgentPlan::load_with_fleet(config, &over, fleet_plan.as_ref())
        })
        };
    std::thread::scope(|s| -> anyhow::Result<()> {
        if let Some((mut src, poll)) = source {
            let (stop, current, changed) = (&*stop, &current, &fleet_changed);
            s.spawn(move || follow_fleet(&mut src, poll, stop, current, changed));
        }
        pathprobe_agent::daemon::run(plan, &stop, &mut reload)?;
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// What a poll found, taken: a new plan goes to `current` (true), an unchanged one
/// leaves it (false); a failure says why.
fn take(polled: fleet::Polled, current: &Mutex<Option<FleetPlan>>) -> Result<bool, String> {
    match polled {
        fleet::Polled::New(p) => {
            tracing::info!(plan_version = %p.version, paths = p.paths.len(), "new fleet plan");
            *current.lock().unwrap_or_else(PoisonError::into_inner) = Some(*p);
            Ok(true)
        }
        fleet::Polled::Unchanged => Ok(false),
        fleet::Polled::Failed(e) => Err(e),
    }
}

/// Asks for the fleet plan every `poll` until `stop`; a new one goes to `current`, and
/// `changed` tells the supervisor. Failures are logged when they start and when they end.
fn follow_fleet(
    src: &mut fleet::PlanSource,
    poll: Duration,
    stop: &AtomicBool,
    current: &Mutex<Option<FleetPlan>>,
    changed: &AtomicBool,
) {
    let mut failing = false;
    let mut next = std::time::Instant::now() + poll;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if std::time::Instant::now() < next {
            continue;
        }
        next = std::time::Instant::now() + poll;
        match take(src.poll(), current) {
            Ok(new) => {
                if new {
                    changed.store(true, Ordering::Relaxed);
                } else if failing {
                    tracing::info!("the collector answers again: the fleet plan is unchanged");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot fetch the fleet plan: running on the last one, asking again");
                }
                failing = true;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DirectionArg {
    /// Session-Sender to Session-Reflector (to port 862).
    Request,
    /// Session-Reflector to Session-Sender (from port 862).
    Reply,
}

#[derive(Debug, clap::Args)]
struct DecodeArgs {
    /// Which side sent the packet.
    #[arg(long, value_enum, env = "PATHPROBE_DIRECTION")]
    direction: DirectionArg,
    /// Read the 112-octet authenticated layout (implied by --auth-key-file).
    #[arg(long)]
    authenticated: bool,
    /// Check the HMAC with the key in this file (hexadecimal digits).
    #[arg(long, env = "PATHPROBE_AUTH_KEY_FILE")]
    auth_key_file: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// The payload in hexadecimal; spaces and colons are ignored. Omit or give `-` to read
    /// standard input.
    hex: Option<String>,
}

/// A duration written like `10s`, `500ms`, `1h`, `1m30s`.
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}): write it like 10s, 500ms or 1h"))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    /// 64-bit NTP (RFC 8762 default).
    Ntp,
    /// PTPv2 truncated.
    Ptp,
}

#[derive(Debug, clap::Args)]
struct ReflectArgs {
    /// Address and UDP port to answer on.
    #[arg(long, default_value = "0.0.0.0:862", env = "PATHPROBE_LISTEN")]
    listen: SocketAddr,
    /// Number replies per session (source address, port and SSID) instead of copying the
    /// sender's sequence number (stateless, the default).
    #[arg(long, env = "PATHPROBE_STATEFUL")]
    stateful: bool,
    /// Authenticated mode, with the key in this file (hexadecimal digits) for every SSID.
    /// Requests without a valid HMAC are dropped unanswered. During a key rollover the file
    /// holds the new key and the old one, one per line, newest first. SIGHUP reads it again.
    #[arg(long, env = "PATHPROBE_AUTH_KEY_FILE", group = "auth")]
    auth_key_file: Option<PathBuf>,
    /// Authenticated mode, with a key file per SSID in this directory, named by the SSID in
    /// hexadecimal (`000a.key` for SSID 10, as stamp-suite's --hmac-key-dir), and
    /// `default.key` for the other SSIDs. SIGHUP reads it again.
    #[arg(long, env = "PATHPROBE_AUTH_KEY_DIR", group = "auth")]
    auth_key_dir: Option<PathBuf>,
    /// Most requests answered per second per source address (0: no cap). Keeps the reflector
    /// from being used to flood a third party with spoofed requests.
    #[arg(long, default_value_t = 250_000, env = "PATHPROBE_MAX_RATE_PER_SOURCE")]
    max_rate_per_source: u32,
    /// Most replies per second over all sources together (0: no cap).
    #[arg(long, default_value_t = 0, env = "PATHPROBE_MAX_RATE_TOTAL")]
    max_rate_total: u32,
    /// A prefix of configured senders (repeatable, like 10.20.0.0/16): answered first.
    /// With any, all other sources share --max-rate-others, are refused before their HMAC
    /// is checked, and are the ones refused when the table of sources is full, so that a
    /// flood from spoofed addresses costs the configured senders nothing.
    #[arg(
        long = "allow",
        value_name = "PREFIX",
        env = "PATHPROBE_ALLOW",
        value_delimiter = ','
    )]
    allow: Vec<ipnet::IpNet>,
    /// Authenticated mode: refuse a request whose SSID and sequence number were answered
    /// already, or that is older than its session's window of 1,024 (per SSID, whatever
    /// the source address). Senders that share the key need SSIDs of their own.
    #[arg(long, requires = "auth", env = "PATHPROBE_REFUSE_REPLAYS")]
    refuse_replays: bool,
    /// With --allow: most replies per second to all other sources together.
    #[arg(long, default_value_t = pathprobe_agent::plan::default_max_rate_others(), env = "PATHPROBE_MAX_RATE_OTHERS")]
    max_rate_others: u32,
    /// The DSCP of replies: `copy` (the DSCP1 a request's Class-of-Service TLV asks for,
    /// else the DSCP it arrived with), a fixed value 0 to 63 (so that no sender can have
    /// replies marked as network control, CS6/CS7), or `keep` (the socket's own marking).
    #[arg(long, default_value = "copy", env = "PATHPROBE_REPLY_DSCP")]
    reply_dscp: reflector::ReplyDscp,
    /// Timestamp format of T2 and T3.
    #[arg(
        long,
        value_enum,
        default_value = "ntp",
        env = "PATHPROBE_TIMESTAMP_FORMAT"
    )]
    timestamp_format: FormatArg,
    /// Log the counters this often (0s: only at exit).
    #[arg(long, default_value = "60s", value_parser = duration, env = "PATHPROBE_STATS_INTERVAL")]
    stats_interval: Duration,
    /// Stop after this long (default: run until SIGINT or SIGTERM).
    #[arg(long, value_parser = duration, env = "PATHPROBE_DURATION")]
    duration: Option<Duration>,
    /// Take part in capacity tests: control on TCP at the --listen port, load sunk (and,
    /// for download tests, sent back to the tester) on UDP and TCP one port above.
    #[arg(long, env = "PATHPROBE_ALLOW_CAPACITY")]
    allow_capacity: bool,
    /// The highest load a capacity test may ask of this agent (IP bits: 500mbit, 1gbit).
    #[arg(long, default_value = "1gbit", value_parser = capacity::rate_arg, requires = "allow_capacity", env = "PATHPROBE_CAPACITY_MAX_RATE")]
    capacity_max_rate: Rate,
    /// The longest stage a capacity test may ask of this agent.
    #[arg(long, default_value = "60s", value_parser = duration, requires = "allow_capacity", env = "PATHPROBE_CAPACITY_MAX_STAGE")]
    capacity_max_stage: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProfileArg {
    /// 1 ms each way, 50 µs jitter, no loss, 1 Gbit/s.
    Expressroute,
    /// 15 ms each way, 3 ms jitter with reordering, 0.3% random and some bursty loss,
    /// 100 Mbit/s.
    Vpn,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["listen", "nfqueue"])))]
struct EmulateArgs {
    /// Address senders send to (the UDP relay).
    #[arg(
        long,
        env = "PATHPROBE_LISTEN",
        required_unless_present = "nfqueue",
        requires = "forward"
    )]
    listen: Option<SocketAddr>,
    /// Address the traffic goes on to (a reflector, say).
    #[arg(long, env = "PATHPROBE_FORWARD", requires = "listen")]
    forward: Option<SocketAddr>,
    /// One more port relayed through the same links, LISTEN=FORWARD (repeatable): other
    /// ports of the far end that share the path, like a capacity test's load port.
    #[arg(long, value_parser = port_pair, requires = "listen", env = "PATHPROBE_EMULATE_ALSO")]
    also: Vec<(SocketAddr, SocketAddr)>,
    /// Instead of the relay, emulate for all IP traffic that iptables hands to these two
    /// queues, FORWARD,REVERSE (like 0,1), with rules such as
    /// `iptables -A FORWARD -i eth0 -j NFQUEUE --queue-num 0`. Needs CAP_NET_ADMIN.
    #[arg(long, value_parser = queue_pair, conflicts_with_all = ["listen", "forward"], env = "PATHPROBE_EMULATE_NFQUEUE")]
    nfqueue: Option<(u16, u16)>,
    /// Start from a realistic path instead of a perfect one.
    #[arg(long, value_enum, env = "PATHPROBE_EMULATE_PROFILE")]
    profile: Option<ProfileArg>,
    /// Settings for both directions, key=value pairs: delay=15ms, jitter=3ms,
    /// dist=uniform|normal, reorder=yes|no, loss=0.5%, burst=1%/40%/50% (good to bad, bad to good, loss in bad),
    /// rate=100M, queue=64k, dup=0.1%, blackout=AFTER+LENGTH.
    #[arg(long, default_value = "", env = "PATHPROBE_EMULATE_LINK")]
    link: String,
    /// Settings of the forward direction only (sender to --forward), over --link.
    #[arg(long = "fwd", default_value = "", env = "PATHPROBE_EMULATE_FWD")]
    fwd: String,
    /// Settings of the reverse direction only, over --link.
    #[arg(long = "rev", default_value = "", env = "PATHPROBE_EMULATE_REV")]
    rev: String,
    /// An outage of both directions, AFTER+LENGTH (like 20s+5s); repeatable.
    #[arg(long, env = "PATHPROBE_EMULATE_BLACKOUT")]
    blackout: Vec<String>,
    /// Seed of the random choices (same seed, same fates).
    #[arg(long, default_value_t = 1, env = "PATHPROBE_EMULATE_SEED")]
    seed: u64,
    /// Stop after this long (default: until SIGINT or SIGTERM).
    #[arg(long, value_parser = duration, env = "PATHPROBE_EMULATE_DURATION")]
    duration: Option<Duration>,
}

fn link_configs(args: &EmulateArgs) -> anyhow::Result<(LinkConfig, LinkConfig)> {
    let base = args.profile.map_or_else(LinkConfig::default, |p| match p {
        ProfileArg::Expressroute => Profile::Expressroute.link(),
        ProfileArg::Vpn => Profile::Vpn.link(),
    });
    let mut both = base;
    both.apply(&args.link)
        .map_err(|e| anyhow::anyhow!("--link: {e}"))?;
    for b in &args.blackout {
        both.blackouts.push(
            pathprobe_agent::emulate::link::blackout(b)
                .map_err(|e| anyhow::anyhow!("--blackout: {e}"))?,
        );
    }
    let (mut fwd, mut rev) = (both.clone(), both);
    fwd.apply(&args.fwd)
        .map_err(|e| anyhow::anyhow!("--fwd: {e}"))?;
    rev.apply(&args.rev)
        .map_err(|e| anyhow::anyhow!("--rev: {e}"))?;
    Ok((fwd, rev))
}

fn port_pair(v: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let bad = || format!("`{v}` is not LISTEN=FORWARD, like 127.0.0.1:9002=10.0.0.4:863");
    let (l, f) = v.split_once('=').ok_or_else(bad)?;
    Ok((
        l.trim().parse().map_err(|_| bad())?,
        f.trim().parse().map_err(|_| bad())?,
    ))
}

fn queue_pair(v: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{v}` is not two queue numbers FORWARD,REVERSE (0 to 65535), like 0,1");
    let (f, r) = v.split_once(',').ok_or_else(bad)?;
    Ok((
        f.trim().parse().map_err(|_| bad())?,
        r.trim().parse().map_err(|_| bad())?,
    ))
}

fn run_emulate(args: &EmulateArgs) -> anyhow::Result<ExitCode> {
    let (forward_link, reverse_link) = link_configs(args)?;
    let stop = stop_on_signals()?;
    let stats = EmulatorStats::default();
    let (stop_ref, stats_ref) = (&*stop, &stats);
    let work: Box<dyn FnOnce() -> Result<(), Error> + Send + '_> = if let Some((
        forward_queue,
        reverse_queue,
    )) = args.nfqueue
    {
        let mut emulator = NfqueueEmulator::bind(NfqueueConfig {
            forward_queue,
            forward_link,
            reverse_queue,
            reverse_link,
            seed: args.seed,
        })?;
        tracing::info!(
            nfqueue_forward = forward_queue,
            nfqueue_reverse = reverse_queue,
            "emulating"
        );
        Box::new(move || emulator.run(stop_ref, stats_ref))
    } else {
        let (Some(listen), Some(forward)) = (args.listen, args.forward) else {
            anyhow::bail!("emulate needs --listen and --forward, or --nfqueue FORWARD,REVERSE");
        };
        let emulator = Emulator::bind(EmulatorConfig {
            listen,
            forward,
            also: args.also.clone(),
            forward_link,
            reverse_link,
            seed: args.seed,
        })?;
        let also: Vec<String> = emulator.locals[1..]
            .iter()
            .zip(&args.also)
            .map(|(l, (_, f))| format!("{l}={f}"))
            .collect();
        tracing::info!(listen = %emulator.local, forward = %forward, also = %also.join(","), "emulating");
        Box::new(move || emulator.run(stop_ref, stats_ref))
    };
    supervise(
        "emulator",
        &stop,
        args.duration,
        Duration::ZERO,
        &|| stats.line(),
        work,
    )?;
    tracing::info!("stopped: {}", stats.line());
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Expressroute,
    Vpn,
    Internet,
    Other,
}

impl From<KindArg> for PathKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Expressroute => Self::Expressroute,
            KindArg::Vpn => Self::Vpn,
            KindArg::Internet => Self::Internet,
            KindArg::Other => Self::Other,
        }
    }
}

#[derive(Debug, clap::Args)]
struct TraceArgs {
    /// Where to trace to, HOST:PORT (a reflector's STAMP port for UDP, any port for TCP).
    #[arg(long, env = "PATHPROBE_TARGET")]
    target: String,
    /// UDP (STAMP test packets; a reflector at the end answers) or TCP (SYNs).
    #[arg(long, value_enum, default_value = "udp", env = "PATHPROBE_TRACE_PROTO")]
    proto: TraceProtoArg,
    #[command(flatten)]
    pin: PinArgs,
    /// Highest TTL tried.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u8).range(1..=64), env = "PATHPROBE_TRACE_MAX_HOPS")]
    max_hops: u8,
    /// Queries per hop.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=10), env = "PATHPROBE_TRACE_QUERIES")]
    queries: u8,
    /// How long to wait for each query's answer.
    #[arg(long, default_value = "1s", value_parser = duration, env = "PATHPROBE_TRACE_TIMEOUT")]
    timeout: Duration,
    /// Print the trace as JSON.
    #[arg(long)]
    json: bool,
}

/// How a path is named in its reports and where they go: the flags `probe` and
/// `capacity` share.
#[derive(Debug, Clone, clap::Args)]
struct ReportArgs {
    /// Name of the path, for reports.
    #[arg(long, default_value = "path", env = "PATHPROBE_PATH_NAME")]
    path_name: String,
    /// Kind of the path.
    #[arg(long, value_enum, default_value = "other", env = "PATHPROBE_PATH_KIND")]
    path_kind: KindArg,
    /// Also write each window's (capacity: each stage's) report, in the collector's format,
    /// into this folder.
    #[arg(long, env = "PATHPROBE_REPORT_DIR")]
    report_dir: Option<PathBuf>,
    /// Agent id for reports [default: the host name].
    #[arg(long, env = "PATHPROBE_AGENT_ID")]
    agent_id: Option<String>,
    /// Site name for reports.
    #[arg(long, env = "PATHPROBE_SITE")]
    site: Option<String>,
}

impl ReportArgs {
    /// The labels of this path's reports; `report_dir` is created if given.
    fn labels(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        protocol: ProbeProtocol,
        dscp: u8,
        packet_size: u16,
        timestamping: pathprobe_proto::report::Timestamping,
    ) -> anyhow::Result<Labels> {
        if let Some(dir) = &self.report_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create --report-dir {}", dir.display()))?;
        }
        Ok(Labels {
            path: PathInfo {
                name: self.path_name.clone(),
                kind: self.path_kind.into(),
                local,
                remote,
                protocol,
                dscp,
                packet_size,
            },
            agent_id: self
                .agent_id
                .clone()
                .unwrap_or_else(pathprobe_agent::plan::host_name),
            site: self.site.clone(),
            timestamping,
        })
    }
}

/// How a path is pinned: the flags `probe`, `capacity` and `trace` share.
#[derive(Debug, Clone, clap::Args)]
pub struct PinArgs {
    /// Local address to send from (pins the path by source address; for tcp-syn and
    /// trace, a port other than 0 also fixes the source port).
    #[arg(long, env = "PATHPROBE_BIND")]
    pub bind: Option<SocketAddr>,
    /// Interface to send through (SO_BINDTODEVICE; needs CAP_NET_RAW).
    #[arg(long, env = "PATHPROBE_INTERFACE")]
    pub interface: Option<String>,
    /// Firewall mark for policy routing (SO_MARK; needs CAP_NET_ADMIN).
    #[arg(long, env = "PATHPROBE_FWMARK")]
    pub fwmark: Option<u32>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TraceProtoArg {
    Udp,
    Tcp,
}

fn run_trace(args: &TraceArgs) -> anyhow::Result<ExitCode> {
    let cfg = pathprobe_agent::trace::TraceConfig {
        target: resolve(&args.target)?,
        proto: match args.proto {
            TraceProtoArg::Udp => pathprobe_agent::trace::TraceProto::Udp,
            TraceProtoArg::Tcp => pathprobe_agent::trace::TraceProto::Tcp,
        },
        bind: args.pin.bind,
        interface: args.pin.interface.clone(),
        fwmark: args.pin.fwmark,
        max_hops: args.max_hops,
        queries: args.queries,
        timeout: args.timeout,
    };
    let t = pathprobe_agent::trace::trace(&cfg)?;
    if args.json {
        println!("{}", serde_json::to_string(&t)?);
    } else {
        print!("{}", pathprobe_agent::trace::table(&t));
    }
    Ok(if t.reached {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtoArg {
    Stamp,
    TcpSyn,
    TcpConnect,
}

#[derive(Debug, clap::Args)]
#[allow(clippy::struct_excessive_bools)]
struct ProbeArgs {
    /// The reflector, HOST:PORT (STAMP's port is 862); for TCP probes, any TCP listener.
    #[arg(long, env = "PATHPROBE_TARGET")]
    target: String,
    /// How to probe: STAMP over UDP; tcp-syn (a half-open handshake from a raw socket,
    /// needs CAP_NET_RAW; --bind's port pins the source port); tcp-connect (a full
    /// TCP connect, no privileges).
    #[arg(long, value_enum, default_value = "stamp", env = "PATHPROBE_PROTO")]
    proto: ProtoArg,
    /// Probes per second (1 to 1,000,000) [default: 10].
    #[arg(long, conflicts_with = "interval", value_parser = clap::value_parser!(u32).range(1..=1_000_000), env = "PATHPROBE_RATE")]
    rate: Option<u32>,
    /// Time between probes, instead of --rate.
    #[arg(long, value_parser = duration, env = "PATHPROBE_INTERVAL")]
    interval: Option<Duration>,
    /// Stop after this many probes.
    #[arg(long, env = "PATHPROBE_COUNT")]
    count: Option<u64>,
    /// Stop after this long (default: until --count, or Ctrl-C).
    #[arg(long, value_parser = duration, env = "PATHPROBE_DURATION")]
    duration: Option<Duration>,
    /// UDP payload octets: 44 to 1472 (112 to 1472 authenticated) [default: 52, or 120
    /// authenticated: the base packet and a Class-of-Service TLV, through which the far end
    /// tells the DSCP it received].
    #[arg(long, env = "PATHPROBE_SIZE")]
    size: Option<usize>,
    /// DSCP of the probes (0 to 63; 46 is EF).
    #[arg(long, default_value_t = 0, env = "PATHPROBE_DSCP")]
    dscp: u8,
    /// IP TTL / hop limit of the probes.
    #[arg(long, env = "PATHPROBE_TTL")]
    ttl: Option<u8>,
    #[command(flatten)]
    pin: PinArgs,
    /// Authenticated mode with the key in this file (hexadecimal digits).
    #[arg(long, env = "PATHPROBE_AUTH_KEY_FILE")]
    auth_key_file: Option<PathBuf>,
    /// Window length: one line (or JSON object) and one report per window.
    #[arg(long, default_value = "10s", value_parser = duration, env = "PATHPROBE_WINDOW")]
    window: Duration,
    /// How long a probe may wait for its reply before it counts as lost.
    #[arg(long, default_value = "1s", value_parser = duration, env = "PATHPROBE_TIMEOUT")]
    timeout: Duration,
    /// Give up (exit code 2) if nothing at all answers for this long [default: the larger
    /// of 3 s and --timeout].
    #[arg(long, value_parser = duration, env = "PATHPROBE_NO_REPLY_TIMEOUT")]
    no_reply_timeout: Option<Duration>,
    /// SSID to put in the probes (RFC 8972).
    #[arg(long, default_value_t = 0, env = "PATHPROBE_SSID")]
    ssid: u16,
    /// Print one JSON object per window and a final summary object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    report: ReportArgs,
}

fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("cannot install a signal handler")?;
    }
    Ok(stop)
}

/// Runs `work` on its own thread until it ends: sets `stop` after `duration`, and logs
/// `line()` every `every` (zero: never).
fn supervise(
    what: &str,
    stop: &AtomicBool,
    duration: Option<Duration>,
    every: Duration,
    line: &(dyn Fn() -> String + Sync),
    work: impl FnOnce() -> Result<(), Error> + Send,
) -> anyhow::Result<()> {
    std::thread::scope(|s| -> anyhow::Result<()> {
        let worker = s.spawn(work);
        let started = std::time::Instant::now();
        let mut last = started;
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
            if duration.is_some_and(|d| started.elapsed() >= d) {
                stop.store(true, Ordering::Relaxed);
            }
            if !every.is_zero() && last.elapsed() >= every {
                tracing::info!("{}", line());
                last = std::time::Instant::now();
            }
        }
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("the {what} thread panicked"))??;
        Ok(())
    })
}

/// The reflector's keys as its flags name them.
fn reflect_keys(args: &ReflectArgs) -> anyhow::Result<Option<keyfile::KeyRing>> {
    Ok(pathprobe_agent::plan::load_ring(
        args.auth_key_file.as_deref(),
        args.auth_key_dir.as_deref(),
    )?)
}

fn run_reflect(args: &ReflectArgs) -> anyhow::Result<ExitCode> {
    let keys = reflect_keys(args)?.map(|r| Arc::new(keyfile::LiveRing::new(r)));
    let cfg = ReflectorConfig {
        listen: args.listen,
        keys,
        stateful: args.stateful,
        max_rate_per_source: args.max_rate_per_source,
        reply_dscp: args.reply_dscp,
        timestamp_format: match args.timestamp_format {
            FormatArg::Ntp => TimestampFormat::Ntp,
            FormatArg::Ptp => TimestampFormat::Ptp,
        },
        admission: reflector::Admission {
            max_rate_total: args.max_rate_total,
            allow: args.allow.clone(),
            max_rate_others: args.max_rate_others,
        },
        refuse_replays: args.refuse_replays,
        capacity: args.allow_capacity.then(|| reflector::CapacityCaps {
            max_rate_bps: args.capacity_max_rate.bps(),
            max_stage: args.capacity_max_stage,
        }),
    };
    // Bound before the first log line, so whoever waits for it finds every port open.
    let (sock, capacity) = reflector::bind_with_capacity(&cfg)?;
    let stop = stop_on_signals()?;
    let stats = ReflectorStats::default();
    let bound = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(cfg.listen);
    if capacity.is_some() {
        tracing::info!(
            control = %bound,
            max_rate = %args.capacity_max_rate,
            max_stage = ?args.capacity_max_stage,
            "capacity tests allowed"
        );
    }
    tracing::info!(
        listen = %bound,
        mode = if cfg.keys.is_some() { "authenticated" } else { "unauthenticated" },
        numbering = if cfg.stateful { "stateful" } else { "stateless" },
        max_rate_per_source = cfg.max_rate_per_source,
        max_rate_total = cfg.admission.max_rate_total,
        allow = ?cfg.admission.allow,
        keys = cfg.keys.as_ref().map_or_else(|| "none".to_string(), |k| k.get().summary()),
        "reflecting"
    );
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hup))
        .context("cannot install the SIGHUP handler")?;
    let line = || match &cfg.keys {
        Some(k) => format!("{} keys: {}", stats.line(), k.get().summary()),
        None => stats.line(),
    };
    supervise(
        "reflector",
        &stop,
        args.duration,
        args.stats_interval,
        &line,
        || {
            std::thread::scope(|s| {
                if let Some(server) = &capacity {
                    s.spawn(|| server.run(&stop));
                }
                if let Some(live) = &cfg.keys {
                    s.spawn(|| reload_keys_on_sighup(args, live, &hup, &stop));
                }
                let r = reflector::run(&sock, &cfg, &stop, &stats);
                // The capacity server ends with the reflector, whatever ended it.
                stop.store(true, Ordering::Relaxed);
                r
            })
        },
    )?;
    tracing::info!("stopped: {}", line());
    Ok(ExitCode::SUCCESS)
}

/// Reads the reflector's keys again on each SIGHUP and swaps them in between two batches;
/// keys that do not load are logged, and the reflector answers on with the ones it has.
fn reload_keys_on_sighup(
    args: &ReflectArgs,
    live: &keyfile::LiveRing,
    hup: &AtomicBool,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if !hup.swap(false, Ordering::Relaxed) {
            continue;
        }
        tracing::info!(keys = %live.get().summary(), "SIGHUP: reading the keys again; until now");
        match reflect_keys(args) {
            Ok(Some(ring)) => {
                live.replace(ring);
                tracing::info!(keys = %live.get().summary(), "keys loaded (fingerprint and requests answered, newest first)");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "the keys did not load: answering on with the ones loaded before");
            }
        }
    }
}

/// Exit code 2, with the message, when the target never answered; other errors as they
/// are.
fn no_answer(e: Error) -> anyhow::Result<ExitCode> {
    match e {
        Error::NoReply { .. } | Error::Unreachable { .. } => {
            eprintln!("pathprobe-agent: {e}");
            Ok(ExitCode::from(2))
        }
        e => Err(e.into()),
    }
}

fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    let mut addrs = target.to_socket_addrs().with_context(|| {
        format!("cannot resolve --target {target}: write it as HOST:PORT, e.g. 10.1.0.4:862 or [2001:db8::4]:862")
    })?;
    addrs
        .next()
        .with_context(|| format!("--target {target} resolves to no address"))
}

/// The path plan of `probe`'s flags: the same conversion and checks as a `[[path]]` of the
/// agent's config, then what only a command has (a count, a duration, giving up).
fn probe_config(args: &ProbeArgs) -> anyhow::Result<ProbeConfig> {
    let text = |d: Duration| humantime::format_duration(d).to_string();
    let section = PathSection {
        name: args.report.path_name.clone(),
        kind: args.report.path_kind.into(),
        proto: match args.proto {
            ProtoArg::Stamp => ProbeProtocol::Stamp,
            ProtoArg::TcpSyn => ProbeProtocol::TcpSyn,
            ProtoArg::TcpConnect => ProbeProtocol::TcpConnect,
        },
        target: args.target.clone(),
        rate: args.rate,
        interval: args.interval.map(text),
        size: args.size,
        dscp: args.dscp,
        ttl: args.ttl,
        bind: args.pin.bind,
        interface: args.pin.interface.clone(),
        fwmark: args.pin.fwmark,
        window: Some(text(args.window.max(Duration::from_nanos(1)))),
        timeout: Some(text(args.timeout)),
        auth_key_file: args.auth_key_file.clone(),
        ssid: args.ssid,
    };
    let mut cfg = section.plan(Path::new("the command line"))?.probe;
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    cfg.count = args.count;
    cfg.duration_ns = args.duration.map(nanos);
    cfg.no_reply_ns = nanos(
        args.no_reply_timeout
            .unwrap_or(args.timeout.max(Duration::from_secs(3))),
    );
    cfg.validate()?;
    Ok(cfg)
}

/// Prints one window (line or JSON) and its events, and writes its report when asked.
fn emit_window(
    args: &ProbeArgs,
    labels: &Labels,
    w: &pathprobe_agent::engine::session::WindowStats,
    seen: &pathprobe_agent::watch::Observed,
) -> anyhow::Result<()> {
    let f = output::window_figures(labels, w, seen);
    let mut o = std::io::stdout().lock();
    if args.json {
        writeln!(o, "{}", serde_json::to_string(&f)?)?;
    } else {
        writeln!(o, "{}", output::line(&f))?;
        for e in &seen.events {
            writeln!(o, "{}", output::event_text(e))?;
        }
    }
    outbox::keep_report(args.report.report_dir.as_deref(), None, || {
        Ok(output::report(labels, w, seen)?)
    })
}

fn run_probe(args: &ProbeArgs) -> anyhow::Result<ExitCode> {
    let cfg = probe_config(args)?;
    let target = cfg.target;
    let prober = probe::Prober::open(cfg)?;
    let stop = stop_on_signals()?;
    let labels = args.report.labels(
        prober.local,
        target,
        prober.config().protocol,
        args.dscp,
        prober.packet_size(),
        prober.timestamping,
    )?;
    let mut failure: Option<anyhow::Error> = None;
    let result = pathprobe_agent::watch::run_watched(&prober, &stop, true, |w, seen| {
        if let Err(e) = emit_window(args, &labels, w, seen) {
            failure.get_or_insert(e);
        }
    });
    let (windows, signature) = match result {
        Ok(w) => w,
        Err(e) => return no_answer(e),
    };
    if let Some(e) = failure {
        return Err(e);
    }
    if let Some(all) = output::merge(&windows)? {
        let mut f = output::figures(&labels, &all, "summary", windows.len() as u64);
        f.signature = signature;
        if args.json {
            println!("{}", serde_json::to_string(&f)?);
        } else {
            println!("{}", output::table(&f));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_decode(args: &DecodeArgs) -> anyhow::Result<ExitCode> {
    let text = match args.hex.as_deref() {
        None | Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the packet from standard input")?;
            s
        }
        Some(h) => h.to_owned(),
    };
    let bytes = hexbytes::parse(&text).context("the packet is not valid hexadecimal")?;
    let key = args
        .auth_key_file
        .as_deref()
        .map(keyfile::load)
        .transpose()?;
    let direction = match args.direction {
        DirectionArg::Request => Direction::Request,
        DirectionArg::Reply => Direction::Reply,
    };
    let d = decode::decode(&bytes, direction, args.authenticated, key.as_ref())
        .context("cannot decode the packet")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", decode::render(&d));
    }
    let failed = d.hmac.as_deref().is_some_and(|h| h.starts_with("FAILED"));
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pathprobe_proto::secrets::allow_readable(cli.allow_world_readable_secrets);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PATHPROBE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Decode(args) => run_decode(&args),
        Command::Reflect(args) => run_reflect(&args),
        Command::Probe(args) => run_probe(&args),
        Command::Emulate(args) => run_emulate(&args),
        Command::Capacity(args) => capacity::run(&args),
        Command::Failover(args) => failover::run(&args),
        Command::Trace(args) => run_trace(&args),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(&args),
        Command::Run(args) => run_agent(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pathprobe-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
