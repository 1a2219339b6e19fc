//! The collector's store: what the HTTP layer, the queries and the command line use
//! ([`Store`]), and its backends. SQLite ([`sqlite::SqliteStore`]) is the one there is;
//! the trait is shaped for a server database too: every method takes `&self` (a backend
//! keeps its own connections and locks), a batch is stored whole or not at all, and
//! queries come back exactly merged.
//!
//! The arithmetic every backend shares is plain code: the [`range`] planner (which rollup
//! buckets and raw windows answer a range exactly) and the [`accumulate`]or (exact
//! merging).

pub mod accumulate;
pub mod range;
pub mod sqlite;

use pathprobe_proto::event::{EventKind, PathEvent};
use pathprobe_proto::report::{Aggregate, EncodedReport};
use serde::{Deserialize, Serialize};

pub use sqlite::SqliteStore;

use crate::Result;

/// Rollup levels, in nanoseconds, finest first: one minute, ten minutes, one hour. A range
/// is read from the coarsest buckets that fit in it, then finer ones toward its edges, then
/// raw windows ([`range::plan`]): at most a few dozen reads per path for any range.
pub const LEVELS: [i64; 3] = [60_000_000_000, 600_000_000_000, 3_600_000_000_000];

/// Paths one agent may have unless the server says otherwise.
pub const DEFAULT_MAX_PATHS_PER_AGENT: u64 = 1_000;

/// What one ingest did.
/// A stored batch: what the agent is told, and which reports were new.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ingested {
    /// Reports stored now.
    pub accepted: u64,
    /// Reports already stored (retries), acknowledged and ignored.
    pub duplicates: u64,
    /// The indices, in the batch, of the reports stored now: what exports may add, once.
    pub fresh: Vec<usize>,
}

impl Ingested {
    /// The acknowledgement.
    pub const fn ack(&self) -> pathprobe_proto::ingest::Accepted {
        pathprobe_proto::ingest::Accepted {
            accepted: self.accepted,
            duplicates: self.duplicates,
        }
    }
}

/// Where window reports are kept, and the questions asked of them.
pub trait Store: Send + Sync {
    /// Stores a batch of checked reports, received at `received_ns`, all or nothing and
    /// durably before it returns. A report already stored (same id) is counted as a
    /// duplicate and not stored again. A report that would give its agent more paths than
    /// allowed is refused ([`crate::Error::TooManyPaths`], naming it by index).
    fn ingest(&self, reports: &[EncodedReport], received_ns: u64) -> Result<Ingested>;

    /// Merges up to `limit` windows not yet rolled up into the rollups (or quarantines
    /// those that cannot be merged); how many it handled. Ingests go first: a backend may
    /// wait for them.
    fn roll_up(&self, limit: usize) -> Result<usize>;

    /// Windows set aside because they cannot be merged.
    fn quarantined(&self) -> Result<u64>;

    /// Every path, with its number of windows and time span.
    fn paths(&self) -> Result<Vec<PathRow>>;

    /// Every window ever stored for the path `path_id`, merged exactly: what the
    /// cumulative series of `/metrics` start from.
    fn path_totals(&self, path_id: i64) -> Result<Merged>;

    /// The windows stored for the paths `sel` matches, by path and then time.
    fn windows(&self, sel: &Selector) -> Result<Vec<WindowRow>>;

    /// Every window of the paths `sel` matches, starting in `[from_ns, to_ns)`, merged
    /// exactly.
    fn query(&self, sel: &Selector, from_ns: u64, to_ns: u64) -> Result<Merged>;

    /// The events of the paths `sel` matches (every path when its name is empty), seen in
    /// `[from_ns, to_ns)`, of `kind` if given, oldest first; at most `limit`.
    fn events(
        &self,
        sel: &Selector,
        from_ns: u64,
        to_ns: u64,
        kind: Option<EventKind>,
        limit: usize,
    ) -> Result<Vec<EventRow>>;

    /// Each stored path and the end of its newest window, found through the index (not a
    /// scan of every report, which `paths` counts): what the fleet's silence watch reads
    /// every few seconds.
    fn latest(&self) -> Result<Vec<Latest>>;

    /// Stores an event the collector raised itself (a plan path gone silent, and its
    /// return) against the stored path `path_id`; the same event twice is stored once.
    fn record_event(&self, path_id: i64, event: &PathEvent) -> Result<()>;

    /// The windows of the paths `sel` matches, starting in `[from_ns, to_ns)`, cut into
    /// columns and merged exactly within each, with the `metrics` asked for: each window
    /// its own column when there are at most `max_columns`, else the buckets of the finest
    /// rollup level that gives at most `max_columns` (the first and last bucket may reach
    /// past the range: each column says what it covers).
    fn series(
        &self,
        sel: &Selector,
        from_ns: u64,
        to_ns: u64,
        max_columns: usize,
        metrics: &[pathprobe_proto::hist::Metric],
    ) -> Result<Series>;

    /// Windows stored, and windows not yet rolled up.
    fn counts(&self) -> Result<(u64, u64)>;

    /// Octets the store takes on disk (0 when it cannot tell).
    fn size_bytes(&self) -> u64;
}

/// One stored window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowRow {
    pub path_id: i64,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// A stored path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRow {
    pub id: i64,
    pub agent_id: String,
    pub site: String,
    pub name: String,
    pub kind: String,
    pub local: String,
    pub remote: String,
    pub protocol: String,
    pub dscp: u8,
    pub packet_size: u16,
    pub windows: u64,
    pub first_ns: u64,
    pub last_ns: u64,
}

/// A stored path and its newest window (0 for none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    pub path_id: i64,
    pub agent_id: String,
    pub site: String,
    pub name: String,
    pub kind: String,
    /// The newest window's start and end.
    pub last_start_ns: u64,
    pub last_ns: u64,
    /// The path is a capacity test's (its windows are stages, reported only when a test
    /// runs), not one probed all the time.
    pub capacity: bool,
}

/// A stored event and the path it happened to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRow {
    pub agent_id: String,
    pub site: String,
    pub path: String,
    pub path_kind: String,
    #[serde(flatten)]
    pub event: PathEvent,
}

/// Which paths a question is about: by name or kind, optionally at one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub name_or_kind: String,
    pub site: Option<String>,
}

/// How finely a series is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Each stored window is a column.
    Window,
    /// The buckets of a rollup level (ns): one minute, ten minutes, one hour.
    Rollup(i64),
}

/// One column of a series: the windows starting in `[start_ns, end_ns)`, merged exactly.
#[derive(Debug, Clone, Default)]
pub struct Column {
    pub start_ns: u64,
    pub end_ns: u64,
    pub merged: accumulate::Accumulator,
}

/// A series: its resolution and its columns, oldest first.
#[derive(Debug, Clone)]
pub struct Series {
    pub resolution: Resolution,
    pub columns: Vec<Column>,
    /// The paths that matched.
    pub paths: Vec<i64>,
}

/// Windows merged exactly, with how many came from where.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Merged {
    pub aggregate: Aggregate,
    /// Windows whose one-way delay came from synchronized and from estimated clocks.
    pub synchronized_windows: u64,
    pub estimated_windows: u64,
    /// The paths that matched.
    pub paths: Vec<i64>,
}
