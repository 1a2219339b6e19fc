//! The fleet's plans, served: `GET /v1/plan` gives an agent (named by its token or client
//! certificate) its expanded plan, with an `ETag`, and `304 Not Modified` while it has not
//! changed. The fleet file is expanded once per load ([`crate::fleet`]), so a poll costs a
//! lookup; it is loaded again on `SIGHUP` and when it changes on disk. A file that does
//! not pass is not applied: the last good plans are served on, and the log and `/metrics`
//! say why.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::auth::Sender;
use crate::fleet::{self, Fleet};

/// The fleet file and what it expanded to.
#[derive(Debug)]
pub struct FleetState {
    path: PathBuf,
    fleet: RwLock<Arc<Fleet>>,
    /// Why the last reload was refused, while it is the last word.
    refused: Mutex<Option<String>>,
    modified: Mutex<Option<SystemTime>>,
    /// Per agent: when it last fetched (Unix ns) and the version it was given.
    fetched: Mutex<HashMap<String, (u64, String)>>,
    loads: Mutex<(u64, u64)>,
}

impl FleetState {
    /// Loads the fleet file; one that does not pass is an error (the collector does not
    /// start on it).
    pub fn load(path: PathBuf) -> crate::Result<Self> {
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let fleet = fleet::load(&path)
            .map_err(|e| crate::Error::Config(format!("the fleet file does not pass: {e}")))?;
        tracing::info!(fleet = %path.display(), agents = fleet.plans.len(), "fleet plan loaded");
        Ok(Self {
            path,
            fleet: RwLock::new(Arc::new(fleet)),
            refused: Mutex::new(None),
            modified: Mutex::new(modified),
            fetched: Mutex::new(HashMap::new()),
            loads: Mutex::new((1, 0)),
        })
    }

