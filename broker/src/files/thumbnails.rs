//! Which completed images get a thumbnail made, and when (`thumbnail.rs` makes one).
//!
//! A thumbnail costs the broker a whole decode, and what a decode costs is up to the
//! image, not to its size on the wire: a solid-colour PNG declaring 8000 x 6000 pixels
//! is 150 KB and takes about 0.17 s of CPU and 190 MB to decode (an attacker review
//! measured 20 times the CPU of receiving random bytes of that size, and 335 MB peak
//! RSS, with 50 such uploads). So:
//! - **The same bytes are decoded once.** Files are content-addressed and anyone may
//!   upload bytes that exist already; the outcome of each recent image (the thumbnail's
//!   BLAKE3, or that it had none) is kept by the image's BLAKE3 (`OUTCOMES_KEPT`), and a
//!   file whose bytes were seen gets that thumbnail's blob again, or none, without a
//!   decode.
//! - **Images wait in a bounded line.** At most `QUEUED_PER_USER` of one uploader's and
//!   `QUEUED_MAX` of all are waiting for or in a decode; an image beyond either gets no
//!   thumbnail (the file itself is published as always) and the operator is told
//!   (`skipped`, the metrics). Once the line is half full, only an uploader with no
//!   image in it gets a place: a few accounts keeping slow-to-decode images coming
//!   could otherwise hold every place, and everyone else's images went without a
//!   thumbnail (an attacker review: 16 accounts sufficed; now the second half takes as
//!   many accounts as places). Decodes run one at a time (`MAX_CONCURRENT_DECODES`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use switchboard_protocol::{Blake3, FileId, UserId};
use switchboard_storage::FileRecord;

use super::{announce, blobs, requests, thumbnail};
use crate::Shared;
use crate::background::BackgroundThreads;
use crate::limits::PerUser;
use crate::metrics::Tally;
use switchboard_protocol::limits::charged_bytes;

/// Images one uploader may have waiting for or in a decode while the line is under half
/// full (one past it: `Line::enter`).
pub(crate) const QUEUED_PER_USER: usize = 8;
/// Images waiting for or in a decode, over all uploaders.
pub(crate) const QUEUED_MAX: usize = 128;
/// Outcomes remembered by image BLAKE3 (64 bytes each with the order: 256 KiB at most).
pub(crate) const OUTCOMES_KEPT: usize = 4096;
/// A thumbnail takes at most this many times the quota its image was charged
/// (`charged_bytes`: whole 4 KiB blocks), else the image gets none: thumbnails are not
/// charged, so a quota of images holds at most this many times more on the disk. A
/// 256 px PNG of a photo is 60-190 KB, so a well-compressed 30 KB WebP sticker or JPEG
/// still gets one (at the size of the image, as a review found, it did not).
pub(crate) const THUMBNAIL_PER_CHARGED: u64 = 4;
/// Files larger than this get no thumbnail: the whole file is read into memory first.
const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Images read whole into memory at once: a read's bytes are held until its decode ends,
/// so this bounds them with the decodes.
static READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(thumbnail::MAX_CONCURRENT_DECODES);

/// What became of an image's thumbnail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Made: the thumbnail's BLAKE3 (its blob, while some file holds it).
    Made(Blake3),
    /// The image could not be thumbnailed (corrupt, too large, a bomb).
    None,
}

/// The line of images and what became of recent ones. No I/O.
#[derive(Default)]
pub(crate) struct Line {
    queued: PerUser,
    total: usize,
    outcomes: HashMap<Blake3, Outcome>,
    /// `outcomes`' keys, oldest first.
    order: VecDeque<Blake3>,
}

impl Line {
    /// A place in the line for `user`'s image, if both bounds allow: `QUEUED_PER_USER`
    /// each while the line is under half full, one each past it.
    pub(crate) fn enter(&mut self, user: UserId) -> bool {
        let share = if self.total >= QUEUED_MAX / 2 { 1 } else { QUEUED_PER_USER };
        if self.total >= QUEUED_MAX || !self.queued.take(user, share) {
            return false;
        }
        self.total += 1;
        true
    }

