//! Disk space promised to uploads in progress, and when a promise lapses.
//!
//! `Store::begin_upload` refuses an upload (`STORAGE_FULL`) when the disk could not
//! hold it beside the bytes still to come of the uploads in progress: those bytes are
//! promised. A promise that held for as long as its upload (24 h by default) could be
//! taken for nothing: accounts that declare uploads and never send a byte (ten a source
//! address may register at once, then one a minute) would hold the disk against
//! everyone's uploads for a day, without writing anything. So a promise holds only
//! while its upload moves: for `hold` after it began, and again after each
//! `PROMISE_RENEW_BYTES` it stores (or its last bytes). A begin holds room only within
//! its user's allowance (the broker's `UPLOAD_HOLDS_PER_HOUR`; one beyond begins
//! lapsed), so cancelling and beginning again does not hold room for nothing either.
//! Past that, holding room costs a client bytes actually written, at least 4 MiB a
//! minute per upload at the default hold, about what filling the disk for real would.
//! An upload whose promise lapsed keeps going, but on the disk's spare room only: each
//! chunk it writes must fit beside the promises held and the disk reserve
//! (`Store::chunk_room`), and its promise is taken again, after its next 4 MiB, only if
//! the rest of the file fits too (else it stays lapsed), so the uploads that hold room
//! and the reserve are never written into. Pure: the caller passes the time.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use switchboard_protocol::FileId;

/// Bytes an upload stores to renew its promise: 4 MiB, four of the reference client's
/// 1 MiB chunks.
pub const PROMISE_RENEW_BYTES: u64 = 4 * 1024 * 1024;

/// How long a promise holds after its upload began or was last renewed, unless the
/// store is configured otherwise (`StoreConfig::upload_promise_hold`): 60 s, longer
/// than a client takes to notice a lost connection and resume (the reference client
/// resumes within a few seconds of its connection's idle timeout, 30 s).
pub const PROMISE_HOLD: Duration = Duration::from_secs(60);

/// The longest hold taken (a longer one configured is cut to it): ten years, so that
/// adding it to any instant cannot overflow.
const PROMISE_HOLD_MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// One upload's promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Promise {
    /// Bytes still to come (declared size minus durable offset).
    remaining: u64,
    /// The durable offset when it last began or was renewed.
    renewed_at: u64,
    /// Until when it holds; `None` once lapsed.
    until: Option<Instant>,
}

/// The promises of the uploads in progress, one per upload (lapsed ones kept, not
/// counted, so progress toward a renewal is measured from the last one). Bounded by the
/// uploads in progress (`max_uploads_per_user` per user, each removed when its upload
/// completes, fails, is cancelled or expires).
#[derive(Debug)]
pub(crate) struct Promises {
    hold: Duration,
    uploads: HashMap<FileId, Promise>,
    /// The held promises by when they lapse.
    deadlines: BTreeSet<(Instant, FileId)>,
    /// Bytes of the held promises.
    held: u64,
}

impl Default for Promises {
    fn default() -> Self {
        Promises::new(PROMISE_HOLD)
    }
}

impl Promises {
    pub(crate) fn new(hold: Duration) -> Self {
        let hold = hold.min(PROMISE_HOLD_MAX);
        Promises { hold, uploads: HashMap::new(), deadlines: BTreeSet::new(), held: 0 }
    }

    /// Upload `id` began, or began again at `offset` (restarted, or found in progress
    /// when the store opened): it holds `remaining` bytes from `now` if `hold`, else it
    /// begins lapsed (a begin beyond its user's allowance).
    pub(crate) fn promise(&mut self, id: FileId, remaining: u64, offset: u64, now: Instant, hold: bool) {
        self.remove(&id);
        self.uploads.insert(id, Promise { remaining, renewed_at: offset, until: None });
        if hold {
            self.hold_from(id, now);
        }
    }

    /// Upload `id` of `size` bytes has its bytes below `offset` durable: what it holds
    /// shrinks to the rest, and the promise is renewed if it stored
    /// `PROMISE_RENEW_BYTES` since the last renewal or its last bytes; a lapsed one only
    /// if `room` (given the bytes held by the others and the rest of this file) says the
    /// disk has room for the rest, else it stays lapsed and measures from here. An offset
    /// moved back (its partial file lost its tail) renews nothing and measures from
    /// there.
    pub(crate) fn advance(
        &mut self,
        id: FileId,
        size: u64,
        offset: u64,
        now: Instant,
        room: impl FnOnce(u64, u64) -> bool,
    ) {
        let offset = offset.min(size);
        let remaining = size - offset;
        // Lapses settled first: a promise whose hold ended is not renewed unchecked.
        let held = self.held(now);
        let Some(p) = self.uploads.get_mut(&id) else {
            let hold = room(held, remaining);
            self.promise(id, remaining, offset, now, hold);
            return;
        };
        let holding = p.until.is_some();
        if holding {
            self.held = self.held - p.remaining + remaining;
        }
        p.remaining = remaining;
        if offset < p.renewed_at {
            p.renewed_at = offset;
            return;
        }
        if offset - p.renewed_at < PROMISE_RENEW_BYTES && !(offset == size && offset > p.renewed_at) {
            return;
        }
        p.renewed_at = offset;
        if holding || room(self.held, remaining) {
            self.hold_from(id, now);
        }
    }

