//! `pathprobe-agent run` when things are wrong: a spool it cannot write (at start and in
//! the middle of a run), a target that is down when the agent starts, and configuration
//! that would only fail later. Each reproduces a finding of the adversarial run.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pathprobe_collector::store::{SqliteStore, Store};

mod common;

use common::{AGENT, Collector, free_tcp, is_root};

const TOKEN: &str = "faults-test-token-0123456789";

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pathprobe-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

/// An agent process, killed when dropped (a failed assertion must not leave it running).
struct Agent(Option<Child>);

impl Agent {
    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    fn wait(mut self) -> std::process::ExitStatus {
        self.0.take().unwrap().wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `run --config` of `config`, its log in `log`; as `nobody` when we are root, so that file
/// permissions bind it.
fn agent(config: &Path, log: &Path) -> Agent {
    Agent(Some(common::run_agent(
        common::unprivileged(AGENT),
        config,
        log,
    )))
}

fn wait_for(log: &Path, what: &str, within: Duration) -> String {
    common::wait_for_log(log, what, 1, within)
}

fn terminate(mut agent: Agent) -> std::process::ExitStatus {
    let pid = agent.0.as_ref().unwrap().id();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    agent.0.take().unwrap().wait().unwrap()
}

/// Windows the agent logged for path `name` (one line each).
fn logged_windows(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.contains(&format!(" {name} sent ")))
        .count() as u64
}

#[test]
fn a_spool_that_cannot_be_written_is_refused_at_start() {
    let d = dir("spool-start");
    let reflector = free_udp();
    let read_only = d.join("read-only");
    std::fs::create_dir_all(read_only.join("rejected")).unwrap();
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut spools = vec!["/proc/spool".to_string()];
    // Permissions do not bind root: that case needs `nobody`, which setpriv gives a root CI.
    if is_root()
        || !std::fs::metadata(&read_only)
            .unwrap()
            .permissions()
            .readonly()
    {
        spools.push(read_only.display().to_string());
    }
    for spool in spools {
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "agent_id = \"a\"\n[collector]\nurl = \"http://127.0.0.1:9\"\nspool_dir = \"{spool}\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"{reflector}\"\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let log = d.join("agent.log");
        let started = Instant::now();
        let status = agent(&config, &log).wait();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!status.success(), "{spool}: {text}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            text.contains(&format!("the spool {spool} cannot be written"))
                && text.contains("writable directory"),
            "{spool}: {text}"
        );
    }
}

/// The adversarial run: the spool made unwritable while the agent ran; the uploader died
/// without a word and every window measured meanwhile was lost, even after the permission
/// came back. Now each is held in memory, counted and logged, and all reach the collector.
#[test]
fn windows_measured_while_the_spool_cannot_be_written_reach_the_collector() {
    if !is_root() && permissions_do_not_bind_us() {
        eprintln!("skipped: needs a user whom directory permissions bind");
        return;
    }
    let d = dir("spool-midrun");
    common::write_secret(&d.join("tokens"), &format!("m-agent {TOKEN}\n"));
    let spool = d.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o777)).unwrap();
    let collector_addr = free_tcp();
    let r = common::Reflector::start(&[]);
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"m-agent\"\n[collector]\nurl = \"http://{collector_addr}\"\ntoken = \"{TOKEN}\"\nspool_dir = \"{}\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"{}\"\nrate = 50\nwindow = \"1s\"\n",
            spool.display(),
            r.addr
        ),
    )
    .unwrap();
    let log = d.join("agent.log");
    let child = agent(&config, &log);
    // The collector is away; after 2 s the spool stops taking writes for 4 s.
    std::thread::sleep(Duration::from_secs(2));
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o555)).unwrap();
    wait_for(&log, "cannot write to the spool", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(3));
    assert!(std::fs::read_dir(&spool).unwrap().count() > 0);
    std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o777)).unwrap();
    wait_for(&log, "held reports written", Duration::from_secs(10));
    let collector = Collector::start(&d, collector_addr);
    std::thread::sleep(Duration::from_secs(3));
    let status = terminate(child);
    collector.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    let logged = logged_windows(&text, "er");
    let store = SqliteStore::open_read_only(&d.join("store.db")).unwrap();
    let stored = store
        .paths()
        .unwrap()
        .iter()
        .map(|p| p.windows)
        .sum::<u64>();
    assert!(logged >= 8, "{logged} windows in 10 s: {text}");
    assert_eq!(stored, logged, "every window measured is stored: {text}");
}

/// Whether this (non-root) process can write a 0555 directory anyway (it cannot, unless it
/// has `CAP_DAC_OVERRIDE` some other way); then the test above has nothing to show.
fn permissions_do_not_bind_us() -> bool {
    let d = dir("probe-perm");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
    let writable = std::fs::write(d.join("x"), b"x").is_ok();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    writable
}

/// The adversarial run: with its target down at start, `run` (no reflector section)
/// exited 0 after 73 ms, and with one it never probed again. Now the path keeps trying:
/// port unreachable is counted, and probing picks up when the reflector comes up.
#[test]
fn a_path_whose_target_is_down_at_start_is_probed_once_it_comes_up() {
    let d = dir("target-down");
    let target = free_udp();
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"t\"\n[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"{target}\"\nrate = 50\nwindow = \"1s\"\n"
        ),
    )
    .unwrap();
    let log = d.join("agent.log");
    let mut child = agent(&config, &log);
    wait_for(&log, "port unreachable", Duration::from_secs(10));
    assert!(
        child.try_wait().is_none(),
        "the agent gives up on nothing while it has a path"
    );
    let _reflector = common::Reflector::start_on(&target.to_string(), &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let answered = text
            .lines()
            .filter(|l| l.contains(" er sent "))
            .any(|l| !l.contains(" recv 0 "));
        if answered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "probing never picked up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(terminate(child).success());
}

/// Configuration that passed at start and then failed on every window or delivery: names
/// reports refuse, collector URLs no build can use, and two paths of one name. Each is
/// refused at start with the file and line.
#[test]
fn config_errors_are_found_at_start_with_file_and_line() {
    let d = dir("config");
    let reflector = free_udp();
    let path = |name: &str| {
        format!("[[path]]\nname = \"{name}\"\nkind = \"vpn\"\ntarget = \"{reflector}\"\n")
    };
    let collector = |url: &str| format!("[collector]\nurl = \"{url}\"\nspool_dir = \"spool\"\n");
    let cases = [
        (
            format!("agent_id = \"a\"\n{}", path("bad name!")),
            ":3",
            "`bad name!`",
        ),
        (
            format!("agent_id = \"a\"\nsite = \"lab site\"\n{}", path("er")),
            ":2",
            "`lab site`",
        ),
        (
            format!(
                "agent_id = \"a\"\n{}{}",
                collector("ftp://10.0.0.5/"),
                path("er")
            ),
            ":3",
            "`ftp://`",
        ),
        (
            format!(
                "agent_id = \"a\"\n{}{}",
                collector("http://10.0.0.5:8862"),
                path("er")
            ),
            ":3",
            "insecure_http = true",
        ),
        (
            format!("agent_id = \"a\"\n{}{}", path("er"), path("er")),
            ":7",
            "used already (at:3)",
        ),
    ];
    for (text, line, says) in cases {
        let config = d.join("bad.toml");
        std::fs::write(&config, &text).unwrap();
        let out = Command::new(AGENT)
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert!(
            err.contains(&format!("bad.toml{line}")) && err.contains(says),
            "{text}\n{err}"
        );
    }
}
