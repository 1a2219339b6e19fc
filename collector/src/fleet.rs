//! The fleet planner: one fleet file (`fleet.toml`) that says which agents probe what, and
//! is checked and expanded into each agent's plan ([`FleetPlan`], in agent.toml's own
//! sections) before anything is applied.
//!
//! ```toml
//! [budget]
//! max_rate_per_agent = 10000       # probes/s over all of an agent's paths
//!
//! [[site]]                         # an agent is in exactly one site
//! name = "ams"
//! tags = ["onprem"]
//! agents = ["ams-1", "ams-2"]
//!
//! [[reflector]]                    # an agent that reflects
//! agent = "weu-1"
//! addresses = { expressroute = "10.1.0.4:862", vpn = "10.2.0.4:862" }
//! settings = { stateful = true }   # its [reflector] section (agent.toml's fields)
//!
//! [[template]]                     # a path, but for its two ends
//! name = "er"
//! kind = "expressroute"
//! rate = 10
//! dscp = 46
//! pin = [{ agent = "ams-1", interface = "eth1" }]
//!
//! [[mesh]]                         # who probes whom, with which templates
//! from = { tags = ["onprem"] }     # agents: of these sites, tags (of sites) and agents
//! to = { tags = ["azure"] }        # reflectors: the same selectors
//! templates = ["er", "vpn"]
//! ```
//!
//! A mesh rule expands to one path per agent of `from`, reflector of `to` (not itself) and
//! template, named `TEMPLATE-REFLECTOR` (`er-weu-1`), to the reflector's address for the
//! template (by its name, else by its kind). That is the whole rule language. A
//! `[[drill]]` (once, or on a cron `schedule` in UTC) goes to the agents it selects, at the
//! occurrence under way or next.
//!
//! ```toml
//! [[capacity]]                     # one agent loads one reflector that consents
//! name = "er-size"                 # the path name of its stage reports
//! agent = "ams-1"
//! reflector = "weu-1"              # its settings need allow_capacity = true
//! via = "er"                       # its address for this template (else kind), and the pin
//! schedule = "0 3 * * SUN"         # or start = "2026-12-06T03:00:00Z"
//! duration = "30m"                 # the window: the whole test must fit in it
//! max_rate = "500mbit"             # within the reflector's capacity_max_rate
//! settings = { steps = 5, direction = "both" }   # the rest of agent.toml's [[capacity]]
//! ```
//!
//! A `[[capacity]]` goes to its agent at the occurrence under way or next. Two whose
//! windows overlap may not load the same reflector, or be run by the same agent: a far
//! end runs one test at a time, and two tests on one path would measure each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use pathprobe_proto::plan::{
    CapacitySection, DEFAULT_CAPACITY_MAX_RATE, DEFAULT_CAPACITY_MAX_STAGE, DrillSection,
    FleetPlan, PathSection, ReflectorSection,
};
use pathprobe_proto::rate::{self, Rate};
use pathprobe_proto::report::{PathKind, ProbeProtocol, check_name};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

/// The default probe budget of one agent: probes a second over all its paths.
pub const DEFAULT_MAX_RATE_PER_AGENT: u32 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFile {
    #[serde(default)]
    budget: Budget,
    #[serde(default, rename = "site")]
    sites: Vec<Spanned<Site>>,
    #[serde(default, rename = "reflector")]
    reflectors: Vec<Spanned<Reflector>>,
    #[serde(default, rename = "template")]
    templates: Vec<Spanned<Template>>,
    #[serde(default, rename = "mesh")]
    meshes: Vec<Spanned<Mesh>>,
    #[serde(default, rename = "drill")]
    drills: Vec<Spanned<Drill>>,
    #[serde(default, rename = "capacity")]
    capacity: Vec<Spanned<Capacity>>,
}

/// A capacity test: one agent loads one reflector that consents, in a window, once
/// (`start`) or repeating (`schedule`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Capacity {
    name: String,
    agent: String,
    reflector: String,
    /// Which of the reflector's addresses it loads: by template name, else path kind. A
    /// template also gives the agent's pinning.
    via: String,
    schedule: Option<String>,
    start: Option<String>,
    duration: String,
    max_rate: String,
    /// The rest of agent.toml's `[[capacity]]` (`start_rate`, `steps`, `direction`...).
    #[serde(default)]
    settings: toml::Table,
}

/// A failover drill for the agents it selects, in a maintenance window: once (`start`) or
/// repeating (`schedule`, a cron pattern in UTC: minute hour day month weekday, with an
/// optional seconds field first).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Drill {
    name: String,
    agents: Selector,
    schedule: Option<String>,
    start: Option<String>,
    duration: String,
    /// The rest of agent.toml's `[[drill]]` (`target`, `primary`, `backup`, `rate`, `max_outage`...).
    #[serde(default)]
    settings: toml::Table,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Budget {
    #[serde(default = "default_budget")]
    max_rate_per_agent: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            max_rate_per_agent: DEFAULT_MAX_RATE_PER_AGENT,
        }
    }
}

