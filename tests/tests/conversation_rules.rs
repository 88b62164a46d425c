//! Conversation rules found broken by attacking the broker (issue 7, part B), end to end:
//! real broker, real QUIC, real sled. The same rules are tested on the pure state type in
//! `broker/src/conversation/harness.rs`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_client::new_client_id;
use switchboard_protocol::{Body, ErrorCode, Page, Role};
use switchboard_tests::{TestBroker, next_entry};

/// Send "draft", edit it to a secret, delete it: no version of the text is served, to
/// members now or after a restart.
#[tokio::test]
async fn a_deleted_message_leaves_no_text_in_its_edits() {
    let mut tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    let (bob, bob_id) = tb.register("bob").await;
    let conv = alice.create_group("g", &["bob".into()]).await.unwrap();
    let draft = alice.send(conv.id, "draft").await.unwrap();
    let edit = alice.edit(conv.id, draft, "my password is hunter2").await.unwrap();
    alice.delete(conv.id, draft).await.unwrap();
    let check = |entries: Vec<switchboard_protocol::Entry>| {
        assert!(!format!("{entries:?}").contains("hunter2"), "{entries:?}");
        assert!(!format!("{entries:?}").contains("draft"), "{entries:?}");
        let body = |seq| entries.iter().find(|e| e.seq == seq).map(|e| e.body.clone());
        assert_eq!(body(draft), Some(Body::Tombstone));
        assert_eq!(body(edit), Some(Body::Redacted { target: draft }));
    };
    check(bob.history(conv.id, Page::Latest, 50).await.unwrap().0);
    tb.restart().await;
    let bob = tb.connector().connect(&bob_id).await.unwrap();
    check(bob.history(conv.id, Page::After(0), 50).await.unwrap().0);
}

/// AddMembers then Send, pipelined on one connection: carol is a member before "hi",
/// so she receives it; AddMembers then RemoveMember, pipelined: both apply in order.
#[tokio::test]
async fn one_sessions_writes_take_effect_in_the_order_sent() {
    let tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    tb.register("bob").await;
    let (carol, carol_id) = tb.register("carol").await;
    let (_dave, dave_id) = tb.register("dave").await;
    let mut carol_events = carol.events().unwrap();
    let conv = alice.create_group("g", &["bob".into()]).await.unwrap();
    let (carol_name, dave_name) = (["carol".to_string()], ["dave".to_string()]);
    for round in 0..20 {
        let text = format!("hi {round}");
        let (added, sent) =
            tokio::join!(alice.add_members(conv.id, &carol_name, Role::Member), alice.send(conv.id, &text));
        let (added, sent) = (added.unwrap(), sent.unwrap());
        assert_eq!(sent, added + 1, "the send is applied after the add it follows");
        assert!(matches!(next_entry(&mut carol_events).await.body, Body::MembersAdded { .. }));
        let got = next_entry(&mut carol_events).await;
        assert_eq!((got.seq, got.body), (sent, Body::Text { text, edited: false }));
        alice.remove_member(conv.id, carol_id.user_id).await.unwrap();
        assert!(matches!(next_entry(&mut carol_events).await.body, Body::MemberRemoved { .. }));
    }
    for _ in 0..20 {
        let (added, removed) = tokio::join!(
            alice.add_members(conv.id, &dave_name, Role::Member),
            alice.remove_member(conv.id, dave_id.user_id)
        );
        assert_eq!(removed.unwrap(), added.unwrap() + 1, "the remove sees the add before it");
    }
    let members = alice.members(conv.id).await.unwrap();
    assert!(!members.iter().any(|m| m.name == "dave"), "dave was removed last");
}

