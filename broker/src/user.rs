//! The user directory: who is online with how many sessions, each user's places for
//! connections still in their handshake, per-user allowances that outlive a
//! connection, and each user's store slots. It keeps the `Online` fan-out index in step with attach and detach.
//!
//! There is no per-user actor: everything a user's actor held now lives where it is
//! used (sessions in `Online`, presence in its driver, typing in its own), and an idle
//! ractor actor per online user cost about 6 KB (four channels and a task) of the
//! broker's 40 KB budget per idle connection, and a spawn per first login.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_protocol::{DeviceId, ErrorBody, ErrorCode, Reply, UserId};

use crate::conversation::Read;
use crate::limits::{
    CONVERSATION_CREATE_BURST, CONVERSATION_CREATE_PER_S, CREATION_BUCKETS_MAX, ENTRIES_READ_BURST_SECS,
    MAX_SESSIONS_PER_DEVICE, MAX_SESSIONS_PER_USER, MEMBER_ROWS_BUCKETS_MAX, MEMBER_ROWS_BURST_SECS,
    STORE_JOBS_PER_USER, WRITE_BUCKETS_MAX, WRITE_BURST_SECS,
};

use crate::fanout::{Online, SessionHandle};

/// Online users with their session counts. Attach, detach and the closing of a user's
/// connections run under the directory's lock, so a close finds in `Online` every
/// session attached before it; a session attached after it was stored finds the revoked
/// device or disabled account when it checks the store again after attaching (the
/// session task does, before it serves anything), so no session outlives either.
pub struct UserDirectory {
    /// Attached sessions per online user (shared with `Closer`s).
    sessions: Arc<Mutex<HashMap<UserId, usize>>>,
    /// Places taken by handshakes that have not attached yet (see `reserve`).
    reserved: Arc<Mutex<Reserved>>,
    online: Arc<Online>,
    /// Conversation creations and block changes (`allow_creation`).
    creations: Allowances,
    /// Member rows returned by reads that list members (`allow_member_reads`).
    member_rows: Allowances,
    /// Log entries returned by `History` and `CatchUp` (`allow_read`).
    entries: Allowances,
    /// Conversation log writes (`allow_write`); `None`: not limited.
    writes: Option<Allowances>,
    /// Each user's store slots (`store_slots`).
    store_slots: Mutex<StoreSlots>,
    /// When accounts were disabled in this run (`disable`).
    disables: Arc<Disables>,
}

/// When each account was last disabled in this run (`UserDirectory::disable`), so that
/// a request still in flight from a session that had ended before the disable (a write
/// queued behind a busy conversation actor, a chunk in its upload actor's mailbox) is
/// refused `ACCOUNT_DISABLED` even once the account is enabled again (PROTOCOL section
/// 8): a session that ended is no longer among those the disable closes, and the
/// store's disabled key is gone after the enable (an attacker review found such
/// writes landing after a disable and enable). In memory only: no session outlives the
/// run. Entries older than `DISABLES_KEPT` go when the map reaches `DISABLES_SWEEP_AT`
/// (disables are operator acts; no request stays in flight that long).
#[derive(Default)]
pub struct Disables {
    at: Mutex<HashMap<UserId, Instant>>,
}

/// How long a disable is remembered for requests of sessions that ended before it.
const DISABLES_KEPT: Duration = Duration::from_secs(3600);
/// Remembered disables beyond which those older than `DISABLES_KEPT` are dropped.
const DISABLES_SWEEP_AT: usize = 4096;

impl Disables {
    fn record(&self, user: UserId) {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if at.len() >= DISABLES_SWEEP_AT {
            at.retain(|_, when| when.elapsed() < DISABLES_KEPT);
        }
        at.insert(user, Instant::now());
    }

    /// Whether `user`'s account was disabled at or after `started` (a session's start).
    pub fn disabled_since(&self, user: UserId, started: Instant) -> bool {
        self.at.lock().unwrap_or_else(|p| p.into_inner()).get(&user).is_some_and(|when| *when >= started)
    }
}

/// Users' store slots, held weakly: a user's slots live while one of its sessions
/// or a read it runs holds them, so every session of a user shares one set, however it
/// reconnects. Entries whose slots are gone are dropped once the map has doubled since
/// the last sweep (at least 1,024 entries), so it holds about twice the users with a
/// session or a read at most.
#[derive(Default)]
struct StoreSlots {
    by_user: HashMap<UserId, std::sync::Weak<tokio::sync::Semaphore>>,
    /// Entries left by the last sweep.
    swept: usize,
}

