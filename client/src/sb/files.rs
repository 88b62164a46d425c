//! `sb upload`, `sb download` and `sb file`: files over transfer streams, with progress
//! bars on stderr (hidden with `--json` or when stderr is not a terminal).
//!
//! An upload's id is saved in `state.json` (`uploads`) under the file's absolute path,
//! size and BLAKE3, with the conversation and caption to send it with, from the moment
//! the broker gives it until the upload completes and is sent, so `sb upload FILE` of
//! the same unchanged file after sb died continues the upload instead of starting
//! another (an expired or cancelled one starts afresh) and sends it where it was meant
//! to go. `sb upload --resume ID FILE` continues a given upload, and fails if it is
//! gone (without FILE, the file this home began it from); `sb uploads` lists the broker's unfinished uploads of the user. One `sb upload`
//! at a time per file and home (`UploadLock`).

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use switchboard_client::{
    Backoff, Client, ClientError, Connector, Identity, TransferError, UploadEvent, Uploader, UploaderConfig, hash_file,
    hex, new_client_id, new_upload, permanent, unhex,
};
use switchboard_protocol::limits::charged_bytes;
use switchboard_protocol::{ClientMsgId, ConvId, ErrorCode, FileId, FileState};

use super::conv::ConvArg;
use super::rerun::Rerun;
use super::{FileCommand, MAX_SAVED_UPLOADS, Out, SavedUpload, update_state};

/// What `sb upload` was asked.
pub struct UploadArgs {
    /// The local file (`None` only with `resume`: the file this home began it from).
    pub path: Option<PathBuf>,
    /// Attach it to this conversation once uploaded.
    pub conv: Option<ConvArg>,
    /// Declared media type (`--type`).
    pub content_type: Option<String>,
    /// Caption of the message (`--caption`).
    pub caption: Option<String>,
    /// Send no message, whatever an earlier run was asked (`--no-send`).
    pub no_send: bool,
    /// Upload id to continue (`--resume`), hex.
    pub resume: Option<String>,
}

/// `sb upload`: begin (or continue) the upload, carry it through drops, then attach it.
pub async fn upload(
    connector: &Connector,
    identity: &Identity,
    home: &Path,
    out: &Out,
    reach: &Rerun,
    args: UploadArgs,
) -> anyhow::Result<()> {
    let path = match (&args.path, &args.resume) {
        (Some(path), _) => std::path::absolute(path).unwrap_or_else(|_| path.clone()),
        (None, Some(id)) => saved_path(home, id)?,
        (None, None) => bail!("which file? `sb upload FILE`"),
    };
    let content_type = args.content_type.clone().unwrap_or_else(|| guess_type(&path).to_owned());
    let new = new_upload(&path, &content_type).await.with_context(|| match (&args.path, &args.resume) {
        // The file this home began it from moved: say how to name it.
        (None, Some(id)) => format!("reading {} (moved? {})", path.display(), resume_command(reach, id)),
        _ => format!("reading {}", path.display()),
    })?;
    if args.conv.is_some() && !args.no_send {
        // The message's caption, file name and type share one bound (the broker's): said
        // before any byte is sent, not after the whole file went up.
        let caption = args.caption.as_deref().unwrap_or_default().len();
        let named = new.name.len() + new.content_type.len();
        let most = switchboard_protocol::limits::MAX_TEXT_BYTES as usize;
        if caption + named > most {
            bail!(
                "the caption ({caption} bytes) with the file's name and type ({named} bytes) pass the {most} bytes \
                 a message carries: nothing uploaded"
            );
        }
    }
    let size = new.size;
    let key = upload_key(&path, size, &new.blake3);
    // Two sb uploading one file would take the upload from each other (`CONFLICT`).
    let _lock = UploadLock::take(home, &key, &path)?;
    let mut uploader = Uploader::new(connector.clone(), identity.clone(), UploaderConfig::default());
    // A conversation the message cannot go to is said before any byte is sent (before,
    // the whole file went up, stayed on the quota, and only then was refused).
    let asked = match (&args.conv, args.no_send) {
        (Some(conv), false) => {
            let client = uploader.client().await?;
            let conv = conv.resolve_to_write(&client).await.context("nothing uploaded")?;
            client.members(conv).await.with_context(|| format!("conversation {conv}: nothing uploaded"))?;
            Some(conv)
        }
        _ => None,
    };

    let saved = load_saved(home, &key)?;
    let saved_id = saved.as_ref().and_then(|s| parse_file_id(&s.file).ok());
    // The same path saved with other contents: the file changed since an upload of it
    // began here. That upload cannot be finished from it; say so, and what it was for
    // (before: a new upload began and sent nothing, silently, the old one kept its quota).
    if saved.is_none() && args.resume.is_none() {
        let here = path.display().to_string();
        let state = super::load_state(home)?;
        for old in state.uploads.iter().filter(|u| key_path(&u.key) == Some(here.as_str())) {
            let was = match (old.conv, &args.conv) {
                (Some(c), None) => format!(" (it was to be sent to conv {c}: give --conv to send this one)"),
                _ => String::new(),
            };
            out.status(json!({"event": "file_changed", "file": old.file, "path": here, "conv": old.conv}), || {
                format!(
                    "{here} changed since upload {} of it began{was}; this is a new upload. `sb file cancel {}` \
                     frees the old one",
                    old.file, old.file
                )
            });
        }
    }
    let (file, fresh) = match (&args.resume, saved_id) {
        (Some(id), _) => {
            let file = parse_file_id(id)?;
            let info = match uploader.client().await?.file_info(file).await {
                Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) => {
                    return Err(crate::Refused::not_found(format!(
                        "upload {id} is gone (expired, cancelled, or not yours): {} starts it again",
                        upload_command(reach, path.as_os_str())
                    ))
                    .into());
                }
                info => info?,
            };
            // Exit status 5, as a file that does not match its hash (a user's trial: 1).
            if info.blake3 != new.blake3 || info.file.size != new.size {
                let why = format!(
                    "{} is not the file of upload {id} (its size or BLAKE3 differs): {} uploads it as a new \
                     file, `sb file cancel {id}` frees the old upload",
                    path.display(),
                    upload_command(reach, path.as_os_str())
                );
                return Err(crate::Refused(ErrorCode::HASH_MISMATCH, why).into());
            }
            (file, false)
        }
        (None, Some(file)) => match uploader.client().await?.upload_status(file).await {
            Ok(_) => (file, false),
            // Expired or cancelled: start again.
            Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) => {
                out.status(json!({"event": "upload_gone", "file": hex(&file)}), || {
                    format!("the earlier upload {} of this file is gone; starting again", hex(&file))
                });
                (begin(&mut uploader, new).await?, true)
            }
            Err(e) => return Err(e.into()),
        },
        (None, None) => (begin(&mut uploader, new).await?, true),
    };
    // Where it goes once uploaded: as asked now, else as asked when this file's upload
    // began here (also when that upload had gone and this one replaces it), with the
    // same idempotency key.
    let earlier = match saved {
        Some(s) if args.resume.is_none() || saved_id == Some(file) => s.conv.map(|conv| Target {
            conv,
            caption: s.caption,
            client_id: s.client_id.as_deref().and_then(parse_client_id).unwrap_or_else(new_client_id),
        }),
        _ => None,
    };
    let target = match (asked, earlier) {
        _ if args.no_send => None,
        // The same message as before keeps its key: a rerun after a lost answer sends it
        // at most once (another caption is another message).
        (Some(conv), earlier) => Some(Target {
            conv,
            caption: args.caption.clone(),
            client_id: earlier
                .filter(|e| e.conv == conv && e.caption == args.caption)
                .map_or_else(new_client_id, |e| e.client_id),
        }),
        (None, earlier) => earlier,
    };
    let remembered = asked.is_none() && target.is_some();
    save_upload(home, &key, file, target.as_ref())?;
    let conv = target.as_ref().map(|t| t.conv);
    out.line(
        json!({"event": "upload", "file": hex(&file), "path": path.display().to_string(), "conv": conv,
            "conv_from_earlier_run": remembered}),
        || {
            let then = match conv {
                Some(c) if remembered => {
                    format!(" (then sending it to conv {c} as the run that began it was asked; --no-send: do not)")
                }
                Some(c) => format!(" (then sending it to conv {c})"),
                None => String::new(),
            };
            // The id stands alone, ended by a space or the line's end (a script takes the
            // word after "as"; it was followed by a comma).
            format!("uploading {} as {}{then}", path.display(), hex(&file))
        },
    );

    let bar = progress_bar(out, size);
    let mut first = true;
    let result = uploader
        .upload(file, &path, |event| match event {
            UploadEvent::Resumed { offset, .. } => {
                // After a stall the rate and ETA start over rather than average it in.
                resume_at(&bar, offset);
                let event = if first && fresh { "started" } else { "resumed" };
                first = false;
                if out.json {
                    super::say(json!({"event": event, "file": hex(&file), "offset": offset, "size": size}));
                } else if event == "resumed" {
                    bar.suspend(|| eprintln!("sb: resuming the upload at byte {offset} of {size}"));
                }
            }
            UploadEvent::Durable { offset, .. } => {
                bar.set_position(offset);
                if out.json {
                    super::say(json!({"event": "durable", "file": hex(&file), "offset": offset, "size": size}));
                }
            }
            UploadEvent::Retrying { error, code, retry_in_ms, reconnect } => {
                let value = json!({"event": "retrying", "file": hex(&file), "error": error, "code": code.map(|c| c.0),
                    "retry_in_ms": retry_in_ms, "reconnect": reconnect});
                bar.suspend(|| {
                    out.status(value, || format!("{error}; retrying in {:.1} s", retry_in_ms as f64 / 1000.0));
                });
            }
        })
        .await;
    bar.finish_and_clear();
    let published = match result {
        Ok(published) => published,
        Err(e) if e.code() == Some(ErrorCode::CONFLICT) => {
            // Another of the user's devices (or an sb in another home) took the upload
            // over: it goes on there. Kept here, with where it was to be sent, for the
            // same command to take it back or, once it is complete, to send it.
            let unsent = match &target {
                Some(t) => format!("nothing was sent to conversation {} from here; ", t.conv),
                None => String::new(),
            };
            return Err(anyhow::Error::new(e).context(format!(
                "upload {} was taken over by another of your devices: {unsent}run the same command again to \
                 continue it here{}",
                hex(&file),
                if target.is_some() { ", or to send it once it is complete (at most once)" } else { "" }
            )));
        }
        Err(e) if e.code() == Some(ErrorCode::STORAGE_FULL) => {
            // The broker's disk filled while the upload stood still: it is kept there,
            // and here, for the same command to continue once there is room.
            return Err(anyhow::Error::new(e).context(format!(
                "upload {} is kept at what the broker stored: run the same command again later to continue it",
                hex(&file)
            )));
        }
        Err(e) => {
            // Retrying cannot finish it: forget it, so the next `sb upload` starts afresh.
            if !matches!(
                e,
                TransferError::Client(_) | TransferError::Stream(_) | TransferError::Reset(_) | TransferError::Io(_)
            ) {
                forget_upload(home, &key)?;
            }
            // The type check runs on the first bytes sent, so its refusal comes here.
            let mismatch = e.code() == Some(ErrorCode::TYPE_MISMATCH);
            let e = anyhow::Error::new(e);
            return Err(if mismatch { e.context(TYPE_HINT) } else { e });
        }
    };
    out.line(
        json!({"event": "uploaded", "file": hex(&published.file), "name": published.name, "size": published.size,
            "content_type": published.content_type}),
        || {
            format!(
                "uploaded {} ({} bytes, {}): {}",
                published.name,
                published.size,
                published.content_type,
                hex(&published.file)
            )
        },
    );
    if target.is_none() && args.resume.is_some() && !args.no_send {
        out.status(json!({"event": "not_sent", "file": hex(&published.file)}), || {
            let command = resume_command(reach, &hex(&published.file)).then("--conv").blank("CONV", "the conversation");
            // A message may carry it already (`sb file send` while it uploaded): this
            // run cannot tell, so it says what it did, not where the file is.
            format!("not sent by this run (unless `sb file send` sent it already, {command} sends it)")
        });
    }
    if let Some(t) = target {
        let caption = t.caption.as_deref().unwrap_or("");
        let seq = match send_files(&mut uploader, t.conv, t.client_id, caption, published.file).await {
            Ok(seq) => seq,
            Err((e, maybe_stored)) => {
                // Kept for a run again after a lost connection or an answer that asks
                // for a retry (the same key sends it at most once); a refusal (no longer
                // a member, say) of a message no attempt may have stored is final.
                // `INTERNAL` may have stored it: it was taken for a refusal, the key
                // forgotten and "not sent" said, and the `sb file send` advised sent it
                // twice; so may an attempt cut off before a refusal the broker makes
                // before it looks at the key (`RATE_LIMITED`, `STORAGE_FULL`): reviews.
                let id = hex(&published.file);
                if refused_for_good(&e) && !maybe_stored {
                    forget_upload(home, &key)?;
                    return Err(anyhow::Error::new(e).context(format!(
                        "uploaded as {id}, but not sent to conversation {}: the file is kept on your quota \
                         (`sb file send CONV {id}` sends it elsewhere; `sb file delete {id}` frees it)",
                        t.conv
                    )));
                }
                // It may have been sent already: deleting the file now could leave the
                // message without it.
                return Err(anyhow::Error::new(e).context(format!(
                    "uploaded as {id}; sending it to conversation {} did not finish (it may be stored): run the same \
                     command again to send it (at most once)",
                    t.conv
                )));
            }
        };
        out.line(json!({"event": "sent", "conv": t.conv, "seq": seq, "file": hex(&published.file)}), || {
            format!("conv {} seq {seq}", t.conv)
        });
    }
    forget_upload(home, &key)?;
    if let Ok(client) = uploader.client().await {
        client.close();
    }
    Ok(())
}

