//! Catalog requests: accounts' devices, creating and listing conversations (with unread
//! counts: `conversation_states`), settings. Catalog
//! writes take the store's catalog lock and a sled batch, so they run on one catalog
//! thread (`catalog_write`), never on a runtime thread.

use std::sync::Arc;

use switchboard_protocol::limits::{LIST_PAGE_MAX, MAX_BLOCKED, MAX_GROUP_MEMBERS, MAX_USERS_PER_REQUEST};
use switchboard_protocol::{
    BlockedUser, Body, ConvId, ConversationKind, ConversationState, ConversationSummary, DeviceId, DeviceInfo, Entry,
    ErrorBody, ErrorCode, NewConversation, Reply, Role, Settings, UserId,
};
use switchboard_storage::{BlockChange, ConversationRecord, Durable, Result as StoreResult, Store};

use crate::Shared;
use crate::auth::{check_label, check_user_name};
use crate::conversation::Caller;
use crate::limits;
use crate::reply::internal;
use crate::user::Closer;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs a catalog write on the catalog thread. A catalog write takes the store's
/// catalog lock and waits for the committer thread to apply its sled batch, so it must
/// not occupy a runtime thread; and catalog writes serialise on that lock anyway, so one
/// thread runs them all, in order. (On the blocking pool, a burst of registrations
/// spread sled's allocations over many threads' malloc arenas, and the broker kept
/// hundreds of MiB of freed memory after the burst.) At most `CATALOG_QUEUE` wait for
/// the thread; the rest wait here, without a thread or a queue slot.
pub(crate) async fn catalog_write<T: Send + 'static>(
    store: &Arc<Store>,
    write: impl FnOnce(&Store) -> T + Send + 'static,
) -> Result<T, switchboard_protocol::ErrorBody> {
    type Job = Box<dyn FnOnce() + Send>;
    static QUEUE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(limits::CATALOG_QUEUE);
    static THREAD: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> = std::sync::OnceLock::new();
    let _slot = QUEUE.acquire().await.map_err(internal)?;
    let thread = THREAD.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new().name("sb-catalog".into()).spawn(move || {
            for job in rx {
                // A panicking write answers its caller INTERNAL (its reply is dropped)
                // and must not take the thread, and every later write, down with it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    tracing::error!("a catalog write panicked");
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the catalog thread");
        }
        std::sync::Mutex::new(tx)
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let store = store.clone();
    let job: Job = Box::new(move || {
        let _ = done_tx.send(write(&store));
    });
    thread.lock().unwrap_or_else(|p| p.into_inner()).send(job).map_err(internal)?;
    done_rx.await.map_err(internal)
}

/// Resolves user names to ids; `NOT_FOUND` names the first unknown one (`no_user`).
pub(crate) fn resolve_users(shared: &Shared, names: &[String]) -> Result<Vec<UserId>, ErrorBody> {
    if names.len() > MAX_USERS_PER_REQUEST as usize {
        return Err(ErrorBody::new(ErrorCode::INVALID, "too many users in one request"));
    }
    names
        .iter()
        .map(|n| match check_user_name(n).map(|()| shared.store.user_by_name(n)) {
            Ok(Ok(Some((id, _)))) => Ok(id),
            Err(_) | Ok(Ok(None)) => Err(no_user(n)),
            Ok(Err(e)) => Err(internal(e)),
        })
        .collect()
}

/// `NOT_FOUND` for a user named `name`: the name said back only if it is a valid one (at
/// most 64 bytes). Any name was quoted back with `{:?}`, six bytes for each control
/// byte, so a 64 KiB name made a 390 KB answer where 1 KiB was reserved (an attacker
/// review); an invalid name is looked up no more.
pub(crate) fn no_user(name: &str) -> ErrorBody {
    match check_user_name(name) {
        Ok(()) => ErrorBody::new(ErrorCode::NOT_FOUND, format!("no user {name:?}")),
        Err(_) => ErrorBody::new(ErrorCode::NOT_FOUND, "no user: a name given is no user name (1-64 of a-z 0-9 _ . -)"),
    }
}

/// `FORBIDDEN` ("NAME `why`") if `blocker` blocks `user`.
pub(crate) fn refuse_if_blocked(shared: &Shared, blocker: UserId, user: UserId, why: &str) -> Result<(), ErrorBody> {
    if !shared.store.blocks(blocker, user).map_err(internal)? {
        return Ok(());
    }
    let name = shared.store.user(blocker).map_err(internal)?.map_or_else(|| blocker.to_string(), |u| u.name);
    Err(ErrorBody::new(ErrorCode::FORBIDDEN, format!("{name} {why}")))
}

/// `Block`: `caller` blocks the user named `name` (or stops). `NOT_FOUND` for no such
/// user, `INVALID` for oneself or past `MAX_BLOCKED`; nothing changes for `asker`, a
/// device cut off since it asked (`refusal_to`). Durable when answered; from then on
/// neither is in the other's presence contact set (`Presence::blocks_changed`).
pub(crate) async fn block(
    shared: &Shared,
    caller: UserId,
    asker: Asker,
    name: String,
    blocked: bool,
) -> Result<Reply, ErrorBody> {
    // Spent before the name is looked up, and kept for a name nobody has: a lookup free
    // for unknown names and limited for known ones told which names exist, at any rate
    // (an attacker review).
    shared.users.allow_creation(caller)?;
    let user = resolve_users(shared, std::slice::from_ref(&name))?[0];
    if user == caller {
        shared.users.refund_creation(caller);
        return Err(ErrorBody::new(ErrorCode::INVALID, "one cannot block oneself"));
    }
    // Stops pushed while the block is stored still reach both (`Typing::blocking`),
    // until `blocked` below has stopped what stands.
    let _in_progress = blocked.then(|| shared.typing.blocking(caller, user));
    let max = MAX_BLOCKED as usize;
    let changed = catalog_write(&shared.store, move |s| {
        unless_cut_off(s, caller, &asker, |s| s.set_block(caller, user, blocked, max))
    })
    .await?;
    let changed = match changed.map_err(internal)?? {
        BlockChange::Done(durable) => {
            durable.await.map_err(internal)?;
            true
        }
        BlockChange::Same(durable) => {
            durable.await.map_err(internal)?;
            false
        }
        BlockChange::Full => {
            return Err(ErrorBody::new(ErrorCode::INVALID, format!("at most {MAX_BLOCKED} blocked users")));
        }
    };
    shared.pauses.pass(crate::pauses::Point::BlockStored).await;
    // An unblock that changed nothing touches no contact set: one of someone never
    // blocked (anyone may name anyone) marked both sets short, spending the other's
    // whole reads (an attacker review). A block always takes each out of the other's
    // (nothing read): a second device's block of the same user is answered `Same`,
    // maybe before the first one's take-out.
    if changed || blocked {
        shared.presence.blocks_changed(caller, user, blocked);
    }
    if blocked {
        shared.typing.blocked(caller, user);
    }
    Ok(Reply::Done)
}

/// `BlockedUsers`: the users `caller` blocks, with their names.
pub(crate) fn blocked_users(shared: &Shared, caller: UserId) -> Result<Reply, ErrorBody> {
    let ids = shared.store.blocked_users(caller, MAX_BLOCKED as usize).map_err(internal)?;
    let mut out = Vec::with_capacity(ids.len());
    for user_id in ids {
        if let Some(record) = shared.store.user(user_id).map_err(internal)? {
            out.push(BlockedUser { user_id, name: record.name });
        }
    }
    Ok(Reply::BlockedUsers(out))
}

/// Creates a conversation. The store work (a catalog lock and a sled batch) runs on the
/// catalog thread, never on a runtime thread.
pub(crate) async fn create_conversation(
    shared: Arc<Shared>,
    caller: Caller,
    asker: Asker,
    new: NewConversation,
) -> Result<Reply, ErrorBody> {
    // A direct conversation that exists is answered from reads on the blocking pool, as
    // the catalog thread would find it, without a catalog job or a commit: opening one
    // spends no creation, and each was a free job and commit on the thread that serves
    // logins and revocations (an attacker review). Anything else (a name nobody has, a
    // block, no such conversation yet) goes the way of a creation.
    // Such reads spend the member rows a list of conversations does (a review: free,
    // one account's openings in a loop kept its store slots reading).
    if let NewConversation::Direct { peer } = &new {
        let (reader, peer) = (shared.clone(), peer.clone());
        shared.users.allow_member_reads(caller.user)?;
        let found = tokio::task::spawn_blocking(move || existing_direct(&reader, caller.user, &peer));
        let found = found.await.map_err(internal)??;
        shared.users.charge_member_reads(caller.user, limits::SUMMARY_ROWS);
        if let Some(conv) = found {
            let summary = durable_read(&shared, move |shared| summary(shared, caller.user, conv)).await?;
            return summary.map(Reply::Conversation).ok_or_else(|| internal("conversation vanished"));
        }
    }
    shared.users.allow_creation(caller.user)?;
    let writer = shared.clone();
    let written =
        catalog_write(&shared.store, move |s| match refusal_to(s, caller.user, &asker).map_err(internal)? {
            Some(refused) => Err(refused),
            None => write_conversation(&writer, caller, new),
        })
        .await;
    // Opening an existing direct conversation gives the allowance back; a refusal does
    // not. Not a name nobody has (`NOT_FOUND`): each name is a store read on the catalog
    // thread, and free unknown names made the request a free, unbounded way to learn
    // which names exist (an attacker review); nor any other refusal: 255 names read and
    // then one who blocks the caller (`FORBIDDEN`) cost the catalog thread about 770
    // reads, refunded, so one account pipelining them kept the thread that also serves
    // registrations, revocations and the operator's commands busy (another review).
    if matches!(&written, Ok(Ok((_, false, _)))) {
        shared.users.refund_creation(caller.user);
    }
    let (conv, created, durable) = written??;
    durable.await.map_err(internal)?;
    if created {
        // The conversation's first actor delivers seq 1, so no later entry can reach a
        // member before it.
        if let Err(e) = shared.convs.start_created(&shared, conv, caller.user).await {
            // The conversation exists and is durable: say so. Its first entry is
            // delivered by whichever actor of it starts next (the record stays).
            tracing::warn!(conv, code = %e.code, "the new conversation's actor did not start");
        }
    }
    let summary = durable_read(&shared, move |shared| summary(shared, caller.user, conv)).await?;
    summary.map(Reply::Conversation).ok_or_else(|| internal("conversation vanished"))
}

/// Runs a read of the catalog and membership indexes on the blocking pool (a page of
/// summaries reads many keys), then serves it only once all it saw is durable
/// (`Store::index_barrier`).
async fn durable_read<T: Send + 'static>(
    shared: &Arc<Shared>,
    read: impl FnOnce(&Shared) -> StoreResult<T> + Send + 'static,
) -> Result<T, ErrorBody> {
    read_then_wait(shared, read, Store::index_barrier).await
}

/// As `durable_read`, for a read that also sees receipt watermarks or settings
/// (`Store::watermark_barrier`).
async fn durable_watermark_read<T: Send + 'static>(
    shared: &Arc<Shared>,
    read: impl FnOnce(&Shared) -> StoreResult<T> + Send + 'static,
) -> Result<T, ErrorBody> {
    read_then_wait(shared, read, Store::watermark_barrier).await
}

