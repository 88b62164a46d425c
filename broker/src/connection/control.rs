//! The control stream after authentication: the session reads requests in order and
//! routes each, typed, to the one place that handles it (a conversation actor, the
//! catalog, the user directory), never waiting on the outcome.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchboard_protocol::limits::{MAX_CLIENT_FRAME_BYTES, MAX_INFLIGHT_REQUESTS};
use switchboard_protocol::{
    ClientFrame, ErrorBody, ErrorCode, FrameDecoder, Reply, Request, RequestBody, Signal, UserId, decode,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::handshake::Authed;
use super::transfer::Transfers;
use super::writer::write_loop;
use super::{Close, close, read_frame};
use crate::Shared;
use crate::catalog;
use crate::conversation::{Caller, Command, Read};
use crate::fanout::SessionHandle;
use crate::files::requests as files;
use crate::metrics::Counters;
use crate::outbound::{AnswerRoom, Closed, Outbound};
use crate::overload::SocketBacklog;
use crate::reply::Responder;

/// How long a finished session may take to send what is still queued.
const WRITER_DRAIN: Duration = Duration::from_secs(5);

pub(super) async fn run(shared: Arc<Shared>, conn: quinn::Connection, authed: Authed, backlog: Arc<SocketBacklog>) {
    let Authed { user, device, place, send, mut recv, mut decoder, source, checked } = authed;
    let session = shared.next_session_id.fetch_add(1, Ordering::Relaxed);
    let out = Arc::new(Outbound::new(shared.config.outbound_max_frames, shared.config.outbound_max_bytes).with_owner(
        shared.store.clone(),
        user,
        device,
        shared.users.disables(),
        checked,
    ));
    let handle = SessionHandle { id: session, device, out: out.clone(), conn: conn.clone() };
    if let Err(e) = shared.users.attach(place, handle) {
        let refusal: Close = e.into();
        shared.counters.handshake_refused(refusal.0);
        return close(&conn, refusal);
    }
    let mut attached = Attached { shared: &shared, user, session, presence: false, silent_ms: 0 };
    // A revoke that ran between the signature check and the attach found no session
    // to close: look again now that the session is visible to revokes.
    match shared.store.device(user, device) {
        Ok(Some(_)) => {}
        Ok(None) => return close(&conn, Close::named(ErrorCode::DEVICE_REVOKED)),
        // Not told it was revoked: it was not, as far as anyone knows.
        Err(_) => return close(&conn, Close::named(ErrorCode::INTERNAL)),
    }
    // Likewise an account disabled meanwhile (its sessions were closed before this one
    // was visible), even if enabled again since (a review).
    if let Err(e) = crate::auth::refuse_if_disabled(&shared.store, user) {
        return close(&conn, Close(e.code, e.message));
    }
    if shared.users.disables().disabled_since(user, checked) {
        return close(&conn, Close::named(ErrorCode::ACCOUNT_DISABLED));
    }
    // Likewise a storage failure that closed every session just before this attach.
    if shared.health.is_failed() {
        return close(&conn, Close::named(ErrorCode::INTERNAL));
    }
    tracing::debug!(user, device, session, remote = %conn.remote_address(), "session started");
    Counters::add(&shared.counters.sessions_started, 1);
    shared.presence.attach(user, session);
    attached.presence = true;
    shared.typing.session_started(user, out.clone());
    let writer = {
        let (shared, conn, out) = (shared.clone(), conn.clone(), out.clone());
        tokio::spawn(async move {
            let stall = shared.config.write_stall();
            if write_loop(conn, send, out, stall).await == Some(ErrorCode::SLOW_CONSUMER)
                && let Some(devices) = shared.counters.slow_consumers.count(crate::now_ms())
            {
                // The device reconnects and catches up; many of them, or one over and
                // over, mean fan-out outruns the devices' links (or a queue set too small).
                tracing::warn!(
                    devices,
                    outbound_max_frames = shared.config.outbound_max_frames,
                    outbound_max_bytes = shared.config.outbound_max_bytes,
                    "devices disconnected with SLOW_CONSUMER (outbound queue overflowed, or nothing of it taken for twice \
                     idle_timeout_ms) since the last warning"
                );
            }
        })
    };
    let session_state = Session {
        shared: shared.clone(),
        caller: Caller { user, device, session },
        source,
        out: out.clone(),
        conn: conn.clone(),
        transfers: std::sync::OnceLock::new(),
        backlog,
        store_slots: shared.users.store_slots(user),
        heard_ms: std::sync::atomic::AtomicU64::new(crate::now_ms()),
    };
    decoder.set_limit(MAX_CLIENT_FRAME_BYTES);
    let permits = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS as usize));
    let end = read_loop(&conn, &mut recv, &mut decoder, &permits, &session_state).await;
    // A device whose connection timed out was last heard from at least the idle timeout
    // ago (the smaller of ours and its own, which the broker cannot read; quinn restarts
    // the timer once more when it sends after the last packet received, so up to a third
    // more with our keep-alive): its last seen is then, not now; and never before its
    // last frame (`heard_ms`, the session's start until one comes), as a client with a
    // shorter timeout than ours would otherwise get.
    if matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut)) {
        let since_frame = crate::now_ms().saturating_sub(session_state.heard_ms.load(Ordering::Relaxed));
        attached.silent_ms = shared.config.idle_timeout_ms.min(since_frame);
    }
    if end.0 != ErrorCode::NO_ERROR {
        tracing::debug!(session, code = %end.0, reason = %end.1, "closing connection");
        close(&conn, end);
    }
    out.close(ErrorCode::NO_ERROR);
    // The writer sends what is queued, unless the peer stopped reading: then it is
    // aborted rather than left blocked forever.
    let mut writer = writer;
    if tokio::time::timeout(WRITER_DRAIN, &mut writer).await.is_err() {
        writer.abort();
    }
    // The control stream is gone: so is the session (a no-op if already closed).
    conn.close(ErrorCode::NO_ERROR.0.into(), b"session ended");
    drop(attached);
    tracing::debug!(session, "session ended");
}

