//! An HDR window as a Prometheus native histogram, and as an OpenTelemetry exponential
//! histogram (the same buckets, numbered one apart): the conversion and its error bound.
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
//! within it) is within [`RELATIVE_ERROR`] of it. The sum is the samples' exact sum, which
//! the agent counts beside the histogram.

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

/// A native histogram: its schema, its zero bucket, its non-empty positive buckets in
/// order of index, and the sum of its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    pub schema: i32,
    /// Values at or below it (in the unit of the conversion) are in the zero bucket.
    pub zero_threshold: f64,
    pub zero_count: u64,
    pub count: u64,
    /// The sum of the samples, in the unit of the conversion.
    pub sum: f64,
    /// `(index, count)`, rising index, no empty bucket.
    pub buckets: Vec<(i32, u64)>,
}

impl Default for Native {
    fn default() -> Self {
        Self {
            schema: SCHEMA,
            zero_threshold: 0.0,
            zero_count: 0,
            count: 0,
            sum: 0.0,
            buckets: Vec::new(),
        }
    }
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
    /// at [`SCHEMA`], whose samples add up to `exact_sum` (in the histogram's own unit).
    /// Values of 0 go to the zero bucket (threshold 0).
    pub fn from_hdr(h: &Histogram<u64>, unit: f64, exact_sum: Option<u128>) -> Self {
        Self::from_ranges(
            h.iter_recorded().map(|v| {
                let at = v.value_iterated_to();
                (
                    h.lowest_equivalent(at),
                    h.highest_equivalent(at),
                    v.count_since_last_iteration(),
                )
            }),
            unit,
            exact_sum,
        )
    }

    /// The HDR buckets `(lowest, highest, count)`, in rising order, as [`Native::from_hdr`]
    /// converts them (what `hist::for_each_range` reads from a stored blob).
    ///
    /// Without an exact sum (`None`, or 0 from an agent that predates it while the buckets
    /// hold more than zeros), the sum is estimated from the buckets' middles, within 0.05%.
    #[allow(clippy::cast_precision_loss)]
    pub fn from_ranges(
        ranges: impl IntoIterator<Item = (u64, u64, u64)>,
        unit: f64,
        exact_sum: Option<u128>,
    ) -> Self {
        let mut buckets: Vec<(i32, u64)> = Vec::new();
        let (mut zero_count, mut count, mut middles) = (0_u64, 0_u64, 0.0_f64);
        for (lowest, top, n) in ranges {
            count = count.saturating_add(n);
            if top == 0 {
                zero_count = zero_count.saturating_add(n);
                continue;
            }
            middles += f64::midpoint(lowest as f64, top as f64) * n as f64;
            let i = index_of(top as f64 * unit, SCHEMA);
            match buckets.last_mut() {
                Some((last, c)) if *last == i => *c = c.saturating_add(n),
                _ => buckets.push((i, n)),
            }
        }
        let sum = match exact_sum {
            Some(s) if s > 0 || buckets.is_empty() => s as f64 * unit,
            _ => middles * unit,
        };
        Self {
            schema: SCHEMA,
            zero_threshold: 0.0,
            zero_count,
            count,
            sum,
            buckets,
        }
    }

