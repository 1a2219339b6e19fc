//! `pathprobe-agent demo`: the whole system on one machine, no privileges, no set-up. A
//! reflector, two emulated paths in front of it (ExpressRoute-like and VPN-like, see
//! [`crate::emulate::link::Profile`]), a collector on an embedded SQLite file, and the agent
//! probing both paths and pushing its reports through the collector's HTTP API; after the
//! run, the collector's side-by-side comparison. Then a capacity test (a knee search) over
//! a third emulated path, an ExpressRoute-like circuit of [`DEMO_CIRCUIT`], with the
//! recommendation it leads to.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pathprobe_collector::compare::{self, Comparison};
use pathprobe_collector::serve::{ServeConfig, serve};
use pathprobe_collector::store::{Selector, Store};
use pathprobe_proto::report::{PathKind, ProbeProtocol};
use pathprobe_proto::stamp::TimestampFormat;

use crate::capacity::client::{self, Plan};
use crate::capacity::knee::Thresholds;
use crate::capacity::rate::Rate;
use crate::capacity::server::{Server as CapacityServer, ServerConfig};
use crate::capacity::sizing::{self, Recommendation};
use crate::capacity::wire::Direction;
use crate::daemon::{AgentConfig, CollectorSection, PathSection};
use crate::emulate::link::{LinkConfig, Profile};
use crate::emulate::{Emulator, EmulatorConfig, EmulatorStats};
use crate::reflector::{self, ReflectorConfig, ReflectorStats};
use crate::{Error, Result, daemon};

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
    /// Length of each capacity stage; `None` skips the capacity test.
    pub capacity_stage: Option<Duration>,
}

/// What it leaves behind.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    pub db: PathBuf,
    pub comparison: Comparison,
    /// The capacity test, or why it did not run.
    pub capacity: Option<std::result::Result<CapacityDemo, String>>,
}

/// The capacity test's result and what it recommends.
#[derive(Debug, Clone)]
pub struct CapacityDemo {
    pub run: client::Run,
    pub plan: Plan,
    pub recommendation: Option<Recommendation>,
}

/// A knee search over an emulated [`DEMO_CIRCUIT`] in front of the demo's reflector: STAMP
/// and load share the circuit's bottleneck; control goes straight to the reflector.
fn capacity_demo(
    refl_addr: SocketAddr,
    stage: Duration,
    stop: &AtomicBool,
) -> std::result::Result<CapacityDemo, String> {
    let server = CapacityServer::bind(ServerConfig {
        listen: refl_addr,
        max_rate_bps: 1_000_000_000,
        max_stage: Duration::from_mins(1),
    })
    .map_err(|e| e.to_string())?;
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
    .map_err(|e| e.to_string())?;
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
    .map_err(|e| e.to_string())?;
    let recommendation = run
        .knee
        .capacity_bps
        .map(|c| sizing::recommend(Rate(c), 0.3, plan.size + 28));
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

/// The demo agent: both emulated paths, reports to the collector through the spool.
fn agent_config(
    cfg: &DemoConfig,
    er: SocketAddr,
    vpn: SocketAddr,
    collector: SocketAddr,
    spool: PathBuf,
) -> AgentConfig {
    AgentConfig {
        agent_id: "demo-agent".to_string(),
        site: Some("demo".to_string()),
        collector: Some(CollectorSection {
            url: format!("http://{collector}"),
            token: None,
            token_file: None,
            spool_dir: spool,
            spool_max_reports: 10_000,
        }),
        reflector: None,
        paths: vec![
            path("expressroute", PathKind::Expressroute, er, cfg),
            path("vpn", PathKind::Vpn, vpn, cfg),
        ],
    }
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
    let task = rt.spawn(serve(
        ServeConfig {
            listen: addr,
            db: db.to_owned(),
            tokens: None,
            max_body: 16 << 20,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Ok((rt, stop, task))
}

/// Runs the demo until `cfg.duration` has passed or `stop` is set; everything it started
/// is stopped before it returns.
pub fn run(cfg: &DemoConfig, stop: &AtomicBool) -> Result<DemoOutcome> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| Error::Io {
        what: format!("create {}", cfg.dir.display()),
        source,
    })?;
    let db = cfg.dir.join("pathprobe.db");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
    }
    let spool = cfg.dir.join("spool");
    let _ = std::fs::remove_dir_all(&spool);

    let refl_cfg = ReflectorConfig {
        listen: "127.0.0.1:0"
            .parse()
            .map_err(|_| Error::Config("loopback".to_string()))?,
        key: None,
        stateful: false,
        max_rate_per_source: 250_000,
        timestamp_format: TimestampFormat::Ntp,
    };
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
    let agent = agent_config(cfg, er.local, vpn.local, collector_addr, spool);
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
        let agent_thread = s.spawn(|| daemon::run(Path::new("demo"), &agent, &paths_stop));
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
        let capacity = cfg
            .capacity_stage
            .filter(|_| result.is_ok() && !stop.load(Ordering::Relaxed))
            .map(|stage| capacity_demo(refl_addr, stage, stop));
        relay_stop.store(true, Ordering::Relaxed);
        result.map(|()| capacity)
    });
    let _ = collector_stop.send(());
    let _ = rt.block_on(collector);
    let capacity = agent_result?;
    let store = Store::open_read_only(&db).map_err(|e| Error::Config(e.to_string()))?;
    let sel = |k: &str| Selector {
        name_or_kind: k.to_string(),
        site: None,
    };
    let comparison = compare::compare(
        &store,
        &sel("expressroute"),
        &sel("vpn"),
        from.saturating_sub(60_000_000_000),
        now_ns() + 1,
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    Ok(DemoOutcome {
        db,
        comparison,
        capacity,
    })
}
