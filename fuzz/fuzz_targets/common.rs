//! Shared by the fuzz targets.

use switchboard_protocol::{FrameDecoder, decode, encode_frame};

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
