//! `ConversationState`: every rule and ordering of one conversation, with no I/O, no
//! clock and no actor. Inputs arrive through `handle_*` methods; each returns the
//! effects the driver must perform, in order (write this entry, answer this request,
//! deliver this entry to these users). The conversation actor is one driver; the
//! deterministic harness in `harness.rs` is another, with an in-memory log, a virtual
//! clock and a crash switch; `actor::answer_at_rest` a third, for one read of a
//! conversation with no live actor (a state loaded, asked, and dropped).
//!
//! The rules it keeps:
//! - seqs are assigned here only, gapless, one append at a time;
//! - an acknowledgement and a delivery happen only once the entry is durable, in seq
//!   order; a request answered from an earlier entry (a resend) waits for that entry;
//! - a resend of an applied client id answers its original seq before any permission
//!   check, so a sender removed since can still learn that its message landed;
//! - reads (history, members) serve durable state only: entries up to the durable seq,
//!   and the pre-image of any message a not-yet-durable edit or delete rewrote;
//! - each entry goes to the members before and after it (so the removed hear of their
//!   removal and the added of their addition), including entries replayed by the
//!   successor of an actor that died;
//! - receipt watermarks (`receipts.rs`) are reported by members only, clamped to the
//!   durable seq, shown and pushed once durable, and a private reader's `read_up_to` is
//!   shown to that reader alone;
//! - after a failed write or commit nothing is acknowledged again (`Effect::Fatal`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use switchboard_protocol::limits::{
    CATCH_UP_PAGE_BYTES, CATCH_UP_PAGE_MAX, HISTORY_PAGE_MAX, MAX_EDITS_PER_MESSAGE, MAX_FILES_PER_MESSAGE,
    MAX_GROUP_MEMBERS, MAX_TEXT_BYTES,
};
use switchboard_protocol::{
    Body, CatchUpPage, ClientMsgId, ConvId, ConversationKind, DeviceId, Entry, ErrorBody, ErrorCode, Event, FileId,
    FileRef, Member, Page, Receipt, Reply, Role, Seq, UserId, UserName, encode_frame,
};

use super::receipts::{Marks, ReceiptBook};
use crate::error::internal;

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// User.
    pub user: UserId,
    /// Device.
    pub device: DeviceId,
    /// Session (excluded from the fan-out of its own writes: it gets the ack).
    pub session: u64,
}

/// A change to the log.
#[derive(Clone, Debug)]
pub enum Command {
    /// New text message.
    Send {
        /// Idempotency key.
        client_id: ClientMsgId,
        /// Text.
        text: String,
    },
    /// Replace my message's text.
    Edit {
        /// Idempotency key.
        client_id: ClientMsgId,
        /// Edited message.
        target: Seq,
        /// New text.
        text: String,
    },
    /// Tombstone my message (and redact its edits).
    Delete {
        /// Idempotency key.
        client_id: ClientMsgId,
        /// Deleted message.
        target: Seq,
    },
    /// New message carrying files, checked by the caller as readable by the sender and
    /// started (`files::requests::files_to_send`); a caption may be empty.
    SendFiles {
        /// Idempotency key.
        client_id: ClientMsgId,
        /// Caption.
        text: String,
        /// The files, as the message carries them.
        files: Vec<FileRef>,
    },
    /// Add users (group, owner/admin).
    Add {
        /// Users to add.
        users: Vec<UserId>,
        /// Their role (never owner).
        role: Role,
    },
    /// Remove a member (group, owner/admin).
    Remove {
        /// Member to remove.
        user: UserId,
    },
    /// Leave (group).
    Leave,
    /// Change a member's role (group, owner only); `Owner` hands over ownership.
    SetRole {
        /// The member.
        user: UserId,
        /// The new role.
        role: Role,
    },
    /// Rename the group (owner/admin).
    SetTitle {
        /// The new title (a label: `auth::check_label`).
        title: String,
    },
}

impl Command {
    pub(crate) fn client_id(&self) -> Option<&ClientMsgId> {
        match self {
            Command::Send { client_id, .. }
            | Command::Edit { client_id, .. }
            | Command::Delete { client_id, .. }
            | Command::SendFiles { client_id, .. } => Some(client_id),
            _ => None,
        }
    }
}

/// A read of durable state.
#[derive(Clone, Copy, Debug)]
pub enum Read {
    /// A page of the log.
    History {
        /// Which page.
        page: Page,
        /// At most this many entries (capped at `HISTORY_PAGE_MAX`).
        limit: u16,
    },
    /// The members with their names and roles.
    Members,
    /// A catch-up page: the entries after `after`, ascending, as history shows them.
    CatchUp {
        /// The seq the device holds everything up to.
        after: Seq,
        /// At most this many entries (clamped to 1..=`CATCH_UP_PAGE_MAX`; the page also
        /// stops at `CATCH_UP_PAGE_BYTES`).
        limit: u16,
    },
    /// Every member's receipt watermarks.
    Receipts,
    /// The names of the users one durable entry names (`EntryNames`).
    Names {
        /// The entry.
        seq: Seq,
    },
    /// The caller's own durable watermarks: the answer to a `MarkRead` that raises
    /// nothing, served as a read (`ConvDirectory::mark_read`), so that it starts no
    /// actor.
    OwnReceipt,
}

impl Read {
    /// Whether it may list members (all but `History`): such reads spend the reader's
    /// allowance of member rows (`UserDirectory::allow_member_reads`); a `CatchUp` page
    /// lists them when it is complete, so every page is checked against the allowance.
    pub fn lists_members(self) -> bool {
        match self {
            Read::History { .. } => false,
            Read::Members | Read::CatchUp { .. } | Read::Receipts | Read::Names { .. } | Read::OwnReceipt => true,
        }
    }

    /// Whether it returns log entries (`History`, `CatchUp`): such reads spend the
    /// reader's allowance of entries (`UserDirectory::allow_read`).
    pub fn returns_entries(self) -> bool {
        matches!(self, Read::History { .. } | Read::CatchUp { .. })
    }

    /// The log entries `answer`, this read's answer, returned: what the reader's
    /// allowance of entries is charged.
    pub fn entries(self, answer: &Reply) -> usize {
        match answer {
            Reply::History { entries, .. } if self.returns_entries() => entries.len(),
            Reply::CatchUp(page) if self.returns_entries() => page.entries.len(),
            _ => 0,
        }
    }

    /// The member rows `answer`, this read's answer, returned: names, or members'
    /// receipts, each a point read or two of the store. What the reader's allowance is
    /// charged.
    pub fn rows(self, answer: &Reply) -> usize {
        match (self, answer) {
            (Read::Members, Reply::Members(members)) => members.len(),
            (Read::CatchUp { .. }, Reply::CatchUp(page)) => page.receipts.len(),
            (Read::Receipts, Reply::Receipts(receipts)) => receipts.len(),
            (Read::Names { .. }, Reply::Names(names)) => names.len(),
            (Read::OwnReceipt, Reply::Receipt(_)) => 1,
            (
                Read::History { .. }
                | Read::Members
                | Read::CatchUp { .. }
                | Read::Receipts
                | Read::Names { .. }
                | Read::OwnReceipt,
                _,
            ) => 0,
        }
    }
}

/// A receipt report by a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// A device holds every entry up to this seq (`MarkDelivered`).
    Delivered(Seq),
    /// The member read up to this seq (`MarkRead`; implies delivered).
    Read(Seq),
}

/// The watermarks a `MarkRead` of `seq` reports, clamped to `durable_seq`. Reading
/// implies delivery, except for a reader who keeps read receipts private (`private`):
/// others would read the read mark off a delivered mark it raised. Nor is such a read
/// ever shown, also once its receipts are public again.
pub(super) fn read_marks(seq: Seq, durable_seq: Seq, private: bool) -> Marks {
    let seq = seq.min(durable_seq);
    if private {
        Marks { read_up_to: seq, ..Marks::default() }
    } else {
        Marks { delivered_up_to: seq, read_up_to: seq, shown_read_up_to: seq }
    }
}

/// Whether a `MarkRead` of `seq` by `user` would raise any of its stored watermarks, read
/// from `log` as a conversation at rest holds them (everything stored durable) with
/// `last_seq` its newest entry.
pub(super) fn read_raises<L: Log>(
    log: &L,
    conv: ConvId,
    user: UserId,
    seq: Seq,
    last_seq: Seq,
) -> Result<bool, L::Error> {
    let stored = log.receipt(conv, user)?.unwrap_or_default();
    let marks = read_marks(seq, last_seq, log.receipts_private(user)?);
    Ok(stored.max(marks) != stored)
}

