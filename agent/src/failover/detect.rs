//! Outages and path switches in a stream of probes, sans-IO: fed every probe's fate in
//! sequence order ([`Decided`]), it finds
//!
//! - an **outage**: a run of lost probes at least `min_outage` long, ended by an answer;
//! - a **switch**: answers that show other hop counts than the path so far, at least
//!   `confirm` of them over at least `confirm_ns` (a few odd answers, or the milliseconds
//!   of asymmetric routing while both ends of a path come back, are not a switch), with or
//!   without loss before them.
//!
//! Each becomes a [`Transition`]: the last answer before, the first after, the probes lost
//! in between (so the outage is known to the probe interval), the reordering and
//! duplicates within a second of its edges, and the probes before and after it (up to
//! `span` either side, and never across another transition), with their RTT and loss. A
//! transition is handed out once its `after` side is complete: `span` after it, at the
//! next transition, or at the end of the run.

use std::collections::VecDeque;

use hdrhistogram::Histogram;
use pathprobe_proto::event::{EdgeProbe, Segment};
use pathprobe_proto::hist::{Metric, Summary};

use crate::engine::session::{Decided, Marks, Outcome};

/// What tells one path from another in a single answer: its hop counts each way, and
/// which known path's RTT level its RTT is nearer (`0` the primary's, `1` the backup's;
/// only when both are known and far enough apart to tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PathKey {
    pub fwd_hops: Option<u8>,
    pub rev_hops: Option<u8>,
    pub level: Option<u8>,
}

impl PathKey {
    /// The key of an answer with `marks` to a probe sent with `sent_ttl`.
    pub fn of(marks: &Marks, sent_ttl: Option<u8>) -> Self {
        let (fwd_hops, rev_hops) = marks.hops(sent_ttl);
        Self {
            fwd_hops,
            rev_hops,
            level: None,
        }
    }

    /// Two keys are the same path unless a figure both know differs.
    pub fn same_path(&self, other: &Self) -> bool {
        let agree = |a: Option<u8>, b: Option<u8>| a.zip(b).is_none_or(|(a, b)| a == b);
        agree(self.fwd_hops, other.fwd_hops)
            && agree(self.rev_hops, other.rev_hops)
            && agree(self.level, other.level)
    }

    /// `self` with the figures it lacks taken from `other`.
    #[must_use]
    pub fn filled_from(&self, other: &Self) -> Self {
        Self {
            fwd_hops: self.fwd_hops.or(other.fwd_hops),
            rev_hops: self.rev_hops.or(other.rev_hops),
            level: self.level.or(other.level),
        }
    }

    /// The same hop counts each way (the RTT level aside).
    pub fn same_hops(&self, other: &Self) -> bool {
        self.fwd_hops == other.fwd_hops && self.rev_hops == other.rev_hops
    }
}

/// Two RTT levels are told apart only when one is at least this many times the other.
const LEVEL_RATIO: f64 = 1.5;

/// Settings of a [`Detector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectConfig {
    /// The probes' TTL, to count hops out.
    pub sent_ttl: Option<u8>,
    /// A run of lost probes at least this long is an outage.
    pub min_outage_ns: u64,
    /// Answers on new hop counts that make a switch, and how long they must last.
    pub confirm: u32,
    pub confirm_ns: u64,
    /// How far the `before` and `after` segments reach.
    pub span_ns: u64,
    /// Reordering and duplicates are counted this far either side of an outage.
    pub edge_ns: u64,
    /// Most probes remembered (older ones are forgotten: a `before` segment can be shorter
    /// after a very long outage at a high rate).
    pub max_records: usize,
}

/// An outage or a switch, measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub key_before: PathKey,
    pub key_after: PathKey,
    pub last_before: Option<EdgeProbe>,
    pub first_after: EdgeProbe,
    /// Scheduled send time (wall) of the first probe lost, or of `first_after`.
    pub start_unix_ns: u64,
    /// Probes lost between the last answer before and the first after.
    pub lost: u64,
    /// Answers reordered, and extra copies, within `edge_ns` of the outage.
    pub reordered: u64,
    pub duplicated: u64,
    pub before: Option<Segment>,
    pub after: Option<Segment>,
}

