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
//! emulates a link (`switchboard_loadtest::link`), each way alike:
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
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_client::{Connector, Trust};
use switchboard_loadtest::link::{Link, Relay};
use switchboard_loadtest::scenario::upload;

/// Bound on one download: a stalled link fails the run instead of hanging it.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// One download of `bytes` through `link`; prints a line.
async fn download(bytes: u64, link: Link, run: u64, variant: Variant) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut transport =
        switchboard_broker::tls::transport_config(&switchboard_broker::Config::ephemeral(dir.path().join("data")));
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
    let (server, cert, config) = upload::bulk_server(dir.path(), Some(transport))?;
    let server_addr = server.local_addr()?;

    let relay = Relay::start(server_addr, link, run)?;
    let front_addr: SocketAddr = relay.addr;
    let connector = Connector::new(front_addr, "localhost", Trust::CaFile(cert))?;
    let drops = relay.drops.clone();

    let served = tokio::spawn(async move {
        let conn = server.accept().await.ok_or_else(|| anyhow::anyhow!("endpoint closed"))?.await?;
        switchboard_broker::tls::open_session_window(&conn, &config);
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut request = [0u8; 1];
        recv.read_exact(&mut request).await?;
        upload::write_bytes(&mut send, &Bytes::from(vec![0x5a; 1 << 20]), bytes).await?;
        send.finish()?;
        conn.closed().await;
        anyhow::Ok(conn.stats())
    });

    let conn = connector.endpoint().connect(front_addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let start = Instant::now();
    send.write_all(&[1]).await?;
    let received = tokio::time::timeout(DOWNLOAD_TIMEOUT, upload::drain(&mut recv))
        .await
        .map_err(|_| anyhow::anyhow!("{variant}: no end of the download within {DOWNLOAD_TIMEOUT:?}"))??;
    let secs = start.elapsed().as_secs_f64();
    let client = conn.stats();
    conn.close(0u32.into(), b"done");
    let server = served.await??;
    drop(relay);
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
    anyhow::ensure!(bytes > 0, usage);
    let link = Link::new(loss_pct, rtt_ms, mbit)?;
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
