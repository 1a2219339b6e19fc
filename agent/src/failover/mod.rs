//! `pathprobe-agent failover`: how long traffic to a service is lost when routing moves it
//! from the primary path (ExpressRoute) to the backup (the VPN) and back.
//!
//! A high-rate probe stream goes to the service address, which routing can reach over
//! either path; its probes are followed one by one ([`detect`]), so an outage is measured
//! from the first probe lost to the first answered after, to the probe interval. Which path
//! carried the traffic before and after is told from the answers' hop counts (and RTT when
//! the hop counts agree), compared with low-rate probes pinned to each path (`--primary`,
//! `--backup`: addresses only one path reaches). Without pinned probes the path the run
//! starts on is called `primary` and any other `backup`: start such a run while the
//! primary carries the traffic.
//!
//! Events (`failover`, `failback`, `outage`, `path_change`) are printed as they are known
//! (once their `after` side is measured) and travel in the window reports, so the collector
//! keeps them. A drill (`--drill`) waits for the primary to fail, measures, waits for the
//! failback and gives a verdict against `--max-outage`.

pub mod detect;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use pathprobe_proto::event::{EventKind, Outage, PathEvent};

use crate::engine::session::{Decided, Outcome, WindowStats};
use crate::probe::{ProbeConfig, Prober, Sink};
use crate::watch::{self, Observed};
use crate::{Error, Result};
use detect::{DetectConfig, Detector, PathKey, Transition};

/// The names of the two paths in events.
pub const PRIMARY: &str = "primary";
pub const BACKUP: &str = "backup";
pub const UNKNOWN: &str = "unknown";

/// A pinned path's far end and how its probes are pinned to the path:
/// `HOST:PORT[,bind=ADDR][,interface=NAME][,fwmark=N]`. An address only one path reaches
/// needs no more; where both paths reach the same address, the source address, interface
/// or firewall mark picks the path (policy routing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedPath {
    pub target: String,
    pub bind: Option<std::net::SocketAddr>,
    pub interface: Option<String>,
    pub fwmark: Option<u32>,
}

impl std::fmt::Display for PinnedPath {
    /// As [`std::str::FromStr`] reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.target)?;
        if let Some(b) = self.bind {
            write!(f, ",bind={b}")?;
        }
        if let Some(i) = &self.interface {
            write!(f, ",interface={i}")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, ",fwmark={m}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for PinnedPath {
    type Err = String;
    fn from_str(v: &str) -> std::result::Result<Self, String> {
        let mut parts = v.split(',');
        let target = parts.next().unwrap_or_default().trim().to_string();
        if target.is_empty() {
            return Err(format!("`{v}` has no HOST:PORT first"));
        }
        let mut p = Self {
            target,
            bind: None,
            interface: None,
            fwmark: None,
        };
        for kv in parts {
            let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
            let bad = |what: &str| format!("`{kv}` in `{v}`: {what}");
            match k.trim() {
                "bind" => {
                    let ip = val.parse::<std::net::IpAddr>().map(|ip| (ip, 0).into());
                    p.bind = Some(
                        val.parse()
                            .or(ip)
                            .map_err(|_| bad("bind= takes an address (ADDR or ADDR:PORT)"))?,
                    );
                }
                "interface" if !val.is_empty() => p.interface = Some(val.to_string()),
                "fwmark" => {
                    p.fwmark = Some(val.parse().map_err(|_| bad("fwmark= takes a number"))?);
                }
                _ => {
                    return Err(bad(
                        "use bind=ADDR, interface=NAME or fwmark=N after HOST:PORT, comma-separated",
                    ));
                }
            }
        }
        Ok(p)
    }
}

/// What every probe stream of a failover run shares.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    pub dscp: u8,
    pub duration_ns: Option<u64>,
    pub window_ns: u64,
    pub late_timeout_ns: u64,
    /// Give up when nothing at all has answered this long (`u64::MAX`: never).
    pub no_reply_ns: u64,
}

