//! An emulated network link for one client: a UDP relay in this process between a
//! client endpoint and a server address that drops datagrams at random, sends at a set
//! rate from a drop-tail queue, and delays what it sends, each way alike. This machine's
//! kernel has no `netem`; the relay stands in for it in `examples/lossy_link.rs` (docs/
//! benchmarks.md, "ACK frequency on a lossy link") and in the end-to-end test of a file
//! over a lossy link (`tests/tests/files.rs`).
//!
//! Limits: tokio's timers fire on whole milliseconds, so datagrams leave in trains of up
//! to a millisecond; rates above a few hundred megabits measure this machine, not the
//! link. The relay serves one client endpoint at a time: datagrams from the server go to
//! the address that last sent to the relay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::scenario::SplitMix;
use crate::{Error, Result};

/// The link emulated, each way.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// Probability that a datagram is dropped at random, 0 to 1.
    pub loss: f64,
    /// Delay after the queue: half the round trip.
    pub one_way: Duration,
    /// Sending rate, bytes per second.
    pub bytes_per_s: f64,
    /// Longest wait in the queue; a datagram that would wait longer is dropped.
    pub queue: Duration,
}

impl Link {
    /// A link of `loss_pct` % random loss each way (0 to 100), a round trip of `rtt_ms`
    /// ms (0 to an hour) and `mbit` megabits per second (above 0), with a queue of one
    /// round trip (at least 20 ms). Other values are `Error::InvalidArgs`.
    pub fn new(loss_pct: f64, rtt_ms: f64, mbit: f64) -> Result<Link> {
        if !((0.0..=100.0).contains(&loss_pct)
            && (0.0..=3_600_000.0).contains(&rtt_ms)
            && mbit > 0.0
            && mbit.is_finite())
        {
            return Err(Error::InvalidArgs(format!(
                "a link needs 0-100% loss, an RTT of 0 ms to an hour and a positive rate: got {loss_pct}%, {rtt_ms} ms, {mbit} Mbit/s"
            )));
        }
        Ok(Link {
            loss: loss_pct / 100.0,
            one_way: Duration::from_secs_f64(rtt_ms / 2000.0),
            bytes_per_s: mbit * 1e6 / 8.0,
            queue: Duration::from_secs_f64((rtt_ms / 1000.0).max(0.02)),
        })
    }
}

/// Datagrams the relay dropped, both ways together.
#[derive(Debug, Default)]
pub struct LinkDrops {
    /// Drawn at random (`Link::loss`).
    pub random: AtomicU64,
    /// Over the queue's length (`Link::queue`).
    pub queue: AtomicU64,
    /// Sends that failed (e.g. the receiving socket's buffer was full), and datagrams
    /// from the server before any client had sent to the relay.
    pub send_failed: AtomicU64,
}

/// A running relay; stopped when dropped.
pub struct Relay {
    /// Where the client connects.
    pub addr: SocketAddr,
    /// What it dropped so far.
    pub drops: Arc<LinkDrops>,
    _tasks: [crate::AbortOnDrop<()>; 2],
}

impl Relay {
    /// Starts relaying between clients that send to `Relay::addr` and `server`, through
    /// `link`; `seed` picks the sequence of random drops (the n-th datagram each way meets
    /// the same draw for the same seed). Runs on the current tokio runtime (panics
    /// outside one). The relay is on 127.0.0.1: an IPv6 `server` is
    /// `Error::InvalidArgs`.
    pub fn start(server: SocketAddr, link: Link, seed: u64) -> Result<Relay> {
        if !server.is_ipv4() {
            return Err(Error::InvalidArgs(format!("the relay reaches IPv4 servers only, not {server}")));
        }
        let front = relay_socket()?;
        let back = relay_socket()?;
        let addr = front.local_addr().map_err(Error::io("reading the relay's address"))?;
        let client = Arc::new(Mutex::new(None));
        let drops = Arc::new(LinkDrops::default());
        let up = Pipe { from: front.clone(), to: back.clone(), link, seed: seed << 1, drops: drops.clone() };
        let down = Pipe { from: back, to: front, link, seed: seed << 1 | 1, drops: drops.clone() };
        let learned = client.clone();
        let _tasks = [
            crate::AbortOnDrop(tokio::spawn(up.run(Dest::Fixed(server), Some(learned)))),
            crate::AbortOnDrop(tokio::spawn(down.run(Dest::Learned(client), None))),
        ];
        Ok(Relay { addr, drops, _tasks })
    }
}

