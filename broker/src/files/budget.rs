//! The broker-wide budget of upload chunk buffers (`transfer_buffer_bytes`) and its
//! lease: a chunk being received keeps its bytes only while it keeps arriving, or while
//! no stream needs them.
//!
//! A chunk takes its whole buffer when its frame header is read, before its data comes,
//! so that what a stream holds is always counted and streams cannot deadlock each other
//! on half-taken buffers. Alone that let a header hold a chunk's bytes until the stream's
//! progress deadline (30 s): some twenty accounts sending only headers could keep every
//! other upload waiting. So a stream that has waited `WAIT_BEFORE_CLAIMING` for the
//! budget registers what it wants, and a chunk that has fallen below
//! `MIN_CHUNK_BYTES_PER_SEC` (`lease_end`) gives its bytes up for it: only as many
//! chunks as the waiting streams need, roughly the earliest to fall behind (the slowest)
//! first (parked leases are woken in the order they parked).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::limits::{CHUNK_LEASE_GRACE, MIN_CHUNK_BYTES_PER_SEC, SMALL_CHUNK_BYTES};

/// How long a stream waits for the budget before it counts as waiting (and slow chunks
/// give their bytes up for it): chunks already received and queued for their actors
/// hand theirs back within milliseconds, and no chunk should lose its bytes for that.
pub const WAIT_BEFORE_CLAIMING: Duration = Duration::from_millis(250);

/// When a chunk whose buffer was granted at `since`, `received` bytes read since, falls
/// below its lease if no more arrive: it must have `MIN_CHUNK_BYTES_PER_SEC` for every
/// second past `CHUNK_LEASE_GRACE`.
pub fn lease_end(since: Instant, received: u64) -> Instant {
    since + CHUNK_LEASE_GRACE + Duration::from_micros(received.saturating_mul(1_000_000) / MIN_CHUNK_BYTES_PER_SEC)
}

/// Bytes wanted by streams waiting for the budget, and bytes slow chunks are giving up
/// for them (claimed, not yet freed: `Revoked`).
#[derive(Debug, Default)]
struct Claims {
    wanted: usize,
    promised: usize,
}

/// The budget: one semaphore permit per byte.
#[derive(Debug)]
pub struct ChunkBudget {
    bytes: Arc<Semaphore>,
    max: usize,
    claims: Mutex<Claims>,
    /// Notified (one parked lease at a time) when the waiting streams may lack bytes
    /// that no revocation covers: a wait began, or a revocation left them short.
    wanted_more: Notify,
}

