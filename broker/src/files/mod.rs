//! Files (PROTOCOL.md section 12): `state.rs` holds the rules of one upload as a pure
//! state machine, `actor.rs` the Upload actor that drives it (one per upload in
//! progress), `blobs.rs` the bytes on disk, `requests.rs` the control-stream requests and
//! who may read a file, `sniff.rs` the type check of the first bytes, `thumbnail.rs`
//! bounded thumbnails of images (`thumbnails.rs`: which images get one, in a bounded line,
//! each image's bytes decoded once), `announce.rs` progress and final states pushed to
//! their audiences off the runtime threads. `Files` finds or starts an upload's actor, and the
//! sweeper removes expired uploads and files nothing holds any more.

mod actor;
mod announce;
pub mod blobs;
pub mod budget;
pub(crate) mod requests;
pub(crate) mod sniff;
pub mod state;
pub(crate) mod thumbnail;
pub mod thumbnails;

pub use requests::free_bytes;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use switchboard_protocol::limits::MAX_TRANSFER_FRAME_BYTES;
use switchboard_protocol::{ConvId, FileId, FileState, UserId};
use switchboard_storage::{FileRecord, FileStage, charged_bytes};

pub use actor::UploadMsg;
use actor::{Upload, UploadArgs};
use blobs::Blobs;

use crate::Shared;

/// Most conversations looked at (one seek each) to decide whether a user may read a
/// file, or to push its progress: a file attached in more conversations than this is
/// readable through the first ones only (by conversation id).
pub const ATTACHMENT_SCAN: usize = 1024;

/// The conversations whose messages carry file `id` (the first `ATTACHMENT_SCAN`, by id)
/// where one such message has been published: sent to the members' online devices,
/// which only a durable entry is (`Directory::published`; a conversation without an
/// actor has published all it holds). A message still waiting for its group commit is
/// in the store already, but a crash could lose it: before, its members were told of
/// the file's progress, and could read the file, through a message they had not been
/// given and might never be. Blocking (a seek per conversation).
pub(crate) fn published_carriers(shared: &Shared, id: &FileId) -> switchboard_storage::Result<Vec<ConvId>> {
    let carriers = shared.store.attachment_convs(id, ATTACHMENT_SCAN)?;
    Ok(carriers
        .into_iter()
        .filter(|&(conv, seq)| shared.convs.published(conv).is_none_or(|published| seq <= published))
        .map(|(conv, _)| conv)
        .collect())
}

/// How long a blob file given up for a waiting download counts as on its way to it.
const EVICTION_HOLD: Duration = Duration::from_millis(500);

/// Pages of `BATCH` unheld-file marks the sweeper looks at per run at most (the next
/// run goes on after them).
const UNHELD_PAGES: usize = 64;

/// Longest a forward's copy lives without a message carrying it once nobody can tell
/// whether its message was written (`Store::forward_file`: the send answered
/// `INTERNAL`, or the broker stopped before answering; shorter with a shorter
/// `upload_expiry_secs`). A send that is answered settles its copies at once
/// (`requests::settle_sent`).
pub const FORWARD_GRACE: Duration = Duration::from_secs(600);

/// Upload locks kept before the map is swept of entries nobody holds or waits for.
const SPAWNING_SWEEP: usize = 1024;

/// Live Upload actors and the file bytes on disk.
pub struct Files {
    /// Where the bytes live.
    pub blobs: Blobs,
    map: std::sync::Mutex<HashMap<FileId, Slot>>,
    /// Per upload: serialises starting its actor (which may finish a publishing left
    /// half-done) and removing it while no actor runs. An entry lives while someone
    /// holds or waits for its lock.
    spawning: std::sync::Mutex<HashMap<FileId, Arc<tokio::sync::Mutex<()>>>>,
    next_stream: AtomicU64,
    /// One permit per transfer stream served, over all connections.
    live_streams: Arc<tokio::sync::Semaphore>,
    /// The places of the streams served, with what each moved (`take_place`).
    places: std::sync::Mutex<HashMap<u64, Arc<budget::Place>>>,
    /// Transfer streams each user has served now, over all its connections; a user's
    /// entry goes when its count reaches 0, so there is one per user with a stream.
    user_streams: std::sync::Mutex<crate::limits::PerUser>,
    /// Most transfer streams one user may have served at once.
    streams_per_user: usize,
    /// Upload chunk buffers held, from a chunk's header until its actor handled it
    /// (being received or queued), over all streams (`transfer_buffer_bytes`), and the
    /// lease that keeps a slow chunk from holding them.
    pub(crate) chunk_budget: Arc<budget::ChunkBudget>,
    /// The turns of small chunks' fdatasyncs (`small_chunk_syncs_per_sec`).
    pub(crate) small_syncs: budget::SyncPacer,
    /// One permit per blob file open for a download, over all streams
    /// (`max_open_blob_files`).
    open_blobs: Arc<tokio::sync::Semaphore>,
    /// Downloads waiting for one of `open_blobs`: while there are any, a download whose
    /// reader falls behind the minimum rate gives its blob file up.
    blob_waiters: AtomicUsize,
    /// When each blob file given up for a waiter is deemed taken by it (at most one per
    /// waiter, `claim_blob_for_waiter`).
    blob_evictions: std::sync::Mutex<Vec<tokio::time::Instant>>,
    /// Uploads refused with `STORAGE_FULL`, told to the operator at most once a minute.
    pub(crate) storage_full: crate::metrics::Tally,
    /// Per user, the begins that may hold room on the disk (`UPLOAD_HOLDS_BURST`).
    pub(crate) upload_holds: crate::user::Allowances,
    /// Bytes of uploads hashed for their whole-file BLAKE3 since the start.
    pub(crate) hashed_bytes: AtomicU64,
    /// Which completed images get a thumbnail made, and when.
    pub thumbnails: thumbnails::Thumbnails,
    /// Files deleted messages let go of, for `collect_soon`'s one worker.
    released: std::sync::Mutex<Released>,
    /// The free bytes a test makes the disk checks see (`pretend_free_bytes`); `u64::MAX`
    /// (always, outside tests): read the disk.
    pretended_free: AtomicU64,
    /// Whether the data dir's disk had less than `log_write_floor` free at the last look
    /// (`watch_disk`): new messages are refused meanwhile (`refuse_log_write`).
    disk_low: std::sync::atomic::AtomicBool,
    /// Log writes refused for it, told to the operator at most once a minute.
    pub(crate) writes_storage_full: crate::metrics::Tally,
}

