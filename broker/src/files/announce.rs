//! Pushes a file's progress and final state (`Event::File`) to its audience: the
//! uploader's devices and the members of each conversation where a message carries the
//! file. The audience is read from the store (a seek per conversation, then its member
//! keys), which must not run on the runtime threads: one `sb-announce` thread reads it
//! and delivers, in the order the announcements were made, so a file's progress never
//! overtakes its final state. Progress is latest-wins while it waits: a file's new value
//! takes the place of its value still waiting, so one upload has one progress job
//! waiting at most, and beyond `QUEUED_PROGRESS` files' waiting it is dropped (a later
//! value, or the final state, says where the upload is); a final state of an
//! upload always waits its turn (there is one per upload that ends, and one per
//! thumbnail made). That a complete file is gone (withdrawn, or with the last message
//! carrying it) is dropped beyond `QUEUED_GONE` waiting: a forward's copy costs its
//! sender no upload, so forwarding and deleting could queue them faster than an upload
//! ends; a reader learns it from `FileInfo` all the same (those telling only an
//! uploader, from `DeleteFile` and the sweeper, beyond half of it, leaving room for the
//! conversations'). A `Complete` found gone from the store when its turn comes (a
//! thumbnail made as its file was withdrawn) is not delivered: the file's `Failed` is
//! queued only once its deletion is durable, so it comes after, and a device never sees
//! a gone file come back.
//!
//! Each announcement reads the members of the conversations carrying the file (the
//! first `ATTACHMENT_SCAN`, by id, where a message carrying it has been published:
//! `published_carriers`; members hear of a file only after the message that shows it
//! to them, and one published later finds the state in `FileInfo`, since a state is
//! durable before it is announced) until `AUDIENCE_READ` members are read, so a file
//! attached in a thousand groups costs bounded work per event; members of conversations
//! past that bound get no push (logged) and see the state in `FileInfo` or a download.
//! Progress to the conversations is charged to the uploader's allowance of member rows
//! (a row per carrier and per member read), and while that is down to half its burst
//! goes to the uploader's devices only (a final state always goes: one per upload that ends).
//! In a conversation of the uploader and one other user who is online, the two's block
//! keys are read too (and, if one blocks the other, the conversation's kind: a direct
//! conversation's other member is then told nothing); in any conversation, the users the
//! uploader blocks are told nothing (its block list read once per announcement).
//! Progress goes to each conversation's members as that conversation's (`conv: Some`),
//! waiting in latest-wins slots. A final state reaches each device once however many
//! conversations carry the file: the uploader's devices as `conv: None`, every other
//! member as the first conversation (by id) it shares with the file; it is a queued
//! frame, and one per conversation would let anyone who attaches uploads to many
//! groups fill their members' queues.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use switchboard_protocol::{
    ConvId, ConversationKind, Event, FileId, FileProgress, FileState, ServerFrame, UserId, encode_frame,
};

use crate::Shared;

/// Progress announcements waiting for the thread at once, over all uploads.
const QUEUED_PROGRESS: usize = 1024;
/// Announcements that a complete file is gone waiting for the thread at once.
const QUEUED_GONE: usize = 1024;
/// Conversation members one announcement reads before it stops looking at further
/// conversations (the conversation that passes it is read whole, so at most
/// `MAX_GROUP_MEMBERS` more): a file attached in many large groups costs bounded work
/// per event, progress or final.
const AUDIENCE_READ: usize = 4096;

/// Announces `state` of file `id` (of `size` bytes, uploaded by `uploader`) to its
/// audience, on the announcing thread. Returns at once.
pub(crate) fn announce(shared: &Arc<Shared>, id: &FileId, uploader: UserId, size: u64, state: FileState) {
    queue(Job { shared: shared.clone(), file: *id, uploader, size, state, convs: None, gone: false });
}

/// A conversation to tell that a file is gone, with the users to tell if not its
/// members when the announcement runs.
pub(crate) type GoneFrom = (ConvId, Option<Arc<[UserId]>>);

