//! TCP probes, for paths that pass only TCP to a few ports: probe kinds on the same
//! [`crate::engine`] as STAMP (schedule, rings, tracker, windows and reports).
//!
//! - **`tcp-syn`**: a half-open handshake from a raw socket (CAP_NET_RAW). Each probe is a
//!   SYN whose initial sequence number says which probe it is; the SYN-ACK (or RST) is
//!   matched by its acknowledgement number and timed by the kernel's receive stamp. A
//!   SYN-ACK is answered at once with our RST, so the far end keeps no half-open
//!   connection. Source ports are reserved by bound (never listening) TCP sockets, so no
//!   local program can take the same 4-tuple; since no socket owns our connection, the
//!   kernel also answers the SYN-ACK with an RST of its own. Both RSTs close the far end's
//!   half-open entry; neither touches the measurement, which is taken from the SYN-ACK's
//!   kernel receive stamp before either leaves. IPv4 only.
//!
//!   A far end resets a half-open connection when a new SYN with another sequence number
//!   arrives on the same 4-tuple (Linux's `tcp_check_req`), so two probes of one source port
//!   must never be in flight together. `--bind ADDR:PORT` pins one source port (one flow,
//!   one ECMP path; keep the rate under 1/RTT); otherwise probes rotate over
//!   [`SOURCE_PORTS`] reserved ports, each used once per that many probes.
//! - **`tcp-connect`**: a full `connect()` per probe, no privileges; the RTT is the one the
//!   kernel measured for the handshake (`TCP_INFO`), so it does not include our wake-up
//!   latency. Each connection is closed with an RST (`SO_LINGER` 0), leaving no TIME-WAIT.
//!
//! An RST answer (nothing listens on the port) counts as received and as `refused`: it
//! crossed the path and times it. No answer within the timeout is loss.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use pathprobe_proto::report::{TimestampSource, Timestamping};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::tcp::{MutableTcpPacket, TcpFlags, TcpOption, TcpPacket, ipv4_checksum};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::ProbeConfig;
use crate::engine::session::{Marks, Reply, Sent, WindowStats};
use crate::engine::{
    self, Io, RxEvent, Schedule, Shared, Sink, SystemClock, TxEvent, push, push_missed,
};
use crate::sys::{self, BatchClock, RecvBatch, SendBatch};
use crate::{Error, Result};

/// Octets of our SYN: the TCP header and an MSS option.
pub const SYN_LEN: usize = 24;
/// Octets of our RST: the bare TCP header.
const RST_LEN: usize = 20;
/// Probes per system call.
const BATCH: usize = 64;
/// Source ports a `tcp-syn` session rotates over when --bind names none.
pub const SOURCE_PORTS: usize = 64;

/// Writes a TCP segment from `src` to `dst` into `buf`: a SYN with an MSS option, or a
/// bare RST; returns its length. `buf` must hold [`SYN_LEN`] octets.
pub fn segment(buf: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, seq: u32, rst: bool) -> usize {
    let len = if rst { RST_LEN } else { SYN_LEN };
    buf[..len].fill(0);
    let Some(mut t) = MutableTcpPacket::new(&mut buf[..len]) else {
        return 0;
    };
    t.set_source(src.port());
    t.set_destination(dst.port());
    t.set_sequence(seq);
    t.set_acknowledgement(0);
    t.set_window(if rst { 0 } else { 64_240 });
    if rst {
        t.set_data_offset(5);
        t.set_flags(TcpFlags::RST);
    } else {
        t.set_data_offset(6);
        t.set_flags(TcpFlags::SYN);
        t.set_options(&[TcpOption::mss(1460)]);
    }
    let sum = ipv4_checksum(&t.to_immutable(), src.ip(), dst.ip());
    t.set_checksum(sum);
    len
}

/// What came back for a SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The port of ours it answers.
    pub port: u16,
    /// The acknowledgement number (our ISN + 1).
    pub ack: u32,
    /// SYN-ACK (someone listens) or RST (no one does).
    pub refused: bool,
    /// The TTL it arrived with (the hops back are below the far end's initial TTL).
    pub ttl: u8,
}

