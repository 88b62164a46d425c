//! Maps conversation ids to live actors, spawning on demand. The per-actor `depth`
//! counts messages sent but not yet handled: it bounds the mailbox, and an idle actor
//! retires only when it is zero under the map lock, so no request is ever cast into a
//! stopping actor. An actor that died (a panic, `kill`) leaves the map as its state drops
//! (`Registration`), and the next request starts a successor that resumes its fan-out.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use ractor::{Actor, ActorRef};
use switchboard_protocol::limits::MAX_MARKS_PER_REQUEST;
use switchboard_protocol::{ClientMsgId, ConvId, ErrorBody, ErrorCode, Reply, Role, Seq, UserId};
use switchboard_storage::Store;

use super::actor::{ConvArgs, ConvMsg, Conversation, MarkReply};
use super::state::{Caller, Command, Mark, Read, may_add, not_a_member};
use crate::Shared;
use crate::limits::{PRESSED_IDLE_DIVISOR, PRESSED_TICKS};
use crate::reply::{Responder, internal};

/// Live conversation actors.
pub struct ConvDirectory {
    map: std::sync::Mutex<HashMap<ConvId, Slot>>,
    /// Conversations whose next actor must first deliver the durable entries after a
    /// seq: one created but whose first entry no actor has delivered yet (after 0,
    /// skipping the creator's session, which gets the conversation as its answer), or
    /// one whose actor died (after its published watermark). The first actor started for
    /// it takes the record, and puts it back if it fails to start, so every entry of a
    /// conversation is delivered once, by its one owner, in seq order. At most one per
    /// conversation: those of creations are bounded by the creation rate limit, those of
    /// dead actors (a panic, `kill`) by the conversations whose actor died.
    replay: std::sync::Mutex<HashMap<ConvId, Replay>>,
    /// Live actors by the user and share whose request started each (`Slot::starter`),
    /// starts under way included, for `max_live_conversations_per_user` (per share):
    /// one user touching thousands of its conversations must not take every place of
    /// `max_live_conversations` from the others. Locked after `map` only; at most two
    /// entries per user with a live actor (at most `max_live_conversations`).
    started: std::sync::Mutex<HashMap<(UserId, Share), usize>>,
    /// Starts under way (a place taken, the actor not yet registered), counted with the
    /// map's length against `max_live_conversations`; changed under the `map` lock when
    /// it grows, so starts of different shards waiting on their spawns at once cannot
    /// pass the bound together (before: up to `SPAWN_SHARDS - 1` over it).
    starting: AtomicUsize,
    /// Serialises starting an actor per conversation (sharded: a start may wait for a
    /// store barrier, and must not hold up unrelated conversations).
    spawn_locks: Vec<tokio::sync::Mutex<()>>,
    /// Actors registered so far, per shard of conversations (`AT_REST_SHARDS`); changed
    /// under the `map` lock. A read answered from the store checks it did not move.
    registered: Vec<AtomicU64>,
    /// Set by `stop_all`: no read is answered at rest past it (the actors it stopped
    /// may have left writes short, and it keeps no replay records for them).
    closing: AtomicBool,
    /// Until when (ms since `epoch`) idle actors of the largest shares retire sooner
    /// (`pressed`): `PRESSED_TICKS` ticks past the newest start refused at
    /// `max_live_conversations`.
    pressed_until_ms: AtomicU64,
    /// The monotonic clock `pressed_until_ms` counts from (a step of the wall clock
    /// neither lengthens nor ends it).
    epoch: std::time::Instant,
}

/// Where a conversation's next actor resumes delivery.
#[derive(Clone, Copy, Debug)]
struct Replay {
    /// Entries after this seq may never have been delivered.
    after: Seq,
    /// Session the replayed entries skip (0: none).
    except: u64,
    /// The predecessor died mid-write: repair the newest entry first.
    repair: bool,
}

const SPAWN_SHARDS: usize = 64;

/// Shards of `ConvDirectory::registered`: a read at rest is sent to the actors when any
/// actor of its shard registers while it reads the store (1 in 1,024 conversations).
const AT_REST_SHARDS: usize = 1024;

/// The idle period after which a pressed actor retires (`ConvDirectory::pressed`), ms:
/// `conversation_idle_ms / PRESSED_IDLE_DIVISOR`, at least 1.
pub(super) fn pressed_idle_ms(config: &crate::Config) -> u64 {
    (config.conversation_idle_ms / PRESSED_IDLE_DIVISOR).max(1)
}

/// How long the shorter idle period lasts after a start refused at the cap, ms:
/// `PRESSED_TICKS` ticks, so every live actor ticks within it.
fn pressed_window_ms(config: &crate::Config) -> u64 {
    PRESSED_TICKS * super::actor::tick_period(config).as_millis() as u64
}

/// Which of a user's two shares of `max_live_conversations_per_user` places an actor
/// counts on. A user chooses what it writes to, but not which conversations others put
/// it in, nor the delivered marks its client sends by itself for whatever reaches it:
/// actors those marks start count apart, so strangers who add a user to thousands of
/// groups and write there fill at most its passive share (its delivered marks for
/// other conversations get `OVERLOADED` until those actors retire, and the client
/// sends them again), never the places its own writes need. Reads take no place at
/// all (`ConvDirectory::read`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Share {
    /// Writes and read marks: what the user itself does in the conversation.
    Active,
    /// Delivered marks (and a read that must start an actor: a conversation just
    /// created, or whose actor died).
    Passive,
}

