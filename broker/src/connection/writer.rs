//! The writer: one task per connection drains the device's outbound queue onto the
//! control stream, several frames per write.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_protocol::ErrorCode;

use crate::outbound::Outbound;

/// Drains `out` onto `send` until the queue closes; a queue closed with an error code
/// (slow consumer, revoked, going away) closes the connection with that code, which is
/// returned. A write of which the peer takes no byte for `stall` (`Config::write_stall`),
/// or less than `MIN_WRITE_BYTES_PER_SEC` on average past `stall` from its start
/// (`write_progressing`), closes the queue and the connection with `SLOW_CONSUMER`:
/// before, only a queue that overflowed did, and a client that asked for answers and
/// then read nothing (or a trickle) while it kept the connection alive (QUIC
/// keep-alives are acknowledged by its stack) held them, up to half of
/// `outbound_max_bytes` per connection, for good (attacker reviews).
pub(super) async fn write_loop(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    out: Arc<Outbound>,
    stall: Duration,
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
                    written = write_progressing(&mut send, &mut batch, stall) => {
                        if written == Err(Written::Stalled) {
                            out.close(ErrorCode::SLOW_CONSUMER);
                            let code = ErrorCode::SLOW_CONSUMER;
                            conn.close(code.0.into(), code.name().as_bytes());
                            return Some(code);
                        }
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

/// Why a write ended short.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// The stream or the connection failed.
    Lost,
    /// The peer took no byte for the stall time.
    Stalled,
}

/// Writes all of `bufs` onto `send`: `Stalled` when the peer took no byte for `stall`,
/// or when, `stall` after the write began, it has taken less than
/// `MIN_WRITE_BYTES_PER_SEC` for every second past that (a client reading a trickle, a
/// little every `stall`, kept its answers held as long as it liked: a review). A write
/// that finds room at once sets no timer (the select is biased, and its sleep is
/// polled only while the write waits).
async fn write_progressing(
    send: &mut quinn::SendStream,
    mut bufs: &mut [Bytes],
    stall: Duration,
) -> Result<(), Written> {
    let started = tokio::time::Instant::now();
    let mut taken = 0u64;
    while !bufs.is_empty() {
        let behind = started + stall + Duration::from_secs_f64(taken as f64 / MIN_WRITE_BYTES_PER_SEC as f64);
        let sleep = tokio::time::sleep_until((tokio::time::Instant::now() + stall).min(behind));
        tokio::select! {
            biased;
            written = send.write_chunks(bufs) => match written {
                Ok(written) => {
                    taken += written.bytes as u64;
                    bufs = &mut bufs[written.chunks..];
                }
                Err(_) => return Err(Written::Lost),
            },
            () = sleep => return Err(Written::Stalled),
        }
    }
    Ok(())
}

/// The least a client must take of what the broker writes to its control stream, on
/// average, once a write has waited `stall` (`write_progressing`): 8 KiB a second, a
/// 64 kbit/s link. A device slower than that while answers or events wait for it is
/// closed `SLOW_CONSUMER` and catches up when it reconnects.
pub(crate) const MIN_WRITE_BYTES_PER_SEC: u64 = 8 * 1024;
