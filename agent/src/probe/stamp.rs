//! STAMP probes: the Session-Sender of RFC 8762 on the [`crate::engine`].
//!
//! ```text
//! sender thread --sendmmsg--> socket --> reflector --> socket --recvmmsg--> receiver thread
//!      | TxEvent (Sent / Failed / Missed)                  RxEvent (TxStamp / Reply) |
//!      +-----------> ArrayQueue ----> aggregator (caller's thread) <---- ArrayQueue <--+
//!                                      Tracker: windows, histograms, counters
//! ```
//!
//! The sender keeps the engine's isochronous schedule (absolute deadlines, sleep to just
//! before the deadline with 1 ns timer slack, then spin), sends every due probe in one
//! batch, and skips (counting them) only slots it reaches more than half the late timeout
//! too late. The receiver verifies each answer whole before it counts, and dates it by its
//! kernel receive stamp.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use pathprobe_proto::report::Timestamping;
use pathprobe_proto::stamp::tlv::{ClassOfService, HEADER_LEN, TlvIter, TlvWriter, tlv_type};
use pathprobe_proto::stamp::{
    AuthKey, ErrorEstimate, Mode, ReflectorPacket, ReflectorRepr, SenderPacket, SenderRepr,
    TimestampFormat,
};
use socket2::{Domain, Protocol, Socket, Type};

use super::{COS_TLV_LEN, ProbeConfig};
use crate::engine::session::{Marks, Reply, Sent, WindowStats};
use crate::engine::{
    self, Io, RxEvent, Schedule, Shared, Sink, SystemClock, TxEvent, push, push_missed,
};
use crate::sys::{self, BatchClock, RecvBatch, SendBatch};
use crate::{Error, Result};

/// Probes per `sendmmsg`, replies per `recvmmsg`.
const BATCH: usize = 64;

fn io_err(what: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        what: what.to_string(),
        source,
    }
}

/// Opens and pins the probing socket; returns it with its timestamping sources.
pub(super) fn open(cfg: &ProbeConfig) -> Result<(Socket, Timestamping)> {
    let v6 = cfg.target.is_ipv6();
    let sock = Socket::new(
        Domain::for_address(cfg.target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )
    .map_err(io_err("create a UDP socket"))?;
    crate::pin::pin(
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

/// A STAMP session's two I/O threads.
struct StampIo<'a> {
    sock: &'a Socket,
    cfg: &'a ProbeConfig,
    /// The Error Estimate our T1 stamps carry.
    ee: ErrorEstimate,
}

impl Io for StampIo<'_> {
    fn send(&self, start_ns: u64, ring: &ArrayQueue<TxEvent>, shared: &Shared) {
        sender(self.sock, self.cfg, (start_ns, self.ee), ring, shared);
    }

    fn receive(&self, ring: &ArrayQueue<RxEvent>, shared: &Shared) {
        let only_from = self.cfg.route_each_probe.then_some(self.cfg.target);
        let key = self.cfg.key.as_ref();
        receiver(self.sock, (self.cfg.mode(), key, only_from), ring, shared);
    }
}

fn sender(
    sock: &Socket,
    cfg: &ProbeConfig,
    (start_ns, ee): (u64, ErrorEstimate),
    q: &ArrayQueue<TxEvent>,
    shared: &Shared,
) {
    let stop = &shared.stop_tx;
    let mut schedule = Schedule::new(&cfg.timing(), start_ns);
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
        let clock = BatchClock::now();
        // Transmit stamps first: they precede the replies to the probes they time.
        sys::drain_tx_timestamps(sock, |id, ns| {
            push(
                ring,
                RxEvent::TxStamp {
                    id,
                    mono_ns: clock.mono(ns),
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
            let (rx_ns, rx_wall_ns) = clock.arrival(meta.kernel_rx_ns);
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

/// Runs a STAMP session on `sock` until its schedule ends or `stop`.
pub(super) fn run(
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
    let io = StampIo { sock, cfg, ee };
    engine::run(&cfg.timing(), &SystemClock, &io, stop, local_sync, sink)
}
