//! TLS and QUIC endpoint set-up: certificate (operator-supplied or generated on first
//! start), rustls with the ring provider only, and every quinn knob set explicitly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::limits::DATAGRAM_BUFFER_BYTES;
use switchboard_protocol::limits::PREAUTH_MAX_FRAME_BYTES;

/// The certificate the broker serves, and where it came from.
pub struct Identity {
    /// Certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Private key.
    pub key: PrivateKeyDer<'static>,
    /// Path of the leaf certificate PEM (clients pass it as `--ca`).
    pub cert_path: PathBuf,
    /// SHA-256 of the leaf certificate DER, lowercase hex (clients pass it as `--pin`).
    pub fingerprint: String,
    /// The earliest notAfter of the served chain (the leaf's, or an intermediate's that
    /// ends first: clients refuse the chain past either), seconds since the Unix epoch
    /// (`None` when webpki can read no certificate of it: such a chain is refused by
    /// every client given it as `--ca`).
    pub not_after_s: Option<u64>,
    /// The latest notBefore of the served chain, seconds since the Unix epoch.
    pub not_before_s: Option<u64>,
}

/// Loads the configured certificate, or the generated one in the data dir, generating
/// it on first start.
pub fn load_or_generate(config: &Config) -> Result<Identity> {
    let (cert_path, key_path) = match (&config.cert, &config.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => {
            let c = config.data_dir.join("cert.pem");
            let k = config.data_dir.join("key.pem");
            if c.exists() && !k.exists() {
                finish_generation(&c, &k)?;
            }
            match (c.exists(), k.exists()) {
                (false, false) => generate(&c, &k, &generated_names(config.listen))?,
                (true, true) => {}
                // Generating both would replace the broker's identity silently (clients
                // that pinned it refuse the new one) and rewrite the key in place.
                _ => {
                    return Err(Error::Config(format!(
                        "{} and {} go together and one is missing: restore it, or remove the other too to \
                         generate a new certificate (clients that pinned the old one will refuse the new one)",
                        c.display(),
                        k.display()
                    )));
                }
            }
            (c, k)
        }
        // Refused by `config::check` first, with the settings' names.
        _ => return Err(Error::Config("cert and key go together: set both or neither".into())),
    };
    load(&cert_path, &key_path)
}

/// Reads the certificate chain at `cert_path` and the private key at `key_path` (PEM),
/// warning of a certificate clients given it as `--ca` will refuse.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity> {
    let identity = read(cert_path, key_path)?;
    if let Some(why) = identity.chain.first().and_then(refused_as_server_certificate) {
        tracing::warn!(cert = %cert_path.display(), "{why}");
    }
    let now_s = crate::now_ms() / 1000;
    match identity.not_after_s {
        Some(not_after_s) => warn_of_expiry(cert_path, not_after_s, now_s),
        None => tracing::warn!(
            cert = %cert_path.display(),
            "the certificate's validity dates could not be read: its expiry is not watched (no warning, no \
             switchboard_certificate_expiry_timestamp_seconds)"
        ),
    }
    if let Some(not_before_s) = identity.not_before_s.filter(|&at| at > now_s) {
        tracing::warn!(
            cert = %cert_path.display(),
            "the certificate is not valid before {}: until then clients given it or its CA as --ca refuse the \
             broker (\"not valid yet\"), or this host's clock is wrong",
            crate::admin::utc(not_before_s.saturating_mul(1000))
        );
    }
    Ok(identity)
}

/// From this many days before its notAfter the broker warns that its certificate
/// expires (at start and once a day, `watch_expiry`): time to make and install the next
/// one (OPERATIONS.md, "Certificates").
pub const CERT_EXPIRY_WARN_DAYS: u64 = 30;

