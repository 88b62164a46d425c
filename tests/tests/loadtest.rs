//! Every load scenario runs small against a real broker (in this process), and its
//! checks pass; the harness's own checker is tested in `switchboard-loadtest`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard_loadtest::report::{Cost, Report};
use switchboard_loadtest::{Common, scenario, target};
use switchboard_tests::bounded;

fn small() -> Common {
    Common { duration: Duration::from_secs(2), in_process: true, size: 64, ..Common::default() }
}

/// A broker of the harness's embedded configuration in `dir`, started apart from the
/// harness, and `small()` flags pointing the harness at it (`--target`, `--ca`).
async fn own_broker(dir: &tempfile::TempDir) -> (switchboard_broker::Broker, Common) {
    let config = target::embedded_config(dir.path().join("data"), 1);
    let broker = switchboard_broker::Broker::start(config).await.unwrap();
    let common = Common {
        in_process: false,
        target: Some(broker.local_addr.to_string()),
        ca: Some(broker.cert_path.clone()),
        ..small()
    };
    (broker, common)
}

fn assert_passed(report: &Report) {
    assert!(report.passed(), "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_small() {
    bounded(async {
        let args = scenario::fanout::Args { members: 8, senders: 2, rate: 50.0, ..Default::default() };
        let report = scenario::fanout::run(&small(), &args).await.unwrap();
        assert_passed(&report);
        assert!(report.acked >= 90, "{}", report.table());
        assert_eq!(report.delivered, report.acked * 7, "each message reaches the 7 other members");
        assert!(report.latency.count > 0 && report.latency.p99_ms > 0.0);
        // Packets per delivery, counted on the devices' connections: a delivery to a
        // member travels in a datagram to that member (several may share one), and
        // devices acknowledge what they receive.
        let per_delivery = |k: &str| report.extra.get(k).copied().unwrap_or_else(|| panic!("{k}: {}", report.table()));
        let to_devices = per_delivery("datagrams_to_devices_per_delivery");
        assert!((0.1..=5.0).contains(&to_devices), "{to_devices} datagrams to devices per delivery");
        assert!(per_delivery("datagrams_from_devices_per_delivery") > 0.0, "{}", report.table());
        assert!(per_delivery("device_ack_frames_per_delivery") > 0.0, "{}", report.table());
        // The broker runs inside the harness: its cost is the harness's, not a figure of its own.
        assert!(report.cost.broker.is_none(), "{}", report.table());
        assert!(report.table().contains("cost broker   not measured"), "{}", report.table());
        assert_cost_measured(report.cost.harness.as_ref(), &report);
    })
    .await
}

/// A broker with a process id of its own (`--target` with `--broker-pid`, here this test
/// process, so the figures also hold the harness's work) has its cost per message measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_per_message_of_a_broker_process() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (broker, common) = own_broker(&dir).await;
        let common = Common { broker_pid: Some(std::process::id()), ..common };
        let args = scenario::fanout::Args { members: 4, senders: 1, rate: 20.0, ..Default::default() };
        let report = scenario::fanout::run(&common, &args).await.unwrap();
        assert_passed(&report);
        assert_cost_measured(report.cost.broker.as_ref(), &report);
        assert_cost_measured(report.cost.harness.as_ref(), &report);
        broker.shutdown().await.unwrap();
    })
    .await
}

