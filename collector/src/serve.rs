//! `pathprobe-collector serve`: the HTTP side of the collector.
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/reports` | a JSON array of window reports; 200 `{"accepted","duplicates"}` once stored durably; 400 malformed (the message names the report and field), 401 no or unknown token, 403 a report of another agent, 413 too large, 503 store unavailable (retry) |
//! | `GET /v1/paths` | the paths known, with windows and time span |
//! | `GET /v1/compare?a=&b=&site=&since=|from=&to=` | side-by-side figures with difference and ratio, and both sides' events |
//! | `GET /v1/events?path=&site=&kind=&limit=&since=|from=&to=` | events (failovers, failbacks, outages, signature changes, DSCP re-marking) seen in the range, oldest first, each with its path; `path` is a name or kind, all paths without it |
//! | `GET /v1/histogram?path=&metric=&site=&since=|from=&to=&format=v2|log` | the merged histogram in HdrHistogram's formats |
//! | `GET /metrics` | Prometheus text exposition |
//!
//! A batch is accepted whole or not at all, so an agent that retries after any error can
//! never leave half a batch behind; a report already stored is acknowledged again and not
//! stored twice.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hdrhistogram::Histogram;
use pathprobe_proto::event::EventKind;
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::report::{Counters, WindowReport};
use serde::Deserialize;
use serde_json::json;

use crate::store::{Selector, Store};
use crate::{Error, Result, compare};

/// Largest request body accepted.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// Bearer tokens, one per agent.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, String>);

impl Tokens {
    /// Reads a tokens file: one `AGENT_ID TOKEN` pair per line; blank lines and lines
    /// starting with `#` are ignored. A bad line is named with its number.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                |reason: &str| Error::Config(format!("{}:{}: {reason}", path.display(), n + 1));
            let mut words = line.split_whitespace();
            let (Some(agent), Some(token), None) = (words.next(), words.next(), words.next())
            else {
                return Err(bad("expected `AGENT_ID TOKEN`"));
            };
            if token.len() < 16 {
                return Err(bad(
                    "the token is shorter than 16 characters: use a long random one",
                ));
            }
            if tokens
                .insert(token.to_string(), agent.to_string())
                .is_some()
            {
                return Err(bad("this token is already given to another agent"));
            }
        }
        if tokens.is_empty() {
            return Err(Error::Config(format!(
                "{}: no tokens in the file",
                path.display()
            )));
        }
        Ok(Self(tokens))
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub db: PathBuf,
    /// `None` accepts reports from anyone (for a lab on loopback).
    pub tokens: Option<Tokens>,
    pub max_body: usize,
}

#[derive(Debug, Default)]
struct PathMetrics {
    labels: String,
    rtt: Option<Histogram<u64>>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Metrics {
    ingested: u64,
    duplicates: u64,
    rejected: BTreeMap<&'static str, u64>,
    paths: BTreeMap<String, PathMetrics>,
}

struct AppState {
    db: PathBuf,
    writer: Mutex<Store>,
    tokens: Option<Tokens>,
    max_body: usize,
    metrics: Mutex<Metrics>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

impl AppState {
    fn reject(&self, reason: &'static str, status: StatusCode, message: String) -> Response {
        *self
            .metrics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .rejected
            .entry(reason)
            .or_default() += 1;
        error(status, message)
    }

    /// The agent the request's bearer token belongs to (`None` without a tokens file).
    #[allow(clippy::result_large_err)]
    fn authorize(&self, headers: &HeaderMap) -> std::result::Result<Option<String>, Response> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented.and_then(|t| tokens.0.get(t.trim())) {
            Some(agent) => Ok(Some(agent.clone())),
            None => Err(self.reject(
                "unauthorized",
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token: send `Authorization: Bearer TOKEN` with the agent's token from the collector's tokens file".to_string(),
            )),
        }
    }