/// How often a running broker looks at its certificate's expiry again.
pub const CERT_EXPIRY_CHECK: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What to say, at `now_s`, of a certificate whose notAfter is `not_after_s` (seconds
/// since the Unix epoch): `Some((true, ..))` once it has expired, `Some((false, ..))`
/// within `CERT_EXPIRY_WARN_DAYS` of it, else `None`.
pub fn expiry_notice(not_after_s: u64, now_s: u64) -> Option<(bool, String)> {
    let date = crate::admin::utc(not_after_s.saturating_mul(1000));
    if now_s > not_after_s {
        return Some((
            true,
            format!(
                "the certificate expired at {date}: clients given it or its CA as --ca refuse the broker (\"certificate \
                 expired\"); only pinned ones (--pin) connect. Install a new certificate and key and restart \
                 (OPERATIONS.md, Certificates)"
            ),
        ));
    }
    let left_s = not_after_s - now_s;
    (left_s <= CERT_EXPIRY_WARN_DAYS * 86_400).then(|| {
        (
            false,
            format!(
                "the certificate expires at {date}, in {} days: past it clients given it or its CA as --ca refuse \
                 the broker; install the next certificate and key before then and restart (OPERATIONS.md, \
                 Certificates)",
                left_s / 86_400
            ),
        )
    })
}

/// Logs `expiry_notice` at `now_s` of the certificate at `cert`: `ERROR` once expired,
/// `WARN` within `CERT_EXPIRY_WARN_DAYS`.
fn warn_of_expiry(cert: &Path, not_after_s: u64, now_s: u64) {
    match expiry_notice(not_after_s, now_s) {
        Some((true, said)) => tracing::error!(cert = %cert.display(), "{said}"),
        Some((false, said)) => tracing::warn!(cert = %cert.display(), "{said}"),
        None => {}
    }
}

/// Says once a day (`CERT_EXPIRY_CHECK`) what `expiry_notice` says of the certificate
/// at `cert`, whose notAfter is `not_after_s`, while the broker runs: a broker runs for
/// months, and a warning seen only at its start is seen by nobody.
pub(crate) async fn watch_expiry(cert: PathBuf, not_after_s: u64, shared: std::sync::Weak<crate::Shared>) {
    let mut tick = tokio::time::interval(CERT_EXPIRY_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now, and the start said it already.
    tick.tick().await;
    loop {
        tick.tick().await;
        if shared.strong_count() == 0 {
            return;
        }
        warn_of_expiry(&cert, not_after_s, crate::now_ms() / 1000);
    }
}

/// A certificate's notAfter, seconds since the Unix epoch: what webpki reports when it
/// checks the certificate (as its own anchor, as `refused_as_server_certificate` does;
/// its validity is checked before anything else, a CA's too) at the last time it can
/// read, after every notAfter (RFC 5280 section 4.1.2.5: 9999-12-31). `None` for a
/// certificate webpki cannot read, or one valid even then.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<u64> {
    // 10000-01-01T00:00:00Z.
    match checked_at(cert, 253_402_300_800)? {
        webpki::Error::CertExpired { not_after, .. } => Some(not_after.as_secs()),
        _ => None,
    }
}

/// A certificate's notBefore, seconds since the Unix epoch (`not_after`'s way, at the
/// epoch); `None` for one webpki cannot read.
pub fn not_before(cert: &CertificateDer<'_>) -> Option<u64> {
    webpki::EndEntityCert::try_from(cert).ok()?;
    match checked_at(cert, 0) {
        Some(webpki::Error::CertNotValidYet { not_before, .. }) => Some(not_before.as_secs()),
        // Valid at the epoch itself.
        _ => Some(0),
    }
}

/// The error webpki gives checking `cert` at `at_s`, if any.
fn checked_at(cert: &CertificateDer<'_>, at_s: u64) -> Option<webpki::Error> {
    let end_entity = webpki::EndEntityCert::try_from(cert).ok()?;
    let anchor = webpki::anchor_from_trusted_cert(cert).ok()?;
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(at_s));
    let usage = webpki::KeyUsage::server_auth();
    end_entity.verify_for_usage(algorithms, &[anchor], &[], at, usage, None, None).err()
}

/// `load` without its warning: the check of a configuration before a start (which
/// warns as it loads them; the warning came twice).
pub fn read(cert_path: &Path, key_path: &Path) -> Result<Identity> {
    fn pem(path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> Error + '_ {
        move |e| Error::Tls(format!("{}: {e}", path.display()))
    }
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(pem(cert_path))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(pem(cert_path))?;
    let leaf = chain.first().ok_or_else(|| Error::Tls(format!("no certificate in {}", cert_path.display())))?;
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(pem(key_path))?;
    // The key must be the certificate's: `switchboard config` passed a pair that was
    // not, and the start then failed with rustls' bare "keys may not be consistent:
    // KeyMismatch", naming neither file (an operator's trial).
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
        .map_err(|e| Error::Tls(format!("{} is not the key of {}: {e}", key_path.display(), cert_path.display())))?;
    let not_after_s = chain.iter().filter_map(not_after).min();
    let not_before_s = chain.iter().filter_map(not_before).max();
    Ok(Identity { chain, key, cert_path: cert_path.to_path_buf(), fingerprint, not_after_s, not_before_s })
}