fn assert_cost_measured(cost: Option<&Cost>, report: &Report) {
    let table = report.table();
    let cost = cost.unwrap_or_else(|| panic!("cost not measured\n{table}"));
    assert!(cost.cpu_us_per_ack > 0.0, "{table}");
    assert!(cost.cpu_us_per_delivery.is_some_and(|us| us > 0.0), "{table}");
    // Worker threads park when idle, so some switches are voluntary.
    assert!(cost.voluntary_ctx_switches_per_ack > 0.0, "{table}");
    let sum = cost.voluntary_ctx_switches_per_ack + cost.involuntary_ctx_switches_per_ack;
    assert!((cost.ctx_switches_per_ack - sum).abs() < 1e-9, "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_small() {
    bounded(async {
        let args = scenario::direct::Args { users: 10, rate: 5.0 };
        let report = scenario::direct::run(&small(), &args).await.unwrap();
        assert_passed(&report);
        assert_eq!(report.delivered, report.acked, "each direct message reaches the one peer");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_small() {
    bounded(async {
        let args = scenario::groups::Args { users: 20, groups: 6, sizes: "2:50,5:50".into(), rate: 2.0, seed: 7 };
        let report = scenario::groups::run(&small(), &args).await.unwrap();
        assert_passed(&report);
        assert!(report.delivered > 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_small() {
    bounded(async {
        let args = scenario::storm::Args { clients: 20, concurrency: 8, hold_s: 0 };
        let report = scenario::storm::run(&small(), &args).await.unwrap();
        assert_passed(&report);
        assert_eq!(report.extra["connected"], 20.0);
        assert!(report.extra["authenticated_connections_per_s"] > 0.0);
        // About 16.5 datagrams both ways (handshake, one MTU probe each way, hellos,
        // device proof, acknowledgements); 25.5 here with quinn's four-step MTU search.
        let datagrams = report.extra["datagrams_per_connect"];
        assert!((6.0..=21.0).contains(&datagrams), "datagrams per connect: {datagrams}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_small() {
    bounded(async {
        let args = scenario::soak::Args { group_members: 4, direct_users: 4, rate: 4.0 };
        let mut common = small();
        common.duration = Duration::from_secs(3);
        let report = scenario::soak::run(&common, &args).await.unwrap();
        assert_passed(&report);
        assert!(report.extra.contains_key("drift_p99_last_ms"), "{:?}", report.extra);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_finds_a_ceiling_and_reports_steps() {
    bounded(async {
        let args = scenario::fanout::Args { members: 4, senders: 1, rate: 20.0, ..Default::default() };
        let common = Common {
            ramp: true,
            ramp_step: Duration::from_secs(1),
            ramp_factor: 4.0,
            // Generous: met at 20 msg/s even on a loaded machine (the first second of a
            // debug broker beside this binary's other tests), missed once the rate is
            // absurd.
            ramp_p99_ms: 1000.0,
            ramp_beyond: 0,
            // The first failure ends it (a repeat is `ramp_steps`' own test's).
            ramp_repeats: 0,
            ..small()
        };
        let report = scenario::fanout::run(&common, &args).await.unwrap();
        let table = report.table();
        // The run's own checks: no duplicate or reordered delivery, every message
        // answered, a sustainable rate found.
        assert_passed(&report);
        assert!(report.ramp.len() >= 2, "{table}");
        let (last, kept_up) = report.ramp.split_last().unwrap();
        assert!(!last.ok, "the ramp stops at the first step over the bound: {table}");
        assert!(kept_up.iter().all(|s| s.ok), "it stops at the first: {table}");
        for (i, step) in kept_up.iter().enumerate() {
            // Each step offers `ramp_factor` times the last, three recipients per message
            // (each step starts on a whole second, so its window holds exactly its
            // messages); a step that kept up made what it offered but what was refused
            // (up to 1% of it may be, under the ramp's rule), and with none refused it
            // made all of it.
            assert_eq!(step.offered_rate, 20.0 * 4f64.powi(i as i32), "{table}");
            assert_eq!(step.offered_deliveries_per_s, step.offered_rate * 3.0, "{table}");
            assert_eq!(step.offered_deliveries as f64, step.offered_deliveries_per_s, "{table}");
            assert!(step.delivered + 3 * step.refused <= step.offered_deliveries, "{table}");
            assert!(100 * step.delivered >= 99 * step.offered_deliveries, "{table}");
            if step.lossless {
                assert_eq!(step.delivered, step.offered_deliveries, "{table}");
                assert_eq!(step.p99_offered_ms, Some(step.p99_ms), "all made: the same p99 {table}");
            }
        }
        // The result is the fastest step that kept up.
        let best = kept_up.last().unwrap();
        assert_eq!(report.extra["ramp_max_sustained_rate_msgs_per_s"], best.offered_rate, "{table}");
        assert_eq!(report.extra["ramp_max_sustained_deliveries_per_s"], best.delivered_per_s, "{table}");
        let lossless = report.ramp.iter().take_while(|s| s.lossless).map(|s| s.delivered_per_s).reduce(f64::max);
        assert_eq!(report.extra["ramp_max_lossless_deliveries_per_s"], lossless.unwrap_or(0.0), "{table}");
    })
    .await
}

/// `direct --ramp` against a broker that admits at most 2 writes in flight: the ramp
/// goes past its first failed step (`ramp_beyond`), and past saturation the broker
/// refuses sends with `OVERLOADED` (counted as refused, not errors) while everything
/// it acknowledged is delivered, once and in order; each step reports offered against
/// achieved and what it shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_ramp_past_saturation_sheds_with_overloaded() {
    bounded(async {
        let args = scenario::direct::Args { users: 20, rate: 1.0 };
        let common = Common {
            ramp: true,
            ramp_step: Duration::from_secs(1),
            ramp_factor: 8.0,
            ramp_p99_ms: 1000.0,
            ramp_beyond: 1,
            ramp_repeats: 0,
            broker_max_sends_in_flight: Some(2),
            ..small()
        };
        let report = scenario::direct::run(&common, &args).await.unwrap();
        let table = report.table();
        assert_passed(&report);
        assert_eq!(report.lost + report.duplicated + report.out_of_order + report.errors, 0, "{table}");
        let first_failed = report.ramp.iter().position(|s| !s.ok).expect("a step failed");
        assert_eq!(report.ramp.len(), first_failed + 2, "one step beyond the first failed one: {table}");
        assert!(report.refused > 0, "{table}");
        assert_eq!(report.ramp.iter().map(|s| s.refused).sum::<u64>(), report.refused, "{table}");
        for step in &report.ramp {
            // Every send of a step is acknowledged or refused, and what was acknowledged
            // was delivered to the one peer.
            let offered = step.offered_rate * common.ramp_step.as_secs_f64();
            let acked = step.acked_per_s * common.ramp_step.as_secs_f64();
            assert_eq!(acked + step.refused as f64, offered, "{table}");
            assert_eq!(step.delivered_per_s, step.acked_per_s, "{table}");
            // A refused send is a delivery not made: the step fails past 1% of them,
            // and is lossless only with none.
            assert_eq!(step.offered_deliveries as f64, offered, "{table}");
            assert_eq!(step.delivered + step.refused, step.offered_deliveries, "{table}");
            let over_one_percent = 100 * step.delivered < 99 * step.offered_deliveries;
            assert_eq!(step.p99_offered_ms.is_none(), over_one_percent, "{table}");
            assert_eq!(step.ok, step.p99_offered_ms.is_some_and(|p| p <= 1000.0), "{table}");
            assert_eq!(step.lossless, step.refused == 0 && step.p99_ms <= 1000.0, "{table}");
        }
        assert!(table.contains("refused (OVERLOADED)"), "{table}");
    })
    .await
}

/// `--against` needs a payload that can carry sender and number: refused before anything
/// starts (no broker, no NATS server needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_nats_needs_room_for_the_message_number() {
    bounded(async {
        let args = scenario::fanout::Args {
            members: 4,
            senders: 1,
            rate: 20.0,
            against: Some("nats://127.0.0.1:4222".into()),
            nats_pid: None,
        };
        let common = Common { size: 27, ..small() };
        let err = scenario::fanout::run(&common, &args).await.unwrap_err();
        assert!(matches!(err, switchboard_loadtest::Error::InvalidArgs(_)), "{err}");
        assert!(err.to_string().contains("at least 28"), "{err}");
        let args = scenario::fanout::Args { against: None, nats_pid: Some(1), ..args };
        let err = scenario::fanout::run(&small(), &args).await.unwrap_err();
        assert!(err.to_string().contains("--nats-pid needs --against"), "{err}");
    })
    .await
}

/// A NATS server that cannot be reached fails the run at once, before the Switchboard
/// half spends its duration (here a port nothing listens on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_an_unreachable_nats_server_fails_first() {
    bounded(async {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("nats://127.0.0.1:{port}");
        let args =
            scenario::fanout::Args { members: 4, senders: 1, rate: 20.0, against: Some(url.clone()), nats_pid: None };
        let common = Common { duration: Duration::from_secs(60), ..small() };
        let started = std::time::Instant::now();
        let err = scenario::fanout::run(&common, &args).await.unwrap_err();
        assert!(matches!(&err, switchboard_loadtest::Error::Nats { url: u, .. } if *u == url), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30), "failed before the 60 s run: {:?}", started.elapsed());
    })
    .await
}

#[test]
fn plot_and_json_render() {
    let mut report = Report { scenario: "x".into(), ..Default::default() };
    report.timeline.push(switchboard_loadtest::report::Interval { t_s: 1.0, p99_ms: 2.0, ..Default::default() });
    let dir = tempfile::tempdir().unwrap();
    switchboard_loadtest::plot::write_png(&report, &dir.path().join("p.png")).unwrap();
    let png = std::fs::read(dir.path().join("p.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

/// Receipts under a message load: every reader's mark reaches every sender, timed next to
/// the message fan-out of the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_small() {
    bounded(async {
        let args = scenario::receipts::Args {
            members: 6,
            senders: 2,
            rate: 40.0,
            readers: 3,
            mark_interval: Duration::from_millis(300),
        };
        let report = scenario::receipts::run(&small(), &args).await.unwrap();
        let table = report.table();
        assert_passed(&report);
        let receipt = &report.event_latency["receipt"];
        // Each reader marks about every 300 ms for 2 s, and each mark is seen by 2 senders.
        assert!(report.extra["read_marks_made"] >= 6.0, "{table}");
        assert_eq!(report.extra["read_marks_missed"], 0.0, "{table}");
        assert_eq!(receipt.count as f64, report.extra["read_marks_made"] * 2.0, "{table}");
        assert!(receipt.p99_ms > 0.0 && report.extra["message_fanout_p99_ms"] > 0.0, "{table}");
        assert!(table.contains("receipt       p50"), "{table}");
    })
    .await
}

/// Presence and typing under a message load: every change reaches every other member
/// (or is replaced by a later one that does), timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_small() {
    bounded(async {
        let args = scenario::presence::Args {
            members: 6,
            senders: 1,
            rate: 20.0,
            flappers: 2,
            typers: 2,
            interval: Duration::from_millis(800),
        };
        let report = scenario::presence::run(&small(), &args).await.unwrap();
        let table = report.table();
        assert_passed(&report);
        for label in ["presence away", "typing"] {
            assert!(report.event_latency.get(label).is_some_and(|p| p.count > 0), "{label}: {table}");
        }
        assert_eq!(report.extra["presence_changes_missed"], 0.0, "{table}");
        assert_eq!(report.extra["typing_changes_missed"], 0.0, "{table}");
        assert!(report.extra["typing_changes_made"] >= 2.0, "{table}");
    })
    .await
}

/// A device that missed messages in two conversations catches them all up, gapless,
/// and the same entries are read from the stopped broker's store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_small() {
    bounded(async {
        let args =
            scenario::catchup::Args { messages: 2_500, convs: 2, page: 1000, fill_window: 64, offline: Duration::ZERO };
        let report = scenario::catchup::run(&small(), &args).await.unwrap();
        let table = report.table();
        assert_passed(&report);
        assert_eq!(report.delivered, 2_500, "{table}");
        // Two pages of 1000 and one of 250 per conversation at least (plus the creation entry).
        assert!(report.event_latency["catch-up page"].count >= 4, "{table}");
        assert_eq!(report.extra["catchup_entries"], 2_502.0, "each conversation's creation entry too: {table}");
        assert!(report.extra["store_read_seconds"] > 0.0, "{table}");
        assert!(report.extra["catchup_messages_per_s"] > 0.0, "{table}");
    })
    .await
}

/// The upload scenario, small: every figure is there with its limit, every transfer
/// and chat message completes (the aims are for the release run on a quiet machine and
/// are not asserted here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_small() {
    bounded(async {
        let args = scenario::upload::Args {
            file_mib: 3,
            concurrent: 6,
            concurrent_mib: 1,
            clients: 3,
            chat_rate: 50.0,
            chat_messages: 40,
            rounds: 2,
            image_mpx: 1,
        };
        let report = scenario::upload::run(&small(), &args).await.unwrap();
        let table = report.table();
        for figure in [
            "a_quinn_upload_mb_per_s",
            "a_quinn_download_mb_per_s",
            "b_fsync_append_mb_per_s",
            "c_upload_mb_per_s",
            "c_upload_over_min_a_b",
            "c_upload_over_min_a_b_lowest",
            "c_upload_over_min_a_b_highest",
            "d_download_mb_per_s",
            "d_download_over_a",
            "e_concurrent_uploads_mb_per_s",
            "f_chat_p99_ms_idle",
            "f_chat_p99_ms_during_upload",
            "f_chat_p99_ratio",
            "g_disk_sync_p99_ms_alone",
            "g_disk_sync_p99_ms_beside_appends",
            "g_disk_sync_p99_ratio",
            "h_chat_p99_ms_alone",
            "h_chat_p99_ms_beside_thumbnails",
            "h_chat_p99_ratio",
            "cpu_tick_ms_per_mb",
        ] {
            let value = report.extra.get(figure).copied();
            assert!(value.is_some_and(|v| v.is_finite() && v > 0.0), "{figure} missing or not positive: {table}");
            assert!(table.contains(figure), "{figure} not in the table: {table}");
        }
        assert_eq!(report.extra["e_concurrent_uploads_completed"], 6.0, "{table}");
        // What (a) cost is read from this process's CPU clock (10 ms ticks: 0 is possible
        // for 3 MiB). With the broker in this process, this process is not the client
        // alone, so the client's figure and the cost ratio to (a2) are left out, not
        // mislabelled.
        let both_ends = report.extra.get("a_both_ends_cpu_ms_per_mb").copied();
        assert!(both_ends.is_some_and(|v| v.is_finite() && v >= 0.0), "{table}");
        for absent in ["c_client_cpu_ms_per_mb", "c_cpu_per_mb_over_a2", "a2_server_cpu_ms_per_mb"] {
            assert!(!report.extra.contains_key(absent), "{absent} with the broker in process: {table}");
        }
        // Two rounds of (a) and (c): the median ratio lies between the two rounds'.
        assert_eq!(report.extra["c_rounds"], 2.0, "{table}");
        let (lo, mid, hi) = (
            report.extra["c_upload_over_min_a_b_lowest"],
            report.extra["c_upload_over_min_a_b"],
            report.extra["c_upload_over_min_a_b_highest"],
        );
        assert!(lo <= mid && mid <= hi, "{table}");
        for check in [
            "the single upload completed (round 1)",
            "the single upload completed (round 2)",
            "the download returned every byte",
            "every concurrent upload completed",
            "every chat message delivered",
            "an upload ran throughout the busy chat phase",
            "every chat message delivered beside thumbnails",
            "images were thumbnailed throughout the chat phase beside them",
        ] {
            let c = report.checks.iter().find(|c| c.name == check).unwrap_or_else(|| panic!("no check {check}"));
            assert!(c.ok, "{check}: {table}");
        }
        // The aims are reported beside the checks, and decide nothing (a run on a busy
        // machine failed on them before, though nothing went wrong).
        assert!(report.aims.iter().any(|c| c.name.starts_with("upload at least")), "{table}");
        assert!(report.aims.iter().any(|c| c.name.starts_with("chat p99 during")), "{table}");
        assert!(report.aims.iter().any(|c| c.name.starts_with("chat p99 beside thumbnails")), "{table}");
        // A phase shorter than one debug-build decode may see none made within it (the
        // first was made before it began): the count is there, the check decides.
        assert!(report.extra.contains_key("h_images_thumbnailed"), "{table}");
        assert!(table.contains("[aim "), "{table}");
        assert!(!report.checks.iter().any(|c| c.name.contains("aim")), "{table}");
        assert_eq!(report.delivered, 160, "{table}");
        assert!(report.event_latency["chat idle"].count == 40 && report.event_latency["chat+upload"].count == 40);
        assert_eq!(report.event_latency["chat idle (h)"].count, 40, "{table}");
        assert_eq!(report.event_latency["chat+images"].count, 40, "{table}");
        assert!(report.event_latency["disk alone"].count == 40, "{table}");
        assert!(report.event_latency["disk+appends"].count == 40, "{table}");
        // The broker runs inside the harness here: no CPU figure of its own.
        assert!(!report.extra.contains_key("c_broker_cpu_ms_per_mb"), "{table}");
    })
    .await
}

/// What a run did not see delivered is looked up in the broker's store: stored seqs are
/// found (late, not lost) and a seq the store does not have is counted as looked up and
/// not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_messages_are_looked_up_in_the_store() {
    bounded(async {
        let target =
            target::Target::in_process(target::BrokerKnobs { udp_sockets: 1, ..Default::default() }).await.unwrap();
        let pop = switchboard_loadtest::load::Population::enroll(&target, "lk", 2).await.unwrap();
        let conv = switchboard_loadtest::load::create_direct(&pop, 0, 1).await.unwrap();
        let alice = pop.client(0).await.unwrap();
        let first = alice.send(conv, "one").await.unwrap();
        let second = alice.send(conv, "two").await.unwrap();
        alice.close();
        let missing = [(conv, first, 1), (conv, second, 1), (conv, second + 1000, 1)];
        let (looked_up, stored) = switchboard_loadtest::run::look_up(&pop, &missing).await;
        assert_eq!((looked_up, stored), (3, 2), "both sent messages are stored, the invented seq is not");
    })
    .await
}

/// Against a broker it does not own, with a password queue of one, the harness's
/// registrations answered `OVERLOADED` are retried (the operator trial's `fanout --target`
/// against a default broker stopped at the first one): every user is enrolled. All come
/// from one address, whose share of the pool is one turn of the three: most refusals
/// here are that share's, the rest the queue's; the client library retries both alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_retries_a_full_password_queue() {
    bounded(async {
        let tb = switchboard_tests::TestBroker::start_with(|c| {
            c.argon2_queue = 1;
            // Hashes long enough that many at once overflow a queue of one.
            c.argon2_memory_kib = 4 * 1024;
            c.argon2_iterations = 2;
        })
        .await;
        let broker = tb.broker.as_ref().unwrap();
        let remote = target::Target::remote(
            broker.local_addr,
            "localhost",
            switchboard_client::Trust::CaFile(broker.cert_path.clone()),
            None,
        );
        let population = switchboard_loadtest::load::Population::enroll(&remote, "retry", 64).await.unwrap();
        assert_eq!(population.users.len(), 64);
        let refused = tb.shared().counters.handshake_refused_count(switchboard_protocol::ErrorCode::OVERLOADED);
        assert!(refused > 0, "the queue of one never overflowed: the test shows nothing");
    })
    .await
}

/// A broker stopped in the middle of a run fails the run with the loss said (when, how
/// many connections): before, a load tester's trial saw only a failed store look-up of
/// "0 of 0" and a timeline that stopped, and could not tell lost from late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_mid_run_fails_the_run_and_says_when() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (broker, common) = own_broker(&dir).await;
        let common = Common { duration: Duration::from_secs(4), ..common };
        let args = scenario::fanout::Args { members: 4, senders: 1, rate: 20.0, ..Default::default() };
        let stop = async {
            // Set-up (enrolling, the group) takes well under this; the measured phase
            // then runs a second or more before the stop.
            tokio::time::sleep(Duration::from_secs(3)).await;
            broker.shutdown().await.unwrap();
        };
        let (report, ()) = tokio::join!(scenario::fanout::run(&common, &args), stop);
        let report = report.unwrap();
        assert!(!report.passed(), "{}", report.table());
        assert!(report.connections_lost >= 4, "{}", report.table());
        assert!(report.first_connection_loss_s.is_some_and(|t| t > 0.0), "{}", report.table());
        let check = report.checks.iter().find(|c| c.name == "no connection to the broker lost").unwrap();
        assert!(!check.ok && check.detail.contains("the first at t="), "{check:?}");
        assert!(report.table().contains("connections lost before the run ended them"), "{}", report.table());
    })
    .await
}
