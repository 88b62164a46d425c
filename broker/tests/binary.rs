//! The real `switchboard` binary: zero-config start, clean stop on SIGTERM, and no
//! acknowledged message lost (nor any retried one stored twice) when the process is
//! killed outright.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use switchboard_client::{ClientError, Connector, Trust};
use switchboard_protocol::{Body, Page};

struct Running {
    child: Child,
    addr: std::net::SocketAddr,
    cert: std::path::PathBuf,
    fingerprint: String,
    /// The Prometheus endpoint, when `--metrics-listen` asked for one.
    metrics: Option<std::net::SocketAddr>,
}

/// A test that fails leaves no broker behind.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Running {
    start_with(dir, &[])
}

fn start_with(dir: &Path, extra: &[&str]) -> Running {
    start_at(dir, "127.0.0.1:0", extra)
}

fn start_at(dir: &Path, listen: &str, extra: &[&str]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", listen])
        .args(extra)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut addr, mut cert, mut fingerprint, mut metrics) = (None, None, None, None);
    while fingerprint.is_none() {
        let line = lines.next().expect("broker printed its address, certificate and fingerprint").unwrap();
        if let Some(a) = line.strip_prefix("switchboard listening on ") {
            addr = Some(a.parse().unwrap());
        } else if let Some(c) = line.strip_prefix("certificate: ") {
            cert = Some(dir.join(c));
        } else if let Some(m) = line.strip_prefix("metrics: http://") {
            metrics = Some(m.trim_end_matches("/metrics").parse().unwrap());
        } else if let Some(f) = line.strip_prefix("certificate sha256: ") {
            fingerprint = Some(f.to_owned());
        }
    }
    // Keep draining stdout so the broker never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Running { child, addr: addr.unwrap(), cert: cert.unwrap(), fingerprint: fingerprint.unwrap(), metrics }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn zero_config_start_and_clean_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path());
    // Defaults: data in ./switchboard-data with a generated certificate.
    assert!(dir.path().join("switchboard-data/cert.pem").exists());
    assert!(dir.path().join("switchboard-data/key.pem").exists());
    assert_eq!(broker.fingerprint.len(), 64);
    // Both trust modes reach it.
    let pinned = Connector::new(broker.addr, "localhost", Trust::Pin(broker.fingerprint.clone())).unwrap();
    let (client, _) = pinned.register("alice", "correct horse battery", "laptop").await.unwrap();
    client.ping().await.unwrap();
    let ca = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    ca.register("bob", "correct horse battery", "laptop").await.unwrap();
    // A wrong pin is refused by the client, as a certificate it does not trust (not a
    // failure to connect, which a client would retry).
    let wrong = Connector::new(broker.addr, "localhost", Trust::Pin("00".repeat(32))).unwrap();
    let refused = wrong.register("carol", "correct horse battery", "x").await.map(|_| ()).unwrap_err();
    assert!(matches!(refused, ClientError::Untrusted(_)), "{refused:?}");

    signal(&broker.child, "-TERM");
    // Connected clients are told the broker is going away.
    let closed = tokio::time::timeout(Duration::from_secs(10), client.closed()).await.unwrap();
    assert_eq!(closed.code(), Some(switchboard_protocol::ErrorCode::GOING_AWAY));
    let status = broker.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn sigkill_loses_no_acknowledged_message_and_retries_stay_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path());
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let (alice, alice_id) = connector.register("alice", "correct horse battery", "laptop").await.unwrap();
    connector.register("bob", "correct horse battery", "phone").await.unwrap();
    let conv = alice.create_group("crash", &["bob".into()]).await.unwrap().id;
    let alice = std::sync::Arc::new(alice);
    let client_id = |t: u64, i: u64| {
        // Never all zero (refused `INVALID`): tasks count from 1.
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(t + 1).to_be_bytes());
        id[8..].copy_from_slice(&i.to_be_bytes());
        id
    };
    // Pipelined senders; the broker is killed while they are running. Each keeps what
    // was acknowledged and the one request the kill left unanswered.
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8u64 {
        let alice = alice.clone();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10_000 {
                let text = format!("t{t} m{i}");
                match alice.send_with_id(conv, client_id(t, i), &text).await {
                    Ok((seq, _)) => acked.push(seq),
                    Err(_) => return (acked, Some((client_id(t, i), text))),
                }
            }
            (acked, None)
        });
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&broker.child, "-KILL");
    let _ = broker.child.wait();
    // Requests in flight at the kill are unacknowledged: stop waiting for them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.close();
    let (acked, unanswered): (Vec<Vec<u64>>, Vec<_>) = tasks.join_all().await.into_iter().unzip();
    let acked: Vec<u64> = acked.into_iter().flatten().collect();
    assert!(acked.len() > 50, "the broker was killed mid-stream after {} acks", acked.len());

    let broker = start(dir.path());
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let alice = connector.connect(&alice_id).await.unwrap();
    // A client retries what went unanswered with the same ids: whether or not the write
    // survived the crash, each ends up stored exactly once.
    let mut retried = Vec::new();
    for (id, text) in unanswered.into_iter().flatten() {
        let (seq, _) = alice.send_with_id(conv, id, &text).await.unwrap();
        retried.push((seq, text));
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let (page, _) = alice.history(conv, Page::After(after), 200).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().unwrap().seq;
        seen.extend(page.into_iter().map(|e| match e.body {
            Body::Text { text, .. } => (e.seq, text),
            _ => (e.seq, String::new()),
        }));
    }
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=seen.len() as u64).collect::<Vec<_>>(), "seqs stay gapless after a crash");
    for seq in &acked {
        assert!(seqs.contains(seq), "acknowledged seq {seq} was lost");
    }
    let mut texts: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).filter(|t| !t.is_empty()).collect();
    texts.sort_unstable();
    let stored = texts.len();
    texts.dedup();
    assert_eq!(texts.len(), stored, "a message was stored twice");
    for (seq, text) in &retried {
        assert!(
            seen.contains(&(*seq, text.clone())),
            "the retry of {text:?} answered seq {seq}, which holds another entry"
        );
    }
    let mut broker = broker;
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
}

