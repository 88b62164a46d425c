//! `fanout --against nats://HOST:PORT`: the `fanout` workload, in the same run, against
//! a running NATS server's core pub/sub (no JetStream). The harness never starts or
//! downloads NATS.
//!
//! Each member is one NATS connection subscribed to one subject of its own run
//! (`switchboard-load.TAG.fanout`), so a message reaches every member. Connections say
//! `no_echo`, so a sender does not get its own messages back: M-1 deliveries per message,
//! as in a Switchboard group. The first `senders` members publish on the same open-loop
//! schedule as `fanout` (evenly spaced from a whole second, everything due sent at once
//! when behind), and latency runs from the scheduled send time carried in the payload
//! to the subscriber's read, into the same HdrHistograms. NATS numbers nothing, so the
//! payload also carries its sender and a per-sender number (`payload::fill_numbered`),
//! which the same checker uses for loss, duplicates and per-publisher order.
//!
//! NATS core acknowledges nothing: "sent" is what the client accepted to publish (all of
//! it flushed to the server before the drain), and a loss is NATS's at-most-once
//! delivery (or a slow consumer), a figure of the comparison rather than a failure.
//! Messages the harness's own client dropped (its subscription buffer full) would make
//! the comparison unfair to NATS and are counted apart (`nats_harness_drops`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{Client, Subject, Subscriber};
use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::watch;

use crate::checker::{Acked, Tracker, verdict};
use crate::cost::{Usage, per_message};
use crate::error::{Error, Result};
use crate::load::{Membership, STOP};
use crate::payload;
use crate::report::{Costs, Percentiles, Report};
use crate::resources::Sampler;
use crate::run::{ramp_report, ramp_steps, step_window, timeline};
use crate::stats::{BATCH, Clock, Stats};
use crate::{Common, run_tag};

/// Connections opened at once during set-up.
const SETUP_CONCURRENCY: usize = 32;
/// Messages a subscription buffers in the client before it drops (async-nats's default
/// is 65,536; a reader keeps up or the run reports drops).
const SUBSCRIPTION_CAPACITY: usize = 65_536;

/// Parses `nats://HOST:PORT` (plain TCP; `tls://` and credentials are not supported).
pub fn parse_url(s: &str) -> std::result::Result<String, String> {
    let rest = s.strip_prefix("nats://").ok_or_else(|| format!("{s:?}: expected nats://HOST:PORT"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected nats://HOST:PORT"))?;
    if host.is_empty() || host.contains(['/', '@']) || !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return Err(format!("{s:?}: expected nats://HOST:PORT"));
    }
    Ok(s.to_owned())
}

/// The fan-out to run against NATS: `fanout`'s own numbers.
#[derive(Clone, Debug)]
pub struct Fanout {
    /// `nats://HOST:PORT` of the server.
    pub url: String,
    /// The server's process, to sample its CPU and memory.
    pub pid: Option<u32>,
    /// Members, each one connection subscribed to the subject.
    pub members: usize,
    /// Members that publish (the first ones).
    pub senders: usize,
    /// Messages per second, all senders together.
    pub rate: f64,
}

fn nats_error(url: &str, what: &str) -> impl FnOnce(String) -> Error {
    let (url, what) = (url.to_owned(), what.to_owned());
    move |e| Error::Nats { url, what: format!("{what}: {e}") }
}

/// Connects once and waits for the server's answer to a ping: fails fast, before the
/// Switchboard half of a comparison runs, when the server cannot be reached.
pub async fn probe(url: &str) -> Result<()> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| nats_error(url, "connecting")(e.to_string()))?;
    client.flush().await.map_err(|e| nats_error(url, "ping")(e.to_string()))?;
    client.drain().await.map_err(|e| nats_error(url, "closing")(e.to_string()))?;
    Ok(())
}