/// The answer to a connection beyond `MAX_SESSIONS_PER_USER` (`RATE_LIMITED`, like too
/// many of a user's transfer streams: the user's own bound, which no retry clears until
/// one of its connections closes; it was `OVERLOADED`, which clients retry with backoff
/// as the broker's capacity, so `sb login` waited out its retries, a hash each).
const TOO_MANY_CONNECTIONS: &str = "too many connections for this user; close one first";

/// The answer to a connection beyond `MAX_SESSIONS_PER_DEVICE` (`RATE_LIMITED`, as above).
const TOO_MANY_DEVICE_CONNECTIONS: &str = "too many connections for this device; close one first";

/// Places taken by handshakes not attached yet: per user, and per device for those that
/// prove an enrolled one (a login or registration enrolls a new device).
#[derive(Default)]
struct Reserved {
    by_user: HashMap<UserId, usize>,
    by_device: HashMap<(UserId, DeviceId), usize>,
}

impl Reserved {
    fn give_back(&mut self, user: UserId, device: Option<DeviceId>) {
        fn less<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        less(&mut self.by_user, user);
        if let Some(device) = device {
            less(&mut self.by_device, (user, device));
        }
    }
}

/// A place among a user's sessions, taken during the handshake before `Authed` is sent
/// (and before a login enrolls anything), so a connection beyond
/// `MAX_SESSIONS_PER_USER` is refused as a handshake failure, never after it was told
/// it is authenticated. `attach` turns it into a session; dropped, it is given back.
pub struct Reservation {
    user: UserId,
    device: Option<DeviceId>,
    reserved: Arc<Mutex<Reserved>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner()).give_back(self.user, self.device);
    }
}

/// Per-user token buckets of users who used them recently, online or not (so
/// reconnecting does not refill one): at most `max`; when it is full, refilled buckets
/// are dropped, at most once a second, and until one is, users without a bucket are
/// refused (a full table fails closed; no live bucket is ever evicted).
pub(crate) struct Allowances {
    per_s: f64,
    burst: f64,
    max: usize,
    table: Mutex<AllowanceTable>,
}

#[derive(Default)]
struct AllowanceTable {
    buckets: HashMap<UserId, TokenBucket>,
    /// When `buckets` was last pruned.
    pruned: Option<Instant>,
}

impl Allowances {
    /// Buckets of `burst` tokens refilled at `per_s` a second, for at most `max` users.
    pub(crate) fn new(per_s: f64, burst: f64, max: usize) -> Self {
        Allowances { per_s, burst, max, table: Mutex::default() }
    }

    /// Takes one token from `user`'s bucket at `now`; `false` if it has none left, or if
    /// the table is full of buckets still refilling.
    pub(crate) fn take(&self, user: UserId, now: Instant) -> bool {
        self.with(user, now, |b| b.take(now, self.per_s, self.burst)).unwrap_or(false)
    }

    /// Gives back one token `take` took from `user`'s bucket (up to the burst).
    pub(crate) fn give_back(&self, user: UserId, now: Instant) {
        self.with(user, now, |b| b.give_back(now, self.per_s, self.burst));
    }

    /// Whether `user`'s bucket is empty now, without making one (a user with none has a
    /// full one), so asking adds no user to the table.
    pub(crate) fn spent(&self, user: UserId, now: Instant) -> bool {
        self.below(user, now, 0.0)
    }

    /// Whether `user`'s bucket holds `fraction` of its burst or less now (`spent`'s way).
    pub(crate) fn below(&self, user: UserId, now: Instant, fraction: f64) -> bool {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.buckets.get(&user).is_some_and(|b| b.tokens_at(now, self.per_s, self.burst) <= self.burst * fraction)
    }

