//! Framing: `varint length | postcard bytes`. The varint is unsigned LEB128 (the same
//! encoding postcard uses for lengths), at most 5 bytes for a `u32`.
//!
//! `FrameDecoder` is an accumulator: feed it whatever the transport delivered, take out
//! complete frames. It checks a declared length against its limit as soon as the
//! length prefix is complete, and allocates only for bytes that arrived, never for a
//! declared length. `ChunkDecoder` cuts an upload stream's `Chunk` frames instead,
//! copying each chunk's data once into an aligned buffer the caller lets it allocate.

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Longest varint prefix for a `u32` length.
pub const MAX_PREFIX_BYTES: usize = 5;

/// Why a byte stream could not be framed or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The declared length exceeds the limit in force.
    #[error("frame of {declared} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Length the prefix declared.
        declared: u64,
        /// Limit in force.
        limit: u32,
    },
    /// The length prefix is not a valid varint.
    #[error("malformed length prefix")]
    BadPrefix,
    /// The body is not a valid postcard encoding of the expected type.
    #[error("malformed frame body: {0}")]
    BadBody(String),
    /// Encoding failed (a value the format cannot represent).
    #[error("encode failed: {0}")]
    Encode(String),
}

impl FrameError {
    /// The stable error code the peer is told when its stream is closed for this.
    pub fn code(&self) -> crate::ErrorCode {
        match self {
            FrameError::TooLarge { .. } => crate::ErrorCode::FRAME_TOO_LARGE,
            _ => crate::ErrorCode::BAD_FRAME,
        }
    }
}

/// Encodes `msg` as one frame: length prefix then postcard body, in one allocation.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    let mut buf = vec![0u8; MAX_PREFIX_BYTES];
    let mut buf = postcard::to_extend(msg, std::mem::take(&mut buf)).map_err(|e| FrameError::Encode(e.to_string()))?;
    let body_len = buf.len() - MAX_PREFIX_BYTES;
    let mut prefix = [0u8; MAX_PREFIX_BYTES];
    let prefix_len = write_varint(body_len as u32, &mut prefix);
    let start = MAX_PREFIX_BYTES - prefix_len;
    buf[start..MAX_PREFIX_BYTES].copy_from_slice(&prefix[..prefix_len]);
    let mut bytes = Bytes::from(buf);
    bytes.advance(start);
    Ok(bytes)
}

/// Encodes `msg` as one frame (`encode_frame`) whose body is at most `limit` bytes, or
/// `TooLarge` (the body's length as `declared`): a sender checks its frames against
/// the peer's announced limit before sending, since the peer closes the stream on a
/// larger one (`FRAME_TOO_LARGE`).
pub fn encode_frame_within<T: Serialize>(msg: &T, limit: u32) -> Result<Bytes, FrameError> {
    let frame = encode_frame(msg)?;
    let (declared, _) = read_varint(&frame)?.ok_or(FrameError::BadPrefix)?;
    if declared > u64::from(limit) {
        return Err(FrameError::TooLarge { declared, limit });
    }
    Ok(frame)
}

/// Decodes one frame body (without its prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::BadBody(e.to_string()))
}

/// Capacity a `FrameDecoder` keeps once every byte it holds was taken as a frame: what
/// the frames of a chatting session need (most are under 1 KiB), not what its largest
/// frame needed.
const KEEP_CAPACITY_BYTES: usize = 8 * 1024;

/// Accumulates stream bytes and yields whole frame bodies.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_bytes: u32,
    /// The buffer's allocation grew past `KEEP_CAPACITY_BYTES` since it was last let go.
    grown: bool,
}

