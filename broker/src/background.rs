//! Threads for CPU-heavy work that a client can start and no message waits on (password
//! hashes, image thumbnails). Under `runtime_scheduling = "batch"` (the default: the
//! broker has its cores to itself) they run under `SCHED_IDLE` (sched(7), Linux): such
//! work gets every core nothing else wants, and any thread woken on its core (a runtime
//! thread, even under `SCHED_BATCH`) preempts it at once. On the async runtime's blocking
//! pool the same work ran at the runtime's own policy: a flood of logins took the cores
//! from the chat at equal weight, and under `SCHED_BATCH` a runtime thread woken for a
//! message waited out the time slice of the work on its core (docs/benchmarks.md,
//! "Password hashes below the message path"). The price: on busy cores the work waits
//! for every other thread of the host, at a weight of 3 against 1,024 for a nice-0
//! thread. So under `"normal"` (chosen where the broker shares its cores with busy
//! processes) the threads keep the policy they started with, and are only preempted
//! when the kernel would preempt any thread.
//!
//! A blocking-pool thread cannot be lent to `SCHED_IDLE` and given back: an unprivileged
//! thread may not leave `SCHED_IDLE` (sched(7), "Privileges and resource limits"), so the
//! threads are the work's own.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// A job for a background thread.
type Job = Box<dyn FnOnce() + Send>;

/// `threads` threads, each running one job at a time, under `SCHED_IDLE` or as started.
/// The threads end when this is dropped, each after the jobs queued to it.
pub(crate) struct BackgroundThreads {
    /// Holds `threads` jobs. A caller bounds its jobs by slots of its own (a semaphore of
    /// at most `threads` permits, a permit held until its job ends): then a job never
    /// finds this full.
    jobs: SyncSender<Job>,
}

/// Why a job gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobLost {
    /// More jobs than threads were queued (a caller's bound is wrong).
    #[error("every background thread is busy and its queue full")]
    Full,
    /// The threads are gone.
    #[error("the background threads have stopped")]
    Stopped,
    /// The job panicked; its thread serves on.
    #[error("the job panicked")]
    Panicked,
}

impl BackgroundThreads {
    /// Starts `threads` threads named `name`, under `SCHED_IDLE` if `idle`, else under the
    /// policy of the calling thread.
    ///
    /// # Errors
    /// The OS refused a thread (the ones started stop again).
    pub(crate) fn start(name: &str, threads: usize, idle: bool) -> std::io::Result<Self> {
        let (jobs, queued) = std::sync::mpsc::sync_channel::<Job>(threads);
        let queued = Arc::new(Mutex::new(queued));
        for _ in 0..threads {
            let queued = queued.clone();
            std::thread::Builder::new().name(name.into()).spawn(move || {
                if idle {
                    run_when_idle();
                }
                serve(&queued);
            })?;
        }
        Ok(BackgroundThreads { jobs })
    }

    /// Runs `job` on one of the threads and waits for its answer. `job` must give back
    /// whatever bounds the caller's jobs before it returns (a slot dropped inside it), so
    /// that a caller that has its answer finds the slot free.
    pub(crate) async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, JobLost> {
        let (done, answer) = tokio::sync::oneshot::channel();
        // A job whose caller stopped waiting before it began (its peer left while it
        // queued, or a thumbnail timed out) is dropped unrun, giving back what it holds:
        // busy cores do no work nobody will read. A panicking job drops `done` unanswered.
        let job: Job = Box::new(move || {
            if !done.is_closed() {
                let _ = done.send(job());
            }
        });
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => JobLost::Full,
            TrySendError::Disconnected(_) => JobLost::Stopped,
        })?;
        answer.await.map_err(|_| JobLost::Panicked)
    }
}

