//! Messaging end to end: real broker, real QUIC, real sled.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use switchboard_client::{MemoryCursors, Session, SessionConfig, SessionEvent, new_client_id};
use switchboard_protocol::{Body, ErrorCode, Page, Reply, RequestBody, Role};
use switchboard_tests::{
    STEP_DEADLINE, TestBroker, bounded, closed_with, next_entry, next_response, no_event, request_frame, within,
};

#[tokio::test]
async fn every_device_of_every_member_sees_every_message() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice1, _) = tb.register("alice").await;
        let (bob1, _) = tb.register("bob").await;
        let (alice2, _) = tb.login("alice").await;
        let (bob2, _) = tb.login("bob").await;
        let (alice3, _) = tb.login("alice").await;
        let mut streams: Vec<_> =
            [&alice1, &alice2, &alice3, &bob1, &bob2].iter().map(|c| c.events().unwrap()).collect();

        let conv = alice1.create_group("team", &["bob".into()]).await.unwrap();
        assert_eq!(conv.member_count, 2);
        assert_eq!(conv.my_role, Role::Owner);
        // Everyone except the creating session hears of the creation (seq 1).
        for s in streams.iter_mut().skip(1) {
            let e = next_entry(s).await;
            assert_eq!(e.seq, 1);
            assert!(matches!(e.body, Body::Created { .. }));
        }

        let senders = [&alice1, &bob2, &alice3, &bob1, &alice2];
        for (i, sender) in senders.iter().enumerate() {
            let seq = sender.send(conv.id, &format!("message {i}")).await.unwrap();
            assert_eq!(seq, i as u64 + 2, "gapless seqs after the creation entry");
        }
        for (d, stream) in streams.iter_mut().enumerate() {
            let mut seen = Vec::new();
            // Each device receives every message except the ones it sent itself.
            let expected: Vec<u64> = (0..5u64).filter(|i| senders_index(d) != *i as usize).map(|i| i + 2).collect();
            for _ in 0..expected.len() {
                seen.push(next_entry(stream).await.seq);
            }
            assert_eq!(seen, expected, "device {d}");
            no_event(stream, 100).await;
        }

        // History shows all, in order.
        let (entries, last) = bob1.history(conv.id, Page::Latest, 50).await.unwrap();
        assert_eq!(last, 6);
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    })
    .await
}

/// Position of stream `d` in the senders array (streams are alice1, alice2, alice3, bob1, bob2).
fn senders_index(d: usize) -> usize {
    // senders = [alice1, bob2, alice3, bob1, alice2]
    [0, 4, 2, 3, 1][d]
}

#[tokio::test]
async fn resent_client_id_yields_same_seq_and_one_entry() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = alice.create_direct("bob").await.unwrap();
        assert_eq!(next_entry(&mut bob_events).await.seq, 1);
        let id = switchboard_client::new_client_id();
        let (seq, dup) = alice.send_with_id(conv.id, id, "once").await.unwrap();
        assert!(!dup);
        let (again, dup) = alice.send_with_id(conv.id, id, "once").await.unwrap();
        assert_eq!((again, dup), (seq, true));
        assert_eq!(next_entry(&mut bob_events).await.seq, seq);
        no_event(&mut bob_events, 200).await;
        let (entries, _) = bob.history(conv.id, Page::Latest, 50).await.unwrap();
        assert_eq!(entries.len(), 2, "creation + one message");
        // The same pair gets the same direct conversation.
        assert_eq!(bob.create_direct("alice").await.unwrap().id, conv.id);
    })
    .await
}

#[tokio::test]
async fn non_members_are_forbidden() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (_bob, _) = tb.register("bob").await;
        let (eve, _) = tb.register("eve").await;
        let conv = alice.create_group("private", &["bob".into()]).await.unwrap();
        let forbidden = |r: Result<_, switchboard_client::ClientError>| {
            assert_eq!(r.err().and_then(|e| e.code()), Some(ErrorCode::FORBIDDEN))
        };
        forbidden(eve.send(conv.id, "let me in").await.map(|_| ()));
        forbidden(eve.history(conv.id, Page::Latest, 10).await.map(|_| ()));
        forbidden(eve.members(conv.id).await.map(|_| ()));
        forbidden(eve.add_members(conv.id, &["eve".into()], Role::Member).await.map(|_| ()));
        assert!(eve.conversations().await.unwrap().is_empty());
        // A stranger cannot tell a conversation that exists from one that does not: the
        // same code and the same message (PROTOCOL.md, "Conversations").
        let missing = eve.send(999, "nowhere").await.unwrap_err();
        let existing = eve.send(conv.id, "somewhere").await.unwrap_err();
        assert_eq!(missing.code(), Some(ErrorCode::FORBIDDEN));
        assert_eq!(missing.to_string(), existing.to_string());
        let missing = eve.history(999, Page::Latest, 10).await.unwrap_err();
        assert_eq!(missing.code(), Some(ErrorCode::FORBIDDEN));
    })
    .await
}

