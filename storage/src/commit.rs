//! Group commit. Exactly one thread flushes sled (sled 0.34 hangs when several tasks
//! flush at once) and then fdatasyncs sled's data file, because sled's flush uses
//! `sync_file_range`, which does not flush the disk's write cache.
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
//!
//! Bulk writes to the same disk (upload chunks, each written and fdatasynced) take turns
//! with the commits (`DiskTurns`): a commit waits for the bulk writes already under way
//! and none starts while it waits or runs. Measured (docs/benchmarks.md, "Files"): with
//! an upload's fdatasyncs running beside them, sled's flush and fdatasync took 50-180 ms
//! instead of 1-3 ms, and every acknowledgement waits for them; on tmpfs the same load
//! left chat latency within 2x, so the cost is the disk's, not the CPU's.

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::StoreError;

type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What the committer thread is asked to do.
enum Job {
    /// Complete `Done` once everything applied before it is durable.
    Wait(Done),
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
    hook: OnceLock<FailureHook>,
    /// Commits begun so far (tests read it to tell which commit completed a waiter).
    #[cfg(test)]
    commits: AtomicU64,
    /// Called on the committer thread as each commit begins, after its waiters were
    /// taken and before the flush, with the commit's number (tests pause it there).
    #[cfg(test)]
    commit_started: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
}

/// Turn-taking on the disk between group commits and bulk writes.
///
/// A commit waits for the bulk writes under way to end, and no bulk write starts while a
/// commit waits or runs, so a commit never queues in the disk behind a bulk write that
/// started after it was wanted, and waits at most for one round of bulk writes (at most
/// `MAX_BULK` at once, each one chunk of at most 1 MiB). A bulk write waits at most for
/// the commit running or wanted when it arrived: once a commit has ended since it began
/// waiting it goes, even if the next commit is already wanted, so uploads progress
/// however busy the commits are.
///
/// Bulk writes may also be paced to a rate (`StoreConfig::bulk_bytes_per_sec`): each
/// takes its share of the rate in turn, with no burst. Taking turns keeps a commit from
/// queueing behind a bulk write, but some disks stall everyone when writes go on above
/// what they sustain: on the 2-vCPU VM of docs/benchmarks.md every fdatasync stalled
/// 80-130 ms about every 2 s while 1 MiB appends ran at 100 MB/s or more, and never at
/// 50 MB/s, with no broker running (a loop of fdatasynced 1 MiB appends beside a small
/// fdatasynced append every 10 ms). Pacing below the sustained rate is what keeps
/// commits fast there.
#[derive(Debug, Default)]
pub struct DiskTurns {
    state: Mutex<Turns>,
    changed: Condvar,
    /// Bytes per second for bulk writes (0: no pacing).
    rate: u64,
    /// When the next bulk write may start under the pacing.
    next: Mutex<Option<std::time::Instant>>,
}

#[derive(Debug, Default)]
struct Turns {
    /// A commit is running or waiting for bulk writes to end.
    commit: bool,
    /// Commits ended so far.
    commits_ended: u64,
    /// Bulk writes under way.
    bulk: usize,
}

impl Turns {
    /// Whether a bulk write that arrived when `arrived` commits had ended may start.
    fn bulk_may_start(&self, arrived: u64) -> bool {
        self.bulk < MAX_BULK && (!self.commit || self.commits_ended > arrived)
    }

    /// Whether the wanted commit may start.
    fn commit_may_start(&self) -> bool {
        self.bulk == 0
    }
}

/// Bulk writes under way at once at most.
pub const MAX_BULK: usize = 4;

/// A bulk write's turn; the next commit may start once every such turn is dropped.
#[derive(Debug)]
pub struct BulkTurn<'a>(&'a DiskTurns);

impl DiskTurns {
    /// Turns with bulk writes paced to `rate` bytes per second (0: no pacing).
    pub fn new(rate: u64) -> Self {
        DiskTurns { rate, ..DiskTurns::default() }
    }

    /// Waits for a bulk write's turn to write `bytes` (blocking: call off the async
    /// runtime): first its place under the pacing, then no commit wanted.
    pub fn bulk(&self, bytes: u64) -> BulkTurn<'_> {
        if let Some(wait) = self.pace(bytes, std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut turns = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let arrived = turns.commits_ended;
        while !turns.bulk_may_start(arrived) {
            turns = self.changed.wait(turns).unwrap_or_else(|p| p.into_inner());
        }
        turns.bulk += 1;
        BulkTurn(self)
    }

