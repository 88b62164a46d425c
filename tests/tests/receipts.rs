//! Receipts, unread counts, settings and catch-up (PROTOCOL.md section 11), end to end:
//! a real broker, real QUIC, sled in a temp dir.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use switchboard_client::{Client, ClientError, Events};
use switchboard_protocol::limits::MAX_MARKS_PER_REQUEST;
use switchboard_protocol::{Body, ErrorCode, Event, Receipt, Role, Settings, UserId};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, next_entry, within};

fn code(result: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    match result {
        Err(e) => e.code(),
        Ok(v) => panic!("expected a refusal, got {v:?}"),
    }
}

/// Read with no conversation actor running (answered from the store), a catch-up page
/// that completes carries every member's receipts, however small its limit, and one
/// that does not carries none (and reads no member list).
#[tokio::test]
async fn catch_up_pages_at_rest_carry_every_members_receipts_when_they_complete() {
    use switchboard_protocol::{Reply, RequestBody};
    bounded(async {
        let tb = TestBroker::start_with(|c| c.conversation_idle_ms = 100).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        tb.register("carol").await;
        let conv = alice.create_group("g", &["bob".into(), "carol".into()]).await.unwrap().id;
        for i in 0..5 {
            alice.send(conv, &format!("m{i}")).await.unwrap();
        }
        let shared = tb.shared().clone();
        within(STEP_DEADLINE, "the actor retiring", async {
            while shared.convs.live() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        let page = |after, limit| {
            let bob = &bob;
            async move {
                match bob.request(RequestBody::CatchUp { conv, after, limit }).await.unwrap() {
                    Reply::CatchUp(p) => (p.entries.len(), p.complete, p.receipts.len()),
                    other => panic!("{other:?}"),
                }
            }
        };
        assert_eq!(page(0, 2).await, (2, false, 0));
        assert_eq!(page(0, 6).await, (6, true, 3));
        assert_eq!(page(5, 0).await, (1, true, 3), "a limit of 0 is 1");
        assert_eq!(page(6, 1).await, (0, true, 3));
        assert_eq!(shared.convs.live(), 0, "all read at rest");
    })
    .await
}

#[tokio::test]
async fn catch_up_pages_through_the_log_and_merges_with_live_events() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (eve, _) = tb.register("eve").await;
        let mut events = bob.events().unwrap();
        let conv = alice.create_group("catch", &["bob".into()]).await.unwrap().id;
        for i in 0..7 {
            alice.send(conv, &format!("m{i}")).await.unwrap();
        }
        let deleted = alice.send(conv, "gone soon").await.unwrap();
        alice.delete(conv, deleted).await.unwrap();
        let mut cursor = 0;
        let mut pages = 0;
        let mut held = Vec::new();
        loop {
            let page = bob.catch_up(conv, cursor, 3).await.unwrap();
            pages += 1;
            assert_eq!(page.conv, conv);
            assert_eq!(page.last_seq, 10);
            let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, ((cursor + 1)..=(cursor + seqs.len() as u64)).collect::<Vec<_>>(), "gapless");
            held.extend(page.entries);
            cursor = held.last().unwrap().seq;
            if page.complete {
                assert_eq!(cursor, page.last_seq);
                break;
            }
            assert!(page.receipts.is_empty(), "receipts come with the completing page only");
        }
        assert_eq!(pages, 4, "3 + 3 + 3 + 1 entries");
        assert_eq!(held[8].body, Body::Tombstone, "as history shows it");
        // Once complete, what arrives live follows on without a gap: the events already
        // held are duplicates of the pages, merged by seq.
        let next = alice.send(conv, "live").await.unwrap();
        assert_eq!(next, cursor + 1);
        loop {
            let seq = next_entry(&mut events).await.seq;
            if seq > cursor {
                assert_eq!(seq, next);
                break;
            }
        }
        let page = bob.catch_up(conv, next, 100).await.unwrap();
        assert!(page.entries.is_empty() && page.complete, "{page:?}");
        // A stranger learns nothing, whether or not the conversation exists.
        let real = code(eve.catch_up(conv, 0, 10).await);
        assert_eq!(real, Some(ErrorCode::FORBIDDEN));
        assert_eq!(code(eve.catch_up(conv + 1000, 0, 10).await), real);
    })
    .await
}