/// Reads an IPv4 packet a raw TCP socket received: an answer from `target` to one of our
/// `ports`, or `None` for anything else.
pub fn parse_answer(ip: &[u8], target: SocketAddrV4, ports: &[u16]) -> Option<Answer> {
    let p = Ipv4Packet::new(ip)?;
    if p.get_version() != 4
        || p.get_next_level_protocol() != IpNextHeaderProtocols::Tcp
        || p.get_source() != *target.ip()
    {
        return None;
    }
    let hl = usize::from(p.get_header_length()) * 4;
    let t = TcpPacket::new(ip.get(hl..)?)?;
    if t.get_source() != target.port() || !ports.contains(&t.get_destination()) {
        return None;
    }
    let f = t.get_flags();
    let syn_ack = f & (TcpFlags::SYN | TcpFlags::ACK) == TcpFlags::SYN | TcpFlags::ACK;
    let rst = f & TcpFlags::RST != 0;
    (syn_ack || rst).then(|| Answer {
        port: t.get_destination(),
        ack: t.get_acknowledgement(),
        refused: rst,
        ttl: p.get_ttl(),
    })
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// The source address the kernel would use towards `target` (a UDP connect, no packet).
fn route_source(target: SocketAddrV4) -> Result<Ipv4Addr> {
    let u =
        UdpSocket::bind("0.0.0.0:0").map_err(io_err("open a socket for a route lookup".into()))?;
    u.connect(target)
        .map_err(io_err(format!("find a route to {target}")))?;
    match u.local_addr() {
        Ok(SocketAddr::V4(a)) => Ok(*a.ip()),
        _ => Err(Error::Config(format!(
            "no IPv4 source address towards {target}"
        ))),
    }
}

/// The raw socket of a `tcp-syn` session and the TCP socket that reserves its port.
#[derive(Debug)]
pub struct SynSocket {
    raw: Socket,
    _reserved: Vec<Socket>,
    target: SocketAddrV4,
    /// Where the SYNs leave from (the first of `ports`).
    pub local: SocketAddrV4,
    /// Probe `n` leaves from `ports[n % ports.len()]`.
    ports: Vec<u16>,
    /// Probe `n`'s ISN is `isn_base + n`.
    isn_base: u32,
}

impl SynSocket {
    /// The TTL our SYNs leave with.
    pub fn ttl(&self) -> Option<u8> {
        self.raw.ttl_v4().ok().and_then(|t| u8::try_from(t).ok())
    }

    /// Opens the raw socket (pinned like `cfg` says) and reserves the source port.
    pub fn open(cfg: &ProbeConfig) -> Result<(Self, Timestamping)> {
        let SocketAddr::V4(target) = cfg.target else {
            return Err(Error::Config(
                "--proto tcp-syn takes an IPv4 target; for IPv6 use --proto tcp-connect"
                    .to_string(),
            ));
        };
        let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                Error::Config(
                    "--proto tcp-syn needs CAP_NET_RAW (run as root, or `setcap cap_net_raw+ep` the binary); without it use --proto tcp-connect".to_string(),
                )
            } else {
                Error::Io {
                    what: "open a raw TCP socket".to_string(),
                    source: e,
                }
            }
        })?;
        let ip = match cfg.bind {
            Some(SocketAddr::V4(b)) if !b.ip().is_unspecified() => *b.ip(),
            Some(SocketAddr::V6(_)) => {
                return Err(Error::Config(
                    "--bind must be IPv4 for an IPv4 target".to_string(),
                ));
            }
            _ => route_source(target)?,
        };
        // Reserve the source ports: the one --bind names, or SOURCE_PORTS the kernel picks.
        let wanted: Vec<u16> = match cfg.bind.map(|b| b.port()) {
            Some(p) if p != 0 => vec![p],
            _ => vec![0; SOURCE_PORTS],
        };
        let mut reserved = Vec::with_capacity(wanted.len());
        let mut ports = Vec::with_capacity(wanted.len());
        for port in wanted {
            let r = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                .map_err(io_err("open a TCP socket".into()))?;
            r.bind(&SocketAddr::from((ip, port)).into())
                .map_err(io_err(format!("reserve TCP port {port} on {ip} (--bind)")))?;
            match r.local_addr().ok().and_then(|a| a.as_socket()) {
                Some(SocketAddr::V4(a)) => ports.push(a.port()),
                _ => {
                    return Err(Error::Config(
                        "a reserved TCP port has no address".to_string(),
                    ));
                }
            }
            reserved.push(r);
        }
        let local = SocketAddrV4::new(ip, ports[0]);
        crate::pin::pin(
            &raw,
            cfg.target,
            Some(SocketAddr::from((ip, 0))),
            cfg.interface.as_deref(),
            cfg.fwmark,
        )?;
        raw.set_tos_v4(u32::from(cfg.dscp) << 2)
            .map_err(io_err("set the TOS".into()))?;
        if let Some(ttl) = cfg.ttl {
            raw.set_ttl_v4(u32::from(ttl))
                .map_err(io_err("set the TTL".into()))?;
        }
        raw.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(io_err("set a receive timeout".into()))?;
        let (rx, _) = sys::enable_timestamping(&raw, false);
        let mut b = [0u8; 4];
        getrandom::fill(&mut b)
            .map_err(|e| Error::Config(format!("no randomness for sequence numbers: {e}")))?;
        Ok((
            Self {
                raw,
                _reserved: reserved,
                target,
                local,
                ports,
                isn_base: u32::from_be_bytes(b),
            },
            Timestamping {
                rx,
                tx: TimestampSource::Userspace,
            },
        ))
    }

    fn port_of(&self, seq: u32) -> u16 {
        self.ports[usize::try_from(seq).unwrap_or(0) % self.ports.len()]
    }

    /// Probes until done or `stop`, like `Prober::run`.
    pub fn run(
        &self,
        cfg: &ProbeConfig,
        stop: &AtomicBool,
        sink: &mut dyn Sink,
    ) -> Result<Vec<WindowStats>> {
        let io = SynIo { syn: self, cfg };
        engine::run(&cfg.timing(), &SystemClock, &io, stop, None, sink)
    }

    fn send(&self, cfg: &ProbeConfig, start_ns: u64, q: &ArrayQueue<TxEvent>, shared: &Shared) {
        let mut schedule = Schedule::new(&cfg.timing(), start_ns);
        let mut batch = SendBatch::new(BATCH);
        let mut due = Vec::with_capacity(BATCH);
        let mut pending = Vec::with_capacity(BATCH);
        let to = SocketAddr::V4(SocketAddrV4::new(*self.target.ip(), 0));
        let mut seq = 0u32;
        while let Some(now) = schedule.wait(&shared.stop_tx) {
            let wall = sys::realtime_ns();
            let missed = schedule.take_due(now, BATCH, &mut due);
            pending.clear();
            for &scheduled in &due {
                let Some(buf) = batch.next_slot() else { break };
                let from = SocketAddrV4::new(*self.local.ip(), self.port_of(seq));
                let len = segment(
                    buf,
                    from,
                    self.target,
                    self.isn_base.wrapping_add(seq),
                    false,
                );
                batch.commit(len, Some(to), None);
                push(
                    q,
                    TxEvent::Sent(Sent {
                        seq,
                        scheduled_ns: scheduled,
                        sent_ns: now,
                        t1_wall_ns: wall,
                        tx_id: seq,
                        bytes: u32::try_from(len).unwrap_or(0),
                    }),
                    &shared.tx_drops,
                );
                pending.push(seq);
                seq = seq.wrapping_add(1);
            }
            push_missed(q, now, missed, shared);
            let queued = batch.len();
            let sent = batch.send(&self.raw).unwrap_or(0);
            for &s in pending[sent.min(queued)..queued].iter().rev() {
                push(q, TxEvent::Failed(s), &shared.tx_drops);
                seq = seq.wrapping_sub(1);
            }
        }
    }

    fn receive(&self, q: &ArrayQueue<RxEvent>, shared: &Shared) {
        let mut batch = RecvBatch::new(BATCH);
        let mut rst = [0u8; SYN_LEN];
        let to: SockAddr = SocketAddr::V4(SocketAddrV4::new(*self.target.ip(), 0)).into();
        while !shared.stop_rx.load(Ordering::Relaxed) {
            let Ok(got) = batch.recv(&self.raw) else {
                continue;
            };
            let clock = BatchClock::now();
            for i in 0..got {
                let Some((ip, meta)) = batch.get(i) else {
                    break;
                };
                let Some(a) = parse_answer(ip, self.target, &self.ports) else {
                    continue;
                };
                let seq = a.ack.wrapping_sub(1).wrapping_sub(self.isn_base);
                if self.port_of(seq) != a.port {
                    // Not the port that probe left from: not an answer to it.
                    shared.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !a.refused {
                    // Close the far end's half-open connection now.
                    let from = SocketAddrV4::new(*self.local.ip(), a.port);
                    let len = segment(&mut rst, from, self.target, a.ack, true);
                    let _ = self.raw.send_to(&rst[..len], &to);
                }
                let (rx_ns, rx_wall_ns) = clock.arrival(meta.kernel_rx_ns);
                push(
                    q,
                    RxEvent::Reply(Reply {
                        seq,
                        rx_ns,
                        rx_wall_ns,
                        t2_wall_ns: 0,
                        t3_wall_ns: 0,
                        reflector_sync: None,
                        bytes: 0,
                        far_times: false,
                        refused: a.refused,
                        // A TCP answer shows only its own TTL: no far-end TTL or DSCP.
                        marks: Marks {
                            back_ttl: Some(a.ttl),
                            ..Marks::default()
                        },
                    }),
                    &shared.rx_drops,
                );
            }
        }
    }
}

