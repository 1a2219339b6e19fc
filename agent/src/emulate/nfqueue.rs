//! The emulator's engine behind NFQUEUE, for all IP traffic (UDP, TCP and ICMP alike): an
//! iptables rule such as `iptables -A FORWARD -i eth0 -j NFQUEUE --queue-num 0` hands each
//! packet to us; a [`Link`] decides its fate; the kernel is told to drop it at once, or to
//! let it go at its release time (the verdict is held back until then, and verdicts may be
//! given in any order, so jitter can reorder). The packet itself never leaves the kernel: we
//! read its first 64 octets (the IP header, for its length) and send a verdict.
//!
//! Two queues, one per direction, on one netlink socket. One thread receives and releases:
//! it waits (ppoll, to the nanosecond) until the next release time or the next packet, and
//! spins the last stretch while still receiving. Verdicts are batched into one `sendto`.
//!
//! The netlink messages (RFC 3549 framing, `linux/netfilter/nfnetlink_queue.h`) are built
//! and parsed here in safe code; `sys::Netlink` owns the socket. Needs CAP_NET_ADMIN.
//! Duplication cannot be done with a verdict and is refused.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::EmulatorStats;
use super::link::{Fate, Link, LinkConfig};
use crate::sys::{self, Netlink};
use crate::{Error, Result};

/// Octets of each packet copied to us: enough for an IPv4 or IPv6 header.
const COPY_RANGE: u32 = 64;
/// Packets the kernel holds per queue waiting for our verdict.
const QUEUE_MAXLEN: u32 = 65_536;
/// The last stretch before a release time is spun, not slept.
const SPIN_NS: u64 = 200_000;
/// Longest wait, so that a stop request is seen.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Verdicts sent in one `sendto` at most (32 octets each).
const VERDICT_BATCH: usize = 512;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = NFNL_SUBSYS_QUEUE << 8;
const NFQNL_MSG_VERDICT: u16 = (NFNL_SUBSYS_QUEUE << 8) | 1;
const NFQNL_MSG_CONFIG: u16 = (NFNL_SUBSYS_QUEUE << 8) | 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends one nfnetlink message (header, nfgenmsg for `queue`, then `attrs`).
fn put_message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    queue: u16,
    attrs: &[(u16, &[u8])],
) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]); // length, below
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // nfgenmsg: AF_UNSPEC, NFNETLINK_V0, the queue number big-endian.
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&queue.to_be_bytes());
    for (kind, data) in attrs {
        let len = 4 + data.len();
        buf.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(data);
        buf.resize(start + align4(buf.len() - start), 0);
    }
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// A verdict on packet `id` of `queue`.
fn put_verdict(buf: &mut Vec<u8>, queue: u16, id: u32, verdict: u32) {
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&verdict.to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    put_message(
        buf,
        NFQNL_MSG_VERDICT,
        0,
        0,
        queue,
        &[(NFQA_VERDICT_HDR, &hdr)],
    );
}

/// A packet the kernel queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub queue: u16,
    pub id: u32,
    /// Its length on the wire (IP header onwards).
    pub len: usize,
}

/// One message from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    Packet(Queued),
    /// The answer to request `seq`: 0, or a negative errno.
    Ack {
        seq: u32,
        error: i32,
    },
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The length of an IP packet from its header, if the header is there.
fn ip_len(payload: &[u8]) -> Option<usize> {
    let first = *payload.first()?;
    let field = |at: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes(
            payload.get(at..at + 2)?.try_into().ok()?,
        )))
    };
    match first >> 4 {
        4 => field(2),
        6 => Some(40 + field(4)?),
        _ => None,
    }
}

