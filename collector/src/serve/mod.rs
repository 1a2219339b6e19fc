//! `pathprobe-collector serve`: the HTTP side of the collector.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/reports` | a JSON array of window reports; 200 `{"accepted","duplicates"}` once stored durably; any refusal is `pathprobe_proto::ingest::Refused` (`error`, `reason`, `index` of the report, `limit`, `retry`): 400 malformed or outside the horizon, 401 no or unknown token, 403 a report of another agent, 413 body or batch too large, 422 one path too many for the agent, 503 busy or store unavailable (retry) |
//! | `GET /v1/paths` | the paths known, with windows and time span |
//! | `GET /v1/compare?a=&b=&site=&since=|from=&to=` | side-by-side figures with difference and ratio, and both sides' events |
//! | `GET /v1/events?path=&site=&kind=&limit=&since=|from=&to=` | events (failovers, failbacks, outages, signature changes, DSCP re-marking) seen in the range, oldest first, each with its path; `path` is a name or kind, all paths without it |
//! | `GET /v1/histogram?path=&metric=&site=&since=|from=&to=&format=v2|log` | the merged histogram in HdrHistogram's formats |
//! | `GET /v1/plan?agent=` | the agent's fleet plan (`--fleet`), with its `ETag`; `304` while it has not changed ([`plan`]) |
//! | `GET /v1/agents` | the fleet's agents: plan version, last fetch and report, plan paths not reporting |
//! | `GET /metrics` | every path's cumulative figures, native histograms in protobuf when `Accept` asks for it, else text with classic buckets ([`metrics`], [`crate::totals`]) |
//! | `GET /`, `GET /site?site=&a=&b=&since=|from=&to=` | the dashboard: the fleet grid, a site's page ([`pages`]) |
//! | `GET /login`, `POST /login`, `POST /logout` | the dashboard's sign-in with a reader token: a session cookie |
//!
//! Ingest and the plan take an agent's token (or, with `--client-ca`, its client
//! certificate); every query and `/metrics` take a reader's token, unless `--open-read`
//! (refused on an address beyond loopback without TLS). Over TLS ([`tls`]) the certificate is reloaded on
//! `SIGHUP`. The accept loop ([`listen`]) bounds the connections a peer can hold.
//!
//! Everything a token holder can make the collector hold is bounded ([`Limits`]): the body,
//! the reports in a batch, the batches ingested at once, the paths of one agent and the
//! paths `/metrics` keeps. Reports are validated on their encoded histograms (never built
//! into 230 KiB bucket arrays) and stored as they arrived.
//!
//! A batch is accepted whole or not at all, so an agent that retries after any error can
//! never leave half a batch behind; a report already stored is acknowledged again and not
//! stored twice.
//!
//! The server is split by concern: [`auth`] (tokens and roles), [`listen`] (connections,
//! TLS and their limits), [`tls`] (certificates), [`ingest`] (the gate, the limits,
//! reading and storing a batch), [`queries`] (paths, compare, histogram, events),
//! [`pages`] (the dashboard and its sessions), [`metrics`] (`/metrics`) and
//! [`push`] (remote write and OTLP: every stored window, through a queue on disk). It holds its [`Store`] as a trait object: SQLite today
//! ([`serve`]), any backend through [`serve_store`].

mod auth;
mod ingest;
pub mod listen;
mod metrics;
pub mod pages;
pub mod plan;
pub mod pool;
pub mod push;
mod queries;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pathprobe_proto::ingest::{Reason, Refused};
use serde_json::json;
use tokio::sync::Semaphore;

pub use auth::{MIN_TOKEN_LEN, Role, Tokens, new_token};
pub use ingest::{DEFAULT_MAX_BODY, Limits};
pub use listen::ConnLimits;
pub use pool::QueryLimits;
pub use tls::{Tls, TlsFiles};

use crate::store::{SqliteStore, Store};
use crate::{Error, Result, now_ns};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub db: PathBuf,
    /// `None` accepts reports from anyone (for a lab on loopback).
    pub tokens: Option<Tokens>,
    pub limits: Limits,
    pub conn: ConnLimits,
    pub queries: QueryLimits,
    /// TLS (and mutual TLS), loaded and checked; `None` serves plain HTTP.
    pub tls: Option<Arc<Tls>>,
    /// Queries and `/metrics` without a reader token (refused beyond loopback without
    /// TLS).
    pub open_read: bool,
    /// The fleet file's plans (`--fleet`), served at `GET /v1/plan`.
    pub fleet: Option<Arc<plan::FleetState>>,
    /// How the fleet grid (`/v1/grid`) colours its cells.
    pub grid: crate::dash::GridRule,
    /// Push every stored window to a Prometheus remote-write receiver, and to an OTLP
    /// one.
    pub remote_write: Option<push::PushConfig>,
    pub otlp: Option<push::PushConfig>,
}