/// `BeginUpload`; refused for the quota, with what takes it and how to free it (a
/// stale unfinished upload holds its whole declared size, which is easy to forget).
async fn begin(uploader: &mut Uploader, new: switchboard_protocol::NewUpload) -> anyhow::Result<FileId> {
    uploader.begin(new).await.map(|status| status.file).map_err(with_limit_hint)
}

/// What to do about `TYPE_MISMATCH` (refused on the transfer stream, at the first bytes).
const TYPE_HINT: &str = "its first bytes are not the type it was declared as (by --type, or from its name): \
                         `--type application/octet-stream` sends it as plain bytes";

/// A refusal for the quota (of an upload, or of a forward's copy) with what takes the
/// quota and how to free it (a stale unfinished upload holds its whole declared size,
/// which is easy to forget), or for too many unfinished uploads with how to see and end
/// them; any other error as it is.
fn with_limit_hint(e: ClientError) -> anyhow::Error {
    if e.code() == Some(ErrorCode::TOO_MANY_UPLOADS) {
        return anyhow::Error::new(e).context(
            "you have as many unfinished uploads as the broker allows (`sb quota` says how many): \
             `sb uploads` lists them; finish one (`sb upload --resume ID FILE`) or cancel it (`sb file cancel ID`)",
        );
    }
    if e.code() != Some(ErrorCode::QUOTA_EXCEEDED) {
        return e.into();
    }
    anyhow::Error::new(e).context(
        "no room left in your quota (`sb quota` says what takes it): unfinished uploads count at their full \
         size (`sb uploads` lists them, `sb file cancel ID` frees one), and so do your stored files, forwarded \
         copies among them (`sb files`, `sb file delete ID`, `sb file withdraw ID`)",
    )
}

/// `sb uploads`: my unfinished uploads, from any device, with the local file of those
/// begun in this home.
pub async fn uploads(client: &Client, home: &Path, out: &Out, reach: &Rerun) -> anyhow::Result<()> {
    let state = super::load_state(home)?;
    let now = super::now_ms();
    let listed = client.list_uploads().await?;
    // What this home saved and the broker no longer has in progress: complete with its
    // message still to send (the next `sb upload` of the file sends it), or gone.
    let mut saved_only = Vec::new();
    for s in state.uploads.iter().filter(|s| !listed.iter().any(|u| hex(&u.file.file) == s.file)) {
        let Ok(id) = parse_file_id(&s.file) else { continue };
        let status = match client.upload_status(id).await {
            Ok(status) => Some(status),
            Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) => None,
            Err(e) => return Err(e.into()),
        };
        saved_only.push((s, status));
    }
    if listed.is_empty() && saved_only.is_empty() {
        out.status(json!({"event": "no_uploads"}), || "no unfinished uploads".into());
    }
    for (s, status) in saved_only {
        let path = key_path(&s.key).unwrap_or("?");
        let complete = status.as_ref().is_some_and(|st| st.complete);
        out.line(
            json!({"file": s.file, "path": path, "conv": s.conv, "saved": true,
                "state": match status { Some(_) if complete => "complete", Some(_) => "in_progress", None => "gone" }}),
            || match (complete, s.conv, status.is_some()) {
                (true, Some(c), _) => format!(
                    "{}  from {path}  uploaded; its message to conv {c} is not known sent: {} sends it (at most \
                     once)",
                    s.file,
                    upload_command(reach, path.as_ref())
                ),
                (true, None, _) => format!("{}  from {path}  uploaded", s.file),
                (false, _, true) => format!("{}  from {path}  in progress", s.file),
                (false, _, false) => {
                    format!(
                        "{}  from {path}  gone (expired or cancelled): {} starts it again",
                        s.file,
                        upload_command(reach, path.as_ref())
                    )
                }
            },
        );
    }
    for u in listed {
        let id = hex(&u.file.file);
        let here = state.uploads.iter().find(|s| s.file == id);
        let path = here.and_then(|s| key_path(&s.key));
        // `sb upload PATH` continues it only while the file there is the one it began
        // from (same size, same BLAKE3): else it starts another upload (before, this
        // said it continued it, and following that sent the whole file again).
        // The size first: a file of another size (or a FIFO, a device) is not read.
        let changed = match path {
            Some(p) => match std::fs::metadata(p) {
                Ok(m) if m.is_file() && m.len() == u.file.size => {
                    match switchboard_client::hash_file(Path::new(p)).await {
                        Ok((size, hash)) => size != u.file.size || hash != u.blake3,
                        Err(_) => true,
                    }
                }
                _ => true,
            },
            None => false,
        };
        let conv = here.and_then(|s| s.conv);
        let percent = percent(u.offset, u.file.size);
        out.line(
            json!({"file": id, "name": u.file.name, "size": u.file.size, "offset": u.offset,
                "content_type": u.file.content_type, "blake3": hex(&u.blake3), "created_ms": u.created_ms,
                "expires_ms": u.expires_ms, "path": path, "path_changed": path.map(|_| changed), "conv": conv}),
            || {
                let left = super::span(u.expires_ms.saturating_sub(now));
                let local = path.map_or(String::new(), |p| format!("  from {p}"));
                let then = conv.map_or(String::new(), |c| format!(" for conv {c}"));
                // What finishes it from here, or from anywhere with the file.
                let next = match path {
                    Some(p) if !changed => format!("{} continues it", upload_command(reach, p.as_ref())),
                    Some(p) => format!(
                        "{p} is no longer the file it began from (changed or gone; `sb upload` of it now starts \
                         another upload): {} with a copy of the original continues it",
                        resume_command(reach, &id)
                    ),
                    None => format!("{} continues it", resume_command(reach, &id)),
                };
                format!(
                    "{id}  {}  {} of {} bytes ({percent}%)  expires in {left}{local}{then}: {next}, \
                     `sb file cancel {id}` frees it",
                    u.file.name, u.offset, u.file.size
                )
            },
        );
    }
    Ok(())
}