/// Why clients that verify `leaf` against a CA file (`--ca`) will refuse it as a
/// server's certificate whatever the CA, if they will: a CA certificate (basic
/// constraints `CA:TRUE`, which `openssl req -x509` makes unless told otherwise) is
/// refused as an end entity (webpki's `CaUsedAsEndEntity`; RFC 5280 section 4.2.1.9).
/// Checked as rustls' verifier checks, with `leaf` as its own anchor: other findings
/// depend on the CA the clients are given, and are not judged here. Pinned clients
/// (`--pin`) accept it.
pub fn refused_as_server_certificate(leaf: &CertificateDer<'_>) -> Option<String> {
    let end_entity = webpki::EndEntityCert::try_from(leaf).ok()?;
    let anchor = webpki::anchor_from_trusted_cert(leaf).ok()?;
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms.all;
    let now = rustls::pki_types::UnixTime::now();
    let usage = webpki::KeyUsage::server_auth();
    match end_entity.verify_for_usage(algorithms, &[anchor], &[], now, usage, None, None) {
        Err(webpki::Error::CaUsedAsEndEntity) => Some(
            "the certificate is a CA certificate (basicConstraints CA:TRUE): clients given a CA file refuse it \
             as a server's (CaUsedAsEndEntity), only pinned ones (--pin) connect. Make a server certificate \
             (openssl: -addext basicConstraints=critical,CA:FALSE), or leave cert and key out for the one the \
             broker generates"
                .into(),
        ),
        _ => None,
    }
}

/// SHA-256 of a certificate's DER, lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert.as_ref()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The names a certificate generated for a broker listening on `listen` is made for:
/// `localhost` and the loopback addresses, this host's name (`/proc/sys/kernel/hostname`,
/// if it is a DNS name), and `listen`'s address when it is a specific one beyond
/// loopback. Before, only the first three: a broker listening on a LAN address served
/// a certificate no remote client given `--ca` could accept (an operator trial).
pub fn generated_names(listen: std::net::SocketAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    if !host.is_empty()
        && host != "localhost"
        && rustls::pki_types::DnsName::try_from(host).is_ok()
        && host.parse::<std::net::IpAddr>().is_err()
    {
        names.push(host.to_owned());
    }
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    names
}

/// Whether `leaf` names `name` (a DNS name or an IP address), as a client verifying it
/// for that server name checks (webpki). `false` for a certificate webpki cannot read.
pub fn certificate_names(leaf: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else { return false };
    match rustls::pki_types::ServerName::try_from(name) {
        Ok(server_name) => cert.verify_is_valid_for_subject_name(&server_name).is_ok(),
        Err(_) => false,
    }
}

/// At start, for a broker with the generated certificate reachable beyond this host
/// (listening on all addresses, or on a specific one the certificate does not name): says at `WARN` which of the names a
/// client may use the certificate has (of `localhost`, the loopback addresses, this
/// host's name and the listen address), and what to do (OPERATIONS.md, "Certificates").
/// A client given `--ca` refuses a certificate that does not name what it connects to;
/// one given `--pin` accepts it whatever it names.
pub fn warn_of_names_missing(identity: &Identity, config: &Config) {
    // An operator's certificate names what the operator chose (a review: listing which
    // of the generated names it has said "only `[]`" of a good one).
    if config.cert.is_some() {
        return;
    }
    let listen = config.listen;
    let ip = listen.ip();
    let Some(leaf) = identity.chain.first() else { return };
    if ip.is_loopback() {
        return;
    }
    let named: Vec<String> = generated_names(listen).into_iter().filter(|n| certificate_names(leaf, n)).collect();
    if !ip.is_unspecified() && certificate_names(leaf, &ip.to_string()) {
        // Named: said all the same, as the docs and sb's hint promise (a trial found
        // nothing said for a specific address).
        tracing::info!(listen = %listen, names = ?named, "clients given the certificate as --ca connect by one of `names`");
        return;
    }
    tracing::warn!(
        listen = %listen,
        cert = %identity.cert_path.display(),
        names = ?named,
        "clients on other hosts given this certificate as --ca accept it only when they connect by one of \
         `names`; by any other name or address they refuse it (not valid for that name). They can trust it \
         by --pin (the sha256 printed at start) instead, or the broker can be given a certificate for the \
         names they use (cert and key; OPERATIONS.md, Certificates)"
    );
}