/// Membership changes an entry makes (`None` removes).
type MemberChanges = Vec<(UserId, Option<Role>)>;

/// What the state reads from the log: the store for the actor, an in-memory log for the
/// harness. Reads see every entry appended so far, durable or not; the state decides
/// what of it may be served.
pub trait Log {
    /// A read failure (reported to the client as `INTERNAL`).
    type Error: std::fmt::Display;
    /// The seq an earlier entry of `sender` with this client id got.
    fn dedupe(&self, conv: ConvId, sender: UserId, client_id: &ClientMsgId) -> Result<Option<Seq>, Self::Error>;
    /// One entry, as rewritten by later edits and deletes.
    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>, Self::Error>;
    /// Entries with `from <= seq <= to`, at most `limit`, newest first if asked.
    fn entries(
        &self,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<Entry>, Self::Error>;
    /// A user's name, if the account exists.
    fn user_name(&self, user: UserId) -> Result<Option<String>, Self::Error>;
    /// Seqs of the `Edit` entries whose target is `target`, ascending.
    fn edits_of(&self, conv: ConvId, target: Seq) -> Result<Vec<Seq>, Self::Error>;
    /// A member's stored receipt watermarks, if it ever reported any.
    fn receipt(&self, conv: ConvId, user: UserId) -> Result<Option<Marks>, Self::Error>;
    /// Whether `user` keeps its read receipts private (`Settings`).
    fn receipts_private(&self, user: UserId) -> Result<bool, Self::Error>;
    /// Whether `blocker` blocks `user` (`Block`).
    fn blocks(&self, blocker: UserId, user: UserId) -> Result<bool, Self::Error>;
    /// The users `blocker` blocks (at most `MAX_BLOCKED`).
    fn blocked_by(&self, blocker: UserId) -> Result<Vec<UserId>, Self::Error>;
}

/// What the driver must do, in the order given. `R` is the driver's way to answer one
/// request (the actor's `Responder`, the harness's request number).
#[derive(Debug)]
pub enum Effect<R> {
    /// Write the entry and what it implies to the log now, before the next input, then
    /// call `handle_durable(seq)` once it is durable or `handle_failure` if it is not.
    Append(Entry),
    /// Answer a request.
    Reply(R, Result<Reply, ErrorBody>),
    /// Refuse a request once everything applied to the store so far is durable: a
    /// refusal judged on a block, whose key is written before it is durable (a crash
    /// before then would make the refusal false: the block gone, the message never
    /// written).
    RefuseOnceDurable(R, ErrorBody),
    /// Push a durable entry to the online devices of `audience`, except session `except`.
    Deliver {
        /// The entry, as durable.
        entry: Entry,
        /// Users to reach.
        audience: Arc<[UserId]>,
        /// Session that gets the entry as its acknowledgement instead (0: none).
        except: u64,
    },
    /// Write these receipt watermarks now (before the next input), then call
    /// `handle_receipts_durable` once a group commit covers them, with whether it did.
    /// At most one such write is in flight.
    WriteReceipts(Vec<(UserId, Marks)>),
    /// Call `handle_receipts_due` at this time (ms since the epoch, the clock the
    /// handlers are given): the next receipt write waits for its pace
    /// (`limits::RECEIPT_WRITE_US_PER_MEMBER`). At most one is outstanding.
    ReceiptsAt(u64),
    /// Push a (durable) event to every online device of `audience`.
    Notify {
        /// The event.
        event: Event,
        /// Users to reach.
        audience: Arc<[UserId]>,
    },
    /// A delete that took these files out of the message of this conversation carrying
    /// them is durable: any of them that nothing holds or carries now may go at once (the
    /// sweeper would find it within a minute), giving its uploader's quota back, and the
    /// delete's audience (the members who could read that message) be told it is gone.
    Released {
        /// The files the deleted message carried.
        files: Vec<FileId>,
        /// The delete's audience.
        audience: Arc<[UserId]>,
    },
    /// Durability is lost: this process must acknowledge and serve nothing more.
    Fatal,
}

/// Something waiting for the durable seq to reach `seq`.
#[derive(Debug)]
struct Pending<R> {
    seq: Seq,
    /// The entry this conversation appended at `seq` (absent for a resend's answer).
    entry: Option<Appended>,
    /// The answer, given once `seq` is durable.
    reply: Option<(R, Result<Reply, ErrorBody>)>,
}

#[derive(Debug)]
struct Appended {
    entry: Entry,
    audience: Arc<[UserId]>,
    except: u64,
    members: MemberChanges,
    /// Entries it rewrites and what each becomes (an edit's or delete's target; a
    /// delete's redacted edits).
    rewrites: Vec<(Seq, Body)>,
    /// The files a deleted message carried.
    released: Vec<FileId>,
}

/// A message rewritten by an edit or delete that is not durable yet: what readers see
/// until it is, and how many such rewrites are pending.
#[derive(Debug)]
struct Overlay {
    body: Body,
    pending: u32,
}

/// The rules of one conversation and the order of its effects.
#[derive(Debug)]
pub struct ConversationState<R> {
    id: ConvId,
    kind: ConversationKind,
    /// Group title as of the newest applied entry (empty for direct).
    title: String,
    /// Members as of the newest applied entry: who may write next.
    members: HashMap<UserId, Role>,
    /// The same as a shared list: every message's fan-out reuses it.
    audience: Arc<[UserId]>,
    /// Members as of the durable seq: what readers are shown.
    durable_members: HashMap<UserId, Role>,
    applied_seq: Seq,
    durable_seq: Seq,
    published_seq: Seq,
    /// What waits for durability, in seq order: appended entries, answers of resends
    /// (behind their original) and refusals (behind what they were judged on).
    pending: VecDeque<Pending<R>>,
    overlay: HashMap<Seq, Overlay>,
    /// Members' receipt watermarks.
    receipts: ReceiptBook<R>,
    /// The next receipt write starts no earlier than this (ms): the last one's start
    /// plus its pace (`receipt_pace_ms`), plus what its blocks cost
    /// (`receipts_charge_ms`).
    receipts_next_ms: u64,
    /// What the last receipt write's blocks cost beyond its pace, ms
    /// (`RECEIPT_WRITE_US_PER_BLOCK_UNIT` per block key read and per receipt put into a
    /// frame of its own for members some writer blocks).
    receipts_charge_ms: u64,
    /// What of the charges fell short of a whole ms, µs (under 1,000), carried to the
    /// next write's (whole ms alone left up to 999 key reads a write uncharged).
    receipts_charge_us: u64,
    /// An `Effect::ReceiptsAt` is outstanding.
    receipts_wake: bool,
    failed: bool,
    last_activity_ms: u64,
    /// Who to charge for the actor since the last `take_charges` (`ConvDirectory::
    /// recharge`): the member whose write last appended (or whose entry a start
    /// replayed), and the member whose mark last raised a watermark.
    charges: Charges,
}

/// Who keeps a conversation's actor alive, since the last tick (`take_charges`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charges {
    /// The member whose write last appended, or whose entry a start replayed: what
    /// keeps the actor alive for its idle period.
    pub writer: Option<UserId>,
    /// The member whose mark last raised its watermarks (a write of them pending): what
    /// keeps it alive, past that period, while the write is in flight. A mark that
    /// raised nothing (a stranger's, a repeated one) is charged for nothing, or a victim
    /// re-marking a group read would take over an actor kept alive by another's marks.
    pub marker: Option<UserId>,
}

fn err(code: ErrorCode, msg: &str) -> ErrorBody {
    ErrorBody::new(code, msg)
}

/// The least time between the starts of two receipt writes of a conversation of
/// `members` members, ms (`limits::RECEIPT_WRITE_US_PER_MEMBER`).
fn receipt_pace_ms(members: usize) -> u64 {
    (members as u64).saturating_mul(crate::limits::RECEIPT_WRITE_US_PER_MEMBER) / 1000
}

/// A catch-up page's entry limit as asked (`Read::CatchUp::limit`), as served: 1 to
/// `CATCH_UP_PAGE_MAX`.
pub(super) fn page_limit(limit: u16) -> usize {
    usize::from(limit).clamp(1, CATCH_UP_PAGE_MAX as usize)
}

/// The refusal a non-member gets, the same whether or not the conversation exists.
pub fn not_a_member() -> ErrorBody {
    err(
        ErrorCode::FORBIDDEN,
        "not a member of this conversation (one who left or was removed reads it no more), or no such conversation",
    )
}

