//! Presence and typing end to end (PROTOCOL.md section 11): a real broker on 127.0.0.1:0,
//! real QUIC (datagrams included), sled in a temp dir. Timers are short configured values
//! (idle timeout, coalescing window, typing TTL), and every wait has a deadline.

#![allow(clippy::unwrap_used)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use switchboard_client::{Client, Connector, Events, TransportOptions, Trust};
use switchboard_protocol::{Body, ConvId, ErrorCode, Event, PresenceInfo, PresenceState, Role, UserId};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, next_entry, no_event, within};

/// Waits for a presence event about `user` in state `state`, skipping other events.
async fn presence_becomes(events: &mut Events, user: UserId, state: PresenceState) -> PresenceInfo {
    within(STEP_DEADLINE, "a presence event", async {
        loop {
            match events.next().await {
                Some(Event::Presence(p)) if p.user == user && p.state == state => return p,
                Some(_) => continue,
                None => panic!("the event stream closed"),
            }
        }
    })
    .await
}

/// Waits for the next typing event, skipping others.
async fn next_typing(events: &mut Events) -> (ConvId, UserId, bool) {
    within(STEP_DEADLINE, "a typing event", async {
        loop {
            match events.next().await {
                Some(Event::Typing { conv, user, typing }) => return (conv, user, typing),
                Some(_) => continue,
                None => panic!("the event stream closed"),
            }
        }
    })
    .await
}

/// Asserts that no typing event arrives within `ms` (other events are skipped).
async fn no_typing(events: &mut Events, ms: u64) {
    let told = typing_for(events, ms).await;
    assert!(told.is_empty(), "unexpected typing events (conv, user, typing): {told:?}");
}

fn connector(tb: &TestBroker, options: &TransportOptions) -> Connector {
    let b = tb.broker.as_ref().unwrap();
    Connector::with_transport(b.local_addr, "localhost", Trust::CaFile(b.cert_path.clone()), options).unwrap()
}

async fn register_with(tb: &TestBroker, name: &str, options: &TransportOptions) -> Client {
    let c = connector(tb, options);
    within(STEP_DEADLINE, "register", c.register(name, tb.password, "test-device")).await.unwrap().0
}

/// A direct conversation between `a` and `b`, once `b` has seen it created (so the
/// broker has delivered the membership entry, and refreshed contact sets).
async fn direct(a: &Client, b_name: &str, b_events: &mut Events) -> ConvId {
    let conv = a.create_direct(b_name).await.unwrap().id;
    assert_eq!(next_entry(b_events).await.conv, conv);
    conv
}

fn now_ms() -> u64 {
    switchboard_broker::now_ms()
}

#[tokio::test]
async fn presence_is_aggregated_over_devices_and_shown_only_to_contacts() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.presence_coalesce_ms = 20).await;
        let (a1, alice) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (eve, _) = tb.register("eve").await;
        let mut bob_events = bob.events().unwrap();
        let mut eve_events = eve.events().unwrap();
        direct(&a1, "bob", &mut bob_events).await;
        let a = alice.user_id;

        a1.set_away(true).await.unwrap();
        presence_becomes(&mut bob_events, a, PresenceState::Away).await;
        // A second device starts online: alice is online again.
        let (a2, _) = tb.login("alice").await;
        presence_becomes(&mut bob_events, a, PresenceState::Online).await;
        a2.set_away(true).await.unwrap();
        presence_becomes(&mut bob_events, a, PresenceState::Away).await;
        a1.set_away(false).await.unwrap();
        let online = presence_becomes(&mut bob_events, a, PresenceState::Online).await;
        assert_eq!(online.name, "alice");
        // Away only when every device is: with a2 away and a1 back, alice is online.
        let shown = bob.presence(&[a]).await.unwrap();
        assert_eq!(shown.iter().map(|p| p.state).collect::<Vec<_>>(), vec![PresenceState::Online]);
        // The away device leaves: the other is online, nothing changes.
        a2.close();
        a1.set_away(true).await.unwrap();
        presence_becomes(&mut bob_events, a, PresenceState::Away).await;
        let before = now_ms();
        a1.close();
        let offline = presence_becomes(&mut bob_events, a, PresenceState::Offline).await;
        assert!(offline.last_seen_ms >= before && offline.last_seen_ms <= now_ms(), "{offline:?}");

        // Requests: only users sharing a conversation, never the caller; empty = all.
        let asked = bob.presence(&[a, eve.user_id, bob.user_id, 999_999]).await.unwrap();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert_eq!((asked[0].user, asked[0].state), (a, PresenceState::Offline));
        assert_eq!(asked[0].last_seen_ms, offline.last_seen_ms);
        let all = bob.presence(&[]).await.unwrap();
        assert_eq!(all.iter().map(|p| p.user).collect::<Vec<_>>(), vec![a]);
        assert!(eve.presence(&[a, bob.user_id]).await.unwrap().is_empty(), "eve shares nothing");
        assert!(eve.presence(&[]).await.unwrap().is_empty());
        let too_many: Vec<UserId> = (1..=257).collect();
        assert!(bob.presence(&too_many).await.is_err());
        // eve was never pushed anyone's presence.
        no_event(&mut eve_events, 200).await;
    })
    .await
}

/// A QUIC socket that sends nothing and receives nothing: a device whose network died
/// without closing anything.
#[derive(Debug)]
struct Unplugged;

#[derive(Debug)]
struct AlwaysWritable;

impl quinn::UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for Unplugged {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, _transmit: &quinn::udp::Transmit) -> io::Result<()> {
        Ok(())
    }

    fn poll_recv(
        &self,
        _cx: &mut Context,
        _bufs: &mut [io::IoSliceMut<'_>],
        _meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::from(([127, 0, 0, 1], 9)))
    }
}

