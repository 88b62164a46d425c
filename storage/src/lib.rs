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

mod blocks;
mod commit;
mod files;
mod keys;
mod log;
mod members;
mod presence;
mod promises;
mod receipts;
mod records;

use std::path::PathBuf;

use std::sync::{Arc, Mutex};

use switchboard_protocol::{ConvId, DeviceId, Entry, Role, UserId};

pub use blocks::BlockChange;
pub use commit::{COMMIT_BUCKETS_US, CommitStats, Durable, FailureHook};
pub use files::{Collected, FileRecord, FileStage, Forwarded, QUOTA_BLOCK, UploadRefusal, charged_bytes};
pub use presence::PresenceAtStop;
use promises::Promises;
pub use promises::{PROMISE_HOLD, PROMISE_RENEW_BYTES};
pub use records::{ConversationRecord, DeviceRecord, ReceiptRecord, UserRecord};

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
    /// The data dir was written by a newer broker, in a format this one does not know:
    /// writing to it would leave out indexes the newer one relies on.
    #[error("the data dir has format {found}; this broker supports up to {FORMAT} (a newer broker wrote it)")]
    NewerFormat {
        /// Format found in the data dir.
        found: u64,
    },
}

/// The data dir format this build writes: 2 added the edit index and redaction, 3 the
/// message counts behind unread counts, 4 the index of each user's stored files, 5
/// quotas counted in whole 4 KiB blocks (`files::charged_bytes`), 6 each conversation's
/// member count in one key (`Key::member_count`: an older broker would change members
/// without it, so it must not open a format-6 data dir), 7 the `TitleChanged` entry (a
/// group renamed: an older broker could not decode it), 8 the count of each entry that is
/// not a message in place of a conversation count per text message (`Key::other_count`:
/// an older broker would read unread counts from keys no longer written). Opening a
/// newer one fails with `NewerFormat` (rolling a data dir back to an older broker is not
/// supported).
pub const FORMAT: u64 = 8;

/// Removed devices whose public keys a user keeps (`Store::revoked_key`): as many as an
/// account may have devices at once (the broker's `MAX_DEVICES_PER_USER`, asserted
/// there), so a whole account signed out by a password change is told so device by
/// device. Past it the keys removed longest ago go, and their holders are told
/// `AUTH_FAILED` as for a device never enrolled. 32 keys of 57 bytes each (17 of key, 40
/// of value: the public key and its removal's number) per user at most.
pub const REVOKED_KEYS_KEPT: usize = 32;

/// A kept revoked key's value: the device's public key, then the number of its removal
/// among the user's (u64, big-endian), by which the oldest go first.
fn revoked_value(value: &[u8]) -> Option<([u8; 32], u64)> {
    let (public_key, number) = value.split_first_chunk::<32>()?;
    Some((*public_key, keys::u64_from(number)?))
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Makes what sled will recover from the files in its directory `dir` (its log `db`, its
/// snapshots, its blob files) what is on the disk, before sled opens them: each is
/// synced, then its pages are dropped from the page cache (`POSIX_FADV_DONTNEED`), so
/// that sled's recovery reads the disk. `NotDurable` if a sync fails.
///
/// Synced: what a crash of the process left written and never synced (the page cache
/// keeps it) is made durable before sled's recovery acts on it (it zeroes segments it
/// finds free, judged from that log), before the start's repairs and before anything is
/// served from it. A flush with nothing to write syncs nothing (sled syncs its log writes
/// only), so the start's barrier alone would not. Dropped: after an fdatasync that failed
/// (the committer stops the broker, and a supervisor starts it again without a reboot)
/// Linux keeps the pages whose write-back failed in the cache, marked clean, and a later
/// sync reports nothing: sled would recover the entry that never reached the disk from
/// them and answer its resend as stored, and the next reboot would lose it and every
/// write acknowledged after it (a durability review; "fsyncgate"). Advice the kernel
/// cannot follow (a page dirtied meanwhile, a file system that keeps no cache) is let be.
/// `Store::open` calls it holding `STORE_LOCK`, so never under a store in use.
pub fn settle_for_recovery(dir: &std::path::Path) -> Result<()> {
    let blobs = dir.join("blobs");
    let files = [dir, blobs.as_path()]
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .map(|entry| entry.path());
    for file in files {
        let opened = std::fs::File::open(&file).and_then(|f| f.sync_data().map(|()| f));
        match opened {
            Ok(f) => {
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::NotDurable(format!("{}: {e}", file.display()))),
        }
    }
    Ok(())
}

/// Knobs set explicitly at open; see `StoreConfig::default` for the reasons.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// sled page cache size. sled's default is 1 GiB; a broker wants most memory for
    /// connections, and tests want little.
    pub cache_capacity_bytes: u64,
    /// How long a group commit that a conversation entry asked for waits, counted from
    /// that entry's write, before it flushes (0: at once). Entries arriving meanwhile
    /// share it: fewer flushes and thread wakeups per message, each acknowledgement that
    /// waited later by about this much (with `commit_siblings` 0, an entry that finds
    /// the committer idle waits all of it). Any other write's barrier or batch (files,
    /// catalog, receipts) ends the wait at once. Like PostgreSQL's `commit_delay`;
    /// `commit_siblings` says when it applies. docs/benchmarks.md ("Commit delay") has
    /// the trade measured.
    pub commit_delay: std::time::Duration,
    /// The commit delay is waited only when, as the committer takes up the entry that
    /// asked for a commit, at least this many other entries are queued too (those that
    /// arrived while the last commit ran: a measure of the message rate; refusals that
    /// wait for what they were judged on, `barrier_grouped`, count as entries); 0 waits
    /// always.
    /// Like PostgreSQL's `commit_siblings`, which counts other open transactions: a lone
    /// message on a quiet broker is not held back for company that is not coming.
    pub commit_siblings: usize,
    /// How long the disk space promised to an upload in progress holds after it began
    /// and after each `PROMISE_RENEW_BYTES` (4 MiB) it stores; then it lapses, and uploads
    /// begun later no longer count it (`promises` says why). Default `PROMISE_HOLD`, 60 s.
    pub upload_promise_hold: std::time::Duration,
}

impl StoreConfig {
    /// A config for `path` with the broker's defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreConfig {
            path: path.into(),
            cache_capacity_bytes: 256 * 1024 * 1024,
            commit_delay: std::time::Duration::ZERO,
            commit_siblings: 0,
            upload_promise_hold: PROMISE_HOLD,
        }
    }
}

