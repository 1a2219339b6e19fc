//! The highest paced UDP rate the capacity load generator holds on loopback, in packets and
//! bits per second, against iperf3's UDP mode (Debian package `iperf3`) on the same machine
//! in the same run; with GSO and with `sendmmsg` batches, at 1,400-octet and 92-octet IP
//! packets.
//!
//! A rate holds when the sender put at least 99% of the datagrams its schedule called for
//! on the wire and the receiver got at least 99% of those. Rates grow by half until one
//! fails, then bisect four times.
//!
//! ```sh
//! cargo build --release -p pathprobe-benches
//! target/release/load_rate [--trial 1s]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a benchmark program: a failed step ends the run"
)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use pathprobe_agent::capacity::pacer::{Load, pace};
use pathprobe_agent::capacity::rate::Rate;
use pathprobe_agent::capacity::sink::Sink;
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, Parser)]
struct Args {
    /// Length of each trial.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    trial: Duration,
    /// Only print one trial of ours at this rate (bits/s), with GSO, for checking.
    #[arg(long)]
    one: Option<u64>,
}

/// One trial: (sent, scheduled, received).
type Trial = (u64, u64, u64);

fn holds((sent, scheduled, received): Trial) -> bool {
    sent * 100 >= scheduled * 99 && received * 100 >= sent * 99
}

/// Our pacer into our sink, in this process.
fn ours(rate: u64, size: usize, gso: bool, trial: Duration) -> Result<Trial> {
    let sink_sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sink_sock.set_recv_buffer_size(8 << 20)?;
    sink_sock.bind(&"127.0.0.1:0".parse::<SocketAddr>()?.into())?;
    sink_sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let to = sink_sock.local_addr()?;
    let tx = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    tx.set_send_buffer_size(4 << 20)?;
    tx.connect(&to)?;
    let load = Load {
        rate_bps: rate,
        size,
        overhead: 28,
        duration_ns: trial.as_nanos() as u64,
        stage: 1,
        session: 7,
    };
    let sink = Sink::default();
    sink.begin(7, 1, load.duration_ns);
    let stop = AtomicBool::new(false);
    let never = AtomicBool::new(false);
    let paced = std::thread::scope(|s| {
        s.spawn(|| sink.run(&sink_sock, 28, &stop));
        let p = pace(&tx, &load, &never, gso);
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        p
    })?;
    if gso && !paced.gso {
        bail!("this kernel refused UDP GSO");
    }
    Ok((paced.sent, load.total(), sink.count().packets))
}

/// iperf3 -u at `rate` (it counts payload bits; we give it the payload rate of the same
/// IP rate).
fn iperf3(rate: u64, size: usize, trial: Duration) -> Result<Trial> {
    let payload_rate = rate * size as u64 / (size as u64 + 28);
    let o = Command::new("iperf3")
        .args(["-c", "127.0.0.1", "-p", "5299", "-u", "--json"])
        .args(["-b", &payload_rate.to_string(), "-l", &size.to_string()])
        .args(["-t", &format!("{}", trial.as_secs_f64())])
        .output()?;
    if !o.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&o.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let sent = v["end"]["sum_sent"]["packets"].as_u64().unwrap_or(0);
    let lost = v["end"]["sum_received"]["lost_packets"]
        .as_u64()
        .or_else(|| v["end"]["sum"]["lost_packets"].as_u64())
        .unwrap_or(0);
    let secs = v["end"]["sum_sent"]["seconds"]
        .as_f64()
        .unwrap_or(trial.as_secs_f64());
    let scheduled = (rate as f64 * secs / ((size + 28) as f64 * 8.0)) as u64;
    Ok((sent, scheduled, sent.saturating_sub(lost)))
}

/// The highest holding rate from `start`: up by half until a failure, then bisect.
fn highest(start: u64, mut trial: impl FnMut(u64) -> Result<Trial>) -> Result<u64> {
    let (mut ok, mut bad) = (0u64, None::<u64>);
    let mut rate = start;
    while bad.is_none() {
        if holds(trial(rate)?) {
            ok = rate;
            rate = rate * 3 / 2;
        } else {
            bad = Some(rate);
        }
        if rate > 100_000_000_000 {
            break;
        }
    }
    if let Some(mut hi) = bad {
        for _ in 0..4 {
            let mid = u64::midpoint(ok, hi);
            if holds(trial(mid)?) {
                ok = mid;
            } else {
                hi = mid;
            }
        }
    }
    Ok(ok)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(rate) = args.one {
        println!(
            "(sent, scheduled, received) = {:?}",
            ours(rate, 1372, true, args.trial)?
        );
        return Ok(());
    }
    let server = Command::new("iperf3")
        .args(["-s", "-p", "5299"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    std::thread::sleep(Duration::from_millis(300));
    println!("| generator | IP packet | highest rate held | packets/s |");
    println!("|---|---|---|---|");
    for size in [1372usize, 64] {
        let ip = size + 28;
        let pps = |bps: u64| bps / (ip as u64 * 8);
        let start = if size > 1000 { 200_000_000 } else { 20_000_000 };
        for (name, gso) in [("pathprobe, GSO", true), ("pathprobe, sendmmsg", false)] {
            let best = highest(start, |r| ours(r, size, gso, args.trial))?;
            println!("| {name} | {ip} | {} | {} |", Rate(best), pps(best));
        }
        if server.is_ok() {
            let best = highest(start, |r| iperf3(r, size, args.trial))?;
            println!("| iperf3 -u | {ip} | {} | {} |", Rate(best), pps(best));
        } else {
            println!("| iperf3 -u | {ip} | not installed | |");
        }
    }
    if let Ok(mut s) = server {
        let _ = s.kill();
        let _ = s.wait();
    }
    Ok(())
}
