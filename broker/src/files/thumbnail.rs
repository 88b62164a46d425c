//! Thumbnails (PROTOCOL.md section 12): a PNG at most 256 px on its long side of a
//! complete PNG, JPEG, GIF (first frame) or WebP file.
//!
//! Images come from strangers, so decoding is bounded on every axis:
//! - **Threads:** decoding runs on a thread of its own (`BackgroundThreads`), never on
//!   the runtime threads that carry chat; when those run under `SCHED_BATCH` it runs
//!   under `SCHED_IDLE`, and any broker thread woken on its core preempts it (on tokio's
//!   blocking pool it ran at the runtime's own policy: one decode took a core from the
//!   chat at equal weight).
//! - **Pixels and memory:** the header's dimensions are read and checked against
//!   `max_input_pixels`, and the decoded size against `max_alloc_bytes`, before any pixel
//!   is decoded; the `image` crate's `Limits` (`max_alloc`, per-side maximums) make the
//!   decoders refuse larger allocations of their own. This
//!   is what bounds the work: a decompression bomb declares its size in the header and
//!   fails there, without allocating.
//! - **Time:** the caller waits at most `timeout` for a slot and the result together. A
//!   thread cannot be killed, so a decode that times out after it began runs on until it
//!   ends (bounded by the pixel and memory limits) and keeps its slot until then; one that
//!   had not begun is dropped unrun when its thread takes it, giving its slot back.
//! - **Concurrency:** at most `MAX_CONCURRENT_DECODES` decodes run at once, broker-wide;
//!   a caller that finds them all busy for its whole timeout gets `Busy`.

// The upload actor calls `make` after a file completes.

use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::background::{BackgroundThreads, JobLost};

/// Decodes running at once, broker-wide: one, so that on a two-core machine thumbnails
/// never take more than one core from chat (two took both: an attacker review measured
/// it), and thumbnail memory is bounded by one `max_alloc_bytes`.
pub(crate) const MAX_CONCURRENT_DECODES: usize = 1;

/// The slots of `MAX_CONCURRENT_DECODES`.
static DECODES: Semaphore = Semaphore::const_new(MAX_CONCURRENT_DECODES);

/// Whether the broker makes thumbnails of files of this content type (as published, that
/// is after the type check: lowercase without parameters).
pub(crate) fn is_thumbnailable(content_type: &str) -> bool {
    matches!(content_type, "image/png" | "image/jpeg" | "image/gif" | "image/webp")
}

/// The bounds of one thumbnail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThumbnailLimits {
    /// The longest side of a thumbnail, in pixels. Smaller images keep their size.
    pub max_side_px: u32,
    /// The most pixels (width x height) an input may declare.
    pub max_input_pixels: u64,
    /// The most bytes the decoder may hold at once (`image::Limits::max_alloc`).
    pub max_alloc_bytes: u64,
    /// How long the caller waits for a decode slot and the result, together.
    pub timeout: Duration,
}

impl Default for ThumbnailLimits {
    /// - `max_side_px` 256: PROTOCOL.md section 12.
    /// - `max_input_pixels` 50 million: full-resolution photos of 48-50 MP phone and
    ///   camera sensors (8160 x 6120 = 49.9 M) still get thumbnails; larger inputs are
    ///   rare and cost more than a thumbnail is worth.
    /// - `max_alloc_bytes` 256 MiB: 50 M pixels of 8-bit RGBA (200 MB), the largest
    ///   decode allowed; 16-bit images that large fail. With one decode at a time,
    ///   thumbnails hold at most 256 MiB.
    /// - `timeout` 20 s: decoding a 50 MP JPEG takes about 1 s optimized and about 10 s
    ///   in a debug build; the limit only ends the wait, see the module doc.
    fn default() -> Self {
        ThumbnailLimits {
            max_side_px: 256,
            max_input_pixels: 50_000_000,
            max_alloc_bytes: 256 * 1024 * 1024,
            timeout: Duration::from_secs(20),
        }
    }
}

