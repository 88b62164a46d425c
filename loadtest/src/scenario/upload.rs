//! `upload`: files through the broker, each figure next to the limit it is bounded by,
//! all measured in the same run on the same machine:
//!
//! - (a) a plain quinn bulk stream between two endpoints on loopback, with the broker's
//!   own TLS and transport settings on the server side and the client library's on the
//!   client side, one way and then the other (MB/s): what QUIC itself can carry here;
//!   (a2) the same with that server in a process of its own (`__quinn-sink`), as the
//!   broker is, reported beside (`c_upload_over_min_a2_b`; not with `--in-process`);
//!   the aim stays against (a);
//!   (a), (a2) and (c) are measured in `--rounds` rounds, one right after the other in
//!   each, and each upload is divided by its own round's limits: the medians (and the
//!   lowest and highest ratios) are reported;
//! - (b) appending 1 MiB pieces (the chunk size) with an fdatasync after each to a file
//!   on the file system of the broker's data dir (MB/s), through the page cache and the
//!   way the broker writes chunks (whole blocks with `O_DIRECT`), the faster counting:
//!   what durable writes can carry;
//! - (c) one `--file-mib` upload through the broker, from `BeginUpload` to `Complete`
//!   (chunk checksums, writes, fsyncs and the whole-file hash included), as MB/s and as a
//!   ratio to min(a, b) (aim: at least 0.75); the client's whole-file BLAKE3 before
//!   `BeginUpload` is reported apart (`c_client_hash_mb_per_s`);
//! - (d) one download of the same file (MB/s), and its ratio to (a) the other way;
//! - (e) `--concurrent` uploads of `--concurrent-mib` each from `--clients` clients at
//!   once (aggregate MB/s);
//! - (f) chat latency (open-loop send to delivery at a second client) with no upload,
//!   then again while the sender's own connection uploads `--file-mib` files back to
//!   back (p99 ratio; aim: at most 2x);
//! - (h) chat latency alone and then while another user uploads images back to back,
//!   each a distinct PNG of `--image-mpx` million pixels (one colour: about 150 KB on
//!   the wire at 48, a whole decode for the broker), one always waiting for the decoder
//!   behind the one it decodes, so that it is busy throughout (p99 ratio; aim: at most
//!   2x; 0 skips the phase); after (f)'s deleted files are freed and the writeback
//!   settled, so neither is charged to the thumbnails;
//! - (g) the disk alone, after the broker stopped: the latency of a small append with an
//!   fdatasync every 1/`--chat-rate` s (what one group commit asks of the disk), alone
//!   and then beside 1 MiB appends fdatasynced back to back the way the broker writes
//!   chunks, as many of each as (f) sends, in the harness's temp dir (p99 ratio): how
//!   much the disk itself lets a bulk writer delay a commit. On a disk that stalls when
//!   writes go on above what it sustains, this ratio is far above 2, and (f) cannot do
//!   better than it while uploads run at full speed.
//!
//! With a broker process of its own (the default child, or `--target` with
//! `--broker-pid`), its CPU time per MB moved is reported for (c), (d) and (e). MB are
//! 10^6 bytes. File contents are pseudo-random and differ per upload, so the broker's
//! content addressing never turns an upload into a no-op.

use std::collections::VecDeque;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_client::{Client, Connector, Trust};
use switchboard_protocol::{Body, ConvId, Event, FileId, NewUpload};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncSeek, ReadBuf};

use crate::load::{Population, create_group};
use crate::report::{Percentiles, Report};
use crate::resources::{Sampler, cpu_seconds};
use crate::scenario::{SplitMix, params};
use crate::{AbortOnDrop, Common, Error, Result, payload, run_tag};

/// Bytes per MiB.
const MIB: u64 = 1024 * 1024;
/// Bytes per second the harness frees when it deletes its own scratch files: faster than
/// the broker (`switchboard_broker::files::blobs::DELETE_BYTES_PER_SEC`), since nothing is
/// measured meanwhile, yet paced so that a file system mounted `-o discard` does not
/// stall the phases after.
const HARNESS_DELETE_BYTES_PER_SEC: u64 = 512 * 1024 * 1024;
/// Bytes per MB, the unit of every rate reported.
const MB: f64 = 1e6;
/// Uploads in progress the broker allows one user by default (`max_uploads_per_user`).
const MAX_UPLOADS_PER_USER: usize = 8;
/// The aims of issue 9: upload at least this share of min(quinn, fsync) ...
const UPLOAD_AIM: f64 = 0.75;
/// ... and chat p99 during an upload at most this many times the p99 without.
const CHAT_P99_AIM: f64 = 2.0;

/// `upload` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Size of the single upload and download, and of each upload beside the chat, MiB.
    #[arg(long, default_value_t = 100)]
    pub file_mib: u64,
    /// Uploads at once in the concurrent phase.
    #[arg(long, default_value_t = 50)]
    pub concurrent: usize,
    /// Size of each concurrent upload, MiB.
    #[arg(long, default_value_t = 10)]
    pub concurrent_mib: u64,
    /// Clients (users, one connection each) the concurrent uploads are spread over; at
    /// most 8 uploads per client (the broker's default `max_uploads_per_user`).
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Chat messages per second, in each chat phase (open loop).
    #[arg(long, default_value_t = 100.0, value_parser = crate::parse_rate)]
    pub chat_rate: f64,
    /// Chat messages in each chat phase. The default makes p99 the 15th slowest: with
    /// 500 (the default before) it was the 5th, and moved by a third from run to run
    /// (docs/benchmarks.md, "Uploads at a lower CPU priority").
    #[arg(long, default_value_t = 1500)]
    pub chat_messages: u32,
    /// Rounds of (a), (a2) and (c), one after another in each; the medians are reported
    /// (1 to 50).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Million pixels of each image in (h), the chat phase beside thumbnails (at most 50,
    /// the broker's default `max_input_pixels`; 0 skips the phase). 48: a phone camera's
    /// photo's pixel count; the broker made about two such thumbnails a second (release,
    /// docs/benchmarks.md "Chat beside thumbnails").
    #[arg(long, default_value_t = 48)]
    pub image_mpx: u32,
}

impl Default for Args {
    /// The command line's defaults.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: Args,
        }
        <Defaults as clap::Parser>::parse_from(["upload"]).args
    }
}

