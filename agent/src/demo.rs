//! `pathprobe-agent demo`: the whole system on one machine, no privileges, no set-up. A
//! reflector, two emulated paths in front of it (ExpressRoute-like and VPN-like, see
//! [`crate::emulate::link::Profile`]), a collector on an embedded SQLite file, and the agent
//! probing both paths and pushing its reports through the collector's HTTP API; after the
//! run, the collector's side-by-side comparison. Then a failover drill: a service routed
//! over fresh ER-like and VPN-like paths, ER failing and coming back on a script, the
//! outage measured. Then a capacity test (a knee search) over
//! a third emulated path, an ExpressRoute-like circuit of [`DEMO_CIRCUIT`], with the
//! recommendation it leads to.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pathprobe_collector::compare::{self, Comparison};
use pathprobe_collector::serve::{ServeConfig, serve};
use pathprobe_collector::store::{Selector, SqliteStore, Store};
use pathprobe_proto::report::{Counters, PathKind, ProbeProtocol};

use crate::capacity::client::{self, Plan};
use crate::capacity::knee::Thresholds;
use crate::capacity::present;
use crate::capacity::rate::Rate;
use crate::capacity::server::{Server as CapacityServer, ServerConfig};
use crate::capacity::sizing::{self, Recommendation};
use crate::capacity::wire::Direction;
use crate::delivery::spool::Queued;
use crate::delivery::upload::{Delivery, Uploader};
use crate::emulate::link::{LinkConfig, Profile};
use crate::emulate::{Emulator, EmulatorConfig, EmulatorStats, LATE_LOG2, Timeliness};
use crate::failover::{
    self, Failover, FailoverConfig, FailoverRun, PinnedPath, StreamTiming, Verdict,
};
use crate::output::{self, Labels};
use crate::plan::{AgentFile, AgentPlan, CollectorSection, Overrides, PathSection};
use crate::reflector::{self, ReflectorConfig, ReflectorStats};
use crate::{Error, Result, daemon};
use pathprobe_proto::client::TlsClient;
use pathprobe_proto::report::PathInfo;

/// The emulated circuit of the capacity test: 1 ms each way, a bottleneck of this many
/// bits per second with a 50 ms queue.
pub const DEMO_CIRCUIT: &str = "delay=1ms,rate=50M";

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub duration: Duration,
    /// Where the database and the spool go.
    pub dir: PathBuf,
    pub rate: u32,
    pub window: Duration,
    /// Run the failover drill (about 7 s).
    pub failover: bool,
    /// Length of each capacity stage; `None` skips the capacity test.
    pub capacity_stage: Option<Duration>,
    /// Keep the collector (and its dashboard) running after the demo ([`Serving`]).
    pub serve: bool,
}

/// More than this many per thousand packets late through an emulator (by `2^LATE_LOG2` ns,
/// about 1 ms, or for the capacity test by half its RTT margin), and what it emulates is
/// not what was measured: the demo says so.
pub const LATE_PERMILLE: u64 = 10;

/// What it leaves behind.
#[derive(Debug)]
pub struct DemoOutcome {
    pub db: PathBuf,
    pub comparison: Comparison,
    /// Where this machine could not keep up with the comparison's paths (an emulator that
    /// released packets late, a prober that missed send slots or dropped from its rings):
    /// those figures include the machine's own delay. Empty when everything kept up.
    pub fell_behind: Vec<String>,
    /// The failover drill, or why it did not run.
    pub failover: Option<std::result::Result<FailoverDemo, String>>,
    /// The capacity test, or why it did not run.
    pub capacity: Option<std::result::Result<CapacityDemo, String>>,
    /// The collector's dashboard: `http://127.0.0.1:PORT/`.
    pub dashboard: String,
    /// The collector, still serving (with [`DemoConfig::serve`]).
    pub serving: Option<Serving>,
}

/// The demo's collector, left running after the demo so that its dashboard can be looked
/// at.
#[derive(Debug)]
pub struct Serving {
    rt: tokio::runtime::Runtime,
    stop: tokio::sync::oneshot::Sender<()>,
    task: CollectorTask,
}

impl Serving {
    /// Itself if `keep`, else `None` once the collector has stopped.
    fn keep(self, keep: bool) -> Option<Self> {
        if keep {
            return Some(self);
        }
        let _ = self.stop.send(());
        let _ = self.rt.block_on(self.task);
        None
    }

