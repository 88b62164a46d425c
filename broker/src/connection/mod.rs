//! One connection's I/O: the accept loop, the QUIC and device handshake under a
//! deadline (`handshake.rs`), the control stream's read loop with one typed route per
//! request (`control.rs`) and the writer that drains the outbound queue (`writer.rs`).
//! A bad frame closes this connection only, with a stable code. Who gets which event is
//! not decided here: see `fanout.rs` and the actors.

mod control;
mod handshake;
mod writer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use switchboard_protocol::{ErrorBody, ErrorCode, FrameDecoder, decode, encode_frame};

use crate::Shared;
use crate::limits::READ_CHUNK_BYTES;
use switchboard_protocol::limits::AUTH_DEADLINE_MS;

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

/// Accepts connections until the endpoint closes, up to `max_connections` at once.
pub(crate) async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.connections.load(Ordering::Relaxed) >= shared.config.max_connections || shared.health.is_failed() {
            incoming.refuse();
            continue;
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            serve(shared.clone(), incoming).await;
            shared.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Runs one incoming connection to its end.
async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
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
    let hello = match tokio::time::timeout(deadline, Box::pin(handshake::hello(&conn))).await {
        Ok(Ok(h)) => h,
        Ok(Err(c)) => return close(&conn, c),
        Err(_) => return close(&conn, Close(ErrorCode::TIMEOUT, "authentication deadline passed".into())),
    };
    // Boxed: the auth state is large and short-lived; inline it would stay in every
    // connection's task allocation for the connection's whole life.
    let authed = match Box::pin(handshake::authenticate(&shared, &conn, hello)).await {
        Ok(a) => a,
        Err(c) => return close(&conn, c),
    };
    control::run(shared, conn, authed).await;
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
