//! Helpers the agent's integration tests share (each test file uses part of them).
#![allow(dead_code, reason = "each test file uses part of this module")]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use pathprobe_collector::serve::{ServeConfig, Tokens, serve};
use std::process::{Child, Command, Stdio};

pub const AGENT: &str = env!("CARGO_BIN_EXE_pathprobe-agent");

/// Whether this process's effective uid is 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A command running `program` without privileges: as `nobody` with no capabilities when
/// we are root (CI), so that a refusal really happens; as ourselves otherwise.
pub fn unprivileged(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            program,
        ]);
        c
    } else {
        Command::new(program)
    }
}

/// A reflector process on an ephemeral loopback port, killed when dropped.
pub struct Reflector {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Reflector {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", extra)
    }

    pub fn start_on(listen: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(AGENT)
            .args(["reflect", "--listen", listen, "--stats-interval", "0s"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut said = Vec::new();
        let addr = loop {
            let Some(Ok(l)) = lines.next() else {
                panic!("the reflector printed no listen=: {}", said.join("\n"));
            };
            if let Some(a) = l.split_whitespace().find_map(|w| w.strip_prefix("listen=")) {
                break a.parse().unwrap();
            }
            said.push(l);
        };
        // Keep draining stderr so the reflector never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, addr }
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A collector running in this process, on a runtime of its own.
pub struct Collector {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<pathprobe_collector::Result<()>>>,
}

impl Collector {
    pub fn start(dir: &Path, addr: SocketAddr) -> Self {
        let cfg = ServeConfig {
            tokens: Some(Tokens::load(&dir.join("tokens")).unwrap()),
            ..ServeConfig::lab(addr, dir.join("store.db"))
        };
        Self::start_with(cfg)
    }

    /// A collector with these settings, serving once its port accepts connections.
    pub fn start_with(cfg: ServeConfig) -> Self {
        let addr = cfg.listen;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = rt.spawn(serve(cfg, async move {
            let _ = rx.await;
        }));
        // Serving once the port accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the collector did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            rt,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.rt
            .block_on(self.task.take().unwrap())
            .unwrap()
            .unwrap();
    }
}

/// A TCP port free a moment ago.
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child that prints `listen=ADDR` first (the reflector, the emulator), killed when
/// dropped; the rest of its stderr is read in the background.
pub struct Listening(Child, pub SocketAddr);

impl Listening {
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(AGENT)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let addr = first
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .unwrap()
            .parse()
            .unwrap();
        std::thread::spawn(move || lines.for_each(drop));
        Self(child, addr)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The emulator in front of `forward`, with forward and reverse link settings.
pub fn emulator(forward: SocketAddr, fwd: &str, rev: &str) -> Listening {
    let forward = forward.to_string();
    Listening::start(&[
        "emulate",
        "--listen",
        "127.0.0.1:0",
        "--forward",
        &forward,
        "--fwd",
        fwd,
        "--rev",
        rev,
    ])
}

/// `run --config CONFIG` from `agent` (the agent's command, as this user or another),
/// logging into `log`.
pub fn run_agent(mut agent: Command, config: &Path, log: &Path) -> Child {
    agent
        .args(["run", "--config"])
        .arg(config)
        .env("PATHPROBE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("the log file"))
        .spawn()
        .expect("the agent starts")
}

/// The log once it says `what` (`times` times over), within `within`.
pub fn wait_for_log(log: &Path, what: &str, times: usize, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(what).count() >= times {
            return text;
        }
        assert!(Instant::now() < deadline, "no `{what}` in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The threads of process `pid` now (`/proc/PID/status`).
pub fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

/// Writes a secret (a tokens, token or key file) the way an operator must: readable by its
/// owner alone (wider modes are refused).
pub fn write_secret(path: &Path, text: &str) {
    pathprobe_tests::pki::write(path, text, true);
}

/// Now, in ns since 1970.
pub fn now_ns() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}
