//! What a run measured, in one serialisable structure: printed as a table, written as
//! JSON (`--json`) and drawn as a PNG (`--plot`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_us(h: &hdrhistogram::Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

/// One sampling interval of the run (one second by default).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Interval {
    /// Seconds since the start of the measured phase (end of the interval).
    pub t_s: f64,
    /// Messages sent in the interval, per second.
    pub sent_per_s: f64,
    /// Messages delivered in the interval, per second.
    pub delivered_per_s: f64,
    /// Median send-to-receive latency of deliveries in the interval.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// Broker CPU, percent of one core.
    pub broker_cpu_pct: f64,
    /// Broker resident memory, MiB.
    pub broker_rss_mib: f64,
    /// Harness CPU, percent of one core.
    pub harness_cpu_pct: f64,
}

/// CPU and memory of one process over the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Resources {
    /// Mean CPU, percent of one core (200 = both cores of this machine).
    pub cpu_pct_mean: f64,
    /// Peak one-second CPU.
    pub cpu_pct_max: f64,
    /// Resident memory at the start of the measured phase, MiB.
    pub rss_mib_start: f64,
    /// Peak resident memory, MiB.
    pub rss_mib_peak: f64,
    /// Resident memory at the end, MiB.
    pub rss_mib_end: f64,
}

/// What one process spent per message over the measured phase (see `cost.rs`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cost {
    /// CPU time per acknowledged message, µs.
    pub cpu_us_per_ack: f64,
    /// CPU time per delivery, µs (`None` without deliveries).
    pub cpu_us_per_delivery: Option<f64>,
    /// Context switches of all its threads per acknowledged message.
    pub ctx_switches_per_ack: f64,
    /// Of which voluntary: the thread blocked (I/O, a lock, waiting for work).
    pub voluntary_ctx_switches_per_ack: f64,
    /// Of which involuntary: the thread was preempted.
    pub involuntary_ctx_switches_per_ack: f64,
    /// Context switches per acknowledged message by kind of thread (its name without a
    /// trailing number), the most first.
    pub ctx_switches_per_ack_by_thread: Vec<(String, f64)>,
    /// Threads that exited inside the window; their switches are missing from the above.
    pub threads_exited: u64,
}

/// The broker's and the harness's cost per message. `None` where not measured: the
/// broker is remote without `--broker-pid` or runs inside the harness (whose figures
/// then include it), or nothing was acknowledged.
#[derive(Clone, Debug, Default)]
pub struct Costs {
    /// The broker process.
    pub broker: Option<Cost>,
    /// This harness process.
    pub harness: Option<Cost>,
}

/// Written flat into the report, each name prefixed with its process
/// (`broker_cpu_us_per_ack`), `null` where not measured.
impl Serialize for Costs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        for (process, cost) in [("broker", &self.broker), ("harness", &self.harness)] {
            let mut entry = |name: &str, value: Option<f64>| map.serialize_entry(&format!("{process}_{name}"), &value);
            entry("cpu_us_per_ack", cost.as_ref().map(|c| c.cpu_us_per_ack))?;
            entry("cpu_us_per_delivery", cost.as_ref().and_then(|c| c.cpu_us_per_delivery))?;
            entry("ctx_switches_per_ack", cost.as_ref().map(|c| c.ctx_switches_per_ack))?;
            entry("voluntary_ctx_switches_per_ack", cost.as_ref().map(|c| c.voluntary_ctx_switches_per_ack))?;
            entry("involuntary_ctx_switches_per_ack", cost.as_ref().map(|c| c.involuntary_ctx_switches_per_ack))?;
            let by_thread: Option<BTreeMap<&str, f64>> =
                cost.as_ref().map(|c| c.ctx_switches_per_ack_by_thread.iter().map(|(k, v)| (k.as_str(), *v)).collect());
            map.serialize_entry(&format!("{process}_ctx_switches_per_ack_by_thread"), &by_thread)?;
            map.serialize_entry(&format!("{process}_threads_exited"), &cost.as_ref().map(|c| c.threads_exited))?;
        }
        map.end()
    }
}

