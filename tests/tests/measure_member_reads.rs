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

use switchboard_protocol::{RequestBody, Role};
use switchboard_tests::{TestBroker, sends_beside_readers};

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
    let measured =
        sends_beside_readers(&bob, conv, alice, if reader { 60 } else { 0 }, move || RequestBody::Members { conv })
            .await;
    let allowance = if member_rows_per_sec == OFF { "off".to_string() } else { member_rows_per_sec.to_string() };
    println!("member_rows_per_sec {allowance}, reader {reader}: {}", measured.summary("Members"));
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
