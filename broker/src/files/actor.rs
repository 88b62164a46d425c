//! The Upload actor: one per upload in progress, started on demand by `Files` and
//! passivated when idle. It drives `UploadState` and does the I/O: it owns the partial
//! file and the whole-file BLAKE3 hasher, writes and fdatasyncs each chunk on a blocking
//! thread, records the offset and waits for the group commit before a chunk is reported
//! durable, verifies and publishes the file, and pushes progress. Its input is bounded
//! by the transfer streams: each stream carries a permit per chunk, at most two, and
//! every queued chunk's bytes hold permits of the broker-wide `transfer_buffer_bytes`
//! until it is handled.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use switchboard_protocol::limits::MAX_CHUNK_BYTES;
use switchboard_protocol::{Chunk, ErrorBody, ErrorCode, FileId, FileRef, FileState, TransferReply};
use switchboard_storage::FileRecord;
use tokio::sync::{mpsc, oneshot};

use super::ChunkPermits;
use super::blobs::{Blobs, PartialFile, hex};
use super::sniff::{self, Verdict};
use super::state::{Effect, StreamId, UploadState};
use super::thumbnail;
use crate::Shared;

/// Messages to an Upload actor.
pub enum UploadMsg {
    /// A new upload stream wants to send from `offset`; replies go to `out`.
    Open {
        /// The stream.
        stream: StreamId,
        /// Where it starts.
        offset: u64,
        /// Where its replies go (bounded by the protocol: one per chunk plus one).
        out: mpsc::UnboundedSender<TransferReply>,
        /// Says whether the device that opened it was revoked (or its account disabled)
        /// since: then the stream does not take over the upload.
        revocation: crate::reply::Revocation,
    },
    /// A chunk from `stream`; `matches` says whether its data matched its checksum. The
    /// permits are released once it is handled.
    Chunk {
        /// The stream.
        stream: StreamId,
        /// The chunk.
        chunk: Chunk,
        /// Whether its data matches its CRC-32 (`Chunk::intact`, checked as it was read).
        matches: bool,
        /// Its place in the stream's queue and its bytes in the broker-wide budget.
        permit: ChunkPermits,
        /// Whether the device that sent it was cut off since (then it is not written).
        revocation: crate::reply::Revocation,
    },
    /// A stream ended.
    Closed {
        /// The stream.
        stream: StreamId,
    },
    /// Remove the upload (cancelled or expired); answers whether there was one.
    Remove {
        /// Why (`NOT_FOUND` for both: the id is gone).
        reason: &'static str,
        /// Answered once removed.
        done: oneshot::Sender<bool>,
    },
    /// Every byte is durable: verify (sent to itself when it starts at full size).
    Verify,
    /// Periodic: throttled progress, passivation.
    Tick,
}

/// What an Upload actor starts from.
pub struct UploadArgs {
    pub(super) id: FileId,
    pub(super) record: FileRecord,
    pub(super) depth: Arc<AtomicUsize>,
}

/// The actor's state.
pub struct UploadActorState {
    id: FileId,
    record: FileRecord,
    state: UploadState,
    /// The partial file (two descriptors with `O_DIRECT`), held only while a transfer
    /// stream is open on the upload (or verification reads it): an idle actor lets go of
    /// it (`release_file`) and opens it again for its next stream, so the descriptors
    /// uploads hold are bounded by the live transfer streams
    /// (`max_live_transfer_streams`), not by the uploads in progress over all accounts
    /// (before, each of them held two for the 10 s an idle actor lives, and
    /// `max_uploads_per_user` times a few thousand accounts exhausted the broker's
    /// descriptors: every download, upload and directory sync then failed).
    file: Option<Arc<PartialFile>>,
    /// The whole-file hash so far: of every byte the actor wrote, when it started at
    /// offset 0. One that started later (a resumed upload) starts with nothing hashed
    /// and catches up, reading the durable prefix back beside each chunk it writes
    /// (`catch_up_step`), so that its last chunk finds the hash (nearly) done rather
    /// than the whole file still to read and hash inside the client's wait. Starting an
    /// actor reads nothing, and a chunk reads back at most 8 times its own length, so
    /// reopening an upload over and over (a flaky link, or a client doing it on
    /// purpose) costs reads in proportion to the bytes it writes, not to what it holds.
    hashed: Hashed,
    streams: HashMap<StreamId, mpsc::UnboundedSender<TransferReply>>,
    depth: Arc<AtomicUsize>,
    idle_ticks: u32,
    /// The published type the first bytes showed, recorded with the next offset.
    relabel: Option<String>,
    /// The partial file was found gone when the actor opened it again: the upload was
    /// rewound to offset 0 (`Upload::file`) and this actor stops after the message at
    /// hand, so that the next starts from the rewound record.
    rewound: bool,
}

