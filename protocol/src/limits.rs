//! Every bound the protocol announces, with the reason for its value. The broker sends
//! the ones a client must respect in `ServerHello::limits`.

/// Largest frame a client may send once authenticated: a request is small; the largest
/// is a text message (`MAX_TEXT_BYTES`) plus ids, so 64 KiB leaves ample headroom.
pub const MAX_CLIENT_FRAME_BYTES: u32 = 64 * 1024;
/// Largest frame the broker sends: a full history page of maximum-size messages.
pub const MAX_SERVER_FRAME_BYTES: u32 = 1024 * 1024;
/// Before authentication a peer is unknown: nothing it sends may be larger than this.
pub const PREAUTH_MAX_FRAME_BYTES: u32 = 4 * 1024;
/// Largest message text in bytes (UTF-8). Chat text, not files: files have streams.
pub const MAX_TEXT_BYTES: u32 = 4 * 1024;
/// Longest user, device or conversation title name in bytes.
pub const MAX_NAME_BYTES: u32 = 64;
/// Longest password in bytes; argon2 cost grows with input only slightly, but a bound
/// keeps pre-auth frames tiny.
pub const MAX_PASSWORD_BYTES: u32 = 256;
/// Requests a session may have outstanding; the broker stops reading beyond this,
/// so a pipelining client is slowed by QUIC flow control, never buffered without end.
pub const MAX_INFLIGHT_REQUESTS: u32 = 64;
/// Most entries in one history page.
pub const HISTORY_PAGE_MAX: u32 = 200;
/// Most members of one group conversation: bounds fan-out work per message and the
/// size of the member list reply.
pub const MAX_GROUP_MEMBERS: u32 = 1000;
/// Most users named in one create or add request.
pub const MAX_USERS_PER_REQUEST: u32 = 256;

/// The unit a quota counts in, bytes: a file is charged its size rounded up to whole
/// blocks of this, at least one, which is what it takes on a file system of 4 KiB blocks
/// (ext4's and XFS's default). Counting declared bytes let a user keep a million
/// one-byte files, each with its own blob file, inode and records, on 1 MB of quota.
pub const QUOTA_BLOCK: u64 = 4096;

/// What a file of `size` bytes counts against its owner's quota: `size` rounded up to
/// whole `QUOTA_BLOCK`s, at least one. Thumbnails are not charged (the broker makes
/// them). `Usage.stored_bytes` sums these (PROTOCOL.md section 12).
pub fn charged_bytes(size: u64) -> u64 {
    size.div_ceil(QUOTA_BLOCK).max(1).saturating_mul(QUOTA_BLOCK)
}

