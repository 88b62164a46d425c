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
/// Message writes admitted and not yet answered, over all connections (default of
/// `Config::max_sends_in_flight`): at most ~4 KiB of text each, so ~16 MiB held. A
/// broker acknowledging 10,000 writes/s at a few ms each has tens in flight; thousands
/// means seconds of queue, and one more is refused with `OVERLOADED`.
pub const MAX_SENDS_IN_FLIGHT: usize = 4096;
/// Default of `Config::max_sends_in_flight_per_user`: a sixteenth of
/// `MAX_SENDS_IN_FLIGHT`, so a user with all its sessions (64, each with up to 64
/// requests in flight) holds at most that share, and it takes 16 such users to fill the
/// broker's bound. Far above what one person's devices write at once.
pub const MAX_SENDS_IN_FLIGHT_PER_USER: usize = MAX_SENDS_IN_FLIGHT / 16;
/// Default of `Config::send_delay_target_ms`: a group commit takes 0.5-5 ms on a quiet
/// disk, so writes that all wait longer than this for a whole 100 ms are queueing
/// behind a broker that cannot keep up, not waiting for the disk now and then.
pub const SEND_DELAY_TARGET_MS: u64 = 20;
/// Default of `Config::socket_backlog_target_ms`. Measured (docs/benchmarks.md,
/// "Shedding at the socket"): at 5 ms an earlier form of the rule refused writes during
/// `fanout --ramp` steps that kept p99 under 10 ms and halved the ramp's ceiling; at
/// 20 ms the ceiling stayed within its run-to-run spread, and `direct` past saturation
/// still dropped no datagram.
pub const SOCKET_BACKLOG_TARGET_MS: u64 = 20;
/// Conversation actors alive at once (~7 KB each plus state: ~2 GB at the cap). Idle
/// ones retire after `conversation_idle_ms`; at the cap, a request that would start
/// another gets `OVERLOADED` rather than growing memory without bound, and for
/// `PRESSED_TICKS` ticks after it the actors of the largest holders retire once idle for
/// `1 / PRESSED_IDLE_DIVISOR` of that period, so the places go to whoever needs one now.
pub const MAX_LIVE_CONVERSATIONS: usize = 250_000;
/// Of those, started by one user's writes and read marks, and as many again by its
/// delivered marks (`conversation::Share`; reads start none): 1/64 of the cap each, so
/// at least 31 accounts to fill it, which registration limits per address make slow,
/// and which those accounts cannot hold against others (`PRESSED_IDLE_DIVISOR`). A
/// person is active in far fewer conversations within `conversation_idle_ms` (a
/// minute); a bot in more raises it.
pub const MAX_LIVE_CONVERSATIONS_PER_USER: usize = 4096;
/// While `max_live_conversations` is full, an actor with nothing pending that counts on
/// a share holding at least an even part of the cap (the cap over the shares holding
/// any: on average a full cap's shares hold exactly that, so the largest always do)
/// retires at its tick once idle for `conversation_idle_ms / PRESSED_IDLE_DIVISOR` (7.5
/// s by default) instead of the whole period; until then a user with a few
/// conversations among many who hold thousands keeps its actors. Only a write that
/// appends is activity (not a start, a read, a mark, a resend nor a refused write), so
/// whoever fills the cap must append to each of its conversations to hold it: once per
/// shorter period at any time (for 250,000 actors some 33,000 admitted, durable
/// messages a second), or once a tick timed just before each tick (16,700). An
/// actor that retired early starts again on its next write or mark (its conversation
/// record, newest seq and member list read from the store). With the default period
/// the shorter one is below the tick (a quarter of the period, at most 15 s), so an
/// actor idle since its last tick retires at the next.
pub const PRESSED_IDLE_DIVISOR: u64 = 8;
/// Ticks of a conversation actor (a quarter of `conversation_idle_ms`, 15 s by default)
/// that the shorter idle period of `PRESSED_IDLE_DIVISOR` lasts after the last start
/// refused at `max_live_conversations`: every live actor ticks at least once within it.
pub const PRESSED_TICKS: u64 = 2;
/// Concurrent argon2 computations: each takes `argon2_memory_kib` of memory and a core
/// for tens of milliseconds; more than the cores only queues work and memory.
pub const ARGON2_CONCURRENCY: usize = 2;
/// Password checks that may wait for one of the `ARGON2_CONCURRENCY` slots (the default
/// of `Config::argon2_queue`). A request beyond them is refused at once with `OVERLOADED`
/// (a capacity bound: retry with backoff), which closes its connection during the
/// handshake: so no burst of password requests can queue work for minutes, and a valid
/// login waits for a few hashes at most. Only password requests that pass every cheap
/// check (name, shape, signature, name not taken, allowances) get this far.
pub const ARGON2_QUEUE: usize = 2 * ARGON2_CONCURRENCY;
/// Distinct keys (names tried at login, accounts, source addresses) whose failures are
/// tracked at once, per table (passwords, device signatures, password changes). A
/// password failure is counted only while its hash holds a slot, so that table grows
/// at most `ARGON2_CONCURRENCY` per hash time (at the default cost about 45 failures a
/// second, two keys each: under 6,000 live keys per window). When a table is full even after dropping
/// expired windows, an attempt that would need a new key is refused with
/// `RATE_LIMITED`: a full table fails closed, and no live window is ever evicted, so
/// filling the table cannot lift a limit an account or address has reached.
pub const AUTH_FAILURE_KEYS_MAX: usize = 65_536;
/// Wrong passwords per account per window before password attempts on it are refused.
/// Device signatures never consult this count: guessing a password cannot lock out the
/// account's enrolled devices.
pub const AUTH_FAILURES_PER_ACCOUNT: u32 = 10;
/// Logins with the right password per account per window (`AUTH_FAILURE_WINDOW_MS`),
/// whether or not a device is enrolled after (at `MAX_DEVICES_PER_USER` none may be):
/// past it a login to the account is `RATE_LIMITED` before its password is hashed.
/// Failures are limited apart (`AUTH_FAILURES_PER_ACCOUNT`), but a right password was
/// never counted, so whoever knew one could have the broker hash it over and over, from
/// any number of addresses (the password pool's share per source bounds one address, not
/// many). Twice the devices an account may have: enrolling all of them in a minute fits.
pub const LOGINS_PER_ACCOUNT: u32 = 2 * MAX_DEVICES_PER_USER as u32;
/// Password proofs (`ChangePassword`, `RevokeOtherDevice`) per device per window, right
/// or wrong: each costs a password hash or two, and a signed-in device must not be able
/// to keep the password pool busy (every login and registration of the broker waits on
/// it), nor guess the password faster than this. Counted apart from failed logins, so a
/// stranger's bad logins never stop the owner, and per device (it was per account until
/// 2026-12-07), so a stolen phone's wrong guesses never stop the owner's other devices
/// from changing the password or revoking it.
pub const PASSWORD_PROOFS_PER_DEVICE: u32 = 5;
/// Failed password attempts per source address per window (any account, named or not).
pub const AUTH_FAILURES_PER_ADDRESS: u32 = 30;
/// Default `password_checks_per_address`: passwords a source address may have the broker
/// check per window (`AUTH_FAILURE_WINDOW_MS`), right or wrong, for logins and password
/// changes (an IPv6 /48: `SOURCES_PER_NETWORK` times as many); one more is
/// `RATE_LIMITED` before it takes a turn. Right passwords were counted per account only,
/// so a few addresses with some 60 accounts logging in with their right passwords kept
/// the two hashing slots busy (about 44 hashes a second at 45 ms each), and every other
/// login, registration and the operator's commands were `OVERLOADED` (an attacker
/// review). A minute's worth for a NAT of users enrolling new devices; registrations
/// have their own bound.
pub const PASSWORD_CHECKS_PER_ADDRESS: u32 = 60;
/// An IPv6 /48's allowance of password work, as a multiple of one source's: failed
/// password attempts and registrations from all of its /64 sources together are limited
/// to this many sources' worth (240 failures a minute, a burst of 80 registrations then
/// 8 a minute, by default). A /48 is a site's allocation, which one party can get for
/// free, and holds 65,536 /64 sources: counted per /64 alone, one party could keep the
/// broker's two password-hash slots busy and every other login and registration got
/// `OVERLOADED` (an attacker review). IPv4 addresses are sources and networks at once.
pub const SOURCES_PER_NETWORK: u32 = 8;
/// Bad device signatures (unknown user or device, wrong key) per source address per
/// window; past it a failed proof is `RATE_LIMITED`, a valid one still gets in (only
/// failures meet the budget). A signature cannot be guessed; this slows a peer probing
/// names and device ids, and a valid device behind the same address (a carrier NAT)
/// is never shut out by it.
pub const BAD_SIGNATURES_PER_ADDRESS: u32 = 300;
/// Window for the failure counts.
pub const AUTH_FAILURE_WINDOW_MS: u64 = 60_000;
/// Registrations one source address may make in a burst (default of
/// `Config::registration_burst_per_address`); then one per `REGISTRATION_INTERVAL_MS`.
/// Each costs an argon2 hash and adds an account for good.
pub const REGISTRATION_BURST_PER_ADDRESS: u32 = 10;
/// See `REGISTRATION_BURST_PER_ADDRESS` (default of `Config::registration_interval_ms`).
pub const REGISTRATION_INTERVAL_MS: u64 = 60_000;
/// Source addresses whose registration allowance is tracked at once. At the cap,
/// refilled allowances are dropped (at most once a second); if none has refilled, new
/// addresses' registrations get `RATE_LIMITED`. ~64 bytes each.
pub const REGISTRATION_BUCKETS_MAX: usize = 65_536;
/// Connections not yet authenticated (QUIC handshake, hello, auth request and its
/// checks) at once, by default (`Config::max_unauthenticated_connections`). Counted
/// apart from authenticated sessions (`Config::max_connections`), so connections that
/// never finish their handshake cannot take the places of users. Each holds ~82 KB.
pub const MAX_UNAUTHENTICATED_CONNECTIONS: usize = 1024;
/// Once half of the unauthenticated bound is taken, a new connection must prove its
/// address (a QUIC Retry round trip) and one source address may hold at most this many
/// unauthenticated connections; below half, neither applies (a Retry costs every client
/// a round trip).
pub const UNAUTHENTICATED_PER_ADDRESS: usize = 64;
/// Default `max_connections_per_address`: authenticated connections from one source (an
/// IPv4 address, an IPv6 /64). Without it, accounts from open registration (64
/// connections each, `MAX_SESSIONS_PER_USER`) held every one of `max_connections` from
/// one address, and every other device was refused (an attacker review: about 1,600
/// accounts for 100,000 places). Room for a NAT of a thousand devices at once; an
/// operator whose users share fewer addresses (NAT64, a carrier's pool) raises it.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// An IPv6 /48 (`auth::network`, which one party may hold whole) may hold this many
/// times `max_connections_per_address`.
pub const CONNECTIONS_PER_NETWORK_FACTOR: usize = 8;
/// Time a QUIC handshake may take, from its first packet, by default
/// (`Config::quic_handshake_timeout_ms`). A loss-free handshake takes one or two round
/// trips; this leaves room for several lost flights on a poor link, and frees the place
/// of a peer that never finishes long before the idle timeout would.
pub const QUIC_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// A device enrolled by `Register` or `Login` is unconfirmed until it authenticates
/// on a later connection (proof that its owner learned its id). At the device limit,
/// an enrollment replaces the oldest unconfirmed device enrolled longer ago than this
/// (default of `Config::unconfirmed_device_grace_ms`) and not connected, so enrollments
/// whose answer was lost cannot lock an account out for good, while a device enrolled
/// moments ago (whose owner may be about to reconnect) is kept.
pub const UNCONFIRMED_DEVICE_GRACE_MS: u64 = 10 * 60_000;
/// Devices one account may have enrolled; each login enrolls one, so without a bound
/// a password holder could grow the store without end. Revoke one to enroll another.
pub const MAX_DEVICES_PER_USER: usize = 32;
/// Connections one user may have at once (devices may reconnect before their old
/// connection times out, hence twice the device limit). Bounds one user's share of the
/// broker and the fan-out work per event for that user. Checked during the handshake,
/// before `Authed` is sent or a device enrolled: one more is refused with `RATE_LIMITED`,
/// which closes it like every handshake failure.
pub const MAX_SESSIONS_PER_USER: usize = 2 * MAX_DEVICES_PER_USER;
/// Connections one device may have at once, counted with those in their handshake (the
/// same check as `MAX_SESSIONS_PER_USER`, the same refusal). Without it one device, a
/// stolen phone say, could hold all of its account's `MAX_SESSIONS_PER_USER` places with
/// its key alone, and every other device of the owner, and every login, was refused
/// until it let go, so the owner could not reach `ChangePassword` to sign it out (an
/// attacker review). Sixteen, a quarter of the account's, leave room for a device that
/// reconnects a few times before its old connections time out, and for a script's
/// `sb` commands run at once from one home (a test runs 16).
pub const MAX_SESSIONS_PER_DEVICE: usize = 16;
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
/// A conversation's receipt writes start at most one per this many µs per member (a
/// 1,000-member group: one per 50 ms; under 20 members: unpaced, at the next group
/// commit). Each write is pushed to every member, so however often members mark (a
/// member stepping `MarkRead` through a long history, one `MarkDelivered` naming 256
/// groups), the receipt pushes of one conversation stay under about 20,000 deliveries
/// a second; unpaced, a write per group commit (0.5–2 ms) was up to 2 million a
/// second in a 1,000-member group, from one member's marks, which no write admission
/// counts. Changes meanwhile coalesce into the next write (each member once, latest
/// value); a `MarkRead` waits for its write.
pub const RECEIPT_WRITE_US_PER_MEMBER: u64 = 50;
/// A group's receipt write holds its next one back this many µs more per block key it
/// read (each writer's whole block list, to leave out the members it blocks) and per
/// receipt it put into a frame of its own for such members. A block key read costs
/// about 0.3 µs (release, this 2-vCPU machine, 200 lists of 1,024 scanned five times,
/// 2026-12-07), so the conversation's actor spends about a quarter of its time on
/// this at most, however the members block each other; a member who blocks nobody
/// costs nothing. Before, 100 writers each blocking 1,024 users cost
/// every write of their group about 100,000 key reads, at the member pace, uncharged.
pub const RECEIPT_WRITE_US_PER_BLOCK_UNIT: u64 = 1;
/// Default `member_rows_per_sec`: member rows (a name; a member's receipts and setting)
/// a user's reads that list members (`Members`, `Receipts`, a complete `CatchUp` page,
/// `EntryNames`) may return a second, each a point read or two of the store on the
/// conversation's actor, in line with every member's writes (or on the blocking pool,
/// for a conversation with no live actor). A client that reconnects
/// reads each conversation's receipts once; the burst (`MEMBER_ROWS_BURST_SECS`)
/// covers 40 groups of 1,000 members at once, and `Session` retries past it. At least
/// `MAX_GROUP_MEMBERS`, or one read of the largest group's receipts puts its reader in
/// debt for over a second. Entries have an allowance of their own
/// (`ENTRIES_READ_PER_SEC`).
pub const MEMBER_ROWS_PER_SEC: u32 = 20_000;
/// Member rows one conversation's summary and state is charged (`ConversationStates` a
/// row set each item, and the reads that find an existing direct conversation): its
/// record, membership, last seq, member count, a direct one's peer, receipt, join and
/// four seeks for the unread count, about a dozen store reads against a member row's
/// one or two.
pub const SUMMARY_ROWS: usize = 4;
/// Default `entries_read_per_sec`: log entries a user's `History` and `CatchUp` pages
/// may return a second, after a burst of `ENTRIES_READ_BURST_SECS` seconds' worth
/// (1,000,000 at the default), so a catch-up after a long time offline still runs at
/// the store's pace (about 300,000 entries a second: docs/benchmarks.md, "catchup")
/// while a user reading without end costs a few percent of a core. Each entry costs a
/// few µs of range scan and encoding. Before, entries were not counted, on the ground
/// that the reader must take a page's bytes; it need not (a page of small entries
/// answers small, and a reconnection drops what is queued), and one account's pipelined
/// pages kept a core busy (an attacker review).
pub const ENTRIES_READ_PER_SEC: u32 = 20_000;
/// Seconds of `entries_read_per_sec` a user may read in one burst.
pub const ENTRIES_READ_BURST_SECS: f64 = 50.0;
/// Seconds of `member_rows_per_sec` a user may read in one burst: also about the most
/// one user's reads may hold one actor at once (40,000 rows, up to 80,000 store reads).
pub const MEMBER_ROWS_BURST_SECS: f64 = 2.0;
/// Users whose member-rows allowance is tracked at once (as `CREATION_BUCKETS_MAX`); a
/// user's bucket may be dropped once it has refilled, `rows / member_rows_per_sec`
/// seconds after its last such read.
pub const MEMBER_ROWS_BUCKETS_MAX: usize = 65_536;
/// Default `writes_per_sec`: conversation log writes (a message, a file message, an
/// edit, a delete, a membership or title change) one user may make a second, over all
/// its devices, with a burst of `WRITE_BURST_SECS` seconds' worth (200). A person
/// writes a few a minute, a client flushing what it wrote offline a few dozen at once;
/// before there was no rate at all, only `max_sends_in_flight_per_user` in flight, and
/// one account could write as fast as the broker acknowledged into a group of strangers
/// it had added (256 at a time), closing their devices as slow consumers and filling
/// the disk (an attacker review). Matrix's Synapse limits messages per user the same
/// way (`rc_message`, far lower by default); a bot or bridge needs it raised.
pub const WRITES_PER_SEC: u32 = 20;
/// Seconds of `writes_per_sec` one user may write in a burst.
pub const WRITE_BURST_SECS: f64 = 10.0;
/// Users whose write allowance is tracked at once: those whose bucket has not refilled
/// since they last wrote (a twentieth of a second after one write at the default rate,
/// `WRITE_BURST_SECS` after a whole burst; a bucket refilled may be dropped). At the cap a user without a bucket
/// is refused `OVERLOADED` (a broker-wide bound, not the user's doing) until one is
/// dropped. 48 bytes or so each: about 12 MiB full.
pub const WRITE_BUCKETS_MAX: usize = 262_144;
/// Store jobs one user's requests run at once, over all the user's sessions, for the
/// requests served off the conversation actors on the runtime's shared blocking pool:
/// conversation and device lists, blocks, settings, presence, file and upload lists and
/// states, and the file requests whose checks read the store there (`BeginUpload`,
/// `SendFiles`, `DeleteFile`, `WithdrawFile`). A session whose next request is such a
/// job waits for a slot before it takes the request (and so stops reading its control
/// stream, as at the in-flight cap); the slot is held until the answer is sent, so
/// through a group commit for the requests that wait for one. Before, one user's 64
/// sessions with 64 requests in flight each could queue 4,096 page reads (a
/// `ConversationStates` page is up to ~2,500 point reads) ahead of every other user's
/// reads and every password hash, which share that pool. A client reads such lists one
/// page after another; the reference client asks about four files at once. A user's
/// conversation reads take these slots too, once the session has handed them on
/// (`ConvDirectory::read`): answered at rest on the pool, or by a live actor on its
/// runtime thread, where before they queued in its mailbox without a bound of their
/// own, ahead of its members' writes.
pub const STORE_JOBS_PER_USER: usize = 4;
/// Catalog writes (registrations, enrollments, revocations, new conversations) queued
/// for the catalog thread at once; more wait for a slot without holding anything.
pub const CATALOG_QUEUE: usize = 64;
/// Minimum password length at registration.
pub const MIN_PASSWORD_BYTES: usize = 8;
/// Largest frame the broker reads in one QUIC chunk read.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The slowest a chunk being received may arrive and keep its bytes of
/// `transfer_buffer_bytes` while another stream waits for them, bytes per second: from
/// when its bytes were granted (at its frame header) it must have received this many for
/// every second past `CHUNK_LEASE_GRACE`. A chunk that falls behind while a stream has
/// waited `files::budget::WAIT_BEFORE_CLAIMING` for the budget gives its bytes up: its
/// stream is reset with `CHUNK_TOO_SLOW` (also while the broker waits to write it a
/// reply) and the client resumes from the durable offset. Only as many chunks as the
/// waiting streams need lose theirs, roughly the first to fall behind first; while
/// nobody waits, a slow chunk keeps its bytes up to the progress deadline. Without it, a
/// frame header alone held a whole chunk's bytes for `transfer_progress_secs` (30 s),
/// and some twenty accounts sending only headers kept every other upload waiting; now
/// holding bytes costs sending 64 KiB/s per MiB held. At this rate a 1 MiB chunk has
/// 18 s.
pub const MIN_CHUNK_BYTES_PER_SEC: u64 = 64 * 1024;
/// An upload chunk shorter than this that does not end its file, or any chunk of a file
/// shorter than this, is a *small chunk*: its fdatasync waits its turn among all small
/// chunks' (`small_chunk_syncs_per_sec`).
/// Each chunk costs the broker one fdatasync of its partial file whatever its length,
/// so a client sending 1-byte chunks made the disk sync once per byte it sent: a few
/// streams of them kept the disk busy with syncs that every group commit (every chat
/// message's acknowledgement) then queued behind. At this length a client's chunks cost
/// at most four times the syncs per byte of the reference client's (1 MiB, `chunk_max`);
/// the reference client goes this small only after a stream fell below 64 KiB/s.
pub const SMALL_CHUNK_BYTES: u64 = 256 * 1024;
/// The default of `small_chunk_syncs_per_sec`: small chunks' fdatasyncs a second over
/// all uploads (a sixth of the ~1,650 fdatasyncs a second the disk of DESIGN.md takes),
/// enough for 256 uploads each at the 64 KiB/s lease rate in 64 KiB chunks.
pub const SMALL_CHUNK_SYNCS_PER_SEC: u64 = 256;
/// The allowance a chunk has before `MIN_CHUNK_BYTES_PER_SEC` counts (a congestion
/// window growing from its start, a broker busy for a moment).
pub const CHUNK_LEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Default of `Config::presence_coalesce_ms`: at most one presence push per user per this
/// many ms (the latest state wins; a trailing push follows a suppressed change), so a
/// device that flaps costs each observer at most four events a second.
pub const PRESENCE_COALESCE_MS: u64 = 250;
/// How often the stored last-seen time of every user with a device connected is moved
/// to now (ms): it is otherwise written only at a presence push, so a broker that crashed
/// (or was killed) showed users connected for days as last seen when they came online.
/// After a crash a user's last-seen is at most this old; one key write per connected user
/// per period, riding the next group commit.
pub const LAST_SEEN_REFRESH_MS: u64 = 60_000;
/// How long after a start the users who had a device connected when the broker last
/// stopped cleanly are shown as they were, unless a device of theirs connects first
/// (ms): then offline, last seen at the stop. Clients reconnect within a second of a
/// restart (`RESTART_RETRY_MAX_MS` of the client library), a phone on a slow network
/// within a few; past this the user is offline for real.
pub const PRESENCE_RESTART_GRACE_MS: u64 = 10_000;
/// Presumptions after a restart end over this long past `PRESENCE_RESTART_GRACE_MS`
/// (ms), spread by user id: those users who do not come back are pushed offline over
/// 5 s, not all in one go (each push reads the user's contacts).
pub const PRESENCE_RESTART_SPREAD_MS: u64 = 5_000;
/// A clean stop longer ago than this (ms) presumes nothing at the next start: every
/// device was told `GOING_AWAY`, and a broker down for longer than a restart has its
/// users offline for real.
pub const PRESENCE_RESTART_MAX_DOWN_MS: u64 = 60_000;
/// Users kept in the record of who was connected at a stop (at most 11 bytes each: 1.1 MB
/// at most); past it the rest are not presumed (they go offline and back across the
/// restart, as all users did before the record).
pub const PRESENCE_AT_STOP_MAX: usize = 100_000;
/// Presence pushes one user may make in quick succession, and after them at most one per
/// `PRESENCE_PUSH_WINDOWS` coalescing windows (2 s by default) until the burst refills:
/// each push goes to up to `PRESENCE_CONTACTS_MAX` users, and `SetPresence` costs
/// nothing to send, so the coalescing window alone let one account flapping its
/// presence cost the broker four pushes a second to every contact, forever. A change
/// is never dropped, only pushed later (the latest state wins).
pub const PRESENCE_PUSH_BURST: u64 = 8;
/// See `PRESENCE_PUSH_BURST`.
pub const PRESENCE_PUSH_WINDOWS: u64 = 8;
/// Most contacts (users who share a conversation) kept for one user's presence. Past it
/// the contacts found first (by ascending conversation id) are kept and the rest neither
/// receive that user's presence pushes nor see that user in a `Presence` reply. 8 bytes
/// each: at most 32 KiB per online user; a user can be added to groups by anyone, so the
/// set must not grow with what others do. A snapshot (`Presence { users: [] }`) answers
/// all of them.
pub const PRESENCE_CONTACTS_MAX: usize = switchboard_protocol::limits::PRESENCE_SNAPSHOT_MAX as usize;
/// Contact ids kept in presence's cache of contact sets over all users (8 bytes each:
/// 64 MiB). Without it every online user could be made to hold `PRESENCE_CONTACTS_MAX`
/// (32 KiB, where an idle connection costs 34 KiB) by strangers adding it to groups;
/// past it a set is built for each push or request and not kept.
pub const PRESENCE_CACHED_CONTACTS_MAX: usize = 8 << 20;
/// Most conversations listed to build one user's contact set (each one key read, its
/// member count, then one member scan, smallest first, within `PRESENCE_MEMBERS_SCANNED`);
/// bounds the store work per build. Conversations past it (by id) are not looked at.
/// 4,096: a stranger's two-member groups (one made a second after a burst of 20,
/// `CONVERSATION_CREATE_PER_S`) take over an hour to crowd a user's later conversations
/// out of the list.
pub const PRESENCE_CONVERSATIONS_SCANNED: usize = switchboard_protocol::limits::PRESENCE_CONVERSATIONS_SCANNED as usize;
/// Most member keys read to build one user's contact set, over all its conversations:
/// without it, 1024 groups sharing the same 999 members (anyone can add anyone) cost
/// about a million reads per build without reaching `PRESENCE_CONTACTS_MAX`. 16,384
/// reads take a few ms; members past it are not looked at.
pub const PRESENCE_MEMBERS_SCANNED: usize = switchboard_protocol::limits::PRESENCE_MEMBERS_SCANNED as usize;
/// Whole reads of one user's contact set again after changes made it short (more joined
/// its conversations than `PRESENCE_PENDING_MAX` since its last use, a block ended, or
/// one who left a conversation of its may share another):
/// a burst of this many, then one per `PRESENCE_REBUILD_INTERVAL_MS`; past it the short
/// set is used as it is (it may lack a new contact, never holds a former one). Others
/// change a user's conversations as often as they like (anyone can add anyone to
/// groups), and each read is up to `PRESENCE_MEMBERS_SCANNED` keys. A user's first read,
/// and one after its set was evicted from the cache (`PRESENCE_CACHED_CONTACTS_MAX`),
/// are not counted.
pub const PRESENCE_REBUILD_BURST: u64 = 3;
/// See `PRESENCE_REBUILD_BURST`: 30 s.
pub const PRESENCE_REBUILD_INTERVAL_MS: u64 = 30_000;
/// Users who joined a user's conversations since its contact set was read, kept to be
/// checked at the set's next use (two key reads each) rather than reading it whole; a
/// change past it marks the set short (`PRESENCE_REBUILD_BURST`). 64: a direct
/// conversation or a group of friends made or grown, 8 bytes each.
pub const PRESENCE_PENDING_MAX: usize = 64;
/// Keys the broker reads per second, over all users, to read short contact sets again
/// whole (`PRESENCE_REBUILD_BURST`); past it, and its burst, a short set is used as it
/// is until the allowance is back within its burst (its pending contacts are still
/// checked, two keys each). Every whole read is charged, first reads included (those
/// always run: a user needs a set). 200,000 keys: about a tenth of a core of point reads
/// on this machine; one creation of a 1,000-member group can make a thousand sets
/// short, each up to about 38,000 keys to read (4,096 conversations, 16,384 members, a
/// block key per member and the user's own blocks; an attacker review).
pub const PRESENCE_WHOLE_READ_KEYS_PER_S: u64 = 200_000;
/// See `PRESENCE_WHOLE_READ_KEYS_PER_S`: a burst of a million keys (5 s of it). Charges
/// are held within twice the burst, so a crowd of first reads after a start holds
/// re-reads back for at most 10 s.
pub const PRESENCE_WHOLE_READ_BURST_KEYS: u64 = 1_000_000;
/// Keys a whole re-read is charged when it is let through, settled once it ran, so
/// re-reads let through together see each other's cost (charging only after let a
/// crowd of them through at once).
pub const PRESENCE_WHOLE_READ_ESTIMATE_KEYS: usize = 4096;
/// Conversations one user may be shown typing in at once; a start beyond it is dropped.
/// One while `TYPING_ENTRIES_MAX` is half taken, so filling the table takes tens of
/// thousands of accounts typing, not 4,096.
pub const TYPING_PER_USER_MAX: usize = 16;
/// Typing indicators alive at once in the whole broker (~100 bytes each, and 16 per
/// typing device); a start beyond it is dropped until some expire.
pub const TYPING_ENTRIES_MAX: usize = 65_536;
/// Uploads a user may begin holding room on the disk (`switchboard_storage`'s
/// `promises`): a burst of this many, then `UPLOAD_HOLDS_PER_HOUR`. A begin beyond it is
/// taken, but holds no room until its first 4 MiB are stored, so cancelling and
/// beginning uploads again and again holds no room for nothing (an attacker's review).
pub const UPLOAD_HOLDS_BURST: f64 = 8.0;
/// See `UPLOAD_HOLDS_BURST`: 16 an hour, twice a user's uploads in progress.
pub const UPLOAD_HOLDS_PER_HOUR: f64 = 16.0;
/// Users whose allowance of holds is tracked at once; a user beyond (the table full of
/// allowances still refilling) begins its uploads without a hold.
pub const UPLOAD_HOLD_ALLOWANCES_MAX: usize = 65_536;
/// Devices that connected and wait to be told the typing indicators standing in their
/// conversations (`typing::Typing::session_started`); one more connecting is told none
/// (as if its starts were lost datagrams: it sees a typist from the typist's next
/// change). Served by the typing pusher, one after another.
pub const TYPING_SNAPSHOTS_WAITING_MAX: usize = 1024;
/// When at most this many conversations have an indicator standing, a connecting
/// device's snapshot reads its membership in each (one key each); with more, it reads
/// its own conversations instead (one key each, as many as it has, so a typical user's
/// few dozen), at most `PRESENCE_CONVERSATIONS_SCANNED` of them (the first by id), and
/// indicators in its later ones are not told.
pub const TYPING_SNAPSHOT_MEMBER_READS: usize = 32;
/// Most typists one snapshot looks at (each costs a block check and a member check),
/// told or not (its own user, users either side blocks).
pub const TYPING_SNAPSHOT_EXAMINED: usize = 256;
/// Most indicators one snapshot tells: a frame each, queued at once on a queue that may
/// be as short as 128 frames (`outbound_max_frames`), which must not overflow it.
pub const TYPING_SNAPSHOT_MAX: usize = 32;
/// Snapshots served per drain of the typing pusher; more wait for its next drain, so
/// pushes of typing changes are not held up behind a crowd connecting.
pub const TYPING_SNAPSHOTS_PER_DRAIN: usize = 32;
/// Sessions (devices) of one user tracked as typing in one conversation: the indicator
/// stands while any of them is typing. A start from one more replaces the session whose
/// typing ends soonest (the indicator stands either way; that session's stop then ends
/// nothing). 8 × 16 bytes per indicator at most.
pub const TYPING_SESSIONS_PER_INDICATOR: usize = 8;
/// Typing signals one user may send in a burst, and per second after it, from all of
/// its devices together; signals beyond are dropped. A start or stop fans out to up to
/// `MAX_GROUP_MEMBERS` devices' users, so this (with "only changes are pushed") bounds
/// what one user amplifies, however many devices it connects.
pub const TYPING_SIGNAL_BURST: f64 = 8.0;
/// See `TYPING_SIGNAL_BURST`.
pub const TYPING_SIGNALS_PER_S: f64 = 2.0;
/// Users whose typing allowance is tracked at once. A bucket refills within 4 s of its
/// user's last signal; at the cap, refilled buckets are dropped (at most once a second)
/// and, if none has, signals of users without one are dropped. ~64 bytes each, ~4 MiB at
/// most.
pub const TYPING_ALLOWANCES_MAX: usize = 65_536;
/// Datagram bytes quinn may hold for one connection, each way. A typing datagram is
/// ~10 bytes (+ ~40 of quinn's bookkeeping), so this holds a burst of dozens; when full
/// the oldest is dropped (typing is ephemeral). quinn allocates these queues lazily, so
/// an idle connection pays nothing for them. Larger than `MAX_DATAGRAM_BYTES` so that an
/// oversized datagram is dropped by the broker rather than closing the connection.
pub const DATAGRAM_BUFFER_BYTES: usize = 4096;

