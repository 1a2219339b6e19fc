//! `pathprobe-agent demo` (the `demo` feature): the whole system on this machine, then the
//! collector's comparison, the failover drill and the capacity test, as a table or JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::failover;
use pathprobe_agent::capacity::present;
use pathprobe_agent::capacity::rate::Rate;
use pathprobe_agent::demo::{self, DemoConfig};

use super::{duration, stop_on_signals};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long to probe.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub duration: Duration,
    /// Where the database and the spool go [default: pathprobe-demo in the temp folder].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Probes per second on each path.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Window length.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub window: Duration,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
    /// Length of each stage of the capacity test that follows (0s skips it).
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub capacity_stage: Duration,
    /// Skip the failover drill (about 7 s).
    #[arg(long)]
    pub no_failover: bool,
    /// Keep the collector running afterwards, so that its dashboard (the URL printed) can
    /// be looked at; Ctrl-C stops it.
    #[arg(long)]
    pub serve: bool,
}

/// Runs the demo and prints what it found.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let cfg = &DemoConfig {
        duration: args.duration,
        dir: args
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("pathprobe-demo")),
        rate: args.rate,
        window: args.window,
        failover: !args.no_failover,
        capacity_stage: (!args.capacity_stage.is_zero()).then_some(args.capacity_stage),
        serve: args.serve,
    };
    let json = args.json;
    let stop = stop_on_signals()?;
    eprintln!(
        "pathprobe demo: a reflector behind an ExpressRoute-like (1 ms, steady) and a VPN-like (15 ms, jittery, lossy) emulated path, {} probes/s on each, for {}; a collector stores every {} window. Then a failover drill, and a capacity test over an emulated circuit ({}).",
        cfg.rate,
        humantime::format_duration(cfg.duration),
        humantime::format_duration(cfg.window),
        demo::DEMO_CIRCUIT
    );
    let out = demo::run(cfg, &stop)?;
    let capacity = out.capacity.as_ref().map(|c| match c {
        Ok(d) => Ok((
            d,
            present::summary_json(&d.run, &d.plan.thresholds, d.recommendation.as_ref()),
        )),
        Err(e) => Err(e.clone()),
    });
    if json {
        let cap = match &capacity {
            Some(Ok((_, v))) => v.clone(),
            Some(Err(e)) => serde_json::json!({ "error": e }),
            None => serde_json::Value::Null,
        };
        let mut v = serde_json::to_value(&out.comparison)?;
        v["capacity"] = cap;
        v["fell_behind"] = serde_json::json!(out.fell_behind);
        v["dashboard"] = serde_json::json!(out.dashboard);
        v["failover"] = match &out.failover {
            Some(Ok(f)) => serde_json::json!({
                "verdict": f.verdict,
                "events": f.run.events,
                "fell_behind": f.fell_behind,
                "uncertainty_ms": f.uncertainty_ms,
            }),
            Some(Err(e)) => serde_json::json!({ "error": e }),
            None => serde_json::Value::Null,
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", pathprobe_collector::compare::table(&out.comparison));
        if !out.fell_behind.is_empty() {
            println!(
                "\nThis machine could not keep up, so these figures include its own delay (run the demo on a quieter machine, or build it with --release):"
            );
            for line in &out.fell_behind {
                println!("  {line}");
            }
        }
        match &out.failover {
            Some(Ok(f)) => {
                println!(
                    "\nFailover drill: a service routed over ExpressRoute (primary) or the VPN (backup); ER goes dark {} in, routing notices {} later (as BFD would) and moves it to the VPN, then brings it back once ER is up:",
                    humantime::format_duration(demo::FAIL_AT),
                    humantime::format_duration(demo::DETECT)
                );
                for e in &f.run.events {
                    println!("  {}", failover::event_text(e));
                }
                println!("  verdict against a 10 s target: {:?}", f.verdict);
                for line in &f.fell_behind {
                    println!("  this machine could not keep up: {line}");
                }
            }
            Some(Err(e)) => println!("\nFailover drill: did not run: {e}"),
            None => {}
        }
        match &capacity {
            Some(Ok((d, _))) => println!(
                "\nCapacity test: a knee search from {} to {} over an emulated ExpressRoute-like circuit ({}):\n{}",
                Rate(d.plan.start_bps),
                Rate(d.plan.max_bps),
                demo::DEMO_CIRCUIT,
                present::text(&d.run, &d.plan.thresholds, d.recommendation.as_ref())
            ),
            Some(Err(e)) => println!("\nCapacity test: {e}"),
            None => {}
        }
    }
    finish(&out.db, &out.dashboard, out.serving, &stop)?;
    Ok(ExitCode::SUCCESS)
}

/// Where to look further: the database, and the dashboard (served until `stop` when the
/// demo keeps its collector).
fn finish(
    db: &std::path::Path,
    dashboard: &str,
    serving: Option<demo::Serving>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    eprintln!(
        "\nThe database is {db}. Query it further with, for example:\n  cargo run -p pathprobe-collector -- compare --db {db} --a expressroute --b vpn --since 1h\n  cargo run -p pathprobe-collector -- histogram --db {db} --path vpn --format log --since 1h",
        db = db.display()
    );
    eprintln!("\nDashboard: {dashboard} (the fleet grid is at /)");
    match serving {
        Some(serving) => {
            eprintln!("The collector keeps serving it until Ctrl-C.");
            serving.wait(stop)?;
        }
        None => eprintln!(
            "The demo's collector stopped with it: run the demo with --serve to keep it running, or serve this database:\n  cargo run -p pathprobe-collector -- serve --db {db} --listen 127.0.0.1:8080 --open-read\nand open http://127.0.0.1:8080/",
            db = db.display()
        ),
    }
    Ok(())
}
