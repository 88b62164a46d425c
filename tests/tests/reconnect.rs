//! The client's `Session` across connection drops and broker restarts, against a real
//! broker: writes outstanding at a drop land exactly once, requests made while
//! disconnected are sent after the reconnect, and a revoked device stops for good.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchboard_broker::pauses::Point;
use switchboard_broker::{Broker, Config};
use switchboard_client::{
    ClientError, Identity, MemoryCursors, Session, SessionConfig, SessionEvent, SessionEvents, TransportOptions,
};
use switchboard_protocol::{Body, ErrorCode, Page, Settings, UserId};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, wait_for, within};

fn config() -> SessionConfig {
    SessionConfig { backoff_min_ms: 20, backoff_max_ms: 200, ..SessionConfig::default() }
}

fn start(tb: &TestBroker, identity: &Identity) -> (Session, SessionEvents) {
    Session::start(tb.connector(), identity.clone(), Arc::new(MemoryCursors::default()), config()).unwrap()
}

fn kick(tb: &TestBroker, user: UserId) {
    for s in tb.shared().online.sessions(user).into_iter().flat_map(|l| l.to_vec()) {
        s.out.close(ErrorCode::GOING_AWAY);
    }
}

/// Writes with a client id answered `INTERNAL` (their conversation's actor failed with
/// them in flight) are sent again by the session with the same id, so each lands once
/// and its caller is told its seq; before, the caller got `INTERNAL` for writes that
/// may have landed, with no id to retry with (a retry of its own wrote them twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_in_flight_when_their_conversation_actor_fails_land_once_and_succeed() {
    bounded(async {
        const SENT: usize = 200;
        let tb = TestBroker::start().await;
        let (alice_client, alice) = tb.register("alice").await;
        tb.register("bob").await;
        let conv = alice_client.create_group("g", &["bob".into()]).await.unwrap().id;
        let (session, _events) = start(&tb, &alice);
        let session = Arc::new(session);
        assert_eq!(session.send(conv, "warm up").await.unwrap(), 2);
        let done = Arc::new(AtomicUsize::new(0));
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..SENT {
            let (session, done) = (session.clone(), done.clone());
            sends.spawn(async move {
                let sent = session.send(conv, &format!("m{i}")).await;
                done.fetch_add(1, Ordering::SeqCst);
                sent
            });
        }
        // Killed once the first answers are back: the rest are queued, applied or
        // waiting for their commit.
        within(STEP_DEADLINE, "the first 20 answers", async {
            while done.load(Ordering::SeqCst) < 20 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(tb.shared().convs.kill(conv), "the conversation actor was live");
        let answers = within(STEP_DEADLINE * 3, "every send answered", sends.join_all()).await;
        let seqs: BTreeSet<u64> = answers.into_iter().map(|a| a.expect("every send succeeds")).collect();
        assert_eq!(seqs.len(), SENT, "each send has a seq of its own");
        let (page, _) = alice_client.history(conv, Page::After(2), 500).await.unwrap();
        let texts: BTreeSet<String> = page
            .iter()
            .filter_map(|e| match &e.body {
                Body::Text { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect();
        assert_eq!((page.len(), texts.len()), (SENT, SENT), "each message written once");
    })
    .await
}

/// Starts the stopped broker again on `addr`, where its clients look for it.
async fn start_again_at(tb: &mut TestBroker, addr: std::net::SocketAddr) {
    let config = Config { listen: addr, ..switchboard_tests::test_config(tb.data_dir()) };
    tb.broker = Some(start_on_a_freed_port(config).await);
}

/// Starts a broker on `config.listen`, a port a broker just shut down was using: its
/// socket is released when its endpoint's last connection is gone, which may be a
/// moment after `shutdown` returned (a client reconnecting meanwhile holds one in its
/// handshake; a flaky `AddrInUse` in CI's `reconnect`), so a bind refused for that is
/// tried again.
async fn start_on_a_freed_port(config: Config) -> Broker {
    within(STEP_DEADLINE, "broker start on a freed port", async {
        loop {
            match Broker::start(config.clone()).await {
                Ok(broker) => return broker,
                Err(switchboard_broker::error::Error::Io { error, .. })
                    if error.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await
}

/// 200 sends are outstanding when the broker drops the connection: each is sent again
/// with its client id after the reconnect, and each text is in the log exactly once,
/// at the seq its caller was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_outstanding_at_a_drop_land_exactly_once() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice_client, alice) = tb.register("alice").await;
        let (bob_client, _) = tb.register("bob").await;
        let conv = alice_client.create_group("plans", &["bob".into()]).await.unwrap().id;
        let (session, mut events) = start(&tb, &alice);
        wait_for(&mut events, "connected", |e| matches!(e, SessionEvent::Connected)).await;

        let acked = Arc::new(AtomicUsize::new(0));
        let sends: Vec<_> = (0..200)
            .map(|i| {
                let (session, acked) = (session.clone(), acked.clone());
                tokio::spawn(async move {
                    let seq = session.send(conv, &format!("m{i}")).await.unwrap();
                    acked.fetch_add(1, Ordering::Relaxed);
                    (i, seq)
                })
            })
            .collect();
        within(STEP_DEADLINE, "the first ack", async {
            while acked.load(Ordering::Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        kick(&tb, alice.user_id);
        let at_drop = acked.load(Ordering::Relaxed);
        assert!(at_drop < 200, "sends were outstanding at the drop");

        let mut seqs = HashMap::new();
        for s in sends {
            let (i, seq) = within(STEP_DEADLINE * 3, "a retried send", s).await.unwrap();
            seqs.insert(seq, format!("m{i}"));
        }
        assert_eq!(seqs.len(), 200, "every send got its own seq");
        let (entries, last) = bob_client.history(conv, Page::After(1), 200).await.unwrap();
        assert_eq!(last, 201, "created + 200, nothing twice");
        assert_eq!(entries.len(), 200);
        for e in &entries {
            match &e.body {
                Body::Text { text, .. } => assert_eq!(seqs.get(&e.seq), Some(text), "seq {}", e.seq),
                other => panic!("unexpected {other:?}"),
            }
        }
        wait_for(&mut events, "the disconnect", |e| matches!(e, SessionEvent::Disconnected { .. })).await;
        session.close().await;
    })
    .await;
}

/// The broker stops and starts again on the same address: the session reconnects by
/// itself, a send made while it was down lands once the broker is back, and what was
/// written meanwhile arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_is_survived() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice_client, alice) = tb.register("alice").await;
        let (bob_client, bob) = tb.register("bob").await;
        drop(bob_client);
        let conv = alice_client.create_group("plans", &["bob".into()]).await.unwrap().id;
        drop(alice_client);
        let (bob_session, mut bob_events) = start(&tb, &bob);
        wait_for(&mut bob_events, "bob's catch-up", |e| matches!(e, SessionEvent::Entry(x) if x.seq == 1)).await;

        let addr = tb.broker.as_ref().unwrap().local_addr;
        tb.stop().await;
        wait_for(&mut bob_events, "the disconnect", |e| matches!(e, SessionEvent::Disconnected { .. })).await;
        // Made while the broker is down: waits for the reconnect.
        let pending = {
            let s = bob_session.clone();
            tokio::spawn(async move { s.send(conv, "sent while down").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        start_again_at(&mut tb, addr).await;

        let seq = within(STEP_DEADLINE, "the send after the restart", pending).await.unwrap().unwrap();
        assert_eq!(seq, 2);
        let alice_client = within(STEP_DEADLINE, "alice", tb.connector().connect(&alice)).await.unwrap();
        let seq3 = alice_client.send(conv, "after the restart").await.unwrap();
        let mut got = Vec::new();
        within(STEP_DEADLINE, "both entries", async {
            while got.last() != Some(&seq3) {
                if let Some(SessionEvent::Entry(e)) = bob_events.next().await {
                    got.push(e.seq);
                }
            }
        })
        .await;
        assert_eq!(got, [2, 3], "my own send, then alice's, once each");
        bob_session.close().await;
    })
    .await;
}

/// After the broker says it is going away, reconnect attempts come at most
/// `RESTART_RETRY_MAX_MS` apart however many fail meanwhile, so devices are back about
/// as soon as the broker is (before, the backoff kept doubling to its 10 s bound while
/// the restart refused attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_going_away_reconnects_stay_close_together() {
    use switchboard_client::RESTART_RETRY_MAX_MS;
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (_, bob) = tb.register("bob").await;
        // Attempts fail fast while the broker is down, so many fail in a short restart.
        let config = SessionConfig { backoff_min_ms: 100, backoff_max_ms: 10_000, connect_timeout_ms: 150, ..config() };
        let (session, mut events) =
            Session::start(tb.connector(), bob.clone(), Arc::new(MemoryCursors::default()), config).unwrap();
        wait_for(&mut events, "connected", |e| matches!(e, SessionEvent::Connected)).await;
        let addr = tb.broker.as_ref().unwrap().local_addr;
        tb.stop().await;
        // Six failed attempts: the uncapped backoff would be at 3.2–6.4 s by then.
        let mut delays = Vec::new();
        within(STEP_DEADLINE * 3, "six reconnect attempts", async {
            while delays.len() < 6 {
                if let Some(SessionEvent::Disconnected { retry_in_ms, .. }) = events.next().await {
                    delays.push(retry_in_ms);
                }
            }
        })
        .await;
        assert!(delays.iter().all(|&d| d <= RESTART_RETRY_MAX_MS), "{delays:?}");
        start_again_at(&mut tb, addr).await;
        wait_for(&mut events, "reconnected", |e| matches!(e, SessionEvent::Connected)).await;
        session.close().await;
    })
    .await;
}

/// A device revoked from another device: its session says why and its stream ends,
/// with no reconnect attempt after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_stops_for_good() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (laptop, _) = tb.register("bob").await;
        let (phone_client, phone) = tb.login("bob").await;
        drop(phone_client);
        let (session, mut events) = start(&tb, &phone);
        wait_for(&mut events, "connected", |e| matches!(e, SessionEvent::Connected)).await;
        laptop.revoke_other_device(phone.device_id, tb.password).await.unwrap();
        let mut stopped = None;
        within(STEP_DEADLINE, "the end of the stream", async {
            while let Some(event) = events.next().await {
                match event {
                    SessionEvent::Stopped(e) => stopped = e.code(),
                    SessionEvent::Connected => panic!("reconnected after the revocation"),
                    _ => {}
                }
            }
        })
        .await;
        assert_eq!(stopped, Some(ErrorCode::DEVICE_REVOKED));
        assert!(matches!(session.send(1, "x").await, Err(switchboard_client::SessionError::Stopped)));
    })
    .await;
}

/// Requests beyond the pending bound fail at once instead of queueing without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_are_bounded() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (_, alice) = tb.register("alice").await;
        // Nothing listens here: the session stays disconnected and queues.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let connector = switchboard_client::Connector::new(
            socket.local_addr().unwrap(),
            "localhost",
            switchboard_client::Trust::CaFile(tb.broker.as_ref().unwrap().cert_path.clone()),
        )
        .unwrap();
        let config = SessionConfig { max_pending: 4, connect_timeout_ms: 200, ..config() };
        let (session, _events) = Session::start(connector, alice, Arc::new(MemoryCursors::default()), config).unwrap();
        let queued: Vec<_> = (0..4)
            .map(|_| {
                let s = session.clone();
                tokio::spawn(async move { s.send(1, "x").await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = session.send(1, "one too many").await;
        assert!(matches!(refused, Err(switchboard_client::SessionError::Busy)), "{refused:?}");
        session.close().await;
        let mut outcomes = BTreeSet::new();
        for q in queued {
            outcomes.insert(format!("{:?}", q.await.unwrap()));
        }
        assert_eq!(outcomes, BTreeSet::from(["Err(Stopped)".to_owned()]), "closing fails what still waits");
    })
    .await;
}

/// A write the broker refused with `OVERLOADED` waits out a backoff that doubles with
/// each refusal; a new connection sends it at once instead of at the end of that
/// backoff (the new broker may well take it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_its_overload_backoff_is_sent_at_once_on_a_new_connection() {
    bounded(async {
        // Every write is refused.
        let tb = TestBroker::start_with(|c| {
            c.max_sends_in_flight = 0;
            c.send_delay_target_ms = 0;
        })
        .await;
        let (alice_client, alice) = tb.register("alice").await;
        tb.register("bob").await;
        let conv = alice_client.create_direct("bob").await.unwrap().id;
        // Refusal k waits a backoff in [250 * 2^(k-1), 500 * 2^(k-1)] ms; reconnects
        // after a connection was up wait at most 500 ms.
        let config = SessionConfig { backoff_min_ms: 500, backoff_max_ms: 60_000, overload_retries: 100, ..config() };
        let (session, mut events) =
            Session::start(tb.connector(), alice.clone(), Arc::new(MemoryCursors::default()), config).unwrap();
        wait_for(&mut events, "the first connect", |e| matches!(e, SessionEvent::Connected)).await;
        let write = {
            let s = session.clone();
            tokio::spawn(async move { s.send(conv, "refused, again and again").await })
        };
        let refusals = |n: u64| {
            let shared = tb.shared().clone();
            async move {
                while shared.sends.refused() < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        // After the fifth refusal the write waits at least 4 s before its sixth send; a
        // reconnect (at most 500 ms, then a handshake) takes far less, even in a debug
        // build on a loaded machine.
        within(2 * STEP_DEADLINE, "five refusals (backoffs of up to 7.5 s)", refusals(5)).await;
        let kicked = std::time::Instant::now();
        kick(&tb, alice.user_id);
        within(STEP_DEADLINE, "the sixth send", refusals(6)).await;
        let resent = kicked.elapsed();
        assert!(resent < Duration::from_millis(3000), "sent {resent:?} after the drop: it waited out its backoff");
        write.abort();
    })
    .await;
}

/// The connection ids of a QUIC packet's header: `(destination, source)` for a long
/// header, `None` for a short one (its destination id has no length on the wire).
fn long_header_ids(datagram: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    if datagram.first()? & 0x80 == 0 {
        return None;
    }
    let dcid_len = *datagram.get(5)? as usize;
    let dcid = datagram.get(6..6 + dcid_len)?.to_vec();
    let scid_len = *datagram.get(6 + dcid_len)? as usize;
    let scid = datagram.get(7 + dcid_len..7 + dcid_len + scid_len)?.to_vec();
    Some((dcid, scid))
}

/// Whether a datagram belongs to the connection whose ids are `ids` (as its destination).
fn addressed_to(datagram: &[u8], ids: &[Vec<u8>]) -> bool {
    match long_header_ids(datagram) {
        Some((dcid, _)) => ids.contains(&dcid),
        None => ids.iter().any(|id| !id.is_empty() && datagram.get(1..).is_some_and(|d| d.starts_with(id))),
    }
}

/// A UDP relay in front of `broker` that plays a broker restart in the middle of the
/// first handshake through it: it relays the client's first Initial and the broker's
/// first answer, then drops every later packet of that connection both ways, as a
/// restarted broker that never heard of it would. Connections begun after it pass.
async fn restart_mid_handshake_relay(broker: std::net::SocketAddr) -> std::net::SocketAddr {
    let outside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let inside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    inside.connect(broker).await.unwrap();
    let addr = outside.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut client, mut first) = (None, None::<(Vec<u8>, Vec<u8>)>);
        let (mut to_broker, mut to_client): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (Vec::new(), Vec::new());
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                Ok((n, from)) = outside.recv_from(&mut up) => {
                    client = Some(from);
                    let d = &up[..n];
                    if first.is_none() && let Some((dcid, scid)) = long_header_ids(d) {
                        first = Some((dcid.clone(), scid.clone()));
                        to_broker.push(dcid);
                        to_client.push(scid);
                    } else if to_broker.len() > 1 && addressed_to(d, &to_broker) {
                        continue;
                    }
                    let _ = inside.send(d).await;
                }
                Ok(n) = inside.recv(&mut down) => {
                    let d = &down[..n];
                    if to_broker.len() > 1 && addressed_to(d, &to_client) {
                        continue;
                    }
                    if to_broker.len() == 1 && let Some((dcid, scid)) = long_header_ids(d) && to_client.contains(&dcid) {
                        // The broker's first answer goes through; the "restart" is now.
                        to_broker.push(scid);
                    }
                    if let Some(c) = client {
                        let _ = outside.send_to(d, c).await;
                    }
                }
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_connect_caught_in_a_broker_restart_mid_handshake_starts_afresh() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (_alice, identity) = tb.register("alice").await;
        let b = tb.broker.as_ref().unwrap();
        let relay = restart_mid_handshake_relay(b.local_addr).await;
        let options =
            switchboard_client::TransportOptions { connect_timeout: Duration::from_secs(8), ..Default::default() };
        let trust = switchboard_client::Trust::CaFile(b.cert_path.clone());
        let connector = switchboard_client::Connector::with_transport(relay, "localhost", trust, &options).unwrap();
        let started = std::time::Instant::now();
        // Before, the first attempt waited out the whole connect timeout and failed.
        let client = connector.connect(&identity).await.unwrap();
        let took = started.elapsed();
        assert!(took >= switchboard_client::FRESH_ATTEMPT_AFTER, "the first attempt was the one cut off: {took:?}");
        client.ping().await.unwrap();
    })
    .await
}