/// `sb files`: my stored files, what my quota counts besides uploads in progress.
pub async fn files(client: &Client, out: &Out) -> anyhow::Result<()> {
    let listed = client.list_files().await?;
    if listed.is_empty() {
        out.status(json!({"event": "no_files"}), || "no stored files".into());
    }
    for f in listed {
        let id = hex(&f.file.file);
        out.line(
            json!({"file": id, "name": f.file.name, "size": f.file.size, "content_type": f.file.content_type,
                "blake3": hex(&f.blake3), "created_ms": f.created_ms, "held": f.held}),
            || {
                let kept = if f.held { "" } else { "  (not held: goes with the last message carrying it)" };
                // As `sb quota` counts it: whole 4 KiB blocks.
                let size = indicatif::HumanBytes;
                let counted = size(charged_bytes(f.file.size));
                format!("{id}  {}  {} (counts {counted}){kept}", f.file.name, size(f.file.size))
            },
        );
    }
    Ok(())
}

/// `sb quota`: what my files take of my quota, and my upload limits, with what the used
/// bytes are: my stored files and my uploads in progress (each in whole 4 KiB blocks,
/// `charged_bytes`), and the rest, bytes of mine the broker removed and has not freed yet.
pub async fn quota(client: &Client, out: &Out) -> anyhow::Result<()> {
    let u = client.usage().await?;
    let files = charged_total(client.list_files().await?.iter().map(|f| f.file.size));
    let uploads = charged_total(client.list_uploads().await?.iter().map(|u| u.file.size));
    // Read one after the other: a change in between may show for a moment.
    let unfreed = u.stored_bytes.saturating_sub(files.saturating_add(uploads));
    let percent = percent(u.stored_bytes, u.quota_bytes);
    out.line(
        json!({"stored_bytes": u.stored_bytes, "quota_bytes": u.quota_bytes,
            "free_bytes": u.quota_bytes.saturating_sub(u.stored_bytes), "files_bytes": files,
            "uploads_bytes": uploads, "unfreed_bytes": unfreed, "uploads_in_progress": u.uploads_in_progress,
            "max_uploads_in_progress": u.max_uploads_in_progress, "max_file_bytes": u.max_file_bytes}),
        || {
            // Sizes as people read them (binary units: 1 KiB = 1024 bytes); --json has bytes.
            let size = indicatif::HumanBytes;
            let waiting = if unfreed > 0 {
                // Removed uploads and files, and the partial copy of an upload whose bytes
                // were stored already, until the broker has freed them on its disk.
                format!(", {} being freed (removed uploads and files count until the broker frees them)", size(unfreed))
            } else {
                String::new()
            };
            format!(
                "{} of {} used ({percent}%), {} free: files {}, uploads {}{waiting} (each file in whole 4 KiB \
                 blocks); {} of {} uploads in progress; files up to {}",
                size(u.stored_bytes),
                size(u.quota_bytes),
                size(u.quota_bytes.saturating_sub(u.stored_bytes)),
                size(files),
                size(uploads),
                u.uploads_in_progress,
                u.max_uploads_in_progress,
                size(u.max_file_bytes)
            )
        },
    );
    Ok(())
}

/// Where an upload goes once complete.
struct Target {
    conv: ConvId,
    caption: Option<String>,
    /// The message's idempotency key, saved with the upload.
    client_id: ClientMsgId,
}

/// Whether a send of an uploaded file's message that failed with `e` stored nothing, and
/// no resend would: a refusal, not an answer asking for a retry (`OVERLOADED`, and
/// `INTERNAL`, after which it may be stored) nor a lost connection.
fn refused_for_good(e: &ClientError) -> bool {
    crate::refused(e) && !crate::worth_resending(e)
}

