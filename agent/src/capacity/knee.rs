//! Finding the knee, sans-IO: which stages a path carried cleanly, the highest of them, and
//! where latency started to inflate.
//!
//! A stage passes when the receiver got at least `min_delivered` of the offered rate, lost
//! at most `max_loss` of the packets, and the p99 RTT of the STAMP stream under load stayed
//! within the RTT limit: `rtt_factor` times the idle p99, but never less than the idle p99
//! plus `rtt_allowance` (so a path idling at 50 µs is not failed for 100 µs of queueing).
//! The knee is the highest-rate passing stage below every failing one.

use serde::Serialize;

/// The pass marks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Delivered / offered, at least (0.95).
    pub min_delivered: f64,
    /// Loss, at most (0.01).
    pub max_loss: f64,
    /// p99 RTT under load, at most this times the idle p99 (3.0)...
    pub rtt_factor: f64,
    /// ...or the idle p99 plus this, whichever is larger (1 ms).
    pub rtt_allowance_ns: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_delivered: 0.95,
            max_loss: 0.01,
            rtt_factor: 3.0,
            rtt_allowance_ns: 1_000_000,
        }
    }
}

impl Thresholds {
    /// The highest p99 RTT a passing stage may show.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    pub fn rtt_limit_ns(&self, idle_p99_ns: u64) -> u64 {
        ((idle_p99_ns as f64 * self.rtt_factor) as u64)
            .max(idle_p99_ns.saturating_add(self.rtt_allowance_ns))
    }
}

/// What one stage measured, over the directions it loaded (the worst of them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageOutcome {
    pub offered_bps: u64,
    pub delivered_bps: u64,
    /// Lost / sent, 0 to 1.
    pub loss: f64,
    /// p99 RTT of the STAMP stream during the stage; `None` if none came back.
    pub rtt_p99_ns: Option<u64>,
    /// The load generator's own p99 lateness (its catch-up bursts queue at the bottleneck
    /// for about that long): added to the RTT limit, since it is the sender's, not the
    /// path's. 0 when unknown (download: the far end paces).
    pub sender_late_p99_ns: u64,
    /// Median RTT of the STAMP stream during the stage: a standing queue lifts it, a
    /// moment's spike does not.
    pub rtt_p50_ns: Option<u64>,
    /// This stage failed on a [`spike`] alone and the stage after it measured the same
    /// rate again: the knee uses that one, and this one is only reported.
    pub remeasured: bool,
}

/// Why a stage passed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub delivered_ok: bool,
    pub loss_ok: bool,
    pub rtt_ok: bool,
}

impl Judgement {
    pub const fn passed(self) -> bool {
        self.delivered_ok && self.loss_ok && self.rtt_ok
    }
}

/// Judges one stage.
#[allow(clippy::cast_precision_loss)]
pub fn judge(s: &StageOutcome, idle_p99_ns: u64, th: &Thresholds) -> Judgement {
    Judgement {
        delivered_ok: s.offered_bps > 0
            && s.delivered_bps as f64 >= th.min_delivered * s.offered_bps as f64,
        loss_ok: s.loss <= th.max_loss,
        // No RTT sample at all under load: every probe was lost, which is not a pass.
        rtt_ok: s.rtt_p99_ns.is_some_and(|r| {
            r <= th
                .rtt_limit_ns(idle_p99_ns)
                .saturating_add(s.sender_late_p99_ns)
        }),
    }
}

/// A stage that failed on its p99 RTT alone while its median stayed within the limit: it
/// delivered what was offered, lost nothing to speak of, and most of its probes saw no
/// queue, so a moment's stall (of this machine, or of a shared link) rather than a
/// standing queue broke the limit. A bottleneck's queue lifts the median too, and
/// measuring such a stage again fails it again; a spike seldom repeats.
pub fn spike(s: &StageOutcome, idle_p99_ns: u64, th: &Thresholds) -> bool {
    let j = judge(s, idle_p99_ns, th);
    j.delivered_ok
        && j.loss_ok
        && !j.rtt_ok
        && s.rtt_p50_ns
            .is_some_and(|m| m <= th.rtt_limit_ns(idle_p99_ns))
}

/// The knee of a set of stages (in any order); stages measured again are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Knee {
    /// Index (into the stages given) of the knee stage; `None` when even the lowest
    /// failed.
    pub stage: Option<usize>,
    /// Delivered rate at the knee: the path's usable capacity.
    pub capacity_bps: Option<u64>,
    /// Whether any stage failed (otherwise the capacity is at least the highest offered).
    pub saturated: bool,
    /// The lowest offered rate at which the p99 RTT broke its limit: where the bottleneck's
    /// queue starts to fill (bufferbloat).
    pub rtt_inflates_at_bps: Option<u64>,
    /// The highest delivered rate of any stage (the bottleneck's rate when overloaded).
    pub max_delivered_bps: u64,
}

