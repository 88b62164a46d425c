//! Group commit. Exactly one thread flushes sled (sled 0.34 hangs when several tasks
//! flush at once). sled's flush returns once every log write up to it is stable, and
//! the patched sled (patches/README.md, change 11) fdatasyncs each log write, so stable
//! means durable: a flush is the commit. (Released sled uses `sync_file_range`, which
//! leaves the write in the disk's volatile cache; this thread then fdatasynced the file
//! after the flush, which made acknowledgements durable but not sled's own reuse of the
//! segments whose pages it relocated: after a power cut an old segment's overwrite could
//! be on the disk and the relocated pages not.)
//!
//! A writer applies its writes first and then enqueues a waiter. The thread takes every
//! waiter queued so far, flushes once and syncs once, then completes them all in queue
//! order. A waiter is therefore completed only by a flush that began after its write
//! was applied, and all writers that arrive during one fsync share the next one.
//!
//! Sled batches (catalog changes) are the exception: they are queued here and applied by
//! this thread, between flushes. sled's `apply_batch` takes a process-wide exclusive
//! lock that `flush` holds shared while it waits for the disk; a batch applied anywhere
//! else waits out the flush in progress, and every store access queues behind it,
//! runtime threads included. Here no flush is ever in progress when a batch is applied.
//!
//! The queue is bounded by the callers: every waiter belongs to an in-flight request,
//! and each session caps those; batch writers are few (see the broker's `catalog_write`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::StoreError;

type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What the committer thread is asked to do.
enum Job {
    /// Complete `Done` once everything applied before it is durable.
    Wait(Done),
    /// Like `Wait`, for a write that may wait out the commit delay (queued at the
    /// instant given): a conversation entry.
    Grouped(Instant, Done),
    /// Apply a batch (between flushes), say so on `applied`, then complete like `Wait`.
    Apply(sled::Batch, mpsc::SyncSender<Result<(), StoreError>>, Done),
}

/// A commit slower than this is logged: acknowledgements waited on it.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Called once, on the committer thread, with the error of the first failed commit.
pub type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

/// Generations of index writes (see `Store::read_durable`): begun, finished applying,
/// and covered by a completed commit.
#[derive(Default)]
pub(crate) struct IndexGen {
    pub(crate) started: AtomicU64,
    pub(crate) finished: AtomicU64,
    pub(crate) durable: AtomicU64,
}

/// What the committer thread shares with the store's callers.
#[derive(Default)]
struct Health {
    /// Set by the first failed commit, never cleared.
    failed: AtomicBool,
    /// Fail the next commit (fault injection).
    inject: AtomicBool,
    /// Jobs queued and not yet taken by a commit, counted only while a commit delay is
    /// set: `QUEUED_URGENT`, those that must not wait out the delay (one ends a delay
    /// in progress), and `QUEUED_ENTRIES`, conversation entries (`Job::Grouped`, read
    /// against `Delay::siblings`). Each is counted before it is sent and counted out
    /// once taken, so neither is ever short of what is queued.
    queued: [AtomicUsize; 2],
    hook: OnceLock<FailureHook>,
    /// What the commits so far did (`Store::commit_stats`).
    stats: Stats,
    /// Commits begun so far (tests read it to tell which commit completed a waiter).
    commits: AtomicU64,
    /// Called on the committer thread as each commit begins, after its waiters were
    /// taken and before the flush, with the commit's number (tests pause it there).
    commit_started: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

/// Running totals of the group commits, for monitoring. Relaxed: each is a count on
/// its own, read while commits go on.
#[derive(Default)]
struct Stats {
    writes: AtomicU64,
    busy_us: AtomicU64,
    delayed: AtomicU64,
    /// Commits by duration (how many, and how many were slow, derive from them): `buckets[i]` counts those of at most `COMMIT_BUCKETS_US[i]`,
    /// the last those longer than every bound.
    buckets: [AtomicU64; COMMIT_BUCKETS_US.len() + 1],
}

/// Upper bounds of the commit-duration buckets, microseconds: from a fast SSD's
/// fdatasync (well under 0.5 ms) to the stall that is logged (`SLOW_COMMIT`, 50 ms)
/// and beyond.
pub const COMMIT_BUCKETS_US: [u64; 10] = [250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000];

/// What the group commits did since the store was opened (`Store::commit_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// The waits those commits ended (each write or barrier that asked for a commit:
    /// entries, batches, receipts), so `writes / commits()` is the mean group size.
    pub writes: u64,
    /// Time spent in them, flush plus fdatasync, microseconds.
    pub busy_us: u64,
    /// Commits that waited for the commit delay to pass (all of it, or until another kind
    /// of write ended it) before they began: at most `commits()` plus failed ones.
    pub delayed: u64,
    /// Commits that succeeded (each one flush and one fdatasync) by duration:
    /// `buckets[i]` those of at most `COMMIT_BUCKETS_US[i]` (and more than the bound
    /// before), the last those longer than every bound.
    pub buckets: [u64; COMMIT_BUCKETS_US.len() + 1],
}