/// The next receipt event (entry events before it are skipped).
async fn next_receipt(events: &mut Events) -> Receipt {
    within(STEP_DEADLINE, "a receipt event", async {
        loop {
            match events.next().await {
                Some(Event::Receipt(r)) => return r,
                Some(_) => continue,
                None => panic!("the event stream ended"),
            }
        }
    })
    .await
}

/// "Delivered to k of n" and "read by k" for message `seq`, from receipts seen by
/// `me`: the other members whose watermarks reach it.
fn tally(receipts: &BTreeMap<UserId, Receipt>, me: UserId, seq: u64) -> (usize, usize) {
    let others = receipts.values().filter(|r| r.user != me);
    let delivered = others.clone().filter(|r| r.delivered_up_to >= seq).count();
    let read = others.filter(|r| r.read_up_to.is_some_and(|s| s >= seq)).count();
    (delivered, read)
}

#[tokio::test]
async fn a_group_of_five_reaches_delivered_to_4_of_4_and_read_by_2() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let mut others = Vec::new();
        for name in ["bob", "carol", "dave", "erin"] {
            others.push(tb.register(name).await.0);
        }
        let names: Vec<String> = ["bob", "carol", "dave", "erin"].iter().map(|s| s.to_string()).collect();
        let conv = alice.create_group("five", &names).await.unwrap().id;
        let mut events = alice.events().unwrap();
        let seq = alice.send(conv, "did you get this?").await.unwrap();
        let mut seen = BTreeMap::new();
        for (i, member) in others.iter().enumerate() {
            member.mark_delivered(&[(conv, seq)]).await.unwrap();
            // Each report reaches alice as an event, once durable.
            loop {
                let r = next_receipt(&mut events).await;
                assert_eq!(r.conv, conv);
                seen.insert(r.user, r);
                if tally(&seen, alice.user_id, seq).0 == i + 1 {
                    break;
                }
            }
        }
        assert_eq!(tally(&seen, alice.user_id, seq), (4, 0), "delivered to 4 of 4, read by none");
        let listed: BTreeMap<UserId, Receipt> =
            alice.receipts(conv).await.unwrap().into_iter().map(|r| (r.user, r)).collect();
        assert_eq!(listed.len(), 5, "every member is listed");
        assert_eq!(tally(&listed, alice.user_id, seq), (4, 0));
        for member in &others[..2] {
            let mine = member.mark_read(conv, seq).await.unwrap();
            assert_eq!((mine.user, mine.delivered_up_to, mine.read_up_to), (member.user_id, seq, Some(seq)));
        }
        while tally(&seen, alice.user_id, seq).1 < 2 {
            let r = next_receipt(&mut events).await;
            seen.insert(r.user, r);
        }
        let listed: BTreeMap<UserId, Receipt> =
            alice.receipts(conv).await.unwrap().into_iter().map(|r| (r.user, r)).collect();
        assert_eq!(tally(&listed, alice.user_id, seq), (4, 2), "read by 2");
        // A later message: delivered to nobody yet; an older report changes nothing.
        let next = alice.send(conv, "and this?").await.unwrap();
        others[0].mark_delivered(&[(conv, seq - 1)]).await.unwrap();
        let listed: BTreeMap<UserId, Receipt> =
            alice.receipts(conv).await.unwrap().into_iter().map(|r| (r.user, r)).collect();
        assert_eq!(tally(&listed, alice.user_id, next), (0, 0));
        assert_eq!(listed[&others[0].user_id].delivered_up_to, seq, "never goes back");
        // A report beyond the log is clamped to it.
        let mine = others[3].mark_read(conv, next + 100).await.unwrap();
        assert_eq!((mine.delivered_up_to, mine.read_up_to), (next, Some(next)));
    })
    .await
}

