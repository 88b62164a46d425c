//! Latency and throughput collection. Readers buffer samples locally and hand them
//! over in batches, so the hot path is a `Vec::push`; the collector keeps one
//! histogram per second (for the timeline and ramp steps) and one for the whole run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;

/// Latencies above this are clamped (a minute: anything slower is a failure anyway).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Samples a reader buffers before handing them over.
pub const BATCH: usize = 256;
/// Seconds of timeline kept (longer runs fold into the last bucket).
pub const MAX_SECONDS: usize = 24 * 3600;

/// Monotonic nanoseconds since the harness started.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Default for Clock {
    fn default() -> Self {
        Clock(Instant::now())
    }
}

impl Clock {
    /// Nanoseconds since the clock was made.
    pub fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }

    /// The tokio instant of a clock reading.
    pub fn instant(&self, ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + std::time::Duration::from_nanos(ns))
    }
}

fn histogram(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig).expect("constant histogram bounds are valid")
}

/// One second of the run.
pub struct Second {
    /// Delivery latencies of messages scheduled in this second.
    pub latency: Histogram<u64>,
    /// Deliveries of messages scheduled in this second.
    pub delivered: u64,
}

/// Everything readers and writers report.
pub struct Stats {
    /// Run start on the harness clock; seconds count from here.
    pub start_ns: u64,
    inner: Mutex<Inner>,
    /// Messages written, by second of their schedule.
    sent: Vec<AtomicU64>,
    /// Deliveries the messages written should make (each message's recipients), by
    /// second of their schedule.
    offered: Vec<AtomicU64>,
    /// Totals for the live progress line.
    pub sent_total: AtomicU64,
    /// Deliveries so far.
    pub delivered_total: AtomicU64,
    /// Acknowledgements so far.
    pub acked_total: AtomicU64,
    /// Failed requests so far (`OVERLOADED` refusals and lost connections are counted
    /// apart).
    pub errors_total: AtomicU64,
    /// Sends the broker refused with `OVERLOADED` so far: shed load, not failures.
    pub refused_total: AtomicU64,
    /// Harness connections the broker closed (or that were lost) before the run ended
    /// them: a broker stopped or killed mid-run, or a device closed as a slow consumer.
    pub connections_lost: AtomicU64,
    /// When the first of those was lost, harness clock ns (`u64::MAX`: none).
    pub first_loss_ns: AtomicU64,
}

struct Inner {
    latency: Histogram<u64>,
    ack_latency: Histogram<u64>,
    seconds: Vec<Second>,
}

impl Stats {
    /// A collector for a run starting at `start_ns` and lasting about `seconds`.
    pub fn new(start_ns: u64, seconds: usize) -> Self {
        let seconds = seconds.clamp(1, MAX_SECONDS);
        Stats {
            start_ns,
            inner: Mutex::new(Inner { latency: histogram(3), ack_latency: histogram(3), seconds: Vec::new() }),
            sent: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            offered: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            sent_total: AtomicU64::new(0),
            delivered_total: AtomicU64::new(0),
            acked_total: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            connections_lost: AtomicU64::new(0),
            first_loss_ns: AtomicU64::new(u64::MAX),
        }
    }

    /// Counts a connection lost at `now_ns` for `why`; the first is logged (a broker
    /// killed mid-run went unsaid: a load tester's trial).
    pub fn connection_lost(&self, now_ns: u64, why: &str) {
        self.connections_lost.fetch_add(1, Ordering::Relaxed);
        if self.first_loss_ns.compare_exchange(u64::MAX, now_ns, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(
                at_s = format!("{:.1}", now_ns.saturating_sub(self.start_ns) as f64 / 1e9),
                "a connection to the broker was lost before the run ended it: {why} (later ones are counted)"
            );
        }
    }

