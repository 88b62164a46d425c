//! Helpers for the end-to-end tests: a real broker on 127.0.0.1:0 with a temp data dir,
//! clients that trust its generated certificate, and a raw pre-authentication
//! connection for speaking the protocol by hand. Nothing here mocks our stack.
//!
//! Every wait here has a deadline, so a broker that never answers fails the test
//! instead of hanging it; tests wrap their whole body in `within` for the same reason.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use switchboard_broker::limits::STORE_JOBS_PER_USER;
use switchboard_broker::pauses::Point;
use switchboard_broker::{Broker, Config, Shared};
use switchboard_client::{Client, ClientError, Connector, Events, Identity, TransportOptions, Trust};
use switchboard_protocol::limits::MAX_SERVER_FRAME_BYTES;
use switchboard_protocol::{
    Chunk, ClientFrame, ClientHello, Entry, ErrorBody, ErrorCode, Event, FileId, FrameDecoder, NewUpload, Reply,
    Request, RequestBody, ServerFrame, ServerHello, TransferOpen, TransferReply, UploadStatus, decode, encode_frame,
};

/// What `sends_beside_readers` measured.
pub struct BesideReaders {
    /// The sender's acknowledgement latencies, ms, ascending.
    pub send_ms: Vec<f64>,
    /// Reads answered, and refused (any error), over the whole run.
    pub served: u64,
    /// See `served`.
    pub refused: u64,
    /// The run's length, s (the sender's time plus the readers' 0.5 s head start).
    pub secs: f64,
    /// The first refusal's error, if any.
    pub first_refusal: Option<String>,
}

impl BesideReaders {
    /// One line: the sender's p50, p99 and max, and what the readers got.
    pub fn summary(&self, what: &str) -> String {
        let ms = &self.send_ms;
        let refusal = self.first_refusal.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default();
        format!(
            "send p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {what} served {} ({:.0}/s), refused {}{refusal}",
            ms[ms.len() / 2],
            ms[ms.len() * 99 / 100],
            ms[ms.len() - 1],
            self.served,
            self.served as f64 / self.secs,
            self.refused,
        )
    }
}

