//! `sb`: the Switchboard command line client.
//!
//! State (the device key and how to reach the broker) lives in `$SWITCHBOARD_HOME`
//! (default `~/.config/switchboard`) as `state.json`, readable only by its owner. Many
//! `sb` processes may share one home: the file is replaced atomically, only when it
//! changes, under the lock file `state.lock`.
//!
//! With `--json` every command prints one JSON object per line, with text exactly as
//! the broker sent it. A failure prints `{"error": {"code": 9, "name": "CONFLICT",
//! "message": "user name is taken"}}` (`code` and `name` are `null` for a failure of
//! `sb`'s own) and exits non-zero.
//!
//! Human output is for a terminal, and most of what it shows was written by other
//! users. So that no message, title or name can move the cursor, erase or forge lines,
//! retitle the window or reorder text, every line is printed through
//! `terminal_safe`: control characters (C0, DEL, C1), Unicode direction controls
//! (U+200E, U+200F, U+061C, U+202A–U+202E, U+2066–U+2069) and the line and paragraph
//! separators (U+2028, U+2029) are shown as Rust escapes (`\n`, `\r` and `\t` for a
//! line feed, carriage return and tab, so a multi-line message reads `one\ntwo`;
//! `\u{1b}` and the like for the rest), and a backslash as `\\`, so the escaped form
//! cannot be mistaken for text that was sent.
//! Failures print to stderr as `error: CONFLICT (9): user name is taken`.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;
#[path = "sb/conv.rs"]
mod conv;
#[path = "sb/files.rs"]
mod files;
#[path = "sb/rerun.rs"]
mod rerun;

use conv::ConvArg;
use files::{FileBook, UploadArgs};
use rerun::Rerun;
use switchboard_client::{
    Client, ClientError, Connector, FileCursors, Identity, Session, SessionConfig, SessionError, SessionEvent,
    TYPING_REFRESH_MS, TransferError, TransportOptions, Trust, hex, new_client_id, unhex,
};
use switchboard_protocol::{
    Body, ClientMsgId, ConvId, ConversationKind, ConversationState, ConversationSummary, Entry, ErrorCode, FileId,
    FileInfo, Page, PresenceInfo, PresenceState, Receipt, RequestBody, Role, Seq, Settings, Signal, UserId,
};

#[derive(Parser)]
#[command(
    name = "sb",
    version,
    about = "Switchboard command line client",
    after_help = "One device a home: its key, the broker's address and trust, cursors and unfinished uploads live in \
                  $SWITCHBOARD_HOME (default ~/.config/switchboard); use another SWITCHBOARD_HOME for another device or user."
)]
struct Cli {
    #[command(flatten)]
    broker: BrokerFlags,
    /// Print one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the broker. Flags win over the saved state; `register` and `login` save
/// them (any other command uses them for that run only).
#[derive(clap::Args)]
struct BrokerFlags {
    /// Broker address (host:port).
    #[arg(long, global = true, env = "SWITCHBOARD_SERVER")]
    server: Option<String>,
    /// Trust this PEM certificate (e.g. the broker's switchboard-data/cert.pem).
    #[arg(long, global = true, env = "SWITCHBOARD_CA")]
    ca: Option<PathBuf>,
    /// Trust exactly the certificate with this SHA-256 (hex, as the broker prints it).
    #[arg(long, global = true, env = "SWITCHBOARD_PIN")]
    pin: Option<String>,
}

impl BrokerFlags {
    /// `--ca` made absolute (as saved, and as a printed command gives it, so either
    /// works from any directory).
    fn ca_path(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(|ca| std::path::absolute(ca).unwrap_or_else(|_| ca.clone()))
    }

