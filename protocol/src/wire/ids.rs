//! Identifiers. Assigned by the broker and never reused, except `ClientMsgId`.

/// Identifies a user. Assigned by the broker, never reused.
pub type UserId = u64;
/// Identifies a device of a user. Assigned by the broker, never reused.
pub type DeviceId = u64;
/// Identifies a conversation. Assigned by the broker, never reused.
pub type ConvId = u64;
/// Position of an entry in its conversation: gapless, starting at 1.
pub type Seq = u64;
/// A client-chosen 128-bit id that makes a send idempotent.
pub type ClientMsgId = [u8; 16];
