//! The far end of capacity tests, inside the reflector when it runs with
//! `--allow-capacity`: a control listener on TCP at the reflector's port number, a UDP load
//! sink and a TCP load sink one port above. One test at a time; every stage within the caps
//! the operator set (`--capacity-max-rate`, `--capacity-max-stage`), TCP stages too (their
//! streams are paced to the cap); load is sent only back to the address the control
//! connection comes from.
//!
//! The slot is given only after a valid `hello` (and, when the reflector has a key, an
//! `auth` that proves it over a fresh challenge). A control connection silent for [`IDLE`]
//! past its running stage is closed, and a line that is not a request ends the session:
//! nobody holds the far end without running a test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::pacer::{Load, pace};
use super::sink::Sink;
use super::wire::{self, CHALLENGE_LEN, HEADER_LEN, Reply, Request, VERSION};
use crate::keyfile::LiveRing;
use crate::{Error, Result};

/// Longest control line accepted.
const MAX_LINE: u64 = 4096;
/// A control connection silent this long (beyond the stage it runs) is closed.
pub const IDLE: Duration = Duration::from_secs(10);
/// The longest a test may hold this far end, however many stages it asks for.
pub const MAX_SESSION: Duration = Duration::from_hours(1);
/// Most control connections open at once (each waits at most IDLE for a hello).
pub const MAX_CONTROL_CONNECTIONS: usize = 16;
/// Most TCP streams in one stage.
pub const MAX_STREAMS: u32 = 64;
/// Largest load datagram accepted (a 9000-octet jumbo frame's UDP payload).
pub const MAX_SIZE: usize = 8972;

/// The caps and where to listen.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The reflector's address: control on TCP at this port, sinks one port above.
    pub listen: SocketAddr,
    pub max_rate_bps: u64,
    pub max_stage: Duration,
    /// The reflector's keys: a test must prove it holds one of them.
    pub keys: Option<Arc<LiveRing>>,
}

/// IP octets of a full-size TCP segment on a 1500-octet MTU, and its payload (with the
/// timestamp option): TCP stages are paced on payload so that their IP rate stays within
/// the cap on such a path.
const SEGMENT_IP: u64 = 1500;
const SEGMENT_PAYLOAD: u64 = 1448;

/// Paces one TCP stream: at most `bytes_per_s` octets over time, after a small burst.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    bytes_per_s: u64,
    burst: u64,
}

impl Pace {
    /// `streams` streams sharing a cap of `max_rate_bps` IP bits per second.
    pub fn share(max_rate_bps: u64, streams: u32) -> Self {
        let payload_bps = u128::from(max_rate_bps) * u128::from(SEGMENT_PAYLOAD)
            / u128::from(SEGMENT_IP)
            / u128::from(streams.max(1));
        let bytes_per_s = u64::try_from(payload_bps / 8).unwrap_or(u64::MAX).max(1);
        Self {
            bytes_per_s,
            // 10 ms of the rate, at least a few segments.
            burst: (bytes_per_s / 100).max(4 * SEGMENT_PAYLOAD),
        }
    }

    /// Octets a stream that started at `start` may have moved by `now`.
    fn allowed(self, start: Instant, now: Instant) -> u64 {
        let ns = now.saturating_duration_since(start).as_nanos();
        let moved = ns * u128::from(self.bytes_per_s) / 1_000_000_000;
        self.burst
            .saturating_add(u64::try_from(moved).unwrap_or(u64::MAX))
    }

    /// How much of `want` octets a stream that has moved `done` may move now; 0 means wait.
    fn room(pace: Option<Self>, start: Instant, done: u64, want: usize) -> usize {
        pace.map_or(want, |p| {
            let left = p.allowed(start, Instant::now()).saturating_sub(done);
            usize::try_from(left).unwrap_or(usize::MAX).min(want)
        })
    }
}

/// Octets of UDP and IP header under each datagram of `addr`'s family.
pub const fn overhead(addr: &SocketAddr) -> usize {
    if addr.is_ipv4() { 28 } else { 48 }
}

/// The bound capacity server.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    control: TcpListener,
    udp_sink: Socket,
    tcp_sink: TcpListener,
    sink: Sink,
    busy: Mutex<bool>,
    /// Control connections being served.
    open: std::sync::atomic::AtomicUsize,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

