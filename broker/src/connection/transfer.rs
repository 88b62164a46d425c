//! Transfer streams (PROTOCOL.md section 12): every client-opened bidirectional stream
//! after the control stream. Its first frame is a `TransferOpen` (within
//! `OPEN_DEADLINE`); an upload stream then carries `Chunk` frames to the upload's actor
//! and its `TransferReply` frames back; a download stream gets a `Range` frame and the
//! bytes. Errors end the stream only, never the connection. Transfer streams send at a
//! lower priority than the control stream. A stream on which nothing moves for
//! `transfer_progress_secs` is reset with `TIMEOUT`; at most `max_live_transfer_streams`
//! are served at once over all connections (one more is reset with `OVERLOADED`, unless
//! a stream served fell behind 64 KiB/s: that one gives its place up, `Files::take_place`), and
//! at most `max_transfer_streams_per_user` of one user's, over all its connections (one
//! more is reset with `RATE_LIMITED`, before it takes a broker-wide place).
//! Broker-wide budgets bound what those streams hold: upload chunks being received or
//! queued within `transfer_buffer_bytes` (a chunk's buffer is counted before it is
//! allocated), blob files open for downloads within `max_open_blob_files`.
//! A stream that finds its budget spent waits, reading nothing, and is reset with
//! `TIMEOUT` only if the wait passes its progress deadline; while it waits, chunks that
//! fell behind `MIN_CHUNK_BYTES_PER_SEC` lose the bytes it needs (`files::budget`: a
//! header alone no longer holds a chunk's bytes for the whole progress deadline).
//!
//! A connection may open them only after a successful `BeginUpload`, `UploadStatus` or
//! `FileInfo` (`Transfers::allow` raises its stream credit); after `IDLE_LOWER` with none
//! open, the credit goes back to the control stream alone. Nothing is allocated for a
//! connection until then.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use switchboard_protocol::limits::{MAX_CHUNK_BYTES, MAX_TRANSFER_FRAME_BYTES};
use switchboard_protocol::{
    Chunk, ChunkDecoder, ChunkStep, ErrorBody, ErrorCode, FileId, FrameDecoder, TransferOpen, TransferReply, UserId,
    decode, encode_frame,
};
use tokio::sync::{Semaphore, mpsc};

use crate::Shared;
use crate::files::blobs::DIRECT_ALIGN;
use crate::files::budget::{ChunkBudget, Place, Revoked, lease_end, small_chunk};
use crate::files::requests::{file_ref, no_such_file, readable};
use crate::files::{ChunkPermits, Unreachable, UploadMsg};
use crate::limits::{MIN_CHUNK_BYTES_PER_SEC, READ_CHUNK_BYTES};

/// Time the first frame of a transfer stream has to arrive.
const OPEN_DEADLINE: Duration = Duration::from_secs(10);
/// Largest `TransferOpen` frame (two ids and two varints).
const OPEN_FRAME_BYTES: u32 = 256;
/// With no transfer stream open this long, the connection's credit is lowered again.
const IDLE_LOWER: Duration = Duration::from_secs(30);
/// Chunks of one stream held at once (being received, or queued for its upload's
/// actor); beyond, the stream stops reading and QUIC flow control slows the sender.
const QUEUED_CHUNKS: usize = 2;
/// Time a client has to take a stream's last reply (`Failed`, or `Complete` on opening a
/// complete upload) before the stream is reset with `TIMEOUT`.
const LAST_REPLY_DEADLINE: Duration = Duration::from_secs(5);
/// Bytes read from a blob per write on a download stream.
const DOWNLOAD_PIECE: usize = 128 * 1024;
/// How often a download checks again that its reader may still read the file (a member
/// removed from, or leaving, every conversation that carries it loses access mid-way).
/// One check (`readable`: up to `ATTACHMENT_SCAN` seeks) a second per download.
const ACCESS_RECHECK: Duration = Duration::from_secs(1);

/// One connection's transfer streams, made at its first successful file request.
pub(crate) struct Transfers {
    open: AtomicUsize,
    raised: AtomicBool,
    /// Streams opened and grants made since the last idle check.
    opened: AtomicUsize,
}

impl Transfers {
    pub(crate) fn new() -> Self {
        Transfers { open: AtomicUsize::new(0), raised: AtomicBool::new(false), opened: AtomicUsize::new(0) }
    }