/// One step of a `--ramp` run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RampStep {
    /// Offered send rate, messages/s.
    pub offered_rate: f64,
    /// Deliveries/s the offered rate should produce (messages/s times recipients).
    pub offered_deliveries_per_s: f64,
    /// Achieved deliveries/s.
    pub delivered_per_s: f64,
    /// Achieved acknowledged (durable) messages/s: the offered rate less what was
    /// refused or failed.
    pub acked_per_s: f64,
    /// Median delivery latency of the step (admitted messages only).
    pub p50_ms: f64,
    /// p99 latency of the step's deliveries made.
    pub p99_ms: f64,
    /// Deliveries the step's sends should have made: messages sent (scheduled) in the
    /// step's window times recipients, whether accepted, refused or dropped.
    pub offered_deliveries: u64,
    /// Deliveries made of messages scheduled in the step's window (a duplicate counts
    /// again; there are none when the run's checks pass).
    pub delivered: u64,
    /// p99 latency over `offered_deliveries`, a delivery never made counting as later
    /// than any bound, ms; `None` when more than 1% were never made, or nothing was
    /// offered. The same rule for every server: a send refused (`OVERLOADED`) or a
    /// delivery lost (NATS is at most once) counts as a delivery not made; a lost
    /// connection (a NATS server closes a slow consumer's) is an error.
    pub p99_offered_ms: Option<f64>,
    /// Sends of the step refused with `OVERLOADED` (shed load).
    pub refused: u64,
    /// Requests of the step that failed otherwise, and connections lost in it.
    pub errors: u64,
    /// Datagrams the kernel dropped for a full UDP receive buffer during the step (all
    /// sockets of the machine: `RcvbufErrors` of /proc/net/snmp); `None` if unreadable.
    pub udp_drops: Option<u64>,
    /// The broker's CPU and context switches per acknowledged message over the step
    /// and its drain; `None` where the broker is not measured.
    pub broker_cost: Option<Cost>,
    /// The step met the bound: `p99_offered_ms` within `--ramp-p99-ms`, and no request
    /// failed (a refusal is not a failure: it counts as a delivery not made).
    pub ok: bool,
    /// The step met the bound with every offered delivery made: no refusal, drop or
    /// loss (the stricter rule; the ramp stops on `ok`).
    pub lossless: bool,
    /// The step failed and a repeat at the same rate right after it passed
    /// (`--ramp-repeats`): a failure of a moment, which does not end the ramp's result
    /// (the `lossless` figure forgives nothing).
    pub transient: bool,
}

