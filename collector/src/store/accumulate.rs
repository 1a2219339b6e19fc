//! The accumulator: exact merging of windows, the arithmetic under every query and rollup.
//! Plain code, no storage: a backend feeds it counters and histograms (decoded, or as the
//! stored V2 blobs, decoded straight into it).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::report::{Aggregate, ClockState, Counters};

use super::Merged;
use crate::{Error, Result};

/// The largest total count a stored histogram can have: HdrHistogram's V2 format writes
/// counts as signed 64-bit varints.
pub const MAX_STORED_COUNT: u64 = i64::MAX as u64;

/// Windows (or rollup buckets) merged exactly: the sum of their counters and histograms,
/// and how many had synchronized or estimated clocks. Every query and every rollup bucket
/// is one; nothing here knows where the windows came from.
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    pub windows: u64,
    pub counters: Counters,
    pub histograms: BTreeMap<Metric, Histogram<u64>>,
    pub synchronized: u64,
    pub estimated: u64,
}

impl Accumulator {
    /// Counts a window's one-way-delay clock.
    pub fn add_clock(&mut self, c: ClockState) {
        match c {
            ClockState::Synchronized { .. } => self.synchronized += 1,
            ClockState::Estimated { .. } => self.estimated += 1,
            ClockState::Unavailable => {}
        }
    }

    /// Merges a histogram of `metric`.
    pub fn add_histogram(&mut self, metric: Metric, h: &Histogram<u64>) -> Result<()> {
        let into = self
            .histograms
            .entry(metric)
            .or_insert_with(|| metric.new_histogram());
        hist::merge(metric, into, h).map_err(|source| Error::Corrupt {
            what: format!("{} histogram", metric.key()),
            source,
        })
    }

    /// Adds a stored histogram, decoding it straight into the accumulator.
    pub fn add_blob(&mut self, metric: &str, blob: &[u8]) -> Result<()> {
        let metric = parse_metric(metric)?;
        let into = self
            .histograms
            .entry(metric)
            .or_insert_with(|| metric.new_histogram());
        hist::decode_into(metric, blob, into).map_err(|source| Error::Corrupt {
            what: format!("stored {} histogram", metric.key()),
            source,
        })
    }

    /// Adds counters stored as JSON.
    pub fn add_counters(&mut self, json: &str) -> Result<()> {
        let c: Counters = serde_json::from_str(json).map_err(|e| Error::Corrupt {
            what: "stored counters".to_string(),
            source: pathprobe_proto::Error::Json(e.to_string()),
        })?;
        self.counters.merge(&c).map_err(|source| Error::Corrupt {
            what: "counters".to_string(),
            source,
        })
    }

    /// Whether a window with `counters` and histograms of `counts` can be added without any
    /// counter passing 2^64 or any histogram passing what V2 can store; changes nothing.
    pub fn room_for(
        &self,
        counters: &Counters,
        counts: &[(Metric, u64)],
    ) -> std::result::Result<(), String> {
        let mut c = self.counters;
        c.merge(counters).map_err(|e| e.to_string())?;
        for &(m, n) in counts {
            let have = self.histograms.get(&m).map_or(0, Histogram::len);
            if have.checked_add(n).is_none_or(|t| t > MAX_STORED_COUNT) {
                return Err(format!(
                    "{} histogram would hold more than {MAX_STORED_COUNT} samples",
                    m.key()
                ));
            }
        }
        Ok(())
    }

    /// Adds everything `other` holds.
    pub fn absorb(&mut self, other: &Self) -> Result<()> {
        self.windows += other.windows;
        self.synchronized += other.synchronized;
        self.estimated += other.estimated;
        self.counters
            .merge(&other.counters)
            .map_err(|source| Error::Corrupt {
                what: "counters".to_string(),
                source,
            })?;
        for (&m, h) in &other.histograms {
            self.add_histogram(m, h)?;
        }
        Ok(())
    }
}

/// The metric a stored key names.
pub fn parse_metric(key: &str) -> Result<Metric> {
    Metric::from_key(key).ok_or_else(|| Error::Corrupt {
        what: format!("unknown metric `{key}` in the store"),
        source: pathprobe_proto::Error::Json(key.to_string()),
    })
}

