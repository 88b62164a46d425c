//! Switchboard's store: one sled tree with prefixed big-endian keys, and a group
//! committer that makes writes durable before anyone acknowledges them.
//!
//! Only this crate touches sled. A write is reported durable only after a sled flush
//! *and* an fdatasync of sled's data file that both began after the write was applied
//! (see `commit.rs`).
//!
//! Conversation entries (messages, edits, deletes, membership changes) are written entry
//! first, then what the entry implies, as single-key writes: see `append_then` for why
//! that is crash-safe and why it is not a sled batch. Catalog changes (users, devices,
//! a new conversation with its members, counters and direct-pair index) are one atomic
//! sled batch each (`Txn`), applied by the committer thread between flushes.

mod commit;
mod keys;
mod records;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use switchboard_protocol::{Body, ClientMsgId, ConvId, DeviceId, Entry, Role, Seq, UserId};

pub use commit::{Durable, FailureHook};
pub use records::{ConversationRecord, DeviceRecord, UserRecord};

use commit::{Committer, IndexGen};
use keys::Key;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an error (I/O, corruption).
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value did not decode; the data dir is damaged or from a newer version.
    #[error("corrupt record under {key}: {detail}")]
    Corrupt {
        /// Hex of the key.
        key: String,
        /// Decoder message.
        detail: String,
    },
    /// flush or fdatasync failed: the writes since the last good flush are not durable.
    #[error("durability failure: {0}")]
    NotDurable(String),
    /// The store is closed.
    #[error("store closed")]
    Closed,
    /// A unique name is already taken.
    #[error("already exists")]
    Conflict,
    /// A per-owner limit (e.g. devices per user) is reached.
    #[error("limit reached")]
    LimitReached,
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Knobs set explicitly at open; see `StoreConfig::default` for the reasons.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// sled page cache size. sled's default is 1 GiB; a broker wants most memory for
    /// connections, and tests want little.
    pub cache_capacity_bytes: u64,
}

impl StoreConfig {
    /// A config for `path` with the broker's defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig { path: path.into(), cache_capacity_bytes: 256 * 1024 * 1024 }
    }
}

/// Counters for ids that must stay unique across crashes.
#[derive(Clone, Copy)]
enum Counter {
    User = 1,
    Device = 2,
    Conversation = 3,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    db: sled::Db,
    committer: Committer,
    /// Serialises id allocation with the batch that records it, so a counter on disk
    /// never goes backwards, and makes name and direct-pair checks atomic.
    catalog: Mutex<()>,
    path: PathBuf,
    /// The previous run closed the store with `close_clean`.
    opened_clean: bool,
    /// Index writes begun, finished and made durable (see `read_durable`).
    index_gen: Arc<IndexGen>,
}

