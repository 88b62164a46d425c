//! The conversation actor: a thin driver of `ConversationState`. It feeds the state its
//! inputs (requests, durability callbacks, ticks) and performs the effects it returns,
//! in order: appends go to the store, replies to the requester's outbound queue,
//! deliveries through `fanout`, and a fatal storage failure to the broker's health.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use switchboard_protocol::{ConvId, ErrorBody, Event, Reply, Role, Seq, ServerFrame, encode_frame};
use switchboard_storage::{ReceiptRecord, Store, StoreError};

use super::directory::{Registration, Share, pressed_idle_ms};
use super::receipts::Marks;
use super::state::{Caller, Charges, Command, ConversationState, Effect, Log, Mark, Read, not_a_member};
use crate::Shared;
use crate::metrics::Counters;
use crate::pauses::Point;
use crate::reply::{Responder, internal};

/// Messages to a conversation actor.
pub enum ConvMsg {
    /// A write (counted against the mailbox bound).
    Write(Caller, Command, Responder),
    /// A read (counted against the mailbox bound).
    Read(Caller, Read, Responder),
    /// Writes up to `seq` are durable (`ok`), or the commit failed.
    Durable {
        /// Newest seq the commit covered.
        seq: Seq,
        /// Whether it became durable.
        ok: bool,
    },
    /// A receipt report (counted against the mailbox bound).
    Mark(Caller, Mark, MarkReply),
    /// The receipt write in flight is durable (`ok`), or its commit failed.
    ReceiptsDurable {
        /// Whether it became durable.
        ok: bool,
    },
    /// The receipt write that waited for its pace may start (`Effect::ReceiptsAt`; one
    /// at a time).
    ReceiptsDue,
    /// Periodic idle check.
    Tick,
}

impl ConvMsg {
    /// The request's responder, for refusing a message that was never delivered.
    pub(crate) fn into_responder(self) -> Option<Responder> {
        match self {
            ConvMsg::Write(_, _, r) | ConvMsg::Read(_, _, r) => Some(r),
            ConvMsg::Mark(_, _, MarkReply::Read(r)) => Some(r),
            _ => None,
        }
    }
}

/// How a receipt report is answered.
pub enum MarkReply {
    /// A `MarkRead`'s responder, answered once the mark is durable.
    Read(Responder),
    /// One mark of a `MarkDelivered`: fired once the actor has taken the mark into its
    /// receipt book, dropped unfired if the actor stopped first (the directory then
    /// hands the mark to a successor; see `ConvDirectory::mark_delivered`); with the
    /// check whether the device that sent it was cut off since.
    Taken(tokio::sync::oneshot::Sender<bool>, crate::reply::Revocation),
}

/// What a conversation actor starts from.
pub struct ConvArgs {
    pub(super) id: ConvId,
    pub(super) depth: Arc<AtomicUsize>,
    pub(super) published: Arc<AtomicU64>,
    /// Entries after this seq may never have been delivered (a predecessor died, or the
    /// conversation was just created): deliver them before serving anything.
    pub(super) replay_after: Option<Seq>,
    /// Session the replayed entries skip (the creator's, which gets the conversation as
    /// its answer), or 0.
    pub(super) replay_except: u64,
}

/// Actor state: the rules, and the counters the directory reads.
pub struct ConvActorState {
    state: ConversationState<Responder>,
    depth: Arc<AtomicUsize>,
    /// Highest seq delivered, shared with the directory so a successor of a crashed
    /// actor knows which durable entries were never pushed to online devices.
    published: Arc<AtomicU64>,
    /// Takes the actor out of the directory when it ends without retiring.
    _registration: Registration,
}

/// The conversation actor.
pub struct Conversation {
    pub(crate) shared: Arc<Shared>,
}

/// The store as the state's log.
struct StoreLog<'a>(&'a Store);

