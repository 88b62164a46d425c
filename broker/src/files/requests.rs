//! The file requests of the control stream, and who may read a file. Each handler runs
//! on a task (some block on a catalog batch) and answers exactly as PROTOCOL.md section
//! 12 says; whoever may not see a file gets exactly the answer a missing file gets.

use std::sync::Arc;

use switchboard_protocol::limits::{
    MAX_CHUNK_BYTES, MAX_CONTENT_TYPE_BYTES, MAX_FILE_NAME_BYTES, MAX_FILES_PER_MESSAGE, MAX_LISTED_UPLOADS,
};
use switchboard_protocol::{
    ClientMsgId, ConvId, ConversationKind, ErrorBody, ErrorCode, FileId, FileInfo, FileRef, FileState, NewUpload,
    Reply, StoredFile, UploadInfo, UploadStatus, Usage, UserId,
};
use switchboard_storage::{FileRecord, FileStage, Forwarded, UploadRefusal, charged_bytes};

use super::ATTACHMENT_SCAN;
use crate::Shared;
use crate::error::internal;
use crate::pauses::Point;
use crate::reply::Revocation;

fn err(code: ErrorCode, message: &str) -> ErrorBody {
    ErrorBody::new(code, message)
}

/// The answer for a file the caller may not see, the same as for one that does not exist.
pub fn no_such_file() -> ErrorBody {
    err(ErrorCode::NOT_FOUND, "no such file")
}

/// The record of `id` if `user` may read it: its uploader, or a member of a
/// conversation where a message that is not deleted carries it (for a thumbnail: its
/// file). Looks at most `ATTACHMENT_SCAN` conversations, a seek and a membership read
/// each, charged to `user`'s allowance of member rows (`UserDirectory::
/// charge_member_reads`: a stranger's check of a file carried in 1,024 conversations
/// reads 2,048 keys, and nothing else bounded how often one asked): the carriers read
/// and the memberships looked at when it may read the file, `ATTACHMENT_SCAN` whenever
/// it may not, so
/// that what a refusal costs tells nothing of whether the file exists or where it is
/// carried. The uploader's own file costs nothing. With `gate`, a check that is not the
/// uploader's is refused `RATE_LIMITED` while that allowance is spent, before any
/// membership is read (the same for a missing file); a download's periodic re-check is
/// charged, not refused. Blocking.
pub fn readable(shared: &Shared, user: UserId, id: &FileId, gate: bool) -> Result<Option<FileRecord>, ErrorBody> {
    let store = &shared.store;
    let record = store.file(id).map_err(internal)?;
    if let Some(record) = record.as_ref().filter(|r| r.uploader == user) {
        return Ok(Some(record.clone()));
    }
    if gate {
        shared.users.allow_member_reads(user)?;
    }
    let mut looked = 0;
    let found = match record {
        Some(record) => {
            let subject = record.parent.unwrap_or(*id);
            let convs = super::published_carriers(shared, &subject).map_err(internal)?;
            // Each carrier was read before any membership: charged too (a member of the
            // first of 1,024 carriers was charged 1 for about 1,025 reads: an attacker
            // review).
            looked += convs.len();
            let mut found = Ok(None);
            for conv in convs {
                looked += 1;
                match store.member(conv, user) {
                    Ok(Some(_)) => {
                        found = Ok(Some(record));
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        found = Err(internal(e));
                        break;
                    }
                }
            }
            found
        }
        None => Ok(None),
    };
    let charge = if matches!(found, Ok(Some(_))) { looked } else { ATTACHMENT_SCAN };
    shared.users.charge_member_reads(user, charge);
    found
}

/// A file as a message carries it.
pub fn file_ref(id: &FileId, record: &FileRecord) -> FileRef {
    FileRef { file: *id, name: record.name.clone(), size: record.size, content_type: record.content_type.clone() }
}

fn status(id: &FileId, record: &FileRecord) -> UploadStatus {
    UploadStatus {
        file: *id,
        size: record.size,
        offset: record.offset(),
        content_type: record.content_type.clone(),
        complete: record.is_complete(),
        // A complete file does not expire (a forward's copy keeps its grace here).
        expires_ms: if record.is_complete() { 0 } else { record.expires_ms },
        chunk_max: MAX_CHUNK_BYTES,
    }
}

