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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use http_body_util::LengthLimitError;
use pathprobe_proto::event::EventKind;
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::ingest::{Reason, Refused};
use pathprobe_proto::report::{Counters, EncodedReport};
use serde::Deserialize;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::store::{Selector, Store};
use crate::{Error, Result, compare};

/// Largest request body accepted.
pub const DEFAULT_MAX_BODY: usize = 16 << 20;

/// What one collector takes from the agents, so that no token holder can make it hold
/// more than these allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, in octets.
    pub max_body: usize,
    /// Most reports in one batch (an agent sends 100).
    pub max_batch: usize,
    /// Most batches decoded and stored at once; more get 503 and retry.
    pub max_concurrent_ingests: usize,
    /// Most paths one agent may have.
    pub max_paths_per_agent: u64,
    /// Most paths `/metrics` keeps series for; later ones are counted, not exported.
    pub max_metric_paths: usize,
    /// Oldest window start accepted, back from now: until retention sets it, the horizon
    /// of what the collector keeps.
    pub max_report_age: Duration,
    /// How long an admitted batch's body may take to arrive (16 MiB in a minute is about
    /// 2.2 Mbit/s); a slower one is refused, to retry, and gives its place back.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY,
            max_batch: 1_000,
            max_concurrent_ingests: 4,
            max_paths_per_agent: crate::store::DEFAULT_MAX_PATHS_PER_AGENT,
            max_metric_paths: 1_000,
            max_report_age: Duration::from_hours(30 * 24),
            body_timeout: Duration::from_mins(1),
        }
    }
}

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
    pub limits: Limits,
}

/// Classic Prometheus buckets for latency, in seconds.
const LATENCY_BUCKETS_S: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// A path's figures for `/metrics`: classic RTT buckets (a few hundred octets, where the
/// report's histogram is 230 KiB) and counters.
#[derive(Debug, Default, Clone)]
struct PathMetrics {
    labels: String,
    /// Samples at or below each of [`LATENCY_BUCKETS_S`].
    rtt_le: [u64; LATENCY_BUCKETS_S.len()],
    rtt_count: u64,
    /// Sum of the samples' bucket values (each within 0.1% of the sample), ns.
    rtt_sum_ns: u128,
    counters: Counters,
}

impl PathMetrics {
    /// Adds a report's counters and its RTT histogram blob (checked when it was read).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn add(&mut self, counters: &Counters, rtt_blob: Option<&[u8]>) {
        let _ = self.counters.merge(counters);
        let Some(blob) = rtt_blob else { return };
        let le_ns = LATENCY_BUCKETS_S.map(|le| (le * 1e9) as u64);
        let _ = hist::for_each_bucket(Metric::Rtt, blob, &mut |value, n| {
            for (i, &le) in le_ns.iter().enumerate() {
                if value <= le {
                    self.rtt_le[i] = self.rtt_le[i].saturating_add(n);
                }
            }
            self.rtt_count = self.rtt_count.saturating_add(n);
            self.rtt_sum_ns = self
                .rtt_sum_ns
                .saturating_add(u128::from(value) * u128::from(n));
        });
    }
}

#[derive(Debug, Default)]
struct Metrics {
    ingested: u64,
    duplicates: u64,
    rejected: BTreeMap<Reason, u64>,
    paths: BTreeMap<String, PathMetrics>,
    /// Reports of paths beyond `max_metric_paths`, left out of `/metrics`.
    paths_left_out: u64,
}

struct AppState {
    db: PathBuf,
    writer: Mutex<Store>,
    tokens: Option<Tokens>,
    limits: Limits,
    metrics: Mutex<Metrics>,
    ingests: Semaphore,
    /// Windows set aside by the rollup (and found at start).
    quarantined: std::sync::atomic::AtomicU64,
    /// Ingests waiting for the writer: the rollup steps aside for them between passes.
    waiting_writers: std::sync::atomic::AtomicUsize,
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
            None => Err(self.refuse(Refused::new(
                Reason::Unauthorized,
                "missing or unknown bearer token: send `Authorization: Bearer TOKEN` with the agent's token from the collector's tokens file",
            ))),
        }
    }

    /// Adds the reports of a stored batch to `/metrics`, keeping at most
    /// `max_metric_paths` label sets.
    fn record(&self, figures: Vec<(String, PathMetrics)>, accepted: u64, duplicates: u64) {
        let mut m = self.metrics.lock().unwrap_or_else(PoisonError::into_inner);
        m.ingested += accepted;
        m.duplicates += duplicates;
        for (key, figures) in figures {
            let full = m.paths.len() >= self.limits.max_metric_paths;
            match m.paths.get_mut(&key) {
                Some(p) => {
                    let _ = p.counters.merge(&figures.counters);
                    for (a, b) in p.rtt_le.iter_mut().zip(figures.rtt_le) {
                        *a = a.saturating_add(b);
                    }
                    p.rtt_count = p.rtt_count.saturating_add(figures.rtt_count);
                    p.rtt_sum_ns = p.rtt_sum_ns.saturating_add(figures.rtt_sum_ns);
                }
                None if full => m.paths_left_out += 1,
                None => {
                    m.paths.insert(key, figures);
                }
            }
        }
    }

    #[allow(clippy::result_large_err)]
    fn reader(&self) -> std::result::Result<Store, Response> {
        Store::open_read_only(&self.db)
            .map_err(|e| error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
    }
}

