//! The namespace lab: an on-prem host and an Azure host in two network namespaces, joined by
//! an ExpressRoute-like path (one router) and a VPN-like path (two gateways, the "internet"
//! between them), for root-only tests.
//!
//! ```text
//!                 10.10.1.0/30          10.10.2.0/30
//!          on-er ------------- [er] ----------------- az-er
//! [onprem]                                                  [azure]
//!  lo 10.0.0.1                                               lo 10.1.0.1 (the service)
//!          on-vpn --- [vpn1] ======= [vpn2] --------- az-vpn
//!              10.20.1.0/30  10.20.2.0/30  10.20.3.0/30
//! ```
//!
//! - Each path's first router hands every forwarded packet (UDP, TCP and ICMP alike) to
//!   NFQUEUE (queue 0 towards Azure, 1 back) where `pathprobe-agent emulate --nfqueue 0,1`
//!   applies the path's delay, jitter and loss. Without the emulator running the path drops
//!   everything (no `--queue-bypass`), so a test never measures an unemulated path by
//!   mistake. An optional `tbf` on the router's egress in each direction is the bottleneck.
//! - The service addresses (10.0.0.1 on-prem, 10.1.0.1 in Azure) are routed over ER with
//!   metric 10 and over the VPN with metric 20, as Azure prefers ExpressRoute, and with
//!   `ignore_routes_with_linkdown` so a path whose link goes down stops carrying traffic.
//! - Each host also has one address per path ([`AZURE_ER`], [`AZURE_VPN`]) for probes
//!   pinned to a path.
//!
//! Every name carries the test process's id and a counter, so labs in parallel tests do not
//! meet; [`Lab`]'s `Drop` kills its emulators and deletes its namespaces (which deletes the
//! links), also when the test panics. Namespaces left by a killed test process are removed
//! by the next lab. With `PATHPROBE_LAB_KEEP` set, a lab's namespaces are left in place for
//! inspection (its emulators still stop, so its paths drop everything).

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The on-prem host's own address (the source of traffic to the service).
pub const ONPREM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// The Azure service address, reachable over both paths, ER preferred.
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// The Azure host's address on the ER path (reached only over ER).
pub const AZURE_ER: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
/// The Azure host's address on the VPN path (reached only over the VPN).
pub const AZURE_VPN: Ipv4Addr = Ipv4Addr::new(10, 20, 3, 2);
/// The port of [`Lab::reflector`].
pub const STAMP_PORT: u16 = 8862;
/// The on-prem host's address on each path.
pub const ONPREM_ER: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 1);
pub const ONPREM_VPN: Ipv4Addr = Ipv4Addr::new(10, 20, 1, 1);

/// One of the two paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Er,
    Vpn,
}

/// How a path is failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The path's router links go down: the hosts see no carrier and routing moves to the
    /// other path at once. [`Lab::heal`] brings them up with the routers' routes.
    LinkDown,
    /// The path's router silently drops everything; routing does not notice until the
    /// route is withdrawn ([`Lab::withdraw`]), as BGP would after its hold time or BFD.
    Blackhole,
}

/// Settings of one path: the emulator's link specs per direction (`delay=2ms,loss=1%`,
/// as `pathprobe-agent emulate --fwd/--rev` take them) and an optional `tbf` rate per
/// direction (as `tc` writes rates: `50mbit`).
#[derive(Debug, Clone, Default)]
pub struct PathConfig {
    /// On-prem to Azure.
    pub fwd: String,
    /// Azure to on-prem.
    pub rev: String,
    pub rate_fwd: Option<String>,
    pub rate_rev: Option<String>,
}

impl PathConfig {
    /// The same link spec both ways, no rate limit.
    pub fn both(spec: &str) -> Self {
        Self {
            fwd: spec.to_string(),
            rev: spec.to_string(),
            ..Self::default()
        }
    }
}

/// Whether this process runs as root (uid 0); otherwise prints that `test` is skipped.
pub fn root_or_skip(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    if !root {
        eprintln!(
            "SKIPPED {test}: the namespace lab needs root (network namespaces, iptables); CI runs it as root through .ci/run"
        );
    }
    root
}

/// The agent binary built next to this program: beside it (a benchmark in
/// `target/release`) or one folder up (a test in `target/debug/deps`).
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(std::path::Path::new("."));
    let candidates = [
        dir.join("pathprobe-agent"),
        dir.parent().unwrap_or(dir).join("pathprobe-agent"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} is missing: build it first with `cargo build -p pathprobe-agent` (`cargo test --workspace` builds it)",
                candidates[1].display()
            )
        })
}

