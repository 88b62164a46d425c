//! The handshake on the control stream: the client's hello, the server's hello with a
//! fresh nonce, then exactly one auth request (register, login or a device signature)
//! under a 4 KiB frame limit. The connection's deadline is applied by the caller.

use std::net::IpAddr;

use switchboard_protocol::limits::PREAUTH_MAX_FRAME_BYTES;
use switchboard_protocol::{
    ClientFrame, ClientHello, DeviceId, ErrorCode, FrameDecoder, Limits, Reply, Request, RequestBody, ServerFrame,
    ServerHello, UserId,
};

use super::{Close, read_msg, write_msg};
use crate::Shared;

pub(super) struct Authed {
    pub(super) user: UserId,
    pub(super) device: DeviceId,
    pub(super) send: quinn::SendStream,
    pub(super) recv: quinn::RecvStream,
    pub(super) decoder: FrameDecoder,
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

pub(super) async fn authenticate(shared: &Shared, conn: &quinn::Connection, hello: Hello) -> Result<Authed, Close> {
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
