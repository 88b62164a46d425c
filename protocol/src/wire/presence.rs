//! Presence and typing: ephemeral, never stored (except a user's last-seen time).
//! Typing travels as a QUIC datagram where both ends enabled datagrams, on the control
//! stream otherwise.

use serde::{Deserialize, Serialize};

use super::{ConvId, UserId};

/// A user's presence, aggregated over its devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PresenceState {
    /// At least one device is connected and not away.
    Online,
    /// Devices are connected, and every one of them said it is away.
    Away,
    /// No device is connected.
    Offline,
}

/// Presence of one user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceInfo {
    /// User.
    pub user: UserId,
    /// User name.
    pub name: String,
    /// Aggregated state.
    pub state: PresenceState,
    /// Last time the user was online or away, ms since the Unix epoch (0: never seen).
    /// For a user online now, the time of this report.
    pub last_seen_ms: u64,
}

/// An ephemeral client signal: no response. Sent as `ClientFrame::Signal` on the control
/// stream or, where both ends enabled datagrams, as one whole frame (length prefix
/// included) filling a QUIC datagram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// I started (`true`) or stopped (`false`) typing in `conv`. Repeat `true` at least
    /// every `typing_ttl_ms / 2` while typing: the broker stops it after `typing_ttl_ms`.
    Typing {
        /// Conversation.
        conv: ConvId,
        /// Started or stopped.
        typing: bool,
    },
}