/// Counters for ids that must stay unique across crashes.
#[derive(Clone, Copy)]
enum Counter {
    User = 1,
    Device = 2,
    Conversation = 3,
}

/// A test's hook into a store operation.
#[cfg(test)]
type StoreHook = Box<dyn Fn(&Store) + Send + Sync>;

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    db: sled::Db,
    committer: Committer,
    /// Serialises id allocation with the batch that records it, so a counter on disk
    /// never goes backwards, and makes name and direct-pair checks atomic.
    catalog: Mutex<()>,
    /// Serialises changes to file records and their indexes (quota, uploads in
    /// progress, blob references), so each is checked and changed in one step. Holds
    /// the disk space promised to the uploads in progress (`promises`: the bytes still
    /// to come of those whose promise holds), which `begin_upload` counts, and what batches handed to
    /// the committer but not yet applied change (see `files.rs`).
    files: Mutex<files::FilesLock>,
    /// The newest text message counts written (`receipts::RunningCounts`).
    counts: Mutex<receipts::RunningCounts>,
    /// Called by `collect_file` once it looked at the messages carrying a file, before
    /// it changes anything (tests write a delete there).
    #[cfg(test)]
    collect_looked: std::sync::OnceLock<StoreHook>,
    /// The previous run closed the store with `close_clean`.
    opened_clean: bool,
    /// This open created the store: there was no previous run.
    created: bool,
    /// Index writes begun, finished and made durable (see `index_barrier`).
    index_gen: Arc<IndexGen>,
    /// Receipt and settings writes, counted apart so that readers of membership and the
    /// catalog alone (conversation lists, presence contacts) do not wait for a commit
    /// every time a device reports a delivered mark (see `watermark_barrier`).
    watermark_gen: Arc<IndexGen>,
    /// `STORE_LOCK` in the store's directory, locked while the store is open
    /// (`lock_store_dir`). Last, so released after the database.
    _open_lock: std::fs::File,
}

