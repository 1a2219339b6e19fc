//! The dashboard's data, exact from the merged histograms: a path's series
//! (`/v1/series`), its RTT distribution (`/v1/cdf`), its RTT heatmap (`/v1/heatmap`), and
//! the fleet grid (`/v1/grid`): each site's paths by kind, judged by a stated rule.
//! Each is plain code over the [`Store`]: the HTTP layer only parses the question.
//!
//! A series is cut into columns ([`Store::series`]): every window while there are at most
//! `columns` of them, else the buckets of the finest rollup level (1 min, 10 min, 1 h)
//! that gives at most that many, so 24 hours of 10 s windows read 1,440 minute buckets,
//! not 8,640 windows. Each column's figures are exact over the windows it holds; the
//! answer says which resolution it is.

use hdrhistogram::Histogram;
use pathprobe_proto::hist::{Metric, Micros, Summary};
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

/// A histogram's percentiles in microseconds, as `compare` gives them; `None` when empty.
fn micros(h: Option<&Histogram<u64>>) -> Option<Micros> {
    Summary::of(h?).map(|s| s.micros())
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
    Ok(series_of(&store.series(
        sel,
        from_ns,
        to_ns,
        columns,
        &SERIES_METRICS,
    )?))
}

/// The metrics a series and its heatmap read, for one [`Store::series`] call that serves
/// both ([`series_of`], [`heatmap_of`]).
pub const PAGE_METRICS: [Metric; 4] = SERIES_METRICS;

/// The figures of each column of `s`.
pub fn series_of(s: &crate::store::Series) -> SeriesAnswer {
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
                rtt_us: micros(m.histograms.get(&Metric::Rtt)),
                ipdv_us: micros(m.histograms.get(&Metric::Ipdv)),
                owd_forward_us: micros(m.histograms.get(&Metric::OwdForward)),
                owd_reverse_us: micros(m.histograms.get(&Metric::OwdReverse)),
                owd_clock: clock(m),
            }
        })
        .collect();
    SeriesAnswer {
        resolution: resolution_name(s.resolution),
        paths: s.paths.len(),
        columns: points,
    }
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
}

/// The RTT distribution of the paths `sel` matches over `[from_ns, to_ns)`.
pub fn cdf(store: &dyn Store, sel: &Selector, from_ns: u64, to_ns: u64) -> Result<CdfAnswer> {
    Ok(cdf_of(&store.query(sel, from_ns, to_ns)?))
}

/// The RTT distribution of merged windows.
pub fn cdf_of(m: &crate::store::Merged) -> CdfAnswer {
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
    CdfAnswer {
        paths: m.paths.len(),
        windows: m.aggregate.windows,
        count,
        points,
        rtt_us: micros(h),
    }
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
    heatmap_of(&s, columns, bins)
}

/// The RTT heatmap of the series `s`, its columns merged exactly in runs of neighbours
/// so that at most `columns` remain (a run's time span is its columns').
pub fn heatmap_of(s: &crate::store::Series, columns: usize, bins: usize) -> Result<HeatmapAnswer> {
    fn rtt(c: &crate::store::Column) -> Option<&Histogram<u64>> {
        c.merged.histograms.get(&Metric::Rtt)
    }
    check(columns, Some(bins))?;
    let (lo, hi) = s
        .columns
        .iter()
        .filter_map(|c| rtt(c).filter(|h| !h.is_empty()))
        .fold((u64::MAX, 0_u64), |(lo, hi), h| {
            (lo.min(h.lowest_equivalent(h.min())), hi.max(h.max()))
        });
    let edges = log_edges(lo, hi, bins);
    let run = s.columns.len().div_ceil(columns).max(1);
    let columns = s
        .columns
        .chunks(run)
        .map(|chunk| {
            let mut counts = vec![0_u64; edges.len().saturating_sub(1)];
            for h in chunk.iter().filter_map(rtt) {
                for v in h.iter_recorded() {
                    let at = bin_of(&edges, v.value_iterated_to());
                    if let Some(n) = counts.get_mut(at) {
                        *n += v.count_since_last_iteration();
                    }
                }
            }
            HeatColumn {
                start_ns: chunk.first().map_or(0, |c| c.start_ns),
                end_ns: chunk.last().map_or(0, |c| c.end_ns),
                counts,
            }
        })
        .collect();
    Ok(HeatmapAnswer {
        resolution: if run == 1 {
            resolution_name(s.resolution)
        } else {
            format!("{} × {run}", resolution_name(s.resolution))
        },
        edges_us: edges.iter().map(|&e| us(e)).collect(),
        columns,
    })
}

/// The thresholds of one path kind, in Connection Monitor's terms: a round-trip time and
/// a share of checks (probes) failed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub rtt_ms: f64,
    pub loss_pct: f64,
}

