//! Presence: each user's state aggregated over its connected devices, pushed to the
//! online users who share a conversation with it (its *contacts*), coalesced per user.
//!
//! `PresenceState` holds every rule and no I/O: sessions attach, detach and say they are
//! away (`handle_*`), and `handle_timeout` says which changes to push now. Every push
//! goes through a timer, so at most one push per user per `coalesce_ms` leaves it
//! however often a device flaps; the latest state wins, and a change that was held back
//! is pushed when its window ends (a trailing push), unless the user is back where the
//! last push left it. `Presence` drives it: one timer task performs the pushes, keeps a
//! contact set per user with a presence entry (read from the store's indexes, then kept
//! up to date from the membership entries and blocks delivered: `ContactCache`; dropped
//! when the user goes offline), and stores each pushed change's last-seen time, and
//! once a minute that of every user with a device connected (`LAST_SEEN_REFRESH_MS`).
//!
//! What this module never does: read a conversation actor's state, write anything but
//! last-seen times, or keep offline users (an entry outlives the user's last device by
//! two coalescing windows, or until its push allowance has refilled: at most
//! `PRESENCE_PUSH_BURST` allowance intervals, 16 s by default).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use switchboard_protocol::limits::PRESENCE_MAX;
use switchboard_protocol::{
    Body, Entry, ErrorBody, ErrorCode, Event, PresenceInfo, PresenceState as Status, Reply, ServerFrame, UserId,
    encode_frame,
};
use switchboard_storage::Store;
use tokio::sync::Notify;

use crate::fanout::Online;
use crate::limits::{
    LAST_SEEN_REFRESH_MS, PRESENCE_AT_STOP_MAX, PRESENCE_CACHED_CONTACTS_MAX, PRESENCE_CONTACTS_MAX,
    PRESENCE_CONVERSATIONS_SCANNED, PRESENCE_MEMBERS_SCANNED, PRESENCE_PENDING_MAX, PRESENCE_PUSH_BURST,
    PRESENCE_PUSH_WINDOWS, PRESENCE_REBUILD_BURST, PRESENCE_REBUILD_INTERVAL_MS, PRESENCE_RESTART_GRACE_MS,
    PRESENCE_RESTART_MAX_DOWN_MS, PRESENCE_RESTART_SPREAD_MS, PRESENCE_WHOLE_READ_BURST_KEYS,
    PRESENCE_WHOLE_READ_ESTIMATE_KEYS, PRESENCE_WHOLE_READ_KEYS_PER_S,
};
use crate::pauses::{Pauses, Point};
use crate::reply::internal;
use crate::typing::{STAMP_SHARDS, stamp_shard};

/// One presence change to push to the user's online contacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// Whose presence.
    pub user: UserId,
    /// The aggregate now.
    pub state: Status,
    /// `Offline`: when the last device left; otherwise the time of the push. ms since
    /// the Unix epoch.
    pub last_seen_ms: u64,
}

/// What a timeout produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fired {
    /// Changes to push, in user order of their timers.
    pub changes: Vec<Change>,
    /// Users whose entry was dropped (offline and quiet for a coalescing window), each
    /// with its last-seen time, which is stored (a reconnect and leave within the window
    /// moved it without a push: before, it was lost with the entry); their cached
    /// contacts can go too.
    pub forgotten: Vec<(UserId, u64)>,
}

/// Presence rules for every user with a connected device (or one that left lately, see
/// the module's doc). Times are ms since the Unix epoch, given by the caller.
#[derive(Debug)]
pub struct PresenceState {
    coalesce_ms: u64,
    users: HashMap<UserId, UserPresence>,
    /// `(due, user)`; each user has at most one (mirrored in `UserPresence::timer`).
    timers: BTreeSet<(u64, UserId)>,
    /// The latest end of a presumption made (`handle_presumed`; 0: none), to see the
    /// wall clock step back past them.
    presumed_latest_ms: u64,
}

#[derive(Debug)]
struct UserPresence {
    /// `(session, away)` per connected device; at most `MAX_SESSIONS_PER_USER` (the user
    /// directory refuses more).
    devices: Vec<(u64, bool)>,
    /// What the user's contacts were last told (`Offline` before the first push).
    published: Status,
    /// When the last push was made.
    last_push_ms: Option<u64>,
    /// When the last device left (meaningful while `devices` is empty): the latest time
    /// any of the devices that left was last heard from.
    offline_since_ms: u64,
    /// The latest time a device that left was last heard from (0: none left yet).
    last_left_ms: u64,
    /// This user's entry in `timers`.
    timer: Option<u64>,
    /// Its push allowance (`PRESENCE_PUSH_BURST`) as a GCRA theoretical arrival time:
    /// the next push is allowed from `allowance_tat - burst span` (0: a full burst).
    allowance_tat: u64,
    /// What it was when the broker last stopped (`Online` or `Away`), shown while no
    /// device of its is back, until its timer fires (`handle_presumed`).
    presumed: Option<Status>,
}

impl UserPresence {
    fn aggregate(&self) -> Status {
        if self.devices.is_empty() {
            self.presumed.unwrap_or(Status::Offline)
        } else if self.devices.iter().all(|&(_, away)| away) {
            Status::Away
        } else {
            Status::Online
        }
    }
}

impl PresenceState {
    /// No one online; at most one push per user per `coalesce_ms`.
    pub fn new(coalesce_ms: u64) -> Self {
        PresenceState { coalesce_ms, users: HashMap::new(), timers: BTreeSet::new(), presumed_latest_ms: 0 }
    }

    /// A device of `user` connected (as session `session`); it starts online.
    pub fn handle_attach(&mut self, user: UserId, session: u64, now_ms: u64) {
        let entry = self.users.entry(user).or_insert_with(|| UserPresence {
            devices: Vec::new(),
            published: Status::Offline,
            last_push_ms: None,
            offline_since_ms: now_ms,
            last_left_ms: 0,
            timer: None,
            allowance_tat: 0,
            presumed: None,
        });
        // A device of its own now says what the user is; what it says is pushed no
        // sooner than a coalescing window later, as after a push: a device comes back
        // online and says it is away a round trip later (`SetPresence`), and a user
        // presumed away whose away device is back is not shown online in between.
        if entry.presumed.take().is_some() {
            entry.last_push_ms = Some(now_ms);
        }
        if !entry.devices.iter().any(|&(s, _)| s == session) {
            entry.devices.push((session, false));
        }
        self.settle(user, now_ms);
    }

    /// Session `session` of `user` ended (closed, timed out or cut off) at `now_ms`; its
    /// device was last heard from at `heard_ms` (`now_ms` for a session that closed, the
    /// idle timeout earlier for one that timed out). An offline user's last seen is the
    /// latest time any of its devices was last heard from, so a device that died
    /// without closing is not shown as seen when the broker gave up on it (before: "last
    /// seen 0 s ago", 30–40 s after it vanished).
    pub fn handle_detach(&mut self, user: UserId, session: u64, heard_ms: u64, now_ms: u64) {
        let Some(entry) = self.users.get_mut(&user) else { return };
        let before = entry.devices.len();
        entry.devices.retain(|&(s, _)| s != session);
        if entry.devices.len() < before {
            entry.last_left_ms = entry.last_left_ms.max(heard_ms.min(now_ms));
        }
        if entry.devices.is_empty() && before > 0 {
            entry.offline_since_ms = entry.last_left_ms;
        }
        self.settle(user, now_ms);
    }

    /// Session `session` of `user` said it is away (`true`) or back (`false`). Unknown
    /// sessions are ignored.
    pub fn handle_away(&mut self, user: UserId, session: u64, away: bool, now_ms: u64) {
        let Some(entry) = self.users.get_mut(&user) else { return };
        let Some(device) = entry.devices.iter_mut().find(|(s, _)| *s == session) else { return };
        device.1 = away;
        self.settle(user, now_ms);
    }

    /// `user` had a device connected when the broker last stopped, all of them away if
    /// `away`, and was last seen at `last_seen_ms`: until a device of its connects, or
    /// until `until_ms`, it is shown as it was (its contacts were told so, and nothing
    /// since), then offline, last seen at `last_seen_ms`. A device that connects settles
    /// it after a coalescing window (`handle_attach`). Without it every user went offline
    /// and back across a restart: a contact whose device reconnected first saw everyone
    /// else offline, then each one online again as its devices came back. A user with an
    /// entry already is left as it is.
    pub fn handle_presumed(&mut self, user: UserId, away: bool, last_seen_ms: u64, until_ms: u64) {
        if self.users.contains_key(&user) {
            return;
        }
        self.presumed_latest_ms = self.presumed_latest_ms.max(until_ms);
        let was = if away { Status::Away } else { Status::Online };
        self.users.insert(
            user,
            UserPresence {
                devices: Vec::new(),
                published: was,
                last_push_ms: None,
                offline_since_ms: last_seen_ms,
                last_left_ms: last_seen_ms,
                timer: None,
                allowance_tat: 0,
                presumed: Some(was),
            },
        );
        self.schedule(user, until_ms);
    }

    /// Users with a device connected, each with whether all of its devices are away
    /// (what `handle_presumed` takes at the next start), ascending. Users only presumed
    /// are left out: a presumption is not carried over a second restart.
    pub fn connected_states(&self) -> Vec<(UserId, bool)> {
        let mut users: Vec<(UserId, bool)> = self
            .users
            .iter()
            .filter(|(_, p)| !p.devices.is_empty())
            .map(|(&u, p)| (u, p.aggregate() == Status::Away))
            .collect();
        users.sort_unstable();
        users
    }

    /// Users whose last device left lately (an entry kept for the coalescing window),
    /// each with its last-seen time, ascending: its going offline may not be pushed (and
    /// stored) yet, or a reconnect and leave within the window moved it without a push.
    pub fn left_lately(&self) -> Vec<(UserId, u64)> {
        let mut users: Vec<(UserId, u64)> = self
            .users
            .iter()
            .filter(|(_, p)| p.devices.is_empty() && p.presumed.is_none())
            .map(|(&u, p)| (u, p.offline_since_ms))
            .collect();
        users.sort_unstable();
        users
    }