impl Log for StoreLog<'_> {
    type Error = StoreError;
    fn dedupe(&self, conv: ConvId, sender: u64, client_id: &[u8; 16]) -> Result<Option<Seq>, StoreError> {
        self.0.dedupe(conv, sender, client_id)
    }
    fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<switchboard_protocol::Entry>, StoreError> {
        self.0.entry(conv, seq)
    }
    fn entries(
        &self,
        conv: ConvId,
        from: Seq,
        to: Seq,
        limit: usize,
        newest_first: bool,
    ) -> Result<Vec<switchboard_protocol::Entry>, StoreError> {
        self.0.entries(conv, from, to, limit, newest_first)
    }
    fn user_name(&self, user: u64) -> Result<Option<String>, StoreError> {
        Ok(self.0.user(user)?.map(|u| u.name))
    }
    fn edits_of(&self, conv: ConvId, target: Seq) -> Result<Vec<Seq>, StoreError> {
        self.0.edits_of(conv, target)
    }
    fn receipt(&self, conv: ConvId, user: u64) -> Result<Option<Marks>, StoreError> {
        let stored = self.0.receipt(conv, user)?;
        Ok(stored.map(|r| Marks {
            delivered_up_to: r.delivered_up_to,
            read_up_to: r.read_up_to,
            shown_read_up_to: r.shown_read_up_to,
        }))
    }
    fn receipts_private(&self, user: u64) -> Result<bool, StoreError> {
        Ok(self.0.settings(user)?.read_receipts_private)
    }
    fn blocks(&self, blocker: u64, user: u64) -> Result<bool, StoreError> {
        self.0.blocks(blocker, user)
    }
    fn blocked_by(&self, blocker: u64) -> Result<Vec<u64>, StoreError> {
        self.0.blocked_users(blocker, switchboard_protocol::limits::MAX_BLOCKED as usize)
    }
}

impl Actor for Conversation {
    type Msg = ConvMsg;
    type State = ConvActorState;
    type Arguments = ConvArgs;

    async fn pre_start(&self, myself: ActorRef<ConvMsg>, args: ConvArgs) -> Result<ConvActorState, ActorProcessingErr> {
        let ConvArgs { id, depth, published, replay_after, replay_except } = args;
        // A predecessor that died may have applied entries it never saw durable (and a
        // creation may still be on its way to disk): make them durable before serving
        // them. An actor that retired idle had nothing pending, and `Broker::start` made
        // everything recovered durable, so a plain start skips this barrier.
        if replay_after.is_some() {
            self.shared.store.barrier()?.await?;
        }
        // Off the runtime's threads: a large group's member list is a thousand reads
        // (more from disk when cold), and starts come in bursts (a `MarkDelivered` names
        // up to 256 conversations); read on a worker, they held up every connection on
        // it meanwhile.
        let shared = self.shared.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<_, ActorProcessingErr> {
            let store = &shared.store;
            let record = store.conversation(id)?.ok_or("conversation vanished")?;
            let last_seq = store.last_seq(id)?;
            let members: HashMap<switchboard_protocol::UserId, Role> = store.members(id)?.into_iter().collect();
            let replay = match replay_after {
                Some(after) => store.entries(id, after.saturating_add(1), last_seq, usize::MAX, false)?,
                None => Vec::new(),
            };
            Ok((record, last_seq, members, replay))
        });
        let (record, last_seq, members, replay) = read.await??;
        let (state, effects) = ConversationState::recover(
            id,
            (record.kind, record.title),
            members,
            last_seq,
            (replay, replay_except),
            crate::now_ms(),
        );
        if replay_after.is_none() {
            // Everything in the log was delivered by predecessors.
            published.store(last_seq, Ordering::Release);
        }
        let registration = Registration { shared: self.shared.clone(), conv: id, actor: myself.get_id() };
        let mut state = ConvActorState { state, depth, published, _registration: registration };
        self.perform(&myself, &mut state, effects).await;
        myself.send_interval(tick_period(&self.shared.config), || ConvMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<ConvMsg>,
        msg: ConvMsg,
        state: &mut ConvActorState,
    ) -> Result<(), ActorProcessingErr> {
        let log = StoreLog(&self.shared.store);
        let effects = match msg {
            ConvMsg::Write(caller, cmd, reply) => {
                state.depth.fetch_sub(1, Ordering::AcqRel);
                // Written by a device revoked (or an account disabled) since it was sent:
                // not carried out (the revocation may have been answered already), and
                // answered so (a `SendFiles` then lets go of the copies it made at once).
                if let Err(refused) = reply.refusal() {
                    reply.send(Err(refused));
                    return Ok(());
                }
                state.state.handle_write(&log, caller, cmd, reply, crate::now_ms())
            }
            ConvMsg::Read(caller, read, reply) => {
                state.depth.fetch_sub(1, Ordering::AcqRel);
                // Nobody is left to take the answer (the session ended): no read.
                if reply.abandoned() {
                    return Ok(());
                }
                // A read that lists members spends the caller's allowance of member rows,
                // checked before (again: `ConvDirectory::read` checked before handing it
                // over) and charged after (`UserDirectory::allow_member_reads`).
                let users = &self.shared.users;
                if let Err(refused) = users.allow_read(caller.user, read) {
                    reply.send(Err(refused));
                    return Ok(());
                }
                let answer = state.state.handle_read(&log, caller, read);
                if let Ok(answer) = &answer {
                    users.charge_read(caller.user, read, answer);
                }
                reply.send(answer);
                Vec::new()
            }
            ConvMsg::Mark(caller, mark, MarkReply::Read(reply)) => {
                state.depth.fetch_sub(1, Ordering::AcqRel);
                // As a write: a device cut off since it sent the mark raises nothing.
                if let Err(refused) = reply.refusal() {
                    reply.send(Err(refused));
                    return Ok(());
                }
                state.state.handle_mark(&log, caller, mark, Some(reply), crate::now_ms())
            }
            ConvMsg::Mark(caller, mark, MarkReply::Taken(taken, revocation)) => {
                state.depth.fetch_sub(1, Ordering::AcqRel);
                // Taken (so not handed on again) and dropped: its device was cut off.
                if revocation.code().is_some() {
                    let _ = taken.send(true);
                    return Ok(());
                }
                let before = state.state.delivered_now(caller.user);
                let effects = state.state.handle_mark(&log, caller, mark, None, crate::now_ms());
                // Whether it raised the watermark (a repeat of one not yet written does
                // not); the requester may have stopped waiting (its connection closed).
                let _ = taken.send(state.state.delivered_now(caller.user) > before);
                effects
            }
            ConvMsg::Durable { seq, ok: true } => state.state.handle_durable(seq),
            ConvMsg::Durable { ok: false, .. } => state.state.handle_failure(),
            ConvMsg::ReceiptsDurable { ok } => state.state.handle_receipts_durable(&log, ok, crate::now_ms()),
            ConvMsg::ReceiptsDue => state.state.handle_receipts_due(crate::now_ms()),
            ConvMsg::Tick => {
                let (now, config) = (crate::now_ms(), &self.shared.config);
                let idle = config.conversation_idle_ms;
                // The place moves to whoever kept the actor alive since the last tick
                // (`ConversationState::take_charges`): the newest writer that appended,
                // or, past the idle period with only marks' writes in flight, the
                // newest marker, on its passive share. Reads, resends, refused writes
                // and marks that raised nothing move no place.
                let Charges { writer, marker } = state.state.take_charges();
                // The directory is asked whether the shorter period applies only past it.
                let retiring = state.state.handle_tick(now, idle)
                    || (state.state.handle_tick(now, pressed_idle_ms(config))
                        && self.shared.convs.pressed(config, state.state.id(), myself.get_id()));
                if retiring && self.shared.convs.retire(state.state.id(), myself.get_id()) {
                    myself.stop(Some("idle".into()));
                } else {
                    let kept_by_marks = state.state.idle_but_for_receipts(now, idle);
                    let charged = match (kept_by_marks, marker, writer) {
                        (true, Some(marker), _) => Some((marker, Share::Passive)),
                        (_, _, Some(writer)) => Some((writer, Share::Active)),
                        _ => None,
                    };
                    if let Some(charged) = charged {
                        self.shared.convs.recharge(state.state.id(), myself.get_id(), charged);
                    }
                }
                Vec::new()
            }
        };
        self.perform(&myself, state, effects).await;
        Ok(())
    }
}