/// Client events that bear on the comparison.
#[derive(Default)]
struct Counters {
    /// Messages a subscription dropped in this harness (its buffer was full).
    harness_drops: AtomicU64,
    /// Connections the server closed (e.g. a slow consumer on its side).
    disconnects: AtomicU64,
}

/// One sender's state across phases.
struct Sender {
    client: Client,
    /// Next message number (numbers start at 1 and run on across phases).
    next: u32,
}

/// Connected members and what is measured about them.
struct NatsLoad {
    clients: Vec<Client>,
    senders: Vec<Sender>,
    readers: Vec<tokio::task::JoinHandle<Tracker>>,
    published: Vec<Acked>,
    subject: Subject,
    stats: Arc<Stats>,
    clock: Clock,
    stop: watch::Sender<u64>,
    counters: Arc<Counters>,
    url: String,
    /// Deliveries one message makes: every member but its sender.
    recipients: u64,
    /// Seconds the last phase's publishes took (`MessageLoad`'s alike).
    sent_in_s: f64,
}

impl NatsLoad {
    async fn start(f: &Fanout, common: &Common) -> Result<NatsLoad> {
        let tag = run_tag();
        let subject = Subject::from(format!("switchboard-load.{tag}.fanout"));
        let counters = Arc::new(Counters::default());
        let mut clients = Vec::with_capacity(f.members);
        for chunk_start in (0..f.members).step_by(SETUP_CONCURRENCY) {
            let mut set = tokio::task::JoinSet::new();
            for i in chunk_start..(chunk_start + SETUP_CONCURRENCY).min(f.members) {
                let (url, name, counters) = (f.url.clone(), format!("{tag}u{i}"), counters.clone());
                set.spawn(async move { Ok::<_, Error>((i, connect(&url, name, counters).await?)) });
            }
            let mut got: Vec<(usize, Client)> = set.join_all().await.into_iter().collect::<Result<_>>()?;
            got.sort_by_key(|(i, _)| *i);
            clients.extend(got.into_iter().map(|(_, c)| c));
        }
        let clock = Clock::default();
        let stats = Arc::new(Stats::new(clock.now_ns(), common.max_seconds()));
        let (stop, stop_rx) = watch::channel(0u64);
        let mut readers = Vec::with_capacity(f.members);
        for client in &clients {
            let sub = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| nats_error(&f.url, "subscribing")(e.to_string()))?;
            // The server's answer to a ping comes after it took the subscription.
            client.flush().await.map_err(|e| nats_error(&f.url, "subscribing")(e.to_string()))?;
            readers.push(tokio::spawn(read_loop(sub, stats.clone(), clock, stop_rx.clone())));
        }
        let senders = clients.iter().take(f.senders).map(|c| Sender { client: c.clone(), next: 1 }).collect();
        Ok(NatsLoad {
            clients,
            senders,
            readers,
            published: Vec::new(),
            subject,
            stats,
            clock,
            stop,
            counters,
            url: f.url.clone(),
            recipients: f.members.saturating_sub(1) as u64,
            sent_in_s: 0.0,
        })
    }

    /// Publishes for `duration` at `rate` messages/s over all senders, starting on a whole
    /// second of the run; returns the phase's window in whole seconds.
    async fn phase(&mut self, rate: f64, duration: Duration, size: usize) -> (usize, usize) {
        let n = self.senders.len().max(1) as f64;
        let interval_ns = ((n / rate.max(1e-3)) * 1e9) as u64;
        let earliest = (self.clock.now_ns() + 200_000_000).saturating_sub(self.stats.start_ns);
        let start_ns = self.stats.start_ns + earliest.div_ceil(1_000_000_000) * 1_000_000_000;
        // As many as the broker's senders send (`sends_per_sender`): the same offered load.
        let counts = crate::run::sends_per_sender(rate, duration, self.senders.len());
        let mut writers = tokio::task::JoinSet::new();
        let total = self.senders.len() as u64;
        for (k, sender) in self.senders.iter().enumerate() {
            let start_ns = start_ns + interval_ns * k as u64 / total;
            let schedule = Schedule { start_ns, interval_ns, count: counts[k], size, recipients: self.recipients };
            let (client, subject, first) = (sender.client.clone(), self.subject.clone(), sender.next);
            let (stats, clock) = (self.stats.clone(), self.clock);
            writers
                .spawn(async move { (k, write_phase(client, subject, k as u16, first, schedule, stats, clock).await) });
        }
        while let Some(done) = writers.join_next().await {
            if let Ok((k, numbers)) = done {
                self.senders[k].next += counts[k];
                self.published.extend(numbers.into_iter().map(|n| Acked {
                    conv: k as u64,
                    seq: u64::from(n),
                    sender: k,
                }));
            }
        }
        self.sent_in_s = self.clock.now_ns().saturating_sub(start_ns) as f64 / 1e9;
        let from = self.stats.second_of(start_ns);
        (from, from + duration.as_secs().max(1) as usize)
    }

    /// Flushes every sender (all it published reached the server), then waits until
    /// deliveries stop arriving (at most `limit`).
    async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for s in &self.senders {
            if let Err(e) = tokio::time::timeout_at(deadline, s.client.flush()).await.unwrap_or(Ok(())) {
                tracing::warn!(error = %e, url = %self.url, "flush failed");
                self.stats.errors_total.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut last = u64::MAX;
        while tokio::time::Instant::now() < deadline {
            self.stop.send_modify(|v| *v = (*v + 1) % STOP);
            tokio::time::sleep(Duration::from_millis(250)).await;
            let delivered = self.stats.delivered_total.load(Ordering::Relaxed);
            if delivered == last {
                return;
            }
            last = delivered;
        }
    }

    fn errors(&self) -> u64 {
        self.stats.errors_total.load(Ordering::Relaxed)
    }
}