    /// Lets the peer open up to `max` transfer streams next to its control stream, and
    /// lowers it again after `IDLE_LOWER` with none open.
    pub(crate) fn allow(self: &Arc<Self>, conn: &quinn::Connection, max: u32) {
        if !self.grant() {
            return;
        }
        conn.set_max_concurrent_bi_streams((1 + max).into());
        let (me, conn) = (self.clone(), conn.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = conn.closed() => return,
                    _ = tokio::time::sleep(IDLE_LOWER) => {}
                }
                if !me.idle() {
                    continue;
                }
                conn.set_max_concurrent_bi_streams(1u32.into());
                me.raised.store(false, Ordering::SeqCst);
                // A grant between the check and the lowering found the credit raised
                // and left it to this task: raise it again for that one.
                if me.opened.load(Ordering::SeqCst) > 0 && !me.raised.swap(true, Ordering::SeqCst) {
                    conn.set_max_concurrent_bi_streams((1 + max).into());
                    continue;
                }
                return;
            }
        });
    }

    /// A grant of transfer streams (a successful file request): counted as activity, so
    /// an idle check just after it keeps the credit. Whether the credit must be raised
    /// (it was not already).
    fn grant(&self) -> bool {
        self.opened.fetch_add(1, Ordering::SeqCst);
        !self.raised.swap(true, Ordering::SeqCst)
    }

    /// At an idle check: whether nothing happened since the last one (no grant, no stream
    /// opened) and no stream is open, so the credit goes back to the control stream.
    fn idle(&self) -> bool {
        let opened = self.opened.swap(0, Ordering::SeqCst);
        opened == 0 && self.open.load(Ordering::SeqCst) == 0
    }
}

/// Counts a transfer stream open for its life.
struct OpenStream(Arc<Transfers>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one transfer stream of `user`'s connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    user: UserId,
    revocation: crate::reply::Revocation,
    transfers: Arc<Transfers>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    transfers.open.fetch_add(1, Ordering::AcqRel);
    transfers.opened.fetch_add(1, Ordering::AcqRel);
    let _open = OpenStream(transfers);
    // Per user, before the broker-wide places: one user's many connections cannot hold
    // them all.
    let Some(_user_stream) = shared.files.user_stream(user) else {
        return reset(&mut send, &mut recv, ErrorCode::RATE_LIMITED);
    };
    // Broker-wide: each live stream may hold a frame and queued chunks, or an open blob.
    // With every place taken, one that fell behind 64 KiB/s gives its place up.
    let Some(live) = shared.files.take_place().await else {
        return reset(&mut send, &mut recv, ErrorCode::OVERLOADED);
    };
    let place = live.place.clone();
    let _ = send.set_priority(-1);
    let mut decoder = FrameDecoder::new(OPEN_FRAME_BYTES);
    let first = tokio::select! {
        first = tokio::time::timeout(OPEN_DEADLINE, read::<TransferOpen>(&mut recv, &mut decoder)) => first,
        // A stream yet to say what it wants holds its place like any other: behind (it
        // moved nothing) while every place is taken, it gives it up. Before, it kept it
        // until `OPEN_DEADLINE`, so streams opened and left silent, opened again as each
        // timed out, could hold every place and refuse everyone's transfers.
        () = place.evicted() => return reset(&mut send, &mut recv, ErrorCode::OVERLOADED),
    };
    let open = match first {
        Ok(Ok(Some(open))) => open,
        Ok(Ok(None)) => return,
        Ok(Err(code)) => return reset(&mut send, &mut recv, code),
        Err(_) => return reset(&mut send, &mut recv, ErrorCode::TIMEOUT),
    };
    match open {
        TransferOpen::Upload { file, offset } => {
            // Chunk data lands where the partial file can take its whole blocks directly.
            let reading = Reading {
                decoder: ChunkDecoder::new(MAX_TRANSFER_FRAME_BYTES, DIRECT_ALIGN),
                pending: decoder.take_buffered(),
                held: None,
                reserving: None,
                since: tokio::time::Instant::now(),
                received: 0,
                place,
            };
            upload(&shared, user, &revocation, file, offset, send, recv, reading).await
        }
        TransferOpen::Download { file, offset, length } => {
            let _ = recv.stop(ErrorCode::NO_ERROR.0.into());
            download(&shared, user, file, offset, length, &place, &mut send).await
        }
    }
}