/// A session that has connected keeps trying when a certificate it does not trust
/// answers at the broker's address (anyone on the path can answer a handshake first, or
/// another server took the port), saying so in `Disconnected`, and resumes once its
/// broker is back (before: the first refused certificate stopped it for good). A
/// session that never connected stops at once: its trust is wrong, not the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_stops_only_a_session_that_never_connected() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (_, alice) = tb.register("alice").await;
        let (_session, mut events) = start(&tb, &alice);
        wait_for(&mut events, "the first connection", |e| matches!(e, SessionEvent::Connected)).await;
        let addr = tb.broker.as_ref().unwrap().local_addr;
        tb.stop().await;
        // Another broker (its own certificate) at the same address.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Config { listen: addr, ..switchboard_tests::test_config(other_dir.path().join("data")) };
        let impostor = start_on_a_freed_port(other).await;
        wait_for(
            &mut events,
            "a refused certificate",
            |e| matches!(e, SessionEvent::Disconnected { error, .. } if error.to_string().contains("not trusted")),
        )
        .await;
        within(STEP_DEADLINE, "impostor shutdown", impostor.shutdown()).await.unwrap();
        start_again_at(&mut tb, addr).await;
        wait_for(&mut events, "the reconnect", |e| matches!(e, SessionEvent::Connected)).await;

        // A new session pointed at the impostor's certificate never connected: it stops.
        let wrong = switchboard_client::Connector::new(
            addr,
            "localhost",
            switchboard_client::Trust::CaFile(other_dir.path().join("data/cert.pem")),
        )
        .unwrap();
        let (_stopped, mut events) =
            Session::start(wrong, alice.clone(), Arc::new(MemoryCursors::default()), config()).unwrap();
        wait_for(
            &mut events,
            "the stop",
            |e| matches!(e, SessionEvent::Stopped(error) if error.to_string().contains("not trusted")),
        )
        .await;
    })
    .await
}