const fn default_budget() -> u32 {
    DEFAULT_MAX_RATE_PER_AGENT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Site {
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    agents: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reflector {
    agent: String,
    /// Where each path reaches it: by template name or path kind, `HOST:PORT`.
    #[serde(default)]
    addresses: BTreeMap<String, String>,
    /// Its `[reflector]` section.
    settings: Option<ReflectorSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Template {
    name: String,
    kind: PathKind,
    #[serde(default)]
    proto: ProbeProtocol,
    rate: Option<u32>,
    interval: Option<String>,
    size: Option<usize>,
    #[serde(default)]
    dscp: u8,
    ttl: Option<u8>,
    window: Option<String>,
    timeout: Option<String>,
    /// A key file on each agent (the fleet file holds no secret).
    auth_key_file: Option<std::path::PathBuf>,
    #[serde(default)]
    ssid: u16,
    /// Pinning per agent.
    #[serde(default)]
    pin: Vec<Pin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Pin {
    agent: String,
    bind: Option<std::net::SocketAddr>,
    interface: Option<String>,
    fwmark: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mesh {
    name: Option<String>,
    from: Spanned<Selector>,
    to: Spanned<Selector>,
    templates: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    sites: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
}

/// What is wrong with a fleet file: where, what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct FleetError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// One agent's plan as served: the plan, its JSON and its entity tag.
#[derive(Debug, PartialEq)]
pub struct Served {
    pub plan: FleetPlan,
    pub json: Vec<u8>,
    /// `"VERSION"`, as an `ETag` header carries it.
    pub etag: String,
}

/// A checked, expanded fleet: every agent's plan.
#[derive(Debug, Default)]
pub struct Fleet {
    pub plans: BTreeMap<String, Arc<Served>>,
    /// When a drill's window ends (ns since 1970): the plans must be expanded again then,
    /// for its next occurrence.
    pub next_change_ns: Option<u64>,
}

/// Reads and expands a fleet file.
pub fn load(path: &Path) -> Result<Fleet, FleetError> {
    let text = std::fs::read_to_string(path).map_err(|e| FleetError {
        file: path.display().to_string(),
        line: 0,
        message: format!("cannot read it: {e}"),
    })?;
    expand(&path.display().to_string(), &text)
}

/// The line of byte offset `at` in `text`.
fn line(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// Checks and expands the fleet file `text` (named `file` in errors), now.
pub fn expand(file: &str, text: &str) -> Result<Fleet, FleetError> {
    expand_at(file, text, crate::now_ns())
}

/// Checks and expands the fleet file `text` as at `now_ns` (which occurrence of each
/// repeating drill is planned).
pub fn expand_at(file: &str, text: &str, now_ns: u64) -> Result<Fleet, FleetError> {
    let err = |at: usize, message: String| FleetError {
        file: file.to_string(),
        line: line(text, at),
        message,
    };
    let f: FleetFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start);
        err(at, e.message().to_string())
    })?;
    let ctx = Context::index(&f, &err)?;
    let mut paths = AgentPaths::new();
    for mesh in &f.meshes {
        expand_mesh(&ctx, mesh, text, &err, &mut paths)?;
    }
    let mut next_change_ns: Option<u64> = None;
    let mut drills = plan_drills(&ctx, &f, &paths, now_ns, &err, &mut next_change_ns)?;
    let mut tests = plan_capacity(&ctx, &f, &paths, &drills, now_ns, &err, &mut next_change_ns)?;
    let budget = f.budget.max_rate_per_agent;
    let mut plans = BTreeMap::new();
    for (agent, site) in &ctx.site_of {
        let mine: Vec<PathSection> = paths
            .remove(agent)
            .map(|m| m.into_values().map(|(p, _)| p).collect())
            .unwrap_or_default();
        let rate: f64 = mine.iter().map(probes_per_second).sum();
        if rate > f64::from(budget) {
            let each: Vec<String> = mine
                .iter()
                .map(|p| format!("{} {:.0}/s", p.name, probes_per_second(p)))
                .collect();
            return Err(err(
                ctx.agent_at[agent],
                format!(
                    "agent {agent} would send {rate:.0} probes/s ({}), above the budget of {budget}/s: lower the templates' rates, probe fewer reflectors, or raise [budget] max_rate_per_agent",
                    each.join(", ")
                ),
            ));
        }
        let plan = FleetPlan {
            version: String::new(),
            agent_id: agent.clone(),
            site: site.clone(),
            reflector: ctx
                .reflectors
                .get(agent)
                .map(|r| r.settings.clone().unwrap_or_default()),
            paths: mine,
            drills: drills.remove(agent).unwrap_or_default(),
            capacity: tests.remove(agent).unwrap_or_default(),
        };
        plans.insert(agent.clone(), Arc::new(served(plan)));
    }
    Ok(Fleet {
        plans,
        next_change_ns,
    })
}

/// A capacity test's window as planned: start, end (ns) and the test's name.
type Window<'n> = (u64, u64, &'n str);

/// Per agent, the drills or capacity tests planned for it.
type Planned<T> = BTreeMap<String, Vec<T>>;

/// Whether agent `a` has a path or drill named `name` already: every name is one per
/// agent, since its reports are found by it.
fn taken(paths: &AgentPaths, drills: &Planned<DrillSection>, a: &str, name: &str) -> bool {
    paths.get(a).is_some_and(|m| m.contains_key(name))
        || drills
            .get(a)
            .is_some_and(|d| d.iter().any(|x| x.name == name))
}

/// The occurrence of each `[[drill]]` planned at `now_ns`, for the agents it selects;
/// `next_change_ns` is brought forward to the first window's end.
fn plan_drills(
    ctx: &Context<'_>,
    f: &FleetFile,
    paths: &AgentPaths,
    now_ns: u64,
    err: Err<'_>,
    next_change_ns: &mut Option<u64>,
) -> Result<Planned<DrillSection>, FleetError> {
    let mut drills = Planned::new();
    for d in &f.drills {
        let at = d.span().start;
        let Some((section, ends)) =
            drill_occurrence(d.get_ref(), now_ns).map_err(|m| err(at, m))?
        else {
            continue;
        };
        *next_change_ns = Some(next_change_ns.map_or(ends, |n| n.min(ends)));
        let what = format!("drill `{}`", section.name);
        for a in ctx
            .select(&d.get_ref().agents, &what, "agents")
            .map_err(|m| err(at, m))?
        {
            if taken(paths, &drills, &a, &section.name) {
                return Err(err(
                    at,
                    format!(
                        "{what} is named like another path or drill of agent {a}: names are one per agent, since reports are found by them"
                    ),
                ));
            }
            drills.entry(a).or_default().push(section.clone());
        }
    }
    Ok(drills)
}

/// The occurrence of each `[[capacity]]` planned at `now_ns`, for its agent: never two
/// at once on one reflector or by one agent. `next_change_ns` as for drills.
fn plan_capacity(
    ctx: &Context<'_>,
    f: &FleetFile,
    paths: &AgentPaths,
    drills: &Planned<DrillSection>,
    now_ns: u64,
    err: Err<'_>,
    next_change_ns: &mut Option<u64>,
) -> Result<Planned<CapacitySection>, FleetError> {
    let mut tests: Planned<CapacitySection> = Planned::new();
    // The windows planned so far, (start, end, name): by reflector, then by agent.
    let mut busy: [BTreeMap<&str, Vec<Window<'_>>>; 2] = Default::default();
    for c in &f.capacity {
        let at = c.span().start;
        let cap = c.get_ref();
        let Some((section, start, end)) = ctx.capacity(cap, now_ns).map_err(|m| err(at, m))? else {
            continue;
        };
        *next_change_ns = Some(next_change_ns.map_or(end, |n| n.min(end)));
        for (side, who) in [cap.reflector.as_str(), cap.agent.as_str()]
            .into_iter()
            .enumerate()
        {
            let planned = busy[side].entry(who).or_default();
            if let Some((_, _, other)) = planned.iter().find(|(s, e, _)| start < *e && *s < end) {
                let whom = if side == 1 {
                    format!("be run by agent {who}")
                } else {
                    format!("load reflector {who}")
                };
                return Err(err(
                    at,
                    format!(
                        "capacity `{}` and capacity `{other}` would {whom} at once (their windows overlap): a far end runs one test at a time, and two on one path measure each other; move one's start or schedule",
                        cap.name
                    ),
                ));
            }
            planned.push((start, end, &cap.name));
        }
        let mine = tests.entry(cap.agent.clone()).or_default();
        if taken(paths, drills, &cap.agent, &section.name)
            || mine.iter().any(|x| x.name == section.name)
        {
            return Err(err(
                at,
                format!(
                    "capacity `{}` is named like another path, drill or test of agent {}: names are one per agent, since reports are found by them",
                    cap.name, cap.agent
                ),
            ));
        }
        mine.push(section);
    }
    Ok(tests)
}

/// The window of a drill or capacity test (`what`) planned at `now_ns`: the one under
/// way, else the next, as its start (RFC 3339 and ns) and end (ns); `None` for a one-off
/// whose window has passed.
fn occurrence(
    what: &str,
    schedule: Option<&String>,
    start: Option<&String>,
    duration: &str,
    now_ns: u64,
) -> Result<Option<(String, u64, u64)>, String> {
    let length = humantime::parse_duration(duration).map_err(|e| {
        format!("{what}: duration `{duration}` is not a duration ({e}): write it like 30m")
    })?;
    let length_ns = u64::try_from(length.as_nanos()).unwrap_or(u64::MAX);
    let start_ns = match (schedule, start) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(format!(
                "{what}: give `schedule` (a cron pattern, UTC) to repeat it or `start` (RFC 3339) for once, not both"
            ));
        }
        (None, Some(start)) => {
            let t = humantime::parse_rfc3339_weak(start).map_err(|e| {
                format!("{what}: start `{start}` is not a time ({e}): write it like 2026-12-06T02:00:00Z")
            })?;
            let ns = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            if ns.saturating_add(length_ns) <= now_ns {
                return Ok(None);
            }
            ns
        }
        (Some(pattern), None) => {
            // A second on: the pattern matches whole seconds, and a window that ends now is over.
            next_occurrence(pattern, (now_ns + 1_000_000_000).saturating_sub(length_ns))
                .map_err(|e| format!("{what}: schedule `{pattern}`: {e}"))?
        }
    };
    let start = humantime::format_rfc3339(
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(start_ns),
    )
    .to_string();
    Ok(Some((start, start_ns, start_ns.saturating_add(length_ns))))
}

/// The occurrence of drill `d` planned at `now_ns` (the one under way, else the next) as
/// agent.toml's `[[drill]]`, and when its window ends; `None` for a one-off drill whose
/// window has passed.
fn drill_occurrence(d: &Drill, now_ns: u64) -> Result<Option<(DrillSection, u64)>, String> {
    let what = format!("drill `{}`", d.name);
    check_name("drill", &d.name).map_err(|e| e.to_string())?;
    let Some((start, _, end)) = occurrence(
        &what,
        d.schedule.as_ref(),
        d.start.as_ref(),
        &d.duration,
        now_ns,
    )?
    else {
        return Ok(None);
    };
    let mut table = d.settings.clone();
    for key in ["name", "start", "duration"] {
        if table.contains_key(key) {
            return Err(format!(
                "{what}: settings must not set `{key}`: it is the drill's own"
            ));
        }
    }
    table.insert("name".into(), toml::Value::String(d.name.clone()));
    table.insert("start".into(), toml::Value::String(start));
    table.insert("duration".into(), toml::Value::String(d.duration.clone()));
    let section: DrillSection = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| format!("{what}: settings: {}", e.message()))?;
    Ok(Some((section, end)))
}

