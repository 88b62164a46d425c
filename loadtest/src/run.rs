//! Running message load: phases of open-loop sending over already-connected sessions,
//! draining, ramping, and turning what was collected into a `Report`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchboard_protocol::ConvId;
use tokio::sync::watch;

use crate::Common;
use crate::checker::{Acked, Tracker, undelivered, verdict};
use crate::cost::{Usage, per_message};
use crate::load::{EventHook, LoadSession, Membership, Packets, Population, SendPlan, write_phase};
use crate::report::{Costs, Interval, Percentiles, RampStep, Report};
use crate::resources::{Sample, Sampler};
use crate::stats::{Clock, Stats};
use crate::target::Target;

/// Connected sessions plus everything measured about them.
pub struct MessageLoad {
    sessions: Vec<LoadSession>,
    membership: Membership,
    stats: Arc<Stats>,
    clock: Clock,
    stop: watch::Sender<u64>,
    broker: Option<Sampler>,
    harness: Sampler,
    broker_pid: Option<String>,
    /// Broker and harness counters at the start of the measured phase, for `Costs`.
    usage_at_start: (Option<Usage>, Option<Usage>),
    phases: u32,
    progress: Option<tokio::task::JoinHandle<()>>,
    udp_drops_at_start: Option<u64>,
    packets_at_start: Packets,
    /// When the measured phase began (`mark_measured`), and when the last phase's sends
    /// were all written: the span the resource summaries cover.
    measured: (std::time::Instant, std::time::Instant),
    /// Messages the phases so far planned to send.
    scheduled: u64,
    /// Seconds the last phase's sends took, from its first planned send until every
    /// sender had written its last (more than the phase's duration when the harness or
    /// the broker could not keep up).
    sent_in_s: f64,
    broker_where: String,
    /// The users, to look up in the broker's store what was acknowledged but not delivered.
    pop: Population,
}

/// How often the broker's and the harness's CPU and memory are read.
const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

impl MessageLoad {
    /// Connects every user of `pop` as a raw session and starts reading.
    pub async fn start(
        target: &Target,
        pop: &Population,
        membership: Membership,
        common: &Common,
    ) -> crate::Result<Self> {
        Self::start_observing(target, pop, membership, common, None).await
    }

    /// As `start`, and hands every event other than a message entry to `hook`.
    pub async fn start_observing(
        target: &Target,
        pop: &Population,
        membership: Membership,
        common: &Common,
        hook: Option<EventHook>,
    ) -> crate::Result<Self> {
        let clock = Clock::default();
        let raws = pop.connect_raw(0..pop.users.len()).await?;
        let stats = Arc::new(Stats::new(clock.now_ns(), common.max_seconds()));
        let (stop, stop_rx) = watch::channel(0u64);
        let sessions = raws
            .into_iter()
            .enumerate()
            .map(|(i, raw)| LoadSession::start(i, raw, stats.clone(), clock, stop_rx.clone(), hook.clone()))
            .collect();
        let broker_pid = target.pid.map(|pid| pid.to_string());
        let broker = broker_pid.clone().map(|pid| Sampler::start(pid, SAMPLE_PERIOD));
        let harness = Sampler::start("self".into(), SAMPLE_PERIOD);
        let progress = common.progress.then(|| tokio::spawn(progress(stats.clone())));
        Ok(MessageLoad {
            sessions,
            membership,
            stats,
            clock,
            stop,
            broker,
            harness,
            broker_pid,
            usage_at_start: (None, None),
            phases: 0,
            progress,
            measured: (std::time::Instant::now(), std::time::Instant::now()),
            sent_in_s: 0.0,
            scheduled: 0,
            udp_drops_at_start: None,
            packets_at_start: Packets::default(),
            broker_where: target.describe(),
            pop: pop.clone(),
        })
    }

    /// Sends for `duration` at `rate` messages/s in total, spread evenly over `senders`
    /// (session index and the conversations it sends into), starting on a whole second.
    /// Returns the phase's window in whole seconds of the run.
    pub async fn phase(
        &mut self,
        senders: &[(usize, Vec<ConvId>)],
        rate: f64,
        duration: Duration,
        size: usize,
    ) -> (usize, usize) {
        let phase = self.phases;
        self.phases += 1;
        let n = senders.len().max(1) as f64;
        let interval_ns = ((n / rate.max(1e-3)) * 1e9) as u64;
        // Start on a whole second of the run, so the phase's window of whole seconds holds
        // exactly its messages (a ramp step's delivered/s is not diluted by a partial second).
        let earliest = (self.clock.now_ns() + 200_000_000).saturating_sub(self.stats.start_ns);
        let start_ns = self.stats.start_ns + earliest.div_ceil(1_000_000_000) * 1_000_000_000;
        let counts = sends_per_sender(rate, duration, senders.len());
        self.scheduled += counts.iter().map(|&c| u64::from(c)).sum::<u64>();
        let mut writers = tokio::task::JoinSet::new();
        for (k, (session, convs)) in senders.iter().enumerate() {
            let offset_ns = interval_ns * k as u64 / senders.len() as u64;
            let plan = Arc::new(SendPlan {
                convs: convs.clone(),
                recipients: convs.iter().map(|c| self.recipients(c)).collect(),
                start_ns: start_ns + offset_ns,
                interval_ns,
                count: counts[k],
                size,
            });
            let s = &mut self.sessions[*session];
            s.plans.write().unwrap_or_else(|p| p.into_inner()).push(plan.clone());
            let Some(send) = s.send.take() else { continue };
            let (stats, clock, session) = (self.stats.clone(), self.clock, *session);
            writers.spawn(async move { (session, write_phase(send, plan, phase, session, stats, clock).await) });
        }
        while let Some(done) = writers.join_next().await {
            if let Ok((session, send)) = done {
                self.sessions[session].send = Some(send);
            }
        }
        self.sent_in_s = self.clock.now_ns().saturating_sub(start_ns) as f64 / 1e9;
        self.measured.1 = std::time::Instant::now();
        let from = self.stats.second_of(start_ns);
        (from, from + duration.as_secs().max(1) as usize)
    }

