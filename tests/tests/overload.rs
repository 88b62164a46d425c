//! Overload degrades, it does not collapse (issue 10; PROTOCOL.md section 9,
//! `OVERLOADED`): past the broker's bound of message writes in flight, new writes are
//! refused at once and take no effect; everything acknowledged is stored and delivered;
//! reads and other clients' connections carry on; capacity returns once the writes in
//! flight are answered. Likewise while the UDP socket keeps a queue (a flood): writes
//! are refused until it drains.
//!
//! Runs on `#[tokio::test]`'s single-threaded runtime: the session dispatches a
//! pipelined burst before any conversation actor or commit runs, so "the first writes
//! are still in flight" is a fact rather than a race (as in `bounds.rs`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use switchboard_client::{MemoryCursors, Session, SessionConfig};
use switchboard_protocol::{Body, ErrorCode, Page, Reply, RequestBody, Role};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, next_entry, next_response, request_frame, within};

const BOUND: usize = 3;

#[tokio::test]
async fn writes_past_the_bound_are_refused_at_once_and_nothing_acknowledged_is_lost() {
    bounded(async {
        // Only the in-flight bound: the delay rule is off, so the test does not depend
        // on how fast this machine commits.
        let tb = TestBroker::start_with(|c| {
            c.max_sends_in_flight = BOUND;
            c.send_delay_target_ms = 0;
        })
        .await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, carol_id) = tb.register("carol").await;
        let conv = alice.create_direct("bob").await.unwrap().id;
        let quiet = carol.create_group("quiet", &[]).await.unwrap().id;
        carol.send(quiet, "before").await.unwrap();
        let mut bob_events = bob.events().unwrap();

        // A burst of 20 sends in one write, and beside it another client's read and ping.
        let mut raw = tb.connector().connect_raw(&alice_id).await.unwrap();
        let mut carol_raw = tb.connector().connect_raw(&carol_id).await.unwrap();
        let client_id = |i: u32| [i as u8 + 1; 16];
        let burst: Vec<Bytes> = (0..20u32)
            .map(|i| request_frame(i, RequestBody::Send { conv, client_id: client_id(i), text: format!("m{i}") }))
            .collect();
        let bytes: Vec<u8> = burst.iter().flat_map(|f| f.iter().copied()).collect();
        within(STEP_DEADLINE, "the burst", raw.send.write_all(&bytes)).await.unwrap();
        let side: Vec<u8> = [
            request_frame(1, RequestBody::History { conv: quiet, page: Page::Latest, limit: 10 }),
            request_frame(2, RequestBody::Ping),
        ]
        .iter()
        .flat_map(|f| f.iter().copied())
        .collect();
        within(STEP_DEADLINE, "carol's requests", carol_raw.send.write_all(&side)).await.unwrap();

        let mut acked = BTreeMap::new();
        let mut refused = Vec::new();
        for _ in 0..burst.len() {
            match next_response(&mut raw).await {
                (i, Ok(Reply::Appended { seq, duplicate: false })) => {
                    acked.insert(seq, i);
                }
                (i, Err(e)) if e.code == ErrorCode::OVERLOADED => refused.push(i),
                other => panic!("{other:?}"),
            }
        }
        assert!(acked.len() >= BOUND, "up to the bound every write is admitted: {acked:?}");
        assert!(!refused.is_empty(), "20 pipelined writes past a bound of {BOUND}: none refused");
        assert_eq!(acked.len() + refused.len(), burst.len());

        // Reads are never shed, and the other client was served all along.
        for _ in 0..2 {
            match next_response(&mut carol_raw).await {
                (1, Ok(Reply::History { entries, .. })) => assert_eq!(entries.len(), 2, "creation and one message"),
                (2, Ok(Reply::Pong { .. })) => {}
                other => panic!("carol: {other:?}"),
            }
        }

        // Everything acknowledged is stored, in order, and nothing refused took effect.
        let (entries, _) = alice.history(conv, Page::After(0), 100).await.unwrap();
        let texts: Vec<(u64, String)> = entries
            .iter()
            .filter_map(|e| match &e.body {
                Body::Text { text, .. } => Some((e.seq, text.clone())),
                _ => None,
            })
            .collect();
        let expected: Vec<(u64, String)> = acked.iter().map(|(&seq, i)| (seq, format!("m{i}"))).collect();
        assert_eq!(texts, expected);
        // ... and delivered to the peer, each once, in seq order.
        for (&seq, i) in &acked {
            let mut entry = next_entry(&mut bob_events).await;
            // The conversation's creation (seq 1) reaches bob first.
            while !matches!(entry.body, Body::Text { .. }) {
                entry = next_entry(&mut bob_events).await;
            }
            assert_eq!(entry.seq, seq);
            assert!(matches!(&entry.body, Body::Text { text, .. } if *text == format!("m{i}")), "{entry:?}");
        }

        // Capacity is back: each refused write, sent again with its client id, is stored
        // once (new), and an acknowledged one sent again is the same message.
        for &i in &refused {
            let (_, duplicate) = alice.send_with_id(conv, client_id(i), &format!("m{i}")).await.unwrap();
            assert!(!duplicate, "refused write {i} had been applied");
        }
        let (&seq, &i) = acked.iter().next().unwrap();
        assert_eq!(alice.send_with_id(conv, client_id(i), &format!("m{i}")).await.unwrap(), (seq, true));
        assert_eq!(tb.shared().sends.in_flight(), 0, "every admitted write was answered");
        // The other client sends as before.
        carol.send(quiet, "after").await.unwrap();
    })
    .await
}

