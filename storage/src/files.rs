//! File records: one per file id (an upload in progress or a complete file), and the
//! indexes around them: a user's uploads in progress, the bytes its quota counts, the
//! expiry of incomplete uploads, the messages carrying a file (for who may read it), the
//! number of complete files sharing one stored blob, and the complete files that may have
//! lost their last hold.
//!
//! The bytes themselves are files under the data dir, not sled's: the broker writes and
//! fsyncs them before it records an offset here. Changes of several keys (begin,
//! complete, remove, drop a hold, collect) are one catalog batch each (`Store::commit`),
//! serialised by the files lock so quota and upload counts are checked and changed in
//! one step. The durable offset of an upload in progress is a single-key write that
//! rides on the next group commit.
//!
//! Begin, complete and remove, the frequent ones, hold the files lock only while they
//! check and hand their batch to the committer, not while the committer finishes the
//! flush in progress before applying it: until it is applied, what it changes in the
//! keys they read (a user's stored bytes, its uploads in progress) is kept in the lock
//! (`FilesLock::pending`), and every check under the lock reads through it. Batches are
//! applied in the order they were handed over, so each one's values, computed from all
//! those before it, are right when it lands.

use serde::{Deserialize, Serialize};
use switchboard_protocol::{Blake3, ConvId, FileId, Seq, UserId};

use std::collections::{HashMap, HashSet};
use std::sync::MutexGuard;

use crate::keys::{self, Key};
use crate::promises::Promises;
use crate::{Durable, Result, Store, Txn, corrupt, decode, encode};

pub use switchboard_protocol::limits::{QUOTA_BLOCK, charged_bytes};

/// What the store's files lock guards.
#[derive(Default)]
pub(crate) struct FilesLock {
    /// Bytes still to come of the uploads in progress that moved lately (declared size
    /// minus durable offset): disk space promised, as `begin_upload` counts it.
    pub(crate) promises: Promises,
    /// Per user, what batches handed to the committer and not yet applied change in the
    /// keys the checks read.
    pending: HashMap<UserId, Pending>,
    /// Number of the next batch handed over (batches are applied in this order).
    next_batch: u64,
    /// Per file a send carries (a forward's copy, or the sender's own file), the sends
    /// that carry it and are not answered yet (`forward_file` or `count_send` counts one
    /// in, `settle_send` one out): while any is, the file is not collected, whatever its
    /// hold or grace says (their messages may not be written yet). In memory: after a
    /// restart, a copy's stored grace covers its sends, and a message written before
    /// the crash carries its files.
    unsettled: HashMap<FileId, usize>,
}

/// One user's changes in batches not yet applied.
#[derive(Default)]
struct Pending {
    /// The user's stored bytes as the newest of them writes them.
    stored: u64,
    /// Uploads in progress they add (`true`) or remove (`false`), in order, each with
    /// the number of its batch: once a batch is applied every earlier one is too, so its
    /// entries and all before them go (the list holds only batches still in flight).
    uploads: Vec<(u64, FileId, bool)>,
    /// How many of them are not yet known to be applied.
    batches: usize,
}

/// What the store keeps about one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Name given at `BeginUpload`.
    pub name: String,
    /// Declared size, bytes.
    pub size: u64,
    /// Media type the uploader declared.
    pub declared_type: String,
    /// Media type published (the declared one, or what the first bytes showed).
    pub content_type: String,
    /// Declared BLAKE3 of the whole file (verified once complete).
    pub blake3: Blake3,
    /// Who uploaded it (for a thumbnail: its file's uploader).
    pub uploader: UserId,
    /// Upload start, ms since the Unix epoch.
    pub created_ms: u64,
    /// An incomplete upload is removed at this time (0 once complete).
    pub expires_ms: u64,
    /// Progress.
    pub stage: FileStage,
    /// For a thumbnail, the file it shows (readable by whoever may read that one).
    pub parent: Option<FileId>,
    /// The uploader still holds the file (until `DeleteFile`); while it does, the file
    /// counts against the uploader's quota.
    pub held: bool,
}

/// Where a file stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileStage {
    /// Being uploaded: bytes below `offset` are durable in the upload's partial file.
    Uploading {
        /// Durable bytes.
        offset: u64,
    },
    /// All bytes in and verified, and the record refers to the blob named by `blake3`
    /// (counted in its references): the partial file is being made that blob. Durable
    /// before the partial file is renamed or dropped, so the start-up repair completes
    /// only an upload in this stage (any other without its partial file starts over).
    Publishing,
    /// All bytes in and verified; stored as the blob named by `blake3`.
    Complete {
        /// The thumbnail file, once made.
        thumbnail: Option<FileId>,
    },
}

impl FileRecord {
    /// Whether the upload is complete.
    pub fn is_complete(&self) -> bool {
        matches!(self.stage, FileStage::Complete { .. })
    }

    /// The durable offset (the size once complete).
    pub fn offset(&self) -> u64 {
        match self.stage {
            FileStage::Uploading { offset } => offset,
            FileStage::Publishing | FileStage::Complete { .. } => self.size,
        }
    }
}

/// Why `begin_upload` refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadRefusal {
    /// The user has `max_uploads` uploads in progress.
    TooManyUploads,
    /// The user's stored bytes plus the size would pass the quota.
    QuotaExceeded {
        /// The bytes the quota counts now, of the user's files and uploads.
        used: u64,
    },
    /// The disk has no room for it (the caller's `room` check said so).
    StorageFull,
}

/// What `Store::forward_file` did.
#[derive(Debug)]
pub enum Forwarded {
    /// The forwarder's copy (made now, or the one its earlier forward of the same file
    /// made), as the message will carry it. Settle it (`settle_send`) once the send
    /// is answered.
    Copy {
        /// The copy's id.
        id: FileId,
        /// Its record.
        record: FileRecord,
        /// Made by this forward (not an earlier one's, reused).
        new: bool,
    },
    /// A new copy's size would take the forwarder's stored bytes past its quota.
    QuotaExceeded {
        /// The bytes the quota counts now, of the forwarder's files and uploads.
        used: u64,
    },
    /// The original is gone (collected since the caller read it) or not complete.
    Gone,
}

/// What collecting a file removed (`Store::collect_file`).
#[derive(Debug)]
pub struct Collected {
    /// Blobs whose last reference went: their files may be deleted once `durable` resolves.
    pub unreferenced: Vec<Blake3>,
    /// Resolves once the removal is durable.
    pub durable: Durable,
    /// The deleted file's owner (its uploader or forwarder) and blob, if one was deleted:
    /// that blob's bytes, if unreferenced now, are the owner's until freed (a thumbnail's
    /// are nobody's).
    pub owner: Option<(UserId, Blake3)>,
}

impl Store {
    /// One file's record.
    pub fn file(&self, id: &FileId) -> Result<Option<FileRecord>> {
        self.get(Key::file(id))
    }

    /// Records a new upload of `record.uploader` (stage `Uploading { offset: 0 }`), unless
    /// the user has `max_uploads` in progress, or its stored bytes plus the size's charge
    /// pass `quota_bytes()` (asked under the files lock, so what the caller counts against
    /// the user outside the store, taken before a removal gives quota back here, is seen
    /// whatever the order), or `room` says the disk has no room: it is given the bytes still to
    /// come of the uploads in progress whose promises hold (`promises`: promised, not yet
    /// on disk) and answers whether the disk holds those plus this upload's size. The
    /// upload's own promise holds from now if `hold` (its user's allowance of holds had
    /// one), else it begins lapsed. The checks and the write are one step, under the
    /// files lock. Blocking (a catalog batch).
    pub fn begin_upload(
        &self,
        id: &FileId,
        record: &FileRecord,
        max_uploads: usize,
        quota_bytes: impl FnOnce() -> u64,
        room: impl FnOnce(u64) -> bool,
        hold: bool,
    ) -> Result<std::result::Result<Durable, UploadRefusal>> {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let user = record.uploader;
        if self.uploads_now(&lock, user, max_uploads)? >= max_uploads {
            return Ok(Err(UploadRefusal::TooManyUploads));
        }
        let stored = self.stored_now(&lock, user)?;
        if stored.saturating_add(charged_bytes(record.size)) > quota_bytes() {
            return Ok(Err(UploadRefusal::QuotaExceeded { used: stored }));
        }
        let now = std::time::Instant::now();
        if !room(lock.promises.held(now)) {
            return Ok(Err(UploadRefusal::StorageFull));
        }
        let mut txn = Txn::new();
        txn.put(Key::file(id), record);
        txn.batch.insert(Key::uploading(user, id).as_ref(), &[][..]);
        txn.batch.insert(Key::file_expiry(record.expires_ms, id).as_ref(), &[][..]);
        let stored = stored + charged_bytes(record.size);
        txn.batch.insert(Key::stored_bytes(user).as_ref(), &stored.to_be_bytes()[..]);
        let (offset, size) = (record.offset().min(record.size), record.size);
        let promise = |p: &mut Promises| p.promise(*id, size - offset, offset, now, hold);
        Ok(Ok(self.commit_pending(lock, txn, user, stored, (*id, true), promise)?))
    }

