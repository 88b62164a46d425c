//! Switchboard client library: connect over QUIC, enroll or prove a device, then make
//! requests (pipelined on one control stream) and receive events as a `Stream`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_client::ClientError> {
//! use switchboard_client::{Connector, Trust};
//! let connector = Connector::new("127.0.0.1:4433".parse().unwrap(), "localhost", Trust::Pin("ab12…".into()))?;
//! let (client, identity) = connector.register("alice", "correct horse", "laptop").await?;
//! let conv = client.create_group("team", &["bob".into()]).await?;
//! client.send(conv.id, "hello").await?;
//! # Ok(()) }
//! ```

mod cursors;
mod files;
mod merge;
mod session;
mod tls;
mod typing_shown;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use switchboard_protocol::limits::{MAX_DATAGRAM_BYTES, MAX_SERVER_FRAME_BYTES, PREAUTH_MAX_FRAME_BYTES};
use switchboard_protocol::{
    CatchUpPage, ClientFrame, ClientHello, ClientMsgId, ConvId, ConversationState, ConversationSummary, DeviceId,
    DeviceInfo, Enroll, Entry, ErrorBody, ErrorCode, Event, FrameDecoder, FrameError, Limits, Member, NewConversation,
    Page, PresenceInfo, Receipt, Reply, Request, RequestBody, Role, Seq, ServerFrame, ServerHello, Settings, Signal,
    UserId, decode, encode_frame, encode_frame_within,
};
use tokio::sync::{mpsc, oneshot};

pub use cursors::{CursorStore, Cursors, FileCursors, LEFT_CURSORS_MAX, LeftCursors, MemoryCursors, Saved};
pub use files::{
    ChunkWindow, DownloadRange, MAX_CHUNKS_IN_FLIGHT, TRANSFER_STALL, TransferError, UploadEvent, UploadPlan,
    UploadStep, Uploader, UploaderConfig, hash_file, new_upload, transient,
};
pub use merge::{Fetch, Merge};
pub use session::{
    Backoff, RESTART_RETRY_MAX_MS, RESTART_WINDOW_MS, Session, SessionConfig, SessionError, SessionEvent,
    SessionEvents, TYPING_REFRESH_MS, permanent, random_u64, retry_safe,
};
pub use switchboard_protocol as protocol;
pub use tls::{TransportOptions, Trust};

/// Events buffered for the application before the client stops reading the stream
/// (and the broker, seeing its queue fill, disconnects a consumer that never reads).
pub const EVENT_BUFFER: usize = 4096;

/// Client failures. A failure with a broker code displays as `NAME (number): message`
/// (`CONFLICT (9): user name is taken`), the same for a refused request and for a
/// connection the broker closed, so every caller can print it as it is.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker answered the request with an error.
    #[error("{}", coded(.0.code, &.0.message))]
    Server(ErrorBody),
    /// The connection is closed; `code` is the broker's close code if it gave one.
    #[error("{}", match code {
        Some(code) => coded(*code, reason),
        None => format!("connection closed: {reason}"),
    })]
    Closed {
        /// Close code.
        code: Option<ErrorCode>,
        /// Close reason.
        reason: String,
    },
    /// Could not connect (address, timeout, TLS).
    #[error("connect: {0}")]
    Connect(String),
    /// The broker refused the connection before its handshake (QUIC
    /// `CONNECTION_REFUSED`): it is up, but at its connection limit
    /// (`max_connections`, or `max_connections_per_address` for this client's address),
    /// or failing. A later attempt may be taken.
    #[error(
        "the broker refused the connection: it is up, but at its connection limit (or this address's), or failing: {0}"
    )]
    Refused(String),
    /// This client refused the broker's certificate (the handshake ended with a TLS
    /// certificate alert): the trust it was given (a CA file, a pin) is not this
    /// broker's, or another server answered. Connecting again cannot help.
    #[error("the broker's certificate is not trusted: {0}")]
    Untrusted(String),
    /// The broker sent something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
    /// This client did not send the request: it encodes to a frame body of `bytes`, over
    /// the `limit` the broker announced in its hello (`max_client_frame_bytes`, or
    /// `preauth_max_frame_bytes` before authentication), for which the broker would have
    /// closed the connection with `FRAME_TOO_LARGE`. Nothing was sent, so nothing was
    /// stored, and the connection stays open.
    #[error("{}", coded(ErrorCode::FRAME_TOO_LARGE, &too_large(*bytes, *limit)))]
    TooLarge {
        /// The request's frame body, bytes.
        bytes: u64,
        /// The broker's limit, bytes.
        limit: u32,
    },
}

impl ClientError {
    /// The stable error code, if the failure carries one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            ClientError::Closed { code, .. } => *code,
            ClientError::TooLarge { .. } => Some(ErrorCode::FRAME_TOO_LARGE),
            _ => None,
        }
    }
}

/// What `ClientError::TooLarge` says after its code.
pub fn too_large(bytes: u64, limit: u32) -> String {
    format!("not sent: the request is {bytes} bytes, over the broker's limit of {limit} bytes for one request")
}

/// `NAME (number): message`; the message is left out when the broker gave none.
fn coded(code: ErrorCode, message: &str) -> String {
    // A close reason that only repeats the code's name says nothing more.
    // `ErrorCode`'s own `NAME (n)`, which the broker's output shares since 2026-12-07.
    if message.is_empty() || message == code.name() { code.to_string() } else { format!("{code}: {message}") }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => ClientError::Closed {
                code: u16::try_from(c.error_code.into_inner()).ok().map(ErrorCode),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            other => ClientError::Closed { code: None, reason: other.to_string() },
        }
    }
}

/// Result alias.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// What a device needs to authenticate later: keep it secret (it holds the key).
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    /// Account name.
    pub user: String,
    /// Account id.
    pub user_id: UserId,
    /// This device's id.
    pub device_id: DeviceId,
    /// Ed25519 secret key, hex.
    pub secret_key: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("user", &self.user).field("device_id", &self.device_id).finish_non_exhaustive()
    }
}

