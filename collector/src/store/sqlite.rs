//! The SQLite backend of the [`Store`]: one file in WAL mode.
//!
//! - A report is stored in one transaction with `synchronous = FULL`, so once `ingest`
//!   returns it survives a crash or `kill -9`; its id is the primary key, so a retried
//!   report is acknowledged and ignored, never counted twice.
//! - Histograms are kept as the V2 blobs they travel in (V2+DEFLATE above 512 octets).
//! - Rollups by minute, ten minutes and hour are maintained by exact merging ([`Db::roll_up`], run
//!   in the background): each bucket holds the sum of the windows marked `rolled` that start
//!   in it. A query reads whole buckets from the rollups plus any window not yet rolled, and
//!   raw windows at the ragged edges of its range: the answer is exactly the merge of every
//!   window whose start lies in the range.
//! - A window that cannot be merged (its stored counters or histograms are not what a real
//!   sender produces, or adding it would overflow a bucket) is set aside in `quarantine`
//!   with the reason, and the rollup goes on. A store written before ingest validated
//!   reports is checked once when it is migrated (version 4): what fails is quarantined and
//!   the rollups it touched are rebuilt.
//! - Events a report carries are stored with it (keyed by report id and position), so they
//!   too are stored once, and are found by path and the time they were seen.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use pathprobe_proto::event::{EventKind, PathEvent};
use pathprobe_proto::hist::{self, Metric};
use pathprobe_proto::report::{self, ClockState, Counters, Encoded, EncodedReport, Report};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::accumulate::{Accumulator, parse_metric};
use super::range::{self, Piece};
use super::{
    DEFAULT_MAX_PATHS_PER_AGENT, EventRow, Ingested, LEVELS, Merged, PathRow, Selector, Store,
    WindowRow,
};
use crate::{Error, Result};

/// The schema, one migration per version (`PRAGMA user_version`).
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE paths (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL,
    site TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    local TEXT NOT NULL,
    remote TEXT NOT NULL,
    protocol TEXT NOT NULL,
    dscp INTEGER NOT NULL,
    packet_size INTEGER NOT NULL,
    UNIQUE (agent_id, site, name, kind, local, remote, protocol, dscp, packet_size)
);
CREATE TABLE reports (
    id BLOB PRIMARY KEY,
    path_id INTEGER NOT NULL REFERENCES paths(id),
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    owd_clock TEXT NOT NULL,
    counters TEXT NOT NULL,
    rolled INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX reports_by_time ON reports(path_id, start_ns);
CREATE INDEX reports_unrolled ON reports(rolled) WHERE rolled = 0;
CREATE TABLE report_histograms (
    report_id BLOB NOT NULL,
    metric TEXT NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (report_id, metric)
) WITHOUT ROWID;
CREATE TABLE rollups (
    path_id INTEGER NOT NULL,
    level INTEGER NOT NULL,
    bucket_ns INTEGER NOT NULL,
    windows INTEGER NOT NULL,
    counters TEXT NOT NULL,
    synchronized INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    PRIMARY KEY (path_id, level, bucket_ns)
) WITHOUT ROWID;
CREATE TABLE rollup_histograms (
    path_id INTEGER NOT NULL,
    level INTEGER NOT NULL,
    bucket_ns INTEGER NOT NULL,
    metric TEXT NOT NULL,
    blob BLOB NOT NULL,
    PRIMARY KEY (path_id, level, bucket_ns, metric)
) WITHOUT ROWID;
",
    r"
-- Version 2: finding the windows of a range that are not yet rolled up walked every window
-- of the range; a partial index holds only the unrolled ones, so the check costs nothing
-- once the rollup thread has caught up.
CREATE INDEX reports_unrolled_by_time ON reports(path_id, start_ns) WHERE rolled = 0;
DROP INDEX reports_unrolled;
",
    r"
-- Version 3: a path's events (failovers and outages, signature changes, DSCP re-marking), stored with the report
-- that carried them, so a retried report stores its events once.
CREATE TABLE events (
    report_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    path_id INTEGER NOT NULL REFERENCES paths(id),
    kind TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (report_id, seq)
) WITHOUT ROWID;
CREATE INDEX events_by_time ON events(path_id, at_ns);
",
    r"
-- Version 4: windows that cannot be merged are set aside here, with the reason, instead of
-- stopping every rollup of their path. Their histograms stay in report_histograms.
CREATE TABLE quarantine (
    id BLOB PRIMARY KEY,
    path_id INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    owd_clock TEXT NOT NULL,
    counters TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_ns INTEGER NOT NULL
);
",
];

/// The migration after which stored reports are checked once ([`Db::recover`]): stores
/// written before it took reports that ingest refuses now.
const RECOVERY_AFTER_VERSION: i64 = 3;

/// The schema version this build writes: the number of migrations.
fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

fn db(what: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |source| Error::Db {
        what: what.to_string(),
        source,
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn hex_id(id: &[u8]) -> String {
    use std::fmt::Write as _;
    id.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn wall_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl StoredWindow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            path_id: r.get(1)?,
            start: r.get(2)?,
            end: r.get(3)?,
            clock: r.get(4)?,
            counters: r.get(5)?,
        })
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// How a report's histograms are stored: as the V2 blobs they travel in.
pub trait StoredForm {
    /// The blob to store for `metric`.
    fn blob(&self, metric: Metric) -> Result<Cow<'_, [u8]>>;
}

impl StoredForm for Histogram<u64> {
    fn blob(&self, metric: Metric) -> Result<Cow<'_, [u8]>> {
        hist::encode(metric, self)
            .map(Cow::Owned)
            .map_err(|source| Error::Corrupt {
                what: "a histogram to store".to_string(),
                source,
            })
    }
}

impl StoredForm for Encoded {
    /// Checked completely when the report was read: stored as it arrived.
    fn blob(&self, _metric: Metric) -> Result<Cow<'_, [u8]>> {
        Ok(Cow::Borrowed(&self.blob))
    }
}

/// A stored window read back for the rollup or the recovery check.
struct StoredWindow {
    id: Vec<u8>,
    path_id: i64,
    start: i64,
    end: i64,
    clock: String,
    counters: String,
}

/// A stored window checked again: its counters and its histograms' blobs and counts.
struct Checked {
    counters: Counters,
    clock: ClockState,
    blobs: Vec<(Metric, Vec<u8>)>,
    counts: Vec<(Metric, u64)>,
}

/// One connection to the SQLite file: what [`SqliteStore`] reads and writes through, and
/// what the store's own tests and the ingest benchmark drive directly.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    /// The file, for extra read connections.
    file: Option<PathBuf>,
    /// Most paths one agent may have; a report that would add one more is refused.
    max_paths_per_agent: u64,
}

impl Db {
    /// Opens (creating and migrating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db("set a busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db("switch to WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db("set synchronous = FULL"))?;
        let mut store = Self {
            conn,
            file: Some(path.to_owned()),
            max_paths_per_agent: DEFAULT_MAX_PATHS_PER_AGENT,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens the store read-only, for queries beside a running server.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Missing {
                path: path.to_owned(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db("set a busy timeout"))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db("read the schema version"))?;
        if version != schema_version() {
            return Err(Error::SchemaVersion {
                found: version,
                expected: schema_version(),
            });
        }
        Ok(Self {
            conn,
            file: Some(path.to_owned()),
            max_paths_per_agent: DEFAULT_MAX_PATHS_PER_AGENT,
        })
    }

