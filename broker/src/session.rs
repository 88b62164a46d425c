//! One connection: handshake and device proof under a deadline and a 4 KiB frame
//! limit, then the session (which reads and dispatches requests) and a writer that drains the
//! outbound queue. A bad frame closes this connection only, with a stable code.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use switchboard_protocol::limits::{
    AUTH_DEADLINE_MS, LIST_PAGE_MAX, MAX_CLIENT_FRAME_BYTES, MAX_GROUP_MEMBERS, MAX_INFLIGHT_REQUESTS,
    MAX_USERS_PER_REQUEST, PREAUTH_MAX_FRAME_BYTES,
};
use switchboard_protocol::{
    Body, ClientFrame, ClientHello, ConvId, ConversationKind, ConversationSummary, DeviceId, DeviceInfo, Entry,
    ErrorBody, ErrorCode, Event, FrameDecoder, Limits, NewConversation, Reply, Request, RequestBody, Role, ServerFrame,
    ServerHello, UserId, decode, encode_frame,
};
use switchboard_storage::{ConversationRecord, Durable};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Shared;
use crate::auth::check_label;
use crate::conversation::{Caller, Command, ConvRequest};
use crate::limits::READ_CHUNK_BYTES;
use crate::online::SessionHandle;
use crate::outbound::Outbound;
use crate::reply::{Responder, internal};

/// How long a finished session may take to send what is still queued.
const WRITER_DRAIN: Duration = Duration::from_secs(5);

/// Why a connection ends: a stable code and a short reason for the peer.
struct Close(ErrorCode, String);

impl From<ErrorBody> for Close {
    fn from(e: ErrorBody) -> Self {
        Close(e.code, e.message)
    }
}

fn close(conn: &quinn::Connection, Close(code, reason): Close) {
    conn.close(code.0.into(), reason.as_bytes());
}

/// Runs one incoming connection to its end.
pub(crate) async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    let deadline = Duration::from_millis(u64::from(AUTH_DEADLINE_MS));
    // The deadline covers what the peer controls: hello and the auth request. Checking
    // the request (argon2, durable enrollment) is not cut off half way, so a slow check
    // never leaves an enrolled device its owner was never told about.
    let hello = match tokio::time::timeout(deadline, Box::pin(handshake(&conn))).await {
        Ok(Ok(h)) => h,
        Ok(Err(c)) => return close(&conn, c),
        Err(_) => return close(&conn, Close(ErrorCode::TIMEOUT, "authentication deadline passed".into())),
    };
    // Boxed: the auth state is large and short-lived; inline it would stay in every
    // connection's task allocation for the connection's whole life.
    let authed = match Box::pin(authenticate(&shared, &conn, hello)).await {
        Ok(a) => a,
        Err(c) => return close(&conn, c),
    };
    run(shared, conn, authed).await;
}

struct Authed {
    user: UserId,
    device: DeviceId,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

/// A connection that said hello and sent its auth request.
struct Hello {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    transcript: Vec<u8>,
    request: Request,
}

async fn handshake(conn: &quinn::Connection) -> Result<Hello, Close> {
    let gone = |e: quinn::ConnectionError| Close(ErrorCode::NO_ERROR, e.to_string());
    let (mut send, mut recv) = conn.accept_bi().await.map_err(gone)?;
    let mut decoder = FrameDecoder::new(PREAUTH_MAX_FRAME_BYTES);

    let hello: ClientHello = read_msg(&mut recv, &mut decoder).await?;
    if hello.magic != switchboard_protocol::MAGIC {
        return Err(Close(ErrorCode::BAD_FRAME, "not a switchboard client".into()));
    }
    if hello.version != switchboard_protocol::PROTOCOL_VERSION {
        let msg = format!(
            "version {} unsupported; this broker speaks {}",
            hello.version,
            switchboard_protocol::PROTOCOL_VERSION
        );
        return Err(Close(ErrorCode::UNSUPPORTED_VERSION, msg));
    }
    let mut nonce = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| Close(ErrorCode::INTERNAL, "no randomness".into()))?;
    let server_hello = ServerHello {
        version: switchboard_protocol::PROTOCOL_VERSION,
        nonce,
        limits: Limits::current(),
        server_time_ms: crate::now_ms(),
    };
    write_msg(&mut send, &server_hello).await?;

    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, switchboard_protocol::EXPORTER_LABEL, b"")
        .map_err(|_| Close(ErrorCode::INTERNAL, "keying material export failed".into()))?;
    let transcript = switchboard_protocol::auth_transcript(&nonce, &exporter);

    let ClientFrame::Request(request) = read_msg(&mut recv, &mut decoder).await?;
    Ok(Hello { send, recv, decoder, transcript, request })
}

