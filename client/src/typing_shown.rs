//! `TypingShown`: the typing indicators a `Session` handed on to its application, with
//! no I/O, so that none stays shown: each start handed on is followed by its stop, at
//! the latest when the connection ends or the conversation is left.
//!
//! The rules it keeps:
//! - a start is handed on if there is room (`TYPING_SHOWN_MAX` tracked at once); one
//!   that comes within `TYPING_REORDER_MS` after a stop of the same typist, or after a
//!   message of its that came live, is taken for one the stop or message overtook and
//!   dropped (the broker sends starts as datagrams, and stops and messages on the
//!   control stream, and the client reads them in two tasks; a message ends its
//!   typist's indicator with no stop, so a start it overtook stood for good: a review);
//! - a stop is handed on only for an indicator handed on; it is owed until the event
//!   queue takes it (`release`);
//! - a message from the typist ends its indicator with no stop (the application clears
//!   it on the message; the broker pushes none);
//! - a connection's end owes a stop for every indicator shown (the broker forgets them
//!   when it restarts, and a stop pushed while disconnected is not sent again); so does
//!   leaving a conversation, for its typists.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use switchboard_protocol::{ConvId, UserId};
use tokio::time::Instant;

/// Typing indicators tracked as shown or owed a stop at once, and stops remembered for
/// `TYPING_REORDER_MS`; a start beyond is not handed on. The broker lets a user type in
/// at most 16 conversations at once, so this is 256 typists at their most.
pub const TYPING_SHOWN_MAX: usize = 4096;

/// A typing start that comes this soon after a stop, or a message that came live, of the
/// same typist is taken for one the stop or message overtook, and not shown, ms. Shown,
/// it would stand until the connection ended (no stop follows it). A typist who stops,
/// or sends, and starts again this quickly is shown from its next start (after a stop or
/// an expiry), as a lost start datagram is: the broker pushes changes only.
pub const TYPING_REORDER_MS: u64 = 100;

type Typist = (ConvId, UserId);

/// See the module's doc.
#[derive(Debug, Default)]
pub struct TypingShown {
    /// Handed on as started and not yet as stopped.
    shown: HashSet<Typist>,
    /// Whose stop is owed (not yet taken by the event queue).
    owed: BTreeSet<Typist>,
    /// When a stop, or a message that came live, last came for each typist, lately.
    stopped_at: HashMap<Typist, Instant>,
}

impl TypingShown {
    /// A start from the broker at `now`. `hand_on` queues it and says whether the queue
    /// took it; it is not called for a start dropped (no room, or just after its stop).
    pub fn start(&mut self, typist: Typist, now: Instant, hand_on: impl FnOnce() -> bool) {
        let window = Duration::from_millis(TYPING_REORDER_MS);
        if self.stopped_at.get(&typist).is_some_and(|&at| now.duration_since(at) < window) {
            return;
        }
        // An owed stop is not owed any more: the indicator is shown and stands.
        let known = self.owed.remove(&typist) || self.shown.contains(&typist);
        let room = known || self.shown.len() + self.owed.len() < TYPING_SHOWN_MAX;
        if room && (hand_on() || known) {
            self.shown.insert(typist);
        }
    }

    /// A stop from the broker at `now`: owed if its start was handed on.
    pub fn stop(&mut self, typist: Typist, now: Instant) {
        self.ended(typist, now);
        if self.shown.remove(&typist) {
            self.owed.insert(typist);
        }
    }

    /// A message of the typist's came live (pushed, not read from a catch-up page) at
    /// `now`: a start within `TYPING_REORDER_MS` after it is one it overtook. The
    /// message ends the indicator when it is handed on (`message`).
    pub fn message_arrived(&mut self, typist: Typist, now: Instant) {
        self.ended(typist, now);
    }

    /// Remembers that the typist's indicator ended at `now` (`TYPING_SHOWN_MAX` of them,
    /// the oldest past the window forgotten first).
    fn ended(&mut self, typist: Typist, now: Instant) {
        let window = Duration::from_millis(TYPING_REORDER_MS);
        if self.stopped_at.len() >= TYPING_SHOWN_MAX {
            self.stopped_at.retain(|_, at| now.duration_since(*at) < window);
        }
        if self.stopped_at.len() < TYPING_SHOWN_MAX {
            self.stopped_at.insert(typist, now);
        }
    }

    /// The typist's message was handed on: its indicator ended with it.
    pub fn message(&mut self, typist: Typist) {
        if !self.is_empty() {
            self.shown.remove(&typist);
            self.owed.remove(&typist);
        }
    }

    /// The connection ended: every indicator shown is owed a stop. The stops remembered
    /// are forgotten: a start and a stop are reordered within one connection only, and
    /// the next connection begins with the starts standing then (the broker tells a
    /// device that connects who is typing), which must be shown however soon they come.
    pub fn connection_ended(&mut self) {
        self.owed.extend(self.shown.drain());
        self.stopped_at.clear();
    }

    /// `conv` was left: its indicators are owed a stop.
    pub fn left(&mut self, conv: ConvId) {
        let typists: Vec<Typist> = self.shown.iter().filter(|&&(c, _)| c == conv).copied().collect();
        for typist in typists {
            self.shown.remove(&typist);
            self.owed.insert(typist);
        }
    }