    fn record(&self, reports: &[WindowReport], accepted: u64, duplicates: u64) {
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.ingested += accepted;
        m.duplicates += duplicates;
        for r in reports {
            let key = format!(
                "agent=\"{}\",site=\"{}\",path=\"{}\",kind=\"{}\"",
                r.agent_id,
                r.site.as_deref().unwrap_or(""),
                r.path.name,
                r.path.kind
            );
            let p = m.paths.entry(key.clone()).or_default();
            p.labels = key;
            let _ = p.counters.merge(&r.counters);
            if let Some(h) = r.histograms.get(&Metric::Rtt) {
                let into = p.rtt.get_or_insert_with(|| Metric::Rtt.new_histogram());
                let _ = hist::merge(Metric::Rtt, into, h);
            }
        }
    }

    #[allow(clippy::result_large_err)]
    fn reader(&self) -> std::result::Result<Store, Response> {
        Store::open_read_only(&self.db)
            .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    }
}

async fn ingest(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let agent = match st.authorize(&headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return st.reject(
                "too_large",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body over {} octets: send fewer reports per request",
                    st.max_body
                ),
            );
        }
        Err(e) => {
            return st.reject(
                "unreadable",
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            );
        }
    };
    let raws: Vec<Box<serde_json::value::RawValue>> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return st.reject(
                "malformed",
                StatusCode::BAD_REQUEST,
                format!("the body is not a JSON array of window reports: {e}"),
            );
        }
    };
    let mut reports = Vec::with_capacity(raws.len());
    for (i, raw) in raws.iter().enumerate() {
        match WindowReport::from_json(raw.get().as_bytes()) {
            Ok(r) => reports.push(r),
            Err(e) => {
                let reason = if matches!(e, pathprobe_proto::Error::UnsupportedVersion { .. }) {
                    "version"
                } else {
                    "malformed"
                };
                return st.reject(reason, StatusCode::BAD_REQUEST, format!("report {i}: {e}"));
            }
        }
    }
    if let Some(agent) = &agent
        && let Some((i, r)) = reports
            .iter()
            .enumerate()
            .find(|(_, r)| r.agent_id != *agent)
    {
        return st.reject(
            "forbidden",
            StatusCode::FORBIDDEN,
            format!(
                "report {i} is from agent `{}` but the token belongs to `{agent}`",
                r.agent_id
            ),
        );
    }
    let st2 = Arc::clone(&st);
    let stored = tokio::task::spawn_blocking(move || {
        let result = st2
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ingest(&reports, now_ns());
        (result, reports)
    })
    .await;
    match stored {
        Ok((Ok(outcome), reports)) => {
            st.record(&reports, outcome.accepted, outcome.duplicates);
            (StatusCode::OK, axum::Json(outcome)).into_response()
        }
        Ok((Err(e), _)) => {
            tracing::error!(error = %e, "ingest failed");
            st.reject(
                "store",
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; retry later"),
            )
        }
        Err(e) => st.reject(
            "store",
            StatusCode::SERVICE_UNAVAILABLE,
            format!("ingest task failed: {e}; retry later"),
        ),
    }
}