/// Most conversations in one list page.
pub const LIST_PAGE_MAX: u32 = 200;
/// Most `(conv, seq)` pairs in one `MarkDelivered`.
pub const MAX_MARKS_PER_REQUEST: u32 = 256;
/// Most entries in one catch-up page.
pub const CATCH_UP_PAGE_MAX: u32 = 1000;
/// The most bytes one entry takes in a `History` or `CatchUp` page: its text (or a files
/// message's caption, names and types together), at most 128 bytes of ids and headers,
/// and 32 bytes of ids, size and prefixes per file. Every page's fit in one server frame
/// is checked with it (below); the broker sizes the room it keeps for a page's answer by
/// it (PROTOCOL section 7, slow consumers).
pub const ENTRY_MAX_BYTES: u32 = MAX_TEXT_BYTES + 128 + MAX_FILES_PER_MESSAGE * 32;
/// A catch-up page stops adding entries once their encoded size passes this (it always
/// holds at least one), so a page of maximum-size texts still fits a server frame with
/// every member's receipts.
pub const CATCH_UP_PAGE_BYTES: u32 = 768 * 1024;
/// Most users one `Presence { users }` may name (and so in its reply).
pub const PRESENCE_MAX: u32 = 256;
/// Most users in the reply to `Presence { users: [] }`, the snapshot a device asks for
/// when it connects: every contact the broker keeps for a user (it keeps at most this
/// many), so a snapshot misses nobody a push would reach.
pub const PRESENCE_SNAPSHOT_MAX: u32 = 4096;
/// A user's contacts are gathered from at most this many of its conversations (the first
/// by id, smallest first; PROTOCOL.md section 11): one in more may have contacts the
/// snapshot leaves out.
pub const PRESENCE_CONVERSATIONS_SCANNED: u32 = 4096;
/// ... and from at most this many member entries over them: past it, too.
pub const PRESENCE_MEMBERS_SCANNED: u32 = 16_384;
/// Most users one user may block (`Block`); `BlockedUsers` lists them all in one reply.
/// A thousand covers anyone's harassers many times over and keeps the reply small.
pub const MAX_BLOCKED: u32 = 1024;
/// Default time after which a typing indicator without refresh ends, ms.
pub const TYPING_TTL_MS: u32 = 6_000;
/// Largest datagram payload either side sends (a typing signal or event is ~20 bytes).
pub const MAX_DATAGRAM_BYTES: u32 = 256;
/// Largest `Chunk::data` of an upload: big enough that one fsync per chunk costs little
/// (fdatasync of 1 MiB appends reaches the disk's throughput here, docs/benchmarks.md),
/// small enough that resending one chunk after a cut is cheap.
pub const MAX_CHUNK_BYTES: u32 = 1024 * 1024;
/// Largest frame a client may send on a transfer stream: a chunk plus its offset,
/// checksum and length prefixes.
pub const MAX_TRANSFER_FRAME_BYTES: u32 = MAX_CHUNK_BYTES + 64;
/// Longest file name in bytes (as most file systems allow).
pub const MAX_FILE_NAME_BYTES: u32 = 255;
/// Longest media type in bytes (RFC 6838: 127 each for type and subtype; we take the
/// whole `type/subtype` at 127).
pub const MAX_CONTENT_TYPE_BYTES: u32 = 127;
/// Most uploads one `ListUploads` page holds, and files one `ListFiles` page (a user has at most the broker's
/// `max_uploads_per_user` in progress, 8 by default; the rest are paged).
pub const MAX_LISTED_UPLOADS: u32 = 64;
/// Most files one message carries.
pub const MAX_FILES_PER_MESSAGE: u32 = 10;
/// Most times one message may be edited. Deleting a message rewrites each of its edits
/// (`Redacted`) in the same step, so without a bound one delete could cost as much as
/// every edit before it together.
pub const MAX_EDITS_PER_MESSAGE: u32 = 100;
/// Most `Event::File` progress pushes per upload and audience per second (the final state
/// is always sent).
pub const FILE_PROGRESS_PER_SECOND: u32 = 4;
/// Time a new connection has, from the end of its QUIC handshake, to send its hello and
/// its whole auth request. Checking the request is not cut off by it.
pub const AUTH_DEADLINE_MS: u32 = 2_000;

// A full history page of maximum-size texts must fit in one server frame, with room
// for per-entry ids and headers (at most 128 bytes each).
const _: () = assert!(HISTORY_PAGE_MAX * (MAX_TEXT_BYTES + 128) <= MAX_SERVER_FRAME_BYTES);
// A catch-up page (entries past the byte budget by at most one maximum-size entry) plus
// every member's receipts must fit in one server frame.
const _: () = assert!(CATCH_UP_PAGE_BYTES + MAX_TEXT_BYTES + 128 + MAX_GROUP_MEMBERS * 40 <= MAX_SERVER_FRAME_BYTES);
// A presence reply must fit in one server frame.
const _: () = assert!(PRESENCE_SNAPSHOT_MAX * (MAX_NAME_BYTES + 32) <= MAX_SERVER_FRAME_BYTES);
const _: () = assert!(MAX_BLOCKED * (MAX_NAME_BYTES + 32) <= MAX_SERVER_FRAME_BYTES);
// A maximum-size send must fit in one client frame.
const _: () = assert!(MAX_TEXT_BYTES + 256 <= MAX_CLIENT_FRAME_BYTES);
// The member list reply must fit in one server frame (id, role and name per member).
const _: () = assert!(MAX_GROUP_MEMBERS * (MAX_NAME_BYTES + 16) <= MAX_SERVER_FRAME_BYTES);
// Pre-auth frames carry a name, a password, a device name, a key and a signature.
const _: () = assert!(2 * MAX_NAME_BYTES + MAX_PASSWORD_BYTES + 128 <= PREAUTH_MAX_FRAME_BYTES);
// A files message holds at most `MAX_TEXT_BYTES` of caption, names and types together
// (`SendFiles`), plus at most 32 bytes of ids, size and prefixes per file: a history page
// and a catch-up page of such entries must still fit in one server frame.
const _: () = assert!(HISTORY_PAGE_MAX * ENTRY_MAX_BYTES <= MAX_SERVER_FRAME_BYTES);
// A `ListUploads` page: each upload its name, media type, id, hash and four varints.
const _: () = assert!(
    MAX_LISTED_UPLOADS * (MAX_FILE_NAME_BYTES + MAX_CONTENT_TYPE_BYTES + 16 + 32 + 64) <= MAX_SERVER_FRAME_BYTES
);
const _: () = assert!(CATCH_UP_PAGE_BYTES + ENTRY_MAX_BYTES + MAX_GROUP_MEMBERS * 40 <= MAX_SERVER_FRAME_BYTES);