    /// Takes session `i`'s control stream, to write requests of its own alongside the
    /// message load (a session that sends messages has none during a phase).
    pub fn take_send(&mut self, i: usize) -> Option<quinn::SendStream> {
        self.sessions.get_mut(i)?.send.take()
    }

    /// Session `i`'s highest delivered seq (see `LoadSession::last_seq`).
    pub fn last_seq(&self, i: usize) -> Arc<std::sync::atomic::AtomicU64> {
        self.sessions[i].last_seq.clone()
    }

    /// The harness clock the run's latencies are measured on.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The run's collector (a scenario's own failed requests go to its `errors_total`,
    /// which the run's error check reads).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Marks the start of the measured phase for resource summaries (after set-up).
    pub fn mark_measured(&mut self) {
        self.measured = (std::time::Instant::now(), std::time::Instant::now());
        self.udp_drops_at_start = crate::resources::udp_receive_drops();
        self.packets_at_start = Packets::of(&self.sessions);
        self.usage_at_start = self.usage();
    }

    /// Broker and harness counters now; the broker's only when it is its own process.
    fn usage(&self) -> (Option<Usage>, Option<Usage>) {
        (self.broker_pid.as_deref().and_then(Usage::read), Usage::read("self"))
    }

    /// Waits until every sent message is acknowledged and deliveries stop arriving
    /// (at most `limit`).
    pub async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = u64::MAX;
        while tokio::time::Instant::now() < deadline {
            // Ask readers to hand over what they buffered, then look at the totals.
            self.stop.send_modify(|v| *v = (*v + 1) % crate::load::STOP);
            tokio::time::sleep(Duration::from_millis(250)).await;
            let acked = self.stats.answered_total();
            let delivered = self.stats.delivered_total.load(Ordering::Relaxed);
            if acked >= self.stats.sent_total.load(Ordering::Relaxed) && delivered == last {
                return;
            }
            last = delivered;
        }
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.stats.errors_total.load(Ordering::Relaxed)
    }

    /// Runs `--ramp`: raises the rate by `common.ramp_factor` per step until a step
    /// fails (`ramp_steps`), then `common.ramp_beyond` steps more.
    /// Returns the steps, each with what was offered and achieved, refused and dropped,
    /// and what the broker spent per message.
    pub async fn ramp(&mut self, senders: &[(usize, Vec<ConvId>)], start_rate: f64, common: &Common) -> Vec<RampStep> {
        let recipients = self.deliveries_per_message(senders);
        ramp_steps(start_rate, recipients, common, async |rate| {
            // A connection lost in a step fails the step as an error would (a broker
            // killed mid-ramp, devices closed as slow consumers: the readers left kept
            // the p99 within the bound, and the step passed).
            let count = |stats: &Stats| {
                let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                let errors = load(&stats.errors_total) + load(&stats.connections_lost);
                (load(&stats.acked_total), errors, load(&stats.refused_total))
            };
            let before = count(&self.stats);
            let drops_before = crate::resources::udp_receive_drops();
            let usage_before = self.broker_pid.as_deref().and_then(Usage::read);
            let delivered_before = self.stats.delivered_total.load(Ordering::Relaxed);
            let window = self.phase(senders, rate, common.ramp_step, common.size).await;
            self.drain(Duration::from_secs(5)).await;
            let figures = step_window(&self.stats, window);
            let after = count(&self.stats);
            let acked = after.0 - before.0;
            let delivered = self.stats.delivered_total.load(Ordering::Relaxed) - delivered_before;
            let usage_after = self.broker_pid.as_deref().and_then(Usage::read);
            RampStep {
                acked_per_s: acked as f64 / common.ramp_step.as_secs_f64(),
                errors: after.1 - before.1,
                refused: after.2 - before.2,
                udp_drops: drops_before.zip(crate::resources::udp_receive_drops()).map(|(a, b)| b.saturating_sub(a)),
                broker_cost: usage_before.zip(usage_after).and_then(|(a, b)| per_message(&a, &b, acked, delivered)),
                ..figures
            }
        })
        .await
    }

    /// Deliveries a message to `conv` makes: every member session but the sender's.
    fn recipients(&self, conv: &ConvId) -> u64 {
        self.membership.get(conv).map_or(0, |m| m.len().saturating_sub(1)) as u64
    }

    /// Deliveries one message makes on average: every member session of its
    /// conversation but the sender's. Each sender spreads its messages evenly over its
    /// conversations, and every sender sends at the same rate.
    fn deliveries_per_message(&self, senders: &[(usize, Vec<ConvId>)]) -> f64 {
        let recipients = |conv: &ConvId| self.recipients(conv) as f64;
        let per_sender: Vec<f64> = senders
            .iter()
            .filter(|(_, convs)| !convs.is_empty())
            .map(|(_, convs)| convs.iter().map(recipients).sum::<f64>() / convs.len() as f64)
            .collect();
        per_sender.iter().sum::<f64>() / per_sender.len().max(1) as f64
    }

    /// Stops the readers, checks deliveries and assembles the report.
    pub async fn finish(
        mut self,
        scenario: &str,
        mut params: BTreeMap<String, String>,
        measured_s: f64,
        common: &Common,
    ) -> crate::Result<Report> {
        self.drain(Duration::from_secs(10)).await;
        // The measured phase ends here: closing the sessions is not a message's cost, nor
        // is its burst of CONNECTION_CLOSE datagrams (one per session, all at once) the
        // load's, so UDP drops are counted up to here too, like CPU and packets.
        let usage_at_end = self.usage();
        let udp_drops_at_end = crate::resources::udp_receive_drops();
        let packets = Packets::of(&self.sessions).since(self.packets_at_start);
        let _ = self.stop.send(crate::load::STOP);
        if let Some(p) = self.progress.take() {
            p.abort();
        }
        let mut trackers: Vec<Tracker> = Vec::with_capacity(self.sessions.len());
        let mut acked: Vec<Acked> = Vec::new();
        for s in self.sessions {
            let out = s.finish().await?;
            trackers.push(out.tracker);
            acked.extend(out.acked);
        }
        let v = verdict(&trackers, &acked, &self.membership);
        let cost = |start: &Option<Usage>, end: &Option<Usage>| match (start, end) {
            (Some(start), Some(end)) => per_message(start, end, acked.len() as u64, v.delivered),
            _ => None,
        };
        let costs = Costs {
            broker: cost(&self.usage_at_start.0, &usage_at_end.0),
            harness: cost(&self.usage_at_start.1, &usage_at_end.1),
        };
        let (latency, ack_latency) = self.stats.totals();
        let broker_samples = self.broker.as_ref().map(Sampler::samples).unwrap_or_default();
        let timeline = timeline(&self.stats, &broker_samples, &self.harness.samples());
        let duration_s = measured_s.max(1e-3);
        let sent = self.stats.sent_total.load(Ordering::Relaxed);
        let (connections_lost, first_connection_loss_s) = self.stats.losses();
        params.insert("broker".into(), self.broker_where.clone());
        let mut report = Report {
            scenario: scenario.into(),
            command: common.command.clone(),
            params,
            duration_s,
            sent,
            acked: acked.len() as u64,
            errors: self.stats.errors_total.load(Ordering::Relaxed),
            refused: self.stats.refused_total.load(Ordering::Relaxed),
            connections_lost,
            first_connection_loss_s,
            delivered: v.delivered,
            lost: v.lost,
            duplicated: v.duplicated,
            out_of_order: v.out_of_order,
            acked_per_s: acked.len() as f64 / duration_s,
            delivered_per_s: v.delivered as f64 / duration_s,
            latency: Percentiles::from_us(&latency),
            ack_latency: Percentiles::from_us(&ack_latency),
            timeline,
            broker: self.broker.as_ref().map(|b| b.summary_within(self.measured.0, self.measured.1, SAMPLE_PERIOD)),
            harness: self.harness.summary_within(self.measured.0, self.measured.1, SAMPLE_PERIOD),
            cost: costs,
            ..Report::default()
        };
        if let (Some(start), Some(end)) = (self.udp_drops_at_start, udp_drops_at_end) {
            report.extra.insert("udp_receive_buffer_drops".into(), end.saturating_sub(start) as f64);
        }
        if v.delivered > 0 {
            let per_delivery = |n: u64| n as f64 / v.delivered as f64;
            report.extra.insert("datagrams_to_devices_per_delivery".into(), per_delivery(packets.to_client));
            report.extra.insert("datagrams_from_devices_per_delivery".into(), per_delivery(packets.from_client));
            report.extra.insert("device_ack_frames_per_delivery".into(), per_delivery(packets.client_acks));
        }
        if v.lost > 0 {
            // Not delivered by the end of the drain: late, or lost from the store? Ask the
            // broker's history, as a member of each such conversation.
            let missing = undelivered(&trackers, &acked, &self.membership, MAX_LOOKED_UP);
            let (looked_up, stored) = look_up(&self.pop, &missing).await;
            report.extra.insert("undelivered_looked_up_in_store".into(), looked_up as f64);
            report.extra.insert("undelivered_found_in_store".into(), stored as f64);
            // Looked up per (conversation, seq): a message missed by several members of a
            // group is one lookup.
            report.check(
                "every acknowledged message not delivered is in the broker's store (late, not lost)",
                looked_up > 0 && stored == looked_up,
                format!(
                    "{stored} of {looked_up} messages looked up found in history ({} (message, member) pairs undelivered)",
                    v.lost
                ),
            );
        }
        report.check(
            "every sent message answered (acknowledged, refused with OVERLOADED, or failed)",
            report.acked + report.errors + report.refused >= sent,
            format!("{} acknowledged, {} refused and {} failed of {sent}", report.acked, report.refused, report.errors),
        );
        Ok(report)
    }
}