impl ServeConfig {
    /// A collector for a lab on `listen`: plain HTTP, no tokens, open to read, default
    /// limits.
    pub fn lab(listen: SocketAddr, db: PathBuf) -> Self {
        Self {
            listen,
            db,
            tokens: None,
            limits: Limits::default(),
            conn: ConnLimits::default(),
            queries: QueryLimits::default(),
            tls: None,
            open_read: true,
            fleet: None,
            grid: crate::dash::GridRule::default(),
            remote_write: None,
            otlp: None,
        }
    }

    /// Refuses settings that would expose the collector: `--open-read` on an address
    /// beyond loopback without TLS.
    pub fn check(&self) -> Result<()> {
        if self.open_read && self.tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(Error::Config(format!(
                "--open-read on {} without TLS would let anyone on the network read every path's data: listen on 127.0.0.1, add --tls-cert and --tls-key, or give readers tokens (`reader NAME TOKEN` lines in --tokens) instead",
                self.listen
            )));
        }
        Ok(())
    }
}

struct AppState {
    store: Arc<dyn Store>,
    tokens: Option<Tokens>,
    limits: Limits,
    metrics: Mutex<metrics::Metrics>,
    /// Every path's cumulative figures (`/metrics`, remote write).
    totals: Mutex<crate::totals::Totals>,
    remote_write: Option<Arc<push::Push>>,
    otlp: Option<Arc<push::Push>>,
    ingests: Semaphore,
    /// Windows set aside by the rollup (and found at start).
    quarantined: AtomicU64,
    /// Ingest requires a client certificate.
    mutual_tls: bool,
    open_read: bool,
    conns: Arc<listen::ConnCounts>,
    queries: pool::QueryPool,
    fleet: Option<Arc<plan::FleetState>>,
    grid: crate::dash::GridRule,
    /// The dashboard's signed-in browsers.
    sessions: pages::Sessions,
}

/// How often the fleet's paths are looked at for silence.
const SILENCE_CHECK: Duration = Duration::from_secs(2);

/// Windows one rollup pass takes while holding the writer: small, so that an ingest never
/// waits long behind the rollup.
const ROLLUP_PASS: usize = 200;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// The HTTP status of a refusal.
fn status_of(reason: Reason) -> StatusCode {
    match reason {
        Reason::Unauthorized => StatusCode::UNAUTHORIZED,
        Reason::Forbidden => StatusCode::FORBIDDEN,
        Reason::TooLarge | Reason::TooManyReports => StatusCode::PAYLOAD_TOO_LARGE,
        Reason::TooManyPaths => StatusCode::UNPROCESSABLE_ENTITY,
        Reason::Unreadable | Reason::Malformed | Reason::Version | Reason::Horizon => {
            StatusCode::BAD_REQUEST
        }
        Reason::Busy | Reason::Store => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl AppState {
    /// The answer to a refused batch, counted for `/metrics`.
    fn refuse(&self, refused: Refused) -> Response {
        *self
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rejected
            .entry(refused.reason)
            .or_default() += 1;
        let status = status_of(refused.reason);
        let mut resp = (status, axum::Json(refused)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Keeps the rollups: a pass of [`ROLLUP_PASS`] windows at a time until none is left, then
/// a rest of half a second, until `stop`.
fn roll_up(st: &AppState, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(500));
        while !stop.load(Ordering::Relaxed) {
            let rolled = st.store.roll_up(ROLLUP_PASS);
            if let Ok(q) = st.store.quarantined() {
                st.quarantined.store(q, Ordering::Relaxed);
            }
            match rolled {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "rollup failed");
                    break;
                }
            }
        }
    }
}

/// Serves the SQLite store at `cfg.db` (created and migrated if needed) until `shutdown`.
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    cfg.check()?;
    let store = SqliteStore::open(&cfg.db, cfg.limits.max_paths_per_agent)?;
    tracing::info!(db = %cfg.db.display(), "store opened");
    serve_store(Arc::new(store), cfg, shutdown).await
}

/// The listening socket, with a backlog of 4,096 (the kernel caps it at `somaxconn`): a
/// fleet's agents reconnecting at once, or a burst of slow connections, must not overflow
/// the accept queue (a dropped SYN costs its sender a second).
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4_096)?;
    sock.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(sock.into())
}

/// Queries and `/metrics`: a reader's token (or `--open-read`) first.
async fn readers_only(
    axum::extract::State(st): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    if let Err(refused) = st.authorize_read(req.headers()) {
        return refused;
    }
    next.run(req).await
}

