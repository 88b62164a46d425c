//! The user actor and its directory. One actor per user with at least one online
//! device; the directory also keeps the `Online` fan-out index in step with attach and
//! detach.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use switchboard_protocol::{DeviceId, ErrorBody, ErrorCode, UserId};

use crate::limits::{
    CONVERSATION_CREATE_BURST, CONVERSATION_CREATE_PER_S, CREATION_BUCKETS_MAX, MAX_SESSIONS_PER_USER,
};
use crate::reply::internal;

use crate::fanout::{Online, SessionHandle};

/// Messages to a user actor.
pub enum UserMsg {
    /// A device connected.
    Attach(SessionHandle),
    /// A connection ended.
    Detach(u64),
    /// Close connections with `code`: one device's, or all of the user's (`None`).
    Close {
        /// The device, or every device.
        device: Option<DeviceId>,
        /// The close code.
        code: ErrorCode,
    },
}

/// The user actor.
pub struct User;

/// Actor state.
pub struct UserState {
    user: UserId,
    sessions: Vec<SessionHandle>,
}

impl Actor for User {
    type Msg = UserMsg;
    type State = UserState;
    type Arguments = UserId;

    async fn pre_start(&self, _myself: ActorRef<UserMsg>, user: UserId) -> Result<UserState, ActorProcessingErr> {
        Ok(UserState { user, sessions: Vec::new() })
    }

    async fn handle(
        &self,
        _myself: ActorRef<UserMsg>,
        msg: UserMsg,
        state: &mut UserState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            UserMsg::Attach(session) => state.sessions.push(session),
            UserMsg::Detach(id) => state.sessions.retain(|s| s.id != id),
            UserMsg::Close { device, code } => {
                tracing::debug!(user = state.user, ?device, %code, "closing connections");
                for s in state.sessions.iter().filter(|s| device.is_none_or(|d| s.device == d)) {
                    s.out.close(code);
                }
            }
        }
        Ok(())
    }
}

/// An online user's entry: its actor and how many sessions it has.
struct Live {
    actor: ActorRef<UserMsg>,
    sessions: usize,
}

/// Live user actors with their session counts. Counting under the directory lock means
/// the last detach stops the actor and a later attach starts a fresh one, with no
/// message ever sent to a stopping actor.
pub struct UserDirectory {
    map: tokio::sync::Mutex<HashMap<UserId, Live>>,
    /// Places taken by handshakes that have not attached yet (see `reserve`).
    reserved: Arc<std::sync::Mutex<HashMap<UserId, usize>>>,
    online: Arc<Online>,
    creations: std::sync::Mutex<Creations>,
}

/// A place among a user's sessions, taken during the handshake before `Authed` is sent
/// (and before a login enrolls anything), so a connection beyond
/// `MAX_SESSIONS_PER_USER` is refused as a handshake failure, never after it was told
/// it is authenticated. `attach` turns it into a session; dropped, it is given back.
pub struct Reservation {
    user: UserId,
    reserved: Arc<std::sync::Mutex<HashMap<UserId, usize>>>,
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
        UserDirectory {
            map: tokio::sync::Mutex::new(HashMap::new()),
            reserved: Arc::default(),
            online,
            creations: std::sync::Mutex::default(),
        }
    }

    /// Takes a place among `user`'s sessions for a connection in its handshake, or
    /// `OVERLOADED` if its sessions and the places already taken reach
    /// `MAX_SESSIONS_PER_USER`.
    pub async fn reserve(&self, user: UserId) -> Result<Reservation, ErrorBody> {
        let map = self.map.lock().await;
        let sessions = map.get(&user).map_or(0, |live| live.sessions);
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let taken = reserved.get(&user).copied().unwrap_or(0);
        if sessions + taken >= MAX_SESSIONS_PER_USER {
            return Err(ErrorBody::new(ErrorCode::OVERLOADED, "too many connections for this user"));
        }
        reserved.insert(user, taken + 1);
        Ok(Reservation { user, reserved: self.reserved.clone() })
    }

    /// Registers a connected session in the place `reserve` took for it.
    pub async fn attach(&self, place: Reservation, session: SessionHandle) -> Result<(), ErrorBody> {
        let user = place.user;
        let mut map = self.map.lock().await;
        if map.get(&user).is_some_and(|live| live.sessions >= MAX_SESSIONS_PER_USER) {
            return Err(ErrorBody::new(ErrorCode::OVERLOADED, "too many connections for this user"));
        }
        let mut live = match map.remove(&user) {
            Some(live) => live,
            None => {
                let (actor, _) = Actor::spawn(None, User, user).await.map_err(internal)?;
                Live { actor, sessions: 0 }
            }
        };
        self.online.add(user, session.clone());
        if live.actor.cast(UserMsg::Attach(session)).is_err() {
            tracing::error!(user, "user actor is gone");
        }
        live.sessions += 1;
        map.insert(user, live);
        // Given back under the map lock: the session now counts instead.
        drop(place);
        Ok(())
    }

    /// Unregisters a session; the last one stops the user's actor.
    pub async fn detach(&self, user: UserId, session: u64) {
        let mut map = self.map.lock().await;
        self.online.remove(user, session);
        let Some(mut live) = map.remove(&user) else { return };
        let _ = live.actor.cast(UserMsg::Detach(session));
        if live.sessions > 1 {
            live.sessions -= 1;
            map.insert(user, live);
        } else {
            live.actor.stop(None);
        }
    }

    /// Closes the live connections of a revoked device.
    ///
    /// Their outbound queues are closed before this returns (through the `Online` index,
    /// not a message to the user actor), so a revocation answered `Done` has already cut
    /// the device off: nothing more reaches it and its connection is closing.
    pub async fn revoke(&self, user: UserId, device: DeviceId) {
        self.close(user, Some(device), ErrorCode::DEVICE_REVOKED).await;
    }

    /// Closes every live connection of a disabled account (`ACCOUNT_DISABLED`), the same
    /// way as `revoke`.
    pub async fn disable(&self, user: UserId) {
        self.close(user, None, ErrorCode::ACCOUNT_DISABLED).await;
    }

    async fn close(&self, user: UserId, device: Option<DeviceId>, code: ErrorCode) {
        if let Some(sessions) = self.online.sessions(user) {
            for s in sessions.iter().filter(|s| device.is_none_or(|d| s.device == d)) {
                s.out.close(code);
            }
        }
        if let Some(live) = self.map.lock().await.get(&user) {
            let _ = live.actor.cast(UserMsg::Close { device, code });
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

    #[tokio::test]
    async fn a_users_places_are_reserved_before_authed_and_given_back() {
        let users = UserDirectory::new(Arc::default());
        let mut places: Vec<Reservation> = Vec::new();
        for _ in 0..MAX_SESSIONS_PER_USER {
            places.push(users.reserve(7).await.unwrap());
        }
        assert_eq!(users.reserve(7).await.err().unwrap().code, ErrorCode::OVERLOADED);
        assert!(users.reserve(8).await.is_ok(), "another user has its own places");
        places.pop();
        let again = users.reserve(7).await.unwrap();
        drop((places, again));
        assert!(users.reserved.lock().unwrap().is_empty());
    }
}
