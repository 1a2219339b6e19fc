//! pathprobe benchmarks: see `benches/` and BENCHMARKS.md. The helpers the benchmark
//! programs share: child processes and where they listen.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use pathprobe_proto::hist::Metric;
use pathprobe_proto::report::{
    ClockState, Counters, PathInfo, PathKind, ProbeProtocol, ReportId, TimestampSource,
    Timestamping, Window, WindowReport,
};

/// User plus system CPU time of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name, which ends with the last ')': state is field 3, so
    // utime (14) and stime (15) are the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {i} in /proc/{pid}/stat"))
    };
    Ok(tick(11)? + tick(12)?)
}

/// The unit of `/proc/PID/stat`'s CPU times (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .filter(|&hz| hz > 0)
        .unwrap_or(100)
}

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

/// The first window of the load benchmarks: 2026-11-25T09:20:00Z, on an hour.
pub const T0: u64 = 1_795_600_800_000_000_000;
/// Their windows' length, 10 s.
pub const W: u64 = 10_000_000_000;

#[allow(
    clippy::unwrap_used,
    reason = "the histograms' range holds every value recorded"
)]
/// A window of the load benchmarks (`collector_load`, `tls_ingest`) at 10 probes/s, of
/// path `path` (even: ExpressRoute, odd: VPN; agent `path / 2`), from `T0`: 100 RTTs around a path's base delay, jitter, one loss run.
pub fn load_report(path: u32, window: u32, id: u64) -> WindowReport {
    let er = path.is_multiple_of(2);
    let base: u64 = if er { 2_000_000 } else { 30_000_000 };
    let spread: u64 = if er { 300_000 } else { 15_000_000 };
    let mut rtt = Metric::Rtt.new_histogram();
    let mut ipdv = Metric::Ipdv.new_histogram();
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut last = base;
    for _ in 0..100 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = base + x % spread;
        rtt.record(v).unwrap();
        ipdv.record(v.abs_diff(last)).unwrap();
        last = v;
    }
    let mut runs = Metric::LossRun.new_histogram();
    let missing = x % 3;
    if missing > 0 {
        runs.record(missing).unwrap();
    }
    WindowReport {
        report_id: ReportId(u128::from(id).to_be_bytes()),
        agent_id: format!("agent-{:03}", path / 2),
        site: Some(format!("site-{:02}", path % 10)),
        path: PathInfo {
            name: format!("{}-{path:03}", if er { "er" } else { "vpn" }),
            kind: if er {
                PathKind::Expressroute
            } else {
                PathKind::Vpn
            },
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.1.0.4:862".parse().unwrap(),
            protocol: ProbeProtocol::Stamp,
            dscp: if er { 46 } else { 0 },
            packet_size: 44,
        },
        window: Window {
            start_unix_ns: T0 + u64::from(window) * W,
            end_unix_ns: T0 + u64::from(window + 1) * W,
        },
        timestamping: Timestamping {
            rx: TimestampSource::Kernel,
            tx: TimestampSource::Kernel,
        },
        owd_clock: ClockState::Unavailable,
        counters: Counters {
            sent: 100 + missing,
            received: 100,
            lost: missing,
            ..Counters::default()
        },
        histograms: [
            (Metric::Rtt, rtt),
            (Metric::Ipdv, ipdv),
            (Metric::LossRun, runs),
        ]
        .into(),
        signature: None,
        events: Vec::new(),
        plan_version: None,
    }
}

/// A collector served in this process (on its own two-thread runtime) for a load
/// benchmark, with windows of any age kept (the load windows are dated from [`T0`]).
#[derive(Debug)]
pub struct LabCollector {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<pathprobe_collector::Result<()>>>,
}

impl LabCollector {
    /// Serves `cfg` (its `max_report_age` widened to a century) once its port accepts
    /// connections.
    pub fn start(cfg: pathprobe_collector::serve::ServeConfig) -> Result<Self> {
        let addr = cfg.listen;
        let cfg = pathprobe_collector::serve::ServeConfig {
            limits: pathprobe_collector::serve::Limits {
                max_report_age: std::time::Duration::from_hours(24 * 365 * 100),
                ..cfg.limits
            },
            ..cfg
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(pathprobe_collector::serve::serve(cfg, async move {
            let _ = stopped.await;
        }));
        while std::net::TcpStream::connect(addr).is_err() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(Self {
            rt,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops it and waits until it has.
    pub fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            self.rt.block_on(t)??;
        }
        Ok(())
    }
}

/// `pathprobe-agent reflect` (the sibling binary) on an ephemeral loopback port with
/// `extra` flags, its counters never logged: the reflector and where it listens.
pub fn start_reflector(extra: &[&str]) -> Result<(Guard, SocketAddr)> {
    let mut cmd = Command::new(sibling("pathprobe-agent")?);
    cmd.args([
        "reflect",
        "--listen",
        "127.0.0.1:0",
        "--stats-interval",
        "0s",
    ])
    .args(extra);
    start_listening(cmd, false)
}

/// A STAMP request laid out as the agent sends its probes by default: the base packet, a
/// Class-of-Service TLV (DSCP1 0) and, authenticated, the HMAC TLV, signed with `key`.
pub fn stamp_probe(
    key: Option<&pathprobe_proto::stamp::AuthKey>,
    sequence_number: u32,
    timestamp: u64,
) -> Vec<u8> {
    use pathprobe_proto::stamp::tlv::{ClassOfService, HMAC_TLV_LEN, TlvWriter, sign_hmac_tlv};
    use pathprobe_proto::stamp::{Mode, SenderPacket};
    let mode = if key.is_some() {
        Mode::Authenticated
    } else {
        Mode::Unauthenticated
    };
    let mut buf = stamp_request(mode, None, sequence_number, timestamp);
    buf.resize(mode.base_len() + 8 + key.map_or(0, |_| HMAC_TLV_LEN), 0);
    let mut p = SenderPacket::new_unchecked(&mut buf[..], mode);
    let mut w = TlvWriter::new(p.tlvs_mut());
    let _ = w.class_of_service(ClassOfService::default());
    let at = key.and_then(|_| w.hmac_placeholder().ok());
    if let (Some(k), Some(at)) = (key, at) {
        sign_hmac_tlv(&mut buf, mode.base_len(), at, k);
        SenderPacket::new_unchecked(&mut buf[..], mode).sign(k);
    }
    buf
}

/// A Session-Sender test packet of `mode` (signed with `key` when given): SSID 1, these
/// sequence number and T1, an unsynchronized error estimate.
pub fn stamp_request(
    mode: pathprobe_proto::stamp::Mode,
    key: Option<&pathprobe_proto::stamp::AuthKey>,
    sequence_number: u32,
    timestamp: u64,
) -> Vec<u8> {
    use pathprobe_proto::stamp::{ErrorEstimate, SenderPacket, SenderRepr};
    let mut buf = vec![0u8; mode.base_len()];
    let mut p = SenderPacket::new_unchecked(&mut buf[..], mode);
    SenderRepr {
        sequence_number,
        timestamp,
        error_estimate: ErrorEstimate::default(),
        ssid: 1,
    }
    .emit(&mut p);
    if let Some(k) = key {
        p.sign(k);
    }
    buf
}
