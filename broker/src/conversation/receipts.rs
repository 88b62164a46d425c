//! `ReceiptBook`: one conversation's receipt watermarks, with no I/O. Part of
//! `ConversationState` (which checks membership and turns its outputs into effects).
//!
//! The rules it keeps:
//! - watermarks only grow (a lower report is ignored); the caller clamps reports to the
//!   durable seq and decides whether a read also raises delivery (it does unless the
//!   reader keeps read receipts private: then delivery moves only by delivery reports,
//!   so others cannot read the read mark off the delivered one);
//! - what is shown is durable: each member's `durable` value changes only when a write
//!   covering it completed;
//! - at most one write is in flight; changes made meanwhile wait for the next one, and
//!   a member changed many times before a write goes out is written (and pushed) once,
//!   with its latest value;
//! - a `MarkRead` is answered once its change is durable (or at once when it changed
//!   nothing that is not durable already);
//! - entries exist for members and for users whose write is not finished: a removed
//!   member's is dropped once nothing is pending for it, so the book is bounded by
//!   `MAX_GROUP_MEMBERS` plus one write's worth.

use std::collections::{BTreeSet, HashMap};

use switchboard_protocol::{Seq, UserId};

/// A member's watermarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    /// Highest seq one of the member's devices holds with no gap below it.
    pub delivered_up_to: Seq,
    /// Highest seq the member marked read (above `delivered_up_to` only for reads made
    /// while it kept read receipts private).
    pub read_up_to: Seq,
    /// Highest seq the member marked read while it did not keep read receipts private:
    /// what others are shown as its read mark. Reads made while private are never shown,
    /// also once the member's receipts are public again (before, turning them public
    /// showed everything read meanwhile, with the time of the change).
    pub shown_read_up_to: Seq,
}