impl StreamTiming {
    /// A STAMP (or `tcp-syn`) stream to `target` at `rate` probes a second, pinned as `pin`
    /// says, on an unconnected socket: each probe is routed afresh, since the point is to
    /// see routing move.
    pub fn stream(
        &self,
        target: std::net::SocketAddr,
        pin: &PinnedPath,
        rate: u32,
        protocol: pathprobe_proto::report::ProbeProtocol,
    ) -> ProbeConfig {
        ProbeConfig {
            protocol,
            target,
            bind: pin.bind,
            interface: pin.interface.clone(),
            fwmark: pin.fwmark,
            interval_ns: 1_000_000_000 / u64::from(rate.max(1)),
            count: None,
            duration_ns: self.duration_ns,
            size: crate::probe::default_size(pathprobe_proto::stamp::Mode::Unauthenticated),
            dscp: self.dscp,
            ttl: None,
            key: None,
            window_ns: self.window_ns.max(1),
            late_timeout_ns: self.late_timeout_ns,
            no_reply_ns: self.no_reply_ns,
            ssid: 0,
            route_each_probe: true,
        }
    }
}

/// How to run a failover measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConfig {
    /// The stream to the service address.
    pub service: ProbeConfig,
    /// Low-rate probes that only the primary, or only the backup, can carry.
    pub primary: Option<ProbeConfig>,
    pub backup: Option<ProbeConfig>,
    /// A run of lost probes at least this long is an outage.
    pub min_outage_ns: u64,
    /// How far the before and after figures of an event reach.
    pub settle_ns: u64,
    /// Three path switches within this long are flapping.
    pub flap_window_ns: u64,
    /// Drill mode: stop once the primary has failed and traffic is back on it, and judge
    /// every outage against this limit.
    pub drill_max_outage_ns: Option<u64>,
}

/// What the pinned probes of one path have seen.
#[derive(Debug, Clone, Default)]
pub struct PathHealth {
    /// The hop counts of its answers.
    pub key: Option<PathKey>,
    /// RTTs of its latest answers (ns).
    recent_rtt: VecDeque<u64>,
    /// Wall time of its latest answered probe.
    pub last_answer_ns: u64,
}

impl PathHealth {
    /// The median RTT of the latest answers.
    pub fn rtt_ns(&self) -> Option<u64> {
        let mut v: Vec<u64> = self.recent_rtt.iter().copied().collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }
}

/// How many answers a pinned path's RTT is the median of.
const PINNED_RTTS: usize = 64;

/// The sink of a pinned path's probes.
struct PinnedSink {
    health: Arc<Mutex<PathHealth>>,
    sent_ttl: Option<u8>,
}

impl Sink for PinnedSink {
    fn window(&mut self, _w: &WindowStats) {}

    fn keeps_windows(&self) -> bool {
        false
    }

    fn probes(&mut self, decided: &[Decided]) {
        let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        for d in decided {
            if let Outcome::Answered { rtt_ns, marks, .. } = d.outcome {
                h.key = Some(PathKey::of(&marks, self.sent_ttl));
                h.recent_rtt.push_back(rtt_ns);
                if h.recent_rtt.len() > PINNED_RTTS {
                    h.recent_rtt.pop_front();
                }
                h.last_answer_ns = h.last_answer_ns.max(d.scheduled_wall_ns);
            }
        }
    }

    fn wants_probes(&self) -> bool {
        true
    }
}

/// Names the path of a transition's side from its hop counts and RTT.
#[derive(Debug, Clone, Default)]
pub struct Namer {
    pub primary: Option<PathHealth>,
    pub backup: Option<PathHealth>,
    /// Without pinned probes: the path the run started on.
    pub initial: Option<PathKey>,
}

