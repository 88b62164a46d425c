//! The broker under test: a child process started from this very binary (default, so
//! its CPU and memory are measured apart from the harness), a broker inside this
//! process (tests), or a running one given by address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use switchboard_broker::config::Scheduling;
use switchboard_broker::{Broker, Config};
use switchboard_client::{Connector, TransportOptions, Trust};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::error::{Error, Result};

/// Hidden subcommand that runs the embedded broker child.
pub const CHILD_COMMAND: &str = "__broker";
/// An owned broker's data dir, inside its temp dir.
const DATA_DIR: &str = "data";

/// Longest the harness keeps registering one user answered `OVERLOADED` (a broker's full
/// password queue, `argon2_queue`, or its quarter per address: the harness registers every
/// user from one address), with the client library's backoff
/// (`TransportOptions::enroll_retry_for`).
const ENROLL_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// Where the broker is.
pub struct Target {
    /// UDP address.
    pub addr: SocketAddr,
    /// How to trust it.
    pub trust: Trust,
    /// TLS server name.
    pub server_name: String,
    /// Its process id, when known (for resource sampling).
    pub pid: Option<u32>,
    /// Owned broker, stopped with the target.
    owned: Owned,
}

enum Owned {
    None,
    /// The child before its data: dropped in this order, the child is gone before its
    /// data dir is removed.
    Child(Reaped, tempfile::TempDir),
    InProcess(Box<Broker>, tempfile::TempDir),
}