impl FrameDecoder {
    /// A decoder that rejects frames whose body is longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameDecoder { buf: BytesMut::new(), max_frame_bytes, grown: false }
    }

    /// Changes the limit, e.g. from the pre-auth limit to the session limit.
    pub fn set_limit(&mut self, max_frame_bytes: u32) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Bytes allocated for buffering (at least `buffered`).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Appends bytes received from the transport.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        // Seen here, while the buffer still spans its allocation: once frames are split
        // off, `capacity` counts only what follows them, and an empty buffer left at the
        // end of a large allocation reports none of it.
        self.grown |= self.buf.capacity() > KEEP_CAPACITY_BYTES;
    }

    /// Takes the next complete frame body out, `Ok(None)` if more bytes are needed.
    /// After an error the stream is unusable: the caller closes it.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some((declared, prefix_len)) = read_varint(&self.buf)? else {
            return Ok(None);
        };
        if declared > u64::from(self.max_frame_bytes) {
            return Err(FrameError::TooLarge { declared, limit: self.max_frame_bytes });
        }
        let total = prefix_len + declared as usize;
        if self.buf.len() < total {
            // Nothing is reserved for the declared length: the buffer grows only as
            // bytes arrive, so a peer that declares a large frame and stops holds only
            // what it sent.
            return Ok(None);
        }
        let mut frame = self.buf.split_to(total);
        frame.advance(prefix_len);
        if self.buf.is_empty() && self.grown {
            // Let the allocation go with the frame: an empty buffer left pointing into
            // it kept it (and took all of it back at the next push), so one large frame
            // (a 64 KiB `Ping`) held 64-128 KiB for the rest of a session (attacker
            // reviews; the first mend looked at `capacity`, which an exact push leaves
            // at 0).
            self.buf = BytesMut::new();
            self.grown = false;
        }
        Ok(Some(frame.freeze()))
    }

    /// Takes every byte buffered but not returned as a frame (what followed the last
    /// frame, for a decoder of another kind to go on with).
    pub fn take_buffered(&mut self) -> Bytes {
        self.buf.split().freeze()
    }
}

/// Writes `value` as LEB128 into `out`, returning the number of bytes used.
pub fn write_varint(mut value: u32, out: &mut [u8; MAX_PREFIX_BYTES]) -> usize {
    let mut i = 0;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out[i] = byte;
            return i + 1;
        }
        out[i] = byte | 0x80;
        i += 1;
    }
}

/// Reads a LEB128 `u32` prefix: `Ok(None)` if incomplete, `Err` if over 5 bytes or
/// over `u32::MAX`, else the value (widened so an oversized one reports exactly) and
/// the prefix length.
fn read_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_PREFIX_BYTES).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if value > u64::from(u32::MAX) {
                return Err(FrameError::BadPrefix);
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_PREFIX_BYTES {
        return Err(FrameError::BadPrefix);
    }
    Ok(None)
}

/// Longest postcard varint for a `u64` (the chunk's offset and its data's length).
const MAX_U64_VARINT_BYTES: usize = 10;
/// Bytes of a chunk's checksum at the end of its frame.
const CHUNK_CHECKSUM_BYTES: usize = std::mem::size_of::<crate::wire::Crc32>();

/// What `ChunkDecoder::feed` found.
#[derive(Debug, PartialEq, Eq)]
pub enum ChunkStep {
    /// Every byte given was taken: feed more.
    More,
    /// A frame's header is in: `len` data bytes for file offset `offset` follow. Call
    /// `ChunkDecoder::allocate` (after reserving `ChunkDecoder::buffer_bytes(len)` in
    /// whatever budget bounds the caller) before feeding more; until then `feed`
    /// answers this again and takes nothing.
    Header {
        /// The chunk's `offset`.
        offset: u64,
        /// Bytes of its `data`.
        len: usize,
    },
    /// A whole chunk.
    Chunk(crate::wire::Chunk),
}