    /// When `handle_timeout` next has work, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.timers.first().map(|&(at, _)| at)
    }

    /// Runs every timer due at `now_ms`: pushes held-back changes whose window ended and
    /// drops entries of users who stayed offline for a window after their last push.
    pub fn handle_timeout(&mut self, now_ms: u64) -> Fired {
        let mut fired = Fired::default();
        let horizon = PRESENCE_RESTART_GRACE_MS.saturating_add(PRESENCE_RESTART_SPREAD_MS);
        if self.presumed_latest_ms > now_ms.saturating_add(horizon) {
            // The wall clock stepped back past the presumptions' ends: they end now, not
            // when it has caught up (an hour's step kept users shown online an hour).
            self.end_presumptions(now_ms);
        }
        while let Some(&(at, user)) = self.timers.first() {
            if at > now_ms {
                break;
            }
            self.timers.remove(&(at, user));
            let (interval, burst_span) = self.allowance();
            let Some(entry) = self.users.get_mut(&user) else { continue };
            entry.timer = None;
            // A presumed user's one timer is its presumption's end (`handle_presumed`;
            // an attach ends the presumption before it could set another).
            entry.presumed = None;
            let actual = entry.aggregate();
            if actual != entry.published {
                let allowed = allowed_at(&mut entry.allowance_tat, now_ms, interval, burst_span);
                if allowed > now_ms {
                    self.schedule(user, allowed);
                    continue;
                }
                entry.allowance_tat = entry.allowance_tat.max(now_ms).saturating_add(interval);
                entry.published = actual;
                entry.last_push_ms = Some(now_ms);
                let last_seen_ms = if actual == Status::Offline { entry.offline_since_ms } else { now_ms };
                fired.changes.push(Change { user, state: actual, last_seen_ms });
                if actual == Status::Offline {
                    // Kept for one more window, so a reconnect right away is still held
                    // to the coalescing bound.
                    self.schedule(user, now_ms.saturating_add(self.coalesce_ms));
                }
            } else if actual == Status::Offline {
                let quiet_since = entry.last_push_ms.unwrap_or(0);
                // Kept until its push allowance has refilled too (at most its burst's
                // span, 16 s by default), so a reconnect does not start a fresh burst.
                let refilled = refilled_at(entry, now_ms, interval, burst_span);
                let forget_at = quiet_since.saturating_add(self.coalesce_ms).max(refilled);
                if now_ms >= forget_at || now_ms < quiet_since {
                    let seen = entry.offline_since_ms;
                    self.users.remove(&user);
                    fired.forgotten.push((user, seen));
                } else {
                    self.schedule(user, forget_at);
                }
            }
        }
        fired
    }

    /// Ends every presumption at `now_ms`: each presumed user's timer is moved to now.
    fn end_presumptions(&mut self, now_ms: u64) {
        let presumed: Vec<UserId> = self.users.iter().filter(|(_, p)| p.presumed.is_some()).map(|(&u, _)| u).collect();
        for user in presumed {
            if let Some(entry) = self.users.get_mut(&user)
                && let Some(old) = entry.timer.take()
            {
                self.timers.remove(&(old, user));
            }
            self.schedule(user, now_ms);
        }
        self.presumed_latest_ms = 0;
    }

    /// `user`'s aggregate now and its last-seen time (`now_ms` unless offline), or
    /// `None` if no device of the user connected lately (offline; the store knows when
    /// it was last seen).
    pub fn current(&self, user: UserId, now_ms: u64) -> Option<(Status, u64)> {
        let entry = self.users.get(&user)?;
        let state = entry.aggregate();
        Some((state, if state == Status::Offline { entry.offline_since_ms } else { now_ms }))
    }

    /// Users with a device connected.
    pub fn connected(&self) -> Vec<UserId> {
        self.users.iter().filter(|(_, p)| !p.devices.is_empty()).map(|(&u, _)| u).collect()
    }

    /// Whether `user` has an entry (connected, or left lately).
    pub fn is_known(&self, user: UserId) -> bool {
        self.users.contains_key(&user)
    }

    /// Users with an entry.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user has an entry.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// After a device change: if the aggregate differs from what was pushed, schedules
    /// the push at the end of the user's coalescing window (now, if it ended).
    fn settle(&mut self, user: UserId, now_ms: u64) {
        let (interval, burst_span) = self.allowance();
        let Some(entry) = self.users.get_mut(&user) else { return };
        if entry.aggregate() == entry.published {
            // A pending timer finds nothing to push (or forgets an offline user).
            return;
        }
        let due = match entry.last_push_ms {
            // The wall clock stepped back past the last push: do not wait for it.
            Some(last) if now_ms >= last => now_ms.max(last.saturating_add(self.coalesce_ms)),
            _ => now_ms,
        };
        let due = due.max(allowed_at(&mut entry.allowance_tat, now_ms, interval, burst_span));
        self.schedule(user, due);
    }

    /// The push allowance's interval (`PRESENCE_PUSH_WINDOWS` windows) and burst span
    /// (`PRESENCE_PUSH_BURST - 1` intervals), ms.
    fn allowance(&self) -> (u64, u64) {
        let interval = self.coalesce_ms.saturating_mul(PRESENCE_PUSH_WINDOWS);
        (interval, interval.saturating_mul(PRESENCE_PUSH_BURST - 1))
    }

    /// Sets `user`'s timer to `at`, unless it is already due earlier.
    fn schedule(&mut self, user: UserId, at: u64) {
        let Some(entry) = self.users.get_mut(&user) else { return };
        if let Some(old) = entry.timer {
            if old <= at {
                return;
            }
            self.timers.remove(&(old, user));
        }
        entry.timer = Some(at);
        self.timers.insert((at, user));
    }
}

/// When the next use of an allowance may come (GCRA, `tat` its theoretical arrival
/// time: one at `now_ms` is allowed once `tat - burst_span` has passed; each use moves
/// `tat` on by `interval` from `max(tat, now)`). A `tat` further ahead than any use could
/// have set means the wall clock stepped back: the allowance starts again from now (left
/// ahead, each use would move it further and the check would never hold again). Used for
/// a user's pushes and for its whole reads of contacts.
fn allowed_at(tat: &mut u64, now_ms: u64, interval: u64, burst_span: u64) -> u64 {
    if *tat > now_ms.saturating_add(interval).saturating_add(burst_span) {
        *tat = now_ms;
    }
    tat.saturating_sub(burst_span)
}

/// When `entry`'s allowance is a whole burst again (so forgetting it loses nothing).
fn refilled_at(entry: &mut UserPresence, now_ms: u64, interval: u64, burst_span: u64) -> u64 {
    allowed_at(&mut entry.allowance_tat, now_ms, interval, burst_span);
    entry.allowance_tat
}

/// The users who share a conversation with one user, ascending, without the user.
#[derive(Clone, Debug, Default)]
pub struct Contacts {
    users: Vec<UserId>,
}

impl Contacts {
    /// Whether `user` is among them.
    pub fn contains(&self, user: UserId) -> bool {
        self.users.binary_search(&user).is_ok()
    }

    /// All of them, ascending.
    pub fn users(&self) -> &[UserId] {
        &self.users
    }
}

/// The presence driver: feeds `PresenceState`, performs its pushes from one timer task,
/// caches contact sets and answers `Presence` requests.
pub struct Presence {
    state: Mutex<PresenceState>,
    contacts: Mutex<ContactCache>,
    store: Arc<Store>,
    online: Arc<Online>,
    wake: Arc<Notify>,
    /// When the connected users' stored last-seen times are next moved to now
    /// (`LAST_SEEN_REFRESH_MS`; wall clock, ms since the epoch; 0 before the first).
    refresh_due_ms: std::sync::atomic::AtomicU64,
    /// Whether the refresh also records who is connected (`checkpoint`): from the first
    /// `presume_from_last_stop` on, which takes the record the last run left first, until
    /// `record_at_stop`. Held while a record is written, so none lands after the stop's.
    checkpoints: Mutex<bool>,
    /// Changes that took users out of others' contact sets (a departure from a
    /// conversation, a block), counted under `push_gate` by each user whose set they
    /// changed (`STAMP_SHARDS` shards), once the sets show them: a push whose contacts
    /// were read before one is sent to contacts read again (`push`).
    moved: [AtomicU64; STAMP_SHARDS],
    /// Held shared while a push is checked and sent, and alone while a change is
    /// counted (`count_moved`): apart from the contacts' lock, so that joins and contact
    /// reads never wait for a push's fan-out (a review); a departure or a block waits
    /// for the one being sent.
    push_gate: std::sync::RwLock<()>,
    /// Where a test may hold the pusher (`Point::PresencePush`).
    pauses: Arc<Pauses>,
}

/// Times a push's contacts are read while departures or blocks keep moving its user's
/// stamp (`Presence::moved`); the last read is sent to whatever it showed.
const PUSH_READS: usize = 3;

/// Contact sets of users with a presence entry, at most `PRESENCE_CACHED_CONTACTS_MAX`
/// ids in all (sets and pending lists): a user's set is up to `PRESENCE_CONTACTS_MAX`
/// ids, and anyone can add anyone to groups, so the sets of every online user must not
/// grow with what others do (past the bound a set is built for each use and not kept).
///
/// A membership change reads nothing where it is delivered (`Presence::entry_delivered`):
/// whoever left is taken out of the kept sets at once, whoever joined is put on the
/// members' pending lists, checked for blocks at the set's next use (`Kept::pending`),
/// and a change too large for that marks the set short, read again whole at its next use
/// within the user's allowance (`allowances`) and the broker's (`whole_reads_tat_us`).
/// So a set never holds a former contact or one a block stands between, and others'
/// changes cost a user's set two key reads per user added, or a whole read at most
/// `PRESENCE_REBUILD_BURST` times and then once per `PRESENCE_REBUILD_INTERVAL_MS`,
/// however many changes there are, and all such reads at most
/// `PRESENCE_WHOLE_READ_KEYS_PER_S`.
struct ContactCache {
    sets: HashMap<UserId, Kept>,
    /// Ids `sets` holds (their sets' and pending lists'), at most `max_held`.
    held: usize,
    max_held: usize,
    /// Builds under way per user (whole reads and pending checks), and whether a change
    /// touched the user's set since one of them began (`changed`): a set built from reads
    /// that began before the change may be stale and is used once, not kept. Per user, so a membership change elsewhere does not keep
    /// everyone's sets from being kept (with a broker-wide counter, steady churn
    /// anywhere meant every push rebuilt its set). One entry per user being built: the
    /// timer's pushes, one at a time, and `Presence` requests, at most one per session.
    building: HashMap<UserId, (u32, bool)>,
    /// Per user whose short set was read again: its allowance of such reads
    /// (`PRESENCE_REBUILD_BURST`, then one per `PRESENCE_REBUILD_INTERVAL_MS`), a GCRA
    /// theoretical arrival time (ms since the epoch). Apart from `sets`, so an eviction
    /// or a drop does not refill it; forgotten with the user's presence entry (`forget`).
    allowances: HashMap<UserId, u64>,
    /// The broker's allowance of keys read by whole reads (`PRESENCE_WHOLE_READ_KEYS_PER_S`,
    /// a burst of `PRESENCE_WHOLE_READ_BURST_KEYS`), a GCRA theoretical arrival time in µs
    /// since the epoch: every whole read is charged after it ran; a short set is read
    /// again only while it is not spent. The per-user allowance bounds how often others
    /// make one user's set read, not how many users they reach: one creation puts a
    /// thousand users in a group (an attacker review).
    whole_reads_tat_us: u64,
}

impl Default for ContactCache {
    fn default() -> Self {
        ContactCache {
            sets: HashMap::new(),
            held: 0,
            max_held: PRESENCE_CACHED_CONTACTS_MAX,
            building: HashMap::new(),
            allowances: HashMap::new(),
            whole_reads_tat_us: 0,
        }
    }
}

/// A kept contact set.
struct Kept {
    set: Arc<Contacts>,
    /// Users who joined a conversation of the user's since the set was read, at most
    /// `PRESENCE_PENDING_MAX`: contacts unless a block stands between them, which the
    /// set's next use checks (two key reads each) before it is used.
    pending: Vec<UserId>,
    /// A change since the set was read may have made more contacts than `pending` holds
    /// (more joined than fit, a block ended, one who left may share another
    /// conversation): read again whole at its next use within the user's and the
    /// broker's allowances (`ContactCache::whole_read_allowed`), else used as it is with
    /// its pending contacts checked (it may lack new contacts, never holds a former one).
    short: bool,
}

/// `PRESENCE_WHOLE_READ_BURST_KEYS` as time, µs.
const WHOLE_READ_BURST_US: u64 = PRESENCE_WHOLE_READ_BURST_KEYS * 1_000_000 / PRESENCE_WHOLE_READ_KEYS_PER_S;

/// What a use of a kept set must do first.
enum Refresh {
    /// Check these pending contacts (`Kept::pending`).
    Pending(Vec<UserId>),
    /// Read the set whole.
    Whole,
}

impl ContactCache {
    /// `user`'s presence entry is gone: its set and its allowance of reads with it, and
    /// builds under way keep theirs no more.
    fn forget(&mut self, user: UserId) {
        self.remove(user);
        self.changed(user);
        self.allowances.remove(&user);
    }

    /// Keeps builds of `user`'s set under way from keeping theirs (read before a change).
    fn changed(&mut self, user: UserId) {
        if let Some((_, stale)) = self.building.get_mut(&user) {
            *stale = true;
        }
    }

    /// Takes `gone` out of `user`'s kept set and pending list; marks the set short if it
    /// held `gone` and `short` (someone who leaves one conversation may share another).
    fn take_out_one(&mut self, user: UserId, gone: UserId, short: bool) {
        let Some(kept) = self.sets.get_mut(&user) else { return };
        if let Some(at) = kept.pending.iter().position(|&u| u == gone) {
            // Pending through this conversation, and maybe through another that made it
            // pending again meanwhile (nothing is pending twice): read whole to know.
            kept.pending.swap_remove(at);
            self.held -= 1;
            kept.short |= short;
        }
        if let Ok(at) = kept.set.users.binary_search(&gone) {
            Arc::make_mut(&mut kept.set).users.remove(at);
            self.held -= 1;
            kept.short |= short;
        }
    }

    /// Takes every one of `gone` out of `user`'s kept set and pending list, marking the
    /// set short if it held any (the user left a conversation of theirs).
    fn take_out_all(&mut self, user: UserId, gone: &HashSet<UserId>) {
        let Some(kept) = self.sets.get_mut(&user) else { return };
        let before = kept.pending.len() + kept.set.users.len();
        kept.pending.retain(|u| !gone.contains(u));
        if kept.set.users.iter().any(|u| gone.contains(u)) {
            Arc::make_mut(&mut kept.set).users.retain(|u| !gone.contains(u));
        }
        let after = kept.pending.len() + kept.set.users.len();
        kept.short |= after < before;
        self.held -= before - after;
    }