/// A broker child that, dropped (a run interrupted or failed), is killed and waited for
/// (up to a second), so that its data dir, removed next, is not written to meanwhile
/// (kill-on-drop alone only sends the signal).
struct Reaped(tokio::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            let _ = self.0.start_kill();
            for _ in 0..100 {
                if matches!(self.0.try_wait(), Ok(Some(_)) | Err(_)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// The broker configuration the harness embeds: ephemeral port, cheap argon2 (the
/// harness enrolls thousands of users; password hashing is not what it measures).
pub fn embedded_config(data_dir: PathBuf, udp_sockets: usize) -> Config {
    let mut config = Config::ephemeral(data_dir);
    config.store_cache_bytes = 256 * 1024 * 1024;
    config.udp_sockets = udp_sockets.max(1);
    config
}

/// Settings of a broker the harness starts, beyond `embedded_config`'s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BrokerKnobs {
    /// Its `udp_sockets`.
    pub udp_sockets: usize,
    /// Its `max_sends_in_flight`; `None` keeps the broker's default.
    pub max_sends_in_flight: Option<usize>,
    /// Its `send_delay_target_ms`; `None` keeps the broker's default.
    pub send_delay_target_ms: Option<u64>,
    /// Its `commit_delay_us`; `None` keeps the broker's default.
    pub commit_delay_us: Option<u64>,
    /// Its `commit_siblings`; `None` keeps the broker's default.
    pub commit_siblings: Option<u32>,
    /// Its `socket_backlog_target_ms`; `None` keeps the broker's default.
    pub socket_backlog_target_ms: Option<u64>,
    /// Its `runtime_workers` (a child's runtime threads); `None`: one per core.
    pub runtime_workers: Option<usize>,
    /// Its `runtime_scheduling`; `None` keeps the broker's default.
    pub runtime_scheduling: Option<Scheduling>,
}

impl BrokerKnobs {
    /// The configuration of a broker with its data in `data_dir`.
    pub fn config(&self, data_dir: PathBuf) -> Config {
        let mut config = embedded_config(data_dir, self.udp_sockets);
        if let Some(max) = self.max_sends_in_flight {
            config.max_sends_in_flight = max;
        }
        if let Some(ms) = self.send_delay_target_ms {
            config.send_delay_target_ms = ms;
        }
        if let Some(us) = self.commit_delay_us {
            config.commit_delay_us = us;
        }
        if let Some(n) = self.commit_siblings {
            config.commit_siblings = n;
        }
        if let Some(ms) = self.socket_backlog_target_ms {
            config.socket_backlog_target_ms = ms;
        }
        if let Some(n) = self.runtime_workers {
            config.runtime_workers = n;
        }
        if let Some(scheduling) = self.runtime_scheduling {
            config.runtime_scheduling = scheduling;
        }
        config
    }

    /// As arguments of the child command (after the data dir); `-` keeps a default.
    fn args(&self) -> [String; 8] {
        let or_default = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        [
            self.udp_sockets.to_string(),
            or_default(self.max_sends_in_flight.map(|v| v.to_string())),
            or_default(self.send_delay_target_ms.map(|v| v.to_string())),
            or_default(self.commit_delay_us.map(|v| v.to_string())),
            or_default(self.socket_backlog_target_ms.map(|v| v.to_string())),
            or_default(self.runtime_workers.map(|v| v.to_string())),
            or_default(self.commit_siblings.map(|v| v.to_string())),
            or_default(self.runtime_scheduling.map(|v| v.name().to_owned())),
        ]
    }

    /// The child command's arguments after the data dir, as `args` wrote them.
    pub fn parse(args: &[String]) -> BrokerKnobs {
        let get = |i: usize| args.get(i).and_then(|v| v.parse().ok());
        BrokerKnobs {
            udp_sockets: get(0).unwrap_or(1),
            max_sends_in_flight: get(1),
            send_delay_target_ms: args.get(2).and_then(|v| v.parse().ok()),
            commit_delay_us: args.get(3).and_then(|v| v.parse().ok()),
            socket_backlog_target_ms: args.get(4).and_then(|v| v.parse().ok()),
            runtime_workers: args.get(5).and_then(|v| v.parse().ok()),
            commit_siblings: args.get(6).and_then(|v| v.parse().ok()),
            runtime_scheduling: args.get(7).and_then(|v| v.parse().ok()),
        }
    }
}

impl Target {
    /// Starts `current_exe() __broker` with a temp data dir and waits for its address.
    pub async fn child(knobs: BrokerKnobs) -> Result<Target> {
        let dir = tempfile::tempdir().map_err(Error::io("creating the broker's temp dir"))?;
        let exe = std::env::current_exe().map_err(Error::io("finding the harness executable"))?;
        let mut child = tokio::process::Command::new(exe)
            .arg(CHILD_COMMAND)
            .arg(dir.path().join(DATA_DIR))
            .args(knobs.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io("starting the embedded broker"))?;
        let stdout = child.stdout.take().ok_or_else(|| Error::Child("child stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut cert) = (None, None);
        while addr.is_none() || cert.is_none() {
            let line = lines
                .next_line()
                .await
                .map_err(Error::io("reading the embedded broker's output"))?
                .ok_or_else(|| Error::Child("embedded broker exited before listening".into()))?;
            if let Some(a) = line.strip_prefix("addr=") {
                addr = Some(a.parse::<SocketAddr>().map_err(|e| Error::Child(e.to_string()))?);
            } else if let Some(c) = line.strip_prefix("cert=") {
                cert = Some(PathBuf::from(c));
            }
        }
        let addr = addr.ok_or_else(|| Error::Child("addr".into()))?;
        let cert = cert.ok_or_else(|| Error::Child("cert".into()))?;
        let pid = child.id();
        Ok(Target {
            addr,
            trust: Trust::CaFile(cert),
            server_name: "localhost".into(),
            pid,
            owned: Owned::Child(Reaped(child), dir),
        })
    }

    /// Starts a broker inside this process (for tests; CPU is then shared with the harness).
    pub async fn in_process(knobs: BrokerKnobs) -> Result<Target> {
        let dir = tempfile::tempdir().map_err(Error::io("creating the broker's temp dir"))?;
        let mut config = knobs.config(dir.path().join(DATA_DIR));
        // It runs on this process's runtime, not on threads of its own, so `batch` would
        // only put its background threads (password hashes, thumbnails) under
        // `SCHED_IDLE` behind every other thread here, a test's other brokers included
        // (the end-to-end tests' brokers say `normal` for the same reason).
        config.runtime_scheduling = switchboard_broker::config::Scheduling::Normal;
        let broker = Broker::start(config).await?;
        Ok(Target {
            addr: broker.local_addr,
            trust: Trust::CaFile(broker.cert_path.clone()),
            server_name: "localhost".into(),
            pid: None,
            owned: Owned::InProcess(Box::new(broker), dir),
        })
    }

    /// A running broker at `addr`, its certificate checked for `server_name`.
    pub fn remote(addr: SocketAddr, server_name: &str, trust: Trust, pid: Option<u32>) -> Target {
        Target { addr, trust, server_name: server_name.to_owned(), pid, owned: Owned::None }
    }

    /// The directory holding an owned broker's data dir (`data` inside it), so on the
    /// same file system; `None` for a remote broker.
    pub fn data_parent(&self) -> Option<&std::path::Path> {
        match &self.owned {
            Owned::None => None,
            Owned::Child(_, dir) | Owned::InProcess(_, dir) => Some(dir.path()),
        }
    }

    /// An owned broker's data dir; `None` for a remote broker.
    pub fn data_dir(&self) -> Option<PathBuf> {
        self.data_parent().map(|parent| parent.join(DATA_DIR))
    }

    /// The broker runs inside this process.
    pub fn is_in_process(&self) -> bool {
        matches!(self.owned, Owned::InProcess(..))
    }

    /// Where the broker runs and whether its resources are measured, for the report.
    pub fn describe(&self) -> String {
        match (&self.owned, self.pid) {
            (Owned::InProcess(..), _) => "in this process: the harness figures include it".into(),
            (Owned::Child(..), _) => "own process, measured".into(),
            (Owned::None, Some(pid)) => format!("remote, measured (pid {pid})"),
            (Owned::None, None) => "remote, not measured (give --broker-pid)".into(),
        }
    }

    /// A new client endpoint for this broker, registering users again while it answers
    /// `OVERLOADED` for up to `ENROLL_RETRY_FOR`.
    pub fn connector(&self) -> Result<Connector> {
        let options = TransportOptions { enroll_retry_for: ENROLL_RETRY_FOR, ..TransportOptions::default() };
        Ok(Connector::with_transport(self.addr, &self.server_name, self.trust.clone(), &options)?)
    }

    /// Stops an owned broker (closing stdin asks the child to shut down cleanly).
    pub async fn stop(self) -> Result<()> {
        self.stop_keeping_data().await.map(drop)
    }

    /// Stops an owned broker and hands back its temp dir, so its store can be opened
    /// (the data dir is `data` inside it; removed when the returned value drops). `None`
    /// for a broker this harness does not own.
    pub async fn stop_keeping_data(self) -> Result<Option<tempfile::TempDir>> {
        match self.owned {
            Owned::None => Ok(None),
            Owned::Child(mut child, dir) => {
                let child = &mut child.0;
                drop(child.stdin.take());
                match tokio::time::timeout(std::time::Duration::from_secs(10), child.wait()).await {
                    Ok(status) => {
                        let status = status.map_err(Error::io("waiting for the embedded broker"))?;
                        if !status.success() {
                            return Err(Error::Child("embedded broker exited with an error".into()));
                        }
                    }
                    Err(_) => child.kill().await.map_err(Error::io("killing the embedded broker"))?,
                }
                Ok(Some(dir))
            }
            Owned::InProcess(broker, dir) => {
                broker.shutdown().await?;
                Ok(Some(dir))
            }
        }
    }
}

/// The runtime a child process of the harness serves on: the one `config`'s broker
/// would (`Config::runtime_builder`, as the `switchboard` binary's), with threads named
/// `sb-broker` for per-thread figures.
pub fn broker_runtime(config: &Config) -> Result<tokio::runtime::Runtime> {
    config.runtime_builder().thread_name("sb-broker").build().map_err(Error::io("starting the broker runtime"))
}

/// Body of the hidden `__broker DATA_DIR UDP_SOCKETS MAX_SENDS_IN_FLIGHT
/// SEND_DELAY_TARGET_MS COMMIT_DELAY_US SOCKET_BACKLOG_TARGET_MS RUNTIME_WORKERS
/// COMMIT_SIBLINGS RUNTIME_SCHEDULING` subcommand (`-`: the default): run until stdin
/// closes.
pub fn run_child(data_dir: PathBuf, knobs: BrokerKnobs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour only when a person watches (the harness's stderr is inherited): a run
        // redirected to a file got escape codes in it.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = knobs.config(data_dir);
    broker_runtime(&config)?.block_on(async move {
        let broker = Broker::start(config).await?;
        println!("addr={}", broker.local_addr);
        println!("cert={}", broker.cert_path.display());
        // Whatever arrives is discarded through a fixed buffer; end of input stops.
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 4096];
        while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
        // Over the whole run, setup included: what the commit delay did.
        let c = broker.shared().store.commit_stats();
        eprintln!(
            "broker: {} group commits carried {} writes ({:.2} each); {} waited out the commit delay",
            c.commits(),
            c.writes,
            c.writes as f64 / c.commits().max(1) as f64,
            c.delayed
        );
        Ok(broker.shutdown().await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_reach_the_child_broker_as_they_were_set() {
        let set = BrokerKnobs {
            udp_sockets: 2,
            max_sends_in_flight: Some(9),
            send_delay_target_ms: Some(0),
            commit_delay_us: Some(1500),
            socket_backlog_target_ms: Some(7),
            runtime_workers: Some(1),
            commit_siblings: Some(4),
            runtime_scheduling: Some(Scheduling::Normal),
        };
        assert_eq!(BrokerKnobs::parse(&set.args()), set);
        let config = set.config("unused".into());
        assert_eq!((config.max_sends_in_flight, config.send_delay_target_ms, config.commit_delay_us), (9, 0, 1500));
        assert_eq!((config.socket_backlog_target_ms, config.runtime_workers, config.commit_siblings), (7, 1, 4));
        assert_eq!(config.runtime_scheduling, Scheduling::Normal);
        // Unset ones keep the broker's defaults.
        let unset = BrokerKnobs { udp_sockets: 1, ..Default::default() };
        assert_eq!(BrokerKnobs::parse(&unset.args()), unset);
        assert_eq!(unset.config("unused".into()).commit_delay_us, Config::ephemeral("unused").commit_delay_us);
        assert_eq!(unset.config("unused".into()).runtime_scheduling, Scheduling::Batch);
        assert_eq!(
            unset.config("unused".into()).socket_backlog_target_ms,
            Config::ephemeral("unused").socket_backlog_target_ms
        );
    }
}