/// Sends the files message, again (same client id, so at most once) when the connection
/// drops before the answer or the broker asks for a retry (`worth_resending`), up to
/// `SEND_ATTEMPTS` times. A failure says too whether an attempt may have stored it
/// (sent, and answered with no refusal): then the last answer, even a refusal checked
/// before the key (`RATE_LIMITED`, `STORAGE_FULL`), does not say it was not.
async fn send_files(
    uploader: &mut Uploader,
    conv: ConvId,
    client_id: ClientMsgId,
    caption: &str,
    file: FileId,
) -> Result<u64, (ClientError, bool)> {
    const SEND_ATTEMPTS: u32 = 8;
    let mut backoff = Backoff::new(100, 5_000);
    let mut attempt = 0;
    let mut maybe_stored = false;
    loop {
        attempt += 1;
        let sent = match uploader.client().await {
            Ok(client) => {
                let sent = client.send_files_with_id(conv, client_id, caption, &[file]).await;
                maybe_stored |= sent.as_ref().is_err_and(|e| !crate::refused(e));
                sent
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok((seq, _)) => return Ok(seq),
            // As `sb send` does: a lost connection, and the broker's `OVERLOADED` (nothing
            // done) or `INTERNAL` (may be done: the same key finds it). Both were final
            // here (a review).
            Err(e) if attempt < SEND_ATTEMPTS && crate::worth_resending(&e) && !permanent(&e) => {
                let jitter = u64::from_le_bytes(new_client_id()[..8].try_into().unwrap_or_default());
                tokio::time::sleep(std::time::Duration::from_millis(backoff.next_ms(jitter))).await;
            }
            Err(e) => return Err((e, maybe_stored)),
        }
    }
}

/// `sb download`: the file's description first (it also opens the way for transfer
/// streams), then the bytes. Into a regular file (or a new name) they go to a partial
/// file beside it (`partial_path`: named by the file and range, locked while one `sb`
/// writes it), synced and, for a whole file, checked against the BLAKE3, then renamed
/// over OUT: a failed or interrupted download leaves OUT as it was. The partial file
/// stays after a failure a later run may get past (the connection, the broker, Ctrl-C,
/// `kill -9`), and the same command run again resumes from its length; it goes after a
/// failure that would come again (no such file, bytes that do not match). A device or
/// pipe (`/dev/null`) is written directly, never synced, checked or removed.
pub async fn download(
    connector: &Connector,
    identity: &Identity,
    out: &Out,
    id: &str,
    path: &Path,
    offset: u64,
    length: u64,
) -> anyhow::Result<()> {
    let file = parse_file_id(id)?;
    // The bytes go to standard output: every report goes to standard error, so that a
    // pipe carries the file's bytes alone (before, the last report followed them).
    let (path, on_stderr) =
        if path == Path::new("-") { (Path::new("/dev/stdout"), true) } else { (path, is_stdout(path)) };
    if on_stderr && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        // The bytes are the uploader's: on a terminal they could drive it (rewrite what
        // it shows, set its title, answer back), as curl refuses binary output there.
        bail!("standard output is a terminal: nothing downloaded; give OUT a file name, or pipe it (`| less`)");
    }
    let to_stderr = out.to_stderr();
    let out = if on_stderr { &to_stderr } else { out };
    // `OUT/` names a directory: one that is not there is said now, not after the
    // bytes came (they could not be renamed into it).
    let raw = path.as_os_str().to_string_lossy();
    let last = raw.rsplit(['/', std::path::MAIN_SEPARATOR]).next().unwrap_or_default();
    if matches!(last, "" | "." | "..") && !path.is_dir() {
        let what = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist (create the directory first)",
            _ => "is not a directory",
        };
        bail!("{} {what}: nothing downloaded", path.display());
    }
    // Said before anything is asked (the partial file beside OUT is not the user's name).
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} does not exist: nothing downloaded to {}", dir.display(), path.display())
        }
        Ok(m) if !m.is_dir() => bail!("{} is not a directory: nothing downloaded to {}", dir.display(), path.display()),
        // Anything else is said where the file is made.
        _ => {}
    }
    let mut client = connector.connect(identity).await?;
    let info = match client.file_info(file).await {
        Ok(info) => info,
        Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) => {
            // Gone, or no longer mine to read: what an earlier run kept is worthless.
            let dropped = drop_partials(path, &file);
            let said = cannot_read(id, e);
            return Err(if dropped > 0 {
                said.context("the bytes an earlier run downloaded are deleted")
            } else {
                said
            });
        }
        Err(e) => return Err(e.into()),
    };
    // `NOT_READY`, as the broker says of a download of it: exit status 6, try again
    // later (a user's trial: 1, so a script retrying on 6 never retried).
    if let FileState::Uploading { offset: have } = info.state {
        let why = format!(
            "{id} is still being uploaded ({have} of {} bytes): nothing downloaded; download it once it is complete",
            info.file.size
        );
        return Err(crate::Refused(ErrorCode::NOT_READY, why).into());
    }
    // Into a directory: under the file's own name there (as `cp` does), a name its
    // uploader chose: never a hidden one (`.bashrc`), never one with a path in it (a
    // broker refuses those; this does not rely on it), never over a file already there.
    let named;
    let into_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
    let path = if into_dir {
        let name = &info.file.name;
        if name.starts_with('.') || name.contains(['/', '\\']) || name.chars().any(char::is_control) {
            bail!("{id} is named {name:?}: give OUT a file name to download it");
        }
        named = path.join(name);
        if std::fs::symlink_metadata(&named).is_ok() {
            bail!("{} exists: nothing downloaded (give OUT as a file name to replace it)", named.display());
        }
        named.as_path()
    } else {
        path
    };
    let size = info.file.size;
    if offset > 0 && offset >= size {
        // An empty range would replace OUT with an empty file. `INVALID`, as the broker
        // answers such an offset (status 5; it was 1: a trial).
        return Err(crate::Refused(
            ErrorCode::INVALID,
            format!(
                "--offset {offset} is at or past the end of the file ({size} bytes): nothing to download, {} not written",
                path.display()
            ),
        )
        .into());
    }
    let expected = if length == 0 { size.saturating_sub(offset) } else { length.min(size.saturating_sub(offset)) };
    // Written in place, with nothing kept for a later run: a device, a pipe, or standard
    // output whatever it is (a file the shell opened for it has no directory of ours).
    let special = on_stderr || std::fs::metadata(path).is_ok_and(|m| !m.is_file());
    let partial = if special { path.to_owned() } else { partial_path(path, &file, offset, expected) };
    // Only a whole file's bytes are kept for a later run: its BLAKE3 checks them.
    let whole = offset == 0 && expected == size;
    let (sink, kept) = if special {
        (open_in_place(path).with_context(|| format!("opening {}", path.display()))?, 0)
    } else {
        open_partial(&partial, path, expected, whole).await?
    };
    // What goes out in place is hashed as it goes: nothing is kept to check after.
    let mut sink = Hashing { inner: sink, hasher: blake3::Hasher::new() };
    if kept > 0 {
        out.status(json!({"event": "download_resumed", "file": hex(&file), "at": offset + kept}), || {
            format!("resuming the download at byte {} from {}", offset + kept, partial.display())
        });
    }
    let written: Result<_, Failure> = async {
        let bar = progress_bar(out, expected);
        let mut done = kept;
        resume_at(&bar, done);
        let mut backoff = Backoff::new(200, 5_000);
        let mut last_progress = std::time::Instant::now();
        // Resumed where the bytes written so far end, on a new connection, after any
        // failure a new connection can get past (a dropped connection, a broker restart,
        // a stream reset for reading too slowly), until `DOWNLOAD_GIVE_UP` passes
        // without a byte.
        while done < expected {
            let got = std::cell::Cell::new(0u64);
            let range = client
                .download(file, offset + done, expected - done, &mut sink, |w| {
                    got.set(w);
                    bar.set_position(done + w);
                })
                .await;
            done += got.get();
            let error = match range {
                Ok(_) if done >= expected => break,
                // The broker said the range was whole short of what was asked (a
                // broker's fault; before, the loop ended and the bytes were said written).
                Ok(r) => {
                    return Err(Failure::KeepBytes(anyhow!(
                        "the broker ended the download at byte {} of {} (it gave the file's size as {})",
                        offset + done,
                        offset + expected,
                        r.size
                    )));
                }
                Err(e) => e,
            };
            if got.get() > 0 {
                last_progress = std::time::Instant::now();
                backoff.reset();
            }
            if error.code() == Some(ErrorCode::NOT_FOUND) {
                // Answered or reset mid-way: the file is gone, or no longer ours to read.
                // Its bytes are worthless and trying again cannot help (before, a reset
                // was retried, and the retry's refusal said the same command resumes).
                // Written in place (standard output, a pipe, a device): nothing to
                // delete, and what went out is short.
                let bytes = if special {
                    format!("{} of the {expected} bytes went out: the output is incomplete", done)
                } else {
                    "the bytes downloaded so far are deleted".to_owned()
                };
                return Err(Failure::DropBytes(anyhow::Error::new(error).context(format!(
                    "{} cannot be read any more: it was deleted, or you are no longer in a conversation \
                     that carries it; {bytes}",
                    hex(&file)
                ))));
            }
            if !switchboard_client::transient(&error) {
                // A revoked device or a disabled account may come back: the bytes stay.
                return Err(Failure::KeepBytes(error.into()));
            }
            if last_progress.elapsed() > DOWNLOAD_GIVE_UP {
                return Err(Failure::KeepBytes(error.into()));
            }
            let delay = backoff.next_ms(switchboard_client::random_u64());
            // Said on a line of its own, not after the bar's (as the upload does).
            bar.suspend(|| out.status(json!({"event": "download_interrupted", "file": hex(&file), "at": offset + done, "error": error.to_string(), "retry_in_ms": delay}), || {
                format!("download interrupted at byte {} ({error}); resuming in {delay} ms", offset + done)
            }));
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
            client.close();
            client = loop {
                match connector.connect(identity).await {
                    Ok(c) => break c,
                    Err(e) if last_progress.elapsed() <= DOWNLOAD_GIVE_UP && !permanent(&e) => {
                        let delay = backoff.next_ms(switchboard_client::random_u64());
                        bar.suspend(|| out.status(json!({"event": "reconnect_failed", "error": e.to_string(), "retry_in_ms": delay}), || {
                            format!("cannot reach the broker ({e}); trying again in {delay} ms")
                        }));
                        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                    }
                    Err(e) => return Err(Failure::KeepBytes(e.into())),
                }
            };
        }
        bar.finish_and_clear();
        let range = switchboard_client::DownloadRange { offset, length: expected, size };
        if special {
            // A whole file written in place is checked too (before, `download ID - | tar
            // x` took damaged bytes and exited 0): the output is not the file.
            if whole && sink.hasher.finalize().as_bytes() != &info.blake3 {
                return Err(Failure::KeepBytes(anyhow!(
                    "the bytes written to {} do not match the file's BLAKE3: the output is not the file",
                    path.display()
                )));
            }
            return Ok((range, whole));
        }
        let local = |e: std::io::Error, what: &str| Failure::KeepBytes(anyhow::Error::new(e).context(format!("{what} {}", partial.display())));
        sink.inner.sync_all().await.map_err(|e| local(e, "writing"))?;
        if whole {
            let (_, hash) = hash_file(&partial).await.map_err(|e| local(e, "reading"))?;
            if hash != info.blake3 {
                return Err(Failure::DropBytes(anyhow!(
                    "the downloaded bytes do not match the file's BLAKE3; {} left as it was",
                    path.display()
                )));
            }
        }
        // A file replaced keeps its permissions (a private file stays private).
        if let Ok(old) = std::fs::metadata(path) {
            std::fs::set_permissions(&partial, old.permissions()).map_err(|e| local(e, "setting the permissions of"))?;
        }
        // Into a directory, never over a file made under the name since it was looked at.
        if !put_in_place(&partial, path, into_dir).map_err(|e| local(e, "renaming into place"))? {
            return Err(Failure::DropBytes(anyhow!(
                "{} was made while the file downloaded: nothing replaced (give OUT as a file name)",
                path.display()
            )));
        }
        Ok((range, whole))
    }
    .await;
    client.close();
    drop(sink);
    let (range, whole) = match written {
        Ok(done) => done,
        Err(Failure::DropBytes(e)) => {
            if !special {
                let _ = std::fs::remove_file(&partial);
            }
            return Err(e);
        }
        Err(Failure::KeepBytes(e)) if special => return Err(e),
        Err(Failure::KeepBytes(e)) if !whole => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        Err(Failure::KeepBytes(e)) => {
            let have = std::fs::metadata(&partial).map_or(0, |m| m.len());
            return Err(e.context(format!(
                "{have} bytes are kept in {}: the same command resumes from there",
                partial.display()
            )));
        }
    };
    // A range past the end of the file is cut at its end: said, not silent.
    let short = length.saturating_sub(range.length);
    out.line(
        json!({"event": "downloaded", "file": hex(&file), "out": path.display().to_string(), "offset": range.offset,
            "length": range.length, "size": range.size, "verified": whole, "short_of_length": short}),
        || {
            let check = if whole { ", BLAKE3 verified" } else { "" };
            let cut = if short > 0 {
                format!("; the file ends there, {short} bytes short of --length")
            } else {
                String::new()
            };
            format!(
                "wrote {} bytes ({}..{} of {}) to {}{check}{cut}",
                range.length,
                range.offset,
                range.offset + range.length,
                range.size,
                path.display()
            )
        },
    );
    Ok(())
}

