//! The handshake on the control stream: the client's hello, the server's hello (with a
//! fresh nonce for a version-4 client), then exactly one auth request (register, login or
//! a device signature) under a 4 KiB frame limit; a version-5 client may send that
//! request with its hello. The connection's deadline is applied by the caller.
//!
//! Every refusal comes before `Authed` is sent and before anything is stored that the
//! client would have to learn of: a session place (`max_connections`) and a place among
//! the user's sessions are taken once the request is verified and before a login
//! enrolls its device, so a refusal for capacity (`OVERLOADED`) closes the connection
//! like every handshake failure and leaves nothing behind.

use std::net::IpAddr;
use std::time::Duration;

use switchboard_protocol::limits::{AUTH_DEADLINE_MS, MAX_NAME_BYTES, PREAUTH_MAX_FRAME_BYTES};
use switchboard_protocol::{
    ClientFrame, ClientHello, DeviceId, ErrorCode, FrameDecoder, Limits, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION,
    Reply, Request, RequestBody, ServerFrame, ServerHello, UserId,
};

use super::{Close, Session, Unauthenticated, read_msg, write_msg};
use crate::Shared;
use crate::user::Reservation;

pub(super) struct Authed {
    pub(super) user: UserId,
    pub(super) device: DeviceId,
    /// The place among the user's sessions, for `UserDirectory::attach`.
    pub(super) place: Reservation,
    pub(super) send: quinn::SendStream,
    pub(super) recv: quinn::RecvStream,
    pub(super) decoder: FrameDecoder,
    /// The address that completed the QUIC handshake (`Unauthenticated::source`): the
    /// session's password changes count against its share of the password pool.
    pub(super) source: IpAddr,
    /// Just before the handshake's last check that the account is not disabled: a
    /// disable after it, even one undone before the session attaches, cuts the session
    /// off (`UserDirectory::disables`).
    pub(super) checked: std::time::Instant,
}

/// A connection that said hello and sent its auth request.
pub(super) struct Hello {
    pub(super) send: quinn::SendStream,
    pub(super) recv: quinn::RecvStream,
    pub(super) decoder: FrameDecoder,
    transcript: Vec<u8>,
    request: Request,
}

pub(super) async fn hello(conn: &quinn::Connection) -> Result<Hello, Close> {
    let gone = |e: quinn::ConnectionError| Close(ErrorCode::NO_ERROR, e.to_string());
    let (mut send, mut recv) = conn.accept_bi().await.map_err(gone)?;
    let mut decoder = FrameDecoder::new(PREAUTH_MAX_FRAME_BYTES);

    let hello: ClientHello = read_msg(&mut recv, &mut decoder).await?;
    if hello.magic != switchboard_protocol::MAGIC {
        return Err(Close(ErrorCode::BAD_FRAME, "not a switchboard client".into()));
    }
    let version = hello.version;
    if !(OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        let msg = format!(
            "version {version} unsupported; this broker speaks {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
        );
        return Err(Close(ErrorCode::UNSUPPORTED_VERSION, msg));
    }
    if hello.agent.len() > MAX_NAME_BYTES as usize {
        return Err(Close(ErrorCode::INVALID, "agent is longer than 64 bytes".into()));
    }
    // Version 4 signs a nonce of ours, so its client waits for this hello; version 5
    // signs the exporter alone and may have sent its request with its hello.
    let mut nonce = [0u8; 32];
    if version == 4 {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| Close(ErrorCode::INTERNAL, "no randomness".into()))?;
    }
    let server_hello = ServerHello { version, nonce, limits: Limits::current(), server_time_ms: crate::now_ms() };
    write_msg(&mut send, &server_hello).await?;

    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, switchboard_protocol::EXPORTER_LABEL, b"")
        .map_err(|_| Close(ErrorCode::INTERNAL, "keying material export failed".into()))?;
    let transcript = switchboard_protocol::transcript_for(version, &nonce, &exporter)
        .ok_or_else(|| Close(ErrorCode::INTERNAL, format!("no transcript for version {version}")))?;

    let ClientFrame::Request(request) = read_msg(&mut recv, &mut decoder).await? else {
        return Err(Close(ErrorCode::NOT_AUTHENTICATED, "authenticate first".into()));
    };
    Ok(Hello { send, recv, decoder, transcript, request })
}