    fn apply(&self, state: &mut State) {
        if self.server.is_some() {
            state.server = self.server.clone();
        }
        if let Some(ca) = self.ca_path() {
            state.ca = Some(ca);
            state.pin = None;
        }
        if self.pin.is_some() {
            state.pin = self.pin.clone();
            state.ca = None;
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create an account and enroll this device (password: SWITCHBOARD_PASSWORD, else
    /// asked on the terminal, else the first line of standard input).
    Register {
        /// The account's name: 1 to 64 of a-z, 0-9, `_`, `.`, `-` (upper case is taken as
        /// lower).
        name: String,
        /// This device's name in `sb devices` (default: sb@HOSTNAME).
        #[arg(long)]
        device: Option<String>,
    },
    /// Enroll this device into an existing account (password as for `register`).
    Login {
        /// The account's name.
        name: String,
        /// This device's name in `sb devices` (default: sb@HOSTNAME).
        #[arg(long)]
        device: Option<String>,
    },
    /// Change my account's password (current: SWITCHBOARD_PASSWORD, else asked, else the
    /// first line of standard input; new: SWITCHBOARD_NEW_PASSWORD, else asked twice, else
    /// the next line). At most 5 attempts a minute per account, right or wrong. My
    /// devices keep working unless --sign-out-others.
    Passwd {
        /// Revoke every other device of the account (a lost or stolen one): only this one
        /// and devices enrolled later with the new password work.
        #[arg(long)]
        sign_out_others: bool,
    },
    /// Check that a broker answers (QUIC, TLS and the protocol's hello), without an
    /// account: prints its protocol version, how long it took to answer and how far its
    /// clock is from ours; exits non-zero if it does not answer within --timeout. A
    /// broker at its connection limit refuses the connection: that is said (`"full":
    /// true` with --json) with status 0, since it is up. For health checks (`sb --server
    /// HOST:PORT --ca CERT probe --timeout 2`).
    Probe {
        /// Seconds to wait for the answer (a QUIC client cannot tell a broker that is
        /// down from one that is slow: it only sees no answer). 0.1 to 300.
        #[arg(long, default_value_t = 10.0, value_parser = probe_timeout)]
        timeout: f64,
    },
    /// Save the broker's address and trust given with --server and --ca or --pin (or
    /// their SWITCHBOARD_ variables) as this home's, for a broker that moved (`register`
    /// and `login` save them too; other commands use them for one run only); prints the
    /// saved ones. Connects to nothing: `sb probe` checks them.
    Server,
    /// Conversations.
    Conv {
        #[command(subcommand)]
        command: ConvCommand,
    },
    /// Send a text message; prints its seq.
    Send {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        text: String,
        /// Idempotency key, 32 hex digits: sending the same text again with the same key
        /// sends nothing new and prints the same seq (`duplicate`), so a script may retry
        /// safely; another text with a used key is refused (`CONFLICT`).
        /// Default: a fresh random key (printed with --json).
        #[arg(long, value_parser = client_id_arg)]
        client_id: Option<String>,
        /// Seconds to keep sending it again across lost connections and broker restarts
        /// before giving up (the message is stored at most once however often).
        /// Each connection attempt waits at most until then (at least a second).
        #[arg(long, default_value_t = 30.0, value_parser = retry_seconds, allow_negative_numbers = true)]
        retry_for: f64,
    },
    /// Replace the text of one of my messages.
    Edit {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        seq: Seq,
        text: String,
        /// Idempotency key, 32 hex digits, as for `send`: the same edit again with the
        /// same key changes nothing and prints the same seq (`duplicate`), so a script
        /// may retry safely. Default: a fresh random key (printed with --json).
        #[arg(long, value_parser = client_id_arg)]
        client_id: Option<String>,
    },
    /// Delete one of my messages.
    Delete {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        seq: Seq,
        /// Idempotency key, 32 hex digits, as for `edit`.
        #[arg(long, value_parser = client_id_arg)]
        client_id: Option<String>,
    },
    /// Show history (newest page by default).
    History {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        /// Entries before this seq.
        #[arg(long, conflicts_with = "after")]
        before: Option<Seq>,
        /// Entries after this seq.
        #[arg(long)]
        after: Option<Seq>,
        /// Page size (1 to 200).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=200))]
        limit: u16,
    },
    /// Print what happens, until interrupted: messages (first every one not printed
    /// before by a tail of this device, in order; a conversation left and joined again
    /// goes on after what was printed before it was left, with what was sent while out),
    /// receipts, presence and typing.
    /// Reconnects by itself; stops for good only if the device is revoked, its proof
    /// refused or its account disabled by the operator. What was
    /// printed is saved about once a second and at every clean stop (Ctrl-C, SIGTERM):
    /// after a crash or kill -9 the last second's messages are printed again (--json
    /// lines carry conv and seq to tell them apart).
    Tail,
    /// Mark a conversation read up to a seq, or without one up to its newest message.
    Read {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        /// The last message read (default: the newest; a seq past it is taken as it).
        seq: Option<Seq>,
    },
    /// Who in a conversation has received and read what: each member's delivered and
    /// read watermarks (a member who keeps reads private shows its read as private).
    Receipts {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
    },
    /// My settings, or change them: `--private-reads on` keeps my read marks from other
    /// members (they still see what reached me; my own devices see everything).
    Settings {
        /// Keep my read receipts private (`on`) or show them (`off`).
        #[arg(long, value_parser = on_off())]
        private_reads: Option<bool>,
    },
    /// Presence of users (names) who share a conversation with me; all of them if none.
    Presence {
        #[arg(value_parser = user_name_arg)]
        users: Vec<String>,
    },
    /// Block a user (by name): they can no longer start a direct conversation with me,
    /// write in ours or add me to a group, and neither of us sees the other's presence or
    /// typing. `sb block --list` lists whom I block.
    Block {
        #[arg(required_unless_present = "list", value_parser = user_name_arg)]
        user: Option<String>,
        /// List the users I block instead.
        #[arg(long, conflicts_with = "user")]
        list: bool,
    },
    /// Stop blocking a user (by name).
    Unblock {
        #[arg(value_parser = user_name_arg)]
        user: String,
    },
    /// Say I am typing in a conversation, until interrupted or for --seconds.
    Typing {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        /// Stop after this many seconds, 1 to 3600.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
    },
    /// My devices.
    Devices {
        #[command(subcommand)]
        command: Option<DeviceCommand>,
    },
    /// Upload a file; prints its id, and with --conv sends a message carrying it and
    /// prints its seq. Resumes by itself after a dropped connection. An unfinished
    /// upload of the same file (same path, size and BLAKE3) started by an earlier sb
    /// in this home is resumed, not started again. The broker limits a file's size
    /// (100 MiB by default: FILE_TOO_LARGE beyond) and your stored bytes (`sb quota`).
    Upload {
        /// The file (with --resume, may be left out: the file this home began it from).
        #[arg(required_unless_present = "resume")]
        file: Option<PathBuf>,
        /// Send a message carrying the file to this conversation (its number or title)
        /// once uploaded.
        #[arg(long, value_parser = ConvArg::parse)]
        conv: Option<ConvArg>,
        /// Declared media type (default: from the file name's extension, else
        /// application/octet-stream; the broker may relabel it from the file's bytes).
        #[arg(long = "type")]
        content_type: Option<String>,
        /// Caption of the message (with --conv).
        #[arg(long, requires = "conv")]
        caption: Option<String>,
        /// Send no message, even if an earlier run of this upload was given --conv.
        #[arg(long, conflicts_with = "conv")]
        no_send: bool,
        /// Continue the upload with this id (32 hex digits), e.g. after sb was killed or
        /// from another device (`sb uploads` lists them). Without --conv, it is sent
        /// where the sb that began it here was asked to send it.
        #[arg(long, value_parser = file_id_arg)]
        resume: Option<String>,
    },
    /// How much of my storage quota my files take, and my upload limits.
    Quota,
    /// My stored files (complete, counted in my quota), from any of my devices: id, name,
    /// size; `sb file delete ID` frees one once no message carries it.
    Files,
    /// My unfinished uploads, from any of my devices: id, name, durable bytes, expiry,
    /// and the local file when an upload from this home matches it. `sb upload FILE`
    /// continues one begun here (or `sb upload --resume ID`); `sb upload --resume ID FILE`
    /// any of them.
    Uploads,
    /// Download a file (or a byte range of it) into OUT. A whole file is checked against
    /// its BLAKE3. OUT `-` (or any path naming standard output) writes the bytes to
    /// standard output and every report to standard error.
    Download {
        /// The file's id: 32 hex digits (`sb files`, `sb history` and `sb tail` show them).
        #[arg(value_parser = file_id_arg)]
        file: String,
        /// Where to write it: a file name (replaced once the download is complete), a
        /// directory (the file's own name in it, if free), or `-` for standard output.
        out: PathBuf,
        /// First byte.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes to read; 0 (the default) reads to the end.
        #[arg(long, default_value_t = 0)]
        length: u64,
    },
    /// Files.
    File {
        #[command(subcommand)]
        command: FileCommand,
    },
}

#[derive(Subcommand)]
enum FileCommand {
    /// A file's name, size, type, BLAKE3, uploader and state.
    Info {
        /// The file's id: 32 hex digits.
        #[arg(value_parser = file_id_arg)]
        file: String,
    },
    /// Abandon one of my unfinished uploads.
    Cancel {
        /// The file's id: 32 hex digits.
        #[arg(value_parser = file_id_arg)]
        file: String,
    },
    /// Drop my hold on a file I uploaded (messages that carry it keep it).
    Delete {
        /// The file's id: 32 hex digits.
        #[arg(value_parser = file_id_arg)]
        file: String,
    },
    /// Take a file I uploaded back from every message that carries it, in conversations
    /// I left too, and delete it: nobody can read it from those any more, and my quota
    /// has it back. Copies others forwarded are theirs (a forward sends the forwarder's
    /// own copy, on their quota) and stay.
    Withdraw {
        /// The file's id: 32 hex digits.
        #[arg(value_parser = file_id_arg)]
        file: String,
    },
    /// Send files already uploaded in one message; prints its seq. A file someone else
    /// uploaded (one a message showed me) goes as my own copy of it, counted in my quota
    /// until the last message carrying it is deleted.
    Send {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        /// 1 to 10 file ids, 32 hex digits each.
        #[arg(required = true, value_parser = file_id_arg)]
        files: Vec<String>,
        /// A caption.
        #[arg(long, default_value = "")]
        text: String,
        /// Idempotency key, 32 hex digits, as for `send`: the same files and caption
        /// again with the same key send nothing new and print the same seq. Default: a
        /// fresh random key (printed with --json, and with the command to send again when
        /// the answer was lost).
        #[arg(long, value_parser = client_id_arg)]
        client_id: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConvCommand {
    /// Create a conversation: one user and no title makes a direct conversation.
    Create {
        /// Group title (makes a group even with one other user); without it, a group of
        /// two or more others is titled by its members' names.
        #[arg(long)]
        title: Option<String>,
        /// Other members.
        #[arg(required = true, value_parser = user_name_arg)]
        users: Vec<String>,
    },
    /// List my conversations with their unread counts.
    List,
    /// List the members of a conversation.
    Members {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
    },
    /// Add users to a group.
    Add {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        #[arg(required = true, value_parser = user_name_arg)]
        users: Vec<String>,
        /// Make them admins.
        #[arg(long)]
        admin: bool,
    },
    /// Remove a member (by name or user id) from a group.
    Remove {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        #[arg(value_parser = user_name_arg)]
        user: String,
    },
    /// Change a member's role (by name or user id) in a group I own: admin or member,
    /// or owner to hand the group over (I become an admin).
    Role {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        #[arg(value_parser = user_name_arg)]
        user: String,
        #[arg(value_parser = ["owner", "admin", "member"])]
        role: String,
    },
    /// Rename a group (its owner or an admin); every member sees the change.
    Rename {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
        /// The new title: 1 to 64 bytes of visible text.
        title: String,
    },
    /// Leave a group.
    Leave {
        #[arg(value_parser = ConvArg::parse, help = conv::HELP)]
        conv: ConvArg,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List devices (the default).
    List,
    /// Revoke a device by id (this home's own with --this-device): its connections close
    /// and it can no longer sign in. Another device takes the account's password
    /// (SWITCHBOARD_PASSWORD, else asked), so a device alone cannot sign its owner's
    /// others out.
    Revoke {
        /// The device's id, as `sb devices` lists it (this home's own with --this-device).
        #[arg(required_unless_present = "this_device")]
        device: Option<u64>,
        /// Revoke the device this home is (it is signed out: `sb login` enrolls it anew).
        #[arg(long)]
        this_device: bool,
        /// The account's password, asked before connecting when another device is
        /// named (asked with the connection open, the prompt held it past the broker's
        /// idle timeout: a review).
        #[arg(skip)]
        password: Option<String>,
    },
}

/// What `sb` remembers between runs.
#[derive(Serialize, Deserialize, Default)]
struct State {
    server: Option<String>,
    ca: Option<PathBuf>,
    pin: Option<String>,
    identity: Option<Identity>,
    /// Unfinished uploads, oldest first, at most `MAX_SAVED_UPLOADS`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    uploads: Vec<SavedUpload>,
}

/// An upload begun by `sb upload` and not known to be finished, so that the same file
/// uploaded again continues it, and sends it where the first `sb upload` was asked to.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
struct SavedUpload {
    /// `upload_key`: the file's absolute path, size and BLAKE3.
    key: String,
    /// Upload id, hex.
    file: String,
    /// The conversation to send it to once uploaded (`--conv`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conv: Option<ConvId>,
    /// The message's caption (`--caption`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    caption: Option<String>,
    /// The message's idempotency key (hex), so that a run that sends it again after
    /// losing the answer sends nothing new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
}

/// Unfinished uploads remembered; past it the oldest is forgotten (the broker expires
/// unfinished uploads after a day and allows 8 in progress per user by default).
const MAX_SAVED_UPLOADS: usize = 32;

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli)));
    if let Err(e) = result {
        // Broker messages are untrusted text too.
        eprintln!("error: {}", terminal_safe(&format!("{e:#}")));
        if let Some(ClientError::Connect(_)) = client_error(&e) {
            // A broker that moved left this home's saved address behind, with nothing
            // said about how to change it (a user's trial).
            eprintln!(
                "sb: is the broker running there? Give another address with --server (or SWITCHBOARD_SERVER) for one \
                 run, or save it for this home with `sb --server HOST:PORT server`"
            );
        }
        if let Some(ClientError::Untrusted(why)) = client_error(&e) {
            if why.contains("not valid for name") {
                // The right file, for another name: a new --ca will not help (an operator
                // trial was sent to check its file).
                eprintln!(
                    "sb: the broker's certificate does not name the host in --server: connect by a name it has (the \
                     broker lists them at start when it listens beyond loopback), or trust it by --pin (the sha256 \
                     the broker prints at start)"
                );
            } else if why.contains("expired") || why.contains("not valid yet") {
                // The right certificate, out of its dates (or this host's clock is off):
                // another --ca file will not help either.
                eprintln!(
                    "sb: the broker's certificate is outside its validity dates (or this computer's clock is wrong): \
                     its operator must install a new one; until then --pin (the sha256 the broker prints at start) \
                     connects"
                );
            } else {
                eprintln!(
                    "sb: check --ca (the broker's cert.pem) or --pin (the sha256 the broker prints at start), and --server"
                );
            }
        }
        if json {
            say(json!({ "error": error_json(&e) }));
        }
        // 128 + SIGINT, as shells report a command Ctrl-C ended.
        std::process::exit(if e.downcast_ref::<Interrupted>().is_some() { 130 } else { exit_status(&e) });
    }
    if STDOUT_GONE.load(std::sync::atomic::Ordering::Relaxed) {
        std::process::exit(141);
    }
}

/// What sb refused by itself, with the code the broker would give the same refusal:
/// `NOT_FOUND` for something named on the command line that sb looked up and did not
/// find (a conversation title, a member's name, a user whose presence is not shown),
/// `CONFLICT` for a home enrolled already, `INVALID` for a text the broker would refuse.
/// sb exits with that code's status and `--json` names it (a script told these from any
/// other failure only by the message before: trials).
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
pub struct Refused(pub ErrorCode, pub String);

impl Refused {
    /// sb's own `NOT_FOUND`.
    pub fn not_found(message: String) -> Refused {
        Refused(ErrorCode::NOT_FOUND, message)
    }
}

/// A command line sb cannot use (a `--server` or `--pin` of the wrong form): status 2,
/// as clap's own refusals.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// Ctrl-C, SIGTERM or SIGHUP cut the command short (sb exits with status 130).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Interrupted(&'static str);

/// The client library's error inside `e`, however it was wrapped.
fn client_error(e: &anyhow::Error) -> Option<&ClientError> {
    e.downcast_ref::<ClientError>()
        .or_else(|| match e.downcast_ref::<SessionError>() {
            Some(SessionError::Client(c)) => Some(c),
            _ => None,
        })
        .or_else(|| match e.downcast_ref::<TransferError>() {
            Some(TransferError::Client(c)) => Some(c),
            _ => None,
        })
}

/// sb's exit status for a failure, by the broker's refusal where there is one (README,
/// "Exit status"; the operator commands' statuses where they mean the same): 3 not found
/// (also sb's own lookups that find nothing, `NotFound`), 4 conflict, 5 invalid (a file
/// too large, of a refused type, or not matching its hash too), 6 try again later
/// (`OVERLOADED`, `RATE_LIMITED`, `STORAGE_FULL`; `QUOTA_EXCEEDED`, `TOO_MANY_UPLOADS`,
/// `NOT_READY` once something is freed or finished), 7 forbidden (registration closed
/// too), 8 this device may not act (`AUTH_FAILED`, `DEVICE_REVOKED`,
/// `ACCOUNT_DISABLED`), 1 anything else. Before, every failure was 1 and scripts had to
/// read the message.
fn exit_status(e: &anyhow::Error) -> i32 {
    if e.downcast_ref::<Usage>().is_some() {
        return 2;
    }
    let code = match (e.downcast_ref::<Refused>(), e.downcast_ref::<TransferError>()) {
        (Some(Refused(code, _)), _) => Some(*code),
        (_, Some(TransferError::Failed { error, .. })) => Some(error.code),
        (_, Some(TransferError::Reset(code))) => Some(*code),
        _ => match client_error(e) {
            Some(ClientError::Server(body)) => Some(body.code),
            Some(ClientError::Closed { code, .. }) => *code,
            _ => None,
        },
    };
    match code {
        Some(ErrorCode::NOT_FOUND) => 3,
        Some(ErrorCode::CONFLICT) => 4,
        // A file refused for what it is, as a request refused for what it says (they
        // and `REGISTRATION_CLOSED` exited 1: an operator's trial).
        Some(ErrorCode::INVALID | ErrorCode::FILE_TOO_LARGE | ErrorCode::TYPE_MISMATCH | ErrorCode::HASH_MISMATCH) => 5,
        // A bound of the broker's or the user's, reached: later, or once something is
        // freed or finished.
        Some(
            ErrorCode::OVERLOADED
            | ErrorCode::RATE_LIMITED
            | ErrorCode::STORAGE_FULL
            | ErrorCode::QUOTA_EXCEEDED
            | ErrorCode::TOO_MANY_UPLOADS
            | ErrorCode::NOT_READY,
        ) => 6,
        Some(ErrorCode::FORBIDDEN | ErrorCode::REGISTRATION_CLOSED) => 7,
        Some(ErrorCode::AUTH_FAILED | ErrorCode::DEVICE_REVOKED | ErrorCode::ACCOUNT_DISABLED) => 8,
        _ => 1,
    }
}

/// The `error` object of a JSON error line: the broker's code (the wire code, PROTOCOL.md
/// section 9; not the exit status), its name and the broker's own message; for sb's
/// own refusals (`Refused`) the code the broker would give; `null` code and name for
/// any other failure of sb's own.
fn error_json(e: &anyhow::Error) -> serde_json::Value {
    let client = client_error(e);
    match e.downcast_ref::<TransferError>() {
        Some(TransferError::Failed { error, .. }) => {
            return json!({"code": error.code.0, "name": error.code.name(), "message": error.message});
        }
        Some(TransferError::Reset(code)) => {
            return json!({"code": code.0, "name": code.name(), "message": format!("{e:#}")});
        }
        _ => {}
    }
    // sb's own lookup, told as the broker's `NOT_FOUND` is (its exit status is the same).
    if let Some(Refused(code, message)) = e.downcast_ref::<Refused>() {
        return json!({"code": code.0, "name": code.name(), "message": message});
    }
    let too_large;
    let (code, message) = match client {
        Some(ClientError::Server(body)) => (body.code, &body.message),
        Some(ClientError::Closed { code: Some(code), reason }) => (*code, reason),
        Some(ClientError::TooLarge { bytes, limit }) => {
            too_large = switchboard_client::too_large(*bytes, *limit);
            (ErrorCode::FRAME_TOO_LARGE, &too_large)
        }
        _ => return json!({"code": null, "name": null, "message": format!("{e:#}")}),
    };
    json!({"code": code.0, "name": code.name(), "message": message})
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    let home = home_dir()?;
    if matches!(cli.command, Command::Server) {
        update_state(&home, |s| {
            cli.broker.apply(s);
            Ok(())
        })?;
        let saved = load_state(&home)?;
        let server = saved.server.as_deref().unwrap_or(DEFAULT_SERVER);
        let trust = match (&saved.ca, &saved.pin) {
            (Some(ca), _) => format!("the certificate in {}", ca.display()),
            (None, Some(pin)) => format!("the certificate of sha256 {pin}"),
            (None, None) => {
                "the default certificate (./switchboard-data/cert.pem, for a broker on this machine)".into()
            }
        };
        let out = Out { json: cli.json, stderr: false };
        out.line(json!({"event": "server", "server": server, "ca": saved.ca, "pin": saved.pin}), || {
            format!("this home connects to {server}, trusting {trust}")
        });
        return Ok(());
    }
    let mut state = load_state(&home)?;
    cli.broker.apply(&mut state);
    fill_defaults(&mut state);
    let out = Out { json: cli.json, stderr: false };
    // `probe --timeout` bounds the connect itself.
    let options = match cli.command {
        Command::Probe { timeout } => {
            TransportOptions { connect_timeout: std::time::Duration::from_secs_f64(timeout), ..Default::default() }
        }
        _ => TransportOptions::default(),
    };
    let enrolling = matches!(cli.command, Command::Register { .. } | Command::Login { .. });
    // Said before the trust is looked for: without a device nothing else matters yet.
    if !enrolling && !matches!(cli.command, Command::Probe { .. }) && state.identity.is_none() {
        bail!("no device here yet: run `sb register NAME` or `sb login NAME`");
    }
    if let Command::Devices { command: Some(DeviceCommand::Revoke { device: Some(device), password: asked, .. }) } =
        &mut cli.command
        && let Some(me) = &state.identity
        && *device != me.device_id
    {
        *asked = Some(password(&me.user, false)?);
    }
    let connector = connector(&state, &options).await?;
    // `tail`, `typing` and `send` end on Ctrl-C or SIGTERM themselves (tail saves its
    // cursors, send says how to send again); any other command is cut short here, so
    // that its connection is closed below too. (Both listening, either may take the
    // signal: CI's run of the send test got this one's bare "interrupted".)
    let own_interrupt = matches!(cli.command, Command::Tail | Command::Typing { .. } | Command::Send { .. });
    let downloading = matches!(cli.command, Command::Download { .. });
    let uploading = matches!(cli.command, Command::Upload { .. });
    // Whose account a refusal is about: the one being enrolled, else this home's.
    let account = match &cli.command {
        Command::Register { name, .. } | Command::Login { name, .. } => Some(name.clone()),
        _ => state.identity.as_ref().map(|i| i.user.clone()),
    };
    let mut was_interrupted = false;
    let mut result = tokio::select! {
        result = command(cli, &home, &state, &out, &connector) => result,
        _ = interrupted(), if !own_interrupt => {
            was_interrupted = true;
            Err(Interrupted(if downloading {
                "interrupted; the bytes downloaded so far are kept beside OUT: the same command resumes"
            } else if uploading {
                // Before, "interrupted" alone: a new user did not know the upload was kept.
                "interrupted; the upload is kept on the broker until it expires (`sb uploads` lists it): the same \
                 command continues it"
            } else {
                "interrupted"
            })
            .into())
        }
    };
    let disabled = result.as_ref().err().and_then(client_error).and_then(ClientError::code);
    if disabled == Some(ErrorCode::ACCOUNT_DISABLED) {
        let user = account.as_deref().unwrap_or("NAME");
        result = result.context(format!(
            "ask the broker's operator to let this account back in (`switchboard user enable {user}`)"
        ));
    } else if let Err(e) = result.as_ref()
        && !enrolling
    {
        // A refused connection, not a request's answer (a wrong current password is
        // `AUTH_FAILED` too).
        let refused = client_error(e).filter(|c| !matches!(c, ClientError::Server(_)));
        let code = refused.and_then(ClientError::code);
        let user = state.identity.as_ref().map_or("NAME", |i| i.user.as_str());
        let server = state.server.as_deref().unwrap_or(DEFAULT_SERVER);
        if code == Some(ErrorCode::DEVICE_REVOKED) {
            result = result.context(format!(
                "this device was removed from {user}'s account at {server} (by `sb devices revoke` from another device, a password change that signed out the other devices, the operator, or, for one that never connected after its login, a newer login at the account's device limit): `sb login {user}` enrolls it again, with the account's password (a new one if it was changed)"
            ));
        } else if code == Some(ErrorCode::AUTH_FAILED) {
            result = result.context(format!(
                "this device is not enrolled at {server} any more (revoked long ago, or the account is gone, say after the broker's data was restored from a backup; or is this another broker?): `sb login {user}` enrolls it again if the account is there, else `sb register {user}` makes it again"
            ));
        }
    }
    // Failed or not, the broker learns at once that this device left: a connection
    // dropped without its close would count as one of the user's sessions (and show the
    // user online) until the broker's idle timeout, 30 s.
    connector.endpoint().close(0u32.into(), b"bye");
    // A connect that failed left nothing the broker counts: no close to wait for.
    let connected = !matches!(
        result.as_ref().err().and_then(client_error),
        Some(ClientError::Connect(_) | ClientError::Refused(_) | ClientError::Untrusted(_))
    );
    if connected {
        // Someone who interrupts wants out: the close is sent at once and not waited on
        // for long (a connect cut short would hold the exit for its whole drain).
        let interrupted = was_interrupted || result.as_ref().is_err_and(|e| e.downcast_ref::<Interrupted>().is_some());
        let wait = if interrupted { INTERRUPTED_CLOSE_WAIT } else { CLOSE_WAIT };
        let _ = tokio::time::timeout(wait, connector.endpoint().wait_idle()).await;
    }
    result
}

/// How long sb waits at exit for its connections' closes to be sent and acknowledged.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `CLOSE_WAIT` after Ctrl-C, SIGTERM or SIGHUP: long enough for the close to leave.
const INTERRUPTED_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

async fn command(cli: Cli, home: &Path, state: &State, out: &Out, connector: &Connector) -> anyhow::Result<()> {
    let reach = Rerun::sb(std::env::var_os("SWITCHBOARD_HOME").as_deref(), &cli.broker);
    match cli.command {
        command @ (Command::Register { .. } | Command::Login { .. }) => {
            let (register, name, device) = match command {
                Command::Register { name, device } => (true, name, device),
                Command::Login { name, device } => (false, name, device),
                _ => unreachable!("matched above"),
            };
            let device = device.unwrap_or_else(device_name);
            // A home holds one device: enrolling another while it still works would leave
            // an enrolled device whose key nobody holds. A revoked one may be replaced,
            // by any user's.
            if let Some(current) = state.identity.as_ref() {
                match connector.connect(current).await {
                    Ok(client) => {
                        client.close();
                        return Err(Refused(
                            ErrorCode::CONFLICT,
                            format!(
                                "this home is logged in as {} already (device {}); use another SWITCHBOARD_HOME for another device",
                                current.user, current.device_id
                            ),
                        )
                        .into());
                    }
                    Err(e) if matches!(e.code(), Some(ErrorCode::AUTH_FAILED | ErrorCode::DEVICE_REVOKED)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let replaced = state.identity.as_ref().map(|i| (i.user.clone(), i.device_id));
            let password = password(&name, register)?;
            let (_client, identity) = if register {
                connector.register(&name, &password, &device).await?
            } else {
                connector.login(&name, &password, &device).await?
            };
            update_state(home, |s| {
                // Another sb in this home may have enrolled meanwhile.
                if s.identity.as_ref().map(|i| (i.user.clone(), i.device_id)) != replaced {
                    bail!("another sb enrolled a device in this home meanwhile; nothing saved");
                }
                cli.broker.apply(s);
                fill_defaults(s);
                s.identity = Some(identity.clone());
                Ok(())
            })?;
            let (event, verb) = if register { ("registered", "registered") } else { ("logged_in", "logged in as") };
            out.line(
                json!({"event": event, "user": name, "user_id": identity.user_id, "user_name": name, "device_id": identity.device_id}),
                || format!("{verb} {name} (user {}, device {})", identity.user_id, identity.device_id),
            );
        }
        Command::Probe { .. } => {
            let server = state.server.clone().unwrap_or_else(|| DEFAULT_SERVER.into());
            let probe = match connector.probe().await {
                Ok(probe) => probe,
                // It answered: up, and full. A health check that restarted it now would
                // do so when it is busiest (an operator trial).
                Err(ClientError::Refused(_)) => {
                    out.line(json!({"event": "probe", "server": server, "full": true}), || {
                        format!(
                            "broker at {server} is up but refused this connection, as a broker at its connection \
                             limit (max_connections) does (the refusal comes before TLS: not proof of which server \
                             answered; its log and status line say)"
                        )
                    });
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let offset_ms = probe.clock_offset_ms.round() as i64;
            out.line(
                json!({"event": "probe", "server": server, "version": probe.version,
                    "answered_ms": (probe.answered_ms * 1000.0).round() / 1000.0,
                    "round_trip_ms": (probe.round_trip_ms * 1000.0).round() / 1000.0, "clock_offset_ms": offset_ms}),
                || {
                    format!(
                        "broker at {server} answered in {:.1} ms: protocol {}, round trip {:.2} ms, its clock {offset_ms:+} ms from ours",
                        probe.answered_ms, probe.version, probe.round_trip_ms
                    )
                },
            );
        }
        command => {
            let identity =
                state.identity.as_ref().context("no device here yet: run `sb register NAME` or `sb login NAME`")?;
            if let Command::Tail = command {
                tail(connector, identity, home, out).await?;
            } else if let Command::Upload { file, conv, content_type, caption, no_send, resume } = command {
                let upload = UploadArgs { path: file, conv, content_type, caption, no_send, resume };
                files::upload(connector, identity, home, out, &reach, upload).await?;
            } else if let Command::Passwd { sign_out_others } = command {
                passwd(connector, identity, out, sign_out_others).await?;
            } else if let Command::Download { file, out: path, offset, length } = command {
                files::download(connector, identity, out, &file, &path, offset, length).await?;
            } else if let Command::Send { conv, text, client_id, retry_for } = command {
                check_text(&text)?;
                let message =
                    Message { conv, text, client_id, retry_for: std::time::Duration::from_secs_f64(retry_for) };
                send(connector, identity, out, &reach, message).await?;
            } else if let Command::Typing { conv, seconds } = command {
                typing(connector, identity, out, conv, std::time::Duration::from_secs(seconds)).await?;
            } else if let Command::Uploads = command {
                let client = connector.connect(identity).await?;
                files::uploads(&client, home, out, &reach).await?;
            } else {
                let client = connector.connect(identity).await?;
                authed(&client, identity, home, out, command).await?;
            }
        }
    }
    Ok(())
}

/// A message's text as the broker takes it: 1 to `MAX_TEXT_BYTES` bytes. Said before
/// anything is sent: a text past the broker's frame limit was refused only as a request
/// too large for a frame.
fn check_text(text: &str) -> anyhow::Result<()> {
    let most = switchboard_protocol::limits::MAX_TEXT_BYTES as usize;
    if !(1..=most).contains(&text.len()) {
        return Err(Refused(
            ErrorCode::INVALID,
            format!("a text must be 1 to {most} bytes (UTF-8); this one is {}: nothing sent", text.len()),
        )
        .into());
    }
    Ok(())
}

/// Where a history page stops short of the conversation's ends, what the next page
/// would show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MoreHistory {
    /// A full page going back (newest, or `--before`) that starts after seq 1: entries
    /// before `.0` may exist (a member who joined later is served none before joining).
    Older(Seq),
    /// A page going forward (`--after`) that ends before the conversation's last seq.
    Newer(Seq),
}

impl MoreHistory {
    fn flag(self) -> String {
        match self {
            MoreHistory::Older(seq) => format!("--before {seq}"),
            MoreHistory::Newer(seq) => format!("--after {seq}"),
        }
    }
}

impl std::fmt::Display for MoreHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MoreHistory::Older(_) => "older entries",
            MoreHistory::Newer(_) => "newer entries",
        })
    }
}

/// What lies beyond a page of `limit` entries asked for with `page`, in a conversation
/// whose newest seq is `last_seq`.
fn more_history(page: Page, entries: &[Entry], limit: u16, last_seq: Seq) -> Option<MoreHistory> {
    let (first, last) = (entries.first()?.seq, entries.last()?.seq);
    match page {
        Page::After(_) if last < last_seq => Some(MoreHistory::Newer(last)),
        Page::After(_) => None,
        _ if entries.len() >= usize::from(limit) && first > 1 => Some(MoreHistory::Older(first)),
        _ => None,
    }
}

/// `sb passwd`: both passwords are asked first (a connection left waiting while someone
/// types would be closed by the broker's idle timeout), then one request.
async fn passwd(connector: &Connector, identity: &Identity, out: &Out, sign_out_others: bool) -> anyhow::Result<()> {
    let user = identity.user.clone();
    let current = password(&user, false)?;
    let new = match std::env::var("SWITCHBOARD_NEW_PASSWORD") {
        Ok(p) => p,
        Err(_) => {
            let (p, typed) = secret("new password: ", "SWITCHBOARD_NEW_PASSWORD")?;
            if typed && secret("again: ", "SWITCHBOARD_NEW_PASSWORD")?.0 != p {
                bail!("passwords differ");
            }
            p
        }
    };
    let client = connector.connect(identity).await?;
    let changed = client.change_password(&current, &new, sign_out_others).await;
    client.close();
    changed?;
    out.line(json!({"event": "password_changed", "signed_out_others": sign_out_others}), || {
        if sign_out_others {
            format!("changed the password of {user} and revoked its other devices")
        } else {
            format!("changed the password of {user} (its other devices still work: --sign-out-others revokes them)")
        }
    });
    Ok(())
}

/// Whether `sb send` tries again after `error`: the connection failed or was lost. A
/// refusal, a certificate not trusted, or a connection the broker closed on purpose
/// (any close code but `GOING_AWAY`) is final.
fn connection_lost(error: &ClientError) -> bool {
    matches!(error, ClientError::Connect(_) | ClientError::Refused(_))
        || matches!(error, ClientError::Closed { code, .. } if code.is_none_or(|c| c == ErrorCode::GOING_AWAY))
}

/// Whether sending again may succeed where an attempt failed: the connection went (or
/// never came), or the broker was over a bound (`OVERLOADED`: nothing done, retry with
/// backoff) or failed inside (`INTERNAL`: a conversation's actor that died; retry with
/// the same id), as PROTOCOL.md's table of codes says.
pub(crate) fn worth_resending(error: &ClientError) -> bool {
    connection_lost(error) || matches!(error.code(), Some(ErrorCode::OVERLOADED | ErrorCode::INTERNAL))
}

/// Whether the broker answered that it did not store the message: a refusal, but not
/// `INTERNAL` (after it "nothing unacknowledged can be assumed done"); or the client
/// library did not send it (`TooLarge`: over the broker's frame limit). A close, a lost
/// connection or an answer sb cannot read is no answer.
pub(crate) fn refused(error: &ClientError) -> bool {
    matches!(error, ClientError::Server(e) if e.code != ErrorCode::INTERNAL)
        || matches!(error, ClientError::TooLarge { .. })
}

/// `--retry-for`: a number of seconds, 0 to one day.
fn retry_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: give seconds, 0 to 86400")),
    }
}

/// What `sb send` sends: to `conv`, `text` under `client_id` (fresh if none), trying
/// for `retry_for` across lost connections.
struct Message {
    conv: ConvArg,
    text: String,
    client_id: Option<String>,
    retry_for: std::time::Duration,
}

/// `sb send`: the message under one client id, sent again on a new connection whenever
/// the connection is lost before the answer (a broker restart, a network drop) or the
/// broker asks for a retry (`worth_resending`), for up to `--retry-for`: the broker
/// answers a resend with the first one's seq, so the message is stored once whether or
/// not the lost attempt had landed. An ack or a final refusal ends it. Given up, the
/// error says whether the message may be stored (an attempt sent it and no refusal came)
/// or not (refused, or the broker was never reached) and names the command, with this
/// run's home and broker flags (`reach`), that sends it again safely.
async fn send(
    connector: &Connector,
    identity: &Identity,
    out: &Out,
    reach: &Rerun,
    message: Message,
) -> anyhow::Result<()> {
    let Message { conv, text, client_id, retry_for } = message;
    let given_id = client_id.is_some();
    let text = text.as_str();
    let client_id = client_id_or_new(client_id.as_deref())?;
    let deadline = tokio::time::Instant::now() + retry_for;
    let mut backoff = switchboard_client::Backoff::new(100, 2_000);
    // Whether an attempt got as far as sending: until then the broker has nothing (from
    // this run). A title is looked up on a connection, riding out lost connections like
    // the send (a title that matches none or several is final), once: later attempts
    // send to the number it gave, as the printed command does (the title may since
    // name another conversation, and a resend there would be a second message).
    let mut maybe_stored = false;
    // Whether an attempt sent it and the broker refused it (`refused`).
    let mut refused_once = false;
    let mut looked_up = match conv {
        ConvArg::Id(id) => Some(id),
        ConvArg::Title(_) => None,
    };
    // Ctrl-C (or SIGTERM, SIGHUP) while an attempt runs or between attempts gives up as
    // running out of `--retry-for` does, printing what became of the message and the
    // command that sends it at most once (before, it said only "interrupted", and a user
    // who gave up on a broker that was down did not learn the command).
    let stop = interrupted();
    tokio::pin!(stop);
    // Set to the conversation as an attempt hands the message to the broker: one
    // interrupted or out of time past that point may have stored it.
    let handing = std::cell::Cell::new(None);
    let (conv, seq, duplicate) = loop {
        // The whole attempt, its answer too, within `--retry-for` (the connect timeout
        // alone is 10 s, and a broker that never answers is given up only after the
        // client's 60 s of silence), at least a second.
        let until = deadline.max(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
        handing.set(None);
        let attempt = async {
            let client = connector.connect(identity).await.map_err(|e| (e, None, false))?;
            let id = match looked_up {
                Some(id) => id,
                None => {
                    let convs = client.conversations().await;
                    match convs.map(|convs| conv.among_to_write(&convs)) {
                        Ok(Ok(id)) => id,
                        Ok(Err(e)) => {
                            client.close();
                            return Ok(Err(e));
                        }
                        Err(e) => {
                            client.close();
                            return Err((e, None, false));
                        }
                    }
                }
            };
            handing.set(Some(id));
            let sent = client.send_with_id(id, client_id, text).await;
            client.close();
            sent.map(|sent| Ok((id, sent))).map_err(|e| (e, Some(id), true))
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout_at(until, attempt) => Some(outcome.unwrap_or_else(|_| {
                let waited = match handing.get() {
                    None => ClientError::Connect("no broker answered within --retry-for".into()),
                    Some(_) => ClientError::Closed { code: None, reason: "no answer within --retry-for".into() },
                };
                Err((waited, handing.get(), handing.get().is_some()))
            })),
            _ = &mut stop => None,
        };
        let error = match outcome {
            Some(Ok(Ok((id, (seq, duplicate))))) => break (id, seq, duplicate),
            Some(Ok(Err(e))) => return Err(e),
            None => {
                maybe_stored |= handing.get().is_some();
                // The command printed sends to the number the title was taken for (the
                // title may since name another conversation).
                looked_up = looked_up.or(handing.get());
                None
            }
            Some(Err((e, id, sent))) => {
                // Sent, and no answer came that says it was not stored: it may be.
                let said_no = refused(&e);
                maybe_stored |= sent && !said_no;
                refused_once |= sent && said_no;
                looked_up = looked_up.or(id);
                Some(e)
            }
        };
        // What became of the message and the command that sends it at most once, for a
        // run that gives up (a refusal by the broker of a first attempt needs neither:
        // nothing was stored).
        let give_up = |error: anyhow::Error| {
            let conv_word = looked_up.map_or_else(|| conv.to_string(), |id| id.to_string());
            let again = reach
                .clone()
                .then(&format!("send --client-id {} --", hex(&client_id)))
                .word(&conv_word, "CONV", "the same conversation")
                .word(text, "TEXT", "the same text");
            let said = if maybe_stored {
                format!("the broker may have stored it: {again} sends it again at most once")
            } else if refused_once {
                format!("not stored (the broker refused it): {again} sends it, at most once")
            } else if given_id {
                format!(
                    "this run never handed it to the broker (an earlier run with this --client-id may have): \
                     {again} sends it, at most once"
                )
            } else {
                format!("not sent (no attempt got as far as sending it): {again} sends it, at most once")
            };
            // The broker was never asked what the title names.
            let unchecked = match (&conv, looked_up) {
                (ConvArg::Title(_), None) => {
                    format!(" (\"{conv}\" was never looked up: it may name none of my conversations, or several)")
                }
                _ => String::new(),
            };
            error.context(format!("{said}{unchecked}"))
        };
        let Some(error) = error else { return Err(give_up(Interrupted("interrupted").into())) };
        if !worth_resending(&error) {
            // After an attempt that may have stored it (a resend refused, a certificate
            // refused on the next connection), the command is what the user needs; else
            // the error alone (a certificate refused on the first connection: the same
            // --ca or --pin again would not do).
            if maybe_stored {
                return Err(give_up(error.into()));
            }
            return Err(error.into());
        }
        let delay = std::time::Duration::from_millis(backoff.next_ms(switchboard_client::random_u64()));
        if tokio::time::Instant::now() + delay >= deadline {
            return Err(give_up(error.into()));
        }
        out.status(
            json!({"event": "resending", "conv": looked_up.map_or_else(|| json!(conv.to_string()), |id| json!(id)),
                "client_id": hex(&client_id), "error": error.to_string()}),
            || match error {
                ClientError::Connect(_) | ClientError::Refused(_) => {
                    format!("no connection ({error}); trying again in {} ms", delay.as_millis())
                }
                ClientError::Server(_) => format!("{error}; sending again in {} ms", delay.as_millis()),
                _ => format!("connection lost before the answer ({error}); sending again in {} ms", delay.as_millis()),
            },
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut stop => return Err(give_up(Interrupted("interrupted while waiting to send again").into())),
        }
    };
    out.appended(conv, seq, &client_id, duplicate);
    Ok(())
}

/// `sb typing`: says I am typing in `conv` until interrupted or for `seconds`, with a
/// repeat every `TYPING_REFRESH_MS` (the indicator expires after twice that), then a
/// stop. A lost connection (a broker restart) is ridden out: it connects again and says
/// so again, as `tail` does (before, it ended with the connection's error).
async fn typing(
    connector: &Connector,
    identity: &Identity,
    out: &Out,
    conv: ConvArg,
    seconds: std::time::Duration,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + seconds;
    // Its time is up or it was interrupted: one future for both, every wait races it.
    let halt = async {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = interrupted() => {}
        }
    };
    tokio::pin!(halt);
    let mut backoff = switchboard_client::Backoff::new(100, 2_000);
    let mut looked_up = None;
    loop {
        let attempt = async {
            let client = connector.connect(identity).await?;
            let id = match looked_up {
                Some(id) => id,
                None => {
                    // The write rule: a typing signal tells its audience I am here and
                    // writing (before, `sb typing bob` with no direct conversation with bob
                    // told a stranger's group titled "bob").
                    let id = conv.resolve_to_write(&client).await?;
                    // A signal has no answer (the broker drops one for a conversation I
                    // am not in): ask first, so a wrong conversation is an error here.
                    client.members(id).await?;
                    out.line(json!({"event": "typing", "conv": id, "typing": true}), || format!("typing in {id}"));
                    id
                }
            };
            anyhow::Ok((client, id))
        };
        // Time up or interrupted while not connected: the broker ended the indicator
        // with the session (or never had it).
        let stopped = |id: Option<ConvId>| -> anyhow::Result<()> {
            // Never connected: nothing was said, and that is no success.
            let Some(id) = id else { bail!("never reached the broker: nobody was told I was typing") };
            out.line(json!({"event": "typing", "conv": id, "typing": false}), || format!("stopped typing in {id}"));
            Ok(())
        };
        let connected = tokio::select! {
            connected = attempt => connected,
            _ = &mut halt => return stopped(looked_up),
        };
        let (client, id) = match connected {
            Ok(c) => c,
            // A title that names nothing, a conversation I am not in, a revoked device:
            // final. A broker that is down or going away is waited for.
            Err(e) if !client_error(&e).is_some_and(worth_resending) => return Err(e),
            Err(e) => {
                let delay = backoff.next_ms(switchboard_client::random_u64());
                out.status(
                    json!({"event": "reconnect_failed", "error": format!("{e:#}"), "retry_in_ms": delay}),
                    || format!("cannot reach the broker ({e:#}); trying again in {delay} ms"),
                );
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(delay)) => continue,
                    _ = &mut halt => return stopped(looked_up),
                }
            }
        };
        if looked_up.is_some() {
            out.status(json!({"event": "connected"}), || "connected; typing again".into());
        }
        looked_up = Some(id);
        let connected_at = tokio::time::Instant::now();
        let mut refresh = tokio::time::interval(std::time::Duration::from_millis(TYPING_REFRESH_MS));
        let lost = loop {
            tokio::select! {
                _ = refresh.tick() => if let Err(e) = client.signal(Signal::Typing { conv: id, typing: true }).await {
                    break Some(e);
                },
                _ = &mut halt => break None,
                e = client.closed() => break Some(e),
            }
        };
        let Some(lost) = lost else {
            client.signal(Signal::Typing { conv: id, typing: false }).await?;
            // The answer comes after the broker has read the stop signal before it.
            client.ping().await?;
            out.line(json!({"event": "typing", "conv": id, "typing": false}), || format!("stopped typing in {id}"));
            return Ok(());
        };
        if !worth_resending(&lost) {
            return Err(lost.into());
        }
        // A connection that lasted a while starts the backoff over; one closed at once
        // (a broker failing each session it takes) is dialled again no faster than it.
        if connected_at.elapsed() >= std::time::Duration::from_millis(TYPING_REFRESH_MS) {
            backoff.reset();
        }
        let delay = backoff.next_ms(switchboard_client::random_u64());
        out.status(json!({"event": "disconnected", "error": lost.to_string(), "retry_in_ms": delay}), || {
            format!("connection lost ({lost}); connecting again in {delay} ms")
        });
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(delay)) => {}
            _ = &mut halt => return stopped(looked_up),
        }
    }
}