/// Admits at most `max_concurrent_ingests` batches at once, before their bodies are read,
/// so that memory is bounded by that many bodies. Only a token holder takes a place, and
/// only for as long as its body takes to arrive (`body_timeout`): a peer that sends a
/// request's head and then nothing cannot hold the places and stop every agent's ingest.
async fn ingest_gate(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let agent = match st.authorize(req.headers()) {
        Ok(agent) => agent,
        Err(refused) => return refused,
    };
    let Ok(_permit) = st.ingests.try_acquire() else {
        let limit = st.limits.max_concurrent_ingests;
        return st.refuse(
            Refused::new(
                Reason::Busy,
                format!("the collector is ingesting {limit} batches already (--max-concurrent-ingests): retry in a second"),
            )
            .limit(limit as u64),
        );
    };
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(Agent(agent));
    let max = st.limits.max_body;
    let within = st.limits.body_timeout;
    let body = match tokio::time::timeout(within, axum::body::to_bytes(body, max)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) if over_limit(&e) => {
            return st.refuse(
                Refused::new(
                    Reason::TooLarge,
                    format!("request body over {max} octets: send fewer reports per request"),
                )
                .limit(max as u64),
            );
        }
        Ok(Err(e)) => {
            return st.refuse(Refused::new(
                Reason::Unreadable,
                format!("cannot read the body: {e}"),
            ));
        }
        Err(_) => {
            let mut refused = Refused::new(
                Reason::Unreadable,
                format!(
                    "the request body did not arrive within {} (--body-timeout): send it at once, or fewer reports per request",
                    humantime::format_duration(within)
                ),
            );
            refused.retry = true;
            return st.refuse(refused);
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(body)))
        .await
}

/// A JSON array of reports, kept as borrowed raw text, refused past `max` elements
/// without reading further.
struct Batch<'a> {
    max: usize,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for Batch<'_> {
    type Value = Vec<&'de RawValue>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Batch<'_> {
    type Value = Vec<&'de RawValue>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of window reports")
    }
    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            if out.len() == self.max {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many reports"));
            }
            out.push(raw);
        }
        Ok(out)
    }
}

/// The `/metrics` key of a report's path.
fn metric_key(r: &EncodedReport) -> String {
    format!(
        "agent=\"{}\",site=\"{}\",path=\"{}\",kind=\"{}\"",
        r.agent_id,
        r.site.as_deref().unwrap_or(""),
        r.path.name,
        r.path.kind
    )
}

/// Reads, checks and stores one batch; runs on a blocking thread. Each report is checked
/// as it is read, on its encoded histograms; nothing is stored unless all pass.
fn ingest_batch(
    st: &AppState,
    body: &[u8],
    agent: Option<&str>,
) -> std::result::Result<
    (
        pathprobe_proto::ingest::Accepted,
        Vec<(String, PathMetrics)>,
    ),
    Refused,
> {
    let over = std::cell::Cell::new(false);
    let max = st.limits.max_batch;
    let mut de = serde_json::Deserializer::from_slice(body);
    let raws = Batch { max, over: &over }
        .deserialize(&mut de)
        .and_then(|r| de.end().map(|()| r))
        .map_err(|e| {
            if over.get() {
                Refused::new(
                    Reason::TooManyReports,
                    format!("more than {max} reports in one request: send at most {max} per batch"),
                )
                .limit(max as u64)
            } else {
                Refused::new(
                    Reason::Malformed,
                    format!("the body is not a JSON array of window reports: {e}"),
                )
            }
        })?;
    let now = now_ns();
    let age = u64::try_from(st.limits.max_report_age.as_nanos()).unwrap_or(u64::MAX);
    let earliest = now.saturating_sub(age);
    let mut reports = Vec::with_capacity(raws.len());
    for (i, raw) in raws.iter().enumerate() {
        let r = EncodedReport::from_json(raw.get().as_bytes()).map_err(|e| {
            let reason = if matches!(e, pathprobe_proto::Error::UnsupportedVersion { .. }) {
                Reason::Version
            } else {
                Reason::Malformed
            };
            Refused::new(reason, format!("report {i}: {e}")).at(i)
        })?;
        r.check_horizon(now, earliest)
            .map_err(|e| Refused::new(Reason::Horizon, format!("report {i}: {e}")).at(i))?;
        if let Some(agent) = agent
            && r.agent_id != agent
        {
            return Err(Refused::new(
                Reason::Forbidden,
                format!(
                    "report {i} is from agent `{}` but the token belongs to `{agent}`",
                    r.agent_id
                ),
            )
            .at(i));
        }
        reports.push(r);
    }
    st.waiting_writers.fetch_add(1, Ordering::SeqCst);
    let mut writer = st.writer.lock().unwrap_or_else(PoisonError::into_inner);
    st.waiting_writers.fetch_sub(1, Ordering::SeqCst);
    let stored = writer.ingest(&reports, now);
    drop(writer);
    let outcome = match stored {
        Ok(o) => o,
        Err(Error::TooManyPaths {
            index,
            agent,
            limit,
        }) => {
            let e = Error::TooManyPaths {
                index,
                agent,
                limit,
            };
            return Err(Refused::new(Reason::TooManyPaths, e.to_string())
                .at(index)
                .limit(limit));
        }
        Err(e) => {
            tracing::error!(error = %e, "ingest failed");
            return Err(Refused::new(Reason::Store, format!("{e}; retry later")));
        }
    };
    let mut figures: BTreeMap<String, PathMetrics> = BTreeMap::new();
    for r in &reports {
        let key = metric_key(r);
        let p = figures.entry(key.clone()).or_default();
        p.labels = key;
        p.add(
            &r.counters,
            r.histograms.get(&Metric::Rtt).map(|e| e.blob.as_slice()),
        );
    }
    Ok((outcome, figures.into_iter().collect()))
}

