//! `switchboard`: run the broker (`serve`, the default) or administer its data dir.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use switchboard_broker::admin::{self, AdminRequest};
use switchboard_broker::{Broker, Config};
use switchboard_storage::Store;

/// jemalloc instead of the system allocator: less CPU per message and more connections
/// a second than glibc's malloc, for a little more memory per idle connection
/// (docs/benchmarks.md, "The allocator").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What `--version` prints: the release, the protocol version it speaks and the store
/// format it writes (OPERATIONS.md, "Upgrading"); a test keeps the two numbers true.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (protocol 5, also 4, store format 8)");

#[derive(Parser)]
#[command(name = "switchboard", version = VERSION, about = "Switchboard realtime messaging broker")]
struct Cli {
    /// TOML configuration file; flags override it.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (store, certificate).
    #[arg(long, global = true, env = "SWITCHBOARD_DATA")]
    data: Option<PathBuf>,
    /// How log lines are written to stderr: `text` (one line per event, for people) or
    /// `json` (one JSON object per line, for a log collector).
    #[arg(long, global = true, env = "SWITCHBOARD_LOG_FORMAT", value_enum, ignore_case = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Whether the log lines are JSON (`init_logs`), for the last error's line (`main`).
static LOGS_IN_JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The shape of the broker's log lines on stderr (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum LogFormat {
    /// `2026-12-07T14:41:34.123456Z  INFO switchboard_broker: listening addr=...`.
    Text,
    /// `{"timestamp":"2026-12-07T14:41:34.123456Z","level":"INFO","message":"listening","addr":"...","target":"switchboard_broker"}`:
    /// the event's fields at the top level beside `timestamp`, `level`, `message` and
    /// `target`; a failed start's reason is such a line too, at `ERROR`.
    Json,
}

#[derive(clap::Args, Clone, Default)]
struct ServeArgs {
    /// UDP address to listen on.
    #[arg(long, env = "SWITCHBOARD_LISTEN")]
    listen: Option<SocketAddr>,
    /// PEM certificate chain (with --key) instead of the generated self-signed one.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Close self-registration: only `switchboard user add` creates accounts.
    #[arg(long)]
    closed_registration: bool,
    /// Serve Prometheus metrics over plain HTTP at this TCP address (`GET /metrics`),
    /// e.g. 127.0.0.1:9464. Unauthenticated: keep it on loopback or a private network.
    #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve(ServeArgs),
    /// Manage accounts (through the running broker on the data dir, or on its store).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage a user's devices (through the running broker on the data dir, or on its store).
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Check the configuration (file, then --data and the serve flags) and print every
    /// setting in effect as TOML, defaults included; exits non-zero naming a bad setting.
    Config(ServeArgs),
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List a user's devices, one a line: id, enrollment time (UTC), whether it has
    /// authenticated since its enrollment (`confirmed`) or not (`unconfirmed`), name.
    List {
        /// Account name.
        user: String,
    },
    /// Revoke one device: it can no longer authenticate.
    Revoke {
        /// Account name.
        user: String,
        /// Device id, as `device list` prints it.
        device: u64,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account; password from SWITCHBOARD_PASSWORD, else asked on the
    /// terminal, else the first line of standard input (`... user add NAME < file`).
    Add {
        /// Account name.
        name: String,
        /// Create the store if the data dir has none (accounts made before the broker's
        /// first start). Without it a data dir with no store is refused, so a mistyped
        /// --data cannot put an account where no broker will look.
        #[arg(long)]
        new_store: bool,
    },
    /// List accounts, one a line: id, creation time (UTC), devices, name.
    List,
    /// Set a new password for an account (read as for `add`). With --revoke-devices
    /// every device of the account is revoked too, so only someone with the new password
    /// gets back in.
    Passwd {
        /// Account name.
        name: String,
        /// Revoke every device of the account as well.
        #[arg(long)]
        revoke_devices: bool,
    },
    /// Disable an account: none of its devices may sign in (they are told
    /// ACCOUNT_DISABLED) and, with the broker running, its connections close at once.
    /// Its conversations, messages and files stay; `user enable` undoes it.
    Disable {
        /// Account name.
        name: String,
    },
    /// Enable a disabled account again.
    Enable {
        /// Account name.
        name: String,
    },
}

fn main() {
    if let Err(e) = run() {
        // The message and its causes, not `Result`'s debug print (which adds a backtrace
        // where RUST_BACKTRACE is set: noise to an operator fixing a setting). With JSON
        // logs, as a log line too: the reason a start failed is the line a collector
        // most needs (an operator's trial found it the one plain line on stderr).
        if LOGS_IN_JSON.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::error!("{e:#}");
        } else {
            eprintln!("error: {e:#}");
        }
        // An operator command's failure says its code in its status (`admin::exit_status`).
        let code = e.downcast_ref::<switchboard_protocol::ErrorBody>().map(|body| body.code);
        std::process::exit(code.map_or(1, admin::exit_status));
    }
}

