//! Reports over real TLS: the agent (`run`, `[collector] url = "https://..."`) and a collector
//! serving HTTPS (rustls on both ends), with certificates each test makes for itself. What
//! goes wrong (an unknown CA, the wrong name, an expired certificate, plain HTTP to the TLS
//! port, TLS to a plain port) is said with its fix, and the reports stay spooled; with
//! mutual TLS the client certificate names the agent.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{AGENT, Collector, Reflector, free_tcp, write_secret};
use pathprobe_collector::serve::{ServeConfig, Tls, TlsFiles, Tokens};
use pathprobe_collector::store::{SqliteStore, Store as _};
use pathprobe_tests::pki::{Ca, Issued, Leaf};

const TOKEN: &str = "tls-agent-token-0123456789abcdef";

/// `[collector]` lines of the agent's config: key and file.
type Lines<'a> = &'a [(&'a str, &'a Path)];

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pathprobe-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A collector on loopback serving TLS with `server` (and `client_ca` for mutual TLS),
/// taking `ams-01`'s token.
fn tls_collector(d: &Path, server: &Issued, client_ca: Option<&Path>) -> (Collector, u16) {
    write_secret(&d.join("tokens"), &format!("ams-01 {TOKEN}\n"));
    let addr = free_tcp();
    let tls = Tls::load(TlsFiles {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: client_ca.map(Path::to_owned),
    })
    .unwrap();
    let cfg = ServeConfig {
        tokens: Some(Tokens::load(&d.join("tokens")).unwrap()),
        tls: Some(Arc::new(tls)),
        ..ServeConfig::lab(addr, d.join("store.db"))
    };
    (Collector::start_with(cfg), addr.port())
}

/// The agent (`run`) probing `reflector` at 50/s in 1 s windows and delivering to `url`
/// with these `[collector]` lines, spooled in `d/spool`, logging into `d/agent.log`.
struct Agent {
    child: std::process::Child,
    log: PathBuf,
}

