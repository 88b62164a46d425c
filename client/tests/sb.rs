//! The `sb` command line against a real broker (in this test process, real QUIC).

#![allow(clippy::unwrap_used)]

mod common;
use common::pseudo_random_bytes;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchboard_broker::Broker;
use switchboard_protocol::ErrorCode;

/// Runs `sb --json ARGS` and returns its output lines, asserting success.
fn sb(home: &Path, broker: &Broker, args: &[&str]) -> Vec<serde_json::Value> {
    let out = sb_command(home, broker).arg("--json").args(args).output().unwrap();
    assert!(out.status.success(), "sb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout)
}

/// A broker in a temp dir (its data in `data`) and two registered homes, `alice` and
/// `bob`, in the same dir.
async fn alice_and_bob() -> (tempfile::TempDir, Broker, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    sb(&alice, &broker, &["register", "alice"]);
    sb(&bob, &broker, &["register", "bob"]);
    (dir, broker, alice, bob)
}

/// Runs `sb ARGS` (human output unless ARGS say `--json`), success or not.
fn sb_output(home: &Path, broker: &Broker, args: &[&str]) -> Output {
    sb_command(home, broker).args(args).output().unwrap()
}

/// `sb` pointed at `broker`, with `home` as its state directory.
fn sb_command(home: &Path, broker: &Broker) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sb"));
    command.env("SWITCHBOARD_HOME", home).env("SWITCHBOARD_PASSWORD", "correct horse battery").args([
        "--server",
        &broker.local_addr.to_string(),
        "--ca",
        broker.cert_path.to_str().unwrap(),
    ]);
    command
}

/// Reads a `--json tail`'s lines until the entry `conv`/`seq`; returns the entries
/// (lines whose `event` is `entry`), skipping connection, receipt and presence lines.
fn entries_until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    conv: u64,
    seq: u64,
) -> Vec<serde_json::Value> {
    let mut entries = Vec::new();
    loop {
        let line = lines.next().expect("the tail is running").unwrap();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        if value["event"] != "entry" {
            continue;
        }
        let done = value["conv"].as_u64() == Some(conv) && value["seq"].as_u64() == Some(seq);
        entries.push(value);
        if done {
            return entries;
        }
    }
}

/// `sb --json tail` of `home`, its stdout as lines.
fn spawn_tail(home: &Path) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut tail = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", home)
        .args(["--json", "tail"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    (tail, lines)
}

/// Interrupts `child` as Ctrl-C would and waits for it to exit, successfully.
fn interrupt(mut child: std::process::Child) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            return;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("sb did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8(stdout.to_vec()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_create_send_history_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));

    let reg = sb(&alice, &broker, &["register", "alice"]);
    assert_eq!(reg[0]["event"], "registered");
    assert!(reg[0]["device_id"].as_u64().is_some());
    sb(&bob, &broker, &["register", "bob"]);

    let conv = sb(&alice, &broker, &["conv", "create", "--title", "plans", "bob"]);
    assert_eq!(conv[0]["kind"], "group");
    let id = conv[0]["conv"].as_u64().unwrap().to_string();

    // Bob tails; what Alice sends shows up on his terminal as a JSON line.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", &bob)
        .args(["--json", "tail"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    // Sends spaced out while the tail connects: it prints each of them, in order, once
    // (those sent before it was online by catching up).
    let mut sent = Vec::new();
    for i in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let r = sb(&alice, &broker, &["send", &id, &format!("hello {i}")]);
        sent.push(r[0]["seq"].as_u64().unwrap());
    }
    let entries = entries_until(&mut lines, id.parse().unwrap(), *sent.last().unwrap());
    assert_eq!(entries[0]["kind"], "created");
    let hellos: Vec<&serde_json::Value> = entries.iter().filter(|e| e["kind"] == "text").collect();
    assert_eq!(hellos.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), sent);
    assert_eq!(hellos[0]["sender_name"], "alice");
    assert_eq!(hellos[0]["text"], "hello 0");
    tail.kill().unwrap();
    let _ = tail.wait();

    let history = sb(&bob, &broker, &["history", &id]);
    let texts: Vec<&str> = history.iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(texts.contains(&"hello 0") && texts.contains(&"hello 5"), "{texts:?}");
    assert_eq!(history.last().unwrap()["seq"].as_u64(), sent.last().copied());

    let list = sb(&bob, &broker, &["conv", "list"]);
    assert_eq!(list[0]["title"], "plans");
    assert_eq!(list[0]["last_seq"].as_u64(), sent.last().copied());

    let devices = sb(&alice, &broker, &["devices"]);
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["current"], true);

    // A second device of alice's logs in with the password and sees the same history.
    let laptop = dir.path().join("alice-laptop");
    let login = sb(&laptop, &broker, &["login", "alice"]);
    assert_eq!(login[0]["event"], "logged_in");
    assert_ne!(login[0]["device_id"], reg[0]["device_id"]);
    assert_eq!(sb(&laptop, &broker, &["history", &id]).len(), history.len());
    assert_eq!(sb(&alice, &broker, &["devices"]).len(), 2);

    // Errors are reported with a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", dir.path().join("nobody"))
        .args(["send", "1", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// What another user sends reaches my terminal only as visible text: no escape sequence
/// can erase, forge or retitle anything, and no direction control can reorder a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_output_neutralises_control_characters() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    // Labels (titles, device and user names) refuse every such character at the broker;
    // message text carries anything, so it is the text that must be neutralised here.
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "plans", "bob"]);
    let id = conv[0]["conv"].as_u64().unwrap().to_string();
    let hostile = "hello\x1b[2K\r\x1b[1Aalice: wire the money now\x1b]0;pwned\x07 \u{9b}2J \u{2066}\\ pay\u{202e}fdp.exe\u{2028}x";
    sb(&alice, &broker, &["send", &id, "one\ntwo"]);
    sb(&alice, &broker, &["send", &id, hostile]);

    let history = sb_output(&bob, &broker, &["history", &id]);
    assert!(history.status.success(), "{}", String::from_utf8_lossy(&history.stderr));
    let list = sb_output(&bob, &broker, &["conv", "list"]);
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let shown = String::from_utf8(history.stdout).unwrap() + &String::from_utf8(list.stdout).unwrap();
    let unsafe_chars: Vec<char> = shown.chars().filter(|&c| c != '\n' && is_terminal_unsafe(c)).collect();
    assert!(unsafe_chars.is_empty(), "raw controls {unsafe_chars:?} reached the terminal in {shown:?}");
    let escaped = r"hello\u{1b}[2K\r\u{1b}[1Aalice: wire the money now\u{1b}]0;pwned\u{7} \u{9b}2J \u{2066}\\ pay\u{202e}fdp.exe\u{2028}x";
    assert!(shown.contains(escaped), "{shown:?}");
    // A multi-line message reads as one line with `\n` where it breaks.
    assert!(shown.contains(r": one\ntwo"), "{shown:?}");

    // JSON keeps the exact text (serde_json escapes what needs escaping).
    let json = sb(&bob, &broker, &["history", &id]);
    assert_eq!(json.last().unwrap()["text"], hostile);

    // A page that stops short of the beginning says how to see the rest (before: nothing).
    let newest = sb_output(&bob, &broker, &["history", &id, "--limit", "1"]);
    let said = String::from_utf8_lossy(&newest.stderr);
    assert!(said.contains(&format!("older entries: `sb history {id} --before 3`")), "{said}");
    let whole = sb_output(&bob, &broker, &["history", &id]);
    assert!(!String::from_utf8_lossy(&whole.stderr).contains("entries"), "{whole:?}");
}

fn is_terminal_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{61c}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// A home whose broker moved is pointed at it with `sb --server ADDR server` (before,
/// only every command's own --server reached it, or an edit of the state file), and a
/// connect that finds no broker says so. A group created without a title is titled by
/// its members (before: "group", every one of them). Users' trials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_is_pointed_at_a_broker_that_moved() {
    let (dir, broker, alice, _bob) = alice_and_bob().await;
    sb(&dir.path().join("carol"), &broker, &["register", "carol"]);
    let group = sb(&alice, &broker, &["conv", "create", "bob", "carol"]);
    assert_eq!(group[0]["title"], "alice, bob, carol", "{group:?}");
    let bare = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sb"))
            .env("SWITCHBOARD_HOME", &alice)
            .env_remove("SWITCHBOARD_SERVER")
            .env_remove("SWITCHBOARD_CA")
            .env_remove("SWITCHBOARD_PIN")
            .args(args)
            .output()
            .unwrap()
    };
    // Moved where nothing answers.
    let saved = bare(&["--json", "--server", "127.0.0.1:9", "server"]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    assert_eq!(json_lines(&saved.stdout)[0]["server"], "127.0.0.1:9");
    let lost = bare(&["conv", "list"]);
    let stderr = String::from_utf8_lossy(&lost.stderr);
    assert_eq!(lost.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no broker answered at 127.0.0.1:9"), "{stderr}");
    assert!(stderr.contains("is the broker running there?") && stderr.contains("HOST:PORT server`"), "{stderr}");
    // Back where it is: the saved trust (its CA file) still applies.
    let addr = broker.local_addr.to_string();
    assert!(bare(&["--server", &addr, "server"]).status.success());
    let listed = bare(&["--json", "conv", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert_eq!(json_lines(&listed.stdout).len(), 1);
}

/// Many `sb` processes sharing one home must not trip over each other's state writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_commands_share_one_home() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let home = dir.path().join("alice");
    sb(&home, &broker, &["register", "alice"]);
    // Round 0 changes nothing; in the others every process flips the saved trust between
    // the CA file and the pin (both valid), so each one rewrites the state.
    for round in 0..3 {
        let children: Vec<_> = (0..16)
            .map(|i| {
                let mut command = sb_command(&home, &broker);
                if round > 0 && i % 2 == 0 {
                    command.args(["--pin", &broker.fingerprint]);
                }
                command.args(["--json", "conv", "list"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let mut files: Vec<String> =
        std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["state.json", "state.lock"], "no temp file is left behind");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(home.join("state.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

/// A tail the broker disconnects says why, with the close code, as its last JSON line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reports_the_close_code() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, bob, laptop) = (dir.path().join("alice"), dir.path().join("bob"), dir.path().join("bob-laptop"));
    sb(&alice, &broker, &["register", "alice"]);
    let bob_device = sb(&bob, &broker, &["register", "bob"])[0]["device_id"].as_u64().unwrap().to_string();
    sb(&laptop, &broker, &["login", "bob"]);
    let conv = sb(&alice, &broker, &["conv", "create", "bob"]);
    let id = conv[0]["conv"].as_u64().unwrap().to_string();

    let mut tail = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", &bob)
        .args(["--json", "tail"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    // Once the tail prints an entry it is online, and revoking its device closes it.
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(100));
        sb(&alice, &broker, &["send", &id, &format!("hello {i}")]);
    }
    lines.next().unwrap().unwrap();
    sb(&laptop, &broker, &["devices", "revoke", &bob_device]);

    let deadline = Instant::now() + Duration::from_secs(20);
    while tail.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            tail.kill().unwrap();
            panic!("the tail did not end after its device was revoked");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let last: serde_json::Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], 14, "{last}");
    assert_eq!(last["error"]["name"], "DEVICE_REVOKED", "{last}");
    assert!(!tail.wait().unwrap().success());
}

/// Errors read `error: NAME (number): message`, and in JSON carry the same three parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_show_code_name_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);

    let check = |home: &str, args: &[&str], human: &str, json: serde_json::Value| {
        let home = dir.path().join(home);
        let out = sb_output(&home, &broker, args);
        assert!(!out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stderr), format!("error: {human}\n"), "sb {args:?}");
        let out = sb_output(&home, &broker, &[&["--json"], args].concat());
        assert!(!out.status.success());
        assert_eq!(json_lines(&out.stdout).last(), Some(&serde_json::json!({ "error": json })), "sb --json {args:?}");
    };
    // Refused in the handshake (the broker closes the connection with the code)...
    check(
        "other",
        &["register", "alice"],
        "CONFLICT (9): user name is taken",
        serde_json::json!({"code": 9, "name": "CONFLICT", "message": "user name is taken"}),
    );
    // ...and refused as a request.
    check(
        "alice",
        &["send", "424242", "hi"],
        "FORBIDDEN (7): not a member of this conversation (one who left or was removed reads it no more), or no such conversation",
        serde_json::json!({"code": 7, "name": "FORBIDDEN", "message": "not a member of this conversation (one who left or was removed reads it no more), or no such conversation"}),
    );
    // A local failure has no code.
    check(
        "nobody",
        &["send", "1", "x"],
        "no device here yet: run `sb register NAME` or `sb login NAME`",
        serde_json::json!({"code": null, "name": null, "message": "no device here yet: run `sb register NAME` or `sb login NAME`"}),
    );
}

/// A text too long is not sent: sb says the bound in one line before it connects
/// (before, a text over one request frame, 64 KiB, was refused by the client library as
/// a request too large, `FRAME_TOO_LARGE`; and before that, the broker closed the
/// connection, and sb said "the broker may have stored it" and printed the whole text in
/// a resend command that failed the same way). The library's own refusal is tested in
/// tests/tests/bounds.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_over_the_frame_limit_is_not_sent_and_sb_says_so() {
    let (_dir, broker, alice, _bob) = alice_and_bob().await;
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "g", "bob"])[0]["conv"].as_u64().unwrap();
    let conv = conv.to_string();
    for len in [70_000, 4097] {
        let text = "a".repeat(len);
        let out = sb_output(&alice, &broker, &["send", &conv, &text]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        let said = format!("error: a text must be 1 to 4096 bytes (UTF-8); this one is {len}: nothing sent\n");
        assert_eq!(stderr, said);
        let out = sb_output(&alice, &broker, &["--json", "send", &conv, &text]);
        let lines = json_lines(&out.stdout);
        let error = &lines.last().unwrap()["error"];
        // sb's own refusal, with the code the broker would give (it had none).
        assert_eq!((&error["code"], &error["name"]), (&serde_json::json!(10), &serde_json::json!("INVALID")));
    }
    // Nothing stored: the next message follows the group's creation (seq 1).
    let sent = sb(&alice, &broker, &["send", &conv, "short"])[0]["seq"].as_u64().unwrap();
    assert_eq!(sent, 2, "{:?}", sb(&alice, &broker, &["history", &conv]));
}

/// `sb edit` and `sb delete --client-id` are safe to retry like a send: the same key
/// gives the same seq, once (before, they took no key, so a script retrying an edit
/// after a lost answer edited twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_and_delete_with_a_client_id_are_safe_to_retry() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    let id = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap().to_string();
    let sent = sb(&alice, &broker, &["send", &id, "meet at 6"])[0]["seq"].as_u64().unwrap().to_string();
    let (edit_key, delete_key) = ("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210");
    let edit = ["edit", &id, &sent, "meet at 7", "--client-id", edit_key];
    let first = sb(&alice, &broker, &edit);
    let again = sb(&alice, &broker, &edit);
    assert_eq!((&first[0]["duplicate"], &again[0]["duplicate"]), (&false.into(), &true.into()));
    assert_eq!((&again[0]["seq"], &again[0]["client_id"]), (&first[0]["seq"], &edit_key.into()));
    let delete = ["delete", &id, &sent, "--client-id", delete_key];
    let first = sb(&alice, &broker, &delete);
    let again = sb(&alice, &broker, &delete);
    assert_eq!((&first[0]["duplicate"], &again[0]["duplicate"]), (&false.into(), &true.into()));
    assert_eq!(again[0]["seq"], first[0]["seq"]);
    // One edit and one delete in the log: the creation, the message, then those two.
    let history = sb(&bob, &broker, &["history", &id]);
    assert_eq!(history.last().unwrap()["seq"], first[0]["seq"]);
    assert_eq!(first[0]["seq"].as_u64(), Some(4), "{history:?}");
}

/// `sb send --client-id` is safe to retry: the same id gives the same seq, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_a_client_id_is_safe_to_retry() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    let id = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap().to_string();
    let key = "00112233445566778899aabbccddeeff";
    let first = sb(&alice, &broker, &["send", &id, "pay the rent", "--client-id", key]);
    assert_eq!(first[0]["duplicate"], false);
    assert_eq!(first[0]["client_id"], key);
    let again = sb(&alice, &broker, &["send", &id, "pay the rent", "--client-id", key]);
    assert_eq!(again[0]["seq"], first[0]["seq"]);
    assert_eq!(again[0]["duplicate"], true);
    let human = sb_output(&alice, &broker, &["send", &id, "pay the rent", "--client-id", key]);
    let seq = first[0]["seq"].as_u64().unwrap();
    assert_eq!(String::from_utf8_lossy(&human.stdout), format!("conv {id} seq {seq} (sent before)\n"));
    // The same key for another text is refused: the first seq would say it landed.
    let reused = sb_output(&alice, &broker, &["send", &id, "pay the rent twice", "--client-id", key]);
    assert!(!reused.status.success());
    assert!(String::from_utf8_lossy(&reused.stderr).contains("CONFLICT"), "{reused:?}");
    let history = sb(&bob, &broker, &["history", &id]);
    assert_eq!(history.iter().filter(|e| e["text"] == "pay the rent").count(), 1);
    assert!(!history.iter().any(|e| e["text"] == "pay the rent twice"));
    // A fresh send gets a fresh key and seq.
    let other = sb(&alice, &broker, &["send", &id, "again"]);
    assert_ne!(other[0]["client_id"], key);
    assert_eq!(other[0]["seq"].as_u64(), Some(seq + 1));
    let bad = sb_output(&alice, &broker, &["send", &id, "x", "--client-id", "abc"]);
    assert_eq!(bad.status.code(), Some(2), "a command line sb cannot use");
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(said.contains("'--client-id <CLIENT_ID>': an idempotency key is 32 hex digits (16 bytes)"), "{said}");
}

