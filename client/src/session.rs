//! `Session`: a device's connection that hides reconnects. One task owns the connection,
//! the merge of live events with catch-up pages (`merge.rs`), the cursors and every
//! pending request; `Session` handles talk to it through a bounded channel, and the
//! application reads one gap-free, duplicate-free `SessionEvents` stream.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use switchboard_protocol::limits::{MAX_MARKS_PER_REQUEST, TYPING_TTL_MS};
use switchboard_protocol::{
    Body, ClientMsgId, ConvId, ConversationState, DeviceId, Entry, ErrorCode, Event, FileId, FileProgress, FileState,
    PresenceInfo, Receipt, Reply, RequestBody, Seq, UserId,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::typing_shown::TypingShown;

use crate::cursors::{CursorStore, Cursors, Saved};
use crate::merge::{Fetch, Merge};
use crate::{Client, ClientError, Connector, Events, Identity, new_client_id};

/// Knobs of a `Session`. `Default` gives the values below.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// First reconnect delay, ms (100). Each failed attempt doubles it.
    pub backoff_min_ms: u64,
    /// Longest reconnect delay, ms (10,000). The delay actually waited is drawn
    /// uniformly from its upper half (jitter), so a broker restart is not met by every
    /// device at the same instant. For 30 s after a `GOING_AWAY` the delays stay within
    /// `RESTART_RETRY_MAX_MS` (1 s) until a connect succeeds.
    pub backoff_max_ms: u64,
    /// A connect attempt (QUIC handshake, hellos, proof) that takes longer fails, ms
    /// (10,000).
    pub connect_timeout_ms: u64,
    /// Delivered receipts are reported at most this often, ms (150): one `MarkDelivered`
    /// with the highest taken seq per conversation, not one request per message.
    pub delivered_batch_ms: u64,
    /// Cursors are saved at most this often, ms (500), and when the session closes.
    /// After a crash the application sees again at most what it took in this window.
    pub persist_ms: u64,
    /// Entries held beyond gaps, in all conversations (10,000). Past it an entry beyond
    /// a gap is dropped and fetched again by catch-up.
    pub max_held: usize,
    /// Events queued for the application (4,096). When it is full, entries wait in the
    /// merge (held, or fetched again later) and receipts, presence and typing events
    /// are dropped: the application is too slow to show them while they are current.
    pub event_queue: usize,
    /// Requests waiting for a connection or an answer (256). A request beyond it fails
    /// at once with `SessionError::Busy`.
    pub max_pending: usize,
    /// Catch-up pages outstanding at once (4), so responses never crowd the broker's
    /// per-device queue.
    pub max_fetching: usize,
    /// Times a request the broker refused with `OVERLOADED` (it is shedding load), a
    /// read that lists members, a `FileInfo` or a `SendFiles` refused with
    /// `RATE_LIMITED` (the user's allowance of member rows), a `History` page so refused
    /// (its allowance of log entries), or a message write (`Send`,
    /// `SendFiles`, `Edit`, `Delete`) refused with `RATE_LIMITED` (the user's allowance of
    /// writes), is sent again before the refusal reaches the caller (6), and a
    /// catch-up page so refused is asked for again, each after a reconnect-like
    /// backoff (`backoff_min_ms` doubling up to `backoff_max_ms`, with jitter: about 6 s
    /// in all with the defaults; a new connection sends it at once). Only requests that
    /// are safe to repeat are sent again; a write carries the same client id, so it
    /// still takes effect once. A request whose caller stopped waiting is dropped
    /// instead of sent again, and gives its `max_pending` place back.
    pub overload_retries: u32,
    /// Member rows of the receipts asked for after each connect, for conversations with
    /// nothing new to page through (20,000: half the broker's default burst of member
    /// rows, which catch-up pages and member lists draw on too): the conversations with
    /// the fewest members first; the rest show what live events and later pages bring.
    pub receipts_rows_per_connect: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            backoff_min_ms: 100,
            backoff_max_ms: 10_000,
            connect_timeout_ms: 10_000,
            delivered_batch_ms: 150,
            persist_ms: 500,
            max_held: 10_000,
            event_queue: 4096,
            max_pending: 256,
            max_fetching: 4,
            overload_retries: 6,
            receipts_rows_per_connect: 20_000,
        }
    }
}

/// What a `SessionEvents` stream yields.
#[derive(Debug)]
pub enum SessionEvent {
    /// An entry, per conversation in seq order with no gap and no duplicate, across
    /// reconnects and restarts (from the saved cursors). Entries this device wrote come
    /// too (fetched after their ack, since the broker does not push them back).
    Entry(Entry),
    /// A member's receipt watermarks (mine too, as my other devices move them). After
    /// each connect, every member's receipts of each conversation with something new,
    /// with the page that completes its catch-up, and of those with nothing new, asked
    /// for after `CaughtUp`, fewest members first, up to
    /// `SessionConfig::receipts_rows_per_connect` rows (at most `max_fetching` at a
    /// time, each once the event queue has room for all of its members). Watermarks
    /// only grow: keep the higher of what you hold and what comes (an answer read
    /// before a live change may arrive after it). A live one that finds the queue full
    /// is not lost: its conversation's receipts are asked for again once there is room.
    Receipt(Receipt),
    /// A contact's presence; after each connect, one for every contact (a snapshot).
    Presence(PresenceInfo),
    /// A user whose presence was handed on is no contact any more (a block, either way,
    /// or no conversation shared now), as the snapshot after a connect found: it leaves
    /// such a user out. Show its presence as unknown, not as last told (which stood for
    /// good, "online" included: a review). Nothing is pushed live when someone stops
    /// being a contact: until the next connect the last state told stands (PROTOCOL.md,
    /// "Blocking").
    PresenceGone {
        /// Who.
        user: UserId,
        /// Its name, as its last presence gave it.
        name: String,
    },
    /// A member started or stopped typing. Each start handed on is followed by its stop,
    /// at the latest when the connection ends or `Left` is told of the conversation (the
    /// broker forgets indicators when it restarts, and a stop pushed while disconnected
    /// is not sent again), so no indicator stays shown.
    Typing {
        /// Conversation.
        conv: ConvId,
        /// Who.
        user: UserId,
        /// Started or stopped.
        typing: bool,
    },
    /// This user is no longer a member of `conv`: it left (from any device) or was
    /// removed: right after the entry saying so when that entry is handed on (live or in
    /// a page), else found after a connect (`ConversationStates` no longer lists it) or
    /// when its catch-up was refused. When this is taken the conversation's cursor moves
    /// among those of conversations left (the newest `LEFT_CURSORS_MAX` are kept, saved
    /// with the others), and nothing more of it comes unless the user is added back:
    /// then its entries resume after that cursor, those sent while the user was out
    /// included (a member added back reads the whole history), not from its start. The
    /// entry that removed the user is shown only if it came live before this: a former
    /// member reads nothing of the conversation.
    Left {
        /// Conversation.
        conv: ConvId,
    },
    /// An upload of mine, or one attached in a conversation of mine, moved (throttled by
    /// the broker; the final state always arrives while connected). Events are not
    /// replayed after a reconnect: for each upload last seen in progress (per audience,
    /// up to `FILES_UNSETTLED_MAX`), the session asks `FileInfo` once caught up and
    /// says its state now, if it moved (a file gone as `Failed` with `NOT_FOUND`).
    File(FileProgress),
    /// Connected and authenticated; catch-up starts. This, `CaughtUp` and `Disconnected`
    /// are never dropped for a full queue: they wait for room, ahead of what comes after
    /// them (of several drops and reconnects while the application does not read, the
    /// last `Disconnected` and `Connected` are kept).
    Connected,
    /// Every conversation is caught up to what the broker had at the connect; from now
    /// on entries are live.
    CaughtUp,
    /// The connection dropped; the session reconnects after `retry_in_ms`.
    Disconnected {
        /// Why.
        error: ClientError,
        /// Delay before the next attempt, ms.
        retry_in_ms: u64,
    },
    /// The session stopped for good: the device was revoked, its proof refused or its
    /// account disabled (`DEVICE_REVOKED`, `AUTH_FAILED`, `UNSUPPORTED_VERSION`,
    /// `ACCOUNT_DISABLED`), or the broker's certificate refused before the session ever
    /// connected (`ClientError::Untrusted`; once connected, it is retried). The stream
    /// ends after it.
    Stopped(ClientError),
}

/// Failures of a request made through a `Session`.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The broker answered with an error (displays `NAME (number): message`).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The connection dropped while this request was outstanding and it is not safe to
    /// send again (it has no idempotency key): it may or may not have taken effect.
    #[error("connection lost while the request was outstanding; it may or may not have taken effect")]
    Interrupted,
    /// Too many requests are pending (`SessionConfig::max_pending`).
    #[error("too many pending requests")]
    Busy,
    /// The session has stopped (closed, or a permanent failure).
    #[error("the session has stopped")]
    Stopped,
}

impl SessionError {
    /// The stable error code, if the failure carries one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SessionError::Client(e) => e.code(),
            _ => None,
        }
    }
}

/// A device's reconnecting connection to the broker.
///
/// It connects, and after any drop (`GOING_AWAY`, idle timeout, `SLOW_CONSUMER`, a
/// network error, a broker restart) reconnects with exponential backoff and jitter
/// (`SessionConfig`). `DEVICE_REVOKED`, `AUTH_FAILED`, `UNSUPPORTED_VERSION` and
/// `ACCOUNT_DISABLED` are permanent: the stream yields `SessionEvent::Stopped` and ends.
///
/// After each connect it catches up (PROTOCOL.md section 11): `ConversationStates`, then
/// `CatchUp` pages after each conversation's cursor until complete, while live events
/// keep arriving; the merge hands on an entry only when its seq is the cursor + 1.
/// Delivered receipts are reported automatically, batched; cursors are saved in the
/// `CursorStore` (debounced) so a restarted process resumes where the application
/// stopped reading.
///
/// Requests queue while disconnected and are sent on the next connection. A request
/// outstanding when the connection drops is sent again after the reconnect when that is
/// safe: `send`, `edit` and `delete` carry a client id, so they take effect exactly once
/// (`duplicate` is then `true` if the first attempt had landed), and reads and
/// watermark updates are idempotent. Creating a group, adding or removing members,
/// leaving and revoking a device are not sent again: they fail with
/// `SessionError::Interrupted`. A request the broker refuses with `OVERLOADED` (past
/// saturation it sheds writes rather than queue them), or a read that lists members, a
/// `FileInfo` or a `SendFiles` refused with `RATE_LIMITED` (the allowance of member rows
/// these draw on), a `History` page so refused (the allowance of log entries), or a
/// write with a client id refused with `RATE_LIMITED` (the user's
/// allowance of writes), is sent again after a
/// backoff when it is safe to repeat, up to `overload_retries` times; so is a catch-up
/// page, and a write with a client id answered `INTERNAL` (its conversation's owner
/// failed: the write may or may not have landed, and the same id says which, once).
/// At most `max_pending`
/// requests wait; beyond that a request fails with `SessionError::Busy`.
///
/// ```no_run
/// # async fn demo(connector: switchboard_client::Connector, identity: switchboard_client::Identity) -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use switchboard_client::{FileCursors, Session, SessionConfig, SessionEvent};
/// let store = Arc::new(FileCursors::new("cursors.json", identity.user_id, identity.device_id));
/// let (session, mut events) = Session::start(connector, identity, store, SessionConfig::default())?;
/// session.send(42, "hello").await?;
/// while let Some(event) = events.next().await {
///     match event {
///         SessionEvent::Entry(e) => println!("{}#{}", e.conv, e.seq),
///         SessionEvent::Stopped(e) => return Err(e.into()),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Session {
    commands: mpsc::Sender<Command>,
    /// My user id.
    pub user_id: UserId,
    /// This device's id.
    pub device_id: DeviceId,
}

