//! The probe engine: every probe kind (STAMP, `tcp-syn`, `tcp-connect`) and every path of
//! an agent runs on [`mux`], three threads whatever the number of paths, with one
//! [`timetable`] of every path's deadlines and the sans-IO accounting of [`session`].
//! This module holds what the engine and its users share: a session's [`Timing`] and the
//! [`Sink`] that takes its windows.

pub mod mux;
pub mod session;
pub mod timetable;

use std::net::SocketAddr;

use session::{Decided, WindowStats};

/// When and how long a session probes, whatever the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Named in errors and warnings.
    pub target: SocketAddr,
    pub interval_ns: u64,
    pub count: Option<u64>,
    pub duration_ns: Option<u64>,
    pub window_ns: u64,
    pub late_timeout_ns: u64,
    /// Give up when nothing at all has answered this long after the first probe
    /// (`u64::MAX`: never).
    pub no_reply_ns: u64,
}

impl Timing {
    /// Scheduled probes: the smaller of the count and duration / interval; `None` runs
    /// until stopped.
    pub fn slots(&self) -> Option<u64> {
        let by_time = self
            .duration_ns
            .map(|d| d.div_ceil(self.interval_ns.max(1)).max(1));
        match (self.count, by_time) {
            (Some(c), Some(t)) => Some(c.min(t)),
            (c, t) => c.or(t),
        }
    }
}

/// Where a probe session's results go, on the aggregator's thread: every closed window,
/// and (for a sink that wants them) every probe as it is decided. Keep both quick: the
/// aggregator drains the I/O threads' rings between calls.
pub trait Sink {
    /// A window closed.
    fn window(&mut self, w: &WindowStats);
    /// A window closed, handed over (for a sink that sends it on: no copy of its
    /// histograms). Used in place of [`Self::window`] when the session keeps no windows.
    fn window_owned(&mut self, w: WindowStats) {
        self.window(&w);
    }
    /// Probes decided since the last call, in sequence order.
    fn probes(&mut self, _decided: &[Decided]) {}
    /// Whether closed windows may keep their histograms compact
    /// ([`session::WindowStats::compact`]), for a sink that makes them full elsewhere.
    fn compact_windows(&self) -> bool {
        false
    }
    /// Whether to follow probes one by one (costs a record per probe).
    fn wants_probes(&self) -> bool {
        false
    }
    /// The sink has what it came for: the session stops as if `stop` were set (without
    /// touching the caller's flag).
    fn finished(&self) -> bool {
        false
    }
    /// Whether the session returns its windows when it ends (for a summary). A session
    /// that runs for good (the daemon's) must not: each window holds its histograms, about
    /// 1 MiB, and they would pile up for as long as it runs.
    fn keeps_windows(&self) -> bool {
        true
    }
}

impl<F: FnMut(&WindowStats)> Sink for F {
    fn window(&mut self, w: &WindowStats) {
        self(w);
    }
}