async fn connect(url: &str, name: String, counters: Arc<Counters>) -> Result<Client> {
    async_nats::ConnectOptions::new()
        .name(name)
        .no_echo()
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let counters = counters.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(_) => {
                        counters.harness_drops.fetch_add(1, Ordering::Relaxed);
                    }
                    async_nats::Event::Disconnected => {
                        counters.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| nats_error(url, "connecting")(e.to_string()))
}

/// One sender's phase: `count` messages evenly spaced from `start_ns`, each for
/// `recipients` members.
#[derive(Clone, Copy)]
struct Schedule {
    start_ns: u64,
    interval_ns: u64,
    count: u32,
    size: usize,
    recipients: u64,
}

/// Publishes one phase on its open-loop schedule; returns the numbers published.
async fn write_phase(
    client: Client,
    subject: Subject,
    sender: u16,
    first: u32,
    plan: Schedule,
    stats: Arc<Stats>,
    clock: Clock,
) -> Vec<u32> {
    let mut text = String::with_capacity(plan.size);
    let mut published = Vec::with_capacity(plan.count as usize);
    let sched_ns = |i: u32| plan.start_ns + u64::from(i) * plan.interval_ns;
    let mut i = 0u32;
    while i < plan.count {
        let due = sched_ns(i);
        if clock.now_ns() < due {
            tokio::time::sleep_until(clock.instant(due)).await;
        }
        // Everything due by now goes out at once (behind schedule: all of it).
        let now = clock.now_ns();
        while i < plan.count && sched_ns(i) <= now {
            let number = first + i;
            payload::fill_numbered(&mut text, sched_ns(i), sender, number, plan.size);
            // As against the broker (`load::count_sends`): what the client took counts as
            // sent; a publish it refused is offered and never sent (before, it was counted
            // sent as well as an error, so its deliveries counted as lost, not unsent).
            match client.publish(subject.clone(), Bytes::copy_from_slice(text.as_bytes())).await {
                Ok(()) => {
                    stats.sent(sched_ns(i), plan.recipients);
                    published.push(number);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "publish failed");
                    stats.offer(sched_ns(i), plan.recipients);
                    stats.errors_total.fetch_add(1, Ordering::Relaxed);
                }
            }
            i += 1;
        }
    }
    published
}