/// A typing indicator a `Session` handed on is stopped when its connection ends: the
/// broker forgets indicators when it restarts, and a stop pushed while the device was
/// away is not sent again. Before, `sb tail` showed a typist typing for good after a
/// broker restart (a new user's trial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_shown_is_stopped_when_the_connection_ends() {
    bounded(async {
        // An indicator that does not expire within the test: no stop comes from the broker.
        let tb = TestBroker::start_with(|c| c.typing_ttl_ms = 120_000).await;
        let (alice_client, _) = tb.register("alice").await;
        let (bob_client, bob) = tb.register("bob").await;
        drop(bob_client);
        let conv = alice_client.create_group("plans", &["bob".into()]).await.unwrap().id;
        let (bob_session, mut bob_events) = start(&tb, &bob);
        wait_for(&mut bob_events, "bob's catch-up", |e| matches!(e, SessionEvent::CaughtUp)).await;

        alice_client.typing(conv, true).await.unwrap();
        let alice = alice_client.user_id;
        let typing = |on: bool| move |e: &SessionEvent| matches!(e, SessionEvent::Typing { conv: c, user, typing } if *c == conv && *user == alice && *typing == on);
        wait_for(&mut bob_events, "alice typing", typing(true)).await;
        kick(&tb, bob.user_id);
        // Both the stop and the disconnect are told (the stop first); alice is still
        // typing as far as the broker knows, so it pushes no stop.
        let (mut stopped, mut disconnected) = (false, false);
        within(STEP_DEADLINE, "the stop and the disconnect", async {
            while !(stopped && disconnected) {
                let event = bob_events.next().await.unwrap();
                stopped |= typing(false)(&event);
                disconnected |= matches!(event, SessionEvent::Disconnected { .. });
            }
        })
        .await;
        wait_for(&mut bob_events, "the reconnect", |e| matches!(e, SessionEvent::CaughtUp)).await;
        // A message ends its sender's indicator (no stop is pushed for it): not stopped
        // again at the next disconnect (before, it stayed tracked as shown, and such
        // typists filled the Session's bound of shown indicators).
        alice_client.typing(conv, false).await.unwrap();
        // Past the window in which a start after a stop is taken for a reordered one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        alice_client.typing(conv, true).await.unwrap();
        wait_for(&mut bob_events, "alice typing again", typing(true)).await;
        alice_client.send(conv, "done typing").await.unwrap();
        wait_for(&mut bob_events, "her message", |e| matches!(e, SessionEvent::Entry(x) if x.sender == alice)).await;
        kick(&tb, bob.user_id);
        within(STEP_DEADLINE, "the second disconnect and reconnect", async {
            loop {
                match bob_events.next().await.unwrap() {
                    SessionEvent::Typing { .. } => panic!("a stop for an indicator her message ended"),
                    SessionEvent::CaughtUp => break,
                    _ => {}
                }
            }
        })
        .await;
        bob_session.close().await;
    })
    .await;
}

