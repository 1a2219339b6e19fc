//! The dashboard's pages, rendered on the server: the fleet grid (`/`), a site's page
//! (`/site`), ExpressRoute against the VPN, and the login form (`/login`). HTML comes from
//! maud templates, which escape every value, so a name or an event summary reaches the
//! page only as text; plots are plotters' SVG ([`crate::plot`]) inline, with our hovers
//! and marks over them. No script runs: the range, the paths and the zoom are links and
//! forms, and hover text is SVG `<title>`s, so the page works under a
//! Content-Security-Policy that allows no script at all.
//!
//! Every figure comes from the same exact merges as the JSON endpoints ([`crate::dash`],
//! [`crate::compare`]): the summary table is `/v1/compare`'s rows, printed as `compare`
//! prints them.

use maud::{DOCTYPE, Markup, html};
use pathprobe_proto::event::EventKind;
use plotters::style::{Color as _, RGBAColor};

use crate::Result;
use crate::compare::{self, Comparison};
use crate::dash::{self, CdfAnswer, GridAnswer, HeatmapAnswer, SeriesAnswer};
use crate::plot::{self, Hover, Line, Mark, TimeChart};
use crate::store::{EventRow, PathRow, Selector, Store};

/// The stylesheet, built into the binary and served at `/dash.css`.
pub const CSS: &str = include_str!("../assets/dash.css");

/// The ranges offered in the range pickers.
pub const RANGES: [&str; 6] = ["15m", "1h", "6h", "24h", "7d", "30d"];

/// Columns of a site page's time series, and of its heatmaps: 24 hours of 10 s windows
/// read 144 ten-minute buckets (the finest rollup that fits), an hour reads each window.
pub const PAGE_COLUMNS: usize = 720;
const HEAT_COLUMNS: usize = 240;
const HEAT_BINS: usize = 32;

/// Side A is ExpressRoute-blue and side B VPN-orange, as in `compare --plot`.
const BLUE: (u8, u8, u8) = (31, 100, 180);
const ORANGE: (u8, u8, u8) = (230, 120, 20);

fn colour(c: (u8, u8, u8), alpha: f64) -> RGBAColor {
    plotters::style::RGBColor(c.0, c.1, c.2).mix(alpha)
}

/// A query string from pairs, escaped.
fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

/// The page around `body`, with the stylesheet and a header linking back to the grid.
fn layout(title: &str, body: &Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · pathprobe" }
                link rel="stylesheet" href="/dash.css";
            }
            body {
                header {
                    a.brand href="/" { "pathprobe" }
                    span.crumb { (title) }
                }
                main { (body) }
            }
        }
    }
    .into_string()
}

/// The login form; `message` says why it is shown again.
pub fn login(message: Option<&str>) -> String {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(m) = message {
            p.error role="alert" { (m) }
        }
        form.login method="post" action="/login" {
            label for="token" { "Reader token" }
            input #token type="password" name="token" autocomplete="current-password" required;
            button type="submit" { "Sign in" }
        }
        p.hint {
            "The token is a " code { "reader NAME TOKEN" } " line of the collector's tokens file ("
            code { "pathprobe-collector token new --reader NAME" } "). The session lasts 12 hours."
        }
    };
    layout("sign in", &body)
}

/// The range picker: the ranges offered, the current one marked.
fn range_picker(current: &str, extra: &[(&str, &str)], action: &str) -> Markup {
    html! {
        nav.ranges {
            "range: "
            @for r in RANGES {
                @let pairs: Vec<(&str, &str)> = extra.iter().copied().chain([("since", r)]).collect();
                @if r == current {
                    strong { (r) }
                } @else {
                    a href={ (action) "?" (query(&pairs)) } { (r) }
                }
                " "
            }
        }
    }
}

fn ms(us: Option<f64>) -> String {
    us.map_or_else(|| "-".to_string(), plot::latency_label)
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.2}%"))
}

/// How long ago, for people: `12 s`, `4 min`, `3 h`, `2 d`.
fn ago(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else if s < 7_200.0 {
        format!("{:.0} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.0} h", s / 3_600.0)
    } else {
        format!("{:.0} d", s / 86_400.0)
    }
}

