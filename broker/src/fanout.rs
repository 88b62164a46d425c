//! Who is online: user id to that user's connected sessions. Conversation actors read
//! it to fan an event out directly into each device's outbound queue, with no actor hop
//! per recipient; the user directory is the only writer, under its lock (attach and
//! detach), and closes a revoked device's or disabled account's sessions from it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use switchboard_protocol::{DeviceId, UserId};

use crate::outbound::{LatestKey, Outbound};

/// One connected device.
#[derive(Clone)]
pub struct SessionHandle {
    /// Unique per connection for the broker's lifetime.
    pub id: u64,
    /// Authenticated device.
    pub device: DeviceId,
    /// Its outbound queue.
    pub out: Arc<Outbound>,
    /// Its connection, for ephemeral events sent as QUIC datagrams.
    pub conn: quinn::Connection,
}

const SHARDS: usize = 16;

/// Sharded map so fan-out readers on both cores rarely touch the same lock.
pub struct Online {
    shards: Vec<RwLock<HashMap<UserId, Arc<[SessionHandle]>>>>,
}

impl Default for Online {
    fn default() -> Self {
        Online { shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect() }
    }
}

impl Online {
    fn shard(&self, user: UserId) -> &RwLock<HashMap<UserId, Arc<[SessionHandle]>>> {
        &self.shards[(user as usize) % SHARDS]
    }

    /// Adds a session of `user`.
    pub fn add(&self, user: UserId, session: SessionHandle) {
        let mut map = self.shard(user).write().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<SessionHandle> = map.get(&user).map(|l| l.to_vec()).unwrap_or_default();
        list.push(session);
        map.insert(user, list.into());
    }

    /// Removes session `id` of `user` (no-op if absent).
    pub fn remove(&self, user: UserId, id: u64) {
        let mut map = self.shard(user).write().unwrap_or_else(|p| p.into_inner());
        let Some(list) = map.get(&user) else { return };
        let kept: Vec<SessionHandle> = list.iter().filter(|s| s.id != id).cloned().collect();
        if kept.is_empty() {
            map.remove(&user);
        } else {
            map.insert(user, kept.into());
        }
    }

    /// The sessions of `user` now.
    pub fn sessions(&self, user: UserId) -> Option<Arc<[SessionHandle]>> {
        self.shard(user).read().unwrap_or_else(|p| p.into_inner()).get(&user).cloned()
    }

    /// Queues `frame` on every session of every user in `users` except session `skip`.
    /// A full queue disconnects that device only. Returns the number of queued copies.
    pub fn deliver(&self, users: &[UserId], frame: &Bytes, skip: u64) -> usize {
        let mut delivered = 0;
        for &user in users {
            let Some(sessions) = self.sessions(user) else { continue };
            for s in sessions.iter().filter(|s| s.id != skip) {
                if s.out.push(frame.clone()).is_ok() {
                    delivered += 1;
                }
            }
        }
        delivered
    }

    /// Puts `frame`, the latest value of `key` (a file's progress), on every session of
    /// every user in `users`: it replaces a value of `key` not yet written, and never
    /// disconnects a device (`Outbound::push_latest`). With `last` (a final state) it is
    /// queued like any event instead, dropping the file's values waiting (every
    /// audience's, `Outbound::push_last`). Returns the number of
    /// sessions reached.
    pub fn deliver_latest(&self, users: &[UserId], key: LatestKey, frame: &Bytes, last: bool) -> usize {
        let mut delivered = 0;
        for &user in users {
            let Some(sessions) = self.sessions(user) else { continue };
            for s in sessions.iter() {
                let sent = if last {
                    s.out.push_last(key.0, frame.clone()).is_ok()
                } else {
                    s.out.push_latest(key, frame.clone()).unwrap_or(false)
                };
                delivered += usize::from(sent);
            }
        }
        delivered
    }

    /// Sends an ephemeral event frame (typing) to every session of every user in
    /// `users`: as one QUIC datagram where the device enabled datagrams and the frame
    /// fits, else queued like any event. A datagram may be lost, and one that finds quinn's
    /// send buffer full pushes out the oldest queued one: only typing starts go this way
    /// (a start lost is not shown; stops go by `deliver`). Returns the number of copies
    /// sent or queued.
    pub fn deliver_ephemeral(&self, users: &[UserId], frame: &Bytes) -> usize {
        let mut delivered = 0;
        for &user in users {
            let Some(sessions) = self.sessions(user) else { continue };
            for s in sessions.iter() {
                let fits = s.conn.max_datagram_size().is_some_and(|max| max >= frame.len());
                let sent = if fits { s.conn.send_datagram(frame.clone()).is_ok() } else { false };
                if sent || s.out.push(frame.clone()).is_ok() {
                    delivered += 1;
                }
            }
        }
        delivered
    }

    /// Closes every session with `code` (shutdown).
    pub fn close_all(&self, code: switchboard_protocol::ErrorCode) {
        for shard in &self.shards {
            for list in shard.read().unwrap_or_else(|p| p.into_inner()).values() {
                for s in list.iter() {
                    s.out.close(code);
                }
            }
        }
    }
}