async fn read_then_wait<T: Send + 'static>(
    shared: &Arc<Shared>,
    read: impl FnOnce(&Shared) -> StoreResult<T> + Send + 'static,
    barrier: fn(&Store) -> StoreResult<Option<Durable>>,
) -> Result<T, ErrorBody> {
    let reader = shared.clone();
    let value = tokio::task::spawn_blocking(move || read(&reader)).await.map_err(internal)?.map_err(internal)?;
    if let Some(barrier) = barrier(&shared.store).map_err(internal)? {
        barrier.await.map_err(internal)?;
    }
    Ok(value)
}

/// The direct conversation of `me` with the user named `peer`, if both exist, it exists,
/// and `peer` does not block `me` (else `None`, for the catalog thread to answer as it
/// does a creation).
fn existing_direct(shared: &Shared, me: UserId, peer: &str) -> Result<Option<ConvId>, ErrorBody> {
    if check_user_name(peer).is_err() {
        return Ok(None);
    }
    let Some((peer, _)) = shared.store.user_by_name(peer).map_err(internal)? else { return Ok(None) };
    if peer == me || shared.store.blocks(peer, me).map_err(internal)? {
        return Ok(None);
    }
    shared.store.direct_conversation(me, peer).map_err(internal)
}

/// Writes a new conversation; returns its id, whether it was created now (not an
/// existing direct pair), and the durability of the write.
fn write_conversation(
    shared: &Shared,
    caller: Caller,
    new: NewConversation,
) -> Result<(ConvId, bool, Durable), ErrorBody> {
    let me = caller.user;
    let (kind, title, members, pair) = match new {
        NewConversation::Direct { peer } => {
            let peer = resolve_users(shared, &[peer])?[0];
            if peer == me {
                return Err(ErrorBody::new(ErrorCode::INVALID, "a direct conversation needs another user"));
            }
            refuse_if_blocked(shared, peer, me, "does not accept conversations from you")?;
            (ConversationKind::Direct, String::new(), vec![(me, Role::Member), (peer, Role::Member)], Some((me, peer)))
        }
        NewConversation::Group { title, members } => {
            check_label(&title)?;
            let mut all = vec![(me, Role::Owner)];
            for id in resolve_users(shared, &members)? {
                refuse_if_blocked(shared, id, me, "does not accept being added by you")?;
                if !all.iter().any(|(u, _)| *u == id) {
                    all.push((id, Role::Member));
                }
            }
            if all.len() > MAX_GROUP_MEMBERS as usize {
                return Err(ErrorBody::new(ErrorCode::INVALID, "group member limit reached"));
            }
            (ConversationKind::Group, title, all, None)
        }
    };
    let record = ConversationRecord { kind, title: title.clone(), created_ms: crate::now_ms() };
    let (conv, created, durable) = shared
        .store
        .create_conversation(&record, &members, pair, |conv| {
            // Before the creation is visible: whichever actor of it starts first
            // delivers seq 1.
            shared.convs.created(conv, caller.session);
            Entry {
                conv,
                seq: 1,
                sender: me,
                sender_device: caller.device,
                client_id: [0; 16],
                at_ms: record.created_ms,
                body: Body::Created { kind, title, members: members.clone() },
            }
        })
        .map_err(internal)?;
    Ok((conv, created, durable))
}

