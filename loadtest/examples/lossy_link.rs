//! A bulk download over an emulated lossy link, with the broker's transport settings and
//! with its ACK-frequency request changed, the variants taking turns within each run
//! (docs/benchmarks.md, "ACK frequency on a lossy link").
//!
//! ```sh
//! cargo run --release -p switchboard-loadtest --example lossy_link -- BYTES LOSS_PCT RTT_MS RATE_MBIT [RUNS [VARIANT,...]]
//! ```
//!
//! VARIANT is `broker` (the broker's settings), `off` (no ACK-frequency request: the
//! client acknowledges every second packet, and at once on any gap, as RFC 9000 says) or
//! a number N (a request for an ACK after N + 1 ack-eliciting packets or the 25 ms delay,
//! and on a gap once it would let the server declare a loss: quinn's reordering
//! threshold, 2); the default is `broker,1,off` (`1` differs from `off` only in the
//! reordering threshold).
//!
//! A server endpoint with the broker's TLS and transport settings
//! (`switchboard_broker::tls::transport_config`) sends BYTES on one stream to a client
//! endpoint with the client library's settings, through a relay in this process that
//! emulates a link, each way alike:
//! - it drops each datagram with probability LOSS_PCT / 100, from a generator seeded per
//!   run and direction: the n-th datagram each way meets the same draw in every variant
//!   of a run, but the variants send different numbers of ACKs, so which packets are lost
//!   differs in detail;
//! - it sends at most RATE_MBIT megabits per second, queueing up to the larger of one
//!   RTT and 20 ms of sending time and dropping what does not fit (drop-tail, as a
//!   router's buffer);
//! - it delays each datagram by RTT_MS / 2 after it leaves the queue.
//!
//! Each run prints, per variant, MB/s (10^6 bytes) as a share of the link's rate, the
//! datagrams the server sent and declared lost, the ACK frames the client sent, and
//! what the relay dropped at random, at its queue, and by failing to send. The variants'
//! order rotates from run to run. Loopback and both endpoints share this process, so
//! rates above a few hundred megabits measure the machine, not the link; and tokio's
//! timers fire on whole milliseconds, so datagrams leave the relay in trains of up to a
//! millisecond (the same for every variant, but a real share of a 5 ms RTT).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_client::{Connector, Trust};
use tokio::net::UdpSocket;

/// The link emulated, each way.
#[derive(Clone, Copy, Debug)]
struct Link {
    /// Probability that a datagram is dropped at random.
    loss: f64,
    /// Delay after the queue.
    one_way: Duration,
    /// Sending rate, bytes per second.
    bytes_per_s: f64,
    /// Longest wait in the queue before a datagram is dropped instead.
    queue: Duration,
}

/// Datagrams the relay dropped, each way together.
#[derive(Default)]
struct Drops {
    /// Drawn at random (`Link::loss`).
    random: AtomicU64,
    /// Over the queue's length (`Link::queue`).
    queue: AtomicU64,
    /// Sends that failed (e.g. the receiving socket's buffer was full).
    send_failed: AtomicU64,
}

