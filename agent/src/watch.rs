//! A path's signature, window by window, and the events its changes raise.
//!
//! Each closed window's marks (the most common far-end TTL and DSCP and answer TTL and
//! DSCP, from [`crate::engine::session`]) become a [`Signature`]: hops out are the TTL we sent less
//! the TTL the far end received, hops back are the answer's TTL below the far end's initial
//! TTL. [`Watcher`] compares it with the last known one and raises a `signature_change`
//! when a figure both know differs, and a `dscp_remarked` when the path starts re-marking
//! our DSCP. A window with no answers (or a figure its probes cannot see) changes nothing.
//!
//! [`run_watched`] runs a prober with a watcher on a thread of its own: a signature change
//! runs `trace` towards the far end (seconds, when routers stay silent) and attaches it to
//! the event, and the prober's aggregator must never wait for that.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use pathprobe_proto::event::{
    EventKind, PathEvent, Signature, TraceHop, TraceProtocol, TraceRecord,
};
use pathprobe_proto::report::ProbeProtocol;

use crate::engine::session::{Marks, WindowStats};
use crate::probe::Prober;
use crate::trace::{self, Trace, TraceConfig, TraceProto};
use crate::{Error, Result};

/// The signature of a window whose answers showed `marks`, for probes sent with
/// `sent_ttl` and `dscp`; `None` when no answer showed anything.
pub fn signature(marks: &Marks, sent_ttl: Option<u8>, dscp: u8) -> Option<Signature> {
    if *marks == Marks::default() {
        return None;
    }
    let (fwd_hops, rev_hops) = marks.hops(sent_ttl);
    Some(Signature {
        fwd_hops,
        rev_hops,
        dscp_sent: dscp,
        dscp_far: marks.far_dscp,
        dscp_back: marks.back_dscp,
    })
}

/// Compares each window's signature with the last known one.
#[derive(Debug, Default)]
pub struct Watcher {
    /// Every figure's last known value.
    known: Option<Signature>,
    /// Re-marking was already flagged and has not stopped since.
    remark_flagged: bool,
}

impl Watcher {
    /// The last known signature: each figure as last seen.
    pub const fn known(&self) -> Option<Signature> {
        self.known
    }

    /// The events a window's signature raises, seen at `at_unix_ns` (the window's end).
    /// Events carry no trace yet.
    pub fn observe(&mut self, sig: Option<Signature>, at_unix_ns: u64) -> Vec<PathEvent> {
        let Some(sig) = sig else {
            return Vec::new();
        };
        let mut events = Vec::new();
        let before = self.known;
        // A figure this window could not see keeps its last value.
        let merged = before.map_or(sig, |k| Signature {
            fwd_hops: sig.fwd_hops.or(k.fwd_hops),
            rev_hops: sig.rev_hops.or(k.rev_hops),
            dscp_sent: sig.dscp_sent,
            dscp_far: sig.dscp_far.or(k.dscp_far),
            dscp_back: sig.dscp_back.or(k.dscp_back),
        });
        if let Some(b) = before {
            let changes = b.changes(&sig);
            if !changes.is_empty() {
                events.push(PathEvent {
                    kind: EventKind::SignatureChange,
                    at_unix_ns,
                    before: Some(b),
                    after: Some(merged),
                    summary: changes.join(", "),
                    trace: None,
                    trace_error: None,
                    capacity: None,
                    outage: None,
                });
            }
        }
        if merged.remarked() && !self.remark_flagged {
            let mut how = Vec::new();
            if let Some(d) = merged.dscp_far.filter(|&d| d != merged.dscp_sent) {
                how.push(format!("the far end receives DSCP {d}"));
            }
            if let Some(d) = merged.dscp_back.filter(|&d| d != merged.dscp_sent) {
                how.push(format!("answers arrive with DSCP {d}"));
            }
            events.push(PathEvent {
                kind: EventKind::DscpRemarked,
                at_unix_ns,
                before,
                after: Some(merged),
                summary: format!(
                    "DSCP {} is re-marked on this path: {}",
                    merged.dscp_sent,
                    how.join(", ")
                ),
                trace: None,
                trace_error: None,
                capacity: None,
                outage: None,
            });
        }
        self.remark_flagged = merged.remarked();
        self.known = Some(merged);
        events
    }
}

/// A window's signature and the events it raised.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub signature: Option<Signature>,
    pub events: Vec<PathEvent>,
}

