//! `fanout`: M members in one group, S of them sending at R messages/s in total. Every
//! message reaches M-1 devices: the classic chat-room fan-out.

use crate::Error;
use crate::load::{Population, create_group};
use crate::report::Report;
use crate::run::{MessageLoad, run_messages};
use crate::scenario::params;
use crate::{Common, run_tag};

/// `fanout` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Members of the conversation (each one connected device).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Members that send.
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Messages per second, all senders together (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> crate::Result<Report> {
    if !(args.members >= 2 && args.senders >= 1 && args.senders <= args.members) {
        return Err(Error::InvalidArgs("need 2+ members and 1..=members senders".into()));
    }
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
    target.stop().await?;
    report
}