fn parse_packet(queue: u16, mut attrs: &[u8]) -> Option<Queued> {
    let (mut id, mut len, mut cap_len) = (None, None, None);
    while attrs.len() >= 4 {
        let alen = usize::from(ne_u16(attrs, 0)?);
        let kind = ne_u16(attrs, 2)? & NLA_TYPE_MASK;
        if alen < 4 || alen > attrs.len() {
            break;
        }
        let data = &attrs[4..alen];
        match kind {
            NFQA_PACKET_HDR => id = be_u32(data, 0),
            NFQA_PAYLOAD => len = ip_len(data).or(Some(data.len())),
            NFQA_CAP_LEN => cap_len = be_u32(data, 0),
            _ => {}
        }
        attrs = attrs.get(align4(alen)..).unwrap_or_default();
    }
    Some(Queued {
        queue,
        id: id?,
        len: len
            .or_else(|| cap_len.and_then(|c| usize::try_from(c).ok()))
            .unwrap_or(0),
    })
}

/// Every message in one datagram from the kernel; anything malformed ends the walk.
pub fn parse(mut datagram: &[u8], out: &mut Vec<Incoming>) {
    while datagram.len() >= NLMSG_HDRLEN {
        let Some(len) = ne_u32(datagram, 0).and_then(|l| usize::try_from(l).ok()) else {
            return;
        };
        if len < NLMSG_HDRLEN || len > datagram.len() {
            return;
        }
        let (Some(kind), Some(seq)) = (ne_u16(datagram, 4), ne_u32(datagram, 8)) else {
            return;
        };
        let body = &datagram[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_ERROR => {
                if let Some(error) = ne_u32(body, 0) {
                    out.push(Incoming::Ack {
                        seq,
                        error: i32::from_ne_bytes(error.to_ne_bytes()),
                    });
                }
            }
            NFQNL_MSG_PACKET if body.len() >= 4 => {
                let queue = u16::from_be_bytes([body[2], body[3]]);
                if let Some(p) = parse_packet(queue, &body[4..]) {
                    out.push(Incoming::Packet(p));
                }
            }
            _ => {}
        }
        datagram = datagram.get(align4(len)..).unwrap_or_default();
    }
}

/// How the NFQUEUE emulator runs.
#[derive(Debug, Clone)]
pub struct NfqueueConfig {
    /// The queue of the forward direction, and its link.
    pub forward_queue: u16,
    pub forward_link: LinkConfig,
    /// The queue of the reverse direction, and its link.
    pub reverse_queue: u16,
    pub reverse_link: LinkConfig,
    pub seed: u64,
}

/// A packet whose verdict is held until its release time.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Held {
    at_ns: u64,
    /// Arrival order: equal times keep it.
    n: u64,
    queue: u16,
    id: u32,
}

/// The emulator bound to its two queues.
#[derive(Debug)]
pub struct NfqueueEmulator {
    cfg: NfqueueConfig,
    nl: Netlink,
    seq: u32,
    /// Packets that arrived while we were still configuring.
    early: Vec<Queued>,
}