    /// Users with a bucket.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).buckets.len()
    }

    /// Runs `f` on `user`'s bucket (a full one if it had none), or returns `None` if the
    /// table is full of buckets still refilling.
    fn with<T>(&self, user: UserId, now: Instant, f: impl FnOnce(&mut TokenBucket) -> T) -> Option<T> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let AllowanceTable { buckets, pruned } = &mut *table;
        if buckets.len() >= self.max && !buckets.contains_key(&user) {
            // Pruning walks the whole map, so at most once a second.
            if pruned.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
                *pruned = Some(now);
                buckets.retain(|_, b| !b.is_full(now, self.per_s, self.burst));
            }
            if buckets.len() >= self.max {
                return None;
            }
        }
        Some(f(buckets.entry(user).or_insert(TokenBucket::full(self.burst, now))))
    }
}

/// Closes a user's connections, owned: for the task that carries a catalog write through
/// its durability to this close, which the caller's going away does not stop
/// (`catalog::to_the_end`). Their outbound queues are closed before a call returns, so a
/// revocation answered `Done` has already cut the device off: nothing more reaches it and
/// its connection is closing.
#[derive(Clone)]
pub struct Closer {
    sessions: Arc<Mutex<HashMap<UserId, usize>>>,
    online: Arc<Online>,
    disables: Arc<Disables>,
}

impl Closer {
    /// Closes every live connection of a disabled account (`ACCOUNT_DISABLED`), the same
    /// way as `revoke`.
    pub fn disable(&self, user: UserId) {
        // Recorded first: a session that ends meanwhile is cut off by the record.
        self.disables.record(user);
        self.close(user, |_| true, ErrorCode::ACCOUNT_DISABLED);
    }

    /// Closes the live connections of a removed device (`DEVICE_REVOKED`).
    pub fn revoke(&self, user: UserId, device: DeviceId) {
        self.close(user, |d| d == device, ErrorCode::DEVICE_REVOKED);
    }

    /// Closes the connections of every device of `user` but `keep` with
    /// `DEVICE_REVOKED`, after a password change signed them out in its write. All of
    /// them, not only those the write removed.
    pub fn revoke_all_but(&self, user: UserId, keep: Option<DeviceId>) {
        self.close(user, |d| keep != Some(d), ErrorCode::DEVICE_REVOKED);
    }

    /// Closes with `code` the live connections of `user`'s devices that `which` picks,
    /// under the directory's lock, so that no session attaches meanwhile.
    fn close(&self, user: UserId, which: impl Fn(DeviceId) -> bool, code: ErrorCode) {
        let _attaching = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        tracing::debug!(user, %code, "closing connections");
        for s in self.online.sessions(user).iter().flat_map(|s| s.iter()) {
            if which(s.device) {
                s.out.close(code);
            }
        }
    }
}

impl UserDirectory {
    /// An empty directory publishing into `online`; each user's reads that list members
    /// may return `member_rows_per_sec` member rows a second (`allow_member_reads`), and
    /// each user may make `writes_per_sec` log writes a second (`allow_write`; 0: any)
    /// and read `entries_read_per_sec` log entries a second (`allow_read`).
    pub fn new(online: Arc<Online>, member_rows_per_sec: u32, writes_per_sec: u32, entries_read_per_sec: u32) -> Self {
        let rows = f64::from(member_rows_per_sec);
        let entries = f64::from(entries_read_per_sec);
        let writes = f64::from(writes_per_sec);
        UserDirectory {
            sessions: Arc::default(),
            reserved: Arc::default(),
            online,
            creations: Allowances::new(CONVERSATION_CREATE_PER_S, CONVERSATION_CREATE_BURST, CREATION_BUCKETS_MAX),
            member_rows: Allowances::new(rows, rows * MEMBER_ROWS_BURST_SECS, MEMBER_ROWS_BUCKETS_MAX),
            entries: Allowances::new(entries, entries * ENTRIES_READ_BURST_SECS, MEMBER_ROWS_BUCKETS_MAX),
            writes: (writes_per_sec > 0)
                .then(|| Allowances::new(writes, (writes * WRITE_BURST_SECS).max(1.0), WRITE_BUCKETS_MAX)),
            store_slots: Mutex::default(),
            disables: Arc::default(),
        }
    }

    /// The disables of this run, for sessions' outbound queues (`Outbound::with_owner`).
    pub fn disables(&self) -> Arc<Disables> {
        self.disables.clone()
    }