/// How often `watch_disk` reads the data dir's free space. At the floor's smallest
/// useful size (tens of MiB) no message rate fills it in this time; uploads, which can,
/// are checked against `disk_reserve_bytes` as they go.
const DISK_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The free bytes below which log writes that add content are refused: a quarter of
/// `disk_reserve_bytes` (256 MiB at the default 1 GiB; no floor without a reserve).
/// Uploads stop at the reserve, so messages go on within it, and stop short of the
/// disk's end: before, only uploads were refused and messages filled the disk until a
/// commit failed and the broker exited (its fail-stop), to be refused a restart while
/// the disk stayed full (an operator trial). What remains below the floor is for the
/// writes still allowed (deletes, leaving, removals, roles, receipts, accounts) and for
/// the store's own upkeep (sled's segment rewrites).
pub fn log_write_floor(disk_reserve_bytes: u64) -> u64 {
    disk_reserve_bytes / 4
}

/// Reads the data dir's free space every `DISK_WATCH_INTERVAL` while the broker runs, and
/// says whether it is below `log_write_floor` (`Files::disk_low`), logging each change of
/// that at `WARN`. A failed read leaves the last answer (logged).
pub(crate) async fn watch_disk(shared: std::sync::Weak<crate::Shared>) {
    let mut tick = tokio::time::interval(DISK_WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        let floor = log_write_floor(s.config.disk_reserve_bytes);
        if floor == 0 {
            return;
        }
        let root = s.files.blobs.root().to_path_buf();
        let pretended = s.files.pretended_free_bytes();
        let free = match pretended {
            Some(free) => Ok(free),
            None => tokio::task::spawn_blocking(move || requests::free_bytes(&root)).await.unwrap_or_else(|e| {
                Err(switchboard_protocol::ErrorBody::new(switchboard_protocol::ErrorCode::INTERNAL, e.to_string()))
            }),
        };
        let free = match free {
            Ok(free) => free,
            Err(e) => {
                tracing::warn!(error = %e.message, "reading the free disk space failed");
                continue;
            }
        };
        let low = free < floor;
        if s.files.disk_low.swap(low, Ordering::Relaxed) != low {
            if low {
                tracing::warn!(
                    free_bytes = free,
                    floor_bytes = floor,
                    "new messages refused with STORAGE_FULL: the data dir's disk has less than a quarter of \
                     disk_reserve_bytes free; free space (or lower disk_reserve_bytes, OPERATIONS.md \
                     \"A full disk\") to take them again"
                );
            } else {
                tracing::warn!(free_bytes = free, floor_bytes = floor, "new messages taken again: the disk has room");
            }
        }
    }
}

/// How long a stream that had a place taken away for it waits for that place (the
/// evicted stream lets it go within a few scheduler turns).
const PLACE_HANDOVER: std::time::Duration = std::time::Duration::from_secs(1);

/// A transfer stream's place (`Files::take_place`), given back when dropped.
pub(crate) struct PlaceHold<'a> {
    files: &'a Files,
    id: u64,
    /// What the stream moved, and whether it must give the place up.
    pub place: Arc<budget::Place>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for PlaceHold<'_> {
    fn drop(&mut self) {
        self.files.places.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// `collect_soon`'s queue: files to look at, each once, with the conversations whose
/// deletes let go of them (at most `RELEASED_CONVS` each), and whether its worker runs.
#[derive(Default)]
struct Released {
    waiting: std::collections::BTreeMap<FileId, Vec<announce::GoneFrom>>,
    worker: bool,
}

/// Conversations told that one released file is gone, at most (its messages' deletes
/// released it at once in more: the rest learn it from `FileInfo`).
const RELEASED_CONVS: usize = 4;

/// Files waiting for `collect_soon`'s worker at most; beyond, a file is left to the
/// sweeper. Each holds at most `RELEASED_CONVS` audiences of at most `MAX_GROUP_MEMBERS`
/// ids (shared with the conversation while its membership does not change): 32 MiB at
/// the very worst.
const RELEASED_WAITING: usize = 1024;

/// The broker-wide bounds of transfer streams (from `Config`).
#[derive(Clone, Copy, Debug)]
pub struct TransferLimits {
    /// Transfer streams served at once (`max_live_transfer_streams`).
    pub live_streams: usize,
    /// Bytes of upload chunk buffers held at once, being received or queued for Upload
    /// actors (`transfer_buffer_bytes`); raised to one whole chunk's buffer if smaller,
    /// so every chunk can pass.
    pub buffered_chunk_bytes: usize,
    /// Blob files open for downloads at once (`max_open_blob_files`; at least 1).
    pub open_blob_files: usize,
    /// Transfer streams one user may have served at once, over all its connections
    /// (`max_transfer_streams_per_user`).
    pub streams_per_user: usize,
    /// How fast deleted bytes are freed, bytes a second (`delete_bytes_per_sec`).
    pub delete_bytes_per_sec: u64,
    /// Small chunks' fdatasyncs a second over all uploads (`small_chunk_syncs_per_sec`).
    pub small_chunk_syncs_per_sec: u64,
    /// Whether the thumbnail decoder runs under `SCHED_IDLE` (`BackgroundThreads`): when
    /// the runtime's threads run under `SCHED_BATCH` (`runtime_scheduling`).
    pub idle_decoder: bool,
}

impl TransferLimits {
    /// The limits `config` sets.
    pub fn of(config: &crate::config::Config) -> TransferLimits {
        TransferLimits {
            live_streams: config.max_live_transfer_streams,
            buffered_chunk_bytes: usize::try_from(config.transfer_buffer_bytes).unwrap_or(usize::MAX),
            open_blob_files: config.max_open_blob_files,
            streams_per_user: config.max_transfer_streams_per_user,
            delete_bytes_per_sec: config.delete_bytes_per_sec,
            small_chunk_syncs_per_sec: config.small_chunk_syncs_per_sec,
            idle_decoder: config.idle_background_work(),
        }
    }
}

/// What a queued upload chunk holds until its actor has handled it: a place in its
/// stream's queue and its bytes in the broker-wide budget.
pub struct ChunkPermits {
    /// The stream's allowance for queued chunks.
    pub stream: tokio::sync::OwnedSemaphorePermit,
    /// The chunk's bytes in `transfer_buffer_bytes`.
    pub bytes: tokio::sync::OwnedSemaphorePermit,
}

/// One transfer stream of a user counted in `Files::user_stream`; dropping it counts it
/// out, and the user's entry goes with its last stream.
pub(crate) struct UserStream<'a> {
    files: &'a Files,
    user: UserId,
}