/// In a group, a member's receipts do not reach the members it blocks, live or read
/// (at rest too: the actor retired in between), while the others see them and the
/// blocker sees the blocked member's. Before, bob was told when carol, who blocks him,
/// came online and what she read.
#[tokio::test]
async fn a_group_members_receipts_do_not_reach_whom_it_blocks() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.conversation_idle_ms = 100).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        let (carol, carol_id) = tb.register("carol").await;
        carol.block("bob", true).await.unwrap();
        let conv = alice.create_group("g", &["bob".into(), "carol".into()]).await.unwrap().id;
        let mut bob_events = bob.events().unwrap();
        let seq = alice.send(conv, "hello").await.unwrap();
        next_entry(&mut bob_events).await;
        carol.mark_read(conv, seq).await.unwrap();
        bob.mark_read(conv, seq).await.unwrap();
        // Bob hears his own receipt, and nothing of carol's before or after it.
        let mut heard = Vec::new();
        within(STEP_DEADLINE, "bob's own receipt", async {
            while !heard.contains(&bob_id.user_id) {
                match bob_events.next().await {
                    Some(Event::Receipt(r)) => heard.push(r.user),
                    Some(Event::Receipts(list)) => heard.extend(list.iter().map(|r| r.user)),
                    Some(_) => continue,
                    None => panic!("the event stream ended"),
                }
            }
        })
        .await;
        assert!(!heard.contains(&carol_id.user_id), "{heard:?}");
        let shared = tb.shared().clone();
        within(STEP_DEADLINE, "the actor retiring", async {
            while shared.convs.live() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        let of = |list: Vec<Receipt>, user: UserId| {
            list.into_iter().find(|r| r.user == user).map(|r| (r.delivered_up_to, r.read_up_to)).unwrap()
        };
        assert_eq!(of(bob.receipts(conv).await.unwrap(), carol_id.user_id), (0, None), "hidden from bob");
        assert_eq!(of(alice.receipts(conv).await.unwrap(), carol_id.user_id), (seq, Some(seq)));
        assert_eq!(of(carol.receipts(conv).await.unwrap(), bob_id.user_id), (seq, Some(seq)), "carol sees bob's");
    })
    .await
}

async fn unread(client: &Client, conv: u64) -> (u64, u64, u64) {
    let states = client.conversation_states().await.unwrap();
    let s = states.iter().find(|s| s.summary.id == conv).expect("the conversation is listed");
    (s.unread, s.read_up_to, s.summary.last_seq)
}

#[tokio::test]
async fn unread_counts_are_exact_across_devices_reconnects_and_a_restart() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        let (phone, _) = tb.login("bob").await;
        let conv = alice.create_group("unread", &["bob".into()]).await.unwrap().id;
        assert_eq!(unread(&bob, conv).await, (0, 0, 1), "a creation is not a message");
        let a1 = alice.send(conv, "one").await.unwrap();
        let a2 = alice.send(conv, "two").await.unwrap();
        assert_eq!(unread(&bob, conv).await, (2, 0, a2));
        bob.send(conv, "mine").await.unwrap();
        let a3 = alice.send(conv, "three").await.unwrap();
        assert_eq!(unread(&bob, conv).await.0, 3, "my own messages never count");
        assert_eq!(unread(&alice, conv).await.0, 1, "alice has bob's one");
        // Edits and deletes are not messages; a deleted message still counts.
        alice.edit(conv, a1, "one, edited").await.unwrap();
        let last = alice.delete(conv, a2).await.unwrap();
        assert_eq!(unread(&bob, conv).await, (3, 0, last));
        // Bob reads up to a2 on his phone: his laptop hears of it at once.
        let mut laptop_events = bob.events().unwrap();
        let mine = phone.mark_read(conv, a2).await.unwrap();
        assert_eq!(mine.read_up_to, Some(a2));
        let r = next_receipt(&mut laptop_events).await;
        assert_eq!((r.user, r.read_up_to), (bob.user_id, Some(a2)));
        assert_eq!(unread(&bob, conv).await, (1, a2, last), "only a3 is left");
        assert_eq!(unread(&phone, conv).await, (1, a2, last));
        // Reconnecting changes nothing.
        drop(bob);
        let bob = tb.connector().connect(&bob_id).await.unwrap();
        assert_eq!(unread(&bob, conv).await, (1, a2, last));
        // Nor does a restart.
        drop((alice, phone));
        tb.restart().await;
        let bob = tb.connector().connect(&bob_id).await.unwrap();
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        assert_eq!(unread(&bob, conv).await, (1, a2, last));
        alice.send(conv, "four").await.unwrap();
        assert_eq!(unread(&bob, conv).await.0, 2);
        bob.mark_read(conv, a3).await.unwrap();
        assert_eq!(unread(&bob, conv).await.0, 1);
        let end = bob.mark_read(conv, u64::MAX).await.unwrap().read_up_to.unwrap();
        assert_eq!(unread(&bob, conv).await, (0, end, end), "read to the end");
        assert_eq!(unread(&alice, conv).await.0, 1, "bob's one message, unread by alice all along");
    })
    .await
}