impl<R> ConversationState<R> {
    /// A conversation whose log is durable up to `last_seq`, with `members` as of it.
    /// `replay` holds the durable entries after the last one a predecessor delivered
    /// (none unless the predecessor died or the conversation is new), and the session
    /// they skip: their deliveries, each to the members as of that entry, are the first
    /// effects.
    pub fn recover(
        id: ConvId,
        (kind, title): (ConversationKind, String),
        members: HashMap<UserId, Role>,
        last_seq: Seq,
        (replay, except): (Vec<Entry>, u64),
        now_ms: u64,
    ) -> (Self, Vec<Effect<R>>) {
        // A start is not activity (`handle_tick`), or any request that starts an actor
        // (a mark, a resend) would hold a place for a whole idle period; the entries it
        // delivers (a creation, a dead predecessor's last ones) are.
        let last_activity_ms = if replay.is_empty() { 0 } else { now_ms };
        // Charged to the newest replayed entry's writer, not to whoever's request
        // started it (a stranger's creation whose first start was refused, started by
        // the catch-up of a member it put in).
        let charges = Charges { writer: replay.last().map(|entry| entry.sender), marker: None };
        let audiences = replay_audiences(&members, &replay);
        let effects = replay
            .into_iter()
            .zip(audiences)
            .map(|(entry, audience)| Effect::Deliver { entry, audience: audience.into(), except })
            .collect();
        let state = ConversationState {
            id,
            kind,
            title,
            audience: members.keys().copied().collect(),
            durable_members: members.clone(),
            members,
            applied_seq: last_seq,
            durable_seq: last_seq,
            published_seq: last_seq,
            pending: VecDeque::new(),
            overlay: HashMap::new(),
            receipts: ReceiptBook::default(),
            receipts_next_ms: 0,
            receipts_charge_ms: 0,
            receipts_charge_us: 0,
            receipts_wake: false,
            failed: false,
            last_activity_ms,
            charges,
        };
        (state, effects)
    }

    /// The conversation's id.
    pub fn id(&self) -> ConvId {
        self.id
    }

    /// Who kept the conversation alive since the last call (`Charges`), for the
    /// actor's tick. Only an append is activity (`handle_tick`), besides the entries a
    /// start replays: not a start, a read, a mark, a resend nor a refused write.
    pub fn take_charges(&mut self) -> Charges {
        std::mem::take(&mut self.charges)
    }

    /// Newest seq delivered to online devices (never ahead of the durable seq).
    pub fn published_seq(&self) -> Seq {
        self.published_seq
    }