fn reset(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: ErrorCode) {
    let _ = send.reset(code.0.into());
    let _ = recv.stop(code.0.into());
}

/// Reads one frame: `None` at the end of the stream, the code of a frame that does not
/// decode or is too large.
async fn read<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<Option<T>, ErrorCode> {
    loop {
        if let Some(frame) = decoder.next_frame().map_err(|e| e.code())? {
            return decode(&frame).map(Some).map_err(|e| e.code());
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) | Err(_) => return Ok(None),
        }
    }
}

async fn write(send: &mut quinn::SendStream, reply: &TransferReply) -> bool {
    match encode_frame(reply) {
        Ok(frame) => send.write_all(&frame).await.is_ok(),
        Err(_) => false,
    }
}

/// Answers `Failed` and finishes the stream (see `last_reply`).
async fn fail(send: &mut quinn::SendStream, error: ErrorBody, offset: u64) {
    last_reply(send, &TransferReply::Failed { error, offset }).await;
}

/// Writes a stream's last reply and finishes it; a client that does not take it within
/// `LAST_REPLY_DEADLINE` gets the stream reset with `TIMEOUT` instead, so it cannot hold
/// a place among the live transfer streams by reading nothing.
async fn last_reply(send: &mut quinn::SendStream, reply: &TransferReply) {
    match tokio::time::timeout(LAST_REPLY_DEADLINE, write(send, reply)).await {
        Ok(_) => {
            let _ = send.finish();
        }
        Err(_) => {
            let _ = send.reset(ErrorCode::TIMEOUT.0.into());
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn upload(
    shared: &Arc<Shared>,
    user: UserId,
    revocation: &crate::reply::Revocation,
    file: FileId,
    offset: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut reading: Reading,
) {
    let record = match shared.store.file(&file) {
        Ok(Some(r)) if r.uploader == user && r.parent.is_none() => r,
        Ok(_) => return fail(&mut send, no_such_file(), 0).await,
        Err(e) => return fail(&mut send, crate::error::internal(e), 0).await,
    };
    if record.is_complete() {
        return last_reply(&mut send, &TransferReply::Complete(file_ref(&file, &record))).await;
    }
    let stream = shared.files.next_stream();
    let (out, mut replies) = mpsc::unbounded_channel();
    let open = UploadMsg::Open { stream, offset, out, revocation: revocation.clone() };
    if let Err(why) = shared.files.send(shared, &file, open).await {
        return unreachable(&mut send, shared, &file, why).await;
    }
    let permits = Arc::new(Semaphore::new(QUEUED_CHUNKS));
    // Where the stream's next chunk must start to be written: the open's offset, then
    // each chunk handed on's end (the actor takes a stream's chunks in order, from the
    // offset it accepted).
    let mut next_offset = offset;
    // An open at another offset than the durable one just read is most likely refused
    // (unless a stream it takes over from moved the offset there meanwhile): no chunk
    // of it is read before the actor has answered. Before, its first chunk took a turn
    // of the small-chunk pacer on its way to the refusal.
    let mut awaiting_open = offset != record.offset();
    let mut open = true;
    // Whether the stream's last reply (`Complete` or `Failed`) was written.
    let mut ended = false;
    let progress = progress_deadline(shared);
    let mut deadline = tokio::time::Instant::now() + progress;
    let place = reading.place.clone();
    loop {
        tokio::select! {
            // Nothing read from the client and nothing written to it for too long.
            _ = tokio::time::sleep_until(deadline) => {
                reset(&mut send, &mut recv, ErrorCode::TIMEOUT);
                break;
            }
            // Fell behind 64 KiB/s while every place was taken: its place goes to a
            // newcomer; the client resumes from the durable offset later.
            () = place.evicted() => {
                reset(&mut send, &mut recv, ErrorCode::OVERLOADED);
                break;
            }
            reply = replies.recv() => match reply {
                Some(reply) => {
                    ended |= matches!(reply, TransferReply::Complete(_) | TransferReply::Failed { .. });
                    awaiting_open &= !matches!(reply, TransferReply::Accepted { .. });
                    // A client that takes no replies must not keep a chunk's bytes by it;
                    // a stream waiting for the budget keeps its place in line meanwhile,
                    // and bytes granted to it are leased at once (nothing is read while
                    // the reply waits, so a client that is slow to take replies while
                    // others wait for the budget loses the chunk).
                    let wrote = {
                        let write = tokio::time::timeout(progress, write(&mut send, &reply));
                        tokio::pin!(write);
                        loop {
                            let waiting = reading.held.is_none();
                            tokio::select! {
                                biased;
                                wrote = &mut write => break Ok(wrote),
                                revoked = lease_lost(reading.lease(), shared) => break Err(Some(revoked)),
                                () = place.evicted() => break Err(None),
                                granted = granted(&mut reading.reserving), if waiting => {
                                    reading.reserving = None;
                                    if let Some(granted) = granted {
                                        reading.grant(granted);
                                    }
                                }
                            }
                        }
                    };
                    match wrote {
                        Ok(Ok(true)) => deadline = tokio::time::Instant::now() + progress,
                        Ok(Ok(false)) => break,
                        Ok(Err(_)) => {
                            reset(&mut send, &mut recv, ErrorCode::TIMEOUT);
                            break;
                        }
                        Err(Some(revoked)) => {
                            reading.drop_chunk(Some(revoked));
                            reset(&mut send, &mut recv, ErrorCode::CHUNK_TOO_SLOW);
                            break;
                        }
                        // Its place went to a newcomer.
                        Err(None) => {
                            reset(&mut send, &mut recv, ErrorCode::OVERLOADED);
                            break;
                        }
                    }
                }
                // The actor let go of this stream after its last reply.
                None if ended => {
                    let _ = send.finish();
                    let _ = recv.stop(ErrorCode::NO_ERROR.0.into());
                    break;
                }
                // The actor stopped with this stream's `Open` (or its chunks) still in its
                // mailbox, dropped unanswered: a removal (cancelled or expired meanwhile)
                // or its own end after a completion. Answered as a new actor would have
                // been (before, the stream was finished with no last reply at all).
                None => {
                    match shared.store.file(&file) {
                        Ok(Some(r)) if r.is_complete() => {
                            last_reply(&mut send, &TransferReply::Complete(file_ref(&file, &r))).await;
                        }
                        Ok(Some(r)) => {
                            let retry = ErrorBody::new(ErrorCode::INTERNAL, "the upload's actor stopped; resume");
                            fail(&mut send, retry, r.offset()).await;
                        }
                        _ => fail(&mut send, no_such_file(), 0).await,
                    }
                    break;
                }
            },
            // The client stopped reading, or the connection is gone: nobody to answer.
            _ = send.stopped() => break,
            read = next_chunk(&mut reading, &mut recv, shared, &permits), if open && !awaiting_open => match read {
                Read::Chunk(chunk, permit) => {
                    // A small chunk waits its turn for its sync here, where those waiting
                    // are bounded by the streams served and its actor is not held up. The
                    // wait is credited to the stream's place only up to what the chunk's
                    // bytes are worth at the minimum rate (a 64 KiB chunk: a second; a
                    // byte: 15 µs): small chunks queued back to back make the queue, and
                    // with the whole wait credited (before) a few dozen accounts sending
                    // 1-byte chunks held every place. A file's last chunk, one per upload
                    // begun, waits with the clock stopped, as before (a small file's place
                    // has no other bytes to earn its lease with).
                    let len = chunk.data.len() as u64;
                    let end = chunk.offset.saturating_add(len);
                    // A chunk the actor will refuse (empty, past the file, corrupt, at
                    // another offset) goes to it at once, taking no turn: before, each
                    // took one without a sync (one claiming to end its file with the
                    // stream's clock stopped), so streams of such chunks, each ended by
                    // its refusal, held everyone's small chunks back (an attacker review).
                    let matches = chunk_matches(&chunk);
                    let writable = matches && len > 0 && chunk.offset == next_offset && end <= record.size;
                    if writable {
                        next_offset = end;
                    }
                    if writable && small_chunk(len, end, record.size) {
                        let turn = shared.files.small_syncs.wait();
                        let waited: Pin<Box<dyn Future<Output = ()> + Send + '_>> = if end >= record.size {
                            Box::pin(place.waiting_for_broker(turn))
                        } else {
                            let worth = Duration::from_secs_f64(len as f64 / MIN_CHUNK_BYTES_PER_SEC as f64);
                            Box::pin(place.credited_wait(worth, turn))
                        };
                        tokio::select! {
                            () = waited => {}
                            () = place.evicted() => {
                                reset(&mut send, &mut recv, ErrorCode::OVERLOADED);
                                break;
                            }
                        }
                    }
                    deadline = tokio::time::Instant::now() + progress;
                    // The upload's actor writes it only if its device was not cut off by then.
                    let msg = UploadMsg::Chunk { stream, chunk, matches, permit, revocation: revocation.clone() };
                    if let Err(why) = shared.files.send(shared, &file, msg).await {
                        unreachable(&mut send, shared, &file, why).await;
                        break;
                    }
                }
                // The client finished sending: the replies to what it sent still come.
                Read::End => open = false,
                Read::Refused(code) => {
                    reset(&mut send, &mut recv, code);
                    break;
                }
            },
        }
    }
    shared.files.closed(&file, stream);
}

/// The last answer of an upload stream whose actor cannot be reached: `Complete` if the
/// upload was completed meanwhile (as a new stream would be answered), `NOT_FOUND` if it
/// is gone, `INTERNAL` if its actor could not start (a storage or disk failure: the
/// upload is still there, and the client resumes it later rather than start over).
async fn unreachable(send: &mut quinn::SendStream, shared: &Shared, file: &FileId, why: Unreachable) {
    match why {
        Unreachable::NoUpload => match shared.store.file(file) {
            Ok(Some(r)) if r.is_complete() => {
                last_reply(send, &TransferReply::Complete(file_ref(file, &r))).await;
            }
            _ => fail(send, no_such_file(), 0).await,
        },
        Unreachable::Failed(e) => {
            // Resumed from where it is.
            let offset = shared.store.file(file).ok().flatten().map_or(0, |r| r.offset());
            fail(send, crate::error::internal(e), offset).await
        }
    }
}

/// An upload stream's reading side, kept across the `select!` turns that drop
/// `next_chunk` half way: the decoder, bytes read but not yet decoded, and the permits
/// of the chunk being received (taken before its buffer is allocated).
struct Reading {
    decoder: ChunkDecoder,
    pending: Bytes,
    held: Option<ChunkPermits>,
    /// The wait for the next chunk's permits, kept across turns so the stream keeps its
    /// place in line (also polled while a reply is written: see `upload`). `None` from it:
    /// the stream's permits are gone.
    reserving: Option<ChunkWait>,
    /// While `held`: when the chunk's bytes were granted and how many were read since.
    since: tokio::time::Instant,
    received: u64,
    /// The stream's place, counting every byte read.
    place: Arc<Place>,
}

/// A wait for a chunk's permits (`reserve_chunk`).
type ChunkWait = Pin<Box<dyn Future<Output = Option<ChunkPermits>> + Send>>;

/// What `next_chunk` got.
enum Read {
    /// A whole chunk, with the permits its bytes hold.
    Chunk(Chunk, ChunkPermits),
    /// The client finished sending (or the stream is gone).
    End,
    /// A frame that does not decode or is too large, or a chunk that lost its bytes to
    /// a waiting stream (`CHUNK_TOO_SLOW`): the stream is reset with this code.
    Refused(ErrorCode),
}

/// Reads the next chunk. Before a chunk's data is buffered, it takes one of the stream's
/// `permits` (at most `QUEUED_CHUNKS` queued for the actor) and the chunk's bytes in the
/// broker-wide budget, waiting for them and reading nothing meanwhile (QUIC flow control
/// holds the sender back; the caller's progress deadline ends a wait too long): what a
/// stream holds is always counted. While the chunk's data arrives, its lease is checked
/// (`lease_lost`). Cancel-safe: nothing read and no permit is lost when the `select!`
/// drops it half way, and a stream waiting for the budget keeps its place in line
/// (`Reading::reserving`). At the end of the stream a chunk cut short is dropped with its
/// permits.
async fn next_chunk(r: &mut Reading, recv: &mut quinn::RecvStream, shared: &Shared, permits: &Arc<Semaphore>) -> Read {
    loop {
        match r.decoder.feed(&mut r.pending) {
            Err(e) => return Read::Refused(e.code()),
            Ok(ChunkStep::Header { len, .. }) => {
                if r.held.is_none() {
                    let want = r.decoder.buffer_bytes(len);
                    let budget = &shared.files.chunk_budget;
                    let place = r.place.clone();
                    let reserving = r.reserving.get_or_insert_with(|| reserve_chunk(permits.clone(), budget, want));
                    let granted = place.waiting_for_broker(reserving).await;
                    r.reserving = None;
                    let Some(granted) = granted else { return Read::End };
                    r.grant(granted);
                }
                r.decoder.allocate();
            }
            Ok(ChunkStep::Chunk(chunk)) => match r.held.take() {
                Some(permit) => return Read::Chunk(chunk, permit),
                // Every chunk's buffer follows a header, and permits come before it.
                None => return Read::Refused(ErrorCode::INTERNAL),
            },
            Ok(ChunkStep::More) => match read_leased(r.lease(), recv, shared).await {
                Ok(Ok(Some(chunk))) => {
                    r.received += chunk.bytes.len() as u64;
                    r.place.moved(chunk.bytes.len() as u64);
                    r.pending = chunk.bytes;
                }
                // Too slow while another stream waits: the chunk's bytes go to that one.
                Err(revoked) => {
                    r.drop_chunk(Some(revoked));
                    tracing::debug!(received = r.received, "a slow chunk gave its budget to a waiting stream");
                    return Read::Refused(ErrorCode::CHUNK_TOO_SLOW);
                }
                Ok(Ok(None) | Err(_)) => {
                    r.drop_chunk(None);
                    return Read::End;
                }
            },
        }
    }
}

/// Reads the stream's next bytes; `Err` if the chunk being received lost its bytes to a
/// waiting stream first (`lease_lost`). Cancel-safe.
async fn read_leased(
    lease: Option<(tokio::time::Instant, usize)>,
    recv: &mut quinn::RecvStream,
    shared: &Shared,
) -> Result<Result<Option<quinn::Chunk>, quinn::ReadError>, Revoked> {
    tokio::select! {
        biased;
        read = recv.read_chunk(READ_CHUNK_BYTES, true) => Ok(read),
        revoked = lease_lost(lease, shared) => Err(revoked),
    }
}

/// Waits for a chunk's permits: a place among the stream's `QUEUED_CHUNKS`, then `want`
/// bytes of the budget, in line. `None` if the stream's permits are gone.
fn reserve_chunk(stream: Arc<Semaphore>, budget: &Arc<ChunkBudget>, want: usize) -> ChunkWait {
    let bytes = budget.reserve(want);
    Box::pin(async move {
        let stream = stream.acquire_owned().await.ok()?;
        Some(ChunkPermits { stream, bytes: bytes.await })
    })
}

/// Resolves with what a stored wait for a chunk's permits got; never without one.
async fn granted(reserving: &mut Option<ChunkWait>) -> Option<ChunkPermits> {
    match reserving {
        Some(wait) => wait.await,
        None => std::future::pending().await,
    }
}

impl Reading {
    /// The next chunk's permits were granted: it is being received from now, with the
    /// bytes already read counted towards its lease.
    fn grant(&mut self, permits: ChunkPermits) {
        self.held = Some(permits);
        self.since = tokio::time::Instant::now();
        self.received = self.pending.len() as u64;
    }

    /// Lets the chunk being received go with its permits; a `revoked` lease stops
    /// counting its bytes only after they are free.
    fn drop_chunk(&mut self, revoked: Option<Revoked>) {
        self.decoder.reset();
        self.held = None;
        drop(revoked);
    }

    /// The chunk being received: when its lease ends and the bytes it holds.
    fn lease(&self) -> Option<(tokio::time::Instant, usize)> {
        self.held.as_ref().map(|held| (lease_end(self.since, self.received), held.bytes.num_permits()))
    }
}

/// Resolves once the chunk being received (its `Reading::lease`) has lost its bytes to a
/// waiting stream (the stream must then be reset, and the `Revoked` dropped after the
/// chunk's permits); never without a chunk. Cancel-safe.
async fn lease_lost(lease: Option<(tokio::time::Instant, usize)>, shared: &Shared) -> Revoked {
    match lease {
        Some((end, size)) => shared.files.chunk_budget.lease_lost(end, size).await,
        None => std::future::pending().await,
    }
}

/// How long a transfer stream may go with nothing read from or written to its client.
fn progress_deadline(shared: &Shared) -> Duration {
    Duration::from_secs(shared.config.transfer_progress_secs.max(1))
}

/// Whether a chunk's data matches its CRC-32, checked here on the runtime thread: at
/// tens of GB/s a full chunk (1 MiB) takes tens of microseconds, less than handing it to
/// a blocking thread would (docs/benchmarks.md, "A CRC-32 per chunk"). One too large to
/// be stored is not worth checking: it counts as not matching (the actor refuses it as
/// `INVALID`, which it checks first).
fn chunk_matches(chunk: &Chunk) -> bool {
    chunk.data.len() <= MAX_CHUNK_BYTES as usize && chunk.intact()
}

async fn download(
    shared: &Arc<Shared>,
    user: UserId,
    file: FileId,
    offset: u64,
    length: u64,
    place: &Place,
    send: &mut quinn::SendStream,
) {
    // Who may read it: up to `ATTACHMENT_SCAN` seeks, off the runtime threads.
    let s = shared.clone();
    let record = match tokio::task::spawn_blocking(move || readable(&s, user, &file, true)).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return fail(send, no_such_file(), 0).await,
        Ok(Err(e)) => return fail(send, e, 0).await,
        Err(e) => return fail(send, crate::error::internal(e), 0).await,
    };
    // The recheck clock runs from this check: the waits below (the reader taking the
    // `Range`, a blob file) may each last up to the progress deadline, and access lost
    // during them must stop the first piece too (before, the clock started once the blob
    // file was open, so a reader removed in a wait still got a second of the file).
    let mut checked = tokio::time::Instant::now();
    if !record.is_complete() {
        return fail(send, ErrorBody::new(ErrorCode::NOT_READY, "the upload is not complete"), 0).await;
    }
    if offset > record.size {
        return fail(send, ErrorBody::new(ErrorCode::INVALID, "the offset is past the end of the file"), 0).await;
    }
    let rest = record.size - offset;
    let length = if length == 0 { rest } else { length.min(rest) };
    let progress = progress_deadline(shared);
    // The answer goes before a blob file is taken (a reader that takes nothing, not even
    // it, holds none), and an empty range needs none. A blob that went since the check
    // (its last holder let go) is gone like a missing file, while an answer can say so.
    let path = shared.files.blobs.blob(&record.blake3);
    let exists = path.clone();
    if let Ok(false) = tokio::task::spawn_blocking(move || exists.exists()).await {
        return fail(send, no_such_file(), 0).await;
    }
    let range = TransferReply::Range { offset, length, size: record.size };
    // Its place may go to a newcomer (it fell behind 64 KiB/s) in any wait: this one, the
    // blob file's, a piece's (`write_piece`), and between pieces.
    let answered = tokio::select! {
        answered = tokio::time::timeout(progress, write(send, &range)) => answered,
        () = place.evicted() => return evicted(send),
    };
    match answered {
        Ok(true) => {}
        Ok(false) => return,
        Err(_) => {
            let _ = send.reset(ErrorCode::TIMEOUT.0.into());
            return;
        }
    }
    if length == 0 {
        let _ = send.finish();
        return;
    }
    // Held while the stream serves: a place among the blob files open at once.
    let blob_open = place.waiting_for_broker(shared.files.reserve_blob(tokio::time::Instant::now() + progress));
    let blob_open = tokio::select! {
        blob_open = blob_open => blob_open,
        () = place.evicted() => return evicted(send),
    };
    let Some(_blob_open) = blob_open else {
        let _ = send.reset(ErrorCode::TIMEOUT.0.into());
        return;
    };
    let blob = match tokio::task::spawn_blocking(move || std::fs::File::open(path)).await {
        Ok(Ok(f)) => Arc::new(f),
        // Deleted since the check (its last holder let go): its access went with it.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = send.reset(ErrorCode::NOT_FOUND.0.into());
            return;
        }
        _ => {
            let _ = send.reset(ErrorCode::INTERNAL.0.into());
            return;
        }
    };
    let mut at = offset;
    let end = offset + length;
    while at < end {
        if place.is_evicted() {
            return evicted(send);
        }
        if checked.elapsed() >= ACCESS_RECHECK {
            // Access goes with membership (section 12), a long download's too.
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || readable(&s, user, &file, false)).await {
                Ok(Ok(Some(_))) => checked = tokio::time::Instant::now(),
                Ok(Ok(None)) => {
                    let _ = send.reset(ErrorCode::NOT_FOUND.0.into());
                    return;
                }
                _ => {
                    let _ = send.reset(ErrorCode::INTERNAL.0.into());
                    return;
                }
            }
        }
        let len = ((end - at) as usize).min(DOWNLOAD_PIECE);
        let f = blob.clone();
        let piece = tokio::task::spawn_blocking(move || crate::files::blobs::Blobs::read(&f, at, len)).await;
        let bytes = match piece {
            Ok(Ok(b)) => Bytes::from(b),
            // The file was deleted meanwhile (no message carries it any more) and the
            // deleter is cutting its blob: the reader's access went with it.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let _ = send.reset(ErrorCode::NOT_FOUND.0.into());
                return;
            }
            _ => {
                // The range was promised: a short stream tells the client it failed.
                let _ = send.reset(ErrorCode::INTERNAL.0.into());
                return;
            }
        };
        match write_piece(shared, send, bytes, progress, place).await {
            Ok(()) => place.moved(len as u64),
            Err(None) => return,
            Err(Some(code)) => {
                let _ = send.reset(code.0.into());
                return;
            }
        }
        at += len as u64;
    }
    let _ = send.finish();
}

