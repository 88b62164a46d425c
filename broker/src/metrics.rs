//! The Prometheus endpoint (`Config::metrics_listen`): `GET /metrics` answers what the
//! broker holds at that moment and what it did since it started, in the text exposition
//! format 0.0.4 (<https://prometheus.io/docs/instrumenting/exposition_formats/>).
//!
//! Every figure is read when a scrape arrives (a rendering is reused for
//! `RENDER_REUSE`), from the same counters as the status line (`Shared::status`), the
//! store's commit totals (`Store::commit_stats`) and the broker's `Counters` (a relaxed
//! add per published entry, refused handshake, refused connection or slow consumer;
//! never per delivery); nothing waits for a scrape. The endpoint is plain HTTP/1.1, one request per connection, and
//! bounded: at most `MAX_SCRAPES` connections are served at once; a request head must
//! arrive within `HEAD_TIMEOUT` and `REQUEST_MAX_BYTES`, the whole exchange within
//! `REQUEST_TIMEOUT`. When every place is taken, a new connection takes the place of the
//! oldest one still sending its head, so connections that send nothing cannot keep a
//! scraper out (`Slots`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use switchboard_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::Shared;

/// Connections served at once (each holds at most `REQUEST_MAX_BYTES` and a task).
pub const MAX_SCRAPES: usize = 8;
/// Longest request head read (request line and headers), bytes; longer is answered 431.
pub const REQUEST_MAX_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head; it is then closed unanswered.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the whole exchange may take (the head, then taking the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A rendering younger than this answers the next scrape too: however fast scrapes
/// come, the counters are read at most ten times a second.
pub const RENDER_REUSE: Duration = Duration::from_millis(100);
/// The path served; any other is answered 404.
pub const PATH: &str = "/metrics";
/// Accept failures (out of descriptors) are logged at most this often.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);
/// Connections answered and still reading what their client sent after its head (up to
/// 100 ms, so that closing does not reset the answer in flight), at most this many at
/// once over all endpoints; past it one is closed at once. Before, they held no place,
/// and a client sending requests and never reading the answers kept a tenth of a
/// second's worth of sockets open, as many as it could send, of the descriptors the
/// broker's files need (an attacker review).
pub const DRAINING_MAX: usize = 16;

/// Connections draining now (`DRAINING_MAX`).
static DRAINING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of `DRAINING`, given back when dropped.
struct Draining;

impl Draining {
    /// A place among the draining connections, or `None` when `DRAINING_MAX` hold them.
    fn take() -> Option<Draining> {
        let taken = DRAINING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < DRAINING_MAX).then_some(n + 1));
        taken.ok().map(|_| Draining)
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        DRAINING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Totals the broker counts as it works, for the endpoint (each one relaxed atomic add
/// where it happens: per published entry, per refused handshake or connection, per slow
/// consumer; never per delivery).
#[derive(Default)]
pub struct Counters {
    /// Conversation log entries (messages, edits, deletes, membership changes) made
    /// durable and handed to fan-out.
    pub entries_published: AtomicU64,
    /// Copies of those entries queued to devices (the fan-out).
    pub entry_deliveries: AtomicU64,
    /// Authenticated sessions started (a registration, a login, a device's proof).
    pub sessions_started: AtomicU64,
    /// TLS resumption tickets presented by clients that the broker decrypted: an upper
    /// bound on the QUIC handshakes that resumed a session (no certificate signed or
    /// sent). rustls opens a ticket before it checks its server name, cipher suite and
    /// binder, and quinn does not say whether a handshake resumed, so a ticket that was
    /// then not used (or replayed by an onlooker in a handshake that failed) counts too.
    pub tls_tickets_opened: Arc<AtomicU64>,
    /// Handshakes refused after the hello, by code (`HANDSHAKE_CODES`, then any other).
    handshakes_refused: [AtomicU64; HANDSHAKE_CODES.len() + 1],
    /// Connection attempts refused before a handshake (the places of
    /// `max_unauthenticated_connections`, and per address).
    pub connections_refused: AtomicU64,
    /// QUIC handshakes (TLS included) that failed or passed `quic_handshake_timeout`: a
    /// client that does not trust the certificate, speaks another ALPN, or went away.
    /// Before, nothing counted or logged them above debug, and a certificate rotation
    /// that clients did not trust was invisible on the broker (an operator's trial).
    pub quic_handshakes_failed: AtomicU64,
    /// Devices disconnected with `SLOW_CONSUMER` (their outbound queue overflowed), told
    /// in the log at most once a minute.
    pub slow_consumers: Tally,
    /// Starts of a conversation actor refused `OVERLOADED` at `max_live_conversations`
    /// (each shortens the idle period for a while: `limits::PRESSED_IDLE_DIVISOR`), told
    /// in the log at most once a minute.
    pub conversation_starts_refused_full: Tally,
}

impl Counters {
    /// Zeroed counters around the TLS ticketer's count (`tls::server_config`).
    pub fn with_tickets_opened(tls_tickets_opened: Arc<AtomicU64>) -> Counters {
        Counters { tls_tickets_opened, ..Default::default() }
    }
}

/// A count of events the operator is told about in the log without the log filling:
/// the first at once, then at most once per `TALLY_LOG_MS` with the count since (a
/// client repeating the event cannot fill the log). Every one is in the total (the
/// status line and the metrics), so none goes untold.
#[derive(Default)]
pub struct Tally {
    total: AtomicU64,
    /// `total` at the last telling, and when that was (ms since the Unix epoch).
    told: Mutex<(u64, Option<u64>)>,
}

/// Shortest time between two tellings of a `Tally`, ms.
pub const TALLY_LOG_MS: u64 = 60_000;

impl Tally {
    /// One event at `now_ms`: the events to tell now (this one included), if due.
    pub fn count(&self, now_ms: u64) -> Option<u64> {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut told = lock(&self.told);
        let due = told.1.is_none_or(|last| now_ms.saturating_sub(last) >= TALLY_LOG_MS);
        if !due {
            return None;
        }
        let untold = total.saturating_sub(told.0);
        *told = (total, Some(now_ms));
        Some(untold)
    }

    /// Events since the start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// The codes a refused handshake is counted under; any other is counted as `other`.
const HANDSHAKE_CODES: [ErrorCode; 10] = [
    ErrorCode::AUTH_FAILED,
    ErrorCode::DEVICE_REVOKED,
    ErrorCode::ACCOUNT_DISABLED,
    ErrorCode::RATE_LIMITED,
    ErrorCode::REGISTRATION_CLOSED,
    ErrorCode::OVERLOADED,
    ErrorCode::CONFLICT,
    ErrorCode::INVALID,
    ErrorCode::TIMEOUT,
    ErrorCode::FORBIDDEN,
];

impl Counters {
    /// Counts one more of `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a handshake refused with `code`.
    pub fn handshake_refused(&self, code: ErrorCode) {
        Self::add(self.refused_with(code), 1);
    }

    /// Handshakes refused with `code` so far (codes not listed are counted together).
    pub fn handshake_refused_count(&self, code: ErrorCode) -> u64 {
        self.refused_with(code).load(Ordering::Relaxed)
    }

    /// The counter of `code`'s refusals (`other` for a code not listed).
    fn refused_with(&self, code: ErrorCode) -> &AtomicU64 {
        let i = HANDSHAKE_CODES.iter().position(|&c| c == code).unwrap_or(HANDSHAKE_CODES.len());
        &self.handshakes_refused[i]
    }

    fn get(counter: &AtomicU64) -> f64 {
        counter.load(Ordering::Relaxed) as f64
    }
}

/// Binds the endpoint's TCP listener.
pub async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(crate::Error::io(format!("binding the metrics endpoint on {addr} (metrics_listen)")))
}

/// The connections being served, oldest first, at most `MAX_SCRAPES`.
#[derive(Default)]
struct Slots {
    next_id: u64,
    held: Vec<Held>,
}

struct Held {
    id: u64,
    /// Still sending its request head (may lose its place to a new connection).
    reading: bool,
    /// When it was admitted: a connection younger than `MIN_HOLD` is not evicted.
    since: Instant,
    evict: Arc<Notify>,
}

/// How long a new connection keeps its place whatever comes after it: time enough for
/// a scraper to send its head, so a flood of connections cannot evict each scrape
/// before it is read.
pub const MIN_HOLD: Duration = Duration::from_millis(50);

impl Slots {
    /// A place for a new connection: its id and the signal that takes the place away.
    /// When every place is taken, the oldest connection still reading its head is
    /// evicted (signalled and forgotten); `None` when every place is answering.
    fn admit(&mut self, now: Instant) -> Option<(u64, Arc<Notify>)> {
        if self.held.len() >= MAX_SCRAPES {
            let oldest = self.held.iter().position(|h| h.reading && now.duration_since(h.since) >= MIN_HOLD)?;
            // A stored permit: the task sees it even if it is not waiting yet.
            self.held.remove(oldest).evict.notify_one();
        }
        self.next_id += 1;
        let evict = Arc::new(Notify::new());
        self.held.push(Held { id: self.next_id, reading: true, since: now, evict: evict.clone() });
        Some((self.next_id, evict))
    }

    /// The connection's head is in: it answers now and keeps its place. `false` if it
    /// was evicted meanwhile.
    fn answering(&mut self, id: u64) -> bool {
        self.held.iter_mut().find(|h| h.id == id).map(|h| h.reading = false).is_some()
    }

    fn release(&mut self, id: u64) {
        self.held.retain(|h| h.id != id);
    }
}

/// Gives a connection's place back when its task ends, however it ends.
struct Place {
    slots: Arc<Mutex<Slots>>,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        lock(&self.slots).release(self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The last rendering and when it was made.
type Rendered = Mutex<Option<(Instant, Arc<str>)>>;

/// Accepts scrapes on `listener` until the broker is gone (or the task is aborted).
pub async fn serve(listener: TcpListener, shared: Weak<Shared>, started: SystemTime) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let rendered: Arc<Rendered> = Arc::default();
    let mut warned: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was taken: wait a
                // moment instead of spinning on the error.
                if warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                    tracing::warn!(error = %e, "metrics endpoint: accepting a connection failed");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.strong_count() == 0 {
            return;
        }
        // Every place answering: dropping it closes it (answers take at most
        // `REQUEST_TIMEOUT`; a scraper retries at its next interval).
        let Some((id, evict)) = lock(&slots).admit(Instant::now()) else { continue };
        let place = Place { slots: slots.clone(), id };
        let (shared, rendered) = (shared.clone(), rendered.clone());
        tokio::spawn(async move {
            let head_read = || lock(&place.slots).answering(place.id);
            let answered = || lock(&place.slots).release(place.id);
            tokio::select! {
                () = evict.notified() => {}
                _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &shared, started, &rendered, head_read, answered)) => {}
            }
        });
    }
}

