//! Where a `Session` keeps its per-conversation cursors between runs: what the
//! application has taken from the event stream, so a restarted process resumes there.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use switchboard_protocol::{ConvId, DeviceId, Seq, UserId};

/// Saved cursors: `conv → seq`, everything up to `seq` was taken by the application.
pub type Cursors = HashMap<ConvId, Seq>;

/// How many cursors of conversations left a device keeps (the newest left), so one it
/// is added back to resumes where it was rather than at the start. A bound, because
/// anyone may add a user to a group and remove it again: at most 1,024 pairs, about
/// 30 KB of JSON.
pub const LEFT_CURSORS_MAX: usize = 1024;

/// Cursors of conversations left, oldest left first, one per conversation: where a
/// conversation the user is added back to resumes. Kept within `LEFT_CURSORS_MAX` by
/// `trim` (the oldest go). Used by the store (`Saved`) and by the merge alike.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeftCursors(VecDeque<(ConvId, Seq)>);

impl LeftCursors {
    /// Keeps `cursor` as `conv`'s, newest last (the higher of it and one kept before);
    /// a cursor of 0 keeps nothing. Does not trim.
    pub fn keep(&mut self, conv: ConvId, cursor: Seq) {
        let cursor = cursor.max(self.take(conv));
        if cursor > 0 {
            self.0.push_back((conv, cursor));
        }
    }

    /// Removes `conv`; the cursor kept for it (0: none).
    pub fn take(&mut self, conv: ConvId) -> Seq {
        match self.0.iter().position(|&(c, _)| c == conv) {
            Some(i) => self.0.remove(i).map_or(0, |(_, s)| s),
            None => 0,
        }
    }

    /// Whether a cursor is kept for `conv`.
    pub fn contains(&self, conv: ConvId) -> bool {
        self.0.iter().any(|&(c, _)| c == conv)
    }

    /// Drops the oldest beyond `LEFT_CURSORS_MAX`.
    pub fn trim(&mut self) {
        let over = self.0.len().saturating_sub(LEFT_CURSORS_MAX);
        self.0.drain(..over);
    }

    /// `(conv, cursor)`, oldest left first.
    pub fn iter(&self) -> impl Iterator<Item = (ConvId, Seq)> + '_ {
        self.0.iter().copied()
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None kept.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(ConvId, Seq)> for LeftCursors {
    /// Oldest first; trimmed.
    fn from_iter<I: IntoIterator<Item = (ConvId, Seq)>>(pairs: I) -> LeftCursors {
        let mut left = LeftCursors::default();
        for (conv, cursor) in pairs {
            left.keep(conv, cursor);
        }
        left.trim();
        left
    }
}

/// What a store holds: the cursors of the conversations the user is a member of, and
/// those of conversations it left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Saved {
    /// Conversations the user is a member of.
    pub cursors: Cursors,
    /// Conversations left or removed from, oldest first, at most `LEFT_CURSORS_MAX`.
    pub left: LeftCursors,
}

impl Saved {
    /// Applies a save: each of `left` moves out of `cursors` into the left ones (at the
    /// highest of its cursor, what was kept and the seq given), then each of `cursors` is
    /// kept at the higher of the two (one among the left ones was joined again, and moves
    /// back, with its kept cursor), and only then are the oldest left trimmed: a
    /// conversation joined again keeps its cursor even if it was the oldest.
    fn apply(&mut self, cursors: &Cursors, left: &[(ConvId, Seq)]) {
        for &(conv, seq) in left {
            let was = self.cursors.remove(&conv).unwrap_or(0);
            self.left.keep(conv, seq.max(was));
        }
        // Looked up once: a user in thousands of conversations saves them all each time,
        // and each `take` is a walk of up to `LEFT_CURSORS_MAX` pairs.
        let left: HashSet<ConvId> = self.left.iter().map(|(conv, _)| conv).collect();
        for (&conv, &seq) in cursors {
            let kept = if left.contains(&conv) { self.left.take(conv) } else { 0 };
            let s = self.cursors.entry(conv).or_default();
            *s = (*s).max(seq).max(kept);
        }
        self.left.trim();
    }
}