/// The fleet grid: a row per site, a cell per path kind, coloured by the rule, which the
/// page states.
pub fn grid(g: &GridAnswer, since: &str) -> String {
    let body = html! {
        h1 { "Fleet: the last " (since) }
        (range_picker(since, &[], "/"))
        @if g.sites.is_empty() {
            p.empty { "No path has reported yet. Start an agent with this collector in its [collector] section." }
        } @else {
            table.grid {
                thead { tr {
                    th { "site" }
                    @for k in &g.kinds { th { (k) } }
                } }
                tbody {
                    @for row in &g.sites {
                        tr data-site=(row.site) {
                            th.site { a href={ "/site?" (query(&[("site", &row.site), ("since", since)])) } { (row.site) } }
                            @for k in &g.kinds {
                                @if let Some(c) = row.cells.get(k) {
                                    td class={ "cell " (c.state) } data-state=(c.state) data-kind=(k) {
                                        a href={ "/site?" (query(&[("site", &row.site), ("since", since)])) } {
                                            span.state { (c.state.replace('_', " ")) }
                                            span.fig { "p50 " (ms(c.rtt_p50_us)) " · p99 " (ms(c.rtt_p99_us)) }
                                            span.fig { "loss " (pct(c.loss_pct)) }
                                            span.age {
                                                @if c.last_report_ns == 0 { "never reported" }
                                                @else { "last report " (ago(c.age_s)) " ago" }
                                            }
                                            @if !c.silent_paths.is_empty() {
                                                span.silent { "silent: " (c.silent_paths.join(", ")) }
                                            }
                                        }
                                    }
                                } @else {
                                    td.cell.none data-state="none" data-kind=(k) { "—" }
                                }
                            }
                        }
                    }
                }
            }
        }
        section.rule {
            h2 { "How cells are coloured" }
            p #rule { (g.rule_text) }
            p.legend {
                span.cell.ok { "ok" } " " span.cell.warning { "warning" } " "
                span.cell.fail { "fail" } " " span.cell.silent { "silent" } " "
                span.cell.no_data { "no data in the range" }
            }
        }
    };
    layout("fleet", &body)
}

/// A site's page question.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct SiteQuery {
    /// Empty when not given: the fleet grid is shown instead.
    #[serde(default)]
    pub site: String,
    /// The two sides: a path name or kind each (ExpressRoute and the VPN unless asked).
    pub a: Option<String>,
    pub b: Option<String>,
    pub since: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// Everything a site's page shows, read from the store.
#[derive(Debug)]
pub struct Site {
    pub site: String,
    pub a: String,
    pub b: String,
    pub from_ns: u64,
    pub to_ns: u64,
    /// The range as asked (`since`), for the range picker; `None` for from/to.
    pub since: Option<String>,
    pub paths: Vec<PathRow>,
    pub comparison: Comparison,
    pub cdf: [CdfAnswer; 2],
    pub series: [SeriesAnswer; 2],
    pub heatmap: [HeatmapAnswer; 2],
    /// The site's newest capacity tests (up to [`CAPACITY_SHOWN`], within
    /// [`CAPACITY_LOOKBACK`] of the range's end), newest first.
    pub capacity: Vec<EventRow>,
}

/// Capacity tests a site's page shows, and how far back from its range's end it looks
/// for them: tests run weekly or monthly, rarely inside the range looked at.
pub const CAPACITY_SHOWN: usize = 3;
pub const CAPACITY_LOOKBACK: u64 = 31 * 86_400 * 1_000_000_000;

/// The side a site's page shows unless asked: `kind` if one of the site's paths has it,
/// else the `nth` path's name.
fn default_side(paths: &[PathRow], kind: &str, nth: usize) -> String {
    if paths.iter().any(|p| p.kind == kind) {
        return kind.to_string();
    }
    paths
        .get(nth)
        .or_else(|| paths.first())
        .map_or_else(|| kind.to_string(), |p| p.name.clone())
}