    /// Serves until `stop` is set (Ctrl-C), then stops the collector.
    pub fn wait(self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::Relaxed) && !self.task.is_finished() {
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.stop.send(());
        match self.rt.block_on(self.task) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Config(format!("the collector stopped: {e}"))),
            Err(e) => Err(Error::Config(format!("the collector's task failed: {e}"))),
        }
    }
}

/// The capacity test's result and what it recommends.
#[derive(Debug, Clone)]
pub struct CapacityDemo {
    pub run: client::Run,
    pub plan: Plan,
    pub recommendation: Option<Recommendation>,
}

/// Sends the capacity test's stages and result to the collector, as a scheduled test's go:
/// the dashboard shows them on the demo site's page.
fn deliver_capacity(
    collector: SocketAddr,
    plan: &Plan,
    run: &client::Run,
    rec: Option<&Recommendation>,
) {
    let labels = Labels {
        path: PathInfo {
            name: "capacity".to_string(),
            kind: PathKind::Other,
            local: SocketAddr::from(([127, 0, 0, 1], 0)),
            remote: plan.target,
            protocol: ProbeProtocol::Stamp,
            dscp: 0,
            packet_size: 44,
        },
        agent_id: DEMO_AGENT.to_string(),
        site: Some(DEMO_SITE.to_string()),
        timestamping: pathprobe_proto::report::Timestamping {
            rx: pathprobe_proto::report::TimestampSource::Userspace,
            tx: pathprobe_proto::report::TimestampSource::Userspace,
        },
    };
    let reports = present::reports(&labels, run, &plan.thresholds, rec, now_ns()).and_then(|rs| {
        rs.iter()
            .map(|r| {
                Ok(Queued {
                    body: r.to_json()?,
                    origin: "the capacity test".to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()
    });
    match reports {
        Ok(q) => deliver(collector, &q, "capacity test's stages"),
        Err(e) => eprintln!("pathprobe demo: cannot build the capacity test's reports: {e}"),
    }
}

/// A knee search over an emulated [`DEMO_CIRCUIT`] in front of the demo's reflector: STAMP
/// and load share the circuit's bottleneck; control goes straight to the reflector.
fn capacity_demo(
    refl_addr: SocketAddr,
    collector: SocketAddr,
    stage: Duration,
    stop: &AtomicBool,
) -> std::result::Result<CapacityDemo, String> {
    let server = CapacityServer::bind(ServerConfig {
        listen: refl_addr,
        max_rate_bps: 1_000_000_000,
        max_stage: Duration::from_mins(1),
        keys: None,
    })
    .map_err(|e| format!("did not run: {e}"))?;
    let load_port = SocketAddr::new(refl_addr.ip(), refl_addr.port().saturating_add(1));
    let circuit_link: LinkConfig = DEMO_CIRCUIT.parse()?;
    let return_link: LinkConfig = "delay=1ms".parse()?;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let circuit = Emulator::bind(EmulatorConfig {
        listen: any,
        forward: refl_addr,
        also: vec![(any, load_port)],
        forward_link: circuit_link,
        reverse_link: return_link,
        seed: 3,
    })
    .map_err(|e| format!("did not run: {e}"))?;
    let plan = Plan {
        target: circuit.locals[0],
        control: Some(refl_addr),
        load_to: Some(circuit.locals[1]),
        bind: None,
        interface: None,
        fwmark: None,
        start_bps: 10_000_000,
        max_bps: 100_000_000,
        steps: 1,
        search: true,
        stage,
        direction: Direction::Up,
        size: 1372,
        probe_rate: 100,
        tcp_streams: Vec::new(),
        thresholds: Thresholds::default(),
        key: None,
    };
    let done = AtomicBool::new(false);
    let stats = EmulatorStats::default();
    let run = std::thread::scope(|s| {
        s.spawn(|| server.run(&done));
        s.spawn(|| circuit.run(&done, &stats));
        let r = client::run(&plan, stop, &mut |_| {});
        done.store(true, Ordering::Relaxed);
        r
    })
    .map_err(|e| format!("did not complete: {e}"))?;
    // A stage is judged on its RTT p99 against a limit above the idle p99. With more than
    // 1% of packets released late by half that margin or more (a probe crosses the
    // emulator twice), the p99 is the emulator's lateness, not the circuit's queue, and
    // stages fail that the circuit would carry: such a capacity is not reported.
    let margin = plan
        .thresholds
        .rtt_limit_ns(run.idle_p99_ns)
        .saturating_sub(run.idle_p99_ns);
    let log2 = (margin / 2).max(1).ilog2();
    let late = stats.timeliness();
    if late.fell_behind(log2, LATE_PERMILLE) {
        return Err(format!(
            "ran, but its capacity is not reported: the emulated circuit fell behind ({}, against an RTT margin of {:.1} ms), so the stages' RTT would be this machine's, not the circuit's. Run the demo on a quieter machine, or build it with --release",
            late.text(log2),
            Duration::from_nanos(margin).as_secs_f64() * 1e3
        ));
    }
    let recommendation = run
        .knee
        .capacity_bps
        .map(|c| sizing::recommend(Rate(c), 0.3, plan.size + 28));
    deliver_capacity(collector, &plan, &run, recommendation.as_ref());
    Ok(CapacityDemo {
        run,
        plan,
        recommendation,
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn loopback(what: &str) -> Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| Error::Io {
            what: format!("find a free port for the {what}"),
            source,
        })
}

fn path(name: &str, kind: PathKind, target: SocketAddr, cfg: &DemoConfig) -> PathSection {
    PathSection {
        name: name.to_string(),
        kind,
        proto: ProbeProtocol::Stamp,
        target: target.to_string(),
        rate: Some(cfg.rate),
        interval: None,
        size: None,
        dscp: if kind == PathKind::Expressroute {
            46
        } else {
            0
        },
        ttl: None,
        bind: None,
        interface: None,
        fwmark: None,
        window: Some(format!("{}ms", cfg.window.as_millis())),
        timeout: Some("1s".to_string()),
        auth_key_file: None,
        ssid: 0,
    }
}

/// The demo's agent id and site.
pub const DEMO_AGENT: &str = "demo-agent";
pub const DEMO_SITE: &str = "demo";

/// The demo agent: both emulated paths, reports to the collector through the spool.
fn agent_config(
    cfg: &DemoConfig,
    er: SocketAddr,
    vpn: SocketAddr,
    collector: SocketAddr,
    spool: PathBuf,
) -> Result<AgentPlan> {
    let file = AgentFile {
        agent_id: Some(DEMO_AGENT.to_string()),
        site: Some(DEMO_SITE.to_string()),
        collector: Some(CollectorSection {
            url: format!("http://{collector}"),
            token: None,
            token_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            insecure_http: false,
            spool_dir: spool,
            spool_max_reports: 10_000,
            fleet: None,
            plan_poll: None,
        }),
        reflector: None,
        paths: vec![
            path("expressroute", PathKind::Expressroute, er, cfg),
            path("vpn", PathKind::Vpn, vpn, cfg),
        ],
        drills: Vec::new(),
        capacity: Vec::new(),
    };
    AgentPlan::new(Path::new("demo"), "", file, &Overrides::default())
}

/// The failover demo's script (from the start of its paths): ExpressRoute goes dark at
/// `FAIL_AT`; routing notices after `DETECT` (as BFD would) and moves the service to the
/// VPN; ER is back at `ER_BACK` and routing returns the service to it at `FAILBACK_AT`.
pub const FAIL_AT: Duration = Duration::from_secs(2);
pub const DETECT: Duration = Duration::from_millis(300);
const ER_BACK: Duration = Duration::from_millis(3_500);
const FAILBACK_AT: Duration = Duration::from_secs(4);
const FAILOVER_RUN: Duration = Duration::from_secs(6);

/// The failover drill and its verdict.
#[derive(Debug, Clone)]
pub struct FailoverDemo {
    pub run: FailoverRun,
    pub verdict: Verdict,
    /// Where an emulator of the drill fell behind, and by how much that can move an
    /// outage's edges. Empty when both kept up.
    pub fell_behind: Vec<String>,
    /// The most an outage's edges may have moved, in ms: the worst lateness of an
    /// emulator that fell behind (0 when both kept up).
    pub uncertainty_ms: f64,
}

/// The service address of the failover demo: a router with two next hops (fresh ER and VPN
/// emulators) whose routing follows the script above. Answers come back through it.
struct Router {
    client: UdpSocket,
    er: UdpSocket,
    vpn: UdpSocket,
}

impl Router {
    fn bind(er: SocketAddr, vpn: SocketAddr) -> std::io::Result<Self> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let up = |to| -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind(any)?;
            s.connect(to)?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(s)
        };
        let client = UdpSocket::bind(any)?;
        client.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self {
            client,
            er: up(er)?,
            vpn: up(vpn)?,
        })
    }

    fn run(&self, start: Instant, stop: &AtomicBool) {
        let peer: std::sync::Mutex<Option<SocketAddr>> = std::sync::Mutex::new(None);
        let back = |up: &UdpSocket| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = up.recv(&mut buf)
                    && let Some(to) = *peer
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                {
                    let _ = self.client.send_to(&buf[..n], to);
                }
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| back(&self.er));
            s.spawn(|| back(&self.vpn));
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = self.client.recv_from(&mut buf) else {
                    continue;
                };
                *peer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(from);
                let t = start.elapsed();
                let on_vpn = t >= FAIL_AT + DETECT && t < FAILBACK_AT;
                let _ = if on_vpn { &self.vpn } else { &self.er }.send(&buf[..n]);
            }
        });
    }
}