/// One pass/fail check of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// It held.
    pub ok: bool,
    /// Figures behind it.
    pub detail: String,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// The command line that produced it.
    pub command: String,
    /// Scenario parameters.
    pub params: BTreeMap<String, String>,
    /// Measured phase length, seconds.
    pub duration_s: f64,
    /// Messages the harness sent.
    pub sent: u64,
    /// Messages the broker acknowledged (durable).
    pub acked: u64,
    /// Requests that failed with an error (`OVERLOADED` refusals are apart).
    pub errors: u64,
    /// Sends the broker refused with `OVERLOADED` (past saturation: shed load).
    pub refused: u64,
    /// Harness connections lost before the run ended them (a broker stopped mid-run,
    /// a device closed as a slow consumer): the figures after the first are not of a
    /// running broker's work.
    pub connections_lost: u64,
    /// When the first was lost, seconds from the harness's start.
    pub first_connection_loss_s: Option<f64>,
    /// Deliveries received.
    pub delivered: u64,
    /// Acknowledged messages some member never received.
    pub lost: u64,
    /// Deliveries received more than once.
    pub duplicated: u64,
    /// Deliveries that arrived after a higher seq of the same conversation.
    pub out_of_order: u64,
    /// Acknowledged messages per second.
    pub acked_per_s: f64,
    /// Deliveries per second.
    pub delivered_per_s: f64,
    /// Scheduled send to delivery at a member (no coordinated omission); for `storm`,
    /// connect to authenticated (see `latency_label`).
    pub latency: Percentiles,
    /// What `latency` measures: "delivery" or "connect".
    pub latency_label: String,
    /// Scheduled send to durable acknowledgement.
    pub ack_latency: Percentiles,
    /// Latencies of what a chat user feels besides messages, by what they measure
    /// (e.g. "receipt": a reader's MarkRead to the sender's `Event::Receipt`), taken in
    /// the same run as `latency`.
    pub event_latency: BTreeMap<String, Percentiles>,
    /// Per-interval figures.
    pub timeline: Vec<Interval>,
    /// Broker process, if measured.
    pub broker: Option<Resources>,
    /// This harness process.
    pub harness: Resources,
    /// CPU time and context switches per message, broker and harness.
    #[serde(flatten)]
    pub cost: Costs,
    /// Scenario-specific figures (e.g. handshakes/s, memory per connection).
    pub extra: BTreeMap<String, f64>,
    /// Ramp steps, with `--ramp`.
    pub ramp: Vec<RampStep>,
    /// Pass/fail checks; the run fails if any fails.
    pub checks: Vec<Check>,
    /// Performance aims (an issue's target, e.g. "upload at least 0.75 of the limit"):
    /// reported met or not, never deciding the run's result, which says only whether
    /// work was lost, duplicated, reordered or failed (figures move from machine to
    /// machine and run to run; a check must not).
    pub aims: Vec<Check>,
    /// The same workload run against another server in the same run (`fanout
    /// --against`); its own checks do not decide this run's result.
    pub against: Option<Box<Report>>,
}

impl Report {
    /// All checks held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// Adds a check.
    pub fn check(&mut self, name: &str, ok: bool, detail: String) {
        self.checks.push(Check { name: name.into(), ok, detail });
    }

    /// Records what `resources::settle_writeback` wrote back before measuring: MB pending
    /// and the milliseconds the sync took.
    pub fn writeback_settled(&mut self, settled: Option<(u64, f64)>) {
        if let Some((bytes, ms)) = settled {
            self.extra.insert("writeback_settled_before_mb".into(), bytes as f64 / 1e6);
            self.extra.insert("writeback_settle_ms".into(), ms);
        }
    }

    /// Adds an aim: reported, not deciding the result (`aims`).
    pub fn aim(&mut self, name: &str, met: bool, detail: String) {
        self.aims.push(Check { name: name.into(), ok: met, detail });
    }

    /// The standard delivery checks: nothing lost, duplicated, reordered or failed.
    pub fn delivery_checks(&mut self) {
        let (lost, dup, ooo, errors) = (self.lost, self.duplicated, self.out_of_order, self.errors);
        // `lost` counts (message, member) pairs not delivered when the drain ended; where
        // any, `MessageLoad::finish` also looks them up in the broker's store, to tell a
        // late delivery from a message the store lost.
        self.check(
            "every acknowledged message delivered to every member before the drain ended",
            lost == 0,
            format!("{lost} (message, member) pairs not delivered"),
        );
        self.check("no duplicate delivery", dup == 0, format!("{dup} duplicated"));
        self.check("per-conversation order", ooo == 0, format!("{ooo} out of order"));
        self.check("no request errors", errors == 0, format!("{errors} errors"));
        self.connection_check();
    }

    /// When the first harness connection was lost, as the check and the table say it.
    fn first_loss(&self) -> Option<String> {
        self.first_connection_loss_s.map(|t| format!("the first at t={t:.1} s"))
    }

    /// Fails the run if a harness connection was lost before the run ended it.
    pub fn connection_check(&mut self) {
        let lost = self.connections_lost;
        let when = self.first_loss().map_or(String::new(), |first| format!(", {first}"));
        self.check(
            "no connection to the broker lost",
            lost == 0,
            format!("{lost} lost{when} (a broker stopped or restarted mid-run, or devices closed as slow consumers)"),
        );
    }