/// Undelivered (message, member) pairs looked up in the broker's store at most.
const MAX_LOOKED_UP: usize = 2000;

/// Looks `missing` (conversation, seq, member) up in the broker's history, each
/// conversation as one of the members who missed it (a page at a time from the lowest
/// missing seq), within `LOOK_UP_TIME` in all. Returns how many were looked up and how
/// many were found stored.
pub async fn look_up(pop: &Population, missing: &[(ConvId, switchboard_protocol::Seq, usize)]) -> (usize, usize) {
    const LOOK_UP_TIME: Duration = Duration::from_secs(60);
    const PAGE: u16 = 200;
    let mut by_conv: BTreeMap<ConvId, (usize, std::collections::BTreeSet<switchboard_protocol::Seq>)> = BTreeMap::new();
    for &(conv, seq, member) in missing {
        by_conv.entry(conv).or_insert_with(|| (member, Default::default())).1.insert(seq);
    }
    let (mut looked_up, mut stored) = (0, 0);
    let work = async {
        for (conv, (member, seqs)) in &by_conv {
            let Ok(client) = pop.client(*member).await else { continue };
            let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else { continue };
            // Seqs up to `covered` were looked at; both totals move together page by page,
            // so a timeout or a failed request leaves them consistent, the rest out.
            let mut covered = first.saturating_sub(1);
            while covered < last {
                let Ok((entries, _)) = client.history(*conv, switchboard_protocol::Page::After(covered), PAGE).await
                else {
                    break;
                };
                // Nothing stored past `covered`: the rest is missing from the store.
                let newest = entries.last().map_or(last, |e| e.seq);
                looked_up += seqs.range(covered + 1..=newest).count();
                stored += entries.iter().filter(|e| seqs.contains(&e.seq)).count();
                covered = newest;
            }
            client.close();
        }
    };
    let _ = tokio::time::timeout(LOOK_UP_TIME, work).await;
    (looked_up, stored)
}

