//! The STAMP Session-Reflector (RFC 8762 §4.3): batched receive, T2 from the kernel's
//! receive stamp, reply built by `proto`, T3 taken just before the batch is sent.
//!
//! - Stateless mode copies the sender's sequence number; stateful mode numbers each
//!   session's replies (a session is a source address and port with an SSID). Sessions are
//!   bounded per source address ([`MAX_SESSIONS_PER_SOURCE`]) and in all; a source over its
//!   bound gets no new session, and only sessions idle for [`SESSION_IDLE`] are ever
//!   forgotten, so no source can reset another's numbering.
//! - The reply carries the received TTL and answers Class of Service with the DSCP and ECN
//!   it received. Its own DSCP follows `--reply-dscp` ([`ReplyDscp`]): by default DSCP1 when
//!   the request asks for one, else the DSCP it arrived with; or one fixed value; or the
//!   socket's own marking. RP tells the sender whether the reply carries DSCP1.
//! - A per-source packet-rate cap (token bucket) keeps it from being used to flood a third
//!   party with spoofed requests. Malformed requests, and in authenticated mode any request
//!   whose HMAC fails, are counted and dropped before they cost anything: nothing is sent
//!   back, and they take no token of the rate cap and no session.
//! - Authenticated, its keys are a [`KeyRing`]: a rollover set per SSID and a default one,
//!   tried newest first; the reply is signed with the key that verified the request, and
//!   each key counts the requests it answered. `SIGHUP` swaps the ring in between two
//!   batches ([`LiveRing`]): no socket is closed and no request is lost. The request's HMAC
//!   TLV is checked and the reply's signed (RFC 8972 §4.8, [`pathprobe_proto::stamp::tlv`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ipnet::IpNet;
use pathprobe_proto::stamp::reflect::{ReflectInput, finish, prepare_verified, verify};
use std::sync::Arc;

use crate::keyfile::{KeyRing, LiveRing, RingKey};
use pathprobe_proto::report::TimestampSource;
use pathprobe_proto::stamp::tlv::{
    ClassOfService, TimestampInformation, TlvIter, TlvReflectInfo, sync_source, timestamp_method,
    tlv_type,
};
use pathprobe_proto::stamp::{ErrorEstimate, Mode, SenderPacket, SenderRepr, TimestampFormat};
use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::{self, RecvBatch, RecvMeta, SendBatch};
use crate::{Error, Result};

/// Datagrams per `recvmmsg` / `sendmmsg`.
const BATCH: usize = 64;
/// Most sources (rate limiting) or sessions (stateful numbering) remembered; beyond it the
/// idle ones are forgotten.
const MAX_TRACKED: usize = 65_536;
/// Most stateful sessions of one source address (a sender uses one per path and SSID).
pub const MAX_SESSIONS_PER_SOURCE: u32 = 256;
/// A stateful session silent this long may be forgotten (its numbering restarts).
pub const SESSION_IDLE: Duration = Duration::from_mins(1);

/// The DSCP replies are sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyDscp {
    /// DSCP1 when the request's Class-of-Service TLV asks for one, else the DSCP the
    /// request arrived with (RFC 8972 §5.2).
    #[default]
    Copy,
    /// Always this DSCP (0 to 63), whatever the request asks.
    Fixed(u8),
    /// The socket's own marking (what the system or a firewall rule sets): no per-reply TOS.
    Keep,
}

impl std::str::FromStr for ReplyDscp {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "copy" => Ok(Self::Copy),
            "keep" => Ok(Self::Keep),
            n => match n.parse::<u8>() {
                Ok(d) if d <= 63 => Ok(Self::Fixed(d)),
                _ => Err(format!(
                    "`{n}` is not a reply DSCP: use copy, keep, or a DSCP from 0 to 63 (e.g. 0 so that no reply claims a network-control class)"
                )),
            },
        }
    }
}

/// How the reflector runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReflectorConfig {
    pub listen: SocketAddr,
    /// Authenticated mode's keys (unauthenticated without), swappable while it runs.
    pub keys: Option<Arc<LiveRing>>,
    pub stateful: bool,
    /// Most requests per second answered per source address; 0 turns the cap off.
    pub max_rate_per_source: u32,
    pub timestamp_format: TimestampFormat,
    pub reply_dscp: ReplyDscp,
    pub admission: Admission,
    /// Authenticated mode: refuse a request whose (SSID, sequence number) was answered
    /// already, or that is older than the session's window ([`Replays`]).
    pub refuse_replays: bool,
    /// It takes part in capacity tests, within these caps: the daemon runs the far end
    /// ([`crate::capacity::server`]) beside it, on its port. The packet loop ignores it.
    pub capacity: Option<CapacityCaps>,
}

/// The most a capacity test may ask of this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapacityCaps {
    pub max_rate_bps: u64,
    pub max_stage: Duration,
}

impl ReflectorConfig {
    /// What `reflect --listen LISTEN` alone asks for: unauthenticated, stateless, 250,000
    /// replies a second per source, the request's DSCP copied, NTP timestamps, no
    /// admission prefixes, no capacity tests.
    pub fn plain(listen: SocketAddr) -> Self {
        Self {
            listen,
            keys: None,
            stateful: false,
            max_rate_per_source: pathprobe_proto::plan::default_max_rate(),
            timestamp_format: TimestampFormat::Ntp,
            reply_dscp: ReplyDscp::Copy,
            admission: Admission::default(),
            refuse_replays: false,
            capacity: None,
        }
    }