    /// A human-readable summary table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "scenario      {}", self.scenario);
        for (k, v) in &self.params {
            let _ = writeln!(s, "  {k:<12} {v}");
        }
        // A catch-up of a few thousand entries takes a fraction of a second.
        let _ = writeln!(s, "duration      {:.*} s", if self.duration_s < 10.0 { 3 } else { 1 }, self.duration_s);
        if self.sent > 0 || self.delivered > 0 {
            let _ = writeln!(
                s,
                "sent          {}   acked {}   refused (OVERLOADED) {}   errors {}",
                self.sent, self.acked, self.refused, self.errors
            );
            if self.refused > 0 {
                // Shed load is the broker's designed answer past saturation, not a failed
                // check; but a PASS with most sends refused read as a broker keeping up.
                let _ = writeln!(
                    s,
                    "  note: {:.1}% of the sends were refused OVERLOADED: the offered load is past what this \
                     broker took here; the latency figures are of the acknowledged part",
                    100.0 * self.refused as f64 / self.sent.max(1) as f64
                );
            }
            if self.connections_lost > 0 {
                let _ = writeln!(
                    s,
                    "  connections lost before the run ended them: {}{}",
                    self.connections_lost,
                    self.first_loss().map_or(String::new(), |first| format!(" ({first})"))
                );
            }
            let _ = writeln!(
                s,
                "delivered     {}   lost {}   duplicated {}   out of order {}",
                self.delivered, self.lost, self.duplicated, self.out_of_order
            );
            let _ = writeln!(
                s,
                "throughput    {:.0} acked msgs/s   {:.0} deliveries/s",
                self.acked_per_s, self.delivered_per_s
            );
        } else {
            let _ = writeln!(s, "errors        {}", self.errors);
        }
        let row = |name: &str, p: &Percentiles| {
            format!(
                "{name:<14}p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  p99.9 {:>8.2}  max {:>8.2} ms  (n={})\n",
                p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms, p.count
            )
        };
        if self.latency.count > 0 {
            let label = if self.latency_label.is_empty() { "delivery" } else { self.latency_label.as_str() };
            s.push_str(&row(label, &self.latency));
        }
        if self.ack_latency.count > 0 {
            s.push_str(&row("ack", &self.ack_latency));
        }
        for (label, p) in &self.event_latency {
            s.push_str(&row(label, p));
        }
        if self.acked == 0 {
            let _ = writeln!(s, "cost          not measured (no acknowledged messages)");
        } else {
            for (label, cost) in [("cost broker", &self.cost.broker), ("cost harness", &self.cost.harness)] {
                let _ = writeln!(s, "{label:<14}{}", cost_line(cost.as_ref()));
            }
        }
        if let Some(b) = &self.broker {
            let _ = writeln!(
                s,
                "broker        cpu mean {:.0}% max {:.0}%   rss start {:.1} MiB peak {:.1} MiB end {:.1} MiB",
                b.cpu_pct_mean, b.cpu_pct_max, b.rss_mib_start, b.rss_mib_peak, b.rss_mib_end
            );
        }
        let h = &self.harness;
        if h.rss_mib_peak > 0.0 {
            let _ = writeln!(
                s,
                "harness       cpu mean {:.0}% max {:.0}%   rss peak {:.1} MiB",
                h.cpu_pct_mean, h.cpu_pct_max, h.rss_mib_peak
            );
        } else {
            // Zeros would read as an idle harness (the `catchup` report showed them).
            let _ = writeln!(s, "harness       not sampled in this scenario");
        }
        if let Some(b) = &self.broker {
            let total = b.cpu_pct_mean + h.cpu_pct_mean;
            if total > 0.0 {
                let _ = writeln!(
                    s,
                    "cpu share     broker {:.0}%  harness {:.0}%  (of {:.0}% used; this machine has 200%)",
                    b.cpu_pct_mean / total * 100.0,
                    h.cpu_pct_mean / total * 100.0,
                    total
                );
            }
        }
        for (k, v) in &self.extra {
            let _ = writeln!(s, "{k:<40}{:>12}", figure(*v));
        }
        if self.extra.get("udp_receive_buffer_drops").is_some_and(|d| *d > 0.0) {
            let _ = writeln!(
                s,
                "note          the kernel dropped UDP datagrams (socket receive buffer full): each costs a QUIC\n              retransmission timeout, so the tail latency above includes this machine's overload"
            );
        }
        if !self.ramp.is_empty() {
            s.push_str(&ramp_table(&self.ramp));
        }
        for c in &self.checks {
            let _ = writeln!(s, "[{}] {} ({})", if c.ok { "pass" } else { "FAIL" }, c.name, c.detail);
        }
        for a in &self.aims {
            let _ = writeln!(s, "[aim {}] {} ({})", if a.ok { "met" } else { "not met" }, a.name, a.detail);
        }
        if let Some(other) = &self.against {
            s.push_str(&self.comparison(other));
        }
        let _ = writeln!(s, "result        {}", if self.passed() { "PASS" } else { "FAIL" });
        s
    }

    /// This run and `other` (the same workload against another server) side by side,
    /// with the ratio this/other of each figure.
    pub fn comparison(&self, other: &Report) -> String {
        let mut s = String::new();
        let name = other.params.get("server").map_or("other", String::as_str);
        let _ = writeln!(s, "against       {} ({})", other.scenario, name);
        for c in &other.checks {
            let _ = writeln!(s, "  [{}] {} ({})", if c.ok { "pass" } else { "FAIL" }, c.name, c.detail);
        }
        let _ = writeln!(s, "  {:<30}{:>14}{:>14}{:>14}", "", "switchboard", "nats", "ratio");
        let mut line = |label: &str, a: Option<f64>, b: Option<f64>| {
            let cell = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
            let ratio = match (a, b) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                _ => "-".to_owned(),
            };
            let _ = writeln!(s, "  {label:<30}{:>14}{:>14}{ratio:>14}", cell(a), cell(b));
        };
        line("delivery p50 ms", Some(self.latency.p50_ms), Some(other.latency.p50_ms));
        line("delivery p99 ms", Some(self.latency.p99_ms), Some(other.latency.p99_ms));
        line("delivery p99.9 ms", Some(self.latency.p999_ms), Some(other.latency.p999_ms));
        line("deliveries/s", Some(self.delivered_per_s), Some(other.delivered_per_s));
        line("messages sent", Some(self.sent as f64), Some(other.sent as f64));
        // nats-server never refuses (it drops instead: the row below); ours sheds past
        // saturation with `OVERLOADED`, which the table did not show beside it.
        line("refused (OVERLOADED)", Some(self.refused as f64), Some(other.refused as f64));
        line("lost (message, member) pairs", Some(self.lost as f64), Some(other.lost as f64));
        let cpu = |r: &Report| r.broker.as_ref().map(|b| b.cpu_pct_mean);
        line("server cpu mean % of a core", cpu(self), cpu(other));
        let per_delivery = |r: &Report| r.cost.broker.as_ref().and_then(|c| c.cpu_us_per_delivery);
        line("server cpu µs/delivery", per_delivery(self), per_delivery(other));
        let peak = |r: &Report| r.broker.as_ref().map(|b| b.rss_mib_peak);
        line("server rss peak MiB", peak(self), peak(other));
        // With --ramp the whole-run figures mix steps; the ceiling is the comparison.
        let ceiling = |r: &Report, key: &str| r.extra.get(key).copied();
        let sustained = "ramp_max_sustained_deliveries_per_s";
        if ceiling(self, sustained).is_some() || ceiling(other, sustained).is_some() {
            line("ramp max sustained deliv./s", ceiling(self, sustained), ceiling(other, sustained));
            let lossless = "ramp_max_lossless_deliveries_per_s";
            line("  with every delivery made", ceiling(self, lossless), ceiling(other, lossless));
        }
        // Its steps as ours are printed (they were in the JSON only: a trial).
        if !other.ramp.is_empty() {
            let _ = writeln!(s, "  {name}'s ramp:");
            s.push_str(&ramp_table(&other.ramp));
        }
        s
    }
}

