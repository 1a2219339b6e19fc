//! The questions: `/v1/paths`, `/v1/compare`, `/v1/histogram` and `/v1/events`, each
//! answered from the [`crate::store::Store`] on a blocking thread.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use pathprobe_proto::event::EventKind;
use pathprobe_proto::hist::Metric;
use serde::Deserialize;

use super::{AppState, error, now_ns};
use crate::store::Selector;
use crate::{Error, compare};

pub(super) async fn paths(State(st): State<Arc<AppState>>) -> Response {
    let store = Arc::clone(&st.store);
    match tokio::task::spawn_blocking(move || store.paths())
        .await
        .map_err(|e| Error::Config(e.to_string()))
        .and_then(|r| r)
    {
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
    fn resolve(&self) -> Result<(u64, u64), Response> {
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
pub(super) struct CompareQuery {
    a: String,
    b: String,
    site: Option<String>,
    #[serde(flatten)]
    range: RangeQuery,
}

pub(super) async fn compare(
    State(st): State<Arc<AppState>>,
    Query(q): Query<CompareQuery>,
) -> Response {
    let (from, to) = match q.range.resolve() {
        Ok(r) => r,
        Err(r) => return r,
    };
    let store = Arc::clone(&st.store);
    let a = Selector {
        name_or_kind: q.a,
        site: q.site.clone(),
    };
    let b = Selector {
        name_or_kind: q.b,
        site: q.site,
    };
    let result =
        tokio::task::spawn_blocking(move || compare::compare(&*store, &a, &b, from, to)).await;
    match result {
        Ok(Ok(c)) => axum::Json(c).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct HistogramQuery {
    path: String,
    metric: String,
    site: Option<String>,
    format: Option<String>,
    #[serde(flatten)]
    range: RangeQuery,
}

pub(super) async fn histogram(
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
    let store = Arc::clone(&st.store);
    let sel = Selector {
        name_or_kind: q.path,
        site: q.site,
    };
    let format = q.format.unwrap_or_else(|| "v2".to_string());
    let result = tokio::task::spawn_blocking(move || {
        crate::export::histogram(&*store, &sel, metric, from, to, &format)
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
pub(super) struct EventsQuery {
    /// A path name or kind; all paths without it.
    path: Option<String>,
    site: Option<String>,
    kind: Option<String>,
    limit: Option<usize>,
    #[serde(flatten)]
    range: RangeQuery,
}

pub(super) async fn events(
    State(st): State<Arc<AppState>>,
    Query(q): Query<EventsQuery>,
) -> Response {
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
    let store = Arc::clone(&st.store);
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
