//! Harness connections. Each simulated device is a raw authenticated session: one task
//! reads it (deliveries and acks are measured right there, no hop to another task) and,
//! for senders, one task writes requests on an open-loop schedule without waiting for
//! answers, so a slow broker shows up as latency, not as a slower offered load.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use switchboard_client::{ClientError, Connector, Identity, RawSession};
use switchboard_protocol::{
    Body, ClientFrame, ConvId, ErrorCode, Event, FrameDecoder, Reply, Request, RequestBody, ServerFrame, decode,
    encode_frame,
};
use tokio::sync::watch;

use crate::checker::{Acked, Tracker};
use crate::error::{Error, Result};
use crate::payload;
use crate::stats::{BATCH, Clock, Stats};
use crate::target::Target;

/// Concurrent enrollments / connects during set-up.
const SETUP_CONCURRENCY: usize = 64;
/// Connections per client endpoint (one UDP socket and driver task each).
const CONNECTIONS_PER_ENDPOINT: usize = 128;
/// Endpoints at most.
const MAX_ENDPOINTS: usize = 16;

/// Enrolled users and the endpoints to reach the broker.
#[derive(Clone)]
pub struct Population {
    /// One identity per simulated device.
    pub users: Vec<Identity>,
    connectors: Vec<Connector>,
}

impl Population {
    /// Registers `count` users named `{tag}u{i}` (the tag keeps runs apart on a shared broker).
    pub async fn enroll(target: &Target, tag: &str, count: usize) -> Result<Population> {
        let endpoints = count.div_ceil(CONNECTIONS_PER_ENDPOINT).clamp(1, MAX_ENDPOINTS);
        let connectors = (0..endpoints).map(|_| target.connector()).collect::<Result<Vec<_>>>()?;
        let mut users = Vec::with_capacity(count);
        for chunk_start in (0..count).step_by(SETUP_CONCURRENCY) {
            let mut set = tokio::task::JoinSet::new();
            for i in chunk_start..(chunk_start + SETUP_CONCURRENCY).min(count) {
                let connector = connectors[i % endpoints].clone();
                let name = format!("{tag}u{i}");
                set.spawn(async move {
                    let (client, identity) = connector.register(&name, "load-test-password", "load").await?;
                    client.close();
                    Ok((i, identity))
                });
            }
            let mut chunk: Vec<(usize, Identity)> =
                set.join_all().await.into_iter().collect::<Result<_, ClientError>>().map_err(Error::Enroll)?;
            chunk.sort_by_key(|(i, _)| *i);
            users.extend(chunk.into_iter().map(|(_, id)| id));
        }
        Ok(Population { users, connectors })
    }

