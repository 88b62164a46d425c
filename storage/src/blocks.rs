//! Users a user blocks (`Block`): one key per pair (`BLOCK | blocker | blocked`, no
//! value), a single-key write riding the next group commit. Enforcement reads one key:
//! whether `a` blocks `b`.

use switchboard_protocol::UserId;

use crate::keys::{self, Key};
use crate::{Durable, Result, Store, corrupt};

/// What `Store::set_block` did.
#[derive(Debug)]
pub enum BlockChange {
    /// Written; durable when the future resolves.
    Done(Durable),
    /// It held already (blocking what is blocked, unblocking what is not): nothing
    /// written; what was written of it is durable when the future resolves.
    Same(Durable),
    /// Refused: the blocker blocks the most users allowed already.
    Full,
}

impl Store {
    /// Whether `blocker` blocks `blocked`. One point read.
    pub fn blocks(&self, blocker: UserId, blocked: UserId) -> Result<bool> {
        Ok(self.db.contains_key(Key::block(blocker, blocked))?)
    }

    /// Whether either of `a` and `b` blocks the other.
    pub fn blocked_between(&self, a: UserId, b: UserId) -> Result<bool> {
        Ok(self.blocks(a, b)? || self.blocks(b, a)?)
    }

    /// The users `blocker` blocks, ascending by id, at most `limit`.
    pub fn blocked_users(&self, blocker: UserId, limit: usize) -> Result<Vec<UserId>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::blocks_of(blocker)).keys().take(limit) {
            let k = item?;
            out.push(keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "block key"))?);
        }
        Ok(out)
    }

    /// Makes `blocker` block `blocked` (or stop, with `block` false). A new block beyond
    /// `max` blocked users is `Full`; unblocking and blocking again what is blocked always
    /// go through. Counted and written under the catalog lock, so concurrent blocks of
    /// one user cannot pass `max` together.
    pub fn set_block(&self, blocker: UserId, blocked: UserId, block: bool, max: usize) -> Result<BlockChange> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let key = Key::block(blocker, blocked);
        if block
            && !self.db.contains_key(&key)?
            && self.db.scan_prefix(Key::blocks_of(blocker)).keys().take(max).count() >= max
        {
            return Ok(BlockChange::Full);
        }
        let changed = if block {
            self.index_write(|| Ok(self.db.insert(&key, &[][..])?.is_none()))?
        } else {
            self.index_write(|| Ok(self.db.remove(&key)?.is_some()))?
        };
        let durable = self.barrier()?;
        Ok(if changed { BlockChange::Done(durable) } else { BlockChange::Same(durable) })
    }
}

#[cfg(test)]
mod tests {
    use super::BlockChange;

    #[test]
    fn a_block_is_one_way_bounded_and_undone() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::tests::open(dir.path());
        assert!(matches!(store.set_block(1, 2, true, 2).unwrap(), BlockChange::Done(_)));
        assert!(store.blocks(1, 2).unwrap());
        assert!(!store.blocks(2, 1).unwrap(), "one way");
        assert!(store.blocked_between(2, 1).unwrap());
        assert!(matches!(store.set_block(1, 3, true, 2).unwrap(), BlockChange::Done(_)));
        assert!(matches!(store.set_block(1, 4, true, 2).unwrap(), BlockChange::Full));
        assert!(matches!(store.set_block(1, 3, true, 2).unwrap(), BlockChange::Same(_)), "again: no new key");
        assert!(matches!(store.set_block(1, 5, false, 2).unwrap(), BlockChange::Same(_)), "never blocked");
        assert_eq!(store.blocked_users(1, 10).unwrap(), [2, 3]);
        assert!(matches!(store.set_block(1, 2, false, 2).unwrap(), BlockChange::Done(_)));
        assert!(!store.blocks(1, 2).unwrap());
        assert!(matches!(store.set_block(1, 4, true, 2).unwrap(), BlockChange::Done(_)), "room again");
        assert_eq!(store.blocked_users(1, 10).unwrap(), [3, 4]);
        assert!(store.blocked_users(2, 10).unwrap().is_empty());
    }
}