/// Finds the knee.
pub fn knee(stages: &[StageOutcome], idle_p99_ns: u64, th: &Thresholds) -> Knee {
    let mut order: Vec<usize> = (0..stages.len())
        .filter(|&i| !stages[i].remeasured)
        .collect();
    order.sort_by_key(|&i| stages[i].offered_bps);
    let verdicts: Vec<Judgement> = stages.iter().map(|s| judge(s, idle_p99_ns, th)).collect();
    let lowest_fail = order
        .iter()
        .copied()
        .find(|&i| !verdicts[i].passed())
        .map(|i| stages[i].offered_bps);
    let stage =
        order.iter().copied().rev().find(|&i| {
            verdicts[i].passed() && lowest_fail.is_none_or(|f| stages[i].offered_bps < f)
        });
    Knee {
        stage,
        capacity_bps: stage.map(|i| stages[i].delivered_bps),
        saturated: lowest_fail.is_some(),
        rtt_inflates_at_bps: order
            .iter()
            .copied()
            .find(|&i| !verdicts[i].rtt_ok)
            .map(|i| stages[i].offered_bps),
        max_delivered_bps: stages.iter().map(|s| s.delivered_bps).max().unwrap_or(0),
    }
}

/// The next rate a knee search tries: between the highest pass and the lowest fail, until
/// they are within `resolution` (a fraction of the fail rate) of each other; `None` when
/// done.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
pub fn next_search_rate(
    stages: &[StageOutcome],
    idle_p99_ns: u64,
    th: &Thresholds,
    resolution: f64,
) -> Option<u64> {
    let k = knee(stages, idle_p99_ns, th);
    let pass = stages[k.stage?].offered_bps;
    let fail = stages
        .iter()
        .filter(|s| !s.remeasured && !judge(s, idle_p99_ns, th).passed())
        .map(|s| s.offered_bps)
        .min()?;
    ((fail - pass) as f64 > resolution * fail as f64).then(|| pass + (fail - pass) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A path with a 50 Mbit/s bottleneck and a 50 ms queue, idle p99 1 ms.
    fn bottleneck(offered_mbit: u64) -> StageOutcome {
        let offered = offered_mbit * 1_000_000;
        let cap = 50_000_000;
        if offered <= cap {
            StageOutcome {
                offered_bps: offered,
                delivered_bps: offered * 998 / 1000,
                loss: 0.0,
                rtt_p99_ns: Some(MS + offered_mbit * 10_000),
                sender_late_p99_ns: 0,
                rtt_p50_ns: Some(MS),
                remeasured: false,
            }
        } else {
            #[allow(clippy::cast_precision_loss)]
            let loss = 1.0 - cap as f64 / offered as f64;
            StageOutcome {
                offered_bps: offered,
                delivered_bps: cap,
                loss,
                rtt_p99_ns: Some(51 * MS),
                sender_late_p99_ns: 0,
                rtt_p50_ns: Some(50 * MS),
                remeasured: false,
            }
        }
    }

    #[test]
    fn a_late_senders_own_bursts_do_not_count_as_the_paths_inflation() {
        let th = Thresholds::default();
        let mut s = bottleneck(30);
        // Idle p99 1 ms: the limit is 3 ms (3 × idle).
        s.rtt_p99_ns = Some(5 * MS);
        assert!(!judge(&s, MS, &th).rtt_ok, "2 ms over the limit");
        s.sender_late_p99_ns = 2 * MS;
        assert!(judge(&s, MS, &th).rtt_ok, "the sender was 2 ms late at p99");
        // A standing queue is far beyond any sender's lateness.
        let mut over = bottleneck(60);
        over.sender_late_p99_ns = 2 * MS;
        assert!(!judge(&over, MS, &th).passed());
    }

    #[test]
    fn the_knee_is_the_last_clean_stage_below_the_bottleneck() {
        let stages: Vec<_> = [10, 20, 30, 40, 50, 60, 70].map(bottleneck).to_vec();
        let k = knee(&stages, MS, &Thresholds::default());
        assert_eq!(k.stage, Some(4));
        assert_eq!(k.capacity_bps, Some(49_900_000));
        assert!(k.saturated);
        assert_eq!(k.rtt_inflates_at_bps, Some(60_000_000));
        assert_eq!(k.max_delivered_bps, 50_000_000);
    }

    #[test]
    fn nothing_failing_means_not_saturated() {
        let stages: Vec<_> = [10, 20, 30].map(bottleneck).to_vec();
        let k = knee(&stages, MS, &Thresholds::default());
        assert_eq!(k.stage, Some(2));
        assert!(!k.saturated);
        assert_eq!(k.rtt_inflates_at_bps, None);
    }

    #[test]
    fn a_failing_first_stage_gives_no_knee() {
        let stages: Vec<_> = [60, 70].map(bottleneck).to_vec();
        let k = knee(&stages, MS, &Thresholds::default());
        assert_eq!(k.stage, None);
        assert_eq!(k.capacity_bps, None);
    }

    #[test]
    fn a_pass_above_a_failure_is_not_the_knee() {
        // A noisy stage at 30 fails; 40 passes by luck: the knee stays below the failure.
        let mut stages: Vec<_> = [10, 20, 30, 40].map(bottleneck).to_vec();
        stages[2].loss = 0.05;
        let k = knee(&stages, MS, &Thresholds::default());
        assert_eq!(k.stage, Some(1));
    }

    #[test]
    fn each_criterion_fails_a_stage_on_its_own() {
        let th = Thresholds::default();
        let ok = StageOutcome {
            offered_bps: 100,
            delivered_bps: 100,
            loss: 0.0,
            rtt_p99_ns: Some(MS),
            sender_late_p99_ns: 0,
            rtt_p50_ns: Some(MS),
            remeasured: false,
        };
        assert!(judge(&ok, MS, &th).passed());
        let j = judge(
            &StageOutcome {
                delivered_bps: 94,
                ..ok
            },
            MS,
            &th,
        );
        assert!(!j.delivered_ok && j.loss_ok && j.rtt_ok);
        let j = judge(&StageOutcome { loss: 0.011, ..ok }, MS, &th);
        assert!(j.delivered_ok && !j.loss_ok && j.rtt_ok);
        // The limit is 3 ms (3 × 1 ms, above 1 ms + 1 ms).
        assert!(
            judge(
                &StageOutcome {
                    rtt_p99_ns: Some(3 * MS),
                    sender_late_p99_ns: 0,
                    ..ok
                },
                MS,
                &th
            )
            .rtt_ok
        );
        let j = judge(
            &StageOutcome {
                rtt_p99_ns: Some(3 * MS + 1),
                sender_late_p99_ns: 0,
                ..ok
            },
            MS,
            &th,
        );
        assert!(j.delivered_ok && j.loss_ok && !j.rtt_ok);
        assert!(
            !judge(
                &StageOutcome {
                    rtt_p99_ns: None,
                    sender_late_p99_ns: 0,
                    ..ok
                },
                MS,
                &th
            )
            .rtt_ok
        );
    }

    #[test]
    fn a_spike_is_told_from_a_standing_queue_and_its_remeasurement_decides() {
        let th = Thresholds::default();
        // 40 Mbit/s delivered in full, but one stall put 8 ms on the p99; the median
        // saw no queue.
        let mut spiked = bottleneck(40);
        spiked.rtt_p99_ns = Some(8 * MS);
        assert!(spike(&spiked, MS, &th));
        // Above the bottleneck the median is in the queue: no spike, a failure.
        assert!(!spike(&bottleneck(60), MS, &th));
        // At the bottleneck's edge: all delivered, but a standing queue lifts the median.
        let mut queued = bottleneck(50);
        queued.rtt_p99_ns = Some(20 * MS);
        queued.rtt_p50_ns = Some(10 * MS);
        assert!(!spike(&queued, MS, &th));
        // Loss is never a spike.
        let mut lossy = spiked;
        lossy.loss = 0.02;
        assert!(!spike(&lossy, MS, &th));

        // Measured again and clean: the knee is above the spike, as if it never was.
        spiked.remeasured = true;
        let stages = vec![bottleneck(10), spiked, bottleneck(40), bottleneck(60)];
        let k = knee(&stages, MS, &th);
        assert_eq!(k.stage, Some(2));
        assert_eq!(k.rtt_inflates_at_bps, Some(60_000_000));
        // Measured again and failing again: that failure counts.
        let mut again = spiked;
        again.remeasured = false;
        let stages = vec![bottleneck(10), spiked, again, bottleneck(60)];
        assert_eq!(knee(&stages, MS, &th).stage, Some(0));
        assert_eq!(
            next_search_rate(&stages, MS, &th, 0.05),
            Some(25_000_000),
            "the search goes on between 10 and 40"
        );
    }

    #[test]
    fn the_rtt_limit_has_a_floor_for_fast_paths() {
        let th = Thresholds::default();
        // 50 µs idle: 3× would be 150 µs; the allowance makes it 1.05 ms.
        assert_eq!(th.rtt_limit_ns(50_000), 1_050_000);
        assert_eq!(th.rtt_limit_ns(10 * MS), 30 * MS);
    }

    #[test]
    fn the_search_closes_in_on_the_bottleneck() {
        let th = Thresholds::default();
        let mut stages = vec![bottleneck(10), bottleneck(100)];
        while let Some(next) = next_search_rate(&stages, MS, &th, 0.05) {
            stages.push(bottleneck(next / 1_000_000));
            assert!(stages.len() < 20, "the search ends");
        }
        let k = knee(&stages, MS, &th);
        let cap = k.capacity_bps.unwrap();
        assert!((47_000_000..=50_000_000).contains(&cap), "{cap}");
    }
}
