//! `POST /v1/reports`: the gate (token, a place among the concurrent ingests, the body
//! within its size and time), then the batch read, checked report by report on its encoded
//! histograms, and stored whole or not at all. Every refusal is a typed
//! [`pathprobe_proto::ingest::Refused`].

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::LengthLimitError;
use pathprobe_proto::ingest::{Reason, Refused};
use pathprobe_proto::report::EncodedReport;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::auth::Sender;
use super::{AppState, now_ns};
use crate::Error;
use crate::totals::Contribution;

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

/// Admits at most `max_concurrent_ingests` batches at once, before their bodies are read,
/// so that memory is bounded by that many bodies. Only a token holder takes a place, and
/// only for as long as its body takes to arrive (`body_timeout`): a peer that sends a
/// request's head and then nothing cannot hold the places and stop every agent's ingest.
pub(super) async fn gate(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<super::listen::Peer>();
    let agent = match st.authorize_ingest(req.headers(), peer) {
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
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Batch<'_> {
    type Value = Vec<&'de RawValue>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of window reports")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
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

/// Reads, checks and stores one batch; runs on a blocking thread. Each report is checked
/// as it is read, on its encoded histograms; nothing is stored unless all pass.
fn ingest_batch(
    st: &AppState,
    body: &[u8],
    agent: &Sender,
) -> Result<pathprobe_proto::ingest::Accepted, Refused> {
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
        if !agent.may_send(&r.agent_id) {
            return Err(Refused::new(
                Reason::Forbidden,
                format!(
                    "report {i} is from agent `{}` but the sender is {}: an agent sends its own reports only",
                    r.agent_id,
                    agent.describe()
                ),
            )
            .at(i));
        }
        reports.push(r);
    }
    let stored = st.store.ingest(&reports, now);
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
    let fresh = outcome
        .fresh
        .iter()
        .filter_map(|&i| reports.get(i))
        .map(Contribution::of)
        .collect();
    st.record(fresh, outcome.accepted, outcome.duplicates);
    Ok(outcome.ack())
}

/// True when a body was cut at the size limit (the error `to_bytes` wraps).
fn over_limit(e: &axum::Error) -> bool {
    std::error::Error::source(e).is_some_and(<dyn std::error::Error>::is::<LengthLimitError>)
}

/// Who the gate authorized for a batch.
#[derive(Debug, Clone)]
pub(super) struct Agent(Sender);

/// A batch the gate admitted: authorized, and its whole body read within its limits.
pub(super) async fn ingest(
    State(st): State<Arc<AppState>>,
    Extension(Agent(agent)): Extension<Agent>,
    body: Bytes,
) -> Response {
    let st2 = Arc::clone(&st);
    let done = tokio::task::spawn_blocking(move || ingest_batch(&st2, &body, &agent)).await;
    match done {
        Ok(Ok(outcome)) => (StatusCode::OK, axum::Json(outcome)).into_response(),
        Ok(Err(refused)) => st.refuse(refused),
        Err(e) => st.refuse(Refused::new(
            Reason::Store,
            format!("ingest task failed: {e}; retry later"),
        )),
    }
}
