//! Files: resumable uploads and range downloads on transfer streams of their own, and the
//! file references a message carries.
//!
//! The control stream starts and inspects an upload (`BeginUpload`, `UploadStatus`,
//! `FileInfo`); bytes never travel on it. Each transfer gets its own client-opened
//! bidirectional stream whose first frame is a `TransferOpen`; an upload stream then
//! carries `Chunk` frames, and the broker answers on the same stream with
//! `TransferReply` frames. A download stream carries one `TransferReply::Range` frame and
//! then exactly `length` raw bytes. See docs/PROTOCOL.md section 12.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ConvId, UserId};
use crate::ErrorBody;

/// Identifies a file and, while it is being uploaded, its upload: 16 random bytes chosen
/// by the broker at `BeginUpload`, never reused. Knowing an id grants nothing: every read
/// is checked against who may see the file.
pub type FileId = [u8; 16];

/// A BLAKE3 hash (32 bytes) of a whole file.
pub type Blake3 = [u8; 32];

/// What `BeginUpload` declares about the file to come.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewUpload {
    /// File name as the user sees it, 1..=`MAX_FILE_NAME_BYTES` bytes, no `/`, `\` or
    /// control characters.
    pub name: String,
    /// Exact size in bytes, 1..= the broker's `max_file_bytes` (100 MiB by default).
    pub size: u64,
    /// Declared media type (`type/subtype`, at most `MAX_CONTENT_TYPE_BYTES`). The broker
    /// checks it against the file's first bytes (PROTOCOL.md section 12).
    pub content_type: String,
    /// BLAKE3 of the whole file; completion verifies it.
    pub blake3: Blake3,
}

/// Where an upload stands (answer to `BeginUpload` and `UploadStatus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadStatus {
    /// The file's id (also the upload's).
    pub file: FileId,
    /// Declared size, bytes.
    pub size: u64,
    /// Every byte below this is durable (fsynced): resume sending from here.
    pub offset: u64,
    /// The media type the file will be published with (relabelled when the first bytes
    /// showed another type).
    pub content_type: String,
    /// All bytes are in and the whole-file hash matched: the file is published.
    pub complete: bool,
    /// An incomplete upload and its data are removed at this time, ms since the Unix
    /// epoch (0 once complete).
    pub expires_ms: u64,
    /// Largest `Chunk::data` the broker accepts, bytes.
    pub chunk_max: u32,
}

/// What my files take of my limits (answer to `Usage`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes my quota counts: the declared size of my uploads in progress, and the size
    /// of my complete files not deleted yet (held by me, or dropped but still carried
    /// by a message).
    pub stored_bytes: u64,
    /// My quota, bytes (`BeginUpload` beyond it: `QUOTA_EXCEEDED`).
    pub quota_bytes: u64,
    /// My uploads in progress.
    pub uploads_in_progress: u32,
    /// Uploads I may have in progress at once (`TOO_MANY_UPLOADS` beyond).
    pub max_uploads_in_progress: u32,
    /// Largest file, bytes (`FILE_TOO_LARGE` beyond).
    pub max_file_bytes: u64,
}

/// One of my stored files, as `ListFiles` lists it: complete, counted in my quota.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    /// The file: id, name, size, media type.
    pub file: FileRef,
    /// BLAKE3 of its bytes.
    pub blake3: Blake3,
    /// Upload start, ms since the Unix epoch.
    pub created_ms: u64,
    /// I hold it (`false` once I deleted it: it stays, and counts, while a message that
    /// is not deleted carries it).
    pub held: bool,
}

/// One of my uploads in progress, as `ListUploads` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadInfo {
    /// The upload's file: id, name, declared size, and the media type it will be
    /// published with.
    pub file: FileRef,
    /// Declared BLAKE3 of the whole file (a client matches it against its local files).
    pub blake3: Blake3,
    /// Every byte below this is durable: resume sending from here (equal to the size
    /// while the broker verifies a complete upload).
    pub offset: u64,
    /// Upload start, ms since the Unix epoch.
    pub created_ms: u64,
    /// The upload and its data are removed at this time unless it completes, ms since
    /// the Unix epoch.
    pub expires_ms: u64,
}

