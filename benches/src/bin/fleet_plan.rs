//! The fleet planner at scale: a fleet file of 10,000 agents in 100 sites (98 on-prem
//! sites of 102 agents each, and 2 Azure sites of 2 reflectors each), whose mesh sends every
//! on-prem agent to every reflector over ExpressRoute and the VPN (8 paths an agent, about
//! 80,000 in all). Prints the time of a full check and expansion, then the collector's CPU
//! while 10,000 agents poll `GET /v1/plan` every 30 s (333 requests a second, each a 304
//! with the `ETag` in hand), and while they each fetch their whole plan once.
//!
//! ```sh
//! cargo build --release -p pathprobe-collector -p pathprobe-benches
//! target/release/fleet_plan [--agents 10000] [--seconds 20]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a benchmark program: a failed step ends the run; figures printed as floats"
)]

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use pathprobe_benches::{Guard, clock_ticks_per_second, cpu_ticks, sibling};

#[derive(Debug, Parser)]
struct Args {
    /// Agents in the fleet (100 sites).
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// How long each polling load runs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    seconds: Duration,
    /// How often each agent polls.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    every: Duration,
    /// Client threads that share the polling.
    #[arg(long, default_value_t = 8)]
    clients: usize,
}

/// The fleet file, and the ids of the agents that probe (the reflectors' aside).
fn fleet(agents: usize) -> (String, Vec<String>) {
    let reflectors = ["weu-r1", "weu-r2", "neu-r1", "neu-r2"];
    let on_prem = agents - reflectors.len();
    let per_site = on_prem.div_ceil(98);
    let mut text = String::from("[budget]\nmax_rate_per_agent = 1000\n\n");
    let mut ids = Vec::with_capacity(on_prem);
    for site in 0..98 {
        let members: Vec<String> = (site * per_site..((site + 1) * per_site).min(on_prem))
            .map(|i| format!("dc{site:02}-{i:05}"))
            .collect();
        let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
        let _ = writeln!(
            text,
            "[[site]]\nname = \"dc{site:02}\"\ntags = [\"onprem\"]\nagents = [{}]\n",
            list.join(", ")
        );
        ids.extend(members);
    }
    for (site, pair) in [("weu", &reflectors[..2]), ("neu", &reflectors[2..])] {
        let list: Vec<String> = pair.iter().map(|m| format!("\"{m}\"")).collect();
        let _ = writeln!(
            text,
            "[[site]]\nname = \"{site}\"\ntags = [\"azure\"]\nagents = [{}]\n",
            list.join(", ")
        );
    }
    for (i, r) in reflectors.iter().enumerate() {
        let _ = writeln!(
            text,
            "[[reflector]]\nagent = \"{r}\"\naddresses = {{ expressroute = \"10.1.0.{i}:862\", vpn = \"10.2.0.{i}:862\" }}\n"
        );
    }
    text.push_str(
        "[[template]]\nname = \"er\"\nkind = \"expressroute\"\nrate = 10\ndscp = 46\n\n[[template]]\nname = \"vpn\"\nkind = \"vpn\"\nrate = 10\n\n[[mesh]]\nfrom = { tags = [\"onprem\"] }\nto = { tags = [\"azure\"] }\ntemplates = [\"er\", \"vpn\"]\n",
    );
    (text, ids)
}

/// CPU seconds process `pid` has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    Ok(cpu_ticks(pid)? as f64 / clock_ticks_per_second() as f64)
}

/// Polls `ids` (with their `ETag`s, when given) round-robin from `clients` threads at
/// `rate` requests a second for `length`; (requests, 304s, mean µs).
fn poll(
    addr: SocketAddr,
    ids: &[(String, String)],
    rate: f64,
    length: Duration,
    clients: usize,
    etags: bool,
) -> (u64, u64, f64) {
    let (sent, not_modified, micros) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let interval = Duration::from_secs_f64(clients as f64 / rate);
    std::thread::scope(|s| {
        for c in 0..clients {
            let (sent, not_modified, micros) = (&sent, &not_modified, &micros);
            s.spawn(move || {
                let http: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mine: Vec<&(String, String)> = ids.iter().skip(c).step_by(clients).collect();
                let start = Instant::now();
                let mut next = start;
                let mut i = 0;
                while start.elapsed() < length {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep(next - now);
                    }
                    next += interval;
                    let k = i % mine.len();
                    i += 1;
                    let mut req = http
                        .get(&format!("http://{addr}/v1/plan"))
                        .query("agent", &mine[k].0);
                    if etags {
                        req = req.header("If-None-Match", &mine[k].1);
                    }
                    let t0 = Instant::now();
                    let Ok(resp) = req.call() else { continue };
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().read_to_vec();
                    micros.fetch_add(
                        u64::try_from(t0.elapsed().as_micros()).unwrap_or(0),
                        Ordering::Relaxed,
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                    if status == 304 {
                        not_modified.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let n = sent.load(Ordering::Relaxed);
    (
        n,
        not_modified.load(Ordering::Relaxed),
        micros.load(Ordering::Relaxed) as f64 / n.max(1) as f64,
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.agents < 200 {
        bail!("--agents: at least 200");
    }
    let (text, ids) = fleet(args.agents);
    println!(
        "fleet: {} agents in 100 sites, {} octets of fleet.toml",
        args.agents,
        text.len()
    );
    let mut times = Vec::new();
    let mut paths = 0;
    let mut tagged = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let f = pathprobe_collector::fleet::expand("fleet.toml", &text)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
        paths = f.plans.values().map(|p| p.plan.paths.len()).sum::<usize>();
        // The versions are the plans': the collector's expansion gives the same ETags.
        tagged = ids
            .iter()
            .map(|id| (id.clone(), f.plans[id].etag.clone()))
            .collect();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "full check and expansion: {paths} paths, {:.0} ms median of 5 ({:.0} to {:.0} ms)",
        times[2], times[0], times[4]
    );

    let dir = std::env::temp_dir().join(format!("pathprobe-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let fleet_file = dir.join("fleet.toml");
    std::fs::write(&fleet_file, &text)?;
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = Command::new(sibling("pathprobe-collector")?)
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--open-read",
            "--db",
        ])
        .arg(dir.join("store.db"))
        .arg("--fleet")
        .arg(&fleet_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let _guard = Guard(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("the collector did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rate = args.agents as f64 / args.every.as_secs_f64();
    for (what, etags) in [
        ("every agent fetching its whole plan (200)", false),
        ("polling with the ETag in hand (304)", true),
    ] {
        let cpu0 = cpu_seconds(pid)?;
        let t0 = Instant::now();
        let (n, nm, us) = poll(addr, &tagged, rate, args.seconds, args.clients, etags);
        let cpu = cpu_seconds(pid)? - cpu0;
        let wall = t0.elapsed().as_secs_f64();
        println!(
            "{what}: {n} requests in {wall:.1} s ({:.0}/s, {nm} answered 304), mean {us:.0} µs each; the collector used {:.2}% of one core",
            n as f64 / wall,
            100.0 * cpu / wall
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
