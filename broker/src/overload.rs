//! Admission of message writes when the broker runs short of CPU or disk: past
//! saturation, new writes are refused at once with `OVERLOADED` (clients retry with
//! backoff, exactly once by their client ids) instead of queueing without bound.
//!
//! Without this, every write the network delivers is admitted, and when the broker can
//! do fewer per second than arrive, the work queued on the runtime grows without bound:
//! latency grows by the second, and quinn's endpoint driver, which reads the UDP socket
//! for at most 50 µs per turn and then waits behind every queued task, falls behind the
//! socket, which overflows; the clients' retransmission timers turn the drops into
//! seconds more (issue 10: `direct --users 10000` on a slower machine, p99 3.8 s and
//! 90,687 datagrams dropped). Refusing early keeps the run queue short, so the socket
//! keeps being read, and a refusal costs a fraction of an admitted write (no store write,
//! no commit, no delivery).
//!
//! Three rules, each a bound a user can reason about (`SendRule`, pure, virtual clock):
//! - at most `max_sends_in_flight` writes admitted and not yet answered (a memory bound);
//! - at most `max_sends_in_flight_per_user` of them one user's, over all its sessions:
//!   a user with 64 sessions of 64 requests each cannot hold every place and have every
//!   other user's writes refused; past its share only that user is refused;
//! - a standing queue (CoDel's idea, RFC 8289): when every write applied during an
//!   interval of `SEND_DELAY_INTERVAL_US` waited longer than `send_delay_target_ms` from
//!   admission to its answer, new writes are refused until one is answered within the
//!   target again, or none is left in flight. A burst that drains within the interval
//!   never triggers it; a commit slower than the target now and then neither. Only
//!   writes answered `Ok` (applied) are timed: a write refused on a cheap check (not a
//!   member, say) never waited in the queue, and timing it would let anyone switch the
//!   rule off by sending writes to a conversation they are not in.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchboard_protocol::{ErrorBody, ErrorCode, UserId};

use crate::config::Config;
use crate::limits::PerUser;

/// The window over which the shortest write latency is taken (CoDel's interval). Long
/// enough to hold several group commits, short enough that a standing queue is cut
/// within a tenth of a second.
pub const SEND_DELAY_INTERVAL_US: u64 = 100_000;

/// Why a write was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_sends_in_flight` writes are admitted and unanswered.
    InFlight,
    /// The user already has `max_sends_in_flight_per_user` writes admitted and
    /// unanswered.
    UserInFlight,
    /// Writes are waiting longer than the delay target (a standing queue).
    Delay,
}

impl Refusal {
    /// The answer the client gets.
    pub fn error(self) -> ErrorBody {
        let why = match self {
            Refusal::InFlight => "the broker is at its bound of writes in flight; retry with backoff",
            Refusal::UserInFlight => "you have the most writes in flight a user may; retry with backoff",
            Refusal::Delay => "the broker is saturated; retry with backoff",
        };
        ErrorBody::new(ErrorCode::OVERLOADED, why)
    }
}

/// The admission rule, without a clock or locks: times are microseconds on any
/// monotonic clock, passed in.
#[derive(Clone, Debug)]
pub struct SendRule {
    max_in_flight: usize,
    /// Most writes of one user in flight.
    max_per_user: usize,
    /// 0: the delay rule is off.
    target_us: u64,
    in_flight: usize,
    /// Writes in flight per user; a user's entry goes when its count reaches 0, so there
    /// are at most `in_flight` entries.
    per_user: PerUser,
    /// Writes refused so far.
    refused: u64,
    shedding: bool,
    /// Start of the current interval.
    window_start_us: u64,
    /// Shortest admission-to-answer time in the current interval.
    window_min_us: Option<u64>,
}

impl SendRule {
    /// A rule admitting at most `max_in_flight` unanswered writes (any number of them
    /// one user's: see `per_user`), and refusing while writes wait longer than
    /// `target_ms` (0: never for delay).
    pub fn new(max_in_flight: usize, target_ms: u64) -> SendRule {
        SendRule {
            max_in_flight,
            max_per_user: max_in_flight,
            target_us: target_ms.saturating_mul(1000),
            in_flight: 0,
            per_user: PerUser::default(),
            refused: 0,
            shedding: false,
            window_start_us: 0,
            window_min_us: None,
        }
    }

