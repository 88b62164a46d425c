//! A group commit does not hand its write to sled's I/O threads (the `patches/sled`
//! change in `make_stable`). Its own process: sled's I/O pool is process-wide, so other
//! tests' flushes would be counted too.
//!
//! Linux only: it counts context switches per thread in `/proc/self/task`.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use switchboard_storage::{Store, StoreConfig};

/// Voluntary context switches of all of sled's I/O threads (`sled-io-*`) so far.
fn sled_io_switches() -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !name.starts_with("sled-io") {
            continue;
        }
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:"));
        total += line.and_then(|l| l.split_whitespace().nth(1)).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

#[tokio::test]
async fn group_commits_do_not_wake_sleds_io_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreConfig::new(dir.path().join("db"))).unwrap();
    const COMMITS: u64 = 300;
    let append = |seq: u64| {
        let entry = common::text_entry(seq, format!("m{seq}"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.append_then(&entry, move |r| tx.send(r).unwrap()).unwrap();
        rx
    };
    // Warm up: the pool's threads start on its first job.
    append(1).await.unwrap().unwrap();
    let before = sled_io_switches();
    for seq in 2..COMMITS + 2 {
        // One write per commit: each is acknowledged before the next is applied.
        append(seq).await.unwrap().unwrap();
    }
    let woken = sled_io_switches() - before;
    // Unpatched, each commit's flush sealed a log buffer and queued its write on the pool
    // (one wakeup per commit with `notify_one`, seven with sled's `notify_all`).
    assert!(woken < COMMITS / 10, "sled's I/O threads were woken {woken} times in {COMMITS} commits");
    store.close().unwrap();
}
