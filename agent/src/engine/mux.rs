//! The multiplexed engine: every path of an agent (STAMP, `tcp-syn`, `tcp-connect`), from
//! one to thousands, on a fixed set of threads whose number does not grow with the paths.
//!
//! ```text
//!             Timetable (every path's deadlines)
//! sender thread --sendmmsg per socket--> [socket per pinning] ==UDP==> reflectors
//!   | TxRec (Sent / Failed / Missed / Over), by path       ||
//!   v                                                      ||
//! ArrayQueue --+               receiver thread <--poll + recvmmsg--+ (replies by source
//!              |                 | RxRec (TxStamp / Reply / ...)     address and SSID)
//!              v                 v
//!   aggregator: a Tracker and a Sink per path, polled when an event or a deadline of
//!   its own comes; windows and decisions to each path's sink
//! ```
//!
//! Paths that share a pinning (family, `--bind`, `--interface`, `--fwmark`) share one
//! unconnected socket; DSCP and TTL are set per datagram (`IP_TOS`/`IP_TTL` ancillary
//! data), every probe is routed afresh, and replies are told apart by the far end's address
//! and, where one far end answers several paths of a socket, by SSID. Two paths that would
//! be indistinguishable (same socket, far end and SSID) get sockets of their own. Each
//! path keeps every property of a session of its own: the kernel's receive and transmit
//! stamps, the scheduled and the actual send time, exact accounting (a full ring counted
//! against the path whose record it was), and nothing allocated on the I/O threads.
//!
//! A path is added and removed while the others run ([`Engine::add`],
//! [`Engine::stop_path`]); a removed path's probes in flight are waited for (the late
//! timeout), its last windows go to its sink, then [`PathHandle`] says it ended. One path
//! alone ([`run_one`], what `probe` runs) is the same engine with its aggregator on the
//! caller's thread.
//!
//! The TCP kinds run on the same timetable and threads ([`tcp`]): `tcp-syn` paths pinned
//! alike share one raw socket (SYNs in one `sendmmsg`, TOS and TTL per datagram, answers
//! credited by their source and the port of ours they come to), and a `tcp-connect`
//! path's connections, started by the sender, are handed to the receiver, which polls
//! them with the sockets (woken by a [`sys::Bell`]).

mod tcp;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::{self, Scope, ScopedJoinHandle, Thread};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use pathprobe_proto::report::{ProbeProtocol, TimestampSource, Timestamping};
use pathprobe_proto::stamp::tlv::{HmacTlvCheck, check_hmac_tlv};
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, TimestampFormat,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::session::{Marks, Reply, Sent, Tracker, TrackerConfig, WindowStats};
use super::timetable::{self, Due, Note, Slots, Timetable};
use super::{Sink, Timing};
use crate::keyfile::LiveKey;
use crate::pin::io_err;
use crate::probe::ProbeConfig;
use crate::probe::stamp::{build_probe, canonical, far_dscp};
use crate::probe::tcp::SynFlow;
use crate::sys::{self, BatchClock, ErrBatch, Queued, RecvBatch, SendBatch};
use crate::{Error, Result};

/// Probes per `sendmmsg`, replies per `recvmmsg`.
const BATCH: usize = 64;
/// Slots the sender takes at one wake-up, at most.
const MAX_DUE: usize = 4 * BATCH;
/// Entries of the table that matches a socket's transmit stamps to probes: a stamp comes
/// back within a pass or two of its send, and one whose entry was taken since (the
/// aggregator stalled for thousands of sends) is told by its id and ignored: the probe
/// keeps the send time the sender read.
const TX_MAP: usize = 1 << 12;
/// The receiver wakes at most once in this span when the kernel dates every datagram (its
/// stamps, not the moment it is read, date a reply, so reading later loses nothing and
/// saves a wake-up per reply): a span in which the paths' probes fill about one receive
/// batch, from 1 to 10 ms. A thousand paths at 10/s are read about 150 times a second.
const RECV_COALESCE_NS: (u64, u64) = (1_000_000, 10_000_000);

/// The receiver's coalescing span for paths that probe `rate` times a second in all.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)] // a batch of 64; clamped to 1..10 ms
fn recv_coalesce_ns(rate: f64) -> u64 {
    let (least, most) = RECV_COALESCE_NS;
    let span = 1e9 * BATCH as f64 / rate.max(1.0);
    (span as u64).clamp(least, most)
}

/// The smallest and largest ring between the threads.
const RING_MIN: usize = 1 << 12;
const RING_MAX: usize = 1 << 16;

/// Records each ring between the I/O threads and the aggregator holds for an engine
/// expected to carry `probes_per_s` in all: a quarter of a second of them (each probe
/// makes up to three records), from 4,096 to 65,536.
pub fn ring_for_rate(probes_per_s: f64) -> usize {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive rate, capped far below usize::MAX"
    )]
    let want = (probes_per_s.max(0.0) * 0.75).min(f64::from(1u32 << 16)) as usize;
    want.next_power_of_two().clamp(RING_MIN, RING_MAX)
}

/// Probes per second of a path probing every `interval_ns`.
#[allow(clippy::cast_precision_loss)]
pub fn rate(interval_ns: u64) -> f64 {
    1e9 / interval_ns.max(1) as f64
}

/// What the engine's threads share of one path.
#[derive(Debug, Default)]
struct PathShared {
    /// Records of this path a full ring dropped.
    drops: AtomicU64,
    /// Datagrams from this path's far end that were not a valid answer.
    malformed: AtomicU64,
    /// The far end answered "port unreachable" (ICMP).
    unreachable: AtomicBool,
    /// Authenticated: the far end returned the HMAC TLV unrecognized (said once in the log).
    tlv_unprotected: AtomicBool,
}

/// The sender's records.
#[derive(Debug, Clone, Copy)]
enum TxRec {
    Sent {
        path: u32,
        sock: u32,
        sock_tx_id: u32,
        sent: Sent,
    },
    Failed {
        path: u32,
        seq: u32,
    },
    Missed {
        path: u32,
        scheduled_ns: u64,
        count: u64,
    },
    /// The path has no slot left (its schedule is spent, or it was removed).
    Over {
        path: u32,
    },
}

/// The receiver's records.
#[derive(Debug, Clone, Copy)]
enum RxRec {
    TxStamp {
        sock: u32,
        id: u32,
        mono_ns: u64,
        wall_ns: u64,
    },
    Reply {
        path: u32,
        reply: Reply,
    },
}

/// What a transport carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Wire {
    /// STAMP over an unconnected UDP socket.
    Stamp,
    /// `tcp-syn`: SYNs from a raw TCP socket.
    Syn,
    /// `tcp-connect`: a socket per probe, so no socket of its own.
    Connect,
}

impl Wire {
    const fn of(p: ProbeProtocol) -> Self {
        match p {
            ProbeProtocol::Stamp => Self::Stamp,
            ProbeProtocol::TcpSyn => Self::Syn,
            ProbeProtocol::TcpConnect => Self::Connect,
        }
    }
}

/// How a path's socket is pinned: paths alike share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PinKey {
    wire: Wire,
    v6: bool,
    bind: Option<SocketAddr>,
    interface: Option<String>,
    fwmark: Option<u32>,
}

impl PinKey {
    fn of(cfg: &ProbeConfig) -> Self {
        let wire = Wire::of(cfg.protocol);
        Self {
            wire,
            v6: cfg.target.is_ipv6(),
            // A TCP path's port is its flow's (or each connection's), not the socket's.
            bind: match wire {
                Wire::Stamp => cfg.bind,
                Wire::Syn | Wire::Connect => cfg
                    .bind
                    .filter(|b| !b.ip().is_unspecified())
                    .map(|b| SocketAddr::new(b.ip(), 0)),
            },
            interface: cfg.interface.clone(),
            fwmark: cfg.fwmark,
        }
    }
}

/// One pinned socket that paths share: an unconnected UDP socket (STAMP) or a raw TCP
/// socket (`tcp-syn`); none for `tcp-connect`, whose paths share only the bookkeeping.
#[derive(Debug)]
pub struct Transport {
    id: u32,
    key: PinKey,
    sock: Option<Socket>,
    pub timestamping: Timestamping,
    port: u16,
    /// The TTL (hop limit) datagrams leave with unless a path sets its own.
    default_ttl: Option<u8>,
}

impl Transport {
    /// The TTL probes of `cfg` leave this socket with.
    pub fn sent_ttl(&self, cfg: &ProbeConfig) -> Option<u8> {
        // The kernel's connection keeps its answers' TTL to itself: no hops from it.
        if self.key.wire == Wire::Connect {
            return None;
        }
        cfg.ttl.or(self.default_ttl)
    }

    /// Opens and pins the socket for paths pinned like `cfg`.
    fn open(id: u32, cfg: &ProbeConfig) -> Result<Self> {
        let key = PinKey::of(cfg);
        match key.wire {
            Wire::Stamp => {}
            Wire::Syn => return tcp::open_syn_transport(id, key, cfg),
            Wire::Connect => {
                return Ok(Self {
                    id,
                    key,
                    sock: None,
                    // The RTT is the kernel's own measurement of the handshake (TCP_INFO).
                    timestamping: Timestamping {
                        rx: TimestampSource::Kernel,
                        tx: TimestampSource::Kernel,
                    },
                    port: 0,
                    default_ttl: None,
                });
            }
        }
        let sock = pinned_udp(cfg, cfg.bind)?;
        let _ = sock.set_recv_buffer_size(8 << 20);
        let _ = sock.set_send_buffer_size(8 << 20);
        sys::enable_rx_metadata(&sock, key.v6).map_err(io_err("ask for TTL and TOS"))?;
        sys::enable_recv_errors(&sock, key.v6).map_err(io_err("ask for ICMP errors"))?;
        let (rx, tx) = sys::enable_timestamping(&sock, true);
        let port = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map_or(0, |a| a.port());
        let default_ttl = if key.v6 {
            sock.unicast_hops_v6().ok()
        } else {
            sock.ttl_v4().ok()
        }
        .and_then(|t| u8::try_from(t).ok());
        Ok(Self {
            id,
            key,
            sock: Some(sock),
            timestamping: Timestamping { rx, tx },
            port,
            default_ttl,
        })
    }
}