/// How often a conversation actor ticks (`ConvMsg::Tick`): a quarter of
/// `conversation_idle_ms`, within 10 ms and 15 s.
pub(super) fn tick_period(config: &crate::Config) -> Duration {
    Duration::from_millis((config.conversation_idle_ms / 4).clamp(10, 15_000))
}

/// Whether a `MarkRead` of `seq` by `user` would raise any of its watermarks stored for
/// `conv` (`state::read_raises`), for a conversation at rest: three point reads.
pub(super) fn read_raises_at_rest(store: &Store, conv: ConvId, user: u64, seq: Seq) -> Result<bool, ErrorBody> {
    let last_seq = store.last_seq(conv).map_err(internal)?;
    super::state::read_raises(&StoreLog(store), conv, user, seq, last_seq).map_err(internal)
}

/// The answer `conv`'s actor would give `read` by `caller` (a member as `role`, as the
/// caller checked), from the store alone: what an actor's start loads (of the members,
/// only the caller, unless the read lists them), and nothing kept. For a conversation
/// at rest (`ConvDirectory::read_at_rest`), whose stored state is all durable.
pub(super) fn answer_at_rest(
    shared: &Shared,
    conv: ConvId,
    caller: Caller,
    role: Role,
    read: Read,
) -> Result<Reply, ErrorBody> {
    let store = &shared.store;
    let Some(record) = store.conversation(conv).map_err(internal)? else { return Err(not_a_member()) };
    let last_seq = store.last_seq(conv).map_err(internal)?;
    let members = match read {
        Read::Members | Read::Receipts => store.members(conv).map_err(internal)?.into_iter().collect(),
        // Only a page that completes the catch-up carries every member's receipts: one
        // that cannot reach `last_seq` needs the reader's membership alone (before, each
        // page of a long catch-up in a large group read the whole member list).
        Read::CatchUp { after, limit } if last_seq.saturating_sub(after) <= super::state::page_limit(limit) as u64 => {
            store.members(conv).map_err(internal)?.into_iter().collect()
        }
        Read::CatchUp { .. } | Read::History { .. } | Read::Names { .. } | Read::OwnReceipt => {
            HashMap::from([(caller.user, role)])
        }
    };
    let (mut state, _) = ConversationState::<()>::recover(
        conv,
        (record.kind, record.title),
        members,
        last_seq,
        (Vec::new(), 0),
        crate::now_ms(),
    );
    state.handle_read(&StoreLog(store), caller, read)
}

