//! `pathprobe-agent run` against a collector that goes away for a minute: the agent keeps
//! measuring, spools its reports, and the collector ends up with every window, once.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pathprobe_collector::store::{SqliteStore, Store};

mod common;

use common::{AGENT, Collector, free_tcp, now_ns};
const TOKEN: &str = "daemon-test-token-0123456789";

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn spooled(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count()
    })
}

fn run_agent(config: &Path, log: &Path) -> std::process::Child {
    common::run_agent(Command::new(AGENT), config, log)
}

#[test]
fn the_collector_gets_every_window_after_a_minute_away() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("pathprobe-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::write_secret(&dir.join("tokens"), &format!("t-agent {TOKEN}\n"));
    let (collector_addr, reflector) = (free_tcp(), free_udp());
    let spool = dir.join("spool");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "t-agent"
site = "lab"
[collector]
url = "http://{collector_addr}"
token = "{TOKEN}"
spool_dir = "{}"
[reflector]
listen = "{reflector}"
[[path]]
name = "er"
kind = "expressroute"
target = "{reflector}"
rate = 20
window = "2s"
[[path]]
name = "vpn"
kind = "vpn"
target = "{reflector}"
rate = 20
window = "2s"
"#,
            spool.display()
        ),
    )
    .unwrap();

    let collector = Collector::start(&dir, collector_addr);
    let log = dir.join("agent.log");
    let mut agent = run_agent(&config, &log);
    std::thread::sleep(Duration::from_secs(5));
    collector.stop();

    // A minute without a collector: the agent keeps measuring and spools.
    std::thread::sleep(Duration::from_mins(1));
    let waiting = spooled(&spool);
    assert!(
        waiting >= 50,
        "about 2 × 30 windows should wait in the spool, found {waiting}"
    );

    let collector = Collector::start(&dir, collector_addr);
    let deadline = Instant::now() + Duration::from_mins(1);
    while spooled(&spool) > 0 {
        assert!(
            Instant::now() < deadline,
            "the spool did not drain: {} left",
            spooled(&spool)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    assert!(agent.wait().unwrap().success());
    collector.stop();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("collector unreachable"),
        "the outage is logged"
    );
    let store = SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
    let paths = store.paths().unwrap();
    for name in ["er", "vpn"] {
        let logged = text
            .lines()
            .filter(|l| l.contains(&format!(" {name} sent ")))
            .count() as u64;
        let stored = paths.iter().find(|p| p.name == name).unwrap().windows;
        assert!(logged >= 30, "{name}: {logged} windows in 65 s");
        assert_eq!(
            stored, logged,
            "{name}: every window the agent measured is stored, once"
        );
    }
}

