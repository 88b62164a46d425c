//! Resumable file streams end to end (PROTOCOL.md section 12): uploads that survive a
//! dropped connection and a broker restart, every refusal with its own code and nothing
//! published, who may read a file, range downloads, expiry, shared blobs, and many
//! uploads at once. Real broker, real QUIC, real disk.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_broker::pauses::Point;
use switchboard_client::Client;
use switchboard_protocol::{
    Body, ErrorCode, FileId, FileState, NewUpload, Page, Reply, RequestBody, TransferOpen, TransferReply,
};
use switchboard_tests::{
    STEP_DEADLINE, TestBroker, Transfer, begin_upload, bounded, download, new_upload, next_entry, no_event,
    revoked_while_held, upload_range, upload_rest, within,
};

/// `n` bytes that differ from those of another `seed`.
fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed).collect()
}

fn code_of(result: Result<Reply, switchboard_client::ClientError>) -> ErrorCode {
    result.unwrap_err().code().expect("an error answer")
}

async fn file_info(client: &Client, file: FileId) -> Result<Reply, switchboard_client::ClientError> {
    client.request(RequestBody::FileInfo { file }).await
}

async fn status(client: &Client, file: FileId) -> Result<Reply, switchboard_client::ClientError> {
    client.request(RequestBody::UploadStatus { file }).await
}

fn offset_of(reply: Reply) -> u64 {
    match reply {
        Reply::Upload(s) => s.offset,
        other => panic!("expected Upload, got {other:?}"),
    }
}

/// Uploads `data` completely and returns its id.
async fn upload(client: &Client, name: &str, data: &[u8]) -> FileId {
    let begun = begin_upload(client, name, "application/octet-stream", data).await;
    match upload_rest(client.connection(), begun.file, data, 0).await {
        TransferReply::Complete(f) => assert_eq!((f.file, f.size), (begun.file, data.len() as u64)),
        other => panic!("expected Complete, got {other:?}"),
    }
    begun.file
}

/// Sends a message carrying `file` (text empty) to `conv`.
async fn attach(client: &Client, conv: switchboard_protocol::ConvId, file: FileId) {
    let send = RequestBody::SendFiles {
        conv,
        client_id: switchboard_client::new_client_id(),
        text: String::new(),
        files: vec![file],
    };
    client.request(send).await.unwrap();
}

/// Begins an upload of `data`, sends its first 256 KiB and attaches it in `conv` while it
/// is still uploading; then `finish` sends the rest.
async fn attached_while_uploading(client: &Client, conv: switchboard_protocol::ConvId, data: &[u8]) -> FileId {
    let begun = begin_upload(client, "v.bin", "application/octet-stream", data).await;
    upload_range(client.connection(), begun.file, data, 0, 256 * 1024, 256 * 1024).await;
    attach(client, conv, begun.file).await;
    begun.file
}

/// Sends the rest of an upload from its durable offset: it completes.
async fn finish(client: &Client, file: FileId, data: &[u8]) {
    let offset = offset_of(status(client, file).await.unwrap());
    assert!(matches!(upload_rest(client.connection(), file, data, offset).await, TransferReply::Complete(_)));
}

fn files_in(dir: std::path::PathBuf) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn an_upload_cut_at_half_resumes_on_a_new_connection_and_completes() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let data = bytes(3 * 1024 * 1024 + 123, 1);
        let begun = begin_upload(&alice, "big.bin", "application/octet-stream", &data).await;
        assert_eq!((begun.offset, begun.complete, begun.chunk_max), (0, false, 1024 * 1024));
        let half = data.len() as u64 / 2;
        let replies = upload_range(alice.connection(), begun.file, &data, 0, half, 256 * 1024).await;
        assert!(matches!(replies.last(), Some(TransferReply::Durable { offset }) if *offset >= half), "{replies:?}");
        // The connection drops mid-upload.
        alice.connection().close(0u32.into(), b"lift");
        drop(alice);

        let alice = tb.connector().connect(&alice_id).await.unwrap();
        let offset = offset_of(status(&alice, begun.file).await.unwrap());
        assert!(offset >= half && offset < data.len() as u64, "resumes from the durable offset {offset}");
        // Any other offset is refused with the durable one.
        let mut wrong = Transfer::open(alice.connection(), &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        match wrong.reply().await {
            Some(TransferReply::Failed { error, offset: o }) => {
                assert_eq!((error.code, o), (ErrorCode::WRONG_OFFSET, offset))
            }
            other => panic!("expected WRONG_OFFSET, got {other:?}"),
        }
        match upload_rest(alice.connection(), begun.file, &data, offset).await {
            TransferReply::Complete(f) => assert_eq!(f.size, data.len() as u64),
            other => panic!("expected Complete, got {other:?}"),
        }
        let (range, got) = download(alice.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(range, TransferReply::Range { offset: 0, length: data.len() as u64, size: data.len() as u64 });
        assert_eq!(blake3::hash(&got), blake3::hash(&data));
        match file_info(&alice, begun.file).await.unwrap() {
            Reply::File(info) => {
                assert_eq!(info.blake3, *blake3::hash(&data).as_bytes());
                assert_eq!(info.state, FileState::Complete { thumbnail: None });
            }
            other => panic!("{other:?}"),
        }
        // A stream opened for a complete upload is told so at once.
        let mut again = Transfer::open(alice.connection(), &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        assert!(matches!(again.reply().await, Some(TransferReply::Complete(_))));
    })
    .await
}

fn listed(reply: Reply) -> Vec<(FileId, u64)> {
    match reply {
        Reply::Uploads { items, more: false } => items.iter().map(|u| (u.file.file, u.offset)).collect(),
        other => panic!("expected one page of Uploads, got {other:?}"),
    }
}

#[tokio::test]
async fn my_uploads_in_progress_are_listed_on_every_device_of_mine_only() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (laptop, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let list = RequestBody::ListUploads { after: None };
        assert_eq!(listed(laptop.request(list.clone()).await.unwrap()), vec![]);
        let (half, whole) = (bytes(2 * 1024 * 1024, 3), bytes(1000, 4));
        let a = begin_upload(&laptop, "half.bin", "application/octet-stream", &half).await;
        let b = begin_upload(&laptop, "whole.bin", "application/octet-stream", &whole).await;
        let c = begin_upload(&laptop, "dropped.bin", "application/octet-stream", &whole).await;
        let bobs = match bob
            .request(RequestBody::BeginUpload(NewUpload {
                name: "bobs.bin".into(),
                size: 10,
                content_type: "application/octet-stream".into(),
                blake3: [7; 32],
            }))
            .await
            .unwrap()
        {
            Reply::Upload(s) => s.file,
            other => panic!("{other:?}"),
        };
        let replies = upload_range(laptop.connection(), a.file, &half, 0, 1024 * 1024, 256 * 1024).await;
        let durable = match replies.last() {
            Some(TransferReply::Durable { offset }) => *offset,
            other => panic!("{other:?}"),
        };
        laptop.request(RequestBody::CancelUpload { file: c.file }).await.unwrap();

        // Another device of alice's sees them with their durable offsets, name, size and hash.
        let (phone, _) = tb.login("alice").await;
        let reply = phone.request(list.clone()).await.unwrap();
        let mut expected = vec![(a.file, durable), (b.file, 0)];
        expected.sort();
        assert_eq!(listed(reply.clone()), expected);
        let Reply::Uploads { items, .. } = reply else { unreachable!() };
        let first = items.iter().find(|u| u.file.file == a.file).unwrap();
        assert_eq!(
            (first.file.name.as_str(), first.file.size, first.blake3),
            ("half.bin", half.len() as u64, *blake3::hash(&half).as_bytes())
        );
        assert!(first.expires_ms > first.created_ms);
        // Paged by id.
        let after = RequestBody::ListUploads { after: Some(expected[0].0) };
        assert_eq!(listed(phone.request(after).await.unwrap()), expected[1..].to_vec());
        // bob sees only his own.
        assert_eq!(listed(bob.request(list.clone()).await.unwrap()), vec![(bobs, 0)]);

        // A completed upload leaves the list (resumed as the protocol says: status first).
        assert_eq!(offset_of(status(&phone, b.file).await.unwrap()), 0);
        assert!(matches!(upload_rest(phone.connection(), b.file, &whole, 0).await, TransferReply::Complete(_)));
        assert_eq!(listed(phone.request(list).await.unwrap()), vec![(a.file, durable)]);
    })
    .await
}

#[tokio::test]
async fn an_upload_resumes_across_a_broker_restart() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let data = bytes(2 * 1024 * 1024 + 7, 2);
        let begun = begin_upload(&alice, "r.bin", "application/octet-stream", &data).await;
        let half = data.len() as u64 / 2;
        upload_range(alice.connection(), begun.file, &data, 0, half, 128 * 1024).await;
        drop(alice);
        tb.restart().await;
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        let offset = offset_of(status(&alice, begun.file).await.unwrap());
        assert!(offset >= half, "the durable offset survived: {offset}");
        assert!(matches!(upload_rest(alice.connection(), begun.file, &data, offset).await, TransferReply::Complete(_)));
        let (_, got) = download(alice.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(got, data);
        // And the complete file survives another restart.
        drop(alice);
        tb.restart().await;
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        // A connection opens transfer streams once a file request allowed them.
        file_info(&alice, begun.file).await.unwrap();
        let (_, got) = download(alice.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(got, data);
    })
    .await
}

#[tokio::test]
async fn a_range_download_returns_exactly_the_requested_bytes() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(700 * 1024 + 5, 3);
        let file = upload(&alice, "r.bin", &data).await;
        let size = data.len() as u64;
        for (offset, length, want) in [
            (0, 10, 0..10),
            (1000, 500, 1000..1500),
            (size - 3, 0, (size - 3) as usize..size as usize),
            (size - 3, 100, (size - 3) as usize..size as usize),
            (300 * 1024, 300 * 1024, 300 * 1024..600 * 1024),
            (size, 0, size as usize..size as usize),
        ] {
            let (range, got) = download(alice.connection(), file, offset, length).await.unwrap();
            assert_eq!(range, TransferReply::Range { offset, length: want.len() as u64, size });
            assert_eq!(got, data[want], "{offset}+{length}");
        }
        assert_eq!(download(alice.connection(), file, size + 1, 0).await.unwrap_err().code, ErrorCode::INVALID);
    })
    .await
}

#[tokio::test]
async fn each_refusal_gets_its_own_code_and_publishes_nothing() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.max_file_bytes = 4 * 1024 * 1024;
            c.quota_bytes = 6 * 1024 * 1024;
            c.max_uploads_per_user = 3;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let mut bob_events = bob.events().unwrap();
        next_entry(&mut bob_events).await;
        let conn = alice.connection();
        let data = bytes(300 * 1024, 4);

        // A corrupt chunk is refused and not stored; the upload goes on from the
        // durable offset on a new stream.
        let begun = begin_upload(&alice, "c.bin", "application/octet-stream", &data).await;
        let mut t = Transfer::open(conn, &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset: 0 })));
        // One bit flipped after the client computed the checksum.
        let mut damaged = data[..1000].to_vec();
        damaged[500] ^= 0x10;
        t.chunk(0, &damaged, Some(switchboard_protocol::Chunk::checksum(&data[..1000]))).await;
        match t.reply().await {
            Some(TransferReply::Failed { error, offset }) => {
                assert_eq!((error.code, offset), (ErrorCode::CHUNK_CORRUPT, 0))
            }
            other => panic!("expected CHUNK_CORRUPT, got {other:?}"),
        }
        assert_eq!(offset_of(status(&alice, begun.file).await.unwrap()), 0, "nothing of it was stored");
        // A chunk at the wrong place.
        let mut t = Transfer::open(conn, &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        t.reply().await;
        t.chunk(10, &data[10..20], None).await;
        match t.reply().await {
            Some(TransferReply::Failed { error, offset }) => {
                assert_eq!((error.code, offset), (ErrorCode::WRONG_OFFSET, 0))
            }
            other => panic!("expected WRONG_OFFSET, got {other:?}"),
        }
        assert!(matches!(upload_rest(conn, begun.file, &data, 0).await, TransferReply::Complete(_)));

        // Bytes that do not match the declared whole-file hash: nothing published, the
        // upload gone, its quota back.
        let liar = NewUpload {
            name: "liar.bin".into(),
            size: data.len() as u64,
            content_type: "application/octet-stream".into(),
            blake3: [7; 32],
        };
        let Reply::Upload(lie) = alice.request(RequestBody::BeginUpload(liar)).await.unwrap() else { panic!() };
        match upload_rest(conn, lie.file, &data, 0).await {
            TransferReply::Failed { error, .. } => assert_eq!(error.code, ErrorCode::HASH_MISMATCH),
            other => panic!("expected HASH_MISMATCH, got {other:?}"),
        }
        assert_eq!(code_of(status(&alice, lie.file).await), ErrorCode::NOT_FOUND);
        assert_eq!(code_of(file_info(&alice, lie.file).await), ErrorCode::NOT_FOUND);
        let send = |file| RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: "look".into(),
            files: vec![file],
        };
        assert_eq!(code_of(alice.request(send(lie.file)).await), ErrorCode::NOT_FOUND);

        // An executable declared as an image: TYPE_MISMATCH on its first chunk.
        let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
        elf.resize(8192, 0);
        let exe = begin_upload(&alice, "cat.png", "image/png", &elf).await;
        match upload_rest(conn, exe.file, &elf, 0).await {
            TransferReply::Failed { error, .. } => assert_eq!(error.code, ErrorCode::TYPE_MISMATCH),
            other => panic!("expected TYPE_MISMATCH, got {other:?}"),
        }
        assert_eq!(code_of(status(&alice, exe.file).await), ErrorCode::NOT_FOUND, "removed");
        // However small the chunks that bring its first bytes.
        let exe = begin_upload(&alice, "notes.pdf", "application/pdf", &elf).await;
        let replies = upload_range(conn, exe.file, &elf, 0, elf.len() as u64, 1000).await;
        match replies.last() {
            Some(TransferReply::Failed { error, .. }) => assert_eq!(error.code, ErrorCode::TYPE_MISMATCH),
            other => panic!("expected TYPE_MISMATCH, got {other:?}"),
        }
        assert_eq!(code_of(status(&alice, exe.file).await), ErrorCode::NOT_FOUND, "removed");
        // A mislabelled harmless type is relabelled and published as what it is.
        let png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        let relabelled = begin_upload(&alice, "pic.jpg", "image/jpeg", &png).await;
        match upload_rest(conn, relabelled.file, &png, 0).await {
            TransferReply::Complete(f) => assert_eq!(f.content_type, "image/png"),
            other => panic!("expected Complete, got {other:?}"),
        }

        // Limits at begin: size, uploads in progress, quota; in that order.
        let big = NewUpload {
            name: "big".into(),
            size: 4 * 1024 * 1024 + 1,
            content_type: "application/octet-stream".into(),
            blake3: [0; 32],
        };
        match alice.request(RequestBody::BeginUpload(big)).await {
            Err(switchboard_client::ClientError::Server(e)) => {
                assert_eq!(e.code, ErrorCode::FILE_TOO_LARGE);
                assert!(e.message.contains("4194304 bytes at most"), "the answer names the limit: {}", e.message);
            }
            other => panic!("expected FILE_TOO_LARGE, got {other:?}"),
        }
        let declare = |size: u64| {
            RequestBody::BeginUpload(NewUpload {
                name: "part".into(),
                size,
                content_type: "application/octet-stream".into(),
                blake3: [0; 32],
            })
        };
        for bad in ["", "a/b", "a\nb"] {
            let r = RequestBody::BeginUpload(NewUpload {
                name: bad.into(),
                size: 1,
                content_type: "text/plain".into(),
                blake3: [0; 32],
            });
            assert_eq!(code_of(alice.request(r).await), ErrorCode::INVALID, "{bad:?}");
        }
        assert_eq!(code_of(alice.request(declare(0)).await), ErrorCode::INVALID);
        // Quota: 6 MiB; ~0.6 MiB held by the two complete files.
        let Reply::Upload(a) = alice.request(declare(3 * 1024 * 1024)).await.unwrap() else { panic!() };
        let over = alice.request(declare(3 * 1024 * 1024)).await.unwrap_err();
        assert_eq!(over.code(), Some(ErrorCode::QUOTA_EXCEEDED));
        // It says the quota and how much of it is in use (the upload above and the files).
        let message = over.to_string();
        assert!(message.contains("(6291456 bytes)") && message.contains("bytes are in use"), "{message}");
        alice.request(declare(1000)).await.unwrap();
        alice.request(declare(1000)).await.unwrap();
        assert_eq!(code_of(alice.request(declare(1000)).await), ErrorCode::TOO_MANY_UPLOADS);
        // Usage says what the checks counted: the 3 MiB upload, the two small ones and
        // the two complete files.
        let Reply::Usage(before) = alice.request(RequestBody::Usage).await.unwrap() else { panic!() };
        assert_eq!((before.quota_bytes, before.max_file_bytes), (6 * 1024 * 1024, 4 * 1024 * 1024));
        assert_eq!((before.uploads_in_progress, before.max_uploads_in_progress), (3, 3));
        assert!(before.stored_bytes >= 3 * 1024 * 1024 + 2000, "{before:?}");
        // Cancelling gives the place and the quota back.
        assert_eq!(alice.request(RequestBody::CancelUpload { file: a.file }).await.unwrap(), Reply::Done);
        let Reply::Usage(after) = alice.request(RequestBody::Usage).await.unwrap() else { panic!() };
        assert_eq!(after.stored_bytes, before.stored_bytes - 3 * 1024 * 1024);
        assert_eq!(after.uploads_in_progress, 2);
        assert_eq!(code_of(status(&alice, a.file).await), ErrorCode::NOT_FOUND);
        alice.request(declare(3 * 1024 * 1024)).await.unwrap();

        // Nothing refused was published: bob saw no message, and the history holds none.
        let (entries, _) = bob.history(conv, Page::After(1), 100).await.unwrap();
        assert!(entries.is_empty(), "{entries:?}");
    })
    .await
}

#[tokio::test]
async fn the_disk_reserve_refuses_uploads_with_storage_full() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.disk_reserve_bytes = u64::MAX / 2).await;
        let (alice, _) = tb.register("alice").await;
        let r = RequestBody::BeginUpload(NewUpload {
            name: "x".into(),
            size: 10,
            content_type: "text/plain".into(),
            blake3: [0; 32],
        });
        assert_eq!(code_of(alice.request(r).await), ErrorCode::STORAGE_FULL);
    })
    .await
}

/// A broker whose disk has room for one upload of `size`, a quarter of the temp dir's
/// free space (the reserve leaves that much, and room for 7/8 of it must stay), with
/// `adjust` applied; and a `BeginUpload` of `size` that is never sent.
async fn room_for_one_upload(
    adjust: impl FnOnce(&mut switchboard_broker::config::Config),
) -> (TestBroker, RequestBody) {
    let free = switchboard_broker::files::free_bytes(&std::env::temp_dir()).unwrap();
    let size = free / 4;
    let tb = TestBroker::start_with(|c| {
        c.disk_reserve_bytes = free - size - free / 8;
        c.max_file_bytes = size;
        c.quota_bytes = u64::MAX / 2;
        adjust(c);
    })
    .await;
    let content_type = "application/octet-stream".into();
    (tb, RequestBody::BeginUpload(NewUpload { name: "big.bin".into(), size, content_type, blake3: [0; 32] }))
}

#[tokio::test]
async fn uploads_declared_and_never_sent_stop_holding_the_disk() {
    bounded(async {
        // Accounts that declare big uploads and send nothing (registration is open)
        // held their room on the disk for the uploads' whole 24 h, and everyone's
        // uploads were refused STORAGE_FULL meanwhile.
        let (tb, declare) = room_for_one_upload(|c| c.upload_promise_secs = 2).await;
        let (mallory, _) = tb.register("mallory").await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let Reply::Upload(held) = mallory.request(declare.clone()).await.unwrap() else { panic!() };
        let refused = code_of(alice.request(declare.clone()).await);
        assert_eq!(refused, ErrorCode::STORAGE_FULL, "mallory's upload holds the room");
        // Mallory sends nothing for the hold (2 s here, 60 s by default): its room lapses.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let Reply::Upload(_) = alice.request(declare.clone()).await.unwrap() else { panic!() };
        // Alice's upload, just begun, holds its room as mallory's did.
        assert_eq!(code_of(bob.request(declare).await), ErrorCode::STORAGE_FULL);
        // Mallory's upload is still there to resume (only its room lapsed).
        assert_eq!(offset_of(status(&mallory, held.file).await.unwrap()), 0);
    })
    .await
}