impl Server {
    /// Binds the control listener and both sinks.
    pub fn bind(cfg: ServerConfig) -> Result<Self> {
        let port = cfg.listen.port();
        let sink_addr = SocketAddr::new(cfg.listen.ip(), port.checked_add(1).unwrap_or(0));
        let control = TcpListener::bind(cfg.listen).map_err(io_err(format!(
            "listen for capacity tests on TCP {} (choose another --listen port)",
            cfg.listen
        )))?;
        let udp_sink = Socket::new(
            Domain::for_address(sink_addr),
            Type::DGRAM,
            Some(Protocol::UDP),
        )
        .and_then(|s| {
            s.set_recv_buffer_size(8 << 20)?;
            s.bind(&sink_addr.into())?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok(s)
        })
        .map_err(io_err(format!(
            "bind the capacity load sink to UDP {sink_addr} (the reflector's port + 1)"
        )))?;
        // A small receive buffer keeps an upload paced by our reads from parking seconds of
        // load in the kernel: a tenth of a second of the cap, within 64 KiB to 4 MiB.
        let rcvbuf = usize::try_from(cfg.max_rate_bps / 80)
            .unwrap_or(4 << 20)
            .clamp(64 << 10, 4 << 20);
        let tcp_sink = Socket::new(
            Domain::for_address(sink_addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .and_then(|s| {
            s.set_reuse_address(true)?;
            s.set_recv_buffer_size(rcvbuf)?;
            s.bind(&sink_addr.into())?;
            s.listen(128)?;
            Ok(TcpListener::from(s))
        })
        .map_err(io_err(format!(
            "bind the capacity TCP sink to TCP {sink_addr} (the reflector's port + 1)"
        )))?;
        tcp_sink
            .set_nonblocking(true)
            .map_err(io_err("make the TCP sink non-blocking".to_string()))?;
        control
            .set_nonblocking(true)
            .map_err(io_err("make the control listener non-blocking".to_string()))?;
        Ok(Self {
            cfg,
            control,
            udp_sink,
            tcp_sink,
            sink: Sink::default(),
            busy: Mutex::new(false),
            open: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Serves until `stop`.
    pub fn run(&self, stop: &AtomicBool) -> Result<()> {
        let overhead = overhead(&self.cfg.listen) as u64;
        std::thread::scope(|s| {
            s.spawn(|| self.sink.run(&self.udp_sink, overhead, stop));
            while !stop.load(Ordering::Relaxed) {
                match self.control.accept() {
                    Ok((stream, peer)) => {
                        if self.open.fetch_add(1, Ordering::SeqCst) >= MAX_CONTROL_CONNECTIONS {
                            self.open.fetch_sub(1, Ordering::SeqCst);
                            let _ = reply(
                                &stream,
                                &Reply::error(format!(
                                    "busy: {MAX_CONTROL_CONNECTIONS} control connections are open here already"
                                )),
                            );
                            continue;
                        }
                        s.spawn(move || {
                            self.serve(&stream, peer, stop);
                            self.open.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => tracing::warn!("capacity: accept failed: {e}"),
                }
            }
        });
        Ok(())
    }

    fn serve(&self, stream: &TcpStream, peer: SocketAddr, stop: &AtomicBool) {
        // A connection that says nothing is closed after IDLE, holding nothing.
        if stream.set_read_timeout(Some(IDLE)).is_err() {
            return;
        }
        let Ok(read_half) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let Some(id) = self.handshake(stream, &mut reader) else {
            return;
        };
        let Some(_slot) = TestSlot::take(&self.busy) else {
            let _ = reply(
                stream,
                &Reply::error(
                    "busy: another capacity test is running here; try again when it ends",
                ),
            );
            return;
        };
        let welcome = Reply {
            sink_port: Some(self.cfg.listen.port().saturating_add(1)),
            max_rate_bps: Some(self.cfg.max_rate_bps),
            max_stage_ms: u64::try_from(self.cfg.max_stage.as_millis()).ok(),
            ..Reply::ok()
        };
        if reply(stream, &welcome).is_err() {
            return;
        }
        tracing::info!(%peer, "capacity test started");
        let mut session = Session {
            server: self,
            peer,
            local: stream.local_addr().unwrap_or(self.cfg.listen),
            id,
            stop_load: Arc::new(AtomicBool::new(false)),
            down: None,
            tcp: None,
            busy_until: Instant::now(),
        };
        session.converse(stream, &mut reader, stop);
        session.stop_load.store(true, Ordering::Relaxed);
        if let Some((_, h)) = session.down.take() {
            let _ = h.join();
        }
        if let Some((_, h)) = session.tcp.take() {
            let _ = h.join();
        }
        self.sink.close();
        tracing::info!(%peer, "capacity test ended");
    }

    /// The `hello` (and, with a key, the `auth` that proves it): the session id, or `None`
    /// after telling the peer what was wrong.
    fn handshake(&self, stream: &TcpStream, reader: &mut BufReader<TcpStream>) -> Option<u64> {
        let refuse = |msg: String| {
            let _ = reply(stream, &Reply::error(msg));
            None
        };
        let session = match read_request(reader) {
            Ok(Request::Hello { version, session }) if version == VERSION => session,
            Ok(Request::Hello { version, .. }) => {
                return refuse(format!(
                    "capacity protocol version {version} is not spoken here (this agent speaks {VERSION}): run the same pathprobe version at both ends"
                ));
            }
            Ok(_) => return refuse("say hello first".to_string()),
            Err(e) => return refuse(e),
        };
        let Some(keys) = &self.cfg.keys else {
            return Some(session);
        };
        let mut challenge = [0u8; CHALLENGE_LEN];
        if getrandom::fill(&mut challenge).is_err() {
            return refuse("no randomness for a challenge here".to_string());
        }
        let ask = Reply {
            challenge: Some(wire::to_hex(&challenge)),
            ..Reply::ok()
        };
        reply(stream, &ask).ok()?;
        let proof = match read_request(reader) {
            Ok(Request::Auth { proof }) => proof,
            Ok(_) => return refuse("this reflector has an authentication key: answer the challenge with `auth` (give the capacity test --auth-key-file)".to_string()),
            Err(e) => return refuse(e),
        };
        let ring = keys.get();
        let valid = wire::from_hex::<16>(&proof).ok().is_some_and(|p| {
            ring.keys()
                .any(|(_, k)| wire::check_hello_proof(&k.key, &challenge, session, &p).is_ok())
        });
        if valid {
            Some(session)
        } else {
            refuse("authentication failed: the capacity test's --auth-key-file is not this reflector's key".to_string())
        }
    }
}

/// Reads one control line as a request; what is wrong with it otherwise (the session
/// ends then).
fn read_request(reader: &mut BufReader<TcpStream>) -> std::result::Result<Request, String> {
    let mut line = String::new();
    match reader.take(MAX_LINE + 1).read_line(&mut line) {
        Ok(0) => return Err("the connection closed".to_string()),
        Ok(_) => {}
        Err(e) => return Err(format!("no request within the idle time ({e})")),
    }
    if line.len() as u64 > MAX_LINE || !line.ends_with('\n') {
        return Err("control line too long or cut short".to_string());
    }
    serde_json::from_str::<Request>(line.trim_end())
        .map_err(|e| format!("not a capacity request ({e}): the session ends"))
}

/// The one test slot, held for a session and given back when it ends, however it ends.
struct TestSlot<'a>(&'a Mutex<bool>);

impl<'a> TestSlot<'a> {
    fn take(busy: &'a Mutex<bool>) -> Option<Self> {
        let mut b = busy.lock().unwrap_or_else(PoisonError::into_inner);
        if *b {
            return None;
        }
        *b = true;
        Some(Self(busy))
    }
}

impl Drop for TestSlot<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = false;
    }
}

fn reply(mut stream: &TcpStream, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    stream.write_all(&line)
}

/// What a TCP stage counted: octets per stream and the span from first to last octet.
#[derive(Debug, Default, Clone)]
pub struct TcpCount {
    pub bytes: Vec<u64>,
    pub seconds: f64,
}

struct Session<'a> {
    server: &'a Server,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    /// When the stage the client started last is over: the client may be silent until then.
    busy_until: Instant,
    stop_load: Arc<AtomicBool>,
    down: Option<(u32, JoinHandle<u64>)>,
    tcp: Option<(u32, JoinHandle<TcpCount>)>,
}

impl Session<'_> {
    /// Answers requests until the client leaves, is silent for [`IDLE`] beyond its
    /// running stage, sends a line that is not a request, or has held the far end for
    /// [`MAX_SESSION`].
    fn converse(
        &mut self,
        stream: &TcpStream,
        reader: &mut BufReader<TcpStream>,
        stop: &AtomicBool,
    ) {
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if started.elapsed() > MAX_SESSION {
                let _ = reply(
                    stream,
                    &Reply::error(format!(
                        "this test has held the far end for {MAX_SESSION:?}, the most one may: start a new one"
                    )),
                );
                return;
            }
            let wait = self.busy_until.saturating_duration_since(Instant::now()) + IDLE;
            if stream.set_read_timeout(Some(wait)).is_err() {
                return;
            }
            let answer = match read_request(reader) {
                Ok(req) => self.handle(&req),
                Err(e) => {
                    let _ = reply(stream, &Reply::error(e));
                    return;
                }
            };
            if reply(stream, &answer).is_err() {
                return;
            }
        }
    }

    fn handle(&mut self, req: &Request) -> Reply {
        let session = self.id;
        match *req {
            Request::Hello { .. } | Request::Auth { .. } => Reply::error("already said hello"),
            Request::Stage {
                id,
                direction,
                rate_bps,
                size,
                duration_ms,
                client_port,
            } => {
                if let Some(e) = self.check(rate_bps, duration_ms) {
                    return Reply::error(e);
                }
                if !(HEADER_LEN..=MAX_SIZE).contains(&size) {
                    return Reply::error(format!(
                        "load datagrams must be {HEADER_LEN} to {MAX_SIZE} octets, not {size}"
                    ));
                }
                self.finish_down();
                let load = Load {
                    rate_bps,
                    size,
                    overhead: overhead(&self.peer),
                    duration_ns: duration_ms * 1_000_000,
                    stage: id,
                    session,
                };
                self.server.sink.begin(session, id, load.duration_ns);
                if direction.down() {
                    match self.start_down(load, client_port) {
                        Ok(h) => self.down = Some((id, h)),
                        Err(e) => return Reply::error(format!("cannot send load back: {e}")),
                    }
                }
                self.busy_until = Instant::now() + Duration::from_millis(duration_ms);
                Reply::ok()
            }
            Request::Result { id } => {
                let sent = match self.down.take() {
                    Some((d, h)) if d == id => Some(h.join().unwrap_or(0)),
                    other => {
                        self.down = other;
                        None
                    }
                };
                Reply {
                    received: Some(self.server.sink.count()),
                    sent,
                    ..Reply::ok()
                }
            }
            Request::Tcp {
                id,
                direction,
                streams,
                duration_ms,
            } => self.start_tcp(session, id, direction, streams, duration_ms),
            Request::TcpResult { id } => match self.tcp.take() {
                Some((t, h)) if t == id => {
                    let c = h.join().unwrap_or_default();
                    Reply {
                        tcp_bytes: Some(c.bytes),
                        tcp_seconds: Some(c.seconds),
                        ..Reply::ok()
                    }
                }
                other => {
                    self.tcp = other;
                    Reply::error(format!("no TCP stage {id} here"))
                }
            },
        }
    }

    /// Starts a TCP stage: accepts the client's streams and sinks or sends on them.
    fn start_tcp(
        &mut self,
        session: u64,
        id: u32,
        direction: wire::Direction,
        streams: u32,
        duration_ms: u64,
    ) -> Reply {
        if let Some(e) = self.check(0, duration_ms) {
            return Reply::error(e);
        }
        if streams == 0 || streams > MAX_STREAMS {
            return Reply::error(format!("1 to {MAX_STREAMS} TCP streams, not {streams}"));
        }
        let listener = match self.server.tcp_sink.try_clone() {
            Ok(l) => l,
            Err(e) => return Reply::error(format!("TCP sink unavailable: {e}")),
        };
        if let Some((_, h)) = self.tcp.take() {
            let _ = h.join();
        }
        let (peer, stop_load) = (self.peer.ip(), Arc::clone(&self.stop_load));
        let duration = Duration::from_millis(duration_ms);
        let pace = Pace::share(self.server.cfg.max_rate_bps, streams);
        let h = std::thread::spawn(move || {
            tcp_stage(
                &listener,
                (peer, session, streams),
                direction.down(),
                duration,
                pace,
                &stop_load,
            )
        });
        // The client may be silent for the stage and the 5 s a stream may take to drain.
        self.busy_until = Instant::now() + duration + Duration::from_secs(5);
        self.tcp = Some((id, h));
        Reply::ok()
    }

    /// Refuses what is beyond the operator's caps.
    fn check(&self, rate_bps: u64, duration_ms: u64) -> Option<String> {
        let cfg = &self.server.cfg;
        if rate_bps > cfg.max_rate_bps {
            return Some(format!(
                "{} is above this reflector's cap of {} (its --capacity-max-rate)",
                super::rate::Rate(rate_bps),
                super::rate::Rate(cfg.max_rate_bps)
            ));
        }
        if duration_ms == 0 || u128::from(duration_ms) > cfg.max_stage.as_millis() {
            return Some(format!(
                "a {duration_ms} ms stage is outside this reflector's cap of 1 to {} ms (its --capacity-max-stage)",
                cfg.max_stage.as_millis()
            ));
        }
        None
    }

    fn finish_down(&mut self) {
        if let Some((_, h)) = self.down.take() {
            let _ = h.join();
        }
    }

    /// Sends `load` to the control peer's address at `port`, from our control address.
    fn start_down(&self, load: Load, port: u16) -> std::io::Result<JoinHandle<u64>> {
        let to = SocketAddr::new(self.peer.ip(), port);
        let sock = Socket::new(Domain::for_address(to), Type::DGRAM, Some(Protocol::UDP))?;
        sock.set_send_buffer_size(4 << 20)?;
        sock.bind(&SocketAddr::new(self.local.ip(), 0).into())?;
        sock.connect(&to.into())?;
        let stop = Arc::clone(&self.stop_load);
        Ok(std::thread::spawn(move || {
            pace(&sock, &load, &stop, true).map_or(0, |p| p.sent)
        }))
    }
}

/// One TCP stage at the far end: accepts `streams` connections from `peer` that open with
/// the session id, then receives (up) or sends (down) for `duration`, each stream paced to
/// its share of the cap.
fn tcp_stage(
    listener: &TcpListener,
    (peer, session, streams): (IpAddr, u64, u32),
    send: bool,
    duration: Duration,
    pace: Pace,
    stop: &AtomicBool,
) -> TcpCount {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conns = Vec::new();
    while conns.len() < streams as usize
        && Instant::now() < deadline
        && !stop.load(Ordering::Relaxed)
    {
        match listener.accept() {
            Ok((mut c, from)) if from.ip() == peer => {
                let mut id = [0u8; 8];
                let ok = c.set_nonblocking(false).is_ok()
                    && c.set_read_timeout(Some(Duration::from_secs(2))).is_ok()
                    && c.read_exact(&mut id).is_ok()
                    && u64::from_be_bytes(id) == session;
                if ok {
                    conns.push(c);
                }
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let first = Mutex::new(None::<Instant>);
    let last = Mutex::new(None::<Instant>);
    let bytes: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = conns
            .into_iter()
            .map(|c| {
                let (first, last) = (&first, &last);
                s.spawn(move || {
                    if send {
                        tcp_send(c, duration, Some(pace), stop)
                    } else {
                        tcp_receive(c, duration, Some(pace), stop, first, last)
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    let span = |f: Option<Instant>, l: Option<Instant>| match (f, l) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    TcpCount {
        seconds: if send {
            duration.as_secs_f64()
        } else {
            span(
                *first.lock().unwrap_or_else(PoisonError::into_inner),
                *last.lock().unwrap_or_else(PoisonError::into_inner),
            )
        },
        bytes,
    }
}

/// A timeout or an interruption: look at the clock and the stop flag, then go on.
fn passing(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// Writes for `duration` (no faster than `pace`, when given), then closes; returns the
/// octets written.
pub fn tcp_send(
    mut c: TcpStream,
    duration: Duration,
    pace: Option<Pace>,
    stop: &AtomicBool,
) -> u64 {
    let buf = vec![0u8; 64 * 1024];
    let start = Instant::now();
    let end = start + duration;
    let _ = c.set_write_timeout(Some(Duration::from_millis(200)));
    let mut n = 0u64;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let room = Pace::room(pace, start, n, buf.len());
        if room == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match c.write(&buf[..room]) {
            Ok(w) => n += w as u64,
            Err(e) if passing(&e) => {}
            Err(_) => break,
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
    n
}

/// Reads until the peer closes (or `duration` plus 5 s), noting the first and last octet's
/// arrival; returns the octets read.
/// With `pace`, it reads no faster than that, so TCP's flow control holds the sender to
/// it.
pub fn tcp_receive(
    mut c: TcpStream,
    duration: Duration,
    pace: Option<Pace>,
    stop: &AtomicBool,
    first: &Mutex<Option<Instant>>,
    last: &Mutex<Option<Instant>>,
) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let end = start + duration + Duration::from_secs(5);
    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
    let mut n = 0u64;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let room = Pace::room(pace, start, n, buf.len());
        if room == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        match c.read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(r) => {
                let now = Instant::now();
                first
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(now);
                let mut l = last.lock().unwrap_or_else(PoisonError::into_inner);
                *l = Some(l.map_or(now, |x| x.max(now)));
                n += r as u64;
            }
            Err(e) if passing(&e) => {}
            Err(_) => break,
        }
    }
    n
}
