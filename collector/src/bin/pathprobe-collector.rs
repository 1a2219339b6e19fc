//! The `pathprobe-collector` command.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use pathprobe_collector::serve::{DEFAULT_MAX_BODY, Limits, ServeConfig, Tokens};
use pathprobe_collector::store::{Selector, SqliteStore, Store};
use pathprobe_collector::{Error, compare, export, inspect, time_range};
use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::WindowReport;

/// pathprobe collector: stores agents' window reports, merges them exactly and compares paths.
#[derive(Debug, Parser)]
#[command(name = "pathprobe-collector", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct DbArg {
    /// The store (one SQLite file).
    #[arg(long, default_value = "pathprobe.db", env = "PATHPROBE_DB")]
    db: PathBuf,
}

#[derive(Debug, Args)]
struct RangeArgs {
    /// How far back from now, like 1h, 30m or 7d [default: 1h].
    #[arg(long, conflicts_with = "from", env = "PATHPROBE_SINCE")]
    since: Option<String>,
    /// Start of the range: RFC 3339 (2026-11-26T10:00:00Z) or Unix seconds.
    #[arg(long, env = "PATHPROBE_FROM")]
    from: Option<String>,
    /// End of the range [default: now].
    #[arg(long, env = "PATHPROBE_TO")]
    to: Option<String>,
}

impl RangeArgs {
    fn resolve(&self) -> anyhow::Result<(u64, u64)> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        time_range(
            self.since.as_deref(),
            self.from.as_deref(),
            self.to.as_deref(),
            now,
        )
        .map_err(anyhow::Error::msg)
    }
}

/// What the collector takes from agents; each refusal names the flag that sets its limit.
#[derive(Debug, Args)]
struct LimitArgs {
    /// Largest request body, in octets.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY, env = "PATHPROBE_MAX_BODY")]
    max_body: usize,
    /// Most reports in one request (agents send 100).
    #[arg(long, default_value_t = Limits::default().max_batch, env = "PATHPROBE_MAX_BATCH",
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|v| v as usize))]
    max_batch: usize,
    /// Most requests decoded and stored at once; more are answered 503 (retry).
    #[arg(long, default_value_t = Limits::default().max_concurrent_ingests, env = "PATHPROBE_MAX_CONCURRENT_INGESTS",
          value_parser = clap::value_parser!(u32).range(1..=256).map(|v| v as usize))]
    max_concurrent_ingests: usize,
    /// Most paths one agent may have.
    #[arg(long, default_value_t = Limits::default().max_paths_per_agent, env = "PATHPROBE_MAX_PATHS_PER_AGENT",
          value_parser = clap::value_parser!(u64).range(1..))]
    max_paths_per_agent: u64,
    /// Most paths /metrics exports series for.
    #[arg(long, default_value_t = Limits::default().max_metric_paths, env = "PATHPROBE_MAX_METRIC_PATHS")]
    max_metric_paths: usize,
    /// Oldest window accepted, back from now (e.g. 30d).
    #[arg(long, default_value = "30d", env = "PATHPROBE_MAX_REPORT_AGE", value_parser = humantime::parse_duration)]
    max_report_age: std::time::Duration,
    /// How long an admitted batch's body may take to arrive; a slower one is refused (the
    /// agent retries) and gives its ingest place back.
    #[arg(long, default_value = "60s", env = "PATHPROBE_BODY_TIMEOUT", value_parser = humantime::parse_duration)]
    body_timeout: std::time::Duration,
}

impl LimitArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_body: self.max_body,
            max_batch: self.max_batch,
            max_concurrent_ingests: self.max_concurrent_ingests,
            max_paths_per_agent: self.max_paths_per_agent,
            max_metric_paths: self.max_metric_paths,
            max_report_age: self.max_report_age,
            body_timeout: self.body_timeout,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive reports over HTTP and answer queries (see the library docs for the API).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8862", env = "PATHPROBE_LISTEN")]
        listen: SocketAddr,
        #[command(flatten)]
        db: DbArg,
        /// Agents' bearer tokens: one `AGENT_ID TOKEN` per line. Without it, anyone who can
        /// reach the port can send reports.
        #[arg(long, env = "PATHPROBE_TOKENS")]
        tokens: Option<PathBuf>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Compare two paths (by name or kind) side by side, with difference and ratio.
    Compare {
        /// The first path name or kind (e.g. expressroute).
        #[arg(long, env = "PATHPROBE_A")]
        a: String,
        /// The second path name or kind (e.g. vpn).
        #[arg(long, env = "PATHPROBE_B")]
        b: String,
        /// Only paths of this site.
        #[arg(long, env = "PATHPROBE_SITE")]
        site: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        db: DbArg,
        /// Print JSON.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print CSV.
        #[arg(long)]
        csv: bool,
    },
    /// List the paths the collector knows.
    Paths {
        #[command(flatten)]
        db: DbArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the events (failovers and outages, route and DSCP changes) seen in a range,
    /// oldest first.
    Events {
        /// Only this path name or kind [default: every path].
        #[arg(long)]
        path: Option<String>,
        /// Only paths of this site.
        #[arg(long)]
        site: Option<String>,
        /// Only events of this kind.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
            pathprobe_proto::event::EventKind::ALL.iter().map(|k| k.as_str())
        ))]
        kind: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        db: DbArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the merged histogram of a path and range in HdrHistogram's formats.
    Histogram {
        /// Path name or kind.
        #[arg(long)]
        path: String,
        /// The metric to export.
        #[arg(long, default_value = "rtt_ns", value_parser = [
            "rtt_ns", "rtt_sched_ns", "ipdv_ns", "owd_fwd_ns", "owd_rev_ns", "loss_run_packets", "throughput_bps",
        ])]
        metric: String,
        /// `v2` (base64 V2+DEFLATE) or `log` (interval log).
        #[arg(long, default_value = "v2")]
        format: String,
        /// Only paths of this site.
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        db: DbArg,
    },
    /// Validate window report files and print each path's windows merged exactly.
    Inspect {
        /// Report files (JSON, one report each); `-` reads one from standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn read(path: &PathBuf) -> Result<Vec<u8>, Error> {
    let result = if path.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut v).map(|_| v)
    } else {
        std::fs::read(path)
    };
    result.map_err(|source| Error::ReadFile {
        path: path.clone(),
        source,
    })
}

