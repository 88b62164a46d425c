//! Typing indicators: per (conversation, user), in memory only, never stored, never
//! passing through a conversation actor.
//!
//! `TypingState` holds the rules with no I/O: a start makes an indicator (pushed), a
//! repeat only extends it (not pushed), a stop ends it (pushed), so only changes fan
//! out. An indicator stands while any of its user's sessions (devices) is typing: each
//! session's start, repeat, stop and `ttl_ms` are its own, and the indicator ends, with
//! a pushed "stopped", when the last of them stops, expires or ends (before, a stop or
//! the end of one device ended it while another was still typing, and that device's next
//! repeat started it again: the receivers saw it flicker). The user's next message in
//! the conversation, from any device, clears it without a push (receivers clear it on
//! the message itself, and no "stopped" can follow later); leaving or being removed from
//! the conversation stops it with a push. State is bounded per user
//! (`TYPING_PER_USER_MAX`, one while the table is half full or more), per indicator
//! (`TYPING_SESSIONS_PER_INDICATOR`) and in total (`TYPING_ENTRIES_MAX`): a start
//! beyond the first or the last is dropped.
//!
//! The rate limit is one token bucket per user (`user::Allowances`), shared by all of
//! the user's sessions, so more devices do not mean more signals.
//!
//! `Typing` drives them: a signal beyond its user's allowance is dropped, membership is
//! read from the store's member keys, and a change goes, from the blocking pool, to the
//! other members' online devices as a QUIC datagram where the device enabled them, else
//! on its control stream. The sender's own devices are not told (they know). A device
//! that connects is told the indicators standing in its conversations
//! (`Typing::session_started`), so one connecting mid-typing does not wait for the
//! typist's next change.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use switchboard_protocol::limits::MAX_DATAGRAM_BYTES;
use switchboard_protocol::{
    Body, ClientFrame, ConvId, Entry, Event, FrameDecoder, Role, ServerFrame, Signal, UserId, decode, encode_frame,
};
use switchboard_storage::Store;
use tokio::sync::Notify;

use crate::fanout::Online;
use crate::limits::{
    PRESENCE_CONVERSATIONS_SCANNED, PerUser, TYPING_ALLOWANCES_MAX, TYPING_ENTRIES_MAX, TYPING_PER_USER_MAX,
    TYPING_SESSIONS_PER_INDICATOR, TYPING_SIGNAL_BURST, TYPING_SIGNALS_PER_S, TYPING_SNAPSHOT_EXAMINED,
    TYPING_SNAPSHOT_MAX, TYPING_SNAPSHOT_MEMBER_READS, TYPING_SNAPSHOTS_PER_DRAIN, TYPING_SNAPSHOTS_WAITING_MAX,
};
use crate::outbound::Outbound;
use crate::pauses::{Pauses, Point};
use crate::presence::{Timed, spawn_timer};
use crate::user::Allowances;

/// A typing change to push to the conversation's other members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypingChange {
    /// Conversation.
    pub conv: ConvId,
    /// Who.
    pub user: UserId,
    /// Started (`true`) or stopped.
    pub typing: bool,
}

/// Every live typing indicator. Times are ms on any clock the caller chooses that does
/// not step back (the driver's is monotonic, `Typing::clock_ms`).
#[derive(Debug)]
pub struct TypingState {
    ttl_ms: u64,
    per_user_max: usize,
    total_max: usize,
    entries: HashMap<(ConvId, UserId), Typer>,
    /// Conversations each user is typing in (at most `per_user_max`).
    by_user: HashMap<UserId, Vec<ConvId>>,
    /// Who is typing in each conversation with an indicator standing (what a device
    /// that connects is told, `Typing::session_started`).
    by_conv: HashMap<ConvId, Vec<UserId>>,
    /// `(expiry, conv, user)`, one per entry.
    timers: BTreeSet<(u64, ConvId, UserId)>,
}

#[derive(Clone, Debug)]
struct Typer {
    /// When the indicator ends: the latest of `sessions`' ends (the key in `timers`).
    until_ms: u64,
    /// `(session, until_ms)`: each of the user's sessions typing here and when its typing
    /// ends; at most `TYPING_SESSIONS_PER_INDICATOR`, never empty.
    sessions: Vec<(u64, u64)>,
}

impl Typer {
    /// Drops `session` and any session whose typing ended by `now_ms`; returns whether
    /// any is left typing.
    fn drop_session(&mut self, session: u64, now_ms: u64) -> bool {
        self.sessions.retain(|&(s, until)| s != session && until > now_ms);
        self.until_ms = self.sessions.iter().map(|&(_, until)| until).max().unwrap_or(0);
        !self.sessions.is_empty()
    }
}

impl TypingState {
    /// No one typing; indicators last `ttl_ms` without a repeat.
    pub fn new(ttl_ms: u64) -> Self {
        Self::with_bounds(ttl_ms, TYPING_PER_USER_MAX, TYPING_ENTRIES_MAX)
    }

    /// Like `new` with explicit bounds (tests).
    pub fn with_bounds(ttl_ms: u64, per_user_max: usize, total_max: usize) -> Self {
        TypingState {
            ttl_ms,
            per_user_max,
            total_max,
            entries: HashMap::new(),
            by_user: HashMap::new(),
            by_conv: HashMap::new(),
            timers: BTreeSet::new(),
        }
    }

    /// A member's signal from session `session` (the caller checked membership). Returns
    /// the change to push: a start when not typing, a stop when this session was the last
    /// typing; a repeat, or a start from another session, only extends the time.
    pub fn handle_signal(
        &mut self,
        conv: ConvId,
        user: UserId,
        session: u64,
        typing: bool,
        now_ms: u64,
    ) -> Option<TypingChange> {
        let until_ms = now_ms.saturating_add(self.ttl_ms);
        if !typing {
            return self.drop_session(conv, user, session, now_ms);
        }
        if let Some(typer) = self.entries.get_mut(&(conv, user)) {
            self.timers.remove(&(typer.until_ms, conv, user));
            if let Some(own) = typer.sessions.iter_mut().find(|(s, _)| *s == session) {
                own.1 = until_ms;
            } else if typer.sessions.len() < TYPING_SESSIONS_PER_INDICATOR {
                typer.sessions.push((session, until_ms));
            } else if let Some(soonest) = typer.sessions.iter_mut().min_by_key(|(_, until)| *until) {
                *soonest = (session, until_ms);
            }
            typer.until_ms = typer.until_ms.max(until_ms);
            self.timers.insert((typer.until_ms, conv, user));
            return None;
        }
        // Half full or more, a user takes one indicator at most: before, 4,096 accounts
        // typing in 16 conversations each filled the table, and nobody else's typing was
        // shown until theirs expired; now that takes about 34,800 (2,048 at 16, the rest
        // at one), while a user typing in one conversation, as people do, never notices.
        let convs = self.by_user.get(&user).map_or(0, |c| c.len());
        let per_user = if self.entries.len() >= self.total_max / 2 { 1 } else { self.per_user_max };
        if convs >= per_user || self.entries.len() >= self.total_max {
            return None;
        }
        self.entries.insert((conv, user), Typer { until_ms, sessions: vec![(session, until_ms)] });
        self.by_user.entry(user).or_default().push(conv);
        self.by_conv.entry(conv).or_default().push(user);
        self.timers.insert((until_ms, conv, user));
        Some(TypingChange { conv, user, typing: true })
    }

