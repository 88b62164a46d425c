//! `receipts`: the `fanout` message load in one group, while K readers (members that do
//! not send) mark the conversation read up to the newest message they hold, every
//! `--mark-interval`. Reports the time from a reader's `MarkRead` to each sender seeing
//! the `Event::Receipt` that covers it (p50/p99), next to the same run's message
//! fan-out latency.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchboard_protocol::{ClientFrame, Event, Request, RequestBody};

use crate::changes::{Changes, Match, Outcome};
use crate::load::{EventHook, Population, SIDE_REQUEST_IDS, create_group, write_frame};
use crate::report::Report;
use crate::run::{MessageLoad, run_messages_alongside};
use crate::scenario::params;
use crate::{Common, Error, parse_duration, run_tag};

/// `receipts` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Members of the conversation (each one connected device).
    #[arg(long, default_value_t = 50)]
    pub members: usize,
    /// Members that send messages (the first ones); they are the receipts' observers.
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Messages per second, all senders together (open loop).
    #[arg(long, default_value_t = 200.0, value_parser = crate::parse_rate)]
    pub rate: f64,
    /// Members that mark the conversation read (the ones after the senders).
    #[arg(long, default_value_t = 8)]
    pub readers: usize,
    /// How often each reader marks read (when it holds a newer message than last time).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub mark_interval: Duration,
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> crate::Result<Report> {
    if !(args.senders >= 1 && args.readers >= 1 && args.senders + args.readers <= args.members) {
        return Err(Error::InvalidArgs("need 1+ senders and 1+ readers, together at most --members".into()));
    }
    if args.mark_interval < Duration::from_millis(10) {
        return Err(Error::InvalidArgs("--mark-interval must be at least 10ms".into()));
    }
    let target = common.target().await?;
    let pop = Population::enroll(&target, &run_tag(), args.members).await?;
    let all: Vec<usize> = (0..args.members).collect();
    let conv = create_group(&pop, 0, &all, "receipts").await?;
    let changes = Arc::new(Changes::new(Match::UpTo));
    let senders = args.senders;
    let hook: EventHook = {
        let changes = changes.clone();
        Arc::new(move |session, event, now| {
            let receipts = match event {
                Event::Receipt(r) => std::slice::from_ref(r),
                Event::Receipts(rs) => rs.as_slice(),
                _ => &[],
            };
            for r in receipts {
                if session < senders
                    && r.conv == conv
                    && let Some(read) = r.read_up_to
                {
                    changes.seen(session, r.user, read, now);
                }
            }
        })
    };
    let mut load = MessageLoad::start_observing(&target, &pop, [(conv, all)].into(), common, Some(hook)).await?;
    let readers: Vec<Reader> = (args.senders..args.senders + args.readers)
        .map(|i| Reader {
            user: pop.users[i].user_id,
            send: load.take_send(i),
            last_seq: load.last_seq(i),
            observers: args.senders,
        })
        .collect();
    let (clock, stats, interval) = (load.clock(), load.stats(), args.mark_interval);
    let side = {
        let changes = changes.clone();
        move |done: tokio::sync::watch::Receiver<bool>| mark_reads(readers, conv, interval, changes, clock, stats, done)
    };
    let p = params([
        ("members", args.members.to_string()),
        ("senders", args.senders.to_string()),
        ("readers", args.readers.to_string()),
        ("rate", format!("{} msg/s", args.rate)),
        ("mark interval", format!("{} ms", args.mark_interval.as_millis())),
    ]);
    let message_senders = (0..args.senders).map(|s| (s, vec![conv])).collect();
    let run = run_messages_alongside(load, message_senders, args.rate, "receipts", p, common, side).await;
    target.stop().await?;
    // The readers' control streams come back from the side task and close only here:
    // a finished stream ends its session, which would lose the last deliveries.
    let (mut report, _streams) = run?;
    let outcome = changes.outcome(|_| (0..args.senders).collect());
    add_outcome(&mut report, &outcome, "read marks", "every read mark reached every sender");
    Ok(report)
}

/// A reader's session.
struct Reader {
    user: switchboard_protocol::UserId,
    send: Option<quinn::SendStream>,
    last_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The observers are sessions `0..observers` (the senders).
    observers: usize,
}

/// Every `interval`, each reader (staggered over the interval) marks read up to the
/// newest message it holds, if newer than its last mark, until `done`. Returns the
/// readers (with their control streams, which must stay open until the run's
/// deliveries are read).
async fn mark_reads(
    mut readers: Vec<Reader>,
    conv: switchboard_protocol::ConvId,
    interval: Duration,
    changes: Arc<Changes>,
    clock: crate::stats::Clock,
    stats: Arc<crate::stats::Stats>,
    mut done: tokio::sync::watch::Receiver<bool>,
) -> Vec<Reader> {
    let mut marked = vec![0u64; readers.len()];
    let mut id = SIDE_REQUEST_IDS;
    let step = interval / readers.len().max(1) as u32;
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0usize;
    let observers = readers.first().map_or(0, |r| r.observers);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|d| *d) => break,
        }
        let k = next % readers.len();
        next += 1;
        let reader = &mut readers[k];
        let seq = reader.last_seq.load(Ordering::Relaxed);
        let Some(send) = reader.send.as_mut() else { continue };
        if seq <= marked[k] {
            continue;
        }
        marked[k] = seq;
        changes.made(reader.user, seq, "receipt", clock.now_ns());
        id += 1;
        let frame = ClientFrame::Request(Request { id, body: RequestBody::MarkRead { conv, seq } });
        if !write_frame(send, &frame, &stats).await {
            reader.send = None;
        }
    }
    changes.settle(|_| (0..observers).collect(), SETTLE).await;
    readers
}

/// How long, after the last change, its events may take to reach every observer
/// before the readers stop (a change still unseen then counts as missed).
pub const SETTLE: Duration = Duration::from_secs(5);

/// Puts a change outcome on the report: latency rows, counts, and the check that every
/// change reached every observer (coalesced ones were replaced by a later one that did).
pub fn add_outcome(report: &mut Report, outcome: &Outcome, what: &str, check: &str) {
    report.event_latency.extend(outcome.latency.clone());
    let key = what.replace(' ', "_");
    report.extra.insert(format!("{key}_made"), outcome.made as f64);
    report.extra.insert(format!("{key}_seen"), outcome.seen as f64);
    report.extra.insert(format!("{key}_coalesced"), outcome.coalesced as f64);
    report.extra.insert(format!("{key}_missed"), outcome.missed as f64);
    report.extra.insert("message_fanout_p99_ms".into(), report.latency.p99_ms);
    report.check(
        check,
        outcome.made > 0 && outcome.missed == 0,
        format!("{} made, {} missed", outcome.made, outcome.missed),
    );
}