/// The `--client-id` given (32 hex digits), or a fresh one.
pub(crate) fn client_id_or_new(given: Option<&str>) -> anyhow::Result<ClientMsgId> {
    match given {
        Some(h) => {
            unhex(h).and_then(|b| <[u8; 16]>::try_from(b).ok()).context("--client-id takes 32 hex digits (16 bytes)")
        }
        None => Ok(new_client_id()),
    }
}

/// The clap value parser of a user's name: in ASCII lower case, as every user name is
/// (the broker's rule: `a-z 0-9 _ . -`). Before, `sb send Bob` found the direct
/// conversation with bob (titles match whatever their case) while `sb presence Bob` said
/// "not shown", `sb conv remove team Bob` "not a member" and `sb block Bob` was refused
/// (a review).
fn user_name_arg(s: &str) -> Result<String, String> {
    Ok(s.to_ascii_lowercase())
}

/// A file id on the command line: 32 hex digits (taken in lower case), else refused as a
/// mistyped command line (status 2, as clap's own refusals; a trial got status 1 for
/// `sb download zzzz OUT`, which README's table calls a usage error).
fn file_id_arg(s: &str) -> Result<String, String> {
    hex16_arg(s, "a file id")
}

/// A `--client-id` (idempotency key): 32 hex digits, refused as `file_id_arg` is.
fn client_id_arg(s: &str) -> Result<String, String> {
    hex16_arg(s, "an idempotency key")
}

