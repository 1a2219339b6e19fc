//! The dashboard's data, exact from the merged histograms: a path's series
//! (`/v1/series`), its RTT distribution (`/v1/cdf`) and its RTT heatmap (`/v1/heatmap`).
//! Each is plain code over the [`Store`]: the HTTP layer only parses the question.
//!
//! A series is cut into columns ([`Store::series`]): every window while there are at most
//! `columns` of them, else the buckets of the finest rollup level (1 min, 10 min, 1 h)
//! that gives at most that many, so 24 hours of 10 s windows read 1,440 minute buckets,
//! not 8,640 windows. Each column's figures are exact over the windows it holds; the
//! answer says which resolution it is.

use hdrhistogram::Histogram;
use pathprobe_proto::hist::{Metric, Summary};
use serde::{Deserialize, Serialize};

use crate::store::accumulate::Accumulator;
use crate::store::{Resolution, Selector, Store};
use crate::{Error, Result};

/// Columns a series or heatmap has at most unless asked, and at most when asked.
pub const DEFAULT_COLUMNS: usize = 720;
pub const MAX_COLUMNS: usize = 2_000;
/// Latency bins of a heatmap unless asked, and at most.
pub const DEFAULT_BINS: usize = 40;
pub const MAX_BINS: usize = 200;

/// The metrics a series reads.
const SERIES_METRICS: [Metric; 4] = [
    Metric::Rtt,
    Metric::Ipdv,
    Metric::OwdForward,
    Metric::OwdReverse,
];

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Micros {
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Micros {
    fn of(h: Option<&Histogram<u64>>) -> Option<Self> {
        let s = Summary::of(h?)?;
        let us = |v: u64| us(v);
        Some(Self {
            min: us(s.min),
            p50: us(s.p50),
            p90: us(s.p90),
            p99: us(s.p99),
            max: us(s.max),
        })
    }
}

#[allow(clippy::cast_precision_loss)]
fn us(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

/// One column of a series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub start_ns: u64,
    pub end_ns: u64,
    pub windows: u64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    /// Lost / (received + lost), in percent; `None` when no probe was decided.
    pub loss_pct: Option<f64>,
    pub rtt_us: Option<Micros>,
    /// Jitter: the delay variation between consecutive probes.
    pub ipdv_us: Option<Micros>,
    pub owd_forward_us: Option<Micros>,
    pub owd_reverse_us: Option<Micros>,
    /// What the one-way delays rest on: `synchronized`, `estimated`, `mixed` or
    /// `unavailable`.
    pub owd_clock: &'static str,
}

/// A path's series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeriesAnswer {
    /// `window`, or the rollup level: `1m`, `10m`, `1h`.
    pub resolution: String,
    pub paths: usize,
    pub columns: Vec<Point>,
}

/// The resolution as people write it.
fn resolution_name(r: Resolution) -> String {
    match r {
        Resolution::Window => "window".to_string(),
        Resolution::Rollup(ns) => humantime::format_duration(std::time::Duration::from_nanos(
            u64::try_from(ns).unwrap_or(0),
        ))
        .to_string(),
    }
}

fn clock(acc: &Accumulator) -> &'static str {
    match (acc.synchronized, acc.estimated) {
        (0, 0) => "unavailable",
        (_, 0) if acc.synchronized == acc.windows => "synchronized",
        (0, _) if acc.estimated == acc.windows => "estimated",
        _ => "mixed",
    }
}

/// Checks a question's column and bin counts.
fn check(columns: usize, bins: Option<usize>) -> Result<()> {
    if !(1..=MAX_COLUMNS).contains(&columns) {
        return Err(Error::Config(format!(
            "columns={columns} is out of range: use 1 to {MAX_COLUMNS}"
        )));
    }
    if let Some(b) = bins
        && !(1..=MAX_BINS).contains(&b)
    {
        return Err(Error::Config(format!(
            "bins={b} is out of range: use 1 to {MAX_BINS}"
        )));
    }
    Ok(())
}

