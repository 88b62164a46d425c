//! The Switchboard broker: QUIC transport, device authentication, and the actors that
//! own sessions, users and conversations. `Broker::start` runs one on a tokio runtime;
//! the `switchboard` binary is a thin command line over it.

pub mod admin;
pub mod auth;
mod background;
pub mod catalog;
pub mod config;
mod connection;
pub mod conversation;
pub mod error;
pub mod fanout;
pub mod files;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod overload;
pub mod pauses;
pub mod presence;
pub mod reply;
#[cfg(target_os = "linux")]
mod sched;
pub mod tls;
pub mod typing;
pub mod user;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use switchboard_protocol::ErrorCode;
use switchboard_storage::{Store, StoreConfig};

pub use config::Config;
pub use error::{Error, Result};

/// How long `Broker::shutdown` waits for actors and tasks to let go of the shared state
/// (and so of the store's file lock) before closing the store without vouching for it.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(20);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether this broker may still vouch for durability. After one failed flush or
/// fdatasync it may not (on Linux a failed fsync can drop the pages it could not write,
/// so a later success proves nothing; PostgreSQL panics on it since 2018): every
/// connection is closed with `INTERNAL`, no new one is accepted, nothing is acknowledged
/// again, and the `switchboard` binary exits non-zero so recovery runs on the next start.
pub struct Health {
    failed: tokio::sync::watch::Sender<bool>,
    online: Arc<fanout::Online>,
}

impl Health {
    fn new(online: Arc<fanout::Online>) -> Self {
        Health { failed: tokio::sync::watch::Sender::new(false), online }
    }

    /// Marks durability lost (idempotent) and closes every connection.
    pub fn fail(&self, why: &str) {
        if self.failed.send_replace(true) {
            return;
        }
        tracing::error!(why, "durability lost: closing every connection; restart the broker to recover");
        self.online.close_all(ErrorCode::INTERNAL);
    }

    /// Whether durability was lost.
    pub fn is_failed(&self) -> bool {
        *self.failed.borrow()
    }

    /// Resolves once durability is lost.
    pub async fn wait_failed(&self) {
        let mut rx = self.failed.subscribe();
        let _ = rx.wait_for(|failed| *failed).await;
    }
}

/// State every actor and task of one broker shares.
pub struct Shared {
    /// Configuration in force.
    pub config: Config,
    /// The store.
    pub store: Arc<Store>,
    /// Accounts and device proof.
    pub auth: auth::Auth,
    /// Fan-out index of connected sessions.
    pub online: Arc<fanout::Online>,
    /// Online users' session counts and handshake places.
    pub users: user::UserDirectory,
    /// Live conversation actors.
    pub convs: conversation::ConvDirectory,
    /// Live Upload actors and the file bytes on disk.
    pub files: files::Files,
    /// Presence of connected users, pushed to their contacts.
    pub presence: Arc<presence::Presence>,
    /// Typing indicators.
    pub typing: Arc<typing::Typing>,
    /// Session id source.
    pub next_session_id: AtomicU64,
    /// Connection places: unauthenticated and authenticated, counted apart.
    pub(crate) admission: connection::Admission,
    /// Message writes admitted and unanswered; `OVERLOADED` past saturation.
    pub sends: Arc<overload::SendAdmission>,
    /// Set once durability is lost.
    pub health: Arc<Health>,
    /// Totals for the metrics endpoint.
    pub counters: metrics::Counters,
    /// The served certificate's notAfter, seconds since the Unix epoch (`None`: not
    /// read), for the metrics endpoint.
    pub certificate_not_after_s: Option<u64>,
    /// Where a test may hold a request (`pauses.rs`); for tests only, none is held
    /// otherwise.
    #[doc(hidden)]
    pub pauses: Arc<pauses::Pauses>,
}

