//! One connection's I/O: the accept loop, the QUIC and device handshake under
//! deadlines (`handshake.rs`), the control stream's read loop with one typed route per
//! request (`control.rs`) and the writer that drains the outbound queue (`writer.rs`).
//! A bad frame closes this connection only, with a stable code. Who gets which event is
//! not decided here: see `fanout.rs` and the actors.
//!
//! Connections are admitted in two stages (`Admission`): until it is authenticated a
//! connection holds one of `max_unauthenticated_connections` places, and only then one of
//! `max_connections` session places, so peers that never finish a handshake cannot take
//! the places of users. Under load new addresses must answer a QUIC Retry first.

mod control;
mod handshake;
mod transfer;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use bytes::Bytes;
use switchboard_protocol::{ErrorBody, ErrorCode, FrameDecoder, decode, encode_frame};

use crate::Shared;
use crate::config::Config;
use crate::limits::{CONNECTIONS_PER_NETWORK_FACTOR, READ_CHUNK_BYTES, UNAUTHENTICATED_PER_ADDRESS};
use crate::metrics::Counters;
use crate::overload::SocketBacklog;
use switchboard_protocol::limits::AUTH_DEADLINE_MS;

/// Why a connection ends: a stable code and a short reason for the peer.
struct Close(ErrorCode, String);

impl Close {
    /// A close whose reason is the code's name: how the broker closes an established
    /// session (PROTOCOL.md section 9, "Close reasons").
    fn named(code: ErrorCode) -> Self {
        Close(code, code.name().into())
    }
}

impl From<ErrorBody> for Close {
    fn from(e: ErrorBody) -> Self {
        Close(e.code, e.message)
    }
}

fn close(conn: &quinn::Connection, Close(code, reason): Close) {
    conn.close(code.0.into(), reason.as_bytes());
}

/// Accepts connections until the endpoint closes, as `Admission` allows. `backlog`
/// watches the endpoint's socket: its sessions' writes are admitted against it.
pub(crate) async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint, backlog: Arc<SocketBacklog>) {
    while let Some(incoming) = endpoint.accept().await {
        if shared.health.is_failed() {
            Counters::add(&shared.counters.connections_refused, 1);
            incoming.refuse();
            continue;
        }
        let from = incoming.remote_address().ip();
        match shared.admission.judge(from, incoming.remote_address_validated()) {
            Verdict::Refuse => {
                Counters::add(&shared.counters.connections_refused, 1);
                incoming.refuse();
            }
            Verdict::Retry => {
                // Unvalidated means a retry is allowed (quinn guarantees it); refuse if not.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
            }
            Verdict::Admit(place) => {
                tokio::spawn(serve(shared.clone(), incoming, place, backlog.clone()));
            }
        }
    }
}

