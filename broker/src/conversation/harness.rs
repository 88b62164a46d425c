//! A deterministic harness for `ConversationState`, in the spirit of quinn-proto's
//! `Pair`: an in-memory log that mirrors what the store derives from each entry, a
//! virtual clock, group commits on demand, and crash switches (the actor alone, or the
//! whole broker losing everything not yet durable). No ractor, tokio or sled: each case
//! runs in microseconds.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use switchboard_protocol::{
    Body, ClientMsgId, ConvId, ConversationKind, Entry, ErrorBody, ErrorCode, Event, Page, Reply, Role, Seq, UserId,
};

use super::receipts::Marks;
use super::state::{Caller, Command, ConversationState, Effect, Log, Mark, Read};

const CONV: ConvId = 7;

/// The log's contents: what the store keeps for one conversation.
#[derive(Clone, Default)]
struct Contents {
    entries: BTreeMap<Seq, Entry>,
    dedupe: HashMap<(UserId, ClientMsgId), Seq>,
    /// (target, edit) pairs.
    edits: BTreeSet<(Seq, Seq)>,
    members: HashMap<UserId, Role>,
    /// The conversation record's title.
    title: String,
}

/// An in-memory log: every append is visible at once; `durable` is what survives a
/// crash of the broker. Receipt watermarks are kept apart: a commit makes all of them
/// durable, as the store's group commit does.
#[derive(Default)]
pub struct MemLog {
    now: Contents,
    durable: Contents,
    receipts: HashMap<UserId, Marks>,
    durable_receipts: HashMap<UserId, Marks>,
    /// Users who keep read receipts private.
    pub private: BTreeSet<UserId>,
    /// `(blocker, blocked)` pairs.
    pub blocks: BTreeSet<(UserId, UserId)>,
    /// The contents after each append not yet durable, for a commit of a prefix.
    after: Vec<(Seq, Contents)>,
}

impl MemLog {
    /// Applies an entry and what it implies, like `Store::append_then`.
    fn append(&mut self, entry: &Entry) {
        let c = &mut self.now;
        if entry.client_id != ClientMsgId::default() {
            c.dedupe.insert((entry.sender, entry.client_id), entry.seq);
        }
        let rewrite = |c: &mut Contents, seq: Seq, body: Body| {
            if let Some(e) = c.entries.get_mut(&seq) {
                e.body = body;
            }
        };
        match &entry.body {
            Body::Edit { target, text } => {
                c.edits.insert((*target, entry.seq));
                let edited = match c.entries.get(target).map(|e| &e.body) {
                    Some(Body::Files { files, .. }) => {
                        Body::Files { text: text.clone(), files: files.clone(), edited: true }
                    }
                    _ => Body::Text { text: text.clone(), edited: true },
                };
                rewrite(c, *target, edited);
            }
            Body::Delete { target } => {
                let edits: Vec<Seq> = c.edits.range((*target, 0)..=(*target, Seq::MAX)).map(|(_, e)| *e).collect();
                for e in edits {
                    rewrite(c, e, Body::Redacted { target: *target });
                }
                rewrite(c, *target, Body::Tombstone);
            }
            Body::MembersAdded { members } | Body::RolesChanged { members } => {
                c.members.extend(members.iter().copied())
            }
            Body::Created { members, title, .. } => {
                c.members.extend(members.iter().copied());
                c.title.clone_from(title);
            }
            Body::MemberRemoved { user } => {
                c.members.remove(user);
            }
            Body::MemberLeft => {
                c.members.remove(&entry.sender);
            }
            Body::TitleChanged { title } => c.title.clone_from(title),
            _ => {}
        }
        c.entries.insert(entry.seq, entry.clone());
        self.after.push((entry.seq, self.now.clone()));
    }

    /// Everything appended up to `seq` becomes durable.
    fn make_durable(&mut self, seq: Seq) {
        if let Some(i) = self.after.iter().rposition(|(s, _)| *s <= seq) {
            self.durable = self.after[i].1.clone();
            self.after.drain(..=i);
        }
    }

    fn last_seq(&self) -> Seq {
        self.now.entries.keys().next_back().copied().unwrap_or(0)
    }
}

impl Log for MemLog {
    type Error = std::convert::Infallible;
    fn dedupe(&self, _: ConvId, sender: UserId, client_id: &ClientMsgId) -> Result<Option<Seq>, Self::Error> {
        Ok(self.now.dedupe.get(&(sender, *client_id)).copied())
    }
    fn entry(&self, _: ConvId, seq: Seq) -> Result<Option<Entry>, Self::Error> {
        Ok(self.now.entries.get(&seq).cloned())
    }
    fn entries(&self, _: ConvId, from: Seq, to: Seq, limit: usize, newest: bool) -> Result<Vec<Entry>, Self::Error> {
        if from > to {
            return Ok(Vec::new());
        }
        let range = self.now.entries.range(from..=to).map(|(_, e)| e.clone());
        Ok(if newest { range.rev().take(limit).collect() } else { range.take(limit).collect() })
    }
    fn user_name(&self, user: UserId) -> Result<Option<String>, Self::Error> {
        Ok(Some(format!("user{user}")))
    }
    fn edits_of(&self, _: ConvId, target: Seq) -> Result<Vec<Seq>, Self::Error> {
        Ok(self.now.edits.range((target, 0)..=(target, Seq::MAX)).map(|(_, e)| *e).collect())
    }
    fn receipt(&self, _: ConvId, user: UserId) -> Result<Option<Marks>, Self::Error> {
        Ok(self.receipts.get(&user).copied())
    }
    fn receipts_private(&self, user: UserId) -> Result<bool, Self::Error> {
        Ok(self.private.contains(&user))
    }
    fn blocks(&self, blocker: UserId, user: UserId) -> Result<bool, Self::Error> {
        Ok(self.blocks.contains(&(blocker, user)))
    }
    fn blocked_by(&self, blocker: UserId) -> Result<Vec<UserId>, Self::Error> {
        Ok(self.blocks.iter().filter(|(b, _)| *b == blocker).map(|(_, u)| *u).collect())
    }
}

/// One delivery: the entry's seq, the users it went to, the session it skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    pub seq: Seq,
    pub body: Body,
    pub audience: Vec<UserId>,
    pub except: u64,
}

/// One push of an event other than an entry: the event and the users it went to.
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub event: Event,
    pub audience: Vec<UserId>,
}

/// The state, its log and what came out of it.
pub struct Harness {
    pub log: MemLog,
    pub state: ConversationState<u32>,
    kind: ConversationKind,
    pub now_ms: u64,
    /// Answers by request number, in the order given.
    pub replies: Vec<(u32, Result<Reply, ErrorBody>)>,
    pub deliveries: Vec<Delivery>,
    pub notices: Vec<Notice>,
    /// Receipt writes performed, each with its watermarks.
    pub receipt_writes: Vec<Vec<(UserId, Marks)>>,
    /// Files released by durable deletes, in order.
    pub released: Vec<switchboard_protocol::FileId>,
    /// Each release's audience, sorted.
    pub released_to: Vec<Vec<UserId>>,
    /// A receipt write is waiting for a commit.
    receipts_in_flight: bool,
    /// When the state asked to start its next receipt write (`Effect::ReceiptsAt`).
    pub receipts_at: Option<u64>,
    pub fatal: bool,
    next: u32,
}

pub fn caller(user: UserId) -> Caller {
    Caller { user, device: user * 10, session: user * 100 }
}

impl Harness {
    /// A conversation created by its first member, durable and delivered.
    pub fn new(kind: ConversationKind, members: &[(UserId, Role)]) -> Harness {
        let mut log = MemLog::default();
        let created = Entry {
            conv: CONV,
            seq: 1,
            sender: members[0].0,
            sender_device: 1,
            client_id: [0; 16],
            at_ms: 0,
            body: Body::Created { kind, title: "t".into(), members: members.to_vec() },
        };
        log.append(&created);
        log.durable = log.now.clone();
        let (state, _) = ConversationState::recover(
            CONV,
            (kind, log.now.title.clone()),
            log.now.members.clone(),
            1,
            (Vec::new(), 0),
            0,
        );
        Harness {
            log,
            state,
            kind,
            now_ms: 0,
            replies: Vec::new(),
            deliveries: Vec::new(),
            notices: Vec::new(),
            receipt_writes: Vec::new(),
            released: Vec::new(),
            released_to: Vec::new(),
            receipts_in_flight: false,
            receipts_at: None,
            fatal: false,
            next: 0,
        }
    }

    pub fn write(&mut self, user: UserId, cmd: Command) -> u32 {
        self.next += 1;
        let effects = self.state.handle_write(&self.log, caller(user), cmd, self.next, self.now_ms);
        self.perform(effects);
        self.next
    }

    pub fn read(&mut self, user: UserId, read: Read) -> Result<Reply, ErrorBody> {
        self.next += 1;
        let answer = self.state.handle_read(&self.log, caller(user), read);
        self.perform(vec![Effect::Reply(self.next, answer)]);
        self.reply(self.next).expect("reads are answered at once").clone()
    }

    /// A receipt report; a `MarkRead` gets a request number (its answer comes later).
    pub fn mark(&mut self, user: UserId, mark: Mark) -> u32 {
        self.next += 1;
        let reply = matches!(mark, Mark::Read(_)).then_some(self.next);
        let effects = self.state.handle_mark(&self.log, caller(user), mark, reply, self.now_ms);
        self.perform(effects);
        self.next
    }

    /// `user`'s view of every member's receipts: (user, delivered, read).
    pub fn receipts(&mut self, user: UserId) -> Vec<(UserId, Seq, Option<Seq>)> {
        match self.read(user, Read::Receipts) {
            Ok(Reply::Receipts(list)) => list.into_iter().map(|r| (r.user, r.delivered_up_to, r.read_up_to)).collect(),
            other => panic!("receipts: {other:?}"),
        }
    }

    /// The watermarks a `MarkRead` was answered with, or its error code.
    pub fn receipt_answer(&self, id: u32) -> Option<Result<(Seq, Option<Seq>), ErrorCode>> {
        self.reply(id).map(|r| match r {
            Ok(Reply::Receipt(r)) => Ok((r.delivered_up_to, r.read_up_to)),
            Ok(other) => panic!("not a receipt: {other:?}"),
            Err(e) => Err(e.code),
        })
    }

    pub fn send(&mut self, user: UserId, id: u8, text: &str) -> u32 {
        self.write(user, Command::Send { client_id: [id; 16], text: text.into() })
    }

    /// A group commit: everything written so far (entries and receipts) becomes durable.
    pub fn commit(&mut self) {
        self.commit_to(self.log.last_seq());
        self.commit_receipts();
    }

    /// A group commit that covers the appends up to `seq` only (and no receipt write).
    pub fn commit_to(&mut self, seq: Seq) {
        self.log.make_durable(seq);
        let effects = self.state.handle_durable(seq);
        self.perform(effects);
    }

    /// A group commit that covers the receipt write in flight (and none of the entries).
    pub fn commit_receipts(&mut self) {
        if std::mem::take(&mut self.receipts_in_flight) {
            self.log.durable_receipts = self.log.receipts.clone();
            let effects = self.state.handle_receipts_durable(&self.log, true, self.now_ms);
            self.perform(effects);
        }
    }

    /// A group commit that fails (fdatasync returned an error).
    pub fn fail_commit(&mut self) {
        let effects = self.state.handle_failure();
        self.perform(effects);
    }

    /// A group commit covering the receipt write in flight fails.
    pub fn fail_receipts_commit(&mut self) {
        self.receipts_in_flight = false;
        let effects = self.state.handle_receipts_durable(&self.log, false, self.now_ms);
        self.perform(effects);
    }

    /// The actor dies (a panic) after its last effect; the store is intact. Its
    /// successor is started as the directory does: after a barrier, replaying from the
    /// dead actor's published watermark.
    pub fn crash_actor(&mut self) {
        let published = self.state.published_seq();
        self.log.make_durable(Seq::MAX);
        self.log.durable_receipts = self.log.receipts.clone();
        self.receipts_in_flight = false;
        self.restart(Some(published));
    }

