//! An HDR window as a Prometheus native histogram (and an OpenTelemetry exponential
//! histogram, which has the same buckets): the conversion and its error bound, plain code
//! with no exporter yet.
//!
//! A native histogram of schema `s` has buckets bounded by powers of `base = 2^(2^-s)`:
//! bucket `i` holds the values in `(base^(i-1), base^i]`, values at or below the zero
//! threshold go to the zero bucket. The whole fleet uses one schema, [`SCHEMA`] (8: the
//! finest, `base = 1.00271`), so every series merges exactly inside Prometheus.
//!
//! Each HDR bucket (an equivalence range of values, about 0.1% wide at three significant
//! digits) goes whole into the native bucket that holds its highest equivalent value, the
//! value `compare` prints for a quantile that falls in it. Counts are kept exactly, and the
//! mapping keeps the buckets' order, so a quantile's rank falls in the native bucket that
//! holds compare's exact figure: any estimate inside that bucket (Prometheus interpolates
//! within it) is within [`RELATIVE_ERROR`] of it.

use hdrhistogram::Histogram;

/// The fleet's schema.
pub const SCHEMA: i32 = 8;

/// The widest relative distance between two values of one bucket of [`SCHEMA`]:
/// `2^(2^-8) - 1`, 0.271%. A quantile of the converted histogram, estimated anywhere in
/// its bucket, is within this of the exact HDR quantile.
pub const RELATIVE_ERROR: f64 = 0.002_711_275_050_203_132;

/// The bucket of a positive value `v` at `schema`: the `i` with `base^(i-1) < v <= base^i`.
#[allow(clippy::cast_possible_truncation)]
pub fn index_of(v: f64, schema: i32) -> i32 {
    let scaled = v.log2() * f64::from(2_i32.pow(u32::try_from(schema.max(0)).unwrap_or(0)));
    let i = scaled.ceil();
    // log2 is not exact: a value a hair above a boundary must not land in the bucket below.
    let i = if upper_bound(i as i32 - 1, schema) >= v {
        i - 1.0
    } else {
        i
    };
    i as i32
}

/// The upper bound of bucket `i` at `schema`: `base^i`.
pub fn upper_bound(i: i32, schema: i32) -> f64 {
    (f64::from(i) / f64::from(2_i32.pow(u32::try_from(schema.max(0)).unwrap_or(0)))).exp2()
}

/// A native histogram: its schema, its zero bucket, and its non-empty positive buckets in
/// order of index.
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    pub schema: i32,
    /// Values at or below it (in the unit of the conversion) are in the zero bucket.
    pub zero_threshold: f64,
    pub zero_count: u64,
    pub count: u64,
    /// `(index, count)`, rising index, no empty bucket.
    pub buckets: Vec<(i32, u64)>,
}

/// A span of consecutive buckets in Prometheus's encoding: `offset` from the end of the
/// previous span (from 0 for the first: its starting index), `length` buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: i32,
    pub length: u32,
}

impl Native {
    /// The HDR histogram `h` of values in `unit`s (1e-9 for nanoseconds, to export seconds)
    /// at [`SCHEMA`]. Values of 0 go to the zero bucket (threshold 0).
    pub fn from_hdr(h: &Histogram<u64>, unit: f64) -> Self {
        let mut buckets: Vec<(i32, u64)> = Vec::new();
        let mut zero_count = 0;
        for v in h.iter_recorded() {
            let n = v.count_since_last_iteration();
            let top = h.highest_equivalent(v.value_iterated_to());
            if top == 0 {
                zero_count += n;
                continue;
            }
            #[allow(clippy::cast_precision_loss)]
            let i = index_of(top as f64 * unit, SCHEMA);
            match buckets.last_mut() {
                Some((last, c)) if *last == i => *c += n,
                _ => buckets.push((i, n)),
            }
        }
        Self {
            schema: SCHEMA,
            zero_threshold: 0.0,
            zero_count,
            count: h.len(),
            buckets,
        }
    }