/// The labels of the failover drill's service path, whose windows carry its events.
fn drill_labels(session: &Failover, service: SocketAddr) -> Labels {
    Labels {
        path: PathInfo {
            name: "failover-drill".to_string(),
            kind: PathKind::Other,
            local: session.service.local,
            remote: service,
            protocol: ProbeProtocol::Stamp,
            dscp: 0,
            packet_size: session.service.packet_size(),
        },
        agent_id: DEMO_AGENT.to_string(),
        site: Some(DEMO_SITE.to_string()),
        timestamping: session.service.timestamping,
    }
}

/// Sends reports to the demo's collector, as the daemon sends its drills' and capacity
/// tests', so that its dashboard shows them; says so when they did not get there.
fn deliver(collector: SocketAddr, windows: &[Queued], what: &str) {
    let delivered = Uploader::new(&format!("http://{collector}"), None, &TlsClient::default())
        .map_err(|e| e.to_string())
        .map(|u| u.deliver(windows));
    if !matches!(delivered, Ok(Delivery::Delivered(_))) {
        eprintln!(
            "pathprobe demo: the {what} did not reach the collector ({delivered:?}): its dashboard will not show them"
        );
    }
}

/// A failover drill over fresh emulated paths in front of the demo's reflector, following
/// the script above; pinned probes go straight to each path's emulator.
fn failover_demo(
    refl_addr: SocketAddr,
    collector: SocketAddr,
    stop: &AtomicBool,
) -> std::result::Result<FailoverDemo, String> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut er_link = Profile::Expressroute.link();
    er_link
        .blackouts
        .push((FAIL_AT, ER_BACK.saturating_sub(FAIL_AT)));
    let emulator = |forward_link: LinkConfig, seed| {
        Emulator::bind(EmulatorConfig {
            listen: any,
            forward: refl_addr,
            also: Vec::new(),
            reverse_link: forward_link.clone(),
            forward_link,
            seed,
        })
    };
    let er = emulator(er_link, 11).map_err(|e| e.to_string())?;
    let vpn = emulator(Profile::Vpn.link(), 12).map_err(|e| e.to_string())?;
    let router = Router::bind(er.local, vpn.local).map_err(|e| e.to_string())?;
    let service = router.client.local_addr().map_err(|e| e.to_string())?;
    let timing = StreamTiming {
        dscp: 0,
        duration_ns: Some(nanos(FAILOVER_RUN)),
        window_ns: 2_000_000_000,
        late_timeout_ns: 500_000_000,
        no_reply_ns: 3_000_000_000,
    };
    let stream = |target, rate| {
        let pin = PinnedPath {
            target: String::new(),
            bind: None,
            interface: None,
            fwmark: None,
        };
        timing.stream(target, &pin, rate, ProbeProtocol::Stamp)
    };
    let max_outage = Duration::from_secs(10);
    let session = Failover::open(FailoverConfig {
        service: stream(service, 1_000),
        primary: Some(stream(er.local, 20)),
        backup: Some(stream(vpn.local, 20)),
        min_outage_ns: 20_000_000,
        settle_ns: 1_000_000_000,
        flap_window_ns: 60_000_000_000,
        drill_max_outage_ns: Some(nanos(max_outage)),
    })
    .map_err(|e| e.to_string())?;
    let done = AtomicBool::new(false);
    let (er_stats, vpn_stats) = (EmulatorStats::default(), EmulatorStats::default());
    let (router, done_ref) = (&router, &done);
    let labels = drill_labels(&session, service);
    let mut windows = Vec::new();
    let run = std::thread::scope(|s| {
        let start = Instant::now();
        s.spawn(|| er.run(done_ref, &er_stats));
        s.spawn(|| vpn.run(done_ref, &vpn_stats));
        s.spawn(move || router.run(start, done_ref));
        let r = session.run(
            stop,
            |w, seen| {
                if let Ok(body) = output::report(&labels, w, seen).and_then(|r| Ok(r.to_json()?)) {
                    windows.push(Queued {
                        body,
                        origin: "the failover drill".to_string(),
                    });
                }
            },
            |_| {},
        );
        done.store(true, Ordering::Relaxed);
        r
    })
    .map_err(|e| e.to_string())?;
    deliver(collector, &windows, "failover drill's windows");
    // An outage is measured between two answers: an emulator that sent either late moves
    // that edge by as much, so a drill over emulators that fell behind says by how much.
    let behind: Vec<_> = [("ExpressRoute", &er_stats), ("VPN", &vpn_stats)]
        .into_iter()
        .map(|(name, stats)| (name, stats.timeliness()))
        .filter(|(_, late)| late.fell_behind(LATE_LOG2, LATE_PERMILLE))
        .collect();
    let uncertainty_ms = behind
        .iter()
        .map(|(_, late)| late.worst_ms())
        .fold(0.0, f64::max);
    let caveat = behind
        .iter()
        .map(|(name, late)| {
            format!(
                "the {name}-like emulator fell behind ({}): each outage may be off by up to {:.1} ms",
                late.text(LATE_LOG2),
                late.worst_ms()
            )
        })
        .collect();
    let verdict = failover::verdict(&run, nanos(max_outage));
    Ok(FailoverDemo {
        run,
        verdict,
        fell_behind: caveat,
        uncertainty_ms,
    })
}