/// A file as a message carries it and `FileInfo` describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Id.
    pub file: FileId,
    /// Name given at `BeginUpload`.
    pub name: String,
    /// Size, bytes.
    pub size: u64,
    /// Media type, as published (possibly relabelled).
    pub content_type: String,
}

/// Where a file stands, as shown to those who may read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileState {
    /// Being uploaded: bytes below `offset` are durable.
    Uploading {
        /// Durable bytes.
        offset: u64,
    },
    /// Complete and verified; readable with `TransferOpen::Download`.
    Complete {
        /// A PNG thumbnail at most 256 px on its long side, once made (images only).
        thumbnail: Option<FileRef>,
    },
    /// The upload failed, or the file is gone; it will never be readable (again).
    Failed {
        /// Why: `HASH_MISMATCH`, `TYPE_MISMATCH`, or `NOT_FOUND` for an upload cancelled
        /// or expired and for a complete file its uploader withdrew (`WithdrawFile`).
        code: crate::ErrorCode,
    },
}

/// One file's description (answer to `FileInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The file.
    pub file: FileRef,
    /// Declared whole-file BLAKE3 (verified once complete).
    pub blake3: Blake3,
    /// Who uploaded it.
    pub uploader: UserId,
    /// Upload start, ms since the Unix epoch.
    pub created_ms: u64,
    /// Progress or result.
    pub state: FileState,
}

/// Pushed as `Event::File`: an upload moved. Sent to the uploader's devices
/// (`conv: None`) and, once the file is attached to a message, to the members of that
/// conversation (`conv: Some`), at most `FILE_PROGRESS_PER_SECOND` times a second per
/// upload and audience, the latest state winning; the final state is always sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileProgress {
    /// The conversation it is attached to, or `None` for the uploader's own devices.
    pub conv: Option<ConvId>,
    /// File.
    pub file: FileId,
    /// Declared size, bytes.
    pub size: u64,
    /// Progress or result.
    pub state: FileState,
}

/// The first frame on a transfer stream (client to broker).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferOpen {
    /// Upload bytes of `file` starting at `offset`, which must be the durable offset.
    /// `Chunk` frames follow.
    Upload {
        /// The upload.
        file: FileId,
        /// Where the first chunk starts.
        offset: u64,
    },
    /// Send bytes `offset .. offset + length` of a complete file (`length` is cut at the
    /// end of the file; 0 reads to the end).
    Download {
        /// The file.
        file: FileId,
        /// First byte.
        offset: u64,
        /// Bytes wanted (0: to the end).
        length: u64,
    },
}

/// Bytes of an upload (client to broker on an upload stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Position of `data[0]` in the file: the end of the previous chunk on this stream.
    pub offset: u64,
    /// 1..=`chunk_max` bytes.
    pub data: Bytes,
    /// CRC-32 of `data` (`Chunk::checksum`); a chunk that does not match is refused and
    /// not stored.
    pub crc32: Crc32,
}

/// A chunk's checksum: the CRC-32 of its data as 4 bytes, least significant first.
pub type Crc32 = [u8; 4];

impl Chunk {
    /// A chunk of `data` at `offset`, with its checksum.
    pub fn new(offset: u64, data: Bytes) -> Chunk {
        let crc32 = Chunk::checksum(&data);
        Chunk { offset, data, crc32 }
    }

    /// The checksum of `data`: CRC-32 as in zlib, gzip and PNG (CRC-32/ISO-HDLC:
    /// polynomial 0x04C11DB7 reflected, initial value and final XOR 0xFFFFFFFF), little
    /// endian. It catches data damaged between the client's read and the broker's write
    /// at about a quarter of BLAKE3's cost per byte (31 against 8 GB/s out of cache,
    /// docs/benchmarks.md, "A CRC-32 per chunk"); the whole-file BLAKE3 that `Complete`
    /// checks is what names and verifies the file.
    pub fn checksum(data: &[u8]) -> Crc32 {
        crc32fast::hash(data).to_le_bytes()
    }

