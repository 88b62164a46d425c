//! File bytes on disk, under the data dir: `uploads/<hex file id>` holds an upload in
//! progress (its durable prefix, fdatasynced before the offset is recorded in the store),
//! `blobs/<hex blake3>` a complete file, shared by every file with the same bytes. Every
//! function here blocks: call it on `spawn_blocking`.
//!
//! Crash safety: a partial file may hold more than its recorded offset (written, not yet
//! recorded) and is truncated back at start. Completion first records the upload
//! `Publishing` (durably; the record then refers to its blob), then renames the partial
//! file into `blobs/` (or drops it when the blob exists) and syncs both directories,
//! then records the file complete: at start a publishing upload is finished (`repair`),
//! and any other upload whose partial file is gone starts over at offset 0, whatever
//! blob exists (its bytes were never verified to be that blob). A removed upload's
//! partial file goes only once its removal is durable. A blob no record references is
//! deleted at start.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use switchboard_protocol::{Blake3, FileId, UserId};
use switchboard_storage::{Durable, FileRecord, Store};

/// Where file bytes live.
#[derive(Debug)]
pub struct Blobs {
    uploads: PathBuf,
    blobs: PathBuf,
    /// Files being deleted (`Blobs::remove`).
    trash: PathBuf,
    deleter: Deleter,
    /// Held across "the blob exists, so add a reference to it" and across "the blob has
    /// no reference, so unlink it": a blob is never unlinked while a file refers to it.
    refs: std::sync::Mutex<()>,
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Makes the entries of `dir` (files renamed into or out of it) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    SYNCED_DIRS.with(|synced| synced.borrow_mut().push(dir.to_owned()));
    File::open(dir)?.sync_all()
}