    /// The buckets as Prometheus's spans and deltas (each count less the one before it;
    /// the first against 0).
    pub fn spans_and_deltas(&self) -> (Vec<Span>, Vec<i64>) {
        let mut spans: Vec<Span> = Vec::new();
        let mut deltas = Vec::with_capacity(self.buckets.len());
        let (mut next, mut previous) = (0_i32, 0_i64);
        for (k, &(i, c)) in self.buckets.iter().enumerate() {
            if k > 0 && i == next {
                if let Some(s) = spans.last_mut() {
                    s.length += 1;
                }
            } else {
                spans.push(Span {
                    offset: if k == 0 { i } else { i - next },
                    length: 1,
                });
            }
            next = i + 1;
            let c = i64::try_from(c).unwrap_or(i64::MAX);
            deltas.push(c - previous);
            previous = c;
        }
        (spans, deltas)
    }

    /// The `q` quantile as Prometheus's `histogram_quantile` finds it over a native
    /// histogram: the bucket where the rank `q × count` falls, and a point inside it
    /// (here its geometric interpolation); 0 when it falls in the zero bucket.
    #[allow(clippy::cast_precision_loss)]
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).max(1.0);
        let mut below = self.zero_count as f64;
        if below >= rank {
            return Some(0.0);
        }
        for &(i, c) in &self.buckets {
            let upto = below + c as f64;
            if upto >= rank {
                let (lo, hi) = (upper_bound(i - 1, self.schema), upper_bound(i, self.schema));
                let f = (rank - below) / c as f64;
                return Some(lo * (hi / lo).powf(f));
            }
            below = upto;
        }
        self.buckets
            .last()
            .map(|&(i, _)| upper_bound(i, self.schema))
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_precision_loss,
    clippy::float_cmp,
    reason = "test figures far below 2^52; 0 is exact"
)]
mod tests {
    use super::*;
    use pathprobe_proto::hist::Metric;
    use proptest::prelude::*;

    #[test]
    fn buckets_are_bounded_by_powers_of_the_base() {
        assert!((upper_bound(256, SCHEMA) - 2.0).abs() < 1e-12);
        assert_eq!(index_of(1.0, SCHEMA), 0, "1 is the top of bucket 0");
        assert_eq!(index_of(2.0, SCHEMA), 256);
        assert_eq!(index_of(2.0 * (1.0 + 1e-9), SCHEMA), 257);
        assert_eq!(index_of(0.5, SCHEMA), -256);
        for i in [-7_000, -1, 0, 1, 5_000] {
            let top = upper_bound(i, SCHEMA);
            assert_eq!(index_of(top, SCHEMA), i, "the top of bucket {i} is in it");
            assert_eq!(index_of(top * (1.0 + 1e-12), SCHEMA), i + 1);
        }
        assert!((upper_bound(1, SCHEMA) - 1.0 - RELATIVE_ERROR).abs() < 1e-15);
    }

    #[test]
    fn spans_and_deltas_encode_gaps_and_runs() {
        let n = Native {
            schema: SCHEMA,
            zero_threshold: 0.0,
            zero_count: 0,
            count: 10,
            buckets: vec![(-3, 2), (-2, 5), (4, 1), (5, 1), (6, 1)],
        };
        let (spans, deltas) = n.spans_and_deltas();
        assert_eq!(
            spans,
            [
                Span {
                    offset: -3,
                    length: 2
                },
                Span {
                    offset: 5,
                    length: 3
                }
            ]
        );
        assert_eq!(deltas, [2, 3, -4, 0, 0]);
    }

    proptest! {
        /// Every quantile of the converted histogram is within RELATIVE_ERROR of the exact
        /// HDR quantile (the figure `compare` prints), and no sample is lost.
        #[test]
        fn every_quantile_is_within_the_stated_error(
            values in proptest::collection::vec(0_u64..60_000_000_000, 1..400),
            q in 0.0_f64..=1.0,
        ) {
            let mut h = Metric::Rtt.new_histogram();
            for &v in &values {
                h.saturating_record(v);
            }
            let n = Native::from_hdr(&h, 1e-9);
            prop_assert_eq!(n.count, values.len() as u64);
            prop_assert_eq!(
                n.zero_count + n.buckets.iter().map(|b| b.1).sum::<u64>(),
                n.count
            );
            let exact = h.value_at_quantile(q) as f64 * 1e-9;
            let est = n.quantile(q).unwrap();
            if exact == 0.0 {
                prop_assert_eq!(est, 0.0);
            } else {
                let err = (est - exact).abs() / exact;
                prop_assert!(err <= RELATIVE_ERROR * (1.0 + 1e-9), "q {} exact {} est {} err {}", q, exact, est, err);
            }
        }
    }
}