impl Namer {
    /// `primary`, `backup` or `unknown` for a side with hop counts `key` and median RTT
    /// `rtt_ns`.
    pub fn name(&self, key: PathKey, rtt_ns: Option<u64>) -> &'static str {
        let pinned: Vec<(&'static str, &PathHealth)> = [
            (PRIMARY, self.primary.as_ref()),
            (BACKUP, self.backup.as_ref()),
        ]
        .into_iter()
        .filter_map(|(n, h)| h.filter(|h| h.key.is_some()).map(|h| (n, h)))
        .collect();
        if pinned.is_empty() {
            return match self.initial {
                Some(k) if k.same_path(&key) => PRIMARY,
                Some(_) => BACKUP,
                None => UNKNOWN,
            };
        }
        let matching: Vec<_> = pinned
            .iter()
            .filter(|(_, h)| h.key.is_some_and(|k| k.same_hops(&key)))
            .collect();
        if let [(name, _)] = matching.as_slice() {
            return name;
        }
        // Hop counts do not tell (both paths, or neither, look the same): the nearer RTT.
        let candidates = if matching.is_empty() {
            pinned.iter().collect::<Vec<_>>()
        } else {
            matching
        };
        #[allow(clippy::cast_precision_loss)] // a ratio of RTTs
        let distance = |h: &PathHealth| {
            let (a, b) = (rtt_ns? as f64, h.rtt_ns()? as f64);
            (a > 0.0 && b > 0.0).then(|| (a / b).ln().abs())
        };
        candidates
            .iter()
            .filter_map(|(n, h)| distance(h).map(|d| (*n, d)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(UNKNOWN, |(n, _)| n)
    }
}

/// The event of a transition, its paths named (not yet flagged as flapping: that takes the
/// run's history).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // RTTs in µs to ns
pub fn event(t: &Transition, namer: &Namer) -> PathEvent {
    let rtt = |s: &Option<pathprobe_proto::event::Segment>| {
        s.and_then(|s| s.rtt_p50_us).map(|us| (us * 1_000.0) as u64)
    };
    let before = namer.name(t.key_before, rtt(&t.before));
    let after = namer.name(t.key_after, rtt(&t.after));
    let kind = match (before, after) {
        (b, a) if b == a && !t.switched() => EventKind::Outage,
        (PRIMARY, BACKUP) => EventKind::Failover,
        (BACKUP, PRIMARY) => EventKind::Failback,
        _ => EventKind::PathChange,
    };
    let p50 = |s: &Option<pathprobe_proto::event::Segment>| {
        s.and_then(|s| s.rtt_p50_us)
            .map_or_else(|| "?".to_string(), |us| format!("{:.1}", us / 1_000.0))
    };
    let summary = format!(
        "{before} → {after}: {:.1} ms without answers ({} probes lost); RTT p50 {} → {} ms",
        t.outage_ms(),
        t.lost,
        p50(&t.before),
        p50(&t.after),
    );
    PathEvent {
        kind,
        at_unix_ns: t.first_after.sent_unix_ns,
        before: None,
        after: None,
        summary,
        trace: None,
        trace_error: None,
        capacity: None,
        outage: Some(Outage {
            outage_ms: t.outage_ms(),
            start_unix_ns: t.start_unix_ns,
            end_unix_ns: t.first_after.sent_unix_ns,
            path_before: before.to_string(),
            path_after: after.to_string(),
            last_reply_before: t.last_before,
            first_reply_after: t.first_after,
            lost: t.lost,
            reordered: t.reordered,
            duplicated: t.duplicated,
            before: t.before,
            after: t.after,
            flapping: false,
        }),
    }
}

/// Where the drill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drill {
    /// Waiting for the primary to fail.
    Waiting,
    /// Traffic left the primary.
    Left,
    /// Traffic is back on the primary (or the primary failed and recovered in place).
    Done,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct FailoverRun {
    pub windows: Vec<WindowStats>,
    pub events: Vec<PathEvent>,
    /// In a drill: whether traffic left the primary and came back within the run.
    pub drill_complete: bool,
}

/// The service stream's sink: follows probes, names transitions, attaches events to the
/// next window, and holds each window back until the next one closes (so the events
/// measured after the last window still go out with it).
struct ServiceSink<E: FnMut(&WindowStats, &Observed), V: FnMut(&PathEvent)> {
    detector: Detector,
    primary: Option<Arc<Mutex<PathHealth>>>,
    backup: Option<Arc<Mutex<PathHealth>>>,
    watch: watch::Watcher,
    sent_ttl: Option<u8>,
    dscp: u8,
    flap_window_ns: u64,
    switches: VecDeque<u64>,
    unsent: Vec<PathEvent>,
    all: Vec<PathEvent>,
    held: Option<WindowStats>,
    emit_window: E,
    on_event: V,
    drill: Option<Drill>,
}

impl<E: FnMut(&WindowStats, &Observed), V: FnMut(&PathEvent)> ServiceSink<E, V> {
    fn namer(&self) -> Namer {
        let read = |h: &Option<Arc<Mutex<PathHealth>>>| {
            h.as_ref()
                .map(|h| h.lock().unwrap_or_else(PoisonError::into_inner).clone())
        };
        Namer {
            primary: read(&self.primary),
            backup: read(&self.backup),
            initial: self.detector.initial(),
        }
    }

