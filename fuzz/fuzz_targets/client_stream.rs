//! What the broker does with the bytes a client sends on its control stream: cut into
//! reads of any size, framed under the pre-auth limit for the hello and the auth
//! request, then under the session limit. Nothing may panic, and whatever decodes must
//! re-encode to the same value.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::limits::{MAX_CLIENT_FRAME_BYTES, PREAUTH_MAX_FRAME_BYTES};
use switchboard_protocol::{ClientFrame, ClientHello};

fuzz_target!(|data: &[u8]| {
    common::frames(data, PREAUTH_MAX_FRAME_BYTES, |index, body, decoder| match index {
        0 => common::round_trip::<ClientHello>(body),
        1 => {
            common::round_trip::<ClientFrame>(body);
            decoder.set_limit(MAX_CLIENT_FRAME_BYTES);
        }
        _ => common::round_trip::<ClientFrame>(body),
    });
});