    /// Hands on the stops owed while `hand_on` (which queues one) says the queue took it.
    pub fn release(&mut self, mut hand_on: impl FnMut(Typist) -> bool) {
        while let Some(&typist) = self.owed.first() {
            if !hand_on(typist) {
                return;
            }
            self.owed.pop_first();
        }
    }

    /// Whether nothing is shown or owed.
    pub fn is_empty(&self) -> bool {
        self.shown.is_empty() && self.owed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Typist = (1, 10);
    const B: Typist = (1, 11);
    const C: Typist = (2, 10);

    fn owed(t: &mut TypingShown) -> Vec<Typist> {
        let mut out = Vec::new();
        t.release(|typist| {
            out.push(typist);
            true
        });
        out
    }

    #[test]
    fn every_start_handed_on_is_stopped_once() {
        let now = Instant::now();
        let mut t = TypingShown::default();
        t.start(A, now, || true);
        t.stop(A, now);
        assert_eq!(owed(&mut t), [A]);
        assert!(owed(&mut t).is_empty(), "once");
        // A stop for a start never handed on (lost, or refused for room) is not.
        t.stop(B, now);
        t.start(C, now, || false);
        t.stop(C, now);
        assert!(owed(&mut t).is_empty());
        assert!(t.is_empty());
    }

    #[test]
    fn a_connection_end_or_a_leave_owes_the_stops_and_a_message_ends_one() {
        let now = Instant::now();
        let mut t = TypingShown::default();
        for typist in [A, B, C] {
            t.start(typist, now, || true);
        }
        t.left(1);
        assert_eq!(owed(&mut t), [A, B], "the left conversation's typists");
        t.start(A, now, || true);
        t.message(A);
        t.connection_ended();
        assert_eq!(owed(&mut t), [C], "not A, whose message ended it");
        assert!(t.is_empty());
    }

    #[test]
    fn owed_stops_wait_for_room_and_a_new_start_cancels_one() {
        let now = Instant::now();
        let mut t = TypingShown::default();
        t.start(A, now, || true);
        t.start(B, now, || true);
        t.connection_ended();
        t.release(|_| false);
        // B starts again on the new connection: its stop is no longer owed, and it stays
        // shown even when the queue has no room for the start (the application still
        // shows it).
        t.start(B, now + Duration::from_secs(1), || false);
        assert_eq!(owed(&mut t), [A]);
        t.connection_ended();
        assert_eq!(owed(&mut t), [B]);
    }

    /// A start within `TYPING_REORDER_MS` after a stop is dropped (the datagram the stop
    /// overtook); one after it is a start again.
    #[test]
    fn a_start_just_after_its_stop_is_taken_for_a_reordered_one() {
        let now = Instant::now();
        let mut t = TypingShown::default();
        t.start(A, now, || true);
        t.stop(A, now);
        owed(&mut t);
        let mut handed = false;
        t.start(A, now + Duration::from_millis(TYPING_REORDER_MS - 1), || {
            handed = true;
            true
        });
        assert!(!handed && t.is_empty(), "not shown: it would stand");
        t.start(A, now + Duration::from_millis(TYPING_REORDER_MS), || true);
        t.connection_ended();
        assert_eq!(owed(&mut t), [A]);
    }

    /// A start that comes just after its typist's message came live is the one the
    /// message overtook (the broker pushes no stop after a message): not shown, where it
    /// would stand for good; one after the window is a start again.
    #[test]
    fn a_start_just_after_its_typists_message_is_taken_for_a_reordered_one() {
        let now = Instant::now();
        let mut t = TypingShown::default();
        t.message_arrived(A, now);
        t.message(A);
        let mut handed = false;
        t.start(A, now + Duration::from_millis(TYPING_REORDER_MS - 1), || {
            handed = true;
            true
        });
        assert!(!handed && t.is_empty(), "not shown: no stop would follow it");
        t.start(B, now + Duration::from_millis(1), || true);
        t.start(A, now + Duration::from_millis(TYPING_REORDER_MS), || true);
        t.connection_ended();
        assert_eq!(owed(&mut t), [A, B], "another typist's start, and a later one, are shown");
    }

    /// The broker tells a device that connects who is typing: such a start, just after
    /// a stop on the connection before, is shown (a reorder happens within one
    /// connection only).
    #[test]
    fn a_start_told_on_a_new_connection_is_shown_however_soon() {
        let now = Instant::now();
        let mut t = TypingShown::default();
        t.start(A, now, || true);
        t.stop(A, now);
        owed(&mut t);
        t.connection_ended();
        let mut handed = false;
        t.start(A, now + Duration::from_millis(1), || {
            handed = true;
            true
        });
        assert!(handed, "the snapshot's start is shown");
        t.connection_ended();
        assert_eq!(owed(&mut t), [A]);
    }

    #[test]
    fn bounded() {
        let now = Instant::now();
        let mut t = TypingShown::default();
        for user in 0..TYPING_SHOWN_MAX as u64 + 10 {
            t.start((1, user), now, || true);
        }
        t.connection_ended();
        assert_eq!(owed(&mut t).len(), TYPING_SHOWN_MAX);
        for user in 0..TYPING_SHOWN_MAX as u64 + 10 {
            t.stop((2, user), now);
        }
        assert!(t.stopped_at.len() <= TYPING_SHOWN_MAX);
    }
}