/// The routes: ingest behind its gate, the plan, reads behind a reader's token, and the
/// dashboard's pages.
fn app(state: &Arc<AppState>, max_body: usize) -> Router {
    let reads = Router::new()
        .route("/v1/paths", get(queries::paths))
        .route("/v1/compare", get(queries::compare))
        .route("/v1/histogram", get(queries::histogram))
        .route("/v1/events", get(queries::events))
        .route("/v1/series", get(queries::series))
        .route("/v1/cdf", get(queries::cdf))
        .route("/v1/heatmap", get(queries::heatmap))
        .route("/v1/grid", get(queries::grid))
        .route("/v1/agents", get(plan::agents_list))
        .route("/metrics", get(metrics::metrics))
        .layer(middleware::from_fn_with_state(
            Arc::clone(state),
            readers_only,
        ));
    Router::new()
        .route(
            "/v1/reports",
            post(ingest::ingest).layer(middleware::from_fn_with_state(
                Arc::clone(state),
                ingest::gate,
            )),
        )
        .route("/v1/plan", get(plan::plan))
        .merge(reads)
        .merge(pages::routes(state))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(Arc::clone(state))
}

/// Every path's cumulative figures, from the store, before anything is ingested.
fn read_totals(store: &dyn Store, max_paths: usize) -> Result<crate::totals::Totals> {
    let started = std::time::Instant::now();
    let totals = crate::totals::Totals::from_store(store, max_paths)?;
    tracing::info!(
        paths = totals.paths.len(),
        ms = started.elapsed().as_millis(),
        "cumulative figures read from the store"
    );
    Ok(totals)
}

/// Serves `store` with `cfg`'s settings (its `db` unused) until `shutdown`, with a
/// rollup thread beside it.
pub async fn serve_store(
    store: Arc<dyn Store>,
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    cfg.check()?;
    let listen = cfg.listen;
    let quarantined = store.quarantined()?;
    let listener = bind(listen).map_err(|source| Error::Bind {
        addr: listen,
        source,
    })?;
    let conns = Arc::new(listen::ConnCounts::default());
    // The pushes' settings and secrets first: a bad flag fails before the store is read.
    let remote_write = cfg.remote_write.clone().map(push::Push::open).transpose()?;
    let otlp = cfg.otlp.clone().map(push::Push::open).transpose()?;
    let totals = read_totals(&*store, cfg.limits.max_metric_paths)?;
    let state = Arc::new(AppState {
        store,
        mutual_tls: cfg.tls.as_ref().is_some_and(|t| t.mutual()),
        tokens: cfg.tokens,
        limits: cfg.limits,
        metrics: Mutex::new(metrics::Metrics::default()),
        totals: Mutex::new(totals),
        remote_write: remote_write.clone(),
        otlp: otlp.clone(),
        ingests: Semaphore::new(cfg.limits.max_concurrent_ingests.max(1)),
        quarantined: AtomicU64::new(quarantined),
        open_read: cfg.open_read,
        conns: Arc::clone(&conns),
        queries: pool::QueryPool::new(cfg.queries),
        fleet: cfg.fleet.clone(),
        grid: cfg.grid.clone(),
        sessions: pages::Sessions::default(),
    });
    if let Some(f) = &cfg.fleet {
        plan::watch(Arc::clone(f));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let roller = {
        let (st, stop) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || roll_up(&st, &stop))
    };
    let pushers: Vec<_> = [remote_write.clone(), otlp.clone()]
        .into_iter()
        .flatten()
        .map(|p| std::thread::spawn(move || p.run()))
        .collect();
    let silence = state.fleet.clone().map(|fleet| {
        let (st, stop) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || {
            plan::watch_silence(&*st.store, &fleet, &stop, SILENCE_CHECK);
        })
    });
    let app = app(&state, cfg.limits.max_body);
    listen::raise_open_files(cfg.conn.max_connections);
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(
        listen = %bound,
        tls = cfg.tls.is_some(),
        mutual_tls = state.mutual_tls,
        agent_tokens = state.tokens.is_some(),
        open_read = state.open_read,
        fleet = state.fleet.is_some(),
        "collector serving"
    );
    listen::serve(listener, app, cfg.tls, cfg.conn, conns, shutdown).await;
    stop.store(true, Ordering::Relaxed);
    for p in [&remote_write, &otlp].into_iter().flatten() {
        p.stop();
    }
    for p in pushers {
        let _ = p.join();
    }
    let _ = roller.join();
    if let Some(s) = silence {
        let _ = s.join();
    }
    Ok(())
}