/// Reads one request head and writes its answer; `head_read` says whether the
/// connection still has its place once the head is in, `answered` gives the place back
/// once the answer is written (the short drain after it holds none).
async fn answer(
    mut stream: TcpStream,
    shared: &Weak<Shared>,
    started: SystemTime,
    rendered: &Rendered,
    head_read: impl FnOnce() -> bool,
    answered: impl FnOnce(),
) -> std::io::Result<()> {
    let Ok(head) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await else { return Ok(()) };
    let Some((parsed, is_head)) = head? else { return Ok(()) };
    if !head_read() {
        return Ok(());
    }
    let (status, body, with_body) = match parsed {
        Ok(method) => {
            let Some(shared) = shared.upgrade() else { return Ok(()) };
            let body = {
                let mut last = lock(rendered);
                match &*last {
                    Some((at, body)) if at.elapsed() < RENDER_REUSE => body.clone(),
                    _ => {
                        let body: Arc<str> = render(&shared, started).into();
                        *last = Some((Instant::now(), body.clone()));
                        body
                    }
                }
            };
            ("200 OK", body, method == Method::Get)
        }
        Err(refusal) => (refusal.status(), format!("{}\n", refusal.status()).into(), !is_head),
    };
    let content_type = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let allow = if matches!(parsed, Err(Refusal::Method)) { "Allow: GET, HEAD\r\n" } else { "" };
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        answer.push_str(&body);
    }
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    answered();
    // Closing with request bytes unread (a body, a pipelined request, the rest of a head
    // too long) would reset the connection and could destroy the answer in flight: read
    // a little of what is left first, while `DRAINING_MAX` others do not.
    let Some(_draining) = Draining::take() else { return Ok(()) };
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        let mut sink = [0u8; 1024];
        let mut drained = 0;
        while drained < REQUEST_MAX_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