impl NfqueueEmulator {
    /// Opens the netlink socket and binds both queues.
    pub fn bind(cfg: NfqueueConfig) -> Result<Self> {
        if cfg.forward_queue == cfg.reverse_queue {
            return Err(Error::Config(
                "--nfqueue needs two different queues, FORWARD,REVERSE (like 0,1)".to_string(),
            ));
        }
        if cfg.forward_link.duplicate > 0.0 || cfg.reverse_link.duplicate > 0.0 {
            return Err(Error::Config(
                "dup= cannot be emulated behind NFQUEUE (a verdict cannot copy a packet); use --listen/--forward for duplication".to_string(),
            ));
        }
        let nl = Netlink::open_netfilter().map_err(|source| Error::Io {
            what: "open a netfilter netlink socket".to_string(),
            source,
        })?;
        let mut em = Self {
            cfg,
            nl,
            seq: 0,
            early: Vec::new(),
        };
        for queue in [em.cfg.forward_queue, em.cfg.reverse_queue] {
            em.configure(queue, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])
                .map_err(|e| bind_error(queue, &e))?;
            let mut params = [0u8; 5];
            params[..4].copy_from_slice(&COPY_RANGE.to_be_bytes());
            params[4] = NFQNL_COPY_PACKET;
            em.configure(queue, NFQA_CFG_PARAMS, &params)
                .map_err(|e| bind_error(queue, &e))?;
            em.configure(queue, NFQA_CFG_QUEUE_MAXLEN, &QUEUE_MAXLEN.to_be_bytes())
                .map_err(|e| bind_error(queue, &e))?;
        }
        Ok(em)
    }

    /// Sends one config request and waits for its answer.
    fn configure(&mut self, queue: u16, attr: u16, data: &[u8]) -> io::Result<()> {
        self.seq += 1;
        let seq = self.seq;
        let mut msg = Vec::with_capacity(64);
        put_message(
            &mut msg,
            NFQNL_MSG_CONFIG,
            NLM_F_ACK,
            seq,
            queue,
            &[(attr, data)],
        );
        self.nl.send(&msg)?;
        let mut buf = vec![0u8; 65_536];
        let mut got = Vec::new();
        let deadline = sys::monotonic_ns() + 2_000_000_000;
        while sys::monotonic_ns() < deadline {
            if !self.nl.wait_readable(MAX_WAIT)? {
                continue;
            }
            let n = match self.nl.recv_now(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            got.clear();
            parse(&buf[..n.min(buf.len())], &mut got);
            let mut answer = None;
            for m in &got {
                match *m {
                    Incoming::Ack { seq: s, error } if s == seq => answer = Some(error),
                    Incoming::Packet(p) => self.early.push(p),
                    Incoming::Ack { .. } => {}
                }
            }
            if let Some(error) = answer {
                return if error == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-error))
                };
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the kernel did not answer within 2 s",
        ))
    }

    /// Emulates until `stop` is set; then lets every held packet go and unbinds.
    pub fn run(&mut self, stop: &AtomicBool, stats: &EmulatorStats) -> Result<()> {
        let _ = sys::lower_timer_slack();
        let start = sys::monotonic_ns();
        let mut forward = Link::new(self.cfg.forward_link.clone(), start, self.cfg.seed);
        let mut reverse = Link::new(
            self.cfg.reverse_link.clone(),
            start,
            self.cfg.seed ^ 0x9e37_79b9,
        );
        let mut held: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
        let mut arrivals = 0u64;
        let mut verdicts = Vec::with_capacity(VERDICT_BATCH * 32);
        let mut buf = vec![0u8; 65_536];
        let mut incoming = Vec::new();
        let fwd_queue = self.cfg.forward_queue;
        let early = std::mem::take(&mut self.early);
        let mut admit =
            |p: Queued, verdicts: &mut Vec<u8>, held: &mut BinaryHeap<Reverse<Held>>| {
                let link = if p.queue == fwd_queue {
                    &mut forward
                } else {
                    &mut reverse
                };
                match link.admit(sys::monotonic_ns(), p.len) {
                    Fate::Released { at_ns, .. } => {
                        arrivals += 1;
                        held.push(Reverse(Held {
                            at_ns,
                            n: arrivals,
                            queue: p.queue,
                            id: p.id,
                        }));
                    }
                    Fate::Dropped(_) => {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        put_verdict(verdicts, p.queue, p.id, NF_DROP);
                    }
                }
            };
        for p in early {
            admit(p, &mut verdicts, &mut held);
        }
        let result = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            // Let go of what is due.
            let now = sys::monotonic_ns();
            while held.peek().is_some_and(|Reverse(h)| h.at_ns <= now) {
                let Some(Reverse(h)) = held.pop() else { break };
                let counter = if h.queue == fwd_queue {
                    &stats.forwarded
                } else {
                    &stats.returned
                };
                counter.fetch_add(1, Ordering::Relaxed);
                stats.note_release(now.saturating_sub(h.at_ns));
                put_verdict(&mut verdicts, h.queue, h.id, NF_ACCEPT);
                if verdicts.len() >= VERDICT_BATCH * 32 {
                    self.flush(&mut verdicts);
                }
            }
            self.flush(&mut verdicts);
            // Take in what has arrived.
            match self.receive(&mut buf, &mut incoming) {
                Ok(()) => {}
                Err(e) => break Err(e),
            }
            for m in incoming.drain(..) {
                if let Incoming::Packet(p) = m {
                    admit(p, &mut verdicts, &mut held);
                }
            }
            if !verdicts.is_empty() {
                continue;
            }
            // Wait for the next release time or packet; spin the last stretch.
            let next = held.peek().map(|Reverse(h)| h.at_ns);
            let now = sys::monotonic_ns();
            match next {
                Some(at) if at.saturating_sub(now) <= SPIN_NS => std::hint::spin_loop(),
                Some(at) => {
                    let wait = Duration::from_nanos(at - now - SPIN_NS).min(MAX_WAIT);
                    let _ = self.nl.wait_readable(wait);
                }
                None => {
                    let _ = self.nl.wait_readable(MAX_WAIT);
                }
            }
        };
        // Stopping: what is held goes now rather than being dropped with the socket.
        while let Some(Reverse(h)) = held.pop() {
            put_verdict(&mut verdicts, h.queue, h.id, NF_ACCEPT);
            if verdicts.len() >= VERDICT_BATCH * 32 {
                self.flush(&mut verdicts);
            }
        }
        self.flush(&mut verdicts);
        for queue in [self.cfg.forward_queue, self.cfg.reverse_queue] {
            let _ = self.configure(queue, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0]);
        }
        result
    }

    /// Sends the batched verdicts. A failed send loses those verdicts; the kernel then
    /// keeps the packets until the queue is unbound, so it is logged.
    fn flush(&self, verdicts: &mut Vec<u8>) {
        if verdicts.is_empty() {
            return;
        }
        if let Err(e) = self.nl.send(verdicts) {
            tracing::warn!("sending {} verdicts failed: {e}", verdicts.len() / 32);
        }
        verdicts.clear();
    }

    /// Reads every datagram waiting, without blocking.
    fn receive(&self, buf: &mut [u8], out: &mut Vec<Incoming>) -> Result<()> {
        loop {
            match self.nl.recv_now(buf) {
                Ok(n) => parse(&buf[..n.min(buf.len())], out),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The socket's buffer overflowed: the kernel dropped packets it could not
                // hand us (as a full router buffer would). Go on.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(source) => {
                    return Err(Error::Io {
                        what: "receive from NFQUEUE".to_string(),
                        source,
                    });
                }
            }
        }
    }
}

