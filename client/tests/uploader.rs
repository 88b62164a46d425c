//! The client library's file calls and `Uploader` against a real broker (in this test
//! process, real QUIC, sled in a temp dir): uploads that survive a cut connection and a
//! broker restart, permanent failures that stop, and range downloads.

#![allow(clippy::unwrap_used)]

mod common;
use common::pseudo_random_bytes;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_broker::{Broker, Config};
use switchboard_client::{
    Client, Connector, Identity, TransferError, Trust, UploadEvent, Uploader, UploaderConfig, new_upload,
};
use switchboard_protocol::{ErrorCode, FileId};

/// Every test step ends within this, or the test fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(120);

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(DEADLINE, fut).await.unwrap_or_else(|_| panic!("{what} took over {DEADLINE:?}"))
}

fn connector(broker: &Broker) -> Connector {
    Connector::new(broker.local_addr, "localhost", Trust::CaFile(broker.cert_path.clone())).unwrap()
}

fn write(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

async fn download_all(client: &Client, file: FileId) -> Vec<u8> {
    let mut out = Vec::new();
    let range = client.download(file, 0, 0, &mut out, |_| {}).await.unwrap();
    assert_eq!(range.length as usize, out.len());
    out
}

fn fast() -> UploaderConfig {
    UploaderConfig { backoff_min_ms: 50, backoff_max_ms: 500, ..UploaderConfig::default() }
}

async fn register(broker: &Broker, name: &str) -> (Client, Identity) {
    connector(broker).register(name, "correct horse battery", "test").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_from_the_durable_offset() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
    let (alice, identity) = register(&broker, "alice").await;
    let data = pseudo_random_bytes(6 * 1024 * 1024 + 123, 1);
    let path = write(dir.path(), "big.bin", &data);

    let mut uploader = Uploader::new(connector(&broker), identity, fast());
    let status =
        within("begin", uploader.begin(new_upload(&path, "application/octet-stream").await.unwrap())).await.unwrap();
    assert_eq!((status.offset, status.size), (0, data.len() as u64));
    // The first durable offset cuts the uploader's connection from under it.
    let first = uploader.client().await.unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let mut cut_at = None;
    let published = within(
        "the upload",
        uploader.upload(status.file, &path, |event| {
            if let UploadEvent::Durable { offset, .. } = event
                && cut_at.is_none()
            {
                cut_at = Some(offset);
                first.close();
            }
            log.lock().unwrap().push(event);
        }),
    )
    .await
    .unwrap();
    assert_eq!(published.size, data.len() as u64);
    let cut_at = cut_at.expect("a chunk was durable before the cut");
    assert!(cut_at > 0 && cut_at < data.len() as u64, "cut at {cut_at}");

    let events = events.lock().unwrap().clone();
    assert!(
        events.iter().any(|e| matches!(e, UploadEvent::Retrying { reconnect: true, .. })),
        "it reconnected: {events:?}"
    );
    // It continued where the broker's durable bytes ended, never before the cut.
    let resumed: Vec<u64> = events
        .iter()
        .filter_map(|e| if let UploadEvent::Resumed { offset, .. } = e { Some(*offset) } else { None })
        .collect();
    assert_eq!(resumed[0], 0, "{events:?}");
    assert!(resumed.len() >= 2 && resumed[1] >= cut_at, "resumed at {resumed:?} after a cut at {cut_at}");

    assert_eq!(download_all(&alice, status.file).await, data, "the published bytes are the file's");
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_survives_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let broker = Broker::start(Config::ephemeral(data_dir.clone())).await.unwrap();
    let addr = broker.local_addr;
    let (_alice, identity) = register(&broker, "alice").await;
    let data = pseudo_random_bytes(12 * 1024 * 1024 + 5, 2);
    let path = write(dir.path(), "big.bin", &data);

    let mut uploader = Uploader::new(connector(&broker), identity.clone(), fast());
    let status = uploader.begin(new_upload(&path, "application/octet-stream").await.unwrap()).await.unwrap();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let task = {
        let path = path.clone();
        tokio::spawn(async move {
            let mut first_tx = Some(first_tx);
            uploader
                .upload(status.file, &path, move |event| {
                    if matches!(event, UploadEvent::Durable { offset, .. } if offset > 0)
                        && let Some(tx) = first_tx.take()
                    {
                        let _ = tx.send(());
                    }
                    log.lock().unwrap().push(event);
                })
                .await
        })
    };
    within("the first durable chunk", first_rx).await.unwrap();
    within("the broker shutdown", broker.shutdown()).await.unwrap();
    let restarted = events.lock().unwrap().len();
    let broker = within("the broker restart", Broker::start(Config { listen: addr, ..Config::ephemeral(data_dir) }))
        .await
        .unwrap();

    let published = within("the upload", task).await.unwrap().unwrap();
    assert_eq!(published.size, data.len() as u64);
    let events = events.lock().unwrap().clone();
    let after = &events[restarted..];
    assert!(
        after.iter().any(|e| matches!(e, UploadEvent::Resumed { offset, .. } if *offset > 0)),
        "it resumed from a durable offset after the restart: {after:?}"
    );
    let alice = connector(&broker).connect(&identity).await.unwrap();
    assert_eq!(download_all(&alice, status.file).await, data);
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_stop_the_uploader() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
    let (alice, identity) = register(&broker, "alice").await;
    let declared = write(dir.path(), "declared.bin", &pseudo_random_bytes(300_000, 3));
    let other = write(dir.path(), "other.bin", &pseudo_random_bytes(300_000, 4));

    // The bytes sent are not the bytes declared: HASH_MISMATCH, once, no retry.
    let mut uploader = Uploader::new(connector(&broker), identity.clone(), fast());
    let status = uploader.begin(new_upload(&declared, "application/octet-stream").await.unwrap()).await.unwrap();
    let mut retries = 0;
    let failed = within(
        "the mismatched upload",
        uploader.upload(status.file, &other, |e| retries += u32::from(matches!(e, UploadEvent::Retrying { .. }))),
    )
    .await
    .unwrap_err();
    assert_eq!(failed.code(), Some(ErrorCode::HASH_MISMATCH), "{failed}");
    assert_eq!(retries, 0);
    assert_eq!(alice.upload_status(status.file).await.unwrap_err().code(), Some(ErrorCode::NOT_FOUND));

    // A cancelled upload is gone: NOT_FOUND stops it.
    let status = uploader.begin(new_upload(&declared, "application/octet-stream").await.unwrap()).await.unwrap();
    alice.cancel_upload(status.file).await.unwrap();
    let failed = within("the cancelled upload", uploader.upload(status.file, &declared, |_| {})).await.unwrap_err();
    assert_eq!(failed.code(), Some(ErrorCode::NOT_FOUND), "{failed}");

    // A local file of another size than declared is refused before sending.
    let status = uploader.begin(new_upload(&declared, "application/octet-stream").await.unwrap()).await.unwrap();
    let short = write(dir.path(), "short.bin", &pseudo_random_bytes(1000, 5));
    let failed = uploader.upload(status.file, &short, |_| {}).await.unwrap_err();
    assert!(matches!(failed, TransferError::Mismatch(_)), "{failed}");
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_downloads_return_exactly_the_requested_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
    let (alice, identity) = register(&broker, "alice").await;
    let data = pseudo_random_bytes(2 * 1024 * 1024 + 777, 6);
    let path = write(dir.path(), "f.bin", &data);
    let mut uploader = Uploader::new(connector(&broker), identity, fast());
    let status = uploader.begin(new_upload(&path, "application/octet-stream").await.unwrap()).await.unwrap();
    // Not readable before it is complete.
    let early = alice.download(status.file, 0, 0, &mut Vec::new(), |_| {}).await.unwrap_err();
    assert_eq!(early.code(), Some(ErrorCode::NOT_READY), "{early}");
    within("the upload", uploader.upload(status.file, &path, |_| {})).await.unwrap();
    let size = data.len() as u64;

    let check = |offset: u64, length: u64, expected: std::ops::Range<usize>| {
        let (alice, data) = (&alice, &data);
        async move {
            let mut out = Vec::new();
            let range = alice.download(status.file, offset, length, &mut out, |_| {}).await.unwrap();
            assert_eq!((range.offset, range.length, range.size), (offset, expected.len() as u64, size));
            assert_eq!(out, data[expected.clone()], "offset {offset} length {length}");
        }
    };
    check(0, 0, 0..data.len()).await;
    check(1000, 5000, 1000..6000).await;
    check(1024 * 1024 - 3, 10, 1024 * 1024 - 3..1024 * 1024 + 7).await;
    // Past the end is cut at the end; 0 reads to the end.
    check(size - 10, 100, data.len() - 10..data.len()).await;
    check(size - 10, 0, data.len() - 10..data.len()).await;
    let past = alice.download(status.file, size + 1, 1, &mut Vec::new(), |_| {}).await.unwrap_err();
    assert_eq!(past.code(), Some(ErrorCode::INVALID), "{past}");

    // Someone who may not read it learns nothing: the same answer as for no file at all.
    let (bob, _) = register(&broker, "bob").await;
    let hidden = bob.download(status.file, 0, 0, &mut Vec::new(), |_| {}).await.unwrap_err();
    let missing = bob.download([0x42; 16], 0, 0, &mut Vec::new(), |_| {}).await.unwrap_err();
    assert_eq!(hidden.code(), Some(ErrorCode::NOT_FOUND), "{hidden}");
    assert_eq!(hidden.to_string(), missing.to_string());
    broker.shutdown().await.unwrap();
}