    /// The broker dies: what was not durable is gone; the next start replays nothing
    /// (no device is connected to a starting broker).
    pub fn crash_broker(&mut self) {
        self.log.now = self.log.durable.clone();
        self.log.after.clear();
        self.log.receipts = self.log.durable_receipts.clone();
        self.receipts_in_flight = false;
        self.restart(None);
    }

    /// The time the state asked for (`Effect::ReceiptsAt`) comes: its paced receipt
    /// write starts.
    pub fn receipts_due(&mut self) {
        let at = self.receipts_at.take().expect("a receipt write waits for its pace");
        self.now_ms = self.now_ms.max(at);
        let effects = self.state.handle_receipts_due(self.now_ms);
        self.perform(effects);
    }

    fn restart(&mut self, replay_after: Option<Seq>) {
        self.receipts_at = None;
        let last = self.log.last_seq();
        let replay = match replay_after {
            Some(after) => self.log.entries(CONV, after + 1, last, usize::MAX, false).unwrap_or_default(),
            None => Vec::new(),
        };
        let (state, effects) = ConversationState::recover(
            CONV,
            (self.kind, self.log.now.title.clone()),
            self.log.now.members.clone(),
            last,
            (replay, 0),
            self.now_ms,
        );
        self.state = state;
        self.perform(effects);
    }

    fn perform(&mut self, effects: Vec<Effect<u32>>) {
        for effect in effects {
            match effect {
                Effect::Append(entry) => self.log.append(&entry),
                Effect::Reply(id, result) => self.replies.push((id, result)),
                Effect::RefuseOnceDurable(id, refused) => self.replies.push((id, Err(refused))),
                Effect::Deliver { entry, audience, except } => {
                    let mut audience = audience.to_vec();
                    audience.sort_unstable();
                    self.deliveries.push(Delivery { seq: entry.seq, body: entry.body, audience, except });
                }
                Effect::WriteReceipts(marks) => {
                    assert!(!self.receipts_in_flight, "one receipt write at a time");
                    self.receipts_in_flight = true;
                    self.log.receipts.extend(marks.iter().copied());
                    self.receipt_writes.push(marks);
                }
                Effect::ReceiptsAt(at) => {
                    assert!(self.receipts_at.replace(at).is_none(), "one wake-up at a time");
                }
                Effect::Notify { event, audience } => {
                    let mut audience = audience.to_vec();
                    audience.sort_unstable();
                    self.notices.push(Notice { event, audience });
                }
                Effect::Released { files, audience } => {
                    let mut audience = audience.to_vec();
                    audience.sort_unstable();
                    self.released_to.push(audience);
                    self.released.extend(files);
                }
                Effect::Fatal => self.fatal = true,
            }
        }
    }

    pub fn reply(&self, id: u32) -> Option<&Result<Reply, ErrorBody>> {
        self.replies.iter().find(|(i, _)| *i == id).map(|(_, r)| r)
    }

    /// The seq request `id` was acknowledged with, or its error code.
    pub fn ack(&self, id: u32) -> Option<Result<(Seq, bool), ErrorCode>> {
        self.reply(id).map(|r| match r {
            Ok(Reply::Appended { seq, duplicate }) => Ok((*seq, *duplicate)),
            Ok(other) => panic!("not an ack: {other:?}"),
            Err(e) => Err(e.code),
        })
    }

    pub fn history(&mut self, user: UserId) -> Vec<(Seq, Body)> {
        match self.read(user, Read::History { page: Page::After(0), limit: 200 }) {
            Ok(Reply::History { entries, .. }) => entries.into_iter().map(|e| (e.seq, e.body)).collect(),
            other => panic!("history: {other:?}"),
        }
    }

    /// A catch-up page: its seqs and bodies, `last_seq`, `complete`.
    pub fn catch_up(&mut self, user: UserId, after: Seq, limit: u16) -> (Vec<(Seq, Body)>, Seq, bool) {
        match self.read(user, Read::CatchUp { after, limit }) {
            Ok(Reply::CatchUp(p)) => {
                assert_eq!(p.conv, CONV);
                (p.entries.into_iter().map(|e| (e.seq, e.body)).collect(), p.last_seq, p.complete)
            }
            other => panic!("catch-up: {other:?}"),
        }
    }

    pub fn delivered_seqs(&self) -> Vec<Seq> {
        self.deliveries.iter().map(|d| d.seq).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::not_a_member;
    use super::*;
    use switchboard_protocol::encode_frame;

    const OWNER: UserId = 1;
    const BOB: UserId = 2;
    const CAROL: UserId = 3;

    fn group() -> Harness {
        Harness::new(ConversationKind::Group, &[(OWNER, Role::Owner), (BOB, Role::Member)])
    }

    fn text(t: &str) -> Body {
        Body::Text { text: t.into(), edited: false }
    }

    #[test]
    fn acks_and_deliveries_wait_for_durability_and_keep_seq_order() {
        let mut h = group();
        let a = h.send(BOB, 1, "a");
        let b = h.send(OWNER, 2, "b");
        assert_eq!(h.ack(a), None, "nothing is acknowledged before it is durable");
        assert!(h.deliveries.is_empty(), "nothing is delivered before it is durable");
        h.commit();
        assert_eq!((h.ack(a), h.ack(b)), (Some(Ok((2, false))), Some(Ok((3, false)))));
        assert_eq!(h.delivered_seqs(), vec![2, 3]);
        assert_eq!(h.deliveries[0].except, caller(BOB).session, "the sender's session gets the ack instead");
        let order: Vec<u32> = h.replies.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, vec![a, b], "answered in seq order, not sorted after the fact");
    }

    #[test]
    fn a_resend_answers_its_original_seq_even_after_the_sender_was_removed() {
        let mut h = group();
        let first = h.send(BOB, 9, "landed");
        h.commit();
        assert_eq!(h.ack(first), Some(Ok((2, false))));
        h.crash_broker();
        let removed = h.write(OWNER, Command::Remove { user: BOB });
        h.commit();
        assert_eq!(h.ack(removed), Some(Ok((3, false))));
        let resend = h.send(BOB, 9, "landed");
        assert_eq!(h.ack(resend), Some(Ok((2, true))), "the idempotency key is checked before membership");
        let fresh = h.send(BOB, 10, "new");
        assert_eq!(h.ack(fresh), Some(Err(ErrorCode::FORBIDDEN)));
    }

    /// A membership entry (here the creation, seq 1) is no message: its sender's edit or
    /// delete is refused `INVALID` saying so (it said "only text messages", of a log
    /// where file messages can be edited too: a trial).
    #[test]
    fn a_membership_entry_is_no_message_to_edit_or_delete() {
        let mut h = group();
        let edit = h.write(OWNER, Command::Edit { client_id: [3; 16], target: 1, text: "renamed".into() });
        let delete = h.write(OWNER, Command::Delete { client_id: [4; 16], target: 1 });
        for id in [edit, delete] {
            let Some(Err(refused)) = h.reply(id) else { panic!("refused at once: {:?}", h.reply(id)) };
            assert_eq!(refused.code, ErrorCode::INVALID);
            assert!(refused.message.contains("entry 1 is no message"), "{}", refused.message);
        }
        h.commit();
        assert!(h.deliveries.is_empty(), "nothing was written");
    }

    #[test]
    fn an_all_zero_client_id_is_refused_as_it_would_not_be_remembered() {
        let mut h = group();
        // Before: each was appended, a retry as a new message every time.
        for _ in 0..2 {
            let zero = h.send(BOB, 0, "again and again");
            assert_eq!(h.ack(zero), Some(Err(ErrorCode::INVALID)));
            let edit = h.write(BOB, Command::Delete { client_id: [0; 16], target: 1 });
            assert_eq!(h.ack(edit), Some(Err(ErrorCode::INVALID)));
        }
        h.commit();
        assert!(h.deliveries.is_empty(), "nothing was written");
        assert_eq!(h.log.last_seq(), 1);
        // Membership comes first: a stranger learns nothing more.
        let stranger = h.send(CAROL, 0, "x");
        assert_eq!(h.ack(stranger), Some(Err(ErrorCode::FORBIDDEN)));
    }

    #[test]
    fn a_client_id_reused_for_another_write_is_a_conflict_not_a_resend() {
        let mut h = group();
        let first = h.send(BOB, 9, "meet at 5");
        h.commit();
        assert_eq!(h.ack(first), Some(Ok((2, false))));
        let other = h.send(BOB, 9, "meet at 6");
        assert_eq!(h.ack(other), Some(Err(ErrorCode::CONFLICT)), "not the first seq: the new text never landed");
        let resend = h.send(BOB, 9, "meet at 5");
        assert_eq!(h.ack(resend), Some(Ok((2, true))));
        // Pending as well as durable; the conflict, like a resend's answer, waits until
        // the original is durable (before, it was answered at once, and a crash then lost
        // the original: the key was never taken).
        let pending = h.send(BOB, 10, "x");
        let wrong = h.send(BOB, 10, "y");
        assert_eq!(h.ack(wrong), None, "not before the original is durable");
        h.commit();
        assert_eq!(h.ack(pending), Some(Ok((3, false))));
        assert_eq!(h.ack(wrong), Some(Err(ErrorCode::CONFLICT)));
        // An edit's key: the same target and text, or a conflict.
        let edit = h.write(BOB, Command::Edit { client_id: [11; 16], target: 2, text: "at 5:30".into() });
        h.commit();
        assert_eq!(h.ack(edit), Some(Ok((4, false))));
        let elsewhere = h.write(BOB, Command::Edit { client_id: [11; 16], target: 3, text: "at 5:30".into() });
        assert_eq!(h.ack(elsewhere), Some(Err(ErrorCode::CONFLICT)));
        // The message now shows its edit: a resend of the original cannot be checked, and
        // is answered as one.
        let late = h.send(BOB, 9, "meet at 5");
        assert_eq!(h.ack(late), Some(Ok((2, true))));
        let reused_for_a_delete = h.write(BOB, Command::Delete { client_id: [9; 16], target: 2 });
        assert_eq!(h.ack(reused_for_a_delete), Some(Err(ErrorCode::CONFLICT)), "another kind of write");
    }

    #[test]
    fn a_reused_client_id_is_judged_by_durable_state_only() {
        let mut h = group();
        // The original is lost in a crash: the key was never taken, and the other text
        // that waited on it lands as a write of its own once sent again.
        let lost = h.send(BOB, 9, "meet at 5");
        let other = h.send(BOB, 9, "meet at 6");
        assert_eq!((h.ack(lost), h.ack(other)), (None, None));
        h.crash_broker();
        let again = h.send(BOB, 9, "meet at 6");
        h.commit();
        assert_eq!(h.ack(again), Some(Ok((2, false))));
        // An edit of it that is not durable yet: the message still shows "meet at 6" to
        // readers, so a resend of that text is a resend and another text a conflict
        // (before, the pending edit already counted, and "meet at 7" was answered as a
        // duplicate that a crash could then make false).
        let edit = h.write(BOB, Command::Edit { client_id: [11; 16], target: 2, text: "at 6:30".into() });
        let resend = h.send(BOB, 9, "meet at 6");
        let another = h.send(BOB, 9, "meet at 7");
        assert_eq!(h.ack(resend), Some(Ok((2, true))));
        assert_eq!(h.ack(another), Some(Err(ErrorCode::CONFLICT)));
        h.crash_broker();
        assert_eq!(h.ack(edit), None, "the edit was lost");
        assert_eq!(h.history(BOB).last(), Some(&(2, Body::Text { text: "meet at 6".into(), edited: false })));
    }

    #[test]
    fn a_resend_of_a_pending_write_waits_for_the_original() {
        let mut h = group();
        let first = h.send(BOB, 9, "x");
        let again = h.send(BOB, 9, "x");
        assert_eq!((h.ack(first), h.ack(again)), (None, None));
        h.commit();
        assert_eq!((h.ack(first), h.ack(again)), (Some(Ok((2, false))), Some(Ok((2, true)))));
        assert_eq!(h.delivered_seqs(), vec![2], "delivered once");
    }