/// The series of the paths `sel` matches over `[from_ns, to_ns)`, in at most `columns`
/// columns.
pub fn series(
    store: &dyn Store,
    sel: &Selector,
    from_ns: u64,
    to_ns: u64,
    columns: usize,
) -> Result<SeriesAnswer> {
    check(columns, None)?;
    let s = store.series(sel, from_ns, to_ns, columns, &SERIES_METRICS)?;
    let points = s
        .columns
        .iter()
        .map(|c| {
            let m = &c.merged;
            let k = &m.counters;
            let decided = k.received + k.lost;
            #[allow(clippy::cast_precision_loss)]
            let loss_pct = (decided > 0).then(|| 100.0 * k.lost as f64 / decided as f64);
            Point {
                start_ns: c.start_ns,
                end_ns: c.end_ns,
                windows: m.windows,
                sent: k.sent,
                received: k.received,
                lost: k.lost,
                loss_pct,
                rtt_us: Micros::of(m.histograms.get(&Metric::Rtt)),
                ipdv_us: Micros::of(m.histograms.get(&Metric::Ipdv)),
                owd_forward_us: Micros::of(m.histograms.get(&Metric::OwdForward)),
                owd_reverse_us: Micros::of(m.histograms.get(&Metric::OwdReverse)),
                owd_clock: clock(m),
            }
        })
        .collect();
    Ok(SeriesAnswer {
        resolution: resolution_name(s.resolution),
        paths: s.paths.len(),
        columns: points,
    })
}

/// The RTT distribution of a range, exact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CdfAnswer {
    pub paths: usize,
    pub windows: u64,
    pub count: u64,
    /// `[rtt_us, fraction]`: the fraction of RTTs at or below each recorded value (the
    /// highest value its histogram bucket stands for), every bucket that holds a sample.
    pub points: Vec<[f64; 2]>,
    /// The percentiles `compare` prints, from the same histogram.
    pub rtt_us: Option<Micros>,
    pub p999_us: Option<f64>,
}

/// The RTT distribution of the paths `sel` matches over `[from_ns, to_ns)`.
pub fn cdf(store: &dyn Store, sel: &Selector, from_ns: u64, to_ns: u64) -> Result<CdfAnswer> {
    let m = store.query(sel, from_ns, to_ns)?;
    let h = m.aggregate.histograms.get(&Metric::Rtt);
    let count = h.map_or(0, Histogram::len);
    let mut points = Vec::new();
    if let Some(h) = h.filter(|h| !h.is_empty()) {
        let mut below = 0_u64;
        for v in h.iter_recorded() {
            below += v.count_since_last_iteration();
            #[allow(clippy::cast_precision_loss)]
            points.push([us(v.value_iterated_to()), below as f64 / count as f64]);
        }
    }
    Ok(CdfAnswer {
        paths: m.paths.len(),
        windows: m.aggregate.windows,
        count,
        points,
        rtt_us: Micros::of(h),
        p999_us: h.and_then(Summary::of).map(|s| us(s.p999)),
    })
}

/// One heatmap column: how many RTTs fell in each bin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeatColumn {
    pub start_ns: u64,
    pub end_ns: u64,
    pub counts: Vec<u64>,
}

/// The RTT distribution over time: columns × latency bins.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeatmapAnswer {
    pub resolution: String,
    /// The bins' edges in microseconds, logarithmically spaced from the range's lowest RTT
    /// to its highest: bin `i` holds `[edges[i], edges[i + 1])` (the last one its upper
    /// edge too). A narrow range has fewer bins than asked for, one when every RTT fell
    /// in one histogram bucket.
    pub edges_us: Vec<f64>,
    pub columns: Vec<HeatColumn>,
}

