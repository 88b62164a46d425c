//! Every message on the control stream. postcard is not self-describing: an enum
//! variant's position is its wire tag, so variants are only ever appended, never
//! reordered or removed. `docs/PROTOCOL.md` documents each type; its test vectors are
//! checked against this file by `tests::documented_vectors_match`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ErrorCode;

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

/// First frame on the control stream, client to broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHello {
    /// Always `MAGIC`.
    pub magic: [u8; 4],
    /// Protocol version the client speaks.
    pub version: u16,
    /// Free-form client name and version, for logs (at most `MAX_NAME_BYTES`).
    pub agent: String,
}

/// First frame on the control stream, broker to client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// Protocol version the broker will speak on this connection.
    pub version: u16,
    /// Fresh random nonce the device signs (see `auth_transcript`).
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
    /// Time allowed for hello plus authentication.
    pub auth_deadline_ms: u32,
}

/// A frame from client to broker after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// A request expecting exactly one response with the same id.
    Request(Request),
}

/// A client request. Ids are chosen by the client and echoed in the response; they
/// need only be unique among the client's outstanding requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the response.
    pub id: u32,
    /// What is asked.
    pub body: RequestBody,
}

/// What a request asks. Tags are positions: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Create an account and enroll this device. Pre-auth only.
    Register(Enroll),
    /// Enroll this device into an existing account with its password. Pre-auth only.
    Login(Enroll),
    /// Prove an enrolled device on this connection. Pre-auth only.
    Authenticate {
        /// Account name.
        user: String,
        /// Device id returned at enrollment.
        device_id: DeviceId,
        /// Ed25519 signature over `auth_transcript(nonce, exporter)`, 64 bytes.
        signature: Bytes,
    },
    /// Liveness check; replies `Pong`.
    Ping,
    /// Create a direct or group conversation.
    CreateConversation(NewConversation),
    /// List my conversations by ascending id, after `after` if given.
    ListConversations {
        /// Exclusive lower bound on the id.
        after: Option<ConvId>,
    },
    /// Members of a conversation I belong to.
    Members {
        /// Conversation.
        conv: ConvId,
    },
    /// Add users to a group (owner or admin only).
    AddMembers {
        /// Conversation.
        conv: ConvId,
        /// User names to add.
        users: Vec<String>,
        /// Role given to them (never `Owner`).
        role: Role,
    },
    /// Remove a member from a group (owner or admin; nobody removes the owner).
    RemoveMember {
        /// Conversation.
        conv: ConvId,
        /// Member to remove.
        user: UserId,
    },
    /// Leave a group.
    Leave {
        /// Conversation.
        conv: ConvId,
    },
    /// Send a text message.
    Send {
        /// Conversation.
        conv: ConvId,
        /// Idempotency key: resending it returns the original seq.
        client_id: ClientMsgId,
        /// UTF-8 text, 1..=`max_text_bytes`.
        text: String,
    },
    /// Replace the text of my message `target`.
    Edit {
        /// Conversation.
        conv: ConvId,
        /// Idempotency key of the edit itself.
        client_id: ClientMsgId,
        /// Seq of the message to edit.
        target: Seq,
        /// New text.
        text: String,
    },
    /// Tombstone my message `target`.
    Delete {
        /// Conversation.
        conv: ConvId,
        /// Idempotency key of the delete itself.
        client_id: ClientMsgId,
        /// Seq of the message to delete.
        target: Seq,
    },
    /// A page of the conversation log.
    History {
        /// Conversation.
        conv: ConvId,
        /// Which page.
        page: Page,
        /// At most this many entries (capped at `history_page_max`).
        limit: u16,
    },
    /// My enrolled devices.
    ListDevices,
    /// Revoke one of my devices; its live connection is closed.
    RevokeDevice {
        /// Device to revoke.
        device_id: DeviceId,
    },
}

/// Enrollment of a new device key, with the account password.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enroll {
    /// Account name: 1..=64 bytes of `[a-z0-9_.-]`.
    pub user: String,
    /// Account password.
    pub password: String,
    /// Human label for the device.
    pub device_name: String,
    /// Ed25519 public key, 32 bytes.
    pub public_key: Bytes,
    /// Signature by that key over `auth_transcript(nonce, exporter)`, 64 bytes.
    pub signature: Bytes,
}

/// What kind of conversation to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NewConversation {
    /// The one direct conversation with `peer` (returned if it exists already).
    Direct {
        /// The other user's name.
        peer: String,
    },
    /// A new group; the creator becomes its owner.
    Group {
        /// Title, at most `MAX_NAME_BYTES`.
        title: String,
        /// Other members' names.
        members: Vec<String>,
    },
}

/// Which slice of the log a history request wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Page {
    /// The newest entries.
    Latest,
    /// Entries with seq strictly below this one, newest first cut, returned ascending.
    Before(Seq),
    /// Entries with seq strictly above this one, ascending.
    After(Seq),
}

/// Role of a member in a conversation, least powerful last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Created the group; can do everything; cannot be removed.
    Owner,
    /// May add and remove members.
    Admin,
    /// May read and write.
    Member,
}

/// Direct or group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationKind {
    /// Exactly two users, one per pair.
    Direct,
    /// A titled group with roles.
    Group,
}

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

/// One entry of a conversation log: a message or a change to the conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Conversation.
    pub conv: ConvId,
    /// Position in the conversation.
    pub seq: Seq,
    /// Who caused it.
    pub sender: UserId,
    /// From which device.
    pub sender_device: DeviceId,
    /// The sender's idempotency key.
    pub client_id: ClientMsgId,
    /// Broker time of acceptance, ms since the Unix epoch.
    pub at_ms: u64,
    /// What it is.
    pub body: Body,
}

/// What a log entry says. Tags are positions: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A text message; `edited` once an `Edit` replaced its text.
    Text {
        /// Current text.
        text: String,
        /// It was edited.
        edited: bool,
    },
    /// A deleted message (its text is gone for good).
    Tombstone,
    /// The sender replaced the text of `target`.
    Edit {
        /// Edited message.
        target: Seq,
        /// New text.
        text: String,
    },
    /// The sender deleted `target`.
    Delete {
        /// Deleted message.
        target: Seq,
    },
    /// The conversation was created with these members (seq 1).
    Created {
        /// Direct or group.
        kind: ConversationKind,
        /// Group title.
        title: String,
        /// Initial members and roles.
        members: Vec<(UserId, Role)>,
    },
    /// Users were added.
    MembersAdded {
        /// Added users and roles.
        members: Vec<(UserId, Role)>,
    },
    /// A member was removed by `sender`.
    MemberRemoved {
        /// Removed user.
        user: UserId,
    },
    /// `sender` left.
    MemberLeft,
}

/// Pushed to a device without a request. Tags are positions: append only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A new entry in one of my conversations, delivered once durable.
    Entry(Entry),
}
