//! Resumable file streams end to end (PROTOCOL.md section 12): uploads that survive a
//! dropped connection and a broker restart, every refusal with its own code and nothing
//! published, who may read a file, range downloads, expiry, shared blobs, and many
//! uploads at once. Real broker, real QUIC, real disk.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_client::Client;
use switchboard_protocol::{
    Body, ErrorCode, FileId, FileState, NewUpload, Page, Reply, RequestBody, TransferOpen, TransferReply,
};
use switchboard_tests::{
    STEP_DEADLINE, TestBroker, Transfer, begin_upload, bounded, download, next_entry, upload_range, upload_rest, within,
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
