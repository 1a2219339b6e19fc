//! The fleet file on a collector, and three agents (two on-prem, one Azure reflector) on
//! loopback that follow it: each probes exactly its expanded paths, takes a changed plan
//! live (a changed path restarts, a new one starts, a removed one stops with its last
//! window delivered, an unchanged one loses and repeats no window), and keeps its plan
//! when the file is broken.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use pathprobe_collector::serve::plan::FleetState;
use pathprobe_collector::serve::{ServeConfig, Tokens};
use pathprobe_collector::store::{Selector, SqliteStore, Store};

mod common;

use common::{AGENT, Collector, free_tcp, now_ns};

const AGENTS: [&str; 3] = ["a-1", "a-2", "r-1"];

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The fleet: a-1 and a-2 in site `ams` (on-prem), r-1 reflecting in `weu` (Azure), and
/// `templates` from the on-prem site to it.
fn fleet(reflector: SocketAddr, er_rate: u32, templates: &[&str]) -> String {
    let list: Vec<String> = templates.iter().map(|t| format!("\"{t}\"")).collect();
    format!(
        r#"[[site]]
name = "ams"
tags = ["onprem"]
agents = ["a-1", "a-2"]

[[site]]
name = "weu"
tags = ["azure"]
agents = ["r-1"]

[[reflector]]
agent = "r-1"
addresses = {{ expressroute = "{reflector}", vpn = "{reflector}", internet = "{reflector}", other = "{reflector}" }}
settings = {{ listen = "{reflector}" }}

[[template]]
name = "er"
kind = "expressroute"
rate = {er_rate}
window = "1s"
timeout = "300ms"
ssid = 1

[[template]]
name = "vpn"
kind = "vpn"
rate = 20
window = "1s"
timeout = "300ms"
ssid = 2

[[template]]
name = "old"
kind = "other"
rate = 20
window = "1s"
timeout = "300ms"
ssid = 3

[[template]]
name = "inet"
kind = "internet"
rate = 20
window = "1s"
timeout = "300ms"
ssid = 4

[[mesh]]
from = {{ tags = ["onprem"] }}
to = {{ tags = ["azure"] }}
templates = [{}]
"#,
        list.join(", ")
    )
}

/// Starts agent `id`, with an agent.toml that names only its collector (so it follows the
/// fleet plan), asking for it every second.
fn start_agent(dir: &Path, id: &str, collector: SocketAddr) -> (Child, PathBuf) {
    let token = format!("fleet-test-token-{id}-0123456789");
    common::write_secret(&dir.join(format!("{id}.token")), &token);
    let config = dir.join(format!("{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "agent_id = \"{id}\"\n[collector]\nurl = \"http://{collector}\"\ntoken_file = \"{id}.token\"\nspool_dir = \"spool-{id}\"\nplan_poll = \"1s\"\n"
        ),
    )
    .unwrap();
    let log = dir.join(format!("{id}.log"));
    (common::run_agent(Command::new(AGENT), &config, &log), log)
}

fn stop(mut agent: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    assert!(agent.wait().unwrap().success());
}

/// Per agent, per path name: the windows stored, (start, end), oldest first.
fn stored(store: &dyn Store) -> BTreeMap<(String, String), Vec<(u64, u64)>> {
    let mut out: BTreeMap<(String, String), Vec<(u64, u64)>> = BTreeMap::new();
    let rows = store.paths().unwrap();
    for name in ["er-r-1", "vpn-r-1", "old-r-1", "inet-r-1"] {
        let sel = Selector {
            name_or_kind: name.into(),
            site: None,
        };
        for w in store.windows(&sel).unwrap() {
            let p = rows.iter().find(|p| p.id == w.path_id).unwrap();
            out.entry((p.agent_id.clone(), p.name.clone()))
                .or_default()
                .push((w.start_ns, w.end_ns));
        }
    }
    for w in out.values_mut() {
        w.sort_unstable();
    }
    out
}

/// A fresh test folder `name`, with the three agents' tokens, a reflector address, and the
/// fleet file (written with `templates`).
fn lab(name: &str, templates: &[&str]) -> (PathBuf, SocketAddr, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pathprobe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = AGENTS
        .map(|id| format!("agent {id} fleet-test-token-{id}-0123456789"))
        .join("\n");
    common::write_secret(&dir.join("tokens"), &tokens);
    let reflector = free_udp();
    let fleet_file = dir.join("fleet.toml");
    std::fs::write(&fleet_file, fleet(reflector, 20, templates)).unwrap();
    (dir, reflector, fleet_file)
}

