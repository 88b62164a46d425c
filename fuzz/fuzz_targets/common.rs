//! Shared by the fuzz targets.

use switchboard_protocol::{FrameDecoder, decode, encode_frame};

/// Reads `data` as a control stream: its first byte is the size of each read (QUIC may
/// deliver a stream in any pieces), the rest the stream, framed under `limit`. Calls
/// `frame` with each whole frame's index and body, and the decoder (to change the
/// limit as a session does); stops at the first framing error, where a peer closes.
pub fn frames(data: &[u8], limit: u32, mut frame: impl FnMut(usize, &[u8], &mut FrameDecoder)) {
    let Some((&cut, stream)) = data.split_first() else { return };
    let mut decoder = FrameDecoder::new(limit);
    let mut index = 0;
    for piece in stream.chunks(usize::from(cut).max(1)) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(body)) => {
                    frame(index, &body, &mut decoder);
                    index += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.code();
                    return;
                }
            }
        }
    }
}

/// Decodes `body` as a `T`; if that works, the value must encode and decode back to
/// itself.
pub fn round_trip<T>(body: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(value) = decode::<T>(body) else { return };
    let frame = encode_frame(&value).expect("a decoded value encodes");
    let mut again = FrameDecoder::new(u32::MAX);
    again.push(&frame);
    let body = again.next_frame().expect("our own frame").expect("a whole frame");
    assert_eq!(decode::<T>(&body).expect("our own encoding decodes"), value);
}
