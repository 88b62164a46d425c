//! What a client does with the bytes the broker sends on its control stream: cut into
//! reads of any size, framed under the server frame limit, the first frame a hello and
//! the rest server frames. Nothing may panic, and whatever decodes must re-encode to the
//! same value.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use switchboard_protocol::limits::MAX_SERVER_FRAME_BYTES;
use switchboard_protocol::{ServerFrame, ServerHello};

fuzz_target!(|data: &[u8]| {
    common::frames(data, MAX_SERVER_FRAME_BYTES, |index, body, _| match index {
        0 => common::round_trip::<ServerHello>(body),
        _ => common::round_trip::<ServerFrame>(body),
    });
});