/// A download whose place went to a newcomer: reset with `OVERLOADED` (it resumes later
/// from the bytes it has).
fn evicted(send: &mut quinn::SendStream) {
    let _ = send.reset(ErrorCode::OVERLOADED.0.into());
}

/// How often a download piece's writer looks at its lease while the reader is slow.
const LEASE_CHECK: Duration = Duration::from_millis(100);

/// Writes one piece of a download, as fast as the reader takes it. A reader that takes
/// nothing for `progress` gets `TIMEOUT`. One that leaves the piece untaken longer than
/// its lease (`CHUNK_LEASE_GRACE` plus the piece at `MIN_CHUNK_BYTES_PER_SEC`: 4 s for a
/// whole 128 KiB piece) while another download waits for a blob file gets
/// `CHUNK_TOO_SLOW`, and its blob file goes to the waiting one, one for each waiting
/// (`Files::claim_blob_for_waiter`): slow readers cannot keep every blob file open
/// (before, one piece per `transfer_progress_secs` held one for good). `Err(None)`: the
/// stream is gone.
async fn write_piece(
    shared: &Shared,
    send: &mut quinn::SendStream,
    bytes: Bytes,
    progress: Duration,
    place: &Place,
) -> Result<(), Option<ErrorCode>> {
    let lease = crate::limits::CHUNK_LEASE_GRACE
        + Duration::from_secs_f64(bytes.len() as f64 / crate::limits::MIN_CHUNK_BYTES_PER_SEC as f64);
    let started = tokio::time::Instant::now();
    let write = send.write_chunk(bytes);
    tokio::pin!(write);
    loop {
        match tokio::time::timeout(LEASE_CHECK, &mut write).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => return Err(None),
            Err(_) => {
                let waited = started.elapsed();
                if waited >= progress {
                    return Err(Some(ErrorCode::TIMEOUT));
                }
                if waited >= lease && shared.files.claim_blob_for_waiter() {
                    return Err(Some(ErrorCode::CHUNK_TOO_SLOW));
                }
                // Its place went to a newcomer (`Files::take_place`).
                if place.is_evicted() {
                    return Err(Some(ErrorCode::OVERLOADED));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_just_before_the_idle_check_keeps_the_credit() {
        let t = Transfers::new();
        assert!(t.grant(), "the first grant raises the credit");
        assert!(!t.idle(), "granted since the last check");
        // Quiet for a whole period, then a file request answered just before the check:
        // the credit is already raised, and the client is about to open a stream.
        assert!(!t.grant(), "already raised");
        assert!(!t.idle(), "a grant is activity: the credit stays");
        assert!(t.idle(), "a period with nothing: lowered");
        // A stream open keeps it however long.
        t.open.fetch_add(1, Ordering::SeqCst);
        assert!(!t.idle());
        assert!(!t.idle());
    }
}