/// The log filter when `RUST_LOG` is unset: `info`, with only errors from quinn-proto,
/// which logs a warning for each offending packet a peer sends ("illegal packet",
/// "discarding Initial with invalid retry token"), so that at `warn` any peer could make
/// the broker write a line per datagram, before any login (found by an attacker review).
/// `RUST_LOG=info` shows them again.
const DEFAULT_LOG_FILTER: &str = "info,quinn_proto=error";

/// Sends log lines to stderr (stdout carries the broker's address and certificate for
/// scripts) in `format`, filtered by `RUST_LOG` or else `DEFAULT_LOG_FILTER`; text is
/// coloured only when a person is watching.
fn init_logs(format: LogFormat) {
    LOGS_IN_JSON.store(format == LogFormat::Json, std::sync::atomic::Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG_FILTER.into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logs(cli.log_format);
    let mut config = match &cli.config {
        // Its errors name the file already.
        Some(path) => Config::from_toml_file(path)?,
        None => Config::default(),
    };
    if let Some(data) = cli.data {
        config.data_dir = data;
    }
    let runtime = config.runtime_builder().build()?;
    // The serve flags may be typed before the subcommand as well as after it (after
    // wins, and either wins over the environment); typed before `user` or `device`, where
    // they mean nothing, they are refused rather than silently dropped.
    let (env, early) = cli.serve.by_source(&matches);
    let later = |args: ServeArgs, name: &str| {
        let (_, typed) =
            matches.subcommand_matches(name).map_or((ServeArgs::default(), args.clone()), |m| args.by_source(m));
        env.clone().then(early.clone()).then(typed)
    };
    if early.given() && matches!(cli.command, Some(Command::User { .. } | Command::Device { .. })) {
        // A mistyped command line: status 2, as clap's own refusals (OPERATIONS.md).
        eprintln!(
            "error: --listen, --cert, --key, --closed-registration and --metrics-listen apply to running the \
             broker (`serve`, `config`), not to `user` or `device` commands"
        );
        std::process::exit(2);
    }
    // An operator command makes a store only when asked to: a mistyped --data would
    // otherwise take an account (or answer an empty list) where no broker looks.
    let new_store = matches!(cli.command, Some(Command::User { command: UserCommand::Add { new_store: true, .. } }));
    if matches!(cli.command, Some(Command::User { .. } | Command::Device { .. })) && !new_store {
        let data = &config.data_dir;
        match std::fs::metadata(data.join("store")) {
            Ok(store) if store.is_dir() => {}
            // The data dir is the broker user's alone (0700): say whose command this is,
            // as the admin socket's refusal does (an operator's trial got only
            // "Permission denied").
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(e).with_context(|| {
                    format!(
                        "reading the store in {}: run the command as the user the broker runs as (its data dir is \
                         that user's alone)",
                        data.display()
                    )
                });
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("reading the store in {}", data.display()));
            }
            _ => anyhow::bail!(
                "no store in {}: is that the broker's data dir (--data)? Nothing was changed. \
                 (`user add NAME --new-store` makes a store there, for a broker not started yet.)",
                data.display()
            ),
        }
    }
    match cli.command {
        None => runtime.block_on(serve(config, env.then(early))),
        Some(Command::Serve(args)) => runtime.block_on(serve(config, later(args, "serve"))),
        Some(Command::Config(args)) => {
            let config = later(args, "config").apply(config);
            switchboard_broker::config::check_deployment(&config)?;
            let toml = toml::to_string(&config).context("writing the configuration as TOML")?;
            // A closed pipe (`switchboard config | head`) is no failure of the command.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), toml.as_bytes());
            Ok(())
        }
        Some(Command::User { command: UserCommand::Add { name, .. } }) => {
            let password = read_password(&name)?;
            runtime.block_on(admin(&config, AdminRequest::UserAdd { name, password }))
        }
        Some(Command::User { command: UserCommand::List }) => runtime.block_on(admin(&config, AdminRequest::UserList)),
        Some(Command::User { command: UserCommand::Passwd { name, revoke_devices } }) => {
            let password = read_password(&name)?;
            runtime.block_on(admin(&config, AdminRequest::UserPasswd { name, password, revoke_devices }))
        }
        Some(Command::User { command: UserCommand::Disable { name } }) => {
            runtime.block_on(admin(&config, AdminRequest::UserDisable { name, disabled: true }))
        }
        Some(Command::User { command: UserCommand::Enable { name } }) => {
            runtime.block_on(admin(&config, AdminRequest::UserDisable { name, disabled: false }))
        }
        Some(Command::Device { command: DeviceCommand::List { user } }) => {
            runtime.block_on(admin(&config, AdminRequest::DeviceList { user }))
        }
        Some(Command::Device { command: DeviceCommand::Revoke { user, device } }) => {
            runtime.block_on(admin(&config, AdminRequest::DeviceRevoke { user, device }))
        }
    }
}