/// On two runtime threads, as a broker runs: the session reads the connection's
/// `TimedOut` while the writer sees its control stream end; a writer that took that end
/// for a stop closed the connection itself and the device's last seen became the time of
/// the timeout (failed 2 runs of 4 so; a review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cut_off_without_a_close_is_offline_within_the_idle_timeout() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.idle_timeout_ms = 1_000;
            c.presence_coalesce_ms = 20;
        })
        .await;
        let alice_connector = tb.connector();
        let (alice, _) =
            within(STEP_DEADLINE, "register", alice_connector.register("alice", tb.password, "phone")).await.unwrap();
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        direct(&alice, "bob", &mut bob_events).await;
        let shown = bob.presence(&[alice.user_id]).await.unwrap();
        assert_eq!(shown[0].state, PresenceState::Online);

        // The phone's network dies: nothing more leaves it, no close is sent.
        alice_connector.endpoint().rebind_abstract(Arc::new(Unplugged)).unwrap();
        let cut = Instant::now();
        let offline = presence_becomes(&mut bob_events, alice.user_id, PresenceState::Offline).await;
        let told_ms = now_ms();
        let took = cut.elapsed();
        // The idle timeout (1 s) after alice's last packet (up to a third more: quinn
        // restarts it once as the broker sends its keep-alive), plus the coalescing window.
        assert!(took < Duration::from_millis(2_500), "offline after {took:?}");
        // Last seen about when she was last heard from, the idle timeout before the
        // broker gave up on her, not then (before: within the coalescing window of it).
        assert!(offline.last_seen_ms + 800 <= told_ms, "last seen {} ms before told", told_ms - offline.last_seen_ms);

        // bob's client keeps alive every 10 s, far beyond this broker's 1 s timeout: the
        // broker's own keep-alives hold his idle connection open.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        within(STEP_DEADLINE, "ping", bob.ping()).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_flapping_device_produces_a_bounded_number_of_presence_events() {
    bounded(async {
        const WINDOW_MS: u64 = 200;
        let tb = TestBroker::start_with(|c| c.presence_coalesce_ms = WINDOW_MS).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        direct(&alice, "bob", &mut bob_events).await;
        // Let alice's first push (online) go out.
        tokio::time::sleep(Duration::from_millis(2 * WINDOW_MS)).await;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), bob_events.next()).await {}

        // 200 changes, one every 5 ms, ending away.
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        for i in 0..=200 {
            tick.tick().await;
            alice.set_away(i % 2 == 0).await.unwrap();
        }
        let flapped_ms = start.elapsed().as_millis() as u64;
        // Count alice's presence events until the trailing one (away) and a quiet window after.
        let mut seen = Vec::new();
        let last = presence_becomes_counting(&mut bob_events, alice.user_id, &mut seen).await;
        assert_eq!(last, PresenceState::Away, "the trailing push carries the latest state");
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(3 * WINDOW_MS), bob_events.next()).await
        {
            if let Event::Presence(p) = event {
                seen.push(p.state);
            }
        }
        assert_eq!(seen.last(), Some(&PresenceState::Away), "{seen:?}");
        let bound = (flapped_ms + 3 * WINDOW_MS) / WINDOW_MS + 2;
        assert!(seen.len() as u64 <= bound, "{} events for {flapped_ms} ms of flapping: {seen:?}", seen.len());
    })
    .await
}

/// Collects alice's presence states until one arrives after the flapping ended (away).
/// A `Presence` answer shows nobody its asker stopped sharing a conversation with while
/// it was being answered: a removal acknowledged while the request waited on its
/// barrier (or a block) is honoured. Before, the answer came from the contacts read
/// before it, and showed the former contact.
#[tokio::test]
async fn a_presence_answer_shows_no_contact_lost_while_it_was_answered() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (_carol, carol_id) = tb.register("carol").await;
        let conv = alice.create_group("g", &["bob".into(), "carol".into()]).await.unwrap().id;
        let ask = switchboard_protocol::RequestBody::Presence { users: vec![carol_id.user_id] };
        let shown = |reply| match reply {
            switchboard_protocol::Reply::Presence(list) => list.iter().map(|p| p.user).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(shown(bob.request(ask.clone()).await.unwrap()), [carol_id.user_id]);
        let mut held = tb.shared().pauses.arm(switchboard_broker::pauses::Point::PresenceQuery);
        let asking = tokio::spawn(async move { bob.request(ask).await });
        within(STEP_DEADLINE, "the query held", held.reached()).await;
        alice.remove_member(conv, carol_id.user_id).await.unwrap();
        held.release();
        let answer = within(STEP_DEADLINE, "the answer", asking).await.unwrap().unwrap();
        assert!(shown(answer).is_empty(), "carol shown after she left the only conversation they shared");
    })
    .await
}

/// The snapshot a device asks for (`Presence { users: [] }`) holds every contact, not
/// the first 256: before, a user sharing groups with 300 people never learnt the state
/// of the last 44 until each changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_presence_snapshot_holds_every_contact() {
    bounded(async {
        const CONTACTS: usize = 300;
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let mut names = Vec::new();
        for i in 0..CONTACTS {
            names.push(format!("c{i}"));
            tb.register(&names[i]).await.0.close();
        }
        let conv = alice.create_group("many", &names[..200]).await.unwrap().id;
        alice.add_members(conv, &names[200..], Role::Member).await.unwrap();
        let snapshot = alice.presence(&[]).await.unwrap();
        assert_eq!(snapshot.len(), CONTACTS, "every contact");
        assert!(snapshot.windows(2).all(|w| w[0].user < w[1].user), "by id");
        let named = alice.presence(&[snapshot[0].user, snapshot[CONTACTS - 1].user]).await.unwrap();
        assert_eq!(named.len(), 2);
        // A session whose event queue is smaller than the snapshot hands every row on as
        // the application takes events (before, the rows past the queue's room were
        // dropped).
        let config = switchboard_client::SessionConfig { event_queue: 64, ..Default::default() };
        let cursors = Arc::new(switchboard_client::MemoryCursors::default());
        let (session, mut events) =
            switchboard_client::Session::start(tb.connector(), alice_id, cursors, config).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut seen = std::collections::HashSet::new();
        within(STEP_DEADLINE, "every contact's presence", async {
            while seen.len() < CONTACTS {
                if let Some(switchboard_client::SessionEvent::Presence(p)) = events.next().await {
                    seen.insert(p.user);
                }
            }
        })
        .await;
        session.close().await;
    })
    .await
}