impl Transition {
    /// The outage in milliseconds: from the first probe lost to the first answer after.
    #[allow(clippy::cast_precision_loss)] // milliseconds for people
    pub fn outage_ms(&self) -> f64 {
        self.first_after
            .sent_unix_ns
            .saturating_sub(self.start_unix_ns) as f64
            / 1e6
    }

    /// Whether traffic moved to another path.
    pub fn switched(&self) -> bool {
        !self.key_before.same_path(&self.key_after)
    }
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    seq: u64,
    wall_ns: u64,
    /// `None` for a lost probe.
    rtt_ns: Option<u64>,
    reordered: bool,
    duplicates: u32,
}

#[derive(Debug, Clone, Copy)]
struct Gap {
    first_lost: EdgeProbe,
    lost: u64,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    key: PathKey,
    first: EdgeProbe,
    /// The first answer after the loss (on this key, or on an earlier candidate's when no
    /// probe was lost since): where traffic resumed.
    resumed: EdgeProbe,
    count: u32,
    /// The loss just before the first answer on the new key.
    gap: Option<Gap>,
}

/// A transition waiting for its `after` segment.
#[derive(Debug, Clone)]
struct Pending {
    t: Transition,
    /// Where its `before` segment may start (not before the previous transition).
    before_from_ns: u64,
    before_to_ns: u64,
}

/// Finds outages and switches in a stream of decided probes.
#[derive(Debug)]
pub struct Detector {
    cfg: DetectConfig,
    current: Option<PathKey>,
    /// The path the run started on (completed while traffic stays on it).
    initial: Option<PathKey>,
    /// A transition has happened.
    moved: bool,
    last_ok: Option<EdgeProbe>,
    gap: Option<Gap>,
    candidate: Option<Candidate>,
    records: VecDeque<Rec>,
    pending: Option<Pending>,
    /// The end of the last transition: no `before` segment reaches back past it.
    last_transition_end_ns: u64,
    ready: Vec<Transition>,
    /// The primary's and the backup's RTT levels (ns), when known.
    levels: Option<(u64, u64)>,
}

impl Detector {
    pub fn new(cfg: DetectConfig) -> Self {
        Self {
            cfg,
            current: None,
            initial: None,
            moved: false,
            last_ok: None,
            gap: None,
            candidate: None,
            records: VecDeque::new(),
            pending: None,
            last_transition_end_ns: 0,
            ready: Vec::new(),
            levels: None,
        }
    }

    /// The RTT levels of the primary and the backup (from probes pinned to each): when
    /// the hop counts of both paths agree (an IPsec tunnel hides its routers), the RTT
    /// level tells them apart. Levels closer than 1.5× are not used.
    pub fn set_levels(&mut self, primary_ns: u64, backup_ns: u64) {
        #[allow(clippy::cast_precision_loss)] // a ratio
        let ratio = primary_ns.max(backup_ns) as f64 / primary_ns.min(backup_ns).max(1) as f64;
        self.levels = (ratio >= LEVEL_RATIO).then_some((primary_ns, backup_ns));
    }

    /// Stops telling paths by RTT level: their hop counts tell them apart.
    pub const fn clear_levels(&mut self) {
        self.levels = None;
    }

    #[allow(clippy::cast_precision_loss)] // a ratio of RTTs
    fn level_of(&self, rtt_ns: u64) -> Option<u8> {
        let (p, b) = self.levels?;
        let d = |c: u64| (rtt_ns.max(1) as f64 / c.max(1) as f64).ln().abs();
        Some(u8::from(d(b) < d(p)))
    }

    /// The path carrying traffic now, as far as the answers tell.
    pub const fn current(&self) -> Option<PathKey> {
        self.current
    }

    /// The path the run started on.
    pub const fn initial(&self) -> Option<PathKey> {
        self.initial
    }

    /// Feeds probes in sequence order.
    pub fn push(&mut self, decided: &[Decided]) {
        for d in decided {
            self.one(d);
        }
    }

    /// Transitions whose `after` segment is complete, oldest first.
    pub fn take_ready(&mut self) -> Vec<Transition> {
        std::mem::take(&mut self.ready)
    }

    /// Ends the run: a pending transition gets what `after` segment there is.
    pub fn finish(&mut self) -> Vec<Transition> {
        self.complete_pending(u64::MAX);
        self.take_ready()
    }