impl ServeArgs {
    /// Whether any flag was given.
    fn given(&self) -> bool {
        self.listen.is_some()
            || self.cert.is_some()
            || self.key.is_some()
            || self.closed_registration
            || self.metrics_listen.is_some()
    }

    /// These flags split by where their values came from: (from the environment, typed
    /// on the command line), as `matches` (of the command they belong to) records.
    fn by_source(self, matches: &ArgMatches) -> (ServeArgs, ServeArgs) {
        let typed = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let mut from_env = ServeArgs::default();
        let mut on_line = self;
        if !typed("listen") {
            from_env.listen = on_line.listen.take();
        }
        if !typed("metrics_listen") {
            from_env.metrics_listen = on_line.metrics_listen.take();
        }
        (from_env, on_line)
    }

    /// These flags with `later`'s over them.
    fn then(self, later: ServeArgs) -> ServeArgs {
        let (cert, key) = if later.cert.is_some() { (later.cert, later.key) } else { (self.cert, self.key) };
        ServeArgs {
            listen: later.listen.or(self.listen),
            cert,
            key,
            closed_registration: self.closed_registration || later.closed_registration,
            metrics_listen: later.metrics_listen.or(self.metrics_listen),
        }
    }

    /// `config` with these flags applied over it.
    fn apply(self, mut config: Config) -> Config {
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if self.cert.is_some() {
            config.cert = self.cert;
            config.key = self.key;
        }
        if self.closed_registration {
            config.registration_open = false;
        }
        if self.metrics_listen.is_some() {
            config.metrics_listen = self.metrics_listen;
        }
        config
    }
}

/// A line of the broker's start-up and stop messages on standard output; a failed
/// write is ignored. `println!` panics on one, so a closed pipe (the reader of the
/// broker's output gone, say `switchboard | head`) turned the next line, "shutting down"
/// at SIGTERM, into a panic and an unclean stop (an operator trial).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `say!` on standard error.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

async fn serve(config: Config, args: ServeArgs) -> anyhow::Result<()> {
    let config = args.apply(config);
    switchboard_broker::config::check_deployment(&config)?;
    let stop = signals()?;
    let broker = Broker::start(config.clone()).await?;
    say!("switchboard listening on {}", broker.local_addr);
    if let Some(addr) = broker.metrics_addr {
        say!("metrics: http://{addr}{}", switchboard_broker::metrics::PATH);
    }
    say!("data directory: {}", config.data_dir.display());
    say!("certificate: {}", broker.cert_path.display());
    say!("certificate sha256: {}", broker.fingerprint);
    // The generated one is valid to 4096; an operator's has a date to watch.
    if let (Some(_), Some(not_after_s)) = (&config.cert, broker.shared().certificate_not_after_s) {
        say!("certificate valid until: {}", switchboard_broker::admin::utc(not_after_s.saturating_mul(1000)));
    }
    say!("registration: {}", if config.registration_open { "open" } else { "closed" });
    // The two settings that trade latency and ceiling for wakeups (OPERATIONS.md).
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let per_core = if config.runtime_workers == 0 { " (one per core)" } else { "" };
    let delay = match (config.commit_delay_us, config.commit_siblings) {
        (0, _) => "off".to_owned(),
        (us, 0) => format!("{us} us"),
        (us, n) => format!("{us} us when {n} other message writes wait"),
    };
    let scheduling = {
        use switchboard_broker::config::{BatchOutcome, Scheduling, batch_outcome};
        match (config.runtime_scheduling, batch_outcome()) {
            (Scheduling::Normal, _) => "normal (as started)",
            (Scheduling::Batch, BatchOutcome::Applied | BatchOutcome::NotTried) => Scheduling::Batch.name(),
            (Scheduling::Batch, BatchOutcome::LeftAsStarted) => "as started (not SCHED_OTHER: left as it is)",
            (Scheduling::Batch, BatchOutcome::Refused) => "as started (SCHED_BATCH refused)",
            (Scheduling::Batch, BatchOutcome::Unsupported) => "as started (not Linux)",
        }
    };
    say!("runtime threads: {workers}{per_core}, scheduling {scheduling}; commit delay: {delay}");
    tokio::select! {
        () = stop => {}
        () = broker.failed() => {
            // Nothing may be acknowledged as durable again in this process: exit, and let
            // the next start recover from what is on disk (an unclean stop).
            say_err!("switchboard: storage failure (a flush or fdatasync failed); exiting");
            std::process::exit(1);
        }
    }
    say!("shutting down");
    Ok(broker.shutdown().await?)
}

