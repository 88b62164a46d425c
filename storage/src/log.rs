//! The conversation log: entries by `(conversation, seq)`, what each entry implies for
//! other keys (idempotency key, rewritten edit and delete targets, the edit index,
//! member keys, the counts behind unread counts), and the crash repair of a
//! conversation's newest entry.

use switchboard_protocol::{Body, ClientMsgId, ConvId, Entry, Role, Seq, UserId};

use crate::keys::{self, Key};
use crate::{Result, Store, StoreError, corrupt, decode, encode};

impl Store {
    /// Repairs the newest entry of every conversation (`repair_newest_entry`), so that
    /// indexes read without a conversation actor (a user's conversation list, member
    /// lists) agree with the log. One reverse range read per conversation; call at start
    /// after an unclean stop. Returns the number of conversations checked.
    pub fn repair_all(&self) -> Result<usize> {
        let mut checked = 0;
        for item in self.db.scan_prefix(Key::conversations()) {
            let (k, _) = item?;
            let id = keys::u64_from(&k[1..]).ok_or_else(|| corrupt(&k, "conversation key"))?;
            self.repair_newest_entry(id)?;
            checked += 1;
        }
        Ok(checked)
    }

    /// Appends a conversation entry, then writes what it implies for other keys, and
    /// calls `done` from the committer thread once it is durable (or failed to become
    /// so). Calls happen in append order, so an actor that forwards them to itself
    /// receives them in order; `done` must be quick. What the entry implies is derived
    /// from it alone: its idempotency key `(sender, client_id)`, the rewritten target of
    /// an edit or delete, the member keys of a membership change, and a running count (the
    /// count before it plus one, so a repair writes the same): its sender's for a text
    /// message, the conversation's other entries' for any other entry.
    ///
    /// These are single-key writes, not a sled batch: sled 0.34's `apply_batch` takes a
    /// process-wide exclusive lock that waits for any flush in progress (stalling every
    /// thread that touches the store) and writes its log buffer twice. Single writes are
    /// safe because sled recovers a prefix of its log and the entry is written first:
    /// after a crash only a conversation's newest entry can lack some of its effects,
    /// and `repair_newest_entry` writes them again. The caller appends one entry at a time
    /// per conversation (the next append starts after this one returned).
    pub fn append_then(&self, entry: &Entry, done: impl FnOnce(Result<(), StoreError>) + Send + 'static) -> Result<()> {
        self.db.insert(Key::entry(entry.conv, entry.seq), encode(entry))?;
        self.write_effects(entry, false)?;
        self.committer.notify_grouped(Box::new(done))
    }