/// A configured QUIC endpoint pointing at one broker; many connections can share it.
#[derive(Clone)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    server: SocketAddr,
    server_name: String,
    connect_timeout: std::time::Duration,
    enroll_retry_for: std::time::Duration,
    request_timeout: std::time::Duration,
}

impl Connector {
    /// An endpoint bound to an ephemeral local port, trusting the broker per `trust`.
    pub fn new(server: SocketAddr, server_name: &str, trust: Trust) -> Result<Self> {
        Self::with_transport(server, server_name, trust, &TransportOptions::default())
    }

    /// Like `new`, with chosen QUIC transport options (datagrams, idle timeout,
    /// keep-alive).
    pub fn with_transport(
        server: SocketAddr,
        server_name: &str,
        trust: Trust,
        options: &TransportOptions,
    ) -> Result<Self> {
        let endpoint = tls::endpoint(server, trust, options)?;
        Ok(Connector {
            endpoint,
            server,
            server_name: server_name.to_owned(),
            connect_timeout: options.connect_timeout,
            enroll_retry_for: options.enroll_retry_for,
            request_timeout: options.request_timeout,
        })
    }

    /// Creates an account and enrolls a new device key.
    pub async fn register(&self, user: &str, password: &str, device_name: &str) -> Result<(Client, Identity)> {
        self.enroll(user, password, device_name, true).await
    }

    /// Enrolls a new device key into an existing account.
    pub async fn login(&self, user: &str, password: &str, device_name: &str) -> Result<(Client, Identity)> {
        self.enroll(user, password, device_name, false).await
    }

    /// Connects as an enrolled device.
    pub async fn connect(&self, identity: &Identity) -> Result<Client> {
        let (conn, stream, (user_id, device_id)) = self.authenticated(identity).await?;
        Ok(Client::start(conn, stream, user_id, device_id, self.request_timeout))
    }

    /// Connects and proves `identity`'s device key: the connection, its control stream
    /// and the user and device ids the broker answered, within `connect_timeout`.
    ///
    /// An attempt still unanswered after `FRESH_ATTEMPT_AFTER` gets a fresh one beside
    /// it, and the first of the two to authenticate wins: a broker that restarted in the
    /// middle of a handshake drops the old handshake's packets (it knows no such
    /// connection, and QUIC resets only short-header packets), so that attempt alone
    /// would wait out the whole `connect_timeout`, while a slow link or a loaded broker
    /// may still answer it. Authenticating twice is harmless (the loser's connection is
    /// dropped); enrolling is not, so `enroll` makes one attempt at a time, and another
    /// only after an `OVERLOADED` answer (nothing was enrolled).
    async fn authenticated(&self, identity: &Identity) -> Result<(quinn::Connection, Control, (UserId, DeviceId))> {
        let key = signing_key(&identity.secret_key)?;
        let attempt = || async {
            let (conn, mut stream, transcript) = self.open().await?;
            let signature = Bytes::copy_from_slice(&key.sign(&transcript).to_bytes());
            let body =
                RequestBody::Authenticate { user: identity.user.clone(), device_id: identity.device_id, signature };
            let ids = stream.authenticate(&conn, body).await?;
            Ok((conn, stream, ids))
        };
        self.in_time(async {
            let first = attempt();
            tokio::pin!(first);
            tokio::select! {
                done = &mut first => return done,
                () = tokio::time::sleep(FRESH_ATTEMPT_AFTER) => {}
            }
            let second = attempt();
            tokio::pin!(second);
            let (mut first_failed, mut second_failed) = (None, None);
            loop {
                tokio::select! {
                    done = &mut first, if first_failed.is_none() => match done {
                        Ok(v) => return Ok(v),
                        Err(e) => first_failed = Some(e),
                    },
                    done = &mut second, if second_failed.is_none() => match done {
                        Ok(v) => return Ok(v),
                        Err(e) => second_failed = Some(e),
                    },
                }
                if first_failed.is_some()
                    && let Some(e) = second_failed.take()
                {
                    return Err(e);
                }
            }
        })
        .await
    }