/// Runs the scenario.
pub async fn run(common: &Common, args: &Args) -> Result<Report> {
    common.refuse_rate_flags("upload", "moves its files once per round")?;
    if !(args.file_mib >= 1 && args.concurrent >= 1 && args.concurrent_mib >= 1 && args.clients >= 1) {
        return Err(Error::InvalidArgs("need 1+ MiB files, concurrent uploads and clients".into()));
    }
    if args.concurrent.div_ceil(args.clients) > MAX_UPLOADS_PER_USER {
        return Err(Error::InvalidArgs(format!(
            "at most {MAX_UPLOADS_PER_USER} uploads per client: raise --clients to {}",
            args.concurrent.div_ceil(MAX_UPLOADS_PER_USER)
        )));
    }
    if !(1..=50).contains(&args.rounds) {
        return Err(Error::InvalidArgs("--rounds must be 1 to 50".into()));
    }
    if args.image_mpx > 50 {
        return Err(Error::InvalidArgs(
            "--image-mpx is at most 50 (the broker's default max_input_pixels: larger images get no thumbnail)".into(),
        ));
    }
    if !(args.chat_rate > 0.0 && args.chat_messages >= 1) {
        return Err(Error::InvalidArgs("need a positive --chat-rate and 1+ --chat-messages".into()));
    }
    let file_bytes = args.file_mib * MIB;
    let size = common.size;
    let mut report = Report {
        scenario: "upload".into(),
        command: common.command.clone(),
        params: params([
            ("file", format!("{} MiB", args.file_mib)),
            ("concurrent", format!("{} x {} MiB from {} clients", args.concurrent, args.concurrent_mib, args.clients)),
            ("chat", format!("{} msgs at {} msg/s, {size} B", args.chat_messages, args.chat_rate)),
        ]),
        latency_label: "chat".into(),
        ..Report::default()
    };

    if args.image_mpx > 0 {
        report.params.insert("images".into(), format!("{} MP each, thumbnailed back to back (h)", args.image_mpx));
    }
    let target = common.target().await?;
    let broker_pid = target.pid.map(|p| p.to_string());
    report.params.insert("broker".into(), target.describe());
    // Memory and CPU over the broker phases, both processes (peak RSS shows whether
    // transfers are streamed rather than held).
    let broker_sampler = broker_pid.clone().map(|pid| Sampler::start(pid, Duration::from_millis(250)));
    let harness_sampler = Sampler::start("self".into(), Duration::from_millis(250));

    // (b) On the data dir's file system when the harness owns the broker.
    let scratch = tempfile::tempdir().map_err(Error::io("creating a temp dir"))?;
    let fsync_dir = match target.data_parent() {
        Some(dir) => dir.to_owned(),
        None => {
            report.params.insert("fsync".into(), "the harness's temp dir (remote broker)".into());
            scratch.path().to_owned()
        }
    };
    // Other processes' pending writeback would land in these disk figures (see
    // `settle_writeback`): written back first.
    report.writeback_settled(crate::resources::settle_writeback().await);
    // Both ways of appending; the limit is the faster (the broker writes the second way).
    let (buffered, direct) = tokio::task::spawn_blocking(move || {
        Ok::<_, std::io::Error>((
            fsync_append(&fsync_dir, file_bytes, Append::Buffered)?,
            fsync_append(&fsync_dir, file_bytes, Append::AsTheBroker)?,
        ))
    })
    .await?
    .map_err(Error::io("appending with fdatasync"))?;
    let fsync = buffered.max(direct);
    report.extra.insert("b_fsync_append_buffered_mb_per_s".into(), buffered);
    report.extra.insert("b_fsync_append_as_broker_mb_per_s".into(), direct);
    report.extra.insert("b_fsync_append_mb_per_s".into(), fsync);

    // The chat's sender and receiver, and (h)'s image uploader.
    let users = args.clients.max(3);
    let pop = Population::enroll(&target, &run_tag(), users).await?;
    let conv = create_group(&pop, 0, &[0, 1], "upload").await?;
    let sender = Arc::new(pop.client(0).await?);
    let base = Arc::new(Pattern::base());

    // (a), (a2) and (c) in rounds, one right after the other in each: a limit measured
    // once over a fraction of a second moves by a quarter from run to run on a shared
    // 2-vCPU machine, so each upload is divided by the limits measured beside it and
    // the medians are reported.
    let mut rounds = Vec::with_capacity(args.rounds);
    let mut last = None;
    for round in 0..args.rounds {
        let quinn = quinn_bulk(file_bytes, false).await?;
        // The same with the server in a process of its own, as the broker is. The
        // server is this executable run again, which is the harness unless the broker
        // runs in this process (tests).
        let quinn2 = if common.in_process { None } else { Some(quinn_bulk(file_bytes, true).await?) };
        let pattern = Pattern::new(&base, 1 + round as u64, file_bytes);
        let hashing = Instant::now();
        let new = pattern.new_upload("bench-single.bin").await?;
        // Before `BeginUpload` and not part of (c): the client's whole-file BLAKE3.
        let hash_rate = rate(file_bytes, hashing.elapsed().as_secs_f64());
        let cpu = broker_pid.as_deref().and_then(cpu_seconds);
        let client_cpu = cpu_seconds("self");
        let start = Instant::now();
        let status = sender.begin_upload(new).await?;
        let uploaded = sender.upload_from(status.file, 0, &mut pattern.clone(), |_| {}).await;
        let upload_s = start.elapsed().as_secs_f64();
        let cpu_upload = cpu_per_mb(broker_pid.as_deref(), cpu, file_bytes);
        // With the broker in this process, this process is both ends: not the client's.
        let client_cpu_upload = cpu_per_mb(Some("self"), client_cpu, file_bytes).filter(|_| !common.in_process);
        let upload_ok = matches!(&uploaded, Ok(f) if f.size == file_bytes);
        report.check(
            &format!("the single upload completed (round {})", round + 1),
            upload_ok,
            match &uploaded {
                Ok(f) => format!("{} of {file_bytes} bytes", f.size),
                Err(e) => e.to_string(),
            },
        );
        rounds.push(UploadRound {
            quinn_up: quinn.up,
            quinn_down: quinn.down,
            quinn_cpu: quinn.client_cpu_ms_per_mb,
            quinn2,
            upload: rate(file_bytes, upload_s),
            hash_rate,
            cpu_ms_per_mb: cpu_upload,
            client_cpu_ms_per_mb: client_cpu_upload,
        });
        // The last one stays for (d).
        if round + 1 < args.rounds {
            if upload_ok {
                sender.delete_file(status.file).await?;
            } else {
                // Not left holding an upload slot and quota until it expires.
                let _ = sender.cancel_upload(status.file).await;
            }
            // The broker frees a deleted file at its paced rate (fdatasynced cuts): the
            // next round starts on a disk as quiet as the first one's.
            if let Some(data_dir) = target.data_dir() {
                trash_emptied(&data_dir, file_bytes).await;
            }
        } else {
            last = Some((status.file, upload_ok));
        }
    }
    let (file, upload_ok) = last.ok_or_else(|| Error::InvalidArgs("need 1+ --rounds".into()))?;
    let median_of = |f: &dyn Fn(&UploadRound) -> Option<f64>| median(rounds.iter().filter_map(f).collect());
    let quinn_up = median_of(&|r| Some(r.quinn_up));
    let quinn_down = median_of(&|r| Some(r.quinn_down));
    let upload = median_of(&|r| Some(r.upload));
    let upload_s = rounds.iter().map(|r| file_bytes as f64 / MB / r.upload).sum::<f64>();
    report.extra.insert("a_quinn_upload_mb_per_s".into(), quinn_up);
    report.extra.insert("a_quinn_download_mb_per_s".into(), quinn_down);
    if !common.in_process {
        report.extra.insert("a2_quinn_two_processes_upload_mb_per_s".into(), median_of(&|r| r.quinn2.map(|q| q.up)));
        report
            .extra
            .insert("a2_quinn_two_processes_download_mb_per_s".into(), median_of(&|r| r.quinn2.map(|q| q.down)));
    }
    // What one CPU-time tick (/proc: 10 ms) is per MB of the file: every CPU figure per
    // MB below moves in steps of this (a trial read 0.95, 1.91 and 2.86 for a 10 MiB
    // file as figures, and they were 1, 2 and 3 ticks).
    report.extra.insert("cpu_tick_ms_per_mb".into(), 1000.0 / crate::resources::TICKS_PER_S / (file_bytes as f64 / MB));
    // What each end spends per MB, beside the rates: the broker's receive side against
    // a bare quinn server's, and the client library's send side against a bare quinn
    // client's (the harness's CPU clock ticks are 10 ms, so each round's figure is
    // coarse; the medians are not).
    let mut put_median = |key: &str, figure: &dyn Fn(&UploadRound) -> Option<f64>| {
        let value = median_of(figure);
        if value.is_finite() {
            report.extra.insert(key.into(), value);
        }
    };
    put_median("a_both_ends_cpu_ms_per_mb", &|r| r.quinn_cpu);
    put_median("a2_client_cpu_ms_per_mb", &|r| r.quinn2?.client_cpu_ms_per_mb);
    put_median("a2_server_cpu_ms_per_mb", &|r| r.quinn2?.server_cpu_ms_per_mb);
    put_median("c_client_cpu_ms_per_mb", &|r| r.client_cpu_ms_per_mb);
    // Both ends of (c) against both ends of (a2), per MB: how much more work an upload
    // is than a bare stream between the same two processes, whatever the machine.
    let both = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
    put_median("c_cpu_per_mb_over_a2", &|r| {
        // A round whose bare stream read no CPU tick at all says nothing: left out.
        let bare = both(r.quinn2?.client_cpu_ms_per_mb, r.quinn2?.server_cpu_ms_per_mb).filter(|&b| b > 0.0)?;
        Some(both(r.cpu_ms_per_mb, r.client_cpu_ms_per_mb)? / bare)
    });
    report.extra.insert("c_rounds".into(), rounds.len() as f64);
    report.extra.insert("c_client_hash_mb_per_s".into(), median_of(&|r| Some(r.hash_rate)));
    report.extra.insert("c_upload_mb_per_s".into(), upload);
    // Each round's upload over the limits of its own round, then the median and range.
    let mut ratio = |key: &str, limit: &dyn Fn(&UploadRound) -> Option<f64>| {
        let ratios: Vec<f64> =
            rounds.iter().filter_map(|r| Some(r.upload / limit(r)?.min(fsync).max(f64::MIN_POSITIVE))).collect();
        let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let m = median(ratios.clone());
        if !ratios.is_empty() {
            report.extra.insert(key.into(), m);
            report.extra.insert(format!("{key}_lowest"), lo);
            report.extra.insert(format!("{key}_highest"), hi);
        }
        (!ratios.is_empty()).then_some(m)
    };
    let over_a = ratio("c_upload_over_min_a_b", &|r| Some(r.quinn_up));
    let over_a2 = ratio("c_upload_over_min_a2_b", &|r| r.quinn2.map(|q| q.up));
    if let Some(cpu) = Some(median_of(&|r| r.cpu_ms_per_mb)).filter(|c| c.is_finite()) {
        report.extra.insert("c_broker_cpu_ms_per_mb".into(), cpu);
    }
    let limit = quinn_up.min(fsync);
    report.aim(
        &format!("upload at least {UPLOAD_AIM} of min(quinn, fsync)"),
        over_a.unwrap_or(0.0) >= UPLOAD_AIM,
        format!(
            "medians of {} rounds: {upload:.1} MB/s against {limit:.1} MB/s, {:.2} of min(a, b) (one process), {:.2} of min(a2, b) (two processes)",
            rounds.len(),
            over_a.unwrap_or(f64::NAN),
            over_a2.unwrap_or(f64::NAN)
        ),
    );

    // (d) Download the last one back.
    let cpu = broker_pid.as_deref().and_then(cpu_seconds);
    let start = Instant::now();
    let downloaded = sender.download(file, 0, 0, &mut tokio::io::sink(), |_| {}).await;
    let download_s = start.elapsed().as_secs_f64();
    let cpu_download = cpu_per_mb(broker_pid.as_deref(), cpu, file_bytes);
    let download_ok = matches!(&downloaded, Ok(r) if r.length == file_bytes);
    let detail = match &downloaded {
        Ok(r) => format!("{} of {file_bytes} bytes", r.length),
        Err(e) => e.to_string(),
    };
    report.check("the download returned every byte", download_ok, detail);
    let download = rate(file_bytes, download_s);
    report.extra.insert("d_download_mb_per_s".into(), download);
    report.extra.insert("d_download_over_a".into(), download / quinn_down.max(f64::MIN_POSITIVE));
    if let Some(cpu) = cpu_download {
        report.extra.insert("d_broker_cpu_ms_per_mb".into(), cpu);
    }
    if upload_ok {
        sender.delete_file(file).await?;
    }

    // (e) Many at once.
    let (completed, concurrent_s, cpu_concurrent) = concurrent(&pop, &base, args, broker_pid.as_deref()).await?;
    let concurrent_bytes = args.concurrent as u64 * args.concurrent_mib * MIB;
    report.extra.insert("e_concurrent_uploads_mb_per_s".into(), rate(concurrent_bytes, concurrent_s));
    report.extra.insert("e_concurrent_uploads_completed".into(), completed as f64);
    if let Some(cpu) = cpu_concurrent {
        report.extra.insert("e_broker_cpu_ms_per_mb".into(), cpu);
    }
    report.check(
        "every concurrent upload completed",
        completed == args.concurrent,
        format!("{completed} of {}", args.concurrent),
    );

    // (f) Chat alone, then beside an upload on the sender's connection.
    let receiver = pop.client(1).await?;
    let mut events = receiver.events().ok_or_else(|| Error::Protocol("event stream taken".into()))?;
    let chat = Chat { conv, rate: args.chat_rate, messages: args.chat_messages, size };
    let idle = chat.run(&sender, &mut events).await?;
    let busy = chat_beside_upload(&chat, &sender, &mut events, &base, file_bytes).await?;
    // Memory and CPU of (a) to (f): (h)'s decodes (144 MB of pixels each at 48 MP) would
    // otherwise be the peak, and the peak says whether transfers are streamed.
    report.broker = broker_sampler.map(|s| s.summary(0.0));
    report.harness = harness_sampler.summary(0.0);
    // (h) Chat alone and beside thumbnails, another user's images decoded back to back,
    // once the files (f) deleted are freed and the writeback settled: neither is the
    // thumbnails' doing.
    let images = if args.image_mpx > 0 {
        if let Some(data_dir) = target.data_dir() {
            trash_emptied(&data_dir, busy.uploaded_bytes + file_bytes).await;
        }
        // A whole-system sync: not for a broker in this process (tests, beside others).
        if !target.is_in_process() {
            let _ = crate::resources::settle_writeback().await;
        }
        // Whatever fails in the phase is its failed check; (a) to (g) stand.
        let mut alone = None;
        let beside = async {
            let imager = Arc::new(pop.client(2).await?);
            let mpx = args.image_mpx;
            let png = tokio::task::spawn_blocking(move || one_colour_png(mpx)).await??;
            alone = Some(chat.run(&sender, &mut events).await?);
            let beside = chat_beside_images(&chat, &sender, &mut events, &imager, Arc::new(png)).await;
            imager.close();
            beside
        }
        .await;
        Some((alone, beside))
    } else {
        None
    };
    receiver.close();
    sender.close();
    target.stop().await?;

    // (g) The disk alone, with the broker gone.
    // The harness's temp dir: the same file system as the owned broker's (both temp dirs).
    let (disk_dir, samples, every) =
        (scratch.path().to_owned(), args.chat_messages as usize, Duration::from_secs_f64(1.0 / args.chat_rate));
    let disk = tokio::task::spawn_blocking(move || small_syncs_beside_appends(&disk_dir, samples, every))
        .await?
        .map_err(Error::io("timing small fdatasyncs beside appends"))?;
    let histogram = |us: &[u64]| {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .expect("constant histogram bounds are valid");
        us.iter().for_each(|&v| h.saturating_record(v.max(1)));
        Percentiles::from_us(&h)
    };
    let (disk_idle, disk_busy) = (histogram(&disk.0), histogram(&disk.1));
    let disk_ratio = disk_busy.p99_ms / disk_idle.p99_ms.max(1e-3);
    report.extra.insert("g_disk_sync_p99_ms_alone".into(), disk_idle.p99_ms);
    report.extra.insert("g_disk_sync_p99_ms_beside_appends".into(), disk_busy.p99_ms);
    report.extra.insert("g_disk_sync_p99_ratio".into(), disk_ratio);
    report.event_latency.insert("disk alone".into(), disk_idle);
    report.event_latency.insert("disk+appends".into(), disk_busy);

    let (idle_p, busy_p) = (Percentiles::from_us(&idle.latency), Percentiles::from_us(&busy.chat.latency));
    let ratio = busy_p.p99_ms / idle_p.p99_ms.max(1e-3);
    report.extra.insert("f_chat_p99_ms_idle".into(), idle_p.p99_ms);
    report.extra.insert("f_chat_p99_ms_during_upload".into(), busy_p.p99_ms);
    report.extra.insert("f_chat_p99_ratio".into(), ratio);
    report.extra.insert("f_uploaded_mb_during_chat".into(), busy.uploaded_bytes as f64 / MB);
    report.extra.insert("f_quota_wait_s_during_chat".into(), busy.quota_wait_s);
    report.check(
        "every chat message delivered",
        idle.delivered == u64::from(args.chat_messages) && busy.chat.delivered == u64::from(args.chat_messages),
        format!("{} and {} of {}", idle.delivered, busy.chat.delivered, args.chat_messages),
    );
    report.check(
        "an upload ran throughout the busy chat phase",
        busy.uploading_at_end && busy.uploaded_bytes > 0,
        match &busy.upload_stopped {
            Some(why) => {
                format!("{:.1} MB durable during the phase; the uploads ended: {why}", busy.uploaded_bytes as f64 / MB)
            }
            None => format!(
                "{:.1} MB durable during the phase, {:.1} s of it waiting for the quota's freeing",
                busy.uploaded_bytes as f64 / MB,
                busy.quota_wait_s
            ),
        },
    );
    report.aim(
        &format!("chat p99 during an upload within {CHAT_P99_AIM}x of without"),
        ratio <= CHAT_P99_AIM,
        format!("{:.2} ms against {:.2} ms; the disk alone (g): {disk_ratio:.1}x", busy_p.p99_ms, idle_p.p99_ms),
    );
    let mut chats = vec![&idle, &busy.chat];
    chats.extend(report_images(&mut report, args, &images));
    report.sent = chats.len() as u64 * u64::from(args.chat_messages);
    report.acked = chats.iter().map(|c| c.acked).sum();
    report.delivered = chats.iter().map(|c| c.delivered).sum();
    report.errors = chats.iter().map(|c| c.errors).sum();
    let chat_s = chats.iter().map(|c| c.seconds).sum::<f64>().max(1e-9);
    report.duration_s = upload_s + download_s + concurrent_s + chat_s;
    report.acked_per_s = report.acked as f64 / chat_s;
    report.delivered_per_s = report.delivered as f64 / chat_s;
    report.latency = busy_p.clone();
    report.event_latency.insert("chat idle".into(), idle_p);
    report.event_latency.insert("chat+upload".into(), busy_p);
    Ok(report)
}

