//! Catch-up through the client's `Session` (PROTOCOL.md section 11) against a real
//! broker: a device that was away gets every missed entry once, in order, while others
//! keep writing, and across disconnects in the middle of it.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use switchboard_client::{
    Client, FileCursors, Identity, MemoryCursors, Saved, Session, SessionConfig, SessionEvent, SessionEvents,
};
use switchboard_protocol::{Body, ConvId, ErrorCode, Receipt, Role, Seq, UserId};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, within};

/// Quick reconnects for tests.
fn config() -> SessionConfig {
    SessionConfig { backoff_min_ms: 20, backoff_max_ms: 200, ..SessionConfig::default() }
}

fn start(tb: &TestBroker, identity: &Identity) -> (Session, SessionEvents) {
    Session::start(tb.connector(), identity.clone(), Arc::new(MemoryCursors::default()), config()).unwrap()
}

/// What a session's stream showed, per conversation, with the checks every test makes.
#[derive(Default)]
struct Seen {
    seqs: BTreeMap<ConvId, Vec<Seq>>,
    receipts: Vec<Receipt>,
    disconnects: usize,
    caught_up: usize,
}

impl Seen {
    fn take(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Entry(e) => self.seqs.entry(e.conv).or_default().push(e.seq),
            SessionEvent::Receipt(r) => self.receipts.push(r),
            SessionEvent::Disconnected { .. } => self.disconnects += 1,
            SessionEvent::CaughtUp => self.caught_up += 1,
            SessionEvent::Stopped(e) => panic!("the session stopped: {e}"),
            _ => {}
        }
    }

    fn last(&self, conv: ConvId) -> Seq {
        self.seqs.get(&conv).and_then(|s| s.last()).copied().unwrap_or(0)
    }

    /// Reads `events` until every conversation in `targets` reached its seq.
    async fn until(&mut self, events: &mut SessionEvents, targets: &HashMap<ConvId, Seq>) {
        within(Duration::from_secs(90), "the stream reaching every target", async {
            while targets.iter().any(|(&c, &s)| self.last(c) < s) {
                self.take(events.next().await.expect("the session is running"));
            }
        })
        .await;
    }

    /// Every conversation's seqs are exactly `from..=to`: no gap, no duplicate, in order.
    fn assert_exact(&self, conv: ConvId, from: Seq, to: Seq) {
        let got = self.seqs.get(&conv).cloned().unwrap_or_default();
        let want: Vec<Seq> = (from..=to).collect();
        if got != want {
            let dups = got.len() - got.iter().collect::<std::collections::BTreeSet<_>>().len();
            panic!(
                "conv {conv}: {} entries ({dups} duplicates), first {:?}, want {from}..={to}",
                got.len(),
                got.first()
            );
        }
    }
}

/// `count` texts to each conversation, pipelined per conversation.
async fn write(client: &Arc<Client>, convs: &[ConvId], count: usize, tag: &str) -> HashMap<ConvId, Seq> {
    let tasks: Vec<_> = convs
        .iter()
        .map(|&conv| {
            let (client, tag) = (client.clone(), tag.to_owned());
            tokio::spawn(async move {
                let mut last = 0;
                for i in 0..count {
                    last = client.send(conv, &format!("{tag} {i}")).await.unwrap();
                }
                (conv, last)
            })
        })
        .collect();
    let mut last = HashMap::new();
    for t in tasks {
        let (conv, seq) = within(Duration::from_secs(60), "writing", t).await.unwrap();
        last.insert(conv, seq);
    }
    last
}

async fn groups(alice: &Client, peer: &str, n: usize) -> Vec<ConvId> {
    let mut convs = Vec::new();
    for i in 0..n {
        convs.push(alice.create_group(&format!("g{i}"), &[peer.to_owned()]).await.unwrap().id);
    }
    convs
}

