//! The user actor and its directory. One actor per user with at least one online
//! device; the directory also keeps the `Online` fan-out index in step with attach and
//! detach.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use switchboard_protocol::{DeviceId, ErrorBody, ErrorCode, UserId};

use crate::limits::MAX_SESSIONS_PER_USER;
use crate::reply::internal;

use crate::online::{Online, SessionHandle};

/// Messages to a user actor.
pub enum UserMsg {
    /// A device connected.
    Attach(SessionHandle),
    /// A connection ended.
    Detach(u64),
    /// A device was revoked: close its connections.
    Revoke(DeviceId),
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
            UserMsg::Revoke(device) => {
                tracing::debug!(user = state.user, device, "closing a revoked device's connections");
                for s in state.sessions.iter().filter(|s| s.device == device) {
                    s.out.close(ErrorCode::DEVICE_REVOKED);
                }
            }
        }
        Ok(())
    }
}

/// Live user actors with their session counts. Counting under the directory lock means
/// the last detach stops the actor and a later attach starts a fresh one, with no
/// message ever sent to a stopping actor.
pub struct UserDirectory {
    map: tokio::sync::Mutex<HashMap<UserId, (ActorRef<UserMsg>, usize)>>,
    online: Arc<Online>,
}

impl UserDirectory {
    /// An empty directory publishing into `online`.
    pub fn new(online: Arc<Online>) -> Self {
        UserDirectory { map: tokio::sync::Mutex::new(HashMap::new()), online }
    }

    /// Registers a connected session; refuses one beyond `MAX_SESSIONS_PER_USER`.
    pub async fn attach(&self, user: UserId, session: SessionHandle) -> Result<(), ErrorBody> {
        let mut map = self.map.lock().await;
        if map.get(&user).is_some_and(|(_, count)| *count >= MAX_SESSIONS_PER_USER) {
            return Err(ErrorBody::new(ErrorCode::OVERLOADED, "too many connections for this user"));
        }
        let entry = match map.remove(&user) {
            Some(e) => e,
            None => {
                let (actor, _) = Actor::spawn(None, User, user).await.map_err(internal)?;
                (actor, 0)
            }
        };
        let (actor, count) = entry;
        self.online.add(user, session.clone());
        if actor.cast(UserMsg::Attach(session)).is_err() {
            tracing::error!(user, "user actor is gone");
        }
        map.insert(user, (actor, count + 1));
        Ok(())
    }

    /// Unregisters a session; the last one stops the user's actor.
    pub async fn detach(&self, user: UserId, session: u64) {
        let mut map = self.map.lock().await;
        self.online.remove(user, session);
        let Some((actor, count)) = map.remove(&user) else { return };
        let _ = actor.cast(UserMsg::Detach(session));
        if count > 1 {
            map.insert(user, (actor, count - 1));
        } else {
            actor.stop(None);
        }
    }

    /// Closes the live connections of a revoked device.
    pub async fn revoke(&self, user: UserId, device: DeviceId) {
        if let Some((actor, _)) = self.map.lock().await.get(&user) {
            let _ = actor.cast(UserMsg::Revoke(device));
        }
    }
}
