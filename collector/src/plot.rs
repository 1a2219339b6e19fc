//! Plots as SVG, drawn with plotters: the RTT distributions of `compare --plot`, for
//! tickets and reports. Names reach the SVG only as text, which plotters escapes.

use plotters::prelude::*;

use crate::dash::CdfAnswer;
use crate::{Error, Result};

/// Size of a plot, in pixels.
const SIZE: (u32, u32) = (900, 520);
/// One colour per side: ExpressRoute-blue, then VPN-orange, as the dashboard has them.
const COLOURS: [RGBColor; 2] = [RGBColor(31, 100, 180), RGBColor(230, 120, 20)];

/// A latency for an axis label: µs below 1 ms, ms below 1 s, else s.
pub fn latency_label(us: f64) -> String {
    if us >= 1e6 {
        format!("{} s", trim(us / 1e6))
    } else if us >= 1e3 {
        format!("{} ms", trim(us / 1e3))
    } else {
        format!("{} µs", trim(us))
    }
}

/// Three significant digits, no trailing zeros: 2.03, 30.1, 250.
fn trim(v: f64) -> String {
    let decimals = match v.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        _ => 2,
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// The RTT distributions of `sides` (a name and its CDF each) on one plot: the fraction
/// of probes at or below each RTT, the RTT axis logarithmic, each curve a step at every
/// histogram bucket, exact. The legend gives each side's p50 and p99 and its count.
pub fn cdf_svg(title: &str, sides: &[(&str, &CdfAnswer)]) -> Result<String> {
    let all = sides.iter().flat_map(|(_, c)| c.points.iter());
    let (lo, hi) = all.fold((f64::MAX, 0.0_f64), |(lo, hi), p| {
        (lo.min(p[0]), hi.max(p[0]))
    });
    if hi <= 0.0 {
        return Err(Error::Config(
            "no RTT in the range on either side: nothing to plot (widen --since or --from/--to)"
                .to_string(),
        ));
    }
    // Whole decades: plotters labels a log axis from its first power of ten.
    let (lo, hi) = (
        10f64.powf(lo.max(0.001).log10().floor()),
        10f64.powf((hi * 1.01).log10().ceil()),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let draw = |e: DrawingAreaErrorKind<std::io::Error>| {
            Error::Config(format!("cannot draw the plot: {e}"))
        };
        root.fill(&WHITE).map_err(draw)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(42)
            .y_label_area_size(56)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
            .map_err(draw)?;
        chart
            .configure_mesh()
            // Every 1..9 of each decade as a key point; labelled at 1, 2 and 5.
            .x_labels(40)
            .max_light_lines(0)
            .x_desc("RTT (logarithmic)")
            .y_desc("fraction of probes at or below")
            .x_label_formatter(&|v| one_two_five(*v, latency_label))
            .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
            .draw()
            .map_err(draw)?;
        for (i, (name, cdf)) in sides.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let mut steps = Vec::with_capacity(2 * cdf.points.len());
            let mut below = 0.0;
            for p in &cdf.points {
                steps.push((p[0], below));
                steps.push((p[0], p[1]));
                below = p[1];
            }
            let legend = match cdf.rtt_us {
                Some(r) => format!(
                    "{name}: p50 {}, p99 {} ({} probes)",
                    latency_label(r.p50),
                    latency_label(r.p99),
                    cdf.count
                ),
                None => format!("{name}: no RTT in the range"),
            };
            chart
                .draw_series(LineSeries::new(steps, colour.stroke_width(2)))
                .map_err(draw)?
                .label(legend)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(draw)?;
        root.present().map_err(draw)?;
    }
    Ok(svg)
}

/// A logarithmic axis's label: `label(v)` at 1, 2 and 5 of each decade, nothing at the
/// other key points (plotters puts one at every 1..9 of a decade).
fn one_two_five(v: f64, label: fn(f64) -> String) -> String {
    let mantissa = v / 10f64.powf(v.log10().floor());
    if [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6) {
        label(v)
    } else {
        String::new()
    }
}

/// The range of a logarithmic axis over `lo..hi`: from the power of ten at or below `lo`
/// (plotters places its key points from a power of ten) to a little above `hi`.
fn log_range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if hi <= 0.0 || lo > hi {
        return 0.1..1.0;
    }
    let lo = lo.max(hi / 1e6);
    10f64.powf(lo.log10().floor())..hi * 1.25
}