/// A trace as an event carries it: each hop's best RTT.
pub fn record(t: &Trace) -> TraceRecord {
    TraceRecord {
        protocol: match t.proto {
            TraceProto::Udp => TraceProtocol::Udp,
            TraceProto::Tcp => TraceProtocol::Tcp,
        },
        reached: t.reached,
        hops: t
            .hops
            .iter()
            .map(|h| TraceHop {
                ttl: h.ttl,
                addr: h.addr.map(IpAddr::V4),
                rtt_us: h.rtt_us.iter().flatten().copied().reduce(f64::min),
                reached: h.reached,
            })
            .collect(),
    }
}

/// Watches one prober's path, tracing it when its signature changes.
#[derive(Debug)]
pub struct PathWatch {
    watcher: Watcher,
    sent_ttl: Option<u8>,
    dscp: u8,
    /// How to trace the path: the probes' own far end and pinning.
    trace: TraceConfig,
}

/// Hops the automatic trace tries, and how long it waits at each: a path whose routers
/// stay silent costs at most 15 s on the watcher's thread.
const TRACE_HOPS: u8 = 30;
const TRACE_WAIT: Duration = Duration::from_millis(500);

impl PathWatch {
    /// A watcher for `prober`'s path.
    pub fn new(prober: &Prober) -> Self {
        Self::for_path(prober.config(), prober.sent_ttl)
    }

    /// A watcher for a path probed as `cfg` says, its probes leaving with `sent_ttl`.
    pub fn for_path(cfg: &crate::probe::ProbeConfig, sent_ttl: Option<u8>) -> Self {
        Self {
            watcher: Watcher::default(),
            sent_ttl,
            dscp: cfg.dscp,
            trace: TraceConfig {
                target: cfg.target,
                proto: match cfg.protocol {
                    ProbeProtocol::Stamp => TraceProto::Udp,
                    ProbeProtocol::TcpSyn | ProbeProtocol::TcpConnect => TraceProto::Tcp,
                },
                // The probes' local address, but a port of the trace's own.
                bind: cfg.bind.map(|b| SocketAddr::new(b.ip(), 0)),
                interface: cfg.interface.clone(),
                fwmark: cfg.fwmark,
                max_hops: TRACE_HOPS,
                queries: 1,
                timeout: TRACE_WAIT,
            },
        }
    }

    /// The last known signature.
    pub const fn known(&self) -> Option<Signature> {
        self.watcher.known()
    }

    /// The signature of `w` and its events, a signature change with a trace of the path
    /// as it is now (or why there is none).
    pub fn window(&mut self, w: &WindowStats) -> Observed {
        let signature = signature(&w.marks, self.sent_ttl, self.dscp);
        let mut events = self.watcher.observe(signature, w.end_wall_ns);
        for e in &mut events {
            if e.kind == EventKind::SignatureChange {
                match trace::trace(&self.trace) {
                    Ok(t) => e.trace = Some(record(&t)),
                    Err(err) => e.trace_error = Some(trace_error(&err)),
                }
            }
        }
        Observed { signature, events }
    }
}