#[test]
fn a_scheduled_drill_runs_in_its_window_and_its_outage_reaches_the_collector() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("pathprobe-daemon-drill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::write_secret(&dir.join("tokens"), &format!("d-agent {TOKEN}\n"));
    let collector_addr = free_tcp();
    let collector = Collector::start(&dir, collector_addr);
    let r = common::Reflector::start(&[]);
    // The service's only path goes dark for 400 ms, 2.5 s after the emulator starts.
    let em = common::emulator(r.addr, "delay=1ms,blackout=2500ms+400ms", "delay=1ms");
    let start =
        humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(1));
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"agent_id = "d-agent"
[collector]
url = "http://{collector_addr}"
token = "{TOKEN}"
spool_dir = "spool"
[reflector]
listen = "{}"
[[drill]]
name = "service"
target = "{}"
primary = "{}"
rate = 500
start = "{start}"
duration = "20s"
settle = "1s"
window = "1s"
max_outage = "10s"
"#,
            free_udp(),
            em.1,
            r.addr
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let mut agent = run_agent(&config, &log);
    // The outage ends the drill (the primary failed and recovered in place): it passes
    // long before its 20 s window closes.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("drill passed")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Reports go out as the uploader's batches leave; give it a moment, then stop. The
    // finished drill stopped only itself: the agent (its reflector) is still running.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent outlives its drill"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    assert!(agent.wait().unwrap().success());
    collector.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("drill scheduled") && text.contains("primary → primary"),
        "{text}"
    );
    let store = SqliteStore::open_read_only(&dir.join("store.db")).unwrap();
    let sel = pathprobe_collector::store::Selector {
        name_or_kind: "service".into(),
        site: None,
    };
    let events = store.events(&sel, 0, u64::MAX, None, 10).unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let o = events[0].event.outage.as_ref().unwrap();
    // 500 probes/s: within two 2 ms intervals of the 400 ms injected (forward only).
    assert!((o.outage_ms - 400.0).abs() <= 4.0, "{}", o.outage_ms);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The windows the collector holds for the path `name`, per stored path row (a changed
/// packet size is a new row), oldest first.
fn stored_windows(store: &dyn Store, name: &str) -> Vec<(u16, Vec<(u64, u64)>)> {
    let sel = pathprobe_collector::store::Selector {
        name_or_kind: name.into(),
        site: None,
    };
    let rows = store.paths().unwrap();
    let windows = store.windows(&sel).unwrap();
    rows.iter()
        .filter(|p| p.name == name)
        .map(|p| {
            let w = windows
                .iter()
                .filter(|w| w.path_id == p.id)
                .map(|w| (w.start_ns, w.end_ns))
                .collect();
            (p.packet_size, w)
        })
        .collect()
}

fn wait_for_log(log: &Path, text: &str, times: usize) {
    common::wait_for_log(log, text, times, Duration::from_secs(20));
}

/// `n` tcp-connect paths (`tcp-0`, ...) to a loopback listener that accepts, and drops,
/// for as long as the test runs.
fn tcp_connect_paths(n: usize) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    std::thread::spawn(move || for _ in listener.incoming() {});
    (0..n)
        .map(|i| {
            format!(
                "[[path]]\nname = \"tcp-{i}\"\nkind = \"other\"\nproto = \"tcp-connect\"\ntarget = \"{target}\"\nrate = 20\nwindow = \"1s\"\ntimeout = \"300ms\"\n"
            )
        })
        .collect::<Vec<_>>()
        .concat()
}

/// `name` ran as one session through the reload at `reloaded_at`, every window end to
/// end, none twice.
fn one_session_throughout(store: &dyn Store, name: &str, reloaded_at: u64) {
    let sessions = stored_windows(store, name);
    assert_eq!(sessions.len(), 1, "{name}: {sessions:?}");
    let w = &sessions[0].1;
    for pair in w.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "{name}: a gap or an overlap: {w:?}");
    }
    assert!(
        w.first().unwrap().0 < reloaded_at && w.last().unwrap().1 > reloaded_at,
        "{name} ran through both reloads"
    );
    let span_s = (w.last().unwrap().1 - w.first().unwrap().0) / 1_000_000_000;
    assert!(
        w.len() as u64 >= span_s,
        "{name}: {} windows over {span_s} s",
        w.len()
    );
}