/// The application's side of a session: one stream of events. Taking an entry from it
/// moves that conversation's saved cursor and delivered receipt.
pub struct SessionEvents {
    rx: mpsc::Receiver<SessionEvent>,
    taken: Arc<Taken>,
}

/// What the application has taken, shared between the stream and the session task.
struct Taken {
    cursors: Mutex<Cursors>,
    /// Conversations whose `Left` was taken, with the cursor taken then, not yet moved
    /// among the left ones in the store (`CursorStore::save`).
    left: Mutex<Vec<(ConvId, Seq)>>,
    /// Set when the stream has something new for the task; cleared by the task.
    pending: AtomicBool,
    notify: Notify,
}

impl SessionEvents {
    /// The next event; `None` once the session has stopped.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next_event(cx)).await
    }

    fn poll_next_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<SessionEvent>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(event)) = &polled {
            match event {
                SessionEvent::Entry(e) => {
                    let mut cursors = self.taken.cursors.lock().unwrap_or_else(|p| p.into_inner());
                    let c = cursors.entry(e.conv).or_default();
                    *c = (*c).max(e.seq);
                }
                SessionEvent::Left { conv } => {
                    let cursor = self.taken.cursors.lock().unwrap_or_else(|p| p.into_inner()).remove(conv);
                    self.taken.left.lock().unwrap_or_else(|p| p.into_inner()).push((*conv, cursor.unwrap_or(0)));
                }
                _ => {}
            }
            // One wake-up of the task per batch of taken events, not one per event.
            if !self.taken.pending.swap(true, Ordering::AcqRel) {
                self.taken.notify.notify_one();
            }
        }
        polled
    }
}

impl futures_core::Stream for SessionEvents {
    type Item = SessionEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SessionEvent>> {
        self.poll_next_event(cx)
    }
}

/// A request to the session task.
enum Command {
    Request { body: RequestBody, reply: oneshot::Sender<Result<Reply, SessionError>> },
    Typing { conv: ConvId, typing: bool },
    Away(bool),
    Close(oneshot::Sender<()>),
}

impl Session {
    /// Starts the session task (inside a tokio runtime): it connects at once. Fails only
    /// if the store cannot be read.
    pub fn start(
        connector: Connector,
        identity: Identity,
        store: Arc<dyn CursorStore>,
        config: SessionConfig,
    ) -> std::io::Result<(Session, SessionEvents)> {
        let Saved { cursors, left } = store.load()?;
        let (commands, command_rx) = mpsc::channel(64);
        let (out, rx) = mpsc::channel(config.event_queue.max(1));
        let taken = Arc::new(Taken {
            cursors: Mutex::new(cursors.clone()),
            left: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            notify: Notify::new(),
        });
        let session = Session { commands, user_id: identity.user_id, device_id: identity.device_id };
        let (done_tx, done_rx) = mpsc::channel(config.max_pending + config.max_fetching + 16);
        let task = Task {
            merge: Merge::new(cursors.iter().map(|(&c, &s)| (c, s)), config.max_held).with_left(left.iter()),
            backoff: Backoff::new(config.backoff_min_ms, config.backoff_max_ms),
            reported: cursors.clone(),
            persisted: cursors,
            connector,
            identity,
            store,
            config,
            out,
            taken: taken.clone(),
            commands: command_rx,
            done_tx,
            done_rx,
            live: None,
            generation: 0,
            connecting: None,
            retry_at: Some(Instant::now()),
            restarting_until: None,
            pending: BTreeMap::new(),
            next_token: 0,
            away: false,
            away_sent: None,
            away_in_flight: false,
            presence_since_snapshot: None,
            presence_backlog: BTreeMap::new(),
            presence_shown: HashMap::new(),
            presence_gone: BTreeMap::new(),
            lifecycle: VecDeque::new(),
            member_counts: HashMap::new(),
            typing: TypingShown::default(),
            states_done: false,
            caught_up_sent: false,
            pages_retry_set: false,
            receipts_due: VecDeque::new(),
            receipts_outstanding: 0,
            receipts_rows_in_flight: 0,
            files_unsettled: HashMap::new(),
            files_due: VecDeque::new(),
            files_outstanding: 0,
            files_events_in_flight: 0,
            marks_outstanding: 0,
            mark_at: None,
            persist_at: None,
            saving: false,
        };
        tokio::spawn(task.run());
        Ok((session, SessionEvents { rx, taken }))
    }