    /// Puts `joined` (a conversation of `user`'s now has them; `user` may be among them)
    /// on `user`'s pending list, those it does not hold yet; marks its set short if they
    /// do not fit (`PRESENCE_PENDING_MAX`, or the cache's bound). At most 65 looked at.
    /// A short set keeps taking them while they fit: they are checked when its whole read
    /// is refused, so a user others keep short still gains a new direct peer (a review).
    fn add_pending(&mut self, user: UserId, joined: &[UserId]) {
        let Some(kept) = self.sets.get_mut(&user) else { return };
        let new: Vec<UserId> = if joined.len() > PRESENCE_PENDING_MAX + 1 {
            Vec::new()
        } else {
            joined
                .iter()
                .copied()
                .filter(|&other| other != user && !kept.set.contains(other) && !kept.pending.contains(&other))
                .collect()
        };
        let fits = joined.len() <= PRESENCE_PENDING_MAX + 1
            && kept.pending.len() + new.len() <= PRESENCE_PENDING_MAX
            && self.held + new.len() <= self.max_held;
        if !fits {
            kept.short = true;
            return;
        }
        self.held += new.len();
        kept.pending.extend(new);
    }

    /// Marks `user`'s kept set short (`Kept::short`); its pending list stays (checked
    /// while a whole read is refused).
    fn mark_short(&mut self, user: UserId) {
        if let Some(kept) = self.sets.get_mut(&user) {
            kept.short = true;
        }
    }

    /// Takes `user`'s set out, its ids out of `held`.
    fn remove(&mut self, user: UserId) {
        if let Some(kept) = self.sets.remove(&user) {
            self.held -= kept.set.users.len() + kept.pending.len();
        }
    }

    /// `user`'s kept set if it is to be used as it is at `now_ms` (`Ok`): nothing
    /// pending and not short, or short with the user's allowance of whole reads spent.
    /// Else what to do first (`Err`): a whole read is charged to the allowance here; a
    /// pending list is taken out of the set (put back as a short mark if its check is
    /// overtaken by a change).
    fn usable(&mut self, user: UserId, now_ms: u64) -> Result<Arc<Contacts>, Refresh> {
        let Some(short) = self.sets.get(&user).map(|kept| kept.short) else { return Err(Refresh::Whole) };
        if short && self.whole_read_allowed(user, now_ms) {
            return Err(Refresh::Whole);
        }
        let Some(kept) = self.sets.get_mut(&user) else { return Err(Refresh::Whole) };
        if kept.pending.is_empty() {
            return Ok(kept.set.clone());
        }
        self.held -= kept.pending.len();
        Err(Refresh::Pending(std::mem::take(&mut kept.pending)))
    }

    /// Whether `user`'s short set may be read whole at `now_ms`, within the broker's
    /// allowance of keys and the user's of whole reads; if so both are charged (the
    /// broker's with `PRESENCE_WHOLE_READ_ESTIMATE_KEYS`, settled by `charge_whole_read`
    /// once the read ran, so reads admitted together see each other).
    fn whole_read_allowed(&mut self, user: UserId, now_ms: u64) -> bool {
        let now_us = now_ms.saturating_mul(1000);
        // Charges are held within twice the burst of now (`charge_whole_read`), so more
        // than that ahead means the wall clock stepped back.
        if self.whole_reads_tat_us > now_us.saturating_add(2 * WHOLE_READ_BURST_US) {
            self.whole_reads_tat_us = now_us;
        }
        if self.whole_reads_tat_us > now_us.saturating_add(WHOLE_READ_BURST_US) {
            return false;
        }
        let (interval, burst_span) =
            (PRESENCE_REBUILD_INTERVAL_MS, (PRESENCE_REBUILD_BURST - 1) * PRESENCE_REBUILD_INTERVAL_MS);
        let tat = self.allowances.entry(user).or_insert(0);
        if allowed_at(tat, now_ms, interval, burst_span) > now_ms {
            return false;
        }
        *tat = (*tat).max(now_ms).saturating_add(interval);
        self.charge_keys(PRESENCE_WHOLE_READ_ESTIMATE_KEYS as u64, now_us);
        true
    }

    /// Adds `found` (checked for blocks since `user`'s pending list was taken out, with
    /// nothing changed meanwhile) to its kept set; a set that would pass
    /// `PRESENCE_CONTACTS_MAX` is marked short instead (a whole read keeps the smallest
    /// conversations' members). The set as it is then, if kept.
    fn add_found(&mut self, user: UserId, found: &[UserId]) -> Option<Arc<Contacts>> {
        let kept = self.sets.get_mut(&user)?;
        let new: Vec<UserId> = found.iter().copied().filter(|&u| !kept.set.contains(u)).collect();
        if kept.set.users.len() + new.len() > PRESENCE_CONTACTS_MAX || self.held + new.len() > self.max_held {
            kept.short = true;
            return Some(kept.set.clone());
        }
        if !new.is_empty() {
            let set = Arc::make_mut(&mut kept.set);
            set.users.extend(&new);
            set.users.sort_unstable();
            self.held += new.len();
        }
        Some(kept.set.clone())
    }

    /// `user`'s set was just read whole and kept: `user` goes into the kept sets of its
    /// contacts that lack it (within their bounds). The read checked what they share and
    /// the blocks both ways, and nothing changed since (else it would not be kept); a
    /// contact whose own set was short, with its reads spent, pushed its presence to a set
    /// without `user`, who was never told again (an attacker review).
    fn introduce(&mut self, user: UserId, set: &Contacts) {
        for &contact in set.users() {
            if self.held >= self.max_held {
                return;
            }
            let Some(kept) = self.sets.get_mut(&contact) else { continue };
            if let Err(at) = kept.set.users.binary_search(&user)
                && kept.set.users.len() < PRESENCE_CONTACTS_MAX
            {
                Arc::make_mut(&mut kept.set).users.insert(at, user);
                self.held += 1;
            }
        }
    }

    /// Charges a whole read of `keys` keys, ended at `now_ms`, to the broker's allowance
    /// (`whole_reads_tat_us`); `estimated`, what its admission charged already.
    fn charge_whole_read(&mut self, keys: usize, estimated: bool, now_ms: u64) {
        let already = if estimated { PRESENCE_WHOLE_READ_ESTIMATE_KEYS } else { 0 };
        self.charge_keys(keys.saturating_sub(already) as u64, now_ms.saturating_mul(1000));
    }

    /// Adds `keys` to the broker's allowance, held within twice its burst of `now_us` (a
    /// crowd of first reads after a start must not hold re-reads back for minutes).
    fn charge_keys(&mut self, keys: u64, now_us: u64) {
        let cost_us = keys.saturating_mul(1_000_000) / PRESENCE_WHOLE_READ_KEYS_PER_S;
        let tat = self.whole_reads_tat_us.max(now_us).saturating_add(cost_us);
        self.whole_reads_tat_us = tat.min(now_us.saturating_add(2 * WHOLE_READ_BURST_US));
    }

    /// A build of `user`'s set begins.
    fn begin(&mut self, user: UserId) {
        self.building.entry(user).or_insert((0, false)).0 += 1;
    }

    /// A build of `user`'s set ended: whether nothing dropped the set while it ran.
    fn end(&mut self, user: UserId) -> bool {
        let Some((builds, stale)) = self.building.get_mut(&user) else { return false };
        *builds -= 1;
        let fresh = !*stale;
        if *builds == 0 {
            self.building.remove(&user);
        }
        fresh
    }

    /// Keeps `set` as `user`'s, within `max_held`: other users' sets make room, the
    /// first the map yields (no order of arrival, so whoever filled the cache first does
    /// not keep it: the others' sets would be rebuilt on every use).
    fn keep(&mut self, user: UserId, set: &Arc<Contacts>) {
        if set.users.len() > self.max_held {
            return;
        }
        self.remove(user);
        while self.held + set.users.len() > self.max_held {
            let Some(&evicted) = self.sets.keys().next() else { break };
            self.remove(evicted);
        }
        self.held += set.users.len();
        self.sets.insert(user, Kept { set: set.clone(), pending: Vec::new(), short: false });
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        // The timer task holds only a weak reference: wake it so it sees we are gone.
        self.wake.notify_one();
    }
}

impl Presence {
    /// A driver pushing through `online`, with its timer task spawned on the current
    /// tokio runtime (the task ends when the driver is dropped).
    pub fn start(store: Arc<Store>, online: Arc<Online>, coalesce_ms: u64, pauses: Arc<Pauses>) -> Arc<Presence> {
        let presence = Arc::new(Presence {
            state: Mutex::new(PresenceState::new(coalesce_ms)),
            contacts: Mutex::default(),
            store,
            online,
            wake: Arc::new(Notify::new()),
            refresh_due_ms: std::sync::atomic::AtomicU64::new(0),
            checkpoints: Mutex::new(false),
            moved: std::array::from_fn(|_| AtomicU64::new(0)),
            push_gate: std::sync::RwLock::new(()),
            pauses,
        });
        spawn_timer(Arc::downgrade(&presence), presence.wake.clone());
        presence
    }