fn generate(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<()> {
    let names = names.to_vec();
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| Error::Tls(format!("generating certificate: {e}")))?;
    if let Some(dir) = cert_path.parent() {
        // Private when made here (by default it is the data dir: `create_data_dir`).
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    // Both written and synced under temporary names, then the certificate renamed into
    // place and the key last: a start cut short leaves neither (generated again), or the
    // certificate and the key's temporary file (`finish_generation` completes it), never
    // half an identity that a start would refuse.
    let (key_tmp, cert_tmp) = (generating(key_path), generating(cert_path));
    write_private(&key_tmp, certified.signing_key.serialize_pem().as_bytes())
        .map_err(Error::io(format!("writing {}", key_tmp.display())))?;
    std::fs::write(&cert_tmp, certified.cert.pem())
        .and_then(|()| std::fs::File::open(&cert_tmp)?.sync_all())
        .map_err(Error::io(format!("writing {}", cert_tmp.display())))?;
    std::fs::rename(&cert_tmp, cert_path).map_err(Error::io(format!("writing {}", cert_path.display())))?;
    finish_generation(cert_path, key_path)
}

/// Where `generate` writes `path` before renaming it into place.
fn generating(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    path.with_file_name(name)
}

/// Renames a generated key into place when its certificate is there already (a start
/// cut short between the two renames), and syncs the directory.
fn finish_generation(cert_path: &Path, key_path: &Path) -> Result<()> {
    let key_tmp = generating(key_path);
    if cert_path.exists() && !key_path.exists() && key_tmp.exists() {
        std::fs::rename(&key_tmp, key_path).map_err(Error::io(format!("writing {}", key_path.display())))?;
    }
    if let Some(dir) = key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(Error::io(format!("syncing {}", dir.display())))?;
    }
    Ok(())
}

/// Bytes of the endpoint secret (`endpoint_config`).
const ENDPOINT_SECRET_BYTES: usize = 64;

/// The QUIC endpoint settings that must outlive the process, from a secret kept in
/// `data_dir/reset.key` (64 random bytes, mode 0600, made on first start): the key that
/// stateless-reset tokens are derived from (RFC 9000 section 10.3; HMAC-SHA256 over the
/// secret, as quinn does with a random one per endpoint) and the key with which the
/// broker's connection IDs are signed (quinn's `HashedConnectionIdGenerator`, keyed by
/// the first 8 bytes of HMAC(secret, "connection ids")), by which it tells one of its own
/// IDs from noise. A broker restarted after a crash then recognises a packet of a
/// connection it no longer knows as one of its IDs and answers it with a reset its
/// client accepts, and the client reconnects at its next packet instead of waiting out
/// its idle timeout (30 s in the client library) on a connection nobody serves. Every
/// UDP socket of the broker uses the same secret, so a client that lands on a socket
/// that does not know its connection (`udp_sockets` > 1) learns it the same way. A file
/// of another length is refused: whoever can replace it can reset this broker's
/// connections, as whoever holds `key.pem` can impersonate it.
pub fn endpoint_config(config: &Config) -> Result<quinn::EndpointConfig> {
    let path = config.data_dir.join("reset.key");
    let secret = match std::fs::read(&path) {
        Ok(secret) if secret.len() == ENDPOINT_SECRET_BYTES => secret,
        Ok(secret) => {
            return Err(Error::Config(format!(
                "{} holds {} bytes, not {ENDPOINT_SECRET_BYTES}: remove it to make a new one",
                path.display(),
                secret.len()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = vec![0u8; ENDPOINT_SECRET_BYTES];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| Error::Tls("no randomness for the endpoint secret".into()))?;
            crate::make_data_dir(&config.data_dir)?;
            // Written and synced under a temporary name, then renamed into place: a
            // first start cut short left a short file that every later start refused
            // until removed by hand (an attacker review).
            let tmp = generating(&path);
            write_private(&tmp, &secret)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .and_then(|()| std::fs::File::open(&config.data_dir)?.sync_all())
                .map_err(Error::io(format!("writing {}", path.display())))?;
            secret
        }
        Err(e) => return Err(Error::io(format!("reading {}", path.display()))(e)),
    };
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let tag = ring::hmac::sign(&reset_key, b"connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(endpoint)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Builds the QUIC server config. 0-RTT is refused: rustls' `max_early_data_size`
/// stays 0, so no request can arrive before the handshake completes (and none could
/// be replayed).
///
/// `opened` counts the resumption tickets presented to the broker that it could open
/// (`switchboard_tls_tickets_opened_total`): an upper bound on the handshakes that
/// resumed (`CountingTickets`).
pub fn server_config(identity: &Identity, config: &Config, opened: Arc<AtomicU64>) -> Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::tls)?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(Error::tls)?;
    tls.alpn_protocols = vec![switchboard_protocol::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    // Stateless resumption tickets (sealed with a key rustls rotates every 6 hours, good
    // for 12): a device reconnecting within hours resumes its TLS session (no
    // certificate to sign or verify, a 200-byte flight instead of 660) however many
    // others connected meanwhile. rustls' default keeps resumable sessions in a cache of
    // 256 on the broker, which a storm turns over in a tenth of a second: at 256
    // connects in flight most connects missed it and paid a full handshake on both
    // ends (docs/benchmarks.md, "One-flight authentication"). Resuming still runs a fresh
    // key exchange (TLS 1.3 `psk_dhe_ke`), so the exporter a device signs stays unique to
    // the connection, and 0-RTT stays refused.
    tls.ticketer =
        Arc::new(CountingTickets { inner: rustls::crypto::ring::Ticketer::new().map_err(Error::tls)?, opened });
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(Error::tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(config)));
    // Mobile devices change addresses; QUIC path validation keeps that safe.
    server.migration(true);
    // Connection attempts waiting for the accept loop to decide (it decides at once);
    // each may buffer a few datagrams (a client's first flight) meanwhile.
    let pending = config.max_unauthenticated_connections.clamp(1, 1 << 16);
    server.max_incoming(pending);
    server.incoming_buffer_size(64 * 1024);
    server.incoming_buffer_size_total((pending as u64 * 64 * 1024).min(64 << 20));
    // A Retry token (asked for under load, see `connection::Admission`) must come back
    // within a few round trips; a short life limits replaying it from elsewhere.
    server.retry_token_lifetime(std::time::Duration::from_secs(15));
    Ok(server)
}

/// rustls' ticketer, counting the tickets it opens: one a client presented to resume,
/// which rustls checks only after opening it (its server name, cipher suite and binder),
/// so a ticket then not used, or replayed in a handshake that fails, counts too.
#[derive(Debug)]
struct CountingTickets {
    inner: Arc<dyn rustls::server::ProducesTickets>,
    opened: Arc<AtomicU64>,
}

impl rustls::server::ProducesTickets for CountingTickets {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher);
        if plain.is_some() {
            self.opened.fetch_add(1, Ordering::Relaxed);
        }
        plain
    }
}

