//! The STAMP Session-Reflector (RFC 8762 §4.3): batched receive, T2 from the kernel's
//! receive stamp, reply built by `proto`, T3 taken just before the batch is sent.
//!
//! - Stateless mode copies the sender's sequence number; stateful mode numbers each
//!   session's replies (a session is a source address and port with an SSID).
//! - The reply carries the received TTL, answers Class of Service with the DSCP and ECN it
//!   received, and is sent with DSCP1 when the request asks for one (RP = 0), else with the
//!   DSCP it arrived with.
//! - A per-source packet-rate cap (token bucket) keeps it from being used to flood a third
//!   party with spoofed requests. Malformed requests, and in authenticated mode any request
//!   whose HMAC fails, are counted and dropped: nothing is ever sent back for them.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use pathprobe_proto::stamp::reflect::{ReflectInput, finish, prepare};
use pathprobe_proto::stamp::tlv::{
    ClassOfService, TimestampInformation, TlvIter, TlvReflectInfo, sync_source, timestamp_method,
    tlv_type,
};
use pathprobe_proto::stamp::{AuthKey, ErrorEstimate, Mode, TimestampFormat};
use pathprobe_proto::{Error as ProtoError, report::TimestampSource};
use socket2::{Domain, Protocol, Socket, Type};

use crate::sys::{self, RecvBatch, RecvMeta, SendBatch};
use crate::{Error, Result};

/// Datagrams per `recvmmsg` / `sendmmsg`.
const BATCH: usize = 64;
/// Most sources (rate limiting) or sessions (stateful numbering) remembered; beyond it the
/// idle ones are forgotten.
const MAX_TRACKED: usize = 65_536;

/// How the reflector runs.
#[derive(Debug, Clone)]
pub struct ReflectorConfig {
    pub listen: SocketAddr,
    pub key: Option<AuthKey>,
    pub stateful: bool,
    /// Most requests per second answered per source address; 0 turns the cap off.
    pub max_rate_per_source: u32,
    pub timestamp_format: TimestampFormat,
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
}

impl ReflectorStats {
    /// A one-line summary.
    pub fn line(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "received {} reflected {} malformed {} auth-failed {} rate-limited {} send-failed {}",
            g(&self.received),
            g(&self.reflected),
            g(&self.malformed),
            g(&self.auth_failed),
            g(&self.rate_limited),
            g(&self.send_failed)
        )
    }
}

/// A token bucket per source address.
#[derive(Debug)]
struct RateLimiter {
    rate: u64,
    buckets: HashMap<IpAddr, (u64, u64)>,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        Self {
            rate: u64::from(rate),
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for `src` at `now_ns`; false when its bucket is empty. Tokens are kept
    /// in nanosecond units (1 token = 10^9) so that refills are exact integers; the bucket
    /// holds a tenth of a second of the rate (at least one request).
    fn allow(&mut self, src: IpAddr, now_ns: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        let full = (self.rate * 100_000_000).max(1_000_000_000);
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(&src) {
            // Forget sources idle for a second: their buckets are full again anyway.
            self.buckets
                .retain(|_, (_, last)| now_ns.saturating_sub(*last) < 1_000_000_000);
        }
        let (tokens, last) = self.buckets.entry(src).or_insert((full, now_ns));
        let refill = now_ns.saturating_sub(*last).saturating_mul(self.rate);
        *tokens = tokens.saturating_add(refill).min(full);
        *last = now_ns;
        if *tokens >= 1_000_000_000 {
            *tokens -= 1_000_000_000;
            true
        } else {
            false
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

/// What one reflector keeps between datagrams.
struct State<'a> {
    cfg: &'a ReflectorConfig,
    stats: &'a ReflectorStats,
    mode: Mode,
    limiter: RateLimiter,
    sessions: HashMap<(SocketAddr, u16), u32>,
    ee: ErrorEstimate,
    ts_info: TimestampInformation,
}

impl State<'_> {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The reply's own sequence number in stateful mode: per source and SSID.
    fn session_seq(&mut self, src: SocketAddr, payload: &[u8]) -> Option<u32> {
        if !self.cfg.stateful {
            return None;
        }
        let at = if self.mode == Mode::Authenticated {
            26
        } else {
            14
        };
        let ssid = u16::from_be_bytes([payload[at], payload[at + 1]]);
        if self.sessions.len() >= MAX_TRACKED && !self.sessions.contains_key(&(src, ssid)) {
            self.sessions.clear();
        }
        let next = self.sessions.entry((src, ssid)).or_insert(0);
        let seq = *next;
        *next = next.wrapping_add(1);
        Some(seq)
    }

    /// Queues the reply to one datagram in `tx`, or counts why there is none.
    fn answer(&mut self, payload: &[u8], meta: &RecvMeta, now_mono: u64, tx: &mut SendBatch) {
        let Some(src) = meta.src else {
            return Self::count(&self.stats.malformed);
        };
        if meta.truncated || payload.len() < self.mode.base_len() {
            return Self::count(&self.stats.malformed);
        }
        if !self.limiter.allow(src.ip(), now_mono) {
            return Self::count(&self.stats.rate_limited);
        }
        let t2 = meta.kernel_rx_ns.unwrap_or_else(sys::realtime_ns);
        let Ok(t2) = self.cfg.timestamp_format.encode(t2) else {
            return Self::count(&self.stats.malformed);
        };
        let received_tos = meta.tos.unwrap_or(0);
        let dscp1 = requested_dscp(&payload[self.mode.base_len()..]);
        let input = ReflectInput {
            key: self.cfg.key.as_ref(),
            sequence_number: self.session_seq(src, payload),
            receive_timestamp: t2,
            error_estimate: self.ee,
            received_ttl: meta.ttl.unwrap_or(0),
            tlv: TlvReflectInfo {
                received_tos,
                reverse_path: 0,
                timestamp_information: self.ts_info,
            },
        };
        let Some(slot) = tx.next_slot() else { return };
        match prepare(payload, &input, slot) {
            Ok(r) => {
                // DSCP1 when asked for (RP = 0 above), else the DSCP it came with.
                let tos = dscp1.map_or(received_tos & !0x03, |d| d << 2);
                tx.commit(r.len, Some(src), Some((self.cfg.listen.is_ipv6(), tos)));
            }
            Err(ProtoError::AuthenticationFailed) => Self::count(&self.stats.auth_failed),
            Err(_) => Self::count(&self.stats.malformed),
        }
    }
}

/// Stamps T3 on every queued reply, as late as possible, and sends them.
fn send_replies(sock: &Socket, tx: &mut SendBatch, cfg: &ReflectorConfig, stats: &ReflectorStats) {
    let queued = tx.len();
    let t3 = cfg
        .timestamp_format
        .encode(sys::realtime_ns())
        .unwrap_or_default();
    for i in 0..queued {
        if let Some(reply) = tx.payload_mut(i) {
            // Cannot fail: the reply was prepared in this mode.
            let _ = finish(reply, t3, cfg.key.as_ref());
        }
    }
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
    let mut reflector = State {
        cfg,
        stats,
        mode: if cfg.key.is_some() {
            Mode::Authenticated
        } else {
            Mode::Unauthenticated
        },
        limiter: RateLimiter::new(cfg.max_rate_per_source),
        sessions: HashMap::new(),
        ee,
        ts_info,
    };
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
        for i in 0..n {
            if let Some((payload, meta)) = rx.get(i) {
                reflector.answer(payload, meta, now_mono, &mut tx);
            }
        }
        if !tx.is_empty() {
            send_replies(sock, &mut tx, cfg, stats);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
