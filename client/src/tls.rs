//! Trust and the client-side QUIC endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::ClientError;

/// How the client decides to trust the broker's certificate.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Certificates (PEM file) to use as roots, e.g. the broker's generated cert.pem.
    CaFile(PathBuf),
    /// Certificates (DER) to use as roots.
    Roots(Vec<CertificateDer<'static>>),
    /// Accept exactly the certificate whose SHA-256 (hex) is this.
    Pin(String),
}

/// Datagram bytes quinn may queue for one connection, each way: dozens of typing
/// datagrams (~10 bytes each plus bookkeeping); the oldest is dropped when full. quinn
/// allocates the queues lazily, so an idle connection pays nothing for them.
const DATAGRAM_BUFFER_BYTES: usize = 4096;

/// QUIC transport choices of a `Connector`.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    /// Enable QUIC datagrams (typing signals and events travel as datagrams when both
    /// ends enabled them, else on the control stream). Default `true`.
    pub datagrams: bool,
    /// Our idle timeout; the connection's is the smaller of this and the broker's.
    /// Default 30 s.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without traffic; keep it under half of the
    /// idle timeout. Default 10 s. (The broker also keeps alive at a third of its own
    /// timeout, so a broker configured shorter than this still keeps us connected.)
    pub keep_alive: Duration,
    /// Give up on a connect (the QUIC handshake, the hellos and the login or device
    /// proof) the broker has not answered in this long (`Connect` error naming the
    /// address), instead of waiting out the idle timeout. Default 10 s. Per attempt: a
    /// register or login answered `OVERLOADED` tries again (`enroll_retry_for`), so one
    /// may take up to the sum of the two.
    pub connect_timeout: Duration,
    /// Bytes of one stream the broker may send ahead of what this client has read (its
    /// QUIC stream receive window). Default 2 MiB: a history page is up to 1 MiB, room
    /// for two in flight. A smaller window holds less in memory; the broker keeps what
    /// does not fit in the device's outbound queue (PROTOCOL.md section 7).
    pub stream_receive_window: u32,
    /// How long `Connector::register` and `Connector::login` keep trying while the
    /// broker answers `OVERLOADED` (its password queue, or this address's share of it, is
    /// full: nothing was created or enrolled, so trying again is safe), with backoff from
    /// `ENROLL_BACKOFF_MIN_MS` doubling to `ENROLL_BACKOFF_MAX_MS`, with jitter. Zero:
    /// one attempt, the `OVERLOADED` error returned. Default 30 s.
    pub enroll_retry_for: Duration,
    /// How long the broker may send nothing on the control stream while a request waits
    /// for its answer before this client takes the connection for broken: it closes it
    /// (close code `TIMEOUT`) and the request, with every other one waiting on that
    /// connection, fails as `ClientError::Closed` with no code, as for a lost
    /// connection, so what retries a lost connection (the `Session`, `sb --retry-for`,
    /// the uploader) retries it (a write with the same client id). Silence, not the
    /// answer's own time: an answer queued behind pages and events on a slow link
    /// arrives late but the stream keeps moving, and a request the broker holds (behind
    /// the user's store jobs, waiting for room: PROTOCOL.md section 7) is answered within
    /// this when the broker is not stuck. Default 60 s, twice the idle timeout: a dead
    /// broker is found by the idle timeout first. Zero: no deadline.
    pub request_timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            datagrams: true,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            stream_receive_window: 2 * 1024 * 1024,
            enroll_retry_for: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
        }
    }
}

pub(crate) fn endpoint(
    server: SocketAddr,
    trust: Trust,
    options: &TransportOptions,
) -> Result<quinn::Endpoint, ClientError> {
    let provider = Arc::new(provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(connect)?;
    let mut tls = match trust {
        Trust::CaFile(path) => {
            let read = |e: rustls::pki_types::pem::Error| connect(format!("{}: {e}", path.display()));
            let certs =
                CertificateDer::pem_file_iter(&path).map_err(read)?.collect::<Result<Vec<_>, _>>().map_err(read)?;
            let roots = roots(certs).map_err(|e| connect(format!("{}: {e}", path.display())))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Roots(certs) => builder.with_root_certificates(roots(certs).map_err(connect)?).with_no_client_auth(),
        Trust::Pin(hex) => {
            let pin = crate::unhex(&hex.replace(':', ""))
                .filter(|p| p.len() == 32)
                .ok_or_else(|| connect("--pin must be a SHA-256 in hex"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider }))
                .with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![switchboard_protocol::ALPN.to_vec()];
    // 0-RTT would let a replayed request change state; the broker refuses it anyway.
    tls.enable_early_data = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(connect)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.stream_receive_window(options.stream_receive_window.into());
    transport.receive_window((4u32 * 1024 * 1024).into());
    transport.send_window(1024 * 1024);
    let idle = quinn::IdleTimeout::try_from(options.idle_timeout).map_err(connect)?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(options.keep_alive));
    if options.datagrams {
        transport.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES));
        transport.datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES);
    } else {
        transport.datagram_receive_buffer_size(None);
        transport.datagram_send_buffer_size(0);
    }
    transport.mtu_discovery_config(Some(mtu_discovery()));
    config.transport_config(Arc::new(transport));

    let local = if server.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = bind_udp(local).map_err(connect)?;
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(connect)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Largest UDP payload the path MTU search tries (quinn's default: within Ethernet's 1,500
/// bytes over IPv4 and IPv6).
const MTU_UPPER_BOUND: u16 = 1452;

/// How the path MTU toward the broker is searched (the broker searches its way the same;
/// see its `tls::mtu_discovery` for the reasoning): a `minimum_change` of half the span
/// from QUIC's 1,200 bytes plus one makes quinn probe `MTU_UPPER_BOUND` at once and, only
/// if that is lost three times, the midpoint, instead of four sizes one after another
/// (docs/benchmarks.md, "MTU probes").
fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    const MIN_QUIC_MTU: u16 = 1200;
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    mtu.minimum_change((MTU_UPPER_BOUND - MIN_QUIC_MTU) / 2 + 1);
    mtu
}

