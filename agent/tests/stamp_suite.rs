//! Interop with stamp-suite (another RFC 8762 / 8972 implementation), in authenticated
//! mode with the HMAC TLV and its per-SSID key directory, both ways. stamp-suite is not
//! packaged: build it from its source and give its binary as `STAMP_SUITE`; without it the
//! test says it was skipped.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::AGENT;

const KEY: &str = "5a5b5c5d5e5f606162636465666768696a6b6c6d6e6f70717273747576777879";

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A key directory with SSID 10's key (stamp-suite's layout) and the same key as a file.
fn keys(dir: &Path) -> (PathBuf, PathBuf) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    common::write_secret(&dir.join("keys").join("000a.key"), &format!("{KEY}\n"));
    common::write_secret(&dir.join("key"), &format!("{KEY}\n"));
    (dir.join("keys"), dir.join("key"))
}

#[test]
fn stamp_suite_answers_our_hmac_tlv_and_we_answer_its() {
    let Some(suite) = std::env::var_os("STAMP_SUITE") else {
        eprintln!(
            "SKIPPED: set STAMP_SUITE to a stamp-suite binary (built from its source) to check interop"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("pathprobe-stamp-suite-{}", std::process::id()));
    let (key_dir, key_file) = keys(&dir);

    // stamp-suite reflects, verifying our HMAC TLV; we verify its replies' (an answer that
    // failed would count as malformed, and its probe as lost).
    let port = free_udp_port();
    let mut reflector = Command::new(&suite)
        .args(["-i", "-A", "A", "--verify-tlv-hmac", "--hmac-key-dir"])
        .arg(&key_dir)
        .args(["-S", "127.0.0.1", "-o", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new(AGENT)
        .args(["probe", "--target", &format!("127.0.0.1:{port}")])
        .args(["--ssid", "10", "--count", "200", "--rate", "200", "--json"])
        .arg("--auth-key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    let _ = reflector.kill();
    let _ = reflector.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["sent"], 200, "{summary}");
    assert_eq!(summary["received"], 200, "{summary}");
    assert_eq!(summary["malformed"], 0, "{summary}");

    // We reflect from the same directory; stamp-suite sends with the HMAC TLV.
    let port = free_udp_port();
    let log = dir.join("reflector.log");
    let mut ours = Command::new(AGENT)
        .args(["reflect", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--stats-interval", "0s", "--auth-key-dir"])
        .arg(&key_dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    common::wait_for_log(&log, "reflecting", 1, Duration::from_secs(10));
    let sent = Command::new(&suite)
        .args(["-A", "A", "--ssid", "10", "--cos", "--dscp", "46"])
        .args(["-r", "127.0.0.1", "-p", &port.to_string()])
        .args(["-S", "127.0.0.1", "-o", &free_udp_port().to_string()])
        .args(["-c", "100", "-d", "5", "-L", "1"])
        .env("STAMP_HMAC_KEY", KEY)
        .output()
        .unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &ours.id().to_string()])
        .status();
    assert!(ours.wait().unwrap().success());
    let report = String::from_utf8_lossy(&sent.stdout);
    assert!(report.contains("Packets received: 100"), "{report}");
    let text = std::fs::read_to_string(&log).unwrap();
    let stopped = text.lines().find(|l| l.contains("stopped:")).unwrap();
    assert!(
        stopped.contains(
            "received 100 reflected 100 malformed 0 auth-failed 0 tlv-integrity-failed 0"
        ) && stopped.contains("ssid 000a: ")
            && stopped.ends_with(" 100"),
        "{stopped}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
