//! The authorization matrix: every request kind, tried by each party that may not make
//! it — before authentication, by a stranger to the conversation, by a member without
//! the role, and from a revoked device. Each gets its documented refusal (PROTOCOL.md
//! sections 4, 8 and 9), nothing changes, and the refusal tells the caller nothing it
//! should not learn: a stranger cannot tell a conversation that exists from one that
//! does not, nor another user's device from no device; lists show only the caller's own.
//!
//! One table (`MATRIX`), one check (`check`).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use switchboard_client::{Client, ClientError, Identity};
use switchboard_protocol::{
    DeviceId, Enroll, ErrorCode, NewConversation, Page, Reply, RequestBody, Role, ServerFrame, UserId,
};
use switchboard_tests::{PreAuth, TestBroker, authenticate, bounded, events_end_with, request_frame, within};

/// Every request kind (`RequestBody`'s variants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Register,
    Login,
    Authenticate,
    Ping,
    CreateConversation,
    ListConversations,
    Members,
    AddMembers,
    RemoveMember,
    Leave,
    Send,
    Edit,
    Delete,
    History,
    ListDevices,
    RevokeDevice,
    RevokeOtherDevice,
    MarkDelivered,
    MarkRead,
    Receipts,
    ConversationStates,
    CatchUp,
    SetPresence,
    Presence,
    Settings,
    BeginUpload,
    UploadStatus,
    CancelUpload,
    SendFiles,
    FileInfo,
    DeleteFile,
    ListUploads,
    SetRole,
    Usage,
    ChangePassword,
    Block,
    BlockedUsers,
    ListFiles,
    WithdrawFile,
    EntryNames,
    SetTitle,
}

/// The kind of a request. Exhaustive: a new request kind does not compile here until
/// it has a kind, and `every_request_kind_has_a_row` then wants its row.
fn kind_of(body: &RequestBody) -> Kind {
    match body {
        RequestBody::Register(_) => Kind::Register,
        RequestBody::Login(_) => Kind::Login,
        RequestBody::Authenticate { .. } => Kind::Authenticate,
        RequestBody::Ping => Kind::Ping,
        RequestBody::CreateConversation(_) => Kind::CreateConversation,
        RequestBody::ListConversations { .. } => Kind::ListConversations,
        RequestBody::Members { .. } => Kind::Members,
        RequestBody::AddMembers { .. } => Kind::AddMembers,
        RequestBody::RemoveMember { .. } => Kind::RemoveMember,
        RequestBody::Leave { .. } => Kind::Leave,
        RequestBody::Send { .. } => Kind::Send,
        RequestBody::Edit { .. } => Kind::Edit,
        RequestBody::Delete { .. } => Kind::Delete,
        RequestBody::History { .. } => Kind::History,
        RequestBody::ListDevices => Kind::ListDevices,
        RequestBody::RevokeDevice { .. } => Kind::RevokeDevice,
        RequestBody::RevokeOtherDevice { .. } => Kind::RevokeOtherDevice,
        RequestBody::MarkDelivered { .. } => Kind::MarkDelivered,
        RequestBody::MarkRead { .. } => Kind::MarkRead,
        RequestBody::Receipts { .. } => Kind::Receipts,
        RequestBody::ConversationStates { .. } => Kind::ConversationStates,
        RequestBody::CatchUp { .. } => Kind::CatchUp,
        RequestBody::SetPresence { .. } => Kind::SetPresence,
        RequestBody::Presence { .. } => Kind::Presence,
        RequestBody::Settings { .. } => Kind::Settings,
        RequestBody::BeginUpload(_) => Kind::BeginUpload,
        RequestBody::UploadStatus { .. } => Kind::UploadStatus,
        RequestBody::CancelUpload { .. } => Kind::CancelUpload,
        RequestBody::SendFiles { .. } => Kind::SendFiles,
        RequestBody::FileInfo { .. } => Kind::FileInfo,
        RequestBody::DeleteFile { .. } => Kind::DeleteFile,
        RequestBody::ListUploads { .. } => Kind::ListUploads,
        RequestBody::SetRole { .. } => Kind::SetRole,
        RequestBody::Usage => Kind::Usage,
        RequestBody::ChangePassword { .. } => Kind::ChangePassword,
        RequestBody::Block { .. } => Kind::Block,
        RequestBody::BlockedUsers => Kind::BlockedUsers,
        RequestBody::ListFiles { .. } => Kind::ListFiles,
        RequestBody::WithdrawFile { .. } => Kind::WithdrawFile,
        RequestBody::EntryNames { .. } => Kind::EntryNames,
        RequestBody::SetTitle { .. } => Kind::SetTitle,
    }
}