    fn one(&mut self, d: &Decided) {
        let edge = EdgeProbe {
            seq: d.seq,
            sent_unix_ns: d.scheduled_wall_ns,
        };
        match d.outcome {
            Outcome::Duplicate => {
                if let Some(front) = self.records.front()
                    && let Some(r) = d
                        .seq
                        .checked_sub(front.seq)
                        .and_then(|i| usize::try_from(i).ok())
                        .and_then(|i| self.records.get_mut(i))
                {
                    r.duplicates += 1;
                }
                return;
            }
            Outcome::Lost => {
                self.record(d, None, false);
                match self.gap.as_mut() {
                    Some(g) => g.lost += 1,
                    None => {
                        self.gap = Some(Gap {
                            first_lost: edge,
                            lost: 1,
                        });
                    }
                }
            }
            Outcome::Answered {
                rtt_ns,
                marks,
                reordered,
            } => {
                self.record(d, Some(rtt_ns), reordered);
                let key = PathKey {
                    level: self.level_of(rtt_ns),
                    ..PathKey::of(&marks, self.cfg.sent_ttl)
                };
                self.answered(edge, key);
            }
        }
        if let Some(p) = &self.pending
            && d.scheduled_wall_ns >= p.t.first_after.sent_unix_ns + self.cfg.span_ns
        {
            self.complete_pending(d.scheduled_wall_ns);
        }
        self.forget();
    }

    fn answered(&mut self, edge: EdgeProbe, key: PathKey) {
        let Some(current) = self.current else {
            // The first answer sets the path; loss before it is the start of the run.
            self.current = Some(key);
            self.initial = Some(key);
            self.last_ok = Some(edge);
            self.gap = None;
            return;
        };
        if key.same_path(&current) {
            // What this answer shows that the path's key lacked (an RTT level known only
            // now) completes it.
            self.current = Some(current.filled_from(&key));
            if !self.moved {
                self.initial = self.current;
            }
            // Back on the path (an odd answer in between was not a switch). Traffic resumed
            // at the odd answers, unless probes were lost after them too.
            let mut resumed = edge;
            if let Some(c) = self.candidate.take() {
                if self.gap.is_none() {
                    resumed = c.resumed;
                }
                self.gap = merge_gaps(c.gap, self.gap);
            }
            if let Some(g) = self.gap.take() {
                let length = resumed
                    .sent_unix_ns
                    .saturating_sub(g.first_lost.sent_unix_ns);
                if length >= self.cfg.min_outage_ns {
                    self.transition(current, current, Some(g), resumed);
                }
            }
            self.last_ok = Some(edge);
            return;
        }
        match self.candidate.as_mut() {
            Some(c) if c.key.same_path(&key) => c.count += 1,
            _ => {
                // A candidate replaced by answers on yet other hop counts (both ends of a
                // path coming back a few milliseconds apart) keeps where traffic resumed,
                // unless probes were lost in between.
                let previous = self.candidate.take();
                let resumed = match (previous, self.gap) {
                    (Some(c), None) => c.resumed,
                    _ => edge,
                };
                let gap = previous.map_or(self.gap.take(), |c| merge_gaps(c.gap, self.gap.take()));
                self.candidate = Some(Candidate {
                    key,
                    first: edge,
                    resumed,
                    count: 1,
                    gap,
                });
            }
        }
        if let Some(c) = self.candidate
            && c.count >= self.cfg.confirm
            && edge.sent_unix_ns.saturating_sub(c.first.sent_unix_ns) >= self.cfg.confirm_ns
        {
            self.candidate = None;
            // Loss among the confirming answers belongs to the new path.
            self.gap = None;
            self.transition(current, c.key, c.gap, c.resumed);
            self.current = Some(c.key);
            self.last_ok = Some(edge);
        }
    }

    fn transition(&mut self, before: PathKey, after: PathKey, gap: Option<Gap>, first: EdgeProbe) {
        // A transition ends the previous one's `after` segment.
        let start = gap.map_or(first.sent_unix_ns, |g| g.first_lost.sent_unix_ns);
        self.complete_pending(start);
        self.moved = true;
        let last_before = self.last_ok;
        let t = Transition {
            key_before: before,
            key_after: after,
            last_before,
            first_after: first,
            start_unix_ns: start,
            lost: gap.map_or(0, |g| g.lost),
            reordered: 0,
            duplicated: 0,
            before: None,
            after: None,
        };
        let before_to_ns = last_before.map_or(start, |l| l.sent_unix_ns + 1);
        self.pending = Some(Pending {
            t,
            before_from_ns: self
                .last_transition_end_ns
                .max(before_to_ns.saturating_sub(self.cfg.span_ns)),
            before_to_ns,
        });
        self.last_transition_end_ns = first.sent_unix_ns;
    }

