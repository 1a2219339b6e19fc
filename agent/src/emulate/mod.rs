//! `pathprobe-agent emulate`: a user-space UDP path emulator. The kernel here has no
//! `sch_netem`, so delay, jitter, loss and duplication are applied by a relay: senders talk
//! to `--listen`, each sender (flow) gets its own upstream socket to `--forward`, so replies
//! travel back through the relay to the right sender. Each direction is one [`link::Link`]
//! shared by all flows (a single bottleneck, like a real path). The relay keeps each
//! datagram's TOS / traffic class (DSCP and ECN) on the way on, as a path that does not
//! re-mark would.
//!
//! Packets wait in a time-ordered queue and a release thread sends each at its time: a
//! timed wait to just before, then a short spin. The error this adds is measured by the
//! accuracy tests and documented in BENCHMARKS.md.
//!
//! [`nfqueue`] applies the same links to all IP traffic behind iptables NFQUEUE rules,
//! holding each packet's verdict until its release time (the namespace lab uses it).

pub mod link;
pub mod nfqueue;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use link::{Fate, Link, LinkConfig};

use crate::sys;
use crate::{Error, Result};

/// Most senders relayed at once.
const MAX_FLOWS: usize = 1024;
/// Most packets waiting for release.
const MAX_WAITING: usize = 1 << 20;
/// The release thread spins for the last stretch before a packet's time.
const SPIN_NS: u64 = 200_000;

/// How the emulator runs.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub listen: SocketAddr,
    pub forward: SocketAddr,
    /// More (listen, forward) pairs relayed through the same links: other ports of the
    /// same far end (a capacity test's load port) share the path's bottleneck.
    pub also: Vec<(SocketAddr, SocketAddr)>,
    /// Sender to `forward`.
    pub forward_link: LinkConfig,
    /// `forward` back to the sender.
    pub reverse_link: LinkConfig,
    pub seed: u64,
}

/// Lateness (how long after its release time a packet was sent) is counted in powers of
/// two: bucket `k` holds packets sent `2^(k-1)` to `2^k - 1` ns late (bucket 0: on time),
/// the last bucket everything from about a second on.
const LATE_BUCKETS: usize = 32;

/// The lateness the demo and the CLI report by default: `2^LATE_LOG2` ns, about 1 ms.
pub const LATE_LOG2: u32 = 20;

/// Counters, readable while it runs.
#[derive(Debug, Default)]
pub struct EmulatorStats {
    pub forwarded: AtomicU64,
    pub returned: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    /// Packets by lateness, in powers of two (see [`LATE_BUCKETS`]).
    late: [AtomicU64; LATE_BUCKETS],
    /// The most any packet was sent after its release time, ns.
    pub late_max_ns: AtomicU64,
}

/// How well an emulator kept its schedule: packets released, their lateness in powers of
/// two, and the worst lateness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeliness {
    pub released: u64,
    late: [u64; LATE_BUCKETS],
    pub late_max_ns: u64,
}

impl Timeliness {
    /// A record of `released` packets of which `late` were sent `2^log2` ns or more late,
    /// the worst by `late_max_ns` (for tests and benchmarks).
    pub fn from_counts(released: u64, late: u64, log2: u32, late_max_ns: u64) -> Self {
        let mut buckets = [0; LATE_BUCKETS];
        buckets[0] = released.saturating_sub(late);
        buckets[bucket(1 << log2.min(62))] = late;
        Self {
            released,
            late: buckets,
            late_max_ns,
        }
    }

    /// Packets sent `2^log2` ns or more after their release time: exact up to `2^30` ns
    /// (every bucket above `log2` holds only such packets, and none below it does); past
    /// that, every packet a second or more late.
    pub fn late_at_least(&self, log2: u32) -> u64 {
        let from = usize::try_from(log2).map_or(LATE_BUCKETS, |k| k + 1);
        self.late.iter().skip(from.min(LATE_BUCKETS - 1)).sum()
    }

    /// True when more than `permille` per thousand packets left `2^log2` ns or more late.
    pub fn fell_behind(&self, log2: u32, permille: u64) -> bool {
        u128::from(self.late_at_least(log2)) * 1_000
            > u128::from(self.released) * u128::from(permille)
    }

    /// "12 of 6004 packets (0.20%) left 1.05 ms or more late, the worst by 8.4 ms".
    pub fn text(&self, log2: u32) -> String {
        let late = self.late_at_least(log2);
        #[allow(clippy::cast_precision_loss, reason = "a percentage to print")]
        let pct = if self.released == 0 {
            0.0
        } else {
            late as f64 * 100.0 / self.released as f64
        };
        let at_ms = Duration::from_nanos(1 << log2.min(62)).as_secs_f64() * 1e3;
        format!(
            "{late} of {} packets ({pct:.2}%) left {at_ms:.2} ms or more late, the worst by {:.1} ms",
            self.released,
            self.worst_ms()
        )
    }