/// Width of the time charts, in pixels; the lane under them shares their x axis.
pub const TIME_WIDTH: u32 = 1000;
/// Left and right margins and the y-label area, the same for every time chart so that
/// their x axes line up.
const MARGIN: u32 = 16;
const Y_LABELS: u32 = 64;

/// One curve of a time chart: a value per column (its midpoint, ns), `None` for a column
/// without data (the curve breaks there).
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    pub colour: RGBAColor,
    pub width: u32,
    pub points: Vec<(u64, Option<f64>)>,
}

/// An event on the time axis: a vertical rule on the charts and a marker on the lane.
#[derive(Debug, Clone)]
pub struct Mark {
    pub at_ns: u64,
    /// The event kind (a CSS class: `failover`, `signature_change`, …).
    pub kind: &'static str,
    /// What the lane shows beside the marker: `failover 297 ms`.
    pub label: String,
    /// The hover text: the whole event.
    pub detail: String,
}

/// A column's hover: its figures as text, and where a click on it goes (a zoom).
#[derive(Debug, Clone)]
pub struct Hover {
    pub start_ns: u64,
    pub end_ns: u64,
    pub text: String,
    pub href: String,
}

/// A chart over time.
#[derive(Debug)]
pub struct TimeChart<'a> {
    pub title: &'a str,
    pub y_desc: &'a str,
    pub from_ns: u64,
    pub to_ns: u64,
    /// A logarithmic y axis (latencies), else linear from 0 (loss).
    pub log: bool,
    pub height: u32,
    pub lines: &'a [Line],
    pub marks: &'a [Mark],
    pub hovers: &'a [Hover],
    /// How a y value is labelled.
    pub y_label: fn(f64) -> String,
}

/// Seconds since `from_ns`, the x value of a time chart.
#[allow(clippy::cast_precision_loss)]
fn secs(ns: u64, from_ns: u64) -> f64 {
    ns.saturating_sub(from_ns) as f64 / 1e9
}

/// A time for an axis label: `20:39`, or `12-07 20:39` over a range of more than a day.
fn time_label(ns: u64, span_s: f64) -> String {
    let t = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns),
    )
    .to_string();
    // 2026-12-07T20:39:00Z
    if span_s > 86_400.0 {
        format!("{} {}", &t[5..10], &t[11..16])
    } else if span_s > 600.0 {
        t[11..16].to_string()
    } else {
        t[11..19].to_string()
    }
}

#[allow(clippy::needless_pass_by_value, reason = "used as map_err(draw_error)")]
fn draw_error(e: DrawingAreaErrorKind<std::io::Error>) -> Error {
    Error::Config(format!("cannot draw the plot: {e}"))
}

/// The legend of a time or capacity chart, in its upper left corner.
fn legend<'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, SVGBackend<'a>, CT>) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(draw_error)
}

/// Puts SVG elements of ours (hovers, marks) after what plotters drew.
fn append(mut svg: String, extra: &str) -> String {
    if let Some(at) = svg.rfind("</svg>") {
        svg.insert_str(at, extra);
    }
    svg
}

/// A pixel box: x from..to, y from..to.
type Area = (std::ops::Range<i32>, std::ops::Range<i32>);

/// The rules of the marks and the hover columns over the plotting `area`, `x` giving a
/// time's pixel.
fn overlays(area: &Area, x: &dyn Fn(u64) -> i32, marks: &[Mark], hovers: &[Hover]) -> String {
    let (xs, ys) = area;
    let inside = |px: i32| px.clamp(xs.start, xs.end);
    let html = maud::html! {
        @for m in marks {
            line class={ "mark " (m.kind) } x1=(inside(x(m.at_ns))) x2=(inside(x(m.at_ns)))
                y1=(ys.start) y2=(ys.end) { title { (m.detail) } }
        }
        @for h in hovers {
            @let (a, b) = (inside(x(h.start_ns)), inside(x(h.end_ns)));
            a href=(h.href) {
                rect class="hover" x=(a) y=(ys.start) width=((b - a).max(1))
                    height=(ys.end - ys.start) { title { (h.text) } }
            }
        }
    };
    html.into_string()
}