/// A connector whose requests wait at most 300 ms for their answers.
fn impatient(tb: &TestBroker) -> switchboard_client::Connector {
    tb.connector_with(&TransportOptions { request_timeout: Duration::from_millis(300), ..TransportOptions::default() })
}

/// The settings `a_settings_change_held` asks for.
const PRIVATE: Settings = Settings { read_receipts_private: true };

/// Alice connected with the impatient connector, her `Settings` change (to `PRIVATE`)
/// held by the broker at `Point::Settings`: the connection, the hold and the change's
/// answer to come.
async fn a_settings_change_held(
    tb: &TestBroker,
    alice: &Identity,
) -> (
    Arc<switchboard_client::Client>,
    switchboard_broker::pauses::Held,
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Settings, ClientError>> + Send>>,
) {
    let client = Arc::new(within(STEP_DEADLINE, "connect", impatient(tb).connect(alice)).await.unwrap());
    let mut held = tb.shared().pauses.arm(Point::Settings);
    let asking = client.clone();
    let mut asked: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(async move { asking.settings(Some(PRIVATE)).await });
    tokio::select! {
        () = held.reached() => {}
        answered = &mut asked => panic!("answered while held: {answered:?}"),
    }
    (client, held, asked)
}

/// A request the broker holds and never answers fails once the request timeout has
/// passed, as a lost connection (`Closed` with no code), and the connection is closed,
/// so what retries lost connections retries it; before, the caller waited for ever on a
/// live connection (keep-alives kept it open). A new connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_broker_never_answers_fails_as_a_lost_connection() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (_, alice) = tb.register("alice").await;
        let started = std::time::Instant::now();
        let (client, held, asked) = a_settings_change_held(&tb, &alice).await;
        let failed = within(STEP_DEADLINE, "the unanswered request", asked).await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300), "failed before its timeout: {failed:?}");
        match &failed {
            ClientError::Closed { code: None, reason } => {
                assert!(reason.contains("sent nothing for 0.3 s"), "{reason}")
            }
            other => panic!("expected a lost connection, got {other:?}"),
        }
        within(STEP_DEADLINE, "the close", client.closed()).await;
        assert!(client.ping().await.is_err(), "the connection stayed usable");
        held.release();
        let again = within(STEP_DEADLINE, "connect again", impatient(&tb).connect(&alice)).await.unwrap();
        assert!(again.ping().await.is_ok());
    })
    .await
}