/// Announces that file `id` (of `size` bytes, uploaded by `uploader`) is gone
/// (`Failed` with `NOT_FOUND`) to the uploader's devices and the members of `convs`, the
/// conversations whose messages carried it before they let go of it (known to the
/// caller: the store no longer has them), so every reader's view of those messages can
/// mark the file gone. A conversation given with its audience tells exactly those users
/// (its members when its message was deleted: one who joined since never saw the file);
/// one given without is told its members when the announcement runs. Returns at once;
/// dropped past `QUEUED_GONE` waiting.
pub(crate) fn announce_gone(shared: &Arc<Shared>, id: &FileId, uploader: UserId, size: u64, convs: Vec<GoneFrom>) {
    let state = FileState::Failed { code: switchboard_protocol::ErrorCode::NOT_FOUND };
    queue(Job { shared: shared.clone(), file: *id, uploader, size, state, convs: Some(convs), gone: true });
}

/// Announces to the uploader's devices only that its file `id` (of `size` bytes) is
/// gone: one deleted at once by `DeleteFile`, or by the sweeper. Dropped once half of
/// `QUEUED_GONE` is waiting, so that a sweep of many files leaves room for the
/// conversations' announcements.
pub(crate) fn announce_gone_to_uploader(shared: &Arc<Shared>, id: &FileId, uploader: UserId, size: u64) {
    let state = FileState::Failed { code: switchboard_protocol::ErrorCode::NOT_FOUND };
    let job = Job { shared: shared.clone(), file: *id, uploader, size, state, convs: Some(Vec::new()), gone: true };
    queue_within(job, QUEUED_GONE / 2);
}

fn queue(job: Job) {
    queue_within(job, QUEUED_GONE);
}

/// Queues `job` (`Queue::push`) and wakes the thread.
fn queue_within(job: Job, gone_bound: usize) {
    let Some(announcer) = announcer() else {
        // No thread could be started: deliver here rather than not at all.
        return deliver(&job);
    };
    let queued = announcer.queue.lock().unwrap_or_else(|p| p.into_inner()).push(job, gone_bound);
    if queued {
        announcer.ready.notify_one();
    }
}

/// An announcement waiting for the thread; `S` is the broker it is of (a unit in tests).
struct Job<S = Arc<Shared>> {
    shared: S,
    file: FileId,
    uploader: UserId,
    size: u64,
    state: FileState,
    /// The conversations to tell, when the store's attachments no longer name them,
    /// each with the users to tell if not its members now.
    convs: Option<Vec<GoneFrom>>,
    /// Tells that a complete file is gone (counted in `Queue::gone`).
    gone: bool,
}

impl<S> Job<S> {
    fn is_progress(&self) -> bool {
        matches!(self.state, FileState::Uploading { .. })
    }
}

struct Queue<S = Arc<Shared>> {
    jobs: VecDeque<Job<S>>,
    /// Progress jobs among `jobs`.
    progress: usize,
    /// Jobs telling that a file is gone among `jobs`.
    gone: usize,
    /// Such jobs dropped past their bound, since the start.
    gone_dropped: u64,
}

impl<S> Default for Queue<S> {
    fn default() -> Self {
        Queue { jobs: VecDeque::new(), progress: 0, gone: 0, gone_dropped: 0 }
    }
}

impl<S> Queue<S> {
    /// Queues `job`; one telling a file is gone only while fewer than `gone_bound` such
    /// jobs wait (dropped, logged once per thousand, beyond). Progress of a file whose
    /// progress still waits takes that one's place (its new state, in the old one's turn,
    /// still before the file's final state, which comes after every progress of its
    /// upload): before, each value queued a job of its own, and a few uploads attached in
    /// many conversations and reporting fast held every other file's events behind up
    /// to `QUEUED_PROGRESS` of theirs, each reading the whole audience (an attacker
    /// review). Whether a job was added (the thread is to be woken).
    fn push(&mut self, job: Job<S>, gone_bound: usize) -> bool {
        if job.is_progress() {
            if let Some(waiting) = self.jobs.iter_mut().find(|w| w.is_progress() && w.file == job.file) {
                (waiting.state, waiting.size) = (job.state, job.size);
                return false;
            }
            if self.progress >= QUEUED_PROGRESS {
                return false;
            }
            self.progress += 1;
        }
        if job.gone {
            if self.gone >= gone_bound {
                self.gone_dropped += 1;
                if self.gone_dropped % 1000 == 1 {
                    tracing::warn!(
                        dropped = self.gone_dropped,
                        "file-gone announcements past their bound were dropped"
                    );
                }
                return false;
            }
            self.gone += 1;
        }
        self.jobs.push_back(job);
        true
    }
}