#[tokio::test]
async fn cancelling_and_beginning_again_holds_no_room_for_nothing() {
    bounded(async {
        // The lapse alone was sidestepped by cancelling each upload before its hold ended
        // and beginning it again (an attacker's review): a user's begins hold room only
        // within an allowance (8, then 16 an hour).
        let (tb, declare) = room_for_one_upload(|_| {}).await;
        let (mallory, _) = tb.register("mallory").await;
        let (alice, _) = tb.register("alice").await;
        for _ in 0..8 {
            let Reply::Upload(held) = mallory.request(declare.clone()).await.unwrap() else { panic!() };
            let refused = code_of(alice.request(declare.clone()).await);
            assert_eq!(refused, ErrorCode::STORAGE_FULL, "mallory's begin holds");
            mallory.cancel_upload(held.file).await.unwrap();
        }
        // The ninth begins, holding nothing: alice's upload is taken beside it.
        let Reply::Upload(_) = mallory.request(declare.clone()).await.unwrap() else { panic!() };
        let Reply::Upload(_) = alice.request(declare).await.unwrap() else { panic!() };
    })
    .await
}

/// Begins refused (here `STORAGE_FULL`: another's upload holds the room) spend none of
/// the user's allowance of begins that hold room: the one let in later holds its room.
/// Before, each refusal spent one, and a user who retried while the disk was full began
/// its upload holding nothing, to be refused `STORAGE_FULL` part-way through (an
/// attacker review).
#[tokio::test]
async fn refused_begins_spend_none_of_the_allowance_of_held_room() {
    bounded(async {
        let (tb, declare) = room_for_one_upload(|_| {}).await;
        let (mallory, _) = tb.register("mallory").await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let Reply::Upload(held) = mallory.request(declare.clone()).await.unwrap() else { panic!() };
        for _ in 0..10 {
            assert_eq!(code_of(alice.request(declare.clone()).await), ErrorCode::STORAGE_FULL);
        }
        mallory.cancel_upload(held.file).await.unwrap();
        let Reply::Upload(_) = alice.request(declare.clone()).await.unwrap() else { panic!() };
        assert_eq!(code_of(bob.request(declare).await), ErrorCode::STORAGE_FULL, "alice's begin holds its room");
    })
    .await
}

/// A broker with a 1 MiB disk reserve on which alice began an upload of `data` (declared
/// `application/octet-stream`) whose room then lapsed, and bob's begin of 64 MiB holds
/// all but 100 KiB of the spare room (the disk as the checks see it: a shared disk's free
/// space moves by more than a chunk while a test runs).
async fn a_lapsed_upload_beside_held_room(data: &[u8]) -> (TestBroker, Client, FileId) {
    const MIB: u64 = 1024 * 1024;
    let reserve = MIB;
    let tb = TestBroker::start_with(|c| {
        c.upload_promise_secs = 1;
        c.disk_reserve_bytes = reserve;
        c.quota_bytes = u64::MAX / 2;
    })
    .await;
    tb.shared().files.pretend_free_bytes(Some(1 << 40));
    let (alice, _) = tb.register("alice").await;
    let (bob, _) = tb.register("bob").await;
    let lapsed = begin_upload(&alice, "lapsed.bin", "application/octet-stream", data).await.file;
    // Alice sends nothing within the hold: her upload's room lapses.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = 64 * MIB;
    let declare = NewUpload {
        name: "big.bin".into(),
        size: held,
        content_type: "application/octet-stream".into(),
        blake3: [0; 32],
    };
    let Reply::Upload(_) = bob.request(RequestBody::BeginUpload(declare)).await.unwrap() else { panic!() };
    tb.shared().files.pretend_free_bytes(Some(held + reserve + 100 * 1024));
    (tb, alice, lapsed)
}

#[tokio::test]
async fn an_upload_whose_room_lapsed_writes_only_into_spare_room() {
    bounded(async {
        // An upload whose room lapsed, resumed, wrote its chunks into the room another
        // upload held and into the disk reserve: uploads admitted past the reserve filled
        // the disk (a live attack). Each of its chunks now has to fit in the spare room.
        let data = bytes(512 * 1024, 9);
        let (tb, alice, lapsed) = a_lapsed_upload_beside_held_room(&data).await;
        let mut t = Transfer::open(alice.connection(), &TransferOpen::Upload { file: lapsed, offset: 0 }).await;
        assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset: 0 })));
        t.chunk(0, &data[..256 * 1024], None).await;
        match t.reply().await {
            Some(TransferReply::Failed { error, offset }) => {
                assert_eq!((error.code, offset), (ErrorCode::STORAGE_FULL, 0), "{error:?}")
            }
            other => panic!("expected STORAGE_FULL, got {other:?}"),
        }
        // Nothing was stored, the upload is kept, and with room again it resumes.
        assert_eq!(offset_of(status(&alice, lapsed).await.unwrap()), 0);
        tb.shared().files.pretend_free_bytes(Some(1 << 40));
        assert!(matches!(upload_rest(alice.connection(), lapsed, &data, 0).await, TransferReply::Complete(_)));
    })
    .await
}

#[tokio::test]
async fn only_the_uploader_and_members_where_it_is_attached_may_read_a_file() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (eve, _) = tb.register("eve").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let mut bob_events = bob.events().unwrap();
        next_entry(&mut bob_events).await;
        let data = bytes(200 * 1024, 5);
        let file = upload(&alice, "plan.pdf", &data).await;
        let missing = [0x77; 16];
        // Not attached anywhere: bob knows the id and learns nothing.
        for who in [&bob, &eve] {
            let real = file_info(who, file).await.unwrap_err();
            let none = file_info(who, missing).await.unwrap_err();
            assert_eq!(format!("{real}"), format!("{none}"));
            assert_eq!(real.code(), Some(ErrorCode::NOT_FOUND));
        }
        let send = RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: "the plan".into(),
            files: vec![file],
        };
        let Reply::Appended { seq, .. } = alice.request(send).await.unwrap() else { panic!() };
        let e = next_entry(&mut bob_events).await;
        match e.body {
            Body::Files { text, files, .. } => {
                assert_eq!(text, "the plan");
                assert_eq!(
                    (files[0].file, files[0].size, files[0].name.as_str()),
                    (file, data.len() as u64, "plan.pdf")
                );
            }
            other => panic!("{other:?}"),
        }
        // bob may read it now; eve may not, and gets the missing-file answer everywhere.
        assert!(matches!(file_info(&bob, file).await.unwrap(), Reply::File(_)));
        let (_, got) = download(bob.connection(), file, 0, 0).await.unwrap();
        assert_eq!(got, data);
        // eve's connection needs a file request answered before it may open streams.
        eve.request(RequestBody::BeginUpload(NewUpload {
            name: "e".into(),
            size: 1,
            content_type: "text/plain".into(),
            blake3: [0; 32],
        }))
        .await
        .unwrap();
        let real = download(eve.connection(), file, 0, 0).await.unwrap_err();
        let none = download(eve.connection(), missing, 0, 0).await.unwrap_err();
        assert_eq!(real, none);
        assert_eq!(real.code, ErrorCode::NOT_FOUND);
        let mut t = Transfer::open(eve.connection(), &TransferOpen::Upload { file, offset: 0 }).await;
        let real = t.reply().await;
        let mut t = Transfer::open(eve.connection(), &TransferOpen::Upload { file: missing, offset: 0 }).await;
        assert_eq!(real, t.reply().await, "an upload stream tells nothing either");
        for req in
            [RequestBody::UploadStatus { file }, RequestBody::CancelUpload { file }, RequestBody::DeleteFile { file }]
        {
            assert_eq!(code_of(eve.request(req.clone()).await), ErrorCode::NOT_FOUND, "{req:?}");
        }
        // eve cannot attach it to a conversation of hers either.
        let eve_conv = eve.create_direct("alice").await.unwrap().id;
        let steal = RequestBody::SendFiles {
            conv: eve_conv,
            client_id: switchboard_client::new_client_id(),
            text: String::new(),
            files: vec![file],
        };
        assert_eq!(code_of(eve.request(steal).await), ErrorCode::NOT_FOUND);
        // A removed member loses access with the membership.
        alice.remove_member(conv, bob.user_id).await.unwrap();
        assert_eq!(code_of(file_info(&bob, file).await), ErrorCode::NOT_FOUND);
        assert_eq!(download(bob.connection(), file, 0, 0).await.unwrap_err().code, ErrorCode::NOT_FOUND);
        // Deleting the message ends access through it, the uploader keeps hers.
        alice.add_members(conv, &["bob".into()], switchboard_protocol::Role::Member).await.unwrap();
        assert!(matches!(file_info(&bob, file).await.unwrap(), Reply::File(_)));
        alice.delete(conv, seq).await.unwrap();
        assert_eq!(code_of(file_info(&bob, file).await), ErrorCode::NOT_FOUND);
        assert!(matches!(file_info(&alice, file).await.unwrap(), Reply::File(_)));
    })
    .await
}

/// A broker allowing 50 member rows a second (a burst of 100) where alice's file is
/// attached in ten groups of hers that bob is in.
async fn a_file_in_ten_groups_with_bob() -> (TestBroker, Client, Client, FileId) {
    let tb = TestBroker::start_with(|c| c.member_rows_per_sec = 50).await;
    let (alice, _) = tb.register("alice").await;
    let (bob, _) = tb.register("bob").await;
    let file = upload(&alice, "plan.pdf", &bytes(10 * 1024, 3)).await;
    for i in 0..10 {
        let conv = alice.create_group(&format!("g{i}"), &["bob".into()]).await.unwrap().id;
        attach(&alice, conv, file).await;
    }
    (tb, alice, bob, file)
}

/// Asking about a file costs its member lookups from the asker's allowance of member
/// rows (a refusal the most a check can look at, file or no file): a stranger asking
/// over and over about a file carried in many conversations (each ask a seek and a
/// membership read per conversation, on the blocking pool) is refused `RATE_LIMITED`
/// once it is spent, before anything is read, while a member is still answered, and so
/// is the uploader about her own file whatever her allowance. Before, nothing bounded
/// how often one asked.
#[tokio::test]
async fn strangers_asking_about_a_widely_carried_file_spend_their_own_allowance() {
    bounded(async {
        let (tb, alice, bob, file) = a_file_in_ten_groups_with_bob().await;
        let (eve, _) = tb.register("eve").await;
        // Ten conversations looked at per ask: the burst (100 rows) lasts about ten.
        let mut codes = Vec::new();
        for _ in 0..30 {
            codes.push(code_of(file_info(&eve, file).await));
        }
        assert!(codes.iter().all(|c| [ErrorCode::NOT_FOUND, ErrorCode::RATE_LIMITED].contains(c)), "{codes:?}");
        assert!(codes.contains(&ErrorCode::RATE_LIMITED), "never limited: {codes:?}");
        // The same refusal for a file that does not exist: it tells nothing.
        assert_eq!(code_of(file_info(&eve, [0x77; 16]).await), ErrorCode::RATE_LIMITED);
        assert!(matches!(file_info(&bob, file).await.unwrap(), Reply::File(_)), "a member is answered");
        assert_eq!(code_of(file_info(&alice, [0x77; 16]).await), ErrorCode::NOT_FOUND);
        assert_eq!(code_of(file_info(&alice, [0x77; 16]).await), ErrorCode::RATE_LIMITED, "her allowance is spent");
        assert!(matches!(file_info(&alice, file).await.unwrap(), Reply::File(_)), "her own file is answered");
    })
    .await
}

/// A file becomes readable through a message only once the message is published (sent
/// to the members, so durable): while the message waits for its group commit (held here
/// by a 100 ms commit delay), a member asking `FileInfo` is answered as for a file it
/// may not read. Before, the attachment counted as soon as it was in the store, and a
/// crash in that window lost the message but not what its members had read through it
/// (file events to its members were sent the same way: the same rule decides them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_readable_through_a_message_only_once_the_message_is_published() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.commit_delay_us = 100_000;
            c.send_delay_target_ms = 0;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let file = upload(&alice, "plan.pdf", &bytes(10 * 1024, 4)).await;
        let mut bob_events = bob.events().unwrap();
        let attached = std::cell::Cell::new(false);
        let attaching = async {
            attach(&alice, conv, file).await;
            attached.set(true);
        };
        // Bob asks all along; each answer that lets him read comes after the message.
        let asking = async {
            let (mut refused, mut readable, mut seen) = (0, 0, false);
            while !attached.get() {
                let answer = file_info(&bob, file).await;
                while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, bob_events.next()).await {
                    if let switchboard_protocol::Event::Entry(entry) = event {
                        seen |= matches!(entry.body, Body::Files { .. });
                    }
                }
                match answer {
                    Ok(Reply::File(_)) => {
                        assert!(seen, "readable through a message bob was not sent");
                        readable += 1;
                    }
                    other => {
                        assert_eq!(code_of(other), ErrorCode::NOT_FOUND);
                        refused += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (refused, readable)
        };
        let ((), (refused, _)) = tokio::join!(attaching, asking);
        assert!(refused > 0, "bob asked while the message waited");
        assert!(matches!(file_info(&bob, file).await, Ok(Reply::File(_))), "readable once it is his");
    })
    .await
}

/// A member who gets a message carrying a file (here a forwarded copy, readable through
/// that message alone) may read the file as soon as the message arrives: the
/// conversation counts as carrying it from before the message is sent to anyone. With
/// `3ec08ee` it counted only once the message had gone to every member's devices, and a
/// reader asking `FileInfo` on its arrival was at times told the copy did not exist (a
/// second new user's trial saw `sb tail` show it gone, 3 times in 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reads_a_file_as_soon_as_the_message_carrying_it_arrives() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (dave, _) = tb.register("dave").await;
        let direct = alice.create_direct("bob").await.unwrap().id;
        let group = bob.create_group("g", &["dave".into()]).await.unwrap().id;
        let mut dave_events = dave.events().unwrap();
        let file = upload(&alice, "f.bin", &bytes(4096, 5)).await;
        attach(&alice, direct, file).await;
        // Bob forwards alice's file: his own copy, carried by this message only. Its
        // conversation's actor is held just after sending it, before anything else.
        let mut sent = tb.shared().pauses.arm(Point::EntrySent);
        let forward = tokio::spawn(async move { attach(&bob, group, file).await });
        let copy = loop {
            if let Body::Files { files, .. } = next_entry(&mut dave_events).await.body {
                break files[0].file;
            }
        };
        sent.reached().await;
        let answer = file_info(&dave, copy).await;
        assert!(matches!(answer, Ok(Reply::File(_))), "readable as the message arrives: {answer:?}");
        sent.release();
        within(STEP_DEADLINE, "the forward's answer", forward).await.unwrap();
    })
    .await
}

/// A `Session` asks again, after a backoff, for a `FileInfo` refused `RATE_LIMITED` (the
/// allowance of member rows refills within moments): the caller gets its answer, not the
/// refusal.
#[tokio::test]
async fn a_session_asks_again_for_a_file_check_refused_for_its_allowance() {
    use std::sync::Arc;
    use switchboard_client::{MemoryCursors, Session, SessionConfig};
    bounded(async {
        let tb = TestBroker::start_with(|c| c.member_rows_per_sec = 1000).await;
        let (alice, _) = tb.register("alice").await;
        let (_eve, eve_id) = tb.register("eve").await;
        let file = upload(&alice, "plan.pdf", &bytes(10 * 1024, 3)).await;
        let conv = alice.create_group("g", &["eve".into()]).await.unwrap().id;
        attach(&alice, conv, file).await;
        let config = SessionConfig { backoff_min_ms: 20, backoff_max_ms: 200, ..SessionConfig::default() };
        let (session, _events) =
            Session::start(tb.connector(), eve_id, Arc::new(MemoryCursors::default()), config).unwrap();
        // Two checks of a file she may not read spend her burst (2,000 rows) and more.
        for _ in 0..2 {
            let refused = session.request(RequestBody::FileInfo { file: [0x77; 16] }).await.unwrap_err();
            assert!(format!("{refused}").contains("NOT_FOUND"), "{refused}");
        }
        let answer = session.request(RequestBody::FileInfo { file }).await;
        assert!(matches!(answer, Ok(Reply::File(_))), "{answer:?}");
        session.close().await;
    })
    .await
}

#[tokio::test]
async fn progress_reaches_the_uploader_and_the_conversation_once_attached() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (phone, _) = tb.login("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let mut phone_events = phone.events().unwrap();
        let mut bob_events = bob.events().unwrap();
        let data = bytes(2 * 1024 * 1024, 6);
        // Attached while still uploading: the members hear of its progress too.
        let file = attached_while_uploading(&alice, conv, &data).await;
        finish(&alice, file, &data).await;
        let complete = FileState::Complete { thumbnail: None };
        final_state(&mut phone_events, None, file, &complete).await;
        final_state(&mut bob_events, Some(conv), file, &complete).await;
    })
    .await
}

/// Waits for a progress event of `conv`'s audience (`None`: the uploader's) at `offset`.
async fn progress_at(events: &mut switchboard_client::Events, conv: Option<u64>, offset: u64) {
    file_event(events, "a progress event", |p| p.conv == conv && p.state == (FileState::Uploading { offset })).await;
}

/// An upload's progress to the conversations carrying it is charged to the uploader's
/// member rows (a row per carrier and per member read), and while they are spent it
/// reaches the uploader's devices only; the final state reaches the members all the
/// same. Before, it was free: a few uploads attached in a thousand conversations each
/// had every value read a thousand carriers and their members on the one thread that
/// tells every user's file events (an attacker review).
#[tokio::test]
async fn progress_to_conversations_is_charged_to_the_uploaders_member_rows() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.member_rows_per_sec = 50).await;
        let (alice, _) = tb.register("alice").await;
        let (phone, _) = tb.login("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let (mut phone_events, mut bob_events) = (phone.events().unwrap(), bob.events().unwrap());
        let data = bytes(2 * 1024 * 1024, 6);
        let file = attached_while_uploading(&alice, conv, &data).await;
        // A chunk after the attachment: its progress reaches the member.
        upload_range(alice.connection(), file, &data, 256 * 1024, 512 * 1024, 256 * 1024).await;
        progress_at(&mut bob_events, Some(conv), 512 * 1024).await;
        // Asking about a file nobody has costs what a check reads at most (1,024 rows):
        // her allowance (a burst of 100, 50 a second) is spent for about 20 s.
        assert_eq!(code_of(file_info(&alice, [0x77; 16]).await), ErrorCode::NOT_FOUND);
        upload_range(alice.connection(), file, &data, 512 * 1024, 768 * 1024, 256 * 1024).await;
        progress_at(&mut phone_events, None, 768 * 1024).await;
        no_file_event(&mut bob_events, "progress reached the member with the uploader's rows spent").await;
        finish(&alice, file, &data).await;
        final_state(&mut bob_events, Some(conv), file, &FileState::Complete { thumbnail: None }).await;
    })
    .await
}

