//! What the store's integration tests share.

use switchboard_protocol::{Body, Entry};

/// A text message of conversation 1 at `seq`, from user 1's device 1, without a client
/// id.
pub fn text_entry(seq: u64, text: String) -> Entry {
    Entry {
        conv: 1,
        seq,
        sender: 1,
        sender_device: 1,
        client_id: [0; 16],
        at_ms: 0,
        body: Body::Text { text, edited: false },
    }
}