    /// Whether `other` is this reflector with other keys only (both authenticated): then
    /// the running one takes the new keys ([`LiveRing::adopt`]) instead of starting again.
    pub fn differs_only_in_keys(&self, other: &Self) -> bool {
        self.keys.is_some()
            && other.keys.is_some()
            && Self {
                keys: other.keys.clone(),
                ..self.clone()
            } == *other
    }
}

/// Binds what `rc` asks for: the reflector's socket, then, when it takes part in capacity
/// tests, their far end on the same port (control on TCP, sinks one port above). With
/// port 0 the kernel picks the port, and a pick whose next port is taken is tried again.
pub fn bind_with_capacity(
    rc: &ReflectorConfig,
) -> Result<(Socket, Option<crate::capacity::server::Server>)> {
    use crate::capacity::server::{Server, ServerConfig};
    let mut tries = 0;
    loop {
        let sock = bind(rc.listen)?;
        let Some(caps) = rc.capacity else {
            return Ok((sock, None));
        };
        let listen = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(rc.listen);
        match Server::bind(ServerConfig {
            listen,
            max_rate_bps: caps.max_rate_bps,
            max_stage: caps.max_stage,
            keys: rc.keys.clone(),
        }) {
            Ok(server) => return Ok((sock, Some(server))),
            Err(Error::Io { source, .. })
                if rc.listen.port() == 0
                    && source.kind() == io::ErrorKind::AddrInUse
                    && tries < 16 =>
            {
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Who is answered first when the reflector is flooded (an RFC 8762 reflector is an open
/// UDP service, and its senders' addresses can be spoofed): a cap on all replies, and
/// prefixes of the configured senders, whose requests are answered before anyone else's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admission {
    /// Most replies per second over all sources together (0: no cap).
    pub max_rate_total: u32,
    /// The configured senders' prefixes (`--allow`). With any, every other source shares
    /// `max_rate_others`, is refused before its HMAC is checked, and is the one refused
    /// when the table of sources is full.
    pub allow: Vec<IpNet>,
    /// Most replies per second to all sources outside `allow` together.
    pub max_rate_others: u32,
}

impl Admission {
    /// Whether `ip` is a configured sender's (an IPv4-mapped IPv6 address as its IPv4).
    fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// Counters, readable from another thread while the reflector runs.
#[derive(Debug, Default)]
pub struct ReflectorStats {
    pub received: AtomicU64,
    pub reflected: AtomicU64,
    pub malformed: AtomicU64,
    pub auth_failed: AtomicU64,
    pub rate_limited: AtomicU64,
    pub send_failed: AtomicU64,
    /// Requests dropped in stateful mode because their source had its most sessions, or the
    /// table was full of active ones.
    pub session_limited: AtomicU64,
    /// Of `rate_limited`: over `--max-rate-total`.
    pub total_limited: AtomicU64,
    /// Of `rate_limited`: sources outside `--allow`, over `--max-rate-others`.
    pub others_limited: AtomicU64,
    /// Authenticated requests refused as replays (`--refuse-replays`).
    pub replays_refused: AtomicU64,
    /// Authenticated requests whose HMAC TLV failed: answered, their TLVs flagged I.
    pub tlv_integrity_failed: AtomicU64,
}

impl ReflectorStats {
    /// A one-line summary.
    pub fn line(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "received {} reflected {} malformed {} auth-failed {} tlv-integrity-failed {} replays-refused {} rate-limited {} (over the total {}, others {}) session-limited {} send-failed {}",
            g(&self.received),
            g(&self.reflected),
            g(&self.malformed),
            g(&self.auth_failed),
            g(&self.tlv_integrity_failed),
            g(&self.replays_refused),
            g(&self.rate_limited),
            g(&self.total_limited),
            g(&self.others_limited),
            g(&self.session_limited),
            g(&self.send_failed)
        )
    }
}

/// A token bucket: tokens kept in nanosecond units (1 token = 10^9) so that refills are
/// exact integers; it holds a tenth of a second of the rate (at least one request).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    last: u64,
}

impl Bucket {
    fn full(rate: u64) -> u64 {
        (rate * 100_000_000).max(1_000_000_000)
    }

    fn new(rate: u64, now_ns: u64) -> Self {
        Self {
            tokens: Self::full(rate),
            last: now_ns,
        }
    }

    /// Takes a token at `now_ns`; false when empty.
    fn take(&mut self, rate: u64, now_ns: u64) -> bool {
        let refill = now_ns.saturating_sub(self.last).saturating_mul(rate);
        self.tokens = self.tokens.saturating_add(refill).min(Self::full(rate));
        self.last = now_ns;
        if self.tokens >= 1_000_000_000 {
            self.tokens -= 1_000_000_000;
            true
        } else {
            false
        }
    }
}

/// A token bucket per source address, for at most [`MAX_TRACKED`] sources. When the table
/// is full, the idle ones (silent for a second: their buckets are full again anyway) are
/// swept out at most once a second; until then a new source is refused. (A sweep for
/// every new source, which a flood of spoofed sources forces, cost the reflector its
/// answers to everyone.)
#[derive(Debug)]
struct RateLimiter {
    rate: u64,
    buckets: HashMap<IpAddr, Bucket>,
    swept_at: Option<u64>,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        Self {
            rate: u64::from(rate),
            buckets: HashMap::new(),
            swept_at: None,
        }
    }

    /// Takes a token for `src` at `now_ns`; false when its bucket is empty, or the table
    /// is full of active sources.
    fn allow(&mut self, src: IpAddr, now_ns: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(&src) {
            if self
                .swept_at
                .is_some_and(|at| now_ns.saturating_sub(at) < 1_000_000_000)
            {
                return false;
            }
            self.swept_at = Some(now_ns);
            self.buckets
                .retain(|_, b| now_ns.saturating_sub(b.last) < 1_000_000_000);
            if self.buckets.len() >= MAX_TRACKED {
                return false;
            }
        }
        let rate = self.rate;
        self.buckets
            .entry(src)
            .or_insert_with(|| Bucket::new(rate, now_ns))
            .take(rate, now_ns)
    }
}

/// Sequence numbers a replay window remembers behind the highest one seen.
const REPLAY_WINDOW: u32 = 1_024;

/// One session's replay window: the highest sequence number answered, which of the
/// [`REPLAY_WINDOW`] below it were answered, and the newest T1 (raw, as sent).
#[derive(Debug, Clone, Copy)]
struct Window {
    top: u32,
    newest_t1: u64,
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Window {
    fn new(seq: u32, t1: u64) -> Self {
        let mut w = Self {
            top: seq,
            newest_t1: t1,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
        };
        w.mark(0);
        w
    }

    /// Bit `back` (sequence numbers below the top).
    fn bit(back: u32) -> (usize, u64) {
        ((back / 64) as usize, 1u64 << (back % 64))
    }

    fn mark(&mut self, back: u32) {
        let (w, b) = Self::bit(back);
        self.seen[w] |= b;
    }

    fn seen(&self, back: u32) -> bool {
        let (w, b) = Self::bit(back);
        self.seen[w] & b != 0
    }

    /// Moves the top up by `by`: what was `back` is now `back + by` (a shift of the
    /// bitmap towards its far end, a word at a time).
    fn advance(&mut self, by: u32) {
        const WORDS: usize = (REPLAY_WINDOW / 64) as usize;
        if by >= REPLAY_WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, by % 64);
        for i in (0..WORDS).rev() {
            let hi = i.checked_sub(words).map_or(0, |j| self.seen[j]);
            let lo = i.checked_sub(words + 1).map_or(0, |j| self.seen[j]);
            self.seen[i] = if bits == 0 {
                hi
            } else {
                (hi << bits) | (lo >> (64 - bits))
            };
        }
    }

    /// Whether the request (`seq`, `t1`) is new; it is remembered if it is. HMAC covers
    /// both, so only the sender can make a new pair. A sequence number above the top with
    /// a T1 no older than the newest moves the window (a sender may give a whole batch one
    /// T1: ours does). A newer T1 far below the top is a sender that started again (a
    /// stateless sender restarting at 0), and the window starts again there. Otherwise a
    /// request is new only inside the window and unseen.
    fn admit(&mut self, seq: u32, t1: u64) -> bool {
        if seq > self.top {
            if t1 < self.newest_t1 {
                return false;
            }
            self.advance(seq - self.top);
            self.top = seq;
            self.newest_t1 = t1;
            self.mark(0);
            return true;
        }
        let back = self.top - seq;
        if back >= REPLAY_WINDOW {
            if t1 > self.newest_t1 {
                *self = Self::new(seq, t1);
                return true;
            }
            return false;
        }
        if self.seen(back) {
            return false;
        }
        self.newest_t1 = self.newest_t1.max(t1);
        self.mark(back);
        true
    }
}

/// Replay refusal in authenticated mode: a window per SSID, whatever the source address
/// (a replay from a forged source is refused too), so at most 65,536 of them (about 9
/// MiB). Senders that share the key must use SSIDs of their own (as paths to one
/// reflector must anyway); a sender whose clock steps back after a restart is refused
/// until its T1 passes the newest one answered.
#[derive(Debug, Default)]
struct Replays(HashMap<u16, Window>);

impl Replays {
    fn admit(&mut self, ssid: u16, seq: u32, t1: u64) -> bool {
        if let Some(w) = self.0.get_mut(&ssid) {
            w.admit(seq, t1)
        } else {
            self.0.insert(ssid, Window::new(seq, t1));
            true
        }
    }
}

/// Opens the listening socket, with a message that says what to do when it cannot.
pub fn bind(listen: SocketAddr) -> Result<Socket> {
    let domain = Domain::for_address(listen);
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| Error::Io {
        what: "create a UDP socket".to_string(),
        source: e,
    })?;
    if listen.is_ipv6() {
        // [::] also answers IPv4 (mapped) senders.
        let _ = sock.set_only_v6(false);
    }
    sock.bind(&listen.into()).map_err(|e| match e.kind() {
        io::ErrorKind::PermissionDenied => Error::Privileged {
            addr: listen,
            suggestion: SocketAddr::new(listen.ip(), 8620),
        },
        io::ErrorKind::AddrInUse => Error::AddrInUse { addr: listen },
        _ => Error::Io {
            what: format!("bind UDP {listen}"),
            source: e,
        },
    })?;
    let _ = sock.set_recv_buffer_size(8 << 20);
    let _ = sock.set_send_buffer_size(8 << 20);
    sys::enable_rx_metadata(&sock, listen.is_ipv6()).map_err(|e| Error::Io {
        what: "ask for TTL and TOS of received datagrams".to_string(),
        source: e,
    })?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| Error::Io {
            what: "set a receive timeout".to_string(),
            source: e,
        })?;
    Ok(sock)
}

