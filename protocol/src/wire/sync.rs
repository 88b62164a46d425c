//! Receipts, unread counts, settings and catch-up: the state a device reconciles after
//! any time offline. Receipts are per (conversation, user) watermarks, not log entries.

use serde::{Deserialize, Serialize};

use super::{ConvId, ConversationSummary, Entry, Seq, UserId};

/// One user's receipt watermarks in one conversation. Both only ever grow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Conversation.
    pub conv: ConvId,
    /// Whose watermarks.
    pub user: UserId,
    /// Highest seq one of the user's devices reported holding with no gap below it.
    /// Never below `read_up_to` (reading implies delivery).
    pub delivered_up_to: Seq,
    /// Highest seq the user marked read; `None` when shown to another user and the user
    /// keeps read receipts private (`Settings::read_receipts_private`).
    pub read_up_to: Option<Seq>,
}

/// One of my conversations with my unread count and my watermarks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationState {
    /// The conversation as `ListConversations` shows it.
    pub summary: ConversationSummary,
    /// Text and files messages from other users with seq above `read_up_to` and above
    /// the entry that made me a member (up to `summary.last_seq`), deleted ones
    /// included; edits, deletes and membership changes are not messages and never count.
    pub unread: u64,
    /// My delivered watermark.
    pub delivered_up_to: Seq,
    /// My read watermark.
    pub read_up_to: Seq,
}

/// A page of one conversation's log after a cursor, for catching up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUpPage {
    /// Conversation.
    pub conv: ConvId,
    /// Entries with seq above the request's `after`, ascending, gapless.
    pub entries: Vec<Entry>,
    /// Newest durable seq at the time of the read.
    pub last_seq: Seq,
    /// The entries reach `last_seq`: nothing older than the live events remains.
    pub complete: bool,
    /// Every member's receipts as of the read; sent with the page that completes only.
    pub receipts: Vec<Receipt>,
}

/// A user's settings. Each request carries the whole value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Other members never see my `read_up_to` (my own devices still do), as Matrix's
    /// `m.read.private`.
    pub read_receipts_private: bool,
}