/// The deadline is silence, not the answer's time: a request held four times as long
/// as it while the connection keeps carrying events (bob writing to alice) is answered
/// on the same connection. A deadline on the answer's own time fired on healthy slow
/// links, where answers wait behind pages and events (a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_held_while_the_stream_keeps_moving_is_waited_for() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (_, alice) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = bob.create_direct("alice").await.unwrap().id;
        let (client, held, asked) = a_settings_change_held(&tb, &alice).await;
        let writing = async {
            for _ in 0..24 {
                bob.send(conv, "still here").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            held.release();
        };
        let (answered, ()) = tokio::join!(asked, writing);
        assert_eq!(answered.unwrap(), PRIVATE);
        assert!(client.ping().await.is_ok(), "the connection was closed");
    })
    .await
}

/// A `Send` the broker holds (its conversation's actor was being started) is given up
/// by the session after the request timeout, sent again with the same client id on a
/// new connection, and lands once; the caller is told its seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_the_broker_never_answers_is_sent_again_on_a_new_connection_and_lands_once() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice_client, alice) = tb.register("alice").await;
        let (_bob, _) = tb.register("bob").await;
        let conv = alice_client.create_direct("bob").await.unwrap().id;
        drop(alice_client);
        // After a restart no conversation actor is live: the send starts one.
        tb.restart().await;
        let mut held = tb.shared().pauses.arm(Point::ConversationStarted);
        let (session, mut events) =
            Session::start(impatient(&tb), alice.clone(), Arc::new(MemoryCursors::default()), config()).unwrap();
        wait_for(&mut events, "connected", |e| matches!(e, SessionEvent::Connected)).await;
        let send = session.send(conv, "hello");
        tokio::pin!(send);
        tokio::select! {
            () = held.reached() => {}
            sent = &mut send => panic!("sent while held: {sent:?}"),
        }
        let seq = within(STEP_DEADLINE, "the send on a new connection", send).await.unwrap();
        held.release();
        let reader = tb.connector().connect(&alice).await.unwrap();
        let (entries, last) = reader.history(conv, Page::Latest, 50).await.unwrap();
        let hellos: Vec<_> = entries
            .iter()
            .filter(|e| matches!(&e.body, Body::Text { text, .. } if text == "hello"))
            .map(|e| e.seq)
            .collect();
        assert_eq!(hellos, vec![seq], "the held send and its resend landed as {hellos:?}");
        assert_eq!(last, seq);
        session.close().await;
    })
    .await
}

