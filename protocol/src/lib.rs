//! The Switchboard wire contract: every type that crosses the network, the framing that
//! carries it, the limits both sides enforce and the stable error codes.
//!
//! This crate is sans-IO: no sockets, no clock, no async runtime. A client in another
//! language needs to reproduce only what is here (and `docs/PROTOCOL.md` describes it).

pub mod error;
pub mod frame;
pub mod limits;
pub mod wire;

pub use error::ErrorCode;
pub use frame::{ChunkDecoder, ChunkStep, FrameDecoder, FrameError, decode, encode_frame, encode_frame_within};
pub use wire::*;

/// ALPN protocol id negotiated in the TLS handshake.
pub const ALPN: &[u8] = b"switchboard/1";
/// First bytes of the client hello, so a stray connection is told apart at once.
pub const MAGIC: [u8; 4] = *b"SWBD";
/// The one protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 4;
/// TLS exporter label used to bind device signatures to one TLS session.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-switchboard-device-auth";
/// Domain separation prefix for every device signature.
pub const AUTH_CONTEXT: &[u8] = b"switchboard/1 device-auth";

/// The bytes a device signs to prove it holds its key on this very connection:
/// `AUTH_CONTEXT || nonce || exported keying material`. The nonce is fresh per
/// connection and the exporter value is unique to the TLS session, so a signature can
/// be neither replayed on a later connection nor relayed through another one.
pub fn auth_transcript(nonce: &[u8; 32], exporter: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUTH_CONTEXT.len() + 64);
    out.extend_from_slice(AUTH_CONTEXT);
    out.extend_from_slice(nonce);
    out.extend_from_slice(exporter);
    out
}