/// The reflector clock's Error Estimate and Timestamp Information, from the kernel's NTP
/// state and how timestamps are taken.
fn clock_info(
    format: TimestampFormat,
    rx: TimestampSource,
) -> (ErrorEstimate, TimestampInformation) {
    let sync = sys::clock_sync().ok();
    let synchronized = sync.is_some_and(|s| s.synchronized);
    let error_ns = sync.map_or(1_000_000_000, |s| s.max_error_ns.max(1));
    let ee = ErrorEstimate::from_error_nanos(synchronized, format, error_ns);
    let source = if synchronized {
        sync_source::NTP
    } else {
        sync_source::LOCAL_FREE_RUNNING
    };
    let rx_method = match rx {
        TimestampSource::Hardware => timestamp_method::HW_ASSIST,
        TimestampSource::Kernel | TimestampSource::Userspace => timestamp_method::SW_LOCAL,
    };
    let info = TimestampInformation {
        sync_source_in: source,
        timestamp_in: rx_method,
        sync_source_out: source,
        timestamp_out: timestamp_method::SW_LOCAL,
    };
    (ee, info)
}

/// DSCP1 of the request's Class of Service TLV, if it has one.
fn requested_dscp(tlvs: &[u8]) -> Option<u8> {
    TlvIter::new(tlvs)
        .map_while(std::result::Result::ok)
        .find(|t| t.tlv_type == tlv_type::CLASS_OF_SERVICE)
        .and_then(|t| ClassOfService::parse(t.value).ok())
        .map(|c| c.dscp1)
}