#[test]
fn sighup_restarts_changed_paths_and_unchanged_ones_lose_no_window() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("pathprobe-daemon-hup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::write_secret(&dir.join("tokens"), &format!("h-agent {TOKEN}\n"));
    let collector_addr = free_tcp();
    let collector = Collector::start(&dir, collector_addr);
    let r = common::Reflector::start(&[]);
    let tcp_paths = tcp_connect_paths(6);
    let path = |name: &str, extra: &str| {
        format!(
            "[[path]]\nname = \"{name}\"\nkind = \"other\"\ntarget = \"{}\"\nrate = 50\nwindow = \"1s\"\ntimeout = \"300ms\"\n{extra}",
            r.addr
        )
    };
    let head = format!(
        "agent_id = \"h-agent\"\n[collector]\nurl = \"http://{collector_addr}\"\ntoken = \"{TOKEN}\"\n"
    );
    let config = dir.join("agent.toml");
    let write = |body: &str| std::fs::write(&config, format!("{head}{body}")).unwrap();
    write(
        &[
            path("steady", ""),
            path("moved", ""),
            path("gone", ""),
            tcp_paths.clone(),
        ]
        .concat(),
    );
    let log = dir.join("agent.log");
    let mut agent = run_agent(&config, &log);
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &agent.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    std::thread::sleep(Duration::from_millis(3_500));
    // Nine paths of two kinds, and no thread of their own: a fixed few (the engine's
    // three, the reporter, the uploader, the main thread).
    let threads = common::threads(agent.id());
    eprintln!("{threads} threads for nine paths");
    assert!(threads <= 8, "{threads} threads for nine paths");

    // "moved" gets another packet size, "gone" goes, "fresh" comes; "steady" is as it was.
    write(
        &[
            path("steady", ""),
            path("moved", "size = 100\n"),
            path("fresh", ""),
            tcp_paths,
        ]
        .concat(),
    );
    let reloaded_at = now_ns();
    hup();
    wait_for_log(&log, "configuration reloaded", 1);
    std::thread::sleep(Duration::from_millis(2_500));

    // A file that does not load changes nothing.
    write("[[path]]\nname = \"broken\"\nrate = fast\n");
    hup();
    wait_for_log(&log, "the new configuration is refused", 1);
    std::thread::sleep(Duration::from_millis(1_500));
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    assert!(agent.wait().unwrap().success());
    let stopped_at = now_ns();
    collector.stop();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(r#"restarted=["moved"] started=["fresh"] stopped=["gone"]"#)
            && text.contains("unchanged=7"),
        "{text}"
    );
    assert!(
        text.contains("agent.toml:7"),
        "the refusal names the line: {text}"
    );
    let store = SqliteStore::open_read_only(&dir.join("store.db")).unwrap();

    // steady, and the tcp-connect paths on the same engine: one session throughout,
    // every window end to end, none twice.
    one_session_throughout(&store, "steady", reloaded_at);
    for i in 0..6 {
        one_session_throughout(&store, &format!("tcp-{i}"), reloaded_at);
    }

    // moved: the old session's last window reached the collector, then the new one began.
    let moved = stored_windows(&store, "moved");
    let old = &moved.iter().find(|(size, _)| *size != 100).unwrap().1;
    let new = &moved.iter().find(|(size, _)| *size == 100).unwrap().1;
    assert!(
        old.last().unwrap().1 >= reloaded_at,
        "moved: last window {old:?}"
    );
    assert!(old.last().unwrap().1 <= new.first().unwrap().0);

    // gone: its last, partial window was delivered when it stopped.
    let gone = &stored_windows(&store, "gone")[0].1;
    let last = gone.last().unwrap();
    assert!(
        last.1 >= reloaded_at && last.1 - last.0 < 1_000_000_000,
        "{gone:?}"
    );

    // fresh: started by the reload, and stopped with the agent.
    let fresh = &stored_windows(&store, "fresh")[0].1;
    assert!(fresh.first().unwrap().0 >= reloaded_at);
    assert!(fresh.last().unwrap().1 <= stopped_at);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reflector's last `keys: ...` summary in its log: (fingerprint, answered) per key of
/// SSID 000a, newest first.
fn key_counts(log: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(line) = text.lines().rev().find(|l| l.contains("ssid 000a: ")) else {
        return Vec::new();
    };
    let set = line.split("ssid 000a: ").nth(1).unwrap();
    let set = set.split(';').next().unwrap();
    set.split(", ")
        .map(|k| {
            let mut it = k.split_whitespace();
            let fp = it.next().unwrap().to_string();
            (fp, it.next().unwrap().parse().unwrap())
        })
        .collect()
}

/// Waits for two of the reflector's counter lines in a row in which the old key (the
/// second) answered nothing more and the new one did; returns the last.
fn wait_until_the_old_key_is_unused(log: &Path) -> Vec<(String, u64)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut before = key_counts(log);
    loop {
        assert!(
            Instant::now() < deadline,
            "the old key kept answering: {before:?}"
        );
        std::thread::sleep(Duration::from_millis(1_100));
        let now = key_counts(log);
        if now.len() == 2 && before.len() == 2 && now[1] == before[1] && now[0].1 > before[0].1 {
            return now;
        }
        before = now;
    }
}

/// Path `er` ran as one session through `reloaded_at`, and every probe it sent was
/// answered, with nothing malformed (failing its HMAC) or late.
fn every_probe_answered_in_one_session(db: &Path, reloaded_at: u64) {
    let store = SqliteStore::open_read_only(db).unwrap();
    one_session_throughout(&store, "er", reloaded_at);
    let sel = pathprobe_collector::store::Selector {
        name_or_kind: "er".into(),
        site: None,
    };
    let c = store.query(&sel, 0, u64::MAX).unwrap().aggregate.counters;
    eprintln!(
        "sent {} received {} lost {} malformed {} late {}",
        c.sent, c.received, c.lost, c.malformed, c.late
    );
    assert!(c.sent >= 5_000, "{c:?}");
    assert_eq!((c.lost, c.malformed, c.late), (0, 0, 0), "{c:?}");
    assert_eq!(c.received, c.sent, "{c:?}");
}

