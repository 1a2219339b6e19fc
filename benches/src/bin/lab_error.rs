//! What the NFQUEUE emulator (`pathprobe-agent emulate --nfqueue`) adds, measured in the
//! namespace lab (root only): STAMP RTT over the lab's ExpressRoute-like path (one
//! forwarding router) with the router forwarding directly, through the emulator with
//! nothing configured, and with 10 ms each way configured, at rising probe rates; then the
//! TCP throughput iperf3 gets through it against direct forwarding.
//!
//! ```sh
//! cargo build --release -p pathprobe-agent -p pathprobe-benches
//! sudo target/release/lab_error [--trial 3s]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a benchmark program: a failed step ends the run"
)]

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use pathprobe_tests::lab::{AZURE_ER, Lab, Path, PathConfig, Proc, STAMP_PORT, root_or_skip};

#[derive(Debug, Parser)]
struct Args {
    /// Length of each trial.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    trial: Duration,
    /// Probe rates tried, per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,30000")]
    rates: Vec<u32>,
}

fn probe(lab: &Lab, rate: u32, trial: Duration) -> Result<serde_json::Value> {
    let secs = format!("{}ms", trial.as_millis());
    let o = lab
        .agent("onprem")
        .args([
            "probe",
            "--json",
            "--target",
            &format!("{AZURE_ER}:{STAMP_PORT}"),
        ])
        .args([
            "--rate",
            &rate.to_string(),
            "--duration",
            &secs,
            "--window",
            &secs,
        ])
        .output()?;
    if !o.status.success() {
        bail!("probe failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let out = String::from_utf8_lossy(&o.stdout);
    Ok(serde_json::from_str(out.lines().last().unwrap_or("{}"))?)
}

fn row(what: &str, rate: u32, v: &serde_json::Value) {
    let q = |k: &str| v["rtt_us"][k].as_f64().unwrap_or(f64::NAN);
    println!(
        "| {what} | {rate}/s | {} of {} | {:.1} µs | {:.1} µs | {:.1} µs |",
        v["lost"],
        v["sent"],
        q("p50"),
        q("p99"),
        q("max")
    );
}

fn iperf3(lab: &Lab, trial: Duration) -> Result<f64> {
    let o = lab
        .exec("onprem", "iperf3")
        .args(["-c", &AZURE_ER.to_string(), "--json", "-t"])
        .arg(trial.as_secs().max(1).to_string())
        .output()?;
    if !o.status.success() {
        bail!("iperf3 failed: {}", String::from_utf8_lossy(&o.stdout));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !root_or_skip("lab_error") {
        std::process::exit(1);
    }
    let nothing = PathConfig::default();
    let mut lab = Lab::new(&nothing, &nothing);
    let _reflector = lab.reflector();
    println!("| path | rate | lost | RTT p50 | RTT p99 | RTT max |");
    println!("|---|---|---|---|---|---|");
    lab.bypass(Path::Er);
    for &rate in &args.rates {
        row(
            "ER router forwarding directly",
            rate,
            &probe(&lab, rate, args.trial)?,
        );
    }
    lab.emulate(Path::Er, &nothing);
    for &rate in &args.rates {
        row(
            "through the emulator, nothing added",
            rate,
            &probe(&lab, rate, args.trial)?,
        );
    }
    lab.emulate(Path::Er, &PathConfig::both("delay=10ms"));
    for &rate in &args.rates {
        row(
            "10 ms each way configured",
            rate,
            &probe(&lab, rate, args.trial)?,
        );
    }

    let _server = Proc::start(
        lab.exec("azure", "iperf3").args(["-s", "--forceflush"]),
        "Server listening",
    );
    lab.bypass(Path::Er);
    let direct = iperf3(&lab, args.trial)?;
    lab.emulate(Path::Er, &nothing);
    let through = iperf3(&lab, args.trial)?;
    println!();
    println!(
        "TCP (iperf3, one stream): {:.0} Mbit/s forwarding directly, {:.0} Mbit/s through the emulator ({:.0}%)",
        direct / 1e6,
        through / 1e6,
        through / direct * 100.0
    );
    Ok(())
}