#[cfg(test)]
thread_local! {
    /// The directories `sync_dir` synced on this thread, and the files `cut_piece` cut,
    /// in order, for tests.
    static SYNCED_DIRS: std::cell::RefCell<Vec<std::path::PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Alignment of direct writes: of the file offset, the length and the buffer's address.
/// 4096 covers logical block sizes up to the common 4 KiB; a device that needs more
/// answers `EINVAL`, and the file falls back to writes through the page cache.
pub const DIRECT_ALIGN: usize = 4096;

/// An upload's partial file: read and written through the page cache, and, where the
/// file system allows it, also open with `O_DIRECT` for the whole aligned blocks of each
/// chunk. A 1 MiB chunk copied into the page cache and written back by its fdatasync
/// cost the broker 0.8 to 1.5 ms of CPU (`copy_folio_from_iter_atomic` was a quarter of
/// its profile during uploads); written directly, with the same fdatasync after it,
/// 0.1 ms, and the disk took 1 MiB appends 2 to 3 times as fast (docs/benchmarks.md,
/// "Direct writes and one copy per chunk"). The unaligned start and end of a chunk
/// (less than a block each) go through the page cache; the fdatasync after the write
/// covers both paths.
#[derive(Debug)]
pub struct PartialFile {
    file: File,
    /// The same file opened with `O_DIRECT`; `None` where the file system refuses it.
    direct: Option<File>,
    /// Cleared when a direct write is refused (`EINVAL`): the rest goes buffered.
    direct_ok: AtomicBool,
}

impl PartialFile {
    /// Wraps `file` (open read-write at `path`), opening `path` again for direct writes
    /// (Linux only; elsewhere, or if that fails or opens another file than `file`, every
    /// write goes through the page cache).
    pub fn new(file: File, path: &Path) -> PartialFile {
        let direct = open_direct(path).ok().filter(|direct| same_file(&file, direct));
        PartialFile { direct_ok: AtomicBool::new(direct.is_some()), file, direct }
    }

    /// The file, for reads (and for writes that must go through the page cache).
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// Whether whole aligned blocks are still written directly.
    pub fn writes_directly(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// Writes `data` at `offset` and makes it durable (fdatasync): the whole
    /// `DIRECT_ALIGN` blocks directly, what lies before and after them through the page
    /// cache. Call for one upload at a time (its actor does).
    pub fn write_chunk(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let (head, middle) = direct_span(offset, data.len());
        match self.direct.as_ref() {
            Some(direct) if middle > 0 && self.writes_directly() => {
                self.file.write_all_at(&data[..head], offset)?;
                self.write_direct(direct, offset + head as u64, &data[head..head + middle])?;
                let end = head + middle;
                self.file.write_all_at(&data[end..], offset + end as u64)?;
            }
            _ => self.file.write_all_at(data, offset)?,
        }
        self.file.sync_data()
    }

    /// Writes `data` (a whole number of aligned blocks at an aligned `offset`) with
    /// `O_DIRECT`: from where it is if its address is aligned (the transfer stream's
    /// `ChunkDecoder` places it so), else from an aligned copy. If the file system
    /// refuses (`EINVAL`), the rest goes through the page cache, now and for every later
    /// write.
    fn write_direct(&self, direct: &File, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut copy: Vec<u8> = Vec::new();
        let aligned = if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            data
        } else {
            copy.reserve_exact(data.len() + DIRECT_ALIGN);
            let pad = copy.as_ptr().align_offset(DIRECT_ALIGN);
            copy.resize(pad, 0);
            copy.extend_from_slice(data);
            &copy[pad..]
        };
        let mut done = 0;
        while done < aligned.len() {
            match direct.write_at(&aligned[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    tracing::warn!(error = %e, "direct writes refused; upload chunks go through the page cache");
                    self.direct_ok.store(false, Ordering::Relaxed);
                    return self.file.write_all_at(&data[done..], offset + done as u64);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32).open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Whether `a` and `b` are open on the same file (device and inode): the path could
/// have been replaced between the two opens.
fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Of a write of `len` bytes at `offset`: the bytes before the first `DIRECT_ALIGN`
/// boundary, and the whole aligned blocks after them (what is left is the tail).
fn direct_span(offset: u64, len: usize) -> (usize, usize) {
    let align = DIRECT_ALIGN as u64;
    let head = ((align - offset % align) % align).min(len as u64) as usize;
    let middle = (len - head) / DIRECT_ALIGN * DIRECT_ALIGN;
    (head, middle)
}

/// Longest sleep of `remove_paced` between two asks whether to go on.
const PACE_SLICE: std::time::Duration = std::time::Duration::from_millis(50);

/// Bytes freed per cut when a file is deleted (`remove_paced`).
const DELETE_PIECE: u64 = 4 * 1024 * 1024;
/// Bytes per second the broker frees when it deletes files by default
/// (`delete_bytes_per_sec`; see `remove_paced`).
pub const DELETE_BYTES_PER_SEC: u64 = 32 * 1024 * 1024;

/// Deletes the file at `path` (none there is fine) at most `bytes_per_sec` at a time: cut
/// from the end `DELETE_PIECE` at a time, each cut fdatasynced, then unlinked. `freed` is
/// told each piece's bytes once they are freed (cut and synced, or the rest unlinked), and
/// 0 every `PACE_SLICE` while it waits its turn, and answers whether to go on: `false`
/// leaves the rest of the file, shorter, in place, at once (a slow rate never holds up a
/// stop). Whether the file is gone. Blocking.
///
/// Why: on a file system mounted with online `discard` (ext4 `-o discard`, as on the VM
/// of docs/benchmarks.md), freeing blocks fast stalls every fdatasync on the disk, the
/// group commit's included. Measured there beside a small fdatasync every 10 ms:
/// unlinking a 100 MiB file at once stalled them 50-76 ms (chat p99 during uploads was
/// 65-77 ms); 500 MiB (50 files of 10 MiB) freed in half a second, cut or not, stalled
/// them 73-79 ms two seconds later; freed in 4 MiB cuts at 128 MiB/s one stall of 57 ms,
/// at 64 MiB/s two of 43-47 ms, at 32 MiB/s none (max 6.5 ms). RocksDB deletes its
/// files at a bounded rate for the same reason.
pub fn remove_paced(path: &Path, bytes_per_sec: u64, mut freed: impl FnMut(u64) -> bool) -> io::Result<bool> {
    loop {
        let started = std::time::Instant::now();
        let (cut, gone) = cut_piece(path)?;
        let go_on = freed(cut);
        if gone {
            pace(cut, started, bytes_per_sec, || freed(0));
            return Ok(true);
        }
        if !go_on || !pace(cut, started, bytes_per_sec, || freed(0)) {
            return Ok(false);
        }
    }
}

/// Frees one piece of the file at `path`: cuts `DELETE_PIECE` off its end and fdatasyncs,
/// or unlinks it if no larger (none there is fine). The bytes freed, and whether it is
/// gone. Blocking.
fn cut_piece(path: &Path) -> io::Result<(u64, bool)> {
    let file = match OpenOptions::new().write(true).open(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, true)),
        file => file?,
    };
    let len = file.metadata()?.len();
    #[cfg(test)]
    SYNCED_DIRS.with(|synced| synced.borrow_mut().push(path.to_owned()));
    if len > DELETE_PIECE {
        file.set_len(len - DELETE_PIECE)?;
        file.sync_data()?;
        return Ok((DELETE_PIECE, false));
    }
    drop(file);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok((len, true)),
    }
}

/// Sleeps what is left of `bytes`' share of `rate` (bytes a second) since `started`, a
/// `PACE_SLICE` at a time, asking `go_on` before each; whether to go on.
fn pace(bytes: u64, started: std::time::Instant, rate: u64, mut go_on: impl FnMut() -> bool) -> bool {
    let share = std::time::Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
    while let Some(rest) = share.checked_sub(started.elapsed()).filter(|r| !r.is_zero()) {
        if !go_on() {
            return false;
        }
        std::thread::sleep(rest.min(PACE_SLICE));
    }
    true
}

/// Deletes what is moved into the trash dir, one file at a time at
/// `DELETE_BYTES_PER_SEC`, on a thread of its own: whoever deletes a file only renames
/// it there and goes on. A file in the trash is referenced by nothing (its record or
/// reference is gone durably before it is moved); a crash leaves it there, and the next
/// start deletes it. Dropped (the broker's files closed), it stops after the piece it is
/// freeing, so a broker started again on the same dir in the same process counts alone.
#[derive(Debug)]
struct Deleter {
    /// Wakes the thread; one pending wake-up is enough (it empties the whole dir).
    wake: std::sync::mpsc::SyncSender<()>,
    /// Names files moved into the trash uniquely.
    next: std::sync::atomic::AtomicU64,
    /// What is not freed yet, shared with the thread.
    counts: Arc<Counts>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Deleter {
    fn drop(&mut self) {
        self.counts.stop.store(true, Ordering::Release);
        let _ = self.wake.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Per user, bytes in the trash that its uploads and files left, not yet freed.
type Owed = std::sync::Mutex<std::collections::HashMap<UserId, u64>>;

/// The name of a file moved into the trash: unique (`n`), with the user it is charged to
/// (`u<id>`) or `n` for nobody, so a crash does not lose the charge and no original name
/// can pass for one (`owner_in`).
fn trash_name(n: u64, owner: Option<UserId>, original: &str) -> String {
    match owner {
        Some(user) => format!("{n:016x}-u{user}-{original}"),
        None => format!("{n:016x}-n-{original}"),
    }
}

/// The user a file in the trash is charged to, from its name (`trash_name`).
fn owner_in(name: &str) -> Option<UserId> {
    let (_, rest) = name.split_once('-')?;
    rest.strip_prefix('u')?.split_once('-')?.0.parse().ok()
}

/// Adds `len` bytes to (or with `add` false takes them off) what `owner` owes.
fn charge(owed: &Owed, owner: Option<UserId>, len: u64, add: bool) {
    let Some(user) = owner else { return };
    let mut owed = owed.lock().unwrap_or_else(|p| p.into_inner());
    let now = owed.get(&user).copied().unwrap_or(0);
    match if add { now.saturating_add(len) } else { now.saturating_sub(len) } {
        0 => owed.remove(&user),
        bytes => owed.insert(user, bytes),
    };
}

impl Deleter {
    /// The thread deleting what is moved into `trash` from `sources`.
    fn start(trash: PathBuf, sources: Vec<PathBuf>, bytes_per_sec: u64) -> io::Result<Deleter> {
        // What a crash left counts from the start, charged to whom it was.
        let counts = Arc::new(Counts::default());
        for entry in std::fs::read_dir(&trash)?.filter_map(|e| e.ok()) {
            let Ok(meta) = entry.metadata() else { continue };
            counts.count(owner_in(&entry.file_name().to_string_lossy()), meta.len());
        }
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let ours = counts.clone();
        let thread = std::thread::Builder::new().name("sb-deleter".into()).spawn(move || {
            // What a crash left, then whatever comes, until the broker's files close.
            loop {
                // Tests hold a deleter to look at its trash.
                #[cfg(test)]
                while tests::held(&trash) && !ours.stop.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                if ours.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Err(e) = empty(&trash, &sources, bytes_per_sec, &ours) {
                    tracing::warn!(error = %e, dir = %trash.display(), "reading the trash failed; retried at the next delete");
                }
                if woken.recv().is_err() {
                    return;
                }
            }
        })?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let next = std::sync::atomic::AtomicU64::new(nanos as u64);
        Ok(Deleter { wake, next, counts, thread: Some(thread) })
    }
}

/// What the trash holds not yet freed, counted up as files are moved in and down as the
/// deleter thread frees them, and the thread's stop flag.
#[derive(Debug, Default)]
struct Counts {
    /// Bytes in the trash not yet freed: the disk's free space does not show them yet.
    backlog: std::sync::atomic::AtomicU64,
    /// The part of `backlog` each user's uploads and files left (`Blobs::unfreed_of`),
    /// per user with any (so at most one entry per account).
    owed: Owed,
    /// Tells the thread to stop (`Deleter`'s drop).
    stop: AtomicBool,
}

impl Counts {
    /// `len` bytes of `owner`'s (if any) are in the trash.
    fn count(&self, owner: Option<UserId>, len: u64) {
        self.backlog.fetch_add(len, Ordering::AcqRel);
        charge(&self.owed, owner, len, true);
    }

    /// `len` bytes of `owner`'s (if any) left the trash: freed, or not moved in after all.
    fn uncount(&self, owner: Option<UserId>, len: u64) {
        let _ = self.backlog.fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| Some(b.saturating_sub(len)));
        charge(&self.owed, owner, len, false);
    }
}

/// Deletes every file in `trash` at `bytes_per_sec`, one piece (`DELETE_PIECE`, or a
/// smaller file whole) per turn, taking each piece off the backlog (and off what the
/// file's owner owes) as it goes, so a file that fails half-way stays counted at what is
/// left of it. Turns go round the owners, the one served least first, each owner's
/// smallest file first, the dir read again every `PASS_BYTES` or `PASS_TURNS`: one user's big deletions
/// never hold another's small one behind them for long. A file that cannot be deleted
/// is logged and skipped (tried again at the next wake-up). Returns early once told to
/// stop.
///
/// Each pass first syncs `trash` and the `sources` its files were moved from, so that
/// no cut is made before the move is durable: a crash cannot bring a file back under its
/// old name cut short, on a file system that does not keep a rename ahead of a later
/// truncation (a durability review: a blob cut short could come back in `blobs/`).
fn empty(trash: &Path, sources: &[PathBuf], bytes_per_sec: u64, counts: &Counts) -> io::Result<()> {
    /// Bytes freed, and turns taken, between two reads of the trash dir (whichever
    /// comes first: many tiny files end a pass as soon as a few big pieces).
    const PASS_BYTES: u64 = 16 * DELETE_PIECE;
    const PASS_TURNS: usize = 256;
    let mut failed = std::collections::HashSet::new();
    let mut served: std::collections::HashMap<Option<UserId>, u64> = std::collections::HashMap::new();
    loop {
        // Each owner's files, smallest first; owners by turns served so far.
        let mut owners: std::collections::HashMap<Option<UserId>, Vec<(u64, PathBuf)>> =
            std::collections::HashMap::new();
        for entry in std::fs::read_dir(trash)? {
            let entry = entry?;
            let path = entry.path();
            if failed.contains(&path) {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            owners.entry(owner_in(&entry.file_name().to_string_lossy())).or_default().push((len, path));
        }
        if owners.is_empty() {
            return Ok(());
        }
        for dir in std::iter::once(trash).chain(sources.iter().map(PathBuf::as_path)) {
            sync_dir(dir)?;
        }
        let mut queues: Vec<_> = owners.into_iter().collect();
        for (_, files) in &mut queues {
            files.sort_unstable_by(|a, b| b.cmp(a));
        }
        queues.sort_by_key(|(owner, _)| served.get(owner).copied().unwrap_or(0));
        let (mut pass, mut turns) = (0u64, 0usize);
        while pass < PASS_BYTES && turns < PASS_TURNS && queues.iter().any(|(_, files)| !files.is_empty()) {
            for (owner, files) in &mut queues {
                let Some((_, path)) = files.last().cloned() else { continue };
                let started = std::time::Instant::now();
                let cut = match cut_piece(&path) {
                    Ok((cut, gone)) => {
                        counts.uncount(*owner, cut);
                        if gone {
                            files.pop();
                        }
                        cut
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, file = %path.display(), "a file in the trash could not be deleted");
                        failed.insert(path);
                        files.pop();
                        0
                    }
                };
                *served.entry(*owner).or_default() += 1;
                (pass, turns) = (pass + cut, turns + 1);
                // The rate: this piece's share, waited in slices so a stop is not held up.
                let go_on = || !counts.stop.load(Ordering::Acquire);
                if !pace(cut, started, bytes_per_sec, go_on) || !go_on() {
                    return Ok(());
                }
            }
        }
    }
}

/// Where the files of a broker with its data in `data_dir` wait to be freed: empty once
/// every deleted file's space is given back.
pub fn trash_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("trash")
}

impl Blobs {
    /// The directories under `data_dir`, created if missing, and the thread that deletes
    /// files at `delete_bytes_per_sec` (it first deletes what a crash left in the trash).
    pub fn open(data_dir: &Path, delete_bytes_per_sec: u64) -> io::Result<Blobs> {
        let trash = trash_dir(data_dir);
        let (uploads, blobs) = (data_dir.join("uploads"), data_dir.join("blobs"));
        for dir in [&trash, &uploads, &blobs] {
            std::fs::create_dir_all(dir)?;
        }
        let sources = vec![uploads.clone(), blobs.clone()];
        Ok(Blobs {
            uploads,
            blobs,
            trash: trash.clone(),
            refs: std::sync::Mutex::new(()),
            deleter: Deleter::start(trash, sources, delete_bytes_per_sec.max(1))?,
        })
    }

    /// Deletes the file at `path` (none there is fine): it is gone from `path` at once
    /// (moved into the trash, on the same file system) and its blocks are freed at
    /// `DELETE_BYTES_PER_SEC` by the deleter thread (the disk's free space catches up then).
    /// Until then its bytes count against `owner`'s quota (`unfreed_of`): one user's
    /// uploads failed or cancelled near their end, or files deleted, faster than the
    /// deleter frees them cannot fill the disk for everyone.
    fn remove(&self, path: &Path, owner: Option<UserId>) -> io::Result<()> {
        let n = self.deleter.next.fetch_add(1, Ordering::Relaxed);
        let name = trash_name(n, owner, &path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default());
        let len = match std::fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            meta => meta?.len(),
        };
        // Counted before the move, so the free space never looks larger than it is.
        self.deleter.counts.count(owner, len);
        if let Err(e) = std::fs::rename(path, self.trash.join(name)) {
            self.deleter.counts.uncount(owner, len);
            return match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            };
        }
        let _ = self.deleter.wake.try_send(());
        Ok(())
    }

    /// Bytes deleted but not yet freed on the disk (the trash's backlog): a free-space
    /// check subtracts them, so deleting faster than the deleter frees cannot fill the
    /// disk.
    pub fn unfreed_bytes(&self) -> u64 {
        self.deleter.counts.backlog.load(Ordering::Acquire)
    }

    /// The part of `unfreed_bytes` that `user`'s uploads and files left (removed on its
    /// behalf: cancelled, failed, expired or deleted): counted in its quota until freed.
    pub fn unfreed_of(&self, user: UserId) -> u64 {
        self.deleter.counts.owed.lock().unwrap_or_else(|p| p.into_inner()).get(&user).copied().unwrap_or(0)
    }

    /// Counts `bytes` against `owner`'s quota (`unfreed_of`) until the guard drops: taken
    /// before the store gives the quota of an upload or file back, dropped once its
    /// bytes are in the trash (charged there), so between the two nothing of it is
    /// uncounted for a `BeginUpload` that checks meanwhile.
    pub fn owe(&self, owner: UserId, bytes: u64) -> Owing<'_> {
        charge(&self.deleter.counts.owed, Some(owner), bytes, true);
        Owing { owed: &self.deleter.counts.owed, owner, bytes }
    }

    /// The directory whose disk holds the files (for free space).
    pub fn root(&self) -> &Path {
        &self.blobs
    }

    /// An upload's partial file.
    pub fn partial(&self, id: &FileId) -> PathBuf {
        self.uploads.join(hex(id))
    }

    /// Makes upload `id`'s record, at `offset`, agree with its partial file: a file
    /// shorter than that (its tail lost) moves the offset back to its length; a missing
    /// one starts the upload over at 0 (with an empty file); otherwise bytes past the
    /// offset are cut off. The offset's write, if one was made (its durability for the
    /// caller to await). At start (`repair`) and before an upload's actor starts
    /// (`Files::spawn`): a partial file lost while the broker ran was otherwise made
    /// again as `offset` zeros, which verification then failed. Blocking.
    pub fn reconcile_partial(&self, store: &Store, id: &FileId, offset: u64) -> Result<Option<Durable>, String> {
        match std::fs::metadata(self.partial(id)) {
            Ok(meta) if meta.len() < offset => {
                tracing::warn!(
                    file = hex(id),
                    recorded = offset,
                    found = meta.len(),
                    "partial upload shorter than recorded"
                );
                store.set_upload_offset(id, meta.len(), None).map_err(|e| e.to_string())
            }
            Ok(_) => self.open_partial(id, offset).map(|_| None).map_err(|e| e.to_string()),
            // Gone, and only then: any other error fails the start (the next stream tries
            // again), never costs the upload its bytes.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if offset > 0 {
                    tracing::error!(file = hex(id), "an upload's partial file is gone; it starts over");
                }
                let rewound = store.set_upload_offset(id, 0, None).map_err(|e| e.to_string())?;
                if rewound.is_some() || offset == 0 {
                    self.open_partial(id, 0).map_err(|e| e.to_string())?;
                }
                Ok(rewound)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// A complete file's bytes.
    pub fn blob(&self, hash: &Blake3) -> PathBuf {
        self.blobs.join(hex(hash))
    }

    /// Opens an upload's partial file for writing (creating it, durably, if missing) and
    /// cuts it to `offset`: bytes past the recorded offset were never reported durable.
    pub fn open_partial(&self, id: &FileId, offset: u64) -> io::Result<PartialFile> {
        let path = self.partial(id);
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        if file.metadata()?.len() != offset {
            file.set_len(offset)?;
            file.sync_all()?;
        }
        if !existed {
            sync_dir(&self.uploads)?;
        }
        Ok(PartialFile::new(file, &path))
    }

    /// Opens an upload's partial file again, as it is, for the actor that opened it with
    /// `open_partial` and let go of it while no stream was open (nothing past its durable
    /// offset is read, and a later write overwrites from there). `NotFound` if the file
    /// went.
    pub fn reopen_partial(&self, id: &FileId) -> io::Result<PartialFile> {
        let path = self.partial(id);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(PartialFile::new(file, &path))
    }

    /// Feeds bytes `from..to` of `file` to `hasher`, read in 256 KiB pieces.
    pub fn hash_range(file: &File, hasher: &mut blake3::Hasher, from: u64, to: u64) -> io::Result<()> {
        let mut buf = vec![0u8; (to.saturating_sub(from)).min(256 * 1024) as usize];
        let mut at = from;
        while at < to {
            let want = (to - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..want], at)?;
            hasher.update(&buf[..want]);
            at += want as u64;
        }
        Ok(())
    }

    /// Makes the bytes of an upload marked publishing (`Store::begin_publish`, durable:
    /// the record already refers to the blob) the blob of `hash`, and records the file
    /// complete (`Store::complete_upload`): renames the partial file into place, or drops
    /// it when that blob exists whole (the same bytes are stored once), and syncs both
    /// directories, whichever it did. Under the lock `remove_unreferenced` takes, so a
    /// blob found here is never unlinked under the file. A dropped partial file is
    /// charged to `owner`, its uploader, until freed. `None` if the upload is not
    /// publishing.
    ///
    /// Both directories are synced even when the blob was there already: it may have
    /// been renamed in by this upload's earlier attempt whose sync failed, or by a run
    /// that stopped before its sync, and before, the file was then recorded complete with
    /// no sync of `blobs/` ever made. A blob of another length than the file's (cut
    /// short: a crash undid its move into the trash but kept the deleter's cut, which a
    /// file system need not order) is replaced by the partial file, verified against the
    /// same hash, where there is one (both from a durability review).
    pub fn publish(
        &self,
        store: &Store,
        id: &FileId,
        hash: &Blake3,
        owner: UserId,
    ) -> Result<Option<(FileRecord, Durable)>, String> {
        let (partial, blob) = (self.partial(id), self.blob(hash));
        let _refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        if self.blob_is_whole(store, id, hash)? || (blob.exists() && !partial.exists()) {
            self.remove(&partial, Some(owner)).map_err(|e| e.to_string())?;
        } else {
            std::fs::rename(&partial, &blob).map_err(|e| e.to_string())?;
        }
        sync_dir(&self.blobs).map_err(|e| e.to_string())?;
        sync_dir(&self.uploads).map_err(|e| e.to_string())?;
        store.complete_upload(id).map_err(|e| e.to_string())
    }

    /// Whether the blob of `hash` is there at upload `id`'s length (any length if its
    /// record is gone): one of another length is no copy of its bytes (`publish`).
    fn blob_is_whole(&self, store: &Store, id: &FileId, hash: &Blake3) -> Result<bool, String> {
        let size = store.file(id).map_err(|e| e.to_string())?.map(|record| record.size);
        Ok(std::fs::metadata(self.blob(hash)).is_ok_and(|m| size.is_none_or(|size| m.len() == size)))
    }

    /// Stores `bytes` as the blob of `hash` (a thumbnail), durably unless it exists, and
    /// records it as the thumbnail `thumb` of `parent` (`Store::add_thumbnail`), both
    /// under the lock `remove_unreferenced` takes. When `parent` is gone (or has a
    /// thumbnail already) the blob is unlinked again if nothing else refers to it.
    /// `None` then.
    pub fn store_thumbnail(
        &self,
        store: &Store,
        parent: &FileId,
        thumb: &FileId,
        record: &FileRecord,
        bytes: &[u8],
    ) -> Result<Option<(FileRecord, Durable)>, String> {
        let hash = &record.blake3;
        let _refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let blob = self.blob(hash);
        if !blob.exists() {
            let tmp = self.uploads.join(format!("{}.tmp", hex(hash)));
            let write = || -> io::Result<()> {
                let file = File::create(&tmp)?;
                file.write_all_at(bytes, 0)?;
                file.sync_all()?;
                std::fs::rename(&tmp, &blob)?;
                sync_dir(&self.blobs)
            };
            write().map_err(|e| e.to_string())?;
        }
        let added = store.add_thumbnail(parent, thumb, record).map_err(|e| e.to_string())?;
        if added.is_none() && store.blob_refs(hash).map_err(|e| e.to_string())? == 0 {
            self.unlink(hash, None).map_err(|e| e.to_string())?;
        }
        Ok(added)
    }

    /// Finishes an upload left publishing (`Store::begin_publish` was durable, the rest
    /// was not done): by a crash (`repair`), or by a failure of `publish` at run time,
    /// after which its next actor calls this instead of verifying bytes that may have
    /// moved. Verified and referenced before: published now, if its partial file or its
    /// blob (at the file's length) is there; otherwise its bytes are lost and it starts
    /// over from offset 0 (its
    /// blob reference dropped, an empty partial file made). `owner` is its uploader.
    /// Blocking.
    pub fn finish_publishing(
        &self,
        store: &Store,
        id: &FileId,
        hash: &Blake3,
        owner: UserId,
    ) -> Result<Finished, String> {
        // A blob of another length than the file's is no copy of its bytes (cut short:
        // `publish`); with no partial file either, the upload starts over.
        if self.partial(id).exists() || self.blob_is_whole(store, id, hash)? {
            return Ok(match self.publish(store, id, hash, owner)? {
                Some((record, durable)) => {
                    tracing::info!(file = hex(id), "finished a completion cut short");
                    Finished::Completed(record, durable)
                }
                None => Finished::NotPublishing,
            });
        }
        tracing::error!(file = hex(id), "a publishing upload lost its bytes; it starts over");
        let Some(durable) = store.restart_upload(id).map_err(|e| e.to_string())? else {
            return Ok(Finished::NotPublishing);
        };
        self.open_partial(id, 0).map_err(|e| e.to_string())?;
        Ok(Finished::Restarted(durable))
    }

    /// Removes an upload's partial file, if any (in pieces, see `remove`), charged to
    /// `owner` until freed.
    pub fn remove_partial(&self, id: &FileId, owner: Option<UserId>) -> io::Result<()> {
        self.remove(&self.partial(id), owner)
    }

    /// Unlinks the blob of `hash` if no file refers to it: `Store::collect_file` named it
    /// unreferenced, and its removal is durable. The references are read again under the
    /// lock `publish` takes: a file that gained the blob since keeps it. Charged to
    /// `owner` (whose file's collection let it go) until freed. Whether it went.
    pub fn remove_unreferenced(&self, store: &Store, hash: &Blake3, owner: Option<UserId>) -> Result<bool, String> {
        let _refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        if store.blob_refs(hash).map_err(|e| e.to_string())? > 0 {
            return Ok(false);
        }
        self.unlink(hash, owner).map_err(|e| e.to_string())?;
        Ok(true)
    }

    fn unlink(&self, hash: &Blake3, owner: Option<UserId>) -> io::Result<()> {
        self.remove(&self.blob(hash), owner)
    }

    /// Reads `len` bytes of a blob at `offset`.
    pub fn read(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Brings the files in line with the store after an unclean stop (see the module
    /// docs): each upload in progress has a partial file exactly as long as its offset
    /// (a shorter file lowers the offset; a missing one whose blob exists at full size
    /// completes the upload), and files nothing references are deleted. Returns the
    /// number of uploads checked and the files it completed (each still owed what a
    /// completion does next: its thumbnail).
    pub fn repair(&self, store: &Store) -> Result<Repaired, String> {
        let uploads = store.uploads_in_progress().map_err(|e| e.to_string())?;
        let mut live = std::collections::HashSet::new();
        let mut completed = Vec::new();
        for (id, record) in &uploads {
            if record.stage == switchboard_storage::FileStage::Publishing {
                // Durable with the store's barrier before anything is served.
                match self.finish_publishing(store, id, &record.blake3, record.uploader)? {
                    Finished::Completed(record, _durable) => completed.push((*id, record)),
                    Finished::Restarted(_durable) => {
                        live.insert(hex(id));
                    }
                    Finished::NotPublishing => {}
                }
                continue;
            }
            // Durable with the store's barrier before anything is served.
            drop(self.reconcile_partial(store, id, record.offset())?);
            live.insert(hex(id));
        }
        for entry in std::fs::read_dir(&self.uploads).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) {
                let _ = self.remove(&entry.path(), None);
            }
        }
        for entry in std::fs::read_dir(&self.blobs).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let referenced = match unhex::<32>(&name) {
                Some(hash) => store.blob_refs(&hash).map_err(|e| e.to_string())? > 0,
                None => false,
            };
            if !referenced {
                tracing::info!(blob = name, "deleted a blob no file references");
                let _ = self.remove(&entry.path(), None);
            }
        }
        Ok(Repaired { checked: uploads.len(), completed })
    }
}

