//! `pathprobe-agent run --config agent.toml`: the long-running agent. It reflects (if
//! configured), probes every configured path, runs the drills, and pushes every window
//! report to the collector through [`crate::delivery`], so reports survive a collector
//! outage or an agent restart and arrive in order, once.
//!
//! The daemon is a supervisor of handles: one per path, one per drill, one per scheduled
//! capacity test, the reflector (with the far end of capacity tests beside it when it
//! takes part in them) and the uploader. Paths, whatever their kind (STAMP, `tcp-syn`,
//! `tcp-connect`), are handles on one shared probe engine ([`crate::engine::mux`]: three threads for all of
//! them, and one reporter thread that turns their windows into log lines and reports);
//! drills, capacity tests, the reflector and the uploader are each a thread with a stop
//! flag of its own.
//! It runs an [`AgentPlan`] ([`crate::plan`]); a new plan (the config file read again on `SIGHUP`) is applied by
//! difference: a path or drill whose plan changed is stopped (its last window delivered)
//! and started again, a new one is started, a removed one is stopped and its last window
//! delivered, and one that did not change is not touched, so it loses and repeats no
//! window. A path whose key alone changed signs with the new key from its next probe, and
//! a reflector whose keys alone changed answers with the new ones from its next batch:
//! neither restarts, so a key rollover loses nothing. A changed reflector is bound
//! again; a changed collector gets a new uploader
//! (the old one delivers what it can first). A plan that does not load is logged, and the
//! agent runs on with the one it has.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use pathprobe_proto::report::{PathInfo, PathKind};

use crate::capacity::client as capacity_client;
use crate::capacity::server::Server as CapacityServer;
use crate::capacity::{present, rate::Rate, sizing};
use crate::delivery::{self, Courier, Destination};
use crate::engine::Sink;
use crate::engine::mux::{self, Engine, PathHandle};
use crate::engine::session::WindowStats;
use crate::failover::{self, Failover, Verdict};
use crate::output::{self, Labels};
use crate::plan::{AgentPlan, CapacityPlan, DrillPlan, PathPlan};
use crate::reflector::{self, ReflectorConfig, ReflectorStats};
use crate::watch::{Observed, PathWatch};
use crate::{Error, Result};

/// How often the reflector's counters (and each key's answers) are logged.
const REFLECTOR_LOG_EVERY: Duration = Duration::from_mins(1);

/// How long a path waits after a failure before it tries again, at most.
const MAX_BACKOFF: Duration = Duration::from_mins(1);

/// What every report of this agent carries besides its path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Agent {
    id: String,
    site: Option<String>,
}

/// A running part: its thread, the flag that stops it, and what it was started with.
struct Handle<'scope, P, T> {
    plan: P,
    stop: Arc<AtomicBool>,
    thread: ScopedJoinHandle<'scope, T>,
}

impl<P, T> Handle<'_, P, T> {
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Stops every handle at once, then waits for each: they wind down (close their last
/// windows) side by side.
fn retire<P, T>(handles: Vec<Handle<'_, P, T>>) -> Vec<std::thread::Result<T>> {
    for h in &handles {
        h.stop();
    }
    handles.into_iter().map(|h| h.thread.join()).collect()
}

/// What runs a drill or a capacity test: its labels, its plan, its stop flag and where
/// its reports go.
type TimedRun<P> = fn(&Agent, &P, &AtomicBool, &mpsc::Sender<Vec<u8>>) -> Result<()>;

/// A path or a drill: a handle started with the agent's labels and its own plan.
type Part<'s, P, T> = Handle<'s, (Agent, P), T>;

/// What a running part was started with.
trait Planned<P> {
    fn planned(&self) -> &(Agent, P);
}

impl<P, T> Planned<P> for Part<'_, P, T> {
    fn planned(&self) -> &(Agent, P) {
        &self.plan
    }
}

/// A path on the agent's engine: its handle, or (while `None`) when it is tried again.
struct EnginePart {
    plan: (Agent, PathPlan),
    handle: Option<PathHandle>,
    retry_at: Instant,
    backoff: Duration,
    started: Instant,
}

impl Planned<PathPlan> for EnginePart {
    fn planned(&self) -> &(Agent, PathPlan) {
        &self.plan
    }
}

/// What the reporter thread needs of a path: its labels and its watcher.
struct PathCtx {
    labels: Labels,
    watch: Mutex<PathWatch>,
}

/// A closed window of a path on the engine, on its way to the reporter thread.
type Reported = (Arc<PathCtx>, WindowStats);

/// The sink of an engine path: every window to the reporter thread, as it is (the
/// engine keeps none).
struct ToReporter {
    ctx: Arc<PathCtx>,
    tx: mpsc::Sender<Reported>,
}

