//! A device's outbound queue: frames encoded once (an event shared by every recipient
//! is one `Bytes`), bounded in count and bytes. A device that falls that far behind is
//! disconnected with `SLOW_CONSUMER` and catches up on reconnect; the broker's memory
//! never grows with a reader that stopped reading.

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
}

/// The frame was not queued: the queue is closed (now or before).
#[derive(Debug, PartialEq, Eq)]
pub struct Closed(pub ErrorCode);

impl Outbound {
    /// An empty queue with the given bounds.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Outbound {
            queue: Mutex::new(Queue { frames: VecDeque::new(), bytes: 0, closed: None }),
            wake: Notify::new(),
            abort: Notify::new(),
            max_frames,
            max_bytes,
        }
    }

    /// Queues a frame. Over a bound, the queue closes with `SLOW_CONSUMER` and drops
    /// what it held: the device reconnects and catches up from the store.
    pub fn push(&self, frame: Bytes) -> Result<(), Closed> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(code) = q.closed {
            return Err(Closed(code));
        }
        if q.frames.len() >= self.max_frames || q.bytes + frame.len() > self.max_bytes {
            q.closed = Some(ErrorCode::SLOW_CONSUMER);
            q.frames.clear();
            q.bytes = 0;
            drop(q);
            self.wake.notify_one();
            self.abort.notify_one();
            return Err(Closed(ErrorCode::SLOW_CONSUMER));
        }
        q.bytes += frame.len();
        let was_empty = q.frames.is_empty();
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

    /// Waits for frames, moves all queued ones into `out` and returns `None`; or, once
    /// closed and drained, returns the close code. Only the writer task calls this.
    pub async fn drain(&self, out: &mut Vec<Bytes>) -> Option<ErrorCode> {
        loop {
            let notified = self.wake.notified();
            {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if !q.frames.is_empty() {
                    out.extend(q.frames.drain(..));
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
