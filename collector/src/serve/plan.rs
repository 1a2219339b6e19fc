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