/// What went wrong on this machine for path `name`, if anything: its emulator released
/// more than [`LATE_PERMILLE`] of its packets late, or its prober missed more than that
/// share of its send slots, or dropped anything from its rings.
fn kept_up(name: &str, emulator: &Timeliness, prober: &Counters) -> Vec<String> {
    let mut said = Vec::new();
    if emulator.fell_behind(LATE_LOG2, LATE_PERMILLE) {
        said.push(format!(
            "{name}: the emulator fell behind: {}; the RTT and jitter through it include that",
            emulator.text(LATE_LOG2)
        ));
    }
    let missed = u128::from(prober.send_slots_missed) * 1_000
        > u128::from(prober.sent) * u128::from(LATE_PERMILLE);
    if missed || prober.ring_drops > 0 {
        said.push(format!(
            "{name}: the prober fell behind: {} of {} send slots missed, {} records dropped from full rings",
            prober.send_slots_missed, prober.sent, prober.ring_drops
        ));
    }
    said
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

type CollectorTask = tokio::task::JoinHandle<pathprobe_collector::Result<()>>;

/// The collector on its own runtime; send on the channel to stop it.
fn start_collector(
    addr: SocketAddr,
    db: &Path,
) -> Result<(
    tokio::runtime::Runtime,
    tokio::sync::oneshot::Sender<()>,
    CollectorTask,
)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "start the collector's runtime".to_string(),
            source,
        })?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(serve(ServeConfig::lab(addr, db.to_owned()), async move {
        let _ = stopped.await;
    }));
    Ok((rt, stop, task))
}