/// Alice and bob registered on `tb` (bob's registering client kept connected) and a
/// group alice made with bob.
async fn alice_and_bob_in_a_group(tb: &TestBroker) -> (Arc<Client>, Client, Identity, ConvId) {
    let (alice, _) = tb.register("alice").await;
    let (bob, bob_id) = tb.register("bob").await;
    let alice = Arc::new(alice);
    let conv = groups(&alice, "bob", 1).await[0];
    (alice, bob, bob_id, conv)
}

/// Closes the connection of `user` from the broker side, once the session has one.
async fn kick(tb: &TestBroker, user: UserId) {
    let sessions = within(STEP_DEADLINE, "the session (re)connecting", async {
        loop {
            match tb.shared().online.sessions(user) {
                Some(list) if list.iter().all(|s| s.out.closed().is_none()) => return list,
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    })
    .await;
    assert_eq!(sessions.len(), 1);
    sessions[0].out.close(ErrorCode::GOING_AWAY);
}

/// A device away while 10,000 messages arrive in 20 conversations gets each exactly once,
/// in order, while alice keeps writing during its catch-up; then its delivered receipts
/// reach the broker (reported in batches, not per message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_missed_messages_arrive_once_in_order_while_others_write() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        drop(bob);
        let alice = Arc::new(alice);
        let convs = groups(&alice, "bob", 20).await;
        write(&alice, &convs, 500, "missed").await;

        let (session, mut events) = start(&tb, &bob_id);
        // Alice keeps writing while bob catches up.
        let writer = {
            let (alice, convs) = (alice.clone(), convs.clone());
            tokio::spawn(async move { write(&alice, &convs, 25, "during").await })
        };
        let mut seen = Seen::default();
        // Everything up to the first batch, then everything written during.
        let first: HashMap<ConvId, Seq> = convs.iter().map(|&c| (c, 501)).collect();
        seen.until(&mut events, &first).await;
        let last = within(STEP_DEADLINE * 3, "the writer", writer).await.unwrap();
        seen.until(&mut events, &last).await;
        for &conv in &convs {
            assert_eq!(last[&conv], 526, "created + 500 + 25");
            seen.assert_exact(conv, 1, 526);
        }
        assert!(seen.caught_up >= 1);

        // Bob's delivered watermark reaches the end of each conversation.
        within(STEP_DEADLINE, "delivered receipts", async {
            loop {
                let mut done = true;
                for &conv in &convs {
                    let receipts = alice.receipts(conv).await.unwrap();
                    let bob = receipts.iter().find(|r| r.user == bob_id.user_id);
                    done &= bob.is_some_and(|r| r.delivered_up_to == 526);
                }
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        session.close().await;
    })
    .await;
}

/// The broker drops the device's connection twice in the middle of its catch-up: the
/// stream shows every entry once, in order, and says it was disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_stays_gap_free_across_disconnects_mid_catch_up() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        drop(bob);
        let alice = Arc::new(alice);
        let convs = groups(&alice, "bob", 5).await;
        let last = write(&alice, &convs, 1000, "missed").await;

        let (session, mut events) = start(&tb, &bob_id);
        let mut seen = Seen::default();
        for round in 1..=2u64 {
            // Part way through (each page is at most 1000 entries of one conversation).
            let part: HashMap<ConvId, Seq> = [(convs[0], 300 * round)].into();
            seen.until(&mut events, &part).await;
            let total: usize = seen.seqs.values().map(Vec::len).sum();
            assert!(total < 5005, "the drop comes before the catch-up is over");
            kick(&tb, bob_id.user_id).await;
            // Entries written while the device is away are caught up too.
            write(&alice, &convs[..1], 3, "between").await;
        }
        let mut last = last;
        *last.get_mut(&convs[0]).unwrap() += 6;
        seen.until(&mut events, &last).await;
        for &conv in &convs {
            seen.assert_exact(conv, 1, last[&conv]);
        }
        // Connection events are dropped while the application's queue is full (it
        // is here: thousands of entries wait in it), so at least one shows.
        assert!(seen.disconnects >= 1, "{} disconnects", seen.disconnects);
        // Live again: a new entry arrives at once, next in order.
        let seq = alice.send(convs[1], "live").await.unwrap();
        seen.until(&mut events, &[(convs[1], seq)].into()).await;
        seen.assert_exact(convs[1], 1, seq);
        session.close().await;
    })
    .await;
}