/// Stateful numbering: one counter per (source address and port, SSID), bounded per
/// source address and in all.
#[derive(Debug, Default)]
struct Sessions {
    /// Next sequence number and when the session was last heard, ns.
    next: HashMap<(SocketAddr, u16), (u32, u64)>,
    per_source: HashMap<IpAddr, u32>,
    /// When idle sessions were last swept, ns.
    swept: u64,
}

impl Sessions {
    /// The reply's sequence number for `(src, ssid)` at `now_ns`; `None` when the session is
    /// new and its source has its most sessions, or the table is full of active ones.
    fn next(&mut self, src: SocketAddr, ssid: u16, now_ns: u64) -> Option<u32> {
        if let Some((next, heard)) = self.next.get_mut(&(src, ssid)) {
            let seq = *next;
            *next = next.wrapping_add(1);
            *heard = now_ns;
            return Some(seq);
        }
        let idle = u64::try_from(SESSION_IDLE.as_nanos()).unwrap_or(u64::MAX);
        if self.next.len() >= MAX_TRACKED && now_ns.saturating_sub(self.swept) >= idle / 60 {
            // At most once a second: forget sessions silent for SESSION_IDLE, whoever's.
            self.swept = now_ns;
            let per_source = &mut self.per_source;
            self.next.retain(|(a, _), (_, heard)| {
                let keep = now_ns.saturating_sub(*heard) < idle;
                if !keep && let Some(n) = per_source.get_mut(&a.ip()) {
                    *n -= 1;
                }
                keep
            });
            self.per_source.retain(|_, n| *n > 0);
        }
        let count = self.per_source.get(&src.ip()).copied().unwrap_or(0);
        if count >= MAX_SESSIONS_PER_SOURCE || self.next.len() >= MAX_TRACKED {
            return None;
        }
        *self.per_source.entry(src.ip()).or_default() += 1;
        self.next.insert((src, ssid), (1, now_ns));
        Some(0)
    }
}

/// What one reflector keeps between datagrams.
struct State<'a> {
    cfg: &'a ReflectorConfig,
    stats: &'a ReflectorStats,
    mode: Mode,
    /// The keys this batch answers with, and the generation they are of.
    ring: Option<(Arc<KeyRing>, u64)>,
    /// The key each queued reply is signed with.
    reply_keys: Vec<Option<Arc<RingKey>>>,
    /// Per source: the others, and (with `--allow`) the configured senders apart, so that
    /// a flood filling the table of the others cannot refuse them.
    limiter: RateLimiter,
    allowed: RateLimiter,
    total: Bucket,
    others: Bucket,
    replays: Replays,
    sessions: Sessions,
    ee: ErrorEstimate,
    ts_info: TimestampInformation,
}

impl<'a> State<'a> {
    fn new(
        cfg: &'a ReflectorConfig,
        stats: &'a ReflectorStats,
        ee: ErrorEstimate,
        ts_info: TimestampInformation,
    ) -> Self {
        Self {
            cfg,
            stats,
            mode: if cfg.keys.is_some() {
                Mode::Authenticated
            } else {
                Mode::Unauthenticated
            },
            ring: cfg.keys.as_ref().map(|l| (l.get(), l.generation())),
            reply_keys: Vec::with_capacity(BATCH),
            limiter: RateLimiter::new(cfg.max_rate_per_source),
            allowed: RateLimiter::new(cfg.max_rate_per_source),
            total: Bucket::new(u64::from(cfg.admission.max_rate_total), sys::monotonic_ns()),
            others: Bucket::new(
                u64::from(cfg.admission.max_rate_others),
                sys::monotonic_ns(),
            ),
            replays: Replays::default(),
            sessions: Sessions::default(),
            ee,
            ts_info,
        }
    }
}