    /// Completes the pending transition with probes up to `until_ns` (exclusive) after it.
    fn complete_pending(&mut self, until_ns: u64) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        let first = p.t.first_after.sent_unix_ns;
        let after_to = until_ns.min(first.saturating_add(self.cfg.span_ns));
        p.t.before = self.segment(p.before_from_ns, p.before_to_ns, p.t.key_before);
        p.t.after = self.segment(first, after_to, p.t.key_after);
        let edge_from =
            p.t.last_before
                .map_or(p.t.start_unix_ns, |l| l.sent_unix_ns)
                .saturating_sub(self.cfg.edge_ns);
        let edge_to = first
            .saturating_add(self.cfg.edge_ns)
            .min(after_to.max(first + 1));
        for r in self
            .records
            .iter()
            .filter(|r| r.wall_ns >= edge_from && r.wall_ns < edge_to)
        {
            p.t.reordered += u64::from(r.reordered);
            p.t.duplicated += u64::from(r.duplicates);
        }
        self.ready.push(p.t);
    }

    fn segment(&self, from_ns: u64, to_ns: u64, key: PathKey) -> Option<Segment> {
        let mut rtt: Histogram<u64> = Metric::Rtt.new_histogram();
        let (mut probes, mut lost) = (0u64, 0u64);
        let (mut earliest, mut latest) = (u64::MAX, 0);
        for r in self
            .records
            .iter()
            .filter(|r| r.wall_ns >= from_ns && r.wall_ns < to_ns)
        {
            probes += 1;
            earliest = earliest.min(r.wall_ns);
            latest = latest.max(r.wall_ns);
            match r.rtt_ns {
                Some(ns) => rtt.saturating_record(ns.max(1)),
                None => lost += 1,
            }
        }
        if probes == 0 {
            return None;
        }
        #[allow(clippy::cast_precision_loss)] // figures for people
        let (pct, us) = (lost as f64 * 100.0 / probes as f64, |ns: u64| {
            ns as f64 / 1_000.0
        });
        let s = Summary::of(&rtt);
        Some(Segment {
            from_unix_ns: earliest,
            to_unix_ns: latest,
            probes,
            lost,
            loss_pct: Some(pct),
            rtt_p50_us: s.map(|s| us(s.p50)),
            rtt_p90_us: s.map(|s| us(s.p90)),
            rtt_p99_us: s.map(|s| us(s.p99)),
            fwd_hops: key.fwd_hops,
            rev_hops: key.rev_hops,
        })
    }

    fn record(&mut self, d: &Decided, rtt_ns: Option<u64>, reordered: bool) {
        self.records.push_back(Rec {
            seq: d.seq,
            wall_ns: d.scheduled_wall_ns,
            rtt_ns,
            reordered,
            duplicates: 0,
        });
    }

    /// Forgets probes no segment can need any more.
    fn forget(&mut self) {
        let Some(newest) = self.records.back().map(|r| r.wall_ns) else {
            return;
        };
        let mut keep_from = newest.saturating_sub(self.cfg.span_ns + self.cfg.edge_ns);
        let starts = [
            self.pending
                .as_ref()
                .map(|p| p.before_from_ns.min(p.t.start_unix_ns)),
            self.gap.map(|g| g.first_lost.sent_unix_ns),
            self.candidate
                .and_then(|c| c.gap)
                .map(|g| g.first_lost.sent_unix_ns),
            self.candidate.map(|c| c.first.sent_unix_ns),
        ];
        for s in starts.into_iter().flatten() {
            keep_from = keep_from.min(s.saturating_sub(self.cfg.span_ns + self.cfg.edge_ns));
        }
        while self.records.front().is_some_and(|r| r.wall_ns < keep_from)
            || self.records.len() > self.cfg.max_records
        {
            self.records.pop_front();
        }
    }
}