/// A background thread: takes jobs until the sender is dropped.
fn serve(queued: &Mutex<Receiver<Job>>) {
    loop {
        let next = queued.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
        let Ok(job) = next else { return };
        // A panicking job loses its answer and leaves the thread serving.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// Puts the calling thread under `SCHED_IDLE` (Linux; elsewhere it runs as started). A
/// refusal (a sandbox) is logged and the thread runs as it started.
fn run_when_idle() {
    #[cfg(target_os = "linux")]
    if let Err(error) = crate::sched::set_own_policy(libc::SCHED_IDLE) {
        let thread = std::thread::current();
        tracing::warn!(%error, thread = thread.name(), "SCHED_IDLE refused: this thread's work runs at the broker's own CPU priority");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    /// Each thread's policy, read by two jobs that run at once (so one on each thread).
    #[cfg(target_os = "linux")]
    async fn policies_of(threads: &BackgroundThreads) -> (libc::c_int, libc::c_int) {
        let running = Arc::new(AtomicUsize::new(0));
        let read = |running: Arc<AtomicUsize>| {
            move || {
                assert!(both_running(&running), "two jobs on two threads");
                crate::sched::kernel_policy_of_this_thread()
            }
        };
        let (a, b) = tokio::join!(threads.run(read(running.clone())), threads.run(read(running)));
        (a.unwrap(), b.unwrap())
    }

    /// Counts the calling job in and waits (at most 10 s) until two are: true if they were.
    fn both_running(running: &AtomicUsize) -> bool {
        running.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        running.load(Ordering::SeqCst) == 2
    }

    /// Idle threads run under `SCHED_IDLE`; the others, and the caller, keep the policy it
    /// started with.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn idle_threads_run_only_when_nothing_else_wants_the_core() {
        let started_as = crate::sched::kernel_policy_of_this_thread();
        let idle = BackgroundThreads::start("sb-test", 2, true).unwrap();
        assert_eq!(policies_of(&idle).await, (libc::SCHED_IDLE, libc::SCHED_IDLE));
        let as_started = BackgroundThreads::start("sb-test", 2, false).unwrap();
        assert_eq!(policies_of(&as_started).await, (started_as, started_as));
        assert_eq!(crate::sched::kernel_policy_of_this_thread(), started_as);
    }

    /// A job that panics answers `Panicked`, and every thread still serves: two jobs that
    /// each wait to see the other one running end only if they run on two threads at once.
    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let threads = BackgroundThreads::start("sb-test", 2, false).unwrap();
        for _ in 0..4 {
            assert!(matches!(threads.run(|| -> u32 { panic!("a job that fails") }).await, Err(JobLost::Panicked)));
        }
        let running = Arc::new(AtomicUsize::new(0));
        let both_at_once = |running: Arc<AtomicUsize>| move || both_running(&running);
        let (a, b) = tokio::join!(threads.run(both_at_once(running.clone())), threads.run(both_at_once(running)));
        assert!(a.unwrap() && b.unwrap(), "a thread stopped serving after a panic");
    }

    /// Starts a job on `threads` that runs until the sender is used or dropped, and
    /// returns once it runs.
    async fn keep_busy(
        threads: &Arc<BackgroundThreads>,
    ) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<Result<(), JobLost>>) {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, on_start) = tokio::sync::oneshot::channel();
        let threads = threads.clone();
        let blocked = tokio::spawn(async move {
            threads
                .run(move || {
                    let _ = started.send(());
                    let _ = wait.recv();
                })
                .await
        });
        on_start.await.unwrap();
        (release, blocked)
    }

    /// A job whose caller left before it began is not run, and what it held is given back.
    #[tokio::test]
    async fn a_job_nobody_waits_for_any_more_is_not_run() {
        let threads = Arc::new(BackgroundThreads::start("sb-test", 1, false).unwrap());
        let (release, blocked) = keep_busy(&threads).await;
        let ran = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(());
        let left = tokio::spawn({
            let (threads, ran, held) = (threads.clone(), ran.clone(), held.clone());
            async move {
                threads
                    .run(move || {
                        let _held = held;
                        ran.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        left.abort();
        assert!(left.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        blocked.await.unwrap().unwrap();
        // The thread has taken the abandoned job once it answers a later one (sent once
        // the abandoned one left the queue: this test holds no slots).
        let later = async {
            loop {
                match threads.run(|| 1).await {
                    Err(JobLost::Full) => tokio::time::sleep(Duration::from_millis(1)).await,
                    answer => return answer,
                }
            }
        };
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), later).await.unwrap().unwrap(), 1);
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the abandoned job ran");
        assert_eq!(Arc::strong_count(&held), 1, "what the abandoned job held was kept");
    }

    /// More jobs than threads and queue are refused, not queued without bound.
    #[tokio::test]
    async fn jobs_past_the_threads_and_their_queue_are_refused() {
        let threads = Arc::new(BackgroundThreads::start("sb-test", 1, false).unwrap());
        let (release, blocked) = keep_busy(&threads).await;
        let queued = tokio::spawn({
            let threads = threads.clone();
            async move { threads.run(|| 2).await }
        });
        // Wait until the second job is in the queue (the task ran to its send).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(threads.run(|| 3).await, Err(JobLost::Full)));
        release.send(()).unwrap();
        blocked.await.unwrap().unwrap();
        assert_eq!(queued.await.unwrap().unwrap(), 2);
    }
}