/// The request head's route and whether it is a HEAD request, once its blank line is
/// in; `None` if the client closed first.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<(Result<Method, Refusal>, bool)>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Where the blank line may still start: the search resumes there, not at 0 (a head
    // sent a byte at a time cost 33M comparisons).
    let mut from = 0;
    let parsed = loop {
        if let Some(end) = head_end(&head[from..]).map(|end| from + end) {
            // Judged by where the head ends, not by how the bytes happened to arrive.
            break if end > REQUEST_MAX_BYTES { Err(Refusal::HeadTooLarge) } else { route(&head[..end]) };
        }
        if head.len() > REQUEST_MAX_BYTES {
            break Err(Refusal::HeadTooLarge);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        // The blank line is at most 3 bytes: one starting 2 before the end is not ruled out.
        from = head.len().saturating_sub(2);
        head.extend_from_slice(&buf[..n]);
    };
    Ok(Some((parsed, head.starts_with(b"HEAD "))))
}

/// Bytes up to and including the blank line that ends a request head (CRLF CRLF, or
/// LF LF, which RFC 9112 section 2.2 lets a recipient accept).
fn head_end(head: &[u8]) -> Option<usize> {
    head.iter().enumerate().find_map(|(i, &b)| match (b, head.get(i + 1), head.get(i + 2)) {
        (b'\n', Some(b'\n'), _) => Some(i + 2),
        (b'\n', Some(b'\r'), Some(b'\n')) => Some(i + 3),
        _ => None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Get,
    Head,
}

/// Why a request gets no metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Not an HTTP/1.x request line.
    Malformed,
    /// A method other than GET or HEAD.
    Method,
    /// A path other than `PATH`.
    NotFound,
    /// A head longer than `REQUEST_MAX_BYTES`.
    HeadTooLarge,
}

impl Refusal {
    fn status(&self) -> &'static str {
        match self {
            Refusal::Malformed => "400 Bad Request",
            Refusal::Method => "405 Method Not Allowed",
            Refusal::NotFound => "404 Not Found",
            Refusal::HeadTooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// The request line of `head` (without its final blank line): GET or HEAD of `PATH`,
/// with or without a query string.
fn route(head: &[u8]) -> Result<Method, Refusal> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| Refusal::Malformed)?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed);
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Refusal::Malformed);
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => return Err(Refusal::Method),
    };
    let path = target.split('?').next().unwrap_or_default();
    if path == PATH { Ok(method) } else { Err(Refusal::NotFound) }
}

