//! Records stored as postcard values. Like the wire types, fields are only appended.

use serde::{Deserialize, Serialize};
use switchboard_protocol::ConversationKind;

/// An account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Unique name.
    pub name: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

/// An enrolled device key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Label given at enrollment.
    pub name: String,
    /// Ed25519 public key.
    pub public_key: [u8; 32],
    /// Enrollment time, ms since the Unix epoch.
    pub enrolled_ms: u64,
}

/// A conversation's fixed attributes (members and log are keyed separately).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    /// Direct or group.
    pub kind: ConversationKind,
    /// Group title (empty for direct).
    pub title: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

/// A member's receipt watermarks in one conversation (see `Store::write_receipts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    /// Highest seq one of the member's devices holds with no gap below it.
    pub delivered_up_to: u64,
    /// Highest seq the member marked read (never above `delivered_up_to`).
    pub read_up_to: u64,
}
