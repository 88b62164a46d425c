//! The conversation log: entries and what they say, and the kinds and roles they name.

use serde::{Deserialize, Serialize};

use super::{ClientMsgId, ConvId, DeviceId, FileRef, Seq, UserId};

/// Role of a member in a conversation, least powerful last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Created the group, or was handed it (`SetRole`); can do everything; cannot be
    /// removed; one per group.
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
    /// An edit of `target` whose text is gone: the message it edited was deleted, and a
    /// delete removes every version of a message's text (the edits' included).
    Redacted {
        /// The deleted message this edit had changed.
        target: Seq,
    },
    /// A message carrying files, with a caption (possibly empty); `edited` once an `Edit`
    /// replaced the caption. Counts as a message for unread. Deleting it (a `Delete`)
    /// leaves a `Tombstone`, and the files stop being readable through it.
    Files {
        /// Caption.
        text: String,
        /// The files, as they were when the message was sent (a file may still be
        /// uploading: `FileInfo` and `Event::File` tell when it is complete).
        files: Vec<FileRef>,
        /// The caption was edited.
        edited: bool,
    },
    /// The owner (`sender`) changed members' roles: one member's, or, handing over
    /// ownership, the new owner's (`Owner`) and its own (`Admin`), in that order.
    RolesChanged {
        /// Members and their new roles.
        members: Vec<(UserId, Role)>,
    },
    /// An owner or admin (`sender`) renamed the group (`SetTitle`). Version 4.
    TitleChanged {
        /// The new title.
        title: String,
    },
}
