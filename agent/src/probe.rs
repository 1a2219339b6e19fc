//! The STAMP Session-Sender: three threads and two lock-free rings.
//!
//! ```text
//! sender thread --sendmmsg--> socket --> reflector --> socket --recvmmsg--> receiver thread
//!      | TxEvent (Sent / Failed / Missed)                  RxEvent (TxStamp / Reply) |
//!      +-----------> ArrayQueue ----> aggregator (caller's thread) <---- ArrayQueue <--+
//!                                      Tracker: windows, histograms, counters
//! ```
//!
//! The sender keeps an isochronous schedule with absolute deadlines (sleep to just before
//! the deadline with 1 ns timer slack, then spin), sends every due probe in one batch, and
//! skips (counting them) only slots it reaches more than half the late timeout too late. The I/O threads never block on
//! the rings, log or allocate per packet: a full ring drops the record and counts it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use pathprobe_proto::report::{ProbeProtocol, TimestampSource, Timestamping};
use pathprobe_proto::stamp::tlv::{ClassOfService, HEADER_LEN, TlvIter, TlvWriter, tlv_type};
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr,
    TimestampFormat,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::session::{
    Decided, MAX_IN_FLIGHT, Marks, Reply, Sent, Tracker, TrackerConfig, WindowStats,
};
use crate::sys::{self, RecvBatch, SendBatch};
use crate::{Error, Result};

/// Probes per `sendmmsg`, replies per `recvmmsg`.
const BATCH: usize = 64;
/// Records each ring holds: over a second at 50,000 probes/s.
const RING: usize = 1 << 16;
/// The sender sleeps until a margin before each deadline, then spins. The margin follows
/// how late this machine's sleeps actually end (twice the smoothed oversleep plus 20 µs,
/// kept between these bounds), so a VM with slow wake-ups spins longer and a quiet host
/// spends little CPU spinning.
const SPIN_MIN_NS: u64 = 20_000;
const SPIN_MAX_NS: u64 = 2_000_000;

/// Largest probe: a 1,500-octet MTU less the IPv4 and UDP headers.
pub const MAX_SIZE: usize = 1472;

/// Octets of the Class-of-Service TLV, with which the far end tells what DSCP it received.
const COS_TLV_LEN: usize = HEADER_LEN + ClassOfService::LEN;

/// The default probe size: the base packet and a Class-of-Service TLV (52 octets
/// unauthenticated, 120 authenticated), so that every probe learns the DSCP the far end
/// received.
pub const fn default_size(mode: Mode) -> usize {
    mode.base_len() + COS_TLV_LEN
}

/// How to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// STAMP, or one of the TCP probes ([`crate::tcp`]).
    pub protocol: ProbeProtocol,
    pub target: SocketAddr,
    pub bind: Option<SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
    pub interval_ns: u64,
    pub count: Option<u64>,
    pub duration_ns: Option<u64>,
    /// UDP payload octets.
    pub size: usize,
    pub dscp: u8,
    pub ttl: Option<u8>,
    pub key: Option<AuthKey>,
    pub window_ns: u64,
    pub late_timeout_ns: u64,
    /// Give up when nothing at all has answered this long after the first probe.
    pub no_reply_ns: u64,
    pub ssid: u16,
    /// Route every probe afresh (an unconnected socket: the kernel looks the route up per
    /// datagram), so a probe stream follows routing the moment it changes. A connected
    /// socket keeps its route until the kernel invalidates it, which a link coming back
    /// does not always do; but only a connected socket hears ICMP port unreachable, so
    /// probing uses one unless it must follow failovers.
    pub route_each_probe: bool,
}

impl ProbeConfig {
    const fn mode(&self) -> Mode {
        if self.key.is_some() {
            Mode::Authenticated
        } else {
            Mode::Unauthenticated
        }
    }