/// What the broker holds now, for the operator (`Shared::status`; logged every
/// `status_log_secs`). Counts are of this moment; `writes_refused` is since the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Authenticated connections (of `max_connections`).
    pub sessions: usize,
    /// Connections in their handshake (of `max_unauthenticated_connections`).
    pub unauthenticated: usize,
    /// Connection attempts refused since the start (QUIC `CONNECTION_REFUSED`: at
    /// `max_connections`, at the handshake bounds, or after a storage failure).
    pub connections_refused: u64,
    /// Conversation actors alive (of `max_live_conversations`).
    pub conversations: usize,
    /// Message and membership writes admitted and not yet answered (of
    /// `max_sends_in_flight`).
    pub writes_in_flight: usize,
    /// Writes refused with `OVERLOADED` since the start.
    pub writes_refused: u64,
    /// Upload actors alive (uploads being written or waited on).
    pub uploads: usize,
    /// Uploads refused (at their begin) or stopped (a chunk) with `STORAGE_FULL` since the start.
    pub uploads_refused_storage_full: u64,
    /// Log writes (messages, edits, members, titles) refused with `STORAGE_FULL` since the
    /// start: the disk below a quarter of `disk_reserve_bytes` free.
    pub writes_refused_storage_full: u64,
    /// Bytes of uploads hashed for their whole-file BLAKE3 since the start: as they are
    /// written (an actor that started at offset 0), and each resumed upload's whole file
    /// once at its completion. Reopening an upload hashes nothing.
    pub upload_bytes_hashed: u64,
    /// Bytes of upload chunk buffers held (of `transfer_buffer_bytes`).
    pub chunk_bytes_held: usize,
    /// Users with a presence entry (connected, or left a moment ago).
    pub presence_users: usize,
    /// Devices disconnected with `SLOW_CONSUMER` since the start.
    pub slow_consumers: u64,
    /// Password hashes running or queued (`Auth::password_checks`).
    pub password_checks: usize,
}

impl Shared {
    /// A snapshot of what the broker holds now.
    pub fn status(&self) -> Status {
        let (sessions, unauthenticated) = self.admission.counts();
        Status {
            sessions,
            unauthenticated,
            connections_refused: self.counters.connections_refused.load(std::sync::atomic::Ordering::Relaxed),
            conversations: self.convs.live(),
            writes_in_flight: self.sends.in_flight(),
            writes_refused: self.sends.refused(),
            uploads: self.files.live(),
            uploads_refused_storage_full: self.files.storage_full.total(),
            writes_refused_storage_full: self.files.writes_storage_full.total(),
            upload_bytes_hashed: self.files.hashed_bytes.load(std::sync::atomic::Ordering::Relaxed),
            chunk_bytes_held: self.files.queued_chunk_bytes(),
            presence_users: self.presence.users(),
            slow_consumers: self.counters.slow_consumers.total(),
            password_checks: self.auth.password_checks(),
        }
    }
}

/// Logs `Shared::status` at info every `every` until the broker is gone, and a warning
/// when connections were refused since the last line (before, only `/metrics` counted
/// them: an operator trial found a full broker's log silent).
async fn log_status(shared: std::sync::Weak<Shared>, every: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused_before = 0;
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else { return };
        let s = shared.status();
        if s.connections_refused > refused_before {
            tracing::warn!(
                refused = s.connections_refused - refused_before,
                sessions = s.sessions,
                max_connections = shared.config.max_connections,
                "refused connections since the last status line (at max_connections, or past the handshake bounds)"
            );
        }
        refused_before = s.connections_refused;
        tracing::info!(
            sessions = s.sessions,
            unauthenticated = s.unauthenticated,
            connections_refused = s.connections_refused,
            conversations = s.conversations,
            writes_in_flight = s.writes_in_flight,
            writes_refused = s.writes_refused,
            uploads = s.uploads,
            uploads_refused_storage_full = s.uploads_refused_storage_full,
            writes_refused_storage_full = s.writes_refused_storage_full,
            chunk_bytes_held = s.chunk_bytes_held,
            presence_users = s.presence_users,
            slow_consumers = s.slow_consumers,
            password_checks = s.password_checks,
            "status"
        );
    }
}

/// Creates `dir`, the data directory, readable by this user only (mode 0700, and so any
/// parents it creates): it holds every message, every password hash and every uploaded
/// file, and the files in it are made with the process's umask (sled's included), so
/// only the directory keeps other local users out. An existing one is left as the
/// operator made it, with a warning if others may enter it.
pub fn create_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    make_data_dir(dir)?;
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the data dir may be entered by other local users, who could then read every message, password \
             hash and file: chmod 700 it"
        );
    }
    Ok(())
}

