//! `presence`: the `fanout` message load in one group, while F members go away and come
//! back (`SetPresence`) and T members start and stop typing (`Signal::Typing`), each
//! toggling every `--interval`. Reports the time from the request or signal to every
//! other member's `Event::Presence` / `Event::Typing` (p50/p99: "presence away",
//! "presence back", "typing"), next to the same run's message fan-out latency.

use std::sync::Arc;
use std::time::Duration;

use switchboard_protocol::{ClientFrame, Event, PresenceState, Request, RequestBody, Signal, UserId};

use crate::changes::{Changes, Match};
use crate::load::{EventHook, Population, SIDE_REQUEST_IDS, create_group, write_frame};
use crate::report::Report;
use crate::run::{MessageLoad, run_messages_alongside};
use crate::scenario::params;
use crate::scenario::receipts::{SETTLE, add_outcome};
use crate::stats::{Clock, Stats};
use crate::{Common, Error, parse_duration, run_tag};

/// `presence` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Members of the conversation (each one connected device, one per user).
    #[arg(long, default_value_t = 50)]
    pub members: usize,
    /// Members that send messages (the first ones).
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Messages per second, all senders together (open loop).
    #[arg(long, default_value_t = 200.0, value_parser = crate::parse_rate)]
    pub rate: f64,
    /// Members that go away and come back (after the senders).
    #[arg(long, default_value_t = 4)]
    pub flappers: usize,
    /// Members that start and stop typing (after the flappers).
    #[arg(long, default_value_t = 4)]
    pub typers: usize,
    /// Time between one actor's changes (the broker pushes at most a few presence
    /// changes per user a second: shorter intervals measure its coalescing). Keep it
    /// below the broker's `typing_ttl_ms` (6 s by default), or typing ends by itself.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// Presence as a change value: away 1, online 0 (offline is no change an actor makes).