/// `sb conv list` shows unread counts; `sb read` moves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_moves_the_unread_count_in_conv_list() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    let id = sb(&alice, &broker, &["conv", "create", "--title", "plans", "bob"])[0]["conv"].as_u64().unwrap();
    let conv = id.to_string();
    for i in 0..3 {
        sb(&alice, &broker, &["send", &conv, &format!("m{i}")]);
    }
    let list = sb(&bob, &broker, &["conv", "list"]);
    assert_eq!((list[0]["conv"].as_u64(), list[0]["unread"].as_u64()), (Some(id), Some(3)));
    let human = sb_output(&bob, &broker, &["conv", "list"]);
    assert!(String::from_utf8_lossy(&human.stdout).trim_end().ends_with("3 unread"));

    let read = sb(&bob, &broker, &["read", &conv, "3"]);
    assert_eq!(read[0]["read_up_to"].as_u64(), Some(3));
    assert_eq!(read[0]["user_name"], "bob", "named as every line about a user");
    let list = sb(&bob, &broker, &["conv", "list"]);
    assert_eq!(list[0]["unread"].as_u64(), Some(1), "seq 4 is still unread");
    // Without a seq: up to the newest message.
    let read = sb(&bob, &broker, &["read", &conv]);
    assert_eq!(read[0]["read_up_to"].as_u64(), Some(4));
    assert_eq!(sb(&bob, &broker, &["conv", "list"])[0]["unread"].as_u64(), Some(0));
    // Alice's own messages are never unread for her.
    assert_eq!(sb(&alice, &broker, &["conv", "list"])[0]["unread"].as_u64(), Some(0));
}

/// A `--json tail` that reconnects prints a member's receipt once, not again with each
/// connection's read of the quiet conversations' receipts (before: every member's
/// receipts again after every reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_tail_prints_a_receipt_once_across_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, data_dir, alice, bob, conv) = a_broker_with_alice_and_bob_direct(dir.path()).await;
    let seq = sb(&alice, &broker, &["send", &conv.to_string(), "one"])[0]["seq"].as_u64().unwrap();
    sb(&bob, &broker, &["read", &conv.to_string(), &seq.to_string()]);
    let (tail, lines) = spawn_tail(&alice);
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in lines {
            let Ok(line) = line else { return };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let wait_for = |event: &str, seen: &mut Vec<serde_json::Value>| loop {
        let value = rx.recv_timeout(Duration::from_secs(30)).expect("the tail goes on");
        let found = value["event"] == event;
        seen.push(value);
        if found {
            return;
        }
    };
    wait_for("caught_up", &mut seen);
    // Bob's receipt comes after the catch-up.
    let bobs = |seen: &[serde_json::Value]| {
        seen.iter()
            .filter(|v| v["event"] == "receipt" && v["user_name"] == "bob" && v["read_up_to"].as_u64() == Some(seq))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while bobs(&seen) == 0 {
        assert!(Instant::now() < deadline, "no receipt of bob's: {seen:?}");
        if let Ok(value) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(value);
        }
    }
    let addr = broker.local_addr;
    broker.shutdown().await.unwrap();
    wait_for("disconnected", &mut seen);
    let _broker = common::restart_on(addr, data_dir).await;
    wait_for("caught_up", &mut seen);
    // The receipts the reconnect reads again come after its catch-up.
    let until = Instant::now() + Duration::from_secs(3);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Ok(value) = rx.recv_timeout(left) {
            seen.push(value);
        }
    }
    interrupt(tail);
    assert_eq!(bobs(&seen), 1, "{seen:?}");
}

/// A user's name that is also the title of a stranger's group sends nothing there: with
/// no direct conversation with bob, mallory's group titled "bob" took alice's `sb send
/// bob` (before: sent, and mallory read it). The group by its number, and the user once a
/// direct conversation is there, are written to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_sends_nothing_to_a_strangers_group_titled_so() {
    let (dir, broker, alice, bob) = alice_and_bob().await;
    let mallory = dir.path().join("mallory");
    sb(&mallory, &broker, &["register", "mallory"]);
    let trap = sb(&mallory, &broker, &["conv", "create", "--title", "Bob", "alice"])[0]["conv"].as_u64().unwrap();
    let sent = sb_output(&alice, &broker, &["send", "bob", "secret"]);
    assert_eq!(sent.status.code(), Some(3), "{}", String::from_utf8_lossy(&sent.stderr));
    let said = String::from_utf8_lossy(&sent.stderr);
    assert!(said.contains(&format!("{trap}, a group titled \"Bob\"")) && said.contains("sb conv create bob"), "{said}");
    let history = sb(&mallory, &broker, &["history", &trap.to_string()]);
    assert!(history.iter().all(|e| e["text"] != "secret"), "{history:?}");
    // Nor does a typing indicator or a read mark go there (each tells its members alice
    // is here).
    let typed = sb_output(&alice, &broker, &["typing", "bob", "--seconds", "1"]);
    assert_eq!(typed.status.code(), Some(3), "{}", String::from_utf8_lossy(&typed.stderr));
    let marked = sb_output(&alice, &broker, &["read", "bob", "1"]);
    assert_eq!(marked.status.code(), Some(3), "{}", String::from_utf8_lossy(&marked.stderr));
    // Reads still take the title; the group by its number takes a write.
    assert!(sb_output(&alice, &broker, &["history", "bob"]).status.success());
    // Handed the group (mallory stays an admin, who may rename it): still refused.
    sb(&mallory, &broker, &["conv", "role", &trap.to_string(), "alice", "owner"]);
    let sent = sb_output(&alice, &broker, &["send", "bob", "secret"]);
    assert_eq!(sent.status.code(), Some(3), "{}", String::from_utf8_lossy(&sent.stderr));
    sb(&alice, &broker, &["send", &trap.to_string(), "hello mallory"]);
    // With a direct conversation with bob, his name is his.
    let direct = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap();
    sb(&alice, &broker, &["send", "bob", "hi bob"]);
    let history = sb(&bob, &broker, &["history", &direct.to_string()]);
    assert!(history.iter().any(|e| e["text"] == "hi bob"), "{history:?}");
}

/// A tail interrupted and started again prints only what it has not printed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_resumes_where_it_stopped() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    let id = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap();
    let conv = id.to_string();
    let mut last = 0;
    for i in 0..3 {
        last = sb(&alice, &broker, &["send", &conv, &format!("before {i}")])[0]["seq"].as_u64().unwrap();
    }
    let (tail, mut lines) = spawn_tail(&bob);
    let first = entries_until(&mut lines, id, last);
    assert_eq!(first.iter().map(|e| e["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4]);
    interrupt(tail);

    for i in 0..2 {
        last = sb(&alice, &broker, &["send", &conv, &format!("after {i}")])[0]["seq"].as_u64().unwrap();
    }
    let (tail, mut lines) = spawn_tail(&bob);
    let second = entries_until(&mut lines, id, last);
    let texts: Vec<&str> = second.iter().map(|e| e["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["after 0", "after 1"]);
    interrupt(tail);
}

/// The tail shows typing, presence and read receipts readably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_shows_typing_presence_and_reads() {
    let (dir, broker, alice, bob) = alice_and_bob().await;
    let id = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap();
    let conv = id.to_string();
    let seq = sb(&alice, &broker, &["send", &conv, "hi"])[0]["seq"].as_u64().unwrap();
    let tail = sb_command(&bob, &broker).arg("tail").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    // Killed if the test fails before it interrupts the tail.
    let mut tail = KillOnDrop(Some(tail));
    let tail_out = tail.0.as_mut().unwrap().stdout.take().unwrap();
    // Lines through a channel, so that every wait has a deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(tail_out).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let seen = std::cell::RefCell::new(Vec::new());
    let wait_until = |what: &str, matches: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let matched = matches(&line);
                    seen.borrow_mut().push(line);
                    if matched {
                        return;
                    }
                }
                Err(_) => panic!("no line {what:?}"),
            }
        }
    };
    let wait_for = |what: &str| wait_until(what, &|line| line == what);
    wait_for(&format!("[{id} #{seq}] alice: hi"));
    sb(&alice, &broker, &["typing", &conv, "--seconds", "1"]);
    wait_for(&format!("alice is typing in {id}"));
    wait_for(&format!("alice stopped typing in {id}"));
    sb(&alice, &broker, &["read", &conv, &seq.to_string()]);
    wait_for(&format!("[{id}] alice read up to #{seq} (delivered #{seq})"));
    // A file withdrawn from a message: said on stdout, by name, with its conversation.
    let path = dir.path().join("small.bin");
    std::fs::write(&path, b"hello").unwrap();
    let up = sb(&alice, &broker, &["upload", path.to_str().unwrap(), "--conv", &conv]);
    let file = event(&up, "uploaded")["file"].as_str().unwrap().to_owned();
    let entry = format!("id {file}]");
    wait_until(&entry, &|line| line.contains("alice: [small.bin 5 bytes") && line.ends_with(&entry));
    sb(&alice, &broker, &["file", "withdraw", &file]);
    let gone = format!("[{id}] file small.bin (id {file}, 5 bytes): gone (");
    wait_until(&gone, &|line| line.starts_with(&gone));
    // Bob is online while his tail runs.
    // Every line printed, then the status says one was not found (3).
    let asked = sb_command(&alice, &broker).args(["--json", "presence", "bob", "nobody"]).output().unwrap();
    assert_eq!(asked.status.code(), Some(3), "{}", String::from_utf8_lossy(&asked.stderr));
    let presence = json_lines(&asked.stdout);
    assert_eq!(presence[0]["name"], "bob");
    assert_eq!(presence[0]["state"], "online");
    assert_eq!(
        presence[1],
        serde_json::json!({"event": "presence", "user": null, "user_id": null, "user_name": "nobody", "name": "nobody", "state": null})
    );
    // Every line about a user names it the same way: `user_id` and `user_name` (the
    // keys were `user`, `user_id`, `name` or `user_name`, and `user` was an id on some
    // lines and a name on others).
    let bob = sb(&alice, &broker, &["conv", "members", &conv]).into_iter().find(|m| m["user_name"] == "bob").unwrap();
    assert_eq!(
        (presence[0]["user_id"].as_u64(), presence[0]["user_name"].as_str()),
        (bob["user_id"].as_u64(), Some("bob"))
    );
    assert!(bob["user_id"].as_u64().is_some(), "{bob}");
    interrupt(tail.0.take().unwrap());
    // bob's own receipts (his tail receiving) are not printed to him (before, nearly half
    // the lines of a tail).
    seen.borrow_mut().extend(rx.try_iter());
    let own: Vec<String> = seen.borrow().iter().filter(|l| l.starts_with(&format!("[{id}] bob "))).cloned().collect();
    assert!(own.is_empty(), "{own:?}");
}

/// A child process killed when dropped (a failed assertion must not leave it running).
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes `data` to `path` and uploads it with `sb upload` from `home`; its file id.
fn uploaded(home: &Path, broker: &Broker, path: &Path, data: &[u8]) -> String {
    std::fs::write(path, data).unwrap();
    event(&sb(home, broker, &["upload", path.to_str().unwrap()]), "uploaded")["file"].as_str().unwrap().to_owned()
}

/// The line of `lines` with `"event": event`.
fn event<'a>(lines: &'a [serde_json::Value], event: &str) -> &'a serde_json::Value {
    lines.iter().find(|l| l["event"] == event).unwrap_or_else(|| panic!("no {event} line in {lines:?}"))
}