/// Cursors saved by one session are where the next one (a restarted process) resumes:
/// it shows only what the first did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_session_resumes_from_its_saved_cursors() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        drop(bob);
        let alice = Arc::new(alice);
        let convs = groups(&alice, "bob", 2).await;
        let last = write(&alice, &convs, 30, "first").await;
        let path = tb.dir.path().join("bob-cursors.json");
        let store = || Arc::new(FileCursors::new(&path, bob_id.user_id, bob_id.device_id));

        let (session, mut events) = Session::start(tb.connector(), bob_id.clone(), store(), config()).unwrap();
        let mut seen = Seen::default();
        seen.until(&mut events, &last).await;
        session.close().await;
        assert_eq!(store().load_for_test().cursors, last);

        let more = write(&alice, &convs, 10, "second").await;
        let (session, mut events) = Session::start(tb.connector(), bob_id.clone(), store(), config()).unwrap();
        let mut again = Seen::default();
        again.until(&mut events, &more).await;
        for &conv in &convs {
            again.assert_exact(conv, last[&conv] + 1, more[&conv]);
        }
        session.close().await;
    })
    .await;
}

/// Conversations the user was removed from, or left, while its session was away are
/// reported once each as `Left` before `CaughtUp` (no longer listed, their catch-up
/// refused), and their cursors move among the left ones; the conversation it still holds
/// goes on as before; one the user is added back to resumes at its kept cursor. Before,
/// nothing was said and the cursors stayed for good; then they were dropped, and a
/// conversation joined again came from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_left_while_away_are_reported_and_resume_where_they_were_if_joined_again() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        let alice = Arc::new(alice);
        let convs = groups(&alice, "bob", 3).await;
        let last = write(&alice, &convs, 3, "first").await;
        let path = tb.dir.path().join("bob-cursors.json");
        let store = || Arc::new(FileCursors::new(&path, bob_id.user_id, bob_id.device_id));
        let (session, mut events) = Session::start(tb.connector(), bob_id.clone(), store(), config()).unwrap();
        Seen::default().until(&mut events, &last).await;
        session.close().await;

        alice.remove_member(convs[0], bob_id.user_id).await.unwrap();
        alice.send(convs[0], "after bob").await.unwrap();
        bob.leave(convs[1]).await.unwrap();
        let more = write(&alice, &convs[2..], 2, "second").await;
        let until_caught_up = |mut events: SessionEvents| async move {
            let (mut left, mut entries) = (Vec::new(), Vec::new());
            within(STEP_DEADLINE, "catching up", async {
                loop {
                    match events.next().await.expect("the session is running") {
                        SessionEvent::Left { conv } => left.push(conv),
                        SessionEvent::Entry(e) => entries.push((e.conv, e.seq)),
                        SessionEvent::CaughtUp => return,
                        SessionEvent::Stopped(e) => panic!("the session stopped: {e}"),
                        _ => {}
                    }
                }
            })
            .await;
            left.sort_unstable();
            (left, entries)
        };
        let (session, events) = Session::start(tb.connector(), bob_id.clone(), store(), config()).unwrap();
        let (left, entries) = until_caught_up(events).await;
        assert_eq!(left, convs[..2], "told of both, once each");
        let want: Vec<(ConvId, Seq)> = (last[&convs[2]] + 1..=more[&convs[2]]).map(|s| (convs[2], s)).collect();
        assert_eq!(entries, want, "the conversation still held goes on");
        session.close().await;
        let saved = store().load_for_test();
        assert_eq!(saved.cursors.into_keys().collect::<Vec<_>>(), [convs[2]], "their cursors moved out");
        let mut kept: Vec<(ConvId, Seq)> = saved.left.iter().collect();
        kept.sort_unstable();
        assert_eq!(kept, [(convs[0], last[&convs[0]]), (convs[1], last[&convs[1]])], "kept as left");

        let (session, events) = Session::start(tb.connector(), bob_id.clone(), store(), config()).unwrap();
        assert_eq!(until_caught_up(events).await, (Vec::new(), Vec::new()), "told once");
        session.close().await;

        // Added back while away: the conversation resumes where this device was, with
        // what was sent while bob was out (as history shows it), not from its start.
        // Before, its cursor was dropped at `Left` and every entry came again.
        alice.add_members(convs[0], &["bob".to_string()], Role::Member).await.unwrap();
        let back = alice.send(convs[0], "welcome back").await.unwrap();
        let (session, events) = Session::start(tb.connector(), bob_id.clone(), store(), config()).unwrap();
        let (left, entries) = until_caught_up(events).await;
        assert!(left.is_empty());
        let want: Vec<(ConvId, Seq)> = (last[&convs[0]] + 1..=back).map(|s| (convs[0], s)).collect();
        assert_eq!(entries, want, "resumed after the cursor it had when it was removed");
        session.close().await;
        let saved = store().load_for_test();
        assert_eq!(saved.cursors.get(&convs[0]), Some(&back), "a member again");
        assert_eq!(saved.left.iter().collect::<Vec<_>>(), [(convs[1], last[&convs[1]])]);
    })
    .await;
}

