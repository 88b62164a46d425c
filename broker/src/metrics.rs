//! The Prometheus endpoint (`Config::metrics_listen`): `GET /metrics` answers what the
//! broker holds at that moment and what it did since it started, in the text exposition
//! format 0.0.4 (<https://prometheus.io/docs/instrumenting/exposition_formats/>).
//!
//! Every figure is read when the scrape arrives, from the same counters as the status
//! line (`Shared::status`) and the store's commit totals (`Store::commit_stats`): nothing
//! on the message path records anything for it. The endpoint is plain HTTP/1.1, one
//! request per connection, and bounded: at most `MAX_SCRAPES` connections are served at
//! once (more are closed at once), a request head is read for at most
//! `REQUEST_TIMEOUT` and `REQUEST_MAX_BYTES`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::Shared;

/// Scrapes served at once; a connection beyond is closed unanswered.
pub const MAX_SCRAPES: usize = 4;
/// Longest request head read (request line and headers), bytes; longer is answered 431.
pub const REQUEST_MAX_BYTES: usize = 8 * 1024;
/// Time a client has to send its request head (and, after, to take the answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The path served; any other is answered 404.
pub const PATH: &str = "/metrics";

/// Binds the endpoint's TCP listener.
pub async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(crate::Error::io(format!("binding the metrics endpoint on {addr} (metrics_listen)")))
}

/// Accepts scrapes on `listener` until the broker is gone (or the task is aborted).
pub async fn serve(listener: TcpListener, shared: Weak<Shared>, started: SystemTime) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was taken: wait a
                // moment instead of spinning on the error.
                tracing::debug!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.strong_count() == 0 {
            return;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Dropping it closes it: a scraper retries at its next interval.
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &shared, started)).await;
        });
    }
}

/// Reads one request head and writes its answer.
async fn answer(mut stream: TcpStream, shared: &Weak<Shared>, started: SystemTime) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let parsed = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            // Judged by where the head ends, not by how the bytes happened to arrive.
            break if end + 4 > REQUEST_MAX_BYTES { Err(Refusal::HeadTooLarge) } else { route(&head[..end]) };
        }
        if head.len() > REQUEST_MAX_BYTES {
            break Err(Refusal::HeadTooLarge);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let (status, body, with_body) = match parsed {
        Ok(method) => {
            let Some(shared) = shared.upgrade() else { return Ok(()) };
            ("200 OK", render(&shared, started), method == Method::Get)
        }
        Err(refusal) => (refusal.status(), format!("{}\n", refusal.status()), true),
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
    stream.shutdown().await
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

/// The exposition: one `# HELP`, one `# TYPE` and one sample per metric.
pub fn render(shared: &Shared, started: SystemTime) -> String {
    let s = shared.status();
    let c = &shared.config;
    let commits = shared.store.commit_stats();
    let start = started.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let mut out = String::with_capacity(4096);
    let info = format!(
        "switchboard_info{{version=\"{}\",protocol=\"{}\",store_format=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        switchboard_protocol::PROTOCOL_VERSION,
        switchboard_storage::FORMAT
    );
    let gauges: [(&str, &str, f64); 15] = [
        ("switchboard_start_time_seconds", "When this broker started, seconds since the Unix epoch.", start),
        ("switchboard_sessions", "Authenticated connections.", s.sessions as f64),
        ("switchboard_sessions_max", "max_connections.", c.max_connections as f64),
        ("switchboard_unauthenticated_connections", "Connections in their handshake.", s.unauthenticated as f64),
        (
            "switchboard_unauthenticated_connections_max",
            "max_unauthenticated_connections.",
            c.max_unauthenticated_connections as f64,
        ),
        ("switchboard_conversations_live", "Conversation actors alive.", s.conversations as f64),
        ("switchboard_conversations_live_max", "max_live_conversations.", c.max_live_conversations as f64),
        ("switchboard_writes_in_flight", "Writes admitted and not yet answered.", s.writes_in_flight as f64),
        ("switchboard_writes_in_flight_max", "max_sends_in_flight.", c.max_sends_in_flight as f64),
        ("switchboard_uploads_live", "Upload actors alive.", s.uploads as f64),
        ("switchboard_chunk_buffer_bytes", "Bytes of upload chunk buffers held.", s.chunk_bytes_held as f64),
        ("switchboard_chunk_buffer_bytes_max", "transfer_buffer_bytes.", c.transfer_buffer_bytes as f64),
        ("switchboard_presence_users", "Users with a presence entry.", s.presence_users as f64),
        (
            "switchboard_store_healthy",
            "1 while the store commits; 0 once a commit failed (the broker stops serving).",
            if shared.health.is_failed() { 0.0 } else { 1.0 },
        ),
        ("switchboard_commit_delay_seconds", "commit_delay_us, in seconds.", c.commit_delay_us as f64 / 1e6),
    ];
    let counters: [(&str, &str, f64); 6] = [
        ("switchboard_writes_refused_overloaded_total", "Writes refused with OVERLOADED.", s.writes_refused as f64),
        (
            "switchboard_uploads_refused_storage_full_total",
            "Uploads refused with STORAGE_FULL (the disk within disk_reserve_bytes of full).",
            s.uploads_refused_storage_full as f64,
        ),
        (
            "switchboard_group_commits_total",
            "Group commits (one flush and one fdatasync each).",
            commits.commits as f64,
        ),
        (
            "switchboard_group_commit_writes_total",
            "Writes made durable by group commits (per commit: the group size).",
            commits.writes as f64,
        ),
        (
            "switchboard_group_commit_seconds_total",
            "Time spent in group commits (flush and fdatasync).",
            commits.busy_us as f64 / 1e6,
        ),
        ("switchboard_group_commits_slow_total", "Group commits that took over 50 ms.", commits.slow as f64),
    ];
    let _ = writeln!(out, "# HELP switchboard_info Version, protocol version and store format.");
    let _ = writeln!(out, "# TYPE switchboard_info gauge\n{info} 1");
    for (kind, metrics) in [("gauge", &gauges[..]), ("counter", &counters[..])] {
        for (name, help, value) in metrics {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        }
    }
    out
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
}