/// A whole-file BLAKE3 of the upload's bytes `0..to`.
#[derive(Clone)]
struct Hashed {
    hasher: blake3::Hasher,
    to: u64,
}

/// Bytes of a resumed upload's durable prefix read back and hashed beside a chunk, per
/// byte of the chunk: at least `CATCH_UP_RATIO.0`, at most `CATCH_UP_RATIO.1`. The
/// upper bound is what a client can make the broker read for what it writes (a chunk
/// of one byte reads at most 8; the prefix was written with `O_DIRECT`, so it may come
/// from the disk); the lower one catches a far-behind hash up well before the end.
const CATCH_UP_RATIO: (u64, u64) = (2, 8);

/// How much of the `behind` bytes not yet hashed to read and hash beside a chunk of
/// `len` bytes ending at `end` of a `size`-byte upload: an even share, over the chunks
/// still to come (this one included, counted at the largest chunk size, so small chunks
/// get no larger share), of what is behind and of what those chunks add to it until
/// the hash catches up, so that it does by the last chunk; within `CATCH_UP_RATIO` of
/// `len` (so an upload resumed past about seven eighths of its size does not quite).
/// What is still behind at the end is hashed at verification.
fn catch_up_step(behind: u64, size: u64, end: u64, len: u64) -> u64 {
    let to_come = size.saturating_sub(end);
    let chunks = to_come.div_ceil(u64::from(MAX_CHUNK_BYTES)) + 1;
    let (least, most) = (len.saturating_mul(CATCH_UP_RATIO.0), len.saturating_mul(CATCH_UP_RATIO.1));
    behind.saturating_add(to_come).div_ceil(chunks).max(least).min(most).min(behind)
}

/// The Upload actor.
pub struct Upload {
    pub(crate) shared: Arc<Shared>,
}

/// Ticks between progress flushes and idle checks.
const TICK: Duration = Duration::from_millis(250);
/// Ticks without a stream before the actor passivates.
const IDLE_TICKS: u32 = 40;