fn presence_value(state: PresenceState) -> Option<u64> {
    match state {
        PresenceState::Away => Some(1),
        PresenceState::Online => Some(0),
        PresenceState::Offline => None,
    }
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> crate::Result<Report> {
    let actors = args.flappers + args.typers;
    if !(args.senders >= 1 && actors >= 1 && args.senders + actors < args.members) {
        return Err(Error::InvalidArgs(
            "need 1+ senders, 1+ flappers or typers, and at least one more member to observe".into(),
        ));
    }
    if args.interval < Duration::from_millis(10) {
        return Err(Error::InvalidArgs("--interval must be at least 10ms".into()));
    }
    if !common.ramp && common.duration <= args.interval {
        return Err(Error::InvalidArgs(format!(
            "--duration ({} ms) must be longer than --interval ({} ms): the first presence or typing change \
             comes one interval after the start, so nothing would be measured",
            common.duration.as_millis(),
            args.interval.as_millis()
        )));
    }
    let target = common.target().await?;
    let pop = Population::enroll(&target, &run_tag(), args.members).await?;
    let users: Arc<Vec<UserId>> = Arc::new(pop.users.iter().map(|u| u.user_id).collect());
    let all: Vec<usize> = (0..args.members).collect();
    let conv = create_group(&pop, 0, &all, "presence").await?;
    let presence = Arc::new(Changes::new(Match::State));
    let typing = Arc::new(Changes::new(Match::State));
    let hook: EventHook = {
        let (presence, typing, users) = (presence.clone(), typing.clone(), users.clone());
        Arc::new(move |session, event, now| match event {
            Event::Presence(p) if users.get(session) != Some(&p.user) => {
                if let Some(value) = presence_value(p.state) {
                    presence.seen(session, p.user, value, now);
                }
            }
            Event::Typing { conv: c, user, typing: t } if *c == conv && users.get(session) != Some(user) => {
                typing.seen(session, *user, u64::from(*t), now);
            }
            _ => {}
        })
    };
    let mut load = MessageLoad::start_observing(&target, &pop, [(conv, all)].into(), common, Some(hook)).await?;
    let first = args.senders;
    let actors: Vec<Actor> = (first..first + actors)
        .map(|i| Actor {
            user: users[i],
            send: load.take_send(i),
            kind: if i < first + args.flappers { Kind::Presence } else { Kind::Typing },
            on: false,
        })
        .collect();
    let ctx = Side {
        conv,
        interval: args.interval,
        presence: presence.clone(),
        typing: typing.clone(),
        clock: load.clock(),
        stats: load.stats(),
        users: users.clone(),
    };
    let p = params([
        ("members", args.members.to_string()),
        ("senders", args.senders.to_string()),
        ("flappers", args.flappers.to_string()),
        ("typers", args.typers.to_string()),
        ("rate", format!("{} msg/s", args.rate)),
        ("interval", format!("{} ms", args.interval.as_millis())),
    ]);
    let message_senders = (0..args.senders).map(|s| (s, vec![conv])).collect();
    let side = move |done: tokio::sync::watch::Receiver<bool>| toggle(actors, ctx, done);
    let run = run_messages_alongside(load, message_senders, args.rate, "presence", p, common, side).await;
    // The actors' control streams come back from the side task and close only here:
    // a finished stream ends its session, which would lose the last deliveries.
    let (mut report, streams) = run?;
    drop(streams);
    pop.wait_idle(crate::CLOSING_WAIT).await;
    target.stop().await?;
    let others = |actor: UserId| (0..users.len()).filter(|&i| users[i] != actor).collect::<Vec<_>>();
    if args.flappers > 0 {
        add_outcome(
            &mut report,
            &presence.outcome(others),
            "presence changes",
            "every presence change reached every member",
        );
    }
    if args.typers > 0 {
        add_outcome(&mut report, &typing.outcome(others), "typing changes", "every typing change reached every member");
    }
    Ok(report)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Presence,
    Typing,
}

/// A member that changes presence or typing, with its session's control stream.
struct Actor {
    user: UserId,
    send: Option<quinn::SendStream>,
    kind: Kind,
    /// Away, or typing, now.
    on: bool,
}

/// What the side task shares with the run.
struct Side {
    conv: switchboard_protocol::ConvId,
    interval: Duration,
    presence: Arc<Changes>,
    typing: Arc<Changes>,
    clock: Clock,
    stats: Arc<Stats>,
    users: Arc<Vec<UserId>>,
}

/// Toggles each actor every `interval` (actors staggered over it) until `done`, then
/// waits for the last changes to reach every member. Returns the actors (with their
/// control streams, which must stay open until the run's deliveries are read).
async fn toggle(mut actors: Vec<Actor>, side: Side, mut done: tokio::sync::watch::Receiver<bool>) -> Vec<Actor> {
    let mut id = SIDE_REQUEST_IDS;
    // The first change comes one whole interval after the start: a user's presence push
    // at connect opens the broker's coalescing window (`presence_coalesce_ms`), and a
    // change inside it would measure that window, not the push path.
    let period = side.interval / actors.len().max(1) as u32;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + side.interval, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|d| *d) => break,
        }
        let k = next % actors.len();
        next += 1;
        let actor = &mut actors[k];
        let Some(send) = actor.send.as_mut() else { continue };
        actor.on = !actor.on;
        let now = side.clock.now_ns();
        let frame = match actor.kind {
            Kind::Presence => {
                let label = if actor.on { "presence away" } else { "presence back" };
                side.presence.made(actor.user, u64::from(actor.on), label, now);
                id += 1;
                ClientFrame::Request(Request { id, body: RequestBody::SetPresence { away: actor.on } })
            }
            Kind::Typing => {
                side.typing.made(actor.user, u64::from(actor.on), "typing", now);
                ClientFrame::Signal(Signal::Typing { conv: side.conv, typing: actor.on })
            }
        };
        if !write_frame(send, &frame, &side.stats).await {
            actor.send = None;
        }
    }
    let users = side.users.clone();
    let others = move |actor: UserId| (0..users.len()).filter(|&i| users[i] != actor).collect::<Vec<_>>();
    side.presence.settle(&others, SETTLE).await;
    side.typing.settle(&others, SETTLE).await;
    actors
}