/// Reads one transfer reply from `recv` into `buf` (bytes left over stay in `buf`).
async fn transfer_reply(
    recv: &mut quinn::RecvStream,
    decoder: &mut switchboard_protocol::FrameDecoder,
) -> Option<switchboard_protocol::TransferReply> {
    loop {
        if let Some(body) = decoder.next_frame().unwrap() {
            return Some(switchboard_protocol::decode(&body).unwrap());
        }
        match tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(64 * 1024, true)).await.unwrap() {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            _ => return None,
        }
    }
}

/// Streams `data` from `from` on a new transfer stream, at most two chunks beyond the
/// durable offset, until the stream ends or `stop` says so; returns every durable
/// offset reported and the final reply.
async fn stream_upload(
    conn: &quinn::Connection,
    file: switchboard_protocol::FileId,
    data: &[u8],
    from: u64,
    mut stop: impl FnMut(u64) -> bool,
) -> (Vec<u64>, Option<switchboard_protocol::TransferReply>) {
    use switchboard_protocol::{Chunk, TransferOpen, TransferReply, encode_frame};
    const CHUNK: u64 = 128 * 1024;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_frame(&TransferOpen::Upload { file, offset: from }).unwrap()).await.unwrap();
    let mut decoder = switchboard_protocol::FrameDecoder::new(1 << 20);
    assert_eq!(transfer_reply(&mut recv, &mut decoder).await, Some(TransferReply::Accepted { offset: from }));
    let (mut sent, mut durable, mut seen) = (from, from, Vec::new());
    loop {
        while sent < data.len() as u64 && sent < durable + 2 * CHUNK {
            let end = (sent + CHUNK).min(data.len() as u64);
            let part = &data[sent as usize..end as usize];
            let chunk = Chunk::new(sent, bytes::Bytes::copy_from_slice(part));
            if send.write_all(&encode_frame(&chunk).unwrap()).await.is_err() {
                return (seen, None);
            }
            sent = end;
        }
        match transfer_reply(&mut recv, &mut decoder).await {
            Some(TransferReply::Durable { offset }) => {
                durable = offset;
                seen.push(offset);
                if stop(offset) {
                    return (seen, None);
                }
            }
            other => return (seen, other),
        }
    }
}

