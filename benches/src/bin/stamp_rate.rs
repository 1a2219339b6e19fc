//! The highest probe rate each tool sustains on loopback with under 0.1% of scheduled probes
//! unanswered, and the RTT each sees at an idle rate, run in one go on the same machine:
//!
//! - **pathprobe**: `pathprobe-agent probe` against `pathprobe-agent reflect` (two processes,
//!   the reflector at its defaults, per-source cap included);
//! - **reference**: a minimal batched echo loop written for this benchmark (`recvmmsg` and
//!   `sendmmsg` straight back, in its own process) and a paced client that does nothing
//!   but send sequence numbers and time their echoes: the cost of the kernel path alone;
//! - **irtt** (Debian package `irtt`): `irtt server -i 0` and `irtt client --timer=busy`
//!   (its most precise timer; the default one misses most ticks above 1,000/s here), if
//!   installed.
//!
//! A rate passes when at least 99.9% of the probes its schedule called for were answered:
//! a probe never sent (a missed timer) counts like a lost one, for every tool.
//!
//! ```sh
//! cargo build --release -p pathprobe-agent -p pathprobe-benches
//! target/release/stamp_rate [--trial 2s] [--size 44]
//! ```

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark program: a failed step ends the run"
)]

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use pathprobe_agent::sys::{self, RecvBatch, SendBatch};
use pathprobe_benches::{Guard, sibling, start_listening, start_reflector};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, Parser)]
struct Args {
    /// Length of each trial.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    trial: Duration,
    /// UDP payload octets.
    #[arg(long, default_value_t = 44)]
    size: usize,
    /// Idle rate for the RTT comparison, probes per second.
    #[arg(long, default_value_t = 1000)]
    idle_rate: u64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 800_000)]
    max_rate: u64,
    /// Run as the reference echo server (used by the benchmark itself).
    #[arg(long, hide = true)]
    echo_server: bool,
}

/// What one trial measured.
#[derive(Debug, Clone, Copy)]
struct Trial {
    scheduled: u64,
    answered: u64,
    p50_us: f64,
    p99_us: f64,
}

impl Trial {
    fn passes(&self) -> bool {
        self.scheduled > 0 && self.answered * 1000 >= self.scheduled * 999
    }

    #[allow(clippy::cast_precision_loss)]
    fn unanswered_pct(&self) -> f64 {
        100.0 * (self.scheduled.saturating_sub(self.answered)) as f64 / self.scheduled.max(1) as f64
    }
}

trait Tool {
    fn name(&self) -> &'static str;
    fn trial(&mut self, rate: u64, duration: Duration, size: usize) -> Result<Trial>;
}

struct Pathprobe {
    agent: std::path::PathBuf,
    _reflector: Guard,
    addr: SocketAddr,
}

impl Pathprobe {
    fn start() -> Result<Self> {
        let agent = sibling("pathprobe-agent")?;
        let (g, addr) = start_reflector(&[])?;
        Ok(Self {
            agent,
            _reflector: g,
            addr,
        })
    }
}

impl Tool for Pathprobe {
    fn name(&self) -> &'static str {
        "pathprobe"
    }

    fn trial(&mut self, rate: u64, duration: Duration, size: usize) -> Result<Trial> {
        let secs = format!("{}ms", duration.as_millis());
        let o = Command::new(&self.agent)
            .args([
                "probe",
                "--target",
                &self.addr.to_string(),
                "--json",
                "--timeout",
                "1s",
            ])
            .args([
                "--rate",
                &rate.to_string(),
                "--duration",
                &secs,
                "--window",
                &secs,
            ])
            .args(["--size", &size.to_string()])
            .output()?;
        if !o.status.success() {
            bail!("probe failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let out = String::from_utf8_lossy(&o.stdout);
        let v: serde_json::Value = serde_json::from_str(out.lines().last().context("no summary")?)?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(Trial {
            scheduled: n("sent") + n("send_slots_missed"),
            answered: n("received"),
            p50_us: v["rtt_us"]["p50"].as_f64().unwrap_or(f64::NAN),
            p99_us: v["rtt_us"]["p99"].as_f64().unwrap_or(f64::NAN),
        })
    }
}

struct Irtt {
    _server: Guard,
    addr: SocketAddr,
}

impl Irtt {
    fn start() -> Result<Option<Self>> {
        if Command::new("irtt").arg("version").output().is_err() {
            return Ok(None);
        }
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new("irtt")
            .args([
                "server",
                "-b",
                &addr.to_string(),
                "-i",
                "0",
                "-d",
                "0",
                "-l",
                "0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Some(Self {
            _server: Guard(child),
            addr,
        }))
    }
}