/// The rollover the README gives, while a path probes 1,000 times a second: the reflector
/// takes the new key beside the old one, the agent signs with the new one, the old one
/// is dropped once it answers nothing more. Nothing is lost, nothing fails its HMAC, and
/// the path runs as one session throughout.
#[test]
fn a_key_rollover_at_1000_a_second_loses_no_probe() {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("pathprobe-daemon-rekey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    common::write_secret(&dir.join("tokens"), &format!("k-agent {TOKEN}\n"));
    let (k1, k2) = (
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210",
    );
    let reflector_key = dir.join("keys").join("000a.key");
    let agent_key = dir.join("agent.key");
    common::write_secret(&reflector_key, &format!("{k1}\n"));
    common::write_secret(&agent_key, &format!("{k1}\n"));

    let reflector_addr = free_udp();
    let reflector_log = dir.join("reflector.log");
    let mut reflector = Command::new(AGENT)
        .args(["reflect", "--listen", &reflector_addr.to_string()])
        .args(["--stats-interval", "1s", "--auth-key-dir"])
        .arg(dir.join("keys"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&reflector_log).unwrap())
        .spawn()
        .unwrap();
    wait_for_log(&reflector_log, "reflecting", 1);
    let collector_addr = free_tcp();
    let collector = Collector::start(&dir, collector_addr);
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"k-agent\"\n[collector]\nurl = \"http://{collector_addr}\"\ntoken = \"{TOKEN}\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"{reflector_addr}\"\nrate = 1000\nwindow = \"1s\"\ntimeout = \"500ms\"\nssid = 10\nauth_key_file = \"agent.key\"\n"
        ),
    )
    .unwrap();
    let agent_log = dir.join("agent.log");
    let mut agent = run_agent(&config, &agent_log);
    let hup = |pid: u32| {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    let started_at = now_ns();
    std::thread::sleep(Duration::from_secs(2));

    // 1. The reflector accepts the new key, tried first, beside the old one.
    common::write_secret(&reflector_key, &format!("{k2}\n{k1}\n"));
    hup(reflector.id());
    wait_for_log(&reflector_log, "keys loaded", 1);
    std::thread::sleep(Duration::from_secs(1));
    // 2. The agent signs with the new key.
    common::write_secret(&agent_key, &format!("{k2}\n"));
    hup(agent.id());
    wait_for_log(&agent_log, "path key changed", 1);
    // 3. Once the old key answers nothing more (two counter lines alike), it goes.
    let before = wait_until_the_old_key_is_unused(&reflector_log);
    assert!(
        before[1].1 > 0,
        "the old key answered before the rollover: {before:?}"
    );
    common::write_secret(&reflector_key, &format!("{k2}\n"));
    hup(reflector.id());
    wait_for_log(&reflector_log, "keys loaded", 2);
    std::thread::sleep(Duration::from_secs(2));

    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    assert!(agent.wait().unwrap().success());
    let _ = Command::new("kill")
        .args(["-TERM", &reflector.id().to_string()])
        .status();
    assert!(reflector.wait().unwrap().success());
    collector.stop();

    let text = std::fs::read_to_string(&reflector_log).unwrap();
    let stopped = text.lines().rev().find(|l| l.contains("stopped:")).unwrap();
    assert!(
        stopped.contains(" malformed 0 auth-failed 0 tlv-integrity-failed 0 "),
        "{stopped}"
    );
    let after = key_counts(&reflector_log);
    assert_eq!(after.len(), 1, "only the new key is left: {after:?}");
    assert!(after[0].1 > before[0].1, "the new key answers: {after:?}");
    let agent_text = std::fs::read_to_string(&agent_log).unwrap();
    assert!(
        agent_text.contains(r#"rekeyed=["er"] restarted=[]"#),
        "{agent_text}"
    );

    every_probe_answered_in_one_session(&dir.join("store.db"), started_at + 3_000_000_000);
    let _ = std::fs::remove_dir_all(&dir);
}