/// Decodes a stream of `Chunk` frames (an upload stream after its `TransferOpen`),
/// copying each chunk's data once, from the pieces the transport delivered straight into
/// a buffer of its own, allocated only when the caller says so (`ChunkStep::Header`).
/// Within that buffer the data is placed so that every byte whose file offset is a
/// multiple of `align` sits at an address that is a multiple of `align`: a writer can
/// hand the chunk's whole blocks to `O_DIRECT` as they are. Accepts what `FrameDecoder`
/// and `decode::<Chunk>` accept, as the same chunk, except trailing bytes after the
/// checksum (which section 2 of PROTOCOL.md forbids): `BadBody`, as soon as the header
/// shows that the data and checksum do not exactly fill the frame. After an error the
/// stream is unusable.
#[derive(Debug)]
pub struct ChunkDecoder {
    max_frame_bytes: u32,
    align: usize,
    state: ChunkState,
}

#[derive(Debug)]
enum ChunkState {
    /// Header bytes so far (prefix, offset, data length: at most 25).
    Header(Vec<u8>),
    /// The header is in; waiting for `allocate`.
    Sized { offset: u64, len: usize },
    /// Receiving the data into `buf`, whose first `pad` bytes are padding.
    Data { offset: u64, len: usize, pad: usize, buf: Vec<u8> },
    /// Receiving the checksum.
    Checksum { offset: u64, data: Bytes, crc32: Vec<u8> },
}

impl ChunkDecoder {
    /// A decoder for frames of at most `max_frame_bytes` (body), placing data for
    /// `align` (a power of two; 1 for no alignment).
    pub fn new(max_frame_bytes: u32, align: usize) -> Self {
        debug_assert!(align.is_power_of_two(), "align {align} is not a power of two");
        let align = align.max(1).checked_next_power_of_two().unwrap_or(1);
        ChunkDecoder { max_frame_bytes, align, state: ChunkState::Header(Vec::new()) }
    }

    /// Drops the chunk in progress (its buffer too) and waits for a new frame.
    pub fn reset(&mut self) {
        self.state = ChunkState::Header(Vec::new());
    }

    /// Bytes `allocate` takes for a chunk of `len` data bytes (the data and at most
    /// `align` - 1 bytes of padding).
    pub fn buffer_bytes(&self, len: usize) -> usize {
        len + self.align - 1
    }

    /// Takes bytes from the front of `input` (as many as belong to the current frame
    /// and the state allows) and says what they completed.
    pub fn feed(&mut self, input: &mut Bytes) -> Result<ChunkStep, FrameError> {
        loop {
            match &mut self.state {
                ChunkState::Header(header) => {
                    // One byte at a time: the header's length is known only once parsed.
                    let Some(&byte) = input.first() else { return Ok(ChunkStep::More) };
                    input.advance(1);
                    header.push(byte);
                    if let Some((offset, len)) = parse_chunk_header(header, self.max_frame_bytes)? {
                        self.state = ChunkState::Sized { offset, len };
                    }
                }
                ChunkState::Sized { offset, len } => return Ok(ChunkStep::Header { offset: *offset, len: *len }),
                ChunkState::Data { offset, len, pad, buf } => {
                    if !fill(buf, *pad + *len, input) {
                        return Ok(ChunkStep::More);
                    }
                    let (offset, pad) = (*offset, *pad);
                    let data = Bytes::from(std::mem::take(buf)).slice(pad..);
                    self.state = ChunkState::Checksum { offset, data, crc32: Vec::with_capacity(CHUNK_CHECKSUM_BYTES) };
                }
                ChunkState::Checksum { offset, data, crc32: got } => {
                    if !fill(got, CHUNK_CHECKSUM_BYTES, input) {
                        return Ok(ChunkStep::More);
                    }
                    let mut crc32 = [0u8; CHUNK_CHECKSUM_BYTES];
                    crc32.copy_from_slice(got);
                    let chunk = crate::wire::Chunk { offset: *offset, data: std::mem::take(data), crc32 };
                    self.state = ChunkState::Header(Vec::new());
                    return Ok(ChunkStep::Chunk(chunk));
                }
            }
        }
    }

