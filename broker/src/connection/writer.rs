//! The writer: one task per connection drains the device's outbound queue onto the
//! control stream, several frames per write.

use std::sync::Arc;

use switchboard_protocol::ErrorCode;

use crate::outbound::Outbound;

/// Drains `out` onto `send` until the queue closes; a queue closed with an error code
/// (slow consumer, revoked, going away) closes the connection with that code, which is
/// returned.
pub(super) async fn write_loop(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    out: Arc<Outbound>,
) -> Option<ErrorCode> {
    // Grows to the largest burst drained at once; idle connections keep none.
    let mut batch = Vec::new();
    // The peer's `STOP_SENDING` on the control stream, seen while nothing is queued too:
    // before, only the next write noticed it, and requests read meanwhile were carried
    // out though their answers could never arrive (an attacker review; PROTOCOL.md,
    // section 1, "Ending").
    // Only a stop: a connection lost (timed out) ends `stopped` too, and closing it here
    // replaced its `TimedOut` with a local close before the session read it, so the
    // device's last seen became the time of the timeout (a review).
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let mut watching = true;
    loop {
        let drained = tokio::select! {
            biased;
            drained = out.drain(&mut batch) => drained,
            why = &mut stopped, if watching => {
                watching = false;
                if matches!(why, Ok(Some(_))) {
                    out.close(ErrorCode::NO_ERROR);
                    conn.close(ErrorCode::NO_ERROR.0.into(), b"control stream stopped");
                    return None;
                }
                continue;
            }
        };
        match drained {
            None => {
                tokio::select! {
                    written = send.write_all_chunks(&mut batch) => {
                        if written.is_err() {
                            // Nothing will drain the queue any more: closing it ends a
                            // wait for answer room (`reserve_answer`), tells producers
                            // and ends the session's read loop (`Session::ended`). The
                            // connection goes too: a peer that stopped reading the
                            // control stream (`STOP_SENDING`) while keeping the
                            // connection alive kept a session nothing could close, since
                            // a revocation closes sessions through this queue.
                            out.close(ErrorCode::NO_ERROR);
                            conn.close(ErrorCode::NO_ERROR.0.into(), b"control stream stopped");
                            return None;
                        }
                    }
                    // A peer that stopped reading blocks the write: do not wait for it.
                    code = out.aborted() => {
                        conn.close(code.0.into(), code.name().as_bytes());
                        return Some(code);
                    }
                }
                batch.clear();
                out.written();
            }
            Some(ErrorCode::NO_ERROR) => {
                let _ = send.finish();
                return None;
            }
            Some(code) => {
                conn.close(code.0.into(), code.name().as_bytes());
                return Some(code);
            }
        }
    }
}