/// `create_data_dir` without its warning, for a second making in the same start (the
/// endpoint secret's first write: the warning was said twice).
pub(crate) fn make_data_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    // Said as it is (an operator trial got "creating PATH: File exists").
    if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
        return Err(Error::Config(format!(
            "data_dir {}: not a directory (it must be one, or not exist yet)",
            dir.display()
        )));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io(format!("creating {}", dir.display())))?;
    Ok(())
}

/// For unit tests: a store under `dir` with a small cache.
#[cfg(test)]
pub(crate) fn test_store(dir: &std::path::Path) -> Store {
    let mut config = StoreConfig::new(dir.join("store"));
    config.cache_capacity_bytes = 4 * 1024 * 1024;
    Store::open(&config).expect("a store in a temp dir")
}

/// For unit tests: a conversation of `kind` made in `store` with `members` (the first
/// its creator, with a text as its first entry; `pair` for a direct one); its id.
#[cfg(test)]
pub(crate) fn test_conversation(
    store: &Store,
    kind: switchboard_protocol::ConversationKind,
    members: &[(switchboard_protocol::UserId, switchboard_protocol::Role)],
    pair: Option<(switchboard_protocol::UserId, switchboard_protocol::UserId)>,
) -> switchboard_protocol::ConvId {
    let record = switchboard_storage::ConversationRecord { kind, title: "c".into(), created_ms: 0 };
    let first = |conv| switchboard_protocol::Entry {
        conv,
        seq: 1,
        sender: members[0].0,
        sender_device: 1,
        client_id: [0; 16],
        at_ms: 0,
        body: switchboard_protocol::Body::Text { text: "hi".into(), edited: false },
    };
    store.create_conversation(&record, members, pair, first).expect("a conversation in a test store").0
}

/// Locks `dir` for one broker (`DATA_DIR_LOCK` in it, an advisory lock held while the
/// file is open): `DataDir` if another broker holds it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    let path = dir.join(DATA_DIR_LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::DataDir(format!(
            "another broker is running on {} (it holds {DATA_DIR_LOCK}); stop it first",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(format!("locking {}", path.display()))(e)),
    }
}

/// The file in the data dir a running broker holds locked (`lock_data_dir`).
pub const DATA_DIR_LOCK: &str = "broker.lock";

/// Opens the data directory's store with the configured cache.
pub fn open_store(config: &Config) -> Result<Arc<Store>> {
    config::check(config)?;
    create_data_dir(&config.data_dir)?;
    open_store_in_data_dir(config)
}

/// `open_store` once the configuration is checked and the data dir made.
fn open_store_in_data_dir(config: &Config) -> Result<Arc<Store>> {
    let mut store_config = StoreConfig::new(config.data_dir.join("store"));
    store_config.cache_capacity_bytes = config.store_cache_bytes;
    store_config.commit_delay = std::time::Duration::from_micros(config.commit_delay_us);
    store_config.commit_siblings = config.commit_siblings as usize;
    // An upload's room holds at most as long as the upload.
    store_config.upload_promise_hold =
        std::time::Duration::from_secs(config.upload_promise_secs.min(config.upload_expiry_secs));
    let store = Store::open(&store_config).map_err(|e| {
        Error::DataDir(format!(
            "opening the store in {}: {e} (is another process using it, or its disk full?)",
            config.data_dir.display()
        ))
    })?;
    Ok(Arc::new(store))
}

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    endpoints: Vec<quinn::Endpoint>,
    /// The endpoints' UDP sockets, gone once closed (`shutdown` waits for it).
    sockets: Vec<std::sync::Weak<dyn quinn::AsyncUdpSocket>>,
    /// `lock_data_dir`'s lock, held until the broker is dropped.
    _data_dir_lock: std::fs::File,
    accept: Vec<tokio::task::JoinHandle<()>>,
    /// Address the broker listens on (the real port when configured with port 0).
    pub local_addr: SocketAddr,
    /// Path of the certificate clients should trust.
    pub cert_path: PathBuf,
    /// SHA-256 fingerprint of the certificate, hex.
    pub fingerprint: String,
    /// Address of the Prometheus endpoint, if `metrics_listen` asked for one (the real
    /// port when configured with port 0).
    pub metrics_addr: Option<SocketAddr>,
}