/// One metric family: name, help, type and its samples (labels, value).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

fn gauge(name: &'static str, help: &'static str, value: f64) -> Family {
    Family { name, help, kind: "gauge", samples: vec![(String::new(), value)] }
}

fn counter(name: &'static str, help: &'static str, value: f64) -> Family {
    Family { name, help, kind: "counter", samples: vec![(String::new(), value)] }
}

/// The exposition: one `# HELP` and one `# TYPE` line per family, then its samples.
pub fn render(shared: &Shared, started: SystemTime) -> String {
    let s = shared.status();
    let c = &shared.config;
    let n = &shared.counters;
    let commits = shared.store.commit_stats();
    let start = started.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let info = format!(
        "{{version=\"{}\",protocol=\"{}\",store_format=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        switchboard_protocol::PROTOCOL_VERSION,
        switchboard_storage::FORMAT
    );
    let mut families = vec![
        Family {
            name: "switchboard_info",
            help: "Version, protocol version and store format.",
            kind: "gauge",
            samples: vec![(info, 1.0)],
        },
        gauge("switchboard_start_time_seconds", "When this broker started, seconds since the Unix epoch.", start),
        gauge("switchboard_sessions", "Authenticated connections.", s.sessions as f64),
        gauge("switchboard_sessions_max", "max_connections.", c.max_connections as f64),
        gauge("switchboard_unauthenticated_connections", "Connections in their handshake.", s.unauthenticated as f64),
        gauge(
            "switchboard_unauthenticated_connections_max",
            "max_unauthenticated_connections.",
            c.max_unauthenticated_connections as f64,
        ),
        gauge("switchboard_conversations_live", "Conversation actors alive.", s.conversations as f64),
        gauge("switchboard_conversations_live_max", "max_live_conversations.", c.max_live_conversations as f64),
        gauge("switchboard_writes_in_flight", "Writes admitted and not yet answered.", s.writes_in_flight as f64),
        gauge("switchboard_writes_in_flight_max", "max_sends_in_flight.", c.max_sends_in_flight as f64),
        gauge("switchboard_uploads_live", "Upload actors alive.", s.uploads as f64),
        gauge("switchboard_chunk_buffer_bytes", "Bytes of upload chunk buffers held.", s.chunk_bytes_held as f64),
        gauge("switchboard_chunk_buffer_bytes_max", "transfer_buffer_bytes.", c.transfer_buffer_bytes as f64),
        gauge("switchboard_presence_users", "Users with a presence entry.", s.presence_users as f64),
        gauge(
            "switchboard_password_checks",
            "Password hashes running or queued (past their bound, OVERLOADED).",
            s.password_checks as f64,
        ),
        gauge("switchboard_commit_delay_seconds", "commit_delay_us, in seconds.", c.commit_delay_us as f64 / 1e6),
        gauge("switchboard_commit_siblings", "commit_siblings.", f64::from(c.commit_siblings)),
        counter("switchboard_sessions_started_total", "Sessions authenticated.", Counters::get(&n.sessions_started)),
        counter(
            "switchboard_tls_tickets_opened_total",
            "TLS resumption tickets presented and decrypted: an upper bound on handshakes that resumed a session.",
            Counters::get(&n.tls_tickets_opened),
        ),
        Family {
            name: "switchboard_handshakes_refused_total",
            help: "Handshakes refused after the hello (wrong password or key, rate limits, a full password queue, ...), by code.",
            kind: "counter",
            samples: HANDSHAKE_CODES
                .iter()
                .map(|c| c.name())
                .chain(["other"])
                .zip(&n.handshakes_refused)
                .map(|(code, count)| (format!("{{code=\"{code}\"}}"), Counters::get(count)))
                .collect(),
        },
        counter(
            "switchboard_connections_refused_total",
            "Connection attempts refused before a handshake (unauthenticated places, per-address places, or max_connections full).",
            Counters::get(&n.connections_refused),
        ),
        counter(
            "switchboard_quic_handshakes_failed_total",
            "QUIC/TLS handshakes that failed or timed out (a client that does not trust the certificate, a peer that went away).",
            Counters::get(&n.quic_handshakes_failed),
        ),
        counter(
            "switchboard_slow_consumers_total",
            "Devices disconnected with SLOW_CONSUMER (outbound queue overflowed).",
            s.slow_consumers as f64,
        ),
        counter(
            "switchboard_conversation_starts_refused_full_total",
            "Conversation actor starts refused with OVERLOADED at max_live_conversations (idle actors then retire sooner).",
            n.conversation_starts_refused_full.total() as f64,
        ),
        counter(
            "switchboard_entries_published_total",
            "Conversation log entries (messages, edits, deletes, membership changes) made durable and fanned out.",
            Counters::get(&n.entries_published),
        ),
        counter(
            "switchboard_entry_deliveries_total",
            "Copies of those entries queued to connected devices.",
            Counters::get(&n.entry_deliveries),
        ),
        counter(
            "switchboard_writes_refused_overloaded_total",
            "Writes refused with OVERLOADED.",
            s.writes_refused as f64,
        ),
        counter(
            "switchboard_uploads_refused_storage_full_total",
            "Uploads refused (BeginUpload) or stopped (a chunk) with STORAGE_FULL: the disk within disk_reserve_bytes of full.",
            s.uploads_refused_storage_full as f64,
        ),
        counter(
            "switchboard_writes_refused_storage_full_total",
            "Messages, edits, member additions, titles and new groups refused with STORAGE_FULL: the disk within a quarter of disk_reserve_bytes of full.",
            s.writes_refused_storage_full as f64,
        ),
        counter(
            "switchboard_upload_hashed_bytes_total",
            "Bytes of uploads hashed for their whole-file BLAKE3 (as written from offset 0; a resumed upload whole, once, at completion).",
            s.upload_bytes_hashed as f64,
        ),
        Family {
            name: "switchboard_thumbnails_total",
            help: "Completed images by what their thumbnail cost: decoded, reused (the same bytes decoded before), skipped (too many images waiting for a decode).",
            kind: "counter",
            samples: [
                ("decoded", Counters::get(&shared.files.thumbnails.decoded)),
                ("reused", Counters::get(&shared.files.thumbnails.reused)),
                ("skipped", shared.files.thumbnails.skipped.total() as f64),
            ]
            .into_iter()
            .map(|(how, n)| (format!("{{how=\"{how}\"}}"), n))
            .collect(),
        },
        commit_histogram(&commits),
        counter(
            "switchboard_group_commit_writes_total",
            "Waits ended by group commits (writes and barriers that asked for one): per commit, the group size.",
            commits.writes as f64,
        ),
        counter("switchboard_group_commits_slow_total", "Group commits that took over 50 ms.", commits.slow() as f64),
        counter(
            "switchboard_group_commits_delayed_total",
            "Group commits that began a wait for commit_delay_us (at least commit_siblings other message writes were waiting).",
            commits.delayed as f64,
        ),
        gauge("switchboard_disk_reserve_bytes", "disk_reserve_bytes.", c.disk_reserve_bytes as f64),
        gauge(
            "switchboard_upload_promised_bytes",
            "Bytes the uploads in progress that moved within upload_promise_secs may still write (counted against the free space).",
            shared.store.promised_bytes() as f64,
        ),
    ];
    if let Ok(free) = crate::files::requests::free_bytes(shared.files.blobs.root()) {
        families.push(gauge(
            "switchboard_data_dir_free_bytes",
            "Bytes free to the broker on the data dir's file system (uploads are refused within disk_reserve_bytes).",
            free as f64,
        ));
    }
    if let Some(not_after_s) = shared.certificate_not_after_s {
        families.push(gauge(
            "switchboard_certificate_expiry_timestamp_seconds",
            "The served chain's earliest notAfter, seconds since the Unix epoch (alert well before it: clients given it as --ca refuse it past it).",
            not_after_s as f64,
        ));
    }
    families.extend(process_families());
    let mut out = String::with_capacity(8192);
    for f in &families {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", f.name, f.help, f.name, f.kind);
        for (labels, value) in &f.samples {
            let _ = writeln!(out, "{}{labels} {value}", f.name);
        }
    }
    out
}