    /// Gives back a place `enter` gave.
    pub(crate) fn leave(&mut self, user: UserId) {
        self.queued.give_back(user);
        self.total -= 1;
    }

    /// What became of the image with these bytes, if it was seen lately.
    pub(crate) fn outcome(&self, image: &Blake3) -> Option<Outcome> {
        self.outcomes.get(image).copied()
    }

    /// Remembers what became of an image, forgetting the oldest beyond `OUTCOMES_KEPT`.
    pub(crate) fn remember(&mut self, image: Blake3, outcome: Outcome) {
        if self.outcomes.insert(image, outcome).is_none() {
            self.order.push_back(image);
            while self.order.len() > OUTCOMES_KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.outcomes.remove(&old);
                }
            }
        }
    }
}

/// The broker's thumbnail line (in `Files`).
#[derive(Default)]
pub struct Thumbnails {
    line: Mutex<Line>,
    /// Images that got no thumbnail because the line was full.
    pub skipped: Tally,
    /// Images decoded.
    pub decoded: std::sync::atomic::AtomicU64,
    /// Images given the thumbnail of the same bytes seen before, without a decode.
    pub reused: std::sync::atomic::AtomicU64,
    /// The thread that decodes (`sb-thumbnail`, one per `MAX_CONCURRENT_DECODES`);
    /// `None` only in tests of the line.
    decoders: Option<BackgroundThreads>,
}

impl Thumbnails {
    /// The broker's thumbnails, decoded on a thread of their own, under `SCHED_IDLE` if
    /// `idle` (`BackgroundThreads`).
    ///
    /// # Errors
    /// The OS refused the thread.
    pub fn start(idle: bool) -> std::io::Result<Thumbnails> {
        let decoders = BackgroundThreads::start("sb-thumbnail", thumbnail::MAX_CONCURRENT_DECODES, idle)?;
        Ok(Thumbnails { decoders: Some(decoders), ..Thumbnails::default() })
    }

    /// Whether what became of the image with this BLAKE3 is remembered (its next upload
    /// costs no decode).
    pub fn remembers(&self, image: &Blake3) -> bool {
        self.line().outcome(image).is_some()
    }

    /// What became of the image with this BLAKE3, if remembered: whether it got a
    /// thumbnail made.
    pub fn made(&self, image: &Blake3) -> Option<bool> {
        self.line().outcome(image).map(|o| matches!(o, Outcome::Made(_)))
    }

    fn line(&self) -> std::sync::MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The place `enter` gave, given back when dropped.
struct Place<'a>(&'a Thumbnails, UserId);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.line().leave(self.1);
    }
}

/// Gives the complete image `id` its thumbnail, then announces it with `Event::File`: the
/// one of the same bytes seen lately, or one made now if the line has room. A file whose
/// thumbnail fails (corrupt, too large, a bomb) or finds the line full stays published
/// without one.
pub(crate) async fn make_thumbnail(shared: Arc<Shared>, id: FileId, record: FileRecord) {
    if record.size > MAX_FILE_BYTES {
        return;
    }
    let thumbnails = &shared.files.thumbnails;
    if !thumbnails.line().enter(record.uploader) {
        if let Some(images) = thumbnails.skipped.count(crate::now_ms()) {
            tracing::warn!(
                images,
                queued_per_user = QUEUED_PER_USER,
                queued_max = QUEUED_MAX,
                "images published without a thumbnail (too many waiting for a decode) since the last warning"
            );
        }
        return;
    }
    let place = Place(thumbnails, record.uploader);
    let png = match png_for(&shared, &id, &record).await {
        Some(png) => png,
        None => return,
    };
    drop(place);
    store(&shared, id, &record, png).await;
}