/// A sender whose message landed, removed before it resends, is told the original seq
/// (exactly-once needs an answer to every resend), by a live actor and after a restart.
#[tokio::test]
async fn a_removed_sender_learns_that_its_message_landed() {
    let mut tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    let (bob, bob_id) = tb.register("bob").await;
    let conv = alice.create_group("g", &["bob".into()]).await.unwrap();
    let id = new_client_id();
    let (seq, dup) = bob.send_with_id(conv.id, id, "landed").await.unwrap();
    assert!(!dup);
    alice.remove_member(conv.id, bob_id.user_id).await.unwrap();
    assert_eq!(bob.send_with_id(conv.id, id, "landed").await.unwrap(), (seq, true));
    let other = bob.send_with_id(conv.id, new_client_id(), "new").await.unwrap_err();
    assert_eq!(other.code(), Some(ErrorCode::FORBIDDEN), "a new message is still refused");
    // After a restart no actor is live: the resend starts one for a former member.
    tb.restart().await;
    let bob = tb.connector().connect(&bob_id).await.unwrap();
    assert_eq!(bob.send_with_id(conv.id, id, "landed").await.unwrap(), (seq, true));
    let history = bob.history(conv.id, Page::Latest, 10).await.unwrap_err();
    assert_eq!(history.code(), Some(ErrorCode::FORBIDDEN), "the resend grants no reading");
}

/// A write refused as from no member, or a member who may not, is answered only once the
/// entries it was judged on are durable: a crash before then would undo them, and the
/// refusal would have lied (a retried `Leave` told the first took effect). The commit
/// here waits 100 ms after the `Leave` asks for it, so a refusal sent at once comes
/// before any commit; before, a retried `Leave` and the leaver's next message were
/// refused at once, from member keys not yet durable.
#[tokio::test]
async fn a_refusal_comes_only_once_what_it_was_judged_on_is_durable() {
    let tb = TestBroker::start_with(|c| c.commit_delay_us = 100_000).await;
    let (alice, _) = tb.register("alice").await;
    let (carol, _) = tb.register("carol").await;
    let conv = alice.create_group("g", &["carol".into()]).await.unwrap().id;
    let commits = || tb.shared().store.commit_stats().commits();
    let before = commits();
    let retry = async {
        // The first `Leave` is applied (its member key is gone) well before its commit.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let retried = carol.leave(conv).await.unwrap_err();
        assert_eq!(retried.code(), Some(ErrorCode::FORBIDDEN), "{retried}");
        assert!(commits() > before, "a retried leave was refused before the first was durable");
    };
    let (first, ()) = tokio::join!(carol.leave(conv), retry);
    first.unwrap();
    // The same for a member whose removal is in flight.
    let (dave, dave_id) = tb.register("dave").await;
    alice.add_members(conv, &["dave".into()], Role::Member).await.unwrap();
    let before = commits();
    let send = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = dave.send(conv, "still here?").await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::FORBIDDEN), "{refused}");
        assert!(commits() > before, "a removed member was refused before its removal was durable");
    };
    let (removal, ()) = tokio::join!(alice.remove_member(conv, dave_id.user_id), send);
    removal.unwrap();
    // And a read or a read mark of a member whose removal is in flight: a client takes a
    // refused catch-up as having left (before, refused at once, from the member key).
    let (erin, erin_id) = tb.register("erin").await;
    alice.add_members(conv, &["erin".into()], Role::Member).await.unwrap();
    let before = commits();
    let read = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = erin.catch_up(conv, 0, 10).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::FORBIDDEN), "{refused}");
        assert!(commits() > before, "a removed member's read was refused before its removal was durable");
        let refused = erin.mark_read(conv, 1).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::FORBIDDEN), "{refused}");
    };
    let (removal, ()) = tokio::join!(alice.remove_member(conv, erin_id.user_id), read);
    removal.unwrap();
}