/// A `tcp-syn` session's two I/O threads.
struct SynIo<'a> {
    syn: &'a SynSocket,
    cfg: &'a ProbeConfig,
}

impl Io for SynIo<'_> {
    fn send(&self, start_ns: u64, ring: &ArrayQueue<TxEvent>, shared: &Shared) {
        self.syn.send(self.cfg, start_ns, ring, shared);
    }

    fn receive(&self, ring: &ArrayQueue<RxEvent>, shared: &Shared) {
        self.syn.receive(ring, shared);
    }
}

/// A `tcp-connect` session's two I/O threads: the sender hands each connection it started
/// to the receiver, which polls them.
struct ConnectIo<'a> {
    cfg: &'a ProbeConfig,
    handoff: ArrayQueue<InFlight>,
}

impl Io for ConnectIo<'_> {
    fn send(&self, start_ns: u64, ring: &ArrayQueue<TxEvent>, shared: &Shared) {
        connect_sender(self.cfg, start_ns, &self.handoff, ring, shared);
    }

    fn receive(&self, ring: &ArrayQueue<RxEvent>, shared: &Shared) {
        connect_receiver(self.cfg, &self.handoff, ring, shared);
    }
}

/// A connection on its way.
struct InFlight {
    seq: u32,
    sent_ns: u64,
    sock: Socket,
}

