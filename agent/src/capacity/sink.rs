//! The receiving end of load: counts one stage's datagrams at a time (a session's, by
//! stage number), their IP octets, duplicates, the arrival span and the delivered rate in
//! each 100 ms interval. One thread receives in batches; the counts sit behind a mutex
//! taken once per batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use socket2::Socket;

use super::wire::{INTERVAL_NS, LoadHeader, SinkCount};
use crate::sys::{self, RecvBatch};

/// Highest sequence number tracked for duplicates (beyond it a datagram counts, unchecked):
/// 16 M datagrams, 2 MiB of bits.
const MAX_TRACKED_SEQ: u64 = 1 << 24;

#[derive(Debug, Default)]
struct Current {
    session: u64,
    stage: u32,
    /// Counting at all (between `begin` and the next `begin`).
    open: bool,
    duration_ns: u64,
    count: SinkCount,
    first_ns: u64,
    last_ns: u64,
    bins: Vec<u64>,
    seen: Vec<u64>,
}

/// Counts of the current stage, shared by the receive thread and its owner.
#[derive(Debug, Default)]
pub struct Sink {
    stage: Mutex<Current>,
}

impl Sink {
    /// Starts counting `stage` of `session` afresh; datagrams of anything else are ignored.
    pub fn begin(&self, session: u64, stage: u32, duration_ns: u64) {
        let mut s = self.lock();
        *s = Current {
            session,
            stage,
            open: true,
            duration_ns,
            ..Current::default()
        };
    }

    /// Stops counting.
    pub fn close(&self) {
        self.lock().open = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.stage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the current stage has counted so far.
    pub fn count(&self) -> SinkCount {
        let s = self.lock();
        let mut c = s.count.clone();
        c.span_ns = s.last_ns.saturating_sub(s.first_ns);
        // Only whole intervals inside both the stage and the arrivals.
        let whole = usize::try_from(c.span_ns.min(s.duration_ns) / INTERVAL_NS).unwrap_or(0);
        c.interval_bps = s
            .bins
            .iter()
            .take(whole)
            .map(|b| b * 8 * 1_000_000_000 / INTERVAL_NS)
            .collect();
        c
    }

    /// Counts the datagrams of one received batch; `overhead` is the UDP and IP header
    /// octets of each.
    fn account(&self, batch: &RecvBatch, n: usize, overhead: u64, now_ns: u64) {
        let mut s = self.lock();
        if !s.open {
            return;
        }
        for i in 0..n {
            let Some((data, meta)) = batch.get(i) else {
                continue;
            };
            if meta.truncated {
                continue;
            }
            let Some(h) = LoadHeader::read(data) else {
                continue;
            };
            if h.session != s.session || h.stage != s.stage {
                continue;
            }
            if h.seq < MAX_TRACKED_SEQ {
                let (word, bit) = (usize::try_from(h.seq / 64).unwrap_or(0), h.seq % 64);
                if s.seen.len() <= word {
                    s.seen.resize(word + 1, 0);
                }
                if s.seen[word] & (1 << bit) != 0 {
                    s.count.duplicates += 1;
                    continue;
                }
                s.seen[word] |= 1 << bit;
            }
            let bytes = data.len() as u64 + overhead;
            if s.count.packets == 0 {
                s.first_ns = now_ns;
                s.count.first_ip_bytes = bytes;
            }
            s.last_ns = now_ns;
            s.count.packets += 1;
            s.count.ip_bytes += bytes;
            let bin = usize::try_from((now_ns - s.first_ns) / INTERVAL_NS).unwrap_or(usize::MAX);
            if bin < 100_000 {
                if s.bins.len() <= bin {
                    s.bins.resize(bin + 1, 0);
                }
                s.bins[bin] += bytes;
            }
        }
    }

    /// Receives on `sock` (with a short read timeout set) until `stop`.
    pub fn run(&self, sock: &Socket, overhead: u64, stop: &AtomicBool) {
        let mut batch = RecvBatch::new(64);
        while !stop.load(Ordering::Relaxed) {
            // An error is the read timeout, there to look at `stop`.
            if let Ok(n) = batch.recv(sock) {
                self.account(&batch, n, overhead, sys::monotonic_ns());
            }
        }
    }
}