/// A removal seen live is told at once: the entry removing the user, then `Left` (before,
/// only at the next connect, and a script watching for it missed removals made while it
/// ran: a new user's trial). Added back live, the conversation resumes after the removal,
/// with what was sent while the user was out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_seen_live_is_told_at_once_and_a_live_re_add_resumes() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _bob, bob_id, conv) = alice_and_bob_in_a_group(&tb).await;
        let last = write(&alice, &[conv], 2, "before").await[&conv];
        let (session, mut events) = start(&tb, &bob_id);
        // The next entry, or `None` for `Left`.
        let next = async |events: &mut SessionEvents| {
            let event = switchboard_tests::wait_for(events, "the next entry or Left", |e| {
                matches!(e, SessionEvent::Entry(_) | SessionEvent::Left { .. })
            })
            .await;
            match event {
                SessionEvent::Entry(e) => Some(e),
                SessionEvent::Left { conv: c } => {
                    assert_eq!(c, conv);
                    None
                }
                other => panic!("{other:?}"),
            }
        };
        for seq in 1..=last {
            assert_eq!(next(&mut events).await.map(|e| e.seq), Some(seq));
        }
        let removed = alice.remove_member(conv, bob_id.user_id).await.unwrap();
        let entry = next(&mut events).await.expect("the removal first");
        assert_eq!(entry.seq, removed);
        assert!(matches!(entry.body, Body::MemberRemoved { user } if user == bob_id.user_id));
        assert!(next(&mut events).await.is_none(), "then Left, at once");
        let out = alice.send(conv, "while bob is out").await.unwrap();
        let back = alice.add_members(conv, &["bob".to_string()], Role::Member).await.unwrap();
        for seq in [out, back] {
            assert_eq!(next(&mut events).await.map(|e| e.seq), Some(seq), "resumed after the removal");
        }
        session.close().await;
    })
    .await
}