#[tokio::test]
async fn a_member_added_later_counts_unread_from_the_addition_and_again_after_rejoining() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (carol, carol_id) = tb.register("carol").await;
        let conv = alice.create_group("late", &[]).await.unwrap().id;
        for text in ["one", "two", "three"] {
            alice.send(conv, text).await.unwrap();
        }
        let added = alice.add_members(conv, &["carol".into()], Role::Member).await.unwrap();
        assert_eq!(unread(&carol, conv).await, (0, 0, added), "history from before the addition is not unread");
        alice.send(conv, "welcome").await.unwrap();
        assert_eq!(unread(&carol, conv).await.0, 1);
        // Removed and added back: only what follows the new addition counts.
        alice.remove_member(conv, carol.user_id).await.unwrap();
        alice.send(conv, "while away").await.unwrap();
        let back = alice.add_members(conv, &["carol".into()], Role::Member).await.unwrap();
        assert_eq!(unread(&carol, conv).await, (0, 0, back));
        alice.send(conv, "back again").await.unwrap();
        // It survives a restart (the addition's seq is stored with the member index).
        drop((alice, carol));
        tb.restart().await;
        let carol = tb.connector().connect(&carol_id).await.unwrap();
        assert_eq!(unread(&carol, conv).await.0, 1);
    })
    .await
}

/// Settings resent as they stand are answered without a write, and changes spend the
/// user's allowance of creations: before, each was a write and a group commit on the
/// catalog thread (which serves logins and revocations), free (an attacker review).
#[tokio::test]
async fn settings_resent_as_they_stand_write_nothing_and_changes_are_limited() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (bob, _) = tb.register("bob").await;
        let private = Settings { read_receipts_private: true };
        bob.settings(Some(private.clone())).await.unwrap();
        let before = tb.shared().store.commit_stats().commits();
        for _ in 0..50 {
            assert_eq!(bob.settings(Some(private.clone())).await.unwrap(), private);
        }
        let commits = tb.shared().store.commit_stats().commits() - before;
        assert!(commits < 5, "{commits} group commits for 50 settings as they stood");
        // Every one a change: refused once the burst is spent.
        let mut refused = None;
        for i in 0..60 {
            if let Err(e) = bob.settings(Some(Settings { read_receipts_private: i % 2 == 1 })).await {
                refused = Some(e.code());
                break;
            }
        }
        assert_eq!(refused, Some(Some(ErrorCode::RATE_LIMITED)));
    })
    .await
}