/// Runs one incoming connection to its end.
async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming, place: Unauthenticated, backlog: Arc<SocketBacklog>) {
    let evicted = place.eviction();
    // Dropping an attempt that missed its deadline closes it.
    let handshake = tokio::time::timeout(shared.config.quic_handshake_timeout(), incoming);
    let conn = tokio::select! {
        _ = evicted.notified() => return,
        conn = handshake => conn,
    };
    let conn = match conn {
        Ok(Ok(c)) => {
            place.proved();
            c
        }
        Ok(Err(e)) => {
            shared.counters.quic_handshakes_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            shared.counters.quic_handshakes_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("QUIC handshake deadline passed");
            return;
        }
    };
    let deadline = Duration::from_millis(u64::from(AUTH_DEADLINE_MS));
    // The deadline covers what the peer controls: hello and the auth request. Checking
    // the request (argon2, durable enrollment) is not cut off by it, so a slow check
    // never leaves an enrolled device its owner was never told about.
    let refused = |c: Close| {
        // NO_ERROR: the peer went away (a probe closes after the hello), nothing refused.
        if c.0 != ErrorCode::NO_ERROR {
            shared.counters.handshake_refused(c.0);
        }
        close(&conn, c)
    };
    // Its place taken for a newcomer (`Admission`): told so, and gone.
    let gone = || refused(Close(ErrorCode::OVERLOADED, "every handshake place is taken; retry shortly".into()));
    let hello = tokio::select! {
        _ = evicted.notified() => return gone(),
        hello = tokio::time::timeout(deadline, Box::pin(handshake::hello(&conn))) => hello,
    };
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(c)) => return refused(c),
        Err(_) => return refused(Close(ErrorCode::TIMEOUT, "authentication deadline passed".into())),
    };
    if !place.checking() {
        return gone();
    }
    // A peer that goes away abandons its request: waiting for a password-hashing turn
    // stops with it (a hash already running finishes, holding only its slot).
    // Boxed: the auth state is large and short-lived; inline it would stay in every
    // connection's task allocation for the connection's whole life.
    let authed = tokio::select! {
        biased;
        _ = conn.closed() => return,
        authed = Box::pin(handshake::authenticate(&shared, &conn, hello, place)) => authed,
    };
    let (authed, _session) = match authed {
        Ok(a) => a,
        Err(c) => return refused(c),
    };
    control::run(shared, conn, authed, backlog).await;
}

/// What to do with a new connection attempt.
pub(crate) enum Verdict {
    /// Serve it, holding this place until it is authenticated or gone.
    Admit(Unauthenticated),
    /// Ask it to prove its address with a QUIC Retry (it comes back validated).
    Retry,
    /// Refuse it.
    Refuse,
}

/// Connection places. Connections not yet authenticated (QUIC handshake, hello, auth
/// request and its checks) and authenticated sessions are counted apart, each with its
/// own bound, so connections that never finish their handshake take no session's place.
/// Once half of the unauthenticated places are taken ("under load"), a connection from
/// an address that has not proved it receives our packets is asked to (QUIC Retry), and
/// one source address (an IPv6 /64) may hold at most `UNAUTHENTICATED_PER_ADDRESS` (a
/// newcomer that proved it takes the place of one of its source's that has not).
/// When every place is taken, a newcomer that proved its address takes the place of one
/// that has not (spoofed Initials cost nothing to send), else of the oldest connection
/// of the source holding the most places, if that source holds at least two more than
/// the newcomer's, else the same by network (`auth::network`: an IPv4 address, an IPv6
/// /48): a few sources cannot keep everyone else from signing in (before, 8 sources of
/// 64 places each plus spoofed Initials held every place), nor can one party holding a
/// /48 of 65,536 sources with a place each. A place whose auth request is being checked
/// is never taken.
///
/// Sessions are also counted per source and per network: at most
/// `max_connections_per_address` from one source, eight times that from one IPv6 /48
/// (`CONNECTIONS_PER_NETWORK_FACTOR`), so accounts made by open registration from a few
/// addresses cannot hold every session place.
pub(crate) struct Admission {
    max_sessions: usize,
    max_unauthenticated: usize,
    /// `max_connections_per_address`; 0: no such bound.
    per_address: usize,
    sessions: Arc<AtomicUsize>,
    addresses: Arc<Mutex<AddressSessions>>,
    unauthenticated: Arc<Mutex<Pending>>,
}

/// Sessions served per source (`auth::source`) and, for IPv6, per network
/// (`auth::network`; an IPv4 source is its own network). Kept apart: a /64 whose fourth
/// group is 0 has the same address as its /48 (the test's first /64 is one). Entries go when their count returns to 0,
/// so the maps hold at most one entry per session.
#[derive(Default)]
struct AddressSessions {
    sources: HashMap<IpAddr, usize>,
    networks: HashMap<IpAddr, usize>,
}

