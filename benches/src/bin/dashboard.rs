//! The dashboard's data over a fleet-sized store: 100 sites × 2 paths (ExpressRoute and
//! VPN) × 24 hours of 10 s windows (1,728,000 window reports). It times what a site page
//! reads (the series of both paths, their CDFs and their heatmaps, over the 24 hours) and
//! what the fleet grid reads (every site and kind over the last 15 minutes), each against
//! the 1 s the page has; then the pages themselves, rendered as `serve` renders them
//! (`page::site_data` and `page::site`, `dash::grid` and `page::grid`).
//!
//! ```sh
//! cargo build --release -p pathprobe-benches --bin dashboard
//! target/release/dashboard [--sites 100] [--hours 24] [--db /tmp/pathprobe-dashboard.db] [--query-only]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a benchmark program: a failed step ends the run; figures printed as floats"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use pathprobe_benches::{T0, W, load_report};
use pathprobe_collector::dash::{self, GridRule};
use pathprobe_collector::page;
use pathprobe_collector::store::sqlite::Db;
use pathprobe_collector::store::{Selector, SqliteStore};

#[derive(Debug, Parser)]
struct Args {
    /// Sites, each with an ExpressRoute and a VPN path.
    #[arg(long, default_value_t = 100)]
    sites: u32,
    /// Hours of 10 s windows per path.
    #[arg(long, default_value_t = 24)]
    hours: u32,
    /// The store (deleted first unless --query-only).
    #[arg(long, default_value = "/tmp/pathprobe-dashboard.db")]
    db: PathBuf,
    /// Only time the reads, on a store an earlier run filled.
    #[arg(long)]
    query_only: bool,
}

/// The target of each page.
const TARGET: Duration = Duration::from_secs(1);

fn fill(args: &Args) -> Result<()> {
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", args.db.display()));
    }
    let windows = args.hours * 360;
    let mut store = Db::open(&args.db)?;
    let start = Instant::now();
    let mut batch = Vec::with_capacity(100);
    for site in 0..args.sites {
        for path in [2 * site, 2 * site + 1] {
            for window in 0..windows {
                let id = u64::from(path) * u64::from(windows) + u64::from(window);
                let mut r = load_report(path, window, id);
                r.site = Some(format!("site-{site:03}"));
                r.agent_id = format!("agent-{site:03}");
                r.path.name = if path % 2 == 0 { "er" } else { "vpn" }.to_string();
                batch.push(r);
                if batch.len() == 100 {
                    store.ingest(&batch, 0)?;
                    batch.clear();
                }
            }
        }
    }
    store.ingest(&batch, 0)?;
    let ingested = start.elapsed();
    let start = Instant::now();
    while store.roll_up(5_000)? > 0 {}
    let (count, unrolled) = store.counts()?;
    println!(
        "filled {}: {count} windows ({} sites × 2 paths × {} h) in {:.0} s, rolled up in {:.0} s ({unrolled} left)",
        args.db.display(),
        args.sites,
        args.hours,
        ingested.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn verdict(took: Duration) -> &'static str {
    if took <= TARGET { "within" } else { "OVER" }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.query_only {
        drop(Db::open(&args.db)?);
    } else {
        fill(&args)?;
    }
    let store = SqliteStore::open_read_only(&args.db)?;
    let (from, to) = (T0, T0 + u64::from(args.hours) * 360 * W);
    let site = |kind: &str| Selector {
        name_or_kind: kind.to_string(),
        site: Some("site-042".to_string()),
    };
    for attempt in ["first", "second"] {
        for columns in [dash::DEFAULT_COLUMNS, 1_500] {
            let start = Instant::now();
            let mut points = 0;
            for kind in ["expressroute", "vpn"] {
                let s = dash::series(&store, &site(kind), from, to, columns)?;
                let c = dash::cdf(&store, &site(kind), from, to)?;
                let h = dash::heatmap(&store, &site(kind), from, to, columns, dash::DEFAULT_BINS)?;
                points += s.columns.len() + c.points.len() + h.columns.len();
                if kind == "vpn" && attempt == "first" {
                    println!(
                        "  {kind}: {} series columns at {} resolution, {} CDF points, RTT p99 {:.0} µs",
                        s.columns.len(),
                        s.resolution,
                        c.points.len(),
                        c.rtt_us.map_or(0.0, |r| r.p99)
                    );
                }
            }
            let took = start.elapsed();
            println!(
                "site page data, 24 h of ER and VPN (series, CDF, heatmap; at most {columns} columns): {:.3} s ({attempt} run, {points} points), {} the {:.0} s target",
                took.as_secs_f64(),
                verdict(took),
                TARGET.as_secs_f64()
            );
        }
        // The rendered pages, as `serve` answers `/site` and `/`: the reads above done once
        // for both (one comparison and one series a side), and the HTML and SVG drawn.
        let start = Instant::now();
        let q = page::SiteQuery {
            site: "site-042".to_string(),
            ..page::SiteQuery::default()
        };
        let data = page::site_data(&store, &q, from, to)?;
        let html = page::site(&data)?;
        let took = start.elapsed();
        println!(
            "site page rendered, 24 h of ER against VPN ({} columns a side at {} resolution): {:.3} s ({attempt} run, {} KiB of HTML and SVG), {} the {:.0} s target",
            data.series[0].columns.len(),
            data.series[0].resolution,
            took.as_secs_f64(),
            html.len() / 1024,
            verdict(took),
            TARGET.as_secs_f64()
        );
        let start = Instant::now();
        let g = dash::grid(&store, to - 900_000_000_000, to, to, &GridRule::default())?;
        let grid_html = page::grid(&g, "15m");
        let took = start.elapsed();
        let cells: usize = g.sites.iter().map(|r| r.cells.len()).sum();
        println!(
            "fleet grid page rendered, {} sites × {} kinds over the last 15 min: {:.3} s ({attempt} run, {cells} cells, {} KiB of HTML), {} the {:.0} s target",
            g.sites.len(),
            g.kinds.len(),
            took.as_secs_f64(),
            grid_html.len() / 1024,
            verdict(took),
            TARGET.as_secs_f64()
        );
    }
    Ok(())
}