    /// Sets the most paths one agent may have (at least 1).
    pub fn set_max_paths_per_agent(&mut self, n: u64) {
        self.max_paths_per_agent = n.max(1);
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db("read the schema version"))?;
        let known = schema_version();
        if version > known {
            return Err(Error::SchemaVersion {
                found: version,
                expected: known,
            });
        }
        for (done, sql) in (1i64..)
            .zip(MIGRATIONS)
            .skip(usize::try_from(version).unwrap_or(0))
        {
            let tx = self.conn.transaction().map_err(db("begin a migration"))?;
            tx.execute_batch(sql).map_err(db("migrate the schema"))?;
            tx.pragma_update(None, "user_version", done)
                .map_err(db("record the schema version"))?;
            tx.commit().map_err(db("commit a migration"))?;
        }
        if version > 0 && version <= RECOVERY_AFTER_VERSION {
            let q = self.recover()?;
            if q > 0 {
                tracing::warn!(
                    quarantined = q,
                    "reports that no sender can have produced were set aside; see the quarantine table"
                );
            }
        }
        Ok(())
    }

    /// The path's id, created if new; `None` when a new path would give its agent more than
    /// `max_per_agent`.
    fn path_id<H>(tx: &Transaction<'_>, r: &Report<H>, max_per_agent: u64) -> Result<Option<i64>> {
        let p = &r.path;
        let key = params![
            r.agent_id,
            r.site.clone().unwrap_or_default(),
            p.name,
            p.kind.as_str(),
            p.local.to_string(),
            p.remote.to_string(),
            p.protocol.as_str(),
            p.dscp,
            p.packet_size
        ];
        let find = |tx: &Transaction<'_>| {
            tx.prepare_cached(
                "SELECT id FROM paths WHERE agent_id = ?1 AND site = ?2 AND name = ?3 AND kind = ?4
                 AND local = ?5 AND remote = ?6 AND protocol = ?7 AND dscp = ?8 AND packet_size = ?9",
            )
            .and_then(|mut stmt| stmt.query_row(key, |row| row.get(0)).optional())
            .map_err(db("find a path"))
        };
        if let Some(id) = find(tx)? {
            return Ok(Some(id));
        }
        let have: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM paths WHERE agent_id = ?1",
                [&r.agent_id],
                |row| row.get(0),
            )
            .map_err(db("count an agent's paths"))?;
        if u64_of(have) >= max_per_agent {
            return Ok(None);
        }
        tx.execute(
            "INSERT INTO paths (agent_id, site, name, kind, local, remote, protocol, dscp, packet_size)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            key,
        )
        .map_err(db("store a path"))?;
        Ok(Some(tx.last_insert_rowid()))
    }

    /// Stores `reports` in one durable transaction; reports already stored are counted as
    /// duplicates. On error nothing is stored; [`Error::TooManyPaths`] names the report that
    /// would have given its agent one path too many.
    pub fn ingest<H: StoredForm>(
        &mut self,
        reports: &[Report<H>],
        now_ns: u64,
    ) -> Result<Ingested> {
        let mut out = Ingested::default();
        let max_paths = self.max_paths_per_agent;
        let tx = self.conn.transaction().map_err(db("begin an ingest"))?;
        for (index, r) in reports.iter().enumerate() {
            let Some(path_id) = Self::path_id(&tx, r, max_paths)? else {
                return Err(Error::TooManyPaths {
                    index,
                    agent: r.agent_id.clone(),
                    limit: max_paths,
                });
            };
            let inserted = tx
                .execute(
                    "INSERT OR IGNORE INTO reports (id, path_id, start_ns, end_ns, received_ns, owd_clock, counters)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        &r.report_id.0[..],
                        path_id,
                        i64_of(r.window.start_unix_ns),
                        i64_of(r.window.end_unix_ns),
                        i64_of(now_ns),
                        json(&r.owd_clock),
                        json(&r.counters)
                    ],
                )
                .map_err(db("store a report"))?;
            if inserted == 0 {
                out.duplicates += 1;
                continue;
            }
            for (seq, e) in r.events.iter().enumerate() {
                tx.execute(
                    "INSERT INTO events (report_id, seq, path_id, kind, at_ns, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        &r.report_id.0[..],
                        i64::try_from(seq).unwrap_or(i64::MAX),
                        path_id,
                        e.kind.as_str(),
                        i64_of(e.at_unix_ns),
                        json(e)
                    ],
                )
                .map_err(db("store an event"))?;
            }
            for (&m, h) in &r.histograms {
                tx.execute(
                    "INSERT INTO report_histograms (report_id, metric, blob) VALUES (?1, ?2, ?3)",
                    params![&r.report_id.0[..], m.key(), h.blob(m)?],
                )
                .map_err(db("store a histogram"))?;
            }
            out.accepted += 1;
            out.fresh.push(index);
        }
        tx.commit().map_err(db("commit an ingest"))?;
        Ok(out)
    }

    /// Every path, with its number of windows and time span.
    /// Each path and the end of its newest window, through `reports_by_time`.
    pub fn latest(&self) -> Result<Vec<super::Latest>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT p.id, p.agent_id, p.site, p.name, p.kind,
                        COALESCE(r.start_ns, 0), COALESCE(r.end_ns, 0),
                        EXISTS (SELECT 1 FROM events e WHERE e.path_id = p.id AND e.kind = 'capacity_test')
                 FROM paths p LEFT JOIN reports r ON r.rowid =
                     (SELECT rowid FROM reports WHERE path_id = p.id ORDER BY start_ns DESC LIMIT 1)",
            )
            .map_err(db("list the paths' newest windows"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(super::Latest {
                    path_id: r.get(0)?,
                    agent_id: r.get(1)?,
                    site: r.get(2)?,
                    name: r.get(3)?,
                    kind: r.get(4)?,
                    last_start_ns: u64_of(r.get(5)?),
                    last_ns: u64_of(r.get(6)?),
                    capacity: r.get(7)?,
                })
            })
            .map_err(db("list the paths' newest windows"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db("list the paths' newest windows"))
    }

    pub fn paths(&self) -> Result<Vec<PathRow>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT p.id, p.agent_id, p.site, p.name, p.kind, p.local, p.remote, p.protocol, p.dscp,
                        p.packet_size, COUNT(r.id), COALESCE(MIN(r.start_ns), 0), COALESCE(MAX(r.end_ns), 0)
                 FROM paths p LEFT JOIN reports r ON r.path_id = p.id
                 GROUP BY p.id ORDER BY p.site, p.name, p.agent_id",
            )
            .map_err(db("list paths"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PathRow {
                    id: r.get(0)?,
                    agent_id: r.get(1)?,
                    site: r.get(2)?,
                    name: r.get(3)?,
                    kind: r.get(4)?,
                    local: r.get(5)?,
                    remote: r.get(6)?,
                    protocol: r.get(7)?,
                    dscp: r.get(8)?,
                    packet_size: r.get(9)?,
                    windows: u64_of(r.get(10)?),
                    first_ns: u64_of(r.get(11)?),
                    last_ns: u64_of(r.get(12)?),
                })
            })
            .map_err(db("list paths"))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(db("list paths"))
    }

    /// The windows stored for the paths `sel` matches, by path and then time: one row per
    /// report, for audits of what arrived (gaps, overlaps, repeats).
    pub fn windows(&self, sel: &Selector) -> Result<Vec<WindowRow>> {
        let ids = self.select(sel)?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT path_id, start_ns, end_ns FROM reports WHERE path_id = ?1 ORDER BY start_ns",
            )
            .map_err(db("list windows"))?;
        let mut out = Vec::new();
        for id in ids {
            let rows = stmt
                .query_map([id], |r| {
                    Ok(WindowRow {
                        path_id: r.get(0)?,
                        start_ns: u64_of(r.get(1)?),
                        end_ns: u64_of(r.get(2)?),
                    })
                })
                .map_err(db("list windows"))?;
            for row in rows {
                out.push(row.map_err(db("list windows"))?);
            }
        }
        Ok(out)
    }

    /// The ids of the paths `sel` matches (without counting their windows, unlike `paths`).
    fn select(&self, sel: &Selector) -> Result<Vec<i64>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id FROM paths WHERE (name = ?1 OR kind = ?1) AND (?2 IS NULL OR site = ?2) ORDER BY id",
            )
            .map_err(db("select paths"))?;
        stmt.query_map(params![sel.name_or_kind, sel.site], |r| r.get(0))
            .map_err(db("select paths"))?
            .collect::<rusqlite::Result<_>>()
            .map_err(db("select paths"))
    }

    /// Adds up to `limit` windows not yet rolled into the minute, ten-minute and hour
    /// rollups, exactly, in one transaction, one path at a time (so a pass holds the buckets
    /// of one path, never of thousands). A window that cannot be merged is quarantined with
    /// its reason, and the pass goes on. Returns how many windows were handled (rolled or
    /// quarantined).
    pub fn roll_up(&mut self, limit: usize) -> Result<usize> {
        let tx = self.conn.transaction().map_err(db("begin a rollup"))?;
        let windows: Vec<StoredWindow> = {
            let mut stmt = tx
                .prepare(
                    "SELECT id, path_id, start_ns, end_ns, owd_clock, counters FROM reports
                     WHERE rolled = 0 ORDER BY path_id, start_ns LIMIT ?1",
                )
                .map_err(db("find windows to roll up"))?;
            stmt.query_map([i64_of(limit as u64)], StoredWindow::from_row)
                .map_err(db("find windows to roll up"))?
                .collect::<rusqlite::Result<_>>()
                .map_err(db("find windows to roll up"))?
        };
        let handled = windows.len();
        for path in windows.chunk_by(|a, b| a.path_id == b.path_id) {
            Self::roll_path(&tx, path)?;
        }
        tx.commit().map_err(db("commit a rollup"))?;
        Ok(handled)
    }

    /// Rolls up windows of one path: each bucket is read, merged into and written once.
    fn roll_path(tx: &Transaction<'_>, windows: &[StoredWindow]) -> Result<()> {
        let mut buckets: BTreeMap<(i64, i64), Accumulator> = BTreeMap::new();
        let mut mark = tx
            .prepare_cached("UPDATE reports SET rolled = 1 WHERE id = ?1")
            .map_err(db("mark rolled windows"))?;
        for w in windows {
            let keys = LEVELS.map(|level| (level, w.start - w.start.rem_euclid(level)));
            for key in keys {
                if let std::collections::btree_map::Entry::Vacant(e) = buckets.entry(key) {
                    e.insert(Self::load_rollup(tx, w.path_id, key.0, key.1)?.unwrap_or_default());
                }
            }
            let checked = match Self::check_window(tx, w) {
                Ok(c) => c,
                Err(reason) => {
                    Self::quarantine(tx, &w.id, &reason)?;
                    continue;
                }
            };
            if let Some(reason) = keys.iter().find_map(|k| {
                buckets[k]
                    .room_for(&checked.counters, &checked.counts)
                    .err()
            }) {
                Self::quarantine(
                    tx,
                    &w.id,
                    &format!("cannot be added to its rollup: {reason}"),
                )?;
                continue;
            }
            for key in keys {
                let acc = buckets.entry(key).or_default();
                acc.windows += 1;
                acc.add_clock(checked.clock);
                acc.counters
                    .merge(&checked.counters)
                    .map_err(|source| Error::Corrupt {
                        what: "counters".to_string(),
                        source,
                    })?;
                for (m, blob) in &checked.blobs {
                    acc.add_blob(m.key(), blob)?;
                }
            }
            mark.execute([&w.id]).map_err(db("mark rolled windows"))?;
        }
        let path_id = windows.first().map_or(0, |w| w.path_id);
        for ((level, bucket), acc) in &buckets {
            if acc.windows > 0 {
                Self::store_rollup(tx, path_id, *level, *bucket, acc)?;
            }
        }
        Ok(())
    }

    /// Reads a stored window's counters and histograms and checks them with the rules ingest
    /// applies; the reason when they fail.
    fn check_window(conn: &Connection, w: &StoredWindow) -> std::result::Result<Checked, String> {
        let counters: Counters = serde_json::from_str(&w.counters)
            .map_err(|e| format!("stored counters do not parse: {e}"))?;
        let clock = serde_json::from_str(&w.clock).unwrap_or(ClockState::Unavailable);
        let blobs = Self::read_blobs(conn, &w.id).map_err(|e| e.to_string())?;
        let mut counts = Vec::with_capacity(blobs.len());
        for (m, blob) in &blobs {
            counts.push((*m, hist::count(*m, blob).map_err(|e| e.to_string())?));
        }
        let length = u64_of(w.end.saturating_sub(w.start));
        if !(1..=report::MAX_WINDOW_NS).contains(&length) {
            return Err(format!("a window of {length} ns is not 1 ns to 1 h long"));
        }
        report::check_counts(&counters, length, |m| {
            counts.iter().find(|(k, _)| *k == m).map_or(0, |(_, n)| *n)
        })
        .map_err(|e| e.to_string())?;
        Ok(Checked {
            counters,
            clock,
            blobs,
            counts,
        })
    }

    fn read_blobs(conn: &Connection, report_id: &[u8]) -> Result<Vec<(Metric, Vec<u8>)>> {
        let mut stmt = conn
            .prepare_cached("SELECT metric, blob FROM report_histograms WHERE report_id = ?1")
            .map_err(db("read histograms"))?;
        let rows = stmt
            .query_map([report_id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(db("read histograms"))?;
        let mut out = Vec::new();
        for row in rows {
            let (metric, blob) = row.map_err(db("read histograms"))?;
            out.push((parse_metric(&metric)?, blob));
        }
        Ok(out)
    }

    /// Moves a window out of `reports` (so no query or rollup reads it again) into
    /// `quarantine`, with the reason.
    fn quarantine(conn: &Connection, id: &[u8], reason: &str) -> Result<()> {
        tracing::warn!(report = %hex_id(id), reason, "window quarantined: it cannot be merged");
        conn.execute(
            "INSERT OR REPLACE INTO quarantine (id, path_id, start_ns, end_ns, received_ns, owd_clock, counters, reason, quarantined_ns)
             SELECT id, path_id, start_ns, end_ns, received_ns, owd_clock, counters, ?2, ?3 FROM reports WHERE id = ?1",
            params![id, reason, i64_of(wall_now_ns())],
        )
        .map_err(db("quarantine a window"))?;
        conn.execute("DELETE FROM reports WHERE id = ?1", [id])
            .map_err(db("quarantine a window"))?;
        Ok(())
    }

    /// Checks every stored window with the rules ingest applies; quarantines those that fail
    /// and rebuilds every rollup hour they had been added to. Returns how many were
    /// quarantined. Runs once, when a store from before those rules is migrated.
    pub fn recover(&mut self) -> Result<usize> {
        let tx = self.conn.transaction().map_err(db("begin a recovery"))?;
        let mut bad: Vec<(Vec<u8>, i64, i64, String)> = Vec::new();
        {
            let mut stmt = tx
                .prepare("SELECT id, path_id, start_ns, end_ns, owd_clock, counters FROM reports")
                .map_err(db("check stored windows"))?;
            let rows = stmt
                .query_map([], StoredWindow::from_row)
                .map_err(db("check stored windows"))?;
            for w in rows {
                let w = w.map_err(db("check stored windows"))?;
                if let Err(reason) = Self::check_window(&tx, &w) {
                    bad.push((w.id, w.path_id, w.start, reason));
                }
            }
        }
        let hour = LEVELS[LEVELS.len() - 1];
        let mut hours = BTreeSet::new();
        for (id, path_id, start, reason) in &bad {
            Self::quarantine(&tx, id, reason)?;
            hours.insert((*path_id, start - start.rem_euclid(hour)));
        }
        // Every level's buckets nest in the hour: rebuild the whole hour from its windows.
        for (path_id, h) in hours {
            for table in ["rollups", "rollup_histograms"] {
                tx.execute(
                    &format!(
                        "DELETE FROM {table} WHERE path_id = ?1 AND bucket_ns >= ?2 AND bucket_ns < ?3"
                    ),
                    params![path_id, h, h + hour],
                )
                .map_err(db("clear rollups to rebuild"))?;
            }
            tx.execute(
                "UPDATE reports SET rolled = 0 WHERE path_id = ?1 AND start_ns >= ?2 AND start_ns < ?3",
                params![path_id, h, h + hour],
            )
            .map_err(db("clear rollups to rebuild"))?;
        }
        tx.commit().map_err(db("commit a recovery"))?;
        Ok(bad.len())
    }

    /// Windows in quarantine.
    pub fn quarantined(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM quarantine", [], |r| r.get(0))
            .map(u64_of)
            .map_err(db("count quarantined windows"))
    }

    fn load_histograms(conn: &Connection, report_id: &[u8], acc: &mut Accumulator) -> Result<()> {
        for (metric, blob) in Self::read_blobs(conn, report_id)? {
            acc.add_blob(metric.key(), &blob)?;
        }
        Ok(())
    }

    fn load_rollup(
        conn: &Connection,
        path_id: i64,
        level: i64,
        bucket: i64,
    ) -> Result<Option<Accumulator>> {
        let mut acc = Accumulator::default();
        Ok(Self::load_rollup_into(conn, path_id, level, bucket, &mut acc)?.then_some(acc))
    }

    /// Adds a rollup bucket into `acc`; false when the bucket does not exist.
    fn load_rollup_into(
        conn: &Connection,
        path_id: i64,
        level: i64,
        bucket: i64,
        acc: &mut Accumulator,
    ) -> Result<bool> {
        let head: Option<(i64, String, i64, i64)> = conn
            .query_row(
                "SELECT windows, counters, synchronized, estimated FROM rollups
                 WHERE path_id = ?1 AND level = ?2 AND bucket_ns = ?3",
                params![path_id, level, bucket],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(db("read a rollup"))?;
        let Some((windows, counters, synchronized, estimated)) = head else {
            return Ok(false);
        };
        acc.windows += u64_of(windows);
        acc.synchronized += u64_of(synchronized);
        acc.estimated += u64_of(estimated);
        acc.add_counters(&counters)?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT metric, blob FROM rollup_histograms WHERE path_id = ?1 AND level = ?2 AND bucket_ns = ?3",
            )
            .map_err(db("read a rollup"))?;
        let rows = stmt
            .query_map(params![path_id, level, bucket], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(db("read a rollup"))?;
        for row in rows {
            let (metric, blob) = row.map_err(db("read a rollup"))?;
            acc.add_blob(&metric, &blob)?;
        }
        Ok(true)
    }

    fn store_rollup(
        tx: &Transaction<'_>,
        path_id: i64,
        level: i64,
        bucket: i64,
        acc: &Accumulator,
    ) -> Result<()> {
        tx.execute(
            "INSERT OR REPLACE INTO rollups (path_id, level, bucket_ns, windows, counters, synchronized, estimated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                path_id,
                level,
                bucket,
                i64_of(acc.windows),
                json(&acc.counters),
                i64_of(acc.synchronized),
                i64_of(acc.estimated)
            ],
        )
        .map_err(db("write a rollup"))?;
        for (&m, h) in &acc.histograms {
            let blob = hist::encode(m, h).map_err(|source| Error::Corrupt {
                what: "a rollup histogram".to_string(),
                source,
            })?;
            tx.execute(
                "INSERT OR REPLACE INTO rollup_histograms (path_id, level, bucket_ns, metric, blob)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![path_id, level, bucket, m.key(), blob],
            )
            .map_err(db("write a rollup"))?;
        }
        Ok(())
    }

    /// Adds the raw windows of `path_id` starting in `[from, to)`; with `unrolled_only`, only
    /// those not yet in a rollup.
    fn add_raw(
        &self,
        acc: &mut Accumulator,
        path_id: i64,
        from: i64,
        to: i64,
        unrolled_only: bool,
    ) -> Result<()> {
        let sql = if unrolled_only {
            "SELECT id, owd_clock, counters FROM reports
             WHERE path_id = ?1 AND start_ns >= ?2 AND start_ns < ?3 AND rolled = 0"
        } else {
            "SELECT id, owd_clock, counters FROM reports
             WHERE path_id = ?1 AND start_ns >= ?2 AND start_ns < ?3"
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(db("read windows"))?;
        let rows: Vec<(Vec<u8>, String, String)> = stmt
            .query_map(params![path_id, from, to], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(db("read windows"))?
            .collect::<rusqlite::Result<_>>()
            .map_err(db("read windows"))?;
        for (id, clock, counters) in rows {
            acc.windows += 1;
            acc.add_counters(&counters)?;
            acc.add_clock(serde_json::from_str(&clock).unwrap_or(ClockState::Unavailable));
            Self::load_histograms(&self.conn, &id, acc)?;
        }
        Ok(())
    }

    /// Adds the `level` rollups of buckets in `[from, to)` (both multiples of `level`).
    fn add_rollups(
        &self,
        acc: &mut Accumulator,
        path_id: i64,
        level: i64,
        from: i64,
        to: i64,
    ) -> Result<()> {
        let buckets: Vec<i64> = {
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT bucket_ns FROM rollups WHERE path_id = ?1 AND level = ?2 AND bucket_ns >= ?3 AND bucket_ns < ?4",
                )
                .map_err(db("read rollups"))?;
            stmt.query_map(params![path_id, level, from, to], |r| r.get(0))
                .map_err(db("read rollups"))?
                .collect::<rusqlite::Result<_>>()
                .map_err(db("read rollups"))?
        };
        for b in buckets {
            Self::load_rollup_into(&self.conn, path_id, level, b, acc)?;
        }
        // Windows in these buckets that the rollup job has not reached yet.
        self.add_raw(acc, path_id, from, to, true)
    }

    /// Exactly merges every window of `path_id` starting in `[from, to)`, read as the
    /// range planner says.
    /// Every window ever stored for the path `path_id`, merged exactly.
    pub fn path_totals(&self, path_id: i64) -> Result<Merged> {
        let mut acc = Accumulator::default();
        self.merge_range(&mut acc, path_id, 0, i64::MAX)?;
        Ok(acc.into_merged(vec![path_id]))
    }

    fn merge_range(&self, acc: &mut Accumulator, path_id: i64, from: i64, to: i64) -> Result<()> {
        for piece in range::plan(from, to, &LEVELS) {
            match piece {
                Piece::Raw { from, to } => self.add_raw(acc, path_id, from, to, false)?,
                Piece::Rollups { level, from, to } => {
                    self.add_rollups(acc, path_id, level, from, to)?;
                }
            }
        }
        Ok(())
    }

    /// Every window of the paths `sel` matches, starting in `[from_ns, to_ns)`, merged
    /// exactly.
    pub fn query(&self, sel: &Selector, from_ns: u64, to_ns: u64) -> Result<Merged> {
        let paths = self.select(sel)?;
        let (from, to) = (i64_of(from_ns), i64_of(to_ns));
        let merge_paths = |store: &Self, ids: &[i64]| -> Result<Accumulator> {
            let mut acc = Accumulator::default();
            for &id in ids {
                store.merge_range(&mut acc, id, from, to)?;
            }
            Ok(acc)
        };
        // Paths are independent: merge them on every core, one read connection each.
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(4);
        let mut total = Accumulator::default();
        match &self.file {
            Some(file) if paths.len() > 1 && threads > 1 => {
                let chunk = paths.len().div_ceil(threads);
                let parts: Vec<Result<Accumulator>> = std::thread::scope(|s| {
                    let handles: Vec<_> = paths
                        .chunks(chunk)
                        .map(|ids| s.spawn(move || merge_paths(&Self::open_read_only(file)?, ids)))
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                Err(Error::Config("a query thread panicked".to_string()))
                            })
                        })
                        .collect()
                });
                for part in parts {
                    total.absorb(&part?)?;
                }
            }
            _ => total = merge_paths(self, &paths)?,
        }
        Ok(total.into_merged(paths))
    }

    /// See [`super::Store::series`].
    pub fn series(
        &self,
        sel: &Selector,
        from_ns: u64,
        to_ns: u64,
        max_columns: usize,
        metrics: &[Metric],
    ) -> Result<super::Series> {
        let paths = self.select(sel)?;
        let (from, to) = (i64_of(from_ns), i64_of(to_ns));
        let max = i64::try_from(max_columns.max(1)).unwrap_or(i64::MAX);
        let mut count = 0_i64;
        for &id in &paths {
            count += self
                .conn
                .prepare_cached(
                    "SELECT COUNT(*) FROM reports WHERE path_id = ?1 AND start_ns >= ?2 AND start_ns < ?3",
                )
                .and_then(|mut st| st.query_row(params![id, from, to], |r| r.get::<_, i64>(0)))
                .map_err(db("count windows"))?;
        }
        let level = if count <= max {
            None
        } else {
            // Whole buckets from the one `from` is in to the one before `to` ends in.
            let buckets = |l: i64| (to.max(from + 1) + l - 1).div_euclid(l) - from.div_euclid(l);
            Some(
                LEVELS
                    .iter()
                    .copied()
                    .find(|&l| buckets(l) <= max)
                    .unwrap_or(LEVELS[LEVELS.len() - 1]),
            )
        };
        let mut columns: BTreeMap<(i64, i64), Accumulator> = BTreeMap::new();
        for &id in &paths {
            match level {
                None => self.raw_columns(&mut columns, id, from, to, None, metrics)?,
                Some(l) => {
                    // Whole buckets: the first and last may reach past the range.
                    let (first, last) = (from.div_euclid(l) * l, (to + l - 1).div_euclid(l) * l);
                    self.rollup_columns(&mut columns, id, l, first, last, metrics)?;
                    self.raw_columns(&mut columns, id, first, last, Some(l), metrics)?;
                }
            }
        }
        Ok(super::Series {
            resolution: level.map_or(super::Resolution::Window, super::Resolution::Rollup),
            columns: columns
                .into_iter()
                .map(|((start, end), merged)| super::Column {
                    start_ns: u64_of(start),
                    end_ns: u64_of(end),
                    merged,
                })
                .collect(),
            paths,
        })
    }

    /// Adds path `id`'s windows starting in `[from, to)` to `columns`: each its own column
    /// (keyed by its start and end), or, with `level`, only those not yet rolled up, each
    /// into its bucket's column.
    fn raw_columns(
        &self,
        columns: &mut BTreeMap<(i64, i64), Accumulator>,
        id: i64,
        from: i64,
        to: i64,
        level: Option<i64>,
        metrics: &[Metric],
    ) -> Result<()> {
        let sql = if level.is_some() {
            "SELECT id, start_ns, end_ns, owd_clock, counters FROM reports
             WHERE path_id = ?1 AND start_ns >= ?2 AND start_ns < ?3 AND rolled = 0"
        } else {
            "SELECT id, start_ns, end_ns, owd_clock, counters FROM reports
             WHERE path_id = ?1 AND start_ns >= ?2 AND start_ns < ?3"
        };
        let rows: Vec<(Vec<u8>, i64, i64, String, String)> = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut st| {
                st.query_map(params![id, from, to], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .map_err(db("read windows"))?;
        let mut blob = self
            .conn
            .prepare_cached(
                "SELECT blob FROM report_histograms WHERE report_id = ?1 AND metric = ?2",
            )
            .map_err(db("read windows"))?;
        for (report, start, end, clock, counters) in rows {
            let key = level.map_or((start, end), |l| {
                let b = start.div_euclid(l) * l;
                (b, b + l)
            });
            let acc = columns.entry(key).or_default();
            acc.windows += 1;
            acc.add_counters(&counters)?;
            acc.add_clock(serde_json::from_str(&clock).unwrap_or(ClockState::Unavailable));
            for m in metrics {
                let found: Option<Vec<u8>> = blob
                    .query_row(params![report, m.key()], |r| r.get(0))
                    .optional()
                    .map_err(db("read windows"))?;
                if let Some(b) = found {
                    acc.add_blob(m.key(), &b)?;
                }
            }
        }
        Ok(())
    }

    /// Adds path `id`'s `level` rollup buckets in `[from, to)` to `columns`, each into its
    /// own column.
    fn rollup_columns(
        &self,
        columns: &mut BTreeMap<(i64, i64), Accumulator>,
        id: i64,
        level: i64,
        from: i64,
        to: i64,
        metrics: &[Metric],
    ) -> Result<()> {
        let heads: Vec<(i64, i64, String, i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT bucket_ns, windows, counters, synchronized, estimated FROM rollups
                 WHERE path_id = ?1 AND level = ?2 AND bucket_ns >= ?3 AND bucket_ns < ?4",
            )
            .and_then(|mut st| {
                st.query_map(params![id, level, from, to], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .map_err(db("read rollups"))?;
        for (bucket, windows, counters, synchronized, estimated) in heads {
            let acc = columns.entry((bucket, bucket + level)).or_default();
            acc.windows += u64_of(windows);
            acc.synchronized += u64_of(synchronized);
            acc.estimated += u64_of(estimated);
            acc.add_counters(&counters)?;
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT bucket_ns, metric, blob FROM rollup_histograms
                 WHERE path_id = ?1 AND level = ?2 AND bucket_ns >= ?3 AND bucket_ns < ?4",
            )
            .map_err(db("read rollups"))?;
        let rows = stmt
            .query_map(params![id, level, from, to], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(db("read rollups"))?;
        for row in rows {
            let (bucket, metric, blob) = row.map_err(db("read rollups"))?;
            if metrics.iter().any(|m| m.key() == metric) {
                columns
                    .entry((bucket, bucket + level))
                    .or_default()
                    .add_blob(&metric, &blob)?;
            }
        }
        Ok(())
    }

    /// The events of the paths `sel` matches, seen in `[from_ns, to_ns)`, of `kind` if
    /// given, oldest first; at most `limit`.
    pub fn events(
        &self,
        sel: &Selector,
        from_ns: u64,
        to_ns: u64,
        kind: Option<EventKind>,
        limit: usize,
    ) -> Result<Vec<EventRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.agent_id, p.site, p.name, p.kind, e.body FROM events e JOIN paths p ON p.id = e.path_id
                 WHERE (p.name = ?1 OR p.kind = ?1 OR ?1 IS NULL) AND (?2 IS NULL OR p.site = ?2)
                   AND e.at_ns >= ?3 AND e.at_ns < ?4 AND (?5 IS NULL OR e.kind = ?5)
                 ORDER BY e.at_ns, e.report_id, e.seq LIMIT ?6",
            )
            .map_err(db("select events"))?;
        let rows = stmt
            .query_map(
                params![
                    (!sel.name_or_kind.is_empty()).then_some(&sel.name_or_kind),
                    sel.site,
                    i64_of(from_ns),
                    i64_of(to_ns),
                    kind.map(EventKind::as_str),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .map_err(db("select events"))?;
        let mut out = Vec::new();
        for row in rows {
            let (agent_id, site, path, path_kind, body) = row.map_err(db("read an event"))?;
            let event = serde_json::from_str(&body).map_err(|e| Error::Corrupt {
                what: format!("a stored event of path {path}"),
                source: pathprobe_proto::Error::Json(e.to_string()),
            })?;
            out.push(EventRow {
                agent_id,
                site,
                path,
                path_kind,
                event,
            });
        }
        Ok(out)
    }

    /// Windows stored, and windows not yet rolled up.
    pub fn counts(&self) -> Result<(u64, u64)> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(rolled = 0), 0) FROM reports",
                [],
                |r| Ok((u64_of(r.get(0)?), u64_of(r.get(1)?))),
            )
            .map_err(db("count windows"))
    }
}

/// The SQLite backend of [`Store`]: one writer connection behind a lock, and a read-only
/// connection per question, so that questions never wait for the writer (WAL). Ingests go
/// before the rollup: a rollup pass waits while any ingest waits for the writer.
#[derive(Debug)]
pub struct SqliteStore {
    file: PathBuf,
    /// `None` when opened read-only.
    writer: Option<Mutex<Db>>,
    /// Ingests waiting for the writer.
    waiting_writers: AtomicUsize,
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the store at `path` for a server: at most
    /// `max_paths_per_agent` paths per agent.
    pub fn open(path: &Path, max_paths_per_agent: u64) -> Result<Self> {
        let mut db = Db::open(path)?;
        db.set_max_paths_per_agent(max_paths_per_agent);
        Ok(Self {
            file: path.to_owned(),
            writer: Some(Mutex::new(db)),
            waiting_writers: AtomicUsize::new(0),
        })
    }

    /// Opens the store read-only, for questions beside a running server (or without one).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        drop(Db::open_read_only(path)?);
        Ok(Self {
            file: path.to_owned(),
            writer: None,
            waiting_writers: AtomicUsize::new(0),
        })
    }

    fn reader(&self) -> Result<Db> {
        Db::open_read_only(&self.file)
    }

    fn writer(&self) -> Result<MutexGuard<'_, Db>> {
        let w = self.writer.as_ref().ok_or_else(|| {
            Error::Config(format!(
                "the store {} is open read-only here: only `pathprobe-collector serve` writes to it",
                self.file.display()
            ))
        })?;
        Ok(w.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Store for SqliteStore {
    fn ingest(&self, reports: &[EncodedReport], received_ns: u64) -> Result<Ingested> {
        self.waiting_writers.fetch_add(1, Ordering::SeqCst);
        let writer = self.writer();
        self.waiting_writers.fetch_sub(1, Ordering::SeqCst);
        writer?.ingest(reports, received_ns)
    }

    fn roll_up(&self, limit: usize) -> Result<usize> {
        while self.waiting_writers.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.writer()?.roll_up(limit)
    }

    fn quarantined(&self) -> Result<u64> {
        self.reader()?.quarantined()
    }

    fn paths(&self) -> Result<Vec<PathRow>> {
        self.reader()?.paths()
    }

    fn path_totals(&self, path_id: i64) -> Result<Merged> {
        self.reader()?.path_totals(path_id)
    }

    fn windows(&self, sel: &Selector) -> Result<Vec<WindowRow>> {
        self.reader()?.windows(sel)
    }

    fn query(&self, sel: &Selector, from_ns: u64, to_ns: u64) -> Result<Merged> {
        self.reader()?.query(sel, from_ns, to_ns)
    }

    fn events(
        &self,
        sel: &Selector,
        from_ns: u64,
        to_ns: u64,
        kind: Option<EventKind>,
        limit: usize,
    ) -> Result<Vec<EventRow>> {
        self.reader()?.events(sel, from_ns, to_ns, kind, limit)
    }

    fn counts(&self) -> Result<(u64, u64)> {
        self.reader()?.counts()
    }

    fn series(
        &self,
        sel: &Selector,
        from_ns: u64,
        to_ns: u64,
        max_columns: usize,
        metrics: &[Metric],
    ) -> Result<super::Series> {
        self.reader()?
            .series(sel, from_ns, to_ns, max_columns, metrics)
    }

    fn latest(&self) -> Result<Vec<super::Latest>> {
        self.reader()?.latest()
    }

    fn record_event(&self, path_id: i64, event: &PathEvent) -> Result<()> {
        // An id of its own, from what it is: a second record of it is ignored.
        let mut h = Sha256::new();
        h.update(path_id.to_be_bytes());
        h.update(event.kind.as_str());
        h.update(event.at_unix_ns.to_be_bytes());
        let id = &h.finalize()[..16];
        let w = self.writer()?;
        w.conn
            .execute(
                "INSERT OR IGNORE INTO events (report_id, seq, path_id, kind, at_ns, body) VALUES (?1, 0, ?2, ?3, ?4, ?5)",
                params![id, path_id, event.kind.as_str(), i64_of(event.at_unix_ns), json(event)],
            )
            .map_err(db("store an event"))?;
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        ["", "-wal", "-shm"]
            .iter()
            .filter_map(|ext| std::fs::metadata(format!("{}{ext}", self.file.display())).ok())
            .map(|m| m.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pathprobe_proto::event::PathEvent;
    use pathprobe_proto::report::{
        Aggregate, PathInfo, PathKind, ProbeProtocol, ReportId, TimestampSource, Timestamping,
        Window, WindowReport,
    };

    const T0: u64 = 1_795_680_000_000_000_000; // 2026-11-26T08:00:00Z, an hour boundary
    const W: u64 = 10_000_000_000;

    fn report(id: u32, name: &str, kind: PathKind, start: u64, seed: u64) -> WindowReport {
        let mut rtt = Metric::Rtt.new_histogram();
        let mut runs = Metric::LossRun.new_histogram();
        let mut x = seed | 1;
        for _ in 0..50 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            rtt.record(1_000 + x % 50_000_000).unwrap();
        }
        runs.record(1 + seed % 5).unwrap();
        let mut rid = [0u8; 16];
        rid[..4].copy_from_slice(&id.to_be_bytes());
        rid[4..8].copy_from_slice(&name.len().to_be_bytes()[4..]);
        rid[8] = kind as u8;
        WindowReport {
            report_id: ReportId(rid),
            agent_id: "ams-01".into(),
            site: Some("ams".into()),
            path: PathInfo {
                name: name.into(),
                kind,
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.1.0.4:862".parse().unwrap(),
                protocol: ProbeProtocol::Stamp,
                dscp: 0,
                packet_size: 44,
            },
            window: Window {
                start_unix_ns: start,
                end_unix_ns: start + W,
            },
            timestamping: Timestamping {
                rx: TimestampSource::Kernel,
                tx: TimestampSource::Kernel,
            },
            owd_clock: ClockState::Unavailable,
            counters: Counters {
                sent: 50 + seed % 3,
                received: 50,
                lost: seed % 3,
                ..Counters::default()
            },
            histograms: [(Metric::Rtt, rtt), (Metric::LossRun, runs)].into(),
            signature: None,
            events: Vec::new(),
            plan_version: None,
        }
    }

    fn temp_db(name: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("pathprobe-store-{name}-{}.db", std::process::id()));
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", p.display()));
        }
        p
    }

    #[test]
    fn a_retried_report_is_stored_once() {
        let mut s = Db::open(&temp_db("dup")).unwrap();
        let r = report(1, "er", PathKind::Expressroute, T0, 7);
        assert_eq!(
            s.ingest(std::slice::from_ref(&r), 0).unwrap(),
            Ingested {
                accepted: 1,
                duplicates: 0,
                fresh: vec![0],
            }
        );
        assert_eq!(
            s.ingest(&[r.clone(), r], 0).unwrap(),
            Ingested {
                accepted: 0,
                duplicates: 2,
                fresh: Vec::new(),
            }
        );
        assert_eq!(s.counts().unwrap(), (1, 1));
    }

    fn event(kind: EventKind, at: u64, summary: &str) -> PathEvent {
        PathEvent {
            kind,
            at_unix_ns: at,
            before: None,
            after: None,
            summary: summary.into(),
            trace: None,
            trace_error: None,
            capacity: None,
            outage: None,
        }
    }

    #[test]
    fn latest_gives_each_paths_newest_window_end_as_paths_does() {
        let mut s = Db::open(&temp_db("latest")).unwrap();
        let reports: Vec<_> = (0..5)
            .map(|i| {
                report(
                    i + 1,
                    "er",
                    PathKind::Expressroute,
                    T0 + u64::from(i) * W,
                    u64::from(i),
                )
            })
            .chain([report(9, "vpn", PathKind::Vpn, T0, 9)])
            .collect();
        s.ingest(&reports, 0).unwrap();
        let mut latest: Vec<(i64, String, u64)> = s
            .latest()
            .unwrap()
            .into_iter()
            .map(|l| (l.path_id, l.name, l.last_ns))
            .collect();
        let mut paths: Vec<(i64, String, u64)> = s
            .paths()
            .unwrap()
            .into_iter()
            .map(|p| (p.id, p.name, p.last_ns))
            .collect();
        latest.sort();
        paths.sort();
        assert_eq!(latest, paths);
        assert!(
            latest
                .iter()
                .any(|(_, n, at)| n == "er" && *at == T0 + 5 * W)
        );
    }

    #[test]
    fn events_are_stored_once_and_found_by_path_time_and_kind() {
        let mut s = Db::open(&temp_db("events")).unwrap();
        let mut er = report(1, "er", PathKind::Expressroute, T0, 1);
        er.events = vec![
            event(EventKind::DscpRemarked, T0 + W, "bleached"),
            event(EventKind::SignatureChange, T0 + W, "forward hops 1 → 2"),
        ];
        let mut vpn = report(2, "vpn", PathKind::Vpn, T0 + W, 2);
        vpn.events = vec![event(
            EventKind::SignatureChange,
            T0 + 2 * W,
            "reverse hops 2 → 3",
        )];
        s.ingest(&[er.clone(), vpn], 0).unwrap();
        s.ingest(&[er], 0).unwrap(); // a retry: its events are not stored again
        let all = |sel: &str, kind| {
            let sel = Selector {
                name_or_kind: sel.into(),
                site: None,
            };
            s.events(&sel, T0, T0 + 10 * W, kind, 100).unwrap()
        };
        let every = all("", None);
        let summaries: Vec<_> = every.iter().map(|e| e.event.summary.as_str()).collect();
        assert_eq!(
            summaries,
            ["bleached", "forward hops 1 → 2", "reverse hops 2 → 3"]
        );
        assert_eq!(every[2].path, "vpn");
        assert_eq!(every[2].path_kind, "vpn");
        assert_eq!(all("expressroute", None).len(), 2);
        assert_eq!(all("", Some(EventKind::SignatureChange)).len(), 2);
        let sel = Selector {
            name_or_kind: String::new(),
            site: None,
        };
        // The range is half-open, by when the event was seen; the limit holds.
        assert_eq!(
            s.events(&sel, T0 + 2 * W, T0 + 3 * W, None, 100)
                .unwrap()
                .len(),
            1
        );
        assert_eq!(s.events(&sel, T0, T0 + W, None, 100).unwrap().len(), 0);
        assert_eq!(s.events(&sel, T0, T0 + 10 * W, None, 1).unwrap().len(), 1);
    }

    #[test]
    fn reports_survive_a_reopen() {
        let path = temp_db("reopen");
        {
            let mut s = Db::open(&path).unwrap();
            s.ingest(&[report(1, "er", PathKind::Expressroute, T0, 1)], 0)
                .unwrap();
        }
        let s = Db::open_read_only(&path).unwrap();
        let paths = s.paths().unwrap();
        assert_eq!(paths.len(), 1);
        assert_eq!((paths[0].name.as_str(), paths[0].windows), ("er", 1));
    }

    #[test]
    fn queries_are_exact_whatever_has_been_rolled_up() {
        let mut s = Db::open(&temp_db("exact")).unwrap();
        // Three hours of 10 s windows on two paths.
        let mut all = Vec::new();
        for i in 0..(3 * 360) {
            for (k, (name, kind)) in [("er", PathKind::Expressroute), ("vpn", PathKind::Vpn)]
                .into_iter()
                .enumerate()
            {
                all.push(report(
                    i,
                    name,
                    kind,
                    T0 + u64::from(i) * W,
                    u64::from(i) * 2 + k as u64,
                ));
            }
        }
        s.ingest(&all, 0).unwrap();
        // Roll up part of them, as a running server would have.
        s.roll_up(1_500).unwrap();
        let ranges = [
            (T0, T0 + 3 * 3_600 * 1_000_000_000), // exactly three hours
            (T0 + 7 * W + 3, T0 + 2 * 3_600_000_000_000 + 17 * W + 1), // ragged both ends
            (T0 + 65_000_000_000, T0 + 125_000_000_000), // under two minutes
            (T0 + 15 * W, T0 + 16 * W),           // one window
            (T0 - 3_600_000_000_000, T0),         // nothing
        ];
        for pass in 0..2 {
            for (from, to) in ranges {
                for name in ["er", "vpn", "expressroute"] {
                    let sel = Selector {
                        name_or_kind: name.into(),
                        site: None,
                    };
                    let got = s.query(&sel, from, to).unwrap();
                    let mut want = Aggregate::default();
                    for r in all.iter().filter(|r| {
                        (r.path.name == name || r.path.kind.as_str() == name)
                            && r.window.start_unix_ns >= from
                            && r.window.start_unix_ns < to
                    }) {
                        want.add(r).unwrap();
                    }
                    assert_eq!(got.aggregate, want, "pass {pass} {name} {from}..{to}");
                }
            }
            // Second pass: everything rolled up.
            while s.roll_up(1_000).unwrap() > 0 {}
        }
        assert_eq!(s.counts().unwrap(), (2_160, 0));
    }

    #[test]
    fn series_columns_are_exact_whatever_has_been_rolled_up() {
        let mut s = Db::open(&temp_db("series")).unwrap();
        // Two hours of 10 s windows on two ExpressRoute paths.
        let mut all = Vec::new();
        for i in 0..720_u32 {
            // Names of other lengths: the helper's report ids tell paths apart by it.
            for name in ["er", "er-b"] {
                let seed = u64::from(i) * 2 + u64::from(name == "er-b");
                all.push(report(
                    i,
                    name,
                    PathKind::Expressroute,
                    T0 + u64::from(i) * W,
                    seed,
                ));
            }
        }
        s.ingest(&all, 0).unwrap();
        s.roll_up(700).unwrap();
        let sel = Selector {
            name_or_kind: "expressroute".into(),
            site: None,
        };
        // A ragged range: the minute buckets at its edges reach past it.
        let (from, to) = (T0 + 3 * W + 1, T0 + 5_000_000_000_000);
        let metrics = [Metric::Rtt, Metric::LossRun];
        for pass in 0..2 {
            for (columns, want) in [
                (2_000, super::super::Resolution::Window),
                (100, super::super::Resolution::Rollup(LEVELS[0])),
                (5, super::super::Resolution::Rollup(LEVELS[2])),
                // 00:00:30 to 01:23:20 touches 84 minute buckets (the first and last partly)
                // and 9 ten-minute ones: 83 columns are too few for minutes.
                (84, super::super::Resolution::Rollup(LEVELS[0])),
                (83, super::super::Resolution::Rollup(LEVELS[1])),
            ] {
                let got = s.series(&sel, from, to, columns, &metrics).unwrap();
                assert_eq!(got.resolution, want, "{columns} columns");
                assert!(got.columns.len() <= columns);
                for c in &got.columns {
                    let mut expect = Aggregate::default();
                    for r in all.iter().filter(|r| {
                        let start = r.window.start_unix_ns;
                        start >= c.start_ns
                            && start < c.end_ns
                            && (want != super::super::Resolution::Window
                                || (start >= from && start < to))
                    }) {
                        expect.add(r).unwrap();
                    }
                    let merged = c.merged.clone().into_merged(Vec::new()).aggregate;
                    let brief = |a: &Aggregate| {
                        let hs: Vec<(Metric, u64)> =
                            a.histograms.iter().map(|(m, h)| (*m, h.len())).collect();
                        (a.windows, a.counters.sent, a.counters.lost, hs)
                    };
                    assert_eq!(
                        brief(&merged),
                        brief(&expect),
                        "pass {pass}, {columns} columns, at {}",
                        c.start_ns
                    );
                    assert!(
                        merged == expect,
                        "pass {pass}, {columns} columns, at {}",
                        c.start_ns
                    );
                }
                let windows: u64 = got.columns.iter().map(|c| c.merged.windows).sum();
                if want == super::super::Resolution::Window {
                    assert_eq!(windows, 2 * 496, "the windows starting in the range");
                }
            }
            while s.roll_up(1_000).unwrap() > 0 {}
        }
    }

    #[test]
    fn selectors_match_name_or_kind_and_site() {
        let mut s = Db::open(&temp_db("sel")).unwrap();
        let mut other_site = report(2, "er-2", PathKind::Expressroute, T0, 3);
        other_site.site = Some("fra".into());
        s.ingest(
            &[report(1, "er-1", PathKind::Expressroute, T0, 1), other_site],
            0,
        )
        .unwrap();
        let q = |n: &str, site: Option<&str>| {
            s.query(
                &Selector {
                    name_or_kind: n.into(),
                    site: site.map(Into::into),
                },
                T0,
                T0 + W,
            )
            .unwrap()
            .aggregate
            .windows
        };
        assert_eq!(q("expressroute", None), 2);
        assert_eq!(q("expressroute", Some("fra")), 1);
        assert_eq!(q("er-1", None), 1);
        assert_eq!(q("vpn", None), 0);
    }

    fn one_path(s: &Db, name: &str) -> Merged {
        let sel = Selector {
            name_or_kind: name.into(),
            site: None,
        };
        s.query(&sel, T0, T0 + 3_600_000_000_000).unwrap()
    }

    /// The adversarial run's report (`sent = 2^64 - 1`) reached the store, and from then on
    /// every rollup failed whole. Stored directly here, past ingest's checks: the rollup
    /// sets it aside with its reason and rolls up the others.
    #[test]
    fn a_window_that_cannot_be_merged_is_quarantined_and_the_rollup_goes_on() {
        let mut s = Db::open(&temp_db("quarantine")).unwrap();
        let mut poison = report(1, "er", PathKind::Expressroute, T0, 1);
        poison.counters.sent = u64::MAX;
        let good: Vec<_> = (2..40)
            .map(|i| {
                report(
                    i,
                    "er",
                    PathKind::Expressroute,
                    T0 + u64::from(i) * W,
                    u64::from(i),
                )
            })
            .collect();
        s.ingest(std::slice::from_ref(&poison), 0).unwrap();
        s.ingest(&good, 0).unwrap();
        while s.roll_up(10).unwrap() > 0 {}
        assert_eq!(s.counts().unwrap(), (38, 0));
        assert_eq!(s.quarantined().unwrap(), 1);
        let reason: String = s
            .conn
            .query_row("SELECT reason FROM quarantine", [], |r| r.get(0))
            .unwrap();
        assert!(reason.contains("counters.sent"), "{reason}");
        let mut want = Aggregate::default();
        for r in &good {
            want.add(r).unwrap();
        }
        assert_eq!(one_path(&s, "er").aggregate, want);
    }

    /// A window that would push its bucket past 2^64 (here, a bucket an older collector
    /// filled with a poisoned window) is set aside; the bucket stays as it was.
    #[test]
    fn a_window_that_would_overflow_its_bucket_is_quarantined() {
        let mut s = Db::open(&temp_db("overflow")).unwrap();
        let mut a = report(1, "er", PathKind::Expressroute, T0, 1);
        a.counters.late = u64::MAX - 10;
        let mut b = report(2, "er", PathKind::Expressroute, T0 + W, 2);
        b.counters.late = 20;
        s.ingest(&[a.clone(), b], 0).unwrap();
        // `a` is not what a sender produces either; roll it as if a store held it already.
        s.conn
            .execute(
                "UPDATE reports SET rolled = 1 WHERE id = ?1",
                [&a.report_id.0[..]],
            )
            .unwrap();
        let acc = Accumulator {
            windows: 1,
            counters: a.counters,
            histograms: a.histograms.clone(),
            ..Accumulator::default()
        };
        for level in LEVELS {
            let tx = s.conn.transaction().unwrap();
            let bucket = i64_of(T0) - i64_of(T0).rem_euclid(level);
            Db::store_rollup(&tx, 1, level, bucket, &acc).unwrap();
            tx.commit().unwrap();
        }
        assert_eq!(s.roll_up(10).unwrap(), 1);
        let reason: String = s
            .conn
            .query_row("SELECT reason FROM quarantine", [], |r| r.get(0))
            .unwrap();
        assert!(reason.contains("cannot be added to its rollup"), "{reason}");
    }

    /// A store that already holds a poisoned window, rolled up with its neighbours by an
    /// older collector, recovers when it is opened: the window is quarantined and its hour
    /// rebuilt from the windows that remain.
    #[test]
    fn a_store_holding_a_poisoned_window_recovers_on_start() {
        let path = temp_db("recover");
        let good: Vec<_> = (2..30)
            .map(|i| report(i, "vpn", PathKind::Vpn, T0 + u64::from(i) * W, u64::from(i)))
            .collect();
        {
            let mut s = Db::open(&path).unwrap();
            // A histogram of 2^62 samples in one bucket with counters that say 50.
            let mut poison = report(1, "vpn", PathKind::Vpn, T0, 1);
            poison
                .histograms
                .get_mut(&Metric::Rtt)
                .unwrap()
                .record_n(2_000, 1 << 62)
                .unwrap();
            s.ingest(std::slice::from_ref(&poison), 0).unwrap();
            s.ingest(&good, 0).unwrap();
            // What an older collector did: roll the poisoned window into its buckets first.
            let acc = Accumulator {
                windows: 1,
                counters: poison.counters,
                histograms: poison.histograms.clone(),
                ..Accumulator::default()
            };
            let tx = s.conn.transaction().unwrap();
            for level in LEVELS {
                let bucket = i64_of(T0) - i64_of(T0).rem_euclid(level);
                Db::store_rollup(&tx, 1, level, bucket, &acc).unwrap();
            }
            tx.execute(
                "UPDATE reports SET rolled = 1 WHERE id = ?1",
                [&poison.report_id.0[..]],
            )
            .unwrap();
            tx.execute_batch("DROP TABLE quarantine").unwrap();
            tx.pragma_update(None, "user_version", 3).unwrap();
            tx.commit().unwrap();
        }
        let mut s = Db::open(&path).unwrap();
        assert_eq!(s.quarantined().unwrap(), 1);
        while s.roll_up(7).unwrap() > 0 {}
        let mut want = Aggregate::default();
        for r in &good {
            want.add(r).unwrap();
        }
        assert_eq!(one_path(&s, "vpn").aggregate, want);
        // The hour's rollup was rebuilt from the 28 windows that remain.
        let windows: i64 = s
            .conn
            .query_row(
                "SELECT windows FROM rollups WHERE path_id = 1 AND level = ?1 AND bucket_ns = ?2",
                params![LEVELS[2], i64_of(T0)],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(windows, 28);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let path = temp_db("schema");
        {
            let s = Db::open(&path).unwrap();
            s.conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Db::open(&path).unwrap_err().to_string();
        assert!(err.contains("99"), "{err}");
    }

    #[test]
    fn the_trait_reads_what_a_server_wrote_and_a_read_only_store_refuses_to_write() {
        let path = temp_db("trait");
        let server = SqliteStore::open(&path, 10).unwrap();
        let json = report(1, "er", PathKind::Expressroute, T0, 1)
            .to_json()
            .unwrap();
        let encoded = EncodedReport::from_json(&json).unwrap();
        let stored = server.ingest(std::slice::from_ref(&encoded), T0).unwrap();
        assert_eq!((stored.accepted, stored.duplicates), (1, 0));
        assert_eq!(
            server
                .ingest(std::slice::from_ref(&encoded), T0)
                .unwrap()
                .duplicates,
            1
        );
        assert_eq!(server.roll_up(100).unwrap(), 1);
        assert!(server.size_bytes() > 0);
        let reader: &dyn Store = &SqliteStore::open_read_only(&path).unwrap();
        assert_eq!(reader.counts().unwrap(), (1, 0));
        let sel = Selector {
            name_or_kind: "er".into(),
            site: None,
        };
        assert_eq!(reader.query(&sel, T0, T0 + W).unwrap().aggregate.windows, 1);
        assert_eq!(reader.windows(&sel).unwrap().len(), 1);
        let err = reader.ingest(&[encoded], T0).unwrap_err().to_string();
        assert!(err.contains("read-only") && err.contains("serve"), "{err}");
    }
}