    /// Sends a request (queued while disconnected) and waits for its answer; see the
    /// type's documentation for what is sent again after a reconnect.
    pub async fn request(&self, body: RequestBody) -> Result<Reply, SessionError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Request { body, reply }).await.map_err(|_| SessionError::Stopped)?;
        rx.await.map_err(|_| SessionError::Stopped)?
    }

    /// Sends a text with a fresh client id; returns its seq (exactly once across
    /// reconnects).
    pub async fn send(&self, conv: ConvId, text: &str) -> Result<Seq, SessionError> {
        self.send_with_id(conv, new_client_id(), text).await.map(|(seq, _)| seq)
    }

    /// Sends a text with a given client id: the same id always gives the same seq, with
    /// `true` when the message had landed before.
    pub async fn send_with_id(
        &self,
        conv: ConvId,
        client_id: ClientMsgId,
        text: &str,
    ) -> Result<(Seq, bool), SessionError> {
        appended(self.request(RequestBody::Send { conv, client_id, text: text.to_owned() }).await?)
    }

    /// Replaces the text of my message `target`; returns the edit's seq.
    pub async fn edit(&self, conv: ConvId, target: Seq, text: &str) -> Result<Seq, SessionError> {
        let body = RequestBody::Edit { conv, client_id: new_client_id(), target, text: text.to_owned() };
        appended(self.request(body).await?).map(|(seq, _)| seq)
    }

    /// Deletes my message `target`; returns the delete's seq.
    pub async fn delete(&self, conv: ConvId, target: Seq) -> Result<Seq, SessionError> {
        appended(self.request(RequestBody::Delete { conv, client_id: new_client_id(), target }).await?)
            .map(|(seq, _)| seq)
    }

    /// Marks `conv` read up to `seq`; returns my watermarks once durable.
    pub async fn mark_read(&self, conv: ConvId, seq: Seq) -> Result<Receipt, SessionError> {
        match self.request(RequestBody::MarkRead { conv, seq }).await? {
            Reply::Receipt(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// All my conversations with unread counts and my watermarks (follows pages).
    pub async fn conversation_states(&self) -> Result<Vec<ConversationState>, SessionError> {
        crate::every_conversation_state(|body| self.request(body), unexpected).await
    }

    /// Marks this device away (`true`) or back; kept across reconnects (a new
    /// connection starts online, so the session says it again after each connect).
    pub async fn set_away(&self, away: bool) -> Result<(), SessionError> {
        self.commands.send(Command::Away(away)).await.map_err(|_| SessionError::Stopped)
    }

    /// Says I started or stopped typing in `conv`. Ephemeral: dropped while
    /// disconnected. Repeat `true` every `TYPING_REFRESH_MS` while typing.
    pub async fn typing(&self, conv: ConvId, typing: bool) -> Result<(), SessionError> {
        self.commands.send(Command::Typing { conv, typing }).await.map_err(|_| SessionError::Stopped)
    }

    /// Stops the session: reports what was taken as delivered (briefly, if connected),
    /// saves the cursors, closes the connection and ends the stream. Pending requests
    /// fail with `SessionError::Stopped`.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// How often a typing indicator is repeated while typing: half the broker's expiry.
pub const TYPING_REFRESH_MS: u64 = TYPING_TTL_MS as u64 / 2;

fn appended(reply: Reply) -> Result<(Seq, bool), SessionError> {
    match reply {
        Reply::Appended { seq, duplicate } => Ok((seq, duplicate)),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: Reply) -> SessionError {
    SessionError::Client(ClientError::Protocol(format!("unexpected reply {reply:?}")))
}

/// Whether a refusal with `code` of `body` says only that the broker shed it, so that
/// after a backoff it may succeed unchanged: `OVERLOADED` (nothing was done), or
/// `RATE_LIMITED` of a request that draws on the user's allowance of member rows (a
/// read that lists members or conversations, or the user's blocks, a `MarkRead` that
/// raised nothing, or one that decides who may read a file: `FileInfo`,
/// `SendFiles`; it refills within a second or two) or of log entries (`History`,
/// `CatchUp`: it refills 20,000 entries a second), `RATE_LIMITED` of a write that
/// carries a client id (the user's allowance of writes, `writes_per_sec`: it refills
/// several a second, and the same id sent again lands the write once; other
/// `RATE_LIMITED` allowances refill too slowly to wait for unasked), or `INTERNAL` of a write that carries a client id: its
/// conversation's actor failed with it in flight (PROTOCOL.md: retry with the same id),
/// so it may have landed, and the same id sent again lands it once or answers its seq
/// (before, the caller was told it failed, had no id to retry with, and a retry of its
/// own wrote the message twice).
fn shed(code: ErrorCode, body: &RequestBody) -> bool {
    let read = matches!(
        body,
        RequestBody::Members { .. }
            | RequestBody::History { .. }
            | RequestBody::Receipts { .. }
            | RequestBody::MarkRead { .. }
            | RequestBody::CatchUp { .. }
            | RequestBody::EntryNames { .. }
            | RequestBody::FileInfo { .. }
            | RequestBody::SendFiles { .. }
            | RequestBody::Presence { .. }
            | RequestBody::ListConversations { .. }
            | RequestBody::ConversationStates { .. }
            | RequestBody::BlockedUsers
    );
    code == ErrorCode::OVERLOADED
        || (code == ErrorCode::RATE_LIMITED && (read || keyed_write(body)))
        || (code == ErrorCode::INTERNAL && keyed_write(body))
}

/// Whether `body` is a write that carries a client id (the same id takes effect once).
fn keyed_write(body: &RequestBody) -> bool {
    matches!(
        body,
        RequestBody::Send { .. }
            | RequestBody::Edit { .. }
            | RequestBody::Delete { .. }
            | RequestBody::SendFiles { .. }
    )
}

/// Whether a request may be sent again after its connection dropped: true when a
/// repeat cannot have a second effect (a client id makes a write idempotent; reads,
/// watermarks and settings are idempotent by nature).
pub fn retry_safe(body: &RequestBody) -> bool {
    use switchboard_protocol::NewConversation;
    match body {
        RequestBody::Send { .. }
        | RequestBody::Edit { .. }
        | RequestBody::Delete { .. }
        | RequestBody::SendFiles { .. } => true,
        RequestBody::Ping
        | RequestBody::ListConversations { .. }
        | RequestBody::Members { .. }
        | RequestBody::History { .. }
        | RequestBody::ListDevices
        | RequestBody::MarkDelivered { .. }
        | RequestBody::MarkRead { .. }
        | RequestBody::Receipts { .. }
        | RequestBody::ConversationStates { .. }
        | RequestBody::CatchUp { .. }
        | RequestBody::SetPresence { .. }
        | RequestBody::Presence { .. }
        | RequestBody::Settings { .. }
        | RequestBody::UploadStatus { .. }
        | RequestBody::FileInfo { .. }
        | RequestBody::ListUploads { .. }
        | RequestBody::Usage
        | RequestBody::BlockedUsers
        | RequestBody::ListFiles { .. }
        | RequestBody::EntryNames { .. }
        // Setting a block to a value: the same again changes nothing.
        | RequestBody::Block { .. } => true,
        // The one direct conversation with a peer is returned if it exists.
        RequestBody::CreateConversation(NewConversation::Direct { .. }) => true,
        RequestBody::CreateConversation(NewConversation::Group { .. })
        | RequestBody::AddMembers { .. }
        | RequestBody::RemoveMember { .. }
        | RequestBody::SetRole { .. }
        // A second rename to the same title is answered `CONFLICT`.
        | RequestBody::SetTitle { .. }
        | RequestBody::Leave { .. }
        | RequestBody::RevokeDevice { .. }
        | RequestBody::RevokeOtherDevice { .. }
        // A second change would be checked against the password the first one replaced.
        | RequestBody::ChangePassword { .. }
        // A second begin starts a second upload; a second cancel or delete would answer
        // `NOT_FOUND` for what the first one did.
        | RequestBody::BeginUpload(_)
        | RequestBody::CancelUpload { .. }
        | RequestBody::DeleteFile { .. }
        | RequestBody::WithdrawFile { .. }
        | RequestBody::Register(_)
        | RequestBody::Login(_)
        | RequestBody::Authenticate { .. } => false,
    }
}

/// Failures after which reconnecting cannot help: this device or account refused, a
/// protocol version the broker does not speak, a broker certificate not trusted.
pub fn permanent(error: &ClientError) -> bool {
    matches!(error, ClientError::Untrusted(_))
        || matches!(
            error.code(),
            Some(
                ErrorCode::DEVICE_REVOKED
                    | ErrorCode::AUTH_FAILED
                    | ErrorCode::UNSUPPORTED_VERSION
                    | ErrorCode::ACCOUNT_DISABLED
            )
        )
}

/// The failure means the connection is gone (the request may be sent again on the
/// next one), not that the broker refused the request. `GOING_AWAY` answers come from
/// a broker that is shutting down.
fn connection_lost(error: &ClientError) -> bool {
    match error {
        ClientError::Closed { .. } | ClientError::Connect(_) | ClientError::Refused(_) => true,
        ClientError::Server(body) => body.code == ErrorCode::GOING_AWAY,
        ClientError::Protocol(_) | ClientError::Untrusted(_) | ClientError::TooLarge { .. } => false,
    }
}

/// For `RESTART_WINDOW_MS` after the broker said it is going away (`GOING_AWAY`: a
/// restart, as a rule), reconnect attempts come at most this far apart (with jitter,
/// from half of it) until one succeeds, ms: the broker is expected back within seconds,
/// and an attempt it refuses or does not answer costs it little (a refused handshake).
/// Without it the backoff had grown to 3–6 s during a restart's 3 s drain, while every
/// attempt was refused, and devices came back that much after the broker.
pub const RESTART_RETRY_MAX_MS: u64 = 1_000;

/// Users remembered as changed live while a presence snapshot is asked for (a
/// snapshot answers at most `PRESENCE_SNAPSHOT_MAX`, 4,096, users; past this, later
/// live changes may be replaced by the snapshot's older rows until their next change).
const PRESENCE_SEEN_MAX: usize = 4096;

/// Presence states kept to hand on while the event queue is full (a snapshot's rows and
/// live changes, the latest per user); past it a live change is dropped.
const PRESENCE_BACKLOG_MAX: usize = 2 * switchboard_protocol::limits::PRESENCE_SNAPSHOT_MAX as usize;

/// Users whose presence was handed on, remembered (with their names) to tell when the
/// next snapshot leaves one out (`SessionEvent::PresenceGone`); past it, later ones are
/// not, until the next snapshot starts the list again from its rows.
const PRESENCE_SHOWN_MAX: usize = PRESENCE_BACKLOG_MAX;

/// Uploads last seen in progress (per file and audience) whose state the session asks
/// for after a reconnect: what moved while no connection was up is not replayed, and
/// before, an application kept showing such an upload in progress after it completed
/// (a broker restarted during it: the uploader's other devices saw it stop at the
/// percentage of the crash). Past it, later uploads are not followed across reconnects.
pub const FILES_UNSETTLED_MAX: usize = 1024;

/// Uploads in one conversation followed across reconnects (`FILES_UNSETTLED_MAX`):
/// anyone may add the user to a group and attach uploads there, and each one followed
/// is a `FileInfo` at the next connect.
pub const FILES_UNSETTLED_PER_CONV: usize = 16;

/// `FileInfo` requests the session has outstanding at once after a reconnect (the
/// broker runs four store jobs of a user at once).
const FILE_ASKS_AT_ONCE: usize = 4;

/// How long after a `GOING_AWAY` reconnects stay within `RESTART_RETRY_MAX_MS`, ms; past
/// it the broker is down for longer than a restart (maintenance, gone) and the usual
/// backoff resumes, so a fleet of devices does not retry every second for good.
pub const RESTART_WINDOW_MS: u64 = 30_000;

/// Exponential backoff with jitter: attempt `n` (from 0) waits a delay drawn uniformly
/// from `[d/2, d]` where `d = min(max, min * 2^n)`.
#[derive(Clone, Debug)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// Delays from `min_ms` up to `max_ms`.
    pub fn new(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff { min_ms: min_ms.max(1), max_ms: max_ms.max(min_ms.max(1)), attempt: 0 }
    }

    /// The next delay, ms; `random` is any uniformly random number.
    pub fn next_ms(&mut self, random: u64) -> u64 {
        self.next_ms_within(random, self.max_ms)
    }

    /// The next delay as `next_ms`, with `ceiling_ms` in place of the longest (when
    /// lower): drawn from `[c/2, c]`, `c` the smaller of the two ceilings.
    pub fn next_ms_within(&mut self, random: u64, ceiling_ms: u64) -> u64 {
        let ceiling = self.min_ms.saturating_mul(1u64 << self.attempt.min(40)).min(self.max_ms).min(ceiling_ms.max(1));
        self.attempt = self.attempt.saturating_add(1);
        let floor = ceiling / 2;
        floor + random % (ceiling - floor + 1)
    }

    /// A connection succeeded: start from `min_ms` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A request waiting for a connection or an answer.
struct Pending {
    body: RequestBody,
    reply: oneshot::Sender<Result<Reply, SessionError>>,
    /// The connection generation it was last sent on; `None` while it waits for a
    /// connection or for the end of its `OVERLOADED` backoff.
    sent_on: Option<u64>,
    /// Times it may still be sent again after an `OVERLOADED` answer.
    overload_left: u32,
    /// Delays between those sends.
    backoff: Backoff,
    /// Times it was sent: a backoff timer set before a later send is stale.
    sends: u64,
}

/// The current connection.
struct Live {
    client: Arc<Client>,
    events: Events,
    generation: u64,
}

/// Answers of requests the task made, sent back by the small tasks that await them.
enum Done {
    Request {
        token: u64,
        generation: u64,
        result: Result<Reply, ClientError>,
    },
    /// The `OVERLOADED` backoff of request `token`, set after its `sends`-th send, ended.
    Resend {
        token: u64,
        sends: u64,
    },
    States {
        generation: u64,
        result: Result<Vec<ConversationState>, ClientError>,
    },
    Page {
        generation: u64,
        fetch: Fetch,
        result: Result<Reply, ClientError>,
    },
    Marks {
        marks: Vec<(ConvId, Seq)>,
        ok: bool,
    },
    Presence {
        generation: u64,
        result: Result<Reply, ClientError>,
    },
    Saved {
        cursors: Cursors,
        forgot: Vec<(ConvId, Seq)>,
        ok: bool,
    },
    /// The `SetPresence` of `away` sent on connection `generation` was answered.
    Away {
        generation: u64,
        away: bool,
        ok: bool,
    },
    /// The `FileInfo` of `file` asked for on connection `generation` (`ask_files`).
    FileState {
        generation: u64,
        file: FileId,
        /// The events counted for it in `files_events_in_flight`.
        events: usize,
        result: Result<Reply, ClientError>,
    },
    /// The receipts of `conv` asked for on connection `generation` (`ask_receipts`).
    Receipts {
        generation: u64,
        conv: ConvId,
        /// The rows counted for it in `receipts_rows_in_flight`.
        rows: usize,
        result: Result<Reply, ClientError>,
    },
    /// A backoff after a failed catch-up page, `ConversationStates` or presence
    /// snapshot on connection `generation` ended: asked for again on the same connection.
    Retry {
        generation: u64,
        what: Again,
    },
}

/// What `Task::retry_later` asks for again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Again {
    /// `ConversationStates`.
    States,
    /// The stalled catch-up pages.
    Pages,
    /// The presence snapshot.
    Presence,
}

/// The one task that owns a session's state.
struct Task {
    connector: Connector,
    identity: Identity,
    store: Arc<dyn CursorStore>,
    config: SessionConfig,
    merge: Merge,
    backoff: Backoff,
    out: mpsc::Sender<SessionEvent>,
    taken: Arc<Taken>,
    commands: mpsc::Receiver<Command>,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    live: Option<Live>,
    generation: u64,
    connecting: Option<oneshot::Receiver<Result<Client, ClientError>>>,
    retry_at: Option<Instant>,
    /// The last connection ended with `GOING_AWAY` and none has succeeded since:
    /// attempts come at most `RESTART_RETRY_MAX_MS` apart until then.
    restarting_until: Option<Instant>,
    pending: BTreeMap<u64, Pending>,
    next_token: u64,
    away: bool,
    /// The away state the broker last confirmed, on which connection (a new connection
    /// starts not away).
    away_sent: Option<(u64, bool)>,
    /// A `SetPresence` is in flight (`sync_away`): one at a time, so they keep their order.
    away_in_flight: bool,
    /// While a presence snapshot is asked for: users a live presence event came for
    /// since (at most `PRESENCE_SEEN_MAX`), whose rows of the snapshot are older.
    presence_since_snapshot: Option<HashSet<UserId>>,
    /// Presence not yet handed on for want of room in the event queue, by user: the
    /// last snapshot's rows and live changes (a live one replaces the user's row: it is
    /// newer), at most `PRESENCE_BACKLOG_MAX`, handed on as the application takes
    /// events.
    presence_backlog: BTreeMap<UserId, PresenceInfo>,
    /// Users whose presence was handed on, with their names (`PRESENCE_SHOWN_MAX`).
    presence_shown: HashMap<UserId, String>,
    /// Former contacts (`SessionEvent::PresenceGone`) not yet handed on for want of
    /// room, at most `PRESENCE_SHOWN_MAX`.
    presence_gone: BTreeMap<UserId, String>,
    /// `Connected` and `Disconnected` events waiting for room (`emit_lifecycle`): at most
    /// a `Disconnected` and the `Connected` after it.
    lifecycle: VecDeque<SessionEvent>,
    /// Members per conversation, as the last `ConversationStates` listed them.
    member_counts: HashMap<ConvId, u32>,
    /// The typing indicators handed on, so that each is stopped (`TypingShown`).
    typing: TypingShown,
    states_done: bool,
    caught_up_sent: bool,
    /// A timer to ask for stalled catch-up pages again is set (`retry_later`).
    pages_retry_set: bool,
    /// Conversations whose receipts are to be asked for on this connection, with the
    /// rows expected (its member count): those no completing catch-up page brings
    /// (nothing new since the cursor, though members may have read or received since),
    /// and those whose receipts did not fit the application's queue.
    receipts_due: VecDeque<(ConvId, u32)>,
    /// `Receipts` requests outstanding on this connection, and the rows their answers
    /// may bring (each counted against the event queue's room before it is sent).
    receipts_outstanding: usize,
    receipts_rows_in_flight: usize,
    /// The last `Uploading` event of each upload and audience not settled since
    /// (`FILES_UNSETTLED_MAX`), asked about after a reconnect.
    files_unsettled: HashMap<(FileId, Option<ConvId>), FileProgress>,
    /// Files to ask `FileInfo` about on this connection once caught up, and the asks
    /// outstanding with the events their answers may bring (counted against the
    /// event queue's room before each is sent).
    files_due: VecDeque<FileId>,
    files_outstanding: usize,
    files_events_in_flight: usize,
    /// Delivered receipts: what the broker accepted, per conversation.
    reported: Cursors,
    marks_outstanding: usize,
    mark_at: Option<Instant>,
    /// Cursors: what the store holds.
    persisted: Cursors,
    persist_at: Option<Instant>,
    saving: bool,
}

impl Task {
    async fn run(mut self) {
        let closer = loop {
            let far = Instant::now() + Duration::from_secs(3600);
            // Room the application made is theirs first.
            self.release_lifecycle();
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Close(tx)) => break Some(tx),
                    Some(command) => self.command(command).await,
                    None => break None,
                },
                Some(done) = self.done_rx.recv() => self.done(done),
                event = next_event(&mut self.live) => {
                    if self.event(event).await {
                        break None;
                    }
                }
                result = wait_connect(&mut self.connecting) => {
                    self.connecting = None;
                    if self.connected(result) {
                        break None;
                    }
                }
                _ = tokio::time::sleep_until(self.retry_at.unwrap_or(far)), if self.retry_at.is_some() => {
                    self.retry_at = None;
                    self.connect();
                }
                _ = self.taken.notify.notified() => self.taken_more(),
                _ = tokio::time::sleep_until(self.mark_at.unwrap_or(far)), if self.mark_at.is_some() => {
                    self.mark_at = None;
                    self.flush_marks();
                }
                _ = tokio::time::sleep_until(self.persist_at.unwrap_or(far)), if self.persist_at.is_some() => {
                    self.persist_at = None;
                    self.persist();
                }
            }
        };
        self.shutdown().await;
        if let Some(tx) = closer {
            let _ = tx.send(());
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Request { body, reply } => {
                if self.pending.len() >= self.config.max_pending {
                    // Requests whose callers gave up hold no place.
                    self.pending.retain(|_, p| !p.reply.is_closed());
                }
                if self.pending.len() >= self.config.max_pending {
                    let _ = reply.send(Err(SessionError::Busy));
                    return;
                }
                let token = self.next_token;
                self.next_token += 1;
                let overload_left = if retry_safe(&body) { self.config.overload_retries } else { 0 };
                let backoff = Backoff::new(self.config.backoff_min_ms, self.config.backoff_max_ms);
                self.pending.insert(token, Pending { body, reply, sent_on: None, overload_left, backoff, sends: 0 });
                self.send_pending(token);
            }
            Command::Typing { conv, typing } => {
                // Never waited for: a full write queue (a broker that stopped reading)
                // held the whole session (events, commands, timers) here before.
                if let Some(live) = &self.live
                    && !live.client.try_typing(conv, typing)
                {
                    tracing::debug!(conv, typing, "typing signal dropped");
                }
            }
            Command::Away(away) => {
                self.away = away;
                self.sync_away();
            }
            Command::Close(_) => unreachable!("handled by run"),
        }
    }

    /// Sends pending request `token` on the current connection, if there is one.
    fn send_pending(&mut self, token: u64) {
        let Some(live) = &self.live else { return };
        let Some(p) = self.pending.get_mut(&token) else { return };
        if p.reply.is_closed() {
            // The caller gave up; nothing is waiting for the answer.
            self.pending.remove(&token);
            return;
        }
        p.sent_on = Some(live.generation);
        p.sends += 1;
        let (client, generation, body, done) =
            (live.client.clone(), live.generation, p.body.clone(), self.done_tx.clone());
        tokio::spawn(async move {
            let result = client.request(body).await;
            let _ = done.send(Done::Request { token, generation, result }).await;
        });
    }

    fn done(&mut self, done: Done) {
        match done {
            Done::Request { token, generation, result } => self.answered(token, generation, result),
            Done::Resend { token, sends } => {
                // Not sent since the timer was set (a reconnect sends it at once).
                if self.pending.get(&token).is_some_and(|p| p.sent_on.is_none() && p.sends == sends) {
                    self.send_pending(token);
                }
            }
            Done::States { generation, result } => {
                if !self.current(generation) {
                    return;
                }
                match result {
                    Ok(states) => {
                        let listed: HashSet<ConvId> = states.iter().map(|s| s.summary.id).collect();
                        self.member_counts = states.iter().map(|s| (s.summary.id, s.summary.member_count)).collect();
                        let mut quiet = Vec::new();
                        for s in states {
                            let (conv, last_seq) = (s.summary.id, s.summary.last_seq);
                            // Nothing new to page through, but members may have received
                            // or read since this device last heard: asked for after the
                            // catch-up. (A conversation with something new gets them
                            // with its completing page.)
                            if last_seq > 0 && last_seq <= self.merge.cursor(conv) {
                                quiet.push((conv, s.summary.member_count));
                            }
                            self.merge.known(conv, last_seq);
                            // What the broker holds of my delivered mark: entries taken
                            // while no connection was up (and the application closed or
                            // restarted before one came) are reported now. Before, the
                            // marks started from the saved cursors, and those entries
                            // stayed "not delivered" for their senders (a review).
                            if let Some(r) = self.reported.get_mut(&conv) {
                                *r = (*r).min(s.delivered_up_to);
                            } else {
                                self.reported.insert(conv, s.delivered_up_to);
                            }
                        }
                        // Within the budget, fewest members first: a reconnect does not
                        // spend the user's allowance of member rows (which its catch-up
                        // pages and member lists need too) on receipts of large groups.
                        quiet.sort_by_key(|&(conv, rows)| (rows, conv));
                        let mut budget = u64::from(self.config.receipts_rows_per_connect);
                        for (conv, rows) in quiet {
                            let Some(left) = budget.checked_sub(u64::from(rows)) else { break };
                            budget = left;
                            self.receipts_due.push_back((conv, rows));
                        }
                        // Left or removed while away (from another device too), or
                        // joined after the states were read: one page tells which.
                        let unlisted: Vec<ConvId> =
                            self.merge.cursors().map(|(conv, _)| conv).filter(|c| !listed.contains(c)).collect();
                        for conv in unlisted {
                            self.merge.probe(conv);
                        }
                        // Only a read of the states lets `CaughtUp` out: set on a
                        // refusal too, it said caught up with the conversations that
                        // moved while offline still unread (a review).
                        self.states_done = true;
                    }
                    Err(e) => {
                        // Asked for again a backoff later on this connection: without it
                        // a conversation that moved while offline and is quiet now would
                        // not be caught up until the next connection.
                        tracing::warn!(error = %e, "conversation states failed; live events only until asked again");
                        self.retry_later(generation, Again::States);
                    }
                }
                self.flush_marks();
                self.pump();
            }
            Done::Receipts { generation, conv, rows, result } => {
                if !self.current(generation) {
                    return;
                }
                self.receipts_outstanding -= 1;
                self.receipts_rows_in_flight -= rows;
                match result {
                    Ok(Reply::Receipts(receipts)) => {
                        let receipts: Vec<Receipt> = receipts.into_iter().filter(|r| r.conv == conv).collect();
                        self.receipts(conv, receipts);
                    }
                    // A conversation left meanwhile (its probe reports it), or one
                    // refused past the retries: shown as the live events leave it until
                    // the next connection asks again.
                    other => tracing::debug!(conv, reply = ?other, "receipts not refreshed"),
                }
                self.pump();
            }
            Done::FileState { generation, file, events, result } => {
                if !self.current(generation) {
                    return;
                }
                self.files_outstanding -= 1;
                self.files_events_in_flight -= events;
                let now = match result {
                    Ok(Reply::File(info)) => info.state,
                    Err(ClientError::Server(e)) if e.code == ErrorCode::NOT_FOUND => {
                        FileState::Failed { code: ErrorCode::NOT_FOUND }
                    }
                    // Refused past the retries, or the connection went: the next
                    // connection asks again.
                    other => {
                        tracing::debug!(reply = ?other, "an upload's state not refreshed");
                        self.pump();
                        return;
                    }
                };
                self.file_state_now(file, now);
                self.pump();
            }
            Done::Retry { generation, what } => {
                if !self.current(generation) {
                    return;
                }
                match what {
                    Again::States => self.ask_states(),
                    Again::Pages => {
                        self.pages_retry_set = false;
                        self.merge.unstall();
                        self.pump();
                    }
                    Again::Presence => self.ask_presence(),
                }
            }
            Done::Page { generation, fetch, result } => {
                if !self.current(generation) {
                    return;
                }
                // `Left` was told of the conversation since this was asked (its removal came
                // live): `Left` is the last of it. Before, a page then put it back among
                // those tracked (and the next connect told `Left` again), and a refusal
                // told `Left` twice (a review).
                if self.merge.has_left(fetch.conv) {
                    self.pump();
                    return;
                }
                match result {
                    Ok(Reply::CatchUp(page)) if page.conv == fetch.conv => {
                        let (complete, receipts) = (page.complete, page.receipts.clone());
                        let entries = self.merge.page(page, self.room());
                        self.emit_entries(entries);
                        // Not after the `Left` that the page's entries may have told
                        // (before, its receipts followed it: a review).
                        if complete && !self.merge.has_left(fetch.conv) {
                            self.receipts(fetch.conv, receipts);
                        }
                        if self.merge.is_stalled(fetch.conv) {
                            tracing::warn!(conv = fetch.conv, "a catch-up page brought nothing new");
                            self.retry_later(generation, Again::Pages);
                        }
                    }
                    Ok(other) => {
                        tracing::warn!(conv = fetch.conv, reply = ?other, "unexpected catch-up reply");
                        self.merge.fetch_failed(fetch.conv);
                        self.retry_later(generation, Again::Pages);
                    }
                    // No longer a member (left from another device, or removed): the
                    // application is told once it has room (else asked again later),
                    // and the conversation is no longer tracked. Before, it was never
                    // told, and a removal that came live beyond a gap had that gap
                    // asked for again every `backoff_max_ms`, for good.
                    Err(ClientError::Server(e)) if e.code == ErrorCode::FORBIDDEN && self.room() > 0 => {
                        self.tell_left(fetch.conv);
                    }
                    Err(e) => {
                        // Asked for again a backoff later on this connection (before: not
                        // until the next connection, and the conversation's later live
                        // entries were held beyond the gap, then dropped).
                        tracing::warn!(conv = fetch.conv, error = %e, "catch-up failed");
                        self.merge.fetch_failed(fetch.conv);
                        self.retry_later(generation, Again::Pages);
                    }
                }
                self.pump();
            }
            Done::Marks { marks, ok } => {
                self.marks_outstanding -= 1;
                if ok {
                    for (conv, seq) in marks {
                        let r = self.reported.entry(conv).or_default();
                        *r = (*r).max(seq);
                    }
                } else {
                    // Reported again a backoff later (before: only when the application
                    // next took an entry, so others could see "not delivered" for good).
                    self.mark_at.get_or_insert(Instant::now() + Duration::from_millis(self.config.backoff_max_ms));
                }
            }
            Done::Away { generation, away, ok } => {
                self.away_in_flight = false;
                if ok {
                    self.away_sent = Some((generation, away));
                }
                // A failure on the live connection is not retried at once (it would
                // loop); the next change or connection sends it.
                if ok || !self.current(generation) {
                    self.sync_away();
                }
            }
            Done::Presence { generation, result } => {
                if !self.current(generation) {
                    return;
                }
                // Users whose live change came after the snapshot was asked for: the
                // snapshot may be older, and must not replace what was shown.
                let newer = std::mem::take(&mut self.presence_since_snapshot);
                match result {
                    Ok(Reply::Presence(list)) => {
                        self.former_contacts(&list, newer.as_ref());
                        // Into what waits for room, not over it: a live change kept there
                        // (its user is among `newer`) is newer than the snapshot's row
                        // (before, the snapshot replaced it, and the user was shown as
                        // before the disconnect until its next change: a review).
                        let rows = list.into_iter().filter(|p| newer.as_ref().is_none_or(|n| !n.contains(&p.user)));
                        for p in rows {
                            self.presence_backlog.entry(p.user).or_insert(p);
                        }
                        self.release_presence();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Refused for load: asked again a backoff later on this
                        // connection (before, the contacts' presence stayed as before
                        // the disconnect until the next connection: the snapshot is
                        // refused `RATE_LIMITED` while the catch-up spends the user's
                        // allowance of member rows). Anything else waits for the next.
                        let transient = matches!(
                            e.code(),
                            Some(ErrorCode::RATE_LIMITED | ErrorCode::OVERLOADED | ErrorCode::INTERNAL)
                        );
                        tracing::debug!(error = %e, transient, "presence snapshot failed");
                        if transient {
                            self.retry_later(generation, Again::Presence);
                        }
                    }
                }
            }
            Done::Saved { cursors, forgot, ok } => {
                self.saving = false;
                if ok {
                    self.persisted = cursors;
                    self.taken.left.lock().unwrap_or_else(|p| p.into_inner()).retain(|c| !forgot.contains(c));
                } else {
                    self.arm_persist();
                }
            }
        }
    }

    fn current(&self, generation: u64) -> bool {
        self.live.as_ref().is_some_and(|l| l.generation == generation)
    }

    /// The answer of a pending request (or the failure of its connection).
    fn answered(&mut self, token: u64, generation: u64, result: Result<Reply, ClientError>) {
        let Some(p) = self.pending.get(&token) else { return };
        if p.sent_on != Some(generation) {
            // Sent again on a newer connection already; that answer decides.
            return;
        }
        if let Err(e) = &result
            && connection_lost(e)
        {
            if retry_safe(&p.body) {
                self.pending.get_mut(&token).expect("looked up above").sent_on = None;
                // Sent on the next connection (at once if that is already up).
                if !self.current(generation) {
                    self.send_pending(token);
                }
                return;
            }
            let p = self.pending.remove(&token).expect("looked up above");
            let _ = p.reply.send(Err(SessionError::Interrupted));
            return;
        }
        if let Err(ClientError::Server(e)) = &result
            && shed(e.code, &p.body)
            && p.overload_left > 0
        {
            // The broker is shedding: sent again after a backoff (at once on a new
            // connection), unless its caller gave up by then (`send_pending`).
            let p = self.pending.get_mut(&token).expect("looked up above");
            p.overload_left -= 1;
            p.sent_on = None;
            let (delay, sends, done) = (p.backoff.next_ms(random_u64()), p.sends, self.done_tx.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _ = done.send(Done::Resend { token, sends }).await;
            });
            return;
        }
        let p = self.pending.remove(&token).expect("looked up above");
        if let Ok(reply) = &result {
            self.wrote(&p.body, reply);
        }
        let _ = p.reply.send(result.map_err(SessionError::Client));
    }

    /// The broker does not push this connection's own writes back: learn their seqs
    /// from the answers, and the merge fetches them.
    fn wrote(&mut self, body: &RequestBody, reply: &Reply) {
        let conv = match body {
            RequestBody::Send { conv, .. }
            | RequestBody::Edit { conv, .. }
            | RequestBody::Delete { conv, .. }
            | RequestBody::AddMembers { conv, .. }
            | RequestBody::RemoveMember { conv, .. }
            | RequestBody::SetRole { conv, .. }
            | RequestBody::SetTitle { conv, .. }
            | RequestBody::SendFiles { conv, .. }
            | RequestBody::Leave { conv } => Some(*conv),
            _ => None,
        };
        match (conv, reply) {
            (Some(conv), Reply::Appended { seq, .. }) => self.merge.appended(conv, *seq),
            (None, Reply::Conversation(summary)) => self.merge.known(summary.id, summary.last_seq),
            _ => return,
        }
        self.pump();
    }

    /// Handles one event of the connection, or its end. Returns `true` if the session
    /// must stop.
    async fn event(&mut self, event: Option<Event>) -> bool {
        match event {
            Some(Event::Entry(entry)) => {
                if matches!(entry.body, Body::Text { .. } | Body::Files { .. }) {
                    self.typing.message_arrived((entry.conv, entry.sender), Instant::now());
                }
                let entries = self.merge.live(entry, self.room());
                self.emit_entries(entries);
                self.pump();
            }
            Some(Event::Receipt(r)) => self.live_receipts(vec![r]),
            Some(Event::Receipts(rs)) => self.live_receipts(rs),
            Some(Event::Presence(p)) => {
                if let Some(newer) = &mut self.presence_since_snapshot
                    && newer.len() < PRESENCE_SEEN_MAX
                {
                    newer.insert(p.user);
                }
                // Newer than any row of the snapshot still waiting; kept to hand on when
                // the queue has no room (before, dropped, and the snapshot's row for the
                // user skipped as older: the user's state was never shown).
                self.presence_backlog.remove(&p.user);
                self.presence_gone.remove(&p.user);
                if self.room() > 0 {
                    self.emit_presence(p);
                } else if self.presence_backlog.len() < PRESENCE_BACKLOG_MAX {
                    self.presence_backlog.insert(p.user, p);
                }
            }
            Some(Event::Typing { conv, user, typing }) => self.typing(conv, user, typing),
            Some(Event::File(progress)) => self.file_event(progress),
            None => {
                let live = self.live.take().expect("next_event yields only while connected");
                let error = live.client.closed().await;
                self.merge.disconnected();
                self.states_done = false;
                // What the broker told of typing no longer holds: it forgets indicators
                // when it restarts, and a stop pushed meanwhile is not sent again. Handed
                // on after `Disconnected`, as room allows.
                self.typing.connection_ended();
                if permanent(&error) {
                    self.stop(error);
                    self.release_typing_stops();
                    return true;
                }
                self.restarting_until = (error.code() == Some(ErrorCode::GOING_AWAY))
                    .then(|| Instant::now() + Duration::from_millis(RESTART_WINDOW_MS));
                self.schedule_retry(error);
                self.release_typing_stops();
            }
        }
        false
    }

    fn connect(&mut self) {
        let (tx, rx) = oneshot::channel();
        let (connector, identity) = (self.connector.clone(), self.identity.clone());
        let limit = Duration::from_millis(self.config.connect_timeout_ms);
        tokio::spawn(async move {
            let result = match tokio::time::timeout(limit, connector.connect(&identity)).await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Connect("timed out".into())),
            };
            let _ = tx.send(result);
        });
        self.connecting = Some(rx);
    }

    /// A connect attempt ended. Returns `true` if the session must stop.
    fn connected(&mut self, result: Result<Client, ClientError>) -> bool {
        let client = match result {
            Ok(client) => client,
            // A certificate refused after this session has connected with the same trust
            // is retried like a lost connection: one forged handshake (anyone on the path
            // can answer first) must not stop the session for good. Each failure shows in
            // `Disconnected`, so a certificate the broker really replaced is seen.
            Err(error) if permanent(&error) && !(self.generation > 0 && matches!(error, ClientError::Untrusted(_))) => {
                self.stop(error);
                return true;
            }
            Err(error) => {
                self.schedule_retry(error);
                return false;
            }
        };
        self.restarting_until = None;
        let Some(events) = client.events() else {
            self.schedule_retry(ClientError::Protocol("event stream already taken".into()));
            return false;
        };
        self.generation += 1;
        let client = Arc::new(client);
        self.live = Some(Live { client: client.clone(), events, generation: self.generation });
        self.states_done = false;
        self.caught_up_sent = false;
        self.pages_retry_set = false;
        self.receipts_due.clear();
        self.receipts_outstanding = 0;
        self.receipts_rows_in_flight = 0;
        let mut unsettled: Vec<FileId> = self.files_unsettled.keys().map(|(file, _)| *file).collect();
        unsettled.sort_unstable();
        unsettled.dedup();
        self.files_due = unsettled.into();
        self.files_outstanding = 0;
        self.files_events_in_flight = 0;
        self.emit_lifecycle(SessionEvent::Connected);
        self.ask_states();
        self.presence_backlog.clear();
        self.ask_presence();
        self.sync_away();
        let unsent: Vec<u64> = self.pending.iter().filter(|(_, p)| p.sent_on.is_none()).map(|(&t, _)| t).collect();
        for token in unsent {
            self.send_pending(token);
        }
        self.flush_marks();
        self.pump();
        false
    }

    /// Asks the live connection for the presence snapshot (`Done::Presence`); the live
    /// changes that come meanwhile are newer than its rows.
    fn ask_presence(&mut self) {
        let generation = self.generation;
        self.presence_since_snapshot = Some(HashSet::new());
        let snapshot = RequestBody::Presence { users: Vec::new() };
        self.read_in_background(snapshot, move |result| Done::Presence { generation, result });
    }

    fn schedule_retry(&mut self, error: ClientError) {
        let restarting = self.restarting_until.is_some_and(|until| Instant::now() < until);
        let ceiling = if restarting { RESTART_RETRY_MAX_MS } else { self.config.backoff_max_ms };
        let delay = self.backoff.next_ms_within(random_u64(), ceiling);
        tracing::debug!(error = %error, delay_ms = delay, "reconnecting");
        self.retry_at = Some(Instant::now() + Duration::from_millis(delay));
        self.emit_lifecycle(SessionEvent::Disconnected { error, retry_in_ms: delay });
    }

    fn stop(&mut self, error: ClientError) {
        tracing::warn!(error = %error, "session stopped");
        // Sent even if the queue is full: the application must learn why it ended.
        let out = self.out.clone();
        tokio::spawn(async move {
            let _ = out.send(SessionEvent::Stopped(error)).await;
        });
    }

    /// Tells the live connection the away state the application last set, if the
    /// broker believes otherwise: one `SetPresence` at a time, the next sent when it is
    /// answered (`Done::Away`), so a quick away-then-back cannot reach the broker in the
    /// other order (before, each change was a task of its own, and a device could stay
    /// shown away while its user was back).
    fn sync_away(&mut self) {
        let Some(live) = &self.live else { return };
        if self.away_in_flight {
            return;
        }
        let believed = match self.away_sent {
            Some((generation, away)) if generation == live.generation => away,
            _ => false,
        };
        if self.away == believed {
            return;
        }
        self.away_in_flight = true;
        let (client, away, generation, done) = (live.client.clone(), self.away, live.generation, self.done_tx.clone());
        tokio::spawn(async move {
            let ok =
                client.set_away(away).await.inspect_err(|e| tracing::debug!(error = %e, "set away failed")).is_ok();
            let _ = done.send(Done::Away { generation, away, ok }).await;
        });
    }

    /// Asks the live connection for `ConversationStates` (`Done::States`).
    fn ask_states(&self) {
        let Some(live) = &self.live else { return };
        let (client, generation, done) = (live.client.clone(), live.generation, self.done_tx.clone());
        tokio::spawn(async move {
            let result = client.conversation_states().await;
            let _ = done.send(Done::States { generation, result }).await;
        });
    }

    /// Asks again, `backoff_max_ms` later on connection `generation`, for
    /// `ConversationStates` (`states`) or the stalled catch-up pages; one timer at a
    /// time for the pages (`pages_retry_set`).
    fn retry_later(&mut self, generation: u64, what: Again) {
        if what == Again::Pages {
            if self.pages_retry_set {
                return;
            }
            self.pages_retry_set = true;
        }
        let (delay, done) = (self.config.backoff_max_ms, self.done_tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let _ = done.send(Done::Retry { generation, what }).await;
        });
    }

    /// Sends the read `body` on the live connection and hands its answer to `done`; one
    /// refused for load is sent again after a backoff, up to `overload_retries` times.
    fn read_in_background(
        &self,
        body: RequestBody,
        done: impl FnOnce(Result<Reply, ClientError>) -> Done + Send + 'static,
    ) {
        let Some(live) = &self.live else { return };
        let (client, done_tx) = (live.client.clone(), self.done_tx.clone());
        let (mut backoff, mut retries) = (Backoff::new(self.config.backoff_min_ms, self.config.backoff_max_ms), 0);
        let retries_max = self.config.overload_retries;
        tokio::spawn(async move {
            let result = loop {
                match client.request(body.clone()).await {
                    Err(ClientError::Server(e)) if shed(e.code, &body) && retries < retries_max => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(backoff.next_ms(random_u64()))).await;
                    }
                    result => break result,
                }
            };
            let _ = done_tx.send(done(result)).await;
        });
    }

    /// Asks for the catch-up pages the merge wants, says `CaughtUp` once there is
    /// nothing more to fetch on this connection, and then asks for the receipts due.
    fn pump(&mut self) {
        let Some(generation) = self.live.as_ref().map(|l| l.generation) else { return };
        let room = self.room();
        // A page that fails for good stalls the conversation's catch-up until
        // `retry_later` asks again on this connection, or the next connection does.
        for fetch in self.merge.fetches(self.config.max_fetching, room) {
            let body = RequestBody::CatchUp { conv: fetch.conv, after: fetch.after, limit: fetch.limit };
            self.read_in_background(body, move |result| Done::Page { generation, fetch, result });
        }
        // Said once there is room for it (before, a completing page that filled the
        // queue dropped it, and the application waited for it all connection long: a
        // review); the next `pump`, when the application takes events, says it then.
        if self.states_done && !self.caught_up_sent && self.merge.caught_up() && self.room() > 0 {
            self.caught_up_sent = true;
            self.backoff.reset();
            self.emit(SessionEvent::CaughtUp);
        }
        if self.caught_up_sent {
            self.ask_receipts(generation);
            self.ask_files(generation);
        }
    }

    /// After the catch-up, asks `FileInfo` for the uploads last seen in progress
    /// (`files_due`): `FILE_ASKS_AT_ONCE` at a time, each once the application's queue
    /// has room for the events its answer may bring.
    fn ask_files(&mut self, generation: u64) {
        while self.files_outstanding < FILE_ASKS_AT_ONCE {
            let Some(&file) = self.files_due.front() else { break };
            // (A queue configured smaller than a file's audiences takes what fits.)
            let events = self.files_unsettled.keys().filter(|(f, _)| *f == file).count().min(self.out.max_capacity());
            if events > 0 && self.reserved() + events > self.room() {
                break;
            }
            self.files_due.pop_front();
            if events == 0 {
                // Settled by a live event since the connect.
                continue;
            }
            self.files_outstanding += 1;
            self.files_events_in_flight += events;
            self.read_in_background(RequestBody::FileInfo { file }, move |result| Done::FileState {
                generation,
                file,
                events,
                result,
            });
        }
    }

    /// Room in the application's queue that answers asked for on this connection may
    /// take: receipt rows and file states in flight (each ask counts both, so neither
    /// kind is given room the other already holds).
    fn reserved(&self) -> usize {
        self.receipts_rows_in_flight + self.files_events_in_flight
    }

    /// A live file event, handed on: an upload in progress is followed (the latest per
    /// audience; in a conversation at most `FILES_UNSETTLED_PER_CONV` uploads and
    /// `FILES_UNSETTLED_MAX / 2` over all of them, so whoever attaches uploads in a
    /// group the user is in cannot crowd its own out), one that ended is not any more,
    /// in any audience (its final state reaches a device once, in one audience), unless
    /// the application's queue had no room for it: then it is asked for (`FileInfo`)
    /// once there is.
    fn file_event(&mut self, progress: FileProgress) {
        let (key, file) = ((progress.file, progress.conv), progress.file);
        let ended = !matches!(progress.state, FileState::Uploading { .. });
        let handed = self.lifecycle.is_empty() && self.out.try_send(SessionEvent::File(progress.clone())).is_ok();
        if ended && handed {
            self.files_unsettled.retain(|(f, _), _| *f != file);
            return;
        }
        if !self.files_unsettled.contains_key(&key) && !self.room_to_follow(progress.conv) {
            return;
        }
        if ended {
            // Lost for want of room: asked for once there is, and said in this audience
            // (its last state here unknown, so any answer is news).
            let unknown = FileProgress { state: FileState::Uploading { offset: u64::MAX }, ..progress };
            self.files_unsettled.insert(key, unknown);
            if !self.files_due.contains(&file) {
                self.files_due.push_back(file);
            }
        } else {
            self.files_unsettled.insert(key, progress);
        }
    }

    /// Whether one more upload may be followed in audience `conv` (`file_event`).
    fn room_to_follow(&self, conv: Option<ConvId>) -> bool {
        if self.files_unsettled.len() >= FILES_UNSETTLED_MAX {
            return false;
        }
        let Some(conv) = conv else { return true };
        let (mut all, mut here) = (0, 0);
        for (_, c) in self.files_unsettled.keys().filter(|(_, c)| c.is_some()) {
            all += 1;
            here += usize::from(*c == Some(conv));
        }
        all < FILES_UNSETTLED_MAX / 2 && here < FILES_UNSETTLED_PER_CONV
    }

    /// `file`'s state `now` (asked after a reconnect): said in each audience it was
    /// last seen in where it moved since, and no longer followed once it ended there;
    /// an audience whose event finds no room in the application's queue keeps its last
    /// state and the file is asked about again once there is room.
    fn file_state_now(&mut self, file: FileId, now: FileState) {
        let keys: Vec<(FileId, Option<ConvId>)> =
            self.files_unsettled.keys().filter(|(f, _)| *f == file).copied().collect();
        let ended = !matches!(now, FileState::Uploading { .. });
        for key in keys {
            let Some(last) = self.files_unsettled.get(&key) else { continue };
            if last.state != now {
                let event = FileProgress { state: now.clone(), ..last.clone() };
                if !self.lifecycle.is_empty() || self.out.try_send(SessionEvent::File(event.clone())).is_err() {
                    if !self.files_due.contains(&file) {
                        self.files_due.push_back(file);
                    }
                    continue;
                }
                self.files_unsettled.insert(key, event);
            }
            if ended {
                self.files_unsettled.remove(&key);
            }
        }
    }

    /// `conv` was left: its uploads are followed no more.
    fn forget_files_of(&mut self, conv: ConvId) {
        self.files_unsettled.retain(|(_, c), _| *c != Some(conv));
    }

    /// After the catch-up, asks for the receipts of the conversations no complete page
    /// brought them for (`receipts_due`): at most `max_fetching` at a time, each once
    /// the application's queue has room for all of its members' rows, so none is
    /// dropped.
    fn ask_receipts(&mut self, generation: u64) {
        while self.receipts_outstanding < self.config.max_fetching {
            let Some(&(conv, rows)) = self.receipts_due.front() else { break };
            // (A queue configured smaller than a conversation takes what fits.)
            let rows = usize::try_from(rows).unwrap_or(usize::MAX).min(self.out.max_capacity());
            if self.reserved() + rows > self.room() {
                break;
            }
            self.receipts_due.pop_front();
            self.receipts_outstanding += 1;
            self.receipts_rows_in_flight += rows;
            self.read_in_background(RequestBody::Receipts { conv }, move |result| Done::Receipts {
                generation,
                conv,
                rows,
                result,
            });
        }
    }

    /// Hands on the snapshot's rows still waiting, as many as the event queue has room
    /// for (before, a snapshot larger than the room, as a 4,096-contact one can be, lost
    /// the rows that did not fit until each user next changed), then the former
    /// contacts it left out (`PresenceGone`). Receipts that then find no room are asked
    /// for again once there is (`receipts`).
    fn release_presence(&mut self) {
        self.release_typing_stops();
        while self.room() > 0 {
            let Some((_, p)) = self.presence_backlog.pop_first() else { break };
            self.emit_presence(p);
        }
        while self.room() > 0 {
            let Some((user, name)) = self.presence_gone.pop_first() else { break };
            self.emit(SessionEvent::PresenceGone { user, name });
        }
    }

    /// Hands on a contact's presence, remembering whom it was shown for.
    fn emit_presence(&mut self, p: PresenceInfo) {
        if self.presence_shown.len() < PRESENCE_SHOWN_MAX || self.presence_shown.contains_key(&p.user) {
            self.presence_shown.insert(p.user, p.name.clone());
        }
        self.emit(SessionEvent::Presence(p));
    }

    /// A snapshot came (`list`, asked for after a connect; `newer`: users changed live
    /// since it was asked): users shown before whom it leaves out, and who did not change
    /// live since, are contacts no more (`SessionEvent::PresenceGone`, handed on after
    /// its rows). The list of users shown starts again from the snapshot's. A snapshot
    /// cut at `PRESENCE_SNAPSHOT_MAX` rows, or of a user whose conversations pass the
    /// bounds the broker gathers contacts within, tells nothing of those left out.
    fn former_contacts(&mut self, list: &[PresenceInfo], newer: Option<&HashSet<UserId>>) {
        use switchboard_protocol::limits::{
            PRESENCE_CONVERSATIONS_SCANNED, PRESENCE_MEMBERS_SCANNED, PRESENCE_SNAPSHOT_MAX,
        };
        for p in list {
            self.presence_gone.remove(&p.user);
        }
        // The broker gathers contacts within bounds: past them (as the last states
        // listed this user's conversations) the snapshot may leave out users it still
        // shares a conversation with (a review).
        let members: u64 = self.member_counts.values().map(|&n| u64::from(n)).sum();
        if list.len() >= PRESENCE_SNAPSHOT_MAX as usize
            || self.member_counts.len() >= PRESENCE_CONVERSATIONS_SCANNED as usize
            || members >= u64::from(PRESENCE_MEMBERS_SCANNED)
        {
            return;
        }
        let listed: HashSet<UserId> = list.iter().map(|p| p.user).collect();
        let shown = std::mem::take(&mut self.presence_shown);
        for (user, name) in shown {
            if listed.contains(&user) || newer.is_some_and(|n| n.contains(&user)) {
                self.presence_shown.insert(user, name);
            } else if self.presence_gone.len() < PRESENCE_SHOWN_MAX {
                self.presence_gone.insert(user, name);
            }
        }
    }

    /// A typing change from the broker, through `TypingShown`.
    fn typing(&mut self, conv: ConvId, user: UserId, typing: bool) {
        let now = Instant::now();
        // A start in a conversation this user has left is not shown: it would stand for
        // good (its stop is not sent to a former member). A start, a datagram, is not
        // ordered with the entries on the control stream: one sent just before the
        // departure can come after the entry saying so (an attacker review).
        if typing && self.merge.has_left(conv) {
            return;
        }
        if typing {
            let out = &self.out;
            let waiting = !self.lifecycle.is_empty();
            self.typing.start((conv, user), now, || {
                !waiting && out.try_send(SessionEvent::Typing { conv, user, typing }).is_ok()
            });
        } else {
            self.typing.stop((conv, user), now);
            self.release_typing_stops();
        }
    }

    /// Hands on the typing stops owed, as the event queue has room.
    fn release_typing_stops(&mut self) {
        let out = &self.out;
        let waiting = !self.lifecycle.is_empty();
        self.typing.release(|(conv, user)| {
            !waiting && out.try_send(SessionEvent::Typing { conv, user, typing: false }).is_ok()
        });
    }

    /// Live receipts: handed on as room allows; a conversation whose receipts find no
    /// room is asked for again once there is (`receipts_due`: before, they were dropped
    /// and the ticks stayed stale until that member moved again: a review).
    fn live_receipts(&mut self, receipts: Vec<Receipt>) {
        let count = receipts.len();
        for r in receipts {
            let conv = r.conv;
            let dropped = self.room() == 0 || self.out.try_send(SessionEvent::Receipt(r)).is_err();
            if dropped && !self.receipts_due.iter().any(|&(c, _)| c == conv) && !self.merge.has_left(conv) {
                // The answer holds a row per member (a review: the frame's count made
                // the answer not fit, asked twice).
                let rows = self.member_counts.get(&conv).copied().unwrap_or(u32::try_from(count).unwrap_or(u32::MAX));
                self.receipts_due.push_back((conv, rows));
            }
        }
    }

    /// Receipts of `conv` came (from `Receipts` or a completing catch-up page): each
    /// goes to the application, or, when its queue has no room for all of them, they are
    /// asked for again once it has (before, those that did not fit were dropped).
    fn receipts(&mut self, conv: ConvId, receipts: Vec<Receipt>) {
        // The room kept for `Receipts` answers still to come is not theirs to take.
        if receipts.len().min(self.out.max_capacity()) + self.receipts_rows_in_flight > self.room() {
            let rows = u32::try_from(receipts.len()).unwrap_or(u32::MAX);
            if !self.receipts_due.iter().any(|&(c, _)| c == conv) {
                self.receipts_due.push_back((conv, rows));
            }
            return;
        }
        for r in receipts {
            self.emit(SessionEvent::Receipt(r));
        }
    }

    /// The application took events: arm the delivered and persist timers, and hand on
    /// what waited for room.
    fn taken_more(&mut self) {
        self.taken.pending.store(false, Ordering::Release);
        if self.mark_at.is_none() {
            self.mark_at = Some(Instant::now() + Duration::from_millis(self.config.delivered_batch_ms));
        }
        self.arm_persist();
        self.release_lifecycle();
        let entries = self.merge.release(self.room());
        self.emit_entries(entries);
        self.release_presence();
        self.pump();
    }

    fn arm_persist(&mut self) {
        if self.persist_at.is_none() {
            self.persist_at = Some(Instant::now() + Duration::from_millis(self.config.persist_ms));
        }
    }

    fn taken_cursors(&self) -> Cursors {
        self.taken.cursors.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What to save: the taken cursors, and the conversations left whose saved cursors
    /// are still to be moved among the left ones. Those are read first: a `Left` taken
    /// between the two reads then shows in neither (and is saved next time), never only
    /// in the second, where its cursor would be moved out and saved back in one save.
    fn taken_to_save(&self) -> (Cursors, Vec<(ConvId, Seq)>) {
        let forgot = self.taken.left.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (self.taken_cursors(), forgot)
    }

    /// Reports the highest taken seq of each conversation that moved, in requests of at
    /// most `MAX_MARKS_PER_REQUEST` pairs; what fails is reported at the next flush.
    fn flush_marks(&mut self) {
        let Some(live) = &self.live else { return };
        if self.marks_outstanding > 0 {
            // One batch at a time; the next flush picks up what moved meanwhile.
            self.mark_at.get_or_insert(Instant::now() + Duration::from_millis(self.config.delivered_batch_ms));
            return;
        }
        let marks: Vec<(ConvId, Seq)> = self
            .taken_cursors()
            .into_iter()
            .filter(|(conv, seq)| *seq > self.reported.get(conv).copied().unwrap_or(0))
            .collect();
        for chunk in marks.chunks(MAX_MARKS_PER_REQUEST as usize) {
            let (client, done, marks) = (live.client.clone(), self.done_tx.clone(), chunk.to_vec());
            self.marks_outstanding += 1;
            tokio::spawn(async move {
                let ok = client
                    .mark_delivered(&marks)
                    .await
                    .inspect_err(|e| tracing::debug!(error = %e, "delivered"))
                    .is_ok();
                let _ = done.send(Done::Marks { marks, ok }).await;
            });
        }
    }

    fn persist(&mut self) {
        if self.saving {
            self.arm_persist();
            return;
        }
        let (cursors, forgot) = self.taken_to_save();
        if cursors == self.persisted && forgot.is_empty() {
            return;
        }
        self.saving = true;
        let (store, done) = (self.store.clone(), self.done_tx.clone());
        tokio::spawn(async move {
            let (c, f) = (cursors.clone(), forgot.clone());
            let ok = match tokio::task::spawn_blocking(move || store.save(&c, &f)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "saving cursors failed");
                    false
                }
                Err(_) => false,
            };
            let _ = done.send(Done::Saved { cursors, forgot, ok }).await;
        });
    }

    async fn shutdown(mut self) {
        for (_, p) in std::mem::take(&mut self.pending) {
            let _ = p.reply.send(Err(SessionError::Stopped));
        }
        let (cursors, forgot) = self.taken_to_save();
        if let Some(live) = self.live.take() {
            let marks: Vec<(ConvId, Seq)> = cursors
                .iter()
                .filter(|(conv, seq)| **seq > self.reported.get(conv).copied().unwrap_or(0))
                .map(|(&c, &s)| (c, s))
                .collect();
            for chunk in marks.chunks(MAX_MARKS_PER_REQUEST as usize) {
                let _ = tokio::time::timeout(Duration::from_millis(500), live.client.mark_delivered(chunk)).await;
            }
            live.client.close();
        }
        if cursors != self.persisted || !forgot.is_empty() {
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.save(&cursors, &forgot)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "saving cursors failed"),
                Err(e) => tracing::warn!(error = %e, "saving cursors failed"),
            }
        }
    }

    /// Free places in the application's queue; none while `Connected` or `Disconnected`
    /// events wait for room (`emit_lifecycle`): nothing overtakes them.
    fn room(&self) -> usize {
        if self.out.is_closed() || !self.lifecycle.is_empty() { 0 } else { self.out.capacity() }
    }

    /// Queues `Connected` or `Disconnected`; when the queue is full, it waits for room
    /// ahead of everything else (`release_lifecycle`; `room` is 0 meanwhile). What waits
    /// is at most a `Disconnected` and the `Connected` after it: a newer drop replaces
    /// all that waits (the application learns the link is down, with the latest error),
    /// so a link flapping while the application is busy shows as its last drop and
    /// reconnect. Before, they were dropped on a full queue, and an application never
    /// learned it had been disconnected (a review).
    fn emit_lifecycle(&mut self, event: SessionEvent) {
        let event = if self.lifecycle.is_empty() {
            match self.out.try_send(event) {
                Ok(()) => return,
                Err(full) => full.into_inner(),
            }
        } else {
            event
        };
        if matches!(event, SessionEvent::Disconnected { .. }) {
            self.lifecycle.clear();
        } else if matches!(self.lifecycle.back(), Some(SessionEvent::Connected)) {
            self.lifecycle.pop_back();
        }
        self.lifecycle.push_back(event);
    }

    /// Hands on the `Connected` and `Disconnected` events waiting, as room allows.
    fn release_lifecycle(&mut self) {
        while let Some(event) = self.lifecycle.pop_front() {
            if let Err(full) = self.out.try_send(event) {
                self.lifecycle.push_front(full.into_inner());
                return;
            }
        }
    }

    fn emit_entries(&mut self, entries: Vec<Entry>) {
        let me = self.identity.user_id;
        // The entries that end this user's membership, each the last of its
        // conversation in this batch and in what is known of it (one followed by more
        // was undone: the user was added back before they were read). A page cut right
        // after the removal, by the application's room or the page bound, while the
        // conversation is known to go on, ended nothing (before, `Left` was told and
        // the conversation's live entries dropped for the rest of the connection: a
        // review).
        let merge = &self.merge;
        let ends = |i: usize, e: &Entry| {
            let gone = match &e.body {
                Body::MemberRemoved { user } => *user == me,
                Body::MemberLeft => e.sender == me,
                _ => false,
            };
            gone && !entries[i + 1..].iter().any(|later| later.conv == e.conv) && merge.known_seq(e.conv) <= e.seq
        };
        let left: Vec<ConvId> = entries.iter().enumerate().filter(|&(i, e)| ends(i, e)).map(|(_, e)| e.conv).collect();
        for e in entries {
            // A message ends its sender's indicator (the broker pushes no stop for it: the
            // receiver clears it on the message), so it is no longer tracked as shown
            // (before, every typist who then sent stayed tracked until the connection
            // ended, and past `TYPING_SHOWN_MAX` of them new typists were not shown).
            if matches!(e.body, Body::Text { .. } | Body::Files { .. }) {
                self.typing.message((e.conv, e.sender));
            }
            // `room` bounded the merge's output, and only this task sends.
            if self.out.try_send(SessionEvent::Entry(e)).is_err() {
                tracing::error!("event queue full despite room");
            }
        }
        for conv in left {
            self.left_live(conv);
        }
    }

    /// This user was removed from `conv`, or left it from one of its devices, and the
    /// entry saying so was just handed on: `Left` follows it, and the conversation is no
    /// longer tracked (its cursor kept among the left ones). Before, a removal seen live
    /// was told only at the next connect, and a script watching for `Left` missed it
    /// (a new user's trial). Without room for `Left`, the conversation is probed: its
    /// next page is refused, which tells it then.
    fn left_live(&mut self, conv: ConvId) {
        if self.room() == 0 {
            self.merge.probe(conv);
            return;
        }
        self.tell_left(conv);
    }

    /// Stops tracking `conv` (this user is no longer a member; its cursor is kept among
    /// the left ones) and queues `Left` for it; the caller made sure of room for it.
    fn tell_left(&mut self, conv: ConvId) {
        self.merge.forget(conv);
        self.reported.remove(&conv);
        self.forget_files_of(conv);
        self.emit(SessionEvent::Left { conv });
        // Typing in it is no longer told: its indicators stop, after `Left` (which the
        // caller made room for), as room allows.
        self.typing.left(conv);
        self.release_typing_stops();
    }

    /// Queues an event that is not an entry; dropped when the queue is full.
    fn emit(&mut self, event: SessionEvent) {
        let _ = self.out.try_send(event);
    }
}

