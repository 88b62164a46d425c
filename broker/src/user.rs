//! The user directory: who is online with how many sessions, each user's places for
//! connections still in their handshake, and per-user allowances that outlive a
//! connection. It keeps the `Online` fan-out index in step with attach and detach.
//!
//! There is no per-user actor: everything a user's actor held now lives where it is
//! used (sessions in `Online`, presence in its driver, typing in its own), and an idle
//! ractor actor per online user cost about 6 KB (four channels and a task) of the
//! broker's 40 KB budget per idle connection, and a spawn per first login.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_protocol::{DeviceId, ErrorBody, ErrorCode, UserId};

use crate::limits::{
    CONVERSATION_CREATE_BURST, CONVERSATION_CREATE_PER_S, CREATION_BUCKETS_MAX, MAX_SESSIONS_PER_USER,
};

use crate::fanout::{Online, SessionHandle};

/// Online users with their session counts. Attach, detach and the closing of a user's
/// connections run under the directory's lock, so a close finds in `Online` every
/// session attached before it; a session attached after it was stored finds the revoked
/// device or disabled account when it checks the store again after attaching (the
/// session task does, before it serves anything), so no session outlives either.
pub struct UserDirectory {
    /// Attached sessions per online user.
    sessions: Mutex<HashMap<UserId, usize>>,
    /// Places taken by handshakes that have not attached yet (see `reserve`).
    reserved: Arc<Mutex<HashMap<UserId, usize>>>,
    online: Arc<Online>,
    creations: Mutex<Creations>,
}

/// A place among a user's sessions, taken during the handshake before `Authed` is sent
/// (and before a login enrolls anything), so a connection beyond
/// `MAX_SESSIONS_PER_USER` is refused as a handshake failure, never after it was told
/// it is authenticated. `attach` turns it into a session; dropped, it is given back.
pub struct Reservation {
    user: UserId,
    reserved: Arc<Mutex<HashMap<UserId, usize>>>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = reserved.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                reserved.remove(&self.user);
            }
        }
    }
}

/// Conversation-creation allowances of users who created recently, online or not (so
/// reconnecting does not refill one). At most `CREATION_BUCKETS_MAX`; when it is full,
/// refilled buckets are dropped (see `allow_creation`).
#[derive(Default)]
struct Creations {
    buckets: HashMap<UserId, TokenBucket>,
    /// When `buckets` was last pruned.
    pruned: Option<Instant>,
}

impl UserDirectory {
    /// An empty directory publishing into `online`.
    pub fn new(online: Arc<Online>) -> Self {
        UserDirectory { sessions: Mutex::default(), reserved: Arc::default(), online, creations: Mutex::default() }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, usize>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a place among `user`'s sessions for a connection in its handshake, or
    /// `OVERLOADED` if its sessions and the places already taken reach
    /// `MAX_SESSIONS_PER_USER`.
    pub fn reserve(&self, user: UserId) -> Result<Reservation, ErrorBody> {
        let sessions = self.sessions();
        let attached = sessions.get(&user).copied().unwrap_or(0);
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let taken = reserved.get(&user).copied().unwrap_or(0);
        if attached + taken >= MAX_SESSIONS_PER_USER {
            return Err(ErrorBody::new(ErrorCode::OVERLOADED, "too many connections for this user"));
        }
        reserved.insert(user, taken + 1);
        Ok(Reservation { user, reserved: self.reserved.clone() })
    }

    /// Registers a connected session in the place `reserve` took for it.
    pub fn attach(&self, place: Reservation, session: SessionHandle) -> Result<(), ErrorBody> {
        let user = place.user;
        let mut sessions = self.sessions();
        let attached = sessions.entry(user).or_insert(0);
        if *attached >= MAX_SESSIONS_PER_USER {
            return Err(ErrorBody::new(ErrorCode::OVERLOADED, "too many connections for this user"));
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

    /// Closes the live connections of a revoked device.
    ///
    /// Their outbound queues are closed before this returns, so a revocation answered
    /// `Done` has already cut the device off: nothing more reaches it and its connection
    /// is closing.
    pub fn revoke(&self, user: UserId, device: DeviceId) {
        self.close(user, Some(device), ErrorCode::DEVICE_REVOKED);
    }

    /// Closes every live connection of a disabled account (`ACCOUNT_DISABLED`), the same
    /// way as `revoke`.
    pub fn disable(&self, user: UserId) {
        self.close(user, None, ErrorCode::ACCOUNT_DISABLED);
    }

    fn close(&self, user: UserId, device: Option<DeviceId>, code: ErrorCode) {
        let _attaching = self.sessions();
        tracing::debug!(user, ?device, %code, "closing connections");
        for s in self.online.sessions(user).iter().flat_map(|s| s.iter()) {
            if device.is_none_or(|d| s.device == d) {
                s.out.close(code);
            }
        }
    }

    /// Takes one conversation creation (or one `Block` change, which rebuilds presence
    /// contact sets: both are rare acts of a person) from `user`'s allowance, or says
    /// `RATE_LIMITED`. The allowance is shared by all of the user's connections and
    /// outlives them.
    pub fn allow_creation(&self, user: UserId) -> Result<(), ErrorBody> {
        let (now, rate, burst) = (Instant::now(), CONVERSATION_CREATE_PER_S, CONVERSATION_CREATE_BURST);
        let limited = |msg| Err(ErrorBody::new(ErrorCode::RATE_LIMITED, msg));
        let mut creations = self.creations.lock().unwrap_or_else(|p| p.into_inner());
        let Creations { buckets, pruned } = &mut *creations;
        if buckets.len() >= CREATION_BUCKETS_MAX && !buckets.contains_key(&user) {
            // A full bucket is the same as none. Pruning walks the whole map, so at most
            // once a second; until then, and if nothing was full, new users wait.
            if pruned.is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1)) {
                *pruned = Some(now);
                buckets.retain(|_, b| !b.is_full(now, rate, burst));
            }
            if buckets.len() >= CREATION_BUCKETS_MAX {
                return limited("too many users are creating conversations; retry in a second");
            }
        }
        let bucket = buckets.entry(user).or_insert(TokenBucket { tokens: burst, at: now });
        if bucket.take(now, rate, burst) {
            Ok(())
        } else {
            limited("creating conversations or blocking users too fast; retry in a second")
        }
    }

    /// Gives back a creation `allow_creation` granted but nothing was created for.
    pub fn refund_creation(&self, user: UserId) {
        let mut creations = self.creations.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = creations.buckets.get_mut(&user) {
            bucket.tokens = (bucket.tokens + 1.0).min(CONVERSATION_CREATE_BURST);
        }
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

    pub(crate) fn is_full(&self, now: Instant, per_s: f64, burst: f64) -> bool {
        self.tokens_at(now, per_s, burst) >= burst
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
    fn a_users_places_are_reserved_before_authed_and_given_back() {
        let users = UserDirectory::new(Arc::default());
        let mut places: Vec<Reservation> = Vec::new();
        for _ in 0..MAX_SESSIONS_PER_USER {
            places.push(users.reserve(7).unwrap());
        }
        assert_eq!(users.reserve(7).err().unwrap().code, ErrorCode::OVERLOADED);
        assert!(users.reserve(8).is_ok(), "another user has its own places");
        places.pop();
        let again = users.reserve(7).unwrap();
        drop((places, again));
        assert!(users.reserved.lock().unwrap().is_empty());
    }
}