/// Why an image got no thumbnail. Only that thumbnail fails; the file stays published.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ThumbnailError {
    /// The bytes are none of PNG, JPEG, GIF and WebP, or a variant of them the decoder
    /// does not support.
    #[error("not an image format the broker makes thumbnails of")]
    Unsupported,
    /// The image declares more pixels, or needs more memory, than the limits allow.
    #[error("the image is larger than thumbnails allow")]
    TooLarge,
    /// The bytes are not a valid image of their format (truncated, bad data).
    #[error("the image is corrupt")]
    Corrupt,
    /// The decode did not finish within the timeout.
    #[error("decoding the image took too long")]
    TimedOut,
    /// Every decode slot stayed busy for the whole timeout.
    #[error("too many thumbnails in progress")]
    Busy,
}

/// Makes the thumbnail of `bytes` (a whole image file): PNG bytes of the image scaled to
/// at most `limits.max_side_px` on its long side, aspect kept, never enlarged.
///
/// # Errors
/// `Unsupported`, `TooLarge` and `Corrupt` as the bytes are; `Busy` when no decode slot
/// frees within `limits.timeout`; `TimedOut` when the decode does not end within it.
pub(crate) async fn make(
    bytes: Bytes,
    limits: ThumbnailLimits,
    decoders: &BackgroundThreads,
) -> Result<Vec<u8>, ThumbnailError> {
    bounded(&DECODES, decoders, limits.timeout, move || thumbnail(&bytes, &limits)).await?
}

/// Runs `work` on one of `threads` once a slot of `slots` (at most as many as the
/// threads) is free, waiting at most `timeout` for the slot and the result together. The
/// slot is held until `work` ends, even after the caller stopped waiting.
async fn bounded<T: Send + 'static>(
    slots: &'static Semaphore,
    threads: &BackgroundThreads,
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ThumbnailError> {
    let deadline = Instant::now() + timeout;
    let permit = match tokio::time::timeout_at(deadline, slots.acquire()).await {
        Ok(Ok(permit)) => permit,
        // The semaphore is never closed; a closed one has no slot to give either.
        Ok(Err(_)) | Err(_) => return Err(ThumbnailError::Busy),
    };
    let task = threads.run(move || {
        let _slot = permit;
        work()
    });
    match tokio::time::timeout_at(deadline, task).await {
        Ok(Ok(result)) => Ok(result),
        // A panic in a decoder is a bug in it triggered by these bytes.
        Ok(Err(JobLost::Panicked)) => Err(ThumbnailError::Corrupt),
        // More slots than threads, or threads gone: no decode could run.
        Ok(Err(JobLost::Full | JobLost::Stopped)) => Err(ThumbnailError::Busy),
        Err(_) => Err(ThumbnailError::TimedOut),
    }
}

/// The blocking part of `make`.
fn thumbnail(bytes: &[u8], limits: &ThumbnailLimits) -> Result<Vec<u8>, ThumbnailError> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|_| ThumbnailError::Corrupt)?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::Gif | ImageFormat::WebP) => {}
        _ => return Err(ThumbnailError::Unsupported),
    }
    let side = u32::try_from(limits.max_input_pixels).unwrap_or(u32::MAX);
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(side);
    decoder_limits.max_image_height = Some(side);
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(decoder_limits);
    // Reads the header only; the limits are checked here, before any pixel is decoded.
    let decoder = reader.into_decoder().map_err(error)?;
    let (width, height) = decoder.dimensions();
    // Not every decoder counts its output buffer against `max_alloc`: check it here too.
    if u64::from(width) * u64::from(height) > limits.max_input_pixels || decoder.total_bytes() > limits.max_alloc_bytes
    {
        return Err(ThumbnailError::TooLarge);
    }
    let image = DynamicImage::from_decoder(decoder).map_err(error)?;
    let (thumb_width, thumb_height) = fit(width, height, limits.max_side_px);
    let thumb = image.thumbnail_exact(thumb_width, thumb_height);
    // 8 bits per channel whatever the input: PNG holds them all and thumbnails stay small.
    let thumb = if thumb.color().has_alpha() {
        DynamicImage::ImageRgba8(thumb.into_rgba8())
    } else {
        DynamicImage::ImageRgb8(thumb.into_rgb8())
    };
    let mut png = Vec::new();
    // Encoding an in-memory 8-bit image to a Vec fails only on a bug.
    thumb.write_to(Cursor::new(&mut png), ImageFormat::Png).map_err(|_| ThumbnailError::Corrupt)?;
    Ok(png)
}