impl Drop for UserStream<'_> {
    fn drop(&mut self) {
        self.files.user_streams.lock().unwrap_or_else(|p| p.into_inner()).give_back(self.user);
    }
}

/// Holds the lock of one upload (`Files::lock_upload`); its map entry goes with the last
/// holder.
struct UploadLock<'a> {
    files: &'a Files,
    id: FileId,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for UploadLock<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.files.spawning.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map's own reference left: nobody holds or waits for it.
        if map.get(&self.id).is_some_and(|lock| Arc::strong_count(lock) == 1) {
            map.remove(&self.id);
        }
    }
}

#[derive(Clone)]
struct Slot {
    actor: ActorRef<UploadMsg>,
    /// Messages sent and not yet handled: an idle actor retires only at 0.
    depth: Arc<AtomicUsize>,
}

/// Why a message could not reach an upload's actor.
#[derive(Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// No upload in progress under that id (gone, or complete).
    NoUpload,
    /// Its actor could not start (a storage or disk failure).
    Failed(String),
}

impl Files {
    /// Files under `data_dir`, serving transfer streams within `limits`.
    pub fn open(data_dir: &std::path::Path, limits: TransferLimits) -> std::io::Result<Files> {
        // A whole chunk's buffer (frame, alignment padding) fits whatever the setting.
        let chunk_bytes_max = limits
            .buffered_chunk_bytes
            .clamp(MAX_TRANSFER_FRAME_BYTES as usize + blobs::DIRECT_ALIGN, tokio::sync::Semaphore::MAX_PERMITS);
        Ok(Files {
            live_streams: Arc::new(tokio::sync::Semaphore::new(limits.live_streams)),
            places: std::sync::Mutex::new(HashMap::new()),
            user_streams: std::sync::Mutex::default(),
            streams_per_user: limits.streams_per_user,
            chunk_budget: budget::ChunkBudget::new(chunk_bytes_max),
            small_syncs: budget::SyncPacer::new(limits.small_chunk_syncs_per_sec),
            open_blobs: Arc::new(tokio::sync::Semaphore::new(limits.open_blob_files.max(1))),
            blob_waiters: AtomicUsize::new(0),
            blob_evictions: std::sync::Mutex::new(Vec::new()),
            blobs: Blobs::open(data_dir, limits.delete_bytes_per_sec)?,
            map: std::sync::Mutex::new(HashMap::new()),
            spawning: std::sync::Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            storage_full: crate::metrics::Tally::default(),
            upload_holds: crate::user::Allowances::new(
                crate::limits::UPLOAD_HOLDS_PER_HOUR / 3600.0,
                crate::limits::UPLOAD_HOLDS_BURST,
                crate::limits::UPLOAD_HOLD_ALLOWANCES_MAX,
            ),
            hashed_bytes: AtomicU64::new(0),
            thumbnails: thumbnails::Thumbnails::start(limits.idle_decoder)?,
            released: std::sync::Mutex::new(Released::default()),
            pretended_free: AtomicU64::new(u64::MAX),
            disk_low: std::sync::atomic::AtomicBool::new(false),
            writes_storage_full: crate::metrics::Tally::default(),
        })
    }

