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
/// the same way, with a per-authenticator context that one auth request per connection
/// does not need). The broker's nonce added nothing to that, and waiting for it cost every
/// connect a round trip.
pub fn auth_transcript_v5(exporter: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUTH_CONTEXT_V5.len() + 32);
    out.extend_from_slice(AUTH_CONTEXT_V5);
    out.extend_from_slice(exporter);
    out
}

/// What a device of protocol `version` signs on a connection whose broker hello carried
/// `nonce` and whose TLS exporter value is `exporter`: `auth_transcript` for 4,
/// `auth_transcript_v5` for 5, `None` for any other version, so a version added later
/// must say what it signs instead of inheriting another's transcript.
pub fn transcript_for(version: u16, nonce: &[u8; 32], exporter: &[u8; 32]) -> Option<Vec<u8>> {
    match version {
        4 => Some(auth_transcript(nonce, exporter)),
        5 => Some(auth_transcript_v5(exporter)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_version_has_its_own_transcript_and_no_other_version_has_one() {
        let (nonce, exporter) = ([7u8; 32], [9u8; 32]);
        let served: Vec<Vec<u8>> = (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION)
            .map(|v| transcript_for(v, &nonce, &exporter).unwrap_or_else(|| panic!("version {v} has no transcript")))
            .collect();
        assert_eq!(served, [auth_transcript(&nonce, &exporter), auth_transcript_v5(&exporter)]);
        for v in [0, 1, 2, 3, PROTOCOL_VERSION + 1, u16::MAX] {
            assert_eq!(transcript_for(v, &nonce, &exporter), None, "version {v}");
        }
    }
}
