//! `pathprobe-collector serve`: the HTTP side of the collector.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/reports` | a JSON array of window reports; 200 `{"accepted","duplicates"}` once stored durably; any refusal is `pathprobe_proto::ingest::Refused` (`error`, `reason`, `index` of the report, `limit`, `retry`): 400 malformed or outside the horizon, 401 no or unknown token, 403 a report of another agent, 413 body or batch too large, 422 one path too many for the agent, 503 busy or store unavailable (retry) |
//! | `GET /v1/paths` | the paths known, with windows and time span |
//! | `GET /v1/compare?a=&b=&site=&since=|from=&to=` | side-by-side figures with difference and ratio, and both sides' events |
//! | `GET /v1/events?path=&site=&kind=&limit=&since=|from=&to=` | events (failovers, failbacks, outages, signature changes, DSCP re-marking) seen in the range, oldest first, each with its path; `path` is a name or kind, all paths without it |
//! | `GET /v1/histogram?path=&metric=&site=&since=|from=&to=&format=v2|log` | the merged histogram in HdrHistogram's formats |
//! | `GET /metrics` | Prometheus text exposition |
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
//! The server is split by concern: [`auth`] (tokens), [`ingest`] (the gate, the limits,
//! reading and storing a batch), [`queries`] (paths, compare, histogram, events) and
//! [`metrics`] (`/metrics`). It holds its [`Store`] as a trait object: SQLite today
//! ([`serve`]), any backend through [`serve_store`].

mod auth;
mod ingest;
mod metrics;
mod queries;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pathprobe_proto::ingest::{Reason, Refused};
use serde_json::json;
use tokio::sync::Semaphore;

pub use auth::Tokens;
pub use ingest::{DEFAULT_MAX_BODY, Limits};

use crate::store::{SqliteStore, Store};
use crate::{Error, Result};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub db: PathBuf,
    /// `None` accepts reports from anyone (for a lab on loopback).
    pub tokens: Option<Tokens>,
    pub limits: Limits,
}

struct AppState {
    store: Arc<dyn Store>,
    tokens: Option<Tokens>,
    limits: Limits,
    metrics: Mutex<metrics::Metrics>,
    ingests: Semaphore,
    /// Windows set aside by the rollup (and found at start).
    quarantined: AtomicU64,
}

/// Windows one rollup pass takes while holding the writer: small, so that an ingest never
/// waits long behind the rollup.
const ROLLUP_PASS: usize = 200;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

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
    let store = SqliteStore::open(&cfg.db, cfg.limits.max_paths_per_agent)?;
    tracing::info!(db = %cfg.db.display(), "store opened");
    serve_store(
        Arc::new(store),
        cfg.listen,
        cfg.tokens,
        cfg.limits,
        shutdown,
    )
    .await
}

/// Serves `store` on `listen` until `shutdown`, with a rollup thread beside it.
pub async fn serve_store(
    store: Arc<dyn Store>,
    listen: SocketAddr,
    tokens: Option<Tokens>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let quarantined = store.quarantined()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Bind {
            addr: listen,
            source,
        })?;
    let state = Arc::new(AppState {
        store,
        tokens,
        limits,
        metrics: Mutex::new(metrics::Metrics::default()),
        ingests: Semaphore::new(limits.max_concurrent_ingests.max(1)),
        quarantined: AtomicU64::new(quarantined),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let roller = {
        let (st, stop) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || roll_up(&st, &stop))
    };
    let app = Router::new()
        .route(
            "/v1/reports",
            post(ingest::ingest).layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                ingest::gate,
            )),
        )
        .route("/v1/paths", get(queries::paths))
        .route("/v1/compare", get(queries::compare))
        .route("/v1/histogram", get(queries::histogram))
        .route("/v1/events", get(queries::events))
        .route("/metrics", get(metrics::metrics))
        .layer(DefaultBodyLimit::max(limits.max_body))
        .with_state(Arc::clone(&state));
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %bound, auth = state.tokens.is_some(), "collector serving");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    stop.store(true, Ordering::Relaxed);
    let _ = roller.join();
    served.map_err(|source| Error::Bind {
        addr: listen,
        source,
    })
}