    /// Whether upload `id`'s promise holds at `now` (its writes are within its room).
    pub(crate) fn holds(&mut self, id: &FileId, now: Instant) -> bool {
        self.held(now);
        self.uploads.get(id).is_some_and(|p| p.until.is_some())
    }

    /// Upload `id` is no longer in progress.
    pub(crate) fn remove(&mut self, id: &FileId) {
        if let Some(p) = self.uploads.remove(id)
            && let Some(until) = p.until
        {
            self.deadlines.remove(&(until, *id));
            self.held -= p.remaining;
        }
    }

    /// Bytes promised at `now`: the promises whose hold ended lapse first.
    pub(crate) fn held(&mut self, now: Instant) -> u64 {
        while let Some(&(until, id)) = self.deadlines.first() {
            if until > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(p) = self.uploads.get_mut(&id) {
                p.until = None;
                self.held -= p.remaining;
            }
        }
        self.held
    }

    /// Holds `id`'s promise (it exists) until `hold` after `now`.
    fn hold_from(&mut self, id: FileId, now: Instant) {
        let until = now + self.hold;
        let p = self.uploads.get_mut(&id).expect("a promise to hold");
        match p.until.replace(until) {
            Some(before) => {
                self.deadlines.remove(&(before, id));
            }
            None => self.held += p.remaining,
        }
        self.deadlines.insert((until, id));
    }

    /// Uploads tracked (held or lapsed).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.uploads.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    /// A disk with room for anything.
    const ROOM: fn(u64, u64) -> bool = |_, _| true;

    fn id(n: u8) -> FileId {
        [n; 16]
    }