/// Reads a site's page from `store`: one comparison (whose merges also give the CDFs) and
/// one series per side (which also gives its heatmap).
pub fn site_data(store: &dyn Store, q: &SiteQuery, from_ns: u64, to_ns: u64) -> Result<Site> {
    let paths: Vec<PathRow> = store
        .paths()?
        .into_iter()
        .filter(|p| p.site == q.site)
        .collect();
    let a =
        q.a.clone()
            .unwrap_or_else(|| default_side(&paths, "expressroute", 0));
    let b =
        q.b.clone()
            .unwrap_or_else(|| default_side(&paths, "vpn", 1));
    let sel = |side: &str| Selector {
        name_or_kind: side.to_string(),
        site: Some(q.site.clone()),
    };
    let (comparison, ma, mb) = compare::compare_merged(store, &sel(&a), &sel(&b), from_ns, to_ns)?;
    let mut series = Vec::with_capacity(2);
    let mut heat = Vec::with_capacity(2);
    for side in [&a, &b] {
        let s = store.series(
            &sel(side),
            from_ns,
            to_ns,
            PAGE_COLUMNS,
            &dash::PAGE_METRICS,
        )?;
        heat.push(dash::heatmap_of(&s, HEAT_COLUMNS, HEAT_BINS)?);
        series.push(dash::series_of(&s));
    }
    let [ha, hb]: [HeatmapAnswer; 2] = heat
        .try_into()
        .map_err(|_| crate::Error::Config("two sides".into()))?;
    let [sa, sb]: [SeriesAnswer; 2] = series
        .try_into()
        .map_err(|_| crate::Error::Config("two sides".into()))?;
    let mut capacity = store.events(
        &Selector {
            name_or_kind: String::new(),
            site: Some(q.site.clone()),
        },
        to_ns.saturating_sub(CAPACITY_LOOKBACK),
        to_ns,
        Some(EventKind::CapacityTest),
        compare::MAX_EVENTS,
    )?;
    capacity.retain(|e| e.event.capacity.is_some());
    capacity.reverse();
    capacity.truncate(CAPACITY_SHOWN);
    Ok(Site {
        site: q.site.clone(),
        a,
        b,
        from_ns,
        to_ns,
        since: if q.from.is_some() {
            None
        } else {
            q.since.clone().or_else(|| Some("1h".into()))
        },
        paths,
        cdf: [dash::cdf_of(&ma), dash::cdf_of(&mb)],
        series: [sa, sb],
        heatmap: [ha, hb],
        comparison,
        capacity,
    })
}

/// An event's label on the lane: its kind, and the outage in ms when it has one.
fn event_label(e: &EventRow) -> String {
    match &e.event.outage {
        Some(o) => format!("{} {} ms", e.event.kind, fmt_ms(o.outage_ms)),
        None => e.event.kind.to_string(),
    }
}

/// Milliseconds to a tenth.
fn fmt_ms(v: f64) -> String {
    format!("{v:.1}")
}

fn kind_class(k: EventKind) -> &'static str {
    k.as_str()
}

/// A curve of each side: its name, width, opacity and figure.
type Curve<'a> = (&'a str, u32, f64, fn(&dash::Point) -> Option<f64>);

/// A column's midpoint.
fn mid(p: &dash::Point) -> u64 {
    p.start_ns + p.end_ns.saturating_sub(p.start_ns) / 2
}

impl Site {
    /// A link to this page with `pairs` in place of the range.
    fn link(&self, range: &[(&str, &str)]) -> String {
        let mut pairs = vec![("site", self.site.as_str()), ("a", &self.a), ("b", &self.b)];
        pairs.extend_from_slice(range);
        format!("/site?{}", query(&pairs))
    }

    /// A link to the range `[from_ns, to_ns)`, in whole seconds.
    fn range_link(&self, from_ns: u64, to_ns: u64) -> String {
        let (f, t) = (
            (from_ns / 1_000_000_000).to_string(),
            to_ns.div_ceil(1_000_000_000).to_string(),
        );
        self.link(&[("from", &f), ("to", &t)])
    }

    /// The range around `centre_ns`, `factor` times the current span (at least a minute).
    fn zoom(&self, centre_ns: u64, factor: f64) -> String {
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let half = (((self.to_ns - self.from_ns) as f64 * factor / 2.0) as u64).max(30_000_000_000);
        self.range_link(
            centre_ns.saturating_sub(half),
            centre_ns.saturating_add(half),
        )
    }

    fn marks(&self) -> Vec<Mark> {
        self.comparison
            .events
            .iter()
            .map(|e| Mark {
                at_ns: e
                    .event
                    .outage
                    .as_ref()
                    .map_or(e.event.at_unix_ns, |o| o.start_unix_ns),
                kind: kind_class(e.event.kind),
                label: event_label(e),
                detail: format!(
                    "{} {} ({}, agent {}): {}",
                    compare::rfc3339(e.event.at_unix_ns),
                    e.path,
                    e.path_kind,
                    e.agent_id,
                    e.event.summary
                ),
            })
            .collect()
    }

