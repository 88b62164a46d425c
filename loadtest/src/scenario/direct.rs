//! `direct`: U users in U/2 direct conversations, each user sending at r messages/s:
//! many small conversations, the one-to-one chat load.

use crate::load::{Population, create_directs};
use crate::report::Report;
use crate::run::{MessageLoad, run_messages};
use crate::scenario::params;
use crate::{Common, run_tag};

/// `direct` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Users (rounded up to even, at least 2), each one connected device.
    #[arg(long, default_value_t = 1000, value_parser = at_least_two)]
    pub users: usize,
    /// Messages per second per user.
    #[arg(long, default_value_t = 1.0, value_parser = crate::parse_rate)]
    pub rate: f64,
}

/// `--users`: a direct conversation needs two (0 ran with 2 without a word).
fn at_least_two(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        Ok(n) => Err(format!("{n}: at least 2 (one direct conversation)")),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> crate::Result<Report> {
    let users = args.users.max(2).next_multiple_of(2);
    let target = common.target().await?;
    let pop = std::sync::Arc::new(Population::enroll(&target, &run_tag(), users).await?);
    let pairs: Vec<(usize, usize)> = (0..users).step_by(2).map(|p| (p, p + 1)).collect();
    let convs = create_directs(&pop, &pairs).await?;
    let mut membership = crate::load::Membership::new();
    let mut senders = Vec::with_capacity(users);
    for (&(pair, _), &conv) in pairs.iter().zip(&convs) {
        membership.insert(conv, vec![pair, pair + 1]);
        senders.push((pair, vec![conv]));
        senders.push((pair + 1, vec![conv]));
    }
    let load = MessageLoad::start(&target, &pop, membership, common).await?;
    let total = args.rate * users as f64;
    let p =
        params([("users", users.to_string()), ("rate", format!("{} msg/s per user ({total:.0} total)", args.rate))]);
    let report = run_messages(load, senders, total, "direct", p, common).await;
    target.stop().await?;
    report
}