/// Receipts that moved while the device was away, in conversations with nothing new to
/// page through, come after the catch-up (asked for with `Receipts`, within a budget of
/// member rows per connect); before, only a conversation with new entries had its
/// receipts refreshed, and the others showed what was last heard live until the next
/// change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_that_moved_while_away_come_after_the_catch_up() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (_bob, bob_id) = tb.register("bob").await;
        let alice = Arc::new(alice);
        let convs = groups(&alice, "bob", 2).await;
        let last = write(&alice, &convs, 3, "first").await;
        let cursors = Arc::new(MemoryCursors::default());
        let (session, mut events) = Session::start(tb.connector(), bob_id.clone(), cursors.clone(), config()).unwrap();
        Seen::default().until(&mut events, &last).await;
        session.close().await;

        // Away: alice's reads move; nothing new is written.
        for &conv in &convs {
            alice.mark_read(conv, last[&conv]).await.unwrap();
        }
        let has_read = |seen: &Seen, conv: ConvId| {
            seen.receipts
                .iter()
                .any(|r| r.conv == conv && r.user == alice_id.user_id && r.read_up_to == Some(last[&conv]))
        };
        // A budget of two member rows: the first conversation's receipts only.
        let budget = SessionConfig { receipts_rows_per_connect: 2, ..config() };
        let (session, mut events) = Session::start(tb.connector(), bob_id.clone(), cursors.clone(), budget).unwrap();
        let mut seen = Seen::default();
        within(STEP_DEADLINE, "alice's read in the first conversation", async {
            while !has_read(&seen, convs[0]) {
                seen.take(events.next().await.expect("the session is running"));
            }
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                seen.take(events.next().await.expect("the session is running"));
            }
        })
        .await;
        assert!(!has_read(&seen, convs[1]), "beyond the budget");
        session.close().await;

        let (session, mut events) = Session::start(tb.connector(), bob_id.clone(), cursors, config()).unwrap();
        let mut seen = Seen::default();
        within(STEP_DEADLINE, "alice's reads in both conversations", async {
            while convs.iter().any(|&conv| !has_read(&seen, conv)) {
                seen.take(events.next().await.expect("the session is running"));
            }
        })
        .await;
        assert!(seen.seqs.is_empty(), "nothing new was paged through");
        session.close().await;
    })
    .await;
}

/// What one of my devices writes shows on my other device live, and on its own stream
/// too (fetched after the ack, since the broker does not push it back); my reads from
/// one device reach the other as my own receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn my_writes_and_reads_show_on_all_my_devices() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, phone) = tb.register("bob").await;
        drop(bob);
        let (laptop_client, laptop) = tb.login("bob").await;
        drop(laptop_client);
        let conv = alice.create_group("plans", &["bob".into()]).await.unwrap().id;

        let (on_phone, mut phone_events) = start(&tb, &phone);
        let (on_laptop, mut laptop_events) = start(&tb, &laptop);
        let (mut phone_seen, mut laptop_seen) = (Seen::default(), Seen::default());
        phone_seen.until(&mut phone_events, &[(conv, 1)].into()).await;
        laptop_seen.until(&mut laptop_events, &[(conv, 1)].into()).await;

        let seq = on_phone.send(conv, "from my phone").await.unwrap();
        assert_eq!(seq, 2);
        let (seq2, duplicate) = on_phone.send_with_id(conv, [9; 16], "once").await.unwrap();
        assert!(!duplicate);
        assert_eq!(on_phone.send_with_id(conv, [9; 16], "once").await.unwrap(), (seq2, true));
        phone_seen.until(&mut phone_events, &[(conv, seq2)].into()).await;
        laptop_seen.until(&mut laptop_events, &[(conv, seq2)].into()).await;
        phone_seen.assert_exact(conv, 1, seq2);
        laptop_seen.assert_exact(conv, 1, seq2);

        on_laptop.mark_read(conv, seq2).await.unwrap();
        within(STEP_DEADLINE, "my read on my other device", async {
            while !phone_seen.receipts.iter().any(|r| r.user == phone.user_id && r.read_up_to == Some(seq2)) {
                phone_seen.take(phone_events.next().await.unwrap());
            }
        })
        .await;
        on_phone.close().await;
        on_laptop.close().await;
    })
    .await;
}