async fn authenticate(shared: &Shared, conn: &quinn::Connection, hello: Hello) -> Result<Authed, Close> {
    let Hello { mut send, recv, decoder, transcript, request: Request { id, body } } = hello;
    let from: IpAddr = conn.remote_address().ip();
    let (user, device) = match body {
        RequestBody::Register(e) => shared.auth.register(&e, &transcript).await?,
        RequestBody::Login(e) => shared.auth.login(&e, &transcript, from).await?,
        RequestBody::Authenticate { user, device_id, signature } => {
            (shared.auth.authenticate(&user, device_id, &signature, &transcript, from)?, device_id)
        }
        _ => return Err(Close(ErrorCode::NOT_AUTHENTICATED, "authenticate first".into())),
    };
    write_msg(&mut send, &ServerFrame::Response { id, result: Ok(Reply::Authed { user_id: user, device_id: device }) })
        .await?;
    Ok(Authed { user, device, send, recv, decoder })
}

async fn write_msg<T: serde::Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), Close> {
    let frame = encode_frame(msg).map_err(|e| Close(ErrorCode::INTERNAL, e.to_string()))?;
    send.write_all(&frame).await.map_err(|e| Close(ErrorCode::NO_ERROR, e.to_string()))
}

async fn read_msg<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<T, Close> {
    let body = read_frame(recv, decoder).await?;
    decode(&body).map_err(|e| Close(e.code(), e.to_string()))
}

/// Reads until one whole frame is buffered. End of stream is a normal close.
async fn read_frame(recv: &mut quinn::RecvStream, decoder: &mut FrameDecoder) -> Result<Bytes, Close> {
    loop {
        if let Some(frame) = decoder.next_frame().map_err(|e| Close(e.code(), e.to_string()))? {
            return Ok(frame);
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return Err(Close(ErrorCode::NO_ERROR, "control stream finished".into())),
            Err(e) => return Err(Close(ErrorCode::NO_ERROR, e.to_string())),
        }
    }
}

async fn run(shared: Arc<Shared>, conn: quinn::Connection, authed: Authed) {
    let Authed { user, device, send, mut recv, mut decoder } = authed;
    let session = shared.next_session_id.fetch_add(1, Ordering::Relaxed);
    let out = Arc::new(Outbound::new(shared.config.outbound_max_frames, shared.config.outbound_max_bytes));
    let handle = SessionHandle { id: session, device, out: out.clone() };
    if let Err(e) = shared.users.attach(user, handle).await {
        return close(&conn, e.into());
    }
    // A revoke that ran between the signature check and the attach found no session
    // to close: look again now that the session is visible to revokes.
    if !matches!(shared.store.device(user, device), Ok(Some(_))) {
        shared.users.detach(user, session).await;
        return close(&conn, Close(ErrorCode::DEVICE_REVOKED, "device revoked".into()));
    }
    tracing::debug!(user, device, session, remote = %conn.remote_address(), "session started");
    let writer = tokio::spawn(write_loop(conn.clone(), send, out.clone()));
    let session_state = Session { shared: shared.clone(), caller: Caller { user, device, session }, out: out.clone() };
    decoder.set_limit(MAX_CLIENT_FRAME_BYTES);
    let permits = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS as usize));
    let end = read_loop(&mut recv, &mut decoder, &permits, &session_state).await;
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
    shared.users.detach(user, session).await;
    tracing::debug!(session, "session ended");
}

