//! The conversation actor: one per active conversation. It owns seq assignment, the
//! membership cache and the order of fan-out. `ConvCore` holds the rules (who may do
//! what, what an action writes) with no I/O; the actor performs the writes, waits for
//! the group commit and only then acknowledges and fans out, in seq order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use switchboard_protocol::limits::{HISTORY_PAGE_MAX, MAX_GROUP_MEMBERS, MAX_TEXT_BYTES};
use switchboard_protocol::{
    Body, ClientMsgId, ConvId, ConversationKind, DeviceId, Entry, ErrorBody, ErrorCode, Event, Member, Page, Reply,
    Role, Seq, ServerFrame, UserId, encode_frame,
};

use crate::Shared;
use crate::reply::{Responder, internal};

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
    Send { client_id: ClientMsgId, text: String },
    /// Replace my message's text.
    Edit { client_id: ClientMsgId, target: Seq, text: String },
    /// Tombstone my message.
    Delete { client_id: ClientMsgId, target: Seq },
    /// Add users (group, owner/admin).
    Add { users: Vec<UserId>, role: Role },
    /// Remove a member (group, owner/admin).
    Remove { user: UserId },
    /// Leave (group).
    Leave,
}

impl Command {
    fn client_id(&self) -> Option<&ClientMsgId> {
        match self {
            Command::Send { client_id, .. } | Command::Edit { client_id, .. } | Command::Delete { client_id, .. } => {
                Some(client_id)
            }
            _ => None,
        }
    }

    fn target(&self) -> Option<Seq> {
        match self {
            Command::Edit { target, .. } | Command::Delete { target, .. } => Some(*target),
            _ => None,
        }
    }
}

/// What a command writes, decided before any I/O.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// The new log entry. The store derives the rest of the write from it (the edited
    /// or tombstoned target, member keys, the idempotency key).
    pub entry: Entry,
    /// Membership changes (`None` removes).
    pub members: Vec<(UserId, Option<Role>)>,
    /// Who hears of it: members before and after the change.
    pub recipients: Arc<[UserId]>,
}

/// The rules of one conversation, without I/O.
#[derive(Debug)]
pub struct ConvCore {
    /// Id.
    pub id: ConvId,
    /// Direct or group.
    pub kind: ConversationKind,
    /// Members and roles.
    pub members: HashMap<UserId, Role>,
    /// Newest assigned seq (applied, maybe not yet durable).
    pub last_seq: Seq,
    /// The members as a shared list: every message's fan-out reuses it instead of
    /// collecting the member map per message. Rebuilt when membership changes.
    audience: Arc<[UserId]>,
}

fn err(code: ErrorCode, msg: &str) -> ErrorBody {
    ErrorBody::new(code, msg)
}

impl ConvCore {
    /// A conversation's rules over its current members.
    pub fn new(id: ConvId, kind: ConversationKind, members: HashMap<UserId, Role>, last_seq: Seq) -> Self {
        let audience = members.keys().copied().collect();
        ConvCore { id, kind, members, last_seq, audience }
    }

    /// The caller's role, or `FORBIDDEN` for a non-member.
    pub fn role(&self, user: UserId) -> Result<Role, ErrorBody> {
        self.members.get(&user).copied().ok_or_else(|| err(ErrorCode::FORBIDDEN, "not a member of this conversation"))
    }