    /// `user`'s store slots (`STORE_JOBS_PER_USER`), the same for all its sessions
    /// while any of them, or a read taken with them, is alive.
    pub fn store_slots(&self, user: UserId) -> Arc<tokio::sync::Semaphore> {
        let mut slots_of = self.store_slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slots) = slots_of.by_user.get(&user).and_then(std::sync::Weak::upgrade) {
            return slots;
        }
        if slots_of.by_user.len() >= (2 * slots_of.swept).max(1024) {
            slots_of.by_user.retain(|_, slots| slots.strong_count() > 0);
            slots_of.swept = slots_of.by_user.len();
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(STORE_JOBS_PER_USER));
        slots_of.by_user.insert(user, Arc::downgrade(&slots));
        slots
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, usize>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place among `user`'s sessions for a connection in its handshake, or
    /// `RATE_LIMITED` if its sessions and the places already taken reach
    /// `MAX_SESSIONS_PER_USER`, or, for a connection proving the enrolled `device`,
    /// that device's reach `MAX_SESSIONS_PER_DEVICE` (`None`: a device being enrolled).
    pub fn reserve(&self, user: UserId, device: Option<DeviceId>) -> Result<Reservation, ErrorBody> {
        let sessions = self.sessions();
        let attached = sessions.get(&user).copied().unwrap_or(0);
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let taken = reserved.by_user.get(&user).copied().unwrap_or(0);
        if attached + taken >= MAX_SESSIONS_PER_USER {
            return Err(ErrorBody::new(ErrorCode::RATE_LIMITED, TOO_MANY_CONNECTIONS));
        }
        if let Some(device) = device {
            // `Online` changes under the sessions' lock, held here.
            let attached = self.online.sessions(user).map_or(0, |s| s.iter().filter(|s| s.device == device).count());
            let taken = reserved.by_device.get(&(user, device)).copied().unwrap_or(0);
            if attached + taken >= MAX_SESSIONS_PER_DEVICE {
                return Err(ErrorBody::new(ErrorCode::RATE_LIMITED, TOO_MANY_DEVICE_CONNECTIONS));
            }
            *reserved.by_device.entry((user, device)).or_insert(0) += 1;
        }
        *reserved.by_user.entry(user).or_insert(0) += 1;
        Ok(Reservation { user, device, reserved: self.reserved.clone() })
    }

    /// Registers a connected session in the place `reserve` took for it.
    pub fn attach(&self, place: Reservation, session: SessionHandle) -> Result<(), ErrorBody> {
        let user = place.user;
        let mut sessions = self.sessions();
        let attached = sessions.entry(user).or_insert(0);
        if *attached >= MAX_SESSIONS_PER_USER {
            return Err(ErrorBody::new(ErrorCode::RATE_LIMITED, TOO_MANY_CONNECTIONS));
        }
        self.online.add(user, session);
        *attached += 1;
        // Given back under the lock: the session now counts instead.
        drop(place);
        Ok(())
    }

    /// Unregisters a session.
    pub fn detach(&self, user: UserId, session: u64) {
        let mut sessions = self.sessions();
        self.online.remove(user, session);
        if let Some(attached) = sessions.get_mut(&user) {
            *attached -= 1;
            if *attached == 0 {
                sessions.remove(&user);
            }
        }
    }

    /// A handle that closes connections, for the task that removes devices or disables
    /// an account (`Closer`).
    pub fn closer(&self) -> Closer {
        Closer { sessions: self.sessions.clone(), online: self.online.clone(), disables: self.disables.clone() }
    }

    /// Takes one conversation creation (or one `Block` change, which rebuilds presence
    /// contact sets: both are rare acts of a person) from `user`'s allowance, or says
    /// `RATE_LIMITED`. The allowance is shared by all of the user's connections and
    /// outlives them.
    pub fn allow_creation(&self, user: UserId) -> Result<(), ErrorBody> {
        let limited = |msg| Err(ErrorBody::new(ErrorCode::RATE_LIMITED, msg));
        let (allowance, now) = (&self.creations, Instant::now());
        match allowance.with(user, now, |b| b.take(now, allowance.per_s, allowance.burst)) {
            Some(true) => Ok(()),
            Some(false) => limited("creating conversations or blocking users too fast; retry in a second"),
            None => limited("too many users are creating conversations; retry in a second"),
        }
    }

