//! The Prometheus endpoint (`metrics_listen`, OPERATIONS.md "Health checks and
//! monitoring"): what a scrape shows, what it refuses, and that it stays bounded.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;

use switchboard_broker::metrics::{
    DRAINING_MAX, HEAD_TIMEOUT, MAX_SCRAPES, MIN_HOLD, RENDER_REUSE, REQUEST_MAX_BYTES, REQUEST_TIMEOUT,
};
use switchboard_tests::{STEP_DEADLINE, TestBroker, bounded, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn metrics_broker() -> (TestBroker, SocketAddr) {
    let tb = TestBroker::start_with(|c| c.metrics_listen = Some(([127, 0, 0, 1], 0).into())).await;
    let addr = tb.broker.as_ref().unwrap().metrics_addr.expect("a metrics address");
    (tb, addr)
}

/// Sends `request` as is and returns the status line, the headers and the body.
async fn http(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    within(STEP_DEADLINE, "an HTTP answer", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_owned(), headers.to_owned(), body.to_owned())
    })
    .await
}

/// Scrapes and returns every sample by name (labels included), after checking that each
/// sample's metric has one `# HELP` and one `# TYPE` line before it.
async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, headers, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: broker\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("Content-Type: text/plain; version=0.0.4"), "{headers}");
    assert!(headers.contains(&format!("Content-Length: {}", body.len())), "{headers}");
    let mut samples = HashMap::new();
    let mut described = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            described.push(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        let (name, value) = line.rsplit_once(' ').unwrap();
        let bare = name.split('{').next().unwrap();
        // A histogram's samples carry a suffix on the family's name.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| bare.strip_suffix(suffix).filter(|f| described.iter().any(|d| d == f)))
            .unwrap_or(bare);
        assert_eq!(described.iter().filter(|d| *d == family).count(), 2, "HELP and TYPE of {family}: {body}");
        assert!(samples.insert(name.to_owned(), value.parse::<f64>().unwrap()).is_none(), "{name} twice");
    }
    samples
}