    /// Newest durable seq.
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }

    /// `user`'s delivered watermark as the actor holds it now (accepted, maybe not yet
    /// written): whether a delivered mark raised it (`MarkDelivered`'s charge for marks
    /// that raise nothing).
    pub fn delivered_now(&self, user: UserId) -> Seq {
        self.receipts.current(user).delivered_up_to
    }

    /// Number of members' watermarks held (bounded by the members plus one write).
    #[cfg(test)]
    pub fn receipt_entries(&self) -> usize {
        self.receipts.len()
    }

    /// Whether `user` is a member as of the durable seq.
    pub fn is_member(&self, user: UserId) -> bool {
        self.durable_members.contains_key(&user)
    }

    /// A write: answered from the idempotency key if it was applied before, else checked
    /// and appended. Effects: at most one `Append`, or a `Reply` (a refusal once the
    /// entries applied before it are durable: `refuse`).
    pub fn handle_write(
        &mut self,
        log: &impl Log,
        caller: Caller,
        cmd: Command,
        reply: R,
        now_ms: u64,
    ) -> Vec<Effect<R>> {
        if self.failed {
            return vec![Effect::Reply(reply, Err(err(ErrorCode::INTERNAL, "storage failure")))];
        }
        // The idempotency key first: a resend's answer never depends on what changed
        // since the original (the sender may have been removed, the target deleted).
        if let Some(client_id) = cmd.client_id() {
            match log.dedupe(self.id, caller.user, client_id) {
                Ok(Some(seq)) => {
                    // The same key for another write is a client's mistake, not a resend:
                    // answering the first seq would tell it that its new text landed. The
                    // entry is compared as readers see it (a pending edit or delete of it
                    // shows its pre-image), and either answer waits until the entry is
                    // durable: a crash before then loses it, and the key with it.
                    let shown = match self.overlay.get(&seq) {
                        Some(o) => Ok(Some(o.body.clone())),
                        None => log.entry(self.id, seq).map(|e| e.map(|e| e.body)),
                    };
                    let answer = match shown {
                        Ok(Some(body)) if !same_write(&cmd, &body) => {
                            let message = format!("this client id was used for another write (seq {seq})");
                            Err(err(ErrorCode::CONFLICT, &message))
                        }
                        Ok(_) => Ok(Reply::Appended { seq, duplicate: true }),
                        Err(e) => return vec![Effect::Reply(reply, Err(internal(e)))],
                    };
                    // A resend changes nothing: not activity (`handle_tick`).
                    if seq <= self.durable_seq {
                        return vec![Effect::Reply(reply, answer)];
                    }
                    // Behind its original, before any later entry still pending: the
                    // queue stays in seq order, and the answer waits for nothing else.
                    let at = self.pending.partition_point(|p| p.seq <= seq);
                    self.pending.insert(at, Pending { seq, entry: None, reply: Some((reply, answer)) });
                    return Vec::new();
                }
                Ok(None) => {}
                Err(e) => return vec![Effect::Reply(reply, Err(internal(e)))],
            }
        }
        // Strangers are refused before anything is read for them, and keep the
        // conversation awake no longer than the entries their refusal waits for.
        if !self.members.contains_key(&caller.user) {
            return self.refuse(reply, not_a_member());
        }
        let target = match &cmd {
            Command::Edit { target, .. } | Command::Delete { target, .. } if *target <= self.applied_seq => {
                match log.entry(self.id, *target) {
                    Ok(e) => e,
                    Err(e) => return vec![Effect::Reply(reply, Err(internal(e)))],
                }
            }
            _ => None,
        };
        // After the rules (a block is not told to whoever may not make the write anyway).
        let blocked = match self.blocked(log, caller.user, &cmd) {
            Ok(b) => b,
            Err(e) => return vec![Effect::Reply(reply, Err(internal(e)))],
        };
        let (entry, members) = match self.plan(caller, cmd, target.as_ref(), now_ms) {
            Ok(_) if let Some(refused) = blocked => return vec![Effect::RefuseOnceDurable(reply, refused)],
            Ok(p) => p,
            Err(e) => return self.refuse(reply, e),
        };
        if let Body::Edit { target: t, .. } = &entry.body {
            match log.edits_of(self.id, *t) {
                Ok(edits) if edits.len() >= MAX_EDITS_PER_MESSAGE as usize => {
                    let message = format!("a message is edited at most {MAX_EDITS_PER_MESSAGE} times");
                    return self.refuse(reply, err(ErrorCode::INVALID, &message));
                }
                Ok(_) => {}
                Err(e) => return vec![Effect::Reply(reply, Err(internal(e)))],
            }
        }
        // Only a write that appends is activity (`handle_tick`): a refused one, like a
        // resend, keeps the conversation awake no longer than its answer waits.
        self.last_activity_ms = now_ms;
        self.charges.writer = Some(caller.user);
        let seq = entry.seq;
        let audience = if members.is_empty() {
            self.audience.clone()
        } else {
            let mut all: BTreeSet<UserId> = self.audience.iter().copied().collect();
            all.extend(members.iter().map(|(u, _)| *u));
            all.into_iter().collect()
        };
        // What the entry rewrites, with each pre-image kept for readers until it is
        // durable: the target of an edit or delete, and a deleted message's edits.
        let mut rewrites = Vec::new();
        let mut released = Vec::new();
        if let (Some(stored), Some(t)) = (target, rewrite_target(&entry.body)) {
            if let (Body::Delete { .. }, Body::Files { files, .. }) = (&entry.body, &stored.body) {
                released = files.iter().map(|f| f.file).collect();
            }
            if matches!(entry.body, Body::Delete { .. }) {
                let edits = match log.edits_of(self.id, t) {
                    Ok(edits) => edits,
                    Err(e) => return vec![Effect::Reply(reply, Err(internal(e)))],
                };
                for edit in edits {
                    match log.entry(self.id, edit) {
                        Ok(Some(e)) => rewrites.push((edit, e.body, Body::Redacted { target: t })),
                        Ok(None) => {}
                        Err(e) => return vec![Effect::Reply(reply, Err(internal(e)))],
                    }
                }
            }
            let after = rewritten(&entry.body, &stored.body);
            rewrites.push((t, stored.body, after));
        }
        for (seq, before, _) in &rewrites {
            self.overlay
                .entry(*seq)
                .and_modify(|o| o.pending += 1)
                .or_insert_with(|| Overlay { body: before.clone(), pending: 1 });
        }
        let rewrites = rewrites.into_iter().map(|(seq, _, after)| (seq, after)).collect();
        self.applied_seq = seq;
        if let Body::TitleChanged { title } = &entry.body {
            self.title.clone_from(title);
        }
        if !members.is_empty() {
            apply_members(&mut self.members, &members);
            self.audience = self.members.keys().copied().collect();
        }
        self.pending.push_back(Pending {
            seq,
            entry: Some(Appended {
                entry: entry.clone(),
                audience,
                except: caller.session,
                members,
                rewrites,
                released,
            }),
            reply: Some((reply, Ok(Reply::Appended { seq, duplicate: false }))),
        });
        vec![Effect::Append(entry)]
    }

    /// A read of durable state: its answer, at once (no effect: the driver sends it). It
    /// does not keep the conversation alive (`handle_tick`): reads are answered without
    /// an actor when none is live (`actor::answer_at_rest`), so an actor's life, and the
    /// place it takes, follow appends (and marks' writes in flight) only.
    pub fn handle_read(&mut self, log: &impl Log, caller: Caller, read: Read) -> Result<Reply, ErrorBody> {
        if self.failed {
            Err(err(ErrorCode::INTERNAL, "storage failure"))
        } else if !self.is_member(caller.user) {
            Err(not_a_member())
        } else {
            match read {
                Read::History { page, limit } => self.history(log, page, limit),
                Read::Members => self.member_list(log),
                Read::CatchUp { after, limit } => self.catch_up(log, caller.user, after, limit),
                Read::Receipts => self.receipt_list(log, caller.user).map(Reply::Receipts),
                Read::Names { seq } => self.entry_names(log, seq),
                Read::OwnReceipt => {
                    self.load_receipt(log, caller.user)?;
                    Ok(Reply::Receipt(self.own_receipt(caller.user)))
                }
            }
        }
    }

    /// A receipt report by `caller`, clamped to the durable seq; lower values than held
    /// are ignored. `reply` (a `MarkRead`'s) is answered with the caller's watermarks
    /// once they are durable; a non-member's report is refused (`reply`) or dropped.
    /// Effects: at most a `Reply`, and a `WriteReceipts` or (its pace not yet come) a
    /// `ReceiptsAt`.
    pub fn handle_mark(
        &mut self,
        log: &impl Log,
        caller: Caller,
        mark: Mark,
        reply: Option<R>,
        now_ms: u64,
    ) -> Vec<Effect<R>> {
        if self.failed {
            return reply
                .map(|r| Effect::Reply(r, Err(err(ErrorCode::INTERNAL, "storage failure"))))
                .into_iter()
                .collect();
        }
        if !self.is_member(caller.user) {
            return reply.map(|r| Effect::Reply(r, Err(not_a_member()))).into_iter().collect();
        }
        // A mark keeps the conversation alive only until its write is durable
        // (`receipts.idle`), not for an idle period: clients send delivered marks by
        // themselves for whatever reaches them, and every member may mark each entry
        // read, so marks that held an actor for an idle period would let a member
        // stepping through an old backlog, or many members marking one entry, keep
        // alive for free an actor charged to someone else (`ConvDirectory::recharge`)
        // or hold places at the cap (`limits::PRESSED_IDLE_DIVISOR`). A later mark
        // starts the actor again.
        if let Err(e) = self.load_receipt(log, caller.user) {
            return reply.map(|r| Effect::Reply(r, Err(e))).into_iter().collect();
        }
        let marks = match mark {
            Mark::Delivered(seq) => Marks { delivered_up_to: seq.min(self.durable_seq), ..Marks::default() },
            Mark::Read(seq) => read_marks(seq, self.durable_seq, self.private(log, caller.user)),
        };
        let mut effects = Vec::new();
        if let Some(r) = self.receipts.mark(caller.user, marks, reply) {
            effects.push(Effect::Reply(r, Ok(Reply::Receipt(self.own_receipt(caller.user)))));
        }
        if self.receipts.writes(caller.user) {
            self.charges.marker = Some(caller.user);
        }
        effects.extend(self.start_receipts(now_ms));
        effects
    }

    /// The time an `Effect::ReceiptsAt` named came: the receipt write that waited for
    /// its pace starts (if anything is still to write).
    pub fn handle_receipts_due(&mut self, now_ms: u64) -> Vec<Effect<R>> {
        self.receipts_wake = false;
        if self.failed {
            return Vec::new();
        }
        self.start_receipts(now_ms).into_iter().collect()
    }

    /// The next receipt write, if one is wanted and its pace allows it at `now_ms`;
    /// else, once, when to ask again.
    fn start_receipts(&mut self, now_ms: u64) -> Option<Effect<R>> {
        if !self.receipts.wants_write() {
            return None;
        }
        let pace = receipt_pace_ms(self.durable_members.len());
        // A wall clock stepped back holds the next write one pace (and charge) at most.
        self.receipts_next_ms = self.receipts_next_ms.min(now_ms.saturating_add(pace + self.receipts_charge_ms));
        if now_ms < self.receipts_next_ms {
            let ask = !std::mem::replace(&mut self.receipts_wake, true);
            return ask.then_some(Effect::ReceiptsAt(self.receipts_next_ms));
        }
        let batch = self.receipts.next_write()?;
        self.receipts_next_ms = now_ms.saturating_add(pace);
        self.receipts_charge_ms = 0;
        Some(Effect::WriteReceipts(batch))
    }

    /// The receipt write in flight became durable (`ok`) or failed. Effects: the changed
    /// members' watermarks pushed to the members (`Event::Receipt` for one change,
    /// `Event::Receipts` for several), then the `MarkRead` answers that waited for it,
    /// then the next write if changes arrived meanwhile (or a `ReceiptsAt` for it). What is pushed: the public
    /// members' watermarks in one frame to every member; the delivery of members who keep
    /// reads private (`read_up_to: None`) in one frame to everyone but them, and to each
    /// of them the others' in `sibling_frames` (about log2 of their number frames each);
    /// a private member's own full watermarks to its devices only. So every frame is
    /// shared and a write encodes O(changes × log changes) receipts, not one frame per
    /// private member holding every change (members² bytes in a large group). In a group,
    /// members that some writer of this write blocks (`hidden_from`) are left out of
    /// those frames and get what they may see in one frame per set of writers hiding
    /// from them (plus one per such private member): as many frames as there are
    /// different such sets, which blocks between members make (at most one per member
    /// of them).
    pub fn handle_receipts_durable(&mut self, log: &impl Log, ok: bool, now_ms: u64) -> Vec<Effect<R>> {
        if self.failed {
            return Vec::new();
        }
        if !ok {
            return self.handle_failure();
        }
        let (written, answers) = self.receipts.written();
        // Answered with the durable values, taken before a removed member's are dropped.
        let answers: Vec<(R, Receipt)> = answers.into_iter().map(|(r, user)| (r, self.own_receipt(user))).collect();
        // What all members may see (`shown`), the delivery of members who keep reads
        // private (`delivered_only`), and such members' own full watermarks.
        let mut shown = Vec::new();
        let mut delivered_only = Vec::new();
        let mut private_own = Vec::new();
        let blocked = self.blocked_pair(log);
        // In a group, the members each writer here blocks (`hidden_from`), and all of
        // them together: those get a frame of their own below, the rest the shared ones.
        let mut hides: Vec<(UserId, BTreeSet<UserId>)> = Vec::new();
        let mut hidden_any = BTreeSet::new();
        // Block keys read and receipts put into frames of their own for hidden members:
        // charged to the next write's start (`receipts_charge_ms`).
        let mut work = 0u64;
        for (user, before, after) in written {
            if !self.durable_members.contains_key(&user) {
                // Removed meanwhile: its watermarks are no longer shown.
                self.receipts.forget(user);
                continue;
            }
            let own = self.own_receipt(user);
            if let Some(hidden) = self.hidden_from(log, user, &mut work) {
                hidden_any.extend(hidden.iter().copied());
                hides.push((user, hidden));
            }
            if blocked {
                // Between two users one of whom blocks the other, a receipt would say
                // when the other was online: each user's devices alone hear of it.
                private_own.push(own);
            } else if self.private(log, user) {
                // Others hear of delivery only: a push when just the read mark moved would
                // tell them when the user read.
                if after.delivered_up_to != before.delivered_up_to {
                    delivered_only.push(self.raw_delivered(user));
                }
                private_own.push(own);
            } else if after.shown_read_up_to != after.read_up_to {
                // Public again, with reads made while private above what others may see:
                // they are shown the read mark from before (and nothing when only a
                // hidden read moved), its own devices the whole.
                if shown_of(after) != shown_of(before) {
                    delivered_only.push(self.shown_receipt(user));
                }
                private_own.push(own);
            } else {
                shown.push(own);
            }
        }
        let mut effects = Vec::new();
        let everyone = self.audience_of_durable();
        let shared: Vec<UserId> = everyone.iter().copied().filter(|u| !hidden_any.contains(u)).collect();
        // Members whose delivery alone others see: their own devices get the whole from
        // `private_own`, never a frame with their read mark hidden.
        let private: BTreeSet<UserId> = delivered_only.iter().map(|r| r.user).collect();
        if !shown.is_empty() && !shared.is_empty() {
            effects.push(Effect::Notify {
                event: receipt_event(shown.clone()),
                audience: shared.iter().copied().collect(),
            });
        }
        if !delivered_only.is_empty() {
            let others: Arc<[UserId]> = shared.iter().copied().filter(|u| !private.contains(u)).collect();
            if !others.is_empty() {
                effects.push(Effect::Notify { event: receipt_event(delivered_only.clone()), audience: others });
            }
            delivered_only.sort_by_key(|r| r.user);
            sibling_frames(&delivered_only, &hidden_any, &mut effects);
        }
        // The members someone here blocks: all they may see, one frame per group of them
        // that the same writers hide from (and one for each whose own delivery is among
        // `delivered_only`, without it: its devices get the whole from `private_own`).
        // Before, one frame per blocking writer went to nearly every member (many
        // blocking one troll), and then one per blocked member (one blocking everyone):
        // now as many frames as there are different sets of hiding writers.
        // Hiders as sets: with a `Vec`, writers each blocking the members after them made
        // a write of m changes cost about m³ comparisons (an attacker review).
        let mut alike: BTreeMap<(BTreeSet<UserId>, Option<UserId>), Vec<UserId>> = BTreeMap::new();
        for viewer in &hidden_any {
            let hiders: BTreeSet<UserId> = hides.iter().filter(|(_, h)| h.contains(viewer)).map(|(b, _)| *b).collect();
            let own = private.contains(viewer).then_some(*viewer);
            alike.entry((hiders, own)).or_default().push(*viewer);
        }
        for ((hiders, own), audience) in alike {
            let seen: Vec<Receipt> = shown
                .iter()
                .chain(delivered_only.iter())
                .filter(|r| !hiders.contains(&r.user) && Some(r.user) != own)
                .cloned()
                .collect();
            work += seen.len() as u64;
            if !seen.is_empty() {
                effects.push(Effect::Notify { event: receipt_event(seen), audience: audience.into() });
            }
        }
        for own in private_own {
            let user = own.user;
            effects.push(Effect::Notify { event: receipt_event(vec![own]), audience: Arc::from([user]) });
        }
        for (r, receipt) in answers {
            effects.push(Effect::Reply(r, Ok(Reply::Receipt(receipt))));
        }
        // What the blocks cost holds the next write back, past its pace: writers who
        // each block 1,024 users made every write of a group read all their lists, up to
        // a thousand times 1,024 keys per write at the member pace, uncharged (an
        // attacker review). Members who block nobody cost nothing here.
        let owed_us = work.saturating_mul(crate::limits::RECEIPT_WRITE_US_PER_BLOCK_UNIT) + self.receipts_charge_us;
        (self.receipts_charge_ms, self.receipts_charge_us) = (owed_us / 1000, owed_us % 1000);
        self.receipts_next_ms = self.receipts_next_ms.max(now_ms).saturating_add(self.receipts_charge_ms);
        effects.extend(self.start_receipts(now_ms));
        effects
    }

    /// Everything appended up to `seq` is durable: acknowledge and deliver it, in order.
    pub fn handle_durable(&mut self, seq: Seq) -> Vec<Effect<R>> {
        if self.failed {
            return Vec::new();
        }
        self.durable_seq = self.durable_seq.max(seq.min(self.applied_seq));
        let mut effects = Vec::new();
        while self.pending.front().is_some_and(|p| p.seq <= self.durable_seq) {
            let Some(p) = self.pending.pop_front() else { break };
            if let Some(Appended { entry, audience, except, members, rewrites, released }) = p.entry {
                apply_members(&mut self.durable_members, &members);
                for (user, _) in members.iter().filter(|(u, role)| role.is_none() && !self.members.contains_key(u)) {
                    // A removed member's watermarks stop being shown (and held).
                    self.receipts.forget(*user);
                }
                for (seq, after) in rewrites {
                    self.settle_overlay(seq, after);
                }
                self.published_seq = entry.seq;
                if !released.is_empty() {
                    effects.push(Effect::Released { files: released, audience: audience.clone() });
                }
                effects.push(Effect::Deliver { entry, audience, except });
            }
            if let Some((reply, answer)) = p.reply {
                effects.push(Effect::Reply(reply, answer));
            }
        }
        effects
    }

    /// A write or commit failed: whatever is pending may or may not survive, so nothing
    /// is acknowledged again; every waiting request is answered `INTERNAL`, then `Fatal`.
    pub fn handle_failure(&mut self) -> Vec<Effect<R>> {
        self.failed = true;
        let refused = self.pending.drain(..).filter_map(|p| p.reply).map(|(reply, _)| reply);
        let mut effects: Vec<Effect<R>> = refused
            .chain(self.receipts.fail())
            .map(|reply| Effect::Reply(reply, Err(err(ErrorCode::INTERNAL, "storage failure; retry"))))
            .collect();
        effects.push(Effect::Fatal);
        effects
    }

    /// Answers a write refused by the rules: at once if every entry applied is durable,
    /// else once they are, as a resend's answer waits. A refusal is judged on the
    /// applied state, which a crash before those entries are durable would undo, and the
    /// refusal with it: a `CONFLICT` saying members were added already, a retried
    /// `RemoveMember` told `NOT_FOUND` or a retried `Leave` told `FORBIDDEN` (not a
    /// member) while the first is in flight, and then the member is back.
    fn refuse(&mut self, reply: R, refused: ErrorBody) -> Vec<Effect<R>> {
        if self.applied_seq == self.durable_seq {
            return vec![Effect::Reply(reply, Err(refused))];
        }
        self.pending.push_back(Pending { seq: self.applied_seq, entry: None, reply: Some((reply, Err(refused))) });
        Vec::new()
    }

    /// Whether the conversation has been idle for `idle_ms` with nothing pending, so
    /// its actor may retire (a successor reloads it from the log).
    pub fn handle_tick(&self, now_ms: u64, idle_ms: u64) -> bool {
        self.pending.is_empty() && self.receipts.idle() && now_ms.saturating_sub(self.last_activity_ms) >= idle_ms
    }

    /// Whether the conversation is past its idle period with nothing pending but a
    /// receipt write: delivered marks keep it alive only until their writes are durable,
    /// but a member stepping its watermark through an old backlog, one mark per commit,
    /// keeps one in flight at every tick; the actor's place then moves to that member
    /// (`ConvDirectory::recharge`).
    pub fn idle_but_for_receipts(&self, now_ms: u64, idle_ms: u64) -> bool {
        self.pending.is_empty() && !self.receipts.idle() && now_ms.saturating_sub(self.last_activity_ms) >= idle_ms
    }

    fn history(&self, log: &impl Log, page: Page, limit: u16) -> Result<Reply, ErrorBody> {
        let last = self.durable_seq;
        let limit = usize::from(limit).clamp(1, HISTORY_PAGE_MAX as usize);
        let mut entries = match page {
            Page::Latest => log.entries(self.id, 1, last, limit, true).map(reversed),
            Page::Before(s) => log.entries(self.id, 1, s.saturating_sub(1).min(last), limit, true).map(reversed),
            Page::After(s) => log.entries(self.id, s.saturating_add(1), last, limit, false),
        }
        .map_err(internal)?;
        for e in &mut entries {
            if let Some(o) = self.overlay.get(&e.seq) {
                e.body = o.body.clone();
            }
        }
        Ok(Reply::History { entries, last_seq: last })
    }

    /// Entries after `after` up to the durable seq, at most `limit` (clamped) and about
    /// `CATCH_UP_PAGE_BYTES` (a page holds at least one entry, and never grows past the
    /// byte bound by adding one), with pending rewrites shown as their pre-image like
    /// history. Read in chunks, so a page of large entries never holds many more than
    /// it returns.
    fn catch_up(&mut self, log: &impl Log, viewer: UserId, after: Seq, limit: u16) -> Result<Reply, ErrorBody> {
        const CHUNK: usize = 64;
        let last = self.durable_seq;
        let limit = page_limit(limit);
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut next = after.saturating_add(1);
        'page: while entries.len() < limit && next <= last {
            let chunk = log.entries(self.id, next, last, CHUNK.min(limit - entries.len()), false).map_err(internal)?;
            if chunk.is_empty() {
                break;
            }
            for mut e in chunk {
                if let Some(o) = self.overlay.get(&e.seq) {
                    e.body = o.body.clone();
                }
                let size = encode_frame(&e).map_err(internal)?.len();
                if !entries.is_empty() && bytes + size > CATCH_UP_PAGE_BYTES as usize {
                    break 'page;
                }
                bytes += size;
                next = e.seq + 1;
                entries.push(e);
            }
        }
        let complete = entries.last().map_or(after >= last, |e| e.seq >= last);
        let receipts = if complete { self.receipt_list(log, viewer)? } else { Vec::new() };
        Ok(Reply::CatchUp(CatchUpPage { conv: self.id, entries, last_seq: last, complete, receipts }))
    }

    /// Every member's durable receipts as `viewer` may see them, by user id: another
    /// member's `read_up_to` is hidden if that member keeps it private.
    fn receipt_list(&mut self, log: &impl Log, viewer: UserId) -> Result<Vec<Receipt>, ErrorBody> {
        let mut users: Vec<UserId> = self.durable_members.keys().copied().collect();
        users.sort_unstable();
        let blocked = self.blocked_pair(log);
        let group = self.kind == ConversationKind::Group;
        let mut out = Vec::with_capacity(users.len());
        for user in users {
            self.load_receipt(log, user)?;
            let mut receipt = self.own_receipt(user);
            // In a group, a member who blocks the viewer is shown to it as one that never
            // reported (`hidden_from`); a failed read counts as a block.
            let hides = group && user != viewer && !matches!(log.blocks(user, viewer), Ok(false));
            if user != viewer && (blocked || hides) {
                // See `handle_receipts_durable`: nothing delivered shown, the read hidden.
                receipt.delivered_up_to = 0;
                receipt.read_up_to = None;
            } else if user != viewer && self.private(log, user) {
                receipt = self.raw_delivered(user);
            } else if user != viewer {
                receipt = self.shown_receipt(user);
            }
            out.push(receipt);
        }
        Ok(out)
    }

    /// `user`'s durable watermarks as its own devices see them: `read_up_to` shown, and
    /// `delivered_up_to` never below it (PROTOCOL.md section 5.3). A member who keeps
    /// read receipts private has its read mark stored apart from its delivered one
    /// (`raw_delivered`), and before, its own devices were shown delivered 0, read 4.
    fn own_receipt(&self, user: UserId) -> Receipt {
        let m = self.receipts.durable(user);
        let delivered_up_to = m.delivered_up_to.max(m.read_up_to);
        Receipt { conv: self.id, user, delivered_up_to, read_up_to: Some(m.read_up_to) }
    }

    /// `user`'s durable watermarks as others see them while it does not keep read
    /// receipts private: its read mark of reads made while public (`shown_read_up_to`),
    /// and the delivered mark never below it; the same as `own_receipt` unless it read
    /// while private. Reads made while private raised no delivered mark (`raw_delivered`),
    /// so neither shows them.
    fn shown_receipt(&self, user: UserId) -> Receipt {
        let (delivered_up_to, read_up_to) = shown_of(self.receipts.durable(user));
        Receipt { conv: self.id, user, delivered_up_to, read_up_to: Some(read_up_to) }
    }

    /// `user`'s delivered watermark as others may see it when its read mark is hidden:
    /// moved by delivery reports only, so it tells nothing of its reads.
    fn raw_delivered(&self, user: UserId) -> Receipt {
        let m = self.receipts.durable(user);
        Receipt { conv: self.id, user, delivered_up_to: m.delivered_up_to, read_up_to: None }
    }

    /// Reads a member's stored watermarks into the book if it holds none for it (first
    /// use since the actor started, or since the member was added back).
    fn load_receipt(&mut self, log: &impl Log, user: UserId) -> Result<(), ErrorBody> {
        if !self.receipts.knows(user) {
            let stored = log.receipt(self.id, user).map_err(internal)?.unwrap_or_default();
            self.receipts.load(user, stored);
        }
        Ok(())
    }

    /// In a group, the members `user` blocks (`Block`), if any: they are not shown its
    /// receipts, which would tell when it was online, as its presence is not (before, a
    /// blocker's receipts in a shared group told whom it blocks when it came online and
    /// what it read: an attacker review). `user` still sees theirs: a block is about
    /// what reaches the blocker and what it shows, and a group's messages reach all
    /// members. `None` when it blocks none of them (or in a direct conversation:
    /// `blocked_pair`); a failed read hides its receipts from everyone.
    /// `keys` grows by the block keys read.
    fn hidden_from(&self, log: &impl Log, user: UserId, keys: &mut u64) -> Option<BTreeSet<UserId>> {
        if self.kind != ConversationKind::Group {
            return None;
        }
        match log.blocked_by(user) {
            Ok(blocked) => {
                *keys += blocked.len() as u64;
                let hidden: BTreeSet<UserId> =
                    blocked.into_iter().filter(|u| self.durable_members.contains_key(u)).collect();
                (!hidden.is_empty()).then_some(hidden)
            }
            Err(e) => {
                tracing::warn!(user, error = %e, "reading blocks failed; its receipts shown to nobody else");
                Some(self.durable_members.keys().copied().filter(|u| *u != user).collect())
            }
        }
    }

    /// Whether this is a direct conversation one of whose two users blocks the other
    /// (`Block`): then neither is shown the other's receipts, which would tell when the
    /// other was online. A failed read counts as blocked.
    fn blocked_pair(&self, log: &impl Log) -> bool {
        if self.kind != ConversationKind::Direct {
            return false;
        }
        let mut users = self.durable_members.keys().copied();
        let (Some(a), Some(b)) = (users.next(), users.next()) else { return false };
        !matches!((log.blocks(a, b), log.blocks(b, a)), (Ok(false), Ok(false)))
    }

    /// Whether `user` keeps read receipts private; a failed read counts as private, so
    /// a storage error never shows what a member hid.
    fn private(&self, log: &impl Log, user: UserId) -> bool {
        log.receipts_private(user).unwrap_or_else(|e| {
            tracing::warn!(user, error = %e, "reading settings failed; treating read receipts as private");
            true
        })
    }

    /// The members as of the durable seq, as a list.
    fn audience_of_durable(&self) -> Vec<UserId> {
        self.durable_members.keys().copied().collect()
    }

    fn member_list(&self, log: &impl Log) -> Result<Reply, ErrorBody> {
        let mut out = Vec::with_capacity(self.durable_members.len());
        for (&user_id, &role) in &self.durable_members {
            if let Some(name) = log.user_name(user_id).map_err(internal)? {
                out.push(Member { user_id, name, role });
            }
        }
        out.sort_by_key(|m| m.user_id);
        Ok(Reply::Members(out))
    }

    /// The names of the users entry `seq` names: its sender and the users a membership
    /// body names, by ascending id. Only durable entries (`NOT_FOUND` above).
    fn entry_names(&self, log: &impl Log, seq: Seq) -> Result<Reply, ErrorBody> {
        let gone = || err(ErrorCode::NOT_FOUND, "no such entry");
        if seq == 0 || seq > self.durable_seq {
            return Err(gone());
        }
        let entry = log.entry(self.id, seq).map_err(internal)?.ok_or_else(gone)?;
        let mut users = vec![entry.sender];
        match &entry.body {
            Body::Created { members, .. } | Body::MembersAdded { members } | Body::RolesChanged { members } => {
                users.extend(members.iter().map(|(u, _)| *u));
            }
            Body::MemberRemoved { user } => users.push(*user),
            _ => {}
        }
        users.sort_unstable();
        users.dedup();
        let mut out = Vec::with_capacity(users.len());
        for user_id in users {
            if let Some(name) = log.user_name(user_id).map_err(internal)? {
                out.push(UserName { user_id, name });
            }
        }
        Ok(Reply::Names(out))
    }

    /// A rewrite of entry `seq` became durable: readers now see its result (`after`),
    /// which is the next pending rewrite's pre-image, or the stored entry itself.
    fn settle_overlay(&mut self, seq: Seq, after: Body) {
        let Some(o) = self.overlay.get_mut(&seq) else { return };
        if o.pending > 1 {
            o.pending -= 1;
            o.body = after;
        } else {
            self.overlay.remove(&seq);
        }
    }

    /// Validates `cmd` by `caller` and decides the entry it writes and the membership
    /// changes it makes. `target` is the stored entry an edit or delete names.
    fn plan(
        &self,
        caller: Caller,
        cmd: Command,
        target: Option<&Entry>,
        now_ms: u64,
    ) -> Result<(Entry, MemberChanges), ErrorBody> {
        let role = self.members.get(&caller.user).copied().ok_or_else(not_a_member)?;
        // All zero is the key of membership entries, never remembered: a write with it
        // would be carried out again at every retry.
        if cmd.client_id() == Some(&ClientMsgId::default()) {
            return Err(err(ErrorCode::INVALID, "a client_id of all zero bytes is reserved"));
        }
        let client_id = cmd.client_id().copied().unwrap_or_default();
        let mut members = Vec::new();
        let body = match cmd {
            Command::Send { text, .. } => {
                check_text(&text)?;
                Body::Text { text, edited: false }
            }
            Command::SendFiles { text, files, .. } => {
                check_files(&text, &files)?;
                Body::Files { text, files, edited: false }
            }
            Command::Edit { target: t, text, .. } => {
                check_text(&text)?;
                own_text(target, caller.user, t)?;
                // A files message keeps its files: the new caption with their names and
                // types must fit as when it was sent.
                if let Some(Entry { body: Body::Files { files, .. }, .. }) = target {
                    check_files(&text, files)?;
                }
                Body::Edit { target: t, text }
            }
            Command::Delete { target: t, .. } => {
                own_text(target, caller.user, t)?;
                Body::Delete { target: t }
            }
            Command::Add { users, role: new_role } => {
                may_add(self.kind, role, new_role)?;
                let mut added: Vec<(UserId, Role)> = Vec::new();
                for u in users {
                    if !self.members.contains_key(&u) && !added.iter().any(|(a, _)| *a == u) {
                        added.push((u, new_role));
                    }
                }
                if added.is_empty() {
                    return Err(err(ErrorCode::CONFLICT, "already members"));
                }
                if self.members.len() + added.len() > MAX_GROUP_MEMBERS as usize {
                    return Err(err(ErrorCode::INVALID, "group member limit reached"));
                }
                members.extend(added.iter().map(|&(u, r)| (u, Some(r))));
                Body::MembersAdded { members: added }
            }
            Command::Remove { user } => {
                group_admin(self.kind, role)?;
                let target_role =
                    self.members.get(&user).copied().ok_or_else(|| err(ErrorCode::NOT_FOUND, "not a member"))?;
                if user == caller.user {
                    return Err(err(ErrorCode::INVALID, "use leave to leave"));
                }
                if target_role <= role {
                    return Err(err(ErrorCode::FORBIDDEN, "cannot remove a member of equal or higher role"));
                }
                members.push((user, None));
                Body::MemberRemoved { user }
            }
            Command::Leave => {
                if self.kind != ConversationKind::Group {
                    return Err(err(
                        ErrorCode::INVALID,
                        "cannot leave a direct conversation; block its peer to stop it",
                    ));
                }
                if role == Role::Owner && self.members.len() > 1 {
                    return Err(err(
                        ErrorCode::FORBIDDEN,
                        "the owner cannot leave while others remain: hand ownership to a member first",
                    ));
                }
                members.push((caller.user, None));
                Body::MemberLeft
            }
            Command::SetRole { user, role: new_role } => {
                if self.kind != ConversationKind::Group {
                    return Err(err(ErrorCode::INVALID, "direct conversations have no roles to change"));
                }
                if role != Role::Owner {
                    // A retry of a change that already holds (a hand-over whose answer was
                    // lost) is told so rather than refused: the caller is no owner now.
                    if self.members.get(&user) == Some(&new_role) {
                        return Err(err(ErrorCode::CONFLICT, "the member has that role already"));
                    }
                    return Err(err(ErrorCode::FORBIDDEN, "only the owner may change roles"));
                }
                let current =
                    self.members.get(&user).copied().ok_or_else(|| err(ErrorCode::NOT_FOUND, "not a member"))?;
                if user == caller.user {
                    return Err(err(ErrorCode::INVALID, "the owner hands over ownership to another member"));
                }
                if current == new_role {
                    return Err(err(ErrorCode::CONFLICT, "the member has that role already"));
                }
                let mut changed = vec![(user, new_role)];
                if new_role == Role::Owner {
                    // One owner: the one handing over stays on as an admin.
                    changed.push((caller.user, Role::Admin));
                }
                members.extend(changed.iter().map(|&(u, r)| (u, Some(r))));
                Body::RolesChanged { members: changed }
            }
            Command::SetTitle { title } => {
                if self.kind != ConversationKind::Group {
                    return Err(err(
                        ErrorCode::INVALID,
                        "a direct conversation has no title: it shows the peer's name",
                    ));
                }
                if role > Role::Admin {
                    return Err(err(ErrorCode::FORBIDDEN, "only the owner or an admin may rename the group"));
                }
                crate::auth::check_label(&title)?;
                // A retry whose answer was lost is told that its change holds.
                if title == self.title {
                    return Err(err(ErrorCode::CONFLICT, "the group has that title already"));
                }
                Body::TitleChanged { title }
            }
        };
        let entry = Entry {
            conv: self.id,
            seq: self.applied_seq + 1,
            sender: caller.user,
            sender_device: caller.device,
            client_id,
            at_ms: now_ms,
            body,
        };
        Ok((entry, members))
    }

    /// The refusal of a write that a block forbids (`Block`), read from the log: in a
    /// direct conversation the peer who blocks the caller gets no message, edit or files
    /// from it, and the caller gets none to a peer it blocks (as messaging apps do:
    /// unblock to write; before, the blocker wrote on to someone who could not answer),
    /// a delete of the caller's own message still going through; nobody who blocks the
    /// caller is added by it to a group. `FORBIDDEN`, naming the user.
    fn blocked<L: Log>(&self, log: &L, caller: UserId, cmd: &Command) -> Result<Option<ErrorBody>, L::Error> {
        if matches!(cmd, Command::Send { .. } | Command::SendFiles { .. } | Command::Edit { .. })
            && self.kind == ConversationKind::Direct
        {
            for peer in self.members.keys().copied().filter(|&u| u != caller) {
                if log.blocks(caller, peer)? {
                    let name = log.user_name(peer)?.unwrap_or_else(|| peer.to_string());
                    let message = format!("you block {name}: unblock them to write here");
                    return Ok(Some(err(ErrorCode::FORBIDDEN, &message)));
                }
            }
        }
        let (candidates, why): (Vec<UserId>, &str) = match cmd {
            Command::Send { .. } | Command::SendFiles { .. } | Command::Edit { .. }
                if self.kind == ConversationKind::Direct =>
            {
                (self.members.keys().copied().filter(|&u| u != caller).collect(), "does not accept messages from you")
            }
            Command::Add { users, .. } => (
                users.iter().copied().filter(|u| !self.members.contains_key(u)).collect(),
                "does not accept being added by you",
            ),
            _ => return Ok(None),
        };
        for user in candidates {
            if log.blocks(user, caller)? {
                let name = log.user_name(user)?.unwrap_or_else(|| user.to_string());
                return Ok(Some(err(ErrorCode::FORBIDDEN, &format!("{name} {why}"))));
            }
        }
        Ok(None)
    }
}

