//! Receipts, settings and unread counts: per (conversation, member) watermarks, per
//! user settings, and the running message counts an unread count is read from.
//!
//! Watermarks and settings are single-key writes that ride on the next group commit
//! (no fsync of their own); they are counted as index writes, so a reader outside the
//! conversation actor (a `ConversationStates` page) that read one can wait for it to be
//! durable with `watermark_barrier`.
//!
//! The counts are written with the entries (`write_effects`): with each text message,
//! under `sender_count(conv, sender, seq)`, the number of text messages its sender wrote
//! up to and including `seq`; with each entry that is not a message (a membership change,
//! an edit, a delete, a rename), under `other_count(conv, seq)`, the number of such
//! entries up to `seq`, so that the messages up to a seq are the seq less that count.
//! An unread count is then four reverse seeks, whatever the number of messages: see
//! `unread`. Until format 8 each text message also wrote its conversation's running
//! count: one key of four per message, each with a record sled keeps in memory for the
//! life of the data dir (docs/benchmarks.md, "Memory that grows with the store" and
//! "Three keys per message").

use switchboard_protocol::{ConvId, Entry, Seq, Settings, UserId};

use crate::keys::{self, Key};
use crate::log::counts_as_message;
use crate::{ReceiptRecord, Result, Store, StoreError, corrupt, decode, encode};

impl Store {
    /// A member's stored watermarks in `conv` (`None` if it never reported any).
    pub fn receipt(&self, conv: ConvId, user: UserId) -> Result<Option<ReceiptRecord>> {
        let key = Key::receipt(conv, user);
        match self.db.get(&key)? {
            Some(v) => Ok(Some(ReceiptRecord::decode(key.as_ref(), &v)?)),
            None => Ok(None),
        }
    }

    /// Writes watermarks of members of `conv` (single-key writes, not a batch: see
    /// `append_then`), then calls `done` from the committer thread once a group commit
    /// covers them, or failed to. The waiter joins the next commit (starting one if none
    /// is running); no commit is forced for it. The conversation's actor is the only
    /// writer of its watermarks, and never lowers one.
    pub fn write_receipts(
        &self,
        conv: ConvId,
        marks: &[(UserId, ReceiptRecord)],
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) -> Result<()> {
        self.watermark_write(|| {
            marks.iter().try_for_each(|(user, record)| {
                self.db.insert(Key::receipt(conv, *user), record.encode())?;
                Ok::<_, StoreError>(())
            })
        })?;
        self.committer.notify(Box::new(done))
    }

    /// A user's settings (the defaults if never set).
    pub fn settings(&self, user: UserId) -> Result<Settings> {
        Ok(self.get(Key::settings(user))?.unwrap_or_default())
    }

    /// Replaces a user's settings; the future resolves once they are durable.
    pub fn set_settings(&self, user: UserId, settings: &Settings) -> Result<crate::Durable> {
        self.watermark_write(|| Ok(self.db.insert(Key::settings(user), encode(settings))?))?;
        self.barrier()
    }

    /// Text messages in `conv` with seq in `(read_up_to, last_seq]` from users other than
    /// `user`, deleted ones included (a deleted message keeps its count). `last_seq` is an
    /// entry's seq, the newest or older (the seqs before it are all entries, whose counts
    /// are written with them). Four reverse seeks in the count index, whatever the range.
    pub fn unread(&self, conv: ConvId, user: UserId, read_up_to: Seq, last_seq: Seq) -> Result<u64> {
        let read = read_up_to.min(last_seq);
        let total = |seq: Seq| Ok::<_, StoreError>(seq.saturating_sub(self.others_up_to(conv, seq)?));
        let mine = |seq| self.count_at(Key::sender_count(conv, user, 0), Key::sender_count(conv, user, seq));
        let all = total(last_seq)?.saturating_sub(total(read)?);
        let own = mine(last_seq)?.saturating_sub(mine(read)?);
        Ok(all.saturating_sub(own))
    }

    /// The entries of `conv` up to and including `seq` that are not messages (a reverse
    /// seek in the count index).
    pub(crate) fn others_up_to(&self, conv: ConvId, seq: Seq) -> Result<u64> {
        self.count_at(Key::other_count(conv, 0), Key::other_count(conv, seq))
    }

