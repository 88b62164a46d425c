//! `switchboard-load`: realistic chat workloads against a Switchboard broker, with
//! open-loop sending (latency from the scheduled send time, so no coordinated
//! omission), HdrHistogram percentiles, a loss/duplicate/order check of every delivery,
//! and the broker's CPU and memory next to the harness's own, also per message.
//!
//! A scenario is one file under `scenario/`: it enrolls users, creates conversations,
//! says who sends where, and hands over to `run::run_messages`.

pub mod changes;
pub mod checker;
pub mod cost;
pub mod error;
pub mod link;
pub mod load;
pub mod nats;
pub mod payload;
pub mod plot;
pub mod report;
pub mod resources;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use error::{Error, Result};

/// How long a scenario waits, at its end, for its connections' closings to be sent
/// (`Population::wait_idle`): on loopback they go in milliseconds.
pub const CLOSING_WAIT: Duration = Duration::from_secs(3);

/// A task aborted when this is dropped, so that a measurement or relay that ends early
/// (an error, a test that fails) stops what it started.
#[must_use = "dropping it aborts the task at once"]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Flags every scenario takes.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Measured sending time, e.g. `10s`, `2m`, `500ms`, of the scenarios that send at a
    /// rate (storm, catchup and upload run a set amount of work and refuse it).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration, global = true)]
    pub duration: Duration,
    /// Whether `--duration` was on the command line (set by the binary from clap's
    /// matches), so a scenario that has no use for it can say so.
    #[arg(skip)]
    pub duration_given: bool,
    /// Message size in bytes: at least 16 (the payload carries its send time), at most
    /// the broker's text limit.
    #[arg(long, default_value_t = 256, global = true, value_parser = parse_size)]
    pub size: usize,
    /// Write every figure as JSON to this file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Draw latency and throughput over time into this PNG (the name ends in `.png`).
    #[arg(long, global = true, value_parser = parse_png_path)]
    pub plot: Option<PathBuf>,
    /// Raise the rate step by step until a step's p99 over every delivery it should have
    /// made (one refused or lost counts as later than any bound) passes
    /// `--ramp-p99-ms`, or errors appear.
    #[arg(long, global = true)]
    pub ramp: bool,
    /// The p99 bound for `--ramp`, ms.
    #[arg(long, default_value_t = 50.0, value_parser = parse_rate, global = true)]
    pub ramp_p99_ms: f64,
    /// Length of one ramp step, in whole seconds (a step's figures are read from whole
    /// seconds of the run).
    #[arg(long, default_value = "5s", value_parser = parse_whole_seconds, global = true)]
    pub ramp_step: Duration,
    /// Rate multiplier between ramp steps (above 1).
    #[arg(long, default_value_t = 1.25, value_parser = parse_ramp_factor, global = true)]
    pub ramp_factor: f64,
    /// Steps the ramp keeps raising the rate after its first failed step, to show what
    /// happens past saturation (refusals, latency, drops); the result is the fastest
    /// step before the first failed one, whatever these show.
    #[arg(long, default_value_t = 2, global = true)]
    pub ramp_beyond: usize,
    /// Repeats a ramp may make: a step failed on latency or on deliveries not made (not
    /// on errors) is run again at the same rate, and its failure counts only if the
    /// repeat fails too (0: the first failure ends the ramp). A failure a repeat does
    /// not confirm was a moment of the machine's (one slow second on shared cores), not
    /// the server's ceiling: one such spike at a third of the ceiling ended a ramp.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=3), global = true)]
    pub ramp_repeats: u8,
    /// The embedded broker's `max_sends_in_flight` (default: the broker's).
    #[arg(long, global = true)]
    pub broker_max_sends_in_flight: Option<usize>,
    /// The embedded broker's `send_delay_target_ms`; 0 turns the delay rule of its
    /// admission off (default: the broker's).
    #[arg(long, global = true)]
    pub broker_send_delay_target_ms: Option<u64>,
    /// The embedded broker's `socket_backlog_target_ms`; 0 turns the socket-queue rule
    /// of its admission off (default: the broker's, 20).
    #[arg(long, global = true)]
    pub broker_socket_backlog_target_ms: Option<u64>,
    /// The embedded broker's `commit_delay_us`: how long a group commit waits for more
    /// writes to share it (default: the broker's, 0).
    #[arg(long, global = true)]
    pub broker_commit_delay_us: Option<u64>,
    /// The embedded broker's `commit_siblings`: how many other writes must already wait
    /// for a commit before it waits out the commit delay (default: the broker's, 0).
    #[arg(long, global = true)]
    pub broker_commit_siblings: Option<u32>,
    /// Runtime threads of the broker the harness starts as a child process (its
    /// `runtime_workers`; default: one per core). Not for `--in-process`, which shares
    /// the harness's runtime.
    #[arg(long, global = true)]
    pub broker_workers: Option<usize>,
    /// Scheduling policy of the child broker's runtime threads (its `runtime_scheduling`:
    /// `batch` or `normal`; default: the broker's, batch). Not for `--in-process`.
    #[arg(long, global = true)]
    pub broker_scheduling: Option<switchboard_broker::config::Scheduling>,
    /// Use a running broker at this address (`HOST:PORT`; a host name is resolved, its
    /// first IPv4 address taken if it has one, and is the name the broker's certificate
    /// is checked for) instead of starting one.
    #[arg(long, requires = "trust", global = true, value_parser = parse_target)]
    pub target: Option<String>,
    /// Certificate to trust for `--target`.
    #[arg(long, group = "trust", requires = "target", global = true)]
    pub ca: Option<PathBuf>,
    /// Certificate SHA-256 to trust for `--target`.
    #[arg(long, group = "trust", requires = "target", global = true)]
    pub pin: Option<String>,
    /// Sample this broker process's CPU and memory (with `--target`; a process of this
    /// machine, checked at the start).
    #[arg(long, requires = "target", global = true, value_parser = parse_pid)]
    pub broker_pid: Option<u32>,
    /// Run the broker inside the harness process instead of as a child process.
    #[arg(long, global = true)]
    pub in_process: bool,
    /// UDP sockets the embedded broker listens on (its `udp_sockets` setting).
    #[arg(long, default_value_t = 1, global = true, value_parser = parse_count)]
    pub broker_udp_sockets: usize,
    /// The command line, for the report.
    #[arg(skip)]
    pub command: String,
    /// Show a live progress line.
    #[arg(skip)]
    pub progress: bool,
    /// A finished part of a run that has another to go (`fanout --against`'s broker
    /// half while the NATS half runs), which the binary prints if the run is
    /// interrupted (it was discarded with the rest: a load tester's trial).
    #[arg(skip)]
    pub finished_part: std::sync::Arc<std::sync::Mutex<Option<report::Report>>>,
}