    /// Waits, at most `limit`, until every connection made through this population's
    /// endpoints is closed and its closing sent. A harness that exits first leaves a
    /// remote broker holding those sessions until its idle timeout (`storm` and
    /// `presence` left their users online there for 30 s).
    pub async fn wait_idle(&self, limit: Duration) {
        let all = async {
            for connector in &self.connectors {
                connector.endpoint().wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
    }

    /// Name of user `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.users[i].user
    }

    /// The endpoint user `i` connects through.
    pub fn connector(&self, i: usize) -> &Connector {
        &self.connectors[i % self.connectors.len()]
    }

    /// Authenticates user `i` as a high-level client (for set-up requests).
    pub async fn client(&self, i: usize) -> Result<switchboard_client::Client> {
        Ok(self.connector(i).connect(&self.users[i]).await?)
    }

    /// Authenticates every user in `range` as a raw session, `SETUP_CONCURRENCY` at a time.
    pub async fn connect_raw(&self, range: std::ops::Range<usize>) -> Result<Vec<RawSession>> {
        let mut out = Vec::with_capacity(range.len());
        let ids: Vec<usize> = range.collect();
        for chunk in ids.chunks(SETUP_CONCURRENCY) {
            let mut set = tokio::task::JoinSet::new();
            for &i in chunk {
                let connector = self.connector(i).clone();
                let identity = self.users[i].clone();
                set.spawn(async move { Ok::<_, Error>((i, connector.connect_raw(&identity).await?)) });
            }
            let mut got: Vec<(usize, RawSession)> = set.join_all().await.into_iter().collect::<Result<_>>()?;
            got.sort_by_key(|(i, _)| *i);
            out.extend(got.into_iter().map(|(_, s)| s));
        }
        Ok(out)
    }
}

/// Runs a conversation creation, waiting out `RATE_LIMITED`: the broker allows each
/// user 20 creations in a burst, then one a second, and a scenario may ask for more.
async fn creating<T, F>(mut create: impl FnMut() -> F) -> Result<T>
where
    F: std::future::Future<Output = std::result::Result<T, ClientError>>,
{
    const ATTEMPTS: u32 = 600;
    for _ in 0..ATTEMPTS {
        match create().await {
            Err(e) if e.code() == Some(switchboard_protocol::ErrorCode::RATE_LIMITED) => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            other => return Ok(other?),
        }
    }
    Err(Error::RateLimited { attempts: ATTEMPTS })
}

/// Creates a group owned by user `owner` with the given members; returns its id.
pub async fn create_group(pop: &Population, owner: usize, members: &[usize], title: &str) -> Result<ConvId> {
    let client = pop.client(owner).await?;
    let names: Vec<String> = members.iter().filter(|&&m| m != owner).map(|&m| pop.name(m).to_owned()).collect();
    let mut chunks = names.chunks(switchboard_protocol::limits::MAX_USERS_PER_REQUEST as usize);
    let first = chunks.next().unwrap_or_default();
    let conv = creating(|| client.create_group(title, first)).await?.id;
    for chunk in chunks {
        client.add_members(conv, chunk, switchboard_protocol::Role::Member).await?;
    }
    client.close();
    Ok(conv)
}

/// Creates the direct conversation between users `a` and `b`.
pub async fn create_direct(pop: &Population, a: usize, b: usize) -> Result<ConvId> {
    let client = pop.client(a).await?;
    let conv = creating(|| client.create_direct(pop.name(b))).await?.id;
    client.close();
    Ok(conv)
}

/// Creates the direct conversations of `pairs`, `SETUP_CONCURRENCY` at a time.
pub async fn create_directs(pop: &std::sync::Arc<Population>, pairs: &[(usize, usize)]) -> Result<Vec<ConvId>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(SETUP_CONCURRENCY) {
        let mut set = tokio::task::JoinSet::new();
        for (k, &(a, b)) in chunk.iter().enumerate() {
            let pop = pop.clone();
            set.spawn(async move { Ok((k, create_direct(&pop, a, b).await?)) });
        }
        let mut got: Vec<(usize, ConvId)> = set.join_all().await.into_iter().collect::<Result<_>>()?;
        got.sort_by_key(|(k, _)| *k);
        out.extend(got.into_iter().map(|(_, c)| c));
    }
    Ok(out)
}

/// What one sender sends in one phase: `count` messages, evenly spaced from `start_ns`,
/// each to a conversation picked from `convs` by its index.
#[derive(Debug)]
pub struct SendPlan {
    /// Conversations to send into.
    pub convs: Vec<ConvId>,
    /// Deliveries a message to each of `convs` should make (its members but the
    /// sender), by the same index.
    pub recipients: Vec<u64>,
    /// First scheduled send, harness clock.
    pub start_ns: u64,
    /// Spacing.
    pub interval_ns: u64,
    /// Messages in the phase.
    pub count: u32,
    /// Message size in bytes.
    pub size: usize,
}

/// Request ids carry the phase in their top byte, so a reader maps an ack back to its
/// plan (and so its schedule and conversation) without shared per-message state.
const PHASE_SHIFT: u32 = 24;

/// Messages one sender may send in a phase: its request ids number them below the phase.
pub const MAX_SENDS_PER_PHASE: u32 = 1 << PHASE_SHIFT;

impl SendPlan {
    fn sched_ns(&self, i: u32) -> u64 {
        self.start_ns + u64::from(i) * self.interval_ns
    }

    fn conv(&self, i: u32) -> ConvId {
        self.convs[self.conv_index(i)]
    }