/// A charge taken by `Blobs::owe`, given back when dropped.
pub struct Owing<'a> {
    owed: &'a Owed,
    owner: UserId,
    bytes: u64,
}

impl Drop for Owing<'_> {
    fn drop(&mut self) {
        charge(self.owed, Some(self.owner), self.bytes, false);
    }
}

/// What `Blobs::finish_publishing` did.
pub enum Finished {
    /// Published: the file is complete (the record; durable once this resolves).
    Completed(FileRecord, Durable),
    /// Its bytes were lost: back to offset 0 (durable once this resolves).
    Restarted(Durable),
    /// It was not publishing (any more).
    NotPublishing,
}

/// What the start-up repair did (`Blobs::repair`).
#[derive(Debug)]
pub struct Repaired {
    /// Uploads in progress it checked.
    pub checked: usize,
    /// Uploads whose interrupted completion it finished, with their complete records.
    pub completed: Vec<(FileId, FileRecord)>,
}

#[cfg(test)]
mod tests {
    //! The crash states completion and chunk writes can leave, and what the start-up
    //! repair makes of each: either "still uploading at offset X" or "complete".

    use super::*;
    use switchboard_storage::FileStage;

    fn open(dir: &Path) -> (Store, Blobs) {
        (crate::test_store(dir), Blobs::open(dir, DELETE_BYTES_PER_SEC).unwrap())
    }