impl Default for Common {
    /// The command line's defaults, taken from the flag definitions themselves so the
    /// two can never disagree.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            common: Common,
        }
        <Defaults as clap::Parser>::parse_from(["switchboard-load"]).common
    }
}

impl Common {
    /// An upper bound on the run's length in seconds (for per-second buffers).
    pub fn max_seconds(&self) -> usize {
        // Per step: the step, up to 1.2 s to start on a whole second, up to 5 s of drain.
        let ramp = if self.ramp { self.ramp_max_steps() * (self.ramp_step.as_secs() as usize + 7) + 60 } else { 0 };
        self.duration.as_secs() as usize + ramp + 120
    }

    /// The most steps a ramp runs: `run::RAMP_MAX_STEPS` to its first confirmed failure,
    /// the repeats of failed steps (`--ramp-repeats`, on top), then `--ramp-beyond`.
    pub fn ramp_max_steps(&self) -> usize {
        run::RAMP_MAX_STEPS + usize::from(self.ramp_repeats) + self.ramp_beyond
    }

    /// Checks what clap cannot check flag by flag, before anything starts: the output
    /// files' directories (a run of minutes ended in "No such file or directory" with
    /// its figures unwritten: a load tester's trial) and the flags that only set the
    /// broker the harness starts, given with `--target` (ignored silently before).
    pub fn check(&self) -> Result<()> {
        for path in self.json.iter().chain(&self.plot) {
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => std::path::Path::new("."),
            };
            if !dir.is_dir() {
                return Err(Error::InvalidArgs(format!(
                    "{} cannot be written: {} is not a directory",
                    path.display(),
                    dir.display()
                )));
            }
        }
        if self.target.is_some() {
            let set: Vec<&str> = [
                ("--in-process", self.in_process),
                ("--broker-max-sends-in-flight", self.broker_max_sends_in_flight.is_some()),
                ("--broker-send-delay-target-ms", self.broker_send_delay_target_ms.is_some()),
                ("--broker-socket-backlog-target-ms", self.broker_socket_backlog_target_ms.is_some()),
                ("--broker-commit-delay-us", self.broker_commit_delay_us.is_some()),
                ("--broker-commit-siblings", self.broker_commit_siblings.is_some()),
                ("--broker-udp-sockets", self.broker_udp_sockets != 1),
            ]
            .into_iter()
            .filter_map(|(flag, given)| given.then_some(flag))
            .collect();
            if !set.is_empty() {
                return Err(Error::InvalidArgs(format!(
                    "{} set the broker the harness starts; with --target the broker runs as it was configured \
                     (set those in its config file)",
                    set.join(", ")
                )));
            }
        }
        // The figures are kept per second for a day: a ramp of long steps ran past it and
        // its later steps, offered nothing as counted, passed with nothing measured.
        if self.max_seconds() > stats::MAX_SECONDS {
            return Err(Error::InvalidArgs(format!(
                "the run could last {} s with its ramp (--ramp-step x up to {} steps), over the {} s the \
                 harness keeps figures for: shorten --ramp-step, --ramp-beyond or --ramp-repeats",
                self.max_seconds(),
                self.ramp_max_steps(),
                stats::MAX_SECONDS
            )));
        }
        Ok(())
    }

    /// Refuses the flags of the rate-driven scenarios in one that runs a set amount of
    /// work (`scenario`, named in the message, does `work`): `--ramp`, `--plot` (its
    /// figures are not per second: a trial's plot of one said only "no samples") and a
    /// `--duration` given (a trial's `storm --duration 60s` ran its usual few seconds).
    /// `InvalidArgs` names the flag.
    pub fn refuse_rate_flags(&self, scenario: &str, work: &str) -> Result<()> {
        if self.ramp {
            return Err(Error::InvalidArgs(format!("{scenario} has no rate to ramp (it {work})")));
        }
        if self.duration_given {
            return Err(Error::InvalidArgs(format!("{scenario} takes no --duration (it {work})")));
        }
        if self.plot.is_some() {
            return Err(Error::InvalidArgs(format!(
                "{scenario} records no timeline to plot: --plot draws the message scenarios (fanout, direct, \
                 groups, soak, receipts, presence); --json has every figure"
            )));
        }
        Ok(())
    }

    /// Resolves the broker to test: `--target`, in-process, or a child process.
    pub async fn target(&self) -> Result<target::Target> {
        self.check()?;
        if (self.broker_workers.is_some() || self.broker_scheduling.is_some())
            && (self.in_process || self.target.is_some())
        {
            return Err(Error::InvalidArgs(
                "--broker-workers and --broker-scheduling set the runtime of the broker the harness starts as a child process".into(),
            ));
        }
        if let Some(given) = &self.target {
            let trust = match (&self.ca, &self.pin) {
                (Some(ca), _) => switchboard_client::Trust::CaFile(ca.clone()),
                (None, Some(pin)) => switchboard_client::Trust::Pin(pin.clone()),
                (None, None) => return Err(Error::InvalidArgs("--target needs --ca or --pin".into())),
            };
            let (addr, server_name) = resolve_target(given).map_err(Error::InvalidArgs)?;
            return Ok(target::Target::remote(addr, &server_name, trust, self.broker_pid));
        }
        let knobs = target::BrokerKnobs {
            udp_sockets: self.broker_udp_sockets,
            max_sends_in_flight: self.broker_max_sends_in_flight,
            send_delay_target_ms: self.broker_send_delay_target_ms,
            commit_delay_us: self.broker_commit_delay_us,
            commit_siblings: self.broker_commit_siblings,
            socket_backlog_target_ms: self.broker_socket_backlog_target_ms,
            runtime_workers: self.broker_workers,
            runtime_scheduling: self.broker_scheduling,
        };
        if self.in_process { target::Target::in_process(knobs).await } else { target::Target::child(knobs).await }
    }
}