/// History shows people who are members no longer; `Members` does not list them, and
/// `EntryNames` names them from an entry a member may read (before, a client could only
/// show `user#ID`). Neither the removed member nor a stranger learns names this way.
#[tokio::test]
async fn members_name_who_history_shows_after_they_left() {
    let tb = TestBroker::start().await;
    let (alice, alice_id) = tb.register("alice").await;
    let (bob, bob_id) = tb.register("bob").await;
    let (carol, _) = tb.register("carol").await;
    let conv = alice.create_group("g", &["bob".into()]).await.unwrap();
    let said = bob.send(conv.id, "bye").await.unwrap();
    let removed = alice.remove_member(conv.id, bob_id.user_id).await.unwrap();
    assert!(!alice.members(conv.id).await.unwrap().iter().any(|m| m.user_id == bob_id.user_id));
    let named =
        |names: Vec<switchboard_protocol::UserName>| names.into_iter().map(|u| (u.user_id, u.name)).collect::<Vec<_>>();
    let bob_named = (bob_id.user_id, "bob".to_string());
    assert_eq!(named(alice.entry_names(conv.id, said).await.unwrap()), std::slice::from_ref(&bob_named));
    let mut both = vec![(alice_id.user_id, "alice".to_string()), bob_named];
    both.sort();
    assert_eq!(named(alice.entry_names(conv.id, removed).await.unwrap()), both);
    let code = |r: switchboard_client::Result<Vec<_>>| r.unwrap_err().code();
    assert_eq!(code(alice.entry_names(conv.id, removed + 1).await), Some(ErrorCode::NOT_FOUND));
    assert_eq!(code(bob.entry_names(conv.id, said).await), Some(ErrorCode::FORBIDDEN));
    assert_eq!(code(carol.entry_names(conv.id, said).await), Some(ErrorCode::FORBIDDEN));
}

/// After a failed fdatasync the broker acknowledges nothing again: the write that failed
/// is answered INTERNAL or its connection closes, every connection is closed and new ones
/// are refused, so a resend of the same client id cannot be answered as a duplicate of
/// the never-durable entry (the harness test `after_a_failed_commit_nothing_is_
/// acknowledged_again` checks the state machine refuses it too).
#[tokio::test]
async fn after_a_failed_fsync_nothing_is_acknowledged_again() {
    let tb = TestBroker::start().await;
    let (alice, alice_id) = tb.register("alice").await;
    let (bob, _) = tb.register("bob").await;
    let conv = alice.create_group("g", &["bob".into()]).await.unwrap();
    alice.send(conv.id, "before").await.unwrap();
    let broker = tb.broker.as_ref().unwrap();
    broker.shared().store.inject_commit_failure();
    let id = new_client_id();
    match alice.send_with_id(conv.id, id, "never durable").await {
        Ok(ack) => panic!("acknowledged after a failed commit: {ack:?}"),
        Err(e) => assert!(matches!(e.code(), Some(ErrorCode::INTERNAL) | None), "{e}"),
    }
    tokio::time::timeout(Duration::from_secs(10), broker.failed()).await.expect("the broker reports the failure");
    let closed = tokio::time::timeout(Duration::from_secs(10), bob.closed()).await.unwrap();
    assert_eq!(closed.code(), Some(ErrorCode::INTERNAL), "every connection is closed");
    let again = tokio::time::timeout(Duration::from_secs(10), tb.connector().connect(&alice_id)).await.unwrap();
    assert!(again.is_err(), "no new connection is served");
}

/// An admin renames a group: every online member hears of it as an entry, a member who
/// was offline finds it in catch-up, and every list shows the new title, after a restart
/// too. A plain member and a stranger are refused, and a direct conversation has no
/// title to change. Before `SetTitle` a group kept the title it was created with.
#[tokio::test]
async fn an_admin_renames_a_group_and_every_member_sees_it() {
    let mut tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    let (bob, bob_id) = tb.register("bob").await;
    let (carol, carol_id) = tb.register("carol").await;
    let (eve, _) = tb.register("eve").await;
    let mut alice_events = alice.events().unwrap();
    let conv = alice.create_group("g", &["bob".into(), "carol".into()]).await.unwrap().id;
    let code = |r: switchboard_client::Result<u64>| r.unwrap_err().code();
    assert_eq!(code(bob.set_title(conv, "mine").await), Some(ErrorCode::FORBIDDEN), "a plain member");
    assert_eq!(code(eve.set_title(conv, "mine").await), Some(ErrorCode::FORBIDDEN), "a stranger");
    let direct = alice.create_direct("bob").await.unwrap().id;
    assert_eq!(code(alice.set_title(direct, "bob!").await), Some(ErrorCode::INVALID), "a direct conversation");
    let seen = carol.history(conv, Page::Latest, 10).await.unwrap().1;
    drop(carol);

    // alice's own write is answered, not pushed back to her.
    alice.set_role(conv, bob_id.user_id, Role::Admin).await.unwrap();
    assert_eq!(code(bob.set_title(conv, "\u{202E}gnp.exe").await), Some(ErrorCode::INVALID), "not a label");
    let renamed = bob.set_title(conv, "ops").await.unwrap();
    let heard = next_entry(&mut alice_events).await;
    assert_eq!(
        (heard.seq, heard.sender, heard.body),
        (renamed, bob_id.user_id, Body::TitleChanged { title: "ops".into() })
    );
    assert_eq!(code(alice.set_title(conv, "ops").await), Some(ErrorCode::CONFLICT), "it holds already");
    let title =
        |list: Vec<switchboard_protocol::ConversationSummary>| list.into_iter().find(|c| c.id == conv).map(|c| c.title);
    assert_eq!(title(alice.conversations().await.unwrap()).as_deref(), Some("ops"));

    // carol was away: catch-up brings the rename, and her list has the new title.
    let carol = tb.connector().connect(&carol_id).await.unwrap();
    let page = carol.catch_up(conv, seen, 100).await.unwrap();
    assert!(page.entries.iter().any(|e| e.body == Body::TitleChanged { title: "ops".into() }), "{page:?}");
    assert_eq!(title(carol.conversations().await.unwrap()).as_deref(), Some("ops"));

    tb.restart().await;
    let bob = tb.connector().connect(&bob_id).await.unwrap();
    assert_eq!(title(bob.conversations().await.unwrap()).as_deref(), Some("ops"), "after a restart");
    let (latest, _) = bob.history(conv, Page::Latest, 1).await.unwrap();
    assert_eq!(latest[0].body, Body::TitleChanged { title: "ops".into() });
}

