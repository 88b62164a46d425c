//! The client library's file calls and `Uploader` against a real broker (in this test
//! process, real QUIC, sled in a temp dir): uploads that survive a cut connection and a
//! broker restart, permanent failures that stop, and range downloads.

#![allow(clippy::unwrap_used)]

mod common;
use common::pseudo_random_bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_broker::Broker;
use switchboard_client::{
    Client, Connector, Identity, TransferError, Trust, UploadEvent, Uploader, UploaderConfig, new_upload,
};
use switchboard_protocol::{ErrorCode, FileId, NewUpload};
use tokio::net::UdpSocket;

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
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
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
    let broker = Broker::start(common::test_config(data_dir.clone())).await.unwrap();
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
    let broker = common::restart_on(addr, data_dir).await;

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
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
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
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
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

/// A slow uplink in front of the broker, as a phone's: a UDP relay on 127.0.0.1 that
/// forwards client datagrams at most `bytes_per_sec`, queueing up to `queue` of them and
/// dropping the rest (a router's drop-tail queue); the broker's datagrams go back
/// unthrottled. Each client address gets its own upstream socket. It runs on a thread
/// and runtime of its own, so the test's busy runtime does not slow the link further.
/// Dropping it stops the relay.
struct SlowUplink {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SlowUplink {
    fn start(broker: SocketAddr, bytes_per_sec: u64, queue: usize) -> SlowUplink {
        let front = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let front = Arc::new(UdpSocket::from_std(front).unwrap());
                tokio::select! {
                    _ = stopped => {}
                    _ = relay(front, broker, bytes_per_sec, queue) => {}
                }
            });
        });
        SlowUplink { addr, stop: Some(stop) }
    }
}

async fn relay(front: Arc<UdpSocket>, broker: SocketAddr, bytes_per_sec: u64, queue: usize) {
    let (to_broker, mut bottleneck) = tokio::sync::mpsc::channel::<(Arc<UdpSocket>, Vec<u8>)>(queue);
    // The bottleneck: one datagram at a time, each taking its bytes' share of a second.
    // A timer that wakes late does not cost the link its time; a link left idle does.
    tokio::spawn(async move {
        let mut free_at = tokio::time::Instant::now();
        while let Some((upstream, datagram)) = bottleneck.recv().await {
            let now = tokio::time::Instant::now();
            if free_at + Duration::from_millis(50) < now {
                free_at = now;
            }
            free_at += Duration::from_secs_f64(datagram.len() as f64 / bytes_per_sec as f64);
            tokio::time::sleep_until(free_at).await;
            let _ = upstream.send(&datagram).await;
        }
    });
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // An error (an ICMP message about some earlier datagram) ends nothing.
        let Ok((n, client)) = front.recv_from(&mut buf).await else { continue };
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                upstream.connect(broker).await.unwrap();
                let (back, front) = (upstream.clone(), front.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        if let Ok(n) = back.recv(&mut buf).await {
                            let _ = front.send_to(&buf[..n], client).await;
                        }
                    }
                });
                upstreams.insert(client, upstream.clone());
                upstream
            }
        };
        // A full queue drops the datagram; QUIC's loss recovery sends it again.
        let _ = to_broker.try_send((upstream, buf[..n].to_vec()));
    }
}