impl Default for ConvDirectory {
    fn default() -> Self {
        ConvDirectory {
            map: std::sync::Mutex::new(HashMap::new()),
            started: std::sync::Mutex::new(HashMap::new()),
            starting: AtomicUsize::new(0),
            replay: std::sync::Mutex::new(HashMap::new()),
            spawn_locks: (0..SPAWN_SHARDS).map(|_| tokio::sync::Mutex::new(())).collect(),
            registered: (0..AT_REST_SHARDS).map(|_| AtomicU64::new(0)).collect(),
            closing: AtomicBool::new(false),
            pressed_until_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }
}

#[derive(Clone)]
struct Slot {
    actor: ActorRef<ConvMsg>,
    depth: Arc<AtomicUsize>,
    published: Arc<AtomicU64>,
    /// Whose share it counts on: the user (and share) whose request started it, then
    /// at each tick the newest writer that appended, or the newest marker whose write
    /// alone keeps it alive (`recharge`), until removed.
    starter: (UserId, Share),
}

/// One place of `max_live_conversations` and of a user's share of live actors, taken
/// when an actor start begins (`ConvDirectory::starting` counts it until then); given
/// back when dropped unless `keep` handed it to the registered slot (so a start that
/// fails, or whose caller went away mid-start, gives it back).
struct Place<'a> {
    started: &'a std::sync::Mutex<HashMap<(UserId, Share), usize>>,
    starting: &'a AtomicUsize,
    user: (UserId, Share),
    kept: bool,
}

impl Place<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        // Kept: dropped under the `map` lock, after the slot's insert.
        self.starting.fetch_sub(1, Ordering::AcqRel);
        if !self.kept {
            release(self.started, self.user);
        }
    }
}

/// Gives back one of `user`'s places (of one share).
fn release(started: &std::sync::Mutex<HashMap<(UserId, Share), usize>>, user: (UserId, Share)) {
    let mut started = started.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = started.get_mut(&user) {
        *n -= 1;
        if *n == 0 {
            started.remove(&user);
        }
    }
}

/// Held in a running actor's state, so that however the actor ends its drop runs: one
/// that ended without retiring (a panic, `kill`, a storage failure) is taken out of the
/// directory at once (`ConvDirectory::bury`), its places given back. Before, it held a
/// place of `max_live_conversations` and of its user's share until a member's request
/// found it dead, so a conversation nobody touched again kept them for the broker's life.
pub(super) struct Registration {
    pub(super) shared: Arc<Shared>,
    pub(super) conv: ConvId,
    pub(super) actor: ractor::ActorId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let directory = &self.shared.convs;
        let mut map = directory.map.lock().unwrap_or_else(|p| p.into_inner());
        directory.bury(&mut map, self.conv, self.actor);
    }
}

impl ConvDirectory {
    /// A write to `conv`. Taken in the order called: a session awaits this before its
    /// next request, so one session's writes to one conversation apply in order.
    pub async fn write(&self, shared: &Arc<Shared>, conv: ConvId, caller: Caller, cmd: Command, reply: Responder) {
        self.request(shared, conv, caller, ConvMsg::Write(caller, cmd, reply)).await
    }

    /// What an `AddMembers` of `caller` to `conv` as `role` would be refused with by
    /// the conversation whoever it names, if anything: not a member (`gate`), then
    /// `may_add` on the caller's stored role, returned once that is durable
    /// (`settled`). For the names resolved before the request is handed over: an
    /// unknown name is told only to whom the conversation would tell it (not to a
    /// stranger, nor to a member who may not add).
    pub async fn add_refusal(&self, shared: &Shared, conv: ConvId, caller: Caller, role: Role) -> Option<ErrorBody> {
        let refused = match gate(shared, conv, caller, None) {
            Err(refused) => refused,
            // Without a client id only a member passes the gate.
            Ok(None) => not_a_member(),
            Ok(Some(caller_role)) => match shared.store.conversation(conv) {
                Ok(Some(record)) => may_add(record.kind, caller_role, role).err()?,
                Ok(None) => not_a_member(),
                Err(e) => internal(e),
            },
        };
        Some(settled(shared, refused).await)
    }

