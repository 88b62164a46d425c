//! `fanout`: M members in one group, S of them sending at R messages/s in total. Every
//! message reaches M-1 devices: the classic chat-room fan-out. With `--against
//! nats://HOST:PORT` the same workload then runs against that NATS server, and the
//! report sets the two side by side (`nats.rs`).

use crate::Error;
use crate::load::{Population, create_group};
use crate::nats;
use crate::payload::MIN_NUMBERED_SIZE;
use crate::report::Report;
use crate::run::{MessageLoad, run_messages};
use crate::scenario::params;
use crate::{Common, run_tag};

/// `fanout` flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Args {
    /// Members of the conversation (each one connected device).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Members that send.
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Messages per second, all senders together (open loop).
    #[arg(long, default_value_t = 1000.0, value_parser = crate::parse_rate)]
    pub rate: f64,
    /// After the Switchboard run, run the same workload against this running NATS
    /// server (`nats://HOST:PORT`, core pub/sub) and print both side by side. Needs
    /// `--size` of at least 28 (the payload also carries sender and number).
    #[arg(long, value_parser = nats::parse_url)]
    pub against: Option<String>,
    /// The NATS server's process id, to sample its CPU and memory (with `--against`).
    #[arg(long, requires = "against", value_parser = crate::parse_pid)]
    pub nats_pid: Option<u32>,
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> crate::Result<Report> {
    if !(args.members >= 2 && args.senders >= 1 && args.senders <= args.members) {
        return Err(Error::InvalidArgs("need 2+ members and 1..=members senders".into()));
    }
    let against = match &args.against {
        Some(url) => {
            if common.size < MIN_NUMBERED_SIZE {
                return Err(Error::InvalidArgs(format!(
                    "--against needs --size of at least {MIN_NUMBERED_SIZE} bytes (the payload carries sender and number)"
                )));
            }
            if args.senders > usize::from(u16::MAX) {
                return Err(Error::InvalidArgs("--against takes at most 65535 senders".into()));
            }
            let url = nats::parse_url(url).map_err(Error::InvalidArgs)?;
            // Before the Switchboard half: an unreachable server fails now, not after it.
            nats::probe(&url).await?;
            Some(nats::Fanout {
                url,
                pid: args.nats_pid,
                members: args.members,
                senders: args.senders,
                rate: args.rate,
            })
        }
        None if args.nats_pid.is_some() => return Err(Error::InvalidArgs("--nats-pid needs --against".into())),
        None => None,
    };
    let target = common.target().await?;
    let pop = Population::enroll(&target, &run_tag(), args.members).await?;
    let all: Vec<usize> = (0..args.members).collect();
    let conv = create_group(&pop, 0, &all, "fanout").await?;
    let load = MessageLoad::start(&target, &pop, [(conv, all)].into(), common).await?;
    let senders = (0..args.senders).map(|s| (s, vec![conv])).collect();
    let p = params([
        ("members", args.members.to_string()),
        ("senders", args.senders.to_string()),
        ("rate", format!("{} msg/s", args.rate)),
        ("offered", format!("{:.0} deliveries/s", args.rate * (args.members - 1) as f64)),
    ]);
    let report = run_messages(load, senders, args.rate, "fanout", p, common).await;
    // The broker is stopped before NATS runs: the two never share the machine's cores.
    target.stop().await?;
    let mut report = report?;
    if let Some(f) = against {
        if let Ok(mut part) = common.finished_part.lock() {
            *part = Some(report.clone());
        }
        let other = nats::fanout(&f, common).await?;
        let failed: Vec<&str> = other.checks.iter().filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
        let detail = if failed.is_empty() { "its own checks held".to_owned() } else { failed.join(", ") };
        report.check("the NATS run measured cleanly", failed.is_empty(), detail);
        report.against = Some(Box::new(other));
    }
    Ok(report)
}