/// A `Session` says where an upload it last saw in progress stands after a reconnect,
/// in the audience it saw it in: file events are not replayed, and before, one that
/// completed while the device was disconnected (a broker restarted mid-upload, found by
/// a keep-alive seconds later) stayed in progress for the application for good. Both
/// audiences: the uploader's other device and a member where the file was attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_tells_where_an_upload_that_moved_while_it_was_away_stands() {
    use std::sync::Arc;
    use switchboard_client::{MemoryCursors, Session, SessionConfig, SessionEvent};
    use switchboard_tests::wait_for;
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (_phone, phone_id) = tb.login("alice").await;
        let (_bob, bob_id) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        // A dropped session reconnects 1.5 to 3 s later: the upload completes meanwhile.
        let config = SessionConfig { backoff_min_ms: 3000, backoff_max_ms: 3000, ..SessionConfig::default() };
        let start = |id| Session::start(tb.connector(), id, Arc::new(MemoryCursors::default()), config.clone());
        let (phone, mut phone_events) = start(phone_id.clone()).unwrap();
        let (bob, mut bob_events) = start(bob_id.clone()).unwrap();
        wait_for(&mut phone_events, "the phone caught up", |e| matches!(e, SessionEvent::CaughtUp)).await;
        wait_for(&mut bob_events, "bob caught up", |e| matches!(e, SessionEvent::CaughtUp)).await;
        let data = bytes(2 * 1024 * 1024, 9);
        let file = attached_while_uploading(&alice, conv, &data).await;
        // A chunk after the attachment: its progress reaches the members too.
        upload_range(alice.connection(), file, &data, 256 * 1024, 512 * 1024, 256 * 1024).await;
        let progress = |conv: Option<u64>| {
            move |e: &SessionEvent| {
                matches!(e, SessionEvent::File(p) if p.file == file && p.conv == conv
                    && matches!(p.state, FileState::Uploading { .. }))
            }
        };
        wait_for(&mut phone_events, "the phone's progress", progress(None)).await;
        wait_for(&mut bob_events, "bob's progress", progress(Some(conv))).await;
        // Both drop (with a code that is no restart: the usual backoff), and the upload
        // completes before either is back.
        let online = tb.shared().online.clone();
        for (user, device) in [(phone_id.user_id, phone_id.device_id), (bob_id.user_id, bob_id.device_id)] {
            for s in online.sessions(user).into_iter().flat_map(|l| l.to_vec()).filter(|s| s.device == device) {
                s.out.close(ErrorCode::INTERNAL);
            }
        }
        wait_for(&mut phone_events, "the phone's drop", |e| matches!(e, SessionEvent::Disconnected { .. })).await;
        wait_for(&mut bob_events, "bob's drop", |e| matches!(e, SessionEvent::Disconnected { .. })).await;
        finish(&alice, file, &data).await;
        // Neither is back yet, so neither was told live (else this tests nothing).
        for who in [&phone_id, &bob_id] {
            let back =
                online.sessions(who.user_id).into_iter().flat_map(|l| l.to_vec()).any(|s| s.device == who.device_id);
            assert!(!back, "{} reconnected before the upload completed", who.user);
        }
        let complete = |conv: Option<u64>| {
            move |e: &SessionEvent| {
                matches!(e, SessionEvent::File(p) if p.file == file && p.conv == conv
                    && p.state == FileState::Complete { thumbnail: None })
            }
        };
        for (events, conv) in [(&mut phone_events, None), (&mut bob_events, Some(conv))] {
            wait_for(events, "the reconnect", |e| matches!(e, SessionEvent::Connected)).await;
            wait_for(events, "the upload's state after it", complete(conv)).await;
        }
        phone.close().await;
        bob.close().await;
    })
    .await
}

/// The offset a `FileInfo` answer shows for an upload still running.
fn offset_seen(reply: Reply) -> u64 {
    match reply {
        Reply::File(info) => match info.state {
            FileState::Uploading { offset } => offset,
            other => panic!("expected Uploading, got {other:?}"),
        },
        other => panic!("expected File, got {other:?}"),
    }
}

/// Asserts that no file event arrives within 500 ms (`what`: the failure's message).
async fn no_file_event(events: &mut switchboard_client::Events, what: &str) {
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(event) = events.next().await {
            if let switchboard_protocol::Event::File(p) = event {
                panic!("{what}: {p:?}");
            }
        }
    });
    assert!(quiet.await.is_err(), "the event stream ended");
}

/// Sam and vic, and 2 MiB sam uploads, attached in their direct conversation with its
/// first 256 KiB sent: the clients, the data and the file.
async fn upload_attached_between_sam_and_vic(tb: &TestBroker) -> (Client, Client, Vec<u8>, FileId) {
    let (sam, _) = tb.register("sam").await;
    let (vic, _) = tb.register("vic").await;
    let conv = sam.create_direct("vic").await.unwrap().id;
    let data = bytes(2 * 1024 * 1024, 6);
    let file = attached_while_uploading(&sam, conv, &data).await;
    (sam, vic, data, file)
}

/// In a direct conversation, a block ends the other's file events too: an upload
/// attached while running tells the blocker nothing more (its progress would tell when
/// its uploader is online, as receipts would). Before, the blocked uploader's progress,
/// completion and thumbnail kept reaching the blocker.
#[tokio::test]
async fn a_block_silences_file_events_in_a_direct_conversation() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (sam, vic, data, file) = upload_attached_between_sam_and_vic(&tb).await;
        let mut vic_events = vic.events().unwrap();
        vic.block("sam", true).await.unwrap();
        // What came before the block's answer came before the block (the attachment's
        // first "uploading" may: CI at f47e8fa saw it, and took it for one after).
        while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, vic_events.next()).await {}
        finish(&sam, file, &data).await;
        no_file_event(&mut vic_events, "the blocker was told of the blocked user's file").await;
    })
    .await
}

/// Nor does `FileInfo` tell it: to the blocker (and to the blocked, of the blocker's
/// uploads) an upload carried only in their direct conversation stays at offset 0 while
/// it runs, and shows its progress again in a group both are in. Before, polling
/// `FileInfo` showed the offset rise whenever the uploader was online (an attacker
/// review).
#[tokio::test]
async fn a_block_hides_upload_progress_from_file_info_in_a_direct_conversation() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (sam, vic, _, file) = upload_attached_between_sam_and_vic(&tb).await;
        assert_eq!(offset_seen(file_info(&vic, file).await.unwrap()), 256 * 1024, "shown before the block");
        vic.block("sam", true).await.unwrap();
        assert_eq!(offset_seen(file_info(&vic, file).await.unwrap()), 0, "the blocker sees no progress");
        assert_eq!(offset_seen(file_info(&sam, file).await.unwrap()), 256 * 1024, "the uploader sees its own");
        // Carried in a group both are in too: shown, as to everyone there.
        // (The block keeps sam from adding vic: vic makes the group.)
        let group = vic.create_group("both", &["sam".into()]).await.unwrap().id;
        attach(&sam, group, file).await;
        assert_eq!(offset_seen(file_info(&vic, file).await.unwrap()), 256 * 1024, "shown through the group");
    })
    .await
}

/// In a group, the uploads of a member who blocks another tell the blocked one nothing,
/// as its receipts do not: no file event (progress or completion) and no progress in
/// `FileInfo`, while the group's other members see both. Before, the blocker's upload
/// progress reached the member it blocks, telling when the blocker was online.
#[tokio::test]
async fn a_blockers_uploads_in_a_group_tell_the_blocked_member_nothing() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (vic, _) = tb.register("vic").await;
        let (sam, _) = tb.register("sam").await;
        let (walt, _) = tb.register("walt").await;
        let group = vic.create_group("g", &["sam".into(), "walt".into()]).await.unwrap().id;
        vic.block("sam", true).await.unwrap();
        let (mut sam_events, mut walt_events) = (sam.events().unwrap(), walt.events().unwrap());
        let data = bytes(2 * 1024 * 1024, 7);
        let file = attached_while_uploading(&vic, group, &data).await;
        assert_eq!(offset_seen(file_info(&walt, file).await.unwrap()), 256 * 1024, "the others see it");
        assert_eq!(offset_seen(file_info(&sam, file).await.unwrap()), 0, "the blocked member sees no progress");
        finish(&vic, file, &data).await;
        final_state(&mut walt_events, Some(group), file, &FileState::Complete { thumbnail: None }).await;
        no_file_event(&mut sam_events, "the blocked member was told of the blocker's file").await;
        // Complete, it reads as complete to every member (once, not at every chunk).
        assert!(matches!(file_info(&sam, file).await.unwrap(), Reply::File(info) if info.state == FileState::Complete { thumbnail: None }));
    })
    .await
}

/// Waits for the event giving `file` its final `state`, as sent to `conv`'s audience.
async fn final_state(events: &mut switchboard_client::Events, conv: Option<u64>, file: FileId, state: &FileState) {
    let p = file_event(events, "the final file event", |p| &p.state == state).await;
    assert_eq!((p.conv, p.file), (conv, file));
}