    /// For tests only: makes the disk checks of uploads (`BeginUpload`'s, and each chunk's
    /// of an upload whose room lapsed) and `watch_disk`'s next look see `free` bytes free on the data dir's disk
    /// instead of reading it, or read it again (`None`). A shared disk's free space moves
    /// by more than a chunk while a test runs, so a check at a chunk's granularity cannot
    /// be tested against it.
    #[doc(hidden)]
    pub fn pretend_free_bytes(&self, free: Option<u64>) {
        self.pretended_free.store(free.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// `STORAGE_FULL` for a log write that adds content (a message, an edit, members,
    /// a title) while the data dir's disk is below
    /// `log_write_floor` (`watch_disk`); counted, and logged at most once a minute.
    pub(crate) fn refuse_log_write(&self) -> Result<(), switchboard_protocol::ErrorBody> {
        if !self.disk_low.load(Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(refused) = self.writes_storage_full.count(crate::now_ms()) {
            tracing::warn!(refused, "messages refused with STORAGE_FULL: the data dir's disk is nearly full");
        }
        Err(switchboard_protocol::ErrorBody::new(
            switchboard_protocol::ErrorCode::STORAGE_FULL,
            "the broker's disk is nearly full: new messages are refused until it has room; try later",
        ))
    }

    /// The free bytes a test set with `pretend_free_bytes`, if any.
    pub(crate) fn pretended_free_bytes(&self) -> Option<u64> {
        Some(self.pretended_free.load(Ordering::Relaxed)).filter(|&free| free != u64::MAX)
    }

    /// A place among `max_live_transfer_streams` for a transfer stream, held while the
    /// returned guard lives. With every place taken, the stream furthest behind its
    /// place's lease (`budget::Place`) is told to give its place up and this one waits
    /// up to `PLACE_HANDOVER` for it (and has no grace then); `None` if none is behind
    /// (or the place went to another meanwhile): the stream is refused (`OVERLOADED`).
    pub(crate) async fn take_place(&self) -> Option<PlaceHold<'_>> {
        let (permit, graced) = match self.live_streams.clone().try_acquire_owned() {
            Ok(permit) => (permit, true),
            Err(_) => {
                let now = tokio::time::Instant::now();
                let evicted = {
                    let places = self.places.lock().unwrap_or_else(|p| p.into_inner());
                    budget::most_behind(places.values(), now).is_some_and(|p| p.evict())
                };
                if !evicted {
                    return None;
                }
                let handover = tokio::time::timeout(PLACE_HANDOVER, self.live_streams.clone().acquire_owned());
                (handover.await.ok()?.ok()?, false)
            }
        };
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let place = Arc::new(budget::Place::new(tokio::time::Instant::now(), graced));
        self.places.lock().unwrap_or_else(|p| p.into_inner()).insert(id, place.clone());
        Some(PlaceHold { files: self, id, place, _permit: permit })
    }

    /// Counts a transfer stream of `user` while the returned guard lives; `None` if the
    /// user already has `streams_per_user` served (the stream is refused).
    pub(crate) fn user_stream(&self, user: UserId) -> Option<UserStream<'_>> {
        let taken = self.user_streams.lock().unwrap_or_else(|p| p.into_inner()).take(user, self.streams_per_user);
        // Built only when taken: a guard dropped unused would give a place back.
        if taken { Some(UserStream { files: self, user }) } else { None }
    }

    /// Transfer streams `user` has served now, over all its connections.
    pub fn user_streams(&self, user: UserId) -> usize {
        self.user_streams.lock().unwrap_or_else(|p| p.into_inner()).held(user)
    }

    /// Takes a place among the blob files open for downloads, waiting until `deadline`.
    /// `None` if the deadline passed first.
    pub(crate) async fn reserve_blob(
        &self,
        deadline: tokio::time::Instant,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = self.open_blobs.clone().try_acquire_owned() {
            return Some(permit);
        }
        // Counted while waiting, however the wait ends (a stream dropped mid-wait too).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.blob_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.blob_waiters);
        acquire_until(&self.open_blobs, 1, deadline).await
    }

    /// Takes one of the evictions the downloads waiting for a blob file are owed: true
    /// (the caller gives its blob file up) while fewer downloads are giving theirs up
    /// than wait, so one waiter costs one slow reader its file, not every slow reader.
    /// The claim lasts `EVICTION_HOLD`, about the time the freed file takes to reach its
    /// waiter.
    pub(crate) fn claim_blob_for_waiter(&self) -> bool {
        let mut evicting = self.blob_evictions.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        evicting.retain(|until| *until > now);
        if evicting.len() >= self.blob_waiters.load(Ordering::SeqCst) {
            return false;
        }
        evicting.push(now + EVICTION_HOLD);
        true
    }

    /// Bytes of upload chunk buffers held now, being received or queued for actors
    /// (within `transfer_buffer_bytes`).
    pub fn queued_chunk_bytes(&self) -> usize {
        self.chunk_budget.held()
    }

    /// A new transfer stream id.
    pub fn next_stream(&self) -> u64 {
        self.next_stream.fetch_add(1, Ordering::Relaxed)
    }

    /// Number of live Upload actors.
    pub fn live(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Sends `msg` to the actor of upload `id`, starting it if needed.
    pub async fn send(&self, shared: &Arc<Shared>, id: &FileId, mut msg: UploadMsg) -> Result<(), Unreachable> {
        for _ in 0..3 {
            // Counted under the map lock, so the actor cannot retire between the lookup
            // and the cast.
            let slot = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().inspect(|slot| {
                slot.depth.fetch_add(1, Ordering::AcqRel);
            });
            if let Some(slot) = slot {
                match slot.actor.cast(msg) {
                    Ok(()) => return Ok(()),
                    Err(ractor::MessagingErr::SendErr(back)) => {
                        slot.depth.fetch_sub(1, Ordering::AcqRel);
                        self.forget(id, slot.actor.get_id());
                        msg = back;
                    }
                    Err(e) => {
                        slot.depth.fetch_sub(1, Ordering::AcqRel);
                        return Err(Unreachable::Failed(e.to_string()));
                    }
                }
            }
            Box::pin(self.spawn(shared, id)).await?;
        }
        Err(Unreachable::Failed("upload actor unavailable".into()))
    }

    /// The lock of upload `id` (`spawning`), held until the guard drops.
    async fn lock_upload(&self, id: &FileId) -> UploadLock<'_> {
        let lock = {
            let mut map = self.spawning.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= SPAWNING_SWEEP {
                // Entries a cancelled waiter left behind (nobody holds or waits for them).
                map.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            map.entry(*id).or_default().clone()
        };
        UploadLock { files: self, id: *id, guard: Some(lock.lock_owned().await) }
    }

    async fn spawn(&self, shared: &Arc<Shared>, id: &FileId) -> Result<(), Unreachable> {
        // Per upload (finishing a publishing left half-done takes a rename and a group
        // commit); other uploads start meanwhile.
        let _guard = self.lock_upload(id).await;
        if self.map.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id) {
            return Ok(());
        }
        let mut record = match shared.store.file(id) {
            Ok(Some(r)) if !r.is_complete() => r,
            Ok(_) => return Err(Unreachable::NoUpload),
            Err(e) => return Err(Unreachable::Failed(e.to_string())),
        };
        if record.stage == FileStage::Publishing {
            // The last actor's publishing failed half-way: finish it as the start-up
            // repair would, rather than verify bytes that may have moved to the blob.
            record = self.finish_publishing(shared, id, record).await?;
        }
        // Its partial file as the record says (lost or cut short since the broker
        // started: the upload goes back to what is there), the offset's write durable
        // before a stream is told it.
        let (s, file, offset) = (shared.clone(), *id, record.offset());
        let reconciled = tokio::task::spawn_blocking(move || s.files.blobs.reconcile_partial(&s.store, &file, offset))
            .await
            .map_err(|e| Unreachable::Failed(e.to_string()))?
            .map_err(Unreachable::Failed)?;
        if let Some(durable) = reconciled {
            durable.await.map_err(|e| Unreachable::Failed(e.to_string()))?;
            record = match shared.store.file(id) {
                Ok(Some(r)) if !r.is_complete() => r,
                Ok(_) => return Err(Unreachable::NoUpload),
                Err(e) => return Err(Unreachable::Failed(e.to_string())),
            };
        }
        let depth = Arc::new(AtomicUsize::new(0));
        let args = UploadArgs { id: *id, record, depth: depth.clone() };
        let (actor, _) = Actor::spawn(None, Upload { shared: shared.clone() }, args)
            .await
            .map_err(|e| Unreachable::Failed(e.to_string()))?;
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(*id, Slot { actor, depth });
        Ok(())
    }

    /// `Blobs::finish_publishing` for upload `id`, at run time (its upload lock held):
    /// the record to start its actor with if it starts over; `NoUpload` once it is
    /// complete (its thumbnail under way) or gone. Either new state is pushed to the
    /// uploader's devices and the conversations carrying it, as an actor would.
    async fn finish_publishing(
        &self,
        shared: &Arc<Shared>,
        id: &FileId,
        record: FileRecord,
    ) -> Result<FileRecord, Unreachable> {
        let (s, file, hash, owner) = (shared.clone(), *id, record.blake3, record.uploader);
        let finished =
            tokio::task::spawn_blocking(move || s.files.blobs.finish_publishing(&s.store, &file, &hash, owner))
                .await
                .map_err(|e| Unreachable::Failed(e.to_string()))?
                .map_err(Unreachable::Failed)?;
        // What the actor whose publishing failed did not push: the upload's new state.
        let told = |record: &FileRecord, state| announce::announce(shared, id, record.uploader, record.size, state);
        match finished {
            blobs::Finished::Completed(record, durable) => {
                durable.await.map_err(|e| Unreachable::Failed(e.to_string()))?;
                told(&record, FileState::Complete { thumbnail: None });
                if thumbnail::is_thumbnailable(&record.content_type) {
                    tokio::spawn(thumbnails::make_thumbnail(shared.clone(), *id, record));
                }
                Err(Unreachable::NoUpload)
            }
            blobs::Finished::Restarted(durable) => {
                durable.await.map_err(|e| Unreachable::Failed(e.to_string()))?;
                match shared.store.file(id) {
                    Ok(Some(r)) if !r.is_complete() => {
                        told(&r, FileState::Uploading { offset: 0 });
                        Ok(r)
                    }
                    Ok(_) => Err(Unreachable::NoUpload),
                    Err(e) => Err(Unreachable::Failed(e.to_string())),
                }
            }
            blobs::Finished::NotPublishing => Err(Unreachable::NoUpload),
        }
    }

    /// Removes upload `id` (cancelled or expired): through its actor if one is live,
    /// else directly. Whether there was an upload in progress.
    pub async fn remove(&self, shared: &Arc<Shared>, id: &FileId, reason: &'static str) -> Result<bool, String> {
        let live = self.map.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id);
        if live {
            // An actor that stops with the removal in its mailbox (finished, or rewound)
            // drops it unanswered: then ask again (its successor, or the store), a few
            // times at most.
            for attempt in 0..3u64 {
                if attempt > 0 {
                    // The stopping actor leaves the map as it stops.
                    tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                }
                let (done, answer) = tokio::sync::oneshot::channel();
                match self.send(shared, id, UploadMsg::Remove { reason, done }).await {
                    Ok(()) => {
                        if let Ok(removed) = answer.await {
                            return Ok(removed);
                        }
                    }
                    Err(Unreachable::NoUpload) => return Ok(false),
                    Err(Unreachable::Failed(e)) => return Err(e),
                }
            }
            return Err("the upload's actor stopped before removing it; try again".into());
        }
        // No actor: none may start while this removes.
        let _guard = self.lock_upload(id).await;
        if self.map.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id) {
            drop(_guard);
            return Box::pin(self.remove(shared, id, reason)).await;
        }
        // One left publishing by a failure (`remove_upload` leaves those alone): finished
        // first, so the sweeper does not find it expired at every pass for ever. Complete
        // now, it is not removed; started over, it is.
        if let Some(record) = shared.store.file(id).map_err(|e| e.to_string())?
            && record.stage == FileStage::Publishing
        {
            match self.finish_publishing(shared, id, record).await {
                Ok(_) => {}
                Err(Unreachable::NoUpload) => return Ok(false),
                Err(Unreachable::Failed(e)) => return Err(e),
            }
        }
        let (s, id) = (shared.clone(), *id);
        let removed =
            tokio::task::spawn_blocking(move || remove_upload(&s, &id)).await.map_err(|e| e.to_string())??;
        if let Some(record) = &removed {
            // The final state, as the actor would have pushed it.
            let state = switchboard_protocol::FileState::Failed { code: switchboard_protocol::ErrorCode::NOT_FOUND };
            announce::announce(shared, &id, record.uploader, record.size, state);
        }
        Ok(removed.is_some())
    }

    /// Tells a live actor that a stream ended (an actor that is gone has nothing to
    /// forget, and none is started for it).
    pub fn closed(&self, id: &FileId, stream: u64) {
        let slot = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().inspect(|slot| {
            slot.depth.fetch_add(1, Ordering::AcqRel);
        });
        if let Some(slot) = slot
            && slot.actor.cast(UploadMsg::Closed { stream }).is_err()
        {
            slot.depth.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Removes the actor if it is still the registered one and nothing is queued for it.
    fn retire(&self, id: &FileId, actor: ractor::ActorId) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(slot) if slot.actor.get_id() == actor && slot.depth.load(Ordering::Acquire) == 0 => {
                map.remove(id);
                true
            }
            _ => false,
        }
    }

    /// Forgets a stopped actor (if it is still the registered one).
    fn forget(&self, id: &FileId, actor: ractor::ActorId) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(id).is_some_and(|s| s.actor.get_id() == actor) {
            map.remove(id);
        }
    }

    /// Stops every actor (shutdown).
    pub fn stop_all(&self) {
        for (_, slot) in self.map.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            slot.actor.stop(Some("shutdown".into()));
        }
    }
}

