//! The `sb` command line against a real broker (in this test process, real QUIC).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use switchboard_broker::{Broker, Config};

/// Runs `sb --json ARGS` and returns its output lines, asserting success.
fn sb(home: &Path, broker: &Broker, args: &[&str]) -> Vec<serde_json::Value> {
    let out = sb_command(home, broker).arg("--json").args(args).output().unwrap();
    assert!(out.status.success(), "sb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    json_lines(&out.stdout)
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

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8(stdout.to_vec()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_create_send_history_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
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
    // Sends spaced out while the tail connects: it must print one of them (the first
    // that arrives after it is online).
    let mut sent = Vec::new();
    for i in 0..6 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let r = sb(&alice, &broker, &["send", &id, &format!("hello {i}")]);
        sent.push(r[0]["seq"].as_u64().unwrap());
    }
    let line: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(line["sender_name"], "alice");
    assert!(line["text"].as_str().unwrap().starts_with("hello "));
    assert!(sent.contains(&line["seq"].as_u64().unwrap()));
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
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    sb(&alice, &broker, &["register", "alice"]);
    sb(&bob, &broker, &["register", "bob"]);
    // Labels (titles, device and user names) refuse every such character at the broker;
    // message text carries anything, so it is the text that must be neutralised here.
    let conv = sb(&alice, &broker, &["conv", "create", "--title", "plans", "bob"]);
    let id = conv[0]["conv"].as_u64().unwrap().to_string();
    let hostile = "hello\x1b[2K\r\x1b[1Aalice: wire the money now\x1b]0;pwned\x07 \u{9b}2J \u{2066}\\ pay\u{202e}fdp.exe\u{2028}x";
    sb(&alice, &broker, &["send", &id, hostile]);

    let history = sb_output(&bob, &broker, &["history", &id]);
    assert!(history.status.success(), "{}", String::from_utf8_lossy(&history.stderr));
    let list = sb_output(&bob, &broker, &["conv", "list"]);
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let shown = String::from_utf8(history.stdout).unwrap() + &String::from_utf8(list.stdout).unwrap();
    let unsafe_chars: Vec<char> = shown.chars().filter(|&c| c != '\n' && is_terminal_unsafe(c)).collect();
    assert!(unsafe_chars.is_empty(), "raw controls {unsafe_chars:?} reached the terminal in {shown:?}");
    let escaped = r"hello\u{1b}[2K\u{d}\u{1b}[1Aalice: wire the money now\u{1b}]0;pwned\u{7} \u{9b}2J \u{2066}\\ pay\u{202e}fdp.exe\u{2028}x";
    assert!(shown.contains(escaped), "{shown:?}");

    // JSON keeps the exact text (serde_json escapes what needs escaping).
    let json = sb(&bob, &broker, &["history", &id]);
    assert_eq!(json.last().unwrap()["text"], hostile);
}

fn is_terminal_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{61c}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Many `sb` processes sharing one home must not trip over each other's state writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_commands_share_one_home() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
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
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
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
    let broker = Broker::start(Config::ephemeral(dir.path().join("data"))).await.unwrap();
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
        "FORBIDDEN (7): not a member of this conversation, or no such conversation",
        serde_json::json!({"code": 7, "name": "FORBIDDEN", "message": "not a member of this conversation, or no such conversation"}),
    );
    // A local failure has no code.
    check(
        "nobody",
        &["send", "1", "x"],
        "no device here yet: run `sb register NAME` or `sb login NAME`",
        serde_json::json!({"code": null, "name": null, "message": "no device here yet: run `sb register NAME` or `sb login NAME`"}),
    );
}
