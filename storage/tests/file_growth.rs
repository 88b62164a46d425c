//! Group commits into an open log segment do not grow sled's file (the `patches/sled`
//! change in `SegmentAccountant::bump_tip`): a new segment is written once, as zeros, so
//! each commit's fdatasync writes data only, not the inode a growing file needs. And a
//! store whose file ends in zeros recovers everything it acknowledged and goes on.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

mod common;

use switchboard_protocol::Body;
use switchboard_storage::{Store, StoreConfig};

/// Appends entries `seqs` of conversation 1, each in a commit of its own (acknowledged
/// before the next is applied), with a 4 KiB text; returns the file lengths seen after
/// each commit.
async fn append_one_by_one(store: &Store, data_file: &Path, seqs: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    let mut lengths = Vec::new();
    for seq in seqs {
        let entry = common::text_entry(seq, text(seq));
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.append_then(&entry, move |r| tx.send(r).unwrap()).unwrap();
        rx.await.unwrap().unwrap();
        lengths.push(std::fs::metadata(data_file).unwrap().len());
    }
    lengths
}

fn text(seq: u64) -> String {
    format!("{seq:>4096}")
}

fn assert_all_there(store: &Store, last: u64) {
    assert_eq!(store.last_seq(1).unwrap(), last);
    for seq in 1..=last {
        let entry = store.entry(1, seq).unwrap().unwrap();
        assert!(matches!(&entry.body, Body::Text { text: t, .. } if *t == text(seq)), "seq {seq}");
    }
}

#[tokio::test]
async fn commits_do_not_grow_the_file_and_a_zeroed_tail_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig::new(dir.path().join("db"));
    let data_file = dir.path().join("db").join("db");
    let store = Store::open(&config).unwrap();
    // 300 commits of 4 KiB and more each: over 1.2 MB of log, so sled opens new 512 KiB
    // segments at the end of the file while commits go on.
    const COMMITS: u64 = 300;
    let lengths = append_one_by_one(&store, &data_file, 1..=COMMITS).await;
    let grown = lengths.windows(2).filter(|w| w[1] != w[0]).count();
    let (first, last) = (lengths[0], lengths[lengths.len() - 1]);
    assert!(last >= first + 1024 * 1024, "segments were opened: {first} to {last} bytes");
    // Unpatched, every commit made the file longer (300 lengths in 300 commits); now
    // only opening a segment does.
    assert!(grown < 10, "the file grew at {grown} of {COMMITS} commits, {first} to {last} bytes");
    store.close().unwrap();
    drop(store);

    // A file that ends in zeros, a whole segment and a part of one, as after a crash
    // between writing a new segment's zeros and its first message.
    let mut file = std::fs::OpenOptions::new().append(true).open(&data_file).unwrap();
    file.write_all(&vec![0u8; 512 * 1024 + 1000]).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let store = Store::open(&config).unwrap();
    assert_all_there(&store, COMMITS);
    // And the log goes on from there, and recovers again.
    append_one_by_one(&store, &data_file, COMMITS + 1..=COMMITS + 50).await;
    drop(store);
    let store = Store::open(&config).unwrap();
    assert_all_there(&store, COMMITS + 50);
    store.close().unwrap();
}