/// `tcp-connect`: probes until done or `stop`, like `Prober::run`.
pub fn run_connect(
    cfg: &ProbeConfig,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
) -> Result<Vec<WindowStats>> {
    let io = ConnectIo {
        cfg,
        handoff: ArrayQueue::new(1 << 14),
    };
    engine::run(&cfg.timing(), &SystemClock, &io, stop, None, sink)
}

/// A non-blocking TCP socket, pinned, connecting to the target.
fn start_connect(cfg: &ProbeConfig) -> Result<Socket> {
    let io = |what: &'static str| {
        move |source| Error::Io {
            what: what.to_string(),
            source,
        }
    };
    let sock = Socket::new(
        Domain::for_address(cfg.target),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(io("open a TCP socket"))?;
    sock.set_nonblocking(true)
        .map_err(io("make a socket non-blocking"))?;
    sock.set_linger(Some(Duration::ZERO))
        .map_err(io("set SO_LINGER"))?;
    // --bind pins the address; each probe takes a port of its own.
    let bind = cfg.bind.map(|b| SocketAddr::new(b.ip(), 0));
    crate::pin::pin(
        &sock,
        cfg.target,
        bind,
        cfg.interface.as_deref(),
        cfg.fwmark,
    )?;
    let tos = u32::from(cfg.dscp) << 2;
    if cfg.target.is_ipv6() {
        sock.set_tclass_v6(tos)
            .map_err(io("set the traffic class"))?;
    } else {
        sock.set_tos_v4(tos).map_err(io("set the TOS"))?;
    }
    match sock.connect(&cfg.target.into()) {
        Ok(()) => Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(sock),
        Err(e) => Err(io("start a TCP connection")(e)),
    }
}

