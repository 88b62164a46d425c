//! Group commits into an open log segment do not grow sled's file (the `patches/sled`
//! change in `SegmentAccountant::bump_tip`): a new segment is written once, as zeros, so
//! each commit's fdatasync writes data only, not the inode a growing file needs. And a
//! store whose file ends in zeros recovers everything it acknowledged.

#![allow(clippy::unwrap_used)]

use switchboard_protocol::{Body, Entry};
use switchboard_storage::{Store, StoreConfig};

#[tokio::test]
async fn commits_do_not_grow_the_file_and_a_zeroed_tail_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::new(dir.path().join("db"));
    let data_file = dir.path().join("db").join("db");
    let store = Store::open(&config).unwrap();
    const COMMITS: u64 = 300;
    let mut lengths = std::collections::BTreeSet::new();
    for seq in 1..=COMMITS {
        let entry = Entry {
            conv: 1,
            seq,
            sender: 1,
            sender_device: 1,
            client_id: [0; 16],
            at_ms: 0,
            body: Body::Text { text: format!("m{seq}"), edited: false },
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        // One write per commit: each is acknowledged before the next is applied.
        store.append_then(&entry, move |r| tx.send(r).unwrap()).unwrap();
        rx.await.unwrap().unwrap();
        lengths.insert(std::fs::metadata(&data_file).unwrap().len());
    }
    // Unpatched, nearly every commit made the file longer (about one length per commit).
    let (first, last) = (lengths.first().unwrap(), lengths.last().unwrap());
    assert!(lengths.len() < 10, "{} lengths in {COMMITS} commits, from {first} to {last}", lengths.len());
    // Dropped without a clean close, as after a crash: the tail of the open segment is
    // zeros, read as the end of the log.
    drop(store);
    let store = Store::open(&config).unwrap();
    assert_eq!(store.last_seq(1).unwrap(), COMMITS);
    for seq in 1..=COMMITS {
        let entry = store.entry(1, seq).unwrap().unwrap();
        assert!(matches!(&entry.body, Body::Text { text, .. } if *text == format!("m{seq}")), "{entry:?}");
    }
    store.close().unwrap();
}