/// rustls' *ring* provider with the TLS 1.3 suites offered cheapest first for this
/// host (`suites`). The broker takes the client's first choice.
pub(crate) fn provider() -> CryptoProvider {
    CryptoProvider { cipher_suites: suites(aes_in_hardware()), ..rustls::crypto::ring::default_provider() }
}

/// The TLS 1.3 suites in the order offered. With AES and carry-less multiply
/// instructions (`aes_hw`): `TLS13_AES_128_GCM_SHA256`, `TLS13_CHACHA20_POLY1305_SHA256`,
/// `TLS13_AES_256_GCM_SHA384` (rustls' own order puts AES-256 first, and the SHA-384 of
/// that suite has no hardware path in ring on x86-64: `sha512_block_data_order_nohw`
/// was 5.4% of the broker's CPU in a connection storm, docs/benchmarks.md "Cipher
/// suites", where SHA-256 has; AES-128 runs 10 rounds to AES-256's 14). Without them,
/// ChaCha20-Poly1305 first: constant-time software AES-GCM is several times slower than
/// ChaCha20 (the reason RFC 8446 section 9.1 adds it as a SHOULD, and why TLS stacks
/// prefer it on such hosts), then AES-128, then AES-256. Every order offers all three,
/// and the broker accepts all three.
fn suites(aes_hw: bool) -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    if aes_hw {
        vec![TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_256_GCM_SHA384]
    } else {
        vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384]
    }
}

/// This CPU has the instructions ring's AES-GCM runs fast with: AES-NI and PCLMULQDQ on
/// x86-64, AES and PMULL on aarch64; `false` on any other architecture.
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The roots to trust, or why there are none (said after the file's path, if any).
fn roots(certs: Vec<CertificateDer<'static>>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate to trust (not a PEM certificate)".into());
    }
    Ok(roots)
}

fn connect(e: impl std::fmt::Display) -> ClientError {
    ClientError::Connect(e.to_string())
}

/// 4 MiB socket buffers: the kernel default drops loopback bursts (see DEPENDENCIES.md).
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
    let _ = socket.set_send_buffer_size(4 * 1024 * 1024);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Trusts exactly one certificate by its SHA-256, still checking the handshake
/// signatures so the peer must hold that certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pin: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

/// A certificate other than the pinned one. Its `Debug` is its `Display`: rustls shows a
/// custom certificate error only through `Debug`, and that text reaches the user.
struct PinMismatch {
    presented: String,
    pinned: String,
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the broker presented a certificate with sha256 {}, not the pinned {}", self.presented, self.pinned)
    }
}

impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

/// A failed handshake as a user reads it: rustls wraps a custom certificate error as
/// `invalid peer certificate: Other(OtherError(TEXT))`; the wrapper goes.
pub(crate) fn handshake_failure(e: &quinn::ConnectionError) -> ClientError {
    let text = e.to_string();
    let text = match text.split_once("Other(OtherError(") {
        Some((head, rest)) => format!("{head}{}", rest.strip_suffix("))").unwrap_or(rest)),
        None => text,
    };
    match e {
        quinn::ConnectionError::TransportError(t) if is_certificate_alert(t.code) => ClientError::Untrusted(text),
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            ClientError::Refused(text)
        }
        _ => ClientError::Connect(text),
    }
}

/// Whether `code`, of a handshake this client ended (`TransportError`: a close by the
/// broker arrives as `ConnectionClosed`), is a TLS alert about the broker's certificate
/// (RFC 8446 section 6.2, carried as QUIC crypto error 0x100 + alert, RFC 9001 section
/// 4.8): what rustls sends when its verifier refuses one: bad_certificate (42) to
/// certificate_unknown (46: also a pin that does not match), unknown_ca (48),
/// access_denied (49), decrypt_error (51: a certificate of the trusted one's name not
/// signed by it, as two self-signed brokers' are).
fn is_certificate_alert(code: quinn::TransportErrorCode) -> bool {
    matches!(u64::from(code).checked_sub(0x100), Some(42..=46 | 48 | 49 | 51))
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.pin.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            // Names what was presented: an operator comparing it with the broker's
            // printed fingerprint sees at once whether the pin or the address is wrong.
            let mismatch = PinMismatch { presented: crate::hex(digest.as_ref()), pinned: crate::hex(&self.pin) };
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                mismatch,
            )))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};

    use super::suites;

    fn order(aes_hw: bool) -> Vec<rustls::CipherSuite> {
        suites(aes_hw).iter().map(|s| s.suite()).collect()
    }

    #[test]
    fn the_cheapest_suite_for_the_host_comes_first_and_every_suite_is_offered() {
        assert_eq!(order(true), [TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_256_GCM_SHA384]);
        assert_eq!(order(false), [TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384]);
    }
}