fn group_admin(kind: ConversationKind, role: Role) -> Result<(), ErrorBody> {
    if kind != ConversationKind::Group {
        return Err(err(ErrorCode::INVALID, "direct conversations have fixed members"));
    }
    if role > Role::Admin {
        return Err(err(ErrorCode::FORBIDDEN, "only the owner or an admin may change members"));
    }
    Ok(())
}

/// Whether a member with `role` in a conversation of `kind` may add users as `new_role`,
/// whoever they are: `INVALID` in a direct conversation or for `Owner` (a group has one),
/// `FORBIDDEN` for a member below admin, or for an admin adding admins (which `SetRole`
/// leaves to the owner: an admin could otherwise remove a member and add them back
/// promoted). Checked before the names are resolved too, so an unknown name is told only
/// to a member who may add (PROTOCOL section 8).
pub fn may_add(kind: ConversationKind, role: Role, new_role: Role) -> Result<(), ErrorBody> {
    group_admin(kind, role)?;
    if new_role == Role::Owner {
        return Err(err(ErrorCode::INVALID, "a group has one owner"));
    }
    if new_role == Role::Admin && role != Role::Owner {
        return Err(err(ErrorCode::FORBIDDEN, "only the owner makes admins"));
    }
    Ok(())
}

/// Pushes, to each user of `hidden` (receipts as others may see them: without the read
/// mark, or with the one of reads made while public; sorted by user, one per user), every
/// receipt of `hidden` but its own, in shared frames: the list is
/// halved, each half's receipts go to the other half's users, and each half again, so a
/// user gets one frame per halving (about log2 of the list's length) and the frames hold
/// the list about log2 times over in all.
/// Users of `except` get none of these frames (they get one of their own).
fn sibling_frames<R>(hidden: &[Receipt], except: &BTreeSet<UserId>, effects: &mut Vec<Effect<R>>) {
    if hidden.len() < 2 {
        return;
    }
    let (left, right) = hidden.split_at(hidden.len() / 2);
    for (receipts, to) in [(left, right), (right, left)] {
        let audience: Arc<[UserId]> = to.iter().map(|r| r.user).filter(|u| !except.contains(u)).collect();
        if !audience.is_empty() {
            effects.push(Effect::Notify { event: receipt_event(receipts.to_vec()), audience });
        }
    }
    sibling_frames(left, except, effects);
    sibling_frames(right, except, effects);
}

