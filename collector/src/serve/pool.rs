//! Where queries run: a few threads of their own, at a lower CPU priority than the rest of
//! the collector, so that a burst of expensive compares cannot delay an agent's
//! acknowledgement. Each query takes one of `max_concurrent_queries` places (none free: a
//! 503 with `Retry-After` at once) and has `query_timeout` to answer (past it: a 503; the
//! query keeps its place until it ends, so runaway queries cannot pile up).
//!
//! The only `unsafe` code of the collector: `setpriority(2)` on a query thread.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use tokio::sync::Semaphore;

/// How much a query may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Queries answered at once (each on a thread of its own); more get a 503.
    pub max_concurrent: usize,
    /// Time to answer; past it, a 503.
    pub timeout: Duration,
    /// The longest range a query may ask for; longer is a 400.
    pub max_range: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 2,
            timeout: Duration::from_secs(30),
            max_range: Duration::from_hours(31 * 24),
        }
    }
}

/// Why a query was refused, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryRefusal {
    Busy,
    Timeout,
    Range,
    Limit,
}

impl QueryRefusal {
    pub const ALL: [Self; 4] = [Self::Busy, Self::Timeout, Self::Range, Self::Limit];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::Timeout => "timeout",
            Self::Range => "range",
            Self::Limit => "limit",
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The query threads and their places.
#[derive(Debug)]
pub struct QueryPool {
    jobs: Mutex<mpsc::Sender<Job>>,
    places: Arc<Semaphore>,
    pub limits: QueryLimits,
    refused: [AtomicU64; 4],
}

/// The nice value of the query threads: below the ingest's (0) in the kernel's share.
const QUERY_NICE: i32 = 10;

fn lower_priority() {
    // SAFETY: gettid takes no arguments; setpriority with PRIO_PROCESS and a thread id
    // changes that thread's nice value only and touches no memory of ours.
    let rc = unsafe {
        let tid = libc::gettid();
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::id_t::try_from(tid).unwrap_or(0),
            QUERY_NICE,
        )
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower a query thread's priority: queries share the CPU with ingest"
        );
    }
}

/// What a query came to.
#[derive(Debug)]
pub enum Outcome<T> {
    Done(T),
    /// Every place taken.
    Busy,
    /// Not answered within the timeout.
    TimedOut,
}

impl QueryPool {
    /// `limits.max_concurrent` threads (at least one), started now.
    pub fn new(limits: QueryLimits) -> Self {
        let n = limits.max_concurrent.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("query-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a query thread");
            }
        }
        Self {
            jobs: Mutex::new(tx),
            places: Arc::new(Semaphore::new(n)),
            limits,
            refused: Default::default(),
        }
    }

    /// Runs `f` on a query thread, if a place is free, and waits for it at most the
    /// timeout.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Outcome<T> {
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            self.count(QueryRefusal::Busy);
            return Outcome::Busy;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let out = f();
            // The place is free once the work is over, answered or not.
            drop(place);
            let _ = tx.send(out);
        });
        if self
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job)
            .is_err()
        {
            self.count(QueryRefusal::Busy);
            return Outcome::Busy;
        }
        match tokio::time::timeout(self.limits.timeout, rx).await {
            Ok(Ok(out)) => Outcome::Done(out),
            Ok(Err(_)) => {
                self.count(QueryRefusal::Busy);
                Outcome::Busy
            }
            Err(_) => {
                self.count(QueryRefusal::Timeout);
                Outcome::TimedOut
            }
        }
    }

    /// Counts a refusal.
    pub fn count(&self, why: QueryRefusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(reason, count)` of every refusal so far.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        QueryRefusal::ALL
            .into_iter()
            .map(|r| (r.as_str(), self.refused[r as usize].load(Ordering::Relaxed)))
    }
}