async fn presence_becomes_counting(events: &mut Events, user: UserId, seen: &mut Vec<PresenceState>) -> PresenceState {
    within(STEP_DEADLINE, "the trailing presence event", async {
        loop {
            match events.next().await {
                Some(Event::Presence(p)) if p.user == user => {
                    seen.push(p.state);
                    if p.state == PresenceState::Away {
                        // Away may also be an intermediate push; the quiet window after
                        // this in the caller settles which was last.
                        return p.state;
                    }
                }
                Some(_) => continue,
                None => panic!("the event stream closed"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn last_seen_survives_a_restart() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        direct(&alice, "bob", &mut bob_events).await;
        let before = now_ms();
        alice.close();
        let offline = presence_becomes(&mut bob_events, alice_id.user_id, PresenceState::Offline).await;
        assert!(offline.last_seen_ms >= before);
        drop((alice, bob, bob_events));
        tb.restart().await;
        let bob = within(STEP_DEADLINE, "reconnect", tb.connector().connect(&bob_id)).await.unwrap();
        let shown = bob.presence(&[alice_id.user_id]).await.unwrap();
        assert_eq!(shown.len(), 1);
        assert_eq!(shown[0].state, PresenceState::Offline);
        assert_eq!(shown[0].last_seen_ms, offline.last_seen_ms, "read back from the store");
    })
    .await
}

/// A user whose going offline the push allowance held back when the broker stopped is
/// shown after the restart last seen when its last device left, not at an earlier push
/// (before, the held change was lost with the stop).
#[tokio::test]
async fn a_last_seen_held_back_at_a_clean_stop_survives_it() {
    bounded(async {
        let mut tb = TestBroker::start_with(|c| c.presence_coalesce_ms = 60_000).await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        direct(&alice, "bob", &mut bob_events).await;
        alice.close();
        // Alice comes and goes within the coalescing window: her last going offline is
        // held back, not pushed (nor stored) before the stop.
        for _ in 0..6 {
            let again = within(STEP_DEADLINE, "reconnect", tb.connector().connect(&alice_id)).await.unwrap();
            again.close();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let left = now_ms();
        let shown = bob.presence(&[alice_id.user_id]).await.unwrap();
        assert_eq!(shown[0].state, PresenceState::Offline);
        assert!(shown[0].last_seen_ms + 1_000 >= left, "{shown:?}");
        drop((alice, bob, bob_events));
        tb.restart().await;
        let bob = within(STEP_DEADLINE, "reconnect", tb.connector().connect(&bob_id)).await.unwrap();
        let after = bob.presence(&[alice_id.user_id]).await.unwrap();
        assert_eq!(after[0].state, PresenceState::Offline);
        assert_eq!(after[0].last_seen_ms, shown[0].last_seen_ms, "as shown before the stop");
    })
    .await
}

/// Across a clean restart a user connected at the stop is shown as it was, not offline,
/// to a contact whose device is back first, and its own return pushes nothing (nothing
/// changed for its contacts); one that was away is still away. Before, everyone was
/// offline at the start and pushed online again as each device came back.
#[tokio::test]
async fn presence_holds_across_a_restart_until_each_user_is_back() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (carol, carol_id) = tb.register("carol").await;
        let (dave, dave_id) = tb.register("dave").await;
        let (bob, bob_id) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        direct(&alice, "bob", &mut bob_events).await;
        direct(&carol, "bob", &mut bob_events).await;
        direct(&dave, "bob", &mut bob_events).await;
        carol.set_away(true).await.unwrap();
        presence_becomes(&mut bob_events, carol_id.user_id, PresenceState::Away).await;
        // Connected as the broker stops (it closes them with `GOING_AWAY`); the operator
        // disables dave while it is stopped: he cannot come back, so is not presumed.
        tb.restart_after(async |config| {
            use switchboard_broker::admin::{AdminRequest, Ops, execute};
            let store = switchboard_broker::open_store(config).unwrap();
            let auth = switchboard_broker::auth::Auth::new(store.clone(), config).unwrap();
            let ops = Ops { store: &store, auth: &auth, broker: None };
            execute(&ops, AdminRequest::UserDisable { name: "dave".into(), disabled: true }).await.unwrap();
            drop(auth);
            store.close_clean().unwrap();
        })
        .await;
        drop((alice, carol, dave, bob, bob_events));
        let bob = within(STEP_DEADLINE, "reconnect", tb.connector().connect(&bob_id)).await.unwrap();
        let mut bob_events = bob.events().unwrap();
        let shown = bob.presence(&[alice_id.user_id, carol_id.user_id, dave_id.user_id]).await.unwrap();
        let state_of = |user| shown.iter().find(|p| p.user == user).map(|p| p.state);
        assert_eq!(state_of(alice_id.user_id), Some(PresenceState::Online), "{shown:?}");
        assert_eq!(state_of(carol_id.user_id), Some(PresenceState::Away), "{shown:?}");
        assert_eq!(state_of(dave_id.user_id), Some(PresenceState::Offline), "disabled while stopped: {shown:?}");
        let _alice = within(STEP_DEADLINE, "reconnect", tb.connector().connect(&alice_id)).await.unwrap();
        let window = tb.shared().config.presence_coalesce_ms;
        let pushed: Vec<Event> = events_within(&mut bob_events, 2 * window + 500)
            .await
            .into_iter()
            .filter(|e| matches!(e, Event::Presence(p) if p.user == alice_id.user_id))
            .collect();
        assert!(pushed.is_empty(), "alice's return was pushed: {pushed:?}");
    })
    .await
}

#[tokio::test]
async fn typing_reaches_other_members_over_datagrams_repeats_extend_and_it_expires() {
    bounded(async {
        // A TTL five times the repeats' gap: a slow machine's stall between two repeats
        // must not end the indicator early.
        let tb = TestBroker::start_with(|c| c.typing_ttl_ms = 1_000).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, _) = tb.register("carol").await;
        let mut alice_events = alice.events().unwrap();
        let mut bob_events = bob.events().unwrap();
        let conv = alice.create_group("team", &["bob".into()]).await.unwrap().id;
        assert_eq!(next_entry(&mut bob_events).await.conv, conv);
        assert!(bob.connection().max_datagram_size().is_some(), "both ends enabled datagrams");

        alice.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true));
        assert!(alice.connection().stats().frame_tx.datagram >= 1, "sent as a datagram");
        assert!(bob.connection().stats().frame_rx.datagram >= 1, "received as a datagram");
        // Repeats within the TTL extend it, pushing nothing, well past one TTL.
        for _ in 0..8 {
            alice.typing(conv, true).await.unwrap();
            no_typing(&mut bob_events, 200).await;
        }
        // No more repeats: it stops by itself, pushed, on the control stream (a lost
        // datagram would leave it shown: before, stops were datagrams too).
        let quiet = Instant::now();
        let datagrams = bob.connection().stats().frame_rx.datagram;
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, false));
        assert!(quiet.elapsed() < Duration::from_millis(3_000), "stopped after {:?}", quiet.elapsed());
        assert_eq!(bob.connection().stats().frame_rx.datagram, datagrams, "the stop came as a datagram");
        // A stranger's signal for the conversation is dropped.
        carol.typing(conv, true).await.unwrap();
        carol.signal(switchboard_protocol::Signal::Typing { conv, typing: true }).await.unwrap();
        no_typing(&mut bob_events, 300).await;
        // The sender's own devices are not told.
        no_typing(&mut alice_events, 0).await;
    })
    .await
}