    /// `user`'s message in `conv` was delivered: the indicator ends with no push.
    /// Returns whether there was one.
    pub fn handle_message(&mut self, conv: ConvId, user: UserId) -> bool {
        self.remove(conv, user)
    }

    /// `user` left or was removed from `conv`: the indicator ends, pushed.
    pub fn handle_gone(&mut self, conv: ConvId, user: UserId) -> Option<TypingChange> {
        self.remove(conv, user).then_some(TypingChange { conv, user, typing: false })
    }

    /// Session `session` of `user` ended at `now_ms`: its typing ends everywhere; the
    /// indicators no other session of the user is typing in end, pushed.
    pub fn handle_session_end(&mut self, user: UserId, session: u64, now_ms: u64) -> Vec<TypingChange> {
        let convs = self.by_user.get(&user).cloned().unwrap_or_default();
        convs.into_iter().filter_map(|conv| self.drop_session(conv, user, session, now_ms)).collect()
    }

    /// Ends every indicator not repeated in time; each is pushed as stopped.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Vec<TypingChange> {
        let mut out = Vec::new();
        while let Some(&(at, conv, user)) = self.timers.first() {
            if at > now_ms {
                break;
            }
            self.timers.pop_first();
            if self.entries.get(&(conv, user)).is_some_and(|t| t.until_ms == at) && self.remove(conv, user) {
                out.push(TypingChange { conv, user, typing: false });
            }
        }
        out
    }

    /// When the next indicator expires, if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.timers.first().map(|&(at, _, _)| at)
    }

    /// The conversations `user` is shown typing in (at most `per_user_max`).
    pub fn typing_in(&self, user: UserId) -> Vec<ConvId> {
        self.by_user.get(&user).cloned().unwrap_or_default()
    }

    /// The conversations with an indicator standing, at most `limit` of them (any).
    pub fn conversations(&self, limit: usize) -> Vec<ConvId> {
        self.by_conv.keys().take(limit).copied().collect()
    }

    /// How many conversations have an indicator standing.
    pub fn conversation_count(&self) -> usize {
        self.by_conv.len()
    }

    /// Who is shown typing in `conv`.
    pub fn typists(&self, conv: ConvId) -> &[UserId] {
        self.by_conv.get(&conv).map_or(&[], |t| &t[..])
    }

    /// Whether `user` is shown typing in `conv`.
    pub fn is_typing(&self, conv: ConvId, user: UserId) -> bool {
        self.entries.contains_key(&(conv, user))
    }

    /// Live indicators.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no one is typing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `session` of `user` stops typing in `conv` at `now_ms`: the indicator ends
    /// (returned, to push) if no other session is still typing there.
    fn drop_session(&mut self, conv: ConvId, user: UserId, session: u64, now_ms: u64) -> Option<TypingChange> {
        let typer = self.entries.get_mut(&(conv, user))?;
        if !typer.sessions.iter().any(|&(s, _)| s == session) {
            return None;
        }
        self.timers.remove(&(typer.until_ms, conv, user));
        if typer.drop_session(session, now_ms) {
            self.timers.insert((typer.until_ms, conv, user));
            return None;
        }
        // Its timer is gone already (`remove` finds none to take).
        self.remove(conv, user).then_some(TypingChange { conv, user, typing: false })
    }

    fn remove(&mut self, conv: ConvId, user: UserId) -> bool {
        let Some(typer) = self.entries.remove(&(conv, user)) else { return false };
        self.timers.remove(&(typer.until_ms, conv, user));
        if let Some(convs) = self.by_user.get_mut(&user) {
            convs.retain(|&c| c != conv);
            if convs.is_empty() {
                self.by_user.remove(&user);
            }
        }
        if let Some(typists) = self.by_conv.get_mut(&conv) {
            typists.retain(|&u| u != user);
            if typists.is_empty() {
                self.by_conv.remove(&conv);
            }
        }
        true
    }
}

/// The typing driver: checks allowances and membership, feeds `TypingState`, and hands
/// its changes to the pusher; runs the expiry timer task and the pusher task.
///
/// A push reads the store (the conversation's member keys, then a block check per
/// online member: thousands of reads for a large group), so no runtime thread makes
/// one: changes wait in `pending`, the newest per (conversation, typist), and one task
/// pushes them from the blocking pool, a drain at a time, so a typist's changes go out
/// in order. A change is queued under the state's lock, so a message that clears an
/// indicator also takes back its start not yet pushed.
pub struct Typing {
    state: Mutex<TypingState>,
    /// Signals per user (`TYPING_SIGNAL_BURST`, then `TYPING_SIGNALS_PER_S`; at most
    /// `TYPING_ALLOWANCES_MAX` users' buckets).
    allowance: Allowances,
    /// Changes not yet pushed: `true` started, `false` stopped. Starts are queued while
    /// it holds fewer than `TYPING_ENTRIES_MAX` keys, stops while fewer than twice that
    /// (one dropped past it leaves its indicator shown until the typist's next change or
    /// the receiver reconnects; stops come only for standing indicators, so this takes a
    /// pusher stalled while more end than can stand at once). Lock
    /// order: `state`, then this, then `in_flight`.
    pending: Mutex<HashMap<(ConvId, UserId), bool>>,
    /// The stops the pusher took from `pending` and has not pushed yet (set under
    /// `pending`'s lock as they are taken): `blocked` sends those too, since the pusher's
    /// audience, if read after the block, leaves the blocked side out.
    in_flight: Mutex<Vec<(ConvId, UserId)>>,
    /// Devices that connected while indicators stood, waiting to be told them
    /// (`session_started`; at most `TYPING_SNAPSHOTS_WAITING_MAX`).
    snapshots: Mutex<Vec<(UserId, Arc<Outbound>)>>,
    store: Arc<Store>,
    online: Arc<Online>,
    /// Wakes the timer task.
    wake: Arc<Notify>,
    /// Wakes the pusher task.
    push_wake: Arc<Notify>,
    /// The indicators' clock (`clock_ms`): monotonic, so a wall clock stepping back
    /// neither holds an indicator past its time (it stood for as long as the step, took
    /// one of its typist's places, and the typist's next start counted as a repeat and
    /// was not pushed) nor ends one early when it steps forward.
    epoch: Instant,
    /// Departures delivered (a member who left or was removed), counted by conversation
    /// (`STAMP_SHARDS` shards) under the state's lock: a start whose audience was read
    /// before one is sent only to an audience read again (`push_changes`), since the
    /// departure's entry may have gone out before it.
    departures: [AtomicU64; STAMP_SHARDS],
    /// Blocks made, counted by each of the two users under the state's lock: likewise
    /// for a start of either (the block's stops, `blocked`, may have gone out before it).
    blocks: [AtomicU64; STAMP_SHARDS],
    /// Blocks being made (the pair, lower id first, and how many of each), from before
    /// the block is stored until `blocked` ran: a stop pushed meanwhile still goes to
    /// the other side (the pusher sees the stored block first, and `blocked` then finds
    /// the indicator ended and its stop gone: the stop was lost for good; a review).
    blocking: Mutex<PerUser<(UserId, UserId)>>,
    /// Where a test may hold the pusher (`Point::TypingDrain`, `Point::TypingAudience`).
    pauses: Arc<Pauses>,
}

