//! The collector under load: ingest rate (reports per second, through the store and
//! through HTTP) and the time to answer `compare` over 24 hours of 10 s windows for 100
//! paths (864,000 window reports).
//!
//! ```sh
//! cargo build --release -p pathprobe-benches --bin collector_load
//! target/release/collector_load [--paths 100] [--hours 24] [--db /tmp/load.db]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a benchmark program: a failed step ends the run; figures printed as floats"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use pathprobe_benches::{LabCollector, T0, load_report};
use pathprobe_collector::compare;
use pathprobe_collector::serve::ServeConfig;
use pathprobe_collector::store::sqlite::Db;
use pathprobe_collector::store::{Selector, SqliteStore};

#[derive(Debug, Parser)]
struct Args {
    /// Paths (half expressroute, half vpn).
    #[arg(long, default_value_t = 100)]
    paths: u32,
    /// Hours of 10 s windows per path.
    #[arg(long, default_value_t = 24)]
    hours: u32,
    /// Reports sent over HTTP for the HTTP ingest figure.
    #[arg(long, default_value_t = 20_000)]
    http_reports: u32,
    /// The store (deleted first).
    #[arg(long, default_value = "/tmp/pathprobe-collector-load.db")]
    db: PathBuf,
    /// Only time the compare, on a store an earlier run filled.
    #[arg(long)]
    query_only: bool,
}

fn post(addr: SocketAddr, body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /v1/reports HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Part 1: HTTP ingest, batches of 100 from two client threads, as agents send them.
fn http_ingest(args: &Args, windows: u32) -> Result<()> {
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let server = LabCollector::start(ServeConfig::lab(addr, args.db.clone()))?;
    let per_thread = args.http_reports / 2;
    let half = (args.paths / 2).max(1);
    let bodies: Vec<Vec<Vec<u8>>> = (0..2u32)
        .map(|t| {
            (0..per_thread / 100)
                .map(|b| {
                    let parts: Vec<String> = (0..100)
                        .map(|i| {
                            let n = b * 100 + i;
                            let (path, window) = (t * half + n % half, n / half);
                            let r = load_report(
                                path,
                                window,
                                u64::from(path) * u64::from(windows) + u64::from(window),
                            );
                            String::from_utf8(r.to_json().unwrap()).unwrap()
                        })
                        .collect();
                    format!("[{}]", parts.join(",")).into_bytes()
                })
                .collect()
        })
        .collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for b in &bodies {
            s.spawn(move || {
                for body in b {
                    assert_eq!(post(addr, body), 200);
                }
            });
        }
    });
    let http = start.elapsed();
    let sent = u64::from(per_thread / 100 * 100 * 2);
    println!(
        "HTTP ingest: {sent} reports in {:.2} s = {:.0} reports/s (JSON decode, validation, durable commit)",
        http.as_secs_f64(),
        rate(sent, http)
    );
    server.stop()?;

    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.query_only {
        // Opening it read-write applies any newer migration first.
        drop(Db::open(&args.db)?);
        return time_compare(&args);
    }
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", args.db.display()));
    }
    let windows = args.hours * 360;
    let total = u64::from(args.paths) * u64::from(windows);
    println!(
        "{} paths × {} windows = {total} window reports; store {}",
        args.paths,
        windows,
        args.db.display()
    );

    http_ingest(&args, windows)?;

    // 2. Store ingest of the rest, in batches of 100 (what the HTTP handler calls).
    let mut store = Db::open(&args.db)?;
    let start = Instant::now();
    let mut batch = Vec::with_capacity(100);
    let mut stored = 0u64;
    for path in 0..args.paths {
        for window in 0..windows {
            let id = u64::from(path) * u64::from(windows) + u64::from(window);
            batch.push(load_report(path, window, id));
            if batch.len() == 100 {
                stored += store.ingest(&batch, 0)?.accepted;
                batch.clear();
            }
        }
    }
    stored += store.ingest(&batch, 0)?.accepted;
    let ingest = start.elapsed();
    println!(
        "store ingest: {stored} new reports in {:.1} s = {:.0} reports/s (report generation included)",
        ingest.as_secs_f64(),
        rate(stored, ingest)
    );

    // 3. Rollups, as the server's background thread keeps them.
    let start = Instant::now();
    let mut rolled = 0;
    loop {
        let n = store.roll_up(5_000)?;
        if n == 0 {
            break;
        }
        rolled += n as u64;
    }
    let roll = start.elapsed();
    println!(
        "rollup: {rolled} windows in {:.1} s = {:.0} windows/s",
        roll.as_secs_f64(),
        rate(rolled, roll)
    );
    let (count, unrolled) = store.counts()?;
    assert_eq!((count, unrolled), (total, 0));
    drop(store);
    time_compare(&args)
}

fn time_compare(args: &Args) -> Result<()> {
    // 4. compare over the whole 24 h, with ragged ends (not on minute boundaries).
    let reader = SqliteStore::open_read_only(&args.db)?;
    let from = T0 + 7 * 1_000_000_000;
    let to = T0 + u64::from(args.hours) * 3_600_000_000_000 - 13 * 1_000_000_000;
    let sel = |k: &str| Selector {
        name_or_kind: k.to_string(),
        site: None,
    };
    for attempt in ["first", "second"] {
        let start = Instant::now();
        let c = compare::compare(&reader, &sel("expressroute"), &sel("vpn"), from, to)?;
        let took = start.elapsed();
        let windows_row = c.rows.iter().find(|r| r.figure == "windows").unwrap();
        let p99 = c.rows.iter().find(|r| r.figure == "RTT p99 µs").unwrap();
        println!(
            "compare expressroute vs vpn over {:.2} h ({} + {} windows, {} paths): {:.3} s ({attempt} run); RTT p99 {:.1} vs {:.1} µs",
            (to - from) as f64 / 3.6e12,
            windows_row.a.unwrap_or(0.0),
            windows_row.b.unwrap_or(0.0),
            args.paths,
            took.as_secs_f64(),
            p99.a.unwrap_or(0.0),
            p99.b.unwrap_or(0.0)
        );
    }
    let size: u64 = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|e| std::fs::metadata(format!("{}{e}", args.db.display())).ok())
        .map(|m| m.len())
        .sum();
    println!("store size: {:.1} MiB", size as f64 / 1_048_576.0);
    Ok(())
}