/// The first time at or after `from_ns` that the cron `pattern` (UTC; seconds optional)
/// matches.
fn next_occurrence(pattern: &str, from_ns: u64) -> Result<u64, String> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(pattern)
        .map_err(|e| {
            format!("{e}: write it like `0 2 * * SUN` (minute hour day month weekday, UTC)")
        })?;
    let from = jiff::Timestamp::from_nanosecond(i128::from(from_ns))
        .map_err(|e| e.to_string())?
        .to_zoned(jiff::tz::TimeZone::UTC);
    let next = cron
        .find_next_occurrence(&from, true)
        .map_err(|e| format!("it never matches ({e})"))?;
    u64::try_from(next.timestamp().as_nanosecond()).map_err(|e| e.to_string())
}

/// The paths of one agent so far, by name, with the line of the rule that gave each.
type AgentPaths = BTreeMap<String, BTreeMap<String, (PathSection, usize)>>;

/// Adds the paths of one `[[mesh]]` rule to `paths`.
fn expand_mesh(
    ctx: &Context<'_>,
    mesh: &Spanned<Mesh>,
    text: &str,
    err: Err<'_>,
    paths: &mut AgentPaths,
) -> Result<(), FleetError> {
    let at = mesh.span().start;
    // Once per rule: counting a big file's lines for every path it gives was most of
    // the expansion's time.
    let rule_line = line(text, at);
    let m = mesh.get_ref();
    let what = m
        .name
        .as_deref()
        .map_or_else(|| "this [[mesh]]".to_string(), |n| format!("mesh `{n}`"));
    let from_at = m.from.span().start;
    let from = ctx
        .select(m.from.get_ref(), &what, "from")
        .map_err(|msg| err(from_at, msg))?;
    if from.is_empty() {
        return Err(err(
            from_at,
            format!("{what}: `from` selects sites with no agents: it expands to nothing"),
        ));
    }
    let to = ctx.reflectors_of(m.to.get_ref(), &what, &|msg| err(m.to.span().start, msg))?;
    let mut added = 0;
    for t in &m.templates {
        let Some(template) = ctx.templates.get(t.get_ref().as_str()) else {
            return Err(err(
                t.span().start,
                format!(
                    "{what} names template `{}`, which no [[template]] defines: add it, or fix the name",
                    t.get_ref()
                ),
            ));
        };
        for a in &from {
            for r in to.iter().filter(|r| *r != a) {
                let p = ctx
                    .path(template, a, r)
                    .map_err(|m| err(t.span().start, m))?;
                let of = paths.entry(a.clone()).or_default();
                if let Some((_, first)) = of.get(&p.name) {
                    return Err(err(
                        at,
                        format!(
                            "{what} gives agent {a} path {} again (line {first} gave it first): one rule per agent, reflector and template",
                            p.name
                        ),
                    ));
                }
                of.insert(p.name.clone(), (p, rule_line));
                added += 1;
            }
        }
    }
    if added == 0 {
        return Err(err(
            at,
            format!(
                "{what} expands to nothing: its only agents and reflectors are the same ones (an agent does not probe itself)"
            ),
        ));
    }
    Ok(())
}