    /// Reserves the pacing's next slot for `bytes` at `now`: how long to wait for it.
    fn pace(&self, bytes: u64, now: std::time::Instant) -> Option<std::time::Duration> {
        if self.rate == 0 {
            return None;
        }
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let start = next.map_or(now, |n| n.max(now));
        *next = Some(start + std::time::Duration::from_secs_f64(bytes as f64 / self.rate as f64));
        (start > now).then(|| start - now)
    }

    /// Runs `commit` once no bulk write is under way; none starts meanwhile unless it
    /// has already waited for an earlier commit.
    fn commit<T>(&self, commit: impl FnOnce() -> T) -> T {
        {
            let mut turns = self.state.lock().unwrap_or_else(|p| p.into_inner());
            turns.commit = true;
            while !turns.commit_may_start() {
                turns = self.changed.wait(turns).unwrap_or_else(|p| p.into_inner());
            }
        }
        let result = commit();
        let mut turns = self.state.lock().unwrap_or_else(|p| p.into_inner());
        turns.commit = false;
        turns.commits_ended += 1;
        drop(turns);
        self.changed.notify_all();
        result
    }
}

impl Drop for BulkTurn<'_> {
    fn drop(&mut self) {
        let mut turns = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        turns.bulk -= 1;
        drop(turns);
        self.0.changed.notify_all();
    }
}

pub(crate) struct Committer {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    health: Arc<Health>,
    turns: Arc<DiskTurns>,
}