    fn recipients(&self, i: u32) -> u64 {
        self.recipients.get(self.conv_index(i)).copied().unwrap_or(0)
    }

    fn conv_index(&self, i: u32) -> usize {
        // A multiplicative hash spreads consecutive messages over the conversations.
        (i.wrapping_mul(2_654_435_761) as usize) % self.convs.len()
    }
}

/// Value of the control channel that stops readers; any other change asks them to flush.
pub const STOP: u64 = u64::MAX;

/// Plans of one sender, by phase.
pub type Plans = Arc<RwLock<Vec<Arc<SendPlan>>>>;

/// What a reader hands back at the end.
pub struct ReaderOut {
    /// Deliveries seen.
    pub tracker: Tracker,
    /// Messages this session sent that were acknowledged.
    pub acked: Vec<Acked>,
}

/// Called by a session's reader with each event that is not a message entry (receipts,
/// presence, typing; from the control stream or a datagram), the session's index and
/// the harness clock at arrival (ns). It runs on the reader's task: keep it short.
pub type EventHook = Arc<dyn Fn(usize, &Event, u64) + Send + Sync>;

/// A running harness session.
pub struct LoadSession {
    /// Control stream towards the broker (taken by a writer during a phase).
    pub send: Option<quinn::SendStream>,
    /// This session's plans.
    pub plans: Plans,
    /// Highest seq delivered to this session in any conversation (scenarios with one
    /// conversation read it as "the newest message this device holds").
    pub last_seq: Arc<AtomicU64>,
    reader: tokio::task::JoinHandle<ReaderOut>,
    datagrams: Option<tokio::task::JoinHandle<()>>,
    conn: quinn::Connection,
}

impl LoadSession {
    /// Starts the reader of session `index`; with a `hook`, also a reader of the
    /// connection's datagrams (where typing events may travel).
    pub fn start(
        index: usize,
        raw: RawSession,
        stats: Arc<Stats>,
        clock: Clock,
        stop: watch::Receiver<u64>,
        hook: Option<EventHook>,
    ) -> Self {
        let RawSession { conn, send, recv, decoder } = raw;
        let plans: Plans = Arc::default();
        let last_seq = Arc::new(AtomicU64::new(0));
        let datagrams =
            hook.clone().map(|hook| tokio::spawn(datagram_loop(index, conn.clone(), stats.clone(), clock, hook)));
        let reader = Reader { index, stats, clock, plans: plans.clone(), last_seq: last_seq.clone(), hook };
        let reader = tokio::spawn(read_loop(reader, recv, decoder, stop));
        LoadSession { send: Some(send), plans, last_seq, reader, datagrams, conn }
    }

    /// What this session's connection has carried so far (quinn's own counts).
    pub fn packets(&self) -> Packets {
        let s = self.conn.stats();
        Packets { to_client: s.udp_rx.datagrams, from_client: s.udp_tx.datagrams, client_acks: s.frame_tx.acks }
    }

    /// Waits for the reader to finish (after stop) and closes the connection.
    pub async fn finish(self) -> Result<ReaderOut> {
        let out = self.reader.await?;
        if let Some(d) = self.datagrams {
            d.abort();
        }
        self.conn.close(0u32.into(), b"done");
        Ok(out)
    }
}

/// Datagrams a harness connection carried, summed over sessions and subtracted between
/// two moments (`Packets::since`): the packet price of a message, which transfers
/// between machines where CPU time does not (docs/benchmarks.md, "Datagrams per
/// delivery").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packets {
    /// UDP datagrams the broker sent to harness devices.
    pub to_client: u64,
    /// UDP datagrams harness devices sent to the broker.
    pub from_client: u64,
    /// ACK frames harness devices sent (alone in a datagram or with other frames).
    pub client_acks: u64,
}

impl Packets {
    /// The sum over `sessions`.
    pub fn of(sessions: &[LoadSession]) -> Packets {
        sessions.iter().map(LoadSession::packets).fold(Packets::default(), |a, b| Packets {
            to_client: a.to_client + b.to_client,
            from_client: a.from_client + b.from_client,
            client_acks: a.client_acks + b.client_acks,
        })
    }

