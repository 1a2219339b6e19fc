//! The probe engine, protocol-independent: every probe kind (STAMP, `tcp-syn`,
//! `tcp-connect`) runs on it.
//!
//! ```text
//! kind's sender thread --TxEvent (Sent / Failed / Missed)--> ArrayQueue --+
//!                                                                         v
//!                                       aggregator (caller's thread): Tracker, windows -> Sink
//!                                                                         ^
//! kind's receiver thread --RxEvent (TxStamp / Reply)-------> ArrayQueue --+
//! ```
//!
//! A kind is an [`Io`]: what its two threads do. The engine owns the rings, the
//! [`Schedule`] every sender keeps, the aggregator that feeds the sans-IO
//! [`session::Tracker`], and the [`Sink`] that takes each window. Time comes from a
//! [`Clock`], so the engine runs on simulated time in its tests. The I/O threads never
//! block on a ring, log or allocate per packet: a full ring drops the record and counts
//! it.

pub mod mux;
mod schedule;
pub mod session;
pub mod timetable;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;

pub use schedule::Schedule;

use crate::sys;
use crate::{Error, Result};
use session::{Decided, Reply, Sent, Tracker, TrackerConfig, WindowStats};

/// Records each ring holds: over a second at 50,000 probes/s.
const RING: usize = 1 << 16;

/// When and how long a session probes, whatever the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Named in errors and warnings.
    pub target: SocketAddr,
    pub interval_ns: u64,
    pub count: Option<u64>,
    pub duration_ns: Option<u64>,
    pub window_ns: u64,
    pub late_timeout_ns: u64,
    /// Give up when nothing at all has answered this long after the first probe
    /// (`u64::MAX`: never).
    pub no_reply_ns: u64,
}

impl Timing {
    /// Scheduled probes: the smaller of the count and duration / interval; `None` runs
    /// until stopped.
    pub fn slots(&self) -> Option<u64> {
        let by_time = self
            .duration_ns
            .map(|d| d.div_ceil(self.interval_ns.max(1)).max(1));
        match (self.count, by_time) {
            (Some(c), Some(t)) => Some(c.min(t)),
            (c, t) => c.or(t),
        }
    }
}

/// What a probe kind does on the engine's two I/O threads.
pub trait Io: Sync {
    /// The sender thread: keeps a [`Schedule`] from `start_ns` and pushes what it sent,
    /// until the schedule is over or `shared.stop_tx` is set.
    fn send(&self, start_ns: u64, ring: &ArrayQueue<TxEvent>, shared: &Shared);
    /// The receiver thread: pushes transmit stamps and answers until `shared.stop_rx` is
    /// set. An answer is pushed only after its probe's `Sent` was.
    fn receive(&self, ring: &ArrayQueue<RxEvent>, shared: &Shared);
}

/// The aggregator's time.
pub trait Clock: Sync {
    fn monotonic_ns(&self) -> u64;
    fn realtime_ns(&self) -> u64;
    /// Between two passes of the aggregator.
    fn pause(&self);
}

/// The system's clocks; a pass every millisecond.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn monotonic_ns(&self) -> u64 {
        sys::monotonic_ns()
    }
    fn realtime_ns(&self) -> u64 {
        sys::realtime_ns()
    }
    fn pause(&self) {
        thread::sleep(Duration::from_millis(1));
    }
}

/// What the sender thread tells the aggregator.
#[derive(Debug, Clone, Copy)]
pub enum TxEvent {
    /// A probe left.
    Sent(Sent),
    /// The kernel did not take this probe: its number is given back.
    Failed(u32),
    /// Slots skipped (reached too late, or no socket for them).
    Missed { scheduled_ns: u64, count: u64 },
}

/// What the receiver thread tells the aggregator.
#[derive(Debug, Clone, Copy)]
pub enum RxEvent {
    /// The kernel's transmit stamp of a probe (by its transmit id).
    TxStamp { id: u32, mono_ns: u64, wall_ns: u64 },
    /// An answer.
    Reply(Reply),
}

/// State shared by the three threads.
#[derive(Debug, Default)]
pub struct Shared {
    /// The sender should stop after its current batch.
    pub stop_tx: AtomicBool,
    /// Set by the engine when the sender has returned.
    pub sender_done: AtomicBool,
    /// The receiver should stop.
    pub stop_rx: AtomicBool,
    pub tx_drops: CachePadded<AtomicU64>,
    pub rx_drops: CachePadded<AtomicU64>,
    /// Datagrams that were not a valid answer to us.
    pub malformed: CachePadded<AtomicU64>,
    /// The target said nothing listens (ICMP port unreachable).
    pub unreachable: AtomicBool,
}

