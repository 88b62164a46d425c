//! A snapshot whose write did not finish (a `snap.*.generating` file left by a crash or a
//! full disk) does not keep the store from opening (the `patches/sled` change in
//! `read_snapshot`): before it, sled took the leftover for the newest snapshot, found it
//! empty or cut short, and refused to open the database on every start until someone
//! deleted the file by hand (a live attack that filled the disk, stop 54).

#![allow(clippy::unwrap_used)]

mod common;

use switchboard_protocol::Body;
use switchboard_storage::{Store, StoreConfig};

fn open(dir: &std::path::Path) -> Store {
    let mut config = StoreConfig::new(dir);
    config.cache_capacity_bytes = 4 * 1024 * 1024;
    Store::open(&config).unwrap()
}

async fn append(store: &Store, seq: u64) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    store.append_then(&common::text_entry(seq, format!("message {seq}")), move |r| tx.send(r).unwrap()).unwrap();
    rx.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unfinished_snapshot_is_skipped_and_everything_acknowledged_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = open(&path);
    for seq in 1..=50 {
        append(&store, seq).await;
    }
    store.close().unwrap();
    drop(store);
    // What a write cut short leaves: one empty, after the newest position there is, and
    // one cut after a few bytes at the position of the finished one (if sled made one).
    std::fs::write(path.join("snap.FFFFFFFFFFFFFFF0.generating"), b"").unwrap();
    let finished: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("snap.") && !name.ends_with(".generating"))
        .collect();
    if let Some(name) = finished.first() {
        let bytes = std::fs::read(path.join(name)).unwrap();
        std::fs::write(path.join(format!("{name}.generating")), &bytes[..bytes.len().min(7)]).unwrap();
    }
    let store = open(&path);
    assert_eq!(store.last_seq(1).unwrap(), 50);
    for seq in 1..=50 {
        let entry = store.entry(1, seq).unwrap().unwrap();
        assert!(matches!(&entry.body, Body::Text { text, .. } if *text == format!("message {seq}")), "seq {seq}");
    }
    // And it goes on.
    append(&store, 51).await;
    store.close().unwrap();
    drop(store);
    assert_eq!(open(&path).last_seq(1).unwrap(), 51);
}