/// Ack-eliciting packets a peer is asked to receive before it must acknowledge at once
/// (quinn's default is 1: an ACK for every second packet; we ask for one every fourth).
///
/// Not more: a download over a lossy link runs at the congestion window that random
/// loss leaves Cubic (about 11-12 packets of 1,452 bytes at 1% loss and 20 ms, 7 at
/// 3%), and a flight under the threshold + 1 gets no ACK until the client's 25 ms
/// max_ack_delay runs out. Through an emulated link with 1-3% loss (20-60 ms RTT),
/// downloads ran 10-27% below their rate without the request with 9, and 0-10% with 3,
/// while a member receiving 1,000 deliveries a second sends twice the ACK-only packets
/// it sent with 9 (docs/benchmarks.md, "ACK frequency on a lossy link";
/// `loadtest/examples/lossy_link.rs`).
pub const ACK_ELICITING_THRESHOLD: u32 = 3;

/// Bytes one stream may have unread at the broker.
const STREAM_WINDOW: u32 = 256 * 1024;

/// Bytes a connection may have unread at the broker once authenticated: a stream
/// window for the control stream and one for each of `max_transfer_streams`.
fn connection_window(max_transfer_streams: u32) -> u32 {
    STREAM_WINDOW.saturating_mul(max_transfer_streams.saturating_add(1))
}

/// Bytes a connection may have unread at the broker before it is authenticated: its
/// hello and its auth request, each at most `PREAUTH_MAX_FRAME_BYTES`, twice over. With
/// the session's window from the start, each of up to `max_unauthenticated_connections`
/// could make the broker buffer a whole stream window (256 KiB) while its request waits
/// for a password hash.
pub const PREAUTH_WINDOW: u32 = 4 * PREAUTH_MAX_FRAME_BYTES;

/// Opens `conn`'s receive window to the session's (`connection_window`): called once it
/// is authenticated, before it is told so.
pub fn open_session_window(conn: &quinn::Connection, config: &Config) {
    conn.set_receive_window(connection_window(config.max_transfer_streams).into());
}