    /// Writes the keys `entry` implies (see `append_then`). With `repair`, each is read
    /// first and written only if it differs, and a repair is logged.
    pub(crate) fn write_effects(&self, entry: &Entry, repair: bool) -> Result<()> {
        let conv = entry.conv;
        let set = |key: Key, value: Option<Vec<u8>>| -> Result<()> {
            if repair {
                if self.db.get(&key)?.as_deref() == value.as_deref() {
                    return Ok(());
                }
                tracing::warn!(conv, seq = entry.seq, "restored a write of the newest entry lost in a crash");
            }
            match value {
                Some(v) => self.db.insert(key, v)?,
                None => self.db.remove(key)?,
            };
            Ok(())
        };
        let member = |user: UserId, role: Option<Role>| -> Result<()> {
            set(Key::member(conv, user), role.map(|r| encode(&r)))?;
            // The user's index entry holds the seq that made the user a member (unread
            // counts start there).
            set(Key::user_conv(user, conv), role.map(|_| entry.seq.to_be_bytes().to_vec()))
        };
        // The member count follows the member keys, counted again after they changed (a
        // repair counts again too).
        let recount = || -> Result<()> {
            set(Key::member_count(conv), Some((self.count_member_keys(conv)? as u64).to_be_bytes().to_vec()))
        };
        if entry.client_id != ClientMsgId::default() {
            set(Key::dedupe(conv, entry.sender, &entry.client_id), Some(entry.seq.to_be_bytes().to_vec()))?;
        }
        if !counts_as_message(&entry.body) {
            // Unread counts read the messages up to a seq as the seq less this count.
            let others = self.others_up_to(conv, entry.seq.saturating_sub(1))? + 1;
            set(Key::other_count(conv, entry.seq), Some(others.to_be_bytes().to_vec()))?;
        }
        let rewrite = |target: Seq, body: &dyn Fn(&Body) -> Body| -> Result<()> {
            let key = Key::entry(conv, target);
            let Some(mut stored) = self.entry(conv, target)? else {
                return Err(corrupt(key.as_ref(), "an edit or delete names a missing entry"));
            };
            stored.body = body(&stored.body);
            set(key, Some(encode(&stored)))
        };
        match &entry.body {
            Body::Edit { target, text } => {
                set(Key::edit_of(conv, *target, entry.seq), Some(Vec::new()))?;
                // An edit replaces the text (a files message's caption) and keeps the files.
                rewrite(*target, &|old| match old {
                    Body::Files { files, .. } => Body::Files { text: text.clone(), files: files.clone(), edited: true },
                    _ => Body::Text { text: text.clone(), edited: true },
                })
            }
            Body::Delete { target } => {
                // A deleted files message stops granting access to its files first: a
                // crash after the tombstone below then finds this done too.
                if let Some(Entry { body: Body::Files { files, .. }, .. }) = self.entry(conv, *target)? {
                    for f in &files {
                        set(Key::attached(&f.file, conv, *target), None)?;
                        // Its value is this delete's own, so a collection that read the
                        // mark before this leaves it (`collect_file`).
                        set(Key::file_unheld(&f.file), Some([conv.to_be_bytes(), entry.seq.to_be_bytes()].concat()))?;
                    }
                }
                // Every version of the text goes: the message's and each edit's.
                for edit in self.edits_of(conv, *target)? {
                    rewrite(edit, &|_| Body::Redacted { target: *target })?;
                }
                rewrite(*target, &|_| Body::Tombstone)
            }
            Body::MembersAdded { members } => self.index_write(|| {
                members.iter().try_for_each(|&(user, role)| member(user, Some(role)))?;
                recount()
            }),
            Body::MemberRemoved { user } => self.index_write(|| member(*user, None).and_then(|()| recount())),
            Body::MemberLeft => self.index_write(|| member(entry.sender, None).and_then(|()| recount())),
            // A role changes the member key only: the user's index keeps the seq that
            // made the user a member. Demotions first: a hand-over cut short leaves no
            // owner (nobody may change roles until the repair) rather than two.
            Body::RolesChanged { members } => self.index_write(|| {
                demotions_first(members).try_for_each(|(user, role)| set(Key::member(conv, *user), Some(encode(role))))
            }),
            // A rename rewrites the conversation's record, which conversation lists read
            // (counted like the member keys: a list shows it only once it is durable).
            Body::TitleChanged { title } => self.index_write(|| {
                let key = Key::conversation(conv);
                let Some(mut record) = self.conversation(conv)? else {
                    return Err(corrupt(key.as_ref(), "a rename of a conversation without a record"));
                };
                record.title.clone_from(title);
                set(key, Some(encode(&record)))
            }),
            // A message moves its sender's count and grants access to its files.
            Body::Text { .. } | Body::Files { .. } => {
                if let Body::Files { files, .. } = &entry.body {
                    // Who may read a file: the members where a message carries it. Not
                    // given back by a repair to its uploader's message once withdrawn, nor
                    // for a file collected since (its withdrawn marks went with it).
                    for f in files {
                        if repair
                            && (self.db.contains_key(Key::withdrawn(&f.file, conv, entry.seq))?
                                || !self.db.contains_key(Key::file(&f.file))?)
                        {
                            continue;
                        }
                        set(Key::attached(&f.file, conv, entry.seq), Some(Vec::new()))?;
                    }
                }
                // The conversation's count is the seq less its other entries' (written with
                // those): a message writes its sender's only.
                let mine = self.sent_before(conv, entry.sender, entry.seq)? + 1;
                let written = set(Key::sender_count(conv, entry.sender, entry.seq), Some(mine.to_be_bytes().to_vec()));
                match &written {
                    Ok(()) => self.counted(conv, entry.sender, entry.seq, mine),
                    Err(_) => self.forget_counts(conv, entry.sender),
                }
                written
            }
            // Tombstones and redactions are rewrites, never appended; a creation is one
            // atomic batch (with its count), and its repair writes the same count above.
            Body::Tombstone | Body::Created { .. } | Body::Redacted { .. } => Ok(()),
        }
    }