/// Waits for the next file event `matching` (others skipped), `what` naming it.
async fn file_event(
    events: &mut switchboard_client::Events,
    what: &str,
    matching: impl Fn(&switchboard_protocol::FileProgress) -> bool,
) -> switchboard_protocol::FileProgress {
    within(STEP_DEADLINE, what, async {
        loop {
            match events.next().await {
                Some(switchboard_protocol::Event::File(p)) if matching(&p) => return p,
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn fifty_concurrent_uploads_from_ten_clients_all_complete() {
    bounded(async {
        let tb = TestBroker::start().await;
        let mut clients = Vec::new();
        for i in 0..10 {
            clients.push(tb.register(&format!("u{i}")).await.0);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, client) in clients.into_iter().enumerate() {
            let client = std::sync::Arc::new(client);
            for j in 0..5 {
                let client = client.clone();
                tasks.spawn(async move {
                    let data = bytes(1024 * 1024, (i * 5 + j) as u8);
                    let file = upload(&client, "m.bin", &data).await;
                    let (_, got) = download(client.connection(), file, 0, 0).await.unwrap();
                    assert_eq!(blake3::hash(&got), blake3::hash(&data));
                });
            }
        }
        let mut done = 0;
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
            done += 1;
        }
        assert_eq!(done, 50);
    })
    .await
}

#[tokio::test]
async fn abandoned_uploads_expire_with_their_data_and_quota() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.upload_expiry_secs = 1;
            c.quota_bytes = 1024 * 1024;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (phone, _) = tb.login("alice").await;
        let mut events = phone.events().unwrap();
        let data = bytes(1024 * 1024, 8);
        let begun = begin_upload(&alice, "a.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), begun.file, &data, 0, 256 * 1024, 256 * 1024).await;
        let partial = tb.data_dir().join("uploads");
        assert_eq!(files_in(partial.clone()), 1);
        within(STEP_DEADLINE, "the upload expiring", async {
            while status(&alice, begun.file).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert_eq!(code_of(status(&alice, begun.file).await), ErrorCode::NOT_FOUND);
        // The record goes first (durably), then the partial file: gone right after.
        within(STEP_DEADLINE, "its partial data going", async {
            while files_in(partial.clone()) != 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        // The uploader's devices hear that it is gone.
        within(STEP_DEADLINE, "the expiry event", async {
            loop {
                match events.next().await {
                    Some(switchboard_protocol::Event::File(p))
                        if p.state == (FileState::Failed { code: ErrorCode::NOT_FOUND }) =>
                    {
                        assert_eq!((p.file, p.conv), (begun.file, None));
                        return;
                    }
                    Some(_) => {}
                    None => panic!("events ended"),
                }
            }
        })
        .await;
        // Its quota is back once its bytes are freed: a file of the whole quota fits.
        within(STEP_DEADLINE, "its bytes freed", async {
            while alice.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        begin_upload(&alice, "b.bin", "application/octet-stream", &data).await;
    })
    .await
}

#[tokio::test]
async fn tiny_files_are_each_charged_a_block_of_the_quota() {
    bounded(async {
        // Room for four blocks of 4 KiB: four files of one byte fill it, as they fill
        // four blocks of the disk (each its own blob file), not four bytes.
        let tb = TestBroker::start_with(|c| c.quota_bytes = 4 * 4096).await;
        let (alice, _) = tb.register("alice").await;
        for seed in 0..4 {
            upload(&alice, "one.bin", &bytes(1, seed)).await;
        }
        let usage = alice.usage().await.unwrap();
        assert_eq!((usage.stored_bytes, usage.quota_bytes), (4 * 4096, 4 * 4096));
        let fifth = new_upload("fifth.bin", "application/octet-stream", &bytes(1, 9));
        let refused = alice.request(RequestBody::BeginUpload(fifth)).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::QUOTA_EXCEEDED));
        assert!(refused.to_string().contains("4 KiB blocks"), "says how it counts: {refused}");
        // A file of 4097 bytes takes two.
        let tb = TestBroker::start_with(|c| c.quota_bytes = 2 * 4096).await;
        let (bob, _) = tb.register("bob").await;
        upload(&bob, "two.bin", &bytes(4097, 1)).await;
        assert_eq!(bob.usage().await.unwrap().stored_bytes, 2 * 4096);
    })
    .await
}

#[tokio::test]
async fn a_cancelled_uploads_bytes_count_against_its_uploader_until_the_disk_has_them_back() {
    bounded(async {
        // The broker frees deleted bytes at a bounded rate (to spare the disk's fsyncs),
        // here 4 MiB a second: a user who cancels big uploads faster than that must not
        // fill the disk for everyone.
        let tb = TestBroker::start_with(|c| {
            c.quota_bytes = 32 * 1024 * 1024;
            c.delete_bytes_per_sec = 4 * 1024 * 1024;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let data = bytes(24 * 1024 * 1024, 3);
        let begun = begin_upload(&alice, "big.bin", "application/octet-stream", &data).await;
        let replies = upload_range(alice.connection(), begun.file, &data, 0, data.len() as u64 - 1, 1024 * 1024).await;
        assert!(matches!(replies.last(), Some(TransferReply::Durable { .. })), "{replies:?}");
        alice.cancel_upload(begun.file).await.unwrap();
        // Its first 4 MiB are freed at once, the rest 4 MiB a second: over 4 MiB are
        // still hers for the next 4 seconds, so 28 MiB more do not fit in her 32 (a slow
        // machine has seconds for the two requests below).
        let used = alice.usage().await.unwrap().stored_bytes;
        assert!(used > 4 * 1024 * 1024, "the unfreed bytes count: {used}");
        let next = bytes(28 * 1024 * 1024, 4);
        let refused = alice
            .request(RequestBody::BeginUpload(new_upload("next.bin", "application/octet-stream", &next)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::QUOTA_EXCEEDED), "{refused}");
        // Nobody else's.
        assert_eq!(bob.usage().await.unwrap().stored_bytes, 0);
        begin_upload(&bob, "next.bin", "application/octet-stream", &next).await;
        // Freed as it goes, then all: hers again.
        within(STEP_DEADLINE, "the cancelled bytes freed", async {
            while alice.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        begin_upload(&alice, "next.bin", "application/octet-stream", &next).await;
    })
    .await
}

#[tokio::test]
async fn the_same_bytes_are_stored_once_and_outlive_one_of_their_files() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let data = bytes(300 * 1024, 9);
        let a = upload(&alice, "a.bin", &data).await;
        let b = upload(&bob, "b.bin", &data).await;
        let blobs = tb.data_dir().join("blobs");
        assert_eq!(files_in(blobs.clone()), 1, "one stored copy");
        let mut alice_events = alice.events().unwrap();
        assert_eq!(alice.request(RequestBody::DeleteFile { file: a }).await.unwrap(), Reply::Done);
        assert_eq!(code_of(file_info(&alice, a).await), ErrorCode::NOT_FOUND, "held by nothing: deleted");
        // Her devices are told it is gone (before, nobody was).
        final_state(&mut alice_events, None, a, &FileState::Failed { code: ErrorCode::NOT_FOUND }).await;
        let (_, got) = download(bob.connection(), b, 0, 0).await.unwrap();
        assert_eq!(got, data, "the other file still reads");
        assert_eq!(files_in(blobs.clone()), 1);
        bob.request(RequestBody::DeleteFile { file: b }).await.unwrap();
        assert_eq!(files_in(blobs), 0, "the last reference took the bytes");
    })
    .await
}

/// A `width` x `height` PNG gradient.
fn png(width: u32, height: u32) -> Vec<u8> {
    let picture = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(picture).write_to(std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

#[tokio::test]
async fn a_file_the_sweeper_deletes_is_told_gone_to_its_uploaders_devices() {
    bounded(async {
        // The sweeper runs every 3 s (a quarter of the upload expiry).
        let mut tb = TestBroker::start_with(|c| c.upload_expiry_secs = 12).await;
        let (alice, alice_id) = tb.register("alice").await;
        let data = bytes(64 * 1024, 31);
        let file = upload(&alice, "a.bin", &data).await;
        drop(alice);
        tb.stop().await;
        // What a crash leaves between a durable `DeleteFile` and the deletion of the
        // file it let go of: only the sweeper deletes it now.
        let store =
            switchboard_storage::Store::open(&switchboard_storage::StoreConfig::new(tb.data_dir().join("store")))
                .unwrap();
        store.drop_hold(&file).unwrap().unwrap().await.unwrap();
        store.close().unwrap();
        drop(store);
        tb.restart().await;
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        let mut events = alice.events().unwrap();
        assert!(matches!(file_info(&alice, file).await.unwrap(), Reply::File(_)), "still there");
        // Her devices are told it is gone when the sweeper deletes it (before, nobody
        // was: a list of her uploads kept showing it).
        final_state(&mut events, None, file, &FileState::Failed { code: ErrorCode::NOT_FOUND }).await;
        assert_eq!(code_of(file_info(&alice, file).await), ErrorCode::NOT_FOUND);
        within(STEP_DEADLINE, "its quota back", async {
            while alice.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    })
    .await
}

/// A small real PNG whose header declares `width` x `height` (IHDR with a valid CRC).
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut png = png(1, 1);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = !0u32;
    for byte in &png[12..29] {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    png[29..33].copy_from_slice(&(!crc).to_be_bytes());
    png
}

#[tokio::test]
async fn an_image_gets_a_thumbnail_readable_like_its_file_and_a_bomb_gets_none() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (eve, _) = tb.register("eve").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let mut events = alice.events().unwrap();
        let picture = png(600, 300);
        let begun = begin_upload(&alice, "cat.png", "image/png", &picture).await;
        assert!(matches!(upload_rest(alice.connection(), begun.file, &picture, 0).await, TransferReply::Complete(_)));
        let thumb = within(STEP_DEADLINE, "the thumbnail event", async {
            loop {
                if let Some(switchboard_protocol::Event::File(p)) = events.next().await
                    && let FileState::Complete { thumbnail: Some(t) } = p.state
                {
                    assert_eq!((p.file, p.conv), (begun.file, None));
                    return t;
                }
            }
        })
        .await;
        assert_eq!(thumb.content_type, "image/png");
        match file_info(&alice, begun.file).await.unwrap() {
            Reply::File(info) => assert_eq!(info.state, FileState::Complete { thumbnail: Some(thumb.clone()) }),
            other => panic!("{other:?}"),
        }
        let (_, thumb_png) = download(alice.connection(), thumb.file, 0, 0).await.unwrap();
        let decoded = image::load_from_memory(&thumb_png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (256, 128));
        // A thumbnail is readable by whoever may read its file, and nobody else.
        let attach = RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: String::new(),
            files: vec![begun.file],
        };
        alice.request(attach).await.unwrap();
        assert!(matches!(file_info(&bob, thumb.file).await.unwrap(), Reply::File(_)));
        assert_eq!(code_of(file_info(&eve, thumb.file).await), ErrorCode::NOT_FOUND);
        // A thumbnail is not sent on its own (a message deleted later would have taken it
        // from its file); bob forwarding the image gets a copy that shows it too.
        let alone = bob.send_files(conv, "", &[thumb.file]).await.unwrap_err();
        assert_eq!(alone.code(), Some(ErrorCode::INVALID));
        let dm = bob.create_direct("alice").await.unwrap().id;
        bob.send_files(dm, "", &[begun.file]).await.unwrap();
        let (entries, _) = bob.history(dm, Page::Latest, 10).await.unwrap();
        let copy = entries
            .iter()
            .find_map(|e| match &e.body {
                Body::Files { files, .. } => Some(files[0].file),
                _ => None,
            })
            .unwrap();
        let Reply::File(info) = file_info(&bob, copy).await.unwrap() else { panic!() };
        let FileState::Complete { thumbnail: Some(copied) } = info.state else { panic!("{:?}", info.state) };
        assert_ne!(copied.file, thumb.file);
        assert_eq!(download(bob.connection(), copied.file, 0, 0).await.unwrap().1, thumb_png);
        // Forwarded as soon as it is complete (its thumbnail may not exist yet): the copy
        // gets one all the same.
        let tall = png(300, 600);
        let fresh = begin_upload(&alice, "tall.png", "image/png", &tall).await;
        assert!(matches!(upload_rest(alice.connection(), fresh.file, &tall, 0).await, TransferReply::Complete(_)));
        alice.send_files(conv, "", &[fresh.file]).await.unwrap();
        bob.send_files(dm, "", &[fresh.file]).await.unwrap();
        let (entries, _) = bob.history(dm, Page::Latest, 10).await.unwrap();
        let Some(Body::Files { files, .. }) = entries.last().map(|e| e.body.clone()) else { panic!("{entries:?}") };
        let tall_copy = files[0].file;
        within(STEP_DEADLINE, "the copy's thumbnail", async {
            loop {
                if let Reply::File(info) = file_info(&bob, tall_copy).await.unwrap()
                    && let FileState::Complete { thumbnail: Some(t) } = info.state
                {
                    let (_, png) = download(bob.connection(), t.file, 0, 0).await.unwrap();
                    let decoded = image::load_from_memory(&png).unwrap();
                    assert_eq!((decoded.width(), decoded.height()), (128, 256));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;

        // A decompression bomb completes as a file, gets no thumbnail, and the broker
        // keeps serving.
        let bomb = png_declaring(100_000, 100_000);
        let begun = begin_upload(&alice, "bomb.png", "image/png", &bomb).await;
        assert!(matches!(upload_rest(alice.connection(), begun.file, &bomb, 0).await, TransferReply::Complete(_)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        match file_info(&alice, begun.file).await.unwrap() {
            Reply::File(info) => assert_eq!(info.state, FileState::Complete { thumbnail: None }),
            other => panic!("{other:?}"),
        }
        alice.ping().await.unwrap();
        let again = upload(&alice, "after.bin", &bytes(1000, 1)).await;
        assert!(matches!(file_info(&alice, again).await.unwrap(), Reply::File(_)));
    })
    .await
}

/// A `width` x `height` JPEG of noise at quality 10: its PNG re-encoding is ten times
/// its size or more.
fn noise_jpeg(width: u32, height: u32) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let picture = image::RgbImage::from_fn(width, height, |_, _| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        image::Rgb([x as u8, (x >> 8) as u8, (x >> 16) as u8])
    });
    let mut out = Vec::new();
    picture.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 10)).unwrap();
    out
}

/// Waits until the outcome of the image with these bytes is remembered (decoded).
async fn decoded(tb: &TestBroker, image: &[u8]) {
    let hash = *blake3::hash(image).as_bytes();
    within(STEP_DEADLINE, "the image's decode", async {
        while !tb.shared().files.thumbnails.remembers(&hash) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Thumbnails are not charged to the quota, so each costs the disk at most four times
/// what its image was charged: an image whose thumbnail would be larger gets none
/// (before, a 200 px noise JPEG of ~10 KB stored a ~120 KB PNG beside it, and a quota
/// filled with small images held many times its size on the disk: an attacker review).
/// And no thumbnail is written into the disk reserve (before, it was, unchecked).
#[tokio::test]
async fn thumbnails_are_never_larger_than_their_image_nor_written_into_the_disk_reserve() {
    bounded(async {
        let reserve = 64 * 1024 * 1024;
        let tb = TestBroker::start_with(|c| c.disk_reserve_bytes = reserve).await;
        let (alice, _) = tb.register("alice").await;
        let state = async |file| match file_info(&alice, file).await.unwrap() {
            Reply::File(info) => info.state,
            other => panic!("{other:?}"),
        };
        let noise = noise_jpeg(200, 200);
        let begun = begin_upload(&alice, "noise.jpg", "image/jpeg", &noise).await;
        assert!(matches!(upload_rest(alice.connection(), begun.file, &noise, 0).await, TransferReply::Complete(_)));
        decoded(&tb, &noise).await;
        let hash = *blake3::hash(&noise).as_bytes();
        assert_eq!(tb.shared().files.thumbnails.made(&hash), Some(false), "{} bytes", noise.len());
        assert_eq!(state(begun.file).await, FileState::Complete { thumbnail: None });

        // The disk down to its reserve once the upload has its room: the upload completes,
        // its thumbnail is not written.
        let picture = png(600, 300);
        let begun = begin_upload(&alice, "cat.png", "image/png", &picture).await;
        tb.shared().files.pretend_free_bytes(Some(reserve));
        assert!(matches!(upload_rest(alice.connection(), begun.file, &picture, 0).await, TransferReply::Complete(_)));
        decoded(&tb, &picture).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(state(begun.file).await, FileState::Complete { thumbnail: None });
        // With room again the same bytes get one.
        tb.shared().files.pretend_free_bytes(None);
        let mut events = alice.events().unwrap();
        let again = begin_upload(&alice, "cat-again.png", "image/png", &picture).await;
        assert!(matches!(upload_rest(alice.connection(), again.file, &picture, 0).await, TransferReply::Complete(_)));
        thumbnail_event(&mut events, again.file).await;
    })
    .await
}

/// Waits for the `Event::File` that gives `file` a thumbnail.
async fn thumbnail_event(events: &mut switchboard_client::Events, file: FileId) -> switchboard_protocol::FileRef {
    within(STEP_DEADLINE, "the thumbnail event", async {
        loop {
            if let Some(switchboard_protocol::Event::File(p)) = events.next().await
                && p.file == file
                && let FileState::Complete { thumbnail: Some(t) } = p.state
            {
                return t;
            }
        }
    })
    .await
}

#[tokio::test]
async fn the_same_image_uploaded_again_is_not_decoded_again() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (mallory, _) = tb.register("mallory").await;
        let thumbnails = &tb.shared().files.thumbnails;
        let picture = png(600, 300);
        let mut events = alice.events().unwrap();
        let first = begin_upload(&alice, "cat.png", "image/png", &picture).await;
        assert!(matches!(upload_rest(alice.connection(), first.file, &picture, 0).await, TransferReply::Complete(_)));
        let first_thumb = thumbnail_event(&mut events, first.file).await;

        // Anyone may upload bytes that exist already (files are content-addressed): each
        // upload of them gets a thumbnail of its own, from the one decode.
        let mut theirs = mallory.events().unwrap();
        for round in 0..3 {
            let again = begin_upload(&mallory, &format!("copy{round}.png"), "image/png", &picture).await;
            assert!(matches!(
                upload_rest(mallory.connection(), again.file, &picture, 0).await,
                TransferReply::Complete(_)
            ));
            let thumb = thumbnail_event(&mut theirs, again.file).await;
            assert_ne!(thumb.file, first_thumb.file, "a thumbnail record per file");
            let (_, bytes) = download(mallory.connection(), thumb.file, 0, 0).await.unwrap();
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (256, 128));
        }
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!((thumbnails.decoded.load(Relaxed), thumbnails.reused.load(Relaxed)), (1, 3));

        // A bomb is tried once too: the same bytes again cost no second decode.
        let bomb = png_declaring(100_000, 100_000);
        let hash = *blake3::hash(&bomb).as_bytes();
        for name in ["bomb.png", "bomb-again.png"] {
            let begun = begin_upload(&mallory, name, "image/png", &bomb).await;
            assert!(matches!(
                upload_rest(mallory.connection(), begun.file, &bomb, 0).await,
                TransferReply::Complete(_)
            ));
            within(STEP_DEADLINE, "the bomb's outcome", async {
                while !thumbnails.remembers(&hash) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(thumbnails.decoded.load(Relaxed), 2, "the bomb once");
        alice.ping().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_bad_transfer_stream_ends_alone_and_the_connection_serves_on() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(1000, 2);
        let begun = begin_upload(&alice, "x.bin", "application/octet-stream", &data).await;
        let conn = alice.connection();
        // Garbage as the first frame: the stream is reset with BAD_FRAME.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[3, 0xff, 0xff, 0xff]).await.unwrap();
        let end = within(STEP_DEADLINE, "the reset", recv.read_to_end(1024)).await;
        assert!(
            matches!(&end, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) if *code == ErrorCode::BAD_FRAME.0.into()),
            "{end:?}"
        );
        // A huge length prefix after the open: FRAME_TOO_LARGE.
        let mut t = Transfer::open(conn, &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        assert!(matches!(t.reply().await, Some(TransferReply::Accepted { .. })));
        t.send.write_all(&[0xff, 0xff, 0xff, 0x7f]).await.unwrap();
        let end = within(STEP_DEADLINE, "the reset", t.recv.read_to_end(1024)).await;
        assert!(
            matches!(&end, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) if *code == ErrorCode::FRAME_TOO_LARGE.0.into()),
            "{end:?}"
        );
        // The connection and the upload are fine.
        alice.ping().await.unwrap();
        assert!(matches!(upload_rest(conn, begun.file, &data, 0).await, TransferReply::Complete(_)));
        // A resend of a files message answers its original seq.
        let conv = alice.create_group("g", &[]).await.unwrap().id;
        let client_id = switchboard_client::new_client_id();
        let send = RequestBody::SendFiles { conv, client_id, text: "x".into(), files: vec![begun.file] };
        let first = alice.request(send.clone()).await.unwrap();
        let Reply::Appended { seq, duplicate: false } = first else { panic!("{first:?}") };
        assert_eq!(alice.request(send).await.unwrap(), Reply::Appended { seq, duplicate: true });
        // The same file twice, or no file: INVALID.
        for files in [vec![begun.file, begun.file], vec![]] {
            let r = RequestBody::SendFiles { conv, client_id: switchboard_client::new_client_id(), text: String::new(), files };
            assert_eq!(code_of(alice.request(r).await), ErrorCode::INVALID);
        }
    })
    .await
}

#[tokio::test]
async fn an_upload_without_its_first_chunk_cannot_be_sent_and_an_incomplete_one_not_read() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let conv = alice.create_group("g", &[]).await.unwrap().id;
        let data = bytes(600 * 1024, 3);
        let begun = begin_upload(&alice, "n.bin", "application/octet-stream", &data).await;
        let send = |file| RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: String::new(),
            files: vec![file],
        };
        assert_eq!(code_of(alice.request(send(begun.file)).await), ErrorCode::NOT_READY);
        assert_eq!(download(alice.connection(), begun.file, 0, 0).await.unwrap_err().code, ErrorCode::NOT_READY);
        // Once its first chunk is stored it may be attached, still uploading.
        upload_range(alice.connection(), begun.file, &data, 0, 256 * 1024, 256 * 1024).await;
        assert!(matches!(alice.request(send(begun.file)).await.unwrap(), Reply::Appended { .. }));
        assert_eq!(download(alice.connection(), begun.file, 0, 0).await.unwrap_err().code, ErrorCode::NOT_READY);
        match file_info(&alice, begun.file).await.unwrap() {
            Reply::File(info) => assert_eq!(info.state, FileState::Uploading { offset: 256 * 1024 }),
            other => panic!("{other:?}"),
        }
        // Deleting it is for complete files: an upload still running is cancelled instead.
        let delete = RequestBody::DeleteFile { file: begun.file };
        assert_eq!(code_of(alice.request(delete).await), ErrorCode::NOT_READY);
        let withdraw = RequestBody::WithdrawFile { file: begun.file };
        assert_eq!(code_of(alice.request(withdraw).await), ErrorCode::NOT_READY);
        assert_eq!(offset_of(status(&alice, begun.file).await.unwrap()), 256 * 1024, "and it goes on");
    })
    .await
}

/// An upload's offset is written to the store before its group commit, so a status read
/// then could tell a client an offset that a crash takes back. `UploadStatus`,
/// `ListUploads` and `FileInfo` answer only once it is durable: while commits are held,
/// a chunk's new offset (applied, not yet durable) is not told, and it is once they go
/// on. Before, `UploadStatus` answered 512 KiB with the commit still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_offset_is_told_only_once_durable() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(600 * 1024, 4);
        let begun = begin_upload(&alice, "n.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), begun.file, &data, 0, 256 * 1024, 256 * 1024).await;
        let store = tb.shared().store.clone();
        let held = tb.hold_commits();
        let conn = alice.connection().clone();
        let (file, more) = (begun.file, data.clone());
        let second =
            tokio::spawn(async move { upload_range(&conn, file, &more, 256 * 1024, 512 * 1024, 256 * 1024).await });
        within(STEP_DEADLINE, "the chunk's offset applied", async {
            while store.file(&begun.file).unwrap().unwrap().offset() != 512 * 1024 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let early = tokio::time::timeout(Duration::from_millis(300), status(&alice, begun.file)).await;
        assert!(early.is_err(), "told before durable: {early:?}");
        let listed = tokio::time::timeout(Duration::from_millis(100), alice.list_uploads()).await;
        assert!(listed.is_err(), "listed before durable: {listed:?}");
        // Commits go on: told now, and durable.
        held.release();
        assert_eq!(offset_of(status(&alice, begun.file).await.unwrap()), 512 * 1024);
        second.await.unwrap();
        match file_info(&alice, begun.file).await.unwrap() {
            Reply::File(info) => assert_eq!(info.state, FileState::Uploading { offset: 512 * 1024 }),
            other => panic!("{other:?}"),
        }
    })
    .await
}

#[tokio::test]
async fn a_member_who_left_withdraws_its_file_from_the_group_and_gets_its_quota_back() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.quota_bytes = 400 * 1024).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, _) = tb.register("carol").await;
        let group = bob.create_group("g", &["alice".into(), "carol".into()]).await.unwrap().id;
        let data = bytes(300 * 1024, 12);
        let file = upload(&alice, "mine.bin", &data).await;
        alice.send_files(group, "one", &[file]).await.unwrap();
        alice.send_files(group, "again", &[file]).await.unwrap();
        // carol forwards it: her own copy, in a conversation with bob.
        let direct = carol.create_direct("bob").await.unwrap().id;
        carol.send_files(direct, "fwd", &[file]).await.unwrap();
        let copy = files_messages(&bob, direct).await[0].1[0];
        assert_ne!(copy, file);
        // alice leaves: she can no longer delete her messages, and letting go of the file
        // leaves it carried by them, on her quota.
        alice.leave(group).await.unwrap();
        alice.delete_file(file).await.unwrap();
        assert!(matches!(file_info(&bob, file).await.unwrap(), Reply::File(_)));
        assert!(alice.usage().await.unwrap().stored_bytes >= data.len() as u64);
        // Withdrawn: nobody reads it any more, from either message.
        assert_eq!(code_of(bob.request(RequestBody::WithdrawFile { file }).await), ErrorCode::NOT_FOUND, "not bob's");
        let (mut bob_events, mut carol_events) = (bob.events().unwrap(), carol.events().unwrap());
        let mut alice_events = alice.events().unwrap();
        alice.withdraw_file(file).await.unwrap();
        // The members are told it is gone, and so are alice's devices.
        let gone = FileState::Failed { code: ErrorCode::NOT_FOUND };
        final_state(&mut bob_events, Some(group), file, &gone).await;
        final_state(&mut carol_events, Some(group), file, &gone).await;
        final_state(&mut alice_events, None, file, &gone).await;
        assert_eq!(code_of(file_info(&bob, file).await), ErrorCode::NOT_FOUND);
        assert_eq!(download(bob.connection(), file, 0, 0).await.unwrap_err().code, ErrorCode::NOT_FOUND);
        assert_eq!(code_of(alice.request(RequestBody::WithdrawFile { file }).await), ErrorCode::NOT_FOUND, "gone");
        // The messages stay, naming it.
        let carried = files_messages(&bob, group).await;
        assert_eq!(carried.iter().filter(|(_, files)| files == &vec![file]).count(), 2, "{carried:?}");
        // carol's copy is hers: still there, on her quota, and the shared bytes with it.
        let (_, got) = download(bob.connection(), copy, 0, 0).await.unwrap();
        assert!(got == data);
        assert!(carol.usage().await.unwrap().stored_bytes >= data.len() as u64);
        // alice's quota is free (at once: the bytes stay, carol's copy shares them).
        assert_eq!(alice.usage().await.unwrap().stored_bytes, 0);
        upload(&alice, "next.bin", &bytes(390 * 1024, 13)).await;
    })
    .await
}

#[tokio::test]
async fn a_dropped_file_lives_while_a_message_carries_it_and_goes_with_the_message() {
    bounded(async {
        // The sweeper runs once a minute: the file goes with the delete, not with it
        // (before, the quota came back only when the sweeper next ran).
        let tb = TestBroker::start_with(|c| {
            c.upload_expiry_secs = 24 * 3600;
            c.quota_bytes = 400 * 1024;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let data = bytes(300 * 1024, 11);
        let file = upload(&alice, "kept.bin", &data).await;
        let send = RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: String::new(),
            files: vec![file],
        };
        let Reply::Appended { seq, .. } = alice.request(send).await.unwrap() else { panic!() };
        // The uploader lets go; the message still carries it, so its bytes stay and
        // keep counting against the uploader's quota.
        alice.request(RequestBody::DeleteFile { file }).await.unwrap();
        let next = new_upload("next.bin", "application/octet-stream", &data);
        let refused = alice.request(RequestBody::BeginUpload(next.clone())).await;
        assert_eq!(code_of(refused), ErrorCode::QUOTA_EXCEEDED, "still stored: still counted");
        assert!(matches!(file_info(&bob, file).await.unwrap(), Reply::File(_)));
        let (_, got) = download(bob.connection(), file, 0, 0).await.unwrap();
        assert_eq!(got, data);
        // The message goes: nothing holds the file any more, and it is deleted; the
        // members are told.
        let mut bob_events = bob.events().unwrap();
        alice.delete(conv, seq).await.unwrap();
        final_state(&mut bob_events, Some(conv), file, &FileState::Failed { code: ErrorCode::NOT_FOUND }).await;
        within(STEP_DEADLINE, "the file being deleted", async {
            while file_info(&alice, file).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        // Its record goes first (durably), then its bytes, then they are freed: and with
        // them their quota.
        within(STEP_DEADLINE, "its bytes gone and freed", async {
            while files_in(tb.data_dir().join("blobs")) > 0 || alice.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(matches!(alice.request(RequestBody::BeginUpload(next)).await.unwrap(), Reply::Upload(_)));
    })
    .await
}

/// A message's delete marks its files for collection without looking whether they still
/// exist; a mark for a file gone already (an upload attached, then cancelled) is taken
/// away once looked at. Before, such marks stayed for good (only a collection took them
/// away, and none ran for a missing file): the store grew with each, and the sweeper
/// read every one of them on every pass before the marks of files really waiting (an
/// attacker review).
#[tokio::test]
async fn a_deleted_messages_mark_for_a_file_gone_already_does_not_stay() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let conv = alice.create_group("g", &[]).await.unwrap().id;
        let file = attached_while_uploading(&alice, conv, &bytes(600 * 1024, 21)).await;
        let seq = alice.history(conv, Page::Latest, 1).await.unwrap().0[0].seq;
        alice.request(RequestBody::CancelUpload { file }).await.unwrap();
        alice.delete(conv, seq).await.unwrap();
        let store = tb.shared().store.clone();
        within(STEP_DEADLINE, "the mark taken away", async {
            while !store.unheld_files(None, 8).unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn a_forwarded_file_is_the_forwarders_copy_and_never_keeps_the_uploaders_quota() {
    bounded(async {
        // A short expiry makes the sweeper run often (and the forward's grace short).
        let tb = TestBroker::start_with(|c| {
            c.upload_expiry_secs = 1;
            c.quota_bytes = 400 * 1024;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, _) = tb.register("carol").await;
        let ours = alice.create_group("a+b", &["bob".into()]).await.unwrap().id;
        let theirs = bob.create_group("b+c", &["carol".into()]).await.unwrap().id;
        let mut carol_events = carol.events().unwrap();
        next_entry(&mut carol_events).await;
        let data = bytes(300 * 1024, 13);
        let file = upload(&alice, "trip.mov", &data).await;
        let seq = alice.send_files(ours, "look", &[file]).await.unwrap();
        // bob forwards it where alice is not: carol gets bob's copy of it.
        bob.send_files(theirs, "from alice", &[file]).await.unwrap();
        let copy = match next_entry(&mut carol_events).await.body {
            Body::Files { files, .. } => {
                assert_eq!((files[0].name.as_str(), files[0].size), ("trip.mov", data.len() as u64));
                files[0].file
            }
            other => panic!("{other:?}"),
        };
        assert_ne!(copy, file, "a copy of bob's");
        let Reply::File(info) = file_info(&carol, copy).await.unwrap() else { panic!() };
        assert_eq!((info.uploader, info.blake3), (bob.user_id, *blake3::hash(&data).as_bytes()));
        assert_eq!(download(carol.connection(), copy, 0, 0).await.unwrap().1, data);
        assert_eq!(code_of(file_info(&carol, file).await), ErrorCode::NOT_FOUND, "alice's own stays hers");
        // bob pays for it, once however often he forwards it.
        assert_eq!(bob.usage().await.unwrap().stored_bytes, data.len() as u64);
        bob.send_files(theirs, "again", &[file]).await.unwrap();
        match next_entry(&mut carol_events).await.body {
            Body::Files { files, .. } => assert_eq!(files[0].file, copy),
            other => panic!("{other:?}"),
        }
        assert_eq!(bob.usage().await.unwrap().stored_bytes, data.len() as u64);
        // alice deletes her message and lets go: her quota is free, whatever bob keeps
        // (before copies, bob's messages kept her file, and her quota, for ever).
        alice.delete(ours, seq).await.unwrap();
        alice.delete_file(file).await.unwrap();
        within(STEP_DEADLINE, "alice's file being deleted", async {
            while alice.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(code_of(file_info(&alice, file).await), ErrorCode::NOT_FOUND);
        assert_eq!(download(carol.connection(), copy, 0, 0).await.unwrap().1, data, "the copy keeps the bytes");
        // bob's quota is his own limit: another file of alice's would pass it.
        let more = upload(&alice, "b.bin", &bytes(200 * 1024, 14)).await;
        alice.send_files(ours, "more", &[more]).await.unwrap();
        assert_eq!(files_messages(&bob, ours).await.last().unwrap().1, vec![more]);
        let over = bob.send_files(theirs, "", &[more]).await.unwrap_err();
        assert_eq!(over.code(), Some(ErrorCode::QUOTA_EXCEEDED));
        // bob deletes what he forwarded: his copy goes with the last message carrying it.
        let forwarded = files_messages(&carol, theirs).await;
        assert_eq!(forwarded.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>(), vec![vec![copy], vec![copy]]);
        for (seq, _) in forwarded {
            bob.delete(theirs, seq).await.unwrap();
        }
        within(STEP_DEADLINE, "bob's copy being deleted", async {
            while bob.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert_eq!(code_of(file_info(&carol, copy).await), ErrorCode::NOT_FOUND);
    })
    .await
}

#[tokio::test]
async fn a_refused_forward_gives_its_copy_back_at_once_and_a_deleted_one_goes_without_waiting_its_grace() {
    bounded(async {
        // A copy's grace is the upload expiry here (20 s); the sweeper runs every 5 s.
        let tb = TestBroker::start_with(|c| c.upload_expiry_secs = 20).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (carol, _) = tb.register("carol").await;
        let ours = alice.create_group("a+b", &["bob".into()]).await.unwrap().id;
        let theirs = bob.create_direct("carol").await.unwrap().id;
        let data = bytes(64 * 1024, 21);
        let file = upload(&alice, "a.bin", &data).await;
        alice.send_files(ours, "", &[file]).await.unwrap();
        // A caption that cannot fit is refused before any copy is made.
        let long = "x".repeat(switchboard_protocol::limits::MAX_TEXT_BYTES as usize + 1);
        let refused = bob.send_files(theirs, &long, &[file]).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::INVALID));
        assert_eq!(bob.usage().await.unwrap().stored_bytes, 0);
        // Refused by the conversation after the copy was made (carol blocks bob): the
        // copy goes with the answer, and bob's quota is as it was.
        carol.block("bob", true).await.unwrap();
        let refused = bob.send_files(theirs, "", &[file]).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::FORBIDDEN));
        within(Duration::from_secs(3), "the refused copy being given back", async {
            while bob.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        // Sent, then deleted at once: it goes with its message, not once its grace is
        // over.
        carol.block("bob", false).await.unwrap();
        let seq = bob.send_files(theirs, "", &[file]).await.unwrap();
        assert_eq!(bob.usage().await.unwrap().stored_bytes, data.len() as u64);
        bob.delete(theirs, seq).await.unwrap();
        within(Duration::from_secs(12), "the deleted copy going with its message", async {
            while bob.usage().await.unwrap().stored_bytes > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn a_file_deleted_while_a_message_carrying_it_is_sent_stays_with_the_message() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (other_device, _) = tb.login("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        // One device sends its file while the other deletes it, the send starting a
        // little later each round so that some rounds check the file before the
        // delete collects it and append the message after: such a message must keep
        // its file (the delete only drops the uploader's hold).
        let mut lost = Vec::new();
        for round in 0..120u8 {
            let file = upload(&alice, "f.bin", &bytes(1024, round)).await;
            let delete = other_device.delete_file(file);
            let send = async {
                tokio::time::sleep(Duration::from_micros(u64::from(round % 40) * 75)).await;
                alice.send_files(conv, "", &[file]).await
            };
            let (deleted, sent) = tokio::join!(delete, send);
            deleted.unwrap();
            if let Ok(seq) = sent
                && bob.file_info(file).await.is_err()
            {
                lost.push((round, seq));
            }
        }
        assert!(lost.is_empty(), "messages acknowledged whose file was deleted: {lost:?}");
    })
    .await
}

/// The files messages of `conv` as `who` reads them, by seq.
async fn files_messages(who: &Client, conv: u64) -> Vec<(u64, Vec<FileId>)> {
    let (entries, _) = who.history(conv, Page::Latest, 100).await.unwrap();
    let files = |e: switchboard_protocol::Entry| match e.body {
        Body::Files { files, .. } => Some((e.seq, files.iter().map(|f| f.file).collect())),
        _ => None,
    };
    entries.into_iter().filter_map(files).collect()
}

#[tokio::test]
async fn the_type_check_sees_the_first_4_kib_however_small_the_first_chunk() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let conv = alice.create_group("g", &[]).await.unwrap().id;
        let conn = alice.connection();
        let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
        elf.resize(8192, 7);
        for declared in ["text/plain", "application/pdf"] {
            let begun = begin_upload(&alice, "notes.txt", declared, &elf).await;
            let mut t = Transfer::open(conn, &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
            assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset: 0 })));
            // One byte says nothing of the type: stored, but not yet attachable.
            t.chunk(0, &elf[..1], None).await;
            assert!(matches!(t.reply().await, Some(TransferReply::Durable { offset: 1 })));
            let send = RequestBody::SendFiles {
                conv,
                client_id: switchboard_client::new_client_id(),
                text: String::new(),
                files: vec![begun.file],
            };
            assert_eq!(code_of(alice.request(send).await), ErrorCode::NOT_READY, "type not checked yet");
            // The chunk that completes the first 4 KiB is checked with the stored byte.
            t.chunk(1, &elf[1..], None).await;
            match t.reply().await {
                Some(TransferReply::Failed { error, .. }) => assert_eq!(error.code, ErrorCode::TYPE_MISMATCH),
                other => panic!("expected TYPE_MISMATCH for {declared}, got {other:?}"),
            }
            assert_eq!(code_of(status(&alice, begun.file).await), ErrorCode::NOT_FOUND, "removed");
        }
    })
    .await
}

/// The reset code that ended `recv`, reading whatever comes first.
async fn reset_code(recv: &mut quinn::RecvStream) -> ErrorCode {
    loop {
        match next_chunk(recv, 1024 * 1024).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream finished instead of being reset"),
            Err(code) => return code,
        }
    }
}

/// Reads what `recv` has next, at most `max` bytes: their count, `None` at the stream's
/// end, or the code the stream was reset with (any other failure panics).
async fn next_chunk(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<usize>, ErrorCode> {
    match within(STEP_DEADLINE, "the stream's next bytes", recv.read_chunk(max, true)).await {
        Ok(Some(chunk)) => Ok(Some(chunk.bytes.len())),
        Ok(None) => Ok(None),
        Err(quinn::ReadError::Reset(code)) => Err(ErrorCode(code.into_inner() as u16)),
        Err(e) => panic!("the stream failed instead of being reset: {e}"),
    }
}

/// Begins an upload of `data` as `client` and opens its transfer stream at offset 0
/// (answered `Accepted`).
async fn open_upload(client: &Client, name: &str, data: &[u8]) -> (FileId, Transfer) {
    let file = begin_upload(client, name, "application/octet-stream", data).await.file;
    let mut t = Transfer::open(client.connection(), &TransferOpen::Upload { file, offset: 0 }).await;
    assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset: 0 })));
    (file, t)
}

/// The `Chunk` frame of `data` at `offset`, with its checksum.
fn chunk_frame(offset: u64, data: &[u8]) -> Vec<u8> {
    let chunk = switchboard_protocol::Chunk::new(offset, data.to_vec().into());
    switchboard_protocol::encode_frame(&chunk).unwrap().to_vec()
}

/// Two downloads of `file` (at least 2 MiB) that nobody reads: 2 MiB each fills the
/// connection's 4 MiB receive window, so nothing more reaches the client until they go.
async fn fill_receive_window(conn: &quinn::Connection, file: FileId) -> Vec<Transfer> {
    let mut unread = Vec::new();
    for _ in 0..2 {
        unread.push(Transfer::open(conn, &TransferOpen::Download { file, offset: 0, length: 0 }).await);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    unread
}

/// Waits until the broker's chunk buffers held (`queued_chunk_bytes`) satisfy `holds`;
/// fails with `what` after `wait`.
async fn until_queued(tb: &TestBroker, wait: Duration, what: &str, holds: impl Fn(usize) -> bool) {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let queued = tb.shared().files.queued_chunk_bytes();
        if holds(queued) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} ({queued} bytes held)");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_member_who_leaves_during_a_download_loses_the_rest_of_it() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let data = bytes(16 * 1024 * 1024, 12);
        let file = upload(&alice, "big.bin", &data).await;
        alice.send_files(conv, "", &[file]).await.unwrap();
        // Bob reads slowly (64 KiB each 20 ms, about 3 MB/s) and leaves after 1 MiB.
        // Before, the download went on to the last byte: access was checked once, at
        // the start. (A file request first: it opens the connection to transfer streams.)
        bob.file_info(file).await.unwrap();
        let mut t = Transfer::open(bob.connection(), &TransferOpen::Download { file, offset: 0, length: 0 }).await;
        let (mut got, mut paced, mut left) = (0, 0, false);
        let ended = loop {
            match next_chunk(&mut t.recv, 64 * 1024).await {
                Ok(Some(len)) => got += len,
                Ok(None) => break None,
                Err(code) => break Some(code),
            }
            if !left && got >= 1024 * 1024 {
                bob.leave(conv).await.unwrap();
                left = true;
            }
            if got - paced >= 64 * 1024 {
                paced = got;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        assert_eq!(ended, Some(ErrorCode::NOT_FOUND), "read {got} of {} bytes", data.len());
        assert!(got < data.len());
        // Alice, a member still, reads all of it.
        let (_, all) = download(alice.connection(), file, 0, 0).await.unwrap();
        assert_eq!(all, data);
    })
    .await
}

/// A reader removed while its download waited for a blob file gets none of the file:
/// access is checked again before the first piece once a second has passed since the
/// first check. Before, that clock started when the blob file opened, so a reader removed
/// during a wait of up to 30 s (for a blob file, or to take the `Range`) still got a
/// second's worth of the file, often all of it.
#[tokio::test]
async fn a_reader_removed_while_its_download_waited_for_a_blob_file_gets_none_of_it() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.max_open_blob_files = 1).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, bob_id) = tb.register("bob").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let held = upload(&alice, "held.bin", &bytes(16 * 1024 * 1024, 13)).await;
        let data = bytes(512 * 1024, 14);
        let file = upload(&alice, "small.bin", &data).await;
        alice.send_files(conv, "", &[file]).await.unwrap();
        // Alice holds the one blob file: a download of which she reads a little only.
        let mut holding =
            Transfer::open(alice.connection(), &TransferOpen::Download { file: held, offset: 0, length: 0 }).await;
        within(STEP_DEADLINE, "the held download's first bytes", holding.recv.read_chunk(1024, true)).await.unwrap();
        bob.file_info(file).await.unwrap();
        let mut t = Transfer::open(bob.connection(), &TransferOpen::Download { file, offset: 0, length: 0 }).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        alice.remove_member(conv, bob_id.user_id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        drop(holding);
        let mut got = 0;
        let ended = loop {
            match next_chunk(&mut t.recv, 64 * 1024).await {
                Ok(Some(len)) => got += len,
                Ok(None) => break None,
                Err(code) => break Some(code),
            }
        };
        assert_eq!(ended, Some(ErrorCode::NOT_FOUND));
        // The `Range` answer alone (a few bytes), none of the file's.
        assert!(got < 64, "{got} bytes after the removal");
    })
    .await
}