/// Records `missed` slots skipped at `now`, if any.
pub fn push_missed(q: &ArrayQueue<TxEvent>, now: u64, missed: u64, shared: &Shared) {
    if missed > 0 {
        push(
            q,
            TxEvent::Missed {
                scheduled_ns: now,
                count: missed,
            },
            &shared.tx_drops,
        );
    }
}

/// Pushes `v`; a full ring drops it and counts the drop in `drops` (an I/O thread never
/// blocks on a ring).
pub fn push<T>(q: &ArrayQueue<T>, v: T, drops: &AtomicU64) {
    if q.push(v).is_err() {
        drops.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a probe session's results go, on the aggregator's thread: every closed window,
/// and (for a sink that wants them) every probe as it is decided. Keep both quick: the
/// aggregator drains the I/O threads' rings between calls.
pub trait Sink {
    /// A window closed.
    fn window(&mut self, w: &WindowStats);
    /// A window closed, handed over (for a sink that sends it on: no copy of its
    /// histograms). Used in place of [`Self::window`] when the session keeps no windows.
    fn window_owned(&mut self, w: WindowStats) {
        self.window(&w);
    }
    /// Probes decided since the last call, in sequence order.
    fn probes(&mut self, _decided: &[Decided]) {}
    /// Whether closed windows may keep their histograms compact
    /// ([`session::WindowStats::compact`]), for a sink that makes them full elsewhere.
    fn compact_windows(&self) -> bool {
        false
    }
    /// Whether to follow probes one by one (costs a record per probe).
    fn wants_probes(&self) -> bool {
        false
    }
    /// The sink has what it came for: the session stops as if `stop` were set (without
    /// touching the caller's flag).
    fn finished(&self) -> bool {
        false
    }
    /// Whether the session returns its windows when it ends (for a summary). A session
    /// that runs for good (the daemon's) must not: each window holds its histograms, about
    /// 1 MiB, and they would pile up for as long as it runs.
    fn keeps_windows(&self) -> bool {
        true
    }
}

impl<F: FnMut(&WindowStats)> Sink for F {
    fn window(&mut self, w: &WindowStats) {
        self(w);
    }
}

/// Runs a probe session of any kind: `io` sends on one thread (keeping the schedule from
/// the start it is given) and receives on another; the caller's thread feeds the tracker
/// and closes windows into `sink`, with the time `clock` tells. `local_sync`: this host's
/// clock error bound when it is synchronized.
pub fn run(
    cfg: &Timing,
    clock: &dyn Clock,
    io: &dyn Io,
    stop: &AtomicBool,
    local_sync: Option<u64>,
    sink: &mut dyn Sink,
) -> Result<Vec<WindowStats>> {
    let tx_q = ArrayQueue::new(RING);
    let rx_q = ArrayQueue::new(RING);
    let shared = Shared::default();
    let mut windows = Vec::new();
    // The schedule starts once everything is allocated, 2 ms ahead for the threads to start.
    let start_ns = clock.monotonic_ns() + 2_000_000;
    let start_wall = clock.realtime_ns() + 2_000_000;
    let mut tracker = Tracker::new(TrackerConfig {
        interval_ns: cfg.interval_ns,
        late_timeout_ns: cfg.late_timeout_ns,
        window_ns: cfg.window_ns,
        start_mono_ns: start_ns,
        start_wall_ns: start_wall,
        local_sync,
    });
    if sink.wants_probes() {
        tracker.keep_decisions();
    }
    let result = thread::scope(|s| {
        let tx = s.spawn(|| {
            io.send(start_ns, &tx_q, &shared);
            shared.sender_done.store(true, Ordering::Release);
        });
        let rx = s.spawn(|| io.receive(&rx_q, &shared));
        let outcome = aggregate(
            cfg,
            clock,
            stop,
            &mut tracker,
            (&tx_q, &rx_q, &shared),
            sink,
            &mut windows,
        );
        shared.stop_tx.store(true, Ordering::Relaxed);
        shared.stop_rx.store(true, Ordering::Relaxed);
        let _ = tx.join();
        let _ = rx.join();
        outcome
    });
    result?;
    tracker.finish(clock.realtime_ns());
    let decided = tracker.take_decisions();
    if !decided.is_empty() {
        sink.probes(&decided);
    }
    for w in tracker.take_closed() {
        sink.window(&w);
        if sink.keeps_windows() {
            windows.push(w);
        }
    }
    Ok(windows)
}

/// The caller's thread: feeds the tracker from the rings until the run is over.
fn aggregate(
    cfg: &Timing,
    clock: &dyn Clock,
    stop: &AtomicBool,
    tracker: &mut Tracker,
    (tx_q, rx_q, shared): (&ArrayQueue<TxEvent>, &ArrayQueue<RxEvent>, &Shared),
    sink: &mut dyn Sink,
    windows: &mut Vec<WindowStats>,
) -> Result<()> {
    let mut first_sent: Option<u64> = None;
    let mut last_scheduled = 0;
    let mut answered = false;
    // Reused across iterations: at most one ring's worth.
    let mut replies: Vec<RxEvent> = Vec::with_capacity(RING);
    loop {
        // Take the receiver's records first, then all of the sender's: a reply (or transmit
        // stamp) exists only after its probe's Sent record was pushed, so once the sender's
        // ring is drained every reply taken here meets its probe in the tracker.
        replies.clear();
        while replies.len() < RING {
            let Some(ev) = rx_q.pop() else { break };
            replies.push(ev);
        }
        while let Some(ev) = tx_q.pop() {
            match ev {
                TxEvent::Sent(s) => {
                    first_sent.get_or_insert(s.sent_ns);
                    last_scheduled = s.scheduled_ns;
                    tracker.on_sent(s);
                }
                TxEvent::Failed(seq) => tracker.on_send_failed(seq),
                TxEvent::Missed {
                    scheduled_ns,
                    count,
                } => tracker.on_slots_missed(scheduled_ns, count),
            }
        }
        for ev in &replies {
            match *ev {
                RxEvent::TxStamp {
                    id,
                    mono_ns,
                    wall_ns,
                } => {
                    tracker.on_tx_stamp(id, mono_ns, wall_ns);
                }
                RxEvent::Reply(r) => {
                    answered = true;
                    tracker.on_reply(&r);
                }
            }
        }
        let now = clock.monotonic_ns();
        let drops =
            shared.tx_drops.swap(0, Ordering::Relaxed) + shared.rx_drops.swap(0, Ordering::Relaxed);
        let malformed = shared.malformed.swap(0, Ordering::Relaxed);
        if drops + malformed > 0 {
            tracker.on_dropped(now, drops, malformed);
        }
        tracker.poll(now);
        let decided = tracker.take_decisions();
        if !decided.is_empty() {
            sink.probes(&decided);
        }
        // A session that never gives up (the daemon's) counts "port unreachable" and goes
        // on: the reflector may start later, and its probes count as lost meanwhile.
        let never_give_up = cfg.no_reply_ns == u64::MAX;
        for w in tracker.take_closed() {
            if never_give_up && shared.unreachable.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    target = %cfg.target,
                    lost = w.counters.lost,
                    "the target answered \"port unreachable\" this window: nothing listens there yet; probing goes on"
                );
            }
            sink.window(&w);
            if sink.keeps_windows() {
                windows.push(w);
            }
        }
        if !answered && !never_give_up {
            if shared.unreachable.load(Ordering::Relaxed) {
                return Err(Error::Unreachable { target: cfg.target });
            }
            if let Some(first) = first_sent
                && now.saturating_sub(first) >= cfg.no_reply_ns
            {
                return Err(Error::NoReply {
                    target: cfg.target,
                    after: Duration::from_nanos(cfg.no_reply_ns),
                });
            }
        }
        if stop.load(Ordering::Relaxed) || sink.finished() {
            shared.stop_tx.store(true, Ordering::Relaxed);
        }
        let sending_over = shared.sender_done.load(Ordering::Acquire);
        if sending_over
            && tx_q.is_empty()
            && now >= last_scheduled.saturating_add(cfg.late_timeout_ns)
        {
            return Ok(());
        }
        clock.pause();
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use std::sync::atomic::AtomicU32;
    use std::time::Instant;

    use pathprobe_proto::hist::Metric;

    use super::session::Marks;
    use super::*;

    const MS: u64 = 1_000_000;
    /// Wall time is monotonic time plus this.
    const WALL: u64 = 1_795_680_000_000_000_000;

    /// Simulated time, in lockstep with the fake I/O threads: the aggregator's pause moves
    /// time on by 1 ms only once both threads have done all that was due at the current
    /// time, so what the engine sees does not depend on how the host schedules threads.
    struct Sim {
        now: AtomicU64,
        tx_seen: AtomicU64,
        rx_seen: AtomicU64,
        tx_finished: AtomicBool,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                now: AtomicU64::new(1_000 * MS),
                tx_seen: AtomicU64::new(0),
                rx_seen: AtomicU64::new(0),
                tx_finished: AtomicBool::new(false),
            }
        }

        /// Waits (really) until simulated time passes `seen`, or `stop`.
        fn next_tick(&self, seen: u64, stop: &AtomicBool) {
            while self.now.load(Ordering::Acquire) == seen && !stop.load(Ordering::Relaxed) {
                thread::yield_now();
            }
        }
    }

    impl Clock for Sim {
        fn monotonic_ns(&self) -> u64 {
            self.now.load(Ordering::Acquire)
        }
        fn realtime_ns(&self) -> u64 {
            self.monotonic_ns() + WALL
        }
        fn pause(&self) {
            let now = self.now.load(Ordering::Acquire);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !((self.tx_finished.load(Ordering::Acquire)
                || self.tx_seen.load(Ordering::Acquire) >= now)
                && self.rx_seen.load(Ordering::Acquire) >= now)
            {
                assert!(Instant::now() < deadline, "the fake I/O stalled");
                thread::yield_now();
            }
            self.now.store(now + MS, Ordering::Release);
        }
    }

    /// A path on simulated time: probes leave on schedule; `rtt(seq)` says whether and
    /// when each is answered.
    struct FakePath<'a> {
        sim: &'a Sim,
        timing: Timing,
        rtt: fn(u32) -> Option<u64>,
        sent: AtomicU32,
    }

    impl Io for FakePath<'_> {
        fn send(&self, start_ns: u64, ring: &ArrayQueue<TxEvent>, shared: &Shared) {
            let slots = self.timing.slots().unwrap_or(u64::MAX);
            let mut k = 0u64;
            while !shared.stop_tx.load(Ordering::Relaxed) && k < slots {
                let now = self.sim.now.load(Ordering::Acquire);
                while k < slots && start_ns + k * self.timing.interval_ns <= now {
                    let scheduled = start_ns + k * self.timing.interval_ns;
                    let seq = u32::try_from(k).unwrap();
                    let sent = Sent {
                        seq,
                        scheduled_ns: scheduled,
                        sent_ns: scheduled,
                        t1_wall_ns: scheduled + WALL,
                        tx_id: seq,
                        bytes: 52,
                    };
                    push(ring, TxEvent::Sent(sent), &shared.tx_drops);
                    self.sent.store(seq + 1, Ordering::Release);
                    k += 1;
                }
                self.sim.tx_seen.store(now, Ordering::Release);
                if k < slots {
                    self.sim.next_tick(now, &shared.stop_tx);
                }
            }
            self.sim.tx_finished.store(true, Ordering::Release);
        }

        fn receive(&self, ring: &ArrayQueue<RxEvent>, shared: &Shared) {
            let mut next = 0u32;
            let start = self.sim.now.load(Ordering::Acquire) + 2 * MS;
            while !shared.stop_rx.load(Ordering::Relaxed) {
                let now = self.sim.now.load(Ordering::Acquire);
                let sent = self.sent.load(Ordering::Acquire);
                while next < sent {
                    let scheduled = start + u64::from(next) * self.timing.interval_ns;
                    match (self.rtt)(next) {
                        Some(rtt) if scheduled + rtt > now => break,
                        Some(rtt) => {
                            let reply = Reply {
                                seq: next,
                                rx_ns: scheduled + rtt,
                                rx_wall_ns: scheduled + rtt + WALL,
                                t2_wall_ns: 0,
                                t3_wall_ns: 0,
                                reflector_sync: None,
                                bytes: 52,
                                far_times: false,
                                refused: false,
                                marks: Marks::default(),
                            };
                            push(ring, RxEvent::Reply(reply), &shared.rx_drops);
                        }
                        None => {}
                    }
                    next += 1;
                }
                self.sim.rx_seen.store(now, Ordering::Release);
                self.sim.next_tick(now, &shared.stop_rx);
            }
        }
    }

    fn timing(count: Option<u64>) -> Timing {
        Timing {
            target: "127.0.0.1:862".parse().unwrap(),
            interval_ns: 10 * MS,
            count,
            duration_ns: None,
            window_ns: 1_000 * MS,
            late_timeout_ns: 200 * MS,
            no_reply_ns: u64::MAX,
        }
    }

    /// Every tenth probe unanswered; the others after 1.0 to 1.4 ms.
    fn lossy(seq: u32) -> Option<u64> {
        (seq % 10 != 3).then(|| MS + u64::from(seq % 5) * 100_000)
    }

    fn run_sim(
        t: Timing,
        rtt: fn(u32) -> Option<u64>,
        mut stop_after: Option<usize>,
    ) -> Result<Vec<WindowStats>> {
        let sim = Sim::new();
        let io = FakePath {
            sim: &sim,
            timing: t,
            rtt,
            sent: AtomicU32::new(0),
        };
        let stop = AtomicBool::new(false);
        let mut sink = |_: &WindowStats| {
            if let Some(n) = stop_after.as_mut().filter(|n| **n > 0) {
                *n -= 1;
                if *n == 0 {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        };
        run(&t, &sim, &io, &stop, None, &mut sink)
    }

    #[test]
    fn windows_counts_and_rtts_come_out_exactly_on_simulated_time() {
        let windows = run_sim(timing(Some(300)), lossy, None).unwrap();
        assert_eq!(windows.len(), 3, "{windows:?}");
        for (k, w) in windows.iter().enumerate() {
            let c = &w.counters;
            assert_eq!((c.sent, c.received, c.lost), (100, 90, 10), "window {k}");
            assert_eq!((c.reordered, c.duplicated, c.late), (0, 0, 0), "window {k}");
            assert_eq!(
                w.start_wall_ns,
                windows[0].start_wall_ns + 1_000 * MS * k as u64
            );
            let rtt = &w.histograms[&Metric::Rtt];
            assert_eq!(rtt.len(), 90);
            assert!(rtt.equivalent(rtt.min(), MS), "{}", rtt.min());
            assert!(rtt.equivalent(rtt.max(), MS + 400_000), "{}", rtt.max());
        }
    }

    #[test]
    fn a_stop_delivers_the_last_partial_window() {
        let windows = run_sim(timing(None), lossy, Some(2)).unwrap();
        assert_eq!(windows.len(), 3, "{windows:?}");
        let last = &windows[2].counters;
        assert!(last.sent > 0 && last.sent < 100, "{last:?}");
        assert_eq!(last.received + last.lost, last.sent, "every probe decided");
        assert!(windows[2].end_wall_ns - windows[2].start_wall_ns < 1_000 * MS);
    }

    #[test]
    fn silence_ends_the_session_with_no_reply() {
        let mut t = timing(None);
        t.no_reply_ns = 500 * MS;
        match run_sim(t, |_| None, None) {
            Err(Error::NoReply { after, .. }) => assert_eq!(after, Duration::from_millis(500)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_schedule_sends_what_is_due_and_skips_what_is_too_late() {
        let mut s = Schedule::new(&timing(Some(10)), 0);
        let mut due = Vec::new();
        assert_eq!(s.take_due(25 * MS, 64, &mut due), 0);
        assert_eq!(due, [0, 10 * MS, 20 * MS]);
        // 200 ms late timeout: slots more than 100 ms behind are skipped and counted.
        assert_eq!(s.take_due(155 * MS, 64, &mut due), 3);
        assert_eq!(due, [60 * MS, 70 * MS, 80 * MS, 90 * MS]);
        assert_eq!(
            s.take_due(10_000 * MS, 64, &mut due),
            0,
            "the count is spent"
        );
        assert!(due.is_empty());
        let mut capped = Schedule::new(&timing(None), 0);
        assert_eq!(capped.take_due(50 * MS, 2, &mut due), 0);
        assert_eq!(due.len(), 2, "at most a batch per call");
    }

    #[test]
    fn a_full_ring_drops_and_counts_instead_of_blocking() {
        let ring = ArrayQueue::new(2);
        let drops = AtomicU64::new(0);
        for i in 0..5 {
            push(&ring, i, &drops);
        }
        assert_eq!(ring.len(), 2);
        assert_eq!(drops.load(Ordering::Relaxed), 3);
    }
}