/// A scrape shows the moment's counts and the totals since the start, and moves with
/// what clients do: sessions, live conversations, group commits and the writes they
/// carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_what_the_broker_holds_and_did() {
    bounded(async {
        let (tb, addr) = metrics_broker().await;
        let before = scrape(addr).await;
        assert_eq!(before["switchboard_sessions"], 0.0);
        assert_eq!(before["switchboard_writes_refused_overloaded_total"], 0.0);
        assert_eq!(before["switchboard_sessions_max"], tb.shared().config.max_connections as f64);
        let info = format!(
            "switchboard_info{{version=\"{}\",protocol=\"{}\",store_format=\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            switchboard_protocol::PROTOCOL_VERSION,
            switchboard_storage::FORMAT
        );
        assert_eq!(before.get(&info), Some(&1.0), "{before:?}");
        // The start's barrier was one commit.
        assert!(before["switchboard_group_commit_seconds_count"] >= 1.0, "{before:?}");
        assert!(before["process_resident_memory_bytes"] > 0.0 && before["process_open_fds"] > 0.0, "{before:?}");
        assert!(before["switchboard_data_dir_free_bytes"] > 0.0, "{before:?}");

        let (alice, _) = tb.register("alice").await;
        let (_bob, _) = tb.register("bob").await;
        let conv = alice.create_direct("bob").await.unwrap().id;
        for text in ["one", "two", "three"] {
            alice.send(conv, text).await.unwrap();
        }
        // Past the reuse of the last rendering.
        tokio::time::sleep(RENDER_REUSE * 2).await;
        let after = scrape(addr).await;
        assert_eq!(after["switchboard_sessions"], 2.0, "{after:?}");
        assert_eq!(after["switchboard_conversations_live"], 1.0, "{after:?}");
        assert_eq!(after["switchboard_presence_users"], 2.0, "{after:?}");
        // Two accounts, two devices, a conversation and three messages: each durable
        // through a group commit before its answer.
        let writes = after["switchboard_group_commit_writes_total"] - before["switchboard_group_commit_writes_total"];
        let commits =
            after["switchboard_group_commit_seconds_count"] - before["switchboard_group_commit_seconds_count"];
        assert!(writes >= 3.0 && commits >= 1.0 && commits <= writes, "{writes} writes in {commits} commits");
        assert!(after["switchboard_group_commit_seconds_sum"] > before["switchboard_group_commit_seconds_sum"]);
        // The histogram's buckets are cumulative and end with every commit.
        let buckets: Vec<f64> = switchboard_storage::COMMIT_BUCKETS_US
            .iter()
            .map(|us| (*us as f64 / 1e6).to_string())
            .chain(["+Inf".to_owned()])
            .map(|le| after[&format!("switchboard_group_commit_seconds_bucket{{le=\"{le}\"}}")])
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        assert_eq!(buckets.last(), Some(&after["switchboard_group_commit_seconds_count"]));
        // What clients did, counted: two sessions, the three messages published (and the
        // conversation's creation), each delivered at least to bob.
        assert_eq!(after["switchboard_sessions_started_total"], 2.0, "{after:?}");
        let published = after["switchboard_entries_published_total"] - before["switchboard_entries_published_total"];
        let delivered = after["switchboard_entry_deliveries_total"] - before["switchboard_entry_deliveries_total"];
        assert!(published >= 3.0 && delivered >= 3.0, "{published} published, {delivered} delivered");
        // A wrong password is a refused handshake, counted by its code.
        let wrong = tb.connector().login("alice", "not the password", "thief").await.err().unwrap();
        assert_eq!(wrong.code(), Some(switchboard_protocol::ErrorCode::AUTH_FAILED));
        tokio::time::sleep(RENDER_REUSE * 2).await;
        let refused = scrape(addr).await;
        assert_eq!(refused["switchboard_handshakes_refused_total{code=\"AUTH_FAILED\"}"], 1.0, "{refused:?}");
        assert_eq!(refused["switchboard_handshakes_refused_total{code=\"other\"}"], 0.0, "{refused:?}");
        assert_eq!(refused["switchboard_sessions_started_total"], 2.0);
        // A health check's probe (hello, then close) refuses nothing.
        tb.connector().probe().await.unwrap();
        tokio::time::sleep(RENDER_REUSE * 2).await;
        let probed = scrape(addr).await;
        let others: f64 = probed
            .iter()
            .filter(|(k, _)| k.starts_with("switchboard_handshakes_refused_total") && !k.contains("AUTH_FAILED"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(others, 0.0, "{probed:?}");
        assert_eq!(after["switchboard_start_time_seconds"], before["switchboard_start_time_seconds"]);
        // HEAD: the same head, no body.
        let (status, headers, body) = http(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains("Content-Length: ") && body.is_empty(), "{headers} / {body}");
    })
    .await
}

/// What is not a GET of /metrics gets its own status and no figures; a request head
/// past the bound is refused, whole or unfinished. Connections that hold every place by
/// sending nothing do not keep a scraper out: the newest takes the place of the oldest
/// still reading, and the rest are closed after `HEAD_TIMEOUT`. Clients of the broker
/// see none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_refuses_what_it_does_not_serve_and_stays_bounded() {
    bounded(async {
        let (tb, addr) = metrics_broker().await;
        let refused = [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 404 Not Found"),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", "HTTP/1.1 405 Method Not Allowed"),
            (b"hello there\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ];
        for (request, expected) in refused {
            let (status, headers, body) = http(addr, request).await;
            assert_eq!(status, expected);
            assert!(!body.contains("switchboard_"), "{body}");
            if expected.contains("405") {
                assert!(headers.contains("Allow: GET, HEAD"), "{headers}");
            }
        }
        let (status, _, body) = http(addr, b"HEAD /nothing HTTP/1.1\r\n\r\n").await;
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 404 Not Found", ""), "HEAD has no body");
        let mut long = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', REQUEST_MAX_BYTES + 1));
        let unfinished = long.clone();
        long.extend_from_slice(b"\r\n\r\n");
        for head in [long, unfinished] {
            let (status, _, _) = http(addr, &head).await;
            assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
        }

        // Every place held by a connection that sends part of a head and no more.
        let mut held = Vec::new();
        for _ in 0..MAX_SCRAPES {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"GET /met").await.unwrap();
            held.push(stream);
        }
        let holding = std::time::Instant::now();
        // A scraper still gets its answer (once the holders have had `MIN_HOLD`).
        tokio::time::sleep(MIN_HOLD * 2).await;
        assert_eq!(scrape(addr).await["switchboard_sessions"], 0.0);
        // The broker serves its clients meanwhile.
        let (alice, _) = tb.register("alice").await;
        alice.ping().await.unwrap();
        // The holders are closed, unanswered, once their head is late.
        for mut stream in held {
            let mut answer = Vec::new();
            let read = within(STEP_DEADLINE, "a holder closed", stream.read_to_end(&mut answer)).await;
            assert!(read.is_err() || answer.is_empty(), "a holder was answered: {answer:?}");
        }
        let took = holding.elapsed();
        assert!(took < REQUEST_TIMEOUT, "holders closed after {took:?}: the head's {HEAD_TIMEOUT:?} did not apply");
        tokio::time::sleep(RENDER_REUSE * 2).await;
        assert_eq!(scrape(addr).await["switchboard_sessions"], 1.0);
    })
    .await
}

