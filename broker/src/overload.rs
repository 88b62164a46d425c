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
//! Two rules, each a bound a user can reason about (`SendRule`, pure, virtual clock):
//! - at most `max_sends_in_flight` writes admitted and not yet answered (a memory bound);
//! - a standing queue (CoDel's idea, RFC 8289): when every write answered during an
//!   interval of `SEND_DELAY_INTERVAL_US` waited longer than `send_delay_target_ms` from
//!   admission to its answer, new writes are refused until one is answered within the
//!   target again, or none is left in flight. A burst that drains within the interval
//!   never triggers it; a commit slower than the target now and then neither.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchboard_protocol::{ErrorBody, ErrorCode};

use crate::config::Config;

/// The window over which the shortest write latency is taken (CoDel's interval). Long
/// enough to hold several group commits, short enough that a standing queue is cut
/// within a tenth of a second.
pub const SEND_DELAY_INTERVAL_US: u64 = 100_000;

/// Why a write was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `max_sends_in_flight` writes are admitted and unanswered.
    InFlight,
    /// Writes are waiting longer than the delay target (a standing queue).
    Delay,
}

impl Refusal {
    /// The answer the client gets.
    pub fn error(self) -> ErrorBody {
        let why = match self {
            Refusal::InFlight => "the broker is at its bound of writes in flight; retry with backoff",
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
    /// 0: the delay rule is off.
    target_us: u64,
    in_flight: usize,
    /// Writes refused so far.
    refused: u64,
    shedding: bool,
    /// Start of the current interval.
    window_start_us: u64,
    /// Shortest admission-to-answer time in the current interval.
    window_min_us: Option<u64>,
}

impl SendRule {
    /// A rule admitting at most `max_in_flight` unanswered writes, and refusing while
    /// writes wait longer than `target_ms` (0: never for delay).
    pub fn new(max_in_flight: usize, target_ms: u64) -> SendRule {
        SendRule {
            max_in_flight,
            target_us: target_ms.saturating_mul(1000),
            in_flight: 0,
            refused: 0,
            shedding: false,
            window_start_us: 0,
            window_min_us: None,
        }
    }

    /// Admits a write arriving at `now_us` (counted in flight until `answered`), or
    /// says why not.
    pub fn admit(&mut self, now_us: u64) -> Result<(), Refusal> {
        self.roll(now_us);
        let refusal = if self.in_flight >= self.max_in_flight {
            Refusal::InFlight
        } else if self.shedding {
            Refusal::Delay
        } else {
            self.in_flight += 1;
            return Ok(());
        };
        self.refused += 1;
        Err(refusal)
    }

    /// A write admitted at `admitted_us` was answered at `now_us` (acknowledged or
    /// refused by its conversation: either way it no longer waits).
    pub fn answered(&mut self, admitted_us: u64, now_us: u64) {
        self.roll(now_us);
        self.in_flight = self.in_flight.saturating_sub(1);
        let waited = now_us.saturating_sub(admitted_us);
        self.window_min_us = Some(self.window_min_us.map_or(waited, |m| m.min(waited)));
        // Capacity is back once a write gets through in time, or nothing is queued.
        if waited <= self.target_us || self.in_flight == 0 {
            self.shedding = false;
        }
    }

    /// Writes admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight
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
    /// The admission `config` asks for (`max_sends_in_flight`, `send_delay_target_ms`).
    pub fn new(config: &Config) -> Arc<SendAdmission> {
        Arc::new(SendAdmission {
            rule: Mutex::new(SendRule::new(config.max_sends_in_flight, config.send_delay_target_ms)),
            epoch: Instant::now(),
        })
    }

    /// A ticket for one write, held until it is answered, or `OVERLOADED`.
    pub fn admit(self: &Arc<Self>) -> Result<SendTicket, ErrorBody> {
        let now = self.now_us();
        self.lock().admit(now).map_err(Refusal::error)?;
        Ok(SendTicket { admission: self.clone(), admitted_us: now })
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

/// One admitted write; dropping it (when the answer is queued) frees its place.
pub struct SendTicket {
    admission: Arc<SendAdmission>,
    admitted_us: u64,
}

impl Drop for SendTicket {
    fn drop(&mut self) {
        let now = self.admission.now_us();
        self.admission.lock().answered(self.admitted_us, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    #[test]
    fn the_in_flight_bound_is_honoured_and_places_return_when_answered() {
        let mut rule = SendRule::new(3, 0);
        for _ in 0..3 {
            rule.admit(0).unwrap();
        }
        assert_eq!(rule.admit(1), Err(Refusal::InFlight));
        assert_eq!((rule.in_flight(), rule.refused()), (3, 1));
        rule.answered(0, 5 * MS);
        rule.admit(6 * MS).unwrap();
        assert_eq!(rule.admit(6 * MS), Err(Refusal::InFlight));
        // With the delay rule off, however late the answers, only the count matters.
        for _ in 0..3 {
            rule.answered(0, 10_000 * MS);
        }
        assert_eq!(rule.in_flight(), 0);
        for _ in 0..3 {
            rule.admit(10_001 * MS).unwrap();
        }
    }

    #[test]
    fn a_standing_queue_sheds_new_writes_until_one_is_answered_in_time() {
        let mut rule = SendRule::new(1000, 20);
        // A queue builds: ten writes admitted 10 ms apart, each answered 50 ms later,
        // and one more just before the interval ends.
        let admitted: Vec<u64> = (0..10).map(|i| i * 10 * MS).chain([99 * MS]).collect();
        for &a in &admitted {
            rule.admit(a).unwrap();
        }
        for (k, &a) in admitted.iter().enumerate().take(5) {
            rule.answered(a, a + 50 * MS);
            assert!(!rule.shedding(), "an interval in progress decides nothing ({k})");
        }
        // The interval ends with every answer late and writes still waiting: shed.
        assert_eq!(rule.admit(100 * MS), Err(Refusal::Delay));
        assert_eq!(rule.admit(101 * MS), Err(Refusal::Delay));
        assert!(rule.shedding());
        // Late answers keep it shedding...
        rule.answered(admitted[5], 110 * MS);
        assert_eq!(rule.admit(111 * MS), Err(Refusal::Delay));
        // ...until one is answered within the target: capacity is back.
        rule.answered(admitted[10], 115 * MS);
        assert!(!rule.shedding());
        rule.admit(116 * MS).unwrap();
        assert_eq!(rule.in_flight(), 11 - 7 + 1);
    }

    #[test]
    fn bursts_that_drain_within_the_interval_and_occasional_slow_commits_are_admitted() {
        let mut rule = SendRule::new(1000, 20);
        let mut now = 0;
        for interval in 0..20u64 {
            // Each interval: one write answered in 2 ms, then a burst answered 60 ms late.
            rule.admit(now).unwrap();
            rule.answered(now, now + 2 * MS);
            for _ in 0..50 {
                rule.admit(now + 10 * MS).unwrap();
            }
            for _ in 0..50 {
                rule.answered(now + 10 * MS, now + 70 * MS);
            }
            assert!(!rule.shedding(), "interval {interval}");
            now += SEND_DELAY_INTERVAL_US;
        }
    }

    #[test]
    fn shedding_ends_when_nothing_is_left_in_flight() {
        let mut rule = SendRule::new(1000, 20);
        rule.admit(0).unwrap();
        rule.admit(0).unwrap();
        rule.answered(0, 60 * MS);
        assert_eq!(rule.admit(150 * MS), Err(Refusal::Delay));
        // The last one answers late too: the queue is empty, so the next write is let in.
        rule.answered(0, 200 * MS);
        assert!(!rule.shedding());
        rule.admit(201 * MS).unwrap();
    }

    #[test]
    fn a_zero_target_never_sheds_for_delay() {
        let mut rule = SendRule::new(1000, 0);
        for i in 0..100u64 {
            rule.admit(i * 50 * MS).unwrap();
            rule.admit(i * 50 * MS).unwrap();
            rule.answered(0, i * 50 * MS + 10_000 * MS);
        }
    }

    #[test]
    fn tickets_count_in_flight_until_dropped() {
        let config = Config { max_sends_in_flight: 2, send_delay_target_ms: 0, ..Config::ephemeral("unused") };
        let admission = SendAdmission::new(&config);
        let a = admission.admit().unwrap();
        let _b = admission.admit().unwrap();
        let refused = admission.admit().err().unwrap();
        assert_eq!(refused.code, ErrorCode::OVERLOADED);
        assert_eq!(admission.in_flight(), 2);
        drop(a);
        assert_eq!(admission.in_flight(), 1);
        admission.admit().unwrap();
    }
}