/// A plan with its version (the first 16 hex digits of the SHA-256 of its JSON without
/// one: it changes exactly when the plan does), JSON and `ETag`.
fn served(mut plan: FleetPlan) -> Served {
    plan.version.clear();
    let unversioned = serde_json::to_vec(&plan).unwrap_or_default();
    let digest = Sha256::digest(&unversioned);
    plan.version = hex::encode(&digest[..8]);
    let json = serde_json::to_vec(&plan).unwrap_or_default();
    let etag = format!("\"{}\"", plan.version);
    Served { plan, json, etag }
}

/// A path's probes a second.
#[allow(clippy::cast_precision_loss)]
fn probes_per_second(p: &PathSection) -> f64 {
    if let Some(r) = p.rate {
        return f64::from(r);
    }
    p.interval
        .as_deref()
        .and_then(|i| humantime::parse_duration(i).ok())
        .filter(|d| !d.is_zero())
        .map_or(10.0, |d| 1.0 / d.as_secs_f64())
}

/// The fleet file indexed: who is where, who reflects, the templates.
struct Context<'f> {
    site_of: BTreeMap<String, String>,
    agent_at: BTreeMap<String, usize>,
    sites: BTreeMap<&'f str, &'f Site>,
    reflectors: BTreeMap<String, &'f Reflector>,
    templates: BTreeMap<&'f str, &'f Template>,
}

type Err<'e> = &'e dyn Fn(usize, String) -> FleetError;

impl<'f> Context<'f> {
    fn index(f: &'f FleetFile, err: Err<'_>) -> Result<Self, FleetError> {
        let mut ctx = Context {
            site_of: BTreeMap::new(),
            agent_at: BTreeMap::new(),
            sites: BTreeMap::new(),
            reflectors: BTreeMap::new(),
            templates: BTreeMap::new(),
        };
        for s in &f.sites {
            let site = s.get_ref();
            check_name("site", &site.name).map_err(|e| err(s.span().start, e.to_string()))?;
            if ctx.sites.insert(&site.name, site).is_some() {
                return Err(err(
                    s.span().start,
                    format!(
                        "site `{}` is defined twice: merge the two [[site]]s",
                        site.name
                    ),
                ));
            }
            for a in &site.agents {
                let id = a.get_ref();
                check_name("agent id", id).map_err(|e| err(a.span().start, e.to_string()))?;
                if let Some(other) = ctx.site_of.insert(id.clone(), site.name.clone()) {
                    return Err(err(
                        a.span().start,
                        format!(
                            "agent {id} is in site `{other}` and in site `{}`: an agent is in one site; remove it from one",
                            site.name
                        ),
                    ));
                }
                ctx.agent_at.insert(id.clone(), a.span().start);
            }
        }
        ctx.index_reflectors(f, err)?;
        ctx.index_templates(f, err)?;
        Ok(ctx)
    }

    fn index_reflectors(&mut self, f: &'f FleetFile, err: Err<'_>) -> Result<(), FleetError> {
        let ctx = self;
        for r in &f.reflectors {
            let refl = r.get_ref();
            if !ctx.site_of.contains_key(&refl.agent) {
                return Err(err(
                    r.span().start,
                    format!(
                        "reflector agent {} is in no [[site]]: add it to the agents of its site",
                        refl.agent
                    ),
                ));
            }
            for (key, addr) in &refl.addresses {
                if addr
                    .rsplit_once(':')
                    .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
                {
                    return Err(err(
                        r.span().start,
                        format!(
                            "reflector {}: address `{addr}` for {key} is not HOST:PORT (like 10.1.0.4:862)",
                            refl.agent
                        ),
                    ));
                }
            }
            if ctx.reflectors.insert(refl.agent.clone(), refl).is_some() {
                return Err(err(
                    r.span().start,
                    format!("agent {} has two [[reflector]]s: keep one", refl.agent),
                ));
            }
        }
        Ok(())
    }

    fn index_templates(&mut self, f: &'f FleetFile, err: Err<'_>) -> Result<(), FleetError> {
        let ctx = self;
        for t in &f.templates {
            let tpl = t.get_ref();
            check_name("template", &tpl.name).map_err(|e| err(t.span().start, e.to_string()))?;
            if tpl.dscp > 63 {
                return Err(err(
                    t.span().start,
                    format!(
                        "template `{}`: dscp {} is not a DSCP: use 0 to 63",
                        tpl.name, tpl.dscp
                    ),
                ));
            }
            if tpl.rate == Some(0) {
                return Err(err(
                    t.span().start,
                    format!(
                        "template `{}`: rate 0 sends nothing: give probes a second",
                        tpl.name
                    ),
                ));
            }
            for (field, v) in [
                ("interval", &tpl.interval),
                ("window", &tpl.window),
                ("timeout", &tpl.timeout),
            ] {
                if let Some(v) = v
                    && let Err(e) = humantime::parse_duration(v)
                {
                    return Err(err(
                        t.span().start,
                        format!(
                            "template `{}`: {field} `{v}` is not a duration ({e}): write it like 10s or 500ms",
                            tpl.name
                        ),
                    ));
                }
            }
            for p in &tpl.pin {
                if !ctx.site_of.contains_key(&p.agent) {
                    return Err(err(
                        t.span().start,
                        format!(
                            "template `{}` pins agent {}, which is in no [[site]]",
                            tpl.name, p.agent
                        ),
                    ));
                }
            }
            if ctx.templates.insert(&tpl.name, tpl).is_some() {
                return Err(err(
                    t.span().start,
                    format!("template `{}` is defined twice: keep one", tpl.name),
                ));
            }
        }
        Ok(())
    }