    /// Takes one conversation log write from `user`'s allowance (`writes_per_sec`, shared
    /// by all its connections, outliving them), or says `RATE_LIMITED` (retry the same
    /// write, with the same client id, after a backoff: it refills `writes_per_sec` a
    /// second), or `OVERLOADED` when `WRITE_BUCKETS_MAX` other users have written within
    /// the burst's refill time.
    pub fn allow_write(&self, user: UserId) -> Result<(), ErrorBody> {
        let Some(allowance) = &self.writes else { return Ok(()) };
        let now = Instant::now();
        match allowance.with(user, now, |b| b.take(now, allowance.per_s, allowance.burst)) {
            Some(true) => Ok(()),
            Some(false) => Err(ErrorBody::new(
                ErrorCode::RATE_LIMITED,
                format!("writing faster than {} a second; retry in a second", allowance.per_s),
            )),
            None => Err(ErrorBody::new(ErrorCode::OVERLOADED, "too many users are writing; retry in a second")),
        }
    }

    /// Gives back a write `allow_write` granted but the broker did not admit.
    pub fn refund_write(&self, user: UserId) {
        if let Some(allowance) = &self.writes {
            allowance.give_back(user, Instant::now());
        }
    }

    /// Gives back a creation `allow_creation` granted but nothing was created for.
    pub fn refund_creation(&self, user: UserId) {
        self.creations.give_back(user, Instant::now());
    }

    /// Whether `user` may make a read that lists members now (`Members`, `Receipts`,
    /// `CatchUp`, `EntryNames`; also `MarkDelivered`, a row per mark that raised nothing,
    /// and the other reads PROTOCOL.md section 8 lists): each costs a point read or two of the store per member
    /// row it returns (up to `MAX_GROUP_MEMBERS`), on the conversation's actor, in line
    /// with every member's writes (on the blocking pool if none is live). `RATE_LIMITED` once the rows the user read
    /// (`charge_member_reads`) have run past its allowance, until it refills
    /// (`member_rows_per_sec`, with a burst of `MEMBER_ROWS_BURST_SECS` seconds' worth),
    /// so one member looping on such reads cannot hold a large group's actor (or the
    /// store) for everyone. A read allowed is served whole and charged after (its rows
    /// are known only then): the allowance runs into debt by at most the reads that
    /// conversation actors and the blocking pool run for the user at once (each checks
    /// right before its read; `ConvDirectory::read`'s check only spares the mailbox), so
    /// pipelined reads across many large groups can put only their reader far into debt.
    pub fn allow_member_reads(&self, user: UserId) -> Result<(), ErrorBody> {
        let (allowance, now) = (&self.member_rows, Instant::now());
        let limited = |msg| Err(ErrorBody::new(ErrorCode::RATE_LIMITED, msg));
        match allowance.with(user, now, |b| b.tokens_at(now, allowance.per_s, allowance.burst) > 0.0) {
            Some(true) => Ok(()),
            Some(false) => limited(
                "reading member lists, receipts, catch-up, delivered marks or who may read files too fast; retry in a moment",
            ),
            None => limited("too many users are reading member lists; retry in a second"),
        }
    }

    /// `read` for `user` within its allowances: of member rows for a read that lists
    /// members (`allow_member_reads`), and of log entries for one that returns them
    /// (`History`, `CatchUp`: `entries_read_per_sec`, with a burst of
    /// `ENTRIES_READ_BURST_SECS` seconds' worth). `RATE_LIMITED` while either is spent;
    /// a read allowed is served whole and charged after (`charge_read`).
    pub fn allow_read(&self, user: UserId, read: Read) -> Result<(), ErrorBody> {
        if read.lists_members() {
            self.allow_member_reads(user)?;
        }
        if !read.returns_entries() {
            return Ok(());
        }
        let (allowance, now) = (&self.entries, Instant::now());
        let limited = |msg| Err(ErrorBody::new(ErrorCode::RATE_LIMITED, msg));
        match allowance.with(user, now, |b| b.tokens_at(now, allowance.per_s, allowance.burst) > 0.0) {
            Some(true) => Ok(()),
            Some(false) => limited("reading history or catch-up pages too fast; retry in a moment"),
            None => limited("too many users are reading history; retry in a second"),
        }
    }

    /// Charges what `answer`, the answer to `read`, returned to `user`'s allowances
    /// (`allow_read`).
    pub fn charge_read(&self, user: UserId, read: Read, answer: &Reply) {
        self.charge_member_reads(user, read.rows(answer));
        let entries = read.entries(answer);
        if entries > 0 {
            let (allowance, now) = (&self.entries, Instant::now());
            allowance.with(user, now, |b| b.spend(now, allowance.per_s, allowance.burst, entries as f64));
        }
    }

