//! `switchboard-load SCENARIO [flags]`: see `--help`.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use switchboard_loadtest::{Common, plot, scenario, target};

/// jemalloc instead of the system allocator: less CPU per message and more connections
/// a second than glibc's malloc, for a little more memory per idle connection
/// (docs/benchmarks.md, "The allocator").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "switchboard-load", version, about = "Load harness for the Switchboard broker")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// One conversation, many members: fan-out throughput and latency.
    Fanout(scenario::fanout::Args),
    /// Many users in direct conversations.
    Direct(scenario::direct::Args),
    /// A community of groups of mixed sizes.
    Groups(scenario::groups::Args),
    /// Connect and authenticate as fast as allowed; memory per connection.
    Storm(scenario::storm::Args),
    /// A steady mix for a long time; latency and memory drift.
    Soak(scenario::soak::Args),
    /// Read receipts under message load: MarkRead to the senders' Event::Receipt.
    Receipts(scenario::receipts::Args),
    /// Presence and typing under message load: away/back and typing to others' events.
    Presence(scenario::presence::Args),
    /// A device that missed N messages catches up; against reading the store directly.
    Catchup(scenario::catchup::Args),
    /// Files: one upload and download, concurrent uploads, chat beside an upload; each
    /// next to its limit (a plain quinn stream, fdatasync appends) from the same run.
    Upload(scenario::upload::Args),
}

/// Waits for Ctrl-C, SIGTERM or SIGHUP (a closed terminal or a dropped SSH session:
/// before, it ended the harness with its temporary data dir left behind, gigabytes after
/// a big run: a load tester's trial); the exit status a shell gives a process they end
/// (128 + the signal's number). SIGHUP only while stderr is a terminal, the one that
/// can hang up: `nohup` (which redirects it) asks for SIGHUP to be ignored, and a
/// handler would undo that (a review).
async fn interrupted() -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    let on = |kind: SignalKind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => 130,
        () = on(SignalKind::terminate()) => 143,
        () = on(SignalKind::hangup()), if std::io::IsTerminal::is_terminal(&std::io::stderr()) => 129,
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(target::CHILD_COMMAND) {
        let usage = "DATA_DIR [UDP_SOCKETS MAX_SENDS_IN_FLIGHT SEND_DELAY_TARGET_MS COMMIT_DELAY_US SOCKET_BACKLOG_TARGET_MS RUNTIME_WORKERS COMMIT_SIBLINGS RUNTIME_SCHEDULING]";
        let dir = args.get(2).ok_or_else(|| anyhow::anyhow!("usage: {} {usage}", target::CHILD_COMMAND))?;
        let knobs = target::BrokerKnobs::parse(args.get(3..).unwrap_or_default());
        return Ok(target::run_child(dir.into(), knobs)?);
    }
    if args.get(1).map(String::as_str) == Some(scenario::upload::QUINN_SINK_COMMAND) {
        let (dir, bytes) = match (args.get(2), args.get(3).and_then(|b| b.parse().ok())) {
            (Some(dir), Some(bytes)) => (dir, bytes),
            _ => anyhow::bail!("usage: {} DIR BYTES", scenario::upload::QUINN_SINK_COMMAND),
        };
        return Ok(scenario::upload::run_quinn_sink(std::path::Path::new(dir), bytes)?);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let mut common = cli.common;
    // `--duration` is global: given after the scenario's name it is in the scenario's
    // matches.
    common.duration_given = [Some(&matches), matches.subcommand().map(|(_, m)| m)]
        .into_iter()
        .flatten()
        .any(|m| m.value_source("duration") == Some(clap::parser::ValueSource::CommandLine));
    common.command = args.join(" ");
    common.progress = true;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("sb-load").build()?;
    let run = async {
        match &cli.scenario {
            Scenario::Fanout(a) => scenario::fanout::run(&common, a).await,
            Scenario::Direct(a) => scenario::direct::run(&common, a).await,
            Scenario::Groups(a) => scenario::groups::run(&common, a).await,
            Scenario::Storm(a) => scenario::storm::run(&common, a).await,
            Scenario::Soak(a) => scenario::soak::run(&common, a).await,
            Scenario::Receipts(a) => scenario::receipts::run(&common, a).await,
            Scenario::Presence(a) => scenario::presence::run(&common, a).await,
            Scenario::Catchup(a) => scenario::catchup::run(&common, a).await,
            Scenario::Upload(a) => scenario::upload::run(&common, a).await,
        }
    };
    // Ctrl-C or SIGTERM drops the run, so what it started goes as on any other end: the
    // broker child (killed on drop) and its temp data dir, the upload's scratch files
    // (before, the default handlers ended the process with those left in /tmp: a trial).
    let report = runtime.block_on(async {
        tokio::select! {
            report = run => Ok(report),
            status = interrupted() => Err(status),
        }
    });
    let report = match report {
        Ok(report) => report,
        Err(status) => {
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            match common.finished_part.lock().ok().and_then(|mut part| part.take()) {
                Some(part) => {
                    eprintln!("interrupted: the run was stopped before its end; its finished part follows");
                    println!("{}", part.table());
                    write_files(&part, &common, "INTERRUPTED")?;
                }
                None => eprintln!("interrupted: the run was stopped before its end; nothing reported"),
            }
            std::process::exit(status);
        }
    };
    let report = match report {
        Ok(report) => report,
        // Flags that do not go together are a mistyped command line, as clap's own
        // refusals are: status 2, not a failed run's 1.
        Err(e @ switchboard_loadtest::Error::InvalidArgs(_)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
        Err(e) => return Err(e.into()),
    };
    println!("{}", report.table());
    write_files(&report, &common, if report.passed() { "PASS" } else { "FAIL" })?;
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}

/// Writes `--json` (the figures with `result`, as the exit status says it: `PASS`,
/// `FAIL`, or `INTERRUPTED` for a finished part) and `--plot`.
fn write_files(report: &switchboard_loadtest::report::Report, common: &Common, result: &str) -> anyhow::Result<()> {
    if let Some(path) = &common.json {
        let mut json = serde_json::to_value(report)?;
        if let Some(object) = json.as_object_mut() {
            object.insert("result".into(), result.into());
        }
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .map_err(|e| anyhow::anyhow!("writing the JSON report {}: {e}", path.display()))?;
        println!("json: {}", path.display());
    }
    if let Some(path) = &common.plot {
        plot::write_png(report, path)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}