impl Sink for ToReporter {
    fn window(&mut self, w: &WindowStats) {
        let _ = self.tx.send((Arc::clone(&self.ctx), w.clone()));
    }
    fn window_owned(&mut self, w: WindowStats) {
        let _ = self.tx.send((Arc::clone(&self.ctx), w));
    }
    fn keeps_windows(&self) -> bool {
        false
    }
    fn compact_windows(&self) -> bool {
        true
    }
}

/// The reporter thread: for every path on the engine, each window's signature and events
/// (a trace when the signature changed), its log line, and its report to the uploader.
/// One thread for all paths: a trace holds up the others' reports (never their
/// probing) for its few seconds.
///
/// Windows arrive with their histograms compact: figures and reports are made from them
/// as they are (the same figures and octets as from full histograms), so a thousand
/// paths' windows never cost a full histogram each.
fn reporter(
    rx: &mpsc::Receiver<Reported>,
    tx: &mpsc::Sender<Vec<u8>>,
    plan_version: &Mutex<Option<String>>,
) {
    for (ctx, mut w) in rx {
        if !w.histograms.is_empty() {
            // Some full already: all full, so that each metric has one form.
            w.materialize();
        }
        // Sorted once here: the figures, the summaries and the encoding each read them.
        for c in w.compact.values_mut() {
            c.settle();
        }
        let seen = ctx
            .watch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .window(&w);
        let f = output::window_figures(&ctx.labels, &w, &seen);
        log_window(&ctx.labels, &f, &seen);
        // The plan the window was measured under: the one running when it closed.
        let version = plan_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let json = if w.compact.is_empty() {
            output::report(&ctx.labels, &w, &seen).and_then(|mut r| {
                r.plan_version = version;
                Ok(r.to_json()?)
            })
        } else {
            output::compact_report(&ctx.labels, &mut w, &seen).and_then(|mut r| {
                r.plan_version = version;
                Ok(r.to_json()?)
            })
        };
        send_report(json, tx);
    }
}

/// A window's log line and its events.
fn log_window(labels: &Labels, f: &output::Figures, seen: &Observed) {
    tracing::info!("{}", output::line(f));
    for e in &seen.events {
        tracing::warn!(path = %labels.path.name, "{}", output::event_text(e));
    }
}

/// A window's report to the uploader.
fn send_report(json: Result<Vec<u8>>, tx: &mpsc::Sender<Vec<u8>>) {
    match json {
        Ok(json) => {
            let _ = tx.send(json);
        }
        Err(e) => tracing::error!(error = %e, "cannot build a window report"),
    }
}

/// What a new plan changed, by name, for the log.
#[derive(Debug, Default)]
struct Changes {
    kept: usize,
    /// Paths whose key alone changed: they sign with the new one, without a restart.
    rekeyed: Vec<String>,
    restarted: Vec<String>,
    started: Vec<String>,
    stopped: Vec<String>,
}

/// Sorts `running` against `wanted` (by name): a handle whose plan (with the agent's
/// labels) is wanted as it is stays; the others are taken out and returned, to stop; the
/// plans to start are returned too. Each is noted in `changes`.
fn sort_out<P: PartialEq, H: Planned<P>>(
    running: &mut BTreeMap<String, H>,
    wanted: Vec<(String, P)>,
    agent: &Agent,
    changes: &mut Changes,
) -> (Vec<H>, Vec<P>) {
    let mut leaving = Vec::new();
    let mut to_start = Vec::new();
    let names: Vec<String> = running.keys().cloned().collect();
    for name in names {
        let same = wanted.iter().any(|(n, p)| {
            let (a, q) = running[&name].planned();
            *n == name && a == agent && q == p
        });
        if same {
            changes.kept += 1;
        } else if let Some(h) = running.remove(&name) {
            if wanted.iter().any(|(n, _)| *n == name) {
                changes.restarted.push(name);
            } else {
                changes.stopped.push(name);
            }
            leaving.push(h);
        }
    }
    for (name, p) in wanted {
        if !running.contains_key(&name) {
            if !changes.restarted.contains(&name) {
                changes.started.push(name);
            }
            to_start.push(p);
        }
    }
    (leaving, to_start)
}

/// Empties the reports channel; how many reports were in it.
fn drain(rx: &Mutex<mpsc::Receiver<Vec<u8>>>) -> u64 {
    let rx = rx.lock().unwrap_or_else(PoisonError::into_inner);
    u64::try_from(rx.try_iter().count()).unwrap_or(u64::MAX)
}