/// Parses a message size within `payload::MIN_SIZE..=MAX_TEXT_BYTES`: anything else
/// would only measure refused sends.
pub fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let max = switchboard_protocol::limits::MAX_TEXT_BYTES as usize;
    match s.trim().parse::<usize>() {
        Ok(n) if (payload::MIN_SIZE..=max).contains(&n) => Ok(n),
        _ => Err(format!("size must be {}..={max} bytes", payload::MIN_SIZE)),
    }
}

/// Parses a duration (as `parse_duration`) above zero and at most a day: a run of `0s`
/// measures nothing, and the figures are kept per second for a day at most (`99999h`
/// was taken, and its seconds past the first day would have been counted as the last).
pub fn parse_positive_duration(s: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: the run must last longer than zero"));
    }
    if d > MAX_RUN {
        return Err(format!("{s:?}: a run lasts at most 23h"));
    }
    Ok(d)
}

/// The longest `--duration`: the figures kept per second (`stats::MAX_SECONDS`) cover
/// it with room for the set-up and the drain.
pub const MAX_RUN: Duration = Duration::from_secs(23 * 3600);
const _: () = assert!(MAX_RUN.as_secs() as usize + 3600 <= stats::MAX_SECONDS);

/// Parses a rate or bound: a finite number above 0 (`--rate 0` measured nothing, after
/// enrolling every user).
pub fn parse_rate(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number above 0")),
    }
}