    /// Adds `other` (of the same schema) bucket by bucket: the histogram of both sets of
    /// samples, exactly.
    pub fn add(&mut self, other: &Self) {
        debug_assert_eq!(self.schema, other.schema);
        self.count = self.count.saturating_add(other.count);
        self.zero_count = self.zero_count.saturating_add(other.zero_count);
        self.sum += other.sum;
        if other.buckets.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.buckets.len().max(other.buckets.len()));
        let (mut mine, mut theirs) = (
            self.buckets.iter().peekable(),
            other.buckets.iter().peekable(),
        );
        loop {
            let next = match (mine.peek().copied(), theirs.peek().copied()) {
                (Some(&(index, left)), Some(&(other_index, right))) if index == other_index => {
                    mine.next();
                    theirs.next();
                    (index, left.saturating_add(right))
                }
                (Some(&lower), Some(&higher)) if lower.0 < higher.0 => {
                    mine.next();
                    lower
                }
                (_, Some(&lower)) => {
                    theirs.next();
                    lower
                }
                (Some(&lower), None) => {
                    mine.next();
                    lower
                }
                (None, None) => break,
            };
            out.push(next);
        }
        self.buckets = out;
    }

    /// The same buckets as an OpenTelemetry exponential histogram.
    pub fn to_exponential(&self) -> Exponential {
        let (offset, bucket_counts) = match (self.buckets.first(), self.buckets.last()) {
            (Some(&(first, _)), Some(&(last, _))) => {
                let mut counts = vec![0_u64; usize::try_from(last - first + 1).unwrap_or(0)];
                for &(i, c) in &self.buckets {
                    counts[usize::try_from(i - first).unwrap_or(0)] = c;
                }
                // OpenTelemetry's bucket `j` holds `(base^j, base^(j+1)]`: Prometheus's `j+1`.
                (first - 1, counts)
            }
            _ => (0, Vec::new()),
        };
        Exponential {
            scale: self.schema,
            zero_threshold: self.zero_threshold,
            zero_count: self.zero_count,
            count: self.count,
            sum: self.sum,
            offset,
            bucket_counts,
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

/// An OpenTelemetry exponential histogram's positive range, zero bucket, count and sum:
/// bucket `offset + k` holds `bucket_counts[k]` samples in `(base^(offset+k),
/// base^(offset+k+1)]`, with `base = 2^(2^-scale)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Exponential {
    pub scale: i32,
    pub zero_threshold: f64,
    pub zero_count: u64,
    pub count: u64,
    pub sum: f64,
    pub offset: i32,
    pub bucket_counts: Vec<u64>,
}

impl Exponential {
    /// Back to Prometheus's numbering (what a reader does to estimate its quantiles).
    pub fn to_native(&self) -> Native {
        let mut buckets = Vec::new();
        for (k, &c) in self.bucket_counts.iter().enumerate() {
            if c > 0 {
                let k = i32::try_from(k).unwrap_or(i32::MAX);
                buckets.push((self.offset.saturating_add(k).saturating_add(1), c));
            }
        }
        Native {
            schema: self.scale,
            zero_threshold: self.zero_threshold,
            zero_count: self.zero_count,
            count: self.count,
            sum: self.sum,
            buckets,
        }
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
            count: 10,
            buckets: vec![(-3, 2), (-2, 5), (4, 1), (5, 1), (6, 1)],
            ..Native::default()
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
            let exact_sum: u128 = values.iter().map(|&v| u128::from(v)).sum();
            let n = Native::from_hdr(&h, 1e-9, Some(exact_sum));
            prop_assert_eq!(n.count, values.len() as u64);
            prop_assert!((n.sum - exact_sum as f64 * 1e-9).abs() <= n.sum * 1e-12);
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

    proptest! {
        /// Adding two converted windows gives the conversion of both merged: what
        /// Prometheus's `sum` and the cumulative series do, exactly. The OpenTelemetry form
        /// holds the same buckets.
        #[test]
        fn converted_windows_add_exactly_and_survive_the_exponential_form(
            a in proptest::collection::vec(0_u64..5_000_000_000, 0..200),
            b in proptest::collection::vec(0_u64..5_000_000_000, 0..200),
        ) {
            let hist = |vs: &[u64]| {
                let mut h = Metric::Rtt.new_histogram();
                for &v in vs {
                    h.saturating_record(v);
                }
                h
            };
            let sum = |vs: &[u64]| vs.iter().map(|&v| u128::from(v)).sum::<u128>();
            let mut added = Native::from_hdr(&hist(&a), 1e-9, Some(sum(&a)));
            added.add(&Native::from_hdr(&hist(&b), 1e-9, Some(sum(&b))));
            let both: Vec<u64> = a.iter().chain(&b).copied().collect();
            let whole = Native::from_hdr(&hist(&both), 1e-9, Some(sum(&both)));
            prop_assert_eq!(&added.buckets, &whole.buckets);
            prop_assert_eq!((added.count, added.zero_count), (whole.count, whole.zero_count));
            prop_assert!((added.sum - whole.sum).abs() <= whole.sum * 1e-12);
            prop_assert_eq!(whole.to_exponential().to_native(), whole);
        }
    }

    #[test]
    fn exponential_buckets_are_numbered_one_below_native_ones() {
        let n = Native {
            count: 3,
            buckets: vec![(10, 1), (12, 2)],
            ..Native::default()
        };
        let e = n.to_exponential();
        assert_eq!((e.offset, e.bucket_counts.as_slice()), (9, &[1, 0, 2][..]));
        // Native bucket 10 is (base^9, base^10]: OpenTelemetry's bucket 9.
        assert!(upper_bound(9, SCHEMA) < upper_bound(10, SCHEMA));
    }

    #[test]
    fn a_window_without_an_exact_sum_gets_one_from_its_buckets() {
        let mut h = Metric::Rtt.new_histogram();
        h.saturating_record(5_000_000);
        let n = Native::from_hdr(&h, 1e-9, Some(0));
        assert!((n.sum - 0.005).abs() < 0.005 * 5e-4, "{}", n.sum);
        let zeros = Native::from_hdr(&Metric::Ipdv.new_histogram(), 1e-9, Some(0));
        assert_eq!(zeros.sum, 0.0);
    }
}