    /// Validates `cmd` by `caller` and decides what it writes. `target` is the stored
    /// entry an edit or delete refers to, looked up by the caller of this function.
    pub fn plan(&self, caller: Caller, cmd: Command, target: Option<Entry>, now_ms: u64) -> Result<Plan, ErrorBody> {
        let role = self.role(caller.user)?;
        let seq = self.last_seq + 1;
        let client_id = cmd.client_id().copied().unwrap_or_default();
        let mut members = Vec::new();
        let body = match cmd {
            Command::Send { text, .. } => {
                check_text(&text)?;
                Body::Text { text, edited: false }
            }
            Command::Edit { target: t, text, .. } => {
                check_text(&text)?;
                own_text(target, caller.user, t)?;
                Body::Edit { target: t, text }
            }
            Command::Delete { target: t, .. } => {
                own_text(target, caller.user, t)?;
                Body::Delete { target: t }
            }
            Command::Add { users, role: new_role } => {
                self.group_admin(role)?;
                if new_role == Role::Owner {
                    return Err(err(ErrorCode::INVALID, "a group has one owner"));
                }
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
                self.group_admin(role)?;
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
                    return Err(err(ErrorCode::INVALID, "cannot leave a direct conversation"));
                }
                if role == Role::Owner && self.members.len() > 1 {
                    return Err(err(ErrorCode::FORBIDDEN, "the owner cannot leave while others remain"));
                }
                members.push((caller.user, None));
                Body::MemberLeft
            }
        };
        let recipients = if members.is_empty() {
            self.audience.clone()
        } else {
            let mut all: Vec<UserId> = self.audience.to_vec();
            all.extend(members.iter().filter(|(_, r)| r.is_some()).map(|(u, _)| *u));
            all.into()
        };
        let entry = Entry {
            conv: self.id,
            seq,
            sender: caller.user,
            sender_device: caller.device,
            client_id,
            at_ms: now_ms,
            body,
        };
        Ok(Plan { entry, members, recipients })
    }

    /// Records a planned (and written) change.
    pub fn apply(&mut self, plan: &Plan) {
        self.last_seq = plan.entry.seq;
        for &(user, role) in &plan.members {
            match role {
                Some(r) => self.members.insert(user, r),
                None => self.members.remove(&user),
            };
        }
        if !plan.members.is_empty() {
            self.audience = self.members.keys().copied().collect();
        }
    }

    fn group_admin(&self, role: Role) -> Result<(), ErrorBody> {
        if self.kind != ConversationKind::Group {
            return Err(err(ErrorCode::INVALID, "direct conversations have fixed members"));
        }
        if role > Role::Admin {
            return Err(err(ErrorCode::FORBIDDEN, "only the owner or an admin may change members"));
        }
        Ok(())
    }
}

fn check_text(text: &str) -> Result<(), ErrorBody> {
    if text.is_empty() || text.len() > MAX_TEXT_BYTES as usize {
        return Err(err(ErrorCode::INVALID, "text must be 1..=max_text_bytes bytes"));
    }
    Ok(())
}

/// Checks that `target` is a live text message of `user`'s.
fn own_text(target: Option<Entry>, user: UserId, seq: Seq) -> Result<(), ErrorBody> {
    let stored = target.ok_or_else(|| err(ErrorCode::NOT_FOUND, &format!("no entry {seq}")))?;
    if stored.sender != user {
        return Err(err(ErrorCode::FORBIDDEN, "only the sender may edit or delete a message"));
    }
    match stored.body {
        Body::Text { .. } => Ok(()),
        Body::Tombstone => Err(err(ErrorCode::NOT_FOUND, "message was deleted")),
        _ => Err(err(ErrorCode::INVALID, "only text messages can be edited or deleted")),
    }
}

/// Messages to a conversation actor.
pub enum ConvMsg {
    /// A client request (counted against the mailbox bound).
    Request(Caller, ConvRequest, Responder),
    /// Writes up to `seq` are durable (`ok`), or the commit failed.
    Durable { seq: Seq, ok: bool },
    /// Periodic idle check.
    Tick,
}

/// What a client asks of a conversation.
pub enum ConvRequest {
    /// Append to the log.
    Write(Command),
    /// Read a page.
    History { page: Page, limit: u16 },
    /// List members.
    Members,
}

/// An acknowledgement or fan-out waiting for its write to become durable.
struct Pending {
    seq: Seq,
    fanout: Option<(Bytes, Arc<[UserId]>, u64)>,
    reply: Option<(Responder, Reply)>,
}

/// Actor state.
pub struct ConvState {
    core: ConvCore,
    durable_seq: Seq,
    pending: VecDeque<Pending>,
    depth: Arc<AtomicUsize>,
    /// Highest seq fanned out (shared with the directory, so a successor of a crashed
    /// actor knows which durable entries were never pushed to online devices).
    published: Arc<AtomicU64>,
    last_activity: Instant,
    /// A commit failed: refuse writes until restarted from the store.
    poisoned: bool,
}

