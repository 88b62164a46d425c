//! Answering a request: the responder travels with the request to whichever actor or
//! task handles it, and holds the session's in-flight permit until the answer is queued.
//! Every request gets exactly one answer: a responder dropped unanswered (its handler
//! failed or its actor crashed) answers `INTERNAL`, so no client waits forever.

use std::sync::Arc;

use switchboard_protocol::{ErrorBody, ErrorCode, Reply, ServerFrame, encode_frame};
use tokio::sync::OwnedSemaphorePermit;

pub use crate::error::internal;
use crate::outbound::{AnswerRoom, Outbound};
use crate::overload::SendTicket;

/// Sends exactly one response for one request.
pub struct Responder {
    id: u32,
    /// `None` once answered.
    out: Option<Arc<Outbound>>,
    _permit: OwnedSemaphorePermit,
    /// An admitted message write's place (`overload.rs`), freed with the answer.
    ticket: Option<SendTicket>,
    /// Told the answer once it is queued (`on_answer`).
    then: Option<AnswerHook>,
    /// Room reserved for a possibly large answer (`Outbound::reserve_answer`), given
    /// back once the answer is queued.
    room: Option<AnswerRoom>,
    /// One of the user's store slots (`UserDirectory::store_slots`), held until
    /// the answer is sent.
    _store_slot: Option<OwnedSemaphorePermit>,
}

/// Whether the session that sent a request was closed by a revocation or a disable
/// (`Responder::revocation`), checkable after its responder has moved on.
#[derive(Clone)]
pub struct Revocation(Option<Arc<Outbound>>);

impl Revocation {
    /// The code the session was closed with, `DEVICE_REVOKED` or `ACCOUNT_DISABLED`,
    /// once it was. A closure stays closed, so this holds after an account disabled
    /// meanwhile is enabled again.
    pub fn code(&self) -> Option<ErrorCode> {
        closed_by_revocation(self.0.as_deref())
    }

    /// `code` as the answer to a request not carried out because of it: `Err` with
    /// `DEVICE_REVOKED` or `ACCOUNT_DISABLED` once the session was closed by one. For
    /// work off the catalog thread, checked right before its write (the catalog
    /// thread's own writes use `catalog::refusal_to`, in order with the revocation).
    pub fn refusal(&self) -> Result<(), ErrorBody> {
        refusal(self.code())
    }

    /// Whether the session whose outbound queue is `out` was closed by a revocation.
    pub(crate) fn of(out: Arc<Outbound>) -> Revocation {
        Revocation(Some(out))
    }

    /// For work no session asked for (the operator's, a test's): never cut off.
    pub fn never() -> Revocation {
        Revocation(None)
    }
}

fn refusal(closed_by: Option<ErrorCode>) -> Result<(), ErrorBody> {
    closed_by.map_or(Ok(()), |code| Err(cut_off(code)))
}

/// The answer to a request not carried out because its device was revoked
/// (`DEVICE_REVOKED`) or its account disabled (`code`, `ACCOUNT_DISABLED`).
pub(crate) fn cut_off(code: ErrorCode) -> ErrorBody {
    let why = if code == ErrorCode::DEVICE_REVOKED { "this device was revoked" } else { "this account was disabled" };
    ErrorBody::new(code, why)
}

fn closed_by_revocation(out: Option<&Outbound>) -> Option<ErrorCode> {
    out.and_then(Outbound::cut_off)
}

/// What `Responder::on_answer` runs with the answer.
type AnswerHook = Box<dyn FnOnce(&Result<Reply, ErrorBody>) + Send>;

impl Responder {
    pub(crate) fn new(id: u32, out: Arc<Outbound>, permit: OwnedSemaphorePermit) -> Self {
        Responder { id, out: Some(out), _permit: permit, ticket: None, then: None, room: None, _store_slot: None }
    }

    /// Holds `slot`, one of the user's store slots, until the answer is sent.
    pub(crate) fn with_store_slot(mut self, slot: Option<OwnedSemaphorePermit>) -> Self {
        self._store_slot = slot;
        self
    }

    /// Holds `room` (reserved in the session's queue for this answer) until the answer
    /// is queued.
    pub(crate) fn with_room(mut self, room: Option<AnswerRoom>) -> Self {
        self.room = room;
        self
    }

