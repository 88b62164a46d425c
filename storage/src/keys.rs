//! Key encoding. One sled tree; the first byte says what a key is; integers are
//! big-endian so a prefix scan returns them in numeric order.

use switchboard_protocol::{ClientMsgId, ConvId, DeviceId, FileId, Seq, UserId};

const COUNTER: u8 = 0x00;
const USER: u8 = 0x01;
const USER_NAME: u8 = 0x02;
const DEVICE: u8 = 0x03;
const CONVERSATION: u8 = 0x04;
// 0x05 held a conversation's last seq; it is now derived from its newest entry.
const MEMBER: u8 = 0x06;
const USER_CONV: u8 = 0x07;
const ENTRY: u8 = 0x08;
const DEDUPE: u8 = 0x09;
const DIRECT: u8 = 0x0a;
const CLEAN_SHUTDOWN: u8 = 0x0b;
const EDIT_OF: u8 = 0x0c;
const FORMAT: u8 = 0x0d;
const UNCONFIRMED: u8 = 0x0e;
const RECEIPT: u8 = 0x0f;
const SETTINGS: u8 = 0x10;
// 0x11 held a text message count per text message (formats 3 to 7); the format-8
// upgrade removes them (`Key::old_text_counts`).
const TEXT_COUNT: u8 = 0x11;
const SENDER_COUNT: u8 = 0x12;
const LAST_SEEN: u8 = 0x13;
const FILE: u8 = 0x14;
const UPLOADING: u8 = 0x15;
const STORED_BYTES: u8 = 0x16;
const FILE_EXPIRY: u8 = 0x17;
const ATTACHED: u8 = 0x18;
const BLOB_REFS: u8 = 0x19;
const FILE_UNHELD: u8 = 0x1a;
const BLOCK: u8 = 0x1b;
const STORED_FILE: u8 = 0x1c;
const DISABLED: u8 = 0x1d;
const FORWARD_COPY: u8 = 0x1e;
const COPY_OF: u8 = 0x1f;
const MEMBER_COUNT: u8 = 0x20;
const OTHER_COUNT: u8 = 0x21;
const PRESENCE_AT_STOP: u8 = 0x22;
const WITHDRAWN: u8 = 0x23;
const REVOKED: u8 = 0x24;