/// The ramp's steps, one line each: offered against achieved, latency of what was
/// admitted and over what was offered, what was shed or not delivered, the kernel's
/// drops and the broker's cost per message. `ok` is the ramp's rule (`yes`, or
/// `yes, all` when every offered delivery was made too; `no, repeated` for a failure
/// that the repeat at the same rate did not confirm).
fn ramp_table(ramp: &[RampStep]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ramp     offered msg/s   acked msg/s    refused  offered deliv/s  delivered/s  not made   p50 ms   p99 ms  p99 all ms  udp drops  broker µs/ack  ctx sw/ack  ok"
    );
    let opt = |v: Option<f64>, decimals: usize| v.map_or("-".to_owned(), |v| format!("{v:.decimals$}"));
    for r in ramp {
        let cost = r.broker_cost.as_ref();
        let _ = writeln!(
            s,
            "         {:>13.0}  {:>12.0}  {:>9}  {:>15.0}  {:>11.0}  {:>8}  {:>7.2}  {:>7.2}  {:>10}  {:>9}  {:>13}  {:>10}  {}",
            r.offered_rate,
            r.acked_per_s,
            r.refused,
            r.offered_deliveries_per_s,
            r.delivered_per_s,
            r.offered_deliveries.saturating_sub(r.delivered),
            r.p50_ms,
            r.p99_ms,
            match r.p99_offered_ms {
                Some(p) => format!("{p:.2}"),
                None if r.offered_deliveries == 0 => "-".to_owned(),
                None => ">1% lost".to_owned(),
            },
            r.udp_drops.map_or("-".to_owned(), |d| d.to_string()),
            opt(cost.map(|c| c.cpu_us_per_ack), 1),
            opt(cost.map(|c| c.ctx_switches_per_ack), 2),
            match (r.ok, r.lossless, r.transient) {
                (true, true, _) => "yes, all",
                (true, false, _) => "yes",
                (false, _, true) => "no, repeated",
                (false, _, false) => "no",
            },
        );
    }
    s
}