/// What a conversation actor starts from.
pub struct ConvArgs {
    id: ConvId,
    depth: Arc<AtomicUsize>,
    published: Arc<AtomicU64>,
    /// Set when replacing an actor that died: entries after this seq may never have
    /// been fanned out.
    resume_after: Option<Seq>,
}

/// The conversation actor.
pub struct Conversation {
    pub(crate) shared: Arc<Shared>,
}

impl Actor for Conversation {
    type Msg = ConvMsg;
    type State = ConvState;
    type Arguments = ConvArgs;

    async fn pre_start(&self, myself: ActorRef<ConvMsg>, args: ConvArgs) -> Result<ConvState, ActorProcessingErr> {
        let ConvArgs { id, depth, published, resume_after } = args;
        let store = &self.shared.store;
        let record = store.conversation(id)?.ok_or("conversation vanished")?;
        // A predecessor that died may have applied entries it never saw durable: make
        // them durable before serving them. (A predecessor that retired idle had nothing
        // pending, and `Broker::start` made everything recovered durable.) Skipping the
        // barrier otherwise keeps a burst of first messages from waiting on fsyncs.
        if resume_after.is_some() {
            store.barrier()?.await?;
        }
        let last_seq = store.last_seq(id)?;
        let members: HashMap<UserId, Role> = store.members(id)?.into_iter().collect();
        if let Some(after) = resume_after {
            // The predecessor died between making entries durable (or applying them) and
            // pushing them: push them now, once, in order.
            for entry in store.entries(id, after.saturating_add(1), last_seq, usize::MAX, false)? {
                let recipients = recipients_of(&entry, &members);
                let frame = encode_frame(&ServerFrame::Event(Event::Entry(entry)))?;
                self.shared.online.deliver(&recipients, &frame, 0);
            }
        }
        published.store(last_seq, Ordering::Release);
        let tick = Duration::from_millis((self.shared.config.conversation_idle_ms / 4).clamp(10, 15_000));
        myself.send_interval(tick, || ConvMsg::Tick);
        Ok(ConvState {
            core: ConvCore::new(id, record.kind, members, last_seq),
            durable_seq: last_seq,
            pending: VecDeque::new(),
            depth,
            published,
            last_activity: Instant::now(),
            poisoned: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ConvMsg>,
        msg: ConvMsg,
        state: &mut ConvState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConvMsg::Request(caller, req, reply) => {
                state.depth.fetch_sub(1, Ordering::AcqRel);
                state.last_activity = Instant::now();
                match req {
                    ConvRequest::Write(cmd) => self.write(&myself, state, caller, cmd, reply),
                    ConvRequest::History { page, limit } => self.history(state, caller, page, limit, reply),
                    ConvRequest::Members => self.members(state, caller, reply),
                }
            }
            ConvMsg::Durable { seq, ok } => self.durable(&myself, state, seq, ok),
            ConvMsg::Tick => {
                let idle = Duration::from_millis(self.shared.config.conversation_idle_ms);
                if state.pending.is_empty()
                    && state.last_activity.elapsed() >= idle
                    && self.shared.convs.retire(state.core.id, myself.get_id())
                {
                    myself.stop(Some("idle".into()));
                }
            }
        }
        Ok(())
    }
}

impl Conversation {
    fn write(&self, myself: &ActorRef<ConvMsg>, state: &mut ConvState, caller: Caller, cmd: Command, reply: Responder) {
        if state.poisoned {
            return reply.fail(ErrorCode::INTERNAL, "storage failure; retry");
        }
        let store = &self.shared.store;
        let id = state.core.id;
        if let Err(e) = state.core.role(caller.user) {
            return reply.send(Err(e));
        }
        if let Some(client_id) = cmd.client_id() {
            match store.dedupe(id, caller.user, client_id) {
                Ok(Some(seq)) => {
                    let ack = Reply::Appended { seq, duplicate: true };
                    if seq <= state.durable_seq {
                        return reply.send(Ok(ack));
                    }
                    state.pending.push_back(Pending { seq, fanout: None, reply: Some((reply, ack)) });
                    return;
                }
                Ok(None) => {}
                Err(e) => return reply.send(Err(internal(e))),
            }
        }
        let target = match cmd.target() {
            Some(t) if t <= state.durable_seq => match store.entry(id, t) {
                Ok(e) => e,
                Err(e) => return reply.send(Err(internal(e))),
            },
            _ => None,
        };
        let plan = match state.core.plan(caller, cmd, target, crate::now_ms()) {
            Ok(p) => p,
            Err(e) => return reply.send(Err(e)),
        };
        let seq = plan.entry.seq;
        let frame = match encode_frame(&ServerFrame::Event(Event::Entry(plan.entry.clone()))) {
            Ok(f) => f,
            Err(e) => return reply.send(Err(internal(e))),
        };
        let me = myself.clone();
        // The store derives the entry's other writes (idempotency key, edited target,
        // member keys) from the entry itself; see `Store::append_then`.
        let written = store.append_then(&plan.entry, move |r| {
            let _ = me.cast(ConvMsg::Durable { seq, ok: r.is_ok() });
        });
        if let Err(e) = written {
            // The entry (and some of its effects) may have been written without a
            // durability promise: this actor's view of the log can no longer be trusted. A
            // successor repairs the newest entry and reloads from the store (pending
            // requests are answered INTERNAL as the state drops).
            state.poisoned = true;
            myself.stop(Some("commit failed".into()));
            return reply.send(Err(internal(e)));
        }
        state.core.apply(&plan);
        state.pending.push_back(Pending {
            seq,
            fanout: Some((frame, plan.recipients, caller.session)),
            reply: Some((reply, Reply::Appended { seq, duplicate: false })),
        });
    }