/// A chart of `c.lines` over time, with the marks as vertical rules and a hover per
/// column.
#[allow(
    clippy::too_many_lines,
    reason = "one chart: the same drawing over a logarithmic or a linear axis"
)]
pub fn time_svg(c: &TimeChart) -> Result<String> {
    let values = c
        .lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|p| p.1));
    let (lo, hi) = values.fold((f64::MAX, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = secs(c.to_ns, c.from_ns).max(1.0);
    let mut svg = String::new();
    let extra;
    {
        let root = SVGBackend::with_string(&mut svg, (TIME_WIDTH, c.height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut builder = ChartBuilder::on(&root);
        builder
            .caption(c.title, ("sans-serif", 16))
            .margin(MARGIN)
            .x_label_area_size(30)
            .y_label_area_size(Y_LABELS);
        let from = c.from_ns;
        let x_fmt = move |v: &f64| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let ns = from + (v * 1e9) as u64;
            time_label(ns, span)
        };
        let (y_fmt, log) = (c.y_label, c.log);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_labels(8)
                    .y_labels(if log { 40 } else { 8 })
                    .max_light_lines(0)
                    .x_label_formatter(&x_fmt)
                    .y_label_formatter(&|v| {
                        if log {
                            one_two_five(*v, y_fmt)
                        } else {
                            y_fmt(*v)
                        }
                    })
                    .y_desc(c.y_desc)
                    .draw()
                    .map_err(draw_error)?;
                for line in c.lines {
                    let colour = line.colour;
                    let width = line.width;
                    let mut first = true;
                    // One series per run of columns with data: a gap breaks the curve.
                    for run in line.points.split(|p| p.1.is_none()) {
                        if run.is_empty() {
                            continue;
                        }
                        let pts: Vec<(f64, f64)> = run
                            .iter()
                            .filter_map(|&(t, v)| Some((secs(t, from), v?)))
                            .collect();
                        let drawn = chart
                            .draw_series(LineSeries::new(pts, colour.stroke_width(width)))
                            .map_err(draw_error)?;
                        if first {
                            drawn.label(line.label.clone()).legend(move |(x, y)| {
                                PathElement::new(
                                    vec![(x, y), (x + 18, y)],
                                    colour.stroke_width(width),
                                )
                            });
                            first = false;
                        }
                    }
                }
                if c.lines
                    .iter()
                    .any(|l| l.points.iter().any(|p| p.1.is_some()))
                {
                    legend(&mut chart)?;
                }
                let area = chart.plotting_area().get_pixel_range();
                let y0 = chart.y_range().start;
                extra = overlays(
                    &area,
                    &|t| chart.backend_coord(&(secs(t, from), y0)).0,
                    c.marks,
                    c.hovers,
                );
            }};
        }
        if c.log {
            draw!(
                builder
                    .build_cartesian_2d(0.0..span, log_range(lo, hi).log_scale())
                    .map_err(draw_error)?
            );
        } else {
            let hi = if hi > 0.0 { hi * 1.15 } else { 1.0 };
            draw!(
                builder
                    .build_cartesian_2d(0.0..span, 0.0..hi)
                    .map_err(draw_error)?
            );
        }
        root.present().map_err(draw_error)?;
    }
    Ok(append(svg, &extra))
}