impl State<'_> {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks a request whole and, authenticated, finds the key that signed it (its SSID's
    /// keys, newest first) and refuses a replay; `None` (counted) when it is to get no
    /// answer, else the key to sign the answer with.
    #[allow(
        clippy::option_option,
        reason = "refused, or answered without or with a key"
    )]
    fn authenticate(&mut self, payload: &[u8]) -> Option<Option<Arc<RingKey>>> {
        match &self.ring {
            None => {
                if verify(payload, None).is_err() {
                    Self::count(&self.stats.malformed);
                    return None;
                }
                Some(None)
            }
            Some((ring, _)) => {
                let Ok(packet) = SenderPacket::new_checked(payload, self.mode) else {
                    Self::count(&self.stats.malformed);
                    return None;
                };
                // The request's SSID chooses the keys; the newest that verifies answers.
                let Some(key) = ring
                    .for_ssid(packet.ssid())
                    .iter()
                    .find(|k| packet.verify(&k.key).is_ok())
                else {
                    Self::count(&self.stats.auth_failed);
                    return None;
                };
                if self.cfg.refuse_replays {
                    let req = SenderRepr::parse(&packet);
                    if !self
                        .replays
                        .admit(req.ssid, req.sequence_number, req.timestamp)
                    {
                        Self::count(&self.stats.replays_refused);
                        return None;
                    }
                }
                Some(Some(Arc::clone(key)))
            }
        }
    }

    /// Queues the reply to one datagram in `tx`, or counts why there is none. The request is
    /// checked whole (and its HMAC, in authenticated mode) before it takes a token of its
    /// source's rate or a session: garbage, from anyone, costs a legitimate sender nothing.
    fn answer(&mut self, payload: &[u8], meta: &RecvMeta, now_mono: u64, tx: &mut SendBatch) {
        let Some(src) = meta.src else {
            return Self::count(&self.stats.malformed);
        };
        if meta.truncated {
            return Self::count(&self.stats.malformed);
        }
        let admission = &self.cfg.admission;
        let allowed = admission.allows(src.ip());
        if !allowed
            && !admission.allow.is_empty()
            && !self
                .others
                .take(u64::from(admission.max_rate_others), now_mono)
        {
            // Before the HMAC: a flood from elsewhere costs as little as it can.
            Self::count(&self.stats.others_limited);
            return Self::count(&self.stats.rate_limited);
        }
        let Some(key) = self.authenticate(payload) else {
            return;
        };
        let limiter = if allowed {
            &mut self.allowed
        } else {
            &mut self.limiter
        };
        if !limiter.allow(src.ip(), now_mono) {
            return Self::count(&self.stats.rate_limited);
        }
        if admission.max_rate_total > 0
            && !self
                .total
                .take(u64::from(admission.max_rate_total), now_mono)
        {
            Self::count(&self.stats.total_limited);
            return Self::count(&self.stats.rate_limited);
        }
        let sequence_number = if self.cfg.stateful {
            let at = if self.mode == Mode::Authenticated {
                26
            } else {
                14
            };
            let ssid = u16::from_be_bytes([payload[at], payload[at + 1]]);
            let Some(seq) = self.sessions.next(src, ssid, now_mono) else {
                return Self::count(&self.stats.session_limited);
            };
            Some(seq)
        } else {
            None
        };
        let t2 = meta.kernel_rx_ns.unwrap_or_else(sys::realtime_ns);
        let Ok(t2) = self.cfg.timestamp_format.encode(t2) else {
            return Self::count(&self.stats.malformed);
        };
        let received_tos = meta.tos.unwrap_or(0);
        let dscp1 = requested_dscp(&payload[self.mode.base_len()..]);
        let (tos, carries_dscp1) = reply_tos(self.cfg.reply_dscp, dscp1, received_tos);
        let input = ReflectInput {
            key: key.as_ref().map(|k| &k.key),
            sequence_number,
            receive_timestamp: t2,
            error_estimate: self.ee,
            received_ttl: meta.ttl.unwrap_or(0),
            tlv: TlvReflectInfo {
                received_tos,
                reverse_path: u8::from(!carries_dscp1),
                timestamp_information: self.ts_info,
                authenticated: key.is_some(),
            },
        };
        let Some(slot) = tx.next_slot() else { return };
        match prepare_verified(payload, &input, slot) {
            Ok(r) => {
                if r.tlv_integrity_failed {
                    Self::count(&self.stats.tlv_integrity_failed);
                }
                tx.commit(
                    r.len,
                    Some(src),
                    tos.map(|t| (self.cfg.listen.is_ipv6(), t)),
                );
                if let Some(k) = &key {
                    k.answered.fetch_add(1, Ordering::Relaxed);
                }
                self.reply_keys.push(key);
            }
            Err(_) => Self::count(&self.stats.malformed),
        }
    }
}

/// The TOS a reply is sent with (`None`: the socket's own) and whether it carries the
/// DSCP1 the request asked for (RP = 0), under `policy`.
fn reply_tos(policy: ReplyDscp, dscp1: Option<u8>, received_tos: u8) -> (Option<u8>, bool) {
    match policy {
        ReplyDscp::Copy => (
            Some(dscp1.map_or(received_tos & !0x03, |d| d << 2)),
            dscp1.is_some(),
        ),
        ReplyDscp::Fixed(d) => (Some(d << 2), dscp1 == Some(d)),
        // The socket's marking is not known here: DSCP1 is not known to be honoured.
        ReplyDscp::Keep => (None, false),
    }
}

/// Stamps T3 on every queued reply, as late as possible, signs each with the key that
/// verified its request, and sends them.
fn send_replies(
    sock: &Socket,
    tx: &mut SendBatch,
    keys: &mut Vec<Option<Arc<RingKey>>>,
    cfg: &ReflectorConfig,
    stats: &ReflectorStats,
) {
    let queued = tx.len();
    let t3 = cfg
        .timestamp_format
        .encode(sys::realtime_ns())
        .unwrap_or_default();
    for (i, key) in keys.iter().enumerate().take(queued) {
        if let Some(reply) = tx.payload_mut(i) {
            // Cannot fail: the reply was prepared in this mode.
            let _ = finish(reply, t3, key.as_ref().map(|k| &k.key));
        }
    }
    keys.clear();
    let sent = tx.send(sock).unwrap_or(0);
    stats.reflected.fetch_add(sent as u64, Ordering::Relaxed);
    stats
        .send_failed
        .fetch_add((queued - sent) as u64, Ordering::Relaxed);
}