#[tokio::test]
async fn private_read_receipts_are_hidden_from_others_and_shown_to_own_devices() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (phone, _) = tb.login("bob").await;
        let conv = alice.create_group("private", &["bob".into()]).await.unwrap().id;
        let seq = alice.send(conv, "seen?").await.unwrap();
        assert!(!bob.settings(None).await.unwrap().read_receipts_private, "public by default");
        let set = bob.settings(Some(Settings { read_receipts_private: true })).await.unwrap();
        assert!(set.read_receipts_private);
        assert!(phone.settings(None).await.unwrap().read_receipts_private, "settings are per user");
        let mut alice_events = alice.events().unwrap();
        let mut phone_events = phone.events().unwrap();
        bob.mark_delivered(&[(conv, seq)]).await.unwrap();
        let seen_by_alice = next_receipt(&mut alice_events).await;
        assert_eq!(
            (seen_by_alice.user, seen_by_alice.delivered_up_to, seen_by_alice.read_up_to),
            (bob.user_id, seq, None),
            "others see delivery, never the read mark"
        );
        let mine = bob.mark_read(conv, seq).await.unwrap();
        assert_eq!(mine.read_up_to, Some(seq), "my own answer shows it");
        loop {
            let seen_by_phone = next_receipt(&mut phone_events).await;
            if seen_by_phone.read_up_to == Some(seq) {
                break;
            }
            assert_eq!(seen_by_phone.read_up_to, Some(0), "bob's other device sees his read mark");
        }
        // alice is told nothing when bob reads: the next receipt she sees is the next delivery.
        let later = alice.send(conv, "again").await.unwrap();
        let mine = bob.mark_read(conv, later).await.unwrap();
        // Bob's own view: delivered never below read (before: delivered `seq`, read `later`).
        assert_eq!((mine.delivered_up_to, mine.read_up_to), (later, Some(later)));
        let state = phone.conversation_states().await.unwrap().into_iter().find(|s| s.summary.id == conv).unwrap();
        assert_eq!((state.delivered_up_to, state.read_up_to), (later, later));
        let own = phone.receipts(conv).await.unwrap();
        assert_eq!(own.iter().find(|r| r.user == bob.user_id).unwrap().delivered_up_to, later);
        let listed = alice.receipts(conv).await.unwrap();
        assert_eq!(listed.iter().find(|r| r.user == bob.user_id).unwrap().delivered_up_to, seq, "not to others");
        bob.mark_delivered(&[(conv, later)]).await.unwrap();
        let next = next_receipt(&mut alice_events).await;
        assert_eq!(
            (next.user, next.delivered_up_to, next.read_up_to),
            (bob.user_id, later, None),
            "a private read is neither pushed nor visible in the delivered mark"
        );
        let listed = alice.receipts(conv).await.unwrap();
        assert_eq!(listed.iter().find(|r| r.user == bob.user_id).unwrap().read_up_to, None);
        let own = phone.receipts(conv).await.unwrap();
        assert_eq!(own.iter().find(|r| r.user == bob.user_id).unwrap().read_up_to, Some(later));
        let page = alice.catch_up(conv, 0, 100).await.unwrap();
        assert!(page.complete);
        assert_eq!(page.receipts, listed, "catch-up shows receipts as Receipts does");
        // Public again: what bob read while private stays hidden (before, `later` was
        // shown at once), his own devices still see it, and his next read is shown.
        bob.settings(Some(Settings { read_receipts_private: false })).await.unwrap();
        let listed = alice.receipts(conv).await.unwrap();
        assert_eq!(listed.iter().find(|r| r.user == bob.user_id).unwrap().read_up_to, Some(0));
        let own = phone.receipts(conv).await.unwrap();
        assert_eq!(own.iter().find(|r| r.user == bob.user_id).unwrap().read_up_to, Some(later));
        let last = alice.send(conv, "and now?").await.unwrap();
        bob.mark_read(conv, last).await.unwrap();
        let listed = alice.receipts(conv).await.unwrap();
        let shown = listed.iter().find(|r| r.user == bob.user_id).unwrap();
        assert_eq!((shown.delivered_up_to, shown.read_up_to), (last, Some(last)));
    })
    .await
}