/// Parses the ramp's factor: above 1 (a factor of 0.5 ramped down to 0 messages a
/// second, for 40 steps).
pub fn parse_ramp_factor(s: &str) -> std::result::Result<f64, String> {
    match parse_rate(s) {
        Ok(v) if v > 1.0 => Ok(v),
        _ => Err(format!("{s:?}: the ramp raises the rate, so its factor is above 1 (e.g. 1.25)")),
    }
}

/// Parses a count of at least 1.
pub fn parse_count(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

/// Parses the plot's file name: a PNG, named so (`--plot out.svg` wrote PNG bytes under
/// an SVG name).
pub fn parse_png_path(s: &str) -> std::result::Result<PathBuf, String> {
    if s.to_ascii_lowercase().ends_with(".png") {
        Ok(PathBuf::from(s))
    } else {
        Err(format!("{s:?}: the plot is a PNG image; name it FILE.png"))
    }
}

/// Parses `HOST:PORT`, checking that it resolves (`resolve_target`).
pub fn parse_target(s: &str) -> std::result::Result<String, String> {
    resolve_target(s).map(|_| s.to_owned())
}

/// The address of `HOST:PORT` (a host name's first IPv4 address if it has one: a broker
/// listens on 127.0.0.1 by default, and `localhost` resolves to `::1` first on some
/// hosts) and the name to check the broker's certificate for: the host as given, or
/// `localhost` for a loopback address (as `sb` does).
pub fn resolve_target(s: &str) -> std::result::Result<(SocketAddr, String), String> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> =
        s.to_socket_addrs().map_err(|e| format!("{s:?} is not HOST:PORT of a name that resolves: {e}"))?.collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} names no address"))?;
    let host = s.rsplit_once(':').map_or(s, |(host, _)| host).trim_start_matches('[').trim_end_matches(']');
    let name = match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => "localhost".to_owned(),
        _ => host.to_owned(),
    };
    Ok((addr, name))
}

/// Parses a process id of a running process of this machine (`/proc/PID`): a pid that
/// named nothing measured "0% CPU" and passed.
pub fn parse_pid(s: &str) -> std::result::Result<u32, String> {
    let pid: u32 = s.trim().parse().map_err(|_| format!("{s:?} is not a process id"))?;
    if !std::path::Path::new(&format!("/proc/{pid}/stat")).exists() {
        return Err(format!("no process {pid} runs on this machine (the broker's pid, from `pgrep switchboard`)"));
    }
    // Said, not refused: a broker may run under another name. A shell's pid (`$!` of a
    // `cd ... && switchboard &` list) measured 0 µs per message (a trial).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    if !comm.is_empty() && !comm.contains("switchboard") && !comm.contains("nats") {
        eprintln!(
            "warning: process {pid} is {comm:?}, not a broker by its name: its CPU and memory are measured as given"
        );
    }
    Ok(pid)
}

/// Parses a duration (as `parse_duration`) that is a whole number of seconds, at least 1.
pub fn parse_whole_seconds(s: &str) -> std::result::Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 || d.is_zero() {
        return Err(format!("{s:?} is not a whole number of seconds (at least 1s)"));
    }
    Ok(d)
}

/// Parses `10s`, `1.5s`, `250ms`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit in {s:?} (ms, s, m, h)")),
    };
    // `try_`: `1e20s` is finite but no `Duration` (`from_secs_f64` panicked).
    Duration::try_from_secs_f64(secs).map_err(|_| format!("not a duration: {s:?}"))
}