    fn durable(&self, myself: &ActorRef<ConvMsg>, state: &mut ConvState, seq: Seq, ok: bool) {
        if !ok {
            // The write may or may not survive; nothing after the last good commit is
            // acknowledged. Clients retry with the same ids; a fresh actor reloads.
            state.poisoned = true;
            for p in state.pending.drain(..) {
                if let Some((reply, _)) = p.reply {
                    reply.fail(ErrorCode::INTERNAL, "storage failure; retry");
                }
            }
            // The next request finds this actor gone and starts a successor from the store.
            myself.stop(Some("commit failed".into()));
            return;
        }
        state.durable_seq = state.durable_seq.max(seq);
        while state.pending.front().is_some_and(|p| p.seq <= state.durable_seq) {
            let Some(p) = state.pending.pop_front() else { break };
            if let Some((frame, recipients, skip)) = p.fanout {
                self.shared.online.deliver(&recipients, &frame, skip);
                state.published.fetch_max(p.seq, Ordering::AcqRel);
            }
            if let Some((reply, ack)) = p.reply {
                reply.send(Ok(ack));
            }
        }
    }

    fn history(&self, state: &ConvState, caller: Caller, page: Page, limit: u16, reply: Responder) {
        if let Err(e) = state.core.role(caller.user) {
            return reply.send(Err(e));
        }
        let store = self.shared.store.clone();
        let (id, last) = (state.core.id, state.durable_seq);
        let limit = usize::from(limit).clamp(1, HISTORY_PAGE_MAX as usize);
        tokio::task::spawn_blocking(move || {
            let entries = match page {
                Page::Latest => store.entries(id, 1, last, limit, true).map(reversed),
                Page::Before(s) => store.entries(id, 1, s.saturating_sub(1).min(last), limit, true).map(reversed),
                Page::After(s) => store.entries(id, s.saturating_add(1), last, limit, false),
            };
            reply.send(entries.map(|entries| Reply::History { entries, last_seq: last }).map_err(internal));
        });
    }

    fn members(&self, state: &ConvState, caller: Caller, reply: Responder) {
        if let Err(e) = state.core.role(caller.user) {
            return reply.send(Err(e));
        }
        let store = self.shared.store.clone();
        let members: Vec<(UserId, Role)> = state.core.members.iter().map(|(u, r)| (*u, *r)).collect();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(members.len());
            for (user_id, role) in members {
                match store.user(user_id) {
                    Ok(Some(u)) => out.push(Member { user_id, name: u.name, role }),
                    Ok(None) => {}
                    Err(e) => return reply.send(Err(internal(e))),
                }
            }
            out.sort_by_key(|m| m.user_id);
            reply.send(Ok(Reply::Members(out)));
        });
    }
}