/// `me`'s view of a conversation, or `None` if `me` is not a member. Read it through
/// `durable_read`: it reads catalog records and member keys.
fn summary(shared: &Shared, me: UserId, conv: ConvId) -> StoreResult<Option<ConversationSummary>> {
    let store = &shared.store;
    let Some(record) = store.conversation(conv)? else { return Ok(None) };
    let Some(my_role) = store.member(conv, me)? else { return Ok(None) };
    let title = match record.kind {
        ConversationKind::Group => record.title,
        ConversationKind::Direct => match store.members(conv)?.iter().find(|(u, _)| *u != me) {
            Some((peer, _)) => store.user(*peer)?.map(|u| u.name).unwrap_or_default(),
            None => String::new(),
        },
    };
    // A live actor may have applied entries that are not durable yet: show only what
    // devices could have been sent. The store is read first: an actor that registers and
    // appends after it is then seen by `published` (read the other way round, the store
    // could be read after such an append and show an entry not yet durable).
    let stored = store.last_seq(conv)?;
    Ok(Some(ConversationSummary {
        id: conv,
        kind: record.kind,
        title,
        last_seq: shared.convs.published(conv).unwrap_or(stored),
        member_count: store.member_count(conv)? as u32,
        my_role,
    }))
}

/// A page of `me`'s conversations, durable state only.
pub(crate) async fn list_conversations(
    shared: &Arc<Shared>,
    me: UserId,
    after: Option<ConvId>,
) -> Result<Reply, ErrorBody> {
    let page = LIST_PAGE_MAX as usize;
    durable_read(shared, move |shared| {
        let ids = shared.store.user_conversations(me, after, page + 1)?;
        let more = ids.len() > page;
        let mut items = Vec::with_capacity(ids.len().min(page));
        for conv in ids.into_iter().take(page) {
            if let Some(s) = summary(shared, me, conv)? {
                items.push(s);
            }
        }
        Ok(Reply::Conversations { items, more })
    })
    .await
}

