//! What the two ends of a capacity test say to each other (the agent's `capacity` module
//! drives it).
//!
//! - **Load datagrams** (UDP, to the far agent's sink port): `PPLD`, the stage number
//!   (u32), the session id (u64), the sequence number (u64), all big-endian, then padding
//!   to the stage's size. A sink counts only its session's current stage.
//! - **Control** (TCP, the reflector's port number): one JSON object per line each way.
//!   The client says `hello`, then for each stage `stage` (the sink resets and, for down
//!   and both, the far end starts sending) and `result`; `tcp` and `tcp_result` for a TCP
//!   stage. Every answer carries `ok`, and `error` when it is false. The far end gives a
//!   test its one slot only after a valid `hello`; when it has an authentication key, the
//!   `hello` answer carries a fresh `challenge` and the slot waits for an `auth` whose
//!   `proof` is [`hello_proof`] under that key.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stamp::AuthKey;
use crate::{Error, Result};

/// After a stage's load stops, the near end waits this long for the last datagrams.
pub const SETTLE: Duration = Duration::from_millis(300);
/// A knee search stops after this many rates (a rate measured again after a spike is one).
pub const MAX_SEARCH_STAGES: usize = 12;
/// Time the control exchange of a stage may take on top of the stage itself (the request,
/// the far end's count, a long path's round trips), for [`Shape::longest`].
pub const STAGE_OVERHEAD: Duration = Duration::from_secs(2);

/// The offered rates of a staircase of `steps` stages from `start` to `max` (bits/s).
pub fn staircase(start: u64, max: u64, steps: u32) -> Vec<u64> {
    if steps <= 1 || max <= start {
        return vec![max.max(start)];
    }
    let n = u64::from(steps - 1);
    (0..=n).map(|i| start + (max - start) * i / n).collect()
}

/// The stages a test runs, and how long each lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub start_bps: u64,
    pub max_bps: u64,
    pub steps: u32,
    pub search: bool,
    pub stage: Duration,
    pub direction: Direction,
    /// Numbers of TCP streams tried (one TCP stage per number and direction).
    pub tcp_stages: usize,
}

impl Shape {
    /// The longest the test can take: the idle stage, every load stage measured twice (a
    /// stage that fails on an RTT spike alone is measured again), and the TCP stages. A
    /// scheduled test must fit its window by this bound.
    pub fn longest(&self) -> Duration {
        let rates = if self.search {
            MAX_SEARCH_STAGES
        } else {
            staircase(self.start_bps, self.max_bps, self.steps).len()
        };
        let ways = usize::from(self.direction.up()) + usize::from(self.direction.down());
        let load = u32::try_from(2 * rates).unwrap_or(u32::MAX);
        let tcp = u32::try_from(self.tcp_stages * ways).unwrap_or(u32::MAX);
        self.stage
            .saturating_add(STAGE_OVERHEAD)
            .saturating_add((self.stage + SETTLE + STAGE_OVERHEAD).saturating_mul(load))
            .saturating_add((self.stage + STAGE_OVERHEAD).saturating_mul(tcp))
    }
}

/// Octets of a `hello` challenge.
pub const CHALLENGE_LEN: usize = 16;

/// What the proof covers: a fixed label (so that no tag of another protocol under the same
/// key can serve), the challenge and the session id.
fn proof_covers(challenge: &[u8; CHALLENGE_LEN], session: u64) -> [u8; 48] {
    let mut covered = [0u8; 48];
    covered[..24].copy_from_slice(b"pathprobe capacity hello");
    covered[24..40].copy_from_slice(challenge);
    covered[40..].copy_from_slice(&session.to_be_bytes());
    covered
}

/// The proof that the client holds the far end's key: HMAC-SHA-256 (truncated as STAMP
/// truncates it) over the label, the far end's challenge and the session id.
pub fn hello_proof(key: &AuthKey, challenge: &[u8; CHALLENGE_LEN], session: u64) -> [u8; 16] {
    key.tag(&proof_covers(challenge, session))
}

/// Checks a client's proof, in constant time.
pub fn check_hello_proof(
    key: &AuthKey,
    challenge: &[u8; CHALLENGE_LEN],
    session: u64,
    proof: &[u8],
) -> Result<()> {
    key.verify(&proof_covers(challenge, session), proof)
}

/// Hexadecimal text of octets (challenges and proofs travel as text in JSON).
pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    b.iter()
        .flat_map(|x| [DIGITS[usize::from(x >> 4)], DIGITS[usize::from(x & 0xf)]])
        .map(char::from)
        .collect()
}