/// The events lane: a marker per event at its time, on the x axis of the time charts,
/// its label beside it (in three rows, so that neighbours do not overwrite each other)
/// and the whole event on hover.
pub fn lane_svg(from_ns: u64, to_ns: u64, marks: &[Mark]) -> Result<String> {
    const HEIGHT: u32 = 92;
    let span = secs(to_ns, from_ns).max(1.0);
    let mut svg = String::new();
    let extra;
    {
        let root = SVGBackend::with_string(&mut svg, (TIME_WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let chart = ChartBuilder::on(&root)
            .margin(MARGIN)
            .margin_top(4)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(0.0..span, 0.0..1.0)
            .map_err(draw_error)?;
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let x = |t: u64| {
            chart
                .backend_coord(&(secs(t, from_ns), 0.0))
                .0
                .clamp(xs.start, xs.end)
        };
        let row_h = (ys.end - ys.start) / 3;
        let html = maud::html! {
            line class="lane" x1=(xs.start) x2=(xs.end) y1=(ys.end) y2=(ys.end) {}
            text class="lane-title" x=(MARGIN) y=(ys.start + 12) { "events" }
            @if marks.is_empty() {
                text class="lane-empty" x=(xs.start + 8) y=(ys.start + row_h + 4) { "no events in this range" }
            }
            @for (i, m) in marks.iter().enumerate() {
                @let (px, py) = (x(m.at_ns), ys.start + row_h * i32::try_from(i % 3).unwrap_or(0) + row_h / 2 + 4);
                g class={ "event " (m.kind) } {
                    title { (m.detail) }
                    line x1=(px) x2=(px) y1=(py) y2=(ys.end) {}
                    circle cx=(px) cy=(py) r="5" {}
                    @if px > i32::midpoint(xs.start, xs.end) {
                        text x=(px - 8) y=(py + 4) text-anchor="end" { (m.label) }
                    } @else {
                        text x=(px + 8) y=(py + 4) { (m.label) }
                    }
                }
            }
        };
        extra = html.into_string();
        root.present().map_err(draw_error)?;
    }
    Ok(append(svg, &extra))
}

/// A heatmap of the RTT distribution over time: each column's samples by latency bin,
/// coloured by the share of the column's samples in the bin (so a quiet column reads as
/// well as a busy one), the latency axis logarithmic.
pub fn heatmap_svg(
    title: &str,
    h: &crate::dash::HeatmapAnswer,
    from_ns: u64,
    to_ns: u64,
) -> Result<String> {
    use plotters::style::colors::colormaps::ViridisRGB;
    let span = secs(to_ns, from_ns).max(1.0);
    let y = match (h.edges_us.first(), h.edges_us.last()) {
        (Some(&lo), Some(&hi)) if hi > 0.0 => log_range(lo, hi.max(lo * 1.01)),
        _ => 100.0..1000.0,
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (TIME_WIDTH, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(MARGIN)
            .x_label_area_size(30)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(0.0..span, y.log_scale())
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_labels(8)
            .y_labels(40)
            .max_light_lines(0)
            .x_label_formatter(&|v| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let ns = from_ns + (v * 1e9) as u64;
                time_label(ns, span)
            })
            .y_label_formatter(&|v| one_two_five(*v, latency_label))
            .y_desc("RTT (logarithmic)")
            .draw()
            .map_err(draw_error)?;
        let mut cells = Vec::new();
        for col in &h.columns {
            let total: u64 = col.counts.iter().sum();
            if total == 0 {
                continue;
            }
            let (x0, x1) = (secs(col.start_ns, from_ns), secs(col.end_ns, from_ns));
            for (i, &n) in col.counts.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let (y0, y1) = (h.edges_us[i], h.edges_us[i + 1].max(h.edges_us[i] * 1.001));
                #[allow(clippy::cast_precision_loss)]
                let share = n as f64 / total as f64;
                let colour = ViridisRGB::get_color(1.0 - share.sqrt());
                cells.push(Rectangle::new([(x0, y0), (x1, y1)], colour.filled()));
            }
        }
        chart.draw_series(cells).map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// A rate for an axis label: `50 Mbit/s`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn rate_label(bps: f64) -> String {
    pathprobe_proto::rate::Rate(bps.max(0.0) as u64).to_string()
}

/// Where a capacity plot draws: one half of it.
type Half<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

const PASS: RGBColor = RGBColor(46, 133, 64);
const FAIL: RGBColor = RGBColor(198, 40, 40);

fn verdict_colour(passed: bool) -> RGBColor {
    if passed { PASS } else { FAIL }
}

/// What each stage delivered against what it offered, the diagonal (all of it carried)
/// and the knee ringed.
#[allow(clippy::cast_precision_loss)]
fn delivered_chart(
    area: &Half,
    rec: &pathprobe_proto::event::CapacityRecord,
    max: f64,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption("delivered against offered", ("sans-serif", 15))
        .margin(MARGIN)
        .x_label_area_size(36)
        .y_label_area_size(Y_LABELS + 8)
        .build_cartesian_2d(0.0..max, 0.0..max)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(6)
        .max_light_lines(0)
        .x_label_formatter(&|v| rate_label(*v))
        .y_label_formatter(&|v| rate_label(*v))
        .x_desc("offered")
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (max, max)],
            BLACK.mix(0.25).stroke_width(1),
        ))
        .map_err(draw_error)?;
    chart
        .draw_series(rec.stages.iter().map(|s| {
            Circle::new(
                (s.offered_bps as f64, s.delivered_bps as f64),
                5,
                verdict_colour(s.passed).filled(),
            )
        }))
        .map_err(draw_error)?;
    let knee = rec
        .stages
        .iter()
        .filter(|s| s.passed && Some(s.delivered_bps) == rec.capacity_bps)
        .max_by_key(|s| s.offered_bps);
    if let Some(k) = knee {
        let at = (k.offered_bps as f64, k.delivered_bps as f64);
        chart
            .draw_series([Circle::new(at, 9, BLACK.stroke_width(2))])
            .map_err(draw_error)?
            .label(format!("knee: {}", rate_label(at.1)))
            .legend(|(x, y)| Circle::new((x + 9, y), 5, BLACK.stroke_width(2)));
        legend(&mut chart)?;
    }
    Ok(())
}