async fn paths(State(st): State<Arc<AppState>>) -> Response {
    let store = match st.reader() {
        Ok(s) => s,
        Err(r) => return r,
    };
    match store.paths() {
        Ok(p) => axum::Json(p).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// The time range of a question: `since` (a duration back from now) or `from` and `to`
/// (RFC 3339 or Unix seconds; `to` defaults to now).
#[derive(Debug, Deserialize)]
struct RangeQuery {
    since: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

impl RangeQuery {
    /// The range in Unix nanoseconds, or a 400 that says what is wrong with it.
    #[allow(clippy::result_large_err)]
    fn resolve(&self) -> std::result::Result<(u64, u64), Response> {
        crate::time_range(
            self.since.as_deref(),
            self.from.as_deref(),
            self.to.as_deref(),
            now_ns(),
        )
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))
    }
}

#[derive(Debug, Deserialize)]
struct CompareQuery {
    a: String,
    b: String,
    site: Option<String>,
    #[serde(flatten)]
    range: RangeQuery,
}

async fn compare_handler(
    State(st): State<Arc<AppState>>,
    Query(q): Query<CompareQuery>,
) -> Response {
    let (from, to) = match q.range.resolve() {
        Ok(r) => r,
        Err(r) => return r,
    };
    let store = match st.reader() {
        Ok(s) => s,
        Err(r) => return r,
    };
    let a = Selector {
        name_or_kind: q.a,
        site: q.site.clone(),
    };
    let b = Selector {
        name_or_kind: q.b,
        site: q.site,
    };
    let result =
        tokio::task::spawn_blocking(move || compare::compare(&store, &a, &b, from, to)).await;
    match result {
        Ok(Ok(c)) => axum::Json(c).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct HistogramQuery {
    path: String,
    metric: String,
    site: Option<String>,
    format: Option<String>,
    #[serde(flatten)]
    range: RangeQuery,
}

async fn histogram_handler(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HistogramQuery>,
) -> Response {
    let (from, to) = match q.range.resolve() {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(metric) = Metric::from_key(&q.metric) else {
        let known: Vec<_> = Metric::ALL.iter().map(|m| m.key()).collect();
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown metric `{}`: use one of {}",
                q.metric,
                known.join(", ")
            ),
        );
    };
    let store = match st.reader() {
        Ok(s) => s,
        Err(r) => return r,
    };
    let sel = Selector {
        name_or_kind: q.path,
        site: q.site,
    };
    let format = q.format.unwrap_or_else(|| "v2".to_string());
    let result = tokio::task::spawn_blocking(move || {
        crate::export::histogram(&store, &sel, metric, from, to, &format)
    })
    .await;
    match result {
        Ok(Ok(text)) => {
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
        }
        Ok(Err(Error::Config(e))) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Most events `/v1/events` returns by default, and at most.
const EVENTS_DEFAULT_LIMIT: usize = 1_000;
const EVENTS_MAX_LIMIT: usize = 100_000;

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// A path name or kind; all paths without it.
    path: Option<String>,
    site: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
    #[serde(flatten)]
    range: RangeQuery,
}

async fn events_handler(State(st): State<Arc<AppState>>, Query(q): Query<EventsQuery>) -> Response {
    let (from, to) = match q.range.resolve() {
        Ok(r) => r,
        Err(r) => return r,
    };
    let kind = match q.kind.as_deref().map(str::parse::<EventKind>).transpose() {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = q.limit.unwrap_or(EVENTS_DEFAULT_LIMIT);
    if limit == 0 || limit > EVENTS_MAX_LIMIT {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit {limit} is out of range: use 1 to {EVENTS_MAX_LIMIT}"),
        );
    }
    let store = match st.reader() {
        Ok(s) => s,
        Err(r) => return r,
    };
    let sel = Selector {
        name_or_kind: q.path.unwrap_or_default(),
        site: q.site,
    };
    let result =
        tokio::task::spawn_blocking(move || store.events(&sel, from, to, kind, limit)).await;
    match result {
        Ok(Ok(events)) => axum::Json(events).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Classic Prometheus buckets for latency, in seconds.
const LATENCY_BUCKETS_S: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// A per-path gauge: name, help, value.
type Gauge = (&'static str, &'static str, fn(&Counters) -> Option<f64>);
/// A per-path counter: what, value.
type CounterFigure = (&'static str, fn(&Counters) -> u64);

#[allow(clippy::cast_precision_loss)] // ratios for Prometheus
const GAUGES: [Gauge; 2] = [
    (
        "pathprobe_loss_ratio",
        "Probes lost over probes whose fate is known.",
        |c| {
            let known = c.received + c.lost;
            (known > 0).then(|| c.lost as f64 / known as f64)
        },
    ),
    (
        "pathprobe_reorder_ratio",
        "Replies reordered over replies received.",
        |c| (c.received > 0).then(|| c.reordered as f64 / c.received as f64),
    ),
];

const COUNTERS: [CounterFigure; 6] = [
    ("sent", |c| c.sent),
    ("received", |c| c.received),
    ("lost", |c| c.lost),
    ("duplicated", |c| c.duplicated),
    ("reordered", |c| c.reordered),
    ("late", |c| c.late),
];

/// Per-path series: the RTT histogram in classic buckets, ratios and counters.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn path_series(out: &mut String, m: &Metrics) {
    let _ = writeln!(
        out,
        "# HELP pathprobe_rtt_seconds Probe round-trip time, from the reports received since the collector started."
    );
    let _ = writeln!(out, "# TYPE pathprobe_rtt_seconds histogram");
    for p in m.paths.values() {
        let Some(h) = &p.rtt else { continue };
        for le in LATENCY_BUCKETS_S {
            let n = h.count_between(0, (le * 1e9) as u64);
            let _ = writeln!(
                out,
                "pathprobe_rtt_seconds_bucket{{{},le=\"{le}\"}} {n}",
                p.labels
            );
        }
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_bucket{{{},le=\"+Inf\"}} {}",
            p.labels,
            h.len()
        );
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_sum{{{}}} {}",
            p.labels,
            h.mean() * h.len() as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_count{{{}}} {}",
            p.labels,
            h.len()
        );
    }
    for (name, help, f) in GAUGES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in m.paths.values() {
            if let Some(v) = f(&p.counters) {
                let _ = writeln!(out, "{name}{{{}}} {v}", p.labels);
            }
        }
    }
    for (what, f) in COUNTERS {
        let name = format!("pathprobe_probes_{what}_total");
        let _ = writeln!(
            out,
            "# HELP {name} Probes {what}, from the reports received since the collector started.\n# TYPE {name} counter"
        );
        for p in m.paths.values() {
            let _ = writeln!(out, "{name}{{{}}} {}", p.labels, f(&p.counters));
        }
    }
}

/// The whole exposition: per-path series, then the collector's own health.
fn exposition(m: &Metrics, store_bytes: u64) -> String {
    let mut out = String::new();
    path_series(&mut out, m);
    for (name, kind, help, value) in [
        (
            "pathprobe_collector_reports_ingested_total",
            "counter",
            "Reports stored.",
            m.ingested,
        ),
        (
            "pathprobe_collector_reports_duplicate_total",
            "counter",
            "Reports received again and ignored.",
            m.duplicates,
        ),
        (
            "pathprobe_collector_store_bytes",
            "gauge",
            "Size of the store's files.",
            store_bytes,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP pathprobe_collector_requests_rejected_total Report requests refused, by reason.\n# TYPE pathprobe_collector_requests_rejected_total counter"
    );
    for reason in [
        "unauthorized",
        "forbidden",
        "too_large",
        "unreadable",
        "malformed",
        "version",
        "store",
    ] {
        let n = m.rejected.get(reason).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "pathprobe_collector_requests_rejected_total{{reason=\"{reason}\"}} {n}"
        );
    }
    out
}

fn store_bytes(db: &Path) -> u64 {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|ext| std::fs::metadata(format!("{}{ext}", db.display())).ok())
        .map(|m| m.len())
        .sum()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = exposition(
        &st.metrics.lock().unwrap_or_else(PoisonError::into_inner),
        store_bytes(&st.db),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Runs the server until `shutdown` completes. The store is created if missing; a
/// background thread keeps the rollups current.
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = Store::open(&cfg.db)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: cfg.listen,
            source,
        })?;
    let state = Arc::new(AppState {
        db: cfg.db.clone(),
        writer: Mutex::new(store),
        tokens: cfg.tokens,
        max_body: cfg.max_body,
        metrics: Mutex::new(Metrics::default()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let roller = {
        let (st, stop) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                loop {
                    let rolled = st
                        .writer
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .roll_up(2_000);
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
        })
    };
    let app = Router::new()
        .route("/v1/reports", post(ingest))
        .route("/v1/paths", get(paths))
        .route("/v1/compare", get(compare_handler))
        .route("/v1/histogram", get(histogram_handler))
        .route("/v1/events", get(events_handler))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(cfg.max_body))
        .with_state(Arc::clone(&state));
    let bound = listener.local_addr().unwrap_or(cfg.listen);
    tracing::info!(listen = %bound, db = %cfg.db.display(), auth = state.tokens.is_some(), "collector serving");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    stop.store(true, Ordering::Relaxed);
    let _ = roller.join();
    served.map_err(|source| Error::Bind {
        addr: cfg.listen,
        source,
    })
}
