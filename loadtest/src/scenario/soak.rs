//! `soak`: a steady mix for a long time: one busy group plus many direct pairs. The
//! report adds drift: p99 latency and broker memory at the end against the start.

use crate::load::{Membership, Population, create_directs, create_group};
use crate::report::Report;
use crate::run::{MessageLoad, run_messages};
use crate::scenario::params;
use crate::{Common, run_tag};

/// `soak` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Members of the busy group.
    #[arg(long, default_value_t = 50)]
    pub group_members: usize,
    /// Users in direct pairs (rounded up to even).
    #[arg(long, default_value_t = 200)]
    pub direct_users: usize,
    /// Messages per second per user.
    #[arg(long, default_value_t = 1.0, value_parser = crate::parse_rate)]
    pub rate: f64,
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> crate::Result<Report> {
    let direct = args.direct_users.next_multiple_of(2);
    let users = args.group_members + direct;
    let target = common.target().await?;
    let pop = std::sync::Arc::new(Population::enroll(&target, &run_tag(), users).await?);
    let group: Vec<usize> = (0..args.group_members).collect();
    let mut membership = Membership::new();
    let mut senders = Vec::new();
    if args.group_members >= 2 {
        let conv = create_group(&pop, 0, &group, "soak").await?;
        senders.extend(group.iter().map(|&m| (m, vec![conv])));
        membership.insert(conv, group);
    }
    let pairs: Vec<(usize, usize)> = (args.group_members..users).step_by(2).map(|p| (p, p + 1)).collect();
    let convs = create_directs(&pop, &pairs).await?;
    for (&(pair, _), &conv) in pairs.iter().zip(&convs) {
        membership.insert(conv, vec![pair, pair + 1]);
        senders.push((pair, vec![conv]));
        senders.push((pair + 1, vec![conv]));
    }
    let load = MessageLoad::start(&target, &pop, membership, common).await?;
    let total = args.rate * senders.len() as f64;
    let p = params([
        ("group", args.group_members.to_string()),
        ("direct users", direct.to_string()),
        ("rate", format!("{} msg/s per user ({total:.0} total)", args.rate)),
    ]);
    let mut report = run_messages(load, senders, total, "soak", p, common).await?;
    add_drift(&mut report);
    target.stop().await?;
    Ok(report)
}

/// Compares the first and last tenth of the timeline.
pub fn add_drift(report: &mut Report) {
    let active: Vec<_> = report.timeline.iter().filter(|i| i.sent_per_s > 0.0).cloned().collect();
    if active.len() < 2 {
        return;
    }
    let tenth = (active.len() / 10).max(1);
    let mean = |xs: &[crate::report::Interval], f: fn(&crate::report::Interval) -> f64| {
        xs.iter().map(f).sum::<f64>() / xs.len() as f64
    };
    let (first, last) = (&active[..tenth], &active[active.len() - tenth..]);
    report.extra.insert("drift_p99_first_ms".into(), mean(first, |i| i.p99_ms));
    report.extra.insert("drift_p99_last_ms".into(), mean(last, |i| i.p99_ms));
    report.extra.insert("drift_broker_rss_first_mib".into(), mean(first, |i| i.broker_rss_mib));
    report.extra.insert("drift_broker_rss_last_mib".into(), mean(last, |i| i.broker_rss_mib));
}