    /// A read of `conv`'s durable state. One that lists members is refused
    /// `RATE_LIMITED` here, taking no mailbox room and waking no actor, while the
    /// caller's such reads are past their allowance (`UserDirectory::allow_member_reads`;
    /// checked again where it is answered, and the rows charged). A read never starts an
    /// actor, nor keeps one alive: once one of the user's store slots is free
    /// (`STORE_JOBS_PER_USER`: so no user has more than that many reads on the pool and
    /// in actors' mailboxes together) it is handed to the live actor if there is one,
    /// and otherwise answered from the store on the blocking pool (`read_at_rest`); the
    /// session goes on meanwhile, the read's task waiting (as many as the user's
    /// requests in flight, as its mailbox places were).
    /// Before, every read started an actor on the reader's share: strangers who
    /// put a user in thousands of groups filled its places with its own catch-up, and
    /// its writes got `OVERLOADED`. A stranger is refused here, live actor or not, once
    /// the membership writes applied so far are durable (`read_settled`): how long a
    /// refusal takes tells nothing of this conversation.
    pub async fn read(&self, shared: &Arc<Shared>, conv: ConvId, caller: Caller, read: Read, reply: Responder) {
        if let Err(refused) = shared.users.allow_read(caller.user, read) {
            return reply.send(Err(refused));
        }
        if let Err(refused) = gate(shared, conv, caller, None) {
            return reply.send(Err(read_settled(shared, refused).await));
        }
        let (shared, slots) = (shared.clone(), shared.users.store_slots(caller.user));
        tokio::spawn(async move {
            // Closed never: the semaphore lives as long as `slots`.
            let Ok(slot) = slots.acquire_owned().await else { return };
            // The session ended while this waited: nobody takes the answer.
            if reply.abandoned() {
                return;
            }
            let reply = reply.with_store_slot(Some(slot));
            if shared.convs.map.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&conv) {
                // Waits in the actor's mailbox holding the slot: the actor reads the
                // store on its runtime thread, between its members' writes, so a user
                // looping pages from many sessions (64 pages each in flight) would
                // otherwise queue thousands there, and every write waited behind them.
                return shared.convs.request(&shared, conv, caller, ConvMsg::Read(caller, read, reply)).await;
            }
            tokio::task::spawn_blocking(move || shared.convs.read_at_rest(&shared, conv, caller, read, reply));
        });
    }

    /// Answers `read` from the store alone, as `conv`'s actor would, if it is at rest
    /// (`at_rest`) from before the store is read until after: then everything stored of
    /// it is durable (an actor that retired had nothing pending; entries of one that
    /// died, or of a creation, wait for a successor, which the replay record shows) and
    /// nothing is pending to show as before. Read optimistically: an actor registered
    /// in between (in the same one of `AT_REST_SHARDS`) sends the read to the actors
    /// instead, so a read takes no lock that starts wait on. On the blocking pool. The
    /// allowance of member rows and the membership are checked again here, as an actor
    /// checks them right before its read: the first, since reads pipelined before any
    /// is charged all passed `read`'s check; the second after the snapshot, so it is
    /// the membership the answer is read under.
    fn read_at_rest(&self, shared: &Arc<Shared>, conv: ConvId, caller: Caller, read: Read, reply: Responder) {
        if reply.abandoned() {
            return;
        }
        if let Err(refused) = shared.users.allow_read(caller.user, read) {
            return reply.send(Err(refused));
        }
        let Some(before) = self.at_rest(conv) else { return self.read_by_actor(shared, conv, caller, read, reply) };
        let role = match gate(shared, conv, caller, None) {
            Ok(Some(role)) => role,
            // On the blocking pool: the refusal waits there (`read_settled`).
            Ok(None) => {
                return reply
                    .send(Err(tokio::runtime::Handle::current().block_on(read_settled(shared, not_a_member()))));
            }
            Err(refused) => {
                return reply.send(Err(tokio::runtime::Handle::current().block_on(read_settled(shared, refused))));
            }
        };
        let answer = super::actor::answer_at_rest(shared, conv, caller, role, read);
        if self.at_rest(conv) != Some(before) {
            return self.read_by_actor(shared, conv, caller, read, reply);
        }
        if shared.health.is_failed() {
            return reply.send(Err(ErrorBody::new(ErrorCode::INTERNAL, "storage failure")));
        }
        if let Ok(answer) = &answer {
            shared.users.charge_read(caller.user, read, answer);
        }
        reply.send(answer);
    }

    /// Hands a read that found `conv` not at rest to its actor (which the read may start,
    /// on the reader's `Share::Passive`: a conversation just created or whose actor
    /// died, or one whose actor started or retired while the store was read).
    /// It keeps its store slot: the actor reads the store too (see `read`).
    fn read_by_actor(&self, shared: &Arc<Shared>, conv: ConvId, caller: Caller, read: Read, reply: Responder) {
        let shared = shared.clone();
        tokio::runtime::Handle::current().spawn(async move {
            shared.convs.request(&shared, conv, caller, ConvMsg::Read(caller, read, reply)).await
        });
    }

    /// Whether `conv` is at rest: no actor registered, no successor owed (no replay
    /// record), not shutting down; if so, how many actors have registered in its shard
    /// of `AT_REST_SHARDS` so far (an actor of `conv` writes only once registered, and
    /// registering bumps the count).
    fn at_rest(&self, conv: ConvId) -> Option<u64> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&conv)
            || self.closing.load(Ordering::Acquire)
            || self.replay.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&conv)
        {
            return None;
        }
        Some(self.registered[(conv as usize) % AT_REST_SHARDS].load(Ordering::Acquire))
    }

    /// A `MarkRead` (with its responder, which holds one of the caller's store slots:
    /// `takes_a_store_slot`, so a user's marks in actors' mailboxes are as bounded as its
    /// reads) of `conv`. One that raises none of the caller's watermarks while the
    /// conversation has no live actor is answered from the store as a read
    /// (`Read::OwnReceipt`, a row of the caller's allowance of member rows: `read_at_rest`)
    /// and starts no actor. Before, a member looping `MarkRead { seq: 0 }` over its
    /// thousands of groups started an actor each time (each reading the whole member list,
    /// and retired at its next tick), uncharged, and could keep the live-actor places
    /// full; 64 sessions of it could fill one group's mailbox (an attacker review). A mark
    /// that raises a watermark goes to the actor, starting it: each is a receipt write, at
    /// most one per entry and member.
    ///
    /// Whether a mark raises anything is judged on the store for every mark, live actor
    /// or not, and one that raises nothing is charged either way, so a `RATE_LIMITED`
    /// tells nothing of whether the conversation's actor runs (which marks, other
    /// members' too, start: a review). The at-rest answer is given only if the
    /// conversation stayed at rest from before the store was read until after (`at_rest`):
    /// else an actor may have written a mark of another device of the caller that is
    /// not durable yet, and the mark goes to the actor, which answers once it is.
    pub async fn mark_read(&self, shared: &Arc<Shared>, conv: ConvId, caller: Caller, seq: Seq, reply: Responder) {
        if let Err(refused) = gate(shared, conv, caller, None) {
            return reply.send(Err(read_settled(shared, refused).await));
        }
        let rest = self.at_rest(conv);
        if matches!(super::actor::read_raises_at_rest(&shared.store, conv, caller.user, seq), Ok(false)) {
            if let Err(refused) = shared.users.allow_member_reads(caller.user) {
                return reply.send(Err(refused));
            }
            if rest.is_some() && self.at_rest(conv) == rest {
                // Charged where it is answered (`Read::rows`).
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || {
                    shared.convs.read_at_rest(&shared, conv, caller, Read::OwnReceipt, reply)
                });
                return;
            }
            if !shared.users.charge_member_reads(caller.user, 1) {
                return reply.send(Err(table_full()));
            }
        }
        self.request(shared, conv, caller, ConvMsg::Mark(caller, Mark::Read(seq), MarkReply::Read(reply))).await
    }

    /// A `MarkDelivered`: hands each `(conv, seq)` to its conversation's actor, in the
    /// order given (one conversation's highest mark only), before returning, so the
    /// session's later requests about those conversations see the marks. A mark that
    /// cannot raise the caller's stored delivered watermark (at or below it, or the
    /// conversation has nothing after it) is skipped: it wakes no actor and writes
    /// nothing. Marks for conversations `caller` is not a member of, or that do not
    /// exist, are dropped without a word (and start no actor). Each such mark, and each
    /// one skipped, spends a row of the caller's member-rows allowance
    /// (`UserDirectory::allow_member_reads`): `RATE_LIMITED`, nothing taken, while it
    /// is spent. `HandedMarks::answer` gives the request's answer once the actors have
    /// taken the marks.
    pub async fn mark_delivered(
        &self,
        shared: &Arc<Shared>,
        caller: Caller,
        revocation: crate::reply::Revocation,
        mut marks: Vec<(ConvId, Seq)>,
    ) -> HandedMarks {
        let mut handed = HandedMarks { caller, revocation, refused: None, pending: Vec::new() };
        if marks.len() > MAX_MARKS_PER_REQUEST as usize {
            handed.refused = Some(ErrorBody::new(ErrorCode::INVALID, "too many marks in one request"));
            return handed;
        }
        if shared.health.is_failed() {
            handed.refused = Some(ErrorBody::new(ErrorCode::INTERNAL, "storage failure"));
            return handed;
        }
        // Highest seq first per conversation, so the dedup below keeps it.
        marks.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        marks.dedup_by_key(|m| m.0);
        // Each mark costs two point reads of the store on the session's thread, before
        // any actor: a mark that raised nothing (a repeat, a stranger's conversation)
        // spends a row of the member-rows allowance (before, a loop of 256-mark requests
        // read without bound). Marks that raise a watermark are not charged: each leads to
        // a receipt write, paced per conversation, and every device sends them for what
        // reaches it, so charging them put every marking user in the allowances' table
        // (65,536 a second at most).
        if shared.users.member_reads_spent(caller.user) {
            handed.refused = Some(ErrorBody::new(
                ErrorCode::RATE_LIMITED,
                "delivered marks that raise nothing, too fast; retry in a moment",
            ));
            return handed;
        }
        let mut wasted = 0;
        for (conv, seq) in marks {
            match raises_delivery(&shared.store, conv, caller.user, seq) {
                Ok(true) => {
                    if !self.hand_mark(shared, &mut handed, conv, seq).await {
                        wasted += 1;
                    }
                }
                Ok(false) => wasted += 1,
                Err(e) => {
                    handed.refused.get_or_insert(e);
                }
            }
        }
        if !shared.users.charge_member_reads(caller.user, wasted) {
            handed.refused.get_or_insert(table_full());
        }
        handed
    }

    /// Hands one delivered mark to its conversation's actor, recording in `handed` what
    /// to wait for or the refusal (a stranger's mark is dropped: `false`).
    async fn hand_mark(&self, shared: &Arc<Shared>, handed: &mut HandedMarks, conv: ConvId, seq: Seq) -> bool {
        let (taken, on_taken) = tokio::sync::oneshot::channel();
        let msg =
            ConvMsg::Mark(handed.caller, Mark::Delivered(seq), MarkReply::Taken(taken, handed.revocation.clone()));
        match self.hand(shared, conv, handed.caller, msg).await {
            Ok(()) => handed.pending.push((conv, seq, on_taken)),
            // A stranger's mark (or one for no conversation) is dropped.
            Err((_, e)) if e.code == ErrorCode::FORBIDDEN => return false,
            Err((_, e)) => {
                handed.refused.get_or_insert(e);
            }
        }
        true
    }

    /// Delivers a request to the conversation's actor (see `hand`), or answers its
    /// refusal.
    async fn request(&self, shared: &Arc<Shared>, conv: ConvId, caller: Caller, msg: ConvMsg) {
        if let Err((msg, error)) = self.hand(shared, conv, caller, msg).await {
            refuse(msg, error);
        }
    }

    /// Delivers a message to the conversation's actor, starting it if needed, or gives
    /// it back with its refusal: `FORBIDDEN` to a non-member and for no such
    /// conversation alike, before anything else (strangers learn nothing, never start or
    /// wake actors and never take mailbox room; a write's, once `settled`); `OVERLOADED` for a full mailbox or too
    /// many live actors; `INTERNAL` once the store has failed.
    async fn hand(
        &self,
        shared: &Arc<Shared>,
        conv: ConvId,
        caller: Caller,
        mut msg: ConvMsg,
    ) -> Result<(), (ConvMsg, ErrorBody)> {
        let resend = match &msg {
            ConvMsg::Write(_, cmd, _) => cmd.client_id(),
            _ => None,
        };
        let share = match &msg {
            ConvMsg::Write(..) | ConvMsg::Mark(_, _, MarkReply::Read(_)) => Share::Active,
            _ => Share::Passive,
        };
        if let Err(e) = gate(shared, conv, caller, resend) {
            return match &msg {
                ConvMsg::Write(..) => Err((msg, settled(shared, e).await)),
                // Dropped unanswered (`MarkDelivered`): nothing to wait for.
                ConvMsg::Mark(_, _, MarkReply::Taken(..)) => Err((msg, e)),
                _ => Err((msg, read_settled(shared, e).await)),
            };
        }
        let mut dead = None;
        // An actor this request started, registered with its place in the mailbox
        // taken: it cannot retire before the request is cast (a start is no activity).
        let mut started = None;
        let mailbox_max = shared.config.conversation_mailbox_max;
        // Three tries, two starts: one more start would have nothing cast to it.
        for attempt in 0..3 {
            let slot = started.take().map(|slot| (slot, false)).or_else(|| {
                let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
                map.get(&conv).cloned().map(|slot| {
                    let over = slot.depth.fetch_add(1, Ordering::AcqRel) >= mailbox_max;
                    (slot, over)
                })
            });
            match slot {
                Some((slot, true)) => {
                    slot.depth.fetch_sub(1, Ordering::AcqRel);
                    return Err((msg, ErrorBody::new(ErrorCode::OVERLOADED, "conversation is overloaded; retry")));
                }
                Some((slot, false)) => match slot.actor.cast(msg) {
                    Ok(()) => return Ok(()),
                    Err(ractor::MessagingErr::SendErr(back)) => {
                        // The actor died: replace it below.
                        slot.depth.fetch_sub(1, Ordering::AcqRel);
                        dead = Some(slot.actor.get_id());
                        msg = back;
                    }
                    Err(_) => {
                        // Not given back: its responder, dropped, answers INTERNAL (a
                        // delivered mark's dropped `Taken` has it handed over again).
                        slot.depth.fetch_sub(1, Ordering::AcqRel);
                        return Ok(());
                    }
                },
                None => {}
            }
            if attempt == 2 {
                break;
            }
            // Boxed: starting an actor is rare, and its future inline would be carried by
            // every session's task for its whole life (about 3 KB per connection).
            match Box::pin(self.spawn(shared, conv, dead.take(), (caller.user, share), true)).await {
                Ok(slot) => started = slot,
                Err(e) => return Err((msg, e)),
            }
            if started.is_some() {
                shared.pauses.pass(crate::pauses::Point::ConversationStarted).await;
            }
        }
        Err((msg, ErrorBody::new(ErrorCode::INTERNAL, "conversation unavailable")))
    }

    /// Records that `conv` was just created by `session`: its first entry is delivered
    /// by the conversation's first actor (`start_created` starts it). Call before the
    /// creation is visible to anyone else.
    pub fn created(&self, conv: ConvId, session: u64) {
        let replay = Replay { after: 0, except: session, repair: false };
        self.replay.lock().unwrap_or_else(|p| p.into_inner()).insert(conv, replay);
    }

    /// Starts the actor of a conversation `created` named, which delivers seq 1, on
    /// its `creator`'s active share.
    pub async fn start_created(&self, shared: &Arc<Shared>, conv: ConvId, creator: UserId) -> Result<(), ErrorBody> {
        Box::pin(self.spawn(shared, conv, None, (creator, Share::Active), false)).await.map(|_| ())
    }

    /// Starts an actor for `conv` unless a live one is registered (the caller checked
    /// who may ask), on `starter`'s share of live actors. `dead` names an actor found
    /// dead: its successor resumes delivery from the dead actor's published watermark.
    /// `OVERLOADED` at `max_live_conversations`, or when `starter` already holds
    /// `max_live_conversations_per_user` live ones on that share.
    async fn spawn(
        &self,
        shared: &Arc<Shared>,
        conv: ConvId,
        dead: Option<ractor::ActorId>,
        starter: (UserId, Share),
        reserve: bool,
    ) -> Result<Option<Slot>, ErrorBody> {
        let _guard = self.spawn_locks[(conv as usize) % SPAWN_SHARDS].lock().await;
        let place = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(dead) = dead {
                self.bury(&mut map, conv, dead);
            }
            match map.get(&conv) {
                // Someone else already started one.
                Some(_) => return Ok(None),
                None if map.len() + self.starting.load(Ordering::Acquire) >= shared.config.max_live_conversations => {
                    drop(map);
                    return Err(self.full(shared));
                }
                None => {}
            }
            let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
            let mine = started.entry(starter).or_insert(0);
            // Never 0 (`config::check`), so a refusal leaves no empty entry behind.
            if *mine >= shared.config.max_live_conversations_per_user {
                return Err(ErrorBody::new(
                    ErrorCode::OVERLOADED,
                    "too many of your conversations are active at once; retry later",
                ));
            }
            *mine += 1;
            self.starting.fetch_add(1, Ordering::AcqRel);
            Place { started: &self.started, starting: &self.starting, user: starter, kept: false }
        };
        let store = &shared.store;
        if store.conversation(conv).map_err(internal)?.is_none() {
            return Err(not_a_member());
        }
        let replay = self.replay.lock().unwrap_or_else(|p| p.into_inner()).get(&conv).copied();
        if replay.is_some_and(|r| r.repair) {
            // An actor that died (a panic) may have left its newest entry's writes short:
            // finish them before the successor loads anything. A crash of the whole broker
            // is covered by `Store::repair_all` at start, and an actor that retired idle
            // had finished its writes, so nothing else needs this.
            store.repair_newest_entry(conv).map_err(internal)?;
        }
        let depth = Arc::new(AtomicUsize::new(0));
        let published = Arc::new(AtomicU64::new(replay.map_or(0, |r| r.after)));
        let args = ConvArgs {
            id: conv,
            depth: depth.clone(),
            published: published.clone(),
            replay_after: replay.map(|r| r.after),
            replay_except: replay.map_or(0, |r| r.except),
        };
        let (actor, _) = Actor::spawn(None, Conversation { shared: shared.clone() }, args).await.map_err(internal)?;
        // Registered and the replay record dropped together: a reader of `published`
        // sees one or the other.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let id = actor.get_id();
        let status = actor.get_status();
        if reserve {
            // Under the map lock, where `retire` checks it.
            depth.fetch_add(1, Ordering::AcqRel);
        }
        let slot = Slot { actor, depth, published, starter };
        map.insert(conv, slot.clone());
        self.registered[(conv as usize) % AT_REST_SHARDS].fetch_add(1, Ordering::AcqRel);
        place.keep();
        self.replay.lock().unwrap_or_else(|p| p.into_inner()).remove(&conv);
        // Died already (its first tick or a panic on another thread): its state's drop,
        // which may have run before the insert, found nothing to take out.
        if matches!(status, ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped) {
            self.bury(&mut map, conv, id);
            if reserve {
                slot.depth.fetch_sub(1, Ordering::AcqRel);
            }
            return Ok(None);
        }
        Ok(reserve.then_some(slot))
    }

    /// The refusal of a start at `max_live_conversations`. For `PRESSED_TICKS` ticks
    /// from now, idle actors of the largest shares retire sooner (`pressed`): the
    /// cap is a bound on memory, and its places go to whoever needs one now, not to
    /// whoever touched the most conversations in the last `conversation_idle_ms`.
    /// Before, accounts that kept the cap full (31 of them at their shares' bound, each
    /// actor touched once a minute, by any request) had every other user's writes to a
    /// conversation at rest refused for as long as they kept on. Told in the log at most
    /// once a minute.
    fn full(&self, shared: &Shared) -> ErrorBody {
        let until = self.epoch.elapsed().as_millis() as u64 + pressed_window_ms(&shared.config);
        self.pressed_until_ms.fetch_max(until, Ordering::AcqRel);
        if let Some(refused) = shared.counters.conversation_starts_refused_full.count(crate::now_ms()) {
            tracing::warn!(
                refused,
                max_live_conversations = shared.config.max_live_conversations,
                idle_ms = pressed_idle_ms(&shared.config),
                "conversation actor starts refused at max_live_conversations since the last warning; idle actors retire sooner meanwhile"
            );
        }
        ErrorBody::new(ErrorCode::OVERLOADED, "too many active conversations; retry later")
    }

    /// Whether `conv`'s `actor` retires at its tick once idle for `pressed_idle_ms`
    /// rather than `conversation_idle_ms`: while a start was refused at
    /// `max_live_conversations` lately (`full`), an actor counted on a share that holds
    /// at least an even part of the cap (`max_live_conversations` over the shares
    /// holding any). A full cap holds on average exactly that, so the largest holders
    /// always give places back and nobody is kept out by idle actors, however the places
    /// are spread; a user with a few conversations among many who hold thousands keeps
    /// its actors. (Accounts holding less than the even part each are not pressed: to
    /// hold much of the cap so they must outnumber the users who hold more, tens of
    /// thousands of accounts against the registration limits, and the users they leave
    /// pressed still take each other's idle places.)
    pub(super) fn pressed(&self, config: &crate::Config, conv: ConvId, actor: ractor::ActorId) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        if now >= self.pressed_until_ms.load(Ordering::Acquire) {
            return false;
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = map.get(&conv).filter(|slot| slot.actor.get_id() == actor) else { return false };
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        let held = started.get(&slot.starter).copied().unwrap_or(0);
        held.saturating_mul(started.len()) >= config.max_live_conversations
    }

    /// Moves the place `actor` (if still registered for `conv`) takes among
    /// `max_live_conversations_per_user` to `user`'s share: the newest writer that
    /// appended (active share), or, when only marks' writes keep it past its idle
    /// period, the newest marker (passive share). An actor counts for whoever keeps it
    /// alive, not for whoever happened to start it (a member's delivered mark, say), so
    /// nobody can keep actors alive on another's share. Past that share if need be:
    /// only new starts are refused.
    pub(super) fn recharge(&self, conv: ConvId, actor: ractor::ActorId, user: (UserId, Share)) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = map.get_mut(&conv)
            && slot.actor.get_id() == actor
            && slot.starter != user
        {
            release(&self.started, slot.starter);
            *self.started.lock().unwrap_or_else(|p| p.into_inner()).entry(user).or_insert(0) += 1;
            slot.starter = user;
        }
    }

    /// Takes `actor` out of the map if it is `conv`'s registered actor, found dead: its
    /// places go back, and its successor resumes delivery after its published watermark,
    /// repairing its newest entry first. The replay record is kept until a successor is
    /// registered, whatever fails on the way (one per conversation, so bounded by the
    /// conversations there are).
    fn bury(&self, map: &mut HashMap<ConvId, Slot>, conv: ConvId, actor: ractor::ActorId) {
        let Some(slot) = map.get(&conv).filter(|slot| slot.actor.get_id() == actor) else { return };
        let after = slot.published.load(Ordering::Acquire);
        release(&self.started, slot.starter);
        map.remove(&conv);
        let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        let record = replay.entry(conv).or_insert(Replay { after, except: 0, repair: true });
        record.after = record.after.min(after);
        record.repair = true;
    }

    /// Removes `actor` if it is still the registered one and nothing is queued for it.
    pub(super) fn retire(&self, conv: ConvId, actor: ractor::ActorId) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&conv) {
            Some(slot) if slot.actor.get_id() == actor && slot.depth.load(Ordering::Acquire) == 0 => {
                let starter = slot.starter;
                map.remove(&conv);
                release(&self.started, starter);
                true
            }
            _ => false,
        }
    }

    /// Kills a conversation's actor the way a crash would: no clean stop, queued
    /// messages and pending acknowledgements dropped (each pending request is answered
    /// `INTERNAL`; clients retry with the same ids). The next request starts a successor
    /// that pushes whatever the dead actor made durable but never fanned out. For
    /// fault-injection tests and operators.
    pub fn kill(&self, conv: ConvId) -> bool {
        let slot = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&conv).cloned();
        slot.map(|s| s.actor.kill()).is_some()
    }

    /// The newest seq of `conv` that online devices have been sent or are being sent
    /// (stored just before an entry goes out), if an actor is registered or about to
    /// resume it (never ahead of what is durable).
    pub fn published(&self, conv: ConvId) -> Option<Seq> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&conv) {
            Some(slot) => Some(slot.published.load(Ordering::Acquire)),
            None => self.replay.lock().unwrap_or_else(|p| p.into_inner()).get(&conv).map(|r| r.after),
        }
    }

    /// How many messages wait in `conv`'s actor's mailbox (`None`: no live actor). For
    /// tests and diagnostics.
    pub fn mailbox_depth(&self, conv: ConvId) -> Option<usize> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&conv).map(|slot| slot.depth.load(Ordering::Acquire))
    }

    /// Number of live conversation actors.
    pub fn live(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stops every actor (shutdown). Whether every one was alive and no dead actor's
    /// newest entry still waits for its repair: if not, a write may have been cut short,
    /// and the store must not be vouched for (the next start repairs every conversation).
    pub fn stop_all(&self) -> bool {
        // The locks in `spawn`'s order, held together: a dead actor is in one or the other.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        self.closing.store(true, Ordering::Release);
        let mut intact = self.replay.lock().unwrap_or_else(|p| p.into_inner()).values().all(|r| !r.repair);
        self.started.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for (_, slot) in map.drain() {
            // A registered actor is removed before it retires: one stopping or stopped
            // died (one still starting is alive: ractor marks it running in its own task).
            let status = slot.actor.get_status();
            intact &= !matches!(status, ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped);
            slot.actor.stop(Some("shutdown".into()));
        }
        intact
    }
}