/// A page of `me`'s conversations with unread counts and `me`'s watermarks, durable
/// state only: `last_seq` as in `summary`, and the watermarks read from the store. A
/// stored watermark may be a write whose commit has not finished; rather than ask each
/// conversation's actor (up to a page of actors woken, a message and an answer each),
/// the page waits for one group commit when any receipt, settings or index write may
/// not be durable yet (`durable_watermark_read`), which
/// costs at most one commit and never shows a value a crash could take back. The
/// unread count is read from the message-count index up to `last_seq`, whose keys are
/// written with each message before it is durable.
pub(crate) async fn conversation_states(
    shared: &Arc<Shared>,
    me: UserId,
    after: Option<ConvId>,
) -> Result<Reply, ErrorBody> {
    let page = LIST_PAGE_MAX as usize;
    durable_watermark_read(shared, move |shared| {
        let store = &shared.store;
        let ids = store.user_conversations(me, after, page + 1)?;
        let more = ids.len() > page;
        let mut items = Vec::with_capacity(ids.len().min(page));
        for conv in ids.into_iter().take(page) {
            let Some(summary) = summary(shared, me, conv)? else { continue };
            let last = summary.last_seq;
            let marks = store.receipt(conv, me)?.unwrap_or_default();
            // My own view: delivered never below read (a member who keeps reads private
            // has them stored apart: `ConversationState::own_receipt`).
            let read_up_to = marks.read_up_to.min(last);
            let delivered_up_to = marks.delivered_up_to.min(last).max(read_up_to);
            // A member added later counts only what came after the addition as unread.
            let joined = store.joined_at(me, conv)?.unwrap_or(0);
            let unread = store.unread(conv, me, read_up_to.max(joined), last)?;
            items.push(ConversationState { summary, unread, delivered_up_to, read_up_to });
        }
        Ok(Reply::ConversationStates { items, more })
    })
    .await
}

