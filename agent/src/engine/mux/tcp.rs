//! The TCP kinds' side of the shared engine: the raw socket `tcp-syn` paths share, the
//! answers read from it, and the `tcp-connect` connections the sender starts and hands to
//! the receiver. The segments and sockets themselves are [`crate::probe::tcp`]'s.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use pathprobe_proto::report::{TimestampSource, Timestamping};
use socket2::SockAddr;

use super::{
    Core, Due, PathShared, PinKey, RecvSock, RxRec, SendPath, Transport, TxRec, charge,
    count_malformed, drop_against, each_datagram, push_rx, push_tx,
};
use crate::engine::session::{Marks, Reply, Sent};
use crate::probe::ProbeConfig;
use crate::probe::tcp::{self, SYN_LEN};
use crate::sys::{self, Bell, RecvBatch};
use crate::{Error, Result};

/// Connections the handoff holds between two of the receiver's wake-ups, at most: a
/// receiver woken by the bell takes them at once, so this is a second at 4,000/s.
const HANDOFF: usize = 1 << 12;
/// How long past its late timeout a connection is kept: the tracker has called the probe
/// lost by then.
const GIVE_UP_AFTER_NS: u64 = 100_000_000;

/// Opens the raw socket `tcp-syn` paths pinned like `cfg` share.
pub(super) fn open_syn_transport(id: u32, key: PinKey, cfg: &ProbeConfig) -> Result<Transport> {
    tcp::syn_target(cfg.target)?;
    let bind = match key.bind {
        Some(SocketAddr::V4(b)) => Some(*b.ip()),
        Some(SocketAddr::V6(_)) => {
            return Err(Error::Config(
                "--bind must be IPv4 for an IPv4 target".to_string(),
            ));
        }
        None => None,
    };
    let (raw, rx) = tcp::open_raw(cfg, bind)?;
    let default_ttl = raw.ttl_v4().ok().and_then(|t| u8::try_from(t).ok());
    Ok(Transport {
        id,
        key,
        sock: Some(raw),
        // The SYN leaves from a raw socket: the sender's clock dates it.
        timestamping: Timestamping {
            rx,
            tx: TimestampSource::Userspace,
        },
        port: 0,
        default_ttl,
    })
}

/// Reads what the raw socket holds: each SYN-ACK or RST from a path's target to a port of
/// its flow is that path's answer (a SYN-ACK is closed at once with our RST). A raw TCP
/// socket sees every TCP segment the host receives: the rest is not ours, and not counted.
pub(super) fn drain_syn(core: &Core, rs: &RecvSock, batch: &mut RecvBatch) {
    let Some(sock) = rs.tr.sock.as_ref() else {
        return;
    };
    let mut rst = [0u8; SYN_LEN];
    each_datagram(sock, batch, |ip, meta, clock| {
        let Some((from, answer)) = tcp::parse_reply(ip) else {
            return;
        };
        let Some(far) = rs.peers.get(&SocketAddr::V4(from)) else {
            return;
        };
        let Some((peer, flow)) = far.peers.iter().find_map(|p| {
            p.syn
                .as_ref()
                .filter(|f| f.holds(answer.port))
                .map(|f| (p, f))
        }) else {
            return;
        };
        let Some(seq) = flow.seq_of(&answer) else {
            // Not the port that probe left from: not an answer to it.
            count_malformed(core, Some(peer));
            return;
        };
        if !answer.refused {
            // Close the far end's half-open connection now.
            let len = flow.rst(&mut rst, &answer);
            let to = SockAddr::from(SocketAddrV4::new(*from.ip(), 0));
            let _ = sock.send_to(&rst[..len], &to);
        }
        let (rx_ns, rx_wall_ns) = clock.arrival(meta.kernel_rx_ns);
        let reply = Reply {
            seq,
            rx_ns,
            rx_wall_ns,
            t2_wall_ns: 0,
            t3_wall_ns: 0,
            reflector_sync: None,
            bytes: 0,
            far_times: false,
            refused: answer.refused,
            // A TCP answer shows only its own TTL: no far-end TTL or DSCP.
            marks: Marks {
                back_ttl: Some(answer.ttl),
                ..Marks::default()
            },
        };
        let rec = RxRec::Reply {
            path: peer.path,
            reply,
        };
        push_rx(core, rec, Some(peer));
    });
}

/// A `tcp-connect` connection on its way.
#[derive(Debug)]
pub(super) struct InFlight {
    path: u32,
    seq: u32,
    sent_ns: u64,
    give_up_ns: u64,
    sock: socket2::Socket,
    shared: Arc<PathShared>,
}

