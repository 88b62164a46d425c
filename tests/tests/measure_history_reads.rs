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

use switchboard_protocol::{Page, RequestBody};
use switchboard_tests::{TestBroker, sends_beside_readers};

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
    let read = move || {
        if catch_up {
            RequestBody::CatchUp { conv: read_conv, after: 0, limit: 1000 }
        } else {
            RequestBody::History { conv: read_conv, page: Page::Latest, limit: 200 }
        }
    };
    let measured = sends_beside_readers(&bob, conv, alice, if reader { 60 } else { 0 }, read).await;
    println!("reader {reader} catch_up {catch_up} same_conv {same_conv}: {}", measured.summary("pages"));
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
