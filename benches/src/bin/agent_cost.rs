//! What the long-running agent costs as its paths grow: `pathprobe-agent run` with N paths
//! at R probes/s each, against one `pathprobe-agent reflect` on loopback (its own process,
//! so its cost is not counted). After a warm-up, the agent's CPU time over the measuring
//! span (`/proc/PID/stat`: user + system), then its resident memory and threads
//! (`/proc/PID/status`); one row per case. The agent has no collector: what is measured is
//! probing, accounting and the window log lines (at the default level, to a file), whose
//! figures are summed per case: how many probes went out, were lost, and how many send
//! slots the schedule missed or records a ring dropped.
//!
//! A case whose memory, projected from the rows measured so far (the one-path row's memory
//! plus the largest cost of each further path), would take more than half of what the
//! machine has available is skipped, and says so.
//!
//! The last row (`tcp-conn`, `--only 100x10-tcp`) is 100 `tcp-connect` paths at 10/s to a
//! loopback TCP listener in this process: TCP probes on the same engine, a connection
//! per probe.
//!
//! Then irtt's client for one path at 10, 100 and 1,000 probes/s, measured the same way,
//! when `irtt` is installed.
//!
//! ```sh
//! cargo build --release -p pathprobe-agent -p pathprobe-benches
//! target/release/agent_cost [--warmup 5s] [--measure 10s] [--max-rate 100000]
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use pathprobe_benches::{Guard, clock_ticks_per_second, cpu_ticks, sibling, start_reflector};

#[derive(Debug, Parser)]
#[command(about = "The agent's memory, threads and CPU as its paths grow")]
struct Args {
    /// Time before measuring: the paths open and their first windows close.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The span the CPU time is measured over.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    measure: Duration,
    /// The rate of the one-path, highest-rate row (probes/s).
    #[arg(long, default_value_t = 100_000)]
    max_rate: u32,
    /// Only these cases, each as paths, x, rate (like 50x10); every case by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// What the agent's window lines said, summed over every path and window.
#[derive(Debug, Clone, Copy, Default)]
struct Logged {
    windows: u64,
    sent: u64,
    lost: u64,
    /// Send slots the schedule reached too late and skipped.
    missed: u64,
    /// Records a full ring dropped.
    ring_drops: u64,
}

/// Sums the figures of every window line (`... sent N recv N lost N ... missed N
/// ring-drops N | ...`) in the agent's log.
fn logged(log: &str) -> Logged {
    let mut l = Logged::default();
    for line in log.lines() {
        let Some(figures) = line.split(" | ").next() else {
            continue;
        };
        let words: Vec<&str> = figures.split_whitespace().collect();
        let after = |key: &str| -> u64 {
            words
                .windows(2)
                .find(|w| w[0] == key)
                .and_then(|w| w[1].parse().ok())
                .unwrap_or(0)
        };
        if !words
            .windows(2)
            .any(|w| w[0] == "sent" && w[1].parse::<u64>().is_ok())
        {
            continue;
        }
        l.windows += 1;
        l.sent += after("sent");
        l.lost += after("lost");
        l.missed += after("missed");
        l.ring_drops += after("ring-drops");
    }
    l
}

/// What one process used.
#[derive(Debug, Clone, Copy)]
struct Cost {
    rss_kib: u64,
    threads: u64,
    /// Share of one core over the measuring span.
    cpu: f64,
}

/// A `Key:   value kB` line of `/proc/PID/status`.
fn status_field(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// Memory available to new work, KiB.
fn available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits out the warm-up, then measures `child` over `measure`.
#[allow(clippy::cast_precision_loss)]
fn measure(child: &mut Child, warmup: Duration, span: Duration) -> Result<Cost> {
    let pid = child.id();
    std::thread::sleep(warmup);
    if let Some(status) = child.try_wait()? {
        bail!("it exited during the warm-up ({status})");
    }
    let hz = clock_ticks_per_second();
    let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
    std::thread::sleep(span);
    let (c1, elapsed) = (cpu_ticks(pid)?, t0.elapsed());
    if let Some(status) = child.try_wait()? {
        bail!("it exited while measured ({status})");
    }
    Ok(Cost {
        rss_kib: status_field(pid, "VmRSS:")?,
        threads: status_field(pid, "Threads:")?,
        cpu: (c1 - c0) as f64 / hz as f64 / elapsed.as_secs_f64(),
    })
}

/// Stops `child` with SIGTERM (its windows close), or kills it after 10 s.
fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The agent's config: `paths` paths of `proto` at `rate` probes/s each, to `target`,
/// each with an SSID of its own (paths to one far end share a socket only when their SSIDs
/// tell their answers apart).
fn config(paths: u32, rate: u32, proto: &str, target: SocketAddr) -> String {
    let mut c = String::from("agent_id = \"bench\"\n");
    for i in 0..paths {
        let _ = write!(
            c,
            "[[path]]\nname = \"p{i}\"\nkind = \"other\"\nproto = \"{proto}\"\ntarget = \"{target}\"\nrate = {rate}\nwindow = \"10s\"\nssid = {}\n",
            i % 65_535 + 1
        );
    }
    c
}

/// A loopback TCP listener for the `tcp-connect` rows, accepting (and closing) for as long
/// as the benchmark runs, in this process (not counted).
fn tcp_listener() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || for _ in l.incoming() {});
    Ok(addr)
}