/// `sb upload --conv` then `sb download` by another member gives the same bytes, and the
/// message shows the file; `sb file info` describes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_then_download_round_trip() {
    let (dir, broker, alice, bob) = alice_and_bob().await;
    let conv = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap().to_string();
    let data = pseudo_random_bytes(2 * 1024 * 1024 + 4321, 1);
    let path = dir.path().join("notes.bin");
    std::fs::write(&path, &data).unwrap();

    let up = sb(&alice, &broker, &["upload", path.to_str().unwrap(), "--conv", &conv, "--caption", "the notes"]);
    let uploaded = event(&up, "uploaded");
    let id = uploaded["file"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!((uploaded["name"].as_str(), uploaded["size"].as_u64()), (Some("notes.bin"), Some(data.len() as u64)));
    let sent = event(&up, "sent");
    assert_eq!((sent["conv"].to_string(), sent["file"].as_str()), (conv.clone(), Some(id.as_str())));
    assert_eq!(event(&up, "started")["offset"].as_u64(), Some(0), "a fresh upload starts, it does not resume");
    // The finished upload is no longer remembered for resuming.
    let state = std::fs::read_to_string(alice.join("state.json")).unwrap();
    assert!(!state.contains(&id), "{state}");

    let history = sb(&bob, &broker, &["history", &conv]);
    let message = history.iter().find(|e| e["kind"] == "files").expect("a files message");
    assert!(message["text"].as_str().unwrap().contains(&id), "{message}");
    assert_eq!(message["body"]["Files"]["files"][0]["file"].as_str(), Some(id.as_str()), "ids in hex: {message}");
    assert_eq!(message["body"]["Files"]["files"][0]["state"], "complete", "{message}");

    let out = dir.path().join("copy.bin");
    let down = sb(&bob, &broker, &["download", &id, out.to_str().unwrap()]);
    assert_eq!(down[0]["verified"], true);
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // Into a directory: under the file's name there.
    let into = dir.path().join("downloads");
    std::fs::create_dir(&into).unwrap();
    assert_eq!(sb(&bob, &broker, &["download", &id, into.to_str().unwrap()])[0]["verified"], true);
    assert_eq!(std::fs::read(into.join(path.file_name().unwrap())).unwrap(), data);
    // Never over a file already there.
    let again = sb_output(&bob, &broker, &["download", &id, into.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("exists"), "{again:?}");
    // Into a directory that does not exist: said as the user named it, nothing written.
    let nowhere = dir.path().join("no-such-dir").join("copy.bin");
    let refused = sb_output(&bob, &broker, &["download", &id, nowhere.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("no-such-dir does not exist"), "{said}");
    assert!(!said.contains("sb-part"), "{said}");

    let info = sb(&bob, &broker, &["file", "info", &id]);
    assert_eq!(info[0]["state"], "complete");
    assert_eq!(info[0]["uploader_name"], "alice", "named, not only numbered");
    assert_eq!(info[0]["size"].as_u64(), Some(data.len() as u64));
    assert_eq!(info[0]["blake3"].as_str().unwrap().len(), 64);

    // A stranger gets NOT_FOUND, as for a file that does not exist.
    let carol = dir.path().join("carol");
    sb(&carol, &broker, &["register", "carol"]);
    let hidden = sb_output(&carol, &broker, &["download", &id, out.to_str().unwrap()]);
    let missing = sb_output(&carol, &broker, &["download", &"ab".repeat(16), out.to_str().unwrap()]);
    assert!(!hidden.status.success());
    assert_eq!(
        String::from_utf8_lossy(&hidden.stderr),
        String::from_utf8_lossy(&missing.stderr).replace(&"ab".repeat(16), &id)
    );
    assert!(String::from_utf8_lossy(&hidden.stderr).contains("NOT_FOUND"));
    assert!(String::from_utf8_lossy(&hidden.stderr).contains("cannot be read"), "{hidden:?}");
    assert_eq!(std::fs::read(&out).unwrap(), data, "a refused download leaves OUT as it was");

    // Its uploader is named as "you" to the uploader.
    let said = String::from_utf8_lossy(&sb_output(&alice, &broker, &["file", "info", &id]).stdout).into_owned();
    assert!(said.contains("uploaded by you"), "{said}");
    // bob may read it but not withdraw it: said so (the broker answers NOT_FOUND).
    let refused = sb_output(&bob, &broker, &["file", "withdraw", &id]);
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success() && said.contains(&format!("{id} is alice's file")), "{said}");
    // OUT/ names a directory: one that is not there is said before anything is fetched
    // (before, all the bytes came, then could not be renamed into it).
    for missing_dir in ["nope/", "nope/.", "nope/.."] {
        let missing_dir = format!("{}/{missing_dir}", dir.path().display());
        let refused = sb_output(&bob, &broker, &["download", &id, &missing_dir]);
        let said = String::from_utf8_lossy(&refused.stderr).into_owned();
        let missing = "does not exist (create the directory first): nothing downloaded";
        assert!(!refused.status.success() && said.contains(missing), "{said}");
    }
    let leftovers = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".sb-part"));
    assert_eq!(leftovers.count(), 0);
    // Withdrawn: the message still names it, and history says it is gone (before, it
    // listed the file as if it could be downloaded).
    assert_eq!(sb(&alice, &broker, &["file", "withdraw", &id])[0]["event"], "withdrawn");
    let info = sb_output(&bob, &broker, &["file", "info", &id]);
    assert!(String::from_utf8_lossy(&info.stderr).contains("cannot be read"), "{info:?}");
    let history = sb(&bob, &broker, &["history", &conv]);
    let message = history.iter().find(|e| e["kind"] == "files").expect("a files message");
    let listed = &message["body"]["Files"]["files"][0];
    assert_eq!((listed["state"].as_str(), listed["error"].as_str()), (Some("gone"), Some("NOT_FOUND")), "{message}");
    let human = String::from_utf8_lossy(&sb_output(&bob, &broker, &["history", &conv]).stdout).into_owned();
    assert!(human.contains(&format!("id {id}: gone (")), "{human}");
}

/// `sb download --offset --length` writes exactly that range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_download_writes_exactly_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let data = pseudo_random_bytes(1024 * 1024 + 99, 2);
    let path = dir.path().join("f.bin");
    let id = uploaded(&alice, &broker, &path, &data);
    // Human output: the id, and no progress bar when stderr is not a terminal.
    let human = sb_output(&alice, &broker, &["upload", path.to_str().unwrap()]);
    assert!(human.status.success());
    let stdout = String::from_utf8_lossy(&human.stdout);
    assert!(stdout.contains(&format!("uploaded f.bin ({} bytes, application/octet-stream): ", data.len())), "{stdout}");
    assert_eq!(String::from_utf8_lossy(&human.stderr), "", "nothing drawn on a pipe");
    let out = dir.path().join("part.bin");
    let down = sb(&alice, &broker, &["download", &id, out.to_str().unwrap(), "--offset", "1000", "--length", "5000"]);
    assert_eq!((down[0]["offset"].as_u64(), down[0]["length"].as_u64()), (Some(1000), Some(5000)));
    assert_eq!(down[0]["verified"], false, "a range has no hash of its own to check");
    assert_eq!(std::fs::read(&out).unwrap(), data[1000..6000]);
    // A length past the end stops at the end.
    sb(&alice, &broker, &["download", &id, out.to_str().unwrap(), "--offset", "1048570", "--length", "1000"]);
    assert_eq!(std::fs::read(&out).unwrap(), data[1_048_570..]);
    // A file replaced keeps its permissions.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o600)).unwrap();
    sb(&alice, &broker, &["download", &id, out.to_str().unwrap(), "--offset", "1048570"]);
    assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    // An empty range (an offset at the end) is refused before OUT is touched; before, OUT
    // was replaced with an empty file.
    let empty =
        sb_output(&alice, &broker, &["download", &id, out.to_str().unwrap(), "--offset", &data.len().to_string()]);
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("nothing to download"), "{empty:?}");
    assert_eq!(std::fs::read(&out).unwrap(), data[1_048_570..]);
    // A download that fails after it began leaves OUT as it was, and nothing beside it
    // (before, OUT was emptied at the start and removed on the failure).
    let refused = sb_output(&alice, &broker, &["download", &id, out.to_str().unwrap(), "--offset", "99999999"]);
    assert!(!refused.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), data[1_048_570..]);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.ends_with(".part") || n.ends_with(".sb-part")), "{names:?}");
}

