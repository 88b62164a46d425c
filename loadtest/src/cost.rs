//! What a process spends per message: its CPU time and context switches over the
//! measured phase, divided by the acknowledgements and deliveries of the same window.
//! Per-second figures move with the offered load and the machine; per-message figures
//! let runs on different machines and commits be compared.
//!
//! A reading is taken from /proc when the measured phase starts and again when its
//! drain ends. CPU time is the whole process's (/proc/PID/stat keeps the time of threads
//! that have exited). Linux counts context switches per thread, so they are summed over
//! /proc/PID/task/*/status: a thread that exits inside the window takes its count with
//! it, and one that starts and exits inside it is never seen. `Cost::threads_exited`
//! counts the first kind, so a reader can tell when the figure is low. The switches are
//! also given per kind of thread (its name without a trailing number: `sb-committer`,
//! `sled-io`), so a run says where its wakeups are, not only how many (issue 10, item 1).

use std::collections::BTreeMap;

use crate::report::Cost;
use crate::resources::{TICKS_PER_S, context_switches, cpu_ticks};

/// Cumulative counters of one process at one instant.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// User+system CPU, clock ticks.
    pub cpu_ticks: u64,
    /// (voluntary, involuntary) context switches so far, by thread id.
    pub switches: BTreeMap<u32, (u64, u64)>,
    /// Each thread's kind (`thread_kind`), by thread id.
    pub kinds: BTreeMap<u32, String>,
}

impl Usage {
    /// Reads `pid` ("self" for this process); `None` if it is no process this machine
    /// can read.
    pub fn read(pid: &str) -> Option<Usage> {
        let cpu_ticks = cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        let (mut switches, mut kinds) = (BTreeMap::new(), BTreeMap::new());
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
            // A thread that exits between the listing and this read is not counted.
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            if let Some(counts) = context_switches(&status) {
                switches.insert(tid, counts);
                kinds.insert(tid, thread_kind(&status));
            }
        }
        Some(Usage { cpu_ticks, switches, kinds })
    }
}

/// A thread's kind: the name on the `Name:` line of its /proc status without a trailing
/// number (`sled-io-3` and `sled-io-4` are `sled-io`); `?` without a name.
pub fn thread_kind(status: &str) -> String {
    let name = status.lines().find_map(|l| l.strip_prefix("Name:")).map_or("", str::trim);
    let kind = name.trim_end_matches(|c: char| c.is_ascii_digit()).trim_end_matches(['-', '_', '#', ' ']);
    if kind.is_empty() { "?".into() } else { kind.into() }
}

/// The cost per message of the window from `start` to `end`; `None` without an
/// acknowledged message to divide by.
pub fn per_message(start: &Usage, end: &Usage, acks: u64, deliveries: u64) -> Option<Cost> {
    if acks == 0 {
        return None;
    }
    let (mut voluntary, mut involuntary) = (0, 0);
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for (tid, &(v, i)) in &end.switches {
        // A thread born inside the window counts from zero.
        let (v0, i0) = start.switches.get(tid).copied().unwrap_or_default();
        let (v, i) = (v.saturating_sub(v0), i.saturating_sub(i0));
        voluntary += v;
        involuntary += i;
        *by_kind.entry(end.kinds.get(tid).map_or("?", String::as_str)).or_default() += v + i;
    }
    let mut by_thread: Vec<(String, f64)> =
        by_kind.into_iter().map(|(kind, n)| (kind.to_owned(), n as f64 / acks as f64)).collect();
    by_thread.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let cpu_us = end.cpu_ticks.saturating_sub(start.cpu_ticks) as f64 / TICKS_PER_S * 1e6;
    let acks = acks as f64;
    Some(Cost {
        cpu_us_per_ack: cpu_us / acks,
        cpu_us_per_delivery: (deliveries > 0).then(|| cpu_us / deliveries as f64),
        ctx_switches_per_ack: (voluntary + involuntary) as f64 / acks,
        voluntary_ctx_switches_per_ack: voluntary as f64 / acks,
        involuntary_ctx_switches_per_ack: involuntary as f64 / acks,
        ctx_switches_per_ack_by_thread: by_thread,
        threads_exited: start.switches.keys().filter(|tid| !end.switches.contains_key(tid)).count() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(cpu_ticks: u64, threads: &[(u32, u64, u64)]) -> Usage {
        let kind = |tid: u32| if tid == 1 { "sb-broker".to_owned() } else { format!("sled-io-{tid}") };
        Usage {
            cpu_ticks,
            switches: threads.iter().map(|&(tid, v, i)| (tid, (v, i))).collect(),
            kinds: threads.iter().map(|&(tid, ..)| (tid, thread_kind(&format!("Name:\t{}\n", kind(tid))))).collect(),
        }
    }

    #[test]
    fn deltas_per_message() {
        // Thread 2 exits (its switches are lost), thread 3 is born (counts from zero).
        let start = usage(1_000, &[(1, 100, 10), (2, 50, 5)]);
        let end = usage(1_250, &[(1, 400, 30), (3, 100, 20)]);
        let cost = per_message(&start, &end, 1_000, 10_000).unwrap();
        assert_eq!(cost.cpu_us_per_ack, 2_500.0, "2.5 s of CPU over 1,000 acks");
        assert_eq!(cost.cpu_us_per_delivery, Some(250.0));
        assert_eq!(cost.voluntary_ctx_switches_per_ack, 0.4, "(300 + 100) / 1,000");
        assert_eq!(cost.involuntary_ctx_switches_per_ack, 0.04, "(20 + 20) / 1,000");
        assert_eq!(cost.ctx_switches_per_ack, 0.44);
        assert_eq!(cost.threads_exited, 1);
        // By kind, the most first: thread 1 (sb-broker) 320, thread 3 (sled-io-3) 120.
        assert_eq!(cost.ctx_switches_per_ack_by_thread, [("sb-broker".to_owned(), 0.32), ("sled-io".to_owned(), 0.12)]);
    }

    #[test]
    fn thread_kinds_drop_their_number() {
        assert_eq!(thread_kind("Name:\tsled-io-3\nState:\tS\n"), "sled-io");
        assert_eq!(thread_kind("Name:\tsb-committer\n"), "sb-committer");
        assert_eq!(thread_kind("Name:\ttokio-runtime-w\n"), "tokio-runtime-w");
        assert_eq!(thread_kind("State:\tS\n"), "?");
    }

    #[test]
    fn nothing_to_divide_by() {
        let (start, end) = (usage(0, &[(1, 1, 1)]), usage(100, &[(1, 9, 9)]));
        assert!(per_message(&start, &end, 0, 0).is_none());
        assert_eq!(per_message(&start, &end, 10, 0).unwrap().cpu_us_per_delivery, None);
    }

    #[test]
    fn reads_this_process() {
        let usage = Usage::read("self").unwrap();
        assert!(!usage.switches.is_empty(), "at least the test's own thread");
        assert!(Usage::read("0").is_none(), "pid 0 has no /proc entry");
    }
}
