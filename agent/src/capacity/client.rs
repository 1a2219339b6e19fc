//! The near end of a capacity test: an idle STAMP stage for the path's resting latency,
//! then stages of rising UDP load (a staircase, or a search for the knee), each with a
//! STAMP stream under it, the far end counting what arrives; then optional TCP stages.
//!
//! ```text
//! client ──TCP control (hello, stage, result)──> reflector --allow-capacity
//!   pacer ──UDP load──────────────────────────> sink (port + 1)        [up]
//!   sink  <─UDP load─────────────────────────── pacer                   [down]
//!   Prober ──STAMP──────────────────────────────> reflector              [every stage]
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use pathprobe_proto::report::Timestamping;
use socket2::{Domain, Protocol, Socket, Type};

use super::knee::{self, Judgement, Knee, StageOutcome, Thresholds};
use super::pacer::{Load, pace};
use super::server::{self, overhead, tcp_receive, tcp_send};
use super::sink::Sink;
pub use super::wire::staircase;
use super::wire::{
    Direction, MAX_SEARCH_STAGES, Reply, Request, SETTLE, Shape, SinkCount, VERSION,
};
use crate::engine::session::WindowStats;
use crate::probe::{ProbeConfig, Prober};
use crate::{Error, Result, output};

/// A search stops when pass and fail are this close (a fraction of the fail rate).
const SEARCH_RESOLUTION: f64 = 0.05;
/// A staircase stops after this many failed stages in a row: the knee is behind it, and
/// overloading a production path further only hurts its users.
const MAX_FAILED_IN_A_ROW: usize = 2;

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The far agent's reflector (STAMP, and control on TCP at the same port).
    pub target: SocketAddr,
    /// Where the far agent's control listens, when not at `target` (a relay or NAT that
    /// carries only UDP in front of it).
    pub control: Option<SocketAddr>,
    /// Where to send upload load, when the far agent's load port is mapped elsewhere.
    pub load_to: Option<SocketAddr>,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
    pub start_bps: u64,
    pub max_bps: u64,
    pub steps: u32,
    pub search: bool,
    pub stage: Duration,
    pub direction: Direction,
    /// UDP payload octets of the load.
    pub size: usize,
    /// STAMP probes per second under load.
    pub probe_rate: u32,
    pub tcp_streams: Vec<u32>,
    pub thresholds: Thresholds,
    /// The far reflector's key: it proves the test may run, and authenticates the STAMP
    /// stream under load.
    pub key: Option<pathprobe_proto::stamp::AuthKey>,
}

impl Plan {
    /// Its stages, and how long each lasts.
    pub fn shape(&self) -> Shape {
        Shape {
            start_bps: self.start_bps,
            max_bps: self.max_bps,
            steps: self.steps,
            search: self.search,
            stage: self.stage,
            direction: self.direction,
            tcp_stages: self.tcp_streams.len(),
        }
    }

    /// The longest this test can take ([`Shape::longest`]).
    pub fn longest(&self) -> Duration {
        self.shape().longest()
    }
}

/// What one direction of a stage delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct DirResult {
    pub sent: u64,
    pub received: u64,
    pub duplicates: u64,
    /// Lost / sent.
    pub loss: f64,
    pub delivered_bps: u64,
    /// Delivered rate in each 100 ms interval.
    pub interval_bps: Vec<u64>,
}

/// One load stage.
#[derive(Debug, Clone)]
pub struct StageResult {
    /// Its place in the run, from 1.
    pub number: usize,
    pub offered_bps: u64,
    pub up: Option<DirResult>,
    pub down: Option<DirResult>,
    /// The STAMP stream during the stage.
    pub stamp: Option<Stamped>,
    pub outcome: StageOutcome,
    pub judgement: Judgement,
    /// The load generator sent under 99% of what the stage called for (this machine,
    /// not the path, is the limit).
    pub sender_short: bool,
    pub start_wall_ns: u64,
    pub end_wall_ns: u64,
}