/// Shards of the stamps that tell a start to read its audience again (`departures`,
/// `blocks`): churn in one conversation, or one user's blocks, seldom moves another's.
pub(crate) const STAMP_SHARDS: usize = 64;

/// Times a start's audience is read before the start is dropped (`push_start`).
const START_READS: usize = 3;

/// The stamp shard of a conversation or a user id.
pub(crate) fn stamp_shard(id: u64) -> usize {
    (id % STAMP_SHARDS as u64) as usize
}

/// A block being made (`Typing::blocking`), until dropped.
pub struct BlockInProgress {
    typing: Arc<Typing>,
    pair: (UserId, UserId),
}

impl Drop for BlockInProgress {
    fn drop(&mut self) {
        self.typing.blocking.lock().unwrap_or_else(|p| p.into_inner()).give_back(self.pair);
    }
}

impl Drop for Typing {
    fn drop(&mut self) {
        self.wake.notify_one();
        self.push_wake.notify_one();
    }
}

impl Typing {
    /// A driver with indicators lasting `ttl_ms`, its timer and pusher tasks spawned on
    /// the current tokio runtime (they end when the driver is dropped).
    pub fn start(store: Arc<Store>, online: Arc<Online>, ttl_ms: u64, pauses: Arc<Pauses>) -> Arc<Typing> {
        let typing = Arc::new(Typing::new(store, online, ttl_ms, pauses));
        spawn_timer(Arc::downgrade(&typing), typing.wake.clone());
        spawn_pusher(Arc::downgrade(&typing), typing.push_wake.clone());
        typing
    }

    /// The driver without its tasks (tests run `push_pending` by hand).
    fn new(store: Arc<Store>, online: Arc<Online>, ttl_ms: u64, pauses: Arc<Pauses>) -> Typing {
        Typing {
            state: Mutex::new(TypingState::new(ttl_ms)),
            allowance: Allowances::new(TYPING_SIGNALS_PER_S, TYPING_SIGNAL_BURST, TYPING_ALLOWANCES_MAX),
            pending: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(Vec::new()),
            snapshots: Mutex::new(Vec::new()),
            store,
            online,
            wake: Arc::new(Notify::new()),
            push_wake: Arc::new(Notify::new()),
            epoch: Instant::now(),
            departures: std::array::from_fn(|_| AtomicU64::new(0)),
            blocks: std::array::from_fn(|_| AtomicU64::new(0)),
            blocking: Mutex::default(),
            pauses,
        }
    }