    /// The same rule admitting at most `max` unanswered writes of one user (at least 1).
    pub fn per_user(mut self, max: usize) -> SendRule {
        self.max_per_user = max.max(1);
        self
    }

    /// Admits a write of `user` arriving at `now_us` (counted in flight until
    /// `answered` or `released`), or says why not.
    pub fn admit(&mut self, user: UserId, now_us: u64) -> Result<(), Refusal> {
        self.roll(now_us);
        let refusal = if self.in_flight >= self.max_in_flight {
            Refusal::InFlight
        } else if self.per_user.held(user) >= self.max_per_user {
            Refusal::UserInFlight
        } else if self.shedding {
            Refusal::Delay
        } else {
            self.in_flight += 1;
            self.per_user.take(user, self.max_per_user);
            return Ok(());
        };
        self.refused += 1;
        Err(refusal)
    }

    /// A write of `user` admitted at `admitted_us` was applied and answered `Ok` at
    /// `now_us`: its wait is a sample of the queue's delay.
    pub fn answered(&mut self, user: UserId, admitted_us: u64, now_us: u64) {
        self.roll(now_us);
        self.count_out(user);
        let waited = now_us.saturating_sub(admitted_us);
        self.window_min_us = Some(self.window_min_us.map_or(waited, |m| m.min(waited)));
        // Capacity is back once a write gets through in time, or nothing is queued.
        if waited <= self.target_us || self.in_flight == 0 {
            self.shedding = false;
        }
    }

    /// A write of `user` was answered with an error at `now_us` (refused by a check, or
    /// failed): it gives its place back, and its wait says nothing about the queue's
    /// delay (it may never have reached the queue).
    pub fn released(&mut self, user: UserId, now_us: u64) {
        self.roll(now_us);
        self.count_out(user);
        if self.in_flight == 0 {
            self.shedding = false;
        }
    }

    fn count_out(&mut self, user: UserId) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.per_user.give_back(user);
    }

    /// Writes admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Writes of `user` admitted and not yet answered.
    pub fn user_in_flight(&self, user: UserId) -> usize {
        self.per_user.held(user)
    }

    /// Users with a write in flight (the size of the per-user map).
    pub fn users_in_flight(&self) -> usize {
        self.per_user.users()
    }

    /// Writes refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Whether new writes are being refused for delay.
    pub fn shedding(&self) -> bool {
        self.shedding
    }

    /// Ends the interval if `now_us` is past it: a standing queue (every answer in it
    /// late) starts shedding.
    fn roll(&mut self, now_us: u64) {
        if now_us.saturating_sub(self.window_start_us) < SEND_DELAY_INTERVAL_US {
            return;
        }
        if self.target_us > 0
            && let Some(min) = self.window_min_us
            && min > self.target_us
            && self.in_flight > 0
        {
            self.shedding = true;
        }
        self.window_start_us = now_us;
        self.window_min_us = None;
    }
}

/// The broker's admission of message writes (`Send`, `SendFiles`, `Edit`, `Delete`: the
/// writes a client id makes safe to retry). Shared by every session.
pub struct SendAdmission {
    rule: Mutex<SendRule>,
    epoch: Instant,
}

impl SendAdmission {
    /// The admission `config` asks for (`max_sends_in_flight`,
    /// `max_sends_in_flight_per_user`, `send_delay_target_ms`).
    pub fn new(config: &Config) -> Arc<SendAdmission> {
        let rule = SendRule::new(config.max_sends_in_flight, config.send_delay_target_ms)
            .per_user(config.max_sends_in_flight_per_user);
        Arc::new(SendAdmission { rule: Mutex::new(rule), epoch: Instant::now() })
    }