/// Reads one member's subscription until stopped; returns what it saw.
async fn read_loop(mut sub: Subscriber, stats: Arc<Stats>, clock: Clock, mut stop: watch::Receiver<u64>) -> Tracker {
    const FLUSH_NS: u64 = 100_000_000;
    let mut tracker = Tracker::default();
    let mut deliveries: Vec<(u64, u64)> = Vec::with_capacity(BATCH);
    let mut flushed_ns = clock.now_ns();
    loop {
        tokio::select! {
            message = std::future::poll_fn(|cx| Pin::new(&mut sub).poll_next(cx)) => {
                let Some(message) = message else { break };
                let now = clock.now_ns();
                if let Some((sched, sender, number)) = payload::numbered(&message.payload) {
                    deliveries.push((sched, now.saturating_sub(sched) / 1000));
                    tracker.observe(u64::from(sender), u64::from(number));
                }
                if deliveries.len() >= BATCH || now.saturating_sub(flushed_ns) > FLUSH_NS {
                    stats.deliveries(&mut deliveries);
                    flushed_ns = now;
                }
            }
            changed = stop.changed() => {
                stats.deliveries(&mut deliveries);
                if changed.is_err() || *stop.borrow_and_update() == STOP {
                    break;
                }
            }
        }
    }
    stats.deliveries(&mut deliveries);
    tracker
}

