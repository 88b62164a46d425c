//! `groups`: a community. G groups whose sizes follow a distribution (`--sizes`,
//! `size:weight` pairs), members drawn from U users; every user who belongs to a group
//! sends at r messages/s into one of its groups, picked per message.

use crate::load::{Membership, Population, create_group};
use crate::report::Report;
use crate::run::{MessageLoad, run_messages};
use crate::scenario::{SplitMix, params};
use crate::{Common, run_tag};
use crate::{Error, Result};

/// `groups` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Users in the community (at least 1).
    #[arg(long, default_value_t = 500, value_parser = crate::parse_count)]
    pub users: usize,
    /// Groups (at least 1: `--groups 0` enrolled every user and then said the rate was
    /// zero).
    #[arg(long, default_value_t = 100, value_parser = crate::parse_count)]
    pub groups: usize,
    /// Group size distribution, `size:weight,...`.
    #[arg(long, default_value = "3:40,8:30,25:20,100:10")]
    pub sizes: String,
    /// Messages per second per user who is in a group (the groups are drawn at random, so
    /// a few users may be in none and send nothing).
    #[arg(long, default_value_t = 0.5, value_parser = crate::parse_rate)]
    pub rate: f64,
    /// Seed for the group draw.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Parses `size:weight,...`.
pub fn parse_sizes(s: &str) -> Result<Vec<(usize, u32)>> {
    let invalid = |e: std::num::ParseIntError| Error::InvalidArgs(e.to_string());
    let sizes = s
        .split(',')
        .map(|pair| {
            let (size, weight) = pair
                .split_once(':')
                .ok_or_else(|| Error::InvalidArgs(format!("expected size:weight, got {pair:?}")))?;
            Ok((size.trim().parse().map_err(invalid)?, weight.trim().parse().map_err(invalid)?))
        })
        .collect::<Result<Vec<(usize, u32)>>>()?;
    if !sizes.iter().all(|&(s, w)| s >= 2 && w > 0) {
        return Err(Error::InvalidArgs("sizes must be 2 or more, weights positive".into()));
    }
    Ok(sizes)
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> Result<Report> {
    let sizes = parse_sizes(&args.sizes)?;
    if !sizes.iter().all(|&(s, _)| s <= args.users) {
        return Err(Error::InvalidArgs("a group is larger than --users".into()));
    }
    let total_weight: u32 = sizes.iter().map(|&(_, w)| w).sum();
    let target = common.target().await?;
    let pop = Population::enroll(&target, &run_tag(), args.users).await?;
    let mut rng = SplitMix(args.seed);
    let mut membership = Membership::new();
    let mut groups_of: Vec<Vec<u64>> = vec![Vec::new(); args.users];
    for g in 0..args.groups {
        let mut pick = rng.below(total_weight as usize) as u32;
        let size = sizes
            .iter()
            .find(|&&(_, w)| {
                if pick < w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map_or(2, |&(s, _)| s);
        let mut members: Vec<usize> = Vec::with_capacity(size);
        while members.len() < size {
            let u = rng.below(args.users);
            if !members.contains(&u) {
                members.push(u);
            }
        }
        let conv = create_group(&pop, members[0], &members, &format!("group {g}")).await?;
        for &m in &members {
            groups_of[m].push(conv);
        }
        membership.insert(conv, members);
    }
    let senders: Vec<(usize, Vec<u64>)> = groups_of.into_iter().enumerate().filter(|(_, g)| !g.is_empty()).collect();
    let load = MessageLoad::start(&target, &pop, membership, common).await?;
    let total = args.rate * senders.len() as f64;
    let p = params([
        ("users", args.users.to_string()),
        ("groups", args.groups.to_string()),
        ("sizes", args.sizes.clone()),
        (
            "rate",
            format!("{} msg/s per user in a group ({} of {}: {total:.0} total)", args.rate, senders.len(), args.users),
        ),
    ]);
    let report = run_messages(load, senders, total, "groups", p, common).await;
    target.stop().await?;
    report
}