/// A place to keep cursors. `save` is called from a blocking thread, debounced (at most
/// once per `SessionConfig::persist_ms`), and once more when the session closes.
pub trait CursorStore: Send + Sync + 'static {
    /// What was saved (empty when nothing was saved yet).
    fn load(&self) -> std::io::Result<Saved>;
    /// Moves the cursors of `left` (conversations the user is no longer a member of:
    /// `SessionEvent::Left`, with the cursor it had) among the left ones, then saves
    /// `cursors` (`Saved::apply`). A store shared by several processes keeps the higher
    /// cursor of each conversation (cursors only grow) and the cursors of conversations
    /// neither names.
    fn save(&self, cursors: &Cursors, left: &[(ConvId, Seq)]) -> std::io::Result<()>;
}

/// Cursors in memory only: a restarted process starts from nothing.
#[derive(Default)]
pub struct MemoryCursors(Mutex<Saved>);

impl MemoryCursors {
    /// Starts with `cursors`.
    pub fn new(cursors: Cursors) -> MemoryCursors {
        MemoryCursors(Mutex::new(Saved { cursors, left: LeftCursors::default() }))
    }

    /// What was saved last.
    pub fn saved(&self) -> Saved {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl CursorStore for MemoryCursors {
    fn load(&self) -> std::io::Result<Saved> {
        Ok(self.saved())
    }

    fn save(&self, cursors: &Cursors, left: &[(ConvId, Seq)]) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).apply(cursors, left);
        Ok(())
    }
}

/// Cursors in a JSON file, e.g. next to the device identity:
/// `{"user_id": 1, "device_id": 3, "cursors": {"42": 17}, "left": [[9, 4]]}` (`left`
/// may be missing: none). The file belongs to one
/// device: a file of another user or device is ignored on load and replaced on save.
/// Writes go to a temp file (one name per process), are fsynced and renamed over the
/// file, and the directory is fsynced, so a reader sees the old file or the new one,
/// whole. Each save keeps the higher cursor of what is on disk and what it writes, under
/// the lock file `PATH.lock`, so processes sharing the file never move a cursor back.
pub struct FileCursors {
    path: PathBuf,
    user_id: UserId,
    device_id: DeviceId,
}

#[derive(Serialize, Deserialize)]
struct CursorFile {
    user_id: UserId,
    device_id: DeviceId,
    cursors: Cursors,
    #[serde(default)]
    left: Vec<(ConvId, Seq)>,
}

impl FileCursors {
    /// Cursors of device `device_id` of user `user_id`, kept at `path`.
    pub fn new(path: impl Into<PathBuf>, user_id: UserId, device_id: DeviceId) -> FileCursors {
        FileCursors { path: path.into(), user_id, device_id }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> std::io::Result<Saved> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Saved::default()),
            Err(e) => return Err(e),
        };
        let file: CursorFile = serde_json::from_slice(&bytes).map_err(|e| {
            // What to do, said with it (a review: sb tail stopped on this with no way on).
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: {e} (not a cursor file: move it away to start over, and what the broker holds is caught up and printed again)",
                    self.path.display()
                ),
            )
        })?;
        if file.user_id != self.user_id || file.device_id != self.device_id {
            return Ok(Saved::default());
        }
        Ok(Saved { cursors: file.cursors, left: file.left.into_iter().collect() })
    }
}

impl CursorStore for FileCursors {
    fn load(&self) -> std::io::Result<Saved> {
        self.read()
    }