/// `s` if it is 32 hex digits (16 bytes), in lower case; else what `what` is.
fn hex16_arg(s: &str, what: &str) -> Result<String, String> {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("{what} is 32 hex digits (16 bytes)"))
    }
}

/// `on` or `off` (as the command's help says) as a bool; its help lists exactly those two
/// (clap's boolish parser took `yes`, `false`, `1` and showed `true, false` while the
/// command's own help said `on`/`off`: a trial).
fn on_off() -> impl clap::builder::TypedValueParser<Value = bool> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(["on", "off"]).map(|v| v == "on")
}

/// A member of `conv` named by user name, or by user id as `#ID` (or a bare number that
/// is no member's name). A name that is also another member's id is refused as
/// ambiguous: names may be all digits, and history shows members by id.
async fn member_id(client: &Client, conv: ConvId, user: &str) -> anyhow::Result<UserId> {
    let members = client.members(conv).await?;
    if let Some(id) = user.strip_prefix('#') {
        let id: UserId = id.parse().with_context(|| format!("{user:?}: #ID takes a user id"))?;
        return Ok(id);
    }
    let by_name = members.iter().find(|m| m.name == user).map(|m| m.user_id);
    let by_id = user.parse::<UserId>().ok().filter(|id| members.iter().any(|m| m.user_id == *id));
    match (by_name, by_id) {
        (Some(a), Some(b)) if a != b => {
            bail!("{user:?} is a member's name (user {a}) and another member's id: say {user:?}'s id as #{a} or #{b}")
        }
        (Some(id), _) | (None, Some(id)) => Ok(id),
        (None, None) => Err(Refused::not_found(format!("{user:?} is not a member of conversation {conv}")).into()),
    }
}

/// The title of a group created without one: its members' names, mine first, as many
/// as fit a label (64 bytes) and then how many more (`alice, bob, carol +2`). Before,
/// every such group was titled "group", and two of them could not be told apart by
/// title (a user's trial).
fn members_title(me: &str, others: &[String]) -> String {
    const MAX: usize = switchboard_protocol::limits::MAX_NAME_BYTES as usize;
    let names: Vec<&str> = std::iter::once(me).chain(others.iter().map(String::as_str)).collect();
    let mut title = names[0].to_owned();
    for (shown, name) in names.iter().enumerate().skip(1) {
        // This name, and room to say how many follow it.
        let after = names.len() - shown - 1;
        let tail = if after > 0 { format!(" +{after}") } else { String::new() };
        if title.len() + 2 + name.len() + tail.len() > MAX {
            // Fits (the previous step left room for it), unless my own name is that long.
            let more = format!("{title} +{}", names.len() - shown);
            return if more.len() <= MAX { more } else { format!("{} members", names.len()) };
        }
        title = format!("{title}, {name}");
    }
    title
}