/// The thresholds of every kind unless told otherwise: 100 ms round trip, 5% of checks
/// failed. They are pathprobe's choice, in Connection Monitor's two terms; its own
/// defaults were not at hand to copy.
pub const DEFAULT_THRESHOLD: Threshold = Threshold {
    rtt_ms: 100.0,
    loss_pct: 5.0,
};

/// The colouring rule of the grid: a threshold per path kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridRule {
    pub thresholds: std::collections::BTreeMap<String, Threshold>,
}

impl Default for GridRule {
    fn default() -> Self {
        Self {
            thresholds: ["expressroute", "vpn", "internet", "other"]
                .into_iter()
                .map(|k| (k.to_string(), DEFAULT_THRESHOLD))
                .collect(),
        }
    }
}

impl GridRule {
    /// The rule with `KIND=RTT,LOSS%` (like `expressroute=20ms,1%`) over the defaults.
    pub fn with(mut self, spec: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("`{spec}` is not a threshold: write KIND=RTT,LOSS%, like expressroute=20ms,1%")
        };
        let (kind, rest) = spec.split_once('=').ok_or_else(bad)?;
        let (rtt, loss) = rest.split_once(',').ok_or_else(bad)?;
        let kind = kind.trim();
        if kind.parse::<pathprobe_proto::report::PathKind>().is_err() {
            return Err(format!(
                "`{kind}` is not a path kind: use expressroute, vpn, internet or other"
            ));
        }
        let rtt = humantime::parse_duration(rtt.trim()).map_err(|_| bad())?;
        let loss = pathprobe_proto::rate::parse_fraction(loss.trim())
            .map_err(|e| format!("{spec}: {e}"))?;
        self.thresholds.insert(
            kind.to_string(),
            Threshold {
                rtt_ms: rtt.as_secs_f64() * 1e3,
                loss_pct: loss * 100.0,
            },
        );
        Ok(self)
    }

    /// The rule in words, as the page shows it.
    pub fn describe(&self) -> String {
        let each: Vec<String> = self
            .thresholds
            .iter()
            .map(|(k, t)| format!("{k} {} ms, {}%", t.rtt_ms, t.loss_pct))
            .collect();
        format!(
            "fail: p50 RTT above the kind's RTT, or loss above its loss; warning: p99 RTT above its RTT, or loss above half its loss; silent: no report for 3 windows, never green; thresholds: {}",
            each.join("; ")
        )
    }

    fn judge(&self, kind: &str, c: &Cell) -> &'static str {
        let t = self
            .thresholds
            .get(kind)
            .copied()
            .unwrap_or(DEFAULT_THRESHOLD);
        let rtt = |us: Option<f64>| us.is_some_and(|v| v / 1e3 > t.rtt_ms);
        let loss = c.loss_pct.unwrap_or(0.0);
        if !c.silent_paths.is_empty() {
            "silent"
        } else if c.windows == 0 {
            "no_data"
        } else if loss > t.loss_pct || rtt(c.rtt_p50_us) {
            "fail"
        } else if loss > t.loss_pct / 2.0 || rtt(c.rtt_p99_us) {
            "warning"
        } else {
            "ok"
        }
    }
}

/// One cell of the grid: a site's paths of one kind over the range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    /// `ok`, `warning`, `fail`, `silent` or `no_data` (paths known, no window in the range).
    pub state: &'static str,
    pub paths: usize,
    pub windows: u64,
    pub rtt_p50_us: Option<f64>,
    pub rtt_p99_us: Option<f64>,
    pub loss_pct: Option<f64>,
    /// The end of the newest window of these paths, and how long ago that was (s).
    pub last_report_ns: u64,
    pub age_s: f64,
    /// Paths (agent/name) with no report for 3 of their windows.
    pub silent_paths: Vec<String>,
}

/// A site's row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteRow {
    pub site: String,
    /// By path kind.
    pub cells: std::collections::BTreeMap<String, Cell>,
}

/// The fleet grid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GridAnswer {
    pub kinds: Vec<String>,
    pub sites: Vec<SiteRow>,
    pub rule: GridRule,
    pub rule_text: String,
}

/// Silence: no report for this many windows (and a few seconds for delivery).
const SILENT_WINDOWS: u64 = 3;
const SILENT_GRACE_NS: u64 = 5_000_000_000;