/// Each stage's RTT p99 under its load, against the limit a stage must keep to pass.
#[allow(clippy::cast_precision_loss)]
fn loaded_rtt_chart(
    area: &Half,
    rec: &pathprobe_proto::event::CapacityRecord,
    max: f64,
) -> Result<()> {
    let rtts: Vec<f64> = rec.stages.iter().filter_map(|s| s.rtt_p99_us).collect();
    let hi = rtts
        .iter()
        .copied()
        .fold(rec.rtt_limit_us, f64::max)
        .max(1.0);
    let lo = rtts
        .iter()
        .copied()
        .fold(rec.idle_rtt_p99_us.max(1.0), f64::min);
    let mut chart = ChartBuilder::on(area)
        .caption("RTT p99 under load", ("sans-serif", 15))
        .margin(MARGIN)
        .x_label_area_size(36)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0.0..max, log_range(lo, hi).log_scale())
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(40)
        .max_light_lines(0)
        .x_label_formatter(&|v| rate_label(*v))
        .y_label_formatter(&|v| one_two_five(*v, latency_label))
        .x_desc("offered")
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, rec.rtt_limit_us), (max, rec.rtt_limit_us)],
            FAIL.mix(0.5).stroke_width(1),
        ))
        .map_err(draw_error)?
        .label(format!("limit {}", latency_label(rec.rtt_limit_us)))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], FAIL.mix(0.5)));
    chart
        .draw_series(rec.stages.iter().filter_map(|s| {
            Some(Circle::new(
                (s.offered_bps as f64, s.rtt_p99_us?),
                5,
                verdict_colour(s.passed).filled(),
            ))
        }))
        .map_err(draw_error)?;
    legend(&mut chart)?;
    Ok(())
}

/// A capacity test's stages: on the left, what each stage delivered against what it
/// offered (a stage on the diagonal carried all of it), on the right, its RTT p99 under that
/// load against the limit a stage must keep to pass; passing stages green, failing red,
/// the knee ringed.
#[allow(clippy::cast_precision_loss)]
pub fn capacity_svg(rec: &pathprobe_proto::event::CapacityRecord) -> Result<String> {
    let max = rec
        .stages
        .iter()
        .map(|s| s.offered_bps.max(s.delivered_bps))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.08;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (TIME_WIDTH, 330)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let (left, right) = root.split_horizontally(TIME_WIDTH / 2);
        delivered_chart(&left, rec, max)?;
        loaded_rtt_chart(&right, rec, max)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_are_labelled_in_the_nearest_unit() {
        assert_eq!(latency_label(250.0), "250 µs");
        assert_eq!(latency_label(1_500.0), "1.5 ms");
        assert_eq!(latency_label(2_000_000.0), "2 s");
        assert_eq!(latency_label(2_033.0), "2.03 ms");
        assert_eq!(latency_label(30_065.0), "30.1 ms");
    }
}
