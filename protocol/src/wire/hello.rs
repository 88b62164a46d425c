//! The handshake: the first frame each way on the control stream.

use serde::{Deserialize, Serialize};

/// First frame on the control stream, client to broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// Always `MAGIC`.
    pub magic: [u8; 4],
    /// Protocol version the client speaks.
    pub version: u16,
    /// Free-form client name and version, for logs: at most `MAX_NAME_BYTES`, a longer
    /// one closes the connection with `INVALID`.
    pub agent: String,
}

/// First frame on the control stream, broker to client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// Protocol version the broker will speak on this connection: the client hello's.
    pub version: u16,
    /// Version 4: a fresh random nonce the device signs (see `auth_transcript`).
    /// Version 5: all zeros, not signed (see `auth_transcript_v5`).
    pub nonce: [u8; 32],
    /// Bounds this broker enforces.
    pub limits: Limits,
    /// Broker wall clock, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
}

/// Bounds announced in the handshake; a client that stays inside them is never cut off
/// for size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest client frame body once authenticated.
    pub max_client_frame_bytes: u32,
    /// Largest broker frame body.
    pub max_server_frame_bytes: u32,
    /// Largest client frame body before authentication.
    pub preauth_max_frame_bytes: u32,
    /// Largest message text.
    pub max_text_bytes: u32,
    /// Outstanding requests per connection before the broker stops reading.
    pub max_inflight_requests: u32,
    /// Most entries in a history page.
    pub history_page_max: u32,
    /// Most members in a group.
    pub max_group_members: u32,
    /// Time from the end of the QUIC handshake until the auth request has been read.
    pub auth_deadline_ms: u32,
}

impl Limits {
    /// The limits of this protocol version (`crate::limits`), as a broker announces them.
    pub fn current() -> Limits {
        use crate::limits::*;
        Limits {
            max_client_frame_bytes: MAX_CLIENT_FRAME_BYTES,
            max_server_frame_bytes: MAX_SERVER_FRAME_BYTES,
            preauth_max_frame_bytes: PREAUTH_MAX_FRAME_BYTES,
            max_text_bytes: MAX_TEXT_BYTES,
            max_inflight_requests: MAX_INFLIGHT_REQUESTS,
            history_page_max: HISTORY_PAGE_MAX,
            max_group_members: MAX_GROUP_MEMBERS,
            auth_deadline_ms: AUTH_DEADLINE_MS,
        }
    }
}