    /// The plans now.
    pub fn fleet(&self) -> Arc<Fleet> {
        Arc::clone(&self.fleet.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Loads the file again; a file that does not pass leaves the plans as they were.
    pub fn reload(&self, why: &str) {
        *self.modified.lock().unwrap_or_else(PoisonError::into_inner) =
            std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
        match fleet::load(&self.path) {
            Ok(new) => {
                let old = self.fleet();
                let changes = fleet::diff(&old, &new);
                tracing::info!(
                    fleet = %self.path.display(),
                    agents = new.plans.len(),
                    changed = changes.len(),
                    "{why}: fleet plan reloaded"
                );
                for c in &changes {
                    tracing::info!("fleet plan change: {c}");
                }
                *self.fleet.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
                *self.refused.lock().unwrap_or_else(PoisonError::into_inner) = None;
                self.loads.lock().unwrap_or_else(PoisonError::into_inner).0 += 1;
            }
            Err(e) => {
                tracing::error!(error = %e, "{why}: the fleet file does not pass: serving on the last good plan");
                *self.refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                self.loads.lock().unwrap_or_else(PoisonError::into_inner).1 += 1;
            }
        }
    }

    /// Loads the file again if it changed on disk since the last load.
    pub fn reload_if_changed(&self) {
        let now = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let before = *self.modified.lock().unwrap_or_else(PoisonError::into_inner);
        if now != before {
            self.reload("the fleet file changed");
        }
    }

    /// When each agent last fetched its plan (Unix ns), and which version.
    pub fn fetched(&self) -> HashMap<String, (u64, String)> {
        self.fetched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The fleet's lines of `/metrics`.
    pub fn exposition(&self, out: &mut String) {
        let (loads, refusals) = *self.loads.lock().unwrap_or_else(PoisonError::into_inner);
        let agents = self.fleet().plans.len();
        let _ = writeln!(
            out,
            "# HELP pathprobe_collector_fleet_agents Agents in the fleet plan served.\n# TYPE pathprobe_collector_fleet_agents gauge\npathprobe_collector_fleet_agents {agents}"
        );
        let _ = writeln!(
            out,
            "# HELP pathprobe_collector_fleet_loads_total Fleet file loads applied.\n# TYPE pathprobe_collector_fleet_loads_total counter\npathprobe_collector_fleet_loads_total {loads}"
        );
        let _ = writeln!(
            out,
            "# HELP pathprobe_collector_fleet_refusals_total Fleet file loads refused (the last good plan is served on).\n# TYPE pathprobe_collector_fleet_refusals_total counter\npathprobe_collector_fleet_refusals_total {refusals}"
        );
        let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writeln!(
            out,
            "# HELP pathprobe_collector_fleet_refused Whether the newest fleet file was refused, and why.\n# TYPE pathprobe_collector_fleet_refused gauge"
        );
        match refused.as_deref() {
            Some(why) => {
                let why = why
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', " ");
                let _ = writeln!(
                    out,
                    "pathprobe_collector_fleet_refused{{reason=\"{why}\"}} 1"
                );
            }
            None => {
                let _ = writeln!(out, "pathprobe_collector_fleet_refused 0");
            }
        }
    }
}

/// Watches for `SIGHUP` and for the file changing (checked every second), and reloads.
pub fn watch(state: Arc<FleetState>) {
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::spawn(async move {
        let mut hup = hup;
        loop {
            let signalled = tokio::select! {
                r = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => r.is_some(),
                () = tokio::time::sleep(Duration::from_secs(1)) => false,
            };
            let st = Arc::clone(&state);
            let _ = tokio::task::spawn_blocking(move || {
                if signalled {
                    st.reload("SIGHUP");
                } else {
                    st.reload_if_changed();
                }
            })
            .await;
        }
    });
}

#[derive(Debug, Deserialize)]
pub(super) struct PlanQuery {
    agent: Option<String>,
}

fn text(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// `GET /v1/plan`: the agent's plan, or 304 when its `If-None-Match` is the plan's `ETag`.
pub(super) async fn plan(
    State(st): State<Arc<AppState>>,
    Query(q): Query<PlanQuery>,
    req: axum::extract::Request,
) -> Response {
    let Some(fleet_state) = st.fleet.as_ref() else {
        return text(
            StatusCode::NOT_FOUND,
            "this collector serves no fleet plan: start it with --fleet FILE, or list the agent's paths in its agent.toml",
        );
    };
    let peer = req.extensions().get::<super::listen::Peer>();
    let sender = match st.authorize_ingest(req.headers(), peer) {
        Ok(s) => s,
        Err(refused) => return refused,
    };
    let fleet = fleet_state.fleet();
    let agent = match (&sender, q.agent) {
        (Sender::Anyone, Some(a)) => a,
        (Sender::Anyone, None) => {
            return text(
                StatusCode::BAD_REQUEST,
                "say which agent: ?agent=ID (this collector takes no tokens)",
            );
        }
        (Sender::Agents(ids), asked) => {
            let mine = ids
                .iter()
                .find(|i| asked.as_ref().is_none_or(|a| a == *i) && fleet.plans.contains_key(*i))
                .or_else(|| ids.iter().find(|i| asked.as_ref().is_none_or(|a| a == *i)));
            match mine {
                Some(a) => a.clone(),
                None => {
                    return text(
                        StatusCode::FORBIDDEN,
                        &format!(
                            "this token is {}'s, not the agent asked for",
                            sender.describe()
                        ),
                    );
                }
            }
        }
    };
    let Some(served) = fleet.plans.get(&agent) else {
        return text(
            StatusCode::NOT_FOUND,
            &format!(
                "agent {agent} is in no [[site]] of the fleet file: add it to its site's agents"
            ),
        );
    };
    fleet_state
        .fetched
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(agent, (super::now_ns(), served.plan.version.clone()));
    if if_none_match(req.headers()).is_some_and(|tag| tag == served.etag) {
        return (
            StatusCode::NOT_MODIFIED,
            [(header::ETAG, served.etag.clone())],
        )
            .into_response();
    }
    (
        StatusCode::OK,
        [
            (header::ETAG, served.etag.clone()),
            (header::CONTENT_TYPE, "application/json".to_string()),
        ],
        served.json.clone(),
    )
        .into_response()
}

fn if_none_match(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A plan path is silent after this many of its windows without a report.
pub const SILENT_WINDOWS: u64 = 3;

/// Time an agent is given to deliver its spool once the collector is up, before its paths
/// are judged silent.
const DELIVERY_GRACE_NS: u64 = 5_000_000_000;

/// A plan path's window, as its template gives it (10 s by default, as the agent's).
fn window_ns(p: &pathprobe_proto::plan::PathSection) -> u64 {
    p.window
        .as_deref()
        .and_then(|w| humantime::parse_duration(w).ok())
        .map_or(10_000_000_000, |d| {
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
        })
}

/// One agent as the collector sees it: its plan, when it fetched one, when it reported,
/// and the paths of its plan that do not report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentRow {
    pub agent_id: String,
    pub site: String,
    /// The version of the plan served to it now.
    pub plan_version: String,
    /// When it last fetched its plan (ns since 1970), and which version; `None` before
    /// it has since the collector started.
    pub fetched_ns: Option<u64>,
    pub fetched_version: Option<String>,
    /// The end of its newest stored window (ns since 1970).
    pub last_report_ns: Option<u64>,
    /// Paths in its plan.
    pub paths: usize,
    /// Paths of its plan with no report in their last 3 windows (or none ever).
    pub not_reporting: Vec<String>,
}

/// Per (agent, path name): the stored path's id and the end of its newest window.
fn last_reports(rows: &[crate::store::Latest]) -> HashMap<(&str, &str), (i64, u64)> {
    let mut last: HashMap<(&str, &str), (i64, u64)> = HashMap::new();
    for r in rows {
        let e = last
            .entry((r.agent_id.as_str(), r.name.as_str()))
            .or_insert((r.path_id, r.last_ns));
        if r.last_ns > e.1 {
            *e = (r.path_id, r.last_ns);
        }
    }
    last
}

/// Every agent of the fleet, at `now_ns`, from the stored paths `rows`.
pub fn agents(fleet: &FleetState, rows: &[crate::store::Latest], now_ns: u64) -> Vec<AgentRow> {
    let plans = fleet.fleet();
    let fetched = fleet.fetched();
    let last = last_reports(rows);
    let mut newest: HashMap<&str, u64> = HashMap::new();
    for r in rows {
        let e = newest.entry(r.agent_id.as_str()).or_insert(r.last_ns);
        *e = (*e).max(r.last_ns);
    }
    plans
        .plans
        .values()
        .map(|s| {
            let p = &s.plan;
            let f = fetched.get(&p.agent_id);
            let not_reporting = p
                .paths
                .iter()
                .filter(|path| {
                    last.get(&(p.agent_id.as_str(), path.name.as_str()))
                        .is_none_or(|(_, at)| {
                            now_ns.saturating_sub(*at) > SILENT_WINDOWS * window_ns(path)
                        })
                })
                .map(|path| path.name.clone())
                .collect();
            AgentRow {
                agent_id: p.agent_id.clone(),
                site: p.site.clone(),
                plan_version: p.version.clone(),
                fetched_ns: f.map(|f| f.0),
                fetched_version: f.map(|f| f.1.clone()),
                last_report_ns: newest.get(p.agent_id.as_str()).copied(),
                paths: p.paths.len(),
                not_reporting,
            }
        })
        .collect()
}

/// `GET /v1/agents`.
pub(super) async fn agents_list(State(st): State<Arc<AppState>>) -> Response {
    let Some(fleet_state) = st.fleet.clone() else {
        return text(
            StatusCode::NOT_FOUND,
            "this collector serves no fleet plan (start it with --fleet FILE): its agents are in GET /v1/paths",
        );
    };
    let store = Arc::clone(&st.store);
    match tokio::task::spawn_blocking(move || {
        store
            .latest()
            .map(|rows| agents(&fleet_state, &rows, super::now_ns()))
    })
    .await
    {
        Ok(Ok(list)) => axum::Json(list).into_response(),
        Ok(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// Raises `path_silent` when a plan path that has reported sends nothing for
/// [`SILENT_WINDOWS`] of its windows, and `path_resumed` when it reports again; looks
/// every `every` until `stop`. The events are stored against the path, dated by the
/// reports (so that a collector that restarts does not raise one twice).
pub fn watch_silence(
    store: &dyn crate::store::Store,
    fleet: &FleetState,
    stop: &std::sync::atomic::AtomicBool,
    every: Duration,
) {
    use pathprobe_proto::event::{EventKind, PathEvent};
    let mut silent = still_silent(store);
    let mut next = std::time::Instant::now();
    // Agents back from a collector outage deliver what they spooled: no path is judged
    // before its silence could be seen with the collector up.
    let up_since = super::now_ns();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if std::time::Instant::now() < next {
            continue;
        }
        next = std::time::Instant::now() + every;
        let Ok(rows) = store.latest() else { continue };
        let last = last_reports(&rows);
        let now = super::now_ns();
        let plans = fleet.fleet();
        for s in plans.plans.values() {
            for path in &s.plan.paths {
                let agent = s.plan.agent_id.as_str();
                let Some(&(id, at)) = last
                    .get(&(agent, path.name.as_str()))
                    .filter(|(_, at)| *at > 0)
                else {
                    continue;
                };
                let limit = SILENT_WINDOWS * window_ns(path);
                if now.saturating_sub(up_since) < limit + DELIVERY_GRACE_NS {
                    continue;
                }
                let key = (agent.to_string(), path.name.clone());
                let quiet = now.saturating_sub(at);
                let event = PathEvent::new;
                let raised = if quiet > limit && !silent.contains_key(&key) {
                    silent.insert(key, at + limit);
                    Some(event(
                        EventKind::PathSilent,
                        at + limit,
                        format!(
                            "agent {agent} path {}: no report for {SILENT_WINDOWS} windows ({} s): the agent, or its probing, stopped",
                            path.name,
                            limit / 1_000_000_000
                        ),
                    ))
                } else if quiet <= limit
                    && let Some(since) = silent.remove(&key)
                {
                    Some(event(
                        EventKind::PathResumed,
                        at,
                        format!(
                            "agent {agent} path {}: reports again, {} s after it went silent",
                            path.name,
                            at.saturating_sub(since) / 1_000_000_000
                        ),
                    ))
                } else {
                    None
                };
                if let Some(e) = raised {
                    tracing::warn!(agent, path = %path.name, kind = %e.kind, "{}", e.summary);
                    if let Err(err) = store.record_event(id, &e) {
                        tracing::error!(error = %err, "cannot store a {} event", e.kind);
                    }
                }
            }
        }
    }
}

/// The paths whose newest silence event is `path_silent` (an earlier run of the collector
/// raised it, and no `path_resumed` since), with when their silence began.
fn still_silent(store: &dyn crate::store::Store) -> HashMap<(String, String), u64> {
    use pathprobe_proto::event::EventKind;
    let all = crate::store::Selector {
        name_or_kind: String::new(),
        site: None,
    };
    let mut newest: HashMap<(String, String), (u64, EventKind)> = HashMap::new();
    for kind in [EventKind::PathSilent, EventKind::PathResumed] {
        let Ok(rows) = store.events(&all, 0, super::now_ns(), Some(kind), 100_000) else {
            continue;
        };
        for r in rows {
            let e = newest
                .entry((r.agent_id.clone(), r.path.clone()))
                .or_insert((r.event.at_unix_ns, kind));
            if r.event.at_unix_ns >= e.0 {
                *e = (r.event.at_unix_ns, kind);
            }
        }
    }
    newest
        .into_iter()
        .filter(|(_, (_, kind))| *kind == EventKind::PathSilent)
        .map(|(k, (at, _))| (k, at))
        .collect()
}
