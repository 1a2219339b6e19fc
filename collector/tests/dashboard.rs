//! The dashboard in a real browser: headless Chromium (Debian's `chromium`), driven through
//! chromedriver (the `WebDriver` protocol), against a collector holding known data: two sites, one
//! whose ExpressRoute is degraded and one failover. Screenshots go to
//! `$PATHPROBE_SCREENSHOTS` (CI's log folder), else `target/screenshots`.
//!
//! And the sign-in over plain HTTP: what a browser without a session gets, the cookie's
//! attributes, the Content-Security-Policy.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{OTHER_TOKEN, READER, Server, TOKEN, W, batch, dir, http, report};
use fantoccini::{Client, ClientBuilder, Locator};
use pathprobe_proto::event::{
    CapacityRecord, CapacityStage, EdgeProbe, EventKind, Outage, PathEvent,
};
use pathprobe_proto::report::{PathKind, WindowReport};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The site whose name is markup: it must show as text.
const SCRIPT_SITE: &str = "<script>alert(1)</script>";
const MS: u64 = 1_000_000;
/// The failover's outage.
const OUTAGE_MS: f64 = 297.0;

/// A raw HTTP/1.1 exchange with extra header lines: (status, headers, body).
fn raw(addr: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{head}\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let (headers, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, headers.to_ascii_lowercase(), body.to_string())
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

/// Without a session: the login form, never data; a reader's token signs in with a
/// session cookie that scripts cannot read and other sites cannot send.
#[test]
fn the_dashboard_asks_for_a_reader_token_and_gives_a_secure_session() {
    let s = Server::start(&dir("dash-login"));
    for page in ["/", "/site?site=ams"] {
        let (status, headers, body) = raw(s.addr, &format!("GET {page} HTTP/1.1"), "");
        assert_eq!(status, 303, "{page}: {headers}");
        assert_eq!(header(&headers, "location"), Some("/login"), "{page}");
        assert!(!body.contains("p50"), "{page}: no data: {body}");
    }
    let (status, headers, body) = raw(s.addr, "GET /login HTTP/1.1", "");
    assert_eq!(status, 200);
    assert!(body.contains("name=\"token\""), "{body}");
    let csp = header(&headers, "content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    let form = |token: &str| format!("token={token}");
    let post = "POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded";
    let (status, _, body) = raw(s.addr, post, &form(TOKEN));
    assert_eq!(status, 403, "an agent's token does not read: {body}");
    assert!(body.contains("agent `ams-01`"), "{body}");
    let (status, _, _) = raw(s.addr, post, &form("not-a-token-at-all-0000"));
    assert_eq!(status, 401);
    let (status, _, body) = raw(s.addr, post, "");
    assert_eq!(status, 401, "no token field: the form again, {body}");
    assert!(body.contains("Unknown token"), "{body}");
    let (status, headers, _) = raw(s.addr, post, &form(READER));
    assert_eq!(status, 303, "{headers}");
    let cookie = header(&headers, "set-cookie").unwrap().to_string();
    for attr in ["httponly", "secure", "samesite=strict", "path=/"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_string();
    let with = |page: &str| {
        raw(
            s.addr,
            &format!("GET {page} HTTP/1.1\r\nCookie: {session}"),
            "",
        )
    };
    let (status, _, body) = with("/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Fleet"), "{body}");
    let (status, _, _) = with("/v1/grid");
    assert_eq!(status, 200, "the session reads the JSON too");
    let (status, headers, _) = with("/site");
    assert_eq!(
        (status, header(&headers, "location")),
        (303, Some("/")),
        "no site: the grid"
    );
    let (status, _, body) = with("/site?site=ams&from=yesterday");
    assert_eq!(status, 400);
    assert!(body.contains("`yesterday` is not a time"), "{body}");
    let (status, _, _) = raw(
        s.addr,
        &format!("POST /logout HTTP/1.1\r\nCookie: {session}"),
        "",
    );
    assert_eq!(status, 303);
    let (status, _, _) = with("/");
    assert_eq!(status, 303, "signed out");
}

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn screenshots() -> PathBuf {
    let d = std::env::var_os("PATHPROBE_SCREENSHOTS").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Windows of one path, ending a window ago, so none is silent.
fn windows(
    first_id: u32,
    agent: &str,
    site: &str,
    name: &str,
    kind: PathKind,
    now: u64,
    rtts: &[u64],
) -> Vec<WindowReport> {
    (0..6_u32)
        .map(|i| {
            let mut r = report(
                first_id + i,
                agent,
                name,
                kind,
                now - u64::from(7 - i) * W,
                rtts,
            );
            r.site = Some(site.into());
            r
        })
        .collect()
}

fn send(s: &Server, token: &str, reports: &[WindowReport]) {
    let (status, body) = http(s.addr, "POST", "/v1/reports", Some(token), &batch(reports));
    assert_eq!(status, 200, "{body}");
}

/// A failover of [`OUTAGE_MS`] from `at`.
fn failover(at: u64) -> PathEvent {
    PathEvent {
        kind: EventKind::Failover,
        at_unix_ns: at + W,
        before: None,
        after: None,
        summary: format!("primary → backup: {OUTAGE_MS:.1} ms without answers"),
        trace: None,
        trace_error: None,
        capacity: None,
        outage: Some(Outage {
            outage_ms: OUTAGE_MS,
            start_unix_ns: at,
            end_unix_ns: at + 297 * MS,
            path_before: "primary".into(),
            path_after: "backup".into(),
            last_reply_before: None,
            first_reply_after: EdgeProbe {
                seq: 10,
                sent_unix_ns: at + 297 * MS,
            },
            lost: 297,
            reordered: 0,
            duplicated: 0,
            before: None,
            after: None,
            flapping: false,
        }),
    }
}

/// A capacity test's result: 10 and 30 Mbit/s carried, 50 offered and 41 delivered.
fn capacity_test(at: u64) -> PathEvent {
    let stage = |number, offered_bps: u64, delivered_bps, passed| CapacityStage {
        number,
        offered_bps,
        delivered_bps,
        loss_pct: if passed { 0.0 } else { 18.0 },
        rtt_p50_us: Some(2_100.0),
        rtt_p99_us: Some(if passed { 2_400.0 } else { 48_000.0 }),
        passed,
        verdict: if passed {
            "ok"
        } else {
            "fail: delivered, loss, RTT"
        }
        .to_string(),
    };
    PathEvent {
        kind: EventKind::CapacityTest,
        at_unix_ns: at,
        before: None,
        after: None,
        summary: "usable capacity: 30.0 Mbit/s".into(),
        trace: None,
        trace_error: None,
        outage: None,
        capacity: Some(CapacityRecord {
            stages: vec![
                stage(1, 10_000_000, 10_000_000, true),
                stage(2, 30_000_000, 30_000_000, true),
                stage(3, 50_000_000, 41_000_000, false),
            ],
            capacity_bps: Some(30_000_000),
            saturated: true,
            max_delivered_bps: 41_000_000,
            rtt_inflates_at_bps: Some(50_000_000),
            idle_rtt_p99_us: 2_300.0,
            rtt_limit_us: 6_900.0,
            er_circuit_bps: Some(50_000_000),
            er_gateway: Some("Standard / ErGw1Az".into()),
            vpn_gateway: Some("VpnGw1".into()),
            conclusion: vec![
                "usable capacity: 30.0 Mbit/s (stage 2, offered 30.0 Mbit/s); the path saturates above it (most delivered: 41.0 Mbit/s)".into(),
                "  ExpressRoute circuit: 50.0 Mbit/s".into(),
            ],
        }),
    }
}

/// Two sites: `ams`, whose ExpressRoute's p99 (25 ms) is over its 20 ms threshold and
/// whose service failed over to the VPN for [`OUTAGE_MS`]; `fra`, healthy. A third site's
/// name is markup (set in the store, as a store from elsewhere could hold it), and one
/// event's summary is markup too.
fn known_data(d: &Path) -> (Server, u64) {
    let s = Server::start_with(d, &["--grid-threshold", "expressroute=20ms,5%"]);
    let now = pathprobe_collector::now_ns();
    let healthy_er = vec![2 * MS; 100];
    let vpn = vec![30 * MS; 100];
    let degraded: Vec<u64> = (0..100)
        .map(|i| if i < 90 { 10 * MS } else { 25 * MS })
        .collect();
    let mut ams = windows(
        100,
        "ams-01",
        "ams",
        "er",
        PathKind::Expressroute,
        now,
        &degraded,
    );
    ams.extend(windows(
        200,
        "ams-01",
        "ams",
        "vpn",
        PathKind::Vpn,
        now,
        &vpn,
    ));
    let failover_at = now - 4 * W;
    ams[3].events.push(failover(failover_at));
    // A capacity test at ams: three stages, the last failing; its path is on the site's
    // page, not in the grid.
    let mut stages = windows(
        600,
        "ams-01",
        "ams",
        "er-size",
        PathKind::Other,
        now,
        &healthy_er,
    );
    stages.truncate(3);
    stages[2].events.push(capacity_test(now - 4 * W));
    ams.extend(stages);
    send(&s, TOKEN, &ams);
    let mut fra = windows(
        300,
        "fra-01",
        "fra",
        "er",
        PathKind::Expressroute,
        now,
        &healthy_er,
    );
    fra.extend(windows(
        400,
        "fra-01",
        "fra",
        "vpn",
        PathKind::Vpn,
        now,
        &vpn,
    ));
    let mut xss = windows(
        500,
        "fra-01",
        "xss",
        "er",
        PathKind::Expressroute,
        now,
        &healthy_er,
    );
    xss[0].events.push(PathEvent {
        kind: EventKind::Outage,
        at_unix_ns: now - 6 * W,
        before: None,
        after: None,
        summary: "<img src=x onerror=alert(2)> lost".into(),
        trace: None,
        trace_error: None,
        capacity: None,
        outage: None,
    });
    fra.extend(xss);
    send(&s, OTHER_TOKEN, &fra);
    let db = rusqlite::Connection::open(d.join("store.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let n = db
        .execute(
            "UPDATE paths SET site = ?1 WHERE site = 'xss'",
            [SCRIPT_SITE],
        )
        .unwrap();
    assert_eq!(n, 1);
    (s, now)
}

async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn attr_of(c: &Client, css: &str, attr: &str) -> Option<String> {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .attr(attr)
        .await
        .unwrap()
}

/// A screenshot of the whole page (the window grown to its height).
async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let height = c
        .execute("return document.documentElement.scrollHeight", vec![])
        .await
        .ok()
        .and_then(|v| v.as_u64())
        .unwrap_or(1_400);
    c.set_window_size(1_100, u32::try_from(height.clamp(600, 8_000)).unwrap())
        .await
        .unwrap();
    let png = c.screenshot().await.unwrap();
    let path = screenshots().join(name);
    std::fs::write(&path, png).unwrap();
    eprintln!("screenshot: {}", path.display());
    path
}

/// The page a click led to, once the browser is there (a click returns before the
/// navigation it starts has ended).
async fn wait_for_path(c: &Client, path: &str) -> url::Url {
    let start = Instant::now();
    loop {
        let url = c.current_url().await.unwrap();
        if url.path() == path {
            return url;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the browser is still at {url}, not {path}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// No `alert()` ran: the page has no dialog open.
async fn no_alert(c: &Client) {
    assert!(
        c.get_alert_text().await.is_err(),
        "a script from the data ran: an alert is open"
    );
}

#[allow(clippy::too_many_lines, reason = "one walk through the dashboard")]
async fn walk(driver: &str, s: &Server, now: u64) {
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,1400"]
        }
    }))
    .unwrap();
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(driver)
        .await
        .unwrap();
    let base = format!("http://{}", s.addr);

    // No session: the login page, never data.
    c.goto(&format!("{base}/")).await.unwrap();
    assert!(c.current_url().await.unwrap().path() == "/login");
    assert!(
        c.find(Locator::Css("table.grid")).await.is_err(),
        "no data without a token"
    );
    screenshot(&c, "login.png").await;
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(READER)
        .await
        .unwrap();
    c.find(Locator::Css("form.login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for_path(&c, "/").await;
    let cookie = c.get_named_cookie("pathprobe_session").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.secure(), Some(true));

    // The grid: the degraded ExpressRoute is a warning, the healthy one ok.
    let cell =
        |site: &str, kind: &str| format!("tr[data-site=\"{site}\"] td[data-kind=\"{kind}\"]");
    assert_eq!(
        attr_of(&c, &cell("ams", "expressroute"), "data-state")
            .await
            .as_deref(),
        Some("warning")
    );
    assert!(
        attr_of(&c, &cell("ams", "expressroute"), "class")
            .await
            .unwrap()
            .contains("warning")
    );
    assert_eq!(
        attr_of(&c, &cell("fra", "expressroute"), "data-state")
            .await
            .as_deref(),
        Some("ok")
    );
    assert!(
        c.find(Locator::Css("td[data-kind=\"other\"]"))
            .await
            .is_err(),
        "a capacity test's path is no cell of the grid"
    );
    let ams_er = text_of(&c, &cell("ams", "expressroute")).await;
    assert!(ams_er.contains("p99 25 ms"), "{ams_er}");
    assert!(
        text_of(&c, "#rule")
            .await
            .contains("expressroute 20 ms, 5%")
    );
    // The markup site is a row whose heading reads as the name itself.
    let rows = c
        .find_all(Locator::Css("table.grid th.site"))
        .await
        .unwrap();
    let mut names = Vec::new();
    for r in rows {
        names.push(r.text().await.unwrap());
    }
    assert!(names.iter().any(|n| n == SCRIPT_SITE), "{names:?}");
    no_alert(&c).await;
    screenshot(&c, "grid.png").await;

    // A click opens the site.
    c.find(Locator::Css(&format!("{} a", cell("ams", "expressroute"))))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let url = wait_for_path(&c, "/site").await;
    assert!(
        url.query_pairs().any(|(k, v)| k == "site" && v == "ams"),
        "{url}"
    );
    assert!(
        text_of(&c, "h1")
            .await
            .contains("ams: expressroute against vpn")
    );

    // Over a stated range, the page's figures are /v1/compare's.
    let (from, to) = ((now - 10 * W) / 1_000_000_000, now / 1_000_000_000 + 1);
    c.goto(&format!("{base}/site?site=ams&from={from}&to={to}"))
        .await
        .unwrap();
    let (status, body) = http(
        s.addr,
        "GET",
        &format!("/v1/compare?a=expressroute&b=vpn&site=ams&from={from}&to={to}"),
        Some(READER),
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let cmp: serde_json::Value = serde_json::from_str(&body).unwrap();
    for figure in ["RTT p99 µs", "RTT p50 µs", "loss %"] {
        let row = cmp["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["figure"] == figure)
            .unwrap();
        for side in ["a", "b"] {
            let css = format!("tr[data-figure=\"{figure}\"] td.{side}");
            let shown: f64 = attr_of(&c, &css, "data-value")
                .await
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(Some(shown), row[side].as_f64(), "{figure} {side}");
            let text = text_of(&c, &css).await;
            assert_eq!(
                text,
                pathprobe_collector::compare::cell(row[side].as_f64()),
                "{figure} {side}"
            );
        }
    }
    let p99: f64 = text_of(&c, "tr[data-figure=\"RTT p99 µs\"] td.a")
        .await
        .parse()
        .unwrap();
    assert!(
        (p99 / 25_000.0 - 1.0).abs() < 1e-3,
        "the degraded ExpressRoute's p99 is 25 ms: {p99}"
    );

    // The failover is on the lane with its outage.
    let lane = text_of(&c, "#lane g.event.failover").await;
    assert!(
        lane.contains(&format!("failover {OUTAGE_MS:.1} ms")),
        "{lane}"
    );
    assert_eq!(
        attr_of(&c, "tr.event.failover", "data-outage-ms")
            .await
            .as_deref(),
        Some("297")
    );
    // Every column has a hover with both sides' figures.
    let hovers = c
        .find_all(Locator::Css("#series rect.hover"))
        .await
        .unwrap();
    assert_eq!(hovers.len(), 6, "one per window");
    let title = c
        .find(Locator::Css("#series rect.hover title"))
        .await
        .unwrap()
        .html(true)
        .await
        .unwrap();
    assert!(
        title.contains("expressroute: p50") && title.contains("vpn: p50"),
        "{title}"
    );
    // The capacity test: its knee, its stages, what to buy.
    assert_eq!(
        attr_of(&c, "#capacity article.capacity", "data-capacity-bps")
            .await
            .as_deref(),
        Some("30000000")
    );
    let rows = c
        .find_all(Locator::Css("#capacity table.stages tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[2].attr("class").await.unwrap().as_deref(),
        Some("fail")
    );
    assert!(
        text_of(&c, "#capacity ul.conclusion")
            .await
            .contains("ExpressRoute circuit: 50.0 Mbit/s")
    );
    for id in ["#cdf svg", "#heatmap svg", "#capacity svg"] {
        assert!(c.find(Locator::Css(id)).await.is_ok(), "{id}");
    }
    // These windows carry no one-way delay or jitter: the page says so, draws no empty plot.
    let delay = text_of(&c, "#delay").await;
    assert!(
        delay.contains("No one-way delay") && delay.contains("No jitter"),
        "{delay}"
    );
    assert!(c.find(Locator::Css("#delay svg")).await.is_err());
    no_alert(&c).await;
    screenshot(&c, "site.png").await;

    // The markup site's page, and an event summary that is markup: text, never run.
    let q = serde_urlencoded::to_string([("site", SCRIPT_SITE), ("since", "1h")]).unwrap();
    c.goto(&format!("{base}/site?{q}")).await.unwrap();
    no_alert(&c).await;
    assert!(text_of(&c, "h1").await.starts_with(SCRIPT_SITE));
    let summary = text_of(&c, "tr.event.outage").await;
    assert!(
        summary.contains("<img src=x onerror=alert(2)> lost"),
        "{summary}"
    );
    assert!(
        c.find(Locator::Css("main img")).await.is_err(),
        "no element from the data"
    );
    screenshot(&c, "markup-site.png").await;
    c.close().await.unwrap();
}

#[test]
fn the_dashboard_in_chromium_shows_the_degraded_site_the_failover_and_escapes_names() {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        eprintln!(
            "SKIPPED: the browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver (.ci/run does)"
        );
        return;
    }
    let d = dir("dash-browser");
    let (s, now) = known_data(&d);
    let driver = Driver::start();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(walk(&driver.url, &s, now));
}