/// (h)'s figures, checks and aim into `report`; the chat phases it ran, for the run's
/// totals. A phase that failed is its failed check (with the chat alone's p99 if that
/// ran); the figures of (a) to (g) stand.
fn report_images<'a>(
    report: &mut Report,
    args: &Args,
    images: &'a Option<(Option<ChatResult>, Result<ImageChat>)>,
) -> Vec<&'a ChatResult> {
    let mut chats = Vec::new();
    match images {
        Some((Some(alone), Ok(images))) => {
            let (alone_p, p) = (Percentiles::from_us(&alone.latency), Percentiles::from_us(&images.chat.latency));
            let ratio = p.p99_ms / alone_p.p99_ms.max(1e-3);
            report.extra.insert("h_chat_p99_ms_alone".into(), alone_p.p99_ms);
            report.extra.insert("h_chat_p99_ms_beside_thumbnails".into(), p.p99_ms);
            report.extra.insert("h_chat_p99_ratio".into(), ratio);
            report.extra.insert("h_images_thumbnailed".into(), images.thumbnailed as f64);
            report.extra.insert("h_thumbnails_per_s".into(), images.thumbnailed as f64 / images.seconds.max(1e-9));
            report.extra.insert("h_longest_gap_between_thumbnails_s".into(), images.gaps.longest_s);
            report.check(
                "every chat message delivered beside thumbnails",
                alone.delivered == u64::from(args.chat_messages)
                    && images.chat.delivered == u64::from(args.chat_messages),
                format!("{} and {} of {}", alone.delivered, images.chat.delivered, args.chat_messages),
            );
            // Throughout: no wait for a thumbnail (from the phase's start, between two,
            // and the one open at its end) over `THUMBNAIL_GAP`, or over five times the
            // usual one when there are enough between two to say what usual is. A phase
            // shorter than one decode may see none: its one wait is then the phase.
            let bound = images.gaps.bound_s();
            let left = if images.left_behind > 0 {
                format!("; {} images could not be deleted", images.left_behind)
            } else {
                String::new()
            };
            report.check(
                "images were thumbnailed throughout the chat phase beside them",
                images.stopped.is_none() && images.gaps.longest_s <= bound && images.left_behind == 0,
                match &images.stopped {
                    Some(why) => format!("{} thumbnails, then the uploads ended: {why}{left}", images.thumbnailed),
                    None => format!(
                        "{} thumbnails of {} MP images, at most {:.2} s apart (bound {bound:.2} s){left}",
                        images.thumbnailed, args.image_mpx, images.gaps.longest_s
                    ),
                },
            );
            report.aim(
                &format!("chat p99 beside thumbnails within {CHAT_P99_AIM}x of without"),
                ratio <= CHAT_P99_AIM,
                format!("{:.2} ms against {:.2} ms", p.p99_ms, alone_p.p99_ms),
            );
            report.event_latency.insert("chat idle (h)".into(), alone_p);
            report.event_latency.insert("chat+images".into(), p);
            chats.push(alone);
            chats.push(&images.chat);
        }
        Some((alone, beside)) => {
            let why = match beside {
                Err(e) => e.to_string(),
                Ok(_) => "the chat alone did not run".to_owned(),
            };
            report.check("images were thumbnailed throughout the chat phase beside them", false, why);
            if let Some(alone) = alone {
                report.extra.insert("h_chat_p99_ms_alone".into(), Percentiles::from_us(&alone.latency).p99_ms);
                chats.push(alone);
            }
        }
        None => {}
    }
    chats
}

