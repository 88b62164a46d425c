//! Points where a test can hold one request between the session's admission of it and
//! the last check before its write (`Pauses`). The checks that refuse a device revoked
//! meanwhile (`Revocation::refusal`, `catalog::refusal_to`) guard a window that timing
//! alone opens only now and then; a test arms the point, waits until a request is held
//! there, revokes the device, and lets the request go on, so the check either refuses it
//! or the test fails, every time. Nothing waits unless a test armed the point: a request
//! passing an unarmed point reads one atomic flag. A point must never sit where holding
//! a request would hold what a revocation needs: inside a `catalog_write` job (the
//! catalog thread) or under the store's files lock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

/// Where a request can be held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// A `Settings` change, before it is handed to the catalog thread.
    Settings,
    /// `BeginUpload`, on its blocking thread, before its revocation check.
    BeginUpload,
    /// `CancelUpload`, after reading the upload, before its revocation check.
    CancelUpload,
    /// `DeleteFile`, on its blocking thread, before its revocation check.
    DeleteFile,
    /// `WithdrawFile`, on its blocking thread, before its revocation check.
    WithdrawFile,
    /// A chunk in its upload's actor, before the actor's revocation check (the actor
    /// takes nothing else meanwhile).
    UploadChunk,
    /// A request that started its conversation's actor, after the start and before the
    /// request is cast to it (the actor ticks meanwhile).
    ConversationStarted,
    /// A `Presence` request, after its contacts were read and their barrier passed.
    PresenceQuery,
    /// An entry in its conversation's actor, just after it was sent to the members'
    /// online devices (the actor takes nothing else meanwhile).
    EntrySent,
    /// A `Block`, once stored and durable, before typing and presence are told of it.
    BlockStored,
    /// The typing pusher, after it took the changes waiting and before it read any
    /// conversation's members (on its blocking thread).
    TypingDrain,
    /// The typing pusher, after it read a start's audience (members, blocks) and before
    /// it takes the state's lock to send it.
    TypingAudience,
    /// The presence pusher, after it read the contacts a change goes to and before it
    /// sends it (on its blocking thread).
    PresencePush,
}

/// The armed points of one broker (`Shared::pauses`). For tests only: nothing else
/// arms a point.
#[derive(Default)]
pub struct Pauses {
    /// Whether any point is armed (the gates are not empty): all an unarmed pass reads.
    armed: AtomicBool,
    /// The armed points, in the order armed; each holds the first request to pass it.
    gates: Mutex<Vec<(Point, Gate)>>,
}

/// A test's hold on an armed point. Dropped without `release`, it lets the held request
/// go on; dropped before any request came, the point stays armed and lets the next one
/// through without holding it.
pub struct Held {
    reached: Option<oneshot::Receiver<()>>,
    release: oneshot::Sender<()>,
}

impl Pauses {
    /// For tests: the next request to pass `point` waits there until the returned hold
    /// is released or dropped. One request per arming.
    pub fn arm(&self, point: Point) -> Held {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.push((point, Gate { reached: reached_tx, release: release_rx }));
        self.armed.store(true, Ordering::Release);
        Held { reached: Some(reached_rx), release: release_tx }
    }

    /// Passes `point` on a task: held there while a test holds it.
    pub(crate) async fn pass(&self, point: Point) {
        if let Some(gate) = self.take(point) {
            let _ = gate.reached.send(());
            let _ = gate.release.await;
        }
    }

    /// Passes `point` on a blocking thread (never a runtime worker, where tokio's
    /// `blocking_recv` panics): held there while a test holds it.
    pub(crate) fn pass_blocking(&self, point: Point) {
        if let Some(gate) = self.take(point) {
            let _ = gate.reached.send(());
            let _ = gate.release.blocking_recv();
        }
    }

    fn take(&self, point: Point) -> Option<Gate> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let at = gates.iter().position(|(p, _)| *p == point)?;
        let (_, gate) = gates.remove(at);
        self.armed.store(!gates.is_empty(), Ordering::Release);
        Some(gate)
    }
}

impl Held {
    /// Waits until a request is held at the point (at once after the first time).
    /// Panics if the broker dropped the point unreached (it stopped).
    pub async fn reached(&mut self) {
        if let Some(reached) = self.reached.take() {
            reached.await.expect("the broker stopped before a request reached the point");
        }
    }

    /// Lets the held request go on.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

/// One armed point's two signals: to the test that a request is held, and to the
/// request that it may go on.
struct Gate {
    reached: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}