/// Who hears of a stored entry: today's members, plus a user the entry removed.
fn recipients_of(entry: &Entry, members: &HashMap<UserId, Role>) -> Vec<UserId> {
    let mut users: Vec<UserId> = members.keys().copied().collect();
    match &entry.body {
        Body::MemberRemoved { user } => users.push(*user),
        Body::MemberLeft => users.push(entry.sender),
        _ => {}
    }
    users.sort_unstable();
    users.dedup();
    users
}

fn reversed(mut v: Vec<Entry>) -> Vec<Entry> {
    v.reverse();
    v
}

/// Maps conversation ids to live actors, spawning on demand. The per-actor `depth`
/// counts messages sent but not yet handled: it bounds the mailbox, and an idle actor
/// retires only when it is zero under the map lock, so no request is ever cast into a
/// stopping actor. An actor that died (crash, failed commit) stays in the map until the
/// next request replaces it with a successor that resumes its fan-out.
pub struct ConvDirectory {
    map: std::sync::Mutex<HashMap<ConvId, Slot>>,
    /// Serialises starting an actor per conversation (sharded: a start waits for a
    /// store barrier, and must not hold up unrelated conversations).
    spawn_locks: Vec<tokio::sync::Mutex<()>>,
}

const SPAWN_SHARDS: usize = 64;

impl Default for ConvDirectory {
    fn default() -> Self {
        ConvDirectory {
            map: std::sync::Mutex::new(HashMap::new()),
            spawn_locks: (0..SPAWN_SHARDS).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }
}

#[derive(Clone)]
struct Slot {
    actor: ActorRef<ConvMsg>,
    depth: Arc<AtomicUsize>,
    published: Arc<AtomicU64>,
}

impl ConvDirectory {
    /// Delivers a request to the conversation's actor, starting it if needed. Answers
    /// `NOT_FOUND` for no such conversation, `FORBIDDEN` to a non-member when no actor
    /// is running (strangers never start actors), `OVERLOADED` for a full mailbox.
    pub async fn request(
        &self,
        shared: &Arc<Shared>,
        conv: ConvId,
        caller: Caller,
        req: ConvRequest,
        reply: Responder,
    ) {
        let mut msg = ConvMsg::Request(caller, req, reply);
        let mut dead = None;
        for _ in 0..3 {
            let slot = {
                let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
                map.get(&conv).cloned().map(|slot| {
                    let over = slot.depth.fetch_add(1, Ordering::AcqRel) >= crate::limits::CONVERSATION_MAILBOX_MAX;
                    (slot, over)
                })
            };
            match slot {
                Some((slot, true)) => {
                    slot.depth.fetch_sub(1, Ordering::AcqRel);
                    if let ConvMsg::Request(_, _, reply) = msg {
                        reply.fail(ErrorCode::OVERLOADED, "conversation is overloaded; retry");
                    }
                    return;
                }
                Some((slot, false)) => match slot.actor.cast(msg) {
                    Ok(()) => return,
                    Err(ractor::MessagingErr::SendErr(back)) => {
                        // The actor died: replace it below.
                        slot.depth.fetch_sub(1, Ordering::AcqRel);
                        dead = Some(slot.actor.get_id());
                        msg = back;
                    }
                    Err(_) => return,
                },
                None => {}
            }
            // Boxed: starting an actor is rare, and its future inline would be carried by
            // every session's task for its whole life (about 3 KB per connection).
            if let Err(e) = Box::pin(self.spawn(shared, conv, caller.user, dead.take())).await {
                if let ConvMsg::Request(_, _, reply) = msg {
                    reply.send(Err(e));
                }
                return;
            }
        }
        if let ConvMsg::Request(_, _, reply) = msg {
            reply.fail(ErrorCode::INTERNAL, "conversation unavailable");
        }
    }