/// The core of a measurement run by hand (release mode; asserts nothing about time):
/// `readers` tasks loop on `read()` as `reader`, and after 0.5 s of that `sender` sends
/// 300 messages to `conv`, one at a time; then the readers stop.
pub async fn sends_beside_readers(
    sender: &Client,
    conv: switchboard_protocol::ConvId,
    reader: Arc<Client>,
    readers: usize,
    read: impl Fn() -> RequestBody + Clone + Send + 'static,
) -> BesideReaders {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    let (served, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_refusal = Arc::new(std::sync::Mutex::new(None));
    let mut loops = Vec::new();
    for _ in 0..readers {
        let (reader, stop, read) = (reader.clone(), stop.clone(), read.clone());
        let (served, refused, first_refusal) = (served.clone(), refused.clone(), first_refusal.clone());
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match reader.request(read()).await {
                    Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_refusal.lock().unwrap().get_or_insert(e.to_string());
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (start, mut send_ms) = (std::time::Instant::now(), Vec::new());
    for i in 0..300 {
        let t = std::time::Instant::now();
        sender.send(conv, &format!("m{i}")).await.unwrap();
        send_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let secs = start.elapsed().as_secs_f64() + 0.5;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    send_ms.sort_by(f64::total_cmp);
    let first_refusal = first_refusal.lock().unwrap().take();
    BesideReaders {
        send_ms,
        served: served.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        secs,
        first_refusal,
    }
}

/// How long a whole end-to-end test may take before it counts as hung.
pub const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// How long one step (an answer, an event, a close) may take.
pub const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `fut`, failing with `what` if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}"),
    }
}

/// Runs a whole test body under `TEST_DEADLINE`.
pub async fn bounded<F: Future>(fut: F) -> F::Output {
    within(TEST_DEADLINE, "the test", fut).await
}

/// The configuration of the tests' brokers: `Config::ephemeral` with the overload rules
/// that time queues off. The end-to-end tests run in parallel on a few cores, where a
/// group commit often waits past the 20 ms delay target for a whole interval and a
/// debug-build broker's socket may keep a queue past 20 ms: those rules would then
/// refuse writes (`OVERLOADED`) in tests about something else. They are tested on the
/// pure rule (`overload::SendRule`, `SocketBacklog`) and by the harness's ramp tests.
///
/// `runtime_scheduling` is `normal`: a test's broker runs on the test's own runtime (not
/// one `runtime_builder` made), and under `batch` its password hashes and thumbnails would
/// run under `SCHED_IDLE`, waiting behind every other test's threads on the shared cores.
pub fn test_config(data_dir: PathBuf) -> Config {
    let mut config = Config::ephemeral(data_dir);
    config.send_delay_target_ms = 0;
    config.socket_backlog_target_ms = 0;
    config.runtime_scheduling = switchboard_broker::config::Scheduling::Normal;
    config
}

/// A broker and the temp dir it lives in.
pub struct TestBroker {
    /// The broker (None after `stop`).
    pub broker: Option<Broker>,
    /// Its data dir (kept across restarts).
    pub dir: tempfile::TempDir,
    /// Password used for every test account.
    pub password: &'static str,
    /// What it was started with, kept for restarts.
    config: Config,
}

/// Group commits held by `TestBroker::hold_commits`.
pub struct HeldCommits {
    hold: Arc<std::sync::atomic::AtomicBool>,
    go: std::sync::mpsc::Sender<()>,
}

impl HeldCommits {
    /// Lets the held commit, and every later one, go on.
    pub fn release(self) {
        self.hold.store(false, std::sync::atomic::Ordering::SeqCst);
        let _ = self.go.send(());
    }
}

impl TestBroker {
    /// Starts a broker with the test defaults.
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after letting the caller adjust the config.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path().join("data"));
        adjust(&mut config);
        let broker = within(STEP_DEADLINE, "broker start", Broker::start(config.clone())).await.unwrap();
        TestBroker { broker: Some(broker), dir, password: "correct horse battery", config }
    }

    /// The data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The broker's shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        self.broker.as_ref().unwrap().shared()
    }

    /// Holds the broker's group commits from now on, each as it begins (nothing applied
    /// meanwhile becomes durable), until `HeldCommits::release` (or 20 s). Over
    /// `Store::on_commit_started`, which a broker takes once: one hold per test broker.
    pub fn hold_commits(&self) -> HeldCommits {
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (go, paused) = std::sync::mpsc::channel::<()>();
        let paused = std::sync::Mutex::new(paused);
        let held = hold.clone();
        self.shared().store.on_commit_started(Box::new(move |_| {
            if held.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = paused.lock().unwrap_or_else(|p| p.into_inner()).recv_timeout(Duration::from_secs(20));
            }
        }));
        HeldCommits { hold, go }
    }

    /// A connector trusting the broker's certificate file.
    pub fn connector(&self) -> Connector {
        self.connector_with(&TransportOptions::default())
    }

    /// A client endpoint trusting this broker, with `options`.
    pub fn connector_with(&self, options: &TransportOptions) -> Connector {
        let b = self.broker.as_ref().unwrap();
        Connector::with_transport(b.local_addr, "localhost", Trust::CaFile(b.cert_path.clone()), options).unwrap()
    }

    /// A client endpoint whose `register` and `login` make one attempt: an `OVERLOADED`
    /// answer is returned, not waited out (`TransportOptions::enroll_retry_for`).
    pub fn connector_enrolling_once(&self) -> Connector {
        self.connector_with(&TransportOptions { enroll_retry_for: Duration::ZERO, ..TransportOptions::default() })
    }

    /// Registers `name` and returns its first device.
    pub async fn register(&self, name: &str) -> (Client, Identity) {
        within(STEP_DEADLINE, "register", self.connector().register(name, self.password, "test-device")).await.unwrap()
    }

    /// Enrolls another device of `name`.
    pub async fn login(&self, name: &str) -> (Client, Identity) {
        within(STEP_DEADLINE, "login", self.connector().login(name, self.password, "another-device")).await.unwrap()
    }

    /// Waits until the broker serves no session (each closed one given back).
    pub async fn sessions_ended(&self) {
        within(STEP_DEADLINE, "the sessions' end", async {
            while self.shared().status().sessions > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// Shuts the broker down cleanly.
    pub async fn stop(&mut self) {
        if let Some(b) = self.broker.take() {
            within(STEP_DEADLINE * 3, "broker shutdown", b.shutdown()).await.unwrap();
        }
    }

    /// Restarts on the same data dir with the same config (a new port). Before, a
    /// restart dropped what `start_with` adjusted.
    pub async fn restart(&mut self) {
        self.restart_after(async |_| {}).await;
    }

    /// Stops the broker, runs `offline` on its configuration while it is stopped (an
    /// operator's command on the stopped broker's store), then starts it again as
    /// `restart` does.
    pub async fn restart_after(&mut self, offline: impl AsyncFnOnce(&Config)) {
        self.stop().await;
        let config = self.config.clone();
        offline(&config).await;
        self.broker = Some(within(STEP_DEADLINE, "broker restart", Broker::start(config)).await.unwrap());
    }

    /// A fresh QUIC connection with the hellos exchanged and nothing else sent.
    pub async fn preauth(&self) -> PreAuth {
        self.preauth_version(switchboard_protocol::PROTOCOL_VERSION).await
    }

    /// TLS resumption tickets the broker has opened so far
    /// (`switchboard_tls_tickets_opened_total`: an upper bound on resumed handshakes).
    pub fn tls_tickets_opened(&self) -> u64 {
        self.shared().counters.tls_tickets_opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `preauth` with a hello that names `version` (the broker serves 4 and 5).
    pub async fn preauth_version(&self, version: u16) -> PreAuth {
        self.preauth_through(&self.connector(), version).await
    }

    /// `preauth_version` through `connector`, whose endpoint keeps the TLS tickets of
    /// its earlier connections: a second call resumes the first one's session.
    pub async fn preauth_through(&self, connector: &Connector, version: u16) -> PreAuth {
        within(STEP_DEADLINE, "hello exchange", PreAuth::open(self, connector, version)).await
    }
}

/// Reads a `Session`'s events until one matches `matches` (`what`, said if none does
/// within `STEP_DEADLINE`), and returns it.
pub async fn wait_for(
    events: &mut switchboard_client::SessionEvents,
    what: &str,
    mut matches: impl FnMut(&switchboard_client::SessionEvent) -> bool,
) -> switchboard_client::SessionEvent {
    within(STEP_DEADLINE, what, async {
        loop {
            let event = events.next().await.expect("the session is running");
            if matches(&event) {
                return event;
            }
        }
    })
    .await
}

/// Waits up to 10 s for the next entry event, passing over presence and typing events:
/// they come on their own schedule (a user whose client was dropped a moment before
/// goes offline when the broker sees the connection close, which may be after a test's
/// next step made it a contact; a flaky failure of CI's `conversation_rules`), and over
/// file progress: an upload's "complete" is announced on its own thread to the
/// conversations carrying the file when it runs, so it may reach a member before or
/// after the message that attached it (a flaky failure of CI's `presence`). Any other
/// event first is a failure.
pub async fn next_entry(events: &mut Events) -> Entry {
    within(STEP_DEADLINE, "an entry event", async {
        loop {
            match events.next().await {
                Some(Event::Entry(e)) => return e,
                Some(Event::Presence(_) | Event::Typing { .. } | Event::File(_)) => {}
                other => panic!("expected an entry event, got {other:?}"),
            }
        }
    })
    .await
}

/// Asserts that no event arrives within `ms` and that the stream is still open: a
/// closed stream delivers no events either, and must not pass for a quiet one.
pub async fn no_event(events: &mut Events, ms: u64) {
    match tokio::time::timeout(Duration::from_millis(ms), events.next()).await {
        Err(_) => {}
        Ok(Some(e)) => panic!("unexpected event {e:?}"),
        Ok(None) => panic!("the event stream closed while it was expected to stay quiet"),
    }
}

/// Asserts that the event stream ends (after any events still buffered) and that the
/// broker closed the client's connection with `code`.
pub async fn events_end_with(events: &mut Events, client: &Client, code: ErrorCode) {
    within(STEP_DEADLINE, "end of the event stream", async {
        while let Some(e) = events.next().await {
            let _ = e;
        }
    })
    .await;
    assert_eq!(close_code(client).await, Some(code));
}

/// Waits for `client`'s connection to close and returns the broker's close code.
pub async fn close_code(client: &Client) -> Option<ErrorCode> {
    within(STEP_DEADLINE, "connection close", client.closed()).await.code()
}

/// Waits for the broker to close `conn` and returns its close code.
pub async fn closed_with(conn: &quinn::Connection) -> Option<ErrorCode> {
    ClientError::from(within(STEP_DEADLINE, "connection close", conn.closed()).await).code()
}

/// Signs `transcript` with `identity`'s device key, as a device proves itself.
pub fn sign(identity: &Identity, transcript: &[u8]) -> Bytes {
    let secret: [u8; 32] = switchboard_client::unhex(&identity.secret_key).unwrap().try_into().unwrap();
    Bytes::copy_from_slice(&SigningKey::from_bytes(&secret).sign(transcript).to_bytes())
}

/// An `Authenticate` request for `identity`, signed over `transcript`.
pub fn authenticate(identity: &Identity, transcript: &[u8]) -> RequestBody {
    RequestBody::Authenticate {
        user: identity.user.clone(),
        device_id: identity.device_id,
        signature: sign(identity, transcript),
    }
}

/// One encoded request frame.
pub fn request_frame(id: u32, body: RequestBody) -> Bytes {
    encode_frame(&ClientFrame::Request(Request { id, body })).unwrap()
}

/// A connection that has exchanged hellos and may send anything next: the protocol
/// spoken by hand, for requests a well-behaved client never sends.
pub struct PreAuth {
    /// The connection.
    pub conn: quinn::Connection,
    /// Control stream, client to broker.
    pub send: quinn::SendStream,
    /// Control stream, broker to client.
    pub recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// The broker's hello.
    pub hello: ServerHello,
    /// What a device must sign on this connection: `auth_transcript_v5(exporter)`
    /// (version 4: `auth_transcript(nonce, exporter)`).
    pub transcript: Vec<u8>,
    /// This connection's TLS exporter value.
    pub exporter: [u8; 32],
}

impl PreAuth {
    async fn open(tb: &TestBroker, connector: &Connector, version: u16) -> PreAuth {
        let addr = tb.broker.as_ref().unwrap().local_addr;
        let conn = connector.endpoint().connect(addr, "localhost").unwrap().await.unwrap();
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = ClientHello { magic: *b"SWBD", version, agent: "switchboard-tests".into() };
        send.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
        let (mut recv, mut decoder) = (recv, FrameDecoder::new(MAX_SERVER_FRAME_BYTES));
        let hello: ServerHello = decode(&read_frame(&mut recv, &mut decoder).await.expect("a server hello")).unwrap();
        let mut exporter = [0u8; 32];
        conn.export_keying_material(&mut exporter, switchboard_protocol::EXPORTER_LABEL, b"").unwrap();
        let transcript =
            switchboard_protocol::transcript_for(version, &hello.nonce, &exporter).expect("a known version");
        PreAuth { conn, send, recv, decoder, hello, transcript, exporter }
    }

    /// Writes raw bytes on the control stream (several frames may go in one write).
    /// A write the broker refuses because it already closed is not an error here: the
    /// close code says what happened.
    pub async fn write(&mut self, bytes: &[u8]) {
        let _ = within(STEP_DEADLINE, "control stream write", self.send.write_all(bytes)).await;
    }

    /// Sends one request.
    pub async fn request(&mut self, id: u32, body: RequestBody) {
        self.write(&request_frame(id, body)).await;
    }

    /// The next frame from the broker, or the close code if the connection closes first.
    pub async fn next(&mut self) -> Result<ServerFrame, Option<ErrorCode>> {
        match read_frame(&mut self.recv, &mut self.decoder).await {
            Some(body) => Ok(decode(&body).unwrap()),
            None => Err(closed_with(&self.conn).await),
        }
    }

    /// Asserts the broker closes the connection with `code` without answering anything.
    pub async fn refused_with(&mut self, code: ErrorCode) {
        match self.next().await {
            Err(got) => assert_eq!(got, Some(code), "close code"),
            Ok(frame) => panic!("expected a close with {code}, got {frame:?}"),
        }
    }
}

/// The next whole frame body from `recv`, or `None` once the stream or connection ends.
/// Fails the test if nothing arrives within `STEP_DEADLINE`.
pub async fn read_frame(recv: &mut quinn::RecvStream, decoder: &mut FrameDecoder) -> Option<Bytes> {
    loop {
        if let Some(body) = decoder.next_frame().unwrap() {
            return Some(body);
        }
        match within(STEP_DEADLINE, "a frame from the broker", recv.read_chunk(64 * 1024, true)).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// The next response on an authenticated raw session: `(id, result)`.
pub async fn next_response(
    raw: &mut switchboard_client::RawSession,
) -> (u32, Result<switchboard_protocol::Reply, switchboard_protocol::ErrorBody>) {
    loop {
        let body = read_frame(&mut raw.recv, &mut raw.decoder).await.expect("the session is still open");
        match decode::<ServerFrame>(&body).unwrap() {
            ServerFrame::Response { id, result } => return (id, result),
            ServerFrame::Event(_) => continue,
        }
    }
}

/// One transfer stream spoken by hand (PROTOCOL.md section 12) on a client's connection.
pub struct Transfer {
    /// Client to broker.
    pub send: quinn::SendStream,
    /// Broker to client.
    pub recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Transfer {
    /// Opens a transfer stream and sends `open` as its first frame.
    pub async fn open(conn: &quinn::Connection, open: &TransferOpen) -> Transfer {
        let (mut send, recv) = within(STEP_DEADLINE, "opening a transfer stream", conn.open_bi()).await.unwrap();
        send.write_all(&encode_frame(open).unwrap()).await.unwrap();
        Transfer { send, recv, decoder: FrameDecoder::new(MAX_SERVER_FRAME_BYTES) }
    }

    /// Sends one chunk of `data` at `offset`, with its checksum (or `crc32` if given).
    pub async fn chunk(&mut self, offset: u64, data: &[u8], crc32: Option<switchboard_protocol::Crc32>) {
        let crc32 = crc32.unwrap_or_else(|| Chunk::checksum(data));
        let chunk = Chunk { offset, data: Bytes::copy_from_slice(data), crc32 };
        // The broker may already have ended the stream; its reply says why.
        let _ = self.send.write_all(&encode_frame(&chunk).unwrap()).await;
    }

    /// The next reply frame, or `None` once the broker finished or reset the stream.
    pub async fn reply(&mut self) -> Option<TransferReply> {
        read_frame(&mut self.recv, &mut self.decoder).await.map(|b| decode(&b).unwrap())
    }

    /// Reads a download: the first frame, and when it is a `Range`, the raw bytes after
    /// it up to the end of the stream.
    pub async fn download_reply(&mut self) -> (TransferReply, Vec<u8>) {
        let mut buf = Vec::new();
        loop {
            // The frame's length prefix (LEB128), then its body.
            let mut declared = 0usize;
            let mut prefix = None;
            for (i, b) in buf.iter().enumerate().take(5) {
                declared |= usize::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    prefix = Some(i + 1);
                    break;
                }
            }
            if let Some(p) = prefix
                && buf.len() >= p + declared
            {
                let reply: TransferReply = decode(&buf[p..p + declared]).unwrap();
                let mut rest = buf.split_off(p + declared);
                if matches!(reply, TransferReply::Range { .. }) {
                    while let Some(chunk) =
                        within(STEP_DEADLINE, "download bytes", self.recv.read_chunk(256 * 1024, true)).await.unwrap()
                    {
                        rest.extend_from_slice(&chunk.bytes);
                    }
                }
                return (reply, rest);
            }
            match within(STEP_DEADLINE, "a download reply", self.recv.read_chunk(64 * 1024, true)).await {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                other => panic!("the download stream ended before its reply: {other:?}"),
            }
        }
    }
}

/// Arms `point`, has a new device of `user` (the phone) send `body` and waits until it is
/// held there, then revokes the phone from `by` (another device of `user`) and lets the
/// request go on: the request was let in by its session before the revocation and
/// reaches its last check after it. Returns once the request was carried out or
/// refused, if it holds one of the user's store slots until then (all points but
/// `CancelUpload` and `UploadChunk`).
pub async fn revoked_while_held(tb: &TestBroker, by: &Client, user: &str, point: Point, body: RequestBody) {
    let (phone, id) = tb.login(user).await;
    let mut held = tb.shared().pauses.arm(point);
    let asked = tokio::spawn(async move { phone.request(body).await });
    within(STEP_DEADLINE, "the phone's request held", held.reached()).await;
    let slots = tb.shared().users.store_slots(id.user_id);
    by.revoke_other_device(id.device_id, tb.password).await.unwrap();
    held.release();
    // The revocation closed the phone's connection: its answer never comes.
    assert!(asked.await.unwrap().is_err());
    within(STEP_DEADLINE, "the phone's request carried out or refused", async {
        while slots.available_permits() < STORE_JOBS_PER_USER {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// What `BeginUpload` declares for `data`: its size and BLAKE3.
pub fn new_upload(name: &str, content_type: &str, data: &[u8]) -> NewUpload {
    NewUpload {
        name: name.into(),
        size: data.len() as u64,
        content_type: content_type.into(),
        blake3: *blake3::hash(data).as_bytes(),
    }
}

/// Declares an upload of `data` (`new_upload`) and answers its status.
pub async fn begin_upload(client: &Client, name: &str, content_type: &str, data: &[u8]) -> UploadStatus {
    match client.request(RequestBody::BeginUpload(new_upload(name, content_type, data))).await.unwrap() {
        Reply::Upload(status) => status,
        other => panic!("expected Upload, got {other:?}"),
    }
}

/// Sends `data[from..until]` of upload `file` on a new transfer stream in chunks of
/// `chunk` bytes, at most two beyond the durable offset, and returns the replies up to
/// the durable offset `until` (or the final reply). With `until == data.len()` it runs
/// to `Complete` or `Failed`.
pub async fn upload_range(
    conn: &quinn::Connection,
    file: FileId,
    data: &[u8],
    from: u64,
    until: u64,
    chunk: usize,
) -> Vec<TransferReply> {
    let mut t = Transfer::open(conn, &TransferOpen::Upload { file, offset: from }).await;
    let mut replies = Vec::new();
    match t.reply().await {
        Some(r @ TransferReply::Accepted { .. }) => replies.push(r),
        other => {
            replies.extend(other);
            return replies;
        }
    }
    let (mut sent, mut durable) = (from, from);
    loop {
        while sent < until && sent < durable + 2 * chunk as u64 {
            let end = (sent + chunk as u64).min(until);
            t.chunk(sent, &data[sent as usize..end as usize], None).await;
            sent = end;
        }
        let Some(reply) = t.reply().await else { return replies };
        let last = match &reply {
            TransferReply::Durable { offset } => {
                durable = *offset;
                durable >= until && until < data.len() as u64
            }
            _ => true,
        };
        replies.push(reply);
        if last {
            return replies;
        }
    }
}

/// Uploads all of `data` from `from` and returns the final reply.
pub async fn upload_rest(conn: &quinn::Connection, file: FileId, data: &[u8], from: u64) -> TransferReply {
    let replies = upload_range(conn, file, data, from, data.len() as u64, 256 * 1024).await;
    replies.last().cloned().expect("a reply")
}

/// Downloads `offset .. offset + length` of `file`: the `Range` and the bytes, or the
/// `Failed` reply's error.
pub async fn download(
    conn: &quinn::Connection,
    file: FileId,
    offset: u64,
    length: u64,
) -> Result<(TransferReply, Vec<u8>), ErrorBody> {
    let mut t = Transfer::open(conn, &TransferOpen::Download { file, offset, length }).await;
    match t.download_reply().await {
        (r @ TransferReply::Range { .. }, bytes) => Ok((r, bytes)),
        (TransferReply::Failed { error, .. }, _) => Err(error),
        other => panic!("expected Range or Failed, got {other:?}"),
    }
}