    /// The worst lateness, in milliseconds.
    pub fn worst_ms(&self) -> f64 {
        Duration::from_nanos(self.late_max_ns).as_secs_f64() * 1e3
    }
}

/// The lateness bucket of `late_ns`: its bit length, the last bucket at most.
fn bucket(late_ns: u64) -> usize {
    usize::try_from(u64::BITS - late_ns.leading_zeros())
        .unwrap_or(LATE_BUCKETS)
        .min(LATE_BUCKETS - 1)
}

impl EmulatorStats {
    /// How well the emulator has kept its schedule so far.
    pub fn timeliness(&self) -> Timeliness {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Timeliness {
            released: g(&self.forwarded) + g(&self.returned),
            late: std::array::from_fn(|i| g(&self.late[i])),
            late_max_ns: g(&self.late_max_ns),
        }
    }

    fn note_release(&self, late_ns: u64) {
        self.late[bucket(late_ns)].fetch_add(1, Ordering::Relaxed);
        self.late_max_ns.fetch_max(late_ns, Ordering::Relaxed);
    }

    /// A one-line summary.
    pub fn line(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "forwarded {} returned {} dropped {} duplicated {}; {}",
            g(&self.forwarded),
            g(&self.returned),
            g(&self.dropped),
            g(&self.duplicated),
            self.timeliness().text(LATE_LOG2)
        )
    }
}

#[derive(Debug)]
enum Out {
    ToServer(Arc<Flow>),
    /// Back to a sender, from listening socket `.0`.
    ToClient(usize, SocketAddr),
}

#[derive(Debug)]
struct Waiting {
    data: Vec<u8>,
    out: Out,
    /// The TOS / traffic class it arrived with.
    tos: Option<u8>,
}

/// No TOS set on a socket yet.
const TOS_UNSET: u16 = 0x100;

/// One sender's upstream socket, and the TOS last set on it.
#[derive(Debug)]
struct Flow {
    sock: UdpSocket,
    tos: AtomicU16,
}

/// Sets `tos` on `sock` unless `last` says it already has it.
fn keep_tos(sock: &UdpSocket, last: &AtomicU16, tos: Option<u8>) {
    let Some(tos) = tos else { return };
    if last.swap(u16::from(tos), Ordering::Relaxed) == u16::from(tos) {
        return;
    }
    let s = socket2::SockRef::from(sock);
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    let _ = if v6 {
        s.set_tclass_v6(u32::from(tos))
    } else {
        s.set_tos_v4(u32::from(tos))
    };
}

/// Time-ordered packets: (release time, arrival number) keeps equal times in order.
type Queue = BinaryHeap<Reverse<(u64, u64, usize)>>;

#[derive(Debug, Default)]
struct Pending {
    queue: Queue,
    packets: HashMap<usize, Waiting>,
    next: u64,
}

/// An opened emulator.
#[derive(Debug)]
pub struct Emulator {
    cfg: EmulatorConfig,
    /// The listening sockets and where each forwards to: `listen` first, then `also`.
    socks: Vec<(Arc<UdpSocket>, SocketAddr)>,
    /// Where senders should send (the first listening socket).
    pub local: SocketAddr,
    /// Every listening address, in the order of `listen` then `also`.
    pub locals: Vec<SocketAddr>,
}

impl Emulator {
    /// Binds the listening sockets.
    pub fn bind(cfg: EmulatorConfig) -> Result<Self> {
        let mut socks = Vec::new();
        let mut locals = Vec::new();
        for (listen, forward) in
            std::iter::once((cfg.listen, cfg.forward)).chain(cfg.also.iter().copied())
        {
            let sock = UdpSocket::bind(listen).map_err(|source| Error::Io {
                what: format!("bind the emulator to {listen}"),
                source,
            })?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .map_err(|source| Error::Io {
                    what: "set a receive timeout".to_string(),
                    source,
                })?;
            sys::enable_rx_metadata(&socket2::SockRef::from(&sock), listen.is_ipv6()).map_err(
                |source| Error::Io {
                    what: "ask for the TOS of received datagrams".to_string(),
                    source,
                },
            )?;
            // Kernel receive stamps, where the kernel gives them, date each packet's arrival.
            let _ = sys::enable_timestamping(&socket2::SockRef::from(&sock), false);
            locals.push(sock.local_addr().unwrap_or(listen));
            socks.push((Arc::new(sock), forward));
        }
        Ok(Self {
            cfg,
            socks,
            local: locals[0],
            locals,
        })
    }