/// Serves the auth request. On success the connection holds a session place (returned)
/// instead of its unauthenticated one.
pub(super) async fn authenticate(
    shared: &Shared,
    conn: &quinn::Connection,
    hello: Hello,
    unauthenticated: Unauthenticated,
) -> Result<(Authed, Session), Close> {
    let Hello { mut send, recv, decoder, transcript, request: Request { id, body } } = hello;
    // The address that completed the QUIC handshake (quinn drops packets from any other
    // until then), never the connection's address now: quinn moves a connection to a new
    // address on its first packet from there, before validating the path, so a peer
    // could charge any address's allowances (and lock everyone behind it out) by forging
    // the source of its auth request, and escape its own.
    let from: IpAddr = unauthenticated.source;
    let auth = &shared.auth;
    let (user, device, place, session) = match body {
        RequestBody::Register(e) => {
            // Every `OVERLOADED` a registration can get (the password queue or its
            // source's share of it, the session places) comes before `create_user`: the
            // account does not exist yet, so a client may simply retry (the client
            // library does: `TransportOptions::enroll_retry_for`). The broker's session
            // places full only after the address's registration was taken: given back.
            // An address at its own cap is refused before anything is spent or looked
            // up, and one that reached it while the password was hashed keeps its
            // registration spent: before, that was given back too, and an address kept
            // at its cap had passwords hashed for it without end (an attacker review).
            shared.admission.source_fits(&unauthenticated)?;
            let checked = auth.check_register(&e, &transcript, from).await?;
            let session = shared.admission.promote(unauthenticated).inspect_err(|refused| {
                if refused.code == ErrorCode::OVERLOADED {
                    auth.registration_not_made(from);
                }
            })?;
            let user = auth.create_user(&e.user, checked.hash.clone()).await?;
            let place = shared.users.reserve(user, None)?;
            let (device, _) = auth.enroll(user, &e.device_name, checked.key, Vec::new(), checked.hash, None).await?;
            (user, device, place, session)
        }
        RequestBody::Login(e) => {
            // No hash for a place the address cannot take.
            shared.admission.source_fits(&unauthenticated)?;
            let (user, key, verified) = auth.check_login(&e, &transcript, from).await?;
            let session = shared.admission.promote(unauthenticated)?;
            let place = shared.users.reserve(user, None)?;
            // Disabled while the password was checked: no device is enrolled.
            crate::auth::refuse_if_disabled(&shared.store, user)?;
            let in_use = shared.online.sessions(user).map(|s| s.iter().map(|s| s.device).collect()).unwrap_or_default();
            // A device given way is closed in the write (`Closer`).
            let closer = Some(shared.users.closer());
            let (device, _) = auth.enroll(user, &e.device_name, key, in_use, verified, closer).await?;
            (user, device, place, session)
        }
        RequestBody::Authenticate { user, device_id, signature } => {
            let user = auth.authenticate(&user, device_id, &signature, &transcript, from)?;
            let session = shared.admission.promote(unauthenticated)?;
            let place = shared.users.reserve(user, Some(device_id))?;
            crate::auth::refuse_if_disabled(&shared.store, user)?;
            auth.confirm(user, device_id).await?;
            (user, device_id, place, session)
        }
        _ => return Err(Close(ErrorCode::NOT_AUTHENTICATED, "authenticate first".into())),
    };
    // Disabled meanwhile: not told `Authed` (the session's attach checks once more).
    let checked = std::time::Instant::now();
    crate::auth::refuse_if_disabled(&shared.store, user)?;
    // The session's receive window, before the client may send its first request.
    crate::tls::open_session_window(conn, &shared.config);
    // The peer's flow control paces this write, so it has the auth deadline too: a peer
    // that grants no room for it would otherwise hold its connection's place and one of
    // its user's while out of revoke's and disable's reach (not attached yet).
    let authed = ServerFrame::Response { id, result: Ok(Reply::Authed { user_id: user, device_id: device }) };
    let deadline = Duration::from_millis(u64::from(AUTH_DEADLINE_MS));
    match tokio::time::timeout(deadline, write_msg(&mut send, &authed)).await {
        Ok(written) => written?,
        Err(_) => return Err(Close(ErrorCode::TIMEOUT, "the authentication answer was not taken in time".into())),
    }
    Ok((Authed { user, device, place, send, recv, decoder, source: from, checked }, session))
}