/// Whether `path` names this process's standard output (the same file, pipe or device
/// as `/dev/stdout`).
fn is_stdout(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), std::fs::metadata("/dev/stdout")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// How long `sb download` keeps resuming a download that makes no progress.
const DOWNLOAD_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a download stopped: whether its partial file is worth keeping.
enum Failure {
    /// A later run may get past it (the connection, the broker, a revoked device or a
    /// disabled account, the local disk): keep the bytes.
    KeepBytes(anyhow::Error),
    /// The bytes are worthless (the file gone or no longer readable, bytes that do not
    /// match): drop them.
    DropBytes(anyhow::Error),
}

/// The name beside `path` of the partial download of `expected` bytes of `file` from
/// `offset`: `.NAME.ID.OFFSET+LENGTH.sb-part` (`ID`: the file id's first 16 hex
/// digits), so only a run of the same download resumes it. `NAME` is OUT's name cut to
/// `PARTIAL_NAME_MAX` bytes (a 255-byte name, which an uploader may choose, made a
/// partial name past the file system's limit, and every download into a directory
/// failed).
fn partial_path(path: &Path, file: &FileId, offset: u64, expected: u64) -> PathBuf {
    path.with_file_name(format!(".{}.{}.{offset}+{expected}.sb-part", partial_stem(path), &hex(file)[..16]))
}

/// Puts the finished `partial` at `path`, replacing what is there unless `keep` (then
/// `false` if the name is taken, `partial` left as it was). Kept by linking, which fails
/// if the name is taken where a rename replaces (another download of a file of the same
/// name into the same directory, or anything made under it meanwhile, was replaced);
/// on a file system without links, looked at once more, then renamed.
fn put_in_place(partial: &Path, path: &Path, keep: bool) -> std::io::Result<bool> {
    if keep {
        match std::fs::hard_link(partial, path) {
            Ok(()) => {
                // In place: a partial left by a failed removal is found complete and
                // put in place again by a later run, or dropped with its file.
                let _ = std::fs::remove_file(partial);
                return Ok(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(_) if std::fs::symlink_metadata(path).is_ok() => return Ok(false),
            Err(_) => {}
        }
    }
    std::fs::rename(partial, path)?;
    Ok(true)
}

/// Bytes of OUT's name a partial file's name keeps: with the rest (at most 69 bytes)
/// within the 255 of a file name.
const PARTIAL_NAME_MAX: usize = 160;

/// OUT's name as a partial file's name carries it (`partial_path`).
fn partial_stem(path: &Path) -> String {
    let name = path.file_name().map_or_else(|| "download".into(), |n| n.to_string_lossy().into_owned());
    let mut end = name.len().min(PARTIAL_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_owned()
}

/// Removes the partial files of whole downloads of `file` into `path` (any size: the
/// file's is not known any more); returns how many went. Into a directory, a download
/// took the file's own name there, which a refusal no longer tells: any name in it.
fn drop_partials(path: &Path, file: &FileId) -> usize {
    let id = &hex(file)[..16];
    let (dir, prefix) = if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        (path, None)
    } else {
        let Some(dir) = path.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d }) else {
            return 0;
        };
        (dir, Some(format!(".{}.{id}.0+", partial_stem(path))))
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut dropped = 0;
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        let ours = whole_partial_of(&n, id) && prefix.as_ref().is_none_or(|p| n.starts_with(p.as_str()));
        if ours && std::fs::remove_file(entry.path()).is_ok() {
            dropped += 1;
        }
    }
    dropped
}

/// Whether `name` is a partial file's of a whole download of the file whose id starts
/// with `id`: `.NAME.ID.0+LENGTH.sb-part`, read from its end (a name containing the id
/// elsewhere, which another file's uploader may choose, is not).
fn whole_partial_of(name: &str, id: &str) -> bool {
    let Some(rest) = name.strip_suffix(".sb-part") else { return false };
    let Some((rest, range)) = rest.rsplit_once('.') else { return false };
    let whole = range.strip_prefix("0+").is_some_and(|len| !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()));
    whole && name.starts_with('.') && rest.rsplit_once('.').is_some_and(|(stem, found)| found == id && stem.len() > 1)
}

/// Opens (or creates) the partial file of a download of `expected` bytes, locked for
/// this run (another `sb download` of the same into `out` is refused at once), placed
/// at the end of the bytes it holds; returns it with their count. Only a `whole` file's
/// bytes are kept (its BLAKE3 checks them at the end); a range starts over. A link
/// under its name is refused, not followed, and so is a file of another user's; a new
/// one gets OUT's permissions if OUT exists (a private file's bytes stay private). The
/// lock goes with the process, even after `kill -9`.
async fn open_partial(
    partial: &Path,
    out: &Path,
    expected: u64,
    whole: bool,
) -> anyhow::Result<(tokio::fs::File, u64)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
        if let Ok(m) = std::fs::metadata(out) {
            opts.mode(m.permissions().mode() & 0o777);
        }
    }
    let file = match opts.open(partial) {
        Ok(file) => file,
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            bail!("{} is a link: refused (not followed); remove it and download again", partial.display())
        }
        Err(e) => return Err(e).with_context(|| format!("creating {} beside {}", partial.display(), out.display())),
    };
    let meta = file.metadata().with_context(|| format!("reading {}", partial.display()))?;
    #[cfg(unix)]
    let theirs = std::os::unix::fs::MetadataExt::uid(&meta) != rustix::process::geteuid().as_raw();
    #[cfg(not(unix))]
    let theirs = false;
    // A second name for the file (a hard link someone made at this predictable name to
    // a file of mine) would have it emptied or written into: refused (an attacker
    // review; `O_NOFOLLOW` stops symbolic links only).
    #[cfg(unix)]
    let linked = std::os::unix::fs::MetadataExt::nlink(&meta) > 1;
    #[cfg(not(unix))]
    let linked = false;
    if !meta.is_file() || theirs || linked {
        bail!("{} is not a file of yours alone; remove it and download again", partial.display());
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another sb download is writing {} ({}); wait for it", out.display(), partial.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", partial.display()));
        }
    }
    // Read once locked: a run that held it may have written more meanwhile.
    let mut kept = file.metadata().with_context(|| format!("reading {}", partial.display()))?.len();
    if kept > expected || !whole {
        // Not what this run writes, or bytes nothing will check: start over.
        file.set_len(0).with_context(|| format!("emptying {}", partial.display()))?;
        kept = 0;
    }
    let mut file = tokio::fs::File::from_std(file);
    tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(kept))
        .await
        .with_context(|| format!("reading {}", partial.display()))?;
    Ok((file, kept))
}

/// Opens `path`, not a regular file (a device, a pipe, standard output), to write a
/// download into. A pipe or socket someone else made is refused, checked on what was
/// opened: its reader is theirs (a FIFO made ahead in a shared directory at a likely
/// name got every byte: an attacker review); this process's own descriptors
/// (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`) are whatever its caller gave it. A
/// pipe nobody reads is an error at once (opened without blocking), not a hang.
fn open_in_place(path: &Path) -> anyhow::Result<tokio::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let file = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let own = ["/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/self/fd/"];
        let ours = own.iter().any(|p| path.to_str().is_some_and(|s| s.starts_with(p)));
        let meta = file.metadata()?;
        let (kind, mine) = (meta.file_type(), meta.uid() == rustix::process::geteuid().as_raw());
        if (kind.is_fifo() || kind.is_socket()) && !mine && !ours {
            bail!("a pipe or socket of another user's: nothing downloaded (`-` writes to standard output)");
        }
        let flags = rustix::fs::fcntl_getfl(&file)?;
        rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    }
    Ok(tokio::fs::File::from_std(file))
}

