//! Following the collector's fleet plan: `GET /v1/plan` polled with the `ETag` of the plan
//! in hand (a `304` costs the collector a lookup), and the last plan cached on disk beside
//! the spool, so the agent starts, and keeps measuring, on it while the collector is away.
//!
//! How a fleet plan and the local agent.toml layer ([`crate::plan::AgentPlan::with_fleet`]):
//! the fleet plan gives the paths, the drills, the reflector and the site; the local file
//! gives the agent id and the collector, and may add paths and drills. A local `[[path]]`
//! or `[[drill]]` with the name of a fleet one replaces it whole, and a local `[reflector]`
//! or `site` replaces the fleet's: the local file wins, name by name, and the log says so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pathprobe_proto::client;
use pathprobe_proto::plan::FleetPlan;

use crate::delivery::Destination;
use crate::{Error, Result};

/// How often the plan is asked for by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(30);

/// The plan's cache file in the spool folder (not a report: its name is no number).
pub fn cache_file(spool_dir: &Path) -> PathBuf {
    spool_dir.join("fleet-plan.json")
}

/// What a poll found.
#[derive(Debug)]
pub enum Polled {
    /// The plan in hand is the collector's.
    Unchanged,
    /// A new plan (already cached).
    New(Box<FleetPlan>),
    /// The collector could not be asked, or refused: the plan in hand stays.
    Failed(String),
}

/// The agent's side of `GET /v1/plan`.
#[derive(Debug)]
pub struct PlanSource {
    url: String,
    token: Option<String>,
    http: ureq::Agent,
    cache: PathBuf,
    agent_id: String,
    etag: Option<String>,
}

impl PlanSource {
    /// A source of `agent_id`'s plan from the collector `to` goes to.
    pub fn new(to: &Destination, agent_id: &str) -> Result<Self> {
        Ok(Self {
            url: format!("{}/v1/plan", to.url.trim_end_matches('/')),
            token: to.token.clone(),
            http: to
                .tls
                .agent(&to.url, Duration::from_secs(15))
                .map_err(Error::Config)?,
            cache: cache_file(&to.spool_dir),
            agent_id: agent_id.to_string(),
            etag: None,
        })
    }

    /// The cached plan, if there is one of this agent's (its `ETag` then becomes the one
    /// asked with).
    pub fn cached(&mut self) -> Option<FleetPlan> {
        let bytes = std::fs::read(&self.cache).ok()?;
        match serde_json::from_slice::<FleetPlan>(&bytes) {
            Ok(p) if p.agent_id == self.agent_id => {
                self.etag = Some(format!("\"{}\"", p.version));
                Some(p)
            }
            Ok(p) => {
                tracing::warn!(cache = %self.cache.display(), cached_for = %p.agent_id, "the cached fleet plan is another agent's: not used");
                None
            }
            Err(e) => {
                tracing::warn!(cache = %self.cache.display(), error = %e, "the cached fleet plan does not read: not used");
                None
            }
        }
    }

    /// Asks the collector once.
    pub fn poll(&mut self) -> Polled {
        let mut req = self.http.get(&self.url).query("agent", &self.agent_id);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        if let Some(tag) = &self.etag {
            req = req.header("If-None-Match", tag);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::StatusCode(code)) => {
                return Polled::Failed(format!("HTTP {code} from {}", self.url));
            }
            Err(e) => return Polled::Failed(client::explain(&e, &self.url)),
        };
        let status = resp.status().as_u16();
        if status == 304 {
            return Polled::Unchanged;
        }
        let body = resp.into_body().read_to_vec().unwrap_or_default();
        if status != 200 {
            return Polled::Failed(format!(
                "HTTP {status} from {}: {}",
                self.url,
                String::from_utf8_lossy(&body).trim()
            ));
        }
        let plan: FleetPlan = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return Polled::Failed(format!(
                    "the plan from {} does not read ({e}): is the collector the same version?",
                    self.url
                ));
            }
        };
        if plan.agent_id != self.agent_id {
            return Polled::Failed(format!(
                "the collector sent agent {}'s plan to agent {}: check the token",
                plan.agent_id, self.agent_id
            ));
        }
        // Cached before it is used: a restart comes up on the plan it ran.
        let tmp = self.cache.with_extension("json.tmp");
        let written = self
            .cache
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, &body))
            .and_then(|()| std::fs::rename(&tmp, &self.cache));
        if let Err(e) = written {
            tracing::warn!(cache = %self.cache.display(), error = %e, "cannot cache the fleet plan: a restart without the collector will not have it");
        }
        self.etag = Some(format!("\"{}\"", plan.version));
        Polled::New(Box::new(plan))
    }
}