    /// Users with a presence entry (connected, or left lately).
    pub fn users(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Records who has a device connected as the broker stops (at most
    /// `PRESENCE_AT_STOP_MAX` users), for `presume_from_last_stop` at the next start.
    /// Called before the sessions are closed; durable with the store's closing flush.
    /// Also stores the last-seen time of each user whose last device left lately
    /// (`left_lately`): before, a going offline held
    /// back and not pushed yet was lost with the broker's stop, and after the start such
    /// a user was shown last seen at an earlier push (a trial: 350 ms earlier than shown
    /// before the stop).
    ///
    /// The checkpoints stop with it: the refresh went on while the sessions closed (up
    /// to half a minute), and one falling due then replaced the record with the users
    /// still connected, nearly none, so at the start after a clean stop nobody was
    /// presumed and every contact was pushed each user offline and online again (an
    /// attacker review).
    pub fn record_at_stop(&self) {
        let left = self.state.lock().unwrap_or_else(|p| p.into_inner()).left_lately();
        for (user, last_seen_ms) in left {
            if !self.store_last_seen(user, last_seen_ms) {
                break;
            }
        }
        let mut checkpoints = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        *checkpoints = false;
        self.record_connected(crate::now_ms());
    }

    /// Records who has a device connected now (`now_ms`), as `record_at_stop` does, so
    /// that a start after a crash finds who was connected at most one refresh
    /// (`LAST_SEEN_REFRESH_MS`) before it. Before, only a clean stop recorded them:
    /// after a crash every user was shown offline at the start and online again as each
    /// device came back. Written with the refresh of last-seen times, once a minute: a
    /// value of about 9 bytes per connected user, up to `PRESENCE_AT_STOP_MAX` users.
    fn checkpoint(&self, now_ms: u64) {
        let checkpoints = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        if *checkpoints {
            self.record_connected(now_ms);
        }
    }

    fn record_connected(&self, now_ms: u64) {
        let mut users = self.state.lock().unwrap_or_else(|p| p.into_inner()).connected_states();
        users.truncate(PRESENCE_AT_STOP_MAX);
        let at_stop = switchboard_storage::PresenceAtStop { stopped_ms: now_ms, users };
        if let Err(e) = self.store.set_presence_at_stop(&at_stop) {
            tracing::warn!(error = %e, "storing who is connected failed: presence will flap across a restart");
        }
    }

    /// At a start: shows the users connected at the last stop as they were
    /// (`PresenceState::handle_presumed`) for `PRESENCE_RESTART_GRACE_MS` and up to
    /// `PRESENCE_RESTART_SPREAD_MS` more (spread by user, so those who do not come back
    /// are not all pushed offline in one go), if the record was made at most
    /// `PRESENCE_RESTART_MAX_DOWN_MS` ago: at the clean stop, or, after a crash, at the
    /// last `checkpoint` (then up to `LAST_SEEN_REFRESH_MS` more: the record is up to
    /// that much older than the crash; a user who left in that time is shown as it was
    /// for the grace, then offline, last seen when it left). Users disabled or left
    /// without a device meanwhile (operator commands work on a stopped broker's store)
    /// are not presumed: they cannot come back. The record is read once: 3 key reads per
    /// user in it. From then on the record is kept once a minute (`checkpoint`).
    pub fn presume_from_last_stop(&self) -> switchboard_storage::Result<()> {
        let taken = self.store.take_presence_at_stop();
        *self.checkpoints.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let Some(at_stop) = taken? else { return Ok(()) };
        let now = crate::now_ms();
        let max_age = if self.store.opened_clean() {
            PRESENCE_RESTART_MAX_DOWN_MS
        } else {
            PRESENCE_RESTART_MAX_DOWN_MS + LAST_SEEN_REFRESH_MS
        };
        let stale = now.saturating_sub(at_stop.stopped_ms) > max_age || at_stop.stopped_ms > now;
        if stale {
            return Ok(());
        }
        let mut presumed = Vec::with_capacity(at_stop.users.len());
        for (user, away) in at_stop.users {
            if self.store.disabled(user)? || self.store.devices(user)?.is_empty() {
                continue;
            }
            // The time of its last device's close at the stop, stored after the record.
            let last_seen = self.store.last_seen(user)?.unwrap_or(0).max(at_stop.stopped_ms);
            let spread = user.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
            let until =
                now.saturating_add(PRESENCE_RESTART_GRACE_MS).saturating_add(spread % PRESENCE_RESTART_SPREAD_MS);
            presumed.push((user, away, last_seen, until));
        }
        // Said only when someone is (it was said at every start, "presumed=0" too: an
        // operator's trial).
        if !presumed.is_empty() {
            tracing::info!(
                presumed = presumed.len(),
                "users connected at the last stop are shown as they were until they reconnect"
            );
        }
        self.update(|state, _| {
            for (user, away, last_seen, until) in presumed {
                state.handle_presumed(user, away, last_seen, until);
            }
        });
        Ok(())
    }

    /// A session of `user` is connected.
    pub fn attach(&self, user: UserId, session: u64) {
        self.update(|state, now| state.handle_attach(user, session, now));
    }

    /// A session of `user` ended; its device was last heard from `silent_ms` before now
    /// (0 for a session that closed; the idle timeout for one that timed out).
    pub fn detach(&self, user: UserId, session: u64, silent_ms: u64) {
        self.update(|state, now| state.handle_detach(user, session, now.saturating_sub(silent_ms), now));
    }

    /// A session of `user` is away or back (`SetPresence`).
    pub fn set_away(&self, user: UserId, session: u64, away: bool) {
        self.update(|state, now| state.handle_away(user, session, away, now));
    }

    /// A conversation entry was delivered to `audience` (its members before and after
    /// it). A membership change reads nothing here (`ContactCache`): a member who left or
    /// was removed is taken out of the others' kept sets at once, and they out of its
    /// own; those who joined go on the others' pending lists, and the others on theirs
    /// (a change too large for the lists marks the sets short). Before, the change dropped
    /// every member's set, each read again whole at its next use (up to
    /// `PRESENCE_MEMBERS_SCANNED` keys), so one add or removal in a 1,000-member group
    /// cost a thousand such reads, and every change again, charged to nobody (an
    /// attacker review).
    pub fn entry_delivered(&self, entry: &Entry, audience: &[UserId]) {
        let joined: HashSet<UserId> = match &entry.body {
            Body::Created { members, .. } | Body::MembersAdded { members } => members.iter().map(|&(u, _)| u).collect(),
            Body::MemberRemoved { user } => return self.left(*user, audience),
            Body::MemberLeft => return self.left(entry.sender, audience),
            _ => return,
        };
        let list: Vec<UserId> = joined.iter().copied().collect();
        let mut cache = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
        for &user in audience {
            // A build under way may have read before the change: used once, not kept.
            cache.changed(user);
            // One who joined gains every member; the others, those who joined.
            cache.add_pending(user, if joined.contains(&user) { audience } else { &list });
        }
    }

    /// `gone` left a conversation of `audience` (its members before): out of their kept
    /// sets and pending lists, and they out of its own.
    fn left(&self, gone: UserId, audience: &[UserId]) {
        let members: HashSet<UserId> = audience.iter().copied().filter(|&u| u != gone).collect();
        let mut cache = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
        for &user in audience {
            cache.changed(user);
            if user == gone {
                cache.take_out_all(user, &members);
            } else {
                cache.take_out_one(user, gone, true);
            }
        }
        drop(cache);
        self.count_moved(audience);
    }

    /// Counts a change that took users out of `users`' contact sets (`moved`), once the
    /// sets show it, under the push gate: a push that read its contacts before sees the
    /// count and reads them again, or was sent before this returns.
    fn count_moved(&self, users: &[UserId]) {
        let _gate = self.push_gate.write().unwrap_or_else(|p| p.into_inner());
        for &user in users {
            self.moved[stamp_shard(user)].fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `a` started (`blocked`) or stopped blocking `b`. A block takes each out of the
    /// other's kept set at once (nothing read); its end marks both sets short, read
    /// again whole at their next use within their allowances.
    pub fn blocks_changed(&self, a: UserId, b: UserId, blocked: bool) {
        let mut cache = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
        cache.changed(a);
        cache.changed(b);
        if blocked {
            cache.take_out_one(a, b, false);
            cache.take_out_one(b, a, false);
            drop(cache);
            self.count_moved(&[a, b]);
        } else {
            cache.mark_short(a);
            cache.mark_short(b);
        }
    }

    /// Answers `Presence { users }` for `caller`: the users asked about (every contact,
    /// by id, if none are named) who share a conversation with
    /// the caller, by id; the caller and everyone else are left out. `INVALID` for more
    /// than `PRESENCE_MAX` names. The store is read on the blocking pool: a contact set
    /// read whole after a membership change reads up to `PRESENCE_MEMBERS_SCANNED` keys,
    /// milliseconds a runtime thread must not spend.
    ///
    /// Also returns the keys read to bring the caller's contact set up to date (0 when it
    /// was), which the caller's allowance of member rows pays: a set made short by a
    /// membership change is read whole by the next query (within the caller's allowance
    /// of such reads, `ContactCache`), up to ~25,000 reads for a user in 4,096
    /// conversations, and a user could make its own short with each add or removal in a
    /// group of its own (an attacker review).
    pub async fn query(
        self: &Arc<Self>,
        caller: UserId,
        users: Vec<UserId>,
        pauses: &crate::pauses::Pauses,
    ) -> Result<(Reply, usize), ErrorBody> {
        if users.len() > PRESENCE_MAX as usize {
            return Err(ErrorBody::new(ErrorCode::INVALID, format!("at most {PRESENCE_MAX} users per request")));
        }
        let this = self.clone();
        let (contacts, rebuilt) =
            tokio::task::spawn_blocking(move || this.contacts_of(caller)).await.map_err(internal)?.map_err(internal)?;
        // Contacts come from the membership indexes: show none that a crash could take back.
        if let Some(barrier) = self.store.index_barrier().map_err(internal)? {
            barrier.await.map_err(internal)?;
        }
        pauses.pass(crate::pauses::Point::PresenceQuery).await;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // And none lost meanwhile: a removal or a block answered while this waited on
            // the barrier (its commit is the barrier's) dropped the set read before it,
            // which showed them still (before: answered from that set alone).
            let (now, rebuilt_again) = this.contacts_of(caller).map_err(internal)?;
            let rebuilt = rebuilt + rebuilt_again;
            if Arc::ptr_eq(&contacts, &now) {
                return this.answer(&now, users).map(|reply| (reply, rebuilt));
            }
            let both = Contacts { users: contacts.users().iter().copied().filter(|&u| now.contains(u)).collect() };
            this.answer(&both, users).map(|reply| (reply, rebuilt))
        })
        .await
        .map_err(internal)?
    }

    /// The `Presence` answer about `users` (every contact if none) among `contacts`.
    fn answer(&self, contacts: &Contacts, users: Vec<UserId>) -> Result<Reply, ErrorBody> {
        let wanted: Vec<UserId> = if users.is_empty() {
            contacts.users().to_vec()
        } else {
            let mut asked: Vec<UserId> = users.into_iter().filter(|&u| contacts.contains(u)).collect();
            asked.sort_unstable();
            asked.dedup();
            asked
        };
        let now = crate::now_ms();
        let mut out = Vec::with_capacity(wanted.len());
        for user in wanted {
            let Some(record) = self.store.user(user).map_err(internal)? else { continue };
            let current = self.state.lock().unwrap_or_else(|p| p.into_inner()).current(user, now);
            let (state, last_seen_ms) = match current {
                Some(c) => c,
                None => (Status::Offline, self.store.last_seen(user).map_err(internal)?.unwrap_or(0)),
            };
            out.push(PresenceInfo { user, name: record.name, state, last_seen_ms });
        }
        Ok(Reply::Presence(out))
    }

    /// Applies one input and wakes the timer task if it made an earlier deadline.
    fn update(&self, apply: impl FnOnce(&mut PresenceState, u64)) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = state.poll_timeout();
        apply(&mut state, crate::now_ms());
        let after = state.poll_timeout();
        drop(state);
        if after.is_some() && (before.is_none() || after < before) {
            self.wake.notify_one();
        }
    }

    /// Moves the stored last-seen time of every user with a device connected to `now_ms`
    /// (`LAST_SEEN_REFRESH_MS`); nothing is pushed (contacts are told a connected user is
    /// online, seen now, from memory). Then asks for a group commit (not waited for), so
    /// that these writes, the record of who is connected (`checkpoint`) and the last-seen
    /// times stored since are durable within the minute: they ride other writes' commits,
    /// and on a broker where nobody wrote, none came, and a crash lost them (an operator's
    /// trial: after a `kill -9` of an idle broker nobody was presumed, every contact saw
    /// each user go offline and online again, and a user gone offline minutes before was
    /// shown last seen at the last clean stop). One commit a minute.
    fn refresh_last_seen(&self, now_ms: u64) {
        let connected = self.state.lock().unwrap_or_else(|p| p.into_inner()).connected();
        for user in connected {
            if !self.store_last_seen(user, now_ms) {
                break;
            }
        }
        self.checkpoint(now_ms);
        if let Err(e) = self.store.barrier() {
            tracing::warn!(error = %e, "asking for the commit of presence's writes failed");
        }
    }

    /// Runs due timers and performs their pushes; refreshes the stored last-seen times
    /// when due. Returns the next deadline: the next timer's or the next refresh's.
    fn fire(&self) -> Option<u64> {
        let now = crate::now_ms();
        let fired = self.state.lock().unwrap_or_else(|p| p.into_inner()).handle_timeout(now);
        for change in fired.changes {
            self.push(change);
        }
        if !fired.forgotten.is_empty() {
            for &(user, seen) in &fired.forgotten {
                self.store_last_seen(user, seen);
            }
            let mut cache = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
            // A build that began before this and ends after it must not keep a set for a
            // user just forgotten (it would stay until that user's next offline).
            for (user, _) in fired.forgotten {
                cache.forget(user);
            }
        }
        // After the pushes, which must not wait behind a write per connected user.
        let due = self.refresh_due_ms.load(Ordering::Relaxed);
        // Also when the wall clock stepped back past a whole period.
        if now >= due || due > now.saturating_add(LAST_SEEN_REFRESH_MS) {
            self.refresh_last_seen(now);
            self.refresh_due_ms.store(now.saturating_add(LAST_SEEN_REFRESH_MS), Ordering::Relaxed);
        }
        let refresh = self.refresh_due_ms.load(Ordering::Relaxed);
        let next = self.state.lock().unwrap_or_else(|p| p.into_inner()).poll_timeout();
        Some(next.map_or(refresh, |at| at.min(refresh)))
    }

    /// Stores `user`'s last-seen time (replacing the one stored; not waited for:
    /// it rides the next group commit); `false`, said in the log, if that failed.
    fn store_last_seen(&self, user: UserId, at_ms: u64) -> bool {
        let stored = self.store.set_last_seen(user, at_ms);
        if let Err(e) = &stored {
            tracing::warn!(user, error = %e, "storing last seen failed");
        }
        stored.is_ok()
    }

    /// Stores the change's last-seen time and pushes it to the user's online contacts.
    /// Sent under the push gate, which a departure or a block counts itself under
    /// (`moved`, `count_moved`): one counted since the contacts were read has them read again, up to
    /// `PUSH_READS` times, and one counted after the send finds the event queued before
    /// its own answer or entry. Before, a push whose contacts were read just before a
    /// block reached the blocker after the block was answered, and one read before a
    /// removal reached the removed member after its removal (a review).
    fn push(&self, change: Change) {
        let Change { user, state, last_seen_ms } = change;
        self.store_last_seen(user, last_seen_ms);
        let name = match self.store.user(user) {
            Ok(Some(record)) => record.name,
            _ => return,
        };
        let event = ServerFrame::Event(Event::Presence(PresenceInfo { user, name, state, last_seen_ms }));
        let frame = match encode_frame(&event) {
            Ok(frame) => frame,
            Err(e) => return tracing::error!(error = %e, "a presence event did not encode"),
        };
        for read in 1..=PUSH_READS {
            let moved = self.moved[stamp_shard(user)].load(Ordering::SeqCst);
            let contacts = match self.contacts_of(user) {
                Ok((c, _)) => c,
                Err(e) => return tracing::warn!(user, error = %e, "reading contacts failed; presence not pushed"),
            };
            if read == 1 {
                self.pauses.pass_blocking(Point::PresencePush);
            }
            let _gate = self.push_gate.read().unwrap_or_else(|p| p.into_inner());
            // The last read is sent as it is: a presence change is never dropped (it
            // would stand wrong until the next), and a user's stamp moving between each
            // of its reads takes a block or a departure within microseconds of each.
            if read == PUSH_READS || self.moved[stamp_shard(user)].load(Ordering::SeqCst) == moved {
                self.online.deliver(contacts.users(), &frame, 0);
                return;
            }
        }
    }

    /// `user`'s contacts: cached (a short one within the user's allowance of reads:
    /// `ContactCache::usable`), or read from the user's conversation index and each
    /// conversation's members (`read_contacts`). Kept only while the user has a presence
    /// entry, no change to the user's set raced the reads, and within the cache's bound.
    /// A set a change raced is read again, once (before, it was used as read: a removal
    /// or block acknowledged during the read still got that push).
    /// With it, the keys read (0: cached).
    fn contacts_of(&self, user: UserId) -> switchboard_storage::Result<(Arc<Contacts>, usize)> {
        self.contacts_at(user, crate::now_ms())
    }

    /// `contacts_of` at `now_ms` (wall clock, ms since the epoch).
    fn contacts_at(&self, user: UserId, now_ms: u64) -> switchboard_storage::Result<(Arc<Contacts>, usize)> {
        let (mut attempts, mut read) = (0, 0);
        loop {
            attempts += 1;
            let (refresh, estimated) = {
                let mut cache = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
                // A short set read whole was admitted with an estimate charged; a first read
                // (no set kept) was not.
                let kept = cache.sets.contains_key(&user);
                let refresh = match cache.usable(user, now_ms) {
                    Ok(set) => return Ok((set, read)),
                    Err(refresh) => refresh,
                };
                cache.begin(user);
                (refresh, kept)
            };
            if let Refresh::Pending(pending) = refresh {
                // Contacts unless a block stands between them: two keys each.
                let mut found = Vec::with_capacity(pending.len());
                let mut checked = Ok(());
                for other in pending {
                    read += 2;
                    match self.store.blocked_between(user, other) {
                        Ok(false) => found.push(other),
                        Ok(true) => {}
                        Err(e) => checked = Err(e),
                    }
                }
                let mut cache = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
                let fresh = cache.end(user);
                if fresh && checked.is_ok() {
                    if let Some(set) = cache.add_found(user, &found) {
                        return Ok((set, read));
                    }
                } else {
                    // A change overtook the check (or a read failed): read whole.
                    cache.mark_short(user);
                }
                if attempts >= 2 {
                    checked?;
                }
                continue;
            }
            let before = read;
            let built = read_contacts(&self.store, user).map(|(set, keys)| {
                read += keys;
                Arc::new(set)
            });
            let known = self.state.lock().unwrap_or_else(|p| p.into_inner()).is_known(user);
            let mut cache = self.contacts.lock().unwrap_or_else(|p| p.into_inner());
            cache.charge_whole_read(read - before, estimated, now_ms);
            let fresh = cache.end(user);
            if let Ok(set) = &built
                && known
                && fresh
            {
                cache.keep(user, set);
                cache.introduce(user, set);
            }
            if fresh || built.is_err() || attempts >= 2 {
                return built.map(|set| (set, read));
            }
        }
    }
}

/// `user`'s contacts from the store: the members of at most
/// `PRESENCE_CONVERSATIONS_SCANNED` of its conversations (the first by id), smallest
/// first (fewest members, then oldest), reading at most `PRESENCE_MEMBERS_SCANNED`
/// member keys and keeping at most `PRESENCE_CONTACTS_MAX` contacts. Smallest first
/// because anyone can add anyone to groups: in id order a stranger's few 1,000-member
/// groups, made before the user's later conversations, spent the whole member scan and
/// none of the later ones counted, a direct conversation's peer included. Now a direct
/// peer or a small group's member is found before any large group is read. One key read
/// per conversation listed (its member count). With the set, the keys read (conversations
/// listed, member keys, block keys).
fn read_contacts(store: &Store, user: UserId) -> switchboard_storage::Result<(Contacts, usize)> {
    let mut found = BTreeSet::new();
    let mut scanned = 0usize;
    // Neither sees the other while one blocks the other: the user's own blocks read
    // once, and each contact's of the user one key each.
    let mut excluded: HashSet<UserId> =
        store.blocked_users(user, switchboard_protocol::limits::MAX_BLOCKED as usize)?.into_iter().collect();
    let mut convs = Vec::new();
    for conv in store.user_conversations(user, None, PRESENCE_CONVERSATIONS_SCANNED)? {
        convs.push((store.member_count(conv)?, conv));
    }
    convs.sort_unstable();
    let convs_listed = convs.len();
    'convs: for (_, conv) in convs {
        for (member, _) in store.members(conv)? {
            scanned += 1;
            if scanned > PRESENCE_MEMBERS_SCANNED {
                break 'convs;
            }
            if member == user || found.contains(&member) || excluded.contains(&member) {
                continue;
            }
            if store.blocks(member, user)? {
                excluded.insert(member);
                continue;
            }
            found.insert(member);
            if found.len() >= PRESENCE_CONTACTS_MAX {
                break 'convs;
            }
        }
    }
    let blocks_read = found.len() + excluded.len();
    Ok((
        Contacts { users: found.into_iter().collect() },
        convs_listed + scanned.min(PRESENCE_MEMBERS_SCANNED) + blocks_read,
    ))
}