/// A contact shown online who then blocks me is told gone at the next connect
/// (`SessionEvent::PresenceGone`): the snapshot leaves it out. Before, the session handed
/// on nothing for it, and the application showed it online for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_who_blocks_me_is_told_gone_at_the_next_connect() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        alice.create_direct("bob").await.unwrap();
        let (session, mut events) = start(&tb, &alice_id);
        within(STEP_DEADLINE, "bob shown online", async {
            loop {
                match events.next().await {
                    Some(SessionEvent::Presence(p)) if p.user == bob_id.user_id => {
                        if p.state == switchboard_protocol::PresenceState::Online {
                            return;
                        }
                    }
                    Some(_) => continue,
                    None => panic!("the session ended"),
                }
            }
        })
        .await;
        bob.block("alice", true).await.unwrap();
        kick(&tb, alice_id.user_id);
        within(STEP_DEADLINE, "bob told gone", async {
            loop {
                match events.next().await {
                    Some(SessionEvent::PresenceGone { user, name }) => {
                        assert_eq!((user, name.as_str()), (bob_id.user_id, "bob"));
                        return;
                    }
                    Some(SessionEvent::Presence(p)) if p.user == bob_id.user_id => panic!("bob shown: {p:?}"),
                    Some(_) => continue,
                    None => panic!("the session ended"),
                }
            }
        })
        .await;
        session.close().await;
    })
    .await
}