/// One session's writes to one conversation take effect in the order sent and are
/// answered in that order (acknowledgements follow seq order), even far past the 64
/// requests the broker lets a session have outstanding: the rest wait, none fail. The
/// requests go out on one stream in a known order and the answers are compared in the
/// order they arrive.
#[tokio::test]
async fn hundreds_of_pipelined_writes_are_answered_in_the_order_sent() {
    bounded(async {
        const N: u32 = 300;
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = alice.create_direct("bob").await.unwrap().id;
        next_entry(&mut bob_events).await;
        let mut raw = tb.connector().connect_raw(&alice_id).await.unwrap();
        let frames: Vec<u8> = (1..=N)
            .flat_map(|id| {
                let body = RequestBody::Send { conv, client_id: new_client_id(), text: format!("m{id}") };
                request_frame(id, body).to_vec()
            })
            .collect();
        within(STEP_DEADLINE, "pipelined write", raw.send.write_all(&frames)).await.unwrap();
        let mut answers = Vec::new();
        for _ in 1..=N {
            match next_response(&mut raw).await {
                (id, Ok(Reply::Appended { seq, duplicate: false })) => answers.push((id, seq)),
                other => panic!("{other:?}"),
            }
        }
        let expected: Vec<(u32, u64)> = (1..=N).map(|id| (id, u64::from(id) + 1)).collect();
        assert_eq!(answers, expected, "request i is answered i-th, with seq i + 1");
        for id in 1..=N {
            let e = next_entry(&mut bob_events).await;
            assert_eq!((e.seq, e.body), (u64::from(id) + 1, Body::Text { text: format!("m{id}"), edited: false }));
        }
        no_event(&mut bob_events, 100).await;
    })
    .await
}

/// PROTOCOL.md section 1: a client ends its session by finishing its side of the
/// control stream; the broker then closes the connection with `NO_ERROR` and forgets
/// the session.
#[tokio::test]
async fn finishing_the_control_stream_ends_the_session_with_no_error() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let mut raw = tb.connector().connect_raw(&alice_id).await.unwrap();
        raw.send.write_all(&request_frame(1, RequestBody::Ping)).await.unwrap();
        assert!(matches!(next_response(&mut raw).await, (1, Ok(Reply::Pong { .. }))));
        let online = |tb: &TestBroker| tb.shared().online.sessions(alice.user_id).map_or(0, |s| s.len());
        assert_eq!(online(&tb), 2);
        raw.send.finish().unwrap();
        assert_eq!(closed_with(&raw.conn).await, Some(ErrorCode::NO_ERROR));
        within(STEP_DEADLINE, "the session to be forgotten", async {
            while online(&tb) != 1 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        alice.ping().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_broker_on_several_udp_sockets_serves_clients_on_each() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.udp_sockets = 3).await;
        let (alice, _) = tb.register("alice").await;
        let mut others = Vec::new();
        for i in 0..6 {
            // Each connector is its own UDP socket: the kernel spreads them over the broker's.
            others.push(tb.register(&format!("u{i}")).await.0);
        }
        let names: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
        let mut streams: Vec<_> = others.iter().map(|c| c.events().unwrap()).collect();
        let conv = alice.create_group("spread", &names).await.unwrap().id;
        let seq = alice.send(conv, "to everyone").await.unwrap();
        for s in streams.iter_mut() {
            assert_eq!(next_entry(s).await.seq, 1);
            assert_eq!(next_entry(s).await.seq, seq);
        }
    })
    .await
}

