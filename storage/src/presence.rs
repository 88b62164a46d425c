//! Presence's stored values: when each user was last seen, and who was connected when
//! the broker last stopped. Like receipts, they are not log entries: plain single-key
//! writes made durable by the next group commit (or the shutdown's flush), never waited
//! for. A crash may lose the newest value; the previous one stays.

use switchboard_protocol::UserId;

use crate::keys::{self, Key};
use crate::{Result, Store, corrupt};

impl Store {
    /// When `user` was last online or away, ms since the Unix epoch; `None` if never.
    pub fn last_seen(&self, user: UserId) -> Result<Option<u64>> {
        let key = Key::last_seen(user);
        match self.db.get(&key)? {
            Some(v) => Ok(Some(keys::u64_from(&v).ok_or_else(|| corrupt(key.as_ref(), "last seen"))?)),
            None => Ok(None),
        }
    }

    /// Records when `user` was last online or away, replacing the value stored. Not
    /// waited for: durable with the next group commit.
    ///
    /// Replacing, even with an earlier time: the broker writes a user's times in the
    /// order it learns them (now, once a minute, while a device is connected; once the
    /// last one is gone, when it was last heard from), and the last one is right. Before,
    /// the later of the two was kept: a device that died without closing was shown, once
    /// its timeout ended it, last seen at the refresh made while it was silent (up to the
    /// idle timeout after it was last heard), and a wall clock stepped forward and back
    /// kept every connected user seen in the future until the clock caught up (an attacker
    /// review).
    pub fn set_last_seen(&self, user: UserId, at_ms: u64) -> Result<()> {
        self.db.insert(Key::last_seen(user), &at_ms.to_be_bytes()[..])?;
        Ok(())
    }

    /// Records who had a device connected as the broker stops (`PresenceAtStop`),
    /// replacing any earlier record. Durable with the shutdown's flush.
    pub fn set_presence_at_stop(&self, at_stop: &PresenceAtStop) -> Result<()> {
        self.db.insert(Key::presence_at_stop(), crate::encode(at_stop))?;
        Ok(())
    }

    /// Reads and removes the record `set_presence_at_stop` left (`None` if there is
    /// none: no run made one, or this was read once already). The
    /// removal is durable with the next group commit; until then a crash may leave the
    /// record for the next start, whose `stopped_ms` shows how old it is.
    pub fn take_presence_at_stop(&self) -> Result<Option<PresenceAtStop>> {
        let key = Key::presence_at_stop();
        match self.db.remove(&key)? {
            Some(value) => Ok(Some(crate::decode(key.as_ref(), &value)?)),
            None => Ok(None),
        }
    }
}

/// Who had a device connected when the broker last stopped, or at its last record of
/// them before a crash (the broker makes one once a minute): the users, each with whether
/// all of its devices were away, and when. A record (postcard), about 9 bytes a user.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PresenceAtStop {
    /// When the broker stopped (or made the record), ms since the Unix epoch.
    pub stopped_ms: u64,
    /// `(user, away)`, ascending by user.
    pub users: Vec<(UserId, bool)>,
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreConfig};

    #[test]
    fn last_seen_survives_reopen_and_the_last_written_stands() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(dir.path().join("db"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        {
            let store = Store::open(&config).unwrap();
            assert_eq!(store.last_seen(7).unwrap(), None);
            // Written in the future by a clock stepped forward, then set right.
            store.set_last_seen(7, 86_400_000 + 1_000).unwrap();
            store.set_last_seen(7, 900).unwrap();
            assert_eq!(store.last_seen(7).unwrap(), Some(900));
            assert_eq!(store.last_seen(8).unwrap(), None, "per user");
            store.close_clean().unwrap();
        }
        let store = Store::open(&config).unwrap();
        assert_eq!(store.last_seen(7).unwrap(), Some(900));
    }

    /// The record of 100,000 users (about 600 KiB) is larger than a sled log message may
    /// be, so sled keeps it (with the leaf holding it) in a blob file of its own: that file
    /// and its directory are synced before the log points to it (patches/README.md,
    /// change 12; unpatched sled synced neither, and `sled::blob_syncs` does not exist).
    #[test]
    fn a_record_too_large_for_the_log_is_synced_in_its_own_file() {
        use super::PresenceAtStop;
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(dir.path().join("db"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        let users: Vec<(u64, bool)> = (0..100_000).map(|u| (1_000_000 + u * 7, u % 3 == 0)).collect();
        let at_stop = PresenceAtStop { stopped_ms: 1_700_000_000_000, users };
        {
            let store = Store::open(&config).unwrap();
            let before = sled::blob_syncs();
            store.set_presence_at_stop(&at_stop).unwrap();
            store.close_clean().unwrap();
            assert!(sled::blob_syncs() > before, "no blob file synced");
            let blobs = std::fs::read_dir(dir.path().join("db").join("blobs")).unwrap().count();
            assert!(blobs > 0, "kept in the log after all: the test no longer tests it");
        }
        let store = Store::open(&config).unwrap();
        assert_eq!(store.take_presence_at_stop().unwrap(), Some(at_stop));
    }

    #[test]
    fn presence_at_stop_survives_the_shutdown_and_is_read_once() {
        use super::PresenceAtStop;
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(dir.path().join("db"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        let at_stop = PresenceAtStop { stopped_ms: 1_700_000_000_000, users: vec![(3, false), (9, true)] };
        {
            let store = Store::open(&config).unwrap();
            assert_eq!(store.take_presence_at_stop().unwrap(), None);
            store.set_presence_at_stop(&at_stop).unwrap();
            store.close_clean().unwrap();
        }
        let store = Store::open(&config).unwrap();
        assert_eq!(store.take_presence_at_stop().unwrap(), Some(at_stop));
        assert_eq!(store.take_presence_at_stop().unwrap(), None, "read once");
        store.set_presence_at_stop(&PresenceAtStop::default()).unwrap();
        assert_eq!(store.take_presence_at_stop().unwrap(), Some(PresenceAtStop::default()), "nobody connected");
    }
}