    /// The text messages `sender` wrote in `conv` before `seq`: from `RunningCounts` where
    /// it holds the newest count below `seq`, else read from the count index (a reverse
    /// seek).
    pub(crate) fn sent_before(&self, conv: ConvId, sender: UserId, seq: Seq) -> Result<u64> {
        match self.counts.lock().unwrap_or_else(|p| p.into_inner()).before(conv, sender, seq) {
            Some(mine) => Ok(mine),
            None => {
                let before = seq.saturating_sub(1);
                self.count_at(Key::sender_count(conv, sender, 0), Key::sender_count(conv, sender, before))
            }
        }
    }

    /// Records the count just written for a text message at `seq` (`write_effects`).
    pub(crate) fn counted(&self, conv: ConvId, sender: UserId, seq: Seq, mine: u64) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).counted(conv, sender, seq, mine);
    }

    /// Lets go of the count held for `conv` and `sender` (its write failed: the index is
    /// read again from then on).
    pub(crate) fn forget_counts(&self, conv: ConvId, sender: UserId) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).forget(conv, sender);
    }

    /// The value of the newest count key in `from..=to` (0 if none).
    fn count_at(&self, from: Key, to: Key) -> Result<u64> {
        match self.db.range(from.as_ref()..=to.as_ref()).next_back() {
            Some(item) => {
                let (k, v) = item?;
                keys::u64_from(&v).ok_or_else(|| corrupt(&k, "message count"))
            }
            None => Ok(0),
        }
    }

    /// Brings a data dir written before format 3 up to date: every text message (or
    /// deleted one: a tombstone was a text message) gets its count keys as format 3 wrote
    /// them, its sender's and its conversation's. One pass over the log, which is ordered
    /// by conversation then seq; runs once (the format key is written last, so a crash
    /// midway runs it again, rewriting the same values). The conversation's counts are
    /// removed again by the format-8 upgrade, but until that one has written its format
    /// key the store must read right to a format-3 to 7 broker, which a start cut short in
    /// between leaves it to.
    pub(crate) fn upgrade_to_format_3(&self) -> Result<()> {
        if self.stored_format()? >= 3 {
            return Ok(());
        }
        let mut conv = None;
        let mut total = 0u64;
        // Per sender of the current conversation only: bounded by its members' history.
        let mut mine: std::collections::HashMap<UserId, u64> = std::collections::HashMap::new();
        let mut counted = 0usize;
        for item in self.db.scan_prefix(Key::entries()) {
            let (k, v) = item?;
            let entry: Entry = decode(&k, &v)?;
            if conv != Some(entry.conv) {
                (conv, total) = (Some(entry.conv), 0);
                mine.clear();
            }
            if counts_as_message(&entry.body) {
                total += 1;
                let own = mine.entry(entry.sender).or_insert(0);
                *own += 1;
                self.db.insert(Key::old_text_count(entry.conv, entry.seq), &total.to_be_bytes()[..])?;
                self.db.insert(Key::sender_count(entry.conv, entry.sender, entry.seq), &own.to_be_bytes()[..])?;
                counted += 1;
            }
        }
        self.db.insert(Key::format(), &3u64.to_be_bytes()[..])?;
        if counted > 0 {
            tracing::info!(messages = counted, "counted messages for format 3");
        }
        Ok(())
    }

    /// Brings a data dir written before format 8 up to date: every entry that is not a
    /// message gets its count key (`Key::other_count`), then the per-message counts of
    /// formats 3 to 7 go. One pass over the log, then one over the old counts. The format
    /// key is written between the two, so a format-7 broker never reads a count index with
    /// keys missing (it finds all of them, or format 8 and refuses to open), and a removal
    /// cut short by a crash is finished at the next open (one seek when there is nothing
    /// left). A pass cut short starts again from the beginning.
    ///
    /// Unread counts read from these keys only if every conversation's seqs run from 1
    /// without a gap (as the conversation actor hands them out), so the pass checks that
    /// and fails with `Corrupt` where they do not.
    pub(crate) fn upgrade_to_format_8(&self) -> Result<()> {
        if self.stored_format()? < 8 {
            let (mut conv, mut seq, mut others, mut counted) = (None, 0, 0u64, 0usize);
            for item in self.db.scan_prefix(Key::entries()) {
                let (k, v) = item?;
                let entry: Entry = decode(&k, &v)?;
                if conv != Some(entry.conv) {
                    (conv, seq, others) = (Some(entry.conv), 0, 0);
                }
                seq += 1;
                if entry.seq != seq {
                    return Err(corrupt(&k, "a conversation's seqs do not run from 1 without a gap"));
                }
                if !counts_as_message(&entry.body) {
                    others += 1;
                    self.db.insert(Key::other_count(entry.conv, entry.seq), &others.to_be_bytes()[..])?;
                    counted += 1;
                }
            }
            self.db.insert(Key::format(), &8u64.to_be_bytes()[..])?;
            if counted > 0 {
                tracing::info!(entries = counted, "counted the entries that are not messages for format 8");
            }
        }
        let mut removed = 0usize;
        for key in self.db.scan_prefix(Key::old_text_counts()).keys() {
            self.db.remove(key?)?;
            removed += 1;
        }
        if removed > 0 {
            tracing::info!(keys = removed, "removed the text message counts of formats 3 to 7");
        }
        Ok(())
    }
}