trait LoadForTest {
    fn load_for_test(&self) -> Saved;
}

impl LoadForTest for FileCursors {
    fn load_for_test(&self) -> Saved {
        switchboard_client::CursorStore::load(self).unwrap()
    }
}

/// A catch-up page that ends right at this user's removal, while the conversation is
/// known to go on (the user was added back), tells no `Left`: the entries after it and
/// the live ones keep coming. Before, `Left` was told (the removal was the page's last
/// entry) and every later entry of the conversation was dropped for the rest of the
/// connection. The page is cut there by its bound of 1,000 entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_ending_at_a_removal_undone_later_tells_no_left() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.writes_per_sec = u32::MAX).await;
        let (alice, _) = tb.register("alice").await;
        let (_bob, bob_id) = tb.register("bob").await;
        let alice = Arc::new(alice);
        let conv = groups(&alice, "bob", 1).await[0];
        let created = alice.history(conv, switchboard_protocol::Page::Latest, 1).await.unwrap().1;
        // Bob's device has everything so far; then, while it is away, 999 messages, his
        // removal (the 1,000th entry after its cursor), his return, and one more.
        let cursors = MemoryCursors::new([(conv, created)].into_iter().collect());
        let written = write(&alice, &[conv], 999, "away").await[&conv];
        let removed = alice.remove_member(conv, bob_id.user_id).await.unwrap();
        assert_eq!(removed, created + 1000);
        alice.add_members(conv, &["bob".to_string()], Role::Member).await.unwrap();
        let last = alice.send(conv, "welcome back").await.unwrap();
        assert!(written < removed);
        let (session, mut events) =
            Session::start(tb.connector(), bob_id.clone(), Arc::new(cursors), config()).unwrap();
        let mut seen = Vec::new();
        within(STEP_DEADLINE, "the catch-up", async {
            loop {
                match events.next().await.expect("the session is running") {
                    SessionEvent::Entry(e) => seen.push(e.seq),
                    SessionEvent::Left { conv } => panic!("told Left of {conv} at {:?}", seen.last()),
                    SessionEvent::CaughtUp => return,
                    SessionEvent::Stopped(e) => panic!("the session stopped: {e}"),
                    _ => {}
                }
            }
        })
        .await;
        assert_eq!(seen, (created + 1..=last).collect::<Vec<_>>());
        // And live.
        let live = alice.send(conv, "live").await.unwrap();
        let entry =
            switchboard_tests::wait_for(&mut events, "the live entry", |e| matches!(e, SessionEvent::Entry(_))).await;
        assert!(matches!(entry, SessionEvent::Entry(e) if e.seq == live));
        session.close().await;
    })
    .await
}