/// A UDP socket of `cfg`'s family, pinned by its interface and fwmark and bound to `bind`
/// (or the unspecified address).
fn pinned_udp(cfg: &ProbeConfig, bind: Option<SocketAddr>) -> Result<Socket> {
    let sock = Socket::new(
        Domain::for_address(cfg.target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(io_err("create a UDP socket"))?;
    crate::pin::pin(
        &sock,
        cfg.target,
        bind,
        cfg.interface.as_deref(),
        cfg.fwmark,
    )?;
    Ok(sock)
}

/// The local address probes of `cfg` leave from: the pinned address, or the one routing
/// picks for the target (a connected socket learns it; nothing is sent).
fn local_address(cfg: &ProbeConfig, port: u16) -> Result<SocketAddr> {
    if let Some(b) = cfg.bind.filter(|b| !b.ip().is_unspecified()) {
        return Ok(SocketAddr::new(b.ip(), port));
    }
    let sock = pinned_udp(cfg, None)?;
    sock.connect(&cfg.target.into())
        .map_err(io_err(&format!("reach {}", cfg.target)))?;
    let ip = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map_or_else(
            || {
                if cfg.target.is_ipv6() {
                    IpAddr::from([0u16; 8])
                } else {
                    IpAddr::from([0u8; 4])
                }
            },
            |a| a.ip(),
        );
    Ok(SocketAddr::new(ip, port))
}

/// Where a path's probes leave from, and a `tcp-syn` path's flow (its source ports
/// reserved now).
fn path_local(cfg: &ProbeConfig, tr: &Transport) -> Result<(SocketAddr, Option<Arc<SynFlow>>)> {
    match tr.key.wire {
        Wire::Stamp => Ok((local_address(cfg, tr.port)?, None)),
        Wire::Syn => {
            let ip = match tr.key.bind {
                Some(SocketAddr::V4(b)) => *b.ip(),
                _ => match local_address(cfg, 0)?.ip() {
                    IpAddr::V4(ip) => ip,
                    IpAddr::V6(_) => {
                        return Err(Error::Config(format!(
                            "no IPv4 source address towards {}",
                            cfg.target
                        )));
                    }
                },
            };
            let flow = SynFlow::open(cfg, ip)?;
            Ok((SocketAddr::V4(flow.local), Some(Arc::new(flow))))
        }
        Wire::Connect => Ok((crate::probe::tcp::connect_local(cfg), None)),
    }
}

/// What a path learned as it was added.
#[derive(Debug, Clone, Copy)]
pub struct PathInfo {
    /// Where its probes leave from.
    pub local: SocketAddr,
    pub timestamping: Timestamping,
    /// The TTL its probes leave with.
    pub sent_ttl: Option<u8>,
}

/// How a path ended: its windows (when its sink keeps them), or why it stopped.
pub type PathEnd = Result<Vec<WindowStats>>;

/// A path running on an [`Engine`].
#[derive(Debug)]
pub struct PathHandle {
    pub id: u32,
    pub info: PathInfo,
    done: mpsc::Receiver<PathEnd>,
    key: Option<Arc<LiveKey>>,
    late_timeout: Duration,
}

impl PathHandle {
    /// Signs the path's probes with `key` from the next one on, without a gap: answers to
    /// the probes signed with the key before still verify for as long as they can come
    /// (twice the late timeout). False for an unauthenticated path, which has no key to
    /// change (its mode is its plan's).
    pub fn set_key(&self, key: AuthKey) -> bool {
        self.key.as_ref().is_some_and(|live| {
            live.replace(key, self.late_timeout.saturating_mul(2));
            true
        })
    }

    /// The fingerprint of the key it signs with now, if authenticated.
    pub fn key_fingerprint(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.fingerprint())
    }

    /// How the path ended, if it has.
    pub fn ended(&self) -> Option<PathEnd> {
        match self.done.try_recv() {
            Ok(end) => Some(end),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(Err(Error::Config("the probe engine stopped".to_string())))
            }
        }
    }

    /// Waits up to `timeout` for the path to end.
    pub fn wait(&self, timeout: Duration) -> Option<PathEnd> {
        match self.done.recv_timeout(timeout) {
            Ok(end) => Some(end),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Some(Err(Error::Config("the probe engine stopped".to_string())))
            }
        }
    }
}

/// A path as the sender keeps it.
#[derive(Debug)]
struct SendPath {
    tr: Arc<Transport>,
    shared: Arc<PathShared>,
    cfg: ProbeConfig,
    /// Authenticated: the key it signs with now.
    key: Option<Arc<LiveKey>>,
    ee: ErrorEstimate,
    seq: u32,
    /// A `tcp-syn` path's flow.
    syn: Option<Arc<SynFlow>>,
}

enum SendCmd {
    Add {
        path: u32,
        p: Box<SendPath>,
        slots: Slots,
    },
    Remove {
        path: u32,
    },
}

/// A far end the receiver credits answers to.
#[derive(Debug, Clone)]
struct Peer {
    path: u32,
    ssid: u16,
    /// Its probes' interval: the receiver paces its wake-ups to the paths' rate.
    interval_ns: u64,
    mode: Mode,
    key: Option<Arc<LiveKey>>,
    shared: Arc<PathShared>,
    /// A `tcp-syn` path's flow: which ports of ours its answers come to.
    syn: Option<Arc<SynFlow>>,
}

enum RecvCmd {
    Add {
        tr: Arc<Transport>,
        target: SocketAddr,
        peer: Box<Peer>,
    },
    Remove {
        sock: u32,
        target: SocketAddr,
        path: u32,
    },
}

/// A socket's paths.
#[derive(Debug)]
struct SockEntry {
    tr: Arc<Transport>,
    /// (far end, SSID) of its paths: a pair is on a socket once.
    peers: HashSet<(SocketAddr, u16)>,
}

/// What every thread of the engine shares.
struct Core {
    tx_q: ArrayQueue<TxRec>,
    rx_q: ArrayQueue<RxRec>,
    to_sender: mpsc::Sender<SendCmd>,
    to_receiver: mpsc::Sender<RecvCmd>,
    sender: OnceLock<Thread>,
    /// A command waits for the sender.
    poke: AtomicBool,
    stop: AtomicBool,
    /// Some path's drop or malformed counter moved.
    any_drops: AtomicBool,
    /// Datagrams that no path of their socket could be credited with.
    stray: AtomicU64,
    /// Transmit stamps a full ring dropped (their probes keep the send time the sender
    /// read).
    stamp_drops: AtomicU64,
    sockets: Mutex<Vec<Option<SockEntry>>>,
    next_path: AtomicU32,
    /// `tcp-connect` connections on their way from the sender to the receiver (made with
    /// the first such path).
    connects: OnceLock<tcp::Handoff>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("ring", &self.tx_q.capacity())
            .finish_non_exhaustive()
    }
}

/// The receiving ends of the sender's and the receiver's commands.
struct Inboxes {
    sender: mpsc::Receiver<SendCmd>,
    receiver: mpsc::Receiver<RecvCmd>,
}

impl Core {
    fn new(ring: usize) -> (Self, Inboxes) {
        let (to_sender, sender) = mpsc::channel();
        let (to_receiver, receiver) = mpsc::channel();
        let ring = ring.clamp(RING_MIN, RING_MAX);
        (
            Self {
                tx_q: ArrayQueue::new(ring),
                rx_q: ArrayQueue::new(ring),
                to_sender,
                to_receiver,
                sender: OnceLock::new(),
                poke: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                any_drops: AtomicBool::new(false),
                stray: AtomicU64::new(0),
                stamp_drops: AtomicU64::new(0),
                sockets: Mutex::new(Vec::new()),
                next_path: AtomicU32::new(0),
                connects: OnceLock::new(),
            },
            Inboxes { sender, receiver },
        )
    }

    fn tell_sender(&self, cmd: SendCmd) {
        let _ = self.to_sender.send(cmd);
        self.poke.store(true, Ordering::Release);
        if let Some(t) = self.sender.get() {
            t.unpark();
        }
    }

    /// A socket for `cfg` on which its far end and SSID are not taken (opened if none),
    /// with the pair taken.
    fn socket_for(
        &self,
        cfg: &ProbeConfig,
        given: Option<Arc<Transport>>,
    ) -> Result<Arc<Transport>> {
        let key = PinKey::of(cfg);
        let peer = (canonical(cfg.target), cfg.ssid);
        let mut sockets = self.sockets.lock().map_err(|_| {
            Error::Config("the probe engine's socket table is poisoned".to_string())
        })?;
        if let Some(tr) = given {
            let i = tr.id as usize;
            if sockets.len() <= i {
                sockets.resize_with(i + 1, || None);
            }
            let entry = sockets[i].get_or_insert_with(|| SockEntry {
                tr: Arc::clone(&tr),
                peers: HashSet::new(),
            });
            entry.peers.insert(peer);
            return Ok(tr);
        }
        if let Some(e) = sockets
            .iter_mut()
            .flatten()
            .find(|e| e.tr.key == key && !e.peers.contains(&peer))
        {
            e.peers.insert(peer);
            return Ok(Arc::clone(&e.tr));
        }
        let id = u32::try_from(sockets.len()).unwrap_or(u32::MAX);
        let tr = Arc::new(Transport::open(id, cfg)?);
        sockets.push(Some(SockEntry {
            tr: Arc::clone(&tr),
            peers: [peer].into(),
        }));
        Ok(tr)
    }

    /// The handoff of `tcp-connect` connections, made with the first such path.
    fn connects_handoff(&self) -> Result<&tcp::Handoff> {
        if self.connects.get().is_none() {
            let _ = self.connects.set(tcp::Handoff::new()?);
        }
        self.connects.get().ok_or_else(|| {
            Error::Config("the probe engine has no handoff for tcp-connect".to_string())
        })
    }