#[tokio::test]
async fn typing_travels_on_the_stream_to_a_device_without_datagrams() {
    bounded(async {
        let tb = TestBroker::start().await;
        let off = TransportOptions { datagrams: false, ..TransportOptions::default() };
        let alice = register_with(&tb, "alice", &TransportOptions::default()).await;
        let bob = register_with(&tb, "bob", &off).await;
        let carol = register_with(&tb, "carol", &off).await;
        let mut bob_events = bob.events().unwrap();
        let mut alice_events = alice.events().unwrap();
        let conv = alice.create_group("team", &["bob".into(), "carol".into()]).await.unwrap().id;
        assert_eq!(next_entry(&mut bob_events).await.conv, conv);

        // alice sends a datagram; bob receives on his stream.
        alice.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true));
        assert_eq!(bob.connection().stats().frame_rx.datagram, 0);
        // carol sends on her stream; alice receives a datagram.
        carol.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut alice_events).await, (conv, carol.user_id, true));
        assert!(alice.connection().stats().frame_rx.datagram >= 1);
        assert_eq!(carol.connection().stats().frame_tx.datagram, 0);
        carol.typing(conv, false).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, carol.user_id, true));
        assert_eq!(next_typing(&mut bob_events).await, (conv, carol.user_id, false));
    })
    .await
}

#[tokio::test]
async fn a_message_clears_typing_and_no_late_stop_follows() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.typing_ttl_ms = 500).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = direct(&alice, "bob", &mut bob_events).await;
        alice.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true));
        alice.send(conv, "hi").await.unwrap();
        assert_eq!(next_entry(&mut bob_events).await.sender, alice.user_id);
        // Past the TTL: the cleared indicator pushes no "stopped".
        no_typing(&mut bob_events, 900).await;
        // And a new start is a change again.
        alice.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true));
        // A message carrying files clears it the same way (before, only a text did, and
        // the indicator ran on to its TTL).
        let data = b"notes";
        let file = switchboard_tests::begin_upload(&alice, "notes.txt", "text/plain", data).await.file;
        switchboard_tests::upload_rest(alice.connection(), file, data, 0).await;
        let files = switchboard_protocol::RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: String::new(),
            files: vec![file],
        };
        alice.request(files).await.unwrap();
        let entry = next_entry(&mut bob_events).await;
        assert_eq!(entry.sender, alice.user_id);
        assert!(matches!(&entry.body, Body::Files { files, .. } if files[0].file == file), "{:?}", entry.body);
        no_typing(&mut bob_events, 900).await;
        alice.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true), "cleared, so a change again");
    })
    .await
}

/// alice types on two devices: bob's indicator stands until the last device stops.
/// Before, the second device's stop (or its closing) ended it while the first still
/// typed, and the first's next repeat started it again: bob saw it flicker.
#[tokio::test]
async fn typing_on_two_devices_stands_until_the_last_one_stops() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (a1, _) = tb.register("alice").await;
        let (a2, _) = tb.login("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = direct(&a1, "bob", &mut bob_events).await;
        let alice = a1.user_id;

        a1.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice, true));
        a2.typing(conv, true).await.unwrap();
        a2.typing(conv, false).await.unwrap();
        no_typing(&mut bob_events, 400).await;
        a1.typing(conv, true).await.unwrap();
        no_typing(&mut bob_events, 300).await;
        // The second device starts again and goes away: its end is not alice's.
        a2.typing(conv, true).await.unwrap();
        a2.close();
        no_typing(&mut bob_events, 400).await;
        a1.typing(conv, false).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice, false));
    })
    .await
}