impl AddressSessions {
    /// Whether one more session from `source` fits under `per_address` (0: always).
    fn fits(&self, source: IpAddr, per_address: usize) -> bool {
        if per_address == 0 {
            return true;
        }
        let network = crate::auth::network(source);
        self.sources.get(&source).copied().unwrap_or(0) < per_address
            && (source.is_ipv4()
                || self.networks.get(&network).copied().unwrap_or(0)
                    < per_address.saturating_mul(CONNECTIONS_PER_NETWORK_FACTOR))
    }

    fn add(&mut self, source: IpAddr) {
        *self.sources.entry(source).or_default() += 1;
        if source.is_ipv6() {
            *self.networks.entry(crate::auth::network(source)).or_default() += 1;
        }
    }

    fn remove(&mut self, source: IpAddr) {
        let down = |map: &mut HashMap<IpAddr, usize>, key: IpAddr| {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        };
        down(&mut self.sources, source);
        if source.is_ipv6() {
            down(&mut self.networks, crate::auth::network(source));
        }
    }
}

#[derive(Default)]
struct Pending {
    total: usize,
    /// Each source's places, oldest first.
    by_source: HashMap<IpAddr, VecDeque<Held>>,
    next_id: u64,
}

/// One unauthenticated place as `Pending` holds it.
struct Held {
    id: u64,
    /// Its peer proved its address: a Retry, or a QUIC handshake completed.
    validated: bool,
    /// Its auth request is being checked: never taken for a newcomer (a cancelled check
    /// would waste its password hash, or leave a device enrolled and never told).
    checking: bool,
    evict: Arc<Notify>,
}

impl Pending {
    fn count(&self, source: &IpAddr) -> usize {
        self.by_source.get(source).map_or(0, VecDeque::len)
    }

    fn add(&mut self, source: IpAddr, held: Held) {
        self.total += 1;
        self.by_source.entry(source).or_default().push_back(held);
    }

    /// Takes the oldest place of `source` that has not proved its address, telling its
    /// connection to go; whether there was one.
    fn evict_unvalidated_of(&mut self, source: &IpAddr) -> bool {
        let Some(id) = self.by_source.get(source).and_then(|held| held.iter().find(|h| !h.validated)).map(|h| h.id)
        else {
            return false;
        };
        match self.remove(*source, id) {
            Some(victim) => {
                victim.evict.notify_one();
                true
            }
            None => false,
        }
    }

    /// Removes `source`'s place `id`, if it holds it still.
    fn remove(&mut self, source: IpAddr, id: u64) -> Option<Held> {
        let held = self.by_source.get_mut(&source)?;
        let index = held.iter().position(|h| h.id == id)?;
        let removed = held.remove(index);
        if held.is_empty() {
            self.by_source.remove(&source);
        }
        self.total -= 1;
        removed
    }

    /// Takes a place from someone for a validated newcomer from `source` (see
    /// `Admission`), telling its connection to go; whether one was freed: one that has
    /// not proved its address, else the most crowded source's oldest (`crowding`), else
    /// the most crowded network's, so a /48 of sources with a place each cannot hold
    /// every place, while users who share a /48 (a carrier's pool, a campus) give way
    /// only after every crowding source.
    fn evict_for(&mut self, source: &IpAddr) -> bool {
        let unvalidated =
            self.by_source.iter().find_map(|(s, held)| held.iter().find(|h| !h.validated).map(|h| (*s, h.id)));
        let victim = unvalidated
            .or_else(|| self.crowding(source, |s| s))
            .or_else(|| self.crowding(source, crate::auth::network));
        let Some((victim_source, id)) = victim else { return false };
        let Some(victim) = self.remove(victim_source, id) else { return false };
        victim.evict.notify_one();
        true
    }