impl Drop for SlowUplink {
    fn drop(&mut self) {
        // The relay's thread ends, and its runtime with every task on it.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An upload over an uplink slower than the broker's lease rate
/// (`MIN_CHUNK_BYTES_PER_SEC`, 64 KiB/s) while another user's uploads wait for the whole
/// chunk budget: the broker takes each slow chunk's bytes for them (`CHUNK_TOO_SLOW`),
/// the uploader halves its chunks until one arrives within its lease, and the upload
/// completes with the right bytes while the other user's uploads keep completing. With
/// a fixed chunk size it never completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_over_a_slow_uplink_shrinks_its_chunks_until_they_arrive_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path().join("data"));
    // Only the lease takes a slow chunk's bytes, not the stream's progress deadline.
    config.transfer_progress_secs = 600;
    // One chunk's buffer over all streams.
    config.transfer_buffer_bytes = 1;
    let broker = Broker::start(config).await.unwrap();
    let (_, identity) = register(&broker, "bob").await;
    let (alice, _) = register(&broker, "alice").await;
    // At 34 KiB/s a chunk falls behind the lease (64 KiB/s after a 2 s grace) about
    // 4.3 s after its header unless it is at most ~145 KiB: 256 KiB chunks fail while
    // the link gives less than ~42 KiB/s, 64 KiB ones arrive in time while it gives at
    // least ~21 KiB/s (128 KiB ones at least ~32 KiB/s, so either may be where it ends).
    let uplink = SlowUplink::start(broker.local_addr, 34 * 1024, 8);
    let data = pseudo_random_bytes(192 * 1024, 7);
    let path = write(dir.path(), "slow.bin", &data);
    let connector = Connector::new(uplink.addr, "localhost", Trust::CaFile(broker.cert_path.clone())).unwrap();
    let mut uploader = Uploader::new(connector, identity, UploaderConfig { chunk_bytes: 256 * 1024, ..fast() });
    let status =
        within("begin", uploader.begin(new_upload(&path, "application/octet-stream").await.unwrap())).await.unwrap();

    // Alice uploads 1 MiB files in one chunk each, one after another: each chunk needs the
    // whole budget, and she asks for it again as soon as she has had it.
    let stop = Arc::new(AtomicBool::new(false));
    let competing = tokio::spawn({
        let stop = stop.clone();
        let mut theirs = pseudo_random_bytes(1024 * 1024, 100);
        async move {
            let mut completed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Other bytes each time: content addressing would skip a known file.
                theirs[..8].copy_from_slice(&completed.to_le_bytes());
                let new = NewUpload {
                    name: "theirs.bin".into(),
                    size: theirs.len() as u64,
                    content_type: "application/octet-stream".into(),
                    blake3: *blake3::hash(&theirs).as_bytes(),
                };
                let file = match alice.begin_upload(new).await {
                    Ok(status) => status.file,
                    Err(e) => return Err(format!("alice's upload {completed} was refused: {e}")),
                };
                let chunk = AtomicU32::new(1024 * 1024);
                let mut source = std::io::Cursor::new(&theirs[..]);
                if let Err(e) = alice.upload_chunked(file, 0, &mut source, &chunk, |_| {}).await {
                    return Err(format!("alice's upload {completed} failed: {e}"));
                }
                completed += 1;
            }
            Ok(completed)
        }
    });

    let events = Arc::new(Mutex::new(Vec::new()));
    let log = events.clone();
    let published =
        within("the slow upload", uploader.upload(status.file, &path, |e| log.lock().unwrap().push(e))).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let theirs = within("alice's uploads", competing).await.unwrap().unwrap();
    assert_eq!(published.size, data.len() as u64);
    let client = uploader.client().await.unwrap();
    assert_eq!(download_all(&client, status.file).await, data);
    let events = events.lock().unwrap().clone();
    let too_slow = events
        .iter()
        .filter(|e| matches!(e, UploadEvent::Retrying { code: Some(ErrorCode::CHUNK_TOO_SLOW), .. }))
        .count();
    assert!(too_slow >= 1, "no chunk was too slow: {events:?}");
    // Nothing of a 256 KiB chunk arrived: the first durable offset is a smaller chunk's.
    let first_durable = events.iter().find_map(|e| match e {
        UploadEvent::Durable { offset, .. } => Some(*offset),
        _ => None,
    });
    assert!(first_durable.is_some_and(|o| o <= 128 * 1024), "{events:?}");
    assert!(theirs >= 1, "alice's uploads waited throughout");
    drop(uplink);
    broker.shutdown().await.unwrap();
}

/// A connect to an address where no broker answers gives up at the connect timeout with
/// an error naming the address, instead of waiting out the idle timeout (30 s).
#[tokio::test]
async fn a_silent_address_fails_at_the_connect_timeout_naming_it() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let options = switchboard_client::TransportOptions {
        connect_timeout: Duration::from_millis(300),
        ..switchboard_client::TransportOptions::default()
    };
    let connector = Connector::with_transport(addr, "localhost", Trust::Pin("00".repeat(32)), &options).unwrap();
    let started = std::time::Instant::now();
    let Err(error) = within("a connect", connector.register("alice", "correct horse battery", "laptop")).await else {
        panic!("connected to a silent address");
    };
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert!(error.to_string().contains(&format!("no broker answered at {addr}")), "{error}");
}