    /// Runs `then` with the answer once it is queued, wherever it is given (or the
    /// `INTERNAL` of a responder dropped unanswered). It runs on the answering task: it
    /// must not block.
    pub(crate) fn on_answer(mut self, then: impl FnOnce(&Result<Reply, ErrorBody>) + Send + 'static) -> Self {
        self.then = Some(Box::new(then));
        self
    }

    /// Holds `ticket` until the answer is queued (or this responder is dropped).
    pub(crate) fn admitted(mut self, ticket: SendTicket) -> Self {
        self.ticket = Some(ticket);
        self
    }

    /// `Err` (`DEVICE_REVOKED` or `ACCOUNT_DISABLED`, the answer to give) once the
    /// session that sent the request was closed because its device was revoked or its
    /// account disabled: what it sent is not carried out any more.
    pub fn refusal(&self) -> Result<(), ErrorBody> {
        refusal(closed_by_revocation(self.out.as_deref()))
    }

    /// `refusal` as a check that outlives this responder, for work finished elsewhere
    /// (a catalog write, a file's store write).
    pub fn revocation(&self) -> Revocation {
        Revocation(self.out.clone())
    }

    /// Whether nobody can take the answer any more (the session's outbound queue is
    /// closed): a read for it is not worth doing.
    pub fn abandoned(&self) -> bool {
        self.out.as_ref().is_none_or(|out| out.closed().is_some())
    }

    /// Queues the response and releases the in-flight slot.
    pub fn send(mut self, result: Result<Reply, ErrorBody>) {
        self.answer(result);
    }

    /// Shorthand for an error response.
    pub fn fail(self, code: ErrorCode, message: impl Into<String>) {
        self.send(Err(ErrorBody::new(code, message)));
    }

    fn answer(&mut self, result: Result<Reply, ErrorBody>) {
        let Some(out) = self.out.take() else { return };
        // Answered: the write no longer waits, whatever the answer. Only a write newly
        // applied is timed: a refusal, or the answer to a resent client id, may never
        // have waited in the queue.
        if let Some(mut ticket) = self.ticket.take() {
            if waited_in_the_queue(&result) {
                ticket.applied();
            }
            drop(ticket);
        }
        let response = ServerFrame::Response { id: self.id, result };
        let frame = encode_frame(&response).or_else(|e| {
            tracing::error!(error = %e, "response did not encode");
            let err = Err(ErrorBody::new(ErrorCode::INTERNAL, "response did not encode"));
            encode_frame(&ServerFrame::Response { id: self.id, result: err })
        });
        if let Ok(frame) = frame {
            // A closed queue means the connection is going away; nothing else to do.
            let _ = out.push(frame);
        }
        // Queued, the answer's bytes count in the queue: its reservation goes.
        drop(self.room.take());
        if let (Some(then), ServerFrame::Response { result, .. }) = (self.then.take(), &response) {
            then(result);
        }
    }
}

/// Whether a message write answered `result` went through the commit queue, so its
/// admission-to-answer time is a sample of the queue's delay (`overload::SendRule`): only
/// a newly appended entry. A refusal (not a member, say) is judged on a cheap check (and
/// waits at most for the entries before it to be durable, not in the queue), and a
/// resent client id whose entry is already durable is answered at once; timing either
/// would let anyone keep the delay rule from ever starting by sending such writes.
fn waited_in_the_queue(result: &Result<Reply, ErrorBody>) -> bool {
    matches!(result, Ok(Reply::Appended { duplicate: false, .. }))
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.out.is_some() {
            tracing::warn!(id = self.id, "request dropped unanswered");
            self.answer(Err(ErrorBody::new(ErrorCode::INTERNAL, "request was not completed; retry")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_newly_appended_write_is_a_sample_of_the_queue() {
        assert!(waited_in_the_queue(&Ok(Reply::Appended { seq: 7, duplicate: false })));
        assert!(!waited_in_the_queue(&Ok(Reply::Appended { seq: 7, duplicate: true })), "a resent client id");
        assert!(!waited_in_the_queue(&Err(ErrorBody::new(ErrorCode::FORBIDDEN, "not a member"))));
        assert!(!waited_in_the_queue(&Ok(Reply::Pong { server_time_ms: 1 })), "not a write");
    }
}