#[tokio::test]
async fn stalled_transfer_streams_are_reset_and_the_broker_serves_a_bounded_number() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.transfer_progress_secs = 1;
            c.max_live_transfer_streams = 1;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let conn = alice.connection();
        let data = bytes(4 * 1024 * 1024, 5);
        let file = upload(&alice, "big.bin", &data).await;
        // A download whose client grants no flow-control credit: reset, the blob let go.
        let mut stalled = Transfer::open(conn, &TransferOpen::Download { file, offset: 0, length: 0 }).await;
        // Meanwhile the broker serves no other stream.
        let mut refused = Transfer::open(conn, &TransferOpen::Download { file, offset: 0, length: 0 }).await;
        assert_eq!(reset_code(&mut refused.recv).await, ErrorCode::OVERLOADED);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(reset_code(&mut stalled.recv).await, ErrorCode::TIMEOUT);
        // Our halves go too (each open stream counts against the connection's credit).
        drop((stalled, refused));
        // An upload stream that sends nothing after it is accepted: reset too.
        let begun = begin_upload(&alice, "next.bin", "application/octet-stream", &data).await;
        let mut idle = Transfer::open(conn, &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        assert!(matches!(idle.reply().await, Some(TransferReply::Accepted { offset: 0 })));
        assert_eq!(reset_code(&mut idle.recv).await, ErrorCode::TIMEOUT);
        // The slot is free again: a download that reads gets every byte.
        let (_, got) = download(conn, file, 0, 0).await.unwrap();
        assert_eq!(got, data);
    })
    .await
}

/// With every transfer stream place taken, a stream that fell behind 64 KiB/s since it
/// began gives its place to a newcomer (reset with `OVERLOADED`; the client resumes
/// later), one per newcomer; streams still within their grace keep theirs (the newcomer
/// is refused `OVERLOADED`). Before: a stream moving a byte every 29 s kept its place
/// for its upload's life, and a few dozen accounts held every place.
#[tokio::test]
async fn a_stream_that_fell_behind_gives_its_place_to_a_newcomer() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.max_live_transfer_streams = 2;
            c.transfer_progress_secs = 60;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let data = bytes(1024 * 1024, 31);
        let begun = begin_upload(&bob, "c.bin", "application/octet-stream", &data).await;
        let (_, mut idle) = open_upload(&alice, "a.bin", &data).await;
        let (_, mut idle_too) = open_upload(&alice, "b.bin", &data).await;
        let mut early = Transfer::open(bob.connection(), &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        assert_eq!(reset_code(&mut early.recv).await, ErrorCode::OVERLOADED, "within their grace");
        drop(early);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Both idle past their grace: bob's upload takes one of their places and completes.
        let done = upload_rest(bob.connection(), begun.file, &data, 0).await;
        assert!(matches!(done, TransferReply::Complete(_)), "{done:?}");
        let code = tokio::select! {
            code = reset_code(&mut idle.recv) => code,
            code = reset_code(&mut idle_too.recv) => code,
        };
        assert_eq!(code, ErrorCode::OVERLOADED);
    })
    .await
}

/// A stream of small chunks, each waiting its turn of the broker-wide small-chunk pacer,
/// falls behind like any other and gives its place to a newcomer. Before, the turns
/// counted as waiting for the broker (the place's clock stopped), and a stream sending
/// 1-byte chunks back to back was almost always waiting for one: about 43 accounts (six
/// streams each) filled every place and the pacer's queue at a few hundred bytes a
/// second, and every other user's transfer was refused `OVERLOADED` (an attacker review).
#[tokio::test]
async fn a_stream_of_tiny_chunks_waiting_for_sync_turns_gives_its_place_to_a_newcomer() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.max_live_transfer_streams = 1;
            c.transfer_progress_secs = 60;
            c.small_chunk_syncs_per_sec = 1;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let data = bytes(1024 * 1024, 33);
        let begun = begin_upload(&bob, "b.bin", "application/octet-stream", &data).await;
        let (_, mut tiny) = open_upload(&alice, "a.bin", &data).await;
        let frames: Vec<u8> = (0..64u64).flat_map(|i| chunk_frame(i, &data[i as usize..i as usize + 1])).collect();
        tiny.send.write_all(&frames).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3500)).await;
        // Three or four bytes in 3.5 s: far behind 64 KiB/s, though always waiting its turn.
        let done = upload_rest(bob.connection(), begun.file, &data, 0).await;
        assert!(matches!(done, TransferReply::Complete(_)), "{done:?}");
        assert_eq!(reset_code(&mut tiny.recv).await, ErrorCode::OVERLOADED);
    })
    .await
}

/// A stream that has not yet said what it wants gives its place up like any other once it
/// is behind. Before, it kept its place until its open deadline (10 s), ignoring the
/// newcomer's claim, so streams opened with a byte and left silent, opened again as each
/// timed out, held every place and every other user's transfer was refused `OVERLOADED`.
#[tokio::test]
async fn a_stream_silent_since_it_opened_gives_its_place_to_a_newcomer() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.max_live_transfer_streams = 1;
            c.transfer_progress_secs = 60;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let data = bytes(256 * 1024, 32);
        let begun = begin_upload(&bob, "b.bin", "application/octet-stream", &data).await;
        // A file request first (streams beyond the control stream are granted with them),
        // then half a frame: the broker takes the stream (and a place) and waits for the rest.
        begin_upload(&alice, "a.bin", "application/octet-stream", &data).await;
        let (mut send, mut silent) = alice.connection().open_bi().await.unwrap();
        send.write_all(&[0x05]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let done = upload_rest(bob.connection(), begun.file, &data, 0).await;
        assert!(matches!(done, TransferReply::Complete(_)), "{done:?}");
        assert_eq!(reset_code(&mut silent).await, ErrorCode::OVERLOADED);
    })
    .await
}

