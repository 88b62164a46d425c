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
//! Four rules, each a bound a user can reason about (`SendRule`, pure, virtual clock):
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
//!   member, say) waits at most for the commit in flight, not in the queue, and timing
//!   it would let anyone switch the rule off by sending writes to a conversation they
//!   are not in;
//! - a queue in the UDP socket: while every read of a connection's socket has returned
//!   a full batch for longer than `socket_backlog_target_ms` (`SocketBacklog`), new
//!   writes arriving on that socket are refused. The rule above cannot see this queue:
//!   when the runtime falls behind the network, the time is lost before a write
//!   reaches admission, in the kernel's socket buffer, and once that is full the kernel
//!   drops datagrams, each drop a QUIC retransmission timeout for some client, whose
//!   retransmissions and backlog add load to a broker with no headroom (issue 10:
//!   `direct` past saturation, p99 of seconds). Refused writes cost no store write,
//!   commit or delivery (two of a direct message's five datagrams), so the runtime
//!   catches up and the socket empties. Measured with `direct --users 10000 --ramp`
//!   (docs/benchmarks.md, "Shedding at the socket"): 0 datagrams dropped and p99 of
//!   tens of milliseconds up to twice the sustainable load, against 55,000 to 105,000
//!   drops and p99 of 3-7 s without. That bound is the machine's: a refusal still costs
//!   about half a write (its datagram read and decrypted, the answer sent, their
//!   acknowledgements), so on a slower machine, carrying 10,000 writes a second beside
//!   the harness, the rule held with 12,500 offered and collapsed with 15,625 in 7 of 8
//!   runs ("`direct` past saturation on this machine"). Whatever fills the socket
//!   counts, a flood of junk datagrams too: while it keeps the socket queued, writes
//!   arriving there are refused (the client library retries them with backoff). That
//!   frees only the CPU the writes would have taken: a flood faster than the broker
//!   reads still overflows the socket, rule or not. `socket_backlog_target_ms = 0`
//!   turns the rule off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchboard_protocol::{ErrorBody, ErrorCode, UserId};

use crate::config::Config;
use crate::limits::PerUser;

/// The window over which the shortest write latency is taken (CoDel's interval). Long
/// enough to hold several group commits, short enough that a standing queue is cut
/// within a tenth of a second.
pub const SEND_DELAY_INTERVAL_US: u64 = 100_000;

/// How often at most `SendAdmission` logs its refusals: once a second.
pub const REPORT_INTERVAL_US: u64 = 1_000_000;

/// Writes refused since the last report, by reason (`SendRule::report`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    /// `Refusal::InFlight`.
    pub in_flight: u64,
    /// `Refusal::UserInFlight`.
    pub user_in_flight: u64,
    /// `Refusal::Delay`.
    pub delay: u64,
    /// `Refusal::Backlog`.
    pub backlog: u64,
    /// The longest socket queue a `Backlog` refusal saw, µs.
    pub backlog_max_us: u64,
    /// When the previous report was (µs on the rule's clock; 0: none yet).
    pub since_us: u64,
}

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
    /// The write's UDP socket has held a queue (`SocketBacklog`) for longer than the
    /// backlog target: the runtime is behind the network, and datagrams wait in the
    /// kernel.
    Backlog,
}