/// One round of (a), (a2) and (c).
struct UploadRound {
    /// (a) both ways, MB/s.
    quinn_up: f64,
    quinn_down: f64,
    /// (a)'s upload: the harness's CPU per MB (both endpoints).
    quinn_cpu: Option<f64>,
    /// (a2) (none with the broker in this process).
    quinn2: Option<Bulk>,
    /// (c), MB/s.
    upload: f64,
    /// The client's whole-file BLAKE3 before it, MB/s.
    hash_rate: f64,
    /// The broker's CPU per MB during (c), if measured.
    cpu_ms_per_mb: Option<f64>,
    /// The harness's (the client's) CPU per MB during (c).
    client_cpu_ms_per_mb: Option<f64>,
}

/// A plain quinn bulk stream each way, and what its upload cost.
#[derive(Clone, Copy, Debug)]
struct Bulk {
    /// MB/s.
    up: f64,
    down: f64,
    /// CPU ms per MB during the upload: this process (the client, and with
    /// `two_processes` false the server too) ...
    client_cpu_ms_per_mb: Option<f64>,
    /// ... and the server's process, when it has one of its own.
    server_cpu_ms_per_mb: Option<f64>,
}

/// Waits until the trash of the broker with its data in `data_dir` is empty (every deleted
/// file freed), for at most twice the time the broker takes to free `bytes` plus 5 s.
async fn trash_emptied(data_dir: &Path, bytes: u64) {
    let trash = switchboard_broker::files::blobs::trash_dir(data_dir);
    let most = Duration::from_secs_f64(
        2.0 * bytes as f64 / switchboard_broker::files::blobs::DELETE_BYTES_PER_SEC as f64 + 5.0,
    );
    let deadline = Instant::now() + most;
    while Instant::now() < deadline {
        let waiting = std::fs::read_dir(&trash).is_ok_and(|mut entries| entries.next().is_some());
        if !waiting {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The median of `xs` (the mean of the middle two for an even count); NaN if empty.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn rate(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MB / seconds.max(1e-9)
}

/// A process's CPU ms per MB since `before` (its CPU seconds then), if measured.
fn cpu_per_mb(pid: Option<&str>, before: Option<f64>, bytes: u64) -> Option<f64> {
    let after = cpu_seconds(pid?)?;
    Some((after - before?) * 1000.0 / (bytes as f64 / MB))
}

/// (a): a plain quinn bulk stream of `bytes` each way between a client endpoint here
/// and a server endpoint with the broker's TLS and transport settings, in this process
/// (`two_processes` false) or in a child process of its own (`__quinn-sink`), as the
/// broker is.
async fn quinn_bulk(bytes: u64, two_processes: bool) -> Result<Bulk> {
    let dir = tempfile::tempdir().map_err(Error::io("creating a temp dir"))?;
    let mut server_pid = None;
    let (addr, cert, mut server) = if two_processes {
        let exe = std::env::current_exe().map_err(Error::io("finding the harness executable"))?;
        let mut child = tokio::process::Command::new(exe)
            .arg(QUINN_SINK_COMMAND)
            .arg(dir.path())
            .arg(bytes.to_string())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io("starting the quinn sink"))?;
        server_pid = child.id().map(|p| p.to_string());
        let stdout = child.stdout.take().ok_or_else(|| quic("no stdout"))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = lines.next_line().await.map_err(Error::io("reading the quinn sink"))?.unwrap_or_default();
        let (addr, cert) = line.split_once(' ').ok_or_else(|| quic(format!("the sink said {line:?}")))?;
        let addr = addr.parse().map_err(quic)?;
        let served = tokio::spawn(async move {
            let status = child.wait().await.map_err(Error::io("waiting for the quinn sink"))?;
            if status.success() { Ok(()) } else { Err(quic(format!("the sink exited with {status}"))) }
        });
        // Aborted early, the task drops the child, which kills the sink (`kill_on_drop`).
        (addr, PathBuf::from(cert), AbortOnDrop(served))
    } else {
        let (server, cert, config) = bulk_server(dir.path(), None)?;
        let addr = server.local_addr().map_err(Error::io("reading the endpoint address"))?;
        (addr, cert, AbortOnDrop(tokio::spawn(serve_bulk(server, config, bytes))))
    };
    let connector = Connector::new(addr, "localhost", Trust::CaFile(cert))?;
    let conn = connector.endpoint().connect(addr, "localhost").map_err(quic)?.await.map_err(quic)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(quic)?;
    let piece = Bytes::from(vec![0x5a; MIB as usize]);
    let client_cpu = cpu_seconds("self");
    let server_cpu = server_pid.as_deref().and_then(cpu_seconds);
    let start = Instant::now();
    write_bytes(&mut send, &piece, bytes).await?;
    send.finish().map_err(quic)?;
    let mut ack = [0u8; 8];
    recv.read_exact(&mut ack).await.map_err(quic)?;
    let up_s = start.elapsed().as_secs_f64();
    let client_cpu_ms_per_mb = cpu_per_mb(Some("self"), client_cpu, bytes);
    let server_cpu_ms_per_mb = cpu_per_mb(server_pid.as_deref(), server_cpu, bytes);
    if u64::from_le_bytes(ack) != bytes {
        return Err(Error::Protocol("the quinn server counted other bytes than were sent".into()));
    }
    let start = Instant::now();
    let received = drain(&mut recv).await?;
    let down_s = start.elapsed().as_secs_f64();
    if received != bytes {
        return Err(Error::Protocol(format!("quinn download: {received} of {bytes} bytes")));
    }
    conn.close(0u32.into(), b"done");
    (&mut server.0).await??;
    connector.endpoint().wait_idle().await;
    Ok(Bulk { up: rate(bytes, up_s), down: rate(bytes, down_s), client_cpu_ms_per_mb, server_cpu_ms_per_mb })
}

/// The hidden subcommand that runs (a)'s server in a process of its own.
pub const QUINN_SINK_COMMAND: &str = "__quinn-sink";

/// A server endpoint on 127.0.0.1 with the broker's TLS and transport settings (its
/// certificate made under `dir`), or with `transport` instead of the broker's transport
/// settings (`examples/lossy_link.rs` changes one), and the certificate's path. Its
/// connections get the broker's pre-authentication receive window until
/// `tls::open_session_window`.
pub fn bulk_server(
    dir: &Path,
    transport: Option<quinn::TransportConfig>,
) -> Result<(quinn::Endpoint, PathBuf, switchboard_broker::Config)> {
    let config = switchboard_broker::Config::ephemeral(dir.join("data"));
    let identity = switchboard_broker::tls::load_or_generate(&config)?;
    let mut server_config = switchboard_broker::tls::server_config(&identity, &config, Default::default())?;
    if let Some(transport) = transport {
        server_config.transport_config(Arc::new(transport));
    }
    let socket = switchboard_broker::tls::bind_udp(([127, 0, 0, 1], 0).into(), 1)?
        .pop()
        .ok_or_else(|| Error::Protocol("no UDP socket".into()))?;
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(Error::io("starting a quinn endpoint"))?;
    Ok((server, identity.cert_path.clone(), config))
}

/// (a)'s server: accepts one connection, drains its stream, answers the count, sends
/// `bytes` back and waits for the client to close.
async fn serve_bulk(server: quinn::Endpoint, config: switchboard_broker::Config, bytes: u64) -> Result<()> {
    let piece = Bytes::from(vec![0x5a; MIB as usize]);
    let incoming = server.accept().await.ok_or_else(|| quic("the endpoint closed"))?;
    let conn = incoming.await.map_err(quic)?;
    // The window the broker opens once a device is authenticated: without it the stream
    // ran in the pre-authentication window (`PREAUTH_WINDOW`, 16 KiB) and (a) measured
    // flow control, not the link (39-67 MB/s instead of hundreds).
    switchboard_broker::tls::open_session_window(&conn, &config);
    let (mut send, mut recv) = conn.accept_bi().await.map_err(quic)?;
    let received = drain(&mut recv).await?;
    send.write_all(&received.to_le_bytes()).await.map_err(quic)?;
    write_bytes(&mut send, &piece, bytes).await?;
    send.finish().map_err(quic)?;
    conn.closed().await;
    server.wait_idle().await;
    Ok(())
}

/// Body of the hidden `__quinn-sink DIR BYTES` subcommand: (a)'s server in a process of
/// its own, on a runtime like the broker's; prints `ADDR CERT_PATH`, serves one client.
pub fn run_quinn_sink(dir: &Path, bytes: u64) -> Result<()> {
    crate::target::broker_runtime(&switchboard_broker::Config::default())?.block_on(async move {
        let (server, cert, config) = bulk_server(dir, None)?;
        let addr = server.local_addr().map_err(Error::io("reading the endpoint address"))?;
        println!("{addr} {}", cert.display());
        serve_bulk(server, config, bytes).await
    })
}

fn quic(e: impl std::fmt::Display) -> Error {
    Error::Protocol(format!("quinn bulk stream: {e}"))
}

/// Writes `bytes` bytes to `send`, `piece` after `piece` (the last one cut short).
pub async fn write_bytes(send: &mut quinn::SendStream, piece: &Bytes, bytes: u64) -> Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(piece.len() as u64);
        send.write_chunk(piece.slice(..n as usize)).await.map_err(quic)?;
        left -= n;
    }
    Ok(())
}

