//! Bad input ends only the offending connection, with a stable code; others keep going.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_client::{Client, ClientError, RawSession};
use switchboard_protocol::frame::write_varint;
use switchboard_protocol::{ErrorCode, encode_frame};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, closed_with, next_entry, within};

/// A bare QUIC connection to the broker with the control stream opened: no hello yet.
async fn bare(tb: &TestBroker) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let addr = tb.broker.as_ref().unwrap().local_addr;
    let conn = tb.connector().endpoint().connect(addr, "localhost").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (conn, send, recv)
}

/// Waits for the broker to close `raw` and returns its close code.
async fn close_code(raw: &RawSession) -> Option<ErrorCode> {
    closed_with(&raw.conn).await
}

/// A chat between two healthy clients still works.
async fn still_chatting(tb: &TestBroker, alice: &Client, bob_events: &mut switchboard_client::Events, conv: u64) {
    let seq = alice.send(conv, "still here").await.unwrap();
    assert_eq!(next_entry(bob_events).await.seq, seq);
    let _ = tb;
}

async fn setup() -> (TestBroker, Client, Client, switchboard_client::Events, u64, switchboard_client::Identity) {
    let tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    let (bob, _) = tb.register("bob").await;
    let (_mallory, mallory_id) = tb.register("mallory").await;
    let mut bob_events = bob.events().unwrap();
    let conv = alice.create_group("g", &["bob".into(), "mallory".into()]).await.unwrap().id;
    next_entry(&mut bob_events).await;
    (tb, alice, bob, bob_events, conv, mallory_id)
}

/// An authenticated peer writes `bytes`: the broker closes that connection with
/// `expected`, and two other clients go on chatting.
async fn check_hostile(bytes: &[u8], expected: ErrorCode) {
    let (tb, alice, _bob, mut bob_events, conv, mallory) = setup().await;
    let mut raw = tb.connector().connect_raw(&mallory).await.unwrap();
    raw.send.write_all(bytes).await.unwrap();
    assert_eq!(close_code(&raw).await, Some(expected), "{bytes:02x?}");
    still_chatting(&tb, &alice, &mut bob_events, conv).await;
}

#[tokio::test]
async fn garbage_bytes_close_only_that_connection() {
    bounded(async {
        check_hostile(&[0x05, 0xff, 0xfe, 0xfd, 0xfc, 0xfb], ErrorCode::BAD_FRAME).await;
    })
    .await
}

#[tokio::test]
async fn oversized_frame_is_refused_before_its_body() {
    bounded(async {
        let mut prefix = [0u8; 5];
        let n = write_varint(512 * 1024 * 1024, &mut prefix);
        // Only the prefix is sent: the broker must not wait for (or allocate) 512 MiB.
        check_hostile(&prefix[..n], ErrorCode::FRAME_TOO_LARGE).await;
    })
    .await
}

#[tokio::test]
async fn unknown_request_closes_with_bad_frame() {
    bounded(async {
        // Length 4; ClientFrame::Request (0), id 1, request tag 200: no such request.
        check_hostile(&[0x04, 0x00, 0x01, 0xc8, 0x01], ErrorCode::BAD_FRAME).await;
    })
    .await
}

#[tokio::test]
async fn silent_connection_hits_the_auth_deadline() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (conn, _send, _recv) = bare(&tb).await;
        // Say nothing: the stream is not even visible to the broker until it carries data,
        // so the deadline covers that too.
        assert_eq!(closed_with(&conn).await, Some(ErrorCode::TIMEOUT));
    })
    .await
}

#[tokio::test]
async fn preauth_frames_are_capped_at_4_kib() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (conn, mut send, _recv) = bare(&tb).await;
        let hello = switchboard_protocol::ClientHello {
            magic: *b"SWBD",
            version: switchboard_protocol::PROTOCOL_VERSION,
            agent: "x".repeat(5000),
        };
        send.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
        assert_eq!(closed_with(&conn).await, Some(ErrorCode::FRAME_TOO_LARGE));
    })
    .await
}

