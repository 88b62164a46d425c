//! CPU and memory of a process, read from /proc: the broker (child or `--broker-pid`)
//! and the harness itself, so a report says which one was the bottleneck.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::report::Resources;

/// One reading.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Seconds since the sampler started.
    pub t_s: f64,
    /// CPU over the last interval, percent of one core.
    pub cpu_pct: f64,
    /// Resident memory, MiB.
    pub rss_mib: f64,
}

/// The broker's metrics endpoint reads its own CPU time the same way.
pub use switchboard_broker::metrics::{TICKS_PER_S, cpu_ticks};

/// Total user+system CPU seconds of `pid` ("self" for this process).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let ticks = cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(ticks as f64 / TICKS_PER_S)
}

/// (voluntary, involuntary) context switches from the text of a /proc status file.
/// They are per thread: /proc/PID/status holds only the main thread's, so a process's
/// total is the sum over /proc/PID/task/*/status.
pub fn context_switches(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name))?.trim().parse::<u64>().ok();
    Some((field("voluntary_ctxt_switches:")?, field("nonvoluntary_ctxt_switches:")?))
}

/// Resident memory of `pid` in MiB.
pub fn rss_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Samples a process every `period` until dropped.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
    /// What the samples' `t_s` count from.
    started: std::time::Instant,
}

impl Sampler {
    /// Starts sampling `pid` ("self" for this process).
    pub fn start(pid: String, period: Duration) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let started = std::time::Instant::now();
        let task = tokio::spawn(async move {
            let start = started;
            let mut last_cpu = cpu_seconds(&pid).unwrap_or(0.0);
            let mut last_t = start;
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (Some(cpu), Some(rss)) = (cpu_seconds(&pid), rss_mib(&pid)) else { break };
                let now = std::time::Instant::now();
                let dt = now.duration_since(last_t).as_secs_f64().max(1e-3);
                let sample = Sample {
                    t_s: now.duration_since(start).as_secs_f64(),
                    cpu_pct: (cpu - last_cpu) / dt * 100.0,
                    rss_mib: rss,
                };
                (last_cpu, last_t) = (cpu, now);
                out.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
            }
        });
        Sampler { samples, task, started }
    }

    /// Readings so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Summary of the readings from `from_s` on.
    pub fn summary(&self, from_s: f64) -> Resources {
        summarize(&self.samples().into_iter().filter(|s| s.t_s >= from_s).collect::<Vec<_>>())
    }

    /// Summary of the readings of the intervals from `from` to `to` (each reading covers
    /// the period before it, so those up to a period after `to`, `period` long). A run's
    /// figures over its measured phase: before, they also took the drain after it (the
    /// CPU falling to nothing) and counted from a different origin, so a run whose every
    /// second showed 85% reported a mean of 72% (a load tester's trial).
    pub fn summary_within(&self, from: std::time::Instant, to: std::time::Instant, period: Duration) -> Resources {
        let at = |i: std::time::Instant| i.saturating_duration_since(self.started).as_secs_f64();
        let (from_s, to_s) = (at(from), at(to) + period.as_secs_f64());
        summarize(&self.samples().into_iter().filter(|s| s.t_s > from_s && s.t_s <= to_s).collect::<Vec<_>>())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Mean and peak of a series of samples.
pub fn summarize(samples: &[Sample]) -> Resources {
    if samples.is_empty() {
        return Resources::default();
    }
    let n = samples.len() as f64;
    Resources {
        cpu_pct_mean: samples.iter().map(|s| s.cpu_pct).sum::<f64>() / n,
        cpu_pct_max: samples.iter().map(|s| s.cpu_pct).fold(0.0, f64::max),
        rss_mib_start: samples[0].rss_mib,
        rss_mib_peak: samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max),
        rss_mib_end: samples[samples.len() - 1].rss_mib,
    }
}

