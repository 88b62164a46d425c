//! Broker configuration: built-in defaults, optionally a TOML file, then flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything the broker needs to run. `Config::default()` is the zero-config broker.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Data directory: sled store, certificate, blobs.
    pub data_dir: PathBuf,
    /// PEM certificate chain; with `key`, replaces the generated self-signed one.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Anyone may register (`true`) or only operators add users (`false`).
    pub registration_open: bool,
    /// argon2id memory cost in KiB (OWASP: 19 MiB).
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    pub argon2_iterations: u32,
    /// Password checks that may wait for a hashing slot; beyond this they are refused
    /// with `OVERLOADED` (see `limits::ARGON2_QUEUE`).
    pub argon2_queue: usize,
    /// Registrations one source address (an IPv6 /64) may make in a burst.
    pub registration_burst_per_address: u32,
    /// After the burst, one more registration per address every this many ms.
    pub registration_interval_ms: u64,
    /// At the device limit, an enrollment replaces the oldest device that never
    /// authenticated on a later connection and was enrolled longer ago than this.
    pub unconfirmed_device_grace_ms: u64,
    /// sled page cache in bytes.
    pub store_cache_bytes: u64,
    /// How long a group commit that a message write asked for waits, counted from that
    /// write, so that messages arriving meanwhile share its flush and fdatasync, µs (0:
    /// at once, the default; at most `MAX_COMMIT_DELAY_US`, and below half of
    /// `send_delay_target_ms` when that rule is on). Fewer thread wakeups and less CPU
    /// per message at a steady rate, each acknowledgement whose commit waited later by
    /// about this much (every one with `commit_siblings` 0); other writes (files,
    /// accounts, receipts) end the wait at once. docs/benchmarks.md ("Commit delay").
    pub commit_delay_us: u64,
    /// The commit delay is waited only when at least this many other message writes are
    /// already waiting for the commit (those that arrived while the last one ran: a
    /// measure of the rate); 0: always. Without `commit_delay_us` it does nothing. Like PostgreSQL's `commit_siblings`: a message
    /// on a quiet broker is not held back for company that is not coming.
    /// docs/benchmarks.md ("Commit siblings").
    pub commit_siblings: u32,
    /// QUIC idle timeout: an abrupt disconnect is noticed within this (the effective
    /// timeout is the smaller of this and the client's). The broker sends a keep-alive
    /// after a third of it without traffic, so clients stay connected however short it is.
    pub idle_timeout_ms: u64,
    /// At most one presence push per user per this many ms (latest state wins, a trailing
    /// push follows); see `limits::PRESENCE_COALESCE_MS`.
    pub presence_coalesce_ms: u64,
    /// A typing indicator not repeated for this long ends, with a pushed "stopped".
    pub typing_ttl_ms: u64,
    /// A conversation actor with nothing pending and no write that appended for this
    /// long stops (the next write or mark restarts it; reads meanwhile are answered from
    /// the store). An eighth of it at the cap of `max_live_conversations` for its
    /// largest holders (`limits::PRESSED_IDLE_DIVISOR`).
    pub conversation_idle_ms: u64,
    /// Most authenticated connections at once; beyond this new ones are refused.
    pub max_connections: usize,
    /// Passwords one source address (an IPv4 address or an IPv6 /64) may have checked a
    /// minute, right or wrong (`Login`, `ChangePassword`), eight times as many from one
    /// IPv6 /48; one more is `RATE_LIMITED`. 0: no such bound (`Config::ephemeral`).
    /// Default `limits::PASSWORD_CHECKS_PER_ADDRESS`.
    pub password_checks_per_address: u32,
    /// Most authenticated connections from one source (an IPv4 address or an IPv6 /64)
    /// at once, and eight times as many from one network (an IPv6 /48); one more is
    /// refused before its handshake, or closed `RATE_LIMITED` once authenticated. 0: no
    /// such bound (`Config::ephemeral`: a load test connects thousands of clients from
    /// 127.0.0.1). Default `limits::MAX_CONNECTIONS_PER_ADDRESS`.
    pub max_connections_per_address: usize,
    /// Most connections not yet authenticated (QUIC handshake, hello, auth request) at
    /// once, counted apart from `max_connections`; past half of it new addresses must
    /// answer a QUIC Retry (see `limits::MAX_UNAUTHENTICATED_CONNECTIONS`).
    pub max_unauthenticated_connections: usize,
    /// Time a QUIC handshake may take before the attempt is dropped.
    pub quic_handshake_timeout_ms: u64,
    /// Frames queued for one device before it is disconnected as a slow consumer.
    pub outbound_max_frames: usize,
    /// Bytes queued for one device before it is disconnected as a slow consumer.
    pub outbound_max_bytes: usize,
    /// Requests waiting in one conversation actor's mailbox; beyond this a request to
    /// that conversation is answered `OVERLOADED` (default `CONVERSATION_MAILBOX_MAX`).
    pub conversation_mailbox_max: usize,
    /// Conversation actors alive at once; a request that would start another is
    /// answered `OVERLOADED`, and idle actors then retire sooner for a while
    /// (`limits::PRESSED_IDLE_DIVISOR`; default `MAX_LIVE_CONVERSATIONS`).
    pub max_live_conversations: usize,
    /// Of those, actors one user's writes and read marks started and that are still
    /// alive, and as many again for its delivered marks (`conversation::Share`); a
    /// request of that user that would start another on a full share is answered
    /// `OVERLOADED`, other users' are still served (default
    /// `MAX_LIVE_CONVERSATIONS_PER_USER`). An actor counts for whoever started it, then
    /// for the user of its newest write that appended (or, kept alive by marks' writes
    /// alone, of its newest mark) at each of its ticks (a quarter of
    /// `conversation_idle_ms`), until it retires. Reads start none.
    pub max_live_conversations_per_user: usize,
    /// Member rows a user's reads that list members (`Members`, `Receipts`, a complete
    /// `CatchUp` page, `EntryNames`; and the memberships a file's access check reads,
    /// `files::requests::readable`) may return a second, with a burst of
    /// `MEMBER_ROWS_BURST_SECS` seconds' worth; past it such reads (all `CatchUp` pages
    /// included) are answered `RATE_LIMITED` until the allowance refills (default
    /// `MEMBER_ROWS_PER_SEC`).
    pub member_rows_per_sec: u32,
    /// Log entries (`History` and `CatchUp` pages) one user's reads may return a second,
    /// with a burst of `limits::ENTRIES_READ_BURST_SECS` seconds' worth; past it such
    /// reads are answered `RATE_LIMITED` until the allowance refills (default
    /// `limits::ENTRIES_READ_PER_SEC`).
    pub entries_read_per_sec: u32,
    /// Conversation log writes (`Send`, `SendFiles`, `Edit`, `Delete` and membership and
    /// title changes) one user may make a second over all its devices, with a burst of
    /// `WRITE_BURST_SECS` seconds' worth; one more is answered `RATE_LIMITED` before it
    /// is admitted (default `limits::WRITES_PER_SEC`). 0: no limit (`Config::ephemeral`,
    /// which tests and the load harness start, has one nothing reaches).
    pub writes_per_sec: u32,
    /// Conversation log writes (`Send`, `SendFiles`, `Edit`, `Delete` and membership
    /// changes) admitted and not yet answered, over all connections; one more is
    /// answered `OVERLOADED` at once (`overload.rs`; default
    /// `limits::MAX_SENDS_IN_FLIGHT`).
    pub max_sends_in_flight: usize,
    /// Message writes of one user (over all its connections) admitted and not yet
    /// answered; one more of that user's is answered `OVERLOADED` at once, other users'
    /// are still admitted (default `limits::MAX_SENDS_IN_FLIGHT_PER_USER`; at least 1).
    /// Lower it with `max_sends_in_flight`.
    pub max_sends_in_flight_per_user: usize,
    /// When every message write applied (answered `Ok`; refused ones are not timed)
    /// during 100 ms waited longer than this from admission to its answer (a standing
    /// queue: the broker is short of CPU or disk), new ones are answered `OVERLOADED`
    /// until one is answered within it again, ms.
    /// 0 turns this rule off (`max_sends_in_flight` still applies).
    pub send_delay_target_ms: u64,
    /// While a connection's UDP socket has had a queue (every read of it returned a full
    /// batch, `overload::SocketBacklog`) for longer than this, message writes arriving
    /// on that socket are answered `OVERLOADED`: the runtime is behind the network, and
    /// the kernel drops datagrams once the socket's buffer is full, ms (default
    /// `limits::SOCKET_BACKLOG_TARGET_MS`, 20). Whatever fills the socket counts: a flood
    /// of datagrams that keeps it queued gets writes arriving there refused too (which
    /// frees only the CPU they would have taken). On Linux only (elsewhere quinn reads
    /// one datagram per call and a read cannot tell a queue). 0 turns this rule off.
    pub socket_backlog_target_ms: u64,
    /// UDP sockets sharing the listen port (SO_REUSEPORT), each with its own QUIC
    /// endpoint. More than one spreads receive work and buffering, at the cost of QUIC
    /// connection migration (see `tls::bind_udp`).
    pub udp_sockets: usize,
    /// Threads of the async runtime (sessions, conversations, QUIC) that the
    /// `switchboard` binary starts; 0: one per core, tokio's default. The committer,
    /// catalog and blocking threads are apart from these. 1 on a machine of two cores or
    /// fewer saves the wakeups of work handed between two runtime threads (measured,
    /// docs/benchmarks.md "One runtime thread"), at the cost of the ceiling when the
    /// broker has the machine to itself. At most `MAX_RUNTIME_WORKERS`.
    pub runtime_workers: usize,
    /// The Linux scheduling policy of the async runtime's threads (workers and blocking
    /// pool): `batch` (default) puts each under `SCHED_BATCH` as it starts, if it runs
    /// under `SCHED_OTHER` (a policy set by whoever started the broker, `chrt` or
    /// systemd's `CPUSchedulingPolicy`, is left as it is); `normal` leaves every thread
    /// under the policy the process started with. A `batch` thread woken does not preempt
    /// the thread running on its core: it runs when that one blocks or its slice ends,
    /// so the work a wakeup brings meets more work already queued. Measured on two cores
    /// (docs/benchmarks.md, "Runtime threads that do not preempt"): a third fewer context
    /// switches per message at 1,000 messages a second into 10 members, about half at
    /// 100 members and at `groups`, 3–20% less CPU per message at those; latency within
    /// the runs' spread except perhaps a tenth on the p99 at 100 members. Same nice value;
    /// not a real-time policy, no privilege needed. Elsewhere than Linux: ignored.
    /// Threads the runtime's threads start (`sb-catalog`, `sb-announce`, some of sled's
    /// I/O threads) inherit the policy; the committer, started with the store, does not.
    pub runtime_scheduling: Scheduling,
    /// Largest file `BeginUpload` accepts, bytes (`FILE_TOO_LARGE` beyond).
    pub max_file_bytes: u64,
    /// Bytes one user may store: the declared size of its uploads in progress plus the
    /// size of its complete files still stored (`QUOTA_EXCEEDED` beyond).
    pub quota_bytes: u64,
    /// Uploads one user may have in progress at once (`TOO_MANY_UPLOADS` beyond).
    pub max_uploads_per_user: usize,
    /// Free space the data dir's disk keeps: an upload that would leave less is refused
    /// with `STORAGE_FULL`, bytes. Above 0 the disk also keeps one inode in a hundred
    /// free (`files::requests::INODE_RESERVE_DIVISOR`).
    pub disk_reserve_bytes: u64,
    /// An upload not complete this many seconds after it began is removed with its data.
    pub upload_expiry_secs: u64,
    /// The disk space promised to an upload in progress (what `STORAGE_FULL` counts
    /// besides the free space) holds this many seconds after the upload began and after
    /// each 4 MiB it stores, then lapses until its next 4 MiB: uploads declared and not
    /// sent stop holding the disk against everyone else's (`switchboard_storage`'s
    /// `promises` module says why). Taken as `upload_expiry_secs` where that is shorter.
    pub upload_promise_secs: u64,
    /// How fast deleted file bytes are freed on the disk, bytes a second (in 4 MiB cuts,
    /// each fdatasynced: `files::blobs::remove_paced` says why; 32 MiB/s spared the
    /// group commit's fdatasyncs on a disk with online discard). Until freed they count
    /// against their user's quota and the free space the disk check sees.
    pub delete_bytes_per_sec: u64,
    /// Small upload chunks (shorter than `limits::SMALL_CHUNK_BYTES`, 256 KiB, and not
    /// their file's last, or any chunk of a file smaller than that) are written and
    /// fdatasynced at most this many a second over all uploads; one beyond waits its turn
    /// (its stream reads nothing meanwhile), so small files complete at most this many a
    /// second too. Chunks of
    /// 256 KiB or more never wait (the reference client sends 1 MiB, halving only on a
    /// link below 64 KiB/s).
    pub small_chunk_syncs_per_sec: u64,
    /// Transfer streams a connection may have open at once, next to its control stream
    /// (PROTOCOL.md section 12). Each connection's flow-control window is one 256 KiB
    /// stream window per stream that may be open (1 MiB with the default 3), so
    /// transfers cannot take the control stream's share.
    pub max_transfer_streams: u32,
    /// A transfer stream on which nothing moves this long (no bytes read from the
    /// client, none written to it) is reset with `TIMEOUT`, seconds.
    pub transfer_progress_secs: u64,
    /// Transfer streams the broker serves at once, over all connections; one more is
    /// reset with `OVERLOADED`, unless a stream served fell behind
    /// `limits::MIN_CHUNK_BYTES_PER_SEC` since it began (after `limits::CHUNK_LEASE_GRACE`):
    /// that one gives its place up (reset with `OVERLOADED`). Each holds at most two chunk buffers (being received or
    /// queued, about 2 MiB, counted in `transfer_buffer_bytes`) and 64 KiB read ahead, or
    /// one open blob.
    pub max_live_transfer_streams: usize,
    /// Transfer streams one user may have served at once, over all its connections;
    /// one more is reset with `RATE_LIMITED` before it takes a broker-wide place. Keeps
    /// a user with many connections (up to `MAX_SESSIONS_PER_USER`) from holding every
    /// place of `max_live_transfer_streams` and `max_open_blob_files`.
    pub max_transfer_streams_per_user: usize,
    /// Bytes of upload chunk buffers the broker holds at once, over all streams: each
    /// counted from its chunk's header until its Upload actor handled it (being
    /// received, or queued), at least one whole chunk. A stream whose next chunk does
    /// not fit waits, reading nothing (QUIC flow control slows its sender), and is
    /// reset with `TIMEOUT` only if the wait passes `transfer_progress_secs`. While one
    /// waits, chunks that fell behind `limits::MIN_CHUNK_BYTES_PER_SEC` (after
    /// `limits::CHUNK_LEASE_GRACE`) lose the bytes it needs (their streams are reset with
    /// `CHUNK_TOO_SLOW`).
    pub transfer_buffer_bytes: u64,
    /// Every this many seconds the broker logs a `status` line at info: sessions,
    /// connections in their handshake, live conversations, writes in flight and refused,
    /// uploads, chunk bytes held, presence entries (`Shared::status`). 0: never.
    pub status_log_secs: u64,
    /// Blob files open for downloads at once, over all streams (at least 1). A download
    /// beyond waits for one to close, and is reset with `TIMEOUT` only if the wait
    /// passes `transfer_progress_secs`.
    pub max_open_blob_files: usize,
    /// TCP address of the Prometheus endpoint (`GET /metrics`, text format 0.0.4; see
    /// `metrics`), e.g. `127.0.0.1:9464`. Absent (the default): none. Plain HTTP without
    /// authentication: bind it to loopback or a network only the scraper reaches.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("switchboard-data"),
            cert: None,
            key: None,
            registration_open: true,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
            argon2_queue: crate::limits::ARGON2_QUEUE,
            registration_burst_per_address: crate::limits::REGISTRATION_BURST_PER_ADDRESS,
            registration_interval_ms: crate::limits::REGISTRATION_INTERVAL_MS,
            unconfirmed_device_grace_ms: crate::limits::UNCONFIRMED_DEVICE_GRACE_MS,
            store_cache_bytes: 256 * 1024 * 1024,
            commit_delay_us: 0,
            commit_siblings: 0,
            idle_timeout_ms: 30_000,
            presence_coalesce_ms: crate::limits::PRESENCE_COALESCE_MS,
            typing_ttl_ms: u64::from(switchboard_protocol::limits::TYPING_TTL_MS),
            conversation_idle_ms: 60_000,
            max_connections: 100_000,
            max_connections_per_address: crate::limits::MAX_CONNECTIONS_PER_ADDRESS,
            password_checks_per_address: crate::limits::PASSWORD_CHECKS_PER_ADDRESS,
            max_unauthenticated_connections: crate::limits::MAX_UNAUTHENTICATED_CONNECTIONS,
            quic_handshake_timeout_ms: crate::limits::QUIC_HANDSHAKE_TIMEOUT_MS,
            outbound_max_frames: crate::limits::OUTBOUND_MAX_FRAMES,
            outbound_max_bytes: crate::limits::OUTBOUND_MAX_BYTES,
            conversation_mailbox_max: crate::limits::CONVERSATION_MAILBOX_MAX,
            max_live_conversations: crate::limits::MAX_LIVE_CONVERSATIONS,
            max_live_conversations_per_user: crate::limits::MAX_LIVE_CONVERSATIONS_PER_USER,
            member_rows_per_sec: crate::limits::MEMBER_ROWS_PER_SEC,
            entries_read_per_sec: crate::limits::ENTRIES_READ_PER_SEC,
            writes_per_sec: crate::limits::WRITES_PER_SEC,
            max_sends_in_flight: crate::limits::MAX_SENDS_IN_FLIGHT,
            max_sends_in_flight_per_user: crate::limits::MAX_SENDS_IN_FLIGHT_PER_USER,
            send_delay_target_ms: crate::limits::SEND_DELAY_TARGET_MS,
            socket_backlog_target_ms: crate::limits::SOCKET_BACKLOG_TARGET_MS,
            udp_sockets: 1,
            runtime_workers: 0,
            runtime_scheduling: Scheduling::Batch,
            max_file_bytes: 100 * 1024 * 1024,
            quota_bytes: 1024 * 1024 * 1024,
            max_uploads_per_user: 8,
            disk_reserve_bytes: 1024 * 1024 * 1024,
            delete_bytes_per_sec: crate::files::blobs::DELETE_BYTES_PER_SEC,
            small_chunk_syncs_per_sec: crate::limits::SMALL_CHUNK_SYNCS_PER_SEC,
            upload_expiry_secs: 24 * 60 * 60,
            upload_promise_secs: switchboard_storage::PROMISE_HOLD.as_secs(),
            max_transfer_streams: 3,
            transfer_progress_secs: 30,
            max_live_transfer_streams: 256,
            // Two devices' worth of `max_transfer_streams`.
            max_transfer_streams_per_user: 6,
            // A quarter of what the live streams alone could queue (256 x 2 chunks of
            // 1 MiB): 128 full chunks in flight keep 64 uploads at full speed.
            transfer_buffer_bytes: 128 * 1024 * 1024,
            // Half the live streams: the rest of the process's descriptors stay for
            // connections, sled and upload files.
            max_open_blob_files: 128,
            status_log_secs: 60,
            metrics_listen: None,
        }
    }
}