/// The running agent: what the supervisor holds.
struct Running<'scope, 'env> {
    scope: &'scope Scope<'scope, 'env>,
    agent: Agent,
    tx: mpsc::Sender<Vec<u8>>,
    /// The uploaders' end of the reports channel: one uploader at a time holds it.
    rx: &'env Mutex<mpsc::Receiver<Vec<u8>>>,
    stats: &'env ReflectorStats,
    /// The fleet plan's version, for the reporter.
    plan_version: &'env Mutex<Option<String>>,
    /// Every path, on the engine.
    paths: BTreeMap<String, EnginePart>,
    engine: Option<Engine<'scope>>,
    report_tx: Option<mpsc::Sender<Reported>>,
    reporter: Option<ScopedJoinHandle<'scope, ()>>,
    drills: BTreeMap<String, Part<'scope, DrillPlan, ()>>,
    capacity: BTreeMap<String, Part<'scope, CapacityPlan, ()>>,
    reflector: Option<Handle<'scope, ReflectorConfig, Result<()>>>,
    uploader: Option<Handle<'scope, Destination, ()>>,
    /// Reports dropped for want of a collector.
    discarded: u64,
}

impl<'scope> Running<'scope, '_> {
    fn start_path(&mut self, p: PathPlan) {
        let now = Instant::now();
        let mut part = EnginePart {
            plan: (self.agent.clone(), p),
            handle: None,
            retry_at: now,
            backoff: Duration::from_secs(1),
            started: now,
        };
        self.open_on_engine(&mut part);
        self.paths.insert(part.plan.1.name.clone(), part);
    }

    /// Adds a path to the engine; on failure (an address not up yet) it is tried
    /// again with back-off.
    fn open_on_engine(&self, part: &mut EnginePart) {
        let (Some(engine), Some(tx)) = (self.engine.as_ref(), self.report_tx.as_ref()) else {
            return;
        };
        let (agent, p) = &part.plan;
        let probe = &p.probe;
        let added = engine.add(probe, |info| {
            let labels = Labels {
                path: PathInfo {
                    name: p.name.clone(),
                    kind: p.kind,
                    local: info.local,
                    remote: probe.target,
                    protocol: probe.protocol,
                    dscp: probe.dscp,
                    packet_size: probe.packet_size(),
                },
                agent_id: agent.id.clone(),
                site: agent.site.clone(),
                timestamping: info.timestamping,
            };
            Box::new(ToReporter {
                ctx: Arc::new(PathCtx {
                    labels,
                    watch: Mutex::new(PathWatch::for_path(probe, info.sent_ttl)),
                }),
                tx: tx.clone(),
            })
        });
        match added {
            Ok(h) => {
                if let Some(key) = h.key_fingerprint() {
                    tracing::info!(path = %p.name, target = %probe.target, %key, "probing");
                } else {
                    tracing::info!(path = %p.name, target = %probe.target, "probing");
                }
                part.handle = Some(h);
                part.started = Instant::now();
            }
            Err(e) => {
                tracing::error!(path = %p.name, error = %e, retry_in = ?part.backoff, "cannot open the path: trying again");
                part.retry_at = Instant::now() + part.backoff;
                part.backoff = (part.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// Engine paths that ended (they never should) are started again with back-off;
    /// those waiting are tried when their time comes.
    fn tend_engine_paths(&mut self) {
        let mut parts = std::mem::take(&mut self.paths);
        for part in parts.values_mut() {
            let name = &part.plan.1.name;
            if let Some(end) = part.handle.as_ref().and_then(PathHandle::ended) {
                match end {
                    Ok(_) => {
                        tracing::warn!(path = %name, retry_in = ?part.backoff, "probing ended: starting again");
                    }
                    Err(e) => {
                        tracing::error!(path = %name, error = %e, retry_in = ?part.backoff, "probing stopped: starting again");
                    }
                }
                // A session that ran a while was healthy: start the back-off over.
                if part.started.elapsed() > MAX_BACKOFF {
                    part.backoff = Duration::from_secs(1);
                }
                part.handle = None;
                part.retry_at = Instant::now() + part.backoff;
                part.backoff = (part.backoff * 2).min(MAX_BACKOFF);
            }
            if part.handle.is_none() && Instant::now() >= part.retry_at {
                self.open_on_engine(part);
            }
        }
        self.paths = parts;
    }

    /// Stops engine paths together and waits for each to end: its probes in flight get
    /// their late timeout and its last window goes to the reporter.
    fn retire_engine_paths(&self, parts: &[EnginePart]) {
        let Some(engine) = self.engine.as_ref() else {
            return;
        };
        for h in parts.iter().filter_map(|p| p.handle.as_ref()) {
            engine.stop_path(h.id);
        }
        for part in parts {
            let Some(h) = part.handle.as_ref() else {
                continue;
            };
            let late = Duration::from_nanos(part.plan.1.probe.late_timeout_ns);
            if h.wait(late + Duration::from_secs(5)).is_none() {
                tracing::error!(path = %part.plan.1.name, "the path did not stop in time: its last window may be missing");
            }
        }
    }

    /// A drill or capacity test on a thread of its own: `run` waits for its window and
    /// runs it, sending its reports to the uploader; `what` names it in the log.
    fn spawn_timed<P: Clone + Send + 'scope>(
        &self,
        plan: P,
        what: &'static str,
        name: &str,
        run: TimedRun<P>,
    ) -> Part<'scope, P, ()> {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, tx, agent, mine) = (
            Arc::clone(&stop),
            self.tx.clone(),
            self.agent.clone(),
            plan.clone(),
        );
        let name = name.to_string();
        let thread = self.scope.spawn(move || {
            if let Err(e) = run(&agent, &mine, &flag, &tx) {
                tracing::error!(name = %name, error = %e, "the {what} stopped");
            }
        });
        Handle {
            plan: (self.agent.clone(), plan),
            stop,
            thread,
        }
    }

    fn start_drill(&mut self, d: DrillPlan) {
        let part = self.spawn_timed(d.clone(), "drill", &d.name, drill);
        self.drills.insert(d.name, part);
    }

    fn start_capacity(&mut self, c: CapacityPlan) {
        let part = self.spawn_timed(c.clone(), "capacity test", &c.name, capacity_test);
        self.capacity.insert(c.name, part);
    }

    fn start_reflector(&mut self, rc: ReflectorConfig, bound: Bound) {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, stats, cfg) = (Arc::clone(&stop), self.stats, rc.clone());
        if let Some(k) = &rc.keys {
            tracing::info!(listen = %rc.listen, keys = %k.get().summary(), "reflecting, authenticated");
        } else {
            tracing::info!(listen = %rc.listen, "reflecting");
        }
        if let Some(caps) = &rc.capacity {
            tracing::info!(control = %rc.listen, max_rate = %Rate(caps.max_rate_bps), max_stage = ?caps.max_stage, "capacity tests allowed");
        }
        let (sock, capacity) = bound;
        let thread = self.scope.spawn(move || {
            std::thread::scope(|s| {
                let far_end = capacity.as_ref().map(|c| s.spawn(|| c.run(&flag)));
                let reflected = reflector::run(&sock, &cfg, &flag, stats);
                // The reflector stopped (asked to, or failed): so does the far end.
                flag.store(true, Ordering::Relaxed);
                let served = far_end.map_or(Ok(()), |h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Config("the capacity far end panicked".to_string()))
                    })
                });
                reflected.and(served)
            })
        });
        self.reflector = Some(Handle {
            plan: rc,
            stop,
            thread,
        });
    }

    fn start_uploader(&mut self, to: Destination, courier: Courier) {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, rx) = (Arc::clone(&stop), self.rx);
        let thread = self.scope.spawn(move || {
            let rx = rx.lock().unwrap_or_else(PoisonError::into_inner);
            delivery::run(courier, &rx, &flag);
        });
        self.uploader = Some(Handle {
            plan: to,
            stop,
            thread,
        });
    }

    /// Applies `next` by difference (see the module's opening comment).
    fn apply(&mut self, next: AgentPlan) {
        let agent = Agent {
            id: next.agent_id.clone(),
            site: next.site.clone(),
        };
        self.agent = agent.clone();
        {
            let mut version = self
                .plan_version
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *version != next.plan_version {
                tracing::info!(
                    plan_version = next.plan_version.as_deref().unwrap_or("none"),
                    "fleet plan version"
                );
                version.clone_from(&next.plan_version);
            }
        }
        let mut changes = Changes::default();
        self.rekey_paths(&next.paths, &agent, &mut changes);
        let named = |p: PathPlan| (p.name.clone(), p);
        let (old_paths, new_paths) = sort_out(
            &mut self.paths,
            next.paths.into_iter().map(named).collect(),
            &agent,
            &mut changes,
        );
        let (old_drills, new_drills) = sort_out(
            &mut self.drills,
            next.drills
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect(),
            &agent,
            &mut changes,
        );
        let (old_tests, new_tests) = sort_out(
            &mut self.capacity,
            next.capacity
                .into_iter()
                .map(|c| (c.name.clone(), c))
                .collect(),
            &agent,
            &mut changes,
        );
        // Each path's last window goes to the uploader before anything starts again on it.
        self.retire_engine_paths(&old_paths);
        retire(old_drills);
        retire(old_tests);
        for p in new_paths {
            self.start_path(p);
        }
        for d in new_drills {
            self.start_drill(d);
        }
        for c in new_tests {
            self.start_capacity(c);
        }
        match (self.reflector.as_ref(), next.reflector.as_ref()) {
            (Some(h), Some(n)) if h.plan.differs_only_in_keys(n) => {
                if let (Some(live), Some(new)) = (&h.plan.keys, &n.keys) {
                    tracing::info!(keys = %live.get().summary(), "reflector keys until now");
                    live.adopt(new);
                    tracing::info!(keys = %live.get().summary(), "reflector keys reloaded (fingerprint and requests answered, newest first)");
                }
            }
            (old, new) if old.map(|h| &h.plan) != new => self.replace_reflector(next.reflector),
            _ => {}
        }
        if self.uploader.as_ref().map(|h| &h.plan) != next.collector.as_ref() {
            self.replace_uploader(next.collector);
        }
        tracing::info!(
            unchanged = changes.kept,
            rekeyed = ?changes.rekeyed,
            restarted = ?changes.restarted,
            started = ?changes.started,
            stopped = ?changes.stopped,
            "configuration reloaded"
        );
    }

    /// Paths whose plan changed in their key alone (both authenticated) take the new key
    /// where they run, and their plan is the new one: `sort_out` then keeps them.
    fn rekey_paths(&mut self, wanted: &[PathPlan], agent: &Agent, changes: &mut Changes) {
        for p in wanted {
            let Some(part) = self.paths.get_mut(&p.name) else {
                continue;
            };
            let (a, q) = &part.plan;
            let (Some(_), Some(new_key)) = (&q.probe.key, &p.probe.key) else {
                continue;
            };
            if a != agent || q == p {
                continue;
            }
            let mut rekeyed = q.clone();
            rekeyed.probe.key = Some(new_key.clone());
            if rekeyed != *p {
                continue;
            }
            if let Some(h) = &part.handle {
                h.set_key(new_key.clone());
            }
            tracing::info!(path = %p.name, key = %new_key.fingerprint(), "path key changed: signing with the new key, the old one still accepted on answers in flight");
            part.plan.1 = p.clone();
            changes.rekeyed.push(p.name.clone());
        }
    }

    fn replace_reflector(&mut self, next: Option<ReflectorConfig>) {
        let old = self.reflector.take();
        let old_cfg = old.as_ref().map(|h| h.plan.clone());
        if let Some(h) = old {
            let _ = retire(vec![h]);
        }
        let Some(rc) = next else {
            tracing::info!("reflector stopped: the configuration has none");
            return;
        };
        match reflector::bind_with_capacity(&rc) {
            Ok(bound) => self.start_reflector(rc, bound),
            Err(e) => {
                tracing::error!(listen = %rc.listen, error = %e, "cannot start the new reflector: keeping the old one");
                if let Some(old) = old_cfg {
                    match reflector::bind_with_capacity(&old) {
                        Ok(bound) => self.start_reflector(old, bound),
                        Err(e) => {
                            tracing::error!(listen = %old.listen, error = %e, "cannot bind the old reflector again either");
                        }
                    }
                }
            }
        }
    }

    fn replace_uploader(&mut self, next: Option<Destination>) {
        let old = self.uploader.take();
        let old_to = old.as_ref().map(|h| h.plan.clone());
        if let Some(h) = old {
            let _ = retire(vec![h]);
        }
        let Some(to) = next else {
            tracing::warn!("the configuration has no collector any more: reports are not kept");
            return;
        };
        match Courier::open(&to) {
            Ok(c) => {
                tracing::info!(collector = %to.url, spool = %to.spool_dir.display(), "reports go to the new collector");
                self.start_uploader(to, c);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot use the new collector settings (spool or TLS files): reports go where they went");
                if let Some(old) = old_to {
                    match Courier::open(&old) {
                        Ok(c) => self.start_uploader(old, c),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot open the old spool again either");
                        }
                    }
                }
            }
        }
    }

    /// Without a collector nothing takes the reports: they are dropped as they come (the
    /// windows are in the log), not kept in memory for as long as the agent runs.
    fn discard_undeliverable(&mut self) {
        if self.uploader.is_some() {
            return;
        }
        let dropped = drain(self.rx);
        if dropped > 0 && self.discarded == 0 {
            tracing::warn!(
                "no [collector] in the configuration: window reports are logged, not kept"
            );
        }
        self.discarded += dropped;
    }

    /// Stops everything: paths and drills first (their last windows go to the uploader),
    /// then the reflector, then the uploader (which delivers what it can). The reflector's
    /// outcome, when it failed.
    fn shut_down(mut self) -> Result<()> {
        let paths: Vec<EnginePart> = std::mem::take(&mut self.paths).into_values().collect();
        self.retire_engine_paths(&paths);
        retire(std::mem::take(&mut self.drills).into_values().collect());
        retire(std::mem::take(&mut self.capacity).into_values().collect());
        // The engine's threads end; then the reporter, once it has passed every window on.
        if let Some(engine) = self.engine.take() {
            engine.shutdown();
        }
        self.report_tx = None;
        if let Some(r) = self.reporter.take() {
            let _ = r.join();
        }
        let mut outcome = Ok(());
        if let Some(h) = self.reflector.take() {
            match retire(vec![h]).pop() {
                Some(Ok(Err(e))) => {
                    outcome = Err(Error::Config(format!("the reflector stopped: {e}")));
                }
                Some(Err(_)) => {
                    outcome = Err(Error::Config("the reflector thread panicked".to_string()));
                }
                _ => {}
            }
        }
        if let Some(h) = self.uploader.take()
            && retire(vec![h]).pop().is_some_and(|r| r.is_err())
        {
            outcome = Err(Error::Config(
                "the uploader thread panicked; reports stay spooled for the next start".to_string(),
            ));
        }
        outcome
    }
}