/// The grid over `[from_ns, to_ns)`, as at `now_ns`: a row per site, a cell per path kind
/// it has, judged by `rule`.
pub fn grid(
    store: &dyn Store,
    from_ns: u64,
    to_ns: u64,
    now_ns: u64,
    rule: &GridRule,
) -> Result<GridAnswer> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut groups: BTreeMap<(String, String), Vec<crate::store::Latest>> = BTreeMap::new();
    // A capacity test's path reports only while a test runs: it is on its site's page,
    // never a cell that would turn silent between tests.
    for l in store.latest()?.into_iter().filter(|l| !l.capacity) {
        groups
            .entry((l.site.clone(), l.kind.clone()))
            .or_default()
            .push(l);
    }
    let mut kinds = BTreeSet::new();
    let mut sites: BTreeMap<String, SiteRow> = BTreeMap::new();
    for ((site, kind), paths) in groups {
        let m = store.query(
            &Selector {
                name_or_kind: kind.clone(),
                site: Some(site.clone()),
            },
            from_ns,
            to_ns,
        )?;
        let k = &m.aggregate.counters;
        let decided = k.received + k.lost;
        let rtt = m
            .aggregate
            .histograms
            .get(&Metric::Rtt)
            .and_then(Summary::of);
        let last = paths.iter().map(|p| p.last_ns).max().unwrap_or(0);
        let silent_paths = paths
            .iter()
            .filter(|p| {
                let window = p.last_ns.saturating_sub(p.last_start_ns);
                p.last_ns > 0 && now_ns > p.last_ns + SILENT_WINDOWS * window + SILENT_GRACE_NS
            })
            .map(|p| format!("{}/{}", p.agent_id, p.name))
            .collect();
        #[allow(clippy::cast_precision_loss)]
        let mut cell = Cell {
            state: "",
            paths: paths.len(),
            windows: m.aggregate.windows,
            rtt_p50_us: rtt.map(|s| us(s.p50)),
            rtt_p99_us: rtt.map(|s| us(s.p99)),
            loss_pct: (decided > 0).then(|| 100.0 * k.lost as f64 / decided as f64),
            last_report_ns: last,
            age_s: now_ns.saturating_sub(last) as f64 / 1e9,
            silent_paths,
        };
        cell.state = rule.judge(&kind, &cell);
        kinds.insert(kind.clone());
        sites
            .entry(site.clone())
            .or_insert_with(|| SiteRow {
                site,
                cells: BTreeMap::new(),
            })
            .cells
            .insert(kind, cell);
    }
    // ExpressRoute first, then the VPN, then the rest: the order people compare them in.
    let order = |k: &String| match k.as_str() {
        "expressroute" => 0,
        "vpn" => 1,
        "internet" => 2,
        _ => 3,
    };
    let mut kinds: Vec<String> = kinds.into_iter().collect();
    kinds.sort_by_key(|k| (order(k), k.clone()));
    Ok(GridAnswer {
        kinds,
        sites: sites.into_values().collect(),
        rule: rule.clone(),
        rule_text: rule.describe(),
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

    fn cell(p50_ms: f64, p99_ms: f64, loss: f64) -> Cell {
        Cell {
            state: "",
            paths: 1,
            windows: 10,
            rtt_p50_us: Some(p50_ms * 1e3),
            rtt_p99_us: Some(p99_ms * 1e3),
            loss_pct: Some(loss),
            last_report_ns: 0,
            age_s: 0.0,
            silent_paths: Vec::new(),
        }
    }

    #[test]
    fn the_grid_rule_judges_by_the_kinds_thresholds() {
        let rule = GridRule::default().with("expressroute=20ms,1%").unwrap();
        assert_eq!(rule.judge("expressroute", &cell(5.0, 10.0, 0.0)), "ok");
        assert_eq!(rule.judge("expressroute", &cell(5.0, 25.0, 0.0)), "warning");
        assert_eq!(rule.judge("expressroute", &cell(5.0, 10.0, 0.6)), "warning");
        assert_eq!(rule.judge("expressroute", &cell(21.0, 25.0, 0.0)), "fail");
        assert_eq!(rule.judge("expressroute", &cell(5.0, 10.0, 1.5)), "fail");
        assert_eq!(
            rule.judge("vpn", &cell(30.0, 90.0, 2.0)),
            "ok",
            "the VPN's 100 ms, 5%"
        );
        let mut silent = cell(5.0, 10.0, 0.0);
        silent.silent_paths.push("ams-1/er".into());
        assert_eq!(rule.judge("expressroute", &silent), "silent", "never green");
        let mut none = cell(5.0, 10.0, 0.0);
        none.windows = 0;
        assert_eq!(rule.judge("vpn", &none), "no_data");
        assert!(rule.describe().contains("expressroute 20 ms, 1%"));
        for bad in ["expressroute", "er=20ms,1%", "vpn=fast,1%", "vpn=20ms,300%"] {
            assert!(GridRule::default().with(bad).is_err(), "{bad}");
        }
    }

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