/// Per-second figures of a run, from its first second with a send: seconds before it
/// hold nothing and would only drag the plotted means and lines to zero. `broker` and
/// `harness` are one-second resource samples.
pub fn timeline(stats: &Stats, broker: &[Sample], harness: &[Sample]) -> Vec<Interval> {
    let seconds = stats.seconds_seen();
    let first = (0..seconds).find(|&s| stats.sent_in(s) > 0).unwrap_or(0);
    (first..seconds)
        .map(|s| {
            let (h, n) = stats.window(s, s + 1);
            let p = Percentiles::from_us(&h);
            Interval {
                t_s: (s + 1) as f64,
                sent_per_s: stats.sent_in(s) as f64,
                delivered_per_s: n as f64,
                p50_ms: p.p50_ms,
                p99_ms: p.p99_ms,
                broker_cpu_pct: broker.get(s).or(broker.last()).map_or(0.0, |x| x.cpu_pct),
                broker_rss_mib: broker.get(s).or(broker.last()).map_or(0.0, |x| x.rss_mib),
                harness_cpu_pct: harness.get(s).or(harness.last()).map_or(0.0, |x| x.cpu_pct),
            }
        })
        .collect()
}

/// Most steps of a ramp before its first failed step.
pub const RAMP_MAX_STEPS: usize = 40;

/// The ramp of `--ramp`, for any load: `step(rate)` runs one step of
/// `common.ramp_step` at `rate` messages/s, drains it and returns what it measured
/// (the offered rates, `ok` and `lossless` are filled in here). The rate grows by
/// `common.ramp_factor` per step until a step fails, then for `common.ramp_beyond`
/// steps more, to show what happens past saturation (at most `RAMP_MAX_STEPS` before
/// the first failure). `per_message` is the deliveries one message makes.
///
/// A step fails when a request failed or a connection was lost (a NATS server closes a
/// slow consumer's), or when the p99 of latency over every delivery its sends should
/// have made, a delivery never made counting as later than any bound, is over
/// `common.ramp_p99_ms`: one rule for a broker that refuses a send (`OVERLOADED`) and
/// a server that loses deliveries (NATS core is at most once), which the bound
/// tolerates up to 1% of as it tolerates 1% of late ones. Before, a step failed on one
/// refusal while NATS's losses failed nothing; the stricter rule, every delivery
/// made, is kept as `lossless`. A step failed without errors is run again at the same
/// rate, up to `common.ramp_repeats` repeats in the whole ramp, and its failure counts
/// only when the repeats at its rate fail too; one that a repeat passed is kept, marked
/// `transient`, and does not end the ramp's result (`sustained`; the `lossless` figure
/// forgives nothing).
pub async fn ramp_steps(
    start_rate: f64,
    per_message: f64,
    common: &Common,
    mut step: impl AsyncFnMut(f64) -> RampStep,
) -> Vec<RampStep> {
    let mut steps: Vec<RampStep> = Vec::new();
    let mut rate = start_rate;
    let mut beyond = None;
    // The failed runs of the current rate not yet confirmed (`--ramp-repeats`).
    let mut unconfirmed: Vec<usize> = Vec::new();
    // Repeats left in this ramp: a budget, not one per failure, so a server that fails
    // every other step is not carried to `RAMP_MAX_STEPS` by its passing repeats.
    let mut repeats_left = usize::from(common.ramp_repeats);
    for _ in 0..common.ramp_max_steps() {
        let measured = step(rate).await;
        let erred = measured.errors > 0;
        let ok = !erred && measured.p99_offered_ms.is_some_and(|p| p <= common.ramp_p99_ms);
        let lossless = ok
            && measured.refused == 0
            && measured.delivered >= measured.offered_deliveries
            && measured.p99_ms <= common.ramp_p99_ms;
        steps.push(RampStep {
            offered_rate: rate,
            offered_deliveries_per_s: rate * per_message,
            ok,
            lossless,
            ..measured
        });
        if beyond.is_none() {
            // Again at the same rate: a failure counts once a repeat confirms it. Only a
            // step that failed on latency or deliveries not made: an error or a lost
            // connection is the server's, and a reconnected client passing the repeat
            // would not make it a moment's.
            if !ok && !erred && repeats_left > 0 {
                repeats_left -= 1;
                unconfirmed.push(steps.len() - 1);
                continue;
            }
            if ok {
                for failed in unconfirmed.drain(..) {
                    steps[failed].transient = true;
                }
            } else {
                unconfirmed.clear();
                beyond = Some(common.ramp_beyond);
            }
        }
        match &mut beyond {
            Some(0) => break,
            Some(left) => *left -= 1,
            None if steps.len() >= RAMP_MAX_STEPS => break,
            None => {}
        }
        rate *= common.ramp_factor;
    }
    steps
}