/// Runs a command and panics, with its output, when it fails.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (install iproute2, iptables and procps)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A process killed when dropped; its stderr is read to the end in the background.
#[derive(Debug)]
pub struct Proc(Child);

impl Proc {
    /// Starts `cmd` and waits (up to 10 s) for a line of its stdout or stderr containing
    /// `ready`; both are read to the end in the background.
    pub fn start(cmd: &mut Command, ready: &str) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let pipes: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout is piped")),
            Box::new(child.stderr.take().expect("stderr is piped")),
        ];
        for pipe in pipes {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut said = Vec::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(ready) => {
                    // Keep draining so the child never blocks on a full pipe.
                    std::thread::spawn(move || rx.iter().for_each(drop));
                    return Self(child);
                }
                Ok(line) => said.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{cmd:?} did not become ready: {}", said.join("\n"));
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One link of the lab: (namespace, interface, address/prefix) at each end.
struct Wire {
    a: (&'static str, &'static str, &'static str),
    b: (&'static str, &'static str, &'static str),
}

const WIRES: [Wire; 5] = [
    Wire {
        a: ("onprem", "on-er", "10.10.1.1/30"),
        b: ("er", "er-onp", "10.10.1.2/30"),
    },
    Wire {
        a: ("er", "er-az", "10.10.2.1/30"),
        b: ("azure", "az-er", "10.10.2.2/30"),
    },
    Wire {
        a: ("onprem", "on-vpn", "10.20.1.1/30"),
        b: ("vpn1", "v1-onp", "10.20.1.2/30"),
    },
    Wire {
        a: ("vpn1", "v1-v2", "10.20.2.1/30"),
        b: ("vpn2", "v2-v1", "10.20.2.2/30"),
    },
    Wire {
        a: ("vpn2", "v2-az", "10.20.3.1/30"),
        b: ("azure", "az-vpn", "10.20.3.2/30"),
    },
];

/// Routes per namespace, `ip route add` arguments.
const ROUTES: [(&str, &str); 14] = [
    ("onprem", "10.1.0.1/32 via 10.10.1.2 metric 10 src 10.0.0.1"),
    ("onprem", "10.1.0.1/32 via 10.20.1.2 metric 20 src 10.0.0.1"),
    ("onprem", "10.10.2.0/30 via 10.10.1.2"),
    ("onprem", "10.20.0.0/16 via 10.20.1.2"),
    ("azure", "10.0.0.1/32 via 10.10.2.1 metric 10 src 10.1.0.1"),
    ("azure", "10.0.0.1/32 via 10.20.3.1 metric 20 src 10.1.0.1"),
    ("azure", "10.10.1.0/30 via 10.10.2.1"),
    ("azure", "10.20.0.0/16 via 10.20.3.1"),
    ("er", "10.0.0.1/32 via 10.10.1.1"),
    ("er", "10.1.0.1/32 via 10.10.2.2"),
    ("vpn1", "10.0.0.1/32 via 10.20.1.1"),
    ("vpn1", "default via 10.20.2.2"),
    ("vpn2", "10.1.0.1/32 via 10.20.3.2"),
    ("vpn2", "default via 10.20.2.1"),
];

/// The ER routes to the service addresses, withdrawn and restored by [`Lab::withdraw`]
/// and [`Lab::heal`].
const ER_SERVICE_ROUTES: [(&str, &str); 2] = [
    ("onprem", "10.1.0.1/32 via 10.10.1.2 metric 10 src 10.0.0.1"),
    ("azure", "10.0.0.1/32 via 10.10.2.1 metric 10 src 10.1.0.1"),
];
const VPN_SERVICE_ROUTES: [(&str, &str); 2] = [
    ("onprem", "10.1.0.1/32 via 10.20.1.2 metric 20 src 10.0.0.1"),
    ("azure", "10.0.0.1/32 via 10.20.3.1 metric 20 src 10.1.0.1"),
];

/// A running lab.
#[derive(Debug)]
pub struct Lab {
    tag: String,
    agent: PathBuf,
    er: Option<Proc>,
    vpn: Option<Proc>,
    /// Paths taken out of emulation by [`Lab::bypass`].
    bypassed: Vec<Path>,
}

const HOSTS: [&str; 5] = ["onprem", "azure", "er", "vpn1", "vpn2"];

impl Lab {
    /// Builds the lab with these path settings; panics with the failing command.
    pub fn new(er: &PathConfig, vpn: &PathConfig) -> Self {
        remove_stale();
        let tag = format!(
            "pplab{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Self {
            tag,
            agent: agent_bin(),
            er: None,
            vpn: None,
            bypassed: Vec::new(),
        };
        lab.build();
        // Starts each path's emulator and sets its rates.
        lab.emulate(Path::Er, er);
        lab.emulate(Path::Vpn, vpn);
        lab
    }

    /// The full name of host `host` (onprem, azure, er, vpn1, vpn2).
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.tag)
    }

    fn ip(&self, host: &str, args: &str) {
        run(Command::new("ip")
            .arg("-n")
            .arg(self.ns(host))
            .args(args.split_whitespace()));
    }

    /// A command that runs `program` inside host `host`.
    pub fn exec(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(self.ns(host)).arg(program);
        c
    }

    /// A command that runs `pathprobe-agent` inside host `host`.
    pub fn agent(&self, host: &str) -> Command {
        self.exec(host, &self.agent)
    }

    /// Starts a STAMP reflector on the Azure host: every address, UDP port [`STAMP_PORT`].
    pub fn reflector(&self) -> Proc {
        self.reflector_with(&[])
    }

    /// [`Lab::reflector`] with more `reflect` flags (like `--allow-capacity`).
    pub fn reflector_with(&self, extra: &[&str]) -> Proc {
        Proc::start(
            self.agent("azure")
                .args([
                    "reflect",
                    "--listen",
                    &format!("0.0.0.0:{STAMP_PORT}"),
                    "--stats-interval",
                    "0s",
                ])
                .args(extra),
            "listen=",
        )
    }

    /// Runs `pathprobe-agent probe --json ARGS` on the on-prem host: its summary, or `None`
    /// when nothing at all answered (exit code 2); panics on any other failure.
    pub fn probe(&self, args: &[&str]) -> Option<serde_json::Value> {
        let o = self
            .agent("onprem")
            .args(["probe", "--json"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the probe: {e}"));
        if o.status.code() == Some(2) {
            return None;
        }
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        let last = out.lines().last().unwrap_or_default();
        Some(serde_json::from_str(last).unwrap_or_else(|e| panic!("not a summary ({e}): {last}")))
    }

    fn build(&self) {
        for h in HOSTS {
            run(Command::new("ip").args(["netns", "add"]).arg(self.ns(h)));
            self.ip(h, "link set lo up");
            // New namespaces start from the kernel's defaults; state what the lab relies
            // on: forwarding in routers, no reverse-path filter (routing may be
            // asymmetric during a failover), and routes over a link without carrier
            // ignored.
            let forward = u8::from(matches!(h, "er" | "vpn1" | "vpn2"));
            run(self.exec(h, "sysctl").args([
                "-qw",
                &format!("net.ipv4.ip_forward={forward}"),
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.all.ignore_routes_with_linkdown=1",
                "net.ipv4.conf.default.ignore_routes_with_linkdown=1",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]));
        }
        self.ip("onprem", "addr add 10.0.0.1/32 dev lo");
        self.ip("azure", "addr add 10.1.0.1/32 dev lo");
        for w in &WIRES {
            run(Command::new("ip").args([
                "link",
                "add",
                w.a.1,
                "netns",
                &self.ns(w.a.0),
                "type",
                "veth",
                "peer",
                "name",
                w.b.1,
                "netns",
                &self.ns(w.b.0),
            ]));
            for (host, dev, addr) in [w.a, w.b] {
                self.ip(host, &format!("addr add {addr} dev {dev}"));
                self.ip(host, &format!("link set {dev} up"));
            }
        }
        for (host, route) in ROUTES {
            self.ip(host, &format!("route add {route}"));
        }
        for path in [Path::Er, Path::Vpn] {
            self.queue_rules(path, "-A");
        }
    }

    /// The router of `path` that runs its emulator, and its interfaces towards Azure and
    /// towards on-prem.
    const fn router(path: Path) -> (&'static str, &'static str, &'static str) {
        match path {
            Path::Er => ("er", "er-az", "er-onp"),
            Path::Vpn => ("vpn1", "v1-v2", "v1-onp"),
        }
    }

    /// Sets (or clears) the `tbf` of each direction of `path` from `cfg`.
    pub fn set_rates(&self, path: Path, cfg: &PathConfig) {
        let (router, to_azure, to_onprem) = Self::router(path);
        for (dev, rate) in [(to_azure, &cfg.rate_fwd), (to_onprem, &cfg.rate_rev)] {
            let _ = Command::new("tc")
                .args(["-n", &self.ns(router), "qdisc", "del", "dev", dev, "root"])
                .output();
            if let Some(rate) = rate {
                // A burst of at least 4 ms at the rate (and 16 full frames), a queue of
                // 50 ms: a bottleneck that neither starves nor bloats.
                run(Command::new("tc").args([
                    "-n",
                    &self.ns(router),
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    &burst(rate).to_string(),
                    "latency",
                    "50ms",
                ]));
            }
        }
    }

    /// Adds (`-A`) or deletes (`-D`) the rules that hand every forwarded packet of `path`
    /// to its emulator: queue 0 towards Azure, queue 1 back.
    fn queue_rules(&self, path: Path, op: &str) {
        // A packet from on-prem arrives on the router's interface towards on-prem.
        let (router, from_azure, from_onprem) = Self::router(path);
        for (dev, queue) in [(from_onprem, "0"), (from_azure, "1")] {
            run(self.exec(router, "iptables").args([
                op,
                "FORWARD",
                "-i",
                dev,
                "-j",
                "NFQUEUE",
                "--queue-num",
                queue,
            ]));
        }
    }

    /// Takes `path`'s emulator out: its router forwards directly (for measuring what the
    /// emulator itself adds). [`Lab::emulate`] puts it back.
    pub fn bypass(&mut self, path: Path) {
        if self.bypassed.contains(&path) {
            return;
        }
        *self.emulator(path) = None;
        self.queue_rules(path, "-D");
        self.bypassed.push(path);
    }

    const fn emulator(&mut self, path: Path) -> &mut Option<Proc> {
        match path {
            Path::Er => &mut self.er,
            Path::Vpn => &mut self.vpn,
        }
    }

    /// (Re)starts the emulator of `path` with these settings (its rates too).
    pub fn emulate(&mut self, path: Path, cfg: &PathConfig) {
        *self.emulator(path) = None;
        if self.bypassed.contains(&path) {
            self.queue_rules(path, "-A");
            self.bypassed.retain(|&p| p != path);
        }
        let (router, _, _) = Self::router(path);
        let mut cmd = self.agent(router);
        cmd.args([
            "emulate",
            "--nfqueue",
            "0,1",
            "--fwd",
            &cfg.fwd,
            "--rev",
            &cfg.rev,
        ]);
        *self.emulator(path) = Some(Proc::start(&mut cmd, "emulating"));
        self.set_rates(path, cfg);
    }

    /// Fails `path`.
    pub fn fail(&self, path: Path, how: Failure) {
        match (path, how) {
            (_, Failure::LinkDown) => {
                // Each router's links at once (one `ip -batch`), so no direction outlives
                // the other by a process start.
                for &(router, devs) in Self::links(path) {
                    let cmds: Vec<String> =
                        devs.iter().map(|d| format!("link set {d} down")).collect();
                    self.ip_batch(router, &cmds);
                }
                self.wait_routes_avoid(path);
            }
            (_, Failure::Blackhole) => {
                let (router, _, _) = Self::router(path);
                run(self
                    .exec(router, "iptables")
                    .args(["-I", "FORWARD", "1", "-j", "DROP"]));
            }
        }
    }

    /// Withdraws the routes of the service addresses over `path`, as BGP does when the
    /// path stops answering.
    pub fn withdraw(&self, path: Path) {
        for (host, route) in Self::service_routes(path) {
            self.ip(host, &format!("route del {route}"));
        }
    }

    const fn service_routes(path: Path) -> [(&'static str, &'static str); 2] {
        match path {
            Path::Er => ER_SERVICE_ROUTES,
            Path::Vpn => VPN_SERVICE_ROUTES,
        }
    }

    /// Undoes every failure of `path` (links up, no blackhole, routes back).
    pub fn heal(&self, path: Path) {
        let (router, _, _) = Self::router(path);
        // A router whose link went down lost its routes through it: they come back in the
        // same `ip -batch` as the link, before the hosts see carrier and send traffic
        // its way. `replace` leaves a route that is there as it is.
        for &(r, devs) in Self::links(path) {
            let mut cmds: Vec<String> = devs.iter().map(|d| format!("link set {d} up")).collect();
            cmds.extend(
                ROUTES
                    .iter()
                    .filter(|(h, _)| *h == r)
                    .map(|(_, route)| format!("route replace {route}")),
            );
            self.ip_batch(r, &cmds);
        }
        while self
            .exec(router, "iptables")
            .args(["-D", "FORWARD", "-j", "DROP"])
            .output()
            .is_ok_and(|o| o.status.success())
        {}
        // Carrier comes back asynchronously; wait until the hosts see it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !Self::ends(path).iter().all(|&(h, d)| self.carrier(h, d)) {
            assert!(
                Instant::now() < deadline,
                "{path:?}'s carrier did not come back within 5 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for (host, route) in Self::service_routes(path) {
            // A withdrawn route comes back.
            self.ip(host, &format!("route replace {route}"));
        }
    }

    /// The links of `path` that [`Failure::LinkDown`] takes down, by router.
    const fn links(path: Path) -> &'static [(&'static str, &'static [&'static str])] {
        match path {
            Path::Er => &[("er", &["er-onp", "er-az"])],
            Path::Vpn => &[("vpn1", &["v1-onp"]), ("vpn2", &["v2-az"])],
        }
    }

    /// Runs `ip` commands in `host` from one process (`ip -batch -`).
    fn ip_batch(&self, host: &str, cmds: &[String]) {
        use std::io::Write as _;
        if cmds.is_empty() {
            return;
        }
        let mut child = Command::new("ip")
            .args(["-n", &self.ns(host), "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ip: {e} (install iproute2)"));
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(cmds.join("\n").as_bytes());
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("ip -batch: {e}"));
        assert!(
            out.status.success(),
            "ip -batch in {host} ({cmds:?}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The hosts' ends of `path`.
    const fn ends(path: Path) -> [(&'static str, &'static str); 2] {
        match path {
            Path::Er => [("onprem", "on-er"), ("azure", "az-er")],
            Path::Vpn => [("onprem", "on-vpn"), ("azure", "az-vpn")],
        }
    }

    /// Waits (up to 5 s) until both hosts have seen `path`'s carrier go and their routes
    /// to the other's service address no longer use it: the kernel learns of a carrier
    /// change asynchronously (linkwatch), and a test should start from converged routing.
    fn wait_routes_avoid(&self, path: Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let converged = || {
            Self::ends(path).iter().all(|&(host, dev)| {
                let to = if host == "onprem" { SERVICE } else { ONPREM };
                !self.carrier(host, dev)
                    && Command::new("ip")
                        .args(["-n", &self.ns(host), "route", "get", &to.to_string()])
                        .output()
                        .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains(dev))
            })
        };
        while !converged() {
            assert!(
                Instant::now() < deadline,
                "routing did not move off {path:?} within 5 s of its link going down"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn carrier(&self, host: &str, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.ns(host), "link", "show", dev])
            .output()
            .is_ok_and(|o| {
                let s = String::from_utf8_lossy(&o.stdout);
                s.contains("LOWER_UP") && !s.contains("NO-CARRIER")
            })
    }

    /// Packets that entered `path` from on-prem so far (its router's receive counter).
    pub fn packets_in(&self, path: Path) -> u64 {
        let (router, _, from_onprem) = Self::router(path);
        let out = run(Command::new("ip").args([
            "-n",
            &self.ns(router),
            "-s",
            "-j",
            "link",
            "show",
            from_onprem,
        ]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("`ip -j -s link` printed no JSON: {e}"));
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .unwrap_or_else(|| panic!("no rx packet counter in {v}"))
    }
}

/// A `tbf` burst for `rate` (tc syntax): 4 ms of it, at least 16 full frames.
fn burst(rate: &str) -> u64 {
    let digits: String = rate.chars().take_while(char::is_ascii_digit).collect();
    let unit = rate[digits.len()..].to_ascii_lowercase();
    let n: u64 = digits.parse().unwrap_or(0);
    let bps = match unit.as_str() {
        "kbit" => n * 1_000,
        "mbit" => n * 1_000_000,
        "gbit" => n * 1_000_000_000,
        _ => n,
    };
    (bps / 8 / 250).max(16 * 1514)
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.er = None;
        self.vpn = None;
        if std::env::var_os("PATHPROBE_LAB_KEEP").is_some() {
            eprintln!(
                "PATHPROBE_LAB_KEEP: left the namespaces {}-* for inspection (emulators stopped); `ip netns del` them when done",
                self.tag
            );
            return;
        }
        for h in HOSTS {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(h)])
                .output();
        }
    }
}

/// Deletes the namespaces of labs whose test process is gone.
fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("pplab")
            .and_then(|r| r.split('x').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::burst;

    #[test]
    fn tbf_burst_covers_four_milliseconds_and_sixteen_frames() {
        assert_eq!(burst("1gbit"), 500_000);
        assert_eq!(burst("200mbit"), 100_000);
        assert_eq!(burst("10mbit"), 16 * 1514);
    }
}