/// One user's flood takes at most its share of the writes in flight: another user's
/// write beside it is admitted and applied.
#[tokio::test]
async fn one_users_flood_of_writes_leaves_room_for_another_users_write() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.max_sends_in_flight = 4;
            c.max_sends_in_flight_per_user = 2;
            c.send_delay_target_ms = 0;
        })
        .await;
        let (alice, alice_id) = tb.register("alice").await;
        let (carol, carol_id) = tb.register("carol").await;
        tb.register("bob").await;
        let conv = alice.create_direct("bob").await.unwrap().id;
        let quiet = carol.create_group("quiet", &[]).await.unwrap().id;
        // Alice floods over two connections; carol's one write comes right behind.
        let mut floods = Vec::new();
        for _ in 0..2 {
            floods.push(tb.connector().connect_raw(&alice_id).await.unwrap());
        }
        let mut carol_raw = tb.connector().connect_raw(&carol_id).await.unwrap();
        for (k, raw) in floods.iter_mut().enumerate() {
            let burst: Vec<u8> = (0..20u32)
                .flat_map(|i| {
                    let client_id = [(k as u8) * 32 + i as u8 + 1; 16];
                    request_frame(i, RequestBody::Send { conv, client_id, text: format!("m{i}") }).to_vec()
                })
                .collect();
            within(STEP_DEADLINE, "the flood", raw.send.write_all(&burst)).await.unwrap();
        }
        let write = request_frame(1, RequestBody::Send { conv: quiet, client_id: [99; 16], text: "mine".into() });
        within(STEP_DEADLINE, "carol's write", carol_raw.send.write_all(&write)).await.unwrap();
        match next_response(&mut carol_raw).await {
            (1, Ok(Reply::Appended { duplicate: false, .. })) => {}
            other => panic!("carol's write beside alice's flood: {other:?}"),
        }
        // Alice was refused past her share, and never held more than it.
        let mut refused = 0;
        for raw in &mut floods {
            for _ in 0..20 {
                match next_response(raw).await {
                    (_, Ok(Reply::Appended { .. })) => {}
                    (_, Err(e)) if e.code == ErrorCode::OVERLOADED => refused += 1,
                    other => panic!("{other:?}"),
                }
            }
        }
        assert!(refused > 0, "40 pipelined writes past a share of 2: none refused");
        assert_eq!(tb.shared().sends.in_flight(), 0, "every admitted write was answered");
    })
    .await
}

/// The client library's `Session` rides out shedding: writes the broker refuses with
/// `OVERLOADED` are sent again after a backoff with the same client id, so each is
/// stored exactly once and the caller sees only its seq.
#[tokio::test]
async fn a_session_sends_refused_writes_again_and_each_is_stored_once() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.max_sends_in_flight = 1;
            c.send_delay_target_ms = 0;
        })
        .await;
        let (alice, alice_id) = tb.register("alice").await;
        tb.register("bob").await;
        let conv = alice.create_direct("bob").await.unwrap().id;
        sent_once_through_a_session(&tb, &alice, alice_id, conv, 'm', 20, (5, 50)).await;
        assert!(tb.shared().sends.refused() > 0, "20 concurrent writes past a bound of 1: none refused");
    })
    .await
}

