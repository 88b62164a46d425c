//! `UploadState`: every rule of one upload in progress, with no I/O, no clock and no
//! actor. The Upload actor feeds it stream opens, chunks (with whether each matched its
//! CRC-32, which the transfer stream checks as it reads the chunk), durability and
//! ticks, and performs the effects it returns in order: answer a stream, write and sync
//! a chunk, verify the whole file, push progress.
//!
//! The rules it keeps (PROTOCOL.md section 12):
//! - a stream is accepted only at the durable offset (`WRONG_OFFSET` otherwise, with it);
//! - the newest stream takes over: an older one still open gets `CONFLICT` and its
//!   chunks are ignored from then on;
//! - a chunk must start where the previous one ended, hold 1..=`chunk_max` bytes, stay
//!   within the size (`INVALID`) and match its checksum (`CHUNK_CORRUPT`); a refused
//!   chunk is not written, the stream is answered `Failed` with the durable offset and
//!   ends;
//! - one chunk is written at a time, and reported `Durable` only once the driver says
//!   it is (fdatasync, then the offset recorded in a group commit);
//! - once every byte is durable the whole file is verified; the upload then completes
//!   or fails, and takes no more input;
//! - progress goes out at most `FILE_PROGRESS_PER_SECOND` times a second, the latest
//!   state winning (a held-back one goes out on a later tick); the final state always
//!   goes out at once.

use switchboard_protocol::limits::FILE_PROGRESS_PER_SECOND;
use switchboard_protocol::{ErrorBody, ErrorCode, FileRef, FileState, TransferReply};

/// Identifies one transfer stream (unique in the broker).
pub type StreamId = u64;

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send `reply` on `stream`; after a `Failed` or `Complete` the stream ends.
    Reply {
        /// The stream.
        stream: StreamId,
        /// What to send.
        reply: TransferReply,
    },
    /// Write the chunk `offset .. offset + len` (the one just given) to the upload's
    /// file, make it durable, record the new offset, then call `durable`. No other input
    /// comes before that call.
    Write {
        /// Where the chunk starts.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Every byte is durable: check the whole file against its declared hash and call
    /// `verified`.
    Verify,
    /// Push this state of the upload to its audiences (uploader, conversations).
    Progress(FileState),
}

/// The rules of one upload in progress.
#[derive(Debug)]
pub struct UploadState {
    size: u64,
    chunk_max: u64,
    durable: u64,
    /// The stream that may send chunks now.
    stream: Option<StreamId>,
    /// A chunk is being written (between `Write` and `durable`).
    writing: bool,
    /// Completed or failed: no more input is taken.
    done: bool,
    throttle: Throttle,
}

impl UploadState {
    /// An upload of `size` bytes, durable up to `durable`, taking chunks of at most
    /// `chunk_max` bytes.
    pub fn new(size: u64, durable: u64, chunk_max: u32) -> Self {
        UploadState {
            size,
            chunk_max: u64::from(chunk_max),
            durable,
            stream: None,
            writing: false,
            done: false,
            throttle: Throttle::default(),
        }
    }

    /// Durable bytes.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Whether the upload completed or failed.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether no stream is open and nothing is being written: the actor may passivate.
    pub fn is_idle(&self) -> bool {
        self.stream.is_none() && !self.writing
    }

    /// A new upload stream asks to send from `offset`. It takes over from an older one.
    pub fn open(&mut self, stream: StreamId, offset: u64) -> Vec<Effect> {
        if self.done {
            return vec![failed(stream, ErrorCode::NOT_FOUND, "no such upload", 0)];
        }
        if offset != self.durable {
            return vec![failed(
                stream,
                ErrorCode::WRONG_OFFSET,
                &format!("the durable offset is {}", self.durable),
                self.durable,
            )];
        }
        let mut effects = Vec::new();
        if let Some(old) = self.stream.replace(stream) {
            effects.push(failed(old, ErrorCode::CONFLICT, "a newer stream took over this upload", self.durable));
        }
        effects.push(Effect::Reply { stream, reply: TransferReply::Accepted { offset } });
        effects
    }