#[tokio::test]
async fn wrong_version_is_refused() {
    bounded(async {
        let tb = TestBroker::start().await;
        // A future version; version 1, whose upload chunks carried a BLAKE3 where later
        // ones carry a CRC-32; version 2, which knows no `RolesChanged` entry; version 3,
        // which knows no `TitleChanged`: told apart at the hello, not by a failed upload
        // or an entry it cannot decode.
        for (version, agent) in [(99, "future"), (6, "next"), (1, "version-1"), (2, "version-2"), (3, "version-3")] {
            let (conn, mut send, _recv) = bare(&tb).await;
            let hello = switchboard_protocol::ClientHello { magic: *b"SWBD", version, agent: agent.into() };
            send.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
            assert_eq!(closed_with(&conn).await, Some(ErrorCode::UNSUPPORTED_VERSION), "version {version}");
        }
    })
    .await
}

#[tokio::test]
async fn a_device_that_stops_reading_is_cut_off_as_slow_consumer() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.outbound_max_frames = 256;
            c.outbound_max_bytes = 512 * 1024;
        })
        .await;
        let alice = std::sync::Arc::new(tb.register("alice").await.0);
        let (bob, _) = tb.register("bob").await;
        let (_s, sloth) = tb.register("sloth").await;
        let mut bob_events = bob.events().unwrap();
        let conv = alice.create_group("g", &["bob".into(), "sloth".into()]).await.unwrap().id;
        next_entry(&mut bob_events).await;
        // Authenticated, then never reads its stream again.
        let raw = tb.connector().connect_raw(&sloth).await.unwrap();
        let text = "x".repeat(4000);
        let mut sent = 0u64;
        let mut code = None;
        while sent < 5000 && code.is_none() {
            // Pipelined sends: 32 at a time.
            let mut batch = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let (alice, text) = (alice.clone(), text.clone());
                batch.spawn(async move { alice.send(conv, &text).await });
            }
            for r in within(STEP_DEADLINE, "a batch of sends", batch.join_all()).await {
                r.unwrap();
                sent += 1;
            }
            for _ in 0..32 {
                next_entry(&mut bob_events).await;
            }
            if let Some(reason) = raw.conn.close_reason() {
                code = ClientError::from(reason).code();
            }
        }
        assert_eq!(code, Some(ErrorCode::SLOW_CONSUMER), "after {sent} messages");
        // Counted for the operator (`switchboard_slow_consumers_total`), once.
        let counted = &tb.shared().counters.slow_consumers;
        within(STEP_DEADLINE, "the slow consumer counted", async {
            while counted.total() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(counted.total(), 1);
        // Bob, who reads, got every one of them and is still connected.
        still_chatting(&tb, &alice, &mut bob_events, conv).await;
    })
    .await
}

/// PROTOCOL.md section 1: the broker accepts no early data. Its session tickets say so
/// (`max_early_data_size` 0). A client that sends 0-RTT data anyway, with a ticket
/// doctored to allow it, has its early data rejected, and the connection carries on
/// in 1-RTT. Fails if no ticket arrives: then nothing was tested.
#[tokio::test]
async fn zero_rtt_is_refused() {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    bounded(async {
        let tb = TestBroker::start().await;
        let broker = tb.broker.as_ref().unwrap();
        // A client that would like 0-RTT: session resumption plus early data enabled.
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&broker.cert_path).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![switchboard_protocol::ALPN.to_vec()];
        tls.enable_early_data = true;
        let tickets = std::sync::Arc::new(Tickets::default());
        tls.resumption = rustls::client::Resumption::store(tickets.clone());
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
        let hello = encode_frame(&switchboard_protocol::ClientHello {
            magic: *b"SWBD",
            version: switchboard_protocol::PROTOCOL_VERSION,
            agent: "0rtt".into(),
        })
        .unwrap();

        // First connection: a full handshake, after which the broker issues tickets.
        let first = endpoint.connect(broker.local_addr, "localhost").unwrap().await.unwrap();
        let (mut send, mut recv) = first.open_bi().await.unwrap();
        send.write_all(&hello).await.unwrap();
        let mut buf = [0u8; 64];
        within(STEP_DEADLINE, "server hello", recv.read(&mut buf)).await.unwrap();
        within(STEP_DEADLINE, "a session ticket", async {
            while tickets.issued().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(tickets.issued().iter().all(|&max| max == 0), "tickets allow early data: {:?}", tickets.issued());
        first.close(0u32.into(), b"");

        // Second connection: resumes with a ticket that claims early data is allowed, so
        // the client really sends its hello as 0-RTT data.
        tickets.allow_early_data();
        let connecting = endpoint.connect(broker.local_addr, "localhost").unwrap();
        let Ok((conn, accepted)) = connecting.into_0rtt() else {
            panic!("the client did not attempt 0-RTT with its ticket");
        };
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&hello).await.unwrap();
        assert!(!within(STEP_DEADLINE, "the 0-RTT verdict", accepted).await, "broker accepted 0-RTT data");
        assert_eq!(tickets.taken(), 1, "the second connection resumed with the ticket");
        // The handshake completed without the early data: the connection is still usable.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&hello).await.unwrap();
        assert!(within(STEP_DEADLINE, "server hello", recv.read(&mut buf)).await.unwrap().is_some());
    })
    .await
}