/// A broker killed outright and started again on the same address and data dir answers
/// its old connections' packets with a stateless reset they recognise (its reset key is
/// kept in the data dir), so a client learns at its next packet that its connection is
/// gone, instead of waiting out its 30 s idle timeout. With a fresh key per start the
/// client ignores the reset and the connection ends only by that timeout.
#[tokio::test]
async fn a_client_of_a_killed_broker_learns_at_once_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path());
    let addr = broker.addr;
    let connector = Connector::new(addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let (alice, _) = connector.register("alice", "correct horse battery", "laptop").await.unwrap();
    alice.ping().await.unwrap();
    signal(&broker.child, "-KILL");
    let _ = broker.child.wait();
    let mut broker = start_at(dir.path(), &addr.to_string(), &[]);
    assert_eq!(broker.addr, addr);
    // The next packet (a request, or quinn's retransmission of it) draws the reset.
    let conn = alice.connection().clone();
    let _ = tokio::time::timeout(Duration::from_secs(1), alice.ping()).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::Reset)),
        "expected a stateless reset well within the 30 s idle timeout, got {closed:?}"
    );
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
}

#[tokio::test]
async fn sigkill_mid_upload_keeps_every_offset_reported_durable() {
    use switchboard_protocol::{NewUpload, Reply, RequestBody, TransferReply};
    let dir = tempfile::tempdir().unwrap();
    // The test machine's disk may have less free space than the default reserve.
    std::fs::write(dir.path().join("files.toml"), "disk_reserve_bytes = 0\n").unwrap();
    let mut broker = start_with(dir.path(), &["--config", "files.toml"]);
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let (alice, alice_id) = connector.register("alice", "correct horse battery", "laptop").await.unwrap();
    let data: Vec<u8> = (0..6 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let new = NewUpload {
        name: "crash.bin".into(),
        size: data.len() as u64,
        content_type: "application/octet-stream".into(),
        blake3: *blake3::hash(&data).as_bytes(),
    };
    let Reply::Upload(begun) = alice.request(RequestBody::BeginUpload(new)).await.unwrap() else { panic!() };
    // Killed outright while chunks are in flight, past a third of the file.
    let (durable, _) = stream_upload(alice.connection(), begun.file, &data, 0, |o| o >= 2 * 1024 * 1024).await;
    signal(&broker.child, "-KILL");
    let _ = broker.child.wait();
    alice.close();
    let reported = *durable.last().unwrap();

    let broker = start_with(dir.path(), &["--config", "files.toml"]);
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let alice = connector.connect(&alice_id).await.unwrap();
    let Reply::Upload(status) = alice.request(RequestBody::UploadStatus { file: begun.file }).await.unwrap() else {
        panic!()
    };
    assert!(status.offset >= reported, "reported durable at {reported}, recovered at {}", status.offset);
    assert!(!status.complete);
    let (_, last) = stream_upload(alice.connection(), begun.file, &data, status.offset, |_| false).await;
    match last {
        Some(TransferReply::Complete(f)) => assert_eq!(f.size, data.len() as u64),
        other => panic!("expected Complete, got {other:?}"),
    }
    let mut broker = broker;
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
}

#[tokio::test]
async fn operators_add_users_when_registration_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let user_add = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["user", "add", name, "--new-store"])
            .current_dir(dir.path())
            .env("SWITCHBOARD_PASSWORD", "correct horse battery")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    assert!(user_add("carol").success());
    // The same name twice is refused, with the status for a name taken; a name outside
    // the rules has its own (`admin::exit_status`).
    assert_eq!(user_add("carol").code(), Some(4));
    assert_eq!(user_add("Carol Smith").code(), Some(5));

    let mut broker = start_with(dir.path(), &["--closed-registration"]);
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let refused = connector.register("mallory", "correct horse battery", "x").await.err().unwrap();
    assert_eq!(refused.code(), Some(switchboard_protocol::ErrorCode::REGISTRATION_CLOSED));
    let (carol, _) = connector.login("carol", "correct horse battery", "laptop").await.unwrap();
    assert_eq!(carol.devices().await.unwrap().len(), 1);
    drop(carol);
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
}

/// Runs `switchboard ARGS` on `dir` to its end, password from the environment.
fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .current_dir(dir)
        .env("SWITCHBOARD_PASSWORD", "correct horse battery")
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// A data dir that is a file is refused as not a directory (it was "creating PATH: File
/// exists", an operator trial).
#[test]
fn a_data_dir_that_is_a_file_is_refused_as_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("afile"), b"not a directory").unwrap();
    let out = run(dir.path(), &["--listen", "127.0.0.1:0", "--data", "afile"]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("afile: not a directory"), "{said}");
}

