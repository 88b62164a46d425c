//! A device's outbound queue: frames encoded once (an event shared by every recipient
//! is one `Bytes`), bounded in count and bytes. A device that falls that far behind is
//! disconnected with `SLOW_CONSUMER` and catches up on reconnect; the broker's memory
//! never grows with a reader that stopped reading. Answers count too, but a request
//! whose answer may be large (a page, a list) is taken only with room reserved for it
//! (`reserve_answer`, half the byte bound), so a client that reads is never cut off for
//! the answers to what it may have in flight.
//!
//! Ephemeral state that a newer value replaces (file progress) does not queue: it sits
//! in one slot per key, the latest value winning, written after the queued frames, and
//! never counts towards `SLOW_CONSUMER`. At most `LATEST_SLOTS` keys wait at once; a new
//! key beyond is dropped (a later value, or the final state, says where it is).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use switchboard_protocol::ErrorCode;
use tokio::sync::Notify;

/// Bounded queue between producers (actors) and one connection's writer task.
pub struct Outbound {
    queue: Mutex<Queue>,
    wake: Notify,
    /// Signalled when room for answers may have come (frames drained, a reservation
    /// given back, the queue closed), if a request waits for it (`Queue::room_wanted`).
    room: Notify,
    /// Signalled when the queue is closed with an error: the writer may be blocked on
    /// a peer that does not read, and must abandon that write.
    abort: Notify,
    max_frames: usize,
    max_bytes: usize,
    /// The device whose session this queue serves (`with_owner`): asked of the store
    /// once the queue is closed (`cut_off`).
    owner: Option<Owner>,
}

/// A session's device, for `Outbound::cut_off` to ask the store about.
struct Owner {
    store: Arc<switchboard_storage::Store>,
    user: switchboard_protocol::UserId,
    device: switchboard_protocol::DeviceId,
    /// The account's disables in this run, and when the session started.
    disables: Arc<crate::user::Disables>,
    started: std::time::Instant,
}

struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// Bytes the writer drained and has not finished handing to QUIC (`drain` to
    /// `written`): still held, so counted against both bounds with `bytes`.
    writing: usize,
    /// Set once: the writer closes the connection with this code after draining.
    closed: Option<ErrorCode>,
    /// `DEVICE_REVOKED` or `ACCOUNT_DISABLED` once a revocation closed the queue, even
    /// one closed before for another reason (its writer gone, a slow consumer): what
    /// the session carries out after that is refused (`Outbound::cut_off`).
    cut_off: Option<ErrorCode>,
    /// Latest-wins ephemeral frames, one per key, not yet written.
    latest: Vec<(LatestKey, Bytes)>,
    /// Bytes reserved for answers not yet queued (`reserve_answer`).
    reserved: usize,
    /// Answers reserved and not yet queued: one frame each.
    reserved_frames: usize,
    /// A request waits for answer room: the next drain or release signals `room`.
    room_wanted: bool,
}

/// What a latest-wins frame replaces: a file's progress, to one audience (the uploader's
/// devices, `None`, or a conversation's members).
pub type LatestKey = (switchboard_protocol::FileId, Option<switchboard_protocol::ConvId>);

/// Whether `code` closes a session because its device or account lost its right to act.
pub fn is_revocation(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::DEVICE_REVOKED | ErrorCode::ACCOUNT_DISABLED)
}

/// Latest-wins frames waiting at once per device (each a small progress frame).
pub const LATEST_SLOTS: usize = 64;

/// Room for one answer in a device's queue (`Outbound::reserve_answer`), given back
/// when dropped: once the answer is queued (where its bytes count instead), or unused.
pub struct AnswerRoom {
    out: Arc<Outbound>,
    bytes: usize,
}

impl Drop for AnswerRoom {
    fn drop(&mut self) {
        self.out.release(self.bytes);
    }
}

/// The frame was not queued: the queue is closed (now or before).
#[derive(Debug, PartialEq, Eq)]
pub struct Closed(pub ErrorCode);