impl CommitStats {
    /// Commits that succeeded.
    pub fn commits(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Commits longer than `SLOW_COMMIT` (each also logged as `slow group commit`).
    pub fn slow(&self) -> u64 {
        let slow_from = COMMIT_BUCKETS_US.iter().position(|&us| u128::from(us) >= SLOW_COMMIT.as_micros());
        slow_from.map_or(0, |i| self.buckets[i + 1..].iter().sum())
    }
}

pub(crate) struct Committer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The committer thread, unparked to end a commit delay early.
    parked: std::thread::Thread,
    delay: Delay,
    health: Arc<Health>,
}

const QUEUED_URGENT: usize = 0;
const QUEUED_ENTRIES: usize = 1;

/// When a commit that a conversation entry asked for waits before it flushes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Delay {
    /// How long, counted from the entry's write (zero: never).
    pub(crate) wait: Duration,
    /// Only when at least this many other entries are already queued as the committer
    /// takes the entry up (0: always). See `StoreConfig::commit_siblings`.
    pub(crate) siblings: usize,
}

impl Committer {
    /// Starts the committer thread. Each of `gens` (index writes, watermark writes) is
    /// marked durable as far as each successful commit covers it. With a `delay`, a
    /// commit that a conversation entry asked for (`notify_grouped`) begins `delay.wait`
    /// after the entry was queued, if `delay.siblings` others were queued with it, unless
    /// another kind of job comes first (see `StoreConfig::commit_delay`).
    pub(crate) fn start(db: sled::Db, gens: Vec<Arc<IndexGen>>, delay: Delay) -> Result<Committer, StoreError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let health = Arc::new(Health::default());
        let thread_health = health.clone();
        let thread = std::thread::Builder::new()
            .name("sb-committer".into())
            .spawn(move || run(db, rx, &thread_health, &gens, delay))
            .map_err(|e| StoreError::NotDurable(e.to_string()))?;
        let parked = thread.thread().clone();
        Ok(Committer { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), parked, delay, health })
    }

    pub(crate) fn on_failure(&self, hook: FailureHook) {
        let _ = self.health.hook.set(hook);
    }

    pub(crate) fn inject_failure(&self) {
        self.health.inject.store(true, Ordering::SeqCst);
    }

    pub(crate) fn stats(&self) -> CommitStats {
        let s = &self.health.stats;
        CommitStats {
            writes: s.writes.load(Ordering::Relaxed),
            busy_us: s.busy_us.load(Ordering::Relaxed),
            delayed: s.delayed.load(Ordering::Relaxed),
            buckets: std::array::from_fn(|i| s.buckets[i].load(Ordering::Relaxed)),
        }
    }

    pub(crate) fn failed(&self) -> bool {
        self.health.failed.load(Ordering::SeqCst)
    }

    pub(crate) fn notify(&self, done: Done) -> Result<(), StoreError> {
        self.send(Job::Wait(done))
    }

    /// Like `notify`, for a conversation entry: its commit may wait out the commit delay
    /// for more entries to share it.
    pub(crate) fn notify_grouped(&self, done: Done) -> Result<(), StoreError> {
        // Without a delay nothing waits: no clock read per message.
        if self.delay.wait.is_zero() {
            return self.notify(done);
        }
        self.send(Job::Grouped(Instant::now(), done))
    }

    /// Has the committer thread apply `batch` between flushes; returns once it is
    /// applied (blocking: call off the async runtime), with a future for its durability.
    pub(crate) fn apply(&self, batch: sled::Batch) -> Result<Durable, StoreError> {
        self.send_apply(batch)?.wait()
    }

    /// Like `apply`, in two steps: hands `batch` to the committer thread (in order with
    /// every batch handed over before it) and returns at once; `Applying::wait` then
    /// blocks until it is applied. Lets a caller keep a lock only while it orders the
    /// batch, not while the committer finishes a flush.
    pub(crate) fn send_apply(&self, batch: sled::Batch) -> Result<Applying, StoreError> {
        let (applied_tx, applied_rx) = mpsc::sync_channel(1);
        let (durable_tx, durable_rx) = oneshot::channel();
        let done: Done = Box::new(move |r| {
            let _ = durable_tx.send(r);
        });
        self.send(Job::Apply(batch, applied_tx, done))?;
        Ok(Applying { applied: applied_rx, durable: Durable(durable_rx) })
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        let kind = if matches!(job, Job::Grouped(..)) { QUEUED_ENTRIES } else { QUEUED_URGENT };
        // Counted before it is queued, so the committer never sees it uncounted.
        let counted = (!self.delay.wait.is_zero()).then(|| &self.health.queued[kind]);
        if let Some(count) = counted {
            count.fetch_add(1, Ordering::SeqCst);
        }
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sent = match guard.as_ref() {
            Some(tx) => tx.send(job).map_err(|_| StoreError::Closed),
            None => Err(StoreError::Closed),
        };
        if let Some(count) = counted {
            if sent.is_err() {
                count.fetch_sub(1, Ordering::SeqCst);
            } else if kind == QUEUED_URGENT {
                // A batch or a barrier (files, catalog, receipts) ends a delay in progress.
                self.parked.unpark();
            }
        }
        sent
    }

    pub(crate) fn wait(&self) -> Result<Durable, StoreError> {
        self.durable_by(Self::notify)
    }

    /// Like `wait`, sharing the commit a conversation entry asked for (`notify_grouped`):
    /// it does not end a commit delay early.
    pub(crate) fn wait_grouped(&self) -> Result<Durable, StoreError> {
        self.durable_by(Self::notify_grouped)
    }

    /// A future of what `queue` (`notify` or `notify_grouped`) reports.
    fn durable_by(&self, queue: fn(&Self, Done) -> Result<(), StoreError>) -> Result<Durable, StoreError> {
        let (tx, rx) = oneshot::channel();
        queue(
            self,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        Ok(Durable(rx))
    }

    /// Completes every queued waiter, then ends the thread.
    pub(crate) fn stop(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(handle) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

/// A batch handed to the committer thread and not yet known to be applied.
pub(crate) struct Applying {
    applied: mpsc::Receiver<Result<(), StoreError>>,
    durable: Durable,
}

impl Applying {
    /// Blocks until the batch is applied; then a future for its durability.
    pub(crate) fn wait(self) -> Result<Durable, StoreError> {
        self.applied.recv().map_err(|_| StoreError::Closed)??;
        Ok(self.durable)
    }
}

impl Committer {
    /// Calls `hook` with each commit's number as it begins, on the committer thread
    /// (tests pause the committer with it). Set once.
    pub(crate) fn on_commit_started(&self, hook: Box<dyn Fn(u64) + Send + Sync>) {
        self.health.commit_started.set(hook).unwrap_or_else(|_| panic!("hook set twice"));
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(db: sled::Db, rx: mpsc::Receiver<Job>, health: &Health, gens: &[Arc<IndexGen>], delay: Delay) {
    // Fail-stop: after one failed flush or fsync nothing is reported durable again. On
    // Linux a failed fsync may already have dropped the dirty pages it could not write,
    // so retrying and later succeeding would acknowledge writes that are gone.
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        // The entries queued while the last commit ran measure the rate of messages: a
        // lone entry (a quiet broker) does not wait for company that is not coming.
        let urgent_queued = || health.queued[QUEUED_URGENT].load(Ordering::SeqCst) > 0;
        if let Job::Grouped(queued, _) = &first
            && !delay.wait.is_zero()
            && health.queued[QUEUED_ENTRIES].load(Ordering::SeqCst).saturating_sub(1) >= delay.siblings
        {
            // Parked, not waiting on the queue: entries arriving meanwhile wake nobody,
            // and the commit below takes them all. Any other job ends the delay.
            let until = *queued + delay.wait;
            if Instant::now() < until && !urgent_queued() {
                health.stats.delayed.fetch_add(1, Ordering::Relaxed);
            }
            while !urgent_queued() {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
        let mut waiters = Vec::new();
        let mut taken = [0; 2];
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Job::Wait(done) => {
                    taken[QUEUED_URGENT] += 1;
                    waiters.push(done);
                }
                Job::Grouped(_, done) => {
                    taken[QUEUED_ENTRIES] += 1;
                    waiters.push(done);
                }
                Job::Apply(batch, applied, done) => {
                    taken[QUEUED_URGENT] += 1;
                    // No flush is in progress on this thread: the batch's exclusive
                    // lock waits only for readers already inside sled.
                    let r = match &failed {
                        Some(e) => Err(StoreError::NotDurable(e.clone())),
                        None => db.apply_batch(batch).map_err(StoreError::from),
                    };
                    let ok = r.is_ok();
                    let _ = applied.send(r);
                    if ok {
                        waiters.push(done);
                    }
                }
            }
        }
        if !delay.wait.is_zero() {
            for (count, n) in health.queued.iter().zip(taken) {
                count.fetch_sub(n, Ordering::SeqCst);
            }
        }
        if waiters.is_empty() {
            continue;
        }
        // Counted writes finished before the flush begins are covered by it, unless one of
        // the same kind is still being applied (then this commit vouches for none of the
        // newer ones of that kind).
        let covered: Vec<Option<u64>> = gens
            .iter()
            .map(|g| {
                let finished = g.finished.load(Ordering::SeqCst);
                (g.started.load(Ordering::SeqCst) == finished).then_some(finished)
            })
            .collect();
        let n = health.commits.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(hook) = health.commit_started.get() {
            hook(n);
        }
        let result = match &failed {
            Some(e) => Err(e.clone()),
            None if health.inject.swap(false, Ordering::SeqCst) => Err("injected commit failure".to_owned()),
            None => commit_once(&db, waiters.len(), &health.stats),
        };
        if let (Err(e), None) = (&result, &failed) {
            tracing::error!(error = %e, waiters = waiters.len(), "group commit failed; the store refuses writes until restarted");
            failed = Some(format!("store failed earlier ({e}); restart the broker"));
            health.failed.store(true, Ordering::SeqCst);
            if let Some(hook) = health.hook.get() {
                hook(e);
            }
        }
        if result.is_ok() {
            for (generation, covered) in gens.iter().zip(covered) {
                if let Some(g) = covered {
                    generation.durable.fetch_max(g, Ordering::SeqCst);
                }
            }
        }
        for done in waiters {
            done(result.clone().map_err(StoreError::NotDurable));
        }
    }
}

/// One commit: sled's flush, whose log writes fdatasync (the module's comment).
fn commit_once(db: &sled::Db, waiters: usize, stats: &Stats) -> Result<(), String> {
    let started = std::time::Instant::now();
    db.flush().map_err(|e| e.to_string())?;
    let total = started.elapsed();
    stats.writes.fetch_add(waiters as u64, Ordering::Relaxed);
    let us = u64::try_from(total.as_micros()).unwrap_or(u64::MAX);
    stats.busy_us.fetch_add(us, Ordering::Relaxed);
    let bucket = COMMIT_BUCKETS_US.iter().position(|&bound| us <= bound).unwrap_or(COMMIT_BUCKETS_US.len());
    stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    // Judged in whole microseconds, as the buckets are, so `CommitStats::slow` counts
    // exactly the commits logged here.
    if u128::from(us) > SLOW_COMMIT.as_micros() {
        tracing::warn!(total_ms = total.as_millis() as u64, waiters, "slow group commit");
    }
    Ok(())
}

/// Resolves once the writes applied before it was created are durable.
#[must_use = "a write is not durable until this resolves"]
#[derive(Debug)]
pub struct Durable(oneshot::Receiver<Result<(), StoreError>>);

impl Durable {
    /// Blocks the calling thread until the write is durable: for blocking code (a
    /// `spawn_blocking` thread, or a plain thread outside any runtime, where
    /// `Handle::current().block_on` panics). Panics if called on a runtime worker.
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        self.0.blocking_recv().unwrap_or(Err(StoreError::Closed))
    }

    /// One that is resolved already (nothing was written to wait for).
    pub(crate) fn ready() -> Durable {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(()));
        Durable(rx)
    }
}

impl Future for Durable {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, channel};
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// A committer over a fresh sled database in `dir`, set up as `Store::open` does.
    fn start(dir: &std::path::Path) -> (sled::Db, Committer) {
        start_with_delay(dir, Duration::ZERO)
    }

    fn start_with_delay(dir: &std::path::Path, wait: Duration) -> (sled::Db, Committer) {
        start_with(dir, Delay { wait, siblings: 0 })
    }

    fn start_with(dir: &std::path::Path, delay: Delay) -> (sled::Db, Committer) {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open().unwrap();
        let committer = Committer::start(db.clone(), vec![Arc::new(IndexGen::default())], delay).unwrap();
        (db, committer)
    }

    /// A waiter for a conversation entry (it may wait out the commit delay).
    fn grouped_waiter(committer: &Committer) -> Receiver<(bool, u64)> {
        let (tx, rx) = channel();
        let health = committer.health.clone();
        let done: Done = Box::new(move |r| tx.send((r.is_ok(), health.commits.load(Ordering::SeqCst))).unwrap());
        committer.notify_grouped(done).unwrap();
        rx
    }

    /// Reports each commit's number and the instant it began.
    fn report_commits(committer: &Committer) -> Receiver<(u64, std::time::Instant)> {
        let (tx, rx) = channel();
        committer.on_commit_started(Box::new(move |n| {
            let _ = tx.send((n, std::time::Instant::now()));
        }));
        rx
    }

    /// A commit is waited for on a plain thread (no runtime: `Handle::current` panics
    /// there), and a committer that stopped says `Closed` rather than hang.
    #[test]
    fn a_commit_is_waited_for_on_a_plain_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, committer) = start(dir.path());
        let durable = committer.wait().unwrap();
        std::thread::spawn(move || durable.wait_blocking()).join().unwrap().unwrap();
        let (tx, rx) = oneshot::channel::<Result<(), StoreError>>();
        drop(tx);
        assert!(matches!(Durable(rx).wait_blocking(), Err(StoreError::Closed)));
    }

    #[test]
    fn slow_commits_are_the_buckets_past_the_logged_bound() {
        assert!(COMMIT_BUCKETS_US.iter().any(|&us| u128::from(us) == SLOW_COMMIT.as_micros()), "a bucket ends there");
        let mut stats = CommitStats::default();
        for (i, b) in stats.buckets.iter_mut().enumerate() {
            *b = 1 << i;
        }
        let past: u64 = (8..=10).map(|i| 1u64 << i).sum();
        assert_eq!(COMMIT_BUCKETS_US[7], 50_000);
        assert_eq!((stats.slow(), stats.commits()), (past, (1 << 11) - 1));
    }

    #[test]
    fn with_a_commit_delay_entries_arriving_within_it_share_the_commit() {
        const DELAY: Duration = Duration::from_secs(1);
        let dir = tempfile::tempdir().unwrap();
        let (db, committer) = start_with_delay(dir.path(), DELAY);
        let started = report_commits(&committer);
        db.insert("first", "1").unwrap();
        let queued = std::time::Instant::now();
        let first = grouped_waiter(&committer);
        let rest: Vec<_> = (0..5)
            .map(|i| {
                db.insert(format!("k{i}"), "v").unwrap();
                grouped_waiter(&committer)
            })
            .collect();
        let (n, began) = started.recv_timeout(WAIT).unwrap();
        assert_eq!(n, 1);
        assert!(began.duration_since(queued) >= DELAY, "commit 1 began before the delay passed");
        assert_eq!(first.recv_timeout(WAIT).unwrap(), (true, 1));
        for w in rest {
            // Queued microseconds after the first, well inside its delay.
            assert_eq!(w.recv_timeout(WAIT).unwrap(), (true, 1), "one commit for all six");
        }
        // An entry queued after commit 1 began is completed by a later commit, which
        // began after it.
        let late = grouped_waiter(&committer);
        assert_eq!(late.recv_timeout(WAIT).unwrap(), (true, 2));
        // What monitoring reads: two commits carried seven writes, and took time.
        let stats = committer.stats();
        assert_eq!((stats.commits(), stats.writes, stats.slow(), stats.delayed), (2, 7, 0, 2), "{stats:?}");
        assert!(stats.busy_us > 0, "{stats:?}");
        assert_eq!(stats.buckets.iter().sum::<u64>(), 2, "each commit in one bucket: {stats:?}");
        // A failed commit makes nothing durable and is not counted.
        committer.inject_failure();
        let failed = grouped_waiter(&committer);
        assert!(!failed.recv_timeout(WAIT).unwrap().0);
        assert_eq!(committer.stats().commits(), 2);
    }

    #[test]
    fn any_other_job_ends_the_commit_delay_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (db, committer) = start_with_delay(dir.path(), Duration::from_secs(60));
        db.insert("entry", "1").unwrap();
        let queued = std::time::Instant::now();
        let entry = grouped_waiter(&committer);
        std::thread::sleep(Duration::from_millis(50));
        // A barrier of another kind (a file's offset, a catalog write) does not wait.
        db.insert("offset", "2").unwrap();
        let barrier = waiter(&committer);
        assert_eq!(barrier.recv_timeout(WAIT).unwrap(), (true, 1));
        assert_eq!(entry.recv_timeout(WAIT).unwrap(), (true, 1), "the entry rode the same commit");
        assert!(queued.elapsed() < WAIT, "the delay was not cut short");
        // A batch too.
        let entry = grouped_waiter(&committer);
        let mut batch = sled::Batch::default();
        batch.insert("batch", "3");
        let durable = committer.apply(batch).unwrap();
        assert_eq!(entry.recv_timeout(WAIT).unwrap(), (true, 2));
        drop(durable);
        drop(db);
    }

    #[test]
    fn the_commit_delay_waits_only_when_enough_other_entries_are_queued() {
        let dir = tempfile::tempdir().unwrap();
        // A delay far longer than the test waits for anything: a commit that began
        // within `WAIT` did not wait it out.
        let (db, committer) = start_with(dir.path(), Delay { wait: Duration::from_secs(60), siblings: 2 });
        // Commits 1 to 3 pause as they begin until the test lets each go on.
        let (go, started) = pause_commits(&committer, 3);
        // A lone entry on a quiet store commits at once.
        db.insert("a", "1").unwrap();
        let a = grouped_waiter(&committer);
        assert_eq!(started.recv_timeout(WAIT).unwrap(), 1, "a lone entry waited out the delay");
        // Two entries queued while commit 1 runs: one other than the first, fewer than
        // two, so commit 2 does not wait either.
        let two: Vec<_> = (0..2).map(|_| grouped_waiter(&committer)).collect();
        go.send(()).unwrap();
        assert_eq!(a.recv_timeout(WAIT).unwrap(), (true, 1));
        assert_eq!(started.recv_timeout(WAIT).unwrap(), 2, "two entries waited out the delay");
        // Three queued while commit 2 runs: two others, so commit 3 waits ...
        let three: Vec<_> = (0..3).map(|_| grouped_waiter(&committer)).collect();
        go.send(()).unwrap();
        for w in two {
            assert_eq!(w.recv_timeout(WAIT).unwrap(), (true, 2));
        }
        assert!(started.recv_timeout(Duration::from_millis(300)).is_err(), "three entries did not wait");
        // ... until another kind of job ends the wait, and they all share that commit.
        let barrier = waiter(&committer);
        assert_eq!(started.recv_timeout(WAIT).unwrap(), 3);
        go.send(()).unwrap();
        for w in three.into_iter().chain([barrier]) {
            assert_eq!(w.recv_timeout(WAIT).unwrap(), (true, 3));
        }
        assert_eq!(
            committer.health.queued[QUEUED_ENTRIES].load(Ordering::SeqCst),
            0,
            "every entry taken is counted out"
        );
        assert_eq!((committer.stats().commits(), committer.stats().delayed), (3, 1), "commit 3 waited");
        // An entry the stopped committer refuses is counted out again.
        committer.stop();
        assert!(committer.notify_grouped(Box::new(|_| {})).is_err());
        assert_eq!(committer.health.queued[QUEUED_ENTRIES].load(Ordering::SeqCst), 0);
    }

    /// A waiter that reports, when completed, its result and which commit completed it.
    fn waiter(committer: &Committer) -> Receiver<(bool, u64)> {
        let (tx, rx) = channel();
        let health = committer.health.clone();
        let done: Done = Box::new(move |r| tx.send((r.is_ok(), health.commits.load(Ordering::SeqCst))).unwrap());
        committer.notify(done).unwrap();
        rx
    }

    #[test]
    fn a_waiter_queued_during_a_commit_is_completed_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let (db, committer) = start(dir.path());
        // Commit 1 pauses as it begins, until the test lets it go on.
        let (go, started) = pause_first_commit(&committer);

        db.insert("first", "1").unwrap();
        let first = waiter(&committer);
        assert_eq!(started.recv_timeout(WAIT).unwrap(), 1, "commit 1 began with the first waiter");
        // Its flush and fdatasync have not run: the waiter is not completed.
        assert!(first.recv_timeout(Duration::from_millis(200)).is_err(), "completed before its commit ran");
        // Commit 1 is under way (its flush has not begun): this write and its waiter
        // arrive too late for it.
        db.insert("second", "2").unwrap();
        let second = waiter(&committer);
        go.send(()).unwrap();
        assert_eq!(first.recv_timeout(WAIT).unwrap(), (true, 1));
        assert_eq!(second.recv_timeout(WAIT).unwrap(), (true, 2), "completed by a commit that began after its write");
        assert_eq!(started.recv_timeout(WAIT).unwrap(), 2);
        // Waiters queued together share one commit.
        let together: Vec<_> = (0..10).map(|_| waiter(&committer)).collect();
        let commits: Vec<u64> = together.iter().map(|w| w.recv_timeout(WAIT).unwrap().1).collect();
        assert!(commits.iter().all(|&c| c >= 3) && commits.windows(2).all(|w| w[0] <= w[1]), "{commits:?}");
    }

    /// Pauses commit 1 as it begins until the returned sender is used; reports each
    /// commit's number as it begins.
    fn pause_first_commit(committer: &Committer) -> (std::sync::mpsc::Sender<()>, Receiver<u64>) {
        pause_commits(committer, 1)
    }

    /// Pauses each of commits 1 to `through` as it begins until the returned sender is
    /// used once for it; reports each commit's number as it begins.
    fn pause_commits(committer: &Committer, through: u64) -> (std::sync::mpsc::Sender<()>, Receiver<u64>) {
        let (started_tx, started) = channel();
        let (go, paused) = channel::<()>();
        let paused = Mutex::new(paused);
        committer.on_commit_started(Box::new(move |n| {
            started_tx.send(n).unwrap();
            if n <= through {
                paused.lock().unwrap().recv_timeout(WAIT).unwrap();
            }
        }));
        (go, started)
    }

    #[test]
    fn a_batch_is_applied_at_once_and_reported_durable_only_after_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (db, committer) = start(dir.path());
        let (go, started) = pause_first_commit(&committer);
        let mut batch = sled::Batch::default();
        batch.insert("catalog", "x");
        let mut durable = committer.apply(batch).unwrap();
        // `apply` returns once applied: readers see it before it is durable.
        assert_eq!(db.get("catalog").unwrap().as_deref(), Some(&b"x"[..]));
        assert_eq!(started.recv_timeout(WAIT).unwrap(), 1);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let early = rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), &mut durable).await });
        assert!(early.is_err(), "reported durable before its commit ran");
        go.send(()).unwrap();
        rt.block_on(async { tokio::time::timeout(WAIT, durable).await }).unwrap().unwrap();
    }

    #[test]
    fn after_a_failed_commit_every_later_waiter_and_batch_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (db, committer) = start(dir.path());
        let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = failures.clone();
        committer.on_failure(Box::new(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        assert!(waiter(&committer).recv_timeout(WAIT).unwrap().0, "a healthy commit succeeds");
        committer.inject_failure();
        db.insert("k", "v").unwrap();
        assert!(!waiter(&committer).recv_timeout(WAIT).unwrap().0, "the injected failure");
        assert!(committer.failed());
        // The injection is spent; these fail because the store is fail-stop.
        for _ in 0..3 {
            db.insert("k", "v").unwrap();
            assert!(!waiter(&committer).recv_timeout(WAIT).unwrap().0, "a commit after a failure succeeded");
        }
        let mut batch = sled::Batch::default();
        batch.insert("catalog", "x");
        assert!(committer.apply(batch).is_err(), "a batch after a failure was applied");
        assert_eq!(db.get("catalog").unwrap(), None);
        assert_eq!(failures.load(Ordering::SeqCst), 1, "the failure hook runs once");
    }
}