    /// The agents a selector names: of its sites, of the sites with its tags, and itself.
    fn select(&self, s: &Selector, what: &str, side: &str) -> Result<BTreeSet<String>, String> {
        if s.sites.is_empty() && s.tags.is_empty() && s.agents.is_empty() {
            return Err(format!(
                "{what}: `{side}` selects nothing: give sites, tags or agents"
            ));
        }
        let mut out = BTreeSet::new();
        for name in &s.sites {
            let Some(named) = self.sites.get(name.as_str()) else {
                return Err(format!(
                    "{what}: `{side}` names site `{name}`, which no [[site]] defines"
                ));
            };
            out.extend(named.agents.iter().map(|a| a.get_ref().clone()));
        }
        for tag in &s.tags {
            let tagged: Vec<&&Site> = self
                .sites
                .values()
                .filter(|site| site.tags.contains(tag))
                .collect();
            if tagged.is_empty() {
                return Err(format!(
                    "{what}: `{side}` names tag `{tag}`, which no [[site]] has"
                ));
            }
            for site in tagged {
                out.extend(site.agents.iter().map(|a| a.get_ref().clone()));
            }
        }
        for a in &s.agents {
            if !self.site_of.contains_key(a) {
                return Err(format!(
                    "{what}: `{side}` names agent {a}, which is in no [[site]]"
                ));
            }
            out.insert(a.clone());
        }
        Ok(out)
    }

    /// The reflectors a `to` selector names: every agent it names must reflect, and every
    /// site it names must have a reflector.
    fn reflectors_of(
        &self,
        s: &Selector,
        what: &str,
        err: &dyn Fn(String) -> FleetError,
    ) -> Result<BTreeSet<String>, FleetError> {
        for a in &s.agents {
            if self.site_of.contains_key(a) && !self.reflectors.contains_key(a) {
                return Err(err(format!(
                    "{what}: `to` names agent {a}, which does not reflect: add a [[reflector]] for it, or probe another"
                )));
            }
        }
        let picked = self.select(s, what, "to").map_err(err)?;
        let reflecting: BTreeSet<String> = picked
            .into_iter()
            .filter(|a| self.reflectors.contains_key(a))
            .collect();
        for name in &s.sites {
            let site = self.sites[name.as_str()];
            if !site
                .agents
                .iter()
                .any(|a| self.reflectors.contains_key(a.get_ref()))
            {
                return Err(err(format!(
                    "{what}: `to` names site `{name}`, where no agent reflects: add a [[reflector]] there"
                )));
            }
        }
        if reflecting.is_empty() {
            return Err(err(format!(
                "{what}: `to` selects no agent that reflects: it expands to nothing; add a [[reflector]] in those sites"
            )));
        }
        Ok(reflecting)
    }

    /// The occurrence of capacity test `c` planned at `now_ns` (under way, else next) as
    /// agent.toml's `[[capacity]]`, with its window (ns); `None` for a one-off whose
    /// window has passed. The far end must consent, within its caps, and the test must
    /// fit its window.
    fn capacity(
        &self,
        c: &Capacity,
        now_ns: u64,
    ) -> Result<Option<(CapacitySection, u64, u64)>, String> {
        let what = format!("capacity `{}`", c.name);
        check_name("capacity", &c.name).map_err(|e| e.to_string())?;
        if !self.site_of.contains_key(&c.agent) {
            return Err(format!(
                "{what}: agent {} is in no [[site]]: add it to the agents of its site",
                c.agent
            ));
        }
        if c.agent == c.reflector {
            return Err(format!(
                "{what}: agent {} would load itself: name another agent's reflector",
                c.agent
            ));
        }
        let Some(refl) = self.reflectors.get(&c.reflector) else {
            return Err(format!(
                "{what}: agent {} does not reflect: add a [[reflector]] for it (with allow_capacity = true in its settings), or test another",
                c.reflector
            ));
        };
        let consent = refl.settings.as_ref().filter(|s| s.allow_capacity);
        let Some(consent) = consent else {
            return Err(format!(
                "{what}: reflector {} does not take part in capacity tests: a far end must consent, so add allow_capacity = true (and capacity_max_rate) to its settings, or test another",
                c.reflector
            ));
        };
        let template = self.templates.get(c.via.as_str());
        let Some(target) = refl
            .addresses
            .get(&c.via)
            .or_else(|| template.and_then(|t| refl.addresses.get(&t.kind.to_string())))
        else {
            return Err(format!(
                "{what}: reflector {} has no address for `{}`: add it to its addresses, or name a template or path kind it has",
                c.reflector, c.via
            ));
        };
        let Some((start, start_ns, end_ns)) = occurrence(
            &what,
            c.schedule.as_ref(),
            c.start.as_ref(),
            &c.duration,
            now_ns,
        )?
        else {
            return Ok(None);
        };
        let mut table = c.settings.clone();
        for key in ["name", "start", "duration", "target", "max_rate"] {
            if table.contains_key(key) {
                return Err(format!(
                    "{what}: settings must not set `{key}`: it is the test's own"
                ));
            }
        }
        let pin = template.and_then(|t| t.pin.iter().find(|p| p.agent == c.agent));
        if let Some(p) = pin
            && !["bind", "interface", "fwmark"]
                .iter()
                .any(|k| table.contains_key(*k))
        {
            if let Some(b) = p.bind {
                table.insert("bind".into(), toml::Value::String(b.to_string()));
            }
            if let Some(i) = &p.interface {
                table.insert("interface".into(), toml::Value::String(i.clone()));
            }
            if let Some(m) = p.fwmark {
                table.insert("fwmark".into(), toml::Value::Integer(i64::from(m)));
            }
        }
        for (key, value) in [
            ("name", &c.name),
            ("start", &start),
            ("duration", &c.duration),
            ("target", target),
            ("max_rate", &c.max_rate),
        ] {
            table.insert(key.into(), toml::Value::String(value.clone()));
        }
        let section: CapacitySection = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| format!("{what}: settings: {}", e.message()))?;
        let shape = section
            .shape()
            .map_err(|(field, reason)| format!("{what}: {field}: {reason}"))?;
        within_consent(&what, &c.reflector, consent, &shape)?;
        let window = std::time::Duration::from_nanos(end_ns - start_ns);
        if shape.longest() > window {
            return Err(format!(
                "{what}: the test can take up to {} (every stage measured twice when an RTT spike fails it, with the idle and TCP stages), longer than its window of {}: lengthen duration, or shorten stage_duration or steps",
                humantime::format_duration(shape.longest()),
                humantime::format_duration(window)
            ));
        }
        Ok(Some((section, start_ns, end_ns)))
    }

    /// Template `t` from agent `a` to reflector `r`.
    fn path(&self, t: &Template, a: &str, r: &str) -> Result<PathSection, String> {
        let refl = self.reflectors[r];
        let kind = t.kind.to_string();
        let Some(target) = refl
            .addresses
            .get(&t.name)
            .or_else(|| refl.addresses.get(&kind))
        else {
            return Err(format!(
                "template `{}` needs reflector {r}'s address for `{}` or `{kind}`: add it to its addresses",
                t.name, t.name
            ));
        };
        let pin = t.pin.iter().find(|p| p.agent == a);
        Ok(PathSection {
            name: format!("{}-{r}", t.name),
            kind: t.kind,
            proto: t.proto,
            target: target.clone(),
            rate: t.rate,
            interval: t.interval.clone(),
            size: t.size,
            dscp: t.dscp,
            ttl: t.ttl,
            bind: pin.and_then(|p| p.bind),
            interface: pin.and_then(|p| p.interface.clone()),
            fwmark: pin.and_then(|p| p.fwmark),
            window: t.window.clone(),
            timeout: t.timeout.clone(),
            auth_key_file: t.auth_key_file.clone(),
            ssid: t.ssid,
        })
    }
}