#[tokio::test]
async fn mark_delivered_from_a_stranger_changes_nothing_and_starts_no_actor() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.conversation_idle_ms = 100).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (eve, _) = tb.register("eve").await;
        let conv = alice.create_group("closed", &["bob".into()]).await.unwrap().id;
        let seq = alice.send(conv, "secret").await.unwrap();
        // Answered once durable, so what alice reads next is settled.
        bob.mark_read(conv, seq - 1).await.unwrap();
        let before = alice.receipts(conv).await.unwrap();
        let shared = tb.shared().clone();
        within(STEP_DEADLINE, "idle actors retiring", async {
            while shared.convs.live() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        eve.mark_delivered(&[(conv, seq), (conv + 1000, 1)]).await.unwrap();
        assert_eq!(shared.convs.live(), 0, "a stranger's marks start no conversation actor");
        assert_eq!(alice.receipts(conv).await.unwrap(), before);
        assert_eq!(code(eve.mark_read(conv, seq).await), Some(ErrorCode::FORBIDDEN));
        assert_eq!(code(eve.receipts(conv).await), Some(ErrorCode::FORBIDDEN));
        assert!(eve.conversation_states().await.unwrap().is_empty());
        // Too many marks in one request.
        let marks: Vec<(u64, u64)> = (0..=MAX_MARKS_PER_REQUEST as u64).map(|i| (conv, i)).collect();
        assert_eq!(code(bob.mark_delivered(&marks).await), Some(ErrorCode::INVALID));
        // A member's marks mixed with marks for a conversation it is not in: its own
        // go through, the others are dropped.
        let newer = alice.send(conv, "newer").await.unwrap();
        let other = alice.create_group("other", &[]).await.unwrap().id;
        bob.mark_delivered(&[(other, 1), (conv, newer)]).await.unwrap();
        // `Done` means handed over; the watermark is shown once the next commit covers it.
        within(STEP_DEADLINE, "bob's mark becoming durable", async {
            loop {
                let listed = alice.receipts(conv).await.unwrap();
                if listed.iter().find(|r| r.user == bob.user_id).unwrap().delivered_up_to == newer {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(alice.receipts(other).await.unwrap().iter().all(|r| r.user == alice.user_id), "dropped");
    })
    .await
}

/// Asserts that no receipt event arrives within `ms` (other events are skipped).
async fn no_receipt_for(events: &mut Events, ms: u64) {
    let quiet = tokio::time::sleep(std::time::Duration::from_millis(ms));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            _ = &mut quiet => return,
            event = events.next() => match event {
                Some(event @ (Event::Receipt(_) | Event::Receipts(_))) => panic!("unexpected receipt push {event:?}"),
                Some(_) => {}
                None => panic!("the event stream ended"),
            },
        }
    }
}

/// Waits until `listed` by `viewer` shows `user` delivered up to `seq`.
async fn delivered_shown(viewer: &Client, conv: u64, user: UserId, seq: u64) {
    within(STEP_DEADLINE, "the delivered mark becoming durable", async {
        loop {
            let listed = viewer.receipts(conv).await.unwrap();
            if listed.iter().find(|r| r.user == user).is_some_and(|r| r.delivered_up_to == seq) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
}

#[tokio::test]
async fn delivered_marks_that_change_nothing_wake_no_actor_and_push_nothing() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.conversation_idle_ms = 100).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut alice_events = alice.events().unwrap();
        let conv = alice.create_group("quiet", &["bob".into()]).await.unwrap().id;
        let seq = alice.send(conv, "hello").await.unwrap();
        bob.mark_delivered(&[(conv, seq)]).await.unwrap();
        // Pushed once durable; every push before it is taken off the stream too.
        while next_receipt(&mut alice_events).await.delivered_up_to != seq {}
        let shared = tb.shared().clone();
        within(STEP_DEADLINE, "idle actors retiring", async {
            while shared.convs.live() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        // The same mark, an older one, and one past the end (clamped to the same seq).
        for mark in [seq, seq - 1, seq + 5, 0] {
            bob.mark_delivered(&[(conv, mark)]).await.unwrap();
            assert_eq!(shared.convs.live(), 0, "a mark at {mark} (stored {seq}) woke the conversation actor");
        }
        no_receipt_for(&mut alice_events, 200).await;
        assert_eq!(shared.convs.live(), 0);
        // A mark that moves the watermark still goes through.
        let newer = alice.send(conv, "newer").await.unwrap();
        bob.mark_delivered(&[(conv, newer)]).await.unwrap();
        let receipt = next_receipt(&mut alice_events).await;
        assert_eq!((receipt.user, receipt.delivered_up_to), (bob.user_id, newer));
    })
    .await
}

#[tokio::test]
async fn a_delivered_mark_its_stopping_actor_drops_is_handed_to_a_successor() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, bob_identity) = tb.register("bob").await;
        let conv = alice.create_group("restarting", &["bob".into()]).await.unwrap().id;
        let seq = alice.send(conv, "hello").await.unwrap();
        let shared = tb.shared().clone();
        assert_eq!(shared.convs.live(), 1);
        let caller =
            switchboard_broker::conversation::Caller { user: bob.user_id, device: bob_identity.device_id, session: 0 };
        // The mark is cast into the live actor's mailbox, and the actor is stopped before
        // it runs again (this test's runtime has one thread, and nothing yields between
        // the two): stop signals go before queued messages, so the mark is dropped untaken.
        let handed = shared
            .convs
            .mark_delivered(&shared, caller, switchboard_broker::reply::Revocation::never(), vec![(conv, seq)])
            .await;
        assert!(shared.convs.kill(conv), "the actor was live");
        let answer = within(STEP_DEADLINE, "the marks answered", handed.answer(&shared)).await;
        assert_eq!(answer, Ok(switchboard_protocol::Reply::Done));
        // `Done` was not a lie: a successor took the mark, and it becomes durable.
        delivered_shown(&alice, conv, bob.user_id, seq).await;
    })
    .await
}