    /// The pair of a path that ended is free again; a socket with no path left closes
    /// (once the sender and receiver let go of it).
    fn release(&self, sock: u32, target: SocketAddr, ssid: u16) {
        if let Ok(mut sockets) = self.sockets.lock()
            && let Some(slot) = sockets.get_mut(sock as usize)
            && let Some(e) = slot
        {
            e.peers.remove(&(canonical(target), ssid));
            if e.peers.is_empty() {
                *slot = None;
            }
        }
    }

    /// Registers a path with the receiver and returns what the sender and the aggregator
    /// need of it. The receiver hears of it before any probe can leave.
    fn open_path(&self, cfg: &ProbeConfig, given: Option<&Prepared>) -> Result<Opened> {
        cfg.validate()?;
        let tr = self.socket_for(cfg, given.map(|g| Arc::clone(&g.tr)))?;
        let opened = match given {
            Some(g) => Ok((g.info.local, g.syn.clone())),
            None => path_local(cfg, &tr),
        }
        .and_then(|o| match tr.key.wire {
            Wire::Connect => self.connects_handoff().map(|_| o),
            Wire::Stamp | Wire::Syn => Ok(o),
        });
        let (local, syn) = match opened {
            Ok(o) => o,
            Err(e) => {
                self.release(tr.id, cfg.target, cfg.ssid);
                return Err(e);
            }
        };
        let path = self.next_path.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(PathShared::default());
        let key = cfg.key.clone().map(|k| Arc::new(LiveKey::new(k)));
        let _ = self.to_receiver.send(RecvCmd::Add {
            tr: Arc::clone(&tr),
            target: canonical(cfg.target),
            peer: Box::new(Peer {
                path,
                ssid: cfg.ssid,
                interval_ns: cfg.timing().interval_ns,
                mode: cfg.mode(),
                key: key.clone(),
                shared: Arc::clone(&shared),
                syn: syn.clone(),
            }),
        });
        let timing = cfg.timing();
        let (now, wall) = (sys::monotonic_ns(), sys::realtime_ns());
        let start = timetable::place(u64::from(path), timing.interval_ns, now);
        let sync = sys::clock_sync().ok();
        let local_sync = sync.filter(|s| s.synchronized).map(|s| s.max_error_ns);
        let ee = ErrorEstimate::from_error_nanos(
            local_sync.is_some(),
            TimestampFormat::Ntp,
            sync.map_or(1_000_000_000, |s| s.max_error_ns.max(1)),
        );
        let info = PathInfo {
            local,
            timestamping: tr.timestamping,
            sent_ttl: tr.sent_ttl(cfg),
        };
        let tracker = TrackerConfig {
            interval_ns: timing.interval_ns,
            late_timeout_ns: timing.late_timeout_ns,
            window_ns: timing.window_ns,
            start_mono_ns: start,
            start_wall_ns: wall + (start - now),
            local_sync,
        };
        let send_shared = Arc::clone(&shared);
        Ok(Opened {
            path,
            info,
            timing,
            tracker,
            shared,
            key: key.clone(),
            send: Box::new(SendPath {
                tr,
                shared: send_shared,
                cfg: cfg.clone(),
                key,
                ee,
                seq: 0,
                syn,
            }),
            slots: Slots {
                start_ns: start,
                interval_ns: timing.interval_ns,
                count: timing.slots(),
                miss_after_ns: timing.late_timeout_ns / 2,
            },
        })
    }
}

/// A path registered with the receiver, not yet scheduled.
struct Opened {
    path: u32,
    info: PathInfo,
    timing: Timing,
    tracker: TrackerConfig,
    shared: Arc<PathShared>,
    key: Option<Arc<LiveKey>>,
    send: Box<SendPath>,
    slots: Slots,
}

impl Opened {
    /// The aggregator's side of it, and the sender's command that starts it.
    fn split<S: ?Sized + Sink>(
        self,
        sink: Box<S>,
        done: mpsc::Sender<PathEnd>,
    ) -> (AggPath<S>, SendCmd) {
        let sock = self.send.tr.id;
        let mut tracker = Tracker::new(self.tracker);
        if sink.wants_probes() {
            tracker.keep_decisions();
        }
        if sink.compact_windows() {
            tracker.keep_compact();
        }
        let agg = AggPath {
            tracker,
            sink,
            timing: self.timing,
            shared: self.shared,
            sock,
            ssid: self.send.cfg.ssid,
            first_sent: None,
            last_scheduled: 0,
            answered: false,
            over: false,
            stop_asked: false,
            windows: Vec::new(),
            done,
            next_poll: u64::MAX,
            touched: false,
        };
        let cmd = SendCmd::Add {
            path: self.path,
            p: self.send,
            slots: self.slots,
        };
        (agg, cmd)
    }
}

// ---------------------------------------------------------------------------------------
// The sender thread.

/// Sleeps until `deadline` (with `precise`, until a margin before it, then spins); false
/// when a command or the stop came first.
fn wait_until(core: &Core, deadline: u64, precise: bool, oversleep: &mut u64) -> bool {
    const SPIN_MIN_NS: u64 = 20_000;
    const SPIN_MAX_NS: u64 = 2_000_000;
    loop {
        if core.stop.load(Ordering::Relaxed) || core.poke.swap(false, Ordering::AcqRel) {
            return false;
        }
        let now = sys::monotonic_ns();
        if now >= deadline {
            return true;
        }
        let margin = if precise {
            (2 * *oversleep + SPIN_MIN_NS).clamp(SPIN_MIN_NS, SPIN_MAX_NS)
        } else {
            0
        };
        if now + margin >= deadline {
            while sys::monotonic_ns() < deadline {
                std::hint::spin_loop();
            }
            return true;
        }
        let wake = (deadline - margin).min(now + 100_000_000);
        thread::park_timeout(Duration::from_nanos(wake - now));
        let late = sys::monotonic_ns().saturating_sub(wake);
        if late < 100_000_000 {
            *oversleep = (*oversleep * 7 + late) / 8;
        }
    }
}

/// The sender's commands: paths into and out of the timetable.
fn take_commands(
    inbox: &mpsc::Receiver<SendCmd>,
    table: &mut Timetable,
    paths: &mut Vec<Option<Box<SendPath>>>,
    tx_ids: &mut Vec<u32>,
    over: &mut Vec<u32>,
) {
    while let Ok(cmd) = inbox.try_recv() {
        match cmd {
            SendCmd::Add { path, p, slots } => {
                let i = path as usize;
                if paths.len() <= i {
                    paths.resize_with(i + 1, || None);
                }
                let sock = p.tr.id as usize;
                if tx_ids.len() <= sock {
                    tx_ids.resize(sock + 1, 0);
                }
                paths[i] = Some(p);
                table.add(path, slots);
                if !table.contains(path) {
                    over.push(path);
                }
            }
            SendCmd::Remove { path } => {
                if table.contains(path) {
                    table.remove(path);
                    over.push(path);
                }
                if let Some(p) = paths.get_mut(path as usize) {
                    *p = None;
                }
            }
        }
    }
}

/// The sender: one timetable for every path, the due probes of each socket in one
/// `sendmmsg`.
fn sender(core: &Core, inbox: &mpsc::Receiver<SendCmd>) {
    let _ = sys::lower_timer_slack();
    let mut table = Timetable::new();
    let mut paths: Vec<Option<Box<SendPath>>> = Vec::new();
    // Each socket's transmit number: the kernel's count of datagrams it took.
    let mut tx_ids: Vec<u32> = Vec::new();
    let mut over: Vec<u32> = Vec::new();
    let (mut due, mut notes) = (Vec::with_capacity(MAX_DUE), Vec::with_capacity(MAX_DUE));
    let mut batch = SendBatch::new(BATCH);
    // (path, seq) of each datagram queued in `batch`.
    let mut queued: Vec<(u32, u32)> = Vec::with_capacity(BATCH);
    let mut oversleep = 50_000u64;
    while !core.stop.load(Ordering::Relaxed) {
        take_commands(inbox, &mut table, &mut paths, &mut tx_ids, &mut over);
        // The aggregator must hear that a path is over: kept until the ring takes it.
        over.retain(|&path| core.tx_q.push(TxRec::Over { path }).is_err());
        let Some((deadline, precise)) = table.next_deadline() else {
            thread::park_timeout(Duration::from_millis(100));
            continue;
        };
        if !wait_until(core, deadline, precise, &mut oversleep) {
            continue;
        }
        let now = sys::monotonic_ns();
        table.take_due(now, MAX_DUE, &mut due, &mut notes);
        for n in &notes {
            if let Note::Missed {
                path,
                scheduled_ns,
                count,
            } = *n
            {
                let rec = TxRec::Missed {
                    path,
                    scheduled_ns,
                    count,
                };
                push_tx(core, &paths, path, rec);
            }
        }
        // Socket by socket, in deadline order within each.
        due.sort_by_key(|d| {
            let sock = paths
                .get(d.path as usize)
                .and_then(Option::as_ref)
                .map_or(u32::MAX, |p| p.tr.id);
            (sock, d.scheduled_ns)
        });
        let mut at = 0;
        while at < due.len() {
            let Some(sock) = paths
                .get(due[at].path as usize)
                .and_then(Option::as_ref)
                .map(|p| Arc::clone(&p.tr))
            else {
                at += 1;
                continue;
            };
            let end = due[at..]
                .iter()
                .position(|d| {
                    paths
                        .get(d.path as usize)
                        .and_then(Option::as_ref)
                        .is_none_or(|p| p.tr.id != sock.id)
                })
                .map_or(due.len(), |n| at + n);
            for chunk in due[at..end].chunks(BATCH) {
                send_chunk(
                    core,
                    &sock,
                    chunk,
                    &mut paths,
                    &mut tx_ids,
                    (&mut batch, &mut queued),
                );
            }
            at = end;
        }
        for n in &notes {
            if let Note::Over { path } = *n {
                over.push(path);
                if let Some(p) = paths.get_mut(path as usize) {
                    *p = None;
                }
            }
        }
    }
}