/// Sends `n` messages to `conv` at once through a `Session` of `user` (`client` is one
/// of its connections), backing off `backoff` (min, max ms) after a refusal: each is
/// answered its own seq and stored exactly once (texts `{prefix}0`, `{prefix}1`, ...).
async fn sent_once_through_a_session(
    tb: &TestBroker,
    client: &switchboard_client::Client,
    user: switchboard_client::Identity,
    conv: switchboard_protocol::ConvId,
    prefix: char,
    n: usize,
    (backoff_min_ms, backoff_max_ms): (u64, u64),
) {
    let config = SessionConfig { backoff_min_ms, backoff_max_ms, overload_retries: 50, ..Default::default() };
    let (session, _events) = Session::start(tb.connector(), user, Arc::new(MemoryCursors::default()), config).unwrap();
    let sends = (0..n).map(|i| {
        let session = session.clone();
        async move { session.send(conv, &format!("{prefix}{i}")).await }
    });
    let seqs: Vec<u64> = futures_join_all(sends).await.into_iter().map(Result::unwrap).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), n, "each write has a seq of its own: {seqs:?}");
    let (entries, _) = client.history(conv, Page::Latest, 1000).await.unwrap();
    let mut texts: Vec<String> = entries
        .iter()
        .filter_map(|e| match &e.body {
            Body::Text { text, .. } if text.starts_with(prefix) => Some(text.clone()),
            _ => None,
        })
        .collect();
    texts.sort();
    let mut expected: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    expected.sort();
    assert_eq!(texts, expected, "each write stored exactly once");
}

/// A write refused with `OVERLOADED` whose caller gave up during its backoff is not sent
/// again, and its place among the session's pending requests is free at once.
#[tokio::test]
async fn a_write_whose_caller_gave_up_during_its_backoff_is_dropped_and_frees_its_place() {
    bounded(async {
        // Every write is refused: none may be in flight.
        let tb = TestBroker::start_with(|c| {
            c.max_sends_in_flight = 0;
            c.send_delay_target_ms = 0;
        })
        .await;
        let (alice, alice_id) = tb.register("alice").await;
        tb.register("bob").await;
        let conv = alice.create_direct("bob").await.unwrap().id;
        let config = SessionConfig {
            backoff_min_ms: 100,
            backoff_max_ms: 100,
            overload_retries: 1000,
            max_pending: 1,
            ..Default::default()
        };
        let (session, _events) =
            Session::start(tb.connector(), alice_id, Arc::new(MemoryCursors::default()), config).unwrap();
        // The caller gives up once its write was refused (it is then in its backoff).
        within(STEP_DEADLINE, "the first refusal", async {
            tokio::select! {
                r = session.send(conv, "x") => panic!("answered: {r:?}"),
                () = async {
                    while tb.shared().sends.refused() == 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                } => {}
            }
        })
        .await;
        // Its place is free: the one pending request the session allows goes through.
        assert!(matches!(session.request(RequestBody::Ping).await, Ok(Reply::Pong { .. })));
        // And it is never sent again (three backoffs later, no more refusals).
        let refused = tb.shared().sends.refused();
        tokio::time::sleep(std::time::Duration::from_millis(350)).await;
        assert_eq!(tb.shared().sends.refused(), refused, "the abandoned write was sent again");
    })
    .await
}