/// `n` permits of `semaphore`, waiting until `deadline`; `None` once it passed (or the
/// semaphore is closed).
async fn acquire_until(
    semaphore: &Arc<tokio::sync::Semaphore>,
    n: u32,
    deadline: tokio::time::Instant,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match tokio::time::timeout_at(deadline, semaphore.clone().acquire_many_owned(n)).await {
        Ok(Ok(permit)) => Some(permit),
        Ok(Err(_)) | Err(_) => None,
    }
}

/// Removes an upload in progress: its record (giving the quota back), then, once that
/// is durable, its partial file. Blocking (call on the blocking pool). The record
/// removed, if any; returned only once the removal is durable.
fn remove_upload(shared: &Shared, id: &FileId) -> Result<Option<switchboard_storage::FileRecord>, String> {
    // Its bytes count against its uploader from before its quota is given back until they
    // are in the trash (counted there until freed).
    let _owing = match shared.store.file(id).map_err(|e| e.to_string())? {
        Some(record) if matches!(record.stage, FileStage::Uploading { .. }) => {
            shared.files.blobs.owe(record.uploader, charged_bytes(record.size))
        }
        _ => return Ok(None),
    };
    match shared.store.remove_upload(id).map_err(|e| e.to_string())? {
        Some((record, durable)) => {
            // The record goes first and durably: a crash before the file goes leaves an
            // orphan file, which the start-up repair deletes. Deleting the file first
            // could bring back the record without its bytes.
            durable.wait_blocking().map_err(|e| e.to_string())?;
            shared.files.blobs.remove_partial(id, Some(record.uploader)).map_err(|e| e.to_string())?;
            Ok(Some(record))
        }
        None => Ok(None),
    }
}