#[tokio::test]
async fn broker_wide_budgets_make_transfer_streams_wait_their_turn() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.transfer_progress_secs = 2;
            // One chunk buffer held at a time over all streams, one blob file open.
            c.transfer_buffer_bytes = 1;
            c.max_open_blob_files = 1;
        })
        .await;
        let (alice, _) = tb.register("alice").await;
        let conn = alice.connection().clone();
        // Uploads at once share the one-chunk budget: each waits its turn, none fails.
        let sampler_shared = tb.shared().clone();
        let sampler = tokio::spawn(async move {
            let mut most = 0;
            loop {
                most = most.max(sampler_shared.files.queued_chunk_bytes());
                // One chunk's buffer: the frame and its alignment padding.
                let chunk = switchboard_protocol::limits::MAX_TRANSFER_FRAME_BYTES as usize;
                if most > chunk + switchboard_broker::files::blobs::DIRECT_ALIGN {
                    return most;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let datas: Vec<Vec<u8>> = (0..3).map(|i| bytes(3 * 1024 * 1024 + 17, 40 + i)).collect();
        let mut begun = Vec::new();
        for (i, data) in datas.iter().enumerate() {
            begun.push(begin_upload(&alice, &format!("f{i}.bin"), "application/octet-stream", data).await.file);
        }
        let uploads: Vec<_> = datas
            .iter()
            .zip(&begun)
            .map(|(data, file)| {
                let (conn, data, file) = (conn.clone(), data.clone(), *file);
                tokio::spawn(async move { upload_rest(&conn, file, &data, 0).await })
            })
            .collect();
        for upload in uploads {
            let reply = upload.await.unwrap();
            assert!(matches!(reply, TransferReply::Complete(_)), "{reply:?}");
        }
        assert!(!sampler.is_finished(), "the queued chunk bytes passed the budget: {:?}", sampler.await);
        sampler.abort();
        // A download whose client reads nothing holds the one blob file (the file is
        // larger than the broker's send buffer, so the download cannot end)...
        let file = begun[0];
        let mut stalled = Transfer::open(&conn, &TransferOpen::Download { file, offset: 0, length: 0 }).await;
        assert!(matches!(stalled.reply().await, Some(TransferReply::Range { .. })));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // ... so the next one waits (its answer, then no byte yet), and is served once the
        // stalled one is reset (2 s after it stalled), within its own deadline (2 s
        // after it began).
        let mut next = Transfer::open(&conn, &TransferOpen::Download { file, offset: 0, length: 0 }).await;
        assert!(matches!(next.reply().await, Some(TransferReply::Range { .. })), "answered before a blob file is free");
        let early = tokio::time::timeout(Duration::from_millis(300), next.recv.read_chunk(64, true)).await;
        assert!(early.is_err(), "served while the only blob file was taken: {early:?}");
        let mut got = Vec::new();
        while let Some(chunk) = within(STEP_DEADLINE, "the bytes", next.recv.read_chunk(1 << 20, true)).await.unwrap() {
            got.extend_from_slice(&chunk.bytes);
        }
        assert_eq!(got, datas[0]);
        assert_eq!(reset_code(&mut stalled.recv).await, ErrorCode::TIMEOUT);
    })
    .await
}

/// A download whose reader takes nothing keeps its blob file only while no other
/// download waits for one: then the stalled ones are held to the upload chunks' minimum
/// rate and one of them per waiting download gives its file up (`CHUNK_TOO_SLOW`).
/// Before, one piece per `transfer_progress_secs` kept a blob file open for good, so
/// slow readers could keep every download out. An empty range takes no blob file.
#[tokio::test]
async fn a_stalled_download_gives_its_blob_file_to_a_waiting_one() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.transfer_progress_secs = 60;
            c.max_open_blob_files = 2;
        })
        .await;
        let (alice, identity) = tb.register("alice").await;
        let conn = alice.connection().clone();
        let data = bytes(8 * 1024 * 1024 + 5, 91);
        let file = upload(&alice, "big.bin", &data).await;
        // Each on a connection of its own (a stalled stream fills its connection's window).
        let mut stalled = Vec::new();
        let mut stalled_clients = Vec::new();
        for _ in 0..2 {
            let other = tb.connector().connect(&identity).await.unwrap();
            file_info(&other, file).await.unwrap();
            let mut t =
                Transfer::open(other.connection(), &TransferOpen::Download { file, offset: 0, length: 0 }).await;
            assert!(matches!(t.reply().await, Some(TransferReply::Range { .. })));
            stalled.push(t);
            stalled_clients.push(other);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Nothing to send needs no blob file: answered while both are taken.
        let size = data.len() as u64;
        let mut empty = Transfer::open(&conn, &TransferOpen::Download { file, offset: size, length: 0 }).await;
        let (reply, got) = within(STEP_DEADLINE, "an empty range", empty.download_reply()).await;
        assert!(matches!(reply, TransferReply::Range { length: 0, .. }) && got.is_empty(), "{reply:?}");

        let started = std::time::Instant::now();
        let mut next = Transfer::open(&conn, &TransferOpen::Download { file, offset: 0, length: 0 }).await;
        let (reply, got) = within(STEP_DEADLINE, "the waiting download", next.download_reply()).await;
        assert!(matches!(reply, TransferReply::Range { .. }), "{reply:?}");
        assert!(got == data);
        assert!(started.elapsed() < Duration::from_secs(20), "served within the lease, not the progress deadline");
        // One waiter cost one stalled reader its file; the other still has its bytes.
        let mut reset = 0;
        for t in &mut stalled {
            match tokio::time::timeout(Duration::from_millis(500), t.recv.read_chunk(1024, true)).await {
                Ok(Err(quinn::ReadError::Reset(code))) => {
                    assert_eq!(ErrorCode(code.into_inner() as u16), ErrorCode::CHUNK_TOO_SLOW);
                    reset += 1;
                }
                Ok(Ok(Some(_))) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(reset, 1, "exactly one stalled download gave its file up");
    })
    .await
}

/// A chunk still arriving holds its buffer: the buffer is counted in
/// `transfer_buffer_bytes` before it is allocated, not only once the chunk is whole and
/// queued (a stalled stream's half-received frame used to be held outside the budget).
#[tokio::test]
async fn a_chunk_being_received_is_counted_in_the_transfer_budget() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.transfer_progress_secs = 3).await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(1024 * 1024, 77);
        let (file, mut t) = open_upload(&alice, "half.bin", &data).await;
        let frame = chunk_frame(0, &data);
        // The header and half the data, then nothing.
        t.send.write_all(&frame[..frame.len() / 2]).await.unwrap();
        let counted = |q: usize| q >= data.len();
        until_queued(&tb, Duration::from_secs(2), "a half-received 1 MiB chunk is not counted", counted).await;
        // Stalled past its progress deadline: reset, and its bytes leave the budget.
        assert_eq!(reset_code(&mut t.recv).await, ErrorCode::TIMEOUT);
        let gone = |q: usize| q == 0;
        until_queued(&tb, Duration::from_secs(2), "the reset stream's chunk is still counted", gone).await;
        // A stream that ends half way through a chunk gives its bytes back at once, not
        // at its progress deadline (3 s).
        let mut t = Transfer::open(alice.connection(), &TransferOpen::Upload { file, offset: 0 }).await;
        assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset: 0 })));
        t.send.write_all(&frame[..frame.len() / 2]).await.unwrap();
        until_queued(&tb, Duration::from_secs(2), "the second half-received chunk is not counted", counted).await;
        t.send.finish().unwrap();
        let what = "a chunk cut short by the end of its stream is still counted";
        until_queued(&tb, Duration::from_secs(1), what, gone).await;
    })
    .await
}

/// A chunk's header takes its whole buffer from `transfer_buffer_bytes`; one that then
/// arrives slower than `MIN_CHUNK_BYTES_PER_SEC` (here: not at all) loses it to a stream
/// waiting for the budget, instead of holding it until its progress deadline. Before,
/// some twenty accounts sending only headers could keep every other upload waiting.
#[tokio::test]
async fn a_chunk_arriving_too_slowly_gives_its_budget_to_a_waiting_upload() {
    use switchboard_broker::limits::CHUNK_LEASE_GRACE;
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            // Far beyond the test's deadlines: only the lease can free the budget.
            c.transfer_progress_secs = 600;
            // One chunk buffer over all streams.
            c.transfer_buffer_bytes = 1;
        })
        .await;
        let (mallory, _) = tb.register("mallory").await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(1024 * 1024, 91);
        let (slow_file, mut slow) = open_upload(&mallory, "slow.bin", &data).await;
        // The header and a few bytes, then nothing.
        slow.send.write_all(&chunk_frame(0, &data)[..100]).await.unwrap();
        until_queued(&tb, STEP_DEADLINE, "the stalled chunk is not counted", |q| q >= data.len()).await;
        // Another user's upload waits for the budget, and gets it once the stalled chunk
        // is past its grace, not after the stalled stream's 600 s.
        let theirs = bytes(1024 * 1024, 92);
        let file = begin_upload(&alice, "theirs.bin", "application/octet-stream", &theirs).await.file;
        let started = std::time::Instant::now();
        let reply =
            within(STEP_DEADLINE, "the waiting upload", upload_rest(alice.connection(), file, &theirs, 0)).await;
        assert!(matches!(reply, TransferReply::Complete(_)), "{reply:?}");
        assert!(started.elapsed() >= CHUNK_LEASE_GRACE / 2, "the budget was free at once: {:?}", started.elapsed());
        assert_eq!(reset_code(&mut slow.recv).await, ErrorCode::CHUNK_TOO_SLOW);
        // The slow client resumes where it was, and with nobody waiting its upload completes.
        let reply =
            within(STEP_DEADLINE, "the resumed upload", upload_rest(mallory.connection(), slow_file, &data, 0)).await;
        assert!(matches!(reply, TransferReply::Complete(_)), "{reply:?}");
    })
    .await
}

/// A client that takes none of its stream's replies (its connection's receive window
/// kept full) does not keep a chunk's bytes by it: the lease is checked while the broker
/// waits to write a reply, not only while it reads.
#[tokio::test]
async fn a_chunk_keeps_no_budget_by_taking_no_replies() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.transfer_progress_secs = 600;
            // A 1 MiB chunk and a small one fit, a 1 MiB and a 256 KiB one do not.
            c.transfer_buffer_bytes = 1024 * 1024 + 256 * 1024;
        })
        .await;
        let (mallory, _) = tb.register("mallory").await;
        let (alice, _) = tb.register("alice").await;
        let conn = mallory.connection();
        let big = bytes(3 * 1024 * 1024, 94);
        let file = upload(&mallory, "big.bin", &big).await;
        let data = bytes(1024 * 1024 + 1, 95);
        let (_, mut slow) = open_upload(&mallory, "slow.bin", &data).await;
        let unread = fill_receive_window(conn, file).await;
        // One byte, whose `Durable` the broker cannot deliver, and the header of a 1 MiB
        // chunk, which takes the whole budget.
        let mut frames = chunk_frame(0, &data[..1]);
        frames.extend_from_slice(&chunk_frame(1, &data[1..])[..100]);
        slow.send.write_all(&frames).await.unwrap();
        let what = "the second chunk's header took nothing";
        until_queued(&tb, STEP_DEADLINE, what, |q| q >= data.len() - 1).await;
        let theirs = bytes(1024 * 1024, 96);
        let file = begin_upload(&alice, "theirs.bin", "application/octet-stream", &theirs).await.file;
        let reply =
            within(STEP_DEADLINE, "the waiting upload", upload_rest(alice.connection(), file, &theirs, 0)).await;
        assert!(matches!(reply, TransferReply::Complete(_)), "{reply:?}");
        drop(unread);
    })
    .await
}

/// A stream's last reply (here `Failed`) that the client does not take is given up and
/// the stream reset with `TIMEOUT`: reading nothing does not hold a place among the live
/// transfer streams forever.
#[tokio::test]
async fn a_last_reply_nobody_takes_ends_its_stream() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.transfer_progress_secs = 600).await;
        let (mallory, _) = tb.register("mallory").await;
        let conn = mallory.connection();
        let big = bytes(3 * 1024 * 1024, 97);
        let file = upload(&mallory, "big.bin", &big).await;
        let unread = fill_receive_window(conn, file).await;
        // Refused (the offset is past the end), but the refusal cannot be delivered.
        let past = big.len() as u64 + 1;
        let mut refused = Transfer::open(conn, &TransferOpen::Download { file, offset: past, length: 0 }).await;
        assert_eq!(reset_code(&mut refused.recv).await, ErrorCode::TIMEOUT);
        drop(unread);
    })
    .await
}

/// While no other stream waits for the budget, a chunk keeps its buffer however slowly
/// it arrives (within the progress deadline): a slow link is not cut for nothing.
#[tokio::test]
async fn a_slow_chunk_keeps_its_budget_while_no_other_stream_waits() {
    use switchboard_broker::limits::CHUNK_LEASE_GRACE;
    bounded(async {
        let tb = TestBroker::start_with(|c| c.transfer_buffer_bytes = 1).await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(256 * 1024, 93);
        let (_, mut t) = open_upload(&alice, "slow.bin", &data).await;
        let frame = chunk_frame(0, &data);
        t.send.write_all(&frame[..100]).await.unwrap();
        // Past the grace with 100 bytes: far below the minimum rate.
        tokio::time::sleep(CHUNK_LEASE_GRACE + Duration::from_secs(1)).await;
        t.send.write_all(&frame[100..]).await.unwrap();
        let reply = within(STEP_DEADLINE, "the slow chunk's answer", t.reply()).await;
        assert!(matches!(reply, Some(TransferReply::Durable { offset }) if offset == data.len() as u64), "{reply:?}");
        let reply = within(STEP_DEADLINE, "the completion", t.reply()).await;
        assert!(matches!(reply, Some(TransferReply::Complete(_))), "{reply:?}");
    })
    .await
}

#[tokio::test]
async fn progress_of_many_uploads_never_cuts_off_a_member_who_reads_slowly() {
    use switchboard_protocol::{Event, ServerFrame};
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.outbound_max_frames = 64;
            c.max_transfer_streams = 8;
        })
        .await;
        let alice = std::sync::Arc::new(tb.register("alice").await.0);
        let (_s, sloth) = tb.register("sloth").await;
        let conv = alice.create_group("g", &["sloth".into()]).await.unwrap().id;
        let sloth_id = sloth.user_id;
        // Authenticated, then reads nothing for a while.
        let mut raw = tb.connector().connect_raw(&sloth).await.unwrap();
        // Messages until its flow-control window is full: from then on, what the broker
        // sends it waits in its outbound queue.
        let queued = || {
            let sessions = tb.shared().online.sessions(sloth_id);
            sessions.map_or(0, |s| s.iter().map(|s| s.out.queued_frames()).sum::<usize>())
        };
        let text = "x".repeat(4000);
        let mut sent = 0;
        while queued() == 0 {
            assert!(sent < 5000, "the window never filled");
            let mut batch = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let (alice, text) = (alice.clone(), text.clone());
                batch.spawn(async move { alice.send(conv, &text).await });
            }
            for r in within(STEP_DEADLINE, "a batch of sends", batch.join_all()).await {
                r.unwrap();
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Six uploads attached to the conversation, each progressing for about three
        // seconds: at 4 events a second each, far more than the queue's 64 frames.
        const STEPS: usize = 12;
        const PIECE: usize = 16 * 1024;
        let mut uploads = tokio::task::JoinSet::new();
        let mut files = Vec::new();
        for i in 0..6u8 {
            let data = bytes(STEPS * PIECE, 60 + i);
            let file = begin_upload(&alice, &format!("p{i}.bin"), "application/octet-stream", &data).await.file;
            files.push(file);
            let alice = alice.clone();
            uploads.spawn(async move {
                let mut t = Transfer::open(alice.connection(), &TransferOpen::Upload { file, offset: 0 }).await;
                assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset: 0 })));
                for step in 0..STEPS {
                    if step == 1 {
                        // The first bytes are stored: attach it while it uploads.
                        let send = RequestBody::SendFiles {
                            conv,
                            client_id: switchboard_client::new_client_id(),
                            text: String::new(),
                            files: vec![file],
                        };
                        alice.request(send).await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let at = step * PIECE;
                    t.chunk(at as u64, &data[at..at + PIECE], None).await;
                    let end = (at + PIECE) as u64;
                    assert_eq!(t.reply().await, Some(TransferReply::Durable { offset: end }));
                }
                assert!(matches!(t.reply().await, Some(TransferReply::Complete(_))));
            });
        }
        within(Duration::from_secs(30), "the uploads", uploads.join_all()).await;
        assert!(raw.conn.close_reason().is_none(), "cut off: {:?}", raw.conn.close_reason());
        // It reads again: the backlog, then every file's final state, none followed by
        // progress.
        let mut complete = std::collections::HashSet::new();
        while complete.len() < files.len() {
            let frame =
                switchboard_tests::read_frame(&mut raw.recv, &mut raw.decoder).await.expect("the connection lives");
            if let ServerFrame::Event(Event::File(p)) = switchboard_protocol::decode(&frame).unwrap() {
                assert_eq!(p.conv, Some(conv));
                assert!(files.contains(&p.file));
                match p.state {
                    FileState::Complete { .. } => assert!(complete.insert(p.file), "one final state each"),
                    FileState::Uploading { .. } => assert!(!complete.contains(&p.file), "progress after the end"),
                    FileState::Failed { code } => panic!("failed with {code}"),
                }
            }
        }
    })
    .await
}

/// Small chunks' syncs take turns over the whole broker (`small_chunk_syncs_per_sec`):
/// a client sending 1-byte chunks has at most that many written a second (before: one
/// write and fdatasync per byte, as fast as the disk went, which every group commit then
/// queued behind); its upload still completes.
#[tokio::test]
async fn tiny_chunks_are_synced_no_faster_than_the_small_chunk_rate() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.small_chunk_syncs_per_sec = 10).await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(64 * 1024, 21);
        let begun = begin_upload(&alice, "tiny.bin", "application/octet-stream", &data).await;
        let started = std::time::Instant::now();
        let replies = upload_range(alice.connection(), begun.file, &data, 0, 16, 1).await;
        let took = started.elapsed();
        assert_eq!(replies.last(), Some(&TransferReply::Durable { offset: 16 }), "{replies:?}");
        // 16 turns 100 ms apart, the first at once: 1.5 s at least (before: milliseconds).
        assert!(took >= Duration::from_millis(1400), "16 one-byte chunks were synced in {took:?}");
        // The rest in one chunk, the file's last: complete, with the right hash.
        let done = upload_range(alice.connection(), begun.file, &data, 16, data.len() as u64, 128 * 1024).await;
        assert!(matches!(done.last(), Some(TransferReply::Complete(_))), "{done:?}");
    })
    .await
}

/// Chunks the upload's actor refuses (here at another offset than the stream's next,
/// claiming to end the file) go to it at once, taking no turn of the small-chunk
/// pacer: before, each took one without a sync (with the stream's clock stopped, as a
/// file's last chunk), so streams of such chunks, each ended by its refusal, held
/// everyone's small chunks back (an attacker review).
#[tokio::test]
async fn chunks_the_actor_refuses_take_no_turn_of_the_small_chunk_pacer() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.small_chunk_syncs_per_sec = 1).await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(2, 7);
        let file = begin_upload(&alice, "t.bin", "application/octet-stream", &data).await.file;
        let started = std::time::Instant::now();
        for _ in 0..4 {
            let mut t = Transfer::open(alice.connection(), &TransferOpen::Upload { file, offset: 0 }).await;
            t.chunk(1, &data[1..], None).await;
            let replies = [t.reply().await, t.reply().await];
            assert!(
                matches!(&replies[1], Some(TransferReply::Failed { error, offset: 0 }) if error.code == ErrorCode::WRONG_OFFSET),
                "{replies:?}"
            );
        }
        // Nor do the chunks of a stream opened at another offset than the durable one
        // (the open is refused): before, its first chunk, at the offset it opened at,
        // took a turn.
        for _ in 0..4 {
            let mut t = Transfer::open(alice.connection(), &TransferOpen::Upload { file, offset: 1 }).await;
            t.chunk(1, &data[1..], None).await;
            let reply = t.reply().await;
            assert!(
                matches!(&reply, Some(TransferReply::Failed { error, offset: 0 }) if error.code == ErrorCode::WRONG_OFFSET),
                "{reply:?}"
            );
        }
        // Eight turns a second apart would take 7 s at least; four, 3 s.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(2000), "eight refused chunks took {took:?}");
        // The upload is untouched, and its one real chunk still completes it.
        assert!(matches!(upload_rest(alice.connection(), file, &data, 0).await, TransferReply::Complete(_)));
    })
    .await
}

/// A small file's one chunk takes a turn of the small-chunk pacer too, so tiny files
/// complete no faster than `small_chunk_syncs_per_sec` (before: a chunk that ended its
/// file never waited, and a flood of tiny uploads cost a chunk sync, a rename and two
/// directory syncs each, unpaced). With nothing else syncing small chunks the first
/// goes at once.
#[tokio::test]
async fn tiny_files_complete_no_faster_than_the_small_chunk_rate() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.small_chunk_syncs_per_sec = 10).await;
        let (alice, _) = tb.register("alice").await;
        let started = std::time::Instant::now();
        for i in 0..8u8 {
            let data = bytes(1024, 60 + i);
            let begun = begin_upload(&alice, &format!("t{i}.bin"), "application/octet-stream", &data).await;
            let last = upload_rest(alice.connection(), begun.file, &data, 0).await;
            assert!(matches!(last, TransferReply::Complete(_)), "{last:?}");
        }
        let took = started.elapsed();
        // 8 turns 100 ms apart, the first at once: 700 ms at least (before: milliseconds).
        assert!(took >= Duration::from_millis(650), "8 one-chunk files completed in {took:?}");
    })
    .await
}

/// Descriptors this process holds open on files under `dir` (Linux: `/proc/self/fd`).
#[cfg(target_os = "linux")]
fn descriptors_under(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    entries.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).filter(|target| target.starts_with(dir)).count()
}

