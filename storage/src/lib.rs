//! Switchboard's store: one sled tree with prefixed big-endian keys, and a group
//! committer that makes writes durable before anyone acknowledges them.
//!
//! Only this crate touches sled. Every multi-key invariant (conversation + members +
//! index, an edit with the entry it rewrites) is written as one atomic sled batch (`Txn`),
//! and a write is reported durable only after a sled flush *and* an fdatasync of sled's
//! data file that both began after the write was applied (see `commit`).
//!
//! The hot path, a plain message, is not a batch: see `append_then`. sled 0.34 makes
//! every `apply_batch` take a process-wide exclusive lock that waits for any flush in
//! progress, and seal and write its log buffer twice (a `pwrite` and a
//! `sync_file_range` each); single-key inserts do neither.

mod commit;
mod keys;
mod records;

use std::path::PathBuf;
use std::sync::Mutex;

use switchboard_protocol::{ClientMsgId, ConvId, DeviceId, Entry, Role, Seq, UserId};

pub use commit::Durable;
pub use records::{ConversationRecord, DeviceRecord, UserRecord};

use commit::Committer;
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
        let committer = Committer::start(db.clone(), config.path.join("db"))?;
        Ok(Store { db, committer, catalog: Mutex::new(()), path: config.path.clone() })
    }

    /// Applies `txn` atomically and returns a future that resolves once it is durable.
    pub fn commit(&self, txn: Txn) -> Result<Durable> {
        self.db.apply_batch(txn.batch)?;
        self.committer.wait()
    }

    /// Applies `txn` atomically and calls `done` from the committer thread once it is
    /// durable (or failed to become so). Calls happen in commit order, so an actor that
    /// forwards them to itself receives them in order. `done` must be quick.
    pub fn commit_then(&self, txn: Txn, done: impl FnOnce(Result<(), StoreError>) + Send + 'static) -> Result<()> {
        self.db.apply_batch(txn.batch)?;
        self.committer.notify(Box::new(done))
    }

    /// Appends a plain entry (nothing else changes with it) and calls `done` like
    /// `commit_then`. The entry and then its idempotency key are two single-key writes,
    /// not a batch. That is safe because sled recovers a prefix of its log: after a
    /// crash the idempotency key exists only if its entry does, and only a
    /// conversation's newest entry can have lost its key, which `recover_last_seq`
    /// restores. The conversation's last seq is not stored; it is its newest entry.
    pub fn append_then(
        &self,
        entry: &Entry,
        dedupe: Option<(UserId, &ClientMsgId)>,
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) -> Result<()> {
        self.db.insert(Key::entry(entry.conv, entry.seq), encode(entry))?;
        if let Some((user, client_id)) = dedupe {
            self.db.insert(Key::dedupe(entry.conv, user, client_id), &entry.seq.to_be_bytes()[..])?;
        }
        self.committer.notify(Box::new(done))
    }

    /// Resolves once everything applied so far is durable.
    pub fn barrier(&self) -> Result<Durable> {
        self.committer.wait()
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
        txn.append(&entry, None);
        Ok((id, true, self.commit(txn)?))
    }

    /// A conversation's record.
    pub fn conversation(&self, id: ConvId) -> Result<Option<ConversationRecord>> {
        self.get(Key::conversation(id))
    }

    /// Newest seq of a conversation (0 if none): the seq of its newest entry.
    pub fn last_seq(&self, id: ConvId) -> Result<Seq> {
        Ok(self.newest_entry(id)?.map_or(0, |e| e.seq))
    }

    /// Newest seq of a conversation, first restoring the idempotency key of its newest
    /// entry if a crash fell between the two writes of `append_then`. Call before
    /// accepting new writes to the conversation (and after `Broker::start`'s barrier, so
    /// what it reads is durable).
    pub fn recover_last_seq(&self, id: ConvId) -> Result<Seq> {
        let Some(entry) = self.newest_entry(id)? else { return Ok(0) };
        if entry.client_id != ClientMsgId::default() {
            let key = Key::dedupe(id, entry.sender, &entry.client_id);
            if self.db.get(&key)?.is_none() {
                tracing::warn!(conv = id, seq = entry.seq, "restored the idempotency key of the newest entry");
                self.db.insert(key, &entry.seq.to_be_bytes()[..])?;
            }
        }
        Ok(entry.seq)
    }

    fn newest_entry(&self, id: ConvId) -> Result<Option<Entry>> {
        match self.db.range(Key::entry(id, 0).as_ref()..=Key::entry(id, Seq::MAX).as_ref()).next_back() {
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

/// A set of writes applied atomically by `Store::commit`.
#[derive(Default)]
pub struct Txn {
    batch: sled::Batch,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Txn::default()
    }

    /// Writes `entry` at its seq and, with `dedupe`, records its idempotency key for
    /// `(sender, client_id)`.
    pub fn append(&mut self, entry: &Entry, dedupe: Option<(UserId, &ClientMsgId)>) {
        self.put(Key::entry(entry.conv, entry.seq), entry);
        if let Some((user, client_id)) = dedupe {
            self.batch.insert(Key::dedupe(entry.conv, user, client_id).as_ref(), &entry.seq.to_be_bytes()[..]);
        }
    }

    /// Rewrites an existing entry in place (edit or tombstone of its body).
    pub fn replace(&mut self, entry: &Entry) {
        self.put(Key::entry(entry.conv, entry.seq), entry);
    }

    /// Sets (`Some`) or removes (`None`) a membership, keeping the user's index in step.
    pub fn set_member(&mut self, conv: ConvId, user: UserId, role: Option<Role>) {
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
    use switchboard_protocol::{Body, ConversationKind};

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
                let mut txn = Txn::new();
                let entry = text(9, seq, 3);
                txn.append(&entry, Some((3, &entry.client_id)));
                store.commit(txn).unwrap().await.unwrap();
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

    #[tokio::test]
    async fn appends_survive_reopen_and_a_lost_idempotency_key_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for seq in 1..=5 {
                let entry = text(9, seq, 3);
                let (tx, rx) = tokio::sync::oneshot::channel();
                store.append_then(&entry, Some((3, &entry.client_id)), move |r| tx.send(r).unwrap()).unwrap();
                rx.await.unwrap().unwrap();
            }
            // A crash between append_then's two writes: the newest entry without its key.
            store.db.insert(Key::entry(9, 6), encode(&text(9, 6, 3))).unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.last_seq(9).unwrap(), 6);
        assert_eq!(store.dedupe(9, 3, &[6; 16]).unwrap(), None);
        assert_eq!(store.recover_last_seq(9).unwrap(), 6);
        assert_eq!(store.dedupe(9, 3, &[6; 16]).unwrap(), Some(6), "a retry of seq 6 finds it");
        assert_eq!(store.dedupe(9, 3, &[2; 16]).unwrap(), Some(2));
        assert_eq!(store.recover_last_seq(10).unwrap(), 0, "an empty conversation");
    }

    #[tokio::test]
    async fn callbacks_complete_in_commit_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for seq in 1..=200 {
            let mut txn = Txn::new();
            txn.append(&text(1, seq, 1), None);
            let tx = tx.clone();
            store.commit_then(txn, move |r| tx.send((seq, r.is_ok())).unwrap()).unwrap();
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