/// Delivered marks handed to conversation actors by `ConvDirectory::mark_delivered`,
/// until each actor has taken its mark.
pub struct HandedMarks {
    caller: Caller,
    /// Whether the device that sent the marks was cut off since (the actors check).
    revocation: crate::reply::Revocation,
    /// The first refusal met (`INVALID`, `OVERLOADED`, `INTERNAL`).
    refused: Option<ErrorBody>,
    /// Marks cast to an actor, with the signal that it took them (and whether they
    /// raised the watermark).
    pending: Vec<(ConvId, Seq, tokio::sync::oneshot::Receiver<bool>)>,
}

/// How many times one delivered mark is handed to its conversation's actors before the
/// request is answered `OVERLOADED`: the first actor and two successors.
const MARK_HANDOFFS: usize = 3;

impl HandedMarks {
    /// The answer, when there is nothing to wait for (every mark was skipped, dropped
    /// or refused).
    pub fn ready(&mut self) -> Option<Result<Reply, ErrorBody>> {
        self.pending.is_empty().then(|| self.refused.take().map_or(Ok(Reply::Done), Err))
    }

    /// Waits until every actor took its mark. A mark its actor dropped untaken (the
    /// actor was stopping: killed, failed) is handed to a successor, at most
    /// `MARK_HANDOFFS` times in all. `Done` once every mark was taken; else the first
    /// refusal: `OVERLOADED` (retry: marks are idempotent), `INVALID` for too many marks,
    /// `INTERNAL` once the store has failed. Taken is not durable: the watermark is
    /// shown once the next commit covers it.
    pub async fn answer(mut self, shared: &Arc<Shared>) -> Result<Reply, ErrorBody> {
        // Marks the actors took that raised nothing (repeats of a mark not yet written,
        // which the store's check let through): charged as the skipped ones were.
        let mut wasted = 0;
        for handoff in 1..=MARK_HANDOFFS {
            let mut lost = Vec::new();
            for (conv, seq, taken) in std::mem::take(&mut self.pending) {
                match taken.await {
                    Ok(raised) => wasted += usize::from(!raised),
                    Err(_) => lost.push((conv, seq)),
                }
            }
            if lost.is_empty() {
                break;
            }
            if handoff == MARK_HANDOFFS {
                let e = ErrorBody::new(ErrorCode::OVERLOADED, "conversation restarting; retry the marks");
                self.refused.get_or_insert(e);
                break;
            }
            for (conv, seq) in lost {
                // A successor that finds the caller no member drops it: wasted as any.
                if !shared.convs.hand_mark(shared, &mut self, conv, seq).await {
                    wasted += 1;
                }
            }
        }
        if !shared.users.charge_member_reads(self.caller.user, wasted) {
            self.refused.get_or_insert(table_full());
        }
        // The actors dropped the marks of a device cut off since it sent them.
        self.revocation.refusal()?;
        self.refused.map_or(Ok(Reply::Done), Err)
    }
}

