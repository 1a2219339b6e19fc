//! `pathprobe-agent demo`: the whole system on one machine, no privileges, no set-up. A
//! reflector, two emulated paths in front of it (ExpressRoute-like and VPN-like, see
//! [`crate::emulate::link::Profile`]), a collector on an embedded SQLite file, and the agent
//! probing both paths and pushing its reports through the collector's HTTP API; after the
//! run, the collector's side-by-side comparison.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pathprobe_collector::compare::{self, Comparison};
use pathprobe_collector::serve::{ServeConfig, serve};
use pathprobe_collector::store::{Selector, Store};
use pathprobe_proto::report::PathKind;
use pathprobe_proto::stamp::TimestampFormat;

use crate::daemon::{AgentConfig, CollectorSection, PathSection};
use crate::emulate::link::Profile;
use crate::emulate::{Emulator, EmulatorConfig, EmulatorStats};
use crate::reflector::{self, ReflectorConfig, ReflectorStats};
use crate::{Error, Result, daemon};

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub duration: Duration,
    /// Where the database and the spool go.
    pub dir: PathBuf,
    pub rate: u32,
    pub window: Duration,
}

/// What it leaves behind.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    pub db: PathBuf,
    pub comparison: Comparison,
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
        relay_stop.store(true, Ordering::Relaxed);
        result
    });
    let _ = collector_stop.send(());
    let _ = rt.block_on(collector);
    agent_result?;
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
    Ok(DemoOutcome { db, comparison })
}