    /// Checks the settings against each other.
    pub fn validate(&self) -> Result<()> {
        let base = self.mode().base_len();
        if self.protocol != ProbeProtocol::Stamp && self.key.is_some() {
            return Err(Error::Config(format!(
                "--auth-key-file is STAMP's; --proto {} has no authenticated mode",
                self.protocol
            )));
        }
        if self.protocol == ProbeProtocol::Stamp && (self.size < base || self.size > MAX_SIZE) {
            return Err(Error::Config(format!(
                "--size {} is out of range: a {} STAMP probe is {base} to {MAX_SIZE} octets",
                self.size,
                if self.key.is_some() {
                    "authenticated"
                } else {
                    "unauthenticated"
                }
            )));
        }
        if self.dscp > 63 {
            return Err(Error::Config(format!(
                "--dscp {} is not a DSCP: use 0 to 63",
                self.dscp
            )));
        }
        if self.interval_ns == 0 {
            return Err(Error::Config(
                "the probe interval must be above zero".to_string(),
            ));
        }
        if self.late_timeout_ns / self.interval_ns > MAX_IN_FLIGHT {
            return Err(Error::Config(format!(
                "--timeout {:?} at this rate keeps over {MAX_IN_FLIGHT} probes in flight: lower the timeout or the rate",
                Duration::from_nanos(self.late_timeout_ns)
            )));
        }
        Ok(())
    }

    /// Scheduled probes: the smaller of --count and --duration / interval; `None` runs until
    /// stopped.
    fn slots(&self) -> Option<u64> {
        let by_time = self
            .duration_ns
            .map(|d| d.div_ceil(self.interval_ns).max(1));
        match (self.count, by_time) {
            (Some(c), Some(t)) => Some(c.min(t)),
            (c, t) => c.or(t),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum TxEvent {
    Sent(Sent),
    Failed(u32),
    Missed { scheduled_ns: u64, count: u64 },
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum RxEvent {
    TxStamp { id: u32, mono_ns: u64, wall_ns: u64 },
    Reply(Reply),
}

/// State shared by the three threads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) stop_tx: AtomicBool,
    pub(crate) sender_done: AtomicBool,
    pub(crate) stop_rx: AtomicBool,
    pub(crate) tx_drops: CachePadded<AtomicU64>,
    pub(crate) rx_drops: CachePadded<AtomicU64>,
    pub(crate) malformed: CachePadded<AtomicU64>,
    pub(crate) unreachable: AtomicBool,
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}

/// Opens and pins the probing socket; returns it with its timestamping sources.
/// Pins `sock` to a path: an interface (`SO_BINDTODEVICE`), a firewall mark (`SO_MARK`)
/// and a local address (`bind`, or the unspecified address of `target`'s family).
pub fn pin(
    sock: &Socket,
    target: SocketAddr,
    bind: Option<SocketAddr>,
    interface: Option<&str>,
    fwmark: Option<u32>,
) -> Result<()> {
    let v6 = target.is_ipv6();
    if let Some(name) = interface {
        sock.bind_device(Some(name.as_bytes())).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => Error::Config(format!(
                "--interface {name} needs CAP_NET_RAW (run as root), or pin the path with --bind instead"
            )),
            _ => Error::Io {
                what: format!("bind to interface {name}"),
                source: e,
            },
        })?;
    }
    if let Some(mark) = fwmark {
        sock.set_mark(mark).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => {
                Error::Config(format!("--fwmark {mark} needs CAP_NET_ADMIN (run as root)"))
            }
            _ => Error::Io {
                what: format!("set fwmark {mark}"),
                source: e,
            },
        })?;
    }
    let local = bind.unwrap_or_else(|| {
        if v6 {
            "[::]:0".parse().unwrap_or(target)
        } else {
            "0.0.0.0:0".parse().unwrap_or(target)
        }
    });
    sock.bind(&local.into())
        .map_err(io_err(&format!("bind {local} (--bind)")))?;
    Ok(())
}

