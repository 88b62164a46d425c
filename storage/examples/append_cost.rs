//! What the store spends per text message: CPU and log bytes of `Store::append_then`
//! with the idempotency lookup before it, over many conversations appended to in turn, the
//! way conversation actors append under `switchboard-load direct`. No network, no
//! broker: the store alone, so a change to it (or to `patches/sled`) can be measured
//! without the harness's noise.
//!
//! ```sh
//! cargo run --release -p switchboard-storage --example append_cost
//! CONVS=5000 N=100000 INFLIGHT=4 cargo run --release -p switchboard-storage --example append_cost
//! ```
//!
//! - `CONVS`: conversations, two senders each (default 5,000);
//! - `N`: appends in each of the two phases, a warm-up and the measured one (100,000);
//! - `INFLIGHT`: appends that may wait for their group commit at once (4, about what
//!   `direct --users 4000` keeps waiting; a large number lets the appender run ahead);
//! - `CACHE_MIB`: sled's page cache (default the store's, 256 MiB). With a cache the
//!   warm-up fills (8 MiB fills in about 20,000 appends), the measured phase's resident
//!   growth is what the store keeps per message beyond its cache;
//! - `REOPEN` (default 1; 0 to skip): then what a restart holds, a fresh process of this
//!   program opening a copy of the data dir against one opening an empty dir (resident
//!   memory 3 s after the open, per stored append);
//! - `KEEP`: a directory to write the store to and leave behind, for a profiler:
//!   `APPEND_COST_OPEN=DIR heaptrack append_cost` opens it, prints its resident memory and
//!   exits holding it, so that what heaptrack reports as leaked is what the open store
//!   holds.
//!
//! Prints, per phase: process CPU per append (the appender, the committer and sled's
//! threads; `/proc/self/stat`, 10 ms ticks), the appending thread's CPU per append
//! (`/proc/thread-self/stat`), log bytes written per append (`wchar` of `/proc/self/io`),
//! the growth of resident memory per append (`VmRSS` of `/proc/self/status`, KiB), and
//! the commits so far; then the `REOPEN` line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use switchboard_protocol::{Body, Entry};
use switchboard_storage::{Store, StoreConfig};

/// utime + stime of a `/proc/.../stat` file, in clock ticks (10 ms).
fn cpu_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).expect("/proc is readable");
    // Fields after the command name, which ends with the last ')': state is field 3.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..].split_whitespace().collect();
    fields[14 - 3].parse::<u64>().unwrap_or(0) + fields[15 - 3].parse::<u64>().unwrap_or(0)
}

/// Bytes this process passed to write calls so far.
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc is readable");
    io.lines().find_map(|line| line.strip_prefix("wchar: ")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Resident memory of this process, in bytes.
fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc is readable");
    let kib = status.lines().find_map(|line| line.strip_prefix("VmRSS:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Opens the store at `path` in this process, waits for sled's start-up work to settle,
/// and returns the resident memory (bytes).
fn resident_after_open(path: &str) -> u64 {
    let store = Store::open(&StoreConfig::new(std::path::PathBuf::from(path))).expect("the store opens");
    std::thread::sleep(std::time::Duration::from_secs(3));
    let bytes = resident();
    // Not closed: the process exits holding the store, so that a heap profiler's
    // "leaked" is what the open store holds (`heaptrack`, docs/benchmarks.md).
    std::mem::forget(store);
    bytes
}

fn main() {
    if let Ok(path) = std::env::var("APPEND_COST_OPEN") {
        // A fresh process opening a data dir (see `REOPEN` below).
        println!("{}", resident_after_open(&path));
        return;
    }
    let convs = setting("CONVS", 5_000).max(1);
    let n = setting("N", 100_000).max(1);
    let inflight = setting("INFLIGHT", 4).max(1);
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = std::env::var("KEEP").map(std::path::PathBuf::from).unwrap_or_else(|_| dir.path().join("store"));
    let mut config = StoreConfig::new(path.clone());
    if let Ok(mib) = std::env::var("CACHE_MIB") {
        config.cache_capacity_bytes = mib.parse::<u64>().expect("CACHE_MIB is a number") * 1024 * 1024;
    }
    let store = Store::open(&config).expect("the store opens");
    let done = Arc::new(AtomicU64::new(0));
    let (durable_tx, durable_rx) = mpsc::channel::<()>();
    let text = "x".repeat(256);
    let mut appended: u64 = 0;
    for phase in ["warm-up", "measured"] {
        let (process0, thread0, written0, resident0) =
            (cpu_ticks("/proc/self/stat"), cpu_ticks("/proc/thread-self/stat"), written(), resident());
        let started = std::time::Instant::now();
        for _ in 0..n {
            let conv = appended % convs + 1;
            let seq = appended / convs + 1;
            let sender = 2 * conv + seq % 2;
            let mut client_id = [0u8; 16];
            client_id[..8].copy_from_slice(&appended.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            let known = store.dedupe(conv, sender, &client_id).expect("the lookup reads");
            assert!(known.is_none(), "every client id is new");
            let entry = Entry {
                conv,
                seq,
                sender,
                sender_device: sender,
                client_id,
                at_ms: appended,
                body: Body::Text { text: text.clone(), edited: false },
            };
            let (counted, signal) = (done.clone(), durable_tx.clone());
            store
                .append_then(&entry, move |result| {
                    result.expect("the commit succeeds");
                    counted.fetch_add(1, Ordering::Relaxed);
                    let _ = signal.send(());
                })
                .expect("the append is written");
            appended += 1;
            while appended - done.load(Ordering::Relaxed) > inflight {
                let _ = durable_rx.recv();
            }
        }
        while done.load(Ordering::Relaxed) < appended {
            let _ = durable_rx.recv();
        }
        let per_append = |ticks: u64| ticks as f64 * 10_000.0 / n as f64;
        println!(
            "{phase}: {n} appends over {convs} conversations in {:.2} s: process CPU {:.1} us per append, \
             appending thread {:.1} us, log {:.0} bytes, resident memory {:+.0} bytes; {} commits so far",
            started.elapsed().as_secs_f64(),
            per_append(cpu_ticks("/proc/self/stat") - process0),
            per_append(cpu_ticks("/proc/thread-self/stat") - thread0),
            (written() - written0) as f64 / n as f64,
            (resident() as f64 - resident0 as f64) / n as f64,
            store.commit_stats().commits(),
        );
    }
    store.close().expect("the store closes");
    if setting("REOPEN", 1) == 1 {
        // What a restart holds: a fresh process opening this data dir against one opening
        // an empty one, each measured after sled's start-up work.
        let open = |path: &std::path::Path| {
            let out = std::process::Command::new(std::env::current_exe().expect("this program"))
                .env("APPEND_COST_OPEN", path)
                .output()
                .expect("the program runs again");
            let stdout = String::from_utf8_lossy(&out.stdout);
            stdout.trim().parse::<f64>().unwrap_or_else(|_| panic!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        };
        // sled may hold this process's file lock a while after the close: open a copy.
        let copy = dir.path().join("copy");
        let copied = std::process::Command::new("cp").arg("-a").arg(&path).arg(&copy).status();
        assert!(copied.is_ok_and(|s| s.success()), "the data dir is copied");
        let (stored, fresh) = (open(&copy), open(&dir.path().join("empty")));
        println!(
            "reopened: resident memory {:.1} MiB against {:.1} MiB empty, {:.0} bytes per stored append",
            stored / 1048576.0,
            fresh / 1048576.0,
            (stored - fresh) / (2 * n) as f64,
        );
    }
}