/// An attached session, undone however its task ends (returns, or unwinds from a panic):
/// the user's session count always comes back down, so a user is never locked out at
/// `MAX_SESSIONS_PER_USER` by sessions that are gone, and `Online` keeps none of them.
struct Attached<'a> {
    shared: &'a Shared,
    user: UserId,
    session: u64,
    /// Presence and typing know the session too.
    presence: bool,
    /// How long before its end the device was last heard from, ms (0: it closed).
    silent_ms: u64,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let Attached { shared, user, session, presence, silent_ms } = *self;
        shared.users.detach(user, session);
        if presence {
            shared.presence.detach(user, session, silent_ms);
            shared.typing.session_ended(user, session);
        }
    }
}

/// Reads the control stream and, between its frames and while a request waits for a
/// permit, answer room or a store slot, the connection's datagrams and new transfer
/// streams (`other_traffic`): a client held back on its control stream still types and
/// uploads.
async fn read_loop(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    permits: &Arc<Semaphore>,
    session: &Session,
) -> Close {
    // Off once the connection reports datagrams unusable (closed, or not negotiated).
    let mut datagrams = true;
    loop {
        // Cancel-safe: `read_frame` keeps partial frames in `decoder`.
        let body = match beside_other_traffic(read_frame(recv, decoder), conn, session, &mut datagrams).await {
            Ok(Ok(body)) => body,
            Ok(Err(close)) | Err(close) => return close,
        };
        session.heard_ms.store(crate::now_ms(), Ordering::Relaxed);
        let req = match decode::<ClientFrame>(&body) {
            Ok(ClientFrame::Request(r)) => r,
            Ok(ClientFrame::Signal(signal)) => {
                if let Some(code) = session.ended() {
                    return Close::named(code);
                }
                session.signal(signal);
                continue;
            }
            Err(e) => return Close(e.code(), e.to_string()),
        };
        // At the in-flight cap this waits, so the client is slowed by flow control.
        let permit = match beside_other_traffic(permits.clone().acquire_owned(), conn, session, &mut datagrams).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Close::named(ErrorCode::INTERNAL),
            Err(close) => return close,
        };
        // Every answer has room in the outbound queue before its request is taken, so
        // answers alone never overflow it (`reserve_answer`): at once when there is
        // room (no timer on the message path), else waited for. The wait ends with the
        // connection (nothing would drain the queue any more), and after
        // `ANSWER_ROOM_WAIT` without room the device is a slow consumer, as it would be
        // had the answers gone into the queue.
        let bytes = answer_bound(&req.body).max(SMALL_ANSWER_BYTES);
        let room = match session.out.try_reserve_answer(bytes) {
            Ok(Some(room)) => Some(room),
            Err(Closed(code)) => return Close::named(code),
            Ok(None) => {
                let wait = async {
                    tokio::select! {
                        room = tokio::time::timeout(ANSWER_ROOM_WAIT, session.out.reserve_answer(bytes)) => Some(room),
                        _ = conn.closed() => None,
                    }
                };
                match beside_other_traffic(wait, conn, session, &mut datagrams).await {
                    Ok(Some(Ok(Ok(room)))) => Some(room),
                    Ok(Some(Ok(Err(Closed(code))))) => return Close::named(code),
                    Ok(Some(Err(_))) => {
                        session.out.close(ErrorCode::SLOW_CONSUMER);
                        return Close::named(ErrorCode::SLOW_CONSUMER);
                    }
                    Ok(None) => return Close(ErrorCode::NO_ERROR, "connection closed".into()),
                    Err(close) => return close,
                }
            }
        };
        // Store work off the actors waits for one of the user's slots.
        let store_slot = if takes_a_store_slot(&req.body) {
            match beside_other_traffic(session.store_slots.clone().acquire_owned(), conn, session, &mut datagrams).await
            {
                Ok(Ok(slot)) => Some(slot),
                Ok(Err(_)) => return Close::named(ErrorCode::INTERNAL),
                Err(close) => return close,
            }
        } else {
            None
        };
        // A session closed from outside (its device revoked, its account disabled, a
        // slow consumer) carries out nothing more, not even the requests it had already
        // read or that were waiting above: they would take effect after the revocation
        // was answered (a `Settings` change waiting for a store slot, say).
        if let Some(code) = session.ended() {
            return Close::named(code);
        }
        session.dispatch(req, permit, room, store_slot).await;
    }
}

/// Whether `body` is served by store work on the runtime's shared blocking pool outside
/// the conversation actors (whose mailboxes bound theirs) and the catalog thread (whose
/// queue bounds its writes): reads of lists and states, and the file requests whose
/// checks read the store there (`BeginUpload` scans the user's uploads under the files
/// lock, `SendFiles` each file's attachments, `DeleteFile` and `WithdrawFile` a file's
/// holds and messages). Such a request takes one of the user's store slots
/// (`STORE_JOBS_PER_USER`). So do creations, blocks and settings changes, served on the
/// catalog thread: its queue is one for all users, first come first served, and before,
/// one user's sessions could keep thousands of refused creations waiting in it, each
/// free, ahead of everyone's logins, blocks and the operator's `user disable` (an
/// attacker review). Not a revocation or a password change: they are how an owner
/// takes an account back from a stolen device, which could otherwise hold the slots
/// with reads (a review); a revocation of a device that is not there is answered from
/// one store read before the catalog thread (`catalog::revoke_device`), and password
/// changes are bounded per account and by the hashing queue. A `MarkRead` takes one
/// too: it reads the store on the session's thread, and either is answered at rest or
/// waits in its conversation's actor (before, one user's sessions could hold thousands
/// there: an attacker review). The rest are bounded otherwise: `CancelUpload` by its
/// upload's actor, conversation requests by their actors' mailboxes and write admission.
fn takes_a_store_slot(body: &RequestBody) -> bool {
    matches!(
        body,
        RequestBody::BeginUpload(_)
            | RequestBody::MarkRead { .. }
            | RequestBody::CreateConversation(_)
            | RequestBody::Block { .. }
            | RequestBody::SendFiles { .. }
            | RequestBody::DeleteFile { .. }
            | RequestBody::WithdrawFile { .. }
            | RequestBody::ListConversations { .. }
            | RequestBody::ConversationStates { .. }
            | RequestBody::ListDevices
            | RequestBody::BlockedUsers
            | RequestBody::Settings { .. }
            | RequestBody::Presence { .. }
            | RequestBody::UploadStatus { .. }
            | RequestBody::FileInfo { .. }
            | RequestBody::Usage
            | RequestBody::ListFiles { .. }
            | RequestBody::ListUploads { .. }
    )
}