/// A UDP socket on 127.0.0.1 with the broker's 4 MiB buffers: the kernel's defaults drop
/// loopback bursts, and such drops would go uncounted.
fn relay_socket() -> Result<Arc<UdpSocket>> {
    let socket = switchboard_broker::tls::bind_udp(([127, 0, 0, 1], 0).into(), 1)?
        .pop()
        .ok_or_else(|| Error::Protocol("no UDP socket".into()))?;
    socket.set_nonblocking(true).map_err(Error::io("making the relay's socket non-blocking"))?;
    Ok(Arc::new(UdpSocket::from_std(socket).map_err(Error::io("registering the relay's socket"))?))
}

/// Where a direction sends.
enum Dest {
    /// The server.
    Fixed(SocketAddr),
    /// The client: the address that last sent to the relay (none yet: dropped).
    Learned(Arc<Mutex<Option<SocketAddr>>>),
}

impl Dest {
    fn get(&self) -> Option<SocketAddr> {
        match self {
            Dest::Fixed(addr) => Some(*addr),
            Dest::Learned(addr) => *addr.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// One direction of the link: what arrives on `from` leaves `to`.
struct Pipe {
    from: Arc<UdpSocket>,
    to: Arc<UdpSocket>,
    link: Link,
    seed: u64,
    drops: Arc<LinkDrops>,
}

impl Pipe {
    /// Relays until a receive fails; `learn` records each sender's address. The loss
    /// draws come from `SplitMix(seed)`, one per datagram received.
    async fn run(self, dest: Dest, learn: Option<Arc<Mutex<Option<SocketAddr>>>>) {
        // Holds at most (queue + one_way) x rate bytes: departures are paced at the rate.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let (to, drops) = (self.to.clone(), self.drops.clone());
        let sender = tokio::spawn(async move {
            while let Some((due, datagram)) = rx.recv().await {
                tokio::time::sleep_until(due.into()).await;
                let sent = match dest.get() {
                    Some(addr) => to.send_to(&datagram, addr).await.is_ok(),
                    None => false,
                };
                if !sent {
                    drops.send_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let _stop_sender = crate::AbortOnDrop(sender);
        let mut draws = SplitMix(self.seed);
        let mut busy_until = Instant::now();
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, source) = match self.from.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(e) => {
                    tracing::warn!(error = %e, "relay: a receive failed, the link is down");
                    return;
                }
            };
            if let Some(learn) = &learn {
                *learn.lock().unwrap_or_else(|p| p.into_inner()) = Some(source);
            }
            if draws.unit() < self.link.loss {
                self.drops.random.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let now = Instant::now();
            let start = busy_until.max(now);
            if start.duration_since(now) > self.link.queue {
                self.drops.queue.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            busy_until = start + Duration::from_secs_f64(n as f64 / self.link.bytes_per_s);
            if tx.send((busy_until + self.link.one_way, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_outside_its_ranges_is_refused() {
        assert!(Link::new(1.0, 20.0, 50.0).is_ok());
        for (loss, rtt, mbit) in
            [(-1.0, 20.0, 50.0), (101.0, 20.0, 50.0), (1.0, -5.0, 50.0), (1.0, 20.0, 0.0), (1.0, 20.0, f64::NAN)]
        {
            assert!(matches!(Link::new(loss, rtt, mbit), Err(Error::InvalidArgs(_))), "{loss} {rtt} {mbit}");
        }
    }

    #[tokio::test]
    async fn the_relay_refuses_an_ipv6_server() {
        let link = Link::new(0.0, 0.0, 100.0).unwrap();
        assert!(matches!(Relay::start("[::1]:443".parse().unwrap(), link, 1), Err(Error::InvalidArgs(_))));
    }

    #[test]
    fn loss_draws_are_uniform_in_the_unit_interval_and_repeat_with_the_seed() {
        let (mut a, mut b) = (SplitMix(6), SplitMix(6));
        let draws: Vec<f64> = (0..10_000).map(|_| a.unit()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(draws.iter().all(|x| *x == b.unit()));
        let under_five_percent = draws.iter().filter(|x| **x < 0.05).count();
        assert!((400..600).contains(&under_five_percent), "{under_five_percent} of 10,000 under 0.05");
        assert_ne!(SplitMix(6).unit(), SplitMix(7).unit());
    }
}
