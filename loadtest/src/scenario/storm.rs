//! `storm`: C enrolled devices connect and authenticate as fast as the broker allows.
//! Reports time until all are connected, authenticated connections per second, connect
//! latency, datagrams per connect, and the broker's memory per idle connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::load::Population;
use crate::report::{Percentiles, Report};
use crate::resources::{Sampler, rss_mib};
use crate::scenario::params;
use crate::{CLOSING_WAIT, Common, run_tag};

/// Time after its connect when a connection's datagrams are counted: its MTU probes are
/// answered by then, and no keep-alive (10 s idle) has begun.
const CONNECT_SETTLES: Duration = Duration::from_secs(1);

/// `storm` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Devices that connect.
    #[arg(long, default_value_t = 2000, value_parser = crate::parse_count)]
    pub clients: usize,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256, value_parser = crate::parse_count)]
    pub concurrency: usize,
    /// Seconds to hold the connections idle before measuring memory.
    #[arg(long, default_value_t = 3)]
    pub hold_s: u64,
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> crate::Result<Report> {
    common.refuse_rate_flags("storm", "connects --clients at once")?;
    let target = common.target().await?;
    let pop = Arc::new(Population::enroll(&target, &run_tag(), args.clients).await?);
    // Memory is measured on the broker's own process; in-process it includes the
    // harness's client side, and a remote broker without --broker-pid is not measured.
    let pid = match (target.pid, target.is_in_process()) {
        (Some(p), _) => Some(p.to_string()),
        (None, true) => Some("self".to_owned()),
        (None, false) => None,
    };
    let rss = |pid: &Option<String>| pid.as_deref().and_then(rss_mib).unwrap_or(0.0);
    let broker = target.pid.map(|p| Sampler::start(p.to_string(), Duration::from_secs(1)));
    let harness = Sampler::start("self".into(), Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss(&pid);

    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let (pop, slots) = (pop.clone(), slots.clone());
        set.spawn(async move {
            let slot = slots.acquire_owned().await;
            let t = Instant::now();
            let raw = pop.connector(i).connect_raw(&pop.users[i]).await;
            let (took, done_at) = (t.elapsed(), Instant::now());
            drop(slot);
            // Every datagram of the connect, both ways, as its client counts them: the
            // QUIC handshake, the MTU probes (a round trip or two after it), the hellos,
            // the device proof and the acknowledgements; counted before any keep-alive
            // (10 s idle).
            tokio::time::sleep(CONNECT_SETTLES).await;
            let datagrams = raw.as_ref().map_or(0, |r| {
                let stats = r.conn.stats();
                stats.udp_tx.datagrams + stats.udp_rx.datagrams
            });
            (took, done_at, raw, datagrams)
        });
    }
    let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut sessions = Vec::with_capacity(args.clients);
    let (mut errors, mut datagrams, mut last_done) = (0u64, 0u64, start);
    while let Some(done) = set.join_next().await {
        match done {
            Ok((t, done_at, Ok(raw), sent_and_received)) => {
                let _ = latency.record((t.as_micros() as u64).max(1));
                sessions.push(raw);
                datagrams += sent_and_received;
                last_done = last_done.max(done_at);
            }
            Ok((_, done_at, Err(e), _)) => {
                last_done = last_done.max(done_at);
                errors += 1;
                tracing::warn!(error = %e, "connect failed");
            }
            Err(e) => {
                errors += 1;
                tracing::warn!(error = %e, "connect task failed");
            }
        }
    }
    let elapsed = (last_done - start).as_secs_f64();
    tokio::time::sleep(Duration::from_secs(args.hold_s)).await;
    let rss_after = rss(&pid);
    let connected = sessions.len();
    for s in &sessions {
        s.conn.close(0u32.into(), b"done");
    }
    drop(sessions);
    pop.wait_idle(CLOSING_WAIT).await;

    let mut report = Report {
        scenario: "storm".into(),
        command: common.command.clone(),
        params: params([
            ("clients", args.clients.to_string()),
            ("concurrency", args.concurrency.to_string()),
            ("broker", target.describe()),
        ]),
        duration_s: elapsed,
        errors,
        latency: Percentiles::from_us(&latency),
        latency_label: "connect".into(),
        broker: broker.as_ref().map(|b| b.summary(0.0)),
        harness: harness.summary(0.0),
        ..Report::default()
    };
    let per_conn_kib = (rss_after - rss_before) * 1024.0 / connected.max(1) as f64;
    match (target.pid, target.is_in_process()) {
        (Some(_), _) => {
            report.extra.insert("broker_kib_per_idle_connection".into(), per_conn_kib);
            report.extra.insert("broker_rss_before_mib".into(), rss_before);
            report.extra.insert("broker_rss_connected_mib".into(), rss_after);
        }
        (None, true) => {
            report.extra.insert("process_kib_per_connection_incl_harness".into(), per_conn_kib);
        }
        (None, false) => {}
    }
    // The price of one connect in packets, which transfers between machines where CPU
    // time does not (docs/benchmarks.md, "MTU probes").
    report.extra.insert("datagrams_per_connect".into(), datagrams as f64 / connected.max(1) as f64);
    report.extra.insert("connected".into(), connected as f64);
    report.extra.insert("seconds_to_all_connected".into(), elapsed);
    report.extra.insert("authenticated_connections_per_s".into(), connected as f64 / elapsed.max(1e-9));
    report.check("every device connected", connected == args.clients, format!("{connected} of {}", args.clients));
    target.stop().await?;
    Ok(report)
}