    /// Newest seq of a conversation (0 if none): read from its newest entry's key,
    /// without decoding the entry.
    pub fn last_seq(&self, id: ConvId) -> Result<Seq> {
        match self.entry_range(id).next_back() {
            Some(item) => {
                let (k, _) = item?;
                keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "entry key"))
            }
            None => Ok(0),
        }
    }

    pub(crate) fn entry_range(&self, id: ConvId) -> sled::Iter {
        self.db.range(Key::entry(id, 0).as_ref()..=Key::entry(id, Seq::MAX).as_ref())
    }

    /// Writes again whatever of a conversation's newest entry's effects a crash, or a
    /// writer that failed half way, lost (see `append_then`). Call before asking who its
    /// members are or accepting writes to it; a no-op (a few reads) when nothing was lost.
    pub fn repair_newest_entry(&self, id: ConvId) -> Result<()> {
        match self.newest_entry(id)? {
            Some(entry) => self.write_effects(&entry, true),
            None => Ok(()),
        }
    }

    pub(crate) fn newest_entry(&self, id: ConvId) -> Result<Option<Entry>> {
        match self.entry_range(id).next_back() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some(decode(&k, &v)?))
            }
            None => Ok(None),
        }
    }

    /// The seq an earlier entry with this idempotency key got, if any.
    pub fn dedupe(&self, conv: ConvId, user: UserId, client_id: &ClientMsgId) -> Result<Option<Seq>> {
        Ok(self.db.get(Key::dedupe(conv, user, client_id))?.and_then(|v| keys::u64_from(&v)))
    }

    /// Seqs of the `Edit` entries of `target`, ascending.
    pub fn edits_of(&self, conv: ConvId, target: Seq) -> Result<Vec<Seq>> {
        let mut out = Vec::new();
        for item in self.db.scan_prefix(Key::edits_of(conv, target)) {
            let (k, _) = item?;
            out.push(keys::u64_from(&k[k.len() - 8..]).ok_or_else(|| corrupt(&k, "edit key"))?);
        }
        Ok(out)
    }

    /// One entry.
    pub fn entry(&self, conv: ConvId, seq: Seq) -> Result<Option<Entry>> {
        self.get(Key::entry(conv, seq))
    }

    /// Entries with `from <= seq <= to`, ascending if `!newest_first`, at most `limit`.
    pub fn entries(&self, conv: ConvId, from: Seq, to: Seq, limit: usize, newest_first: bool) -> Result<Vec<Entry>> {
        if from > to {
            return Ok(Vec::new());
        }
        let range = self.db.range(Key::entry(conv, from).as_ref()..=Key::entry(conv, to).as_ref());
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            if newest_first { Box::new(range.rev()) } else { Box::new(range) };
        let mut out = Vec::with_capacity(limit.min(256));
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Brings a data dir written before format 2 up to date: every `Edit` gets its
    /// `edit_of` key, and the edits of messages deleted before then are redacted, so a
    /// delete removes every version of a message's text in old data too. Runs once (the
    /// format key is written after everything else, so a crash midway runs it again);
    /// one pass over the log.
    pub(crate) fn upgrade_to_format_2(&self) -> Result<()> {
        if self.stored_format()? >= 2 {
            return Ok(());
        }
        let mut deletes = Vec::new();
        let mut indexed = 0usize;
        for item in self.db.scan_prefix(Key::entries()) {
            let (k, v) = item?;
            let entry: Entry = decode(&k, &v)?;
            match entry.body {
                Body::Edit { target, .. } => {
                    self.db.insert(Key::edit_of(entry.conv, target, entry.seq), &[][..])?;
                    indexed += 1;
                }
                Body::Delete { target } => deletes.push((entry.conv, target)),
                _ => {}
            }
        }
        for (conv, target) in deletes {
            for edit in self.edits_of(conv, target)? {
                if let Some(mut stored) = self.entry(conv, edit)? {
                    stored.body = Body::Redacted { target };
                    self.db.insert(Key::entry(conv, edit), encode(&stored))?;
                }
            }
        }
        self.db.insert(Key::format(), &2u64.to_be_bytes()[..])?;
        if indexed > 0 {
            tracing::info!(edits = indexed, "indexed edits for format 2");
        }
        Ok(())
    }
}

/// Whether an entry counts as a message in unread counts: text, files, or one of them
/// deleted (a tombstone keeps its count). Every other entry is counted under
/// `Key::other_count`. Fixed for an entry's life: rewrites turn a message into a tombstone
/// and an edit into `Redacted`, never one kind into the other.
pub(crate) fn counts_as_message(body: &Body) -> bool {
    match body {
        Body::Text { .. } | Body::Files { .. } | Body::Tombstone => true,
        Body::Edit { .. }
        | Body::Delete { .. }
        | Body::Created { .. }
        | Body::MembersAdded { .. }
        | Body::MemberRemoved { .. }
        | Body::MemberLeft
        | Body::Redacted { .. }
        | Body::RolesChanged { .. }
        | Body::TitleChanged { .. } => false,
    }
}

/// A role change's member writes in the order they are made: every role but `Owner`
/// first, so that a write cut short between them never leaves two owners.
fn demotions_first(members: &[(UserId, Role)]) -> impl Iterator<Item = &(UserId, Role)> {
    let (owners, others): (Vec<_>, Vec<_>) = members.iter().partition(|(_, role)| *role == Role::Owner);
    others.into_iter().chain(owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hand_over_demotes_before_it_promotes() {
        // As the conversation writes it: the new owner named first.
        let handed = [(2, Role::Owner), (1, Role::Admin)];
        let order: Vec<_> = demotions_first(&handed).copied().collect();
        assert_eq!(order, [(1, Role::Admin), (2, Role::Owner)]);
        let promoted = [(3, Role::Admin)];
        assert_eq!(demotions_first(&promoted).copied().collect::<Vec<_>>(), promoted);
    }
}
