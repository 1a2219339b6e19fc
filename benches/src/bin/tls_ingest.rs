//! HTTPS ingest against plain HTTP, in one run: the agent's own uploader
//! (`delivery::Uploader`, ureq over rustls on a kept-alive connection) sending batches of
//! 100 window reports from two threads to an in-process collector, once over plain HTTP
//! and once over TLS (a certificate this program makes), alternated `--rounds` times.
//!
//! ```sh
//! cargo build --release -p pathprobe-benches --bin tls_ingest
//! target/release/tls_ingest [--reports 20000] [--rounds 2] [--dir /dev/shm]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a benchmark program: a failed step ends the run; figures printed as floats"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use pathprobe_agent::delivery::spool::Queued;
use pathprobe_agent::delivery::{Delivery, TlsClient, Uploader};
use pathprobe_benches::{LabCollector, load_report};
use pathprobe_collector::serve::{ServeConfig, Tls, TlsFiles};
use pathprobe_tests::pki::Ca;

#[derive(Debug, Parser)]
struct Args {
    /// Reports per measurement (in batches of 100, half from each of two threads).
    #[arg(long, default_value_t = 20_000)]
    reports: u32,
    /// Plain and TLS measurements, alternated, this many times each.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Where the stores go [default: the temp folder]; /dev/shm takes the disk's fsync
    /// times, which vary more than TLS costs, out of the figure.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

/// Reports per second through a collector on a fresh store in `dir`, with `tls` or not.
fn measure(
    dir: &Path,
    reports: u32,
    offset: u32,
    tls: Option<(Arc<Tls>, &TlsClient)>,
) -> Result<f64> {
    let db = dir.join(format!("ingest-{offset}.db"));
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let server = LabCollector::start(ServeConfig {
        tls: tls.as_ref().map(|(t, _)| Arc::clone(t)),
        ..ServeConfig::lab(addr, db)
    })?;
    let url = match tls {
        Some(_) => format!("https://localhost:{}", addr.port()),
        None => format!("http://127.0.0.1:{}", addr.port()),
    };
    let client = tls.map(|(_, c)| c.clone()).unwrap_or_default();
    // Built before the clock starts: the figure is the collector's and the wire's.
    let batches: Vec<Vec<Vec<Queued>>> = (0..2u32)
        .map(|t| {
            (0..reports / 200)
                .map(|b| {
                    (0..100)
                        .map(|i| {
                            let n = offset + t * reports / 2 + b * 100 + i;
                            let r = load_report(n % 100, n / 100, u64::from(n));
                            Queued {
                                body: r.to_json().unwrap(),
                                origin: String::new(),
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let sent = 100 * batches.iter().map(Vec::len).sum::<usize>();
    let start = Instant::now();
    std::thread::scope(|s| {
        for b in &batches {
            let up = Uploader::new(&url, None, &client).unwrap();
            s.spawn(move || {
                for batch in b {
                    let d = up.deliver(batch);
                    assert!(matches!(d, Delivery::Delivered(_)), "{d:?}");
                }
            });
        }
    });
    let took = start.elapsed();
    server.stop()?;
    Ok(sent as f64 / took.as_secs_f64())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("pathprobe-tls-ingest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ca = Ca::new(&dir, "bench");
    let cert = ca.server(&dir, "server");
    let tls = Arc::new(Tls::load(TlsFiles {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        client_ca: None,
    })?);
    let client = TlsClient {
        ca_file: Some(ca.cert_pem.clone()),
        ..TlsClient::default()
    };
    println!(
        "{} reports per measurement, batches of 100 from 2 threads, the agent's uploader on a kept-alive connection",
        args.reports
    );
    let (mut plain, mut secure) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let offset = round * 2 * args.reports;
        plain.push(measure(&dir, args.reports, offset, None)?);
        secure.push(measure(
            &dir,
            args.reports,
            offset + args.reports,
            Some((Arc::clone(&tls), &client)),
        )?);
        println!(
            "round {}: HTTP {:.0} reports/s, HTTPS {:.0} reports/s",
            round + 1,
            plain[plain.len() - 1],
            secure[secure.len() - 1]
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (p, s) = (mean(&plain), mean(&secure));
    println!(
        "mean: HTTP {p:.0} reports/s, HTTPS {s:.0} reports/s: TLS costs {:.1}% of the rate (target: under 30%)",
        100.0 * (1.0 - s / p)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