/// A list answer (`ListConversations`, `ConversationStates`, `BlockedUsers`) within the
/// caller's allowance of member rows (`UserDirectory::allow_member_reads`), charged a
/// row per item listed (`limits::SUMMARY_ROWS` per conversation state). Before, these were bounded
/// only by the user's store slots: one account pipelining pages kept four of the
/// blocking pool's threads reading the store (an attacker review).
async fn charged_list(
    shared: &Shared,
    user: UserId,
    read: impl std::future::Future<Output = Result<Reply, ErrorBody>>,
) -> Result<Reply, ErrorBody> {
    shared.users.allow_member_reads(user)?;
    let answer = read.await?;
    let rows = match &answer {
        Reply::Conversations { items, .. } => items.len(),
        Reply::ConversationStates { items, .. } => crate::limits::SUMMARY_ROWS * items.len(),
        Reply::BlockedUsers(users) => users.len(),
        _ => 0,
    };
    shared.users.charge_member_reads(user, rows);
    Ok(answer)
}

/// Waits for `wait`, taking the connection's other traffic (`other_traffic`) meanwhile;
/// `Err` when that traffic ends the session.
async fn beside_other_traffic<F: std::future::Future>(
    wait: F,
    conn: &quinn::Connection,
    session: &Session,
    datagrams: &mut bool,
) -> Result<F::Output, Close> {
    tokio::pin!(wait);
    loop {
        tokio::select! {
            biased;
            done = &mut wait => return Ok(done),
            end = other_traffic(conn, session, datagrams) => if let Some(close) = end {
                return Err(close);
            },
        }
    }
}

/// Takes one piece of the connection's traffic besides the control stream: a transfer
/// stream (served on a task of its own; the peer can open one only once a file request
/// raised its stream credit, `Transfers::allow`) or a datagram (a signal, handled in
/// place). `Some` when the session ends: the connection is gone (no stream can be
/// accepted), or the session was closed from outside (checked before either is
/// taken). Cancel-safe: a stream or datagram not yet returned stays queued in quinn.
async fn other_traffic(conn: &quinn::Connection, session: &Session, datagrams: &mut bool) -> Option<Close> {
    tokio::select! {
        stream = conn.accept_bi() => match stream {
            Ok(_) if let Some(code) = session.ended() => Some(Close::named(code)),
            Ok((send, recv)) => {
                let transfers = session.transfers().clone();
                let revocation = crate::reply::Revocation::of(session.out.clone());
                let (shared, user) = (session.shared.clone(), session.caller.user);
                tokio::spawn(super::transfer::serve(shared, user, revocation, transfers, send, recv));
                None
            }
            Err(_) => Some(Close(ErrorCode::NO_ERROR, "connection closed".into())),
        },
        datagram = conn.read_datagram(), if *datagrams => match datagram {
            Ok(_) if let Some(code) = session.ended() => Some(Close::named(code)),
            Ok(datagram) => {
                session.datagram(&datagram);
                None
            }
            Err(_) => {
                *datagrams = false;
                None
            }
        },
    }
}

/// How long the session waits for room for an answer (`Outbound::reserve_answer`)
/// before it closes the device as a slow consumer: 4 MiB of answers at about 0.5 Mbit/s.
/// Room comes as soon as the writer has handed what it took to QUIC, so a device that
/// reads waits far less.
const ANSWER_ROOM_WAIT: Duration = Duration::from_secs(60);

/// Room reserved for an answer that is not a page or a list (`answer_bound` 0): an ack,
/// a status, a single record or an error, each a few hundred bytes at most.
const SMALL_ANSWER_BYTES: usize = 1024;