/// An upload with no transfer stream open holds no file descriptor: before, each
/// upload's actor kept two (its partial file, and the same with `O_DIRECT`) for the 10 s
/// an idle actor lives, so accounts at `max_uploads_per_user` that touched their uploads
/// every few seconds could exhaust the broker's descriptors, and every download, upload
/// and directory sync then failed. A later stream opens the file again and the uploads
/// complete.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn uploads_without_an_open_stream_hold_no_file_descriptors() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let uploads = std::fs::canonicalize(tb.data_dir().join("uploads")).unwrap();
        let mut begun = Vec::new();
        for i in 0..8u8 {
            let data = bytes(512 * 1024, 40 + i);
            let upload = begin_upload(&alice, &format!("f{i}.bin"), "application/octet-stream", &data).await;
            let replies = upload_range(alice.connection(), upload.file, &data, 0, 256 * 1024, 64 * 1024).await;
            assert!(matches!(replies.last(), Some(TransferReply::Durable { offset: 262_144 })), "{replies:?}");
            begun.push((upload.file, data));
        }
        assert_eq!(tb.shared().files.live(), 8, "the actors live on, idle");
        within(Duration::from_secs(3), "the partial files closed once their streams ended", async {
            while descriptors_under(&uploads) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        for (file, data) in &begun {
            let last = upload_rest(alice.connection(), *file, data, 256 * 1024).await;
            assert!(matches!(last, TransferReply::Complete(_)), "{last:?}");
        }
    })
    .await
}

#[tokio::test]
async fn reopening_a_resumed_upload_reads_nothing_and_its_bytes_are_hashed_once() {
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let data = bytes(1024 * 1024, 14);
        let (size, half) = (data.len() as u64, data.len() as u64 / 2);
        let begun = begin_upload(&alice, "a.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), begun.file, &data, 0, half, 64 * 1024).await;
        drop(alice);
        // After a restart (or its actor retiring), opening the upload again starts a new
        // actor. Before, each such start read and hashed the whole durable prefix: a
        // client reopening a nearly complete 100 MiB upload again and again had the
        // broker read and hash 100 MiB for each small frame.
        // (A file request first on each connection: it opens it to transfer streams.)
        let mut alice = None;
        for _ in 0..2 {
            tb.restart().await;
            let client = tb.connector().connect(&alice_id).await.unwrap();
            assert_eq!(offset_of(status(&client, begun.file).await.unwrap()), half);
            let mut t =
                Transfer::open(client.connection(), &TransferOpen::Upload { file: begun.file, offset: half }).await;
            assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset }) if offset == half));
            assert_eq!(tb.shared().status().upload_bytes_hashed, 0, "nothing read to reopen it");
            alice = Some(client);
        }
        let alice = alice.unwrap();
        // Each chunk written has some of the durable prefix read back and hashed beside
        // it: at most 8 bytes for a chunk of one byte (what the client writes bounds
        // what it makes the broker read)...
        let replies = upload_range(alice.connection(), begun.file, &data, half, half + 1, 1).await;
        assert!(
            matches!(replies.last(), Some(TransferReply::Durable { offset }) if *offset == half + 1),
            "{replies:?}"
        );
        let hashed = tb.shared().status().upload_bytes_hashed;
        assert!((1..=8).contains(&hashed), "{hashed} bytes read back for one written");
        // ... and all of it by the chunk before the last (before, a resumed upload hashed
        // nothing until its last chunk, then the whole file, inside the client's wait).
        let last = size - 64 * 1024;
        upload_range(alice.connection(), begun.file, &data, half + 1, last, 64 * 1024).await;
        assert_eq!(tb.shared().status().upload_bytes_hashed, last, "caught up before the last chunk");
        // The last completes it, each byte hashed once.
        match upload_rest(alice.connection(), begun.file, &data, last).await {
            TransferReply::Complete(f) => assert_eq!((f.file, f.size), (begun.file, size)),
            other => panic!("expected Complete, got {other:?}"),
        }
        assert_eq!(tb.shared().status().upload_bytes_hashed, size);
        let (_, got) = download(alice.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(got, data);
        // Bytes that do not match the declared hash are still caught when the upload
        // was resumed: it fails with HASH_MISMATCH and is removed.
        let other = bytes(data.len(), 15);
        let wrong = begin_upload(&alice, "b.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), wrong.file, &other, 0, half, 64 * 1024).await;
        drop(alice);
        tb.restart().await;
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        assert_eq!(offset_of(status(&alice, wrong.file).await.unwrap()), half);
        match upload_rest(alice.connection(), wrong.file, &other, half).await {
            TransferReply::Failed { error, .. } => assert_eq!(error.code, ErrorCode::HASH_MISMATCH),
            other => panic!("expected HASH_MISMATCH, got {other:?}"),
        }
        assert_eq!(code_of(status(&alice, wrong.file).await), ErrorCode::NOT_FOUND, "removed");
    })
    .await
}

#[tokio::test]
async fn a_completion_that_failed_while_running_is_finished_by_a_later_stream_not_failed_for_ever() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (phone, _) = tb.login("alice").await;
        let mut phone_events = phone.events().unwrap();
        let data = bytes(300 * 1024, 9);
        let size = data.len() as u64;
        let begun = begin_upload(&alice, "a.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), begun.file, &data, 0, size - 1, 64 * 1024).await;
        // The partial file goes from under the running broker (a disk fault, an
        // operator's mistake): the last byte completes a hash that matches, and
        // publishing the bytes fails half-way.
        let hex: String = begun.file.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::remove_file(tb.data_dir().join("uploads").join(hex)).unwrap();
        let replies = upload_range(alice.connection(), begun.file, &data, size - 1, size, 64 * 1024).await;
        // The stream is told the upload starts over from 0 (before: the offset whose
        // bytes were lost, then WRONG_OFFSET on the next try).
        match replies.last() {
            Some(TransferReply::Failed { error, offset }) => {
                assert_eq!((error.code, *offset), (ErrorCode::INTERNAL, 0))
            }
            other => panic!("expected INTERNAL, got {other:?}"),
        }
        // The client tries again from what it is told: the upload, whose bytes are
        // gone, starts over and completes. Before, every later stream verified a file of
        // zeros and got HASH_MISMATCH, with nothing removed, until the broker restarted.
        let mut from = size;
        let done = within(STEP_DEADLINE, "the upload completing when tried again", async {
            loop {
                match upload_rest(alice.connection(), begun.file, &data, from).await {
                    TransferReply::Complete(f) => return f,
                    TransferReply::Failed { error, offset }
                        if [ErrorCode::INTERNAL, ErrorCode::WRONG_OFFSET].contains(&error.code) =>
                    {
                        from = offset;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => panic!("expected Complete once tried again, got {other:?}"),
                }
            }
        })
        .await;
        assert_eq!((done.file, done.size), (begun.file, size));
        let (_, got) = download(alice.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(got, data);
        // Her other device was never told the file failed: an internal failure is not
        // the upload's end. It was told the upload went back to 0 before it completed.
        within(STEP_DEADLINE, "the file's events", async {
            let mut back_to_zero = false;
            loop {
                match phone_events.next().await {
                    Some(switchboard_protocol::Event::File(p)) if p.file == begun.file => match p.state {
                        FileState::Complete { .. } => return assert!(back_to_zero, "never told the upload restarted"),
                        FileState::Failed { code } => panic!("told it failed ({code}), though it completed"),
                        FileState::Uploading { offset } => back_to_zero |= offset == 0,
                    },
                    Some(_) => {}
                    None => panic!("events ended"),
                }
            }
        })
        .await;
    })
    .await
}

/// An upload whose partial file went missing while no actor held it (its actor retired
/// idle) starts over at offset 0 when a stream comes, as the start-up repair does; before,
/// the new actor made the file again as that many zeros, accepted the stream at the old
/// offset, and the upload could only fail its hash.
#[tokio::test]
async fn a_partial_file_lost_while_no_actor_held_it_starts_the_upload_over() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(300 * 1024, 7);
        let begun = begin_upload(&alice, "a.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), begun.file, &data, 0, 128 * 1024, 64 * 1024).await;
        let shared = tb.shared().clone();
        within(Duration::from_secs(30), "the upload's actor retiring idle", async {
            while shared.files.live() > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        let hex: String = begun.file.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::remove_file(tb.data_dir().join("uploads").join(hex)).unwrap();
        let mut t =
            Transfer::open(alice.connection(), &TransferOpen::Upload { file: begun.file, offset: 128 * 1024 }).await;
        match t.reply().await {
            Some(TransferReply::Failed { error, offset: 0 }) => assert_eq!(error.code, ErrorCode::WRONG_OFFSET),
            other => panic!("expected WRONG_OFFSET at 0, got {other:?}"),
        }
        assert!(matches!(upload_rest(alice.connection(), begun.file, &data, 0).await, TransferReply::Complete(_)));
        let (_, got) = download(alice.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(got, data);
    })
    .await
}

#[tokio::test]
async fn an_image_whose_completion_a_crash_cut_short_gets_its_thumbnail_at_start() {
    use std::os::unix::fs::FileExt;
    bounded(async {
        let mut tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        let picture = png(600, 300);
        let begun = begin_upload(&alice, "cat.png", "image/png", &picture).await;
        let until = picture.len() as u64 - 1;
        upload_range(alice.connection(), begun.file, &picture, 0, until, 64 * 1024).await;
        drop(alice);
        tb.stop().await;
        // The state a crash leaves mid-completion: every byte durable and verified, the
        // record publishing, the partial file not yet made the blob.
        let dir = tb.data_dir();
        let hex: String = begun.file.iter().map(|b| format!("{b:02x}")).collect();
        let partial = std::fs::OpenOptions::new().write(true).open(dir.join("uploads").join(hex)).unwrap();
        partial.write_all_at(&picture[until as usize..], until).unwrap();
        partial.sync_all().unwrap();
        let store =
            switchboard_storage::Store::open(&switchboard_storage::StoreConfig::new(dir.join("store"))).unwrap();
        store.set_upload_offset(&begun.file, picture.len() as u64, None).unwrap().unwrap().await.unwrap();
        store.begin_publish(&begun.file).unwrap().unwrap().await.unwrap();
        store.close().unwrap();
        drop(store);
        // The start-up repair completes it, and it gets its thumbnail like any completion.
        tb.restart().await;
        let alice = tb.connector().connect(&alice_id).await.unwrap();
        let thumb = within(STEP_DEADLINE, "the thumbnail", async {
            loop {
                match file_info(&alice, begun.file).await.unwrap() {
                    Reply::File(info) => match info.state {
                        FileState::Complete { thumbnail: Some(t) } => return t,
                        FileState::Complete { thumbnail: None } => {}
                        other => panic!("not completed by the repair: {other:?}"),
                    },
                    other => panic!("{other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let (_, thumb_png) = download(alice.connection(), thumb.file, 0, 0).await.unwrap();
        let decoded = image::load_from_memory(&thumb_png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (256, 128));
        let (_, got) = download(alice.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(got, picture);
    })
    .await
}

#[tokio::test]
async fn a_second_connection_of_the_uploader_takes_the_upload_over_and_the_first_gets_conflict() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (laptop, _) = tb.register("alice").await;
        let (phone, _) = tb.login("alice").await;
        let data = bytes(2 * 1024 * 1024 + 5, 8);
        let begun = begin_upload(&laptop, "both.bin", "application/octet-stream", &data).await;
        // The laptop's stream has made its first chunk durable and stays open.
        let open = TransferOpen::Upload { file: begun.file, offset: 0 };
        let mut first = Transfer::open(laptop.connection(), &open).await;
        assert_eq!(first.reply().await, Some(TransferReply::Accepted { offset: 0 }));
        first.chunk(0, &data[..256 * 1024], None).await;
        assert_eq!(first.reply().await, Some(TransferReply::Durable { offset: 256 * 1024 }));
        // The phone resumes from the durable offset on its own connection: its stream
        // takes the upload and carries it to the end.
        let offset = offset_of(status(&phone, begun.file).await.unwrap());
        assert_eq!(offset, 256 * 1024);
        match upload_rest(phone.connection(), begun.file, &data, offset).await {
            TransferReply::Complete(f) => assert_eq!((f.file, f.size), (begun.file, data.len() as u64)),
            other => panic!("expected Complete, got {other:?}"),
        }
        // The laptop's stream was told, and ended: a chunk it sends now stores nothing.
        match first.reply().await {
            Some(TransferReply::Failed { error, offset }) => {
                assert_eq!((error.code, offset), (ErrorCode::CONFLICT, 256 * 1024))
            }
            other => panic!("expected CONFLICT, got {other:?}"),
        }
        first.chunk(256 * 1024, &bytes(1024, 99), None).await;
        assert_eq!(first.reply().await, None, "the stream it lost ended");
        let (_, got) = download(laptop.connection(), begun.file, 0, 0).await.unwrap();
        assert_eq!(got, data, "the file is exactly the bytes uploaded");
    })
    .await
}

#[tokio::test]
async fn progress_is_throttled_end_to_end_and_reaches_no_one_outside_its_audience() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let (phone, _) = tb.login("alice").await;
        let (bob, _) = tb.register("bob").await;
        let (eve, _) = tb.register("eve").await;
        let conv = alice.create_group("g", &["bob".into()]).await.unwrap().id;
        let (mut phone_events, mut bob_events, mut eve_events) =
            (phone.events().unwrap(), bob.events().unwrap(), eve.events().unwrap());
        next_entry(&mut bob_events).await;
        // Many small durable steps: far more than the allowed rate, if each were pushed.
        let data = bytes(96 * 16 * 1024, 9);
        let begun = begin_upload(&alice, "steps.bin", "application/octet-stream", &data).await;
        let started = std::time::Instant::now();
        upload_range(alice.connection(), begun.file, &data, 0, 16 * 1024, 16 * 1024).await;
        let send = RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: String::new(),
            files: vec![begun.file],
        };
        alice.request(send).await.unwrap();
        let replies =
            upload_range(alice.connection(), begun.file, &data, 16 * 1024, data.len() as u64, 16 * 1024).await;
        assert!(matches!(replies.last(), Some(TransferReply::Complete(_))), "{replies:?}");
        let durable_steps = replies.iter().filter(|r| matches!(r, TransferReply::Durable { .. })).count();
        let uploader = progress_events(&mut phone_events, begun.file, None).await;
        let member = progress_events(&mut bob_events, begun.file, Some(conv)).await;
        let elapsed = started.elapsed().as_secs_f64();
        // At most FILE_PROGRESS_PER_SECOND a second, one more for the leading edge.
        let allowed = (elapsed * f64::from(switchboard_protocol::limits::FILE_PROGRESS_PER_SECOND)).ceil() as usize + 1;
        assert!(durable_steps > allowed, "the upload was too slow to test the throttle: {durable_steps} steps");
        assert!(uploader <= allowed && member <= allowed, "{uploader} and {member} progress events in {elapsed:.2} s");
        // A user outside the audience gets nothing of it.
        no_event(&mut eve_events, 300).await;
    })
    .await
}

/// Counts the progress events of `file` to `conv`'s audience up to its final state
/// (`Complete`), which must follow; events to other audiences are skipped.
async fn progress_events(events: &mut switchboard_client::Events, file: FileId, conv: Option<u64>) -> usize {
    use switchboard_protocol::Event;
    let mut progress = 0usize;
    within(STEP_DEADLINE, "the final state", async {
        loop {
            match events.next().await {
                // The uploader, a member too, also hears of it as one.
                Some(Event::File(p)) if p.conv == conv => {
                    assert_eq!(p.file, file);
                    match p.state {
                        FileState::Uploading { .. } => progress += 1,
                        FileState::Complete { .. } => return,
                        other => panic!("{other:?}"),
                    }
                }
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
    })
    .await;
    progress
}

#[tokio::test]
async fn a_download_whose_blob_went_after_the_check_answers_not_found() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(10_000, 12);
        let file = upload(&alice, "gone.bin", &data).await;
        // The bytes vanish between the access check and the open (as when the last
        // holder's deletion runs in between).
        let hex: String = blake3::hash(&data).as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        std::fs::remove_file(tb.data_dir().join("blobs").join(hex)).unwrap();
        assert_eq!(download(alice.connection(), file, 0, 0).await.unwrap_err().code, ErrorCode::NOT_FOUND);
        alice.ping().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn an_edited_caption_with_the_files_names_must_fit_max_text_bytes() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let conv = alice.create_group("g", &[]).await.unwrap().id;
        let name = format!("{}.bin", "n".repeat(251));
        let file = upload(&alice, &name, &bytes(5000, 13)).await;
        let send = RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: "a caption".into(),
            files: vec![file],
        };
        let seq = match alice.request(send).await.unwrap() {
            Reply::Appended { seq, .. } => seq,
            other => panic!("{other:?}"),
        };
        let edit = |text: String| RequestBody::Edit {
            conv,
            client_id: switchboard_client::new_client_id(),
            target: seq,
            text,
        };
        // The name (255 bytes) and type (24) leave 3817 bytes of a 4096-byte text.
        let max = switchboard_protocol::limits::MAX_TEXT_BYTES as usize - name.len() - "application/octet-stream".len();
        assert_eq!(code_of(alice.request(edit("c".repeat(max + 1))).await), ErrorCode::INVALID);
        assert!(matches!(alice.request(edit("c".repeat(max))).await.unwrap(), Reply::Appended { .. }));
    })
    .await
}