impl Store {
    /// Opens (creating if needed) the database and starts the group committer.
    pub fn open(config: &StoreConfig) -> Result<Store> {
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity_bytes)
            // Our committer flushes; sled's own background flusher would only add
            // unsynchronised flushes (and sled hangs with concurrent flushers).
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        // The marker goes first: any later write that survives a crash implies its
        // removal survived too (sled recovers a prefix of its log).
        let opened_clean = db.remove(Key::clean_shutdown())?.is_some();
        let index_gen = Arc::new(IndexGen::default());
        let committer = Committer::start(db.clone(), config.path.join("db"), index_gen.clone())?;
        Ok(Store { db, committer, catalog: Mutex::new(()), path: config.path.clone(), opened_clean, index_gen })
    }

    /// Calls `hook` once, from the committer thread, when a flush or fdatasync first
    /// fails. From then on nothing is reported durable again (see `commit.rs`); a broker
    /// should stop serving and exit so that recovery runs on the next start.
    pub fn on_failure(&self, hook: FailureHook) {
        self.committer.on_failure(hook);
    }

    /// Makes the next group commit fail as if fdatasync had returned an error. For
    /// fault-injection tests of the fail-stop path.
    pub fn inject_commit_failure(&self) {
        self.committer.inject_failure();
    }

    /// Whether a commit has failed: nothing is durable from then on.
    pub fn failed(&self) -> bool {
        self.committer.failed()
    }

    /// Whether the last run ended with `close_clean`. If not, a crash may have cut a
    /// conversation's newest entry short: see `repair_all`.
    pub fn opened_clean(&self) -> bool {
        self.opened_clean
    }

    /// Repairs the newest entry of every conversation (`repair_newest_entry`), so that
    /// indexes read without a conversation actor (a user's conversation list, member
    /// lists) agree with the log. One reverse range read per conversation; call at start
    /// after an unclean stop. Returns the number of conversations checked.
    pub fn repair_all(&self) -> Result<usize> {
        let mut checked = 0;
        for item in self.db.scan_prefix(Key::conversations()) {
            let (k, _) = item?;
            let id = keys::u64_from(&k[1..]).ok_or_else(|| corrupt(&k, "conversation key"))?;
            self.repair_newest_entry(id)?;
            checked += 1;
        }
        Ok(checked)
    }

    /// Applies a catalog `txn` atomically and returns a future that resolves once it is
    /// durable. The committer thread applies it between flushes (see `commit.rs`), so it
    /// never holds up other store access for a flush; this blocks until it is applied,
    /// so callers run it off the async runtime. The message path never uses a batch
    /// (see `append_then`).
    fn commit(&self, txn: Txn) -> Result<Durable> {
        self.index_write(|| self.committer.apply(txn.batch))
    }

    /// Appends a conversation entry, then writes what it implies for other keys, and
    /// calls `done` from the committer thread once it is durable (or failed to become
    /// so). Calls happen in append order, so an actor that forwards them to itself
    /// receives them in order; `done` must be quick. What the entry implies is derived
    /// from it alone: its idempotency key `(sender, client_id)`, the rewritten target of
    /// an edit or delete, the member keys of a membership change.
    ///
    /// These are single-key writes, not a sled batch: sled 0.34's `apply_batch` takes a
    /// process-wide exclusive lock that waits for any flush in progress (stalling every
    /// thread that touches the store) and writes its log buffer twice. Single writes are
    /// safe because sled recovers a prefix of its log and the entry is written first:
    /// after a crash only a conversation's newest entry can lack some of its effects,
    /// and `repair_newest_entry` writes them again. The caller appends one entry at a time
    /// per conversation (the next append starts after this one returned).
    pub fn append_then(&self, entry: &Entry, done: impl FnOnce(Result<(), StoreError>) + Send + 'static) -> Result<()> {
        self.db.insert(Key::entry(entry.conv, entry.seq), encode(entry))?;
        self.write_effects(entry, false)?;
        self.committer.notify(Box::new(done))
    }

    /// Writes the keys `entry` implies (see `append_then`). With `repair`, each is read
    /// first and written only if it differs, and a repair is logged.
    fn write_effects(&self, entry: &Entry, repair: bool) -> Result<()> {
        let conv = entry.conv;
        let set = |key: Key, value: Option<Vec<u8>>| -> Result<()> {
            if repair {
                if self.db.get(&key)?.as_deref() == value.as_deref() {
                    return Ok(());
                }
                tracing::warn!(conv, seq = entry.seq, "restored a write of the newest entry lost in a crash");
            }
            match value {
                Some(v) => self.db.insert(key, v)?,
                None => self.db.remove(key)?,
            };
            Ok(())
        };
        let member = |user: UserId, role: Option<Role>| -> Result<()> {
            set(Key::member(conv, user), role.map(|r| encode(&r)))?;
            set(Key::user_conv(user, conv), role.map(|_| Vec::new()))
        };
        if entry.client_id != ClientMsgId::default() {
            set(Key::dedupe(conv, entry.sender, &entry.client_id), Some(entry.seq.to_be_bytes().to_vec()))?;
        }
        let rewrite = |target: Seq, body: Body| -> Result<()> {
            let key = Key::entry(conv, target);
            let Some(mut stored) = self.entry(conv, target)? else {
                return Err(corrupt(key.as_ref(), "an edit or delete names a missing entry"));
            };
            stored.body = body;
            set(key, Some(encode(&stored)))
        };
        match &entry.body {
            Body::Edit { target, text } => {
                set(Key::edit_of(conv, *target, entry.seq), Some(Vec::new()))?;
                rewrite(*target, Body::Text { text: text.clone(), edited: true })
            }
            Body::Delete { target } => {
                // Every version of the text goes: the message's and each edit's.
                for item in self.db.scan_prefix(Key::edits_of(conv, *target)) {
                    let (k, _) = item?;
                    let edit = keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "edit key"))?;
                    rewrite(edit, Body::Redacted { target: *target })?;
                }
                rewrite(*target, Body::Tombstone)
            }
            Body::MembersAdded { members } => {
                self.index_write(|| members.iter().try_for_each(|&(user, role)| member(user, Some(role))))
            }
            Body::MemberRemoved { user } => self.index_write(|| member(*user, None)),
            Body::MemberLeft => self.index_write(|| member(entry.sender, None)),
            // Text and tombstones imply nothing more; a creation is one atomic batch.
            Body::Text { .. } | Body::Tombstone | Body::Created { .. } | Body::Redacted { .. } => Ok(()),
        }
    }

    /// Runs a write of keys read outside any conversation actor (catalog records, member
    /// and user-conversation indexes), counted so `read_durable` can tell whether what it
    /// read may not be durable yet.
    fn index_write<T>(&self, write: impl FnOnce() -> Result<T>) -> Result<T> {
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

    /// Resolves once everything applied so far is durable.
    pub fn barrier(&self) -> Result<Durable> {
        self.committer.wait()
    }

    /// Like `close`, and records that the store was closed cleanly, so the next open
    /// skips `repair_all`. Call only when nothing else can write any more.
    pub fn close_clean(&self) -> Result<()> {
        self.committer.stop();
        self.db.insert(Key::clean_shutdown(), &[][..])?;
        self.close()
    }

    /// Flushes synchronously and stops the committer. Later commits fail with `Closed`.
    pub fn close(&self) -> Result<()> {
        self.committer.stop();
        self.db.flush()?;
        commit::sync_file(&self.path.join("db")).map_err(|e| StoreError::NotDurable(e.to_string()))
    }

    // ---- users and devices ----

    /// Creates a user; `Conflict` if the name is taken. Durable when the future resolves.
    pub fn create_user(&self, name: &str, password_hash: &str, now_ms: u64) -> Result<(UserId, Durable)> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let name_key = Key::user_name(name);
        if self.db.contains_key(&name_key)? {
            return Err(StoreError::Conflict);
        }
        let id = self.next_id(Counter::User)?;
        let mut txn = Txn::new();
        txn.set_counter(Counter::User, id);
        txn.batch.insert(name_key.as_ref(), &id.to_be_bytes()[..]);
        let record = UserRecord { name: name.to_owned(), password_hash: password_hash.to_owned(), created_ms: now_ms };
        txn.put(Key::user(id), &record);
        Ok((id, self.commit(txn)?))
    }

    /// Looks a user up by name.
    pub fn user_by_name(&self, name: &str) -> Result<Option<(UserId, UserRecord)>> {
        let Some(raw) = self.db.get(Key::user_name(name))? else { return Ok(None) };
        let id = keys::u64_from(&raw).ok_or_else(|| corrupt(Key::user_name(name).as_ref(), "user id"))?;
        Ok(self.user(id)?.map(|u| (id, u)))
    }

    /// Looks a user up by id.
    pub fn user(&self, id: UserId) -> Result<Option<UserRecord>> {
        self.get(Key::user(id))
    }

    /// Enrolls a device key for `user`, unless it already has `max_devices`
    /// (`LimitReached`); the count and the insert are one atomic step.
    pub fn add_device(&self, user: UserId, record: &DeviceRecord, max_devices: usize) -> Result<(DeviceId, Durable)> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        if self.db.scan_prefix(Key::devices_of(user)).take(max_devices).count() >= max_devices {
            return Err(StoreError::LimitReached);
        }
        let id = self.next_id(Counter::Device)?;
        let mut txn = Txn::new();
        txn.set_counter(Counter::Device, id);
        txn.put(Key::device(user, id), record);
        Ok((id, self.commit(txn)?))
    }

    /// One device of a user.
    pub fn device(&self, user: UserId, device: DeviceId) -> Result<Option<DeviceRecord>> {
        self.get(Key::device(user, device))
    }

    /// All devices of a user, by id.
    pub fn devices(&self, user: UserId) -> Result<Vec<(DeviceId, DeviceRecord)>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::devices_of(user)) {
            let (k, v) = item?;
            let id = keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "device key"))?;
            out.push((id, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Removes a device; `false` if it did not exist.
    pub fn remove_device(&self, user: UserId, device: DeviceId) -> Result<Option<Durable>> {
        let key = Key::device(user, device);
        if !self.db.contains_key(&key)? {
            return Ok(None);
        }
        let mut txn = Txn::new();
        txn.batch.remove(key.as_ref());
        Ok(Some(self.commit(txn)?))
    }

    // ---- conversations ----

    /// Creates a conversation with its first entry (seq 1, `Body::Created`). For a direct
    /// conversation between `pair`, returns the existing one instead if there is one
    /// (`false` in the second field).
    pub fn create_conversation(
        &self,
        record: &ConversationRecord,
        members: &[(UserId, Role)],
        direct_pair: Option<(UserId, UserId)>,
        first_entry: impl FnOnce(ConvId) -> Entry,
    ) -> Result<(ConvId, bool, Durable)> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, b)) = direct_pair
            && let Some(raw) = self.db.get(Key::direct(a, b))?
        {
            let id = keys::u64_from(&raw).ok_or_else(|| corrupt(&raw, "direct conv id"))?;
            return Ok((id, false, self.barrier()?));
        }
        let id = self.next_id(Counter::Conversation)?;
        let mut txn = Txn::new();
        txn.set_counter(Counter::Conversation, id);
        txn.put(Key::conversation(id), record);
        if let Some((a, b)) = direct_pair {
            txn.batch.insert(Key::direct(a, b).as_ref(), &id.to_be_bytes()[..]);
        }
        for &(user, role) in members {
            txn.set_member(id, user, Some(role));
        }
        let entry = first_entry(id);
        txn.put(Key::entry(entry.conv, entry.seq), &entry);
        Ok((id, true, self.commit(txn)?))
    }

    /// A conversation's record.
    pub fn conversation(&self, id: ConvId) -> Result<Option<ConversationRecord>> {
        self.get(Key::conversation(id))
    }

    /// Newest seq of a conversation (0 if none): read from its newest entry's key,
    /// without decoding the entry.
    pub fn last_seq(&self, id: ConvId) -> Result<Seq> {
        match self.entry_range(id).next_back() {
            Some(item) => {
                let (k, _) = item?;
                keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "entry key"))
            }
            None => Ok(0),
        }
    }

    fn entry_range(&self, id: ConvId) -> sled::Iter {
        self.db.range(Key::entry(id, 0).as_ref()..=Key::entry(id, Seq::MAX).as_ref())
    }

    /// Writes again whatever of a conversation's newest entry's effects a crash, or a
    /// writer that failed half way, lost (see `append_then`). Call before asking who its
    /// members are or accepting writes to it; a no-op (a few reads) when nothing was lost.
    pub fn repair_newest_entry(&self, id: ConvId) -> Result<()> {
        match self.newest_entry(id)? {
            Some(entry) => self.write_effects(&entry, true),
            None => Ok(()),
        }
    }

    fn newest_entry(&self, id: ConvId) -> Result<Option<Entry>> {
        match self.entry_range(id).next_back() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some(decode(&k, &v)?))
            }
            None => Ok(None),
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

    /// The seq an earlier entry with this idempotency key got, if any.
    pub fn dedupe(&self, conv: ConvId, user: UserId, client_id: &ClientMsgId) -> Result<Option<Seq>> {
        Ok(self.db.get(Key::dedupe(conv, user, client_id))?.and_then(|v| keys::u64_from(&v)))
    }

    /// One entry.
    pub fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>> {
        self.get(Key::entry(conv, seq))
    }

    /// Entries with `from <= seq <= to`, ascending if `!newest_first`, at most `limit`.
    pub fn entries(&self, conv: ConvId, from: Seq, to: Seq, limit: usize, newest_first: bool) -> Result<Vec<Entry>> {
        if from > to {
            return Ok(Vec::new());
        }
        let range = self.db.range(Key::entry(conv, from).as_ref()..=Key::entry(conv, to).as_ref());
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if newest_first { Box::new(range.rev()) } else { Box::new(range) };
        let mut out = Vec::with_capacity(limit.min(256));
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    fn next_id(&self, counter: Counter) -> Result<u64> {
        let current = self.db.get(Key::counter(counter as u8))?.and_then(|v| keys::u64_from(&v)).unwrap_or(0);
        Ok(current + 1)
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: Key) -> Result<Option<T>> {
        match self.db.get(&key)? {
            Some(v) => Ok(Some(decode(key.as_ref(), &v)?)),
            None => Ok(None),
        }
    }
}