    /// A ticket for one write of `user`, held until it is answered, or `OVERLOADED`.
    pub fn admit(self: &Arc<Self>, user: UserId) -> Result<SendTicket, ErrorBody> {
        let now = self.now_us();
        self.lock().admit(user, now).map_err(Refusal::error)?;
        Ok(SendTicket { admission: self.clone(), user, admitted_us: now, applied: false })
    }

    /// Writes admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight()
    }

    /// Writes refused with `OVERLOADED` since the broker started.
    pub fn refused(&self) -> u64 {
        self.lock().refused()
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SendRule> {
        self.rule.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One admitted write of a user; dropping it (when the answer is queued) frees its
/// place. Its wait is timed only if it was marked `applied`.
pub struct SendTicket {
    admission: Arc<SendAdmission>,
    user: UserId,
    admitted_us: u64,
    applied: bool,
}

impl SendTicket {
    /// The write was applied (answered `Ok`): its admission-to-answer time, taken when
    /// the ticket drops, is a sample of the queue's delay.
    pub fn applied(&mut self) {
        self.applied = true;
    }
}

impl Drop for SendTicket {
    fn drop(&mut self) {
        let now = self.admission.now_us();
        let mut rule = self.admission.lock();
        if self.applied {
            rule.answered(self.user, self.admitted_us, now);
        } else {
            rule.released(self.user, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;
    /// The user of writes whose user does not matter.
    const U: UserId = 1;

    #[test]
    fn the_in_flight_bound_is_honoured_and_places_return_when_answered() {
        let mut rule = SendRule::new(3, 0);
        for _ in 0..3 {
            rule.admit(U, 0).unwrap();
        }
        assert_eq!(rule.admit(U, 1), Err(Refusal::InFlight));
        assert_eq!((rule.in_flight(), rule.refused()), (3, 1));
        rule.answered(U, 0, 5 * MS);
        rule.admit(U, 6 * MS).unwrap();
        assert_eq!(rule.admit(U, 6 * MS), Err(Refusal::InFlight));
        // With the delay rule off, however late the answers, only the count matters.
        for _ in 0..3 {
            rule.answered(U, 0, 10_000 * MS);
        }
        assert_eq!(rule.in_flight(), 0);
        for _ in 0..3 {
            rule.admit(U, 10_001 * MS).unwrap();
        }
    }

    #[test]
    fn a_standing_queue_sheds_new_writes_until_one_is_answered_in_time() {
        let mut rule = SendRule::new(1000, 20);
        // A queue builds: ten writes admitted 10 ms apart, each answered 50 ms later,
        // and one more just before the interval ends.
        let admitted: Vec<u64> = (0..10).map(|i| i * 10 * MS).chain([99 * MS]).collect();
        for &a in &admitted {
            rule.admit(U, a).unwrap();
        }
        for (k, &a) in admitted.iter().enumerate().take(5) {
            rule.answered(U, a, a + 50 * MS);
            assert!(!rule.shedding(), "an interval in progress decides nothing ({k})");
        }
        // The interval ends with every answer late and writes still waiting: shed.
        assert_eq!(rule.admit(U, 100 * MS), Err(Refusal::Delay));
        assert_eq!(rule.admit(U, 101 * MS), Err(Refusal::Delay));
        assert!(rule.shedding());
        // Late answers keep it shedding...
        rule.answered(U, admitted[5], 110 * MS);
        assert_eq!(rule.admit(U, 111 * MS), Err(Refusal::Delay));
        // ...until one is answered within the target: capacity is back.
        rule.answered(U, admitted[10], 115 * MS);
        assert!(!rule.shedding());
        rule.admit(U, 116 * MS).unwrap();
        assert_eq!(rule.in_flight(), 11 - 7 + 1);
    }

    #[test]
    fn bursts_that_drain_within_the_interval_and_occasional_slow_commits_are_admitted() {
        let mut rule = SendRule::new(1000, 20);
        let mut now = 0;
        for interval in 0..20u64 {
            // Each interval: one write answered in 2 ms, then a burst answered 60 ms late.
            rule.admit(U, now).unwrap();
            rule.answered(U, now, now + 2 * MS);
            for _ in 0..50 {
                rule.admit(U, now + 10 * MS).unwrap();
            }
            for _ in 0..50 {
                rule.answered(U, now + 10 * MS, now + 70 * MS);
            }
            assert!(!rule.shedding(), "interval {interval}");
            now += SEND_DELAY_INTERVAL_US;
        }
    }

    #[test]
    fn shedding_ends_when_nothing_is_left_in_flight() {
        let mut rule = SendRule::new(1000, 20);
        rule.admit(U, 0).unwrap();
        rule.admit(U, 0).unwrap();
        rule.answered(U, 0, 60 * MS);
        assert_eq!(rule.admit(U, 150 * MS), Err(Refusal::Delay));
        // The last one answers late too: the queue is empty, so the next write is let in.
        rule.answered(U, 0, 200 * MS);
        assert!(!rule.shedding());
        rule.admit(U, 201 * MS).unwrap();
    }

    #[test]
    fn a_zero_target_never_sheds_for_delay() {
        let mut rule = SendRule::new(1000, 0);
        for i in 0..100u64 {
            rule.admit(U, i * 50 * MS).unwrap();
            rule.admit(U, i * 50 * MS).unwrap();
            rule.answered(U, 0, i * 50 * MS + 10_000 * MS);
        }
    }

    #[test]
    fn tickets_count_in_flight_until_dropped() {
        let config = Config { max_sends_in_flight: 2, send_delay_target_ms: 0, ..Config::ephemeral("unused") };
        let admission = SendAdmission::new(&config);
        let a = admission.admit(U).unwrap();
        let _b = admission.admit(2).unwrap();
        let refused = admission.admit(3).err().unwrap();
        assert_eq!(refused.code, ErrorCode::OVERLOADED);
        assert_eq!(admission.in_flight(), 2);
        drop(a);
        assert_eq!(admission.in_flight(), 1);
        admission.admit(3).unwrap();
    }

    #[test]
    fn a_user_past_its_share_is_refused_and_others_are_still_admitted() {
        let (alice, carol) = (1, 2);
        let mut rule = SendRule::new(8, 0).per_user(2);
        rule.admit(alice, 0).unwrap();
        rule.admit(alice, 0).unwrap();
        assert_eq!(rule.admit(alice, 1), Err(Refusal::UserInFlight));
        assert_eq!(rule.refused(), 1);
        // Room is left for everyone else: the broker-wide bound is not reached.
        rule.admit(carol, 1).unwrap();
        assert_eq!((rule.user_in_flight(alice), rule.user_in_flight(carol), rule.in_flight()), (2, 1, 3));
        // A place alice gets back, by an answer or a refusal, is hers to use again.
        rule.answered(alice, 0, 5 * MS);
        rule.admit(alice, 6 * MS).unwrap();
        rule.released(alice, 7 * MS);
        rule.admit(alice, 8 * MS).unwrap();
        assert_eq!(rule.admit(alice, 8 * MS), Err(Refusal::UserInFlight));
        // The broker-wide bound still holds over all users.
        for user in 3..8 {
            rule.admit(user, 9 * MS).unwrap();
        }
        assert_eq!(rule.admit(9, 9 * MS), Err(Refusal::InFlight));
        // Every user's entry goes with its last write: the map does not grow.
        for user in [alice, alice, carol, 3, 4, 5, 6, 7] {
            rule.released(user, 10 * MS);
        }
        assert_eq!((rule.in_flight(), rule.users_in_flight()), (0, 0));
    }

    #[test]
    fn a_write_refused_before_the_queue_does_not_hide_a_standing_queue() {
        let mut rule = SendRule::new(1000, 20);
        rule.admit(U, 0).unwrap();
        rule.admit(U, 0).unwrap();
        rule.answered(U, 0, 60 * MS);
        // A write refused on a cheap check (not a member) gives its place back at once,
        // having waited nothing: that says nothing of the queue.
        rule.admit(2, 90 * MS).unwrap();
        rule.released(2, 90 * MS);
        // The interval ended with every applied write late and one still waiting.
        assert_eq!(rule.admit(U, 150 * MS), Err(Refusal::Delay));
    }
}
