//! Where a `Session` keeps its per-conversation cursors between runs: what the
//! application has taken from the event stream, so a restarted process resumes there.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use switchboard_protocol::{ConvId, DeviceId, Seq, UserId};

/// Saved cursors: `conv → seq`, everything up to `seq` was taken by the application.
pub type Cursors = HashMap<ConvId, Seq>;

/// A place to keep cursors. `save` is called from a blocking thread, debounced (at most
/// once per `SessionConfig::persist_ms`), and once more when the session closes.
pub trait CursorStore: Send + Sync + 'static {
    /// The saved cursors (empty when nothing was saved yet).
    fn load(&self) -> std::io::Result<Cursors>;
    /// Drops the cursors of `forget` (conversations the user is no longer a member of:
    /// `SessionEvent::Left`), then saves `cursors`. A store shared by several processes
    /// keeps the higher cursor of each conversation (cursors only grow) and the cursors
    /// of conversations neither names.
    fn save(&self, cursors: &Cursors, forget: &[ConvId]) -> std::io::Result<()>;
}

/// Cursors in memory only: a restarted process starts from nothing.
#[derive(Default)]
pub struct MemoryCursors(Mutex<Cursors>);

impl MemoryCursors {
    /// Starts with `cursors`.
    pub fn new(cursors: Cursors) -> MemoryCursors {
        MemoryCursors(Mutex::new(cursors))
    }

    /// What was saved last.
    pub fn saved(&self) -> Cursors {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl CursorStore for MemoryCursors {
    fn load(&self) -> std::io::Result<Cursors> {
        Ok(self.saved())
    }

    fn save(&self, cursors: &Cursors, forget: &[ConvId]) -> std::io::Result<()> {
        let mut saved = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for conv in forget {
            saved.remove(conv);
        }
        for (&conv, &seq) in cursors {
            let s = saved.entry(conv).or_default();
            *s = (*s).max(seq);
        }
        Ok(())
    }
}

/// Cursors in a JSON file, e.g. next to the device identity:
/// `{"user_id": 1, "device_id": 3, "cursors": {"42": 17}}`. The file belongs to one
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

    fn read(&self) -> std::io::Result<Cursors> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cursors::new()),
            Err(e) => return Err(e),
        };
        let file: CursorFile = serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", self.path.display()))
        })?;
        if file.user_id != self.user_id || file.device_id != self.device_id {
            return Ok(Cursors::new());
        }
        Ok(file.cursors)
    }
}

impl CursorStore for FileCursors {
    fn load(&self) -> std::io::Result<Cursors> {
        self.read()
    }

    fn save(&self, cursors: &Cursors, forget: &[ConvId]) -> std::io::Result<()> {
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut lock_name = self.path.clone().into_os_string();
        lock_name.push(".lock");
        let lock = owner_only().write(true).create(true).truncate(false).open(PathBuf::from(lock_name))?;
        lock.lock()?;
        let mut merged = self.read().unwrap_or_default();
        for conv in forget {
            merged.remove(conv);
        }
        for (&conv, &seq) in cursors {
            let s = merged.entry(conv).or_default();
            *s = (*s).max(seq);
        }
        let file = CursorFile { user_id: self.user_id, device_id: self.device_id, cursors: merged };
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
        assert!(store.load().unwrap().is_empty());
        store.save(&Cursors::from([(42, 17), (7, 3)]), &[]).unwrap();
        assert_eq!(store.load().unwrap(), Cursors::from([(42, 17), (7, 3)]));
        // Another process of the same device saved less for 42: the higher one stays.
        store.save(&Cursors::from([(42, 5), (9, 1)]), &[]).unwrap();
        assert_eq!(store.load().unwrap(), Cursors::from([(42, 17), (7, 3), (9, 1)]));
        // Another device's view of the same file starts empty and takes it over.
        let other = FileCursors::new(&path, 1, 4);
        assert!(other.load().unwrap().is_empty());
        other.save(&Cursors::from([(42, 2)]), &[]).unwrap();
        assert_eq!(other.load().unwrap(), Cursors::from([(42, 2)]));
        assert!(store.load().unwrap().is_empty());
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
        assert_eq!(FileCursors::new(&path, 1, 3).load().unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn memory_cursors_keep_the_higher() {
        let store = MemoryCursors::new(Cursors::from([(1, 5)]));
        store.save(&Cursors::from([(1, 3), (2, 2)]), &[]).unwrap();
        assert_eq!(store.load().unwrap(), Cursors::from([(1, 5), (2, 2)]));
    }
}