/// The most bytes the answer to `body` may encode to, for the requests whose answer is
/// a page or a list (0 for the rest: an ack, a status, a single record, each a few
/// hundred bytes at most). `History` and `CatchUp` are bounded by their `limit` (the
/// per-entry bound of `protocol::limits::ENTRY_MAX_BYTES`, the bound every page's fit
/// in a server frame is checked with); member, receipt, presence, block and upload
/// lists by their item bounds (every list has one). The match
/// names every request, so a new one is placed here on purpose.
fn answer_bound(body: &RequestBody) -> usize {
    use crate::limits::MAX_DEVICES_PER_USER;
    use switchboard_protocol::limits::{
        CATCH_UP_PAGE_MAX, ENTRY_MAX_BYTES, HISTORY_PAGE_MAX, LIST_PAGE_MAX, MAX_BLOCKED, MAX_CONTENT_TYPE_BYTES,
        MAX_FILE_NAME_BYTES, MAX_GROUP_MEMBERS, MAX_LISTED_UPLOADS, MAX_NAME_BYTES, MAX_SERVER_FRAME_BYTES,
        PRESENCE_MAX, PRESENCE_SNAPSHOT_MAX,
    };
    // A response's frame header, id, variant and list length.
    const LIST: usize = 64;
    // A `Receipt`: conv, user and two seqs as varints of at most 10 bytes, an option tag.
    const RECEIPT_MAX_BYTES: usize = 48;
    let frame = MAX_SERVER_FRAME_BYTES as usize;
    let entries = |limit: u16, max: u32| usize::from(limit).clamp(1, max as usize) * ENTRY_MAX_BYTES as usize;
    match body {
        RequestBody::History { limit, .. } => entries(*limit, HISTORY_PAGE_MAX).min(frame),
        // Every member's receipts come with a complete page.
        RequestBody::CatchUp { limit, .. } => {
            (entries(*limit, CATCH_UP_PAGE_MAX) + MAX_GROUP_MEMBERS as usize * RECEIPT_MAX_BYTES).min(frame)
        }
        // Lists with a per-item bound in `protocol::limits` (the same as its check that
        // each fits a frame), plus the response's own few bytes.
        RequestBody::Members { .. } => LIST + (MAX_GROUP_MEMBERS * (MAX_NAME_BYTES + 16)) as usize,
        RequestBody::Receipts { .. } => LIST + MAX_GROUP_MEMBERS as usize * RECEIPT_MAX_BYTES,
        RequestBody::Presence { users } if users.is_empty() => {
            LIST + (PRESENCE_SNAPSHOT_MAX * (MAX_NAME_BYTES + 32)) as usize
        }
        RequestBody::Presence { .. } => LIST + (PRESENCE_MAX * (MAX_NAME_BYTES + 32)) as usize,
        RequestBody::BlockedUsers => LIST + (MAX_BLOCKED * (MAX_NAME_BYTES + 32)) as usize,
        // An upload or a stored file: id, name, size, type, hash, times, flags.
        RequestBody::ListUploads { .. } | RequestBody::ListFiles { .. } => {
            LIST + (MAX_LISTED_UPLOADS * (MAX_FILE_NAME_BYTES + MAX_CONTENT_TYPE_BYTES + 16 + 32 + 64)) as usize
        }
        // A summary: id, kind, a title of at most a name's bytes (a label, or the peer's
        // name), last seq, member count, role (92 bytes at most); a state adds three
        // varints.
        RequestBody::ListConversations { .. } => LIST + (LIST_PAGE_MAX * (MAX_NAME_BYTES + 32)) as usize,
        RequestBody::ConversationStates { .. } => LIST + (LIST_PAGE_MAX * (MAX_NAME_BYTES + 64)) as usize,
        // Id, name, enrollment time, a flag.
        RequestBody::ListDevices => LIST + MAX_DEVICES_PER_USER * (MAX_NAME_BYTES as usize + 32),
        // The sender and the members an entry names, as `Members` lists them.
        RequestBody::EntryNames { .. } => LIST + ((MAX_GROUP_MEMBERS + 1) * (MAX_NAME_BYTES + 16)) as usize,
        RequestBody::Register(_)
        | RequestBody::Login(_)
        | RequestBody::Authenticate { .. }
        | RequestBody::Ping
        | RequestBody::CreateConversation(_)
        | RequestBody::AddMembers { .. }
        | RequestBody::RemoveMember { .. }
        | RequestBody::Leave { .. }
        | RequestBody::Send { .. }
        | RequestBody::Edit { .. }
        | RequestBody::Delete { .. }
        | RequestBody::RevokeDevice { .. }
        | RequestBody::RevokeOtherDevice { .. }
        | RequestBody::MarkDelivered { .. }
        | RequestBody::MarkRead { .. }
        | RequestBody::SetPresence { .. }
        | RequestBody::Settings { .. }
        | RequestBody::BeginUpload(_)
        | RequestBody::UploadStatus { .. }
        | RequestBody::CancelUpload { .. }
        | RequestBody::SendFiles { .. }
        | RequestBody::FileInfo { .. }
        | RequestBody::DeleteFile { .. }
        | RequestBody::SetRole { .. }
        | RequestBody::Usage
        | RequestBody::ChangePassword { .. }
        | RequestBody::Block { .. }
        | RequestBody::WithdrawFile { .. }
        | RequestBody::SetTitle { .. } => 0,
    }
}

/// The session: one per connection, it owns the device's identity and outbound queue
/// and handles that device's requests one at a time, in order, like an actor whose
/// mailbox is the control stream (bounded by the in-flight permits). It never waits on
/// a request's outcome: conversation work goes to conversation actors (a read of a
/// conversation with none live, to the blocking pool) and catalog work (create, list,
/// devices) to tasks, so a slow request never holds up the next one.
///
/// It is deliberately not a ractor actor: every ractor actor costs about 6 KB (four
/// unbounded channels and a task), which per connection would break the broker's memory
/// budget of 40 KB per idle connection, and a ractor mailbox would add a hop per request.
struct Session {
    shared: Arc<Shared>,
    caller: Caller,
    /// The address that completed the connection's QUIC handshake.
    source: std::net::IpAddr,
    out: Arc<Outbound>,
    conn: quinn::Connection,
    /// Made at the first transfer: an idle connection pays nothing for transfers.
    transfers: std::sync::OnceLock<Arc<Transfers>>,
    /// The queue of the socket this connection's datagrams arrive on.
    backlog: Arc<SocketBacklog>,
    /// The user's store slots, shared by its sessions (`STORE_JOBS_PER_USER`).
    store_slots: Arc<Semaphore>,
    /// When the last frame came on the control stream (`crate::now_ms`): a device
    /// whose connection times out was heard from no earlier.
    heard_ms: std::sync::atomic::AtomicU64,
}

impl Session {
    /// Why the session may carry out nothing more, once its outbound queue is closed:
    /// a revocation (`DEVICE_REVOKED`, `ACCOUNT_DISABLED`, whatever closed the queue
    /// first), `SLOW_CONSUMER`, `GOING_AWAY`, or `NO_ERROR` when its writer failed (the
    /// peer stopped reading the control stream: nothing could be answered). The queue
    /// is closed `NO_ERROR` by the session itself only after its read loop.
    fn ended(&self) -> Option<ErrorCode> {
        // One lock while the queue is open (asked per request, signal and datagram).
        self.out.closed().map(|first| self.out.cut_off().unwrap_or(first))
    }