    /// The connections lost so far and when the first was, seconds from the start.
    pub fn losses(&self) -> (u64, Option<f64>) {
        let first = self.first_loss_ns.load(Ordering::Relaxed);
        let at = (first != u64::MAX).then(|| first.saturating_sub(self.start_ns) as f64 / 1e9);
        (self.connections_lost.load(Ordering::Relaxed), at)
    }

    /// The second (from start) a schedule time falls in.
    pub fn second_of(&self, ns: u64) -> usize {
        (ns.saturating_sub(self.start_ns) / 1_000_000_000) as usize
    }

    /// Counts a sent message that should make `deliveries` deliveries (its
    /// conversation's members but the sender).
    pub fn sent(&self, sched_ns: u64, deliveries: u64) {
        self.offer(sched_ns, deliveries);
        self.sent[self.slot_of(sched_ns)].fetch_add(1, Ordering::Relaxed);
        self.sent_total.fetch_add(1, Ordering::Relaxed);
    }

    /// The per-second slot of a schedule time, the last for any later one (a payload
    /// claiming a far-off schedule cannot allocate a day of buckets).
    fn slot_of(&self, ns: u64) -> usize {
        self.second_of(ns).min(self.sent.len() - 1)
    }

    /// Counts the `deliveries` of a message the schedule offered at `sched_ns`, sent or
    /// not: one its writer never sent (the stream failed first) is offered and never
    /// made, as a refused one is, so a ramp step's p99 over every offered delivery
    /// counts it (a writer that stopped left the rest of its schedule out of the step).
    pub fn offer(&self, sched_ns: u64, deliveries: u64) {
        self.offered[self.slot_of(sched_ns)].fetch_add(deliveries, Ordering::Relaxed);
    }

    /// Deliveries that the messages sent in second `s` should make.
    pub fn offered_in(&self, s: usize) -> u64 {
        self.offered.get(s).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Messages sent in second `s`.
    pub fn sent_in(&self, s: usize) -> u64 {
        self.sent.get(s).map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Takes a reader's batch of (schedule ns, latency µs) delivery samples.
    pub fn deliveries(&self, batch: &mut Vec<(u64, u64)>) {
        if batch.is_empty() {
            return;
        }
        self.delivered_total.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for &(sched, us) in batch.iter() {
            let us = us.clamp(1, MAX_LATENCY_US);
            let _ = inner.latency.record(us);
            // Same bound as the sent counters (another writer in a shared conversation
            // may claim any schedule).
            let s = self.slot_of(sched);
            while inner.seconds.len() <= s {
                inner.seconds.push(Second { latency: histogram(2), delivered: 0 });
            }
            let second = &mut inner.seconds[s];
            let _ = second.latency.record(us);
            second.delivered += 1;
        }
        batch.clear();
    }

    /// Takes a writer-side batch of acknowledgement latencies (µs).
    pub fn acks(&self, batch: &mut Vec<u64>) {
        if batch.is_empty() {
            return;
        }
        self.acked_total.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for &us in batch.iter() {
            let _ = inner.ack_latency.record(us.clamp(1, MAX_LATENCY_US));
        }
        batch.clear();
    }

    /// Whole-run delivery and ack latency histograms.
    pub fn totals(&self) -> (Histogram<u64>, Histogram<u64>) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.latency.clone(), inner.ack_latency.clone())
    }

    /// Merged histogram and delivery count of seconds `from..to`.
    pub fn window(&self, from: usize, to: usize) -> (Histogram<u64>, u64) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = histogram(2);
        let mut n = 0;
        for s in inner.seconds.iter().take(to).skip(from) {
            let _ = h.add(&s.latency);
            n += s.delivered;
        }
        (h, n)
    }

    /// Requests answered so far: acknowledged, failed or refused.
    pub fn answered_total(&self) -> u64 {
        self.acked_total.load(Ordering::Relaxed)
            + self.errors_total.load(Ordering::Relaxed)
            + self.refused_total.load(Ordering::Relaxed)
    }

    /// Seconds with any data.
    pub fn seconds_seen(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).seconds.len()
    }
}