    fn transitions(&mut self, ts: Vec<Transition>) {
        for t in ts {
            let namer = self.namer();
            let mut e = event(&t, &namer);
            if let Some(o) = e.outage.as_mut()
                && o.path_before != o.path_after
            {
                let at = e.at_unix_ns;
                self.switches.push_back(at);
                while self
                    .switches
                    .front()
                    .is_some_and(|&s| s + self.flap_window_ns < at)
                {
                    self.switches.pop_front();
                }
                if self.switches.len() >= 3 {
                    o.flapping = true;
                    e.summary.push_str("; FLAPPING");
                }
            }
            self.drill_step(&e);
            (self.on_event)(&e);
            self.unsent.push(e.clone());
            self.all.push(e);
        }
    }

    fn drill_step(&mut self, e: &PathEvent) {
        let (Some(state), Some(o)) = (self.drill, e.outage.as_ref()) else {
            return;
        };
        let next = match state {
            Drill::Waiting if o.path_before == PRIMARY && o.path_after == PRIMARY => Drill::Done,
            Drill::Waiting if o.path_before == PRIMARY => Drill::Left,
            Drill::Left if o.path_after == PRIMARY => Drill::Done,
            s => s,
        };
        self.drill = Some(next);
    }

    fn flush(&mut self) {
        if let Some(w) = self.held.take() {
            let signature = watch::signature(&w.marks, self.sent_ttl, self.dscp);
            let mut events = self.watch.observe(signature, w.end_wall_ns);
            for e in &mut events {
                if e.kind == EventKind::SignatureChange {
                    // This runs on the aggregator's thread, which must not wait seconds for
                    // routers to answer; the failover event says where traffic went.
                    e.trace_error = Some(
                        "a failover run does not trace: see its failover event, or run `pathprobe-agent trace`"
                            .to_string(),
                    );
                }
            }
            events.append(&mut self.unsent);
            (self.emit_window)(&w, &Observed { signature, events });
        }
    }
}

impl<E: FnMut(&WindowStats, &Observed), V: FnMut(&PathEvent)> Sink for ServiceSink<E, V> {
    fn window(&mut self, w: &WindowStats) {
        self.flush();
        self.held = Some(w.clone());
    }

    fn probes(&mut self, decided: &[Decided]) {
        let health = |h: &Option<Arc<Mutex<PathHealth>>>| {
            h.as_ref().and_then(|h| {
                let h = h.lock().unwrap_or_else(PoisonError::into_inner);
                h.rtt_ns().map(|rtt| (rtt, h.key))
            })
        };
        if let (Some((p, pk)), Some((b, bk))) = (health(&self.primary), health(&self.backup)) {
            // The RTT level tells the paths apart only where their hop counts do not (an
            // IPsec tunnel hides its routers): where they do, a stretch of slow answers on
            // the primary (a busy host, a queue) is not a move to the backup.
            if pk.zip(bk).is_some_and(|(pk, bk)| !pk.same_hops(&bk)) {
                self.detector.clear_levels();
            } else {
                self.detector.set_levels(p, b);
            }
        }
        self.detector.push(decided);
        let ready = self.detector.take_ready();
        self.transitions(ready);
    }

