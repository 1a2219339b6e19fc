//! pathprobe benchmarks: see `benches/` and BENCHMARKS.md. The helpers the benchmark
//! programs share: child processes and where they listen.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A program built beside the running one (`target/release/NAME`).
pub fn sibling(name: &str) -> Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.parent().context("no directory")?.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build it first with `cargo build --release -p pathprobe-agent`",
            p.display()
        );
    }
    Ok(p)
}

/// Starts a process that prints `listen=ADDR` (or the address alone) on its first stderr
/// or stdout line.
pub fn start_listening(mut cmd: Command, from_stdout: bool) -> Result<(Guard, SocketAddr)> {
    if from_stdout {
        cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    } else {
        cmd.stderr(Stdio::piped()).stdout(Stdio::null());
    }
    let mut child = cmd.spawn().context("cannot start the server")?;
    let first = if from_stdout {
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let l = lines.next().context("no output")??;
        std::thread::spawn(move || lines.for_each(drop));
        l
    } else {
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let l = lines.next().context("no output")??;
        std::thread::spawn(move || lines.for_each(drop));
        l
    };
    let addr = first
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix("listen=")
                .or(Some(w))
                .and_then(|a| a.parse().ok())
        })
        .with_context(|| format!("no address in `{first}`"))?;
    Ok((Guard(child), addr))
}