#[test]
fn three_agents_follow_the_fleet_file_live() {
    let (dir, reflector, fleet_file) = lab("fleet", &["er", "vpn", "old"]);
    let (collector, collector_addr) = fleet_collector(&dir, &fleet_file);
    let mut agents: Vec<(Child, PathBuf)> = AGENTS
        .iter()
        .map(|id| start_agent(&dir, id, collector_addr))
        .collect();
    for (_, log) in &agents[..2] {
        common::wait_for_log(log, "probing", 3, Duration::from_secs(20));
    }
    common::wait_for_log(&agents[2].1, "reflecting", 1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));

    // er faster, vpn as it was, old gone, inet new.
    std::fs::write(&fleet_file, fleet(reflector, 40, &["er", "vpn", "inet"])).unwrap();
    let changed_at = now_ns();
    for (_, log) in &agents[..2] {
        let text = common::wait_for_log(log, "configuration reloaded", 1, Duration::from_secs(20));
        assert!(
            text.contains(r#"restarted=["er-r-1"] started=["inet-r-1"] stopped=["old-r-1"]"#)
                && text.contains("unchanged=1"),
            "{text}"
        );
    }
    std::thread::sleep(Duration::from_secs(3));

    // A broken file is refused: the plans stay, and the agents run on as they were.
    std::fs::write(&fleet_file, "[[site]]\nname = \"ams\"\nagents = [\"a-1\"]\n[[site]]\nname = \"x\"\nagents = [\"a-1\"]\n").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let metrics = ureq::get(&format!("http://{collector_addr}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains("pathprobe_collector_fleet_refused{reason=\"")
            && metrics.contains("agent a-1 is in site `ams` and in site `x`"),
        "{metrics}"
    );
    for (_, log) in &agents[..2] {
        let text = std::fs::read_to_string(log).unwrap();
        assert_eq!(text.matches("configuration reloaded").count(), 1, "{text}");
    }
    for (child, _) in agents.drain(..) {
        stop(child);
    }
    let stopped_at = now_ns();
    collector.stop();

    let store = SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
    let got = stored(&store);
    let keys: Vec<(String, String)> = got.keys().cloned().collect();
    let want: Vec<(String, String)> = ["a-1", "a-2"]
        .iter()
        .flat_map(|a| {
            ["er-r-1", "inet-r-1", "old-r-1", "vpn-r-1"]
                .map(move |p| ((*a).to_string(), p.to_string()))
        })
        .collect();
    assert_eq!(keys, want, "each agent probes exactly its expanded paths");
    for a in ["a-1", "a-2"] {
        // vpn: one session from before the change to the end, no gap, no overlap.
        let vpn = &got[&(a.to_string(), "vpn-r-1".to_string())];
        for pair in vpn.windows(2) {
            assert_eq!(
                pair[0].1, pair[1].0,
                "{a} vpn: a gap or an overlap: {vpn:?}"
            );
        }
        assert!(
            vpn[0].0 < changed_at && vpn.last().unwrap().1 > changed_at,
            "{vpn:?}"
        );
        // old: its last window reached the collector, after the change.
        let old = &got[&(a.to_string(), "old-r-1".to_string())];
        assert!(old.last().unwrap().1 >= changed_at, "{a} old: {old:?}");
        let inet = &got[&(a.to_string(), "inet-r-1".to_string())];
        assert!(
            inet[0].0 >= changed_at && inet.last().unwrap().1 <= stopped_at,
            "{a} inet: {inet:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let body = ureq::get(&format!("http://{addr}{path}"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

/// The agents' row of `/v1/agents`.
fn agent_row(addr: SocketAddr, id: &str) -> serde_json::Value {
    get_json(addr, "/v1/agents")
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent_id"] == id)
        .unwrap()
        .clone()
}

/// Waits until `/v1/events` has `n` events of `kind`.
fn wait_for_events(addr: SocketAddr, kind: &str, n: usize) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = get_json(addr, &format!("/v1/events?kind={kind}&since=1h"));
        if events.as_array().unwrap().len() >= n {
            return events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {kind} event: {events}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn agents_run_on_their_cached_plan_while_the_collector_is_away_and_silence_is_an_event() {
    let (dir, _, fleet_file) = lab("fleet-away", &["er"]);
    let collector_addr = free_tcp();
    let start_collector = || {
        Collector::start_with(ServeConfig {
            tokens: Some(Tokens::load(&dir.join("tokens")).unwrap()),
            fleet: Some(Arc::new(FleetState::load(fleet_file.clone()).unwrap())),
            ..ServeConfig::lab(collector_addr, dir.join("store.db"))
        })
    };
    let collector = start_collector();
    let mut agents: BTreeMap<&str, (Child, PathBuf)> = AGENTS
        .iter()
        .map(|id| (*id, start_agent(&dir, id, collector_addr)))
        .collect();
    for id in ["a-1", "a-2"] {
        common::wait_for_log(&agents[id].1, "probing", 1, Duration::from_secs(20));
    }
    std::thread::sleep(Duration::from_secs(3));
    for id in AGENTS {
        let row = agent_row(collector_addr, id);
        assert_eq!(row["fetched_version"], row["plan_version"], "{row}");
        assert_eq!(row["not_reporting"], serde_json::json!([]), "{row}");
    }

    // a-2 stops: its path is silent after 3 windows, and listed as not reporting.
    let (a2, _) = agents.remove("a-2").unwrap();
    stop(a2);
    let silent = wait_for_events(collector_addr, "path_silent", 1);
    assert!(
        silent[0]["agent_id"] == "a-2" && silent[0]["path"] == "er-r-1",
        "{silent}"
    );
    assert_eq!(
        agent_row(collector_addr, "a-2")["not_reporting"],
        serde_json::json!(["er-r-1"])
    );

    // The collector goes away; a-1 restarts, and a-2 comes back, on their cached plans.
    collector.stop();
    let away_from = now_ns();
    let (a1, _) = agents.remove("a-1").unwrap();
    stop(a1);
    for id in ["a-1", "a-2"] {
        let (child, log) = start_agent(&dir, id, collector_addr);
        let text = common::wait_for_log(&log, "probing", 1, Duration::from_secs(20));
        assert!(text.contains("starting on the cached fleet plan"), "{text}");
        agents.insert(id, (child, log));
    }
    std::thread::sleep(Duration::from_secs(4));
    let away_to = now_ns();
    let collector = start_collector();
    let resumed = wait_for_events(collector_addr, "path_resumed", 1);
    assert!(resumed[0]["agent_id"] == "a-2", "{resumed}");
    std::thread::sleep(Duration::from_secs(2));
    for (_, (child, _)) in std::mem::take(&mut agents) {
        stop(child);
    }
    collector.stop();

    // What a-1 and a-2 measured while the collector was away reached it.
    let store = SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
    let got = stored(&store);
    for a in ["a-1", "a-2"] {
        let w = &got[&(a.to_string(), "er-r-1".to_string())];
        assert!(
            w.iter().any(|(s, e)| *s >= away_from && *e <= away_to),
            "{a}: no window from the time away: {w:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A drill in the fleet file runs on the agent it selects, at its time: the service's only
/// path goes dark for 400 ms through the emulator, and the outage reaches the collector.
/// A collector on loopback with the lab's tokens, serving `fleet_file`.
fn fleet_collector(dir: &Path, fleet_file: &Path) -> (Collector, SocketAddr) {
    let addr = free_tcp();
    let collector = Collector::start_with(ServeConfig {
        tokens: Some(Tokens::load(&dir.join("tokens")).unwrap()),
        fleet: Some(Arc::new(
            FleetState::load(fleet_file.to_path_buf()).unwrap(),
        )),
        ..ServeConfig::lab(addr, dir.join("store.db"))
    });
    (collector, addr)
}

#[test]
fn a_drill_in_the_fleet_file_runs_on_its_agent_at_its_time() {
    let (dir, _, fleet_file) = lab("fleet-drill", &["er"]);
    let r = common::Reflector::start(&[]);
    let em = common::emulator(r.addr, "delay=1ms,blackout=3500ms+400ms", "delay=1ms");
    let start =
        humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(2));
    let mut text = std::fs::read_to_string(&fleet_file).unwrap();
    let _ = write!(
        text,
        "\n[[drill]]\nname = \"service\"\nagents = {{ agents = [\"a-1\"] }}\nstart = \"{start}\"\nduration = \"20s\"\nsettings = {{ target = \"{}\", primary = \"{}\", rate = 500, settle = \"1s\", window = \"1s\", max_outage = \"10s\" }}\n",
        em.1, r.addr
    );
    std::fs::write(&fleet_file, text).unwrap();
    let (collector, collector_addr) = fleet_collector(&dir, &fleet_file);
    let (agent, log) = start_agent(&dir, "a-1", collector_addr);
    let text = common::wait_for_log(&log, "drill passed", 1, Duration::from_secs(25));
    assert!(text.contains("drill scheduled"), "{text}");
    std::thread::sleep(Duration::from_secs(2));
    stop(agent);
    collector.stop();
    let store = SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
    let sel = Selector {
        name_or_kind: "service".into(),
        site: None,
    };
    let events = store.events(&sel, 0, now_ns(), None, 10).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].agent_id, "a-1");
    let o = events[0].event.outage.as_ref().unwrap();
    // 500 probes/s: within two 2 ms intervals of the 400 ms injected (forward only).
    assert!((o.outage_ms - 400.0).abs() <= 4.0, "{}", o.outage_ms);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_capacity_test_in_the_fleet_file_runs_against_the_reflector_that_consents() {
    let (dir, reflector, fleet_file) = lab("fleet-capacity", &["er"]);
    let start =
        humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(3));
    let text = std::fs::read_to_string(&fleet_file).unwrap().replace(
        &format!("settings = {{ listen = \"{reflector}\" }}"),
        &format!(
            "settings = {{ listen = \"{reflector}\", allow_capacity = true, capacity_max_rate = \"20mbit\", capacity_max_stage = \"2s\" }}"
        ),
    );
    let text = format!(
        "{text}\n[[capacity]]\nname = \"er-size\"\nagent = \"a-1\"\nreflector = \"r-1\"\nvia = \"er\"\nstart = \"{start}\"\nduration = \"60s\"\nmax_rate = \"8mbit\"\nsettings = {{ start_rate = \"2mbit\", steps = 3, stage_duration = \"1s\", size = 972 }}\n"
    );
    std::fs::write(&fleet_file, text).unwrap();
    let (collector, collector_addr) = fleet_collector(&dir, &fleet_file);
    let (far, far_log) = start_agent(&dir, "r-1", collector_addr);
    common::wait_for_log(
        &far_log,
        "capacity tests allowed",
        1,
        Duration::from_secs(15),
    );
    let (near, log) = start_agent(&dir, "a-1", collector_addr);
    let text = common::wait_for_log(&log, "capacity test done", 1, Duration::from_secs(40));
    assert!(text.contains("capacity test scheduled"), "{text}");
    let stages = text.matches("capacity stage").count();
    assert!(
        (3..=6).contains(&stages),
        "three stages, each measured at most twice: {text}"
    );
    // Its stage reports reach the collector before the agent stops.
    std::thread::sleep(Duration::from_secs(2));
    stop(near);
    stop(far);
    collector.stop();
    let store = SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
    let sel = Selector {
        name_or_kind: "er-size".into(),
        site: None,
    };
    let m = store.query(&sel, 0, now_ns()).unwrap();
    assert!(
        (3..=6).contains(&m.aggregate.windows),
        "{}",
        m.aggregate.windows
    );
    let rows = store.paths().unwrap();
    let path = rows.iter().find(|p| p.name == "er-size").unwrap();
    assert_eq!(path.agent_id, "a-1");
    assert_eq!(path.remote, reflector.to_string());
    let tput = &m.aggregate.histograms[&pathprobe_proto::hist::Metric::Throughput];
    // Ten 100 ms intervals a stage; loopback carries every stage's load (2, 5 and 8
    // Mbit/s), and the far end never sends more than it was offered.
    assert!(tput.len() >= 27, "{} intervals", tput.len());
    assert!(
        (7_000_000..=8_800_000).contains(&tput.max()),
        "the last stage (8 Mbit/s offered) delivered {} bit/s at most",
        tput.max()
    );
    // The last stage's report carries the run's result: every stage, and the knee.
    let events = store
        .events(
            &sel,
            0,
            now_ns(),
            Some(pathprobe_proto::event::EventKind::CapacityTest),
            10,
        )
        .unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let rec = events[0].event.capacity.as_ref().unwrap();
    assert_eq!(rec.stages.len() as u64, m.aggregate.windows, "{rec:?}");
    assert!(
        rec.stages.iter().all(|s| s.passed),
        "loopback carries 8 Mbit/s: {rec:?}"
    );
    assert!(
        !rec.saturated,
        "no stage failed: the capacity is a lower bound"
    );
    assert!(rec.capacity_bps.is_some_and(|c| c >= 7_000_000), "{rec:?}");
    assert!(
        rec.conclusion[1].starts_with("usable capacity: at least"),
        "{:?}",
        rec.conclusion
    );
    let _ = std::fs::remove_dir_all(&dir);
}
