//! Client to broker after the hello: requests, each answered exactly once.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ClientMsgId, ConvId, DeviceId, FileId, NewUpload, Role, Seq, Settings, Signal, UserId};

/// A frame from client to broker after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// A request expecting exactly one response with the same id.
    Request(Request),
    /// An ephemeral signal (typing): no response. Authenticated connections only.
    Signal(Signal),
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
        /// Ed25519 signature over `auth_transcript_v5(exporter)` (version 4:
        /// `auth_transcript(nonce, exporter)`), 64 bytes.
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
    /// Revoke this device (sign it out); its live connections are closed. Another
    /// device's id is `FORBIDDEN` (since 2026-12-07): revoking another takes the
    /// account's password, `RevokeOtherDevice`.
    RevokeDevice {
        /// Device to revoke.
        device_id: DeviceId,
    },
    /// This device holds every entry up to each seq: one `(conv, seq)` per conversation,
    /// at most `MAX_MARKS_PER_REQUEST`. A value at or below the stored watermark is
    /// ignored (never an error); one above the conversation's newest seq is clamped.
    /// Replies `Done` once accepted; the watermark is durable with the next group commit.
    MarkDelivered {
        /// `(conversation, highest seq held with no gap below it)` pairs.
        marks: Vec<(ConvId, Seq)>,
    },
    /// I have read `conv` up to `seq` (implies delivered). Replies `Receipt` with my new
    /// watermarks once they are durable; a lower `seq` leaves them as they are.
    MarkRead {
        /// Conversation.
        conv: ConvId,
        /// Newest seq read.
        seq: Seq,
    },
    /// Every member's receipt watermarks in a conversation I belong to.
    Receipts {
        /// Conversation.
        conv: ConvId,
    },
    /// A page of my conversations with unread counts and my watermarks, by ascending id.
    ConversationStates {
        /// Exclusive lower bound on the id.
        after: Option<ConvId>,
    },
    /// Catch-up: entries of `conv` after `after`, up to `limit` (capped at
    /// `CATCH_UP_PAGE_MAX` and by `CATCH_UP_PAGE_BYTES`), with receipts once complete.
    CatchUp {
        /// Conversation.
        conv: ConvId,
        /// Seq the device holds everything up to (0: nothing).
        after: Seq,
        /// At most this many entries.
        limit: u16,
    },
    /// This device is away (`true`) or back (`false`). A new connection starts online.
    SetPresence {
        /// Away or not.
        away: bool,
    },
    /// Presence of users who share a conversation with me, at most `PRESENCE_MAX`;
    /// an empty list asks for all of them (every contact the broker keeps, at most
    /// `PRESENCE_SNAPSHOT_MAX`, by id). Other users are left out of the reply, as unknown
    /// ones are.
    Presence {
        /// Users asked about.
        users: Vec<UserId>,
    },
    /// Reads my settings, replacing them first if `set` is given.
    Settings {
        /// New settings, or `None` to only read them.
        set: Option<Settings>,
    },
    /// Start an upload after checking the limits (size, quota, uploads in progress, disk
    /// reserve). Replies `Upload` with the new file id and offset 0; the connection may
    /// then open transfer streams (PROTOCOL.md section 12).
    BeginUpload(NewUpload),
    /// Where my upload `file` stands (its durable offset). Replies `Upload`; the
    /// connection may then open transfer streams.
    UploadStatus {
        /// The upload.
        file: FileId,
    },
    /// Abandon my incomplete upload: its data and quota are released. Replies `Done`.
    CancelUpload {
        /// The upload.
        file: FileId,
    },
    /// Send a message carrying files (and an optional caption). Each file is one I may
    /// read (uploaded by me, or attached where I am a member), complete or still
    /// uploading; the conversation's members may then read it. Replies `Appended`.
    SendFiles {
        /// Conversation.
        conv: ConvId,
        /// Idempotency key: resending it returns the original seq.
        client_id: ClientMsgId,
        /// Caption (may be empty). The caption and every file's name and media type
        /// together are at most `max_text_bytes` bytes, so a files message is no larger
        /// in a history page than a text message.
        text: String,
        /// 1..=`MAX_FILES_PER_MESSAGE` distinct files.
        files: Vec<FileId>,
    },
    /// A file I may read. Replies `File`; the connection may then open transfer streams.
    FileInfo {
        /// The file.
        file: FileId,
    },
    /// Drop my own hold on a file I uploaded: it is deleted once no message carries it,
    /// and counts against my quota until then. Replies `Done`.
    DeleteFile {
        /// The file.
        file: FileId,
    },
    /// My uploads in progress (begun by any of my devices, not yet complete, cancelled
    /// or expired), by ascending file id, ids strictly above `after`, at most
    /// `MAX_LISTED_UPLOADS`. Replies `Uploads`.
    ListUploads {
        /// List only ids above this one (the last id of the previous page).
        after: Option<FileId>,
    },
    /// Change a member's role in a group (the owner only): `Admin` or `Member`, or `Owner`
    /// to hand over ownership (the caller becomes `Admin`). Replies `Appended` with the
    /// `RolesChanged` entry.
    SetRole {
        /// Conversation.
        conv: ConvId,
        /// The member.
        user: UserId,
        /// The new role.
        role: Role,
    },
    /// What my files take of my quota and limits. Replies `Usage`.
    Usage,
    /// Replace my account's password, proving the current one (checked and limited like
    /// a `Login`'s). Replies `Done` once the new password is durable. With
    /// `sign_out_others`, every other device of the account is revoked too (their
    /// connections close with `DEVICE_REVOKED`); this device keeps working.
    ChangePassword {
        /// The account's password now.
        current: String,
        /// The new password: 8..=256 bytes.
        new: String,
        /// Revoke every other device of the account.
        sign_out_others: bool,
    },
    /// Block a user by name (or stop, with `blocked` false). While I block someone, they
    /// cannot start a direct conversation with me, write in ours, or add me to a group,
    /// and neither of us sees the other's presence or typing. At most `MAX_BLOCKED`
    /// users. Replies `Done` once durable.
    Block {
        /// The user's name.
        user: String,
        /// Block (true) or unblock (false).
        blocked: bool,
    },
    /// The users I block, by ascending id. Replies `BlockedUsers`.
    BlockedUsers,
    /// My stored files (complete, counted in my quota), by ascending id, after `after`;
    /// at most `MAX_LISTED_UPLOADS` a page. Replies `Files`.
    ListFiles {
        /// List only ids above this one (the last id of the previous page).
        after: Option<FileId>,
    },
    /// Take my complete file back from every message that carries it (all of them mine:
    /// a file someone else sends travels as their own copy) and drop my hold: it is
    /// deleted at once, readers find it gone (`NOT_FOUND`), and my quota has its bytes
    /// back once freed, also from conversations I have left. Replies `Done`.
    WithdrawFile {
        /// The file.
        file: FileId,
    },
    /// The names of the users entry `seq` of `conv` names: its sender, and the users its
    /// body adds, removes or gives a role. For a member of `conv` (who may read every
    /// entry): names history shows of people who are no longer members, which `Members`
    /// does not list. Replies `Names`; `NOT_FOUND` for a seq above the newest durable one
    /// (or 0).
    EntryNames {
        /// Conversation.
        conv: ConvId,
        /// The entry.
        seq: Seq,
    },
    /// Rename a group (its owner or an admin): `title` is a label (1 to 64 bytes of
    /// visible text). Replies `Appended` with the `TitleChanged` entry; `INVALID` for a
    /// direct conversation or a bad title, `FORBIDDEN` for a plain member, `CONFLICT`
    /// when the group already has that title (a retry whose answer was lost). Version 4.
    SetTitle {
        /// Conversation.
        conv: ConvId,
        /// The new title.
        title: String,
    },
    /// Revoke one of my devices, proving the account's password (checked and limited
    /// like `ChangePassword`'s current one: `AUTH_FAILED` if wrong). Replies `Done`; its
    /// live connections close with `DEVICE_REVOKED`. `RevokeDevice` revokes only the
    /// device asking: a device key alone (a stolen phone's) does not revoke the owner's
    /// other devices. Since 2026-12-07.
    RevokeOtherDevice {
        /// Device to revoke.
        device_id: DeviceId,
        /// The account's password.
        password: String,
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
    /// Signature by that key over `auth_transcript_v5(exporter)` (version 4:
    /// `auth_transcript(nonce, exporter)`), 64 bytes.
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
