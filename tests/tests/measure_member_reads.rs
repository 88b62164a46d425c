//! A measurement, run by hand (docs/benchmarks.md, "Reads that list members"): the
//! latency of one member's messages in a 1,000-member group while another member loops
//! on `Members` (60 in flight), with the member-rows allowance at its default and
//! effectively off. Prints; asserts nothing about time.
//!
//! ```sh
//! cargo test --release -p switchboard-tests --test measure_member_reads -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchboard_protocol::{RequestBody, Role};
use switchboard_tests::TestBroker;

const OFF: u32 = 2_000_000_000;

async fn run(member_rows_per_sec: u32, reader: bool) {
    let tb = TestBroker::start_with(|c| c.member_rows_per_sec = member_rows_per_sec).await;
    let alice = Arc::new(tb.register("alice").await.0);
    let (bob, _) = tb.register("bob").await;
    let mut names = Vec::new();
    for i in 0..998 {
        names.push(format!("m{i}"));
        tb.register(&names[i]).await.0.close();
    }
    let conv = alice.create_group("big", &["bob".to_string()]).await.unwrap().id;
    for chunk in names.chunks(250) {
        alice.add_members(conv, chunk, Role::Member).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (served, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut loops = Vec::new();
    for _ in 0..if reader { 60 } else { 0 } {
        let (alice, stop, served, refused) = (alice.clone(), stop.clone(), served.clone(), refused.clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let counter =
                    if alice.request(RequestBody::Members { conv }).await.is_ok() { &served } else { &refused };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (start, mut ms) = (Instant::now(), Vec::new());
    for i in 0..300 {
        let t = Instant::now();
        bob.send(conv, &format!("m{i}")).await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let secs = start.elapsed().as_secs_f64() + 0.5;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    ms.sort_by(f64::total_cmp);
    let (served, refused) = (served.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    let allowance = if member_rows_per_sec == OFF { "off".to_string() } else { member_rows_per_sec.to_string() };
    println!(
        "member_rows_per_sec {allowance}, reader {reader}: send p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         Members served {served} ({:.0}/s), refused {refused}",
        ms[ms.len() / 2],
        ms[ms.len() * 99 / 100],
        ms[ms.len() - 1],
        served as f64 / secs,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand in release mode"]
async fn members_loop_beside_chat() {
    run(switchboard_broker::limits::MEMBER_ROWS_PER_SEC, false).await;
    for _ in 0..2 {
        run(OFF, true).await;
        run(switchboard_broker::limits::MEMBER_ROWS_PER_SEC, true).await;
    }
}
