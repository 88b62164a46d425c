//! What a client does with the bytes the broker sends on its control stream: cut into
//! reads of any size (QUIC may deliver them in any pieces), framed under the server
//! frame limit, the first frame a hello and the rest server frames. Nothing may panic,
//! and whatever decodes must re-encode to the same value.

#![no_main]

mod common;

use common::round_trip;
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::limits::MAX_SERVER_FRAME_BYTES;
use switchboard_protocol::{FrameDecoder, ServerFrame, ServerHello};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let mut decoder = FrameDecoder::new(MAX_SERVER_FRAME_BYTES);
    let mut first = true;
    for piece in stream.chunks(usize::from(cut).max(1)) {
        decoder.push(piece);
        loop {
            let body = match decoder.next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => break,
                // The client closes the connection with the error's code.
                Err(e) => {
                    let _ = e.code();
                    return;
                }
            };
            if std::mem::take(&mut first) {
                round_trip::<ServerHello>(&body);
            } else {
                round_trip::<ServerFrame>(&body);
            }
        }
    }
});