/// Reads `recv` to its end; the bytes read.
pub async fn drain(recv: &mut quinn::RecvStream) -> Result<u64> {
    let mut received = 0u64;
    while let Some(chunk) = recv.read_chunk(MIB as usize, true).await.map_err(quic)? {
        received += chunk.bytes.len() as u64;
    }
    Ok(received)
}

/// (b): appends `bytes` in 1 MiB pieces to a new file in `dir`, fdatasync after each;
/// MB/s. The file is removed after.
fn fsync_append(dir: &Path, bytes: u64, how: Append) -> std::io::Result<f64> {
    let path = dir.join(format!("fsync-append-{}.bin", std::process::id()));
    let piece = aligned_piece(0xa5);
    let measured = (|| {
        let file = Appender::create(&path, how)?;
        let start = Instant::now();
        let mut at = 0;
        while at < bytes {
            let n = (bytes - at).min(MIB) as usize;
            file.append(at, &piece[..n])?;
            at += n as u64;
        }
        Ok(rate(bytes, start.elapsed().as_secs_f64()))
    })();
    // Paced, as the broker deletes: unlinked at once, the file's discard (on a file
    // system mounted `-o discard`) stalls the fdatasyncs of the phases after this one.
    let _ = switchboard_broker::files::blobs::remove_paced(&path, HARNESS_DELETE_BYTES_PER_SEC, |_| true);
    measured
}

/// 1 MiB of `byte` at an aligned address, as the broker's chunk buffers are (so a
/// direct write copies nothing, as in the broker).
fn aligned_piece(byte: u8) -> Bytes {
    let align = switchboard_broker::files::blobs::DIRECT_ALIGN;
    let mut piece: Vec<u8> = Vec::with_capacity(MIB as usize + align);
    let pad = piece.as_ptr().align_offset(align);
    piece.resize(pad, 0);
    piece.resize(pad + MIB as usize, byte);
    Bytes::from(piece).slice(pad..)
}

/// How (b) and (g) append: through the page cache, or the way the broker writes an
/// upload's chunks (`PartialFile::write_chunk`: whole blocks with `O_DIRECT` where the
/// file system allows it). Both fdatasync after each piece.
#[derive(Clone, Copy, Debug)]
enum Append {
    Buffered,
    AsTheBroker,
}

/// A new file appended to with an fdatasync after each piece.
enum Appender {
    Buffered(std::fs::File),
    AsTheBroker(switchboard_broker::files::blobs::PartialFile),
}

impl Appender {
    fn create(path: &Path, how: Append) -> std::io::Result<Appender> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        Ok(match how {
            Append::Buffered => Appender::Buffered(file),
            Append::AsTheBroker => {
                Appender::AsTheBroker(switchboard_broker::files::blobs::PartialFile::new(file, path))
            }
        })
    }

    /// Writes `data` at `at` (the end) and fdatasyncs.
    fn append(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            Appender::Buffered(file) => {
                file.write_all_at(data, at)?;
                file.sync_data()
            }
            Appender::AsTheBroker(file) => file.write_chunk(at, data),
        }
    }
}

/// (g): `samples` small appends (256 B) to a new file in `dir`, each fdatasynced, one
/// every `every`: their latencies (µs) alone, then beside a thread appending 1 MiB pieces
/// with an fdatasync after each, back to back, to another file. Both files are removed.
fn small_syncs_beside_appends(dir: &Path, samples: usize, every: Duration) -> std::io::Result<(Vec<u64>, Vec<u64>)> {
    use std::io::Write;
    let small = dir.join(format!("disk-small-{}.bin", std::process::id()));
    let bulk = dir.join(format!("disk-bulk-{}.bin", std::process::id()));
    let time_small = |file: &mut std::fs::File| -> std::io::Result<Vec<u64>> {
        let record = [0x5au8; 256];
        let mut latencies = Vec::with_capacity(samples);
        let start = Instant::now();
        for i in 0..samples {
            if let Some(wait) = (start + every * i as u32).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let t = Instant::now();
            file.write_all(&record)?;
            file.sync_data()?;
            latencies.push(t.elapsed().as_micros() as u64);
        }
        Ok(latencies)
    };
    let measured = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&small)?;
        let alone = time_small(&mut file)?;
        let stop = Arc::new(AtomicBool::new(false));
        let appender = {
            let (stop, bulk) = (stop.clone(), bulk.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let piece = aligned_piece(0xa5);
                let file = Appender::create(&bulk, Append::AsTheBroker)?;
                let mut at = 0;
                while !stop.load(Ordering::Relaxed) {
                    file.append(at, &piece)?;
                    at += MIB;
                }
                Ok(())
            })
        };
        let beside = time_small(&mut file);
        stop.store(true, Ordering::Relaxed);
        let appended = appender.join().unwrap_or_else(|_| Err(std::io::Error::other("the appender panicked")));
        let beside = beside?;
        appended?;
        Ok((alone, beside))
    })();
    let _ = switchboard_broker::files::blobs::remove_paced(&small, HARNESS_DELETE_BYTES_PER_SEC, |_| true);
    let _ = switchboard_broker::files::blobs::remove_paced(&bulk, HARNESS_DELETE_BYTES_PER_SEC, |_| true);
    measured
}