impl ChunkBudget {
    /// A budget of `max` bytes (at most `Semaphore::MAX_PERMITS`).
    pub fn new(max: usize) -> Arc<ChunkBudget> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(ChunkBudget {
            bytes: Arc::new(Semaphore::new(max)),
            max,
            claims: Mutex::default(),
            wanted_more: Notify::new(),
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.max - self.bytes.available_permits()
    }

    /// Takes `len` bytes (at most the whole budget), waiting in line for them. The
    /// future owns what it needs (kept across `select!` turns, the stream keeps its
    /// place); dropping it gives up the wait.
    pub fn reserve(self: &Arc<Self>, len: usize) -> impl Future<Output = OwnedSemaphorePermit> + Send + 'static {
        let me = self.clone();
        async move {
            let want = len.clamp(1, me.max);
            let n = u32::try_from(want).unwrap_or(u32::MAX);
            // The semaphore is never closed.
            let acquire = me.bytes.clone().acquire_many_owned(n);
            tokio::pin!(acquire);
            if let Ok(Ok(permit)) = tokio::time::timeout(WAIT_BEFORE_CLAIMING, &mut acquire).await {
                return permit;
            }
            let _waiting = Waiting::begin(&me, want);
            match acquire.await {
                Ok(permit) => permit,
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Resolves once a chunk holding `size` bytes, whose lease ends at `lease_end`, has
    /// lost them to waiting streams: the caller must then let them go (reset its stream)
    /// and drop the `Revoked` after them. Only as many chunks as the waiters lack bytes
    /// for lose theirs; one parked lease is woken at a time and wakes the next only while
    /// bytes are still lacking. Cancel-safe: the bytes are claimed only in the poll that
    /// resolves.
    pub async fn lease_lost(self: &Arc<Self>, lease_end: Instant, size: usize) -> Revoked {
        tokio::time::sleep_until(lease_end).await;
        loop {
            let more = self.wanted_more.notified();
            tokio::pin!(more);
            // Registered before the claims are read: a wait beginning in between is seen.
            more.as_mut().enable();
            {
                let mut c = self.claims.lock().unwrap_or_else(|p| p.into_inner());
                if c.promised < c.wanted {
                    c.promised += size;
                    if c.promised < c.wanted {
                        // Still short: the next parked lease checks too.
                        self.wanted_more.notify_one();
                    }
                    return Revoked { budget: self.clone(), size };
                }
            }
            more.await;
        }
    }
}

/// Bytes a chunk lost to waiting streams, counted as being given up until this is
/// dropped (after the chunk's permits, which frees them).
#[derive(Debug)]
pub struct Revoked {
    budget: Arc<ChunkBudget>,
    size: usize,
}

impl Drop for Revoked {
    fn drop(&mut self) {
        // No lease is woken here: the freed bytes go to the streams first in line, which
        // have waited longest and so are counted waiters, and a waiter that got them is
        // counted out only once its task runs; waking a lease now would take a second
        // chunk's bytes for a wait that is already served.
        let mut c = self.budget.claims.lock().unwrap_or_else(|p| p.into_inner());
        c.promised = c.promised.saturating_sub(self.size);
    }
}

/// A stream counted as waiting for `want` bytes while it lives, whatever ends the wait.
struct Waiting<'a> {
    budget: &'a ChunkBudget,
    want: usize,
}

impl<'a> Waiting<'a> {
    fn begin(budget: &'a ChunkBudget, want: usize) -> Self {
        budget.claims.lock().unwrap_or_else(|p| p.into_inner()).wanted += want;
        budget.wanted_more.notify_one();
        Waiting { budget, want }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Bytes being given up for this wait stay counted until they are free.
        self.budget.claims.lock().unwrap_or_else(|p| p.into_inner()).wanted -= self.want;
    }
}

/// A transfer stream's place among `max_live_transfer_streams`, with the bytes it moved
/// (read from the client, or taken by it), so that a stream finding every place taken
/// can have one given up by a stream that fell behind: one whose bytes since it began
/// are fewer than `MIN_CHUNK_BYTES_PER_SEC` for every second past `CHUNK_LEASE_GRACE`
/// (`lease_end`). Holding a place then costs a client 64 KiB/s while others wait for
/// one (before, a chunk every 29 s held it for the upload's life, and a few dozen
/// accounts could keep every other upload and download refused). A place taken from
/// another stream has no grace (else streams that keep taking each other's places would
/// never be behind), and time spent waiting for the broker (a chunk's bytes of the
/// budget, a blob file) does not count against a place: it is not a candidate meanwhile,
/// and the wait is added to its lease. A small chunk's turn for its sync (`SyncPacer`)
/// counts, but for what the chunk's bytes are worth at the minimum rate
/// (`credited_wait`): small chunks sent back to back make that queue themselves.
#[derive(Debug)]
pub struct Place {
    since: Instant,
    grace: Duration,
    moved: AtomicU64,
    /// Microseconds spent waiting for the broker, added to the lease.
    waited_us: AtomicU64,
    /// Waits for the broker in progress.
    waiting: AtomicU64,
    evicted: AtomicBool,
    wake: Notify,
}

impl Place {
    /// A place taken at `since`: a free one (`graced`) or one taken from another stream.
    pub fn new(since: Instant, graced: bool) -> Place {
        Place {
            since,
            grace: if graced { CHUNK_LEASE_GRACE } else { Duration::ZERO },
            moved: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Counts `bytes` moved.
    pub fn moved(&self, bytes: u64) {
        self.moved.fetch_add(bytes, Ordering::Relaxed);
    }

    /// How long past its lease the place is at `now`, if it is (never while it waits for
    /// the broker).
    pub fn behind(&self, now: Instant) -> Option<Duration> {
        if self.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        let waited = Duration::from_micros(self.waited_us.load(Ordering::Relaxed));
        let end = lease_end(self.since, self.moved.load(Ordering::Relaxed)) + waited + self.grace - CHUNK_LEASE_GRACE;
        now.checked_duration_since(end).filter(|d| !d.is_zero())
    }

    /// Runs `wait` (a wait for the broker, not the client) with the place's clock
    /// stopped. Cancel-safe: a wait dropped half way counts as ended there.
    pub async fn waiting_for_broker<T>(&self, wait: impl Future<Output = T>) -> T {
        let _waiting = BrokerWait::start(self);
        wait.await
    }

    /// Runs `wait` (a small chunk's turn for its sync) with the place's clock running,
    /// then adds to its lease as much of the wait as `worth` (the chunk's bytes at the
    /// minimum rate). Cancel-safe: a wait dropped half way is credited nothing.
    pub async fn credited_wait<T>(&self, worth: Duration, wait: impl Future<Output = T>) -> T {
        let began = Instant::now();
        let out = wait.await;
        let credit = began.elapsed().min(worth);
        self.waited_us.fetch_add(credit.as_micros().min(u128::from(u64::MAX / 2)) as u64, Ordering::Relaxed);
        out
    }

    /// Takes the place away (its stream is reset with `OVERLOADED`); false if it already
    /// was.
    pub fn evict(&self) -> bool {
        let first = !self.evicted.swap(true, Ordering::AcqRel);
        if first {
            self.wake.notify_one();
        }
        first
    }

    /// Whether the place was taken away.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Resolves once the place is taken away. Cancel-safe.
    pub async fn evicted(&self) {
        if !self.is_evicted() {
            self.wake.notified().await;
        }
    }
}

/// A wait of a place's stream for the broker, ended when dropped.
struct BrokerWait<'a> {
    place: &'a Place,
    started: Instant,
}

impl<'a> BrokerWait<'a> {
    fn start(place: &'a Place) -> BrokerWait<'a> {
        place.waiting.fetch_add(1, Ordering::AcqRel);
        BrokerWait { place, started: Instant::now() }
    }
}

impl Drop for BrokerWait<'_> {
    fn drop(&mut self) {
        self.place.waited_us.fetch_add(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.place.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Of `places`, the one furthest past its lease at `now` and not already taken away.
pub fn most_behind<'a>(places: impl Iterator<Item = &'a Arc<Place>>, now: Instant) -> Option<&'a Arc<Place>> {
    places.filter(|p| !p.is_evicted()).filter_map(|p| Some((p.behind(now)?, p))).max_by_key(|(d, _)| *d).map(|(_, p)| p)
}

/// Whether a chunk of `len` bytes ending at `end` of a `size`-byte upload is a small
/// chunk, whose fdatasync takes a turn of `SyncPacer`: shorter than `SMALL_CHUNK_BYTES`
/// and not the file's last, or any chunk of a file smaller than that. A small file's
/// chunks take turns too: before, its one chunk (its last) did not, and a flood of tiny
/// uploads (eight at a time per account, thousands in a quota) cost each a chunk
/// fdatasync and the syncs of its publication (a rename and two directory syncs)
/// unpaced, the load the pacer exists to keep from the group commits. A larger file's
/// last chunk never waits: the file cost 256 KiB at least per completion. A turn is at
/// once while the broker syncs fewer small chunks than `small_chunk_syncs_per_sec`.
pub fn small_chunk(len: u64, end: u64, size: u64) -> bool {
    len < SMALL_CHUNK_BYTES && (end < size || size < SMALL_CHUNK_BYTES)
}

/// Turns for small chunks' fdatasyncs over all uploads: at most `per_sec` a second, one
/// each `1 / per_sec` apart, first come first served. A stream waits for its turn before
/// it hands the chunk to the upload's actor (`connection/transfer.rs`), so those waiting
/// are at most the transfer streams served (one each): at the defaults a turn is at most
/// a second away, and no actor waits.
#[derive(Debug)]
pub struct SyncPacer {
    interval: Duration,
    /// The earliest the next turn may be.
    next: Mutex<Option<Instant>>,
}

impl SyncPacer {
    /// Turns `per_sec` a second (at least 1).
    pub fn new(per_sec: u64) -> SyncPacer {
        SyncPacer { interval: Duration::from_secs(1) / per_sec.clamp(1, 1_000_000) as u32, next: Mutex::new(None) }
    }

    /// Takes the next turn for a sync wanted at `now`: when it may run.
    pub fn turn(&self, now: Instant) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let at = next.map_or(now, |n| n.max(now));
        *next = Some(at + self.interval);
        at
    }

    /// Waits for the next turn.
    pub async fn wait(&self) {
        tokio::time::sleep_until(self.turn(Instant::now())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    #[test]
    fn a_place_is_given_up_by_the_stream_furthest_behind_64_kib_a_second() {
        let t0 = Instant::now();
        let kib = 1024u64;
        let idle = Arc::new(Place::new(t0, true));
        let steady = Arc::new(Place::new(t0, true));
        let burst = Arc::new(Place::new(t0, true));
        steady.moved(640 * kib);
        burst.moved(64 * kib);
        // Within the grace nobody is behind.
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(most_behind([&idle, &steady, &burst].into_iter(), at(2)).is_none());
        // At 10 s: idle is 8 s behind, the burst 7 s, the steady one (64 KiB/s) is not.
        assert_eq!(steady.behind(at(10)), None);
        assert_eq!(burst.behind(at(10)), Some(Duration::from_secs(7)));
        let chosen = most_behind([&idle, &steady, &burst].into_iter(), at(10)).unwrap();
        assert!(Arc::ptr_eq(chosen, &idle));
        assert!(idle.evict() && !idle.evict(), "taken away once");
        // The next newcomer gets the burst's place, never the steady stream's.
        let chosen = most_behind([&idle, &steady, &burst].into_iter(), at(10)).unwrap();
        assert!(Arc::ptr_eq(chosen, &burst));
        burst.evict();
        assert!(most_behind([&idle, &steady, &burst].into_iter(), at(10)).is_none());
        // A place taken from another stream has no grace: behind as soon as it lags, so
        // streams taking each other's places cannot all stay within a grace.
        let taken = Place::new(at(10), false);
        assert!(taken.behind(at(10) + Duration::from_millis(1)).is_some());
        taken.moved(64 * kib);
        assert_eq!(taken.behind(at(11)), None, "64 KiB buys it a second");
        assert!(taken.behind(at(12)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_the_broker_does_not_count_against_a_place() {
        let t0 = Instant::now();
        let place = Arc::new(Place::new(t0, true));
        let waiter = place.clone();
        let wait = tokio::spawn(async move {
            waiter.waiting_for_broker(tokio::time::sleep(Duration::from_secs(10))).await;
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(place.behind(Instant::now()), None, "not a candidate while it waits");
        assert!(most_behind([&place].into_iter(), Instant::now()).is_none());
        wait.await.unwrap();
        // The 10 s waited are added to its lease: behind 2 s after the wait, not at once.
        assert_eq!(place.behind(t0 + Duration::from_secs(11)), None);
        assert_eq!(place.behind(t0 + Duration::from_secs(13)), Some(Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn an_evicted_place_wakes_its_stream_even_if_it_was_not_waiting_yet() {
        let place = Place::new(Instant::now(), true);
        place.evict();
        tokio::time::timeout(Duration::from_secs(5), place.evicted()).await.unwrap();
        assert!(place.is_evicted());
    }

    #[test]
    fn small_chunks_take_turns_and_the_others_never_wait() {
        let kib = 1024u64;
        // Short of 256 KiB and not the last: small. A whole chunk, or the last of a
        // larger file: not. Any chunk of a small file: small.
        assert!(small_chunk(1, 1, 100 * kib * kib));
        assert!(small_chunk(256 * kib - 1, 256 * kib - 1, 10 * 1024 * kib));
        assert!(!small_chunk(256 * kib, 256 * kib, 10 * 1024 * kib));
        assert!(!small_chunk(1024 * kib, 2048 * kib, 10 * 1024 * kib));
        assert!(!small_chunk(5, 300 * kib, 300 * kib), "a larger file's last chunk");
        assert!(small_chunk(100, 100, 100), "a small file in one chunk");
        assert!(small_chunk(5, 100, 100), "a small file's last chunk");

        // 256 a second: a burst of 512 syncs wanted at once spreads over two seconds,
        // 1/256 s apart, first come first served.
        let pacer = SyncPacer::new(256);
        let t0 = Instant::now();
        let turns: Vec<Instant> = (0..512).map(|_| pacer.turn(t0)).collect();
        assert_eq!(turns[0], t0, "the first goes at once");
        assert!(turns.windows(2).all(|w| w[1] - w[0] == Duration::from_secs(1) / 256));
        assert_eq!(turns[511] - t0, Duration::from_secs(1) / 256 * 511);
        // After a quiet spell, the next goes at once again (no credit saved up).
        let later = t0 + Duration::from_secs(10);
        assert_eq!(pacer.turn(later), later);
        assert_eq!(pacer.turn(later), later + Duration::from_secs(1) / 256);
        // A rate of 0 is one a second, not a division by zero.
        let slow = SyncPacer::new(0);
        slow.turn(t0);
        assert_eq!(slow.turn(t0), t0 + Duration::from_secs(1));
    }

    #[test]
    fn a_chunks_lease_is_its_grace_and_its_bytes_at_the_minimum_rate() {
        let t0 = Instant::now();
        assert_eq!(lease_end(t0, 0), t0 + CHUNK_LEASE_GRACE);
        // 1 MiB at 64 KiB/s: 16 s more.
        assert_eq!(lease_end(t0, MIB as u64), t0 + CHUNK_LEASE_GRACE + Duration::from_secs(16));
        assert_eq!(lease_end(t0, MIN_CHUNK_BYTES_PER_SEC / 2), t0 + CHUNK_LEASE_GRACE + Duration::from_millis(500));
    }

    /// Whether `f` resolves within `wait` (virtual time).
    async fn resolves<F: Future>(f: F, wait: Duration) -> bool {
        tokio::time::timeout(wait, f).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_lost_only_past_its_end_and_only_to_a_stream_that_waited() {
        let budget = ChunkBudget::new(MIB);
        let held = budget.reserve(MIB).await;
        let end = Instant::now() + CHUNK_LEASE_GRACE;
        // Nobody waits: past its end, the chunk keeps its bytes.
        assert!(!resolves(budget.lease_lost(end, MIB), Duration::from_secs(10)).await);
        // A stream waits: not before the lease's end ...
        let end = Instant::now() + CHUNK_LEASE_GRACE;
        let waiter = tokio::spawn(budget.reserve(MIB));
        let lost = budget.lease_lost(end, MIB);
        tokio::pin!(lost);
        assert!(!resolves(&mut lost, CHUNK_LEASE_GRACE - Duration::from_millis(1)).await);
        // ... and at it.
        assert!(resolves(&mut lost, Duration::from_millis(2)).await);
        drop(held);
        assert_eq!(waiter.await.unwrap().num_permits(), MIB);
        let c = budget.claims.lock().unwrap();
        assert_eq!((c.wanted, c.promised), (0, 0), "the wait's claims are settled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_wait_takes_no_ones_bytes() {
        let budget = ChunkBudget::new(MIB);
        let held = budget.reserve(MIB).await;
        let waiter = tokio::spawn(budget.reserve(MIB / 2));
        // Past the lease's end, but the waiter has waited less than WAIT_BEFORE_CLAIMING.
        let lost = budget.lease_lost(Instant::now(), MIB);
        tokio::pin!(lost);
        assert!(!resolves(&mut lost, WAIT_BEFORE_CLAIMING - Duration::from_millis(10)).await);
        // Its bytes come back meanwhile (a queued chunk stored): nothing is lost.
        drop(held);
        assert_eq!(waiter.await.unwrap().num_permits(), MIB / 2);
        assert!(!resolves(&mut lost, Duration::from_secs(10)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn only_as_many_chunks_as_the_waiters_need_lose_their_bytes() {
        let budget = ChunkBudget::new(4 * MIB);
        let held: Vec<_> = whole_chunks(&budget, 4).await;
        // One waiter for 1 MiB: of four slow chunks, one loses its bytes.
        let waiter = tokio::spawn(budget.reserve(MIB));
        tokio::time::sleep(WAIT_BEFORE_CLAIMING * 2).await;
        let now = Instant::now();
        let mut lost = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let b = budget.clone();
            lost.spawn(async move { b.lease_lost(now, MIB).await });
        }
        let first = tokio::time::timeout(Duration::from_secs(1), lost.join_next()).await;
        let Ok(Some(Ok(first))) = first else { panic!("no chunk lost its bytes: {first:?}") };
        assert!(
            tokio::time::timeout(Duration::from_secs(10), lost.join_next()).await.is_err(),
            "a second chunk lost its bytes for the same waiter"
        );
        drop(held);
        assert_eq!(waiter.await.unwrap().num_permits(), MIB);
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_secs(10), lost.join_next()).await.is_err(),
            "a chunk lost its bytes with nobody waiting"
        );
        // A second waiter: one more.
        let all = budget.reserve(4 * MIB).await;
        let waiter = tokio::spawn(budget.reserve(MIB));
        let second = tokio::time::timeout(Duration::from_secs(1), lost.join_next()).await;
        assert!(matches!(second, Ok(Some(Ok(_)))), "a new waiter gets one more");
        drop(all);
        assert_eq!(waiter.await.unwrap().num_permits(), MIB);
    }

    /// A chunk larger than what its waiter wanted leaves nothing counted once its bytes
    /// are free: a later waiter still gets a slow chunk's bytes.
    #[tokio::test(start_paused = true)]
    async fn a_revocation_larger_than_the_want_leaves_no_surplus_behind() {
        let budget = ChunkBudget::new(2 * MIB);
        let mut held = whole_chunks(&budget, 2).await;
        let small = tokio::spawn(budget.reserve(64 * 1024));
        tokio::time::sleep(WAIT_BEFORE_CLAIMING * 2).await;
        let revoked = budget.lease_lost(Instant::now(), MIB).await;
        drop(held.pop());
        drop(revoked);
        let small = small.await.unwrap();
        // The rest of the freed bytes go to a stream that did not wait.
        let rest = budget.reserve(MIB - 64 * 1024).await;
        let later = tokio::spawn(budget.reserve(MIB / 2));
        tokio::time::sleep(WAIT_BEFORE_CLAIMING * 2).await;
        let lost = budget.lease_lost(Instant::now(), MIB);
        assert!(resolves(lost, Duration::from_secs(1)).await, "the later waiter got nothing");
        drop((held, small, rest));
        assert_eq!(later.await.unwrap().num_permits(), MIB / 2);
        let c = budget.claims.lock().unwrap();
        assert_eq!((c.wanted, c.promised), (0, 0));
    }

    /// A revocation's bytes reach its waiter before the waiter's task has counted itself
    /// out: freeing them must wake no other lease, which on a multi-thread runtime would
    /// run first and take a second chunk's bytes for a wait already served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn freeing_revoked_bytes_takes_no_second_chunk() {
        for _ in 0..20 {
            let budget = ChunkBudget::new(2 * MIB);
            let mut held = whole_chunks(&budget, 2).await;
            let waiter = tokio::spawn(budget.reserve(MIB));
            tokio::time::sleep(WAIT_BEFORE_CLAIMING + Duration::from_millis(50)).await;
            let now = Instant::now();
            let revoked = budget.lease_lost(now, MIB).await;
            let b = budget.clone();
            let second = tokio::spawn(async move { b.lease_lost(now, MIB).await });
            // Parked: the one waiter's bytes are claimed.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!second.is_finished());
            drop(held.pop());
            drop(revoked);
            assert_eq!(waiter.await.unwrap().num_permits(), MIB);
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!second.is_finished(), "a second chunk lost its bytes for a served wait");
            second.abort();
        }
    }

    async fn whole_chunks(budget: &Arc<ChunkBudget>, n: usize) -> Vec<OwnedSemaphorePermit> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(budget.reserve(MIB).await);
        }
        v
    }
}