/// The RTT heatmap of the paths `sel` matches over `[from_ns, to_ns)`: at most `columns`
/// columns and `bins` bins. Every sample is counted in exactly one bin, by the value
/// its histogram bucket stands for, so a column's counts add up to its RTT count.
pub fn heatmap(
    store: &dyn Store,
    sel: &Selector,
    from_ns: u64,
    to_ns: u64,
    columns: usize,
    bins: usize,
) -> Result<HeatmapAnswer> {
    check(columns, Some(bins))?;
    let s = store.series(sel, from_ns, to_ns, columns, &[Metric::Rtt])?;
    let rtt = |c: &crate::store::Column| c.merged.histograms.get(&Metric::Rtt).cloned();
    let (lo, hi) = s
        .columns
        .iter()
        .filter_map(|c| rtt(c).filter(|h| !h.is_empty()))
        .fold((u64::MAX, 0_u64), |(lo, hi), h| {
            (lo.min(h.lowest_equivalent(h.min())), hi.max(h.max()))
        });
    let edges = log_edges(lo, hi, bins);
    let columns = s
        .columns
        .iter()
        .map(|c| {
            let mut counts = vec![0_u64; edges.len().saturating_sub(1)];
            if let Some(h) = rtt(c) {
                for v in h.iter_recorded() {
                    let at = bin_of(&edges, v.value_iterated_to());
                    if let Some(n) = counts.get_mut(at) {
                        *n += v.count_since_last_iteration();
                    }
                }
            }
            HeatColumn {
                start_ns: c.start_ns,
                end_ns: c.end_ns,
                counts,
            }
        })
        .collect();
    Ok(HeatmapAnswer {
        resolution: resolution_name(s.resolution),
        edges_us: edges.iter().map(|&e| us(e)).collect(),
        columns,
    })
}

/// At most `bins + 1` edges (ns) from `lo` to `hi`, logarithmically spaced and rising;
/// none without samples, two when every sample has one value.
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn log_edges(lo: u64, hi: u64, bins: usize) -> Vec<u64> {
    if lo > hi {
        return Vec::new();
    }
    if lo == hi {
        return vec![lo, hi];
    }
    let (l, h) = (lo.max(1) as f64, hi as f64);
    let mut edges: Vec<u64> = (0..=bins)
        .map(|i| ((l * (h / l).powf(i as f64 / bins as f64)).round() as u64).clamp(lo, hi))
        .collect();
    edges[0] = lo;
    edges[bins] = hi;
    // A narrow range has fewer distinct edges than bins asked for.
    edges.dedup();
    edges
}

/// The bin of value `v`: the last edge at or below it (values at the top edge go in the
/// last bin).
fn bin_of(edges: &[u64], v: u64) -> usize {
    let bins = edges.len().saturating_sub(1);
    edges
        .partition_point(|&e| e <= v)
        .saturating_sub(1)
        .min(bins.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_edges_span_the_range_and_every_value_has_one_bin() {
        let e = log_edges(1_000, 100_000, 4);
        assert_eq!(e.first(), Some(&1_000));
        assert_eq!(e.last(), Some(&100_000));
        assert_eq!(e.len(), 5);
        assert!(e.windows(2).all(|w| w[0] < w[1]), "{e:?}");
        assert_eq!(bin_of(&e, 1_000), 0);
        assert_eq!(bin_of(&e, 100_000), 3, "the top edge is in the last bin");
        assert_eq!(bin_of(&e, e[2]), 2);
        assert_eq!(bin_of(&e, e[2] - 1), 1);
        assert!(log_edges(u64::MAX, 0, 4).is_empty(), "no samples: no bins");
        assert_eq!(
            log_edges(5_000, 5_000, 4),
            [5_000, 5_000],
            "one value: one bin"
        );
        let narrow = log_edges(5_000, 5_002, 40);
        assert!(narrow.windows(2).all(|w| w[0] < w[1]), "{narrow:?}");
        assert_eq!((narrow[0], *narrow.last().unwrap()), (5_000, 5_002));
        assert_eq!(bin_of(&[5_000, 5_000], 5_000), 0);
    }
}