    /// `connecting` (the QUIC handshake, the hellos and the authentication), or a
    /// `Connect` error naming the address once `connect_timeout` has passed.
    async fn in_time<T>(&self, connecting: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Connect(format!(
                "no broker answered at {} within {} s",
                self.server,
                self.connect_timeout.as_secs_f64()
            ))),
        }
    }

    /// Connects, exchanges hellos and closes, within `connect_timeout`: whether a broker
    /// answers at the address and with what, without an account (a health check). The
    /// broker counts the connection among its unauthenticated ones until the close.
    pub async fn probe(&self) -> Result<Probe> {
        let started = std::time::Instant::now();
        let (conn, stream, _) = self
            .in_time(async {
                let (conn, mut stream, transcript) = self.open().await?;
                stream.exchange_hellos(&conn).await?;
                Ok((conn, stream, transcript))
            })
            .await?;
        // The hello has just arrived: it was sent about half a round trip ago.
        let arrived_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let answered_ms = started.elapsed().as_secs_f64() * 1000.0;
        let round_trip_ms = conn.rtt().as_secs_f64() * 1000.0;
        conn.close(0u32.into(), b"probe");
        let hello = stream.hello.ok_or_else(|| ClientError::Protocol("no server hello".into()))?;
        let clock_offset_ms = hello.server_time_ms as f64 - (arrived_ms - round_trip_ms / 2.0);
        Ok(Probe { version: hello.version, answered_ms, round_trip_ms, clock_offset_ms })
    }

    /// Authenticates as `identity` and returns the bare control stream instead of a
    /// `Client`: for tools that speak the protocol themselves (tests, fuzzers, probes).
    pub async fn connect_raw(&self, identity: &Identity) -> Result<RawSession> {
        let (conn, stream, _) = self.authenticated(identity).await?;
        let Control { send, recv, decoder, .. } = stream;
        Ok(RawSession { conn, send, recv, decoder })
    }

    /// `enroll_once`, again after a backoff while the broker answers `OVERLOADED`, for
    /// up to `TransportOptions::enroll_retry_for` (a retry that would start past it is not
    /// made). Any other failure is returned at once: after a lost connection the account
    /// or device may exist, and a second `register` would say `CONFLICT`.
    async fn enroll(
        &self,
        user: &str,
        password: &str,
        device_name: &str,
        register: bool,
    ) -> Result<(Client, Identity)> {
        let started = tokio::time::Instant::now();
        let mut backoff = Backoff::new(ENROLL_BACKOFF_MIN_MS, ENROLL_BACKOFF_MAX_MS);
        loop {
            match self.enroll_once(user, password, device_name, register).await {
                Err(e) if e.code() == Some(ErrorCode::OVERLOADED) => {
                    let wait = std::time::Duration::from_millis(backoff.next_ms(random_u64()));
                    if started.elapsed() + wait > self.enroll_retry_for {
                        return Err(e);
                    }
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "enrolling again: the broker is overloaded");
                    tokio::time::sleep(wait).await;
                }
                done => return done,
            }
        }
    }

    /// One attempt at `enroll`, with a fresh device key.
    async fn enroll_once(
        &self,
        user: &str,
        password: &str,
        device_name: &str,
        register: bool,
    ) -> Result<(Client, Identity)> {
        let mut secret = [0u8; 32];
        random(&mut secret);
        let key = SigningKey::from_bytes(&secret);
        let (conn, stream, (user_id, device_id)) = self
            .in_time(async {
                let (conn, mut stream, transcript) = self.open().await?;
                let enroll = Enroll {
                    user: user.to_owned(),
                    password: password.to_owned(),
                    device_name: device_name.to_owned(),
                    public_key: Bytes::copy_from_slice(key.verifying_key().as_bytes()),
                    signature: Bytes::copy_from_slice(&key.sign(&transcript).to_bytes()),
                };
                let body = if register { RequestBody::Register(enroll) } else { RequestBody::Login(enroll) };
                let ids = stream.authenticate(&conn, body).await?;
                Ok((conn, stream, ids))
            })
            .await?;
        let identity = Identity { user: user.to_owned(), user_id, device_id, secret_key: hex(&secret) };
        Ok((Client::start(conn, stream, user_id, device_id, self.request_timeout), identity))
    }

    /// Connects and opens the control stream; returns them with the transcript the
    /// device signs on this connection (version 5: the TLS exporter's alone, so the auth
    /// request goes out with the hello, `Control::authenticate`, a round trip before the
    /// broker's hello could arrive).
    async fn open(&self) -> Result<(quinn::Connection, Control, Vec<u8>)> {
        let connecting =
            self.endpoint.connect(self.server, &self.server_name).map_err(|e| ClientError::Connect(e.to_string()))?;
        let conn = connecting.await.map_err(|e| tls::handshake_failure(&e))?;
        let (send, recv) = conn.open_bi().await?;
        let stream = Control { send, recv, decoder: FrameDecoder::new(MAX_SERVER_FRAME_BYTES), hello: None };
        let mut exporter = [0u8; 32];
        conn.export_keying_material(&mut exporter, switchboard_protocol::EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Protocol("keying material export failed".into()))?;
        Ok((conn, stream, switchboard_protocol::auth_transcript_v5(&exporter)))
    }

    /// The underlying endpoint (to close it when done with all clients).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

/// First backoff of `Connector::register` and `login` after an `OVERLOADED` answer, ms
/// (drawn from half of it to all of it, doubling each time).
pub const ENROLL_BACKOFF_MIN_MS: u64 = 100;

/// Longest backoff of `Connector::register` and `login` between `OVERLOADED` answers, ms:
/// a hash takes tens of milliseconds and a full queue drains within a second or two.
pub const ENROLL_BACKOFF_MAX_MS: u64 = 2_000;

/// How long the first attempt at authenticating a connection runs alone before a fresh
/// one joins it (`Connector::connect`; the first of the two to finish wins). Two seconds
/// is many handshakes' round trips on any link a chat client uses, and above QUIC's
/// first retransmission of a lost Initial (1 s), so a broker that is merely slow or
/// starting does not get a second handshake from every device at once.
pub const FRESH_ATTEMPT_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// What a broker said when probed (`Connector::probe`).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// The protocol version it speaks.
    pub version: u16,
    /// From the start of the connect to its hello, ms (QUIC and TLS handshake included).
    pub answered_ms: f64,
    /// QUIC's estimate of the round trip time, ms.
    pub round_trip_ms: f64,
    /// How far its wall clock is ahead of ours (negative: behind), ms: the time in its
    /// hello against ours when the hello arrived, less half a round trip.
    pub clock_offset_ms: f64,
}

/// An authenticated connection with its control stream, unmanaged.
pub struct RawSession {
    /// The connection.
    pub conn: quinn::Connection,
    /// Control stream, client to broker.
    pub send: quinn::SendStream,
    /// Control stream, broker to client.
    pub recv: quinn::RecvStream,
    /// Holds any bytes read past the authentication response.
    pub decoder: FrameDecoder,
}

/// The control stream before it is handed to the reader task.
struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// The broker's hello (set by `read_hello`).
    hello: Option<ServerHello>,
}

impl Control {
    async fn write<T: Serialize>(&mut self, conn: &quinn::Connection, msg: &T) -> Result<()> {
        // Before the broker's hello (which announces it), the protocol's own bound.
        let limit = self.hello.as_ref().map_or(PREAUTH_MAX_FRAME_BYTES, |h| h.limits.preauth_max_frame_bytes);
        let frame = frame_within(msg, limit)?;
        match self.send.write_all(&frame).await {
            Ok(()) => Ok(()),
            Err(_) => Err(closed(conn).await),
        }
    }

