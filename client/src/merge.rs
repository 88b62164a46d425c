//! The merge of live entries and catch-up pages into one gap-free, duplicate-free
//! sequence per conversation (PROTOCOL.md section 11). Pure state, no I/O and no clock:
//! the session task feeds it what arrives and performs what it asks for, so every
//! interleaving is tested here without a broker.
//!
//! Per conversation it keeps a *cursor* (the highest seq handed to the application with
//! no gap below it) and the highest seq *known* to exist (from `ConversationStates`,
//! catch-up pages, live entries beyond a gap and acks of this device's own writes, which
//! the broker never pushes back to the sending connection). An entry is handed on only
//! when its seq is `cursor + 1`; one at or below the cursor is a duplicate and dropped;
//! one beyond a gap is held, boundedly, until catch-up fills the gap. Whenever a
//! conversation's cursor is below its known seq, and nothing held can close the gap, the
//! merge asks for a catch-up page after the cursor.

use std::collections::BTreeMap;

use switchboard_protocol::limits::CATCH_UP_PAGE_MAX;

use crate::cursors::LeftCursors;
use switchboard_protocol::{CatchUpPage, ConvId, Entry, Seq};

/// The merge state of all my conversations.
///
/// Bounds: one `Track` per conversation this device has seen (a few dozen bytes each,
/// bounded by the conversations the user belongs to, whose creation the broker
/// rate-limits), and at most `max_held` entries held beyond gaps in all (plus, while the
/// application's queue is full, the one entry after each cursor). When the held entries
/// are at the bound, a further entry beyond a gap is dropped: its seq stays *known*, so
/// catch-up fetches it again.
#[derive(Debug)]
pub struct Merge {
    convs: BTreeMap<ConvId, Track>,
    /// Cursors of conversations this user left or was removed from, oldest first, at
    /// most `LEFT_CURSORS_MAX`: one added back resumes at its cursor (PROTOCOL.md: a
    /// member added back reads the whole history), not at its start.
    left: LeftCursors,
    held: usize,
    max_held: usize,
}

/// One conversation's merge state.
#[derive(Debug, Default)]
struct Track {
    /// Highest seq handed on with no gap below it.
    cursor: Seq,
    /// Highest seq known to exist.
    known: Seq,
    /// Entries beyond the cursor, waiting for the gap below them to close.
    held: BTreeMap<Seq, Entry>,
    /// A catch-up page for this conversation is outstanding.
    fetching: bool,
    /// Catch-up failed on this connection, or a page brought nothing new: asked again
    /// only after `unstall` (a backoff later) or the next connect.
    stalled: bool,
    /// Not listed by `ConversationStates`: one page is asked for, even with nothing
    /// known beyond the cursor, to learn whether this user is still a member
    /// (`probe`).
    probe: bool,
}

/// A catch-up page to ask for: `CatchUp { conv, after, limit }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// Conversation.
    pub conv: ConvId,
    /// The cursor: the page starts at `after + 1`.
    pub after: Seq,
    /// At most this many entries (1..=`CATCH_UP_PAGE_MAX`).
    pub limit: u16,
}

impl Merge {
    /// A merge resuming from saved cursors (`(conv, seq)`: everything up to `seq` was
    /// handed on before), holding at most `max_held` entries beyond gaps.
    pub fn new(cursors: impl IntoIterator<Item = (ConvId, Seq)>, max_held: usize) -> Merge {
        let convs =
            cursors.into_iter().map(|(conv, cursor)| (conv, Track { cursor, known: cursor, ..Track::default() }));
        Merge { convs: convs.collect(), left: LeftCursors::default(), held: 0, max_held }
    }

    /// Also keeps `left` (`(conv, cursor)` of conversations left, oldest first; the
    /// newest `LEFT_CURSORS_MAX` are kept): a conversation among them that comes back
    /// (listed, paged or live: the user was added back) resumes at its cursor.
    pub fn with_left(mut self, left: impl IntoIterator<Item = (ConvId, Seq)>) -> Merge {
        for (conv, cursor) in left {
            if !self.convs.contains_key(&conv) {
                self.left.keep(conv, cursor);
            }
        }
        self.left.trim();
        self
    }