    /// Whether `data` matches `crc32`.
    pub fn intact(&self) -> bool {
        Chunk::checksum(&self.data) == self.crc32
    }

    /// This chunk as one whole frame (length prefix included) in three pieces that
    /// concatenate to exactly `encode_frame(self)`: the prefix with the offset and the
    /// data's length, the data itself (shared, not copied), and the checksum. A sender
    /// writes them with `quinn::SendStream::write_all_chunks` without copying the data.
    pub fn frame_parts(&self) -> [Bytes; 3] {
        let mut varints = [0u8; 2 * 10];
        let mut used = postcard::to_slice(&self.offset, &mut varints[..10]).map_or(0, |s| s.len());
        let len_bytes = postcard::to_slice(&(self.data.len() as u64), &mut varints[used..]).map_or(0, |s| s.len());
        used += len_bytes;
        let body_len = used + self.data.len() + self.crc32.len();
        let mut prefix = [0u8; crate::frame::MAX_PREFIX_BYTES];
        let prefix_len = crate::frame::write_varint(u32::try_from(body_len).unwrap_or(u32::MAX), &mut prefix);
        let mut head = Vec::with_capacity(prefix_len + used);
        head.extend_from_slice(&prefix[..prefix_len]);
        head.extend_from_slice(&varints[..used]);
        [Bytes::from(head), self.data.clone(), Bytes::copy_from_slice(&self.crc32)]
    }
}

/// Broker to client on a transfer stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferReply {
    /// The upload stream is accepted at `offset`: send chunks from there.
    Accepted {
        /// Durable offset.
        offset: u64,
    },
    /// Every byte below `offset` is durable (fsynced).
    Durable {
        /// Durable offset.
        offset: u64,
    },
    /// All bytes are in, the size and whole-file hash matched, the file is published.
    /// The broker finishes the stream after it.
    Complete(FileRef),
    /// A download follows: exactly `length` raw bytes (`offset .. offset + length` of a
    /// file of `size` bytes), then the broker finishes the stream.
    Range {
        /// First byte sent.
        offset: u64,
        /// Bytes that follow this frame.
        length: u64,
        /// Whole file size.
        size: u64,
    },
    /// The transfer failed; the broker finishes the stream after it. For an upload,
    /// `offset` is the durable offset to resume from (a `WRONG_OFFSET` or
    /// `CHUNK_CORRUPT` upload can continue from it on a new stream).
    Failed {
        /// Stable code and detail.
        error: ErrorBody,
        /// Durable offset (0 for downloads).
        offset: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_checksum_is_the_crc_32_of_zlib_least_significant_byte_first() {
        // The catalogued check value of CRC-32/ISO-HDLC, as PROTOCOL.md section 12 says.
        assert_eq!(Chunk::checksum(b"123456789"), 0xCBF4_3926u32.to_le_bytes());
        let chunk = Chunk::new(7, Bytes::from_static(b"123456789"));
        assert!(chunk.intact());
        let mut damaged = chunk.data.to_vec();
        damaged[4] ^= 0x01;
        assert!(!Chunk { data: Bytes::from(damaged), ..chunk }.intact(), "one flipped bit is caught");
    }

    #[test]
    fn frame_parts_concatenate_to_the_encoded_frame() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20] {
            for offset in [0u64, 127, 128, 1 << 40, u64::MAX] {
                let chunk = Chunk { offset, data: Bytes::from(vec![5u8; len]), crc32: [1; 4] };
                let parts = chunk.frame_parts();
                let joined: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
                let frame = crate::encode_frame(&chunk).unwrap_or_default();
                assert_eq!(joined, frame.to_vec(), "len {len} offset {offset}");
                assert_eq!(parts[1].as_ptr(), chunk.data.as_ptr(), "the data is shared, not copied");
            }
        }
    }
}