/// One TCP stage.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpResult {
    pub streams: u32,
    pub direction: Direction,
    pub goodput_bps: u64,
    pub bytes: Vec<u64>,
}

/// A whole capacity test.
#[derive(Debug, Clone)]
pub struct Run {
    pub idle: Option<Stamped>,
    pub idle_p99_ns: u64,
    pub stages: Vec<StageResult>,
    pub knee: Knee,
    pub tcp: Vec<TcpResult>,
    /// Why the staircase or search stopped early, if it did.
    pub stopped_early: Option<String>,
}

/// Progress, for a bar or a log.
#[derive(Debug)]
pub enum Event<'a> {
    Idle,
    Stage { number: usize, offered_bps: u64 },
    StageDone(&'a StageResult),
    Tcp { streams: u32, direction: Direction },
    TcpDone(&'a TcpResult),
}

/// The control connection.
struct Control {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    session: u64,
    sink_port: u16,
}

impl Control {
    fn connect(plan: &Plan) -> Result<Self> {
        let refused = |e: &std::io::Error| {
            Error::Config(format!(
                "{} does not take capacity tests ({e}): start its reflector with --allow-capacity (it then listens on TCP {} for control and port {} for load)",
                plan.control.unwrap_or(plan.target),
                plan.control.unwrap_or(plan.target).port(),
                plan.control.unwrap_or(plan.target).port().saturating_add(1)
            ))
        };
        let control = plan.control.unwrap_or(plan.target);
        let sock = Socket::new(
            Domain::for_address(control),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(|e| io("create a TCP socket", e))?;
        crate::pin::pin(
            &sock,
            control,
            plan.bind.map(|b| SocketAddr::new(b.ip(), 0)),
            plan.interface.as_deref(),
            plan.fwmark,
        )?;
        sock.connect_timeout(&control.into(), Duration::from_secs(5))
            .map_err(|e| refused(&e))?;
        let stream: TcpStream = sock.into();
        stream
            .set_read_timeout(Some(plan.stage + Duration::from_secs(30)))
            .map_err(|e| io("set a control timeout", e))?;
        let mut id = [0u8; 8];
        getrandom::fill(&mut id)
            .map_err(|e| Error::Config(format!("no randomness for a session id: {e}")))?;
        let writer = stream
            .try_clone()
            .map_err(|e| io("clone the control socket", e))?;
        let mut c = Self {
            reader: BufReader::new(stream),
            writer,
            session: u64::from_be_bytes(id),
            sink_port: 0,
        };
        let mut hello = c.call(&Request::Hello {
            version: VERSION,
            session: c.session,
        })?;
        if let Some(challenge) = hello.challenge.take() {
            let Some(key) = &plan.key else {
                return Err(Error::Config(format!(
                    "{} asks capacity tests to prove its authentication key: give --auth-key-file with the reflector's key",
                    plan.target
                )));
            };
            let challenge = super::wire::from_hex::<{ super::wire::CHALLENGE_LEN }>(&challenge)
                .map_err(|e| Error::Config(format!("the far end's challenge is not valid: {e}")))?;
            let proof = super::wire::hello_proof(key, &challenge, c.session);
            hello = c.call(&Request::Auth {
                proof: super::wire::to_hex(&proof),
            })?;
        }
        c.sink_port = hello
            .sink_port
            .ok_or_else(|| Error::Config("the far end named no sink port".to_string()))?;
        if let Some(cap) = hello.max_rate_bps
            && plan.max_bps > cap
        {
            return Err(Error::Config(format!(
                "--max {} is above what {} accepts ({}, its --capacity-max-rate): lower --max",
                super::rate::Rate(plan.max_bps),
                plan.target,
                super::rate::Rate(cap)
            )));
        }
        if let Some(cap) = hello.max_stage_ms
            && u128::from(cap) < plan.stage.as_millis()
        {
            return Err(Error::Config(format!(
                "--stage-duration {:?} is above what {} accepts ({cap} ms, its --capacity-max-stage)",
                plan.stage, plan.target
            )));
        }
        Ok(c)
    }

    fn call(&mut self, req: &Request) -> Result<Reply> {
        let mut line = serde_json::to_vec(req)
            .map_err(|e| Error::Config(format!("cannot encode a control request: {e}")))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| io("send a control request", e))?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => {
                return Err(Error::Config(
                    "the far end closed the control connection".to_string(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(io("read the far end's answer", e)),
        }
        let reply: Reply = serde_json::from_str(answer.trim_end()).map_err(|e| {
            Error::Config(format!(
                "the far end's answer is not a capacity reply ({e})"
            ))
        })?;
        if reply.ok {
            Ok(reply)
        } else {
            Err(Error::Config(format!(
                "the far end refused: {}",
                reply.error.unwrap_or_default()
            )))
        }
    }
}

fn io(what: &str, source: std::io::Error) -> Error {
    Error::Io {
        what: what.to_string(),
        source,
    }
}

/// A UDP socket pinned like the plan says, on an ephemeral port.
fn udp(plan: &Plan) -> Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(plan.target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(|e| io("create a UDP socket", e))?;
    let _ = sock.set_send_buffer_size(4 << 20);
    let _ = sock.set_recv_buffer_size(8 << 20);
    crate::pin::pin(
        &sock,
        plan.target,
        plan.bind.map(|b| SocketAddr::new(b.ip(), 0)),
        plan.interface.as_deref(),
        plan.fwmark,
    )?;
    Ok(sock)
}

/// The STAMP stream of one stage.
#[derive(Debug, Clone)]
pub struct Stamped {
    /// All of it, merged into one window.
    pub window: WindowStats,
    pub timestamping: Timestamping,
    /// Where the probes left from.
    pub local: SocketAddr,
}

/// The STAMP stream of one stage; `None` if nothing came back.
fn stamp(plan: &Plan, length: Duration) -> Option<Stamped> {
    let length_ns = u64::try_from(length.as_nanos()).unwrap_or(u64::MAX);
    let prober = Prober::open(ProbeConfig {
        protocol: pathprobe_proto::report::ProbeProtocol::Stamp,
        target: plan.target,
        bind: plan.bind.map(|b| SocketAddr::new(b.ip(), 0)),
        interface: plan.interface.clone(),
        fwmark: plan.fwmark,
        interval_ns: 1_000_000_000 / u64::from(plan.probe_rate.max(1)),
        count: None,
        duration_ns: Some(length_ns),
        size: if plan.key.is_some() {
            pathprobe_proto::stamp::Mode::Authenticated.base_len()
        } else {
            pathprobe_proto::stamp::Mode::Unauthenticated.base_len()
        },
        dscp: 0,
        ttl: None,
        key: plan.key.clone(),
        window_ns: length_ns.saturating_add(60_000_000_000),
        // Half a second: far above any path's RTT plus a full bottleneck queue.
        late_timeout_ns: 500_000_000,
        no_reply_ns: length_ns.saturating_add(2_000_000_000),
        ssid: 0,
        route_each_probe: false,
    })
    .ok()?;
    let windows = prober.run(&AtomicBool::new(false), |_| {}).ok()?;
    Some(Stamped {
        window: output::merge(&windows).ok().flatten()?,
        timestamping: prober.timestamping,
        local: prober.local,
    })
}

fn rtt_at(w: Option<&Stamped>, q: f64) -> Option<u64> {
    w.and_then(|w| w.window.histograms.get(&pathprobe_proto::hist::Metric::Rtt))
        .filter(|h| !h.is_empty())
        .map(|h| h.value_at_quantile(q))
}

fn p99(w: Option<&Stamped>) -> Option<u64> {
    rtt_at(w, 0.99)
}

#[allow(clippy::cast_precision_loss)]
fn dir_result(sent: u64, c: &SinkCount) -> DirResult {
    DirResult {
        sent,
        received: c.packets,
        duplicates: c.duplicates,
        loss: if sent == 0 {
            0.0
        } else {
            sent.saturating_sub(c.packets) as f64 / sent as f64
        },
        delivered_bps: c.delivered_bps(),
        interval_bps: c.interval_bps.clone(),
    }
}

/// Runs one load stage at `rate`.
fn stage(
    plan: &Plan,
    ctl: &mut Control,
    number: u32,
    rate: u64,
    idle_p99_ns: u64,
    stop: &AtomicBool,
) -> Result<StageResult> {
    let duration_ns = u64::try_from(plan.stage.as_nanos()).unwrap_or(u64::MAX);
    let load = Load {
        rate_bps: rate,
        size: plan.size,
        overhead: overhead(&plan.target),
        duration_ns,
        stage: number,
        session: ctl.session,
    };
    let sink = Sink::default();
    let sink_sock = udp(plan)?;
    sink_sock
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| io("set a receive timeout", e))?;
    let client_port = sink_sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or(0, |a| a.port());
    sink.begin(ctl.session, number, duration_ns);
    let up_sock = if plan.direction.up() {
        let s = udp(plan)?;
        let to = plan
            .load_to
            .unwrap_or_else(|| SocketAddr::new(plan.target.ip(), ctl.sink_port));
        s.connect(&to.into())
            .map_err(|e| io("connect the load socket", e))?;
        Some(s)
    } else {
        None
    };
    let start_wall_ns = crate::sys::realtime_ns();
    ctl.call(&Request::Stage {
        id: number,
        direction: plan.direction,
        rate_bps: rate,
        size: plan.size,
        duration_ms: u64::try_from(plan.stage.as_millis()).unwrap_or(u64::MAX),
        client_port,
    })?;
    let sink_stop = AtomicBool::new(false);
    let started = Instant::now();
    let (stamp, paced) = std::thread::scope(|s| {
        let stamp_thread = s.spawn(|| stamp(plan, plan.stage));
        if plan.direction.down() {
            s.spawn(|| sink.run(&sink_sock, overhead(&plan.target) as u64, &sink_stop));
        }
        let paced = up_sock.as_ref().map(|sock| pace(sock, &load, stop, true));
        // Down only: the far end sends for the stage's length.
        if let Some(left) = plan.stage.checked_sub(started.elapsed()) {
            std::thread::sleep(left);
        }
        std::thread::sleep(SETTLE);
        let stamp = stamp_thread.join().ok().flatten();
        sink_stop.store(true, Ordering::Relaxed);
        (stamp, paced)
    });
    let paced = paced.transpose().map_err(|e| io("send the load", e))?;
    let answer = ctl.call(&Request::Result { id: number })?;
    let end_wall_ns = crate::sys::realtime_ns();
    let total = load.total();
    let up = paced.map(|p| dir_result(p.sent, &answer.received.clone().unwrap_or_default()));
    let down = plan
        .direction
        .down()
        .then(|| dir_result(answer.sent.unwrap_or(0), &sink.count()));
    let sender_short = paced.is_some_and(|p| p.sent * 100 < total * 99)
        || down.as_ref().is_some_and(|d| d.sent * 100 < total * 99);
    let dirs: Vec<&DirResult> = up.iter().chain(down.iter()).collect();
    let outcome = StageOutcome {
        offered_bps: rate,
        delivered_bps: dirs.iter().map(|d| d.delivered_bps).min().unwrap_or(0),
        loss: dirs.iter().map(|d| d.loss).fold(0.0, f64::max),
        rtt_p99_ns: p99(stamp.as_ref()),
        sender_late_p99_ns: paced.map_or(0, |p| p.behind_p99_ns),
        rtt_p50_ns: rtt_at(stamp.as_ref(), 0.5),
        remeasured: false,
    };
    Ok(StageResult {
        number: number as usize,
        offered_bps: rate,
        up,
        down,
        stamp,
        outcome,
        judgement: knee::judge(&outcome, idle_p99_ns, &plan.thresholds),
        sender_short,
        start_wall_ns,
        end_wall_ns,
    })
}

/// One TCP stage with `streams` connections in `direction` (up or down).
fn tcp(
    plan: &Plan,
    ctl: &mut Control,
    number: u32,
    streams: u32,
    direction: Direction,
    stop: &AtomicBool,
) -> Result<TcpResult> {
    ctl.call(&Request::Tcp {
        id: number,
        direction,
        streams,
        duration_ms: u64::try_from(plan.stage.as_millis()).unwrap_or(u64::MAX),
    })?;
    let to = SocketAddr::new(plan.target.ip(), ctl.sink_port);
    let mut conns = Vec::new();
    for _ in 0..streams {
        let sock = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| io("create a TCP socket", e))?;
        crate::pin::pin(
            &sock,
            to,
            plan.bind.map(|b| SocketAddr::new(b.ip(), 0)),
            plan.interface.as_deref(),
            plan.fwmark,
        )?;
        sock.connect_timeout(&to.into(), Duration::from_secs(5))
            .map_err(|e| io(&format!("open a TCP stream to {to}"), e))?;
        let mut c: TcpStream = sock.into();
        c.write_all(&ctl.session.to_be_bytes())
            .map_err(|e| io("start a TCP stream", e))?;
        conns.push(c);
    }
    let first = Mutex::new(None::<Instant>);
    let last = Mutex::new(None::<Instant>);
    let local: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = conns
            .into_iter()
            .map(|c| {
                let (first, last) = (&first, &last);
                s.spawn(move || {
                    if direction == Direction::Up {
                        tcp_send(c, plan.stage, None, stop)
                    } else {
                        tcp_receive(c, plan.stage, None, stop, first, last)
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let answer = ctl.call(&Request::TcpResult { id: number })?;
    let (bytes, seconds) = if direction == Direction::Up {
        (
            answer.tcp_bytes.unwrap_or_default(),
            answer.tcp_seconds.unwrap_or(0.0),
        )
    } else {
        let f = *first.lock().unwrap_or_else(PoisonError::into_inner);
        let l = *last.lock().unwrap_or_else(PoisonError::into_inner);
        let secs = match (f, l) {
            (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
            _ => 0.0,
        };
        (local, secs)
    };
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let goodput_bps = if seconds > 0.0 {
        (bytes.iter().sum::<u64>() as f64 * 8.0 / seconds) as u64
    } else {
        0
    };
    Ok(TcpResult {
        streams,
        direction,
        goodput_bps,
        bytes,
    })
}

/// A test in progress: the control connection, the stages so far.
struct Runner<'a> {
    plan: &'a Plan,
    ctl: Control,
    stop: &'a AtomicBool,
    on_event: &'a mut dyn FnMut(Event<'_>),
    idle_p99_ns: u64,
    /// The last stage id used (load and TCP stages share the numbering).
    number: u32,
    stages: Vec<StageResult>,
}

impl Runner<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Runs a stage at `rate`; one that fails on a [`knee::spike`] alone is measured
    /// once more, and the knee uses the second measurement (both are reported).
    fn load_stage(&mut self, rate: u64) -> Result<()> {
        for attempt in 0..2 {
            self.number += 1;
            (self.on_event)(Event::Stage {
                number: self.stages.len() + 1,
                offered_bps: rate,
            });
            let mut r = stage(
                self.plan,
                &mut self.ctl,
                self.number,
                rate,
                self.idle_p99_ns,
                self.stop,
            )?;
            let again = attempt == 0
                && !self.stopped()
                && knee::spike(&r.outcome, self.idle_p99_ns, &self.plan.thresholds);
            r.outcome.remeasured = again;
            (self.on_event)(Event::StageDone(&r));
            self.stages.push(r);
            if !again {
                break;
            }
        }
        Ok(())
    }

    fn outcomes(&self) -> Vec<StageOutcome> {
        self.stages.iter().map(|s| s.outcome).collect()
    }

    /// Start and max, then bisection; why it stopped early, if it did.
    fn search(&mut self) -> Result<Option<String>> {
        for rate in [self.plan.start_bps, self.plan.max_bps] {
            if !self.stopped() {
                self.load_stage(rate)?;
            }
        }
        let th = self.plan.thresholds;
        while let Some(next) =
            knee::next_search_rate(&self.outcomes(), self.idle_p99_ns, &th, SEARCH_RESOLUTION)
        {
            let rates = self.stages.iter().filter(|s| !s.outcome.remeasured).count();
            if rates >= MAX_SEARCH_STAGES || self.stopped() {
                return Ok(Some(format!(
                    "the search stopped after {rates} rates ({} stages), before pass and fail were within {:.0}%",
                    self.stages.len(),
                    SEARCH_RESOLUTION * 100.0
                )));
            }
            self.load_stage(next)?;
        }
        Ok(None)
    }

    /// The staircase, stopping after [`MAX_FAILED_IN_A_ROW`] failures.
    fn staircase(&mut self) -> Result<Option<String>> {
        let mut failed = 0;
        for rate in staircase(self.plan.start_bps, self.plan.max_bps, self.plan.steps) {
            if self.stopped() {
                return Ok(Some("stopped by a signal".to_string()));
            }
            self.load_stage(rate)?;
            if self.stages.last().is_some_and(|s| s.judgement.passed()) {
                failed = 0;
            } else {
                failed += 1;
            }
            if failed >= MAX_FAILED_IN_A_ROW {
                return Ok(Some(format!(
                    "{MAX_FAILED_IN_A_ROW} stages in a row failed: the knee is below them, so the staircase stopped rather than overload the path further"
                )));
            }
        }
        Ok(None)
    }

    /// Every stream count, in each direction the plan loads.
    fn tcp_stages(&mut self) -> Result<Vec<TcpResult>> {
        let dirs: Vec<Direction> = [Direction::Up, Direction::Down]
            .into_iter()
            .filter(|d| {
                (*d == Direction::Up && self.plan.direction.up())
                    || (*d == Direction::Down && self.plan.direction.down())
            })
            .collect();
        let mut out = Vec::new();
        for &streams in &self.plan.tcp_streams {
            for &direction in &dirs {
                if self.stopped() {
                    return Ok(out);
                }
                (self.on_event)(Event::Tcp { streams, direction });
                self.number += 1;
                let t = tcp(
                    self.plan,
                    &mut self.ctl,
                    self.number,
                    streams,
                    direction,
                    self.stop,
                )?;
                (self.on_event)(Event::TcpDone(&t));
                out.push(t);
            }
        }
        Ok(out)
    }
}

/// Runs the whole test.
pub fn run(plan: &Plan, stop: &AtomicBool, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Run> {
    if plan.start_bps == 0 || plan.max_bps < plan.start_bps {
        return Err(Error::Config(
            "--start must be above zero and at most --max".to_string(),
        ));
    }
    if !(super::wire::HEADER_LEN..=server::MAX_SIZE).contains(&plan.size) {
        return Err(Error::Config(format!(
            "--size {} is out of range: {} to {} octets of UDP payload",
            plan.size,
            super::wire::HEADER_LEN,
            server::MAX_SIZE
        )));
    }
    let ctl = Control::connect(plan)?;
    on_event(Event::Idle);
    let idle = stamp(plan, plan.stage);
    let idle_p99_ns = p99(idle.as_ref()).ok_or(Error::NoReply {
        target: plan.target,
        after: plan.stage,
    })?;
    let mut runner = Runner {
        plan,
        ctl,
        stop,
        on_event,
        idle_p99_ns,
        number: 0,
        stages: Vec::new(),
    };
    let stopped_early = if plan.search {
        runner.search()?
    } else {
        runner.staircase()?
    };
    let knee = knee::knee(&runner.outcomes(), idle_p99_ns, &plan.thresholds);
    let tcp = runner.tcp_stages()?;
    Ok(Run {
        idle,
        idle_p99_ns,
        stages: runner.stages,
        knee,
        tcp,
        stopped_early,
    })
}
