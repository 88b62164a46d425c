//! Changes one device makes that other devices should see: a read mark, away and back,
//! typing. Each change is written down (actor, value, harness time) before its request
//! leaves, and each observer's event is matched to the changes it reports, so the
//! latency of a change is from its request to the event at each observer, on the same
//! clock as message latency.
//!
//! The broker coalesces these events (the latest wins), so one event may answer several
//! changes. How depends on the kind of change (`Match`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use switchboard_protocol::UserId;

use crate::report::Percentiles;

/// How an event answers changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// Values only grow (read watermarks): an event showing `v` answers every change up
    /// to `v`, each with its own latency.
    UpTo,
    /// Values are states (away/online, typing or not): an event showing `v` answers the
    /// first unanswered change to `v`; changes before it that the observer never saw
    /// were coalesced away (a later change replaced them before they were pushed).
    State,
}

/// One change.
#[derive(Clone, Copy, Debug)]
struct Change {
    value: u64,
    at_ns: u64,
    label: &'static str,
}

/// Changes made and what observers saw of them.
pub struct Changes {
    mode: Match,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By actor, in the order made.
    made: HashMap<UserId, Vec<Change>>,
    /// Per (observer session, actor): index of the first change it has not seen.
    cursors: HashMap<(usize, UserId), usize>,
    /// Latencies in µs by label.
    latency: BTreeMap<&'static str, Histogram<u64>>,
    coalesced: u64,
}

/// What observers saw, at the end.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Latency from the request to each observer's event, by label.
    pub latency: BTreeMap<String, Percentiles>,
    /// Changes made.
    pub made: u64,
    /// (change, observer) pairs answered by an event.
    pub seen: u64,
    /// (change, observer) pairs replaced by a later change before the observer saw them.
    pub coalesced: u64,
    /// (change, observer) pairs never answered: the observer's latest view is stale.
    pub missed: u64,
}

impl Changes {
    /// No changes yet.
    pub fn new(mode: Match) -> Self {
        Changes { mode, inner: Mutex::new(Inner::default()) }
    }

    /// Records a change by `actor` to `value` made at `at_ns` (before its request is
    /// written, so its event cannot arrive first).
    pub fn made(&self, actor: UserId, value: u64, label: &'static str, at_ns: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.made.entry(actor).or_default().push(Change { value, at_ns, label });
    }

    /// Records that session `observer` saw `actor` at `value` at `now_ns`.
    pub fn seen(&self, observer: usize, actor: UserId, value: u64, now_ns: u64) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let Some(made) = inner.made.get(&actor) else { return };
        let cursor = inner.cursors.entry((observer, actor)).or_insert(0);
        let mut answered: Vec<Change> = Vec::new();
        match self.mode {
            Match::UpTo => {
                while let Some(c) = made.get(*cursor).filter(|c| c.value <= value) {
                    answered.push(*c);
                    *cursor += 1;
                }
            }
            Match::State => {
                // Events for changes made before this run's first change match nothing.
                if let Some(offset) = made[(*cursor).min(made.len())..].iter().position(|c| c.value == value) {
                    inner.coalesced += offset as u64;
                    answered.push(made[*cursor + offset]);
                    *cursor += offset + 1;
                }
            }
        }
        for c in answered {
            let h = inner.latency.entry(c.label).or_insert_with(|| {
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
            });
            let _ = h.record((now_ns.saturating_sub(c.at_ns) / 1000).clamp(1, 60_000_000));
        }
    }

    /// Waits until every change reached every observer (or `limit` passes): called when
    /// the last change is made, so its events are read before the readers stop.
    pub async fn settle(&self, observers: impl Fn(UserId) -> Vec<usize>, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.outcome(&observers).missed > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The outcome, counting `observers(actor)` observers for each actor's changes.
    pub fn outcome(&self, observers: impl Fn(UserId) -> Vec<usize>) -> Outcome {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Outcome { coalesced: inner.coalesced, ..Outcome::default() };
        for (label, h) in &inner.latency {
            out.latency.insert((*label).to_owned(), Percentiles::from_us(h));
            out.seen += h.len();
        }
        for (&actor, made) in &inner.made {
            out.made += made.len() as u64;
            for observer in observers(actor) {
                let cursor = inner.cursors.get(&(observer, actor)).copied().unwrap_or(0);
                out.missed += (made.len() - cursor.min(made.len())) as u64;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermarks_answer_every_mark_up_to_them() {
        let changes = Changes::new(Match::UpTo);
        changes.made(7, 10, "receipt", 1_000_000);
        changes.made(7, 20, "receipt", 2_000_000);
        changes.made(7, 30, "receipt", 3_000_000);
        // Observer 1 sees one coalesced event for 20: both first marks, each from its own time.
        changes.seen(1, 7, 20, 5_000_000);
        // A stale or repeated event answers nothing new.
        changes.seen(1, 7, 20, 6_000_000);
        // Observer 2 sees all three at once; an unknown actor is ignored.
        changes.seen(2, 7, 35, 4_000_000);
        changes.seen(2, 8, 99, 4_000_000);
        let out = changes.outcome(|_| vec![1, 2]);
        let p = &out.latency["receipt"];
        assert_eq!((out.made, out.seen, out.missed, out.coalesced), (3, 5, 1, 0), "observer 1 never saw 30");
        assert_eq!(p.count, 5);
        assert!((p.max_ms - 4.0).abs() < 0.01, "observer 1's first mark waited 4 ms: {p:?}");
        assert!((p.p50_ms - 3.0).abs() < 0.01, "latencies 4, 3, 3, 2, 1 ms: {p:?}");
    }

    #[test]
    fn states_answer_the_first_matching_change_and_count_coalesced_ones() {
        let changes = Changes::new(Match::State);
        // An event before any change (a connect's "online") matches nothing.
        changes.seen(1, 7, 0, 500_000);
        changes.made(7, 1, "presence away", 1_000_000);
        changes.made(7, 0, "presence back", 2_000_000);
        changes.made(7, 1, "presence away", 3_000_000);
        // Observer 1 sees each change; observer 2 only the last "away": the first away
        // and the back were replaced before it was pushed.
        changes.seen(1, 7, 1, 1_500_000);
        changes.seen(1, 7, 0, 2_500_000);
        changes.seen(1, 7, 1, 3_500_000);
        changes.seen(2, 7, 1, 1_200_000);
        changes.seen(2, 7, 1, 3_700_000);
        let out = changes.outcome(|_| vec![1, 2]);
        assert_eq!((out.made, out.seen, out.missed, out.coalesced), (3, 5, 0, 1));
        assert_eq!(out.latency["presence away"].count, 4);
        assert_eq!(out.latency["presence back"].count, 1);
        assert!((out.latency["presence back"].max_ms - 0.5).abs() < 0.01);
    }
}