/// Membership writes are log entries fanned out like messages, so past saturation they
/// are refused at once like message writes (before, an owner could flip a member's role
/// as fast as it liked while every message was being refused).
#[tokio::test]
async fn membership_writes_pass_the_same_admission_as_messages() {
    bounded(async {
        // Every admitted write is refused: none may be in flight.
        let tb = TestBroker::start_with(|c| {
            c.max_sends_in_flight = 0;
            c.send_delay_target_ms = 0;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        tb.register("carol").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let overloaded = |r: Result<u64, switchboard_client::ClientError>| match r {
            Err(e) => e.code() == Some(ErrorCode::OVERLOADED),
            Ok(seq) => panic!("written at seq {seq}"),
        };
        assert!(overloaded(alice.set_role(conv, bob.user_id, Role::Admin).await));
        assert!(overloaded(alice.add_members(conv, &["carol".into()], Role::Member).await));
        assert!(overloaded(alice.remove_member(conv, bob.user_id).await));
        assert!(overloaded(bob.leave(conv).await));
        let (_, last) = alice.history(conv, Page::After(0), 10).await.unwrap();
        assert_eq!(last, 1, "only the creation was written");
    })
    .await
}

/// Awaits every future (spawned on this runtime, so they run concurrently).
/// A UDP socket kept queued (here by a flood of junk datagrams from another socket) gets
/// the message writes that arrive on it refused at once with `OVERLOADED`, and admits
/// them again once the flood stops and a read finds it empty; every acknowledged write
/// is in the history, no refused one (`socket_backlog_target_ms`, `SocketBacklog`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_kept_queued_refuses_writes_until_it_drains() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.socket_backlog_target_ms = 5).await;
        let (alice, _) = tb.register("alice").await;
        let conv = alice.create_group("busy", &[]).await.unwrap().id;
        alice.send(conv, "before").await.unwrap();
        let broker = tb.broker.as_ref().unwrap().local_addr;
        let stop = Arc::new(AtomicBool::new(false));
        // 1,200-byte datagrams for no connection, as fast as a thread sends them, at most
        // 5 s: faster than the broker reads them, so its socket keeps a queue.
        let flood = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let junk = [0x40u8; 1200];
                let started = std::time::Instant::now();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(5) {
                    if socket.send_to(&junk, broker).is_ok() {
                        sent += 1;
                    }
                }
                sent
            }
        });
        let mut acked = vec!["before".to_string()];
        let mut refused = 0;
        let during = std::time::Instant::now();
        while refused == 0 && during.elapsed() < Duration::from_secs(4) {
            let text = format!("during {}", acked.len());
            match within(STEP_DEADLINE, "a write during the flood", alice.send(conv, &text)).await {
                Ok(_) => acked.push(text),
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::OVERLOADED), "{e}");
                    refused += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().unwrap();
        assert!(refused > 0, "no write was refused while the socket was flooded ({sent} datagrams sent)");
        // Drained: admitted again (a refusal now and then while the last junk is read).
        let after = within(STEP_DEADLINE, "a write after the flood", async {
            loop {
                match alice.send(conv, "after").await {
                    Ok(seq) => break seq,
                    Err(e) if e.code() == Some(ErrorCode::OVERLOADED) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
        acked.push("after".to_string());
        let (mut texts, mut from) = (Vec::new(), 0);
        loop {
            let (entries, last_seq) = alice.history(conv, Page::After(from), 100).await.unwrap();
            assert_eq!(after, last_seq, "the last write took the last seq");
            texts.extend(entries.iter().filter_map(|e| match &e.body {
                Body::Text { text, .. } => Some(text.clone()),
                _ => None,
            }));
            match entries.last() {
                Some(e) if e.seq < last_seq => from = e.seq,
                _ => break,
            }
        }
        assert_eq!(texts, acked, "every acknowledged write is stored, no refused one");
    })
    .await
}

async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

/// A user's conversation log writes are limited to `writes_per_sec` over all its
/// connections, with a burst of ten seconds' worth: past it a write is `RATE_LIMITED`
/// before it is admitted, other users write on, and the allowance refills. Before, only
/// the writes in flight were bounded, and one account wrote as fast as the broker
/// acknowledged into a group of strangers it had added (an attacker review). The client
/// library's `Session` sends a write so refused again later with the same client id, so
/// each lands once and the caller sees only its seq.
#[tokio::test]
async fn a_users_writes_past_its_rate_are_rate_limited_and_a_session_sends_them_later() {
    bounded(async {
        const RATE: u32 = 2;
        let tb = TestBroker::start_with(|c| c.writes_per_sec = RATE).await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let started = std::time::Instant::now();
        let mut written = 0u32;
        let refused = loop {
            match alice.send(conv, &format!("m{written}")).await {
                Ok(_) => written += 1,
                Err(e) => break e,
            }
            assert!(written < 100, "100 writes at {RATE} a second: none refused");
        };
        assert_eq!(refused.code(), Some(ErrorCode::RATE_LIMITED), "{refused}");
        // The burst (ten seconds' worth), and what refilled while they were written.
        let refilled = (started.elapsed().as_secs_f64() * f64::from(RATE)).ceil() as u32;
        assert!((10 * RATE..=10 * RATE + refilled).contains(&written), "{written} written");
        // Another connection of the same user shares the allowance; another user has its own.
        let again = tb.connector().connect(&alice_id).await.unwrap();
        assert_eq!(again.send(conv, "x").await.unwrap_err().code(), Some(ErrorCode::RATE_LIMITED));
        bob.send(conv, "bob writes on").await.unwrap();
        // It refills.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        alice.send(conv, "a second later").await.unwrap();

        sent_once_through_a_session(&tb, &alice, alice_id, conv, 's', 6, (100, 1000)).await;
    })
    .await
}

/// A write the broker sheds (`OVERLOADED`) gives back the allowance of writes it took:
/// a client retrying through a spell of shedding is not then refused `RATE_LIMITED` for
/// writes that never took effect.
#[tokio::test]
async fn a_shed_write_gives_its_allowance_back() {
    bounded(async {
        const RATE: u32 = 1;
        // Every write is shed: none may be in flight.
        let tb = TestBroker::start_with(|c| {
            c.max_sends_in_flight = 0;
            c.writes_per_sec = RATE;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        tb.register("bob").await;
        let conv = alice.create_direct("bob").await.unwrap().id;
        for i in 0..3 * 10 * RATE {
            let refused = alice.send(conv, &format!("m{i}")).await.unwrap_err();
            assert_eq!(refused.code(), Some(ErrorCode::OVERLOADED), "write {i}: {refused}");
        }
        // The whole burst (ten seconds' worth) is still there.
        let users = &tb.shared().users;
        assert!((0..10 * RATE).all(|_| users.allow_write(alice.user_id).is_ok()), "the burst was spent on shed writes");
        assert_eq!(users.allow_write(alice.user_id).unwrap_err().code, ErrorCode::RATE_LIMITED);
    })
    .await
}

/// A nearly full disk refuses new content and nothing else: once the data dir's disk is
/// below a quarter of `disk_reserve_bytes` free, `Send`, `Edit`, `AddMembers`,
/// `SetTitle` and a new group are `STORAGE_FULL` and write nothing, while deletes, reads and leaving go
/// on; with room again, messages are taken again. Before, only uploads were refused:
/// messages filled the disk until a commit failed and the broker exited (an operator
/// trial), to be refused a restart while the disk stayed full.
#[tokio::test]
async fn a_nearly_full_disk_refuses_new_messages_and_nothing_else() {
    bounded(async {
        const RESERVE: u64 = 1 << 30;
        let tb = TestBroker::start_with(|c| c.disk_reserve_bytes = RESERVE).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        tb.register("carol").await;
        let conv = alice.create_group("team", &["bob".into()]).await.unwrap().id;
        let first = alice.send(conv, "before").await.unwrap();
        // Below the floor (a quarter of the reserve); the broker looks once a second.
        tb.shared().files.pretend_free_bytes(Some(RESERVE / 4 - 1));
        let refused = within(STEP_DEADLINE, "the refusal", async {
            loop {
                match alice.send(conv, "while full").await {
                    Err(e) if e.code() == Some(ErrorCode::STORAGE_FULL) => return e,
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(e) => panic!("expected STORAGE_FULL, got {e:?}"),
                }
            }
        })
        .await;
        assert!(refused.to_string().contains("nearly full"), "{refused}");
        let (_, newest) = bob.history(conv, Page::Latest, 100).await.unwrap();
        for (what, body) in [
            (
                "an edit",
                RequestBody::Edit {
                    conv,
                    client_id: switchboard_client::new_client_id(),
                    target: first,
                    text: "x".into(),
                },
            ),
            ("an addition", RequestBody::AddMembers { conv, users: vec!["carol".into()], role: Role::Member }),
            ("a title", RequestBody::SetTitle { conv, title: "renamed".into() }),
            (
                "a group",
                RequestBody::CreateConversation(switchboard_protocol::NewConversation::Group {
                    title: "new".into(),
                    members: vec!["bob".into()],
                }),
            ),
        ] {
            let e = alice.request(body).await.err().unwrap_or_else(|| panic!("{what} was taken"));
            assert_eq!(e.code(), Some(ErrorCode::STORAGE_FULL), "{what}");
        }
        let (_, unchanged) = bob.history(conv, Page::Latest, 100).await.unwrap();
        assert_eq!(unchanged, newest, "a refused write wrote something");
        // What takes back or lets go still goes.
        alice.delete(conv, first).await.unwrap();
        bob.leave(conv).await.unwrap();
        // Room again: taken again within a look or two.
        tb.shared().files.pretend_free_bytes(Some(RESERVE));
        within(STEP_DEADLINE, "messages taken again", async {
            while alice.send(conv, "room again").await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(tb.shared().status().writes_refused_storage_full >= 5);
    })
    .await
}