/// What others are shown of a member who does not keep read receipts private:
/// `(delivered_up_to, read_up_to)` (`ConversationState::shown_receipt`).
fn shown_of(m: Marks) -> (Seq, Seq) {
    (m.delivered_up_to.max(m.shown_read_up_to), m.shown_read_up_to)
}

/// The event for receipts changed by one write: `Receipt` for one, `Receipts` for more.
fn receipt_event(mut receipts: Vec<Receipt>) -> Event {
    if receipts.len() == 1 {
        return Event::Receipt(receipts.remove(0));
    }
    receipts.sort_by_key(|r| r.user);
    Event::Receipts(receipts)
}

/// For each entry (durable, in seq order, ending at the newest), the users it goes to:
/// the members just before it and just after it. `members_now` are the members after
/// the last entry; earlier membership is found by undoing the entries newest first.
pub fn replay_audiences(members_now: &HashMap<UserId, Role>, entries: &[Entry]) -> Vec<Vec<UserId>> {
    let mut members: BTreeSet<UserId> = members_now.keys().copied().collect();
    for e in entries.iter().rev() {
        match &e.body {
            Body::MembersAdded { members: added } => added.iter().for_each(|(u, _)| {
                members.remove(u);
            }),
            Body::Created { .. } => members.clear(),
            Body::MemberRemoved { user } => {
                members.insert(*user);
            }
            Body::MemberLeft => {
                members.insert(e.sender);
            }
            _ => {}
        }
    }
    entries
        .iter()
        .map(|e| {
            let mut audience = members.clone();
            match &e.body {
                Body::MembersAdded { members: added } | Body::Created { members: added, .. } => {
                    members.extend(added.iter().map(|(u, _)| *u));
                    audience.extend(added.iter().map(|(u, _)| *u));
                }
                Body::MemberRemoved { user } => {
                    members.remove(user);
                }
                Body::MemberLeft => {
                    members.remove(&e.sender);
                }
                _ => {}
            }
            audience.into_iter().collect()
        })
        .collect()
}