/// (e): `args.concurrent` uploads begun and streamed at once, round robin over
/// `args.clients` connections; returns how many completed, the seconds from the first
/// begin to the last completion, and the broker's CPU ms per MB.
async fn concurrent(
    pop: &Population,
    base: &Arc<Bytes>,
    args: &Args,
    broker_pid: Option<&str>,
) -> Result<(usize, f64, Option<f64>)> {
    let mut clients = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        clients.push(Arc::new(pop.client(c).await?));
    }
    let bytes = args.concurrent_mib * MIB;
    let mut uploads = Vec::with_capacity(args.concurrent);
    for i in 0..args.concurrent {
        let pattern = Pattern::new(base, 100 + i as u64, bytes);
        let new = pattern.new_upload(&format!("bench-{i}.bin")).await?;
        uploads.push((clients[i % clients.len()].clone(), pattern, new));
    }
    let cpu = broker_pid.and_then(cpu_seconds);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (client, mut pattern, new) in uploads {
        set.spawn(async move {
            let status = client.begin_upload(new).await?;
            let file = client.upload_from(status.file, 0, &mut pattern, |_| {}).await;
            Ok::<_, Error>((client, status.file, file.is_ok_and(|f| f.size == bytes)))
        });
    }
    let mut completed = 0;
    let mut done: Vec<(Arc<Client>, FileId)> = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (client, file, ok) = joined??;
        if ok {
            completed += 1;
            done.push((client, file));
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_per_mb(broker_pid, cpu, bytes * args.concurrent as u64);
    for (client, file) in done {
        client.delete_file(file).await?;
    }
    for client in clients {
        client.close();
    }
    Ok((completed, seconds, cpu))
}

/// One chat phase: `messages` sends at `rate`, open loop, each timed from its
/// scheduled send to its delivery at the receiver.
struct Chat {
    conv: ConvId,
    rate: f64,
    messages: u32,
    size: usize,
}

/// What a chat phase measured.
struct ChatResult {
    latency: hdrhistogram::Histogram<u64>,
    acked: u64,
    delivered: u64,
    errors: u64,
    seconds: f64,
}

impl Chat {
    async fn run(&self, sender: &Arc<Client>, events: &mut switchboard_client::Events) -> Result<ChatResult> {
        let base = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / self.rate);
        let mut sends = tokio::task::JoinSet::new();
        let mut latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut delivered = 0u64;
        let deadline = base + interval * self.messages + Duration::from_secs(30);
        let mut next = 0u32;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::from_std(base), interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while delivered < u64::from(self.messages) {
            tokio::select! {
                _ = tick.tick(), if next < self.messages => {
                    let sched_ns = (interval * next).as_nanos() as u64;
                    let mut text = String::new();
                    payload::fill(&mut text, sched_ns, self.size);
                    let (client, conv) = (sender.clone(), self.conv);
                    sends.spawn(async move { send_as_a_client_would(&client, conv, &text).await });
                    next += 1;
                }
                event = events.next() => match event {
                    Some(Event::Entry(e)) if e.conv == self.conv => {
                        if let Body::Text { text, .. } = &e.body
                            && let Some(sched_ns) = payload::sched_ns(text)
                        {
                            let at = base.elapsed().as_nanos() as u64;
                            let _ = latency.record((at.saturating_sub(sched_ns) / 1000).max(1));
                            delivered += 1;
                        }
                    }
                    Some(_) => {}
                    None => return Err(Error::Protocol("the chat receiver's connection closed".into())),
                },
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => break,
            }
        }
        let seconds = base.elapsed().as_secs_f64();
        let (mut acked, mut errors) = (0, 0);
        while let Some(sent) = sends.join_next().await {
            match sent? {
                Ok(_) => acked += 1,
                Err(_) => errors += 1,
            }
        }
        Ok(ChatResult { latency, acked, delivered, errors, seconds })
    }
}

/// What the chat phase beside an upload measured.
struct BusyChat {
    chat: ChatResult,
    /// Bytes made durable by the uploads while the chat phase ran.
    uploaded_bytes: u64,
    /// An upload was still running when the chat phase ended.
    uploading_at_end: bool,
    /// Why the uploads stopped before the chat phase ended, if they did.
    upload_stopped: Option<String>,
    /// Seconds of the phase the uploads spent waiting for the quota to be freed (about:
    /// a wait under way as the phase ends is not counted).
    quota_wait_s: f64,
}

/// Longest the uploads beside the chat wait for the quota to be freed before one is
/// given up (what they deleted is freed at `delete_bytes_per_sec`, 32 MiB/s by default:
/// a 100 MiB file's worth in about 3 s).
const QUOTA_WAIT: Duration = Duration::from_secs(30);

/// (f), second half: the sender's connection uploads `bytes`-sized files back to back
/// (each deleted once complete, so the quota never fills); once the first chunk is
/// durable the chat phase runs beside it.
/// Sends `text` as the client library does: a write the broker sheds (`OVERLOADED`, a
/// broker short of CPU, as a test machine running other tests is) is sent again with the
/// same client id after a backoff, at most `SHED_RETRIES` times; the latency counts from
/// the first attempt's schedule all the same. Before, one shed write on a busy CI machine
/// failed the scenario's "every chat message delivered".
async fn send_as_a_client_would(client: &Client, conv: switchboard_protocol::ConvId, text: &str) -> Result<()> {
    let id = switchboard_client::new_client_id();
    let mut backoff = Duration::from_millis(20);
    for _ in 0..SHED_RETRIES {
        match client.send_with_id(conv, id, text).await {
            Err(e) if e.code() == Some(switchboard_protocol::ErrorCode::OVERLOADED) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            sent => return sent.map(|_| ()).map_err(Into::into),
        }
    }
    Err(Error::Protocol(format!("a chat message was shed {SHED_RETRIES} times")))
}

/// Times `send_as_a_client_would` sends a shed chat message (the client library's
/// `SessionConfig::overload_retries` default).
const SHED_RETRIES: u32 = 6;