impl Tool for Irtt {
    fn name(&self) -> &'static str {
        "irtt"
    }

    fn trial(&mut self, rate: u64, duration: Duration, size: usize) -> Result<Trial> {
        let interval = format!("{}ns", 1_000_000_000 / rate);
        let out = std::env::temp_dir().join(format!("stamp_rate-irtt-{}.json", std::process::id()));
        let o = Command::new("irtt")
            .args([
                "client",
                "-Q",
                "--timer=busy",
                "-i",
                &interval,
                "-d",
                &format!("{}ms", duration.as_millis()),
            ])
            .args(["-l", &size.to_string(), "-o", out.to_str().context("path")?])
            .arg(self.addr.to_string())
            .output()?;
        if !o.status.success() {
            bail!("irtt failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        let _ = std::fs::remove_file(&out);
        let s = &v["stats"];
        let scheduled = u64::try_from(duration.as_nanos()).unwrap_or(0) * rate / 1_000_000_000;
        #[allow(clippy::cast_precision_loss)]
        let us = |k: &str| s["rtt"][k].as_f64().unwrap_or(f64::NAN) / 1000.0;
        Ok(Trial {
            scheduled,
            answered: s["packets_received"].as_u64().unwrap_or(0),
            p50_us: us("median"),
            // irtt reports no percentiles beyond the median; its max stands in for p99.
            p99_us: us("max"),
        })
    }
}

/// The reference client: a paced sender and a receiver that time echoes, no protocol. Like
/// pathprobe it times with kernel stamps (transmit from the error queue, receive from the
/// control message) and subtracts the echo server's residence time, which the server
/// writes into the echo as STAMP's T3 - T2 does: both RTTs are the same quantity.
struct Reference {
    _server: Guard,
    addr: SocketAddr,
}

impl Reference {
    fn start() -> Result<Self> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--echo-server");
        let (g, addr) = start_listening(cmd, true)?;
        Ok(Self { _server: g, addr })
    }
}

impl Tool for Reference {
    fn name(&self) -> &'static str {
        "reference loop"
    }

    fn trial(&mut self, rate: u64, duration: Duration, size: usize) -> Result<Trial> {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
        sock.connect(&self.addr.into())?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        sys::enable_timestamping(&sock, true);
        let _ = sock.set_recv_buffer_size(8 << 20);
        let _ = sock.set_send_buffer_size(8 << 20);
        let interval = 1_000_000_000 / rate;
        let total = u64::try_from(duration.as_nanos())? / interval;
        let seen = (0..total.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect::<Vec<_>>();
        let sent_at = (0..total).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        let done = AtomicBool::new(false);
        let answered_count = AtomicU64::new(0);
        let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
        let start = sys::monotonic_ns() + 2_000_000;
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = sys::lower_timer_slack();
                let mut batch = SendBatch::new(64);
                let mut i = 0;
                while i < total {
                    let deadline = start + i * interval;
                    let now = sys::monotonic_ns();
                    if now + 100_000 < deadline {
                        sys::sleep_until(deadline - 100_000);
                    }
                    while sys::monotonic_ns() < deadline {
                        std::hint::spin_loop();
                    }
                    let now = sys::monotonic_ns();
                    while i < total && start + i * interval <= now && !batch.is_full() {
                        let buf = batch.next_slot().unwrap();
                        buf[..8].copy_from_slice(&i.to_be_bytes());
                        batch.commit(size, None, None);
                        i += 1;
                    }
                    let _ = batch.send(&sock);
                }
            });
            s.spawn(|| {
                let mut batch = RecvBatch::new(64);
                let end = start + total * interval + 1_000_000_000;
                while sys::monotonic_ns() < end && !done.load(Ordering::Relaxed) {
                    let got = batch.recv(&sock);
                    // Transmit stamps are numbered per datagram, which is the sequence
                    // number here (every datagram is sent in order).
                    sys::drain_tx_timestamps(&sock, |id, ns| {
                        if let Some(at) = sent_at.get(id as usize) {
                            at.store(ns, Ordering::Relaxed);
                        }
                    });
                    let Ok(n) = got else { continue };
                    for k in 0..n {
                        let (p, meta) = batch.get(k).unwrap();
                        let seq = u64::from_be_bytes(p[..8].try_into().unwrap());
                        if seq < total {
                            let bit = 1u64 << (seq % 64);
                            let word = &seen[usize::try_from(seq / 64).unwrap()];
                            if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                                let sent =
                                    sent_at[usize::try_from(seq).unwrap()].load(Ordering::Relaxed);
                                let residence = u64::from_be_bytes(p[8..16].try_into().unwrap());
                                if let (Some(rx), true) = (meta.kernel_rx_ns, sent > 0) {
                                    h.saturating_record(
                                        rx.saturating_sub(sent).saturating_sub(residence),
                                    );
                                }
                                answered_count.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    if answered_count.load(Ordering::Relaxed) == total {
                        done.store(true, Ordering::Relaxed);
                    }
                }
            });
        });
        #[allow(clippy::cast_precision_loss)]
        Ok(Trial {
            scheduled: total,
            answered: answered_count.load(Ordering::Relaxed),
            p50_us: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_us: h.value_at_quantile(0.99) as f64 / 1000.0,
        })
    }
}

