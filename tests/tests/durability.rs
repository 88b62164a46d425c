//! What is acknowledged survives a restart; seqs stay gapless; edits, deletes, paging.

#![allow(clippy::unwrap_used)]

use switchboard_protocol::{Body, Page};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, next_entry, within};

#[tokio::test]
async fn acknowledged_messages_survive_restart_with_gapless_seqs() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (_bob, bob_id) = tb.register("bob").await;
        let conv = alice.create_group("persist", &["bob".into()]).await.unwrap().id;
        let id = switchboard_client::new_client_id();
        let (first, _) = alice.send_with_id(conv, id, "first").await.unwrap();
        let mut acked = vec![first];
        for i in 0..50 {
            acked.push(alice.send(conv, &format!("m{i}")).await.unwrap());
        }
        drop(alice);
        tb.restart().await;

        let bob = tb.connector().connect(&bob_id).await.unwrap();
        let (entries, last) = bob.history(conv, Page::After(0), 200).await.unwrap();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=52).collect::<Vec<_>>(), "gapless from 1");
        assert_eq!(last, 52);
        for seq in &acked {
            assert!(seqs.contains(seq));
        }
        // Exactly-once holds across the restart: the first id still maps to its seq.
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        assert_eq!(alice.send_with_id(conv, id, "first").await.unwrap(), (first, true));
        assert_eq!(alice.send(conv, "after restart").await.unwrap(), 53);
        assert_eq!(alice.conversations().await.unwrap()[0].last_seq, 53);
    })
    .await
}

#[tokio::test]
async fn edit_delete_and_paging() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = alice.create_direct("bob").await.unwrap().id;
        next_entry(&mut bob_events).await;
        for i in 0..30 {
            alice.send(conv, &format!("m{i}")).await.unwrap();
        }
        for _ in 0..30 {
            next_entry(&mut bob_events).await;
        }
        let edit_seq = alice.edit(conv, 2, "m0 fixed").await.unwrap();
        let e = next_entry(&mut bob_events).await;
        assert_eq!((e.seq, e.body), (edit_seq, Body::Edit { target: 2, text: "m0 fixed".into() }));
        let del_seq = alice.delete(conv, 3).await.unwrap();
        assert_eq!(next_entry(&mut bob_events).await.body, Body::Delete { target: 3 });
        // Only the sender may edit; deleted messages stay deleted.
        assert_eq!(
            bob.edit(conv, 4, "hijack").await.unwrap_err().code(),
            Some(switchboard_protocol::ErrorCode::FORBIDDEN)
        );
        assert_eq!(
            alice.edit(conv, 3, "undelete").await.unwrap_err().code(),
            Some(switchboard_protocol::ErrorCode::NOT_FOUND)
        );

        let (page, last) = bob.history(conv, Page::Latest, 10).await.unwrap();
        assert_eq!(last, del_seq);
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), (last - 9..=last).collect::<Vec<_>>());
        let (older, _) = bob.history(conv, Page::Before(page[0].seq), 10).await.unwrap();
        assert_eq!(older.last().unwrap().seq, page[0].seq - 1);
        let (start, _) = bob.history(conv, Page::After(0), 3).await.unwrap();
        assert_eq!(start[1].body, Body::Text { text: "m0 fixed".into(), edited: true });
        assert_eq!(start[2].body, Body::Tombstone);
    })
    .await
}

#[tokio::test]
async fn membership_changes_are_ordered_entries() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, _) = tb.register("carol").await;
        let mut carol_events = carol.events().unwrap();
        let conv = alice.create_group("club", &["bob".into()]).await.unwrap().id;
        alice.send(conv, "before carol").await.unwrap();
        let added = alice.add_members(conv, &["carol".into()], switchboard_protocol::Role::Member).await.unwrap();
        let e = next_entry(&mut carol_events).await;
        assert_eq!(e.seq, added, "the new member hears of her own addition first");
        let sent = bob.send(conv, "welcome carol").await.unwrap();
        assert_eq!(next_entry(&mut carol_events).await.seq, sent);
        let removed = alice.remove_member(conv, carol.user_id).await.unwrap();
        let e = next_entry(&mut carol_events).await;
        assert_eq!((e.seq, e.body), (removed, Body::MemberRemoved { user: carol.user_id }));
        assert_eq!(
            carol.send(conv, "hello?").await.unwrap_err().code(),
            Some(switchboard_protocol::ErrorCode::FORBIDDEN)
        );
        assert!(carol.conversations().await.unwrap().is_empty());
        let left = bob.leave(conv).await.unwrap();
        assert_eq!(left, removed + 1);
        assert_eq!(alice.members(conv).await.unwrap().len(), 1);
    })
    .await
}

