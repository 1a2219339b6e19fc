//! One schedule for every path of the engine, sans-IO: a heap of each path's next
//! deadline, phases spread so that a thousand paths at 10/s do not all fire at once, and
//! the due slots of every path handed out together. It never reads a clock: the sender
//! thread tells it the time, and its tests run on simulated time.
//!
//! Paths slower than [`PRECISE_BELOW_NS`] between probes start on a grid ([`grid`]): a
//! whole number of milliseconds, up to [`MAX_GRID_NS`], that divides their interval, so
//! every one of their deadlines falls on it and the sender wakes at most once a grid step
//! for all of them. A thousand paths at 10/s fall on ten 10 ms steps, a hundred per step,
//! and the sender wakes 100 times a second, not 1,000. Faster paths start as soon as they
//! can and are waited for precisely (sleep, then spin to the deadline); the slow ones only
//! sleep.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// The grid slow paths' deadlines fall on, and how late the sender may wake for them.
pub const TICK_NS: u64 = 1_000_000;
/// Paths that probe more often than this are waited for precisely (sleep, then spin).
pub const PRECISE_BELOW_NS: u64 = 10_000_000;
/// The coarsest grid a slow path's phase is placed on.
pub const MAX_GRID_NS: u64 = 10_000_000;
/// A slow path's interval holds at least this many grid steps: its phase has that many
/// places to be spread over.
const MIN_STEPS: u64 = 10;

/// How long after it is added a path's first probe may be due, at the earliest: room for
/// the engine's threads to take it in.
pub const LEAD_NS: u64 = 2_000_000;

/// A path's place in the timetable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slots {
    /// When the first slot is due (monotonic ns).
    pub start_ns: u64,
    pub interval_ns: u64,
    /// How many slots in all (`None`: until removed).
    pub count: Option<u64>,
    /// A slot reached later than this is skipped and counted, not sent.
    pub miss_after_ns: u64,
}

/// The grid a slow path's deadlines fall on: the coarsest of 10, 5, 2 and 1 ms that
/// divides `interval_ns` into at least [`MIN_STEPS`] steps; 1 ms ([`TICK_NS`]) when none
/// does (then its later deadlines fall between ticks).
pub fn grid(interval_ns: u64) -> u64 {
    [MAX_GRID_NS, 5_000_000, 2_000_000]
        .into_iter()
        .find(|&g| interval_ns.is_multiple_of(g) && interval_ns / g >= MIN_STEPS)
        .unwrap_or(TICK_NS)
}

/// The first deadline of the `k`th path placed, for one probing every `interval_ns`,
/// added at `now_ns`: at least [`LEAD_NS`] ahead; for a slow path on its [`grid`], at a
/// phase within its interval taken from the golden-ratio sequence (k·φ mod 1), which
/// spreads any number of paths evenly, however many come and go.
pub fn place(k: u64, interval_ns: u64, now_ns: u64) -> u64 {
    // 2^64 / φ: the fractional part of k·φ, in 64-bit fixed point.
    const FRAC_PHI: u64 = 0x9e37_79b9_7f4a_7c15;
    let earliest = now_ns + LEAD_NS;
    if interval_ns < PRECISE_BELOW_NS {
        return earliest;
    }
    let step = grid(interval_ns);
    let frac = k.wrapping_mul(FRAC_PHI);
    let steps = (interval_ns / step).max(1);
    let phase = u64::try_from((u128::from(frac) * u128::from(steps)) >> 64).unwrap_or(0) * step;
    earliest.div_ceil(step) * step + phase
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    slots: Slots,
    /// The next slot's number.
    next: u64,
}

impl Entry {
    fn deadline(&self) -> u64 {
        self.slots.start_ns + self.next * self.slots.interval_ns
    }

    fn over(&self) -> bool {
        self.slots.count.is_some_and(|n| self.next >= n)
    }
}

/// A slot due now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    pub path: u32,
    pub scheduled_ns: u64,
}

/// What [`Timetable::take_due`] found besides the due slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// `count` slots of `path` were reached too late and skipped; the first was due at
    /// `scheduled_ns`.
    Missed {
        path: u32,
        scheduled_ns: u64,
        count: u64,
    },
    /// `path` has no slots left (its count is spent); it is no longer in the timetable.
    Over { path: u32 },
}

/// Every path's schedule.
#[derive(Debug, Default)]
pub struct Timetable {
    /// By path number; `None` once removed.
    entries: Vec<Option<Entry>>,
    /// (deadline, path): exactly one live entry per path in the timetable; entries of
    /// removed paths are dropped when they come up.
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    live: usize,
}

