//! The user actor: one per user with at least one online device. It owns that user's
//! sessions (and will own the presence aggregate across them); it publishes them in
//! `Online` for fan-out and closes a device's connections when it is revoked.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use switchboard_protocol::{DeviceId, ErrorCode, UserId};

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
pub struct User {
    online: Arc<Online>,
}

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
            UserMsg::Attach(session) => {
                self.online.add(state.user, session.clone());
                state.sessions.push(session);
            }
            UserMsg::Detach(id) => {
                self.online.remove(state.user, id);
                state.sessions.retain(|s| s.id != id);
            }
            UserMsg::Revoke(device) => {
                for s in state.sessions.iter().filter(|s| s.device == device) {
                    s.out.close(ErrorCode::DEVICE_REVOKED);
                }
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<UserMsg>, state: &mut UserState) -> Result<(), ActorProcessingErr> {
        for s in &state.sessions {
            self.online.remove(state.user, s.id);
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

    /// Registers a connected session.
    pub async fn attach(&self, user: UserId, session: SessionHandle) -> anyhow::Result<()> {
        let mut map = self.map.lock().await;
        let entry = match map.remove(&user) {
            Some(e) => e,
            None => {
                let (actor, _) = Actor::spawn(None, User { online: self.online.clone() }, user).await?;
                (actor, 0)
            }
        };
        let (actor, count) = entry;
        actor.cast(UserMsg::Attach(session))?;
        map.insert(user, (actor, count + 1));
        Ok(())
    }

    /// Unregisters a session; the last one stops the user's actor.
    pub async fn detach(&self, user: UserId, session: u64) {
        let mut map = self.map.lock().await;
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