    /// A stream ended (finished, reset or its connection closed).
    pub fn closed(&mut self, stream: StreamId) {
        if self.stream == Some(stream) {
            self.stream = None;
        }
    }

    /// A chunk `offset .. offset + len` arrived on `stream`; `matches` says whether its
    /// data matched its CRC-32.
    pub fn chunk(&mut self, stream: StreamId, offset: u64, len: u64, matches: bool) -> Vec<Effect> {
        if self.done || self.stream != Some(stream) || self.writing {
            // An older stream's chunk after a takeover (it was told), or anything after
            // the end: ignored.
            return Vec::new();
        }
        let refusal = if offset != self.durable {
            Some((ErrorCode::WRONG_OFFSET, format!("the durable offset is {}", self.durable)))
        } else if len == 0 || len > self.chunk_max || offset.saturating_add(len) > self.size {
            Some((ErrorCode::INVALID, format!("a chunk holds 1..={} bytes within the size", self.chunk_max)))
        } else if !matches {
            Some((ErrorCode::CHUNK_CORRUPT, "the chunk does not match its CRC-32".to_owned()))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            self.stream = None;
            return vec![failed(stream, code, &message, self.durable)];
        }
        self.writing = true;
        vec![Effect::Write { offset, len }]
    }

    /// The chunk written after the last `Write` is durable up to `offset`, at `now_ms`.
    pub fn written(&mut self, offset: u64, now_ms: u64) -> Vec<Effect> {
        self.writing = false;
        self.durable = offset;
        let mut effects = Vec::new();
        if let Some(stream) = self.stream {
            effects.push(Effect::Reply { stream, reply: TransferReply::Durable { offset } });
        }
        if offset >= self.size {
            effects.push(Effect::Verify);
        } else if let Some(state) = self.throttle.offer(FileState::Uploading { offset }, now_ms) {
            effects.push(Effect::Progress(state));
        }
        effects
    }

    /// The chunk being written could not be made durable (an I/O error): nothing past
    /// the durable offset counts, and the stream is told so and ends (the client
    /// resumes from the durable offset).
    pub fn write_failed(&mut self) -> Vec<Effect> {
        self.end_stream(ErrorCode::INTERNAL, "the chunk could not be stored")
    }

    /// The chunk being written found the disk full (`ENOSPC`): as `write_failed`, but
    /// the stream is told `STORAGE_FULL`, which a client does not retry at once. An
    /// upload's room on the disk lapses while it stands still (`upload_promise_secs`),
    /// so one resumed after a pause can meet a disk that filled meanwhile; the upload
    /// stays, to resume once there is room.
    pub fn disk_full(&mut self) -> Vec<Effect> {
        self.end_stream(ErrorCode::STORAGE_FULL, "the broker's disk is full: the upload is kept; resume it later")
    }

    /// The chunk being written is given up: the stream is told `code` with the durable
    /// offset and ends.
    fn end_stream(&mut self, code: ErrorCode, message: &str) -> Vec<Effect> {
        self.writing = false;
        self.stream.take().map(|stream| failed(stream, code, message, self.durable)).into_iter().collect()
    }

    /// The upload's stored bytes were found lost (its partial file gone) and it was
    /// rewound to offset 0 in the store: the stream is told to start over from 0 and
    /// ends, and the uploader's devices are told the upload is back at 0 at once (past
    /// the throttle: before, the stream was told the old offset, a wasted round trip,
    /// and other devices kept showing the lost progress).
    pub fn rewound(&mut self) -> Vec<Effect> {
        self.durable = 0;
        self.throttle.pending = None;
        let mut effects =
            self.end_stream(ErrorCode::INTERNAL, "the upload's bytes were lost; it starts over from offset 0");
        effects.push(Effect::Progress(FileState::Uploading { offset: 0 }));
        effects
    }

