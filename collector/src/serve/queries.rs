//! The questions: `/v1/paths`, `/v1/compare`, `/v1/histogram`, `/v1/events`, and the
//! dashboard's `/v1/series`, `/v1/cdf`, `/v1/heatmap` and `/v1/grid` ([`crate::dash`]), each
//! answered from the [`crate::store::Store`] on a query thread ([`super::pool`]), within
//! the query limits: the range (`--max-query-range`), `limit=`, a place among
//! `--max-concurrent-queries` and `--query-timeout`; each refusal is a clear 400 or 503
//! (with `Retry-After`), counted in `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use pathprobe_proto::event::EventKind;
use pathprobe_proto::hist::Metric;
use serde::Deserialize;

use super::pool::{Outcome, QueryRefusal};
use super::{AppState, error, now_ns};
use crate::store::Selector;
use crate::{Error, compare, dash};

/// Runs `work` on a query thread and answers with `ok` of its result; a store error is a
/// 503, a bad question (`Error::Config`) a 400, no free place or no answer in time a 503
/// with `Retry-After`.
async fn answer<T: Send + 'static>(
    st: &AppState,
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    let retry = |message: String| {
        let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        r
    };
    let limits = st.queries.limits;
    match st.queries.run(work).await {
        Outcome::Done(Ok(v)) => ok(v),
        Outcome::Done(Err(Error::Config(e))) => error(StatusCode::BAD_REQUEST, e),
        Outcome::Done(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Outcome::Busy => retry(format!(
            "{} queries are being answered already (--max-concurrent-queries): retry in a few seconds",
            limits.max_concurrent
        )),
        Outcome::TimedOut => retry(format!(
            "the query was not answered within {} (--query-timeout): ask for a shorter range or fewer paths, or retry later",
            humantime::format_duration(limits.timeout)
        )),
    }
}

pub(super) async fn paths(State(st): State<Arc<AppState>>) -> Response {
    let store = Arc::clone(&st.store);
    answer(
        &st,
        move || store.paths(),
        |p| axum::Json(p).into_response(),
    )
    .await
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
    /// The range in Unix nanoseconds, or a 400 that says what is wrong with it (a range
    /// longer than `--max-query-range` among them).
    #[allow(clippy::result_large_err)]
    fn resolve(&self, st: &AppState) -> Result<(u64, u64), Response> {
        let (from, to) = crate::time_range(
            self.since.as_deref(),
            self.from.as_deref(),
            self.to.as_deref(),
            now_ns(),
        )
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
        let max = st.queries.limits.max_range;
        if Duration::from_nanos(to.saturating_sub(from)) > max {
            st.queries.count(QueryRefusal::Range);
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the range is longer than {} (--max-query-range): ask for a shorter one",
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok((from, to))
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
    let (from, to) = match q.range.resolve(&st) {
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
    answer(
        &st,
        move || compare::compare(&*store, &a, &b, from, to),
        |c| axum::Json(c).into_response(),
    )
    .await
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
    let (from, to) = match q.range.resolve(&st) {
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
    answer(
        &st,
        move || crate::export::histogram(&*store, &sel, metric, from, to, &format),
        |text| ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
    )
    .await
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
    let (from, to) = match q.range.resolve(&st) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let kind = match q.kind.as_deref().map(str::parse::<EventKind>).transpose() {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = q.limit.unwrap_or(EVENTS_DEFAULT_LIMIT);
    if limit == 0 || limit > EVENTS_MAX_LIMIT {
        st.queries.count(QueryRefusal::Limit);
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
    answer(
        &st,
        move || store.events(&sel, from, to, kind, limit),
        |events| axum::Json(events).into_response(),
    )
    .await
}

/// A dashboard question: a path name or kind, a site, a range, and how finely to cut it.
#[derive(Debug, Deserialize)]
pub(super) struct DashQuery {
    path: String,
    site: Option<String>,
    columns: Option<usize>,
    bins: Option<usize>,
    #[serde(flatten)]
    range: RangeQuery,
}

impl DashQuery {
    fn selector(&self) -> Selector {
        Selector {
            name_or_kind: self.path.clone(),
            site: self.site.clone(),
        }
    }
}

/// Answers a dashboard question with `work` over the store, the selector, the range and
/// the question.
async fn dash_answer<T: serde::Serialize + Send + 'static>(
    st: &AppState,
    q: DashQuery,
    work: impl FnOnce(&dyn crate::store::Store, &Selector, u64, u64, &DashQuery) -> crate::Result<T>
    + Send
    + 'static,
) -> Response {
    let (from, to) = match q.range.resolve(st) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let (store, sel) = (Arc::clone(&st.store), q.selector());
    answer(
        st,
        move || work(&*store, &sel, from, to, &q),
        |v| axum::Json(v).into_response(),
    )
    .await
}

pub(super) async fn series(
    State(st): State<Arc<AppState>>,
    Query(q): Query<DashQuery>,
) -> Response {
    dash_answer(&st, q, |store, sel, from, to, q| {
        dash::series(
            store,
            sel,
            from,
            to,
            q.columns.unwrap_or(dash::DEFAULT_COLUMNS),
        )
    })
    .await
}

pub(super) async fn cdf(State(st): State<Arc<AppState>>, Query(q): Query<DashQuery>) -> Response {
    dash_answer(&st, q, |store, sel, from, to, _| {
        dash::cdf(store, sel, from, to)
    })
    .await
}

pub(super) async fn heatmap(
    State(st): State<Arc<AppState>>,
    Query(q): Query<DashQuery>,
) -> Response {
    dash_answer(&st, q, |store, sel, from, to, q| {
        let columns = q.columns.unwrap_or(dash::DEFAULT_COLUMNS);
        dash::heatmap(
            store,
            sel,
            from,
            to,
            columns,
            q.bins.unwrap_or(dash::DEFAULT_BINS),
        )
    })
    .await
}

/// The fleet grid's range: 15 minutes back unless asked.
#[derive(Debug, Deserialize)]
pub(super) struct GridQuery {
    #[serde(flatten)]
    range: RangeQuery,
}

pub(super) async fn grid(State(st): State<Arc<AppState>>, Query(q): Query<GridQuery>) -> Response {
    let mut range = q.range;
    if range.since.is_none() && range.from.is_none() {
        range.since = Some("15m".to_string());
    }
    let (from, to) = match range.resolve(&st) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let (store, rule) = (Arc::clone(&st.store), st.grid.clone());
    answer(
        &st,
        move || dash::grid(&*store, from, to, now_ns(), &rule),
        |g| axum::Json(g).into_response(),
    )
    .await
}
