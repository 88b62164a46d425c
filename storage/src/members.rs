//! Membership and the indexes read outside conversation actors: a conversation's member
//! keys, a user's conversation index, and `read_durable`, which serves them (and the
//! catalog) durable state only.

use std::sync::atomic::Ordering;

use switchboard_protocol::{ConvId, Role, UserId};

use crate::keys::{self, Key};
use crate::{Result, Store, corrupt, decode};

impl Store {
    /// Runs a write of keys read outside any conversation actor (catalog records, member
    /// and user-conversation indexes), counted so `read_durable` can tell whether what it
    /// read may not be durable yet.
    pub(crate) fn index_write<T>(&self, write: impl FnOnce() -> Result<T>) -> Result<T> {
        /// Counts the write finished even if it panics, so readers never wait forever.
        struct Finished<'a>(&'a std::sync::atomic::AtomicU64);
        impl Drop for Finished<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.index_gen.started.fetch_add(1, Ordering::SeqCst);
        let _finished = Finished(&self.index_gen.finished);
        write()
    }

    /// Runs `read` over the catalog and membership indexes so that it sees only durable
    /// writes: it waits until every index write begun so far is durable, reads, and reads
    /// again if another index write began meanwhile (a seqlock over the committer's
    /// durable generation). Readers outside conversation actors use this, so nobody is
    /// shown a conversation, member or account a crash could still take back (and a
    /// conversation id shown is never reused). Costs a group commit only when an index
    /// write is not yet durable.
    pub async fn read_durable<T>(&self, read: impl Fn(&Store) -> Result<T>) -> Result<T> {
        let mut attempts = 0;
        loop {
            let started = self.index_gen.started.load(Ordering::SeqCst);
            if self.index_gen.finished.load(Ordering::SeqCst) != started {
                // A write is being applied right now (a catalog batch waits for the
                // committer thread between flushes): let it finish.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                continue;
            }
            if self.index_gen.durable.load(Ordering::SeqCst) < started {
                self.barrier()?.await?;
            }
            let value = read(self)?;
            if self.index_gen.started.load(Ordering::SeqCst) == started {
                return Ok(value);
            }
            attempts += 1;
            if attempts > 64 {
                // Index writes without pause for this long: serve from the last barrier
                // rather than starve (each retry waited one group commit).
                tracing::warn!("read_durable gave up waiting for a quiet moment");
                return Ok(value);
            }
        }
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