/// An operator command on a data dir with no store (a mistyped `--data`) is refused and
/// makes nothing there; only `user add --new-store` makes a store (before: `user add`
/// made an account in a new store no broker read, and `user list` printed nothing).
#[test]
fn operator_commands_refuse_a_data_dir_with_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("switchbaord-data");
    let typo_arg = typo.to_str().unwrap();
    for args in [
        &["user", "add", "frank"][..],
        &["user", "list"],
        &["user", "disable", "frank"],
        &["user", "passwd", "frank"],
        &["device", "list", "frank"],
    ] {
        let out = run(dir.path(), &[&["--data", typo_arg][..], args].concat());
        assert!(!out.status.success(), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("no store in") && said.contains("--new-store"), "{args:?}: {said}");
        assert!(!typo.exists(), "{args:?} made {}", typo.display());
    }
    let made = run(dir.path(), &["--data", typo_arg, "user", "add", "frank", "--new-store"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let listed = run(dir.path(), &["--data", typo_arg, "user", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("frank"));
}

/// Device ids `switchboard device list USER` prints, one per line, first column.
fn listed_devices(dir: &Path, user: &str) -> Vec<u64> {
    let out = run(dir, &["device", "list", user]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect()
}

#[tokio::test]
async fn operators_list_and_revoke_devices_while_the_broker_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(dir.path(), &["user", "add", "carol", "--new-store"]).status.success());
    let mut broker = start(dir.path());
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let (laptop, laptop_id) = connector.login("carol", "correct horse battery", "laptop").await.unwrap();
    let (phone, phone_id) = connector.login("carol", "correct horse battery", "phone").await.unwrap();
    drop((laptop, phone));
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());

    assert_eq!(listed_devices(dir.path(), "carol"), vec![laptop_id.device_id, phone_id.device_id]);
    let phone = phone_id.device_id.to_string();
    assert!(run(dir.path(), &["device", "revoke", "carol", &phone]).status.success());
    assert_eq!(run(dir.path(), &["device", "revoke", "carol", &phone]).status.code(), Some(3), "revoked twice");
    let unknown = run(dir.path(), &["device", "list", "nobody"]);
    assert_eq!(unknown.status.code(), Some(3), "an unknown user");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("NOT_FOUND (8): no user \"nobody\""));
    assert_eq!(listed_devices(dir.path(), "carol"), vec![laptop_id.device_id]);

    let mut broker = start(dir.path());
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let refused = connector.connect(&phone_id).await.err().unwrap();
    assert_eq!(refused.code(), Some(switchboard_protocol::ErrorCode::DEVICE_REVOKED));
    connector.connect(&laptop_id).await.unwrap().ping().await.unwrap();
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
}

/// Starts the broker with `RUST_LOG=info`, stops it with SIGTERM and returns what it
/// wrote to stdout and to stderr (both piped, so neither is a terminal).
fn logs_of_one_run(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    logs_of_a_run(dir, &[], Duration::ZERO)
}

/// `logs_of_one_run` with `extra` arguments, stopped `linger` after it said it listens.
fn logs_of_a_run(dir: &Path, extra: &[&str], linger: Duration) -> (Vec<u8>, Vec<u8>) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(extra)
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut all = Vec::new();
        stderr.read_to_end(&mut all).unwrap();
        all
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the broker exited before listening");
        out.extend_from_slice(line.as_bytes());
        if line.contains("certificate sha256: ") {
            break;
        }
    }
    std::thread::sleep(linger);
    signal(&child, "-TERM");
    stdout.read_to_end(&mut out).unwrap();
    assert!(child.wait().unwrap().success());
    (out, err.join().unwrap())
}

#[test]
fn logs_are_plain_text_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = logs_of_one_run(dir.path());
    assert!(!out.contains(&0x1b) && !err.contains(&0x1b), "colour codes in piped output");
    let err = String::from_utf8(err).unwrap();
    assert!(err.contains("listening"), "log lines go to stderr: {err:?}");
    assert!(!String::from_utf8(out).unwrap().contains(" INFO "), "log lines stay off stdout");
}