impl Agent {
    fn start(d: &Path, reflector: &Reflector, url: &str, lines: Lines<'_>) -> Self {
        write_secret(&d.join("token"), TOKEN);
        let extra = lines.iter().fold(String::new(), |mut out, (k, v)| {
            let _ = writeln!(out, "{k} = \"{}\"", v.display());
            out
        });
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "agent_id = \"ams-01\"\n[collector]\nurl = \"{url}\"\ntoken_file = \"token\"\nspool_dir = \"spool\"\n{extra}[[path]]\nname = \"er\"\nkind = \"expressroute\"\ntarget = \"{}\"\nrate = 50\nwindow = \"1s\"\n",
                reflector.addr
            ),
        )
        .unwrap();
        let log = d.join("agent.log");
        let child = common::run_agent(Command::new(AGENT), &config, &log);
        Self { child, log }
    }

    /// The log once it says `what`.
    fn says(&self, what: &str) -> String {
        common::wait_for_log(&self.log, what, 1, Duration::from_secs(20))
    }

    /// SIGTERM, and the exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A test that fails midway leaves no agent running.
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the store at `d` holds at least one window.
fn wait_stored(d: &Path) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = stored_windows(d);
        if n > 0 {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "nothing stored in {}",
            d.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stored_windows(d: &Path) -> u64 {
    SqliteStore::open_read_only(&d.join("store.db"))
        .and_then(|s| s.paths())
        .map_or(0, |p| p.iter().map(|p| p.windows).sum())
}

/// Reports (`*.json`) in `d/spool/SUB`.
fn spooled_in(d: &Path, sub: &str) -> usize {
    std::fs::read_dir(d.join("spool").join(sub)).map_or(0, |r| {
        r.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .count()
    })
}

fn spooled(d: &Path) -> usize {
    spooled_in(d, "")
}

#[test]
fn reports_reach_a_tls_collector_checked_against_the_given_ca() {
    let d = dir("ok");
    let ca = Ca::new(&d, "corp");
    let server = ca.server(&d, "server");
    let r = Reflector::start(&[]);
    for host in ["localhost", "127.0.0.1"] {
        let hd = d.join(host);
        std::fs::create_dir_all(&hd).unwrap();
        let (c, port) = tls_collector(&hd, &server, None);
        let a = Agent::start(
            &hd,
            &r,
            &format!("https://{host}:{port}"),
            &[("ca_file", &ca.cert_pem)],
        );
        assert!(wait_stored(&hd) >= 1, "{host}");
        a.stop();
        c.stop();
    }
}

#[test]
fn tls_failures_name_the_problem_and_the_fix_and_keep_the_reports() {
    let d = dir("bad");
    let ca = Ca::new(&d, "corp");
    let other = Ca::new(&d, "other");
    let r = Reflector::start(&[]);
    let wrong_name = ca.issue(
        &d,
        "wrong-name",
        &Leaf {
            cn: "collector.example.net",
            sans: &["collector.example.net"],
            server: true,
            expired: false,
        },
    );
    let good = ca.server(&d, "server");
    let ca_line: Lines<'_> = &[("ca_file", &ca.cert_pem)];
    let other_line: Lines<'_> = &[("ca_file", &other.cert_pem)];
    let cases: [(&str, &Issued, &str, Lines<'_>, &str); 4] = [
        (
            "unknown CA",
            &good,
            "https",
            other_line,
            "signed by a CA this agent does not trust: give ca_file (--ca-file)",
        ),
        (
            "wrong name",
            &wrong_name,
            "https",
            ca_line,
            "not for the name in https://127.0.0.1",
        ),
        (
            "plain HTTP to the TLS port",
            &good,
            "http",
            &[],
            "this port speaks TLS (HTTPS): use an https:// URL",
        ),
        (
            "system roots only",
            &good,
            "https",
            &[],
            "signed by a CA this agent does not trust",
        ),
    ];
    for (what, cert, scheme, lines, says) in cases {
        let cd = d.join(what.replace(' ', "-"));
        std::fs::create_dir_all(&cd).unwrap();
        let (c, port) = tls_collector(&cd, cert, None);
        let a = Agent::start(&cd, &r, &format!("{scheme}://127.0.0.1:{port}"), lines);
        let log = a.says(says);
        assert!(log.contains("reports kept in the spool"), "{what}: {log}");
        a.stop();
        c.stop();
        assert_eq!(stored_windows(&cd), 0, "{what}: nothing stored");
        assert!(spooled(&cd) >= 1, "{what}: the reports wait in the spool");
    }

    // The spooled reports go once the agent is pointed right.
    let cd = d.join("unknown-CA");
    let waiting = spooled(&cd);
    let (c, port) = tls_collector(&cd, &good, None);
    let a = Agent::start(&cd, &r, &format!("https://127.0.0.1:{port}"), ca_line);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored_windows(&cd) < u64::try_from(waiting).unwrap() {
        assert!(
            Instant::now() < deadline,
            "the {waiting} spooled windows were not delivered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    a.stop();
    c.stop();
}

#[test]
fn tls_to_a_plain_port_and_an_expired_certificate_are_named() {
    let d = dir("plain");
    let ca = Ca::new(&d, "corp");
    let r = Reflector::start(&[]);
    write_secret(&d.join("tokens"), &format!("ams-01 {TOKEN}\n"));
    let addr = free_tcp();
    let plain = Collector::start(&d, addr);
    let a = Agent::start(
        &d,
        &r,
        &format!("https://127.0.0.1:{}", addr.port()),
        &[("ca_file", &ca.cert_pem)],
    );
    a.says("does not answer in TLS");
    a.stop();
    plain.stop();
    assert!(spooled(&d) >= 1, "the reports wait in the spool");

    // A collector does not start with an expired certificate: it says so, and the fix.
    let expired = ca.issue(
        &d,
        "expired",
        &Leaf {
            cn: "localhost",
            sans: &["localhost", "127.0.0.1"],
            server: true,
            expired: true,
        },
    );
    let said = Tls::load(TlsFiles {
        cert: expired.cert.clone(),
        key: expired.key.clone(),
        client_ca: None,
    })
    .unwrap_err()
    .to_string();
    assert!(
        said.contains("expired") && said.contains("renew it"),
        "{said}"
    );
}

#[test]
fn http_beyond_loopback_needs_insecure_http() {
    let d = dir("clear");
    let r = Reflector::start(&[]);
    // 192.0.2.1 (TEST-NET-1): refused before anything is sent.
    let mut a = Agent::start(&d, &r, "http://192.0.2.1:8862", &[]);
    let status = a.child.wait().unwrap();
    let log = std::fs::read_to_string(&a.log).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("in clear") && log.contains("insecure_http = true"),
        "{log}"
    );
}

#[test]
fn mutual_tls_names_the_agent_and_refuses_another_agents_certificate() {
    let d = dir("mtls");
    let ca = Ca::new(&d, "corp");
    let agents = Ca::new(&d, "agents");
    let server = ca.server(&d, "server");
    let ams = agents.client(&d, "ams-01");
    let fra = agents.client(&d, "fra-01");
    let stranger = Ca::new(&d, "stranger").client(&d, "ams-01-forged");
    let (c, port) = tls_collector(&d, &server, Some(&agents.cert_pem));
    let r = Reflector::start(&[]);
    let url = format!("https://localhost:{port}");
    let run = |name: &str, cert: Option<&Issued>, says: &str| {
        let ad = d.join(name);
        std::fs::create_dir_all(&ad).unwrap();
        let mut lines: Vec<(&str, &Path)> = vec![("ca_file", &ca.cert_pem)];
        if let Some(i) = cert {
            lines.extend([
                ("client_cert", i.cert.as_path()),
                ("client_key", i.key.as_path()),
            ]);
        }
        let a = Agent::start(&ad, &r, &url, &lines);
        a.says(says);
        a.stop();
        ad
    };
    run("none", None, "mutual TLS only");
    let fd = run("fra", Some(&fra), "the sender is `fra-01`");
    assert!(
        spooled_in(&fd, "rejected") >= 1,
        "refused for good: set aside, not lost"
    );
    // The collector's alert, or (TLS 1.3: the request written before the alert is read)
    // the connection it closed: either way the fix is named.
    run(
        "stranger",
        Some(&stranger),
        "give client_cert and client_key signed by",
    );
    assert_eq!(stored_windows(&d), 0, "none of them stored");
    let ad = d.join("ams");
    std::fs::create_dir_all(&ad).unwrap();
    let a = Agent::start(
        &ad,
        &r,
        &url,
        &[
            ("ca_file", &ca.cert_pem),
            ("client_cert", &ams.cert),
            ("client_key", &ams.key),
        ],
    );
    assert!(wait_stored(&d) >= 1, "its own certificate, no token needed");
    a.stop();
    c.stop();
}