/// Ramp steps' parameters and figures on a report: the rate becomes the ramp's, and the
/// fastest step before the first that failed is the result (`sustained`).
pub fn ramp_report(report: &mut Report, ramp: Vec<RampStep>, common: &Common) {
    if let Some(first) = report.params.remove("rate") {
        let step = common.ramp_step.as_secs_f64();
        report.params.insert("rate".into(), format!("ramp from {first}, x{} every {step} s", common.ramp_factor));
    }
    report.params.remove("offered");
    let best = sustained(&ramp, |s| s.ok, true);
    report.extra.insert("ramp_max_sustained_rate_msgs_per_s".into(), best.0);
    report.extra.insert("ramp_max_sustained_deliveries_per_s".into(), best.1);
    // The strict figure: every delivery made, and the first failure final.
    let lossless = sustained(&ramp, |s| s.lossless, false);
    let transient = ramp.iter().filter(|s| s.transient).count();
    report.extra.insert("ramp_transient_steps".into(), transient as f64);
    report.extra.insert("ramp_max_lossless_rate_msgs_per_s".into(), lossless.0);
    report.extra.insert("ramp_max_lossless_deliveries_per_s".into(), lossless.1);
    report.check("ramp found a sustainable rate", best.1 > 0.0, format!("{:.0} deliveries/s", best.1));
    report.ramp = ramp;
}

/// The ramp's result under a rule (`passed`: `ok` or `lossless`), `(offered msg/s,
/// deliveries/s)`: the fastest of the steps before the first that failed (with
/// `forgive`, a failure its repeat did not confirm, `transient`, aside); none if the
/// first failed. A step past a failed one that passes again (the steps `--ramp-beyond`
/// adds, or a failure the machine caused) is not a sustained rate: a trial's ramp
/// reported 2,441 msg/s above a failed step at 1,953.
pub fn sustained(ramp: &[RampStep], passed: impl Fn(&RampStep) -> bool, forgive: bool) -> (f64, f64) {
    ramp.iter()
        .filter(|s| !(forgive && s.transient))
        .take_while(|s| passed(s))
        .map(|s| (s.offered_rate, s.delivered_per_s))
        .fold((0.0, 0.0), |a, b| if b.1 > a.1 { b } else { a })
}

/// A ramp step's delivery figures from the seconds `from..to` of its schedule:
/// latency, deliveries made and offered (each message sent, its recipients), and the
/// p99 over what was offered. The same for every server the ramp measures.
pub fn step_window(stats: &Stats, (from, to): (usize, usize)) -> RampStep {
    let (h, delivered) = stats.window(from, to);
    let offered_deliveries: u64 = (from..to).map(|s| stats.offered_in(s)).sum();
    let p = Percentiles::from_us(&h);
    RampStep {
        delivered_per_s: delivered as f64 / (to - from).max(1) as f64,
        p50_ms: p.p50_ms,
        p99_ms: p.p99_ms,
        offered_deliveries,
        delivered,
        p99_offered_ms: p99_over_offered(&h, offered_deliveries),
        ..RampStep::default()
    }
}

/// The 99th percentile of latency over `offered` deliveries of which `made` (µs)
/// holds those made, the rest counted as later than any of them: ms; `None` when more
/// than 1% were not made, or nothing was offered (a step that offered nothing
/// measured nothing). The rank is HdrHistogram's for the 99th of `offered` values
/// (`Percentiles`' p99 when all were made), found among the made ones by their counts.
pub fn p99_over_offered(made: &hdrhistogram::Histogram<u64>, offered: u64) -> Option<f64> {
    if offered == 0 {
        return None;
    }
    let rank = ((0.99 * offered as f64).ceil() as u64).max(1);
    let mut below = 0;
    for v in made.iter_recorded() {
        below += v.count_since_last_iteration();
        if below >= rank {
            return Some(v.value_iterated_to() as f64 / 1000.0);
        }
    }
    None
}

async fn progress(stats: Arc<Stats>) {
    let bar = indicatif::ProgressBar::new_spinner();
    let start = std::time::Instant::now();
    let mut last = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let delivered = stats.delivered_total.load(Ordering::Relaxed);
        bar.set_message(format!(
            "{:>6.1}s  sent {}  acked {}  delivered {} ({:.0}/s)  errors {}",
            start.elapsed().as_secs_f64(),
            stats.sent_total.load(Ordering::Relaxed),
            stats.acked_total.load(Ordering::Relaxed),
            delivered,
            (delivered - last) as f64 * 2.0,
            stats.errors_total.load(Ordering::Relaxed),
        ));
        bar.tick();
        last = delivered;
    }
}

/// How many messages each of `senders` sends in a phase of `duration` at `rate` msg/s
/// in all, each sender one every `senders / rate` s from its staggered offset (sender k
/// at k/senders of an interval): the sends that fall inside the phase, together `rate` x
/// `duration`. Before, each sent the whole intervals only, the same number for all: 100
/// senders at 0.5 msg/s each sent 100 in 3 s, not 150 (an operator trial's `groups`).
pub fn sends_per_sender(rate: f64, duration: Duration, senders: usize) -> Vec<u32> {
    let n = senders.max(1) as f64;
    // In intervals, exact (not from the interval rounded to whole nanoseconds).
    let per_sender = duration.as_secs_f64() * rate.max(1e-3) / n;
    (0..senders)
        .map(|k| (per_sender - k as f64 / n - 1e-9).ceil().clamp(0.0, f64::from(u32::MAX >> 8)) as u32)
        .collect()
}