    /// Hands `txn` to the committer under the files lock `lock` (so batches are applied
    /// in the order their checks ran), records it as pending for `user` (its stored
    /// bytes become `stored`, `upload` is added or removed) and changes the promises by
    /// `promise`, lets the lock go and waits until it is applied, then drops it from
    /// the pending changes. Blocking.
    fn commit_pending(
        &self,
        mut lock: MutexGuard<'_, FilesLock>,
        txn: Txn,
        user: UserId,
        stored: u64,
        upload: (FileId, bool),
        promise: impl FnOnce(&mut Promises),
    ) -> Result<Durable> {
        self.index_write(move || {
            let applying = self.committer.send_apply(txn.batch)?;
            let batch = lock.next_batch;
            lock.next_batch += 1;
            let pending = lock.pending.entry(user).or_default();
            pending.stored = stored;
            pending.uploads.push((batch, upload.0, upload.1));
            pending.batches += 1;
            promise(&mut lock.promises);
            drop(lock);
            let applied = applying.wait();
            let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pending) = lock.pending.get_mut(&user) {
                // Applied (or failed: then the tree, without it, is the truth), and so is
                // every batch before it.
                pending.uploads.retain(|(b, _, _)| *b > batch);
                pending.batches -= 1;
                if pending.batches == 0 {
                    // Everything it listed is in the tree now.
                    lock.pending.remove(&user);
                }
            }
            applied
        })
    }

    /// `user`'s stored bytes as the batches handed over so far leave them (under the
    /// files lock).
    fn stored_now(&self, lock: &FilesLock, user: UserId) -> Result<u64> {
        match lock.pending.get(&user) {
            Some(pending) => Ok(pending.stored),
            None => self.stored_bytes(user),
        }
    }

    /// How many uploads `user` has in progress as the batches handed over so far leave
    /// them, counting at most `limit` (under the files lock).
    fn uploads_now(&self, lock: &FilesLock, user: UserId, limit: usize) -> Result<usize> {
        let ops = lock.pending.get(&user).map_or(&[][..], |p| &p.uploads[..]);
        let mut ids = HashSet::new();
        // Enough that `limit` remain after every pending removal.
        for item in self.db.scan_prefix(Key::uploading_of(user)).take(limit.saturating_add(ops.len())) {
            let (k, _) = item?;
            ids.insert(k.to_vec());
        }
        for (_, id, added) in ops {
            let key = Key::uploading(user, id).as_ref().to_vec();
            if *added {
                ids.insert(key);
            } else {
                ids.remove(&key);
            }
        }
        Ok(ids.len())
    }

    /// Whether a batch handed over and not yet applied removes upload `id` of `user`.
    fn removal_pending(lock: &FilesLock, user: UserId, id: &FileId) -> bool {
        lock.pending
            .get(&user)
            .and_then(|p| p.uploads.iter().rev().find(|(_, u, _)| u == id))
            .is_some_and(|(_, _, a)| !a)
    }

    /// Whether upload `id` may write a chunk of `len` bytes: at once if its promise holds
    /// (its bytes are counted already), else only if `room`, given the bytes the
    /// uploads' promises hold, says the disk has room for `len` beside them and the
    /// reserve, so a lapsed upload writes on spare room only and never into what others
    /// hold. Two lapsed uploads checking at once may both write one chunk: the
    /// overshoot is bounded by the chunks being written at once (`transfer_buffer_bytes`).
    pub fn chunk_room(&self, id: &FileId, len: u64, room: impl FnOnce(u64, u64) -> bool) -> bool {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        lock.promises.holds(id, now) || room(lock.promises.held(now), len)
    }

    /// Bytes still to come of the uploads in progress whose promises hold (declared
    /// size minus durable offset; `promises` says which hold), as `begin_upload` counts
    /// them.
    pub fn promised_bytes(&self) -> u64 {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).promises.held(std::time::Instant::now())
    }

    /// How many uploads `user` has in progress, counting at most `limit`.
    pub fn uploads_of(&self, user: UserId, limit: usize) -> Result<usize> {
        let mut n = 0;
        for item in self.db.scan_prefix(Key::uploading_of(user)).take(limit) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// `user`'s uploads in progress (verification included) with ids above `after` (all
    /// if `None`), by ascending id, at most `limit`, and whether more follow.
    pub fn uploads_page(
        &self,
        user: UserId,
        after: Option<&FileId>,
        limit: usize,
    ) -> Result<(Vec<(FileId, FileRecord)>, bool)> {
        let after = after.map(|id| Key::uploading(user, id));
        self.index_page(Key::uploading_of(user), after, limit, |r| !r.is_complete())
    }

    /// A page of what a per-user index (`tag | user | file id`) names: the files above
    /// the key `after` whose records `keep` accepts, by ascending id, at most `limit`,
    /// and whether more follow.
    fn index_page(
        &self,
        prefix: Key,
        after: Option<Key>,
        limit: usize,
        keep: impl Fn(&FileRecord) -> bool,
    ) -> Result<(Vec<(FileId, FileRecord)>, bool)> {
        let start = match after {
            // The smallest key above `after`.
            Some(k) => {
                let mut k = k.as_ref().to_vec();
                k.push(0);
                k
            }
            None => prefix.as_ref().to_vec(),
        };
        let mut out = Vec::new();
        for item in self.db.range(start..).keys() {
            let k = item?;
            if !k.starts_with(prefix.as_ref()) {
                break;
            }
            let id = file_id_at(&k, 9)?;
            match self.file(&id)? {
                Some(record) if keep(&record) => {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push((id, record));
                }
                _ => {}
            }
        }
        Ok((out, false))
    }

    /// Bytes `user`'s quota counts now.
    pub fn stored_bytes(&self, user: UserId) -> Result<u64> {
        Ok(self.db.get(Key::stored_bytes(user))?.and_then(|v| keys::u64_from(&v)).unwrap_or(0))
    }

    /// Records that an upload's bytes below `offset` are durable in its partial file (the
    /// caller fsynced them), and its published type if the first bytes changed it. A
    /// single-key write; the returned future resolves once a group commit covers it.
    /// `None` if the upload is no longer in progress (cancelled, expired, complete). A
    /// lapsed promise is not taken again here (`set_upload_offset_within` does that):
    /// for rewinds and repairs.
    pub fn set_upload_offset(&self, id: &FileId, offset: u64, content_type: Option<&str>) -> Result<Option<Durable>> {
        self.set_upload_offset_within(id, offset, content_type, |_, _| false)
    }

    /// `set_upload_offset` for bytes an upload's stream stored: a lapsed promise due for
    /// renewal (`Promises::advance`) is taken again if `room`, given the bytes the other
    /// uploads hold and the rest of this one, says the disk has room for the rest.
    pub fn set_upload_offset_within(
        &self,
        id: &FileId,
        offset: u64,
        content_type: Option<&str>,
        room: impl FnOnce(u64, u64) -> bool,
    ) -> Result<Option<Durable>> {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut record) = self.file(id)? else { return Ok(None) };
        let FileStage::Uploading { .. } = record.stage else { return Ok(None) };
        if Self::removal_pending(&lock, record.uploader, id) {
            return Ok(None);
        }
        record.stage = FileStage::Uploading { offset };
        if let Some(t) = content_type {
            record.content_type = t.to_owned();
        }
        self.db.insert(Key::file(id), encode(&record))?;
        lock.promises.advance(*id, record.size, offset, std::time::Instant::now(), room);
        Ok(Some(self.barrier()?))
    }

    /// Marks a verified upload as publishing (`FileStage::Publishing`): the record now
    /// refers to the blob of `record.blake3` (one more reference). Call before the
    /// partial file becomes that blob, and wait for the returned future. `None` if the
    /// upload is not in progress at full size. Idempotent. Blocking (a catalog batch).
    pub fn begin_publish(&self, id: &FileId) -> Result<Option<Durable>> {
        let _guard = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut record) = self.file(id)? else { return Ok(None) };
        match record.stage {
            FileStage::Publishing => return Ok(Some(self.barrier()?)),
            FileStage::Uploading { offset } if offset == record.size => {}
            _ => return Ok(None),
        }
        let mut txn = Txn::new();
        let refs = self.blob_refs(&record.blake3)?;
        txn.batch.insert(Key::blob_refs(&record.blake3).as_ref(), &(refs + 1).to_be_bytes()[..]);
        record.stage = FileStage::Publishing;
        txn.put(Key::file(id), &record);
        Ok(Some(self.commit(txn)?))
    }

    /// Publishes an upload marked by `begin_publish` whose bytes are now the blob of
    /// `record.blake3`: the record becomes complete and held and the upload leaves the
    /// in-progress and expiry indexes (its quota stays counted, its blob reference
    /// stays). `None` if the upload is not publishing. Blocking (a catalog batch).
    pub fn complete_upload(&self, id: &FileId) -> Result<Option<(FileRecord, Durable)>> {
        let lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut record) = self.file(id)? else { return Ok(None) };
        if record.stage != FileStage::Publishing {
            return Ok(None);
        }
        let mut txn = Txn::new();
        txn.batch.remove(Key::uploading(record.uploader, id).as_ref());
        txn.batch.remove(Key::file_expiry(record.expires_ms, id).as_ref());
        txn.batch.insert(Key::stored_file(record.uploader, id).as_ref(), &[][..]);
        record.stage = FileStage::Complete { thumbnail: None };
        record.expires_ms = 0;
        txn.put(Key::file(id), &record);
        // Its quota stays counted; it leaves the uploads in progress.
        let (user, stored) = (record.uploader, self.stored_now(&lock, record.uploader)?);
        let durable = self.commit_pending(lock, txn, user, stored, (*id, false), |p| p.remove(id))?;
        Ok(Some((record, durable)))
    }

    /// Sends a publishing upload whose bytes are lost (neither its partial file nor its
    /// blob exists) back to offset 0, dropping its blob reference. `false` if it was not
    /// publishing. Blocking (a catalog batch); resolves once durable.
    pub fn restart_upload(&self, id: &FileId) -> Result<Option<Durable>> {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut record) = self.file(id)? else { return Ok(None) };
        if record.stage != FileStage::Publishing {
            return Ok(None);
        }
        let mut txn = Txn::new();
        match self.blob_refs(&record.blake3)?.saturating_sub(1) {
            0 => txn.batch.remove(Key::blob_refs(&record.blake3).as_ref()),
            refs => txn.batch.insert(Key::blob_refs(&record.blake3).as_ref(), &refs.to_be_bytes()[..]),
        }
        record.stage = FileStage::Uploading { offset: 0 };
        txn.put(Key::file(id), &record);
        let durable = self.commit(txn)?;
        lock.promises.promise(*id, record.size, 0, std::time::Instant::now(), true);
        Ok(Some(durable))
    }

    /// Records a complete thumbnail `thumb` (whose bytes are the blob of
    /// `record.blake3`) of the complete file `parent`. `None` if `parent` is gone, not
    /// complete, or has a thumbnail already (a file has one; nothing is recorded, so
    /// no blob reference is taken). Blocking (a catalog batch).
    pub fn add_thumbnail(
        &self,
        parent: &FileId,
        thumb: &FileId,
        record: &FileRecord,
    ) -> Result<Option<(FileRecord, Durable)>> {
        let _guard = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut file) = self.file(parent)? else { return Ok(None) };
        if file.stage != (FileStage::Complete { thumbnail: None }) {
            return Ok(None);
        }
        let mut txn = Txn::new();
        let refs = self.blob_refs(&record.blake3)?;
        txn.batch.insert(Key::blob_refs(&record.blake3).as_ref(), &(refs + 1).to_be_bytes()[..]);
        txn.put(Key::file(thumb), record);
        file.stage = FileStage::Complete { thumbnail: Some(*thumb) };
        txn.put(Key::file(parent), &file);
        Ok(Some((file, self.commit(txn)?)))
    }

    /// Removes an upload in progress (cancelled, failed or expired; not one publishing)
    /// and gives its charge (`charged_bytes` of its declared size) back to the uploader's quota. Returns the record
    /// removed, or `None` if there was no upload in progress under `id`. The caller
    /// deletes the partial file only once the returned future resolves. Blocking (a
    /// catalog batch).
    pub fn remove_upload(&self, id: &FileId) -> Result<Option<(FileRecord, Durable)>> {
        let lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(record) = self.file(id)? else { return Ok(None) };
        if !matches!(record.stage, FileStage::Uploading { .. }) || Self::removal_pending(&lock, record.uploader, id) {
            return Ok(None);
        }
        let mut txn = Txn::new();
        txn.batch.remove(Key::file(id).as_ref());
        txn.batch.remove(Key::uploading(record.uploader, id).as_ref());
        txn.batch.remove(Key::file_expiry(record.expires_ms, id).as_ref());
        let stored = self.stored_now(&lock, record.uploader)?.saturating_sub(charged_bytes(record.size));
        txn.batch.insert(Key::stored_bytes(record.uploader).as_ref(), &stored.to_be_bytes()[..]);
        let durable = self.commit_pending(lock, txn, record.uploader, stored, (*id, false), |p| p.remove(id))?;
        Ok(Some((record, durable)))
    }

    /// The uploader lets go of its complete file: it is marked for `collect_file`, and
    /// keeps counting against the uploader's quota until that deletes it (no message
    /// carries it any more). `None` if it is not a complete file the uploader still
    /// holds. Blocking (a catalog batch); resolves once durable.
    pub fn drop_hold(&self, id: &FileId) -> Result<Option<Durable>> {
        let _guard = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut record) = self.file(id)? else { return Ok(None) };
        if !record.is_complete() || !record.held || record.parent.is_some() {
            return Ok(None);
        }
        record.held = false;
        let mut txn = Txn::new();
        txn.put(Key::file(id), &record);
        txn.batch.insert(Key::file_unheld(id).as_ref(), &[][..]);
        Ok(Some(self.commit(txn)?))
    }

    /// The uploader takes its complete file back from every message of its own carrying
    /// it and lets go of it (`WithdrawFile`): first its hold goes and it is marked for
    /// `collect_file` (one catalog batch under the files lock), then its attachment keys
    /// go one by one outside the lock (as messages write them), only those of messages
    /// the uploader sent (a data dir from before forwards were copies may have others'
    /// messages carry it: they keep it), each a single-key write riding the next group
    /// commit. The messages themselves are not changed. `None` if it is not a complete
    /// file of `uploader` (a thumbnail neither). Blocking; resolves once all of it is
    /// durable. A message written meanwhile that carries it (a send racing this) keeps
    /// it. Each message it is taken from is marked first (`Key::withdrawn`, until the
    /// file is collected), so the crash repair of a conversation's newest entry does not
    /// give it back (before, it did).
    pub fn withdraw_file(&self, id: &FileId, uploader: UserId) -> Result<Option<Durable>> {
        {
            let _guard = self.files.lock().unwrap_or_else(|p| p.into_inner());
            let Some(mut record) = self.file(id)? else { return Ok(None) };
            if !record.is_complete() || record.parent.is_some() || record.uploader != uploader {
                return Ok(None);
            }
            record.held = false;
            let mut txn = Txn::new();
            txn.put(Key::file(id), &record);
            txn.batch.insert(Key::file_unheld(id).as_ref(), &[][..]);
            drop(self.commit(txn)?);
        }
        for item in self.db.scan_prefix(Key::attached_of(id)).keys() {
            let key = item?;
            let conv = keys::u64_from(&key[17..25]).ok_or_else(|| corrupt(&key, "attachment key"))?;
            let seq = keys::u64_from(&key[25..33]).ok_or_else(|| corrupt(&key, "attachment key"))?;
            if self.entry(conv, seq)?.is_none_or(|e| e.sender == uploader) {
                // Before the access goes (sled recovers a prefix of its log): the repair
                // after a crash must not write it back for the newest entry (`write_effects`).
                self.db.insert(Key::withdrawn(id, conv, seq), &[][..])?;
                self.db.remove(key)?;
            }
        }
        Ok(Some(self.barrier()?))
    }

    /// `forwarder` sends the complete file `original`, uploaded by someone else: the
    /// message carries a copy of the forwarder's own, so the uploader's quota never
    /// depends on what others keep (its `DeleteFile` and the deletion of its own
    /// messages free it, whoever forwarded the file). The copy shares the stored bytes
    /// (one more blob reference) and the original's thumbnail if it has one
    /// (`fresh` names the thumbnail's copy), counts against the forwarder's quota,
    /// is held by nobody (it lives while a message carries it, like a file its uploader
    /// dropped), and is not collected while this send is unanswered (counted in here,
    /// out by `settle_send`) nor, should nobody settle it (a crash), before
    /// `now_ms + grace_ms`; marked unheld, it goes after that if no message carries it.
    /// A later forward of `original` by the same user reuses the copy (counted in
    /// again, its grace renewed), so a file forwarded to many conversations counts
    /// once. Blocking (a catalog batch, applied before this returns; the message's own
    /// commit makes it durable).
    pub fn forward_file(
        &self,
        original: &FileId,
        forwarder: UserId,
        copy: FileId,
        fresh: impl FnOnce() -> FileId,
        quota_bytes: impl FnOnce() -> u64,
        (now_ms, grace_ms): (u64, u64),
    ) -> Result<Forwarded> {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let Some(source) = self.file(original)? else { return Ok(Forwarded::Gone) };
        if !source.is_complete() || source.parent.is_some() {
            return Ok(Forwarded::Gone);
        }
        let until = now_ms.saturating_add(grace_ms);
        let mut txn = Txn::new();
        if let Some(v) = self.db.get(Key::forward_copy(forwarder, original))? {
            let id = file_id_at(&v, 0)?;
            if let Some(mut record) = self.file(&id)? {
                record.expires_ms = record.expires_ms.max(until);
                txn.put(Key::file(&id), &record);
                txn.batch.insert(Key::file_unheld(&id).as_ref(), &[][..]);
                // Ordered under the lock, waited for after it: the lock is never held
                // through a commit the committer is finishing (a user forwarding
                // over and over held every other user's file writes behind it). No
                // count is written here, and the copy stays uncollected meanwhile
                // (`unsettled`, counted before the lock goes).
                drop(self.index_write(move || {
                    let applying = self.committer.send_apply(txn.batch)?;
                    *lock.unsettled.entry(id).or_default() += 1;
                    drop(lock);
                    applying.wait().inspect_err(|_| {
                        let _ = self.settle_send(&id, false);
                    })
                })?);
                return Ok(Forwarded::Copy { id, record, new: false });
            }
        }
        let stored = self.stored_now(&lock, forwarder)?;
        if stored.saturating_add(charged_bytes(source.size)) > quota_bytes() {
            return Ok(Forwarded::QuotaExceeded { used: stored });
        }
        let mut refs: HashMap<Blake3, u64> = HashMap::new();
        let mut thumbnail = None;
        if let FileStage::Complete { thumbnail: Some(t) } = source.stage
            && let Some(mut thumb) = self.file(&t)?
        {
            let id = fresh();
            thumb.uploader = forwarder;
            thumb.created_ms = now_ms;
            thumb.parent = Some(copy);
            *refs.entry(thumb.blake3).or_insert(self.blob_refs(&thumb.blake3)?) += 1;
            txn.put(Key::file(&id), &thumb);
            thumbnail = Some(id);
        }
        let record = FileRecord {
            uploader: forwarder,
            created_ms: now_ms,
            expires_ms: until,
            stage: FileStage::Complete { thumbnail },
            parent: None,
            held: false,
            ..source
        };
        *refs.entry(record.blake3).or_insert(self.blob_refs(&record.blake3)?) += 1;
        for (hash, n) in refs {
            txn.batch.insert(Key::blob_refs(&hash).as_ref(), &n.to_be_bytes()[..]);
        }
        txn.put(Key::file(&copy), &record);
        txn.batch.insert(Key::stored_file(forwarder, &copy).as_ref(), &[][..]);
        txn.batch.insert(Key::file_unheld(&copy).as_ref(), &[][..]);
        txn.batch.insert(Key::forward_copy(forwarder, original).as_ref(), &copy[..]);
        txn.batch.insert(Key::copy_of(&copy).as_ref(), &original[..]);
        let stored = stored + charged_bytes(record.size);
        txn.batch.insert(Key::stored_bytes(forwarder).as_ref(), &stored.to_be_bytes()[..]);
        if let Some(pending) = lock.pending.get_mut(&forwarder) {
            pending.stored = stored;
        }
        // Applied under the lock: the blob counts above were read from the tree, and a
        // check of another forward, a collection or a publish must not read them before
        // this batch is in (both would write the same count, one reference short, and
        // the bytes would go while a file still names them). A new copy is charged to
        // the forwarder's quota, which bounds how often one is made.
        drop(self.commit(txn)?);
        *lock.unsettled.entry(copy).or_default() += 1;
        Ok(Forwarded::Copy { id: copy, record, new: true })
    }

    /// A send is about to carry `id`, its sender's own file (complete or still
    /// uploading): until the send is answered (`settle_send`), a `drop_hold` and the
    /// deletion of the last message carrying it leave it where it is, so the message
    /// being written never carries a file already gone. `false` if there is no such
    /// file any more (it went after the sender's checks). In memory, no write.
    pub fn count_send(&self, id: &FileId) -> Result<bool> {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        match self.file(id)? {
            Some(record) if record.parent.is_none() => {
                *lock.unsettled.entry(*id).or_default() += 1;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// One send that carries `id` (a forward's copy from `forward_file`, or a file
    /// counted by `count_send`) was answered. Once no such send is left unanswered, and
    /// `ended` (the answer says whether the message was written: anything but an
    /// internal failure), a copy's grace ends: from then on the file goes with the last
    /// message carrying it, at once if none does and nobody holds it (the caller
    /// collects it: `true`). Without `ended` a copy's stored grace, or the sweep of
    /// files whose hold was dropped, decides. A copy's end of grace is a single-key
    /// write riding the next group commit.
    pub fn settle_send(&self, id: &FileId, ended: bool) -> Result<bool> {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        match lock.unsettled.get_mut(id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return Ok(false);
            }
            Some(_) => {
                lock.unsettled.remove(id);
            }
            None => {}
        }
        if !ended {
            return Ok(false);
        }
        let Some(mut record) = self.file(id)? else { return Ok(false) };
        if !record.is_complete() || record.held {
            return Ok(false);
        }
        if record.expires_ms != 0 {
            record.expires_ms = 0;
            self.db.insert(Key::file(id), encode(&record))?;
        }
        Ok(true)
    }

    /// Deletes the complete file `id` (and its thumbnail) if nothing holds it any more:
    /// its uploader dropped its hold and no message that is not deleted carries it; its
    /// size then leaves the uploader's quota. A forward's copy within its grace
    /// (`forward_file`) stays, and so does its mark: nothing is deleted before `now_ms`
    /// passes the grace. Otherwise the mark (`file_unheld`) goes, unless a message's
    /// delete marked the file again meanwhile (it writes the mark without the files
    /// lock: the mark is taken away only if it still holds the value read before the
    /// messages were looked at). A thumbnail goes only with its file. Blobs left with no
    /// reference are returned for the caller to delete. Blocking (a catalog batch).
    pub fn collect_file(&self, id: &FileId, now_ms: u64) -> Result<Collected> {
        Ok(self.collect_file_with(id, now_ms, |_, _| ())?.0)
    }

    /// `collect_file`, calling `release(owner, charge)` under the files lock just before
    /// the deletion gives `charge` bytes of `owner`'s quota back (not at all if nothing
    /// is deleted), and returning what it returned: whoever must keep those bytes
    /// counted until the blob is freed takes them over there. Blocking.
    pub fn collect_file_with<R>(
        &self,
        id: &FileId,
        now_ms: u64,
        release: impl FnOnce(UserId, u64) -> R,
    ) -> Result<(Collected, Option<R>)> {
        let mut lock = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let mark = self.db.get(Key::file_unheld(id))?;
        let record = self.file(id)?;
        let carried = self.db.scan_prefix(Key::attached_of(id)).next().is_some();
        let unsettled = lock.unsettled.contains_key(id);
        let waiting =
            record.as_ref().is_some_and(|r| r.is_complete() && (r.expires_ms > now_ms || unsettled)) && !carried;
        #[cfg(test)]
        if let Some(looked) = self.collect_looked.get() {
            looked(self);
        }
        if waiting {
            return Ok((Collected { unreferenced: Vec::new(), durable: Durable::ready(), owner: None }, None));
        }
        let mut txn = Txn::new();
        let mut unreferenced = Vec::new();
        let mut owner = None;
        let mut released = None;
        if let Some(record) = record
            && record.is_complete()
            && !record.held
            && record.parent.is_none()
            && !carried
        {
            owner = Some((record.uploader, record.blake3));
            released = Some(release(record.uploader, charged_bytes(record.size)));
            if let Some(original) = self.db.get(Key::copy_of(id))? {
                txn.batch.remove(Key::copy_of(id).as_ref());
                txn.batch.remove(Key::forward_copy(record.uploader, &file_id_at(&original, 0)?).as_ref());
            }
            let mut files = vec![(*id, record)];
            if let Some(FileStage::Complete { thumbnail: Some(t) }) = files.first().map(|f| f.1.stage.clone())
                && let Some(thumb) = self.file(&t)?
            {
                files.push((t, thumb));
            }
            // Two files of one blob in this batch: count from what the batch wrote.
            let mut refs: HashMap<Blake3, u64> = HashMap::new();
            for (file, record) in files {
                txn.batch.remove(Key::file(&file).as_ref());
                for withdrawn in self.db.scan_prefix(Key::withdrawn_of(&file)).keys() {
                    txn.batch.remove(withdrawn?);
                }
                if record.parent.is_none() {
                    txn.batch.remove(Key::stored_file(record.uploader, &file).as_ref());
                    // Its bytes go: the uploader's quota stops counting them. Handed over
                    // after any pending batch of the user's, so its value is the newest.
                    let stored = self.stored_now(&lock, record.uploader)?.saturating_sub(charged_bytes(record.size));
                    txn.batch.insert(Key::stored_bytes(record.uploader).as_ref(), &stored.to_be_bytes()[..]);
                    if let Some(pending) = lock.pending.get_mut(&record.uploader) {
                        pending.stored = stored;
                    }
                }
                let n = match refs.get(&record.blake3) {
                    Some(n) => *n,
                    None => self.blob_refs(&record.blake3)?,
                };
                refs.insert(record.blake3, n.saturating_sub(1));
            }
            for (hash, n) in refs {
                if n == 0 {
                    txn.batch.remove(Key::blob_refs(&hash).as_ref());
                    unreferenced.push(hash);
                } else {
                    txn.batch.insert(Key::blob_refs(&hash).as_ref(), &n.to_be_bytes()[..]);
                }
            }
        }
        let durable = if owner.is_some() { self.commit(txn)? } else { Durable::ready() };
        if let Some(mark) = mark {
            // Applied: take the mark away unless a delete wrote it again meanwhile.
            let _ = self.db.compare_and_swap(Key::file_unheld(id), Some(mark), None::<&[u8]>)?;
        }
        Ok((Collected { unreferenced, durable, owner }, released))
    }

    /// Complete files marked as possibly unheld, by ascending id after `after`, at most
    /// `limit`.
    pub fn unheld_files(&self, after: Option<&FileId>, limit: usize) -> Result<Vec<FileId>> {
        let mut out = Vec::new();
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(Key::file_unheld(id).as_ref().to_vec()),
            None => std::ops::Bound::Included(Key::files_unheld().as_ref().to_vec()),
        };
        let prefix = Key::files_unheld();
        for item in self.db.range::<Vec<u8>, _>((from, std::ops::Bound::Unbounded)).take(limit) {
            let (k, _) = item?;
            if !k.starts_with(prefix.as_ref()) {
                break;
            }
            out.push(file_id_at(&k, 1)?);
        }
        Ok(out)
    }

    /// Uploads whose expiry is at or before `now_ms`, at most `limit`, oldest first.
    pub fn expired_uploads(&self, now_ms: u64, limit: usize) -> Result<Vec<FileId>> {
        let mut out = Vec::new();
        let range = Key::file_expiries().as_ref().to_vec()..=Key::file_expiry_until(now_ms).as_ref().to_vec();
        for item in self.db.range(range).take(limit) {
            let (k, _) = item?;
            out.push(file_id_at(&k, 9)?);
        }
        Ok(out)
    }

    /// Every upload in progress with its record (startup repair).
    pub fn uploads_in_progress(&self) -> Result<Vec<(FileId, FileRecord)>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::uploads()) {
            let (k, _) = item?;
            let id = file_id_at(&k, 9)?;
            if let Some(record) = self.file(&id)? {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    /// A page of `user`'s stored files (complete, not thumbnails, counted in its quota
    /// until collected, held or not), by ascending id after `after`, at most `limit`;
    /// and whether more follow.
    pub fn stored_files_page(
        &self,
        user: UserId,
        after: Option<&FileId>,
        limit: usize,
    ) -> Result<(Vec<(FileId, FileRecord)>, bool)> {
        let after = after.map(|id| Key::stored_file(user, id));
        self.index_page(Key::stored_files_of(user), after, limit, FileRecord::is_complete)
    }

    /// Builds the index of stored files (`stored_files_page`) for a data dir written
    /// before it existed (format 3), then records format 4. Crash-safe: the inserts are
    /// idempotent and the format is written last.
    pub(crate) fn upgrade_to_format_4(&self) -> Result<()> {
        if self.stored_format()? >= 4 {
            return Ok(());
        }
        let mut indexed = 0usize;
        for item in self.db.scan_prefix(Key::files()) {
            let (k, v) = item?;
            let record: FileRecord = decode(&k, &v)?;
            let id = file_id_at(&k, 1)?;
            if record.is_complete() && record.parent.is_none() {
                self.db.insert(Key::stored_file(record.uploader, &id), &[][..])?;
                indexed += 1;
            }
        }
        self.db.insert(Key::format(), &4u64.to_be_bytes()[..])?;
        if indexed > 0 {
            tracing::info!(files = indexed, "indexed stored files for format 4");
        }
        Ok(())
    }

    /// Recounts every user's stored bytes in whole blocks (`charged_bytes`) for a data
    /// dir whose quotas counted declared bytes (format 4 and older), then records format
    /// 5: each user's files and uploads (records that are not thumbnails) summed afresh,
    /// a user with none set to 0. Runs at open, before anything else uses the store.
    /// Crash-safe: the values are computed from the records alone and the format is
    /// written last.
    pub(crate) fn upgrade_to_format_5(&self) -> Result<()> {
        if self.stored_format()? >= 5 {
            return Ok(());
        }
        let mut stored: HashMap<UserId, u64> = HashMap::new();
        for item in self.db.scan_prefix(Key::files()) {
            let (k, v) = item?;
            let record: FileRecord = decode(&k, &v)?;
            if record.parent.is_none() {
                *stored.entry(record.uploader).or_default() += charged_bytes(record.size);
            }
        }
        for item in self.db.scan_prefix(Key::all_stored_bytes()) {
            let (k, _) = item?;
            let user = k.get(1..9).and_then(keys::u64_from).ok_or_else(|| corrupt(&k, "stored bytes key"))?;
            stored.entry(user).or_default();
        }
        for (user, bytes) in &stored {
            self.db.insert(Key::stored_bytes(*user), &bytes.to_be_bytes()[..])?;
        }
        self.db.insert(Key::format(), &5u64.to_be_bytes()[..])?;
        if !stored.is_empty() {
            tracing::info!(users = stored.len(), "recounted stored bytes in 4 KiB blocks for format 5");
        }
        Ok(())
    }

    /// How many complete files share the blob with this hash.
    pub fn blob_refs(&self, hash: &Blake3) -> Result<u64> {
        Ok(self.db.get(Key::blob_refs(hash))?.and_then(|v| keys::u64_from(&v)).unwrap_or(0))
    }

    /// Conversations where a message that is not deleted carries `file`, at most
    /// `limit`, ascending, each with the seq of its first such message: one seek per
    /// conversation, however many messages of one conversation carry it.
    pub fn attachment_convs(&self, file: &FileId, limit: usize) -> Result<Vec<(ConvId, Seq)>> {
        let mut out = Vec::new();
        let end = Key::attached(file, ConvId::MAX, Seq::MAX);
        let mut from = Key::attached(file, 0, 0);
        while out.len() < limit {
            let Some(item) = self.db.range(from.as_ref()..=end.as_ref()).next() else { break };
            let (k, _) = item?;
            let conv = keys::u64_from(&k[17..25]).ok_or_else(|| corrupt(&k, "attachment key"))?;
            let seq = keys::u64_from(&k[25..33]).ok_or_else(|| corrupt(&k, "attachment key"))?;
            out.push((conv, seq));
            if conv == ConvId::MAX {
                break;
            }
            from = Key::attached(file, conv + 1, 0);
        }
        Ok(out)
    }

    /// Messages carrying `file` (not deleted), at most `limit`, by conversation then seq.
    pub fn attachments(&self, file: &FileId, limit: usize) -> Result<Vec<(ConvId, Seq)>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::attached_of(file)).take(limit) {
            let (k, _) = item?;
            let conv = keys::u64_from(&k[17..25]).ok_or_else(|| corrupt(&k, "attachment key"))?;
            let seq = keys::u64_from(&k[25..33]).ok_or_else(|| corrupt(&k, "attachment key"))?;
            out.push((conv, seq));
        }
        Ok(out)
    }
}