impl Actor for Upload {
    type Msg = UploadMsg;
    type State = UploadActorState;
    type Arguments = UploadArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<UploadMsg>,
        args: UploadArgs,
    ) -> Result<UploadActorState, ActorProcessingErr> {
        let UploadArgs { id, record, depth } = args;
        let offset = record.offset();
        let shared = self.shared.clone();
        // Bytes past the durable offset are cut off.
        let file = tokio::task::spawn_blocking(move || shared.files.blobs.open_partial(&id, offset)).await??;
        let hashed = Hashed { hasher: blake3::Hasher::new(), to: 0 };
        let state = UploadState::new(record.size, offset, MAX_CHUNK_BYTES);
        if offset == record.size {
            myself.cast(UploadMsg::Verify)?;
        }
        myself.send_interval(TICK, || UploadMsg::Tick);
        Ok(UploadActorState {
            id,
            record,
            state,
            file: Some(Arc::new(file)),
            hashed,
            streams: HashMap::new(),
            depth,
            idle_ticks: 0,
            relabel: None,
            rewound: false,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<UploadMsg>,
        state: &mut UploadActorState,
    ) -> Result<(), ActorProcessingErr> {
        self.shared.files.forget(&state.id, myself.get_id());
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<UploadMsg>,
        msg: UploadMsg,
        st: &mut UploadActorState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(msg, UploadMsg::Tick | UploadMsg::Verify) {
            st.depth.fetch_sub(1, Ordering::AcqRel);
        }
        match msg {
            UploadMsg::Open { out, revocation, .. } if revocation.code().is_some() => {
                // Its device was revoked (or its account disabled) while this waited: it
                // takes nothing over (the owner's live stream from another device goes
                // on; before, it was failed `CONFLICT` after the revocation was answered).
                if let Err(error) = revocation.refusal() {
                    let _ = out.send(TransferReply::Failed { error, offset: st.state.durable() });
                }
            }
            UploadMsg::Open { out, .. } if st.state.is_done() => {
                // Finished just before this stream came: answer as a new actor would. An
                // upload still there failed for the broker's sake (its completion could
                // not be published): the client tries again, and a new actor finishes it
                // once this one stops (`Files::spawn`).
                let reply = match self.shared.store.file(&st.id) {
                    Ok(Some(r)) if r.is_complete() => TransferReply::Complete(super::requests::file_ref(&st.id, &r)),
                    Ok(Some(_)) => TransferReply::Failed {
                        error: ErrorBody::new(ErrorCode::INTERNAL, "the upload's completion failed; try again"),
                        offset: st.state.durable(),
                    },
                    _ => TransferReply::Failed { error: super::requests::no_such_file(), offset: 0 },
                };
                let _ = out.send(reply);
            }
            UploadMsg::Open { stream, offset, out, .. } => {
                st.idle_ticks = 0;
                st.streams.insert(stream, out);
                let effects = st.state.open(stream, offset);
                self.perform(&myself, st, effects, None).await;
            }
            UploadMsg::Chunk { stream, chunk, matches, permit, revocation } => {
                // Not written, nor (were it the last) the file verified and published,
                // once the device that sent it was revoked (its connection is closing).
                self.shared.pauses.pass(crate::pauses::Point::UploadChunk).await;
                if revocation.code().is_none() {
                    let len = chunk.data.len() as u64;
                    let effects = st.state.chunk(stream, chunk.offset, len, matches);
                    self.perform(&myself, st, effects, Some(chunk)).await;
                }
                drop(permit);
            }
            UploadMsg::Closed { stream } => {
                st.streams.remove(&stream);
                st.state.closed(stream);
                release_file(st);
            }
            // Finished (complete, or failed for the broker's sake with the upload left for
            // a successor to finish): the removal is not this actor's to answer. `done`
            // dropped unanswered makes `Files::remove` ask again, through the successor
            // or the store (before: answered "nothing removed", and a cancel of an upload
            // whose completion failed said `NOT_FOUND` while it stayed, holding quota).
            UploadMsg::Remove { .. } if st.state.is_done() => myself.stop(None),
            UploadMsg::Remove { reason, done } => {
                let removed = self.remove(st).await;
                if removed {
                    let effects = st.state.finished(Err(ErrorBody::new(ErrorCode::NOT_FOUND, reason)));
                    self.perform(&myself, st, effects, None).await;
                }
                let _ = done.send(removed);
                myself.stop(None);
            }
            UploadMsg::Verify => self.verify(&myself, st).await,
            UploadMsg::Tick => {
                let effects = st.state.tick(crate::now_ms());
                self.perform(&myself, st, effects, None).await;
                if st.state.is_done() {
                    myself.stop(None);
                } else if st.state.is_idle() {
                    release_file(st);
                    st.idle_ticks += 1;
                    if st.idle_ticks >= IDLE_TICKS && self.shared.files.retire(&st.id, myself.get_id()) {
                        myself.stop(Some("idle".into()));
                    }
                }
            }
        }
        if st.rewound {
            myself.stop(Some("rewound".into()));
        }
        Ok(())
    }
}

/// What a chunk that could not be written leads to: the stream told the durable offset
/// (`STORAGE_FULL` if the disk was full), or 0 when the upload was rewound because its
/// bytes were lost (`Upload::file`).
fn failed_write(st: &mut UploadActorState, error: &ChunkError) -> Vec<Effect> {
    match error {
        _ if st.rewound => st.state.rewound(),
        ChunkError::DiskFull | ChunkError::NoRoom => st.state.disk_full(),
        ChunkError::Failed(_) => st.state.write_failed(),
    }
}

/// Why a chunk was not stored.
#[derive(Debug)]
enum ChunkError {
    /// Its write found no space on the disk (`ENOSPC`).
    DiskFull,
    /// Its upload's room lapsed and the disk's spare room (beside the room other
    /// uploads hold and the reserve) cannot take it (`Store::chunk_room`): not written.
    NoRoom,
    /// Anything else: a read, a write, a sync, the store.
    Failed(String),
}

impl From<String> for ChunkError {
    fn from(e: String) -> Self {
        ChunkError::Failed(e)
    }
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChunkError::DiskFull => f.write_str("no space left on the data dir's disk"),
            ChunkError::NoRoom => f.write_str(
                "its upload's room lapsed and the disk has no spare room beside the room other uploads hold and \
                 disk_reserve_bytes",
            ),
            ChunkError::Failed(e) => f.write_str(e),
        }
    }
}