/// A short tag so user names of repeated runs against one broker never clash.
pub fn run_tag() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mixed = nanos ^ (u64::from(std::process::id()) << 24);
    format!("l{:06x}", scenario::SplitMix(mixed).next_u64() & 0xff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("10y").is_err());
        assert!(parse_duration("1e20s").is_err(), "no Duration: it panicked");
        assert_eq!(parse_whole_seconds("5s"), Ok(Duration::from_secs(5)));
        assert!(parse_whole_seconds("1.5s").is_err());
        assert!(parse_whole_seconds("500ms").is_err());
        assert!(parse_whole_seconds("0s").is_err());
    }

    /// What a trial got accepted silently: a ramp factor that lowers the rate, rates and
    /// durations of 0, a plot under another image type's name, a pid of nothing.
    #[test]
    fn values_that_measure_nothing_are_refused() {
        assert!(parse_ramp_factor("0.5").is_err() && parse_ramp_factor("1").is_err());
        assert_eq!(parse_ramp_factor("1.5"), Ok(1.5));
        for bad in ["0", "-1", "NaN", "inf", "x"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rate("0.5"), Ok(0.5));
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_positive_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_positive_duration("99999h").is_err() && parse_positive_duration("24h").is_err());
        assert_eq!(parse_positive_duration("23h"), Ok(MAX_RUN));
        assert!(parse_count("0").is_err());
        assert!(parse_png_path("out.svg").is_err());
        assert_eq!(parse_png_path("out.PNG"), Ok(PathBuf::from("out.PNG")));
        let (addr, name) = resolve_target("localhost:4433").unwrap();
        assert_eq!((addr.port(), name.as_str()), (4433, "localhost"));
        assert!(addr.is_ipv4(), "{addr}");
        assert_eq!(resolve_target("127.0.0.1:4433").unwrap().1, "localhost");
        assert_eq!(resolve_target("192.0.2.7:4433").unwrap().1, "192.0.2.7");
        assert_eq!(resolve_target("[::1]:4433").unwrap().1, "localhost");
        assert!(parse_target("localhost").is_err());
        assert_eq!(parse_pid(&std::process::id().to_string()), Ok(std::process::id()));
        assert!(parse_pid("4294967295").is_err());
    }

    #[tokio::test]
    async fn output_files_in_a_missing_directory_and_broker_flags_with_target_are_refused() {
        let missing = Common { json: Some("/nonexistent/dir/x.json".into()), ..Common::default() };
        let said = missing.check().unwrap_err().to_string();
        assert!(said.contains("/nonexistent/dir is not a directory"), "{said}");
        let target = Some("127.0.0.1:4433".to_owned());
        let remote = Common { target, pin: Some("00".into()), broker_commit_delay_us: Some(1000), ..Common::default() };
        let said = remote.target().await.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(said.contains("--broker-commit-delay-us set the broker the harness starts"), "{said}");
        let long_ramp = Common { ramp: true, ramp_step: Duration::from_secs(3600), ..Common::default() };
        let said = long_ramp.check().unwrap_err().to_string();
        assert!(said.contains("shorten --ramp-step"), "{said}");
        let ramp = Common { ramp: true, ramp_step: Duration::from_secs(60), ..Common::default() };
        assert!(ramp.check().is_ok());
    }

    #[test]
    fn defaults_and_sizes() {
        let common = Common::default();
        assert_eq!((common.duration, common.size, common.ramp_p99_ms), (Duration::from_secs(10), 256, 50.0));
        assert_eq!(parse_size("16"), Ok(16));
        assert!(parse_size("15").is_err());
        assert!(parse_size("5000").is_err());
    }

    #[tokio::test]
    async fn runtime_knobs_are_refused_for_a_broker_the_harness_does_not_start() {
        // A run against `--target` recorded `--broker-scheduling normal` on its command
        // line while the broker ran as it was configured.
        let target = Some("127.0.0.1:4433".to_owned());
        let scheduling = Some(switchboard_broker::config::Scheduling::Normal);
        for common in [
            Common { target, pin: Some("00".into()), broker_scheduling: scheduling, ..Common::default() },
            Common { in_process: true, broker_scheduling: scheduling, ..Common::default() },
            Common { in_process: true, broker_workers: Some(1), ..Common::default() },
        ] {
            let refused = common.target().await.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(refused.contains("--broker-scheduling set the runtime"), "{refused}");
        }
    }
}