/// Bound on one download: a stalled link fails the run instead of hanging it.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A seed per run and direction (splitmix64 of both).
fn seed(run: u64, direction: u64) -> u64 {
    let mut z = (run << 1 | direction).wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// A UDP socket on 127.0.0.1 with the broker's 4 MiB buffers: the kernel's defaults
/// drop loopback bursts, and such drops would go uncounted.
fn relay_socket() -> anyhow::Result<Arc<UdpSocket>> {
    let socket = switchboard_broker::tls::bind_udp(([127, 0, 0, 1], 0).into(), 1)?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no UDP socket"))?;
    socket.set_nonblocking(true)?;
    Ok(Arc::new(UdpSocket::from_std(socket)?))
}

/// xorshift64: a seeded sequence in [0, 1).
struct Uniform(u64);

impl Uniform {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction of the link: what arrives on `from` leaves `to` for `dest`, until a
/// receive fails (reported).
async fn pipe(from: Arc<UdpSocket>, to: Arc<UdpSocket>, dest: SocketAddr, link: Link, seed: u64, drops: Arc<Drops>) {
    // Holds at most (queue + one_way) x rate bytes: departures are paced at the rate.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let sent_drops = drops.clone();
    let sender = tokio::spawn(async move {
        while let Some((due, datagram)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.send_to(&datagram, dest).await.is_err() {
                sent_drops.send_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut uniform = Uniform(seed);
    let mut busy_until = Instant::now();
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match from.recv_from(&mut buf).await {
            Ok((n, _)) => n,
            Err(e) => {
                eprintln!("relay: receive failed, the link is down: {e}");
                break;
            }
        };
        if uniform.next() < link.loss {
            drops.random.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let now = Instant::now();
        let start = busy_until.max(now);
        if start.duration_since(now) > link.queue {
            drops.queue.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        busy_until = start + Duration::from_secs_f64(n as f64 / link.bytes_per_s);
        if tx.send((busy_until + link.one_way, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    sender.abort();
}

/// One download of `bytes` through `link`; prints a line.
async fn download(bytes: u64, link: Link, run: u64, variant: Variant) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = switchboard_broker::Config::ephemeral(dir.path().join("data"));
    let identity = switchboard_broker::tls::load_or_generate(&config)?;
    let mut server_config = switchboard_broker::tls::server_config(&identity, &config, Default::default())?;
    let mut transport = switchboard_broker::tls::transport_config(&config);
    match variant {
        Variant::Broker => {}
        Variant::Off => {
            transport.ack_frequency_config(None);
        }
        Variant::Threshold(n) => {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(n.into());
            transport.ack_frequency_config(Some(ack));
        }
    }
    server_config.transport_config(Arc::new(transport));
    let socket = switchboard_broker::tls::bind_udp(([127, 0, 0, 1], 0).into(), 1)?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no UDP socket"))?;
    let server = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    let server_addr = server.local_addr()?;

    let front = relay_socket()?;
    let back = relay_socket()?;
    let front_addr = front.local_addr()?;
    let connector = Connector::new(front_addr, "localhost", Trust::CaFile(identity.cert_path.clone()))?;
    let client_addr = SocketAddr::from(([127, 0, 0, 1], connector.endpoint().local_addr()?.port()));
    let drops = Arc::new(Drops::default());
    let up = tokio::spawn(pipe(front.clone(), back.clone(), server_addr, link, seed(run, 0), drops.clone()));
    let down = tokio::spawn(pipe(back, front, client_addr, link, seed(run, 1), drops.clone()));

    let served = tokio::spawn(async move {
        let conn = server.accept().await.ok_or_else(|| anyhow::anyhow!("endpoint closed"))?.await?;
        switchboard_broker::tls::open_session_window(&conn, &config);
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut request = [0u8; 1];
        recv.read_exact(&mut request).await?;
        let piece = Bytes::from(vec![0x5a; 1 << 20]);
        let mut left = bytes;
        while left > 0 {
            let n = left.min(piece.len() as u64) as usize;
            send.write_chunk(piece.slice(..n)).await?;
            left -= n as u64;
        }
        send.finish()?;
        conn.closed().await;
        anyhow::Ok(conn.stats())
    });

    let conn = connector.endpoint().connect(front_addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let start = Instant::now();
    send.write_all(&[1]).await?;
    let received = tokio::time::timeout(DOWNLOAD_TIMEOUT, async {
        let mut received = 0u64;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
            received += chunk.bytes.len() as u64;
        }
        anyhow::Ok(received)
    })
    .await
    .map_err(|_| anyhow::anyhow!("{variant}: no end of the download within {DOWNLOAD_TIMEOUT:?}"))??;
    let secs = start.elapsed().as_secs_f64();
    let client = conn.stats();
    conn.close(0u32.into(), b"done");
    let server = served.await??;
    up.abort();
    down.abort();
    anyhow::ensure!(received == bytes, "received {received} of {bytes} bytes");
    println!(
        "{:<24} {:>7.2} MB/s ({:>5.1}% of the link)  server sent {:>6}, lost {:>5}  \
         client ACK frames {:>5}  relay dropped {:>5} at random, {:>5} at the queue, {} unsent",
        variant.to_string(),
        bytes as f64 / secs / 1e6,
        bytes as f64 / secs / link.bytes_per_s * 100.0,
        server.path.sent_packets,
        server.path.lost_packets,
        client.frame_tx.acks,
        drops.random.load(Ordering::Relaxed),
        drops.queue.load(Ordering::Relaxed),
        drops.send_failed.load(Ordering::Relaxed),
    );
    Ok(())
}

/// The server's ACK-frequency request.
#[derive(Clone, Copy, Debug)]
enum Variant {
    /// The broker's (`tls::ACK_ELICITING_THRESHOLD`).
    Broker,
    /// None: the client acknowledges every second packet (QUIC's default).
    Off,
    /// An ACK after this many ack-eliciting packets plus one.
    Threshold(u32),
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Variant> {
        Ok(match s {
            "broker" => Variant::Broker,
            "off" => Variant::Off,
            n => Variant::Threshold(n.parse()?),
        })
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Variant::Broker => write!(f, "broker's settings ({})", switchboard_broker::tls::ACK_ELICITING_THRESHOLD),
            Variant::Off => write!(f, "ACK frequency off"),
            Variant::Threshold(n) => write!(f, "threshold {n}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: lossy_link BYTES LOSS_PCT RTT_MS RATE_MBIT [RUNS [VARIANT,...]]";
    anyhow::ensure!((4..=6).contains(&args.len()), usage);
    let bytes: u64 = args[0].parse()?;
    let loss_pct: f64 = args[1].parse()?;
    let rtt_ms: f64 = args[2].parse()?;
    let mbit: f64 = args[3].parse()?;
    let runs: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let variants: Vec<Variant> =
        args.get(5).map_or("broker,1,off", String::as_str).split(',').map(str::parse).collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(bytes > 0 && (0.0..100.0).contains(&loss_pct) && rtt_ms >= 0.0 && mbit > 0.0, usage);
    let link = Link {
        loss: loss_pct / 100.0,
        one_way: Duration::from_secs_f64(rtt_ms / 2000.0),
        bytes_per_s: mbit * 1e6 / 8.0,
        queue: Duration::from_secs_f64((rtt_ms / 1000.0).max(0.02)),
    };
    println!("{bytes} bytes, {loss_pct}% loss each way, RTT {rtt_ms} ms, {mbit} Mbit/s, queue {:?}", link.queue);
    for run in 0..runs {
        println!("run {run}");
        let turn = run as usize % variants.len();
        for &variant in variants[turn..].iter().chain(&variants[..turn]) {
            download(bytes, link, run, variant).await?;
        }
    }
    Ok(())
}
