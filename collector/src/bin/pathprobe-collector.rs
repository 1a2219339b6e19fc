//! The `pathprobe-collector` command.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use pathprobe_collector::remote::Remote;
use pathprobe_collector::serve::push::{Protocol, PushConfig};
use pathprobe_collector::serve::{
    ConnLimits, DEFAULT_MAX_BODY, Limits, QueryLimits, ServeConfig, Tls, TlsFiles, Tokens,
};
use pathprobe_collector::store::{EventRow, PathRow, Selector, SqliteStore, Store};
use pathprobe_collector::{Error, compare, export, inspect, time_range};
use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::WindowReport;

/// pathprobe collector: stores agents' window reports, merges them exactly and compares paths.
#[derive(Debug, Parser)]
#[command(name = "pathprobe-collector", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Accept token and key files that others can read (mode wider than 0600).
    #[arg(long, global = true, env = "PATHPROBE_ALLOW_WORLD_READABLE_SECRETS")]
    allow_world_readable_secrets: bool,
}

/// Asking a collector over HTTP(S) in place of reading `--db`.
#[derive(Debug, Args)]
struct RemoteArgs {
    /// Ask this collector (like <https://collector.example.net:8862>) instead of reading
    /// --db.
    #[arg(
        long = "collector",
        requires = "token_file",
        env = "PATHPROBE_COLLECTOR"
    )]
    collector: Option<String>,
    /// A reader token (a `reader NAME TOKEN` line of the collector's tokens), in this file.
    #[arg(long, requires = "collector", env = "PATHPROBE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA (PEM) that signed the collector's certificate [default: the system's CAs].
    #[arg(long, requires = "collector", env = "PATHPROBE_CA_FILE")]
    ca_file: Option<PathBuf>,
}

impl RemoteArgs {
    fn remote(&self) -> anyhow::Result<Option<Remote>> {
        let (Some(url), Some(token)) = (&self.collector, &self.token_file) else {
            return Ok(None);
        };
        Ok(Some(Remote::new(url, token, self.ca_file.as_deref())?))
    }
}

impl RangeArgs {
    /// The range as the collector's query parameters.
    fn query(&self) -> [(&'static str, Option<&str>); 3] {
        [
            ("since", self.since.as_deref()),
            ("from", self.from.as_deref()),
            ("to", self.to.as_deref()),
        ]
    }
}

/// `serve`'s TLS, access and connection settings.
#[derive(Debug, Args)]
struct AccessArgs {
    /// Serve HTTPS with this certificate chain (PEM, leaf first); SIGHUP reloads it.
    #[arg(long, requires = "tls_key", env = "PATHPROBE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM; mode 0600).
    #[arg(long, requires = "tls_cert", env = "PATHPROBE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Require agents to present a client certificate signed by these CAs (PEM) to send
    /// reports; its subject CN or DNS SAN is the agent id, in place of a bearer token.
    #[arg(long, requires = "tls_cert", env = "PATHPROBE_CLIENT_CA")]
    client_ca: Option<PathBuf>,
    /// Answer queries and /metrics without a reader token (refused beyond loopback
    /// without TLS).
    #[arg(long, env = "PATHPROBE_OPEN_READ")]
    open_read: bool,
    /// Plan the fleet from this file: each agent fetches its expanded plan at GET /v1/plan.
    /// Loaded again on SIGHUP and when it changes; a file that does not pass is not applied
    /// (check one first with `pathprobe-collector fleet check FILE`).
    #[arg(long, env = "PATHPROBE_FLEET")]
    fleet: Option<PathBuf>,
    /// Most connections open at once; more are closed at once.
    #[arg(long, default_value_t = ConnLimits::default().max_connections, env = "PATHPROBE_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|v| v as usize))]
    max_connections: usize,
    /// Time from a connection's accept (TLS handshake included) to its first request's
    /// complete headers.
    #[arg(long, default_value = "10s", env = "PATHPROBE_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
    header_timeout: std::time::Duration,
    /// Time a kept-alive connection may wait for its next request's headers.
    #[arg(long, default_value = "60s", env = "PATHPROBE_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// Queries answered at once, on threads of lower priority than ingest; more get 503.
    #[arg(long, default_value_t = QueryLimits::default().max_concurrent, env = "PATHPROBE_MAX_CONCURRENT_QUERIES",
          value_parser = clap::value_parser!(u32).range(1..=64).map(|v| v as usize))]
    max_concurrent_queries: usize,
    /// Time a query has to answer; past it, 503.
    #[arg(long, default_value = "30s", env = "PATHPROBE_QUERY_TIMEOUT", value_parser = humantime::parse_duration)]
    query_timeout: std::time::Duration,
    /// The longest range a query may ask for; longer is a 400.
    #[arg(long, default_value = "31d", env = "PATHPROBE_MAX_QUERY_RANGE", value_parser = humantime::parse_duration)]
    max_query_range: std::time::Duration,
    /// A path kind's thresholds on the fleet grid (/v1/grid), KIND=RTT,LOSS% like
    /// expressroute=20ms,1%, in Connection Monitor's terms (round-trip time, checks
    /// failed); repeat for each kind. [default: 100ms,5% for every kind]
    #[arg(
        long,
        value_name = "KIND=RTT,LOSS%",
        env = "PATHPROBE_GRID_THRESHOLD",
        value_delimiter = ';'
    )]
    grid_threshold: Vec<String>,
}