/// A scheduling policy of the runtime's threads (`Config::runtime_scheduling`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// `SCHED_BATCH` where the thread runs under `SCHED_OTHER`: a thread woken waits for
    /// the running one instead of preempting it.
    Batch,
    /// The policy the process started with (`SCHED_OTHER`, the kernel's default, unless
    /// whoever started it chose another).
    Normal,
}

impl Scheduling {
    /// As `runtime_scheduling` is written in the TOML (and `switchboard-load
    /// --broker-scheduling` takes it): `batch` or `normal`.
    pub fn name(self) -> &'static str {
        match self {
            Scheduling::Batch => "batch",
            Scheduling::Normal => "normal",
        }
    }
}

impl std::str::FromStr for Scheduling {
    type Err = String;

    /// `name`'s inverse. Errors: anything else, said with the two names.
    fn from_str(s: &str) -> Result<Self, String> {
        [Scheduling::Batch, Scheduling::Normal]
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("{s}: batch or normal"))
    }
}

/// What `Scheduling::Batch` came to in this process (`batch_outcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOutcome {
    /// No runtime thread under `Scheduling::Batch` has started.
    NotTried,
    /// The runtime's threads run under `SCHED_BATCH`.
    Applied,
    /// The threads started under a policy other than `SCHED_OTHER` and were left so.
    LeftAsStarted,
    /// The kernel or a sandbox refused the change (logged once); threads run as started.
    Refused,
    /// Not Linux: nothing to do.
    Unsupported,
}