fn run_inspect(files: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let mut reports = Vec::with_capacity(files.len());
    for f in files {
        let bytes = read(f)?;
        let report = WindowReport::from_json(&bytes).map_err(|source| Error::Report {
            origin: f.display().to_string(),
            source,
        })?;
        reports.push((f.display().to_string(), report));
    }
    let summaries = inspect::summarize(reports.iter().map(|(o, r)| (o.as_str(), r)))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summaries).context("cannot write JSON")?
        );
    } else {
        println!("{}", inspect::render(&summaries));
    }
    Ok(())
}

fn run_serve(
    listen: SocketAddr,
    db: PathBuf,
    tokens: Option<&PathBuf>,
    limits: Limits,
) -> anyhow::Result<()> {
    let tokens = tokens.map(|p| Tokens::load(p)).transpose()?;
    if tokens.is_none() {
        tracing::warn!("no --tokens file: accepting reports from anyone who can reach {listen}");
    }
    let cfg = ServeConfig {
        listen,
        db,
        tokens,
        limits,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("shutting down");
        };
        pathprobe_collector::serve::serve(cfg, shutdown).await
    })?;
    Ok(())
}

fn run_events(
    path: Option<&str>,
    site: Option<&str>,
    kind: Option<&str>,
    range: &RangeArgs,
    db: &DbArg,
    json: bool,
) -> anyhow::Result<()> {
    let sel = Selector {
        name_or_kind: path.unwrap_or_default().to_string(),
        site: site.map(str::to_string),
    };
    let (from, to) = range.resolve()?;
    let store = SqliteStore::open_read_only(&db.db)?;
    let kind = kind
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let events = store.events(&sel, from, to, kind, usize::MAX)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&events)?);
    } else {
        print!("{}", compare::events_text(&events));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PATHPROBE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match &cli.command {
        Command::Inspect { files, json } => run_inspect(files, *json),
        Command::Serve {
            listen,
            db,
            tokens,
            limits,
        } => run_serve(*listen, db.db.clone(), tokens.as_ref(), limits.limits()),
        Command::Compare {
            a,
            b,
            site,
            range,
            db,
            json,
            csv,
        } => (|| {
            let (from, to) = range.resolve()?;
            let store = SqliteStore::open_read_only(&db.db)?;
            let sel = |n: &String| Selector {
                name_or_kind: n.clone(),
                site: site.clone(),
            };
            let c = compare::compare(&store, &sel(a), &sel(b), from, to)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else if *csv {
                print!("{}", compare::csv(&c));
            } else {
                println!("{}", compare::table(&c));
            }
            Ok(())
        })(),
        Command::Events {
            path,
            site,
            kind,
            range,
            db,
            json,
        } => run_events(
            path.as_deref(),
            site.as_deref(),
            kind.as_deref(),
            range,
            db,
            *json,
        ),
        Command::Paths { db, json } => (|| {
            let store = SqliteStore::open_read_only(&db.db)?;
            let paths = store.paths()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&paths)?);
            } else {
                for p in &paths {
                    println!(
                        "{:<20} {:<13} site {:<10} agent {:<16} {} -> {} dscp {} windows {}",
                        p.name, p.kind, p.site, p.agent_id, p.local, p.remote, p.dscp, p.windows
                    );
                }
            }
            Ok(())
        })(),
        Command::Histogram {
            path,
            metric,
            format,
            site,
            range,
            db,
        } => (|| {
            let (from, to) = range.resolve()?;
            let m =
                Metric::from_key(metric).with_context(|| format!("unknown --metric {metric}"))?;
            let store = SqliteStore::open_read_only(&db.db)?;
            let sel = Selector {
                name_or_kind: path.clone(),
                site: site.clone(),
            };
            print!("{}", export::histogram(&store, &sel, m, from, to, format)?);
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pathprobe-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