#[allow(clippy::cast_precision_loss)]
fn row(name: &str, paths: u32, rate: u32, c: &Cost, l: Option<&Logged>) {
    let log = l.map_or_else(String::new, |l| {
        format!(
            " {:>8} {:>10} {:>8} {:>7} {:>7}",
            l.windows, l.sent, l.lost, l.missed, l.ring_drops
        )
    });
    println!(
        "{name:<10} {paths:>6} {rate:>8} {:>10} {:>9.1} {:>8} {:>9.1} {:>11.1}{log}",
        u64::from(paths) * u64::from(rate),
        c.rss_kib as f64 / 1024.0,
        c.threads,
        100.0 * c.cpu,
        c.rss_kib as f64 / f64::from(paths),
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    let agent = sibling("pathprobe-agent")?;
    let (_reflector, stamp_target) = start_reflector(&["--max-rate-per-source", "0"])?;
    let tcp_target = tcp_listener()?;
    let dir = std::env::temp_dir().join(format!("pathprobe-agent-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "warm-up {:?}, measured over {:?}; CPU in % of one core",
        args.warmup, args.measure
    );
    println!(
        "{:<10} {:>6} {:>8} {:>10} {:>9} {:>8} {:>9} {:>11} {:>8} {:>10} {:>8} {:>7} {:>7}",
        "tool",
        "paths",
        "rate/s",
        "probes/s",
        "RSS MiB",
        "threads",
        "CPU %",
        "KiB / path",
        "windows",
        "sent",
        "lost",
        "missed",
        "drops"
    );
    println!(
        "(windows, sent, lost, missed send slots and ring drops: summed over the window lines the agent logged, warm-up and stop included)"
    );
    // The last: TCP paths on the same engine (`--only 100x10-tcp`).
    let cases: [(u32, u32, &str); 9] = [
        (1, 10, "stamp"),
        (1, 100, "stamp"),
        (50, 10, "stamp"),
        (1_000, 10, "stamp"),
        (5_000, 10, "stamp"),
        (5_000, 1, "stamp"),
        (100, 100, "stamp"),
        (1, args.max_rate, "stamp"),
        (100, 10, "tcp-connect"),
    ];
    // The projection's basis, KiB: one path's agent, and the most each further path added.
    let (mut base_kib, mut per_path_kib) = (0u64, 0u64);
    for (paths, rate, proto) in cases {
        let (name, key, target) = if proto == "stamp" {
            ("pathprobe", format!("{paths}x{rate}"), stamp_target)
        } else {
            ("tcp-conn", format!("{paths}x{rate}-tcp"), tcp_target)
        };
        if !args.only.is_empty() && !args.only.contains(&key) {
            continue;
        }
        let projected = base_kib + per_path_kib * u64::from(paths.saturating_sub(1));
        let available = available_kib();
        if projected > available / 2 {
            println!(
                "{name:<10} {paths:>6} {rate:>8}   skipped: about {} MiB projected ({} MiB and {per_path_kib} KiB per further path, as measured), more than half of the {} MiB available",
                projected / 1024,
                base_kib / 1024,
                available / 1024
            );
            continue;
        }
        let file = dir.join(format!("agent-{key}.toml"));
        std::fs::write(&file, config(paths, rate, proto, target))?;
        let log_file = dir.join(format!("agent-{key}.log"));
        let mut child = Command::new(&agent)
            .args(["run", "--config"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file)?)
            .spawn()
            .context("cannot start the agent")?;
        let cost = measure(&mut child, args.warmup, args.measure);
        stop(child);
        let log = logged(&std::fs::read_to_string(&log_file).unwrap_or_default());
        match cost {
            Ok(c) => {
                if paths == 1 {
                    base_kib = base_kib.max(c.rss_kib);
                } else {
                    let further = c.rss_kib.saturating_sub(base_kib) / u64::from(paths - 1);
                    per_path_kib = per_path_kib.max(further);
                }
                row(name, paths, rate, &c, Some(&log));
            }
            Err(e) => println!("{name:<10} {paths:>6} {rate:>8}   failed: {e:#}"),
        }
    }
    irtt_rows(&args);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// irtt's client for one path at 10, 100 and 1,000 probes/s, against its own server.
fn irtt_rows(args: &Args) {
    if Command::new("irtt").arg("version").output().is_err() {
        println!("irtt       not installed (apt-get install irtt): no comparison rows");
        return;
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_or(2112, |a| a.port());
    let server = Command::new("irtt")
        .args(["server", "-b", &format!("127.0.0.1:{port}"), "-i", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(server) = server else {
        println!("irtt       the server did not start: no comparison rows");
        return;
    };
    let _server = Guard(server);
    std::thread::sleep(Duration::from_millis(300));
    let total = args.warmup + args.measure + Duration::from_secs(2);
    for rate in [10u32, 100, 1_000] {
        let interval = format!("{}us", 1_000_000 / rate);
        let client = Command::new("irtt")
            .args([
                "client",
                "-i",
                &interval,
                "-d",
                &format!("{}s", total.as_secs()),
                "-Q",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut client) = client else {
            println!("irtt       the client did not start");
            return;
        };
        match measure(&mut client, args.warmup, args.measure) {
            Ok(c) => row("irtt", 1, rate, &c, None),
            Err(e) => println!("{:<10} {:>6} {rate:>8}   failed: {e:#}", "irtt", 1),
        }
        let _ = client.kill();
        let _ = client.wait();
    }
}