fn bind_error(queue: u16, e: &io::Error) -> Error {
    let hint = match e.raw_os_error() {
        Some(libc::EPERM) => {
            "binding a queue needs CAP_NET_ADMIN: run as root, or use --listen/--forward (a UDP relay that needs no privileges)"
        }
        Some(libc::EBUSY) => "another program has bound it: choose other queue numbers",
        _ => "is nfnetlink_queue in the kernel?",
    };
    Error::Config(format!("cannot bind NFQUEUE {queue}: {e}; {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet message as the kernel writes it.
    fn kernel_packet(queue: u16, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut hdr = [0u8; 7];
        hdr[..4].copy_from_slice(&id.to_be_bytes());
        hdr[4..6].copy_from_slice(&0x0800u16.to_be_bytes());
        let mut b = Vec::new();
        put_message(
            &mut b,
            NFQNL_MSG_PACKET,
            0,
            0,
            queue,
            &[(NFQA_PACKET_HDR, &hdr), (NFQA_PAYLOAD, payload)],
        );
        b
    }

    #[test]
    fn verdict_message_has_the_kernel_layout() {
        let mut b = Vec::new();
        put_verdict(&mut b, 7, 0x0102_0304, NF_ACCEPT);
        assert_eq!(b.len(), 32);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 0x0301);
        assert_eq!(
            u16::from_ne_bytes(b[6..8].try_into().unwrap()),
            NLM_F_REQUEST
        );
        assert_eq!(
            &b[16..20],
            &[0, 0, 0, 7],
            "AF_UNSPEC, V0, queue 7 big-endian"
        );
        assert_eq!(u16::from_ne_bytes(b[20..22].try_into().unwrap()), 12);
        assert_eq!(
            u16::from_ne_bytes(b[22..24].try_into().unwrap()),
            NFQA_VERDICT_HDR
        );
        assert_eq!(&b[24..32], &[0, 0, 0, 1, 1, 2, 3, 4]);
    }

    #[test]
    fn packets_parse_with_their_ip_length() {
        let mut v4 = [0u8; 64];
        v4[0] = 0x45;
        v4[2..4].copy_from_slice(&1500u16.to_be_bytes());
        let mut v6 = [0u8; 64];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&1000u16.to_be_bytes());
        let mut dgram = kernel_packet(1, 42, &v4);
        dgram.extend(kernel_packet(2, 43, &v6));
        let mut out = Vec::new();
        parse(&dgram, &mut out);
        assert_eq!(
            out,
            [
                Incoming::Packet(Queued {
                    queue: 1,
                    id: 42,
                    len: 1500
                }),
                Incoming::Packet(Queued {
                    queue: 2,
                    id: 43,
                    len: 1040
                }),
            ]
        );
    }

    #[test]
    fn errors_parse_as_negative_errno() {
        let mut b = Vec::new();
        b.extend_from_slice(&36u32.to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&9u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        b.extend_from_slice(&[0; 16]);
        let mut out = Vec::new();
        parse(&b, &mut out);
        assert_eq!(
            out,
            [Incoming::Ack {
                seq: 9,
                error: -libc::EPERM
            }]
        );
    }

    proptest::proptest! {
        /// Whatever the socket hands us, parsing ends without panicking, and every packet
        /// it reports has the length its IP header (or the kernel) gave.
        #[test]
        fn any_datagram_parses_without_panicking(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut out = Vec::new();
            parse(&data, &mut out);
            proptest::prop_assert!(out.len() <= data.len() / NLMSG_HDRLEN);
        }

        /// A packet message with any payload parses to its id and queue.
        #[test]
        fn any_packet_keeps_its_id(queue in proptest::prelude::any::<u16>(), id in proptest::prelude::any::<u32>(),
                                   payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            let mut out = Vec::new();
            parse(&kernel_packet(queue, id, &payload), &mut out);
            proptest::prop_assert_eq!(out.len(), 1);
            let Incoming::Packet(p) = out[0] else {
                return Err(proptest::test_runner::TestCaseError::fail("not a packet"));
            };
            proptest::prop_assert_eq!((p.queue, p.id), (queue, id));
        }
    }

    #[test]
    fn malformed_datagrams_end_the_walk_without_panicking() {
        let good = kernel_packet(1, 5, &[0x45, 0, 0, 60]);
        let mut out = Vec::new();
        for cut in 0..good.len() {
            out.clear();
            parse(&good[..cut], &mut out);
            assert!(out.is_empty(), "a packet cut at {cut} parsed");
        }
        // A length field pointing past the end, a zero length, an attribute too long.
        for (at, v) in [(0usize, 0xffffu32), (0, 0), (20, 0xff)] {
            let mut bad = good.clone();
            bad[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            out.clear();
            parse(&bad, &mut out);
        }
        // Every single-octet change parses or not, never panics.
        for i in 0..good.len() {
            for x in [0u8, 0xff, 0x80] {
                let mut bad = good.clone();
                bad[i] = x;
                out.clear();
                parse(&bad, &mut out);
            }
        }
    }
}