/// `user`'s settings, replaced first by `set` (answered once durable). The replacement
/// is written on the catalog thread, in order with revocations: nothing changes for
/// `asker`, a device cut off since it asked (`refusal_to`).
pub(crate) async fn settings(
    shared: &Arc<Shared>,
    user: UserId,
    asker: Asker,
    set: Option<Settings>,
) -> Result<Reply, ErrorBody> {
    if let Some(new) = set {
        shared.pauses.pass(crate::pauses::Point::Settings).await;
        // Settings as they stand are answered without a write, and a change spends one of
        // the user's creations (as a `Block` does): before, each was a write and a commit
        // on the catalog thread, free, so a few accounts resending their settings kept
        // the thread that serves logins and revocations busy (an attacker review).
        let (store, asked) = (shared.store.clone(), new.clone());
        let unchanged = tokio::task::spawn_blocking(move || store.settings(user).map(|now| now == asked));
        if !unchanged.await.map_err(internal)?.map_err(internal)? {
            shared.users.allow_creation(user).map_err(|refused| {
                ErrorBody::new(refused.code, "changing settings too fast; retry in a few seconds")
            })?;
            let written =
                catalog_write(&shared.store, move |s| unless_cut_off(s, user, &asker, |s| s.set_settings(user, &new)))
                    .await?;
            written.map_err(internal)??.await.map_err(internal)?;
        }
    }
    durable_watermark_read(shared, move |shared| shared.store.settings(user)).await.map(Reply::Settings)
}

pub(crate) fn list_devices(shared: &Shared, caller: Caller) -> Result<Reply, ErrorBody> {
    let devices = shared.store.devices(caller.user).map_err(internal)?;
    Ok(Reply::Devices(
        devices
            .into_iter()
            .map(|(id, d)| DeviceInfo {
                device_id: id,
                name: d.name,
                enrolled_ms: d.enrolled_ms,
                current: id == caller.device,
            })
            .collect(),
    ))
}

/// `ChangePassword`: the new password (`Auth::change_password`), and with
/// `sign_out_others` every device of the account but the caller's revoked in the same
/// write, their connections closed with `DEVICE_REVOKED` once it is durable (even if
/// the asking connection is gone by then: `to_the_end`). One write, so the change
/// cannot stop half-way with the password set and a device kept (before, the devices
/// were revoked one write each after it, and a stolen device revoked last could revoke
/// the asking one in between and stay); an enrollment with the old password cannot land
/// after it (`Auth::enroll` compares the hash in its write). `Done`.
pub(crate) async fn change_password(
    shared: &Shared,
    caller: Caller,
    asker: Asker,
    from: std::net::IpAddr,
    current: &str,
    new: &str,
    sign_out_others: bool,
) -> Result<Reply, ErrorBody> {
    let sign_out_others = sign_out_others.then(|| shared.users.closer());
    let revoked = shared.auth.change_password(caller.user, asker, from, current, new, sign_out_others).await?;
    for device in revoked {
        tracing::info!(user = caller.user, device, "device revoked by a password change");
    }
    Ok(Reply::Done)
}

