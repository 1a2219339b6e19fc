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
            .x_label_formatter(&|v| {
                let mantissa = v / 10f64.powf(v.log10().floor());
                if [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6) {
                    latency_label(*v)
                } else {
                    String::new()
                }
            })
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