    /// One hover per column of side A (of side B where A has none): both sides' figures
    /// of the column, and a click zooms in on it.
    fn hovers(&self) -> Vec<Hover> {
        let [sa, sb] = &self.series;
        let base = if sa.columns.is_empty() { sb } else { sa };
        let at = |s: &SeriesAnswer, t: u64| {
            s.columns
                .iter()
                .find(|c| c.start_ns <= t && t < c.end_ns)
                .cloned()
        };
        let line = |name: &str, p: Option<dash::Point>| match p {
            Some(p) => format!(
                "{name}: p50 {} · p99 {} · loss {} ({} windows)",
                ms(p.rtt_us.map(|r| r.p50)),
                ms(p.rtt_us.map(|r| r.p99)),
                pct(p.loss_pct),
                p.windows
            ),
            None => format!("{name}: no data"),
        };
        base.columns
            .iter()
            .map(|c| {
                let t = mid(c);
                Hover {
                    start_ns: c.start_ns,
                    end_ns: c.end_ns,
                    text: format!(
                        "{} to {}\n{}\n{}\n(click to zoom in)",
                        compare::rfc3339(c.start_ns),
                        compare::rfc3339(c.end_ns),
                        line(&self.a, at(sa, t)),
                        line(&self.b, at(sb, t))
                    ),
                    href: self.zoom(t, 0.25),
                }
            })
            .collect()
    }

    fn lines(&self, pick: &[Curve]) -> Vec<Line> {
        let mut out = Vec::new();
        for (side, (name, rgb)) in self.series.iter().zip([(&self.a, BLUE), (&self.b, ORANGE)]) {
            for &(what, width, alpha, f) in pick {
                out.push(Line {
                    label: format!("{name} {what}"),
                    colour: colour(rgb, alpha),
                    width,
                    points: side.columns.iter().map(|c| (mid(c), f(c))).collect(),
                });
            }
        }
        out
    }
}

fn ms_axis(us: f64) -> String {
    plot::latency_label(us)
}

fn pct_axis(v: f64) -> String {
    format!("{v:.1}%")
}

/// The summary table: `/v1/compare`'s rows, as `compare` prints them; each figure also
/// carries its exact value (`data-value`).
fn summary(c: &Comparison) -> Markup {
    html! {
        table.summary {
            thead { tr { th { "figure" } th.a { (c.a) } th.b { (c.b) } th { "b − a" } th { "b / a" } } }
            tbody {
                @for r in &c.rows {
                    tr data-figure=(r.figure) {
                        th { (r.figure) }
                        td.a data-value=[r.a] { (compare::cell(r.a)) }
                        td.b data-value=[r.b] { (compare::cell(r.b)) }
                        td { (compare::cell(r.diff)) }
                        td { (r.ratio.map_or_else(|| "-".to_string(), |x| format!("{x:.2}×"))) }
                    }
                }
            }
        }
    }
}