    /// Relays until `stop` is set.
    pub fn run(&self, stop: &AtomicBool, stats: &EmulatorStats) -> Result<()> {
        let start = sys::monotonic_ns();
        let relay = Relay {
            emulator: self,
            stop,
            stats,
            forward: Mutex::new(Link::new(
                self.cfg.forward_link.clone(),
                start,
                self.cfg.seed,
            )),
            reverse: Mutex::new(Link::new(
                self.cfg.reverse_link.clone(),
                start,
                self.cfg.seed ^ 0x9e37_79b9,
            )),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            flows: Mutex::new(HashMap::new()),
            client_tos: self
                .socks
                .iter()
                .map(|_| AtomicU16::new(TOS_UNSET))
                .collect(),
        };
        std::thread::scope(|s| {
            s.spawn(|| relay.release());
            let relay = &relay;
            let others: Vec<_> = (1..self.socks.len())
                .map(|i| s.spawn(move || relay.receive(s, i)))
                .collect();
            let mut result = relay.receive(s, 0);
            stop.store(true, Ordering::Relaxed);
            relay.wake.notify_all();
            for h in others {
                let r = h.join().unwrap_or(Ok(()));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }
}

/// The running relay: both links, the packets waiting, the flows.
struct Relay<'a> {
    emulator: &'a Emulator,
    stop: &'a AtomicBool,
    stats: &'a EmulatorStats,
    forward: Mutex<Link>,
    reverse: Mutex<Link>,
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Upstream sockets by (listening socket, sender).
    flows: Mutex<HashMap<(usize, SocketAddr), Arc<Flow>>>,
    /// The TOS last set on each listening socket.
    client_tos: Vec<AtomicU16>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Relay<'_> {
    /// Decides a packet's fate on `link` and queues its copies for release.
    /// `arrived_ns` is when the kernel received it (monotonic), so a receive thread that was
    /// scheduled late neither delays the packet nor moves it across a blackout's edge.
    fn admit(
        &self,
        link: &Mutex<Link>,
        (data, arrived_ns): (&[u8], u64),
        tos: Option<u8>,
        out: &dyn Fn() -> Out,
    ) {
        let fate = lock(link).admit(arrived_ns, data.len());
        let Fate::Released { at_ns, copies } = fate else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if copies > 1 {
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        let mut p = lock(&self.pending);
        for _ in 0..copies {
            if p.packets.len() >= MAX_WAITING {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let n = p.next;
            p.next += 1;
            let key = usize::try_from(n).unwrap_or(usize::MAX);
            p.queue.push(Reverse((at_ns, n, key)));
            p.packets.insert(
                key,
                Waiting {
                    data: data.to_vec(),
                    out: out(),
                    tos,
                },
            );
        }
        drop(p);
        self.wake.notify_one();
    }

    fn send(&self, w: Waiting) {
        match w.out {
            Out::ToServer(up) => {
                keep_tos(&up.sock, &up.tos, w.tos);
                if up.sock.send(&w.data).is_ok() {
                    self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            }
            Out::ToClient(i, to) => {
                let sock = &self.emulator.socks[i].0;
                keep_tos(sock, &self.client_tos[i], w.tos);
                if sock.send_to(&w.data, to).is_ok() {
                    self.stats.returned.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends each waiting packet at its time: a timed wait to just before, then a spin.
    fn release(&self) {
        let _ = sys::lower_timer_slack();
        while !self.stop.load(Ordering::Relaxed) {
            let mut p = lock(&self.pending);
            let now = sys::monotonic_ns();
            match p.queue.peek().map(|Reverse((at, _, _))| *at) {
                Some(at) if at <= now => {
                    let Some(Reverse((_, _, key))) = p.queue.pop() else {
                        continue;
                    };
                    let w = p.packets.remove(&key);
                    drop(p);
                    if let Some(w) = w {
                        self.stats
                            .note_release(sys::monotonic_ns().saturating_sub(at));
                        self.send(w);
                    }
                }
                Some(at) if at - now <= SPIN_NS => {
                    drop(p);
                    while sys::monotonic_ns() < at {
                        std::hint::spin_loop();
                    }
                }
                Some(at) => {
                    let wait = Duration::from_nanos((at - now - SPIN_NS).min(50_000_000));
                    let _ = self.wake.wait_timeout(p, wait);
                }
                None => {
                    let _ = self.wake.wait_timeout(p, Duration::from_millis(50));
                }
            }
        }
    }

    /// The upstream socket of sender `from`, opening it (and its reply reader) the first
    /// time; `None` past [`MAX_FLOWS`] or when it cannot be opened.
    fn flow<'s>(
        &'s self,
        s: &'s std::thread::Scope<'s, '_>,
        listener: usize,
        from: SocketAddr,
    ) -> Option<Arc<Flow>> {
        let mut flows = lock(&self.flows);
        if let Some(u) = flows.get(&(listener, from)) {
            return Some(Arc::clone(u));
        }
        if flows.len() >= MAX_FLOWS {
            return None;
        }
        let forward = self.emulator.socks[listener].1;
        let bind = SocketAddr::new(
            if forward.is_ipv6() {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            },
            0,
        );
        let up = UdpSocket::bind(bind)
            .and_then(|u| u.connect(forward).map(|()| u))
            .and_then(|u| {
                u.set_read_timeout(Some(Duration::from_millis(50)))
                    .map(|()| u)
            })
            .and_then(|u| {
                sys::enable_rx_metadata(&socket2::SockRef::from(&u), forward.is_ipv6()).map(|()| u)
            })
            .ok()?;
        let _ = sys::enable_timestamping(&socket2::SockRef::from(&up), false);
        let up = Arc::new(Flow {
            sock: up,
            tos: AtomicU16::new(TOS_UNSET),
        });
        flows.insert((listener, from), Arc::clone(&up));
        let reader = Arc::clone(&up);
        // Replies from --forward go back to this sender.
        s.spawn(move || {
            let mut batch = sys::RecvBatch::new(16);
            let sock = socket2::SockRef::from(&reader.sock);
            while !self.stop.load(Ordering::Relaxed) {
                let Ok(got) = batch.recv(&sock) else {
                    continue;
                };
                let clock = sys::BatchClock::now();
                for i in 0..got {
                    if let Some((data, meta)) = batch.get(i) {
                        let arrived = (data, clock.arrival(meta.kernel_rx_ns).0);
                        self.admit(&self.reverse, arrived, meta.tos, &|| {
                            Out::ToClient(listener, from)
                        });
                    }
                }
            }
        });
        Some(up)
    }

    /// Packets to listening socket `listener` go forward, each sender through its own
    /// upstream socket.
    fn receive<'s>(&'s self, s: &'s std::thread::Scope<'s, '_>, listener: usize) -> Result<()> {
        let sock = socket2::SockRef::from(&*self.emulator.socks[listener].0);
        let mut batch = sys::RecvBatch::new(16);
        while !self.stop.load(Ordering::Relaxed) {
            let got = match batch.recv(&sock) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(Error::Io {
                        what: "receive on the emulator".to_string(),
                        source: e,
                    });
                }
            };
            let clock = sys::BatchClock::now();
            for i in 0..got {
                let Some((data, meta)) = batch.get(i) else {
                    break;
                };
                let Some(from) = meta.src else {
                    continue;
                };
                match self.flow(s, listener, from) {
                    Some(up) => {
                        let arrived = (data, clock.arrival(meta.kernel_rx_ns).0);
                        self.admit(&self.forward, arrived, meta.tos, &|| {
                            Out::ToServer(Arc::clone(&up))
                        });
                    }
                    None => {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_is_counted_exactly_at_powers_of_two() {
        let stats = EmulatorStats::default();
        stats.forwarded.store(6, Ordering::Relaxed);
        for late in [0, 1_000, (1 << 20) - 1, 1 << 20, 3_000_000, u64::MAX] {
            stats.note_release(late);
        }
        let t = stats.timeliness();
        assert_eq!(t.late_at_least(0), 5, "all but the one on time");
        assert_eq!(t.late_at_least(LATE_LOG2), 3, "2^20 ns and more");
        assert_eq!(t.late_at_least(21), 2);
        assert_eq!(t.late_at_least(30), 1, "2^30 ns (about a second) and more");
        assert_eq!(t.late_at_least(40), 1, "the last bucket keeps the rest");
        assert_eq!(t.late_max_ns, u64::MAX);
        // 3 of 6 is over any share below a half.
        assert!(t.fell_behind(LATE_LOG2, 499));
        assert!(!t.fell_behind(LATE_LOG2, 500));
    }

    #[test]
    fn a_record_from_counts_reads_back() {
        let t = Timeliness::from_counts(1_000, 11, LATE_LOG2, 8_400_000);
        assert_eq!(t.late_at_least(LATE_LOG2), 11);
        assert_eq!(t.late_at_least(LATE_LOG2 + 1), 0);
        assert_eq!(
            t.text(LATE_LOG2),
            "11 of 1000 packets (1.10%) left 1.05 ms or more late, the worst by 8.4 ms"
        );
    }
}