/// Deletes the complete file `id` if nothing holds it any more, and the blobs its
/// deletion leaves unreferenced (once that is durable). Whether this call deleted it
/// (its removal is durable only once a later commit is, when no blob went). Blocking.
pub(crate) fn collect(shared: &Shared, id: &FileId) -> Result<bool, String> {
    // As for an upload removed: counted from the moment its quota is given back until
    // its blob, if it goes, is in the trash.
    let owe = |user, bytes| shared.files.blobs.owe(user, bytes);
    let (collected, _owing) = shared.store.collect_file_with(id, crate::now_ms(), owe).map_err(|e| e.to_string())?;
    let deleted = collected.owner.is_some();
    if collected.unreferenced.is_empty() {
        drop(collected.durable);
        return Ok(deleted);
    }
    // The references are gone on disk before the bytes are: a crash in between leaves
    // only unreferenced blobs, deleted at the next start.
    // Waited for without a runtime handle: `settle_sent` may run here on a plain thread
    // (an answer given off the runtime), where `Handle::current` panics.
    collected.durable.wait_blocking().map_err(|e| e.to_string())?;
    for hash in collected.unreferenced {
        // Another upload of the same bytes may have published onto it since.
        let owner = collected.owner.filter(|(_, blob)| *blob == hash).map(|(user, _)| user);
        shared.files.blobs.remove_unreferenced(&shared.store, &hash, owner)?;
    }
    Ok(deleted)
}

/// Waits until everything written before the call is durable (a barrier of the next
/// group commit): `collect` waits only when bytes go, and a deletion is told only once
/// it is durable. Blocking.
fn wait_durable(shared: &Shared) -> Result<(), String> {
    let barrier = shared.store.barrier().map_err(|e| e.to_string())?;
    barrier.wait_blocking().map_err(|e| e.to_string())
}

/// `collect`, with the file's record if this call deleted it (to tell whoever saw it).
/// A file gone already is collected too, which takes its mark away: a message's delete
/// marks its files without looking whether they exist (an upload attached, then
/// cancelled), and before, only a collection took a mark away and none ran for a
/// missing file: such marks stayed for good, and the sweeper read each on every pass
/// (an attacker review). Blocking.
pub(crate) fn collect_record(shared: &Shared, id: &FileId) -> Result<Option<FileRecord>, String> {
    let record = shared.store.file(id).map_err(|e| e.to_string())?;
    let deleted = collect(shared, id)?;
    Ok(record.filter(|_| deleted))
}