/// True when a body was cut at the size limit (the error `to_bytes` wraps).
fn over_limit(e: &axum::Error) -> bool {
    std::error::Error::source(e).is_some_and(<dyn std::error::Error>::is::<LengthLimitError>)
}

/// The agent the gate authorized for a batch (`None` without a tokens file).
#[derive(Debug, Clone)]
struct Agent(Option<String>);

/// A batch the gate admitted: authorized, and its whole body read within its limits.
async fn ingest(
    State(st): State<Arc<AppState>>,
    Extension(Agent(agent)): Extension<Agent>,
    body: Bytes,
) -> Response {
    let st2 = Arc::clone(&st);
    let done =
        tokio::task::spawn_blocking(move || ingest_batch(&st2, &body, agent.as_deref())).await;
    match done {
        Ok(Ok((outcome, figures))) => {
            st.record(figures, outcome.accepted, outcome.duplicates);
            (StatusCode::OK, axum::Json(outcome)).into_response()
        }
        Ok(Err(refused)) => st.refuse(refused),
        Err(e) => st.refuse(Refused::new(
            Reason::Store,
            format!("ingest task failed: {e}; retry later"),
        )),
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
    for p in m.paths.values().filter(|p| p.rtt_count > 0) {
        for (le, n) in LATENCY_BUCKETS_S.iter().zip(p.rtt_le) {
            let _ = writeln!(
                out,
                "pathprobe_rtt_seconds_bucket{{{},le=\"{le}\"}} {n}",
                p.labels
            );
        }
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_bucket{{{},le=\"+Inf\"}} {}",
            p.labels, p.rtt_count
        );
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_sum{{{}}} {}",
            p.labels,
            p.rtt_sum_ns as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "pathprobe_rtt_seconds_count{{{}}} {}",
            p.labels, p.rtt_count
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
fn exposition(m: &Metrics, store_bytes: u64, quarantined: u64) -> String {
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
        (
            "pathprobe_collector_windows_quarantined",
            "gauge",
            "Stored windows set aside because they cannot be merged (see the store's quarantine table).",
            quarantined,
        ),
        (
            "pathprobe_collector_metric_paths_left_out_total",
            "counter",
            "Reports of paths left out of these metrics because --max-metric-paths series are kept already.",
            m.paths_left_out,
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
    for reason in Reason::ALL {
        let n = m.rejected.get(&reason).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "pathprobe_collector_requests_rejected_total{{reason=\"{}\"}} {n}",
            reason.as_str()
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
        st.quarantined.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Runs the server until `shutdown` completes. The store is created if missing; a
/// background thread keeps the rollups current.
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut store = Store::open(&cfg.db)?;
    store.set_max_paths_per_agent(cfg.limits.max_paths_per_agent);
    let quarantined = store.quarantined()?;
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
        limits: cfg.limits,
        metrics: Mutex::new(Metrics::default()),
        ingests: Semaphore::new(cfg.limits.max_concurrent_ingests.max(1)),
        quarantined: std::sync::atomic::AtomicU64::new(quarantined),
        waiting_writers: std::sync::atomic::AtomicUsize::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let roller = {
        let (st, stop) = (Arc::clone(&state), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                while !stop.load(Ordering::Relaxed) {
                    if st.waiting_writers.load(Ordering::SeqCst) > 0 {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let rolled = {
                        let mut w = st.writer.lock().unwrap_or_else(PoisonError::into_inner);
                        let r = w.roll_up(ROLLUP_PASS);
                        if let Ok(q) = w.quarantined() {
                            st.quarantined.store(q, Ordering::Relaxed);
                        }
                        r
                    };
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
        .route(
            "/v1/reports",
            post(ingest).layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                ingest_gate,
            )),
        )
        .route("/v1/paths", get(paths))
        .route("/v1/compare", get(compare_handler))
        .route("/v1/histogram", get(histogram_handler))
        .route("/v1/events", get(events_handler))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(cfg.limits.max_body))
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