#[tokio::test]
async fn creating_conversations_in_a_loop_is_rate_limited_per_user() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        // 60 back to back: the first 20 (the burst) always pass; refilling 40 more would take
        // 40 s at one a second, so some are refused however slow this machine is.
        let mut created = 0;
        let mut refused = 0;
        for i in 0..60 {
            match alice.create_group(&format!("g{i}"), &["bob".into()]).await {
                Ok(_) => created += 1,
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::RATE_LIMITED), "{e}");
                    refused += 1;
                }
            }
        }
        assert!(created >= 20, "the burst is allowed ({created} created)");
        assert!(refused > 0, "a loop is refused ({created} created)");
        assert_eq!(alice.conversations().await.unwrap().len(), created, "a refused creation leaves nothing behind");
        // Reconnecting does not refill the allowance (5 more would need 5 s of refill).
        alice.close();
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        let mut again = Vec::new();
        for i in 0..5 {
            again.push(alice.create_group(&format!("again {i}"), &["bob".into()]).await.err().and_then(|e| e.code()));
        }
        assert!(again.contains(&Some(ErrorCode::RATE_LIMITED)), "{again:?}");
        // The allowance is per user: bob is unaffected, and alice can still message.
        let conv = bob.create_group("bob's", &["alice".into()]).await.unwrap().id;
        alice.send(conv, "still here").await.unwrap();
        // Opening an existing direct conversation creates nothing and costs nothing.
        let direct = bob.create_direct("alice").await.unwrap().id;
        for _ in 0..40 {
            assert_eq!(bob.create_direct("alice").await.unwrap().id, direct);
        }
    })
    .await
}

/// Reads that list members cost a point read or two of the store per member, on the
/// conversation's actor, in line with everyone's writes: a member looping on them is
/// refused once its allowance of member rows is spent, alone, and only for such reads.
/// Before, nothing bounded them.
#[tokio::test]
async fn reading_member_lists_in_a_loop_is_rate_limited_per_user() {
    bounded(async {
        // 4 rows a second, a burst of 8: one read of a 20-member list is allowed and
        // leaves its reader between 12 and 20 rows in debt, refused for 3 to 5 s.
        let tb = TestBroker::start_with(|c| c.member_rows_per_sec = 4).await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut names = vec!["bob".to_string()];
        for i in 0..18 {
            names.push(format!("member{i}"));
            tb.register(&names[i + 1]).await;
        }
        let conv = alice.create_group("g", &names).await.unwrap().id;
        let spend = async || {
            let (mut read, mut refused) = (0, 0);
            for _ in 0..10 {
                match alice.members(conv).await {
                    Ok(members) => {
                        assert_eq!(members.len(), 20);
                        read += 1;
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Some(ErrorCode::RATE_LIMITED), "{e}");
                        refused += 1;
                    }
                }
            }
            (read, refused)
        };
        let (read, refused) = spend().await;
        assert_eq!((read, refused), (1, 9), "one read is allowed, then its debt refuses the rest");
        // Every read that lists members is refused while the allowance is in debt...
        let limited = [
            RequestBody::Receipts { conv },
            RequestBody::CatchUp { conv, after: 0, limit: 10 },
            RequestBody::EntryNames { conv, seq: 1 },
        ];
        for body in limited {
            let what = format!("{body:?}");
            let e = alice.request(body).await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::RATE_LIMITED), "{what}: {e}");
        }
        // ... but not history or writes, and not another member's reads.
        let seq = alice.send(conv, "still here").await.unwrap();
        let (entries, _) = alice.history(conv, Page::Latest, 10).await.unwrap();
        assert_eq!(entries.last().map(|e| e.seq), Some(seq));
        assert_eq!(bob.members(conv).await.unwrap().len(), 20);
        // A `Session` waits for the allowance to refill (it sends such a refused read
        // again after a backoff) instead of failing the read or stalling its catch-up,
        // which before ended with `CaughtUp` and no entries.
        assert!(spend().await.1 > 0, "still in debt");
        let config =
            SessionConfig { backoff_min_ms: 100, backoff_max_ms: 1000, overload_retries: 60, ..Default::default() };
        let (session, mut events) =
            Session::start(tb.connector(), alice_id, Arc::new(MemoryCursors::default()), config).unwrap();
        let mut seqs = Vec::new();
        loop {
            match within(Duration::from_secs(30), "the session's catch-up", events.next()).await {
                Some(SessionEvent::Entry(e)) => seqs.push(e.seq),
                Some(SessionEvent::CaughtUp) => break,
                Some(_) => {}
                None => panic!("the session stopped"),
            }
        }
        assert_eq!(seqs, (1..=seq).collect::<Vec<_>>());
        match session.request(RequestBody::Members { conv }).await {
            Ok(Reply::Members(members)) => assert_eq!(members.len(), 20),
            other => panic!("{other:?}"),
        }
    })
    .await
}

/// `no_event` passes only for a stream that is open and quiet: an ended stream
/// delivers no events either, and must fail it.
#[tokio::test]
#[should_panic(expected = "the event stream closed")]
async fn no_event_fails_on_a_closed_stream() {
    let tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    let mut events = alice.events().unwrap();
    alice.close();
    no_event(&mut events, 5_000).await;
}
