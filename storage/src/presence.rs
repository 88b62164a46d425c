//! Presence's one stored value: when each user was last seen. Like receipts, it is not a
//! log entry: a plain single-key write made durable by the next group commit (or the
//! clean shutdown's flush), never waited for. A crash may lose the newest value; the
//! previous one stays.

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

    /// Records when `user` was last online or away. Not waited for: durable with the next
    /// group commit. An older value than the stored one is ignored (clocks may step back).
    pub fn set_last_seen(&self, user: UserId, at_ms: u64) -> Result<()> {
        let key = Key::last_seen(user);
        self.db.fetch_and_update(&key, |old| {
            let old = old.and_then(keys::u64_from).unwrap_or(0);
            Some(old.max(at_ms).to_be_bytes().to_vec())
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{Store, StoreConfig};

    #[test]
    fn last_seen_survives_reopen_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = StoreConfig::new(dir.path().join("db"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        {
            let store = Store::open(&config).unwrap();
            assert_eq!(store.last_seen(7).unwrap(), None);
            store.set_last_seen(7, 1_000).unwrap();
            store.set_last_seen(7, 900).unwrap();
            assert_eq!(store.last_seen(7).unwrap(), Some(1_000));
            assert_eq!(store.last_seen(8).unwrap(), None, "per user");
            store.close_clean().unwrap();
        }
        let store = Store::open(&config).unwrap();
        assert_eq!(store.last_seen(7).unwrap(), Some(1_000));
    }
}