/// `switchboard_group_commit_seconds`: a histogram of commit durations (flush and
/// fdatasync), from the store's buckets.
fn commit_histogram(commits: &switchboard_storage::CommitStats) -> Family {
    let mut samples = Vec::with_capacity(commits.buckets.len() + 2);
    let mut cumulative = 0;
    for (i, count) in commits.buckets.iter().enumerate() {
        cumulative += count;
        let le = switchboard_storage::COMMIT_BUCKETS_US
            .get(i)
            .map_or("+Inf".to_owned(), |&us| (us as f64 / 1e6).to_string());
        samples.push((format!("_bucket{{le=\"{le}\"}}"), cumulative as f64));
    }
    samples.push(("_sum".to_owned(), commits.busy_us as f64 / 1e6));
    samples.push(("_count".to_owned(), cumulative as f64));
    Family {
        name: "switchboard_group_commit_seconds",
        help: "Group commit durations (one sled flush and one fdatasync each).",
        kind: "histogram",
        samples,
    }
}

/// Clock ticks per second for /proc/*/stat times (USER_HZ: 100 on every architecture
/// Linux exports them to user space this way).
pub const TICKS_PER_S: f64 = 100.0;

/// User+system CPU clock ticks from the text of /proc/PID/stat: the whole process,
/// threads that have exited included.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and ')'; fields resume after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The standard `process_*` families, from /proc/self (none where it cannot be read).
fn process_families() -> Vec<Family> {
    let mut families = Vec::new();
    if let Some(ticks) = std::fs::read_to_string("/proc/self/stat").ok().and_then(|stat| cpu_ticks(&stat)) {
        families.push(counter(
            "process_cpu_seconds_total",
            "User and system CPU time, seconds.",
            ticks as f64 / TICKS_PER_S,
        ));
    }
    if let Some(rss_kib) = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    }) {
        families.push(gauge("process_resident_memory_bytes", "Resident memory, bytes.", rss_kib * 1024.0));
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        families.push(gauge("process_open_fds", "Open file descriptors.", fds.count() as f64));
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line.split_whitespace().nth(3)?.parse::<f64>().ok()
    }) {
        families.push(gauge("process_max_fds", "Limit of open file descriptors (soft).", max));
    }
    families
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_and_head_of_the_metrics_path_are_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x"), Ok(Method::Get));
        assert_eq!(route(b"GET /metrics?name[]=x HTTP/1.0"), Ok(Method::Get));
        assert_eq!(route(b"HEAD /metrics HTTP/1.1"), Ok(Method::Head));
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Err(Refusal::Method));
        assert_eq!(route(b"GET / HTTP/1.1"), Err(Refusal::NotFound));
        assert_eq!(route(b"GET /metricsx HTTP/1.1"), Err(Refusal::NotFound));
        for malformed in [&b"GET /metrics"[..], b"GET /metrics HTTP/2", b"GET  /metrics HTTP/1.1", b"\xff\xfe", b""] {
            assert_eq!(route(malformed), Err(Refusal::Malformed), "{malformed:?}");
        }
    }

    #[test]
    fn a_tally_is_told_at_once_then_at_most_once_a_minute_with_the_count() {
        let tally = Tally::default();
        assert_eq!(tally.count(1_000), Some(1), "the first at once");
        assert_eq!(tally.count(2_000), None);
        assert_eq!(tally.count(60_999), None);
        assert_eq!(tally.count(61_000), Some(3), "a minute later, with those held back");
        assert_eq!(tally.count(61_001), None);
        assert_eq!(tally.total(), 5, "every one counted for the status line and the metrics");
    }

    #[test]
    fn a_head_ends_at_its_blank_line() {
        assert_eq!(head_end(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(34));
        assert_eq!(head_end(b"GET /metrics HTTP/1.1\nHost: x\n\n"), Some(31));
        assert_eq!(head_end(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    /// Full: a new connection takes the place of the oldest one still sending its head;
    /// connections that are answering keep theirs, and with none reading, the new one
    /// is turned away.
    #[test]
    fn when_full_the_oldest_connection_still_reading_gives_its_place() {
        let mut slots = Slots::default();
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..MAX_SCRAPES).map(|_| slots.admit(t0).unwrap()).collect();
        assert!(slots.answering(admitted[0].0), "the first one's head is in");
        assert!(slots.admit(t0 + MIN_HOLD / 2).is_none(), "no place is taken from a connection just admitted");
        let later = t0 + MIN_HOLD;
        let (newcomer, _) = slots.admit(later).expect("a place taken from a connection still reading");
        let held: Vec<u64> = slots.held.iter().map(|h| h.id).collect();
        assert!(!held.contains(&admitted[1].0) && held.contains(&admitted[0].0), "{held:?}");
        assert!(held.contains(&newcomer) && held.len() == MAX_SCRAPES);
        assert!(!slots.answering(admitted[1].0), "an evicted connection has no place to answer in");
        // Its signal was stored: the task sees it whenever it next waits.
        let mut notified = std::pin::pin!(admitted[1].1.notified());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(std::future::Future::poll(notified.as_mut(), &mut cx).is_ready());
        for h in slots.held.iter_mut() {
            h.reading = false;
        }
        assert!(slots.admit(later).is_none(), "every place answering: turned away");
        slots.release(newcomer);
        assert!(slots.admit(later).is_some(), "a place given back is taken");
    }
}