impl Timetable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Paths in the timetable.
    pub const fn len(&self) -> usize {
        self.live
    }

    pub const fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Adds `path` (a number never used before in this timetable, or one removed).
    pub fn add(&mut self, path: u32, slots: Slots) {
        let i = path as usize;
        if self.entries.len() <= i {
            self.entries.resize(i + 1, None);
        }
        if self.entries[i].is_some() {
            self.remove(path);
        }
        let e = Entry { slots, next: 0 };
        if e.over() {
            return;
        }
        self.entries[i] = Some(e);
        self.heap.push(Reverse((e.deadline(), path)));
        self.live += 1;
    }

    /// Removes `path`: no slot of it is due again.
    pub fn remove(&mut self, path: u32) {
        if let Some(slot) = self.entries.get_mut(path as usize)
            && slot.take().is_some()
        {
            self.live -= 1;
        }
    }

    /// Whether `path` is in the timetable.
    pub fn contains(&self, path: u32) -> bool {
        self.entries.get(path as usize).is_some_and(Option::is_some)
    }

    /// Drops heap entries of removed paths from the top.
    fn settle(&mut self) {
        while let Some(&Reverse((deadline, path))) = self.heap.peek() {
            match self.entries.get(path as usize).copied().flatten() {
                Some(e) if e.deadline() == deadline => return,
                _ => {
                    self.heap.pop();
                }
            }
        }
    }

    /// The earliest deadline, and whether its path is waited for precisely (sleep, then
    /// spin) rather than slept for.
    pub fn next_deadline(&mut self) -> Option<(u64, bool)> {
        self.settle();
        let &Reverse((deadline, path)) = self.heap.peek()?;
        let precise = self
            .entries
            .get(path as usize)
            .copied()
            .flatten()
            .is_some_and(|e| e.slots.interval_ns < PRECISE_BELOW_NS);
        Some((deadline, precise))
    }

    /// Every slot due at `now_ns`, of every path, at most `max`, into `due` (cleared
    /// first), in deadline order; skipped slots and spent paths into `notes` (cleared
    /// first). Slots left over past `max` stay due for the next call.
    pub fn take_due(&mut self, now_ns: u64, max: usize, due: &mut Vec<Due>, notes: &mut Vec<Note>) {
        due.clear();
        notes.clear();
        while due.len() < max {
            self.settle();
            let Some(&Reverse((deadline, path))) = self.heap.peek() else {
                break;
            };
            if deadline > now_ns {
                break;
            }
            self.heap.pop();
            let Some(mut e) = self.entries[path as usize] else {
                continue;
            };
            let mut missed: Option<(u64, u64)> = None;
            while !e.over() && due.len() < max {
                let scheduled = e.deadline();
                if scheduled > now_ns {
                    break;
                }
                e.next += 1;
                if now_ns - scheduled > e.slots.miss_after_ns {
                    let m = missed.get_or_insert((scheduled, 0));
                    m.1 += 1;
                } else {
                    due.push(Due {
                        path,
                        scheduled_ns: scheduled,
                    });
                }
            }
            if let Some((scheduled_ns, count)) = missed {
                notes.push(Note::Missed {
                    path,
                    scheduled_ns,
                    count,
                });
            }
            if e.over() {
                self.entries[path as usize] = None;
                self.live -= 1;
                notes.push(Note::Over { path });
            } else {
                self.entries[path as usize] = Some(e);
                self.heap.push(Reverse((e.deadline(), path)));
            }
        }
        // Slots of several paths due at once are handed out path by path; put them in
        // deadline order, as they were due.
        due.sort_by_key(|d| d.scheduled_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn slots(start_ns: u64, interval_ns: u64, count: Option<u64>) -> Slots {
        Slots {
            start_ns,
            interval_ns,
            count,
            miss_after_ns: 1_000 * MS,
        }
    }

    /// A small deterministic generator (xorshift), for simulated wake-up lateness.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Runs a sender on simulated time from `from` to `until`: it wakes at the earliest
    /// deadline (a slow one rounded up to the tick grid, like the engine's sleep) plus up
    /// to `jitter` of wake-up lateness, and takes what is due. Returns every slot sent.
    fn simulate(t: &mut Timetable, until: u64, jitter: u64, rng: &mut Rng) -> Vec<(Due, u64)> {
        let mut sent = Vec::new();
        let (mut due, mut notes) = (Vec::new(), Vec::new());
        while let Some((deadline, precise)) = t.next_deadline() {
            if deadline > until {
                break;
            }
            let wake = if precise {
                deadline
            } else {
                deadline.div_ceil(TICK_NS) * TICK_NS
            };
            let now = wake + rng.next() % (jitter + 1);
            t.take_due(now, 1024, &mut due, &mut notes);
            assert!(
                notes.iter().all(|n| !matches!(n, Note::Missed { .. })),
                "{notes:?}"
            );
            sent.extend(due.iter().map(|d| (*d, now)));
        }
        sent
    }

    #[test]
    fn a_thousand_paths_at_mixed_rates_send_within_a_tick_of_their_schedule() {
        let mut t = Timetable::new();
        let rates = [1u64, 2, 5, 10, 20, 50, 100, 1_000];
        let mut plan = Vec::new();
        for k in 0..1_000u32 {
            let interval = 1_000 * MS / rates[k as usize % rates.len()];
            let start = place(u64::from(k), interval, 0);
            t.add(k, slots(start, interval, None));
            plan.push((start, interval));
        }
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let sent = simulate(&mut t, 3_000 * MS, TICK_NS / 2, &mut rng);
        let mut next = vec![0u64; 1_000];
        for (d, at) in &sent {
            let (start, interval) = plan[d.path as usize];
            let k = next[d.path as usize];
            assert_eq!(
                d.scheduled_ns,
                start + k * interval,
                "path {} slot {k}",
                d.path
            );
            assert!(*at >= d.scheduled_ns, "never early");
            assert!(
                *at - d.scheduled_ns <= TICK_NS,
                "path {} slot {k}: {} ns late",
                d.path,
                *at - d.scheduled_ns
            );
            next[d.path as usize] += 1;
        }
        // Every path sent every slot due in the span, none skipped.
        for (p, &(start, interval)) in plan.iter().enumerate() {
            let expected = (3_000 * MS).saturating_sub(start) / interval + 1;
            assert!(
                next[p].abs_diff(expected) <= 1,
                "path {p}: {} of {expected}",
                next[p]
            );
        }
    }

    #[test]
    fn phases_are_spread_over_the_interval() {
        // (interval, its grid): 1,000 paths at 10/s over ten 10 ms steps; at 1/s over a
        // hundred; at 50/s over ten 2 ms steps; at 30/s (33 ms: no coarser grid divides
        // it) over 33 ticks.
        for (interval, step) in [
            (100 * MS, 10 * MS),
            (1_000 * MS, 10 * MS),
            (20 * MS, 2 * MS),
            (33 * MS, MS),
        ] {
            assert_eq!(grid(interval), step);
            let steps = usize::try_from(interval / step).unwrap();
            let mut per_step = vec![0u32; steps];
            for k in 0..1_000u64 {
                let start = place(k, interval, 0);
                assert_eq!(start % step, 0, "on the grid");
                per_step[usize::try_from(start / step).unwrap() % steps] += 1;
            }
            // Never a pile-up: every step within 3% (and 2 paths) of the mean.
            let mean = 1_000 / u32::try_from(steps).unwrap();
            let (most, least) = (
                *per_step.iter().max().unwrap(),
                *per_step.iter().min().unwrap(),
            );
            let slack = (mean * 3 / 100).max(2);
            assert!(
                most <= mean + slack && least + slack >= mean,
                "{interval}: {per_step:?}"
            );
        }
        // A fast path is not held back for a phase.
        assert_eq!(place(7, MS, 5 * MS), 5 * MS + LEAD_NS);
    }

    #[test]
    fn adding_and_removing_paths_mid_run_leaves_the_others_alone() {
        let mut t = Timetable::new();
        for k in 0..10 {
            t.add(k, slots(place(u64::from(k), 100 * MS, 0), 100 * MS, None));
        }
        let mut rng = Rng(7);
        let first = simulate(&mut t, 1_000 * MS, 0, &mut rng);
        t.remove(3);
        t.add(10, slots(place(10, 100 * MS, 1_000 * MS), 100 * MS, None));
        let second = simulate(&mut t, 2_000 * MS, 0, &mut rng);
        assert!(!second.iter().any(|(d, _)| d.path == 3), "removed");
        let added: Vec<_> = second.iter().filter(|(d, _)| d.path == 10).collect();
        assert!(added.len() >= 9, "{}", added.len());
        assert!(added[0].0.scheduled_ns >= 1_000 * MS + LEAD_NS);
        // Path 5 goes on exactly where it was.
        let p5: Vec<u64> = first
            .iter()
            .chain(&second)
            .filter(|(d, _)| d.path == 5)
            .map(|(d, _)| d.scheduled_ns)
            .collect();
        for w in p5.windows(2) {
            assert_eq!(w[1] - w[0], 100 * MS);
        }
        assert_eq!(t.len(), 10);
    }

    #[test]
    fn late_slots_are_skipped_and_spent_paths_reported() {
        let mut t = Timetable::new();
        t.add(
            0,
            Slots {
                start_ns: 0,
                interval_ns: 10 * MS,
                count: Some(10),
                miss_after_ns: 100 * MS,
            },
        );
        let (mut due, mut notes) = (Vec::new(), Vec::new());
        t.take_due(25 * MS, 64, &mut due, &mut notes);
        assert_eq!(due.len(), 3);
        assert!(notes.is_empty());
        t.take_due(155 * MS, 64, &mut due, &mut notes);
        let sched: Vec<u64> = due.iter().map(|d| d.scheduled_ns).collect();
        assert_eq!(sched, [60 * MS, 70 * MS, 80 * MS, 90 * MS]);
        assert_eq!(
            notes,
            [
                Note::Missed {
                    path: 0,
                    scheduled_ns: 30 * MS,
                    count: 3
                },
                Note::Over { path: 0 }
            ]
        );
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn a_batch_limit_leaves_the_rest_due() {
        let mut t = Timetable::new();
        t.add(0, slots(0, MS / 10, None));
        let (mut due, mut notes) = (Vec::new(), Vec::new());
        t.take_due(10 * MS, 64, &mut due, &mut notes);
        assert_eq!(due.len(), 64);
        t.take_due(10 * MS, 64, &mut due, &mut notes);
        assert_eq!(due.len(), 37);
        assert_eq!(due[0].scheduled_ns, 64 * MS / 10);
    }
}