async fn read_loop(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
    permits: &Arc<Semaphore>,
    session: &Session,
) -> Close {
    loop {
        let body = match read_frame(recv, decoder).await {
            Ok(b) => b,
            Err(c) => return c,
        };
        let req = match decode::<ClientFrame>(&body) {
            Ok(ClientFrame::Request(r)) => r,
            Err(e) => return Close(e.code(), e.to_string()),
        };
        // At the in-flight cap this waits, so the client is slowed by flow control.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return Close(ErrorCode::INTERNAL, "internal error".into());
        };
        session.dispatch(req, permit).await;
    }
}

async fn write_loop(conn: quinn::Connection, mut send: quinn::SendStream, out: Arc<Outbound>) {
    // Grows to the largest burst drained at once; idle connections keep none.
    let mut batch = Vec::new();
    loop {
        match out.drain(&mut batch).await {
            None => {
                tokio::select! {
                    written = send.write_all_chunks(&mut batch) => {
                        if written.is_err() {
                            return;
                        }
                    }
                    // A peer that stopped reading blocks the write: do not wait for it.
                    code = out.aborted() => {
                        conn.close(code.0.into(), code.name().as_bytes());
                        return;
                    }
                }
                batch.clear();
            }
            Some(ErrorCode::NO_ERROR) => {
                let _ = send.finish();
                return;
            }
            Some(code) => {
                conn.close(code.0.into(), code.name().as_bytes());
                return;
            }
        }
    }
}

/// The session: one per connection, it owns the device's identity and outbound queue
/// and handles that device's requests one at a time, in order, like an actor whose
/// mailbox is the control stream (bounded by the in-flight permits). It never waits on
/// a request's outcome: conversation work goes to conversation actors and catalog work
/// (create, list, devices) to tasks, so a slow request never holds up the next one.
///
/// It is deliberately not a ractor actor: every ractor actor costs about 6 KB (four
/// unbounded channels and a task), which per connection would break the broker's memory
/// budget of 40 KB per idle connection, and a ractor mailbox would add a hop per request.
struct Session {
    shared: Arc<Shared>,
    caller: Caller,
    out: Arc<Outbound>,
}

impl Session {
    async fn dispatch(&self, Request { id, body }: Request, permit: OwnedSemaphorePermit) {
        let reply = Responder::new(id, self.out.clone(), permit);
        let (shared, caller) = (self.shared.clone(), self.caller);
        let conv_request = match body {
            RequestBody::Ping => {
                reply.send(Ok(Reply::Pong { server_time_ms: crate::now_ms() }));
                return;
            }
            RequestBody::Register(_) | RequestBody::Login(_) | RequestBody::Authenticate { .. } => {
                reply.fail(ErrorCode::INVALID, "already authenticated");
                return;
            }
            RequestBody::Send { conv, client_id, text } => {
                (conv, ConvRequest::Write(Command::Send { client_id, text }))
            }
            RequestBody::Edit { conv, client_id, target, text } => {
                (conv, ConvRequest::Write(Command::Edit { client_id, target, text }))
            }
            RequestBody::Delete { conv, client_id, target } => {
                (conv, ConvRequest::Write(Command::Delete { client_id, target }))
            }
            RequestBody::History { conv, page, limit } => (conv, ConvRequest::History { page, limit }),
            RequestBody::Members { conv } => (conv, ConvRequest::Members),
            RequestBody::RemoveMember { conv, user } => (conv, ConvRequest::Write(Command::Remove { user })),
            RequestBody::Leave { conv } => (conv, ConvRequest::Write(Command::Leave)),
            RequestBody::AddMembers { conv, users, role } => {
                tokio::spawn(async move {
                    match resolve_users(&shared, &users) {
                        Ok(users) => {
                            let req = ConvRequest::Write(Command::Add { users, role });
                            shared.convs.request(&shared, conv, caller, req, reply).await
                        }
                        Err(e) => reply.send(Err(e)),
                    }
                });
                return;
            }
            RequestBody::CreateConversation(new) => {
                tokio::spawn(async move { reply.send(create_conversation(shared, caller, new).await) });
                return;
            }
            RequestBody::ListConversations { after } => {
                tokio::task::spawn_blocking(move || reply.send(list_conversations(&shared, caller.user, after)));
                return;
            }
            RequestBody::ListDevices => {
                tokio::task::spawn_blocking(move || reply.send(list_devices(&shared, caller)));
                return;
            }
            RequestBody::RevokeDevice { device_id } => {
                tokio::spawn(async move { reply.send(revoke_device(&shared, caller.user, device_id).await) });
                return;
            }
        };
        let (conv, req) = conv_request;
        shared.convs.request(&shared, conv, caller, req, reply).await;
    }
}

