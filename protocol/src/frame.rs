//! Framing: `varint length | postcard bytes`. The varint is unsigned LEB128 (the same
//! encoding postcard uses for lengths), at most 5 bytes for a `u32`.
//!
//! `FrameDecoder` is an accumulator: feed it whatever the transport delivered, take out
//! complete frames. It checks a declared length against its limit as soon as the
//! length prefix is complete, and allocates only for bytes that arrived, never for a
//! declared length.

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

/// Decodes one frame body (without its prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::BadBody(e.to_string()))
}

/// Accumulates stream bytes and yields whole frame bodies.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max_frame_bytes: u32,
}

impl FrameDecoder {
    /// A decoder that rejects frames whose body is longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameDecoder { buf: BytesMut::new(), max_frame_bytes }
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
        Ok(Some(frame.freeze()))
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

        #[test]
        fn varint_round_trip(v in any::<u32>()) {
            let mut out = [0u8; MAX_PREFIX_BYTES];
            let n = write_varint(v, &mut out);
            prop_assert_eq!(read_varint(&out[..n]).unwrap(), Some((u64::from(v), n)));
        }
    }
}