    /// The oldest place not being checked of the group (sources grouped by `group`)
    /// holding the most places, if it holds at least two more than the newcomer's; the
    /// next such group when every place of one is being checked. One pass over the
    /// places (at most `max_unauthenticated_connections`).
    fn crowding(&self, source: &IpAddr, group: impl Fn(IpAddr) -> IpAddr) -> Option<(IpAddr, u64)> {
        // Per group: its places, and its oldest place not being checked (ids grow with age).
        let mut groups: HashMap<IpAddr, (usize, Option<(u64, IpAddr)>)> = HashMap::new();
        for (&s, held) in &self.by_source {
            let (places, oldest) = groups.entry(group(s)).or_default();
            *places += held.len();
            if let Some(h) = held.iter().find(|h| !h.checking)
                && oldest.is_none_or(|(id, _)| h.id < id)
            {
                *oldest = Some((h.id, s));
            }
        }
        let floor = groups.get(&group(*source)).map_or(0, |(places, _)| *places) + 2;
        groups
            .into_values()
            .filter(|(places, _)| *places >= floor)
            .filter_map(|(places, oldest)| oldest.map(|(id, s)| (places, std::cmp::Reverse(id), s)))
            .max()
            .map(|(_, std::cmp::Reverse(id), s)| (s, id))
    }
}

/// A place for a connection not yet authenticated; given back when dropped (unless it
/// was taken for a newcomer: then `eviction` fires).
pub(crate) struct Unauthenticated {
    source: IpAddr,
    id: u64,
    evict: Arc<Notify>,
    pending: Arc<Mutex<Pending>>,
}

impl Unauthenticated {
    /// What fires when this place is taken for a newcomer: its connection must close.
    pub(crate) fn eviction(&self) -> Arc<Notify> {
        self.evict.clone()
    }

    /// Its peer completed the QUIC handshake, so it receives packets at its address.
    pub(crate) fn proved(&self) {
        self.update(|held| held.validated = true);
    }

    /// Its auth request is about to be checked: from now on its place is never taken.
    /// `false` if it was taken already (then `eviction` has fired).
    pub(crate) fn checking(&self) -> bool {
        self.update(|held| held.checking = true)
    }

    fn update(&self, change: impl FnOnce(&mut Held)) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let held = pending.by_source.get_mut(&self.source).and_then(|h| h.iter_mut().find(|h| h.id == self.id));
        held.map(change).is_some()
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        // Absent when it was taken for a newcomer (counted out then).
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(self.source, self.id);
    }
}