fn resolve_users(shared: &Shared, names: &[String]) -> Result<Vec<UserId>, ErrorBody> {
    if names.len() > MAX_USERS_PER_REQUEST as usize {
        return Err(ErrorBody::new(ErrorCode::INVALID, "too many users in one request"));
    }
    names
        .iter()
        .map(|n| match shared.store.user_by_name(n) {
            Ok(Some((id, _))) => Ok(id),
            Ok(None) => Err(ErrorBody::new(ErrorCode::NOT_FOUND, format!("no user {n:?}"))),
            Err(e) => Err(internal(e)),
        })
        .collect()
}

/// Creates a conversation. The store work (a catalog lock and a sled batch) runs on the
/// blocking pool, never on a runtime thread.
async fn create_conversation(shared: Arc<Shared>, caller: Caller, new: NewConversation) -> Result<Reply, ErrorBody> {
    shared.users.allow_creation(caller.user)?;
    let writer = shared.clone();
    let written = crate::catalog_write(&shared.store, move |_| write_conversation(&writer, caller, new)).await;
    // Only a conversation actually written counts: a refused request, or opening an
    // existing direct conversation, gives the allowance back.
    if !matches!(&written, Ok(Ok((_, Some(_), _)))) {
        shared.users.refund_creation(caller.user);
    }
    let (conv, first, durable) = written??;
    durable.await.map_err(internal)?;
    if let Some(entry) = first {
        let users: Vec<UserId> = match &entry.body {
            Body::Created { members, .. } => members.iter().map(|(u, _)| *u).collect(),
            _ => Vec::new(),
        };
        let frame = encode_frame(&ServerFrame::Event(Event::Entry(entry))).map_err(internal)?;
        shared.online.deliver(&users, &frame, caller.session);
    }
    tokio::task::spawn_blocking(move || summary(&shared, caller.user, conv))
        .await
        .map_err(internal)??
        .map(Reply::Conversation)
        .ok_or_else(|| internal("conversation vanished"))
}