impl Store {
    /// Opens (creating if needed) the database and starts the group committer.
    pub fn open(config: &StoreConfig) -> Result<Store> {
        let created = !config.path.exists();
        let sled_config = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity_bytes)
            // Our committer flushes; sled's own background flusher would only add
            // unsynchronised flushes (and sled hangs with concurrent flushers).
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput);
        // Held before the files are settled, so that a second opener (an operator's
        // command as the broker stops, a supervisor's restart before the old process is
        // gone) waits here instead of syncing and dropping the cache under a store in use.
        let open_lock = lock_store_dir(&config.path)?;
        if !created {
            settle_for_recovery(&config.path)?;
        }
        let db = open_when_unlocked(&sled_config)?;
        // The marker goes first: any later write that survives a crash implies its
        // removal survived too (sled recovers a prefix of its log).
        let opened_clean = db.remove(Key::clean_shutdown())?.is_some();
        let index_gen = Arc::new(IndexGen::default());
        let watermark_gen = Arc::new(IndexGen::default());
        let committer = Committer::start(
            db.clone(),
            vec![index_gen.clone(), watermark_gen.clone()],
            commit::Delay { wait: config.commit_delay, siblings: config.commit_siblings },
        )?;
        let store = Store {
            db,
            committer,
            catalog: Mutex::new(()),
            files: Mutex::new(files::FilesLock::default()),
            counts: Mutex::default(),
            #[cfg(test)]
            collect_looked: std::sync::OnceLock::new(),
            opened_clean,
            created,
            index_gen,
            watermark_gen,
            _open_lock: open_lock,
        };
        let found = store.stored_format()?;
        if found > FORMAT {
            return Err(StoreError::NewerFormat { found });
        }
        // Made durable by the caller's first barrier, like crash repair.
        store.upgrade_to_format_2()?;
        store.upgrade_to_format_3()?;
        store.upgrade_to_format_4()?;
        store.upgrade_to_format_5()?;
        store.upgrade_to_format_6()?;
        // Format 7 only adds an entry body: nothing to rewrite, the mark keeps older
        // brokers out.
        if store.stored_format()? < 7 {
            store.db.insert(Key::format(), &7u64.to_be_bytes()[..])?;
        }
        store.upgrade_to_format_8()?;
        // Each upload in progress holds its room for a hold from the start: its client
        // has that long to come back and resume.
        let mut promises = Promises::new(config.upload_promise_hold);
        let now = std::time::Instant::now();
        for (id, r) in store.uploads_in_progress()? {
            let offset = r.offset().min(r.size);
            promises.promise(id, r.size - offset, offset, now, true);
        }
        store.files.lock().unwrap_or_else(|p| p.into_inner()).promises = promises;
        Ok(store)
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

    /// A test aid: calls `hook` with each group commit's number as it begins, on the
    /// committer thread, before its flush (a hook that blocks holds every commit, so
    /// nothing applied meanwhile becomes durable). Set at most once; panics if set twice.
    pub fn on_commit_started(&self, hook: Box<dyn Fn(u64) + Send + Sync>) {
        self.committer.on_commit_started(hook);
    }

    /// Whether a commit has failed: nothing is durable from then on.
    pub fn failed(&self) -> bool {
        self.committer.failed()
    }

    /// What the group commits did since this store was opened (for monitoring).
    pub fn commit_stats(&self) -> CommitStats {
        self.committer.stats()
    }

    /// Whether the last run ended with `close_clean`. If not, a crash may have cut a
    /// conversation's newest entry short: see `repair_all`.
    pub fn opened_clean(&self) -> bool {
        self.opened_clean
    }

    /// Whether this open created the store (its directory did not exist): there was no
    /// previous run, so nothing to check even though `opened_clean` is false.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Applies a catalog `txn` atomically and returns a future that resolves once it is
    /// durable. The committer thread applies it between flushes (see `commit.rs`), so it
    /// never holds up other store access for a flush; this blocks until it is applied,
    /// so callers run it off the async runtime. The message path never uses a batch
    /// (see `append_then`).
    fn commit(&self, txn: Txn) -> Result<Durable> {
        self.index_write(|| self.committer.apply(txn.batch))
    }

    /// Resolves once everything applied so far is durable.
    pub fn barrier(&self) -> Result<Durable> {
        self.committer.wait()
    }

    /// Like `barrier`, as a conversation entry waits: within `commit_delay_us` it shares
    /// the next commit rather than start one at once (a barrier ends the delay).
    pub fn barrier_grouped(&self) -> Result<Durable> {
        self.committer.wait_grouped()
    }

    /// Like `close`, and records that the store was closed cleanly, so the next open
    /// skips `repair_all`. Call only when nothing else can write any more.
    /// A commit that fails while the committer drains its queue leaves the store
    /// unclean (`NotDurable`, no marker): the next open repairs it. Before, the marker
    /// was written anyway and the repair skipped.
    pub fn close_clean(&self) -> Result<()> {
        self.committer.stop();
        if self.committer.failed() {
            self.close()?;
            return Err(StoreError::NotDurable("a commit failed while closing; not marked clean".into()));
        }
        self.db.insert(Key::clean_shutdown(), &[][..])?;
        self.close()
    }

    /// Flushes synchronously (durable: the module `commit`) and stops the committer.
    /// Later commits fail with `Closed`.
    pub fn close(&self) -> Result<()> {
        self.committer.stop();
        self.db.flush()?;
        Ok(())
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

    /// Every user by id (a full scan: for operator commands, not for serving).
    pub fn users(&self) -> Result<Vec<(UserId, UserRecord)>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::users()) {
            let (k, v) = item?;
            let id = keys::u64_from(&k[1..]).ok_or_else(|| corrupt(&k, "user key"))?;
            out.push((id, decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Replaces a user's password hash (an argon2id PHC string) and, in the same batch,
    /// removes the devices `sign_out` names, returning them; `None` if there is no such
    /// user. Durable when the future resolves. One batch, so a password change that
    /// signs out the other devices cannot stop half-way (a device still enrolled
    /// revoking the one that asked, a failure between two revocations) with the new
    /// password set and a stolen device kept.
    pub fn set_password(
        &self,
        user: UserId,
        password_hash: &str,
        sign_out: SignOut,
    ) -> Result<Option<(Durable, Vec<DeviceId>)>> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut record) = self.user(user)? else { return Ok(None) };
        record.password_hash = password_hash.to_owned();
        let mut txn = Txn::new();
        txn.put(Key::user(user), &record);
        let mut removed = Vec::new();
        if sign_out != SignOut::Nobody {
            for (device, record) in self.devices(user)? {
                if sign_out != SignOut::AllBut(device) {
                    removed.push((device, record.public_key));
                }
            }
        }
        self.revoke_devices(&mut txn, user, &removed)?;
        Ok(Some((self.commit(txn)?, removed.into_iter().map(|(device, _)| device).collect())))
    }

    /// Whether the operator has disabled `user`'s account. One point read.
    pub fn disabled(&self, user: UserId) -> Result<bool> {
        Ok(self.db.contains_key(Key::disabled(user))?)
    }

    /// Since when `user`'s account is disabled (ms since the Unix epoch), if it is.
    pub fn disabled_since(&self, user: UserId) -> Result<Option<u64>> {
        Ok(self.db.get(Key::disabled(user))?.map(|v| keys::u64_from(&v).unwrap_or(0)))
    }

    /// Disables `user`'s account (since `now_ms`; one already disabled keeps its time),
    /// or enables it again; `None` if there is no such user. A single-key write riding
    /// the next group commit: durable when the future resolves.
    pub fn set_disabled(&self, user: UserId, disabled: bool, now_ms: u64) -> Result<Option<Durable>> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        if self.user(user)?.is_none() {
            return Ok(None);
        }
        let key = Key::disabled(user);
        if disabled && self.db.contains_key(&key)? {
            return Ok(Some(self.barrier()?));
        }
        if disabled {
            self.index_write(|| Ok(self.db.insert(&key, &now_ms.to_be_bytes()[..]).map(|_| ())?))?;
        } else {
            self.index_write(|| Ok(self.db.remove(&key).map(|_| ())?))?;
        }
        Ok(Some(self.barrier()?))
    }

    /// Enrolls a device key for `user`, unconfirmed (see `confirm_device`). If `user`
    /// already has `max_devices`, the oldest unconfirmed device enrolled before
    /// `replace.enrolled_before_ms` and not in `replace.in_use` is removed in the same
    /// atomic batch (its id is returned second); if there is none, `LimitReached`. The
    /// count, the choice and the writes are one step under the catalog lock.
    pub fn add_device(
        &self,
        user: UserId,
        record: &DeviceRecord,
        max_devices: usize,
        replace: &Replace<'_>,
    ) -> Result<(DeviceId, Option<DeviceId>, Durable)> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let mut txn = Txn::new();
        let mut replaced = None;
        if self.db.scan_prefix(Key::devices_of(user)).take(max_devices).count() >= max_devices {
            // Device ids only grow, so the first match is the oldest.
            for id in self.unconfirmed_devices(user)? {
                if replace.in_use.contains(&id) {
                    continue;
                }
                match self.device(user, id)? {
                    Some(d) if d.enrolled_ms < replace.enrolled_before_ms => {
                        replaced = Some((id, d.public_key));
                        break;
                    }
                    _ => {}
                }
            }
            let Some(old) = replaced else { return Err(StoreError::LimitReached) };
            self.revoke_devices(&mut txn, user, &[old])?;
        }
        let replaced = replaced.map(|(id, _)| id);
        let id = self.next_id(Counter::Device)?;
        txn.set_counter(Counter::Device, id);
        txn.put(Key::device(user, id), record);
        txn.batch.insert(Key::unconfirmed(user, id).as_ref(), &[][..]);
        Ok((id, replaced, self.commit(txn)?))
    }

    /// Records that a device authenticated after its enrollment, so it is never
    /// replaced (`add_device`). `None` if there was nothing to record (confirmed
    /// already, enrolled before confirmation existed, or gone).
    ///
    /// One key is removed, so this is a single sled write, not a batch: it takes no turn
    /// on the committer thread and returns at once (the catalog lock is held only for
    /// the remove). As a batch it waited for the committer to finish the group commit
    /// in progress, so the catalog thread confirmed one device per commit, and a storm
    /// of first logins ran at one fdatasync each (docs/benchmarks.md, "Connection
    /// storm").
    pub fn confirm_device(&self, user: UserId, device: DeviceId) -> Result<Option<Durable>> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let key = Key::unconfirmed(user, device);
        let removed = self.index_write(|| Ok(self.db.remove(&key)?))?;
        match removed {
            None => Ok(None),
            Some(_) => Ok(Some(self.barrier()?)),
        }
    }

    /// Whether a device has not authenticated since its enrollment.
    pub fn device_unconfirmed(&self, user: UserId, device: DeviceId) -> Result<bool> {
        Ok(self.db.contains_key(Key::unconfirmed(user, device))?)
    }

    /// A user's unconfirmed devices, oldest first.
    pub fn unconfirmed_devices(&self, user: UserId) -> Result<Vec<DeviceId>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::unconfirmed_of(user)) {
            let (k, _) = item?;
            out.push(keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "unconfirmed key"))?);
        }
        Ok(out)
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

    /// Removes a device, keeping its key as revoked (`revoked_key`); `None` if it did
    /// not exist.
    pub fn remove_device(&self, user: UserId, device: DeviceId) -> Result<Option<Durable>> {
        let _guard = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        let Some(record) = self.device(user, device)? else { return Ok(None) };
        let mut txn = Txn::new();
        self.revoke_devices(&mut txn, user, &[(device, record.public_key)])?;
        Ok(Some(self.commit(txn)?))
    }

    /// The public key of `user`'s device `device` if it was removed (revoked, signed out
    /// by a password change, or given way to a new enrollment) and is among the user's
    /// `REVOKED_KEYS_KEPT` removed most lately. One point read.
    pub fn revoked_key(&self, user: UserId, device: DeviceId) -> Result<Option<[u8; 32]>> {
        let key = Key::revoked(user, device);
        let Some(value) = self.db.get(&key)? else { return Ok(None) };
        let (public_key, _) = revoked_value(&value).ok_or_else(|| corrupt(key.as_ref(), "revoked device key"))?;
        Ok(Some(public_key))
    }

    /// Adds to `txn` the removal of `removed` devices of `user` (with their public keys),
    /// keeping each key as revoked, numbered after those the user has kept, and past
    /// `REVOKED_KEYS_KEPT` kept for the user dropping the kept keys removed longest ago
    /// (lowest numbers). Called under the catalog lock.
    fn revoke_devices(&self, txn: &mut Txn, user: UserId, removed: &[(DeviceId, [u8; 32])]) -> Result<()> {
        if removed.is_empty() {
            return Ok(());
        }
        // (removal number, device) of each key kept.
        let mut kept = Vec::new();
        for item in self.db.scan_prefix(Key::revoked_of(user)) {
            let (k, v) = item?;
            let device = keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "revoked device key"))?;
            let (_, number) = revoked_value(&v).ok_or_else(|| corrupt(&k, "revoked device key"))?;
            kept.push((number, device));
        }
        let first = kept.iter().map(|&(number, _)| number + 1).max().unwrap_or(0);
        for (next, (device, public_key)) in (first..).zip(removed) {
            txn.batch.remove(Key::device(user, *device).as_ref());
            txn.batch.remove(Key::unconfirmed(user, *device).as_ref());
            let mut value = public_key.to_vec();
            value.extend_from_slice(&next.to_be_bytes());
            txn.batch.insert(Key::revoked(user, *device).as_ref(), value);
            kept.retain(|&(_, d)| d != *device);
            kept.push((next, *device));
        }
        kept.sort_unstable();
        let over = kept.len().saturating_sub(REVOKED_KEYS_KEPT);
        for (_, device) in &kept[..over] {
            txn.batch.remove(Key::revoked(user, *device).as_ref());
        }
        Ok(())
    }

    // ---- conversations ----

    /// The direct conversation between `a` and `b`, if there is one (either order).
    pub fn direct_conversation(&self, a: UserId, b: UserId) -> Result<Option<ConvId>> {
        match self.db.get(Key::direct(a, b))? {
            Some(raw) => Ok(Some(keys::u64_from(&raw).ok_or_else(|| corrupt(&raw, "direct conv id"))?)),
            None => Ok(None),
        }
    }

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
        let count = members.iter().map(|(user, _)| user).collect::<std::collections::BTreeSet<_>>().len() as u64;
        txn.batch.insert(Key::member_count(id).as_ref(), &count.to_be_bytes()[..]);
        let entry = first_entry(id);
        txn.put(Key::entry(entry.conv, entry.seq), &entry);
        if !log::counts_as_message(&entry.body) {
            // What `write_effects` writes for such an entry (here the first one).
            let others = self.others_up_to(id, entry.seq.saturating_sub(1))? + 1;
            txn.batch.insert(Key::other_count(id, entry.seq).as_ref(), &others.to_be_bytes()[..]);
        }
        Ok((id, true, self.commit(txn)?))
    }

    /// A conversation's record.
    pub fn conversation(&self, id: ConvId) -> Result<Option<ConversationRecord>> {
        self.get(Key::conversation(id))
    }

    fn next_id(&self, counter: Counter) -> Result<u64> {
        let current = self.db.get(Key::counter(counter as u8))?.and_then(|v| keys::u64_from(&v)).unwrap_or(0);
        Ok(current + 1)
    }

    /// The data dir's format (`Key::format`), 0 when none is written (before format 2).
    pub(crate) fn stored_format(&self) -> Result<u64> {
        Ok(self.db.get(Key::format())?.and_then(|v| keys::u64_from(&v)).unwrap_or(0))
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: Key) -> Result<Option<T>> {
        match self.db.get(&key)? {
            Some(v) => Ok(Some(decode(key.as_ref(), &v)?)),
            None => Ok(None),
        }
    }
}