/// The newest sender counts this process wrote, per (conversation, sender), so that
/// counting a new text message need not seek backwards through the count index: that
/// seek and the conversation's (a key no longer written since format 8) were 10% of the
/// broker's CPU at `switchboard-load direct --users 10000` (a `perf` profile,
/// docs/benchmarks.md "Running counts in memory").
///
/// An entry `(s, n)` says the count key at `s` holds `n` and was the newest when written.
/// Counts are written by a conversation's one writer in seq order (its actor, or the
/// repair of its newest entry before the actor takes writes), so for a later `seq` no key
/// lies between `s` and `seq` and `n` is the count before `seq`; for `seq <= s` (a repair
/// writing a message's count again) the index is read. An entry only ever moves to a
/// higher seq (or is written again at the same one, by a repair). A count is held once
/// its key is written, and a failed write lets go of the entry, so what is held is never
/// behind the index: a writer that went on after such a failure (today's stop and repair
/// first) would read the index. Bounded: emptied when it reaches `RUNNING_COUNTS_MAX`
/// entries (a miss costs only the seek).
#[derive(Default)]
pub(crate) struct RunningCounts {
    mine: std::collections::HashMap<(ConvId, UserId), (Seq, u64)>,
}

/// Entries of `RunningCounts` (about 40 bytes each).
const RUNNING_COUNTS_MAX: usize = 65_536;

impl RunningCounts {
    /// The sender's count before `seq`, where known.
    fn before(&self, conv: ConvId, sender: UserId, seq: Seq) -> Option<u64> {
        self.mine.get(&(conv, sender)).filter(|(s, _)| *s < seq).map(|&(_, n)| n)
    }

    fn counted(&mut self, conv: ConvId, sender: UserId, seq: Seq, mine: u64) {
        if self.mine.len() >= RUNNING_COUNTS_MAX && !self.mine.contains_key(&(conv, sender)) {
            self.mine.clear();
        }
        let held = self.mine.entry((conv, sender)).or_insert((seq, mine));
        if held.0 <= seq {
            *held = (seq, mine);
        }
    }

    /// Holds nothing more for `sender` in `conv`.
    fn forget(&mut self, conv: ConvId, sender: UserId) {
        self.mine.remove(&(conv, sender));
    }
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::{Body, Entry};

    use super::*;
    use crate::StoreConfig;

    fn config(path: &std::path::Path) -> StoreConfig {
        let mut config = StoreConfig::new(path.join("db"));
        config.cache_capacity_bytes = 1 << 20;
        config
    }

    fn open(path: &std::path::Path) -> Store {
        Store::open(&config(path)).unwrap()
    }

    fn entry(seq: Seq, sender: UserId, body: Body) -> Entry {
        Entry { conv: 9, seq, sender, sender_device: 1, client_id: [seq as u8; 16], at_ms: 0, body }
    }

    fn text(seq: Seq, sender: UserId) -> Entry {
        entry(seq, sender, Body::Text { text: format!("m{seq}"), edited: false })
    }