    fn record(data: &[u8]) -> FileRecord {
        FileRecord {
            name: "f".into(),
            size: data.len() as u64,
            declared_type: "text/plain".into(),
            content_type: "text/plain".into(),
            blake3: *blake3::hash(data).as_bytes(),
            uploader: 1,
            created_ms: 0,
            expires_ms: 1,
            stage: FileStage::Uploading { offset: 0 },
            parent: None,
            held: true,
        }
    }

    async fn begin(store: &Store, id: &FileId, data: &[u8]) {
        store.begin_upload(id, &record(data), 8, || u64::MAX, |_| true, true).unwrap().unwrap().await.unwrap();
    }

    #[test]
    fn a_file_is_deleted_in_paced_cuts_and_a_missing_one_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let file = File::create(&path).unwrap();
        file.set_len(3 * DELETE_PIECE + 123).unwrap();
        drop(file);
        // 12 MiB and a bit at 16 MiB a second: about three quarters of a second.
        let started = std::time::Instant::now();
        assert!(remove_paced(&path, 4 * DELETE_PIECE, |_| true).unwrap());
        assert!(!path.exists());
        assert!(started.elapsed() >= std::time::Duration::from_millis(700), "{:?}", started.elapsed());
        // A small file costs only its share.
        std::fs::write(&path, b"x").unwrap();
        let started = std::time::Instant::now();
        remove_paced(&path, 1000, |_| true).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_millis(500), "{:?}", started.elapsed());
        remove_paced(&path, DELETE_BYTES_PER_SEC, |_| true).unwrap();
        std::fs::write(&path, b"").unwrap();
        remove_paced(&path, DELETE_BYTES_PER_SEC, |_| true).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn a_removed_file_leaves_its_place_at_once_and_counts_as_taken_until_freed() {
        let dir = tempfile::tempdir().unwrap();
        // A crash left 64 MiB in the trash (sparse): the next start counts it, then frees
        // it at `DELETE_BYTES_PER_SEC` (two seconds).
        std::fs::create_dir_all(dir.path().join("trash")).unwrap();
        File::create(dir.path().join("trash").join("left")).unwrap().set_len(64 << 20).unwrap();
        // Held while counting: a piece freed between two reads of the count made this
        // test fail under load.
        hold(dir.path(), true);
        let (_store, blobs) = open(dir.path());
        assert!(blobs.unfreed_bytes() >= 64 << 20, "{}", blobs.unfreed_bytes());
        let id = [7u8; 16];
        std::fs::write(blobs.partial(&id), vec![2u8; 1000]).unwrap();
        blobs.remove_partial(&id, None).unwrap();
        assert!(!blobs.partial(&id).exists());
        assert!(blobs.unfreed_bytes() >= (64 << 20) + 1000, "{}", blobs.unfreed_bytes());
        blobs.remove_partial(&id, None).unwrap();
        hold(dir.path(), false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::read_dir(dir.path().join("trash")).unwrap().next().is_some() || blobs.unfreed_bytes() > 0 {
            assert!(std::time::Instant::now() < deadline, "the trash was not emptied: {}", blobs.unfreed_bytes());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Trash dirs whose deleter waits (`hold`) before it empties them.
    static HELD: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

    /// Whether the deleter of `trash` is held.
    pub(super) fn held(trash: &Path) -> bool {
        HELD.lock().unwrap().iter().any(|t| t == trash)
    }

    /// Holds the deleter of the broker in `dir` (`true`) or lets it go.
    fn hold(dir: &Path, on: bool) {
        let trash = trash_dir(dir);
        let mut held = HELD.lock().unwrap();
        held.retain(|t| *t != trash);
        if on {
            held.push(trash);
        }
    }

    #[test]
    fn what_a_users_removals_leave_unfreed_is_charged_to_it_until_freed_and_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        hold(dir.path(), true);
        let (_store, blobs) = open(dir.path());
        // User 7's cancelled upload and a blob its collected file let go, user 8's
        // upload, and an orphan charged to nobody.
        let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
        File::create(blobs.partial(&a)).unwrap().set_len(40 << 20).unwrap();
        File::create(blobs.blob(&[9; 32])).unwrap().set_len(8 << 20).unwrap();
        std::fs::write(blobs.partial(&b), vec![1u8; 5000]).unwrap();
        std::fs::write(blobs.partial(&c), vec![1u8; 300]).unwrap();
        blobs.remove_partial(&a, Some(7)).unwrap();
        blobs.unlink(&[9; 32], Some(7)).unwrap();
        blobs.remove_partial(&b, Some(8)).unwrap();
        blobs.remove_partial(&c, None).unwrap();
        assert_eq!([7, 8, 9].map(|u| blobs.unfreed_of(u)), [48 << 20, 5000, 0]);
        assert_eq!(blobs.unfreed_bytes(), (48 << 20) + 5300);
        // A crash now: the next start charges them again, from their names.
        let again = Blobs::open(dir.path(), DELETE_BYTES_PER_SEC).unwrap();
        assert_eq!([7, 8, 9].map(|u| again.unfreed_of(u)), [48 << 20, 5000, 0]);
        drop(again);
        // Freed: nothing is owed.
        hold(dir.path(), false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while blobs.unfreed_bytes() > 0 || blobs.unfreed_of(7) > 0 || blobs.unfreed_of(8) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "not freed: {}, {}",
                blobs.unfreed_bytes(),
                blobs.unfreed_of(7)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // A charge taken ahead (`owe`) lasts as long as its guard.
        let owing = blobs.owe(8, 4096);
        assert_eq!(blobs.unfreed_of(8), 4096);
        drop(owing);
        assert_eq!(blobs.unfreed_of(8), 0);
        let names =
            ["00ab-u42-ff00", "00ab-ff00", "00ab-u-1", &trash_name(1, None, "u5-x"), &trash_name(2, Some(6), "u5-x")];
        assert_eq!(
            names.map(owner_in),
            [Some(42), None, None, None, Some(6)],
            "an original name never passes for an owner"
        );
    }

    #[test]
    fn one_users_big_deletions_do_not_hold_anothers_small_one_behind_them() {
        let dir = tempfile::tempdir().unwrap();
        hold(dir.path(), true);
        // 8 MiB a second: user 7's 48 MiB take six seconds; user 8's small file goes in
        // the second turn, whatever the order of the dir.
        let blobs = Blobs::open(dir.path(), 8 << 20).unwrap();
        for (i, id) in [[1u8; 16], [2; 16], [3; 16]].iter().enumerate() {
            File::create(blobs.partial(id)).unwrap().set_len(16 << 20).unwrap();
            blobs.remove_partial(id, Some(7)).unwrap();
            assert_eq!(blobs.unfreed_of(7), (i as u64 + 1) * (16 << 20));
        }
        std::fs::write(blobs.partial(&[4; 16]), vec![1u8; 1000]).unwrap();
        blobs.remove_partial(&[4; 16], Some(8)).unwrap();
        hold(dir.path(), false);
        let started = std::time::Instant::now();
        while blobs.unfreed_of(8) > 0 {
            assert!(started.elapsed() < std::time::Duration::from_secs(3), "user 8 waited behind user 7");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(blobs.unfreed_of(7) > 16 << 20, "{}", blobs.unfreed_of(7));
    }

    #[test]
    fn a_slow_delete_rate_never_holds_up_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        // Told to stop while it waits its turn: it stops within a slice, the rest kept.
        let path = dir.path().join("f");
        File::create(&path).unwrap().set_len(3 * DELETE_PIECE).unwrap();
        let started = std::time::Instant::now();
        let mut asked = 0;
        let gone = remove_paced(&path, 1024, |_| {
            asked += 1;
            asked < 3
        })
        .unwrap();
        assert!(!gone && started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * DELETE_PIECE);
        // A broker whose deleter frees 64 KiB a second (a 4 MiB cut waits a minute) closes
        // its files at once (at SIGTERM, the process then exits).
        std::fs::create_dir_all(dir.path().join("trash")).unwrap();
        File::create(dir.path().join("trash").join("0-n-left")).unwrap().set_len(3 * DELETE_PIECE).unwrap();
        let blobs = Blobs::open(dir.path(), 64 * 1024).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let started = std::time::Instant::now();
        drop(blobs);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn a_write_splits_into_an_unaligned_head_whole_blocks_and_a_tail() {
        const A: usize = DIRECT_ALIGN;
        assert_eq!(direct_span(0, 1 << 20), (0, 1 << 20), "an aligned chunk is all blocks");
        assert_eq!(direct_span(0, A - 1), (0, 0), "less than a block: all tail");
        assert_eq!(direct_span(1, 10), (10, 0), "inside one block: all head");
        assert_eq!(direct_span(1, A - 1), (A - 1, 0), "up to the boundary: all head");
        assert_eq!(direct_span(100, 3 * A), (A - 100, 2 * A), "head, two blocks, a tail of 100");
        assert_eq!(direct_span(A as u64 * 7, A + 5), (0, A), "aligned start, a tail of 5");
    }

    #[test]
    fn chunks_of_any_size_at_any_offset_store_exactly_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path(), DELETE_BYTES_PER_SEC).unwrap();
        let id = [7; 16];
        let data: Vec<u8> =
            (0..3 * 1024 * 1024 + 777u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        // Unaligned starts and ends, single bytes, exactly one block, a whole MiB.
        let sizes = [1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, 1 << 20, 12_345, 3, 1 << 20];
        let file = blobs.open_partial(&id, 0).unwrap();
        let mut at = 0;
        for len in sizes.iter().copied().cycle() {
            if at == data.len() {
                break;
            }
            let len = len.min(data.len() - at);
            file.write_chunk(at as u64, &data[at..at + len]).unwrap();
            at += len;
        }
        assert_eq!(std::fs::read(blobs.partial(&id)).unwrap(), data);
        // Rewriting a range with other boundaries (a client resending from its durable
        // offset) leaves the same bytes, whichever path each block took before.
        file.write_chunk(5, &data[5..DIRECT_ALIGN * 3 + 9]).unwrap();
        file.write_chunk(DIRECT_ALIGN as u64, &data[DIRECT_ALIGN..DIRECT_ALIGN * 2]).unwrap();
        assert_eq!(std::fs::read(blobs.partial(&id)).unwrap(), data);
        // Reopened at an unaligned offset (a resume), the file is cut there and goes on.
        let cut = 1_000_003;
        let file = blobs.open_partial(&id, cut as u64).unwrap();
        file.write_chunk(cut as u64, &data[cut..]).unwrap();
        assert_eq!(std::fs::read(blobs.partial(&id)).unwrap(), data);
        eprintln!("direct writes on this file system: {}", file.writes_directly());
    }

    #[tokio::test]
    async fn a_partial_file_is_cut_back_to_its_recorded_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blobs) = open(dir.path());
        let (id, data) = ([1; 16], b"0123456789".to_vec());
        begin(&store, &id, &data).await;
        let file = blobs.open_partial(&id, 0).unwrap();
        file.write_chunk(0, &data[..4]).unwrap();
        store.set_upload_offset(&id, 4, None).unwrap().unwrap().await.unwrap();
        // Written and synced, but the crash came before its offset was recorded.
        file.write_chunk(4, &data[4..8]).unwrap();
        assert_eq!(blobs.repair(&store).unwrap().checked, 1);
        assert_eq!(std::fs::read(blobs.partial(&id)).unwrap(), &data[..4]);
        assert_eq!(store.file(&id).unwrap().unwrap().offset(), 4);
        // A resumed upload's durable bytes are read back and hashed, piece by piece.
        let file = blobs.open_partial(&id, 4).unwrap();
        let mut hasher = blake3::Hasher::new();
        Blobs::hash_range(file.as_file(), &mut hasher, 0, 2).unwrap();
        Blobs::hash_range(file.as_file(), &mut hasher, 2, 4).unwrap();
        assert_eq!(hasher.finalize(), blake3::hash(&data[..4]));
    }

    #[tokio::test]
    async fn a_completion_cut_after_the_rename_finishes_and_one_cut_before_it_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blobs) = open(dir.path());
        let data = b"all of it".to_vec();
        let (renamed, not_yet) = ([1; 16], [2; 16]);
        for id in [renamed, not_yet] {
            begin(&store, &id, &data).await;
            let file = blobs.open_partial(&id, 0).unwrap();
            file.write_chunk(0, &data).unwrap();
            store.set_upload_offset(&id, data.len() as u64, None).unwrap().unwrap().await.unwrap();
        }
        // The crash came after the blob was in place, before the record said so.
        store.begin_publish(&renamed).unwrap().unwrap().await.unwrap();
        std::fs::rename(blobs.partial(&renamed), blobs.blob(&record(&data).blake3)).unwrap();
        // A blob of a file whose record never got written.
        std::fs::write(blobs.blob(&[9; 32]), b"orphan").unwrap();
        let repaired = blobs.repair(&store).unwrap();
        let done = store.file(&renamed).unwrap().unwrap();
        assert!(done.is_complete(), "published on disk: complete");
        let completed: Vec<_> = repaired.completed.into_iter().map(|(id, r)| (id, r.is_complete())).collect();
        assert_eq!(completed, vec![(renamed, true)], "reported, for what a completion does next");
        assert_eq!(store.blob_refs(&done.blake3).unwrap(), 1);
        assert_eq!(std::fs::read(blobs.blob(&done.blake3)).unwrap(), data);
        // The other still uploads at full size; its actor verifies it on start.
        assert_eq!(store.file(&not_yet).unwrap().unwrap().stage, FileStage::Uploading { offset: data.len() as u64 });
        assert!(blobs.partial(&not_yet).exists());
        assert!(!blobs.blob(&[9; 32]).exists(), "unreferenced blobs are deleted");
        // Files with no upload behind them go too.
        std::fs::write(blobs.partial(&[7; 16]), b"stray").unwrap();
        blobs.repair(&store).unwrap();
        assert!(!blobs.partial(&[7; 16]).exists());
        assert!(blobs.partial(&not_yet).exists());
    }

    async fn uploaded(store: &Store, blobs: &Blobs, id: &FileId, data: &[u8]) {
        begin(store, id, data).await;
        let file = blobs.open_partial(id, 0).unwrap();
        file.write_chunk(0, data).unwrap();
        store.set_upload_offset(id, data.len() as u64, None).unwrap().unwrap().await.unwrap();
    }

    #[tokio::test]
    async fn a_blob_collected_while_the_same_bytes_publish_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blobs) = open(dir.path());
        let data = b"the same bytes twice".to_vec();
        let hash = record(&data).blake3;
        let (first, second) = ([1; 16], [2; 16]);
        uploaded(&store, &blobs, &first, &data).await;
        store.begin_publish(&first).unwrap().unwrap().await.unwrap();
        blobs.publish(&store, &first, &hash, 7).unwrap().unwrap().1.await.unwrap();
        store.drop_hold(&first).unwrap().unwrap().await.unwrap();
        // The collection finds the blob unreferenced and makes that durable...
        let collected = store.collect_file(&first, 0).unwrap();
        assert_eq!(collected.unreferenced, vec![hash]);
        collected.durable.await.unwrap();
        // ...meanwhile an upload of the same bytes publishes onto the existing blob...
        uploaded(&store, &blobs, &second, &data).await;
        store.begin_publish(&second).unwrap().unwrap().await.unwrap();
        let (done, durable) = blobs.publish(&store, &second, &hash, 7).unwrap().unwrap();
        durable.await.unwrap();
        assert!(done.is_complete());
        // ...and the collection's unlink step leaves the bytes the new file refers to.
        assert!(!blobs.remove_unreferenced(&store, &hash, None).unwrap());
        assert_eq!(std::fs::read(blobs.blob(&hash)).unwrap(), data);
        assert!(!blobs.partial(&second).exists());
        // Once nothing refers to it, it goes.
        store.drop_hold(&second).unwrap().unwrap().await.unwrap();
        let collected = store.collect_file(&second, 0).unwrap();
        collected.durable.await.unwrap();
        assert!(blobs.remove_unreferenced(&store, &hash, None).unwrap());
        assert!(!blobs.blob(&hash).exists());
    }

    /// The deleter syncs the trash and the directories its files came from before it
    /// cuts any of them (before, a cut could reach the disk ahead of the move).
    #[test]
    fn the_trash_is_synced_with_where_its_files_came_from_before_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (trash, source) = (dir.path().join("trash"), dir.path().join("blobs"));
        for d in [&trash, &source] {
            std::fs::create_dir(d).unwrap();
        }
        let path = trash.join(trash_name(1, None, "gone"));
        std::fs::write(&path, vec![1u8; 2 * DELETE_PIECE as usize]).unwrap();
        SYNCED_DIRS.with(|synced| synced.borrow_mut().clear());
        empty(&trash, std::slice::from_ref(&source), u64::MAX, &Counts::default()).unwrap();
        assert!(!path.exists());
        let trace = SYNCED_DIRS.with(|synced| synced.borrow().clone());
        assert_eq!(trace, vec![trash, source, path.clone(), path], "both synced once, then two cuts");
    }

    /// Publishing onto a blob that is there already syncs `blobs/` too, and a blob cut
    /// short is replaced by the verified partial file rather than adopted. Before, the
    /// first published with only `uploads/` synced, and the second onto the short blob.
    #[tokio::test]
    async fn publishing_onto_an_existing_blob_syncs_it_and_a_short_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blobs) = open(dir.path());
        let data = b"bytes whose blob is there already".to_vec();
        let hash = record(&data).blake3;
        for (id, blob) in [([1; 16], data.clone()), ([2; 16], data[..10].to_vec())] {
            std::fs::write(blobs.blob(&hash), &blob).unwrap();
            uploaded(&store, &blobs, &id, &data).await;
            store.begin_publish(&id).unwrap().unwrap().await.unwrap();
            SYNCED_DIRS.with(|synced| synced.borrow_mut().clear());
            let (done, durable) = blobs.publish(&store, &id, &hash, 7).unwrap().unwrap();
            durable.await.unwrap();
            assert!(done.is_complete());
            let synced = SYNCED_DIRS.with(|synced| synced.borrow().clone());
            assert!(synced.contains(&blobs.blobs) && synced.contains(&blobs.uploads), "{synced:?}");
            assert_eq!(std::fs::read(blobs.blob(&hash)).unwrap(), data, "the blob holds the whole file");
            assert!(!blobs.partial(&id).exists());
        }
    }

    /// An upload left publishing whose partial file is gone and whose blob is there but
    /// cut short starts over: before, the short blob was taken for its bytes and the
    /// file recorded complete on it.
    #[tokio::test]
    async fn a_publishing_upload_with_only_a_short_blob_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let (store, blobs) = open(dir.path());
        let data = b"bytes whose blob came back cut short".to_vec();
        let (id, hash) = ([3; 16], record(&data).blake3);
        uploaded(&store, &blobs, &id, &data).await;
        store.begin_publish(&id).unwrap().unwrap().await.unwrap();
        std::fs::remove_file(blobs.partial(&id)).unwrap();
        std::fs::write(blobs.blob(&hash), &data[..7]).unwrap();
        let finished = blobs.finish_publishing(&store, &id, &hash, 7).unwrap();
        assert!(!matches!(finished, Finished::Completed(..)), "completed on a short blob");
        assert_eq!(store.file(&id).unwrap().unwrap().stage, FileStage::Uploading { offset: 0 });
    }

    #[tokio::test]
    async fn an_upload_that_lost_its_partial_file_starts_over_even_when_its_blob_exists() {
        // The attack: learn a victim's hash and size, upload garbage to full size under
        // that hash, and crash the broker after the partial file went but before the
        // removal (hash mismatch, cancel) was durable.
        let dir = tempfile::tempdir().unwrap();
        let (store, blobs) = open(dir.path());
        let secret = b"the victim's secret bytes".to_vec();
        let (victim, attacker) = ([1; 16], [2; 16]);
        uploaded(&store, &blobs, &victim, &secret).await;
        store.begin_publish(&victim).unwrap().unwrap().await.unwrap();
        blobs.publish(&store, &victim, &record(&secret).blake3, 7).unwrap().unwrap().1.await.unwrap();
        uploaded(&store, &blobs, &attacker, &secret).await;
        let garbage = vec![b'x'; secret.len()];
        blobs.open_partial(&attacker, secret.len() as u64).unwrap().write_chunk(0, &garbage).unwrap();
        std::fs::remove_file(blobs.partial(&attacker)).unwrap();
        blobs.repair(&store).unwrap();
        let record = store.file(&attacker).unwrap().unwrap();
        assert_eq!(record.stage, FileStage::Uploading { offset: 0 }, "never verified: it starts over");
        assert_eq!(std::fs::metadata(blobs.partial(&attacker)).unwrap().len(), 0);
        assert_eq!(store.blob_refs(&record.blake3).unwrap(), 1, "only the victim's file refers to the blob");
        assert_eq!(std::fs::read(blobs.blob(&record.blake3)).unwrap(), secret);
    }
}