    /// A resend's answer waits for its original only, not for entries appended after
    /// the original that are still pending (before, it queued behind them, and a
    /// conversation written to steadily could hold it a commit or more).
    #[test]
    fn a_resend_does_not_wait_for_later_entries() {
        let mut h = group();
        let first = h.send(BOB, 9, "x");
        let later = h.send(OWNER, 1, "y");
        let again = h.send(BOB, 9, "x");
        h.commit_to(2);
        assert_eq!(h.ack(first), Some(Ok((2, false))));
        assert_eq!(h.ack(again), Some(Ok((2, true))), "answered with its original");
        assert_eq!(h.ack(later), None, "seq 3 is not durable yet");
        h.commit();
        assert_eq!(h.ack(later), Some(Ok((3, false))));
        assert_eq!(h.delivered_seqs(), vec![2, 3]);
    }

    #[test]
    fn pipelined_membership_changes_take_effect_in_order() {
        let mut h = group();
        let add = h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Member });
        let hi = h.send(OWNER, 1, "hi");
        let remove = h.write(OWNER, Command::Remove { user: CAROL });
        h.commit();
        assert_eq!(h.ack(add), Some(Ok((2, false))));
        assert_eq!(h.ack(hi), Some(Ok((3, false))));
        assert_eq!(h.ack(remove), Some(Ok((4, false))), "the remove sees the add before it");
        assert!(h.deliveries[1].audience.contains(&CAROL), "carol gets the message sent after her addition");
        assert!(h.deliveries[2].audience.contains(&CAROL), "and hears of her removal");
    }

    fn roles(h: &mut Harness) -> Vec<(UserId, Role)> {
        let Ok(Reply::Members(members)) = h.read(OWNER, Read::Members) else { panic!() };
        members.iter().map(|m| (m.user_id, m.role)).collect()
    }

    #[test]
    fn only_the_owner_changes_roles_and_hands_over_ownership_to_one_member() {
        let mut h = group();
        h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Admin });
        h.commit();
        // Who may not, and what may not be asked.
        let refused = [
            (CAROL, BOB, Role::Admin, ErrorCode::FORBIDDEN),
            (BOB, BOB, Role::Admin, ErrorCode::FORBIDDEN),
            (OWNER, 9, Role::Admin, ErrorCode::NOT_FOUND),
            (OWNER, OWNER, Role::Member, ErrorCode::INVALID),
            (OWNER, CAROL, Role::Admin, ErrorCode::CONFLICT),
            (9, BOB, Role::Admin, ErrorCode::FORBIDDEN),
        ];
        for (who, user, role, code) in refused {
            let id = h.write(who, Command::SetRole { user, role });
            assert_eq!(h.ack(id), Some(Err(code)), "{who} sets {user} to {role:?}");
        }
        // The owner promotes and demotes.
        let promote = h.write(OWNER, Command::SetRole { user: BOB, role: Role::Admin });
        let demote = h.write(OWNER, Command::SetRole { user: CAROL, role: Role::Member });
        assert_eq!(
            roles(&mut h),
            vec![(OWNER, Role::Owner), (BOB, Role::Member), (CAROL, Role::Admin)],
            "durable only"
        );
        h.commit();
        assert_eq!((h.ack(promote), h.ack(demote)), (Some(Ok((3, false))), Some(Ok((4, false)))));
        assert_eq!(roles(&mut h), vec![(OWNER, Role::Owner), (BOB, Role::Admin), (CAROL, Role::Member)]);
        assert_eq!(h.log.now.entries[&3].body, Body::RolesChanged { members: vec![(BOB, Role::Admin)] });
        let sorted = |mut users: Vec<UserId>| {
            users.sort();
            users
        };
        assert!(
            h.deliveries.iter().all(|d| sorted(d.audience.clone()) == vec![OWNER, BOB, CAROL]),
            "every member hears of it"
        );
        // Handing over: one owner, the former one an admin who may now leave.
        let hand = h.write(OWNER, Command::SetRole { user: CAROL, role: Role::Owner });
        h.commit();
        assert_eq!(h.ack(hand), Some(Ok((5, false))));
        assert_eq!(
            h.log.now.entries[&5].body,
            Body::RolesChanged { members: vec![(CAROL, Role::Owner), (OWNER, Role::Admin)] }
        );
        assert_eq!(roles(&mut h), vec![(OWNER, Role::Admin), (BOB, Role::Admin), (CAROL, Role::Owner)]);
        let old_owner = h.write(OWNER, Command::SetRole { user: BOB, role: Role::Member });
        assert_eq!(h.ack(old_owner), Some(Err(ErrorCode::FORBIDDEN)), "no longer the owner");
        // A retry of the hand-over (its answer lost) learns that it holds, not that it is
        // refused (before: FORBIDDEN, as if it had never happened).
        let retry = h.write(OWNER, Command::SetRole { user: CAROL, role: Role::Owner });
        assert_eq!(h.ack(retry), Some(Err(ErrorCode::CONFLICT)));
        // "It holds" is said only of durable state: a retry while the change waits for
        // its commit is answered after it (a crash first would have undone it).
        let demote = h.write(CAROL, Command::SetRole { user: BOB, role: Role::Member });
        let again = h.write(CAROL, Command::SetRole { user: BOB, role: Role::Member });
        assert_eq!((h.ack(demote), h.ack(again)), (None, None), "not before the change is durable");
        h.commit();
        assert_eq!(h.ack(demote), Some(Ok((6, false))));
        assert_eq!(h.ack(again), Some(Err(ErrorCode::CONFLICT)));
        // The roles survive a crash: the successor loads them from the member keys.
        h.crash_broker();
        assert_eq!(roles(&mut h), vec![(OWNER, Role::Admin), (BOB, Role::Member), (CAROL, Role::Owner)]);
        let leave = h.write(OWNER, Command::Leave);
        h.commit();
        assert_eq!(h.ack(leave), Some(Ok((7, false))));
        let stuck = h.write(CAROL, Command::Leave);
        assert_eq!(h.ack(stuck), Some(Err(ErrorCode::FORBIDDEN)), "the new owner hands over before leaving");
    }

    /// A group is renamed by its owner or an admin, as an entry every member hears of; the
    /// title a rename is judged against is the log's, so one lost in a crash may be asked
    /// for again.
    #[test]
    fn the_owner_or_an_admin_renames_a_group() {
        let mut h = group();
        h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Admin });
        h.commit();
        let title = |t: &str| Command::SetTitle { title: t.into() };
        let refused = [
            (BOB, "ops", ErrorCode::FORBIDDEN),
            (9, "ops", ErrorCode::FORBIDDEN),
            (OWNER, "", ErrorCode::INVALID),
            (OWNER, "pay\u{202E}fdp", ErrorCode::INVALID),
            (CAROL, "t", ErrorCode::CONFLICT),
        ];
        for (who, t, code) in refused {
            let id = h.write(who, title(t));
            assert_eq!(h.ack(id), Some(Err(code)), "{who} renames to {t:?}");
        }
        let renamed = h.write(CAROL, title("ops"));
        // A second asking while the first waits for its commit is judged on it, and told
        // only once it is durable.
        let again = h.write(OWNER, title("ops"));
        assert_eq!((h.ack(renamed), h.ack(again)), (None, None));
        h.commit();
        assert_eq!((h.ack(renamed), h.ack(again)), (Some(Ok((3, false))), Some(Err(ErrorCode::CONFLICT))));
        let heard = h.deliveries.last().expect("delivered");
        assert_eq!((heard.seq, &heard.body), (3, &Body::TitleChanged { title: "ops".into() }));
        assert_eq!(heard.audience, vec![OWNER, BOB, CAROL], "every member hears of it");
        assert_eq!(h.log.now.title, "ops");
        // Lost in a crash before its commit: the successor knows the durable title.
        let lost = h.write(OWNER, title("lost"));
        h.crash_broker();
        assert_eq!(h.ack(lost), None);
        assert_eq!(h.log.now.title, "ops");
        let retry = h.write(OWNER, title("lost"));
        h.commit();
        assert_eq!(h.ack(retry), Some(Ok((4, false))), "asked again after the crash");
        let back = h.write(OWNER, title("ops"));
        h.commit();
        assert_eq!(h.ack(back), Some(Ok((5, false))), "a former title is a change too");

        let mut direct = Harness::new(ConversationKind::Direct, &[(OWNER, Role::Member), (BOB, Role::Member)]);
        let id = direct.write(OWNER, title("ops"));
        assert_eq!(direct.ack(id), Some(Err(ErrorCode::INVALID)), "a direct conversation shows its peer's name");
    }

    /// Adding as an admin makes one: the owner's call, as with `SetRole` (before, an
    /// admin could remove a member and add them back promoted).
    #[test]
    fn only_the_owner_adds_admins() {
        let mut h = group();
        h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Admin });
        h.commit();
        let promoted = h.write(CAROL, Command::Add { users: vec![7], role: Role::Admin });
        assert_eq!(h.ack(promoted), Some(Err(ErrorCode::FORBIDDEN)));
        let added = h.write(CAROL, Command::Add { users: vec![7], role: Role::Member });
        h.commit();
        assert!(matches!(h.ack(added), Some(Ok(_))), "an admin adds members");
        assert_eq!(
            roles(&mut h),
            vec![(OWNER, Role::Owner), (BOB, Role::Member), (CAROL, Role::Admin), (7, Role::Member)]
        );
    }

    #[test]
    fn a_direct_conversation_has_no_roles_to_change() {
        let mut h = Harness::new(ConversationKind::Direct, &[(OWNER, Role::Member), (BOB, Role::Member)]);
        let id = h.write(OWNER, Command::SetRole { user: BOB, role: Role::Admin });
        assert_eq!(h.ack(id), Some(Err(ErrorCode::INVALID)));
    }

    #[test]
    fn reads_serve_durable_state_only() {
        let mut h = group();
        h.send(BOB, 1, "draft");
        h.commit();
        h.write(BOB, Command::Edit { client_id: [2; 16], target: 2, text: "secret".into() });
        h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Member });
        h.send(BOB, 3, "pending");
        assert_eq!(h.history(OWNER), vec![(1, h.log.now.entries[&1].body.clone()), (2, text("draft"))]);
        let Ok(Reply::Members(members)) = h.read(OWNER, Read::Members) else { panic!() };
        assert_eq!(members.iter().map(|m| m.user_id).collect::<Vec<_>>(), vec![OWNER, BOB]);
        assert!(h.read(CAROL, Read::Members).is_err(), "carol is not a member until her addition is durable");
        h.commit();
        let after = h.history(OWNER);
        assert_eq!(after[1], (2, Body::Text { text: "secret".into(), edited: true }));
        assert_eq!(after.len(), 5);
        assert!(h.read(CAROL, Read::Members).is_ok());
    }

    #[test]
    fn two_pending_rewrites_of_one_message_settle_one_at_a_time() {
        let mut h = group();
        h.send(BOB, 1, "v1");
        h.commit();
        h.write(BOB, Command::Edit { client_id: [2; 16], target: 2, text: "v2".into() });
        // The second rewrite is planned against the applied view (v2 is live), but a
        // reader still sees v1.
        h.write(BOB, Command::Delete { client_id: [3; 16], target: 2 });
        assert_eq!(h.history(BOB)[1], (2, text("v1")));
        h.commit_to(3);
        assert_eq!(h.history(BOB)[1], (2, Body::Text { text: "v2".into(), edited: true }), "the edit alone is durable");
        assert_eq!(h.history(BOB).len(), 3, "the delete (seq 4) is not served yet");
        h.commit();
        assert_eq!(h.history(BOB)[1], (2, Body::Tombstone));
        assert_eq!(h.history(BOB)[2], (3, Body::Redacted { target: 2 }));
    }

    #[test]
    fn a_pending_deletes_redactions_are_not_served_before_it_is_durable() {
        let mut h = group();
        h.send(BOB, 1, "v1");
        h.commit();
        h.write(BOB, Command::Edit { client_id: [2; 16], target: 2, text: "v2".into() });
        h.commit();
        h.write(BOB, Command::Delete { client_id: [3; 16], target: 2 });
        assert_eq!(h.log.now.entries[&3].body, Body::Redacted { target: 2 }, "the log already holds the redaction");
        let served = h.history(OWNER);
        assert_eq!(served[1], (2, Body::Text { text: "v2".into(), edited: true }));
        assert_eq!(served[2], (3, Body::Edit { target: 2, text: "v2".into() }), "a crash could still undo the delete");
        h.commit();
        let served = h.history(OWNER);
        assert_eq!((served[1].1.clone(), served[2].1.clone()), (Body::Tombstone, Body::Redacted { target: 2 }));
    }

    /// A message is edited at most `MAX_EDITS_PER_MESSAGE` times (pending edits count):
    /// its delete rewrites every edit in one step, which before had no bound (a million
    /// edits made one delete read and rewrite two million entries and hold their texts).
    #[test]
    fn a_message_is_edited_at_most_max_edits_times() {
        use switchboard_protocol::limits::MAX_EDITS_PER_MESSAGE;
        let mut h = group();
        h.write(BOB, Command::Send { client_id: [1; 16], text: "v0".into() });
        h.commit();
        let client_id = |i: u32| {
            let mut id = [0xee; 16];
            id[..4].copy_from_slice(&i.to_be_bytes());
            id
        };
        for i in 0..MAX_EDITS_PER_MESSAGE - 1 {
            h.write(BOB, Command::Edit { client_id: client_id(i), target: 2, text: format!("v{i}") });
        }
        h.commit();
        let last = MAX_EDITS_PER_MESSAGE - 1;
        let pending = h.write(BOB, Command::Edit { client_id: client_id(last), target: 2, text: "last".into() });
        let over = h.write(BOB, Command::Edit { client_id: client_id(last + 1), target: 2, text: "over".into() });
        assert_eq!(h.ack(over), None, "answered once the edit it counted is durable");
        h.commit();
        assert_eq!(h.ack(over), Some(Err(ErrorCode::INVALID)), "the pending edit counts");
        assert!(matches!(h.ack(pending), Some(Ok(_))));
        let again = h.write(BOB, Command::Edit { client_id: client_id(last + 2), target: 2, text: "over".into() });
        assert_eq!(h.ack(again), Some(Err(ErrorCode::INVALID)));
        // Deleting it still works, and redacts every edit.
        let delete = h.write(BOB, Command::Delete { client_id: client_id(last + 3), target: 2 });
        h.commit();
        assert!(matches!(h.ack(delete), Some(Ok(_))));
        let served = h.history(OWNER);
        let redacted = served.iter().filter(|(_, b)| *b == Body::Redacted { target: 2 }).count();
        assert_eq!(redacted, MAX_EDITS_PER_MESSAGE as usize);
    }

    #[test]
    fn a_files_message_edited_twice_keeps_its_files_while_the_second_edit_is_pending() {
        let mut h = group();
        let file = switchboard_protocol::FileRef {
            file: [7; 16],
            name: "cat.png".into(),
            size: 10,
            content_type: "image/png".into(),
        };
        h.write(BOB, Command::SendFiles { client_id: [1; 16], text: "v1".into(), files: vec![file.clone()] });
        h.commit();
        h.write(BOB, Command::Edit { client_id: [2; 16], target: 2, text: "v2".into() });
        h.write(BOB, Command::Edit { client_id: [3; 16], target: 2, text: "v3".into() });
        // The first edit durable, the second not: readers see the first, files and all
        // (before, the files were gone from what was served until the second was durable).
        h.commit_to(3);
        let served = h.history(OWNER);
        let v2 = Body::Files { text: "v2".into(), files: vec![file.clone()], edited: true };
        assert_eq!(served[1], (2, v2));
        h.commit();
        let served = h.history(OWNER);
        assert_eq!(served[1], (2, Body::Files { text: "v3".into(), files: vec![file], edited: true }));
    }

    #[test]
    fn strangers_are_refused_before_any_read_and_do_not_keep_it_awake() {
        let mut h = group();
        h.now_ms = 10_000;
        let edit = h.write(9, Command::Edit { client_id: [1; 16], target: 1, text: "x".into() });
        assert_eq!(h.ack(edit), Some(Err(ErrorCode::FORBIDDEN)));
        assert!(h.read(9, Read::Members).is_err());
        assert!(h.state.handle_tick(10_000, 10_000), "a stranger's requests are not activity");
    }

    #[test]
    fn an_entry_names_its_sender_and_the_members_it_changes_even_once_they_are_gone() {
        let mut h = group();
        h.send(BOB, 1, "bye");
        h.commit();
        h.write(OWNER, Command::Remove { user: BOB });
        h.commit();
        let names = |h: &mut Harness, user, seq| match h.read(user, Read::Names { seq }) {
            Ok(Reply::Names(n)) => Ok(n.into_iter().map(|u| (u.user_id, u.name)).collect::<Vec<_>>()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.code),
        };
        let Ok(Reply::Members(members)) = h.read(OWNER, Read::Members) else { panic!() };
        assert!(members.iter().all(|m| m.user_id != BOB), "bob is no member");
        assert_eq!(names(&mut h, OWNER, 2), Ok(vec![(BOB, format!("user{BOB}"))]), "the sender of seq 2");
        assert_eq!(
            names(&mut h, OWNER, 3),
            Ok(vec![(OWNER, format!("user{OWNER}")), (BOB, format!("user{BOB}"))]),
            "the remover and the removed"
        );
        assert_eq!(names(&mut h, OWNER, 1).map(|n| n.len()), Ok(2), "the creation names every first member");
        h.send(OWNER, 2, "pending");
        assert_eq!(names(&mut h, OWNER, 4), Err(ErrorCode::NOT_FOUND), "not durable yet");
        assert_eq!(names(&mut h, OWNER, 0), Err(ErrorCode::NOT_FOUND));
        assert_eq!(names(&mut h, BOB, 2), Err(ErrorCode::FORBIDDEN), "a former member reads nothing");
        assert_eq!(names(&mut h, 9, 2), Err(ErrorCode::FORBIDDEN));
    }

    #[test]
    fn a_delete_leaves_no_version_of_the_text() {
        let mut h = group();
        h.send(BOB, 1, "draft");
        h.commit();
        h.write(BOB, Command::Edit { client_id: [2; 16], target: 2, text: "my password is hunter2".into() });
        h.commit();
        h.write(BOB, Command::Delete { client_id: [3; 16], target: 2 });
        h.commit();
        let history = h.history(OWNER);
        assert!(!format!("{history:?}").contains("hunter2"), "{history:?}");
        assert_eq!(history[1], (2, Body::Tombstone));
        assert_eq!(history[2], (3, Body::Redacted { target: 2 }));
    }

    /// A refusal judged on entries not yet durable waits for them, as an ack does: a
    /// crash before then undoes them, and would have made the refusal false. Before, a
    /// retried removal was told `NOT_FOUND` at once (and the removed member that it is
    /// none), and after a crash the member was still there.
    #[test]
    fn a_refusal_waits_for_the_entries_it_was_judged_on() {
        let mut h = group();
        let first = h.write(OWNER, Command::Remove { user: BOB });
        let retried = h.write(OWNER, Command::Remove { user: BOB });
        let bobs = h.send(BOB, 1, "still here?");
        let invalid = h.send(OWNER, 2, "");
        assert_eq!((h.ack(first), h.ack(retried), h.ack(bobs), h.ack(invalid)), (None, None, None, None));
        h.commit();
        assert_eq!(h.ack(first), Some(Ok((2, false))));
        let refusals = (h.ack(retried), h.ack(bobs), h.ack(invalid));
        let want = (Err(ErrorCode::NOT_FOUND), Err(ErrorCode::FORBIDDEN), Err(ErrorCode::INVALID));
        assert_eq!(refusals, (Some(want.0), Some(want.1), Some(want.2)));
        // The same before a crash: nothing is answered, the removal is lost, bob stays.
        let mut h = group();
        h.write(OWNER, Command::Remove { user: BOB });
        let retried = h.write(OWNER, Command::Remove { user: BOB });
        h.crash_broker();
        assert_eq!(h.ack(retried), None, "no answer from a state that never became durable");
        let Ok(Reply::Members(members)) = h.read(OWNER, Read::Members) else { panic!() };
        assert!(members.iter().any(|m| m.user_id == BOB), "the removal was lost with the crash");
        // With nothing pending a refusal is answered at once.
        let at_once = h.send(OWNER, 3, "");
        assert_eq!(h.ack(at_once), Some(Err(ErrorCode::INVALID)));
    }

    /// Edit and delete answer by what the target is first: a deleted message is
    /// `NOT_FOUND` to everyone (PROTOCOL section 8), someone else's live one `FORBIDDEN`,
    /// a membership entry `INVALID` to its sender. Before, a deleted message of someone
    /// else's was `FORBIDDEN`.
    #[test]
    fn edit_and_delete_answer_by_what_the_target_is() {
        let mut h = group();
        h.send(BOB, 1, "gone soon");
        h.send(BOB, 2, "stays");
        h.commit();
        h.write(BOB, Command::Delete { client_id: [3; 16], target: 2 });
        h.commit();
        let cases =
            [(OWNER, 2, ErrorCode::NOT_FOUND), (BOB, 2, ErrorCode::NOT_FOUND), (OWNER, 3, ErrorCode::FORBIDDEN)];
        for (i, (user, target, code)) in cases.into_iter().enumerate() {
            let id = [10 + 2 * i as u8; 16];
            let edit = h.write(user, Command::Edit { client_id: id, target, text: "x".into() });
            let delete = h.write(user, Command::Delete { client_id: [11 + 2 * i as u8; 16], target });
            h.commit();
            let what = format!("user {user} on seq {target}");
            assert_eq!((h.ack(edit), h.ack(delete)), (Some(Err(code)), Some(Err(code))), "{what}");
        }
        let on_creation = h.write(OWNER, Command::Delete { client_id: [30; 16], target: 1 });
        assert_eq!(h.ack(on_creation), Some(Err(ErrorCode::INVALID)), "the creation entry is no message");
    }

    #[test]
    fn a_successor_replays_each_undelivered_entry_to_the_members_as_of_that_entry() {
        let mut h = group();
        h.send(OWNER, 1, "before carol");
        h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Member });
        h.send(OWNER, 2, "with carol");
        h.write(OWNER, Command::Remove { user: BOB });
        h.send(OWNER, 3, "without bob");
        // The actor dies after applying, before any of it became durable or delivered.
        h.crash_actor();
        let got: Vec<(Seq, Vec<UserId>)> = h.deliveries.iter().map(|d| (d.seq, d.audience.clone())).collect();
        assert_eq!(
            got,
            vec![
                (2, vec![OWNER, BOB]),
                (3, vec![OWNER, BOB, CAROL]),
                (4, vec![OWNER, BOB, CAROL]),
                (5, vec![OWNER, BOB, CAROL]),
                (6, vec![OWNER, CAROL]),
            ]
        );
        // (The dead actor's waiting requests are answered INTERNAL by their dropped
        // responders in the real actor; here they were simply never answered.)
        assert!(h.replies.is_empty(), "nothing was acknowledged: none of it was durable before the crash");
    }

    #[test]
    fn recovering_with_a_replayed_creation_delivers_seq_1_before_any_write() {
        let h = Harness::new(ConversationKind::Group, &[(OWNER, Role::Owner), (BOB, Role::Member)]);
        let created = h.log.now.entries[&1].clone();
        let (mut state, effects) = ConversationState::<u32>::recover(
            CONV,
            (ConversationKind::Group, "t".into()),
            h.log.now.members.clone(),
            1,
            (vec![created], caller(OWNER).session),
            0,
        );
        let first = match &effects[..] {
            [Effect::Deliver { entry, audience, except }] => (entry.seq, audience.len(), *except),
            other => panic!("{other:?}"),
        };
        assert_eq!(first, (1, 2, caller(OWNER).session));
        assert_eq!(state.published_seq(), 1);
        let effects =
            state.handle_write(&h.log, caller(BOB), Command::Send { client_id: [1; 16], text: "x".into() }, 1, 0);
        assert!(matches!(&effects[..], [Effect::Append(e)] if e.seq == 2));
    }

    #[test]
    fn after_a_failed_commit_nothing_is_acknowledged_again() {
        let mut h = group();
        let lost = h.send(BOB, 1, "maybe");
        h.fail_commit();
        assert!(h.fatal, "a failed commit is fatal");
        assert_eq!(h.ack(lost), Some(Err(ErrorCode::INTERNAL)));
        // The entry is in the log (applied, never durable); a resend must not be
        // answered as a duplicate of it.
        let resend = h.send(BOB, 1, "maybe");
        assert_eq!(h.ack(resend), Some(Err(ErrorCode::INTERNAL)));
        h.commit();
        assert!(h.deliveries.is_empty(), "nothing is delivered after the failure");
        assert!(h.read(OWNER, Read::Members).is_err());
    }

    #[test]
    fn a_broker_crash_loses_only_what_was_never_acknowledged() {
        let mut h = group();
        let kept = h.send(BOB, 1, "kept");
        h.commit();
        let lost = h.send(BOB, 2, "lost");
        h.crash_broker();
        assert_eq!(h.ack(kept), Some(Ok((2, false))));
        assert_eq!(h.ack(lost), None);
        let retry = h.send(BOB, 2, "lost");
        h.commit();
        assert_eq!(h.ack(retry), Some(Ok((3, false))), "the retry takes the next seq: no gap");
        assert_eq!(h.history(OWNER).iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn an_idle_conversation_retires_only_with_nothing_pending() {
        let mut h = group();
        h.send(BOB, 1, "x");
        h.now_ms = 60_000;
        assert!(!h.state.handle_tick(h.now_ms, 1_000), "a pending write keeps it alive");
        h.commit();
        assert!(h.state.handle_tick(h.now_ms, 1_000));
        h.send(BOB, 2, "y");
        h.commit();
        assert!(!h.state.handle_tick(h.now_ms + 999, 1_000), "activity resets the idle clock");
    }

    #[test]
    fn catch_up_pages_stop_at_the_durable_seq_and_show_pending_rewrites_as_before() {
        let mut h = group();
        for i in 0..5 {
            h.send(BOB, i + 1, &format!("m{i}"));
        }
        h.commit();
        // Pending: an edit of seq 2 and a new message; neither is served.
        h.write(BOB, Command::Edit { client_id: [9; 16], target: 2, text: "changed".into() });
        h.send(OWNER, 10, "pending");
        let seqs = |page: &[(Seq, Body)]| page.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        let (page, last, complete) = h.catch_up(OWNER, 0, 3);
        assert_eq!((seqs(&page), last, complete), (vec![1, 2, 3], 6, false));
        assert_eq!(page[1].1, text("m0"), "the pending edit is not shown");
        let (page, last, complete) = h.catch_up(OWNER, 3, 100);
        assert_eq!((seqs(&page), last, complete), (vec![4, 5, 6], 6, true), "the page reaches the durable seq");
        let (page, _, complete) = h.catch_up(OWNER, 0, 0);
        assert_eq!((seqs(&page), complete), (vec![1], false), "a limit of 0 is clamped to 1");
        let (page, last, complete) = h.catch_up(OWNER, 6, 100);
        assert_eq!((page.len(), last, complete), (0, 6, true), "nothing after the durable seq: complete");
        let (page, _, complete) = h.catch_up(OWNER, 99, 100);
        assert_eq!((page.len(), complete), (0, true), "a cursor ahead of the log is complete too");
        h.commit();
        let (page, last, complete) = h.catch_up(OWNER, 5, 100);
        assert_eq!((seqs(&page), last, complete), (vec![6, 7, 8], 8, true));
        assert_eq!(h.catch_up(OWNER, 0, 10).0[1].1, Body::Text { text: "changed".into(), edited: true });
        assert_eq!(h.read(9, Read::CatchUp { after: 0, limit: 10 }).unwrap_err(), not_a_member());
    }

    #[test]
    fn catch_up_pages_stop_near_the_byte_bound_and_always_hold_one_entry() {
        use switchboard_protocol::limits::{CATCH_UP_PAGE_BYTES, CATCH_UP_PAGE_MAX, MAX_TEXT_BYTES};
        let mut h = group();
        let big = "x".repeat(MAX_TEXT_BYTES as usize);
        let n = CATCH_UP_PAGE_BYTES / MAX_TEXT_BYTES + 10;
        for i in 0..n {
            h.write(
                BOB,
                Command::Send {
                    client_id: [(i % 256) as u8, (i / 256) as u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    text: big.clone(),
                },
            );
        }
        h.commit();
        let Ok(Reply::CatchUp(page)) = h.read(OWNER, Read::CatchUp { after: 0, limit: CATCH_UP_PAGE_MAX as u16 })
        else {
            panic!()
        };
        let bytes: usize = page.entries.iter().map(|e| encode_frame(e).unwrap().len()).sum();
        assert!(bytes <= CATCH_UP_PAGE_BYTES as usize, "{bytes}");
        assert!(
            bytes + 2 * MAX_TEXT_BYTES as usize > CATCH_UP_PAGE_BYTES as usize,
            "stops only near the bound: {bytes}"
        );
        assert!(!page.complete);
        let held = page.entries.last().unwrap().seq;
        let (rest, _, complete) = h.catch_up(OWNER, held, CATCH_UP_PAGE_MAX as u16);
        assert_eq!(rest.first().map(|(s, _)| *s), Some(held + 1), "the next page goes on gaplessly");
        assert!(complete);
    }

    fn receipt_events(h: &Harness) -> Vec<(UserId, Seq, Option<Seq>, Vec<UserId>)> {
        h.notices
            .iter()
            .flat_map(|n| match &n.event {
                Event::Receipt(r) => vec![(r.user, r.delivered_up_to, r.read_up_to, n.audience.clone())],
                Event::Receipts(rs) => {
                    assert!(rs.len() > 1, "one change goes as Receipt");
                    rs.iter().map(|r| (r.user, r.delivered_up_to, r.read_up_to, n.audience.clone())).collect()
                }
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// A group of three with five durable messages (seqs 2..=6).
    fn chatty() -> Harness {
        let mut h =
            Harness::new(ConversationKind::Group, &[(OWNER, Role::Owner), (BOB, Role::Member), (CAROL, Role::Member)]);
        for i in 0..5 {
            h.send(OWNER, i + 1, "m");
        }
        h.commit();
        h
    }

    #[test]
    fn receipts_never_go_back_and_are_clamped_to_the_durable_seq() {
        let mut h = chatty();
        h.mark(BOB, Mark::Delivered(5));
        h.commit();
        h.mark(BOB, Mark::Delivered(3));
        h.mark(BOB, Mark::Read(2));
        assert_eq!(h.receipt_writes.len(), 2, "the read raises read_up_to only: {:?}", h.receipt_writes);
        h.commit();
        assert_eq!(h.receipts(BOB)[1], (BOB, 5, Some(2)), "an older delivered seq is ignored");
        let read = h.mark(BOB, Mark::Read(1));
        assert_eq!(h.receipt_answer(read), Some(Ok((5, Some(2)))), "nothing changed: answered at once");
        assert_eq!(h.receipt_writes.len(), 2, "and nothing written");
        // Beyond the durable seq: clamped to it (seq 7 is not durable).
        h.send(OWNER, 9, "pending");
        let read = h.mark(BOB, Mark::Read(100));
        h.commit_receipts();
        assert_eq!(h.receipt_answer(read), Some(Ok((6, Some(6)))), "clamped to the durable seq, delivered implied");
        h.commit();
        let read = h.mark(BOB, Mark::Read(100));
        h.commit();
        assert_eq!(h.receipt_answer(read), Some(Ok((7, Some(7)))));
        assert_eq!(h.receipts(CAROL)[1], (BOB, 7, Some(7)));
        assert_eq!(h.receipts(CAROL)[2], (CAROL, 0, Some(0)), "every member is listed");
    }

    /// What `ConvDirectory::mark_read` decides at rest from the log alone agrees with
    /// the actor: a read mark the actor would answer at once, writing nothing, is one
    /// `read_raises` says raises nothing, and `Read::OwnReceipt` answers it the same.
    /// Public and private readers alike.
    #[test]
    fn a_read_mark_that_raises_nothing_is_told_and_answered_from_the_log() {
        let mut h = chatty();
        h.mark(BOB, Mark::Read(3));
        h.commit();
        h.log.private.insert(CAROL);
        h.mark(CAROL, Mark::Read(4));
        h.commit();
        let last = h.log.last_seq();
        for (user, seq) in [(BOB, 0), (BOB, 2), (BOB, 3), (CAROL, 1), (CAROL, 4), (BOB, 100), (CAROL, 5), (OWNER, 1)] {
            let writes = h.receipt_writes.len();
            let raises = crate::conversation::state::read_raises(&h.log, CONV, user, seq, last).unwrap();
            let answer = h.read(user, Read::OwnReceipt).map(|r| match r {
                Reply::Receipt(r) => (r.delivered_up_to, r.read_up_to),
                other => panic!("{other:?}"),
            });
            let read = h.mark(user, Mark::Read(seq));
            let wrote = h.receipt_writes.len() > writes;
            assert_eq!(raises, wrote, "user {user} seq {seq}");
            if !raises {
                assert_eq!(h.receipt_answer(read).map(|a| a.unwrap()), Some(answer.unwrap()), "user {user} seq {seq}");
            }
            h.commit();
        }
        // A stranger's is refused as any read is.
        assert_eq!(h.read(9, Read::OwnReceipt).unwrap_err(), not_a_member());
    }

    #[test]
    fn marks_during_a_write_are_coalesced_into_one_write_and_one_push() {
        let mut h = chatty();
        let first = h.mark(BOB, Mark::Read(2));
        assert_eq!(h.receipt_writes.len(), 1);
        // While that write is in flight: many marks, from two members.
        let mut reads = Vec::new();
        for seq in 3..=6 {
            reads.push(h.mark(BOB, Mark::Read(seq)));
            h.mark(CAROL, Mark::Delivered(seq));
        }
        assert_eq!(h.receipt_writes.len(), 1, "one write at a time");
        assert_eq!(h.receipts(OWNER)[1], (BOB, 0, Some(0)), "nothing shown before it is durable");
        assert!(h.notices.is_empty() && h.receipt_answer(first).is_none());
        h.commit_receipts();
        assert_eq!(h.receipt_answer(first), Some(Ok((2, Some(2)))));
        assert!(reads.iter().all(|r| h.receipt_answer(*r).is_none()), "later reads wait for the next write");
        assert_eq!(h.receipt_writes.len(), 2, "the next write goes out once the first is durable");
        assert_eq!(
            h.receipt_writes[1],
            vec![
                (BOB, Marks { delivered_up_to: 6, read_up_to: 6, shown_read_up_to: 6 }),
                (CAROL, Marks { delivered_up_to: 6, read_up_to: 0, shown_read_up_to: 0 }),
            ],
            "the latest value per member, once"
        );
        h.notices.clear();
        h.commit_receipts();
        for r in &reads {
            assert_eq!(h.receipt_answer(*r), Some(Ok((6, Some(6)))), "answered with the durable watermarks");
        }
        let everyone = vec![OWNER, BOB, CAROL];
        assert_eq!(
            receipt_events(&h),
            vec![(BOB, 6, Some(6), everyone.clone()), (CAROL, 6, Some(0), everyone),],
            "each member once, with the latest value"
        );
        assert_eq!(h.notices.len(), 1, "and both in one frame per device (Event::Receipts), not one per member");
        assert_eq!(h.receipt_writes.len(), 2, "nothing left to write");
        assert!(h.state.handle_tick(h.now_ms + 1_000_000, 1), "idle once everything is durable");
    }

    /// In a group of 1,000 a receipt write starts at most every 50 ms
    /// (`limits::RECEIPT_WRITE_US_PER_MEMBER`): each is pushed to every member, and
    /// unpaced, one member stepping `MarkRead` through the history had one pushed to
    /// all 1,000 per group commit. What comes meanwhile coalesces; a small group is not
    /// paced (the tests above).
    #[test]
    fn a_large_groups_receipt_writes_are_paced_by_its_size() {
        let mut members = vec![(OWNER, Role::Owner)];
        members.extend((100..1099).map(|u| (u, Role::Member)));
        let mut h = Harness::new(ConversationKind::Group, &members);
        for i in 0..5 {
            h.send(OWNER, i + 1, "m");
        }
        h.commit();
        h.now_ms = 1_000;
        h.mark(100, Mark::Read(2));
        assert_eq!(h.receipt_writes.len(), 1, "the first goes at once");
        h.now_ms = 1_010;
        let mut reads: Vec<u32> = (3..=6).map(|seq| h.mark(100, Mark::Read(seq))).collect();
        h.commit_receipts();
        assert_eq!(h.receipt_writes.len(), 1, "the next waits for its pace");
        assert_eq!(h.receipts_at, Some(1_050), "50 ms after the last one started");
        reads.push(h.mark(101, Mark::Read(6)));
        h.mark(102, Mark::Delivered(4));
        assert_eq!(h.receipts_at, Some(1_050), "asked once");
        assert!(reads.iter().all(|r| h.receipt_answer(*r).is_none()));
        h.receipts_due();
        assert_eq!(h.receipt_writes.len(), 2);
        assert_eq!(h.receipt_writes[1].len(), 3, "everything meanwhile in one write, each member once");
        h.commit_receipts();
        assert_eq!(h.receipt_answer(reads[3]), Some(Ok((6, Some(6)))));
        assert_eq!(h.receipt_answer(reads[4]), Some(Ok((6, Some(6)))));
        assert_eq!(h.receipts_at, None, "nothing left to write");
        // Quiet for longer than the pace: the next goes at once.
        h.now_ms = 2_000;
        h.mark(103, Mark::Delivered(6));
        assert_eq!((h.receipt_writes.len(), h.receipts_at), (3, None));
        h.commit_receipts();
        // The wall clock steps back an hour: the next write waits one pace, no more.
        h.now_ms = 1_000_000_000;
        h.mark(104, Mark::Delivered(6));
        h.commit_receipts();
        h.now_ms -= 3_600_000;
        h.mark(105, Mark::Delivered(6));
        assert_eq!(h.receipts_at, Some(h.now_ms + 50));
    }

    #[test]
    fn a_pending_receipt_write_keeps_the_conversation_alive() {
        let mut h = chatty();
        h.now_ms = 10_000;
        h.mark(BOB, Mark::Delivered(3));
        assert!(!h.state.handle_tick(1_000_000, 1), "a receipt write is in flight");
        h.commit_receipts();
        assert!(h.state.handle_tick(1_000_000, 1));
    }

    #[test]
    fn a_delivered_mark_keeps_it_alive_only_until_its_write_is_durable() {
        let mut h = chatty();
        h.now_ms = 10_000;
        h.mark(BOB, Mark::Delivered(3));
        h.commit_receipts();
        assert!(h.state.handle_tick(10_000, 1_000), "idle since the last write, not since the mark");
        // Stepped through a backlog, a mark's write in flight at every tick: the actor
        // lives on, charged to the marker, not to whoever last wrote.
        h.mark(BOB, Mark::Delivered(4));
        assert!(!h.state.handle_tick(10_000, 1_000), "its write is in flight");
        assert!(h.state.idle_but_for_receipts(10_000, 1_000), "past the idle period, kept by the mark alone");
        assert!(!h.state.idle_but_for_receipts(999, 1_000), "within it (the writes were at 0): kept by them");
        h.commit_receipts();
        assert!(!h.state.idle_but_for_receipts(10_000, 1_000), "nothing in flight");
        h.mark(BOB, Mark::Read(3));
        assert!(!h.state.handle_tick(10_999, 1_000), "a read mark's write is in flight");
        h.commit_receipts();
        assert!(h.state.handle_tick(10_999, 1_000), "a read mark is no activity either");
    }

    #[test]
    fn a_read_keeps_nothing_alive() {
        let mut h = chatty();
        h.now_ms = 10_000;
        h.history(BOB);
        h.catch_up(BOB, 0, 10);
        h.read(BOB, Read::Receipts).unwrap();
        assert!(h.state.handle_tick(10_000, 1_000), "idle since the last write, however much was read since");
    }

    #[test]
    fn only_a_write_that_appends_keeps_the_conversation_alive() {
        let mut h = chatty();
        h.now_ms = 9_000;
        // A resend, a write the rules refuse, read marks (one that raises a watermark,
        // one that repeats it): none is activity.
        let resend = h.send(OWNER, 1, "m");
        let refused = h.write(BOB, Command::Edit { client_id: [11; 16], target: 2, text: "not mine".into() });
        let raised = h.mark(BOB, Mark::Read(3));
        h.commit_receipts();
        let repeated = h.mark(BOB, Mark::Read(3));
        assert_eq!(h.ack(resend), Some(Ok((2, true))));
        assert!(matches!(h.ack(refused), Some(Err(_))), "{:?}", h.ack(refused));
        assert_eq!(h.receipt_answer(raised), Some(Ok((3, Some(3)))));
        assert_eq!(h.receipt_answer(repeated), Some(Ok((3, Some(3)))));
        assert!(h.state.handle_tick(10_000, 10_000), "idle since the writes at 0, whatever came since");
        assert_eq!(h.state.take_charges().writer, Some(OWNER), "charged to the writer of the appends at 0 only");
        // Nor is a start: an actor started by any request lives no idle period for it.
        h.restart(None);
        assert!(h.state.handle_tick(9_000, 9_000), "a start with nothing to deliver");
        assert_eq!(h.state.take_charges().writer, None);
        h.restart(Some(5));
        assert!(!h.state.handle_tick(9_000, 9_000), "a start that delivers entries (a creation, a dead one's)");
        assert_eq!(h.state.take_charges().writer, Some(OWNER), "charged to the replayed entries' writer");
        h.send(CAROL, 1, "new");
        h.commit();
        assert!(!h.state.handle_tick(10_000, 10_000), "a write that appends is activity");
        assert_eq!(h.state.take_charges().writer, Some(CAROL));
    }

    #[test]
    fn only_a_mark_that_raises_a_watermark_charges_its_member() {
        let mut h = chatty();
        h.state.take_charges();
        let marker = |h: &mut Harness| h.state.take_charges().marker;
        h.mark(BOB, Mark::Delivered(3));
        assert_eq!(marker(&mut h), Some(BOB), "its write in flight");
        h.mark(BOB, Mark::Delivered(4));
        assert_eq!(marker(&mut h), Some(BOB), "its write next");
        h.mark(CAROL, Mark::Delivered(0));
        h.mark(OWNER, Mark::Read(0));
        assert_eq!(marker(&mut h), None, "raised nothing");
        h.commit_receipts();
        h.commit_receipts();
        h.mark(BOB, Mark::Delivered(4));
        assert_eq!(marker(&mut h), None, "a repeat raises nothing");
        let stranger = 99;
        h.mark(stranger, Mark::Read(5));
        assert_eq!(marker(&mut h), None, "a stranger's writes nothing");
    }

    #[test]
    fn a_crash_before_the_receipt_commit_loses_no_acknowledged_read_and_shows_nothing_undurable() {
        let mut h = chatty();
        let kept = h.mark(BOB, Mark::Read(3));
        h.commit_receipts();
        assert_eq!(h.receipt_answer(kept), Some(Ok((3, Some(3)))));
        let lost = h.mark(BOB, Mark::Read(5));
        h.mark(CAROL, Mark::Delivered(6));
        assert_eq!(h.receipts(OWNER)[1..], [(BOB, 3, Some(3)), (CAROL, 0, Some(0))], "only durable values");
        h.crash_broker();
        assert_eq!(h.receipt_answer(lost), None, "never acknowledged");
        assert_eq!(h.receipts(OWNER)[1..], [(BOB, 3, Some(3)), (CAROL, 0, Some(0))], "the acknowledged read survives");
        let retry = h.mark(BOB, Mark::Read(5));
        h.commit_receipts();
        assert_eq!(h.receipt_answer(retry), Some(Ok((5, Some(5)))));
        // A failed commit: the waiting read is refused, nothing more is shown or pushed.
        let refused = h.mark(BOB, Mark::Read(6));
        h.notices.clear();
        h.fail_receipts_commit();
        assert!(h.fatal);
        assert_eq!(h.receipt_answer(refused), Some(Err(ErrorCode::INTERNAL)));
        assert!(h.notices.is_empty());
    }

    #[test]
    fn a_blocked_user_cannot_write_to_its_blocker_nor_add_it_anywhere() {
        let mut h = Harness::new(ConversationKind::Direct, &[(OWNER, Role::Member), (BOB, Role::Member)]);
        let before = h.send(BOB, 1, "hi");
        h.commit();
        assert_eq!(h.ack(before), Some(Ok((2, false))));
        h.log.blocks.insert((OWNER, BOB));
        let refused = h.send(BOB, 2, "hello?");
        assert_eq!(h.ack(refused), Some(Err(ErrorCode::FORBIDDEN)));
        let edit = h.write(BOB, Command::Edit { client_id: [3; 16], target: 2, text: "HELLO".into() });
        assert_eq!(h.ack(edit), Some(Err(ErrorCode::FORBIDDEN)));
        let file = switchboard_protocol::FileRef {
            file: [7; 16],
            name: "cat.png".into(),
            size: 10,
            content_type: "image/png".into(),
        };
        let files = h.write(BOB, Command::SendFiles { client_id: [4; 16], text: String::new(), files: vec![file] });
        assert_eq!(h.ack(files), Some(Err(ErrorCode::FORBIDDEN)));
        // A resend of what landed before the block still gets its answer, and bob may
        // still take back his own words; the blocker writes nothing to whom it blocks
        // (before, it wrote on to someone who could not answer), and may delete its own.
        let resend = h.send(BOB, 1, "hi");
        assert_eq!(h.ack(resend), Some(Ok((2, true))));
        let delete = h.write(BOB, Command::Delete { client_id: [5; 16], target: 2 });
        let owner = h.send(OWNER, 6, "go away");
        let Some(Err(said)) = h.reply(owner).cloned() else { panic!("the blocker's message was not refused") };
        let refusal = (said.code, said.message.as_str());
        assert_eq!(refusal, (ErrorCode::FORBIDDEN, "you block user2: unblock them to write here"));
        h.commit();
        assert_eq!(h.ack(delete), Some(Ok((3, false))));
        assert_eq!(h.delivered_seqs(), vec![2, 3], "nothing refused was delivered");
        // Receipts would tell bob when the owner was online: each hears only of its own.
        h.notices.clear();
        h.mark(OWNER, Mark::Delivered(3));
        h.commit_receipts();
        assert_eq!(receipt_events(&h), vec![(OWNER, 3, Some(0), vec![OWNER])]);
        assert_eq!(h.receipts(BOB)[0], (OWNER, 0, None), "read as if the owner never reported");
        assert_eq!(h.receipts(OWNER)[0], (OWNER, 3, Some(0)), "the owner's own, as they are");
        h.log.blocks.clear();
        assert_eq!(h.receipts(BOB)[0], (OWNER, 3, Some(0)), "shown again once unblocked");
        let after = h.send(BOB, 7, "sorry");
        let owner = h.send(OWNER, 6, "go away");
        h.commit();
        assert_eq!(h.ack(after), Some(Ok((4, false))), "unblocked: bob writes again");
        assert_eq!(h.ack(owner), Some(Ok((5, false))), "and so does the owner");

        // In a group: an admin cannot add someone who blocks them; a plain member is
        // told only that it may not add anyone (the block is not its business).
        let mut g =
            Harness::new(ConversationKind::Group, &[(OWNER, Role::Owner), (BOB, Role::Admin), (4, Role::Member)]);
        g.log.blocks.insert((CAROL, BOB));
        let add = g.write(BOB, Command::Add { users: vec![CAROL], role: Role::Member });
        let Some(Err(refused)) = g.reply(add) else { panic!("{:?}", g.reply(add)) };
        assert_eq!(
            (refused.code, refused.message.as_str()),
            (ErrorCode::FORBIDDEN, "user3 does not accept being added by you")
        );
        let by_member = g.write(4, Command::Add { users: vec![CAROL], role: Role::Member });
        let Some(Err(refused)) = g.reply(by_member) else { panic!() };
        assert_eq!(refused.message, "only the owner or an admin may change members");
        let by_owner = g.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Member });
        g.commit();
        assert_eq!(g.ack(by_owner), Some(Ok((2, false))), "carol blocks bob, not the owner");
        // In a group bob's messages reach every member, carol too: a block is about
        // being reached directly, not about what a shared group shows.
        let said = g.send(BOB, 8, "welcome");
        g.commit();
        assert_eq!(g.ack(said), Some(Ok((3, false))));
        assert!(g.deliveries.last().unwrap().audience.contains(&CAROL));
    }

    /// In a group, a member's receipts are not shown to the members it blocks, as its
    /// presence is not: carol blocks bob, so bob hears nothing of her reads and sees
    /// her as one that never reported; the owner sees them, and carol sees bob's.
    /// Before, bob was pushed when carol came online and what she read.
    #[test]
    fn a_groups_receipts_are_not_shown_to_whom_the_marker_blocks() {
        let mut h = chatty();
        h.log.blocks.insert((CAROL, BOB));
        h.notices.clear();
        h.mark(CAROL, Mark::Read(3));
        h.commit_receipts();
        assert_eq!(receipt_events(&h), vec![(CAROL, 3, Some(3), vec![OWNER, CAROL])]);
        let carol_as_seen_by = |h: &mut Harness, viewer| h.receipts(viewer).into_iter().find(|r| r.0 == CAROL).unwrap();
        assert_eq!(carol_as_seen_by(&mut h, BOB), (CAROL, 0, None));
        assert_eq!(carol_as_seen_by(&mut h, OWNER), (CAROL, 3, Some(3)));
        let Ok(Reply::CatchUp(page)) = h.read(BOB, Read::CatchUp { after: 0, limit: 100 }) else { panic!() };
        assert_eq!(
            page.receipts.iter().find(|r| r.user == CAROL).map(|r| (r.delivered_up_to, r.read_up_to)),
            Some((0, None))
        );
        // Bob's receipts reach carol as everyone's do.
        h.notices.clear();
        h.mark(BOB, Mark::Read(2));
        h.commit_receipts();
        assert_eq!(receipt_events(&h), vec![(BOB, 2, Some(2), vec![OWNER, BOB, CAROL])]);
        // A private member who blocks: the others who may see its delivery, but not bob.
        h.log.private.insert(CAROL);
        h.notices.clear();
        h.mark(CAROL, Mark::Delivered(5));
        h.commit_receipts();
        assert_eq!(receipt_events(&h), vec![(CAROL, 5, None, vec![OWNER]), (CAROL, 5, Some(3), vec![CAROL])]);
        // Unblocked: shown to all again.
        h.log.blocks.clear();
        h.log.private.clear();
        assert_eq!(carol_as_seen_by(&mut h, BOB), (CAROL, 5, Some(3)));
    }

    const DAVE: UserId = 4;
    const ERIN: UserId = 5;

    /// `first`'s mark is written alone, then `then`'s marks (`mark` each), which waited
    /// behind it, in one write: `h.notices` holds that second write's pushes.
    fn second_receipt_write(h: &mut Harness, first: (UserId, Mark), then: [UserId; 4], mark: Mark) {
        h.mark(first.0, first.1);
        for user in then {
            h.mark(user, mark);
        }
        h.commit_receipts();
        h.notices.clear();
        h.commit_receipts();
    }

    /// A group of five (the owner, bob, carol, dave, erin) with one durable message (seq 2).
    fn five() -> Harness {
        let members = [
            (OWNER, Role::Owner),
            (BOB, Role::Member),
            (CAROL, Role::Member),
            (DAVE, Role::Member),
            (ERIN, Role::Member),
        ];
        let mut h = Harness::new(ConversationKind::Group, &members);
        h.send(OWNER, 1, "m");
        h.commit();
        h
    }

    /// Writers with long block lists hold their group's next receipt write back by what
    /// reading the lists cost (`limits::RECEIPT_WRITE_US_PER_BLOCK_UNIT` per key), however
    /// small the group; a write of members who block nobody holds nothing back. Before,
    /// every write read every writer's whole list at the member pace alone (none in a
    /// group this small), uncharged: an attacker review.
    #[test]
    fn long_block_lists_hold_the_next_receipt_write_back() {
        let mut h = five();
        h.now_ms = 1_000;
        for blocker in [CAROL, DAVE, ERIN] {
            h.log.blocks.extend((10_000..11_024).map(|u| (blocker, u)));
        }
        second_receipt_write(&mut h, (OWNER, Mark::Delivered(1)), [BOB, CAROL, DAVE, ERIN], Mark::Delivered(2));
        assert_eq!(h.receipt_writes.len(), 2, "the owner's write, blocking nobody, held nothing back");
        h.mark(BOB, Mark::Read(2));
        assert_eq!(h.receipt_writes.len(), 2, "the next waits for what the blocks cost");
        assert_eq!(h.receipts_at, Some(1_003), "3 x 1,024 keys at 1 µs each");
        h.receipts_due();
        assert_eq!(h.receipt_writes.len(), 3);
        h.commit_receipts();
        h.mark(OWNER, Mark::Read(2));
        assert_eq!((h.receipt_writes.len(), h.receipts_at), (4, None), "bob blocks nobody: at once");
    }

    /// Many members blocking one: a write's receipts go in one frame to everyone but the
    /// blocked member, and one frame to it of what it may see (before, a frame per
    /// blocking writer to nearly every member).
    #[test]
    fn receipts_of_many_who_block_one_member_share_a_frame() {
        let mut h = five();
        for blocker in [CAROL, DAVE, ERIN] {
            h.log.blocks.insert((blocker, BOB));
        }
        // Bob's mark is written first; the others wait and share the next write.
        second_receipt_write(&mut h, (BOB, Mark::Delivered(2)), [OWNER, CAROL, DAVE, ERIN], Mark::Read(2));
        let frames: Vec<&Vec<UserId>> = h.notices.iter().map(|n| &n.audience).collect();
        assert_eq!(frames, vec![&vec![OWNER, CAROL, DAVE, ERIN], &vec![BOB]], "a shared frame, and one for bob");
        let to_bob: Vec<UserId> = receipt_events(&h).into_iter().filter(|e| e.3 == [BOB]).map(|e| e.0).collect();
        assert_eq!(to_bob, vec![OWNER], "bob is shown the owner's receipt alone");
        assert_eq!(receipt_events(&h).len(), 5);
    }

    /// One member blocking all the others: its receipts go to nobody else, and the others'
    /// still in shared frames (one for the members it hides from, not one each).
    /// Private members it hides from still see the other private members' delivery,
    /// and their own full marks only on their own devices.
    #[test]
    fn a_member_who_blocks_everyone_makes_one_frame_more_not_one_per_member() {
        let mut h = five();
        for other in [OWNER, CAROL, DAVE, ERIN] {
            h.log.blocks.insert((BOB, other));
        }
        h.log.private.insert(DAVE);
        h.log.private.insert(ERIN);
        second_receipt_write(&mut h, (OWNER, Mark::Delivered(1)), [BOB, CAROL, DAVE, ERIN], Mark::Delivered(2));
        let events = receipt_events(&h);
        // Bob's receipt reaches bob alone.
        assert_eq!(events.iter().filter(|e| e.0 == BOB).map(|e| e.3.clone()).collect::<Vec<_>>(), vec![vec![BOB]]);
        // Dave sees erin's delivery and his own once each, and nothing of bob's.
        let to_dave: Vec<(UserId, Option<Seq>)> =
            events.iter().filter(|e| e.3.contains(&DAVE)).map(|e| (e.0, e.2)).collect();
        assert_eq!(to_dave.iter().filter(|e| e.0 == ERIN).count(), 1, "{events:?}");
        assert_eq!(to_dave.iter().filter(|e| e.0 == DAVE).collect::<Vec<_>>(), vec![&(DAVE, Some(0))], "{events:?}");
        assert!(to_dave.iter().all(|e| e.0 != BOB));
        // Frames: two to bob (the public receipts, the private members' delivery), one
        // for all the public members bob hides from, one for each of the two private
        // ones, and each private member's own: seven, however many public members.
        assert_eq!(h.notices.len(), 7, "{:?}", h.notices);
    }

    #[test]
    fn private_read_receipts_are_shown_to_their_owner_only() {
        let mut h = chatty();
        h.log.private.insert(BOB);
        h.mark(BOB, Mark::Delivered(2));
        h.commit_receipts();
        h.notices.clear();
        let read = h.mark(BOB, Mark::Read(4));
        h.commit_receipts();
        // Bob's own devices are shown delivered never below read (PROTOCOL.md 5.3;
        // before: delivered 2, read 4); the others still see delivered 2.
        assert_eq!(h.receipt_answer(read), Some(Ok((4, Some(4)))), "bob's own answer shows it");
        assert_eq!(
            receipt_events(&h),
            vec![(BOB, 4, Some(4), vec![BOB])],
            "bob's devices see his read mark; the others hear nothing when only it moved, \
             and a private read does not raise delivery, which they would see"
        );
        assert_eq!(h.receipts(OWNER)[1], (BOB, 2, None));
        assert_eq!(h.receipts(BOB)[1], (BOB, 4, Some(4)));
        h.notices.clear();
        h.mark(BOB, Mark::Delivered(4));
        h.commit_receipts();
        assert_eq!(
            receipt_events(&h),
            vec![(BOB, 4, None, vec![OWNER, CAROL]), (BOB, 4, Some(4), vec![BOB])],
            "delivery reaches the others, the read mark still only bob"
        );
        let Ok(Reply::CatchUp(page)) = h.read(CAROL, Read::CatchUp { after: 0, limit: 100 }) else { panic!() };
        assert!(page.complete);
        assert_eq!(page.receipts.iter().find(|r| r.user == BOB).map(|r| r.read_up_to), Some(None));
        // Reads made while private stay hidden once bob's receipts are public again
        // (before: read 4 shown at once, telling when he turned them public).
        h.log.private.clear();
        assert_eq!(h.receipts(OWNER)[1], (BOB, 4, Some(0)));
        assert_eq!(h.receipts(BOB)[1], (BOB, 4, Some(4)), "his own devices see them");
        // His next read while public is shown.
        h.notices.clear();
        h.mark(BOB, Mark::Read(4));
        h.commit_receipts();
        assert_eq!(receipt_events(&h), vec![(BOB, 4, Some(4), vec![OWNER, BOB, CAROL])]);
        assert_eq!(h.receipts(OWNER)[1], (BOB, 4, Some(4)));
    }

    /// A member who read 2 in public, then 4 while private, is shown read 2 once public
    /// again, a delivery of 3 meanwhile shown to others without the read; a later public
    /// read is shown whole. The store keeps the shown mark apart (`shown_read_up_to`).
    #[test]
    fn reads_made_while_private_are_never_shown() {
        let mut h = chatty();
        h.mark(BOB, Mark::Read(2));
        h.commit_receipts();
        h.log.private.insert(BOB);
        h.mark(BOB, Mark::Read(4));
        h.commit_receipts();
        h.log.private.clear();
        assert_eq!(h.receipts(CAROL)[1], (BOB, 2, Some(2)));
        h.notices.clear();
        // A delivery mark moves what others see, not the read mark.
        h.mark(BOB, Mark::Delivered(3));
        h.commit_receipts();
        assert_eq!(
            receipt_events(&h),
            vec![(BOB, 3, Some(2), vec![OWNER, CAROL]), (BOB, 4, Some(4), vec![BOB])],
            "the others see delivered 3, read 2; bob's devices his own"
        );
        let Ok(Reply::CatchUp(page)) = h.read(CAROL, Read::CatchUp { after: 0, limit: 100 }) else { panic!() };
        let bob = page.receipts.iter().find(|r| r.user == BOB).unwrap();
        assert_eq!((bob.delivered_up_to, bob.read_up_to), (3, Some(2)));
        // A read while private pushes nothing to the others.
        h.notices.clear();
        h.log.private.insert(BOB);
        h.mark(BOB, Mark::Read(5));
        h.commit_receipts();
        assert_eq!(receipt_events(&h), vec![(BOB, 5, Some(5), vec![BOB])]);
        h.log.private.clear();
        h.notices.clear();
        h.mark(BOB, Mark::Delivered(4));
        h.commit_receipts();
        assert_eq!(receipt_events(&h), vec![(BOB, 4, Some(2), vec![OWNER, CAROL]), (BOB, 5, Some(5), vec![BOB])]);
        assert_eq!(h.receipts(OWNER)[1], (BOB, 4, Some(2)));
        // Read publicly: shown.
        h.mark(BOB, Mark::Read(5));
        h.commit_receipts();
        assert_eq!(h.receipts(OWNER)[1], (BOB, 5, Some(5)));
        assert_eq!(h.receipts(BOB)[1], (BOB, 5, Some(5)));
    }

    #[test]
    fn private_members_deliveries_reach_everyone_in_shared_frames() {
        // The owner, two public members and 64 who keep reads private, all of whom mark
        // a delivery in one receipt write (carol a read).
        const PRIVATE: std::ops::Range<UserId> = 10..74;
        let mut members = vec![(OWNER, Role::Owner), (BOB, Role::Member), (CAROL, Role::Member)];
        members.extend(PRIVATE.map(|u| (u, Role::Member)));
        let mut h = Harness::new(ConversationKind::Group, &members);
        for i in 0..4 {
            h.send(OWNER, i + 1, "m");
        }
        h.commit();
        h.log.private.extend(PRIVATE);
        // A first mark starts a write; those made meanwhile go together in the next.
        h.mark(BOB, Mark::Delivered(2));
        for u in PRIVATE {
            h.mark(u, Mark::Delivered(4));
        }
        h.mark(CAROL, Mark::Read(4));
        h.commit_receipts();
        // (67 members: the next write starts 3 ms after the first.)
        h.receipts_due();
        h.notices.clear();
        h.commit_receipts();
        assert_eq!(h.receipt_writes.last().map(Vec::len), Some(65), "one write of 65 changes");
        // What each member's devices were told, in order.
        let mut seen: HashMap<UserId, HashMap<UserId, (Seq, Option<Seq>)>> = HashMap::new();
        for (user, delivered, read, audience) in receipt_events(&h) {
            for to in audience {
                seen.entry(to).or_default().insert(user, (delivered, read));
            }
        }
        for (to, _) in &members {
            let view = &seen[to];
            assert_eq!(view[&CAROL], (4, Some(4)), "{to} sees carol's read");
            for u in PRIVATE {
                let expect = if u == *to { (4, Some(0)) } else { (4, None) };
                assert_eq!(view[&u], expect, "{to} about {u}: delivery, and a read mark only its own");
            }
        }
        // No device is ever shown its own read hidden, nor anyone else's private read.
        for (user, _, read, audience) in receipt_events(&h) {
            assert!(read.is_some() || !audience.contains(&user), "{user} shown its own read hidden");
            assert!(read.is_none() || !h.log.private.contains(&user) || audience == vec![user]);
        }
        // Every frame is shared: the write encoded about n log n receipts, not one frame
        // of every change for each private member (64 × 65 before).
        let encoded: usize = receipt_events(&h).len();
        assert!(encoded <= 65 + 64 + 64 * 7, "{encoded} receipts encoded for one write of 65 changes");
    }

    #[test]
    fn strangers_marks_change_nothing_and_a_removed_members_receipts_go() {
        let mut h = chatty();
        let read = h.mark(9, Mark::Read(3));
        h.mark(9, Mark::Delivered(3));
        assert_eq!(h.receipt_answer(read), Some(Err(ErrorCode::FORBIDDEN)));
        assert!(h.receipt_writes.is_empty(), "nothing written for a stranger");
        assert_eq!(h.read(9, Read::Receipts).unwrap_err(), not_a_member());
        h.mark(CAROL, Mark::Read(4));
        h.commit();
        assert_eq!(h.receipts(OWNER).len(), 3);
        h.write(OWNER, Command::Remove { user: CAROL });
        h.commit();
        assert_eq!(h.receipts(OWNER).iter().map(|r| r.0).collect::<Vec<_>>(), vec![OWNER, BOB]);
        assert_eq!(h.state.receipt_entries(), 2, "the removed member's entry is dropped");
        // Added back: the stored watermarks come back (they never go backwards).
        h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Member });
        h.commit();
        h.mark(CAROL, Mark::Delivered(2));
        h.commit();
        assert_eq!(h.receipts(OWNER)[2], (CAROL, 4, Some(4)));
        // Catch-up carries the receipts on its completing page only.
        let Ok(Reply::CatchUp(page)) = h.read(OWNER, Read::CatchUp { after: 0, limit: 2 }) else { panic!() };
        assert!(!page.complete && page.receipts.is_empty());
        let Ok(Reply::CatchUp(page)) = h.read(OWNER, Read::CatchUp { after: 2, limit: 100 }) else { panic!() };
        assert!(page.complete);
        assert_eq!(page.receipts.len(), 3);
    }

    #[test]
    fn a_read_answered_after_its_reader_was_removed_still_shows_its_watermarks() {
        let mut h = chatty();
        let read = h.mark(CAROL, Mark::Read(4));
        h.write(OWNER, Command::Remove { user: CAROL });
        h.commit_to(7);
        assert_eq!(h.receipt_answer(read), None, "the receipt write is not durable yet");
        h.commit_receipts();
        assert_eq!(h.receipt_answer(read), Some(Ok((4, Some(4)))));
        assert!(receipt_events(&h).is_empty(), "a removed member's watermarks are not pushed");
        assert_eq!(h.receipts(OWNER).iter().map(|r| r.0).collect::<Vec<_>>(), vec![OWNER, BOB]);
        assert_eq!(h.state.receipt_entries(), 2, "and not held once written");
    }

    #[test]
    fn a_deleted_messages_files_are_released_once_the_delete_is_durable() {
        let mut h = Harness::new(ConversationKind::Group, &[(OWNER, Role::Owner), (BOB, Role::Member)]);
        let file = |n: u8| switchboard_protocol::FileRef {
            file: [n; 16],
            name: format!("f{n}"),
            size: 10,
            content_type: "application/octet-stream".into(),
        };
        let files = vec![file(1), file(2)];
        let sent = h.write(BOB, Command::SendFiles { client_id: [1; 16], text: "two".into(), files });
        let other = h.write(BOB, Command::SendFiles { client_id: [2; 16], text: String::new(), files: vec![file(3)] });
        h.commit();
        assert_eq!((h.ack(sent), h.ack(other)), (Some(Ok((2, false))), Some(Ok((3, false)))));
        // An edit keeps the files; a plain message's delete releases none.
        let edit = h.write(BOB, Command::Edit { client_id: [3; 16], target: 2, text: "both".into() });
        let text = h.send(BOB, 4, "words");
        h.commit();
        let deleted = h.write(BOB, Command::Delete { client_id: [5; 16], target: 5 });
        h.commit();
        assert_eq!(
            (h.ack(edit), h.ack(text), h.ack(deleted)),
            (Some(Ok((4, false))), Some(Ok((5, false))), Some(Ok((6, false))))
        );
        assert!(h.released.is_empty());
        // Released only once durable: a crash before then releases nothing.
        let lost = h.write(BOB, Command::Delete { client_id: [6; 16], target: 3 });
        assert!(h.released.is_empty(), "not before it is durable");
        h.crash_broker();
        assert!(h.released.is_empty() && h.ack(lost).is_none());
        let delete = h.write(BOB, Command::Delete { client_id: [7; 16], target: 2 });
        // Someone added after the delete never saw the files: not told they are gone.
        h.write(OWNER, Command::Add { users: vec![CAROL], role: Role::Member });
        h.commit();
        assert_eq!(h.ack(delete), Some(Ok((7, false))));
        assert_eq!(h.released, vec![[1; 16], [2; 16]]);
        assert_eq!(h.released_to, vec![vec![OWNER, BOB]]);
    }

    #[test]
    fn permission_table() {
        let mut h =
            Harness::new(ConversationKind::Group, &[(OWNER, Role::Owner), (BOB, Role::Admin), (CAROL, Role::Member)]);
        let mut check = |who: UserId, cmd: Command, want: Result<(), ErrorCode>| {
            let id = h.write(who, cmd.clone());
            h.commit();
            let got = h.ack(id).expect("answered").map(|_| ());
            assert_eq!(got, want, "{who} {cmd:?}");
        };
        let send = |id: u8, t: &str| Command::Send { client_id: [id; 16], text: t.into() };
        check(CAROL, send(1, "hello"), Ok(()));
        check(9, send(2, "hello"), Err(ErrorCode::FORBIDDEN));
        check(CAROL, send(3, ""), Err(ErrorCode::INVALID));
        check(
            CAROL,
            send(4, &"x".repeat(switchboard_protocol::limits::MAX_TEXT_BYTES as usize + 1)),
            Err(ErrorCode::INVALID),
        );
        check(CAROL, Command::Add { users: vec![4], role: Role::Member }, Err(ErrorCode::FORBIDDEN));
        check(BOB, Command::Add { users: vec![4], role: Role::Member }, Ok(()));
        check(BOB, Command::Add { users: vec![CAROL], role: Role::Member }, Err(ErrorCode::CONFLICT));
        check(OWNER, Command::Add { users: vec![5], role: Role::Owner }, Err(ErrorCode::INVALID));
        check(BOB, Command::Remove { user: OWNER }, Err(ErrorCode::FORBIDDEN));
        check(CAROL, Command::Remove { user: BOB }, Err(ErrorCode::FORBIDDEN));
        check(OWNER, Command::Remove { user: 9 }, Err(ErrorCode::NOT_FOUND));
        check(OWNER, Command::Leave, Err(ErrorCode::FORBIDDEN));
        check(BOB, Command::Remove { user: 4 }, Ok(()));
        // Carol's message is seq 2.
        check(BOB, Command::Edit { client_id: [5; 16], target: 2, text: "n".into() }, Err(ErrorCode::FORBIDDEN));
        check(CAROL, Command::Edit { client_id: [6; 16], target: 99, text: "n".into() }, Err(ErrorCode::NOT_FOUND));
        check(CAROL, Command::Edit { client_id: [7; 16], target: 1, text: "n".into() }, Err(ErrorCode::FORBIDDEN));
        check(CAROL, Command::Delete { client_id: [8; 16], target: 2 }, Ok(()));
        check(CAROL, Command::Delete { client_id: [9; 16], target: 2 }, Err(ErrorCode::NOT_FOUND));
        check(CAROL, Command::Leave, Ok(()));

        let mut direct = Harness::new(ConversationKind::Direct, &[(OWNER, Role::Member), (BOB, Role::Member)]);
        let leave = direct.write(OWNER, Command::Leave);
        let add = direct.write(OWNER, Command::Add { users: vec![3], role: Role::Member });
        assert_eq!(
            (direct.ack(leave), direct.ack(add)),
            (Some(Err(ErrorCode::INVALID)), Some(Err(ErrorCode::INVALID)))
        );
    }
}