impl Broker {
    /// Opens the store, loads or generates the certificate, binds and starts accepting.
    pub async fn start(config: Config) -> Result<Broker> {
        // First, so that an address in use fails the start before the store is opened.
        let metrics_listener = match config.metrics_listen {
            Some(addr) => {
                let listener = metrics::bind(addr).await?;
                let addr = listener.local_addr().map_err(Error::io("reading the metrics address"))?;
                Some((listener, addr))
            }
            None => None,
        };
        // Then the certificate and the QUIC address, for the same reason: a start that
        // fails on them (a port in use, a key that does not match) must not have opened
        // the store, or the next start takes it for an unclean stop (an operator trial:
        // "checked after an unclean stop" after a start refused for its port).
        config::check(&config)?;
        create_data_dir(&config.data_dir)?;
        // One broker per data dir, settled before the port is bound: with `udp_sockets`
        // over 1 the sockets are SO_REUSEPORT, and a second start on a running broker's
        // data dir and port would join its group, taking part of its clients' packets,
        // until it failed on the store's lock (a review of the start order above).
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let identity = tls::load_or_generate(&config)?;
        tls::warn_of_names_missing(&identity, &config);
        let tickets_opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let server_config = tls::server_config(&identity, &config, tickets_opened.clone())?;
        let sockets = tls::bind_udp(config.listen, config.udp_sockets)?;
        let endpoint_config = tls::endpoint_config(&config)?;
        let store = open_store_in_data_dir(&config)?;
        // A store created just now had no previous run to check.
        if !store.opened_clean() && !store.created() {
            // A crash may have cut a conversation's newest entry short; finish it before
            // anyone lists conversations or members.
            let started = std::time::Instant::now();
            let checked = store.repair_all()?;
            tracing::info!(
                conversations = checked,
                ms = started.elapsed().as_millis() as u64,
                "checked after an unclean stop"
            );
        }
        // File bytes in line with their records (partial uploads cut to their durable
        // offsets, interrupted completions finished, unreferenced blobs deleted), made
        // durable by the barrier below.
        let files = files::Files::open(&config.data_dir, files::TransferLimits::of(&config))
            .map_err(Error::io("opening the file directories"))?;
        let repaired = files.blobs.repair(&store).map_err(|e| Error::DataDir(format!("checking uploads: {e}")))?;
        if repaired.checked > 0 {
            tracing::info!(uploads = repaired.checked, "checked uploads in progress");
        }
        // Whatever survived a crash in sled's file is made durable before anything is
        // served, so conversation actors never serve an entry that could still vanish.
        store.barrier()?.await?;
        let backlogs: Vec<_> = sockets.iter().map(|_| overload::SocketBacklog::new()).collect();
        let mut open_sockets = Vec::with_capacity(sockets.len());
        let endpoints = sockets
            .into_iter()
            .zip(&backlogs)
            .map(|(socket, backlog)| {
                let socket = overload::MeteredSocket::new(socket, backlog.clone())?;
                open_sockets.push(socket.closed_watch());
                quinn::Endpoint::new_with_abstract_socket(
                    endpoint_config.clone(),
                    Some(server_config.clone()),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::io("starting a QUIC endpoint"))?;
        let local_addr = endpoints[0].local_addr().map_err(Error::io("reading the listen address"))?;
        let online = Arc::new(fanout::Online::default());
        let health = Arc::new(Health::new(online.clone()));
        let hook_health = health.clone();
        store.on_failure(Box::new(move |e| hook_health.fail(e)));
        let auth = auth::Auth::new(store.clone(), &config)?;
        let admission = connection::Admission::new(&config);
        let sends = overload::SendAdmission::new(&config);
        let pauses = Arc::new(pauses::Pauses::default());
        let presence =
            presence::Presence::start(store.clone(), online.clone(), config.presence_coalesce_ms, pauses.clone());
        if let Err(e) = presence.presume_from_last_stop() {
            // A nicety: a start does not fail for it (users go offline and back instead).
            tracing::warn!(error = %e, "reading who was connected at the last stop failed");
        }
        let typing = typing::Typing::start(store.clone(), online.clone(), config.typing_ttl_ms, pauses.clone());
        if config.member_rows_per_sec < switchboard_protocol::limits::MAX_GROUP_MEMBERS {
            tracing::warn!(
                member_rows_per_sec = config.member_rows_per_sec,
                "member_rows_per_sec is below a group's largest member list: one read of it keeps its reader refused for over a second"
            );
        }
        let users = user::UserDirectory::new(
            online.clone(),
            config.member_rows_per_sec,
            config.writes_per_sec,
            config.entries_read_per_sec,
        );
        let shared = Arc::new(Shared {
            config,
            store,
            presence,
            typing,
            auth,
            users,
            online,
            convs: conversation::ConvDirectory::default(),
            files,
            next_session_id: AtomicU64::new(1),
            admission,
            sends,
            health,
            counters: metrics::Counters::with_tickets_opened(tickets_opened),
            certificate_not_after_s: identity.not_after_s,
            pauses,
        });
        let mut accept: Vec<tokio::task::JoinHandle<()>> = endpoints
            .iter()
            .zip(backlogs)
            .map(|(e, backlog)| tokio::spawn(connection::accept_loop(shared.clone(), e.clone(), backlog)))
            .collect();
        // Files whose completion the repair finished get what a completion gives next.
        for (id, record) in repaired.completed {
            if files::thumbnail::is_thumbnailable(&record.content_type) {
                tokio::spawn(files::thumbnails::make_thumbnail(shared.clone(), id, record));
            }
        }
        accept.push(tokio::spawn(files::watch_disk(Arc::downgrade(&shared))));
        if let Some(not_after_s) = identity.not_after_s {
            let cert = identity.cert_path.clone();
            accept.push(tokio::spawn(tls::watch_expiry(cert, not_after_s, Arc::downgrade(&shared))));
        }
        let interval = files::sweep_interval(shared.config.upload_expiry_secs);
        accept.push(tokio::spawn(files::sweeper(Arc::downgrade(&shared), interval)));
        if shared.config.status_log_secs > 0 {
            let every = Duration::from_secs(shared.config.status_log_secs);
            accept.push(tokio::spawn(log_status(Arc::downgrade(&shared), every)));
        }
        // Operator commands while running (`switchboard user ...`): without the socket
        // they still work with the broker stopped, so a failure here does not stop it.
        match admin::bind(&shared.config.data_dir) {
            Ok(listener) => accept.push(tokio::spawn(admin::serve(listener, Arc::downgrade(&shared)))),
            Err(e) => tracing::warn!(
                error = %e,
                path = %admin::socket_path(&shared.config.data_dir).display(),
                "no admin socket: operator commands need the broker stopped"
            ),
        }
        let mut metrics_addr = None;
        if let Some((listener, addr)) = metrics_listener {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "metrics endpoint reachable beyond this host: it has no authentication");
            }
            let started = std::time::SystemTime::now();
            accept.push(tokio::spawn(metrics::serve(listener, Arc::downgrade(&shared), started)));
            tracing::info!(%addr, "metrics endpoint");
            metrics_addr = Some(addr);
        }
        tracing::info!(addr = %local_addr, "listening");
        Ok(Broker {
            shared,
            endpoints,
            sockets: open_sockets,
            _data_dir_lock: data_dir_lock,
            accept,
            local_addr,
            cert_path: identity.cert_path,
            fingerprint: identity.fingerprint,
            metrics_addr,
        })
    }