    fn wants_probes(&self) -> bool {
        true
    }

    /// A drill ends itself once traffic is back on the primary; that stops only this run.
    fn finished(&self) -> bool {
        self.drill == Some(Drill::Done)
    }
}

/// A failover measurement with its sockets open.
#[derive(Debug)]
pub struct Failover {
    cfg: FailoverConfig,
    /// The stream to the service address.
    pub service: Prober,
    primary: Option<Prober>,
    backup: Option<Prober>,
}

impl Failover {
    /// Checks `cfg` and opens every socket.
    pub fn open(cfg: FailoverConfig) -> Result<Self> {
        validate(&cfg)?;
        let service = Prober::open(cfg.service.clone())?;
        let open_pinned = |c: &Option<ProbeConfig>| c.clone().map(Prober::open).transpose();
        let (primary, backup) = (open_pinned(&cfg.primary)?, open_pinned(&cfg.backup)?);
        Ok(Self {
            cfg,
            service,
            primary,
            backup,
        })
    }

    /// Runs the measurement until `stop` (or the duration, or a finished drill): each
    /// window with its events goes to `emit_window` (one window late), each event to
    /// `on_event` as soon as it is measured.
    pub fn run(
        &self,
        stop: &AtomicBool,
        emit_window: impl FnMut(&WindowStats, &Observed),
        on_event: impl FnMut(&PathEvent),
    ) -> Result<FailoverRun> {
        run(self, stop, emit_window, on_event)
    }
}

fn run(
    f: &Failover,
    stop: &AtomicBool,
    emit_window: impl FnMut(&WindowStats, &Observed),
    on_event: impl FnMut(&PathEvent),
) -> Result<FailoverRun> {
    let (cfg, service, primary, backup) = (&f.cfg, &f.service, &f.primary, &f.backup);
    let health = |p: &Option<Prober>| {
        p.as_ref()
            .map(|_| Arc::new(Mutex::new(PathHealth::default())))
    };
    let (primary_health, backup_health) = (health(primary), health(backup));
    let pinned_stop = AtomicBool::new(false);
    let mut sink = ServiceSink {
        detector: Detector::new(DetectConfig {
            sent_ttl: service.sent_ttl,
            min_outage_ns: cfg.min_outage_ns,
            confirm: 3,
            confirm_ns: 100_000_000,
            span_ns: cfg.settle_ns,
            edge_ns: 1_000_000_000,
            max_records: 4 << 20,
        }),
        primary: primary_health.clone(),
        backup: backup_health.clone(),
        watch: watch::Watcher::default(),
        sent_ttl: service.sent_ttl,
        dscp: cfg.service.dscp,
        flap_window_ns: cfg.flap_window_ns,
        switches: VecDeque::new(),
        unsent: Vec::new(),
        all: Vec::new(),
        held: None,
        emit_window,
        on_event,
        drill: cfg.drill_max_outage_ns.map(|_| Drill::Waiting),
    };
    let windows = std::thread::scope(|s| {
        for (prober, h) in [(primary, &primary_health), (backup, &backup_health)] {
            if let (Some(p), Some(h)) = (prober, h) {
                let pinned_stop = &pinned_stop;
                s.spawn(move || {
                    let mut sink = PinnedSink {
                        health: Arc::clone(h),
                        sent_ttl: p.sent_ttl,
                    };
                    if let Err(e) = p.run_into(pinned_stop, &mut sink) {
                        tracing::warn!(target = %p.config().target, error = %e, "a pinned path's probes stopped");
                    }
                });
            }
        }
        let result = service.run_into(stop, &mut sink);
        pinned_stop.store(true, Ordering::Relaxed);
        result
    });
    let windows = windows?;
    let last = sink.detector.finish();
    sink.transitions(last);
    sink.flush();
    let drill_complete = sink.drill == Some(Drill::Done);
    let events = std::mem::take(&mut sink.all);
    drop(sink);
    Ok(FailoverRun {
        windows,
        events,
        drill_complete,
    })
}

/// A drill's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The primary failed and came back, and no outage exceeded the target.
    Pass,
    /// An outage exceeded the target.
    Fail,
    /// The primary did not fail, or traffic did not come back to it, within the run.
    Incomplete,
}