    /// Milliseconds on the indicators' monotonic clock (since the driver was made).
    fn clock_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A signal from session `session` of `user`. A signal beyond the user's allowance
    /// (`allowance`, shared by its sessions) or for a conversation the user is not
    /// a member of is dropped: signals have no answer, so nothing is said. One key read
    /// here; the push's reads are the pusher's.
    pub fn signal(&self, user: UserId, session: u64, signal: Signal) {
        if !self.allowance.take(user, Instant::now()) {
            return;
        }
        let Signal::Typing { conv, typing } = signal;
        match self.store.member(conv, user) {
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(conv, error = %e, "membership read failed; typing signal dropped");
                return;
            }
        }
        self.update(|state, now| state.handle_signal(conv, user, session, typing, now));
    }

    /// `a` blocked `b`: neither is told of the other's typing from now on (`audience`),
    /// and each one's indicators standing now are stopped on the other's devices here,
    /// in the conversations the other is a member of, since the stop the typist's next
    /// change brings is filtered like any event between the two (before, the blocker saw
    /// the blocked user typing until it reconnected: a review of this change). So are
    /// the typist's stops waiting for the pusher or taken by it and not pushed yet,
    /// which would be filtered too (before, an indicator that ended just before the
    /// block stayed shown: an attacker review). Reads a member key per conversation
    /// either is typing in (at most 2 × 16) or has a stop waiting in.
    pub fn blocked(&self, a: UserId, b: UserId) {
        for (typist, viewer) in [(a, b), (b, a)] {
            // Under the state's lock: a snapshot's start (`tell_standing`) checked
            // before the block is queued before this stop, and one checked after sees
            // the block; a start the pusher read its audience for before the block is
            // told to an audience read again (`blocks`).
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            self.blocks[stamp_shard(typist)].fetch_add(1, Ordering::SeqCst);
            if self.online.sessions(viewer).is_none() {
                continue;
            }
            let mut convs: BTreeSet<ConvId> = state.typing_in(typist).into_iter().collect();
            {
                let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let waiting = pending.iter().filter(|&(&(_, user), &typing)| user == typist && !typing);
                convs.extend(waiting.map(|(&(conv, _), _)| conv));
                let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                convs.extend(in_flight.iter().filter(|&&(_, user)| user == typist).map(|&(conv, _)| conv));
            }
            for conv in convs {
                if matches!(self.store.member(conv, viewer), Ok(Some(_))) {
                    self.deliver(&[viewer], TypingChange { conv, user: typist, typing: false });
                }
            }
        }
    }

    /// A device of `viewer` connected, its events going to `out`: it is told, as starts on
    /// its control stream, the indicators standing in its user's conversations (before,
    /// a device that connected while someone typed saw nothing until the typist's next
    /// change, which could be its message). Served by the pusher (`tell_standing`); a
    /// no-op while nobody types.
    pub fn session_started(&self, viewer: UserId, out: Arc<Outbound>) {
        if self.state.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return;
        }
        let mut waiting = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.len() < TYPING_SNAPSHOTS_WAITING_MAX {
            waiting.push((viewer, out));
            drop(waiting);
            self.push_wake.notify_one();
        }
    }

    /// Serves the snapshots waiting (`session_started`), at most
    /// `TYPING_SNAPSHOTS_PER_DRAIN` (the pusher is woken again for the rest); returns how
    /// many starts each told. Blocking: reads the store.
    fn serve_snapshots(&self) -> Vec<usize> {
        let taken: Vec<(UserId, Arc<Outbound>)> = {
            let mut waiting = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
            let n = waiting.len().min(TYPING_SNAPSHOTS_PER_DRAIN);
            if waiting.len() > n {
                self.push_wake.notify_one();
            }
            waiting.drain(..n).collect()
        };
        taken.into_iter().map(|(viewer, out)| self.tell_standing(viewer, &out)).collect()
    }

    /// Tells `out`, a device of `viewer`, the indicators standing in `viewer`'s
    /// conversations, except its own user's and those of users either side blocks: at
    /// most `TYPING_SNAPSHOT_MAX` told of at most `TYPING_SNAPSHOT_EXAMINED` looked at;
    /// returns how many. Nothing for a device gone meanwhile. Each start is checked
    /// (membership, blocks, still standing) and queued under the state's lock, as
    /// `push_changes` does, so a stop of it queued later is pushed behind it, a block or
    /// a removal made before is seen (`blocked` sends its stops under the lock too, and
    /// a removal's entry is handed to `entry_delivered`, which takes it, before it is
    /// fanned out), and one that ended is not told. Reads a member key per conversation
    /// with an indicator (at most `TYPING_SNAPSHOT_MEMBER_READS`, else the viewer's
    /// conversations, at most `PRESENCE_CONVERSATIONS_SCANNED`), then three keys per
    /// typist looked at.
    fn tell_standing(&self, viewer: UserId, out: &Outbound) -> usize {
        if out.closed().is_some() {
            return 0;
        }
        let (count, convs) = {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (state.conversation_count(), state.conversations(TYPING_SNAPSHOT_MEMBER_READS))
        };
        let candidates: Vec<ConvId> = if count <= TYPING_SNAPSHOT_MEMBER_READS {
            convs.into_iter().filter(|&conv| matches!(self.store.member(conv, viewer), Ok(Some(_)))).collect()
        } else {
            match self.store.user_conversations(viewer, None, PRESENCE_CONVERSATIONS_SCANNED) {
                Ok(mine) => mine
                    .chunks(256)
                    .flat_map(|part| {
                        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                        part.iter().filter(|&&conv| !state.typists(conv).is_empty()).copied().collect::<Vec<_>>()
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(user = viewer, error = %e, "conversation list read failed; typing snapshot not told");
                    return 0;
                }
            }
        };
        let (mut told, mut examined) = (0, 0);
        for conv in candidates {
            let typists = self.state.lock().unwrap_or_else(|p| p.into_inner()).typists(conv).to_vec();
            for user in typists.into_iter().filter(|&u| u != viewer) {
                if told >= TYPING_SNAPSHOT_MAX || examined >= TYPING_SNAPSHOT_EXAMINED {
                    return told;
                }
                examined += 1;
                let Ok(frame) = encode_frame(&ServerFrame::Event(Event::Typing { conv, user, typing: true })) else {
                    continue;
                };
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let visible = state.is_typing(conv, user)
                    && matches!(self.store.member(conv, viewer), Ok(Some(_)))
                    && matches!(self.store.blocked_between(viewer, user), Ok(false));
                if visible {
                    if out.push(frame).is_err() {
                        // The device is gone (or was closed as a slow consumer).
                        return told;
                    }
                    told += 1;
                }
            }
        }
        told
    }

    /// A session ended: stop what it was typing.
    pub fn session_ended(&self, user: UserId, session: u64) {
        self.update(|state, now| state.handle_session_end(user, session, now));
    }

    /// A conversation entry was delivered: the sender's message ends its indicator (no
    /// push, and a start not yet pushed is not pushed), a leave or removal ends the
    /// leaver's (pushed).
    pub fn entry_delivered(&self, entry: &Entry) {
        let gone = match entry.body {
            Body::Text { .. } | Body::Files { .. } => {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if state.handle_message(entry.conv, entry.sender) {
                    self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&(entry.conv, entry.sender));
                }
                return;
            }
            Body::MemberLeft => entry.sender,
            Body::MemberRemoved { user } => user,
            _ => return,
        };
        self.update(|state, _| {
            // Before the entry goes out: a start whose audience still had them is told to
            // one read again (`push_changes`), or queued before the entry.
            self.departures[stamp_shard(entry.conv)].fetch_add(1, Ordering::SeqCst);
            state.handle_gone(entry.conv, gone)
        });
    }

    /// Pushes the changes waiting (`take_pending`, then `push_changes`); returns them as
    /// pushed. Blocking: reads the store.
    fn push_pending(&self) -> Vec<TypingChange> {
        let taken = self.take_pending();
        self.pauses.pass_blocking(Point::TypingDrain);
        let pushed = self.push_changes(taken);
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).clear();
        pushed
    }

    /// Takes the changes waiting, the stops among them counted in flight until pushed.
    fn take_pending(&self) -> HashMap<(ConvId, UserId), bool> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let taken = std::mem::take(&mut *pending);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        *in_flight = taken.iter().filter(|&(_, &typing)| !typing).map(|(&key, _)| key).collect();
        taken
    }

    /// Pushes `changes`, each to its conversation's other members' online devices,
    /// reading each conversation's members once; returns them as pushed (whether or not
    /// anyone was online). A start is pushed only if its indicator still stands as it
    /// goes (a message delivered since it was queued ended it, and nothing may follow
    /// the message but the next start). A start whose typist is no longer a member
    /// (removed after its signal's check) ends its indicator and goes as a stop, since
    /// an earlier start of it may have been shown.
    fn push_changes(&self, changes: HashMap<(ConvId, UserId), bool>) -> Vec<TypingChange> {
        let mut by_conv: HashMap<ConvId, Vec<(UserId, bool)>> = HashMap::new();
        for ((conv, user), typing) in changes {
            by_conv.entry(conv).or_default().push((user, typing));
        }
        let mut pushed = Vec::new();
        for (conv, changes) in by_conv {
            // Read before the members are.
            let departures = self.departures[stamp_shard(conv)].load(Ordering::SeqCst);
            let members = match self.store.members(conv) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(conv, error = %e, "membership read failed; typing not pushed");
                    continue;
                }
            };
            for (user, typing) in changes {
                let change = TypingChange { conv, user, typing };
                if typing && !members.iter().any(|&(u, _)| u == user) {
                    let ended = self.state.lock().unwrap_or_else(|p| p.into_inner()).handle_gone(conv, user);
                    if let Some(stop) = ended {
                        self.deliver(&self.audience(&members, user, true), stop);
                        pushed.push(stop);
                    }
                    continue;
                }
                if !typing {
                    self.deliver(&self.audience(&members, user, true), change);
                    pushed.push(change);
                } else if self.push_start(conv, user, &members, departures) {
                    pushed.push(change);
                }
            }
        }
        pushed
    }

    /// Pushes `user`'s start in `conv` to the online `members` (read after `departures`
    /// was) who may see it; whether it went. It is checked and sent under the state's
    /// lock: a message delivered after the check is delivered after this start is
    /// queued for each receiver (`entry_delivered` takes the lock first), and clears it;
    /// so is a departure's entry, and a block's stops (`blocked`). A departure or a block
    /// counted since the audience was read (its shard's stamp moved) has it read again,
    /// outside the lock, at most `START_READS` times, then the start is dropped (typing
    /// is best effort; a start is a datagram anyway). Before, a start read for a member
    /// who then left or blocked its typist reached it after its departure or the block's
    /// stops, and stood for good (an attacker review).
    fn push_start(&self, conv: ConvId, user: UserId, members: &[(UserId, Role)], departures: u64) -> bool {
        let (mut members, mut departures) = (std::borrow::Cow::Borrowed(members), departures);
        for read in 1..=START_READS {
            let blocks = self.blocks[stamp_shard(user)].load(Ordering::SeqCst);
            let others = self.audience(&members, user, false);
            if read == 1 {
                self.pauses.pass_blocking(Point::TypingAudience);
            }
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if !state.is_typing(conv, user) {
                return false;
            }
            let unmoved = self.departures[stamp_shard(conv)].load(Ordering::SeqCst) == departures
                && self.blocks[stamp_shard(user)].load(Ordering::SeqCst) == blocks;
            if unmoved {
                self.deliver(&others, TypingChange { conv, user, typing: true });
                return true;
            }
            drop(state);
            departures = self.departures[stamp_shard(conv)].load(Ordering::SeqCst);
            match self.store.members(conv) {
                Ok(now) if now.iter().any(|&(u, _)| u == user) => members = std::borrow::Cow::Owned(now),
                _ => return false,
            }
        }
        false
    }

    /// Marks a block of `b` by `a` (or of `a` by `b`) as being made until the returned
    /// guard is dropped, after `blocked`: stops pushed meanwhile still reach the other
    /// side (`blocking`).
    pub fn blocking(self: &Arc<Self>, a: UserId, b: UserId) -> BlockInProgress {
        let pair = (a.min(b), a.max(b));
        self.blocking.lock().unwrap_or_else(|p| p.into_inner()).take(pair, usize::MAX);
        BlockInProgress { typing: self.clone(), pair }
    }

    /// The online `members` to tell of `user`'s typing: not `user`, not anyone who
    /// blocks `user` or whom `user` blocks (a failed read counts as blocked: typing is
    /// never worth a leak), except, for a `stop`, one whose block with `user` is being
    /// made (`blocking`). Reads a block key per online member.
    fn audience(&self, members: &[(UserId, Role)], user: UserId, stop: bool) -> Vec<UserId> {
        let in_progress = |u: UserId| {
            stop && self.blocking.lock().unwrap_or_else(|p| p.into_inner()).held((u.min(user), u.max(user))) > 0
        };
        // The in-memory look first: block keys are read for online members only.
        members
            .iter()
            .map(|&(u, _)| u)
            .filter(|&u| {
                u != user
                    && self.online.sessions(u).is_some()
                    && (matches!(self.store.blocked_between(u, user), Ok(false)) || in_progress(u))
            })
            .collect()
    }

    /// Sends `change` to `others`' online devices (no store reads): a start as a QUIC
    /// datagram where the device enabled them (a lost one leaves an indicator unshown),
    /// a stop always on the control stream, so that it cannot be lost and no indicator
    /// stays shown (before, a stop was a datagram too, and a lost one left the typist
    /// shown typing until its next change, which could be never).
    fn deliver(&self, others: &[UserId], TypingChange { conv, user, typing }: TypingChange) {
        match encode_frame(&ServerFrame::Event(Event::Typing { conv, user, typing })) {
            Ok(frame) if typing => {
                self.online.deliver_ephemeral(others, &frame);
            }
            Ok(frame) => {
                self.online.deliver(others, &frame, 0);
            }
            Err(e) => tracing::error!(error = %e, "a typing event did not encode"),
        }
    }

    /// Applies `apply` to the state at `clock_ms` and queues the changes it
    /// returns for the pusher, under the state's lock; wakes the timer if the next
    /// expiry moved earlier.
    fn update<C: IntoIterator<Item = TypingChange>>(&self, apply: impl FnOnce(&mut TypingState, u64) -> C) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = state.poll_timeout();
        let mut queued = false;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for TypingChange { conv, user, typing } in apply(&mut state, self.clock_ms()) {
                // Stops have room past the starts' bound: a stop dropped would leave a
                // shown start standing until the typist's next change.
                let room = if typing { TYPING_ENTRIES_MAX } else { 2 * TYPING_ENTRIES_MAX };
                if pending.len() < room || pending.contains_key(&(conv, user)) {
                    pending.insert((conv, user), typing);
                    queued = true;
                }
            }
        }
        let after = state.poll_timeout();
        drop(state);
        if queued {
            self.push_wake.notify_one();
        }
        if after.is_some() && (before.is_none() || after < before) {
            self.wake.notify_one();
        }
    }
}

