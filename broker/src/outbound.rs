//! A device's outbound queue: frames encoded once (an event shared by every recipient
//! is one `Bytes`), bounded in count and bytes. A device that falls that far behind is
//! disconnected with `SLOW_CONSUMER` and catches up on reconnect; the broker's memory
//! never grows with a reader that stopped reading.
//!
//! Ephemeral state that a newer value replaces (file progress) does not queue: it sits
//! in one slot per key, the latest value winning, written after the queued frames, and
//! never counts towards `SLOW_CONSUMER`. At most `LATEST_SLOTS` keys wait at once; a new
//! key beyond is dropped (a later value, or the final state, says where it is).

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use switchboard_protocol::ErrorCode;
use tokio::sync::Notify;

/// Bounded queue between producers (actors) and one connection's writer task.
pub struct Outbound {
    queue: Mutex<Queue>,
    wake: Notify,
    /// Signalled when the queue is closed with an error: the writer may be blocked on
    /// a peer that does not read, and must abandon that write.
    abort: Notify,
    max_frames: usize,
    max_bytes: usize,
}

struct Queue {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// Set once: the writer closes the connection with this code after draining.
    closed: Option<ErrorCode>,
    /// Latest-wins ephemeral frames, one per key, not yet written.
    latest: Vec<(LatestKey, Bytes)>,
}

/// What a latest-wins frame replaces: a file's progress, to one audience (the uploader's
/// devices, `None`, or a conversation's members).
pub type LatestKey = (switchboard_protocol::FileId, Option<switchboard_protocol::ConvId>);

/// Latest-wins frames waiting at once per device (each a small progress frame).
pub const LATEST_SLOTS: usize = 64;

/// The frame was not queued: the queue is closed (now or before).
#[derive(Debug, PartialEq, Eq)]
pub struct Closed(pub ErrorCode);

impl Outbound {
    /// An empty queue with the given bounds.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Outbound {
            queue: Mutex::new(Queue { frames: VecDeque::new(), bytes: 0, closed: None, latest: Vec::new() }),
            wake: Notify::new(),
            abort: Notify::new(),
            max_frames,
            max_bytes,
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
        if q.frames.len() >= self.max_frames || q.bytes + frame.len() > self.max_bytes {
            q.closed = Some(ErrorCode::SLOW_CONSUMER);
            q.frames.clear();
            q.latest.clear();
            q.bytes = 0;
            drop(q);
            self.wake.notify_one();
            self.abort.notify_one();
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
    /// The first close wins.
    pub fn close(&self, code: ErrorCode) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.closed.is_none() {
            q.closed = Some(code);
        }
        drop(q);
        self.wake.notify_one();
        if code != ErrorCode::NO_ERROR {
            self.abort.notify_one();
        }
    }

    /// Resolves once the queue is closed with an error code (not `NO_ERROR`).
    pub async fn aborted(&self) -> ErrorCode {
        loop {
            let notified = self.abort.notified();
            if let Some(code) = self.closed().filter(|c| *c != ErrorCode::NO_ERROR) {
                return code;
            }
            notified.await;
        }
    }

    /// Whether the queue was closed, and why.
    pub fn closed(&self) -> Option<ErrorCode> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).closed
    }

    /// Frames queued now (latest-wins slots not counted).
    pub fn queued_frames(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).frames.len()
    }

    /// Waits for frames, moves all queued ones into `out` (then the latest-wins ones)
    /// and returns `None`; or, once closed and drained, returns the close code. Only the
    /// writer task calls this.
    pub async fn drain(&self, out: &mut Vec<Bytes>) -> Option<ErrorCode> {
        loop {
            let notified = self.wake.notified();
            {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if !q.frames.is_empty() || !q.latest.is_empty() {
                    out.extend(q.frames.drain(..));
                    out.extend(q.latest.drain(..).map(|(_, frame)| frame));
                    q.bytes = 0;
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
}