fn connect_sender(
    cfg: &ProbeConfig,
    start_ns: u64,
    handoff: &ArrayQueue<InFlight>,
    q: &ArrayQueue<TxEvent>,
    shared: &Shared,
) {
    let mut schedule = Schedule::new(&cfg.timing(), start_ns);
    let mut due = Vec::with_capacity(BATCH);
    let mut seq = 0u32;
    while let Some(now) = schedule.wait(&shared.stop_tx) {
        let wall = sys::realtime_ns();
        let missed = schedule.take_due(now, BATCH, &mut due);
        for &scheduled in &due {
            let sent_ns = sys::monotonic_ns();
            let Ok(sock) = start_connect(cfg) else {
                // No socket (out of descriptors, an unusable --bind): not sent.
                push(
                    q,
                    TxEvent::Missed {
                        scheduled_ns: scheduled,
                        count: 1,
                    },
                    &shared.tx_drops,
                );
                continue;
            };
            push(
                q,
                TxEvent::Sent(Sent {
                    seq,
                    scheduled_ns: scheduled,
                    sent_ns,
                    t1_wall_ns: wall,
                    tx_id: seq,
                    bytes: 0,
                }),
                &shared.tx_drops,
            );
            if handoff.push(InFlight { seq, sent_ns, sock }).is_err() {
                shared.tx_drops.fetch_add(1, Ordering::Relaxed);
            }
            seq = seq.wrapping_add(1);
        }
        push_missed(q, now, missed, shared);
    }
}