/// Whether the stages of test `what` stay within the caps reflector `r` consents to.
fn within_consent(
    what: &str,
    r: &str,
    consent: &ReflectorSection,
    shape: &pathprobe_proto::capacity::Shape,
) -> Result<(), String> {
    let cap_text = consent
        .capacity_max_rate
        .as_deref()
        .unwrap_or(DEFAULT_CAPACITY_MAX_RATE);
    let cap =
        rate::parse(cap_text).map_err(|e| format!("reflector {r}: capacity_max_rate: {e}"))?;
    if shape.max_bps > cap.bps() {
        return Err(format!(
            "{what}: max_rate {} is above what reflector {} allows ({}): lower max_rate, or raise its capacity_max_rate",
            Rate(shape.max_bps),
            r,
            cap
        ));
    }
    let stage_text = consent
        .capacity_max_stage
        .as_deref()
        .unwrap_or(DEFAULT_CAPACITY_MAX_STAGE);
    let max_stage = humantime::parse_duration(stage_text)
        .map_err(|e| format!("reflector {r}: capacity_max_stage: {e}"))?;
    if shape.stage > max_stage {
        return Err(format!(
            "{what}: stage_duration {} is longer than reflector {} allows ({stage_text}): shorten it, or raise its capacity_max_stage",
            humantime::format_duration(shape.stage),
            r
        ));
    }
    Ok(())
}

/// How the plans of `new` differ from those of `old`, agent by agent: a line each for an
/// agent added or removed, and for each path added, removed or changed (with its fields).
pub fn diff(old: &Fleet, new: &Fleet) -> Vec<String> {
    let mut out = Vec::new();
    let agents: BTreeSet<&String> = old.plans.keys().chain(new.plans.keys()).collect();
    for agent in agents {
        match (old.plans.get(agent), new.plans.get(agent)) {
            (None, Some(p)) => out.push(format!(
                "{agent}: new agent, {} path{}{}",
                p.plan.paths.len(),
                if p.plan.paths.len() == 1 { "" } else { "s" },
                if p.plan.reflector.is_some() {
                    ", reflects"
                } else {
                    ""
                }
            )),
            (Some(_), None) => out.push(format!("{agent}: removed from the fleet")),
            (Some(a), Some(b)) if a.plan.version == b.plan.version => {}
            (Some(a), Some(b)) => out.extend(plan_diff(agent, &a.plan, &b.plan)),
            (None, None) => {}
        }
    }
    out
}

fn plan_diff(agent: &str, a: &FleetPlan, b: &FleetPlan) -> Vec<String> {
    let mut out = Vec::new();
    if a.site != b.site {
        out.push(format!("{agent}: site {} -> {}", a.site, b.site));
    }
    if a.reflector != b.reflector {
        out.push(format!(
            "{agent}: reflector {}",
            match (&a.reflector, &b.reflector) {
                (None, Some(_)) => "added",
                (Some(_), None) => "removed",
                _ => "changed",
            }
        ));
    }
    let by_name = |p: &FleetPlan| -> BTreeMap<String, serde_json::Value> {
        let paths = p
            .paths
            .iter()
            .map(|x| (format!("path {}", x.name), serde_json::to_value(x)));
        let drills = p
            .drills
            .iter()
            .map(|x| (format!("drill {}", x.name), serde_json::to_value(x)));
        let tests = p
            .capacity
            .iter()
            .map(|x| (format!("capacity {}", x.name), serde_json::to_value(x)));
        paths
            .chain(drills)
            .chain(tests)
            .map(|(k, v)| (k, v.unwrap_or_default()))
            .collect()
    };
    let (pa, pb) = (by_name(a), by_name(b));
    for name in pa.keys().chain(pb.keys()).collect::<BTreeSet<_>>() {
        match (pa.get(name), pb.get(name)) {
            (None, Some(_)) => out.push(format!("{agent}: {name} added")),
            (Some(_), None) => out.push(format!("{agent}: {name} removed")),
            (Some(x), Some(y)) if x != y => {
                let fields: Vec<String> = x
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(k, v)| y.get(k.as_str()) != Some(v))
                    .map(|(k, v)| format!("{k} {} -> {}", show(v), show(&y[k.as_str()])))
                    .collect();
                out.push(format!("{agent}: {name} changed: {}", fields.join(", ")));
            }
            _ => {}
        }
    }
    out
}

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "none".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
[budget]
max_rate_per_agent = 100

[[site]]
name = "ams"
tags = ["onprem"]
agents = ["ams-1", "ams-2"]

[[site]]
name = "branch"
tags = ["branch"]
agents = ["br-1"]

[[site]]
name = "weu"
tags = ["azure"]
agents = ["weu-1"]

[[reflector]]
agent = "weu-1"
addresses = { expressroute = "10.1.0.4:862", vpn = "10.2.0.4:862" }
settings = { stateful = true }

[[template]]
name = "er"
kind = "expressroute"
rate = 20
dscp = 46
pin = [{ agent = "ams-1", interface = "eth1" }]

[[template]]
name = "vpn"
kind = "vpn"
rate = 10