struct Announcer {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The announcing thread's queue, the thread started on first use.
fn announcer() -> Option<&'static Announcer> {
    static ANNOUNCER: OnceLock<Option<Announcer>> = OnceLock::new();
    ANNOUNCER
        .get_or_init(|| {
            let spawned = std::thread::Builder::new().name("sb-announce".into()).spawn(run);
            match spawned {
                Ok(_) => Some(Announcer { queue: Mutex::new(Queue::default()), ready: Condvar::new() }),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the file announcing thread");
                    None
                }
            }
        })
        .as_ref()
}

fn run() {
    // Waits until the spawner has set the queue up (it is set once this thread runs).
    let Some(announcer) = announcer() else { return };
    loop {
        let mut queue = announcer.queue.lock().unwrap_or_else(|p| p.into_inner());
        let job = loop {
            if let Some(job) = queue.jobs.pop_front() {
                break job;
            }
            queue = announcer.ready.wait(queue).unwrap_or_else(|p| p.into_inner());
        };
        if job.is_progress() {
            queue.progress -= 1;
        }
        if job.gone {
            queue.gone -= 1;
        }
        drop(queue);
        // A panicking delivery loses that event only, not the thread.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| deliver(&job))).is_err() {
            tracing::error!("announcing a file event panicked");
        }
    }
}

/// Pushes the job's state to the uploader's devices and to the members of the
/// conversations where a message carries the file, reading at most `AUDIENCE_READ`
/// members (plus one conversation's). A final state goes once to each user. Blocking
/// (store reads).
fn deliver(job: &Job) {
    if matches!(job.state, FileState::Complete { .. }) && !still_complete(&job.shared, &job.file) {
        // Deleted since this was queued (its thumbnail made as it was withdrawn): its
        // `Failed` is queued behind this, once the deletion is durable, or was
        // delivered already, and a device must not see it come back.
        return;
    }
    let progress = |conv| FileProgress { conv, file: job.file, size: job.size, state: job.state.clone() };
    push(&job.shared, &[job.uploader], progress(None));
    // Progress to the conversations is charged to the uploader's member rows, and goes
    // to its devices only while they are down to half their burst (so it seldom pushes
    // the uploader's own reads into refusal): before, it was free, and an uploader's
    // few uploads attached in a thousand conversations each had every value read a
    // thousand carriers and their members on this one thread (an attacker review).
    let charged = job.is_progress() && job.convs.is_none();
    if job.shared.health.is_failed() || (charged && job.shared.users.member_reads_below_half(job.uploader)) {
        return;
    }
    let rows = std::cell::Cell::new(0usize);
    let charge = || {
        if charged {
            job.shared.users.charge_member_reads(job.uploader, rows.get());
        }
    };
    let read = match &job.convs {
        Some(convs) => Ok(convs.iter().map(|(conv, _)| *conv).collect()),
        None => super::published_carriers(&job.shared, &job.file),
    };
    let convs: Vec<ConvId> = match read {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reading attachments failed; progress not pushed to conversations");
            return;
        }
    };
    rows.set(convs.len());
    if convs.is_empty() {
        return charge();
    }
    // Nothing of the uploader's reaches whom it blocks, in a group too (its file events
    // would tell when it is online, as its receipts would: PROTOCOL.md, "Blocking").
    // One prefix scan, empty for most; a failed read tells the conversations nothing.
    let blocked: HashSet<UserId> = match job
        .shared
        .store
        .blocked_users(job.uploader, switchboard_protocol::limits::MAX_BLOCKED as usize)
    {
        Ok(blocked) => blocked.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the uploader's blocks failed; progress not pushed to conversations");
            return charge();
        }
    };
    let given = |conv| job.convs.as_ref()?.iter().find(|(c, _)| *c == conv)?.1.clone();
    let members = |conv| {
        let mut users: Vec<UserId> = match given(conv) {
            Some(users) => users.to_vec(),
            None => {
                let members = job.shared.store.members(conv)?;
                rows.set(rows.get() + members.len());
                members.into_iter().map(|(u, _)| u).collect()
            }
        };
        users.retain(|u| !blocked.contains(u));
        // In a direct conversation between two users one of whom blocks the other, the
        // other is told nothing of the file (an upload's progress would tell when its
        // uploader is online, as receipts would: PROTOCOL.md, "Blocking"). A failed
        // read counts as blocked. The in-memory look first, as for typing: the block
        // keys are read only for another member online, the conversation's kind only
        // when one is set.
        let store = &job.shared.store;
        let other = match users[..] {
            [a, b] if a == job.uploader => Some(b),
            [a, b] if b == job.uploader => Some(a),
            _ => None,
        };
        if let Some(other) = other
            && job.shared.online.sessions(other).is_some()
            && !matches!(store.blocked_between(other, job.uploader), Ok(false))
            && store.conversation(conv)?.is_none_or(|c| c.kind == ConversationKind::Direct)
        {
            users.retain(|u| *u == job.uploader);
        }
        Ok::<_, switchboard_storage::StoreError>(users)
    };
    let (audience, unread) = audience(job.uploader, job.is_progress(), &convs, AUDIENCE_READ, members);
    charge();
    if unread > 0 {
        tracing::warn!(
            file = super::blobs::hex(&job.file),
            conversations = unread,
            "a file event's audience passed its bound; not pushed to the members of the remaining conversations"
        );
    }
    for (conv, users) in audience {
        push(&job.shared, &users, progress(Some(conv)));
    }
}