    /// Whether `user` has spent its member-rows allowance (`allow_member_reads`), asked
    /// without adding the user to the allowances' table: for a request that is charged
    /// only for the work it wastes (`MarkDelivered`), which most users' never do.
    pub fn member_reads_spent(&self, user: UserId) -> bool {
        self.member_rows.spent(user, Instant::now())
    }

    /// Whether `user`'s member-rows allowance is down to half its burst or less: what is
    /// spent only on the user's behalf, not at its asking (its uploads' progress pushed
    /// to their conversations), waits while it is, so it seldom pushes the user's own
    /// reads into refusal (one such push reads up to about 6,000 rows, a sixth of the
    /// default burst; a review: progress fanned out to thousands of members kept the
    /// allowance at zero, and the uploader's catch-up pages were refused half the time).
    pub fn member_reads_below_half(&self, user: UserId) -> bool {
        self.member_rows.below(user, Instant::now(), 0.5)
    }

    /// Charges `rows` member rows read to `user`'s allowance (`allow_member_reads`).
    /// `false` when the charge could not be recorded: the table is full of users still
    /// refilling (`MEMBER_ROWS_BUCKETS_MAX`).
    pub fn charge_member_reads(&self, user: UserId, rows: usize) -> bool {
        if rows == 0 {
            return true;
        }
        let (allowance, now) = (&self.member_rows, Instant::now());
        allowance.with(user, now, |b| b.spend(now, allowance.per_s, allowance.burst, rows as f64)).is_some()
    }
}