fn echo_server() -> Result<()> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let _ = sock.set_recv_buffer_size(8 << 20);
    let _ = sock.set_send_buffer_size(8 << 20);
    sys::enable_timestamping(&sock, false);
    println!("{}", sock.local_addr()?.as_socket().context("address")?);
    let mut rx = RecvBatch::new(64);
    let mut tx = SendBatch::new(64);
    let mut received_at = [0u64; 64];
    loop {
        let Ok(n) = rx.recv(&sock) else { continue };
        for (i, at) in received_at.iter_mut().enumerate().take(n) {
            let (p, meta) = rx.get(i).unwrap();
            *at = meta.kernel_rx_ns.unwrap_or(0);
            let slot = tx.next_slot().unwrap();
            slot[..p.len()].copy_from_slice(p);
            tx.commit(p.len(), meta.src, None);
        }
        // Residence time (send - kernel receive) into octets 8..16, just before sending.
        let now = sys::realtime_ns();
        for (i, at) in received_at.iter().enumerate().take(n) {
            let p = tx.payload_mut(i).unwrap();
            p[8..16].copy_from_slice(&now.saturating_sub(*at).to_be_bytes());
        }
        let _ = tx.send(&sock);
    }
}

/// Doubles the rate until a trial fails, then bisects; returns the best passing trial.
fn highest_rate(tool: &mut dyn Tool, args: &Args) -> Result<(u64, Option<Trial>)> {
    let mut best: (u64, Option<Trial>) = (0, None);
    let mut rate = 5_000;
    let mut failed = None;
    while rate <= args.max_rate {
        let t = tool.trial(rate, args.trial, args.size)?;
        eprintln!(
            "  {} {rate:>7}/s: {:.3}% unanswered, p50 {:.1} µs",
            tool.name(),
            t.unanswered_pct(),
            t.p50_us
        );
        if t.passes() {
            best = (rate, Some(t));
            rate *= 2;
        } else {
            failed = Some(rate);
            break;
        }
    }
    if let Some(mut hi) = failed {
        let mut lo = best.0;
        for _ in 0..4 {
            let mid = u64::midpoint(lo, hi);
            if mid <= lo || hi - lo < 2_000 {
                break;
            }
            let t = tool.trial(mid, args.trial, args.size)?;
            eprintln!(
                "  {} {mid:>7}/s: {:.3}% unanswered, p50 {:.1} µs",
                tool.name(),
                t.unanswered_pct(),
                t.p50_us
            );
            if t.passes() {
                best = (mid, Some(t));
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    Ok(best)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.echo_server {
        return echo_server();
    }
    let mut tools: Vec<Box<dyn Tool>> =
        vec![Box::new(Reference::start()?), Box::new(Pathprobe::start()?)];
    match Irtt::start()? {
        Some(irtt) => tools.push(Box::new(irtt)),
        None => eprintln!("irtt is not installed (apt-get install irtt): skipping it"),
    }
    println!(
        "loopback, {} octets, {} per trial, {} cores",
        args.size,
        humantime::format_duration(args.trial),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let mut rows = Vec::new();
    for tool in &mut tools {
        let idle = tool.trial(args.idle_rate, Duration::from_secs(3), args.size)?;
        let (rate, _) = highest_rate(tool.as_mut(), &args)?;
        rows.push((tool.name(), rate, idle));
    }
    let reference = rows[0].1;
    println!(
        "{:<16} {:>22} {:>10} {:>22}",
        "tool",
        "max rate <0.1% (/s)",
        "vs ref",
        format!("idle {}/s RTT p50/p99 µs", args.idle_rate)
    );
    for (name, rate, idle) in &rows {
        #[allow(clippy::cast_precision_loss)]
        let share = 100.0 * *rate as f64 / reference.max(1) as f64;
        println!(
            "{name:<16} {rate:>22} {share:>9.0}% {:>13.1} / {:.1}",
            idle.p50_us, idle.p99_us
        );
    }
    println!("(irtt's p99 column is its maximum: irtt reports no higher percentiles)");
    Ok(())
}
