//! Bad input ends only the offending connection, with a stable code; others keep going.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_client::{Client, ClientError, RawSession};
use switchboard_protocol::frame::write_varint;
use switchboard_protocol::{ErrorCode, encode_frame};
use switchboard_tests::{TestBroker, next_entry};

/// A bare QUIC connection to the broker with the control stream opened: no hello yet.
async fn bare(tb: &TestBroker) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let addr = tb.broker.as_ref().unwrap().local_addr;
    let conn = tb.connector().endpoint().connect(addr, "localhost").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    (conn, send, recv)
}

/// Waits for the broker to close `conn` and returns its close code.
async fn closed_with(conn: &quinn::Connection) -> Option<ErrorCode> {
    let err = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("broker closes the connection");
    ClientError::from(err).code()
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
    check_hostile(&[0x05, 0xff, 0xfe, 0xfd, 0xfc, 0xfb], ErrorCode::BAD_FRAME).await;
}

#[tokio::test]
async fn oversized_frame_is_refused_before_its_body() {
    let mut prefix = [0u8; 5];
    let n = write_varint(512 * 1024 * 1024, &mut prefix);
    // Only the prefix is sent: the broker must not wait for (or allocate) 512 MiB.
    check_hostile(&prefix[..n], ErrorCode::FRAME_TOO_LARGE).await;
}

#[tokio::test]
async fn unknown_request_closes_with_bad_frame() {
    // Length 4; ClientFrame::Request (0), id 1, request tag 200: no such request.
    check_hostile(&[0x04, 0x00, 0x01, 0xc8, 0x01], ErrorCode::BAD_FRAME).await;
}

#[tokio::test]
async fn silent_connection_hits_the_auth_deadline() {
    let tb = TestBroker::start().await;
    let (conn, _send, _recv) = bare(&tb).await;
    // Say nothing: the stream is not even visible to the broker until it carries data,
    // so the deadline covers that too.
    assert_eq!(closed_with(&conn).await, Some(ErrorCode::TIMEOUT));
}

#[tokio::test]
async fn preauth_frames_are_capped_at_4_kib() {
    let tb = TestBroker::start().await;
    let (conn, mut send, _recv) = bare(&tb).await;
    let hello = switchboard_protocol::ClientHello { magic: *b"SWBD", version: 1, agent: "x".repeat(5000) };
    send.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
    assert_eq!(closed_with(&conn).await, Some(ErrorCode::FRAME_TOO_LARGE));
}

#[tokio::test]
async fn wrong_version_is_refused() {
    let tb = TestBroker::start().await;
    let (conn, mut send, _recv) = bare(&tb).await;
    let hello = switchboard_protocol::ClientHello { magic: *b"SWBD", version: 99, agent: "future".into() };
    send.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
    assert_eq!(closed_with(&conn).await, Some(ErrorCode::UNSUPPORTED_VERSION));
}

#[tokio::test]
async fn a_device_that_stops_reading_is_cut_off_as_slow_consumer() {
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
        for r in batch.join_all().await {
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
    // Bob, who reads, got every one of them and is still connected.
    still_chatting(&tb, &alice, &mut bob_events, conv).await;
}

#[tokio::test]
async fn zero_rtt_is_refused() {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
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
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));

    // First connection: full handshake, the client stores a session ticket.
    let first = endpoint.connect(broker.local_addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = first.open_bi().await.unwrap();
    let hello = switchboard_protocol::ClientHello { magic: *b"SWBD", version: 1, agent: "0rtt".into() };
    send.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
    let mut buf = [0u8; 64];
    let _ = recv.read(&mut buf).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.close(0u32.into(), b"");

    // Second connection: the broker never accepts early data, so 0-RTT is not offered.
    let connecting = endpoint.connect(broker.local_addr, "localhost").unwrap();
    match connecting.into_0rtt() {
        Err(connecting) => {
            connecting.await.unwrap();
        }
        Ok((conn, accepted)) => {
            // If a ticket allowed sending early, the broker must reject the early data.
            assert!(!accepted.await, "broker accepted 0-RTT data");
            drop(conn);
        }
    }
}