[[mesh]]
name = "onprem-to-azure"
from = { tags = ["onprem"] }
to = { tags = ["azure"] }
templates = ["er", "vpn"]

[[mesh]]
name = "branches"
from = { sites = ["branch"] }
to = { agents = ["weu-1"] }
templates = ["vpn"]
"#;

    fn names(f: &Fleet, agent: &str) -> Vec<String> {
        f.plans[agent]
            .plan
            .paths
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    #[test]
    fn the_mesh_expands_to_what_its_rules_say() {
        let f = expand("fleet.toml", EXAMPLE).unwrap();
        assert_eq!(names(&f, "ams-1"), ["er-weu-1", "vpn-weu-1"]);
        assert_eq!(names(&f, "ams-2"), ["er-weu-1", "vpn-weu-1"]);
        assert_eq!(
            names(&f, "br-1"),
            ["vpn-weu-1"],
            "branches over the VPN only"
        );
        assert!(
            names(&f, "weu-1").is_empty(),
            "a reflector does not probe itself"
        );
        let ams1 = &f.plans["ams-1"].plan;
        assert_eq!(ams1.site, "ams");
        let er = &ams1.paths[0];
        assert_eq!(
            (er.target.as_str(), er.rate, er.dscp),
            ("10.1.0.4:862", Some(20), 46)
        );
        assert_eq!(er.interface.as_deref(), Some("eth1"), "pinned on ams-1");
        assert_eq!(f.plans["ams-2"].plan.paths[0].interface, None);
        assert_eq!(ams1.paths[1].target, "10.2.0.4:862");
        let weu = &f.plans["weu-1"].plan;
        assert!(weu.reflector.as_ref().unwrap().stateful);
        assert!(ams1.reflector.is_none());
        // The version is the plan's: the same file gives the same ones.
        let again = expand("fleet.toml", EXAMPLE).unwrap();
        assert_eq!(f.plans["ams-1"].etag, again.plans["ams-1"].etag);
        assert_ne!(f.plans["ams-1"].etag, f.plans["br-1"].etag);
    }

    #[test]
    fn a_change_to_one_site_changes_only_its_agents_plans() {
        let f = expand("fleet.toml", EXAMPLE).unwrap();
        let changed = EXAMPLE.replace(
            "from = { sites = [\"branch\"] }\nto = { agents = [\"weu-1\"] }\ntemplates = [\"vpn\"]",
            "from = { sites = [\"branch\"] }\nto = { agents = [\"weu-1\"] }\ntemplates = [\"vpn\", \"er\"]",
        );
        let g = expand("fleet.toml", &changed).unwrap();
        assert_eq!(f.plans["ams-1"].etag, g.plans["ams-1"].etag);
        assert_ne!(f.plans["br-1"].etag, g.plans["br-1"].etag);
        assert_eq!(diff(&f, &g), ["br-1: path er-weu-1 added"]);
        let faster = EXAMPLE.replace("rate = 10\n", "rate = 15\n");
        let h = expand("fleet.toml", &faster).unwrap();
        assert_eq!(
            diff(&f, &h),
            [
                "ams-1: path vpn-weu-1 changed: rate 10 -> 15",
                "ams-2: path vpn-weu-1 changed: rate 10 -> 15",
                "br-1: path vpn-weu-1 changed: rate 10 -> 15",
            ]
        );
    }

    #[test]
    fn a_drill_is_planned_at_its_next_occurrence_for_the_agents_it_selects() {
        let drill = "\n[[drill]]\nname = \"er-drill\"\nagents = { sites = [\"ams\"] }\nschedule = \"0 2 * * SUN\"\nduration = \"30m\"\nsettings = { target = \"10.9.0.10:862\", primary = \"10.1.0.4:862\", rate = 500 }\n";
        let text = format!("{EXAMPLE}{drill}");
        // Thursday 2026-12-03 12:00 UTC: the next window is Sunday 2026-12-06 02:00.
        let thursday = 1_796_299_200_000_000_000;
        let f = expand_at("fleet.toml", &text, thursday).unwrap();
        let d = &f.plans["ams-1"].plan.drills[0];
        assert_eq!(d.start.as_deref(), Some("2026-12-06T02:00:00Z"));
        assert_eq!((d.target.as_str(), d.rate), ("10.9.0.10:862", Some(500)));
        assert!(
            f.plans["br-1"].plan.drills.is_empty(),
            "only the agents it selects"
        );
        let sunday_0200 = 1_796_522_400_000_000_000;
        assert_eq!(f.next_change_ns, Some(sunday_0200 + 1_800_000_000_000));
        // Under way at 02:10: still that window; after it, the next Sunday's.
        let during = expand_at("fleet.toml", &text, sunday_0200 + 600_000_000_000).unwrap();
        assert_eq!(
            during.plans["ams-1"].plan.drills[0].start.as_deref(),
            Some("2026-12-06T02:00:00Z")
        );
        let after = expand_at("fleet.toml", &text, sunday_0200 + 1_800_000_000_000).unwrap();
        assert_eq!(
            after.plans["ams-1"].plan.drills[0].start.as_deref(),
            Some("2026-12-13T02:00:00Z")
        );
        assert_eq!(
            diff(&f, &after),
            [
                "ams-1: drill er-drill changed: start 2026-12-06T02:00:00Z -> 2026-12-13T02:00:00Z",
                "ams-2: drill er-drill changed: start 2026-12-06T02:00:00Z -> 2026-12-13T02:00:00Z",
            ]
        );
        let e = error(&format!(
            "{EXAMPLE}{}",
            drill.replace("0 2 * * SUN", "0 2 * * FUNDAY")
        ));
        assert!(
            e.starts_with("fleet.toml:49:") && e.contains("schedule `0 2 * * FUNDAY`"),
            "{e}"
        );
        let e = error(&format!(
            "{EXAMPLE}{}",
            drill.replace("rate = 500", "rat = 500")
        ));
        assert!(
            e.contains("drill `er-drill`: settings:") && e.contains("rat"),
            "{e}"
        );
        let once = drill.replace(
            "schedule = \"0 2 * * SUN\"",
            "start = \"2026-12-01T02:00:00Z\"",
        );
        let past = expand_at("fleet.toml", &format!("{EXAMPLE}{once}"), thursday).unwrap();
        assert!(
            past.plans["ams-1"].plan.drills.is_empty(),
            "a one-off drill whose window passed"
        );
    }

    fn error(text: &str) -> String {
        expand("fleet.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn a_capacity_test_needs_a_far_end_that_consents_and_a_window_it_fits() {
        let consenting = EXAMPLE.replace(
            "settings = { stateful = true }",
            "settings = { stateful = true, allow_capacity = true, capacity_max_rate = \"1gbit\" }",
        );
        let test = "\n[[capacity]]\nname = \"er-size\"\nagent = \"ams-1\"\nreflector = \"weu-1\"\nvia = \"er\"\nschedule = \"0 3 * * SUN\"\nduration = \"30m\"\nmax_rate = \"500mbit\"\nsettings = { steps = 5, direction = \"both\" }\n";
        let thursday = 1_796_299_200_000_000_000;
        let planned = format!("{consenting}{test}");
        let f = expand_at("fleet.toml", &planned, thursday).unwrap();
        let c = &f.plans["ams-1"].plan.capacity[0];
        assert_eq!(c.start.as_deref(), Some("2026-12-06T03:00:00Z"));
        assert_eq!(
            (c.target.as_str(), c.max_rate.as_str()),
            ("10.1.0.4:862", "500mbit")
        );
        assert_eq!(
            c.interface.as_deref(),
            Some("eth1"),
            "the template's pin for ams-1"
        );
        assert!(f.plans["ams-2"].plan.capacity.is_empty(), "its agent alone");
        let sunday_0300 = 1_796_526_000_000_000_000;
        assert_eq!(f.next_change_ns, Some(sunday_0300 + 1_800_000_000_000));
        let e = |t: &str| {
            expand_at("fleet.toml", t, thursday)
                .unwrap_err()
                .to_string()
        };

        let no_consent = e(&format!("{EXAMPLE}{test}"));
        assert!(
            no_consent.starts_with("fleet.toml:49:")
                && no_consent.contains("reflector weu-1 does not take part in capacity tests")
                && no_consent.contains("allow_capacity = true"),
            "{no_consent}"
        );
        let too_fast = e(&format!("{consenting}{}", test.replace("500mbit", "2gbit")));
        assert!(
            too_fast.contains(
                "max_rate 2.00 Gbit/s is above what reflector weu-1 allows (1.00 Gbit/s)"
            ),
            "{too_fast}"
        );
        let too_short = e(&format!("{consenting}{}", test.replace("30m", "1m")));
        assert!(
            too_short.contains("can take up to 1m 20s") && too_short.contains("window of 1m"),
            "{too_short}"
        );
        let long_stage = e(&format!(
            "{consenting}{}",
            test.replace("steps = 5", "steps = 5, stage_duration = \"2m\"")
        ));
        assert!(
            long_stage.contains("stage_duration 2m is longer than reflector weu-1 allows (60s)"),
            "{long_stage}"
        );
        let not_reflecting = e(&format!(
            "{consenting}{}",
            test.replace("reflector = \"weu-1\"", "reflector = \"ams-2\"")
        ));
        assert!(
            not_reflecting.contains("agent ams-2 does not reflect"),
            "{not_reflecting}"
        );
        let no_address = e(&format!(
            "{consenting}{}",
            test.replace("via = \"er\"", "via = \"internet\"")
        ));
        assert!(
            no_address.contains("reflector weu-1 has no address for `internet`"),
            "{no_address}"
        );
        let overlap = e(&format!(
            "{consenting}{test}{}",
            test.replace("er-size", "er-size-2")
                .replace("ams-1", "ams-2")
        ));
        assert!(
            overlap.starts_with("fleet.toml:59:")
                && overlap.contains(
                    "capacity `er-size-2` and capacity `er-size` would load reflector weu-1 at once"
                ),
            "{overlap}"
        );
        let own_field = e(&format!(
            "{consenting}{}",
            test.replace("steps = 5", "target = \"10.9.9.9:862\"")
        ));
        assert!(
            own_field.contains("settings must not set `target`"),
            "{own_field}"
        );
    }

    #[test]
    fn each_mistake_names_its_line_and_the_fix() {
        let twice = EXAMPLE.replace("agents = [\"br-1\"]", "agents = [\"br-1\", \"ams-2\"]");
        let e = error(&twice);
        assert!(
            e.starts_with("fleet.toml:13:")
                && e.contains("agent ams-2 is in site `ams` and in site `branch`"),
            "{e}"
        );

        let nothing = EXAMPLE.replace(
            "to = { agents = [\"weu-1\"] }",
            "to = { agents = [\"br-1\"] }",
        );
        let e = error(&nothing);
        assert!(
            e.contains("fleet.toml:46:") && e.contains("agent br-1, which does not reflect"),
            "{e}"
        );

        let to_self = format!(
            "{EXAMPLE}\n[[mesh]]\nfrom = {{ agents = [\"weu-1\"] }}\nto = {{ agents = [\"weu-1\"] }}\ntemplates = [\"vpn\"]\n"
        );
        let e = error(&to_self);
        assert!(
            e.contains("fleet.toml:49:") && e.contains("expands to nothing"),
            "{e}"
        );

        let no_reflector =
            EXAMPLE.replace("to = { tags = [\"azure\"] }", "to = { sites = [\"ams\"] }");
        let e = error(&no_reflector);
        assert!(
            e.contains("fleet.toml:40:") && e.contains("no agent reflects"),
            "{e}"
        );

        let over = EXAMPLE.replace("rate = 20\n", "rate = 95\n");
        let e = error(&over);
        assert!(
            e.contains("fleet.toml:8:") && e.contains("agent ams-1 would send 105 probes/s (er-weu-1 95/s, vpn-weu-1 10/s), above the budget of 100/s"),
            "{e}"
        );

        let unknown = EXAMPLE.replace("templates = [\"vpn\"]", "templates = [\"vnp\"]");
        let e = error(&unknown);
        assert!(
            e.contains("fleet.toml:47:") && e.contains("template `vnp`"),
            "{e}"
        );

        let syntax = EXAMPLE.replace("rate = 10\n", "rate = fast\n");
        let e = error(&syntax);
        assert!(e.starts_with("fleet.toml:35:"), "{e}");

        let field = EXAMPLE.replace("rate = 10\n", "rat = 10\n");
        let e = error(&field);
        assert!(e.starts_with("fleet.toml:35:") && e.contains("rat"), "{e}");

        let no_address = EXAMPLE.replace(", vpn = \"10.2.0.4:862\"", "");
        let e = error(&no_address);
        assert!(e.contains("reflector weu-1's address for `vpn`"), "{e}");
    }
}
