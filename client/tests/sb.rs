//! The `sb` command line against a real broker (in this test process, real QUIC).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use switchboard_broker::{Broker, Config};

fn sb(home: &Path, broker: &Broker, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_sb"))
        .env("SWITCHBOARD_HOME", home)
        .env("SWITCHBOARD_PASSWORD", "correct horse battery")
        .args(["--server", &broker.local_addr.to_string(), "--ca", broker.cert_path.to_str().unwrap(), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "sb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
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