fn apply_members(members: &mut HashMap<UserId, Role>, changes: &[(UserId, Option<Role>)]) {
    for &(user, role) in changes {
        match role {
            Some(r) => members.insert(user, r),
            None => members.remove(&user),
        };
    }
}

/// The message an edit or delete rewrites.
fn rewrite_target(body: &Body) -> Option<Seq> {
    match body {
        Body::Edit { target, .. } | Body::Delete { target } => Some(*target),
        _ => None,
    }
}

/// Whether a resend (`cmd`) asks for what the entry its client id made (`body`) still
/// shows: the same text (and target, for an edit or delete). A message since edited or
/// deleted, or an edit since redacted, no longer shows what was sent, and counts as the
/// same; so do a files message's files, which a resend does not resolve again.
fn same_write(cmd: &Command, body: &Body) -> bool {
    match (cmd, body) {
        (Command::Send { text, .. }, Body::Text { text: sent, edited: false }) => text == sent,
        (Command::SendFiles { text, .. }, Body::Files { text: sent, edited: false, .. }) => text == sent,
        (Command::Send { .. }, Body::Text { edited: true, .. })
        | (Command::SendFiles { .. }, Body::Files { edited: true, .. })
        | (Command::Send { .. } | Command::SendFiles { .. }, Body::Tombstone) => true,
        (Command::Edit { target, text, .. }, Body::Edit { target: t, text: sent }) => target == t && text == sent,
        (Command::Edit { target, .. }, Body::Redacted { target: t })
        | (Command::Delete { target, .. }, Body::Delete { target: t }) => target == t,
        _ => false,
    }
}