    /// Routes one request to the one place that handles it. Conversation requests are
    /// handed to the conversation's actor before this returns, so one session's requests
    /// about one conversation take effect in the order sent; catalog requests run on
    /// tasks, so a slow one never holds up the next request.
    async fn dispatch(
        &self,
        Request { id, body }: Request,
        permit: OwnedSemaphorePermit,
        room: Option<AnswerRoom>,
        store_slot: Option<OwnedSemaphorePermit>,
    ) {
        let mut reply = Responder::new(id, self.out.clone(), permit).with_room(room).with_store_slot(store_slot);
        let (shared, caller) = (&self.shared, self.caller);
        // A nearly full disk takes no new content (`Files::refuse_log_write`); what lets
        // a member go or takes something back still goes.
        if adds_content(&body)
            && let Err(refused) = shared.files.refuse_log_write()
        {
            return reply.send(Err(refused));
        }
        // Writes to a conversation's log (messages and membership changes) pass the
        // broker's admission first (`overload.rs`): past saturation they are refused at
        // once, before any store or actor work. The refusal is the same for every
        // conversation, so it tells a stranger nothing.
        if matches!(
            body,
            RequestBody::Send { .. }
                | RequestBody::SendFiles { .. }
                | RequestBody::Edit { .. }
                | RequestBody::Delete { .. }
                | RequestBody::AddMembers { .. }
                | RequestBody::RemoveMember { .. }
                | RequestBody::Leave { .. }
                | RequestBody::SetRole { .. }
                | RequestBody::SetTitle { .. }
        ) {
            // The user's rate first (`writes_per_sec`): a write refused for it takes no
            // place in flight; one the broker sheds gives its allowance back (the client
            // sends it again after a backoff).
            if let Err(refused) = shared.users.allow_write(caller.user) {
                return reply.send(Err(refused));
            }
            match shared.sends.admit(caller.user, &self.backlog) {
                Ok(ticket) => reply = reply.admitted(ticket),
                Err(refused) => {
                    shared.users.refund_write(caller.user);
                    return reply.send(Err(refused));
                }
            }
        }
        let convs = &shared.convs;
        match body {
            RequestBody::Ping => reply.send(Ok(Reply::Pong { server_time_ms: crate::now_ms() })),
            RequestBody::Register(_) | RequestBody::Login(_) | RequestBody::Authenticate { .. } => {
                reply.fail(ErrorCode::INVALID, "already authenticated")
            }
            RequestBody::Send { conv, client_id, text } => {
                convs.write(shared, conv, caller, Command::Send { client_id, text }, reply).await
            }
            RequestBody::Edit { conv, client_id, target, text } => {
                convs.write(shared, conv, caller, Command::Edit { client_id, target, text }, reply).await
            }
            RequestBody::Delete { conv, client_id, target } => {
                convs.write(shared, conv, caller, Command::Delete { client_id, target }, reply).await
            }
            RequestBody::RemoveMember { conv, user } => {
                convs.write(shared, conv, caller, Command::Remove { user }, reply).await
            }
            RequestBody::Leave { conv } => convs.write(shared, conv, caller, Command::Leave, reply).await,
            RequestBody::SetRole { conv, user, role } => {
                convs.write(shared, conv, caller, Command::SetRole { user, role }, reply).await
            }
            RequestBody::SetTitle { conv, title } => {
                convs.write(shared, conv, caller, Command::SetTitle { title }, reply).await
            }
            // Names are resolved here, in order (a few index reads), not on a task: a
            // pipelined add then send must reach the conversation in that order. A name
            // that does not resolve is said only to a member who may add: anyone else is
            // refused as by the conversation (membership and role come before the rest).
            // A name nobody has, said to one who may add, spends a creation from the
            // caller's allowance (`RATE_LIMITED` once spent), as a creation or a block
            // naming one does: else the request told which names exist at any rate.
            RequestBody::AddMembers { conv, users, role } => match catalog::resolve_users(shared, &users) {
                Ok(users) => convs.write(shared, conv, caller, Command::Add { users, role }, reply).await,
                Err(e) => {
                    let refused = match convs.add_refusal(shared, conv, caller, role).await {
                        Some(refused) => refused,
                        None if e.code == ErrorCode::NOT_FOUND => {
                            shared.users.allow_creation(caller.user).err().unwrap_or(e)
                        }
                        None => e,
                    };
                    reply.send(Err(refused))
                }
            },
            RequestBody::History { conv, page, limit } => {
                convs.read(shared, conv, caller, Read::History { page, limit }, reply).await
            }
            RequestBody::Members { conv } => convs.read(shared, conv, caller, Read::Members, reply).await,
            RequestBody::EntryNames { conv, seq } => convs.read(shared, conv, caller, Read::Names { seq }, reply).await,
            RequestBody::CatchUp { conv, after, limit } => {
                convs.read(shared, conv, caller, Read::CatchUp { after, limit }, reply).await
            }
            RequestBody::CreateConversation(new) => {
                let shared = shared.clone();
                let asker = catalog::Asker::of(caller, &reply);
                tokio::spawn(async move { reply.send(catalog::create_conversation(shared, caller, asker, new).await) });
            }
            RequestBody::ListConversations { after } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let read = catalog::list_conversations(&shared, caller.user, after);
                    reply.send(charged_list(&shared, caller.user, read).await);
                });
            }
            RequestBody::ListDevices => {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || reply.send(catalog::list_devices(&shared, caller)));
            }
            // This device only: another takes the password (`RevokeOtherDevice`). Before,
            // any device revoked any other with its key alone, so a stolen phone signed
            // its owner out everywhere, and revoked each device the owner enrolled to
            // take the account back before its `ChangePassword` was written (an attacker
            // review).
            RequestBody::RevokeDevice { device_id } if device_id != caller.device => reply.send(Err(ErrorBody::new(
                ErrorCode::FORBIDDEN,
                "revoking another device takes the account's password (RevokeOtherDevice)",
            ))),
            RequestBody::RevokeDevice { device_id } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let by = catalog::Asker::of(caller, &reply);
                    reply.send(catalog::revoke_device(&shared, caller.user, device_id, Some(by)).await)
                });
            }
            RequestBody::RevokeOtherDevice { device_id, password } => {
                let (shared, from) = (shared.clone(), self.source);
                tokio::spawn(async move {
                    let by = catalog::Asker::of(caller, &reply);
                    let revoked = async {
                        shared.auth.prove_password(caller.user, caller.device, from, &password).await?;
                        catalog::revoke_device(&shared, caller.user, device_id, Some(by)).await
                    };
                    reply.send(revoked.await)
                });
            }
            RequestBody::Block { user, blocked } => {
                let shared = shared.clone();
                let asker = catalog::Asker::of(caller, &reply);
                tokio::spawn(
                    async move { reply.send(catalog::block(&shared, caller.user, asker, user, blocked).await) },
                );
            }
            RequestBody::BlockedUsers => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let reader = shared.clone();
                    let read = async move {
                        let read = tokio::task::spawn_blocking(move || catalog::blocked_users(&reader, caller.user));
                        read.await.map_err(crate::error::internal)?
                    };
                    reply.send(charged_list(&shared, caller.user, read).await);
                });
            }
            RequestBody::ChangePassword { current, new, sign_out_others } => {
                let (shared, from) = (shared.clone(), self.source);
                tokio::spawn(async move {
                    let asker = catalog::Asker::of(caller, &reply);
                    let changed =
                        catalog::change_password(&shared, caller, asker, from, &current, &new, sign_out_others);
                    reply.send(changed.await);
                });
            }
            // Handed to each conversation's actor before the next request is read, so a
            // later MarkRead or read of one of them sees these marks; answered once the
            // actors took them.
            RequestBody::MarkDelivered { marks } => {
                let mut handed = convs.mark_delivered(shared, caller, reply.revocation(), marks).await;
                match handed.ready() {
                    Some(answer) => reply.send(answer),
                    None => {
                        let shared = shared.clone();
                        tokio::spawn(async move { reply.send(handed.answer(&shared).await) });
                    }
                }
            }
            RequestBody::MarkRead { conv, seq } => convs.mark_read(shared, conv, caller, seq, reply).await,
            RequestBody::Receipts { conv } => convs.read(shared, conv, caller, Read::Receipts, reply).await,
            RequestBody::ConversationStates { after } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let read = catalog::conversation_states(&shared, caller.user, after);
                    reply.send(charged_list(&shared, caller.user, read).await);
                });
            }
            RequestBody::Settings { set } => {
                let shared = shared.clone();
                let asker = catalog::Asker::of(caller, &reply);
                tokio::spawn(async move { reply.send(catalog::settings(&shared, caller.user, asker, set).await) });
            }
            RequestBody::SetPresence { away } => {
                shared.presence.set_away(caller.user, caller.session, away);
                reply.send(Ok(Reply::Done))
            }
            RequestBody::Presence { users } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    // Every answer's rows (a snapshot's up to 4,096 contacts, a named
                    // query's up to 256, two reads each) draw on the allowance of member
                    // rows, as member lists do; so does any query's rebuild of the
                    // caller's contact set (`Presence::query`). Before, named queries were
                    // free: 256 contacts asked for over and over, or a snapshot split into
                    // 16 of them, was never `RATE_LIMITED` (an attacker review).
                    if let Err(refused) = shared.users.allow_member_reads(caller.user) {
                        return reply.send(Err(refused));
                    }
                    let answer = shared.presence.query(caller.user, users, &shared.pauses).await;
                    let answer = answer.map(|(reply, rebuilt)| {
                        let listed = match &reply {
                            Reply::Presence(list) => list.len(),
                            _ => 0,
                        };
                        shared.users.charge_member_reads(caller.user, listed + rebuilt);
                        reply
                    });
                    reply.send(answer)
                });
            }
            RequestBody::BeginUpload(new) => {
                let (shared, allow, revocation) = (shared.clone(), self.allow_transfers(), reply.revocation());
                tokio::spawn(async move {
                    reply.send(allow(files::begin_upload(shared, caller.user, revocation, new).await));
                });
            }
            // Read on the blocking pool, answered once durable (`files::read_durably`),
            // waiting on this task, not on a pool thread.
            RequestBody::UploadStatus { file } => {
                let (shared, allow) = (shared.clone(), self.allow_transfers());
                tokio::spawn(async move {
                    let answer = files::read_durably(&shared, move |s| files::upload_status(s, caller.user, &file));
                    reply.send(allow(answer.await));
                });
            }
            RequestBody::FileInfo { file } => {
                let (shared, allow) = (shared.clone(), self.allow_transfers());
                tokio::spawn(async move {
                    let answer = files::read_durably(&shared, move |s| files::file_info(s, caller.user, &file));
                    reply.send(allow(answer.await));
                });
            }
            RequestBody::Usage => {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || reply.send(files::usage(&shared, caller.user)));
            }
            RequestBody::ListFiles { after } => {
                let shared = shared.clone();
                tokio::task::spawn_blocking(move || reply.send(files::list_files(&shared, caller.user, after)));
            }
            RequestBody::ListUploads { after } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let answer = files::read_durably(&shared, move |s| files::list_uploads(s, caller.user, after));
                    reply.send(answer.await);
                });
            }
            RequestBody::CancelUpload { file } => {
                let (shared, revocation) = (shared.clone(), reply.revocation());
                tokio::spawn(
                    async move { reply.send(files::cancel_upload(shared, caller.user, revocation, file).await) },
                );
            }
            RequestBody::DeleteFile { file } => {
                let (shared, revocation) = (shared.clone(), reply.revocation());
                tokio::spawn(
                    async move { reply.send(files::delete_file(shared, caller.user, revocation, file).await) },
                );
            }
            RequestBody::WithdrawFile { file } => {
                let (shared, revocation) = (shared.clone(), reply.revocation());
                tokio::spawn(
                    async move { reply.send(files::withdraw_file(shared, caller.user, revocation, file).await) },
                );
            }
            // The files are resolved before the next request is read, like names for
            // AddMembers, so the message reaches the conversation in request order; their
            // index reads (up to `ATTACHMENT_SCAN` seeks a file) on a blocking thread.
            RequestBody::SendFiles { conv, client_id, text, files } => {
                let (s, user) = (shared.clone(), caller.user);
                let checked = {
                    let text = text.clone();
                    tokio::task::spawn_blocking(move || files::files_to_send(&s, conv, user, &client_id, &files, &text))
                }
                .await
                .unwrap_or_else(|e| Err(crate::error::internal(e)));
                match checked {
                    Ok(checked) => {
                        let (files, counted) = checked.unwrap_or_default();
                        let reply = if counted.is_empty() {
                            reply
                        } else {
                            // The files the send counted in wait for its answer: then
                            // they go with their messages (at once if it was refused and
                            // nobody holds them). After an `INTERNAL` whether the message
                            // was written is not known: a copy's grace decides, or the
                            // sweep of files whose hold was dropped.
                            let s = shared.clone();
                            reply.on_answer(move |answer| {
                                let known = !matches!(answer, Err(e) if e.code == ErrorCode::INTERNAL);
                                match tokio::runtime::Handle::try_current() {
                                    Ok(rt) => drop(rt.spawn_blocking(move || files::settle_sent(&s, &counted, known))),
                                    // Answered off the runtime (a responder dropped on a
                                    // plain thread): that thread may block.
                                    Err(_) => files::settle_sent(&s, &counted, known),
                                }
                            })
                        };
                        convs.write(shared, conv, caller, Command::SendFiles { client_id, text, files }, reply).await
                    }
                    // Not a member as the store stands: a removal it read may not be
                    // durable yet (member keys are written as an entry is applied), and
                    // a refusal is final for the client, so it waits for the membership
                    // indexes to be, as the actor's refusals wait for the log.
                    Err(e) if e.code == ErrorCode::FORBIDDEN => {
                        let barrier = shared.store.index_barrier().map_err(crate::error::internal);
                        let settled = match barrier {
                            Ok(Some(barrier)) => barrier.await.map_err(crate::error::internal),
                            Ok(None) => Ok(()),
                            Err(failed) => Err(failed),
                        };
                        reply.send(settled.and(Err(e)))
                    }
                    Err(e) => reply.send(Err(e)),
                }
            }
        }
    }

    /// This connection's transfer state, made on first use.
    fn transfers(&self) -> &Arc<Transfers> {
        self.transfers.get_or_init(|| Arc::new(Transfers::new()))
    }

    /// Passes a file request's answer through, first letting the connection open
    /// transfer streams if it succeeded.
    fn allow_transfers(&self) -> impl FnOnce(Result<Reply, ErrorBody>) -> Result<Reply, ErrorBody> + Send + 'static {
        let (transfers, conn) = (self.transfers().clone(), self.conn.clone());
        let max = self.shared.config.max_transfer_streams;
        move |result| {
            if result.is_ok() {
                transfers.allow(&conn, max);
            }
            result
        }
    }

    /// An ephemeral signal from the control stream or a datagram. Beyond the user's
    /// allowance, shared by all of its sessions (`Typing`'s `allowance`), it is
    /// dropped; signals have no answer, so nothing is said.
    fn signal(&self, signal: Signal) {
        self.shared.typing.signal(self.caller.user, self.caller.session, signal);
    }

    /// A QUIC datagram: a signal if it is one whole signal frame, else dropped with the
    /// connection kept (see `typing::signal_from_datagram`).
    fn datagram(&self, datagram: &[u8]) {
        if let Some(signal) = crate::typing::signal_from_datagram(datagram) {
            self.signal(signal);
        }
    }
}