/// A token bucket: `burst` tokens at most, refilled at a steady rate.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A bucket holding its whole burst.
    pub(crate) fn full(burst: f64, now: Instant) -> Self {
        TokenBucket { tokens: burst, at: now }
    }

    fn tokens_at(&self, now: Instant, per_s: f64, burst: f64) -> f64 {
        (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_s).min(burst)
    }

    /// Whether `take` would take a token now (nothing changes).
    pub(crate) fn has_token(&self, now: Instant, per_s: f64, burst: f64) -> bool {
        self.tokens_at(now, per_s, burst) >= 1.0
    }

    pub(crate) fn is_full(&self, now: Instant, per_s: f64, burst: f64) -> bool {
        self.tokens_at(now, per_s, burst) >= burst
    }

    /// Refills for the time since the last call, then spends `cost` tokens, into debt if
    /// it holds fewer (refilling pays the debt first).
    pub(crate) fn spend(&mut self, now: Instant, per_s: f64, burst: f64, cost: f64) {
        self.tokens = self.tokens_at(now, per_s, burst) - cost;
        self.at = now;
    }

    /// Refills for the time since the last call, then gives back one token taken (at
    /// most to a whole burst).
    pub(crate) fn give_back(&mut self, now: Instant, per_s: f64, burst: f64) {
        self.tokens = (self.tokens_at(now, per_s, burst) + 1.0).min(burst);
        self.at = now;
    }

    /// Refills for the time since the last call, then takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant, per_s: f64, burst: f64) -> bool {
        self.tokens = self.tokens_at(now, per_s, burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_store_slots_are_shared_while_held_and_swept_when_gone() {
        let users = UserDirectory::new(Arc::default(), 1000, 0, 1000);
        let alice = users.store_slots(1);
        assert!(Arc::ptr_eq(&alice, &users.store_slots(1)), "one set per user");
        assert!(!Arc::ptr_eq(&alice, &users.store_slots(2)), "apart from other users'");
        let permit = alice.clone().try_acquire_owned().unwrap();
        drop(alice);
        // A read still holding a slot keeps the set: a new session gets the same one.
        assert_eq!(users.store_slots(1).available_permits(), STORE_JOBS_PER_USER - 1);
        drop(permit);
        assert_eq!(users.store_slots(1).available_permits(), STORE_JOBS_PER_USER, "a fresh set");
        // Users gone leave no more than about twice the live entries behind.
        let live: Vec<_> = (0..10).map(|u| users.store_slots(u)).collect();
        for user in 100..5_000 {
            users.store_slots(user);
        }
        let entries = users.store_slots.lock().unwrap().by_user.len();
        assert!(entries <= 2 * 1024 + 1, "{entries} entries for {} live users", live.len());
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket { tokens: 3.0, at: start };
        assert!((0..3).all(|_| bucket.take(start, 1.0, 3.0)));
        assert!(!bucket.take(start, 1.0, 3.0), "the burst is spent");
        assert!(!bucket.take(start + Duration::from_millis(900), 1.0, 3.0));
        assert!(bucket.take(start + Duration::from_millis(1000), 1.0, 3.0), "a second refills one");
        // A long pause refills to the burst, no further.
        let later = start + Duration::from_secs(3600);
        assert!((0..3).all(|_| bucket.take(later, 1.0, 3.0)));
        assert!(!bucket.take(later, 1.0, 3.0));
        assert!(!bucket.is_full(later, 1.0, 3.0));
        assert!(bucket.is_full(later + Duration::from_secs(3), 1.0, 3.0));
    }

    #[test]
    fn spending_runs_into_debt_that_refilling_pays_first() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(30.0, start);
        bucket.spend(start, 3.0, 30.0, 27.0);
        assert!(bucket.tokens_at(start, 3.0, 30.0) > 0.0, "3 rows left");
        bucket.spend(start, 3.0, 30.0, 1000.0);
        assert_eq!(bucket.tokens_at(start, 3.0, 30.0), -997.0, "one large read runs into debt");
        let later = start + Duration::from_secs(332);
        assert!(bucket.tokens_at(later, 3.0, 30.0) < 0.0, "332 s repay 996 rows");
        assert!(bucket.tokens_at(later + Duration::from_secs(1), 3.0, 30.0) > 0.0);
    }

    /// What is spent on a user's behalf (its uploads' progress to their conversations)
    /// waits once its member rows are down to half their burst, not only once spent:
    /// that kept its own reads refused half the time (a review).
    #[test]
    fn member_reads_count_as_below_half_from_half_the_burst_down() {
        // 2 rows a second, a burst of 4: a row's margin either side is half a second.
        let users = UserDirectory::new(Arc::default(), 2, 0, 1000);
        assert_eq!(2.0 * MEMBER_ROWS_BURST_SECS, 4.0);
        assert!(!users.member_reads_below_half(1), "a user with no bucket has a full one");
        assert!(users.charge_member_reads(1, 1));
        assert!(!users.member_reads_below_half(1), "3 of 4 left");
        assert!(!users.member_reads_spent(1));
        assert!(users.charge_member_reads(1, 2));
        assert!(users.member_reads_below_half(1), "1 of 4 left");
        assert!(!users.member_reads_spent(1), "not spent: the user's own reads still go");
        assert!(!users.member_reads_below_half(2), "another user's bucket is its own");
    }

    #[test]
    fn a_users_places_are_reserved_before_authed_and_given_back() {
        let users = UserDirectory::new(Arc::default(), 1000, 0, 1000);
        let mut places: Vec<Reservation> = Vec::new();
        // A device proving itself takes at most its own share; a device being enrolled
        // (`None`) and other devices take the rest of the user's.
        for _ in 0..MAX_SESSIONS_PER_DEVICE {
            places.push(users.reserve(7, Some(1)).unwrap());
        }
        let refused = users.reserve(7, Some(1)).err().unwrap();
        assert_eq!((refused.code, refused.message.as_str()), (ErrorCode::RATE_LIMITED, TOO_MANY_DEVICE_CONNECTIONS));
        for i in MAX_SESSIONS_PER_DEVICE..MAX_SESSIONS_PER_USER {
            let device = if i % 2 == 0 { None } else { Some(2 + i as u64 / MAX_SESSIONS_PER_DEVICE as u64) };
            places.push(users.reserve(7, device).unwrap());
        }
        let refused = users.reserve(7, Some(99)).err().unwrap();
        assert_eq!((refused.code, refused.message.as_str()), (ErrorCode::RATE_LIMITED, TOO_MANY_CONNECTIONS));
        assert!(users.reserve(8, Some(1)).is_ok(), "another user has its own places");
        places.remove(0);
        let again = users.reserve(7, Some(1)).unwrap();
        drop((places, again));
        let reserved = users.reserved.lock().unwrap();
        assert!(reserved.by_user.is_empty() && reserved.by_device.is_empty());
    }
}