    /// Allocates the buffer for the chunk whose header `feed` reported (nothing if it
    /// did not): `buffer_bytes(len)` bytes.
    pub fn allocate(&mut self) {
        if let ChunkState::Sized { offset, len } = self.state {
            let mut buf: Vec<u8> = Vec::with_capacity(self.buffer_bytes(len));
            // The data's first byte at an aligned file offset goes to an aligned address.
            let align = self.align as u64;
            let head = ((align - offset % align) % align) as usize;
            let pad = buf.as_ptr().wrapping_add(head).align_offset(self.align).min(self.align - 1);
            buf.resize(pad, 0);
            self.state = ChunkState::Data { offset, len, pad, buf };
        }
    }

    /// Bytes held for the chunk in progress: its buffer's capacity (padding included)
    /// while the data arrives, then the data's length, 0 before `allocate`.
    pub fn capacity(&self) -> usize {
        match &self.state {
            ChunkState::Data { buf, .. } => buf.capacity(),
            ChunkState::Checksum { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// Moves bytes from the front of `input` into `buf` until it holds `full`; whether it
/// does (else `input` is empty).
fn fill(buf: &mut Vec<u8>, full: usize, input: &mut Bytes) -> bool {
    let want = full.saturating_sub(buf.len()).min(input.len());
    buf.extend_from_slice(&input.split_to(want));
    buf.len() >= full
}

/// Parses a `Chunk` frame's header (length prefix, offset, data length) from `header`:
/// `Ok(None)` while incomplete; `TooLarge` as soon as the prefix is; `BadBody` when the
/// lengths do not add up to the frame (data and checksum exactly fill what the prefix
/// declared) or a varint is malformed.
fn parse_chunk_header(header: &[u8], max_frame_bytes: u32) -> Result<Option<(u64, usize)>, FrameError> {
    let Some((declared, prefix)) = read_varint(header)? else { return Ok(None) };
    if declared > u64::from(max_frame_bytes) {
        return Err(FrameError::TooLarge { declared, limit: max_frame_bytes });
    }
    // The offset and length varints and the checksum must fit in what the prefix declared.
    let header_body = (header.len() - prefix) as u64;
    if declared < 2 + CHUNK_CHECKSUM_BYTES as u64 || header_body > declared - CHUNK_CHECKSUM_BYTES as u64 {
        return Err(FrameError::BadBody(format!("a chunk frame of {declared} bytes cannot hold its header")));
    }
    let Some((offset, offset_bytes)) = read_u64_varint(&header[prefix..])? else { return Ok(None) };
    let Some((len, len_bytes)) = read_u64_varint(&header[prefix + offset_bytes..])? else { return Ok(None) };
    let fits = (offset_bytes + len_bytes) as u64 + CHUNK_CHECKSUM_BYTES as u64;
    if declared.checked_sub(fits) != Some(len) {
        return Err(FrameError::BadBody(format!("a chunk of {len} bytes does not fill its frame of {declared} bytes")));
    }
    // At most the frame limit: fits a usize.
    Ok(Some((offset, len as usize)))
}

/// A postcard `u64` varint: `Ok(None)` if incomplete, `BadBody` if longer than 10 bytes
/// or over `u64::MAX`.
fn read_u64_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_U64_VARINT_BYTES).enumerate() {
        if i == MAX_U64_VARINT_BYTES - 1 && byte > 1 {
            return Err(FrameError::BadBody("varint over u64".into()));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_U64_VARINT_BYTES {
        return Err(FrameError::BadBody("varint over u64".into()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ClientFrame, Request, RequestBody};
    use proptest::prelude::*;

    fn ping(id: u32) -> ClientFrame {
        ClientFrame::Request(Request { id, body: RequestBody::Ping })
    }

    #[test]
    fn round_trip_through_split_reads() {
        let frames: Vec<Bytes> = (0..50u32).map(|i| encode_frame(&ping(i * 1000)).unwrap()).collect();
        let stream: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        for chunk in [1usize, 2, 3, 7, 64, 4096] {
            let mut dec = FrameDecoder::new(1024);
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                dec.push(piece);
                while let Some(body) = dec.next_frame().unwrap() {
                    got.push(decode::<ClientFrame>(&body).unwrap());
                }
            }
            let want: Vec<ClientFrame> = (0..50u32).map(|i| ping(i * 1000)).collect();
            assert_eq!(got, want, "chunk size {chunk}");
            assert_eq!(dec.buffered(), 0);
        }
    }

    /// A frame whose body is exactly the limit is encoded; one byte more is `TooLarge`
    /// with the body's length, which is what a receiver at that limit would refuse.
    #[test]
    fn encode_frame_within_refuses_what_the_receiver_would() {
        let body_len = |f: &Bytes| {
            let mut dec = FrameDecoder::new(u32::MAX);
            dec.push(f);
            dec.next_frame().unwrap().unwrap().len() as u64
        };
        let frame = encode_frame(&ping(7)).unwrap();
        let len = body_len(&frame);
        let limit = u32::try_from(len).unwrap();
        assert_eq!(encode_frame_within(&ping(7), limit).unwrap(), frame);
        assert_eq!(
            encode_frame_within(&ping(7), limit - 1),
            Err(FrameError::TooLarge { declared: len, limit: limit - 1 })
        );
        let mut at_limit = FrameDecoder::new(limit - 1);
        at_limit.push(&frame);
        assert!(matches!(at_limit.next_frame(), Err(FrameError::TooLarge { .. })), "the receiver refuses it too");
    }

    /// After a large frame is taken and nothing follows it, the decoder holds no large
    /// allocation (before, all of the largest frame's buffer, for good), whether the
    /// frame came in pieces or in one push that it filled exactly.
    #[test]
    fn a_large_frame_taken_leaves_no_large_buffer_behind() {
        let mut prefix = [0u8; MAX_PREFIX_BYTES];
        let n = write_varint(64 * 1024, &mut prefix);
        let whole: Vec<u8> = prefix[..n].iter().copied().chain(std::iter::repeat_n(7u8, 64 * 1024)).collect();
        for pieces in [vec![&whole[..n], &whole[n..]], vec![&whole[..]]] {
            let mut dec = FrameDecoder::new(2 * 1024 * 1024);
            for piece in pieces {
                dec.push(piece);
            }
            drop(dec.next_frame().unwrap().expect("a frame"));
            assert!(!dec.grown, "let go as the frame was taken");
            // A buffer still pointing into the frame's allocation takes it all back here.
            dec.push(&encode_frame(&ping(1)).unwrap());
            assert!(dec.next_frame().unwrap().is_some());
            assert!(dec.capacity() <= KEEP_CAPACITY_BYTES, "{} bytes kept", dec.capacity());
        }
    }

    #[test]
    fn a_declared_length_allocates_nothing_until_its_bytes_arrive() {
        let mut dec = FrameDecoder::new(2 * 1024 * 1024);
        let mut prefix = [0u8; MAX_PREFIX_BYTES];
        let n = write_varint(1024 * 1024, &mut prefix);
        dec.push(&prefix[..n]);
        dec.push(b"abc");
        assert_eq!(dec.next_frame().unwrap(), None);
        assert!(dec.capacity() < 64 * 1024, "{} bytes allocated for 3 received", dec.capacity());
    }

    #[test]
    fn oversized_frame_rejected_from_prefix_alone() {
        let mut dec = FrameDecoder::new(100);
        // Declares 1 GiB; only the prefix has arrived.
        let mut prefix = [0u8; MAX_PREFIX_BYTES];
        let n = write_varint(1 << 30, &mut prefix);
        dec.push(&prefix[..n]);
        assert_eq!(dec.next_frame(), Err(FrameError::TooLarge { declared: 1 << 30, limit: 100 }));
        assert!(dec.buf.capacity() < 1024, "must not allocate for the declared body");
    }

    #[test]
    fn bad_prefixes() {
        let check = |bytes: &[u8], want: Result<Option<(u64, usize)>, FrameError>| {
            assert_eq!(read_varint(bytes), want, "{bytes:?}");
        };
        check(&[], Ok(None));
        check(&[0x80], Ok(None));
        check(&[0x00], Ok(Some((0, 1))));
        check(&[0x7f], Ok(Some((127, 1))));
        check(&[0x80, 0x01], Ok(Some((128, 2))));
        check(&[0xff, 0xff, 0xff, 0xff, 0x0f], Ok(Some((u32::MAX as u64, 5))));
        check(&[0xff, 0xff, 0xff, 0xff, 0x1f], Err(FrameError::BadPrefix));
        check(&[0x80, 0x80, 0x80, 0x80, 0x80], Err(FrameError::BadPrefix));
    }

    /// Receivers accept varints padded with continuation bytes (not the shortest form)
    /// up to their type's longest encoding, in the prefix and inside bodies alike, and
    /// reject longer or wider ones with `BAD_FRAME`. PROTOCOL.md section 2 documents it.
    #[test]
    fn non_minimal_varints() {
        let unhex = |s: &str| -> Vec<u8> { s.split(' ').map(|b| u8::from_str_radix(b, 16).unwrap()).collect() };

        // The length prefix: at most 5 bytes, padding allowed.
        let prefix = |hex: &str, want: Result<Option<(u64, usize)>, FrameError>| {
            assert_eq!(read_varint(&unhex(hex)), want, "prefix {hex}");
        };
        prefix("80 00", Ok(Some((0, 2))));
        prefix("83 80 80 80 00", Ok(Some((3, 5))));
        prefix("83 80 80 80 80 00", Err(FrameError::BadPrefix));
        let mut dec = FrameDecoder::new(64);
        dec.push(&unhex("83 80 00 00 01 03"));
        let body = dec.next_frame().unwrap().expect("a padded prefix still frames the body");
        assert_eq!(decode::<ClientFrame>(&body), Ok(ping(1)));

        // Varints inside a postcard body.
        let check = |hex: &str, want: Result<ClientFrame, crate::ErrorCode>| {
            assert_eq!(decode::<ClientFrame>(&unhex(hex)).map_err(|e| e.code()), want, "body {hex}");
        };
        let bad = Err(crate::ErrorCode::BAD_FRAME);
        let req = |id, body| Ok(ClientFrame::Request(Request { id, body }));
        check("00 01 03", Ok(ping(1)));
        // Enum variant indexes (u32): ClientFrame::Request, RequestBody::Ping.
        check("80 00 01 03", Ok(ping(1)));
        check("00 01 83 80 80 80 00", Ok(ping(1)));
        check("00 01 83 80 80 80 80 00", bad.clone());
        // u32 (the request id): up to 5 bytes, the last at most 0f.
        check("00 81 00 03", Ok(ping(1)));
        check("00 81 80 80 80 00 03", Ok(ping(1)));
        check("00 ff ff ff ff 0f 03", Ok(ping(u32::MAX)));
        check("00 81 80 80 80 80 00 03", bad.clone());
        check("00 80 80 80 80 10 03", bad.clone());
        // u64 (RevokeDevice's device_id): up to 10 bytes, the last at most 01.
        let revoke = |device_id| req(1, RequestBody::RevokeDevice { device_id });
        check("00 01 0f 84 80 80 80 80 80 80 80 80 00", revoke(4));
        check("00 01 0f ff ff ff ff ff ff ff ff ff 01", revoke(u64::MAX));
        check("00 01 0f 84 80 80 80 80 80 80 80 80 80 00", bad.clone());
        check("00 01 0f 80 80 80 80 80 80 80 80 80 02", bad.clone());
        // u16 (History's limit): up to 3 bytes, the last at most 03.
        let history = |limit| req(1, RequestBody::History { conv: 42, page: crate::wire::Page::Latest, limit });
        check("00 01 0d 2a 00 b2 80 00", history(50));
        check("00 01 0d 2a 00 ff ff 03", history(u16::MAX));
        check("00 01 0d 2a 00 b2 80 80 00", bad.clone());
        check("00 01 0d 2a 00 80 80 04", bad.clone());
        // String lengths (usize, so 10 bytes on a 64-bit host).
        let direct = |peer: &str| {
            req(1, RequestBody::CreateConversation(crate::wire::NewConversation::Direct { peer: peer.into() }))
        };
        check("00 01 04 00 83 00 62 6f 62", direct("bob"));
        if cfg!(target_pointer_width = "64") {
            check("00 01 04 00 83 80 80 80 80 80 80 80 80 00 62 6f 62", direct("bob"));
            check("00 01 04 00 83 80 80 80 80 80 80 80 80 80 00 62 6f 62", bad.clone());
        }
        // Not a varint matter, but pinned here too: invalid UTF-8 in a string fails the
        // decode (`BAD_FRAME`, never `INVALID`), valid UTF-8 of the same length does not.
        check("00 01 04 00 02 c3 a9", direct("\u{e9}"));
        check("00 01 04 00 02 c3 28", bad);
    }

    /// Feeds `stream` to a `ChunkDecoder` in pieces of `piece` bytes, allocating at
    /// every header: the chunks, or the first error.
    fn chunks_of(stream: &[u8], piece: usize, align: usize) -> Result<Vec<crate::wire::Chunk>, FrameError> {
        let mut dec = ChunkDecoder::new(crate::limits::MAX_TRANSFER_FRAME_BYTES, align);
        let mut got = Vec::new();
        for part in stream.chunks(piece.max(1)) {
            let mut input = Bytes::copy_from_slice(part);
            loop {
                match dec.feed(&mut input)? {
                    ChunkStep::More => break,
                    ChunkStep::Header { len, .. } => {
                        assert_eq!(dec.capacity(), 0, "nothing allocated before the caller says so");
                        assert_eq!(dec.feed(&mut input)?, ChunkStep::Header { offset: dec_offset(&dec), len });
                        dec.allocate();
                        assert!(dec.capacity() >= len && dec.capacity() <= dec.buffer_bytes(len));
                    }
                    ChunkStep::Chunk(c) => got.push(c),
                }
            }
        }
        Ok(got)
    }

    fn dec_offset(dec: &ChunkDecoder) -> u64 {
        match dec.state {
            ChunkState::Sized { offset, .. } => offset,
            _ => u64::MAX,
        }
    }

    fn chunk(offset: u64, len: usize) -> crate::wire::Chunk {
        let data: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + offset) as u8).collect();
        crate::wire::Chunk { offset, crc32: [len as u8; 4], data: Bytes::from(data) }
    }

    #[test]
    fn chunk_frames_decode_through_split_reads_with_aligned_data() {
        const ALIGN: usize = 4096;
        let chunks: Vec<_> =
            [(0, 1 << 20), (1 << 20, 1), (5, 4095), (4096 * 3, 4096), (100, 70_000), (7, 0), (1 << 40, 9000)]
                .into_iter()
                .map(|(o, l)| chunk(o, l))
                .collect();
        let stream: Vec<u8> = chunks.iter().flat_map(|c| encode_frame(c).unwrap().to_vec()).collect();
        for piece in [1usize, 2, 3, 33, 4096, 65_536, stream.len()] {
            let got = chunks_of(&stream, piece, ALIGN).unwrap();
            assert_eq!(got, chunks, "pieces of {piece}");
            for c in &got {
                // The first byte at an aligned file offset sits at an aligned address.
                let head = ((ALIGN as u64 - c.offset % ALIGN as u64) % ALIGN as u64) as usize;
                if head < c.data.len() {
                    assert_eq!(c.data[head..].as_ptr().align_offset(ALIGN), 0, "offset {}", c.offset);
                }
            }
        }
    }

    #[test]
    fn a_bad_chunk_frame_is_refused_as_soon_as_its_header_shows_it() {
        // Declaring less than its own header and checksum: refused at once.
        assert!(matches!(chunks_of(&[0x05, 0x80], 1, 1), Err(FrameError::BadBody(_))));
        assert!(matches!(chunks_of(&[0x07, 0x80, 0x80, 0x80, 0x80], 1, 1), Err(FrameError::BadBody(_))));
        // Over the limit: refused at the prefix, before any body byte.
        let mut prefix = [0u8; MAX_PREFIX_BYTES];
        let n = write_varint(crate::limits::MAX_TRANSFER_FRAME_BYTES + 1, &mut prefix);
        assert!(matches!(chunks_of(&prefix[..n], 1, 1), Err(FrameError::TooLarge { .. })));
        // A trailing byte after the checksum (PROTOCOL.md section 2 forbids it).
        let mut frame = encode_frame(&chunk(0, 10)).unwrap().to_vec();
        frame[0] += 1;
        frame.push(0);
        assert!(matches!(chunks_of(&frame, 1, 1), Err(FrameError::BadBody(_))));
        // A data length past the frame.
        let mut frame = encode_frame(&chunk(0, 10)).unwrap().to_vec();
        frame[2] = 11;
        assert!(matches!(chunks_of(&frame, 7, 1), Err(FrameError::BadBody(_))));
        // An offset varint over u64.
        let frame = [0x2c, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00];
        assert!(matches!(chunks_of(&frame, 1, 1), Err(FrameError::BadBody(_))));
    }

    #[test]
    fn a_frame_decoder_hands_over_what_follows_its_last_frame() {
        let mut dec = FrameDecoder::new(1024);
        let mut stream = encode_frame(&ping(1)).unwrap().to_vec();
        stream.extend_from_slice(&encode_frame(&chunk(0, 3)).unwrap());
        dec.push(&stream);
        assert!(dec.next_frame().unwrap().is_some());
        let rest = dec.take_buffered();
        assert_eq!(dec.buffered(), 0);
        assert_eq!(chunks_of(&rest, rest.len(), 1).unwrap(), vec![chunk(0, 3)]);
    }

    /// Whatever chunks the chunk decoder takes out of `stream`, the general decoder takes
    /// out as the same chunks.
    fn decoders_agree(stream: &[u8], piece: usize, align: usize) -> Result<(), TestCaseError> {
        let Ok(chunks) = chunks_of(stream, piece, align) else { return Ok(()) };
        let mut dec = FrameDecoder::new(crate::limits::MAX_TRANSFER_FRAME_BYTES);
        dec.push(stream);
        for c in chunks {
            let body = dec.next_frame().unwrap().unwrap();
            prop_assert_eq!(decode::<crate::wire::Chunk>(&body).unwrap(), c);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = FrameDecoder::new(512);
            dec.push(&data);
            while let Ok(Some(body)) = dec.next_frame() {
                let _ = decode::<ClientFrame>(&body);
                let _ = decode::<crate::wire::ServerFrame>(&body);
            }
        }

        /// Valid chunk frames with one byte changed: whatever the chunk decoder accepts,
        /// the general decoder accepts as the same chunk (it only refuses more).
        #[test]
        fn mutated_chunk_frames_decode_alike(
            offset in any::<u64>(), len in 0usize..300, at in any::<usize>(), byte in any::<u8>(), piece in 1usize..40,
        ) {
            let mut frame = encode_frame(&chunk(offset, len)).unwrap().to_vec();
            let i = at % frame.len();
            frame[i] = byte;
            decoders_agree(&frame, piece, 4096)?;
        }

        /// Whatever the chunk decoder accepts, the general decoder accepts as the same
        /// chunk (it only refuses more: trailing bytes).
        #[test]
        fn the_chunk_decoder_agrees_with_the_frame_decoder(data in proptest::collection::vec(any::<u8>(), 0..512), piece in 1usize..64) {
            decoders_agree(&data, piece, 16)?;
        }

        #[test]
        fn varint_round_trip(v in any::<u32>()) {
            let mut out = [0u8; MAX_PREFIX_BYTES];
            let n = write_varint(v, &mut out);
            prop_assert_eq!(read_varint(&out[..n]).unwrap(), Some((u64::from(v), n)));
        }
    }
}