impl InFlight {
    pub(super) fn pollfd(&self) -> libc::pollfd {
        libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.sock),
            events: libc::POLLOUT,
            revents: 0,
        }
    }
}

/// Connections from the sender to the receiver, and the bell that wakes it for them.
#[derive(Debug)]
pub(super) struct Handoff {
    queue: ArrayQueue<InFlight>,
    pub(super) bell: Bell,
}

impl Handoff {
    pub(super) fn new() -> Result<Self> {
        Ok(Self {
            queue: ArrayQueue::new(HANDOFF),
            bell: Bell::new().map_err(|source| Error::Io {
                what: "create the probe engine's eventfd".to_string(),
                source,
            })?,
        })
    }
}

/// The sender's part of `tcp-connect`: a connection started per due probe, recorded, and
/// handed to the receiver. A socket that cannot be had (out of descriptors) is a slot
/// missed; a record a full ring refused keeps the connection from being watched, and is
/// counted against the path.
pub(super) fn start_connects(
    core: &Core,
    tr: &Transport,
    chunk: &[Due],
    paths: &mut [Option<Box<SendPath>>],
) {
    let Some(handoff) = core.connects.get() else {
        return;
    };
    let mut handed = false;
    for d in chunk {
        let Some(p) = paths.get_mut(d.path as usize).and_then(Option::as_mut) else {
            continue;
        };
        let wall = sys::realtime_ns();
        let sent_ns = sys::monotonic_ns();
        let Ok(sock) = tcp::start_connect(&p.cfg) else {
            let rec = TxRec::Missed {
                path: d.path,
                scheduled_ns: d.scheduled_ns,
                count: 1,
            };
            push_tx(core, paths, d.path, rec);
            continue;
        };
        let seq = p.seq;
        let rec = TxRec::Sent {
            path: d.path,
            sock: tr.id,
            sock_tx_id: seq,
            sent: Sent {
                seq,
                scheduled_ns: d.scheduled_ns,
                sent_ns,
                t1_wall_ns: wall,
                bytes: 0,
            },
        };
        if core.tx_q.push(rec).is_err() {
            // Unrecorded, its answer would match nothing: closed (with an RST) now.
            drop(sock);
            drop_against(core, d.path, paths);
            continue;
        }
        p.seq = p.seq.wrapping_add(1);
        let flight = InFlight {
            path: d.path,
            seq,
            sent_ns,
            give_up_ns: sent_ns
                .saturating_add(p.cfg.late_timeout_ns)
                .saturating_add(GIVE_UP_AFTER_NS),
            sock,
            shared: Arc::clone(&p.shared),
        };
        if let Err(f) = handoff.queue.push(flight) {
            // Recorded but never watched: the tracker will call it lost, and the drop
            // says why.
            charge(core, &f.shared.drops);
        } else {
            handed = true;
        }
    }
    if handed {
        handoff.bell.ring();
    }
}

/// The receiver's side of the bell: every connection handed over joins `flying`.
pub(super) fn take_connects(core: &Core, flying: &mut Vec<InFlight>) {
    let Some(handoff) = core.connects.get() else {
        return;
    };
    handoff.bell.clear();
    while let Some(f) = handoff.queue.pop() {
        flying.push(f);
    }
}

/// The connections the last poll watched (`fds`, in `flying`'s order; those after were
/// handed over since): each finished one is an answer (the kernel's handshake RTT when it
/// has one, else the moment seen; refused when the far end reset it) or nothing
/// (unreachable: the tracker calls it lost); those given up on are closed.
pub(super) fn settle(core: &Core, flying: &mut Vec<InFlight>, fds: &[libc::pollfd]) {
    let now = sys::monotonic_ns();
    let wall = sys::realtime_ns();
    let mut k = 0;
    flying.retain(|f| {
        let ready = fds.get(k).is_some_and(|p| p.revents != 0);
        k += 1;
        if !ready {
            return now < f.give_up_ns;
        }
        if let Some((refused, kernel_rtt_us)) = tcp::connect_outcome(&f.sock) {
            let rx_ns = kernel_rtt_us.map_or(now, |us| f.sent_ns + u64::from(us) * 1000);
            let reply = Reply {
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
            };
            let rec = RxRec::Reply {
                path: f.path,
                reply,
            };
            if core.rx_q.push(rec).is_err() {
                charge(core, &f.shared.drops);
            }
        }
        false
    });
}