/// A chunk's write error as a `ChunkError`: a full disk is told apart.
fn chunk_error(e: std::io::Error) -> ChunkError {
    match e.kind() {
        std::io::ErrorKind::StorageFull => ChunkError::DiskFull,
        _ => ChunkError::Failed(e.to_string()),
    }
}

/// Lets go of the partial file once no transfer stream is open on the upload (see
/// `UploadActorState::file`). Nothing reads or writes it meanwhile: the actor awaits its
/// writes and reads in place, so none is in flight between two messages.
fn release_file(st: &mut UploadActorState) {
    if st.streams.is_empty() {
        st.file = None;
    }
}

impl Upload {
    /// The partial file, opened again if the actor let go of it (`release_file`).
    async fn file(&self, st: &mut UploadActorState) -> Result<Arc<PartialFile>, String> {
        if let Some(file) = &st.file {
            return Ok(file.clone());
        }
        let (shared, id) = (self.shared.clone(), st.id);
        let opened = tokio::task::spawn_blocking(move || match shared.files.blobs.reopen_partial(&id) {
            Ok(file) => Ok(Ok(file)),
            // Gone from under the running broker (a disk fault, an operator's mistake):
            // its bytes are lost, and the upload starts over at offset 0 as it would at
            // start (`blobs.rs`): an empty partial file, the record rewound.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::error!(file = hex(&id), "an upload's partial file is gone; it starts over");
                let rewound = shared.store.set_upload_offset(&id, 0, None).map_err(|e| e.to_string())?;
                if rewound.is_some() {
                    shared.files.blobs.open_partial(&id, 0).map_err(|e| e.to_string())?;
                }
                Ok(Err(rewound))
            }
            Err(e) => Err(e.to_string()),
        })
        .await
        .map_err(|e| e.to_string())??;
        let file = match opened {
            Ok(file) => Arc::new(file),
            Err(rewound) => {
                if let Some(durable) = rewound {
                    durable.await.map_err(|e| e.to_string())?;
                }
                st.rewound = true;
                return Err("the upload's bytes were lost; it starts over from offset 0".into());
            }
        };
        st.file = Some(file.clone());
        Ok(file)
    }

    /// Performs `effects` in order; `chunk` is the data a `Write` names.
    async fn perform(
        &self,
        myself: &ActorRef<UploadMsg>,
        st: &mut UploadActorState,
        effects: Vec<Effect>,
        mut chunk: Option<Chunk>,
    ) {
        let mut queue = std::collections::VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            match effect {
                Effect::Reply { stream, reply } => {
                    let last = matches!(reply, TransferReply::Failed { .. } | TransferReply::Complete(_));
                    if let Some(out) = st.streams.get(&stream) {
                        let _ = out.send(reply);
                    }
                    if last {
                        // Dropping the sender ends the stream once its replies are sent.
                        st.streams.remove(&stream);
                    }
                }
                Effect::Write { offset, len } => {
                    let Some(data) = chunk.take().map(|c| c.data) else { continue };
                    let need = st.record.size.min(sniff::HEAD_BYTES);
                    if offset < need && offset + len >= need {
                        // The type check, on the chunk that completes the first bytes
                        // (however small the chunks before it were): the stored prefix
                        // and this chunk's start, against the declared type.
                        let head = match self.head(st, offset, &data, need).await {
                            Ok(head) => head,
                            Err(e) => {
                                tracing::error!(file = hex(&st.id), error = %e, "reading an upload's first bytes failed");
                                queue.extend(failed_write(st, &ChunkError::Failed(e)));
                                continue;
                            }
                        };
                        match sniff::check(&st.record.declared_type, &head) {
                            // The declared type stands, whatever label earlier bytes got:
                            // a relabel whose write failed, or that a partial file cut
                            // back below the first bytes, stayed and was recorded with
                            // the next write (an executable sent after PNG bytes whose
                            // write failed was published as image/png: an attacker
                            // review).
                            Verdict::Keep => {
                                if st.record.content_type != st.record.declared_type {
                                    st.record.content_type = st.record.declared_type.clone();
                                    st.relabel = Some(st.record.declared_type.clone());
                                }
                            }
                            Verdict::Relabel(found) => {
                                st.record.content_type = found.clone();
                                st.relabel = Some(found);
                            }
                            Verdict::Refuse { found } => {
                                self.remove(st).await;
                                let message = format!("the file is {found}, not {}", st.record.declared_type);
                                let error = ErrorBody::new(ErrorCode::TYPE_MISMATCH, message);
                                queue.extend(st.state.finished(Err(error)));
                                continue;
                            }
                        }
                    }
                    let written = self.write(st, offset, data).await;
                    let more = match written {
                        Ok(()) => st.state.written(offset + len, crate::now_ms()),
                        Err(e) => {
                            match e {
                                ChunkError::Failed(_) => {
                                    tracing::error!(file = hex(&st.id), error = %e, "an upload chunk was not stored")
                                }
                                // The operator's business, as a begin refused: counted, and
                                // told at most once a minute.
                                ChunkError::DiskFull | ChunkError::NoRoom => {
                                    if let Some(refused) = self.shared.files.storage_full.count(crate::now_ms()) {
                                        tracing::warn!(
                                            refused,
                                            reason = %e,
                                            "uploads refused or stopped with STORAGE_FULL since the last warning"
                                        );
                                    }
                                }
                            }
                            failed_write(st, &e)
                        }
                    };
                    queue.extend(more);
                }
                Effect::Verify => {
                    // After the replies before it: verification ends the stream.
                    let _ = myself.cast(UploadMsg::Verify);
                }
                Effect::Progress(state) => self.progress(st, state),
            }
        }
    }

    /// The first `need` bytes of the file: the durable prefix below `offset`, read back
    /// from the partial file, then the start of `data` (the chunk at `offset`).
    async fn head(
        &self,
        st: &mut UploadActorState,
        offset: u64,
        data: &bytes::Bytes,
        need: u64,
    ) -> Result<Vec<u8>, String> {
        let file = self.file(st).await?;
        let mut head = tokio::task::spawn_blocking(move || Blobs::read(file.as_file(), 0, offset as usize))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        head.extend_from_slice(&data[..(need - offset) as usize]);
        Ok(head)
    }

    /// Writes and syncs one chunk, then records the new offset durably. The whole-file
    /// hash takes the chunk on another blocking thread meanwhile, after catching up on
    /// the durable prefix (`catch_up_step`) if the actor resumed the upload; it is kept
    /// only if the chunk becomes durable and nothing failed (else what it lacks is read
    /// back from the file later: the bytes below the durable offset never change).
    async fn write(&self, st: &mut UploadActorState, offset: u64, data: bytes::Bytes) -> Result<(), ChunkError> {
        let end = offset + data.len() as u64;
        let file = self.file(st).await?;
        let (shared, id, relabel) = (self.shared.clone(), st.id, st.relabel.clone());
        let mut hashing = st.hashed.clone();
        let step = catch_up_step(offset - hashing.to, st.record.size, end, end - offset);
        let (chunk, prefix) = (data.clone(), file.clone());
        let hashed = tokio::task::spawn_blocking(move || {
            // Only bytes below `offset`, durable and never written again, are read back.
            Blobs::hash_range(prefix.as_file(), &mut hashing.hasher, hashing.to, hashing.to + step)?;
            hashing.to += step;
            if hashing.to == offset {
                hashing.hasher.update(&chunk);
                hashing.to = end;
            }
            Ok::<_, std::io::Error>(hashing)
        });
        // Off the runtime threads: the write and its fdatasync, then recording the offset
        // (which takes the store's files lock).
        let stored = tokio::task::spawn_blocking(move || {
            // An upload whose room lapsed writes on spare room only (`Store::chunk_room`).
            let len = data.len() as u64;
            if !shared.store.chunk_room(&id, len, |held, len| super::requests::disk_room(&shared, held, len)) {
                return Err(ChunkError::NoRoom);
            }
            file.write_chunk(offset, &data).map_err(chunk_error)?;
            // The bytes are durable in the file: now the offset, in the next group commit
            // (a lapsed room taken again if the rest of the file fits).
            let room = |held, rest| super::requests::disk_room(&shared, held, rest);
            match shared.store.set_upload_offset_within(&id, end, relabel.as_deref(), room) {
                Ok(Some(durable)) => Ok(durable),
                Ok(None) => Err(ChunkError::Failed("the upload is gone".to_owned())),
                Err(e) => Err(ChunkError::Failed(e.to_string())),
            }
        });
        let (hashed, stored) = tokio::join!(hashed, stored);
        let recorded = match stored {
            Ok(Ok(durable)) => durable.await.map_err(|e| ChunkError::Failed(e.to_string())),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(ChunkError::Failed(e.to_string())),
        };
        let hashed = hashed.map_err(|e| e.to_string()).and_then(|read| read.map_err(|e| e.to_string()));
        match (recorded, hashed) {
            (Ok(()), Ok(hashing)) => {
                self.shared.files.hashed_bytes.fetch_add(hashing.to - st.hashed.to, Ordering::Relaxed);
                st.hashed = hashing;
                st.relabel = None;
                Ok(())
            }
            (Ok(()), Err(e)) => {
                // Durable and recorded, but the hashing failed (a read, or a panic): the
                // hash stays where it was and catches up from the file later.
                tracing::error!(file = hex(&st.id), error = %e, "hashing an upload chunk failed; reading it back later");
                st.relabel = None;
                Ok(())
            }
            // Nothing past the durable offset counts: the client resends from it, over
            // whatever the failed write left past it.
            (Err(e), _) => Err(e),
        }
    }

    fn progress(&self, st: &UploadActorState, state: FileState) {
        super::announce::announce(&self.shared, &st.id, st.record.uploader, st.record.size, state);
    }

    /// Verifies the whole file and publishes it, or fails and removes the upload.
    async fn verify(&self, myself: &ActorRef<UploadMsg>, st: &mut UploadActorState) {
        if st.state.is_done() {
            return;
        }
        let hash = if st.hashed.to == st.record.size {
            Ok(*st.hashed.hasher.finalize().as_bytes())
        } else {
            // What the catch-up has not reached (all of it for an actor that started at
            // full size): every byte is durable in the file, hashed once now.
            let (size, shared, mut hashed) = (st.record.size, self.shared.clone(), st.hashed.clone());
            match self.file(st).await {
                Ok(file) => tokio::task::spawn_blocking(move || {
                    Blobs::hash_range(file.as_file(), &mut hashed.hasher, hashed.to, size)?;
                    shared.files.hashed_bytes.fetch_add(size - hashed.to, Ordering::Relaxed);
                    Ok::<_, std::io::Error>(*hashed.hasher.finalize().as_bytes())
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|read| read.map_err(|e| e.to_string())),
                Err(e) => Err(e),
            }
        };
        if hash.is_err() && st.rewound {
            let effects = st.state.rewound();
            self.perform(myself, st, effects, None).await;
            return;
        }
        let result = match hash {
            Ok(hash) if hash == st.record.blake3 => self.publish(st).await,
            Ok(_) => {
                self.remove(st).await;
                Err(ErrorBody::new(ErrorCode::HASH_MISMATCH, "the file does not match its declared BLAKE3"))
            }
            // The bytes could not be read: the upload stays, for the client to try again.
            Err(e) => Err(crate::error::internal(e)),
        };
        let complete = result.is_ok();
        let effects = st.state.finished(result);
        self.perform(myself, st, effects, None).await;
        if complete && thumbnail::is_thumbnailable(&st.record.content_type) {
            tokio::spawn(super::thumbnails::make_thumbnail(self.shared.clone(), st.id, st.record.clone()));
        }
    }

    /// Makes the verified bytes a blob and records the file complete.
    async fn publish(&self, st: &UploadActorState) -> Result<FileRef, ErrorBody> {
        let (shared, id, hash, owner) = (self.shared.clone(), st.id, st.record.blake3, st.record.uploader);
        let done = tokio::task::spawn_blocking(move || {
            // Durably publishing (the record refers to the blob) before the partial file
            // goes: only such an upload is completed by the start-up repair.
            match shared.store.begin_publish(&id).map_err(|e| e.to_string())? {
                Some(durable) => durable.wait_blocking().map_err(|e| e.to_string())?,
                None => return Ok(None),
            }
            shared.files.blobs.publish(&shared.store, &id, &hash, owner)
        })
        .await;
        match done {
            Ok(Ok(Some((record, durable)))) => {
                durable.await.map_err(crate::error::internal)?;
                Ok(FileRef { file: st.id, name: record.name, size: record.size, content_type: record.content_type })
            }
            Ok(Ok(None)) => Err(ErrorBody::new(ErrorCode::NOT_FOUND, "no such upload")),
            Ok(Err(e)) => Err(crate::error::internal(e)),
            Err(e) => Err(crate::error::internal(e)),
        }
    }

    /// Removes the upload's record (giving its quota back) and its partial file.
    /// Whether there was an upload to remove.
    async fn remove(&self, st: &UploadActorState) -> bool {
        let (shared, id) = (self.shared.clone(), st.id);
        let removed = tokio::task::spawn_blocking(move || super::remove_upload(&shared, &id)).await;
        match removed {
            Ok(Ok(removed)) => removed.is_some(),
            Ok(Err(e)) => {
                tracing::error!(file = hex(&st.id), error = %e, "removing an upload failed");
                false
            }
            Err(e) => {
                tracing::error!(file = hex(&st.id), error = %e, "removing an upload failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that found the disk full (`ENOSPC`, 28 on Linux) is told apart, so its
    /// stream says `STORAGE_FULL` (the client stops and says why) rather than
    /// `INTERNAL` (which it retries).
    #[test]
    fn a_full_disk_is_told_apart_from_other_write_errors() {
        assert!(matches!(chunk_error(std::io::Error::from_raw_os_error(28)), ChunkError::DiskFull));
        let other = chunk_error(std::io::Error::from_raw_os_error(5));
        assert!(matches!(other, ChunkError::Failed(ref e) if e.contains("os error 5")), "{other}");
    }

    /// Runs the catch-up of an upload of `size` bytes resumed at `from`, written in
    /// chunks of `len`: how far the hash got by the end of the last chunk, and the most
    /// read back beside one chunk.
    fn catch_up(size: u64, from: u64, len: u64) -> (u64, u64) {
        let (mut to, mut offset, mut most) = (0, from, 0);
        while offset < size {
            let end = (offset + len).min(size);
            let step = catch_up_step(offset - to, size, end, end - offset);
            assert!(to + step <= offset, "reads only below the durable offset");
            assert!(step <= 8 * (end - offset), "at most 8 bytes read back per byte written");
            most = most.max(step);
            to += step;
            if to == offset {
                to = end;
            }
            offset = end;
        }
        (to, most)
    }

    #[test]
    fn a_resumed_hash_catches_up_by_its_last_chunk_reading_at_most_eight_bytes_per_byte_written() {
        let mib = u64::from(MAX_CHUNK_BYTES);
        // Resumed anywhere up to three quarters, in whole, small and odd chunks: nothing
        // is left to hash at verification.
        for eighths in 0..=6 {
            for len in [mib, mib / 4, 64 * 1024 + 7, 4096] {
                let from = 100 * mib * eighths / 8 + 333;
                assert_eq!(catch_up(100 * mib, from, len).0, 100 * mib, "resumed at {from} in chunks of {len}");
            }
        }
        // Far behind, 1 MiB chunks read back only 8 MiB each: what is left is hashed at
        // verification.
        assert_eq!(catch_up(100 * mib, 95 * mib, mib), (40 * mib, 8 * mib));
        // A chunk of one byte reads back at most 8, however far behind.
        assert_eq!(catch_up_step(99 * mib, 100 * mib, 99 * mib + 1, 1), 8);
        // Nothing behind, nothing read.
        assert_eq!(catch_up_step(0, 100 * mib, mib, mib), 0);
    }
}