impl Accumulator {
    /// The answer of a query over `paths`.
    pub fn into_merged(self, paths: Vec<i64>) -> Merged {
        Merged {
            aggregate: Aggregate {
                windows: self.windows,
                counters: self.counters,
                histograms: self.histograms,
            },
            synchronized_windows: self.synchronized,
            estimated_windows: self.estimated,
            paths,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        reason = "test code: a failed unwrap is a failed test"
    )]

    use super::*;

    fn rtt(values: &[u64]) -> Histogram<u64> {
        let mut h = Metric::Rtt.new_histogram();
        for &v in values {
            h.record(v).unwrap();
        }
        h
    }

    fn counters(sent: u64, received: u64) -> Counters {
        Counters {
            sent,
            received,
            lost: sent - received,
            ..Counters::default()
        }
    }

    #[test]
    fn blobs_and_histograms_merge_to_the_same_exact_answer() {
        let (a, b) = (rtt(&[1_000, 2_000, 3_000]), rtt(&[5_000, 1_000_000]));
        let mut decoded = Accumulator::default();
        decoded.add_histogram(Metric::Rtt, &a).unwrap();
        decoded.add_histogram(Metric::Rtt, &b).unwrap();
        let mut stored = Accumulator::default();
        for h in [&a, &b] {
            let blob = hist::encode(Metric::Rtt, h).unwrap();
            stored.add_blob(Metric::Rtt.key(), &blob).unwrap();
        }
        let (d, s) = (
            &decoded.histograms[&Metric::Rtt],
            &stored.histograms[&Metric::Rtt],
        );
        assert_eq!(d, s);
        assert_eq!(s.len(), 5);
        assert_eq!(s.max(), rtt(&[1_000_000]).max());
        assert!(stored.add_blob("no-such-metric", &[]).is_err());
        assert!(
            stored
                .add_blob(Metric::Rtt.key(), b"not a histogram")
                .is_err()
        );
    }

    #[test]
    fn absorbing_equals_adding_one_by_one() {
        let mut one = Accumulator::default();
        let mut parts = [Accumulator::default(), Accumulator::default()];
        for (i, (c, h, clock)) in [
            (counters(10, 9), rtt(&[1_000]), ClockState::Unavailable),
            (
                counters(20, 20),
                rtt(&[2_000, 4_000]),
                ClockState::Synchronized { max_error_ns: 1 },
            ),
            (
                counters(5, 1),
                rtt(&[8_000]),
                ClockState::Estimated {
                    offset_ns: 3,
                    samples: 9,
                },
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let json = serde_json::to_string(&c).unwrap();
            for acc in [&mut one, &mut parts[i % 2]] {
                acc.windows += 1;
                acc.add_counters(&json).unwrap();
                acc.add_histogram(Metric::Rtt, &h).unwrap();
                acc.add_clock(clock);
            }
        }
        let [mut a, b] = parts;
        a.absorb(&b).unwrap();
        let (x, y) = (a.into_merged(vec![1]), one.into_merged(vec![1]));
        assert_eq!(x, y);
        assert_eq!(x.aggregate.windows, 3);
        assert_eq!(x.aggregate.counters.sent, 35);
        assert_eq!(x.aggregate.counters.lost, 5);
        assert_eq!((x.synchronized_windows, x.estimated_windows), (1, 1));
        assert_eq!(x.aggregate.histograms[&Metric::Rtt].len(), 4);
    }

    #[test]
    fn room_is_refused_before_a_counter_or_a_histogram_would_overflow() {
        let mut acc = Accumulator::default();
        acc.add_counters(&serde_json::to_string(&counters(u64::MAX - 1, 0)).unwrap())
            .unwrap();
        assert!(acc.room_for(&counters(1, 0), &[]).is_ok());
        assert!(acc.room_for(&counters(2, 0), &[]).is_err());
        let fine = Accumulator::default();
        assert!(
            fine.room_for(&counters(1, 1), &[(Metric::Rtt, MAX_STORED_COUNT)])
                .is_ok()
        );
        let mut full = Accumulator::default();
        full.add_histogram(Metric::Rtt, &rtt(&[1_000])).unwrap();
        let err = full
            .room_for(&counters(1, 1), &[(Metric::Rtt, MAX_STORED_COUNT)])
            .unwrap_err();
        assert!(err.contains("rtt"), "{err}");
        assert!(acc.add_counters("{not json").is_err());
    }
}