fn trace_error(e: &Error) -> String {
    let text = e.to_string().replace(char::is_control, " ");
    let mut end = text.len().min(pathprobe_proto::event::MAX_TEXT_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Runs `prober` until it ends or `stop` is set, handing each closed window with its
/// signature and events to `emit`, in order, on a thread of its own (a trace there never
/// holds up the probes' accounting). Returns every window (none unless `keep_windows`:
/// a session that runs for good must not pile them up) and the last known signature.
pub fn run_watched(
    prober: &Prober,
    stop: &AtomicBool,
    keep_windows: bool,
    mut emit: impl FnMut(&WindowStats, &Observed) + Send,
) -> Result<(Vec<WindowStats>, Option<Signature>)> {
    /// Hands each window to the watcher thread.
    struct Forward {
        tx: mpsc::Sender<WindowStats>,
        keep: bool,
    }
    impl crate::probe::Sink for Forward {
        fn window(&mut self, w: &WindowStats) {
            // The watcher thread ends only when this sender is gone.
            let _ = self.tx.send(w.clone());
        }
        fn keeps_windows(&self) -> bool {
            self.keep
        }
    }
    let mut watch = PathWatch::new(prober);
    let (tx, rx) = mpsc::channel::<WindowStats>();
    std::thread::scope(|s| {
        let watcher = s.spawn(move || {
            for w in rx {
                let o = watch.window(&w);
                emit(&w, &o);
            }
            watch.known()
        });
        let mut sink = Forward {
            tx,
            keep: keep_windows,
        };
        let windows = prober.run_into(stop, &mut sink);
        drop(sink);
        let known = watcher
            .join()
            .map_err(|_| Error::Config("the path watcher thread panicked".to_string()))?;
        Ok((windows?, known))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ER: Marks = Marks {
        far_ttl: Some(63),
        far_dscp: Some(46),
        back_ttl: Some(63),
        back_dscp: Some(46),
    };

    fn sig(m: Marks) -> Option<Signature> {
        signature(&m, Some(64), 46)
    }

    #[test]
    fn hops_come_from_the_ttls_and_nothing_seen_is_no_signature() {
        let s = sig(ER).unwrap();
        assert_eq!((s.fwd_hops, s.rev_hops), (Some(1), Some(1)));
        assert_eq!(sig(Marks::default()), None);
        // A far end that received a higher TTL than we sent is not believed.
        let odd = sig(Marks {
            far_ttl: Some(65),
            ..ER
        })
        .unwrap();
        assert_eq!(odd.fwd_hops, None);
        // A Windows far end starts at 128.
        let win = sig(Marks {
            back_ttl: Some(120),
            ..ER
        })
        .unwrap();
        assert_eq!(win.rev_hops, Some(8));
    }

    #[test]
    fn a_route_change_is_raised_once_with_before_and_after() {
        let mut w = Watcher::default();
        assert!(
            w.observe(sig(ER), 1).is_empty(),
            "the first window sets the baseline"
        );
        assert!(w.observe(sig(ER), 2).is_empty());
        let vpn = Marks {
            far_ttl: Some(62),
            back_ttl: Some(62),
            ..ER
        };
        let e = w.observe(sig(vpn), 3);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].kind, EventKind::SignatureChange);
        assert_eq!(e[0].at_unix_ns, 3);
        assert_eq!(e[0].before.unwrap().fwd_hops, Some(1));
        assert_eq!(e[0].after.unwrap().fwd_hops, Some(2));
        assert_eq!(e[0].summary, "forward hops 1 → 2, reverse hops 1 → 2");
        assert!(w.observe(sig(vpn), 4).is_empty(), "raised once");
    }

    #[test]
    fn silence_and_unseen_figures_change_nothing() {
        let mut w = Watcher::default();
        w.observe(sig(ER), 1);
        assert!(w.observe(None, 2).is_empty(), "a window with no answers");
        // A window whose answers lacked the Class-of-Service TLV keeps the known DSCP.
        let no_cos = Marks {
            far_dscp: None,
            ..ER
        };
        assert!(w.observe(sig(no_cos), 3).is_empty());
        assert_eq!(w.known().unwrap().dscp_far, Some(46));
        assert!(w.observe(sig(ER), 4).is_empty());
    }

    #[test]
    fn remarking_is_flagged_when_it_starts_and_again_after_it_stopped() {
        let mut w = Watcher::default();
        let bleached = Marks {
            far_dscp: Some(0),
            ..ER
        };
        let e = w.observe(sig(bleached), 1);
        assert_eq!(e.len(), 1, "flagged on the first window too");
        assert_eq!(e[0].kind, EventKind::DscpRemarked);
        assert_eq!(
            e[0].summary,
            "DSCP 46 is re-marked on this path: the far end receives DSCP 0"
        );
        assert!(w.observe(sig(bleached), 2).is_empty(), "flagged once");
        let e = w.observe(sig(ER), 3);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].summary, "DSCP at the far end 0 → 46");
        let e = w.observe(sig(bleached), 4);
        let kinds: Vec<_> = e.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::SignatureChange, EventKind::DscpRemarked]);
    }

    #[test]
    fn a_trace_keeps_each_hops_best_rtt() {
        let t = Trace {
            target: "10.1.0.1:862".parse().unwrap(),
            proto: TraceProto::Udp,
            local: "10.0.0.1:40000".parse().unwrap(),
            hops: vec![
                trace::Hop {
                    ttl: 1,
                    addr: Some("10.20.1.2".parse().unwrap()),
                    rtt_us: vec![Some(300.0), None, Some(250.0)],
                    reached: false,
                },
                trace::Hop {
                    ttl: 2,
                    addr: None,
                    rtt_us: vec![None],
                    reached: false,
                },
            ],
            reached: false,
        };
        let r = record(&t);
        assert_eq!(r.hops[0].rtt_us, Some(250.0));
        assert_eq!(r.hops[1].rtt_us, None);
        assert_eq!(r.hops[1].addr, None);
        assert!(!r.reached);
    }
}