/// A key: at most 1 + 8 + 8 + 16 bytes, or a prefixed name.
pub struct Key(Vec<u8>);

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Key {
    fn with(tag: u8, parts: &[&[u8]]) -> Key {
        let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
        k.push(tag);
        for p in parts {
            k.extend_from_slice(p);
        }
        Key(k)
    }

    pub fn counter(which: u8) -> Key {
        Key::with(COUNTER, &[&[which]])
    }
    pub fn user(id: UserId) -> Key {
        Key::with(USER, &[&id.to_be_bytes()])
    }
    /// Prefix of every user record.
    pub fn users() -> Key {
        Key::with(USER, &[])
    }
    pub fn user_name(name: &str) -> Key {
        Key::with(USER_NAME, &[name.as_bytes()])
    }
    pub fn device(user: UserId, device: DeviceId) -> Key {
        Key::with(DEVICE, &[&user.to_be_bytes(), &device.to_be_bytes()])
    }
    pub fn devices_of(user: UserId) -> Key {
        Key::with(DEVICE, &[&user.to_be_bytes()])
    }
    /// Present while a device has not authenticated since its enrollment.
    pub fn unconfirmed(user: UserId, device: DeviceId) -> Key {
        Key::with(UNCONFIRMED, &[&user.to_be_bytes(), &device.to_be_bytes()])
    }
    pub fn unconfirmed_of(user: UserId) -> Key {
        Key::with(UNCONFIRMED, &[&user.to_be_bytes()])
    }
    /// A removed device's Ed25519 public key (32 bytes), kept so that its holder is told
    /// it was revoked (`Store::revoked_key`).
    pub fn revoked(user: UserId, device: DeviceId) -> Key {
        Key::with(REVOKED, &[&user.to_be_bytes(), &device.to_be_bytes()])
    }
    pub fn revoked_of(user: UserId) -> Key {
        Key::with(REVOKED, &[&user.to_be_bytes()])
    }
    pub fn conversation(id: ConvId) -> Key {
        Key::with(CONVERSATION, &[&id.to_be_bytes()])
    }
    pub fn member(conv: ConvId, user: UserId) -> Key {
        Key::with(MEMBER, &[&conv.to_be_bytes(), &user.to_be_bytes()])
    }
    pub fn members_of(conv: ConvId) -> Key {
        Key::with(MEMBER, &[&conv.to_be_bytes()])
    }
    /// A conversation's number of member keys (u64, big-endian), written with them by the
    /// creation batch and each membership entry's effects. Absent in a data dir from
    /// before it (counted from the member keys then).
    pub fn member_count(conv: ConvId) -> Key {
        Key::with(MEMBER_COUNT, &[&conv.to_be_bytes()])
    }
    pub fn user_conv(user: UserId, conv: ConvId) -> Key {
        Key::with(USER_CONV, &[&user.to_be_bytes(), &conv.to_be_bytes()])
    }
    pub fn user_conv_end(user: UserId) -> Key {
        Key::with(USER_CONV, &[&user.to_be_bytes(), &u64::MAX.to_be_bytes(), &[0xff]])
    }
    pub fn entry(conv: ConvId, seq: Seq) -> Key {
        Key::with(ENTRY, &[&conv.to_be_bytes(), &seq.to_be_bytes()])
    }
    pub fn dedupe(conv: ConvId, user: UserId, client_id: &ClientMsgId) -> Key {
        Key::with(DEDUPE, &[&conv.to_be_bytes(), &user.to_be_bytes(), client_id])
    }
    /// Marks entry `edit` as an edit of `target`, so a delete of `target` finds every
    /// version of its text.
    pub fn edit_of(conv: ConvId, target: Seq, edit: Seq) -> Key {
        Key::with(EDIT_OF, &[&conv.to_be_bytes(), &target.to_be_bytes(), &edit.to_be_bytes()])
    }
    /// Every edit of `target`.
    pub fn edits_of(conv: ConvId, target: Seq) -> Key {
        Key::with(EDIT_OF, &[&conv.to_be_bytes(), &target.to_be_bytes()])
    }
    /// A member's receipt watermarks in a conversation.
    pub fn receipt(conv: ConvId, user: UserId) -> Key {
        Key::with(RECEIPT, &[&conv.to_be_bytes(), &user.to_be_bytes()])
    }
    /// A user's settings.
    pub fn settings(user: UserId) -> Key {
        Key::with(SETTINGS, &[&user.to_be_bytes()])
    }
    /// Prefix of the text message counts that formats 3 to 7 wrote, one per text message
    /// (`(conv, seq)` to the count up to `seq`); the format-8 upgrade removes them.
    pub fn old_text_counts() -> Key {
        Key::with(TEXT_COUNT, &[])
    }
    /// What formats 3 to 7 wrote for the text message at `seq` (the format-3 upgrade writes
    /// it as they did).
    pub fn old_text_count(conv: ConvId, seq: Seq) -> Key {
        Key::with(TEXT_COUNT, &[&conv.to_be_bytes(), &seq.to_be_bytes()])
    }
    /// The number of entries of `conv` up to and including `seq` that are not messages
    /// (u64, big-endian; `counts_as_message`), present for each such entry's seq. Seqs are
    /// gapless from 1, so the messages up to a seq are the seq less this count.
    pub fn other_count(conv: ConvId, seq: Seq) -> Key {
        Key::with(OTHER_COUNT, &[&conv.to_be_bytes(), &seq.to_be_bytes()])
    }
    /// The number of text messages `sender` wrote in `conv` up to and including `seq`,
    /// present for each of them.
    pub fn sender_count(conv: ConvId, sender: UserId, seq: Seq) -> Key {
        Key::with(SENDER_COUNT, &[&conv.to_be_bytes(), &sender.to_be_bytes(), &seq.to_be_bytes()])
    }
    /// The data format version (u32, big-endian); absent before version 2.
    pub fn format() -> Key {
        Key::with(FORMAT, &[])
    }
    /// Every conversation entry starts with this.
    pub fn entries() -> Key {
        Key::with(ENTRY, &[])
    }
    /// Present only while the store is closed after a clean shutdown.
    pub fn clean_shutdown() -> Key {
        Key::with(CLEAN_SHUTDOWN, &[])
    }
    /// Every conversation record starts with this.
    pub fn conversations() -> Key {
        Key::with(CONVERSATION, &[])
    }
    /// Who was connected when the broker last stopped (`Store::set_presence_at_stop`).
    pub fn presence_at_stop() -> Key {
        Key::with(PRESENCE_AT_STOP, &[])
    }
    /// When a user was last online or away (ms since the epoch, big-endian u64).
    pub fn last_seen(user: UserId) -> Key {
        Key::with(LAST_SEEN, &[&user.to_be_bytes()])
    }
    /// A file's record (`FileRecord`), by its id.
    pub fn file(id: &FileId) -> Key {
        Key::with(FILE, &[id])
    }
    /// Every file record.
    pub fn files() -> Key {
        Key::with(FILE, &[])
    }
    /// Present while `user`'s complete file `file` (not a thumbnail) is stored: counted
    /// in its quota, from completion until it is collected.
    pub fn stored_file(user: UserId, file: &FileId) -> Key {
        Key::with(STORED_FILE, &[&user.to_be_bytes(), file])
    }
    /// Every stored file of `user`.
    pub fn stored_files_of(user: UserId) -> Key {
        Key::with(STORED_FILE, &[&user.to_be_bytes()])
    }
    /// Present while `user`'s upload `file` is in progress (counted for
    /// `max_uploads_per_user`).
    pub fn uploading(user: UserId, file: &FileId) -> Key {
        Key::with(UPLOADING, &[&user.to_be_bytes(), file])
    }
    pub fn uploading_of(user: UserId) -> Key {
        Key::with(UPLOADING, &[&user.to_be_bytes()])
    }
    /// Every upload in progress, of any user.
    pub fn uploads() -> Key {
        Key::with(UPLOADING, &[])
    }
    /// Every user's stored bytes (`stored_bytes`).
    pub fn all_stored_bytes() -> Key {
        Key::with(STORED_BYTES, &[])
    }
    /// Bytes a user's quota counts (u64, big-endian).
    pub fn stored_bytes(user: UserId) -> Key {
        Key::with(STORED_BYTES, &[&user.to_be_bytes()])
    }
    /// An incomplete upload expires at `expires_ms`.
    pub fn file_expiry(expires_ms: u64, file: &FileId) -> Key {
        Key::with(FILE_EXPIRY, &[&expires_ms.to_be_bytes(), file])
    }
    /// Every expiry key up to and including `expires_ms`.
    pub fn file_expiry_until(expires_ms: u64) -> Key {
        Key::with(FILE_EXPIRY, &[&expires_ms.to_be_bytes(), &[0xff; 16]])
    }
    pub fn file_expiries() -> Key {
        Key::with(FILE_EXPIRY, &[])
    }
    /// Message `seq` of `conv`, not deleted, carries `file`.
    pub fn attached(file: &FileId, conv: ConvId, seq: Seq) -> Key {
        Key::with(ATTACHED, &[file, &conv.to_be_bytes(), &seq.to_be_bytes()])
    }
    pub fn attached_of(file: &FileId) -> Key {
        Key::with(ATTACHED, &[file])
    }
    /// How many complete files share the stored bytes with this BLAKE3 (u64).
    pub fn blob_refs(hash: &[u8; 32]) -> Key {
        Key::with(BLOB_REFS, &[hash])
    }
    /// A complete file that may have lost its last hold (its uploader's or a message's):
    /// checked, and deleted if so, by `Store::collect_file`.
    pub fn file_unheld(file: &FileId) -> Key {
        Key::with(FILE_UNHELD, &[file])
    }
    /// A message (`conv`, `seq`) its uploader withdrew `file` from (`Store::withdraw_file`),
    /// until the file is collected: the repair of a conversation's newest entry does not
    /// write that access back. One per message withdrawn from, so a later message
    /// carrying the file is repaired as any.
    pub fn withdrawn(file: &FileId, conv: ConvId, seq: Seq) -> Key {
        Key::with(WITHDRAWN, &[file, &conv.to_be_bytes(), &seq.to_be_bytes()])
    }
    pub fn withdrawn_of(file: &FileId) -> Key {
        Key::with(WITHDRAWN, &[file])
    }
    pub fn files_unheld() -> Key {
        Key::with(FILE_UNHELD, &[])
    }
    /// `forwarder`'s copy of `original` (value: the copy's id), made when it sent a file
    /// someone else uploaded; reused by its next forward of the same file.
    pub fn forward_copy(forwarder: UserId, original: &FileId) -> Key {
        Key::with(FORWARD_COPY, &[&forwarder.to_be_bytes(), original])
    }
    /// The file `copy` was copied from (value: its id), while the copy exists.
    pub fn copy_of(copy: &FileId) -> Key {
        Key::with(COPY_OF, &[copy])
    }
    /// Present while the operator has disabled `user`'s account (its value: since when,
    /// ms since the Unix epoch).
    pub fn disabled(user: UserId) -> Key {
        Key::with(DISABLED, &[&user.to_be_bytes()])
    }
    /// Present while `blocker` blocks `blocked` (one way: (a, b) and (b, a) are two keys).
    pub fn block(blocker: UserId, blocked: UserId) -> Key {
        Key::with(BLOCK, &[&blocker.to_be_bytes(), &blocked.to_be_bytes()])
    }
    /// Every user `blocker` blocks.
    pub fn blocks_of(blocker: UserId) -> Key {
        Key::with(BLOCK, &[&blocker.to_be_bytes()])
    }
    /// The pair in canonical order, so (a, b) and (b, a) are one key.
    pub fn direct(a: UserId, b: UserId) -> Key {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        Key::with(DIRECT, &[&lo.to_be_bytes(), &hi.to_be_bytes()])
    }
}

/// Reads a big-endian u64 from exactly 8 bytes.
pub fn u64_from(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}
