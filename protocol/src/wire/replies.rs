//! Broker to client after the hello: responses (matched by request id) and pushed events.

use serde::{Deserialize, Serialize};

use super::{
    CatchUpPage, ConvId, ConversationKind, ConversationState, DeviceId, Entry, FileInfo, FileProgress, PresenceInfo,
    Receipt, Role, Seq, Settings, StoredFile, UploadInfo, UploadStatus, Usage, UserId,
};
use crate::ErrorCode;

/// A frame from broker to client after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The answer to request `id`.
    Response {
        /// The request's id.
        id: u32,
        /// Success or a stable error.
        result: Result<Reply, ErrorBody>,
    },
    /// Something that happened, pushed without a request.
    Event(Event),
}

/// A failed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail; not stable.
    pub message: String,
}

impl ErrorBody {
    /// An error with a code and a detail.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody { code, message: message.into() }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorBody {}

/// A successful reply. Tags are positions: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Authentication succeeded (register, login or authenticate).
    Authed {
        /// My user id.
        user_id: UserId,
        /// This device's id; keep it with the key to authenticate later.
        device_id: DeviceId,
    },
    /// Answer to `Ping`.
    Pong {
        /// Broker wall clock, ms since the Unix epoch.
        server_time_ms: u64,
    },
    /// One conversation.
    Conversation(ConversationSummary),
    /// A page of my conversations.
    Conversations {
        /// Ascending by id.
        items: Vec<ConversationSummary>,
        /// More exist after the last one.
        more: bool,
    },
    /// Members of a conversation.
    Members(Vec<Member>),
    /// A log entry was appended (or had been: `duplicate`).
    Appended {
        /// Its seq.
        seq: Seq,
        /// The client id was seen before; nothing new was written.
        duplicate: bool,
    },
    /// A page of the log, ascending by seq.
    History {
        /// Entries.
        entries: Vec<Entry>,
        /// Seq of the newest durable entry at the time of the read.
        last_seq: Seq,
    },
    /// My devices.
    Devices(Vec<DeviceInfo>),
    /// Done, nothing to return.
    Done,
    /// My receipt watermarks in one conversation (answer to `MarkRead`).
    Receipt(Receipt),
    /// Every member's receipts in a conversation, by user id.
    Receipts(Vec<Receipt>),
    /// A page of my conversations with unread counts.
    ConversationStates {
        /// Ascending by id.
        items: Vec<ConversationState>,
        /// More exist after the last one.
        more: bool,
    },
    /// A catch-up page.
    CatchUp(CatchUpPage),
    /// Presence of the users asked about that share a conversation with me, by id.
    Presence(Vec<PresenceInfo>),
    /// My settings.
    Settings(Settings),
    /// Where an upload stands (answer to `BeginUpload` and `UploadStatus`).
    Upload(UploadStatus),
    /// A file's description (answer to `FileInfo`).
    File(FileInfo),
    /// My uploads in progress (answer to `ListUploads`).
    Uploads {
        /// By ascending file id.
        items: Vec<UploadInfo>,
        /// More exist after the last one.
        more: bool,
    },
    /// My quota and limits (answer to `Usage`).
    Usage(Usage),
    /// The users I block (answer to `BlockedUsers`), by ascending id.
    BlockedUsers(Vec<BlockedUser>),
    /// A page of my stored files (answer to `ListFiles`).
    Files {
        /// By ascending file id.
        items: Vec<StoredFile>,
        /// More exist after the last one.
        more: bool,
    },
    /// The users an entry names, by ascending id (answer to `EntryNames`); a user whose
    /// account no longer exists is left out.
    Names(Vec<UserName>),
}

/// A user's id and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserName {
    /// User id.
    pub user_id: UserId,
    /// User name.
    pub name: String,
}

/// A user I block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedUser {
    /// User id.
    pub user_id: UserId,
    /// User name.
    pub name: String,
}

/// A conversation as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    /// Id.
    pub id: ConvId,
    /// Direct or group.
    pub kind: ConversationKind,
    /// Group title, or the peer's name for a direct conversation.
    pub title: String,
    /// Newest seq.
    pub last_seq: Seq,
    /// Number of members.
    pub member_count: u32,
    /// My role.
    pub my_role: Role,
}

/// A member of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// User id.
    pub user_id: UserId,
    /// User name.
    pub name: String,
    /// Role.
    pub role: Role,
}

/// One of my devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device id.
    pub device_id: DeviceId,
    /// Label given at enrollment.
    pub name: String,
    /// Enrollment time, ms since the Unix epoch.
    pub enrolled_ms: u64,
    /// This is the device asking.
    pub current: bool,
}

/// Pushed to a device without a request. Tags are positions: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A new entry in one of my conversations, delivered once durable.
    Entry(Entry),
    /// A member's receipt watermarks moved (durable; coalesced, the latest wins).
    Receipt(Receipt),
    /// A user who shares a conversation with me changed presence (coalesced per user).
    Presence(PresenceInfo),
    /// A member started or stopped typing. Sent as a QUIC datagram holding this one frame
    /// when the device enabled datagrams, else on the control stream.
    /// Ephemeral: a device that misses one sees typing end by `typing_ttl_ms` anyway.
    Typing {
        /// Conversation.
        conv: ConvId,
        /// Who.
        user: UserId,
        /// Started or stopped.
        typing: bool,
    },
    /// Several members' receipt watermarks moved in one durable write, in one frame (a
    /// single change is sent as `Receipt`), so a receipt write costs one frame per
    /// device however many members it covers.
    Receipts(Vec<Receipt>),
    /// An upload moved (throttled; the final state always arrives).
    File(FileProgress),
}
