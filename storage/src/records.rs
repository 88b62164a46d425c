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
///
/// Stored as postcard `(delivered_up_to, read_up_to)`, followed by `shown_read_up_to`
/// (a postcard varint) only when it differs from `read_up_to`; a record without it (every
/// record written before the field existed, and most after) reads it as `read_up_to`
/// (`ReceiptRecord::encode`, `decode`). So no data dir needs an upgrade for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiptRecord {
    /// Highest seq one of the member's devices holds with no gap below it.
    pub delivered_up_to: u64,
    /// Highest seq the member marked read (above `delivered_up_to` only for reads made
    /// while it kept read receipts private).
    pub read_up_to: u64,
    /// Highest seq the member marked read while it did not keep read receipts private:
    /// the read mark others may be shown (reads made while private are never shown, also
    /// after the member makes its receipts public again).
    pub shown_read_up_to: u64,
}

impl ReceiptRecord {
    /// The stored bytes (see the type).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut bytes = crate::encode(&(self.delivered_up_to, self.read_up_to));
        if self.shown_read_up_to != self.read_up_to {
            bytes = postcard::to_extend(&self.shown_read_up_to, bytes).expect("postcard encodes a u64 into a Vec");
        }
        bytes
    }

    /// Reads what `encode` wrote (or a record of before `shown_read_up_to`).
    pub(crate) fn decode(key: &[u8], bytes: &[u8]) -> crate::Result<ReceiptRecord> {
        let corrupt = |e: postcard::Error| crate::corrupt(key, &e.to_string());
        let ((delivered_up_to, read_up_to), rest) = postcard::take_from_bytes::<(u64, u64)>(bytes).map_err(corrupt)?;
        let shown_read_up_to = if rest.is_empty() {
            read_up_to
        } else {
            let (shown, rest) = postcard::take_from_bytes::<u64>(rest).map_err(corrupt)?;
            if !rest.is_empty() {
                return Err(crate::corrupt(key, "bytes after a receipt record"));
            }
            // Never above the read mark: the shown one is a part of it.
            shown.min(read_up_to)
        };
        Ok(ReceiptRecord { delivered_up_to, read_up_to, shown_read_up_to })
    }
}