    /// Resolves once the broker lost durability and stopped serving (see `Health`).
    pub async fn failed(&self) {
        self.shared.health.wait_failed().await
    }

    /// The shared state (for embedding and tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, closes every connection with `GOING_AWAY`, waits briefly for
    /// them to go, stops the actors and flushes the store.
    pub async fn shutdown(self) -> Result<()> {
        for task in &self.accept {
            task.abort();
        }
        // Operator commands open the store themselves from now on.
        let _ = std::fs::remove_file(admin::socket_path(&self.shared.config.data_dir));
        for endpoint in &self.endpoints {
            endpoint.set_server_config(None);
        }
        // Before any session closes: who is connected now is shown so after the restart
        // until each reconnects (`Presence::presume_from_last_stop`).
        self.shared.presence.record_at_stop();
        self.shared.online.close_all(ErrorCode::GOING_AWAY);
        for endpoint in &self.endpoints {
            endpoint.close(ErrorCode::GOING_AWAY.0.into(), ErrorCode::GOING_AWAY.name().as_bytes());
        }
        let idle = async {
            for endpoint in &self.endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), idle).await;
        // The port is free when this returns, so a restart can bind it at once (a test
        // restarting on the same port met `AddrInUse` when the endpoint's driver had not
        // yet dropped the socket).
        drop(self.endpoints);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.sockets.iter().any(|s| s.strong_count() > 0) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if self.sockets.iter().any(|s| s.strong_count() > 0) {
            tracing::warn!("the UDP port is still held after 2 s: a restart at once may find it in use");
        }
        let intact = self.shared.convs.stop_all();
        self.shared.files.stop_all();
        // Actors and session tasks hold the shared state; once they are gone nothing can
        // write, and dropping the last reference releases the store's file lock. An Upload
        // actor may be inside a chunk's fdatasync and group commit, which on a busy disk
        // takes seconds: wait for it rather than leave the store locked behind us.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        while Arc::strong_count(&self.shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&self.shared) > 1 || !intact || self.shared.health.is_failed() {
            // Something may still write, a conversation actor died with a write perhaps
            // cut short, or a commit failed: close without vouching for the store, so
            // the next start checks it.
            tracing::warn!(actors_intact = intact, "closing the store for a check at the next start");
            self.shared.store.close()?;
        } else {
            self.shared.store.close_clean()?;
        }
        tracing::info!("stopped; store flushed");
        Ok(())
    }
}