impl Marks {
    /// Each watermark raised to `other`'s where it is higher.
    pub(super) fn max(self, other: Marks) -> Marks {
        Marks {
            delivered_up_to: self.delivered_up_to.max(other.delivered_up_to),
            read_up_to: self.read_up_to.max(other.read_up_to),
            shown_read_up_to: self.shown_read_up_to.max(other.shown_read_up_to),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    /// What a completed write made durable: what is shown.
    durable: Marks,
    /// The newest accepted value (at least `durable`).
    current: Marks,
}

/// Members' watermarks to write, each member once.
pub type Batch = Vec<(UserId, Marks)>;

/// A completed write: each member's watermarks as shown before it and after it.
pub type Written = Vec<(UserId, Marks, Marks)>;

/// Receipt watermarks of one conversation's members. `R` answers a `MarkRead`.
#[derive(Debug)]
pub struct ReceiptBook<R> {
    entries: HashMap<UserId, Entry>,
    /// Members whose `current` is not written yet.
    dirty: BTreeSet<UserId>,
    /// The write in flight, if any.
    writing: Option<Batch>,
    /// `MarkRead` answers waiting for the next write, and for the one in flight.
    answers_next: Vec<(R, UserId)>,
    answers_writing: Vec<(R, UserId)>,
}

impl<R> Default for ReceiptBook<R> {
    fn default() -> Self {
        ReceiptBook {
            entries: HashMap::new(),
            dirty: BTreeSet::new(),
            writing: None,
            answers_next: Vec::new(),
            answers_writing: Vec::new(),
        }
    }
}

impl<R> ReceiptBook<R> {
    /// Whether `user` has an entry (else the caller loads the stored value with `load`).
    pub fn knows(&self, user: UserId) -> bool {
        self.entries.contains_key(&user)
    }

    /// Records `user`'s stored (durable) watermarks. Only for a user with no entry: the
    /// store then holds nothing of it that is not durable.
    pub fn load(&mut self, user: UserId, stored: Marks) {
        self.entries.entry(user).or_insert(Entry { durable: stored, current: stored });
    }

    /// `user`'s newest accepted watermarks, written or not (zero if none were ever
    /// reported or loaded).
    pub fn current(&self, user: UserId) -> Marks {
        self.entries.get(&user).map_or_else(Marks::default, |e| e.current)
    }

    /// `user`'s durable watermarks (zero if none were ever reported).
    pub fn durable(&self, user: UserId) -> Marks {
        self.entries.get(&user).map_or_else(Marks::default, |e| e.durable)
    }

    /// A report by `user` (already clamped by the caller). `answer` is a `MarkRead`'s:
    /// returned at once if its watermarks are durable already, else kept until they are.
    pub fn mark(&mut self, user: UserId, marks: Marks, answer: Option<R>) -> Option<R> {
        let entry = self.entries.entry(user).or_default();
        let raised = entry.current.max(marks);
        if raised != entry.current {
            entry.current = raised;
            self.dirty.insert(user);
        }
        let answer = answer?;
        if self.dirty.contains(&user) {
            self.answers_next.push((answer, user));
        } else if self.writing.as_ref().is_some_and(|w| w.iter().any(|(u, _)| *u == user)) {
            self.answers_writing.push((answer, user));
        } else {
            return Some(answer);
        }
        None
    }

    /// The next write, if none is in flight and something changed: every changed
    /// member's latest value. The caller writes it and calls `written` once durable.
    pub fn next_write(&mut self) -> Option<Batch> {
        if !self.wants_write() {
            return None;
        }
        let batch: Vec<(UserId, Marks)> = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|u| Some((u, self.entries.get(&u)?.current)))
            .collect();
        self.answers_writing.append(&mut self.answers_next);
        self.writing = Some(batch.clone());
        Some(batch)
    }

    /// The write in flight is durable: returns what it changed (each member's shown
    /// watermarks before and after) and the answers that waited for it, with their users.
    pub fn written(&mut self) -> (Written, Vec<(R, UserId)>) {
        let batch = self.writing.take().unwrap_or_default();
        let mut changed = Vec::with_capacity(batch.len());
        for (user, marks) in batch {
            if let Some(e) = self.entries.get_mut(&user) {
                let before = e.durable;
                e.durable = e.durable.max(marks);
                changed.push((user, before, e.durable));
            }
        }
        (changed, std::mem::take(&mut self.answers_writing))
    }

    /// Drops a user's entry (a removed member) unless something of it is pending; `true`
    /// if dropped. A pending one is dropped by a later call, after its write.
    pub fn forget(&mut self, user: UserId) -> bool {
        let pending = self.dirty.contains(&user)
            || self.writing.as_ref().is_some_and(|w| w.iter().any(|(u, _)| *u == user))
            || self.answers_next.iter().chain(&self.answers_writing).any(|(_, u)| *u == user);
        !pending && self.entries.remove(&user).is_some()
    }

    /// Whether `next_write` would give a write: none in flight and something changed.
    pub fn wants_write(&self) -> bool {
        self.writing.is_none() && !self.dirty.is_empty()
    }

    /// Whether nothing is pending (no write in flight, nothing changed, nobody waiting).
    pub fn idle(&self) -> bool {
        self.writing.is_none() && self.dirty.is_empty() && self.answers_next.is_empty()
    }

    /// Whether `user`'s watermarks are in the write in flight or the next one.
    pub fn writes(&self, user: UserId) -> bool {
        self.dirty.contains(&user) || self.writing.as_ref().is_some_and(|w| w.iter().any(|(u, _)| *u == user))
    }

    /// A write failed: every waiting answer, to be refused; nothing is pending after.
    pub fn fail(&mut self) -> Vec<R> {
        self.writing = None;
        self.dirty.clear();
        let mut answers: Vec<R> = self.answers_writing.drain(..).map(|(r, _)| r).collect();
        answers.extend(self.answers_next.drain(..).map(|(r, _)| r));
        answers
    }

    /// Number of entries (for bound checks in tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}