/// Runs the fan-out against NATS and reports it like a Switchboard run: the server's
/// process is the "broker" of the report (resources and cost per message, with `pid`).
pub async fn fanout(f: &Fanout, common: &Common) -> Result<Report> {
    let mut load = NatsLoad::start(f, common).await?;
    let server_pid = f.pid.map(|p| p.to_string());
    let period = Duration::from_secs(1);
    let server = server_pid.clone().map(|pid| Sampler::start(pid, period));
    let harness = Sampler::start("self".into(), period);
    let usage_at_start = (server_pid.as_deref().and_then(Usage::read), Usage::read("self"));
    let ramp = if common.ramp {
        ramp_steps(f.rate, load.recipients as f64, common, async |rate| {
            // A lost connection fails the step as on the broker's side (where the server
            // drops a slow consumer's messages it closes its connection), and so do the
            // harness's own client's drops (its subscription buffer full: the harness
            // fell behind, not the server).
            let failures = |load: &NatsLoad| {
                let counters = &load.counters;
                load.errors()
                    + counters.disconnects.load(Ordering::Relaxed)
                    + counters.harness_drops.load(Ordering::Relaxed)
            };
            let errors_before = failures(&load);
            let window = load.phase(rate, common.ramp_step, common.size).await;
            load.drain(Duration::from_secs(5)).await;
            // NATS core refuses nothing and acknowledges nothing: no refusals, no acks;
            // what it lost is in the deliveries not made.
            crate::report::RampStep { errors: failures(&load) - errors_before, ..step_window(&load.stats, window) }
        })
        .await
    } else {
        load.phase(f.rate, common.duration, common.size).await;
        Vec::new()
    };
    load.drain(Duration::from_secs(10)).await;
    let usage_at_end = (server_pid.as_deref().and_then(Usage::read), Usage::read("self"));
    let _ = load.stop.send(STOP);
    let mut trackers = Vec::with_capacity(load.readers.len());
    for reader in load.readers.drain(..) {
        trackers.push(reader.await?);
    }
    for client in &load.clients {
        let _ = client.drain().await;
    }
    let membership: Membership = (0..f.senders).map(|s| (s as u64, (0..f.members).collect())).collect();
    let v = verdict(&trackers, &load.published, &membership);
    let published = load.published.len() as u64;
    let cost = |start: &Option<Usage>, end: &Option<Usage>| match (start, end) {
        (Some(start), Some(end)) => per_message(start, end, published, v.delivered),
        _ => None,
    };
    let measured_s = crate::run::measured_seconds(common, ramp.len(), load.sent_in_s).max(1e-3);
    let server_samples = server.as_ref().map(Sampler::samples).unwrap_or_default();
    let (latency, _) = load.stats.totals();
    let mut params = BTreeMap::from([
        ("members".to_owned(), f.members.to_string()),
        ("senders".to_owned(), f.senders.to_string()),
        ("rate".to_owned(), format!("{} msg/s", f.rate)),
        ("size".to_owned(), format!("{} B", common.size)),
        ("server".to_owned(), format!("{} (core pub/sub, no JetStream)", f.url)),
    ]);
    let measured = match f.pid {
        Some(pid) => format!("nats-server, measured (pid {pid})"),
        None => "nats-server, not measured (give --nats-pid)".into(),
    };
    params.insert("broker".into(), measured);
    let sent = load.stats.sent_total.load(Ordering::Relaxed);
    let mut report = Report {
        scenario: "fanout (nats)".into(),
        command: common.command.clone(),
        params,
        duration_s: measured_s,
        sent,
        acked: published,
        errors: load.errors(),
        delivered: v.delivered,
        lost: v.lost,
        duplicated: v.duplicated,
        out_of_order: v.out_of_order,
        acked_per_s: published as f64 / measured_s,
        delivered_per_s: v.delivered as f64 / measured_s,
        latency: Percentiles::from_us(&latency),
        timeline: timeline(&load.stats, &server_samples, &harness.samples()),
        broker: server.as_ref().map(|s| s.summary(0.0)),
        harness: harness.summary(0.0),
        cost: Costs {
            broker: cost(&usage_at_start.0, &usage_at_end.0),
            harness: cost(&usage_at_start.1, &usage_at_end.1),
        },
        ..Report::default()
    };
    let drops = load.counters.harness_drops.load(Ordering::Relaxed);
    report.extra.insert("nats_harness_drops".into(), drops as f64);
    report.extra.insert("nats_disconnects".into(), load.counters.disconnects.load(Ordering::Relaxed) as f64);
    // The harness's own part must be clean for the figures to be NATS's; NATS's losses,
    // duplicates and reordering are figures of the comparison.
    // `sent` counts what the client took, so `published == sent`; a refused publish or
    // a failed flush is an error of the run.
    report.check(
        "every message published",
        report.errors == 0 && published == sent,
        format!("{published} published, {} publish or flush errors", report.errors),
    );
    report.check("no message dropped by the harness's client", drops == 0, format!("{drops} slow-consumer events"));
    // A server gone in the middle (killed, restarted) measured nothing comparable: its
    // lost deliveries were counted as NATS's (a load tester's trial passed so).
    let disconnects = load.counters.disconnects.load(Ordering::Relaxed);
    report.check("the server stayed connected", disconnects == 0, format!("{disconnects} connections lost"));
    if common.ramp {
        ramp_report(&mut report, ramp, common);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("nats://127.0.0.1:4222"), Ok("nats://127.0.0.1:4222".into()));
        assert_eq!(parse_url("nats://localhost:4222"), Ok("nats://localhost:4222".into()));
        assert!(parse_url("127.0.0.1:4222").is_err(), "scheme required");
        assert!(parse_url("tls://127.0.0.1:4222").is_err(), "plain nats:// only");
        assert!(parse_url("nats://127.0.0.1").is_err(), "port required");
        assert!(parse_url("nats://127.0.0.1:0").is_err());
        assert!(parse_url("nats://user:pw@127.0.0.1:4222").is_err(), "no credentials");
        assert!(parse_url("nats://:4222").is_err());
    }
}
