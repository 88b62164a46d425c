//! `switchboard`: run the broker (`serve`, the default) or administer its data dir.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchboard_broker::{Broker, Config};

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Switchboard realtime messaging broker")]
struct Cli {
    /// TOML configuration file; flags override it.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (store, certificate).
    #[arg(long, global = true, env = "SWITCHBOARD_DATA")]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
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
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the default).
    Serve(ServeArgs),
    /// Manage accounts (the broker must not be running on the same data dir).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account; password from SWITCHBOARD_PASSWORD or standard input.
    Add {
        /// Account name.
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => Config::from_toml_file(path).with_context(|| format!("reading {}", path.display()))?,
        None => Config::default(),
    };
    if let Some(data) = cli.data {
        config.data_dir = data;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        None => runtime.block_on(serve(config, cli.serve)),
        Some(Command::Serve(args)) => runtime.block_on(serve(config, args)),
        Some(Command::User { command: UserCommand::Add { name } }) => runtime.block_on(user_add(config, &name)),
    }
}

async fn serve(mut config: Config, args: ServeArgs) -> anyhow::Result<()> {
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if args.cert.is_some() {
        config.cert = args.cert;
        config.key = args.key;
    }
    if args.closed_registration {
        config.registration_open = false;
    }
    let broker = Broker::start(config.clone()).await?;
    println!("switchboard listening on {}", broker.local_addr);
    println!("data directory: {}", config.data_dir.display());
    println!("certificate: {}", broker.cert_path.display());
    println!("certificate sha256: {}", broker.fingerprint);
    println!("registration: {}", if config.registration_open { "open" } else { "closed" });
    tokio::select! {
        r = wait_for_signal() => r?,
        () = broker.failed() => {
            // Nothing may be acknowledged as durable again in this process: exit, and let
            // the next start recover from what is on disk (an unclean stop).
            eprintln!("switchboard: storage failure (a flush or fdatasync failed); exiting");
            std::process::exit(1);
        }
    }
    println!("shutting down");
    broker.shutdown().await
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn user_add(config: Config, name: &str) -> anyhow::Result<()> {
    let password = match std::env::var("SWITCHBOARD_PASSWORD") {
        Ok(p) => p,
        Err(_) => rpassword::prompt_password(format!("password for {name}: "))?,
    };
    let store = switchboard_broker::open_store(&config)?;
    let auth =
        switchboard_broker::auth::Auth::new(store.clone(), config.argon2_memory_kib, config.argon2_iterations, true)?;
    let id = auth.add_user(name, &password).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    // Vouch for the store only if it was vouched for when opened (else the broker's
    // next start must still check it).
    if store.opened_clean() {
        store.close_clean()?
    } else {
        store.close()?
    }
    println!("created user {name} (id {id})");
    Ok(())
}