async fn next_event(live: &mut Option<Live>) -> Option<Event> {
    match live {
        Some(live) => live.events.next().await,
        None => std::future::pending().await,
    }
}

async fn wait_connect(
    connecting: &mut Option<oneshot::Receiver<Result<Client, ClientError>>>,
) -> Result<Client, ClientError> {
    match connecting {
        Some(rx) => rx.await.unwrap_or_else(|_| Err(ClientError::Connect("connect task ended".into()))),
        None => std::future::pending().await,
    }
}

/// A random `u64` from the system's source: the draw `Backoff::next_ms` takes.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    crate::random(&mut bytes);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_bound_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(100, 1000);
        let check = |b: &mut Backoff, random: u64, expected: u64| assert_eq!(b.next_ms(random), expected);
        check(&mut b, 0, 50);
        check(&mut b, u64::MAX, 200 / 2 + u64::MAX % 101);
        check(&mut b, 0, 200);
        check(&mut b, 400, 800);
        check(&mut b, 0, 500);
        for _ in 0..100 {
            let d = b.next_ms(random_u64());
            assert!((500..=1000).contains(&d), "{d}");
        }
        b.reset();
        check(&mut b, 50, 100);
        // A lower ceiling for one delay (a broker restart) leaves the attempt count alone.
        let mut b = Backoff::new(100, 10_000);
        for _ in 0..10 {
            let d = b.next_ms_within(random_u64(), RESTART_RETRY_MAX_MS);
            assert!(d <= RESTART_RETRY_MAX_MS, "{d}");
        }
        assert!(b.next_ms(0) >= 5_000, "the full backoff again once the cap is lifted");
    }

    #[test]
    fn only_writes_with_client_ids_and_idempotent_requests_are_sent_again() {
        use switchboard_protocol::NewConversation;
        let cid = [1; 16];
        let check = |body: RequestBody, expected: bool| assert_eq!(retry_safe(&body), expected, "{body:?}");
        check(RequestBody::Send { conv: 1, client_id: cid, text: "x".into() }, true);
        check(RequestBody::Edit { conv: 1, client_id: cid, target: 1, text: "x".into() }, true);
        check(RequestBody::Delete { conv: 1, client_id: cid, target: 1 }, true);
        check(RequestBody::MarkRead { conv: 1, seq: 2 }, true);
        check(RequestBody::CreateConversation(NewConversation::Direct { peer: "bob".into() }), true);
        check(RequestBody::CreateConversation(NewConversation::Group { title: "t".into(), members: vec![] }), false);
        check(RequestBody::AddMembers { conv: 1, users: vec![], role: switchboard_protocol::Role::Member }, false);
        check(RequestBody::Leave { conv: 1 }, false);
        check(RequestBody::RevokeDevice { device_id: 2 }, false);
    }

    #[test]
    fn revocation_and_refused_proofs_are_permanent_and_the_rest_is_retried() {
        let closed = |code| ClientError::Closed { code: Some(code), reason: String::new() };
        assert!(permanent(&closed(ErrorCode::DEVICE_REVOKED)));
        assert!(permanent(&ClientError::Server(switchboard_protocol::ErrorBody::new(ErrorCode::AUTH_FAILED, "no"))));
        for code in [ErrorCode::GOING_AWAY, ErrorCode::SLOW_CONSUMER, ErrorCode::INTERNAL, ErrorCode::OVERLOADED] {
            assert!(!permanent(&closed(code)), "{code}");
        }
        assert!(!permanent(&ClientError::Connect("timed out".into())));
        assert!(!permanent(&ClientError::Closed { code: None, reason: "idle timeout".into() }));
    }
}