    /// What was carried between `earlier` and `self`.
    pub fn since(self, earlier: Packets) -> Packets {
        Packets {
            to_client: self.to_client.saturating_sub(earlier.to_client),
            from_client: self.from_client.saturating_sub(earlier.from_client),
            client_acks: self.client_acks.saturating_sub(earlier.client_acks),
        }
    }
}

/// What a reader needs besides its stream.
struct Reader {
    index: usize,
    stats: Arc<Stats>,
    clock: Clock,
    plans: Plans,
    last_seq: Arc<AtomicU64>,
    hook: Option<EventHook>,
}

/// Reads datagrams until the connection closes: each is one whole frame, length prefix
/// included (docs/PROTOCOL.md section 11).
async fn datagram_loop(index: usize, conn: quinn::Connection, stats: Arc<Stats>, clock: Clock, hook: EventHook) {
    while let Ok(datagram) = conn.read_datagram().await {
        let now = clock.now_ns();
        let mut decoder = FrameDecoder::new(switchboard_protocol::limits::MAX_DATAGRAM_BYTES);
        decoder.push(&datagram);
        match decoder.next_frame().map(|body| body.map(|b| decode::<ServerFrame>(&b))) {
            Ok(Some(Ok(ServerFrame::Event(event)))) => hook(index, &event, now),
            _ => {
                tracing::warn!(len = datagram.len(), "undecodable datagram");
                stats.errors_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

async fn read_loop(
    reader: Reader,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    mut stop: watch::Receiver<u64>,
) -> ReaderOut {
    let Reader { index, stats, clock, plans, last_seq, hook } = reader;
    let mut out = ReaderOut { tracker: Tracker::default(), acked: Vec::new() };
    let mut deliveries: Vec<(u64, u64)> = Vec::with_capacity(BATCH);
    let mut acks: Vec<u64> = Vec::with_capacity(BATCH);
    // Batches are handed over when full or, after a read, when older than this; no
    // per-reader timer (10,000 readers ticking would cost the harness more than the reads).
    const FLUSH_NS: u64 = 100_000_000;
    let mut flushed_ns = clock.now_ns();
    loop {
        while let Ok(Some(body)) = decoder.next_frame() {
            let now = clock.now_ns();
            match decode::<ServerFrame>(&body) {
                Ok(ServerFrame::Event(Event::Entry(e))) => {
                    if let Body::Text { text, .. } = &e.body
                        && let Some(sched) = payload::sched_ns(text)
                    {
                        deliveries.push((sched, now.saturating_sub(sched) / 1000));
                        out.tracker.observe(e.conv, e.seq);
                        last_seq.fetch_max(e.seq, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Ok(ServerFrame::Event(event)) => {
                    if let Some(hook) = &hook {
                        hook(index, &event, now);
                    }
                }
                Ok(ServerFrame::Response { id, result: Ok(Reply::Appended { seq, .. }) }) => {
                    let plan =
                        plans.read().unwrap_or_else(|p| p.into_inner()).get((id >> PHASE_SHIFT) as usize).cloned();
                    if let Some(plan) = plan {
                        let i = id & ((1 << PHASE_SHIFT) - 1);
                        acks.push(now.saturating_sub(plan.sched_ns(i)) / 1000);
                        out.acked.push(Acked { conv: plan.conv(i), seq, sender: index });
                    }
                }
                // Past saturation the broker sheds sends with `OVERLOADED`: counted as
                // refused (the report's figure for shed load), not as a failure; the
                // harness does not retry them, so the offered load stays the schedule's.
                Ok(ServerFrame::Response { result: Err(e), .. }) if e.code == ErrorCode::OVERLOADED => {
                    stats.refused_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // A broker not started by the harness limits each user's writes (the
                // harness's own broker does not): a failure, and the setting to change.
                Ok(ServerFrame::Response { result: Err(e), .. }) if e.code == ErrorCode::RATE_LIMITED => {
                    tracing::warn!(
                        error = %e,
                        "request failed: the broker limits each user's writes; give a broker load-tested with \
                         --target writes_per_sec = 0 (README, \"Load testing\")"
                    );
                    stats.errors_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(ServerFrame::Response { result: Err(e), .. }) => {
                    tracing::warn!(error = %e, "request failed");
                    stats.errors_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable frame");
                    stats.errors_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if deliveries.len() >= BATCH || acks.len() >= BATCH || now.saturating_sub(flushed_ns) > FLUSH_NS {
                stats.deliveries(&mut deliveries);
                stats.acks(&mut acks);
                flushed_ns = now;
            }
        }
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => match chunk {
                Ok(Some(c)) => decoder.push(&c.bytes),
                Ok(None) => {
                    stats.connection_lost(clock.now_ns(), "the broker finished the stream");
                    break;
                }
                Err(e) => {
                    stats.connection_lost(clock.now_ns(), &e.to_string());
                    break;
                }
            },
            changed = stop.changed() => {
                // A change asks for a flush (drain polls totals); `STOP` ends the reader.
                stats.deliveries(&mut deliveries);
                stats.acks(&mut acks);
                if changed.is_err() || *stop.borrow_and_update() == STOP {
                    break;
                }
            }
        }
    }
    stats.deliveries(&mut deliveries);
    stats.acks(&mut acks);
    out
}

/// Writes one phase of a plan on an open-loop schedule; returns the stream for the next.
pub async fn write_phase(
    mut send: quinn::SendStream,
    plan: Arc<SendPlan>,
    phase: u32,
    sender_index: usize,
    stats: Arc<Stats>,
    clock: Clock,
) -> quinn::SendStream {
    let mut text = String::with_capacity(plan.size);
    let mut frames: Vec<bytes::Bytes> = Vec::with_capacity(16);
    // The message each of `frames` carries.
    let mut batch: Vec<u32> = Vec::with_capacity(16);
    let mut i = 0u32;
    // Sends this far behind their schedule are given up (offered, never sent): a rate
    // far past what the machine carries had a 2 s run send for minutes while the data
    // dir grew by gigabytes (a load tester's trial).
    let span = plan.sched_ns(plan.count).saturating_sub(plan.start_ns);
    let give_up_ns = plan.sched_ns(plan.count) + span.max(LATE_SENDS_GIVEN_UP_NS);
    while i < plan.count {
        if clock.now_ns() > give_up_ns {
            tracing::warn!(
                sender = sender_index,
                unsent = plan.count - i,
                "the harness fell too far behind its schedule: the rest of this sender's messages are not sent"
            );
            // Tallied a slice at a time, yielding between: up to 2^24 of them.
            for from in (i..plan.count).step_by(1 << 16) {
                count_sends(&stats, &plan, &[], 0, from..plan.count.min(from.saturating_add(1 << 16)));
                tokio::task::yield_now().await;
            }
            break;
        }
        let due = plan.sched_ns(i);
        if clock.now_ns() < due {
            tokio::time::sleep_until(clock.instant(due)).await;
        }
        // Everything due by now goes out in one write (behind schedule: all at once).
        let now = clock.now_ns();
        while i < plan.count && plan.sched_ns(i) <= now && frames.len() < 64 {
            let sched = plan.sched_ns(i);
            payload::fill(&mut text, sched, plan.size);
            // Never all zero (the broker refuses that key): the sender's index counts from 1.
            let mut client_id = [0u8; 16];
            client_id[..8].copy_from_slice(&(sender_index as u64 + 1).to_be_bytes());
            client_id[8..12].copy_from_slice(&phase.to_be_bytes());
            client_id[12..].copy_from_slice(&i.to_be_bytes());
            let body = RequestBody::Send { conv: plan.conv(i), client_id, text: text.clone() };
            let request = ClientFrame::Request(Request { id: (phase << PHASE_SHIFT) | i, body });
            match encode_frame(&request) {
                Ok(frame) => {
                    frames.push(frame);
                    batch.push(i);
                }
                Err(_) => stats.offer(sched, plan.recipients(i)),
            }
            i += 1;
        }
        // A broker that takes nothing (stopped, or stalled on its disk) blocks the write
        // on flow control, where the check above is never reached (a load tester's
        // trial): the write is given up at the same time, and the stream reset, since a
        // frame may be half written (the broker then closes the connection, which the
        // reader counts as lost).
        let written = match tokio::time::timeout_at(clock.instant(give_up_ns), send.write_all_chunks(&mut frames)).await
        {
            Ok(written) => written.map_err(|e| e.to_string()),
            Err(_) => {
                let _ = send.reset(quinn::VarInt::from_u32(0));
                Err(format!(
                    "the broker took none of it for {} s past the schedule",
                    give_up_ns.saturating_sub(plan.sched_ns(plan.count)) / 1_000_000_000
                ))
            }
        };
        // What was handed to QUIC counts as sent (quinn empties each frame it took);
        // once the stream failed (a lost connection, which the reader counts), the rest
        // of the batch and of the schedule are offered and never sent, so a ramp step's
        // p99 over its offered deliveries counts them as not made.
        let (taken, rest) = match written {
            Ok(()) => (batch.len(), i..i),
            Err(_) => (frames.iter().take_while(|f| f.is_empty()).count(), i..plan.count),
        };
        count_sends(&stats, &plan, &batch, taken, rest);
        if let Err(e) = written {
            tracing::warn!(error = %e, sender = sender_index, "a writer's stream failed: the rest of its schedule is not sent");
            break;
        }
        frames.clear();
        batch.clear();
    }
    send
}

/// How far past a phase's end (or its length, if longer) its sends are still made.
const LATE_SENDS_GIVEN_UP_NS: u64 = 10_000_000_000;

/// Counts the first `taken` messages of `batch` (indices in `plan`) as sent, and the
/// others and `rest` as offered and never sent.
fn count_sends(stats: &Stats, plan: &SendPlan, batch: &[u32], taken: usize, rest: std::ops::Range<u32>) {
    let (sent, unsent) = batch.split_at(taken.min(batch.len()));
    for &i in sent {
        stats.sent(plan.sched_ns(i), plan.recipients(i));
    }
    for i in unsent.iter().copied().chain(rest) {
        stats.offer(plan.sched_ns(i), plan.recipients(i));
    }
}

/// Request ids a scenario's own requests use alongside the message load: their top
/// byte is no phase's, so a reader never takes their answers for message acks.
pub const SIDE_REQUEST_IDS: u32 = 0xff << PHASE_SHIFT;

/// Writes one frame on a session's control stream (requests of a scenario's own next to
/// the message load). Counts a failure as an error of the run; false if it failed.
pub async fn write_frame(send: &mut quinn::SendStream, frame: &ClientFrame, stats: &Stats) -> bool {
    let written = match encode_frame(frame) {
        Ok(bytes) => send.write_all(&bytes).await.is_ok(),
        Err(_) => false,
    };
    if !written {
        stats.errors_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    written
}

/// Which sessions belong to which conversation (for the loss check).
pub type Membership = HashMap<ConvId, Vec<usize>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose stream failed counted the failed batch as sent and left the rest of
    /// its schedule out of the offered deliveries (a review): now what was written is
    /// sent, and the rest offered and never sent.
    #[test]
    fn a_failed_write_leaves_its_batch_and_the_rest_offered_and_unsent() {
        let second = 1_000_000_000;
        let stats = Stats::new(0, 10);
        let plan = SendPlan {
            convs: vec![1, 2],
            recipients: vec![3, 5],
            start_ns: second,
            interval_ns: second / 2,
            count: 6,
            size: 64,
        };
        count_sends(&stats, &plan, &[0, 1], 2, 2..2);
        // Of a batch of two, quinn took the first before the stream failed.
        count_sends(&stats, &plan, &[2, 3], 1, 4..plan.count);
        assert_eq!((stats.sent_in(1), stats.offered_in(1)), (2, 8));
        assert_eq!((stats.sent_in(2), stats.offered_in(2)), (1, 8));
        assert_eq!((stats.sent_in(3), stats.offered_in(3)), (0, 8));
        assert_eq!(stats.sent_total.load(std::sync::atomic::Ordering::Relaxed), 3);
    }
}
