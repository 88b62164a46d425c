//! Files: the calls on the control stream (`BeginUpload`, `UploadStatus`, `FileInfo`, ...),
//! transfer streams (`Client::upload_from`, `Client::download`), and `Uploader`, which
//! carries one upload to completion across dropped connections, stream failures and
//! broker restarts (PROTOCOL.md section 12).
//!
//! The resume rules live in two plain types with no I/O, tested on their own:
//! `ChunkWindow` (how many chunks may be in flight beyond the durable offset) and
//! `UploadPlan` (what to do after each answer or failure).

use std::collections::VecDeque;
use std::io::SeekFrom;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchboard_protocol::limits::MAX_CHUNK_BYTES;
use switchboard_protocol::{
    Blake3, Chunk, ClientMsgId, ConvId, ErrorBody, ErrorCode, FileId, FileInfo, FileRef, FrameDecoder, NewUpload,
    Reply, RequestBody, Seq, TransferOpen, TransferReply, UploadInfo, UploadStatus, Usage, decode, encode_frame,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::session::Backoff;
use crate::{Client, ClientError, Connector, Identity, coded, new_client_id, unexpected};

/// Chunks an upload keeps in flight beyond the last `Durable` (PROTOCOL.md section 12):
/// after a cut the broker has made every whole chunk it received durable, so at most the
/// one chunk that was cut is sent twice.
pub const MAX_CHUNKS_IN_FLIGHT: usize = 2;

/// The smallest chunk an `Uploader` falls back to. The broker takes a chunk's bytes away
/// when it arrives slower than 64 KiB/s (after a 2 s allowance) while other uploads wait
/// for them (the stream is reset with `CHUNK_TOO_SLOW`; PROTOCOL.md section 12), so after
/// that the uploader halves its chunks, down to this size: a 64 KiB chunk gets through a
/// stream of about 21 KiB/s or more (64 KiB in 3 s: the allowance and 1 s at the rate).
pub const MIN_ADAPTIVE_CHUNK_BYTES: u32 = 64 * 1024;

/// Durable answers in a row, without a `CHUNK_TOO_SLOW`, after which an `Uploader`
/// doubles its chunk size again (up to `MAX_CHUNK_BYTES`), on the stream in progress.
pub const CHUNK_GROW_AFTER: u32 = 8;

/// The smallest chunk `Client::upload_chunked` sends (but the last), bytes: one fdatasync
/// per chunk at the broker makes smaller ones cost more than they carry.
const MIN_CHUNK_BYTES: u32 = 4 * 1024;

/// Longest `TransferReply` frame the client accepts, bytes. The largest real one is a
/// `Complete(FileRef)` or a `Failed` with its message, well under 1 KiB.
const MAX_TRANSFER_REPLY_BYTES: u32 = 64 * 1024;

/// While a transfer stream waits for the broker's stream credit, how often the request
/// that grants it is made again.
const CREDIT_RETRY: Duration = Duration::from_secs(5);

/// After a transfer stream's send side fails (the broker stopped reading), how long to
/// wait for the broker's `Failed` reply, which says why, before reporting the stream
/// error itself.
const FAILED_REPLY_WAIT: Duration = Duration::from_secs(2);

/// A transfer stream on which nothing arrives for this long is given up (and, by an
/// `Uploader`, resumed on a new connection): the broker answers every chunk within an
/// fsync, and sends download bytes as fast as flow control lets it.
pub const TRANSFER_STALL: Duration = Duration::from_secs(60);

/// Bytes read from a local file at a time while hashing it.
const HASH_BUFFER_BYTES: usize = 1024 * 1024;

/// Failures of a file transfer. Displays like `ClientError`: `NAME (number): message`
/// for a broker code.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The broker failed the transfer (`TransferReply::Failed`). For an upload,
    /// `offset` is the durable offset to resume from.
    #[error("{}", coded(error.code, &error.message))]
    Failed {
        /// Code and detail.
        error: ErrorBody,
        /// Durable offset (0 for downloads).
        offset: u64,
    },
    /// A request failed or the connection is gone.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The broker reset the transfer stream, or stopped reading it, with this code
    /// (`CHUNK_TOO_SLOW`, `TIMEOUT`, a frame error).
    #[error("transfer stream reset: {}", coded(*.0, "by the broker"))]
    Reset(ErrorCode),
    /// The transfer stream ended before the transfer did, or failed otherwise.
    #[error("transfer stream: {0}")]
    Stream(String),
    /// Reading the local source or writing the local sink failed.
    #[error("local file: {0}")]
    Io(#[from] std::io::Error),
    /// The local file is not the one the upload declared (its size differs), or a
    /// downloaded file does not match its BLAKE3.
    #[error("{0}")]
    Mismatch(String),
}

impl TransferError {
    /// The stable error code, if the failure carries one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            TransferError::Failed { error, .. } => Some(error.code),
            TransferError::Client(e) => e.code(),
            TransferError::Reset(code) => Some(*code),
            _ => None,
        }
    }
}

/// The `Range` a download stream announced: `length` bytes from `offset` of a file of
/// `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownloadRange {
    /// First byte sent.
    pub offset: u64,
    /// Bytes sent (and written to the sink).
    pub length: u64,
    /// Whole file size.
    pub size: u64,
}

