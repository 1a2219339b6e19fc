//! The reflector's reply rate at saturation, unauthenticated, authenticated, and
//! authenticated with replay refusal (`--refuse-replays`), in one run on loopback: a client
//! sends distinct requests laid out as the agent's probes (a Class-of-Service TLV, and
//! authenticated the HMAC TLV: 52 and 140 octets), each its own sequence number and T1 so
//! that none is a replay, in batches of 64 as fast as it can for `--trial`, and counts the
//! answers.
//!
//! ```sh
//! cargo build --release -p pathprobe-agent -p pathprobe-benches
//! target/release/reflector_rate [--trial 3s] [--rounds 2]
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    reason = "a benchmark program: a failed step ends the run; figures printed as floats"
)]

use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use pathprobe_agent::sys::{RecvBatch, SendBatch};
use pathprobe_benches::{stamp_probe, start_reflector};
use pathprobe_proto::stamp::AuthKey;
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Debug, Parser)]
struct Args {
    /// Length of each trial.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    trial: Duration,
    /// Trials of each mode, alternated.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Requests made ready before each trial (each is sent once).
    #[arg(long, default_value_t = 1_500_000)]
    requests: usize,
}

/// A mode's name, the reflector's flags and the requests to send it.
type Mode3<'a> = (&'a str, Vec<&'a str>, &'a [Vec<u8>]);

/// `n` requests laid out as the agent's probes (authenticated with the HMAC TLV when
/// signed with `key`), sequence numbers and T1 counting up.
fn requests(key: Option<&AuthKey>, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let seq = u32::try_from(i).unwrap();
            stamp_probe(key, seq, 1 << 40 | u64::from(seq))
        })
        .collect()
}

/// Replies per second from a reflector started with `extra`, sent `reqs` as fast as they go.
fn trial(extra: &[&str], reqs: &[Vec<u8>], length: Duration) -> Result<(f64, f64)> {
    let (_guard, addr) = start_reflector(&[&["--max-rate-per-source", "0"][..], extra].concat())?;
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>()?.into())?;
    sock.connect(&addr.into())?;
    let _ = sock.set_recv_buffer_size(8 << 20);
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let (done, answered, sent) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut batch = SendBatch::new(64);
            let end = Instant::now() + length;
            let mut i = 0;
            while Instant::now() < end && i < reqs.len() {
                batch.clear();
                while i < reqs.len() && !batch.is_full() {
                    let r = &reqs[i];
                    batch.next_slot().unwrap()[..r.len()].copy_from_slice(r);
                    batch.commit(r.len(), None, None);
                    i += 1;
                }
                let _ = batch.send(&sock);
            }
            sent.store(i as u64, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(200));
            done.store(true, Ordering::Relaxed);
        });
        s.spawn(|| {
            let mut batch = RecvBatch::new(64);
            while !done.load(Ordering::Relaxed) {
                if let Ok(n) = batch.recv(&sock) {
                    answered.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
    });
    let secs = length.as_secs_f64();
    Ok((
        answered.load(Ordering::Relaxed) as f64 / secs,
        sent.load(Ordering::Relaxed) as f64 / secs,
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("pathprobe-reflector-rate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let raw: Vec<u8> = (0..32).collect();
    let key_file = dir.join("key");
    std::fs::write(&key_file, hex::encode(&raw))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let key = AuthKey::new(&raw)?;
    let key_path = key_file.to_str().unwrap().to_string();
    let plain = requests(None, args.requests);
    let signed = requests(Some(&key), args.requests);
    let modes: [Mode3<'_>; 3] = [
        ("unauthenticated", vec![], &plain),
        ("authenticated", vec!["--auth-key-file", &key_path], &signed),
        (
            "authenticated, --refuse-replays",
            vec!["--auth-key-file", &key_path, "--refuse-replays"],
            &signed,
        ),
    ];
    println!(
        "reply rate at saturation, {} s trials, batches of 64 from one client on loopback (replies/s, requests sent/s)",
        args.trial.as_secs_f64()
    );
    let mut means = Vec::new();
    for (name, extra, reqs) in &modes {
        let mut got = Vec::new();
        for _ in 0..args.rounds {
            let (replies, offered) = trial(extra, reqs, args.trial)?;
            println!("{name}: {replies:.0} replies/s ({offered:.0} requests/s sent)");
            got.push(replies);
        }
        means.push(got.iter().sum::<f64>() / got.len() as f64);
    }
    println!(
        "mean: unauthenticated {:.0}/s, authenticated {:.0}/s ({:.1}% of it), with replay refusal {:.0}/s ({:.1}% of authenticated)",
        means[0],
        means[1],
        100.0 * means[1] / means[0],
        means[2],
        100.0 * means[2] / means[1]
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