/// Runs the agent's `plan` until `stop` is set; `reload` is asked every 100 ms for a new
/// plan (`None`: no change asked for; an error: the reason the new plan was refused).
///
/// What cannot work is refused before anything starts: an unwritable spool, an unreadable
/// token or key, a reflector port in use, a path the agent lacks the privilege for. After
/// that the agent never gives up on a path; it returns an error (exit non-zero) only when
/// a part it cannot run without, the reflector or the uploader, stops.
pub fn run(
    plan: AgentPlan,
    stop: &AtomicBool,
    reload: &mut dyn FnMut() -> Option<Result<AgentPlan>>,
) -> Result<()> {
    for p in &plan.paths {
        // A setting the agent cannot use (a privilege it lacks) is refused now: the path's
        // socket is opened and closed (the engine opens its own). Anything else (an
        // address not up yet) is tried again by the supervisor.
        match mux::open_one(&p.probe) {
            Ok(_) => {}
            Err(e @ Error::Config(_)) => {
                return Err(Error::Config(format!("path `{}`: {e}", p.name)));
            }
            Err(e) => {
                tracing::error!(path = %p.name, error = %e, "cannot open the path yet: it will be tried again");
            }
        }
    }
    let reflector = plan
        .reflector
        .as_ref()
        .map(|rc| Ok::<_, Error>((rc.clone(), reflector::bind_with_capacity(rc)?)))
        .transpose()?;
    let courier = plan
        .collector
        .as_ref()
        .map(|to| Ok::<_, Error>((to.clone(), Courier::open(to)?)))
        .transpose()?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let rx = Mutex::new(rx);
    let stats = ReflectorStats::default();
    let plan_version = Mutex::new(plan.plan_version.clone());
    // Rings for twice the rate the plan starts with: room for a reload to add paths.
    let rate: f64 = plan
        .paths
        .iter()
        .map(|p| mux::rate(p.probe.interval_ns))
        .sum();
    std::thread::scope(|s| -> Result<()> {
        let (report_tx, report_rx) = mpsc::channel::<Reported>();
        let uploads = tx.clone();
        let version = &plan_version;
        let reporter_thread = s.spawn(move || reporter(&report_rx, &uploads, version));
        let mut running = Running {
            scope: s,
            paths: BTreeMap::new(),
            engine: Some(Engine::start(s, mux::ring_for_rate(2.0 * rate))),
            report_tx: Some(report_tx),
            reporter: Some(reporter_thread),
            agent: Agent {
                id: plan.agent_id.clone(),
                site: plan.site.clone(),
            },
            tx,
            rx: &rx,
            stats: &stats,
            plan_version: &plan_version,
            drills: BTreeMap::new(),
            capacity: BTreeMap::new(),
            reflector: None,
            uploader: None,
            discarded: 0,
        };
        if let Some((to, c)) = courier {
            running.start_uploader(to, c);
        }
        if let Some((rc, bound)) = reflector {
            running.start_reflector(rc, bound);
        }
        for p in plan.paths {
            running.start_path(p);
        }
        for d in plan.drills {
            running.start_drill(d);
        }
        for c in plan.capacity {
            running.start_capacity(c);
        }
        let failure = supervise(&mut running, stop, reload);
        let outcome = running.shut_down();
        match (failure, outcome) {
            (_, Err(e)) => Err(e),
            (Some(what), Ok(())) => Err(Error::Config(format!(
                "{what} while the agent had work: it exits so that its service manager restarts it"
            ))),
            (None, Ok(())) => Ok(()),
        }
    })
}