/// Whether `c` is a Unicode format character (general category Cf, Unicode 15): invisible
/// characters such as U+202E RIGHT-TO-LEFT OVERRIDE that make a name read as another
/// (`photo\u{202E}gnp.exe` shows as `photoexe.png`).
fn is_format(c: char) -> bool {
    matches!(
        c as u32,
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Checks the fields of a `BeginUpload`.
pub fn check_new_upload(new: &NewUpload) -> Result<(), ErrorBody> {
    let name_ok = !new.name.is_empty()
        && new.name.len() <= MAX_FILE_NAME_BYTES as usize
        && !new.name.chars().any(|c| c == '/' || c == '\\' || c.is_control() || is_format(c));
    if !name_ok {
        return Err(err(
            ErrorCode::INVALID,
            "a file name is 1..=255 bytes with no slash or backslash and no control or format characters",
        ));
    }
    let type_ok = new.content_type.len() <= MAX_CONTENT_TYPE_BYTES as usize
        && new.content_type.split_once('/').is_some_and(|(t, s)| {
            let token = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_graphic() && c != '/');
            token(t) && token(s)
        });
    if !type_ok {
        return Err(err(ErrorCode::INVALID, "a media type is type/subtype, at most 127 bytes"));
    }
    if new.size == 0 {
        return Err(err(ErrorCode::INVALID, "a file has at least one byte"));
    }
    Ok(())
}

/// Whether the data dir's disk has room for `bytes` more beside `promised` (the bytes the
/// uploads holding room may still write), the deleted bytes not freed yet and
/// `disk_reserve_bytes` (with a reserve, also an inode in a hundred free): the check of
/// `BeginUpload`, and of each chunk of an upload whose room lapsed
/// (`Store::chunk_room`). A failed `statvfs` says no (logged).
pub(crate) fn disk_room(shared: &Shared, promised: u64, bytes: u64) -> bool {
    let reserve = shared.config.disk_reserve_bytes;
    // Deleted bytes the deleter has not freed yet count as taken.
    let unfreed = shared.files.blobs.unfreed_bytes();
    match rustix::fs::statvfs(shared.files.blobs.root()) {
        Ok(stat) => {
            let free = shared.files.pretended_free_bytes().unwrap_or(stat.f_bavail.saturating_mul(stat.f_frsize));
            let fits = free.saturating_sub(promised).saturating_sub(unfreed) >= bytes.saturating_add(reserve);
            fits && (reserve == 0 || inodes_to_spare(stat.f_files, stat.f_favail))
        }
        Err(e) => {
            tracing::warn!(error = ?e, "reading the free disk space failed; taken as full");
            false
        }
    }
}

/// Free bytes on the disk holding `path` (for unprivileged users), as the disk check of
/// `BeginUpload` reads them. Errors: `INTERNAL` if the file system cannot be asked.
pub fn free_bytes(path: &std::path::Path) -> Result<u64, ErrorBody> {
    let stat = rustix::fs::statvfs(path).map_err(internal)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Of a file system's inodes, the part an upload may not take while the disk reserve
/// is kept (`disk_reserve_bytes` above 0): one in this many.
pub const INODE_RESERVE_DIVISOR: u64 = 100;

/// Whether a file system with `files` inodes, `available` of them free for unprivileged
/// users, has room for an upload's files (its partial file, which becomes its blob, and
/// a thumbnail) beyond its inode reserve (`INODE_RESERVE_DIVISOR`). A file system that
/// reports no inode count (btrfs, which allocates them as needed) always has. Bytes
/// alone did not keep the disk usable: every file is charged 4 KiB of quota, but ext4
/// makes one inode per 16 KiB by default, so tiny files ran out of inodes at a quarter
/// of the disk, and then no file could be created (sled's included).
pub(crate) fn inodes_to_spare(files: u64, available: u64) -> bool {
    files == 0 || available > files / INODE_RESERVE_DIVISOR + 2
}

/// `BeginUpload`: checks in the documented order, then records the upload.
pub async fn begin_upload(
    shared: Arc<Shared>,
    user: UserId,
    revocation: Revocation,
    new: NewUpload,
) -> Result<Reply, ErrorBody> {
    check_new_upload(&new)?;
    let config = &shared.config;
    if new.size > config.max_file_bytes {
        let limit = format!("the file is larger than this broker accepts ({} bytes at most)", config.max_file_bytes);
        return Err(err(ErrorCode::FILE_TOO_LARGE, &limit));
    }
    let now = crate::now_ms();
    let id = random_file_id()?;
    let record = FileRecord {
        name: new.name,
        size: new.size,
        declared_type: new.content_type.clone(),
        content_type: new.content_type,
        blake3: new.blake3,
        uploader: user,
        created_ms: now,
        expires_ms: now.saturating_add(config.upload_expiry_secs.saturating_mul(1000)),
        stage: FileStage::Uploading { offset: 0 },
        parent: None,
        held: true,
    };
    let s = shared.clone();
    let begun = tokio::task::spawn_blocking(move || {
        let (max_uploads, quota, reserve) =
            (s.config.max_uploads_per_user, s.config.quota_bytes, s.config.disk_reserve_bytes);
        // The disk check, last in the documented order, runs under the store's files
        // lock with the bytes the uploads in progress that hold room may still write:
        // uploads begun at once cannot promise the same free space twice.
        let size = record.size;
        let room = |promised: u64| disk_room(&s, promised, size);
        // A begin beyond the user's allowance of holds is taken, holding no room until
        // it moves (`UPLOAD_HOLDS_BURST`).
        let hold = s.files.upload_holds.take(user, std::time::Instant::now());
        // What the user's removed uploads and files left on the disk, not freed yet,
        // takes its share of the quota until it is (read under the store's files lock).
        let left = || quota.saturating_sub(s.files.blobs.unfreed_of(user));
        let begin = || {
            // A device cut off while this waited (for a store slot, for this thread) begins
            // nothing (`Revocation::refusal`).
            s.pauses.pass_blocking(Point::BeginUpload);
            revocation.refusal()?;
            match s.store.begin_upload(&id, &record, max_uploads, left, room, hold).map_err(internal)? {
                Ok(durable) => Ok((record, durable)),
                Err(UploadRefusal::TooManyUploads) => Err(err(ErrorCode::TOO_MANY_UPLOADS, "too many uploads in progress")),
                Err(UploadRefusal::QuotaExceeded { used }) => Err(err(
                    ErrorCode::QUOTA_EXCEEDED,
                    &format!(
                        "the upload ({} bytes, counted as {}) would pass your storage quota ({quota} bytes): {} bytes \
                         are in use (uploads in progress, files you hold, files you dropped that messages still \
                         carry, each in whole 4 KiB blocks, and deleted bytes not freed yet)",
                        record.size,
                        charged_bytes(record.size),
                        used.saturating_add(s.files.blobs.unfreed_of(user))
                    ),
                )),
                Err(UploadRefusal::StorageFull) => {
                    // The operator's business before it is the user's: say so in the log.
                    if let Some(refused) = s.files.storage_full.count(crate::now_ms()) {
                        tracing::warn!(
                            refused,
                            disk_reserve_bytes = reserve,
                            free_bytes = free_bytes(s.files.blobs.root()).ok(),
                            "uploads refused with STORAGE_FULL: the data dir's disk is within disk_reserve_bytes of full, \
                             or has fewer than one inode in a hundred free"
                        );
                    }
                    Err(err(ErrorCode::STORAGE_FULL, "the broker has no room for this upload; try later"))
                }
            }
        };
        let begun = begin();
        // A begin refused spends nothing: a user retrying while the disk is full (or at
        // its quota) would otherwise begin its upload, once let in, holding no room, to
        // be refused `STORAGE_FULL` part-way through (an attacker review).
        if hold && begun.is_err() {
            s.files.upload_holds.give_back(user, std::time::Instant::now());
        }
        begun
    })
    .await
    .map_err(internal)?;
    let (record, durable) = begun?;
    durable.await.map_err(internal)?;
    Ok(Reply::Upload(status(&id, &record)))
}

/// Runs the blocking read `read` on the blocking pool and answers it once what it read
/// is durable: a record's offset (and a hold, a stage) is written before its group
/// commit and read by others at once, so an answer given then could show an offset a
/// crash takes back (a client told 512 KiB resumes there, is refused `WRONG_OFFSET`
/// after the restart, and may have let go of the bytes below). Waits, on the calling
/// task (a pool thread held for a commit each let a few accounts' pipelined reads take
/// the pool), for the next group commit, which began after the read, as an entry does
/// (within `commit_delay_us` it shares it).
pub async fn read_durably(
    shared: &Arc<Shared>,
    read: impl FnOnce(&Shared) -> Result<Reply, ErrorBody> + Send + 'static,
) -> Result<Reply, ErrorBody> {
    let s = shared.clone();
    let answer = tokio::task::spawn_blocking(move || read(&s)).await.map_err(internal)??;
    shared.store.barrier_grouped().map_err(internal)?.await.map_err(internal)?;
    Ok(answer)
}

/// `UploadStatus`: the uploader's view of its upload (answer it with `read_durably`).
/// Blocking.
pub fn upload_status(shared: &Shared, user: UserId, id: &FileId) -> Result<Reply, ErrorBody> {
    match shared.store.file(id).map_err(internal)? {
        Some(record) if record.uploader == user && record.parent.is_none() => Ok(Reply::Upload(status(id, &record))),
        _ => Err(no_such_file()),
    }
}

/// `ListUploads`: the caller's uploads in progress with ids above `after`, a page of at
/// most `MAX_LISTED_UPLOADS` (answer it with `read_durably`). Blocking.
pub fn list_uploads(shared: &Shared, user: UserId, after: Option<FileId>) -> Result<Reply, ErrorBody> {
    let (page, more) =
        shared.store.uploads_page(user, after.as_ref(), MAX_LISTED_UPLOADS as usize).map_err(internal)?;
    let items = page
        .iter()
        .map(|(id, record)| UploadInfo {
            file: file_ref(id, record),
            blake3: record.blake3,
            offset: record.offset(),
            created_ms: record.created_ms,
            expires_ms: record.expires_ms,
        })
        .collect();
    Ok(Reply::Uploads { items, more })
}

/// `ListFiles`: a page of the caller's stored files (what its quota counts besides its
/// uploads in progress), so none is lost track of.
pub fn list_files(shared: &Shared, user: UserId, after: Option<FileId>) -> Result<Reply, ErrorBody> {
    let (page, more) =
        shared.store.stored_files_page(user, after.as_ref(), MAX_LISTED_UPLOADS as usize).map_err(internal)?;
    let items = page
        .iter()
        .map(|(id, record)| StoredFile {
            file: file_ref(id, record),
            blake3: record.blake3,
            created_ms: record.created_ms,
            held: record.held,
        })
        .collect();
    Ok(Reply::Files { items, more })
}

/// `Usage`: the caller's stored bytes and uploads in progress against its limits.
pub fn usage(shared: &Shared, user: UserId) -> Result<Reply, ErrorBody> {
    let config = &shared.config;
    let in_progress = shared.store.uploads_of(user, MAX_LISTED_UPLOADS as usize).map_err(internal)?;
    let stored = shared.store.stored_bytes(user).map_err(internal)?;
    Ok(Reply::Usage(Usage {
        stored_bytes: stored.saturating_add(shared.files.blobs.unfreed_of(user)),
        quota_bytes: config.quota_bytes,
        uploads_in_progress: u32::try_from(in_progress).unwrap_or(u32::MAX),
        max_uploads_in_progress: u32::try_from(config.max_uploads_per_user).unwrap_or(u32::MAX),
        max_file_bytes: config.max_file_bytes,
    }))
}

/// `CancelUpload`: removes the caller's upload in progress.
pub async fn cancel_upload(
    shared: Arc<Shared>,
    user: UserId,
    revocation: Revocation,
    id: FileId,
) -> Result<Reply, ErrorBody> {
    match shared.store.file(&id).map_err(internal)? {
        Some(record) if record.uploader == user && !record.is_complete() => {}
        _ => return Err(no_such_file()),
    }
    shared.pauses.pass(Point::CancelUpload).await;
    revocation.refusal()?;
    match shared.files.remove(&shared, &id, "the upload was cancelled").await {
        Ok(true) => Ok(Reply::Done),
        Ok(false) => Err(no_such_file()),
        Err(e) => Err(internal(e)),
    }
}

/// `FileInfo`: a file the caller may read (answer it with `read_durably`). Blocking.
/// An upload's progress is shown as offset 0 to a caller who reads it only through a
/// direct conversation with an uploader one of the two blocks (`progress_hidden`).
pub fn file_info(shared: &Shared, user: UserId, id: &FileId) -> Result<Reply, ErrorBody> {
    let record = readable(shared, user, id, true)?.ok_or_else(no_such_file)?;
    let hidden = |offset: u64| -> Result<u64, ErrorBody> {
        Ok(if progress_hidden(shared, user, id, &record)? { 0 } else { offset })
    };
    let state = match &record.stage {
        FileStage::Uploading { offset } => FileState::Uploading { offset: hidden(*offset)? },
        FileStage::Publishing => FileState::Uploading { offset: hidden(record.size)? },
        FileStage::Complete { thumbnail } => {
            let thumbnail = match thumbnail {
                Some(t) => shared.store.file(t).map_err(internal)?.map(|r| file_ref(t, &r)),
                None => None,
            };
            FileState::Complete { thumbnail }
        }
    };
    Ok(Reply::File(FileInfo {
        file: file_ref(id, &record),
        blake3: record.blake3,
        uploader: record.uploader,
        created_ms: record.created_ms,
        state,
    }))
}

/// Whether `user`, who may read `record` (file `id`) and is not its uploader, is kept
/// from seeing its upload's progress: while the uploader blocks `user`, and while `user`
/// blocks the uploader unless a group carrying the file has `user` as a member (in a
/// group both are in, the blocked member's uploads reach the blocker, as its receipts
/// do). As for the pushed file events (`announce`), a progress that rises tells when the
/// uploader is online (PROTOCOL.md, "Blocking"; an attacker review found a blocked user
/// polling `FileInfo` for it). A failed read counts as blocked. Two block reads, and for
/// a blocked pair the carriers and a membership and a conversation read per carrier,
/// charged to `user`'s member reads.
fn progress_hidden(shared: &Shared, user: UserId, id: &FileId, record: &FileRecord) -> Result<bool, ErrorBody> {
    let store = &shared.store;
    if record.uploader == user {
        return Ok(false);
    }
    if !matches!(store.blocks(record.uploader, user), Ok(false)) {
        return Ok(true);
    }
    if matches!(store.blocks(user, record.uploader), Ok(false)) {
        return Ok(false);
    }
    // Charged as the member reads they are (they were free: an attacker review): the
    // carriers, and a membership and a conversation read each until one is a group.
    let carriers = super::published_carriers(shared, &record.parent.unwrap_or(*id)).map_err(internal)?;
    let mut reads = carriers.len();
    let mut hidden = true;
    for conv in carriers {
        reads += 2;
        let member = store.member(conv, user).map_err(internal)?.is_some();
        if member && store.conversation(conv).map_err(internal)?.is_some_and(|c| c.kind == ConversationKind::Group) {
            hidden = false;
            break;
        }
    }
    shared.users.charge_member_reads(user, reads);
    Ok(hidden)
}

/// `DeleteFile`: the uploader drops its hold on its complete file; it is deleted once
/// no message carries it (at once if none does: the uploader's devices are then told it
/// is gone, `Event::File` with `Failed { NOT_FOUND }`).
pub async fn delete_file(
    shared: Arc<Shared>,
    user: UserId,
    revocation: Revocation,
    id: FileId,
) -> Result<Reply, ErrorBody> {
    let record = own_complete_file(&shared, user, &id)?;
    if !record.held {
        // Let go of already, maybe by a drop not yet durable: answered once it is.
        shared.store.barrier_grouped().map_err(internal)?.await.map_err(internal)?;
        return Ok(Reply::Done);
    }
    let s = shared.clone();
    let dropped = tokio::task::spawn_blocking(move || {
        s.pauses.pass_blocking(Point::DeleteFile);
        revocation.refusal()?;
        s.store.drop_hold(&id).map_err(internal)
    })
    .await
    .map_err(internal)?;
    if let Some(durable) = dropped? {
        durable.await.map_err(internal)?;
    }
    let s = shared.clone();
    let deleted =
        tokio::task::spawn_blocking(move || super::collect(&s, &id)).await.map_err(internal)?.map_err(internal)?;
    if deleted {
        // No message carried it: only the uploader's devices knew it, and are told it
        // is gone once that is durable (`collect` does not wait when no bytes go). The
        // deletion is done either way: a barrier that fails only skips the telling.
        let durable = match shared.store.barrier() {
            Ok(barrier) => barrier.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match durable {
            Ok(()) => super::announce::announce_gone_to_uploader(&shared, &id, user, record.size),
            Err(e) => tracing::warn!(error = %e, "a deleted file's removal did not become durable; not told"),
        }
    }
    Ok(Reply::Done)
}

/// `WithdrawFile`: the uploader takes its complete file back from every message carrying
/// it and lets go of it; it is deleted at once (`Store::withdraw_file`), and readers find
/// it gone (a download under way is cut at its next access check). The members of the
/// conversations that carried it are told it is gone (`Event::File`, `Failed` with
/// `NOT_FOUND`), as they are of an upload cancelled or expired.
pub async fn withdraw_file(
    shared: Arc<Shared>,
    user: UserId,
    revocation: Revocation,
    id: FileId,
) -> Result<Reply, ErrorBody> {
    let record = own_complete_file(&shared, user, &id)?;
    let s = shared.clone();
    let withdrawn = tokio::task::spawn_blocking(move || {
        // Read first: the withdrawal drops the attachments that name them.
        let convs: Vec<ConvId> =
            s.store.attachment_convs(&id, ATTACHMENT_SCAN).map_err(internal)?.into_iter().map(|(c, _)| c).collect();
        s.pauses.pass_blocking(Point::WithdrawFile);
        revocation.refusal()?;
        Ok::<_, ErrorBody>(s.store.withdraw_file(&id, user).map_err(internal)?.map(|durable| (durable, convs)))
    })
    .await
    .map_err(internal)?;
    let convs = match withdrawn? {
        Some((durable, convs)) => {
            durable.await.map_err(internal)?;
            convs
        }
        None => return Err(no_such_file()),
    };
    let s = shared.clone();
    let deleted =
        tokio::task::spawn_blocking(move || super::collect(&s, &id)).await.map_err(internal)?.map_err(internal)?;
    // Its removal durable before the answer (`collect` does not wait when no bytes go).
    shared.store.barrier().map_err(internal)?.await.map_err(internal)?;
    // Told only by whoever deleted it, so once per file: one that stays (a send of it
    // racing this one still carries it) is not gone, and may be withdrawn again.
    if deleted {
        // The messages stay, naming the file: their members now are its readers.
        let convs = convs.into_iter().map(|conv| (conv, None)).collect();
        super::announce::announce_gone(&shared, &id, user, record.size, convs);
    }
    Ok(Reply::Done)
}

/// `user`'s own complete file `id` (not a thumbnail), for `DeleteFile` and
/// `WithdrawFile`: `NOT_FOUND` for anyone else's, `NOT_READY` while still uploading.
fn own_complete_file(shared: &Shared, user: UserId, id: &FileId) -> Result<FileRecord, ErrorBody> {
    match shared.store.file(id).map_err(internal)? {
        Some(r) if r.uploader == user && r.parent.is_none() && r.is_complete() => Ok(r),
        Some(r) if r.uploader == user && r.parent.is_none() => {
            Err(err(ErrorCode::NOT_READY, "the upload is not complete; cancel it instead"))
        }
        _ => Err(no_such_file()),
    }
}

/// The files a `SendFiles` counted in so that none is collected before its message is
/// written: the forward copies it made or reused and the sender's own files
/// (`settle_sent` them once the send is answered).
pub type Counted = Vec<FileId>;

/// For `SendFiles`: the files as the message will carry them, each one `user` may read
/// and whose first chunk is stored; a file someone else uploaded as `user`'s copy of it
/// (`Store::forward_file`: the uploader's quota never pays for what others forward,
/// the forwarder's does, `QUOTA_EXCEEDED` beyond), with the files counted in
/// (`Counted`: `settle_sent` them once the send is answered). `None` when the conversation actor answers alone: a
/// resend of an applied client id. A caller who is not a member is refused here with the
/// `FORBIDDEN` every write of a stranger gets (before, it went on with no files, and if
/// it was added meanwhile the actor answered `INVALID`, which a client does not retry).
/// Blocking.
pub fn files_to_send(
    shared: &Arc<Shared>,
    conv: ConvId,
    user: UserId,
    client_id: &ClientMsgId,
    files: &[FileId],
    text: &str,
) -> Result<Option<(Vec<FileRef>, Counted)>, ErrorBody> {
    let store = &shared.store;
    if store.dedupe(conv, user, client_id).map_err(internal)?.is_some() {
        return Ok(None);
    }
    if store.member(conv, user).map_err(internal)?.is_none() {
        return Err(crate::conversation::not_a_member());
    }
    if files.is_empty() || files.len() > MAX_FILES_PER_MESSAGE as usize {
        return Err(err(ErrorCode::INVALID, "a message carries 1..=10 files"));
    }
    // Every file is checked before any copy is made: a refusal costs no quota.
    let mut checked = Vec::with_capacity(files.len());
    for (i, id) in files.iter().enumerate() {
        if files[..i].contains(id) {
            return Err(err(ErrorCode::INVALID, "a file appears twice"));
        }
        let record = readable(shared, user, id, true)?.ok_or_else(no_such_file)?;
        if record.parent.is_some() {
            // Its thumbnail goes with the file, and only with it.
            return Err(err(ErrorCode::INVALID, "a thumbnail is sent with its file: send the file"));
        }
        // Only its uploader attaches a file still uploading: another reader would keep
        // access to bytes that arrive after its own access ended. Checked first, so
        // that another reader learns nothing of the upload's progress (the two answers
        // told whether its first 4 KiB were stored: a review).
        if !record.is_complete() && record.uploader != user {
            return Err(err(ErrorCode::NOT_READY, "the file is not complete yet"));
        }
        if record.offset() < record.size.min(super::sniff::HEAD_BYTES) {
            // Its type is checked once these are stored.
            return Err(err(ErrorCode::NOT_READY, "the file's first 4 KiB are not stored yet"));
        }
        checked.push((id, record));
    }
    // What the conversation would refuse (the caption with the names and types) is
    // refused by its own rule before any copy is made: a copy has its file's name and type.
    let unsent: Vec<FileRef> = checked.iter().map(|(id, r)| file_ref(id, r)).collect();
    crate::conversation::check_files(text, &unsent)?;
    let mut refs: Vec<FileRef> = Vec::with_capacity(checked.len());
    // Whatever ends this before the files are handed on (a refusal, a panic) settles
    // what it counted: nothing may stay counted in for ever, keeping a file.
    let mut counted = Unhanded { shared, counted: Vec::new(), refused: false };
    for (id, record) in checked {
        // Counted in before anything can fail: `settle_sent` counts every one out.
        let sent = if record.uploader == user {
            // Its uploader's `DeleteFile` (from another device, or pipelined) must not
            // collect it between this check and the message's write.
            match store.count_send(id) {
                Ok(true) => {
                    counted.counted.push(*id);
                    Ok(file_ref(id, &record))
                }
                Ok(false) => Err(no_such_file()),
                Err(e) => Err(internal(e)),
            }
        } else {
            forward(shared, user, id, record.size).inspect(|sent| counted.counted.push(sent.file))
        };
        let sent = match sent {
            Ok(sent) if refs.iter().any(|r| r.file == sent.file) => {
                Err(err(ErrorCode::INVALID, "a file appears twice (one is your copy of the other)"))
            }
            other => other,
        };
        match sent {
            Ok(sent) => refs.push(sent),
            Err(e) => {
                // Refused: nothing was written, what it counted goes back at once.
                counted.refused = true;
                return Err(e);
            }
        }
    }
    Ok(Some((refs, std::mem::take(&mut counted.counted))))
}

/// The files `files_to_send` counted in and has not handed on: settled when it drops
/// (`refused`: known not written, given back at once; else, a panic, as after an
/// `INTERNAL` answer).
struct Unhanded<'a> {
    shared: &'a Shared,
    counted: Counted,
    refused: bool,
}

impl Drop for Unhanded<'_> {
    fn drop(&mut self) {
        if !self.counted.is_empty() {
            settle_sent(self.shared, &self.counted, self.refused);
        }
    }
}

/// Once the send that counted them was answered (`written_or_refused`: anything but an
/// internal failure, after which nobody knows whether the message was written): each
/// file no other unanswered send carries and nobody holds (a copy, whose grace ends
/// here; a file its uploader deleted meanwhile) goes if no message carries it (a
/// refused send gives its quota back at once). Blocking.
pub fn settle_sent(shared: &Shared, counted: &[FileId], written_or_refused: bool) {
    for file in counted {
        let settled = shared.store.settle_send(file, written_or_refused).map_err(|e| e.to_string());
        if let Err(e) = settled.and_then(|ended| if ended { super::collect(shared, file).map(drop) } else { Ok(()) }) {
            tracing::warn!(file = super::blobs::hex(file), error = %e, "settling a sent file failed");
        }
    }
}

/// `user`'s copy of the complete file `id` someone else uploaded, as a message carries
/// it (settle it with `settle_sent`). Blocking.
fn forward(shared: &Arc<Shared>, user: UserId, id: &FileId, size: u64) -> Result<FileRef, ErrorBody> {
    let config = &shared.config;
    let grace = super::FORWARD_GRACE.min(std::time::Duration::from_secs(config.upload_expiry_secs));
    let times = (crate::now_ms(), u64::try_from(grace.as_millis()).unwrap_or(u64::MAX));
    let (copy, thumbnail) = (random_file_id()?, random_file_id()?);
    let left = || config.quota_bytes.saturating_sub(shared.files.blobs.unfreed_of(user));
    match shared.store.forward_file(id, user, copy, || thumbnail, left, times).map_err(internal)? {
        Forwarded::Copy { id: copy, record, new } => {
            // The original had no thumbnail yet (its decode may be under way): a new copy
            // gets its own through the line, from the outcome remembered for the same
            // bytes where there is one.
            if new
                && record.stage == (FileStage::Complete { thumbnail: None })
                && super::thumbnail::is_thumbnailable(&record.content_type)
            {
                let made = super::thumbnails::make_thumbnail(shared.clone(), copy, record.clone());
                tokio::runtime::Handle::current().spawn(made);
            }
            Ok(file_ref(&copy, &record))
        }
        Forwarded::QuotaExceeded { used } => Err(err(
            ErrorCode::QUOTA_EXCEEDED,
            &format!(
                "a file you forward counts against your storage quota ({} bytes) like one you upload: \
                 {} bytes are in use, and this file counts as {}",
                config.quota_bytes,
                used.saturating_add(shared.files.blobs.unfreed_of(user)),
                charged_bytes(size)
            ),
        )),
        Forwarded::Gone => Err(no_such_file()),
    }
}

/// A new file id (16 random bytes).
pub(crate) fn random_file_id() -> Result<FileId, ErrorBody> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).map_err(|_| internal("no randomness"))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> NewUpload {
        NewUpload { name: name.into(), size: 1, content_type: "text/plain".into(), blake3: [0; 32] }
    }

    #[test]
    fn names_with_control_or_format_characters_are_invalid() {
        assert!(check_new_upload(&named("photo.png")).is_ok());
        assert!(check_new_upload(&named("résumé 2026.pdf")).is_ok());
        for bad in ["photo\u{202E}gnp.exe", "a\u{200B}b", "\u{FEFF}x", "tag\u{E0041}", "a\nb", "a/b", ""] {
            let refused = check_new_upload(&named(bad)).unwrap_err();
            assert_eq!(refused.code, ErrorCode::INVALID, "{bad:?}");
        }
    }

    /// Inodes are kept like bytes: a file system with one in a hundred or fewer free
    /// refuses uploads (ext4's 16 KiB per inode met tiny files' 4 KiB quota charge), one
    /// that does not count them (btrfs) never does for want of them.
    #[test]
    fn an_upload_needs_inodes_beyond_the_reserve() {
        assert!(inodes_to_spare(1_000_000, 500_000));
        assert!(inodes_to_spare(1_000_000, 10_003));
        assert!(!inodes_to_spare(1_000_000, 10_002));
        assert!(!inodes_to_spare(1_000_000, 0));
        assert!(inodes_to_spare(0, 0), "no inode count: allocated as needed");
        assert!(!inodes_to_spare(100, 3), "a tiny file system keeps room for one upload's files");
        assert!(inodes_to_spare(100, 4));
    }
}
