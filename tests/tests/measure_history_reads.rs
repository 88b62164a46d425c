//! A measurement, run by hand: the latency of one member's messages in a group while
//! another member loops on `History` pages of 200 entries of 4 KiB, or on catch-up
//! pages from seq 0 (60 in flight: the broker keeps room in the reader's outbound queue
//! for their answers, PROTOCOL section 7), of that group or, as the control that shares
//! only the CPU, of another. Prints; asserts nothing about time.
//!
//! ```sh
//! cargo test --release -p switchboard-tests --test measure_history_reads -- --ignored --nocapture
//! ```

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchboard_protocol::{Page, RequestBody};
use switchboard_tests::TestBroker;

async fn run(reader: bool, catch_up: bool, same_conv: bool) {
    let tb = TestBroker::start().await;
    let alice = Arc::new(tb.register("alice").await.0);
    let (bob, _) = tb.register("bob").await;
    let conv = alice.create_group("big", &["bob".to_string()]).await.unwrap().id;
    // The control: the same reads from another conversation, so only CPU is shared.
    let read_conv = if same_conv { conv } else { alice.create_group("other", &[]).await.unwrap().id };
    let text = "x".repeat(4096);
    for _ in 0..400 {
        alice.send(read_conv, &text).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (served, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut loops = Vec::new();
    for _ in 0..if reader { 60 } else { 0 } {
        let (alice, stop, served, refused) = (alice.clone(), stop.clone(), served.clone(), refused.clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let body = if catch_up {
                    RequestBody::CatchUp { conv: read_conv, after: 0, limit: 1000 }
                } else {
                    RequestBody::History { conv: read_conv, page: Page::Latest, limit: 200 }
                };
                match alice.request(body).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if refused.fetch_add(1, Ordering::Relaxed) == 0 {
                            println!("refused: {e}");
                        }
                        1
                    }
                };
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
    println!(
        "reader {reader} catch_up {catch_up} same_conv {same_conv}: send p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         pages served {served} ({:.0}/s), refused {refused}",
        ms[ms.len() / 2],
        ms[ms.len() * 99 / 100],
        ms[ms.len() - 1],
        served as f64 / secs,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand in release mode"]
async fn history_loop_beside_chat() {
    for _ in 0..2 {
        run(false, false, true).await;
        for same_conv in [true, false] {
            run(true, false, same_conv).await;
            run(true, true, same_conv).await;
        }
    }
}