    fn save(&self, cursors: &Cursors, left: &[(ConvId, Seq)]) -> std::io::Result<()> {
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut lock_name = self.path.clone().into_os_string();
        lock_name.push(".lock");
        let lock = owner_only().write(true).create(true).truncate(false).open(PathBuf::from(lock_name))?;
        lock.lock()?;
        let mut saved = self.read().unwrap_or_default();
        saved.apply(cursors, left);
        let left = saved.left.iter().collect();
        let file = CursorFile { user_id: self.user_id, device_id: self.device_id, cursors: saved.cursors, left };
        let mut tmp_name = self.path.clone().into_os_string();
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let write = || -> std::io::Result<()> {
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = owner_only().write(true).create_new(true).open(&tmp)?;
            f.write_all(&serde_json::to_vec(&file)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            #[cfg(unix)]
            std::fs::File::open(dir)?.sync_all()?;
            Ok(())
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// Files only the owner may read or write.
fn owner_only() -> std::fs::OpenOptions {
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut opts = std::fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_cursors_round_trip_keep_the_higher_and_belong_to_one_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("cursors.json");
        let store = FileCursors::new(&path, 1, 3);
        assert!(store.load().unwrap().cursors.is_empty());
        store.save(&Cursors::from([(42, 17), (7, 3)]), &[]).unwrap();
        assert_eq!(store.load().unwrap().cursors, Cursors::from([(42, 17), (7, 3)]));
        // Another process of the same device saved less for 42: the higher one stays.
        store.save(&Cursors::from([(42, 5), (9, 1)]), &[]).unwrap();
        assert_eq!(store.load().unwrap().cursors, Cursors::from([(42, 17), (7, 3), (9, 1)]));
        // Another device's view of the same file starts empty and takes it over.
        let other = FileCursors::new(&path, 1, 4);
        assert!(other.load().unwrap().cursors.is_empty());
        other.save(&Cursors::from([(42, 2)]), &[]).unwrap();
        assert_eq!(other.load().unwrap().cursors, Cursors::from([(42, 2)]));
        assert!(store.load().unwrap().cursors.is_empty());
        let mut names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["cursors.json", "cursors.json.lock"], "no temp file is left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_silent_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cursors.json");
        std::fs::write(&path, b"{not json").unwrap();
        let error = FileCursors::new(&path, 1, 3).load().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        // And says what to do.
        assert!(error.to_string().contains("move it away to start over"), "{error}");
    }

    #[test]
    fn memory_cursors_keep_the_higher() {
        let store = MemoryCursors::new(Cursors::from([(1, 5)]));
        store.save(&Cursors::from([(1, 3), (2, 2)]), &[]).unwrap();
        assert_eq!(store.load().unwrap().cursors, Cursors::from([(1, 5), (2, 2)]));
    }

    #[test]
    fn cursors_of_conversations_left_are_kept_boundedly_and_move_back_when_joined_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cursors.json");
        // A file written before `left` existed still reads.
        std::fs::write(&path, br#"{"user_id":1,"device_id":3,"cursors":{"42":17,"7":3}}"#).unwrap();
        let store = FileCursors::new(&path, 1, 3);
        let saved = |cursors: &[(ConvId, Seq)], left: &[(ConvId, Seq)]| Saved {
            cursors: cursors.iter().copied().collect(),
            left: left.iter().copied().collect(),
        };
        assert_eq!(store.load().unwrap(), saved(&[(42, 17), (7, 3)], &[]));
        // Left at 15 by this process, while another sharing the file had taken 17: the
        // higher is kept. A conversation left with nothing taken keeps nothing.
        store.save(&Cursors::new(), &[(42, 15), (8, 0)]).unwrap();
        assert_eq!(store.load().unwrap(), saved(&[(7, 3)], &[(42, 17)]));
        // Joined again and read on: back among the cursors, at the higher.
        store.save(&Cursors::from([(42, 20)]), &[]).unwrap();
        assert_eq!(store.load().unwrap(), saved(&[(7, 3), (42, 20)], &[]));
        // Joined again with nothing taken yet: the kept cursor is the one it moves back at.
        store.save(&Cursors::new(), &[(42, 20)]).unwrap();
        store.save(&Cursors::from([(42, 1)]), &[]).unwrap();
        assert_eq!(store.load().unwrap().cursors[&42], 20);

        // Anyone may add a user and remove it again: the newest LEFT_CURSORS_MAX stay.
        let memory = MemoryCursors::default();
        let n = LEFT_CURSORS_MAX as u64 + 10;
        for conv in 1..=n {
            memory.save(&Cursors::new(), &[(conv, conv)]).unwrap();
        }
        let left: Vec<(ConvId, Seq)> = memory.load().unwrap().left.iter().collect();
        assert_eq!(left.len(), LEFT_CURSORS_MAX);
        assert_eq!((left[0], left[LEFT_CURSORS_MAX - 1]), ((11, 11), (n, n)), "the oldest left went");
        // A conversation joined again in the save that leaves another keeps its cursor,
        // even as the oldest left (the trim comes after it moved back).
        memory.save(&Cursors::from([(11, 5)]), &[(n + 1, 1)]).unwrap();
        let after = memory.load().unwrap();
        assert_eq!(after.cursors[&11], 11, "the kept cursor, higher than the stale 5");
        assert_eq!(after.left.len(), LEFT_CURSORS_MAX);
    }
}