    /// Starts an actor for `conv` unless a live one is registered; `dead` names an actor
    /// found dead, whose fan-out watermark the successor resumes from.
    async fn spawn(
        &self,
        shared: &Arc<Shared>,
        conv: ConvId,
        user: UserId,
        dead: Option<ractor::ActorId>,
    ) -> Result<(), ErrorBody> {
        let _guard = self.spawn_locks[(conv as usize) % SPAWN_SHARDS].lock().await;
        let resume_after = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&conv) {
                Some(slot) if Some(slot.actor.get_id()) == dead => {
                    let published = slot.published.load(Ordering::Acquire);
                    map.remove(&conv);
                    Some(published)
                }
                // Someone else already started one.
                Some(_) => return Ok(()),
                None if map.len() >= crate::limits::MAX_LIVE_CONVERSATIONS => {
                    return Err(err(ErrorCode::OVERLOADED, "too many active conversations; retry later"));
                }
                None => None,
            }
        };
        let store = &shared.store;
        match store.conversation(conv) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(err(ErrorCode::NOT_FOUND, "no such conversation")),
            Err(e) => return Err(internal(e)),
        }
        // An actor that died (a failed write, a panic) may have left its newest entry's
        // writes short: finish them before the successor loads anything. A crash of the
        // whole broker is covered by `Store::repair_all` at start, and an actor that
        // retired idle had finished its writes, so nothing else needs this.
        if resume_after.is_some() {
            store.repair_newest_entry(conv).map_err(internal)?;
        } else if store.member(conv, user).map_err(internal)?.is_none() {
            return Err(err(ErrorCode::FORBIDDEN, "not a member of this conversation"));
        }
        let depth = Arc::new(AtomicUsize::new(0));
        let published = Arc::new(AtomicU64::new(0));
        let args = ConvArgs { id: conv, depth: depth.clone(), published: published.clone(), resume_after };
        let (actor, _) = Actor::spawn(None, Conversation { shared: shared.clone() }, args).await.map_err(internal)?;
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(conv, Slot { actor, depth, published });
        Ok(())
    }

    /// Removes the actor if it is still the registered one and nothing is queued for it.
    fn retire(&self, conv: ConvId, actor: ractor::ActorId) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&conv) {
            Some(slot) if slot.actor.get_id() == actor && slot.depth.load(Ordering::Acquire) == 0 => {
                map.remove(&conv);
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

    /// The newest seq of `conv` that online devices have been sent, if its actor is
    /// registered (never ahead of what is durable).
    pub fn published(&self, conv: ConvId) -> Option<Seq> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&conv).map(|s| s.published.load(Ordering::Acquire))
    }

    /// Number of live conversation actors.
    pub fn live(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stops every actor (shutdown).
    pub fn stop_all(&self) {
        for (_, slot) in self.map.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            slot.actor.stop(Some("shutdown".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(kind: ConversationKind, members: &[(UserId, Role)]) -> ConvCore {
        ConvCore::new(7, kind, members.iter().copied().collect(), 3)
    }

    fn caller(user: UserId) -> Caller {
        Caller { user, device: 1, session: 1 }
    }

    fn text_entry(seq: Seq, sender: UserId) -> Entry {
        Entry {
            conv: 7,
            seq,
            sender,
            sender_device: 1,
            client_id: [0; 16],
            at_ms: 0,
            body: Body::Text { text: "hi".into(), edited: false },
        }
    }

    fn send(text: &str) -> Command {
        Command::Send { client_id: [1; 16], text: text.into() }
    }

    #[test]
    fn permission_table() {
        let group = core(ConversationKind::Group, &[(1, Role::Owner), (2, Role::Admin), (3, Role::Member)]);
        let check = |who: UserId, cmd: Command, target: Option<Entry>, want: Result<Seq, ErrorCode>| {
            let got = group.plan(caller(who), cmd.clone(), target, 0).map(|p| p.entry.seq).map_err(|e| e.code);
            assert_eq!(got, want, "{who} {cmd:?}");
        };
        check(3, send("hello"), None, Ok(4));
        check(9, send("hello"), None, Err(ErrorCode::FORBIDDEN));
        check(3, send(""), None, Err(ErrorCode::INVALID));
        check(3, send(&"x".repeat(MAX_TEXT_BYTES as usize + 1)), None, Err(ErrorCode::INVALID));
        check(3, Command::Add { users: vec![4], role: Role::Member }, None, Err(ErrorCode::FORBIDDEN));
        check(2, Command::Add { users: vec![4], role: Role::Member }, None, Ok(4));
        check(2, Command::Add { users: vec![3], role: Role::Member }, None, Err(ErrorCode::CONFLICT));
        check(1, Command::Add { users: vec![4], role: Role::Owner }, None, Err(ErrorCode::INVALID));
        check(2, Command::Remove { user: 3 }, None, Ok(4));
        check(2, Command::Remove { user: 1 }, None, Err(ErrorCode::FORBIDDEN));
        check(3, Command::Remove { user: 2 }, None, Err(ErrorCode::FORBIDDEN));
        check(1, Command::Remove { user: 9 }, None, Err(ErrorCode::NOT_FOUND));
        check(1, Command::Leave, None, Err(ErrorCode::FORBIDDEN));
        check(3, Command::Leave, None, Ok(4));
        let edit = |target| Command::Edit { client_id: [2; 16], target, text: "new".into() };
        check(3, edit(2), Some(text_entry(2, 3)), Ok(4));
        check(2, edit(2), Some(text_entry(2, 3)), Err(ErrorCode::FORBIDDEN));
        check(3, edit(2), None, Err(ErrorCode::NOT_FOUND));
        let mut dead = text_entry(2, 3);
        dead.body = Body::Tombstone;
        check(3, Command::Delete { client_id: [3; 16], target: 2 }, Some(dead), Err(ErrorCode::NOT_FOUND));

        let direct = core(ConversationKind::Direct, &[(1, Role::Member), (2, Role::Member)]);
        assert_eq!(direct.plan(caller(1), Command::Leave, None, 0).map_err(|e| e.code).err(), Some(ErrorCode::INVALID));
        assert_eq!(
            direct
                .plan(caller(1), Command::Add { users: vec![3], role: Role::Member }, None, 0)
                .map_err(|e| e.code)
                .err(),
            Some(ErrorCode::INVALID)
        );
    }

    #[test]
    fn membership_changes_reach_old_and_new_members() {
        let mut group = core(ConversationKind::Group, &[(1, Role::Owner), (2, Role::Member)]);
        let plan = group.plan(caller(1), Command::Add { users: vec![3, 3, 4], role: Role::Member }, None, 0).unwrap();
        let mut r = plan.recipients.to_vec();
        r.sort();
        assert_eq!(r, vec![1, 2, 3, 4]);
        group.apply(&plan);
        assert_eq!(group.last_seq, 4);
        let plan = group.plan(caller(1), Command::Remove { user: 2 }, None, 0).unwrap();
        assert!(plan.recipients.contains(&2), "the removed member hears of it");
        group.apply(&plan);
        assert!(!group.members.contains_key(&2));
        assert_eq!(group.plan(caller(2), send("hi"), None, 0).map_err(|e| e.code).err(), Some(ErrorCode::FORBIDDEN));
    }

    #[test]
    fn edit_checks_its_target() {
        let group = core(ConversationKind::Group, &[(1, Role::Owner)]);
        let plan = group
            .plan(
                caller(1),
                Command::Edit { client_id: [5; 16], target: 2, text: "v2".into() },
                Some(text_entry(2, 1)),
                0,
            )
            .unwrap();
        assert_eq!(plan.entry.body, Body::Edit { target: 2, text: "v2".into() });
        let refused = |target: Option<Entry>| {
            let edit = Command::Edit { client_id: [6; 16], target: 2, text: "v3".into() };
            group.plan(caller(1), edit, target, 0).err().map(|e| e.code)
        };
        assert_eq!(refused(None), Some(ErrorCode::NOT_FOUND));
        let mut deleted = text_entry(2, 1);
        deleted.body = Body::Tombstone;
        assert_eq!(refused(Some(deleted)), Some(ErrorCode::NOT_FOUND));
        assert_eq!(refused(Some(text_entry(2, 9))), Some(ErrorCode::FORBIDDEN), "only the sender edits");
    }
}