/// Runs `push_pending` on the blocking pool each time the driver is woken, one drain at
/// a time; ends when the driver is dropped.
fn spawn_pusher(driver: Weak<Typing>, wake: Arc<Notify>) {
    tokio::spawn(async move {
        loop {
            // A notify sent while a drain ran is kept by `Notify` and starts the next.
            wake.notified().await;
            let Some(driver) = driver.upgrade() else { return };
            let drained = move || {
                driver.push_pending();
                driver.serve_snapshots();
            };
            match tokio::task::spawn_blocking(drained).await {
                Ok(_) => {}
                // The changes it held are lost (receivers end them by their timeout);
                // later ones are still pushed.
                Err(e) if e.is_panic() => tracing::error!("a typing push panicked"),
                // The runtime is shutting down.
                Err(_) => return,
            }
        }
    });
}

/// The signal a QUIC datagram carries: exactly one whole `ClientFrame::Signal` frame,
/// length prefix included, at most `MAX_DATAGRAM_BYTES`. `None` for anything else
/// (larger, several frames, a partial one, a request, bytes that do not decode): the
/// caller drops it and keeps the connection, since a datagram is unordered and may be
/// lost, so it can carry nothing a request needs, and ignoring one costs less than
/// closing for it.
pub fn signal_from_datagram(datagram: &[u8]) -> Option<Signal> {
    if datagram.len() > MAX_DATAGRAM_BYTES as usize {
        return None;
    }
    let mut decoder = FrameDecoder::new(MAX_DATAGRAM_BYTES);
    decoder.push(datagram);
    let body = decoder.next_frame().ok()??;
    if decoder.buffered() != 0 {
        return None;
    }
    match decode::<ClientFrame>(&body) {
        Ok(ClientFrame::Signal(signal)) => Some(signal),
        _ => None,
    }
}