/// The transport knobs, each chosen rather than inherited: what `server_config` gives
/// every connection. Public so that measurements can run a plain quinn endpoint with the
/// broker's settings, or with one of them changed (`loadtest/examples/lossy_link.rs`).
/// A connection's receive window starts at `PREAUTH_WINDOW` and opens to the session's
/// only with `open_session_window`, as the broker does once a device is authenticated.
pub fn transport_config(config: &Config) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // The control stream only. quinn allocates state up front for every stream the peer
    // may open, so each allowed stream is per-connection memory; file transfers raise
    // the limit on their connection (`Connection::set_max_concurrent_bi_streams`) when
    // they start, instead of every idle connection paying for them.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Per-stream window: a full client frame (64 KiB) several times over.
    t.stream_receive_window(STREAM_WINDOW.into());
    // quinn's default connection window is unbounded: cap what one client can make us
    // buffer. Before authentication, `PREAUTH_WINDOW`; from then on
    // (`open_session_window`) one stream window for the control stream plus one per
    // transfer stream, so transfers that fill theirs still leave the control stream its
    // whole window (PROTOCOL.md section 12; 1 MiB with the default 3 transfer streams).
    t.receive_window(PREAUTH_WINDOW.into());
    // Bytes we buffer unacknowledged toward one client; outbound queue caps the rest.
    t.send_window(2 * 1024 * 1024);
    t.send_fairness(true);
    // Ask each client to acknowledge less often (the QUIC ACK-frequency extension, draft
    // 04, which quinn clients support): an ACK after `ACK_ELICITING_THRESHOLD` + 1
    // ack-eliciting packets or its max_ack_delay (25 ms), instead of every second packet.
    // A member receiving a stream of deliveries otherwise sends the broker an ACK-only
    // packet for every two, and each costs the broker a receive, a decryption and a
    // connection wakeup (docs/benchmarks.md, "ACK frequency"). Loss detection holds:
    // the PTO already allows for the peer's max_ack_delay, and a gap in what the client
    // receives gets an ACK as soon as it would let the broker declare a loss (the
    // draft's reordering threshold; quinn asks for 2). Why the threshold is not higher:
    // `ACK_ELICITING_THRESHOLD`.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    t.ack_frequency_config(Some(ack));
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout())
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::from_u32(30_000)));
    t.max_idle_timeout(Some(idle));
    // The effective idle timeout is the smaller of ours and the client's, and neither
    // side can read the other's (quinn does not expose it, and the hello does not carry
    // it), so a client cannot time its keep-alives to a short broker timeout. The broker
    // therefore sends a PING after a third of its timeout without receiving anything; a
    // live client's ACK keeps both ends open. quinn re-arms this timer on every packet
    // received, so a client that keeps alive itself (ours does, every 10 s) or talks
    // costs no extra packets. A dead one times out between `idle_timeout_ms` and 4/3 of
    // it after its last packet: quinn restarts the idle timer on receipt and also (RFC
    // 9000 section 10.1) on the first ack-eliciting packet it sends after one, which for
    // a silent peer is this keep-alive, a third of the timeout in (measured: 40.0 s
    // after the last packet at the default 30 s). Its last seen is taken from before the
    // timeout (`presence::PresenceState::handle_detach`).
    let keep_alive = (config.idle_timeout_ms > 0).then(|| config.idle_timeout() / 3);
    t.keep_alive_interval(keep_alive);
    // Datagrams carry typing signals and events (PROTOCOL.md section 11). quinn queues
    // them lazily, so these bounds cost an idle connection nothing (see
    // `limits::DATAGRAM_BUFFER_BYTES`). A peer's datagram above `MAX_DATAGRAM_BYTES` but
    // within this buffer is dropped by the session rather than closing the connection.
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER_BYTES));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER_BYTES);
    t.mtu_discovery_config(Some(mtu_discovery()));
    t
}

/// Largest UDP payload the path MTU search tries (quinn's default: within Ethernet's 1,500
/// bytes over IPv4 and IPv6).
pub const MTU_UPPER_BOUND: u16 = 1452;

/// How the path MTU is searched toward each client (RFC 8899 DPLPMTUD; the client
/// searches its way the same, in the client library's `tls` module): quinn binary-searches from
/// QUIC's 1,200 bytes up to `MTU_UPPER_BOUND` and stops once a step would change less
/// than `minimum_change`. At half the span plus one (127), the first step already would,
/// so it probes the upper bound at once; only if that probe is lost three times does it
/// try the midpoint (1,325), and stop. quinn's default step (20) probes 1,326, 1,389,
/// 1,420 and 1,452 one after another, each a padded packet the peer acknowledges at
/// once: on a path that carries 1,452 bytes (Ethernet, loopback) the same MTU for one
/// probe instead of four, each way; in a connection storm, 20-45% more connections a
/// second (docs/benchmarks.md, "MTU probes"). The search is repeated every 10 minutes
/// (quinn's `interval`); at the upper bound it sends nothing.
fn mtu_discovery() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    mtu.minimum_change((MTU_UPPER_BOUND - MIN_QUIC_MTU) / 2 + 1);
    mtu
}

/// The smallest UDP payload QUIC must carry (RFC 9000 section 14), where the search starts.
const MIN_QUIC_MTU: u16 = 1200;