/// A sink that hashes (BLAKE3) what it writes.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Hashing<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = written {
            this.hasher.update(&buf[..n]);
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `sb file info|cancel|delete`.
pub async fn file_command(client: &Client, home: &Path, out: &Out, command: FileCommand) -> anyhow::Result<()> {
    match command {
        FileCommand::Info { file } => {
            let info = client.file_info(parse_file_id(&file)?).await.map_err(|e| cannot_read(&file, e))?;
            // Someone else's: a member of a conversation that carries it, so one of my
            // contacts, named by presence (unless it has left since).
            let mine = info.uploader == client.user_id;
            // My own name, from this home's identity, for --json (before: null there).
            let my_name = if mine { super::load_state(home)?.identity.map(|i| i.user) } else { None };
            let uploader = if mine {
                Some("you".to_string())
            } else {
                let contacts = client.presence(&[info.uploader]).await.unwrap_or_default();
                contacts.into_iter().find(|p| p.user == info.uploader).map(|p| p.name)
            };
            let thumbnail = match &info.state {
                FileState::Complete { thumbnail } => thumbnail.as_ref(),
                _ => None,
            };
            let f = &info.file;
            out.line(
                json!({"file": hex(&f.file), "name": f.name, "size": f.size, "content_type": f.content_type,
                    "blake3": hex(&info.blake3), "uploader": info.uploader,
                    "uploader_name": if mine { my_name.as_deref() } else { uploader.as_deref() },
                    "created_ms": info.created_ms,
                    "state": state_name(&info.state), "offset": state_offset(&info.state, f.size),
                    "thumbnail": thumbnail.map(|t| hex(&t.file)), "error": state_error(&info.state)}),
                || {
                    let detail = describe_state(&info.state, f.size);
                    format!(
                        "{} {} ({} bytes, {}) {}, blake3 {}: {detail}",
                        hex(&f.file),
                        f.name,
                        f.size,
                        f.content_type,
                        match &uploader {
                            Some(name) => format!("uploaded by {name}"),
                            None => format!("uploaded by user#{}", info.uploader),
                        },
                        hex(&info.blake3)
                    )
                },
            );
        }
        FileCommand::Cancel { file } => {
            let id = parse_file_id(&file)?;
            // What this home saved to resume or send it goes, cancelled now or gone
            // already: a later `sb upload` of the same file starts afresh and sends it
            // nowhere it is not told to (before, it sent the cancelled upload's message
            // after all). A failure to write that only warns: the cancel stands.
            let forget = || {
                let forgot = update_state(home, |s| {
                    s.uploads.retain(|u| u.file != hex(&id));
                    Ok(())
                });
                if let Err(e) = forgot {
                    eprintln!(
                        "warning: {file} stays saved in this home ({e:#}); `sb upload` of its file would start again"
                    );
                }
            };
            let cancelled = client.cancel_upload(id).await;
            if cancelled.as_ref().is_err_and(|e| e.code() == Some(ErrorCode::NOT_FOUND)) {
                forget();
            }
            if let Err(e) = cancelled {
                // A complete file is not an upload to cancel: say what lets go of it.
                if e.code() == Some(ErrorCode::NOT_FOUND)
                    && let Ok(info) = client.file_info(id).await
                    && matches!(info.state, FileState::Complete { .. })
                {
                    // The broker's `NOT_FOUND` kept (status 3, the code in --json).
                    return Err(anyhow::Error::new(e).context(format!(
                        "{file} is complete, not an upload in progress: nothing to cancel (`sb file delete {file}` lets \
                         go of it if you uploaded it)"
                    )));
                }
                if e.code() == Some(ErrorCode::NOT_FOUND) {
                    return Err(anyhow::Error::new(e).context(format!(
                        "{file} is no upload of yours in progress (cancelled, expired, or never yours; `sb uploads` lists yours)"
                    )));
                }
                return Err(e.into());
            }
            forget();
            out.line(json!({"event": "cancelled", "file": file}), || format!("cancelled {file}"));
        }
        FileCommand::Delete { file } => {
            let id = parse_file_id(&file)?;
            // Not held by me (a copy I forwarded, or dropped already): the broker answers
            // `Done` and nothing changes; say so rather than "deleted".
            let unheld = client.list_files().await?.iter().any(|f| f.file.file == id && !f.held);
            if let Err(e) = client.delete_file(id).await {
                return Err(not_mine(client, &file, e).await);
            }
            if unheld {
                out.line(json!({"event": "not_held", "file": file}), || {
                    format!(
                        "{file} is not held by you (a copy you forwarded, or dropped already): it goes with the last message carrying it"
                    )
                });
            } else if client.file_info(id).await.is_ok() {
                // Still there after the delete: a message carries it (one nothing carries
                // goes at once, and its id reads `NOT_FOUND`).
                out.line(json!({"event": "deleted", "file": file, "carried": true}), || {
                    format!(
                        "deleted {file}: it goes once no message carries it (`sb file withdraw {file}` takes it back \
                         from them now)"
                    )
                });
            } else {
                out.line(json!({"event": "deleted", "file": file, "carried": false}), || format!("deleted {file}"));
            }
        }
        FileCommand::Withdraw { file } => {
            if let Err(e) = client.withdraw_file(parse_file_id(&file)?).await {
                return Err(not_mine(client, &file, e).await);
            }
            out.line(json!({"event": "withdrawn", "file": file}), || {
                format!(
                    "withdrew {file}: gone from every message that carried it (copies others forwarded are theirs, and stay)"
                )
            });
        }
        FileCommand::Send { conv, files, text, client_id } => {
            let client_id = crate::client_id_or_new(client_id.as_deref())?;
            let conv = conv.resolve_to_write(client).await?;
            let ids = files.iter().map(|f| parse_file_id(f)).collect::<anyhow::Result<Vec<_>>>()?;
            let (seq, duplicate) = match client.send_files_with_id(conv, client_id, &text, &ids).await {
                Ok(sent) => sent,
                // One file: the broker's terse "no such file" said why it may be (a trial).
                Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) && ids.len() == 1 => {
                    return Err(cannot_read(&files[0], e));
                }
                Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) => {
                    // Say which (the broker's answer names none).
                    let mut unreadable = Vec::new();
                    for (id, given) in ids.iter().zip(&files) {
                        if client.file_info(*id).await.is_err() {
                            unreadable.push(given.as_str());
                        }
                    }
                    if unreadable.is_empty() {
                        return Err(with_limit_hint(e));
                    }
                    return Err(cannot_read(&unreadable.join(", "), e));
                }
                Err(e) if refused_for_good(&e) => return Err(with_limit_hint(e)),
                // No answer, or one after which it may be stored: a run under a fresh
                // key would send it twice (it was one attempt under a key never shown:
                // a review).
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "the broker may have stored it: the same command with --client-id {} sends it again at most \
                         once",
                        hex(&client_id)
                    )));
                }
            };
            // The ids as the message carries them: another's file goes as my copy. Sent
            // whatever this read does (a failure here must not make anyone send again).
            let page = switchboard_protocol::Page::After(seq.saturating_sub(1));
            let entries = client.history(conv, page, 1).await.map(|(e, _)| e).unwrap_or_default();
            let carried: Vec<String> = entries
                .iter()
                .filter(|e| e.seq == seq)
                .flat_map(|e| match &e.body {
                    switchboard_protocol::Body::Files { files, .. } => files.iter().map(|f| hex(&f.file)).collect(),
                    _ => Vec::new(),
                })
                .collect();
            out.line(
                json!({"event": "sent", "conv": conv, "seq": seq, "files": carried, "client_id": hex(&client_id),
                    "duplicate": duplicate}),
                || {
                    format!(
                        "conv {conv} seq {seq}: {}{}",
                        carried.join(" "),
                        if duplicate { " (sent before)" } else { "" }
                    )
                },
            );
        }
    }
    Ok(())
}

/// A `NOT_FOUND` for file `id` (as given), with what it may mean: the broker answers a
/// file nobody may read and one that does not exist alike.
fn cannot_read(id: &str, e: ClientError) -> anyhow::Error {
    if e.code() != Some(ErrorCode::NOT_FOUND) {
        return e.into();
    }
    anyhow::Error::new(e).context(format!(
        "{id} cannot be read: no such file, or it is gone (cancelled, expired or withdrawn by its uploader), \
         or you are in no conversation that carries it"
    ))
}

/// A refused `DeleteFile` or `WithdrawFile` of file `id` (as given): for a file the
/// caller may read but did not upload, says whose it is (the broker answers
/// `NOT_FOUND`, as for a file that does not exist).
async fn not_mine(client: &Client, id: &str, e: ClientError) -> anyhow::Error {
    if e.code() == Some(ErrorCode::NOT_FOUND)
        && let Ok(file) = parse_file_id(id)
        && let Ok(info) = client.file_info(file).await
        && info.uploader != client.user_id
    {
        let contacts = client.presence(&[info.uploader]).await.unwrap_or_default();
        let named = contacts.into_iter().find(|p| p.user == info.uploader).map(|p| p.name);
        let whose = named.unwrap_or_else(|| format!("user#{}", info.uploader));
        // The broker's code kept for --json; its words explained, which alone read as a
        // contradiction.
        return anyhow::Error::new(e).context(format!(
            "{id} is {whose}'s file (a forward of a file sends the forwarder's own copy): only its uploader may \
             delete or withdraw it, and to anyone else the broker answers as for a file that does not exist"
        ));
    }
    if e.code() == Some(ErrorCode::NOT_FOUND) {
        // Not `cannot_read`'s words: this was no download (a trial).
        return anyhow::Error::new(e).context(format!(
            "{id} is no file of yours: no such file, or it is gone (cancelled, expired or withdrawn), or another \
             user uploaded it (only its uploader may delete or withdraw it)"
        ));
    }
    e.into()
}