#[test]
fn json_logs_are_one_object_per_line_with_the_fields_at_the_top() {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = logs_of_a_run(dir.path(), &["--log-format", "json"], Duration::ZERO);
    let err = String::from_utf8(err).unwrap();
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}")))
        .collect();
    let listening = lines.iter().find(|l| l["message"] == "listening").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(listening["level"], "INFO");
    assert!(listening["timestamp"].is_string() && listening["target"].is_string(), "{listening}");
    assert!(listening["addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{listening}");
    assert!(!String::from_utf8(out).unwrap().contains('{'), "log lines stay off stdout");
    // A refused start says why in a JSON line too (it was the one plain line), and the
    // format's name is taken in any case.
    let refused = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["config", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("SWITCHBOARD_LOG_FORMAT", "JSON")
        .env("SWITCHBOARD_CONFIG", dir.path().join("no such file.toml"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8(refused.stderr).unwrap();
    let line: serde_json::Value = serde_json::from_str(said.trim()).unwrap_or_else(|e| panic!("{said:?}: {e}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(line["message"].as_str().is_some_and(|m| m.contains("no such file.toml")), "{line}");
}

#[test]
fn a_shared_data_dir_is_warned_of_once_per_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shared");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The first start (which also writes the endpoint secret) and a later one.
    for start in ["first", "second"] {
        let (_, err) = logs_of_a_run(dir.path(), &["--data", data.to_str().unwrap()], Duration::ZERO);
        let err = String::from_utf8(err).unwrap();
        assert_eq!(err.matches("may be entered by other local users").count(), 1, "{start} start: {err}");
    }
}

#[test]
fn a_new_data_dir_is_not_reported_as_an_unclean_stop() {
    // A brand-new data dir, and one that `user add` created.
    for user_add_first in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        if user_add_first {
            assert!(run(dir.path(), &["user", "add", "carol", "--new-store"]).status.success());
        }
        let (out, err) = logs_of_one_run(dir.path());
        let all = String::from_utf8_lossy(&[out, err].concat()).into_owned();
        assert!(!all.contains("unclean"), "user add first: {user_add_first}: {all}");
    }
    // A second start after a clean stop is clean too.
    let dir = tempfile::tempdir().unwrap();
    logs_of_one_run(dir.path());
    let (out, err) = logs_of_one_run(dir.path());
    assert!(!String::from_utf8_lossy(&[out, err].concat()).contains("unclean"));
}

/// `switchboard config` prints every setting in effect (defaults, the file, then flags)
/// as TOML that the broker reads back; a setting with which the broker would serve no
/// one is refused by name, by `config` and at start (before: `idle_timeout_ms = 0`
/// started, and then no client ever connected).
#[test]
fn the_configuration_is_checked_and_printed_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sb.toml"), "quota_bytes = 12345\n").unwrap();
    let out = run(dir.path(), &["--config", "sb.toml", "config", "--listen", "127.0.0.1:4999"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    for line in ["quota_bytes = 12345", "listen = \"127.0.0.1:4999\"", "idle_timeout_ms = 30000"] {
        assert!(printed.lines().any(|l| l == line), "{line:?} in {printed}");
    }
    // What it prints is a configuration file the broker takes as it is.
    std::fs::write(dir.path().join("all.toml"), &printed).unwrap();
    assert!(run(dir.path(), &["--config", "all.toml", "config"]).status.success());

    std::fs::write(dir.path().join("bad.toml"), "idle_timeout_ms = 0\n").unwrap();
    let refused = run(dir.path(), &["--config", "bad.toml", "config"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    // The message, without a backtrace even where RUST_BACKTRACE is set (`run` sets it).
    assert!(said.starts_with("error: ") && said.contains("idle_timeout_ms = 0"), "{said}");
    assert!(!said.contains("backtrace"), "{said}");
    let serve = run(dir.path(), &["--config", "bad.toml", "--listen", "127.0.0.1:0"]);
    assert!(!serve.status.success(), "the broker refuses to start");
    assert!(String::from_utf8_lossy(&serve.stderr).contains("idle_timeout_ms = 0"));

    // An operator trial's typo: passed by `config`, and the start grew to the machine's
    // memory until the kernel killed it.
    std::fs::write(dir.path().join("huge.toml"), "argon2_memory_kib = 4294967295\n").unwrap();
    for args in [&["--config", "huge.toml", "config"][..], &["--config", "huge.toml", "--listen", "127.0.0.1:0"]] {
        let refused = run(dir.path(), args);
        assert!(!refused.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&refused.stderr).contains("argon2_memory_kib = 4294967295: at most"));
    }
    // A missing file is said once (it was said twice, with its path twice).
    let missing = run(dir.path(), &["--config", "missing.toml", "config"]);
    let said = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(said.matches("No such file").count(), 1, "{said}");
    assert_eq!(said.matches("missing.toml").count(), 1, "{said}");
}

/// `user add` takes the password from a pipe when there is no terminal (before: it
/// failed with "No such device or address" trying to open one).
#[test]
fn user_add_reads_the_password_from_a_pipe() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["user", "add", "carol", "--new-store"])
        .current_dir(dir.path())
        .env_remove("SWITCHBOARD_PASSWORD")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"correct horse battery\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("created user carol"));
}

/// A broker whose standard output nobody reads any more (`switchboard | head`, a log
/// reader gone) still stops cleanly on SIGTERM: before, its "shutting down" line
/// panicked on the closed pipe and the next start found an unclean stop.
#[tokio::test]
async fn a_closed_standard_output_does_not_spoil_the_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while !lines.next().expect("the start-up lines").unwrap().starts_with("runtime threads: ") {}
    drop(lines);
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let (_, log) = logs_of_one_run(dir.path());
    let log = String::from_utf8_lossy(&log);
    assert!(!log.contains("unclean stop"), "{log}");
}

/// SIGHUP (log rotation, a service manager's reload) is logged and ignored: the broker
/// keeps serving and still stops cleanly on SIGTERM (before: SIGHUP killed it at once,
/// with no clean stop).
#[tokio::test]
async fn sighup_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(dir.path(), &["user", "add", "carol", "--new-store"]).status.success());
    let mut broker = start(dir.path());
    signal(&broker.child, "-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(broker.child.try_wait().unwrap().is_none(), "the broker is still running");
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let (carol, _) = connector.login("carol", "correct horse battery", "laptop").await.unwrap();
    carol.ping().await.unwrap();
    drop(carol);
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
}

/// `user list` shows every account with its devices; `user passwd --revoke-devices`
/// locks out whoever had the old password or a device (the operator's answer to a
/// stolen password: revoking devices alone is not, since the password enrolls new ones).
#[tokio::test]
async fn operators_list_users_and_reset_a_password() {
    let dir = tempfile::tempdir().unwrap();
    assert!(run(dir.path(), &["user", "add", "carol", "--new-store"]).status.success());
    assert!(run(dir.path(), &["user", "add", "dave"]).status.success());
    let mut broker = start(dir.path());
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let (laptop, laptop_id) = connector.login("carol", "correct horse battery", "laptop").await.unwrap();
    drop(laptop);
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());

    let listed = run(dir.path(), &["user", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let rows: Vec<Vec<String>> =
        String::from_utf8(listed.stdout).unwrap().lines().map(|l| l.split('\t').map(str::to_owned).collect()).collect();
    let named: Vec<(&str, &str)> = rows.iter().map(|r| (r[3].as_str(), r[2].as_str())).collect();
    assert_eq!(named, [("carol", "1"), ("dave", "0")], "name and devices: {rows:?}");

    let passwd = |name: &str, revoke: bool| {
        let mut args = vec!["user", "passwd", name];
        if revoke {
            args.push("--revoke-devices");
        }
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(&args)
            .current_dir(dir.path())
            .env("SWITCHBOARD_PASSWORD", "a brand new passphrase")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    assert_eq!(passwd("nobody", false).status.code(), Some(3), "an unknown user");
    let reset = passwd("carol", true);
    assert!(reset.status.success(), "{}", String::from_utf8_lossy(&reset.stderr));
    assert!(String::from_utf8_lossy(&reset.stdout).contains("revoked its 1 device"));

    let mut broker = start(dir.path());
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let device = connector.connect(&laptop_id).await.err().unwrap();
    assert_eq!(device.code(), Some(switchboard_protocol::ErrorCode::DEVICE_REVOKED), "the device is revoked");
    let old = connector.login("carol", "correct horse battery", "thief").await.err().unwrap();
    assert_eq!(old.code(), Some(switchboard_protocol::ErrorCode::AUTH_FAILED), "the old password is refused");
    connector.login("carol", "a brand new passphrase", "phone").await.unwrap();
    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
}

/// With `status_log_secs` the broker logs a `status` line at info that often (what an
/// operator without metrics watches).
#[test]
fn a_status_line_is_logged_every_status_log_secs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sb.toml"), "status_log_secs = 1\n").unwrap();
    let (_, err) = logs_of_a_run(dir.path(), &["--config", "sb.toml"], Duration::from_millis(2500));
    let logged = String::from_utf8(err).unwrap();
    let status = logged.lines().filter(|l| l.contains(" status ") || l.ends_with(" status")).count();
    assert!(status >= 1, "no status line in {logged}");
    assert!(logged.contains("sessions=0") && logged.contains("slow_consumers=0"), "{logged}");
}

/// `--metrics-listen` serves Prometheus metrics (the address printed at start), and
/// `switchboard config` shows the setting by its file key.
#[test]
fn the_metrics_flag_serves_a_scrape() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let printed = run(dir.path(), &["config", "--metrics-listen", "127.0.0.1:9464"]);
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    assert!(String::from_utf8_lossy(&printed.stdout).contains("metrics_listen = \"127.0.0.1:9464\""));
    let broker = start_with(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let addr = broker.metrics.expect("the start printed the metrics address");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("\nswitchboard_sessions 0\n"), "{answer}");
    let other = tempfile::tempdir().unwrap();
    assert!(start(other.path()).metrics.is_none(), "no endpoint unless asked for");
}

/// The serve flags work before the subcommand as after it (after wins), and are refused
/// before `user` or `device` (where they mean nothing) instead of being dropped: the
/// operator trial's `switchboard --closed-registration serve` served open registration.
#[test]
fn serve_flags_count_before_the_subcommand_too() {
    let dir = tempfile::tempdir().unwrap();
    let printed = |args: &[&str]| {
        let out = run(dir.path(), args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let early =
        printed(&["--listen", "127.0.0.1:15433", "--closed-registration", "--metrics-listen", "127.0.0.1:9", "config"]);
    for line in ["listen = \"127.0.0.1:15433\"", "registration_open = false", "metrics_listen = \"127.0.0.1:9\""] {
        assert!(early.lines().any(|l| l == line), "{line} missing: {early}");
    }
    let both = printed(&["--listen", "127.0.0.1:15433", "config", "--listen", "127.0.0.1:15434"]);
    assert!(both.lines().any(|l| l == "listen = \"127.0.0.1:15434\""), "the later flag wins: {both}");
    let refused = run(dir.path(), &["--listen", "127.0.0.1:15433", "user", "list"]);
    assert_eq!(refused.status.code(), Some(2), "a mistyped command line, as OPERATIONS.md says");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not to `user` or `device` commands"));
    // The environment is not typed flags: it neither stops `user` nor beats a typed flag.
    let with_env = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(args)
            .current_dir(dir.path())
            .env("SWITCHBOARD_LISTEN", "127.0.0.1:15435")
            .env("SWITCHBOARD_METRICS_LISTEN", "127.0.0.1:15436")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    assert!(run(dir.path(), &["user", "add", "carol", "--new-store"]).status.success());
    let listed = with_env(&["user", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    for (args, listen) in [
        (&["--listen", "127.0.0.1:15433", "config"][..], "127.0.0.1:15433"),
        (&["config", "--listen", "127.0.0.1:15434"][..], "127.0.0.1:15434"),
        (&["config"][..], "127.0.0.1:15435"),
    ] {
        let out = String::from_utf8(with_env(args).stdout).unwrap();
        assert!(out.lines().any(|l| l == format!("listen = \"{listen}\"")), "{args:?}: {out}");
        assert!(out.lines().any(|l| l == "metrics_listen = \"127.0.0.1:15436\""), "{args:?}: {out}");
    }
    // Serving: the early flags are the ones in effect.
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--closed-registration", "--listen", "127.0.0.1:0", "serve"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map(Result::unwrap);
    let listening = lines.next().unwrap();
    let registration = lines.find(|l| l.starts_with("registration: ")).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        listening.starts_with("switchboard listening on 127.0.0.1:") && !listening.ends_with(":4433"),
        "{listening}"
    );
    assert_eq!(registration, "registration: closed");
}

/// With the broker running, the operator commands go to it over its admin socket: an
/// account added is usable at once, a device revoked is disconnected at once (not at
/// its next connect), a password reset with `--revoke-devices` locks the account out
/// while it runs. After SIGTERM the socket is gone and the commands open the store
/// themselves; a socket left by `kill -9` is not mistaken for a broker.
#[tokio::test]
async fn operators_manage_accounts_while_the_broker_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path());
    let socket = dir.path().join("switchboard-data").join("admin.sock");
    assert!(socket.exists(), "the broker listens for operator commands");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions()) & 0o777,
        0o600
    );
    let added = run(dir.path(), &["user", "add", "carol"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    assert!(String::from_utf8_lossy(&added.stdout).starts_with("created user carol (id "));
    let connector = Connector::new(broker.addr, "localhost", Trust::CaFile(broker.cert.clone())).unwrap();
    let (laptop, laptop_id) = connector.login("carol", "correct horse battery", "laptop").await.unwrap();
    let (phone, phone_id) = connector.login("carol", "correct horse battery", "phone").await.unwrap();
    assert_eq!(listed_devices(dir.path(), "carol"), vec![laptop_id.device_id, phone_id.device_id]);
    let listed = String::from_utf8(run(dir.path(), &["user", "list"]).stdout).unwrap();
    assert!(listed.lines().any(|l| l.ends_with("\t2\tcarol")), "{listed}");

    // Revoked while connected: the phone's connection closes now.
    let phone_device = phone_id.device_id.to_string();
    assert!(run(dir.path(), &["device", "revoke", "carol", &phone_device]).status.success());
    let closed = tokio::time::timeout(Duration::from_secs(10), phone.closed()).await.expect("the phone was cut off");
    assert_eq!(closed.code(), Some(switchboard_protocol::ErrorCode::DEVICE_REVOKED));
    let twice = run(dir.path(), &["device", "revoke", "carol", &phone_device]);
    assert_eq!(twice.status.code(), Some(3), "no such device, said by the running broker");
    let said = String::from_utf8_lossy(&twice.stderr);
    assert!(said.contains("NOT_FOUND (8): carol has no device") && said.contains("revoked already"), "{said}");
    laptop.ping().await.unwrap();

    // A new password and every device revoked: the laptop is cut off, the old password
    // enrolls nothing, the new one does.
    let passwd = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["user", "passwd", "carol", "--revoke-devices"])
        .current_dir(dir.path())
        .env("SWITCHBOARD_PASSWORD", "a brand new passphrase")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(passwd.status.success(), "{}", String::from_utf8_lossy(&passwd.stderr));
    assert!(String::from_utf8_lossy(&passwd.stdout).contains("revoked its 1 device"));
    let closed = tokio::time::timeout(Duration::from_secs(10), laptop.closed()).await.expect("the laptop was cut off");
    assert_eq!(closed.code(), Some(switchboard_protocol::ErrorCode::DEVICE_REVOKED));
    let old = connector.login("carol", "correct horse battery", "thief").await.err().unwrap();
    assert_eq!(old.code(), Some(switchboard_protocol::ErrorCode::AUTH_FAILED));
    let (desk, desk_id) = connector.login("carol", "a brand new passphrase", "desk").await.unwrap();
    desk.ping().await.unwrap();
    // Disabled: cut off at once and told why; enabled: back.
    let disabled = run(dir.path(), &["user", "disable", "carol"]);
    let said = String::from_utf8_lossy(&disabled.stdout);
    assert!(said.starts_with("disabled carol") && said.contains("connections were closed"), "{disabled:?}");
    let closed = tokio::time::timeout(Duration::from_secs(10), desk.closed()).await.expect("the desk was cut off");
    assert_eq!(closed.code(), Some(switchboard_protocol::ErrorCode::ACCOUNT_DISABLED));
    assert_eq!(
        connector.connect(&desk_id).await.err().unwrap().code(),
        Some(switchboard_protocol::ErrorCode::ACCOUNT_DISABLED)
    );
    assert!(run(dir.path(), &["user", "enable", "carol"]).status.success());
    connector.connect(&desk_id).await.unwrap().ping().await.unwrap();

    signal(&broker.child, "-TERM");
    assert!(broker.child.wait().unwrap().success());
    assert!(!socket.exists(), "a stopped broker leaves no socket");
    assert!(run(dir.path(), &["user", "add", "dave"]).status.success(), "offline, the store is opened here");
    // With no broker running, no connections are said to be closed (they were).
    let offline = run(dir.path(), &["user", "disable", "dave"]);
    let said = String::from_utf8_lossy(&offline.stdout);
    assert!(said.starts_with("disabled dave") && !said.contains("connections"), "{said}");
    assert!(run(dir.path(), &["user", "enable", "dave"]).status.success());

    // kill -9 leaves the socket file behind; nothing answers on it.
    let mut broker = start(dir.path());
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    assert!(socket.exists());
    let listed = run(dir.path(), &["user", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    assert_eq!(String::from_utf8(listed.stdout).unwrap().lines().count(), 2, "carol and dave");
}