    async fn append(store: &Store, entry: Entry) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.append_then(&entry, move |r| tx.send(r).unwrap()).unwrap();
        rx.await.unwrap().unwrap();
    }

    /// The unread count the index gives, against a count of the log itself.
    fn check_unread(store: &Store, user: UserId) {
        let last = store.last_seq(9).unwrap();
        let log = store.entries(9, 1, last, usize::MAX, false).unwrap();
        for read in 0..=last + 1 {
            let want = log
                .iter()
                .filter(|e| e.seq > read && e.sender != user)
                .filter(|e| matches!(e.body, Body::Text { .. } | Body::Files { .. } | Body::Tombstone))
                .count() as u64;
            assert_eq!(store.unread(9, user, read, last).unwrap(), want, "user {user} read up to {read}");
        }
    }

    /// `(seq, text messages up to it)` for each text message of `mixed_log`: what formats
    /// 3 to 7 wrote under `Key::old_text_count`.
    const MIXED_LOG_TEXT_COUNTS: [(Seq, u64); 5] = [(1, 1), (2, 2), (4, 3), (6, 4), (8, 5)];

    async fn mixed_log(store: &Store) {
        append(store, text(1, 1)).await;
        append(store, text(2, 2)).await;
        append(store, entry(3, 2, Body::Edit { target: 2, text: "e".into() })).await;
        append(store, text(4, 1)).await;
        append(store, entry(5, 1, Body::MembersAdded { members: vec![(3, switchboard_protocol::Role::Member)] })).await;
        append(store, text(6, 3)).await;
        append(store, entry(7, 1, Body::Delete { target: 4 })).await;
        append(store, text(8, 2)).await;
    }

    /// Receipt and settings writes are counted apart from index writes: a reader of the
    /// membership indexes alone does not wait for the commit a delivered mark needs,
    /// while a reader of watermarks does, until a commit covers them.
    #[tokio::test]
    async fn watermark_writes_hold_back_watermark_readers_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // Settle whatever opening the store wrote.
        if let Some(barrier) = store.watermark_barrier().unwrap() {
            barrier.await.unwrap();
        }
        assert!(store.index_barrier().unwrap().is_none());
        assert!(store.watermark_barrier().unwrap().is_none());
        let record = ReceiptRecord { delivered_up_to: 3, read_up_to: 2, shown_read_up_to: 2 };
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.write_receipts(9, &[(4, record)], move |r| drop(tx.send(r))).unwrap();
        assert!(store.index_barrier().unwrap().is_none(), "a membership reader does not wait for receipts");
        rx.await.unwrap().unwrap();
        assert!(store.watermark_barrier().unwrap().is_none(), "the commit covered the receipt write");
        // A settings write that no commit covers yet holds back watermark readers.
        store.watermark_write(|| Ok(())).unwrap();
        let barrier = store.watermark_barrier().unwrap().expect("a watermark write is not durable yet");
        assert!(store.index_barrier().unwrap().is_none());
        barrier.await.unwrap();
        assert!(store.watermark_barrier().unwrap().is_none());
    }

    #[tokio::test]
    async fn unread_counts_text_from_others_deleted_ones_included() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        mixed_log(&store).await;
        for user in 1..=4 {
            check_unread(&store, user);
        }
        assert_eq!(store.unread(9, 1, 0, 8).unwrap(), 3, "seqs 2, 6 and 8");
        assert_eq!(store.unread(9, 2, 0, 8).unwrap(), 3, "seqs 1, 4 (deleted) and 6");
        assert_eq!(store.unread(9, 2, 0, 5).unwrap(), 2, "only up to last_seq");
        // Another conversation's entries and counts are its own.
        append(&store, Entry { conv: 8, ..text(1, 1) }).await;
        append(&store, Entry { conv: 8, ..entry(2, 1, Body::MemberLeft) }).await;
        assert_eq!(store.unread(8, 2, 0, 2).unwrap(), 1, "another conversation");
        assert_eq!(store.unread(9, 2, 0, 8).unwrap(), 3);
    }

    /// Counts taken from `RunningCounts` agree with the log: senders interleaved, a
    /// reopen (nothing held: read from the index), a repair of the newest message (its
    /// counts written again, below what is held) and more messages after it.
    #[tokio::test]
    async fn running_counts_agree_with_the_log_across_reopens_and_repairs() {
        let dir = tempfile::tempdir().unwrap();
        let mut seq = 0;
        for round in 0..3 {
            let store = open(dir.path());
            for i in 0..40u64 {
                seq += 1;
                // Senders 1..=3 in an uneven pattern, an edit now and then.
                let body = if i % 7 == 6 {
                    Body::Edit { target: seq - 1, text: "e".into() }
                } else {
                    Body::Text { text: format!("m{seq}"), edited: false }
                };
                append(&store, entry(seq, 1 + (i * i + round) % 3, body)).await;
                if i % 13 == 0 {
                    store.repair_newest_entry(9).unwrap();
                }
            }
            for user in 1..=4 {
                check_unread(&store, user);
            }
            store.close().unwrap();
        }
    }

    #[test]
    fn running_counts_hold_only_what_is_below_a_later_seq_and_stay_bounded() {
        let mut counts = RunningCounts::default();
        counts.counted(9, 1, 5, 2);
        assert_eq!(counts.before(9, 1, 6), Some(2));
        assert_eq!(counts.before(9, 1, 5), None, "a message's own count comes from the index");
        assert_eq!(counts.before(9, 2, 6), None, "another sender's is not held");
        counts.counted(9, 1, 4, 1);
        assert_eq!(counts.before(9, 1, 6), Some(2), "never moved back to an older seq");
        for conv in 0..RUNNING_COUNTS_MAX as u64 {
            counts.counted(100 + conv, 1, 1, 1);
        }
        assert!(counts.mine.len() <= RUNNING_COUNTS_MAX);
        assert_eq!(counts.before(9, 1, 6), None, "emptied when full");
    }

    /// After a failed write of a message's counts nothing is held for its conversation
    /// and sender, and the next message is counted from the index.
    #[tokio::test]
    async fn a_failed_count_write_lets_go_of_what_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        mixed_log(&store).await;
        let held = |store: &Store| store.counts.lock().unwrap().before(9, 2, 100);
        assert_eq!(held(&store), Some(2));
        store.forget_counts(9, 2);
        assert_eq!(held(&store), None);
        append(&store, text(9, 2)).await;
        assert_eq!(held(&store), Some(3));
        check_unread(&store, 1);
        check_unread(&store, 2);
    }

    /// The keys of the count index, by their first byte: 0x11 the conversation's count per
    /// text message (formats 3 to 7), 0x12 the sender's, 0x21 the other entries'.
    fn count_keys(store: &Store, tag: u8) -> Vec<sled::IVec> {
        store.db.scan_prefix([tag]).keys().map(|k| k.unwrap()).collect()
    }

    #[tokio::test]
    async fn a_crash_before_an_entrys_counts_is_repaired_and_old_data_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            mixed_log(&store).await;
            assert_eq!(count_keys(&store, 0x11).len(), 0, "no conversation count per message");
            assert_eq!(count_keys(&store, 0x12).len(), 5, "one per text message");
            assert_eq!(count_keys(&store, 0x21).len(), 3, "one per other entry: seqs 3, 5 and 7");
            // The crash left the newest message without its count.
            store.db.remove(Key::sender_count(9, 2, 8)).unwrap();
            store.close().unwrap();
        }
        {
            let store = open(dir.path());
            assert_eq!(store.unread(9, 2, 0, 8).unwrap(), 4, "seq 8 is not known as sender 2's before the repair");
            store.repair_newest_entry(9).unwrap();
            check_unread(&store, 1);
            check_unread(&store, 2);
            // The newest entry not a message, its count lost: repaired the same way.
            append(&store, entry(9, 1, Body::Edit { target: 8, text: "e".into() })).await;
            store.db.remove(Key::other_count(9, 9)).unwrap();
            assert_eq!(store.unread(9, 2, 0, 9).unwrap(), 4, "the edit counted as a message");
            store.repair_newest_entry(9).unwrap();
            for user in 1..=3 {
                check_unread(&store, user);
            }
            // What a format-2 broker left: no counts at all, and no format 3.
            for k in count_keys(&store, 0x12).into_iter().chain(count_keys(&store, 0x21)) {
                store.db.remove(k).unwrap();
            }
            store.db.insert(Key::format(), &2u64.to_be_bytes()[..]).unwrap();
            assert_eq!(store.unread(9, 1, 0, 9).unwrap(), 9, "without counts: every entry, none user 1's");
            store.close().unwrap();
        }
        let store = open(dir.path());
        for user in 1..=3 {
            check_unread(&store, user);
        }
        // And appends go on from the upgraded counts.
        append(&store, text(10, 3)).await;
        check_unread(&store, 1);
        check_unread(&store, 3);
    }

    /// The format-8 pass counts each conversation apart (files messages as messages), and
    /// refuses a log whose seqs have a gap, which the counts could not be read from.
    #[tokio::test]
    async fn the_format_8_upgrade_counts_each_conversation_apart_and_refuses_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            mixed_log(&store).await;
            let files = Body::Files { text: "f".into(), files: Vec::new(), edited: false };
            let other = [
                entry(1, 1, Body::MemberLeft),
                entry(2, 2, files.clone()),
                entry(3, 3, Body::RolesChanged { members: Vec::new() }),
                text(4, 1),
                entry(5, 2, files),
            ];
            for e in other {
                append(&store, Entry { conv: 8, ..e }).await;
            }
            for k in count_keys(&store, 0x21) {
                store.db.remove(k).unwrap();
            }
            store.db.insert(Key::format(), &7u64.to_be_bytes()[..]).unwrap();
            store.close().unwrap();
        }
        {
            let store = open(dir.path());
            assert_eq!(count_keys(&store, 0x21).len(), 3 + 2);
            for user in 1..=4 {
                check_unread(&store, user);
                let last = store.last_seq(8).unwrap();
                let want = [(1, 2), (2, 1)].iter().find(|(u, _)| *u == user).map_or(3, |(_, n)| *n);
                assert_eq!(store.unread(8, user, 0, last).unwrap(), want, "conversation 8, user {user}");
            }
            // A gap at seq 2 of conversation 7.
            for e in [text(1, 1), text(3, 1)] {
                store.db.insert(Key::entry(7, e.seq), encode(&Entry { conv: 7, ..e })).unwrap();
            }
            store.db.insert(Key::format(), &7u64.to_be_bytes()[..]).unwrap();
            store.close().unwrap();
        }
        match Store::open(&config(dir.path())) {
            Err(StoreError::Corrupt { detail, .. }) => assert!(detail.contains("without a gap"), "{detail}"),
            other => panic!("opened a log with a gap: {:?}", other.map(|_| ())),
        }
    }

    /// A data dir from before format 3 gets, at its format-3 step, the conversation counts
    /// a format-3 to 7 broker reads: a start cut short before format 8 leaves a store such
    /// a broker reads right.
    #[tokio::test]
    async fn the_format_3_step_writes_what_formats_3_to_7_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        mixed_log(&store).await;
        for k in count_keys(&store, 0x12).into_iter().chain(count_keys(&store, 0x21)) {
            store.db.remove(k).unwrap();
        }
        store.db.insert(Key::format(), &2u64.to_be_bytes()[..]).unwrap();
        store.upgrade_to_format_3().unwrap();
        let written: Vec<_> = store.db.scan_prefix(Key::old_text_counts()).map(|kv| kv.unwrap()).collect();
        let want: Vec<_> = MIXED_LOG_TEXT_COUNTS
            .iter()
            .map(|&(seq, n)| (Key::old_text_count(9, seq).as_ref().to_vec(), n.to_be_bytes().to_vec()))
            .collect();
        assert_eq!(written.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect::<Vec<_>>(), want);
        assert_eq!(count_keys(&store, 0x12).len(), 5);
    }

    /// A conversation made by `create_conversation` (its `Created` entry in the creation
    /// batch, with its count) reads its unread counts right from the first message on.
    #[tokio::test]
    async fn a_created_conversation_counts_from_its_first_message() {
        use switchboard_protocol::{ConversationKind, Role};
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let record = crate::ConversationRecord { kind: ConversationKind::Group, title: "g".into(), created_ms: 0 };
        let members = [(1, Role::Owner), (2, Role::Member)];
        let created = |conv| Entry {
            conv,
            ..entry(1, 1, Body::Created { kind: ConversationKind::Group, title: "g".into(), members: members.to_vec() })
        };
        let (conv, _, durable) = store.create_conversation(&record, &members, None, created).unwrap();
        durable.await.unwrap();
        assert_eq!(store.unread(conv, 2, 0, 1).unwrap(), 0, "the creation is not a message");
        append(&store, Entry { conv, ..text(2, 1) }).await;
        append(&store, Entry { conv, ..text(3, 2) }).await;
        assert_eq!(store.unread(conv, 2, 0, 3).unwrap(), 1);
        assert_eq!(store.unread(conv, 1, 0, 3).unwrap(), 1);
        assert_eq!(store.unread(conv, 1, 3, 3).unwrap(), 0);
    }

    /// What formats 3 to 7 wrote (a conversation count per text message, none for other
    /// entries) is upgraded at the next open: unread counts stay right, the old keys go,
    /// and a removal cut short by a crash after the format key is finished by an open.
    #[tokio::test]
    async fn the_format_8_upgrade_counts_other_entries_and_removes_the_old_counts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            mixed_log(&store).await;
            // Rewritten as format 7 left it.
            for k in count_keys(&store, 0x21) {
                store.db.remove(k).unwrap();
            }
            for (seq, total) in MIXED_LOG_TEXT_COUNTS {
                store.db.insert(Key::old_text_count(9, seq), &total.to_be_bytes()[..]).unwrap();
            }
            store.db.insert(Key::format(), &7u64.to_be_bytes()[..]).unwrap();
            store.close().unwrap();
        }
        {
            let store = open(dir.path());
            assert_eq!(count_keys(&store, 0x11).len(), 0, "the old counts are gone");
            assert_eq!(count_keys(&store, 0x21).len(), 3);
            for user in 1..=4 {
                check_unread(&store, user);
            }
            // A crash between the format key and the end of the removal.
            store.db.insert(Key::old_text_count(9, 8), &5u64.to_be_bytes()[..]).unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(count_keys(&store, 0x11).len(), 0, "finished by the next open");
        assert_eq!(store.stored_format().unwrap(), 8);
        append(&store, entry(9, 3, Body::MemberLeft)).await;
        append(&store, text(10, 1)).await;
        for user in 1..=4 {
            check_unread(&store, user);
        }
    }

    #[tokio::test]
    async fn receipts_and_settings_are_kept_per_member_and_user() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            assert_eq!(store.receipt(9, 1).unwrap(), None);
            assert_eq!(store.settings(1).unwrap(), Settings::default());
            let marks = [
                (1, ReceiptRecord { delivered_up_to: 5, read_up_to: 3, shown_read_up_to: 3 }),
                (2, ReceiptRecord { delivered_up_to: 2, read_up_to: 4, shown_read_up_to: 1 }),
            ];
            // A record written before `shown_read_up_to` existed reads it as its read mark.
            store.db.insert(Key::receipt(9, 3), encode(&(7u64, 6u64))).unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            store.write_receipts(9, &marks, move |r| tx.send(r).unwrap()).unwrap();
            rx.await.unwrap().unwrap();
            store.set_settings(2, &Settings { read_receipts_private: true }).unwrap().await.unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(
            store.receipt(9, 1).unwrap(),
            Some(ReceiptRecord { delivered_up_to: 5, read_up_to: 3, shown_read_up_to: 3 })
        );
        assert_eq!(
            store.receipt(9, 2).unwrap(),
            Some(ReceiptRecord { delivered_up_to: 2, read_up_to: 4, shown_read_up_to: 1 })
        );
        assert_eq!(
            store.receipt(9, 3).unwrap(),
            Some(ReceiptRecord { delivered_up_to: 7, read_up_to: 6, shown_read_up_to: 6 })
        );
        assert_eq!(store.receipt(8, 1).unwrap(), None, "per conversation");
        assert!(store.settings(2).unwrap().read_receipts_private);
        assert!(!store.settings(1).unwrap().read_receipts_private);
    }
}