/// A file's state for output: `uploading`, `complete`, `gone` (`Failed` with
/// `NOT_FOUND`: cancelled, expired or withdrawn) or `failed`.
pub fn state_name(state: &FileState) -> &'static str {
    match state {
        FileState::Uploading { .. } => "uploading",
        FileState::Complete { .. } => "complete",
        FileState::Failed { code: ErrorCode::NOT_FOUND } => "gone",
        FileState::Failed { .. } => "failed",
    }
}

/// Durable bytes of an upload (all of them once complete), `None` once failed.
pub fn state_offset(state: &FileState, size: u64) -> Option<u64> {
    match state {
        FileState::Uploading { offset } => Some(*offset),
        FileState::Complete { .. } => Some(size),
        FileState::Failed { .. } => None,
    }
}

/// A failed upload's code name.
pub fn state_error(state: &FileState) -> Option<&'static str> {
    match state {
        FileState::Failed { code } => Some(code.name()),
        _ => None,
    }
}

/// `uploading, 40% (1000 of 2500 bytes)`, `complete`, `failed: HASH_MISMATCH`, `gone
/// (...)`.
pub fn describe_state(state: &FileState, size: u64) -> String {
    match state {
        FileState::Uploading { offset } => {
            format!("uploading, {}% ({offset} of {size} bytes)", percent(*offset, size))
        }
        FileState::Complete { thumbnail: Some(t) } => format!("complete, thumbnail {}", hex(&t.file)),
        FileState::Complete { thumbnail: None } => "complete".into(),
        FileState::Failed { code: ErrorCode::NOT_FOUND } => GONE.into(),
        FileState::Failed { code } => format!("failed: {}", code.name()),
    }
}

/// How a file nobody can read any more is described.
const GONE: &str = "gone (its upload was cancelled or expired, or its uploader withdrew it)";

/// What a message shows of a file it carries beside its name: nothing once complete,
/// else `uploading, 40%`, `gone (...)` or `failed: HASH_MISMATCH`.
pub fn carried_state(state: &FileState, size: u64) -> Option<String> {
    match state {
        FileState::Complete { .. } => None,
        FileState::Uploading { offset } => Some(format!("uploading, {}%", percent(*offset, size))),
        failed => Some(describe_state(failed, size)),
    }
}

/// The files entries carry and events name, as this run learnt them: name and state
/// from `FileInfo` (asked once per file, answered or not, `LOOKUPS_AT_ONCE` at a time,
/// an answer waited for `LOOKUP_TIMEOUT`), then the states `Event::File` pushes. A file
/// `FileInfo` does not find is shown gone: the state the broker pushes for it (`Failed`
/// with `NOT_FOUND`: its upload cancelled or expired, or withdrawn by its uploader); a
/// reader who was offline then learns it here. At most `FILES_KNOWN` files are kept;
/// past that the book starts over (and asks again).
#[derive(Default)]
pub struct FileBook(std::collections::HashMap<FileId, KnownFile>);

#[derive(Default)]
struct KnownFile {
    name: Option<String>,
    state: Option<FileState>,
    /// `FileInfo` was asked (answered or not: it is not asked again).
    asked: bool,
}

/// Files a `FileBook` keeps before it starts over.
const FILES_KNOWN: usize = 4096;
/// `FileInfo` requests a `FileBook` has in flight at once: the broker runs four of a
/// user's store jobs at once (`STORE_JOBS_PER_USER`), so more would only wait there,
/// inside their `LOOKUP_TIMEOUT`.
const LOOKUPS_AT_ONCE: usize = 4;
/// How long a `FileBook` waits for one `FileInfo` answer (`sb tail` prints nothing
/// meanwhile).
pub(crate) const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl FileBook {
    /// Asks `FileInfo` about each of `files` not asked yet, and fills in its name and
    /// (where no push said it already) its state.
    pub async fn look_up(&mut self, source: &impl crate::Lookups, files: impl IntoIterator<Item = FileId>) {
        use futures_util::StreamExt;
        let mut wanted: Vec<FileId> = files.into_iter().filter(|f| !self.0.get(f).is_some_and(|k| k.asked)).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let answers: Vec<_> = futures_util::stream::iter(wanted)
            .map(|file| async move { (file, tokio::time::timeout(LOOKUP_TIMEOUT, source.file_info(file)).await) })
            .buffered(LOOKUPS_AT_ONCE)
            .collect()
            .await;
        // Nobody there to ask (`sb tail` between connections): asked again later.
        let nobody = !source.answering();
        for (file, answer) in answers {
            if nobody && !matches!(answer, Ok(Some(_))) {
                continue;
            }
            let known = self.entry(file);
            // Asked once, answered or not (`sb tail` does not stall on it again).
            known.asked = true;
            let (name, state) = match answer {
                Ok(Some(Ok(info))) => (Some(info.file.name), info.state),
                Ok(Some(Err(ErrorCode::NOT_FOUND))) => (None, FileState::Failed { code: ErrorCode::NOT_FOUND }),
                _ => continue,
            };
            known.name = known.name.take().or(name);
            known.state = known.state.take().or(Some(state));
        }
    }

    /// Asks about the files `entries` carry (`look_up`) and keeps the names they give.
    pub async fn look_up_entries<'a>(
        &mut self,
        source: &impl crate::Lookups,
        entries: impl IntoIterator<Item = &'a switchboard_protocol::Entry>,
    ) {
        let mut carried = Vec::new();
        for e in entries {
            if let switchboard_protocol::Body::Files { files, .. } = &e.body {
                for f in files {
                    self.entry(f.file).name.get_or_insert_with(|| f.name.clone());
                    carried.push(f.file);
                }
            }
        }
        self.look_up(source, carried).await;
    }

    /// Records a pushed state; whether it is news (not the state last known: the
    /// uploader's devices get each progress once as the uploader's and again as a
    /// member's where it attached the file).
    pub fn update(&mut self, file: FileId, state: &FileState) -> bool {
        let known = self.entry(file);
        let news = known.state.as_ref() != Some(state);
        known.state = Some(state.clone());
        news
    }

    /// The file's name, if this run learnt it.
    pub fn name(&self, file: &FileId) -> Option<&str> {
        self.0.get(file)?.name.as_deref()
    }

    /// The file's state, if this run learnt it.
    pub fn state(&self, file: &FileId) -> Option<&FileState> {
        self.0.get(file)?.state.as_ref()
    }

    fn entry(&mut self, file: FileId) -> &mut KnownFile {
        if self.0.len() >= FILES_KNOWN && !self.0.contains_key(&file) {
            self.0.clear();
        }
        self.0.entry(file).or_default()
    }
}

/// What files of these sizes count against the quota together (`charged_bytes` each),
/// at most `u64::MAX`: sizes are the broker's word, and a hostile or broken broker's
/// sizes near `u64::MAX` made `sb quota` panic on the overflow of a plain sum.
fn charged_total(sizes: impl IntoIterator<Item = u64>) -> u64 {
    sizes.into_iter().fold(0, |sum, size| sum.saturating_add(charged_bytes(size)))
}

/// `part` of `whole` in whole percent (0 for an empty whole).
fn percent(part: u64, whole: u64) -> u64 {
    part.saturating_mul(100) / whole.max(1)
}

/// A message's idempotency key from 32 hex digits.
fn parse_client_id(s: &str) -> Option<ClientMsgId> {
    unhex(s).and_then(|b| ClientMsgId::try_from(b).ok())
}

/// A file id from 32 hex digits.
fn parse_file_id(s: &str) -> anyhow::Result<FileId> {
    unhex(s).and_then(|b| FileId::try_from(b).ok()).context("a file id is 32 hex digits (16 bytes)")
}

/// Bytes on stderr, drawn only on a terminal and never with `--json`. The ETA says `?`
/// while no rate is known (at the start, after `resume_at`, while nothing moves):
/// indicatif's own says "0s" then.
fn progress_bar(out: &Out, total: u64) -> ProgressBar {
    let target = if out.json { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    let eta = |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = if state.per_sec() >= 1.0 {
            write!(w, "{:#}", indicatif::HumanDuration(state.eta()))
        } else {
            write!(w, "?")
        };
    };
    if let Ok(style) = ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}") {
        bar.set_style(style.with_key("eta", eta));
    }
    bar
}

/// Moves `bar` to `offset` (where a resumed transfer starts) without counting the jump
/// as speed: the estimator takes the new position, then starts over. Before, the bytes
/// of an earlier run showed as "576.93 GiB/s eta 0s", and the rate took seconds to fall
/// to the link's.
fn resume_at(bar: &ProgressBar, offset: u64) {
    bar.set_position(offset);
    bar.tick();
    bar.reset_eta();
}

/// The key of a saved upload: the same path with the same size and content.
fn upload_key(path: &Path, size: u64, blake3: &[u8; 32]) -> String {
    format!("{}\n{size}\n{}", path.display(), hex(blake3))
}

/// The path in an `upload_key` (which may itself hold a newline).
fn key_path(key: &str) -> Option<&str> {
    key.rsplitn(3, '\n').nth(2)
}

