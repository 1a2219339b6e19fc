//! `pathprobe-agent decode` as a user runs it.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::process::{Command, Output};

const REQUEST: &str =
    "00003039 eeb27a98 40000000 8c2a beef 00000000000000000000000000000000000000000000000000000000";

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pathprobe-agent"))
        .args(args)
        .output()
        .expect("the agent binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn request_fields_are_printed() {
    let o = agent(&["decode", "--direction", "request", REQUEST]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("Session-Sender test packet, unauthenticated, 44 octets"),
        "{out}"
    );
    assert!(out.contains("12345"), "{out}");
    assert!(out.contains("2026-11-26T09:30:00.250000000Z"), "{out}");
    assert!(out.contains("S=1 Z=NTP scale=12 multiplier=42"), "{out}");
    assert!(out.contains("48879"), "{out}");
}

#[test]
fn reply_json_has_residence_time_and_tlvs() {
    // A reply with T2 = 10:00:00.000001000 and T3 = 10:00:00.000004000 (PTP format), and a
    // Class of Service TLV answered with DSCP2 = 10 (AF11), ECN 2.
    let t2 = format!("{:08x}{:08x}", 1_795_687_200u32, 1_000u32);
    let t3 = format!("{:08x}{:08x}", 1_795_687_200u32, 4_000u32);
    let hex = format!(
        "00000007{t3}4103beef{t2}00003039eeb27a98400000008c2a00003f000000 0004 0004 b8a8 0000"
    );
    let o = agent(&["decode", "--direction", "reply", "--json", &hex]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["length"], 52);
    assert_eq!(v["reply"]["reflector_residence_ns"], 3000);
    assert_eq!(v["reply"]["sender_ttl"], 63);
    assert_eq!(v["reply"]["sender_sequence_number"], 12345);
    assert_eq!(v["tlvs"][0]["name"], "Class of Service");
    let detail = v["tlvs"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("DSCP1 46") && detail.contains("DSCP2 10") && detail.contains("ECN 2"),
        "{detail}"
    );
}

#[test]
fn short_packet_names_the_size() {
    let o = agent(&["decode", "--direction", "request", "00003039"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("needs 44 octets but only 4 are present"),
        "{err}"
    );
}

#[test]
fn bad_hex_is_named() {
    let o = agent(&["decode", "--direction", "request", "zz"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not a hexadecimal digit"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn missing_direction_is_a_usage_error() {
    let o = agent(&["decode", REQUEST]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--direction"), "{}", stderr(&o));
}

#[test]
fn missing_key_file_says_how_to_create_one() {
    let o = agent(&[
        "decode",
        "--direction",
        "request",
        "--auth-key-file",
        "/nonexistent/k",
        REQUEST,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("/nonexistent/k") && err.contains("create one with"),
        "{err}"
    );
}

#[test]
fn wrong_hmac_exits_3_and_still_shows_fields() {
    let dir = std::env::temp_dir().join(format!("pathprobe-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let packet = format!("00003039{}", "00".repeat(108));
    let o = agent(&[
        "decode",
        "--direction",
        "request",
        "--auth-key-file",
        key.to_str().unwrap(),
        &packet,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("authenticated, 112 octets") && out.contains("HMAC") && out.contains("FAILED"),
        "{out}"
    );
    assert!(out.contains("12345"), "{out}");
}