/// Octets of hexadecimal text of exactly `N` octets.
pub fn from_hex<const N: usize>(s: &str) -> Result<[u8; N]> {
    let bad = || Error::InvalidField {
        field: "hex",
        reason: format!("expected {} hexadecimal digits", 2 * N),
    };
    if s.len() != 2 * N || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The first octets of every load datagram.
pub const MAGIC: [u8; 4] = *b"PPLD";
/// Octets of the load header; the smallest load datagram.
pub const HEADER_LEN: usize = 24;
/// The protocol version in `hello`.
pub const VERSION: u32 = 1;
/// Receive intervals of the throughput histogram.
pub const INTERVAL_NS: u64 = 100_000_000;

/// A load datagram's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadHeader {
    pub stage: u32,
    pub session: u64,
    pub seq: u64,
}

impl LoadHeader {
    /// Writes the header at the start of `buf` (at least [`HEADER_LEN`] octets).
    pub fn write(&self, buf: &mut [u8]) {
        buf[..4].copy_from_slice(&MAGIC);
        buf[4..8].copy_from_slice(&self.stage.to_be_bytes());
        buf[8..16].copy_from_slice(&self.session.to_be_bytes());
        buf[16..24].copy_from_slice(&self.seq.to_be_bytes());
    }

    /// Reads a header; `None` for anything else.
    pub fn read(buf: &[u8]) -> Option<Self> {
        if buf.len() < HEADER_LEN || buf[..4] != MAGIC {
            return None;
        }
        Some(Self {
            stage: u32::from_be_bytes(buf[4..8].try_into().ok()?),
            session: u64::from_be_bytes(buf[8..16].try_into().ok()?),
            seq: u64::from_be_bytes(buf[16..24].try_into().ok()?),
        })
    }
}

/// Which way load flows, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to far end.
    Up,
    /// Far end to client.
    Down,
    Both,
}

impl Direction {
    pub const fn up(self) -> bool {
        matches!(self, Self::Up | Self::Both)
    }

    pub const fn down(self) -> bool {
        matches!(self, Self::Down | Self::Both)
    }
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello {
        version: u32,
        session: u64,
    },
    /// The answer to the `hello` challenge: [`hello_proof`] in hexadecimal.
    Auth {
        proof: String,
    },
    /// Start stage `id`: the sink counts it; for down/both the far end sends to the
    /// client's address at `client_port`.
    Stage {
        id: u32,
        direction: Direction,
        rate_bps: u64,
        size: usize,
        duration_ms: u64,
        client_port: u16,
    },
    /// What the far end received (up) and sent (down) in stage `id`.
    Result {
        id: u32,
    },
    /// A TCP stage: `streams` connections to the TCP sink port for `duration_ms`.
    Tcp {
        id: u32,
        direction: Direction,
        streams: u32,
        duration_ms: u64,
    },
    TcpResult {
        id: u32,
    },
}

/// The far end's answer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `hello`, when the far end has a key: what the `auth` proof must cover (hexadecimal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
    /// `hello`: the UDP sink port and the TCP sink port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_port: Option<u16>,
    /// `hello`: the caps the far end enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stage_ms: Option<u64>,
    /// `result`: what arrived of the client's load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<SinkCount>,
    /// `result`: load datagrams the far end sent (down).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<u64>,
    /// `tcp_result`: octets received per stream (up) and the seconds they took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_bytes: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_seconds: Option<f64>,
}

impl Reply {
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            ..Self::default()
        }
    }

    pub fn ok() -> Self {
        Self {
            ok: true,
            ..Self::default()
        }
    }
}

/// What a sink counted of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SinkCount {
    /// Distinct datagrams of the stage (duplicates are not counted).
    pub packets: u64,
    pub duplicates: u64,
    /// IP octets (payload plus UDP and IP headers).
    pub ip_bytes: u64,
    /// Arrival of the first and last datagram, ns apart.
    pub span_ns: u64,
    /// IP octets of the first datagram (a train's rate excludes it).
    pub first_ip_bytes: u64,
    /// Delivered bits per second in each full [`INTERVAL_NS`] from the first arrival.
    pub interval_bps: Vec<u64>,
}