    /// Each conversation's cursor, ascending by conversation.
    pub fn cursors(&self) -> impl Iterator<Item = (ConvId, Seq)> + '_ {
        self.convs.iter().map(|(&conv, t)| (conv, t.cursor))
    }

    /// The cursor of `conv` (0: nothing handed on).
    pub fn cursor(&self, conv: ConvId) -> Seq {
        self.convs.get(&conv).map_or(0, |t| t.cursor)
    }

    /// The newest seq known of `conv` (0 if untracked).
    pub fn known_seq(&self, conv: ConvId) -> Seq {
        self.convs.get(&conv).map_or(0, |t| t.known)
    }

    /// Entries held beyond gaps, in all conversations.
    pub fn held(&self) -> usize {
        self.held
    }

    /// `conv` has entries up to `last_seq` (from `ConversationStates` after a connect).
    pub fn known(&mut self, conv: ConvId, last_seq: Seq) {
        let t = track(&mut self.convs, &mut self.left, conv);
        t.known = t.known.max(last_seq);
    }

    /// `conv` was tracked but `ConversationStates` did not list it: this user left it
    /// or was removed while away, or joined it after the states were read. One page is
    /// asked for to tell which (the broker answers a former member `FORBIDDEN`: the
    /// session then calls `forget`). Untracked conversations are not probed.
    pub fn probe(&mut self, conv: ConvId) {
        if let Some(t) = self.convs.get_mut(&conv) {
            t.probe = true;
        }
    }

    /// Stops tracking `conv` (this user is no longer a member): its held entries go,
    /// its cursor is kept among the left ones (the oldest one goes past
    /// `LEFT_CURSORS_MAX`).
    pub fn forget(&mut self, conv: ConvId) {
        if let Some(t) = self.convs.remove(&conv) {
            self.held -= t.held.len();
            self.left.keep(conv, t.cursor);
            self.left.trim();
        }
    }

    /// Whether this user left `conv` (or was removed) as far as the merge has seen, and
    /// was not added back since.
    pub fn has_left(&self, conv: ConvId) -> bool {
        !self.convs.contains_key(&conv) && self.left.contains(conv)
    }

    /// The cursors kept of conversations left, oldest first.
    pub fn left(&self) -> impl Iterator<Item = (ConvId, Seq)> + '_ {
        self.left.iter()
    }

    /// This device's own write to `conv` was acknowledged at `seq`: the broker does not
    /// push it to this connection, so it is fetched by catch-up.
    pub fn appended(&mut self, conv: ConvId, seq: Seq) {
        self.known(conv, seq);
    }

    /// A live entry arrived. Returns what may be handed on now, in order: at most
    /// `room` entries.
    pub fn live(&mut self, entry: Entry, room: usize) -> Vec<Entry> {
        let conv = entry.conv;
        self.insert(entry);
        let mut out = Vec::new();
        self.drain(conv, room, &mut out);
        out
    }

    /// A catch-up page arrived (the answer to a `Fetch`). Returns what may be handed on
    /// now, in order: at most `room` entries. Entries of the page that do not fit are
    /// held while the bound allows and fetched again otherwise.
    ///
    /// A page with no entry right after the cursor while more is known to exist (a broken
    /// or hostile broker's, or one that lost entries it had shown) stalls the conversation
    /// as a failed fetch does (`fetch_failed`): asked again only after `unstall`. Before,
    /// it was asked again at once, a request per round trip for as long as the broker
    /// answered so.
    pub fn page(&mut self, page: CatchUpPage, room: usize) -> Vec<Entry> {
        let conv = page.conv;
        let t = track(&mut self.convs, &mut self.left, conv);
        t.fetching = false;
        t.probe = false;
        t.known = t.known.max(page.last_seq);
        let cursor = t.cursor;
        // A page that does not start right after the cursor (a broken broker's, or a
        // log with a hole) moves nothing either: held entries beyond a gap that the next
        // page would not fill. Stalled the same way (before, it was asked again at once,
        // every round trip, for as long as the broker answered so: a review).
        if !page.entries.iter().any(|e| e.conv == conv && e.seq == cursor + 1) && t.cursor < t.known {
            let closable = t.held.first_key_value().is_some_and(|(&s, _)| s == t.cursor + 1);
            t.stalled = !closable;
        }
        let mut out = Vec::new();
        for entry in page.entries {
            if entry.conv != conv {
                continue;
            }
            self.insert(entry);
            self.drain(conv, room - out.len().min(room), &mut out);
        }
        out
    }

    /// The catch-up of `conv` failed (the request was refused or its connection
    /// dropped). It is asked for again after `unstall` (the session calls it a backoff
    /// later) or the next connect.
    pub fn fetch_failed(&mut self, conv: ConvId) {
        if let Some(t) = self.convs.get_mut(&conv) {
            t.fetching = false;
            t.stalled = true;
        }
    }

    /// Whether `conv`'s catch-up is stalled (failed, or a page brought nothing new)
    /// until `unstall`.
    pub fn is_stalled(&self, conv: ConvId) -> bool {
        self.convs.get(&conv).is_some_and(|t| t.stalled)
    }

    /// Conversations whose catch-up failed may be fetched again (`fetches`).
    pub fn unstall(&mut self) {
        for t in self.convs.values_mut() {
            t.stalled = false;
        }
    }

    /// The connection dropped: outstanding pages will never come. Held entries stay
    /// (they are real entries; catch-up fills the gaps below them after the reconnect).
    pub fn disconnected(&mut self) {
        for t in self.convs.values_mut() {
            t.fetching = false;
            t.stalled = false;
            t.probe = false;
        }
    }

    /// The pages to ask for now: conversations whose cursor is below their known seq,
    /// with no page outstanding and no held entry that closes the gap, ascending by
    /// conversation, so that at most `max_fetching` pages are outstanding and the
    /// limits add up to at most `room` (what the application's queue can take).
    pub fn fetches(&mut self, max_fetching: usize, room: usize) -> Vec<Fetch> {
        let mut outstanding = self.convs.values().filter(|t| t.fetching).count();
        let mut room = room;
        let mut out = Vec::new();
        for (&conv, t) in &mut self.convs {
            if outstanding >= max_fetching || room == 0 {
                break;
            }
            let closable = t.held.first_key_value().is_some_and(|(&s, _)| s == t.cursor + 1);
            if t.fetching || t.stalled || (t.cursor >= t.known && !t.probe) || closable {
                continue;
            }
            let wanted = usize::try_from(t.known.saturating_sub(t.cursor)).unwrap_or(usize::MAX).max(1);
            let limit = wanted.min(room).min(CATCH_UP_PAGE_MAX as usize);
            let limit = u16::try_from(limit).unwrap_or(u16::MAX);
            t.fetching = true;
            outstanding += 1;
            room -= usize::from(limit);
            out.push(Fetch { conv, after: t.cursor, limit });
        }
        out
    }

    /// Hands on what is held and now contiguous, when the application's queue has
    /// `room` again after being full. Ascending by conversation.
    pub fn release(&mut self, room: usize) -> Vec<Entry> {
        let convs: Vec<ConvId> = self
            .convs
            .iter()
            .filter(|(_, t)| t.held.first_key_value().is_some_and(|(&s, _)| s == t.cursor + 1))
            .map(|(&c, _)| c)
            .collect();
        let mut out = Vec::new();
        for conv in convs {
            self.drain(conv, room - out.len().min(room), &mut out);
        }
        out
    }

    /// Nothing is outstanding and nothing more can be fetched on this connection: every
    /// conversation is at its known seq, or stalled.
    pub fn caught_up(&self) -> bool {
        self.convs.values().all(|t| !t.fetching && ((t.cursor >= t.known && !t.probe) || t.stalled))
    }

    /// Places `entry`: dropped at or below the cursor or when already held, held
    /// beyond it while the bound allows; its seq becomes known either way. The entry
    /// right after the cursor is always taken (else a full buffer could never drain),
    /// so at most one per conversation is held past the bound, and only while the
    /// application's queue is full.
    fn insert(&mut self, entry: Entry) {
        // A left conversation comes back with the entry adding the user (or when a
        // connect lists it again); any other entry of it came after its `Left` (the
        // removal, pushed live, overtaken by the refused page that told of it) and is
        // stale: kept, it would revive the conversation and be shown after `Left`.
        if !self.convs.contains_key(&entry.conv)
            && self.left.contains(entry.conv)
            && !matches!(entry.body, switchboard_protocol::Body::MembersAdded { .. })
        {
            return;
        }
        let t = track(&mut self.convs, &mut self.left, entry.conv);
        t.known = t.known.max(entry.seq);
        let next = entry.seq == t.cursor + 1;
        if entry.seq <= t.cursor || t.held.contains_key(&entry.seq) || (self.held >= self.max_held && !next) {
            return;
        }
        t.held.insert(entry.seq, entry);
        self.held += 1;
    }

    /// Moves the contiguous prefix of `conv`'s held entries into `out`, at most `room`.
    fn drain(&mut self, conv: ConvId, room: usize, out: &mut Vec<Entry>) {
        let Some(t) = self.convs.get_mut(&conv) else { return };
        let mut taken = 0;
        while taken < room {
            let Some(entry) = t.held.first_entry().filter(|e| *e.key() == t.cursor + 1).map(|e| e.remove()) else {
                break;
            };
            t.cursor = entry.seq;
            self.held -= 1;
            taken += 1;
            out.push(entry);
        }
    }
}