impl Conversation {
    async fn perform(&self, myself: &ActorRef<ConvMsg>, state: &mut ConvActorState, effects: Vec<Effect<Responder>>) {
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Append(entry) => {
                    let (me, seq) = (myself.clone(), entry.seq);
                    // The store derives the entry's other writes (idempotency key, edited
                    // target, member keys) from the entry itself; see `Store::append_then`.
                    let written = self.shared.store.append_then(&entry, move |r| {
                        let _ = me.cast(ConvMsg::Durable { seq, ok: r.is_ok() });
                    });
                    if let Err(e) = written {
                        tracing::error!(conv = entry.conv, seq, error = %e, "append failed");
                        queue.extend(state.state.handle_failure());
                    }
                }
                Effect::Reply(reply, result) => reply.send(result),
                Effect::RefuseOnceDurable(reply, refused) => {
                    let shared = self.shared.clone();
                    tokio::spawn(async move { reply.send(Err(super::directory::settled(&shared, refused).await)) });
                }
                Effect::Deliver { entry, audience, except } => {
                    // Before the entry is sent, not after: whoever gets it may act on it
                    // at once, and what it makes readable (a file it carries:
                    // `files::published_carriers`) must be so by then (with the store
                    // after, a member asking `FileInfo` on its arrival was at times told
                    // the file did not exist). Per entry, not after the batch: a
                    // successor of an actor that panics midway must not deliver this
                    // entry again (a panic while sending it leaves it to the devices'
                    // catch-up, which a later entry's gap or the next connect asks for).
                    state.published.store(entry.seq, Ordering::Release);
                    // Presence first: a removal must take the member out of the kept
                    // contact sets even if the typing hook panics (a successor does not
                    // deliver this entry again).
                    self.shared.presence.entry_delivered(&entry, &audience);
                    self.shared.typing.entry_delivered(&entry);
                    match encode_frame(&ServerFrame::Event(Event::Entry(entry))) {
                        Ok(frame) => {
                            let delivered = self.shared.online.deliver(&audience, &frame, except);
                            let counters = &self.shared.counters;
                            Counters::add(&counters.entries_published, 1);
                            Counters::add(&counters.entry_deliveries, delivered as u64);
                        }
                        Err(e) => tracing::error!(error = %e, "an entry did not encode"),
                    }
                    self.shared.pauses.pass(Point::EntrySent).await;
                }
                Effect::WriteReceipts(marks) => {
                    let me = myself.clone();
                    let records: Vec<(u64, ReceiptRecord)> = marks
                        .into_iter()
                        .map(|(user, m)| {
                            let record = ReceiptRecord {
                                delivered_up_to: m.delivered_up_to,
                                read_up_to: m.read_up_to,
                                shown_read_up_to: m.shown_read_up_to,
                            };
                            (user, record)
                        })
                        .collect();
                    // Joins the next group commit; no fsync of its own.
                    let written = self.shared.store.write_receipts(state.state.id(), &records, move |r| {
                        let _ = me.cast(ConvMsg::ReceiptsDurable { ok: r.is_ok() });
                    });
                    if let Err(e) = written {
                        tracing::error!(conv = state.state.id(), error = %e, "receipt write failed");
                        queue.extend(state.state.handle_failure());
                    }
                }
                Effect::ReceiptsAt(at_ms) => {
                    let wait = Duration::from_millis(at_ms.saturating_sub(crate::now_ms()));
                    myself.send_after(wait, || ConvMsg::ReceiptsDue);
                }
                Effect::Notify { event, audience } => match encode_frame(&ServerFrame::Event(event)) {
                    Ok(frame) => {
                        self.shared.online.deliver(&audience, &frame, 0);
                    }
                    Err(e) => tracing::error!(error = %e, "an event did not encode"),
                },
                Effect::Released { files, audience } => {
                    crate::files::collect_soon(&self.shared, state.state.id(), audience, files)
                }
                Effect::Fatal => {
                    self.shared.health.fail("a conversation write did not become durable");
                    myself.stop(Some("storage failure".into()));
                }
            }
        }
    }
}