/// `sb file send` sends files already uploaded; another's file goes as the sender's own
/// copy, listed among its files and paid by its quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_send_forwards_a_file_as_my_copy() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, bob, carol) = (dir.path().join("alice"), dir.path().join("bob"), dir.path().join("carol"));
    for (home, name) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        sb(home, &broker, &["register", name]);
    }
    let ours = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap().to_string();
    let theirs = sb(&bob, &broker, &["conv", "create", "carol"])[0]["conv"].as_u64().unwrap().to_string();
    let path = dir.path().join("menu.txt");
    std::fs::write(&path, b"soup, bread, cheese").unwrap();
    let up = sb(&alice, &broker, &["upload", path.to_str().unwrap(), "--conv", &ours]);
    let id = event(&up, "uploaded")["file"].as_str().unwrap().to_owned();
    let sent = sb(&bob, &broker, &["file", "send", &theirs, &id, "--text", "from alice"]);
    assert_eq!(event(&sent, "sent")["conv"].to_string(), theirs);
    let printed = event(&sent, "sent")["files"][0].as_str().unwrap().to_owned();
    let history = sb(&carol, &broker, &["history", &theirs]);
    let message = history.iter().find(|e| e["kind"] == "files").expect("a files message");
    let copy = message["body"]["Files"]["files"][0]["file"].as_str().unwrap().to_owned();
    assert_ne!(copy, id, "bob's copy, not alice's file");
    assert_eq!(printed, copy, "sb says which id the message carries");
    // Sent again under its key (printed with --json): the same seq, nothing new (it had
    // no --client-id: a rerun after a lost answer sent the files twice).
    let key = event(&sent, "sent")["client_id"].as_str().unwrap().to_owned();
    let again = sb(&bob, &broker, &["file", "send", &theirs, &id, "--text", "from alice", "--client-id", &key]);
    assert_eq!(event(&again, "sent")["seq"], event(&sent, "sent")["seq"]);
    assert_eq!(event(&again, "sent")["duplicate"], true);
    let history = sb(&carol, &broker, &["history", &theirs]);
    assert_eq!(history.iter().filter(|e| e["kind"] == "files").count(), 1, "{history:?}");
    let out = dir.path().join("got.txt");
    sb(&carol, &broker, &["download", &copy, out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), b"soup, bread, cheese");
    let listed = sb(&bob, &broker, &["files"]);
    assert_eq!((listed[0]["file"].as_str(), listed[0]["held"].as_bool()), (Some(copy.as_str()), Some(false)));
    // Deleting it changes nothing, and sb says so rather than "deleted".
    let delete = sb(&bob, &broker, &["file", "delete", &copy]);
    assert_eq!(delete[0]["event"], "not_held", "{delete:?}");
    let bad = sb_output(&bob, &broker, &["file", "send", &theirs, "xyz"]);
    assert!(!bad.status.success());
    // Of several, the one that cannot be read is named (before: only "no such file").
    let unknown = "00112233445566778899aabbccddeeff";
    let which = sb_output(&bob, &broker, &["file", "send", &theirs, &id, unknown]);
    let said = String::from_utf8_lossy(&which.stderr);
    assert!(!which.status.success() && said.contains(&format!("{unknown} cannot be read")), "{said}");
    assert!(!said.contains(&id), "{said}");
    // One alone is explained the same way (it said only "no such file": a trial), and a
    // delete of it by its own words, not a download's.
    let one = sb_output(&bob, &broker, &["file", "send", &theirs, unknown]);
    let said = String::from_utf8_lossy(&one.stderr);
    assert!(one.status.code() == Some(3) && said.contains(&format!("{unknown} cannot be read")), "{said}");
    let delete = sb_output(&bob, &broker, &["file", "delete", unknown]);
    let said = String::from_utf8_lossy(&delete.stderr);
    assert!(delete.status.code() == Some(3) && said.contains("is no file of yours"), "{said}");
    // bob takes his copy back: carol cannot read it any more.
    assert_eq!(sb(&bob, &broker, &["file", "withdraw", &copy])[0]["event"], "withdrawn");
    let gone = sb_output(&carol, &broker, &["download", &copy, out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NOT_FOUND"), "{gone:?}");
}

/// What an `sb download` killed mid-way (`kill -9`, a lost laptop lid) leaves beside OUT is
/// resumed by the same command from its length, locked against a second run at once,
/// and dropped when its bytes turn out wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_resumes_from_what_a_killed_run_left() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let data = pseudo_random_bytes(3 * 1024 * 1024 + 5, 7);
    let id = uploaded(&alice, &broker, &dir.path().join("f.bin"), &data);
    let out = dir.path().join("copy.bin");
    // As a run killed after 1 MiB leaves it.
    let partial = dir.path().join(format!(".copy.bin.{}.0+{}.sb-part", &id[..16], data.len()));
    std::fs::write(&partial, &data[..1024 * 1024]).unwrap();
    // Another run writing it now: this one stops at once and touches nothing.
    let held = std::fs::OpenOptions::new().write(true).open(&partial).unwrap();
    held.lock().unwrap();
    let busy = sb_output(&alice, &broker, &["download", &id, out.to_str().unwrap()]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("another sb download is writing"), "{busy:?}");
    drop(held);
    assert_eq!(std::fs::metadata(&partial).unwrap().len(), 1024 * 1024);
    let down = sb(&alice, &broker, &["download", &id, out.to_str().unwrap()]);
    assert_eq!(event(&down, "download_resumed")["at"].as_u64(), Some(1024 * 1024));
    assert_eq!(event(&down, "downloaded")["verified"], true);
    assert!(std::fs::read(&out).unwrap() == data);
    assert!(!partial.exists(), "renamed into place");
    // Bytes that do not belong to the file: the check fails, OUT stays, the partial goes,
    // and the next run starts over and succeeds.
    std::fs::write(&partial, vec![0u8; 1024 * 1024]).unwrap();
    std::fs::write(&out, b"older").unwrap();
    let wrong = sb_output(&alice, &broker, &["download", &id, out.to_str().unwrap()]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("do not match the file's BLAKE3"), "{wrong:?}");
    assert_eq!(std::fs::read(&out).unwrap(), b"older");
    assert!(!partial.exists());
    let down = sb(&alice, &broker, &["download", &id, out.to_str().unwrap()]);
    assert!(down.iter().all(|l| l["event"] != "download_resumed"), "{down:?}");
    assert!(std::fs::read(&out).unwrap() == data);
    // A link planted under the partial's name (its name is predictable) is refused, not
    // followed: the file it points to is neither emptied nor written.
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, &partial).unwrap();
    let refused = sb_output(&alice, &broker, &["download", &id, out.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is a link: refused (not followed)"), "{refused:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    std::fs::remove_file(&partial).unwrap();
    // So is a hard link: a second name for a file of mine (before, the file was emptied
    // or written into: an attacker review).
    std::fs::hard_link(&victim, &partial).unwrap();
    let refused = sb_output(&alice, &broker, &["download", &id, out.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a file of yours alone"), "{refused:?}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    std::fs::remove_file(&partial).unwrap();
    // A range's bytes are not kept (nothing would check them): it starts over.
    let ranged = dir.path().join(format!(".copy.bin.{}.10+100.sb-part", &id[..16]));
    std::fs::write(&ranged, vec![0u8; 50]).unwrap();
    let down = sb(&alice, &broker, &["download", &id, out.to_str().unwrap(), "--offset", "10", "--length", "100"]);
    assert!(down.iter().all(|l| l["event"] != "download_resumed"), "{down:?}");
    assert_eq!(std::fs::read(&out).unwrap(), data[10..110]);
    // The file gone: what a killed run kept of it goes too.
    std::fs::write(&partial, &data[..1000]).unwrap();
    sb(&alice, &broker, &["file", "delete", &id]);
    let gone = sb_output(&alice, &broker, &["download", &id, out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NOT_FOUND"), "{gone:?}");
    assert!(!partial.exists());
}

/// An `sb upload` killed mid-way continues with `sb upload --resume ID` (the file it was
/// begun from) from the broker's durable offset, and the file arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_resumes_after_the_process_was_killed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let data = pseudo_random_bytes(16 * 1024 * 1024 + 17, 3);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();

    let (id, durable) = upload_and_kill(&alice, &broker, &path);
    assert!(durable < data.len() as u64);
    // The id was saved for resuming.
    assert!(std::fs::read_to_string(alice.join("state.json")).unwrap().contains(&id));

    let resumed = sb(&alice, &broker, &["upload", "--resume", &id]);
    let from = event(&resumed, "resumed")["offset"].as_u64().unwrap();
    assert!(from >= durable, "resumed at {from}, {durable} was durable before the kill");
    assert_eq!(event(&resumed, "uploaded")["file"].as_str(), Some(id.as_str()));
    let out = dir.path().join("copy.bin");
    assert_eq!(sb(&alice, &broker, &["download", &id, out.to_str().unwrap()])[0]["verified"], true);
    assert!(std::fs::read(&out).unwrap() == data);
    // Finished here: the file must be named.
    let finished = sb_output(&alice, &broker, &["upload", "--resume", &id]);
    let said = String::from_utf8_lossy(&finished.stderr);
    assert!(!finished.status.success() && said.contains("name its file"), "{said}");

    // Another file than the upload's is refused before anything is sent.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, b"something else").unwrap();
    let refused = sb_output(&alice, &broker, &["upload", "--resume", &id, other.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is not the file of upload"));
}

/// `sb upload` rides out a broker restart by itself: it reconnects, asks where the
/// upload stands and finishes it, in the same process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rides_out_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let broker = Broker::start(common::test_config(data_dir.clone())).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let data = pseudo_random_bytes(16 * 1024 * 1024 + 3, 4);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();

    let mut child = sb_command(&alice, &broker)
        .args(["--json", "upload", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // sb's lines, read on a thread of their own so this test's runtime keeps serving the broker.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in lines {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str::<serde_json::Value>(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        let line = next_line(&mut rx).await.expect("sb is uploading");
        assert_ne!(line["event"], "uploaded", "the upload finished before the restart");
        let durable = line["event"] == "durable";
        seen.push(line);
        if durable {
            break;
        }
    }
    let addr = broker.local_addr;
    broker.shutdown().await.unwrap();
    let broker = common::restart_on(addr, data_dir).await;
    while let Some(line) = next_line(&mut rx).await {
        seen.push(line);
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{seen:?}");
    assert!(seen.iter().any(|l| l["event"] == "retrying" && l["reconnect"] == true), "{seen:?}");
    assert_eq!(event(&seen, "started")["offset"].as_u64(), Some(0));
    let resumed: Vec<u64> =
        seen.iter().filter(|l| l["event"] == "resumed").filter_map(|l| l["offset"].as_u64()).collect();
    assert!(!resumed.is_empty() && resumed[0] > 0, "it resumed from a durable offset: {resumed:?}");
    let id = event(&seen, "uploaded")["file"].as_str().unwrap().to_owned();
    let out = dir.path().join("copy.bin");
    assert_eq!(sb(&alice, &broker, &["download", &id, out.to_str().unwrap()])[0]["verified"], true);
    assert!(std::fs::read(&out).unwrap() == data);
}

/// The next line sb printed (`None` once it exited), within a deadline.
async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>) -> Option<serde_json::Value> {
    tokio::time::timeout(Duration::from_secs(120), rx.recv()).await.expect("sb printed nothing in time")
}

/// Starts `sb --json upload PATH` and kills it (SIGKILL) once the broker reported a
/// durable offset; returns the upload id and that offset.
fn upload_and_kill(home: &Path, broker: &Broker, path: &Path) -> (String, u64) {
    upload_and_kill_with(home, broker, path, &[])
}

/// `upload_and_kill` with more arguments to `sb upload` (`--conv`).
fn upload_and_kill_with(home: &Path, broker: &Broker, path: &Path, extra: &[&str]) -> (String, u64) {
    let (mut child, id, durable, _) = upload_until_durable(home, broker, path, extra);
    child.kill().unwrap();
    child.wait().unwrap();
    (id, durable)
}

/// Starts `sb --json upload PATH EXTRA` and reads its lines until the broker reported a
/// durable offset: the running sb, the upload id, that offset, and the rest of its lines.
fn upload_until_durable(
    home: &Path,
    broker: &Broker,
    path: &Path,
    extra: &[&str],
) -> (std::process::Child, String, u64, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = sb_command(home, broker)
        .args(["--json", "upload", path.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Read its progress (each line arrives as it happens; the deadline bounds the wait)
    // until the broker reported a durable offset, then kill it.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut id, mut durable) = (None, 0);
    while durable == 0 {
        assert!(Instant::now() < deadline, "no durable offset within the deadline");
        let line: serde_json::Value = serde_json::from_str(&lines.next().expect("sb is uploading").unwrap()).unwrap();
        assert_ne!(line["event"], "uploaded", "the upload finished before it could be killed");
        if line["event"] == "upload" {
            id = line["file"].as_str().map(str::to_owned);
        }
        if line["event"] == "durable" {
            durable = line["offset"].as_u64().unwrap();
        }
    }
    let id = id.expect("the upload id was printed first");
    (child, id, durable, lines)
}

/// A plain `sb upload FILE` of the same unchanged file continues the upload a killed sb
/// left (its id was saved); once that upload is gone, it starts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_file_uploaded_again_continues_the_saved_upload() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let data = pseudo_random_bytes(16 * 1024 * 1024 + 5, 5);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();

    let (id, durable) = upload_and_kill(&alice, &broker, &path);
    let again = sb(&alice, &broker, &["upload", path.to_str().unwrap()]);
    assert_eq!(event(&again, "upload")["file"].as_str(), Some(id.as_str()), "the saved upload: {again:?}");
    assert!(event(&again, "resumed")["offset"].as_u64().unwrap() >= durable);
    assert_eq!(event(&again, "uploaded")["file"].as_str(), Some(id.as_str()));
    // Complete: not an upload to cancel, and sb says what lets go of it (before, "no
    // such file" for a file `sb file info` showed).
    let cancel = sb_output(&alice, &broker, &["file", "cancel", &id]);
    assert!(!cancel.status.success());
    assert!(String::from_utf8_lossy(&cancel.stderr).contains("is complete, not an upload in progress"), "{cancel:?}");

    // Killed again, then cancelled: the home forgets it, and the next upload of the
    // file starts afresh (nor would it send the cancelled one's message).
    let (second, _) = upload_and_kill(&alice, &broker, &path);
    assert_ne!(second, id, "a completed upload is not resumed");
    sb(&alice, &broker, &["file", "cancel", &second]);
    let state = std::fs::read_to_string(alice.join("state.json")).unwrap();
    assert!(!state.contains(&second), "{state}");
    let fresh = sb(&alice, &broker, &["upload", path.to_str().unwrap()]);
    assert!(fresh.iter().all(|l| l["event"] != "upload_gone"), "{fresh:?}");
    let third = event(&fresh, "uploaded")["file"].as_str().unwrap();
    assert_ne!(third, second);
    assert_eq!(event(&fresh, "started")["offset"].as_u64(), Some(0));

    // Killed, then the file changed: the next upload is a new one, and says what became
    // of the old one and how to free it (before: not a word, the old one kept its quota).
    let (fourth, _) = upload_and_kill(&alice, &broker, &path);
    let mut changed = data.clone();
    changed[0] ^= 1;
    std::fs::write(&path, &changed).unwrap();
    let after = sb(&alice, &broker, &["upload", path.to_str().unwrap()]);
    assert_eq!(event(&after, "file_changed")["file"].as_str(), Some(fourth.as_str()), "{after:?}");
    assert_ne!(event(&after, "uploaded")["file"].as_str(), Some(fourth.as_str()));
}

/// Homes of alice's two devices and of bob, registered, and their direct conversation.
fn alice_phone_and_bob(dir: &Path, broker: &Broker) -> (PathBuf, PathBuf, PathBuf, u64) {
    let (alice, phone, bob) = (dir.join("alice"), dir.join("phone"), dir.join("bob"));
    sb(&alice, broker, &["register", "alice"]);
    sb(&phone, broker, &["login", "alice"]);
    sb(&bob, broker, &["register", "bob"]);
    let conv = sb(&alice, broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap();
    (alice, phone, bob, conv)
}

/// `sb uploads` lists my unfinished uploads with their durable bytes and, for those
/// begun in this home, the local file and conversation; `sb upload --resume ID FILE`
/// without `--conv` then sends the file where the killed sb was asked to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_uploads_are_listed_and_resume_to_their_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, phone, bob, conv) = alice_phone_and_bob(dir.path(), &broker);
    let none = sb(&alice, &broker, &["uploads"]);
    assert_eq!(none.len(), 1);
    assert_eq!(none[0]["event"], "no_uploads");
    let data = pseudo_random_bytes(16 * 1024 * 1024 + 9, 6);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();

    let conv_arg = conv.to_string();
    let (id, durable) =
        upload_and_kill_with(&alice, &broker, &path, &["--conv", &conv_arg, "--caption", "from the lift"]);
    // Not complete: nothing to download yet, and nothing left beside OUT.
    let early = sb_output(&alice, &broker, &["download", &id, dir.path().join("early.bin").to_str().unwrap()]);
    let said = String::from_utf8_lossy(&early.stderr);
    assert!(!early.status.success() && said.contains("still being uploaded"), "{said}");
    assert!(
        !std::fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("early"))
    );
    let listed = sb(&alice, &broker, &["uploads"]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let u = &listed[0];
    assert_eq!((u["file"].as_str(), u["name"].as_str()), (Some(id.as_str()), Some("big.bin")));
    assert_eq!((u["size"].as_u64(), u["conv"].as_u64()), (Some(data.len() as u64), Some(conv)));
    assert!(u["offset"].as_u64().unwrap() >= durable);
    assert_eq!(u["path"].as_str(), path.to_str());
    assert_eq!(u["blake3"].as_str().unwrap().len(), 64);
    // Human lines say how far it got and where it comes from.
    let human = sb_output(&alice, &broker, &["uploads"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains(&id) && text.contains("expires in 23 h") && text.contains("from "), "{text}");
    // And what to run: continue it, or free it.
    assert!(text.contains("continues it") && text.contains(&format!("sb file cancel {id}")), "{text}");
    // With this home and broker (before: a bare `sb upload PATH`, which run elsewhere
    // found another home's saved upload, or none, and sent nothing where it was asked).
    let continues = text.split('`').nth(1).unwrap_or_else(|| panic!("no command in: {text}"));
    let expected = format!("SWITCHBOARD_HOME={} sb --server {} --ca", alice.display(), broker.local_addr);
    assert!(continues.starts_with(&expected) && continues.contains(" upload /"), "{continues}");
    assert_eq!(u["path_changed"], false);
    // The file changed since: `sb upload PATH` would start another upload, so the listing
    // says to resume by id from a copy of the original (before: "`sb upload PATH`
    // continues it", which sent the whole file again as a new upload).
    let original = std::fs::read(&path).unwrap();
    std::fs::write(&path, [&original[..], b"extra"].concat()).unwrap();
    assert_eq!(sb(&alice, &broker, &["uploads"])[0]["path_changed"], true);
    let text = String::from_utf8_lossy(&sb_output(&alice, &broker, &["uploads"]).stdout).into_owned();
    assert!(text.contains("is no longer the file it began from") && text.contains("upload --resume"), "{text}");
    std::fs::write(&path, &original).unwrap();
    // The quota counts it at its declared size, in whole 4 KiB blocks.
    let quota = sb(&alice, &broker, &["quota"]);
    assert_eq!(quota[0]["uploads_in_progress"].as_u64(), Some(1), "{quota:?}");
    let charged = (data.len() as u64).div_ceil(4096) * 4096;
    assert_eq!(quota[0]["stored_bytes"].as_u64(), Some(charged));
    assert_eq!(quota[0]["free_bytes"].as_u64(), Some(quota[0]["quota_bytes"].as_u64().unwrap() - charged));
    let parts = ["files_bytes", "uploads_bytes", "unfreed_bytes"].map(|k| quota[0][k].as_u64());
    assert_eq!(parts, [Some(0), Some(charged), Some(0)], "what the used bytes are: {quota:?}");
    // People read sizes in binary units, not byte counts.
    let human = sb_output(&alice, &broker, &["quota"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("16.00 MiB of ") && text.contains("files up to 100.00 MiB"), "{text}");
    // Another device of alice's sees it too, without a local file.
    let there = sb(&phone, &broker, &["uploads"]);
    assert_eq!((there.len(), there[0]["file"].as_str()), (1, Some(id.as_str())));
    assert!(there[0]["path"].is_null());
    // bob sees none of it.
    assert_eq!(sb(&bob, &broker, &["uploads"])[0]["event"], "no_uploads");

    let resumed = sb(&alice, &broker, &["upload", "--resume", &id, path.to_str().unwrap()]);
    assert_eq!(event(&resumed, "upload")["conv"].as_u64(), Some(conv), "{resumed:?}");
    let sent = event(&resumed, "sent");
    assert_eq!((sent["conv"].as_u64(), sent["file"].as_str()), (Some(conv), Some(id.as_str())));
    let history = sb(&bob, &broker, &["history", &conv_arg]);
    let message = history.iter().find(|e| e["kind"] == "files").expect("a files message");
    assert!(message["text"].as_str().unwrap().starts_with("from the lift"), "{message}");
    assert_eq!(sb(&alice, &broker, &["uploads"])[0]["event"], "no_uploads");

    // Resumed on another device, which was never told where it goes: it says so.
    let (id, _) = upload_and_kill_with(&alice, &broker, &path, &["--conv", &conv_arg]);
    let there = sb(&phone, &broker, &["upload", "--resume", &id, path.to_str().unwrap()]);
    assert_eq!(event(&there, "not_sent")["file"].as_str(), Some(id.as_str()), "{there:?}");
    assert!(!there.iter().any(|l| l["event"] == "sent"));
    // Complete there, its message is still to be sent from the home that was told where:
    // `sb uploads` there says so (before: "no unfinished uploads", while the next
    // `sb upload` of the file would send it), and that upload sends it.
    let listed = sb(&alice, &broker, &["uploads"]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let u = &listed[0];
    assert_eq!(
        (u["file"].as_str(), u["state"].as_str(), u["conv"].as_u64()),
        (Some(id.as_str()), Some("complete"), Some(conv))
    );
    assert_eq!(u["path"].as_str(), path.to_str());
    let human = String::from_utf8_lossy(&sb_output(&alice, &broker, &["uploads"]).stdout).into_owned();
    assert!(human.contains("is not known sent") && human.contains(" upload /"), "{human}");
    let sent = sb(&alice, &broker, &["upload", path.to_str().unwrap()]);
    assert_eq!(event(&sent, "sent")["file"].as_str(), Some(id.as_str()), "{sent:?}");
    assert_eq!(sb(&alice, &broker, &["uploads"])[0]["event"], "no_uploads");
}

/// An upload refused for the quota says what holds it and how to free it: here a stale
/// unfinished upload, which counts at its full size (before: only the broker's numbers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_for_the_quota_says_what_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path().join("data"));
    config.quota_bytes = 24 * 1024 * 1024;
    // Slow enough that what a cancel leaves is seen being freed.
    config.delete_bytes_per_sec = 4 * 1024 * 1024;
    let broker = Broker::start(config).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let first = dir.path().join("first.bin");
    std::fs::write(&first, pseudo_random_bytes(16 * 1024 * 1024, 3)).unwrap();
    let (id, _) = upload_and_kill(&alice, &broker, &first);
    let second = dir.path().join("second.bin");
    std::fs::write(&second, pseudo_random_bytes(16 * 1024 * 1024, 4)).unwrap();
    let refused = sb_output(&alice, &broker, &["upload", second.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(6), "once something is freed (it exited 1: a trial)");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("QUOTA_EXCEEDED") && stderr.contains("sb uploads") && stderr.contains("sb file cancel"),
        "{stderr}"
    );
    // Cancelled, the stale upload gives its room back once the broker has freed its
    // bytes; meanwhile `sb quota` says what holds the room.
    sb(&alice, &broker, &["file", "cancel", &id]);
    let again = sb_output(&alice, &broker, &["file", "cancel", &id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no upload of yours in progress"), "{again:?}");
    let gone = sb_output(&alice, &broker, &["upload", "--resume", &id, first.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&gone.stderr);
    assert!(!gone.status.success() && said.contains("is gone") && said.contains("starts it again"), "{said}");
    let quota = sb(&alice, &broker, &["quota"]);
    assert_eq!((quota[0]["files_bytes"].as_u64(), quota[0]["uploads_bytes"].as_u64()), (Some(0), Some(0)));
    assert_eq!(quota[0]["unfreed_bytes"], quota[0]["stored_bytes"], "only what is being freed: {quota:?}");
    let freed = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while sb(&alice, &broker, &["quota"])[0]["stored_bytes"].as_u64() != Some(0) {
            assert!(std::time::Instant::now() < deadline, "never freed");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    freed();
    let up = sb(&alice, &broker, &["upload", second.to_str().unwrap()]);
    let id = event(&up, "uploaded")["file"].as_str().unwrap().to_owned();
    // Deleted, its 16 MiB are freed 4 MiB a second: `sb quota` says they are held.
    sb(&alice, &broker, &["file", "delete", &id]);
    let human = sb_output(&alice, &broker, &["quota"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("being freed") && text.contains("files 0 B"), "{text}");
    freed();
}

/// A download whose reader loses access on the way (bob leaves the group) stops at
/// once with what happened and deletes the bytes it had: before, it was retried, and
/// then said that the same command resumes from the kept bytes, which it could not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_a_lost_access_says_so_and_keeps_nothing() {
    let (dir, broker, alice, bob) = alice_and_bob().await;
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "g", "bob"])[0]["conv"].as_u64().unwrap();
    let conv_arg = conv.to_string();
    let data = pseudo_random_bytes(48 * 1024 * 1024, 9);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();
    let up = sb(&alice, &broker, &["upload", path.to_str().unwrap(), "--conv", &conv_arg]);
    let id = event(&up, "uploaded")["file"].as_str().unwrap().to_owned();
    let out = dir.path().join("copy.bin");
    let partial = dir.path().join(format!(".copy.bin.{}.0+{}.sb-part", &id[..16], data.len()));
    let child = sb_command(&bob, &broker)
        .args(["--json", "download", &id, out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Paused once it has some bytes, while bob leaves; then let go.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 1024 * 1024 {
        assert!(Instant::now() < deadline, "no bytes downloaded");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    sb(&bob, &broker, &["conv", "leave", &conv_arg]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(!done.status.success());
    assert!(stderr.contains("cannot be read any more"), "{stderr}");
    assert!(!stderr.contains("resumes"), "{stderr}");
    assert!(!partial.exists() && !out.exists(), "nothing kept");
}

/// An upload taken over by another device: the sb that lost it says so and keeps it,
/// with where it was to be sent; the same command run again then sends it once it is
/// complete (before, that sb forgot the upload: the message was never sent, and running
/// the command again began a new upload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_taken_over_by_another_device_is_kept_and_sent_by_the_same_command() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, phone, bob, conv) = alice_phone_and_bob(dir.path(), &broker);
    let conv_arg = conv.to_string();
    let data = pseudo_random_bytes(32 * 1024 * 1024 + 3, 8);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();

    let (mut laptop, id, _, lines) = upload_until_durable(&alice, &broker, &path, &["--conv", &conv_arg]);
    // The phone takes the upload over and finishes it (without sending it anywhere),
    // while the laptop's sb goes on writing its lines.
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let there = sb(&phone, &broker, &["upload", "--resume", &id, path.to_str().unwrap()]);
    assert_eq!(event(&there, "uploaded")["file"].as_str(), Some(id.as_str()), "{there:?}");
    let status = laptop.wait().unwrap();
    let rest = reader.join().unwrap();
    assert!(!rest.iter().any(|l| l.contains("\"uploaded\"")), "the phone finished it, not the laptop: {rest:?}");
    assert!(!status.success(), "the laptop's sb lost its upload and says so");
    assert!(!sb(&bob, &broker, &["history", &conv_arg]).iter().any(|e| e["kind"] == "files"), "nothing sent yet");
    // The same command on the laptop sends it, once.
    let again = sb(&alice, &broker, &["upload", path.to_str().unwrap(), "--conv", &conv_arg]);
    assert_eq!(event(&again, "uploaded")["file"].as_str(), Some(id.as_str()), "the kept upload: {again:?}");
    assert_eq!(event(&again, "sent")["conv"].as_u64(), Some(conv));
    let history = sb(&bob, &broker, &["history", &conv_arg]);
    assert_eq!(history.iter().filter(|e| e["kind"] == "files").count(), 1, "{history:?}");
}

/// A second `sb upload` of a file another sb in the same home is uploading refuses at
/// once, naming the upload, and the first one finishes undisturbed (before, the second
/// took the upload over and the first failed with `CONFLICT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sb_uploading_the_same_file_refuses_and_leaves_the_first_alone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    // Large enough that the first cannot finish between its first durable offset and
    // the pause.
    let data = pseudo_random_bytes(48 * 1024 * 1024 + 11, 7);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();

    let (mut first, id, _, lines) = upload_until_durable(&alice, &broker, &path, &[]);
    // Paused, so it cannot finish before the second one tries.
    let signal = |sig: &str| {
        let status = Command::new("kill").args([sig, &first.id().to_string()]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let second = sb_output(&alice, &broker, &["upload", path.to_str().unwrap()]);
    signal("-CONT");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("is being uploaded by another sb in this home") && stderr.contains(&id), "{stderr}");

    let rest: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    assert!(first.wait().unwrap().success(), "{rest:?}");
    assert_eq!(event(&rest, "uploaded")["file"].as_str(), Some(id.as_str()));
    assert!(!rest.iter().any(|l| l["event"] == "retrying"), "the first was not disturbed: {rest:?}");
    // Once it is done, the file may be uploaded again (the same bytes: a new upload).
    let again = sb(&alice, &broker, &["upload", path.to_str().unwrap()]);
    assert_eq!(event(&again, "started")["offset"].as_u64(), Some(0));
}

/// An `sb` command that fails still closes its connection before it exits: the broker
/// at once stops counting it among the user's sessions (before, it stayed until the
/// idle timeout, 30 s: the user showed online, and 64 failures in a row locked the
/// user out of every device with `OVERLOADED`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_command_leaves_no_session_behind() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    // `carol carol` is one user: a direct conversation, not a group.
    let conv = sb(&bob, &broker, &["conv", "create", "alice", "alice"]);
    assert_eq!(conv[0]["kind"], "direct", "{conv:?}");
    let conv = conv[0]["conv"].as_u64().unwrap().to_string();

    let failed = sb_output(&alice, &broker, &["edit", &conv, "999", "no such message"]);
    assert!(!failed.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = sb(&bob, &broker, &["presence", "alice"]);
        if seen[0]["state"] == "offline" {
            break;
        }
        assert!(Instant::now() < deadline, "alice still shows {seen:?} after her only command failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `sb devices revoke` of the device in use asks for `--this-device`; with it, the
/// device is revoked, and its next command says how to enroll it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_this_device_takes_a_flag_and_then_says_how_to_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (laptop, phone) = (dir.path().join("laptop"), dir.path().join("phone"));
    sb(&laptop, &broker, &["register", "alice", "--device", "laptop"]);
    sb(&phone, &broker, &["login", "alice", "--device", "phone"]);
    let devices = sb(&phone, &broker, &["devices"]);
    let names: Vec<&str> = devices.iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["laptop", "phone"], "{devices:?}");
    let me = devices.iter().find(|d| d["current"] == true).unwrap()["device_id"].as_u64().unwrap().to_string();

    let refused = sb_output(&phone, &broker, &["devices", "revoke", &me]);
    assert_eq!(refused.status.code(), Some(2), "a command line sb will not run as given");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--this-device"));
    assert_eq!(sb(&laptop, &broker, &["devices"]).len(), 2, "nothing was revoked");

    // Revoked from the other device: the next command says how to come back.
    sb(&laptop, &broker, &["devices", "revoke", &me]);
    let after = sb_output(&phone, &broker, &["devices"]);
    assert!(!after.status.success());
    let stderr = String::from_utf8_lossy(&after.stderr);
    assert!(stderr.contains("`sb login alice` enrolls it again") && stderr.contains("DEVICE_REVOKED"), "{stderr}");
    assert!(stderr.contains("this device was removed from alice's account"), "{stderr}");
    assert_eq!(after.status.code(), Some(8), "{stderr}");
    // A dead device may be replaced, by another user's too (before, the home refused
    // any other user for good)...
    let spare = dir.path().join("spare");
    std::fs::create_dir_all(&spare).unwrap();
    std::fs::copy(phone.join("state.json"), spare.join("state.json")).unwrap();
    sb(&spare, &broker, &["register", "dora"]);
    // ... and log in again; a working one may not (its key would be lost).
    sb(&phone, &broker, &["login", "alice", "--device", "phone"]);
    let again = sb_output(&phone, &broker, &["login", "alice"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("logged in as alice already"), "{again:?}");
    assert_eq!(sb(&laptop, &broker, &["devices"]).len(), 2, "laptop and the new phone, nothing more");

    // Revoking this one signs the home out at once; the flag needs no id (before: clap
    // asked for DEVICE).
    let revoked = sb_output(&phone, &broker, &["devices", "revoke", "--this-device"]);
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("`sb login alice` enrolls it again"), "{revoked:?}");
    assert_eq!(sb(&laptop, &broker, &["devices"]).len(), 1);
    let signed_out = sb_output(&phone, &broker, &["devices"]);
    assert!(String::from_utf8_lossy(&signed_out.stderr).contains("no device here yet"), "{signed_out:?}");
    // The broker flags of a command other than register and login are for that run.
    let addr = broker.local_addr;
    let alias = format!("localhost:{}", addr.port());
    let listed = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", &laptop)
        .args(["--json", "--server", &alias, "conv", "list"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let state = std::fs::read_to_string(laptop.join("state.json")).unwrap();
    assert!(state.contains(&addr.to_string()) && !state.contains(&alias), "{state}");
}

/// A download into a device (`/dev/null`) works and leaves the device alone; before,
/// syncing it failed, and a failed download removed OUT whatever it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_into_dev_null_works_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let id = uploaded(&alice, &broker, &dir.path().join("f.bin"), &pseudo_random_bytes(100_000, 8));
    let down = sb(&alice, &broker, &["download", &id, "/dev/null"]);
    // Verified as the bytes went out (before, a whole file written in place was not).
    assert_eq!((down[0]["length"].as_u64(), down[0]["verified"].as_bool()), (Some(100_000), Some(true)));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    // A pipe someone else made at OUT (in a shared directory, ahead of the download) is
    // refused: its reader is theirs (before, every byte went to it). Made here as
    // another user's when this runs as root (chown); otherwise that part cannot be set up.
    let fifo = dir.path().join("report.pdf");
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::from(0o666), 0).unwrap();
    if std::os::unix::fs::chown(&fifo, Some(65534), Some(65534)).is_ok() {
        // Its owner reads it (else the open fails at once for want of a reader).
        use std::os::unix::fs::OpenOptionsExt;
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&fifo)
            .unwrap();
        let refused = sb_output(&alice, &broker, &["download", &id, fifo.to_str().unwrap()]);
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("a pipe or socket of another user's"), "{refused:?}");
    }
    // A pipe nobody reads: an error at once, not a hang.
    let unread = dir.path().join("unread.fifo");
    rustix::fs::mknodat(rustix::fs::CWD, &unread, rustix::fs::FileType::Fifo, rustix::fs::Mode::from(0o600), 0)
        .unwrap();
    let refused = sb_output(&alice, &broker, &["download", &id, unread.to_str().unwrap()]);
    assert!(!refused.status.success(), "{refused:?}");
}

/// `sb download ID -` writes the file's bytes, and only them, to standard output: its
/// reports go to standard error (before, the last report followed the bytes on stdout,
/// and `-` made a file named `-`). A range past the end says it was cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_to_standard_output_carries_the_bytes_alone() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let data = pseudo_random_bytes(300_000, 11);
    let id = uploaded(&alice, &broker, &dir.path().join("f.bin"), &data);
    let piped =
        sb_command(&alice, &broker).current_dir(dir.path()).args(["--json", "download", &id, "-"]).output().unwrap();
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    assert!(piped.stdout == data, "stdout holds {} bytes, the file {}", piped.stdout.len(), data.len());
    assert!(!dir.path().join("-").exists(), "no file named -");
    let reports = String::from_utf8_lossy(&piped.stderr);
    assert!(reports.contains("\"event\":\"downloaded\""), "the report is on stderr: {reports}");
    let human = sb_output(&alice, &broker, &["download", &id, "-", "--offset", "299990", "--length", "100"]);
    assert!(human.status.success(), "{}", String::from_utf8_lossy(&human.stderr));
    assert_eq!(human.stdout, &data[299_990..], "the range's 10 bytes, alone");
    let said = String::from_utf8_lossy(&human.stderr);
    assert!(said.contains("90 bytes short of --length"), "the cut is said: {said}");
}

/// `sb conv rename`: the owner or an admin renames a group; every member's list and
/// history show the new title, and the group goes by it on the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_renamed_and_goes_by_its_new_title() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "team", "bob"])[0]["conv"].as_u64().unwrap();
    let refused = sb_output(&bob, &broker, &["conv", "rename", "team", "mine"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("FORBIDDEN"), "{refused:?}");
    let renamed = sb(&alice, &broker, &["conv", "rename", "team", "ops"]);
    assert_eq!((renamed[0]["conv"].as_u64(), renamed[0]["seq"].as_u64()), (Some(conv), Some(2)), "{renamed:?}");
    let same = sb_output(&alice, &broker, &["conv", "rename", "ops", "ops"]);
    assert!(String::from_utf8_lossy(&same.stderr).contains("CONFLICT"), "{same:?}");
    let listed = sb(&bob, &broker, &["conv", "list"]);
    assert_eq!(listed[0]["title"], "ops", "{listed:?}");
    let history = sb(&bob, &broker, &["history", "ops"]);
    let rename = history.iter().find(|e| e["kind"] == "title_changed").expect("in history");
    assert_eq!((&rename["text"], &rename["sender_name"]), (&"renamed the group to \"ops\"".into(), &"alice".into()));
    let old = sb_output(&bob, &broker, &["history", "team"]);
    assert!(!old.status.success(), "the old title names nothing: {old:?}");
}

/// `sb conv role` and `sb conv remove` take member names; the owner hands the group over
/// and may then leave; history shows the role changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_change_and_members_go_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, bob, carol) = (dir.path().join("alice"), dir.path().join("bob"), dir.path().join("carol"));
    sb(&alice, &broker, &["register", "alice"]);
    sb(&bob, &broker, &["register", "bob"]);
    sb(&carol, &broker, &["register", "carol"]);
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "team", "bob", "carol"])[0]["conv"]
        .as_u64()
        .unwrap()
        .to_string();
    let refused = sb_output(&bob, &broker, &["conv", "remove", &conv, "carol"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("FORBIDDEN"));
    sb(&alice, &broker, &["conv", "role", &conv, "bob", "admin"]);
    let role = |who: &str| {
        let members = sb(&alice, &broker, &["conv", "members", &conv]);
        members.iter().find(|m| m["name"] == who).map(|m| m["role"].as_str().unwrap().to_owned())
    };
    assert_eq!(role("bob").as_deref(), Some("admin"));
    sb(&bob, &broker, &["conv", "remove", &conv, "carol"]);
    assert_eq!(role("carol"), None);
    let unknown = sb_output(&alice, &broker, &["conv", "role", &conv, "nobody", "admin"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not a member"));
    // A user whose name is another member's id: the bare name is refused as ambiguous,
    // and `#ID` says the id.
    let alice_id =
        sb(&alice, &broker, &["conv", "members", &conv]).iter().find(|m| m["name"] == "alice").unwrap()["user_id"]
            .to_string();
    let digits = dir.path().join("digits");
    sb(&digits, &broker, &["register", &alice_id]);
    sb(&alice, &broker, &["conv", "add", &conv, &alice_id]);
    let ambiguous = sb_output(&alice, &broker, &["conv", "role", &conv, &alice_id, "admin"]);
    assert!(String::from_utf8_lossy(&ambiguous.stderr).contains("another member's id"), "{ambiguous:?}");
    let digits_id = sb(&alice, &broker, &["conv", "members", &conv])
        .iter()
        .find(|m| m["name"] == alice_id.as_str())
        .unwrap()["user_id"]
        .to_string();
    sb(&alice, &broker, &["conv", "remove", &conv, &format!("#{digits_id}")]);
    assert_eq!(role(&alice_id), None);

    // The owner may not leave while others remain; sb says how to hand the group over,
    // and says nothing of it to a member refused for another reason.
    let stays = sb_output(&alice, &broker, &["conv", "leave", &conv]);
    assert!(!stays.status.success());
    let said = String::from_utf8_lossy(&stays.stderr);
    assert!(said.contains(&format!("`sb conv role {conv} USER owner`")) && said.contains("FORBIDDEN"), "{said}");
    let stranger = sb_output(&carol, &broker, &["conv", "leave", &conv]);
    assert!(!String::from_utf8_lossy(&stranger.stderr).contains("sb conv role"), "{stranger:?}");
    sb(&alice, &broker, &["conv", "role", &conv, "bob", "owner"]);
    let history = sb(&bob, &broker, &["history", &conv]);
    sb(&alice, &broker, &["conv", "leave", &conv]);
    let changes: Vec<&str> =
        history.iter().filter(|e| e["kind"] == "roles_changed").filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(changes, ["made bob admin", "made bob owner, alice admin"], "by name: {history:?}");
    let texts: Vec<&str> = history.iter().filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(texts[0], "created \"team\" with 3 members: alice, bob, carol", "{texts:?}");
    // Former members are named as the entries name them (before, `removed user#3`).
    let removed = ["removed carol".to_string(), format!("removed {alice_id}")];
    assert!(removed.iter().all(|r| texts.contains(&r.as_str())), "{texts:?}");
    assert!(!texts.iter().any(|t| t.contains("user#")), "{texts:?}");
    // And a sender who has left, to a member who stays.
    let after = sb(&bob, &broker, &["history", &conv]);
    let left = after.iter().find(|e| e["kind"] == "member_left").unwrap();
    assert_eq!(left["sender_name"], "alice", "{left}");
    // --json names the users a body names by id, for scripts.
    let removal = after.iter().find(|e| e["kind"] == "member_removed").unwrap();
    let carol_id = removal["body"]["MemberRemoved"]["user"].to_string();
    assert_eq!(removal["user_names"][&carol_id], "carol", "{removal}");
}

/// Enrolling with the broker's certificate found in `./switchboard-data` (no `--ca`)
/// saves it as an absolute path, so the home works from any directory (before, the
/// state kept no certificate and the next command elsewhere asked for `--ca`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_certificate_is_saved_as_an_absolute_path() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (home, beside, elsewhere) = (dir.path().join("home"), dir.path().join("beside"), dir.path().join("elsewhere"));
    std::fs::create_dir_all(beside.join("switchboard-data")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::copy(&broker.cert_path, beside.join("switchboard-data/cert.pem")).unwrap();
    let run_as = |home: &Path, cwd: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sb"))
            .current_dir(cwd)
            .env("SWITCHBOARD_HOME", home)
            .env("SWITCHBOARD_PASSWORD", "correct horse battery")
            .env_remove("SWITCHBOARD_CA")
            .env_remove("SWITCHBOARD_PIN")
            .env_remove("SWITCHBOARD_SERVER")
            .args(args)
            .output()
            .unwrap()
    };
    let run = |cwd: &Path, args: &[&str]| run_as(&home, cwd, args);
    let addr = broker.local_addr.to_string();
    let registered = run(&beside, &["--server", &addr, "register", "alice"]);
    assert!(registered.status.success(), "{}", String::from_utf8_lossy(&registered.stderr));
    let listed = run(&elsewhere, &["conv", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let state = std::fs::read_to_string(home.join("state.json")).unwrap();
    assert!(state.contains(&beside.join("switchboard-data/cert.pem").display().to_string()), "{state}");
    // A new home in a directory without the certificate, for a broker on this machine:
    // told that the file is not here (a trial got only "pass --ca FILE or --pin SHA256
    // (... taken by itself only for a broker on this machine)", and the broker was).
    let refused = run_as(&dir.path().join("bob"), &elsewhere, &["--server", &addr, "register", "bob"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("no ./switchboard-data/cert.pem here"), "{said}");
}

/// `sb probe` checks that a broker answers without an account (a health check): its
/// protocol version and timings; it enrolls nothing, and a wrong pin fails it (it
/// checks the certificate like any connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_answers_without_an_account() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let nobody = dir.path().join("nobody");
    let probe = sb(&nobody, &broker, &["probe"]);
    assert_eq!(probe[0]["event"], "probe");
    assert_eq!(probe[0]["version"], u64::from(switchboard_protocol::PROTOCOL_VERSION));
    assert!(probe[0]["answered_ms"].as_f64().unwrap() > 0.0);
    assert!(probe[0]["clock_offset_ms"].as_i64().unwrap().abs() < 60_000, "{probe:?}");
    let human = sb_output(&nobody, &broker, &["probe"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("answered in"), "{human:?}");
    // It enrolled nothing: this home still has no device.
    let listed = sb_output(&nobody, &broker, &["conv", "list"]);
    assert!(String::from_utf8_lossy(&listed.stderr).contains("no device here yet"), "{listed:?}");
    let wrong = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", &nobody)
        .args(["--server", &broker.local_addr.to_string(), "--pin", &"00".repeat(32), "probe"])
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "a wrong pin is refused");
    // Saying what the broker presented, so the operator sees which side is wrong.
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains(&broker.fingerprint) && said.contains(&"00".repeat(32)), "{said}");
    // In words, not a Rust debug dump of rustls' wrapper.
    assert!(said.contains("the broker presented a certificate with sha256") && !said.contains("OtherError"), "{said}");
}

/// An operator's own certificate that names the broker by its address only is trusted by
/// `--ca` at that address: before, sb checked a loopback address as "localhost" and
/// refused it (an operator's trial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_certificate_naming_only_the_address_is_trusted_there() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["chat.example.org".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let mut config = common::test_config(dir.path().join("data"));
    config.cert = Some(cert_path.clone());
    config.key = Some(key_path);
    let broker = Broker::start(config).await.unwrap();
    let port = broker.local_addr.port();
    let probe = |server: String| {
        Command::new(env!("CARGO_BIN_EXE_sb"))
            .env("SWITCHBOARD_HOME", dir.path().join("nobody"))
            .args(["--server", &server, "--ca", cert_path.to_str().unwrap(), "probe"])
            .output()
            .unwrap()
    };
    let at_address = probe(format!("127.0.0.1:{port}"));
    assert!(at_address.status.success(), "{}", String::from_utf8_lossy(&at_address.stderr));
}

/// A broker at its connection limit refuses the probe's connection: `sb probe` says it
/// is up and full, with status 0 (an operator trial: it failed, "aborted by peer", and a
/// health check would have restarted the broker when it was busiest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_says_a_full_broker_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path().join("data"));
    config.max_connections = 1;
    let broker = Broker::start(config).await.unwrap();
    let connector = switchboard_client::Connector::new(
        broker.local_addr,
        "localhost",
        switchboard_client::Trust::CaFile(broker.cert_path.clone()),
    )
    .unwrap();
    let (held, _) = connector.register("alice", "correct horse battery", "d").await.unwrap();
    let nobody = dir.path().join("nobody");
    let probe = sb(&nobody, &broker, &["probe"]);
    assert_eq!((&probe[0]["event"], &probe[0]["full"]), (&serde_json::json!("probe"), &serde_json::json!(true)));
    let human = sb_output(&nobody, &broker, &["probe"]);
    assert!(human.status.success());
    assert!(
        String::from_utf8_lossy(&human.stdout)
            .contains("is up but refused this connection, as a broker at its connection limit"),
        "{human:?}"
    );
    drop(held);
}

/// `sb probe --timeout` bounds the wait for a broker that does not answer (a health
/// check's own deadline is often a second or two; the default is 10 s), naming the
/// address; a timeout out of range is refused before anything is sent.
#[test]
fn probe_gives_up_after_its_timeout() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let home = tempfile::tempdir().unwrap();
    let probe = |timeout: &str| {
        let started = std::time::Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_sb"))
            .env("SWITCHBOARD_HOME", home.path())
            .args(["--server", &silent.local_addr().unwrap().to_string(), "--pin", &"00".repeat(32)])
            .args(["probe", "--timeout", timeout])
            .output()
            .unwrap();
        (output, started.elapsed())
    };
    let (output, took) = probe("0.5");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("no broker answered at {} within 0.5 s", silent.local_addr().unwrap())),
        "{stderr}"
    );
    assert!(took < std::time::Duration::from_secs(5), "gave up after {took:?}, not at its timeout");
    for refused in ["0", "301", "soon"] {
        let (output, _) = probe(refused);
        assert_eq!(output.status.code(), Some(2), "--timeout {refused}: {output:?}");
    }
}

/// An sb interrupted while it connects exits at once (before, it waited 2 s for a close
/// that a connect cut short never finishes, and the operator trial reached for kill -9).
#[test]
fn an_interrupted_connect_exits_at_once() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let home = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", home.path())
        .args(["--server", &silent.local_addr().unwrap().to_string(), "--pin", &"00".repeat(32), "probe"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    let running = child.0.as_mut().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let signalled = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &running.id().to_string()]).status().unwrap().success());
    let status = running.wait().unwrap();
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(130), "as shells report a command a signal cut short");
    assert!(took < std::time::Duration::from_millis(1500), "exited {took:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_changes_the_password_and_signs_out_the_other_devices() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (laptop, phone) = (dir.path().join("laptop"), dir.path().join("phone"));
    sb(&laptop, &broker, &["register", "alice", "--device", "laptop"]);
    sb(&phone, &broker, &["login", "alice", "--device", "phone"]);
    let passwd = |home: &Path, current: &str, new: &str, args: &[&str]| {
        let mut command = sb_command(home, &broker);
        command.env("SWITCHBOARD_PASSWORD", current).env("SWITCHBOARD_NEW_PASSWORD", new);
        command.arg("passwd").args(args).output().unwrap()
    };
    let wrong = passwd(&laptop, "not my password", "a new passphrase", &[]);
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    // The request's answer, not a refused connection: nothing about re-enrolling.
    assert!(said.contains("AUTH_FAILED (5): wrong current password") && !said.contains("enroll"), "{said}");
    // Without a terminal both come from standard input, a line each.
    let mut piped = sb_command(&laptop, &broker);
    piped.env_remove("SWITCHBOARD_PASSWORD").env_remove("SWITCHBOARD_NEW_PASSWORD");
    piped.args(["passwd"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = piped.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"correct horse battery\na piped passphrase\n").unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let back = passwd(&laptop, "a piped passphrase", "correct horse battery", &[]);
    assert!(back.status.success(), "{back:?}");

    let changed = passwd(&laptop, "correct horse battery", "a new passphrase", &["--sign-out-others"]);
    assert!(changed.status.success(), "{changed:?}");
    assert!(String::from_utf8_lossy(&changed.stdout).contains("revoked its other devices"), "{changed:?}");
    let names: Vec<String> =
        sb(&laptop, &broker, &["devices"]).iter().map(|d| d["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(names, ["laptop"]);
    // The phone is signed out, and only the new password enrolls it again.
    assert!(!sb_output(&phone, &broker, &["devices"]).status.success());
    let old = sb_output(&phone, &broker, &["login", "alice"]);
    assert!(String::from_utf8_lossy(&old.stderr).contains("AUTH_FAILED"), "{old:?}");
    let mut login = sb_command(&phone, &broker);
    let again = login.env("SWITCHBOARD_PASSWORD", "a new passphrase").args(["login", "alice"]).output().unwrap();
    assert!(again.status.success(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_stops_a_stranger_and_unblock_lets_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, mallory) = (dir.path().join("alice"), dir.path().join("mallory"));
    sb(&alice, &broker, &["register", "alice"]);
    sb(&mallory, &broker, &["register", "mallory"]);
    let conv = sb(&mallory, &broker, &["conv", "create", "alice"])[0]["conv"].as_u64().unwrap().to_string();
    sb(&mallory, &broker, &["send", &conv, "hi"]);
    sb(&alice, &broker, &["block", "mallory"]);
    let listed = sb(&alice, &broker, &["block", "--list"]);
    assert_eq!(listed.iter().map(|b| b["name"].as_str().unwrap()).collect::<Vec<_>>(), ["mallory"]);
    assert_eq!(listed[0]["user_name"], "mallory", "{listed:?}");
    assert!(listed[0]["user_id"].as_u64().is_some(), "{listed:?}");
    let refused = sb_output(&mallory, &broker, &["send", &conv, "hello?"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("FORBIDDEN") && stderr.contains("alice does not accept messages from you"), "{stderr}");
    let again = sb_output(&alice, &broker, &["block", "mallory"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), "already blocked mallory\n", "{again:?}");
    let unblocked = sb(&alice, &broker, &["unblock", "mallory"]);
    assert_eq!(
        (&unblocked[0]["was_blocked"], &unblocked[0]["user_name"]),
        (&serde_json::json!(true), &serde_json::json!("mallory"))
    );
    let listed = sb(&alice, &broker, &["block", "--list"]);
    assert_eq!(listed, [serde_json::json!({"event": "no_blocked_users"})]);
    sb(&mallory, &broker, &["send", &conv, "sorry"]);
}

/// A new user's trial: an empty `conv list` or `block --list` printed nothing, an
/// `unblock` of someone never blocked said "unblocked", and `typing --seconds 0` was
/// taken (a typing indicator that ends as it starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lists_and_no_op_unblocks_say_so() {
    let (_dir, broker, alice, _bob) = alice_and_bob().await;
    let conversations = sb_output(&alice, &broker, &["conv", "list"]);
    assert!(conversations.status.success() && conversations.stdout.is_empty(), "{conversations:?}");
    assert_eq!(String::from_utf8_lossy(&conversations.stderr), "sb: no conversations yet\n");
    assert_eq!(sb(&alice, &broker, &["conv", "list"]), [serde_json::json!({"event": "no_conversations"})]);
    let blocked = sb_output(&alice, &broker, &["block", "--list"]);
    assert_eq!(String::from_utf8_lossy(&blocked.stderr), "sb: I block nobody\n", "{blocked:?}");
    let unblock = sb_output(&alice, &broker, &["unblock", "bob"]);
    assert!(unblock.status.success(), "{unblock:?}");
    assert_eq!(String::from_utf8_lossy(&unblock.stdout), "was not blocking bob\n");
    let conv = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap().to_string();
    let zero = sb_output(&alice, &broker, &["typing", &conv, "--seconds", "0"]);
    assert!(!zero.status.success(), "{zero:?}");
    assert!(String::from_utf8_lossy(&zero.stderr).contains("1..=3600"), "{zero:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_whose_answer_was_lost_sends_again_and_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path().join("data"));
    // Time between the write and its answer to cut the connection in.
    config.send_delay_target_ms = 0;
    config.commit_delay_us = 100_000;
    let broker = Broker::start(config).await.unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    sb(&alice, &broker, &["register", "alice"]);
    let bob_id = sb(&bob, &broker, &["register", "bob"])[0]["user_id"].as_u64().unwrap();
    let conv = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap();
    // Any other write ends the commit delay at once (a last-seen time written as
    // another client goes, say), so the answer may beat the cut: then try again.
    for attempt in 0..5 {
        let text = format!("once {attempt}");
        let before = broker.shared().store.last_seq(conv).unwrap();
        let child = sb_command(&bob, &broker)
            .args(["--json", "send", &conv.to_string(), &text])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The message is written and waits for its commit: the connection goes now, so
        // the answer never arrives (before, sb failed here although the message was
        // stored).
        let deadline = Instant::now() + Duration::from_secs(30);
        while broker.shared().store.last_seq(conv).unwrap() == before {
            assert!(Instant::now() < deadline, "the message never arrived");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for session in broker.shared().online.sessions(bob_id).into_iter().flat_map(|s| s.to_vec()) {
            session.conn.close(ErrorCode::GOING_AWAY.0.into(), b"cut");
        }
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines = json_lines(&out.stdout);
        let sent = lines.iter().find(|l| l.get("seq").is_some()).unwrap();
        assert_eq!(sent["seq"].as_u64(), Some(before + 1), "{lines:?}");
        let history = sb(&alice, &broker, &["history", &conv.to_string()]);
        assert_eq!(history.iter().filter(|e| e["text"] == text.as_str()).count(), 1, "{history:?}");
        if lines.iter().any(|l| l["event"] == "resending") {
            assert_eq!(sent["duplicate"].as_bool(), Some(true), "{lines:?}");
            return;
        }
        assert_eq!(sent["duplicate"].as_bool(), Some(false), "answered before the cut: {lines:?}");
    }
    panic!("the answer beat the cut five times");
}

/// A broker with its data in `dir/data`, and homes `dir/alice` and `dir/bob` registered
/// with a direct conversation between them: the broker, its data dir, the homes and the
/// conversation.
async fn a_broker_with_alice_and_bob_direct(dir: &Path) -> (Broker, PathBuf, PathBuf, PathBuf, u64) {
    let data_dir = dir.join("data");
    let broker = Broker::start(common::test_config(data_dir.clone())).await.unwrap();
    let (alice, bob) = (dir.join("alice"), dir.join("bob"));
    sb(&alice, &broker, &["register", "alice"]);
    sb(&bob, &broker, &["register", "bob"]);
    let conv = sb(&alice, &broker, &["conv", "create", "bob"])[0]["conv"].as_u64().unwrap();
    (broker, data_dir, alice, bob, conv)
}

/// `sb send` by a title rides out a broker that is down when it starts, as by a number
/// (before, the title's lookup failed at once on the first connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_by_title_rides_out_a_broker_that_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, data_dir, alice, bob, _) = a_broker_with_alice_and_bob_direct(dir.path()).await;
    let mut send = sb_command(&alice, &broker);
    send.args(["--json", "send", "bob", "while you were down"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let addr = broker.local_addr;
    broker.shutdown().await.unwrap();
    let child = send.spawn().unwrap();
    // Past the first connection's 10 s timeout: the lookup's connection fails.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let broker = common::restart_on(addr, data_dir).await;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let history = sb(&bob, &broker, &["history", "alice"]);
    assert_eq!(history.iter().filter(|e| e["text"] == "while you were down").count(), 1, "{history:?}");
}

/// `sb send` that never reached the broker says the message was not sent (before: "the
/// broker may have stored it"), and the command it prints, run as printed in a shell
/// with nothing set, reaches the same broker as the same device (before, it dropped
/// `--server`, `--ca` and `SWITCHBOARD_HOME`, so it went to the saved broker or another
/// home) with the same text (before: `TEXT`; a text starting with `-` stays a text) and
/// sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_a_broker_never_reached_says_not_sent_and_prints_a_command_that_works() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, data_dir, alice, bob, conv) = a_broker_with_alice_and_bob_direct(dir.path()).await;
    let text = "-it's down; see $HOME";
    let mut send = sb_command(&alice, &broker);
    send.args(["send", "--retry-for", "0.5", "--", &conv.to_string(), text]);
    let (addr, cert) = (broker.local_addr, broker.cert_path.clone());
    broker.shutdown().await.unwrap();
    let out = tokio::task::spawn_blocking(move || send.output().unwrap()).await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not sent (no attempt got as far as sending it)"), "{stderr}");
    let again = stderr.split('`').nth(1).unwrap_or_else(|| panic!("no command in: {stderr}"));
    let expected = format!("SWITCHBOARD_HOME={} sb --server {addr} --ca {}", alice.display(), cert.display());
    assert!(again.starts_with(&expected), "{again}");
    let broker = common::restart_on(addr, data_dir).await;
    // As a user would: pasted into a shell, with only SWITCHBOARD_HOME set.
    let mut shell = Command::new("sh");
    shell.args(["-c", again]).env_remove("SWITCHBOARD_HOME").env("PATH", sb_path());
    for _ in 0..2 {
        let out = shell.output().unwrap();
        assert!(out.status.success(), "{again}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let history = sb(&bob, &broker, &["history", "alice"]);
    assert_eq!(history.iter().filter(|e| e["text"] == text).count(), 1, "{history:?}");
}

/// `sb send` interrupted (Ctrl-C) while it waits for a broker that is down says what
/// became of the message and prints the command that sends it at most once, as running
/// out of `--retry-for` does. Before, it said only "interrupted".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_interrupted_while_retrying_says_not_sent_and_how_to_send_it() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _data_dir, alice, _bob, conv) = a_broker_with_alice_and_bob_direct(dir.path()).await;
    let mut send = sb_command(&alice, &broker);
    send.args(["send", "--retry-for", "60", "--", &conv.to_string(), "later"]).stderr(Stdio::piped());
    broker.shutdown().await.unwrap();
    let mut child = send.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let waiting = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("trying again") {
            line.clear();
        }
        (stderr, line)
    });
    let (mut stderr, line) = tokio::time::timeout(Duration::from_secs(30), waiting).await.unwrap().unwrap();
    assert!(line.contains("trying again"), "sb send ended before it retried: {line}");
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(status.code(), Some(130), "as a command Ctrl-C ended: {rest}");
    assert!(rest.contains("not sent (no attempt got as far as sending it)"), "{rest}");
    assert!(rest.contains("interrupted") && rest.contains("send --client-id"), "{rest}");
}

/// Mistakes a user makes are said before any work, in words: a conversation one is not
/// in before a whole file is uploaded to it or a typing signal vanishes, an `add` with
/// nobody to add, a server without a port; and a password comes from standard input
/// where there is no terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_are_said_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, carol) = (dir.path().join("alice"), dir.path().join("carol"));
    sb(&alice, &broker, &["register", "alice"]);
    // No SWITCHBOARD_PASSWORD and no terminal: the first line of standard input.
    let mut register = sb_command(&carol, &broker);
    register
        .env_remove("SWITCHBOARD_PASSWORD")
        .args(["register", "carol"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = register.stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"correct horse battery\n").unwrap();
    let registered = child.wait_with_output().unwrap();
    assert!(registered.status.success(), "{registered:?}");
    let conv =
        sb(&alice, &broker, &["conv", "create", "--title", "g", "alice"])[0]["conv"].as_u64().unwrap().to_string();

    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"private notes").unwrap();
    let upload = sb_output(&carol, &broker, &["upload", path.to_str().unwrap(), "--conv", &conv]);
    assert!(!upload.status.success());
    let said = String::from_utf8_lossy(&upload.stderr);
    assert!(said.contains("nothing uploaded") && said.contains("FORBIDDEN"), "{said}");
    let quota = sb(&carol, &broker, &["quota"]);
    assert_eq!(quota[0]["stored_bytes"], 0, "nothing was charged: {quota:?}");

    let typing = sb_output(&carol, &broker, &["typing", &conv, "--seconds", "1"]);
    assert!(!typing.status.success() && String::from_utf8_lossy(&typing.stderr).contains("FORBIDDEN"), "{typing:?}");
    // A conversation goes by its title too (before, "invalid digit found in string"),
    // a direct one by the other member's name; one the user has none of is said. A
    // group titled like a user name is written to by its number (anyone can name a
    // group after a user), and read by its title.
    let refused = sb_output(&alice, &broker, &["send", "g", "by title"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(refused.status.code() == Some(3) && said.contains("give the group's number"), "{said}");
    let sent = sb(&alice, &broker, &["send", &conv, "by number"]);
    assert_eq!(sent[0]["conv"].as_u64().unwrap().to_string(), conv);
    let history = sb(&alice, &broker, &["history", "g"]);
    assert!(history.iter().any(|e| e["text"] == "by number"), "{history:?}");
    let direct = sb(&alice, &broker, &["conv", "create", "carol"])[0]["conv"].as_u64().unwrap();
    assert_eq!(sb(&alice, &broker, &["send", "carol", "hi"])[0]["conv"].as_u64().unwrap(), direct);
    let read = sb(&carol, &broker, &["history", "alice"]);
    assert!(read.iter().any(|e| e["text"] == "hi"), "{read:?}");
    let titled = sb_output(&carol, &broker, &["history", "g"]);
    let said = String::from_utf8_lossy(&titled.stderr);
    assert!(!titled.status.success() && said.contains("none of my conversations is titled \"g\""), "{said}");
    let add = sb_output(&alice, &broker, &["conv", "add", &conv]);
    assert!(!add.status.success() && String::from_utf8_lossy(&add.stderr).contains("required"), "{add:?}");
    let portless = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", &alice)
        .args(["--server", "localhost", "conv", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&portless.stderr).contains("give a host and a UDP port"), "{portless:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_resumes_after_a_lost_connection() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    let alice_id = sb(&alice, &broker, &["register", "alice"])[0]["user_id"].as_u64().unwrap();
    let data = pseudo_random_bytes(16 * 1024 * 1024 + 7, 12);
    let path = dir.path().join("big.bin");
    std::fs::write(&path, &data).unwrap();
    let uploaded = sb(&alice, &broker, &["upload", path.to_str().unwrap()]);
    let id = event(&uploaded, "uploaded")["file"].as_str().unwrap().to_owned();

    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let target = downloads.join("copy.bin");
    let child = sb_command(&alice, &broker)
        .args(["--json", "download", &id, target.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Some bytes are in the new file beside OUT: the connection goes now.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let partial = std::fs::read_dir(&downloads).unwrap().flatten().find(|e| e.path() != target);
        if partial.is_some_and(|p| p.metadata().is_ok_and(|m| m.len() > 0)) {
            break;
        }
        assert!(Instant::now() < deadline, "the download never began");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for session in broker.shared().online.sessions(alice_id).into_iter().flat_map(|s| s.to_vec()) {
        session.conn.close(ErrorCode::GOING_AWAY.0.into(), b"cut");
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = json_lines(&out.stdout);
    let interrupted = event(&lines, "download_interrupted");
    assert!(interrupted["at"].as_u64().unwrap() > 0, "{lines:?}");
    assert_eq!(event(&lines, "downloaded")["verified"], true, "{lines:?}");
    assert!(std::fs::read(&target).unwrap() == data);
}

/// A file uploaded without a message is not lost track of: `sb files` lists it (from any
/// device of mine) until it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_lists_what_my_quota_counts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (laptop, phone) = (dir.path().join("laptop"), dir.path().join("phone"));
    sb(&laptop, &broker, &["register", "alice"]);
    sb(&phone, &broker, &["login", "alice"]);
    assert!(sb(&phone, &broker, &["files"]).iter().all(|l| l["event"] == "no_files"));
    let path = dir.path().join("report.pdf");
    std::fs::write(&path, b"%PDF-1.4 a report").unwrap();
    let uploaded = sb(&laptop, &broker, &["upload", path.to_str().unwrap(), "--no-send"]);
    let id = event(&uploaded, "uploaded")["file"].as_str().unwrap().to_owned();
    let listed = sb(&phone, &broker, &["files"]);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0]["file"].as_str(), listed[0]["name"].as_str()), (Some(id.as_str()), Some("report.pdf")));
    assert_eq!((listed[0]["size"].as_u64(), listed[0]["held"].as_bool()), (Some(17), Some(true)));
    // People read its size, and what the quota counts for it, in binary units.
    let human = sb_output(&phone, &broker, &["files"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("report.pdf  17 B (counts 4.00 KiB)"), "{text}");
    // No message carries it: sb says it is deleted, not that it waits for messages.
    let deleted = sb(&phone, &broker, &["file", "delete", &id]);
    assert_eq!(
        (deleted[0]["event"].as_str(), deleted[0]["carried"].as_bool()),
        (Some("deleted"), Some(false)),
        "{deleted:?}"
    );
    // A script named as a picture is refused, and sb says how to send it anyway.
    let script = dir.path().join("evil.png");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let refused = sb_output(&phone, &broker, &["upload", script.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("TYPE_MISMATCH") && said.contains("--type application/octet-stream"), "{said}");
    // Not held any more: listed as such until collected, then gone.
    let after = sb(&laptop, &broker, &["files"]);
    assert!(after.iter().all(|l| l["event"] == "no_files"), "nothing carries it: deleted at once: {after:?}");
}

/// A broker whose certificate sb does not trust is refused at once, saying what to check
/// (before: `sb send` retried it as a lost connection, 25 lines over its 30 s, then
/// printed a command with the same `--ca`); nothing was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_said_at_once_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let other = Broker::start(common::test_config(dir.path().join("other"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "g", "alice"])[0]["conv"].as_u64().unwrap();
    let mut send = Command::new(env!("CARGO_BIN_EXE_sb"));
    send.env("SWITCHBOARD_HOME", &alice).args(["--server", &broker.local_addr.to_string()]);
    send.args(["--ca", other.cert_path.to_str().unwrap(), "send", "--", &conv.to_string(), "hi"]);
    let out = tokio::task::spawn_blocking(move || send.output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("certificate is not trusted") && stderr.contains("check --ca"), "{stderr}");
    assert!(!stderr.contains("again"), "refused at once, not retried: {stderr}");
    // Nothing was sent: no command to send it with the same --ca that was just refused.
    assert!(!stderr.contains("--client-id"), "{stderr}");
    let history = sb(&alice, &broker, &["history", &conv.to_string()]);
    assert!(!history.iter().any(|e| e["text"] == "hi"), "{history:?}");
}

/// A send the broker answered `INTERNAL` (here a failed commit) may be stored all the
/// same (PROTOCOL.md: after it nothing unacknowledged can be assumed done): sb tries again
/// within --retry-for, then says it may be stored and gives the command that sends it at
/// most once. Before, only the error: a rerun under a fresh id could store it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_the_broker_failed_on_may_be_stored_and_sb_says_how_to_resend_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "g", "alice"])[0]["conv"].as_u64().unwrap();
    broker.shared().store.inject_commit_failure();
    let out = sb_output(&alice, &broker, &["send", "--retry-for", "2", "--", &conv.to_string(), "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("may have stored it") && stderr.contains("--client-id"), "{stderr}");
}

/// `sb send --retry-for` bounds each attempt's wait for its answer too: a send the broker
/// stored and never answered (its commit held) is given up within `--retry-for`, saying it
/// may be stored and how to send it again at most once. Before, an attempt waited for its
/// answer as long as the connection lived (up to the client's 60 s of silence): here it
/// reported the send done when the hold let go, 20 s later, against `--retry-for 5`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_never_answered_is_given_up_within_retry_for() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let (broker, _data_dir, alice, bob, conv) = a_broker_with_alice_and_bob_direct(dir.path()).await;
    let before = broker.shared().store.last_seq(conv).unwrap();
    // Commits go on (sb's connection, its login) until the message is written; then
    // they wait, so the message is never acknowledged while the hold lasts (20 s at most).
    let hold = std::sync::Arc::new(AtomicBool::new(true));
    let (held, store) = (hold.clone(), std::sync::Arc::downgrade(&broker.shared().store));
    broker.shared().store.on_commit_started(Box::new(move |_| {
        let started = Instant::now();
        let Some(store) = store.upgrade() else { return };
        while held.load(SeqCst)
            && store.last_seq(conv).is_ok_and(|seq| seq > before)
            && started.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }));
    let started = Instant::now();
    let mut send = sb_command(&alice, &broker);
    send.args(["send", "--retry-for", "5", "--", &conv.to_string(), "held"]);
    let out = tokio::task::spawn_blocking(move || send.output().unwrap()).await.unwrap();
    let took = started.elapsed();
    hold.store(false, SeqCst);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "answered after {took:?}: {stderr}");
    assert!(stderr.contains("may have stored it") && stderr.contains("--client-id"), "{stderr}");
    assert!(stderr.contains("no answer within --retry-for"), "{stderr}");
    assert!(took < Duration::from_secs(15), "given up after {took:?}, not within --retry-for: {stderr}");
    // It was stored: the command printed sends it again at most once.
    let again = stderr.split('`').nth(1).unwrap_or_else(|| panic!("no command in: {stderr}"));
    let out = Command::new("sh").args(["-c", again]).env("PATH", sb_path()).output().unwrap();
    assert!(out.status.success(), "{again}: {}", String::from_utf8_lossy(&out.stderr));
    let history = sb(&bob, &broker, &["history", "alice"]);
    assert_eq!(history.iter().filter(|e| e["text"] == "held").count(), 1, "{history:?}");
}

/// `PATH` with the `sb` under test first, for a command printed to be run as printed.
fn sb_path() -> String {
    let sb_dir = std::path::Path::new(env!("CARGO_BIN_EXE_sb")).parent().unwrap().to_owned();
    format!("{}:{}", sb_dir.display(), std::env::var("PATH").unwrap_or_default())
}

/// `sb tail | head -1`: once its reader has gone the tail stops, status 141, before it
/// takes another entry, so the next tail prints what came after. Before, it went on for
/// good with nobody reading, reporting every later message delivered and moving its
/// saved cursor past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_whose_reader_went_away_stops_and_leaves_the_rest_to_the_next() {
    let (_dir, broker, alice, bob) = alice_and_bob().await;
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "g", "bob"])[0]["conv"].as_u64().unwrap();
    let send = |text: &str| sb(&alice, &broker, &["send", &conv.to_string(), text])[0]["seq"].as_u64().unwrap();
    let first = send("first");
    let (mut tail, mut lines) = spawn_tail(&bob);
    entries_until(&mut lines, conv, first);
    drop(lines);
    // Noticed with nothing to write.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = tail.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            tail.kill().unwrap();
            panic!("sb tail went on with nobody reading");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(141));
    let later = send("later");
    let (mut again, mut lines) = spawn_tail(&bob);
    let entries = entries_until(&mut lines, conv, later);
    again.kill().unwrap();
    let _ = again.wait();
    let seqs: Vec<u64> = entries.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![later], "what the first tail printed, not again; what came after, once");
}

/// A reader that goes away (`sb history | head`) ends sb as SIGPIPE ends other tools,
/// status 141 and no panic (before: `println!` panicked, status 101, with a backtrace
/// where RUST_BACKTRACE is set), once the command is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_output_pipe_ends_sb_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let alice = dir.path().join("alice");
    sb(&alice, &broker, &["register", "alice"]);
    let mut list = sb_command(&alice, &broker);
    list.env("RUST_BACKTRACE", "1").args(["conv", "create", "--title", "g", "alice"]);
    let out = tokio::task::spawn_blocking(move || {
        let mut child = list.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop(child.stdout.take());
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // What it was asked to do was done all the same.
    let listed = sb(&alice, &broker, &["conv", "list"]);
    assert!(listed.iter().any(|c| c["title"] == "g"), "{listed:?}");
}

/// `sb typing` rides out a broker restart: it says the connection was lost, connects
/// again and says it is typing again (the restarted broker forgot it), until its time
/// is up or it is interrupted. Before, it ended with the connection's error (a new
/// user's trial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_rides_out_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, data_dir, alice, _bob, conv) = a_broker_with_alice_and_bob_direct(dir.path()).await;
    let mut typing = sb_command(&alice, &broker);
    typing
        .args(["--json", "typing", &conv.to_string(), "--seconds", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut typing = typing.spawn().unwrap();
    // Its lines, read on a thread of their own so that every wait has a deadline.
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let lines = BufReader::new(typing.stdout.take().unwrap()).lines();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    let next = |event: &'static str| {
        let rx = rx.clone();
        tokio::task::spawn_blocking(move || {
            let rx = rx.lock().unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let value = rx.recv_timeout(left).unwrap_or_else(|e| panic!("no {event} line ({e})"));
                if value["event"] == event {
                    return value;
                }
            }
        })
    };
    assert_eq!(next("typing").await.unwrap()["typing"], true);
    let addr = broker.local_addr;
    broker.shutdown().await.unwrap();
    next("disconnected").await.unwrap();
    let broker = common::restart_on(addr, data_dir).await;
    next("connected").await.unwrap();
    tokio::task::spawn_blocking(move || interrupt(typing)).await.unwrap();
    assert_eq!(next("typing").await.unwrap()["typing"], false, "stopped once interrupted");
    drop(broker);
}

/// `sb receipts` shows who received and read what, and `sb settings --private-reads on`
/// hides my read marks from the others (not from my own devices). Before, only `sb tail`
/// showed receipts, and no command changed the setting (a new user's trial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_and_the_private_reads_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _data_dir, alice, bob, conv) = a_broker_with_alice_and_bob_direct(dir.path()).await;
    let c = conv.to_string();
    let seq = sb(&alice, &broker, &["send", &c, "hello"])[0]["seq"].as_u64().unwrap();
    sb(&bob, &broker, &["read", &c, &seq.to_string()]);
    let of = |rows: Vec<serde_json::Value>, who: &str| rows.into_iter().find(|r| r["user_name"] == who).unwrap();
    let shown = of(sb(&alice, &broker, &["receipts", &c]), "bob");
    assert_eq!((shown["delivered_up_to"].as_u64(), shown["read_up_to"].as_u64()), (Some(seq), Some(seq)));
    assert_eq!(sb(&bob, &broker, &["settings"])[0]["read_receipts_private"], false);
    assert_eq!(sb(&bob, &broker, &["settings", "--private-reads", "on"])[0]["read_receipts_private"], true);
    let hidden = of(sb(&alice, &broker, &["receipts", &c]), "bob");
    assert_eq!((hidden["delivered_up_to"].as_u64(), hidden["read_up_to"].is_null()), (Some(seq), true));
    let own = of(sb(&bob, &broker, &["receipts", &c]), "bob");
    assert_eq!(own["read_up_to"].as_u64(), Some(seq), "my own devices see my read mark");
    let human = String::from_utf8_lossy(&sb_output(&alice, &broker, &["receipts", &c]).stdout).into_owned();
    assert!(human.contains("bob  delivered up to #") && human.contains("read up to private"), "{human}");
}

/// sb's exit status says what the broker refused (README, "Exit status"), so a script
/// need not read the message: 3 for a user nobody is, 7 for a conversation that is not
/// mine, 8 for a wrong password, 2 for a command line sb cannot use. Before, every
/// failure exited 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exit_status_says_what_was_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(common::test_config(dir.path().join("data"))).await.unwrap();
    let (alice, stranger) = (dir.path().join("alice"), dir.path().join("stranger"));
    sb(&alice, &broker, &["register", "alice"]);
    let status = |home: &Path, args: &[&str]| sb_output(home, &broker, args).status.code();
    assert_eq!(status(&alice, &["conv", "create", "nobody"]), Some(3));
    // sb's own lookups that find nothing say so the same way (they exited 1, and
    // `presence` of an unknown name 0).
    assert_eq!(status(&alice, &["history", "no such title"]), Some(3));
    assert_eq!(status(&alice, &["presence", "nobody"]), Some(3));
    // sb's own checks say the broker's codes too: a home enrolled already (4), a text
    // the broker would refuse (5), a command line it cannot use (2); they exited 1.
    assert_eq!(status(&alice, &["register", "alice2"]), Some(4));
    assert_eq!(status(&alice, &["send", "1", ""]), Some(5));
    let fresh = dir.path().join("fresh");
    let addr = broker.local_addr.to_string();
    for args in
        [["--server", addr.as_str(), "--pin", "deadbeef", "probe"], ["--server", "127.0.0.1", "--pin", "00", "probe"]]
    {
        let out = Command::new(env!("CARGO_BIN_EXE_sb")).env("SWITCHBOARD_HOME", &fresh).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(status(&alice, &["history", "424242"]), Some(7));
    let wrong = sb_command(&stranger, &broker)
        .env("SWITCHBOARD_PASSWORD", "not alice's password")
        .args(["login", "alice"])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(8), "{}", String::from_utf8_lossy(&wrong.stderr));
    // A file id or key of the wrong form and a setting other than on/off are refused as
    // a mistyped command line (2), and sb's own refusals of what the broker would refuse
    // with the status of its code: a group's command on a direct conversation (5), a
    // range past the end (5), a cancel of a complete file (the broker's `NOT_FOUND`, 3).
    // Each exited 1 before (a trial).
    assert_eq!(status(&alice, &["download", "00", "-"]), Some(2), "not a file id");
    assert_eq!(status(&alice, &["file", "info", "nothex"]), Some(2));
    assert_eq!(status(&alice, &["send", "1", "hi", "--client-id", "xyz"]), Some(2));
    assert_eq!(status(&alice, &["settings", "--private-reads", "yes"]), Some(2));
    let bob = dir.path().join("bob");
    sb(&bob, &broker, &["register", "bob"]);
    sb(&alice, &broker, &["conv", "create", "bob"]);
    assert_eq!(status(&alice, &["conv", "remove", "bob", "bob"]), Some(5));
    let file = uploaded(&alice, &broker, &dir.path().join("five.txt"), b"12345");
    let out = dir.path().join("out.txt");
    assert_eq!(status(&alice, &["download", &file, out.to_str().unwrap(), "--offset", "5"]), Some(5));
    assert!(!out.exists());
    assert_eq!(status(&alice, &["file", "cancel", &file]), Some(3));
}