/// Runs on `sock` until `stop` is set.
pub fn run(
    sock: &Socket,
    cfg: &ReflectorConfig,
    stop: &AtomicBool,
    stats: &ReflectorStats,
) -> Result<()> {
    let (rx_source, _) = sys::enable_timestamping(sock, false);
    let (ee, ts_info) = clock_info(cfg.timestamp_format, rx_source);
    let mut reflector = State::new(cfg, stats, ee, ts_info);
    let mut rx = RecvBatch::new(BATCH);
    let mut tx = SendBatch::new(BATCH);
    let mut clock_checked = sys::monotonic_ns();
    while !stop.load(Ordering::Relaxed) {
        let n = match rx.recv(sock) {
            Ok(n) => n,
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
                    what: "receive".to_string(),
                    source: e,
                });
            }
        };
        let now_mono = sys::monotonic_ns();
        if now_mono - clock_checked > 1_000_000_000 {
            (reflector.ee, reflector.ts_info) = clock_info(cfg.timestamp_format, rx_source);
            clock_checked = now_mono;
        }
        stats.received.fetch_add(n as u64, Ordering::Relaxed);
        if let (Some(live), Some((ring, generation))) = (&cfg.keys, &mut reflector.ring)
            && live.generation() != *generation
        {
            *generation = live.generation();
            *ring = live.get();
        }
        for i in 0..n {
            if let Some((payload, meta)) = rx.get(i) {
                reflector.answer(payload, meta, now_mono, &mut tx);
            }
        }
        if !tx.is_empty() {
            send_replies(sock, &mut tx, &mut reflector.reply_keys, cfg, stats);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An authenticated request of `ssid`, signed with `key`: the probe the agent sends.
    fn request(ssid: u16, key: &pathprobe_proto::stamp::AuthKey) -> Vec<u8> {
        let cfg = crate::probe::ProbeConfig {
            protocol: pathprobe_proto::report::ProbeProtocol::Stamp,
            target: "127.0.0.1:862".parse().unwrap(),
            bind: None,
            interface: None,
            fwmark: None,
            interval_ns: 1_000_000,
            count: None,
            duration_ns: None,
            size: crate::probe::default_size(Mode::Authenticated),
            dscp: 46,
            ttl: None,
            key: Some(key.clone()),
            window_ns: 1_000_000_000,
            late_timeout_ns: 1_000_000_000,
            no_reply_ns: 1_000_000_000,
            ssid,
            route_each_probe: false,
        };
        let mut buf = vec![0u8; cfg.size];
        let ee = ErrorEstimate::from_u16(0x8001);
        crate::probe::stamp::build_probe(&cfg, Some(key), &mut buf, 1, 1 << 40, ee);
        buf
    }

    #[test]
    fn each_ssid_is_answered_with_its_own_keys_newest_first_and_the_reply_signed_with_the_one_that_verified()
     {
        use pathprobe_proto::stamp::AuthKey;
        use pathprobe_proto::stamp::tlv::{HmacTlvCheck, check_hmac_tlv};
        let k = |b: u8| AuthKey::new(&[b; 32]).unwrap();
        let dir = std::env::temp_dir().join(format!("pathprobe-refl-ring-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, keys: &[u8]| {
            let text: String = keys
                .iter()
                .flat_map(|b| [format!("{b:02x}").repeat(32), "\n".to_string()])
                .collect();
            pathprobe_tests::pki::write(&dir.join(name), &text, true);
        };
        write("000a.key", &[2, 1]);
        write("default.key", &[3]);
        let cfg = ReflectorConfig {
            listen: "127.0.0.1:862".parse().unwrap(),
            keys: Some(Arc::new(LiveRing::new(KeyRing::from_dir(&dir).unwrap()))),
            stateful: false,
            max_rate_per_source: 0,
            timestamp_format: TimestampFormat::Ntp,
            reply_dscp: ReplyDscp::Copy,
            admission: Admission::default(),
            refuse_replays: false,
            capacity: None,
        };
        let stats = ReflectorStats::default();
        let mut refl = State::new(
            &cfg,
            &stats,
            ErrorEstimate::from_u16(0x8001),
            TimestampInformation::default(),
        );
        let meta = RecvMeta {
            len: 0,
            src: Some("127.0.0.1:40000".parse().unwrap()),
            kernel_rx_ns: Some(1_800_000_000_000_000_000),
            ttl: Some(64),
            tos: Some(46 << 2),
            truncated: false,
        };
        let mut tx = SendBatch::new(BATCH);
        let mut answer = |payload: &[u8]| {
            let before = tx.len();
            refl.answer(payload, &meta, 1_000, &mut tx);
            let reply = (tx.len() > before).then(|| tx.payload_mut(before).unwrap().to_vec());
            (reply, refl.reply_keys.last().cloned().flatten())
        };
        // SSID 10 under its old key (a sender not moved yet) and its new one.
        for (key, fingerprint) in [(k(1), k(1).fingerprint()), (k(2), k(2).fingerprint())] {
            let (reply, used) = answer(&request(10, &key));
            let reply = reply.expect("answered");
            assert_eq!(
                used.unwrap().key.fingerprint(),
                fingerprint,
                "signed with the key that verified"
            );
            assert_eq!(
                check_hmac_tlv(&reply, 112, &key),
                HmacTlvCheck::Verified {
                    integrity_failed: false
                }
            );
        }
        // The default key is not SSID 10's; another SSID takes it.
        assert!(answer(&request(10, &k(3))).0.is_none());
        assert_eq!(stats.auth_failed.load(Ordering::Relaxed), 1);
        assert!(answer(&request(7, &k(3))).0.is_some());
        // A TLV changed on the way (the base HMAC still verifies): answered, flagged I.
        let mut tampered = request(7, &k(3));
        tampered[116] = 48 << 2;
        let mut p = SenderPacket::new_unchecked(&mut tampered[..], Mode::Authenticated);
        p.sign(&k(3));
        let (reply, _) = answer(&tampered);
        let reply = reply.unwrap();
        assert_eq!(stats.tlv_integrity_failed.load(Ordering::Relaxed), 1);
        assert_eq!(
            reply[112] & pathprobe_proto::stamp::tlv::FLAG_I,
            pathprobe_proto::stamp::tlv::FLAG_I
        );
        // Each key counted what it answered.
        let ring = cfg.keys.as_ref().unwrap().get();
        let counts: Vec<(String, u64)> = ring
            .keys()
            .map(|(_, r)| (r.key.fingerprint(), r.answered.load(Ordering::Relaxed)))
            .collect();
        assert_eq!(
            counts,
            [
                (k(2).fingerprint(), 1),
                (k(1).fingerprint(), 1),
                (k(3).fingerprint(), 2)
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rate_limiter_allows_a_tenth_of_a_second_burst_then_the_rate() {
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut r = RateLimiter::new(1_000);
        let t0 = 5_000_000_000;
        let burst = (0..1_000).filter(|_| r.allow(ip, t0)).count();
        assert_eq!(burst, 100);
        // 10 ms later: 10 more tokens.
        let more = (0..1_000).filter(|_| r.allow(ip, t0 + 10_000_000)).count();
        assert_eq!(more, 10);
        // Another source has its own bucket.
        assert!(r.allow("192.0.2.2".parse().unwrap(), t0));
    }

    /// A flood of spoofed sources used to make every new source sweep the whole table
    /// (65,536 entries): now a full table of active sources is swept at most once a
    /// second, newcomers are refused meanwhile, and the sources already in it go on.
    #[test]
    fn a_full_table_is_swept_once_a_second_and_its_sources_go_on() {
        let mut r = RateLimiter::new(1_000);
        let t0 = 10_000_000_000;
        let known: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(r.allow(known, t0));
        let mut n = 1;
        'fill: for a in 0..=255u8 {
            for b in 0..=255u8 {
                if n == MAX_TRACKED {
                    break 'fill;
                }
                assert!(r.allow(IpAddr::from([10, 1, a, b]), t0));
                n += 1;
            }
        }
        let newcomer = |i: u8| IpAddr::from([10, 2, 0, i]);
        assert!(!r.allow(newcomer(1), t0 + 1_000), "full of active sources");
        assert_eq!(r.swept_at, Some(t0 + 1_000));
        assert!(!r.allow(newcomer(2), t0 + 2_000), "refused without a sweep");
        assert_eq!(
            r.swept_at,
            Some(t0 + 1_000),
            "no second sweep within the second"
        );
        assert!(
            r.allow(known, t0 + 3_000_000),
            "a source in the table goes on"
        );
        // A second on, the idle ones are swept out and a newcomer gets a bucket.
        assert!(r.allow(newcomer(3), t0 + 1_500_000_000));
        assert!(
            r.buckets.len() < 10,
            "the idle were swept: {}",
            r.buckets.len()
        );
    }

    #[test]
    fn allowed_prefixes_take_ipv4_and_ipv4_mapped_senders() {
        let a = Admission {
            allow: vec![
                "10.20.0.0/16".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ..Admission::default()
        };
        assert!(a.allows("10.20.3.4".parse().unwrap()));
        assert!(
            a.allows("::ffff:10.20.3.4".parse().unwrap()),
            "mapped on a [::] socket"
        );
        assert!(a.allows("2001:db8::9".parse().unwrap()));
        assert!(!a.allows("10.21.0.1".parse().unwrap()));
        assert!(!Admission::default().allows("10.20.3.4".parse().unwrap()));
    }

    #[test]
    fn the_window_shifts_as_a_bit_by_bit_shift_would() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for by in [1u32, 5, 63, 64, 65, 127, 128, 500, 1_023] {
            let mut w = Window::new(0, 0);
            let mut marked = vec![0]; // the top itself, marked by `new`
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = u32::try_from(x % u64::from(REPLAY_WINDOW)).unwrap();
                w.mark(b);
                marked.push(b);
            }
            w.advance(by);
            for b in 0..REPLAY_WINDOW {
                let want = b >= by && marked.contains(&(b - by));
                assert_eq!(w.seen(b), want, "shift {by}, bit {b}");
            }
        }
    }

    #[test]
    fn the_replay_window_takes_each_request_once_and_a_restarted_sender_again() {
        let mut r = Replays::default();
        // A sender: sequence n at time 1000 + n.
        for n in 0..2_000u32 {
            assert!(r.admit(7, n, 1_000 + u64::from(n)), "{n}");
        }
        assert!(!r.admit(7, 1_999, 2_999), "the newest again");
        assert!(!r.admit(7, 1_500, 2_500), "an older one again");
        assert!(!r.admit(7, 100, 1_100), "older than the window");
        // Reordered: 2,003 before 2,001 and 2,002; each once.
        assert!(r.admit(7, 2_003, 3_003));
        assert!(r.admit(7, 2_001, 3_001));
        assert!(r.admit(7, 2_002, 3_002));
        assert!(!r.admit(7, 2_002, 3_002));
        // A jump of more than the window forgets it all, and goes on from there.
        assert!(r.admit(7, 10_000, 11_000));
        assert!(!r.admit(7, 2_004, 3_004), "far behind and older");
        // The sender starts again at 0 with a newer clock: taken, and each once after.
        assert!(r.admit(7, 0, 20_000));
        assert!(r.admit(7, 1, 20_001));
        assert!(!r.admit(7, 0, 20_000));
        // Another SSID has its own window.
        assert!(r.admit(8, 1, 20_001));
        // A batch sent with one T1 (as our sender does): each of it taken, once.
        assert!(r.admit(7, 2, 20_005));
        assert!(r.admit(7, 3, 20_005));
        assert!(r.admit(7, 4, 20_005));
        assert!(!r.admit(7, 3, 20_005));
    }

    #[test]
    fn a_bucket_gives_its_rate_after_a_tenth_of_a_second_burst() {
        let t0 = 1_000_000_000;
        let mut b = Bucket::new(1_000, t0);
        assert_eq!((0..1_000).filter(|_| b.take(1_000, t0)).count(), 100);
        assert_eq!(
            (0..1_000)
                .filter(|_| b.take(1_000, t0 + 50_000_000))
                .count(),
            50
        );
    }

    /// The adversarial run: 131,072 SSIDs from another address reset a legitimate
    /// session's numbering to 0 (the table was cleared when full).
    #[test]
    fn another_source_cannot_reset_a_session() {
        let mut s = Sessions::default();
        let legit: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let t0 = 1_000_000_000;
        for i in 0..10 {
            assert_eq!(s.next(legit, 7, t0 + i), Some(u32::try_from(i).unwrap()));
        }
        let attacker: IpAddr = "198.51.100.9".parse().unwrap();
        let mut refused = 0;
        for ssid in 0..131_072u32 {
            let port = u16::try_from(1024 + ssid % 60_000).unwrap();
            let ssid16 = u16::try_from(ssid % 65_536).unwrap();
            if s.next(SocketAddr::new(attacker, port), ssid16, t0 + 20)
                .is_none()
            {
                refused += 1;
            }
        }
        assert_eq!(refused, 131_072 - MAX_SESSIONS_PER_SOURCE);
        assert_eq!(s.next(legit, 7, t0 + 30), Some(10), "numbering goes on");
        // Sources with their own bound each: another legitimate sender gets a session.
        assert_eq!(
            s.next("192.0.2.2:40000".parse().unwrap(), 7, t0 + 40),
            Some(0)
        );
    }

    #[test]
    fn a_full_table_forgets_only_idle_sessions() {
        let mut s = Sessions::default();
        let idle = u64::try_from(SESSION_IDLE.as_nanos()).unwrap();
        let active: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(s.next(active, 0, 0), Some(0));
        let mut t = 0;
        let mut filled = 1;
        'fill: for a in 0..=255u8 {
            for b in 0..=255u8 {
                let ip = IpAddr::from([10, 0, a, b]);
                if s.next(SocketAddr::new(ip, 9), 0, t).is_some() {
                    filled += 1;
                }
                if filled == MAX_TRACKED {
                    break 'fill;
                }
            }
        }
        // Full: a newcomer waits while every session is active...
        t += 1_000_000_000;
        assert_eq!(s.next(active, 0, t), Some(1));
        assert_eq!(s.next("203.0.113.1:5".parse().unwrap(), 0, t), None);
        // ...and gets one once the silent ones have been idle for SESSION_IDLE.
        t += idle;
        assert_eq!(s.next(active, 0, t), Some(2));
        assert_eq!(s.next("203.0.113.1:5".parse().unwrap(), 0, t + 1), Some(0));
        assert_eq!(s.next(active, 0, t + 2), Some(3));
    }

    #[test]
    fn reply_dscp_follows_the_policy_and_rp_says_whether_dscp1_was_honoured() {
        let ef = 46u8;
        // copy: DSCP1 when asked, else the received DSCP (ECN bits cleared).
        assert_eq!(
            reply_tos(ReplyDscp::Copy, Some(ef), 0),
            (Some(ef << 2), true)
        );
        assert_eq!(
            reply_tos(ReplyDscp::Copy, None, (34 << 2) | 1),
            (Some(34 << 2), false)
        );
        // A fixed value caps what a sender can have replies marked with (CS6, CS7 asked).
        assert_eq!(
            reply_tos(ReplyDscp::Fixed(0), Some(48), 0),
            (Some(0), false)
        );
        assert_eq!(
            reply_tos(ReplyDscp::Fixed(0), Some(56), 0),
            (Some(0), false)
        );
        assert_eq!(
            reply_tos(ReplyDscp::Fixed(ef), Some(ef), 0),
            (Some(ef << 2), true)
        );
        assert_eq!(reply_tos(ReplyDscp::Keep, Some(63), 63 << 2), (None, false));
        assert_eq!("copy".parse(), Ok(ReplyDscp::Copy));
        assert_eq!("keep".parse(), Ok(ReplyDscp::Keep));
        assert_eq!("0".parse(), Ok(ReplyDscp::Fixed(0)));
        assert!("64".parse::<ReplyDscp>().unwrap_err().contains("0 to 63"));
    }

    #[test]
    fn rate_limiter_off_allows_everything() {
        let mut r = RateLimiter::new(0);
        assert!((0..100_000).all(|_| r.allow("192.0.2.1".parse().unwrap(), 0)));
    }

    #[test]
    fn privileged_port_error_suggests_another() {
        let e = Error::Privileged {
            addr: "0.0.0.0:862".parse().unwrap(),
            suggestion: "0.0.0.0:8620".parse().unwrap(),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("862") && msg.contains("--listen 0.0.0.0:8620"),
            "{msg}"
        );
    }
}