/// A driver whose timers one task runs: `fire` performs what is due and says when to
/// come back.
pub(crate) trait Timed: Send + Sync + 'static {
    /// Performs what is due now; returns how long until the next deadline, measured on
    /// the driver's own clock (presence's deadlines are on the wall clock, with which
    /// its last-seen times are stamped; typing's on a monotonic one).
    fn fire_due(&self) -> Option<Duration>;
}

impl Timed for Presence {
    fn fire_due(&self) -> Option<Duration> {
        self.fire().map(|at| Duration::from_millis(at.saturating_sub(crate::now_ms())))
    }
}

/// Spawns the task that runs `driver`'s timers: it sleeps until the next deadline or a
/// wake-up (an input made an earlier deadline), and ends once the driver is dropped.
pub(crate) fn spawn_timer<T: Timed>(driver: Weak<T>, wake: Arc<Notify>) {
    tokio::spawn(async move {
        let mut next: Option<Duration> = None;
        loop {
            // A notify sent while we were firing is kept by `Notify` and ends this wait.
            match next {
                Some(d) => {
                    let _ = tokio::time::timeout(d, wake.notified()).await;
                }
                None => wake.notified().await,
            }
            let Some(driver) = driver.upgrade() else { return };
            // Pushes read the store (a contact set rebuilt after a membership change is up
            // to `PRESENCE_MEMBERS_SCANNED` keys, typing's block checks a key per member):
            // milliseconds a runtime thread must not spend.
            match tokio::task::spawn_blocking(move || driver.fire_due()).await {
                Ok(due) => next = due,
                // The runtime is shutting down, or a push panicked (as before, the timers end).
                Err(_) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 250;

    fn change(user: UserId, state: Status, last_seen_ms: u64) -> Change {
        Change { user, state, last_seen_ms }
    }

    /// Device 10 of user 1 flips between away and back at each of `times`
    /// (starting from `away`, left at the last state), timers run as it goes: the pushes.
    fn flap(p: &mut PresenceState, away: &mut bool, times: impl Iterator<Item = u64>) -> Vec<(u64, Change)> {
        let mut pushes = Vec::new();
        for t in times {
            *away = !*away;
            p.handle_away(1, 10, *away, t);
            pushes.extend(run_until(p, t));
        }
        pushes
    }

    /// Runs every timer up to `until`, in order, collecting the changes with their times.
    fn run_until(p: &mut PresenceState, until: u64) -> Vec<(u64, Change)> {
        let mut out = Vec::new();
        while let Some(at) = p.poll_timeout().filter(|&at| at <= until) {
            out.extend(p.handle_timeout(at).changes.into_iter().map(|c| (at, c)));
        }
        out
    }

    /// A device that timed out was last seen when it was last heard from, not when the
    /// broker gave up on it; with several devices, the latest of them counts.
    #[test]
    fn last_seen_is_when_the_last_device_was_last_heard_from() {
        let mut p = PresenceState::new(0);
        p.handle_attach(1, 10, 1_000);
        p.handle_timeout(1_000);
        // Timed out at 31.5 s, last heard from at 1.5 s.
        p.handle_detach(1, 10, 1_500, 31_500);
        assert_eq!(p.handle_timeout(31_500).changes, vec![change(1, Status::Offline, 1_500)]);

        // Two devices: one closes at 50 s, the other dies, heard last at 45 s, and times
        // out at 75 s: last seen 50 s (the latest either was heard).
        p.handle_attach(2, 20, 40_000);
        p.handle_attach(2, 21, 40_000);
        p.handle_timeout(40_000);
        p.handle_detach(2, 20, 50_000, 50_000);
        p.handle_detach(2, 21, 45_000, 75_000);
        assert_eq!(p.handle_timeout(75_000).changes, vec![change(2, Status::Offline, 50_000)]);
        // Back and gone again: the new leave counts, not the old one.
        p.handle_attach(2, 22, 80_000);
        p.handle_timeout(80_000);
        p.handle_detach(2, 22, 90_000, 90_000);
        assert_eq!(p.handle_timeout(90_000).changes, vec![change(2, Status::Offline, 90_000)]);
    }

    /// Users connected at the last stop are shown as they were until a device of theirs
    /// connects and has said whether it is away (no push when that is what they were)
    /// or the grace ends (offline, last seen at the stop). Before, every one of them was
    /// offline at the start and pushed online again as its devices came back.
    #[test]
    fn users_connected_at_the_last_stop_stay_as_they_were_until_they_reconnect() {
        let (stopped, start, until) = (1_000_000, 1_003_000, 1_013_000);
        let mut p = PresenceState::new(W);
        for (user, away) in [(1, false), (2, true), (3, false), (4, true)] {
            p.handle_presumed(user, away, stopped, until);
        }
        assert_eq!(p.current(1, start), Some((Status::Online, start)));
        assert_eq!(p.current(2, start), Some((Status::Away, start)));
        assert!(p.connected_states().is_empty(), "a presumption is not carried over a second stop");
        // User 1 is back online: nothing to tell anyone.
        p.handle_attach(1, 10, start + 500);
        assert!(run_until(&mut p, start + 500 + W).is_empty());
        // User 2 is back and says it is away a round trip later: nothing either (before
        // the window, its new connection's "online" was pushed, then "away").
        p.handle_attach(2, 20, start + 600);
        p.handle_away(2, 20, true, start + 650);
        assert!(run_until(&mut p, start + 600 + W).is_empty());
        // User 4 comes back and stays online: a change, pushed a window later.
        p.handle_attach(4, 40, start + 800);
        assert_eq!(
            run_until(&mut p, start + 800 + W),
            vec![(start + 800 + W, change(4, Status::Online, start + 800 + W))]
        );
        // User 3 never comes back: offline at the grace's end, last seen at the stop.
        assert_eq!(run_until(&mut p, until), vec![(until, change(3, Status::Offline, stopped))]);
        assert_eq!(p.current(3, until), Some((Status::Offline, stopped)));
        assert_eq!(p.connected_states(), vec![(1, false), (2, true), (4, false)]);
        // A user already known (a device connected before the record was read) is left
        // as it is.
        p.handle_presumed(1, true, stopped, until + 20_000);
        assert_eq!(p.current(1, until), Some((Status::Online, until)));
    }

    /// A wall clock that steps back past the presumptions' ends does not keep the
    /// presumed users shown as they were until it has caught up: they end at once.
    #[test]
    fn a_clock_stepping_back_ends_presumptions() {
        let mut p = PresenceState::new(W);
        p.handle_presumed(1, false, 10_000_000, 10_013_000);
        assert!(p.handle_timeout(10_012_999).changes.is_empty(), "not before its end");
        // An hour back.
        let fired = p.handle_timeout(10_013_000 - 3_600_000);
        assert_eq!(fired.changes, vec![change(1, Status::Offline, 10_000_000)]);
    }

    #[test]
    fn aggregate_over_devices_away_only_when_all_are() {
        let mut p = PresenceState::new(0);
        p.handle_attach(1, 10, 1000);
        assert_eq!(p.handle_timeout(1000).changes, vec![change(1, Status::Online, 1000)], "a new connection is online");
        p.handle_attach(1, 11, 1001);
        p.handle_away(1, 10, true, 1002);
        assert_eq!(p.poll_timeout(), None, "one device away, one not: still online");
        assert_eq!(p.current(1, 1002), Some((Status::Online, 1002)));
        p.handle_away(1, 11, true, 1003);
        assert_eq!(p.handle_timeout(1003).changes, vec![change(1, Status::Away, 1003)]);
        p.handle_detach(1, 11, 1004, 1004);
        assert_eq!(p.poll_timeout(), None, "the remaining device is away too");
        p.handle_attach(1, 12, 1005);
        assert_eq!(p.handle_timeout(1005).changes, vec![change(1, Status::Online, 1005)], "a new device is online");
        p.handle_detach(1, 12, 1006, 1006);
        assert_eq!(p.handle_timeout(1006).changes, vec![change(1, Status::Away, 1006)]);
        p.handle_detach(1, 10, 1007, 1007);
        assert_eq!(p.current(1, 1008), Some((Status::Offline, 1007)));
        let fired = p.handle_timeout(1008);
        assert_eq!(fired.changes, vec![change(1, Status::Offline, 1007)], "last seen: the last leave");
        assert_eq!(
            fired.forgotten.iter().map(|f| f.0).collect::<Vec<_>>(),
            vec![1],
            "with no window an offline user is forgotten at once"
        );
        // Unknown sessions and users change nothing.
        p.handle_away(1, 99, true, 1008);
        p.handle_detach(2, 5, 1008, 1008);
        assert!(p.handle_timeout(1008).changes.is_empty());
    }

    #[test]
    fn flapping_is_coalesced_and_the_latest_state_wins() {
        let mut p = PresenceState::new(W);
        p.handle_attach(1, 10, 0);
        let mut pushes = run_until(&mut p, 0);
        // A device flapping every 10 ms (100 times a second) for 10 s.
        let mut away = false;
        pushes.extend(flap(&mut p, &mut away, (10..10_000).step_by(10)));
        // Ends away (the last flip at 9990 set away = true).
        assert!(away);
        pushes.extend(run_until(&mut p, 20_000));
        assert!(pushes.len() <= 10_000 / W as usize + 2, "{} pushes", pushes.len());
        for pair in pushes.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= W, "pushes {pair:?} closer than the window");
        }
        let last = pushes.last().unwrap().1;
        assert_eq!(last.state, Status::Away, "the trailing push carries the latest state");
        assert_eq!(p.current(1, 20_000).unwrap().0, Status::Away);
    }

    /// `PRESENCE_PUSH_BURST`: a user flapping for a minute gets its burst, then one push
    /// per `PRESENCE_PUSH_WINDOWS` windows (before: one per window, 240), the latest state
    /// always pushed in the end; once it has been quiet long enough, a change goes at once.
    #[test]
    fn a_flapping_user_gets_a_burst_then_one_push_per_allowance_interval() {
        let mut p = PresenceState::new(W);
        p.handle_attach(1, 10, 0);
        let mut pushes = run_until(&mut p, 0);
        let mut away = false;
        pushes.extend(flap(&mut p, &mut away, (W..60_000).step_by(W as usize)));
        pushes.extend(run_until(&mut p, 120_000));
        let interval = W * PRESENCE_PUSH_WINDOWS;
        let most = PRESENCE_PUSH_BURST + 60_000 / interval + 1;
        assert!(pushes.len() as u64 <= most, "{} pushes, at most {most}", pushes.len());
        assert!(pushes.len() as u64 >= 60_000 / (2 * interval), "{} pushes: held back, not dropped", pushes.len());
        assert_eq!(pushes.last().unwrap().1.state, p.current(1, 120_000).unwrap().0, "the latest state, pushed");
        // Quiet for the whole burst's refill: the next change is pushed at once.
        p.handle_away(1, 10, !away, 200_000);
        assert_eq!(run_until(&mut p, 200_000).len(), 1);
    }

    /// Reconnecting does not start a fresh burst: an offline user's entry, which holds its
    /// allowance, is kept until the allowance refilled. Before, it went a window after the
    /// offline push and a user cycling connect and leave got 8 pushes on each return.
    #[test]
    fn reconnecting_does_not_refill_the_push_allowance() {
        let mut p = PresenceState::new(W);
        let mut pushes = Vec::new();
        for (i, t) in (0..60_000).step_by(4 * W as usize).enumerate() {
            p.handle_attach(1, i as u64, t);
            pushes.extend(run_until(&mut p, t + W));
            p.handle_detach(1, i as u64, t + W, t + W);
            pushes.extend(run_until(&mut p, t + 4 * W - 1));
        }
        pushes.extend(run_until(&mut p, 200_000));
        let most = PRESENCE_PUSH_BURST + 60_000 / (W * PRESENCE_PUSH_WINDOWS) + 1;
        assert!(pushes.len() as u64 <= most, "{} pushes, at most {most}", pushes.len());
        assert_eq!(pushes.last().unwrap().1.state, Status::Offline, "the last state, pushed");
        assert!(p.is_empty(), "forgotten once the allowance refilled");
    }

    /// A wall clock stepping back far does not leave the allowance ahead for good: it
    /// starts again from the new time, and holds pushes to it from there.
    #[test]
    fn a_clock_stepping_back_restarts_the_push_allowance() {
        let mut p = PresenceState::new(W);
        p.handle_attach(1, 10, 100_000);
        run_until(&mut p, 100_000);
        let mut away = false;
        flap(&mut p, &mut away, (100_000 + W..103_000).step_by(W as usize));
        // A minute back, flapping on for a minute: held to the allowance again.
        let pushes = flap(&mut p, &mut away, (40_000..100_000).step_by(W as usize));
        let most = PRESENCE_PUSH_BURST + 60_000 / (W * PRESENCE_PUSH_WINDOWS) + 1;
        assert!(pushes.len() as u64 <= most, "{} pushes, at most {most}", pushes.len());
    }

    fn set(users: &[UserId]) -> Arc<Contacts> {
        Arc::new(Contacts { users: users.to_vec() })
    }

    /// A set built while the user's own set was dropped is used once, not kept; a drop of
    /// another user's does not stop it being kept (before: any membership change in the
    /// broker did, so under steady churn every push rebuilt its set).
    #[test]
    fn only_a_change_to_the_users_own_set_keeps_a_build_from_being_kept() {
        let mut cache = ContactCache::default();
        cache.begin(1);
        cache.forget(2);
        assert!(cache.end(1), "another user's change");
        cache.begin(1);
        cache.begin(1);
        cache.forget(1);
        assert!(!cache.end(1));
        assert!(!cache.end(1), "both builds overlapped the change");
        assert!(cache.building.is_empty());
        assert!(!cache.end(1), "no build under way: nothing to keep");
    }

    /// The cache holds at most `max_held` ids: a newcomer's set takes the room of others
    /// (whoever filled it first does not keep it), a set larger than the bound is not
    /// kept, and dropping or replacing sets gives their room back.
    #[test]
    fn the_contact_cache_keeps_at_most_its_bound_of_ids() {
        let mut cache = ContactCache { max_held: 5, ..ContactCache::default() };
        cache.keep(1, &set(&[2, 3, 4]));
        cache.keep(2, &set(&[1, 3]));
        assert_eq!((cache.held, cache.sets.len()), (5, 2));
        cache.keep(3, &set(&[1, 2, 4]));
        assert!(cache.sets.contains_key(&3), "the newcomer is kept");
        assert!(cache.held <= 5 && cache.held == cache.sets.values().map(|k| k.set.users.len()).sum::<usize>());
        cache.keep(4, &set(&[1, 2, 3, 5, 6, 7]));
        assert!(!cache.sets.contains_key(&4), "larger than the whole cache");
        cache.keep(3, &set(&[1]));
        assert_eq!(cache.sets[&3].set.users.len(), 1, "replaced");
        assert_eq!(cache.held, cache.sets.values().map(|k| k.set.users.len()).sum::<usize>());
        for user in [1, 2, 3] {
            cache.forget(user);
        }
        assert_eq!((cache.held, cache.sets.len()), (0, 0));
    }

    #[test]
    fn a_held_back_change_is_pushed_when_the_window_ends() {
        let mut p = PresenceState::new(W);
        p.handle_attach(1, 10, 100);
        assert_eq!(run_until(&mut p, 100), vec![(100, change(1, Status::Online, 100))]);
        p.handle_away(1, 10, true, 150);
        assert!(run_until(&mut p, 349).is_empty(), "inside the window");
        assert_eq!(run_until(&mut p, 350), vec![(350, change(1, Status::Away, 350))], "trailing push");
        // A change undone inside the window pushes nothing.
        p.handle_away(1, 10, false, 400);
        p.handle_away(1, 10, true, 420);
        assert!(run_until(&mut p, 10_000).is_empty());
    }

    #[test]
    fn offline_users_are_forgotten_after_a_window_and_reconnects_are_still_coalesced() {
        let mut p = PresenceState::new(W);
        p.handle_attach(1, 10, 0);
        run_until(&mut p, 0);
        p.handle_detach(1, 10, 300, 300);
        assert_eq!(p.handle_timeout(300).changes, vec![change(1, Status::Offline, 300)]);
        // Back at once: held to the window after the offline push.
        p.handle_attach(1, 11, 310);
        assert!(p.handle_timeout(320).changes.is_empty());
        assert_eq!(p.handle_timeout(550).changes, vec![change(1, Status::Online, 550)]);
        p.handle_detach(1, 11, 600, 600);
        let offline = p.handle_timeout(800);
        assert_eq!(offline.changes, vec![change(1, Status::Offline, 600)], "last seen is the leave, not the push");
        assert!(p.is_known(1));
        assert!(p.handle_timeout(1050).forgotten.is_empty(), "kept until its push allowance refilled");
        // Four pushes (at 0, 300, 550, 800), each an allowance interval.
        let forgotten = p.handle_timeout(4 * W * PRESENCE_PUSH_WINDOWS);
        assert_eq!(forgotten.forgotten, vec![(1, 600)], "with the last seen to store");
        assert!(p.is_empty(), "no entry is kept for an offline user");
        assert_eq!(p.poll_timeout(), None);
        // Connect and leave before the first push: nothing to tell anyone.
        p.handle_attach(2, 20, 2000);
        p.handle_detach(2, 20, 2000, 2000);
        let fired = p.handle_timeout(2000);
        assert!(fired.changes.is_empty());
        assert_eq!(fired.forgotten, vec![(2, 2000)], "seen, though nobody was told");
    }

    #[test]
    fn a_clock_stepping_back_does_not_hold_pushes() {
        let mut p = PresenceState::new(W);
        p.handle_attach(1, 10, 10_000);
        run_until(&mut p, 10_000);
        p.handle_away(1, 10, true, 5_000);
        assert_eq!(p.handle_timeout(5_000).changes, vec![change(1, Status::Away, 5_000)]);
    }

    /// The stored last-seen time of a user connected for long follows the clock
    /// (`LAST_SEEN_REFRESH_MS`): before, it was written only at a push, so after a crash
    /// a user connected for days was shown as last seen when it came online. Users not
    /// connected keep theirs.
    #[tokio::test]
    async fn connected_users_last_seen_is_refreshed_in_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
        presence.attach(1, 10);
        store.set_last_seen(2, 5_000).unwrap();
        let now = crate::now_ms();
        presence.refresh_last_seen(now + 3_600_000);
        assert_eq!(store.last_seen(1).unwrap(), Some(now + 3_600_000), "connected: moved to now");
        assert_eq!(store.last_seen(2).unwrap(), Some(5_000), "not connected: kept");
        // The timer comes back for the next refresh even with no other deadline.
        let next = presence.fire().unwrap();
        assert!(next <= crate::now_ms() + LAST_SEEN_REFRESH_MS, "next deadline {next}");
    }

    /// Who is connected is recorded with each refresh, so a start after a crash shows
    /// them as they were until they are back (the crash: the store reopened without a
    /// clean close). Before, only a clean stop recorded them, and after a crash every
    /// user was offline at the start and pushed online again as its devices came back.
    #[tokio::test]
    async fn users_connected_before_a_crash_are_presumed_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = switchboard_storage::StoreConfig::new(dir.path().join("store"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        let device = switchboard_storage::DeviceRecord { name: "d".into(), public_key: [1; 32], enrolled_ms: 1 };
        {
            let store = Arc::new(switchboard_storage::Store::open(&config).unwrap());
            for user in [1, 2] {
                let (_, _, durable) =
                    store.add_device(user, &device, 8, &switchboard_storage::Replace::default()).unwrap();
                durable.await.unwrap();
            }
            let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
            presence.presume_from_last_stop().unwrap();
            presence.attach(1, 10);
            presence.attach(2, 20);
            presence.set_away(2, 20, true);
            presence.refresh_last_seen(crate::now_ms());
            store.barrier().unwrap().await.unwrap();
            // Crash: no record at stop, no clean close.
            drop(presence);
            drop(store);
        }
        let store = Arc::new(switchboard_storage::Store::open(&config).unwrap());
        assert!(!store.opened_clean());
        let presence = Presence::start(store, Arc::new(Online::default()), W, Arc::default());
        presence.presume_from_last_stop().unwrap();
        let now = crate::now_ms();
        let state = presence.state.lock().unwrap();
        assert_eq!(state.current(1, now).map(|(s, _)| s), Some(Status::Online));
        assert_eq!(state.current(2, now).map(|(s, _)| s), Some(Status::Away));
    }

    /// The minute's refresh asks for a commit of its own: on a broker where nobody
    /// writes, none came, and a crash lost who was connected and the last-seen times.
    #[tokio::test]
    async fn the_refresh_asks_for_a_commit_of_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = commits.clone();
        store.on_commit_started(Box::new(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
        presence.presume_from_last_stop().unwrap();
        presence.attach(1, 10);
        let before = commits.load(Ordering::SeqCst);
        presence.refresh_last_seen(crate::now_ms());
        for _ in 0..200 {
            if commits.load(Ordering::SeqCst) > before {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no commit after the refresh's writes");
    }

    /// A device that went silent is stored last seen when it was last heard from once its
    /// timeout ends it, though a refresh stored it seen later while it was silent: before,
    /// the store kept the later time, and the user was shown seen up to the idle timeout
    /// after it vanished, for good once its entry was forgotten.
    #[tokio::test]
    async fn a_silent_devices_last_seen_is_when_it_was_heard_not_the_refresh_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
        presence.attach(1, 10);
        let now = crate::now_ms();
        presence.refresh_last_seen(now);
        assert_eq!(store.last_seen(1).unwrap(), Some(now));
        presence.detach(1, 10, 30_000);
        let heard = now - 30_000;
        for _ in 0..200 {
            let seen = store.last_seen(1).unwrap().unwrap();
            if seen < now {
                assert!(seen.abs_diff(heard) < 1_000, "last seen {seen}, heard at {heard}");
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("still stored last seen at the refresh: {:?}", store.last_seen(1).unwrap());
    }

    /// A refresh falling due while the sessions close at a clean stop leaves the stop's
    /// record of who was connected as it was: before, it replaced it with the users still
    /// connected then (none), and the next start presumed nobody.
    #[tokio::test]
    async fn a_refresh_during_the_stop_keeps_the_record_of_who_was_connected() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
        presence.presume_from_last_stop().unwrap();
        presence.attach(1, 10);
        presence.attach(2, 20);
        presence.record_at_stop();
        presence.detach(1, 10, 0);
        presence.detach(2, 20, 0);
        presence.refresh_due_ms.store(0, Ordering::Relaxed);
        presence.fire();
        let record = store.take_presence_at_stop().unwrap().expect("a record");
        assert_eq!(record.users, vec![(1, false), (2, false)]);
    }

    /// A stranger's large groups, made before the user's later conversations, no longer
    /// take the whole contact set or member scan: the smallest conversations are read
    /// first (before, in id order, five groups of 1,000 filled the 4,096 contacts, 17 all
    /// 16,384 reads, and a later direct peer and a small group's members were no
    /// contacts: no presence either way).
    #[test]
    fn a_strangers_large_groups_do_not_crowd_out_small_conversations() {
        use switchboard_protocol::{ConversationKind, Role};
        let dir = tempfile::tempdir().unwrap();
        let store = crate::test_store(dir.path());
        let create = |kind, members: Vec<(UserId, Role)>, pair| crate::test_conversation(&store, kind, &members, pair);
        // Stranger 2 adds user 1 to groups with 998 others each, more than the scan reads.
        let groups = PRESENCE_MEMBERS_SCANNED / 1000 + 1;
        for g in 0..groups as u64 {
            let mut members = vec![(2, Role::Owner), (1, Role::Member)];
            members.extend((0..998).map(|i| (10_000 + g * 1000 + i, Role::Member)));
            create(ConversationKind::Group, members, None);
        }
        // Then user 1's own: a direct conversation with 3, a group with 4 and 5.
        create(ConversationKind::Direct, vec![(1, Role::Member), (3, Role::Member)], Some((1, 3)));
        create(ConversationKind::Group, vec![(1, Role::Owner), (4, Role::Member), (5, Role::Member)], None);
        let (contacts, _) = read_contacts(&store, 1).unwrap();
        for user in [2, 3, 4, 5] {
            assert!(contacts.contains(user), "user {user} is a contact");
        }
        assert!(!contacts.contains(1), "not one's own contact");
        // The bound holds: the large groups' members fill what remains of it.
        assert_eq!(contacts.users.len(), PRESENCE_CONTACTS_MAX);
    }

    /// A query says how many keys rebuilding the caller's contact set read, which its
    /// allowance of member rows pays (control.rs): nothing while the set is cached,
    /// everything again after a membership change made it short. Before, a query naming
    /// users was never charged, and a user dropping its own set with each add or removal
    /// in a group of its own had the broker read it again for free each time.
    #[tokio::test]
    async fn a_query_tells_what_rebuilding_the_callers_contacts_read() {
        use switchboard_protocol::{Body, ConversationKind, Entry, Role};
        use switchboard_storage::ConversationRecord;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let members: Vec<(UserId, Role)> =
            std::iter::once((1, Role::Owner)).chain((2..=500).map(|u| (u, Role::Member))).collect();
        let record = ConversationRecord { kind: ConversationKind::Group, title: "g".into(), created_ms: 0 };
        let first = |conv| Entry {
            conv,
            seq: 1,
            sender: 1,
            sender_device: 1,
            client_id: [0; 16],
            at_ms: 0,
            body: Body::Text { text: "hi".into(), edited: false },
        };
        let _ = store.create_conversation(&record, &members, None, first).unwrap();
        let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
        presence.attach(1, 10);
        let pauses = crate::pauses::Pauses::default();
        let rebuilt = |answer: Result<(Reply, usize), ErrorBody>| answer.unwrap().1;
        let first_read = rebuilt(presence.query(1, vec![2], &pauses).await);
        assert!(first_read >= 500, "one conversation, 500 member keys, the blocks: {first_read}");
        assert_eq!(rebuilt(presence.query(1, vec![2], &pauses).await), 0, "cached");
        let removal = Entry { body: Body::MemberRemoved { user: 500 }, ..first(1) };
        presence.entry_delivered(&removal, &[1]);
        // At least once more (the query reads the set again after its barrier, and the
        // timer task's push of user 1's arrival may build it beside it).
        let again = rebuilt(presence.query(1, vec![2], &pauses).await);
        assert!(again >= first_read, "dropped, read again: {again} against {first_read}");
    }

    /// A group of 50 with users 1 to 50, each with a presence entry and its contact set
    /// kept; 60 shares a direct conversation with 2, 61 blocks 3. The store's directory,
    /// the driver, and a writer of the group's entries (seq, sender, body).
    fn fifty_with_sets() -> (tempfile::TempDir, Arc<Presence>, impl Fn(u64, UserId, Body) -> Entry) {
        use switchboard_protocol::{ConversationKind, Role};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let members: Vec<(UserId, Role)> =
            std::iter::once((1, Role::Owner)).chain((2..=50).map(|u| (u, Role::Member))).collect();
        let conv = crate::test_conversation(&store, ConversationKind::Group, &members, None);
        let pair = [(2, Role::Member), (60, Role::Member)];
        crate::test_conversation(&store, ConversationKind::Direct, &pair, Some((2, 60)));
        store.set_block(61, 3, true, 8).unwrap();
        let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
        for user in 1..=50 {
            presence.attach(user, user * 10);
            assert!(presence.contacts_of(user).unwrap().1 > 0, "built");
        }
        let written = {
            let store = store.clone();
            move |seq: u64, sender, body| {
                let entry = Entry { conv, seq, sender, sender_device: 1, client_id: [seq as u8; 16], at_ms: 0, body };
                store.append_then(&entry, |_| ()).unwrap();
                entry
            }
        };
        (dir, presence, written)
    }

    /// `PRESENCE_PENDING_MAX + 1` users joining (too many for the pending lists), ids
    /// from `1000 + 100 * round`, as entry `seq` of the group; `audience` grows by them.
    fn large_add(
        written: &impl Fn(u64, UserId, Body) -> Entry,
        audience: &mut Vec<UserId>,
        round: u64,
        seq: u64,
    ) -> Entry {
        use switchboard_protocol::Role;
        let batch: Vec<(UserId, Role)> =
            (0..PRESENCE_PENDING_MAX as u64 + 1).map(|i| (1000 + round * 100 + i, Role::Member)).collect();
        audience.extend(batch.iter().map(|&(u, _)| u));
        audience.sort_unstable();
        written(seq, 1, Body::MembersAdded { members: batch })
    }

    /// Others adding users to a member's conversations cost its kept set two key reads
    /// per user added (a block check) at its next use, never a whole read, and one who
    /// blocks the member never becomes its contact. Before, every change dropped every
    /// member's set, each read whole again at its next use: here 11 adds, 11 reads of
    /// 50 to 60 keys for each of 50 sets (in a 1,000-member group, a thousand reads of up
    /// to `PRESENCE_MEMBERS_SCANNED` keys per change, charged to nobody: an attacker
    /// review).
    #[tokio::test]
    async fn others_adds_cost_a_kept_set_a_block_check_each() {
        use switchboard_protocol::Role;
        let (_dir, presence, written) = fifty_with_sets();
        let now = crate::now_ms();
        let mut audience: Vec<UserId> = (1..=50).collect();
        for (i, added) in (100..110).chain([61]).enumerate() {
            let entry = written(2 + i as u64, 1, Body::MembersAdded { members: vec![(added, Role::Member)] });
            audience.push(added);
            presence.entry_delivered(&entry, &audience);
            for user in 1..=50 {
                let (set, read) = presence.contacts_at(user, now).unwrap();
                assert_eq!(read, 2, "user {user}: one block check for {added}");
                assert_eq!(set.contains(added), !(added == 61 && user == 3), "user {user} and {added} (61 blocks 3)");
                assert_eq!(presence.contacts_at(user, now).unwrap().1, 0, "then as kept");
            }
        }
    }

    /// A change too large for the pending lists has each member's set read whole at its
    /// next use at most `PRESENCE_REBUILD_BURST` times, then once per
    /// `PRESENCE_REBUILD_INTERVAL_MS`, however many such changes there are; in between
    /// the set is used as it is (lacking the newcomers, never holding anyone it should
    /// not).
    #[tokio::test]
    async fn large_changes_read_a_set_whole_within_an_allowance() {
        let (_dir, presence, written) = fifty_with_sets();
        let now = crate::now_ms();
        let mut audience: Vec<UserId> = (1..=50).collect();
        let mut whole = vec![0u64; 51];
        for round in 0..6 {
            let entry = large_add(&written, &mut audience, round, 2 + round);
            presence.entry_delivered(&entry, &audience);
            let first = 1000 + round * 100;
            for user in 1..=50 {
                let (set, read) = presence.contacts_at(user, now).unwrap();
                whole[user as usize] += u64::from(read > 0);
                assert_eq!(set.contains(first), read > 0, "user {user}, round {round}");
            }
        }
        assert!(whole[1..].iter().all(|&n| n == PRESENCE_REBUILD_BURST), "whole reads per user: {whole:?}");
        let (set, read) = presence.contacts_at(1, now + PRESENCE_REBUILD_INTERVAL_MS).unwrap();
        assert!(read > 0 && set.contains(1500), "read whole again once the allowance refilled");
    }

    /// A member who leaves or is removed is taken out of the others' kept sets when the
    /// change is delivered, and they out of its own, not at a later read: with every
    /// user's whole reads spent, the sets used as they are lack it at once (it gets no
    /// more of their presence, nor they of its). A contact it still shares another
    /// conversation with is back at the next whole read.
    #[tokio::test]
    async fn one_who_leaves_is_no_contact_from_the_delivery_on() {
        use switchboard_protocol::Role;
        let (_dir, presence, written) = fifty_with_sets();
        let now = crate::now_ms();
        presence.attach(60, 600);
        presence.contacts_at(60, now).unwrap();
        let mut audience: Vec<UserId> = (1..=50).chain([60]).collect();
        let added = written(2, 1, Body::MembersAdded { members: vec![(60, Role::Member)] });
        presence.entry_delivered(&added, &audience);
        let with_sets: Vec<UserId> = (1..=50).chain([60]).collect();
        for round in 0..PRESENCE_REBUILD_BURST {
            let entry = large_add(&written, &mut audience, round, 3 + round);
            presence.entry_delivered(&entry, &audience);
            for &user in &with_sets {
                assert!(presence.contacts_at(user, now).unwrap().1 > 0, "a whole read");
            }
        }
        assert!((1..=50).all(|u| presence.contacts_at(u, now).unwrap().0.contains(60)));
        let removed = written(3 + PRESENCE_REBUILD_BURST, 1, Body::MemberRemoved { user: 60 });
        presence.entry_delivered(&removed, &audience);
        audience.retain(|&u| u != 60);
        for user in 1..=50 {
            let (set, read) = presence.contacts_at(user, now).unwrap();
            assert_eq!(read, 0, "user {user}: its whole reads are spent");
            assert!(!set.contains(60), "user {user}: 60 taken out at once");
        }
        let (set, read) = presence.contacts_at(60, now).unwrap();
        assert!(read == 0 && set.users().is_empty(), "60's own: the group taken out: {:?}", set.users());
        let left = written(4 + PRESENCE_REBUILD_BURST, 5, Body::MemberLeft);
        presence.entry_delivered(&left, &audience);
        for user in (1..=50).filter(|&u| u != 5) {
            let (set, read) = presence.contacts_at(user, now).unwrap();
            assert!(read == 0 && !set.contains(5), "user {user} after 5 left");
        }
        // 2 shares a direct conversation with 60: contacts again at the next whole reads.
        let later = now + 2 * PRESENCE_REBUILD_INTERVAL_MS;
        assert_eq!(presence.contacts_at(60, later).unwrap().0.users(), [2]);
        assert!(presence.contacts_at(2, later).unwrap().0.contains(60));
        assert!(!presence.contacts_at(3, later).unwrap().0.contains(60));
        let cache = presence.contacts.lock().unwrap();
        let ids: usize = cache.sets.values().map(|k| k.set.users.len() + k.pending.len()).sum();
        assert_eq!(cache.held, ids);
    }

    /// A block takes each out of the other's kept set at once, reading nothing (before:
    /// both sets dropped and read whole again), and a whole read leaves each out of the
    /// other's; its end has both read whole again, each in the other's.
    #[tokio::test]
    async fn a_block_takes_each_out_of_the_others_set_at_once() {
        let (_dir, presence, _written) = fifty_with_sets();
        let now = crate::now_ms();
        presence.store.set_block(4, 5, true, 8).unwrap();
        presence.blocks_changed(4, 5, true);
        let (four, read_four) = presence.contacts_at(4, now).unwrap();
        let (five, read_five) = presence.contacts_at(5, now).unwrap();
        assert_eq!((read_four, read_five), (0, 0), "nothing read");
        assert!(!four.contains(5) && !five.contains(4) && four.contains(6));
        for (user, other) in [(4, 5), (5, 4)] {
            let whole = read_contacts(&presence.store, user).unwrap().0;
            assert!(!whole.contains(other) && whole.contains(6), "a whole read of {user}'s leaves {other} out");
        }
        presence.store.set_block(4, 5, false, 8).unwrap();
        presence.blocks_changed(4, 5, false);
        for (user, other) in [(4, 5), (5, 4)] {
            let (set, read) = presence.contacts_at(user, now).unwrap();
            assert!(read > 0 && set.contains(other), "{user}'s read whole after the unblock");
        }
    }

    /// A user pending in a member's set through a conversation it then leaves may share
    /// another made meanwhile (pending once, however many): the set is read whole at its
    /// next use. Before, it was only taken off the list, and the two, sharing a direct
    /// conversation, were no contacts of each other until a whole read for another
    /// reason (an attacker review).
    #[tokio::test]
    async fn one_pending_through_a_conversation_it_leaves_is_looked_for_again() {
        use switchboard_protocol::{ConversationKind, Role};
        let (_dir, presence, written) = fifty_with_sets();
        let now = crate::now_ms();
        presence.attach(70, 700);
        assert!(!presence.contacts_at(70, now).unwrap().0.contains(1));
        let mut audience: Vec<UserId> = (1..=50).chain([70]).collect();
        let added = written(2, 1, Body::MembersAdded { members: vec![(70, Role::Member)] });
        presence.entry_delivered(&added, &audience);
        // Before either set is used, 1 and 70 start a direct conversation.
        let pair = [(1, Role::Member), (70, Role::Member)];
        let direct = crate::test_conversation(&presence.store, ConversationKind::Direct, &pair, Some((1, 70)));
        let created = Entry {
            conv: direct,
            seq: 1,
            sender: 1,
            sender_device: 1,
            client_id: [1; 16],
            at_ms: 0,
            body: Body::Created { kind: ConversationKind::Direct, title: String::new(), members: pair.to_vec() },
        };
        presence.entry_delivered(&created, &[1, 70]);
        let left = written(3, 70, Body::MemberLeft);
        presence.entry_delivered(&left, &audience);
        audience.retain(|&u| u != 70);
        let (set, read) = presence.contacts_at(1, now).unwrap();
        assert!(read > 2 && set.contains(70), "read whole: the direct peer found ({read} keys)");
        let (set, read) = presence.contacts_at(70, now).unwrap();
        assert!(read > 2 && set.users() == [1], "70's own read whole: {:?}", set.users());
        assert!(!presence.contacts_at(2, now).unwrap().0.contains(70), "no other share");
    }

    /// While the broker's allowance of whole-read keys is spent, a short set is used as it
    /// is (a thousand sets made short by one creation are read again at
    /// `PRESENCE_WHOLE_READ_KEYS_PER_S`, not at once); once it refills, read whole.
    #[test]
    fn whole_reads_wait_while_the_brokers_allowance_is_spent() {
        let mut cache = ContactCache::default();
        cache.keep(1, &set(&[2, 3]));
        cache.mark_short(1);
        let now = 1_000_000;
        // However much is charged (a crowd of first reads), held within twice the burst.
        cache.charge_whole_read(100 * PRESENCE_WHOLE_READ_BURST_KEYS as usize, false, now);
        assert!(cache.usable(1, now).is_ok(), "spent: used as it is");
        // Its pending contacts are still checked meanwhile (a user kept short by others
        // still gains a new direct peer).
        cache.add_pending(1, &[4]);
        assert!(matches!(cache.usable(1, now), Err(Refresh::Pending(p)) if p == [4]));
        assert!(cache.add_found(1, &[4]).unwrap().contains(4));
        assert!(cache.usable(1, now).is_ok(), "still short, still spent");
        let refilled = now + 2 * WHOLE_READ_BURST_US / 1000;
        assert!(matches!(cache.usable(1, refilled), Err(Refresh::Whole)), "refilled: read whole");
        // A wall clock stepped far back does not hold them for as long.
        cache.charge_whole_read(100 * PRESENCE_WHOLE_READ_BURST_KEYS as usize, true, refilled);
        assert!(matches!(cache.usable(1, 1_000), Err(Refresh::Whole)));
        assert_eq!(cache.held, 3, "2, 3 and 4");
    }

    /// A whole read puts its user into the kept sets of the contacts it found, short
    /// ones with their reads spent included: before, such a contact's presence changes
    /// went to its set without the user, who had been shown the contact by its own read
    /// and was never told of a change again (an attacker review).
    #[tokio::test]
    async fn a_whole_read_puts_its_user_into_its_contacts_kept_sets() {
        let (_dir, presence, written) = fifty_with_sets();
        let now = crate::now_ms();
        let mut audience: Vec<UserId> = (1..=50).collect();
        for round in 0..=PRESENCE_REBUILD_BURST {
            let entry = large_add(&written, &mut audience, round, 2 + round);
            presence.entry_delivered(&entry, &audience);
            presence.contacts_at(1, now).unwrap();
        }
        let newcomer = 1000 + PRESENCE_REBUILD_BURST * 100;
        let (set, read) = presence.contacts_at(1, now).unwrap();
        assert!(read == 0 && !set.contains(newcomer), "1's reads are spent: it lacks the newcomer");
        presence.attach(newcomer, 7);
        assert!(presence.contacts_at(newcomer, now).unwrap().0.contains(1));
        let (set, read) = presence.contacts_at(1, now).unwrap();
        assert!(read == 0 && set.contains(newcomer), "put in by the newcomer's read");
    }

    /// Membership changes and blocks on one thread (one conversation's entries in seq
    /// order, as its actor delivers them) while two threads use every user's set at once
    /// (pushes and `Presence` requests): once all is quiet, no kept set holds anyone its
    /// user shares no conversation with or a block stands between (what a whole read
    /// finds now), and the cache's count of ids is right. The rules' races (a use's
    /// pending check or whole read overtaken by a change, two uses of one set) run here
    /// for real; a leak would show as a kept set larger than the truth.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_racing_uses_leave_no_former_contact_in_a_kept_set() {
        use switchboard_protocol::{ConversationKind, Role};
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::test_store(dir.path()));
        let first: Vec<(UserId, Role)> =
            std::iter::once((1, Role::Owner)).chain((2..=12).map(|u| (u, Role::Member))).collect();
        let conv = crate::test_conversation(&store, ConversationKind::Group, &first, None);
        let presence = Presence::start(store.clone(), Arc::new(Online::default()), W, Arc::default());
        let users: Vec<UserId> = (1..=24).collect();
        for &user in &users {
            presence.attach(user, user * 10);
        }
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2u64)
            .map(|r| {
                let (presence, done, users) = (presence.clone(), done.clone(), users.clone());
                std::thread::spawn(move || {
                    let mut i = r as usize;
                    while !done.load(Ordering::Relaxed) {
                        presence.contacts_at(users[i % users.len()], crate::now_ms()).unwrap();
                        i = i.wrapping_mul(31).wrapping_add(7);
                    }
                })
            })
            .collect();
        let mut members: BTreeSet<UserId> = first.iter().map(|&(u, _)| u).collect();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for seq in 2..400u64 {
            let user = 2 + next() % 23;
            let roll = next() % 10;
            if roll < 2 {
                let other = 1 + next() % 24;
                let block = !store.blocks(user, other).unwrap();
                if other != user {
                    store.set_block(user, other, block, 64).unwrap();
                    presence.blocks_changed(user, other, block);
                }
                continue;
            }
            let body = if members.contains(&user) {
                Body::MemberRemoved { user }
            } else {
                Body::MembersAdded { members: vec![(user, Role::Member)] }
            };
            let entry = Entry { conv, seq, sender: 1, sender_device: 1, client_id: [0; 16], at_ms: 0, body };
            store.append_then(&entry, |_| ()).unwrap();
            let mut audience = members.clone();
            audience.insert(user);
            if !members.remove(&user) {
                members.insert(user);
            }
            presence.entry_delivered(&entry, &audience.into_iter().collect::<Vec<_>>());
            if seq % 50 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        done.store(true, Ordering::Relaxed);
        for reader in readers {
            reader.join().unwrap();
        }
        let cache = presence.contacts.lock().unwrap();
        for (&user, kept) in &cache.sets {
            let truth = read_contacts(&store, user).unwrap().0;
            let extra: Vec<UserId> = kept.set.users().iter().copied().filter(|&u| !truth.contains(u)).collect();
            assert!(extra.is_empty(), "user {user} keeps {extra:?}, who share nothing with it or block");
            assert!(kept.pending.iter().all(|&u| u != user));
        }
        let ids: usize = cache.sets.values().map(|k| k.set.users.len() + k.pending.len()).sum();
        assert_eq!(cache.held, ids);
    }
}
