//! Membership and the indexes read outside conversation actors: a conversation's member
//! keys, a user's conversation index, and `index_barrier`, which makes readers of them
//! (and of the catalog) serve durable state only.

use std::sync::atomic::Ordering;

use switchboard_protocol::{ConvId, Role, Seq, UserId};

use crate::commit::IndexGen;
use crate::keys::{self, Key};
use crate::{Durable, Result, Store, corrupt, decode};

/// Runs `write` counted in `generation`: begun before, finished after (even if it panics, so
/// readers never wait forever).
fn counted_write<T>(generation: &IndexGen, write: impl FnOnce() -> Result<T>) -> Result<T> {
    struct Finished<'a>(&'a std::sync::atomic::AtomicU64);
    impl Drop for Finished<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    generation.started.fetch_add(1, Ordering::SeqCst);
    let _finished = Finished(&generation.finished);
    write()
}

impl Store {
    /// Runs a write of keys read outside any conversation actor (catalog records, member
    /// and user-conversation indexes), counted so `index_barrier` can tell whether what
    /// it read may not be durable yet.
    pub(crate) fn index_write<T>(&self, write: impl FnOnce() -> Result<T>) -> Result<T> {
        counted_write(&self.index_gen, write)
    }

    /// Runs a write of receipt watermarks or settings, counted for `watermark_barrier`.
    pub(crate) fn watermark_write<T>(&self, write: impl FnOnce() -> Result<T>) -> Result<T> {
        counted_write(&self.watermark_gen, write)
    }

    /// Call right after reading the catalog or membership indexes (a conversation list,
    /// a summary): `None` if everything read is durable, else a barrier to await before
    /// serving it. Whatever the read saw was applied before this call, so a commit that
    /// begins after it covers all of it; and when every index write begun so far is
    /// already covered by a finished commit, nothing needs to wait. So nobody is shown a
    /// conversation, member or account that a crash could still take back (and a
    /// conversation id shown is never reused), at the cost of at most one group commit.
    pub fn index_barrier(&self) -> Result<Option<Durable>> {
        self.barrier_unless_durable(&[&self.index_gen])
    }

    /// As `index_barrier`, for a read that also saw receipt watermarks or settings.
    pub fn watermark_barrier(&self) -> Result<Option<Durable>> {
        self.barrier_unless_durable(&[&self.index_gen, &self.watermark_gen])
    }

    fn barrier_unless_durable(&self, gens: &[&IndexGen]) -> Result<Option<Durable>> {
        let behind = gens.iter().any(|g| g.durable.load(Ordering::SeqCst) < g.started.load(Ordering::SeqCst));
        if !behind {
            return Ok(None);
        }
        Ok(Some(self.barrier()?))
    }

    /// A conversation's number of members: one key read (`Key::member_count`). A
    /// conversation whose membership has not changed since a data dir from before that
    /// key has none: its member keys are counted then (`count_member_keys`). Before,
    /// every summary counted them, so a page of 200 large groups read 200,000 keys.
    pub fn member_count(&self, id: ConvId) -> Result<usize> {
        match self.db.get(Key::member_count(id))? {
            Some(raw) => Ok(keys::u64_from(&raw).ok_or_else(|| corrupt(&raw, "member count"))? as usize),
            None => self.count_member_keys(id),
        }
    }

    /// Format 6: writes every conversation's member count (`Key::member_count`).
    pub(crate) fn upgrade_to_format_6(&self) -> Result<()> {
        if self.stored_format()? >= 6 {
            return Ok(());
        }
        let mut counted = 0usize;
        for item in self.db.scan_prefix(Key::conversations()) {
            let (k, _) = item?;
            let conv = k.get(1..9).and_then(keys::u64_from).ok_or_else(|| corrupt(&k, "conversation key"))?;
            self.db.insert(Key::member_count(conv), &(self.count_member_keys(conv)? as u64).to_be_bytes()[..])?;
            counted += 1;
        }
        self.db.insert(Key::format(), &6u64.to_be_bytes()[..])?;
        if counted > 0 {
            tracing::info!(conversations = counted, "counted each conversation's members for format 6");
        }
        Ok(())
    }

    /// Counts a conversation's member keys (nothing decoded).
    pub(crate) fn count_member_keys(&self, id: ConvId) -> Result<usize> {
        let mut n = 0;
        for item in self.db.scan_prefix(Key::members_of(id)) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Members of a conversation, by user id.
    pub fn members(&self, id: ConvId) -> Result<Vec<(UserId, Role)>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::members_of(id)) {
            let (k, v) = item?;
            let user = keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "member key"))?;
            out.push((user, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// `user`'s role in a conversation, if a member.
    pub fn member(&self, conv: ConvId, user: UserId) -> Result<Option<Role>> {
        self.get(Key::member(conv, user))
    }

    /// Conversations `user` belongs to, ascending, strictly after `after`, at most `limit`.
    /// The seq of the entry that made `user` a member of `conv` (its creation counts as
    /// 0: a creator and the first members hold the whole log), or `None` if `user` is
    /// not a member. Index entries written before this was recorded read as 0.
    pub fn joined_at(&self, user: UserId, conv: ConvId) -> Result<Option<Seq>> {
        let key = Key::user_conv(user, conv);
        Ok(self.db.get(&key)?.map(|v| keys::u64_from(&v).unwrap_or(0)))
    }

    pub fn user_conversations(&self, user: UserId, after: Option<ConvId>, limit: usize) -> Result<Vec<ConvId>> {
        let start = Key::user_conv(user, after.map_or(0, |a| a.saturating_add(1)));
        let end = Key::user_conv_end(user);
        let mut out = Vec::new();
        for item in self.db.range(start.as_ref()..end.as_ref()).take(limit) {
            let (k, _) = item?;
            out.push(keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "user conv key"))?);
        }
        Ok(out)
    }
}