    async fn read<T: serde::de::DeserializeOwned>(&mut self, conn: &quinn::Connection) -> Result<T> {
        loop {
            if let Some(body) = self.decoder.next_frame().map_err(|e| ClientError::Protocol(e.to_string()))? {
                return decode(&body).map_err(|e| ClientError::Protocol(e.to_string()));
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) | Err(_) => return Err(closed(conn).await),
            }
        }
    }

    /// Our hello, as the first frame of the control stream.
    fn hello() -> ClientHello {
        ClientHello {
            magic: switchboard_protocol::MAGIC,
            version: switchboard_protocol::PROTOCOL_VERSION,
            agent: concat!("switchboard-client/", env!("CARGO_PKG_VERSION")).into(),
        }
    }

    /// Says hello and reads the broker's (a probe's whole exchange).
    async fn exchange_hellos(&mut self, conn: &quinn::Connection) -> Result<()> {
        self.write(conn, &Self::hello()).await?;
        self.read_hello(conn).await
    }

    async fn read_hello(&mut self, conn: &quinn::Connection) -> Result<()> {
        let hello: ServerHello = self.read(conn).await?;
        if hello.version != switchboard_protocol::PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!("the broker answered version {}", hello.version)));
        }
        self.hello = Some(hello);
        Ok(())
    }

    /// Sends the hello and the auth request in one write (one flight, version 5), then
    /// reads the broker's hello and its answer.
    async fn authenticate(&mut self, conn: &quinn::Connection, body: RequestBody) -> Result<(UserId, DeviceId)> {
        let mut flight = frame_within(&Self::hello(), PREAUTH_MAX_FRAME_BYTES)?.to_vec();
        let request = ClientFrame::Request(Request { id: 0, body });
        flight.extend_from_slice(&frame_within(&request, PREAUTH_MAX_FRAME_BYTES)?);
        if self.send.write_all(&flight).await.is_err() {
            return Err(closed(conn).await);
        }
        self.read_hello(conn).await?;
        match self.read(conn).await? {
            ServerFrame::Response { result: Ok(Reply::Authed { user_id, device_id }), .. } => Ok((user_id, device_id)),
            ServerFrame::Response { result: Err(e), .. } => Err(ClientError::Server(e)),
            other => Err(ClientError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// `msg` as one frame, or `TooLarge` if its body is over `limit` (the broker's announced
/// bound, beyond which it closes the connection): refused here, before sending.
fn frame_within<T: Serialize>(msg: &T, limit: u32) -> Result<Bytes> {
    encode_frame_within(msg, limit).map_err(|e| match e {
        FrameError::TooLarge { declared, limit } => ClientError::TooLarge { bytes: declared, limit },
        e => ClientError::Protocol(e.to_string()),
    })
}

/// The close reason once the connection has failed.
async fn closed(conn: &quinn::Connection) -> ClientError {
    conn.closed().await.into()
}

/// Outstanding requests; `None` once the reader has ended, so a request made after
/// that fails at once instead of waiting for an answer that cannot come.
type Waiters = Mutex<Option<HashMap<u32, oneshot::Sender<Result<Reply, ErrorBody>>>>>;

/// Encoded requests waiting for the writer task. A request is handed over whole, so
/// cancelling a request (say, by a timeout) can never leave half a frame on the stream.
const WRITE_QUEUE: usize = 256;

/// An authenticated connection. Cheap to share by reference across tasks: requests
/// are pipelined, each waits only for its own response.
pub struct Client {
    conn: quinn::Connection,
    writes: mpsc::Sender<bytes::Bytes>,
    waiters: Arc<Waiters>,
    next_id: AtomicU32,
    events: Mutex<Option<mpsc::Receiver<Event>>>,
    events_taken: Arc<AtomicBool>,
    /// My user id.
    pub user_id: UserId,
    /// This device's id.
    pub device_id: DeviceId,
    /// The broker's announced limits.
    pub limits: Limits,
    /// `TransportOptions::request_timeout`.
    request_timeout: std::time::Duration,
    /// When the control stream last carried anything from the broker.
    heard: Arc<Heard>,
}

/// When a connection's control stream last brought bytes: one relaxed store per chunk
/// read, read only when a request's timeout passes.
struct Heard {
    since: std::time::Instant,
    /// Milliseconds after `since`.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard { since: std::time::Instant::now(), last_ms: std::sync::atomic::AtomicU64::new(0) }
    }

    fn now(&self) {
        self.last_ms.store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

impl Client {
    fn start(
        conn: quinn::Connection,
        stream: Control,
        user_id: UserId,
        device_id: DeviceId,
        request_timeout: std::time::Duration,
    ) -> Client {
        let Control { send, recv, decoder, hello } = stream;
        let waiters: Arc<Waiters> = Arc::new(Mutex::new(Some(HashMap::new())));
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let events_taken = Arc::new(AtomicBool::new(false));
        let heard = Arc::new(Heard::new());
        tokio::spawn(datagram_loop(conn.clone(), tx.clone()));
        let reader =
            Reader { waiters: waiters.clone(), events: tx, events_taken: events_taken.clone(), heard: heard.clone() };
        tokio::spawn(read_loop(conn.clone(), recv, decoder, reader));
        let (writes, queued) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_loop(send, queued));
        Client {
            conn,
            writes,
            waiters,
            next_id: AtomicU32::new(1),
            events: Mutex::new(Some(rx)),
            events_taken,
            user_id,
            device_id,
            limits: hello.expect("open() keeps the server hello before start").limits,
            request_timeout,
            heard,
        }
    }

    /// Takes the event stream (once; later calls return `None`). Events are buffered up
    /// to `EVENT_BUFFER`. An application that lets the buffer fill is a slow consumer:
    /// the client closes the connection with `SLOW_CONSUMER` (the application reconnects
    /// and catches up) rather than stall responses behind unread events. Events that
    /// arrive before this is first called are kept while they fit, then dropped.
    pub fn events(&self) -> Option<Events> {
        self.events_taken.store(true, Ordering::Release);
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take().map(|rx| Events { rx })
    }

    /// Sends a request and waits for its response, until the broker has sent nothing on
    /// the control stream for `TransportOptions::request_timeout` while it waits: then
    /// the connection is closed and the error is `Closed` with no code (the request may
    /// or may not have been carried out: send it again on a new connection, as after any
    /// lost connection; writes are idempotent by their client message ids).
    pub async fn request(&self, body: RequestBody) -> Result<Reply> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = frame_within(&ClientFrame::Request(Request { id, body }), self.limits.max_client_frame_bytes)?;
        let (tx, mut rx) = oneshot::channel();
        let registered = match self.waiters.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(waiters) => {
                waiters.insert(id, tx);
                true
            }
            None => false,
        };
        if !registered {
            return Err(closed(&self.conn).await);
        }
        if self.writes.send(frame).await.is_err() {
            if let Some(waiters) = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                waiters.remove(&id);
            }
            return Err(closed(&self.conn).await);
        }
        let mut wait = self.request_timeout;
        let answer = loop {
            if self.request_timeout.is_zero() {
                break Some(rx.await);
            }
            match tokio::time::timeout(wait, &mut rx).await {
                Ok(answer) => break Some(answer),
                Err(_) => {
                    // The answer may wait behind what the stream is still carrying (a
                    // slow link, pages and events queued before it): only silence for
                    // the whole timeout means a stuck broker.
                    let silent = self.heard.silent_for();
                    if silent >= self.request_timeout {
                        break None;
                    }
                    wait = self.request_timeout - silent;
                }
            }
        };
        match answer {
            Some(Ok(Ok(reply))) => Ok(reply),
            Some(Ok(Err(e))) => Err(ClientError::Server(e)),
            Some(Err(_)) => Err(closed(&self.conn).await),
            // Closing already (revoked, going away): that reason, not ours.
            None if self.conn.close_reason().is_some() => Err(closed(&self.conn).await),
            None => {
                let reason = format!(
                    "the broker sent nothing for {} s while a request waited for its answer: this client closed \
                     the connection",
                    self.request_timeout.as_secs_f64()
                );
                self.conn.close(ErrorCode::TIMEOUT.0.into(), reason.as_bytes());
                Err(ClientError::Closed { code: None, reason })
            }
        }
    }

    /// Round trip to the broker; returns its clock.
    pub async fn ping(&self) -> Result<u64> {
        match self.request(RequestBody::Ping).await? {
            Reply::Pong { server_time_ms } => Ok(server_time_ms),
            other => Err(unexpected(other)),
        }
    }

    /// The direct conversation with `peer` (created if needed).
    pub async fn create_direct(&self, peer: &str) -> Result<ConversationSummary> {
        self.conversation(NewConversation::Direct { peer: peer.to_owned() }).await
    }

    /// A new group owned by me.
    pub async fn create_group(&self, title: &str, members: &[String]) -> Result<ConversationSummary> {
        self.conversation(NewConversation::Group { title: title.to_owned(), members: members.to_vec() }).await
    }

    async fn conversation(&self, new: NewConversation) -> Result<ConversationSummary> {
        match self.request(RequestBody::CreateConversation(new)).await? {
            Reply::Conversation(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// All my conversations (follows pages).
    pub async fn conversations(&self) -> Result<Vec<ConversationSummary>> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            match self.request(RequestBody::ListConversations { after }).await? {
                Reply::Conversations { items, more } => {
                    if !ascending_after(after, items.iter().map(|c| c.id)) {
                        // A broker repeating a page would have this loop for ever.
                        return Err(unexpected(Reply::Conversations { items, more }));
                    }
                    after = items.last().map(|c| c.id);
                    all.extend(items);
                    if !more || after.is_none() {
                        return Ok(all);
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Members of a conversation.
    pub async fn members(&self, conv: ConvId) -> Result<Vec<Member>> {
        match self.request(RequestBody::Members { conv }).await? {
            Reply::Members(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    /// The names of the users entry `seq` of `conv` names (its sender, and the users a
    /// membership entry adds, removes or gives a role), by ascending id: how to name
    /// people history shows who are no longer members. Errors: `FORBIDDEN` for a
    /// non-member, `NOT_FOUND` for seq 0 or one not durable yet.
    pub async fn entry_names(&self, conv: ConvId, seq: Seq) -> Result<Vec<switchboard_protocol::UserName>> {
        match self.request(RequestBody::EntryNames { conv, seq }).await? {
            Reply::Names(names) => Ok(names),
            other => Err(unexpected(other)),
        }
    }

    /// Adds users to a group; returns the seq of the membership entry.
    pub async fn add_members(&self, conv: ConvId, users: &[String], role: Role) -> Result<Seq> {
        self.appended(RequestBody::AddMembers { conv, users: users.to_vec(), role }).await.map(|(s, _)| s)
    }

    /// Removes a member from a group.
    pub async fn remove_member(&self, conv: ConvId, user: UserId) -> Result<Seq> {
        self.appended(RequestBody::RemoveMember { conv, user }).await.map(|(s, _)| s)
    }

    /// Changes a member's role in a group (the owner only); `Role::Owner` hands over
    /// ownership and makes the caller an admin. Returns the seq of the `RolesChanged`
    /// entry.
    pub async fn set_role(&self, conv: ConvId, user: UserId, role: Role) -> Result<Seq> {
        self.appended(RequestBody::SetRole { conv, user, role }).await.map(|(s, _)| s)
    }

    /// Renames a group (its owner or an admin); returns the seq of the `TitleChanged`
    /// entry. `CONFLICT` when the group has that title already; `INVALID` for a direct
    /// conversation or a title that is not a label (1 to 64 bytes of visible text).
    pub async fn set_title(&self, conv: ConvId, title: &str) -> Result<Seq> {
        self.appended(RequestBody::SetTitle { conv, title: title.to_owned() }).await.map(|(s, _)| s)
    }

    /// Leaves a group.
    pub async fn leave(&self, conv: ConvId) -> Result<Seq> {
        self.appended(RequestBody::Leave { conv }).await.map(|(s, _)| s)
    }

    /// Sends a text with a fresh idempotency key; returns its seq once durable.
    pub async fn send(&self, conv: ConvId, text: &str) -> Result<Seq> {
        self.send_with_id(conv, new_client_id(), text).await.map(|(s, _)| s)
    }

    /// Sends with a given idempotency key: resending the same key returns the original
    /// seq and `true`.
    pub async fn send_with_id(&self, conv: ConvId, client_id: ClientMsgId, text: &str) -> Result<(Seq, bool)> {
        self.appended(RequestBody::Send { conv, client_id, text: text.to_owned() }).await
    }

    /// Replaces the text of my message `target`.
    pub async fn edit(&self, conv: ConvId, target: Seq, text: &str) -> Result<Seq> {
        self.edit_with_id(conv, new_client_id(), target, text).await.map(|(s, _)| s)
    }

    /// `edit` with a given idempotency key: the same key again (for the same edit)
    /// returns the edit's seq and `true`; another write with it is `CONFLICT`.
    pub async fn edit_with_id(
        &self,
        conv: ConvId,
        client_id: ClientMsgId,
        target: Seq,
        text: &str,
    ) -> Result<(Seq, bool)> {
        self.appended(RequestBody::Edit { conv, client_id, target, text: text.to_owned() }).await
    }

    /// Deletes my message `target`.
    pub async fn delete(&self, conv: ConvId, target: Seq) -> Result<Seq> {
        self.delete_with_id(conv, new_client_id(), target).await.map(|(s, _)| s)
    }

    /// `delete` with a given idempotency key, as `edit_with_id`.
    pub async fn delete_with_id(&self, conv: ConvId, client_id: ClientMsgId, target: Seq) -> Result<(Seq, bool)> {
        self.appended(RequestBody::Delete { conv, client_id, target }).await
    }

    async fn appended(&self, body: RequestBody) -> Result<(Seq, bool)> {
        match self.request(body).await? {
            Reply::Appended { seq, duplicate } => Ok((seq, duplicate)),
            other => Err(unexpected(other)),
        }
    }

    /// A page of history, ascending; also returns the newest durable seq.
    pub async fn history(&self, conv: ConvId, page: Page, limit: u16) -> Result<(Vec<Entry>, Seq)> {
        match self.request(RequestBody::History { conv, page, limit }).await? {
            Reply::History { entries, last_seq } => Ok((entries, last_seq)),
            other => Err(unexpected(other)),
        }
    }

    /// My devices.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        match self.request(RequestBody::ListDevices).await? {
            Reply::Devices(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// Revokes this device (signing it out; its connections close, this one too, maybe
    /// before the answer). Another device's id is `FORBIDDEN`: that takes the account's
    /// password (`revoke_other_device`).
    pub async fn revoke_device(&self, device_id: DeviceId) -> Result<()> {
        match self.request(RequestBody::RevokeDevice { device_id }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Revokes one of my devices, proving the account's password (`AUTH_FAILED` if wrong,
    /// counted like `change_password`'s; `NOT_FOUND` if it is no device of mine), closing
    /// its connections.
    pub async fn revoke_other_device(&self, device_id: DeviceId, password: &str) -> Result<()> {
        match self.request(RequestBody::RevokeOtherDevice { device_id, password: password.to_owned() }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Changes my account's password, proving the current one (`AUTH_FAILED` if wrong,
    /// counted like a failed login; `INVALID` for a new one outside 8..=256 bytes). With
    /// `sign_out_others` every other device of the account is revoked. Returns once the
    /// new password is durable.
    pub async fn change_password(&self, current: &str, new: &str, sign_out_others: bool) -> Result<()> {
        let body = RequestBody::ChangePassword { current: current.to_owned(), new: new.to_owned(), sign_out_others };
        match self.request(body).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Reports that this device holds every entry up to each seq (`(conv, seq)` pairs,
    /// at most `MAX_MARKS_PER_REQUEST`). Lower values than stored are ignored.
    pub async fn mark_delivered(&self, marks: &[(ConvId, Seq)]) -> Result<()> {
        match self.request(RequestBody::MarkDelivered { marks: marks.to_vec() }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Marks `conv` read up to `seq`; returns my watermarks once durable.
    pub async fn mark_read(&self, conv: ConvId, seq: Seq) -> Result<Receipt> {
        match self.request(RequestBody::MarkRead { conv, seq }).await? {
            Reply::Receipt(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Every member's receipts in `conv`, by user id.
    pub async fn receipts(&self, conv: ConvId) -> Result<Vec<Receipt>> {
        match self.request(RequestBody::Receipts { conv }).await? {
            Reply::Receipts(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// All my conversations with unread counts and my watermarks (follows pages).
    pub async fn conversation_states(&self) -> Result<Vec<ConversationState>> {
        every_conversation_state(|body| self.request(body), unexpected).await
    }

    /// One catch-up page of `conv` after seq `after`.
    pub async fn catch_up(&self, conv: ConvId, after: Seq, limit: u16) -> Result<CatchUpPage> {
        match self.request(RequestBody::CatchUp { conv, after, limit }).await? {
            Reply::CatchUp(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// Marks this device away (`true`) or back (`false`).
    pub async fn set_away(&self, away: bool) -> Result<()> {
        match self.request(RequestBody::SetPresence { away }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Presence of `users` (empty: everyone who shares a conversation with me).
    pub async fn presence(&self, users: &[UserId]) -> Result<Vec<PresenceInfo>> {
        match self.request(RequestBody::Presence { users: users.to_vec() }).await? {
            Reply::Presence(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Blocks the user named `user` (or stops, with `blocked` false): while blocked they
    /// cannot start a direct conversation with me, write in ours, or add me to a group, and
    /// neither of us sees the other's presence or typing. `NOT_FOUND` for no such user,
    /// `INVALID` for myself or past `MAX_BLOCKED` users. Returns once durable.
    pub async fn block(&self, user: &str, blocked: bool) -> Result<()> {
        match self.request(RequestBody::Block { user: user.to_owned(), blocked }).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The users I block, by ascending id.
    pub async fn blocked_users(&self) -> Result<Vec<switchboard_protocol::BlockedUser>> {
        match self.request(RequestBody::BlockedUsers).await? {
            Reply::BlockedUsers(users) => Ok(users),
            other => Err(unexpected(other)),
        }
    }

    /// My settings, replaced first by `set` if given.
    pub async fn settings(&self, set: Option<Settings>) -> Result<Settings> {
        match self.request(RequestBody::Settings { set }).await? {
            Reply::Settings(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Sends an ephemeral signal on the control stream (no response).
    pub async fn signal(&self, signal: Signal) -> Result<()> {
        let frame = encode_frame(&ClientFrame::Signal(signal)).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match self.writes.send(frame).await {
            Ok(()) => Ok(()),
            Err(_) => Err(closed(&self.conn).await),
        }
    }

    /// `typing` without waiting: as a datagram, else on the control stream if its write
    /// queue has room, else dropped (a late typing signal is worth nothing, and the
    /// broker ends an indicator by itself). Whether it was sent.
    pub fn try_typing(&self, conv: ConvId, typing: bool) -> bool {
        let Ok(frame) = encode_frame(&ClientFrame::Signal(Signal::Typing { conv, typing })) else { return false };
        if self.conn.max_datagram_size().is_some_and(|max| max >= frame.len())
            && self.conn.send_datagram(frame.clone()).is_ok()
        {
            return true;
        }
        self.writes.try_send(frame).is_ok()
    }

    /// Says I started (`true`) or stopped typing in `conv`; repeat `true` at least every
    /// `typing_ttl_ms / 2` (3 s by default) while typing. Sent as a QUIC datagram when the
    /// connection has them (both ends enabled datagrams), else as `Client::signal` on the
    /// control stream. No answer: a datagram may be lost, and the broker drops signals
    /// for conversations I am not in and beyond its per-connection rate.
    pub async fn typing(&self, conv: ConvId, typing: bool) -> Result<()> {
        let signal = Signal::Typing { conv, typing };
        let frame =
            encode_frame(&ClientFrame::Signal(signal.clone())).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if self.conn.max_datagram_size().is_some_and(|max| max >= frame.len()) && self.conn.send_datagram(frame).is_ok()
        {
            return Ok(());
        }
        self.signal(signal).await
    }

    /// The QUIC connection (statistics, round-trip time, datagram support).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Waits until the connection is closed and returns why.
    pub async fn closed(&self) -> ClientError {
        closed(&self.conn).await
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"bye");
    }
}

/// What the control stream's reader hands its frames to.
struct Reader {
    waiters: Arc<Waiters>,
    events: mpsc::Sender<Event>,
    events_taken: Arc<AtomicBool>,
    heard: Arc<Heard>,
}

async fn read_loop(conn: quinn::Connection, mut recv: quinn::RecvStream, mut decoder: FrameDecoder, reader: Reader) {
    let Reader { waiters, events, events_taken, heard } = reader;
    'read: loop {
        loop {
            let body = match decoder.next_frame() {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    conn.close(e.code().0.into(), b"bad frame from broker");
                    break 'read;
                }
            };
            match decode::<ServerFrame>(&body) {
                Ok(ServerFrame::Response { id, result }) => {
                    let waiter = waiters.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|w| w.remove(&id));
                    if let Some(tx) = waiter {
                        let _ = tx.send(result);
                    }
                }
                Ok(ServerFrame::Event(event)) => {
                    // Never wait here: responses would queue behind unread events.
                    let full = matches!(events.try_send(event), Err(mpsc::error::TrySendError::Full(_)));
                    if full && events_taken.load(Ordering::Acquire) {
                        conn.close(ErrorCode::SLOW_CONSUMER.0.into(), b"client event buffer full");
                        break 'read;
                    }
                }
                Err(e) => {
                    conn.close(e.code().0.into(), b"bad frame from broker");
                    break 'read;
                }
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => {
                heard.now();
                decoder.push(&chunk.bytes);
            }
            Ok(None) | Err(_) => break,
        }
    }
    // Dropping the waiters fails every outstanding request with the close reason, and
    // `None` fails every later one at once.
    waiters.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// Delivers events that arrive as QUIC datagrams (typing) into the event channel, until
/// the connection closes. A datagram holds one whole frame, length prefix included;
/// anything else is ignored. Never waits: when the application's buffer is full a
/// datagram event is dropped (it is ephemeral, and ends by its timeout anyway).
async fn datagram_loop(conn: quinn::Connection, events: mpsc::Sender<Event>) {
    while let Ok(datagram) = conn.read_datagram().await {
        if datagram.len() > MAX_DATAGRAM_BYTES as usize {
            continue;
        }
        let mut decoder = FrameDecoder::new(MAX_DATAGRAM_BYTES);
        decoder.push(&datagram);
        let Ok(Some(body)) = decoder.next_frame() else { continue };
        if decoder.buffered() != 0 {
            continue;
        }
        if let Ok(ServerFrame::Event(event)) = decode::<ServerFrame>(&body) {
            let _ = events.try_send(event);
        }
    }
}

async fn write_loop(mut send: quinn::SendStream, mut queued: mpsc::Receiver<bytes::Bytes>) {
    let mut batch = Vec::new();
    while queued.recv_many(&mut batch, 64).await > 0 {
        if send.write_all_chunks(&mut batch).await.is_err() {
            break;
        }
        batch.clear();
    }
    // All `Client` handles are gone (or the stream failed): finish cleanly.
    let _ = send.finish();
}

/// The event stream of one client.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the connection is closed.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

/// Follows `ConversationStates` pages from the first to the last: `request` makes one
/// request, `unexpected` turns a reply of another kind into the caller's error.
pub(crate) async fn every_conversation_state<E, F, Fut>(
    mut request: F,
    unexpected: fn(Reply) -> E,
) -> std::result::Result<Vec<ConversationState>, E>
where
    F: FnMut(RequestBody) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Reply, E>>,
{
    let mut all = Vec::new();
    let mut after = None;
    loop {
        match request(RequestBody::ConversationStates { after }).await? {
            Reply::ConversationStates { items, more } => {
                if !ascending_after(after, items.iter().map(|c| c.summary.id)) {
                    // A broker repeating a page would have this loop for ever.
                    return Err(unexpected(Reply::ConversationStates { items, more }));
                }
                after = items.last().map(|c| c.summary.id);
                all.extend(items);
                if !more || after.is_none() {
                    return Ok(all);
                }
            }
            other => return Err(unexpected(other)),
        }
    }
}

/// Whether `ids` ascend strictly, all past `after`: what a page of a listing must be.
fn ascending_after(after: Option<ConvId>, ids: impl Iterator<Item = ConvId>) -> bool {
    let mut last = after;
    for id in ids {
        if last.is_some_and(|l| id <= l) {
            return false;
        }
        last = Some(id);
    }
    true
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {reply:?}"))
}

/// A fresh random idempotency key.
pub fn new_client_id() -> ClientMsgId {
    let mut id = [0u8; 16];
    random(&mut id);
    id
}

fn random(out: &mut [u8]) {
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), out).expect("the OS random source is available");
}

fn signing_key(hex_key: &str) -> Result<SigningKey> {
    let bytes =
        unhex(hex_key).ok_or_else(|| ClientError::Connect("identity secret key is not 64 hex digits".into()))?;
    let key: [u8; 32] =
        bytes.try_into().map_err(|_| ClientError::Connect("identity secret key is not 32 bytes".into()))?;
    Ok(SigningKey::from_bytes(&key))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex (either case); `None` if malformed.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use ring::{digest, hkdf};

    use super::*;

    /// A broker that repeats a page (or pages backwards) ends the walk with an error
    /// after that page; before, the walk asked for ever and held every page it got.
    #[tokio::test]
    async fn a_listing_that_does_not_move_on_is_refused() {
        use switchboard_protocol::{ConversationKind, ConversationState, ConversationSummary, Role};
        let state = |id| ConversationState {
            summary: ConversationSummary {
                id,
                kind: ConversationKind::Group,
                title: "g".into(),
                last_seq: 0,
                member_count: 2,
                my_role: Role::Member,
            },
            unread: 0,
            delivered_up_to: 0,
            read_up_to: 0,
        };
        let asked = std::cell::Cell::new(0);
        let repeating = |_| {
            asked.set(asked.get() + 1);
            std::future::ready(Ok::<_, ClientError>(Reply::ConversationStates {
                items: vec![state(3), state(4)],
                more: true,
            }))
        };
        let walk = every_conversation_state(repeating, unexpected);
        let walked = tokio::time::timeout(std::time::Duration::from_secs(5), walk).await.expect("the walk ended");
        assert!(walked.is_err());
        assert_eq!(asked.get(), 2, "refused at the first page that did not move on");
        let pages = std::cell::RefCell::new(vec![vec![state(5)], vec![state(1), state(2)]]);
        let honest = |_| {
            let items = pages.borrow_mut().pop().unwrap_or_default();
            let more = !pages.borrow().is_empty();
            std::future::ready(Ok::<_, ClientError>(Reply::ConversationStates { items, more }))
        };
        let all = every_conversation_state(honest, unexpected).await.unwrap();
        assert_eq!(all.iter().map(|s| s.summary.id).collect::<Vec<_>>(), vec![1, 2, 5]);
        assert!(!ascending_after(Some(5), [5].into_iter()) && !ascending_after(None, [2, 2].into_iter()));
    }

    /// The output length `ring`'s HKDF expands to.
    struct Len(usize);

    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    /// HKDF-Expand-Label (RFC 8446 section 7.1).
    fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &[u8], context: &[u8], len: usize) -> Vec<u8> {
        let full = [b"tls13 ".as_slice(), label].concat();
        let (len_be, full_len, context_len) = ((len as u16).to_be_bytes(), [full.len() as u8], [context.len() as u8]);
        let info = [&len_be[..], &full_len, &full, &context_len, context];
        let mut out = vec![0; len];
        let prk = hkdf::Prk::new_less_safe(alg, secret);
        let okm = prk.expand(&info, Len(len)).map_err(|_| "expand");
        okm.and_then(|okm| okm.fill(&mut out).map_err(|_| "fill")).unwrap_or_else(|e| panic!("{e}"));
        out
    }

    /// TLS-Exporter(label, "", 32) from an exporter master secret (RFC 8446 section 7.5).
    fn exporter(alg: hkdf::Algorithm, secret: &[u8]) -> Vec<u8> {
        let hash = alg.hmac_algorithm().digest_algorithm();
        let label = switchboard_protocol::EXPORTER_LABEL;
        let derived = expand_label(alg, secret, label, digest::digest(hash, b"").as_ref(), hash.output_len());
        expand_label(alg, &derived, b"exporter", digest::digest(hash, b"").as_ref(), 32)
    }

    /// The "Device signature" vectors of docs/PROTOCOL.md, each computed here and found
    /// in the document.
    #[test]
    fn device_signature_vectors_match() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let transcript = switchboard_protocol::auth_transcript_v5(&[9; 32]);
        let transcript_v4 = switchboard_protocol::auth_transcript(&[7; 32], &[9; 32]);
        let key = SigningKey::from_bytes(&[0x42; 32]);
        let computed = [
            ("exporter, SHA-256, S = [0x5a; 32]", hex(&exporter(hkdf::HKDF_SHA256, &[0x5a; 32]))),
            ("exporter, SHA-384, S = [0x5a; 48]", hex(&exporter(hkdf::HKDF_SHA384, &[0x5a; 48]))),
            ("public key of the Ed25519 secret key [0x42; 32]", hex(key.verifying_key().as_bytes())),
            ("version 5 transcript, exporter [9; 32] (57 bytes)", hex(&transcript)),
            ("its signature by that key", hex(&key.sign(&transcript).to_bytes())),
            ("version 4 transcript, nonce [7; 32], exporter [9; 32] (89 bytes)", hex(&transcript_v4)),
            ("its signature by that key, version 4", hex(&key.sign(&transcript_v4).to_bytes())),
        ];
        assert_eq!((transcript.len(), transcript_v4.len()), (57, 89));
        for (what, value) in computed {
            let line = format!("\n{what}: {value}\n");
            assert!(doc.contains(&line), "docs/PROTOCOL.md lacks the line{line}");
        }
    }
}