/// The owner makes a member an admin (who may then add members), hands the group over
/// (and may then leave), every member hears of each change as an entry, and the roles
/// survive a restart. Before `SetRole` a role was fixed when the member was added, and
/// the owner could never leave a group with others in it.
#[tokio::test]
async fn the_owner_changes_roles_and_hands_the_group_over() {
    let mut tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    let (bob, bob_id) = tb.register("bob").await;
    let (_carol, _) = tb.register("carol").await;
    let (_dave, _) = tb.register("dave").await;
    let mut bob_events = bob.events().unwrap();
    let conv = alice.create_group("g", &["bob".into(), "carol".into()]).await.unwrap().id;
    next_entry(&mut bob_events).await;
    let ids = |members: &[switchboard_protocol::Member]| {
        members.iter().map(|m| (m.name.clone(), m.role)).collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        bob.add_members(conv, &["dave".into()], Role::Member).await.unwrap_err().code(),
        Some(ErrorCode::FORBIDDEN)
    );
    assert_eq!(bob.set_role(conv, bob_id.user_id, Role::Admin).await.unwrap_err().code(), Some(ErrorCode::FORBIDDEN));

    let promoted = alice.set_role(conv, bob_id.user_id, Role::Admin).await.unwrap();
    let heard = next_entry(&mut bob_events).await;
    assert_eq!(
        (heard.seq, heard.body),
        (promoted, Body::RolesChanged { members: vec![(bob_id.user_id, Role::Admin)] })
    );
    // bob's own write comes back as its answer, not as an event.
    bob.add_members(conv, &["dave".into()], Role::Member).await.unwrap();

    let carol = alice.members(conv).await.unwrap().iter().find(|m| m.name == "carol").unwrap().user_id;
    let handed = alice.set_role(conv, carol, Role::Owner).await.unwrap();
    let heard = next_entry(&mut bob_events).await;
    assert_eq!(heard.seq, handed);
    assert!(matches!(&heard.body, Body::RolesChanged { members } if members.len() == 2), "{heard:?}");
    let roles = ids(&bob.members(conv).await.unwrap());
    assert_eq!(roles["carol"], Role::Owner);
    assert_eq!(roles["alice"], Role::Admin);
    alice.leave(conv).await.unwrap();

    tb.restart().await;
    let bob = tb.connector().connect(&bob_id).await.unwrap();
    let roles = ids(&bob.members(conv).await.unwrap());
    assert_eq!(
        roles.into_iter().collect::<Vec<_>>(),
        vec![("bob".into(), Role::Admin), ("carol".into(), Role::Owner), ("dave".into(), Role::Member)]
    );
}