/// Judges a drill: every outage against `max_outage_ns`.
#[allow(clippy::cast_precision_loss)] // milliseconds
pub fn verdict(run: &FailoverRun, max_outage_ns: u64) -> Verdict {
    let limit_ms = max_outage_ns as f64 / 1e6;
    let worst = run
        .events
        .iter()
        .filter_map(|e| e.outage.as_ref())
        .map(|o| o.outage_ms)
        .fold(0.0, f64::max);
    if worst > limit_ms {
        Verdict::Fail
    } else if run.drill_complete {
        Verdict::Pass
    } else {
        Verdict::Incomplete
    }
}

/// Checks a configuration's settings against each other.
pub fn validate(cfg: &FailoverConfig) -> Result<()> {
    if cfg.min_outage_ns < cfg.service.interval_ns.saturating_mul(2) {
        return Err(Error::Config(format!(
            "--min-outage {:?} is under two probe intervals: raise it or the rate",
            std::time::Duration::from_nanos(cfg.min_outage_ns)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_path_reads_back_what_it_writes() {
        for text in [
            "10.1.0.4:862",
            "10.1.0.4:862,bind=10.0.0.1:0",
            "[2001:db8::4]:862,interface=eth1,fwmark=100",
        ] {
            let p: PinnedPath = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
            assert_eq!(p.to_string().parse::<PinnedPath>().unwrap(), p);
        }
    }
    use pathprobe_proto::event::{EdgeProbe, Segment};

    const MS: u64 = 1_000_000;

    fn key(h: u8) -> PathKey {
        PathKey {
            fwd_hops: Some(h),
            rev_hops: Some(h),
            level: None,
        }
    }

    fn health(h: u8, rtt_ms: u64) -> PathHealth {
        PathHealth {
            key: Some(key(h)),
            recent_rtt: [rtt_ms * MS].into(),
            last_answer_ns: 0,
        }
    }

    fn seg(rtt_ms: f64) -> Segment {
        Segment {
            from_unix_ns: 0,
            to_unix_ns: 1,
            probes: 10,
            lost: 0,
            loss_pct: Some(0.0),
            rtt_p50_us: Some(rtt_ms * 1_000.0),
            rtt_p90_us: None,
            rtt_p99_us: None,
            fwd_hops: None,
            rev_hops: None,
        }
    }

    fn transition(before: u8, after: u8, rtt: (f64, f64)) -> Transition {
        Transition {
            key_before: key(before),
            key_after: key(after),
            last_before: Some(EdgeProbe {
                seq: 9,
                sent_unix_ns: 9 * MS,
            }),
            first_after: EdgeProbe {
                seq: 1_510,
                sent_unix_ns: 1_510 * MS,
            },
            start_unix_ns: 10 * MS,
            lost: 1_500,
            reordered: 0,
            duplicated: 0,
            before: Some(seg(rtt.0)),
            after: Some(seg(rtt.1)),
        }
    }

    #[test]
    fn a_pinned_path_is_an_address_and_how_to_pin_it() {
        let p: PinnedPath = "10.10.2.2:862".parse().unwrap();
        assert_eq!(
            (p.target.as_str(), p.bind, p.fwmark),
            ("10.10.2.2:862", None, None)
        );
        let p: PinnedPath = "10.1.0.1:862,bind=10.0.0.5,interface=eth1,fwmark=100"
            .parse()
            .unwrap();
        assert_eq!(p.bind, Some("10.0.0.5:0".parse().unwrap()));
        assert_eq!(p.interface.as_deref(), Some("eth1"));
        assert_eq!(p.fwmark, Some(100));
        for bad in [
            "",
            "10.1.0.1:862,mark=1",
            "10.1.0.1:862,fwmark=x",
            "10.1.0.1:862,bind=eth1",
        ] {
            assert!(bad.parse::<PinnedPath>().is_err(), "{bad}");
        }
        let err = "10.1.0.1:862,mark=1".parse::<PinnedPath>().unwrap_err();
        assert!(err.contains("fwmark=N"), "{err}");
    }

    #[test]
    fn pinned_hop_counts_name_the_paths() {
        let namer = Namer {
            primary: Some(health(1, 4)),
            backup: Some(health(2, 10)),
            initial: None,
        };
        let e = event(&transition(1, 2, (4.0, 10.0)), &namer);
        let o = e.outage.unwrap();
        assert_eq!(e.kind, EventKind::Failover);
        assert_eq!(
            (o.path_before.as_str(), o.path_after.as_str()),
            ("primary", "backup")
        );
        assert!((o.outage_ms - 1_500.0).abs() < 1e-9);
        let back = event(&transition(2, 1, (10.0, 4.0)), &namer);
        assert_eq!(back.kind, EventKind::Failback);
        let same = event(&transition(1, 1, (4.0, 4.0)), &namer);
        assert_eq!(same.kind, EventKind::Outage);
    }

    #[test]
    fn equal_hop_counts_are_told_apart_by_rtt() {
        // An IPsec tunnel hides its routers: both paths show one hop.
        let namer = Namer {
            primary: Some(health(1, 4)),
            backup: Some(health(1, 30)),
            initial: None,
        };
        assert_eq!(namer.name(key(1), Some(5 * MS)), PRIMARY);
        assert_eq!(namer.name(key(1), Some(25 * MS)), BACKUP);
        assert_eq!(namer.name(key(1), None), UNKNOWN);
        let e = event(&transition(1, 1, (4.0, 28.0)), &namer);
        assert_eq!(e.kind, EventKind::Failover, "same hops, the backup's RTT");
    }

    #[test]
    fn without_pinned_probes_the_starting_path_is_the_primary() {
        let namer = Namer {
            initial: Some(key(1)),
            ..Namer::default()
        };
        assert_eq!(namer.name(key(1), None), PRIMARY);
        assert_eq!(namer.name(key(3), None), BACKUP);
        assert_eq!(Namer::default().name(key(1), None), UNKNOWN);
    }

    /// A service stream's sink as a run makes it, its events going to `got`.
    fn service_sink(
        primary: Option<PathHealth>,
        backup: Option<PathHealth>,
        got: &mut Vec<PathEvent>,
    ) -> ServiceSink<impl FnMut(&WindowStats, &Observed), impl FnMut(&PathEvent) + '_> {
        ServiceSink {
            detector: Detector::new(DetectConfig {
                sent_ttl: Some(64),
                min_outage_ns: 20 * MS,
                confirm: 3,
                confirm_ns: 100 * MS,
                span_ns: 1_000 * MS,
                edge_ns: 1_000 * MS,
                max_records: 1 << 20,
            }),
            primary: primary.map(|h| Arc::new(Mutex::new(h))),
            backup: backup.map(|h| Arc::new(Mutex::new(h))),
            watch: watch::Watcher::default(),
            sent_ttl: Some(64),
            dscp: 0,
            flap_window_ns: 60_000 * MS,
            switches: VecDeque::new(),
            unsent: Vec::new(),
            all: Vec::new(),
            held: None,
            emit_window: |_: &WindowStats, _: &Observed| {},
            on_event: |e: &PathEvent| got.push(e.clone()),
            drill: Some(Drill::Waiting),
        }
    }

    /// `n` answers, one a millisecond after `seq`, over `hops` routers each way.
    fn answers(seq: &mut u64, n: u64, hops: u8, rtt_ns: u64) -> Vec<Decided> {
        (0..n)
            .map(|_| {
                *seq += 1;
                Decided {
                    seq: *seq,
                    scheduled_ns: *seq * MS,
                    scheduled_wall_ns: *seq * MS,
                    outcome: Outcome::Answered {
                        rtt_ns,
                        marks: crate::engine::session::Marks {
                            far_ttl: Some(64 - hops),
                            back_ttl: Some(64 - hops),
                            ..crate::engine::session::Marks::default()
                        },
                        reordered: false,
                    },
                }
            })
            .collect()
    }

    #[test]
    fn slow_answers_on_the_primarys_hops_are_no_move_where_hop_counts_tell_the_paths_apart() {
        // The primary 4 ms over one router, the backup 10 ms over two (as pinned probes
        // see them). A busy second on the primary's hops at the backup's RTT is neither a
        // failover nor a path change.
        let mut got = Vec::new();
        let mut sink = service_sink(Some(health(1, 4)), Some(health(2, 10)), &mut got);
        let mut seq = 0;
        for (n, rtt) in [(2_000, 4 * MS), (1_000, 10 * MS), (2_000, 4 * MS)] {
            sink.probes(&answers(&mut seq, n, 1, rtt));
        }
        let last = sink.detector.finish();
        sink.transitions(last);
        drop(sink);
        assert!(got.is_empty(), "{got:?}");
        // Where both paths show the same hop counts, the RTT level is what tells them.
        let mut got = Vec::new();
        let mut sink = service_sink(Some(health(1, 4)), Some(health(1, 10)), &mut got);
        let mut seq = 0;
        for (n, rtt) in [(2_000, 4 * MS), (2_000, 10 * MS)] {
            sink.probes(&answers(&mut seq, n, 1, rtt));
        }
        let last = sink.detector.finish();
        sink.transitions(last);
        drop(sink);
        let kinds: Vec<_> = got.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Failover]);
    }

    #[test]
    fn the_third_switch_within_the_flap_window_is_flapping_and_a_drill_ends_at_failback() {
        let mut got: Vec<PathEvent> = Vec::new();
        let mut sink = service_sink(None, None, &mut got);
        // Two seconds at a time on one path, then the other: one router, then two.
        let mut seq = 0u64;
        for (i, hops) in [1u8, 2, 1, 2, 1].into_iter().enumerate() {
            sink.probes(&answers(&mut seq, 2_000, hops, 4 * MS));
            if i == 2 {
                // Out to the backup and back: the drill is done.
                assert!(sink.finished(), "the drill stops at the failback");
            }
        }
        let last = sink.detector.finish();
        sink.transitions(last);
        drop(sink);
        let kinds: Vec<_> = got.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::Failover,
                EventKind::Failback,
                EventKind::Failover,
                EventKind::Failback
            ]
        );
        let flapping: Vec<_> = got
            .iter()
            .map(|e| e.outage.as_ref().unwrap().flapping)
            .collect();
        assert_eq!(flapping, [false, false, true, true]);
        assert!(got[2].summary.ends_with("; FLAPPING"), "{}", got[2].summary);
    }

    #[test]
    fn a_drill_passes_fails_or_is_incomplete() {
        let namer = Namer {
            primary: Some(health(1, 4)),
            backup: Some(health(2, 10)),
            initial: None,
        };
        let over = event(&transition(1, 2, (4.0, 10.0)), &namer);
        let run = |events: Vec<PathEvent>, done| FailoverRun {
            windows: Vec::new(),
            events,
            drill_complete: done,
        };
        assert_eq!(
            verdict(&run(vec![over.clone()], true), 10_000 * MS),
            Verdict::Pass
        );
        assert_eq!(
            verdict(&run(vec![over.clone()], true), 1_000 * MS),
            Verdict::Fail
        );
        assert_eq!(
            verdict(&run(vec![over], false), 10_000 * MS),
            Verdict::Incomplete
        );
    }
}