/// What a rewrite `body` leaves its target (now `target`) as, as the store rewrites it
/// (`Store::append_then`): an edit replaces the text, a files message's caption, and
/// keeps the files; a delete leaves a tombstone.
fn rewritten(body: &Body, target: &Body) -> Body {
    match (body, target) {
        (Body::Edit { text, .. }, Body::Files { files, .. }) => {
            Body::Files { text: text.clone(), files: files.clone(), edited: true }
        }
        (Body::Edit { text, .. }, _) => Body::Text { text: text.clone(), edited: true },
        _ => Body::Tombstone,
    }
}

fn check_text(text: &str) -> Result<(), ErrorBody> {
    if text.is_empty() || text.len() > MAX_TEXT_BYTES as usize {
        return Err(ErrorBody::new(
            ErrorCode::INVALID,
            format!("a text must be 1 to {MAX_TEXT_BYTES} bytes (UTF-8); this one is {}", text.len()),
        ));
    }
    Ok(())
}

/// Checks a files message: 1..=`MAX_FILES_PER_MESSAGE` distinct files, and the caption
/// with every file's name and type within `MAX_TEXT_BYTES`.
pub(crate) fn check_files(text: &str, files: &[FileRef]) -> Result<(), ErrorBody> {
    if files.is_empty() || files.len() > MAX_FILES_PER_MESSAGE as usize {
        return Err(err(ErrorCode::INVALID, "a message carries 1..=10 files"));
    }
    if files.iter().enumerate().any(|(i, f)| files[..i].iter().any(|g| g.file == f.file)) {
        return Err(err(ErrorCode::INVALID, "a file appears twice"));
    }
    let bytes = text.len() + files.iter().map(|f| f.name.len() + f.content_type.len()).sum::<usize>();
    if bytes > MAX_TEXT_BYTES as usize {
        return Err(err(ErrorCode::INVALID, "the caption, names and types pass max_text_bytes"));
    }
    Ok(())
}

/// Checks that `target` is a live text message of `user`'s: `NOT_FOUND` if there is no
/// such entry or it was deleted (whoever sent it: a deleted message is no one's),
/// `FORBIDDEN` if someone else sent it, `INVALID` if it is no message (a membership or
/// title change, an edit or delete: a trial was told "only text messages", of a file
/// message it could edit).
fn own_text(target: Option<&Entry>, user: UserId, seq: Seq) -> Result<(), ErrorBody> {
    let stored = target.ok_or_else(|| err(ErrorCode::NOT_FOUND, &format!("no entry {seq}")))?;
    if matches!(stored.body, Body::Tombstone) {
        return Err(err(ErrorCode::NOT_FOUND, "message was deleted"));
    }
    if stored.sender != user {
        return Err(err(ErrorCode::FORBIDDEN, "only the sender may edit or delete a message"));
    }
    match stored.body {
        Body::Text { .. } | Body::Files { .. } => Ok(()),
        _ => Err(err(
            ErrorCode::INVALID,
            &format!(
                "entry {seq} is no message (a membership or title change, an edit or a delete): only messages (text \
                 or files) can be edited or deleted"
            ),
        )),
    }
}

fn reversed(mut v: Vec<Entry>) -> Vec<Entry> {
    v.reverse();
    v
}