/// `CaughtUp`, `Disconnected` and `Connected` wait for room in a full event queue rather
/// than being dropped: an application that reads late still learns it caught up, and
/// that it was disconnected and connected again. Before, a completing page that filled
/// the queue dropped `CaughtUp` for the whole connection, and a drop while the queue was
/// full was never told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_wait_for_room_in_a_full_queue() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _bob, bob_id, conv) = alice_and_bob_in_a_group(&tb).await;
        let last = write(&alice, &[conv], 3, "before").await[&conv];
        let config = SessionConfig { event_queue: 4, ..config() };
        let (session, mut events) =
            Session::start(tb.connector(), bob_id.clone(), Arc::new(MemoryCursors::default()), config).unwrap();
        // Not read while it connects and pages: `Connected` and the page fill the queue.
        within(STEP_DEADLINE, "the session connecting", async {
            while tb.shared().online.sessions(bob_id.user_id).is_none_or(|s| s.len() < 2) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Every connection of bob's closed from the broker's side (the session's, and
        // the registering client's).
        for s in tb.shared().online.sessions(bob_id.user_id).unwrap().iter() {
            s.out.close(ErrorCode::GOING_AWAY);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut order = Vec::new();
        within(STEP_DEADLINE, "every entry, the drop, the reconnect and CaughtUp", async {
            loop {
                let event = events.next().await.expect("the session is running");
                order.push(match &event {
                    SessionEvent::Entry(e) => format!("entry {}", e.seq),
                    SessionEvent::CaughtUp => "caught up".into(),
                    SessionEvent::Connected => "connected".into(),
                    SessionEvent::Disconnected { .. } => "disconnected".into(),
                    SessionEvent::Stopped(e) => panic!("the session stopped: {e}"),
                    _ => continue,
                });
                // (The first connection was cut before its catch-up was done.)
                let connects = order.iter().filter(|e| *e == "connected").count();
                if connects == 2 && order.last().is_some_and(|e| e == "caught up") {
                    return;
                }
            }
        })
        .await;
        let entries: Vec<&String> = order.iter().filter(|e| e.starts_with("entry")).collect();
        assert_eq!(entries.len(), usize::try_from(last).unwrap(), "each once: {order:?}");
        let disconnected = order.iter().position(|e| e == "disconnected").unwrap_or_else(|| panic!("{order:?}"));
        assert_eq!(order[disconnected + 1], "connected", "{order:?}");
        session.close().await;
    })
    .await
}

/// Entries this device took while no connection was up are reported delivered at the
/// next connect, even when the application was restarted meanwhile: the marks start
/// from what the broker holds, not from the saved cursors. Before, the saved cursor was
/// taken as reported, and the sender saw those messages "not delivered" until the next
/// one came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_taken_offline_are_reported_delivered_after_a_restart() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _bob, bob_id, conv) = alice_and_bob_in_a_group(&tb).await;
        let last = write(&alice, &[conv], 3, "taken offline").await[&conv];
        // As saved by a session whose application took them with no connection up.
        let cursors = MemoryCursors::new([(conv, last)].into_iter().collect());
        let (session, mut events) =
            Session::start(tb.connector(), bob_id.clone(), Arc::new(cursors), config()).unwrap();
        switchboard_tests::wait_for(&mut events, "the catch-up", |e| matches!(e, SessionEvent::CaughtUp)).await;
        within(STEP_DEADLINE, "bob's delivered mark", async {
            loop {
                let receipts = alice.receipts(conv).await.unwrap();
                if receipts.iter().any(|r| r.user == bob_id.user_id && r.delivered_up_to == last) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        session.close().await;
    })
    .await
}

/// A live receipt that finds the application's queue full is asked for again once it
/// has room, so the ticks it shows catch up. Before, it was dropped, and the member's
/// read mark stayed unshown until that member moved it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_that_finds_the_queue_full_is_shown_once_there_is_room() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (_bob, bob_id) = tb.register("bob").await;
        let (carol, carol_id) = tb.register("carol").await;
        let alice = Arc::new(alice);
        let conv = alice.create_group("g", &["bob".into(), "carol".into()]).await.unwrap().id;
        let config = SessionConfig { event_queue: 4, ..config() };
        let (session, mut events) =
            Session::start(tb.connector(), bob_id.clone(), Arc::new(MemoryCursors::default()), config).unwrap();
        switchboard_tests::wait_for(&mut events, "the catch-up", |e| matches!(e, SessionEvent::CaughtUp)).await;
        // Not read now: the entries fill bob's queue, and carol's receipt finds it full.
        let last = write(&alice, &[conv], 6, "filling").await[&conv];
        tokio::time::sleep(Duration::from_millis(300)).await;
        carol.mark_read(conv, last).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        switchboard_tests::wait_for(&mut events, "carol's read mark", |e| {
            assert!(!matches!(e, SessionEvent::Stopped(_)), "the session stopped: {e:?}");
            matches!(e, SessionEvent::Receipt(r) if r.user == carol_id.user_id && r.read_up_to == Some(last))
        })
        .await;
        session.close().await;
    })
    .await
}