/// Deletes those of `files` that nothing holds or carries any more: `Effect::Released`,
/// the files of a message of `conv` deleted, once the delete is durable, so the
/// uploader's quota comes back at once rather than when the sweeper next runs, and the
/// delete's `audience` (the members who could read the message) and the uploader's
/// devices are told it is gone (`Event::File`, `Failed` with `NOT_FOUND`). One worker on a blocking thread looks at each waiting
/// file once (a file released by many deletes at once, once); past `RELEASED_WAITING`
/// waiting, and any that fails (logged), is the sweeper's (which tells only the uploader).
pub(crate) fn collect_soon(shared: &Arc<Shared>, conv: ConvId, audience: Arc<[UserId]>, files: Vec<FileId>) {
    if shared.health.is_failed() {
        return;
    }
    let start = {
        let mut released = shared.files.released.lock().unwrap_or_else(|p| p.into_inner());
        for id in files {
            let told = (conv, Some(audience.clone()));
            if let Some(convs) = released.waiting.get_mut(&id) {
                if convs.len() < RELEASED_CONVS && !convs.iter().any(|(c, _)| *c == conv) {
                    convs.push(told);
                }
            } else if released.waiting.len() < RELEASED_WAITING {
                released.waiting.insert(id, vec![told]);
            }
        }
        !std::mem::replace(&mut released.worker, true)
    };
    if !start {
        return;
    }
    /// Lets the next `collect_soon` start a worker should this one panic (what waits
    /// is left to the sweeper).
    struct Running(Arc<Shared>, bool);
    impl Drop for Running {
        fn drop(&mut self) {
            if !self.1 {
                let mut released = self.0.files.released.lock().unwrap_or_else(|p| p.into_inner());
                released.waiting.clear();
                released.worker = false;
            }
        }
    }
    let running = Running(shared.clone(), false);
    let s = shared.clone();
    tokio::task::spawn_blocking(move || {
        // The whole guard, not only the field set below, goes with the worker.
        let mut running = running;
        loop {
            let (next, convs) = {
                let mut released = s.files.released.lock().unwrap_or_else(|p| p.into_inner());
                match released.waiting.pop_first() {
                    Some(next) if !s.health.is_failed() => next,
                    _ => {
                        // Under the lock that queues: a file queued after this starts
                        // a new worker.
                        released.waiting.clear();
                        released.worker = false;
                        running.1 = true;
                        return;
                    }
                }
            };
            // A panic loses that file to the sweeper, not the worker.
            let gone = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let Some(record) = collect_record(&s, &next)? else { return Ok(None) };
                wait_durable(&s)?;
                Ok::<_, String>(Some(record))
            }));
            match gone {
                Ok(Ok(Some(record))) => announce::announce_gone(&s, &next, record.uploader, record.size, convs),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(file = blobs::hex(&next), error = %e, "deleting a released file failed"),
                Err(_) => tracing::error!(file = blobs::hex(&next), "deleting a released file panicked"),
            }
        }
    });
}