impl AccessArgs {
    fn grid(&self) -> anyhow::Result<pathprobe_collector::dash::GridRule> {
        let mut rule = pathprobe_collector::dash::GridRule::default();
        for t in &self.grid_threshold {
            rule = rule
                .with(t)
                .map_err(|e| anyhow::anyhow!("--grid-threshold: {e}"))?;
        }
        Ok(rule)
    }

    fn queries(&self) -> QueryLimits {
        QueryLimits {
            max_concurrent: self.max_concurrent_queries,
            timeout: self.query_timeout,
            max_range: self.max_query_range,
        }
    }

    fn conn(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
        }
    }

    fn tls(&self) -> anyhow::Result<Option<Arc<Tls>>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.client_ca.clone(),
        };
        Ok(Some(Arc::new(Tls::load(files)?)))
    }
}

/// Where stored windows are pushed besides the store.
#[derive(Debug, Args)]
#[allow(
    clippy::struct_field_names,
    clippy::doc_markdown,
    reason = "the fields are the flags' names; the help shows URLs as written"
)]
struct ExportArgs {
    /// Push every stored window, once, to this Prometheus remote-write receiver (remote
    /// write 1.0 with native histograms), like https://prometheus.example.net/api/v1/write.
    /// Prometheus itself needs --web.enable-remote-write-receiver and
    /// --enable-feature=native-histograms.
    #[arg(long, value_name = "URL", env = "PATHPROBE_REMOTE_WRITE")]
    remote_write: Option<String>,
    /// A bearer token for the receiver, in this file (mode 0600).
    #[arg(
        long,
        requires = "remote_write",
        conflicts_with = "remote_write_user",
        env = "PATHPROBE_REMOTE_WRITE_BEARER_FILE"
    )]
    remote_write_bearer_file: Option<PathBuf>,
    /// Basic authentication to the receiver: the user (the password in
    /// --remote-write-password-file).
    #[arg(long, requires_all = ["remote_write", "remote_write_password_file"], env = "PATHPROBE_REMOTE_WRITE_USER")]
    remote_write_user: Option<String>,
    /// The basic-authentication password, in this file (mode 0600).
    #[arg(
        long,
        requires = "remote_write_user",
        env = "PATHPROBE_REMOTE_WRITE_PASSWORD_FILE"
    )]
    remote_write_password_file: Option<PathBuf>,
    /// The CA (PEM) that signed the receiver's certificate [default: the system's CAs].
    #[arg(
        long,
        requires = "remote_write",
        env = "PATHPROBE_REMOTE_WRITE_CA_FILE"
    )]
    remote_write_ca_file: Option<PathBuf>,
    /// A label added to every series pushed, NAME=VALUE (repeat for more), like
    /// collector=weu-1.
    #[arg(long, requires = "remote_write", value_name = "NAME=VALUE",
          value_parser = pathprobe_collector::serve::push::parse_label, env = "PATHPROBE_REMOTE_WRITE_LABEL", value_delimiter = ';')]
    remote_write_label: Vec<(String, String)>,
    /// The queue of requests not yet accepted, on disk: they wait there through an outage
    /// of the receiver and a restart [default: the store's path with .remote-write].
    #[arg(long, requires = "remote_write", env = "PATHPROBE_REMOTE_WRITE_QUEUE")]
    remote_write_queue: Option<PathBuf>,
    /// Most octets the queue holds; past it, the oldest requests are dropped and counted.
    #[arg(long, requires = "remote_write", default_value_t = pathprobe_collector::serve::push::DEFAULT_MAX_QUEUE,
          env = "PATHPROBE_REMOTE_WRITE_MAX_QUEUE")]
    remote_write_max_queue: u64,
    /// Push every stored window, once, to this OTLP/HTTP receiver as delta exponential
    /// histograms and sums, like http://127.0.0.1:4318/v1/metrics (an OpenTelemetry
    /// Collector; the route to Azure Monitor).
    #[arg(long, value_name = "URL", env = "PATHPROBE_OTLP")]
    otlp: Option<String>,
    /// A bearer token for the OTLP receiver, in this file (mode 0600).
    #[arg(long, requires = "otlp", env = "PATHPROBE_OTLP_BEARER_FILE")]
    otlp_bearer_file: Option<PathBuf>,
    /// The CA (PEM) that signed the OTLP receiver's certificate [default: the system's CAs].
    #[arg(long, requires = "otlp", env = "PATHPROBE_OTLP_CA_FILE")]
    otlp_ca_file: Option<PathBuf>,
    /// A resource attribute added to every agent's resource, NAME=VALUE (repeat for more),
    /// like deployment.environment=prod.
    #[arg(long, requires = "otlp", value_name = "NAME=VALUE",
          value_parser = pathprobe_collector::serve::push::parse_attribute, env = "PATHPROBE_OTLP_ATTRIBUTE", value_delimiter = ';')]
    otlp_attribute: Vec<(String, String)>,
    /// The queue of OTLP requests not yet accepted, on disk [default: the store's path
    /// with .otlp].
    #[arg(long, requires = "otlp", env = "PATHPROBE_OTLP_QUEUE")]
    otlp_queue: Option<PathBuf>,
    /// Most octets the OTLP queue holds; past it, the oldest requests are dropped and
    /// counted.
    #[arg(long, requires = "otlp", default_value_t = pathprobe_collector::serve::push::DEFAULT_MAX_QUEUE,
          env = "PATHPROBE_OTLP_MAX_QUEUE")]
    otlp_max_queue: u64,
}