impl Outbound {
    /// An empty queue with the given bounds.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Outbound {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                bytes: 0,
                writing: 0,
                closed: None,
                cut_off: None,
                latest: Vec::new(),
                reserved: 0,
                reserved_frames: 0,
                room_wanted: false,
            }),
            wake: Notify::new(),
            room: Notify::new(),
            abort: Notify::new(),
            max_frames,
            max_bytes,
            owner: None,
        }
    }

    /// Queues a frame. Over a bound, the queue closes with `SLOW_CONSUMER` and drops
    /// what it held: the device reconnects and catches up from the store.
    pub fn push(&self, frame: Bytes) -> Result<(), Closed> {
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.push_locked(q, frame)
    }

    /// Puts `frame` in the latest-wins slot of `key`, replacing the frame waiting there.
    /// Never closes the queue: with `LATEST_SLOTS` other keys waiting, the frame is
    /// dropped. Whether it was kept.
    pub fn push_latest(&self, key: LatestKey, frame: Bytes) -> Result<bool, Closed> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(code) = q.closed {
            return Err(Closed(code));
        }
        let was_empty = q.frames.is_empty() && q.latest.is_empty();
        if let Some(slot) = q.latest.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = frame;
            return Ok(true);
        }
        if q.latest.len() >= LATEST_SLOTS {
            return Ok(false);
        }
        q.latest.push((key, frame));
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        Ok(true)
    }

    /// Queues `frame`, the last of `file`'s latest-wins values (its final state): the
    /// values waiting in that file's slots, for every audience, are dropped, so no older
    /// progress of the file follows it. Queued like `push`, within the same bounds.
    pub fn push_last(&self, file: switchboard_protocol::FileId, frame: Bytes) -> Result<(), Closed> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.latest.retain(|((f, _), _)| *f != file);
        self.push_locked(q, frame)
    }

    fn push_locked(&self, mut q: std::sync::MutexGuard<'_, Queue>, frame: Bytes) -> Result<(), Closed> {
        if let Some(code) = q.closed {
            return Err(Closed(code));
        }
        if q.frames.len() >= self.max_frames || q.bytes + q.writing + frame.len() > self.max_bytes {
            q.closed = Some(ErrorCode::SLOW_CONSUMER);
            q.frames.clear();
            q.latest.clear();
            q.bytes = 0;
            drop(q);
            self.wake.notify_one();
            self.abort.notify_one();
            self.room.notify_waiters();
            return Err(Closed(ErrorCode::SLOW_CONSUMER));
        }
        q.bytes += frame.len();
        let was_empty = q.frames.is_empty() && q.latest.is_empty();
        q.frames.push_back(frame);
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Closes the queue: the writer sends what is queued, then closes with `code`.
    /// The first close wins, except that a revocation (`DEVICE_REVOKED`,
    /// `ACCOUNT_DISABLED`) is always kept for `cut_off`.
    pub fn close(&self, code: ErrorCode) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed.is_none() {
            q.closed = Some(code);
        }
        if q.cut_off.is_none() && is_revocation(code) {
            q.cut_off = Some(code);
        }
        drop(q);
        self.wake.notify_one();
        self.room.notify_waiters();
        if code != ErrorCode::NO_ERROR {
            self.abort.notify_one();
        }
    }

    /// Waits until the queue has room for an answer of up to `bytes` (at most
    /// `MAX_SERVER_FRAME_BYTES`) and reserves it: the frames waiting or being written,
    /// the answers reserved and this one together stay within half the byte bound (the
    /// other half is the events'). With nothing waiting, being written or reserved there
    /// is always room, so one such answer is always possible. The session takes a
    /// request whose answer may be large only with such a reservation, so answers to
    /// requests the protocol allows in flight (`MAX_INFLIGHT_REQUESTS`) can never make a
    /// reading client a slow consumer: past the room, the session stops reading requests
    /// (flow control) until the writer has written. `Err` once the queue is closed.
    pub async fn reserve_answer(self: &Arc<Self>, bytes: usize) -> Result<AnswerRoom, Closed> {
        loop {
            let notified = self.room.notified();
            if let Some(room) = self.try_reserve_answer(bytes)? {
                return Ok(room);
            }
            notified.await;
        }
    }

    /// `reserve_answer` without waiting: `Ok(None)` when there is no room now (a waiter
    /// is then signalled by the next drain or release). Every answer takes one frame of
    /// the half of the frame bound that answers may hold, whatever its bytes, so that
    /// small answers a client does not read (8,000 pipelined `Ping`s) fill no more than
    /// their half either: before, only answers that may be large reserved, and a client
    /// that stopped reading was cut off as a slow consumer by answers alone.
    pub fn try_reserve_answer(self: &Arc<Self>, bytes: usize) -> Result<Option<AnswerRoom>, Closed> {
        let bytes = bytes.min(switchboard_protocol::limits::MAX_SERVER_FRAME_BYTES as usize);
        let budget = (self.max_bytes / 2).max(bytes);
        let frame_budget = (self.max_frames / 2).max(1);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(code) = q.closed {
            return Err(Closed(code));
        }
        let frames_room = q.frames.len() + q.reserved_frames < frame_budget;
        if frames_room && q.bytes + q.writing + q.reserved + bytes <= budget {
            q.reserved += bytes;
            q.reserved_frames += 1;
            return Ok(Some(AnswerRoom { out: self.clone(), bytes }));
        }
        q.room_wanted = true;
        Ok(None)
    }

    fn release(&self, bytes: usize) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.reserved = q.reserved.saturating_sub(bytes);
        q.reserved_frames = q.reserved_frames.saturating_sub(1);
        let wanted = std::mem::take(&mut q.room_wanted);
        drop(q);
        if wanted {
            self.room.notify_waiters();
        }
    }

    /// Resolves once the queue is closed with an error code (not `NO_ERROR`), or a
    /// revocation came after it was closed `NO_ERROR`: the code to close the connection
    /// with. (Before, a session draining after a `NO_ERROR` end, its peer no longer
    /// reading, kept its connection, downloads and datagrams for the drain's 5 s after
    /// its device was revoked and the revocation answered.)
    pub async fn aborted(&self) -> ErrorCode {
        loop {
            let notified = self.abort.notified();
            {
                let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(code) = q.closed.filter(|c| *c != ErrorCode::NO_ERROR).or(q.cut_off) {
                    return code;
                }
            }
            notified.await;
        }
    }

    /// The frames of the last `drain` were handed to QUIC: their bytes no longer count.
    pub fn written(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.writing = 0;
        let wanted = std::mem::take(&mut q.room_wanted);
        drop(q);
        if wanted {
            self.room.notify_waiters();
        }
    }

    /// Whether the queue was closed, and why (the first close).
    pub fn closed(&self) -> Option<ErrorCode> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// `DEVICE_REVOKED` or `ACCOUNT_DISABLED` once a revocation closed the queue,
    /// whichever close came first (a queue its failed writer closed `NO_ERROR`, or a
    /// slow consumer's, is still cut off by a revocation after it). Once the queue is
    /// closed for another reason, a queue with an owner (`with_owner`) asks the store:
    /// a session that ended is no longer among those a revocation closes, so its
    /// requests still in flight (a write queued behind a busy actor, an upload chunk in
    /// its actor's mailbox) learn of a revocation answered after it ended from the
    /// device's record (gone) or the account's (disabled, now or since the session
    /// began: `UserDirectory::disable` remembers). One or two key reads, only for the
    /// requests of a session already closed.
    pub fn cut_off(&self) -> Option<ErrorCode> {
        let (cut_off, closed) = {
            let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            (q.cut_off, q.closed)
        };
        if cut_off.is_some() || closed.is_none() {
            return cut_off;
        }
        let Owner { store, user, device, disables, started } = self.owner.as_ref()?;
        let code = match store.device(*user, *device) {
            Ok(None) => Some(ErrorCode::DEVICE_REVOKED),
            // Disabled after the session began, even if enabled again since.
            Ok(Some(_)) if disables.disabled_since(*user, *started) => Some(ErrorCode::ACCOUNT_DISABLED),
            Ok(Some(_)) => crate::auth::refuse_if_disabled(store, *user).err().map(|e| e.code),
            // A store that cannot be read stops the broker (`Health`).
            Err(_) => None,
        };
        if let Some(code) = code {
            self.queue.lock().unwrap_or_else(|p| p.into_inner()).cut_off.get_or_insert(code);
        }
        code
    }

    /// This queue serves a session of `device` of `user` that `started` (its handshake's
    /// last check of the account): `cut_off` asks `store` about them once the queue is
    /// closed, and `disables` whether the account was disabled since the start.
    pub fn with_owner(
        mut self,
        store: Arc<switchboard_storage::Store>,
        user: switchboard_protocol::UserId,
        device: switchboard_protocol::DeviceId,
        disables: Arc<crate::user::Disables>,
        started: std::time::Instant,
    ) -> Self {
        self.owner = Some(Owner { store, user, device, disables, started });
        self
    }

    /// Frames queued now (latest-wins slots not counted).
    pub fn queued_frames(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).frames.len()
    }

    /// Waits for frames, moves all queued ones into `out` (then the latest-wins ones)
    /// and returns `None`; or, once closed and drained, returns the close code. Only the
    /// writer task calls this, and calls `written` once it has handed `out` to QUIC:
    /// until then the drained bytes still count against the bounds (before, they did not,
    /// so a peer that stopped reading held the queue's bound twice over: a bound's worth
    /// stuck in the writer and another queued behind it, on each of its connections).
    pub async fn drain(&self, out: &mut Vec<Bytes>) -> Option<ErrorCode> {
        loop {
            let notified = self.wake.notified();
            {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if !q.frames.is_empty() || !q.latest.is_empty() {
                    let latest: usize = q.latest.iter().map(|(_, frame)| frame.len()).sum();
                    out.extend(q.frames.drain(..));
                    out.extend(q.latest.drain(..).map(|(_, frame)| frame));
                    q.writing += std::mem::take(&mut q.bytes) + latest;
                    return None;
                }
                if let Some(code) = q.closed {
                    return Some(code);
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that stops reading holds at most the byte bound: what the writer took and
    /// cannot write counts with what is queued behind it (before, each was allowed the
    /// whole bound, on every connection of the peer).
    #[tokio::test]
    async fn bytes_stuck_in_the_writer_count_against_the_bound() {
        let out = Outbound::new(100, 8_000);
        out.push(Bytes::from(vec![0u8; 5_000])).unwrap();
        let mut got = Vec::new();
        assert_eq!(out.drain(&mut got).await, None);
        assert_eq!(out.push(Bytes::from(vec![0u8; 4_000])), Err(Closed(ErrorCode::SLOW_CONSUMER)));
        // Once written they no longer count.
        let out = Outbound::new(100, 8_000);
        out.push(Bytes::from(vec![0u8; 5_000])).unwrap();
        assert_eq!(out.drain(&mut got).await, None);
        out.written();
        assert_eq!(out.push(Bytes::from(vec![0u8; 4_000])), Ok(()));
    }

    #[tokio::test]
    async fn answer_room_waits_for_the_writer_and_ends_with_the_queue() {
        // Half of 8,000 bytes is for answers.
        let out = Arc::new(Outbound::new(100, 8_000));
        let first = out.reserve_answer(3_000).await.unwrap();
        out.push(Bytes::from(vec![0u8; 900])).unwrap();
        let reserve = |bytes| {
            let out = out.clone();
            tokio::spawn(async move { out.reserve_answer(bytes).await.map(drop) })
        };
        let waiting = reserve(200);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "3,000 reserved + 900 queued + 200 is past 4,000");
        let mut got = Vec::new();
        assert_eq!(out.drain(&mut got).await, None);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "the 900 bytes are in the writer, not yet written");
        out.written();
        assert_eq!(waiting.await.unwrap(), Ok(()), "the writer wrote the 900 bytes");
        drop(first);
        // Alone, an answer always has room, however large.
        let whole = out.reserve_answer(4_000).await.unwrap();
        let waiting = reserve(100);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(whole);
        assert_eq!(waiting.await.unwrap(), Ok(()), "a reservation given back makes room");
        let whole = out.reserve_answer(4_000).await.unwrap();
        let waiting = reserve(100);
        out.close(ErrorCode::DEVICE_REVOKED);
        assert_eq!(waiting.await.unwrap(), Err(Closed(ErrorCode::DEVICE_REVOKED)), "a closed queue ends the wait");
        drop(whole);
    }

    #[tokio::test]
    async fn overflow_closes_with_slow_consumer() {
        let out = Outbound::new(3, 1000);
        for _ in 0..3 {
            out.push(Bytes::from_static(b"abc")).unwrap();
        }
        assert_eq!(out.push(Bytes::from_static(b"abc")), Err(Closed(ErrorCode::SLOW_CONSUMER)));
        let mut got = Vec::new();
        assert_eq!(out.drain(&mut got).await, Some(ErrorCode::SLOW_CONSUMER));
        assert!(got.is_empty(), "a slow consumer's backlog is dropped, not sent");
    }

    #[tokio::test]
    async fn latest_wins_frames_coalesce_never_overflow_and_the_last_one_replaces_them() {
        let out = Outbound::new(2, 1000);
        let (a, b) = (([1; 16], None), ([2; 16], Some(7)));
        out.push(Bytes::from_static(b"m1")).unwrap();
        for i in 0..100u8 {
            assert_eq!(out.push_latest(a, Bytes::from(vec![b'a', i])), Ok(true));
            assert_eq!(out.push_latest(b, Bytes::from(vec![b'b', i])), Ok(true));
        }
        assert_eq!(out.closed(), None, "progress never makes a slow consumer");
        let mut got = Vec::new();
        assert_eq!(out.drain(&mut got).await, None);
        assert_eq!(got, vec![Bytes::from_static(b"m1"), Bytes::from(vec![b'a', 99]), Bytes::from(vec![b'b', 99])]);
        // The last value drops those waiting for its file, whatever their audience:
        // nothing older follows it.
        out.push_latest(a, Bytes::from_static(b"a-late")).unwrap();
        out.push_latest((a.0, Some(9)), Bytes::from_static(b"a-late-in-9")).unwrap();
        out.push_last(a.0, Bytes::from_static(b"a-done")).unwrap();
        got.clear();
        assert_eq!(out.drain(&mut got).await, None);
        assert_eq!(got, vec![Bytes::from_static(b"a-done")]);
        // Slots are bounded: a new key beyond them is dropped, known keys still update.
        for i in 0..LATEST_SLOTS as u8 {
            assert_eq!(out.push_latest(([i; 16], None), Bytes::from_static(b"p")), Ok(true));
        }
        assert_eq!(out.push_latest(([255; 16], None), Bytes::from_static(b"p")), Ok(false));
        assert_eq!(out.push_latest(([0; 16], None), Bytes::from_static(b"q")), Ok(true));
        got.clear();
        assert_eq!(out.drain(&mut got).await, None);
        assert_eq!(got.len(), LATEST_SLOTS);
    }

    #[tokio::test]
    async fn byte_bound_and_orderly_close() {
        let out = Outbound::new(100, 10);
        out.push(Bytes::from_static(b"12345")).unwrap();
        out.push(Bytes::from_static(b"12345")).unwrap();
        assert!(out.push(Bytes::from_static(b"1")).is_err());

        let out = Outbound::new(100, 100);
        out.push(Bytes::from_static(b"a")).unwrap();
        out.close(ErrorCode::GOING_AWAY);
        let mut got = Vec::new();
        assert_eq!(out.drain(&mut got).await, None);
        assert_eq!(got, vec![Bytes::from_static(b"a")]);
        assert_eq!(out.drain(&mut got).await, Some(ErrorCode::GOING_AWAY));
    }

    /// A revocation cuts a session off even when its queue was closed before for
    /// another reason (a slow consumer, or `NO_ERROR` by a writer whose peer stopped
    /// the control stream): before, the first close won, and the revoked device's
    /// requests in flight were carried out as its user.
    #[test]
    fn a_revocation_after_another_close_still_cuts_off() {
        for first in [ErrorCode::NO_ERROR, ErrorCode::SLOW_CONSUMER, ErrorCode::GOING_AWAY] {
            let out = Arc::new(Outbound::new(100, 100));
            let revocation = crate::reply::Revocation::of(out.clone());
            out.close(first);
            assert_eq!(revocation.refusal(), Ok(()), "closed {first} only");
            out.close(ErrorCode::DEVICE_REVOKED);
            assert_eq!(out.closed(), Some(first), "the first close is what the writer ends with");
            assert_eq!(out.cut_off(), Some(ErrorCode::DEVICE_REVOKED));
            assert_eq!(revocation.refusal().unwrap_err().code, ErrorCode::DEVICE_REVOKED);
            out.close(ErrorCode::ACCOUNT_DISABLED);
            assert_eq!(out.cut_off(), Some(ErrorCode::DEVICE_REVOKED), "the first revocation is kept");
        }
    }
}