/// A typist's indicator standing when a member blocks it is stopped on the blocker's
/// devices at once (the typist's own stop, later, is filtered like any event between
/// the two); the other members still see it. Before, the blocker saw the blocked user
/// typing until it reconnected (a review of this session's change).
#[tokio::test]
async fn blocking_a_typist_stops_its_indicator_for_the_blocker_only() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.typing_ttl_ms = 60_000).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, _) = tb.register("carol").await;
        let mut alice_events = alice.events().unwrap();
        let mut carol_events = carol.events().unwrap();
        let conv = alice.create_group("team", &["bob".into(), "carol".into()]).await.unwrap().id;
        assert_eq!(next_entry(&mut carol_events).await.conv, conv);
        bob.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut alice_events).await, (conv, bob.user_id, true));
        assert_eq!(next_typing(&mut carol_events).await, (conv, bob.user_id, true));
        alice.block("bob", true).await.unwrap();
        assert_eq!(next_typing(&mut alice_events).await, (conv, bob.user_id, false));
        no_typing(&mut carol_events, 300).await;
    })
    .await
}

/// Typing events for `ms` (others skipped): what `events` was told of typing meanwhile.
async fn typing_for(events: &mut Events, ms: u64) -> Vec<(ConvId, UserId, bool)> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    let mut told = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return told,
            Ok(Some(Event::Typing { conv, user, typing })) => told.push((conv, user, typing)),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the event stream closed"),
        }
    }
}

/// An indicator that ended just before a block, its stop taken by the pusher and not yet
/// pushed, is stopped for the blocker by the block. Before, the block stopped only the
/// indicators still standing, the pusher's audience (read after the block) left the
/// blocker out, and the blocker saw the typist typing until it reconnected (an attacker
/// review).
#[tokio::test]
async fn an_indicator_that_ended_just_before_a_block_is_stopped_for_the_blocker() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.typing_ttl_ms = 60_000).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut alice_events = alice.events().unwrap();
        let conv = alice.create_group("team", &["bob".into()]).await.unwrap().id;
        bob.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut alice_events).await, (conv, bob.user_id, true));
        let mut held = tb.shared().pauses.arm(switchboard_broker::pauses::Point::TypingDrain);
        bob.typing(conv, false).await.unwrap();
        held.reached().await;
        alice.block("bob", true).await.unwrap();
        held.release();
        assert_eq!(next_typing(&mut alice_events).await, (conv, bob.user_id, false));

        // An indicator that ends while the block is being stored (the pusher sees the
        // stored block before the block has stopped anything): its stop still reaches
        // the blocker. Before, the pusher left the blocker out, the block then found
        // nothing standing, and the stop was lost (a review).
        let (carol, _) = tb.register("carol").await;
        let conv = alice.create_group("two", &["carol".into()]).await.unwrap().id;
        carol.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut alice_events).await, (conv, carol.user_id, true));
        let mut held = tb.shared().pauses.arm(switchboard_broker::pauses::Point::BlockStored);
        let stopped = async {
            held.reached().await;
            carol.typing(conv, false).await.unwrap();
            let told = next_typing(&mut alice_events).await;
            held.release();
            told
        };
        let (blocked, told) = tokio::join!(alice.block("carol", true), stopped);
        blocked.unwrap();
        assert_eq!(told, (conv, carol.user_id, false));
    })
    .await
}

/// Alice's group "team" with bob, carol and dave, once carol and dave have its entry.
struct Team {
    alice: Client,
    bob: Client,
    carol: Client,
    /// Connected, so that dave's events come.
    _dave: Client,
    alice_events: Events,
    carol_events: Events,
    dave_events: Events,
    conv: ConvId,
}

async fn team(tb: &TestBroker) -> Team {
    let (alice, _) = tb.register("alice").await;
    let (bob, _) = tb.register("bob").await;
    let (carol, _) = tb.register("carol").await;
    let (dave, _) = tb.register("dave").await;
    let (alice_events, mut carol_events) = (alice.events().unwrap(), carol.events().unwrap());
    let mut dave_events = dave.events().unwrap();
    let conv = alice.create_group("team", &["bob".into(), "carol".into(), "dave".into()]).await.unwrap().id;
    assert_eq!(next_entry(&mut carol_events).await.conv, conv);
    assert_eq!(next_entry(&mut dave_events).await.conv, conv);
    Team { alice, bob, carol, _dave: dave, alice_events, carol_events, dave_events, conv }
}

/// A start whose audience the pusher read before a block or a departure reaches neither
/// the blocker nor the member who left. Before, it went out after the block's stop or
/// the removal's entry, and stood for good on their devices (no stop follows for them:
/// an attacker review).
#[tokio::test]
async fn a_start_read_for_an_audience_before_a_block_or_a_removal_reaches_neither() {
    bounded(async {
        use switchboard_broker::pauses::Point;
        let tb = TestBroker::start_with(|c| c.typing_ttl_ms = 60_000).await;
        let Team { alice, bob, carol, _dave, mut alice_events, mut carol_events, mut dave_events, conv } =
            team(&tb).await;

        let mut held = tb.shared().pauses.arm(Point::TypingAudience);
        bob.typing(conv, true).await.unwrap();
        held.reached().await;
        alice.block("bob", true).await.unwrap();
        alice.remove_member(conv, carol.user_id).await.unwrap();
        assert!(matches!(next_entry(&mut carol_events).await.body, Body::MemberRemoved { .. }));
        held.release();
        assert_eq!(next_typing(&mut dave_events).await, (conv, bob.user_id, true), "a member is told");
        let to_alice = typing_for(&mut alice_events, 600).await;
        assert!(to_alice.iter().all(|&(_, _, typing)| !typing), "the blocker was told a start: {to_alice:?}");
        let to_carol = typing_for(&mut carol_events, 0).await;
        assert!(to_carol.is_empty(), "the removed member was told: {to_carol:?}");
    })
    .await
}