fn events_table(events: &[EventRow]) -> Markup {
    html! {
        @if events.is_empty() {
            p.empty { "No events in this range." }
        } @else {
            table.events {
                thead { tr { th { "time" } th { "path" } th { "event" } th { "outage" } th { "what happened" } } }
                tbody {
                    @for e in events {
                        tr class={ "event " (kind_class(e.event.kind)) } data-kind=(e.event.kind.as_str())
                            data-outage-ms=[e.event.outage.as_ref().map(|o| o.outage_ms)] {
                            td { (compare::rfc3339(e.event.at_unix_ns)) }
                            td { (e.path) " (" (e.path_kind) ", " (e.agent_id) ")" }
                            td { (e.event.kind.as_str()) }
                            td.outage { @if let Some(o) = &e.event.outage { (fmt_ms(o.outage_ms)) " ms" } @else { "" } }
                            td {
                                (e.event.summary)
                                @if let Some(t) = &e.event.trace {
                                    br;
                                    span.trace {
                                        "trace: "
                                        (t.hops.iter().map(|h| h.addr.map_or_else(|| "*".to_string(), |a| a.to_string())).collect::<Vec<_>>().join(" → "))
                                        @if !t.reached { " (not reached)" }
                                    }
                                } @else if let Some(err) = &e.event.trace_error {
                                    br; span.trace { "no trace: " (err) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn rate(bps: u64) -> String {
    pathprobe_proto::rate::Rate(bps).to_string()
}

/// One capacity test: what it concluded, its stages, and the plot of them.
fn capacity_test(e: &EventRow, svg: &str) -> Markup {
    html! {
        @if let Some(c) = &e.event.capacity {
            article.capacity data-test=(e.path) data-capacity-bps=[c.capacity_bps] {
                h3 { (e.path) ", " (compare::rfc3339(e.event.at_unix_ns)) " (agent " (e.agent_id) ")" }
                ul.conclusion { @for l in &c.conclusion { li { (l) } } }
                div.plot { (maud::PreEscaped(svg)) }
                table.stages {
                    thead { tr { th { "stage" } th { "offered" } th { "delivered" } th { "loss" } th { "RTT p50" } th { "RTT p99" } th { "verdict" } } }
                    tbody {
                        @for st in &c.stages {
                            tr class=(if st.passed { "pass" } else { "fail" }) {
                                td { (st.number) }
                                td { (rate(st.offered_bps)) }
                                td { (rate(st.delivered_bps)) }
                                td { (format!("{:.2}%", st.loss_pct)) }
                                td { (ms(st.rtt_p50_us)) }
                                td { (ms(st.rtt_p99_us)) }
                                td { (st.verdict) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The paths picker: both sides among the site's path kinds and names.
fn sides_form(s: &Site) -> Markup {
    let mut choices: Vec<String> = Vec::new();
    for p in &s.paths {
        for c in [&p.kind, &p.name] {
            if !choices.contains(c) {
                choices.push(c.clone());
            }
        }
    }
    let from = (s.from_ns / 1_000_000_000).to_string();
    let to = s.to_ns.div_ceil(1_000_000_000).to_string();
    html! {
        form.sides method="get" action="/site" {
            input type="hidden" name="site" value=(s.site);
            @if let Some(since) = &s.since {
                input type="hidden" name="since" value=(since);
            } @else {
                input type="hidden" name="from" value=(from);
                input type="hidden" name="to" value=(to);
            }
            label { "a " select name="a" { @for c in &choices { option value=(c) selected[*c == s.a] { (c) } } } }
            label { " against b " select name="b" { @for c in &choices { option value=(c) selected[*c == s.b] { (c) } } } }
            button type="submit" { "compare" }
        }
    }
}

/// A site's page: ExpressRoute (side a) against the VPN (side b).
#[allow(clippy::too_many_lines, reason = "one template, in page order")]
pub fn site(s: &Site) -> Result<String> {
    let marks = s.marks();
    let hovers = s.hovers();
    let title = format!("{}: {} against {}", s.site, s.a, s.b);
    let cdf = s
        .cdf
        .iter()
        .any(|c| c.count > 0)
        .then(|| {
            plot::cdf_svg(
                &format!(
                    "RTT distribution, {} to {}",
                    s.comparison.from, s.comparison.to
                ),
                &[(s.a.as_str(), &s.cdf[0]), (s.b.as_str(), &s.cdf[1])],
            )
        })
        .transpose()?;
    let chart =
        |title: &str, y: &str, log: bool, height, lines: &[Line], hovers: &[Hover], y_label| {
            plot::time_svg(&TimeChart {
                title,
                y_desc: y,
                from_ns: s.from_ns,
                to_ns: s.to_ns,
                log,
                height,
                lines,
                marks: &marks,
                hovers,
                y_label,
            })
        };
    let rtt = chart(
        &format!("RTT p50 and p99 per {}", s.series[0].resolution),
        "RTT (logarithmic)",
        true,
        340,
        &s.lines(&[
            ("p50", 2, 1.0, |p| p.rtt_us.map(|r| r.p50)),
            ("p99", 1, 0.55, |p| p.rtt_us.map(|r| r.p99)),
        ]),
        &hovers,
        ms_axis,
    )?;
    let loss = chart(
        "Loss",
        "lost",
        false,
        200,
        &s.lines(&[("loss", 2, 1.0, |p| p.loss_pct)]),
        &[],
        pct_axis,
    )?;
    let lane = plot::lane_svg(s.from_ns, s.to_ns, &marks)?;
    let owd_known = [&s.comparison.owd_clock_a, &s.comparison.owd_clock_b]
        .iter()
        .any(|c| *c != "unavailable");
    let owd = owd_known
        .then(|| {
            chart(
                &format!(
                    "One-way delay p50: {} clock {}, {} clock {}",
                    s.a, s.comparison.owd_clock_a, s.b, s.comparison.owd_clock_b
                ),
                "one-way delay (logarithmic)",
                true,
                300,
                &s.lines(&[
                    ("forward", 2, 1.0, |p| p.owd_forward_us.map(|r| r.p50)),
                    ("reverse", 1, 0.55, |p| p.owd_reverse_us.map(|r| r.p50)),
                ]),
                &[],
                ms_axis,
            )
        })
        .transpose()?;
    let has_jitter = s
        .series
        .iter()
        .any(|side| side.columns.iter().any(|p| p.ipdv_us.is_some()));
    let jitter = has_jitter
        .then(|| {
            chart(
                "Jitter (IPDV) p50 and p99",
                "IPDV (logarithmic)",
                true,
                260,
                &s.lines(&[
                    ("p50", 2, 1.0, |p| p.ipdv_us.map(|r| r.p50)),
                    ("p99", 1, 0.55, |p| p.ipdv_us.map(|r| r.p99)),
                ]),
                &[],
                ms_axis,
            )
        })
        .transpose()?;
    let heat: Vec<String> = [(&s.a, &s.heatmap[0]), (&s.b, &s.heatmap[1])]
        .iter()
        .map(|(name, h)| {
            plot::heatmap_svg(
                &format!("{name}: RTT heatmap per {}", h.resolution),
                h,
                s.from_ns,
                s.to_ns,
            )
        })
        .collect::<Result<_>>()?;
    let capacity: Vec<String> = s
        .capacity
        .iter()
        .filter_map(|e| e.event.capacity.as_ref())
        .map(plot::capacity_svg)
        .collect::<Result<_>>()?;
    let span = s.to_ns - s.from_ns;
    let centre = s.from_ns + span / 2;
    let body = html! {
        h1 { (title) }
        @if s.paths.is_empty() {
            p.empty { "No path of site " strong { (s.site) } " is known to this collector. " a href="/" { "Back to the fleet" } "." }
        }
        (range_picker(s.since.as_deref().unwrap_or(""), &[("site", &s.site), ("a", &s.a), ("b", &s.b)], "/site"))
        nav.zoom {
            (s.comparison.from) " to " (s.comparison.to) ": "
            a href=(s.range_link(s.from_ns.saturating_sub(span / 2), s.to_ns.saturating_sub(span / 2))) { "← earlier" } " · "
            a href=(s.zoom(centre, 0.25)) { "zoom in" } " · "
            a href=(s.zoom(centre, 4.0)) { "zoom out" } " · "
            a href=(s.range_link(s.from_ns + span / 2, s.to_ns + span / 2)) { "later →" }
        }
        (sides_form(s))
        section #summary {
            h2 { "Side by side" }
            (summary(&s.comparison))
            p.clock { "One-way delay clocks: " (s.a) " " (s.comparison.owd_clock_a) ", " (s.b) " " (s.comparison.owd_clock_b)
                " (estimated = offset taken from the lowest-RTT probes; unavailable = no one-way figures)." }
        }
        section #cdf {
            h2 { "RTT distribution" }
            @if let Some(svg) = &cdf { div.plot { (maud::PreEscaped(svg)) } }
            @else { p.empty { "No RTT in this range on either side." } }
        }
        section #series {
            h2 { "Over time" }
            p.hint { "Hover a column for both sides' figures; click it to zoom in." }
            div.plot { (maud::PreEscaped(&rtt)) }
            div.plot #lane { (maud::PreEscaped(&lane)) }
            div.plot { (maud::PreEscaped(&loss)) }
        }
        section #heatmap {
            h2 { "RTT heatmap" }
            p.hint { "Each column's probes by RTT, darker where more of them fell: two bands are two modes, a rising smear is a queue filling." }
            @for h in &heat { div.plot { (maud::PreEscaped(h)) } }
        }
        section #delay {
            h2 { "One-way delay and jitter" }
            @if let Some(o) = &owd { div.plot { (maud::PreEscaped(o)) } }
            @else { p.empty { "No one-way delay: neither side's clocks were synchronized or estimated." } }
            @if let Some(j) = &jitter { div.plot { (maud::PreEscaped(j)) } }
            @else { p.empty { "No jitter: no two consecutive probes were answered on either side." } }
        }
        section #events {
            h2 { "Events" }
            (events_table(&s.comparison.events))
        }
        section #capacity {
            h2 { "Capacity tests" }
            @if s.capacity.is_empty() {
                p.empty { "No capacity test at this site in the 31 days to the end of the range. Schedule one with [[capacity]] in the fleet file or agent.toml." }
            }
            @for (e, svg) in s.capacity.iter().zip(&capacity) {
                (capacity_test(e, svg))
            }
        }
    };
    Ok(layout(&format!("site {}", s.site), &body))
}