fn open(cfg: &ProbeConfig) -> Result<(Socket, Timestamping)> {
    let v6 = cfg.target.is_ipv6();
    let sock = Socket::new(
        Domain::for_address(cfg.target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(io_err("create a UDP socket"))?;
    pin(
        &sock,
        cfg.target,
        cfg.bind,
        cfg.interface.as_deref(),
        cfg.fwmark,
    )?;
    let tos = u32::from(cfg.dscp) << 2;
    if v6 {
        sock.set_tclass_v6(tos)
            .map_err(io_err("set the traffic class"))?;
        if let Some(ttl) = cfg.ttl {
            sock.set_unicast_hops_v6(u32::from(ttl))
                .map_err(io_err("set the hop limit"))?;
        }
    } else {
        sock.set_tos_v4(tos).map_err(io_err("set the TOS"))?;
        if let Some(ttl) = cfg.ttl {
            sock.set_ttl_v4(u32::from(ttl))
                .map_err(io_err("set the TTL"))?;
        }
    }
    if !cfg.route_each_probe {
        sock.connect(&cfg.target.into())
            .map_err(io_err(&format!("reach {}", cfg.target)))?;
    }
    let _ = sock.set_recv_buffer_size(8 << 20);
    let _ = sock.set_send_buffer_size(8 << 20);
    sys::enable_rx_metadata(&sock, v6).map_err(io_err("ask for TTL and TOS"))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(io_err("set a receive timeout"))?;
    let (rx, tx) = sys::enable_timestamping(&sock, true);
    Ok((sock, Timestamping { rx, tx }))
}

/// Writes probe `seq` with T1 into `buf` (exactly `cfg.size` octets): base packet, a
/// Class-of-Service TLV asking for our DSCP back (when it fits with nothing or a whole TLV
/// after it), one Extra Padding TLV for the rest (zero fill when fewer than 4 octets
/// remain), HMAC.
fn build_probe(cfg: &ProbeConfig, buf: &mut [u8], seq: u32, t1: u64, ee: ErrorEstimate) {
    let mode = cfg.mode();
    let mut p = SenderPacket::new_unchecked(&mut buf[..cfg.size], mode);
    SenderRepr {
        sequence_number: seq,
        timestamp: t1,
        error_estimate: ee,
        ssid: cfg.ssid,
    }
    .emit(&mut p);
    let area = p.tlvs_mut();
    area.fill(0);
    let len = area.len();
    let mut w = TlvWriter::new(area);
    // The writes cannot fail: each fits in what is left of the area.
    if len == COS_TLV_LEN || len >= COS_TLV_LEN + HEADER_LEN {
        let _ = w.class_of_service(ClassOfService {
            dscp1: cfg.dscp,
            ..ClassOfService::default()
        });
    }
    let rest = len - w.len();
    if rest >= HEADER_LEN {
        let _ = w.extra_padding(rest);
    }
    if let Some(k) = &cfg.key {
        p.sign(k);
    }
}

/// Records `missed` slots skipped at `now`, if any.
pub(crate) fn push_missed(q: &ArrayQueue<TxEvent>, now: u64, missed: u64, shared: &Shared) {
    if missed > 0 {
        push(
            q,
            TxEvent::Missed {
                scheduled_ns: now,
                count: missed,
            },
            &shared.tx_drops,
        );
    }
}

pub(crate) fn push<T>(q: &ArrayQueue<T>, v: T, drops: &AtomicU64) {
    if q.push(v).is_err() {
        drops.fetch_add(1, Ordering::Relaxed);
    }
}

/// The isochronous schedule every protocol's sender keeps: absolute deadlines, a sleep to
/// just before each (the margin follows how late this machine's sleeps end), then a spin.
/// A slot reached later than half the late timeout is skipped and counted: its probe could
/// be decided lost before its answer had time to come back. Any less late and it is sent,
/// its lateness showing in the RTT from the schedule.
pub(crate) struct Schedule {
    start_ns: u64,
    interval_ns: u64,
    slots: Option<u64>,
    slot: u64,
    miss_after: u64,
    /// Smoothed oversleep (ns, exponential average over about 8 sleeps).
    oversleep: u64,
}

impl Schedule {
    pub(crate) fn new(cfg: &ProbeConfig, start_ns: u64) -> Self {
        let _ = sys::lower_timer_slack();
        Self {
            start_ns,
            interval_ns: cfg.interval_ns,
            slots: cfg.slots(),
            slot: 0,
            miss_after: cfg.late_timeout_ns / 2,
            oversleep: 50_000,
        }
    }

    fn over(&self) -> bool {
        self.slots.is_some_and(|n| self.slot >= n)
    }

    /// Sleeps until the next slot is due; its time now, or `None` when the schedule is over
    /// or `stop` is set. Wakes at least every 100 ms to look at `stop`.
    pub(crate) fn wait(&mut self, stop: &AtomicBool) -> Option<u64> {
        if self.over() || stop.load(Ordering::Relaxed) {
            return None;
        }
        let deadline = self.start_ns + self.slot * self.interval_ns;
        let margin = (2 * self.oversleep + SPIN_MIN_NS).clamp(SPIN_MIN_NS, SPIN_MAX_NS);
        loop {
            let now = sys::monotonic_ns();
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            if now + margin >= deadline {
                break;
            }
            let wake = (deadline - margin).min(now + 100_000_000);
            sys::sleep_until(wake);
            let late = sys::monotonic_ns().saturating_sub(wake);
            self.oversleep = (self.oversleep * 7 + late) / 8;
        }
        while sys::monotonic_ns() < deadline {
            std::hint::spin_loop();
        }
        Some(sys::monotonic_ns())
    }

    /// The slots due at `now`, at most `max`: their scheduled times go into `due`; returns
    /// how many were skipped as too late.
    pub(crate) fn take_due(&mut self, now: u64, max: usize, due: &mut Vec<u64>) -> u64 {
        due.clear();
        let mut missed = 0;
        while !self.over() && due.len() < max {
            let scheduled = self.start_ns + self.slot * self.interval_ns;
            if scheduled > now {
                break;
            }
            self.slot += 1;
            if now - scheduled > self.miss_after {
                missed += 1;
            } else {
                due.push(scheduled);
            }
        }
        missed
    }
}

fn sender(
    sock: &Socket,
    cfg: &ProbeConfig,
    start_ns: u64,
    ee: ErrorEstimate,
    q: &ArrayQueue<TxEvent>,
    shared: &Shared,
) {
    let stop = &shared.stop_tx;
    let mut schedule = Schedule::new(cfg, start_ns);
    let mut batch = SendBatch::new(BATCH);
    let mut due: Vec<u64> = Vec::with_capacity(BATCH);
    let mut pending: Vec<(u32, u64)> = Vec::with_capacity(BATCH);
    let (mut seq, mut tx_id) = (0u32, 0u32);
    // An unconnected socket names the target in every datagram.
    let to = cfg.route_each_probe.then_some(cfg.target);
    while let Some(now) = schedule.wait(stop) {
        let t1_wall = sys::realtime_ns();
        let t1 = TimestampFormat::Ntp.encode(t1_wall).unwrap_or_default();
        pending.clear();
        let missed = schedule.take_due(now, BATCH, &mut due);
        for &scheduled in &due {
            if let Some(buf) = batch.next_slot() {
                build_probe(cfg, buf, seq, t1, ee);
                batch.commit(cfg.size, to, None);
                push(
                    q,
                    TxEvent::Sent(Sent {
                        seq,
                        scheduled_ns: scheduled,
                        sent_ns: now,
                        t1_wall_ns: t1_wall,
                        tx_id,
                        bytes: u32::try_from(cfg.size).unwrap_or(u32::MAX),
                    }),
                    &shared.tx_drops,
                );
                pending.push((seq, scheduled));
                seq = seq.wrapping_add(1);
                tx_id = tx_id.wrapping_add(1);
            }
        }
        push_missed(q, now, missed, shared);
        let queued = batch.len();
        let sent = match batch.send(sock) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    shared.unreachable.store(true, Ordering::Relaxed);
                }
                0
            }
        };
        // The kernel took the first `sent`; give back the numbers of the rest, last first.
        for &(s, _) in pending[sent..queued].iter().rev() {
            push(q, TxEvent::Failed(s), &shared.tx_drops);
            seq = seq.wrapping_sub(1);
            tx_id = tx_id.wrapping_sub(1);
        }
    }
    shared.sender_done.store(true, Ordering::Release);
}