/// A presence change whose contacts the pusher read before a removal or a block reaches
/// neither the removed member nor the blocker; the other contacts are told. Before, it
/// went out after the removal's entry and after the block was answered (a review).
#[tokio::test]
async fn a_presence_change_read_for_contacts_before_a_removal_or_a_block_reaches_neither() {
    bounded(async {
        use switchboard_broker::pauses::Point;
        let tb = TestBroker::start_with(|c| c.presence_coalesce_ms = 20).await;
        let Team { alice, bob, carol, _dave, mut alice_events, mut carol_events, mut dave_events, conv } =
            team(&tb).await;
        // Every push due before this one (the connects') has gone by the time it arrives,
        // so each one held below is bob's.
        bob.set_away(true).await.unwrap();
        for events in [&mut alice_events, &mut carol_events, &mut dave_events] {
            presence_becomes(events, bob.user_id, PresenceState::Away).await;
        }
        let bobs = |events: Vec<Event>| -> Vec<Event> {
            events.into_iter().filter(|e| matches!(e, Event::Presence(p) if p.user == bob.user_id)).collect()
        };

        let mut held = tb.shared().pauses.arm(Point::PresencePush);
        bob.set_away(false).await.unwrap();
        held.reached().await;
        alice.remove_member(conv, carol.user_id).await.unwrap();
        assert!(matches!(next_entry(&mut carol_events).await.body, Body::MemberRemoved { .. }));
        held.release();
        presence_becomes(&mut dave_events, bob.user_id, PresenceState::Online).await;
        presence_becomes(&mut alice_events, bob.user_id, PresenceState::Online).await;
        let to_carol = bobs(events_within(&mut carol_events, 300).await);
        assert!(to_carol.is_empty(), "the removed member was told: {to_carol:?}");

        let mut held = tb.shared().pauses.arm(Point::PresencePush);
        bob.set_away(true).await.unwrap();
        held.reached().await;
        alice.block("bob", true).await.unwrap();
        held.release();
        presence_becomes(&mut dave_events, bob.user_id, PresenceState::Away).await;
        let to_alice = bobs(events_within(&mut alice_events, 300).await);
        assert!(to_alice.is_empty(), "the blocker was told: {to_alice:?}");
    })
    .await
}

/// A device that connects while someone types in one of its conversations is told so
/// at once (before, it saw nothing until the typist's next change, which could be the
/// message itself: a new user's trial); a stranger connecting is told nothing, and the
/// stop still follows.
#[tokio::test]
async fn a_device_that_connects_is_told_who_is_typing() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.typing_ttl_ms = 60_000).await;
        // Alice signals on her control stream: her signal is taken before her ping is
        // answered (a datagram could come after bob connected, and reach him as a push).
        let off = TransportOptions { datagrams: false, ..TransportOptions::default() };
        let alice = register_with(&tb, "alice", &off).await;
        let (bob, bob_id) = tb.register("bob").await;
        let (carol, carol_id) = tb.register("carol").await;
        drop((bob, carol));
        let conv = alice.create_group("plans", &["bob".into()]).await.unwrap().id;
        alice.typing(conv, true).await.unwrap();
        alice.ping().await.unwrap();
        let bob = within(STEP_DEADLINE, "bob connects", tb.connector().connect(&bob_id)).await.unwrap();
        let carol = within(STEP_DEADLINE, "carol connects", tb.connector().connect(&carol_id)).await.unwrap();
        let (mut bob_events, mut carol_events) = (bob.events().unwrap(), carol.events().unwrap());
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true));
        alice.typing(conv, false).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, false));
        no_typing(&mut carol_events, 300).await;
    })
    .await
}

#[tokio::test]
async fn typing_does_not_survive_a_restart() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = direct(&alice, "bob", &mut bob_events).await;
        alice.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true));
        drop((alice, bob, bob_events));
        tb.restart().await;
        let alice = within(STEP_DEADLINE, "reconnect", tb.connector().connect(&alice_id)).await.unwrap();
        let bob = within(STEP_DEADLINE, "reconnect", tb.connector().connect(&bob_id)).await.unwrap();
        let mut bob_events = bob.events().unwrap();
        bob.ping().await.unwrap();
        // Nothing to stop: the broker forgot the indicator.
        alice.typing(conv, false).await.unwrap();
        no_typing(&mut bob_events, 300).await;
        // So a start is a change (pushed), not a repeat.
        alice.typing(conv, true).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (conv, alice.user_id, true));
    })
    .await
}

#[tokio::test]
async fn a_user_with_many_devices_has_one_typing_allowance() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (a1, _) = tb.register("alice").await;
        let (a2, _) = tb.login("alice").await;
        let (a3, _) = tb.login("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = direct(&a1, "bob", &mut bob_events).await;
        let start = Instant::now();
        for i in 0..30 {
            for device in [&a1, &a2, &a3] {
                device.signal(switchboard_protocol::Signal::Typing { conv, typing: i % 2 == 0 }).await.unwrap();
            }
        }
        for device in [&a1, &a2, &a3] {
            device.ping().await.unwrap();
        }
        let sent_for = start.elapsed();
        let mut got = 0u64;
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(300), bob_events.next()).await {
            if matches!(event, Event::Typing { .. }) {
                got += 1;
            }
        }
        // 90 alternating signals from three devices: with an allowance per connection each
        // device would get its own burst of 8 (24 pushed); per user, the three share one.
        let allowed = 8 + 2 * (sent_for.as_millis() as u64 + 300) / 1000 + 1;
        assert!(got >= 1 && got <= allowed, "{got} typing events pushed for 90 signals in {sent_for:?}");
    })
    .await
}