/// A client session store that records the tickets the broker issues and, once told
/// to, hands them out doctored to allow early data.
#[derive(Debug, Default)]
struct Tickets {
    inner: std::sync::Mutex<Option<rustls::client::ClientSessionMemoryCache>>,
    /// `max_early_data_size` of each ticket issued.
    issued: std::sync::Mutex<Vec<u32>>,
    taken: std::sync::atomic::AtomicUsize,
    allow: std::sync::atomic::AtomicBool,
}

impl Tickets {
    fn with<T>(&self, f: impl FnOnce(&rustls::client::ClientSessionMemoryCache) -> T) -> T {
        let mut inner = self.inner.lock().unwrap();
        f(inner.get_or_insert_with(|| rustls::client::ClientSessionMemoryCache::new(32)))
    }

    fn issued(&self) -> Vec<u32> {
        self.issued.lock().unwrap().clone()
    }

    fn taken(&self) -> usize {
        self.taken.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn allow_early_data(&self) {
        self.allow.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl rustls::client::ClientSessionStore for Tickets {
    fn set_kx_hint(&self, name: rustls::pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.with(|c| c.set_kx_hint(name, group))
    }

    fn kx_hint(&self, name: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.with(|c| c.kx_hint(name))
    }

    fn set_tls12_session(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.with(|c| c.set_tls12_session(name, value))
    }

    fn tls12_session(
        &self,
        name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.with(|c| c.tls12_session(name))
    }

    fn remove_tls12_session(&self, name: &rustls::pki_types::ServerName<'static>) {
        self.with(|c| c.remove_tls12_session(name))
    }

    fn insert_tls13_ticket(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.issued.lock().unwrap().push(value.max_early_data_size());
        self.with(|c| c.insert_tls13_ticket(name, value))
    }

    fn take_tls13_ticket(
        &self,
        name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let mut ticket = self.with(|c| c.take_tls13_ticket(name))?;
        self.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.allow.load(std::sync::atomic::Ordering::SeqCst) {
            // QUIC allows early data only with this exact value (RFC 9001 section 4.6.1).
            ticket._private_set_max_early_data_size(u32::MAX);
        }
        Some(ticket)
    }
}

/// PROTOCOL.md section 9: when the broker closes an established session, the close
/// reason is the code's name. Before, a shutdown said "broker shutting down" or
/// "session closed", and a revocation "session closed", depending on which path got
/// there first (an attacker's fuzzing with aioquic noticed).
#[tokio::test]
async fn an_established_sessions_close_reason_is_its_codes_name() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (laptop, _) = tb.register("alice").await;
        let (_phone, phone_id) = tb.login("alice").await;
        let reason = |conn: &quinn::Connection| match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(close)) => {
                (ErrorCode(close.error_code.into_inner() as u16), String::from_utf8_lossy(&close.reason).into_owned())
            }
            other => panic!("{other:?}"),
        };
        let revoked = tb.connector().connect_raw(&phone_id).await.unwrap();
        laptop.revoke_other_device(phone_id.device_id, tb.password).await.unwrap();
        closed_with(&revoked.conn).await;
        assert_eq!(reason(&revoked.conn), (ErrorCode::DEVICE_REVOKED, "DEVICE_REVOKED".into()));
        let (_, alice_id) = tb.login("alice").await;
        let raws = [
            tb.connector().connect_raw(&alice_id).await.unwrap(),
            tb.connector().connect_raw(&alice_id).await.unwrap(),
            tb.connector().connect_raw(&alice_id).await.unwrap(),
        ];
        tb.stop().await;
        for raw in &raws {
            closed_with(&raw.conn).await;
            assert_eq!(reason(&raw.conn), (ErrorCode::GOING_AWAY, "GOING_AWAY".into()));
        }
    })
    .await
}