/// Runs `command` as `me` (this home's identity) on `client`.
async fn authed(client: &Client, me: &Identity, home: &Path, out: &Out, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Register { .. } | Command::Login { .. } | Command::Probe { .. } | Command::Server => {
            unreachable!("handled before connecting")
        }
        Command::Conv { command } => match command {
            ConvCommand::Create { title, mut users } => {
                // The same user named twice is one member (`carol carol` is a direct
                // conversation with carol).
                let mut seen = std::collections::HashSet::new();
                users.retain(|u| seen.insert(u.clone()));
                let conv = match (title, users.as_slice()) {
                    (None, [peer]) => client.create_direct(peer).await?,
                    (Some(title), _) => client.create_group(&title, &users).await?,
                    (None, _) => client.create_group(&members_title(&me.user, &users), &users).await?,
                };
                out.conversation(&conv, None);
            }
            ConvCommand::List => {
                let states = client.conversation_states().await?;
                if states.is_empty() {
                    out.status(json!({"event": "no_conversations"}), || "no conversations yet".into());
                }
                for state in states {
                    out.conversation_state(&state);
                }
            }
            ConvCommand::Members { conv } => {
                let conv = conv.resolve(client).await?;
                for m in client.members(conv).await? {
                    out.line(
                        json!({"user_id": m.user_id, "user_name": m.name, "name": m.name, "role": format!("{:?}", m.role).to_lowercase()}),
                        || format!("{:>6}  {:<20} {:?}", m.user_id, m.name, m.role),
                    );
                }
            }
            ConvCommand::Add { conv, users, admin } => {
                let conv = conv.resolve_group(client).await?;
                let seq = client.add_members(conv, &users, if admin { Role::Admin } else { Role::Member }).await?;
                out.seq(conv, seq);
            }
            ConvCommand::Remove { conv, user } => {
                let conv = conv.resolve_group(client).await?;
                let user = member_id(client, conv, &user).await?;
                out.seq(conv, client.remove_member(conv, user).await?)
            }
            ConvCommand::Role { conv, user, role } => {
                let conv = conv.resolve_group(client).await?;
                let user = member_id(client, conv, &user).await?;
                let role = match role.as_str() {
                    "owner" => Role::Owner,
                    "admin" => Role::Admin,
                    _ => Role::Member,
                };
                out.seq(conv, client.set_role(conv, user, role).await?)
            }
            ConvCommand::Rename { conv, title } => {
                let conv = conv.resolve_group(client).await?;
                out.seq(conv, client.set_title(conv, &title).await?)
            }
            ConvCommand::Leave { conv } => {
                let conv = conv.resolve_group(client).await?;
                let left = client.leave(conv).await;
                let forbidden = matches!(left.as_ref().err().and_then(ClientError::code), Some(ErrorCode::FORBIDDEN));
                // A group refuses to let its owner go while others remain: say how to hand it over.
                let owner = forbidden
                    && client.members(conv).await.is_ok_and(|members| {
                        members.iter().any(|m| m.user_id == client.user_id && m.role == Role::Owner)
                    });
                let seq = if owner {
                    left.with_context(|| format!("hand the group over first (`sb conv role {conv} USER owner`)"))?
                } else {
                    left?
                };
                out.seq(conv, seq)
            }
        },
        Command::Send { .. } => unreachable!("sent by `send`, which reconnects"),
        Command::Edit { conv, seq, text, client_id } => {
            check_text(&text)?;
            let client_id = client_id_or_new(client_id.as_deref())?;
            let conv = conv.resolve_to_write(client).await?;
            let (seq, duplicate) = client.edit_with_id(conv, client_id, seq, &text).await?;
            out.appended(conv, seq, &client_id, duplicate);
        }
        Command::Delete { conv, seq, client_id } => {
            let client_id = client_id_or_new(client_id.as_deref())?;
            let conv = conv.resolve_to_write(client).await?;
            let (seq, duplicate) = client.delete_with_id(conv, client_id, seq).await?;
            out.appended(conv, seq, &client_id, duplicate);
        }
        Command::History { conv, before, after, limit } => {
            let conv = conv.resolve(client).await?;
            let page = match (before, after) {
                (Some(b), _) => Page::Before(b),
                (_, Some(a)) => Page::After(a),
                _ => Page::Latest,
            };
            let (entries, last_seq) = client.history(conv, page, limit).await?;
            let mut names = Names::default();
            let mut files = FileBook::default();
            files.look_up_entries(client, &entries).await;
            let more = more_history(page, &entries, limit, last_seq);
            for e in entries {
                let (sender, named) = names.of_entry(client, &e).await;
                out.entry(&e, &sender, &named, &files);
            }
            if let (Some(more), false) = (more, out.json) {
                eprintln!("sb: {more}: `sb history {conv} {}`", more.flag());
            }
        }
        Command::Tail => unreachable!("runs on a session"),
        Command::Upload { .. } => unreachable!("runs on an uploader"),
        Command::Uploads => unreachable!("reads the home"),
        Command::Quota => files::quota(client, out).await?,
        Command::Files => files::files(client, out).await?,
        Command::Download { .. } => unreachable!("run by `files::download`, which reconnects"),
        Command::File { command } => files::file_command(client, home, out, command).await?,
        Command::Receipts { conv } => {
            let conv = conv.resolve(client).await?;
            let receipts = client.receipts(conv).await?;
            let members = client.members(conv).await?;
            for r in receipts {
                let name = members.iter().find(|m| m.user_id == r.user).map(|m| m.name.clone());
                out.line(
                    json!({"conv": r.conv, "user": r.user, "user_id": r.user, "user_name": name,
                        "delivered_up_to": r.delivered_up_to, "read_up_to": r.read_up_to}),
                    || {
                        let who = name.clone().unwrap_or_else(|| format!("user#{}", r.user));
                        let read = r.read_up_to.map_or_else(|| "private".to_owned(), |seq| format!("#{seq}"));
                        format!("{who}  delivered up to #{}  read up to {read}", r.delivered_up_to)
                    },
                );
            }
        }
        Command::Settings { private_reads } => {
            let set = private_reads.map(|private| Settings { read_receipts_private: private });
            let settings = client.settings(set).await?;
            out.line(json!({"read_receipts_private": settings.read_receipts_private}), || {
                let how = if settings.read_receipts_private { "private" } else { "shown to the other members" };
                format!("read receipts: {how}")
            });
        }
        Command::Read { conv, seq } => {
            // The write rule: a read mark is a receipt its conversation's members see (it
            // tells them I am here and what I read).
            let conv = conv.resolve_to_write(client).await?;
            // No seq: everything so far (the broker takes a mark past the newest message
            // as the newest; a user's trial had to give a large number to find that).
            let asked = seq.unwrap_or(Seq::MAX);
            let r = client.mark_read(conv, asked).await?;
            out.line(
                // `user_name` as every line about a user (it was missing: a trial).
                json!({"conv": r.conv, "user": r.user, "user_id": r.user, "user_name": me.user, "delivered_up_to": r.delivered_up_to, "read_up_to": r.read_up_to}),
                || match r.read_up_to.or(seq) {
                    None => format!("conv {} read up to its newest message", r.conv),
                    // A read mark never goes back, nor past the newest message.
                    Some(read) => match read.cmp(&asked) {
                        std::cmp::Ordering::Greater => format!("conv {} read up to {read} already", r.conv),
                        std::cmp::Ordering::Less => format!("conv {} read up to {read} (its newest message)", r.conv),
                        std::cmp::Ordering::Equal => format!("conv {} read up to {read}", r.conv),
                    },
                },
            );
        }
        Command::Presence { users } => {
            let all = client.presence(&[]).await?;
            let now = now_ms();
            if users.is_empty() {
                for p in &all {
                    out.presence(p, now);
                }
            }
            let mut not_shown = 0usize;
            for name in &users {
                match all.iter().find(|p| &p.name == name) {
                    Some(p) => out.presence(p, now),
                    None => {
                        not_shown += 1;
                        // Shaped as a shown user's line, so scripts that pick lines by
                        // `event` see it (a trial).
                        out.line(json!({"event": "presence", "user": null, "user_id": null, "user_name": name, "name": name, "state": null}), || {
                            format!(
                                "{name}: not shown (unknown, no conversation shared with me, or one of us blocks the other)"
                            )
                        })
                    }
                }
            }
            // Every line is printed first; then the status says not all were found, as
            // grep's does (a trial saw `sb presence nobody` exit 0).
            if not_shown > 0 {
                return Err(Refused::not_found(format!(
                    "{not_shown} of the {} users asked for not shown",
                    users.len()
                ))
                .into());
            }
        }
        Command::Typing { .. } => unreachable!("run by `typing`, which reconnects"),
        Command::Block { user: None, .. } => {
            let blocked = client.blocked_users().await?;
            if blocked.is_empty() {
                out.status(json!({"event": "no_blocked_users"}), || "I block nobody".into());
            }
            for b in blocked {
                out.line(json!({"user_id": b.user_id, "user_name": b.name, "name": b.name}), || {
                    format!("{:>6}  {}", b.user_id, terminal_safe(&b.name))
                });
            }
        }
        Command::Block { user: Some(user), .. } => {
            let already = client.blocked_users().await?.iter().any(|b| b.name == user);
            client.block(&user, true).await?;
            let said = if already { "already blocked" } else { "blocked" };
            out.line(json!({"event": "blocked", "user": user, "user_name": user, "already": already}), || {
                format!("{said} {user}")
            });
        }
        Command::Unblock { user } => {
            let was = client.blocked_users().await?.iter().any(|b| b.name == user);
            client.block(&user, false).await?;
            let said = if was { "unblocked" } else { "was not blocking" };
            out.line(json!({"event": "unblocked", "user": user, "user_name": user, "was_blocked": was}), || {
                format!("{said} {user}")
            });
        }
        Command::Passwd { .. } => unreachable!("run by `passwd`, which asks before it connects"),
        Command::Devices { command } => match command.unwrap_or(DeviceCommand::List) {
            DeviceCommand::List => {
                let now = now_ms();
                for d in client.devices().await? {
                    out.line(json!({"device_id": d.device_id, "name": d.name, "enrolled_ms": d.enrolled_ms, "current": d.current}), || {
                        let enrolled = format!("enrolled {}", ago(now.saturating_sub(d.enrolled_ms)));
                        let this = if d.current { "  (this device)" } else { "" };
                        format!("{:>6}  {:<24}  {enrolled}{this}", d.device_id, d.name)
                    });
                }
            }
            DeviceCommand::Revoke { device, this_device, password: asked } => {
                let devices = client.devices().await?;
                let Some(device) = device.or_else(|| devices.iter().find(|d| d.current).map(|d| d.device_id)) else {
                    bail!("the broker lists no device as this one (see `sb devices`)");
                };
                let current = devices.iter().any(|d| d.current && d.device_id == device);
                // Command lines sb will not run as given: status 2 (a user's trial: 1).
                if current && !this_device {
                    return Err(Usage(format!(
                        "device {device} is this one: revoking it signs this home out; pass --this-device to do it"
                    ))
                    .into());
                }
                if this_device && !current {
                    return Err(
                        Usage(format!("--this-device: device {device} is not this one (see `sb devices`)")).into()
                    );
                }
                // One the account does not list is said so without spending a password proof.
                if !devices.iter().any(|d| d.device_id == device) {
                    return Err(Refused::not_found(format!(
                        "no device {device} in this account (`sb devices` lists them)"
                    ))
                    .into());
                }
                let revoked = match (current, asked) {
                    (true, _) => client.revoke_device(device).await,
                    (false, Some(asked)) => client.revoke_other_device(device, &asked).await,
                    // The broker names this device differently from this home's state.
                    (false, None) => {
                        let user = load_state(home)?.identity.map_or_else(|| "this account".to_owned(), |i| i.user);
                        client.revoke_other_device(device, &password(&user, false)?).await
                    }
                };
                match revoked {
                    Ok(()) => {}
                    // Our own connection closes with the revocation, maybe before `Done`.
                    Err(e @ ClientError::Closed { .. }) if current => {
                        if e.code() != Some(ErrorCode::DEVICE_REVOKED) {
                            bail!(
                                "the connection closed before the broker answered ({e}): `sb devices` from another device tells whether this one was revoked"
                            );
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
                if current {
                    // This home is signed out: it forgets the dead key (and keeps the
                    // broker's address and trust).
                    let user = load_state(home)?.identity.map_or_else(|| "NAME".to_owned(), |i| i.user);
                    update_state(home, |s| {
                        s.identity = None;
                        Ok(())
                    })?;
                    out.line(json!({"event": "revoked", "device_id": device, "this_device": true}), || {
                        format!("revoked device {device}, this one: `sb login {user}` enrolls it again")
                    });
                    return Ok(());
                }
                out.line(json!({"event": "revoked", "device_id": device, "this_device": false}), || {
                    format!("revoked device {device}")
                });
            }
        },
    }
    client.close();
    Ok(())
}

/// Set once standard output's reader went away (`sb history | head`).
static STDOUT_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes `line` to stdout. A reader that went away is noted, not a failure (before:
/// `println!` panicked): the command goes on (an upload still sends its message; what
/// it would have printed is lost, what goes to stderr is not) and sb then exits with
/// status 141, as SIGPIPE ends other tools (`main`). Another write error (a full disk)
/// ends sb at once with the error said.
fn say(line: impl std::fmt::Display) {
    if STDOUT_GONE.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        eprintln!("sb: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// Printing in human or JSON form.
struct Out {
    json: bool,
    /// Every line goes to stderr: stdout carries a download's bytes (`sb download F -`).
    stderr: bool,
}

impl Out {
    /// The same output with every line on stderr.
    fn to_stderr(&self) -> Out {
        Out { json: self.json, stderr: true }
    }

    fn say(&self, line: impl std::fmt::Display) {
        if self.stderr {
            eprintln!("{line}");
        } else {
            say(line);
        }
    }

    /// Every line goes through here. Human lines are made terminal-safe whole, so a
    /// field added later cannot forget it.
    fn line(&self, value: serde_json::Value, human: impl FnOnce() -> String) {
        if self.json {
            self.say(value);
        } else {
            self.say(terminal_safe(&human()));
        }
    }

    /// A line for people only (nothing with `--json`), if there is one.
    fn text(&self, line: Option<String>) {
        if let Some(line) = line.filter(|_| !self.json) {
            self.say(terminal_safe(&line));
        }
    }

    /// A change of the connection: a JSON line, or a human line on stderr (stdout
    /// keeps only what happened in conversations).
    fn status(&self, value: serde_json::Value, human: impl FnOnce() -> String) {
        if self.json {
            self.say(value);
        } else {
            eprintln!("sb: {}", terminal_safe(&human()));
        }
    }

    fn seq(&self, conv: ConvId, seq: Seq) {
        self.line(json!({"conv": conv, "seq": seq}), || format!("conv {conv} seq {seq}"));
    }

    /// A write with an idempotency key: its seq, the key, and whether it was made before.
    fn appended(&self, conv: ConvId, seq: Seq, client_id: &ClientMsgId, duplicate: bool) {
        self.line(json!({"conv": conv, "seq": seq, "client_id": hex(client_id), "duplicate": duplicate}), || {
            format!("conv {conv} seq {seq}{}", if duplicate { " (sent before)" } else { "" })
        });
    }

    fn conversation(&self, c: &ConversationSummary, state: Option<&ConversationState>) {
        let kind = format!("{:?}", c.kind).to_lowercase();
        let role = format!("{:?}", c.my_role).to_lowercase();
        let mut value = json!({"conv": c.id, "kind": kind, "title": c.title, "last_seq": c.last_seq, "members": c.member_count, "role": role});
        if let Some(s) = state {
            value["unread"] = json!(s.unread);
            value["read_up_to"] = json!(s.read_up_to);
            value["delivered_up_to"] = json!(s.delivered_up_to);
        }
        self.line(value, || {
            let unread = state.map_or(String::new(), |s| format!("  {} unread", s.unread));
            format!(
                "{:>6}  {:<7} {:<24} last seq {:<8} {} members{unread}",
                c.id, kind, c.title, c.last_seq, c.member_count
            )
        });
    }

    fn conversation_state(&self, s: &ConversationState) {
        self.conversation(&s.summary, Some(s));
    }

    /// `[7] bob read up to #12 (delivered #14)`, or `[7] bob received up to #14` when
    /// the reads are private or none were made.
    /// A receipt: a JSON line each, or for people into `lines` (several members saying
    /// the same in one line).
    fn receipt(&self, r: &Receipt, name: String, lines: &mut ReceiptLines) {
        if self.json {
            if !lines.news(r) {
                return;
            }
            // No human line: `lines` words those.
            self.line(
                json!({"event": "receipt", "conv": r.conv, "user": r.user, "user_id": r.user, "user_name": name, "delivered_up_to": r.delivered_up_to, "read_up_to": r.read_up_to}),
                String::new,
            );
        } else {
            self.text(lines.add(r, name, tokio::time::Instant::now()));
        }
    }

    /// `alice is away (last seen 3 min ago)`.
    fn presence(&self, p: &PresenceInfo, now_ms: u64) {
        let state = presence_name(p.state);
        self.line(
            // `user_id` and `user_name` as every line about a user (`user` and `name` kept
            // for scripts).
            json!({"event": "presence", "user": p.user, "user_id": p.user, "user_name": p.name, "name": p.name, "state": state, "last_seen_ms": p.last_seen_ms}),
            || match (p.state, p.last_seen_ms) {
                (PresenceState::Online, _) => format!("{} is online", p.name),
                (_, 0) => format!("{} is {state} (never seen)", p.name),
                (_, seen) => format!("{} is {state} (last seen {})", p.name, ago(now_ms.saturating_sub(seen))),
            },
        );
    }

    fn typing(&self, conv: ConvId, user: UserId, name: &str, typing: bool) {
        self.line(json!({"event": "typing", "conv": conv, "user": user, "user_id": user, "user_name": name, "typing": typing}), || {
            if typing { format!("{name} is typing in {conv}") } else { format!("{name} stopped typing in {conv}") }
        });
    }

    fn entry(&self, e: &Entry, sender: &str, named: &HashMap<UserId, String>, files: &FileBook) {
        let (kind, text) = describe(&e.body, named, files);
        self.line(
            json!({
                // Every line `tail` prints says what it is; an entry's did not (a trial).
                "event": "entry",
                "conv": e.conv, "seq": e.seq, "sender": e.sender, "sender_name": sender,
                "sender_device": e.sender_device, "client_id": hex(&e.client_id), "at_ms": e.at_ms,
                "kind": kind, "body": body_json(&e.body, files), "text": text,
                // The users the body names by id (added, removed, given a role), by name;
                // one nobody could name (an account gone) is left out.
                "user_names": named.iter().map(|(u, n)| (u.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            }),
            || format!("[{} #{}] {}: {}", e.conv, e.seq, sender, text),
        );
    }
}

fn presence_name(state: PresenceState) -> &'static str {
    match state {
        PresenceState::Online => "online",
        PresenceState::Away => "away",
        PresenceState::Offline => "offline",
    }
}

/// `42 s ago`, `3 min ago`, `5 h ago`, `2 days ago`.
fn ago(ms: u64) -> String {
    format!("{} ago", span(ms))
}

/// A duration in its largest whole unit: `42 s`, `3 min`, `5 h`, `2 days`.
fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Resolves on Ctrl-C or, on unix, SIGTERM or SIGHUP (the terminal went away).
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::hangup())) {
            (Ok(mut term), Ok(mut hangup)) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = hangup.recv() => {}
            },
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Resolves once standard output's reader has gone away (`sb tail | head -1` after head
/// exited), found without a write: a pipe's write end polls `POLLERR` once its read
/// end is closed (poll(2)). A plain thread waits in `poll`, so the runtime never waits
/// for it at exit; a file or a terminal never resolves it (a terminal's hangup is
/// SIGHUP, `interrupted`).
async fn reader_gone() {
    #[cfg(unix)]
    {
        let (gone, seen) = tokio::sync::oneshot::channel::<()>();
        let watch = move || {
            let stdout = std::io::stdout();
            use rustix::event::{PollFd, PollFlags};
            loop {
                let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
                match rustix::event::poll(&mut fds, None) {
                    Err(rustix::io::Errno::INTR) => {}
                    Ok(_) if fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) => {
                        let _ = gone.send(());
                        return;
                    }
                    // Not pollable (`POLLNVAL`, an error): nobody can tell, as before.
                    _ => return,
                }
            }
        };
        if std::thread::Builder::new().name("sb-stdout".into()).spawn(watch).is_ok() && seen.await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// `sb tail`: a reconnecting session whose cursors live in `HOME/cursors.json`, so a
/// tail started again prints only what no tail of this device printed before (after a
/// crash, at most the last `persist_ms` of it again). Connection changes go to stderr
/// (or as JSON lines); a revoked device ends it with the close code.
async fn tail(connector: &Connector, identity: &Identity, home: &Path, out: &Out) -> anyhow::Result<()> {
    let store = FileCursors::new(home.join("cursors.json"), identity.user_id, identity.device_id);
    let config = SessionConfig { persist_ms: 200, ..SessionConfig::default() };
    let (session, mut events) = Session::start(connector.clone(), identity.clone(), std::sync::Arc::new(store), config)
        .with_context(|| format!("reading {}", home.join("cursors.json").display()))?;
    let mut names = Names::default();
    let mut files = FileBook::default();
    let mut receipts = ReceiptLines::default();
    let lookups = TailLookups { session: &session, up: std::cell::Cell::new(true), paused_until: Default::default() };
    // The last presence printed per contact (at most `PRESENCE_SAID`, then forgotten).
    let mut presence_said: HashMap<UserId, (PresenceState, u64)> = HashMap::new();
    let stop = interrupted();
    tokio::pin!(stop);
    // Its reader gone, the tail stops before it takes another entry: each one taken is
    // reported delivered and moves the saved cursor, so a tail that went on would use up
    // what the next one should print (sb then exits 141, `main`).
    let gone = reader_gone();
    tokio::pin!(gone);
    while !STDOUT_GONE.load(std::sync::atomic::Ordering::Relaxed) {
        let due = receipts.due();
        let event = tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = &mut gone => {
                STDOUT_GONE.store(true, std::sync::atomic::Ordering::Relaxed);
                break;
            }
            event = events.next() => event,
            _ = async { tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)).await }, if due.is_some() => {
                out.text(receipts.take());
                continue;
            }
        };
        // Receipts waiting for more of the same go out before anything else.
        if !matches!(event, Some(SessionEvent::Receipt(_))) {
            out.text(receipts.take());
        }
        match event {
            Some(SessionEvent::Entry(e)) => {
                let (sender, named) = names.of_entry(&lookups, &e).await;
                files.look_up_entries(&lookups, [&e]).await;
                out.entry(&e, &sender, &named, &files);
            }
            // My own (my devices receiving and reading) in a terminal are noise: nearly
            // half the lines of the trial's tail. `--json` keeps them.
            Some(SessionEvent::Receipt(r)) if r.user == identity.user_id && !out.json => {}
            Some(SessionEvent::Receipt(r)) => {
                let name = names.of(&lookups, r.conv, r.user).await;
                out.receipt(&r, name, &mut receipts);
            }
            Some(SessionEvent::Presence(p)) => {
                // Each change once: the snapshot taken at each connect repeats what a
                // live event may have said already.
                // Away carries the time of the report; only Offline's last seen is news.
                let said = (p.state, if p.state == PresenceState::Offline { p.last_seen_ms } else { 0 });
                // In JSON too: a script waiting for "online" was told again of every
                // contact at each reconnect (a review).
                if says_news(&mut presence_said, p.user, said, PRESENCE_SAID) {
                    out.presence(&p, now_ms());
                }
            }
            Some(SessionEvent::PresenceGone { user, name }) => {
                // Told again from the next presence of theirs, whatever it says.
                presence_said.remove(&user);
                out.line(
                    json!({"event": "presence_gone", "user": user, "user_id": user, "user_name": name, "name": name}),
                    || format!("{name}: presence no longer shown (no conversation shared now, or a block)"),
                );
            }
            Some(SessionEvent::Typing { conv, user, typing }) => {
                let name = names.of(&lookups, conv, user).await;
                out.typing(conv, user, &name, typing);
            }
            Some(SessionEvent::File(p)) => {
                // Each state once in a terminal (JSON lines keep every audience's).
                if !files.update(p.file, &p.state) && !out.json {
                    continue;
                }
                // Its name, asked once if no entry gave it (an upload of mine elsewhere).
                files.look_up(&lookups, [p.file]).await;
                let name = files.name(&p.file);
                let thumbnail = match &p.state {
                    switchboard_protocol::FileState::Complete { thumbnail: Some(t) } => Some(hex(&t.file)),
                    _ => None,
                };
                // What happened to a file in a conversation (or to an upload of mine):
                // with the messages, on stdout.
                out.line(
                    json!({"event": "file", "conv": p.conv, "file": hex(&p.file), "name": name, "size": p.size,
                        "state": files::state_name(&p.state), "offset": files::state_offset(&p.state, p.size),
                        "thumbnail": thumbnail, "error": files::state_error(&p.state)}),
                    || {
                        let what = match name {
                            Some(name) => format!("{name} (id {}, {} bytes)", hex(&p.file), p.size),
                            None => format!("{} ({} bytes)", hex(&p.file), p.size),
                        };
                        let place = p.conv.map_or_else(|| "[my upload]".to_string(), |c| format!("[{c}]"));
                        format!("{place} file {what}: {}", files::describe_state(&p.state, p.size))
                    },
                )
            }
            Some(SessionEvent::Left { conv }) => out.line(json!({"event": "left", "conv": conv}), || {
                format!("[{conv}] you are no longer a member (you left, or were removed)")
            }),
            Some(SessionEvent::Connected) => {
                lookups.up.set(true);
                lookups.paused_until.set(None);
                out.status(json!({"event": "connected"}), || "connected".into())
            }
            Some(SessionEvent::CaughtUp) => out.status(json!({"event": "caught_up"}), || "caught up".into()),
            Some(SessionEvent::Disconnected { error, retry_in_ms }) => {
                lookups.up.set(false);
                let e = anyhow::Error::from(error);
                out.status(
                    json!({"event": "disconnected", "error": error_json(&e), "retry_in_ms": retry_in_ms}),
                    || format!("disconnected ({e}); reconnecting in {:.1} s", retry_in_ms as f64 / 1000.0),
                );
            }
            // The caller prints the close code (in JSON too).
            Some(SessionEvent::Stopped(error)) => return Err(error.into()),
            None => bail!("the session ended"),
        }
    }
    out.text(receipts.take());
    // Saves the cursors and reports what was printed as delivered.
    session.close().await;
    Ok(())
}

/// An entry's body as JSON, with file ids in hex like everywhere else in sb's output
/// (serde would print the 16 bytes as an array of numbers).
/// Each file gets the `state` (and `error`) this run knows of it, if any.
fn body_json(body: &Body, book: &FileBook) -> serde_json::Value {
    let mut value = serde_json::to_value(body).unwrap_or_default();
    if let (Body::Files { files, .. }, Some(listed)) =
        (body, value.pointer_mut("/Files/files").and_then(|v| v.as_array_mut()))
    {
        for (f, v) in files.iter().zip(listed) {
            v["file"] = json!(hex(&f.file));
            if let Some(state) = book.state(&f.file) {
                v["state"] = json!(files::state_name(state));
                v["error"] = json!(files::state_error(state));
            }
        }
    }
    value
}

/// `owner`, `admin` or `member`.
fn role_name(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Admin => "admin",
        Role::Member => "member",
    }
}

/// An entry's kind and text; `named` has the names of the users the body names.
fn describe(body: &Body, named: &HashMap<UserId, String>, book: &FileBook) -> (&'static str, String) {
    let name = |u: &UserId| named.get(u).cloned().unwrap_or_else(|| format!("user#{u}"));
    match body {
        Body::Text { text, edited } => ("text", if *edited { format!("{text} (edited)") } else { text.clone() }),
        Body::Tombstone => ("tombstone", "(deleted)".into()),
        Body::Edit { target, text } => ("edit", format!("edited #{target}: {text}")),
        Body::Delete { target } => ("delete", format!("deleted #{target}")),
        Body::Created { kind: ConversationKind::Direct, .. } => ("created", "started the conversation".into()),
        Body::Created { title, members, .. } => {
            // A group of a thousand is not listed whole.
            const LISTED: usize = 10;
            let mut list = members.iter().take(LISTED).map(|(u, _)| name(u)).collect::<Vec<_>>().join(", ");
            if members.len() > LISTED {
                list.push_str(&format!(" and {} more", members.len() - LISTED));
            }
            ("created", format!("created \"{title}\" with {} members: {list}", members.len()))
        }
        Body::MembersAdded { members } => {
            ("members_added", format!("added {}", members.iter().map(|(u, _)| name(u)).collect::<Vec<_>>().join(", ")))
        }
        Body::MemberRemoved { user } => ("member_removed", format!("removed {}", name(user))),
        Body::MemberLeft => ("member_left", "left".into()),
        Body::RolesChanged { members } => (
            "roles_changed",
            format!(
                "made {}",
                members.iter().map(|(u, r)| format!("{} {}", name(u), role_name(*r))).collect::<Vec<_>>().join(", ")
            ),
        ),
        Body::TitleChanged { title } => ("title_changed", format!("renamed the group to \"{title}\"")),
        Body::Redacted { target } => ("redacted", format!("(edit of deleted #{target})")),
        Body::Files { text, files, edited } => {
            let list: Vec<String> = files
                .iter()
                .map(|f| {
                    let state = book.state(&f.file).and_then(|s| files::carried_state(s, f.size));
                    let state = state.map(|s| format!(": {s}")).unwrap_or_default();
                    format!("[{} {} bytes {} id {}{state}]", f.name, f.size, f.content_type, hex(&f.file))
                })
                .collect();
            let caption = if *edited { format!("{text} (edited)") } else { text.clone() };
            ("files", format!("{caption} {}", list.join(" ")).trim().to_string())
        }
    }
}

/// `text` with everything that could drive or reorder a terminal written as a Rust
/// escape (`\n`, `\r` and `\t` for those three, `\u{1b}` for the rest), and `\` as `\\`
/// so an escape cannot be forged by sending one.
fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            // The common ones as a reader knows them: a multi-line message reads `one\ntwo`.
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_terminal_unsafe(c) => out.extend(c.escape_unicode()),
            c => out.push(c),
        }
    }
    out
}