#[tokio::test]
async fn a_session_cannot_amplify_typing_beyond_its_rate() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let conv = direct(&alice, "bob", &mut bob_events).await;
        let start = Instant::now();
        for i in 0..100 {
            alice.typing(conv, i % 2 == 0).await.unwrap();
            // Force ordering on the stream side too: signals and requests share it.
            alice.signal(switchboard_protocol::Signal::Typing { conv, typing: i % 2 == 1 }).await.unwrap();
        }
        alice.ping().await.unwrap();
        let sent_for = start.elapsed();
        let mut got = 0u64;
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(300), bob_events.next()).await {
            if matches!(event, Event::Typing { .. }) {
                got += 1;
            }
        }
        // 200 alternating signals: without the bucket nearly all would be pushed. The
        // bucket allows a burst of 8 and 2 a second.
        let allowed = 8 + 2 * (sent_for.as_millis() as u64 + 300) / 1000 + 1;
        assert!(got >= 1 && got <= allowed, "{got} typing events pushed for 200 signals in {sent_for:?}");
    })
    .await
}

/// Every event that arrives within `ms`.
async fn events_within(events: &mut Events, ms: u64) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.next()).await {
        out.push(e);
    }
    out
}

/// The error code and message of a refused request.
fn refusal<T: std::fmt::Debug>(
    result: Result<T, switchboard_client::ClientError>,
) -> (switchboard_protocol::ErrorCode, String) {
    match result {
        Err(switchboard_client::ClientError::Server(e)) => (e.code, e.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_blocked_stranger_loses_every_way_to_reach_or_watch_its_blocker() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.presence_coalesce_ms = 20;
            c.typing_ttl_ms = 5_000;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (mallory, _) = tb.register("mallory").await;
        let (bob, _) = tb.register("bob").await;
        let mut alice_events = alice.events().unwrap();
        let mut mallory_events = mallory.events().unwrap();
        let a = alice.user_id;
        // Before: a stranger who names alice shares a conversation with her, so it sees
        // her presence, and may pull her into groups again and again.
        let dm = mallory.create_direct("alice").await.unwrap().id;
        let spam = mallory.create_group("spam", &["alice".into()]).await.unwrap().id;
        let shared = bob.create_group("club", &["alice".into(), "mallory".into()]).await.unwrap().id;
        assert_eq!(mallory.presence(&[a]).await.unwrap().len(), 1);
        alice.set_away(true).await.unwrap();
        presence_becomes(&mut mallory_events, a, PresenceState::Away).await;
        alice.leave(spam).await.unwrap();

        assert_eq!(refusal(alice.block("alice", true).await).0, ErrorCode::INVALID);
        assert_eq!(refusal(alice.block("nobody", true).await).0, ErrorCode::NOT_FOUND);
        alice.block("mallory", true).await.unwrap();
        alice.block("mallory", true).await.unwrap(); // the same again changes nothing
        let blocked = alice.blocked_users().await.unwrap();
        assert_eq!(blocked.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(), ["mallory"]);
        assert!(mallory.blocked_users().await.unwrap().is_empty(), "a block is one user's own list");

        // No message, no new conversation, no re-adding.
        let sent = refusal(mallory.send(dm, "hello?").await);
        assert_eq!(sent, (ErrorCode::FORBIDDEN, "alice does not accept messages from you".to_owned()));
        // Nor from the blocker: unblock to write (before, alice wrote on to mallory).
        let sent = refusal(alice.send(dm, "go away").await);
        assert_eq!(sent, (ErrorCode::FORBIDDEN, "you block mallory: unblock them to write here".to_owned()));
        let opened = refusal(mallory.create_direct("alice").await);
        assert_eq!(opened, (ErrorCode::FORBIDDEN, "alice does not accept conversations from you".to_owned()));
        let grouped = refusal(mallory.create_group("spam2", &["alice".into()]).await);
        assert_eq!(grouped, (ErrorCode::FORBIDDEN, "alice does not accept being added by you".to_owned()));
        let added = refusal(mallory.add_members(spam, &["alice".into()], Role::Member).await);
        assert_eq!(added, (ErrorCode::FORBIDDEN, "alice does not accept being added by you".to_owned()));

        // Presence, either way: not asked, not pushed.
        assert!(mallory.presence(&[a]).await.unwrap().is_empty());
        assert!(alice.presence(&[mallory.user_id]).await.unwrap().is_empty());
        assert_eq!(alice.presence(&[]).await.unwrap().iter().map(|p| p.user).collect::<Vec<_>>(), [bob.user_id]);
        alice.set_away(false).await.unwrap();
        // Typing in the group they share, either way: the blocker does not hear the
        // blocked user, nor the other way round; everyone else does.
        let mut bob_events = bob.events().unwrap();
        mallory.signal(switchboard_protocol::Signal::Typing { conv: shared, typing: true }).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (shared, mallory.user_id, true));
        alice.signal(switchboard_protocol::Signal::Typing { conv: shared, typing: true }).await.unwrap();
        assert_eq!(next_typing(&mut bob_events).await, (shared, a, true));
        no_typing(&mut alice_events, 300).await;
        let seen = events_within(&mut mallory_events, 100).await;
        assert!(
            !seen.iter().any(|e| matches!(e, Event::Typing { .. }) || matches!(e, Event::Presence(p) if p.user == a)),
            "mallory was pushed none of alice's typing or presence after the block: {seen:?}"
        );
        // In the group they share, mallory's words still reach every member.
        let said = mallory.send(shared, "hi all").await.unwrap();
        assert_eq!(next_entry(&mut alice_events).await.seq, said);

        // Unblocked: as before.
        alice.block("mallory", false).await.unwrap();
        assert!(alice.blocked_users().await.unwrap().is_empty());
        mallory.send(dm, "truce").await.unwrap();
        assert_eq!(mallory.presence(&[a]).await.unwrap().len(), 1);
        mallory.add_members(spam, &["alice".into()], Role::Member).await.unwrap();
    })
    .await
}