/// Datagrams the kernel dropped because a UDP socket's receive buffer was full, over
/// the whole machine (`RcvbufErrors` in /proc/net/snmp). On loopback each drop costs a
/// QUIC retransmission timeout, so a run with drops shows latency spikes that are the
/// machine's, not the broker's logic: the report says so.
pub fn udp_receive_drops() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (header, values) = (lines.next()?, lines.next()?);
    let column = header.split_whitespace().position(|h| h == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// Page cache the machine has yet to write to disk (`Dirty` + `Writeback` of
/// /proc/meminfo), bytes; `None` if unreadable.
pub fn pending_writeback_bytes() -> Option<u64> {
    pending_writeback_of(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn pending_writeback_of(meminfo: &str) -> Option<u64> {
    let kib = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.split(':').next() == Some(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kib("Dirty")? + kib("Writeback")?) * 1024)
}

/// Pending writeback above which a run writes it back before measuring.
pub const SETTLE_WRITEBACK_ABOVE_BYTES: u64 = 64 << 20;

/// Writes back what the machine has pending (`sync`) when it is over
/// `SETTLE_WRITEBACK_ABOVE_BYTES`, before a measured phase: what other processes left
/// dirty (a build's gigabytes, a previous run's files) is otherwise written back by the
/// kernel about 30 s later (`vm.dirty_expire_centisecs`), inside the run, and the
/// broker's fdatasyncs wait behind it on the same disk. Measured: 1.5 GB written just
/// before `direct --users 10000` put two seconds of its measured phase at p99 290 and
/// 360 ms (group commits of 100–190 ms) and had 4,340 writes refused `OVERLOADED`; with
/// the same 1.5 GB synced first, p99 4.8 ms and 81 refused (docs/benchmarks.md, "Other
/// processes' writeback"). Returns (bytes pending, milliseconds the sync took) when it
/// synced.
pub async fn settle_writeback() -> Option<(u64, f64)> {
    let pending = pending_writeback_bytes()?;
    if pending <= SETTLE_WRITEBACK_ABOVE_BYTES {
        return None;
    }
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(rustix::fs::sync).await.ok()?;
    Some((pending, started.elapsed().as_secs_f64() * 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_writeback_is_dirty_plus_writeback() {
        let meminfo = "MemTotal:       24000000 kB\nDirty:           1536020 kB\nWriteback:         90112 kB\n";
        assert_eq!(pending_writeback_of(meminfo), Some((1_536_020 + 90_112) * 1024));
        assert_eq!(pending_writeback_of("Dirty: 1 kB\n"), None);
    }

    #[test]
    fn cpu_ticks_from_stat() {
        // utime 1234 and stime 56 are fields 14 and 15; the command name may hold
        // spaces and parentheses.
        let check = |stat: &str, expected: Option<u64>| assert_eq!(cpu_ticks(stat), expected, "{stat:?}");
        let tail = "S 1 4590 4590 0 -1 4194560 1510 0 0 0 1234 56 0 0 20 0 15 0 99 1000 2000";
        check(&format!("4590 (switchboard-lo) {tail}"), Some(1290));
        check(&format!("4590 (sb (x) y) {tail}"), Some(1290));
        check("4590 (sb) S 1 2 3", None);
        check("4590 sb S 1", None);
        check("", None);
    }

    #[test]
    fn context_switches_from_status() {
        let status = "Name:\tsb-broker\nState:\tS (sleeping)\nThreads:\t15\n\
                      voluntary_ctxt_switches:\t8123\nnonvoluntary_ctxt_switches:\t47\n";
        assert_eq!(context_switches(status), Some((8123, 47)));
        assert_eq!(context_switches("Name:\tx\nvoluntary_ctxt_switches:\t1\n"), None, "involuntary missing");
        assert_eq!(context_switches("voluntary_ctxt_switches:\tmany\nnonvoluntary_ctxt_switches:\t1\n"), None);
    }
}