/// One process's cost per message, for the table.
fn cost_line(cost: Option<&Cost>) -> String {
    let Some(c) = cost else { return "not measured".into() };
    let per_delivery = c.cpu_us_per_delivery.map_or("-".into(), |us| format!("{us:.2}"));
    let mut line = format!(
        "cpu {:.1} µs/ack  {per_delivery} µs/delivery   ctx switches {:.2}/ack (voluntary {:.2}, involuntary {:.2})",
        c.cpu_us_per_ack, c.ctx_switches_per_ack, c.voluntary_ctx_switches_per_ack, c.involuntary_ctx_switches_per_ack
    );
    if c.threads_exited > 0 {
        let _ = write!(line, "; {} threads exited, their switches are missing", c.threads_exited);
    }
    // Where they are: the kinds of thread with at least 0.01 per ack, the most first.
    let kinds: Vec<String> = c
        .ctx_switches_per_ack_by_thread
        .iter()
        .filter(|(_, n)| *n >= 0.01)
        .map(|(kind, n)| format!("{kind} {n:.2}"))
        .collect();
    if !kinds.is_empty() {
        let _ = write!(line, "\n{:<14}by thread: {}", "", kinds.join(", "));
    }
    line
}

/// A figure of the report's table: a count as a whole number, a fraction under 1 with
/// four places (a catch-up of 2,000 messages read from the store in 0.0042 s showed
/// 0.00), anything else with two (before, every figure had two: `connected 300.00`: a
/// load tester's trial).
fn figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() < 1.0 {
        format!("{v:.4}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_whole_counts_or_fractions_with_their_places() {
        assert_eq!(figure(300.0), "300");
        assert_eq!(figure(0.0042), "0.0042");
        assert_eq!(figure(1.626), "1.63");
        assert_eq!(figure(-3.0), "-3");
    }

    #[test]
    fn an_aim_not_met_is_reported_and_does_not_fail_the_run() {
        let mut report = Report::default();
        report.check("no duplicate delivery", true, "0 duplicated".into());
        report.aim("upload at least 0.75 of min(quinn, fsync)", false, "0.50".into());
        assert!(report.passed(), "an aim decides nothing");
        let table = report.table();
        assert!(table.contains("[aim not met] upload at least 0.75"), "{table}");
        assert!(table.contains("result        PASS"), "{table}");
        report.check("per-conversation order", false, "1 out of order".into());
        assert!(!report.passed());
    }

    #[test]
    fn comparison_sets_figures_side_by_side_with_ratios() {
        let p = |p50_ms, p99_ms, p999_ms| Percentiles { count: 10, p50_ms, p99_ms, p999_ms, ..Percentiles::default() };
        let nats = Report {
            scenario: "fanout (nats)".into(),
            latency: p(0.5, 2.0, 4.0),
            delivered_per_s: 1000.0,
            lost: 3,
            params: [("server".to_owned(), "nats://127.0.0.1:4222".to_owned())].into(),
            ..Report::default()
        };
        let mut ours = Report {
            latency: p(1.0, 5.0, 6.0),
            delivered_per_s: 990.0,
            refused: 7,
            broker: Some(Resources { cpu_pct_mean: 40.0, ..Resources::default() }),
            ..Report::default()
        };
        ours.check("held", true, String::new());
        ours.against = Some(Box::new(nats));
        let table = ours.table();
        let row =
            |label: &str| table.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_default().to_owned();
        let cells = |label: &str| row(label).split_whitespace().rev().take(3).collect::<Vec<_>>().join(" ");
        assert_eq!(cells("delivery p50 ms"), "2.00 0.50 1.00", "{table}");
        assert_eq!(cells("delivery p99 ms"), "2.50 2.00 5.00", "{table}");
        assert_eq!(cells("delivery p99.9 ms"), "1.50 4.00 6.00", "{table}");
        assert_eq!(cells("deliveries/s"), "0.99 1000.00 990.00", "{table}");
        // Not measured on one side: no figure there and no ratio.
        assert_eq!(cells("lost (message, member) pairs"), "0.00 3.00 0.00", "{table}");
        assert_eq!(cells("refused (OVERLOADED)"), "- 0.00 7.00", "{table}");
        assert_eq!(cells("server cpu mean % of a core"), "- - 40.00", "{table}");
        assert!(table.contains("against       fanout (nats) (nats://127.0.0.1:4222)"), "{table}");
        assert!(!table.contains("ramp max sustained"), "no ramp, no ceiling row: {table}");
        assert!(!table.contains("'s ramp:"), "no ramp, no steps: {table}");
        let json = serde_json::to_value(&ours).unwrap();
        assert_eq!(json["against"]["lost"], 3, "the other run is in the JSON in full");
        // A ramp against it prints its steps under its name, after the comparison.
        let step = RampStep { offered_rate: 4321.0, ok: true, ..RampStep::default() };
        if let Some(nats) = ours.against.as_mut() {
            nats.ramp = vec![step];
        }
        let table = ours.table();
        let steps = table.split("nats://127.0.0.1:4222's ramp:").nth(1).unwrap_or_default();
        assert!(steps.lines().any(|l| l.trim_start().starts_with("4321 ")), "{table}");
    }

    #[test]
    fn costs_are_flat_json_with_null_where_not_measured() {
        let harness = Cost { cpu_us_per_ack: 12.5, cpu_us_per_delivery: Some(1.25), ..Cost::default() };
        let report = Report { cost: Costs { broker: None, harness: Some(harness) }, ..Report::default() };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["harness_cpu_us_per_ack"], 12.5);
        assert_eq!(json["harness_cpu_us_per_delivery"], 1.25);
        assert_eq!(json["harness_threads_exited"], 0);
        for name in [
            "cpu_us_per_ack",
            "cpu_us_per_delivery",
            "ctx_switches_per_ack",
            "voluntary_ctx_switches_per_ack",
            "involuntary_ctx_switches_per_ack",
            "threads_exited",
        ] {
            let key = format!("broker_{name}");
            assert!(json.get(&key).is_some_and(serde_json::Value::is_null), "{key} missing or not null");
        }
    }
}