/// A presence query naming users draws on the allowance of member rows too (it may
/// rebuild the caller's contact set, thousands of reads): past the allowance it is
/// refused `RATE_LIMITED`, as a snapshot and member lists are. Before, only a snapshot
/// was checked (an attacker review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_query_naming_users_draws_on_the_member_rows_allowance() {
    bounded(async {
        // A burst of 2 rows, refilled at 1 a second.
        let tb = TestBroker::start_with(|c| c.member_rows_per_sec = 1).await;
        let (alice, _) = tb.register("alice").await;
        let (_bob, bob_id) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        assert_eq!(alice.members(conv).await.unwrap().len(), 2, "two rows: the allowance spent");
        // Refilled a little meanwhile (any allowance left lets a read through): once more,
        // into debt for two seconds.
        let _ = alice.members(conv).await;
        let refused = alice.presence(&[bob_id.user_id]).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::RATE_LIMITED), "{refused}");
    })
    .await
}

/// Each user a named presence query shows spends a row of the member-rows allowance, as
/// a snapshot's do: before, only the rebuild of the caller's contacts was charged, and
/// the same contacts asked for over and over (up to 256 a query, two reads each) were
/// never refused (an attacker review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_a_named_presence_query_shows_is_charged() {
    bounded(async {
        // A burst of 200 rows, refilled at 100 a second.
        let tb = TestBroker::start_with(|c| c.member_rows_per_sec = 100).await;
        let (alice, _) = tb.register("alice").await;
        let mut named = Vec::new();
        for name in ["bob", "carol", "dave"] {
            let (_, id) = tb.register(name).await;
            named.push(id.user_id);
        }
        alice.create_group("g", &["bob".into(), "carol".into(), "dave".into()]).await.unwrap();
        // 200 queries of three rows: 600 rows against 200 and what refills meanwhile.
        for query in 0..200 {
            match alice.presence(&named).await {
                Ok(shown) => assert_eq!(shown.len(), 3),
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::RATE_LIMITED), "{e}");
                    assert!(query > 30, "refused at query {query}: the rows were not the cost");
                    return;
                }
            }
        }
        panic!("200 named queries of three users each were never refused");
    })
    .await
}

/// Presence follows a group's membership both ways while its members stay online (their
/// kept contact sets are brought up to date from the membership entries delivered, the
/// newcomers checked for blocks, rather than read whole again): a member added is shown
/// to the others and its changes reach them, but not those it blocks; one removed is
/// shown to nobody it shares nothing else with, while a member it shares a direct
/// conversation with still sees it.
#[tokio::test]
async fn presence_follows_a_groups_membership_while_its_members_stay_online() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.presence_coalesce_ms = 20).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, _) = tb.register("carol").await;
        let (dave, dave_id) = tb.register("dave").await;
        let (erin, erin_id) = tb.register("erin").await;
        let mut bob_events = bob.events().unwrap();
        let mut carol_events = carol.events().unwrap();
        let mut dave_events = dave.events().unwrap();
        erin.block("bob", true).await.unwrap();
        direct(&carol, "dave", &mut dave_events).await;
        let conv = alice.create_group("g", &["bob".into(), "carol".into()]).await.unwrap().id;
        assert_eq!(next_entry(&mut bob_events).await.conv, conv);
        // Each member's contact set is kept from here on.
        assert!(bob.presence(&[dave_id.user_id, erin_id.user_id]).await.unwrap().is_empty(), "no contacts yet");
        assert_eq!(carol.presence(&[]).await.unwrap().len(), 3, "alice, bob, dave");

        alice.add_members(conv, &["dave".into(), "erin".into()], Role::Member).await.unwrap();
        assert!(matches!(next_entry(&mut bob_events).await.body, Body::MembersAdded { .. }));
        let shown: Vec<UserId> = bob.presence(&[]).await.unwrap().iter().map(|p| p.user).collect();
        assert!(shown.contains(&dave_id.user_id), "the added member is shown: {shown:?}");
        assert!(!shown.contains(&erin_id.user_id), "erin blocks bob: {shown:?}");
        dave.set_away(true).await.unwrap();
        presence_becomes(&mut bob_events, dave_id.user_id, PresenceState::Away).await;
        erin.set_away(true).await.unwrap();
        let erins = |events: Vec<Event>| {
            events.into_iter().filter(|e| matches!(e, Event::Presence(p) if p.user == erin_id.user_id)).count()
        };
        assert_eq!(erins(events_within(&mut bob_events, 300).await), 0, "erin's presence reached bob");

        alice.remove_member(conv, dave_id.user_id).await.unwrap();
        assert!(matches!(next_entry(&mut bob_events).await.body, Body::MemberRemoved { .. }));
        assert!(bob.presence(&[dave_id.user_id]).await.unwrap().is_empty(), "removed: not shown");
        dave.set_away(false).await.unwrap();
        presence_becomes(&mut carol_events, dave_id.user_id, PresenceState::Online).await;
        let daves = events_within(&mut bob_events, 300).await;
        assert!(
            !daves.iter().any(|e| matches!(e, Event::Presence(p) if p.user == dave_id.user_id)),
            "dave's presence reached bob after his removal: {daves:?}"
        );
        assert_eq!(carol.presence(&[dave_id.user_id]).await.unwrap().len(), 1, "still a direct contact");
    })
    .await
}