/// The thumbnail's PNG: the stored one of the same bytes, else a decode's (remembered).
async fn png_for(shared: &Shared, id: &FileId, record: &FileRecord) -> Option<bytes::Bytes> {
    use std::sync::atomic::Ordering::Relaxed;
    let thumbnails = &shared.files.thumbnails;
    let known = thumbnails.line().outcome(&record.blake3);
    match known {
        Some(Outcome::None) => return None,
        Some(Outcome::Made(hash)) => {
            // Gone if no file holds that thumbnail any more: then it is made again.
            if let Ok(png) = tokio::fs::read(shared.files.blobs.blob(&hash)).await
                && blake3::hash(&png).as_bytes() == &hash
            {
                thumbnails.reused.fetch_add(1, Relaxed);
                return Some(png.into());
            }
        }
        None => {}
    }
    let decoders = thumbnails.decoders.as_ref()?;
    let Ok(_reading) = READS.acquire().await else { return None };
    let path = shared.files.blobs.blob(&record.blake3);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => bytes::Bytes::from(b),
        Err(e) => {
            tracing::warn!(file = blobs::hex(id), error = %e, "reading an image for its thumbnail failed");
            return None;
        }
    };
    thumbnails.decoded.fetch_add(1, Relaxed);
    match thumbnail::make(bytes, thumbnail::ThumbnailLimits::default(), decoders).await {
        // Thumbnails are not charged to the quota, so each may take at most
        // `THUMBNAIL_PER_CHARGED` times what its image was charged (before, 4 KiB images
        // each stored a PNG of up to 256 KiB: a quota filled with them held up to 64
        // times its size on the disk; an attacker review). A small image past it shows
        // as it is.
        Ok(png) if png.len() as u64 > THUMBNAIL_PER_CHARGED * charged_bytes(record.size) => {
            tracing::debug!(
                file = blobs::hex(id),
                png = png.len(),
                image = record.size,
                "no thumbnail: too large for its image"
            );
            thumbnails.line().remember(record.blake3, Outcome::None);
            None
        }
        Ok(png) => {
            thumbnails.line().remember(record.blake3, Outcome::Made(*blake3::hash(&png).as_bytes()));
            Some(png.into())
        }
        Err(e) => {
            if said_by_the_bytes(&e) {
                thumbnails.line().remember(record.blake3, Outcome::None);
            }
            tracing::info!(file = blobs::hex(id), error = %e, "no thumbnail");
            None
        }
    }
}

/// Whether a failed thumbnail is the image's own doing, so the same bytes would fail
/// again (remembered): not a busy slot or a timeout, which count the wait for the slot
/// and say nothing about the image (remembering them would deny those bytes a
/// thumbnail for good).
fn said_by_the_bytes(e: &thumbnail::ThumbnailError) -> bool {
    use thumbnail::ThumbnailError::{Corrupt, TooLarge, Unsupported};
    matches!(e, Unsupported | TooLarge | Corrupt)
}