impl SinkCount {
    /// The delivered rate: the train's octets after the first over its span.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    pub fn delivered_bps(&self) -> u64 {
        if self.packets < 2 || self.span_ns == 0 {
            return 0;
        }
        ((self.ip_bytes - self.first_ip_bytes) as f64 * 8.0 * 1e9 / self.span_ns as f64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staircase_spans_start_to_max() {
        assert_eq!(staircase(10, 50, 5), [10, 20, 30, 40, 50]);
        assert_eq!(staircase(10, 50, 1), [50]);
        assert_eq!(staircase(50, 50, 4), [50]);
    }

    #[test]
    fn the_longest_test_counts_every_stage_measured_twice() {
        let shape = Shape {
            start_bps: 10,
            max_bps: 50,
            steps: 5,
            search: false,
            stage: Duration::from_secs(5),
            direction: Direction::Both,
            tcp_stages: 2,
        };
        // Idle 5+2, ten load stages of 5+0.3+2, two stream counts both ways of 5+2.
        assert_eq!(shape.longest(), Duration::from_secs(7 + 73 + 28));
        let search = Shape {
            search: true,
            tcp_stages: 0,
            direction: Direction::Up,
            ..shape
        };
        assert_eq!(search.longest(), Duration::from_millis(7_000 + 24 * 7_300));
    }

    #[test]
    fn a_hello_proof_holds_only_for_its_key_challenge_and_session() {
        let key = AuthKey::new(&[7u8; 32]).unwrap();
        let other = AuthKey::new(&[8u8; 32]).unwrap();
        let challenge = [0x42u8; CHALLENGE_LEN];
        let proof = hello_proof(&key, &challenge, 9);
        check_hello_proof(&key, &challenge, 9, &proof).unwrap();
        assert!(check_hello_proof(&other, &challenge, 9, &proof).is_err());
        assert!(check_hello_proof(&key, &[0x43; CHALLENGE_LEN], 9, &proof).is_err());
        assert!(check_hello_proof(&key, &challenge, 10, &proof).is_err());
        assert!(check_hello_proof(&key, &challenge, 9, &proof[..15]).is_err());
        let text = to_hex(&proof);
        assert_eq!(from_hex::<16>(&text).unwrap(), proof);
        assert!(from_hex::<16>("zz").is_err());
        assert!(from_hex::<2>("é0").is_err());
    }

    #[test]
    fn load_header_round_trips_and_rejects_strangers() {
        let h = LoadHeader {
            stage: 7,
            session: 0x0102_0304_0506_0708,
            seq: u64::MAX,
        };
        let mut buf = [0u8; 64];
        h.write(&mut buf);
        assert_eq!(&buf[..8], b"PPLD\0\0\0\x07");
        assert_eq!(LoadHeader::read(&buf), Some(h));
        assert_eq!(LoadHeader::read(&buf[..23]), None);
        buf[0] = b'X';
        assert_eq!(LoadHeader::read(&buf), None);
    }

    #[test]
    fn requests_are_tagged_json_lines() {
        let r = Request::Stage {
            id: 2,
            direction: Direction::Both,
            rate_bps: 50_000_000,
            size: 1372,
            duration_ms: 5000,
            client_port: 40000,
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(
            j.starts_with(r#"{"op":"stage","id":2,"direction":"both""#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }

    proptest::proptest! {
        /// Any datagram a peer sends to the sink is a header or nothing, never a panic.
        #[test]
        fn any_datagram_reads_as_a_header_or_nothing(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let h = LoadHeader::read(&data);
            proptest::prop_assert_eq!(h.is_some(), data.len() >= HEADER_LEN && data[..4] == MAGIC);
        }

        /// Every stage request, whatever its numbers, crosses the wire unchanged.
        #[test]
        fn any_stage_request_round_trips(id in proptest::prelude::any::<u32>(), dir in 0u8..3,
                                         rate_bps in proptest::prelude::any::<u64>(), size in proptest::prelude::any::<usize>(),
                                         duration_ms in proptest::prelude::any::<u64>(), client_port in proptest::prelude::any::<u16>()) {
            let direction = [Direction::Up, Direction::Down, Direction::Both][usize::from(dir)];
            let r = Request::Stage { id, direction, rate_bps, size, duration_ms, client_port };
            let line = serde_json::to_string(&r).unwrap();
            proptest::prop_assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        }
    }

    #[test]
    fn delivered_rate_is_the_train_after_its_first_packet() {
        // 11 packets of 1000 octets, one every ms: 10 × 8000 bits in 10 ms = 8 Mbit/s.
        let c = SinkCount {
            packets: 11,
            ip_bytes: 11_000,
            first_ip_bytes: 1000,
            span_ns: 10_000_000,
            ..SinkCount::default()
        };
        assert_eq!(c.delivered_bps(), 8_000_000);
        assert_eq!(SinkCount { packets: 1, ..c }.delivered_bps(), 0);
    }
}