/// Clients that send a request and never read the answer nor close hold few of the
/// endpoint's sockets once answered (`DRAINING_MAX`): before, every one answered held its
/// socket for a tenth of a second more, as many as the clients could send in that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_clients_that_never_read_hold_few_sockets() {
    let (_tb, addr) = metrics_broker().await;
    // Four streams of clients one after another, each client sending its request and
    // then holding its connection, never reading; what the endpoint holds is looked at
    // meanwhile (before, it held every client answered in the last tenth of a second).
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..4 {
        streams.spawn(async move {
            let (mut held, start) = (Vec::new(), std::time::Instant::now());
            // At most 150 each: 600 clients stay well under a 1,024-descriptor limit.
            while start.elapsed() < std::time::Duration::from_millis(500) && held.len() < 150 {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: broker\r\n\r\n").await.unwrap();
                held.push(stream);
            }
            held
        });
    }
    let (mut most, mut held) = (0, Vec::new());
    while !streams.is_empty() {
        most = most.max(sockets_on_port(addr.port()));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        while let Some(done) = streams.try_join_next() {
            held.extend(done.unwrap());
        }
    }
    // Its listener too.
    let bound = DRAINING_MAX + MAX_SCRAPES + 1 + 4;
    assert!(most <= bound, "the endpoint held {most} sockets for {} clients (bound {bound})", held.len());
}

/// Descriptors of this process that are TCP sockets with `port` on their own side (a
/// listener and the connections it accepted; not the clients', nor other tests'), from
/// /proc: a socket the process let go of is no descriptor, even while the kernel keeps it.
fn sockets_on_port(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let inodes: std::collections::HashSet<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local == port).then_some(*fields.get(9)?)
        })
        .collect();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| {
            let link = link.to_string_lossy();
            link.strip_prefix("socket:[").and_then(|rest| rest.strip_suffix(']')).is_some_and(|i| inodes.contains(i))
        })
        .count()
}

/// A head that arrives in pieces is answered once its blank line is in, wherever the
/// pieces cut it (the search for the blank line resumes near where the last piece ended,
/// so a head sent a byte at a time no longer costs a rescan per byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_in_pieces_is_answered_wherever_its_blank_line_is_cut() {
    bounded(async {
        let (_tb, addr) = metrics_broker().await;
        let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in [head.len() - 3, head.len() - 2, head.len() - 1] {
            within(STEP_DEADLINE, "an answer to a head in pieces", async {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                for piece in [&head[..cut - 1], &head[cut - 1..cut], &head[cut..]] {
                    stream.write_all(piece).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                }
                let mut answer = Vec::new();
                stream.read_to_end(&mut answer).await.unwrap();
                assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "cut at {cut}: {}", String::from_utf8_lossy(&answer));
            })
            .await;
        }
    })
    .await
}

/// An address that cannot be bound fails the start, naming the setting.
#[tokio::test]
async fn a_metrics_address_in_use_fails_the_start_by_name() {
    bounded(async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = switchboard_tests::test_config(dir.path().join("data"));
        config.metrics_listen = Some(addr);
        let error = switchboard_broker::Broker::start(config).await.err().expect("the start fails");
        assert!(error.to_string().contains("metrics_listen"), "{error}");
        // Nothing was opened: the data dir was not created.
        assert!(!dir.path().join("data").exists());
    })
    .await
}

/// An operator's certificate past its notAfter: the broker still starts (pinned clients
/// connect), the metrics endpoint shows the notAfter for an alert, and clients given the
/// certificate as `--ca` refuse the broker, saying it expired.
#[tokio::test]
async fn an_expired_operator_certificate_is_shown_and_refused_by_ca_clients_only() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let tb = TestBroker::start_with(|c| {
            c.metrics_listen = Some(([127, 0, 0, 1], 0).into());
            c.cert = Some(cert_path.clone());
            c.key = Some(key_path.clone());
        })
        .await;
        let broker = tb.broker.as_ref().unwrap();
        let samples = scrape(broker.metrics_addr.unwrap()).await;
        assert_eq!(samples["switchboard_certificate_expiry_timestamp_seconds"], 1_609_459_200.0); // 2021-01-01
        let refused = tb.connector().register("alice", tb.password, "d").await.err().expect("an expired certificate");
        assert!(refused.to_string().contains("expired"), "{refused}");
        // The client's refusal is a failed handshake on the broker too: counted (before,
        // nothing counted it, and a rotation clients did not trust went unseen: an
        // operator's trial).
        within(STEP_DEADLINE, "the failed handshake counted", async {
            loop {
                tokio::time::sleep(RENDER_REUSE * 2).await;
                let after = scrape(broker.metrics_addr.unwrap()).await;
                if after["switchboard_quic_handshakes_failed_total"] >= 1.0 {
                    return;
                }
            }
        })
        .await;
        let pinned = switchboard_client::Connector::new(
            broker.local_addr,
            "localhost",
            switchboard_client::Trust::Pin(broker.fingerprint.clone()),
        )
        .unwrap();
        within(STEP_DEADLINE, "a pinned register", pinned.register("alice", tb.password, "d")).await.unwrap();
    })
    .await
}