impl Refusal {
    /// The answer the client gets.
    pub fn error(self) -> ErrorBody {
        let why = match self {
            Refusal::InFlight => "the broker is at its bound of writes in flight; retry with backoff",
            Refusal::UserInFlight => "you have the most writes in flight a user may; retry with backoff",
            Refusal::Delay | Refusal::Backlog => "the broker is saturated; retry with backoff",
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
    /// 0: the socket backlog rule is off.
    backlog_target_us: u64,
    in_flight: usize,
    /// Writes in flight per user; a user's entry goes when its count reaches 0, so there
    /// are at most `in_flight` entries.
    per_user: PerUser,
    /// Writes refused so far.
    refused: u64,
    /// Refusals by reason (`Refusal as usize`) since the last `report`, the longest
    /// socket queue among them, and when that report was.
    unreported: [u64; 4],
    unreported_backlog_us: u64,
    reported_us: u64,
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
            backlog_target_us: 0,
            in_flight: 0,
            per_user: PerUser::default(),
            refused: 0,
            unreported: [0; 4],
            unreported_backlog_us: 0,
            reported_us: 0,
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

    /// The same rule refusing writes while their UDP socket has held a queue
    /// (`SocketBacklog`) for longer than `target_us` (0: never).
    pub fn socket_backlog(mut self, target_us: u64) -> SendRule {
        self.backlog_target_us = target_us;
        self
    }

    /// Admits a write of `user` arriving at `now_us` (counted in flight until
    /// `answered` or `released`), or says why not.
    pub fn admit(&mut self, user: UserId, now_us: u64) -> Result<(), Refusal> {
        self.admit_behind(user, now_us, 0)
    }

    /// `admit`, with the write's socket holding a queue for the last `backlog_us`
    /// (`SocketBacklog::standing_us`).
    pub fn admit_behind(&mut self, user: UserId, now_us: u64, backlog_us: u64) -> Result<(), Refusal> {
        self.roll(now_us);
        let refusal = if self.in_flight >= self.max_in_flight {
            Refusal::InFlight
        } else if self.per_user.held(user) >= self.max_per_user {
            Refusal::UserInFlight
        } else if self.backlog_target_us > 0 && backlog_us > self.backlog_target_us {
            Refusal::Backlog
        } else if self.shedding {
            Refusal::Delay
        } else {
            self.in_flight += 1;
            self.per_user.take(user, self.max_per_user);
            return Ok(());
        };
        self.refused += 1;
        self.unreported[refusal as usize] += 1;
        if refusal == Refusal::Backlog {
            self.unreported_backlog_us = self.unreported_backlog_us.max(backlog_us);
        }
        Err(refusal)
    }

    /// Refusals since the last report, by reason, if there were any and the last report
    /// is at least `REPORT_INTERVAL_US` old at `now_us`; the count then starts again. An
    /// operator hears why writes are refused at most once a second, however many are;
    /// `SendAdmission` asks at every write, admitted or not, so the last refusals of an
    /// episode are told with the next write.
    pub fn report(&mut self, now_us: u64) -> Option<RefusalCounts> {
        if self.unreported.iter().all(|&n| n == 0) || now_us.saturating_sub(self.reported_us) < REPORT_INTERVAL_US {
            return None;
        }
        let [in_flight, user_in_flight, delay, backlog] = std::mem::take(&mut self.unreported);
        let backlog_max_us = std::mem::take(&mut self.unreported_backlog_us);
        let since_us = std::mem::replace(&mut self.reported_us, now_us);
        Some(RefusalCounts { in_flight, user_in_flight, delay, backlog, backlog_max_us, since_us })
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

/// The broker's admission of conversation log writes (`Send`, `SendFiles`, `Edit`,
/// `Delete`, whose client ids make them safe to retry, and the membership changes, which
/// a refusal leaves undone). Shared by every session.
pub struct SendAdmission {
    rule: Mutex<SendRule>,
    epoch: Instant,
}

impl SendAdmission {
    /// The admission `config` asks for (`max_sends_in_flight`,
    /// `max_sends_in_flight_per_user`, `send_delay_target_ms`,
    /// `socket_backlog_target_ms`).
    pub fn new(config: &Config) -> Arc<SendAdmission> {
        // Where the socket is read one datagram per call (quinn-udp's batch of 1, off
        // Linux), every read counts as full and a busy socket that keeps up would look
        // queued: the rule is measured on Linux only, and off elsewhere.
        let backlog_target_ms = if quinn::udp::BATCH_SIZE < 2 { 0 } else { config.socket_backlog_target_ms };
        let rule = SendRule::new(config.max_sends_in_flight, config.send_delay_target_ms)
            .per_user(config.max_sends_in_flight_per_user)
            .socket_backlog(backlog_target_ms.saturating_mul(1000));
        Arc::new(SendAdmission { rule: Mutex::new(rule), epoch: Instant::now() })
    }

    /// A ticket for one write of `user` that arrived on the socket `socket` watches,
    /// held until it is answered, or `OVERLOADED`.
    pub fn admit(self: &Arc<Self>, user: UserId, socket: &SocketBacklog) -> Result<SendTicket, ErrorBody> {
        let at = Instant::now();
        let backlog = socket.standing_us(at);
        let now = at.saturating_duration_since(self.epoch).as_micros() as u64;
        let mut rule = self.lock();
        let admitted = rule.admit_behind(user, now, backlog);
        let report = rule.report(now);
        drop(rule);
        if let Some(counts) = report {
            log_refusals(&counts, now);
        }
        admitted.map_err(Refusal::error)?;
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

/// How long a UDP socket has held a queue: the time since the first of an unbroken run
/// of reads (`recvmmsg` by quinn's endpoint driver, `MeteredSocket`) that each returned
/// a full batch. A read that returns fewer datagrams than it had room for, or none,
/// found the queue empty and ends the run. While the runtime keeps up, the driver's
/// reads find the socket empty again and again; when it falls behind, datagrams queue
/// in the kernel between its turns, every read returns a full batch, and the socket,
/// once full, drops them (each drop a retransmission timeout for some client). This
/// sees the queue where it forms, which the admission-to-answer delay never does. The
/// time a turn of the driver waits in the runtime's queue after a full read counts:
/// datagrams wait meanwhile. One per socket, written only by that socket's driver.
#[derive(Debug)]
pub struct SocketBacklog {
    epoch: Instant,
    /// Microseconds after `epoch`, plus one, of the first full read since the socket
    /// was last found empty; 0 while it is empty.
    busy_since: AtomicU64,
}

impl SocketBacklog {
    /// A socket found empty now.
    pub fn new() -> Arc<SocketBacklog> {
        Arc::new(SocketBacklog { epoch: Instant::now(), busy_since: AtomicU64::new(0) })
    }

    /// A read filled its whole batch: the socket may hold more. A run of full reads
    /// starts at the first, so the clock (`at`) is read only then.
    pub fn full(&self, at: impl FnOnce() -> Instant) {
        if self.busy_since.load(Ordering::Relaxed) == 0 {
            let us = at().saturating_duration_since(self.epoch).as_micros() as u64;
            self.busy_since.store(us + 1, Ordering::Relaxed);
        }
    }

    /// A read found the socket empty (fewer datagrams than it had room for, or none).
    pub fn drained(&self) {
        if self.busy_since.load(Ordering::Relaxed) != 0 {
            self.busy_since.store(0, Ordering::Relaxed);
        }
    }

    /// How long, at `at`, every read of the socket has returned a full batch, µs.
    pub fn standing_us(&self, at: Instant) -> u64 {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => 0,
            since => (at.saturating_duration_since(self.epoch).as_micros() as u64).saturating_sub(since - 1),
        }
    }
}

/// A UDP socket for quinn that tells a `SocketBacklog` of every read: whether it filled
/// its batch (counting the datagrams a receive-offloaded message carries); everything
/// else is the runtime's own socket's (GSO, GRO, ECN and all).
#[derive(Debug)]
pub struct MeteredSocket {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    backlog: Arc<SocketBacklog>,
}

impl MeteredSocket {
    /// `socket`, registered with tokio, reporting to `backlog`.
    pub fn new(socket: std::net::UdpSocket, backlog: Arc<SocketBacklog>) -> std::io::Result<Arc<MeteredSocket>> {
        use quinn::Runtime;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        Ok(Arc::new(MeteredSocket { inner, backlog }))
    }

    /// Gone once the socket is closed (its endpoint's driver and pollers dropped it):
    /// only then is its port free for another bind.
    pub fn closed_watch(&self) -> std::sync::Weak<dyn quinn::AsyncUdpSocket> {
        Arc::downgrade(&self.inner)
    }
}

impl quinn::AsyncUdpSocket for MeteredSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let room = bufs.len().min(meta.len()).min(quinn::udp::BATCH_SIZE);
        let polled = self.inner.poll_recv(cx, bufs, meta);
        let full = match &polled {
            // Datagrams, not messages: with receive offload (GRO) one message carries
            // several of a flow's datagrams, `stride` bytes each.
            std::task::Poll::Ready(Ok(n)) => {
                let datagrams: usize = meta[..*n].iter().map(|m| m.len.div_ceil(m.stride.max(1)).max(1)).sum();
                datagrams >= room
            }
            // Empty; or the read failed, after which quinn's driver stops: nothing is
            // left to count.
            std::task::Poll::Pending | std::task::Poll::Ready(Err(_)) => false,
        };
        if full {
            self.backlog.full(Instant::now);
        } else {
            self.backlog.drained();
        }
        polled
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Tells the operator why writes were refused since the last report: a warning when the
/// broker was short (writes in flight, a queue of writes or of datagrams), debug when
/// only users past their own share were refused (their own doing).
fn log_refusals(counts: &RefusalCounts, now_us: u64) {
    let over_ms = now_us.saturating_sub(counts.since_us) / 1000;
    if counts.in_flight + counts.delay + counts.backlog > 0 {
        tracing::warn!(
            over_ms,
            in_flight = counts.in_flight,
            user_in_flight = counts.user_in_flight,
            delay = counts.delay,
            socket_backlog = counts.backlog,
            socket_backlog_max_ms = counts.backlog_max_us / 1000,
            "refused message writes with OVERLOADED (by reason, since the last report)"
        );
    } else {
        tracing::debug!(over_ms, user_in_flight = counts.user_in_flight, "refused writes of users past their share");
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
        let socket = SocketBacklog::new();
        let a = admission.admit(U, &socket).unwrap();
        let _b = admission.admit(2, &socket).unwrap();
        let refused = admission.admit(3, &socket).err().unwrap();
        assert_eq!(refused.code, ErrorCode::OVERLOADED);
        assert_eq!(admission.in_flight(), 2);
        drop(a);
        assert_eq!(admission.in_flight(), 1);
        admission.admit(3, &socket).unwrap();
    }

    /// With several sockets (`udp_sockets`), a queue in one refuses only the writes
    /// that arrive on it: a flow that fills one socket does not stop the others.
    #[test]
    fn a_socket_queue_refuses_only_the_writes_that_arrive_on_that_socket() {
        let admission = SendAdmission::new(&Config { socket_backlog_target_ms: 1, ..Config::ephemeral("unused") });
        let (busy, quiet) = (SocketBacklog::new(), SocketBacklog::new());
        busy.full(Instant::now);
        quiet.drained();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(admission.admit(U, &busy).err().map(|e| e.code), Some(ErrorCode::OVERLOADED));
        let _admitted = admission.admit(U, &quiet).unwrap();
        // Off: admitted whatever the socket.
        let off = SendAdmission::new(&Config { socket_backlog_target_ms: 0, ..Config::ephemeral("unused") });
        let _admitted = off.admit(U, &busy).unwrap();
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

    #[test]
    fn a_socket_queue_standing_longer_than_the_target_refuses_writes() {
        let mut rule = SendRule::new(1000, 20).socket_backlog(20 * MS);
        rule.admit_behind(U, 0, 20 * MS).unwrap();
        assert_eq!(rule.admit_behind(U, MS, 20 * MS + 1), Err(Refusal::Backlog));
        assert_eq!(Refusal::Backlog.error().code, ErrorCode::OVERLOADED);
        // Read empty once: admitted again at once.
        rule.admit_behind(U, 2 * MS, 0).unwrap();
        // A refusal holds no place.
        assert_eq!((rule.in_flight(), rule.refused()), (2, 1));
        // Off with a target of 0.
        let mut off = SendRule::new(1000, 0).socket_backlog(0);
        off.admit_behind(U, 0, 60_000 * MS).unwrap();
    }

    #[test]
    fn a_socket_backlog_counts_from_the_first_full_read_after_the_socket_was_empty() {
        let backlog = SocketBacklog::new();
        let t = backlog.epoch + std::time::Duration::from_millis(100);
        let ms = std::time::Duration::from_millis;
        // Idle (never read): no backlog, however long.
        assert_eq!(backlog.standing_us(t), 0);
        backlog.full(|| t);
        backlog.full(|| t + ms(3));
        // Later full reads do not move its start.
        assert_eq!(backlog.standing_us(t + ms(7)), 7 * MS);
        // A short read found the socket empty.
        backlog.drained();
        assert_eq!(backlog.standing_us(t + ms(9)), 0);
        backlog.full(|| t + ms(10));
        assert_eq!(backlog.standing_us(t + ms(11)), MS);
    }

    /// One `poll_recv` of `socket` with room for `slots` datagrams: how many it read,
    /// or None if it found none.
    async fn read_some(socket: &MeteredSocket, slots: usize) -> Option<usize> {
        use quinn::AsyncUdpSocket;
        let mut buf = vec![0u8; 65536 * slots];
        std::future::poll_fn(|cx| {
            let mut bufs: Vec<_> = buf.chunks_mut(65536).map(std::io::IoSliceMut::new).collect();
            let mut meta = vec![quinn::udp::RecvMeta::default(); slots];
            match socket.poll_recv(cx, &mut bufs, &mut meta) {
                std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r.unwrap())),
                // Pending registered the waker; say so instead of waiting.
                std::task::Poll::Pending => std::task::Poll::Ready(None),
            }
        })
        .await
    }

    /// Through a real socket: while reads return full batches the backlog stands; a
    /// read with room to spare, or one that finds nothing, clears it. The wrapper keeps
    /// the runtime socket's segment counts (GSO, GRO) and fragmentation setting (which
    /// decides whether quinn discovers the path MTU).
    #[tokio::test]
    async fn a_metered_socket_reports_reads_to_its_backlog() {
        use quinn::AsyncUdpSocket;
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = std_socket.local_addr().unwrap();
        let backlog = SocketBacklog::new();
        let socket = MeteredSocket::new(std_socket, backlog.clone()).unwrap();
        let inner = {
            use quinn::Runtime;
            quinn::TokioRuntime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap()
        };
        assert_eq!(socket.max_receive_segments(), inner.max_receive_segments());
        assert_eq!(socket.max_transmit_segments(), inner.max_transmit_segments());
        assert_eq!(socket.may_fragment(), inner.may_fragment());
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let send = |n: u8| {
            for i in 0..n {
                // Sizes apart, so that no receive offload joins them.
                peer.send_to(&vec![i; 100 + usize::from(i)], addr).unwrap();
            }
        };
        let pause = || tokio::time::sleep(std::time::Duration::from_millis(30));
        send(3);
        // The datagrams may take a moment to arrive on loopback.
        while read_some(&socket, 1).await.is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        pause().await;
        assert!(backlog.standing_us(Instant::now()) >= 30 * MS, "a full read, two datagrams still queued");
        assert_eq!(read_some(&socket, 1).await, Some(1));
        assert!(backlog.standing_us(Instant::now()) >= 30 * MS, "another full read");
        // Room for three, one left: the queue is empty.
        assert_eq!(read_some(&socket, 3).await, Some(1));
        assert_eq!(backlog.standing_us(Instant::now()), 0);
        send(2);
        pause().await;
        assert_eq!(read_some(&socket, 1).await, Some(1));
        pause().await;
        assert!(backlog.standing_us(Instant::now()) >= 30 * MS);
        assert_eq!(read_some(&socket, 1).await, Some(1));
        assert_eq!(read_some(&socket, 1).await, None, "nothing left");
        assert_eq!(backlog.standing_us(Instant::now()), 0);

        // One message that receive offload made of 40 datagrams sent as one (GSO) fills a
        // batch of 32 as 40 datagrams would: it counts as a queue.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = quinn::udp::UdpSocketState::new((&sender).into()).unwrap();
        if state.max_gso_segments() >= 40 && socket.max_receive_segments() >= 40 {
            let contents = vec![7u8; 40 * 100];
            let transmit = quinn::udp::Transmit {
                destination: addr,
                ecn: None,
                contents: &contents,
                segment_size: Some(100),
                src_ip: None,
            };
            state.send((&sender).into(), &transmit).unwrap();
            let mut read = None;
            while read.is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                read = read_some(&socket, 32).await;
            }
            pause().await;
            if read == Some(1) {
                assert!(backlog.standing_us(Instant::now()) >= 30 * MS, "40 datagrams in one message");
            }
        }
    }

    #[test]
    fn refusals_are_reported_by_reason_at_most_once_a_second() {
        let mut rule = SendRule::new(1, 0).socket_backlog(20 * MS);
        rule.admit(U, 0).unwrap();
        assert_eq!(rule.admit(2, 0), Err(Refusal::InFlight));
        let first = rule.report(REPORT_INTERVAL_US).unwrap();
        assert_eq!(first, RefusalCounts { in_flight: 1, ..RefusalCounts::default() });
        rule.released(U, REPORT_INTERVAL_US);
        for i in 0..5 {
            assert_eq!(rule.admit_behind(U, REPORT_INTERVAL_US + MS, (21 + i) * MS), Err(Refusal::Backlog));
        }
        assert_eq!(rule.report(REPORT_INTERVAL_US + 2 * MS), None, "a report within the second");
        let next = rule.report(2 * REPORT_INTERVAL_US).unwrap();
        let want =
            RefusalCounts { backlog: 5, backlog_max_us: 25 * MS, since_us: REPORT_INTERVAL_US, ..Default::default() };
        assert_eq!(next, want);
        assert_eq!(rule.report(4 * REPORT_INTERVAL_US), None, "nothing refused since");
    }
}