/// A charge of marks that raised nothing could not be recorded: the allowances' table
/// is full of users still refilling (`MEMBER_ROWS_BUCKETS_MAX`), so, as a read would be,
/// the request is refused rather than left uncounted.
fn table_full() -> ErrorBody {
    ErrorBody::new(ErrorCode::RATE_LIMITED, "too many users are reading member lists; retry in a second")
}

/// Whether `user`'s delivered mark at `seq` in `conv` could raise its stored watermark:
/// not when at or below it, nor when the conversation has no entry after it (the actor
/// clamps marks to the log). No record reads as 0. The stored record may be ahead of
/// what is durable, never of what the actor holds, so a skipped mark changes nothing.
fn raises_delivery(store: &Store, conv: ConvId, user: UserId, seq: Seq) -> Result<bool, ErrorBody> {
    let stored = store.receipt(conv, user).map_err(internal)?.map_or(0, |r| r.delivered_up_to);
    if seq <= stored {
        return Ok(false);
    }
    Ok(store.last_seq(conv).map_err(internal)? > stored)
}

fn refuse(msg: ConvMsg, error: ErrorBody) {
    if let Some(reply) = msg.into_responder() {
        reply.send(Err(error));
    }
}

/// `refused`, a write's refusal judged on the store, once everything applied so far is
/// durable (`INTERNAL` if that fails): member keys are written with their entry, before
/// it is durable, and a crash before then would make the refusal false (a retried
/// `Leave` told `FORBIDDEN` while the first is in flight, or a removed member told it
/// is none, and then the member is back), as `ConversationState::refuse` waits in the
/// actor. Every such refusal waits the same, a stranger's too, so the wait tells
/// nothing (whether the conversation has entries in flight, say). The wait shares the
/// next group commit as an entry does (it ends no commit delay), so a stranger looping
/// on refused writes, each admitted as a write in flight, costs the broker no more than
/// messages to a conversation of its own would.
pub(super) async fn settled(shared: &Shared, refused: ErrorBody) -> ErrorBody {
    let durable = match shared.store.barrier_grouped() {
        Ok(durable) => durable.await,
        Err(e) => Err(e),
    };
    match durable {
        Ok(()) => refused,
        Err(e) => internal(e),
    }
}