/// A set of catalog writes applied atomically by `Store::commit`.
#[derive(Default)]
struct Txn {
    batch: sled::Batch,
}

impl Txn {
    /// An empty transaction.
    fn new() -> Self {
        Txn::default()
    }

    /// Sets (`Some`) or removes (`None`) a membership, keeping the user's index in step.
    fn set_member(&mut self, conv: ConvId, user: UserId, role: Option<Role>) {
        match role {
            Some(role) => {
                self.put(Key::member(conv, user), &role);
                self.batch.insert(Key::user_conv(user, conv).as_ref(), &[][..]);
            }
            None => {
                self.batch.remove(Key::member(conv, user).as_ref());
                self.batch.remove(Key::user_conv(user, conv).as_ref());
            }
        }
    }

    fn set_counter(&mut self, counter: Counter, value: u64) {
        self.batch.insert(Key::counter(counter as u8).as_ref(), &value.to_be_bytes()[..]);
    }

    fn put<T: serde::Serialize>(&mut self, key: Key, value: &T) {
        self.batch.insert(key.as_ref(), encode(value));
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("postcard encodes every record type into a Vec")
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    postcard::from_bytes(value).map_err(|e| corrupt(key, &e.to_string()))
}

fn corrupt(key: &[u8], detail: &str) -> StoreError {
    StoreError::Corrupt { key: key.iter().map(|b| format!("{b:02x}")).collect(), detail: detail.to_owned() }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use switchboard_protocol::ConversationKind;

    fn open(dir: &Path) -> Store {
        let mut config = StoreConfig::new(dir.join("db"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        Store::open(&config).unwrap()
    }

    fn text(conv: ConvId, seq: Seq, sender: UserId) -> Entry {
        Entry {
            conv,
            seq,
            sender,
            sender_device: 1,
            client_id: [seq as u8; 16],
            at_ms: 0,
            body: Body::Text { text: format!("m{seq}"), edited: false },
        }
    }

    #[tokio::test]
    async fn committed_entries_survive_reopen_with_dedupe_and_last_seq() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for seq in 1..=5 {
                append(&store, text(9, seq, 3)).await;
            }
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.last_seq(9).unwrap(), 5);
        assert_eq!(store.dedupe(9, 3, &[4; 16]).unwrap(), Some(4));
        assert_eq!(store.dedupe(9, 4, &[4; 16]).unwrap(), None, "dedupe keys are per sender");
        let all = store.entries(9, 1, 5, 10, false).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        let newest = store.entries(9, 1, 5, 2, true).unwrap();
        assert_eq!(newest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5, 4]);
        assert!(store.entries(9, 6, 5, 10, false).unwrap().is_empty());
    }