/// Pushes a record of `path`; a full ring drops it and counts the drop against the path.
fn push_tx(core: &Core, paths: &[Option<Box<SendPath>>], path: u32, rec: TxRec) {
    if core.tx_q.push(rec).is_err() {
        drop_against(core, path, paths);
    }
}

/// Counts a record of `path` that a full ring dropped.
fn drop_against(core: &Core, path: u32, paths: &[Option<Box<SendPath>>]) {
    if let Some(p) = paths.get(path as usize).and_then(Option::as_ref) {
        charge(core, &p.shared.drops);
    }
}

/// Builds and sends one socket's due probes (at most a batch): STAMP test packets or SYNs
/// in one `sendmmsg`, or a `tcp-connect` path's connections.
fn send_chunk(
    core: &Core,
    tr: &Transport,
    chunk: &[Due],
    paths: &mut [Option<Box<SendPath>>],
    tx_ids: &mut [u32],
    (batch, queued): (&mut SendBatch, &mut Vec<(u32, u32)>),
) {
    let Some(socket) = tr.sock.as_ref() else {
        tcp::start_connects(core, tr, chunk, paths);
        return;
    };
    let t1_wall = sys::realtime_ns();
    let t1 = TimestampFormat::Ntp.encode(t1_wall).unwrap_or_default();
    let now = sys::monotonic_ns();
    batch.clear();
    queued.clear();
    let sock = tr.id as usize;
    for d in chunk {
        let Some(p) = paths.get_mut(d.path as usize).and_then(Option::as_mut) else {
            continue;
        };
        let Some(buf) = batch.next_slot() else { break };
        let (len, dest) = if let Some(flow) = &p.syn {
            // A raw socket takes no port: the segment carries it.
            (flow.syn(buf, p.seq), SocketAddr::new(p.cfg.target.ip(), 0))
        } else {
            match &p.key {
                Some(k) => k.with_current(|k| build_probe(&p.cfg, Some(k), buf, p.seq, t1, p.ee)),
                None => build_probe(&p.cfg, None, buf, p.seq, t1, p.ee),
            }
            (p.cfg.size, p.cfg.target)
        };
        // The sockets keep the default TOS (0): DSCP 0 needs no ancillary data.
        let tos = (p.cfg.dscp != 0).then_some(p.cfg.dscp << 2);
        batch.commit_marked(len, Some(dest), tr.key.v6, (tos, p.cfg.ttl));
        let rec = TxRec::Sent {
            path: d.path,
            sock: tr.id,
            sock_tx_id: tx_ids[sock],
            sent: Sent {
                seq: p.seq,
                scheduled_ns: d.scheduled_ns,
                sent_ns: now,
                t1_wall_ns: t1_wall,
                bytes: u32::try_from(len).unwrap_or(u32::MAX),
            },
        };
        if core.tx_q.push(rec).is_err() {
            // Unrecorded, the probe must not leave: an answer would match nothing.
            batch.clear_last();
            drop_against(core, d.path, paths);
            continue;
        }
        queued.push((d.path, p.seq));
        p.seq = p.seq.wrapping_add(1);
        tx_ids[sock] = tx_ids[sock].wrapping_add(1);
    }
    let took = batch.send_all(socket);
    // The kernel took the first `took`; give back the numbers of the rest, last first.
    for &(path, seq) in queued[took.min(queued.len())..].iter().rev() {
        tx_ids[sock] = tx_ids[sock].wrapping_sub(1);
        if let Some(p) = paths.get_mut(path as usize).and_then(Option::as_mut) {
            p.seq = p.seq.wrapping_sub(1);
        }
        if core.tx_q.push(TxRec::Failed { path, seq }).is_err() {
            drop_against(core, path, paths);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The receiver thread.

/// A socket as the receiver keeps it: its far ends and their paths.
/// The paths of one far end on a socket, sorted by SSID, each SSID once (paths that share
/// one get sockets of their own); the SSIDs also on their own, two octets each, so that
/// finding one among a thousand touches a few cache lines.
#[derive(Default)]
struct FarEnd {
    ssids: Vec<u16>,
    peers: Vec<Peer>,
}

impl FarEnd {
    fn insert(&mut self, peer: Peer) {
        let at = self.ssids.partition_point(|&s| s < peer.ssid);
        self.ssids.insert(at, peer.ssid);
        self.peers.insert(at, peer);
    }

    /// Takes out `path`'s entry, if it has one.
    fn remove(&mut self, path: u32) -> Option<Peer> {
        let at = self.peers.iter().position(|p| p.path == path)?;
        self.ssids.remove(at);
        Some(self.peers.remove(at))
    }

    fn by_ssid(&self, ssid: u16) -> Option<&Peer> {
        self.ssids.binary_search(&ssid).ok().map(|i| &self.peers[i])
    }
}

struct RecvSock {
    tr: Arc<Transport>,
    peers: HashMap<SocketAddr, FarEnd>,
    paths: usize,
}

impl RecvSock {
    /// The path an answer from `src` belongs to, with the packet checked whole for it:
    /// the only path of that far end on this socket, or the one whose SSID it carries.
    /// With it, where the answer's TLVs start, and whether they are to be believed.
    /// `Err` names a path whose far end sent something that is not an answer of its.
    fn credit<'a>(
        &'a self,
        src: SocketAddr,
        payload: &[u8],
    ) -> std::result::Result<(&'a Peer, ReflectorRepr, usize, bool), Option<&'a Peer>> {
        let Some(far) = self.peers.get(&canonical(src)) else {
            // From nowhere we probe: a socket of one path counts it as that path's, as a
            // connected socket's session did.
            let only = (self.paths == 1)
                .then(|| self.peers.values().next().and_then(|f| f.peers.first()))
                .flatten();
            return Err(only);
        };
        let peers = &far.peers;
        let single = peers.len() == 1;
        // Several paths to this far end: the one whose SSID the answer carries, found by
        // it (the list is sorted by SSID, each SSID once: paths that share one get
        // sockets of their own), in either packet layout.
        for mode in [Mode::Unauthenticated, Mode::Authenticated] {
            let Ok(packet) = ReflectorPacket::new_checked(payload, mode) else {
                continue;
            };
            let peer = if single {
                &peers[0]
            } else {
                match far.by_ssid(packet.ssid()) {
                    Some(p) => p,
                    None => continue,
                }
            };
            if peer.mode != mode {
                continue;
            }
            let tlv_at = payload.len() - packet.tlvs().len();
            let mut tlvs_trusted = true;
            if let Some(key) = &peer.key {
                // The base HMAC and the HMAC TLV, with the key that signed the probe.
                let check = key.first(|k| {
                    packet
                        .verify(k)
                        .is_ok()
                        .then(|| check_hmac_tlv(payload, tlv_at, k))
                });
                match check {
                    None | Some(HmacTlvCheck::Failed) => return Err(Some(peer)),
                    Some(HmacTlvCheck::Verified { integrity_failed }) => {
                        tlvs_trusted = !integrity_failed;
                    }
                    Some(HmacTlvCheck::Absent) => tlvs_trusted = tlv_at == payload.len(),
                    Some(HmacTlvCheck::Unrecognized) => {
                        if !peer.shared.tlv_unprotected.swap(true, Ordering::Relaxed) {
                            tracing::warn!(far_end = %src, "the reflector does not implement the HMAC TLV (RFC 8972 §4.8): its TLV answers (the DSCP it received) are not integrity-protected");
                        }
                    }
                }
            }
            return Ok((peer, ReflectorRepr::parse(&packet), tlv_at, tlvs_trusted));
        }
        Err(peers.first())
    }
}

/// Counts one against a path's counter and tells the aggregator to look.
fn charge(core: &Core, counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
    core.any_drops.store(true, Ordering::Release);
}

/// A datagram that is not an answer: the path of its far end's, or a stray.
fn count_malformed(core: &Core, peer: Option<&Peer>) {
    match peer {
        Some(p) => charge(core, &p.shared.malformed),
        None => {
            core.stray.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Pushes a record of the receiver's; a full ring counts the drop against its path (or,
/// for a transmit stamp, in the engine's count).
fn push_rx(core: &Core, rec: RxRec, peer: Option<&Peer>) {
    if core.rx_q.push(rec).is_err() {
        match peer {
            Some(p) => charge(core, &p.shared.drops),
            None => {
                core.stamp_drops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Reads everything queued on one socket: answers, transmit stamps, ICMP errors.
fn drain_socket(core: &Core, rs: &RecvSock, batch: &mut RecvBatch, errs: &mut ErrBatch) {
    let Some(sock) = rs.tr.sock.as_ref() else {
        return;
    };
    let clock = BatchClock::now();
    errs.drain(sock, |q| match q {
        Queued::TxStamp { id, ns } => push_rx(
            core,
            RxRec::TxStamp {
                sock: rs.tr.id,
                id,
                mono_ns: clock.mono(ns),
                wall_ns: ns,
            },
            None,
        ),
        Queued::Unreachable { dest } => {
            if let Some(far) = dest.and_then(|d| rs.peers.get(&canonical(d))) {
                for p in &far.peers {
                    p.shared.unreachable.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    each_datagram(sock, batch, |payload, meta, clock| {
        let Some(src) = meta.src else {
            count_malformed(core, None);
            return;
        };
        if meta.truncated {
            count_malformed(
                core,
                rs.peers.get(&canonical(src)).and_then(|f| f.peers.first()),
            );
            return;
        }
        let (peer, r, tlv_at, tlvs_trusted) = match rs.credit(src, payload) {
            Ok(found) => found,
            Err(peer) => {
                count_malformed(core, peer);
                return;
            }
        };
        let f = r.error_estimate.format;
        let (Ok(t2), Ok(t3)) = (f.decode(r.receive_timestamp), f.decode(r.timestamp)) else {
            count_malformed(core, Some(peer));
            return;
        };
        let (rx_ns, rx_wall_ns) = clock.arrival(meta.kernel_rx_ns);
        let marks = Marks {
            // 0: a reflector that does not fill in the Session-Sender TTL.
            far_ttl: Some(r.sender_ttl).filter(|&t| t > 0),
            far_dscp: if tlvs_trusted {
                far_dscp(&payload[tlv_at..])
            } else {
                None
            },
            back_ttl: meta.ttl,
            back_dscp: meta.tos.map(|t| t >> 2),
        };
        let reflector_sync = if r.error_estimate.synchronized {
            r.error_estimate.error_nanos()
        } else {
            None
        };
        let reply = Reply {
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
        };
        push_rx(
            core,
            RxRec::Reply {
                path: peer.path,
                reply,
            },
            Some(peer),
        );
    });
}

/// Calls `f` with every datagram queued on `sock` (and the clock of its batch), read in
/// `recvmmsg` batches until none is left or 64 batches were read. A refused or unreachable
/// error the socket holds is reported once by a receive; the next try gets past it.
fn each_datagram(
    sock: &Socket,
    batch: &mut RecvBatch,
    mut f: impl FnMut(&[u8], &sys::RecvMeta, &BatchClock),
) {
    for _ in 0..64 {
        let got = match batch.recv_now(sock) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => continue,
        };
        let clock = BatchClock::now();
        for i in 0..got {
            let Some((payload, meta)) = batch.get(i) else {
                break;
            };
            f(payload, meta, &clock);
        }
        if got < BATCH {
            return;
        }
    }
}

/// The receiver: one `poll` over every socket, each drained in `recvmmsg` batches.
/// The receiver thread's sockets and the paths on them.
#[derive(Default)]
struct Receiving {
    socks: Vec<RecvSock>,
    /// One per socket (a `tcp-connect` transport's is the handoff's bell), then one per
    /// connection in `flying`.
    fds: Vec<libc::pollfd>,
    /// `tcp-connect` connections on their way.
    flying: Vec<tcp::InFlight>,
    /// Every path's probes a second, in all.
    rate: f64,
    coalesce_ns: u64,
    /// The kernel dates every datagram on every socket.
    kernel_dated: bool,
}

impl Receiving {
    /// Takes in the paths added and removed since the last call; true when there were any.
    fn take_commands(&mut self, core: &Core, inbox: &mpsc::Receiver<RecvCmd>) -> bool {
        let mut changed = false;
        let (socks, rate) = (&mut self.socks, &mut self.rate);
        while let Ok(cmd) = inbox.try_recv() {
            changed = true;
            match cmd {
                RecvCmd::Add { tr, target, peer } => {
                    let i = if let Some(i) = socks.iter().position(|s| s.tr.id == tr.id) {
                        i
                    } else {
                        socks.push(RecvSock {
                            tr,
                            peers: HashMap::new(),
                            paths: 0,
                        });
                        socks.len() - 1
                    };
                    *rate += self::rate(peer.interval_ns);
                    socks[i].peers.entry(target).or_default().insert(*peer);
                    socks[i].paths += 1;
                }
                RecvCmd::Remove { sock, target, path } => {
                    if let Some(i) = socks.iter().position(|s| s.tr.id == sock) {
                        let s = &mut socks[i];
                        if let Some(far) = s.peers.get_mut(&target) {
                            if let Some(p) = far.remove(path) {
                                *rate -= self::rate(p.interval_ns);
                                s.paths -= 1;
                            }
                            if far.peers.is_empty() {
                                s.peers.remove(&target);
                            }
                        }
                        if s.paths == 0 {
                            socks.swap_remove(i);
                        }
                    }
                }
            }
        }
        if changed {
            self.coalesce_ns = recv_coalesce_ns(self.rate);
            // A refused connection is timed when the receiver sees it: no coalescing then.
            self.kernel_dated = self
                .socks
                .iter()
                .all(|s| s.tr.sock.is_some() && s.tr.timestamping.rx == TimestampSource::Kernel);
            let bell = core.connects.get().map_or(-1, |h| h.bell.fd());
            self.fds = self
                .socks
                .iter()
                .map(|s| libc::pollfd {
                    fd: s
                        .tr
                        .sock
                        .as_ref()
                        .map_or(bell, std::os::fd::AsRawFd::as_raw_fd),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
        }
        changed
    }
}

fn receiver(core: &Core, inbox: &mpsc::Receiver<RecvCmd>) {
    let mut r = Receiving {
        coalesce_ns: RECV_COALESCE_NS.0,
        ..Receiving::default()
    };
    let mut batch = RecvBatch::new(BATCH);
    let mut errs = ErrBatch::new(BATCH);
    let mut last_wake = 0u64;
    while !core.stop.load(Ordering::Relaxed) {
        r.take_commands(core, inbox);
        if r.fds.is_empty() {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        // At most one wake-up a span where the kernel dates every datagram.
        if r.kernel_dated {
            let next = last_wake + r.coalesce_ns;
            let now = sys::monotonic_ns();
            if now < next {
                sys::sleep_until(next);
            }
        }
        r.fds.truncate(r.socks.len());
        for f in &mut r.fds {
            f.revents = 0;
        }
        r.fds.extend(r.flying.iter().map(tcp::InFlight::pollfd));
        let ready = sys::poll_many(&mut r.fds, 20).unwrap_or(0);
        last_wake = sys::monotonic_ns();
        // The connections that were polled: their answers are read before the sockets
        // are (a socket's paths may change below).
        if !r.flying.is_empty() {
            tcp::settle(core, &mut r.flying, &r.fds[r.socks.len()..]);
        }
        // Paths added while this thread slept may have answers waiting already (a path's
        // first probe leaves LEAD_NS after its Add at the earliest, and the sleep can be
        // longer): they are taken in before anything is read, and then every socket is
        // read, as the poll's answers no longer match the sockets.
        let added = r.take_commands(core, inbox);
        if ready == 0 && !added {
            continue;
        }
        for (s, f) in r.socks.iter().zip(&r.fds) {
            if added || f.revents != 0 {
                match s.tr.key.wire {
                    Wire::Stamp => drain_socket(core, s, &mut batch, &mut errs),
                    Wire::Syn => tcp::drain_syn(core, s, &mut batch),
                    Wire::Connect => tcp::take_connects(core, &mut r.flying),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The aggregator.

/// A path as the aggregator keeps it.
#[allow(
    clippy::struct_excessive_bools,
    reason = "four independent facts of a path's life, each read on its own"
)]
struct AggPath<S: ?Sized> {
    tracker: Tracker,
    sink: Box<S>,
    timing: Timing,
    shared: Arc<PathShared>,
    sock: u32,
    ssid: u16,
    first_sent: Option<u64>,
    last_scheduled: u64,
    answered: bool,
    /// The sender has no slot of it left.
    over: bool,
    stop_asked: bool,
    windows: Vec<WindowStats>,
    done: mpsc::Sender<PathEnd>,
    /// When it is next due a poll (in the heap at that time), `u64::MAX`: not in it.
    next_poll: u64,
    touched: bool,
}

/// (socket transmit id, path, seq) per socket, by transmit id.
type TxMap = Box<[(u32, u32, u32)]>;

struct Aggregator<'c, S: ?Sized> {
    core: &'c Core,
    paths: Vec<Option<AggPath<S>>>,
    live: usize,
    rate: f64,
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    touched: Vec<u32>,
    tx_maps: Vec<Option<TxMap>>,
    replies: Vec<RxRec>,
}

impl<'c, S: ?Sized + Sink> Aggregator<'c, S> {
    fn new(core: &'c Core) -> Self {
        Self {
            core,
            paths: Vec::new(),
            live: 0,
            rate: 0.0,
            heap: BinaryHeap::new(),
            touched: Vec::new(),
            tx_maps: Vec::new(),
            replies: Vec::with_capacity(core.rx_q.capacity()),
        }
    }

    fn add(&mut self, path: u32, p: AggPath<S>) {
        let i = path as usize;
        if self.paths.len() <= i {
            self.paths.resize_with(i + 1, || None);
        }
        let sock = p.sock as usize;
        if self.tx_maps.len() <= sock {
            self.tx_maps.resize_with(sock + 1, || None);
        }
        self.tx_maps[sock].get_or_insert_with(|| vec![(u32::MAX, 0, 0); TX_MAP].into_boxed_slice());
        self.rate += rate(p.timing.interval_ns);
        self.paths[i] = Some(p);
        self.live += 1;
    }

    fn touch(&mut self, path: u32) {
        if let Some(Some(p)) = self.paths.get_mut(path as usize)
            && !p.touched
        {
            p.touched = true;
            self.touched.push(path);
        }
    }

    /// How long to sleep between passes: often enough that the rings cannot fill
    /// (a quarter of their room at the paths' rate), from 1 to 10 ms.
    fn pause(&self) -> Duration {
        let cap = f64::from(u32::try_from(self.core.rx_q.capacity()).unwrap_or(u32::MAX));
        let secs = cap / (4.0 * 3.0 * self.rate.max(1.0));
        Duration::from_secs_f64(secs.clamp(0.001, 0.010))
    }

    /// One pass: the receiver's records, then the sender's, then whatever is due.
    fn pass(&mut self, commands: &mut dyn FnMut(&mut Self)) {
        let core = self.core;
        let mut replies = std::mem::take(&mut self.replies);
        replies.clear();
        while replies.len() < replies.capacity() {
            let Some(r) = core.rx_q.pop() else { break };
            replies.push(r);
        }
        // New paths are taken in before the sender's records: a path's first Sent is
        // pushed only after its Add was sent here.
        commands(self);
        while let Some(rec) = core.tx_q.pop() {
            self.on_tx(rec);
        }
        for rec in &replies {
            self.on_rx(rec);
        }
        self.replies = replies;
        let now = sys::monotonic_ns();
        if core.any_drops.swap(false, Ordering::AcqRel) {
            for i in 0..self.paths.len() {
                let Some(p) = self.paths[i].as_mut() else {
                    continue;
                };
                let drops = p.shared.drops.swap(0, Ordering::Relaxed);
                let malformed = p.shared.malformed.swap(0, Ordering::Relaxed);
                if drops + malformed > 0 {
                    p.tracker.on_dropped(now, drops, malformed);
                    self.touch(u32::try_from(i).unwrap_or(u32::MAX));
                }
            }
        }
        while let Some(&Reverse((at, path))) = self.heap.peek() {
            if at > now {
                break;
            }
            self.heap.pop();
            let current = self
                .paths
                .get(path as usize)
                .and_then(Option::as_ref)
                .map(|p| p.next_poll);
            if current == Some(at) {
                if let Some(Some(p)) = self.paths.get_mut(path as usize) {
                    p.next_poll = u64::MAX;
                }
                self.touch(path);
            }
        }
        let touched = std::mem::take(&mut self.touched);
        for &path in &touched {
            self.poll_path(path, now);
        }
        self.touched = touched;
        self.touched.clear();
    }

    fn on_tx(&mut self, rec: TxRec) {
        match rec {
            TxRec::Sent {
                path,
                sock,
                sock_tx_id,
                sent,
            } => {
                let Some(Some(p)) = self.paths.get_mut(path as usize) else {
                    return;
                };
                p.first_sent.get_or_insert(sent.sent_ns);
                p.last_scheduled = sent.scheduled_ns;
                p.tracker.on_sent(sent);
                if let Some(Some(map)) = self.tx_maps.get_mut(sock as usize) {
                    map[sock_tx_id as usize % TX_MAP] = (sock_tx_id, path, sent.seq);
                }
                self.touch(path);
            }
            TxRec::Failed { path, seq } => {
                if let Some(Some(p)) = self.paths.get_mut(path as usize) {
                    p.tracker.on_send_failed(seq);
                }
            }
            TxRec::Missed {
                path,
                scheduled_ns,
                count,
            } => {
                if let Some(Some(p)) = self.paths.get_mut(path as usize) {
                    p.tracker.on_slots_missed(scheduled_ns, count);
                    self.touch(path);
                }
            }
            TxRec::Over { path } => {
                if let Some(Some(p)) = self.paths.get_mut(path as usize) {
                    p.over = true;
                    self.touch(path);
                }
            }
        }
    }

    fn on_rx(&mut self, rec: &RxRec) {
        match *rec {
            RxRec::TxStamp {
                sock,
                id,
                mono_ns,
                wall_ns,
            } => {
                let Some(Some(map)) = self.tx_maps.get(sock as usize) else {
                    return;
                };
                let (tx_id, path, seq) = map[id as usize % TX_MAP];
                if tx_id == id
                    && let Some(Some(p)) = self.paths.get_mut(path as usize)
                {
                    p.tracker.on_tx_stamp(seq, mono_ns, wall_ns);
                }
            }
            RxRec::Reply { path, reply } => {
                if let Some(Some(p)) = self.paths.get_mut(path as usize) {
                    p.answered = true;
                    p.tracker.on_reply(&reply);
                    self.touch(path);
                }
            }
        }
    }

    /// Decides what is due of one path, hands its results to its sink, ends it when its
    /// schedule is over and its last probe had its time, and says when it is due next.
    fn poll_path(&mut self, path: u32, now: u64) {
        let core = self.core;
        let Some(Some(p)) = self.paths.get_mut(path as usize) else {
            return;
        };
        p.touched = false;
        p.tracker.poll(now);
        let decided = p.tracker.take_decisions();
        if !decided.is_empty() {
            p.sink.probes(&decided);
        }
        let never_give_up = p.timing.no_reply_ns == u64::MAX;
        for w in p.tracker.take_closed() {
            if never_give_up && p.shared.unreachable.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    target = %p.timing.target,
                    lost = w.counters.lost,
                    "the target answered \"port unreachable\" this window: nothing listens there yet; probing goes on"
                );
            }
            deliver(p, w);
        }
        let mut failed = None;
        if !p.answered && !never_give_up {
            if p.shared.unreachable.load(Ordering::Relaxed) {
                failed = Some(Error::Unreachable {
                    target: p.timing.target,
                });
            } else if let Some(first) = p.first_sent
                && now.saturating_sub(first) >= p.timing.no_reply_ns
            {
                failed = Some(Error::NoReply {
                    target: p.timing.target,
                    after: Duration::from_nanos(p.timing.no_reply_ns),
                });
            }
        }
        if let Some(e) = failed {
            self.end(path, Err(e));
            return;
        }
        if p.sink.finished() && !p.stop_asked {
            p.stop_asked = true;
            core.tell_sender(SendCmd::Remove { path });
        }
        let end_at = p.last_scheduled.saturating_add(p.timing.late_timeout_ns);
        if p.over && now >= end_at {
            p.tracker.finish(sys::realtime_ns());
            let decided = p.tracker.take_decisions();
            if !decided.is_empty() {
                p.sink.probes(&decided);
            }
            for w in p.tracker.take_closed() {
                deliver(p, w);
            }
            let windows = std::mem::take(&mut p.windows);
            self.end(path, Ok(windows));
            return;
        }
        let mut next = p.tracker.next_due().unwrap_or(u64::MAX);
        if p.over {
            next = next.min(end_at);
        }
        if !p.answered && !never_give_up {
            // Looked at every 10 ms until something answers.
            next = next.min(now + 10_000_000);
        }
        if next != u64::MAX && (next < p.next_poll || p.next_poll <= now) {
            p.next_poll = next;
            self.heap.push(Reverse((next, path)));
        }
    }

    /// Ends a path: the receiver and sender let it go, the handle hears how it ended.
    fn end(&mut self, path: u32, how: PathEnd) {
        let Some(p) = self.paths.get_mut(path as usize).and_then(Option::take) else {
            return;
        };
        self.live -= 1;
        self.rate = (self.rate - rate(p.timing.interval_ns)).max(0.0);
        let core = self.core;
        if !p.over {
            core.tell_sender(SendCmd::Remove { path });
        }
        let target = canonical(p.timing.target);
        let _ = core.to_receiver.send(RecvCmd::Remove {
            sock: p.sock,
            target,
            path,
        });
        core.release(p.sock, target, p.ssid);
        let _ = p.done.send(how);
    }

    /// Asks the sender to stop `path`; it ends once its last probes had their time.
    fn stop_path(&mut self, path: u32) {
        if let Some(Some(p)) = self.paths.get_mut(path as usize)
            && !p.stop_asked
        {
            p.stop_asked = true;
            self.core.tell_sender(SendCmd::Remove { path });
        }
    }

    /// Ends every path now (the engine stops): each gets its last windows.
    fn finish_all(&mut self) {
        for i in 0..self.paths.len() {
            if let Some(p) = self.paths[i].as_mut() {
                p.tracker.finish(sys::realtime_ns());
                for w in p.tracker.take_closed() {
                    deliver(p, w);
                }
                let windows = std::mem::take(&mut p.windows);
                p.over = true;
                self.end(u32::try_from(i).unwrap_or(u32::MAX), Ok(windows));
            }
        }
    }
}

/// A closed window to its path's sink (and kept, when the sink wants the windows back).
fn deliver<S: ?Sized + Sink>(p: &mut AggPath<S>, w: WindowStats) {
    if p.sink.keeps_windows() {
        p.sink.window(&w);
        p.windows.push(w);
    } else {
        p.sink.window_owned(w);
    }
}

// ---------------------------------------------------------------------------------------
// The engine for many paths, and one path alone.

/// A sink the engine may run on its aggregator thread.
pub type BoxedSink<'s> = Box<dyn Sink + Send + 's>;

enum AggCmd<'s> {
    Add {
        path: u32,
        p: Box<AggPath<dyn Sink + Send + 's>>,
    },
    Stop {
        path: u32,
    },
}

/// The agent's engine: its threads run in `'s`, for any number of paths.
pub struct Engine<'s> {
    core: Arc<Core>,
    to_agg: mpsc::Sender<AggCmd<'s>>,
    threads: Vec<ScopedJoinHandle<'s, ()>>,
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl<'s> Engine<'s> {
    /// Starts the engine's three threads in `scope`, with rings of `ring` records
    /// ([`ring_for_rate`]).
    pub fn start<'e>(scope: &'s Scope<'s, 'e>, ring: usize) -> Self {
        let (core, inboxes) = Core::new(ring);
        let core = Arc::new(core);
        let (to_agg, agg_rx) = mpsc::channel::<AggCmd<'s>>();
        let mut threads = Vec::new();
        let c = Arc::clone(&core);
        let Inboxes {
            sender: s_rx,
            receiver: r_rx,
        } = inboxes;
        let t = thread::Builder::new()
            .name("probe-send".to_string())
            .spawn_scoped(scope, move || sender(&c, &s_rx));
        if let Ok(t) = t {
            let _ = core.sender.set(t.thread().clone());
            threads.push(t);
        }
        let c = Arc::clone(&core);
        if let Ok(t) = thread::Builder::new()
            .name("probe-recv".to_string())
            .spawn_scoped(scope, move || receiver(&c, &r_rx))
        {
            threads.push(t);
        }
        let c = Arc::clone(&core);
        if let Ok(t) = thread::Builder::new()
            .name("probe-agg".to_string())
            .spawn_scoped(scope, move || {
                let mut agg = Aggregator::<dyn Sink + Send + 's>::new(&c);
                while !c.stop.load(Ordering::Relaxed) {
                    agg.pass(&mut |a| {
                        while let Ok(cmd) = agg_rx.try_recv() {
                            match cmd {
                                AggCmd::Add { path, p } => a.add(path, *p),
                                AggCmd::Stop { path } => a.stop_path(path),
                            }
                        }
                    });
                    thread::sleep(agg.pause());
                }
                agg.finish_all();
            })
        {
            threads.push(t);
        }
        Self {
            core,
            to_agg,
            threads,
        }
    }

    /// Adds a STAMP path; `sink` (made once the path is open, from what it learned) takes
    /// its windows on the engine's aggregator thread. The other paths are not disturbed.
    pub fn add(
        &self,
        cfg: &ProbeConfig,
        sink: impl FnOnce(&PathInfo) -> BoxedSink<'s>,
    ) -> Result<PathHandle> {
        let opened = self.core.open_path(cfg, None)?;
        let path = opened.path;
        let info = opened.info;
        let key = opened.key.clone();
        let (done_tx, done) = mpsc::channel();
        let (agg, start) = opened.split(sink(&info), done_tx);
        let _ = self.to_agg.send(AggCmd::Add {
            path,
            p: Box::new(agg),
        });
        self.core.tell_sender(start);
        Ok(PathHandle {
            id: path,
            info,
            done,
            key,
            late_timeout: Duration::from_nanos(cfg.late_timeout_ns),
        })
    }

    /// Stops a path: its probes in flight get their late timeout, its last windows go to
    /// its sink, then its handle says it ended.
    pub fn stop_path(&self, id: u32) {
        let _ = self.to_agg.send(AggCmd::Stop { path: id });
    }

    /// Datagrams no path could be credited with, so far.
    pub fn stray(&self) -> u64 {
        self.core.stray.load(Ordering::Relaxed)
    }

    /// Stops the engine: every path still running ends with the windows it has.
    pub fn shutdown(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.core.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.core.sender.get() {
            t.unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let (stray, stamps) = (
            self.core.stray.load(Ordering::Relaxed),
            self.core.stamp_drops.load(Ordering::Relaxed),
        );
        if stray + stamps > 0 {
            tracing::warn!(
                stray,
                stamp_drops = stamps,
                "the probe engine stopped: datagrams no path could be credited with, and transmit stamps a full ring dropped (those probes kept the send time the sender read)"
            );
        }
    }
}

impl Drop for Engine<'_> {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A path's socket (and a `tcp-syn` path's flow) opened ahead of its run by [`open_one`].
#[derive(Debug)]
pub struct Prepared {
    tr: Arc<Transport>,
    syn: Option<Arc<SynFlow>>,
    pub info: PathInfo,
}

/// Opens the socket one path alone will use (`probe`, a drill's streams, a capacity
/// test's RTT): errors in the settings or the pinning come out now, and what it learned
/// labels the run before it starts.
pub fn open_one(cfg: &ProbeConfig) -> Result<Prepared> {
    cfg.validate()?;
    let tr = Arc::new(Transport::open(0, cfg)?);
    let (local, syn) = path_local(cfg, &tr)?;
    let info = PathInfo {
        local,
        timestamping: tr.timestamping,
        sent_ttl: tr.sent_ttl(cfg),
    };
    Ok(Prepared { tr, syn, info })
}

/// A sink borrowed for the length of one run.
struct Borrowed<'a>(&'a mut dyn Sink);

impl Sink for Borrowed<'_> {
    fn window(&mut self, w: &WindowStats) {
        self.0.window(w);
    }
    fn window_owned(&mut self, w: WindowStats) {
        self.0.window_owned(w);
    }
    fn probes(&mut self, decided: &[super::session::Decided]) {
        self.0.probes(decided);
    }
    fn wants_probes(&self) -> bool {
        self.0.wants_probes()
    }
    fn compact_windows(&self) -> bool {
        self.0.compact_windows()
    }
    fn finished(&self) -> bool {
        self.0.finished()
    }
    fn keeps_windows(&self) -> bool {
        self.0.keeps_windows()
    }
}

/// Runs one path on the engine, on the socket [`open_one`] opened, until its schedule
/// ends, `stop` is set or its sink is finished; the aggregator is the caller's thread.
/// Returns its windows (when the sink keeps them).
pub fn run_one(
    prepared: &Prepared,
    cfg: &ProbeConfig,
    stop: &AtomicBool,
    sink: &mut dyn Sink,
) -> Result<Vec<WindowStats>> {
    let (core, inboxes) = Core::new(ring_for_rate(rate(cfg.interval_ns)));
    let Inboxes {
        sender: s_rx,
        receiver: r_rx,
    } = inboxes;
    let opened = core.open_path(cfg, Some(prepared))?;
    let path = opened.path;
    let (done_tx, done) = mpsc::channel();
    let sink: Box<dyn Sink + '_> = Box::new(Borrowed(sink));
    let (agg_path, start) = opened.split(sink, done_tx);
    let core = &core;
    thread::scope(|s| {
        let send = thread::Builder::new()
            .name("probe-send".to_string())
            .spawn_scoped(s, move || sender(core, &s_rx))
            .map_err(io_err("start the sender thread"))?;
        let _ = core.sender.set(send.thread().clone());
        let recv = thread::Builder::new()
            .name("probe-recv".to_string())
            .spawn_scoped(s, move || receiver(core, &r_rx));
        let recv = match recv {
            Ok(r) => r,
            Err(e) => {
                core.stop.store(true, Ordering::Relaxed);
                send.thread().unpark();
                return Err(io_err("start the receiver thread")(e));
            }
        };
        let mut agg = Aggregator::<dyn Sink + '_>::new(core);
        agg.add(path, agg_path);
        core.tell_sender(start);
        let result = loop {
            agg.pass(&mut |_| {});
            if let Ok(end) = done.try_recv() {
                break end;
            }
            if stop.load(Ordering::Relaxed) {
                agg.stop_path(path);
            }
            thread::sleep(agg.pause());
        };
        core.stop.store(true, Ordering::Relaxed);
        send.thread().unpark();
        let _ = send.join();
        let _ = recv.join();
        result
    })
}

#[cfg(test)]
mod tests {
    //! Loopback tests against in-process reflectors.
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use std::sync::atomic::AtomicBool;

    use pathprobe_proto::report::Counters;

    use super::*;
    use crate::reflector::{self, Admission, ReflectorConfig, ReflectorStats, ReplyDscp};

    const MS: u64 = 1_000_000;

    /// A reflector on an ephemeral loopback port, answering until `stop`.
    fn reflect<'s>(
        s: &'s Scope<'s, '_>,
        stop: &'s AtomicBool,
        stats: &'s ReflectorStats,
    ) -> SocketAddr {
        let sock = reflector::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let cfg = ReflectorConfig {
            listen: addr,
            keys: None,
            stateful: false,
            max_rate_per_source: 0,
            timestamp_format: TimestampFormat::Ntp,
            reply_dscp: ReplyDscp::Copy,
            admission: Admission::default(),
            refuse_replays: false,
            capacity: None,
        };
        s.spawn(move || reflector::run(&sock, &cfg, stop, stats));
        addr
    }

    fn path(target: SocketAddr, ssid: u16, interval_ns: u64, count: u64) -> ProbeConfig {
        ProbeConfig {
            protocol: ProbeProtocol::Stamp,
            target,
            bind: None,
            interface: None,
            fwmark: None,
            interval_ns,
            count: Some(count),
            duration_ns: None,
            size: crate::probe::default_size(Mode::Unauthenticated),
            dscp: 0,
            ttl: None,
            key: None,
            window_ns: 500 * MS,
            late_timeout_ns: 500 * MS,
            no_reply_ns: u64::MAX,
            ssid,
            route_each_probe: false,
        }
    }

    /// Sets its flag when dropped: a failing test's reflectors stop, so the scope ends
    /// and the failure is reported, not waited on for ever.
    struct StopOnDrop<'a>(&'a AtomicBool);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// Collects a path's windows.
    struct Collect(Arc<Mutex<Vec<WindowStats>>>);

    impl Sink for Collect {
        fn window(&mut self, w: &WindowStats) {
            self.0.lock().unwrap().push(w.clone());
        }
        fn keeps_windows(&self) -> bool {
            false
        }
    }

    /// Every window's counters of a path, added up.
    fn total(windows: &Mutex<Vec<WindowStats>>) -> Counters {
        let mut c = Counters::default();
        for w in windows.lock().unwrap().iter() {
            let w = &w.counters;
            c.sent += w.sent;
            c.received += w.received;
            c.lost += w.lost;
            c.late += w.late;
            c.duplicated += w.duplicated;
            c.malformed += w.malformed;
            c.send_slots_missed += w.send_slots_missed;
            c.bytes_received += w.bytes_received;
        }
        c
    }

    /// A path's windows, as its `Collect` sink keeps them.
    type Windows = Arc<Mutex<Vec<WindowStats>>>;

    /// Adds each config as a path, each collecting its windows.
    fn add_all(engine: &Engine<'_>, cfgs: &[ProbeConfig]) -> (Vec<PathHandle>, Vec<Windows>) {
        let mut handles = Vec::new();
        let mut windows = Vec::new();
        for c in cfgs {
            let w = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&w);
            handles.push(engine.add(c, |_| Box::new(Collect(sink))).unwrap());
            windows.push(w);
        }
        (handles, windows)
    }

    /// Adds each config as a path, waits for all to end; their windows.
    fn run_paths(engine: &Engine<'_>, cfgs: &[ProbeConfig]) -> Vec<Windows> {
        let (handles, out) = add_all(engine, cfgs);
        let ports: HashSet<u16> = handles.iter().map(|h| h.info.local.port()).collect();
        let sockets = engine.core.sockets.lock().unwrap().iter().flatten().count();
        assert_eq!(ports.len(), sockets, "one local port per socket");
        if cfgs
            .iter()
            .map(|c| (c.target, c.ssid))
            .collect::<HashSet<_>>()
            .len()
            == cfgs.len()
        {
            assert_eq!(
                sockets, 1,
                "paths pinned alike, told apart by far end and SSID, share one socket"
            );
        }
        for h in &handles {
            let end = h.wait(Duration::from_mins(1)).expect("the path ended");
            end.unwrap();
        }
        out
    }

    #[test]
    fn two_hundred_paths_on_one_socket_each_count_exactly() {
        let (stop, stats) = (AtomicBool::new(false), ReflectorStats::default());
        thread::scope(|s| {
            let target = reflect(s, &stop, &stats);
            let _stop = StopOnDrop(&stop);
            let engine = Engine::start(s, ring_for_rate(200.0 * 50.0));
            let cfgs: Vec<_> = (0..200u16)
                .map(|i| path(target, i + 1, 20 * MS, 50))
                .collect();
            let windows = run_paths(&engine, &cfgs);
            assert_eq!(
                engine.core.sockets.lock().unwrap().iter().flatten().count(),
                0,
                "every socket closed with its last path"
            );
            let (mut received, mut sent) = (0, 0);
            for (i, w) in windows.iter().enumerate() {
                let c = total(w);
                assert_eq!(c.sent + c.send_slots_missed, 50, "path {i}: {c:?}");
                assert_eq!(c.sent, c.received + c.lost, "path {i}: {c:?}");
                assert_eq!(
                    (c.duplicated, c.late, c.malformed),
                    (0, 0, 0),
                    "path {i}: {c:?}"
                );
                received += c.received;
                sent += c.sent;
            }
            // Loopback: a lost probe here would be a bug, not the network.
            assert_eq!(received, sent, "{}", stats.line());
            assert_eq!(engine.stray(), 0);
            engine.shutdown();
            stop.store(true, Ordering::Relaxed);
        });
    }

    #[test]
    fn paths_added_while_the_receiver_sleeps_get_their_first_answers() {
        // One slow path keeps the receiver on its longest span (10 ms between reads);
        // paths added while it sleeps send their first probes 2 ms later, and the answers
        // are waiting when it wakes: each must be credited, none counted as stray.
        let (stop, stats) = (AtomicBool::new(false), ReflectorStats::default());
        thread::scope(|s| {
            let target = reflect(s, &stop, &stats);
            let _stop = StopOnDrop(&stop);
            let engine = Engine::start(s, RING_MIN);
            let slow = engine
                .add(&path(target, 1, 100 * MS, 40), |_| {
                    Box::new(Collect(Arc::default()))
                })
                .unwrap();
            assert_eq!(recv_coalesce_ns(rate(100 * MS)), RECV_COALESCE_NS.1);
            thread::sleep(Duration::from_millis(300));
            for round in 0..5u16 {
                let cfgs: Vec<_> = (0..20u16)
                    .map(|i| path(target, 100 + round * 20 + i, 100 * MS, 3))
                    .collect();
                for (i, w) in run_paths(&engine, &cfgs).iter().enumerate() {
                    let c = total(w);
                    assert_eq!(
                        (c.sent, c.received, c.lost),
                        (3, 3, 0),
                        "round {round} path {i}"
                    );
                }
            }
            assert_eq!(engine.stray(), 0);
            engine.stop_path(slow.id);
            slow.wait(Duration::from_secs(10)).unwrap().unwrap();
            engine.shutdown();
            stop.store(true, Ordering::Relaxed);
        });
    }

    #[test]
    fn paths_sharing_a_socket_and_far_end_and_ssid_get_sockets_of_their_own() {
        let (stop, stats) = (AtomicBool::new(false), ReflectorStats::default());
        thread::scope(|s| {
            let target = reflect(s, &stop, &stats);
            let engine = Engine::start(s, RING_MIN);
            let cfgs = [path(target, 5, 10 * MS, 30), path(target, 5, 10 * MS, 30)];
            let (handles, windows) = add_all(&engine, &cfgs);
            assert_ne!(handles[0].info.local.port(), handles[1].info.local.port());
            for h in &handles {
                h.wait(Duration::from_secs(30)).unwrap().unwrap();
            }
            for w in &windows {
                let c = total(w);
                assert_eq!((c.sent, c.received, c.duplicated), (30, 30, 0), "{c:?}");
            }
            engine.shutdown();
            stop.store(true, Ordering::Relaxed);
        });
    }

    #[test]
    fn replies_are_never_credited_to_the_wrong_path() {
        // Two reflectors answer the same SSID and the same sequence numbers; the two paths
        // share one socket and differ in size, so a reply credited to the wrong path would
        // show in its octets, or as a duplicate.
        let (stop, stats_a, stats_b) = (
            AtomicBool::new(false),
            ReflectorStats::default(),
            ReflectorStats::default(),
        );
        thread::scope(|s| {
            let a = reflect(s, &stop, &stats_a);
            let b = reflect(s, &stop, &stats_b);
            let engine = Engine::start(s, RING_MIN);
            let mut big = path(b, 7, 5 * MS, 80);
            big.size = 300;
            let cfgs = [path(a, 7, 2 * MS, 200), big];
            let windows = run_paths(&engine, &cfgs);
            let (small, large) = (total(&windows[0]), total(&windows[1]));
            assert_eq!(
                (small.sent, small.received, small.duplicated, small.late),
                (200, 200, 0, 0)
            );
            assert_eq!(
                (large.sent, large.received, large.duplicated, large.late),
                (80, 80, 0, 0)
            );
            assert_eq!(small.bytes_received, 200 * cfgs[0].size as u64);
            assert_eq!(large.bytes_received, 80 * 300);
            engine.shutdown();
            stop.store(true, Ordering::Relaxed);
        });
    }

    #[test]
    fn a_reflector_going_silent_changes_no_other_paths_figures() {
        let (stop_a, stop_b) = (AtomicBool::new(false), AtomicBool::new(false));
        let (stats_a, stats_b) = (ReflectorStats::default(), ReflectorStats::default());
        thread::scope(|s| {
            let a = reflect(s, &stop_a, &stats_a);
            let b = reflect(s, &stop_b, &stats_b);
            let engine = Engine::start(s, RING_MIN);
            let mut cfgs: Vec<_> = (0..10u16).map(|i| path(a, i, 10 * MS, 150)).collect();
            cfgs.push(path(b, 0, 10 * MS, 150));
            let (handles, windows) = add_all(&engine, &cfgs);
            // B's reflector stops halfway through.
            thread::sleep(Duration::from_millis(750));
            stop_b.store(true, Ordering::Relaxed);
            for h in &handles {
                h.wait(Duration::from_secs(30)).unwrap().unwrap();
            }
            for (i, w) in windows[..10].iter().enumerate() {
                let c = total(w);
                assert_eq!(
                    (c.sent, c.received, c.lost),
                    (150, 150, 0),
                    "path {i}: {c:?}"
                );
            }
            let silent = total(&windows[10]);
            assert_eq!(silent.sent, 150);
            assert!(silent.lost > 30 && silent.received > 30, "{silent:?}");
            assert_eq!(silent.sent, silent.received + silent.lost);
            engine.shutdown();
            stop_a.store(true, Ordering::Relaxed);
        });
    }

    /// A TCP listener on an ephemeral loopback port; its connections are accepted and
    /// dropped until `stop`, so its backlog never fills.
    fn listen<'s>(s: &'s Scope<'s, '_>, stop: &'s AtomicBool) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if l.accept().is_err() {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        addr
    }

    /// A loopback port nothing listens on (an RST answers every SYN).
    fn closed_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn tcp_path(
        protocol: ProbeProtocol,
        target: SocketAddr,
        ssid: u16,
        interval_ns: u64,
        count: u64,
    ) -> ProbeConfig {
        ProbeConfig {
            protocol,
            ..path(target, ssid, interval_ns, count)
        }
    }

    /// Runs `cfgs` (the last to a closed port, the rest to a listener) on one engine with
    /// STAMP paths beside them, and checks every path's counts: each TCP kind shares the
    /// engine's three threads and timetable, and no answer is credited to another path.
    fn tcp_paths_count_exactly(protocol: ProbeProtocol) {
        let (stop, stats) = (AtomicBool::new(false), ReflectorStats::default());
        thread::scope(|s| {
            let target = listen(s, &stop);
            let reflector = reflect(s, &stop, &stats);
            let _stop = StopOnDrop(&stop);
            let engine = Engine::start(s, ring_for_rate(60.0 * 50.0));
            let mut cfgs: Vec<_> = (0..40u16)
                .map(|i| tcp_path(protocol, target, i + 1, 20 * MS, 40))
                .collect();
            cfgs.push(tcp_path(protocol, closed_port(), 41, 20 * MS, 40));
            cfgs.extend((0..20u16).map(|i| path(reflector, i + 1, 20 * MS, 40)));
            let (handles, windows) = add_all(&engine, &cfgs);
            if protocol == ProbeProtocol::TcpSyn {
                let raw = engine
                    .core
                    .sockets
                    .lock()
                    .unwrap()
                    .iter()
                    .flatten()
                    .filter(|e| e.tr.key.wire == Wire::Syn)
                    .count();
                assert_eq!(raw, 1, "tcp-syn paths pinned alike share one raw socket");
            }
            for h in &handles {
                h.wait(Duration::from_mins(1))
                    .expect("the path ended")
                    .unwrap();
            }
            for (i, (c, w)) in cfgs.iter().zip(&windows).enumerate() {
                let t = total(w);
                let refused: u64 = w.lock().unwrap().iter().map(|w| w.counters.refused).sum();
                assert_eq!(t.sent + t.send_slots_missed, 40, "path {i}: {t:?}");
                assert_eq!(
                    t.sent, t.received,
                    "path {i} (loopback loses nothing): {t:?}"
                );
                assert_eq!(
                    (t.duplicated, t.late, t.malformed),
                    (0, 0, 0),
                    "path {i}: {t:?}"
                );
                let to_closed = i == 40;
                let want_refused = if to_closed { t.received } else { 0 };
                assert_eq!(refused, want_refused, "path {i} to {}: {t:?}", c.target);
            }
            assert_eq!(engine.stray(), 0);
            engine.shutdown();
            stop.store(true, Ordering::Relaxed);
        });
    }

    #[test]
    fn tcp_connect_paths_run_on_the_shared_engine_and_each_count_exactly() {
        tcp_paths_count_exactly(ProbeProtocol::TcpConnect);
    }

    #[test]
    #[ignore = "needs root: raw sockets (CI runs it as root)"]
    fn root_tcp_syn_paths_share_one_raw_socket_and_each_count_exactly() {
        let root = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
        if !root {
            eprintln!("SKIPPED: tcp-syn needs CAP_NET_RAW; CI runs it as root");
            return;
        }
        tcp_paths_count_exactly(ProbeProtocol::TcpSyn);
    }
}