// A user's connections must fit the devices it may have, each reconnecting once.
const _: () = assert!(MAX_SESSIONS_PER_USER >= MAX_DEVICES_PER_USER);
// A password change that signs out every other device keeps every one's revoked key.
const _: () = assert!(switchboard_storage::REVOKED_KEYS_KEPT >= MAX_DEVICES_PER_USER);
// Under load one address must not be able to hold every unauthenticated place.
const _: () = assert!(UNAUTHENTICATED_PER_ADDRESS * 2 <= MAX_UNAUTHENTICATED_CONNECTIONS);

// Outbound must be able to hold at least one maximum-size server frame.
const _: () = assert!(OUTBOUND_MAX_BYTES >= switchboard_protocol::limits::MAX_SERVER_FRAME_BYTES as usize * 2);
// A datagram of the largest allowed size fits quinn's buffer with its bookkeeping.
const _: () = assert!(DATAGRAM_BUFFER_BYTES >= 4 * switchboard_protocol::limits::MAX_DATAGRAM_BYTES as usize);

/// How many of something each user (or other key: a source address, a pair of users)
/// holds now (writes in flight, transfer streams, password turns, blocks being made),
/// for shares of a broker-wide bound. A key's entry goes when its count returns to 0, so
/// the map holds one entry per key holding at least one: it is bounded by the things
/// counted, never by how many keys ever came.
#[derive(Clone, Debug)]
pub struct PerUser<K = switchboard_protocol::UserId>(std::collections::HashMap<K, usize>);

impl<K> Default for PerUser<K> {
    fn default() -> Self {
        PerUser(std::collections::HashMap::new())
    }
}

impl<K: std::hash::Hash + Eq + Copy> PerUser<K> {
    /// Counts one more for `user` if it holds fewer than `max`; whether it did.
    pub fn take(&mut self, user: K, max: usize) -> bool {
        if self.held(user) >= max {
            return false;
        }
        *self.0.entry(user).or_insert(0) += 1;
        true
    }

    /// Counts one fewer for `user` (nothing if it holds none).
    pub fn give_back(&mut self, user: K) {
        if let Some(n) = self.0.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&user);
            }
        }
    }

    /// What `user` holds now.
    pub fn held(&self, user: K) -> usize {
        self.0.get(&user).copied().unwrap_or(0)
    }

    /// Users holding at least one (the map's size).
    pub fn users(&self) -> usize {
        self.0.len()
    }
}
