//! What the broker does with the bytes a client sends on its control stream: cut into
//! reads of any size (QUIC may deliver them in any pieces), framed under the pre-auth
//! limit for the hello and the auth request, then under the session limit. Nothing may
//! panic, and whatever decodes must re-encode to the same value.

#![no_main]

mod common;

use common::round_trip;
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::limits::{MAX_CLIENT_FRAME_BYTES, PREAUTH_MAX_FRAME_BYTES};
use switchboard_protocol::{ClientFrame, ClientHello, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let mut decoder = FrameDecoder::new(PREAUTH_MAX_FRAME_BYTES);
    let mut frames = 0usize;
    for piece in stream.chunks(usize::from(cut).max(1)) {
        decoder.push(piece);
        loop {
            let body = match decoder.next_frame() {
                Ok(Some(body)) => body,
                Ok(None) => break,
                // The broker closes the connection with the error's code.
                Err(e) => {
                    let _ = e.code();
                    return;
                }
            };
            frames += 1;
            match frames {
                1 => round_trip::<ClientHello>(&body),
                2 => {
                    round_trip::<ClientFrame>(&body);
                    decoder.set_limit(MAX_CLIENT_FRAME_BYTES);
                }
                _ => round_trip::<ClientFrame>(&body),
            }
        }
    }
});