/// An address with an IPv4-mapped IPv6 address written as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map_or(a, |ip| SocketAddr::new(ip.into(), v6.port())),
        SocketAddr::V4(_) => a,
    }
}

/// DSCP2 of a reply's Class-of-Service TLV: the DSCP the far end received. Not from a TLV
/// the reflector flagged as unrecognized or malformed (it echoes those unchanged).
fn far_dscp(tlvs: &[u8]) -> Option<u8> {
    TlvIter::new(tlvs)
        .map_while(std::result::Result::ok)
        .find(|t| t.tlv_type == tlv_type::CLASS_OF_SERVICE)
        .filter(|t| !t.unrecognized() && !t.malformed())
        .and_then(|t| ClassOfService::parse(t.value).ok())
        .map(|c| c.dscp2)
}

/// `only_from`: on an unconnected socket, the target; a datagram from anywhere else is not
/// an answer (a connected socket has the kernel drop those).
fn receiver(
    sock: &Socket,
    (mode, key, only_from): (Mode, Option<&AuthKey>, Option<SocketAddr>),
    ring: &ArrayQueue<RxEvent>,
    shared: &Shared,
) {
    let mut batch = RecvBatch::new(BATCH);
    while !shared.stop_rx.load(Ordering::Relaxed) {
        let result = batch.recv(sock);
        let mono = sys::monotonic_ns();
        let wall = sys::realtime_ns();
        // Kernel stamps are CLOCK_REALTIME; this offset, read right after the call, turns
        // them into monotonic time without a clock step in between.
        let offset = i128::from(wall) - i128::from(mono);
        let to_mono = |w: u64| u64::try_from(i128::from(w) - offset).unwrap_or(mono);
        // Transmit stamps first: they precede the replies to the probes they time.
        sys::drain_tx_timestamps(sock, |id, ns| {
            push(
                ring,
                RxEvent::TxStamp {
                    id,
                    mono_ns: to_mono(ns),
                    wall_ns: ns,
                },
                &shared.rx_drops,
            );
        });
        let got = match result {
            Ok(got) => got,
            Err(e) => {
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    shared.unreachable.store(true, Ordering::Relaxed);
                }
                continue;
            }
        };
        for i in 0..got {
            let Some((payload, meta)) = batch.get(i) else {
                break;
            };
            let ours = only_from.is_none_or(|t| meta.src.map(canonical) == Some(canonical(t)));
            let parsed = ReflectorPacket::new_checked(payload, mode)
                .ok()
                .filter(|p| ours && !meta.truncated && key.is_none_or(|k| p.verify(k).is_ok()));
            let Some(packet) = parsed else {
                shared.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let r = ReflectorRepr::parse(&packet);
            let f = r.error_estimate.format;
            let (Ok(t2), Ok(t3)) = (f.decode(r.receive_timestamp), f.decode(r.timestamp)) else {
                shared.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (rx_ns, rx_wall_ns) = match meta.kernel_rx_ns {
                Some(k) => (to_mono(k), k),
                None => (mono, wall),
            };
            let marks = Marks {
                // 0: a reflector that does not fill in the Session-Sender TTL.
                far_ttl: Some(r.sender_ttl).filter(|&t| t > 0),
                far_dscp: far_dscp(packet.tlvs()),
                back_ttl: meta.ttl,
                back_dscp: meta.tos.map(|t| t >> 2),
            };
            let reflector_sync = if r.error_estimate.synchronized {
                r.error_estimate.error_nanos()
            } else {
                None
            };
            push(
                ring,
                RxEvent::Reply(Reply {
                    seq: r.sender_sequence_number,
                    rx_ns,
                    rx_wall_ns,
                    t2_wall_ns: t2,
                    t3_wall_ns: t3,
                    reflector_sync,
                    bytes: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                    far_times: true,
                    refused: false,
                    marks,
                }),
                &shared.rx_drops,
            );
        }
    }
}

/// Where a probe session's results go, on the aggregator's thread: every closed window,
/// and (for a sink that wants them) every probe as it is decided. Keep both quick: the
/// aggregator drains the I/O threads' rings between calls.
pub trait Sink {
    /// A window closed.
    fn window(&mut self, w: &WindowStats);
    /// Probes decided since the last call, in sequence order.
    fn probes(&mut self, _decided: &[Decided]) {}
    /// Whether to follow probes one by one (costs a record per probe).
    fn wants_probes(&self) -> bool {
        false
    }
    /// The sink has what it came for: the session stops as if `stop` were set (without
    /// touching the caller's flag).
    fn finished(&self) -> bool {
        false
    }
    /// Whether the session returns its windows when it ends (for a summary). A session
    /// that runs for good (the daemon's) must not: each window holds its histograms, about
    /// 1 MiB, and they would pile up for as long as it runs.
    fn keeps_windows(&self) -> bool {
        true
    }
}

impl<F: FnMut(&WindowStats)> Sink for F {
    fn window(&mut self, w: &WindowStats) {
        self(w);
    }
}

/// What a probe session sends with.
#[derive(Debug)]
enum Io {
    Stamp(Socket),
    TcpSyn(crate::tcp::SynSocket),
    /// A socket per probe, opened as it goes.
    TcpConnect,
}

/// An opened, pinned probing socket, ready to run.
#[derive(Debug)]
pub struct Prober {
    cfg: ProbeConfig,
    io: Io,
    /// Where receive and transmit timestamps come from.
    pub timestamping: Timestamping,
    /// The local address probes leave from.
    pub local: SocketAddr,
    /// The TTL (hop limit) probes leave with, when their answers can tell the hops from it.
    pub sent_ttl: Option<u8>,
}

impl Prober {
    /// Checks `cfg` and opens its socket.
    pub fn open(cfg: ProbeConfig) -> Result<Self> {
        cfg.validate()?;
        let (io, timestamping, local) = match cfg.protocol {
            ProbeProtocol::Stamp => {
                let (sock, timestamping) = open(&cfg)?;
                let local = sock
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .unwrap_or(cfg.target);
                (Io::Stamp(sock), timestamping, local)
            }
            ProbeProtocol::TcpSyn => {
                let (syn, timestamping) = crate::tcp::SynSocket::open(&cfg)?;
                let local = SocketAddr::V4(syn.local);
                (Io::TcpSyn(syn), timestamping, local)
            }
            ProbeProtocol::TcpConnect => (
                Io::TcpConnect,
                // The RTT is the kernel's own measurement of the handshake (TCP_INFO).
                Timestamping {
                    rx: TimestampSource::Kernel,
                    tx: TimestampSource::Kernel,
                },
                crate::tcp::connect_local(&cfg),
            ),
        };
        // The kernel reports its default (net.ipv4.ip_default_ttl) for a socket with none set.
        let sent_ttl = match &io {
            Io::Stamp(sock) if cfg.target.is_ipv6() => sock.unicast_hops_v6().ok(),
            Io::Stamp(sock) => sock.ttl_v4().ok(),
            Io::TcpSyn(syn) => syn.ttl().map(u32::from),
            Io::TcpConnect => None,
        }
        .and_then(|t| u8::try_from(t).ok());
        Ok(Self {
            cfg,
            io,
            timestamping,
            local,
            sent_ttl,
        })
    }

    /// The settings it runs with.
    pub const fn config(&self) -> &ProbeConfig {
        &self.cfg
    }

    /// Octets of one probe as sent: the STAMP payload, our SYN, or 0 for a kernel-built
    /// SYN (`tcp-connect`).
    pub fn packet_size(&self) -> u16 {
        match self.io {
            Io::Stamp(_) => u16::try_from(self.cfg.size).unwrap_or(u16::MAX),
            Io::TcpSyn(_) => u16::try_from(crate::tcp::SYN_LEN).unwrap_or(0),
            Io::TcpConnect => 0,
        }
    }

    /// Probes until the count or duration is reached or `stop` is set, calling `on_window`
    /// as each window closes; returns every window, oldest first.
    pub fn run(
        &self,
        stop: &AtomicBool,
        mut on_window: impl FnMut(&WindowStats),
    ) -> Result<Vec<WindowStats>> {
        self.run_into(stop, &mut on_window)
    }

    /// Like [`Self::run`], with every result going to `sink`.
    pub fn run_into(&self, stop: &AtomicBool, sink: &mut dyn Sink) -> Result<Vec<WindowStats>> {
        match &self.io {
            Io::Stamp(sock) => run(&self.cfg, sock, stop, sink),
            Io::TcpSyn(syn) => syn.run(&self.cfg, stop, sink),
            Io::TcpConnect => crate::tcp::run_connect(&self.cfg, stop, sink),
        }
    }
}

/// Runs a probe session of any protocol: `sender` (on its own thread) keeps the schedule
/// from `start_ns` and pushes what it sent; `receiver` (on another) pushes the answers;
/// the caller's thread feeds the tracker and closes windows.
pub(crate) fn run_engine(
    cfg: &ProbeConfig,
    stop: &AtomicBool,
    local_sync: Option<u64>,
    sink: &mut dyn Sink,
    sender: impl FnOnce(u64, &ArrayQueue<TxEvent>, &Shared) + Send,
    receiver: impl FnOnce(&ArrayQueue<RxEvent>, &Shared) + Send,
) -> Result<Vec<WindowStats>> {
    let tx_q = ArrayQueue::new(RING);
    let rx_q = ArrayQueue::new(RING);
    let shared = Shared::default();
    let mut windows = Vec::new();
    // The schedule starts once everything is allocated, 2 ms ahead for the threads to start.
    let start_ns = sys::monotonic_ns() + 2_000_000;
    let start_wall = sys::realtime_ns() + 2_000_000;
    let mut tracker = Tracker::new(TrackerConfig {
        interval_ns: cfg.interval_ns,
        late_timeout_ns: cfg.late_timeout_ns,
        window_ns: cfg.window_ns,
        start_mono_ns: start_ns,
        start_wall_ns: start_wall,
        local_sync,
    });
    if sink.wants_probes() {
        tracker.keep_decisions();
    }
    let result = thread::scope(|s| {
        let tx = s.spawn(|| sender(start_ns, &tx_q, &shared));
        let rx = s.spawn(|| receiver(&rx_q, &shared));
        let outcome = aggregate(
            cfg,
            stop,
            &mut tracker,
            (&tx_q, &rx_q, &shared),
            sink,
            &mut windows,
        );
        shared.stop_tx.store(true, Ordering::Relaxed);
        shared.stop_rx.store(true, Ordering::Relaxed);
        let _ = tx.join();
        let _ = rx.join();
        outcome
    });
    result?;
    tracker.finish(sys::realtime_ns());
    let decided = tracker.take_decisions();
    if !decided.is_empty() {
        sink.probes(&decided);
    }
    for w in tracker.take_closed() {
        sink.window(&w);
        if sink.keeps_windows() {
            windows.push(w);
        }
    }
    Ok(windows)
}

fn run(
    cfg: &ProbeConfig,
    sock: &Socket,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
) -> Result<Vec<WindowStats>> {
    let sync = sys::clock_sync().ok();
    let local_sync = sync.filter(|s| s.synchronized).map(|s| s.max_error_ns);
    let ee = ErrorEstimate::from_error_nanos(
        local_sync.is_some(),
        TimestampFormat::Ntp,
        sync.map_or(1_000_000_000, |s| s.max_error_ns.max(1)),
    );
    run_engine(
        cfg,
        stop,
        local_sync,
        sink,
        |start_ns, q, shared| sender(sock, cfg, start_ns, ee, q, shared),
        |q, shared| {
            let only_from = cfg.route_each_probe.then_some(cfg.target);
            receiver(sock, (cfg.mode(), cfg.key.as_ref(), only_from), q, shared);
        },
    )
}

/// The caller's thread: feeds the tracker from the rings until the run is over.
fn aggregate(
    cfg: &ProbeConfig,
    stop: &AtomicBool,
    tracker: &mut Tracker,
    (tx_q, rx_q, shared): (&ArrayQueue<TxEvent>, &ArrayQueue<RxEvent>, &Shared),
    sink: &mut dyn Sink,
    windows: &mut Vec<WindowStats>,
) -> Result<()> {
    let mut first_sent: Option<u64> = None;
    let mut last_scheduled = 0;
    let mut answered = false;
    // Reused across iterations: at most one ring's worth.
    let mut replies: Vec<RxEvent> = Vec::with_capacity(RING);
    loop {
        // Take the receiver's records first, then all of the sender's: a reply (or transmit
        // stamp) exists only after its probe's Sent record was pushed, so once the sender's
        // ring is drained every reply taken here meets its probe in the tracker.
        replies.clear();
        while replies.len() < RING {
            let Some(ev) = rx_q.pop() else { break };
            replies.push(ev);
        }
        while let Some(ev) = tx_q.pop() {
            match ev {
                TxEvent::Sent(s) => {
                    first_sent.get_or_insert(s.sent_ns);
                    last_scheduled = s.scheduled_ns;
                    tracker.on_sent(s);
                }
                TxEvent::Failed(seq) => tracker.on_send_failed(seq),
                TxEvent::Missed {
                    scheduled_ns,
                    count,
                } => tracker.on_slots_missed(scheduled_ns, count),
            }
        }
        for ev in &replies {
            match *ev {
                RxEvent::TxStamp {
                    id,
                    mono_ns,
                    wall_ns,
                } => {
                    tracker.on_tx_stamp(id, mono_ns, wall_ns);
                }
                RxEvent::Reply(r) => {
                    answered = true;
                    tracker.on_reply(&r);
                }
            }
        }
        let now = sys::monotonic_ns();
        let drops =
            shared.tx_drops.swap(0, Ordering::Relaxed) + shared.rx_drops.swap(0, Ordering::Relaxed);
        let malformed = shared.malformed.swap(0, Ordering::Relaxed);
        if drops + malformed > 0 {
            tracker.on_dropped(now, drops, malformed);
        }
        tracker.poll(now);
        let decided = tracker.take_decisions();
        if !decided.is_empty() {
            sink.probes(&decided);
        }
        // A session that never gives up (the daemon's) counts "port unreachable" and goes
        // on: the reflector may start later, and its probes count as lost meanwhile.
        let never_give_up = cfg.no_reply_ns == u64::MAX;
        for w in tracker.take_closed() {
            if never_give_up && shared.unreachable.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    target = %cfg.target,
                    lost = w.counters.lost,
                    "the target answered \"port unreachable\" this window: nothing listens there yet; probing goes on"
                );
            }
            sink.window(&w);
            if sink.keeps_windows() {
                windows.push(w);
            }
        }
        if !answered && !never_give_up {
            if shared.unreachable.load(Ordering::Relaxed) {
                return Err(Error::Unreachable { target: cfg.target });
            }
            if let Some(first) = first_sent
                && now.saturating_sub(first) >= cfg.no_reply_ns
            {
                return Err(Error::NoReply {
                    target: cfg.target,
                    after: Duration::from_nanos(cfg.no_reply_ns),
                });
            }
        }
        if stop.load(Ordering::Relaxed) || sink.finished() {
            shared.stop_tx.store(true, Ordering::Relaxed);
        }
        let sending_over = shared.sender_done.load(Ordering::Acquire);
        if sending_over
            && tx_q.is_empty()
            && now >= last_scheduled.saturating_add(cfg.late_timeout_ns)
        {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(1));
    }
}