impl Committer {
    /// Starts the committer thread. Each of `gens` (index writes, watermark writes) is
    /// marked durable as far as each successful commit covers it.
    pub(crate) fn start(
        db: sled::Db,
        data_file: PathBuf,
        gens: Vec<Arc<IndexGen>>,
        bulk_bytes_per_sec: u64,
    ) -> Result<Committer, StoreError> {
        // Open once up front: a missing data file is a startup error, not a per-batch one.
        let file =
            File::open(&data_file).map_err(|e| StoreError::NotDurable(format!("{}: {e}", data_file.display())))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let health = Arc::new(Health::default());
        let thread_health = health.clone();
        let turns = Arc::new(DiskTurns::new(bulk_bytes_per_sec));
        let thread_turns = turns.clone();
        let thread = std::thread::Builder::new()
            .name("sb-committer".into())
            .spawn(move || run(db, file, rx, &thread_health, &gens, &thread_turns))
            .map_err(|e| StoreError::NotDurable(e.to_string()))?;
        Ok(Committer { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), health, turns })
    }

    /// The turns bulk writes take with the commits.
    pub(crate) fn turns(&self) -> &DiskTurns {
        &self.turns
    }

    pub(crate) fn on_failure(&self, hook: FailureHook) {
        let _ = self.health.hook.set(hook);
    }

    pub(crate) fn inject_failure(&self) {
        self.health.inject.store(true, Ordering::SeqCst);
    }

    pub(crate) fn failed(&self) -> bool {
        self.health.failed.load(Ordering::SeqCst)
    }

    pub(crate) fn notify(&self, done: Done) -> Result<(), StoreError> {
        self.send(Job::Wait(done))
    }

    /// Has the committer thread apply `batch` between flushes; returns once it is
    /// applied (blocking: call off the async runtime), with a future for its durability.
    pub(crate) fn apply(&self, batch: sled::Batch) -> Result<Durable, StoreError> {
        let (applied_tx, applied_rx) = mpsc::sync_channel(1);
        let (durable_tx, durable_rx) = oneshot::channel();
        let done: Done = Box::new(move |r| {
            let _ = durable_tx.send(r);
        });
        self.send(Job::Apply(batch, applied_tx, done))?;
        applied_rx.recv().map_err(|_| StoreError::Closed)??;
        Ok(Durable(durable_rx))
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) => tx.send(job).map_err(|_| StoreError::Closed),
            None => Err(StoreError::Closed),
        }
    }

    pub(crate) fn wait(&self) -> Result<Durable, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.notify(Box::new(move |r| {
            let _ = tx.send(r);
        }))?;
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

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(db: sled::Db, file: File, rx: mpsc::Receiver<Job>, health: &Health, gens: &[Arc<IndexGen>], turns: &DiskTurns) {
    // Fail-stop: after one failed flush or fsync nothing is reported durable again. On
    // Linux a failed fsync may already have dropped the dirty pages it could not write,
    // so retrying and later succeeding would acknowledge writes that are gone.
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut waiters = Vec::new();
        for job in std::iter::once(first).chain(rx.try_iter()) {
            match job {
                Job::Wait(done) => waiters.push(done),
                Job::Apply(batch, applied, done) => {
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
        #[cfg(test)]
        {
            let n = health.commits.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(hook) = health.commit_started.get() {
                hook(n);
            }
        }
        let result = match &failed {
            Some(e) => Err(e.clone()),
            None if health.inject.swap(false, Ordering::SeqCst) => Err("injected commit failure".to_owned()),
            None => turns.commit(|| commit_once(&db, &file, waiters.len())),
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

fn commit_once(db: &sled::Db, file: &File, waiters: usize) -> Result<(), String> {
    let started = std::time::Instant::now();
    db.flush().map_err(|e| e.to_string())?;
    let flush_time = started.elapsed();
    file.sync_data().map_err(|e| e.to_string())?;
    let total = started.elapsed();
    if total > SLOW_COMMIT {
        tracing::warn!(
            flush_ms = flush_time.as_millis() as u64,
            total_ms = total.as_millis() as u64,
            waiters,
            "slow group commit"
        );
    }
    Ok(())
}

/// fdatasyncs one file.
pub(crate) fn sync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_data()
}

/// Resolves once the writes applied before it was created are durable.
#[must_use = "a write is not durable until this resolves"]
#[derive(Debug)]
pub struct Durable(oneshot::Receiver<Result<(), StoreError>>);

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
    fn start(dir: &Path) -> (sled::Db, Committer) {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open().unwrap();
        let committer = Committer::start(db.clone(), dir.join("db"), vec![Arc::new(IndexGen::default())], 0).unwrap();
        (db, committer)
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
        let (started_tx, started) = channel();
        let (go, paused) = channel::<()>();
        let paused = Mutex::new(paused);
        let hook = Box::new(move |n| {
            started_tx.send(n).unwrap();
            if n == 1 {
                paused.lock().unwrap().recv_timeout(WAIT).unwrap();
            }
        });
        committer.health.commit_started.set(hook).unwrap_or_else(|_| panic!("hook set twice"));
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

    #[test]
    fn a_wanted_commit_holds_back_new_bulk_writes_and_waits_only_for_those_under_way() {
        let mut t = Turns::default();
        assert!(t.bulk_may_start(0));
        t.bulk = 1;
        // A commit is wanted: the write under way holds it back, a new one waits.
        t.commit = true;
        assert!(!t.commit_may_start());
        assert!(!t.bulk_may_start(t.commits_ended));
        t.bulk = 0;
        assert!(t.commit_may_start());
        // It runs and ends: the waiting write goes, even with the next commit wanted.
        t.commit = false;
        t.commits_ended += 1;
        t.commit = true;
        assert!(t.bulk_may_start(0), "a bulk write waits for one commit at most");
        assert!(!t.bulk_may_start(t.commits_ended), "one that arrived after it waits");
    }

    #[test]
    fn paced_bulk_writes_each_wait_for_their_share_of_the_rate() {
        let turns = DiskTurns::new(1_000_000);
        let t0 = std::time::Instant::now();
        // 1 MB at 1 MB/s: the first goes at once, the next a second later, and so on.
        assert_eq!(turns.pace(1_000_000, t0), None);
        assert_eq!(turns.pace(500_000, t0), Some(std::time::Duration::from_secs(1)));
        assert_eq!(turns.pace(1, t0 + std::time::Duration::from_millis(500)), Some(std::time::Duration::from_secs(1)));
        // After an idle while there is no burst to spend: the next waits for none.
        assert_eq!(turns.pace(1, t0 + std::time::Duration::from_secs(10)), None);
        assert_eq!(DiskTurns::new(0).pace(u64::MAX, t0), None);
    }

    #[test]
    fn at_most_max_bulk_writes_run_at_once() {
        let t = Turns { bulk: MAX_BULK, ..Turns::default() };
        assert!(!t.bulk_may_start(0));
        let t = Turns { bulk: MAX_BULK - 1, ..Turns::default() };
        assert!(t.bulk_may_start(0));
    }

    #[test]
    fn a_commit_starts_only_once_the_bulk_write_under_way_ends() {
        let turns = Arc::new(DiskTurns::default());
        let turn = turns.bulk(1);
        let (tx, rx) = std::sync::mpsc::channel();
        let committing = turns.clone();
        let commit = std::thread::spawn(move || committing.commit(|| tx.send(()).unwrap()));
        // The commit is wanted (its flag is up) but does not run while the turn is held.
        while !turns.state.lock().unwrap().commit {
            std::thread::yield_now();
        }
        assert!(rx.try_recv().is_err());
        drop(turn);
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the commit ran once the bulk turn ended");
        commit.join().unwrap();
        // Both ended: a new bulk write starts at once.
        drop(turns.bulk(1));
    }
}