fn file_id_at(k: &[u8], at: usize) -> Result<FileId> {
    k.get(at..at + 16).and_then(|s| s.try_into().ok()).ok_or_else(|| corrupt(k, "file key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convs_of(firsts: Vec<(ConvId, Seq)>) -> Vec<ConvId> {
        firsts.into_iter().map(|(conv, _)| conv).collect()
    }
    use crate::StoreConfig;
    use std::time::Duration;
    use switchboard_protocol::{Body, Entry, FileRef};

    fn open(dir: &std::path::Path) -> Store {
        let mut config = StoreConfig::new(dir.join("db"));
        config.cache_capacity_bytes = 4 * 1024 * 1024;
        Store::open(&config).unwrap()
    }

    fn record(user: UserId, size: u64, hash: u8) -> FileRecord {
        FileRecord {
            name: "a.bin".into(),
            size,
            declared_type: "application/octet-stream".into(),
            content_type: "application/octet-stream".into(),
            blake3: [hash; 32],
            uploader: user,
            created_ms: 1,
            expires_ms: 1000 + size,
            stage: FileStage::Uploading { offset: 0 },
            parent: None,
            held: true,
        }
    }

    fn entry(conv: ConvId, seq: Seq, body: Body) -> Entry {
        Entry { conv, seq, sender: 1, sender_device: 1, client_id: [seq as u8; 16], at_ms: 0, body }
    }

    async fn append(store: &Store, e: Entry) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.append_then(&e, move |r| tx.send(r).unwrap()).unwrap();
        rx.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_users_uploads_are_listed_in_pages_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for id in [[3; 16], [1; 16], [2; 16]] {
            store
                .begin_upload(&id, &record(7, 10, id[0]), 8, || u64::MAX, |_| true, true)
                .unwrap()
                .unwrap()
                .await
                .unwrap();
        }
        store
            .begin_upload(&[9; 16], &record(8, 10, 9), 8, || u64::MAX, |_| true, true)
            .unwrap()
            .unwrap()
            .await
            .unwrap();
        let ids = |page: &[(FileId, FileRecord)]| page.iter().map(|(id, _)| id[0]).collect::<Vec<_>>();
        assert_eq!(ids(&store.uploads_page(8, None, 8).unwrap().0), vec![9], "another user's are left out");
        let (page, more) = store.uploads_page(7, None, 2).unwrap();
        assert_eq!((ids(&page), more), (vec![1, 2], true), "ascending ids");
        let (page, more) = store.uploads_page(7, Some(&[2; 16]), 2).unwrap();
        assert_eq!((ids(&page), more), (vec![3], false));
        assert_eq!(page[0].1.blake3, [3; 32]);
        store.remove_upload(&[1; 16]).unwrap().unwrap().1.await.unwrap();
        assert_eq!(ids(&store.uploads_page(7, None, 8).unwrap().0), vec![2, 3], "a removed upload is gone");
        assert_eq!(store.uploads_page(7, Some(&[3; 16]), 8).unwrap(), (vec![], false));
        assert_eq!(store.uploads_page(5, None, 8).unwrap(), (vec![], false));
        // One being verified is listed at its full size; a complete one is not listed.
        store.set_upload_offset(&[2; 16], 10, None).unwrap().unwrap().await.unwrap();
        store.begin_publish(&[2; 16]).unwrap().unwrap().await.unwrap();
        let (page, _) = store.uploads_page(7, None, 8).unwrap();
        assert_eq!((ids(&page), page[0].1.offset()), (vec![2, 3], 10));
        store.complete_upload(&[2; 16]).unwrap().unwrap().1.await.unwrap();
        assert_eq!(ids(&store.uploads_page(7, None, 8).unwrap().0), vec![3]);
    }

    /// Begins, fills and completes an upload of `user`.
    async fn stored(store: &Store, id: FileId, user: UserId, hash: u8) {
        store
            .begin_upload(&id, &record(user, 10, hash), 8, || u64::MAX, |_| true, true)
            .unwrap()
            .unwrap()
            .await
            .unwrap();
        store.set_upload_offset(&id, 10, None).unwrap().unwrap().await.unwrap();
        store.begin_publish(&id).unwrap().unwrap().await.unwrap();
        store.complete_upload(&id).unwrap().unwrap().1.await.unwrap();
    }

    #[tokio::test]
    async fn a_users_stored_files_are_listed_until_collected_and_indexed_on_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let ids = |page: &[(FileId, FileRecord)]| page.iter().map(|(id, _)| id[0]).collect::<Vec<_>>();
        {
            let store = open(dir.path());
            for (id, hash) in [([3; 16], 3), ([1; 16], 1), ([2; 16], 2)] {
                stored(&store, id, 7, hash).await;
            }
            stored(&store, [9; 16], 8, 9).await;
            store
                .begin_upload(&[5; 16], &record(7, 10, 5), 8, || u64::MAX, |_| true, true)
                .unwrap()
                .unwrap()
                .await
                .unwrap();
            let (page, more) = store.stored_files_page(7, None, 2).unwrap();
            assert_eq!((ids(&page), more), (vec![1, 2], true), "complete ones only, ascending");
            let (page, more) = store.stored_files_page(7, Some(&[2; 16]), 2).unwrap();
            assert_eq!((ids(&page), more), (vec![3], false));
            assert_eq!(ids(&store.stored_files_page(8, None, 8).unwrap().0), vec![9], "another user's apart");
            // Dropped and collected: no longer listed (nor counted).
            store.drop_hold(&[1; 16]).unwrap().unwrap().await.unwrap();
            assert!(!store.stored_files_page(7, None, 8).unwrap().0[0].1.held, "listed, not held, until collected");
            store.collect_file(&[1; 16], 0).unwrap().durable.await.unwrap();
            assert_eq!(ids(&store.stored_files_page(7, None, 8).unwrap().0), vec![2, 3]);
            // A data dir of format 3 had no index: take it away and say so.
            for user in [7u64, 8] {
                for k in store.db.scan_prefix(Key::stored_files_of(user)).keys() {
                    store.db.remove(k.unwrap()).unwrap();
                }
            }
            store.db.insert(Key::format(), &3u64.to_be_bytes()[..]).unwrap();
            assert!(store.stored_files_page(7, None, 8).unwrap().0.is_empty());
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(ids(&store.stored_files_page(7, None, 8).unwrap().0), vec![2, 3], "rebuilt at open");
        assert_eq!(ids(&store.stored_files_page(8, None, 8).unwrap().0), vec![9]);
        assert_eq!(store.stored_format().unwrap(), crate::FORMAT);
    }

    #[tokio::test]
    async fn quotas_counted_in_declared_bytes_are_recounted_in_blocks_on_upgrade() {
        const B: u64 = QUOTA_BLOCK;
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            // User 7: two complete files of 10 bytes (one with a thumbnail, which is not
            // charged) and an upload in progress of B + 1; user 8: one file of 10.
            stored(&store, [1; 16], 7, 1).await;
            stored(&store, [2; 16], 7, 2).await;
            let mut thumb = record(7, 3, 6);
            thumb.stage = FileStage::Complete { thumbnail: None };
            (thumb.parent, thumb.held, thumb.expires_ms) = (Some([1; 16]), false, 0);
            store.add_thumbnail(&[1; 16], &[9; 16], &thumb).unwrap().unwrap().1.await.unwrap();
            store
                .begin_upload(&[3; 16], &record(7, B + 1, 3), 8, || u64::MAX, |_| true, true)
                .unwrap()
                .unwrap()
                .await
                .unwrap();
            stored(&store, [4; 16], 8, 4).await;
            assert_eq!((store.stored_bytes(7).unwrap(), store.stored_bytes(8).unwrap()), (4 * B, B));
            // What a format-4 broker counted: declared bytes, and a user whose last file
            // went counted at 0 or, after a crash mid-way, anything.
            store.db.insert(Key::stored_bytes(7), &(B + 21).to_be_bytes()[..]).unwrap();
            store.db.insert(Key::stored_bytes(8), &10u64.to_be_bytes()[..]).unwrap();
            store.db.insert(Key::stored_bytes(6), &5u64.to_be_bytes()[..]).unwrap();
            store.db.insert(Key::format(), &4u64.to_be_bytes()[..]).unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        let counted = [6, 7, 8].map(|u| store.stored_bytes(u).unwrap());
        assert_eq!(counted, [0, 4 * B, B], "one block per small file, two for B + 1 bytes, thumbnails free");
        assert_eq!(store.stored_format().unwrap(), crate::FORMAT);
        // Counted as they go from now on.
        store.remove_upload(&[3; 16]).unwrap().unwrap().1.await.unwrap();
        assert_eq!(store.stored_bytes(7).unwrap(), 2 * B);
    }

    #[tokio::test]
    async fn a_collection_tells_who_takes_over_the_charge_only_when_it_gives_quota_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = [1; 16];
        stored(&store, a, 7, 5).await;
        // Held: nothing deleted, nobody told.
        let (c, told) = store.collect_file_with(&a, 0, |user, bytes| (user, bytes)).unwrap();
        assert!(told.is_none() && c.owner.is_none() && c.unreferenced.is_empty());
        store.drop_hold(&a).unwrap().unwrap().await.unwrap();
        // Let go: told under the lock, before the quota goes, of exactly what goes.
        let seen = std::cell::Cell::new(None);
        let (c, told) = store
            .collect_file_with(&a, 0, |user, bytes| seen.set(Some((user, bytes, store.stored_bytes(user).unwrap()))))
            .unwrap();
        c.durable.await.unwrap();
        assert!(told.is_some());
        assert_eq!(seen.get(), Some((7, QUOTA_BLOCK, QUOTA_BLOCK)), "told while the quota still counted it");
        assert_eq!((c.owner, c.unreferenced), (Some((7, [5; 32])), vec![[5; 32]]));
        assert_eq!(store.stored_bytes(7).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_withdrawn_file_leaves_every_message_of_its_uploader_and_no_one_elses() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = [1; 16];
        stored(&store, a, 7, 5).await;
        // Its uploader's messages carry it, many, in two conversations; one message of
        // someone else's too (a forward in a data dir from before forwards were copies).
        let files = vec![FileRef { file: a, name: "a.bin".into(), size: 10, content_type: "x/y".into() }];
        let body = || Body::Files { text: String::new(), files: files.clone(), edited: false };
        for seq in 1..=300 {
            append(&store, Entry { sender: 7, ..entry(9 + seq % 2, seq, body()) }).await;
        }
        append(&store, Entry { sender: 8, ..entry(11, 1, body()) }).await;
        assert_eq!(convs_of(store.attachment_convs(&a, 10).unwrap()), vec![9, 10, 11]);
        assert!(store.withdraw_file(&[2; 16], 7).unwrap().is_none(), "no such file");
        assert!(store.withdraw_file(&a, 8).unwrap().is_none(), "not user 8's");
        store.withdraw_file(&a, 7).unwrap().unwrap().await.unwrap();
        assert_eq!(store.attachments(&a, 400).unwrap(), vec![(11, 1)], "user 8's message keeps it");
        // The repair after a crash writes the newest entry's effects again: not the access
        // its uploader took back (before, conversation 10's newest message got it back).
        store.repair_newest_entry(9).unwrap();
        store.repair_newest_entry(10).unwrap();
        assert_eq!(store.attachments(&a, 400).unwrap(), vec![(11, 1)], "given back by a repair");
        // A message of the uploader's carrying it after the withdraw (a racing send) whose
        // access a crash cut short is repaired as any.
        append(&store, Entry { sender: 7, ..entry(12, 1, body()) }).await;
        store.db.remove(Key::attached(&a, 12, 1)).unwrap();
        store.repair_newest_entry(12).unwrap();
        assert_eq!(store.attachments(&a, 400).unwrap(), vec![(11, 1), (12, 1)]);
        store.db.remove(Key::attached(&a, 12, 1)).unwrap();
        assert!(!store.file(&a).unwrap().unwrap().held);
        assert_eq!(store.unheld_files(None, 10).unwrap(), vec![a]);
        // With that one gone too, it is collected.
        append(&store, Entry { sender: 8, ..entry(11, 2, Body::Delete { target: 1 }) }).await;
        let gone = store.collect_file(&a, 0).unwrap();
        gone.durable.await.unwrap();
        assert_eq!(
            (gone.unreferenced, store.file(&a).unwrap(), store.stored_bytes(7).unwrap()),
            (vec![[5; 32]], None, 0)
        );
        assert_eq!(store.db.scan_prefix(Key::withdrawn_of(&a)).count(), 0, "the marks go with the file");
        // A repair after the collection gives no access back either: before, with the
        // marks gone, the newest message of conversations 9 and 10 got its key back, for
        // a file that no longer exists, and nothing removed it again.
        store.repair_newest_entry(9).unwrap();
        store.repair_newest_entry(10).unwrap();
        assert_eq!(store.attachments(&a, 400).unwrap(), vec![]);
    }

    #[test]
    fn a_file_is_charged_whole_blocks_at_least_one() {
        assert_eq!([0, 1, 4095, 4096, 4097, 8192].map(charged_bytes), [4096, 4096, 4096, 4096, 8192, 8192]);
        assert_eq!(charged_bytes(u64::MAX), u64::MAX, "saturates at the top");
    }

    #[tokio::test]
    async fn limits_quota_and_the_life_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b, c) = ([1; 16], [2; 16], [3; 16]);
        // Each file is charged whole 4 KiB blocks, at least one.
        const B: u64 = QUOTA_BLOCK;
        store.begin_upload(&a, &record(7, 60, 1), 2, || 2 * B, |_| true, true).unwrap().unwrap().await.unwrap();
        assert_eq!(
            store.begin_upload(&b, &record(7, B + 1, 2), 2, || 2 * B, |_| true, true).unwrap().unwrap_err(),
            UploadRefusal::QuotaExceeded { used: B }
        );
        store.begin_upload(&b, &record(7, 40, 2), 2, || 2 * B, |_| true, true).unwrap().unwrap().await.unwrap();
        assert_eq!(
            store.begin_upload(&c, &record(7, 1, 3), 2, || 1000, |_| true, true).unwrap().unwrap_err(),
            UploadRefusal::TooManyUploads
        );
        assert_eq!(store.stored_bytes(7).unwrap(), 2 * B);
        // Expiry: `a` expires at 1060, `b` at 1040.
        assert_eq!(store.expired_uploads(1050, 10).unwrap(), vec![b]);
        store.set_upload_offset(&b, 20, Some("text/plain")).unwrap().unwrap().await.unwrap();
        assert_eq!(store.file(&b).unwrap().unwrap().offset(), 20);
        assert_eq!(store.file(&b).unwrap().unwrap().content_type, "text/plain");
        store.remove_upload(&b).unwrap().unwrap().1.await.unwrap();
        assert_eq!(store.stored_bytes(7).unwrap(), B, "a removed upload gives its quota back");
        assert!(store.expired_uploads(u64::MAX >> 1, 10).unwrap() == vec![a]);
        // Complete: leaves the in-progress and expiry indexes, references its blob.
        assert!(store.complete_upload(&a).unwrap().is_none(), "only a publishing upload completes");
        assert!(store.begin_publish(&a).unwrap().is_none(), "only an upload at full size publishes");
        store.set_upload_offset(&a, 60, None).unwrap().unwrap().await.unwrap();
        store.begin_publish(&a).unwrap().unwrap().await.unwrap();
        assert_eq!(store.blob_refs(&[1; 32]).unwrap(), 1, "publishing refers to the blob");
        assert!(store.remove_upload(&a).unwrap().is_none(), "a publishing upload is not removed");
        let (done, d) = store.complete_upload(&a).unwrap().unwrap();
        d.await.unwrap();
        assert!(done.is_complete());
        assert!(store.uploads_in_progress().unwrap().is_empty());
        assert!(store.expired_uploads(u64::MAX >> 1, 10).unwrap().is_empty());
        assert_eq!(store.blob_refs(&[1; 32]).unwrap(), 1);
        assert!(store.remove_upload(&a).unwrap().is_none(), "a complete file is not an upload");
        // Attached to a message: dropping the hold keeps it while the message exists.
        let files = vec![FileRef { file: a, name: "a.bin".into(), size: 60, content_type: "x/y".into() }];
        append(&store, entry(9, 1, Body::Files { text: String::new(), files, edited: false })).await;
        assert_eq!(store.attachments(&a, 10).unwrap(), vec![(9, 1)]);
        store.drop_hold(&a).unwrap().unwrap().await.unwrap();
        assert_eq!(store.stored_bytes(7).unwrap(), B, "counted while a message carries it");
        assert_eq!(store.unheld_files(None, 10).unwrap(), vec![a]);
        let kept = store.collect_file(&a, 0).unwrap();
        kept.durable.await.unwrap();
        assert!(kept.unreferenced.is_empty() && store.file(&a).unwrap().is_some(), "a message still carries it");
        // Deleting the message drops the attachment and marks the file again.
        append(&store, entry(9, 2, Body::Delete { target: 1 })).await;
        assert!(store.attachments(&a, 10).unwrap().is_empty());
        assert_eq!(store.unheld_files(None, 10).unwrap(), vec![a]);
        let gone = store.collect_file(&a, 0).unwrap();
        gone.durable.await.unwrap();
        assert_eq!(gone.unreferenced, vec![[1; 32]]);
        assert!(store.file(&a).unwrap().is_none());
        assert_eq!(store.stored_bytes(7).unwrap(), 0, "its bytes are gone: so is their quota");
        assert_eq!(store.blob_refs(&[1; 32]).unwrap(), 0);
        assert!(store.unheld_files(None, 10).unwrap().is_empty());
    }

    #[test]
    fn begin_complete_and_remove_let_the_files_lock_go_while_the_committer_finishes_a_flush() {
        use std::time::Instant;
        const WAIT: Duration = Duration::from_secs(10);
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b) = ([1; 16], [2; 16]);
        const B: u64 = QUOTA_BLOCK;
        // Commit 1 pauses as it begins until the test lets it go on: batches handed to
        // the committer meanwhile wait to be applied.
        let (started_tx, started) = std::sync::mpsc::channel();
        let (go, paused) = std::sync::mpsc::channel::<()>();
        let paused = std::sync::Mutex::new(paused);
        store.committer.on_commit_started(Box::new(move |n| {
            let _ = started_tx.send(n);
            if n == 1 {
                let _ = paused.lock().unwrap().recv_timeout(WAIT);
            }
        }));
        let _first = store.barrier().unwrap();
        assert_eq!(started.recv_timeout(WAIT).unwrap(), 1);
        // Waits until the promised bytes read `want` (they change once a batch is handed
        // over); how long that took.
        let promised = |want: u64| {
            let began = Instant::now();
            while store.promised_bytes() != want {
                assert!(began.elapsed() < 2 * WAIT, "promised {} bytes, not {want}", store.promised_bytes());
                std::thread::sleep(Duration::from_millis(1));
            }
            began.elapsed()
        };
        std::thread::scope(|scope| {
            let first = scope
                .spawn(|| store.begin_upload(&a, &record(7, 60, 1), 2, || 2 * B, |_| true, true).unwrap().unwrap());
            // `a` waits to be applied: the lock is free meanwhile, and checks count `a`.
            assert!(promised(60) < Duration::from_secs(2), "the files lock was held while the committer flushed");
            let refusal =
                store.begin_upload(&b, &record(7, B + 1, 2), 2, || 2 * B, |_| true, true).unwrap().unwrap_err();
            assert_eq!(refusal, UploadRefusal::QuotaExceeded { used: B }, "a block of two is promised to `a`");
            let refusal = store.begin_upload(&b, &record(7, 40, 2), 1, || 2 * B, |_| true, true).unwrap().unwrap_err();
            assert_eq!(refusal, UploadRefusal::TooManyUploads, "`a` is in progress");
            let second = scope
                .spawn(|| store.begin_upload(&b, &record(7, 40, 2), 2, || 2 * B, |_| true, true).unwrap().unwrap());
            assert!(promised(100) < Duration::from_secs(2));
            let refusal =
                store.begin_upload(&[3; 16], &record(7, 1, 3), 8, || 2 * B, |_| true, true).unwrap().unwrap_err();
            assert_eq!(refusal, UploadRefusal::QuotaExceeded { used: 2 * B }, "both pending uploads count");
            go.send(()).unwrap();
            for handle in [first, second] {
                drop(handle.join().unwrap());
            }
        });
        // Applied in the order handed over, each with the values its checks computed.
        assert_eq!(store.stored_bytes(7).unwrap(), 2 * B);
        assert_eq!(store.uploads_of(7, 10).unwrap(), 2);
        assert!(store.files.lock().unwrap().pending.is_empty(), "nothing pending once applied");
        drop(store.remove_upload(&b).unwrap().unwrap());
        assert!(store.remove_upload(&b).unwrap().is_none(), "removed once");
        assert_eq!(
            (store.stored_bytes(7).unwrap(), store.promised_bytes(), store.uploads_of(7, 10).unwrap()),
            (B, 60, 1)
        );
        drop(store.remove_upload(&a).unwrap().unwrap());
        assert_eq!((store.stored_bytes(7).unwrap(), store.promised_bytes()), (0, 0));
    }

    #[tokio::test]
    async fn attachments_are_listed_one_seek_per_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = [1; 16];
        let files = vec![FileRef { file: a, name: "a.bin".into(), size: 60, content_type: "x/y".into() }];
        for (conv, seq) in [(9, 1), (9, 2), (9, 3), (11, 1)] {
            let body = Body::Files { text: String::new(), files: files.clone(), edited: false };
            append(&store, entry(conv, seq, body)).await;
        }
        assert_eq!(store.attachment_convs(&a, 10).unwrap(), vec![(9, 1), (11, 1)], "one per conversation, its first");
        assert_eq!(convs_of(store.attachment_convs(&a, 1).unwrap()), vec![9]);
        assert!(store.attachment_convs(&[2; 16], 10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn shared_blobs_are_counted_and_thumbnails_go_with_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b, t) = ([1; 16], [2; 16], [3; 16]);
        for id in [a, b] {
            store.begin_upload(&id, &record(7, 10, 5), 8, || u64::MAX, |_| true, true).unwrap().unwrap().await.unwrap();
            store.set_upload_offset(&id, 10, None).unwrap().unwrap().await.unwrap();
            store.begin_publish(&id).unwrap().unwrap().await.unwrap();
            store.complete_upload(&id).unwrap().unwrap().1.await.unwrap();
        }
        assert_eq!(store.blob_refs(&[5; 32]).unwrap(), 2);
        let mut thumb = record(7, 3, 6);
        thumb.stage = FileStage::Complete { thumbnail: None };
        thumb.parent = Some(a);
        thumb.held = false;
        let (parent, d) = store.add_thumbnail(&a, &t, &thumb).unwrap().unwrap();
        d.await.unwrap();
        assert_eq!(parent.stage, FileStage::Complete { thumbnail: Some(t) });
        // A second thumbnail of the same file is not recorded: no reference leaks.
        let mut again = thumb.clone();
        again.blake3 = [7; 32];
        assert!(store.add_thumbnail(&a, &[4; 16], &again).unwrap().is_none());
        assert!(store.add_thumbnail(&a, &[4; 16], &thumb).unwrap().is_none());
        assert_eq!((store.blob_refs(&[6; 32]).unwrap(), store.blob_refs(&[7; 32]).unwrap()), (1, 0));
        assert!(store.file(&[4; 16]).unwrap().is_none());
        assert_eq!(store.file(&a).unwrap().unwrap().stage, FileStage::Complete { thumbnail: Some(t) });
        store.drop_hold(&a).unwrap().unwrap().await.unwrap();
        let c = store.collect_file(&a, 0).unwrap();
        c.durable.await.unwrap();
        assert_eq!(c.unreferenced, vec![[6; 32]], "the shared blob keeps one reference, the thumbnail's goes");
        assert!(store.file(&t).unwrap().is_none());
        assert_eq!(store.blob_refs(&[5; 32]).unwrap(), 1);
        assert_eq!(store.file(&b).unwrap().unwrap().offset(), 10);
    }

    /// A forward of a copy the forwarder has already hands its batch over under the files
    /// lock and waits for it after: a user forwarding the same files over and over (no
    /// quota spent) held every other user's file writes and checks behind each commit
    /// the committer was finishing (and the lock is not fair).
    #[tokio::test(flavor = "multi_thread")]
    async fn forwards_let_the_files_lock_go_while_the_committer_finishes_a_flush() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Instant;
        const WAIT: Duration = Duration::from_secs(10);
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = [1; 16];
        stored(&store, a, 7, 5).await;
        const B: u64 = QUOTA_BLOCK;
        assert!(matches!(
            store.forward_file(&a, 8, [2; 16], || [3; 16], || B, (100, 50)).unwrap(),
            Forwarded::Copy { new: true, .. }
        ));
        // The next commit pauses as it begins until the test lets it go on.
        let (armed, (started_tx, started), (go, paused)) =
            (std::sync::Arc::new(AtomicBool::new(true)), std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let (paused, hook_armed) = (std::sync::Mutex::new(paused), armed.clone());
        store.committer.on_commit_started(Box::new(move |_| {
            if hook_armed.swap(false, Ordering::SeqCst) {
                let _ = started_tx.send(());
                let _ = paused.lock().unwrap().recv_timeout(WAIT);
            }
        }));
        let _first = store.barrier().unwrap();
        started.recv_timeout(WAIT).unwrap();
        std::thread::scope(|scope| {
            let again = scope.spawn(|| store.forward_file(&a, 8, [4; 16], || [5; 16], || B, (120, 50)).unwrap());
            std::thread::sleep(Duration::from_millis(300));
            // It waits to be applied; the lock is free meanwhile.
            let began = Instant::now();
            assert!(store.count_send(&a).unwrap());
            assert!(began.elapsed() < Duration::from_secs(2), "the files lock was held while the committer flushed");
            go.send(()).unwrap();
            let again = again.join().unwrap();
            assert!(matches!(again, Forwarded::Copy { id, new: false, .. } if id == [2; 16]), "{again:?}");
        });
        assert_eq!(store.file(&[2; 16]).unwrap().unwrap().expires_ms, 170, "its grace renewed");
        assert_eq!(store.stored_bytes(8).unwrap(), B, "counted once");
    }

    #[tokio::test]
    async fn a_forward_is_a_copy_the_forwarder_pays_for_and_the_uploader_stops_paying_when_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, copy, thumb_copy) = ([1; 16], [2; 16], [3; 16]);
        stored(&store, a, 7, 5).await;
        let mut thumb = record(7, 3, 6);
        thumb.stage = FileStage::Complete { thumbnail: None };
        (thumb.parent, thumb.held, thumb.expires_ms) = (Some(a), false, 0);
        store.add_thumbnail(&a, &[9; 16], &thumb).unwrap().unwrap().1.await.unwrap();
        // User 8 forwards it: its quota is checked and pays; the bytes are shared.
        // A copy of 10 bytes is charged a block.
        const B: u64 = QUOTA_BLOCK;
        let refused = store.forward_file(&a, 8, copy, || thumb_copy, || B - 1, (100, 50)).unwrap();
        assert!(matches!(refused, Forwarded::QuotaExceeded { used: 0 }), "{refused:?}");
        let Forwarded::Copy { id, record: made, new: true } =
            store.forward_file(&a, 8, copy, || thumb_copy, || B, (100, 50)).unwrap()
        else {
            panic!()
        };
        assert_eq!((id, made.uploader, made.held, made.size, made.expires_ms), (copy, 8, false, 10, 150));
        assert_eq!(made.stage, FileStage::Complete { thumbnail: Some(thumb_copy) });
        assert_eq!(store.file(&thumb_copy).unwrap().unwrap().parent, Some(copy));
        assert_eq!((store.stored_bytes(7).unwrap(), store.stored_bytes(8).unwrap()), (B, B));
        assert_eq!((store.blob_refs(&[5; 32]).unwrap(), store.blob_refs(&[6; 32]).unwrap()), (2, 2));
        assert_eq!(store.stored_files_page(8, None, 8).unwrap().0[0].0, copy, "listed among the forwarder's files");
        // Forwarded again: the same copy, counted once, its grace renewed.
        let Forwarded::Copy { id: again, record: r, new: false } =
            store.forward_file(&a, 8, [4; 16], || [5; 16], || 2 * B, (120, 50)).unwrap()
        else {
            panic!()
        };
        assert_eq!((again, r.expires_ms, store.stored_bytes(8).unwrap()), (copy, 170, B));
        assert!(store.file(&[4; 16]).unwrap().is_none());
        // Within its grace and carried by no message, the copy stays and so does its mark.
        let c = store.collect_file(&copy, 169).unwrap();
        assert!(c.unreferenced.is_empty());
        assert_eq!(store.unheld_files(None, 8).unwrap(), vec![copy]);
        // Its message is written; the uploader deletes her own message and lets go:
        // her quota is free whatever the forwarder keeps.
        let files = vec![FileRef { file: copy, name: "a.bin".into(), size: 10, content_type: "x/y".into() }];
        append(&store, entry(3, 1, Body::Files { text: String::new(), files, edited: false })).await;
        store.drop_hold(&a).unwrap().unwrap().await.unwrap();
        store.collect_file(&a, 200).unwrap().durable.await.unwrap();
        assert!(store.file(&a).unwrap().is_none());
        assert_eq!((store.stored_bytes(7).unwrap(), store.stored_bytes(8).unwrap()), (0, B));
        assert_eq!(store.blob_refs(&[5; 32]).unwrap(), 1, "the copy keeps the bytes");
        // Both sends answered: the grace ends with the second.
        assert!(!store.settle_send(&copy, true).unwrap());
        assert!(store.settle_send(&copy, true).unwrap());
        assert_eq!(store.file(&copy).unwrap().unwrap().expires_ms, 0);
        store.collect_file(&copy, 200).unwrap().durable.await.unwrap();
        assert!(store.file(&copy).unwrap().is_some(), "a message carries it");
        // The message goes: the copy and its thumbnail go, the forwarder's quota is free,
        // and no key of the forward is left.
        append(&store, entry(3, 2, Body::Delete { target: 1 })).await;
        let c = store.collect_file(&copy, 200).unwrap();
        c.durable.await.unwrap();
        assert_eq!((c.unreferenced.len(), store.stored_bytes(8).unwrap()), (2, 0));
        assert!(store.file(&thumb_copy).unwrap().is_none());
        assert!(store.db.get(Key::forward_copy(8, &a)).unwrap().is_none());
        assert!(store.db.get(Key::copy_of(&copy)).unwrap().is_none());
        assert!(store.unheld_files(None, 8).unwrap().is_empty());
        // The original gone, it cannot be forwarded.
        assert!(matches!(store.forward_file(&a, 8, copy, || thumb_copy, || 20, (300, 50)).unwrap(), Forwarded::Gone));
    }

    #[tokio::test]
    async fn a_delete_while_a_copy_is_looked_at_leaves_its_mark_for_the_next_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, copy) = ([1; 16], [2; 16]);
        stored(&store, a, 7, 5).await;
        assert!(matches!(
            store.forward_file(&a, 8, copy, || [3; 16], || u64::MAX, (100, 50)).unwrap(),
            Forwarded::Copy { .. }
        ));
        let files = vec![FileRef { file: copy, name: "a.bin".into(), size: 10, content_type: "x/y".into() }];
        append(&store, entry(3, 1, Body::Files { text: String::new(), files, edited: false })).await;
        assert!(store.settle_send(&copy, true).unwrap());
        // The sweeper looks at the copy (a message carries it) and the forwarder deletes
        // the message just then: before, the collection took the delete's mark away with
        // its own and the copy stayed, carried by nothing, on the forwarder's quota.
        let once = std::sync::atomic::AtomicBool::new(false);
        let _ = store.collect_looked.set(Box::new(move |s: &Store| {
            if !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                s.append_then(&entry(3, 2, Body::Delete { target: 1 }), |_| ()).unwrap();
            }
        }));
        let kept = store.collect_file(&copy, 200).unwrap();
        kept.durable.await.unwrap();
        assert!(store.file(&copy).unwrap().is_some(), "it was carried when looked at");
        assert_eq!(store.unheld_files(None, 8).unwrap(), vec![copy], "the delete's mark stays");
        store.collect_file(&copy, 200).unwrap().durable.await.unwrap();
        assert!(store.file(&copy).unwrap().is_none());
        assert_eq!(store.stored_bytes(8).unwrap(), 0);
        assert!(store.unheld_files(None, 8).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_thumbnail_goes_only_with_its_file_and_a_shared_blob_is_counted_down_once_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, t) = ([1; 16], [9; 16]);
        stored(&store, a, 7, 5).await;
        // A thumbnail with the very bytes of its file (a small PNG's own thumbnail).
        let mut thumb = record(7, 10, 5);
        thumb.stage = FileStage::Complete { thumbnail: None };
        (thumb.parent, thumb.held, thumb.expires_ms) = (Some(a), false, 0);
        store.add_thumbnail(&a, &t, &thumb).unwrap().unwrap().1.await.unwrap();
        stored(&store, [4; 16], 7, 5).await;
        assert_eq!(store.blob_refs(&[5; 32]).unwrap(), 3);
        // Marked by itself (a message that carried it was deleted): it stays.
        store.db.insert(Key::file_unheld(&t), &[][..]).unwrap();
        store.collect_file(&t, 0).unwrap().durable.await.unwrap();
        assert!(store.file(&t).unwrap().is_some());
        store.drop_hold(&a).unwrap().unwrap().await.unwrap();
        let c = store.collect_file(&a, 0).unwrap();
        c.durable.await.unwrap();
        assert!(c.unreferenced.is_empty());
        assert_eq!(store.blob_refs(&[5; 32]).unwrap(), 1, "two references went; before, one");
    }

    #[tokio::test]
    async fn a_copy_stays_while_any_send_that_made_or_reused_it_is_unanswered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, copy) = ([1; 16], [2; 16]);
        stored(&store, a, 7, 5).await;
        // Two sends of the same file by one user: to a busy conversation (its message
        // not written yet) and to one that refuses it, answered first. Before, that
        // answer ended the copy's grace and the copy went; the other message then
        // carried a file that did not exist.
        for _ in 0..2 {
            assert!(matches!(
                store.forward_file(&a, 8, copy, || [3; 16], || u64::MAX, (100, 50)).unwrap(),
                Forwarded::Copy { .. }
            ));
        }
        assert!(!store.settle_send(&copy, true).unwrap(), "one send is still unanswered");
        store.collect_file(&copy, 1_000).unwrap().durable.await.unwrap();
        assert!(store.file(&copy).unwrap().is_some(), "kept past its stored grace while a send is unanswered");
        // The other answered too, its message never written (refused): the copy goes.
        assert!(store.settle_send(&copy, true).unwrap());
        store.collect_file(&copy, 1_000).unwrap().durable.await.unwrap();
        assert!(store.file(&copy).unwrap().is_none());
        assert_eq!(store.stored_bytes(8).unwrap(), 0);
        // An answer that cannot tell whether the message was written (an internal failure)
        // leaves the copy to its stored grace.
        assert!(matches!(
            store.forward_file(&a, 8, copy, || [3; 16], || u64::MAX, (2_000, 50)).unwrap(),
            Forwarded::Copy { .. }
        ));
        assert!(!store.settle_send(&copy, false).unwrap());
        store.collect_file(&copy, 2_040).unwrap().durable.await.unwrap();
        assert!(store.file(&copy).unwrap().is_some(), "within its grace");
        store.collect_file(&copy, 2_051).unwrap().durable.await.unwrap();
        assert!(store.file(&copy).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_senders_own_file_stays_while_a_send_carrying_it_is_unanswered() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b) = ([1; 16], [2; 16]);
        stored(&store, a, 7, 5).await;
        stored(&store, b, 7, 6).await;
        assert!(!store.count_send(&[9; 16]).unwrap(), "no such file");
        // A send of `a` is under way when its uploader lets go of it: it stays until the
        // send is answered, then goes at once if no message carries it.
        assert!(store.count_send(&a).unwrap());
        store.drop_hold(&a).unwrap().unwrap().await.unwrap();
        store.collect_file(&a, 100).unwrap().durable.await.unwrap();
        assert!(store.file(&a).unwrap().is_some(), "its send is unanswered");
        assert_eq!(store.unheld_files(None, 8).unwrap(), vec![a], "marked for the sweep");
        assert!(store.settle_send(&a, true).unwrap(), "refused, nothing carries it: collect it");
        store.collect_file(&a, 100).unwrap().durable.await.unwrap();
        assert!(store.file(&a).unwrap().is_none());
        assert_eq!(store.stored_bytes(7).unwrap(), QUOTA_BLOCK);
        // Written: the message carries `b` past its uploader's delete.
        assert!(store.count_send(&b).unwrap());
        store.drop_hold(&b).unwrap().unwrap().await.unwrap();
        store.collect_file(&b, 100).unwrap().durable.await.unwrap();
        let files = vec![FileRef { file: b, name: "b.bin".into(), size: 10, content_type: "x/y".into() }];
        append(&store, entry(3, 1, Body::Files { text: String::new(), files, edited: false })).await;
        assert!(store.settle_send(&b, true).unwrap());
        store.collect_file(&b, 100).unwrap().durable.await.unwrap();
        assert!(store.file(&b).unwrap().is_some(), "a message carries it");
        // A file its uploader still holds needs nothing once its send is answered.
        stored(&store, a, 7, 5).await;
        assert!(store.count_send(&a).unwrap());
        assert!(!store.settle_send(&a, true).unwrap());
    }

    #[tokio::test]
    async fn unheld_marks_are_read_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for i in 1..=5u8 {
            store.db.insert(Key::file_unheld(&[i; 16]), &[][..]).unwrap();
        }
        store.db.insert(Key::stored_bytes(1), &[0; 8][..]).unwrap();
        assert_eq!(store.unheld_files(None, 2).unwrap(), vec![[1; 16], [2; 16]]);
        assert_eq!(store.unheld_files(Some(&[2; 16]), 2).unwrap(), vec![[3; 16], [4; 16]]);
        assert_eq!(store.unheld_files(Some(&[4; 16]), 2).unwrap(), vec![[5; 16]], "nothing past the prefix");
    }

    #[tokio::test]
    async fn the_disk_check_counts_bytes_promised_to_uploads_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let (a, b, c) = ([1; 16], [2; 16], [3; 16]);
        // A disk with 150 free bytes: each upload must fit beside what is promised.
        let room = |size: u64| move |promised: u64| 150u64.saturating_sub(promised) >= size;
        store.begin_upload(&a, &record(7, 100, 1), 8, || u64::MAX, room(100), true).unwrap().unwrap().await.unwrap();
        assert_eq!(store.promised_bytes(), 100);
        assert_eq!(
            store.begin_upload(&b, &record(8, 60, 2), 8, || u64::MAX, room(60), true).unwrap().unwrap_err(),
            UploadRefusal::StorageFull,
            "100 promised: 50 left"
        );
        // 40 of `a` are on disk: 60 still to come.
        store.set_upload_offset(&a, 40, None).unwrap().unwrap().await.unwrap();
        assert_eq!(store.promised_bytes(), 60);
        store.begin_upload(&b, &record(8, 60, 2), 8, || u64::MAX, room(60), true).unwrap().unwrap().await.unwrap();
        assert_eq!(store.promised_bytes(), 120);
        store.remove_upload(&b).unwrap().unwrap().1.await.unwrap();
        assert_eq!(store.promised_bytes(), 60);
        store.set_upload_offset(&a, 100, None).unwrap().unwrap().await.unwrap();
        store.begin_publish(&a).unwrap().unwrap().await.unwrap();
        store.complete_upload(&a).unwrap().unwrap().1.await.unwrap();
        assert_eq!(store.promised_bytes(), 0);
        store.begin_upload(&c, &record(9, 30, 3), 8, || u64::MAX, |_| true, true).unwrap().unwrap().await.unwrap();
        store.set_upload_offset(&c, 10, None).unwrap().unwrap().await.unwrap();
        // Counted again from the records when the store opens.
        store.close().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.promised_bytes(), 20);
    }

    #[tokio::test]
    async fn an_upload_that_sends_nothing_stops_holding_the_disk() {
        // Declared and never sent: after its hold, uploads begun later no longer count
        // it, so accounts that begin uploads and walk away cannot refuse everyone's. It
        // comes back on spare room only: never into what others hold.
        const MIB: u64 = 1024 * 1024;
        let hold = Duration::from_millis(1500);
        let dir = tempfile::tempdir().unwrap();
        let with_hold = |dir: &std::path::Path| {
            let mut config = StoreConfig::new(dir.join("db"));
            config.cache_capacity_bytes = 4 * 1024 * 1024;
            config.upload_promise_hold = hold;
            Store::open(&config).unwrap()
        };
        let store = with_hold(dir.path());
        let (a, b, c) = ([1; 16], [2; 16], [3; 16]);
        // A disk with 150 MiB free (beside its reserve).
        let room = |size: u64| move |promised: u64| 150 * MIB - promised.min(150 * MIB) >= size;
        let fits = |held: u64, bytes: u64| 150 * MIB - held.min(150 * MIB) >= bytes;
        let begin = |id, user, size, hold| {
            store.begin_upload(id, &record(user, size, id[0]), 8, || u64::MAX, room(size), hold).unwrap()
        };
        begin(&a, 7, 100 * MIB, true).unwrap().await.unwrap();
        assert_eq!(begin(&b, 8, 100 * MIB, true).unwrap_err(), UploadRefusal::StorageFull, "100 MiB promised to `a`");
        std::thread::sleep(hold);
        assert_eq!(store.promised_bytes(), 0, "`a` sent nothing for its hold");
        begin(&b, 8, 100 * MIB, true).unwrap().await.unwrap();
        // `a` comes back: its chunks fit in the 50 MiB nobody holds, not past them, and
        // its next 4 MiB do not take its room again while its rest (96 MiB) does not fit.
        assert!(store.chunk_room(&a, MIB, fits));
        assert!(!store.chunk_room(&a, 60 * MIB, fits), "into the room `b` holds");
        assert!(store.chunk_room(&b, 60 * MIB, fits), "`b` writes within its own");
        store.set_upload_offset_within(&a, 4 * MIB, None, fits).unwrap().unwrap().await.unwrap();
        assert_eq!(store.promised_bytes(), 100 * MIB, "`a` stays lapsed");
        // Once `b` is gone, `a`'s next 4 MiB take its room again.
        store.remove_upload(&b).unwrap().unwrap().1.await.unwrap();
        store.set_upload_offset_within(&a, 8 * MIB, None, fits).unwrap().unwrap().await.unwrap();
        assert_eq!(store.promised_bytes(), 92 * MIB);
        // A begin beyond its user's allowance holds nothing.
        begin(&c, 9, 10 * MIB, false).unwrap().await.unwrap();
        assert_eq!(store.promised_bytes(), 92 * MIB);
        // After a restart every upload in progress holds its room for a hold again.
        store.close().unwrap();
        drop(store);
        let store = with_hold(dir.path());
        assert_eq!(store.promised_bytes(), 102 * MIB);
        std::thread::sleep(hold);
        assert_eq!(store.promised_bytes(), 0);
    }
}