/// Which devices a password change removes in its own batch (`Store::set_password`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignOut {
    /// None: they keep working.
    Nobody,
    /// Every device of the account but this one (the device that asked).
    AllBut(DeviceId),
    /// Every device of the account (an operator's reset).
    Everyone,
}

/// What an enrollment at the device limit may replace (`Store::add_device`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Replace<'a> {
    /// Only unconfirmed devices enrolled strictly before this time (ms since the epoch).
    pub enrolled_before_ms: u64,
    /// Devices connected now, never replaced.
    pub in_use: &'a [DeviceId],
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

/// Room reserved for a record's encoding, bytes: a text message of a few hundred bytes
/// fits. `postcard::to_allocvec` starts from an empty vector and grows it about eight
/// times for such an entry, each time a new allocation and a copy (7% of the CPU of
/// appending a message, `examples/append_cost.rs` under perf).
const ENCODE_CAPACITY: usize = 512;

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, Vec::with_capacity(ENCODE_CAPACITY))
        .expect("postcard encodes every record type into a Vec")
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    postcard::from_bytes(value).map_err(|e| corrupt(key, &e.to_string()))
}

/// How long `Store::open` keeps trying while the database's file lock is held.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The file in a store's directory its opener holds locked (`flock`, exclusive) from
/// before its files are settled (`settle_for_recovery`) until the store is dropped.
pub const STORE_LOCK: &str = "open.lock";