    /// The whole file was checked: `Ok` with the published file, or `Err` with why it
    /// failed (`HASH_MISMATCH`, `TYPE_MISMATCH`, a storage failure). Either way this
    /// state takes no more input; the final state goes out at once, except after an
    /// `INTERNAL` failure: that ends this actor, not the upload, which stays for the
    /// client to try again (a later actor finishes it), so it is not told as the file's
    /// end.
    pub fn finished(&mut self, result: Result<FileRef, ErrorBody>) -> Vec<Effect> {
        self.done = true;
        self.writing = false;
        self.throttle.pending = None;
        let stream = self.stream.take();
        let (reply, state) = match result {
            Ok(file) => (TransferReply::Complete(file), Some(FileState::Complete { thumbnail: None })),
            Err(error) => {
                let code = error.code;
                let state = (code != ErrorCode::INTERNAL).then_some(FileState::Failed { code });
                (TransferReply::Failed { error, offset: self.durable }, state)
            }
        };
        let mut effects: Vec<Effect> = stream.map(|stream| Effect::Reply { stream, reply }).into_iter().collect();
        effects.extend(state.map(Effect::Progress));
        effects
    }

    /// Time passed: a progress state held back by the throttle goes out once allowed.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        self.throttle.due(now_ms).map(Effect::Progress).into_iter().collect()
    }
}

fn failed(stream: StreamId, code: ErrorCode, message: &str, offset: u64) -> Effect {
    Effect::Reply { stream, reply: TransferReply::Failed { error: ErrorBody::new(code, message), offset } }
}

/// At most `FILE_PROGRESS_PER_SECOND` progress pushes a second; the latest held back.
#[derive(Debug, Default)]
struct Throttle {
    last_ms: Option<u64>,
    pending: Option<FileState>,
}

const PROGRESS_INTERVAL_MS: u64 = 1000 / FILE_PROGRESS_PER_SECOND as u64;

impl Throttle {
    /// A new state: to push now, or held back (replacing any held one).
    fn offer(&mut self, state: FileState, now_ms: u64) -> Option<FileState> {
        match self.last_ms {
            Some(last) if now_ms < last + PROGRESS_INTERVAL_MS => {
                self.pending = Some(state);
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                self.pending = None;
                Some(state)
            }
        }
    }