impl Timed for Typing {
    fn fire_due(&self) -> Option<Duration> {
        self.update(TypingState::handle_timeout);
        let next = self.state.lock().unwrap_or_else(|p| p.into_inner()).poll_timeout();
        next.map(|at| Duration::from_millis(at.saturating_sub(self.clock_ms())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TTL: u64 = 6_000;

    fn started(conv: ConvId, user: UserId) -> Option<TypingChange> {
        Some(TypingChange { conv, user, typing: true })
    }

    fn stopped(conv: ConvId, user: UserId) -> Option<TypingChange> {
        Some(TypingChange { conv, user, typing: false })
    }

    #[test]
    fn who_types_where_is_indexed_by_conversation() {
        let mut t = TypingState::new(TTL);
        t.handle_signal(1, 10, 100, true, 0);
        t.handle_signal(1, 11, 110, true, 0);
        t.handle_signal(2, 10, 100, true, 0);
        let mut convs = t.conversations(8);
        convs.sort();
        assert_eq!((convs, t.conversation_count()), (vec![1, 2], 2));
        assert_eq!(t.typists(1), [10, 11]);
        // Each way an indicator ends takes it out: a stop, a message, a leave, a session's
        // end, a timeout.
        t.handle_signal(1, 10, 100, false, 1);
        assert_eq!(t.typists(1), [11]);
        t.handle_message(1, 11);
        assert!(t.typists(1).is_empty());
        assert_eq!(t.conversations(8), vec![2], "no conversation without a typist is kept");
        t.handle_signal(3, 12, 120, true, 1);
        t.handle_gone(3, 12);
        t.handle_signal(4, 13, 130, true, 1);
        t.handle_session_end(13, 130, 2);
        assert_eq!(t.conversations(8), vec![2]);
        t.handle_timeout(TTL);
        assert_eq!((t.conversation_count(), t.is_empty()), (0, true));
    }

    #[test]
    fn only_changes_are_pushed() {
        let mut t = TypingState::new(TTL);
        assert_eq!(t.handle_signal(42, 1, 10, true, 0), started(42, 1));
        assert_eq!(t.handle_signal(42, 1, 10, true, 100), None, "a repeat is not pushed");
        assert_eq!(t.handle_signal(42, 1, 11, true, 200), None, "nor from another device");
        assert_eq!(t.handle_signal(42, 2, 20, true, 200), started(42, 2), "per user");
        assert_eq!(t.handle_signal(43, 1, 10, true, 200), started(43, 1), "per conversation");
        assert_eq!(t.handle_signal(42, 1, 10, false, 300), None, "the other device is still typing");
        assert_eq!(t.handle_signal(42, 1, 11, false, 300), stopped(42, 1));
        assert_eq!(t.handle_signal(42, 1, 10, false, 400), None, "stopping when stopped is not pushed");
        assert!(!t.is_typing(42, 1));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn expires_without_refresh_and_a_refresh_extends() {
        let mut t = TypingState::new(TTL);
        t.handle_signal(42, 1, 10, true, 0);
        assert_eq!(t.poll_timeout(), Some(TTL));
        // Refreshed every 3 s for a minute: never expires, never pushed.
        for at in (3_000..60_000).step_by(3_000) {
            assert!(t.handle_timeout(at).is_empty(), "expired at {at} despite refreshes");
            assert_eq!(t.handle_signal(42, 1, 10, true, at), None);
        }
        let last = 57_000;
        assert!(t.handle_timeout(last + TTL - 1).is_empty());
        assert_eq!(t.handle_timeout(last + TTL), vec![TypingChange { conv: 42, user: 1, typing: false }]);
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
        // Once expired, a start is a change again.
        assert_eq!(t.handle_signal(42, 1, 10, true, last + TTL + 1), started(42, 1));
    }

    #[test]
    fn a_message_clears_without_push_and_nothing_follows() {
        let mut t = TypingState::new(TTL);
        t.handle_signal(42, 1, 10, true, 0);
        t.handle_signal(42, 2, 20, true, 0);
        assert!(t.handle_message(42, 1));
        assert!(!t.handle_message(42, 1), "already cleared");
        // No late "stopped" for the user who sent; the other still expires.
        assert_eq!(t.handle_timeout(TTL), vec![TypingChange { conv: 42, user: 2, typing: false }]);
        assert!(t.is_empty());
    }

    #[test]
    fn leaving_and_session_end_stop_with_a_push() {
        let mut t = TypingState::new(TTL);
        t.handle_signal(42, 1, 10, true, 0);
        t.handle_signal(43, 1, 10, true, 0);
        t.handle_signal(44, 1, 11, true, 0);
        assert_eq!(t.handle_gone(42, 1), stopped(42, 1));
        assert_eq!(t.handle_gone(42, 1), None);
        // Session 10 ends: only what it set ends.
        assert_eq!(t.handle_session_end(1, 10, 1), vec![TypingChange { conv: 43, user: 1, typing: false }]);
        assert!(t.is_typing(44, 1));
        assert!(t.handle_session_end(1, 10, 1).is_empty());
    }

    /// A user typing on two devices: the indicator stands until the last of them stops,
    /// expires or ends, and neither device's stop makes the receivers' indicator flicker
    /// (before, device B's stop ended it while A typed, and A's next repeat started it
    /// again).
    #[test]
    fn an_indicator_stands_while_any_of_its_users_devices_is_typing() {
        let mut t = TypingState::new(TTL);
        assert_eq!(t.handle_signal(42, 1, 10, true, 0), started(42, 1));
        assert_eq!(t.handle_signal(42, 1, 11, true, 1_000), None);
        assert_eq!(t.handle_signal(42, 1, 11, false, 2_000), None, "device 10 still types");
        assert_eq!(t.handle_signal(42, 1, 10, true, 3_000), None, "a repeat, not a new start");
        assert_eq!(t.handle_signal(42, 1, 10, false, 4_000), stopped(42, 1), "the last device stopped");

        // A session's end takes only its own part.
        t.handle_signal(42, 1, 10, true, 10_000);
        t.handle_signal(42, 1, 11, true, 10_000);
        assert!(t.handle_session_end(1, 10, 10_500).is_empty());
        assert!(t.is_typing(42, 1));
        assert_eq!(t.handle_session_end(1, 11, 11_000), vec![TypingChange { conv: 42, user: 1, typing: false }]);

        // Each device's typing expires on its own: device 10 went quiet at 20 s, device 11
        // repeats until 25 s; the indicator ends at 25 s + TTL, not before.
        t.handle_signal(42, 1, 10, true, 20_000);
        t.handle_signal(42, 1, 11, true, 25_000);
        assert!(t.handle_timeout(20_000 + TTL).is_empty());
        assert_eq!(t.poll_timeout(), Some(25_000 + TTL));
        assert_eq!(t.handle_timeout(25_000 + TTL), vec![TypingChange { conv: 42, user: 1, typing: false }]);
        // Device 11 stops after device 10's time ran out: nothing is left typing.
        t.handle_signal(42, 1, 10, true, 40_000);
        t.handle_signal(42, 1, 11, true, 43_000);
        assert_eq!(t.handle_signal(42, 1, 11, false, 40_000 + TTL + 1), stopped(42, 1));
        assert_eq!(t.poll_timeout(), None, "no timer left behind");
        // A stop from a device that was not typing ends nothing.
        t.handle_signal(42, 1, 10, true, 50_000);
        assert_eq!(t.handle_signal(42, 1, 12, false, 50_001), None);
        assert!(t.is_typing(42, 1));
        // Any device's message clears it.
        t.handle_signal(42, 1, 11, true, 50_002);
        assert!(t.handle_message(42, 1));
        assert!(t.is_empty());
        assert_eq!(t.poll_timeout(), None);
    }

    /// At most `TYPING_SESSIONS_PER_INDICATOR` sessions per indicator: one more replaces
    /// the one whose typing ends soonest, and the indicator still ends when the rest do.
    #[test]
    fn the_sessions_of_one_indicator_are_bounded() {
        let mut t = TypingState::new(TTL);
        let n = TYPING_SESSIONS_PER_INDICATOR as u64;
        for s in 0..=n {
            t.handle_signal(42, 1, s, true, s * 10);
        }
        let typer = &t.entries[&(42, 1)];
        assert_eq!(typer.sessions.len(), TYPING_SESSIONS_PER_INDICATOR);
        assert!(!typer.sessions.iter().any(|&(s, _)| s == 0), "the soonest to end was replaced");
        // The replaced session's stop ends nothing; the others' stops end it at the last.
        assert_eq!(t.handle_signal(42, 1, 0, false, 200), None);
        for s in 1..n {
            assert_eq!(t.handle_signal(42, 1, s, false, 200), None);
        }
        assert_eq!(t.handle_signal(42, 1, n, false, 200), stopped(42, 1));
        assert!(t.timers.is_empty());
    }

    #[test]
    fn a_datagram_is_one_whole_signal_frame_or_nothing() {
        let typing = Signal::Typing { conv: 42, typing: true };
        let frame = encode_frame(&ClientFrame::Signal(typing.clone())).unwrap();
        // The documented vector `signal_typing`.
        assert_eq!(&frame[..], &[0x04, 0x01, 0x00, 0x2a, 0x01]);
        let check = |bytes: &[u8], want: Option<Signal>| assert_eq!(signal_from_datagram(bytes), want, "{bytes:02x?}");
        check(&frame, Some(typing));
        check(&frame[..4], None);
        check(&frame[1..], None);
        check(&[&frame[..], &frame[..]].concat(), None);
        check(&[], None);
        check(&[0x02, 0xff, 0xff], None);
        let ping = ClientFrame::Request(switchboard_protocol::Request {
            id: 1,
            body: switchboard_protocol::RequestBody::Ping,
        });
        check(&encode_frame(&ping).unwrap(), None);
        // Over the size limit, even if well formed.
        let mut big = vec![0u8; MAX_DATAGRAM_BYTES as usize + 1];
        big[..frame.len()].copy_from_slice(&frame);
        check(&big, None);
    }

    #[test]
    fn the_allowance_is_per_user_whatever_its_sessions() {
        let start = Instant::now();
        let allowance = Allowances::new(2.0, 8.0, 16);
        // The burst, whichever of the user's sessions sends: the driver asks by user only.
        assert!((0..8).all(|_| allowance.take(1, start)));
        assert!(!allowance.take(1, start), "the burst is spent");
        assert!(allowance.take(2, start), "another user has its own");
        assert!(!allowance.take(1, start + Duration::from_millis(499)));
        assert!(allowance.take(1, start + Duration::from_millis(500)), "2 a second after the burst");
        assert!(!allowance.take(1, start + Duration::from_millis(500)));
        assert_eq!(allowance.len(), 2);
    }

    #[test]
    fn allowances_are_bounded_and_refilled_ones_make_room() {
        let start = Instant::now();
        let allowance = Allowances::new(2.0, 8.0, 2);
        assert!(allowance.take(1, start));
        assert!(allowance.take(2, start));
        assert!(!allowance.take(3, start), "at the cap, with no bucket refilled");
        assert!(allowance.take(1, start), "users with a bucket go on");
        // Refilled after 4 s at 2 a second: the same as no bucket, so dropped for room.
        let later = start + Duration::from_secs(5);
        assert!(allowance.take(3, later));
        assert!(allowance.len() <= 2);
        assert!(allowance.take(4, later));
        assert!(!allowance.take(5, later + Duration::from_millis(100)), "still at the cap with nothing refilled");
        assert_eq!(allowance.len(), 2);
    }

    /// Bounded per user, in total, and per user at one once the table is half full: a
    /// crowd of accounts typing in many conversations each cannot take the whole table
    /// (before, user 2 took a second here, and the table filled with fewer users).
    #[test]
    fn bounded_per_user_and_in_total() {
        let mut t = TypingState::with_bounds(TTL, 2, 6);
        assert!(t.handle_signal(1, 1, 10, true, 0).is_some());
        assert!(t.handle_signal(2, 1, 10, true, 0).is_some());
        assert_eq!(t.handle_signal(3, 1, 10, true, 0), None, "per-user bound");
        assert_eq!(t.handle_signal(1, 1, 10, true, 0), None, "a repeat still extends");
        assert!(t.handle_signal(1, 2, 20, true, 0).is_some());
        assert_eq!(t.len(), 3, "half full");
        assert_eq!(t.handle_signal(2, 2, 20, true, 0), None, "one per user from half full on");
        for user in 3..=5 {
            assert!(t.handle_signal(1, user, user * 10, true, 0).is_some(), "user {user}'s first");
        }
        assert_eq!(t.handle_signal(1, 6, 60, true, 0), None, "total bound");
        assert_eq!(t.len(), 6);
        // Room again once one ends.
        t.handle_signal(1, 1, 10, false, 1);
        assert!(t.handle_signal(1, 6, 60, true, 1).is_some());
    }

    /// The pusher against the store as it is when it pushes: a start whose typist was
    /// removed after its signal's membership check (and whose removal, delivered before
    /// the indicator was made, found none to stop) goes as a stop and its indicator ends
    /// (before: shown until its expiry, 6 s); so does one whose earlier start was shown;
    /// a start that a message ended while it waited, or while its drain ran, is not
    /// pushed (nothing may follow the message).
    #[tokio::test]
    async fn the_pusher_sends_what_stands_when_it_pushes() {
        use switchboard_protocol::{ConversationKind, Role};
        use switchboard_storage::ConversationRecord;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let entry = |conv, seq, sender, body| Entry {
            conv,
            seq,
            sender,
            sender_device: 1,
            client_id: [seq as u8; 16],
            at_ms: 0,
            body,
        };
        let text = || Body::Text { text: "hi".into(), edited: false };
        let record = ConversationRecord { kind: ConversationKind::Group, title: "g".into(), created_ms: 0 };
        let members = [(1, Role::Owner), (2, Role::Member), (3, Role::Member), (4, Role::Member)];
        let (conv, _, durable) =
            store.create_conversation(&record, &members, None, |c| entry(c, 1, 1, text())).unwrap();
        durable.await.unwrap();
        let remove = |seq, user| {
            let (tx, rx) = std::sync::mpsc::channel();
            store.append_then(&entry(conv, seq, 1, Body::MemberRemoved { user }), move |r| drop(tx.send(r))).unwrap();
            rx.recv().unwrap().unwrap();
        };
        let typing = Typing::new(store.clone(), Arc::new(Online::default()), TTL, Arc::default());
        let is_typing = |user| typing.state.lock().unwrap().is_typing(conv, user);
        let start = |user| typing.signal(user, user * 10, Signal::Typing { conv, typing: true });
        let change = |user, typing| TypingChange { conv, user, typing };

        // User 4's start is shown; it stops and starts again, so only the start waits.
        start(4);
        assert_eq!(typing.push_pending(), vec![change(4, true)]);
        typing.signal(4, 40, Signal::Typing { conv, typing: false });
        start(4);
        start(2);
        start(3);
        assert!(is_typing(2) && is_typing(3) && is_typing(4), "the members' signals passed the check");
        // Users 2 and 4 are removed before the pusher runs (their removals' deliveries
        // are not run here: as if they came before the indicators were made).
        remove(2, 2);
        remove(3, 4);
        let mut pushed = typing.push_pending();
        pushed.sort_by_key(|c| c.user);
        assert_eq!(pushed, vec![change(2, false), change(3, true), change(4, false)]);
        assert!(!is_typing(2) && !is_typing(4), "the removed typists' indicators end");
        assert!(is_typing(3), "a member's is kept");

        // A message takes back its sender's start still waiting...
        let message = entry(conv, 4, 3, text());
        typing.entry_delivered(&message);
        start(3);
        typing.entry_delivered(&message);
        assert!(typing.push_pending().is_empty(), "a start taken back");
        // ...and one its drain had already taken is not pushed either.
        start(3);
        let taken = typing.take_pending();
        typing.entry_delivered(&message);
        assert!(typing.push_changes(taken).is_empty(), "a start the message ended while its drain ran");
        assert!(!is_typing(3));
    }

    /// A device that connects is told the indicators standing in its conversations, not
    /// its own user's, not those of a user either side blocks, none in conversations it
    /// is not in; the same whether few conversations have one (a member key read for
    /// each) or many (the viewer's own conversations read instead).
    #[tokio::test]
    async fn a_device_that_connects_is_told_who_is_typing_in_its_conversations() {
        use switchboard_protocol::{ConversationKind, FrameDecoder};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let create =
            |members: &[(UserId, Role)]| crate::test_conversation(&store, ConversationKind::Group, members, None);
        let team = create(&[(1, Role::Owner), (2, Role::Member), (3, Role::Member)]);
        let pair = create(&[(1, Role::Owner), (4, Role::Member)]);
        let others = create(&[(5, Role::Owner), (6, Role::Member)]);
        store.set_block(2, 3, true, 16).unwrap();
        let typing = Typing::new(store.clone(), Arc::new(Online::default()), TTL, Arc::default());
        for (conv, user) in [(team, 1), (team, 2), (team, 3), (pair, 4), (others, 6)] {
            typing.signal(user, user * 10, Signal::Typing { conv, typing: true });
        }
        let told = |viewer: UserId| {
            let out = Arc::new(Outbound::new(128, 1 << 20));
            typing.session_started(viewer, out.clone());
            typing.serve_snapshots();
            out.close(switchboard_protocol::ErrorCode::NO_ERROR);
            async move {
                let mut frames = Vec::new();
                out.drain(&mut frames).await;
                let mut decoder = FrameDecoder::new(1 << 20);
                frames.iter().for_each(|f| decoder.push(f));
                let mut starts = Vec::new();
                while let Some(body) = decoder.next_frame().unwrap() {
                    match decode::<ServerFrame>(&body).unwrap() {
                        ServerFrame::Event(Event::Typing { conv, user, typing: true }) => starts.push((conv, user)),
                        other => panic!("only starts are told: {other:?}"),
                    }
                }
                starts.sort();
                starts
            }
        };
        assert_eq!(told(1).await, vec![(team, 2), (team, 3), (pair, 4)], "not its own, both its conversations");
        assert_eq!(told(2).await, vec![(team, 1)], "not the user it blocks");
        assert_eq!(told(3).await, vec![(team, 1)], "not the user who blocks it");
        // A device gone before its snapshot is served costs nothing.
        let gone = Arc::new(Outbound::new(128, 1 << 20));
        gone.close(switchboard_protocol::ErrorCode::DEVICE_REVOKED);
        typing.session_started(1, gone);
        assert_eq!(typing.serve_snapshots(), vec![0]);
        assert_eq!(told(7).await, vec![], "a stranger is told nothing");
        // Many conversations with a typist: the viewer's own conversations are read.
        {
            let mut state = typing.state.lock().unwrap();
            for i in 0..TYPING_SNAPSHOT_MEMBER_READS as u64 {
                state.handle_signal(1_000 + i, 1_000 + i, 1, true, typing.clock_ms());
            }
            assert!(state.conversation_count() > TYPING_SNAPSHOT_MEMBER_READS);
        }
        assert_eq!(told(1).await, vec![(team, 2), (team, 3), (pair, 4)]);
        // An indicator that ended is not told.
        typing.signal(3, 30, Signal::Typing { conv: team, typing: false });
        assert_eq!(told(1).await, vec![(team, 2), (pair, 4)]);
        // A crowd typing in one group: at most `TYPING_SNAPSHOT_MAX` told.
        let crowd: Vec<(UserId, Role)> = (100..200).map(|u| (u, Role::Member)).chain([(1, Role::Owner)]).collect();
        let big = create(&crowd);
        for user in 100..200 {
            typing.signal(user, user, Signal::Typing { conv: big, typing: true });
        }
        assert_eq!(told(1).await.len(), TYPING_SNAPSHOT_MAX);
        // Snapshots are served a drain's worth at a time.
        for _ in 0..TYPING_SNAPSHOTS_PER_DRAIN + 3 {
            typing.session_started(7, Arc::new(Outbound::new(128, 1 << 20)));
        }
        assert_eq!(typing.serve_snapshots().len(), TYPING_SNAPSHOTS_PER_DRAIN);
        assert_eq!(typing.serve_snapshots().len(), 3);
    }
}