/// What the broker must do with one request from one party.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Served (the party may make it).
    Served,
    /// Served, and the answer lists nothing of conversations the caller is not in or of
    /// devices that are not the caller's.
    ServedBlind,
    /// Refused with this code; the connection stays open.
    Refused(ErrorCode),
    /// Refused with this code, with exactly the answer the same request about a target
    /// that does not exist gets (a missing conversation id, a device id never issued).
    Hidden(ErrorCode),
    /// The connection is closed with this code and the request is never served.
    Closed(ErrorCode),
}

use Expect::{Closed, Hidden, Refused, Served, ServedBlind};

const INVALID: ErrorCode = ErrorCode::INVALID;
const FORBIDDEN: ErrorCode = ErrorCode::FORBIDDEN;
const NOT_FOUND: ErrorCode = ErrorCode::NOT_FOUND;
const NOT_AUTHENTICATED: ErrorCode = ErrorCode::NOT_AUTHENTICATED;
const DEVICE_REVOKED: ErrorCode = ErrorCode::DEVICE_REVOKED;

/// Who asks. `Member` is bob, a plain member of alice's group: no role to change
/// members, not the sender of alice's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// A connection that has exchanged hellos and sends the request as its first.
    Unauthenticated,
    /// eve, in no conversation of alice's.
    Stranger,
    /// bob, a plain member.
    Member,
    /// A device revoked by its owner's other device: it authenticates on a fresh
    /// connection with the request pipelined behind (its old connection was closed
    /// with `DEVICE_REVOKED`, checked before).
    Revoked,
}