fn connect_receiver(
    cfg: &ProbeConfig,
    handoff: &ArrayQueue<InFlight>,
    q: &ArrayQueue<RxEvent>,
    shared: &Shared,
) {
    let mut flying: Vec<InFlight> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    // Past the late timeout the tracker has decided the probe lost; give up on it too.
    let give_up = cfg.late_timeout_ns.saturating_add(100_000_000);
    while !shared.stop_rx.load(Ordering::Relaxed) {
        while let Some(f) = handoff.pop() {
            flying.push(f);
        }
        if flying.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        fds.clear();
        fds.extend(flying.iter().map(|f| libc::pollfd {
            fd: f.sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }));
        if sys::poll_many(&mut fds, 1).is_err() {
            continue;
        }
        let now = sys::monotonic_ns();
        let wall = sys::realtime_ns();
        let mut k = 0;
        flying.retain(|f| {
            let ready = fds[k].revents != 0;
            k += 1;
            if !ready {
                // Still connecting, or forgotten.
                return now.saturating_sub(f.sent_ns) < give_up;
            }
            let answer = match f.sock.take_error() {
                Ok(None) => Some((false, sys::tcp_rtt_us(&f.sock))),
                Ok(Some(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Some((true, None)),
                // Unreachable and the like: no answer from the far end; the tracker will
                // call it lost.
                _ => None,
            };
            if let Some((refused, kernel_rtt_us)) = answer {
                // The kernel's own handshake RTT when it has one; else our observation.
                let rx_ns = kernel_rtt_us.map_or(now, |us| f.sent_ns + u64::from(us) * 1000);
                push(
                    q,
                    RxEvent::Reply(Reply {
                        seq: f.seq,
                        rx_ns,
                        rx_wall_ns: wall,
                        t2_wall_ns: 0,
                        t3_wall_ns: 0,
                        reflector_sync: None,
                        bytes: 0,
                        far_times: false,
                        refused,
                        // The kernel's connection shows no TTL or DSCP.
                        marks: Marks::default(),
                    }),
                    &shared.rx_drops,
                );
            }
            false
        });
    }
}

/// The local address a `tcp-connect` session leaves from, for its reports.
pub fn connect_local(cfg: &ProbeConfig) -> SocketAddr {
    cfg.bind.unwrap_or_else(|| match cfg.target.ip() {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// An IPv4 header in front of `tcp`, from `src` to `dst`.
    fn ip(src: Ipv4Addr, dst: Ipv4Addr, tcp: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 20];
        v[0] = 0x45;
        v[2..4].copy_from_slice(&u16::try_from(20 + tcp.len()).unwrap().to_be_bytes());
        v[8] = 64;
        v[9] = 6;
        v[12..16].copy_from_slice(&src.octets());
        v[16..20].copy_from_slice(&dst.octets());
        v.extend_from_slice(tcp);
        v
    }

    #[test]
    fn syn_has_mss_and_a_valid_checksum() {
        let (src, dst) = (addr("10.0.0.1:40000"), addr("10.1.0.1:443"));
        let mut buf = [0u8; SYN_LEN];
        assert_eq!(segment(&mut buf, src, dst, 0xdead_beef, false), SYN_LEN);
        let t = TcpPacket::new(&buf).unwrap();
        assert_eq!((t.get_source(), t.get_destination()), (40000, 443));
        assert_eq!(t.get_sequence(), 0xdead_beef);
        assert_eq!(t.get_flags(), TcpFlags::SYN);
        assert_eq!(t.get_data_offset(), 6);
        assert_eq!(&buf[20..24], &[2, 4, 0x05, 0xb4], "MSS 1460");
        assert_eq!(t.get_checksum(), ipv4_checksum(&t, src.ip(), dst.ip()));
        // One's complement: summing the whole segment with its pseudo-header gives 0xffff.
        let mut sum: u32 = 0;
        for w in src
            .ip()
            .octets()
            .chunks(2)
            .chain(dst.ip().octets().chunks(2))
            .chain(buf.chunks(2))
        {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        sum += 6 + u32::try_from(SYN_LEN).unwrap();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
        let mut rst = [0u8; SYN_LEN];
        assert_eq!(segment(&mut rst, src, dst, 7, true), RST_LEN);
        let r = TcpPacket::new(&rst[..RST_LEN]).unwrap();
        assert_eq!((r.get_flags(), r.get_sequence()), (TcpFlags::RST, 7));
    }

    #[test]
    fn answers_are_matched_to_our_flow_only() {
        let target = addr("10.1.0.1:443");
        let local = addr("10.0.0.1:40000");
        let answer = |flags: u8, from: SocketAddrV4, to_port: u16| {
            let mut t = [0u8; 20];
            let mut p = MutableTcpPacket::new(&mut t).unwrap();
            p.set_source(from.port());
            p.set_destination(to_port);
            p.set_acknowledgement(1001);
            p.set_data_offset(5);
            p.set_flags(flags);
            ip(*from.ip(), *local.ip(), &t)
        };
        let syn_ack = TcpFlags::SYN | TcpFlags::ACK;
        let ours = [40000, 40002];
        let a = |flags, from, port| parse_answer(&answer(flags, from, port), target, &ours);
        assert_eq!(
            a(syn_ack, target, 40002),
            Some(Answer {
                port: 40002,
                ack: 1001,
                refused: false,
                ttl: 64,
            })
        );
        assert_eq!(
            a(TcpFlags::RST | TcpFlags::ACK, target, 40000),
            Some(Answer {
                port: 40000,
                ack: 1001,
                refused: true,
                ttl: 64,
            })
        );
        // Another port of ours, another port or host of theirs, a bare ACK: not ours.
        assert_eq!(a(syn_ack, target, 40001), None);
        assert_eq!(a(syn_ack, addr("10.1.0.1:80"), 40000), None);
        assert_eq!(a(syn_ack, addr("10.1.0.2:443"), 40000), None);
        assert_eq!(a(TcpFlags::ACK, target, 40000), None);
        // Cut short anywhere: nothing, never a panic.
        let whole = answer(syn_ack, target, 40000);
        for n in 0..whole.len() {
            assert_eq!(parse_answer(&whole[..n], target, &ours), None, "cut at {n}");
        }
    }
}