impl Client {
    /// Declares an upload (`BeginUpload`): the broker checks its limits and answers with
    /// the new file id, offset 0, the expiry and `chunk_max`. Errors: `INVALID`,
    /// `FILE_TOO_LARGE`, `TOO_MANY_UPLOADS`, `QUOTA_EXCEEDED`, `STORAGE_FULL`.
    pub async fn begin_upload(&self, new: NewUpload) -> crate::Result<UploadStatus> {
        match self.request(RequestBody::BeginUpload(new)).await? {
            Reply::Upload(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    /// Where my upload `file` stands: its durable offset, or `complete`. `NOT_FOUND`
    /// for an upload that is not mine, expired or was cancelled.
    pub async fn upload_status(&self, file: FileId) -> crate::Result<UploadStatus> {
        match self.request(RequestBody::UploadStatus { file }).await? {
            Reply::Upload(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    /// Every upload of mine in progress (begun by any of my devices, not complete,
    /// cancelled or expired), by ascending id: one `ListUploads` request per page of
    /// `MAX_LISTED_UPLOADS`.
    pub async fn list_uploads(&self) -> crate::Result<Vec<UploadInfo>> {
        self.file_pages(
            "ListUploads",
            |after| RequestBody::ListUploads { after },
            |reply| match reply {
                Reply::Uploads { items, more } => Ok((items, more)),
                other => Err(unexpected(other)),
            },
            |u: &UploadInfo| u.file.file,
        )
        .await
    }

    /// Every stored file of mine (complete, counted in my quota, held or not), by
    /// ascending id: one `ListFiles` request per page of `MAX_LISTED_UPLOADS`.
    pub async fn list_files(&self) -> crate::Result<Vec<switchboard_protocol::StoredFile>> {
        self.file_pages(
            "ListFiles",
            |after| RequestBody::ListFiles { after },
            |reply| match reply {
                Reply::Files { items, more } => Ok((items, more)),
                other => Err(unexpected(other)),
            },
            |f: &switchboard_protocol::StoredFile| f.file.file,
        )
        .await
    }

    /// Every item of a list paged by file id (`after` = the last id of the previous page).
    async fn file_pages<T>(
        &self,
        what: &str,
        request: impl Fn(Option<FileId>) -> RequestBody,
        page: impl Fn(Reply) -> crate::Result<(Vec<T>, bool)>,
        id: impl Fn(&T) -> FileId,
    ) -> crate::Result<Vec<T>> {
        let mut all: Vec<T> = Vec::new();
        loop {
            let after = all.last().map(&id);
            let (items, more) = page(self.request(request(after)).await?)?;
            // Ids ascend past `after`; a page that does not is the broker's fault, and
            // must not make this loop forever.
            let ascending = items.windows(2).all(|w| id(&w[0]) < id(&w[1]))
                && items.first().is_some_and(|u| after.is_none_or(|a| id(u) > a));
            let (last_page, empty) = (!more, items.is_empty());
            if !empty && !ascending {
                return Err(ClientError::Protocol(format!("{what}: ids do not ascend")));
            }
            all.extend(items);
            if last_page || empty {
                return Ok(all);
            }
        }
    }

    /// What my files take of my quota and limits.
    pub async fn usage(&self) -> crate::Result<Usage> {
        match self.request(RequestBody::Usage).await? {
            Reply::Usage(usage) => Ok(usage),
            other => Err(unexpected(other)),
        }
    }

    /// Abandons my incomplete upload `file`; its data and quota are released.
    pub async fn cancel_upload(&self, file: FileId) -> crate::Result<()> {
        match self.request(RequestBody::CancelUpload { file }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// A file I may read (`NOT_FOUND` for any other, existing or not).
    pub async fn file_info(&self, file: FileId) -> crate::Result<FileInfo> {
        match self.request(RequestBody::FileInfo { file }).await? {
            Reply::File(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Drops my hold on a complete file I uploaded: messages that carry it keep it
    /// readable, and it counts against my quota until the last of them is deleted.
    pub async fn delete_file(&self, file: FileId) -> crate::Result<()> {
        match self.request(RequestBody::DeleteFile { file }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Takes a complete file I uploaded back from every message carrying it (in
    /// conversations I left too) and deletes it: its readers get `NOT_FOUND`, and my
    /// quota has its bytes back once the broker has freed them.
    pub async fn withdraw_file(&self, file: FileId) -> crate::Result<()> {
        match self.request(RequestBody::WithdrawFile { file }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a message carrying `files` (1..=10, each one I may read, complete or still
    /// uploading) with the caption `text`, under a fresh client id; returns its seq.
    pub async fn send_files(&self, conv: ConvId, text: &str, files: &[FileId]) -> crate::Result<Seq> {
        self.send_files_with_id(conv, new_client_id(), text, files).await.map(|(seq, _)| seq)
    }

    /// `send_files` with a given idempotency key: sending again with the same key
    /// returns the original seq and `true`.
    pub async fn send_files_with_id(
        &self,
        conv: ConvId,
        client_id: ClientMsgId,
        text: &str,
        files: &[FileId],
    ) -> crate::Result<(Seq, bool)> {
        let body = RequestBody::SendFiles { conv, client_id, text: text.to_owned(), files: files.to_vec() };
        self.appended(body).await
    }

    /// Uploads the bytes of `source` from `offset` (the durable offset `UploadStatus`
    /// gave) to its end, on a transfer stream of its own, in chunks of
    /// `MAX_CHUNK_BYTES` (1 MiB) each carrying its CRC-32, with at most
    /// `MAX_CHUNKS_IN_FLIGHT` chunks beyond the last `Durable`. The stream sends at a
    /// lower priority than the control stream. `progress` gets each durable offset.
    ///
    /// Returns the published file once the broker verified the whole-file hash (at once
    /// if the upload was already complete). A broker refusal is `TransferError::Failed`
    /// with the durable offset (`WRONG_OFFSET` and `CHUNK_CORRUPT` can continue from it
    /// on a new stream; `HASH_MISMATCH`, `TYPE_MISMATCH`, `NOT_FOUND` cannot); a lost
    /// connection is `TransferError::Client`. Reads `source` one chunk at a time.
    pub async fn upload_from<S>(
        &self,
        file: FileId,
        offset: u64,
        source: &mut S,
        progress: impl FnMut(u64),
    ) -> Result<FileRef, TransferError>
    where
        S: AsyncRead + AsyncSeek + Unpin,
    {
        self.upload_chunked(file, offset, source, &AtomicU32::new(MAX_CHUNK_BYTES), progress).await
    }

    /// `upload_from` in chunks of `chunk_bytes`, read before each chunk (so `progress`
    /// may change it as the upload goes), clamped to 4 KiB ..= `MAX_CHUNK_BYTES`.
    pub async fn upload_chunked<S>(
        &self,
        file: FileId,
        offset: u64,
        source: &mut S,
        chunk_bytes: &AtomicU32,
        mut progress: impl FnMut(u64),
    ) -> Result<FileRef, TransferError>
    where
        S: AsyncRead + AsyncSeek + Unpin,
    {
        let size = source.seek(SeekFrom::End(0)).await?;
        if offset > size {
            return Err(TransferError::Mismatch(format!("offset {offset} is past the source's {size} bytes")));
        }
        source.seek(SeekFrom::Start(offset)).await?;
        let (mut send, mut recv) = self.open_transfer(RequestBody::UploadStatus { file }).await?;
        let mut decoder = FrameDecoder::new(MAX_TRANSFER_REPLY_BYTES);
        write_frame(&self.conn, &mut send, &TransferOpen::Upload { file, offset }).await?;
        match read_reply(&self.conn, &mut recv, &mut decoder).await? {
            TransferReply::Accepted { offset: accepted } if accepted == offset => {}
            TransferReply::Complete(file) => return Ok(file),
            TransferReply::Failed { error, offset } => return Err(TransferError::Failed { error, offset }),
            other => return Err(protocol(format!("unexpected {other:?} opening an upload"))),
        }
        let (durable_tx, durable_rx) = watch::channel(offset);
        let conn = &self.conn;
        let sender = send_chunks(conn, &mut send, source, offset, size, chunk_bytes, durable_rx);
        let receiver = async {
            loop {
                match read_reply(conn, &mut recv, &mut decoder).await? {
                    TransferReply::Durable { offset } => {
                        durable_tx.send_replace(offset);
                        progress(offset);
                    }
                    TransferReply::Complete(file) => return Ok(file),
                    TransferReply::Failed { error, offset } => return Err(TransferError::Failed { error, offset }),
                    other => return Err(protocol(format!("unexpected {other:?} during an upload"))),
                }
            }
        };
        tokio::pin!(sender, receiver);
        let mut sent = false;
        loop {
            tokio::select! {
                result = &mut receiver => return result,
                result = &mut sender, if !sent => match result {
                    Ok(()) => sent = true,
                    // The broker stops reading when it fails the upload; its reply says why.
                    Err(e) => {
                        return match tokio::time::timeout(FAILED_REPLY_WAIT, &mut receiver).await {
                            Ok(Err(failed @ TransferError::Failed { .. })) => Err(failed),
                            Ok(Ok(file)) => Ok(file),
                            _ => Err(e),
                        };
                    }
                },
            }
        }
    }

    /// Downloads bytes `offset .. offset + length` of `file` (a `length` of 0, or one
    /// reaching past the end, stops at the end of the file) into `sink`, on a transfer
    /// stream of its own at a lower send priority than the control stream. `progress`
    /// gets the bytes written so far. Returns the range the broker announced; fewer
    /// bytes than announced is `TransferError::Stream`. `NOT_FOUND` for a file I may not
    /// read, `NOT_READY` while it uploads, `INVALID` for an offset past its size.
    pub async fn download<W>(
        &self,
        file: FileId,
        offset: u64,
        length: u64,
        sink: &mut W,
        mut progress: impl FnMut(u64),
    ) -> Result<DownloadRange, TransferError>
    where
        W: AsyncWrite + Unpin,
    {
        let (mut send, mut recv) = self.open_transfer(RequestBody::FileInfo { file }).await?;
        write_frame(&self.conn, &mut send, &TransferOpen::Download { file, offset, length }).await?;
        let _ = send.finish();
        // Read the reply frame exactly, without reading into the raw bytes after it.
        let range = match read_exact_frame(&self.conn, &mut recv).await? {
            TransferReply::Range { offset, length, size } => DownloadRange { offset, length, size },
            TransferReply::Failed { error, offset } => return Err(TransferError::Failed { error, offset }),
            other => return Err(protocol(format!("unexpected {other:?} opening a download"))),
        };
        // Exactly the range asked for (to the end of the file at most): a broker that
        // answers another would have the caller write bytes where they do not belong.
        let rest = range.size.saturating_sub(offset);
        let wanted = if length == 0 { rest } else { length.min(rest) };
        if range.offset != offset || range.length != wanted {
            return Err(protocol(format!(
                "asked for {wanted} bytes at {offset}, the broker answered {} at {}",
                range.length, range.offset
            )));
        }
        let mut written = 0u64;
        while written < range.length {
            let want = usize::try_from(range.length - written).unwrap_or(usize::MAX);
            match stalled(recv.read_chunk(want.min(1024 * 1024), true)).await? {
                Ok(Some(chunk)) => {
                    sink.write_all(&chunk.bytes).await?;
                    written += chunk.bytes.len() as u64;
                    progress(written);
                }
                Ok(None) => {
                    return Err(TransferError::Stream(format!(
                        "the download ended after {written} of {} bytes",
                        range.length
                    )));
                }
                Err(e) => return Err(read_failed(&self.conn, e).await),
            }
        }
        sink.flush().await?;
        Ok(range)
    }

    /// Opens a transfer stream. The broker grants transfer streams once this connection
    /// had a successful `credit` request (`UploadStatus` or `FileInfo` of the file); when
    /// no stream credit is there, that request is made first, so a file the caller may
    /// not touch fails with the broker's answer instead of waiting for credit. While
    /// this connection has the broker's `max_transfer_streams` transfers open, it waits
    /// for one of them to end, asking again every `CREDIT_RETRY` (the broker stops
    /// granting streams 30 s after the last one closed; the request grants them again).
    async fn open_transfer(
        &self,
        credit: RequestBody,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransferError> {
        let open = self.conn.open_bi();
        tokio::pin!(open);
        let mut ready = tokio::select! {
            biased;
            opened = &mut open => Some(opened),
            () = std::future::ready(()) => None,
        };
        while ready.is_none() {
            self.request(credit.clone()).await?;
            ready = tokio::time::timeout(CREDIT_RETRY, &mut open).await.ok();
        }
        let opened = ready.expect("the loop ends once the stream is open");
        let (send, recv) = opened.map_err(ClientError::from)?;
        // Chat first: control-stream frames go out before transfer bytes.
        let _ = send.set_priority(-1);
        Ok((send, recv))
    }
}

/// The sending half of an upload stream: chunks from `offset` to `size`, read from
/// `source` with their checksums (the next one while the one before it is written), at
/// most `MAX_CHUNKS_IN_FLIGHT` beyond the durable offset that `durable` reports.
async fn send_chunks<S>(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    source: &mut S,
    offset: u64,
    size: u64,
    chunk_bytes: &AtomicU32,
    mut durable: watch::Receiver<u64>,
) -> Result<(), TransferError>
where
    S: AsyncRead + Unpin,
{
    let mut window = ChunkWindow::new(offset);
    let mut next = offset;
    let chunk_len = || chunk_bytes.load(Ordering::Relaxed).clamp(MIN_CHUNK_BYTES, MAX_CHUNK_BYTES);
    let mut ready = read_chunk(source, next, size, chunk_len()).await?;
    while let Some(chunk) = ready.take() {
        while !window.may_send() {
            if durable.changed().await.is_err() {
                return Ok(());
            }
            window.durable(*durable.borrow_and_update());
        }
        let after = next + chunk.data.len() as u64;
        let mut parts = chunk.frame_parts();
        // The next chunk is read while this one is written.
        let (written, read) =
            tokio::join!(write_parts(conn, send, &mut parts), read_chunk(source, after, size, chunk_len()));
        written?;
        ready = read?;
        next = after;
        window.sent(next);
    }
    Ok(())
}

/// The chunk of `source` at `at` (its reader is there), at most `chunk_bytes`, with its
/// CRC-32 (`Chunk::new`: tens of microseconds per MiB, on this thread); `None` at `size`.
async fn read_chunk<S>(source: &mut S, at: u64, size: u64, chunk_bytes: u32) -> Result<Option<Chunk>, TransferError>
where
    S: AsyncRead + Unpin,
{
    if at >= size {
        return Ok(None);
    }
    let len = (size - at).min(u64::from(chunk_bytes)) as usize;
    let mut data = BytesMut::zeroed(len);
    source.read_exact(&mut data).await?;
    Ok(Some(Chunk::new(at, data.freeze())))
}

/// Size and BLAKE3 of the file at `path`, read in 1 MiB pieces on the blocking pool
/// (never whole into memory), for `NewUpload`.
pub async fn hash_file(path: &Path) -> std::io::Result<(u64, Blake3)> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; HASH_BUFFER_BYTES];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok((size, *hasher.finalize().as_bytes()));
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn write_frame<T: serde::Serialize>(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), TransferError> {
    let frame = encode_frame(msg).map_err(|e| protocol(e.to_string()))?;
    write_parts(conn, send, &mut [frame]).await
}

/// Writes one frame given in pieces (`Chunk::frame_parts`): quinn takes the pieces as
/// they are, so a chunk's data is not copied on its way out.
async fn write_parts(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    parts: &mut [Bytes],
) -> Result<(), TransferError> {
    match send.write_all_chunks(parts).await {
        Ok(()) => Ok(()),
        Err(quinn::WriteError::ConnectionLost(e)) => Err(ClientError::from(e).into()),
        Err(quinn::WriteError::Stopped(code)) => Err(TransferError::Reset(stream_code(code))),
        Err(e) => match conn.close_reason() {
            Some(reason) => Err(ClientError::from(reason).into()),
            None => Err(TransferError::Stream(e.to_string())),
        },
    }
}

/// The next `TransferReply` on an upload stream.
async fn read_reply(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<TransferReply, TransferError> {
    loop {
        if let Some(body) = decoder.next_frame().map_err(|e| protocol(e.to_string()))? {
            return decode(&body).map_err(|e| protocol(e.to_string()));
        }
        match stalled(recv.read_chunk(64 * 1024, true)).await? {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return Err(TransferError::Stream("the broker ended the stream without a reply".into())),
            Err(e) => return Err(read_failed(conn, e).await),
        }
    }
}

/// One frame read byte-exact (prefix, then body), so nothing after it is consumed.
async fn read_exact_frame(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
) -> Result<TransferReply, TransferError> {
    let mut declared = 0u64;
    for i in 0..switchboard_protocol::frame::MAX_PREFIX_BYTES {
        let mut byte = [0u8; 1];
        read_exact(conn, recv, &mut byte).await?;
        declared |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            if declared > u64::from(MAX_TRANSFER_REPLY_BYTES) {
                return Err(protocol(format!("a {declared}-byte transfer reply")));
            }
            let mut body = vec![0u8; declared as usize];
            read_exact(conn, recv, &mut body).await?;
            return decode(&body).map_err(|e| protocol(e.to_string()));
        }
    }
    Err(protocol("a transfer reply's length prefix is too long".into()))
}

async fn read_exact(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    out: &mut [u8],
) -> Result<(), TransferError> {
    match stalled(recv.read_exact(out)).await? {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => {
            Err(TransferError::Stream("the broker ended the stream without a reply".into()))
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(read_failed(conn, e).await),
    }
}

/// A stream's reset or stop code as the broker's `ErrorCode` (PROTOCOL.md section 9; a
/// code past `u16` cannot be one and reads as `INTERNAL`).
fn stream_code(code: quinn::VarInt) -> ErrorCode {
    u16::try_from(code.into_inner()).map_or(ErrorCode::INTERNAL, ErrorCode)
}

async fn read_failed(conn: &quinn::Connection, e: quinn::ReadError) -> TransferError {
    match e {
        quinn::ReadError::Reset(code) => TransferError::Reset(stream_code(code)),
        quinn::ReadError::ConnectionLost(e) => ClientError::from(e).into(),
        other => match conn.close_reason() {
            Some(reason) => ClientError::from(reason).into(),
            None => TransferError::Stream(other.to_string()),
        },
    }
}

/// `read` within `TRANSFER_STALL`, else a stream error.
async fn stalled<T>(read: impl std::future::Future<Output = T>) -> Result<T, TransferError> {
    tokio::time::timeout(TRANSFER_STALL, read)
        .await
        .map_err(|_| TransferError::Stream(format!("nothing arrived for {} s", TRANSFER_STALL.as_secs())))
}

fn protocol(message: String) -> TransferError {
    TransferError::Client(ClientError::Protocol(message))
}

/// The chunks of one upload stream sent beyond the durable offset. A chunk may be sent
/// while fewer than `MAX_CHUNKS_IN_FLIGHT` are; `Durable` retires those it covers.
#[derive(Clone, Debug)]
pub struct ChunkWindow {
    durable: u64,
    /// End offsets of chunks sent and not yet durable, ascending.
    in_flight: VecDeque<u64>,
}

impl ChunkWindow {
    /// A stream accepted at the durable offset `offset`.
    pub fn new(offset: u64) -> ChunkWindow {
        ChunkWindow { durable: offset, in_flight: VecDeque::with_capacity(MAX_CHUNKS_IN_FLIGHT) }
    }

    /// Whether another chunk may go out now.
    pub fn may_send(&self) -> bool {
        self.in_flight.len() < MAX_CHUNKS_IN_FLIGHT
    }

    /// A chunk ending at `end` (exclusive) went out.
    pub fn sent(&mut self, end: u64) {
        self.in_flight.push_back(end);
    }

    /// The broker said every byte below `offset` is durable.
    pub fn durable(&mut self, offset: u64) {
        self.durable = self.durable.max(offset);
        while self.in_flight.front().is_some_and(|&end| end <= self.durable) {
            self.in_flight.pop_front();
        }
    }

    /// Chunks sent and not yet durable.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

/// Knobs of an `Uploader`. `Default` gives the values below.
#[derive(Clone, Debug)]
pub struct UploaderConfig {
    /// First retry delay, ms (100), doubling per failure without progress.
    pub backoff_min_ms: u64,
    /// Longest retry delay, ms (10,000); the delay waited is drawn from its upper half.
    pub backoff_max_ms: u64,
    /// A connect attempt that takes longer fails (and is retried), ms (10,000).
    pub connect_timeout_ms: u64,
    /// `WRONG_OFFSET` or `CHUNK_CORRUPT` answers in a row with no new durable byte after
    /// which the upload stops (8): the stream is refused for a reason resending cannot
    /// fix. Lost connections never stop it (it retries until the caller gives up).
    pub max_refusals: u32,
    /// Size of the first chunks, bytes (`MAX_CHUNK_BYTES`, 1 MiB), clamped to
    /// `MIN_ADAPTIVE_CHUNK_BYTES ..= MAX_CHUNK_BYTES`. A client that knows its link is
    /// slow (under `MIN_ADAPTIVE_CHUNK_BYTES` a second) starts smaller and loses fewer
    /// chunks to `CHUNK_TOO_SLOW` before the size adapts.
    pub chunk_bytes: u32,
}

impl Default for UploaderConfig {
    fn default() -> Self {
        UploaderConfig {
            backoff_min_ms: 100,
            backoff_max_ms: 10_000,
            connect_timeout_ms: 10_000,
            max_refusals: 8,
            chunk_bytes: MAX_CHUNK_BYTES,
        }
    }
}

/// What an `Uploader` reports while it works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UploadEvent {
    /// `UploadStatus` answered: sending resumes at `offset` (durable bytes) of `size`.
    Resumed {
        /// Durable bytes.
        offset: u64,
        /// File size, bytes.
        size: u64,
    },
    /// Every byte below `offset` is durable.
    Durable {
        /// Durable bytes.
        offset: u64,
        /// File size, bytes.
        size: u64,
    },
    /// The transfer was interrupted; the uploader tries again after `retry_in_ms`.
    Retrying {
        /// Why (`NAME (number): message` for a broker code).
        error: String,
        /// The broker's code, if any.
        code: Option<ErrorCode>,
        /// Delay before the next attempt, ms.
        retry_in_ms: u64,
        /// Whether it reconnects (the connection is gone) or opens a new stream on the
        /// same connection.
        reconnect: bool,
    },
}

/// What an upload does next (`UploadPlan`'s decision).
#[derive(Debug, PartialEq, Eq)]
pub enum UploadStep {
    /// Ask `UploadStatus` on the current connection.
    Status,
    /// Wait `delay_ms`, then open an upload stream at `offset` on the current connection.
    Send {
        /// Durable offset to send from.
        offset: u64,
        /// Delay first, ms (0 after an answer that moved the upload on).
        delay_ms: u64,
    },
    /// Wait `delay_ms`, connect again, then ask `UploadStatus`.
    Reconnect {
        /// Delay first, ms.
        delay_ms: u64,
    },
    /// The upload is complete: the broker published the file.
    Complete,
    /// Stop: trying again cannot help (the error says why).
    Stop,
}

/// The resume rules of one upload, with no I/O: fed every answer and failure, it says
/// what to do next.
///
/// - A `UploadStatus` answer resumes at its durable offset (or ends, if complete).
/// - `WRONG_OFFSET` and `CHUNK_CORRUPT` resume on a new stream at the offset the
///   `Failed` reply carries, at once the first time and with backoff when they repeat
///   without progress; after `max_refusals` in a row it stops.
/// - A lost connection, a reset stream, `GOING_AWAY`, `OVERLOADED`, `RATE_LIMITED`,
///   `TIMEOUT` and `SLOW_CONSUMER` reconnect after a backoff, then ask `UploadStatus`:
///   the broker's durable offset, not what this side sent, is where it continues.
/// - `CHUNK_TOO_SLOW` (the broker took a slow chunk's bytes for another upload) also
///   reconnects, and halves the chunks, down to `MIN_ADAPTIVE_CHUNK_BYTES`;
///   `CHUNK_GROW_AFTER` durable answers in a row double them again.
/// - Everything else stops: `HASH_MISMATCH`, `TYPE_MISMATCH`, `FILE_TOO_LARGE`,
///   `QUOTA_EXCEEDED`, `NOT_FOUND` (expired, cancelled, or not mine), `CONFLICT`
///   (another stream took the upload over), `AUTH_FAILED`, `DEVICE_REVOKED`, a local
///   file error, and the like.
///
/// A new durable byte resets the backoff and the refusal count.
#[derive(Clone, Debug)]
pub struct UploadPlan {
    backoff: Backoff,
    durable: u64,
    refusals: u32,
    max_refusals: u32,
    /// Size of the chunks to send (halved after a `CHUNK_TOO_SLOW`, doubled again after
    /// `CHUNK_GROW_AFTER` durable answers).
    chunk_bytes: u32,
    /// Durable answers since the chunk size last changed.
    durable_answers: u32,
}

impl UploadPlan {
    /// A plan with `config`'s backoff and refusal bound.
    pub fn new(config: &UploaderConfig) -> UploadPlan {
        UploadPlan {
            backoff: Backoff::new(config.backoff_min_ms, config.backoff_max_ms),
            durable: 0,
            refusals: 0,
            max_refusals: config.max_refusals,
            chunk_bytes: config.chunk_bytes.clamp(MIN_ADAPTIVE_CHUNK_BYTES, MAX_CHUNK_BYTES),
            durable_answers: 0,
        }
    }

    /// The size of the chunks to send next (`UploaderConfig::chunk_bytes` at first).
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// The highest durable offset seen.
    pub fn durable_offset(&self) -> u64 {
        self.durable
    }

    /// `UploadStatus` answered.
    pub fn status(&mut self, status: &UploadStatus) -> UploadStep {
        if status.complete {
            return UploadStep::Complete;
        }
        self.progress(status.offset);
        self.durable = status.offset;
        UploadStep::Send { offset: status.offset, delay_ms: 0 }
    }

    /// The broker reported `offset` durable.
    pub fn durable(&mut self, offset: u64) {
        self.progress(offset);
        self.durable_answers += 1;
        if self.durable_answers >= CHUNK_GROW_AFTER && self.chunk_bytes < MAX_CHUNK_BYTES {
            self.chunk_bytes = self.chunk_bytes.saturating_mul(2).min(MAX_CHUNK_BYTES);
            self.durable_answers = 0;
        }
    }

    fn progress(&mut self, offset: u64) {
        if offset > self.durable {
            self.durable = offset;
            self.refusals = 0;
            self.backoff.reset();
        }
    }

    /// Something failed; `random` is any uniformly random number (for jitter).
    pub fn failed(&mut self, error: &TransferError, random: u64) -> UploadStep {
        if error.code() == Some(ErrorCode::CHUNK_TOO_SLOW) {
            // Too slow for the chunk size while others waited: smaller chunks next time.
            self.chunk_bytes = (self.chunk_bytes / 2).max(MIN_ADAPTIVE_CHUNK_BYTES);
            self.durable_answers = 0;
        }
        match error {
            TransferError::Failed { error, offset }
                if matches!(error.code, ErrorCode::WRONG_OFFSET | ErrorCode::CHUNK_CORRUPT) =>
            {
                self.progress(*offset);
                self.durable = *offset;
                self.refusals += 1;
                if self.refusals > self.max_refusals {
                    return UploadStep::Stop;
                }
                let delay_ms = if self.refusals == 1 { 0 } else { self.backoff.next_ms(random) };
                UploadStep::Send { offset: *offset, delay_ms }
            }
            error if transient(error) => {
                // An `INTERNAL` (a storage fault the broker restarted from, an upload
                // actor that stopped) may pass with the next connection; one that keeps
                // coming with no new durable byte is counted like a refusal.
                if error.code() == Some(ErrorCode::INTERNAL) {
                    self.refusals += 1;
                    if self.refusals > self.max_refusals {
                        return UploadStep::Stop;
                    }
                }
                UploadStep::Reconnect { delay_ms: self.backoff.next_ms(random) }
            }
            _ => UploadStep::Stop,
        }
    }
}

/// Failures a new connection can get past (a transfer is then resumed, not failed).
/// `INTERNAL` is one: the close every connection gets when the broker stops after a
/// storage fault (it restarts and recovers), and the answer of an upload whose actor
/// stopped or whose completion failed for the broker's sake; the broker says "try
/// again" (before, an upload that could resume stopped there).
pub fn transient(error: &TransferError) -> bool {
    let code = error.code();
    let transient_code = matches!(
        code,
        Some(
            ErrorCode::INTERNAL
                | ErrorCode::GOING_AWAY
                | ErrorCode::OVERLOADED
                | ErrorCode::RATE_LIMITED
                | ErrorCode::TIMEOUT
                | ErrorCode::SLOW_CONSUMER
                | ErrorCode::CHUNK_TOO_SLOW
        )
    );
    match error {
        TransferError::Failed { .. } => transient_code,
        TransferError::Client(ClientError::Server(_)) => transient_code,
        // A closed connection carries the broker's close code: revoked devices stop.
        TransferError::Client(ClientError::Closed { .. }) => {
            code.is_none() || transient_code || code == Some(ErrorCode::NO_ERROR)
        }
        TransferError::Client(ClientError::Connect(_) | ClientError::Refused(_))
        | TransferError::Stream(_)
        | TransferError::Reset(_) => true,
        TransferError::Client(ClientError::Protocol(_) | ClientError::Untrusted(_) | ClientError::TooLarge { .. })
        | TransferError::Io(_)
        | TransferError::Mismatch(_) => false,
    }
}

/// Carries uploads to completion over as many connections as it takes.
///
/// It holds one connection (made on first use) and, for `upload`, reads the local file
/// one chunk at a time from the durable offset. After any interruption it follows
/// `UploadPlan`: it reconnects with exponential backoff and jitter (the session's
/// `Backoff`), asks `UploadStatus` and continues from the broker's durable offset, so
/// at most the one chunk that was cut is sent twice. Permanent failures end it with the
/// error.
///
/// ```no_run
/// # async fn demo(connector: switchboard_client::Connector, identity: switchboard_client::Identity) -> Result<(), Box<dyn std::error::Error>> {
/// use switchboard_client::{Uploader, UploaderConfig, new_upload};
/// let path = std::path::Path::new("cat.png");
/// let mut uploader = Uploader::new(connector, identity, UploaderConfig::default());
/// let status = uploader.begin(new_upload(path, "image/png").await?).await?;
/// let file = uploader.upload(status.file, path, |event| println!("{event:?}")).await?;
/// uploader.client().await?.send_files(42, "look", &[file.file]).await?;
/// # Ok(()) }
/// ```
pub struct Uploader {
    connector: Connector,
    identity: Identity,
    config: UploaderConfig,
    client: Option<Arc<Client>>,
}

impl Uploader {
    /// An uploader that connects as `identity` through `connector` when first used.
    pub fn new(connector: Connector, identity: Identity, config: UploaderConfig) -> Uploader {
        Uploader { connector, identity, config, client: None }
    }

    /// The current connection, connected anew if there is none or it closed. One
    /// attempt, bounded by `connect_timeout_ms`.
    pub async fn client(&mut self) -> crate::Result<Arc<Client>> {
        if let Some(client) = &self.client
            && client.connection().close_reason().is_none()
        {
            return Ok(client.clone());
        }
        self.client = None;
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let client = tokio::time::timeout(timeout, self.connector.connect(&self.identity))
            .await
            .map_err(|_| ClientError::Connect("connect timed out".into()))??;
        let client = Arc::new(client);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Declares a new upload (`Client::begin_upload`) on the current connection. Not
    /// retried: a second `BeginUpload` would start a second upload.
    pub async fn begin(&mut self, new: NewUpload) -> crate::Result<UploadStatus> {
        self.client().await?.begin_upload(new).await
    }

    /// Uploads the file at `path` as the upload `file` (begun earlier, by this process
    /// or another), from wherever the broker's durable offset is, until the broker
    /// publishes it or a permanent failure. `on` hears of progress and retries. The
    /// local file must be the one declared: a different size fails with
    /// `TransferError::Mismatch` (a different content with `HASH_MISMATCH` at the end).
    pub async fn upload(
        &mut self,
        file: FileId,
        path: &Path,
        mut on: impl FnMut(UploadEvent),
    ) -> Result<FileRef, TransferError> {
        let mut source = tokio::fs::File::open(path).await?;
        let local_size = source.metadata().await?.len();
        let mut plan = UploadPlan::new(&self.config);
        let mut step = UploadStep::Status;
        let mut last_error: Option<TransferError> = None;
        loop {
            let result: Result<UploadStep, TransferError> = match step {
                UploadStep::Status => match self.status(file).await {
                    Ok(status) if status.size != local_size => {
                        return Err(TransferError::Mismatch(format!(
                            "{} has {local_size} bytes, the upload {}",
                            path.display(),
                            status.size
                        )));
                    }
                    Ok(status) => {
                        let next = plan.status(&status);
                        if !status.complete {
                            on(UploadEvent::Resumed { offset: status.offset, size: status.size });
                        }
                        Ok(next)
                    }
                    Err(e) => Err(e),
                },
                UploadStep::Send { offset, delay_ms } => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    match self.client().await {
                        Ok(client) => {
                            let chunk_bytes = AtomicU32::new(plan.chunk_bytes());
                            let sent = client
                                .upload_chunked(file, offset, &mut source, &chunk_bytes, |durable| {
                                    plan.durable(durable);
                                    chunk_bytes.store(plan.chunk_bytes(), Ordering::Relaxed);
                                    on(UploadEvent::Durable { offset: durable, size: local_size });
                                })
                                .await;
                            match sent {
                                Ok(done) => return Ok(done),
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e.into()),
                    }
                }
                UploadStep::Reconnect { delay_ms } => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    self.client = None;
                    Ok(UploadStep::Status)
                }
                UploadStep::Complete => {
                    let client = self.client().await?;
                    return Ok(client.file_info(file).await?.file);
                }
                UploadStep::Stop => {
                    return Err(last_error.unwrap_or_else(|| TransferError::Stream("upload stopped".into())));
                }
            };
            step = match result {
                Ok(next) => next,
                Err(error) => {
                    let next = plan.failed(&error, random_u64());
                    match &next {
                        UploadStep::Send { delay_ms, .. } => on(UploadEvent::Retrying {
                            error: error.to_string(),
                            code: error.code(),
                            retry_in_ms: *delay_ms,
                            reconnect: false,
                        }),
                        UploadStep::Reconnect { delay_ms } => on(UploadEvent::Retrying {
                            error: error.to_string(),
                            code: error.code(),
                            retry_in_ms: *delay_ms,
                            reconnect: true,
                        }),
                        _ => {}
                    }
                    last_error = Some(error);
                    next
                }
            };
        }
    }

    async fn status(&mut self, file: FileId) -> Result<UploadStatus, TransferError> {
        Ok(self.client().await?.upload_status(file).await?)
    }
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    crate::random(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// A `NewUpload` for the file at `path`: its file name, size and BLAKE3 (read in
/// pieces, `hash_file`), declared as `content_type`.
pub async fn new_upload(path: &Path, content_type: &str) -> std::io::Result<NewUpload> {
    let (size, blake3) = hash_file(path).await?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"))?;
    Ok(NewUpload { name, size, content_type: content_type.to_owned(), blake3 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(offset: u64, complete: bool) -> UploadStatus {
        UploadStatus {
            file: [1; 16],
            size: 10 * MIB,
            offset,
            content_type: "application/octet-stream".into(),
            complete,
            expires_ms: 0,
            chunk_max: MAX_CHUNK_BYTES,
        }
    }

    const MIB: u64 = 1024 * 1024;

    fn failed(code: ErrorCode, offset: u64) -> TransferError {
        TransferError::Failed { error: ErrorBody { code, message: String::new() }, offset }
    }

    fn closed(code: Option<ErrorCode>) -> TransferError {
        TransferError::Client(ClientError::Closed { code, reason: "gone".into() })
    }

    fn plan() -> UploadPlan {
        UploadPlan::new(&UploaderConfig { backoff_min_ms: 100, backoff_max_ms: 1000, ..UploaderConfig::default() })
    }

    #[test]
    fn the_window_holds_at_most_two_chunks_beyond_the_durable_offset() {
        let mut w = ChunkWindow::new(MIB);
        assert!(w.may_send());
        w.sent(2 * MIB);
        assert!(w.may_send());
        w.sent(3 * MIB);
        assert!(!w.may_send());
        // A durable offset inside the second chunk retires only the first.
        w.durable(2 * MIB + 10);
        assert_eq!(w.in_flight(), 1);
        assert!(w.may_send());
        w.sent(4 * MIB);
        assert!(!w.may_send());
        // An older report changes nothing.
        w.durable(MIB);
        assert_eq!(w.in_flight(), 2);
        // One fsync covering both retires both.
        w.durable(4 * MIB);
        assert_eq!(w.in_flight(), 0);
    }

    /// A cut at any byte of the stream: the broker keeps every whole chunk it received
    /// (PROTOCOL.md section 12), the plan resumes from `UploadStatus`, and the bytes the
    /// broker receives twice are at most one chunk.
    #[test]
    fn after_a_cut_at_most_one_chunk_is_sent_twice() {
        let chunk = 4u64;
        let size = 10 * chunk + 3;
        for cut in 0..size {
            // Client side: what went out (chunk ends) under the window; the broker
            // acknowledges a chunk durable one chunk after receiving it (an fsync in
            // flight), and the stream is cut once `cut` bytes arrived.
            let mut w = ChunkWindow::new(0);
            let mut sent_end = 0;
            let mut received = 0;
            let mut durable = 0;
            while received < cut {
                while w.may_send() && sent_end < size {
                    sent_end = (sent_end + chunk).min(size);
                    w.sent(sent_end);
                }
                assert!(sent_end - durable <= MAX_CHUNKS_IN_FLIGHT as u64 * chunk, "window exceeded");
                received = (received + 1).min(sent_end).min(cut);
                let whole = received / chunk * chunk;
                if whole > durable && received % chunk == 0 {
                    durable = whole;
                    w.durable(durable);
                }
            }
            // The cut: the broker makes every whole chunk it received durable.
            let kept = if received == size { size } else { received / chunk * chunk };
            let mut p = plan();
            let UploadStep::Send { offset, delay_ms: 0 } = p.status(&UploadStatus { size, ..status(kept, false) })
            else {
                panic!("resumes at once");
            };
            assert_eq!(offset, kept);
            let received_twice = received - offset;
            assert!(received_twice < chunk, "cut at {cut}: {received_twice} bytes received twice");
        }
    }

    #[test]
    fn status_resumes_at_the_durable_offset_or_completes() {
        let mut p = plan();
        assert_eq!(p.status(&status(3 * MIB, false)), UploadStep::Send { offset: 3 * MIB, delay_ms: 0 });
        assert_eq!(p.durable_offset(), 3 * MIB);
        assert_eq!(p.status(&status(10 * MIB, true)), UploadStep::Complete);
    }

    #[test]
    fn wrong_offset_and_corrupt_chunks_resume_from_the_reply_offset_then_back_off_then_stop() {
        let mut p = UploadPlan::new(&UploaderConfig {
            backoff_min_ms: 100,
            backoff_max_ms: 1000,
            max_refusals: 3,
            ..UploaderConfig::default()
        });
        p.status(&status(MIB, false));
        // First refusal: at once, from the broker's offset.
        assert_eq!(
            p.failed(&failed(ErrorCode::WRONG_OFFSET, 2 * MIB), 0),
            UploadStep::Send { offset: 2 * MIB, delay_ms: 0 }
        );
        // Repeated without progress: backoff (random 0 gives the lower half's floor).
        assert_eq!(
            p.failed(&failed(ErrorCode::CHUNK_CORRUPT, 2 * MIB), 0),
            UploadStep::Send { offset: 2 * MIB, delay_ms: 50 }
        );
        assert_eq!(
            p.failed(&failed(ErrorCode::CHUNK_CORRUPT, 2 * MIB), 0),
            UploadStep::Send { offset: 2 * MIB, delay_ms: 100 }
        );
        assert_eq!(p.failed(&failed(ErrorCode::CHUNK_CORRUPT, 2 * MIB), 0), UploadStep::Stop);
        // Progress resets the count and the backoff.
        p.durable(3 * MIB);
        assert_eq!(
            p.failed(&failed(ErrorCode::CHUNK_CORRUPT, 3 * MIB), 0),
            UploadStep::Send { offset: 3 * MIB, delay_ms: 0 }
        );
    }

    /// `INTERNAL` (a broker that restarted after a storage fault, an upload actor that
    /// stopped) is resumed over a new connection, up to `max_refusals` times in a row
    /// without a new durable byte (before: the upload stopped at the first).
    #[test]
    fn internal_failures_reconnect_until_they_repeat_without_progress() {
        let mut p = UploadPlan::new(&UploaderConfig { max_refusals: 2, ..UploaderConfig::default() });
        p.status(&status(MIB, false));
        let internal = || failed(ErrorCode::INTERNAL, MIB);
        assert!(matches!(p.failed(&internal(), 0), UploadStep::Reconnect { .. }));
        assert!(matches!(p.failed(&closed(Some(ErrorCode::INTERNAL)), 0), UploadStep::Reconnect { .. }));
        assert_eq!(p.failed(&internal(), 0), UploadStep::Stop);
        // Progress resets the count.
        p.durable(2 * MIB);
        assert!(matches!(p.failed(&internal(), 0), UploadStep::Reconnect { .. }));
    }

    #[test]
    fn lost_connections_reconnect_with_growing_delays_reset_by_progress() {
        let mut p = plan();
        p.status(&status(0, false));
        let delays: Vec<UploadStep> = [
            closed(None),
            TransferError::Stream("reset".into()),
            TransferError::Client(ClientError::Connect("refused".into())),
            closed(Some(ErrorCode::GOING_AWAY)),
            failed(ErrorCode::GOING_AWAY, 0),
            TransferError::Client(ClientError::Server(ErrorBody {
                code: ErrorCode::OVERLOADED,
                message: String::new(),
            })),
        ]
        .iter()
        .map(|e| p.failed(e, 0))
        .collect();
        let expected: Vec<UploadStep> =
            [50, 100, 200, 400, 500, 500].into_iter().map(|delay_ms| UploadStep::Reconnect { delay_ms }).collect();
        assert_eq!(delays, expected);
        p.durable(MIB);
        assert_eq!(p.failed(&closed(None), 0), UploadStep::Reconnect { delay_ms: 50 });
    }

    /// The broker takes a slow chunk's bytes with `CHUNK_TOO_SLOW` when others wait for
    /// them: each one halves the chunks down to 64 KiB (a link too slow for 1 MiB in the
    /// broker's allowance still gets through), durable answers grow them back.
    #[test]
    fn chunk_too_slow_halves_the_chunks_and_durable_answers_grow_them_back() {
        let mut p = plan();
        assert_eq!(p.chunk_bytes(), MAX_CHUNK_BYTES);
        let reset = TransferError::Reset(ErrorCode::CHUNK_TOO_SLOW);
        assert!(matches!(p.failed(&reset, 0), UploadStep::Reconnect { .. }));
        assert_eq!(p.chunk_bytes(), MAX_CHUNK_BYTES / 2);
        for _ in 0..10 {
            p.failed(&reset, 0);
        }
        assert_eq!(p.chunk_bytes(), MIN_ADAPTIVE_CHUNK_BYTES);
        // Another code changes nothing, TIMEOUT included (a stall, not a slow link).
        p.failed(&closed(Some(ErrorCode::GOING_AWAY)), 0);
        p.failed(&TransferError::Reset(ErrorCode::TIMEOUT), 0);
        assert_eq!(p.chunk_bytes(), MIN_ADAPTIVE_CHUNK_BYTES);
        let mut at = 0;
        for _ in 0..CHUNK_GROW_AFTER - 1 {
            at += u64::from(p.chunk_bytes());
            p.durable(at);
        }
        assert_eq!(p.chunk_bytes(), MIN_ADAPTIVE_CHUNK_BYTES, "grew before {CHUNK_GROW_AFTER} durable answers");
        p.durable(at + 1);
        assert_eq!(p.chunk_bytes(), 2 * MIN_ADAPTIVE_CHUNK_BYTES);
        // A TIMEOUT in between starts the count again.
        for _ in 0..CHUNK_GROW_AFTER - 1 {
            at += 1;
            p.durable(at);
        }
        p.failed(&failed(ErrorCode::CHUNK_TOO_SLOW, at), 0);
        assert_eq!(p.chunk_bytes(), MIN_ADAPTIVE_CHUNK_BYTES);
        for _ in 0..100 * CHUNK_GROW_AFTER {
            at += 1;
            p.durable(at);
        }
        assert_eq!(p.chunk_bytes(), MAX_CHUNK_BYTES, "grows back, and no further");
    }

    #[test]
    fn permanent_failures_stop() {
        let check = |error: TransferError| {
            let mut p = plan();
            p.status(&status(0, false));
            assert_eq!(p.failed(&error, 0), UploadStep::Stop, "{error:?}");
        };
        for code in [
            ErrorCode::HASH_MISMATCH,
            ErrorCode::TYPE_MISMATCH,
            ErrorCode::FILE_TOO_LARGE,
            ErrorCode::QUOTA_EXCEEDED,
            // The broker's disk is full: retrying at once would not help; the upload
            // is kept for a later resume.
            ErrorCode::STORAGE_FULL,
            ErrorCode::NOT_FOUND,
            ErrorCode::CONFLICT,
            ErrorCode::INVALID,
        ] {
            check(failed(code, 0));
            check(TransferError::Client(ClientError::Server(ErrorBody { code, message: String::new() })));
        }
        check(closed(Some(ErrorCode::DEVICE_REVOKED)));
        check(closed(Some(ErrorCode::AUTH_FAILED)));
        check(TransferError::Client(ClientError::Server(ErrorBody {
            code: ErrorCode::AUTH_FAILED,
            message: String::new(),
        })));
        check(TransferError::Io(std::io::Error::other("disk")));
        check(TransferError::Mismatch("size".into()));
        check(TransferError::Client(ClientError::Protocol("garbage".into())));
    }

    #[tokio::test]
    async fn hash_file_streams_the_whole_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f.bin");
        let data: Vec<u8> = (0..(HASH_BUFFER_BYTES * 2 + 77)).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let (size, hash) = hash_file(&path).await.expect("hash");
        assert_eq!(size, data.len() as u64);
        assert_eq!(hash, *blake3::hash(&data).as_bytes());
        let new = new_upload(&path, "text/plain").await.expect("describe");
        assert_eq!((new.name.as_str(), new.size, new.blake3), ("f.bin", size, hash));
    }
}