/// The matrix. Register, Login and Authenticate are how a connection authenticates, so
/// before authentication they are served; after it they are `INVALID`.
#[rustfmt::skip]
const MATRIX: &[(Kind, Expect, Expect, Expect, Expect)] = &[
    // kind                        unauthenticated           stranger            member without role  revoked device
    (Kind::Register,           Served,                   Refused(INVALID),   Refused(INVALID),    Closed(DEVICE_REVOKED)),
    (Kind::Login,              Served,                   Refused(INVALID),   Refused(INVALID),    Closed(DEVICE_REVOKED)),
    (Kind::Authenticate,       Served,                   Refused(INVALID),   Refused(INVALID),    Closed(DEVICE_REVOKED)),
    (Kind::Ping,               Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    (Kind::CreateConversation, Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    (Kind::ListConversations,  Closed(NOT_AUTHENTICATED), ServedBlind,       ServedBlind,         Closed(DEVICE_REVOKED)),
    (Kind::Members,            Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::AddMembers,         Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Refused(FORBIDDEN),  Closed(DEVICE_REVOKED)),
    (Kind::RemoveMember,       Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Refused(FORBIDDEN),  Closed(DEVICE_REVOKED)),
    (Kind::Leave,              Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::Send,               Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::Edit,               Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Refused(FORBIDDEN),  Closed(DEVICE_REVOKED)),
    (Kind::Delete,             Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Refused(FORBIDDEN),  Closed(DEVICE_REVOKED)),
    (Kind::History,            Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::ListDevices,        Closed(NOT_AUTHENTICATED), ServedBlind,       ServedBlind,         Closed(DEVICE_REVOKED)),
    // Another's device, with the key alone: refused before any lookup.
    (Kind::RevokeDevice,       Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Hidden(FORBIDDEN),   Closed(DEVICE_REVOKED)),
    // With the caller's own password: no device of the caller's.
    (Kind::RevokeOtherDevice,  Closed(NOT_AUTHENTICATED), Hidden(NOT_FOUND), Hidden(NOT_FOUND),   Closed(DEVICE_REVOKED)),
    // Marks are batched over conversations: a stranger's are dropped, not refused.
    (Kind::MarkDelivered,      Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    (Kind::MarkRead,           Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::Receipts,           Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::ConversationStates, Closed(NOT_AUTHENTICATED), ServedBlind,       ServedBlind,         Closed(DEVICE_REVOKED)),
    (Kind::CatchUp,            Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::SetPresence,        Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    // Presence of users who share no conversation with the caller is left out.
    (Kind::Presence,           Closed(NOT_AUTHENTICATED), ServedBlind,       ServedBlind,         Closed(DEVICE_REVOKED)),
    (Kind::Settings,           Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    (Kind::BeginUpload,        Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    (Kind::UploadStatus,       Closed(NOT_AUTHENTICATED), Hidden(NOT_FOUND), Hidden(NOT_FOUND),   Closed(DEVICE_REVOKED)),
    (Kind::CancelUpload,       Closed(NOT_AUTHENTICATED), Hidden(NOT_FOUND), Hidden(NOT_FOUND),   Closed(DEVICE_REVOKED)),
    (Kind::SendFiles,          Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Hidden(NOT_FOUND),   Closed(DEVICE_REVOKED)),
    (Kind::FileInfo,           Closed(NOT_AUTHENTICATED), Hidden(NOT_FOUND), Hidden(NOT_FOUND),   Closed(DEVICE_REVOKED)),
    (Kind::DeleteFile,         Closed(NOT_AUTHENTICATED), Hidden(NOT_FOUND), Hidden(NOT_FOUND),   Closed(DEVICE_REVOKED)),
    // Only the caller's own uploads in progress (never alice's).
    (Kind::ListUploads,        Closed(NOT_AUTHENTICATED), ServedBlind,       ServedBlind,         Closed(DEVICE_REVOKED)),
    (Kind::SetRole,            Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Refused(FORBIDDEN),  Closed(DEVICE_REVOKED)),
    (Kind::Usage,              Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    // The caller's own password (set to itself here): never alice's.
    (Kind::ChangePassword,     Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    // The caller's own blocks (alice unblocked here: nothing changes for the rows after).
    (Kind::Block,              Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    (Kind::BlockedUsers,       Closed(NOT_AUTHENTICATED), Served,            Served,              Closed(DEVICE_REVOKED)),
    // Only the caller's own stored files (never alice's).
    (Kind::ListFiles,          Closed(NOT_AUTHENTICATED), ServedBlind,       ServedBlind,         Closed(DEVICE_REVOKED)),
    // alice's file stays hers, wherever it was sent.
    (Kind::WithdrawFile,       Closed(NOT_AUTHENTICATED), Hidden(NOT_FOUND), Hidden(NOT_FOUND),   Closed(DEVICE_REVOKED)),
    (Kind::EntryNames,         Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Served,              Closed(DEVICE_REVOKED)),
    (Kind::SetTitle,           Closed(NOT_AUTHENTICATED), Hidden(FORBIDDEN), Refused(FORBIDDEN),  Closed(DEVICE_REVOKED)),
];

fn expect(row: &(Kind, Expect, Expect, Expect, Expect), who: Who) -> Expect {
    match who {
        Who::Unauthenticated => row.1,
        Who::Stranger => row.2,
        Who::Member => row.3,
        Who::Revoked => row.4,
    }
}

/// A conversation id no conversation has.
const MISSING_CONV: u64 = 1 << 40;
/// A file id no file has.
const MISSING_FILE: switchboard_protocol::FileId = [0x5a; 16];
/// A device id no device has.
const MISSING_DEVICE: DeviceId = 1 << 40;

/// alice owns `group` (bob and carol are members, alice wrote `message` in it), `spare`
/// (with bob) and `other` (with carol). eve is in none of them.
struct World {
    tb: TestBroker,
    alice: Client,
    alice_id: Identity,
    bob: Client,
    eve: Client,
    carol: UserId,
    group: u64,
    spare: u64,
    other: u64,
    message: u64,
    /// A file alice uploaded and attached in `other` only: neither bob nor eve may read it.
    file: switchboard_protocol::FileId,
    /// An upload alice began and did not finish.
    uploading: switchboard_protocol::FileId,
    /// Every device enrolled in the world, with its user.
    devices: Vec<(UserId, DeviceId)>,
    /// Revoked devices, one per kind (in `MATRIX` order), for the revoked column.
    revoked: Vec<Identity>,
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(adjust: impl FnOnce(&mut switchboard_broker::Config)) -> World {
    let tb = TestBroker::start_with(adjust).await;
    let (alice, alice_id) = tb.register("alice").await;
    let (bob, bob_id) = tb.register("bob").await;
    let (_carol, carol_id) = tb.register("carol").await;
    let (eve, eve_id) = tb.register("eve").await;
    let group = alice.create_group("group", &["bob".into(), "carol".into()]).await.unwrap().id;
    let spare = alice.create_group("spare", &["bob".into()]).await.unwrap().id;
    let other = alice.create_group("other", &["carol".into()]).await.unwrap().id;
    let message = alice.send(group, "alice's words").await.unwrap();
    let data = b"alice's notes";
    let file = switchboard_tests::begin_upload(&alice, "notes.txt", "text/plain", data).await.file;
    let done = switchboard_tests::upload_rest(alice.connection(), file, data, 0).await;
    assert!(matches!(done, switchboard_protocol::TransferReply::Complete(_)), "{done:?}");
    let attach = RequestBody::SendFiles {
        conv: other,
        client_id: switchboard_client::new_client_id(),
        text: String::new(),
        files: vec![file],
    };
    alice.request(attach).await.unwrap();
    let uploading = switchboard_tests::begin_upload(&alice, "draft.txt", "text/plain", b"half done").await.file;
    // alice herself sees it, so that the blind checks below look for something listed.
    match alice.request(RequestBody::ListUploads { after: None }).await.unwrap() {
        Reply::Uploads { items, .. } => assert_eq!(items.iter().map(|u| u.file.file).collect::<Vec<_>>(), [uploading]),
        other => panic!("{other:?}"),
    }
    let devices = [&alice_id, &bob_id, &carol_id, &eve_id].iter().map(|i| (i.user_id, i.device_id)).collect();
    World {
        tb,
        alice,
        alice_id,
        bob,
        eve,
        carol: carol_id.user_id,
        group,
        spare,
        other,
        message,
        file,
        uploading,
        devices,
        revoked: Vec::new(),
    }
}

/// Whether the request names a real target or one that does not exist.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Real,
    Missing,
}

/// The request of `kind` that `who` makes, about `target`. Enrollments are signed over
/// `transcript` (they are served only before authentication, where that matters).
fn body(w: &World, kind: Kind, who: Who, target: Target, transcript: &[u8]) -> RequestBody {
    let real = target == Target::Real;
    // A member may leave: bob leaves `spare`, so `group` keeps its members for the rest.
    let conv = match (real, kind, who) {
        // A files message's target is its file: the conversation stays the real one.
        (false, Kind::SendFiles, _) => w.group,
        (false, ..) => MISSING_CONV,
        (true, Kind::Leave, Who::Member) => w.spare,
        (true, ..) => w.group,
    };
    let client_id = switchboard_client::new_client_id();
    let file = if real { w.file } else { MISSING_FILE };
    let body = match kind {
        Kind::Register => RequestBody::Register(enroll("newcomer", transcript)),
        Kind::Login => RequestBody::Login(enroll("alice", transcript)),
        Kind::Authenticate => authenticate(&w.alice_id, transcript),
        Kind::Ping => RequestBody::Ping,
        Kind::CreateConversation => {
            RequestBody::CreateConversation(NewConversation::Group { title: "mine".into(), members: Vec::new() })
        }
        Kind::ListConversations => RequestBody::ListConversations { after: None },
        Kind::Members => RequestBody::Members { conv },
        Kind::AddMembers => RequestBody::AddMembers { conv, users: vec!["eve".into()], role: Role::Member },
        Kind::RemoveMember => RequestBody::RemoveMember { conv, user: w.carol },
        Kind::Leave => RequestBody::Leave { conv },
        Kind::Send => RequestBody::Send { conv, client_id, text: "let me in".into() },
        Kind::Edit => RequestBody::Edit { conv, client_id, target: w.message, text: "rewritten".into() },
        Kind::Delete => RequestBody::Delete { conv, client_id, target: w.message },
        Kind::History => RequestBody::History { conv, page: Page::Latest, limit: 50 },
        Kind::ListDevices => RequestBody::ListDevices,
        Kind::RevokeDevice => {
            RequestBody::RevokeDevice { device_id: if real { w.alice_id.device_id } else { MISSING_DEVICE } }
        }
        Kind::RevokeOtherDevice => RequestBody::RevokeOtherDevice {
            device_id: if real { w.alice_id.device_id } else { MISSING_DEVICE },
            password: w.tb.password.into(),
        },
        Kind::MarkDelivered => RequestBody::MarkDelivered { marks: vec![(conv, w.message)] },
        Kind::MarkRead => RequestBody::MarkRead { conv, seq: w.message },
        Kind::Receipts => RequestBody::Receipts { conv },
        Kind::ConversationStates => RequestBody::ConversationStates { after: None },
        Kind::CatchUp => RequestBody::CatchUp { conv, after: 0, limit: 100 },
        Kind::SetPresence => RequestBody::SetPresence { away: true },
        // alice shares conversations with bob, carol with bob; nobody with eve.
        Kind::Presence => RequestBody::Presence { users: vec![w.alice.user_id, w.carol, w.bob.user_id] },
        Kind::Settings => {
            RequestBody::Settings { set: Some(switchboard_protocol::Settings { read_receipts_private: true }) }
        }
        Kind::BeginUpload => RequestBody::BeginUpload(switchboard_protocol::NewUpload {
            name: "notes.txt".into(),
            size: 5,
            content_type: "text/plain".into(),
            blake3: [0; 32],
        }),
        Kind::UploadStatus => RequestBody::UploadStatus { file },
        Kind::CancelUpload => RequestBody::CancelUpload { file },
        Kind::SendFiles => RequestBody::SendFiles { conv, client_id, text: String::new(), files: vec![file] },
        Kind::FileInfo => RequestBody::FileInfo { file },
        Kind::DeleteFile => RequestBody::DeleteFile { file },
        Kind::ListUploads => RequestBody::ListUploads { after: None },
        Kind::SetRole => RequestBody::SetRole { conv, user: w.carol, role: Role::Admin },
        Kind::Usage => RequestBody::Usage,
        Kind::ChangePassword => RequestBody::ChangePassword {
            current: w.tb.password.into(),
            new: w.tb.password.into(),
            sign_out_others: false,
        },
        Kind::Block => RequestBody::Block { user: "alice".into(), blocked: false },
        Kind::BlockedUsers => RequestBody::BlockedUsers,
        Kind::ListFiles => RequestBody::ListFiles { after: None },
        Kind::WithdrawFile => RequestBody::WithdrawFile { file },
        Kind::EntryNames => RequestBody::EntryNames { conv, seq: 1 },
        Kind::SetTitle => RequestBody::SetTitle { conv, title: "taken over".into() },
    };
    assert_eq!(kind_of(&body), kind);
    body
}

/// An enrollment of a new device key for `user`, signed over `transcript`.
fn enroll(user: &str, transcript: &[u8]) -> Enroll {
    let key = SigningKey::from_bytes(&[7; 32]);
    Enroll {
        user: user.into(),
        password: "correct horse battery".into(),
        device_name: "new-device".into(),
        public_key: Bytes::copy_from_slice(key.verifying_key().as_bytes()),
        signature: Bytes::copy_from_slice(&key.sign(transcript).to_bytes()),
    }
}

/// What the owner sees of her conversations, devices and messages: a refused request
/// must leave it exactly as it was.
async fn snapshot(w: &World) -> String {
    let a = &w.alice;
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        a.history(w.group, Page::After(0), 200).await.unwrap(),
        a.members(w.group).await.unwrap(),
        a.members(w.spare).await.unwrap(),
        a.conversations().await.unwrap(),
        a.devices().await.unwrap(),
        a.request(RequestBody::Receipts { conv: w.group }).await.unwrap(),
    )
}

/// Makes `w`'s request of `kind` as `who` and checks the matrix's answer for it.
async fn check(w: &World, who: Who, row: usize) {
    let (kind, expected) = (MATRIX[row].0, expect(&MATRIX[row], who));
    let what = format!("{kind:?} by {who:?}: expected {expected:?}");
    let before = snapshot(w).await;
    match who {
        Who::Unauthenticated | Who::Revoked => {
            let mut pre = w.tb.preauth().await;
            let request = request_frame(1, body(w, kind, who, Target::Real, &pre.transcript));
            if who == Who::Revoked {
                // The revoked device's proof, with the request pipelined behind it.
                let mut bytes = request_frame(0, authenticate(&w.revoked[row], &pre.transcript)).to_vec();
                bytes.extend_from_slice(&request);
                pre.write(&bytes).await;
            } else {
                pre.write(&request).await;
            }
            match expected {
                Served => served_before_auth(&mut pre, &what).await,
                Closed(code) => pre.refused_with(code).await,
                other => panic!("{what}: {other:?} cannot be checked on a connection that is not authenticated"),
            }
        }
        Who::Stranger | Who::Member => {
            let client = if who == Who::Stranger { &w.eve } else { &w.bob };
            let result = client.request(body(w, kind, who, Target::Real, &[])).await;
            match expected {
                Served => {
                    result.unwrap_or_else(|e| panic!("{what}, got {e}"));
                }
                ServedBlind => blind(w, who, &result.unwrap_or_else(|e| panic!("{what}, got {e}")), &what),
                Refused(code) => {
                    assert_eq!(refusal(result, &what).code, code, "{what}");
                }
                Hidden(code) => {
                    let real = refusal(result, &what);
                    assert_eq!(real.code, code, "{what}");
                    let missing = client.request(body(w, kind, who, Target::Missing, &[])).await;
                    assert_eq!(real, refusal(missing, &what), "{what}: the answer tells the real target from none");
                }
                Closed(_) => panic!("{what}: an authenticated client is not closed here"),
            }
            // A per-request refusal leaves the connection open.
            client.ping().await.unwrap_or_else(|e| panic!("{what}: the connection did not stay open: {e}"));
        }
    }
    if !matches!(expected, Served | ServedBlind) {
        assert_eq!(snapshot(w).await, before, "{what}: a refused request changed something");
    }
}

/// The broker's error answer to a refused request.
fn refusal(result: Result<Reply, ClientError>, what: &str) -> switchboard_protocol::ErrorBody {
    match result {
        Err(ClientError::Server(e)) => e,
        other => panic!("{what}, got {other:?}"),
    }
}

/// An auth request made as the first request is answered `Authed`.
async fn served_before_auth(pre: &mut PreAuth, what: &str) {
    match pre.next().await {
        Ok(ServerFrame::Response { id: 1, result: Ok(Reply::Authed { .. }) }) => {}
        other => panic!("{what}, got {other:?}"),
    }
}

/// A list reply shows nothing the caller is not party to.
fn blind(w: &World, who: Who, reply: &Reply, what: &str) {
    let (me, hidden): (UserId, &[u64]) = match who {
        Who::Stranger => (w.eve.user_id, &[w.group, w.spare, w.other]),
        Who::Member => (w.bob.user_id, &[w.other]),
        _ => unreachable!("only authenticated parties list"),
    };
    match reply {
        Reply::Conversations { items, .. } => {
            assert!(items.iter().all(|c| !hidden.contains(&c.id)), "{what}: lists {items:?}");
        }
        Reply::ConversationStates { items, .. } => {
            assert!(items.iter().all(|c| !hidden.contains(&c.summary.id)), "{what}: lists {items:?}");
        }
        Reply::Presence(users) => {
            // eve shares nothing; bob shares groups with alice and carol (not himself).
            let visible: Vec<UserId> = match who {
                Who::Member => vec![w.alice.user_id, w.carol],
                _ => Vec::new(),
            };
            assert!(users.iter().all(|p| visible.contains(&p.user)), "{what}: shows {users:?}");
        }
        Reply::Devices(devices) => {
            let mine: Vec<DeviceId> = w.devices.iter().filter(|(u, _)| *u == me).map(|(_, d)| *d).collect();
            assert!(devices.iter().all(|d| mine.contains(&d.device_id)), "{what}: lists {devices:?}");
            assert_eq!(devices.iter().filter(|d| d.current).count(), 1, "{what}");
        }
        Reply::Uploads { items, .. } => {
            assert!(items.iter().all(|u| u.file.file != w.uploading), "{what}: lists {items:?}");
        }
        // alice's stored file (complete, attached in `other`) is hers alone to list.
        Reply::Files { items, .. } => {
            assert!(items.iter().all(|f| f.file.file != w.file), "{what}: lists {items:?}");
        }
        other => panic!("{what}: not a list: {other:?}"),
    }
}

async fn check_column(w: &World, who: Who) {
    for row in 0..MATRIX.len() {
        check(w, who, row).await;
    }
}

#[test]
fn every_request_kind_has_one_row() {
    const ALL: [Kind; 41] = [
        Kind::Register,
        Kind::Login,
        Kind::Authenticate,
        Kind::Ping,
        Kind::CreateConversation,
        Kind::ListConversations,
        Kind::Members,
        Kind::AddMembers,
        Kind::RemoveMember,
        Kind::Leave,
        Kind::Send,
        Kind::Edit,
        Kind::Delete,
        Kind::History,
        Kind::ListDevices,
        Kind::RevokeDevice,
        Kind::RevokeOtherDevice,
        Kind::MarkDelivered,
        Kind::MarkRead,
        Kind::Receipts,
        Kind::ConversationStates,
        Kind::CatchUp,
        Kind::SetPresence,
        Kind::Presence,
        Kind::Settings,
        Kind::BeginUpload,
        Kind::UploadStatus,
        Kind::CancelUpload,
        Kind::SendFiles,
        Kind::FileInfo,
        Kind::DeleteFile,
        Kind::ListUploads,
        Kind::SetRole,
        Kind::Usage,
        Kind::ChangePassword,
        Kind::Block,
        Kind::BlockedUsers,
        Kind::ListFiles,
        Kind::WithdrawFile,
        Kind::EntryNames,
        Kind::SetTitle,
    ];
    for kind in ALL {
        assert_eq!(MATRIX.iter().filter(|r| r.0 == kind).count(), 1, "{kind:?}");
    }
    assert_eq!(MATRIX.len(), ALL.len());
}

#[tokio::test]
async fn unauthenticated_requests_close_with_not_authenticated() {
    bounded(async {
        let w = world().await;
        check_column(&w, Who::Unauthenticated).await;
    })
    .await
}

#[tokio::test]
async fn a_stranger_is_refused_and_learns_nothing() {
    bounded(async {
        let w = world().await;
        check_column(&w, Who::Stranger).await;
        // Adding names that resolve to nobody, or too many names: still the refusal of a
        // stranger (before: "no user" NOT_FOUND and INVALID, the names checked first).
        for users in [vec!["nobody-here".to_string()], vec!["x".to_string(); 300]] {
            let what = format!("adding {} names by a stranger", users.len());
            let add = RequestBody::AddMembers { conv: w.group, users, role: Role::Member };
            assert_eq!(refusal(w.eve.request(add).await, &what).code, FORBIDDEN, "{what}");
        }
    })
    .await
}

#[tokio::test]
async fn a_stranger_starts_no_conversation_actor_and_learns_nothing_from_one_at_rest() {
    bounded(async {
        // Above, the conversation's actor was running; here none is, and the directory
        // answers alone. The answers are the same, and no actor starts for a stranger.
        let w = world_with(|c| c.conversation_idle_ms = 100).await;
        let shared = w.tb.shared().clone();
        within(switchboard_tests::STEP_DEADLINE, "idle actors retiring", async {
            while shared.convs.live() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        for row in MATRIX.iter().filter(|r| matches!(r.2, Hidden(FORBIDDEN))) {
            let what = format!("{:?} by a stranger, no actor running", row.0);
            let real = refusal(w.eve.request(body(&w, row.0, Who::Stranger, Target::Real, &[])).await, &what);
            let missing = refusal(w.eve.request(body(&w, row.0, Who::Stranger, Target::Missing, &[])).await, &what);
            assert_eq!((real.code, &real), (FORBIDDEN, &missing), "{what}");
            assert_eq!(shared.convs.live(), 0, "{what}: started a conversation actor");
        }
    })
    .await
}

#[tokio::test]
async fn a_member_without_the_role_is_refused() {
    bounded(async {
        let w = world().await;
        check_column(&w, Who::Member).await;
        // Rank: an admin removes only members of lower rank, and the owner does not
        // leave while others remain.
        let (dave, _) = w.tb.register("dave").await;
        let (erin, _) = w.tb.register("erin").await;
        w.alice.add_members(w.group, &["dave".into(), "erin".into()], Role::Admin).await.unwrap();
        let refusals: [(&Client, RequestBody); 3] = [
            (&dave, RequestBody::RemoveMember { conv: w.group, user: w.alice.user_id }),
            (&dave, RequestBody::RemoveMember { conv: w.group, user: erin.user_id }),
            (&w.alice, RequestBody::Leave { conv: w.group }),
        ];
        for (client, request) in refusals {
            let before = snapshot(&w).await;
            let what = format!("{request:?}");
            assert_eq!(refusal(client.request(request).await, &what).code, FORBIDDEN, "{what}");
            assert_eq!(snapshot(&w).await, before, "{what}");
        }
        // The admin may remove a plain member: the refusals above were about rank.
        dave.remove_member(w.group, w.carol).await.unwrap();
        // Names that resolve to nobody are told only to a member who may add them (before:
        // NOT_FOUND to any member, the names checked before the role).
        let unknown = vec!["nobody-here".to_string()];
        let adds: [(&Client, Role, ErrorCode); 3] =
            [(&w.bob, Role::Member, FORBIDDEN), (&dave, Role::Admin, FORBIDDEN), (&dave, Role::Member, NOT_FOUND)];
        for (client, role, code) in adds {
            let what = format!("adding an unknown name as {role:?} by user {}", client.user_id);
            let add = RequestBody::AddMembers { conv: w.group, users: unknown.clone(), role };
            assert_eq!(refusal(client.request(add).await, &what).code, code, "{what}");
        }
    })
    .await
}

#[tokio::test]
async fn a_revoked_device_is_closed_and_cannot_authenticate_again() {
    bounded(async {
        let mut w = world().await;
        // One account per kind, so that each row's revoked device is its own.
        let names: Vec<String> = (0..MATRIX.len()).map(|i| format!("r{i}")).collect();
        let mut laptops = Vec::new();
        for name in &names {
            laptops.push(w.tb.register(name).await.0);
        }
        w.alice.add_members(w.group, &names, Role::Member).await.unwrap();
        for (name, laptop) in names.iter().zip(&laptops) {
            let (phone, phone_id) = w.tb.login(name).await;
            let mut events = phone.events().unwrap();
            phone.send(w.group, "from my phone").await.unwrap();
            within(
                switchboard_tests::STEP_DEADLINE,
                "revoke",
                laptop.revoke_other_device(phone_id.device_id, w.tb.password),
            )
            .await
            .unwrap();
            events_end_with(&mut events, &phone, ErrorCode::DEVICE_REVOKED).await;
            // The closed connection serves nothing more.
            let e = phone.ping().await.unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::DEVICE_REVOKED), "{e}");
            w.revoked.push(phone_id);
        }
        check_column(&w, Who::Revoked).await;
        // The owner's other device is unaffected.
        laptops[0].ping().await.unwrap();
    })
    .await
}