/// Controls (C0, DEL, C1), direction controls, line and paragraph separators, and
/// characters that print as nothing, so that a text could hide in it what a reader takes
/// for another (zero-width space, word joiner and invisible operators, byte-order mark,
/// interlinear annotation marks, Hangul fillers, Mongolian vowel separator, soft
/// hyphen, combining grapheme joiner, deprecated format controls, tag characters, the
/// blank braille pattern). The
/// zero-width joiner and non-joiner are kept: emoji sequences and Persian and Indic
/// scripts need them.
fn is_terminal_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{61c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
        || matches!(c, '\u{200b}' | '\u{2060}'..='\u{2064}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}' | '\u{180e}')
        || matches!(c, '\u{115f}' | '\u{1160}' | '\u{3164}' | '\u{ffa0}' | '\u{2800}' | '\u{ad}' | '\u{34f}')
        || matches!(c, '\u{206a}'..='\u{206f}' | '\u{e0000}'..='\u{e007f}')
}

/// Where names come from: a plain connection or a session.
trait Lookups {
    /// The members' names.
    async fn member_names(&self, conv: ConvId) -> Option<HashMap<UserId, String>>;
    /// The names entry `seq` gives (members or not).
    async fn entry_names(&self, conv: ConvId, seq: Seq) -> Option<HashMap<UserId, String>>;
    /// `FileInfo`: the file, or the broker's refusal; `None` when nobody answered.
    async fn file_info(&self, file: FileId) -> Option<Result<FileInfo, ErrorCode>>;
    /// Whether an unanswered lookup may have been the broker's answer (`false`: nobody
    /// was there to ask, so it is asked again once someone is).
    fn answering(&self) -> bool {
        true
    }
}

impl Lookups for Client {
    async fn member_names(&self, conv: ConvId) -> Option<HashMap<UserId, String>> {
        Some(self.members(conv).await.ok()?.into_iter().map(|m| (m.user_id, m.name)).collect())
    }

    async fn entry_names(&self, conv: ConvId, seq: Seq) -> Option<HashMap<UserId, String>> {
        Some(Client::entry_names(self, conv, seq).await.ok()?.into_iter().map(|u| (u.user_id, u.name)).collect())
    }

    async fn file_info(&self, file: FileId) -> Option<Result<FileInfo, ErrorCode>> {
        match Client::file_info(self, file).await {
            Ok(info) => Some(Ok(info)),
            Err(e) => e.code().map(Err),
        }
    }
}

/// `sb tail`'s lookups: through its session, each waited for at most `LOOKUP_TIMEOUT`,
/// and none asked while the session is down (from a `Disconnected` until the next
/// `Connected`) or within `LOOKUP_PAUSE` after one timed out: a name looked up for an
/// entry already taken (its cursor moved, reported delivered) waited for the reconnect,
/// with Ctrl-C not heard meanwhile and the entry lost to a kill (a review). A timeout
/// pauses lookups for a while only, not until the next connection: a lookup the
/// session backs off (`RATE_LIMITED`) would otherwise have left every later name
/// `user#ID` for the connection's life (a second review).
struct TailLookups<'a> {
    session: &'a Session,
    up: std::cell::Cell<bool>,
    /// Lookups are skipped until then, after one timed out.
    paused_until: std::cell::Cell<Option<std::time::Instant>>,
}

/// How long `sb tail` asks no name after a lookup timed out.
const LOOKUP_PAUSE: std::time::Duration = std::time::Duration::from_secs(10);

impl TailLookups<'_> {
    async fn within<T>(&self, lookup: impl std::future::Future<Output = Option<T>>) -> Option<T> {
        if !self.answering() {
            return None;
        }
        let answer = tokio::time::timeout(files::LOOKUP_TIMEOUT, lookup).await;
        if answer.is_err() {
            self.paused_until.set(Some(std::time::Instant::now() + LOOKUP_PAUSE));
        }
        answer.ok().flatten()
    }
}

impl Lookups for TailLookups<'_> {
    async fn member_names(&self, conv: ConvId) -> Option<HashMap<UserId, String>> {
        self.within(self.session.member_names(conv)).await
    }

    async fn entry_names(&self, conv: ConvId, seq: Seq) -> Option<HashMap<UserId, String>> {
        self.within(self.session.entry_names(conv, seq)).await
    }

    async fn file_info(&self, file: FileId) -> Option<Result<FileInfo, ErrorCode>> {
        self.within(self.session.file_info(file)).await
    }

    fn answering(&self) -> bool {
        self.up.get() && self.paused_until.get().is_none_or(|until| std::time::Instant::now() >= until)
    }
}

impl Lookups for Session {
    async fn member_names(&self, conv: ConvId) -> Option<HashMap<UserId, String>> {
        match self.request(RequestBody::Members { conv }).await.ok()? {
            switchboard_protocol::Reply::Members(m) => Some(m.into_iter().map(|m| (m.user_id, m.name)).collect()),
            _ => None,
        }
    }

    async fn entry_names(&self, conv: ConvId, seq: Seq) -> Option<HashMap<UserId, String>> {
        match self.request(RequestBody::EntryNames { conv, seq }).await.ok()? {
            switchboard_protocol::Reply::Names(n) => Some(n.into_iter().map(|u| (u.user_id, u.name)).collect()),
            _ => None,
        }
    }

    async fn file_info(&self, file: FileId) -> Option<Result<FileInfo, ErrorCode>> {
        match self.request(RequestBody::FileInfo { file }).await {
            Ok(switchboard_protocol::Reply::File(info)) => Some(Ok(info)),
            Ok(_) => None,
            Err(e) => e.code().map(Err),
        }
    }
}

/// `sb tail`'s receipts in a terminal: receipts in a row that say the same (one
/// conversation, delivered and read up to the same seqs) make one line naming everyone,
/// printed when a different one or any other event comes, or `RECEIPT_LINE_MS` after the
/// first (before, a group of ten printed nine lines per message). A receipt of nothing
/// received (a member just added) is not printed, nor my own. `--json` prints every
/// receipt that differs from the one printed before for that member (`news`).
#[derive(Default)]
struct ReceiptLines {
    pending: Option<ReceiptLine>,
    /// `--json`: the last receipt printed per member and conversation (at most
    /// `RECEIPTS_SHOWN_MAX`, then started over). A reconnect reads every quiet
    /// conversation's receipts again, and each came out again as a line (a review).
    said: HashMap<(ConvId, UserId), (Seq, Option<Seq>)>,
    /// The highest each member was shown to have received and read, per conversation (at
    /// most `RECEIPTS_SHOWN_MAX`, then started over): a receipt at or below it says
    /// nothing new. A receipt answer read before a live change can arrive after it (the
    /// client library hands both on); before, a reconnect printed "received up to #42"
    /// after "#43".
    shown: HashMap<(ConvId, UserId), (Seq, Seq)>,
}

/// Members whose receipts `sb tail` remembers before it starts over.
const RECEIPTS_SHOWN_MAX: usize = 65_536;

/// A receipt line waiting for more of the same.
struct ReceiptLine {
    /// What it says: conversation, delivered up to, read up to.
    says: (ConvId, Seq, Option<Seq>),
    /// Who says it (at most `RECEIPT_LINE_USERS`, then only counted).
    users: std::collections::HashSet<UserId>,
    /// Users beyond `users`.
    more: usize,
    /// The names of the first `RECEIPT_LINE_NAMES` of them, in order.
    names: Vec<String>,
    /// When it is printed at the latest.
    due: tokio::time::Instant,
}