/// The store's path with `suffix` added: where a queue lives by default.
fn beside(db: &std::path::Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

impl ExportArgs {
    fn remote_write(&self, db: &std::path::Path) -> Option<PushConfig> {
        let url = self.remote_write.clone()?;
        Some(PushConfig {
            protocol: Protocol::RemoteWrite,
            url,
            bearer_file: self.remote_write_bearer_file.clone(),
            basic: self
                .remote_write_user
                .clone()
                .zip(self.remote_write_password_file.clone()),
            ca_file: self.remote_write_ca_file.clone(),
            labels: self.remote_write_label.clone(),
            queue_dir: self
                .remote_write_queue
                .clone()
                .unwrap_or_else(|| beside(db, ".remote-write")),
            max_queue: self.remote_write_max_queue,
        })
    }

    fn otlp(&self, db: &std::path::Path) -> Option<PushConfig> {
        let url = self.otlp.clone()?;
        Some(PushConfig {
            protocol: Protocol::Otlp,
            url,
            bearer_file: self.otlp_bearer_file.clone(),
            basic: None,
            ca_file: self.otlp_ca_file.clone(),
            labels: self.otlp_attribute.clone(),
            queue_dir: self
                .otlp_queue
                .clone()
                .unwrap_or_else(|| beside(db, ".otlp")),
            max_queue: self.otlp_max_queue,
        })
    }
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
        let now = pathprobe_collector::now_ns();
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
enum TokenCommand {
    /// Print a fresh random token and the line that gives it to an agent or a reader.
    New {
        /// The agent id the token sends reports for.
        #[arg(long, conflicts_with = "reader", required_unless_present = "reader")]
        agent: Option<String>,
        /// The reader (a person or a dashboard) the token queries for.
        #[arg(long)]
        reader: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum FleetCommand {
    /// Check a fleet file and say what it expands to; errors give the line and the fix.
    Check { file: PathBuf },
    /// Print one agent's expanded plan, in agent.toml's sections.
    Show {
        file: PathBuf,
        #[arg(long)]
        agent: String,
    },
    /// Say which agents' plans change from OLD to NEW, and how.
    Diff { old: PathBuf, new: PathBuf },
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once")]
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
        access: AccessArgs,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        export: ExportArgs,
    },
    /// Tokens for the --tokens file.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The fleet file: check it, show one agent's expanded plan, or compare two versions.
    Fleet {
        #[command(subcommand)]
        command: FleetCommand,
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
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print JSON.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print CSV.
        #[arg(long)]
        csv: bool,
        /// Also write the RTT distributions of both sides, on one plot, as SVG to this file
        /// (for a ticket or a report).
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// List the fleet's agents: site, plan version, when each last fetched its plan and
    /// last reported, and the paths of its plan that do not report.
    Agents {
        /// The fleet file, to read with --db (a serving collector knows its own).
        #[arg(long, required_unless_present = "collector")]
        fleet: Option<PathBuf>,
        #[command(flatten)]
        db: DbArg,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the paths the collector knows.
    Paths {
        #[command(flatten)]
        db: DbArg,
        #[command(flatten)]
        remote: RemoteArgs,
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
        #[command(flatten)]
        remote: RemoteArgs,
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
        #[command(flatten)]
        remote: RemoteArgs,
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
    access: &AccessArgs,
    limits: Limits,
    export: &ExportArgs,
) -> anyhow::Result<()> {
    let tokens = tokens.map(|p| Tokens::load(p)).transpose()?;
    let remote_write = export.remote_write(&db);
    let otlp = export.otlp(&db);
    let tls = access.tls()?;
    let cfg = ServeConfig {
        listen,
        db,
        tokens,
        limits,
        conn: access.conn(),
        queries: access.queries(),
        tls: tls.clone(),
        open_read: access.open_read,
        grid: access.grid()?,
        fleet: access
            .fleet
            .clone()
            .map(pathprobe_collector::serve::plan::FleetState::load)
            .transpose()?
            .map(Arc::new),
        remote_write,
        otlp,
    };
    cfg.check()?;
    if cfg.tokens.is_none() && !tls.as_ref().is_some_and(|t| t.mutual()) {
        tracing::warn!("no --tokens file: accepting reports from anyone who can reach {listen}");
    }
    if !cfg.open_read && !cfg.tokens.as_ref().is_some_and(Tokens::has_readers) {
        tracing::warn!(
            "no reader token in --tokens and no --open-read: every query and /metrics will be refused (401)"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        reload_on_hangup(tls);
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

/// Reloads the certificate and key on each SIGHUP: new connections get the new ones,
/// established ones keep theirs; a bad file leaves the old ones in place. Without TLS a
/// SIGHUP (a service manager's reload) is logged, not the end of the collector.
fn reload_on_hangup(tls: Option<Arc<Tls>>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot watch SIGHUP: the certificate is reloaded only by a restart");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match tls.as_ref().map(|t| t.reload()) {
                None => tracing::info!("SIGHUP: no TLS certificate to reload; serving on"),
                Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "SIGHUP: the TLS certificate is not reloaded: serving on with the old one");
                }
            }
        }
    });
}

fn run_token_new(agent: Option<&str>, reader: Option<&str>) -> anyhow::Result<()> {
    let (token, digest) = pathprobe_collector::serve::new_token()?;
    let line = match (agent, reader) {
        (Some(a), _) => format!("{a} {digest}"),
        (None, Some(r)) => format!("reader {r} {digest}"),
        (None, None) => anyhow::bail!("give --agent ID or --reader NAME"),
    };
    println!("token: {token}");
    println!("line for the collector's --tokens file (it holds the digest, not the token):");
    println!("{line}");
    Ok(())
}

#[allow(clippy::too_many_arguments, clippy::fn_params_excessive_bools)]
fn run_compare(
    a: &String,
    b: &String,
    site: Option<&String>,
    range: &RangeArgs,
    db: &DbArg,
    remote: &RemoteArgs,
    (json, csv): (bool, bool),
    plot: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use pathprobe_collector::dash::{self, CdfAnswer};
    let (c, cdfs) = if let Some(r) = remote.remote()? {
        let mut q = vec![
            ("a", Some(a.as_str())),
            ("b", Some(b.as_str())),
            ("site", site.map(String::as_str)),
        ];
        q.extend(range.query());
        let c = r.get_json::<compare::Comparison>("/v1/compare", &q)?;
        let cdf = |path: &str| -> anyhow::Result<CdfAnswer> {
            let mut q = vec![("path", Some(path)), ("site", site.map(String::as_str))];
            q.extend(range.query());
            Ok(r.get_json::<CdfAnswer>("/v1/cdf", &q)?)
        };
        let cdfs = plot
            .map(|_| Ok::<_, anyhow::Error>((cdf(a)?, cdf(b)?)))
            .transpose()?;
        (c, cdfs)
    } else {
        let (from, to) = range.resolve()?;
        let store = SqliteStore::open_read_only(&db.db)?;
        let sel = |n: &String| Selector {
            name_or_kind: n.clone(),
            site: site.cloned(),
        };
        let c = compare::compare(&store, &sel(a), &sel(b), from, to)?;
        let cdfs = plot
            .map(|_| {
                Ok::<_, anyhow::Error>((
                    dash::cdf(&store, &sel(a), from, to)?,
                    dash::cdf(&store, &sel(b), from, to)?,
                ))
            })
            .transpose()?;
        (c, cdfs)
    };
    if let (Some(file), Some((ca, cb))) = (plot, cdfs) {
        let title = format!(
            "RTT distribution{}, {} to {}",
            site.map(|s| format!(" at {s}")).unwrap_or_default(),
            c.from,
            c.to
        );
        let svg = pathprobe_collector::plot::cdf_svg(&title, &[(a, &ca), (b, &cb)])?;
        std::fs::write(file, svg)
            .with_context(|| format!("cannot write the plot to {}", file.display()))?;
        eprintln!(
            "pathprobe-collector: wrote the RTT distributions to {}",
            file.display()
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else if csv {
        print!("{}", compare::csv(&c));
    } else {
        println!("{}", compare::table(&c));
    }
    Ok(())
}

fn run_agents(
    fleet: Option<&std::path::Path>,
    db: &DbArg,
    remote: &RemoteArgs,
    json: bool,
) -> anyhow::Result<()> {
    use pathprobe_collector::serve::plan::{AgentRow, FleetState, agents};
    let rows: Vec<AgentRow> = if let Some(r) = remote.remote()? {
        r.get_json("/v1/agents", &[])?
    } else {
        let Some(file) = fleet else {
            anyhow::bail!(
                "give --fleet FILE with --db, or ask a serving collector with --collector URL"
            );
        };
        let state = FleetState::load(file.to_owned())?;
        let paths = SqliteStore::open_read_only(&db.db)?.latest()?;
        agents(&state, &paths, pathprobe_collector::now_ns())
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let now = pathprobe_collector::now_ns();
    let ago = |ns: Option<u64>| {
        ns.map_or_else(
            || "never".to_string(),
            |at| format!("{} s ago", now.saturating_sub(at) / 1_000_000_000),
        )
    };
    for a in &rows {
        let fetched = match (&a.fetched_version, a.fetched_ns) {
            (Some(v), at) if *v == a.plan_version => format!("fetched {}", ago(at)),
            (Some(v), at) => format!("fetched {} (version {v}, not the newest)", ago(at)),
            (None, _) => "not fetched since the collector started".to_string(),
        };
        let silent = if a.not_reporting.is_empty() {
            String::new()
        } else {
            format!("; NOT REPORTING: {}", a.not_reporting.join(", "))
        };
        println!(
            "{:<16} site {:<10} plan {} {fetched}; reported {}; {} paths{silent}",
            a.agent_id,
            a.site,
            a.plan_version,
            ago(a.last_report_ns),
            a.paths
        );
    }
    Ok(())
}

fn run_paths(db: &DbArg, remote: &RemoteArgs, json: bool) -> anyhow::Result<()> {
    let paths: Vec<PathRow> = if let Some(r) = remote.remote()? {
        r.get_json("/v1/paths", &[])?
    } else {
        SqliteStore::open_read_only(&db.db)?.paths()?
    };
    if json {
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
}

fn run_events(
    path: Option<&str>,
    site: Option<&str>,
    kind: Option<&str>,
    range: &RangeArgs,
    db: &DbArg,
    remote: &RemoteArgs,
    json: bool,
) -> anyhow::Result<()> {
    let events: Vec<EventRow> = if let Some(r) = remote.remote()? {
        let mut q = vec![
            ("path", path),
            ("site", site),
            ("kind", kind),
            ("limit", Some("100000")),
        ];
        q.extend(range.query());
        r.get_json("/v1/events", &q)?
    } else {
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
        store.events(&sel, from, to, kind, usize::MAX)?
    };
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
    pathprobe_proto::secrets::allow_readable(cli.allow_world_readable_secrets);
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pathprobe-collector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command.
fn run_fleet(command: &FleetCommand) -> anyhow::Result<()> {
    use pathprobe_collector::fleet;
    match command {
        FleetCommand::Check { file } => {
            let f = fleet::load(file)?;
            let plans = f.plans.values();
            let paths: usize = plans.clone().map(|p| p.plan.paths.len()).sum();
            let reflectors = plans.clone().filter(|p| p.plan.reflector.is_some()).count();
            println!(
                "{}: good: {} agents, {reflectors} reflecting, {paths} paths",
                file.display(),
                f.plans.len()
            );
            for p in f.plans.values() {
                let n = p.plan.paths.len();
                let drills: Vec<String> = p
                    .plan
                    .drills
                    .iter()
                    .map(|d| {
                        format!(
                            ", drill {} at {}",
                            d.name,
                            d.start.as_deref().unwrap_or("?")
                        )
                    })
                    .collect();
                let tests: Vec<String> = p
                    .plan
                    .capacity
                    .iter()
                    .map(|c| {
                        format!(
                            ", capacity {} at {}",
                            c.name,
                            c.start.as_deref().unwrap_or("?")
                        )
                    })
                    .collect();
                println!(
                    "  {} (site {}): {n} path{}{}{}{}",
                    p.plan.agent_id,
                    p.plan.site,
                    if n == 1 { "" } else { "s" },
                    if p.plan.reflector.is_some() {
                        ", reflects"
                    } else {
                        ""
                    },
                    drills.concat(),
                    tests.concat()
                );
            }
        }
        FleetCommand::Show { file, agent } => {
            let f = fleet::load(file)?;
            let Some(p) = f.plans.get(agent) else {
                anyhow::bail!(
                    "agent {agent} is in no [[site]] of {}: its agents are {}",
                    file.display(),
                    f.plans.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            };
            print!("{}", toml::to_string(&p.plan)?);
        }
        FleetCommand::Diff { old, new } => {
            let (a, b) = (fleet::load(old)?, fleet::load(new)?);
            let lines = fleet::diff(&a, &b);
            if lines.is_empty() {
                println!("no agent's plan changes");
            }
            for l in lines {
                println!("{l}");
            }
        }
    }
    Ok(())
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Token {
            command: TokenCommand::New { agent, reader },
        } => run_token_new(agent.as_deref(), reader.as_deref()),
        Command::Inspect { files, json } => run_inspect(files, *json),
        Command::Fleet { command } => run_fleet(command),
        Command::Serve {
            listen,
            db,
            tokens,
            access,
            limits,
            export,
        } => run_serve(
            *listen,
            db.db.clone(),
            tokens.as_ref(),
            access,
            limits.limits(),
            export,
        ),
        Command::Compare {
            a,
            b,
            site,
            range,
            db,
            remote,
            json,
            csv,
            plot,
        } => run_compare(
            a,
            b,
            site.as_ref(),
            range,
            db,
            remote,
            (*json, *csv),
            plot.as_deref(),
        ),
        Command::Events {
            path,
            site,
            kind,
            range,
            db,
            remote,
            json,
        } => run_events(
            path.as_deref(),
            site.as_deref(),
            kind.as_deref(),
            range,
            db,
            remote,
            *json,
        ),
        Command::Paths { db, remote, json } => run_paths(db, remote, *json),
        Command::Agents {
            fleet,
            db,
            remote,
            json,
        } => run_agents(fleet.as_deref(), db, remote, *json),
        Command::Histogram {
            path,
            metric,
            format,
            site,
            range,
            db,
            remote,
        } => {
            if let Some(r) = remote.remote()? {
                let mut q = vec![
                    ("path", Some(path.as_str())),
                    ("metric", Some(metric.as_str())),
                    ("format", Some(format.as_str())),
                    ("site", site.as_deref()),
                ];
                q.extend(range.query());
                print!("{}", r.get("/v1/histogram", &q)?);
                return Ok(());
            }
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
        }
    }
}
