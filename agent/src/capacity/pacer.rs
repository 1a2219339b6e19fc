//! The load generator: UDP datagrams on a connected socket at a bit rate, paced against
//! absolute deadlines. Each wake-up sends everything due by then in one system call: one
//! GSO send (the kernel cuts it into datagrams after one trip through the stack) when the
//! kernel offers UDP segmentation, else one `sendmmsg`. Rates count IP octets (payload plus
//! UDP and IP headers), as circuits are sold.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::Socket;

use super::wire::{HEADER_LEN, LoadHeader};
use crate::sys::{self, SendBatch};

/// Datagrams per system call at most (the kernel's GSO limit is 64 segments and 64 KiB).
const MAX_BURST: usize = 64;
/// Largest GSO send.
const GSO_MAX_BYTES: usize = 65_000;

/// One stage's load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rate_bps: u64,
    /// UDP payload octets (at least [`HEADER_LEN`]).
    pub size: usize,
    /// UDP and IP header octets: 28 for IPv4, 48 for IPv6.
    pub overhead: usize,
    pub duration_ns: u64,
    pub stage: u32,
    pub session: u64,
}

impl Load {
    /// IP octets of one datagram.
    pub const fn ip_bytes(&self) -> usize {
        self.size + self.overhead
    }

    /// Nanoseconds between datagrams, as a fraction.
    #[allow(clippy::cast_precision_loss)]
    fn interval_ns(&self) -> f64 {
        (self.ip_bytes() * 8) as f64 * 1e9 / self.rate_bps.max(1) as f64
    }

    /// Datagrams the stage calls for.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    pub fn total(&self) -> u64 {
        (self.duration_ns as f64 / self.interval_ns())
            .floor()
            .max(1.0) as u64
    }
}

/// What the pacer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paced {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams the kernel refused (a full buffer, an unreachable peer).
    pub refused: u64,
    /// Whether GSO was used.
    pub gso: bool,
    /// How far behind its schedule the pacer fell at worst, ns.
    pub max_behind_ns: u64,
    /// The 99th percentile of how late it was at each send (a host's scheduling stalls): a
    /// late sender sends what was due at once, and that burst queues at a bottleneck even
    /// below its rate.
    pub behind_p99_ns: u64,
    /// Start and end of sending, monotonic ns.
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Sends `load` on the connected `sock` until done or `stop`; `try_gso` allows segmentation
/// offload.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
pub fn pace(sock: &Socket, load: &Load, stop: &AtomicBool, try_gso: bool) -> io::Result<Paced> {
    if load.size < HEADER_LEN || load.size > sys::MAX_DATAGRAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "load datagrams must be {HEADER_LEN} to {} octets",
                sys::MAX_DATAGRAM
            ),
        ));
    }
    let _ = sys::lower_timer_slack();
    let gso = try_gso
        && u16::try_from(load.size)
            .ok()
            .is_some_and(|s| sys::enable_udp_gso(sock, s).is_ok());
    let burst = if gso {
        (GSO_MAX_BYTES / load.size).clamp(1, MAX_BURST)
    } else {
        MAX_BURST
    };
    let mut gso_buf = vec![0u8; if gso { burst * load.size } else { 0 }];
    let mut batch = if gso {
        None
    } else {
        Some(SendBatch::new(burst))
    };
    let interval = load.interval_ns();
    let total = load.total();
    let start = sys::monotonic_ns() + 1_000_000;
    let mut done = Paced {
        gso,
        start_ns: start,
        ..Paced::default()
    };
    // Lateness of each send, µs, kept without allocating on the way (first 65,536).
    let mut late_us: Vec<u32> = Vec::with_capacity(1 << 16);
    let mut seq = 0u64;
    let mut header = LoadHeader {
        stage: load.stage,
        session: load.session,
        seq: 0,
    };
    // A generator that falls behind stops at the stage's end all the same (and reports
    // what it sent): every stage is bounded in time.
    let end = start + load.duration_ns;
    while seq < total && !stop.load(Ordering::Relaxed) {
        let next_at = start + (seq as f64 * interval) as u64;
        let now = sys::monotonic_ns();
        if now >= end {
            break;
        }
        if now < next_at {
            sys::sleep_until(next_at);
            continue;
        }
        // Everything due by now, one system call at a time.
        let due = (((now - start) as f64 / interval) as u64 + 1).min(total);
        done.max_behind_ns = done.max_behind_ns.max(now - next_at);
        if late_us.len() < late_us.capacity() {
            late_us.push(u32::try_from((now - next_at) / 1_000).unwrap_or(u32::MAX));
        }
        while seq < due {
            let n = usize::try_from(due - seq).unwrap_or(burst).min(burst);
            let took = if let Some(batch) = batch.as_mut() {
                for i in 0..n {
                    let Some(slot) = batch.next_slot() else { break };
                    header.seq = seq + i as u64;
                    header.write(slot);
                    batch.commit(load.size, None, None);
                }
                batch.send(sock).unwrap_or(0)
            } else {
                for (i, seg) in gso_buf.chunks_mut(load.size).take(n).enumerate() {
                    header.seq = seq + i as u64;
                    header.write(seg);
                }
                match sock.send(&gso_buf[..n * load.size]) {
                    Ok(_) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                }
            };
            done.sent += took as u64;
            done.refused += (n - took.min(n)) as u64;
            seq += n as u64;
        }
    }
    done.end_ns = sys::monotonic_ns();
    if !late_us.is_empty() {
        let at = late_us.len() * 99 / 100;
        let (_, p99, _) = late_us.select_nth_unstable(at);
        done.behind_p99_ns = u64::from(*p99) * 1_000;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_counts_ip_bits() {
        // 1400-octet IP packets at 11.2 Mbit/s: 1,000 a second.
        let load = Load {
            rate_bps: 11_200_000,
            size: 1372,
            overhead: 28,
            duration_ns: 2_000_000_000,
            stage: 0,
            session: 0,
        };
        assert!((load.interval_ns() - 1e6).abs() < 1e-3);
        assert_eq!(load.total(), 2000);
    }
}