#[cfg(test)]
mod recovery_tests {
    /// Pages of `path` in the page cache, by mincore(2) over a read-only mapping.
    #[allow(unsafe_code)]
    fn resident_pages(path: &std::path::Path) -> usize {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a fresh shared read-only mapping of the whole file, only passed to
        // mincore and unmapped before return; `vec` holds one byte per page of it.
        unsafe {
            let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
        }
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// A store in `dir` with a few thousand durable writes, and the path of its log.
    async fn written_store(dir: &std::path::Path) -> (switchboard_storage::Store, std::path::PathBuf) {
        let store = crate::test_store(dir);
        for i in 0u32..2_000 {
            store.set_last_seen(u64::from(i), 1).unwrap();
        }
        store.barrier().unwrap().await.unwrap();
        (store, dir.join("store").join("db"))
    }

    /// A store's files are read from the disk at its next open, not from the page
    /// cache, which may hold pages whose write-back failed (marked clean, never on the
    /// disk): `settle_for_recovery` drops them (before, they stayed, and sled recovered
    /// what the disk did not hold). A file system that keeps no page cache apart (tmpfs)
    /// cannot drop them: the check is skipped there.
    #[tokio::test]
    async fn a_stores_files_are_dropped_from_the_page_cache_before_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = written_store(dir.path()).await;
        store.close().unwrap();
        drop(store);
        let _ = std::fs::read(&db).unwrap();
        let before = resident_pages(&db);
        if before == 0 {
            return;
        }
        switchboard_storage::settle_for_recovery(&dir.path().join("store")).unwrap();
        assert_eq!(resident_pages(&db), 0, "{before} pages were resident");
    }

    /// A second open of a store in use waits for it and gives up without settling its
    /// files: before, it synced them and dropped their pages from under the store in use
    /// (an operator's command as the broker stopped), then failed on sled's lock.
    #[tokio::test]
    async fn a_second_open_of_a_store_in_use_leaves_its_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, db) = written_store(dir.path()).await;
        let _ = std::fs::read(&db).unwrap();
        let before = resident_pages(&db);
        let config = switchboard_storage::StoreConfig::new(dir.path().join("store"));
        let second = tokio::task::spawn_blocking(move || switchboard_storage::Store::open(&config).err());
        let refused = second.await.unwrap().expect("refused while the first is open");
        assert!(refused.to_string().contains("could not acquire lock"), "{refused}");
        if before > 0 {
            assert_eq!(resident_pages(&db), before, "the second open dropped the store's pages");
        }
        drop(store);
    }
}