async fn chat_beside_upload(
    chat: &Chat,
    sender: &Arc<Client>,
    events: &mut switchboard_client::Events,
    base: &Arc<Bytes>,
    bytes: u64,
) -> Result<BusyChat> {
    let stop = Arc::new(AtomicBool::new(false));
    let durable = Arc::new(AtomicU64::new(0));
    let quota_wait_ms = Arc::new(AtomicU64::new(0));
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let uploads = {
        let (client, stop, durable, base) = (sender.clone(), stop.clone(), durable.clone(), base.clone());
        let quota_wait_ms = quota_wait_ms.clone();
        tokio::spawn(async move {
            let mut started_tx = Some(started_tx);
            let mut salt = 10_000;
            while !stop.load(Ordering::Acquire) {
                salt += 1;
                let mut pattern = Pattern::new(&base, salt, bytes);
                let new = pattern.new_upload("bench-beside-chat.bin").await?;
                // The files deleted before count against the quota until the broker has
                // freed their bytes (paced, `delete_bytes_per_sec`): wait for it, as a
                // client would, up to `QUOTA_WAIT` (before, the uploads stopped at the
                // first refusal, and (f) was measured beside no upload for the rest of
                // the phase).
                let waiting = Instant::now();
                let status = loop {
                    match client.begin_upload(new.clone()).await {
                        Ok(status) => break status,
                        Err(e)
                            if e.code() == Some(switchboard_protocol::ErrorCode::QUOTA_EXCEEDED)
                                && waiting.elapsed() < QUOTA_WAIT =>
                        {
                            if stop.load(Ordering::Acquire) {
                                return Ok(());
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                quota_wait_ms.fetch_add(waiting.elapsed().as_millis() as u64, Ordering::Relaxed);
                let mut last = 0;
                let result = client
                    .upload_from(status.file, 0, &mut pattern, |offset| {
                        durable.fetch_add(offset - last, Ordering::Relaxed);
                        last = offset;
                        if let Some(tx) = started_tx.take() {
                            let _ = tx.send(());
                        }
                    })
                    .await;
                match result {
                    Ok(_) => client.delete_file(status.file).await?,
                    Err(e) => return Err(Error::Protocol(format!("upload beside the chat: {e}"))),
                }
            }
            Ok::<_, Error>(())
        })
    };
    if started.await.is_err() {
        return match uploads.await? {
            Err(e) => Err(e),
            Ok(()) => Err(Error::Protocol("the upload beside the chat never started".into())),
        };
    }
    let (before, waited_before) = (durable.load(Ordering::Relaxed), quota_wait_ms.load(Ordering::Relaxed));
    let result = chat.run(sender, events).await;
    let uploaded_bytes = durable.load(Ordering::Relaxed) - before;
    let quota_wait_s = quota_wait_ms.load(Ordering::Relaxed).saturating_sub(waited_before) as f64 / 1000.0;
    // Still uploading, or waiting (at most `QUOTA_WAIT`) for the quota to upload more.
    let uploading_at_end = !uploads.is_finished();
    stop.store(true, Ordering::Release);
    let upload_stopped = if uploading_at_end {
        // The upload in progress is abandoned with its task; the broker expires it.
        uploads.abort();
        None
    } else {
        Some(match uploads.await {
            Ok(Ok(())) => "stopped".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        })
    };
    Ok(BusyChat { chat: result?, uploaded_bytes, uploading_at_end, upload_stopped, quota_wait_s })
}

/// What the chat phase beside thumbnails measured.
struct ImageChat {
    chat: ChatResult,
    /// From the phase's start to its end (sends answered), seconds.
    seconds: f64,
    /// Images whose thumbnail the broker made while the chat phase ran.
    thumbnailed: usize,
    /// The waits for a thumbnail during the phase.
    gaps: Gaps,
    /// Why the uploads stopped before the chat phase ended, if they did.
    stopped: Option<String>,
    /// Images the uploader could not delete when it stopped.
    left_behind: usize,
}

/// Longest (h)'s uploader waits for one image's thumbnail: past the broker's default
/// decode timeout (20 s), so a missing thumbnail is a failure, not a slow one.
const THUMBNAIL_WAIT: Duration = Duration::from_secs(30);

/// A wait for a thumbnail during (h) longer than this (and than five times the median)
/// fails the phase's check: the decoder stalled, and the chat measured beside nothing.
const THUMBNAIL_GAP: Duration = Duration::from_secs(2);

/// How often (h)'s uploader asks whether a thumbnail is made.
const THUMBNAIL_POLL: Duration = Duration::from_millis(50);

/// A PNG of `mpx` million pixels (8,000 wide), one colour, compressed: what a decode
/// costs is its pixels, not its bytes (`files::thumbnails`' module doc), so a small
/// upload keeps the broker's decoder busy.
fn one_colour_png(mpx: u32) -> Result<Vec<u8>> {
    let width = 8_000u32;
    let height = (u64::from(mpx) * 1_000_000 / u64::from(width)).max(1) as u32;
    let pixels = image::RgbImage::from_pixel(width, height, image::Rgb([40, 120, 200]));
    let mut png = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        &mut png,
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::NoFilter,
    );
    image::ImageEncoder::write_image(encoder, pixels.as_raw(), width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Protocol(format!("encoding the benchmark image: {e}")))?;
    Ok(png)
}

/// `png` with a `tEXt` chunk carrying `salt` (Latin-1) after its header (PNG, section
/// 11.3.4.3): the same pixels as different bytes, so the broker's content addressing
/// and its outcomes by BLAKE3 never skip a decode.
fn salted_png(png: &[u8], salt: &str) -> Vec<u8> {
    // The 8-byte signature and the IHDR chunk (length, type, 13 bytes, CRC) come first.
    const AFTER_IHDR: usize = 8 + 4 + 4 + 13 + 4;
    let text = format!("salt\0{salt}");
    let mut chunk = Vec::with_capacity(12 + text.len());
    chunk.extend_from_slice(&(text.len() as u32).to_be_bytes());
    chunk.extend_from_slice(b"tEXt");
    chunk.extend_from_slice(text.as_bytes());
    let crc = crc32fast::hash(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    [&png[..AFTER_IHDR], &chunk, &png[AFTER_IHDR..]].concat()
}

/// (h): `imager` uploads salted copies of `png` (salted by this run's tag, so a rerun
/// against the same broker decodes again) one after another, keeping one uploaded and
/// waiting behind the one the broker decodes (its line takes 8 per user), and deletes
/// each once its thumbnail is made (polled with `FileInfo`); once the first is made, the
/// chat phase runs beside them. Stopped, it deletes what it holds before it returns.
async fn chat_beside_images(
    chat: &Chat,
    sender: &Arc<Client>,
    events: &mut switchboard_client::Events,
    imager: &Arc<Client>,
    png: Arc<Vec<u8>>,
) -> Result<ImageChat> {
    let stop = Arc::new(AtomicBool::new(false));
    // When each thumbnail was seen, from the phase's clock.
    let made: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let mut uploads = {
        let (client, stop, made) = (imager.clone(), stop.clone(), made.clone());
        let tag = run_tag();
        tokio::spawn(async move {
            let mut started_tx = Some(started_tx);
            let mut held: VecDeque<FileId> = VecDeque::new();
            // Thumbnailed, deleted once the next is uploaded (the delete's commit would
            // otherwise leave the decoder without an image waiting).
            let mut done: Option<FileId> = None;
            let result = async {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    // One waiting behind the one in the decoder.
                    while held.len() < 2 {
                        n += 1;
                        let bytes = salted_png(&png, &format!("{tag}-{n}"));
                        let new = NewUpload {
                            name: format!("bench-image-{n}.png"),
                            size: bytes.len() as u64,
                            content_type: "image/png".into(),
                            blake3: *blake3::hash(&bytes).as_bytes(),
                        };
                        let status = client.begin_upload(new).await?;
                        held.push_back(status.file);
                        client
                            .upload_from(status.file, 0, &mut std::io::Cursor::new(bytes), |_| {})
                            .await
                            .map_err(|e| Error::Protocol(format!("image upload beside the chat: {e}")))?;
                    }
                    if let Some(file) = done {
                        client.delete_file(file).await?;
                        done = None;
                    }
                    let first = held[0];
                    let asked = Instant::now();
                    loop {
                        if stop.load(Ordering::Acquire) {
                            return Ok(());
                        }
                        match client.file_info(first).await?.state {
                            switchboard_protocol::FileState::Complete { thumbnail: Some(_) } => break,
                            _ if asked.elapsed() > THUMBNAIL_WAIT => {
                                return Err(Error::Protocol(format!(
                                    "no thumbnail of an image within {} s",
                                    THUMBNAIL_WAIT.as_secs()
                                )));
                            }
                            _ => tokio::time::sleep(THUMBNAIL_POLL).await,
                        }
                    }
                    made.lock().unwrap_or_else(|p| p.into_inner()).push(Instant::now());
                    if let Some(tx) = started_tx.take() {
                        let _ = tx.send(());
                    }
                    done = held.pop_front();
                }
                Ok::<_, Error>(())
            }
            .await;
            // Nothing left behind on the broker (a complete file does not expire); an
            // upload cut short is cancelled. What could be neither is counted.
            let mut left_behind = 0;
            for file in held.into_iter().chain(done) {
                if client.delete_file(file).await.is_err() && client.cancel_upload(file).await.is_err() {
                    left_behind += 1;
                }
            }
            result.map(|()| left_behind)
        })
    };
    if started.await.is_err() {
        return match (&mut uploads).await? {
            Err(e) => Err(e),
            Ok(_) => Err(Error::Protocol("no image was thumbnailed before the chat beside them".into())),
        };
    }
    let begun = Instant::now();
    let result = chat.run(sender, events).await;
    let ended = Instant::now();
    let running = !uploads.is_finished();
    stop.store(true, Ordering::Release);
    let outcome = match tokio::time::timeout(THUMBNAIL_WAIT, &mut uploads).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Err(Error::Protocol(e.to_string())),
        Err(_) => {
            // Not left running past the phase (a dropped handle would detach it).
            uploads.abort();
            Err(Error::Protocol("the image uploader did not stop".into()))
        }
    };
    let (stopped, left_behind) = match (running, outcome) {
        (true, Ok(left)) => (None, left),
        (true, Err(e)) => (Some(format!("after the phase: {e}")), 0),
        (false, Ok(left)) => (Some("stopped".to_owned()), left),
        (false, Err(e)) => (Some(e.to_string()), 0),
    };
    let times: Vec<Instant> = made
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .filter(|t| (begun..=ended).contains(t))
        .collect();
    Ok(ImageChat {
        chat: result?,
        seconds: ended.duration_since(begun).as_secs_f64(),
        thumbnailed: times.len(),
        gaps: Gaps::of(begun, &times, ended),
        stopped,
        left_behind,
    })
}

/// The waits for a thumbnail during (h): from the phase's start to the first, between
/// each two (the interior ones: a whole decode each), and from the last to the end.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Gaps {
    /// The longest of all, seconds.
    longest_s: f64,
    /// The median of the interior ones, seconds, and how many there are.
    interior_median_s: f64,
    interior: usize,
}

impl Gaps {
    /// Of thumbnails made at `times` (in order) in a phase from `begun` to `ended`.
    fn of(begun: Instant, times: &[Instant], ended: Instant) -> Gaps {
        let secs = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
        let interior: Vec<f64> = times.windows(2).map(|w| secs(w[0], w[1])).collect();
        let edges = match (times.first(), times.last()) {
            (Some(&first), Some(&last)) => [secs(begun, first), secs(last, ended)],
            _ => [secs(begun, ended), 0.0],
        };
        Gaps {
            longest_s: interior.iter().chain(&edges).copied().fold(0.0, f64::max),
            interior: interior.len(),
            interior_median_s: median(interior),
        }
    }

    /// `THUMBNAIL_GAP`, or five times the usual interior wait where at least three say
    /// what usual is (fewer, or the two partial ones at the edges, do not: with one
    /// thumbnail in the phase the median of the edges was half the phase, and a stall
    /// after it passed, a review found).
    fn bound_s(&self) -> f64 {
        let floor = THUMBNAIL_GAP.as_secs_f64();
        if self.interior >= 3 { floor.max(5.0 * self.interior_median_s) } else { floor }
    }
}

/// File contents for the harness: a 1 MiB pseudo-random block repeated, with the first
/// 8 bytes replaced by a salt so that every upload is a different file. Read through
/// `AsyncRead`/`AsyncSeek` like a file, without holding the file in memory.
#[derive(Clone)]
struct Pattern {
    base: Arc<Bytes>,
    salt: [u8; 8],
    size: u64,
    pos: u64,
}

impl Pattern {
    /// The shared block.
    fn base() -> Bytes {
        let mut rng = SplitMix(0x5eed);
        (0..MIB / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect()
    }

    fn new(base: &Arc<Bytes>, salt: u64, size: u64) -> Pattern {
        Pattern { base: base.clone(), salt: salt.to_le_bytes(), size, pos: 0 }
    }

    /// Writes bytes `pos .. pos + out.len()` into `out`.
    fn fill(&self, pos: u64, out: &mut [u8]) {
        let block = self.base.len() as u64;
        let mut done = 0;
        while done < out.len() {
            let at = pos + done as u64;
            let from = (at % block) as usize;
            let n = (self.base.len() - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.base[from..from + n]);
            done += n;
        }
        for (i, b) in self.salt.iter().enumerate() {
            if let Some(slot) = (i as u64).checked_sub(pos).and_then(|j| out.get_mut(j as usize)) {
                *slot = *b;
            }
        }
    }

    /// Its `NewUpload`, with the BLAKE3 of every byte (hashed on the blocking pool).
    async fn new_upload(&self, name: &str) -> Result<NewUpload> {
        let me = self.clone();
        let blake3 = tokio::task::spawn_blocking(move || {
            let mut hasher = blake3::Hasher::new();
            let mut piece = vec![0u8; MIB as usize];
            let mut at = 0;
            while at < me.size {
                let n = (me.size - at).min(MIB) as usize;
                me.fill(at, &mut piece[..n]);
                hasher.update(&piece[..n]);
                at += n as u64;
            }
            *hasher.finalize().as_bytes()
        })
        .await?;
        Ok(NewUpload { name: name.into(), size: self.size, content_type: "application/octet-stream".into(), blake3 })
    }
}

impl AsyncRead for Pattern {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.size.saturating_sub(self.pos)) as usize;
        let pos = self.pos;
        self.fill(pos, buf.initialize_unfilled_to(n));
        buf.advance(n);
        self.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for Pattern {
    fn start_seek(mut self: Pin<&mut Self>, position: SeekFrom) -> std::io::Result<()> {
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start");
        self.pos = match position {
            SeekFrom::Start(p) => p,
            SeekFrom::End(d) => self.size.checked_add_signed(d).ok_or_else(invalid)?,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(invalid)?,
        };
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    use super::*;

    #[test]
    fn the_median_of_rounds_is_the_middle_one_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![0.9, 0.5, 0.7]), 0.7);
        assert_eq!(median(vec![0.8, 0.5, 0.6, 0.9]), 0.7);
        assert_eq!(median(vec![0.4]), 0.4);
        assert!(median(Vec::new()).is_nan());
    }

    #[tokio::test]
    async fn patterns_read_like_files_and_differ_by_salt() {
        let base = Arc::new(Pattern::base());
        let size = 2 * MIB + 100;
        let mut a = Pattern::new(&base, 1, size);
        let mut all = Vec::new();
        a.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len() as u64, size);
        assert_eq!(&all[..8], &1u64.to_le_bytes());
        assert_eq!(&all[MIB as usize + 8..2 * MIB as usize], &base[8..], "the block repeats");
        // Seeking then reading gives the same bytes as reading through.
        assert_eq!(a.seek(SeekFrom::End(0)).await.unwrap(), size);
        a.seek(SeekFrom::Start(5)).await.unwrap();
        let mut tail = vec![0u8; 20];
        a.read_exact(&mut tail).await.unwrap();
        assert_eq!(&tail[..], &all[5..25]);
        // Another salt, another file (and another hash).
        let b = Pattern::new(&base, 2, size);
        let (na, nb) = (a.new_upload("a").await.unwrap(), b.new_upload("b").await.unwrap());
        assert_eq!(na.blake3, *blake3::hash(&all).as_bytes());
        assert_ne!(na.blake3, nb.blake3);
    }

    /// (h)'s images: the same pixels under different bytes, each a PNG a decoder takes
    /// (a chunk with a wrong CRC, or one inserted in the wrong place, fails the decode,
    /// and the broker would make no thumbnail).
    #[test]
    fn salted_images_decode_to_the_same_pixels_under_different_hashes() {
        let png = one_colour_png(1).unwrap();
        let (a, b) = (salted_png(&png, "l1-1"), salted_png(&png, "l1-2"));
        assert_ne!(blake3::hash(&a), blake3::hash(&b));
        for bytes in [&png, &a, &b] {
            let decoded = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap().to_rgb8();
            assert_eq!(decoded.dimensions(), (8_000, 125));
            assert_eq!(decoded.get_pixel(7_999, 124), &image::Rgb([40, 120, 200]));
        }
        assert!(a.len() < 64 * 1024, "one colour compresses: {} bytes", a.len());
    }

    /// (h)'s "throughout": the wait still open when the phase ends counts, and the
    /// bound is not taken from the partial waits at the edges (a decoder that made one
    /// thumbnail and stalled passed twice before, two reviews found).
    #[test]
    fn the_gap_open_at_the_end_counts_as_a_gap_between_thumbnails() {
        let begun = Instant::now();
        let at = |ms: u64| begun + Duration::from_millis(ms);
        let stalled = Gaps::of(begun, &[at(500), at(1_000), at(1_500), at(2_000)], at(10_000));
        assert!((stalled.longest_s - 8.0).abs() < 1e-9 && (stalled.interior_median_s - 0.5).abs() < 1e-9);
        assert!(stalled.longest_s > stalled.bound_s(), "{stalled:?}");
        // One thumbnail, then a stall: the bound is the floor, not half the phase.
        let one = Gaps::of(begun, &[at(500)], at(15_000));
        assert_eq!((one.interior, one.bound_s()), (0, THUMBNAIL_GAP.as_secs_f64()));
        assert!(one.longest_s > one.bound_s());
        // None in a phase shorter than a decode: its one wait is the phase.
        let none = Gaps::of(begun, &[], at(800));
        assert!((none.longest_s - 0.8).abs() < 1e-9 && none.longest_s <= none.bound_s());
        // Slow and steady: the bound follows the usual wait.
        let slow: Vec<Instant> = (1..=5).map(|i| at(3_000 * i)).collect();
        let slow = Gaps::of(begun, &slow, at(16_000));
        assert!((slow.bound_s() - 15.0).abs() < 1e-9 && slow.longest_s <= slow.bound_s());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_limits_measure_real_transfers() {
        let Bulk { up, down, .. } = quinn_bulk(4 * MIB, false).await.unwrap();
        assert!(up > 0.0 && up.is_finite() && down > 0.0 && down.is_finite(), "{up} {down}");
        let dir = tempfile::tempdir().unwrap();
        for how in [Append::Buffered, Append::AsTheBroker] {
            let fsync = fsync_append(dir.path(), 3 * MIB + 5, how).unwrap();
            assert!(fsync > 0.0 && fsync.is_finite(), "{how:?}: {fsync}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the probe file is removed");
        }
    }
}