impl ReceiptLine {
    /// `user`, called `name`, says it too.
    fn add(&mut self, user: UserId, name: String) {
        if self.users.len() >= RECEIPT_LINE_USERS {
            self.more += 1;
        } else if self.users.insert(user) && self.names.len() < RECEIPT_LINE_NAMES {
            self.names.push(name);
        }
    }
}

/// Whether `says` differs from what `said` holds for `key` (and keeps it): the line is
/// news. At most `max` keys are kept; past that `said` starts over (and repeats once).
fn says_news<K: std::hash::Hash + Eq, V: PartialEq>(said: &mut HashMap<K, V>, key: K, says: V, max: usize) -> bool {
    if said.len() >= max && !said.contains_key(&key) {
        said.clear();
    }
    match said.get(&key) {
        Some(before) if *before == says => false,
        _ => {
            said.insert(key, says);
            true
        }
    }
}

/// Contacts whose last printed presence `sb tail` keeps (a snapshot answers at most
/// `PRESENCE_SNAPSHOT_MAX`).
const PRESENCE_SAID: usize = 4096;

/// How long a receipt line waits for more members saying the same, ms.
const RECEIPT_LINE_MS: u64 = 300;
/// Names a receipt line lists before "and N more".
const RECEIPT_LINE_NAMES: usize = 10;
/// Users a receipt line tells apart (the most a group has); beyond, each receipt counts.
const RECEIPT_LINE_USERS: usize = switchboard_protocol::limits::MAX_GROUP_MEMBERS as usize;

impl ReceiptLines {
    /// `--json`: whether `r` says something else than the receipt printed last for its
    /// member (and remembers it).
    fn news(&mut self, r: &Receipt) -> bool {
        says_news(&mut self.said, (r.conv, r.user), (r.delivered_up_to, r.read_up_to), RECEIPTS_SHOWN_MAX)
    }

    /// Adds `r` (from user `name`); returns the line it ends, if it starts another.
    fn add(&mut self, r: &Receipt, name: String, now: tokio::time::Instant) -> Option<String> {
        let read = r.read_up_to.filter(|&seq| seq > 0);
        if r.delivered_up_to == 0 && read.is_none() {
            return None;
        }
        if self.shown.len() >= RECEIPTS_SHOWN_MAX && !self.shown.contains_key(&(r.conv, r.user)) {
            self.shown.clear();
        }
        let shown = self.shown.entry((r.conv, r.user)).or_default();
        if r.delivered_up_to <= shown.0 && read.unwrap_or(0) <= shown.1 {
            return None;
        }
        *shown = (shown.0.max(r.delivered_up_to), shown.1.max(read.unwrap_or(0)));
        // The highest shown, never less (a read news with a delivered behind it); no read
        // when this receipt shows none (the member keeps reads private now: before, the
        // read shown before the change was printed again with every delivery, as if
        // current).
        let says = (r.conv, shown.0, read.map(|_| shown.1));
        if let Some(line) = &mut self.pending
            && line.says == says
        {
            line.add(r.user, name);
            return None;
        }
        let ended = self.take();
        let due = now + std::time::Duration::from_millis(RECEIPT_LINE_MS);
        let mut line = ReceiptLine { says, users: Default::default(), more: 0, names: Vec::new(), due };
        line.add(r.user, name);
        self.pending = Some(line);
        ended
    }

    /// When the waiting line is due.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.pending.as_ref().map(|line| line.due)
    }

    /// The waiting line, if any: `[7] bob, carol received up to #5`, `[7] bob read up to
    /// #5 (delivered #6)`.
    fn take(&mut self) -> Option<String> {
        let ReceiptLine { says: (conv, delivered, read), users, more, names, .. } = self.pending.take()?;
        let mut who = names.join(", ");
        let unnamed = users.len() + more - names.len();
        if unnamed > 0 {
            who.push_str(&format!(" and {unnamed} more"));
        }
        Some(match read {
            Some(read) => format!("[{conv}] {who} read up to #{read} (delivered #{delivered})"),
            None => format!("[{conv}] {who} received up to #{delivered}"),
        })
    }
}

/// User names per conversation: its members' (fetched when a user shows up unnamed, at
/// most once per `MEMBERS_REFETCH` per conversation) and those an entry gives
/// (`EntryNames`: its sender and the users its body names, members or not, at the cost
/// of those users only). Names never change, so a name learnt is kept; a user no answer
/// named is shown as `user#ID` and not asked about again.
#[derive(Default)]
struct Names {
    known: HashMap<ConvId, HashMap<UserId, Known>>,
    /// When each conversation's members were last asked for.
    fetched: HashMap<ConvId, std::time::Instant>,
}

/// How often `sb tail` may ask a conversation's whole member list for names. Each ask is
/// a row of the caller's member-rows allowance per member (which its catch-up and
/// downloads draw on too): before, every entry adding someone asked again, so whoever
/// administers a 1,000-member group could spend every member's allowance by adding users
/// (and have the broker read a thousand rows for each member, each time). Entries that
/// name users are named by `EntryNames` instead.
const MEMBERS_REFETCH: std::time::Duration = std::time::Duration::from_secs(60);

/// What `Names` knows of a user in a conversation.
#[derive(Clone)]
enum Known {
    Named(String),
    /// Not among the members when they were last fetched.
    NotMember,
    /// Not a member, and no entry that named it gave a name (its account is gone).
    Unnamed,
}

impl Names {
    fn state(&self, conv: ConvId, user: UserId) -> Option<&Known> {
        self.known.get(&conv)?.get(&user)
    }

    fn learn(&mut self, conv: ConvId, names: HashMap<UserId, String>) {
        self.known.entry(conv).or_default().extend(names.into_iter().map(|(u, n)| (u, Known::Named(n))));
    }

    /// Marks those of `users` not named and not marked unnamed as `how`.
    fn mark(&mut self, conv: ConvId, users: &[UserId], how: Known) {
        let known = self.known.entry(conv).or_default();
        for u in users {
            // Never back from unnamed to asking again.
            if matches!(known.get(u), None | Some(Known::NotMember)) {
                known.insert(*u, how.clone());
            }
        }
    }

    fn name(&self, conv: ConvId, user: UserId) -> String {
        match self.state(conv, user) {
            Some(Known::Named(name)) => name.clone(),
            _ => format!("user#{user}"),
        }
    }

    /// Fetches the members if one of `users` was never looked for and the conversation's
    /// were not asked for within `MEMBERS_REFETCH` (asked or not, answered or not).
    async fn look_up_members(&mut self, source: &impl Lookups, conv: ConvId, users: &[UserId]) {
        if !users.iter().any(|u| self.state(conv, *u).is_none())
            || self.fetched.get(&conv).is_some_and(|at| at.elapsed() < MEMBERS_REFETCH)
        {
            return;
        }
        self.fetched.insert(conv, std::time::Instant::now());
        if let Some(members) = source.member_names(conv).await {
            self.learn(conv, members);
            self.mark(conv, users, Known::NotMember);
        } else if !source.answering() {
            // Nobody was asked: asked again once someone is there.
            self.fetched.remove(&conv);
        }
    }

    /// `user`'s name, or `user#ID` for one who is not a member now and no entry named
    /// yet.
    async fn of(&mut self, source: &impl Lookups, conv: ConvId, user: UserId) -> String {
        self.look_up_members(source, conv, &[user]).await;
        self.name(conv, user)
    }

    /// The names of an entry's sender and of the users its body names (added, removed,
    /// given a role): the members' names, and for anyone who is a member no longer the
    /// names the entry itself gives (`EntryNames`).
    async fn of_entry(&mut self, source: &impl Lookups, e: &Entry) -> (String, HashMap<UserId, String>) {
        let named_users: Vec<UserId> = match &e.body {
            Body::MembersAdded { members } | Body::Created { members, .. } | Body::RolesChanged { members } => {
                members.iter().map(|(u, _)| *u).collect()
            }
            Body::MemberRemoved { user } => vec![*user],
            _ => Vec::new(),
        };
        let users: Vec<UserId> = std::iter::once(e.sender).chain(named_users.iter().copied()).collect();
        // An entry that names users (someone added may be new to us, or back) is named by
        // its own names; only a plain entry's sender may have the members fetched.
        if named_users.is_empty() {
            self.look_up_members(source, e.conv, &users).await;
        }
        if users.iter().any(|u| matches!(self.state(e.conv, *u), None | Some(Known::NotMember)))
            && let Some(named) = source.entry_names(e.conv, e.seq).await
        {
            // Only an answer marks a user unnamed: a failed request is asked again.
            self.learn(e.conv, named);
            self.mark(e.conv, &users, Known::Unnamed);
        }
        let sender = self.name(e.conv, e.sender);
        // Only real names: a user no answer named is left out (`describe` shows `user#ID`).
        let named = named_users
            .into_iter()
            .filter_map(|u| match self.state(e.conv, u) {
                Some(Known::Named(name)) => Some((u, name.clone())),
                _ => None,
            })
            .collect();
        (sender, named)
    }
}

/// The broker's default address and certificate (the broker's own defaults, when it runs
/// in the current directory), filled in where the state names neither. Enrolling saves
/// them, the certificate as an absolute path, so the home works from any directory.
fn fill_defaults(state: &mut State) {
    if state.server.is_none() {
        state.server = Some(DEFAULT_SERVER.into());
    }
    // Only for a broker on this machine: a `switchboard-data/cert.pem` in whatever
    // directory sb runs in (a cloned repository, a shared one) was trusted for any
    // `--server`, also while `register` or `login` sent the password (an attacker review).
    let default_ca = Path::new(DEFAULT_CA);
    let local = state.server.as_deref().is_some_and(is_local);
    if state.pin.is_none() && state.ca.is_none() && local && default_ca.exists() {
        state.ca = Some(std::path::absolute(default_ca).unwrap_or_else(|_| default_ca.to_owned()));
    }
}

/// Where the broker listens by default.
const DEFAULT_SERVER: &str = "127.0.0.1:4433";

/// The certificate a broker started with its defaults keeps, relative to the directory
/// it started in: trusted without `--ca` or `--pin` for a broker on this machine only.
const DEFAULT_CA: &str = "switchboard-data/cert.pem";

/// Whether `server` (`HOST:PORT`) is on this machine: a loopback address or `localhost`.
fn is_local(server: &str) -> bool {
    let host = server.rsplit_once(':').map_or(server, |(host, _)| host).trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `--timeout` of `sb probe`: seconds, 0.1 to 300.
fn probe_timeout(text: &str) -> Result<f64, String> {
    let seconds: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (0.1..=300.0).contains(&seconds) { Ok(seconds) } else { Err(format!("{text}: from 0.1 to 300 seconds")) }
}

async fn connector(state: &State, options: &TransportOptions) -> anyhow::Result<Connector> {
    let server = state.server.clone().unwrap_or_else(|| DEFAULT_SERVER.into());
    if server
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || host.ends_with(':') || port.parse::<u16>().is_err())
    {
        return Err(Usage(format!(
            "--server {server:?}: give a host and a UDP port, like 127.0.0.1:4433 or example.com:4433"
        ))
        .into());
    }
    let addr: SocketAddr = tokio::net::lookup_host(&server)
        .await
        .with_context(|| format!("resolving {server}"))?
        .next()
        .with_context(|| format!("no address for {server}"))?;
    let host = server.rsplit_once(':').map_or(server.as_str(), |(h, _)| h).trim_matches(['[', ']']);
    // The host as given, an address too: the generated certificate names the loopback
    // addresses as well as localhost, and an operator's own may name only the address
    // (before, a loopback address was checked as "localhost", and such a certificate
    // was refused for `--server 127.0.0.1:PORT`: an operator's trial).
    let name = host;
    let trust = match (&state.pin, &state.ca) {
        (Some(pin), _) => {
            if switchboard_client::unhex(&pin.replace(':', "")).is_none_or(|p| p.len() != 32) {
                return Err(Usage(format!(
                    "--pin {pin:?}: give the broker's certificate SHA-256 as 64 hex digits (it prints it at start)"
                ))
                .into());
            }
            Trust::Pin(pin.clone())
        }
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) if is_local(&server) => bail!(
            "no ./{DEFAULT_CA} here to trust the broker by: run sb in the directory the broker was started in, or \
             pass --ca FILE or --pin SHA256 (the broker prints both at start)"
        ),
        (None, None) => bail!(
            "pass --ca FILE or --pin SHA256 (the broker prints both at start; ./{DEFAULT_CA} is taken by itself \
             only for a broker on this machine)"
        ),
    };
    Ok(Connector::with_transport(addr, name, trust, options)?)
}