/// Binds `count` UDP sockets on one address with 4 MiB buffers each: with the kernel's
/// default 208 KiB, loopback QUIC drops packets under bursts and handshakes stall for a
/// retransmit. With `count > 1` the sockets share the port through SO_REUSEPORT; the
/// kernel spreads peers over them by address, so each socket (and its quinn endpoint
/// task) carries a share of the load. The price: a peer whose address changes (NAT
/// rebinding, a network switch) may land on a socket whose endpoint does not know its
/// connection, and must reconnect; with `count == 1` QUIC migration keeps working. A
/// port in use, by a group of sockets too, is refused (`binding UDP ADDR: Address
/// already in use`).
pub fn bind_udp(addr: SocketAddr, count: usize) -> Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    const BUFFER_BYTES: usize = 4 * 1024 * 1024;
    // A port group is joined by any socket of the same user that sets SO_REUSEPORT: a
    // second broker (another data dir, the same `listen`, `udp_sockets` over 1) joined
    // this one's and took about half of its clients' packets, stalling their
    // connections (an attacker review). A socket without the option finds the port in
    // use, as a second broker with one socket does.
    if count > 1 && addr.port() != 0 {
        std::net::UdpSocket::bind(addr).map_err(Error::io(format!("binding UDP {addr}")))?;
    }
    let mut sockets = Vec::with_capacity(count.max(1));
    let mut bind_to = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(Error::io("opening a UDP socket"))?;
        // Best effort: the kernel clamps to rmem_max/wmem_max. A small receive buffer
        // is what overflows first when the broker falls behind (datagrams dropped, each
        // a QUIC retransmission timeout later), so say so. Linux reports twice what was
        // granted (it counts its bookkeeping).
        let _ = socket.set_recv_buffer_size(BUFFER_BYTES);
        let _ = socket.set_send_buffer_size(BUFFER_BYTES);
        let granted = (socket.recv_buffer_size().unwrap_or(0), socket.send_buffer_size().unwrap_or(0));
        if granted.0 < BUFFER_BYTES || granted.1 < BUFFER_BYTES {
            tracing::warn!(
                receive_bytes = granted.0,
                send_bytes = granted.1,
                wanted_bytes = BUFFER_BYTES,
                "the kernel granted smaller UDP buffers than asked: raise net.core.rmem_max and net.core.wmem_max"
            );
        }
        if count > 1 {
            socket.set_reuse_port(true).map_err(Error::io("setting SO_REUSEPORT"))?;
        }
        socket.bind(&bind_to.into()).map_err(Error::io(format!("binding UDP {bind_to}")))?;
        let socket: std::net::UdpSocket = socket.into();
        // Port 0 picks a port once; the others join it.
        bind_to = socket.local_addr().map_err(Error::io("reading the bound address"))?;
        sockets.push(socket);
    }
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operator trial's `openssl req -x509` certificate (a CA) was served, and every
    /// client given it as `--ca` refused it; the broker now says why at start.
    #[test]
    fn a_ca_certificate_is_said_to_be_refused_by_clients() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let why = refused_as_server_certificate(ca.der()).expect("a CA certificate is refused");
        assert!(why.contains("CA:TRUE") && why.contains("CA:FALSE"), "{why}");
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert_eq!(refused_as_server_certificate(generated.cert.der()), None);
    }

    /// A certificate's notAfter is read, warned of within 30 days of it and an error
    /// past it; the generated one (valid to 4096) is never warned of.
    #[test]
    fn a_certificate_near_its_expiry_is_warned_of_and_one_past_it_is_an_error() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let at = 1_893_456_000; // 2030-01-01T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(at));
        params.not_before = rcgen::date_time_ymd(2029, 1, 1);
        let later = params.self_signed(&key).unwrap();
        assert_eq!(not_before(later.der()), Some(1_861_920_000)); // 2029-01-01
        // A chain is as good as the certificate of it that ends first.
        let tmp = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
        let mut ca_params = rcgen::CertificateParams::new(vec!["ca".into()]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.not_after = rcgen::date_time_ymd(2028, 1, 1);
        let ca = ca_params.self_signed(&key).unwrap();
        std::fs::write(&cert_path, format!("{}{}", cert.pem(), ca.pem())).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let identity = read(&cert_path, &key_path).unwrap();
        assert_eq!(identity.not_after_s, Some(1_830_297_600)); // 2028-01-01, the CA's
        assert_eq!(expiry_notice(at, at - 31 * 86_400), None);
        let (expired, said) = expiry_notice(at, at - 10 * 86_400).unwrap();
        assert!(!expired && said.contains("expires at 2030-01-01T00:00:00Z, in 10 days"), "{said}");
        let (expired, said) = expiry_notice(at, at + 1).unwrap();
        assert!(expired && said.contains("expired at 2030-01-01T00:00:00Z") && said.contains("--pin"), "{said}");
        // Another key than the certificate's is refused, naming both files.
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&key_path, other.serialize_pem()).unwrap();
        let said = read(&cert_path, &key_path).err().expect("a key that is not the certificate's").to_string();
        assert!(said.contains("key.pem is not the key of") && said.contains("cert.pem"), "{said}");
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let far = not_after(generated.cert.der()).expect("the generated certificate's notAfter");
        assert!(far > 60_000_000_000, "valid to 4096: {far}");
        assert_eq!(expiry_notice(far, crate::now_ms() / 1000), None);
    }

    /// Transfer streams that fill their windows leave the control stream a whole window:
    /// the connection's window is one stream window per stream that may be open, and
    /// with the default three transfer streams it is the 1 MiB PROTOCOL.md announces.
    #[test]
    fn the_connection_window_leaves_the_control_stream_its_own() {
        assert_eq!(connection_window(Config::ephemeral("unused").max_transfer_streams), 1024 * 1024);
        for transfers in [0, 1, 3, 8, 64] {
            let window = u64::from(connection_window(transfers));
            assert_eq!(window, u64::from(STREAM_WINDOW) * (u64::from(transfers) + 1));
        }
        assert_eq!(connection_window(u32::MAX), u32::MAX, "saturates instead of wrapping");
    }

    /// The generated certificate names the listen address when it is a specific one
    /// beyond loopback, and this host's name: before, only localhost and the loopback
    /// addresses, and a client on another host given it as `--ca` refused it for the
    /// broker's LAN address (an operator trial).
    #[test]
    fn the_generated_certificate_names_a_specific_listen_address_and_the_host() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::ephemeral(tmp.path());
        config.listen = "192.0.2.7:4433".parse().unwrap();
        let identity = load_or_generate(&config).unwrap();
        let leaf = &identity.chain[0];
        for name in ["localhost", "127.0.0.1", "::1", "192.0.2.7"] {
            assert!(certificate_names(leaf, name), "{name}");
        }
        assert!(!certificate_names(leaf, "192.0.2.8"));
        // This host's name too, where it has one.
        for name in generated_names(config.listen) {
            assert!(certificate_names(leaf, &name), "{name}");
        }
        // On all addresses: no address of its own in the certificate.
        assert!(!generated_names("0.0.0.0:4433".parse().unwrap()).iter().any(|n| n == "0.0.0.0"));
    }

    /// A second broker's group of sockets (another data dir, the same `listen`) finds
    /// the port in use: before, it joined the first one's group and took about half of
    /// its clients' packets.
    #[test]
    fn a_port_held_by_a_group_of_sockets_is_not_joined() {
        let held = bind_udp("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let port = held[0].local_addr().unwrap();
        for count in [1, 2] {
            let e = bind_udp(port, count).unwrap_err().to_string();
            assert!(e.contains("Address already in use"), "{count} sockets: {e}");
        }
        drop(held);
        assert_eq!(bind_udp(port, 2).unwrap().len(), 2, "free again");
    }

    /// A fresh data dir (and the parents made for it) is private, and a data dir left
    /// with a certificate but no key (or the reverse) is refused rather than given a new
    /// identity in place: before, the directories took the umask (0755: every local user
    /// could read the store and the files), and a missing `cert.pem` rewrote `key.pem`.
    /// A first start cut short while generating them is completed.
    #[test]
    fn a_fresh_data_dir_is_private_and_half_an_identity_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("parent").join("data");
        let config = Config::ephemeral(&data);
        let identity = load_or_generate(&config);
        assert!(identity.is_ok());
        for dir in [&data, &tmp.path().join("parent")] {
            let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", dir.display());
        }
        let key = std::fs::read(data.join("key.pem")).unwrap();
        // A first start cut short between its two renames is completed, not refused.
        std::fs::rename(data.join("key.pem"), data.join("key.pem.new")).unwrap();
        assert!(load_or_generate(&config).is_ok());
        assert_eq!(std::fs::read(data.join("key.pem")).unwrap(), key, "the generated key, renamed into place");
        std::fs::remove_file(data.join("cert.pem")).unwrap();
        match load_or_generate(&config) {
            Err(Error::Config(why)) => assert!(why.contains("go together"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        assert_eq!(std::fs::read(data.join("key.pem")).unwrap(), key, "the key is left as it was");
    }
}