    async fn append(store: &Store, entry: Entry) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.append_then(&entry, move |r| tx.send(r).unwrap()).unwrap();
        rx.await.unwrap().unwrap();
    }

    fn with_body(mut entry: Entry, body: Body) -> Entry {
        entry.body = body;
        entry
    }

    #[tokio::test]
    async fn appends_write_what_each_entry_implies() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        append(&store, text(9, 1, 3)).await;
        append(&store, with_body(text(9, 2, 3), Body::Edit { target: 1, text: "v2".into() })).await;
        assert_eq!(store.entry(9, 1).unwrap().unwrap().body, Body::Text { text: "v2".into(), edited: true });
        append(&store, with_body(text(9, 3, 3), Body::MembersAdded { members: vec![(4, Role::Admin)] })).await;
        assert_eq!(store.members(9).unwrap(), vec![(4, Role::Admin)]);
        assert_eq!(store.user_conversations(4, None, 10).unwrap(), vec![9]);
        append(&store, with_body(text(9, 4, 4), Body::MemberLeft)).await;
        assert!(store.members(9).unwrap().is_empty());
        assert!(store.user_conversations(4, None, 10).unwrap().is_empty());
        append(&store, with_body(text(9, 5, 3), Body::Delete { target: 1 })).await;
        assert_eq!(store.entry(9, 1).unwrap().unwrap().body, Body::Tombstone);
        assert_eq!(store.dedupe(9, 3, &[2; 16]).unwrap(), Some(2));
        assert_eq!(store.dedupe(9, 4, &[2; 16]).unwrap(), None, "idempotency keys are per sender");
        assert_eq!(store.last_seq(9).unwrap(), 5);
    }

    #[tokio::test]
    async fn a_crash_between_an_entry_and_its_effects_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for seq in 1..=3 {
                append(&store, text(9, seq, 3)).await;
            }
            // The crash left the newest entry without its other writes.
            let added = with_body(text(9, 4, 3), Body::MembersAdded { members: vec![(5, Role::Member)] });
            store.db.insert(Key::entry(9, 4), encode(&added)).unwrap();
            append(&store, text(8, 1, 3)).await;
            let delete = with_body(text(8, 2, 3), Body::Delete { target: 1 });
            store.db.insert(Key::entry(8, 2), encode(&delete)).unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert!(!store.opened_clean(), "closed without close_clean");
        // Every key checked below is one only the repair writes: absent now.
        assert_eq!(store.dedupe(9, 3, &[4; 16]).unwrap(), None);
        assert!(store.members(9).unwrap().is_empty());
        assert!(store.user_conversations(5, None, 10).unwrap().is_empty());
        assert_eq!(store.dedupe(8, 3, &[2; 16]).unwrap(), None);
        assert!(matches!(store.entry(8, 1).unwrap().unwrap().body, Body::Text { .. }));
        // No conversation records were made here: repair each by hand.
        store.repair_newest_entry(9).unwrap();
        assert_eq!(store.dedupe(9, 3, &[4; 16]).unwrap(), Some(4), "a retry of seq 4 finds it");
        assert_eq!(store.members(9).unwrap(), vec![(5, Role::Member)]);
        assert_eq!(store.user_conversations(5, None, 10).unwrap(), vec![9]);
        assert_eq!(store.dedupe(8, 3, &[2; 16]).unwrap(), None, "repairing one conversation leaves the others");
        store.repair_newest_entry(8).unwrap();
        assert_eq!(store.entry(8, 1).unwrap().unwrap().body, Body::Tombstone);
        assert_eq!(store.dedupe(8, 3, &[2; 16]).unwrap(), Some(2), "a retry of the delete finds it");
        store.repair_newest_entry(10).unwrap();
        assert_eq!(store.last_seq(10).unwrap(), 0, "an empty conversation");
        assert_eq!(store.last_seq(9).unwrap(), 4);
    }

    #[tokio::test]
    async fn a_clean_close_is_remembered_once_and_repair_all_checks_every_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let record = ConversationRecord { kind: ConversationKind::Group, title: "g".into(), created_ms: 0 };
        {
            let store = open(dir.path());
            assert!(!store.opened_clean(), "a new store");
            let (conv, _, d) =
                store.create_conversation(&record, &[(1, Role::Owner)], None, |c| text(c, 1, 1)).unwrap();
            d.await.unwrap();
            // A crash cut the newest entry short: its member keys are missing.
            let added = with_body(text(conv, 2, 1), Body::MembersAdded { members: vec![(2, Role::Member)] });
            store.db.insert(Key::entry(conv, 2), encode(&added)).unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert!(!store.opened_clean());
        assert!(store.user_conversations(2, None, 10).unwrap().is_empty());
        assert_eq!(store.repair_all().unwrap(), 1);
        assert_eq!(store.user_conversations(2, None, 10).unwrap().len(), 1, "user 2 now finds the group");
        store.close_clean().unwrap();
        drop(store);
        let store = open(dir.path());
        assert!(store.opened_clean());
        store.close().unwrap();
        drop(store);
        assert!(!open(dir.path()).opened_clean(), "the marker is used up by the open that reads it");
    }

    #[tokio::test]
    async fn callbacks_complete_in_commit_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for seq in 1..=200 {
            let tx = tx.clone();
            store.append_then(&text(1, seq, 1), move |r| tx.send((seq, r.is_ok())).unwrap()).unwrap();
        }
        for want in 1..=200 {
            assert_eq!(rx.recv().await.unwrap(), (want, true));
        }
    }

    #[tokio::test]
    async fn names_and_direct_pairs_are_unique_and_ids_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (alice, bob);
        {
            let store = open(dir.path());
            let (a, d) = store.create_user("alice", "hash", 0).unwrap();
            d.await.unwrap();
            assert!(matches!(store.create_user("alice", "other", 0), Err(StoreError::Conflict)));
            let (b, d) = store.create_user("bob", "hash", 0).unwrap();
            d.await.unwrap();
            (alice, bob) = (a, b);
            let record = ConversationRecord { kind: ConversationKind::Direct, title: String::new(), created_ms: 0 };
            let members = [(alice, Role::Member), (bob, Role::Member)];
            let (c1, created, d) =
                store.create_conversation(&record, &members, Some((alice, bob)), |c| text(c, 1, alice)).unwrap();
            d.await.unwrap();
            assert!(created);
            let (c2, created, d) =
                store.create_conversation(&record, &members, Some((bob, alice)), |c| text(c, 1, bob)).unwrap();
            d.await.unwrap();
            assert_eq!((c2, created), (c1, false), "one direct conversation per pair, either order");
            assert_eq!(store.user_conversations(alice, None, 10).unwrap(), vec![c1]);
            assert_eq!(store.last_seq(c1).unwrap(), 1);
            store.close().unwrap();
        }
        let store = open(dir.path());
        let (carol, d) = store.create_user("carol", "hash", 0).unwrap();
        d.await.unwrap();
        assert!(carol > alice.max(bob), "ids keep increasing across restarts");
        assert_eq!(store.user_by_name("bob").unwrap().map(|(id, _)| id), Some(bob));
    }

    #[tokio::test]
    async fn membership_index_follows_members() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut txn = Txn::new();
        for conv in [5, 7, 9] {
            txn.set_member(conv, 1, Some(Role::Member));
        }
        txn.set_member(7, 2, Some(Role::Admin));
        store.commit(txn).unwrap().await.unwrap();
        assert_eq!(store.user_conversations(1, None, 10).unwrap(), vec![5, 7, 9]);
        assert_eq!(store.user_conversations(1, Some(5), 1).unwrap(), vec![7]);
        let mut txn = Txn::new();
        txn.set_member(7, 1, None);
        store.commit(txn).unwrap().await.unwrap();
        assert_eq!(store.user_conversations(1, None, 10).unwrap(), vec![5, 9]);
        assert_eq!(store.members(7).unwrap(), vec![(2, Role::Admin)]);
    }
}