/// Every `BatchOutcome`, in declaration order (`outcome as usize` is its index).
const OUTCOMES: [BatchOutcome; 5] = [
    BatchOutcome::NotTried,
    BatchOutcome::Applied,
    BatchOutcome::LeftAsStarted,
    BatchOutcome::Refused,
    BatchOutcome::Unsupported,
];

/// The latest `BatchOutcome` of a runtime thread's start, as an index into `OUTCOMES`.
static BATCH_OUTCOME: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What `runtime_scheduling = "batch"` came to in this process, for the start line.
pub fn batch_outcome() -> BatchOutcome {
    OUTCOMES[BATCH_OUTCOME.load(std::sync::atomic::Ordering::Relaxed)]
}

/// Records `outcome` and returns the one before it.
fn record(outcome: BatchOutcome) -> BatchOutcome {
    OUTCOMES[BATCH_OUTCOME.swap(outcome as usize, std::sync::atomic::Ordering::Relaxed)]
}

/// Puts the calling thread under `SCHED_BATCH` (sched(7)) if it runs under `SCHED_OTHER`:
/// woken, it does not preempt the thread running on its core. The nice value is kept. A
/// refusal (a sandbox that forbids the call) is logged once, and no later thread tries
/// again (the blocking pool starts threads as it needs them).
fn batch_scheduling() {
    #[cfg(target_os = "linux")]
    {
        use crate::sched::{own_policy, set_own_policy};
        if batch_outcome() == BatchOutcome::Refused {
            return;
        }
        let outcome = match own_policy() {
            Ok(libc::SCHED_BATCH) => Ok(BatchOutcome::Applied),
            Ok(libc::SCHED_OTHER) => set_own_policy(libc::SCHED_BATCH).map(|()| BatchOutcome::Applied),
            Ok(_) => Ok(BatchOutcome::LeftAsStarted),
            Err(error) => Err(error),
        };
        match outcome {
            Ok(outcome) => {
                record(outcome);
            }
            Err(error) => {
                if record(BatchOutcome::Refused) != BatchOutcome::Refused {
                    tracing::warn!(%error, "runtime threads not put under SCHED_BATCH (runtime_scheduling = \"batch\"); they run under the policy the broker started with");
                }
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    record(BatchOutcome::Unsupported);
}

impl Config {
    /// The async runtime a broker with this configuration serves on: multi-thread,
    /// `runtime_workers` threads (0: one per core; at most `MAX_RUNTIME_WORKERS`), I/O
    /// and time enabled, its threads under `runtime_scheduling` (an `on_thread_start`
    /// hook: an embedder who sets its own replaces it). The `switchboard` binary and the
    /// harness's child broker both build theirs here.
    pub fn runtime_builder(&self) -> tokio::runtime::Builder {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if self.runtime_workers > 0 {
            builder.worker_threads(self.runtime_workers.min(MAX_RUNTIME_WORKERS));
        }
        if self.runtime_scheduling == Scheduling::Batch {
            builder.on_thread_start(batch_scheduling);
        }
        builder.enable_all();
        builder
    }

    /// Whether CPU-heavy work a client can start (password hashes, thumbnails) runs under
    /// `SCHED_IDLE` (`background::BackgroundThreads`): when the runtime's threads run under
    /// `SCHED_BATCH` (a woken `SCHED_BATCH` thread preempts only an idle-policy one);
    /// under `normal` (a shared host) an idle-policy thread would wait for every other
    /// process.
    pub fn idle_background_work(&self) -> bool {
        self.runtime_scheduling == Scheduling::Batch
    }

    /// Reads a TOML file; absent keys keep their defaults.
    pub fn from_toml_file(path: &std::path::Path) -> crate::error::Result<Config> {
        let text = std::fs::read_to_string(path).map_err(crate::Error::io(format!("reading {}", path.display())))?;
        toml::from_str(&text).map_err(|e| crate::Error::Config(format!("{}: {e}", path.display())))
    }

    /// A configuration for tests and embedded use: ephemeral port, given dir, cheap
    /// argon2 and a small cache. A test harness enrolls many users from one address at
    /// once, so the password queue, the per-address registration allowance, password
    /// checks and connections per address are effectively unbounded here, and a load test writes as fast as the broker takes
    /// it, so users' writes are limited at a rate nothing reaches (`writes_per_sec`);
    /// tests of those bounds set them.
    pub fn ephemeral(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            argon2_memory_kib: 256,
            argon2_iterations: 1,
            argon2_queue: 1 << 16,
            registration_burst_per_address: u32::MAX,
            // Kept, at a rate nothing reaches: the harness measures the allowance's cost.
            writes_per_sec: u32::MAX,
            entries_read_per_sec: u32::MAX,
            // Every client of a test or load test comes from 127.0.0.1.
            max_connections_per_address: 0,
            password_checks_per_address: 0,
            store_cache_bytes: 16 * 1024 * 1024,
            // A test machine's disk may be nearly full; tests of the reserve set one.
            disk_reserve_bytes: 0,
            ..Config::default()
        }
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// How long the writer waits for a client to take any byte of its control stream
    /// before it closes it `SLOW_CONSUMER` (`connection::writer`): twice the idle
    /// timeout, and at least the idle timeout past `transfer_progress_secs`, since
    /// transfers share the connection's flow-control credit and a stalled download is
    /// reset only after that (60 s at the defaults).
    pub(crate) fn write_stall(&self) -> Duration {
        let progress = Duration::from_secs(self.transfer_progress_secs);
        self.idle_timeout().saturating_mul(2).max(progress.saturating_add(self.idle_timeout()))
    }

    pub(crate) fn quic_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.quic_handshake_timeout_ms)
    }
}

/// Largest `commit_delay_us`: a tenth of a second (PostgreSQL's `commit_delay` has the
/// same cap); beyond it every acknowledgement and a clean shutdown wait that long.
pub const MAX_COMMIT_DELAY_US: u64 = 100_000;

/// Most `runtime_workers`: far more threads than any machine has cores only cost
/// memory and wakeups.
pub const MAX_RUNTIME_WORKERS: usize = 1024;

/// Most `udp_sockets`: one per core is the point (SO_REUSEPORT spreads peers over them);
/// far more only cost file descriptors (a trial's 100000 passed `config` and the start
/// failed with "Too many open files").
pub const MAX_UDP_SOCKETS: usize = 256;

/// Longest `status_log_secs`: a day.
pub const MAX_STATUS_LOG_SECS: u64 = 86_400;
/// Longest `idle_timeout_ms`, `quic_handshake_timeout_ms` and `transfer_progress_secs`,
/// seconds: a day.
pub const MAX_DURATION_SECS: u64 = 86_400;

/// Smallest `outbound_max_bytes`: two of the largest frames the broker sends (a history
/// or catch-up page, `MAX_SERVER_FRAME_BYTES`). Below it a device catching up is cut off
/// as a slow consumer by the page it asked for, reconnects, asks again: an operator
/// trial's 256 KiB made every catch-up a reconnect loop.
pub const MIN_OUTBOUND_MAX_BYTES: usize = 2 * switchboard_protocol::limits::MAX_SERVER_FRAME_BYTES as usize;
/// Smallest `outbound_max_frames`: the answers to a session's pipelined requests
/// (`MAX_INFLIGHT_REQUESTS`) twice over, with room for events between them.
pub const MIN_OUTBOUND_MAX_FRAMES: usize = 2 * switchboard_protocol::limits::MAX_INFLIGHT_REQUESTS as usize;

/// Largest `argon2_memory_kib`: 1 GiB per hash. Each of the `ARGON2_CONCURRENCY` hashes
/// at once holds that much, and one is made at start (the decoy for unknown names): an
/// operator trial's extra zeros (4294967295) grew the broker to the machine's 24 GB, and
/// the kernel killed it. OWASP asks for 19 MiB; 1 GiB is fifty times that.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 1 << 20;
/// Largest `argon2_iterations`: each is a pass over the memory, and a login waits for
/// all of them (OWASP: 2 at 19 MiB, 5 at 7 MiB).
pub const MAX_ARGON2_ITERATIONS: u32 = 64;

/// Shortest `idle_timeout_ms`: below a second a client on an ordinary network times out
/// between keep-alives (0 would mean no connection ever completes).
pub const MIN_IDLE_TIMEOUT_MS: u64 = 1_000;

/// Refuses settings with which the broker would start and then serve no one, naming the
/// setting: a zero where it means "nothing is ever allowed" (no connections, no sockets,
/// no transfer streams, files of 0 bytes, uploads that expire at once), an idle timeout
/// under `MIN_IDLE_TIMEOUT_MS`, and `check_commit_delay`. Zeros that are a documented
/// choice are not refused: `commit_delay_us`, `send_delay_target_ms`,
/// `socket_backlog_target_ms` (a rule off), `disk_reserve_bytes` (no reserve),
/// `quota_bytes` (no uploads), `max_sends_in_flight` (every write refused: for tests).
pub fn check(config: &Config) -> crate::error::Result<()> {
    if config.idle_timeout_ms < MIN_IDLE_TIMEOUT_MS {
        return Err(crate::Error::Config(format!(
            "idle_timeout_ms = {}: at least {MIN_IDLE_TIMEOUT_MS} (ms; the default is 30000)",
            config.idle_timeout_ms
        )));
    }
    let at_least_one = [
        ("argon2_memory_kib", u64::from(config.argon2_memory_kib)),
        ("argon2_iterations", u64::from(config.argon2_iterations)),
        ("store_cache_bytes", config.store_cache_bytes),
        ("quic_handshake_timeout_ms", config.quic_handshake_timeout_ms),
        ("max_connections", config.max_connections as u64),
        ("max_unauthenticated_connections", config.max_unauthenticated_connections as u64),
        ("outbound_max_frames", config.outbound_max_frames as u64),
        ("outbound_max_bytes", config.outbound_max_bytes as u64),
        ("conversation_mailbox_max", config.conversation_mailbox_max as u64),
        ("max_sends_in_flight_per_user", config.max_sends_in_flight_per_user as u64),
        ("max_live_conversations", config.max_live_conversations as u64),
        ("max_live_conversations_per_user", config.max_live_conversations_per_user as u64),
        ("member_rows_per_sec", u64::from(config.member_rows_per_sec)),
        ("entries_read_per_sec", u64::from(config.entries_read_per_sec)),
        ("udp_sockets", config.udp_sockets as u64),
        ("max_file_bytes", config.max_file_bytes),
        ("max_uploads_per_user", config.max_uploads_per_user as u64),
        ("upload_expiry_secs", config.upload_expiry_secs),
        ("upload_promise_secs", config.upload_promise_secs),
        ("delete_bytes_per_sec", config.delete_bytes_per_sec),
        ("small_chunk_syncs_per_sec", config.small_chunk_syncs_per_sec),
        ("max_transfer_streams", u64::from(config.max_transfer_streams)),
        ("transfer_progress_secs", config.transfer_progress_secs),
        ("max_live_transfer_streams", config.max_live_transfer_streams as u64),
        ("max_transfer_streams_per_user", config.max_transfer_streams_per_user as u64),
        ("transfer_buffer_bytes", config.transfer_buffer_bytes),
        ("max_open_blob_files", config.max_open_blob_files as u64),
        ("conversation_idle_ms", config.conversation_idle_ms),
        ("typing_ttl_ms", config.typing_ttl_ms),
    ];
    if config.data_dir.as_os_str().is_empty() {
        return Err(crate::Error::Config(
            "data_dir is empty: name a directory (the default is switchboard-data, beside where the broker starts)"
                .into(),
        ));
    }
    if config.cert.is_some() != config.key.is_some() {
        return Err(crate::Error::Config(
            "cert and key go together: set both (`cert` and `key` in the file, or --cert and --key), or neither \
             for the certificate the broker generates in its data dir"
                .into(),
        ));
    }
    if config.argon2_memory_kib > MAX_ARGON2_MEMORY_KIB {
        return Err(crate::Error::Config(format!(
            "argon2_memory_kib = {}: at most {MAX_ARGON2_MEMORY_KIB} (1 GiB per hash, two hashes at once; \
             the default is 19456, OWASP's 19 MiB)",
            config.argon2_memory_kib
        )));
    }
    if config.argon2_iterations > MAX_ARGON2_ITERATIONS {
        return Err(crate::Error::Config(format!(
            "argon2_iterations = {}: at most {MAX_ARGON2_ITERATIONS} (each login waits for all of them; the default is 2)",
            config.argon2_iterations
        )));
    }
    if config.runtime_workers > MAX_RUNTIME_WORKERS {
        return Err(crate::Error::Config(format!(
            "runtime_workers = {}: at most {MAX_RUNTIME_WORKERS} (0: one per core)",
            config.runtime_workers
        )));
    }
    if config.udp_sockets > MAX_UDP_SOCKETS {
        return Err(crate::Error::Config(format!(
            "udp_sockets = {}: at most {MAX_UDP_SOCKETS} (one per core is the point; the default is 1)",
            config.udp_sockets
        )));
    }
    // Durations added to a clock: past these an upload stream's deadline overflowed the
    // clock and panicked every upload (`transfer_progress_secs` = i64::MAX, "never"), and
    // an idle timeout past QUIC's range was replaced by 30 s without a word (an attacker
    // review). A day is more than any of them wants.
    let at_most = [
        ("idle_timeout_ms", config.idle_timeout_ms, MAX_DURATION_SECS * 1000),
        ("transfer_progress_secs", config.transfer_progress_secs, MAX_DURATION_SECS),
        ("quic_handshake_timeout_ms", config.quic_handshake_timeout_ms, MAX_DURATION_SECS * 1000),
    ];
    if let Some((name, value, most)) = at_most.iter().find(|(_, value, most)| value > most) {
        return Err(crate::Error::Config(format!("{name} = {value}: at most {most} (a day)")));
    }
    // Read as "no limit" by its neighbours' zeros, it meant one registration per address
    // for good (a bucket of no tokens that never refills): refused by name.
    if config.registration_burst_per_address == 0 {
        return Err(crate::Error::Config(
            "registration_burst_per_address = 0: at least 1 (registration_open = false closes registration)".into(),
        ));
    }
    if config.status_log_secs > MAX_STATUS_LOG_SECS {
        return Err(crate::Error::Config(format!(
            "status_log_secs = {}: at most {MAX_STATUS_LOG_SECS} (a day; 0 turns the status line off)",
            config.status_log_secs
        )));
    }
    if let Some((name, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
        return Err(crate::Error::Config(format!(
            "{name} = 0: at least 1 (with 0 the broker would start and serve no one); \
             leave it out for the default"
        )));
    }
    // What argon2 itself refuses (memory below 8 KiB), refused here too: before, `config`
    // passed it and only a start failed.
    argon2::Params::new(config.argon2_memory_kib, config.argon2_iterations, 1, None).map_err(|e| {
        crate::Error::Config(format!(
            "argon2_memory_kib = {}, argon2_iterations = {}: {e}",
            config.argon2_memory_kib, config.argon2_iterations
        ))
    })?;
    check_commit_delay(config)
}

/// `check`, then what a deployed broker needs beyond serving at all (the `switchboard`
/// binary checks this; tests and embedders lower these bounds on purpose to reach them):
/// outbound queues that hold what the broker itself sends.
pub fn check_deployment(config: &Config) -> crate::error::Result<()> {
    check(config)?;
    // A certificate and key named are read as a start would read them (`switchboard
    // config` passed a missing file before).
    if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
        crate::tls::read(cert, key)?;
    }
    if config.outbound_max_bytes < MIN_OUTBOUND_MAX_BYTES {
        return Err(crate::Error::Config(format!(
            "outbound_max_bytes = {}: at least {MIN_OUTBOUND_MAX_BYTES} (two of the largest frames the broker \
             sends; below it a device catching up is disconnected as a slow consumer over and over)",
            config.outbound_max_bytes
        )));
    }
    if config.outbound_max_frames < MIN_OUTBOUND_MAX_FRAMES {
        return Err(crate::Error::Config(format!(
            "outbound_max_frames = {}: at least {MIN_OUTBOUND_MAX_FRAMES} (the answers to a session's \
             pipelined requests, twice)",
            config.outbound_max_frames
        )));
    }
    Ok(())
}

/// Refuses a `commit_delay_us` above `MAX_COMMIT_DELAY_US`, or, while the delay rule of
/// admission is on, at or above half of `send_delay_target_ms`: every message write
/// waits at least the delay, so the broker would refuse writes as overloaded when it is
/// only waiting.
pub fn check_commit_delay(config: &Config) -> crate::error::Result<()> {
    let delay = config.commit_delay_us;
    if delay > MAX_COMMIT_DELAY_US {
        return Err(crate::Error::Config(format!(
            "commit_delay_us = {delay}: at most {MAX_COMMIT_DELAY_US} (a tenth of a second)"
        )));
    }
    let target_us = config.send_delay_target_ms.saturating_mul(1000);
    if target_us > 0 && delay.saturating_mul(2) >= target_us {
        return Err(crate::Error::Config(format!(
            "commit_delay_us = {delay} must stay below half of send_delay_target_ms ({} ms), \
             or every write would count as overloaded",
            config.send_delay_target_ms
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduling policy of the calling thread, as the kernel has it.
    #[cfg(target_os = "linux")]
    fn policy_of_this_thread() -> u32 {
        crate::sched::kernel_policy_of_this_thread() as u32
    }

    /// The policies of a worker and of a blocking thread of the runtime `scheduling`
    /// builds, from a thread under `started_as`.
    #[cfg(target_os = "linux")]
    fn policies_of_runtime_threads(scheduling: Scheduling, started_as: libc::c_int) -> (u32, u32) {
        std::thread::spawn(move || {
            crate::sched::set_own_policy(started_as).unwrap();
            let config = Config { runtime_workers: 1, runtime_scheduling: scheduling, ..Config::default() };
            let runtime = config.runtime_builder().build().unwrap();
            runtime.block_on(async {
                let worker = tokio::spawn(async { policy_of_this_thread() }).await.unwrap();
                (worker, tokio::task::spawn_blocking(policy_of_this_thread).await.unwrap())
            })
        })
        .join()
        .unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_runtime_threads_run_under_the_configured_scheduling_policy() {
        const SCHED_OTHER: u32 = libc::SCHED_OTHER as u32;
        const SCHED_BATCH: u32 = libc::SCHED_BATCH as u32;
        const SCHED_IDLE: u32 = libc::SCHED_IDLE as u32;
        let other = libc::SCHED_OTHER;
        assert_eq!(policies_of_runtime_threads(Scheduling::Batch, other), (SCHED_BATCH, SCHED_BATCH));
        assert_eq!(batch_outcome(), BatchOutcome::Applied);
        assert_eq!(policies_of_runtime_threads(Scheduling::Normal, other), (SCHED_OTHER, SCHED_OTHER));
        // A policy whoever started the broker chose is theirs to keep (it was overridden).
        let idle = libc::SCHED_IDLE;
        assert_eq!(policies_of_runtime_threads(Scheduling::Batch, idle), (SCHED_IDLE, SCHED_IDLE));
        assert_eq!(policies_of_runtime_threads(Scheduling::Normal, idle), (SCHED_IDLE, SCHED_IDLE));
        // The default is batch (docs/benchmarks.md, "Runtime threads that do not preempt").
        assert_eq!(Config::default().runtime_scheduling, Scheduling::Batch);
    }

    #[test]
    fn a_scheduling_policy_is_named_as_the_toml_writes_it() {
        for scheduling in [Scheduling::Batch, Scheduling::Normal] {
            let config = Config { runtime_scheduling: scheduling, ..Config::default() };
            let toml = toml::to_string(&config).unwrap();
            assert!(toml.contains(&format!("runtime_scheduling = \"{}\"", scheduling.name())), "{toml}");
            assert_eq!(scheduling.name().parse(), Ok(scheduling));
        }
        assert!("fifo".parse::<Scheduling>().unwrap_err().contains("batch or normal"));
    }

    #[test]
    fn settings_that_would_serve_no_one_are_refused_by_name() {
        assert!(check(&Config::default()).is_ok());
        assert!(check(&Config::ephemeral("unused")).is_ok());
        let refused = |change: fn(&mut Config)| {
            let mut config = Config::default();
            change(&mut config);
            check(&config).unwrap_err().to_string()
        };
        let said = refused(|c| c.idle_timeout_ms = 0);
        assert!(said.contains("idle_timeout_ms = 0") && said.contains("at least 1000"), "{said}");
        assert!(refused(|c| c.idle_timeout_ms = 999).contains("idle_timeout_ms"));
        assert!(refused(|c| c.max_connections = 0).contains("max_connections = 0"));
        assert!(refused(|c| c.udp_sockets = 0).contains("udp_sockets = 0"));
        assert!(refused(|c| c.udp_sockets = 100_000).contains("udp_sockets = 100000: at most 256"));
        assert!(refused(|c| c.runtime_workers = MAX_RUNTIME_WORKERS + 1).contains("runtime_workers = 1025"));
        assert!(refused(|c| c.max_file_bytes = 0).contains("max_file_bytes = 0"));
        assert!(refused(|c| c.upload_expiry_secs = 0).contains("upload_expiry_secs = 0"));
        assert!(refused(|c| c.upload_promise_secs = 0).contains("upload_promise_secs = 0"));
        assert!(refused(|c| c.max_transfer_streams = 0).contains("max_transfer_streams = 0"));
        assert!(refused(|c| c.max_open_blob_files = 0).contains("max_open_blob_files = 0"));
        // Was taken as 1 (one write at a time per user) without a word.
        let said = refused(|c| c.max_sends_in_flight_per_user = 0);
        assert!(said.contains("max_sends_in_flight_per_user = 0"), "{said}");
        assert!(refused(|c| c.commit_delay_us = MAX_COMMIT_DELAY_US + 1).contains("commit_delay_us"));
        assert!(refused(|c| c.status_log_secs = u64::MAX).contains("status_log_secs"));
        // Passed, then panicked every upload stream, or were replaced without a word.
        let said = refused(|c| c.transfer_progress_secs = i64::MAX as u64);
        assert!(said.contains("transfer_progress_secs = 9223372036854775807: at most 86400"), "{said}");
        assert!(refused(|c| c.idle_timeout_ms = 1 << 62).contains("idle_timeout_ms"));
        assert!(refused(|c| c.quic_handshake_timeout_ms = u64::MAX).contains("quic_handshake_timeout_ms"));
        // Meant one registration per address for good.
        assert!(refused(|c| c.registration_burst_per_address = 0).contains("registration_burst_per_address = 0"));
        // A deployment's outbound queues hold what the broker sends (tests go lower).
        let deployed = |change: fn(&mut Config)| {
            let mut config = Config::default();
            change(&mut config);
            assert!(check(&config).is_ok());
            check_deployment(&config).unwrap_err().to_string()
        };
        assert!(check_deployment(&Config::default()).is_ok());
        assert!(deployed(|c| c.outbound_max_bytes = 256 * 1024).contains("outbound_max_bytes = 262144: at least"));
        assert!(deployed(|c| c.outbound_max_frames = 8).contains("outbound_max_frames = 8: at least"));
        // Zeros that are a documented choice stay allowed.
        let choices = Config {
            send_delay_target_ms: 0,
            socket_backlog_target_ms: 0,
            disk_reserve_bytes: 0,
            quota_bytes: 0,
            max_sends_in_flight: 0,
            ..Config::default()
        };
        assert!(check(&choices).is_ok());
    }

    /// An operator trial: `argon2_memory_kib = 4294967295` passed `switchboard config`
    /// and the start grew to the machine's memory until the kernel killed it; a memory
    /// cost of 7, an empty data dir and a certificate without its key passed `config` and
    /// failed only at start (or, for the empty dir, filled the current directory).
    #[test]
    fn settings_a_start_would_fail_on_or_be_hurt_by_are_refused_by_config() {
        let refused = |change: &dyn Fn(&mut Config)| {
            let mut config = Config::default();
            change(&mut config);
            check_deployment(&config).unwrap_err().to_string()
        };
        let said = refused(&|c| c.argon2_memory_kib = u32::MAX);
        assert!(said.contains("argon2_memory_kib = 4294967295: at most 1048576"), "{said}");
        assert!(refused(&|c| c.argon2_iterations = 1000).contains("argon2_iterations = 1000: at most 64"));
        let said = refused(&|c| c.argon2_memory_kib = 7);
        assert!(said.contains("argon2_memory_kib = 7") && said.contains("too small"), "{said}");
        assert!(refused(&|c| c.data_dir = PathBuf::new()).contains("data_dir is empty"));
        let said = refused(&|c| c.cert = Some("cert.pem".into()));
        assert!(said.contains("cert and key go together"), "{said}");
        assert!(refused(&|c| c.key = Some("key.pem".into())).contains("cert and key go together"));
        let said = refused(&|c| {
            c.cert = Some("/nonexistent/cert.pem".into());
            c.key = Some("/nonexistent/key.pem".into());
        });
        assert!(said.contains("/nonexistent/cert.pem"), "{said}");
        let largest = Config {
            argon2_memory_kib: MAX_ARGON2_MEMORY_KIB,
            argon2_iterations: MAX_ARGON2_ITERATIONS,
            ..Config::default()
        };
        assert!(check(&largest).is_ok());
    }

    #[test]
    fn a_commit_delay_is_refused_past_its_cap_or_near_the_overload_target() {
        let mut config = Config::ephemeral("unused");
        assert!(check_commit_delay(&config).is_ok(), "the default, 0");
        config.commit_delay_us = 2_000;
        assert!(check_commit_delay(&config).is_ok(), "2 ms against the default 20 ms target");
        config.commit_delay_us = 10_000;
        assert!(check_commit_delay(&config).is_err(), "half of the 20 ms target");
        config.send_delay_target_ms = 0;
        assert!(check_commit_delay(&config).is_ok(), "the delay rule is off");
        config.commit_delay_us = MAX_COMMIT_DELAY_US + 1;
        assert!(check_commit_delay(&config).is_err(), "past the cap");
    }
}
