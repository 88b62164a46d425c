//! Delivery checking: every receiver must see every acknowledged message of its
//! conversations (except its own sends) exactly once, in seq order.
//!
//! Each receiver keeps a `Tracker` locally (no sharing on the hot path); at the end the
//! trackers are compared with the acknowledged seqs.

use std::collections::HashMap;

use switchboard_protocol::{ConvId, Seq};

/// What one receiver saw of one conversation.
#[derive(Default, Debug, Clone)]
struct ConvTrack {
    last: Seq,
    seen: Vec<u64>,
}

impl ConvTrack {
    fn set(&mut self, seq: Seq) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        let fresh = self.seen[word] & (1 << bit) == 0;
        self.seen[word] |= 1 << bit;
        fresh
    }

    fn has(&self, seq: Seq) -> bool {
        self.seen.get((seq / 64) as usize).is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }
}

/// One receiver's view.
#[derive(Default, Debug, Clone)]
pub struct Tracker {
    convs: HashMap<ConvId, ConvTrack>,
    /// Deliveries seen twice.
    pub duplicated: u64,
    /// Deliveries below the highest seq already seen in their conversation.
    pub out_of_order: u64,
    /// Deliveries recorded.
    pub delivered: u64,
}

impl Tracker {
    /// Records a delivery.
    pub fn observe(&mut self, conv: ConvId, seq: Seq) {
        let track = self.convs.entry(conv).or_default();
        if !track.set(seq) {
            self.duplicated += 1;
            return;
        }
        self.delivered += 1;
        if seq < track.last {
            self.out_of_order += 1;
        }
        track.last = track.last.max(seq);
    }

    /// Whether `seq` of `conv` was seen.
    pub fn saw(&self, conv: ConvId, seq: Seq) -> bool {
        self.convs.get(&conv).is_some_and(|t| t.has(seq))
    }
}

/// An acknowledged message: conversation, seq, and the sending receiver's index.
#[derive(Clone, Copy, Debug)]
pub struct Acked {
    /// Conversation.
    pub conv: ConvId,
    /// Seq.
    pub seq: Seq,
    /// Index of the sender among the receivers (it does not get its own message).
    pub sender: usize,
}

/// Totals over all receivers.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// (acknowledged message, member) pairs never delivered.
    pub lost: u64,
    /// Deliveries seen twice.
    pub duplicated: u64,
    /// Deliveries out of seq order.
    pub out_of_order: u64,
    /// Deliveries in all.
    pub delivered: u64,
}

/// Compares what receivers saw with what was acknowledged. `members[c]` lists the
/// receiver indexes that belong to conversation `c`.
pub fn verdict(trackers: &[Tracker], acked: &[Acked], members: &HashMap<ConvId, Vec<usize>>) -> Verdict {
    let mut v = Verdict::default();
    for t in trackers {
        v.duplicated += t.duplicated;
        v.out_of_order += t.out_of_order;
        v.delivered += t.delivered;
    }
    for a in acked {
        for &r in members.get(&a.conv).map(Vec::as_slice).unwrap_or_default() {
            if r != a.sender && !trackers.get(r).is_some_and(|t| t.saw(a.conv, a.seq)) {
                v.lost += 1;
            }
        }
    }
    v
}

/// The first `cap` (conversation, seq, member) triples of acknowledged messages a member
/// never got, in the order of `acked`: what `verdict` counts as lost.
pub fn undelivered(
    trackers: &[Tracker],
    acked: &[Acked],
    members: &HashMap<ConvId, Vec<usize>>,
    cap: usize,
) -> Vec<(ConvId, Seq, usize)> {
    let mut out = Vec::new();
    for a in acked {
        for &r in members.get(&a.conv).map(Vec::as_slice).unwrap_or_default() {
            if out.len() == cap {
                return out;
            }
            if r != a.sender && !trackers.get(r).is_some_and(|t| t.saw(a.conv, a.seq)) {
                out.push((a.conv, a.seq, r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(streams: &[&[(ConvId, Seq)]], acked: &[Acked]) -> Verdict {
        let trackers: Vec<Tracker> = streams
            .iter()
            .map(|s| {
                let mut t = Tracker::default();
                for &(c, q) in s.iter() {
                    t.observe(c, q);
                }
                t
            })
            .collect();
        let members = HashMap::from([(1, (0..streams.len()).collect())]);
        verdict(&trackers, acked, &members)
    }

    fn acked(seqs: &[(Seq, usize)]) -> Vec<Acked> {
        seqs.iter().map(|&(seq, sender)| Acked { conv: 1, seq, sender }).collect()
    }

    #[test]
    fn clean_stream_passes() {
        // Receiver 1 sent seqs 1 and 3, receiver 0 sent seq 2: each needs only the others'.
        let v = run(&[&[(1, 1), (1, 3)], &[(1, 2)]], &acked(&[(1, 1), (2, 0), (3, 1)]));
        assert_eq!(v, Verdict { lost: 0, duplicated: 0, out_of_order: 0, delivered: 3 });
    }

    #[test]
    fn lossy_stream_counts_each_missing_member() {
        let v = run(&[&[(1, 1)], &[]], &acked(&[(1, 2), (2, 2)]));
        // Seq 1 (sent by 2, a non-receiver): receiver 1 missed it. Seq 2: both missed it.
        assert_eq!(v.lost, 3);
    }

    #[test]
    fn undelivered_names_each_missing_pair_up_to_the_cap() {
        let trackers: Vec<Tracker> = [&[(1, 1)][..], &[]]
            .iter()
            .map(|s| {
                let mut t = Tracker::default();
                s.iter().for_each(|&(c, q)| t.observe(c, q));
                t
            })
            .collect();
        let members = HashMap::from([(1, vec![0, 1])]);
        let acked = acked(&[(1, 2), (2, 2)]);
        assert_eq!(undelivered(&trackers, &acked, &members, 10), vec![(1, 1, 1), (1, 2, 0), (1, 2, 1)]);
        assert_eq!(undelivered(&trackers, &acked, &members, 2).len(), 2);
    }

    #[test]
    fn duplicated_and_reordered_streams_are_caught() {
        let v = run(&[&[(1, 1), (1, 3), (1, 2), (1, 3)]], &acked(&[(1, 9), (2, 9), (3, 9)]));
        assert_eq!(v, Verdict { lost: 0, duplicated: 1, out_of_order: 1, delivered: 3 });
    }
}