/// Finishes a message scenario the same way for all: normal run or ramp, then report.
pub async fn run_messages(
    load: MessageLoad,
    senders: Vec<(usize, Vec<ConvId>)>,
    rate: f64,
    scenario: &str,
    params: BTreeMap<String, String>,
    common: &Common,
) -> crate::Result<Report> {
    Ok(run_messages_alongside(load, senders, rate, scenario, params, common, |_| async {}).await?.0)
}

/// What a run's rates are over: its ramp's steps, or the time its sends took
/// (`sent_in_s`) when the harness could not send them in the time asked, a tenth more (a
/// rate past what the machine carries: before, the report gave the offered rate as
/// achieved, next to seconds of latency); for a run that kept time, its duration,
/// whatever lag its last send had. The broker's half and the NATS half alike.
pub fn measured_seconds(common: &Common, ramp_steps: usize, sent_in_s: f64) -> f64 {
    let asked_s = common.duration.as_secs_f64();
    if common.ramp {
        ramp_steps as f64 * common.ramp_step.as_secs_f64()
    } else if sent_in_s > asked_s * 1.1 {
        sent_in_s
    } else {
        asked_s
    }
}

/// As `run_messages`, with `side` running for as long as messages are sent: it is
/// started with a receiver that turns `true` when the sending ends (before the drain, so
/// the events it caused are still read), and awaited before the report is made.
pub async fn run_messages_alongside<T, F>(
    mut load: MessageLoad,
    senders: Vec<(usize, Vec<ConvId>)>,
    rate: f64,
    scenario: &str,
    mut params: BTreeMap<String, String>,
    common: &Common,
    side: impl FnOnce(watch::Receiver<bool>) -> F,
) -> crate::Result<(Report, T)>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let settled = crate::resources::settle_writeback().await;
    // `--rate 0` sent one message and passed (a review): nothing to measure.
    if !(rate.is_finite() && rate > 0.0) {
        return Err(crate::Error::InvalidArgs(format!("the rate must be above 0 messages a second, not {rate}")));
    }
    // Request ids number a sender's messages below 2^24 a phase; past that they would
    // collide (a load tester's trial sent --rate 1e12 for minutes).
    let per_sender = rate * common.duration.as_secs_f64() / senders.len().max(1) as f64;
    let most = crate::load::MAX_SENDS_PER_PHASE;
    if !common.ramp && per_sender >= f64::from(most) {
        return Err(crate::Error::InvalidArgs(format!(
            "--rate {rate} for {:?} is {per_sender:.0} messages for each of the {} sending users, past the {most} \
             one may send in a run: lower --rate or --duration",
            common.duration,
            senders.len()
        )));
    }
    load.mark_measured();
    let (done, done_rx) = watch::channel(false);
    let side = tokio::spawn(side(done_rx));
    let ramp = if common.ramp {
        load.ramp(&senders, rate, common).await
    } else {
        load.phase(&senders, rate, common.duration, common.size).await;
        Vec::new()
    };
    let _ = done.send(true);
    let side = side.await?;
    params.insert("size".into(), format!("{} B", common.size));
    let scheduled = load.scheduled;
    let measured_s = measured_seconds(common, ramp.len(), load.sent_in_s);
    let mut report = load.finish(scenario, params, measured_s, common).await?;
    report.writeback_settled(settled);
    // Nothing sent, nothing checked: a run of `--duration 0s` or `--rate 0` passed every
    // delivery check with nothing to check.
    report.check(
        "messages were sent and measured",
        report.sent > 0,
        format!("{} sent in {measured_s:.1} s at {rate} msg/s offered", report.sent),
    );
    // A broker that stopped or died mid-run fails the writers' streams, and the rest of
    // their schedule is not sent; a harness far behind gives its late sends up. Before,
    // such a run passed this check with a part of its messages sent (a load tester's
    // trial: 4,411 of 10,000). A ramp's steps judge their own sends.
    if !common.ramp {
        report.check(
            "every scheduled message sent",
            report.sent >= scheduled,
            format!("{} of {scheduled} sent", report.sent),
        );
    }
    if common.ramp {
        // The last step is the one that broke the bound: only dup/order must hold there.
        report.check("no duplicate delivery", report.duplicated == 0, format!("{} duplicated", report.duplicated));
        report.check(
            "per-conversation order",
            report.out_of_order == 0,
            format!("{} out of order", report.out_of_order),
        );
        report.connection_check();
        ramp_report(&mut report, ramp, common);
    } else {
        report.delivery_checks();
    }
    Ok((report, side))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_senders_together_send_the_rate_times_the_duration() {
        let total =
            |rate, secs, senders| sends_per_sender(rate, Duration::from_secs(secs), senders).iter().sum::<u32>();
        assert_eq!(total(50.0, 3, 100), 150, "100 senders at 0.5 msg/s for 3 s");
        assert_eq!(total(5120.0, 1, 1), 5120, "one sender at a rate whose interval is not whole nanoseconds");
        assert_eq!(total(1000.0, 10, 7), 10_000);
        assert_eq!(total(1.0, 1, 10), 1, "fewer sends than senders");
        assert_eq!(sends_per_sender(0.5, Duration::from_secs(3), 2), [1, 1]);
    }

    /// A one-second step at `rate`, one recipient per message, whose p99 grows with the
    /// rate (rate / 100 ms) and which refuses 2% of its sends above 400 msg/s, as a
    /// broker shedding load would.
    fn shedding_broker(rate: f64) -> RampStep {
        let offered = rate as u64;
        let refused = if rate > 400.0 { offered / 50 } else { 0 };
        RampStep {
            p99_ms: rate / 100.0,
            p99_offered_ms: (refused == 0).then_some(rate / 100.0),
            delivered_per_s: (offered - refused) as f64,
            offered_deliveries: offered,
            delivered: offered - refused,
            refused,
            ..RampStep::default()
        }
    }

    /// Latencies of 1 to `n` ms, one each (µs).
    fn made(n: u64) -> hdrhistogram::Histogram<u64> {
        let mut h = hdrhistogram::Histogram::new(3).unwrap();
        for ms in 1..=n {
            h.record(ms * 1000).unwrap();
        }
        h
    }

    #[test]
    fn deliveries_not_made_count_as_later_than_any_bound() {
        let p99 = |made_ms: u64, offered| p99_over_offered(&made(made_ms), offered).map(|p| p.round());
        // All 1,000 made: the 990th fastest.
        assert_eq!(p99(1000, 1000), Some(990.0));
        // 5 of 1,000 not made: the 990th of the 1,000 is the 990th of the 995 made.
        assert_eq!(p99(995, 1000), Some(990.0));
        // 10 not made: the 990th is the slowest made; 11: it is one never made.
        assert_eq!(p99(990, 1000), Some(990.0));
        assert_eq!(p99(989, 1000), None);
        assert_eq!(p99_over_offered(&made(0), 0), None, "nothing offered: nothing measured");
        assert_eq!(p99_over_offered(&made(0), 3), None, "nothing made of what was offered");
        // Bit for bit the p99 of `Percentiles` when all were made, at any count.
        for n in [1, 7, 99, 100, 101, 1000, 12_345] {
            let h = made(n);
            assert_eq!(p99_over_offered(&h, n), Some(Percentiles::from_us(&h).p99_ms), "{n}");
        }
    }

    /// Offered deliveries are each message's own recipients (conversations of
    /// different sizes in `groups`: an average over them missed by up to 4%, more than
    /// the 1% the rule tolerates).
    #[test]
    fn a_step_offers_each_message_its_own_recipients() {
        let stats = Stats::new(0, 10);
        let second = 1_000_000_000;
        stats.sent(second, 3);
        stats.sent(second + second / 2, 7);
        stats.sent(2 * second, 5);
        let mut made: Vec<(u64, u64)> = (0..10).map(|_| (second, 1_000)).collect();
        stats.deliveries(&mut made);
        let step = step_window(&stats, (1, 2));
        assert_eq!((step.offered_deliveries, step.delivered), (10, 10));
        assert!(step.p99_offered_ms.is_some_and(|p| (1.0..1.01).contains(&p)), "{:?}", step.p99_offered_ms);
        let step = step_window(&stats, (1, 3));
        assert_eq!((step.offered_deliveries, step.delivered), (15, 10), "the second message to 5 made none");
        assert_eq!(step.p99_offered_ms, None);
        // A message its writer never sent (the stream failed) is offered and not made,
        // and not counted as sent.
        stats.offer(2 * second, 4);
        assert_eq!((stats.offered_in(2), stats.sent_in(2)), (9, 1));
        assert_eq!(step_window(&stats, (1, 3)).offered_deliveries, 19);
    }

    /// A step that refuses a few sends passes while the p99 over what it offered stays
    /// within the bound, and is not lossless; one refusing more than 1% fails, as a
    /// server that drops as many deliveries does.
    #[tokio::test]
    async fn a_step_fails_on_deliveries_not_made_past_one_percent() {
        let common =
            Common { ramp_factor: 2.0, ramp_p99_ms: 50.0, ramp_beyond: 0, ramp_repeats: 0, ..Common::default() };
        let few = |rate: f64| RampStep {
            delivered_per_s: rate * 0.995,
            p99_ms: 2.0,
            p99_offered_ms: Some(3.0),
            offered_deliveries: 1000,
            delivered: 995,
            refused: 5,
            ..RampStep::default()
        };
        let steps =
            ramp_steps(100.0, 1.0, &common, async |rate| if rate < 400.0 { few(rate) } else { shedding_broker(rate) })
                .await;
        let rules: Vec<(bool, bool)> = steps.iter().map(|s| (s.ok, s.lossless)).collect();
        assert_eq!(rules, [(true, false), (true, false), (true, true), (false, false)]);
        assert_eq!(sustained(&steps, |s| s.ok, true).0, 400.0);
        assert_eq!(sustained(&steps, |s| s.lossless, false).0, 0.0, "the first step refused some");
    }

    #[tokio::test]
    async fn the_ramp_goes_beyond_its_first_failed_step_by_ramp_beyond() {
        let common =
            Common { ramp_factor: 2.0, ramp_p99_ms: 50.0, ramp_beyond: 2, ramp_repeats: 0, ..Common::default() };
        let steps = ramp_steps(100.0, 3.0, &common, async |rate| shedding_broker(rate)).await;
        let rates: Vec<f64> = steps.iter().map(|s| s.offered_rate).collect();
        // 100, 200, 400 kept up; 800 refuses 2% (its p99 of 8 ms is within the bound);
        // two steps more.
        assert_eq!(rates, [100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0]);
        let ok: Vec<bool> = steps.iter().map(|s| s.ok).collect();
        assert_eq!(ok, [true, true, true, false, false, false]);
        assert!(steps.iter().all(|s| s.offered_deliveries_per_s == s.offered_rate * 3.0));
    }

    /// A failed step is run again at the same rate: a failure its repeat does not
    /// confirm (one slow second) does not end the ramp; one it confirms does, and the
    /// result is the fastest step before it.
    #[tokio::test]
    async fn a_failure_counts_once_a_repeat_at_the_same_rate_confirms_it() {
        let common = Common { ramp_factor: 2.0, ramp_p99_ms: 50.0, ramp_beyond: 1, ..Common::default() };
        assert_eq!(common.ramp_repeats, 1, "the default");
        // 200 msg/s has one slow step, then passes; 800 fails (2% refused).
        let steps = with_one_slow_step_at_200(&common).await;
        let seen: Vec<(f64, bool, bool)> = steps.iter().map(|s| (s.offered_rate, s.ok, s.transient)).collect();
        assert_eq!(
            seen,
            [
                (100.0, true, false),
                (200.0, false, true),
                (200.0, true, false),
                (400.0, true, false),
                // The ramp's one repeat is spent: this failure is final.
                (800.0, false, false),
                (1600.0, false, false),
            ]
        );
        assert_eq!(sustained(&steps, |s| s.ok, true).0, 400.0);
        assert!(report_table_says(&steps, "no, repeated"));
        // The strict figure forgives nothing: every delivery made, the first failure final.
        assert_eq!(sustained(&steps, |s| s.lossless, false).0, 100.0);
        // Without repeats the slow second ends it.
        let steps = with_one_slow_step_at_200(&Common { ramp_repeats: 0, ..common.clone() }).await;
        assert_eq!(sustained(&steps, |s| s.ok, true).0, 100.0);
        // A budget for the ramp, not a repeat per failure: a server failing every other
        // step is not carried up by its passing repeats.
        let mut attempts = 0;
        let flaky = ramp_steps(100.0, 1.0, &common, async |rate| {
            attempts += 1;
            RampStep { p99_offered_ms: Some(if attempts % 2 == 0 { 90.0 } else { 1.0 }), ..shedding_broker(rate) }
        })
        .await;
        let rates: Vec<(f64, bool)> = flaky.iter().map(|s| (s.offered_rate, s.ok)).collect();
        assert_eq!(rates, [(100.0, true), (200.0, false), (200.0, true), (400.0, false), (800.0, true)]);
        assert_eq!(sustained(&flaky, |s| s.ok, true).0, 200.0);
        // A step failed on an error is not repeated: the error is the server's.
        let erring = ramp_steps(100.0, 1.0, &common, async |rate| RampStep {
            errors: u64::from(rate == 200.0),
            ..shedding_broker(rate)
        })
        .await;
        let rates: Vec<f64> = erring.iter().map(|s| s.offered_rate).collect();
        assert_eq!(rates, [100.0, 200.0, 400.0], "no repeat at 200, one step beyond");
    }

    /// A ramp of `shedding_broker` whose first step at 200 msg/s has a p99 of 90 ms.
    async fn with_one_slow_step_at_200(common: &Common) -> Vec<RampStep> {
        let mut slow_once = true;
        ramp_steps(100.0, 1.0, common, async |rate| {
            let mut step = shedding_broker(rate);
            if rate == 200.0 && std::mem::take(&mut slow_once) {
                step.p99_offered_ms = Some(90.0);
            }
            step
        })
        .await
    }

    fn report_table_says(steps: &[RampStep], what: &str) -> bool {
        let report = Report { ramp: steps.to_vec(), ..Report::default() };
        report.table().contains(what)
    }

    #[tokio::test]
    async fn without_beyond_the_ramp_stops_at_its_first_failed_step() {
        let common =
            Common { ramp_factor: 2.0, ramp_p99_ms: 3.0, ramp_beyond: 0, ramp_repeats: 0, ..Common::default() };
        let steps = ramp_steps(100.0, 1.0, &common, async |rate| shedding_broker(rate)).await;
        let rates: Vec<f64> = steps.iter().map(|s| s.offered_rate).collect();
        // 400 msg/s has a p99 of 4 ms, over the 3 ms bound.
        assert_eq!(rates, [100.0, 200.0, 400.0]);
        assert!(!steps[2].ok);
    }

    /// The result is the fastest step before the first failure: a trial's ramp failed
    /// at 1,953 msg/s, passed at 2,441 (one of the steps beyond) and reported that.
    #[test]
    fn the_sustained_rate_is_the_fastest_step_before_the_first_failure() {
        let step =
            |rate: f64, ok| RampStep { offered_rate: rate, delivered_per_s: rate * 10.0, ok, ..RampStep::default() };
        let ramp = [step(1000.0, true), step(1250.0, true), step(1563.0, false), step(1953.0, true)];
        assert_eq!(sustained(&ramp, |s| s.ok, true), (1250.0, 12_500.0));
        let first_failed = [step(1000.0, false), step(1250.0, true)];
        assert_eq!(sustained(&first_failed, |s| s.ok, true), (0.0, 0.0), "the first step failed");
        assert_eq!(sustained(&[], |s| s.ok, true), (0.0, 0.0));
    }

    #[tokio::test]
    async fn a_ramp_that_never_fails_stops_at_its_step_limit() {
        let common = Common { ramp_factor: 1.01, ramp_p99_ms: f64::MAX, ..Common::default() };
        let steps =
            ramp_steps(1.0, 1.0, &common, async |_| RampStep { p99_offered_ms: Some(0.0), ..RampStep::default() })
                .await;
        assert_eq!(steps.len(), RAMP_MAX_STEPS);
    }
}