#[tokio::test]
async fn idle_conversation_actor_stops_and_restarts_on_use() {
    bounded(async {
        // Idle after 1 s: long enough that a slow commit does not retire the actor
        // before the counts below.
        let tb = TestBroker::start_with(|c| c.conversation_idle_ms = 1000).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = alice.create_direct("bob").await.unwrap().id;
        next_entry(&mut bob_events).await;
        assert_eq!(alice.send(conv, "before").await.unwrap(), 2);
        let shared = tb.broker.as_ref().unwrap().shared().clone();
        assert_eq!(shared.convs.live(), 1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shared.convs.live() > 0 {
            assert!(std::time::Instant::now() < deadline, "idle conversation actor never stopped");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // A fresh actor picks up where the old one left off.
        assert_eq!(alice.send(conv, "after").await.unwrap(), 3);
        assert_eq!(next_entry(&mut bob_events).await.seq, 2);
        assert_eq!(next_entry(&mut bob_events).await.seq, 3);
        assert_eq!(shared.convs.live(), 1);
    })
    .await
}

#[tokio::test]
async fn a_crashed_conversation_actor_loses_nothing_and_ids_stay_exactly_once() {
    bounded(async {
        use std::sync::Arc;
        let tb = TestBroker::start().await;
        let alice = Arc::new(tb.register("alice").await.0);
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = alice.create_group("crashy", &["bob".into()]).await.unwrap().id;
        let shared = tb.broker.as_ref().unwrap().shared().clone();
        assert_eq!(alice.send(conv, "warm up").await.unwrap(), 2);

        // 1,000 pipelined sends with known ids; the actor is killed while they are in flight.
        let ids: Vec<[u8; 16]> = (0..1000).map(|_| switchboard_client::new_client_id()).collect();
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut sends = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let (alice, id, done) = (alice.clone(), *id, done.clone());
            sends.spawn(async move {
                let r = alice.send_with_id(conv, id, &format!("m{i}")).await;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (i, r)
            });
        }
        // Kill once the first acks are back: the rest are queued, applied or awaiting fsync.
        within(STEP_DEADLINE, "the first 50 acknowledgements", async {
            while done.load(std::sync::atomic::Ordering::SeqCst) < 50 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(shared.convs.kill(conv), "the conversation actor was live");
        let mut seqs = vec![0u64; ids.len()];
        let mut failed = Vec::new();
        for (i, r) in within(STEP_DEADLINE * 3, "every send answered", sends.join_all()).await {
            match r {
                Ok((seq, _)) => seqs[i] = seq,
                Err(e) => {
                    assert_eq!(e.code(), Some(switchboard_protocol::ErrorCode::INTERNAL), "{e}");
                    failed.push(i);
                }
            }
        }
        assert!(!failed.is_empty() && failed.len() < ids.len(), "the kill landed mid-stream ({} failed)", failed.len());
        // Retrying the failed ones with the same ids: each gets exactly one seq.
        for i in failed {
            seqs[i] = alice.send_with_id(conv, ids[i], &format!("m{i}")).await.unwrap().0;
        }
        let mut sorted = seqs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "every id has its own seq");
        let mut seen = Vec::new();
        loop {
            let (page, _) = bob.history(conv, Page::After(seen.last().copied().unwrap_or(0)), 200).await.unwrap();
            if page.is_empty() {
                break;
            }
            seen.extend(page.iter().map(|e| e.seq));
        }
        assert_eq!(seen, (1..=1002).collect::<Vec<_>>(), "gapless: creation, warm-up and exactly one entry per id");
        // Bob, online throughout, saw every entry live exactly once and in order: what the
        // dead actor made durable but never pushed, its successor pushed.
        let mut live = Vec::new();
        for _ in 0..1002 {
            live.push(next_entry(&mut bob_events).await.seq);
        }
        assert_eq!(live, (1..=1002).collect::<Vec<_>>());
        switchboard_tests::no_event(&mut bob_events, 200).await;
    })
    .await
}

/// A broker stopped after a conversation actor died does not vouch for its store: the
/// dead actor may have cut its newest entry's writes short, and only a start after an
/// unclean stop repairs every conversation (before, the shutdown marked the store clean,
/// and a hand-over cut short would have kept two owners for good).
#[tokio::test]
async fn a_shutdown_after_an_actor_died_leaves_the_store_to_be_checked() {
    bounded(async {
        use switchboard_storage::{Store, StoreConfig};
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        alice.send(conv, "x").await.unwrap();
        drop(alice);
        let store = |tb: &TestBroker| Store::open(&StoreConfig::new(tb.data_dir().join("store"))).unwrap();
        tb.stop().await;
        let clean = store(&tb);
        assert!(clean.opened_clean(), "a plain shutdown vouches for the store");
        clean.close_clean().unwrap();
        drop(clean);

        tb.restart().await;
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        alice.send(conv, "y").await.unwrap();
        assert!(tb.shared().convs.kill(conv), "the actor was live");
        drop(alice);
        tb.stop().await;
        assert!(!store(&tb).opened_clean(), "a dead actor's conversation is checked at the next start");
    })
    .await
}

/// A start refused for its address (another process holds the port) opens no store: a
/// new data dir gets none, and a store a clean stop left stays clean. Before, the store
/// was opened first, and the next start logged "checked after an unclean stop" and
/// repaired every conversation (an operator trial).
#[tokio::test]
async fn a_start_refused_for_its_port_leaves_the_store_as_it_was() {
    bounded(async {
        use switchboard_broker::{Broker, Config};
        use switchboard_storage::{Store, StoreConfig};
        let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let taken = holder.local_addr().unwrap();
        let start_on_taken =
            |data: std::path::PathBuf| Broker::start(Config { listen: taken, ..Config::ephemeral(data) });
        let mut tb = TestBroker::start().await;
        let fresh = tb.dir.path().join("fresh");
        let refused = start_on_taken(fresh.clone()).await;
        assert!(matches!(refused, Err(switchboard_broker::Error::Io { .. })), "{:?}", refused.map(|_| ()));
        assert!(!fresh.join("store").exists(), "a refused start made a store");

        let (alice, _) = tb.register("alice").await;
        alice.create_group("g", &[]).await.unwrap();
        drop(alice);
        tb.stop().await;
        assert!(start_on_taken(tb.data_dir()).await.is_err());
        let store = Store::open(&StoreConfig::new(tb.data_dir().join("store"))).unwrap();
        assert!(store.opened_clean(), "a refused start left the store to be checked");
    })
    .await
}

/// A second start on a running broker's data dir is refused before it binds anything:
/// with `udp_sockets` over 1 the sockets are SO_REUSEPORT, and binding first would have
/// joined the running broker's group on its port, taking part of its clients' packets,
/// until the store's lock refused the start.
#[tokio::test]
async fn a_second_broker_on_a_data_dir_is_refused_before_it_binds() {
    bounded(async {
        use switchboard_broker::{Broker, Config};
        let tb = TestBroker::start_with(|c| c.udp_sockets = 2).await;
        let running = tb.broker.as_ref().unwrap().local_addr;
        let second = Config { listen: running, udp_sockets: 2, ..Config::ephemeral(tb.data_dir()) };
        let refused = Broker::start(second).await.map(|_| ()).unwrap_err().to_string();
        assert!(refused.contains("another broker is running on"), "{refused}");
        // The running one still serves.
        let (alice, _) = tb.register("alice").await;
        alice.ping().await.unwrap();
    })
    .await
}

/// `commit_siblings` (PostgreSQL's rule): with it, a message sent alone is committed at
/// once; without it, each waits out `commit_delay_us`. Seen in the commit totals that
/// `/metrics` exports (`switchboard_group_commits_delayed_total`).
#[tokio::test]
async fn a_message_sent_alone_waits_out_the_commit_delay_only_without_commit_siblings() {
    bounded(async {
        for (siblings, waited) in [(0, 3), (1, 0)] {
            let tb = TestBroker::start_with(|c| {
                c.commit_delay_us = 100_000;
                c.commit_siblings = siblings;
            })
            .await;
            let (alice, _) = tb.register("alice").await;
            // Kept connected: a disconnect writes bob's last-seen, which ends a wait.
            let (_bob, _) = tb.register("bob").await;
            let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
            let delayed = || tb.shared().store.commit_stats().delayed;
            let before = delayed();
            // One at a time: each is alone in the store's queue when its commit is taken up.
            // A wait is counted if the committer takes the entry up within the delay (the
            // 100 ms cap, so that even a slow machine's committer does).
            for i in 0..3 {
                alice.send(conv, &format!("m{i}")).await.unwrap();
            }
            assert_eq!(delayed() - before, waited, "commit_siblings = {siblings}");
        }
    })
    .await;
}