/// A session's place among `max_connections` and its source's
/// (`max_connections_per_address`); given back when dropped.
pub(crate) struct Session {
    sessions: Arc<AtomicUsize>,
    source: IpAddr,
    addresses: Arc<Mutex<AddressSessions>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner()).remove(self.source);
        self.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub(crate) fn new(config: &Config) -> Self {
        Admission {
            max_sessions: config.max_connections,
            max_unauthenticated: config.max_unauthenticated_connections,
            per_address: config.max_connections_per_address,
            sessions: Arc::default(),
            addresses: Arc::default(),
            unauthenticated: Arc::default(),
        }
    }

    /// Decides about a connection attempt from `from`; `validated` = the peer proved it
    /// receives packets sent to its address (it answered a Retry, or used a token).
    pub(crate) fn judge(&self, from: IpAddr, validated: bool) -> Verdict {
        // No session place would be free for it anyway.
        if self.sessions.load(Ordering::SeqCst) >= self.max_sessions {
            return Verdict::Refuse;
        }
        let source = crate::auth::source(from);
        // Nor would one for its source (checked again when it authenticates).
        if !self.addresses.lock().unwrap_or_else(|p| p.into_inner()).fits(source, self.per_address) {
            return Verdict::Refuse;
        }
        let mut pending = self.unauthenticated.lock().unwrap_or_else(|p| p.into_inner());
        if pending.total * 2 >= self.max_unauthenticated {
            if !validated {
                return Verdict::Retry;
            }
            // Only places that proved their address count against it: spoofed Initials
            // carrying a victim's address (a NAT's, say) held its share and kept everyone
            // behind it out (an attacker review). A proved newcomer takes the place of one
            // of its source's unproved ones instead.
            if pending.count(&source) >= UNAUTHENTICATED_PER_ADDRESS && !pending.evict_unvalidated_of(&source) {
                return Verdict::Refuse;
            }
        }
        if pending.total >= self.max_unauthenticated && !pending.evict_for(&source) {
            return Verdict::Refuse;
        }
        let (id, evict) = (pending.next_id, Arc::new(Notify::new()));
        pending.next_id += 1;
        pending.add(source, Held { id, validated, checking: false, evict: evict.clone() });
        Verdict::Admit(Unauthenticated { source, id, evict, pending: self.unauthenticated.clone() })
    }

    /// Sessions served now, and connections not yet authenticated.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let unauthenticated = self.unauthenticated.lock().unwrap_or_else(|p| p.into_inner()).total;
        (self.sessions.load(Ordering::SeqCst), unauthenticated)
    }

    /// `RATE_LIMITED`, as `promote` would answer, while `place`'s source (or network) has
    /// its `max_connections_per_address` sessions: asked before a password is hashed for
    /// it, so that an address kept at its cap has no hash made for a place it cannot
    /// take (`promote` checks again).
    pub(crate) fn source_fits(&self, place: &Unauthenticated) -> Result<(), ErrorBody> {
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if addresses.fits(place.source, self.per_address) { Ok(()) } else { Err(address_full()) }
    }

    /// Moves an authenticated connection from its unauthenticated place to a session
    /// place: `RATE_LIMITED` if its source (or network) has its
    /// `max_connections_per_address` sessions, `OVERLOADED` if `max_connections`
    /// sessions are being served.
    pub(crate) fn promote(&self, place: Unauthenticated) -> Result<Session, ErrorBody> {
        let source = place.source;
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if !addresses.fits(source, self.per_address) {
            return Err(address_full());
        }
        self.sessions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max_sessions).then_some(n + 1))
            .map_err(|_| ErrorBody::new(ErrorCode::OVERLOADED, "the broker is at its connection limit"))?;
        addresses.add(source);
        drop(addresses);
        drop(place);
        Ok(Session { sessions: self.sessions.clone(), source, addresses: self.addresses.clone() })
    }
}

/// The refusal of a session place to a source at its `max_connections_per_address`.
fn address_full() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::RATE_LIMITED,
        "too many connections from this address (max_connections_per_address); retry later",
    )
}

async fn write_msg<T: serde::Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), Close> {
    let frame = encode_frame(msg).map_err(|e| Close(ErrorCode::INTERNAL, e.to_string()))?;
    send.write_all(&frame).await.map_err(|e| Close(ErrorCode::NO_ERROR, e.to_string()))
}

async fn read_msg<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<T, Close> {
    let body = read_frame(recv, decoder).await?;
    decode(&body).map_err(|e| Close(e.code(), e.to_string()))
}