/// The size of a `width` x `height` image scaled to at most `max_side` on its long side,
/// aspect kept (rounded, at least 1 px), never enlarged.
fn fit(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= max_side {
        return (width, height);
    }
    let scale = |side: u32| ((u64::from(side) * u64::from(max_side) + u64::from(long) / 2) / u64::from(long)).max(1);
    // `scale(side) <= max_side` because `side <= long`.
    (u32::try_from(scale(width)).unwrap_or(max_side), u32::try_from(scale(height)).unwrap_or(max_side))
}

/// Maps the `image` crate's errors.
fn error(error: ImageError) -> ThumbnailError {
    match error {
        ImageError::Limits(_) => ThumbnailError::TooLarge,
        ImageError::Unsupported(_) => ThumbnailError::Unsupported,
        // The bytes are in memory: an I/O error is a truncated file.
        ImageError::Decoding(_) | ImageError::IoError(_) | ImageError::Parameter(_) | ImageError::Encoding(_) => {
            ThumbnailError::Corrupt
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use image::{RgbImage, RgbaImage};

    use super::*;

    /// A `width` x `height` gradient, so that scaling has something to average.
    fn picture(width: u32, height: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        }))
    }

    fn encode(image: &DynamicImage, format: ImageFormat) -> Bytes {
        let mut out = Vec::new();
        image.write_to(Cursor::new(&mut out), format).expect("encoding a test image");
        Bytes::from(out)
    }

    /// The format and size of a thumbnail.
    fn decoded(png: &[u8]) -> (ImageFormat, u32, u32) {
        let format = image::guess_format(png).expect("a thumbnail has a known format");
        let image = image::load_from_memory(png).expect("a thumbnail decodes");
        (format, image.width(), image.height())
    }

    /// `make` without the thumbnail's bytes, for readable assertion failures.
    async fn outcome(bytes: Bytes, limits: ThumbnailLimits) -> Result<(), ThumbnailError> {
        make(bytes, limits, decoders()).await.map(|_| ())
    }

    #[test]
    fn thumbnailable_types() {
        for yes in ["image/png", "image/jpeg", "image/gif", "image/webp"] {
            assert!(is_thumbnailable(yes), "{yes}");
        }
        for no in ["image/svg+xml", "image/tiff", "application/pdf", "IMAGE/PNG"] {
            assert!(!is_thumbnailable(no), "{no}");
        }
    }

    #[test]
    fn fit_keeps_aspect_and_never_enlarges() {
        assert_eq!(fit(1000, 500, 256), (256, 128));
        assert_eq!(fit(500, 1000, 256), (128, 256));
        assert_eq!(fit(256, 256, 256), (256, 256));
        assert_eq!(fit(100, 50, 256), (100, 50));
        assert_eq!(fit(100_000, 1, 256), (256, 1));
        assert_eq!(fit(1000, 333, 256), (256, 85));
    }

    #[tokio::test]
    async fn a_large_png_becomes_a_256_px_png() {
        let png = encode(&picture(1000, 500), ImageFormat::Png);
        let thumb = make(png, ThumbnailLimits::default(), decoders()).await.expect("thumbnail");
        assert_eq!(decoded(&thumb), (ImageFormat::Png, 256, 128));
    }

    #[tokio::test]
    async fn a_small_image_is_not_enlarged() {
        let png = encode(&picture(100, 50), ImageFormat::Png);
        let thumb = make(png, ThumbnailLimits::default(), decoders()).await.expect("thumbnail");
        assert_eq!(decoded(&thumb), (ImageFormat::Png, 100, 50));
    }

    #[tokio::test]
    async fn jpeg_gif_and_webp_inputs_become_pngs() {
        for format in [ImageFormat::Jpeg, ImageFormat::Gif, ImageFormat::WebP] {
            let input = encode(&picture(300, 450), format);
            let thumb =
                make(input, ThumbnailLimits::default(), decoders()).await.unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(decoded(&thumb), (ImageFormat::Png, 171, 256), "{format:?}");
        }
    }

    #[tokio::test]
    async fn an_animated_gif_gives_its_first_frame() {
        let red = RgbaImage::from_pixel(40, 20, image::Rgba([255, 0, 0, 255]));
        let blue = RgbaImage::from_pixel(40, 20, image::Rgba([0, 0, 255, 255]));
        let mut gif = Vec::new();
        {
            let mut encoder = image::codecs::gif::GifEncoder::new(&mut gif);
            let frames = [red, blue].into_iter().map(image::Frame::new);
            encoder.encode_frames(frames).expect("encoding a test gif");
        }
        let thumb = make(Bytes::from(gif), ThumbnailLimits::default(), decoders()).await.expect("thumbnail");
        let first = image::load_from_memory(&thumb).expect("decodes").into_rgba8();
        assert_eq!(first.dimensions(), (40, 20));
        assert_eq!(first.get_pixel(20, 10).0, [255, 0, 0, 255]);
    }

    #[tokio::test]
    async fn transparency_is_kept() {
        let image = DynamicImage::ImageRgba8(RgbaImage::from_pixel(512, 512, image::Rgba([10, 20, 30, 0])));
        let thumb =
            make(encode(&image, ImageFormat::Png), ThumbnailLimits::default(), decoders()).await.expect("thumbnail");
        let thumb = image::load_from_memory(&thumb).expect("decodes");
        assert!(thumb.color().has_alpha());
        assert_eq!(thumb.into_rgba8().get_pixel(0, 0).0[3], 0);
    }

    /// CRC-32 (ISO-HDLC) as PNG chunks use it.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for byte in bytes {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// A tiny real PNG whose header declares `width` x `height` (IHDR rewritten with a
    /// valid CRC; the pixel data is that of a 1x1 image).
    fn png_declaring(width: u32, height: u32) -> Bytes {
        let mut png = encode(&picture(1, 1), ImageFormat::Png).to_vec();
        // Signature (8), IHDR length (4), "IHDR" (4), width, height, ...
        png[16..20].copy_from_slice(&width.to_be_bytes());
        png[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        Bytes::from(png)
    }

    #[test]
    fn the_crafted_png_is_valid_apart_from_its_size() {
        let png = png_declaring(1, 1);
        assert_eq!(image::load_from_memory(&png).expect("a 1x1 png").width(), 1);
    }

    #[tokio::test]
    async fn decompression_bombs_fail_before_decoding() {
        let bomb = png_declaring(100_000, 100_000);
        assert_eq!(bomb.len(), encode(&picture(1, 1), ImageFormat::Png).len());
        assert_eq!(outcome(bomb, ThumbnailLimits::default()).await, Err(ThumbnailError::TooLarge));

        // GIF: the logical screen, bytes 6..10, little-endian.
        let mut gif = encode(&picture(2, 2), ImageFormat::Gif).to_vec();
        gif[6..10].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(outcome(Bytes::from(gif), ThumbnailLimits::default()).await, Err(ThumbnailError::TooLarge));

        // JPEG: height and width in the start-of-frame segment (FFC0), big-endian.
        let mut jpeg = encode(&picture(16, 16), ImageFormat::Jpeg).to_vec();
        let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).expect("a baseline jpeg has SOF0");
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(outcome(Bytes::from(jpeg), ThumbnailLimits::default()).await, Err(ThumbnailError::TooLarge));

        // Within the pixel bound but over the memory bound.
        let limits = ThumbnailLimits { max_alloc_bytes: 1024, ..ThumbnailLimits::default() };
        assert_eq!(outcome(encode(&picture(100, 100), ImageFormat::Png), limits).await, Err(ThumbnailError::TooLarge));
    }

    #[tokio::test]
    async fn corrupt_and_foreign_bytes_fail() {
        let png = encode(&picture(300, 300), ImageFormat::Png);
        let truncated = png.slice(..png.len() / 2);
        assert_eq!(outcome(truncated, ThumbnailLimits::default()).await, Err(ThumbnailError::Corrupt));
        let mut garbled = png.to_vec();
        let middle = garbled.len() / 2;
        garbled[middle..middle + 64].fill(0xa5);
        assert_eq!(outcome(Bytes::from(garbled), ThumbnailLimits::default()).await, Err(ThumbnailError::Corrupt));
        let text = Bytes::from_static(b"this is not an image at all");
        assert_eq!(outcome(text, ThumbnailLimits::default()).await, Err(ThumbnailError::Unsupported));
        let bmp = Bytes::from_static(b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0");
        assert_eq!(outcome(bmp, ThumbnailLimits::default()).await, Err(ThumbnailError::Unsupported));
    }

    /// The decoding thread of the tests that go through `make` (like the broker's, one
    /// per slot of `DECODES`, which they share).
    fn decoders() -> &'static BackgroundThreads {
        static DECODERS: std::sync::LazyLock<BackgroundThreads> = std::sync::LazyLock::new(|| {
            BackgroundThreads::start("sb-test", MAX_CONCURRENT_DECODES, false).expect("threads start")
        });
        &DECODERS
    }

    /// Decoding threads of one test's own (its slots are its own too), for its lifetime.
    fn threads_of_a_test(count: usize) -> &'static BackgroundThreads {
        Box::leak(Box::new(BackgroundThreads::start("sb-test", count, false).expect("threads start")))
    }

    /// Starts `bounded` work on `slots` that blocks until its sender is dropped or sends,
    /// and returns once it holds its slot.
    async fn blocked(
        slots: &'static Semaphore,
        threads: &'static BackgroundThreads,
        timeout: Duration,
    ) -> (mpsc::Sender<()>, tokio::task::JoinHandle<Result<(), ThumbnailError>>) {
        let (release, wait) = mpsc::channel::<()>();
        let (started, on_start) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(bounded(slots, threads, timeout, move || {
            let _ = started.send(());
            let _ = wait.recv();
        }));
        on_start.await.expect("the work starts");
        (release, handle)
    }

    #[tokio::test]
    async fn with_two_slots_a_third_decode_waits_then_is_busy() {
        // The mechanism with two slots (the broker has `MAX_CONCURRENT_DECODES`).
        static SLOTS: Semaphore = Semaphore::const_new(2);
        let threads = threads_of_a_test(2);
        let long = Duration::from_secs(30);
        let (release_a, a) = blocked(&SLOTS, threads, long).await;
        let (release_b, b) = blocked(&SLOTS, threads, long).await;
        assert_eq!(SLOTS.available_permits(), 0);

        let third = bounded(&SLOTS, threads, Duration::from_millis(50), || ()).await;
        assert_eq!(third, Err(ThumbnailError::Busy));

        // A caller that waits long enough gets the slot freed meanwhile.
        let waiting = tokio::spawn(bounded(&SLOTS, threads, long, || 7));
        release_a.send(()).expect("a is running");
        assert_eq!(waiting.await.expect("joins"), Ok(7));
        assert_eq!(a.await.expect("joins"), Ok(()));
        drop(release_b);
        assert_eq!(b.await.expect("joins"), Ok(()));
        assert_eq!(SLOTS.available_permits(), 2);
    }

    #[tokio::test]
    async fn a_slow_decode_times_out_and_keeps_its_slot_until_it_ends() {
        static SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT_DECODES);
        let threads = threads_of_a_test(MAX_CONCURRENT_DECODES);
        let (release, slow) = blocked(&SLOTS, threads, Duration::from_millis(50)).await;
        assert_eq!(slow.await.expect("joins"), Err(ThumbnailError::TimedOut));
        // The thread cannot be stopped: it still holds its slot.
        assert_eq!(SLOTS.available_permits(), MAX_CONCURRENT_DECODES - 1);
        release.send(()).expect("the work is still running");
        let freed = tokio::time::timeout(Duration::from_secs(10), async {
            while SLOTS.available_permits() < MAX_CONCURRENT_DECODES {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        freed.await.expect("the slot is freed once the work ends");
    }
}
