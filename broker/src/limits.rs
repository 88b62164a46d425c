//! The broker's own bounds (the protocol's are in `switchboard_protocol::limits`). Each
//! queue or map a client can grow is capped here, with the reason for its size.

/// Frames queued for one device before it counts as a slow consumer. At 256-byte
/// events this is ~1 MiB; a device this far behind catches up faster by reconnecting.
pub const OUTBOUND_MAX_FRAMES: usize = 4096;
/// Bytes queued for one device before it counts as a slow consumer. A few full
/// history pages fit; an unread torrent of events does not.
pub const OUTBOUND_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Messages waiting in one conversation actor's mailbox. Senders beyond this get
/// `OVERLOADED` instead of growing the mailbox (ractor mailboxes are unbounded).
pub const CONVERSATION_MAILBOX_MAX: usize = 16 * 1024;
/// Conversation actors alive at once (~7 KB each plus state: ~2 GB at the cap). Idle
/// ones retire after `conversation_idle_ms`; at the cap, a request that would start
/// another gets `OVERLOADED` rather than growing memory without bound.
pub const MAX_LIVE_CONVERSATIONS: usize = 250_000;
/// Concurrent argon2 computations: each takes `argon2_memory_kib` of memory and a core
/// for tens of milliseconds; more than the cores only queues work and memory.
pub const ARGON2_CONCURRENCY: usize = 2;
/// Distinct keys (accounts, addresses) whose failed logins are tracked at once.
pub const AUTH_FAILURE_KEYS_MAX: usize = 65_536;
/// Failed logins per account per window before further attempts are refused.
pub const AUTH_FAILURES_PER_ACCOUNT: u32 = 10;
/// Failed logins per source address per window.
pub const AUTH_FAILURES_PER_ADDRESS: u32 = 30;
/// Window for the failure counts.
pub const AUTH_FAILURE_WINDOW_MS: u64 = 60_000;
/// Devices one account may have enrolled; each login enrolls one, so without a bound
/// a password holder could grow the store without end. Revoke one to enroll another.
pub const MAX_DEVICES_PER_USER: usize = 32;
/// Connections one user may have at once (devices may reconnect before their old
/// connection times out, hence twice the device limit). Bounds one user's share of the
/// broker and the fan-out work per event for that user.
pub const MAX_SESSIONS_PER_USER: usize = 2 * MAX_DEVICES_PER_USER;
/// Conversations one user may create in a burst, and the rate the allowance refills at
/// (per second). Creating one is a catalog write (a sled batch, which holds up every
/// other store access while it waits for a flush) and adds to the store for good, so a
/// client looping on it must not slow everyone else down or fill the disk at line rate.
pub const CONVERSATION_CREATE_BURST: f64 = 20.0;
/// See `CONVERSATION_CREATE_BURST`.
pub const CONVERSATION_CREATE_PER_S: f64 = 1.0;
/// Users whose creation allowance is tracked at once. At the cap, buckets that have
/// refilled (20 s after their user's last creation) are dropped, at most once a second;
/// if none has, new users' creations get `RATE_LIMITED`. ~64 bytes each, ~4 MiB at most.
pub const CREATION_BUCKETS_MAX: usize = 65_536;
/// Catalog writes (registrations, enrollments, revocations, new conversations) queued
/// for the catalog thread at once; more wait for a slot without holding anything.
pub const CATALOG_QUEUE: usize = 64;
/// Minimum password length at registration.
pub const MIN_PASSWORD_BYTES: usize = 8;
/// Largest frame the broker reads in one QUIC chunk read.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

// Outbound must be able to hold at least one maximum-size server frame.
const _: () = assert!(OUTBOUND_MAX_BYTES >= switchboard_protocol::limits::MAX_SERVER_FRAME_BYTES as usize * 2);