/// Whether file `id` is complete in the store (a read that fails counts as yes: the
/// announcement goes as it would have).
fn still_complete(shared: &Shared, id: &FileId) -> bool {
    match shared.store.file(id) {
        Ok(Some(record)) => record.is_complete(),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Who gets an announcement in each of `convs` (in order): their members, read with
/// `members` until `bound` members were read (the conversation that passes it is read
/// whole; the rest are not read at all: their number is returned). A final state (`progress` false) goes
/// to each user once: not to the `uploader` (reached as `conv: None`), and to every
/// other member as the first of `convs` it is in. Conversations left with nobody are
/// left out. A conversation whose members cannot be read is skipped (logged).
fn audience<E: std::fmt::Display>(
    uploader: UserId,
    progress: bool,
    convs: &[ConvId],
    bound: usize,
    mut members: impl FnMut(ConvId) -> Result<Vec<UserId>, E>,
) -> (Vec<(ConvId, Vec<UserId>)>, usize) {
    let mut reached = HashSet::from([uploader]);
    let mut read = 0usize;
    let mut out = Vec::new();
    for (i, &conv) in convs.iter().enumerate() {
        if read >= bound {
            return (out, convs.len() - i);
        }
        match members(conv) {
            Ok(members) => {
                read += members.len();
                let users: Vec<UserId> =
                    if progress { members } else { members.into_iter().filter(|u| reached.insert(*u)).collect() };
                if !users.is_empty() {
                    out.push((conv, users));
                }
            }
            Err(e) => tracing::warn!(conv, error = %e, "membership read failed; progress not pushed"),
        }
    }
    (out, 0)
}

/// Sends `progress` as `Event::File` to the online devices of `users`. Progress waits in
/// one latest-wins slot per (device, file, audience), so however many uploads progress,
/// a device that reads slowly is never disconnected for them; a final state (`Complete`,
/// `Failed`) is queued like any event and drops the file's progress still waiting before
/// it, whatever its audience.
fn push(shared: &Shared, users: &[UserId], progress: FileProgress) {
    let key = (progress.file, progress.conv);
    let last = !matches!(progress.state, FileState::Uploading { .. });
    match encode_frame(&ServerFrame::Event(Event::File(progress))) {
        Ok(frame) => {
            shared.online.deliver_latest(users, key, &frame, last);
        }
        Err(e) => tracing::error!(error = %e, "a file event did not encode"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Conversation `c` has members `c * 10_000 .. c * 10_000 + n` plus user 7 (the
    /// uploader) and user 8 (in every conversation).
    fn members_of(sizes: &[usize]) -> impl FnMut(u64) -> Result<Vec<UserId>, String> + '_ {
        move |conv| {
            let n = *sizes.get(conv as usize).ok_or("no such conversation")?;
            let mut users: Vec<UserId> = (0..n as u64).map(|i| conv * 10_000 + 100 + i).collect();
            users.extend([7, 8]);
            Ok(users)
        }
    }

    fn job(file: u8, state: FileState) -> Job<()> {
        Job { shared: (), file: [file; 16], uploader: 7, size: 100, state, convs: None, gone: false }
    }

    fn uploading(offset: u64) -> FileState {
        FileState::Uploading { offset }
    }

    /// A file's progress waits once: a newer value takes the waiting one's place (and
    /// turn), never behind its final state. Before, every value queued a job of its own,
    /// so one upload's values filled the queue ahead of every other file's events.
    #[test]
    fn a_files_progress_waits_once_the_latest_value_in_its_turn() {
        let mut queue: Queue<()> = Queue::default();
        assert!(queue.push(job(1, uploading(10)), QUEUED_GONE));
        assert!(queue.push(job(2, uploading(5)), QUEUED_GONE));
        for offset in 11..1000 {
            assert!(!queue.push(job(1, uploading(offset)), QUEUED_GONE), "the waiting job took it");
        }
        let final_state = FileState::Failed { code: switchboard_protocol::ErrorCode::HASH_MISMATCH };
        assert!(queue.push(job(1, final_state.clone()), QUEUED_GONE));
        let order: Vec<(u8, FileState)> = queue.jobs.iter().map(|j| (j.file[0], j.state.clone())).collect();
        assert_eq!(order, vec![(1, uploading(999)), (2, uploading(5)), (1, final_state)]);
        assert_eq!(queue.progress, 2);
        // Once taken, the next value queues again, behind what waits.
        let taken = queue.jobs.pop_front().unwrap();
        queue.progress -= 1;
        assert_eq!(taken.state, uploading(999));
        assert!(queue.push(job(1, uploading(1000)), QUEUED_GONE));
        assert_eq!(queue.jobs.back().map(|j| j.state.clone()), Some(uploading(1000)));
    }

    #[test]
    fn an_announcement_reads_members_until_its_bound_and_no_further() {
        let sizes = [3000, 3000, 3000, 3000];
        let mut asked = Vec::new();
        let mut members = members_of(&sizes);
        let (got, unread) = audience(7, true, &[0, 1, 2, 3], AUDIENCE_READ, |c| {
            asked.push(c);
            members(c)
        });
        // 3002 read after the first, 6004 after the second: past 4096, so no third.
        assert_eq!(asked, vec![0, 1], "conversations past the bound are not read at all");
        assert_eq!(unread, 2);
        assert_eq!(got.iter().map(|(c, u)| (*c, u.len())).collect::<Vec<_>>(), vec![(0, 3002), (1, 3002)]);
    }

    #[test]
    fn a_final_state_reaches_each_member_once_and_not_the_uploader_again() {
        let sizes = [2, 3, 0];
        let (got, _) = audience(7, false, &[0, 1, 2], AUDIENCE_READ, members_of(&sizes));
        assert_eq!(got, vec![(0, vec![100, 101, 8]), (1, vec![10_100, 10_101, 10_102])]);
        // Progress goes to every member of every conversation, as that conversation's.
        let (got, unread) = audience(7, true, &[0, 1, 2], AUDIENCE_READ, members_of(&sizes));
        assert_eq!(unread, 0);
        assert_eq!(got.iter().map(|(c, u)| (*c, u.len())).collect::<Vec<_>>(), vec![(0, 4), (1, 5), (2, 2)]);
        // A conversation whose members cannot be read is skipped; the rest still get it.
        let (got, _) = audience(7, true, &[9, 0], AUDIENCE_READ, members_of(&sizes));
        assert_eq!(got.iter().map(|(c, _)| *c).collect::<Vec<_>>(), vec![0]);
    }
}