/// `conv`'s track, made at the cursor kept when it was left (the user was added back),
/// or at nothing.
fn track<'a>(convs: &'a mut BTreeMap<ConvId, Track>, left: &mut LeftCursors, conv: ConvId) -> &'a mut Track {
    convs.entry(conv).or_insert_with(|| {
        let cursor = left.take(conv);
        Track { cursor, known: cursor, ..Track::default() }
    })
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::{Body, Receipt};

    use super::*;

    const ROOM: usize = usize::MAX;

    fn e(conv: ConvId, seq: Seq) -> Entry {
        Entry {
            conv,
            seq,
            sender: 2,
            sender_device: 5,
            client_id: [seq as u8; 16],
            at_ms: 1_700_000_000_000 + seq,
            body: Body::Text { text: format!("{conv}/{seq}"), edited: false },
        }
    }

    /// The entry adding user 1 to `conv`, at `seq`.
    fn added(conv: ConvId, seq: Seq) -> Entry {
        Entry { body: Body::MembersAdded { members: vec![(1, switchboard_protocol::Role::Member)] }, ..e(conv, seq) }
    }

    fn page(conv: ConvId, seqs: std::ops::RangeInclusive<Seq>, last_seq: Seq) -> CatchUpPage {
        let complete = seqs.is_empty() || *seqs.end() == last_seq;
        let receipts = if complete {
            vec![Receipt { conv, user: 2, delivered_up_to: last_seq, read_up_to: None }]
        } else {
            Vec::new()
        };
        CatchUpPage { conv, entries: seqs.map(|s| e(conv, s)).collect(), last_seq, complete, receipts }
    }

    fn seqs(entries: &[Entry]) -> Vec<(ConvId, Seq)> {
        entries.iter().map(|e| (e.conv, e.seq)).collect()
    }

    fn fetch(conv: ConvId, after: Seq, limit: u16) -> Fetch {
        Fetch { conv, after, limit }
    }

    #[test]
    fn a_page_with_nothing_new_is_asked_again_only_after_a_backoff() {
        let mut m = Merge::new([(7, 3)], 100);
        m.known(7, 10);
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 7)]);
        // Nothing beyond the cursor, though 10 exists: not asked again at once (before:
        // the same page asked again on every answer).
        let empty = CatchUpPage { conv: 7, entries: Vec::new(), last_seq: 10, complete: false, receipts: Vec::new() };
        assert!(m.page(empty, ROOM).is_empty());
        assert!(m.is_stalled(7));
        assert!(m.fetches(4, ROOM).is_empty());
        // Only entries at or below the cursor: the same.
        m.unstall();
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 7)]);
        assert!(m.page(page(7, 2..=3, 10), ROOM).is_empty());
        assert!(m.fetches(4, ROOM).is_empty());
        // Entries beyond the cursor but not right after it: the same (they are held).
        m.unstall();
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 7)]);
        assert!(m.page(page(7, 5..=6, 10), ROOM).is_empty());
        assert!(m.is_stalled(7));
        assert!(m.fetches(4, ROOM).is_empty());
        // A backoff later the page comes whole.
        m.unstall();
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 7)]);
        assert_eq!(m.page(page(7, 4..=10, 10), ROOM).len(), 7);
        assert!(!m.is_stalled(7) && m.caught_up());
        // An entry held beyond the gap that the page closes is no stall.
        let mut m = Merge::new([(8, 3)], 100);
        assert!(m.live(e(8, 5), ROOM).is_empty());
        assert_eq!(m.fetches(4, ROOM), [fetch(8, 3, 2)]);
        assert_eq!(seqs(&m.page(page(8, 4..=4, 5), ROOM)), [(8, 4), (8, 5)]);
        assert!(!m.is_stalled(8));
    }

    #[test]
    fn a_conversation_not_listed_is_probed_once_and_forgotten_when_refused() {
        let mut m = Merge::new([(7, 3), (8, 5)], 100);
        m.known(8, 5);
        m.probe(7);
        m.probe(9);
        assert!(!m.caught_up(), "the probe is outstanding");
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 1)], "one page, of the tracked conversation only");
        // Still a member (joined after the states were read): the page ends the probe.
        let nothing_new =
            CatchUpPage { conv: 7, entries: Vec::new(), last_seq: 3, complete: true, receipts: Vec::new() };
        assert!(m.page(nothing_new, ROOM).is_empty());
        assert!(m.caught_up());
        assert!(m.fetches(4, ROOM).is_empty());
        // A member no more: forgotten, with what it held beyond a gap.
        assert!(m.live(e(7, 9), ROOM).is_empty());
        assert_eq!(m.held(), 1);
        m.forget(7);
        assert_eq!(m.held(), 0);
        assert_eq!(m.cursors().collect::<Vec<_>>(), [(8, 5)]);
        assert!(m.caught_up());
    }

    #[test]
    fn a_conversation_joined_again_resumes_at_the_cursor_it_was_left_at() {
        let mut m = Merge::new([(7, 3), (8, 5)], 100).with_left([(9, 4), (8, 1)]);
        assert_eq!(m.left().collect::<Vec<_>>(), [(9, 4)], "one tracked is not left");
        assert!(!m.has_left(7));
        m.forget(7);
        assert_eq!(m.left().collect::<Vec<_>>(), [(9, 4), (7, 3)]);
        assert!(m.has_left(7) && m.has_left(9) && !m.has_left(8), "what typing starts are dropped for");
        assert!(m.fetches(4, ROOM).is_empty(), "left ones are not probed");
        // Added back to 7 live: the entry adding the user is beyond a gap from the
        // kept cursor, and the gap is fetched from there, not from the start.
        assert!(m.live(added(7, 12), ROOM).is_empty());
        assert!(!m.has_left(7), "added back");
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 9)]);
        assert_eq!(seqs(&m.page(page(7, 4..=11, 12), ROOM)), (4..=12).map(|s| (7, s)).collect::<Vec<_>>());
        // Added back to 9 while away: listed again after a connect.
        m.known(9, 6);
        assert_eq!(m.fetches(4, ROOM), [fetch(9, 4, 2)]);
        assert_eq!(m.left().count(), 0);
        // Bounded: the oldest left go first.
        let mut m = Merge::new([], 100);
        for conv in 1..=crate::LEFT_CURSORS_MAX as u64 + 2 {
            m.known(conv, 1);
            assert_eq!(seqs(&m.live(e(conv, 1), ROOM)), [(conv, 1)]);
            m.forget(conv);
        }
        assert_eq!(m.left().count(), crate::LEFT_CURSORS_MAX);
        assert_eq!(m.left().next(), Some((3, 1)));
        // An entry of a left conversation that comes after its `Left` (the removal,
        // pushed live, overtaken by the refused page) is stale: it revives nothing. The
        // entry adding the user back does.
        let mut m = Merge::new([(7, 3)], 100);
        m.forget(7);
        assert!(m.live(e(7, 4), ROOM).is_empty());
        assert!(m.cursors().next().is_none() && m.fetches(4, ROOM).is_empty(), "not tracked again");
        assert!(m.live(added(7, 9), ROOM).is_empty());
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 6)]);
    }

    #[test]
    fn live_in_order_is_handed_on_and_duplicates_are_dropped() {
        let mut m = Merge::new([(7, 3)], 100);
        assert_eq!(seqs(&m.live(e(7, 4), ROOM)), [(7, 4)]);
        assert_eq!(seqs(&m.live(e(7, 4), ROOM)), []);
        assert_eq!(seqs(&m.live(e(7, 2), ROOM)), [], "below the saved cursor");
        assert_eq!(seqs(&m.live(e(7, 5), ROOM)), [(7, 5)]);
        assert_eq!(m.cursor(7), 5);
        assert!(m.fetches(4, ROOM).is_empty());
        assert!(m.caught_up());
    }

    #[test]
    fn an_entry_beyond_a_gap_is_held_until_catch_up_fills_it() {
        let mut m = Merge::new([(7, 3)], 100);
        assert_eq!(seqs(&m.live(e(7, 6), ROOM)), []);
        assert_eq!(m.held(), 1);
        assert!(!m.caught_up());
        assert_eq!(m.fetches(4, ROOM), [fetch(7, 3, 3)]);
        assert!(m.fetches(4, ROOM).is_empty(), "one page per conversation at a time");
        // The page overlaps the held entry: each seq once, in order.
        assert_eq!(seqs(&m.page(page(7, 4..=6, 6), ROOM)), [(7, 4), (7, 5), (7, 6)]);
        assert_eq!(m.held(), 0);
        assert!(m.caught_up());
    }

    #[test]
    fn live_entries_during_a_page_merge_without_gap_or_duplicate() {
        // Reconnected at cursor 10; the broker has 20; live 21 and 22 come before the page.
        let mut m = Merge::new([(1, 10)], 100);
        m.known(1, 20);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 10, 10)]);
        assert!(m.live(e(1, 21), ROOM).is_empty());
        assert!(m.live(e(1, 22), ROOM).is_empty());
        let got = m.page(page(1, 11..=20, 20), ROOM);
        assert_eq!(seqs(&got), (11..=22).map(|s| (1, s)).collect::<Vec<_>>());
        // Live 23 after, and a late duplicate of 21.
        assert_eq!(seqs(&m.live(e(1, 23), ROOM)), [(1, 23)]);
        assert!(m.live(e(1, 21), ROOM).is_empty());
        assert!(m.caught_up());
    }

    #[test]
    fn a_page_read_after_live_entries_overlaps_them() {
        // Live 11..=13 arrive and are handed on; the page read later repeats them.
        let mut m = Merge::new([(1, 10)], 100);
        m.known(1, 10);
        assert_eq!(seqs(&m.live(e(1, 11), ROOM)), [(1, 11)]);
        m.known(1, 15);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 11, 4)]);
        assert_eq!(seqs(&m.live(e(1, 12), ROOM)), [(1, 12)]);
        assert_eq!(seqs(&m.live(e(1, 13), ROOM)), [(1, 13)]);
        let got = m.page(page(1, 12..=16, 16), ROOM);
        assert_eq!(seqs(&got), [(1, 14), (1, 15), (1, 16)]);
        assert!(m.caught_up());
    }

    #[test]
    fn incomplete_pages_are_followed_until_the_known_seq() {
        let mut m = Merge::new([], 100);
        m.known(3, 2500);
        assert_eq!(m.fetches(4, ROOM), [fetch(3, 0, 1000)]);
        assert_eq!(m.page(page(3, 1..=1000, 2500), ROOM).len(), 1000);
        assert_eq!(m.fetches(4, ROOM), [fetch(3, 1000, 1000)]);
        assert_eq!(m.page(page(3, 1001..=2000, 2500), ROOM).len(), 1000);
        assert_eq!(m.fetches(4, ROOM), [fetch(3, 2000, 500)]);
        // Meanwhile more was written: the page's last_seq raises what is known.
        assert_eq!(m.page(page(3, 2001..=2500, 2600), ROOM).len(), 500);
        assert_eq!(m.fetches(4, ROOM), [fetch(3, 2500, 100)]);
        assert_eq!(m.page(page(3, 2501..=2600, 2600), ROOM).len(), 100);
        assert_eq!(m.cursor(3), 2600);
        assert!(m.caught_up());
    }

    #[test]
    fn reconnect_mid_catch_up_resumes_from_the_cursor() {
        let mut m = Merge::new([(1, 0)], 100);
        m.known(1, 30);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 0, 30)]);
        assert_eq!(m.page(page(1, 1..=10, 30), ROOM).len(), 10);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 10, 20)]);
        // Live 31 arrives beyond the gap, then the connection drops before the page.
        assert!(m.live(e(1, 31), ROOM).is_empty());
        m.disconnected();
        assert!(!m.caught_up());
        // The page of the old connection never comes; after the connect the states say 33.
        m.known(1, 33);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 10, 23)]);
        // A late page of the old connection would repeat 11..; the new one overlaps held 31.
        let got = m.page(page(1, 11..=33, 33), ROOM);
        assert_eq!(seqs(&got), (11..=33).map(|s| (1, s)).collect::<Vec<_>>());
        assert_eq!(m.held(), 0);
        assert!(m.caught_up());
    }

    #[test]
    fn a_page_of_the_old_connection_arriving_after_the_reconnect_is_harmless() {
        let mut m = Merge::new([(1, 5)], 100);
        m.known(1, 20);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 5, 15)]);
        m.disconnected();
        m.known(1, 20);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 5, 15)]);
        // Both answers arrive (the old one late): each seq is handed on once.
        assert_eq!(m.page(page(1, 6..=20, 20), ROOM).len(), 15);
        assert!(m.page(page(1, 6..=20, 20), ROOM).is_empty());
        assert_eq!(m.cursor(1), 20);
        assert!(m.caught_up());
    }

    #[test]
    fn own_writes_are_fetched_since_the_broker_does_not_push_them_back() {
        let mut m = Merge::new([(4, 9)], 100);
        m.appended(4, 10);
        assert_eq!(m.fetches(4, ROOM), [fetch(4, 9, 1)]);
        // Someone else's 11 arrives live before the page: held, then released in order.
        assert!(m.live(e(4, 11), ROOM).is_empty());
        assert_eq!(seqs(&m.page(page(4, 10..=10, 10), ROOM)), [(4, 10), (4, 11)]);
        assert!(m.caught_up());
    }

    #[test]
    fn held_entries_are_bounded_and_dropped_ones_are_fetched_again() {
        let mut m = Merge::new([(1, 0), (2, 0)], 3);
        for s in 2..=5 {
            assert!(m.live(e(1, s), ROOM).is_empty());
        }
        assert_eq!(m.held(), 3, "seq 5 was dropped at the bound");
        assert!(m.live(e(2, 9), ROOM).is_empty());
        assert_eq!(m.held(), 3);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 0, 5), fetch(2, 0, 9)]);
        // The page brings 1; 2..=4 are held; 5 comes from the page though it was dropped.
        assert_eq!(seqs(&m.page(page(1, 1..=5, 5), ROOM)), (1..=5).map(|s| (1, s)).collect::<Vec<_>>());
        assert_eq!(m.page(page(2, 1..=9, 9), ROOM).len(), 9);
        assert_eq!(m.held(), 0);
        assert!(m.caught_up());
    }

    #[test]
    fn a_full_application_queue_holds_or_refetches_and_loses_nothing() {
        let mut m = Merge::new([(1, 0)], 4);
        m.known(1, 10);
        assert_eq!(m.fetches(4, 3), [fetch(1, 0, 3)], "a page no larger than the room");
        // The broker answers with more than the room (as if the room shrank meanwhile).
        let got = m.page(page(1, 1..=10, 10), 3);
        assert_eq!(seqs(&got), [(1, 1), (1, 2), (1, 3)]);
        assert_eq!(m.held(), 4, "4..=7 held, 8..=10 dropped");
        // No page while held entries can close the gap; release them as room comes.
        assert!(m.fetches(4, ROOM).is_empty());
        assert_eq!(seqs(&m.release(2)), [(1, 4), (1, 5)]);
        assert_eq!(seqs(&m.release(ROOM)), [(1, 6), (1, 7)]);
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 7, 3)]);
        assert_eq!(seqs(&m.page(page(1, 8..=10, 10), ROOM)), [(1, 8), (1, 9), (1, 10)]);
        // A live entry with no room is held, not lost.
        assert!(m.live(e(1, 11), 0).is_empty());
        assert_eq!(seqs(&m.release(1)), [(1, 11)]);
        assert!(m.caught_up());
    }

    #[test]
    fn fetches_are_bounded_in_number_and_by_room() {
        let mut m = Merge::new([], 100);
        for conv in 1..=6 {
            m.known(conv, 600);
        }
        let first = m.fetches(2, ROOM);
        assert_eq!(first, [fetch(1, 0, 600), fetch(2, 0, 600)]);
        assert!(m.fetches(2, ROOM).is_empty());
        m.page(page(1, 1..=600, 600), ROOM);
        assert_eq!(m.fetches(2, 700), [fetch(3, 0, 600)]);
        m.page(page(2, 1..=600, 600), ROOM);
        assert_eq!(m.fetches(3, 700), [fetch(4, 0, 600), fetch(5, 0, 100)]);
        assert!(m.fetches(10, 0).is_empty());
    }

    /// A failed page stalls its conversation until the session's retry (`unstall`, a
    /// backoff later on the same connection; before, nothing asked again until the next
    /// connection, however long the link stayed up) or the next connect.
    #[test]
    fn a_failed_fetch_stalls_that_conversation_until_it_is_retried_or_reconnected() {
        let mut m = Merge::new([(1, 0), (2, 0)], 100);
        m.known(1, 5);
        m.known(2, 5);
        assert_eq!(m.fetches(4, ROOM).len(), 2);
        m.fetch_failed(1);
        assert!(m.fetches(4, ROOM).is_empty(), "not asked again at once");
        m.page(page(2, 1..=5, 5), ROOM);
        assert!(m.caught_up(), "nothing more to fetch until the retry");
        m.unstall();
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 0, 5)], "asked again on the same connection");
        m.fetch_failed(1);
        m.disconnected();
        assert_eq!(m.fetches(4, ROOM), [fetch(1, 0, 5)]);
    }

    #[test]
    fn entries_of_another_conversation_in_a_page_are_ignored() {
        let mut m = Merge::new([(1, 0)], 100);
        m.known(1, 2);
        m.fetches(4, ROOM);
        let mut p = page(1, 1..=2, 2);
        p.entries.insert(1, e(9, 1));
        assert_eq!(seqs(&m.page(p, ROOM)), [(1, 1), (1, 2)]);
        assert_eq!(m.cursor(9), 0);
    }

    /// Every interleaving of a reconnect's inputs gives the same output: each seq once,
    /// in order. Inputs: two live entries (one duplicated), a page (split in two), a
    /// stale page of an older connection, and a disconnect, in every order the
    /// connection allows.
    #[test]
    fn every_interleaving_hands_on_each_seq_once_in_order() {
        #[derive(Clone, Copy, Debug)]
        enum Step {
            Live(Seq),
            Page(Seq, Seq, Seq),
            Drop,
        }
        let steps =
            [Step::Live(9), Step::Live(10), Step::Live(9), Step::Page(1, 5, 10), Step::Page(4, 8, 10), Step::Drop];
        let mut order: Vec<usize> = (0..steps.len()).collect();
        let mut count = 0;
        permute(&mut order, 0, &mut |order| {
            count += 1;
            let mut m = Merge::new([(1, 0)], 100);
            m.known(1, 10);
            let mut out = Vec::new();
            for &i in order {
                match steps[i] {
                    Step::Live(s) => out.extend(m.live(e(1, s), ROOM)),
                    Step::Page(from, to, last) => out.extend(m.page(page(1, from..=to, last), ROOM)),
                    Step::Drop => m.disconnected(),
                }
            }
            // Whatever is missing now is fetched: simulate the broker answering fully.
            while let Some(f) = m.fetches(4, ROOM).first().copied() {
                let to = (f.after + Seq::from(f.limit)).min(10);
                out.extend(m.page(page(1, f.after + 1..=to, 10), ROOM));
            }
            assert_eq!(seqs(&out), (1..=10).map(|s| (1, s)).collect::<Vec<_>>(), "order {order:?}");
            assert_eq!(m.held(), 0);
            assert!(m.caught_up());
        });
        assert_eq!(count, 720);
    }

    fn permute(items: &mut Vec<usize>, k: usize, f: &mut impl FnMut(&[usize])) {
        if k == items.len() {
            f(items);
            return;
        }
        for i in k..items.len() {
            items.swap(k, i);
            permute(items, k + 1, f);
            items.swap(k, i);
        }
    }

    /// A long pseudo-random run over several conversations: live entries arriving in
    /// order per conversation but with the device dropping some (disconnects), pages
    /// answered late and partially, a small held bound and a small queue. The output
    /// is each conversation's seqs once, in order.
    #[test]
    fn random_runs_stay_gap_free() {
        for seed in 1..=200u64 {
            let mut rng = seed;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let convs = 3u64;
            let mut m = Merge::new([], 8);
            let mut written = vec![0u64; convs as usize];
            let mut out: Vec<Vec<Seq>> = vec![Vec::new(); convs as usize];
            let mut outstanding: Vec<Fetch> = Vec::new();
            let mut connected = true;
            for _ in 0..400 {
                match next(6) {
                    0 | 1 => {
                        // A write; live to the device only while connected.
                        let c = next(convs);
                        written[c as usize] += 1;
                        if connected {
                            let room = next(4) as usize;
                            for x in m.live(e(c, written[c as usize]), room) {
                                out[x.conv as usize].push(x.seq);
                            }
                        }
                    }
                    2 if connected && !outstanding.is_empty() => {
                        let f = outstanding.remove(next(outstanding.len() as u64) as usize);
                        let last = written[f.conv as usize];
                        let to = (f.after + Seq::from(f.limit)).min(last);
                        let room = next(20) as usize;
                        for x in m.page(page(f.conv, f.after + 1..=to, last), room) {
                            out[x.conv as usize].push(x.seq);
                        }
                    }
                    3 if connected => {
                        connected = false;
                        outstanding.clear();
                        m.disconnected();
                    }
                    4 if !connected => {
                        connected = true;
                        for c in 0..convs {
                            m.known(c, written[c as usize]);
                        }
                    }
                    _ if connected => {
                        for x in m.release(next(5) as usize) {
                            out[x.conv as usize].push(x.seq);
                        }
                        outstanding.extend(m.fetches(2, next(50) as usize));
                    }
                    _ => {}
                }
            }
            if !connected {
                m.disconnected();
                for c in 0..convs {
                    m.known(c, written[c as usize]);
                }
            }
            outstanding.clear();
            m.disconnected();
            for x in m.release(ROOM) {
                out[x.conv as usize].push(x.seq);
            }
            loop {
                let fetches = m.fetches(4, ROOM);
                if fetches.is_empty() {
                    break;
                }
                for f in fetches {
                    let last = written[f.conv as usize];
                    let to = (f.after + Seq::from(f.limit)).min(last);
                    for x in m.page(page(f.conv, f.after + 1..=to, last), ROOM) {
                        out[x.conv as usize].push(x.seq);
                    }
                }
            }
            for c in 0..convs as usize {
                assert_eq!(out[c], (1..=written[c]).collect::<Vec<_>>(), "seed {seed} conv {c}");
            }
            assert!(m.caught_up(), "seed {seed}");
        }
    }
}