/// Stores `png` as the thumbnail of `id` and announces it.
async fn store(shared: &Arc<Shared>, id: FileId, record: &FileRecord, png: bytes::Bytes) {
    let hash = *blake3::hash(&png).as_bytes();
    let Ok(thumb_id) = requests::random_file_id() else { return };
    let mut name = format!("{}.thumb.png", record.name);
    while name.len() > switchboard_protocol::limits::MAX_FILE_NAME_BYTES as usize {
        name.remove(0);
    }
    let thumb = FileRecord {
        name,
        size: png.len() as u64,
        declared_type: "image/png".into(),
        content_type: "image/png".into(),
        blake3: hash,
        uploader: record.uploader,
        created_ms: crate::now_ms(),
        expires_ms: 0,
        stage: switchboard_storage::FileStage::Complete { thumbnail: None },
        parent: Some(id),
        held: false,
    };
    let s = shared.clone();
    let stored = tokio::task::spawn_blocking(move || {
        // Within the disk reserve, like an upload's begin (before, thumbnails were written
        // into it): best effort, so none then.
        if !requests::disk_room(&s, s.store.promised_bytes(), thumb.size) {
            tracing::warn!(file = blobs::hex(&id), "no thumbnail: the disk is within its reserve");
            return Ok(None);
        }
        // The file may have gone meanwhile: then so does its thumbnail's blob.
        let added = s.files.blobs.store_thumbnail(&s.store, &id, &thumb_id, &thumb, &png)?;
        Ok::<_, String>(added.map(|(_, durable)| (durable, thumb)))
    })
    .await;
    let (durable, thumb) = match stored {
        Ok(Ok(Some(added))) => added,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return tracing::warn!(file = blobs::hex(&id), error = %e, "storing a thumbnail failed"),
        Err(e) => return tracing::warn!(file = blobs::hex(&id), error = %e, "storing a thumbnail failed"),
    };
    if durable.await.is_err() {
        return;
    }
    let thumbnail = Some(requests::file_ref(&thumb_id, &thumb));
    let state = switchboard_protocol::FileState::Complete { thumbnail };
    announce::announce(shared, &id, record.uploader, record.size, state);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Images decode under `SCHED_IDLE` when the runtime runs under `SCHED_BATCH` (so any
    /// broker thread woken on the decoder's core preempts it), else under the broker's
    /// own policy; before, on the blocking pool under the runtime's.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn images_decode_below_the_message_path_under_batch() {
        let started_as = crate::sched::kernel_policy_of_this_thread();
        for (idle, expected) in [(true, libc::SCHED_IDLE), (false, started_as)] {
            let thumbnails = Thumbnails::start(idle).unwrap();
            let decoders = thumbnails.decoders.as_ref().unwrap();
            assert_eq!(decoders.run(crate::sched::kernel_policy_of_this_thread).await.unwrap(), expected);
        }
    }

    #[test]
    fn the_line_holds_a_share_per_uploader_and_a_bound_in_all() {
        let mut line = Line::default();
        for _ in 0..QUEUED_PER_USER {
            assert!(line.enter(1));
        }
        assert!(!line.enter(1), "past one uploader's share");
        assert!(line.enter(2), "another uploader still gets in");
        line.leave(1);
        assert!(line.enter(1), "a place given back is taken again");
        let mut n = 0;
        while line.total < QUEUED_MAX / 2 {
            assert!(line.enter(100 + n / QUEUED_PER_USER as UserId), "under half full: each its share");
            n += 1;
        }
        // Past half: one place each, for uploaders with none.
        assert!(!line.enter(2), "one held already");
        for user in 1000.. {
            if !line.enter(user) {
                break;
            }
            assert!(!line.enter(user), "one each");
        }
        assert_eq!(line.total, QUEUED_MAX);
        assert!(!line.enter(1_000_000), "a newcomer too, once the line is full");
    }

    #[test]
    fn only_what_the_bytes_decide_is_remembered() {
        use thumbnail::ThumbnailError::{Busy, Corrupt, TimedOut, TooLarge, Unsupported};
        assert!([Unsupported, TooLarge, Corrupt].iter().all(said_by_the_bytes));
        assert!(![Busy, TimedOut].iter().any(said_by_the_bytes), "a wait says nothing about the image");
    }

    #[test]
    fn outcomes_are_kept_for_the_most_recent_images() {
        let mut line = Line::default();
        let image = |n: u32| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&n.to_be_bytes());
            h
        };
        line.remember(image(0), Outcome::None);
        line.remember(image(1), Outcome::Made([9; 32]));
        assert_eq!(line.outcome(&image(0)), Some(Outcome::None));
        assert_eq!(line.outcome(&image(1)), Some(Outcome::Made([9; 32])));
        assert_eq!(line.outcome(&image(2)), None);
        for n in 2..OUTCOMES_KEPT as u32 + 1 {
            line.remember(image(n), Outcome::None);
        }
        assert_eq!(line.outcomes.len(), OUTCOMES_KEPT);
        assert_eq!(line.outcome(&image(0)), None, "the oldest went first");
        assert_eq!(line.outcome(&image(1)), Some(Outcome::Made([9; 32])));
        // Remembering an image again keeps one entry.
        line.remember(image(1), Outcome::Made([9; 32]));
        assert_eq!((line.outcomes.len(), line.order.len()), (OUTCOMES_KEPT, OUTCOMES_KEPT));
    }
}