/// Revokes `device` of `user`, durably, and closes its connections; `NOT_FOUND` if there
/// is no such device. `by`, the device asking (none for the operator), must not have
/// been cut off since it asked (`refusal_to`): a request in flight from a device
/// revoked or an account disabled meanwhile does nothing once that has been answered.
pub(crate) async fn revoke_device(
    shared: &Shared,
    user: UserId,
    device: DeviceId,
    by: Option<Asker>,
) -> Result<Reply, ErrorBody> {
    // A device that is not there is told from one store read, without the catalog
    // thread, whose one queue a loop of such revocations kept busy for free (an attacker
    // review). One there is removed under the catalog lock, which checks again. Either
    // way any session of a device not in the store is closed (a few map reads), whatever
    // left it open.
    let closer = shared.users.closer();
    let not_found = move |closer: &Closer| {
        closer.revoke(user, device);
        ErrorBody::new(ErrorCode::NOT_FOUND, "no such device")
    };
    if shared.store.device(user, device).map_err(internal)?.is_none() {
        return Err(not_found(&closer));
    }
    let store = shared.store.clone();
    // Said in the log: who revoked it (an operator's trial could not tell).
    let by_whom = by.as_ref().map_or_else(|| "the operator".to_owned(), |asker| format!("device {}", asker.device));
    to_the_end(async move {
        let durable = catalog_write(&store, move |s| match by {
            Some(by) => unless_cut_off(s, user, &by, |s| s.remove_device(user, device)),
            None => s.remove_device(user, device).map(Ok),
        })
        .await?
        .map_err(internal)??;
        let Some(durable) = durable else { return Err(not_found(&closer)) };
        durable.await.map_err(internal)?;
        tracing::info!(user, device, by = %by_whom, "device revoked");
        closer.revoke(user, device);
        Ok(Reply::Done)
    })
    .await
}

/// Runs `work` to its end in a task of its own, and waits for it. For a catalog write
/// and what must follow its durability (closing the sessions it cuts off): a caller
/// that stops waiting (an operator's command past its exchange timeout, a request
/// whose connection dropped, a login's handshake given up) drops only its wait, not the
/// work. Before, the write landed and the sessions stayed open, and a second revocation
/// found no device and closed nothing (an attacker review). The sessions are closed
/// once the write is durable, not before: their clients take `DEVICE_REVOKED` and
/// `ACCOUNT_DISABLED` as final, and a crash may undo a write that is not.
pub(crate) async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ErrorBody>> + Send + 'static,
) -> Result<T, ErrorBody> {
    tokio::spawn(work).await.map_err(internal)?
}

/// The device of a session asking for a catalog change, and whether that session has
/// been closed by a revocation or disable since (`Responder::revocation`).
#[derive(Clone)]
pub(crate) struct Asker {
    pub device: DeviceId,
    pub revocation: crate::reply::Revocation,
}

impl Asker {
    /// The device of `caller`, whose request `reply` answers.
    pub(crate) fn of(caller: Caller, reply: &crate::reply::Responder) -> Asker {
        Asker { device: caller.device, revocation: reply.revocation() }
    }
}

/// On the catalog thread, in order with revocations and disables: why a request of
/// `asker`, a device of `user`, admitted earlier must not be carried out now, if it
/// must not (`DEVICE_REVOKED`, `ACCOUNT_DISABLED`, each answered to the operator or
/// the user before this runs): its session was closed by one (so an account disabled
/// and enabled again meanwhile still refuses it), or, when its session has not been
/// closed yet, the device is gone or the account disabled.
pub(crate) fn refusal_to(s: &Store, user: UserId, asker: &Asker) -> StoreResult<Option<ErrorBody>> {
    let code = match asker.revocation.code() {
        Some(code) => code,
        None if s.device(user, asker.device)?.is_none() => ErrorCode::DEVICE_REVOKED,
        None if s.disabled(user)? => ErrorCode::ACCOUNT_DISABLED,
        None => return Ok(None),
    };
    Ok(Some(crate::reply::cut_off(code)))
}

/// On the catalog thread: `write`, unless `asker` was cut off since it asked
/// (`refusal_to`), in which case the refusal.
pub(crate) fn unless_cut_off<T>(
    s: &Store,
    user: UserId,
    asker: &Asker,
    write: impl FnOnce(&Store) -> StoreResult<T>,
) -> StoreResult<Result<T, ErrorBody>> {
    match refusal_to(s, user, asker)? {
        Some(refused) => Ok(Err(refused)),
        None => write(s).map(Ok),
    }
}