/// Reads until one whole frame is buffered. End of stream is a normal close.
async fn read_frame(recv: &mut quinn::RecvStream, decoder: &mut FrameDecoder) -> Result<Bytes, Close> {
    loop {
        if let Some(frame) = decoder.next_frame().map_err(|e| Close(e.code(), e.to_string()))? {
            return Ok(frame);
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => decoder.push(&chunk.bytes),
            Ok(None) => return Err(Close(ErrorCode::NO_ERROR, "control stream finished".into())),
            Err(e) => return Err(Close(ErrorCode::NO_ERROR, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_sessions: usize, max_unauthenticated: usize) -> Admission {
        let mut config = Config::ephemeral("unused");
        config.max_connections = max_sessions;
        config.max_unauthenticated_connections = max_unauthenticated;
        Admission::new(&config)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn admitted(v: Verdict) -> Unauthenticated {
        match v {
            Verdict::Admit(place) => place,
            Verdict::Retry => panic!("asked to retry"),
            Verdict::Refuse => panic!("refused"),
        }
    }

    #[test]
    fn handshakes_and_sessions_have_their_own_places() {
        let a = admission(2, 4);
        // Two unauthenticated places are free for anyone; then only for validated peers.
        let p1 = admitted(a.judge(ip(1), false));
        let p2 = admitted(a.judge(ip(2), false));
        assert!(matches!(a.judge(ip(3), false), Verdict::Retry));
        let p3 = admitted(a.judge(ip(3), true));
        let p4 = admitted(a.judge(ip(4), true));
        // Every place taken: proved newcomers take the unproved ones' places, then none.
        let p5 = admitted(a.judge(ip(5), true));
        let p6 = admitted(a.judge(ip(6), true));
        assert!(evicted(&a, &p1) && evicted(&a, &p2));
        assert!(matches!(a.judge(ip(7), true), Verdict::Refuse), "every unauthenticated place is taken");
        drop((p1, p2));
        assert_eq!(a.unauthenticated.lock().unwrap().total, 4, "an evicted place was counted out once");
        // Authenticated, they move to session places and free theirs.
        let s1 = a.promote(p3).unwrap();
        let s2 = a.promote(p4).unwrap();
        assert_eq!(a.promote(p5).err().unwrap().code, ErrorCode::OVERLOADED);
        assert!(matches!(a.judge(ip(7), true), Verdict::Refuse), "no session place would be free");
        drop(s1);
        let p7 = admitted(a.judge(ip(7), true));
        drop((s2, p6, p7));
        assert_eq!(a.sessions.load(Ordering::SeqCst), 0);
        assert_eq!(a.unauthenticated.lock().unwrap().total, 0);
        assert!(a.unauthenticated.lock().unwrap().by_source.is_empty());
    }

    /// At most `max_connections_per_address` sessions from one source, eight times that
    /// from one IPv6 /48; a source at its bound is refused before its handshake, and a
    /// session that ends frees its place. Before, only `max_connections` was counted, and
    /// accounts from one address could hold every session place.
    #[test]
    fn sessions_are_bounded_per_address_and_per_network() {
        let mut config = Config::ephemeral("unused");
        config.max_connections_per_address = 3;
        let a = Admission::new(&config);
        let mut held: Vec<Session> = (0..3).map(|_| a.promote(admitted(a.judge(ip(1), true))).unwrap()).collect();
        assert!(matches!(a.judge(ip(1), true), Verdict::Refuse), "refused before its handshake");
        // One admitted before the others authenticated is refused when it does.
        held.pop();
        let late = admitted(a.judge(ip(1), true));
        held.push(a.promote(admitted(a.judge(ip(1), true))).unwrap());
        assert_eq!(a.promote(late).err().unwrap().code, ErrorCode::RATE_LIMITED);
        // Other addresses are not affected; a session that ends frees its place.
        let other = a.promote(admitted(a.judge(ip(2), true))).unwrap();
        held.pop();
        held.push(a.promote(admitted(a.judge(ip(1), true))).unwrap());
        // IPv6: 3 per /64, 24 per /48 over its /64s.
        let v6 = |net: u16, host: u16| IpAddr::from([0x2001, 0xdb8, 7, net, 0, 0, 0, host]);
        for net in 0..8 {
            for host in 0..3 {
                held.push(a.promote(admitted(a.judge(v6(net, host), true))).unwrap());
            }
            assert!(matches!(a.judge(v6(net, 9), true), Verdict::Refuse), "a /64 holds 3");
        }
        assert!(matches!(a.judge(v6(8, 0), true), Verdict::Refuse), "a /48 holds 24");
        assert!(a.promote(admitted(a.judge(IpAddr::from([0x2001, 0xdb8, 8, 0, 0, 0, 0, 1]), true))).is_ok());
        drop((held, other));
        let addresses = a.addresses.lock().unwrap();
        assert!(addresses.sources.is_empty() && addresses.networks.is_empty(), "entries go at 0");
        assert_eq!(a.sessions.load(Ordering::SeqCst), 0);
        // 0: no bound (the harness's own broker).
        let mut config = Config::ephemeral("unused");
        config.max_connections_per_address = 0;
        let a = Admission::new(&config);
        let _many: Vec<Session> = (0..100).map(|_| a.promote(admitted(a.judge(ip(1), true))).unwrap()).collect();
    }

    /// Whether `place` was taken for a newcomer (it no longer counts).
    fn evicted(a: &Admission, place: &Unauthenticated) -> bool {
        let pending = a.unauthenticated.lock().unwrap();
        !pending.by_source.get(&place.source).is_some_and(|held| held.iter().any(|h| h.id == place.id))
    }

    /// Every place taken: a newcomer that proved its address takes the place of one that
    /// has not, else of the oldest of the largest source, if that source holds two more
    /// than the newcomer's; never a place of a source as small as its own, and never one
    /// whose auth request is being checked. Before, a few sources and spoofed Initials
    /// could hold every place, and everyone else was refused.
    #[test]
    fn when_full_a_newcomer_takes_the_place_of_an_unproved_or_crowding_one() {
        let a = admission(10_000, 8);
        // Below half, unproved addresses (spoofed Initials) take places freely.
        let spoofed: Vec<Unauthenticated> = (0..4).map(|i| admitted(a.judge(ip(100 + i), false))).collect();
        // Then one source takes the rest; its oldest is having its auth request checked.
        let crowd: Vec<Unauthenticated> = (0..4).map(|_| admitted(a.judge(ip(1), true))).collect();
        assert!(crowd[0].checking());
        assert!(matches!(a.judge(ip(2), false), Verdict::Retry), "unproved: asked to prove it first");
        // Proved newcomers take the unproved places first, then the crowd's oldest.
        let mut newcomers = Vec::new();
        for i in 0..4 {
            newcomers.push(admitted(a.judge(ip(2 + i), true)));
            assert_eq!(spoofed.iter().filter(|p| evicted(&a, p)).count(), i as usize + 1);
        }
        assert!(!spoofed[0].checking(), "an evicted place is not checked");
        assert!(crowd.iter().all(|p| !evicted(&a, p)));
        newcomers.push(admitted(a.judge(ip(6), true)));
        assert!(!evicted(&a, &crowd[0]), "a place being checked is never taken");
        assert!(evicted(&a, &crowd[1]) && !evicted(&a, &crowd[2]), "the crowd's oldest goes first");
        newcomers.push(admitted(a.judge(ip(7), true)));
        assert!(evicted(&a, &crowd[2]));
        // Its connection is told to go.
        let evict = crowd[2].eviction();
        let told = evict.notified();
        tokio::pin!(told);
        assert!(told.as_mut().enable(), "the evicted connection was not told");
        // The crowd now holds two, each newcomer one: the crowd's next newcomer, or one
        // from a source holding one, takes nobody's place; one from a new source takes
        // the crowd's (two against none), and then no source holds two.
        assert!(matches!(a.judge(ip(1), true), Verdict::Refuse));
        assert!(matches!(a.judge(ip(2), true), Verdict::Refuse));
        newcomers.push(admitted(a.judge(ip(8), true)));
        assert!(evicted(&a, &crowd[3]) && !evicted(&a, &crowd[0]));
        assert!(matches!(a.judge(ip(9), true), Verdict::Refuse), "nobody holds two more than a newcomer");
        assert_eq!(a.unauthenticated.lock().unwrap().total, 8);
        drop((spoofed, crowd, newcomers));
        assert_eq!(a.unauthenticated.lock().unwrap().total, 0);
        assert!(a.unauthenticated.lock().unwrap().by_source.is_empty());
    }

    /// One party holding an IPv6 /48 has 65,536 sources (/64s) of a place each: before,
    /// with every place held so, no source held two more than a newcomer's and every
    /// login was refused until they let go.
    #[test]
    fn a_network_of_many_sources_is_weighed_as_one() {
        let a = admission(10_000, 8);
        let v6 = |s: String| s.parse::<IpAddr>().unwrap();
        let mut held: Vec<Unauthenticated> =
            (0..8).map(|i| admitted(a.judge(v6(format!("2001:db8:1:{:x}::1", i + 1)), true))).collect();
        assert!(held[0].checking());
        // Another source of that /48 is refused: its network holds the most.
        assert!(matches!(a.judge(v6("2001:db8:1:ff::1".into()), true), Verdict::Refuse));
        // A proved newcomer from elsewhere takes its oldest place not being checked.
        let newcomer = admitted(a.judge(ip(1), true));
        assert!(!evicted(&a, &held[0]) && evicted(&a, &held[1]) && !evicted(&a, &held[2]));
        let other = admitted(a.judge(v6("2001:db8:2::1".into()), true));
        assert!(evicted(&a, &held[2]), "another /48 is another network");
        // A crowding source goes before a crowded network: users sharing a /48 give way
        // only when no source holds two more than the newcomer's.
        let crowd: Vec<Unauthenticated> = (0..2).map(|_| admitted(a.judge(ip(9), true))).collect();
        assert!(evicted(&a, &held[3]) && evicted(&a, &held[4]), "the /48 still held the most");
        assert!(crowd.iter().all(|p| !evicted(&a, p)));
        let third = admitted(a.judge(ip(10), true));
        assert!(evicted(&a, &crowd[0]), "the source with two places goes before the /48's");
        assert!(!evicted(&a, &held[5]));
        // When every place of the largest network is being checked, the next one gives:
        // here the second /48, once it holds two.
        let second = admitted(a.judge(v6("2001:db8:2:1::1".into()), true));
        assert!(evicted(&a, &held[5]));
        for place in &held[6..] {
            assert!(place.checking());
        }
        let fourth = admitted(a.judge(ip(11), true));
        assert!(held[6..].iter().all(|p| !evicted(&a, p)), "places being checked are kept");
        assert!(evicted(&a, &other) && !evicted(&a, &second), "the next network's oldest");
        assert_eq!(a.unauthenticated.lock().unwrap().total, 8);
        drop((newcomer, other, crowd, third, second, fourth));
        held.clear();
        let pending = a.unauthenticated.lock().unwrap();
        assert_eq!(pending.total, 0);
        assert!(pending.by_source.is_empty());
    }

    #[test]
    fn under_load_one_address_holds_a_bounded_share() {
        let a = admission(10_000, 4 * UNAUTHENTICATED_PER_ADDRESS);
        let mut places: Vec<Unauthenticated> =
            (0..UNAUTHENTICATED_PER_ADDRESS).map(|_| admitted(a.judge(ip(1), false))).collect();
        places.extend((0..UNAUTHENTICATED_PER_ADDRESS).map(|_| admitted(a.judge(ip(2), false))));
        // Half full: validated addresses only, and only up to their share of places that
        // proved their address. Unproved places of the source (spoofed Initials with its
        // address) give way to a proved newcomer: before, it was refused, and spoofing an
        // address's share kept it out.
        let proved: Vec<Unauthenticated> =
            (0..UNAUTHENTICATED_PER_ADDRESS).map(|_| admitted(a.judge(ip(1), true))).collect();
        assert_eq!(places.iter().filter(|p| evicted(&a, p)).count(), UNAUTHENTICATED_PER_ADDRESS);
        assert!(matches!(a.judge(ip(1), true), Verdict::Refuse), "its share of proved places");
        let other = admitted(a.judge(ip(3), true));
        // IPv6 addresses of one /64 are one source.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let mine: Vec<Unauthenticated> = (0..UNAUTHENTICATED_PER_ADDRESS)
            .map(|i| admitted(a.judge(v6(&format!("2001:db8::{:x}", i + 1)), true)))
            .collect();
        assert!(matches!(a.judge(v6("2001:db8::ffff:1"), true), Verdict::Refuse));
        drop((places, proved, other, mine));
        assert_eq!(a.unauthenticated.lock().unwrap().total, 0);
    }
}