/// Whether `body` adds content to the store: a message, an edit, members, a title, a
/// new group (its members, their index keys and its first entry). Refused while the
/// disk is nearly full; a direct conversation (at most one per pair, often there
/// already), deletes, leaving, removals and roles are not.
fn adds_content(body: &RequestBody) -> bool {
    matches!(
        body,
        RequestBody::Send { .. }
            | RequestBody::SendFiles { .. }
            | RequestBody::Edit { .. }
            | RequestBody::AddMembers { .. }
            | RequestBody::SetTitle { .. }
            | RequestBody::CreateConversation(switchboard_protocol::NewConversation::Group { .. })
    )
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::limits::{
        LIST_PAGE_MAX, MAX_BLOCKED, MAX_CONTENT_TYPE_BYTES, MAX_FILE_NAME_BYTES, MAX_GROUP_MEMBERS, MAX_LISTED_UPLOADS,
        MAX_NAME_BYTES, PRESENCE_MAX, PRESENCE_SNAPSHOT_MAX,
    };
    use switchboard_protocol::{
        BlockedUser, ConversationKind, ConversationState, ConversationSummary, DeviceInfo, FileRef, Member,
        PresenceInfo, PresenceState, Receipt, Reply, RequestBody, Role, ServerFrame, StoredFile, UploadInfo, UserName,
        encode_frame,
    };

    use super::answer_bound;
    use crate::limits::MAX_DEVICES_PER_USER;

    /// Creations, blocks and settings changes (the catalog thread, one queue for all
    /// users), and read marks (the store read on the session's thread, a place in an
    /// actor's mailbox), wait for one of the user's store slots: a user has at most
    /// `STORE_JOBS_PER_USER` of them in flight, however many sessions it pipelines them
    /// on (before, creations refused or reopened, blocks and read marks took none).
    #[test]
    fn catalog_requests_and_read_marks_take_a_store_slot() {
        use switchboard_protocol::NewConversation;
        let direct = NewConversation::Direct { peer: "bob".into() };
        for body in [
            RequestBody::CreateConversation(direct),
            RequestBody::Block { user: "bob".into(), blocked: true },
            RequestBody::Settings { set: None },
            RequestBody::MarkRead { conv: 1, seq: 0 },
        ] {
            assert!(super::takes_a_store_slot(&body), "{body:?}");
        }
        // Taking an account back from a stolen device waits for none of its slots.
        for body in [
            RequestBody::RevokeDevice { device_id: 9 },
            RequestBody::ChangePassword { current: "a".into(), new: "b".into(), sign_out_others: true },
        ] {
            assert!(!super::takes_a_store_slot(&body), "{body:?}");
        }
        // Writes to a conversation are bounded by its mailbox and write admission.
        assert!(!super::takes_a_store_slot(&RequestBody::Send { conv: 1, client_id: [0; 16], text: "hi".into() }));
    }

    /// A string of `bytes` bytes; numbers at their largest (longest varints).
    fn text(bytes: u32) -> String {
        "x".repeat(bytes as usize)
    }
    const BIG: u64 = u64::MAX;

    fn n(count: u32) -> impl Iterator<Item = u32> {
        0..count
    }

    fn file() -> FileRef {
        FileRef {
            file: [0xff; 16],
            name: text(MAX_FILE_NAME_BYTES),
            size: BIG,
            content_type: text(MAX_CONTENT_TYPE_BYTES),
        }
    }

    fn summary() -> ConversationSummary {
        ConversationSummary {
            id: BIG,
            kind: ConversationKind::Group,
            title: text(MAX_NAME_BYTES),
            last_seq: BIG,
            member_count: u32::MAX,
            my_role: Role::Member,
        }
    }

    /// Every list answer, with the most items of the longest encoding the broker can
    /// send, fits the room the session reserves for it: a bound too small would let
    /// pipelined answers overflow the outbound queue (the slow-consumer close the answer
    /// room exists to prevent).
    #[test]
    fn every_list_answer_fits_the_room_reserved_for_it() {
        let name = || text(MAX_NAME_BYTES);
        let receipt = || Receipt { conv: BIG, user: BIG, delivered_up_to: BIG, read_up_to: Some(BIG) };
        let presence = |_| PresenceInfo { user: BIG, name: name(), state: PresenceState::Offline, last_seen_ms: BIG };
        let cases: Vec<(RequestBody, Reply)> = vec![
            (
                RequestBody::Members { conv: 1 },
                Reply::Members(
                    n(MAX_GROUP_MEMBERS).map(|_| Member { user_id: BIG, name: name(), role: Role::Member }).collect(),
                ),
            ),
            (RequestBody::Receipts { conv: 1 }, Reply::Receipts(n(MAX_GROUP_MEMBERS).map(|_| receipt()).collect())),
            (
                RequestBody::Presence { users: vec![] },
                Reply::Presence(n(PRESENCE_SNAPSHOT_MAX).map(presence).collect()),
            ),
            (RequestBody::Presence { users: vec![1] }, Reply::Presence(n(PRESENCE_MAX).map(presence).collect())),
            (
                RequestBody::BlockedUsers,
                Reply::BlockedUsers(n(MAX_BLOCKED).map(|_| BlockedUser { user_id: BIG, name: name() }).collect()),
            ),
            (
                RequestBody::ListUploads { after: None },
                Reply::Uploads {
                    items: n(MAX_LISTED_UPLOADS)
                        .map(|_| UploadInfo {
                            file: file(),
                            blake3: [0xff; 32],
                            offset: BIG,
                            created_ms: BIG,
                            expires_ms: BIG,
                        })
                        .collect(),
                    more: true,
                },
            ),
            (
                RequestBody::ListFiles { after: None },
                Reply::Files {
                    items: n(MAX_LISTED_UPLOADS)
                        .map(|_| StoredFile { file: file(), blake3: [0xff; 32], created_ms: BIG, held: true })
                        .collect(),
                    more: true,
                },
            ),
            (
                RequestBody::ListConversations { after: None },
                Reply::Conversations { items: n(LIST_PAGE_MAX).map(|_| summary()).collect(), more: true },
            ),
            (
                RequestBody::ConversationStates { after: None },
                Reply::ConversationStates {
                    items: n(LIST_PAGE_MAX)
                        .map(|_| ConversationState {
                            summary: summary(),
                            unread: BIG,
                            delivered_up_to: BIG,
                            read_up_to: BIG,
                        })
                        .collect(),
                    more: true,
                },
            ),
            (
                RequestBody::ListDevices,
                Reply::Devices(
                    (0..MAX_DEVICES_PER_USER)
                        .map(|_| DeviceInfo { device_id: BIG, name: name(), enrolled_ms: BIG, current: true })
                        .collect(),
                ),
            ),
            (
                RequestBody::EntryNames { conv: 1, seq: 1 },
                Reply::Names(n(MAX_GROUP_MEMBERS + 1).map(|_| UserName { user_id: BIG, name: name() }).collect()),
            ),
        ];
        for (request, reply) in cases {
            let frame = encode_frame(&ServerFrame::Response { id: u32::MAX, result: Ok(reply) }).unwrap();
            let bound = answer_bound(&request);
            assert!(frame.len() <= bound, "{request:?}: the answer is {} bytes, the room {bound}", frame.len());
            assert!(bound < 1024 * 1024 / 2, "{request:?} reserves {bound} bytes: more than its list needs");
        }
    }
}