fn home_dir() -> anyhow::Result<PathBuf> {
    if let Some(h) = std::env::var_os("SWITCHBOARD_HOME") {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME").context("set SWITCHBOARD_HOME or HOME")?;
    Ok(PathBuf::from(home).join(".config").join("switchboard"))
}

/// Applies `change` to the saved state and writes it back if that changed anything.
/// Most commands change nothing, so they neither lock nor write; a change is made under
/// `state.lock` to a fresh read, so concurrent `sb` processes lose no update.
fn update_state(home: &Path, change: impl Fn(&mut State) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let changed = |state: &mut State| -> anyhow::Result<bool> {
        let before = serde_json::to_vec(state)?;
        change(state)?;
        Ok(serde_json::to_vec(state)? != before)
    };
    if !changed(&mut load_state(home)?)? {
        return Ok(());
    }
    let _lock = lock_state(home)?;
    let mut state = load_state(home)?;
    if changed(&mut state)? {
        write_state(home, &state)?;
    }
    Ok(())
}

fn load_state(home: &Path) -> anyhow::Result<State> {
    let path = home.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The exclusive lock on this home's state, held until the file is dropped.
fn lock_state(home: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let path = home.join("state.lock");
    let file = owner_only().write(true).create(true).truncate(false).open(&path);
    let file = file.with_context(|| format!("opening {}", path.display()))?;
    file.lock().with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// Replaces `state.json` so that a reader sees the old file or the new one, whole.
fn write_state(home: &Path, state: &State) -> anyhow::Result<()> {
    let path = home.join("state.json");
    // A name per process: with a shared one, a writer could rename another's half file.
    let tmp = home.join(format!("state.json.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        // A leftover of a dead process with our pid; `create_new` then sets the mode.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = owner_only().write(true).create_new(true).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(state)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // The rename itself is durable once the directory is.
        #[cfg(unix)]
        std::fs::File::open(home)?.sync_all()?;
        Ok(())
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// Options for files only the owner may read: the state holds the device's secret key.
fn owner_only() -> std::fs::OpenOptions {
    // Only unix sets a mode.
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut opts = std::fs::OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

fn password(name: &str, confirm: bool) -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("SWITCHBOARD_PASSWORD") {
        return Ok(p);
    }
    let (p, typed) = secret(&format!("password for {name}: "), "SWITCHBOARD_PASSWORD")?;
    if confirm && typed && secret("again: ", "SWITCHBOARD_PASSWORD")?.0 != p {
        bail!("passwords differ");
    }
    Ok(p)
}

/// A secret asked on the terminal, or without one (a script, a service) the next line
/// of standard input, as `switchboard user add` reads it; and whether it was typed.
fn secret(prompt: &str, env: &str) -> anyhow::Result<(String, bool)> {
    let asked = rpassword::prompt_password(prompt);
    if let Ok(p) = asked {
        return Ok((p, true));
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Read from it here, it would echo the password.
        bail!(
            "could not ask for the password without echo ({}): set {env}, or give it as a line of standard input",
            asked.err().map_or_else(String::new, |e| e.to_string())
        );
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading a password from standard input")?;
    let p = line.trim_end_matches(['\n', '\r']).to_owned();
    if p.is_empty() {
        bail!("no password: set {env}, run on a terminal, or give it as a line of standard input");
    }
    Ok((p, false))
}

fn device_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let name = if host.is_empty() { "sb".to_owned() } else { format!("sb@{host}") };
    name.chars().filter(|c| !c.is_control()).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_without_a_title_is_titled_by_its_members() {
        let names = |n: usize| (0..n).map(|i| format!("member{i:02}")).collect::<Vec<_>>();
        assert_eq!(members_title("alice", &["bob".into(), "carol".into()]), "alice, bob, carol");
        let many = members_title("alice", &names(20));
        assert!(many.len() <= 64 && many.starts_with("alice, member00, ") && many.ends_with(" +15"), "{many}");
        let long = "x".repeat(64);
        assert_eq!(members_title(&long, &names(2)), "3 members");
        assert_eq!(members_title(&"y".repeat(60), &["b".into()]), format!("{}, b", "y".repeat(60)));
    }

    /// The current directory's broker certificate is taken by itself for a broker on
    /// this machine only (before, for any `--server`).
    #[test]
    fn the_default_certificate_is_for_a_local_broker_only() {
        for local in ["127.0.0.1:4433", "localhost:9", "LOCALHOST:1", "[::1]:4433", "127.8.0.1:1"] {
            assert!(is_local(local), "{local}");
        }
        for remote in ["chat.example.com:4433", "10.0.0.1:4433", "[2001:db8::1]:4433", "localhost.evil.com:1"] {
            assert!(!is_local(remote), "{remote}");
        }
    }

    /// A user's name on the command line is in lower case, as every user name is (before,
    /// `sb presence Bob` said bob was not shown while `sb send Bob` reached him).
    #[test]
    fn user_names_on_the_command_line_are_taken_in_lower_case() {
        let cli = Cli::try_parse_from(["sb", "presence", "Bob", "carol"]).expect("parses");
        assert!(matches!(&cli.command, Command::Presence { users } if users == &["bob", "carol"]));
        let cli = Cli::try_parse_from(["sb", "conv", "remove", "Team", "Dave"]).expect("parses");
        // The conversation's title keeps its case (it is matched whatever its case).
        assert!(
            matches!(&cli.command, Command::Conv { command: ConvCommand::Remove { conv: ConvArg::Title(t), user } }
            if t == "Team" && user == "dave")
        );
        let cli = Cli::try_parse_from(["sb", "block", "EVE"]).expect("parses");
        assert!(matches!(&cli.command, Command::Block { user: Some(u), .. } if u == "eve"));
    }

    /// A conversation whose only member is user 1; entries name users 10 and 11 (members
    /// no longer) and 12 (an account gone). Counts the requests made.
    #[derive(Default)]
    struct Counted {
        members: std::cell::Cell<u32>,
        entries: std::cell::Cell<u32>,
        files: std::cell::Cell<u32>,
    }

    impl Lookups for Counted {
        async fn member_names(&self, _: ConvId) -> Option<HashMap<UserId, String>> {
            self.members.set(self.members.get() + 1);
            Some(HashMap::from([(1, "owner".to_string())]))
        }

        async fn entry_names(&self, _: ConvId, seq: Seq) -> Option<HashMap<UserId, String>> {
            self.entries.set(self.entries.get() + 1);
            Some(match seq % 3 {
                0 => HashMap::from([(10, "ten".to_string())]),
                1 => HashMap::from([(11, "eleven".to_string())]),
                _ => HashMap::new(),
            })
        }

        /// File `[n; 16]`: gone for n = 0, no answer for n = 1, else uploading, 10 of 100 bytes.
        async fn file_info(&self, file: FileId) -> Option<Result<FileInfo, ErrorCode>> {
            self.files.set(self.files.get() + 1);
            match file[0] {
                0 => Some(Err(ErrorCode::NOT_FOUND)),
                1 => None,
                _ => Some(Ok(FileInfo {
                    file: switchboard_protocol::FileRef {
                        file,
                        name: "asked.bin".into(),
                        size: 100,
                        content_type: "application/octet-stream".into(),
                    },
                    blake3: [0; 32],
                    uploader: 1,
                    created_ms: 0,
                    state: switchboard_protocol::FileState::Uploading { offset: 10 },
                })),
            }
        }
    }

    /// Entry `seq` of conversation 7, by `sender`.
    fn entry_of(seq: Seq, sender: UserId, body: Body) -> Entry {
        Entry { conv: 7, seq, sender, sender_device: 1, client_id: [0; 16], at_ms: 0, body }
    }

    fn hi() -> Body {
        Body::Text { text: "hi".into(), edited: false }
    }

    #[tokio::test]
    async fn former_members_are_named_once_each_however_their_entries_interleave() {
        let source = Counted::default();
        let mut names = Names::default();
        let entry = |seq: Seq, sender: UserId| entry_of(seq, sender, hi());
        let mut seen = Vec::new();
        for round in 0..50 {
            for (seq, sender) in [(3 * round + 3, 10), (3 * round + 4, 11), (3 * round + 5, 12), (3 * round + 6, 1)] {
                seen.push(names.of_entry(&source, &entry(seq, sender)).await.0);
            }
        }
        assert_eq!(&seen[..4], ["ten", "eleven", "user#12", "owner"]);
        assert_eq!(seen.iter().filter(|n| *n == "ten").count(), 50);
        // Before: the members were fetched again for every entry of a former member,
        // which dropped the names learnt (two requests an entry). The members are
        // fetched once (`MEMBERS_REFETCH`), each former member named by an entry once.
        assert_eq!((source.members.get(), source.entries.get()), (1, 3), "one look each");
        // A body's users: only real names (the account gone is left out, not `user#12`).
        let roles = Entry {
            body: Body::RolesChanged { members: vec![(10, Role::Member), (12, Role::Member)] },
            ..entry(300, 1)
        };
        let (_, named) = names.of_entry(&source, &roles).await;
        assert_eq!(named, HashMap::from([(10, "ten".to_string())]));
        assert_eq!(describe(&roles.body, &named, &FileBook::default()).1, "made ten member, user#12 member");
    }

    /// Whoever administers a group cannot make `sb tail` ask for the whole member list
    /// at each user it adds (each ask spends a row of the watcher's allowance per
    /// member): entries naming users are named by their own names, and the members are
    /// asked for at most once per `MEMBERS_REFETCH` per conversation.
    #[tokio::test]
    async fn adding_users_does_not_have_the_member_list_fetched_each_time() {
        let source = Counted::default();
        let mut names = Names::default();
        let (entry, text) = (entry_of, hi);
        names.of_entry(&source, &entry(1, 1, text())).await;
        for seq in 2..102 {
            let added = Body::MembersAdded { members: vec![(1000 + seq, Role::Member)] };
            names.of_entry(&source, &entry(seq, 1, added)).await;
        }
        assert_eq!((source.members.get(), source.entries.get()), (1, 100), "one entry's names each");
        // A plain entry of someone unnamed within the interval: its own names, not the list.
        names.of_entry(&source, &entry(103, 50, text())).await;
        assert_eq!((source.members.get(), source.entries.get()), (1, 101));
        // The interval passes.
        let asked = names.fetched.get_mut(&7).unwrap();
        *asked = asked.checked_sub(MEMBERS_REFETCH).unwrap();
        names.of_entry(&source, &entry(104, 51, text())).await;
        assert_eq!(source.members.get(), 2, "asked again once the interval passed");
    }

    #[test]
    fn a_history_page_that_stops_short_says_how_to_see_more() {
        let page_of =
            |seqs: std::ops::RangeInclusive<Seq>| -> Vec<Entry> { seqs.map(|seq| entry_of(seq, 1, hi())).collect() };
        let more = |page, seqs, limit| more_history(page, &page_of(seqs), limit, 120);
        // The newest 50 of 120: older ones before 71.
        assert_eq!(more(Page::Latest, 71..=120, 50), Some(MoreHistory::Older(71)));
        assert_eq!(more(Page::Before(71), 21..=70, 50), Some(MoreHistory::Older(21)));
        assert_eq!(MoreHistory::Older(21).flag(), "--before 21");
        // A page short of the limit, or starting at seq 1, is the beginning.
        assert_eq!(more(Page::Before(21), 1..=20, 50), None);
        assert_eq!(more(Page::Before(51), 1..=50, 50), None);
        assert_eq!(more(Page::Latest, 90..=120, 50), None);
        // Going forward: more until the conversation's last seq.
        assert_eq!(more(Page::After(10), 11..=60, 50), Some(MoreHistory::Newer(60)));
        assert_eq!(MoreHistory::Newer(60).flag(), "--after 60");
        assert_eq!(more(Page::After(70), 71..=120, 50), None);
        assert_eq!(more_history(Page::Latest, &[], 50, 0), None);
    }

    #[tokio::test]
    async fn files_are_asked_about_once_and_a_file_not_found_shows_gone() {
        use switchboard_protocol::{FileRef, FileState};
        let source = Counted::default();
        let mut book = FileBook::default();
        let carried = |ids: &[u8]| Entry {
            conv: 7,
            seq: 1,
            sender: 1,
            sender_device: 1,
            client_id: [0; 16],
            at_ms: 0,
            body: Body::Files {
                text: String::new(),
                files: ids
                    .iter()
                    .map(|&n| FileRef {
                        file: [n; 16],
                        name: format!("f{n}"),
                        size: 100,
                        content_type: "application/octet-stream".into(),
                    })
                    .collect(),
                edited: false,
            },
        };
        let entries = [carried(&[0, 1, 2]), carried(&[2, 0])];
        book.look_up_entries(&source, &entries).await;
        assert_eq!(source.files.get(), 3, "each file once");
        let gone = FileState::Failed { code: ErrorCode::NOT_FOUND };
        assert_eq!(book.state(&[0; 16]), Some(&gone));
        assert_eq!(book.state(&[1; 16]), None, "no answer, no state");
        assert_eq!(book.state(&[2; 16]), Some(&FileState::Uploading { offset: 10 }));
        assert_eq!(book.name(&[2; 16]), Some("f2"), "the entry's name");
        let (_, text) = describe(&entries[0].body, &HashMap::new(), &book);
        assert!(text.contains(&format!("id {}: gone (", hex(&[0; 16]))), "{text}");
        assert!(text.contains(&format!("id {}]", hex(&[1; 16]))), "{text}");
        assert!(text.contains(&format!("id {}: uploading, 10%]", hex(&[2; 16]))), "{text}");
        // Not asked again, answered or not.
        book.look_up_entries(&source, &entries).await;
        assert_eq!(source.files.get(), 3);
        // A pushed state is news once: the uploader's second audience is not.
        assert!(book.update([2; 16], &FileState::Uploading { offset: 50 }));
        assert!(!book.update([2; 16], &FileState::Uploading { offset: 50 }));
        // An event about a file no entry named gets the name `FileInfo` gives, and keeps
        // its pushed state.
        assert!(book.update([3; 16], &FileState::Uploading { offset: 70 }));
        book.look_up(&source, [[3; 16]]).await;
        assert_eq!(
            (book.name(&[3; 16]), book.state(&[3; 16])),
            (Some("asked.bin"), Some(&FileState::Uploading { offset: 70 }))
        );
    }

    #[test]
    fn receipts_saying_the_same_make_one_line() {
        let now = tokio::time::Instant::now();
        let receipt = |user: UserId, delivered: Seq, read: Option<Seq>| Receipt {
            conv: 7,
            user,
            delivered_up_to: delivered,
            read_up_to: read,
        };
        let mut lines = ReceiptLines::default();
        assert_eq!(lines.add(&receipt(2, 5, None), "bob".into(), now), None);
        assert_eq!(lines.due(), Some(now + std::time::Duration::from_millis(RECEIPT_LINE_MS)));
        assert_eq!(lines.add(&receipt(3, 5, Some(0)), "carol".into(), now), None, "read up to 0 is no read");
        assert_eq!(lines.add(&receipt(2, 5, None), "bob".into(), now), None, "named once");
        assert_eq!(lines.add(&receipt(9, 5, None), "bob".into(), now), None, "another bob");
        // Something else ends the line.
        let ended = lines.add(&receipt(2, 5, Some(5)), "bob".into(), now);
        assert_eq!(ended.as_deref(), Some("[7] bob, carol, bob received up to #5"));
        assert_eq!(lines.take().as_deref(), Some("[7] bob read up to #5 (delivered #5)"));
        assert_eq!((lines.take(), lines.due()), (None, None));
        // Nothing received: no line.
        assert_eq!(lines.add(&receipt(4, 0, None), "dave".into(), now), None);
        assert_eq!(lines.take(), None);
        // A large group is not listed whole.
        for user in 0..13 {
            lines.add(&receipt(100 + user, 9, None), format!("u{user}"), now);
        }
        assert_eq!(
            lines.take().as_deref(),
            Some("[7] u0, u1, u2, u3, u4, u5, u6, u7, u8, u9 and 3 more received up to #9")
        );
        // Behind what was shown: nothing new (an answer read before a live change can
        // come after it; a reconnect printed #42 after #43).
        assert_eq!(lines.add(&receipt(20, 43, None), "eve".into(), now), None);
        assert_eq!(lines.add(&receipt(20, 42, None), "eve".into(), now), None);
        assert_eq!(lines.take().as_deref(), Some("[7] eve received up to #43"));
        assert_eq!(lines.add(&receipt(20, 42, Some(40)), "eve".into(), now), None, "a read is news");
        assert_eq!(lines.take().as_deref(), Some("[7] eve read up to #40 (delivered #43)"));
        // Eve turns private reads on: her deliveries no longer carry the read shown before.
        assert_eq!(lines.add(&receipt(20, 44, None), "eve".into(), now), None);
        assert_eq!(lines.take().as_deref(), Some("[7] eve received up to #44"));
    }

    #[test]
    fn terminal_safe_escapes_what_could_drive_a_terminal() {
        let check = |input: &str, expected: &str| assert_eq!(terminal_safe(input), expected, "{input:?}");
        check("plain text, ünïcode ✓ 日本", "plain text, ünïcode ✓ 日本");
        check("erase\x1b[2K\rforged\n", r"erase\u{1b}[2K\rforged\n");
        check("one\ntwo", r"one\ntwo");
        check("title\x1b]0;pwned\x07", r"title\u{1b}]0;pwned\u{7}");
        check("tab\tnul\0del\x7f", r"tab\tnul\u{0}del\u{7f}");
        // A sent backslash and n cannot pass for a line feed.
        check(r"not\n", r"not\\n");
        check("c1 \u{80} \u{9b}2J \u{9f}", r"c1 \u{80} \u{9b}2J \u{9f}");
        check(
            "\u{202a}\u{202e}\u{2066}\u{2069}\u{200e}\u{200f}\u{61c}",
            r"\u{202a}\u{202e}\u{2066}\u{2069}\u{200e}\u{200f}\u{61c}",
        );
        check("line\u{2028}para\u{2029}", r"line\u{2028}para\u{2029}");
        // What prints as nothing; the joiners emoji and scripts need stay.
        check("b\u{200b}ob\u{feff}\u{2060}\u{3164}", r"b\u{200b}ob\u{feff}\u{2060}\u{3164}");
        check("\u{e0041}\u{2800}\u{ad}", r"\u{e0041}\u{2800}\u{ad}");
        check("👩\u{200d}💻 \u{200c}", "👩\u{200d}💻 \u{200c}");
        // A sent backslash cannot pass for an escape.
        check(r"\u{1b}", r"\\u{1b}");
        // Neighbours of the escaped ranges are printable and stay.
        check("\u{a0}\u{2027}\u{202f}\u{2065}\u{2070}", "\u{a0}\u{2027}\u{202f}\u{2065}\u{2070}");
    }
}