/// Watches the parts the agent cannot run without (the paths look after themselves) and
/// applies new plans, until `stop`; what stopped, when one did.
fn supervise(
    running: &mut Running<'_, '_>,
    stop: &AtomicBool,
    reload: &mut dyn FnMut() -> Option<Result<AgentPlan>>,
) -> Option<&'static str> {
    let mut counters_logged = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if counters_logged.elapsed() >= REFLECTOR_LOG_EVERY {
            counters_logged = Instant::now();
            if let Some(h) = &running.reflector {
                let keys = h.plan.keys.as_ref().map(|k| k.get().summary());
                tracing::info!(
                    keys = keys.as_deref().unwrap_or("none"),
                    "reflector: {}",
                    running.stats.line()
                );
            }
        }
        if running
            .reflector
            .as_ref()
            .is_some_and(|h| h.thread.is_finished())
        {
            return Some("the reflector stopped");
        }
        if running
            .uploader
            .as_ref()
            .is_some_and(|h| h.thread.is_finished())
        {
            return Some("the uploader stopped");
        }
        running.discard_undeliverable();
        running.tend_engine_paths();
        match reload() {
            None => {}
            Some(Ok(next)) => running.apply(next),
            Some(Err(e)) => {
                tracing::error!(error = %e, "the new configuration is refused: the agent runs on as it was");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// A reflector's socket, and the far end of capacity tests on its port when it takes part
/// in them.
type Bound = (socket2::Socket, Option<CapacityServer>);

/// Runs one `[[capacity]]`: waits for its window, runs the test if the rest of the window
/// holds it (and stops it at the window's end whatever happens), sends each stage's
/// report to `tx`, and logs the stages, the capacity and the sizes it needs.
fn capacity_test(
    agent: &Agent,
    c: &CapacityPlan,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let end = c.start_ns.saturating_add(c.length_ns);
    if crate::sys::realtime_ns() >= end {
        tracing::warn!(capacity = %c.name, start = %c.start, "the capacity test's window has passed: not run");
        return Ok(());
    }
    tracing::info!(capacity = %c.name, start = %c.start, target = %c.test.target, "capacity test scheduled");
    while crate::sys::realtime_ns() < c.start_ns {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = Duration::from_nanos(end.saturating_sub(crate::sys::realtime_ns()));
    let longest = c.test.longest();
    if left < longest {
        // Started late (the agent came up inside the window): a test cut short would load
        // the path past the maintenance window or report a knee it never reached.
        tracing::warn!(capacity = %c.name, left = ?left, needs = ?longest, "too little of the capacity test's window is left: not run");
        return Ok(());
    }
    let labels = capacity_labels(agent, c);
    tracing::info!(capacity = %c.name, max_rate = %Rate(c.test.max_bps), window_left = ?left, "capacity test started");
    // The test stops at the window's end, or with the agent, whichever comes first.
    let halt = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    // Each stage's report, kept until the run is over: then they go, the last with the
    // run's result (its knee and what to buy), so the collector never holds a result
    // without its stages; a run that fails still sends the stages it measured.
    let mut built = Vec::new();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if stop.load(Ordering::Relaxed) || crate::sys::realtime_ns() >= end {
                    halt.store(true, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let run = capacity_client::run(&c.test, &halt, &mut |e| {
            if let capacity_client::Event::StageDone(st) = e {
                tracing::info!(
                    capacity = %c.name,
                    stage = st.number,
                    offered = %Rate(st.offered_bps),
                    delivered = %Rate(st.outcome.delivered_bps),
                    loss_pct = format!("{:.2}", st.outcome.loss * 100.0),
                    passed = st.judgement.passed(),
                    "capacity stage"
                );
                match present::stage_report(&labels, st) {
                    Ok(r) => built.push(r),
                    Err(e) => tracing::error!(error = %e, "cannot build a stage report"),
                }
            }
        });
        done.store(true, Ordering::Relaxed);
        run
    });
    let send = |reports: Vec<pathprobe_proto::report::WindowReport>| {
        for r in reports {
            match r.to_json() {
                Ok(json) => {
                    let _ = tx.send(json);
                }
                Err(e) => tracing::error!(error = %e, "cannot encode a stage report"),
            }
        }
    };
    let run = match result {
        Ok(run) => run,
        Err(e) => {
            send(built);
            return Err(e);
        }
    };
    if halt.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
        tracing::warn!(capacity = %c.name, "the capacity test reached the end of its window and was stopped there");
    }
    let rec = recommendation(c, &run);
    log_capacity_result(c, &run, rec.as_ref());
    if let Some(last) = built.last_mut() {
        let at = crate::sys::realtime_ns();
        last.events.push(present::result_event(
            &run,
            &c.test.thresholds,
            rec.as_ref(),
            at,
        ));
    }
    send(built);
    Ok(())
}

/// What the capacity test's result (or the need given) asks to buy.
fn recommendation(c: &CapacityPlan, run: &capacity_client::Run) -> Option<sizing::Recommendation> {
    let ip_packet = c.test.size + if c.test.target.is_ipv4() { 28 } else { 48 };
    c.need_bps
        .or(run.knee.capacity_bps)
        .map(|n| sizing::recommend(Rate(n), c.headroom, ip_packet))
}

/// The labels of a capacity test's stage reports.
fn capacity_labels(agent: &Agent, c: &CapacityPlan) -> Labels {
    Labels {
        path: PathInfo {
            name: c.name.clone(),
            kind: c.kind,
            local: c
                .test
                .bind
                .unwrap_or_else(|| std::net::SocketAddr::new(c.test.target.ip(), 0)),
            remote: c.test.target,
            protocol: pathprobe_proto::report::ProbeProtocol::Stamp,
            dscp: 0,
            packet_size: u16::try_from(
                (if c.test.key.is_some() {
                    pathprobe_proto::stamp::Mode::Authenticated
                } else {
                    pathprobe_proto::stamp::Mode::Unauthenticated
                })
                .base_len(),
            )
            .unwrap_or(44),
        },
        agent_id: agent.id.clone(),
        site: agent.site.clone(),
        // Each stage's report takes the sources its own STAMP stream had.
        timestamping: pathprobe_proto::report::Timestamping {
            rx: pathprobe_proto::report::TimestampSource::Userspace,
            tx: pathprobe_proto::report::TimestampSource::Userspace,
        },
    }
}

/// The capacity found, and the circuit and gateway sizes it needs, in one log line.
fn log_capacity_result(
    c: &CapacityPlan,
    run: &capacity_client::Run,
    rec: Option<&sizing::Recommendation>,
) {
    tracing::info!(
        capacity = %c.name,
        capacity_found = %match (run.knee.capacity_bps, run.knee.saturated) {
            (None, _) => "none (even the first stage failed)".to_string(),
            (Some(b), true) => Rate(b).to_string(),
            (Some(b), false) => format!("at least {} (no stage failed: raise max_rate to find the knee)", Rate(b)),
        },
        rtt_inflates_at = %run.knee.rtt_inflates_at_bps.map_or_else(|| "not seen".to_string(), |b| Rate(b).to_string()),
        er_circuit = %rec.and_then(|r| r.er_circuit_bps).map_or_else(|| "none".to_string(), |b| Rate(b).to_string()),
        er_gateway = rec.and_then(|r| r.er_gateway.as_ref()).map_or("none", |g| g.sku),
        vpn_gateway = rec.and_then(|r| r.vpn_gateway.as_ref()).map_or("none", |g| g.sku),
        stopped_early = run.stopped_early.as_deref().unwrap_or("no"),
        "capacity test done"
    );
}

/// Runs one `[[drill]]`: waits for its start, runs it (reports to `tx`), logs each event
/// and the verdict.
fn drill(
    agent: &Agent,
    d: &DrillPlan,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Result<()> {
    let mut fc = d.failover.clone();
    let start = d.start_ns;
    let length = fc.service.duration_ns.unwrap_or(0);
    let now = crate::sys::realtime_ns();
    if now >= start.saturating_add(length) {
        tracing::warn!(drill = %d.name, start = %d.start, "the drill's window has passed: not run");
        return Ok(());
    }
    tracing::info!(drill = %d.name, start = %d.start, "drill scheduled");
    while crate::sys::realtime_ns() < start {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Started late (the agent came up inside the window): only what is left of it.
    let left = start
        .saturating_add(length)
        .saturating_sub(crate::sys::realtime_ns());
    for p in [
        Some(&mut fc.service),
        fc.primary.as_mut(),
        fc.backup.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        p.duration_ns = Some(left.max(1));
    }
    let max_outage = fc.drill_max_outage_ns.unwrap_or(u64::MAX);
    let session = Failover::open(fc)?;
    let service = &session.service;
    let labels = Labels {
        path: PathInfo {
            name: d.name.clone(),
            kind: PathKind::Other,
            local: service.local,
            remote: service.config().target,
            protocol: d.proto,
            dscp: d.dscp,
            packet_size: service.packet_size(),
        },
        agent_id: agent.id.clone(),
        site: agent.site.clone(),
        timestamping: service.timestamping,
    };
    tracing::info!(drill = %d.name, target = %d.target, "drill started: waiting for the primary to fail");
    let run = session.run(
        stop,
        |w, seen| match output::report(&labels, w, seen).and_then(|r| Ok(r.to_json()?)) {
            Ok(json) => {
                let _ = tx.send(json);
            }
            Err(e) => tracing::error!(error = %e, "cannot build a window report"),
        },
        |e| tracing::warn!(drill = %d.name, "{}", e.summary),
    )?;
    match failover::verdict(&run, max_outage) {
        Verdict::Pass => {
            tracing::info!(drill = %d.name, "drill passed: the primary failed and came back, every outage within max_outage");
        }
        Verdict::Fail => {
            tracing::error!(drill = %d.name, "drill FAILED: an outage was longer than max_outage");
        }
        Verdict::Incomplete => {
            tracing::warn!(drill = %d.name, "drill incomplete: traffic did not leave the primary and come back within the window");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent without a collector used to keep every window report it made in the
    /// channel, for as long as it ran.
    #[test]
    fn reports_nobody_can_deliver_do_not_pile_up() {
        let (tx, rx) = mpsc::channel();
        let rx = Mutex::new(rx);
        for _ in 0..3 {
            tx.send(vec![0u8; 1024]).unwrap();
        }
        assert_eq!(drain(&rx), 3);
        assert_eq!(drain(&rx), 0, "nothing is left behind");
    }
}