/// Runs until the broker goes: every interval, removes expired uploads and deletes
/// complete files nothing holds any more (their uploader dropped them and the last
/// message carrying them was deleted: those `collect_soon` did not get to, after a
/// crash or past its queue). The uploader's devices are told each file it deleted is
/// gone once that is durable (the deleted messages' readers saw them deleted). Holds
/// the broker only while it works.
pub(crate) async fn sweeper(shared: Weak<Shared>, interval: Duration) {
    const BATCH: usize = 256;
    // Where the last run stopped among the unheld-file marks: each run goes on from
    // there (and starts over past the last), so marks kept through a forward's grace
    // never hide the ones after them.
    let mut unheld_after: Option<FileId> = None;
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else { return };
        if shared.health.is_failed() {
            return;
        }
        // The index scans on a blocking thread, like the deletions.
        let (s, now) = (shared.clone(), crate::now_ms());
        match tokio::task::spawn_blocking(move || s.store.expired_uploads(now, BATCH).map_err(|e| e.to_string())).await
        {
            Ok(Ok(expired)) => {
                // Each on its own: one that fails is logged and the rest still go.
                for id in expired {
                    if let Err(e) = shared.files.remove(&shared, &id, "the upload expired").await {
                        tracing::warn!(file = blobs::hex(&id), error = %e, "removing an expired upload failed");
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading expired uploads failed"),
            Err(e) => tracing::warn!(error = %e, "reading expired uploads failed"),
        }
        let s = shared.clone();
        let mut after = unheld_after.take();
        let swept = tokio::task::spawn_blocking(move || {
            for _ in 0..UNHELD_PAGES {
                let files = s.store.unheld_files(after.as_ref(), BATCH).map_err(|e| e.to_string())?;
                // Each on its own: one that fails is logged and the rest still go.
                let mut deleted = Vec::new();
                for id in &files {
                    match collect_record(&s, id) {
                        Ok(Some(record)) => deleted.push((*id, record)),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(file = blobs::hex(id), error = %e, "deleting an unheld file failed"),
                    }
                }
                // The page's deletions told once durable, before the next page is read.
                if !deleted.is_empty() {
                    wait_durable(&s)?;
                    for (id, record) in deleted {
                        announce::announce_gone_to_uploader(&s, &id, record.uploader, record.size);
                    }
                }
                match files.last() {
                    Some(last) if files.len() == BATCH => after = Some(*last),
                    // Past the last: the next run starts over.
                    _ => {
                        after = None;
                        break;
                    }
                }
            }
            Ok::<_, String>(after)
        })
        .await;
        match swept.map_err(|e| e.to_string()) {
            Ok(Ok(stopped_at)) => unheld_after = stopped_at,
            Ok(Err(e)) | Err(e) => tracing::warn!(error = %e, "sweeping unheld files failed"),
        }
    }
}

/// The sweeper's interval for an upload expiry of `expiry_secs`.
pub(crate) fn sweep_interval(expiry_secs: u64) -> Duration {
    Duration::from_millis((expiry_secs.saturating_mul(1000) / 4).clamp(100, 60_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short deadline on the real clock.
    const WAIT: Duration = Duration::from_millis(300);

    impl Files {
        /// A chunk's bytes, waiting until `deadline`.
        async fn reserve_chunk(
            &self,
            len: usize,
            deadline: tokio::time::Instant,
        ) -> Option<tokio::sync::OwnedSemaphorePermit> {
            tokio::time::timeout_at(deadline, self.chunk_budget.reserve(len)).await.ok()
        }
    }

    fn files(dir: &std::path::Path, buffered_chunk_bytes: usize) -> Files {
        let limits = TransferLimits {
            live_streams: 8,
            buffered_chunk_bytes,
            open_blob_files: 1,
            streams_per_user: 2,
            delete_bytes_per_sec: blobs::DELETE_BYTES_PER_SEC,
            small_chunk_syncs_per_sec: crate::limits::SMALL_CHUNK_SYNCS_PER_SEC,
            idle_decoder: false,
        };
        Files::open(dir, limits).unwrap()
    }

    #[tokio::test]
    async fn a_spent_budget_makes_a_stream_wait_until_its_deadline_and_no_longer() {
        let dir = tempfile::tempdir().unwrap();
        let frame = MAX_TRANSFER_FRAME_BYTES as usize;
        let files = files(dir.path(), 2 * frame);
        let far = tokio::time::Instant::now() + Duration::from_secs(30);
        let first = files.reserve_chunk(frame, far).await.unwrap();
        let second = files.reserve_chunk(frame, far).await.unwrap();
        assert_eq!(files.queued_chunk_bytes(), 2 * frame);
        // Spent: the next chunk waits for its whole deadline, then gives up.
        let start = tokio::time::Instant::now();
        assert!(files.reserve_chunk(1, start + WAIT).await.is_none());
        assert!(start.elapsed() >= WAIT);
        // Bytes handled in time let a waiting chunk through, before its deadline.
        let start = tokio::time::Instant::now();
        let (got, ()) = tokio::join!(files.reserve_chunk(1000, far), async {
            tokio::time::sleep(WAIT).await;
            drop(first);
        });
        assert!(got.is_some());
        assert!(start.elapsed() >= WAIT && start.elapsed() < Duration::from_secs(30));
        assert_eq!(files.queued_chunk_bytes(), frame + 1000);
        drop((got, second));
        assert_eq!(files.queued_chunk_bytes(), 0);
        // A budget set below one chunk still lets a whole chunk through.
        let small = super::tests::files(dir.path(), 1);
        assert!(small.reserve_chunk(frame, far).await.is_some());
    }

    #[tokio::test]
    async fn open_blob_files_are_bounded_and_a_download_waits_for_one_to_close() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 0);
        let far = tokio::time::Instant::now() + Duration::from_secs(30);
        let open = files.reserve_blob(far).await.unwrap();
        let start = tokio::time::Instant::now();
        assert!(files.reserve_blob(start + WAIT).await.is_none(), "one blob file open at most");
        assert!(start.elapsed() >= WAIT);
        let (got, ()) = tokio::join!(files.reserve_blob(far), async {
            tokio::time::sleep(WAIT).await;
            drop(open);
        });
        assert!(got.is_some(), "served once the other download let its file go");
    }

    #[test]
    fn a_user_has_at_most_its_share_of_streams_and_the_count_leaves_no_entry_behind() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 0);
        let (a, b) = (files.user_stream(1).unwrap(), files.user_stream(1).unwrap());
        assert!(files.user_stream(1).is_none(), "a third stream of user 1");
        let other = files.user_stream(2).expect("another user's stream is not counted with hers");
        assert_eq!((files.user_streams(1), files.user_streams(2)), (2, 1));
        drop(a);
        let c = files.user_stream(1).expect("a place given back is taken again");
        drop((b, c, other));
        assert_eq!(files.user_streams.lock().unwrap().users(), 0, "no entry once a user's streams ended");
        // A share of 0 refuses every stream and keeps no entry either.
        let none = Files::open(
            dir.path(),
            TransferLimits {
                live_streams: 8,
                buffered_chunk_bytes: 0,
                open_blob_files: 1,
                streams_per_user: 0,
                delete_bytes_per_sec: blobs::DELETE_BYTES_PER_SEC,
                small_chunk_syncs_per_sec: crate::limits::SMALL_CHUNK_SYNCS_PER_SEC,
                idle_decoder: false,
            },
        )
        .unwrap();
        assert!(none.user_stream(1).is_none());
        assert_eq!(none.user_streams.lock().unwrap().users(), 0);
    }

    #[tokio::test]
    async fn starting_one_upload_never_waits_for_another_and_the_locks_are_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path(), 0);
        let (a, b) = ([1; 16], [2; 16]);
        let held = files.lock_upload(&a).await;
        // Another upload's lock is free while `a`'s is held (its actor may be hashing).
        let other = tokio::time::timeout(WAIT, files.lock_upload(&b)).await;
        assert!(other.is_ok(), "one upload's start waited for another's");
        drop(other);
        // The same upload waits for its own lock.
        assert!(tokio::time::timeout(WAIT, files.lock_upload(&a)).await.is_err());
        drop(held);
        assert!(tokio::time::timeout(WAIT, files.lock_upload(&a)).await.is_ok());
        assert!(files.spawning.lock().unwrap().is_empty(), "no lock is kept once nobody holds it");
    }
}