/// Creates `dir` if missing and locks its `STORE_LOCK`, waiting up to `LOCK_WAIT` while
/// another opener holds it; then `could not acquire lock`, as sled says.
fn lock_store_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    use rustix::fs::{FlockOperation, flock};
    std::fs::create_dir_all(dir).map_err(sled::Error::Io)?;
    let path = dir.join(STORE_LOCK);
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path);
    let file = file.map_err(sled::Error::Io)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                let said = format!("could not acquire lock on {}: {e}", path.display());
                return Err(sled::Error::Io(std::io::Error::other(said)).into());
            }
        }
    }
}

/// Opens sled, waiting up to `LOCK_WAIT` while its file lock is held. A store closed and
/// dropped a moment ago in this process may still hold the lock: sled's I/O threads
/// release their references to the file only once their queued jobs ran, which under load
/// takes a while (a broker restarted in place, a test reopening its store). A lock still
/// held after that belongs to another process and is reported as before.
fn open_when_unlocked(config: &sled::Config) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

fn corrupt(key: &[u8], detail: &str) -> StoreError {
    StoreError::Corrupt { key: key.iter().map(|b| format!("{b:02x}")).collect(), detail: detail.to_owned() }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use switchboard_protocol::{Body, ConversationKind, Seq};

    pub(crate) fn open(dir: &Path) -> Store {
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
        let since = store.db.get(Key::user_conv(4, 9)).unwrap();
        append(&store, with_body(text(9, 4, 3), Body::RolesChanged { members: vec![(4, Role::Member)] })).await;
        assert_eq!(store.members(9).unwrap(), vec![(4, Role::Member)]);
        assert_eq!(store.db.get(Key::user_conv(4, 9)).unwrap(), since, "a role change keeps the seq of joining");
        append(&store, with_body(text(9, 5, 4), Body::MemberLeft)).await;
        assert!(store.members(9).unwrap().is_empty());
        assert!(store.user_conversations(4, None, 10).unwrap().is_empty());
        append(&store, with_body(text(9, 6, 3), Body::Delete { target: 1 })).await;
        assert_eq!(store.entry(9, 1).unwrap().unwrap().body, Body::Tombstone);
        assert_eq!(store.dedupe(9, 3, &[2; 16]).unwrap(), Some(2));
        assert_eq!(store.dedupe(9, 4, &[2; 16]).unwrap(), None, "idempotency keys are per sender");
        assert_eq!(store.last_seq(9).unwrap(), 6);
    }

    /// A summary's member count is one key read, kept by the creation and by each
    /// membership entry (before: every member key counted, for each summary listed).
    #[tokio::test]
    async fn the_member_count_is_kept_in_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let stored = |conv| store.db.get(Key::member_count(conv)).unwrap().map(|v| keys::u64_from(&v).unwrap());
        let record = ConversationRecord { kind: ConversationKind::Group, title: "g".into(), created_ms: 0 };
        let members = [(1, Role::Owner), (2, Role::Member), (3, Role::Member)];
        let (conv, _, durable) = store.create_conversation(&record, &members, None, |id| text(id, 1, 1)).unwrap();
        durable.await.unwrap();
        assert_eq!(stored(conv), Some(3));
        append(&store, with_body(text(conv, 2, 1), Body::MembersAdded { members: vec![(4, Role::Member)] })).await;
        append(&store, with_body(text(conv, 3, 1), Body::MembersAdded { members: vec![(5, Role::Admin)] })).await;
        append(&store, with_body(text(conv, 4, 1), Body::MemberRemoved { user: 2 })).await;
        append(&store, with_body(text(conv, 5, 3), Body::MemberLeft)).await;
        append(&store, with_body(text(conv, 6, 1), Body::RolesChanged { members: vec![(4, Role::Admin)] })).await;
        assert_eq!(stored(conv), Some(3));
        assert_eq!(store.member_count(conv).unwrap(), store.members(conv).unwrap().len());
        // A data dir from before the key (format 5): counted from the member keys, and
        // written by the upgrade at the next open.
        store.db.remove(Key::member_count(conv)).unwrap();
        assert_eq!(store.member_count(conv).unwrap(), 3);
        store.db.insert(Key::format(), &5u64.to_be_bytes()[..]).unwrap();
        store.close().unwrap();
        drop(store);
        let store = open(dir.path());
        let raw = store.db.get(Key::member_count(conv)).unwrap();
        assert_eq!(raw.as_deref(), Some(&3u64.to_be_bytes()[..]), "written by the format-6 upgrade");
        assert_eq!(store.stored_format().unwrap(), FORMAT);
    }

    /// A rename rewrites the conversation's record (what lists show); a crash between the
    /// entry and that write is repaired from the entry.
    #[tokio::test]
    async fn a_rename_rewrites_the_record_and_a_torn_one_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let record = ConversationRecord { kind: ConversationKind::Group, title: "g".into(), created_ms: 7 };
        let conv = {
            let store = open(dir.path());
            let (conv, _, durable) =
                store.create_conversation(&record, &[(1, Role::Owner)], None, |id| text(id, 1, 1)).unwrap();
            durable.await.unwrap();
            append(&store, with_body(text(conv, 2, 1), Body::TitleChanged { title: "ops".into() })).await;
            assert!(store.index_barrier().unwrap().is_none(), "the commit covered the rename");
            let shown = store.conversation(conv).unwrap().unwrap();
            assert_eq!((shown.title.as_str(), shown.created_ms), ("ops", 7), "only the title changes");
            // The crash left the newest rename without its record.
            let renamed = with_body(text(conv, 3, 1), Body::TitleChanged { title: "ops 2".into() });
            store.db.insert(Key::entry(conv, 3), encode(&renamed)).unwrap();
            store.close().unwrap();
            conv
        };
        let store = open(dir.path());
        assert_eq!(store.conversation(conv).unwrap().unwrap().title, "ops");
        store.repair_newest_entry(conv).unwrap();
        assert_eq!(store.conversation(conv).unwrap().unwrap().title, "ops 2");
        store.close().unwrap();
        drop(store);
        // A list read that saw a rename no commit covers yet waits for one (held off here
        // by a commit delay): nobody is shown a title a crash could take back.
        let mut config = StoreConfig::new(dir.path().join("db"));
        config.commit_delay = std::time::Duration::from_secs(30);
        let store = Store::open(&config).unwrap();
        store.barrier().unwrap().await.unwrap();
        assert!(store.index_barrier().unwrap().is_none());
        let renamed = with_body(text(conv, 4, 1), Body::TitleChanged { title: "ops 3".into() });
        store.append_then(&renamed, |_| ()).unwrap();
        assert!(store.index_barrier().unwrap().is_some(), "the record is not durable yet");
        store.barrier().unwrap().await.unwrap();
        assert!(store.index_barrier().unwrap().is_none());
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
            // A hand-over torn between its two member keys (the demotion is written
            // first): no owner until repaired.
            let owners = Body::MembersAdded { members: vec![(1, Role::Owner), (2, Role::Member)] };
            append(&store, with_body(text(7, 1, 1), owners)).await;
            let handed =
                with_body(text(7, 2, 1), Body::RolesChanged { members: vec![(2, Role::Owner), (1, Role::Admin)] });
            store.db.insert(Key::entry(7, 2), encode(&handed)).unwrap();
            store.db.insert(Key::member(7, 1), encode(&Role::Admin)).unwrap();
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
        assert_eq!(store.db.get(Key::member_count(9)).unwrap(), None);
        store.repair_newest_entry(9).unwrap();
        assert_eq!(store.dedupe(9, 3, &[4; 16]).unwrap(), Some(4), "a retry of seq 4 finds it");
        assert_eq!(store.members(9).unwrap(), vec![(5, Role::Member)]);
        assert_eq!(store.db.get(Key::member_count(9)).unwrap().as_deref(), Some(&1u64.to_be_bytes()[..]));
        assert_eq!(store.user_conversations(5, None, 10).unwrap(), vec![9]);
        assert_eq!(store.dedupe(8, 3, &[2; 16]).unwrap(), None, "repairing one conversation leaves the others");
        store.repair_newest_entry(8).unwrap();
        assert_eq!(store.entry(8, 1).unwrap().unwrap().body, Body::Tombstone);
        assert_eq!(store.dedupe(8, 3, &[2; 16]).unwrap(), Some(2), "a retry of the delete finds it");
        assert_eq!(store.members(7).unwrap(), vec![(1, Role::Admin), (2, Role::Member)]);
        store.repair_newest_entry(7).unwrap();
        assert_eq!(store.members(7).unwrap(), vec![(1, Role::Admin), (2, Role::Owner)], "one owner again");
        store.repair_newest_entry(10).unwrap();
        assert_eq!(store.last_seq(10).unwrap(), 0, "an empty conversation");
        assert_eq!(store.last_seq(9).unwrap(), 4);
    }

    #[tokio::test]
    async fn a_delete_redacts_every_edit_and_a_torn_delete_is_finished_by_repair() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            append(&store, text(9, 1, 3)).await;
            append(&store, with_body(text(9, 2, 3), Body::Edit { target: 1, text: "secret one".into() })).await;
            append(&store, with_body(text(9, 3, 3), Body::Edit { target: 1, text: "secret two".into() })).await;
            append(&store, text(9, 4, 3)).await;
            append(&store, with_body(text(9, 5, 3), Body::Edit { target: 4, text: "kept".into() })).await;
            // The crash left the delete without any of its effects.
            let delete = with_body(text(9, 6, 3), Body::Delete { target: 1 });
            store.db.insert(Key::entry(9, 6), encode(&delete)).unwrap();
            assert!(format!("{:?}", store.entries(9, 1, 6, 10, false).unwrap()).contains("secret"));
            store.close().unwrap();
        }
        let store = open(dir.path());
        store.repair_newest_entry(9).unwrap();
        let bodies: Vec<Body> = store.entries(9, 1, 6, 10, false).unwrap().into_iter().map(|e| e.body).collect();
        assert_eq!(bodies[0], Body::Tombstone);
        assert_eq!(bodies[1], Body::Redacted { target: 1 });
        assert_eq!(bodies[2], Body::Redacted { target: 1 });
        assert_eq!(bodies[3], Body::Text { text: "kept".into(), edited: true }, "other messages' edits stay");
        assert_eq!(bodies[4], Body::Edit { target: 4, text: "kept".into() });
        // The same through a normal append.
        append(&store, with_body(text(9, 7, 3), Body::Delete { target: 4 })).await;
        assert_eq!(store.entry(9, 5).unwrap().unwrap().body, Body::Redacted { target: 4 });
    }

    #[tokio::test]
    async fn a_data_dir_from_before_format_2_gets_its_deleted_edits_redacted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            append(&store, text(9, 1, 3)).await;
            append(&store, with_body(text(9, 2, 3), Body::Edit { target: 1, text: "old secret".into() })).await;
            append(&store, text(9, 3, 3)).await;
            append(&store, with_body(text(9, 4, 3), Body::Edit { target: 3, text: "later".into() })).await;
            // What a format-1 broker wrote: no edit index, no format key, and a delete
            // that tombstoned its target only.
            for key in [Key::edit_of(9, 1, 2), Key::edit_of(9, 3, 4), Key::format()] {
                store.db.remove(key).unwrap();
            }
            let delete = with_body(text(9, 5, 3), Body::Delete { target: 1 });
            store.db.insert(Key::entry(9, 5), encode(&delete)).unwrap();
            let mut target = store.entry(9, 1).unwrap().unwrap();
            target.body = Body::Tombstone;
            store.db.insert(Key::entry(9, 1), encode(&target)).unwrap();
            assert_eq!(store.entry(9, 2).unwrap().unwrap().body, Body::Edit { target: 1, text: "old secret".into() });
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.entry(9, 2).unwrap().unwrap().body, Body::Redacted { target: 1 });
        assert_eq!(store.edits_of(9, 3).unwrap(), vec![4], "old edits are indexed");
        // A later delete of an old edited message finds its edits.
        append(&store, with_body(text(9, 6, 3), Body::Delete { target: 3 })).await;
        assert_eq!(store.entry(9, 4).unwrap().unwrap().body, Body::Redacted { target: 3 });
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

    /// A commit that fails while `close_clean` drains the committer's queue leaves the
    /// store unclean, so the next open repairs it (an attacker review: the marker was
    /// written anyway, and the repair skipped).
    #[tokio::test]
    async fn a_commit_failing_as_the_store_closes_leaves_it_unclean() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            append(&store, text(9, 1, 3)).await;
            store.inject_commit_failure();
            let (tx, rx) = std::sync::mpsc::channel();
            let marks = [(3, ReceiptRecord { delivered_up_to: 1, read_up_to: 1, shown_read_up_to: 1 })];
            store.write_receipts(9, &marks, move |r| tx.send(r.is_ok()).unwrap()).unwrap();
            assert!(matches!(store.close_clean(), Err(StoreError::NotDurable(_))));
            assert!(!rx.recv().unwrap(), "the drained write failed");
        }
        assert!(!open(dir.path()).opened_clean());
    }

    /// A commit is sled's flush, durable because the patched sled fdatasyncs each log
    /// write (patches/README.md, change 11): every commit that wrote something made at
    /// least one. Unpatched, `sled::log_syncs` does not exist, and with
    /// `sync_file_range` nothing would count.
    #[tokio::test]
    async fn every_commit_that_writes_fdatasyncs_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let before = sled::log_syncs();
        for seq in 1..=20 {
            append(&store, text(9, seq, 3)).await;
        }
        assert!(sled::log_syncs() >= before + 20, "{} fdatasyncs in 20 commits", sled::log_syncs() - before);
    }

    #[tokio::test]
    async fn a_data_dir_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            append(&store, text(9, 1, 3)).await;
            store.db.insert(Key::format(), &(FORMAT + 1).to_be_bytes()[..]).unwrap();
            store.close().unwrap();
        }
        let mut config = StoreConfig::new(dir.path().join("db"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        match Store::open(&config) {
            Err(StoreError::NewerFormat { found }) => assert_eq!(found, FORMAT + 1),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer data dir was opened"),
        }
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

    #[test]
    fn confirming_a_device_does_not_wait_for_the_commit_in_progress() {
        use std::time::Duration;
        const WAIT: Duration = Duration::from_secs(10);
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        // A plain test thread: the confirmations run on a thread of their own, as on the
        // catalog thread, and this one waits for them.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let record = DeviceRecord { name: "d".into(), public_key: [1; 32], enrolled_ms: 1 };
        let ids: Vec<DeviceId> = (0..3)
            .map(|_| {
                let (id, _, durable) = store.add_device(7, &record, 8, &Replace::default()).unwrap();
                rt.block_on(durable).unwrap();
                id
            })
            .collect();
        // The next commit pauses as it begins until the test lets it go on.
        let (started_tx, started) = std::sync::mpsc::channel();
        let (go, paused) = std::sync::mpsc::channel::<()>();
        let paused = std::sync::Mutex::new(paused);
        let once = std::sync::atomic::AtomicBool::new(true);
        store.committer.on_commit_started(Box::new(move |_| {
            if once.swap(false, std::sync::atomic::Ordering::SeqCst) {
                let _ = started_tx.send(());
                let _ = paused.lock().unwrap().recv_timeout(WAIT);
            }
        }));
        let first = store.barrier().unwrap();
        started.recv_timeout(WAIT).unwrap();
        // Every first login of a storm confirms its device. Each confirmation returns at
        // once, during the commit: as a batch it waited for that commit to end, so the
        // catalog thread confirmed one device per group commit.
        let (confirmed_tx, confirmed) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for &id in &ids {
                    confirmed_tx.send(store.confirm_device(7, id).unwrap().expect("unconfirmed until now")).unwrap();
                }
            });
            let mut waiting = Vec::new();
            for _ in &ids {
                let durable = confirmed.recv_timeout(Duration::from_secs(3));
                assert!(durable.is_ok(), "a confirmation waited for the commit in progress");
                waiting.push(durable.unwrap());
            }
            assert!(store.unconfirmed_devices(7).unwrap().is_empty(), "applied at once");
            go.send(()).unwrap();
            rt.block_on(first).unwrap();
            for durable in waiting {
                // Durable only after a commit that began after the confirmation.
                rt.block_on(durable).unwrap();
            }
        });
        assert!(store.confirm_device(7, ids[0]).unwrap().is_none(), "confirmed once");
    }

    #[tokio::test]
    async fn unconfirmed_devices_give_way_at_the_limit_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        assert!(store.created(), "a new store");
        let record = |enrolled_ms| DeviceRecord { name: "d".into(), public_key: [1; 32], enrolled_ms };
        let nothing = Replace::default();
        let mut ids = Vec::new();
        for ms in 1..=3 {
            let (id, replaced, d) = store.add_device(7, &record(ms), 3, &nothing).unwrap();
            d.await.unwrap();
            assert_eq!(replaced, None);
            ids.push(id);
        }
        assert_eq!(store.unconfirmed_devices(7).unwrap(), ids, "every enrollment starts unconfirmed");
        assert!(matches!(store.add_device(7, &record(4), 3, &nothing), Err(StoreError::LimitReached)));
        store.confirm_device(7, ids[0]).unwrap().unwrap().await.unwrap();
        assert!(store.confirm_device(7, ids[0]).unwrap().is_none(), "confirmed once");
        assert!(!store.device_unconfirmed(7, ids[0]).unwrap());
        // Too recent to give way: the oldest unconfirmed was enrolled at 2.
        let recent = Replace { enrolled_before_ms: 2, in_use: &[] };
        assert!(matches!(store.add_device(7, &record(4), 3, &recent), Err(StoreError::LimitReached)));
        // The oldest unconfirmed device is connected: the next one gives way.
        let replace = Replace { enrolled_before_ms: 10, in_use: &[ids[1]] };
        let (new, replaced, d) = store.add_device(7, &record(5), 3, &replace).unwrap();
        d.await.unwrap();
        assert_eq!(replaced, Some(ids[2]));
        let left: Vec<DeviceId> = store.devices(7).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(left, vec![ids[0], ids[1], new]);
        assert_eq!(store.unconfirmed_devices(7).unwrap(), vec![ids[1], new]);
        store.remove_device(7, ids[1]).unwrap().unwrap().await.unwrap();
        assert_eq!(store.unconfirmed_devices(7).unwrap(), vec![new], "a removed device leaves no marker");
        store.close().unwrap();
        drop(store);
        assert!(!open(dir.path()).created());
    }

    #[tokio::test]
    async fn removed_devices_keep_their_keys_the_newest_enrollments_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (user, d) = store.create_user("alice", "hash", 1).unwrap();
        d.await.unwrap();
        let record = |key: u8| DeviceRecord { name: "d".into(), public_key: [key; 32], enrolled_ms: 1 };
        let add = |key| store.add_device(user, &record(key), 64, &Replace::default()).unwrap().0;
        // Revoked by a device or the operator.
        let first = add(1);
        assert_eq!(store.revoked_key(user, first).unwrap(), None, "enrolled, not revoked");
        store.remove_device(user, first).unwrap().unwrap().await.unwrap();
        assert_eq!(store.revoked_key(user, first).unwrap(), Some([1; 32]));
        assert!(store.remove_device(user, first).unwrap().is_none(), "removed once");
        // Given way to a new enrollment.
        let unconfirmed = add(2);
        let kept = add(3);
        store.confirm_device(user, kept).unwrap().unwrap().await.unwrap();
        let (_, replaced, d) =
            store.add_device(user, &record(4), 2, &Replace { enrolled_before_ms: 2, in_use: &[] }).unwrap();
        d.await.unwrap();
        assert_eq!(replaced, Some(unconfirmed));
        assert_eq!(store.revoked_key(user, unconfirmed).unwrap(), Some([2; 32]));
        // Signed out by a password change: every device but the one kept.
        let many: Vec<DeviceId> = (0..REVOKED_KEYS_KEPT as u8).map(|i| add(10 + i)).collect();
        let (d, signed_out) = store.set_password(user, "new hash", SignOut::AllBut(kept)).unwrap().unwrap();
        d.await.unwrap();
        assert_eq!(signed_out.len(), REVOKED_KEYS_KEPT + 1, "the 32 and the one that replaced");
        assert_eq!(store.revoked_key(user, kept).unwrap(), None, "the device kept is not revoked");
        assert!(store.device(user, kept).unwrap().is_some());
        // At most REVOKED_KEYS_KEPT kept: those removed longest ago went first.
        for (i, &id) in many.iter().enumerate() {
            assert_eq!(store.revoked_key(user, id).unwrap(), Some([10 + i as u8; 32]), "device {i}");
        }
        for gone in [first, unconfirmed] {
            assert_eq!(store.revoked_key(user, gone).unwrap(), None, "the oldest keys go past the bound");
        }
        let kept_keys = || store.db.scan_prefix(Key::revoked_of(user)).count();
        assert_eq!(kept_keys(), REVOKED_KEYS_KEPT);
        // The device enrolled before all of them, revoked now, is kept: the removal is
        // the newest (before, keys were kept by device id, and this one went at once).
        store.remove_device(user, kept).unwrap().unwrap().await.unwrap();
        assert_eq!(store.revoked_key(user, kept).unwrap(), Some([3; 32]));
        assert_eq!(store.revoked_key(user, many[0]).unwrap(), None, "the oldest removal made room");
        assert_eq!(kept_keys(), REVOKED_KEYS_KEPT);
    }
}