    #[test]
    fn a_promise_holds_for_its_hold_then_lapses_unless_its_upload_moves() {
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(60));
        p.promise(id(1), 100 * MIB, 0, t0, true);
        p.promise(id(2), 50 * MIB, 0, t0 + Duration::from_secs(30), true);
        assert_eq!(p.held(t0 + Duration::from_secs(59)), 150 * MIB);
        // The first never sent a byte: it lapses; the second still holds.
        assert_eq!(p.held(t0 + Duration::from_secs(60)), 50 * MIB);
        assert_eq!(p.held(t0 + Duration::from_secs(90)), 0, "both lapsed");
        assert_eq!(p.len(), 2, "lapsed, still tracked");
    }

    #[test]
    fn storing_a_few_bytes_now_and_then_does_not_keep_a_promise() {
        // The cheap way to hold the disk: one small chunk a minute.
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(60));
        p.promise(id(1), 100 * MIB, 0, t0, true);
        for minute in 1..4u64 {
            let now = t0 + Duration::from_secs(60 * minute - 1);
            p.advance(id(1), 100 * MIB, minute * MIB, now, ROOM);
        }
        assert_eq!(p.held(t0 + Duration::from_secs(60)), 0, "3 MiB in a minute renews nothing");
        // The fourth MiB since it began renews it, with the rest of the file.
        p.advance(id(1), 100 * MIB, 4 * MIB, t0 + Duration::from_secs(200), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(259)), 96 * MIB);
        assert_eq!(p.held(t0 + Duration::from_secs(260)), 0);
    }

    #[test]
    fn an_upload_that_moves_holds_what_it_still_needs() {
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(60));
        p.promise(id(1), 10 * MIB, 0, t0, true);
        p.advance(id(1), 10 * MIB, 2 * MIB, t0 + Duration::from_secs(50), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(50)), 8 * MIB, "shrinks as bytes land");
        p.advance(id(1), 10 * MIB, 5 * MIB, t0 + Duration::from_secs(55), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(114)), 5 * MIB, "5 MiB stored renewed it at 55 s");
        // A small file's (or a file's) last bytes renew it too: nothing is left to hold.
        p.promise(id(2), 100, 0, t0, true);
        p.advance(id(2), 100, 100, t0 + Duration::from_secs(1), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(114)), 5 * MIB);
        p.remove(&id(1));
        p.remove(&id(2));
        assert_eq!((p.held(t0), p.len()), (0, 0));
    }

    #[test]
    fn a_lapsed_promise_is_taken_again_by_the_bytes_that_renew_it() {
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(60));
        p.promise(id(1), 20 * MIB, 0, t0, true);
        assert_eq!(p.held(t0 + Duration::from_secs(600)), 0);
        // The client comes back ten minutes later and resumes.
        p.advance(id(1), 20 * MIB, MIB, t0 + Duration::from_secs(601), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(601)), 0, "not renewed by 1 MiB");
        p.advance(id(1), 20 * MIB, 4 * MIB, t0 + Duration::from_secs(602), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(602)), 16 * MIB);
        // Removed while held: nothing stays counted, and its deadline goes too.
        p.remove(&id(1));
        assert_eq!(p.held(t0 + Duration::from_secs(603)), 0);
        assert!(p.deadlines.is_empty());
    }

    #[test]
    fn an_offset_moved_back_renews_nothing_and_measures_from_there() {
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(60));
        p.promise(id(1), 20 * MIB, 0, t0, true);
        p.advance(id(1), 20 * MIB, 6 * MIB, t0 + Duration::from_secs(10), ROOM);
        // Its partial file lost its tail: back to 1 MiB, 19 MiB still to come.
        p.advance(id(1), 20 * MIB, MIB, t0 + Duration::from_secs(20), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(69)), 19 * MIB);
        p.advance(id(1), 20 * MIB, 4 * MIB, t0 + Duration::from_secs(69), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(70)), 0, "3 MiB since the rewind renews nothing");
        // Promised again from the start (a publish whose bytes were lost).
        p.promise(id(1), 20 * MIB, 0, t0 + Duration::from_secs(71), true);
        assert_eq!(p.held(t0 + Duration::from_secs(71)), 20 * MIB);
        assert_eq!(p.deadlines.len(), 1);
    }

    #[test]
    fn a_lapsed_promise_is_taken_again_only_if_the_rest_of_its_file_fits() {
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(60));
        p.promise(id(1), 20 * MIB, 0, t0, true);
        p.promise(id(2), 30 * MIB, 0, t0 + Duration::from_secs(61), true);
        assert!(!p.holds(&id(1), t0 + Duration::from_secs(61)) && p.holds(&id(2), t0 + Duration::from_secs(61)));
        // A disk with 40 MiB spare: 30 held by `2`, so 16 more do not fit.
        let room = |held: u64, rest: u64| 40 * MIB - held >= rest;
        p.advance(id(1), 20 * MIB, 4 * MIB, t0 + Duration::from_secs(62), room);
        assert_eq!(p.held(t0 + Duration::from_secs(62)), 30 * MIB, "stays lapsed: its rest does not fit");
        assert!(!p.holds(&id(1), t0 + Duration::from_secs(62)));
        // Measured from there: 4 MiB more, and `2` gone, and it fits.
        p.remove(&id(2));
        p.advance(id(1), 20 * MIB, 6 * MIB, t0 + Duration::from_secs(63), room);
        assert!(!p.holds(&id(1), t0 + Duration::from_secs(63)), "2 MiB since the refused renewal");
        p.advance(id(1), 20 * MIB, 8 * MIB, t0 + Duration::from_secs(64), room);
        assert_eq!(p.held(t0 + Duration::from_secs(64)), 12 * MIB);
        // A holding promise is renewed whatever the room (it holds it already)...
        p.advance(id(1), 20 * MIB, 12 * MIB, t0 + Duration::from_secs(100), |_, _| false);
        assert!(p.holds(&id(1), t0 + Duration::from_secs(159)), "renewed at 100 s");
        // ...but not one whose hold ended by the time of its renewal.
        p.advance(id(1), 20 * MIB, 16 * MIB, t0 + Duration::from_secs(164), |_, _| false);
        assert!(!p.holds(&id(1), t0 + Duration::from_secs(164)));
    }

    #[test]
    fn a_begin_beyond_its_allowance_holds_nothing_until_it_moves() {
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(60));
        p.promise(id(1), 100 * MIB, 0, t0, false);
        assert_eq!(p.held(t0), 0);
        p.advance(id(1), 100 * MIB, 4 * MIB, t0 + Duration::from_secs(1), ROOM);
        assert_eq!(p.held(t0 + Duration::from_secs(1)), 96 * MIB);
    }

    #[test]
    fn a_hold_of_any_length_is_taken_without_overflow() {
        let t0 = Instant::now();
        let mut p = Promises::new(Duration::from_secs(u64::MAX));
        p.promise(id(1), MIB, 0, t0, true);
        assert_eq!(p.held(t0 + Duration::from_secs(365 * 24 * 3600)), MIB);
    }
}