fn merge_gaps(a: Option<Gap>, b: Option<Gap>) -> Option<Gap> {
    match (a, b) {
        (Some(a), Some(b)) => Some(Gap {
            first_lost: a.first_lost,
            lost: a.lost + b.lost,
        }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_795_680_000_000_000_000;

    fn cfg() -> DetectConfig {
        DetectConfig {
            sent_ttl: Some(64),
            min_outage_ns: 20 * MS,
            confirm: 3,
            confirm_ns: 100 * MS,
            span_ns: 2_000 * MS,
            edge_ns: 1_000 * MS,
            max_records: 1 << 20,
        }
    }

    /// A path of `hops` routers each way.
    fn marks(hops: u8) -> Marks {
        Marks {
            far_ttl: Some(64 - hops),
            back_ttl: Some(64 - hops),
            ..Marks::default()
        }
    }

    /// Probes every millisecond: `fate(i)` is `Some((hops, rtt_ms))` for an answer.
    struct Stream {
        d: Detector,
        seq: u64,
        out: Vec<Transition>,
    }

    impl Stream {
        fn new() -> Self {
            Self {
                d: Detector::new(cfg()),
                seq: 0,
                out: Vec::new(),
            }
        }

        fn push(&mut self, n: u64, outcome: Outcome) {
            for _ in 0..n {
                let d = Decided {
                    seq: self.seq,
                    scheduled_ns: self.seq * MS,
                    scheduled_wall_ns: T0 + self.seq * MS,
                    outcome,
                };
                self.d.push(&[d]);
                self.seq += 1;
            }
            self.out.extend(self.d.take_ready());
        }

        fn answers(&mut self, n: u64, hops: u8, rtt_ms: u64) {
            self.push(
                n,
                Outcome::Answered {
                    rtt_ns: rtt_ms * MS,
                    marks: marks(hops),
                    reordered: false,
                },
            );
        }

        fn lost(&mut self, n: u64) {
            self.push(n, Outcome::Lost);
        }

        fn finish(mut self) -> Vec<Transition> {
            self.out.extend(self.d.finish());
            self.out
        }
    }

    #[test]
    fn a_blackout_on_one_path_is_an_outage_to_the_probe_interval() {
        let mut s = Stream::new();
        s.answers(3_000, 1, 4);
        s.lost(1_500);
        s.answers(3_000, 1, 4);
        let t = s.finish();
        assert_eq!(t.len(), 1);
        let t = &t[0];
        assert!(!t.switched());
        assert_eq!(t.lost, 1_500);
        assert!((t.outage_ms() - 1_500.0).abs() < 1e-9, "{}", t.outage_ms());
        assert_eq!(t.last_before.unwrap().seq, 2_999);
        assert_eq!(t.first_after.seq, 4_500);
        // Before and after: the span either side, all answered at 4 ms.
        let (b, a) = (t.before.unwrap(), t.after.unwrap());
        assert_eq!((b.probes, b.lost, a.probes, a.lost), (2_000, 0, 2_000, 0));
        assert!((b.rtt_p50_us.unwrap() - 4_000.0).abs() < 5.0);
        assert_eq!(a.fwd_hops, Some(1));
    }

    #[test]
    fn ordinary_loss_is_no_outage() {
        let mut s = Stream::new();
        for _ in 0..100 {
            s.answers(50, 1, 4);
            s.lost(3); // 3 ms < 20 ms
        }
        assert!(s.finish().is_empty());
    }

    #[test]
    fn a_failover_and_a_failback_are_switches_with_their_costs() {
        let mut s = Stream::new();
        s.answers(3_000, 1, 4);
        s.lost(900); // BFD notices after 900 ms
        s.answers(5_000, 2, 10);
        s.answers(5_000, 1, 4); // back, nothing lost
        let t = s.finish();
        assert_eq!(t.len(), 2, "{t:#?}");
        let (over, back) = (&t[0], &t[1]);
        assert!(over.switched() && back.switched());
        assert_eq!(over.key_before.fwd_hops, Some(1));
        assert_eq!(over.key_after.fwd_hops, Some(2));
        assert!((over.outage_ms() - 900.0).abs() < 1e-9);
        assert!((over.after.unwrap().rtt_p50_us.unwrap() - 10_000.0).abs() < 10.0);
        assert_eq!(back.lost, 0);
        assert!(
            back.outage_ms().abs() < 1e-9,
            "a clean failback loses nothing"
        );
        assert_eq!(back.key_after.fwd_hops, Some(1));
        // The failback's `before` is the backup's probes, not reaching past the failover.
        let b = back.before.unwrap();
        assert_eq!(b.fwd_hops, Some(2));
        assert!(b.from_unix_ns >= over.first_after.sent_unix_ns);
    }

    #[test]
    fn odd_answers_are_not_a_switch() {
        let mut s = Stream::new();
        s.answers(1_000, 1, 4);
        s.answers(2, 3, 4); // two answers by another route: fewer than `confirm`
        s.answers(1_000, 1, 4);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn asymmetric_routing_while_a_path_comes_back_is_one_failback() {
        let mut s = Stream::new();
        s.answers(1_000, 2, 10); // on the backup
        s.lost(1); // in flight as the route changed
        // For 6 ms the forward path is back on the primary but answers still return over
        // the backup: one hop out, two back.
        s.push(
            6,
            Outcome::Answered {
                rtt_ns: 7 * MS,
                marks: Marks {
                    far_ttl: Some(63),
                    back_ttl: Some(62),
                    ..Marks::default()
                },
                reordered: false,
            },
        );
        s.answers(1_000, 1, 4);
        let t = s.finish();
        assert_eq!(t.len(), 1, "{t:#?}");
        assert_eq!(
            (t[0].key_before.fwd_hops, t[0].key_after.fwd_hops),
            (Some(2), Some(1))
        );
        assert_eq!(t[0].key_after.rev_hops, Some(1));
        // Traffic resumed at the first transient answer: one probe, 1 ms, was lost.
        assert_eq!(t[0].lost, 1);
        assert_eq!(t[0].first_after.seq, 1_001);
        assert!(
            (t[0].outage_ms() - 1.0).abs() < 1e-9,
            "{}",
            t[0].outage_ms()
        );
    }

    #[test]
    fn a_switch_with_no_hop_change_is_found_by_its_outage_only() {
        let mut s = Stream::new();
        s.answers(1_000, 1, 4);
        s.lost(100);
        s.answers(1_000, 1, 30); // same hops, other RTT: an outage on "one" path
        let t = s.finish();
        assert_eq!(t.len(), 1);
        assert!(!t[0].switched());
        assert!((t[0].after.unwrap().rtt_p50_us.unwrap() - 30_000.0).abs() < 50.0);
    }

    #[test]
    fn with_equal_hop_counts_the_rtt_level_tells_a_clean_failback() {
        let mut s = Stream::new();
        // The pinned probes' levels are known only after the first answers.
        s.answers(100, 1, 4);
        s.d.set_levels(4 * MS, 30 * MS);
        s.answers(900, 1, 4);
        s.lost(300);
        s.answers(1_000, 1, 30); // the backup: same hops, its RTT
        s.answers(1_000, 1, 4); // back, nothing lost: only the RTT level shows it
        let t = s.finish();
        assert_eq!(t.len(), 2, "{t:#?}");
        assert_eq!(
            (t[0].key_before.level, t[0].key_after.level),
            (Some(0), Some(1))
        );
        assert!(t[0].switched());
        assert_eq!((t[1].key_after.level, t[1].lost), (Some(0), 0));
        // Levels too close to tell are not used.
        let mut s = Stream::new();
        s.d.set_levels(4 * MS, 5 * MS);
        s.answers(1_000, 1, 4);
        s.answers(1_000, 1, 5);
        assert!(s.finish().is_empty());
    }

    #[test]
    fn reordering_and_duplicates_near_the_edges_are_counted() {
        let mut s = Stream::new();
        s.answers(1_000, 2, 10);
        s.push(
            5,
            Outcome::Answered {
                rtt_ns: 10 * MS,
                marks: marks(2),
                reordered: true,
            },
        );
        s.answers(3, 1, 4);
        // A late copy of an answer just before the switch.
        let dup = Decided {
            seq: 999,
            scheduled_ns: 0,
            scheduled_wall_ns: T0 + 999 * MS,
            outcome: Outcome::Duplicate,
        };
        s.d.push(&[dup]);
        s.answers(3_000, 1, 4);
        let t = s.finish();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].reordered, t[0].duplicated), (5, 1));
    }

    #[test]
    fn memory_is_bounded_by_the_span() {
        let mut s = Stream::new();
        s.answers(100_000, 1, 4);
        assert!(s.d.records.len() <= 3_001, "{}", s.d.records.len());
    }
}