/// `refused`, a read's or a mark's refusal judged on the store, once the membership
/// writes applied so far are durable (`Store::index_barrier`: at once when none is in
/// flight, so a stranger's refused reads force no commit). Before, only writes waited:
/// a member whose removal was applied but not yet durable was refused a catch-up page
/// at once, a client takes that as having left (`SessionEvent::Left`), and a crash
/// before the commit took the removal back.
async fn read_settled(shared: &Shared, refused: ErrorBody) -> ErrorBody {
    let durable = match shared.store.index_barrier() {
        Ok(Some(durable)) => durable.await,
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    match durable {
        Ok(()) => refused,
        Err(e) => internal(e),
    }
}

/// The refusal of a request of `caller` about `conv` before it reaches the actor, if
/// any: `INTERNAL` after a storage failure (even a live actor whose own writes all
/// succeeded may not serve reads or acknowledge anything once durability is lost), else
/// `not_a_member` unless `caller` is a member (as far as the store knows, which may be
/// ahead of the durable state; the actor checks again) or a former member resending
/// (`resend`) a write that was applied (it is answered its original seq). Passed, the
/// caller's stored role (`None` for such a resend).
fn gate(
    shared: &Shared,
    conv: ConvId,
    caller: Caller,
    resend: Option<&ClientMsgId>,
) -> Result<Option<Role>, ErrorBody> {
    if shared.health.is_failed() {
        return Err(ErrorBody::new(ErrorCode::INTERNAL, "storage failure"));
    }
    let store = &shared.store;
    if let Some(role) = store.member(conv, caller.user).map_err(internal)? {
        return Ok(Some(role));
    }
    match resend {
        Some(id) if store.dedupe(conv, caller.user, id).map_err(internal)?.is_some() => Ok(None),
        _ => Err(not_a_member()),
    }
}