    /// The held-back state, if its time came.
    fn due(&mut self, now_ms: u64) -> Option<FileState> {
        let last = self.last_ms?;
        if now_ms < last + PROGRESS_INTERVAL_MS {
            return None;
        }
        let state = self.pending.take()?;
        self.last_ms = Some(now_ms);
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    //! A deterministic harness: the state driven with a virtual clock, chunk writes that
    //! become durable when the test says so, and streams that record what they were told.

    use super::*;

    const SIZE: u64 = 10;

    fn file() -> FileRef {
        FileRef { file: [1; 16], name: "f".into(), size: SIZE, content_type: "text/plain".into() }
    }

    fn code(e: &Effect) -> Option<(StreamId, ErrorCode, u64)> {
        match e {
            Effect::Reply { stream, reply: TransferReply::Failed { error, offset } } => {
                Some((*stream, error.code, *offset))
            }
            _ => None,
        }
    }

    #[test]
    fn a_stream_is_accepted_only_at_the_durable_offset() {
        let mut s = UploadState::new(SIZE, 4, 4);
        let e = s.open(1, 0);
        assert_eq!(code(&e[0]), Some((1, ErrorCode::WRONG_OFFSET, 4)));
        assert!(s.is_idle(), "a refused stream is not the upload's stream");
        assert_eq!(s.open(2, 4), vec![Effect::Reply { stream: 2, reply: TransferReply::Accepted { offset: 4 } }]);
    }

    #[test]
    fn the_newest_stream_takes_over_and_the_older_one_is_told_and_ignored() {
        let mut s = UploadState::new(SIZE, 0, 4);
        s.open(1, 0);
        let e = s.open(2, 0);
        assert_eq!(code(&e[0]), Some((1, ErrorCode::CONFLICT, 0)));
        assert!(s.chunk(1, 0, 4, true).is_empty(), "the older stream's chunks are ignored");
        assert_eq!(s.chunk(2, 0, 4, true), vec![Effect::Write { offset: 0, len: 4 }]);
        // The older stream closing later does not close the newer one.
        s.closed(1);
        let e = s.written(4, 0);
        assert_eq!(e[0], Effect::Reply { stream: 2, reply: TransferReply::Durable { offset: 4 } });
    }

    #[test]
    fn chunks_are_checked_for_place_size_and_hash_and_a_refused_one_ends_the_stream() {
        for (offset, len, matches, want) in [
            (1, 4, true, ErrorCode::WRONG_OFFSET),
            (0, 0, true, ErrorCode::INVALID),
            (0, 5, true, ErrorCode::INVALID),
            (0, 4, false, ErrorCode::CHUNK_CORRUPT),
        ] {
            let mut s = UploadState::new(SIZE, 0, 4);
            s.open(1, 0);
            let e = s.chunk(1, offset, len, matches);
            assert_eq!(code(&e[0]), Some((1, want, 0)), "{offset} {len} {matches}");
            assert_eq!(e.len(), 1, "nothing written");
            assert!(s.chunk(1, 0, 4, true).is_empty(), "the stream ended");
            assert_eq!(s.durable(), 0);
            // The client resumes on a new stream from the durable offset.
            s.open(2, 0);
            assert_eq!(s.chunk(2, 0, 4, true), vec![Effect::Write { offset: 0, len: 4 }]);
        }
        // Past the declared size.
        let mut s = UploadState::new(SIZE, 8, 4);
        s.open(1, 8);
        assert_eq!(code(&s.chunk(1, 8, 3, true)[0]), Some((1, ErrorCode::INVALID, 8)));
    }

    #[test]
    fn durable_is_reported_after_the_write_and_the_last_byte_starts_verification() {
        let mut s = UploadState::new(SIZE, 0, 4);
        s.open(1, 0);
        let mut clock = 0;
        let mut offset = 0;
        while offset < SIZE {
            let len = (SIZE - offset).min(4);
            assert_eq!(s.chunk(1, offset, len, true), vec![Effect::Write { offset, len }]);
            assert!(s.chunk(1, offset + len, 1, true).is_empty(), "one write at a time");
            offset += len;
            clock += 1000;
            let e = s.written(offset, clock);
            assert_eq!(e[0], Effect::Reply { stream: 1, reply: TransferReply::Durable { offset } });
            if offset == SIZE {
                assert_eq!(e[1], Effect::Verify);
            } else {
                assert_eq!(e[1], Effect::Progress(FileState::Uploading { offset }));
            }
        }
        let e = s.finished(Ok(file()));
        assert_eq!(e[0], Effect::Reply { stream: 1, reply: TransferReply::Complete(file()) });
        assert_eq!(e[1], Effect::Progress(FileState::Complete { thumbnail: None }));
        assert!(s.is_done() && s.is_idle());
        assert_eq!(code(&s.open(2, SIZE)[0]).map(|c| c.1), Some(ErrorCode::NOT_FOUND));
    }

    #[test]
    fn lost_bytes_send_the_stream_and_the_devices_back_to_offset_zero() {
        let mut s = UploadState::new(SIZE, 0, 4);
        s.open(1, 0);
        s.chunk(1, 0, 4, true);
        s.written(4, 0);
        s.chunk(1, 4, 4, true);
        // Within the throttle's interval of the last push: the rewind goes out anyway.
        let e = s.rewound();
        assert_eq!(code(&e[0]), Some((1, ErrorCode::INTERNAL, 0)));
        assert_eq!(e[1], Effect::Progress(FileState::Uploading { offset: 0 }));
        assert_eq!(s.durable(), 0);
        assert_eq!(code(&s.open(2, 4)[0]), Some((2, ErrorCode::WRONG_OFFSET, 0)));
    }

    #[test]
    fn a_hash_mismatch_fails_the_upload_with_its_code_and_final_state() {
        let mut s = UploadState::new(4, 0, 4);
        s.open(1, 0);
        s.chunk(1, 0, 4, true);
        assert_eq!(s.written(4, 0).last(), Some(&Effect::Verify));
        let e = s.finished(Err(ErrorBody::new(ErrorCode::HASH_MISMATCH, "no")));
        assert_eq!(code(&e[0]), Some((1, ErrorCode::HASH_MISMATCH, 4)));
        assert_eq!(e[1], Effect::Progress(FileState::Failed { code: ErrorCode::HASH_MISMATCH }));
        assert!(s.chunk(1, 4, 1, true).is_empty());
    }

    #[test]
    fn an_internal_failure_answers_the_stream_but_is_not_told_as_the_files_end() {
        let mut s = UploadState::new(4, 0, 4);
        s.open(1, 0);
        s.chunk(1, 0, 4, true);
        assert_eq!(s.written(4, 0).last(), Some(&Effect::Verify));
        // Publishing failed: the upload stays, for a later actor to finish.
        let e = s.finished(Err(ErrorBody::new(ErrorCode::INTERNAL, "publishing failed")));
        assert_eq!(e.len(), 1, "no final state pushed: {e:?}");
        assert_eq!(code(&e[0]), Some((1, ErrorCode::INTERNAL, 4)));
        assert!(s.is_done());
    }

    #[test]
    fn progress_is_throttled_latest_wins_and_the_final_state_always_goes() {
        let mut s = UploadState::new(100, 0, 1);
        s.open(1, 0);
        let mut pushed = Vec::new();
        // 100 chunks over 1 s of virtual time: one every 10 ms.
        for i in 0..99u64 {
            s.chunk(1, i, 1, true);
            for e in s.written(i + 1, i * 10).into_iter().chain(s.tick(i * 10)) {
                if let Effect::Progress(state) = e {
                    pushed.push((i * 10, state));
                }
            }
        }
        assert!(pushed.len() <= 5, "at most 4 a second (plus the first): {pushed:?}");
        assert!(pushed.windows(2).all(|w| w[1].0 - w[0].0 >= PROGRESS_INTERVAL_MS));
        // The held-back latest state goes out on a later tick.
        let late = s.tick(10_000);
        assert_eq!(late, vec![Effect::Progress(FileState::Uploading { offset: 99 })]);
        assert!(s.tick(20_000).is_empty(), "sent once");
        // The final one at once, even right after another push.
        s.chunk(1, 99, 1, true);
        let e = s.written(100, 20_001);
        assert_eq!(e.last(), Some(&Effect::Verify));
        let e = s.finished(Ok(file()));
        assert!(e.contains(&Effect::Progress(FileState::Complete { thumbnail: None })));
    }

    #[test]
    fn a_failed_write_keeps_the_durable_offset_and_ends_the_stream() {
        let mut s = UploadState::new(SIZE, 4, 4);
        s.open(1, 4);
        s.chunk(1, 4, 4, true);
        assert_eq!(code(&s.write_failed()[0]), Some((1, ErrorCode::INTERNAL, 4)));
        assert!(s.is_idle());
        s.open(2, 4);
        assert_eq!(s.chunk(2, 4, 4, true), vec![Effect::Write { offset: 4, len: 4 }]);
    }

    #[test]
    fn a_chunk_the_full_disk_refused_says_storage_full_and_the_upload_resumes_later() {
        let mut s = UploadState::new(SIZE, 4, 4);
        s.open(1, 4);
        s.chunk(1, 4, 4, true);
        assert_eq!(code(&s.disk_full()[0]), Some((1, ErrorCode::STORAGE_FULL, 4)));
        assert!(s.is_idle());
        s.open(2, 4);
        assert_eq!(s.chunk(2, 4, 4, true), vec![Effect::Write { offset: 4, len: 4 }]);
    }

    #[test]
    fn a_resumed_upload_continues_from_its_durable_offset() {
        // A restart rebuilds the state from the recorded offset.
        let mut s = UploadState::new(SIZE, 6, 4);
        assert!(s.is_idle());
        s.open(9, 6);
        assert_eq!(s.chunk(9, 6, 4, true), vec![Effect::Write { offset: 6, len: 4 }]);
        assert_eq!(s.written(10, 0).last(), Some(&Effect::Verify));
    }
}
