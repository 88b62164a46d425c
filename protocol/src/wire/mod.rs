//! Every message on the control stream. postcard is not self-describing: an enum
//! variant's position is its wire tag, so variants are only ever appended, never
//! reordered or removed. `docs/PROTOCOL.md` documents each type; its test vectors are
//! checked against this file by `tests::documented_vectors_match`.
//!
//! One file per domain: `ids`, `hello` (handshake), `requests`, `replies` (responses and
//! events), `entries` (the conversation log). A new feature adds its own file.

mod entries;
mod files;
mod hello;
mod ids;
mod presence;
mod replies;
mod requests;
mod sync;

pub use entries::*;
pub use files::*;
pub use hello::*;
pub use ids::*;
pub use presence::*;
pub use replies::*;
pub use requests::*;
pub use sync::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use crate::frame::{FrameDecoder, decode, encode_frame};
    use crate::limits::{MAX_CLIENT_FRAME_BYTES, MAX_SERVER_FRAME_BYTES};
    use bytes::Bytes;
    use proptest::prelude::*;

    /// The protocol document whose test vectors this module keeps true.
    const DOC: &str = include_str!("../../../docs/PROTOCOL.md");

    /// A documented value of one of the four top-level frame types.
    #[derive(Debug, PartialEq)]
    enum Fixture {
        ClientHello(ClientHello),
        ServerHello(ServerHello),
        Client(ClientFrame),
        Server(ServerFrame),
        Open(TransferOpen),
        Chunk(Chunk),
        Transfer(TransferReply),
    }

    impl Fixture {
        /// The complete frame, length prefix included.
        fn encode(&self) -> Bytes {
            match self {
                Fixture::ClientHello(m) => encode_frame(m),
                Fixture::ServerHello(m) => encode_frame(m),
                Fixture::Client(m) => encode_frame(m),
                Fixture::Server(m) => encode_frame(m),
                Fixture::Open(m) => encode_frame(m),
                Fixture::Chunk(m) => encode_frame(m),
                Fixture::Transfer(m) => encode_frame(m),
            }
            .unwrap()
        }

        /// Decodes `body` as the same type as `self`.
        fn decode_same(&self, body: &[u8]) -> Fixture {
            match self {
                Fixture::ClientHello(_) => Fixture::ClientHello(decode(body).unwrap()),
                Fixture::ServerHello(_) => Fixture::ServerHello(decode(body).unwrap()),
                Fixture::Client(_) => Fixture::Client(decode(body).unwrap()),
                Fixture::Server(_) => Fixture::Server(decode(body).unwrap()),
                Fixture::Open(_) => Fixture::Open(decode(body).unwrap()),
                Fixture::Chunk(_) => Fixture::Chunk(decode(body).unwrap()),
                Fixture::Transfer(_) => Fixture::Transfer(decode(body).unwrap()),
            }
        }
    }

    /// Every fixture the document must carry, in document order.
    const NAMES: &[&str] = &[
        "client_hello",
        "server_hello",
        "request_register",
        "request_login",
        "request_authenticate",
        "request_ping",
        "request_create_direct",
        "request_create_group",
        "request_list_conversations",
        "request_members",
        "request_add_members",
        "request_remove_member",
        "request_leave",
        "request_send",
        "request_edit",
        "request_delete",
        "request_history_latest",
        "request_history_before",
        "request_history_after",
        "request_list_devices",
        "request_revoke_device",
        "response_authed",
        "response_pong",
        "response_conversation",
        "response_conversations",
        "response_members",
        "response_appended",
        "response_history",
        "response_devices",
        "response_done",
        "response_error",
        "event_entry_text",
        "event_entry_edit",
        "event_entry_delete",
        "event_entry_created",
        "event_entry_members_added",
        "event_entry_member_removed",
        "event_entry_member_left",
        "entry_redacted",
        "request_mark_delivered",
        "request_mark_read",
        "request_receipts",
        "request_conversation_states",
        "request_catch_up",
        "request_set_presence",
        "request_presence",
        "request_settings",
        "signal_typing",
        "response_receipt",
        "response_receipts",
        "response_conversation_states",
        "response_catch_up",
        "response_presence",
        "response_settings",
        "event_receipt",
        "event_presence",
        "event_typing",
        "event_receipts",
        "request_begin_upload",
        "request_upload_status",
        "request_cancel_upload",
        "request_send_files",
        "request_file_info",
        "request_delete_file",
        "response_upload",
        "response_file",
        "event_entry_files",
        "event_file",
        "transfer_open_upload",
        "transfer_open_download",
        "transfer_chunk",
        "transfer_accepted",
        "transfer_durable",
        "transfer_complete",
        "transfer_range",
        "transfer_failed",
        "request_list_uploads",
        "response_uploads",
        "request_set_role",
        "event_entry_roles_changed",
        "request_set_title",
        "event_entry_title_changed",
        "request_usage",
        "response_usage",
        "request_change_password",
        "request_block",
        "request_blocked_users",
        "response_blocked_users",
        "request_list_files",
        "response_files",
        "request_withdraw_file",
        "request_entry_names",
        "response_names",
        "request_revoke_other_device",
    ];

    /// Fixed time used by every fixture: 2023-11-14T22:13:20Z.
    const T: u64 = 1_700_000_000_000;
    /// Fixed idempotency key: bytes 0x01..=0x10.
    const CID: ClientMsgId = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
    /// Fixed conversation.
    const CONV: ConvId = 42;

    fn req(id: u32, body: RequestBody) -> Fixture {
        Fixture::Client(ClientFrame::Request(Request { id, body }))
    }

    fn ok(id: u32, reply: Reply) -> Fixture {
        Fixture::Server(ServerFrame::Response { id, result: Ok(reply) })
    }

    fn entry(seq: Seq, body: Body) -> Entry {
        Entry { conv: CONV, seq, sender: 2, sender_device: 5, client_id: CID, at_ms: T, body }
    }

    fn event(seq: Seq, body: Body) -> Fixture {
        Fixture::Server(ServerFrame::Event(Event::Entry(entry(seq, body))))
    }

    fn receipt(user: UserId, delivered_up_to: Seq, read_up_to: Option<Seq>) -> Receipt {
        Receipt { conv: CONV, user, delivered_up_to, read_up_to }
    }

    /// Fixed file id: bytes 0xf0..=0xff.
    const FILE: FileId =
        [0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff];
    /// Fixed thumbnail id: bytes 0xe0..=0xef.
    const THUMB: FileId =
        [0xe0, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee, 0xef];

    fn file_ref() -> FileRef {
        FileRef { file: FILE, name: "cat.png".into(), size: 2_000_000, content_type: "image/png".into() }
    }

    fn enroll() -> Enroll {
        Enroll {
            user: "alice".into(),
            password: "correct horse".into(),
            device_name: "laptop".into(),
            public_key: Bytes::from(vec![0x11; 32]),
            signature: Bytes::from(vec![0x22; 64]),
        }
    }

    /// The fixture called `name`, if there is one.
    fn fixture(name: &str) -> Option<Fixture> {
        Some(match name {
            "client_hello" => Fixture::ClientHello(ClientHello {
                magic: crate::MAGIC,
                version: crate::PROTOCOL_VERSION,
                agent: "example/1.0".into(),
            }),
            "server_hello" => Fixture::ServerHello(ServerHello {
                version: crate::PROTOCOL_VERSION,
                nonce: [0; 32],
                limits: Limits::current(),
                server_time_ms: T,
            }),
            "request_register" => req(0, RequestBody::Register(enroll())),
            "request_login" => req(0, RequestBody::Login(enroll())),
            "request_authenticate" => req(
                0,
                RequestBody::Authenticate {
                    user: "alice".into(),
                    device_id: 3,
                    signature: Bytes::from(vec![0x33; 64]),
                },
            ),
            "request_ping" => req(1, RequestBody::Ping),
            "request_create_direct" => {
                req(2, RequestBody::CreateConversation(NewConversation::Direct { peer: "bob".into() }))
            }
            "request_create_group" => req(
                3,
                RequestBody::CreateConversation(NewConversation::Group {
                    title: "team".into(),
                    members: vec!["bob".into(), "carol".into()],
                }),
            ),
            "request_list_conversations" => req(4, RequestBody::ListConversations { after: Some(300) }),
            "request_members" => req(5, RequestBody::Members { conv: CONV }),
            "request_add_members" => {
                req(6, RequestBody::AddMembers { conv: CONV, users: vec!["dave".into()], role: Role::Admin })
            }
            "request_remove_member" => req(7, RequestBody::RemoveMember { conv: CONV, user: 9 }),
            "request_leave" => req(8, RequestBody::Leave { conv: CONV }),
            "request_send" => req(9, RequestBody::Send { conv: CONV, client_id: CID, text: "hello".into() }),
            "request_edit" => {
                req(10, RequestBody::Edit { conv: CONV, client_id: CID, target: 5, text: "hello!".into() })
            }
            "request_delete" => req(11, RequestBody::Delete { conv: CONV, client_id: CID, target: 5 }),
            "request_history_latest" => req(12, RequestBody::History { conv: CONV, page: Page::Latest, limit: 50 }),
            "request_history_before" => {
                req(13, RequestBody::History { conv: CONV, page: Page::Before(1000), limit: 200 })
            }
            "request_history_after" => req(14, RequestBody::History { conv: CONV, page: Page::After(17), limit: 100 }),
            "request_list_devices" => req(15, RequestBody::ListDevices),
            "request_revoke_device" => req(16, RequestBody::RevokeDevice { device_id: 4 }),
            "response_authed" => ok(0, Reply::Authed { user_id: 1, device_id: 3 }),
            "response_pong" => ok(1, Reply::Pong { server_time_ms: T }),
            "response_conversation" => ok(
                3,
                Reply::Conversation(ConversationSummary {
                    id: CONV,
                    kind: ConversationKind::Group,
                    title: "team".into(),
                    last_seq: 1,
                    member_count: 3,
                    my_role: Role::Owner,
                }),
            ),
            "response_conversations" => ok(
                4,
                Reply::Conversations {
                    items: vec![ConversationSummary {
                        id: 301,
                        kind: ConversationKind::Direct,
                        title: "bob".into(),
                        last_seq: 12,
                        member_count: 2,
                        my_role: Role::Member,
                    }],
                    more: false,
                },
            ),
            "response_members" => ok(
                5,
                Reply::Members(vec![
                    Member { user_id: 1, name: "alice".into(), role: Role::Owner },
                    Member { user_id: 2, name: "bob".into(), role: Role::Member },
                ]),
            ),
            "response_appended" => ok(9, Reply::Appended { seq: 6, duplicate: false }),
            "response_history" => ok(
                14,
                Reply::History {
                    entries: vec![
                        entry(18, Body::Text { text: "hi!".into(), edited: true }),
                        entry(19, Body::Tombstone),
                    ],
                    last_seq: 21,
                },
            ),
            "response_devices" => ok(
                15,
                Reply::Devices(vec![DeviceInfo { device_id: 3, name: "laptop".into(), enrolled_ms: T, current: true }]),
            ),
            "response_done" => ok(16, Reply::Done),
            "response_error" => Fixture::Server(ServerFrame::Response {
                id: 9,
                result: Err(ErrorBody::new(ErrorCode::FORBIDDEN, "not a member of this conversation")),
            }),
            "event_entry_text" => event(6, Body::Text { text: "hi".into(), edited: false }),
            "event_entry_edit" => event(7, Body::Edit { target: 6, text: "hi!".into() }),
            "event_entry_delete" => event(8, Body::Delete { target: 6 }),
            "event_entry_created" => event(
                1,
                Body::Created {
                    kind: ConversationKind::Group,
                    title: "team".into(),
                    members: vec![(2, Role::Owner), (3, Role::Member)],
                },
            ),
            "event_entry_members_added" => event(9, Body::MembersAdded { members: vec![(4, Role::Admin)] }),
            "event_entry_member_removed" => event(10, Body::MemberRemoved { user: 4 }),
            "event_entry_member_left" => event(11, Body::MemberLeft),
            "entry_redacted" => event(7, Body::Redacted { target: 6 }),
            "request_mark_delivered" => req(17, RequestBody::MarkDelivered { marks: vec![(CONV, 7), (301, 12)] }),
            "request_mark_read" => req(18, RequestBody::MarkRead { conv: CONV, seq: 7 }),
            "request_receipts" => req(19, RequestBody::Receipts { conv: CONV }),
            "request_conversation_states" => req(20, RequestBody::ConversationStates { after: None }),
            "request_catch_up" => req(21, RequestBody::CatchUp { conv: CONV, after: 17, limit: 500 }),
            "request_set_presence" => req(22, RequestBody::SetPresence { away: true }),
            "request_presence" => req(23, RequestBody::Presence { users: vec![2, 3] }),
            "request_settings" => {
                req(24, RequestBody::Settings { set: Some(Settings { read_receipts_private: true }) })
            }
            "signal_typing" => Fixture::Client(ClientFrame::Signal(Signal::Typing { conv: CONV, typing: true })),
            "response_receipt" => ok(18, Reply::Receipt(receipt(1, 7, Some(7)))),
            "response_receipts" => ok(19, Reply::Receipts(vec![receipt(1, 7, Some(7)), receipt(2, 9, None)])),
            "response_conversation_states" => ok(
                20,
                Reply::ConversationStates {
                    items: vec![ConversationState {
                        summary: ConversationSummary {
                            id: 301,
                            kind: ConversationKind::Direct,
                            title: "bob".into(),
                            last_seq: 12,
                            member_count: 2,
                            my_role: Role::Member,
                        },
                        unread: 3,
                        delivered_up_to: 12,
                        read_up_to: 9,
                    }],
                    more: false,
                },
            ),
            "response_catch_up" => ok(
                21,
                Reply::CatchUp(CatchUpPage {
                    conv: CONV,
                    entries: vec![entry(18, Body::Text { text: "hi".into(), edited: false })],
                    last_seq: 18,
                    complete: true,
                    receipts: vec![receipt(2, 18, Some(17))],
                }),
            ),
            "response_presence" => ok(
                23,
                Reply::Presence(vec![PresenceInfo {
                    user: 2,
                    name: "bob".into(),
                    state: PresenceState::Away,
                    last_seen_ms: T,
                }]),
            ),
            "response_settings" => ok(24, Reply::Settings(Settings { read_receipts_private: true })),
            "event_receipt" => Fixture::Server(ServerFrame::Event(Event::Receipt(receipt(2, 9, Some(8))))),
            "event_presence" => Fixture::Server(ServerFrame::Event(Event::Presence(PresenceInfo {
                user: 3,
                name: "carol".into(),
                state: PresenceState::Offline,
                last_seen_ms: T,
            }))),
            "event_typing" => Fixture::Server(ServerFrame::Event(Event::Typing { conv: CONV, user: 2, typing: true })),
            "event_receipts" => {
                Fixture::Server(ServerFrame::Event(Event::Receipts(vec![receipt(2, 9, Some(8)), receipt(3, 9, None)])))
            }
            "request_begin_upload" => req(
                25,
                RequestBody::BeginUpload(NewUpload {
                    name: "cat.png".into(),
                    size: 2_000_000,
                    content_type: "image/png".into(),
                    blake3: [0xab; 32],
                }),
            ),
            "request_upload_status" => req(26, RequestBody::UploadStatus { file: FILE }),
            "request_cancel_upload" => req(27, RequestBody::CancelUpload { file: FILE }),
            "request_send_files" => {
                req(28, RequestBody::SendFiles { conv: CONV, client_id: CID, text: "look".into(), files: vec![FILE] })
            }
            "request_file_info" => req(29, RequestBody::FileInfo { file: FILE }),
            "request_delete_file" => req(30, RequestBody::DeleteFile { file: FILE }),
            "response_upload" => ok(
                25,
                Reply::Upload(UploadStatus {
                    file: FILE,
                    size: 2_000_000,
                    offset: 1_048_576,
                    content_type: "image/png".into(),
                    complete: false,
                    expires_ms: T + 86_400_000,
                    chunk_max: crate::limits::MAX_CHUNK_BYTES,
                }),
            ),
            "response_file" => ok(
                29,
                Reply::File(FileInfo {
                    file: file_ref(),
                    blake3: [0xab; 32],
                    uploader: 2,
                    created_ms: T,
                    state: FileState::Complete {
                        thumbnail: Some(FileRef {
                            file: THUMB,
                            name: "cat.png.thumb.png".into(),
                            size: 4_000,
                            content_type: "image/png".into(),
                        }),
                    },
                }),
            ),
            "event_entry_files" => {
                event(12, Body::Files { text: "look".into(), files: vec![file_ref()], edited: false })
            }
            "event_file" => Fixture::Server(ServerFrame::Event(Event::File(FileProgress {
                conv: Some(CONV),
                file: FILE,
                size: 2_000_000,
                state: FileState::Uploading { offset: 1_048_576 },
            }))),
            "transfer_open_upload" => Fixture::Open(TransferOpen::Upload { file: FILE, offset: 1_048_576 }),
            "transfer_open_download" => {
                Fixture::Open(TransferOpen::Download { file: FILE, offset: 1_000, length: 500 })
            }
            "transfer_chunk" => Fixture::Chunk(Chunk::new(1_048_576, Bytes::from_static(b"abc"))),
            "transfer_accepted" => Fixture::Transfer(TransferReply::Accepted { offset: 1_048_576 }),
            "transfer_durable" => Fixture::Transfer(TransferReply::Durable { offset: 1_048_579 }),
            "transfer_complete" => Fixture::Transfer(TransferReply::Complete(file_ref())),
            "transfer_range" => Fixture::Transfer(TransferReply::Range { offset: 1_000, length: 500, size: 2_000_000 }),
            "transfer_failed" => Fixture::Transfer(TransferReply::Failed {
                error: ErrorBody::new(ErrorCode::WRONG_OFFSET, "the durable offset is 1048576"),
                offset: 1_048_576,
            }),
            "request_list_uploads" => req(31, RequestBody::ListUploads { after: Some(THUMB) }),
            "request_usage" => req(33, RequestBody::Usage),
            "request_list_files" => req(37, RequestBody::ListFiles { after: None }),
            "request_withdraw_file" => req(38, RequestBody::WithdrawFile { file: FILE }),
            "request_entry_names" => req(39, RequestBody::EntryNames { conv: CONV, seq: 17 }),
            "response_names" => ok(39, Reply::Names(vec![UserName { user_id: 9, name: "mallory".into() }])),
            "response_files" => ok(
                37,
                Reply::Files {
                    items: vec![StoredFile { file: file_ref(), blake3: [0xab; 32], created_ms: T, held: true }],
                    more: false,
                },
            ),
            "request_block" => req(35, RequestBody::Block { user: "mallory".into(), blocked: true }),
            "request_blocked_users" => req(36, RequestBody::BlockedUsers),
            "response_blocked_users" => {
                ok(36, Reply::BlockedUsers(vec![BlockedUser { user_id: 9, name: "mallory".into() }]))
            }
            "request_change_password" => req(
                34,
                RequestBody::ChangePassword {
                    current: "correct horse".into(),
                    new: "battery staple".into(),
                    sign_out_others: true,
                },
            ),
            "response_usage" => ok(
                33,
                Reply::Usage(Usage {
                    stored_bytes: 3_000_000,
                    quota_bytes: 1 << 30,
                    uploads_in_progress: 1,
                    max_uploads_in_progress: 8,
                    max_file_bytes: 100 << 20,
                }),
            ),
            "request_set_role" => req(32, RequestBody::SetRole { conv: CONV, user: 3, role: Role::Owner }),
            "request_set_title" => req(40, RequestBody::SetTitle { conv: CONV, title: "ops".into() }),
            "request_revoke_other_device" => {
                req(41, RequestBody::RevokeOtherDevice { device_id: 4, password: "correct horse".into() })
            }
            "event_entry_title_changed" => event(14, Body::TitleChanged { title: "ops".into() }),
            "event_entry_roles_changed" => {
                event(13, Body::RolesChanged { members: vec![(3, Role::Owner), (2, Role::Admin)] })
            }
            "response_uploads" => ok(
                31,
                Reply::Uploads {
                    items: vec![UploadInfo {
                        file: file_ref(),
                        blake3: [0xab; 32],
                        offset: 1_048_576,
                        created_ms: T,
                        expires_ms: T + 86_400_000,
                    }],
                    more: false,
                },
            ),
            _ => return None,
        })
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
    }

    fn unhex(s: &str) -> Vec<u8> {
        s.split(' ')
            .map(|t| {
                assert!(t.len() == 2 && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{t:?}");
                u8::from_str_radix(t, 16).unwrap()
            })
            .collect()
    }

    /// The vector lines the document should contain, for pasting after a deliberate change.
    fn expected_block() -> String {
        NAMES.iter().map(|n| format!("vector {n}: {}\n", hex(&fixture(n).unwrap().encode()))).collect()
    }

    #[test]
    fn documented_vectors_match() {
        let documented: Vec<(&str, &str)> = DOC
            .lines()
            .filter_map(|l| l.trim().strip_prefix("vector "))
            .map(|rest| rest.split_once(": ").unwrap_or_else(|| panic!("malformed vector line {rest:?}")))
            .collect();
        let hint = format!("expected vectors:\n{}", expected_block());
        for name in NAMES {
            assert!(fixture(name).is_some(), "no fixture {name}");
            let count = documented.iter().filter(|(n, _)| n == name).count();
            assert_eq!(count, 1, "vector {name} appears {count} times in PROTOCOL.md\n{hint}");
        }
        for (name, hex_text) in documented {
            let fixture = fixture(name).unwrap_or_else(|| panic!("PROTOCOL.md documents unknown vector {name}"));
            assert!(NAMES.contains(&name), "fixture {name} missing from NAMES");
            assert_eq!(hex_text, hex(&fixture.encode()), "vector {name} is stale\n{hint}");
            let mut dec = FrameDecoder::new(MAX_SERVER_FRAME_BYTES);
            dec.push(&unhex(hex_text));
            let body = dec.next_frame().unwrap().unwrap_or_else(|| panic!("vector {name} is not a complete frame"));
            assert_eq!(dec.buffered(), 0, "vector {name} has trailing bytes");
            assert_eq!(fixture.decode_same(&body), fixture, "vector {name} does not decode back");
        }
    }

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,40}"
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9_.-]{1,16}"
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Owner), Just(Role::Admin), Just(Role::Member)]
    }

    fn page() -> impl Strategy<Value = Page> {
        prop_oneof![Just(Page::Latest), any::<Seq>().prop_map(Page::Before), any::<Seq>().prop_map(Page::After)]
    }

    fn blob() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..80).prop_map(Bytes::from)
    }

    fn enrollment() -> impl Strategy<Value = Enroll> {
        (name(), text(), text(), blob(), blob()).prop_map(|(user, password, device_name, public_key, signature)| {
            Enroll { user, password, device_name, public_key, signature }
        })
    }

    fn request_body() -> impl Strategy<Value = RequestBody> {
        let names = || proptest::collection::vec(name(), 0..8);
        prop_oneof![
            enrollment().prop_map(RequestBody::Register),
            enrollment().prop_map(RequestBody::Login),
            (name(), any::<DeviceId>(), blob()).prop_map(|(user, device_id, signature)| RequestBody::Authenticate {
                user,
                device_id,
                signature
            }),
            Just(RequestBody::Ping),
            name().prop_map(|peer| RequestBody::CreateConversation(NewConversation::Direct { peer })),
            (text(), names()).prop_map(|(title, members)| {
                RequestBody::CreateConversation(NewConversation::Group { title, members })
            }),
            any::<Option<ConvId>>().prop_map(|after| RequestBody::ListConversations { after }),
            any::<ConvId>().prop_map(|conv| RequestBody::Members { conv }),
            (any::<ConvId>(), names(), role()).prop_map(|(conv, users, role)| RequestBody::AddMembers {
                conv,
                users,
                role
            }),
            (any::<ConvId>(), any::<UserId>()).prop_map(|(conv, user)| RequestBody::RemoveMember { conv, user }),
            any::<ConvId>().prop_map(|conv| RequestBody::Leave { conv }),
            (any::<ConvId>(), any::<ClientMsgId>(), text()).prop_map(|(conv, client_id, text)| RequestBody::Send {
                conv,
                client_id,
                text
            }),
            (any::<ConvId>(), any::<ClientMsgId>(), any::<Seq>(), text())
                .prop_map(|(conv, client_id, target, text)| RequestBody::Edit { conv, client_id, target, text }),
            (any::<ConvId>(), any::<ClientMsgId>(), any::<Seq>())
                .prop_map(|(conv, client_id, target)| RequestBody::Delete { conv, client_id, target }),
            (any::<ConvId>(), page(), any::<u16>()).prop_map(|(conv, page, limit)| RequestBody::History {
                conv,
                page,
                limit
            }),
            Just(RequestBody::ListDevices),
            any::<DeviceId>().prop_map(|device_id| RequestBody::RevokeDevice { device_id }),
            (any::<DeviceId>(), ".{0,20}")
                .prop_map(|(device_id, password)| RequestBody::RevokeOtherDevice { device_id, password }),
            (any::<ConvId>(), any::<Seq>()).prop_map(|(conv, seq)| RequestBody::EntryNames { conv, seq }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(id in any::<u32>(), body in request_body(), split in any::<prop::sample::Index>()) {
            let frame = ClientFrame::Request(Request { id, body });
            let bytes = encode_frame(&frame).unwrap();
            // Deliver the frame in two pieces, split anywhere.
            let at = split.index(bytes.len());
            let mut dec = FrameDecoder::new(MAX_CLIENT_FRAME_BYTES);
            dec.push(&bytes[..at]);
            prop_assert_eq!(dec.next_frame().unwrap(), None);
            dec.push(&bytes[at..]);
            let body = dec.next_frame().unwrap().expect("a whole frame was pushed");
            prop_assert_eq!(dec.buffered(), 0);
            prop_assert_eq!(decode::<ClientFrame>(&body).unwrap(), frame);
        }
    }
}