/// The database and the spool in `dir`, emptied of an earlier run's.
fn fresh_dir(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let db = dir.join("pathprobe.db");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    let spool = dir.join("spool");
    let _ = std::fs::remove_dir_all(&spool);
    Ok((db, spool))
}

/// Runs the demo until `cfg.duration` has passed or `stop` is set; everything it started
/// is stopped before it returns.
pub fn run(cfg: &DemoConfig, stop: &AtomicBool) -> Result<DemoOutcome> {
    let (db, spool) = fresh_dir(&cfg.dir)?;

    let refl_cfg = ReflectorConfig::plain(SocketAddr::from(([127, 0, 0, 1], 0)));
    let refl_sock = reflector::bind(refl_cfg.listen)?;
    let refl_addr = refl_sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or_else(|| Error::Config("the reflector has no address".to_string()))?;
    let emulator = |profile: Profile, seed| {
        Emulator::bind(EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            forward: refl_addr,
            also: Vec::new(),
            forward_link: profile.link(),
            reverse_link: profile.link(),
            seed,
        })
    };
    let er = emulator(Profile::Expressroute, 1)?;
    let vpn = emulator(Profile::Vpn, 2)?;
    let collector_addr = loopback("collector")?;
    let agent = agent_config(cfg, er.local, vpn.local, collector_addr, spool)?;
    let (rt, collector_stop, collector) = start_collector(collector_addr, &db)?;
    let from = now_ns();
    let (paths_stop, relay_stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let (refl_stats, er_stats, vpn_stats) = (
        ReflectorStats::default(),
        EmulatorStats::default(),
        EmulatorStats::default(),
    );
    let agent_result = std::thread::scope(|s| {
        s.spawn(|| reflector::run(&refl_sock, &refl_cfg, &relay_stop, &refl_stats));
        s.spawn(|| er.run(&relay_stop, &er_stats));
        s.spawn(|| vpn.run(&relay_stop, &vpn_stats));
        let agent_thread = s.spawn(|| daemon::run(agent, &paths_stop, &mut || None));
        let started = Instant::now();
        while started.elapsed() < cfg.duration
            && !stop.load(Ordering::Relaxed)
            && !agent_thread.is_finished()
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        // The agent closes its last windows (waiting out the late timeout) and delivers
        // them before the paths go away.
        paths_stop.store(true, Ordering::Relaxed);
        let result = agent_thread
            .join()
            .unwrap_or_else(|_| Err(Error::Config("the agent thread panicked".to_string())));
        let failover = (cfg.failover && result.is_ok() && !stop.load(Ordering::Relaxed))
            .then(|| failover_demo(refl_addr, collector_addr, stop));
        let capacity = cfg
            .capacity_stage
            .filter(|_| result.is_ok() && !stop.load(Ordering::Relaxed))
            .map(|stage| capacity_demo(refl_addr, collector_addr, stage, stop));
        relay_stop.store(true, Ordering::Relaxed);
        result.map(|()| (failover, capacity))
    });
    let serving = Serving {
        rt,
        stop: collector_stop,
        task: collector,
    }
    .keep(cfg.serve && agent_result.is_ok());
    let (failover, capacity) = agent_result?;
    let store = SqliteStore::open_read_only(&db).map_err(|e| Error::Config(e.to_string()))?;
    let sel = |k: &str| Selector {
        name_or_kind: k.to_string(),
        site: None,
    };
    let (since, until) = (from.saturating_sub(60_000_000_000), now_ns() + 1);
    let comparison = compare::compare(&store, &sel("expressroute"), &sel("vpn"), since, until)
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut fell_behind = Vec::new();
    for (name, stats) in [("expressroute", &er_stats), ("vpn", &vpn_stats)] {
        let counters = store
            .query(&sel(name), since, until)
            .map_err(|e| Error::Config(e.to_string()))?
            .aggregate
            .counters;
        fell_behind.extend(kept_up(name, &stats.timeliness(), &counters));
    }
    Ok(DemoOutcome {
        db,
        comparison,
        fell_behind,
        failover,
        capacity,
        dashboard: format!(
            "http://{collector_addr}/site?site={DEMO_SITE}&from={}&to={}",
            (from / 1_000_000_000).saturating_sub(5),
            until.div_ceil(1_000_000_000) + 5
        ),
        serving,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn late(late: u64, of: u64) -> Timeliness {
        Timeliness::from_counts(of, late, LATE_LOG2, 8_400_000)
    }

    #[test]
    fn a_path_is_flagged_only_past_one_percent_late_or_a_ring_drop() {
        let fine = Counters {
            sent: 1_000,
            send_slots_missed: 10,
            ..Counters::default()
        };
        assert!(kept_up("er", &late(10, 1_000), &fine).is_empty());
        let said = kept_up("er", &late(11, 1_000), &fine);
        assert_eq!(
            said,
            [
                "er: the emulator fell behind: 11 of 1000 packets (1.10%) left 1.05 ms or more late, the worst by 8.4 ms; the RTT and jitter through it include that"
            ]
        );
        let missed = Counters {
            send_slots_missed: 11,
            ..fine
        };
        assert_eq!(kept_up("vpn", &late(0, 1_000), &missed).len(), 1);
        let dropped = Counters {
            ring_drops: 1,
            ..fine
        };
        let said = kept_up("vpn", &late(0, 1_000), &dropped);
        assert_eq!(
            said,
            [
                "vpn: the prober fell behind: 10 of 1000 send slots missed, 1 records dropped from full rings"
            ]
        );
    }
}