/// Listens for SIGINT and SIGTERM from now on (so a signal sent as soon as the broker
/// says it is listening is not lost), and resolves on the first. SIGHUP, which log
/// rotation and service managers send to ask for a reload, is logged and ignored: there
/// is nothing to reload (logs go to stderr, the configuration is read at start), and
/// its default action would kill the broker without a clean stop.
fn signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = int.recv() => return,
                _ = term.recv() => return,
                _ = hup.recv() => tracing::warn!(
                    "SIGHUP ignored: the configuration is read at start only (restart to change it), logs go to stderr"
                ),
            }
        }
    })
}

/// Runs an operator command on the broker running on the data dir (over its admin
/// socket, see `switchboard_broker::admin`), or, when none answers there, on the store
/// opened here; prints its lines, or fails with its message.
async fn admin(config: &Config, request: AdminRequest) -> anyhow::Result<()> {
    let reply = match admin::request(&config.data_dir, &request).await {
        Some(reply) => reply.context("asking the running broker over its admin socket")?,
        None => {
            let store = match switchboard_broker::open_store(config) {
                Ok(store) => store,
                // Locked: a broker runs there without its admin socket.
                // The store's own error first: a full disk or a damaged store says so.
                Err(e @ switchboard_broker::Error::DataDir(_)) => {
                    return Err(anyhow::anyhow!(
                        "{e}; no broker answered on the admin socket {}: if one runs on this data dir without it \
                         (its start-up log says why, e.g. a path too long for a Unix socket), stop it first",
                        admin::socket_path(&config.data_dir).display()
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            let auth = switchboard_broker::auth::Auth::new(store.clone(), config)?;
            let reply = admin::execute(&admin::Ops { store: &store, auth: &auth, broker: None }, request).await;
            close_admin_store(&store)?;
            reply
        }
    };
    for line in reply? {
        say!("{line}");
    }
    Ok(())
}

/// The password for `name`'s account: `SWITCHBOARD_PASSWORD`, else asked twice on the
/// terminal (a typo would set a password nobody knows), else the first line of standard
/// input (at most `PASSWORD_LINE_MAX` bytes read).
fn read_password(name: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, Read};
    if let Ok(p) = std::env::var("SWITCHBOARD_PASSWORD") {
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {name}: "))?;
        let second = rpassword::prompt_password("the same again: ")?;
        anyhow::ensure!(first == second, "the two passwords differ; nothing changed");
        return Ok(first);
    }
    // A pipe or a file: its first line (rpassword reads the controlling terminal, which
    // a script may not have).
    let mut line = Vec::new();
    std::io::stdin()
        .lock()
        .take(PASSWORD_LINE_MAX)
        .read_until(b'\n', &mut line)
        .context("reading the password from standard input")?;
    let line = String::from_utf8(line).context("the password on standard input is not UTF-8")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Bytes read from standard input for a password: the longest the broker accepts (256)
/// with room for a line ending; a longer line is refused as too long.
const PASSWORD_LINE_MAX: u64 = 1024;

/// Closes a store an operator command opened. It is vouched for (no check at the next
/// start) only if it was when opened, or this command created it.
fn close_admin_store(store: &Arc<Store>) -> anyhow::Result<()> {
    if store.opened_clean() || store.created() {
        store.close_clean()?
    } else {
        store.close()?
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// Log lines written, for the filter test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn by_default_a_peers_bad_packets_are_not_logged_one_line_each() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(super::DEFAULT_LOG_FILTER)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(target: "quinn_proto::connection", "illegal packet: from a peer");
            tracing::info!(target: "switchboard_broker::connection", "session started");
            tracing::error!(target: "quinn_proto::endpoint", "a fault of quinn's own");
        });
        let written = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(!written.contains("illegal packet"), "{written}");
        assert!(written.contains("session started") && written.contains("a fault of quinn's own"), "{written}");
    }

    #[test]
    fn the_version_names_the_protocol_and_the_store_format() {
        let protocol = format!(
            "(protocol {}, also {}, ",
            switchboard_protocol::PROTOCOL_VERSION,
            switchboard_protocol::OLDEST_PROTOCOL_VERSION
        );
        let store = format!("store format {})", switchboard_storage::FORMAT);
        assert!(super::VERSION.contains(&protocol) && super::VERSION.ends_with(&store), "{}", super::VERSION);
    }
}