#[tokio::test]
async fn a_final_state_reaches_each_device_once_however_many_conversations_carry_the_file() {
    use switchboard_protocol::Event;
    const GROUPS: usize = 48;
    bounded(async {
        // A queue of 8 frames: one final frame per conversation would cut bob off.
        let tb = TestBroker::start_with(|c| c.outbound_max_frames = 8).await;
        let (alice, _) = tb.register("alice").await;
        let (bob, _) = tb.register("bob").await;
        let mut bob_events = bob.events().unwrap();
        let (carol, _) = tb.register("carol").await;
        // Each user may create 20 conversations in a burst: three creators.
        let mut convs = Vec::new();
        for i in 0..GROUPS {
            let group = match i % 3 {
                0 => alice.create_group(&format!("g{i}"), &["bob".into()]).await,
                1 => bob.create_group(&format!("g{i}"), &["alice".into()]).await,
                _ => carol.create_group(&format!("g{i}"), &["alice".into(), "bob".into()]).await,
            };
            convs.push(group.unwrap().id);
        }
        // Alice's upload, its first bytes stored, attached in progress to every group.
        let data = bytes(1024 * 1024, 14);
        let begun = begin_upload(&alice, "many.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), begun.file, &data, 0, 64 * 1024, 64 * 1024).await;
        let attach = |conv, file| RequestBody::SendFiles {
            conv,
            client_id: switchboard_client::new_client_id(),
            text: String::new(),
            files: vec![file],
        };
        for &conv in &convs {
            alice.request(attach(conv, begun.file)).await.unwrap();
        }
        // Bob has read every message carrying it.
        let mut carried = 0;
        within(STEP_DEADLINE, "bob reading the attachments", async {
            while carried < GROUPS {
                match bob_events.next().await {
                    Some(Event::Entry(e)) if matches!(e.body, Body::Files { .. }) => carried += 1,
                    Some(_) => {}
                    None => panic!("events ended"),
                }
            }
        })
        .await;
        assert_eq!(alice.request(RequestBody::CancelUpload { file: begun.file }).await.unwrap(), Reply::Done);
        // A second upload in one group, cancelled after: its final state is announced
        // after the first one's has gone out in full, so every copy of the first is
        // in bob's events before it.
        let later = begin_upload(&alice, "later.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), later.file, &data, 0, 64 * 1024, 64 * 1024).await;
        alice.request(attach(convs[0], later.file)).await.unwrap();
        assert_eq!(alice.request(RequestBody::CancelUpload { file: later.file }).await.unwrap(), Reply::Done);
        let mut finals = Vec::new();
        within(STEP_DEADLINE, "the final states", async {
            loop {
                match bob_events.next().await {
                    Some(Event::File(p)) if matches!(p.state, FileState::Failed { .. }) => {
                        if p.file == later.file {
                            return;
                        }
                        finals.push((p.file, p.conv));
                    }
                    Some(_) => {}
                    None => panic!("events ended: bob was cut off"),
                }
            }
        })
        .await;
        assert_eq!(finals, vec![(begun.file, Some(convs[0]))], "one final state, naming the first conversation");
        bob.ping().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn one_users_stalled_streams_do_not_take_every_transfer_place() {
    bounded(async {
        let tb = TestBroker::start_with(|c| {
            c.max_live_transfer_streams = 6;
            c.max_transfer_streams_per_user = 4;
        })
        .await;
        let (laptop, _) = tb.register("alice").await;
        let (phone, _) = tb.login("alice").await;
        let (bob, _) = tb.register("bob").await;
        // Alice opens all the streams her two connections may (3 each), each stalled
        // after one byte of its first frame.
        let mut stalled = tokio::task::JoinSet::new();
        for client in [&laptop, &phone] {
            begin_upload(client, "a.bin", "application/octet-stream", &bytes(10, 1)).await;
            for _ in 0..3 {
                let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
                send.write_all(&[5]).await.unwrap();
                stalled.spawn(async move {
                    let end = recv.read_chunk(1024, true).await;
                    drop(send);
                    match end {
                        Err(quinn::ReadError::Reset(code)) => ErrorCode(code.into_inner() as u16),
                        other => panic!("expected a reset, got {other:?}"),
                    }
                });
            }
        }
        // Past her 4, each is reset at once with RATE_LIMITED (the others stall for the
        // 10 s the first frame may take).
        for _ in 0..2 {
            let code = within(Duration::from_secs(5), "a stream past the user's cap", stalled.join_next()).await;
            assert_eq!(code.unwrap().unwrap(), ErrorCode::RATE_LIMITED);
        }
        assert_eq!(tb.shared().files.user_streams(laptop.user_id), 4);
        // Bob's upload and download still find a place.
        let data = bytes(300 * 1024, 15);
        let file = upload(&bob, "b.bin", &data).await;
        let (_, got) = download(bob.connection(), file, 0, 0).await.unwrap();
        assert_eq!(got, data);
        assert_eq!(stalled.len(), 4, "alice's other streams still held their places");
    })
    .await
}

/// The last checks of `BeginUpload`, `CancelUpload`, `DeleteFile` and `WithdrawFile`
/// refuse a request that its session let in before its device was revoked but that
/// reaches them after (`Revocation::refusal`): each held at its point (`Point`) until
/// the revocation is answered, then let go, changes nothing. Each failed the test
/// without its check: the upload was begun (the laptop's own was then refused
/// `TOO_MANY_UPLOADS`), the upload cancelled, the file deleted, the file withdrawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_requests_let_in_before_their_devices_revocation_do_not_land() {
    bounded(async {
        let tb = TestBroker::start_with(|c| c.max_uploads_per_user = 1).await;
        let (laptop, _) = tb.register("alice").await;
        let data = bytes(1000, 3);

        let body = RequestBody::BeginUpload(new_upload("a.bin", "application/octet-stream", &data));
        revoked_while_held(&tb, &laptop, "alice", Point::BeginUpload, body).await;
        // The only upload in progress a user may have is free for the laptop.
        let mine = match laptop.request(RequestBody::BeginUpload(new_upload("b.bin", "text/plain", &data))).await {
            Ok(Reply::Upload(status)) => status,
            other => panic!("the phone's upload was begun after its revocation (the laptop's: {other:?})"),
        };

        // A cancel holds no store slot: nothing says when it is done, so the upload is
        // watched for half a second (without the check it went within milliseconds).
        revoked_while_held(&tb, &laptop, "alice", Point::CancelUpload, RequestBody::CancelUpload { file: mine.file })
            .await;
        for _ in 0..25 {
            let still = matches!(status(&laptop, mine.file).await, Ok(Reply::Upload(s)) if !s.complete);
            assert!(still, "the upload was cancelled after its canceller's revocation");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        laptop.cancel_upload(mine.file).await.unwrap();

        // Alice's file: any device of hers may delete or withdraw it.
        let file = upload(&laptop, "c.bin", &data).await;
        revoked_while_held(&tb, &laptop, "alice", Point::DeleteFile, RequestBody::DeleteFile { file }).await;
        assert!(file_info(&laptop, file).await.is_ok(), "the file was deleted after its deleter's revocation");
        revoked_while_held(&tb, &laptop, "alice", Point::WithdrawFile, RequestBody::WithdrawFile { file }).await;
        assert!(file_info(&laptop, file).await.is_ok(), "the file was withdrawn after its withdrawer's revocation");
    })
    .await
}

/// A stream whose opening reached the upload's actor behind a cancellation gets a last
/// reply (`NOT_FOUND`): the actor stops once the upload is removed, and the messages
/// still in its mailbox go with it. Before, the stream was finished with no reply at
/// all, which no client can tell from a network failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_behind_a_cancellation_is_answered_not_found() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(4096, 9);
        let begun = begin_upload(&alice, "a.bin", "application/octet-stream", &data).await;
        let mut held = tb.shared().pauses.arm(Point::UploadChunk);
        let mut first = Transfer::open(alice.connection(), &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
        assert!(matches!(first.reply().await, Some(TransferReply::Accepted { .. })));
        first.chunk(0, &data[..1024], None).await;
        within(STEP_DEADLINE, "the chunk held in the actor", held.reached()).await;
        // Behind the chunk: the cancellation, then a second stream's opening.
        let cancel = alice.request(RequestBody::CancelUpload { file: begun.file });
        let open_then_release = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let second =
                Transfer::open(alice.connection(), &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            held.release();
            second
        };
        let (cancelled, mut second) = tokio::join!(cancel, open_then_release);
        assert!(cancelled.is_ok(), "cancelled: {cancelled:?}");
        match second.reply().await {
            Some(TransferReply::Failed { error, .. }) => assert_eq!(error.code, ErrorCode::NOT_FOUND),
            other => panic!("expected Failed with NOT_FOUND, got {other:?}"),
        }
    })
    .await
}

/// An upload whose partial file went from under the running broker starts over at offset
/// 0 when its actor next opens the file, and a cancellation queued behind that chunk is
/// carried out (the actor stops after rewinding, and the removal it dropped is asked
/// again of its successor; before, the cancel was answered `NOT_FOUND` and the upload
/// stayed, holding its quota, until it expired).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_queued_behind_a_rewind_is_carried_out() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, _) = tb.register("alice").await;
        let data = bytes(512 * 1024, 12);
        let begun = begin_upload(&alice, "a.bin", "application/octet-stream", &data).await;
        upload_range(alice.connection(), begun.file, &data, 0, 256 * 1024, 64 * 1024).await;
        // The stream ended: the actor let go of the file, which then goes.
        within(STEP_DEADLINE, "the partial file closed", async {
            let uploads = std::fs::canonicalize(tb.data_dir().join("uploads")).unwrap();
            while descriptors_under(&uploads) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let hex: String = begun.file.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::remove_file(tb.data_dir().join("uploads").join(hex)).unwrap();
        let mut held = tb.shared().pauses.arm(Point::UploadChunk);
        let open = TransferOpen::Upload { file: begun.file, offset: 256 * 1024 };
        let mut t = Transfer::open(alice.connection(), &open).await;
        assert!(matches!(t.reply().await, Some(TransferReply::Accepted { .. })));
        t.chunk(256 * 1024, &data[256 * 1024..320 * 1024], None).await;
        within(STEP_DEADLINE, "the chunk held in the actor", held.reached()).await;
        let cancel = alice.request(RequestBody::CancelUpload { file: begun.file });
        let release = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            held.release();
        };
        let (cancelled, ()) = tokio::join!(cancel, release);
        assert!(cancelled.is_ok(), "cancelled: {cancelled:?}");
        assert_eq!(code_of(status(&alice, begun.file).await), ErrorCode::NOT_FOUND, "removed");
    })
    .await
}

/// A chunk that reached its upload's actor before its device was revoked is not written
/// if the actor comes to it after (the actor's check of `Revocation`): held there
/// (`Point::UploadChunk`) until the revocation is answered, then let go, the whole file
/// in one chunk writes nothing and publishes nothing (without the check: written and
/// the file complete, in each of 3 runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_let_in_before_its_devices_revocation_is_not_written() {
    bounded(chunk_held_then_cut_off(CutOff::Revoked)).await
}

/// The same when the device's connection is gone before the revocation: its session had
/// ended, so the revocation found no session to cut off, and the chunk held in the actor
/// was written and the file published after the revocation was answered (the actor now
/// asks the store once the session's queue is closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_let_in_before_its_device_left_and_was_revoked_is_not_written() {
    bounded(chunk_held_then_cut_off(CutOff::RevokedAfterLeaving)).await
}

/// An upload stream opened by a device revoked while its opening waited in the upload's
/// mailbox takes nothing over: it is answered with the revocation, and the upload's live
/// stream from the owner's other device goes on. Before, the opening took the upload
/// over after the revocation was answered, and the live stream was failed `CONFLICT`.
#[tokio::test]
async fn an_upload_opening_queued_before_its_device_was_revoked_takes_nothing_over() {
    bounded(async {
        let tb = TestBroker::start().await;
        let (laptop, _) = tb.register("alice").await;
        let (phone, phone_id) = tb.login("alice").await;
        let data = bytes(2000, 5);
        let (file, mut live, held) = first_chunk_held(&tb, &laptop, &phone, &data, 1000).await;
        // The phone's opening waits behind the held chunk; then the phone is revoked.
        let mut queued = Transfer::open(phone.connection(), &TransferOpen::Upload { file, offset: 1000 }).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        laptop.revoke_other_device(phone_id.device_id, tb.password).await.unwrap();
        held.release();
        assert!(matches!(live.reply().await, Some(TransferReply::Durable { offset: 1000 })));
        live.chunk(1000, &data[1000..], None).await;
        match live.reply().await {
            Some(TransferReply::Durable { offset: 2000 }) => {}
            other => panic!("the live stream was taken over: {other:?}"),
        }
        assert!(!matches!(queued.reply().await, Some(TransferReply::Accepted { .. })));
    })
    .await
}

/// `uploader` begins an upload of `data` and sends its first `first` bytes at offset 0
/// on a stream, which the upload's actor holds (`Point::UploadChunk`) until released;
/// `other`, a second device of the same user, may open transfer streams (it asked
/// about the upload). The upload, the stream and the hold.
async fn first_chunk_held(
    tb: &TestBroker,
    uploader: &Client,
    other: &Client,
    data: &[u8],
    first: usize,
) -> (FileId, Transfer, switchboard_broker::pauses::Held) {
    let begun = begin_upload(uploader, "a.bin", "application/octet-stream", data).await;
    assert_eq!(offset_of(status(other, begun.file).await.unwrap()), 0);
    let mut held = tb.shared().pauses.arm(Point::UploadChunk);
    let mut t = Transfer::open(uploader.connection(), &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
    assert!(matches!(t.reply().await, Some(TransferReply::Accepted { .. })));
    t.chunk(0, &data[..first], None).await;
    within(STEP_DEADLINE, "the chunk held in the actor", held.reached()).await;
    (begun.file, t, held)
}

/// The same when the phone's session ended and then the operator disabled the account
/// and enabled it again before the chunk came up: the disable found no session of the
/// phone to cut off and the account's disabled key was gone again, so the chunk was
/// written after the disable (an attacker review; PROTOCOL section 8 says a request in
/// flight is not carried out once its account was disabled, enabled again or not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_let_in_before_its_session_ended_and_its_account_was_disabled_is_not_written() {
    bounded(chunk_held_then_cut_off(CutOff::DisabledAndEnabledAfterLeaving)).await
}

/// How `chunk_held_then_cut_off` cuts the phone off.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CutOff {
    /// The laptop revokes the phone, still connected.
    Revoked,
    /// The phone leaves, then the laptop revokes it.
    RevokedAfterLeaving,
    /// The phone leaves, then the operator disables the account and enables it again.
    DisabledAndEnabledAfterLeaving,
}

/// Alice's phone sends a whole file in one chunk, held in the upload's actor; it is cut
/// off as `how` says, the chunk goes on, and an opening of the upload by a device still
/// allowed (the laptop; after a disable, which closes the laptop too, a new login) must
/// find nothing written.
async fn chunk_held_then_cut_off(how: CutOff) {
    use switchboard_broker::admin::{AdminRequest, Ops, execute};
    let tb = TestBroker::start().await;
    let (laptop, _) = tb.register("alice").await;
    let (phone, phone_id) = tb.login("alice").await;
    let data = bytes(1000, 5);
    let (file, _t, held) = first_chunk_held(&tb, &phone, &laptop, &data, data.len()).await;
    if how != CutOff::Revoked {
        phone.close();
        // The phone's session ends (its connection closed, its writer done).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let opener = if how == CutOff::DisabledAndEnabledAfterLeaving {
        let shared = tb.shared();
        let ops = Ops { store: &shared.store, auth: &shared.auth, broker: Some(shared) };
        for disabled in [true, false] {
            execute(&ops, AdminRequest::UserDisable { name: "alice".into(), disabled })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let (again, _) = tb.login("alice").await;
        // (A device opens transfer streams once its session has made a request.)
        assert_eq!(offset_of(status(&again, file).await.unwrap()), 0);
        again
    } else {
        laptop.revoke_other_device(phone_id.device_id, tb.password).await.unwrap();
        laptop
    };
    held.release();
    // The actor takes one message at a time: it answers the opening of the same upload
    // once it is done with the chunk.
    let mut resumed = Transfer::open(opener.connection(), &TransferOpen::Upload { file, offset: 0 }).await;
    match resumed.reply().await {
        Some(TransferReply::Accepted { offset: 0 }) => {}
        other => panic!("the chunk was written after its device was cut off: {other:?}"),
    }
}

/// A device revoked in the middle of an upload writes nothing more: the chunks it had
/// sent that were still queued for the upload are not written once the revocation is
/// answered, and the file is never published (before: the queued chunks were written,
/// and had the last been among them the file would have been published after the
/// revocation). A chunk being written as the revocation lands may still finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_devices_queued_chunks_are_not_written() {
    bounded(async {
        const CHUNK: usize = 1024 * 1024;
        const CHUNKS: usize = 24;
        let mut tries = Vec::new();
        for _ in 0..5 {
            let tb = TestBroker::start().await;
            let (laptop, _) = tb.register("alice").await;
            let (phone, phone_id) = tb.login("alice").await;
            let data = bytes(CHUNKS * CHUNK, 9);
            let begun = begin_upload(&phone, "big.bin", "application/octet-stream", &data).await;
            let mut t = Transfer::open(phone.connection(), &TransferOpen::Upload { file: begun.file, offset: 0 }).await;
            assert!(matches!(t.reply().await, Some(TransferReply::Accepted { .. })));
            // Every chunk at once, without waiting for any to be durable: the broker
            // reads them as fast as the upload takes them.
            let sender = tokio::spawn(async move {
                for i in 0..CHUNKS {
                    t.chunk((i * CHUNK) as u64, &data[i * CHUNK..(i + 1) * CHUNK], None).await;
                }
                t
            });
            within(STEP_DEADLINE, "two chunks durable", async {
                while offset_of(status(&laptop, begun.file).await.unwrap()) < 2 * CHUNK as u64 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            laptop.revoke_other_device(phone_id.device_id, tb.password).await.unwrap();
            let at_revocation = offset_of(status(&laptop, begun.file).await.unwrap());
            tokio::time::sleep(Duration::from_millis(500)).await;
            let later = status(&laptop, begun.file).await.unwrap();
            sender.abort();
            let later = match later {
                Reply::Upload(s) if !s.complete => s.offset,
                other => panic!("the upload went on after its device was revoked: {other:?}"),
            };
            if later <= at_revocation + CHUNK as u64 {
                return;
            }
            tries.push((at_revocation, later));
        }
        panic!("chunks were written after the revocation was answered in every try (offsets then, later): {tries:?}");
    })
    .await
}

/// Phones upload from links that lose packets. Through a relay that drops 5% of the
/// datagrams each way (10 ms round trip, 100 Mbit/s; `switchboard_loadtest::link`), the
/// client library's `Uploader` carries a file to completion without one retry (QUIC
/// repairs the losses; nothing at the transfer layer times out or fails), and the file
/// downloads whole and from an offset over the same link, byte for byte.
#[tokio::test]
async fn a_file_crosses_a_link_that_drops_five_percent_of_datagrams_each_way_whole_and_without_a_retry() {
    use switchboard_client::{Connector, Trust, UploadEvent, Uploader, UploaderConfig, new_upload};
    use switchboard_loadtest::link::{Link, Relay};
    bounded(async {
        let tb = TestBroker::start().await;
        let (alice, alice_id) = tb.register("alice").await;
        drop(alice);
        let broker = tb.broker.as_ref().unwrap();
        let relay = Relay::start(broker.local_addr, Link::new(5.0, 10.0, 100.0).unwrap(), 7).unwrap();
        let lossy = Connector::new(relay.addr, "localhost", Trust::CaFile(broker.cert_path.clone())).unwrap();
        let data = bytes(1024 * 1024 + 17, 9);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lift.bin");
        std::fs::write(&path, &data).unwrap();

        let mut uploader = Uploader::new(lossy, alice_id, UploaderConfig::default());
        let begun = uploader.begin(new_upload(&path, "application/octet-stream").await.unwrap()).await.unwrap();
        let mut retries = Vec::new();
        let published = uploader
            .upload(begun.file, &path, |event| {
                if let UploadEvent::Retrying { error, .. } = event {
                    retries.push(error);
                }
            })
            .await
            .unwrap();
        assert_eq!((published.file, published.size), (begun.file, data.len() as u64));
        assert!(retries.is_empty(), "the upload was interrupted: {retries:?}");

        let client = uploader.client().await.unwrap();
        let mut whole = Vec::new();
        client.download(begun.file, 0, 0, &mut whole, |_| {}).await.unwrap();
        assert_eq!(blake3::hash(&whole), blake3::hash(&data));
        let mut tail = Vec::new();
        let from = 300_001;
        client.download(begun.file, from, 0, &mut tail, |_| {}).await.unwrap();
        assert_eq!(tail, data[from as usize..]);
        let dropped = relay.drops.random.load(std::sync::atomic::Ordering::Relaxed);
        assert!(dropped > 20, "the link dropped only {dropped} datagrams");
    })
    .await
}

/// A label the type check gave bytes whose write then failed does not stay: an
/// executable sent after them is kept as declared (`application/octet-stream`). Before,
/// PNG bytes refused `STORAGE_FULL` left "image/png", recorded with the executable's
/// first write and published so (an attacker review).
#[tokio::test]
async fn a_label_from_bytes_whose_write_failed_does_not_stay() {
    bounded(async {
        let mut elf = bytes(512 * 1024, 3);
        elf[..20].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0");
        let (tb, alice, lapsed) = a_lapsed_upload_beside_held_room(&elf).await;
        let mut png = bytes(256 * 1024, 4);
        png[..33].copy_from_slice(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89");
        let mut t = Transfer::open(alice.connection(), &TransferOpen::Upload { file: lapsed, offset: 0 }).await;
        assert!(matches!(t.reply().await, Some(TransferReply::Accepted { offset: 0 })));
        t.chunk(0, &png, None).await;
        match t.reply().await {
            Some(TransferReply::Failed { error, .. }) => assert_eq!(error.code, ErrorCode::STORAGE_FULL, "{error:?}"),
            other => panic!("expected STORAGE_FULL, got {other:?}"),
        }
        tb.shared().files.pretend_free_bytes(Some(1 << 40));
        match upload_rest(alice.connection(), lapsed, &elf, 0).await {
            TransferReply::Complete(f) => assert_eq!(f.content_type, "application/octet-stream"),
            other => panic!("expected the upload complete, got {other:?}"),
        }
    })
    .await
}

/// A member's check of a widely carried file is charged every carrier it reads, not
/// only the memberships it looks at: a member of the first of ten carriers was charged 1
/// per ask for 11 reads, about a hundredth of their cost with 1,024 carriers (an
/// attacker review). Ten carriers and a burst of 100 rows: limited within 30 asks.
#[tokio::test]
async fn a_members_checks_of_a_widely_carried_file_spend_every_carrier_read() {
    bounded(async {
        let (_tb, _alice, bob, file) = a_file_in_ten_groups_with_bob().await;
        let mut limited = false;
        for _ in 0..30 {
            match file_info(&bob, file).await {
                Ok(Reply::File(_)) => {}
                other => {
                    assert_eq!(code_of(other), ErrorCode::RATE_LIMITED);
                    limited = true;
                    break;
                }
            }
        }
        assert!(limited, "30 asks of 11 reads each within a burst of 100 rows");
    })
    .await
}
