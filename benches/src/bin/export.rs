//! What exporting costs beside ingest, per window: reading its histograms into native
//! ones, adding them to the path's totals, building and compressing the remote-write
//! request, building the OTLP request, and writing both to their queues on disk; and
//! whether a fleet of `--paths` paths reporting every 10 s can be exported on this machine,
//! beside the plain ingest of the same reports into SQLite, in one run.
//!
//! ```sh
//! cargo build --release -p pathprobe-benches --bin export
//! target/release/export [--paths 10000] [--windows 3]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a benchmark program: a failed step ends the run; figures printed as floats"
)]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use pathprobe_benches::load_report;
use pathprobe_collector::serve::push::{Protocol, Push, PushConfig};
use pathprobe_collector::store::{SqliteStore, Store};
use pathprobe_collector::totals::{Contribution, Totals};
use pathprobe_proto::report::EncodedReport;
use prost::Message as _;

#[derive(Debug, Parser)]
struct Args {
    /// Paths reporting every 10 s (half expressroute, half vpn).
    #[arg(long, default_value_t = 10_000)]
    paths: u32,
    /// Windows per path.
    #[arg(long, default_value_t = 3)]
    windows: u32,
    /// Reports per batch (what an agent sends at once, and one request of each export).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Scratch directory (emptied first).
    #[arg(long, default_value = "/tmp/pathprobe-export-bench")]
    dir: PathBuf,
}

fn per_window_us(t: Instant, n: usize) -> f64 {
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// A queue that is written and never sent (its receiver's port is closed): the cost of
/// queueing, without a receiver's.
fn pusher(protocol: Protocol, dir: &std::path::Path) -> Result<std::sync::Arc<Push>> {
    Ok(Push::open(PushConfig {
        protocol,
        url: "http://127.0.0.1:9/api/v1/write".to_string(),
        bearer_file: None,
        basic: None,
        ca_file: None,
        labels: vec![("collector".to_string(), "bench".to_string())],
        queue_dir: dir.to_path_buf(),
        max_queue: u64::MAX,
    })?)
}

/// Whether `paths` paths every 10 s can be exported beside their ingest.
fn verdict(paths: u32, ingest_us: f64, export_us: f64) {
    let need = f64::from(paths) / 10.0;
    let one_core = 1e6 / export_us;
    println!(
        "{} paths every 10 s need {need:.0} windows/s; export alone does {one_core:.0}/s on one core ({:.1}% of it), ingest {:.0}/s; both together {:.0}/s: {}",
        paths,
        100.0 * need / one_core,
        1e6 / ingest_us,
        1e6 / (export_us + ingest_us),
        if 1e6 / (export_us + ingest_us) >= need {
            "yes, this machine keeps up"
        } else {
            "no, this machine falls behind"
        }
    );
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let mut reports: Vec<EncodedReport> = Vec::new();
    let mut id = 0_u64;
    for w in 0..args.windows {
        for p in 0..args.paths {
            id += 1;
            let r = load_report(p, w, id);
            reports.push(EncodedReport::from_json(&r.to_json()?)?);
        }
    }
    let n = reports.len();
    println!(
        "export bench: {} paths x {} windows = {n} reports ({} per batch), {} cores",
        args.paths,
        args.windows,
        args.batch,
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
    );

    // Plain ingest, as serve does it: batches into the store, durable before it returns.
    let store = SqliteStore::open(&args.dir.join("store.db"), u64::from(args.paths))?;
    let t = Instant::now();
    for b in reports.chunks(args.batch) {
        store.ingest(b, 0)?;
    }
    let ingest_us = per_window_us(t, n);

    let t = Instant::now();
    let contributions: Vec<Contribution> = reports.iter().map(Contribution::of).collect();
    let convert_us = per_window_us(t, n);

    let rw = pusher(Protocol::RemoteWrite, &args.dir.join("remote-write"))?;
    let otlp = pusher(Protocol::Otlp, &args.dir.join("otlp"))?;
    let mut totals = Totals::new(usize::MAX);
    let mut series_n = 0_usize;
    let t = Instant::now();
    for b in contributions.chunks(args.batch) {
        let mut series = Vec::new();
        for c in b {
            totals.add(c.key.clone(), &c.totals);
            let at = i64::try_from(c.end_ns / 1_000_000)?;
            series.extend(totals.write_series(&c.key, at, rw.extra_labels()));
        }
        series_n += series.len();
        rw.enqueue_series(series);
    }
    let rw_us = per_window_us(t, n);

    let mut otlp_bytes = 0_usize;
    let t = Instant::now();
    for b in contributions.chunks(args.batch) {
        let body = pathprobe_collector::otlp::request(b, otlp.extra_labels()).encode_to_vec();
        otlp_bytes += body.len();
        otlp.enqueue(&body);
    }
    let otlp_us = per_window_us(t, n);

    let queued = |d: &str| -> u64 {
        std::fs::read_dir(args.dir.join(d)).map_or(0, |r| {
            r.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
    };
    let export_us = convert_us + rw_us + otlp_us;
    println!();
    println!("{:<58} {:>12}", "per window", "µs");
    println!(
        "{:<58} {ingest_us:>12.1}",
        "plain ingest into SQLite (batches, durable)"
    );
    println!(
        "{:<58} {convert_us:>12.1}",
        "conversion: HDR blobs to native histograms"
    );
    println!(
        "{:<58} {rw_us:>12.1}",
        "remote write: totals, series, protobuf, snappy, queue file"
    );
    println!(
        "{:<58} {otlp_us:>12.1}",
        "OTLP: request, protobuf, queue file"
    );
    println!(
        "{:<58} {export_us:>12.1}",
        "export in all (conversion + both)"
    );
    println!();
    println!(
        "remote write: {series_n} series ({} per window), {:.0} octets per window after snappy",
        series_n / n,
        queued("remote-write") as f64 / n as f64
    );
    println!(
        "OTLP: {:.0} octets per window",
        otlp_bytes as f64 / n as f64
    );
    println!();
    verdict(args.paths, ingest_us, export_us);
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
