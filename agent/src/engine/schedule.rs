//! The isochronous schedule every probe kind's sender keeps.

use std::sync::atomic::{AtomicBool, Ordering};

use super::Timing;
use crate::sys;

/// The sender sleeps until a margin before each deadline, then spins. The margin follows
/// how late this machine's sleeps actually end (twice the smoothed oversleep plus 20 µs,
/// kept between these bounds), so a VM with slow wake-ups spins longer and a quiet host
/// spends little CPU spinning.
const SPIN_MIN_NS: u64 = 20_000;
const SPIN_MAX_NS: u64 = 2_000_000;

/// The isochronous schedule every protocol's sender keeps: absolute deadlines, a sleep to
/// just before each (the margin follows how late this machine's sleeps end), then a spin.
/// A slot reached later than half the late timeout is skipped and counted: its probe could
/// be decided lost before its answer had time to come back. Any less late and it is sent,
/// its lateness showing in the RTT from the schedule.
#[derive(Debug)]
pub struct Schedule {
    start_ns: u64,
    interval_ns: u64,
    slots: Option<u64>,
    slot: u64,
    miss_after: u64,
    /// Smoothed oversleep (ns, exponential average over about 8 sleeps).
    oversleep: u64,
}

impl Schedule {
    /// The schedule of `cfg` from `start_ns`.
    pub fn new(cfg: &Timing, start_ns: u64) -> Self {
        let _ = sys::lower_timer_slack();
        Self {
            start_ns,
            interval_ns: cfg.interval_ns,
            slots: cfg.slots(),
            slot: 0,
            miss_after: cfg.late_timeout_ns / 2,
            oversleep: 50_000,
        }
    }

    fn over(&self) -> bool {
        self.slots.is_some_and(|n| self.slot >= n)
    }

    /// Sleeps until the next slot is due; its time now, or `None` when the schedule is over
    /// or `stop` is set. Wakes at least every 100 ms to look at `stop`.
    pub fn wait(&mut self, stop: &AtomicBool) -> Option<u64> {
        if self.over() || stop.load(Ordering::Relaxed) {
            return None;
        }
        let deadline = self.start_ns + self.slot * self.interval_ns;
        let margin = (2 * self.oversleep + SPIN_MIN_NS).clamp(SPIN_MIN_NS, SPIN_MAX_NS);
        loop {
            let now = sys::monotonic_ns();
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            if now + margin >= deadline {
                break;
            }
            let wake = (deadline - margin).min(now + 100_000_000);
            sys::sleep_until(wake);
            let late = sys::monotonic_ns().saturating_sub(wake);
            self.oversleep = (self.oversleep * 7 + late) / 8;
        }
        while sys::monotonic_ns() < deadline {
            std::hint::spin_loop();
        }
        Some(sys::monotonic_ns())
    }

    /// The slots due at `now`, at most `max`: their scheduled times go into `due`; returns
    /// how many were skipped as too late.
    pub fn take_due(&mut self, now: u64, max: usize, due: &mut Vec<u64>) -> u64 {
        due.clear();
        let mut missed = 0;
        while !self.over() && due.len() < max {
            let scheduled = self.start_ns + self.slot * self.interval_ns;
            if scheduled > now {
                break;
            }
            self.slot += 1;
            if now - scheduled > self.miss_after {
                missed += 1;
            } else {
                due.push(scheduled);
            }
        }
        missed
    }
}