/// Writes a new conversation; returns its id, its first entry if it was created now
/// (not an existing direct pair), and the durability of the write.
fn write_conversation(
    shared: &Shared,
    caller: Caller,
    new: NewConversation,
) -> Result<(ConvId, Option<Entry>, Durable), ErrorBody> {
    let me = caller.user;
    let (kind, title, members, pair) = match new {
        NewConversation::Direct { peer } => {
            let peer = resolve_users(shared, &[peer])?[0];
            if peer == me {
                return Err(ErrorBody::new(ErrorCode::INVALID, "a direct conversation needs another user"));
            }
            (ConversationKind::Direct, String::new(), vec![(me, Role::Member), (peer, Role::Member)], Some((me, peer)))
        }
        NewConversation::Group { title, members } => {
            check_label(&title)?;
            let mut all = vec![(me, Role::Owner)];
            for id in resolve_users(shared, &members)? {
                if !all.iter().any(|(u, _)| *u == id) {
                    all.push((id, Role::Member));
                }
            }
            if all.len() > MAX_GROUP_MEMBERS as usize {
                return Err(ErrorBody::new(ErrorCode::INVALID, "group member limit reached"));
            }
            (ConversationKind::Group, title, all, None)
        }
    };
    let record = ConversationRecord { kind, title: title.clone(), created_ms: crate::now_ms() };
    let mut first = None;
    let (conv, created, durable) = shared
        .store
        .create_conversation(&record, &members, pair, |conv| {
            let entry = Entry {
                conv,
                seq: 1,
                sender: me,
                sender_device: caller.device,
                client_id: [0; 16],
                at_ms: record.created_ms,
                body: Body::Created { kind, title, members: members.clone() },
            };
            first = Some(entry.clone());
            entry
        })
        .map_err(internal)?;
    Ok((conv, first.filter(|_| created), durable))
}

fn summary(shared: &Shared, me: UserId, conv: ConvId) -> Result<Option<ConversationSummary>, ErrorBody> {
    let store = &shared.store;
    let Some(record) = store.conversation(conv).map_err(internal)? else { return Ok(None) };
    let members = store.members(conv).map_err(internal)?;
    let Some(my_role) = members.iter().find(|(u, _)| *u == me).map(|(_, r)| *r) else { return Ok(None) };
    let title = match record.kind {
        ConversationKind::Group => record.title,
        ConversationKind::Direct => match members.iter().find(|(u, _)| *u != me) {
            Some((peer, _)) => store.user(*peer).map_err(internal)?.map(|u| u.name).unwrap_or_default(),
            None => String::new(),
        },
    };
    Ok(Some(ConversationSummary {
        id: conv,
        kind: record.kind,
        title,
        // A live actor may have applied entries that are not durable yet: show only what
        // devices could have been sent.
        last_seq: match shared.convs.published(conv) {
            Some(seq) => seq,
            None => store.last_seq(conv).map_err(internal)?,
        },
        member_count: members.len() as u32,
        my_role,
    }))
}

fn list_conversations(shared: &Shared, me: UserId, after: Option<ConvId>) -> Result<Reply, ErrorBody> {
    let page = LIST_PAGE_MAX as usize;
    let ids = shared.store.user_conversations(me, after, page + 1).map_err(internal)?;
    let more = ids.len() > page;
    let mut items = Vec::with_capacity(ids.len().min(page));
    for conv in ids.into_iter().take(page) {
        if let Some(s) = summary(shared, me, conv)? {
            items.push(s);
        }
    }
    Ok(Reply::Conversations { items, more })
}

fn list_devices(shared: &Shared, caller: Caller) -> Result<Reply, ErrorBody> {
    let devices = shared.store.devices(caller.user).map_err(internal)?;
    Ok(Reply::Devices(
        devices
            .into_iter()
            .map(|(id, d)| DeviceInfo {
                device_id: id,
                name: d.name,
                enrolled_ms: d.enrolled_ms,
                current: id == caller.device,
            })
            .collect(),
    ))
}

async fn revoke_device(shared: &Shared, user: UserId, device: DeviceId) -> Result<Reply, ErrorBody> {
    let durable =
        crate::catalog_write(&shared.store, move |s| s.remove_device(user, device)).await?.map_err(internal)?;
    let Some(durable) = durable else { return Err(ErrorBody::new(ErrorCode::NOT_FOUND, "no such device")) };
    durable.await.map_err(internal)?;
    shared.users.revoke(user, device).await;
    Ok(Reply::Done)
}
