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
/// The protocol version this crate speaks and the reference client sends: 5. Version 5
/// differs from version 4 only in what a device signs (`auth_transcript_v5`), which lets
/// a client send its auth request with its hello, a round trip before the broker's hello
/// arrives (docs/PROTOCOL.md section 4).
pub const PROTOCOL_VERSION: u16 = 5;
/// The oldest version a broker still serves: 4, whose device signature covers the
/// nonce of the broker's hello (`auth_transcript`), so its client waits for that hello.
pub const OLDEST_PROTOCOL_VERSION: u16 = 4;
/// TLS exporter label used to bind device signatures to one TLS session.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-switchboard-device-auth";
/// Domain separation prefix for every version-4 device signature.
pub const AUTH_CONTEXT: &[u8] = b"switchboard/1 device-auth";
/// Domain separation prefix for every version-5 device signature: as long as
/// `AUTH_CONTEXT` and different from it, so no signature of one version verifies as the
/// other's.
pub const AUTH_CONTEXT_V5: &[u8] = b"switchboard/5 device-auth";

/// The bytes a version-4 device signs to prove it holds its key on this very
/// connection: `AUTH_CONTEXT || nonce || exported keying material` (89 bytes). The nonce
/// is fresh per connection and the exporter value is unique to the TLS session, so a
/// signature can be neither replayed on a later connection nor relayed through another
/// one.
pub fn auth_transcript(nonce: &[u8; 32], exporter: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUTH_CONTEXT.len() + 64);
    out.extend_from_slice(AUTH_CONTEXT);
    out.extend_from_slice(nonce);
    out.extend_from_slice(exporter);
    out
}

/// The bytes a version-5 device signs: `AUTH_CONTEXT_V5 || exported keying material`
/// (57 bytes). The exporter alone binds the signature to this connection: it is derived
/// from the TLS 1.3 handshake's secrets and transcript (both sides' randoms and key
/// shares), so it differs on every connection and a peer that relays the handshake
/// cannot learn or choose it (RFC 8446 section 7.5; RFC 9261 binds its authenticators
/// the same way). The broker's nonce added nothing to that, and waiting for it cost every
/// connect a round trip.
pub fn auth_transcript_v5(exporter: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUTH_CONTEXT_V5.len() + 32);
    out.extend_from_slice(AUTH_CONTEXT_V5);
    out.extend_from_slice(exporter);
    out
}