/// The file this home began upload `id` (hex) from, for `sb upload --resume ID`.
fn saved_path(home: &Path, id: &str) -> anyhow::Result<PathBuf> {
    let file = hex(&parse_file_id(id)?);
    let state = super::load_state(home)?;
    match state.uploads.iter().find(|u| u.file == file).and_then(|u| key_path(&u.key)) {
        Some(path) => Ok(PathBuf::from(path)),
        None => bail!(
            "upload {file} is not saved in this home (begun elsewhere, or finished, cancelled or expired): name \
             its file to resume it (`sb upload --resume {file} FILE`; `sb uploads` lists the unfinished ones)"
        ),
    }
}

fn load_saved(home: &Path, key: &str) -> anyhow::Result<Option<SavedUpload>> {
    let state = super::load_state(home)?;
    Ok(state.uploads.into_iter().find(|u| u.key == key))
}

/// Remembers `file` as the upload of `key`, to be sent to `target` once complete,
/// replacing an older one; forgets the oldest past `MAX_SAVED_UPLOADS`.
fn save_upload(home: &Path, key: &str, file: FileId, target: Option<&Target>) -> anyhow::Result<()> {
    let saved = SavedUpload {
        key: key.to_owned(),
        file: hex(&file),
        conv: target.map(|t| t.conv),
        caption: target.and_then(|t| t.caption.clone()),
        client_id: target.map(|t| hex(&t.client_id)),
    };
    update_state(home, |s| {
        s.uploads.retain(|u| u.key != key);
        s.uploads.push(saved.clone());
        let excess = s.uploads.len().saturating_sub(MAX_SAVED_UPLOADS);
        s.uploads.drain(..excess);
        Ok(())
    })
}

fn forget_upload(home: &Path, key: &str) -> anyhow::Result<()> {
    update_state(home, |s| {
        s.uploads.retain(|u| u.key != key);
        Ok(())
    })
}

/// The lock one `sb upload` holds on its file (by `upload_key`) in this home, so that a
/// second one for the same file refuses at once instead of taking the upload over. A
/// lock file `uploads/KEYHASH.lock` (owner only), locked with `File::try_lock` (the
/// kernel releases it if sb dies) and, on unix, removed by its holder on drop; a
/// process that opened the removed file sees that and opens the new one.
struct UploadLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl UploadLock {
    fn take(home: &Path, key: &str, local: &Path) -> anyhow::Result<UploadLock> {
        /// Files removed under us in a row before giving up (each means a holder finished).
        const ATTEMPTS: u32 = 16;
        let dir = home.join("uploads");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = hex(&blake3::hash(key.as_bytes()).as_bytes()[..16]);
        let path = dir.join(format!("{name}.lock"));
        for _ in 0..ATTEMPTS {
            let file = super::owner_only().write(true).create(true).truncate(false).open(&path);
            let file = file.with_context(|| format!("opening {}", path.display()))?;
            let locked = match file.try_lock() {
                Ok(()) => true,
                Err(std::fs::TryLockError::WouldBlock) => false,
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            };
            // A holder that finished removed the file after we opened it: try the new one.
            if !same_file(&file, &path) {
                continue;
            }
            if locked {
                return Ok(UploadLock { path, _file: file });
            }
            let id = load_saved(home, key)?.map_or(String::new(), |s| format!(" (upload {})", s.file));
            // A conflict (exit status 4; a user's trial: 1).
            let why = format!(
                "{} is being uploaded by another sb in this home{id}; wait for it to finish, or stop it first",
                local.display()
            );
            return Err(crate::Refused(ErrorCode::CONFLICT, why).into());
        }
        bail!("could not lock {}: it kept being replaced", path.display())
    }
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        // Removed while still locked. Elsewhere than unix `same_file` cannot tell a
        // removed file from its successor, so the file stays.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `path` still names the file `file` has open.
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// A media type from the file name's extension; the broker checks it against the bytes.
fn guess_type(path: &Path) -> &'static str {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        Some("txt" | "md" | "log") => "text/plain",
        Some("json") => "application/json",
        Some("zip") => "application/zip",
        Some("mp3") => "audio/mpeg",
        Some("mp4") => "video/mp4",
        _ => "application/octet-stream",
    }
}

/// `sb upload PATH` as a user pastes it, with this run's home and broker flags (`reach`):
/// run elsewhere, it would find another home's saved upload, or none, and send nothing
/// where the first run was asked to.
fn upload_command(reach: &Rerun, path: &std::ffi::OsStr) -> Rerun {
    reach.clone().then("upload").os_word(path, "FILE", "the file's path")
}

/// `sb upload --resume ID FILE`, for the user to name the file.
fn resume_command(reach: &Rerun, id: &str) -> Rerun {
    reach.clone().then("upload --resume").word(id, "ID", "the upload's id").blank("FILE", "the file's path")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sb quota` sums the sizes the broker lists in whole 4 KiB blocks, and sizes near
    /// `u64::MAX` (a broken or hostile broker's) saturate instead of panicking.
    #[test]
    fn quota_sums_of_listed_sizes_never_overflow() {
        assert_eq!(charged_total([1, 4096, 4097]), 4096 * 4);
        assert_eq!(charged_total([]), 0);
        assert_eq!(charged_total([u64::MAX - 10, u64::MAX, 5]), u64::MAX);
    }

    /// A download into a directory takes the file's name there only if it is still free
    /// when the download ends (before, the rename replaced a file made meanwhile: two
    /// downloads of files of the same name into one directory kept the second).
    #[test]
    fn a_download_into_a_directory_never_replaces_a_file_made_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let (partial, out) = (dir.path().join(".a.part"), dir.path().join("report.pdf"));
        std::fs::write(&partial, b"downloaded").unwrap();
        std::fs::write(&out, b"made meanwhile").unwrap();
        assert!(!put_in_place(&partial, &out, true).unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), b"made meanwhile");
        assert!(partial.exists(), "left for the caller to drop");
        std::fs::remove_file(&out).unwrap();
        assert!(put_in_place(&partial, &out, true).unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), b"downloaded");
        assert!(!partial.exists());
        // OUT given as a file name: replaced, as asked.
        std::fs::write(&partial, b"again").unwrap();
        assert!(put_in_place(&partial, &out, false).unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), b"again");
    }

    /// A partial file's name stays within a file name's 255 bytes whatever the name the
    /// uploader chose (at most 255 bytes, which made it 300 and failed every download
    /// into a directory), and the partials of a file downloaded into a directory are
    /// found there when it is gone (before, they were looked for beside the directory).
    #[test]
    fn partial_names_fit_and_are_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let file: FileId = [0xab; 16];
        // Two-byte characters cut where the 160th byte falls mid-character.
        let long = "x".to_owned() + &"é".repeat(127);
        let partial = partial_path(&dir.path().join(&long), &file, 0, u64::MAX);
        let name = partial.file_name().unwrap().len();
        assert!(name <= 255, "{name} bytes");
        std::fs::write(&partial, b"bytes").unwrap();
        let other = partial_path(&dir.path().join("other.bin"), &[0xcd; 16], 0, 5);
        std::fs::write(&other, b"bytes").unwrap();
        // Another file's, named by its uploader to hold this id: not this file's.
        let named_so = partial_path(&dir.path().join(format!("a.{}.0+", &hex(&file)[..16])), &[0xcd; 16], 0, 5);
        std::fs::write(&named_so, b"bytes").unwrap();
        assert_eq!(drop_partials(dir.path(), &file), 1, "found by the file's id in the directory");
        assert!(!partial.exists() && other.exists() && named_so.exists(), "other files' partials stay");
        // OUT given as a file name: the partial beside it.
        let named = partial_path(&dir.path().join(&long), &file, 0, 9);
        std::fs::write(&named, b"bytes").unwrap();
        assert_eq!(drop_partials(&dir.path().join(&long), &file), 1);
    }

    #[test]
    fn only_a_refusal_drops_a_sends_key() {
        let answer = |code| ClientError::Server(switchboard_protocol::ErrorBody::new(code, "x"));
        assert!(refused_for_good(&answer(ErrorCode::FORBIDDEN)));
        // May be stored, or nothing done and worth another try: kept (INTERNAL was taken
        // for a refusal, the key dropped and a second send advised: a review).
        for kept in [ErrorCode::INTERNAL, ErrorCode::OVERLOADED] {
            assert!(!refused_for_good(&answer(kept)), "{kept:?}");
        }
        assert!(!refused_for_good(&ClientError::Closed { code: None, reason: "lost".into() }));
    }

    #[test]
    fn file_ids_are_32_hex_digits() {
        let id = parse_file_id("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").expect("valid");
        assert_eq!(id[0], 0xf0);
        assert_eq!(id[15], 0xff);
        for bad in ["", "f0f1", "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff00", "g0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"] {
            assert!(parse_file_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn types_come_from_the_extension() {
        let check = |name: &str, expected: &str| assert_eq!(guess_type(Path::new(name)), expected, "{name}");
        check("cat.PNG", "image/png");
        check("a.jpeg", "image/jpeg");
        check("notes.txt", "text/plain");
        check("archive.tar.gz", "application/octet-stream");
        check("noext", "application/octet-stream");
    }
}
