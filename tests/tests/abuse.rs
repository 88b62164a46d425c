//! What one peer can make the broker do to everyone else: guessing a password never locks
//! enrolled devices out, work before authentication is bounded and dropped with its
//! connection, handshakes that never finish take nobody's place, an account cannot lock
//! itself out with devices it never learned of, and labels cannot hide or reverse text.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use switchboard_broker::limits::{AUTH_FAILURES_PER_ADDRESS, BAD_SIGNATURES_PER_ADDRESS};
use switchboard_client::{ClientError, Connector};
use switchboard_protocol::limits::{AUTH_DEADLINE_MS, MAX_NAME_BYTES, PREAUTH_MAX_FRAME_BYTES};
use switchboard_protocol::{
    ClientFrame, ClientHello, Enroll, ErrorCode, FrameDecoder, Request, RequestBody, ServerFrame, ServerHello, decode,
    encode_frame,
};
use switchboard_tests::TestBroker;

/// Generous bound on anything the broker should do promptly (nothing here should hang).
const WAIT: Duration = Duration::from_secs(10);

fn addr(tb: &TestBroker) -> SocketAddr {
    tb.broker.as_ref().unwrap().local_addr
}

/// A client endpoint at 127.0.0.`host` (another source address to the broker) whose
/// `register` and `login` make one attempt: an `OVERLOADED` answer is returned, not
/// waited out.
fn enrolling_once_from(tb: &TestBroker, host: u8) -> Connector {
    let connector = tb.connector_enrolling_once();
    connector
        .endpoint()
        .rebind(std::net::UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0)).unwrap())
        .unwrap();
    connector
}

/// The code the broker closed `conn` with.
async fn closed_with(conn: &quinn::Connection) -> Option<ErrorCode> {
    let err = tokio::time::timeout(WAIT, conn.closed()).await.expect("the broker closes the connection");
    ClientError::from(err).code()
}

/// A QUIC connection with its control stream open and nothing sent on it yet.
struct Raw {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

async fn bare(connector: &Connector, to: SocketAddr) -> Raw {
    let conn = connector.endpoint().connect(to, "localhost").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    Raw { conn, send, recv, decoder: FrameDecoder::new(1 << 20) }
}

impl Raw {
    /// The next whole frame, or `None` once the stream or connection ends.
    async fn read(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(frame);
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                _ => return None,
            }
        }
    }

    /// Says hello as `agent`; returns the transcript a device signs, or `None` if the
    /// broker answered with something other than its hello.
    async fn hello(&mut self, agent: &str) -> Option<Vec<u8>> {
        let hello = ClientHello {
            magic: switchboard_protocol::MAGIC,
            version: switchboard_protocol::PROTOCOL_VERSION,
            agent: agent.into(),
        };
        self.send.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
        let _: ServerHello = decode(&self.read().await?).ok()?;
        let mut exporter = [0u8; 32];
        self.conn.export_keying_material(&mut exporter, switchboard_protocol::EXPORTER_LABEL, b"").unwrap();
        Some(switchboard_protocol::auth_transcript_v5(&exporter))
    }
}

/// An enrollment signed by the key `seed` over `transcript`.
fn enroll(transcript: &[u8], user: &str, password: &str, seed: u8) -> Enroll {
    let key = SigningKey::from_bytes(&[seed; 32]);
    Enroll {
        user: user.into(),
        password: password.into(),
        device_name: "d".into(),
        public_key: Bytes::copy_from_slice(key.verifying_key().as_bytes()),
        signature: Bytes::copy_from_slice(&key.sign(transcript).to_bytes()),
    }
}

/// Opens a connection, sends `body` as its auth request once the broker has it, and
/// hangs up without waiting for an answer.
async fn ask_and_hang_up(connector: &Connector, to: SocketAddr, body: impl FnOnce(&[u8]) -> RequestBody) {
    let mut raw = bare(connector, to).await;
    let Some(transcript) = raw.hello("hang-up").await else { return };
    let request = ClientFrame::Request(Request { id: 0, body: body(&transcript) });
    raw.send.write_all(&encode_frame(&request).unwrap()).await.unwrap();
    let _ = raw.send.finish();
    // The broker has acknowledged the request (it holds it) before the peer goes.
    let _ = tokio::time::timeout(WAIT, raw.send.stopped()).await;
    raw.conn.close(0u32.into(), b"gone");
}

/// A QUIC handshake that never completes: a relay hands the broker the client's first
/// datagram (its Initial) and drops everything else the client sends, while the broker's
/// packets do reach the client. Returns once the broker has answered.
async fn stalled_handshake(connector: &Connector, broker: SocketAddr) {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let connecting = connector.endpoint().connect(relay.local_addr().unwrap(), "localhost").unwrap();
    let (answered, on_answer) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut answered = Some(answered);
        let (mut buf, mut client, mut forwarded) = (vec![0u8; 64 * 1024], None, false);
        while let Ok((n, from)) = relay.recv_from(&mut buf).await {
            if from == broker {
                if let Some(a) = answered.take() {
                    let _ = a.send(());
                }
                if let Some(client) = client {
                    let _ = relay.send_to(&buf[..n], client).await;
                }
            } else {
                client = Some(from);
                if !forwarded {
                    forwarded = true;
                    let _ = relay.send_to(&buf[..n], broker).await;
                }
            }
        }
    });
    // The client keeps trying (retransmitting) until its own idle timeout.
    tokio::spawn(async move {
        if let Ok(conn) = connecting.await {
            conn.closed().await;
        }
    });
    tokio::time::timeout(WAIT, on_answer).await.expect("the broker answers an Initial").unwrap();
}

// ---- 1. guessing passwords never locks enrolled devices out ----

#[tokio::test]
async fn wrong_passwords_never_lock_out_enrolled_devices() {
    let tb = TestBroker::start().await;
    let (_laptop, laptop) = tb.register("alice").await;
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(tb.connector().login("alice", "not the password", "d").await.err().unwrap().code().unwrap());
    }
    assert_eq!(codes.last(), Some(&ErrorCode::RATE_LIMITED), "guessing is still limited: {codes:?}");
    // Guesses at made-up names use up this address's password allowance too.
    for i in 0..25 {
        codes.push(
            tb.connector().login(&format!("nobody{i}"), "a wrong guess", "d").await.err().unwrap().code().unwrap(),
        );
    }
    assert_eq!(codes.last(), Some(&ErrorCode::RATE_LIMITED), "guessing from this address is limited: {codes:?}");
    // The device proves its key, from that same address: no one's guesses stop it.
    let again = tb.connector().connect(&laptop).await;
    assert!(again.is_ok(), "an enrolled device was refused: {:?}", again.err());
    // Signing in with a name that cannot exist fails like any unknown device.
    let mut ghost = laptop.clone();
    ghost.user = "x".repeat(3000);
    assert_eq!(tb.connector().connect(&ghost).await.err().unwrap().code(), Some(ErrorCode::AUTH_FAILED));
    tb.connector().connect(&laptop).await.unwrap().ping().await.unwrap();
}

// ---- 2. work before authentication is bounded ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_that_hang_up_do_not_delay_a_login() {
    // 300 registrations of a taken name, then, on a broker of its own (a taken name
    // spends the address's registration allowance too), 300 of fresh names, each
    // hanging up at once.
    for fresh in [false, true] {
        let tb = TestBroker::start_with(|c| {
            // Production cost: each hash takes real time.
            c.argon2_memory_kib = 19 * 1024;
            c.argon2_iterations = 2;
            c.argon2_queue = 4;
            c.registration_burst_per_address = 10;
        })
        .await;
        tb.register("alice").await;
        let (connector, to, password) = (tb.connector(), addr(&tb), tb.password);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..300u32 {
            let connector = connector.clone();
            set.spawn(async move {
                let name = if fresh { format!("fresh{i}") } else { "alice".to_owned() };
                ask_and_hang_up(&connector, to, |t| RequestBody::Register(enroll(t, &name, password, 7))).await;
            });
        }
        tokio::time::timeout(WAIT * 6, set.join_all()).await.unwrap();
        // From another address (the hang-ups' share of the pool is theirs), in one
        // attempt: a login refused `OVERLOADED` fails here, not retried.
        let elsewhere = enrolling_once_from(&tb, 2);
        let login = elsewhere.login("alice", password, "phone");
        let login = tokio::time::timeout(Duration::from_millis(u64::from(AUTH_DEADLINE_MS)), login).await;
        assert!(matches!(login, Ok(Ok(_))), "a valid login waited behind abandoned work (fresh names: {fresh})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_work_is_dropped_with_its_connection() {
    // No queue bound and no registration allowance to hide behind (the test defaults):
    // only dropping the work of peers that left keeps the login prompt.
    let tb = TestBroker::start_with(|c| {
        c.argon2_memory_kib = 19 * 1024;
        c.argon2_iterations = 2;
    })
    .await;
    tb.register("alice").await;
    let (connector, to, password) = (tb.connector(), addr(&tb), tb.password);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300u32 {
        let connector = connector.clone();
        set.spawn(async move {
            let name = format!("gone{i}");
            ask_and_hang_up(&connector, to, |t| RequestBody::Register(enroll(t, &name, password, 7))).await;
        });
    }
    tokio::time::timeout(WAIT * 6, set.join_all()).await.unwrap();
    let elsewhere = enrolling_once_from(&tb, 2);
    let login = elsewhere.login("alice", password, "phone");
    let login = tokio::time::timeout(Duration::from_millis(u64::from(AUTH_DEADLINE_MS)), login).await;
    assert!(matches!(login, Ok(Ok(_))), "a valid login waited behind the work of peers that had left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_password_queue_answers_overloaded() {
    let tb = TestBroker::start_with(|c| {
        // Each hash takes long enough for every login below to arrive while two run.
        c.argon2_memory_kib = 64 * 1024;
        c.argon2_iterations = 4;
        c.argon2_queue = 2;
    })
    .await;
    tb.register("alice").await;
    let logins = |connectors: Vec<Connector>| async move {
        let mut set = tokio::task::JoinSet::new();
        for connector in connectors {
            let password = tb.password;
            set.spawn(async move { connector.login("alice", password, "phone").await.map(|_| ()) });
        }
        tokio::time::timeout(WAIT * 3, set.join_all()).await.unwrap()
    };
    // From eight addresses, one login each: no source is past its share, the queue is.
    let results = logins((1..=8).map(|host| enrolling_once_from(&tb, host)).collect()).await;
    let codes: Vec<Option<ErrorCode>> = results.iter().map(|r| r.as_ref().err().and_then(|e| e.code())).collect();
    assert!(codes.contains(&Some(ErrorCode::OVERLOADED)), "nothing was refused: {codes:?}");
    assert!(codes.contains(&None), "nothing got through: {codes:?}");
    assert!(codes.iter().all(|c| matches!(c, None | Some(ErrorCode::OVERLOADED))), "{codes:?}");
    let queue_full = results.iter().filter_map(|r| r.as_ref().err()).all(|e| e.to_string().contains("in progress"));
    assert!(queue_full, "{results:?}");
    // The client library logs in again after a backoff while the broker answers
    // `OVERLOADED` (nothing was enrolled): eight at once from one address, past its
    // share and the queue, all get through. Before, each application (the load
    // harness, `sb login`) had to, or failed.
    let results = logins(vec![tb.connector(); 8]).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

/// One source address holds at most a quarter of the password pool's turns. A peer logging
/// in to its own account over and over (with `password_checks_per_address` off, as in
/// `Config::ephemeral`, nothing else counts its right passwords) from 127.0.0.2 keeps the
/// pool as busy as it can; logins from 127.0.0.1 still
/// find a turn at once. Before, the peer held every turn and every other login and
/// registration of the broker was refused `OVERLOADED` for as long as it kept on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_logging_in_over_and_over_leaves_room_for_others() {
    let tb = TestBroker::start_with(|c| {
        // Hashes long enough that the peer's logins overlap; the default queue.
        c.argon2_memory_kib = 64 * 1024;
        c.argon2_iterations = 4;
        c.argon2_queue = switchboard_broker::limits::ARGON2_QUEUE;
    })
    .await;
    tb.register("alice").await;
    tb.register("mallory").await;
    let mallory = enrolling_once_from(&tb, 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (mallory, stop, password) = (mallory.clone(), stop.clone(), tb.password);
        loops.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match mallory.login("mallory", password, "again").await {
                    Ok((client, _)) => client.close(),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
    }
    let shared = tb.shared();
    let refused = || shared.counters.handshake_refused_count(ErrorCode::OVERLOADED);
    switchboard_tests::within(WAIT, "the peer's logins filling its share of the pool", async {
        while refused() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let alice = enrolling_once_from(&tb, 1);
    for _ in 0..3 {
        let login = tokio::time::timeout(WAIT, alice.login("alice", tb.password, "phone")).await.unwrap();
        assert!(login.is_ok(), "refused while another address logs in over and over: {:?}", login.err());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::timeout(WAIT, loops.join_all()).await.unwrap();
}

#[tokio::test]
async fn registrations_are_limited_per_address() {
    let tb = TestBroker::start_with(|c| {
        c.registration_burst_per_address = 3;
        c.registration_interval_ms = 3_600_000;
    })
    .await;
    for name in ["a1", "a2", "a3"] {
        tb.register(name).await;
    }
    let refused = tb.connector().register("a4", tb.password, "d").await.err().unwrap();
    assert_eq!(refused.code(), Some(ErrorCode::RATE_LIMITED));
    // Past the allowance, whether a name is taken is not said either.
    let taken = tb.connector().register("a1", tb.password, "d").await.err().unwrap();
    assert_eq!(taken.code(), Some(ErrorCode::RATE_LIMITED));
    // Logging in is not registering.
    tb.login("a1").await;
}

/// A registration counts against the address that completed the QUIC handshake, not one
/// the connection moved to afterwards. quinn follows a peer to a new address on its first
/// packet from there, before it has validated the path, so counting the address the auth
/// request arrived from let a peer spend any address's allowance (and so lock everyone
/// behind it out) by forging the source of one packet, and dodge its own. Here the client
/// moves to 127.0.0.2 between its handshake and its hello (a rebind; a forged source is
/// the same to the broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_count_against_the_address_of_the_handshake() {
    let tb = TestBroker::start_with(|c| {
        c.registration_burst_per_address = 1;
        c.registration_interval_ms = 3_600_000;
    })
    .await;
    let moved = || std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    let connector = tb.connector();
    let mut raw = bare(&connector, addr(&tb)).await;
    connector.endpoint().rebind(moved()).unwrap();
    let transcript = raw.hello("moved").await.unwrap();
    let request =
        ClientFrame::Request(Request { id: 0, body: RequestBody::Register(enroll(&transcript, "m1", tb.password, 7)) });
    raw.send.write_all(&encode_frame(&request).unwrap()).await.unwrap();
    let answer: ServerFrame = decode(&raw.read().await.unwrap()).unwrap();
    assert!(matches!(answer, ServerFrame::Response { result: Ok(_), .. }), "{answer:?}");
    // 127.0.0.1 spent its one registration; 127.0.0.2 has not.
    let refused = tb.connector().register("m2", tb.password, "d").await.err().unwrap();
    assert_eq!(refused.code(), Some(ErrorCode::RATE_LIMITED));
    let elsewhere = tb.connector();
    elsewhere.endpoint().rebind(moved()).unwrap();
    elsewhere.register("m3", tb.password, "d").await.unwrap();
}

/// A registration refused `OVERLOADED` because the broker's session places filled while
/// its password was hashed (`max_connections`) gives its registration back to the
/// address: the client library tries again, as `OVERLOADED` asks, and before, each try
/// spent one of the address's registrations on the broker's own limit until the address
/// was `RATE_LIMITED` for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_refused_for_want_of_room_is_given_back() {
    let tb = TestBroker::start_with(|c| {
        c.max_connections = 1;
        c.registration_burst_per_address = 2;
        c.registration_interval_ms = 3_600_000;
        // Both hashes run at once and take long enough for both handshakes to be done.
        c.argon2_memory_kib = 64 * 1024;
        c.argon2_iterations = 4;
        c.argon2_queue = 64;
    })
    .await;
    let once = tb.connector_enrolling_once();
    let (first, second) = tokio::join!(once.register("r1", tb.password, "d"), once.register("r2", tb.password, "d"));
    let (mut made, refused): (Vec<_>, Vec<_>) = [first, second].into_iter().partition(Result::is_ok);
    assert_eq!((made.len(), refused.len()), (1, 1), "one takes the one session place");
    let refusal = refused.into_iter().next().unwrap().err().unwrap();
    assert_eq!(refusal.code(), Some(ErrorCode::OVERLOADED), "{refusal}");
    made.pop().unwrap().unwrap().0.close();
    tb.sessions_ended().await;
    // The address made one registration of its two.
    once.register("r3", tb.password, "d").await.unwrap();
}

/// An address at its `max_connections_per_address` sessions is refused a registration
/// before anything is spent or looked up: before, the refusal came after the name was
/// looked up and the password hashed, and the registration was given back, so an address
/// kept at its cap had the broker hash passwords for it without end (an attacker review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_at_its_session_cap_is_refused_a_registration_before_any_work() {
    let tb = TestBroker::start_with(|c| {
        c.max_connections_per_address = 1;
        c.registration_burst_per_address = 1;
        c.registration_interval_ms = 3_600_000;
    })
    .await;
    tb.shared().auth.add_user("holder", tb.password).await.unwrap();
    let connector = tb.connector();
    let mut raw = bare(&connector, addr(&tb)).await;
    let transcript = raw.hello("at its cap").await.unwrap();
    // The address's one session place taken.
    let (holder, _) = tb.connector().login("holder", tb.password, "d").await.unwrap();
    // A taken name: before, answered `CONFLICT`, the address's one registration spent.
    let body = RequestBody::Register(enroll(&transcript, "holder", tb.password, 7));
    raw.send.write_all(&encode_frame(&ClientFrame::Request(Request { id: 0, body })).unwrap()).await.unwrap();
    assert_eq!(closed_with(&raw.conn).await, Some(ErrorCode::RATE_LIMITED));
    holder.close();
    tb.sessions_ended().await;
    // Nothing was spent: the address's one registration is there.
    tb.connector().register("newcomer", tb.password, "d").await.unwrap();
}

/// Asking whether a name is taken spends the address's registration allowance, as a
/// registration does (before, `CONFLICT` was answered free, for any number of names, so
/// names could be listed at the speed of QUIC handshakes while logins spend a password
/// hash on unknown names to hide them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_whether_names_are_taken_is_limited_like_registering() {
    let tb = TestBroker::start_with(|c| {
        c.registration_burst_per_address = 3;
        c.registration_interval_ms = 3_600_000;
    })
    .await;
    tb.register("a1").await;
    for _ in 0..2 {
        let taken = tb.connector().register("a1", tb.password, "d").await.err().unwrap();
        assert_eq!(taken.code(), Some(ErrorCode::CONFLICT));
    }
    let refused = tb.connector().register("a1", tb.password, "d").await.err().unwrap();
    assert_eq!(refused.code(), Some(ErrorCode::RATE_LIMITED), "the third question is past the allowance");
}

/// A login with a bad device signature is refused before anything is counted, whether
/// its name exists or not (before, one for a name that does not exist was counted
/// against the address and one for a name that exists was not: counting showed which
/// names exist, and made filling the failure table cost no password hash).
#[tokio::test]
async fn bad_signatures_count_the_same_for_names_that_exist_and_not() {
    let tb = TestBroker::start().await;
    tb.register("alice").await;
    let connector = tb.connector();
    for i in 0..2 * (AUTH_FAILURES_PER_ADDRESS + 1) {
        let name = if i % 2 == 0 { format!("nobody{i}") } else { "alice".to_owned() };
        let mut raw = bare(&connector, addr(&tb)).await;
        raw.hello("probe").await.unwrap();
        let login = enroll(b"not this connection's transcript", &name, "a guessed password", 1);
        let request = ClientFrame::Request(Request { id: 0, body: RequestBody::Login(login) });
        raw.send.write_all(&encode_frame(&request).unwrap()).await.unwrap();
        assert_eq!(closed_with(&raw.conn).await, Some(ErrorCode::AUTH_FAILED), "{name}");
    }
    // None of them counted: a right password from the same address is not refused.
    tb.login("alice").await;
}

/// A device that proves its key gets in however many bad signatures its address sent:
/// only failed proofs meet the address's budget (before, the budget was checked first,
/// so a host behind the same address as someone's devices, a carrier NAT or an IPv6
/// /64, locked them all out with 300 bad signatures a minute).
#[tokio::test]
async fn bad_signatures_from_an_address_never_lock_out_a_device_that_proves_its_key() {
    let tb = TestBroker::start().await;
    let (_alice, alice) = tb.register("alice").await;
    let mut codes = Vec::new();
    for _ in 0..=BAD_SIGNATURES_PER_ADDRESS {
        let mut guess = tb.preauth().await;
        guess.request(0, switchboard_tests::authenticate(&alice, b"not this connection's transcript")).await;
        codes.push(guess.next().await.err().flatten());
    }
    assert_eq!(codes[0], Some(ErrorCode::AUTH_FAILED));
    assert_eq!(codes.last(), Some(&Some(ErrorCode::RATE_LIMITED)), "past the address's budget");
    // From the same address, the device that proves its key.
    let device = tb.connector().connect(&alice).await.unwrap();
    device.ping().await.unwrap();
}

// ---- 3. handshakes that never finish take nobody's place ----

#[tokio::test]
async fn unfinished_handshakes_do_not_take_the_slots_of_clients() {
    let tb = TestBroker::start_with(|c| c.max_connections = 10).await;
    let (connector, to) = (tb.connector(), addr(&tb));
    for _ in 0..10 {
        stalled_handshake(&connector, to).await;
    }
    // And ten that finish QUIC but never say hello.
    let mut silent = Vec::new();
    for _ in 0..10 {
        if let Ok(c) = connector.endpoint().connect(to, "localhost").unwrap().await {
            silent.push(c);
        }
    }
    // Ten real clients still fit.
    let mut clients = Vec::new();
    for i in 0..10 {
        let registered = tokio::time::timeout(WAIT, tb.connector().register(&format!("u{i}"), tb.password, "d")).await;
        match registered.unwrap() {
            Ok((client, _)) => clients.push(client),
            Err(e) => panic!("client {i} was refused while handshakes were pending: {e}"),
        }
    }
    for c in &clients {
        c.ping().await.unwrap();
    }
    // The bound on sessions still holds.
    assert!(tb.connector().register("u10", tb.password, "d").await.is_err());
}

/// A handshake that never completes holds its place only until a newcomer that proves
/// its address needs it, or until its deadline (before: until its deadline, so spoofed
/// Initials, which cost nothing, could hold every place).
#[tokio::test]
async fn a_handshake_that_never_completes_gives_up_its_place() {
    // One place for connections in their handshake, taken by a peer that never finishes.
    // (The broker cannot tell that peer it gave up: until the peer proves its address,
    // QUIC lets the broker send it only three times what it sent.)
    let tb = TestBroker::start_with(|c| c.max_unauthenticated_connections = 1).await;
    stalled_handshake(&tb.connector(), addr(&tb)).await;
    assert_eq!(tb.shared().status().unauthenticated, 1);
    // A real client is asked to prove its address (a Retry), then takes the place.
    let (alice, _) = tokio::time::timeout(WAIT, tb.connector().register("alice", tb.password, "d"))
        .await
        .expect("the unfinished handshake kept its place")
        .unwrap();
    alice.ping().await.unwrap();
    // Another stall, with nobody needing its place: the handshake deadline (5 s; the
    // idle timeout is 30 s) frees it.
    stalled_handshake(&tb.connector(), addr(&tb)).await;
    let freed = tokio::time::timeout(WAIT, async {
        while tb.shared().status().unauthenticated > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    freed.await.expect("the unfinished handshake kept its place past its deadline");
}

#[tokio::test]
async fn under_load_unvalidated_handshakes_are_asked_to_retry() {
    // Past half of this bound every new address must prove itself with a QUIC Retry:
    // stalls that cannot (the relay drops their second Initial) hold nothing.
    let tb = TestBroker::start_with(|c| c.max_unauthenticated_connections = 4).await;
    let (connector, to) = (tb.connector(), addr(&tb));
    for _ in 0..8 {
        stalled_handshake(&connector, to).await;
    }
    let (client, _) = tokio::time::timeout(WAIT, tb.connector().register("alice", tb.password, "d"))
        .await
        .unwrap()
        .expect("a client that answers the Retry gets in");
    client.ping().await.unwrap();
}

// ---- 4. unconfirmed enrollments ----

#[tokio::test]
async fn enrollments_never_confirmed_give_way_at_the_device_limit() {
    let tb = TestBroker::start_with(|c| c.unconfirmed_device_grace_ms = 0).await;
    let (_first, laptop) = tb.register("alice").await;
    // The laptop comes back with its key: confirmed.
    let laptop_client = tb.connector().connect(&laptop).await.unwrap();
    // 31 logins whose answers were lost (the clients never use their devices).
    let mut lost = Vec::new();
    for _ in 0..31 {
        lost.push(tb.login("alice").await.1.device_id);
    }
    assert_eq!(laptop_client.devices().await.unwrap().len(), 32);
    let (_phone, phone) = tb.login("alice").await;
    let devices: Vec<u64> = laptop_client.devices().await.unwrap().iter().map(|d| d.device_id).collect();
    assert_eq!(devices.len(), 32, "{devices:?}");
    assert!(devices.contains(&laptop.device_id) && devices.contains(&phone.device_id));
    assert!(!devices.contains(&lost[0]), "the oldest unconfirmed enrollment gave way");
}

#[tokio::test]
async fn recent_unconfirmed_enrollments_still_count() {
    let tb = TestBroker::start().await;
    let (laptop, _) = tb.register("alice").await;
    for _ in 0..31 {
        tb.login("alice").await;
    }
    let refused = tb.connector().login("alice", tb.password, "d").await.err().unwrap();
    assert_eq!(refused.code(), Some(ErrorCode::FORBIDDEN));
    assert_eq!(laptop.devices().await.unwrap().len(), 32);
}

// ---- 5. labels ----

#[tokio::test]
async fn labels_that_hide_or_reverse_text_are_invalid() {
    let tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    for title in ["pay\u{202E}fdp.exe", "\u{2066}team", "a\u{2028}b", " \u{200B} ", "\u{3164}"] {
        let e = alice.create_group(title, &[]).await.err().unwrap();
        assert_eq!(e.code(), Some(ErrorCode::INVALID), "{title:?}");
    }
    let e = tb.connector().login("alice", tb.password, "phone\u{202E}").await.err().unwrap();
    assert_eq!(e.code(), Some(ErrorCode::INVALID));
    // Ordinary text in any script, emoji sequences included, is fine.
    alice.create_group("équipe 团队 👩‍💻", &[]).await.unwrap();
}

// ---- 6. a user's connection beyond the bound ----

/// One device holds at most 16 of its account's 64 places: before, a stolen phone's
/// key alone held all 64, and every other device of the owner and every login were
/// refused, so the owner could not sign it out (an attacker review). The account's
/// bound still holds over its devices.
#[tokio::test]
async fn a_users_connection_beyond_the_bound_is_refused_in_the_handshake() {
    let tb = TestBroker::start().await;
    let (first, laptop) = tb.register("alice").await;
    let mut clients = vec![first];
    for _ in 1..16 {
        clients.push(tb.connector().connect(&laptop).await.unwrap());
    }
    match tb.connector().connect(&laptop).await {
        Ok(_) => panic!("the laptop's 17th connection was authenticated"),
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::RATE_LIMITED), "{e}"),
    }
    // The owner's other devices still connect, and a login still enrolls one.
    let (phone_client, phone) = tb.login("alice").await;
    clients.push(phone_client);
    for _ in 1..16 {
        clients.push(tb.connector().connect(&phone).await.unwrap());
    }
    for _ in 0..2 {
        let (client, device) = tb.login("alice").await;
        clients.push(client);
        for _ in 1..16 {
            clients.push(tb.connector().connect(&device).await.unwrap());
        }
    }
    assert_eq!(clients.len(), 64);
    match tb.connector().connect(&laptop).await {
        Ok(c) => panic!("the 65th connection was authenticated, then closed with {:?}", c.closed().await.code()),
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::RATE_LIMITED), "{e}"),
    }
    // A login refused for the same reason enrolls nothing, and is not tried again (the
    // user's own bound: before, it was `OVERLOADED`, which the client library retries
    // for 30 s, a password hash each).
    let started = std::time::Instant::now();
    let refused = tb.connector().login("alice", tb.password, "phone").await.err().unwrap();
    assert_eq!(refused.code(), Some(ErrorCode::RATE_LIMITED));
    assert!(started.elapsed() < Duration::from_secs(5), "the refused login was retried");
    assert_eq!(clients[0].devices().await.unwrap().len(), 4, "the refused login left a device behind");
    // One of the laptop's closed: the laptop connects again.
    drop(clients.remove(1));
    let again = tokio::time::timeout(WAIT, async {
        loop {
            match tb.connector().connect(&laptop).await {
                Ok(c) => return c,
                // The dropped connection's session may take a moment to end.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    again.await.unwrap().ping().await.unwrap();
}

// ---- 7. the agent's length ----

#[tokio::test]
async fn an_agent_longer_than_a_name_is_invalid() {
    let tb = TestBroker::start().await;
    let (connector, to) = (tb.connector(), addr(&tb));
    let mut fits = bare(&connector, to).await;
    assert!(fits.hello(&"a".repeat(MAX_NAME_BYTES as usize)).await.is_some());
    let mut long = bare(&connector, to).await;
    let agent = "a".repeat(MAX_NAME_BYTES as usize + 1);
    assert!((agent.len() as u32) < PREAUTH_MAX_FRAME_BYTES);
    assert!(long.hello(&agent).await.is_none(), "the broker answered a hello with a long agent");
    assert_eq!(closed_with(&long.conn).await, Some(ErrorCode::INVALID));
}

/// Before it is authenticated a connection may make the broker buffer its hello and its
/// auth request, not a whole stream window: bytes it sends after its request wait at
/// its end while the request is checked, until the broker opens the session's window
/// (before: 256 KiB were taken at once, for each of up to 1,024 unauthenticated
/// connections, held while their requests waited for password hashes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_authentication_the_broker_takes_little_data() {
    let tb = TestBroker::start_with(|c| {
        // A password check takes well over the 50 ms asserted below.
        c.argon2_memory_kib = 64 * 1024;
        c.argon2_iterations = 4;
    })
    .await;
    tb.register("alice").await;
    let connector = tb.connector();
    let mut raw = bare(&connector, addr(&tb)).await;
    let transcript = raw.hello("buffer").await.unwrap();
    let login = enroll(&transcript, "alice", tb.password, 3);
    let request = ClientFrame::Request(Request { id: 0, body: RequestBody::Login(login) });
    raw.send.write_all(&encode_frame(&request).unwrap()).await.unwrap();
    // quinn takes a write only within the broker's flow-control credit.
    let started = std::time::Instant::now();
    let _ = raw.send.write_all(&[0u8; 64 * 1024]).await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(50), "64 KiB more were taken at once, before authentication ({waited:?})");
}

/// Whether a name exists is as slow to learn as creating conversations: a `Block` or a
/// `CreateConversation` naming a user nobody is spends the creation allowance (20 at
/// once, then one a second), the same as one naming a real user. Before, an unknown name
/// cost nothing (`Block` looked it up before the allowance, and a refused creation gave
/// it back), while a known one spent it: a free, unbounded oracle of which names exist.
#[tokio::test]
async fn unknown_names_spend_the_creation_allowance() {
    let tb = TestBroker::start().await;
    let (mallory, _) = tb.register("mallory").await;
    let mut codes = Vec::new();
    for i in 0..21 {
        codes.push(mallory.block(&format!("nobody{i}"), true).await.unwrap_err().code());
    }
    assert!(codes[..20].iter().all(|c| *c == Some(ErrorCode::NOT_FOUND)), "{codes:?}");
    assert_eq!(codes[20], Some(ErrorCode::RATE_LIMITED), "{codes:?}");
    let group = mallory.create_group("g", &["nobody".into()]).await.unwrap_err();
    assert_eq!(group.code(), Some(ErrorCode::RATE_LIMITED));
    // Another user's allowance is its own; a creation naming nobody spends it.
    let (alice, _) = tb.register("alice").await;
    for i in 0..20 {
        assert_eq!(alice.create_direct(&format!("ghost{i}")).await.unwrap_err().code(), Some(ErrorCode::NOT_FOUND));
    }
    assert_eq!(alice.create_direct("mallory").await.unwrap_err().code(), Some(ErrorCode::RATE_LIMITED));
}

/// Opening a direct conversation that exists is answered from reads, without a job of
/// the catalog thread or a group commit: before, each was both, and free, so a few
/// accounts opening one in a loop kept the thread that serves logins and revocations
/// busy (an attacker review). A block still refuses it.
#[tokio::test]
async fn opening_an_existing_direct_conversation_writes_nothing() {
    let tb = TestBroker::start().await;
    let (alice, _) = tb.register("alice").await;
    let (bob, _) = tb.register("bob").await;
    let conv = alice.create_direct("bob").await.unwrap().id;
    let before = tb.shared().store.commit_stats().commits();
    for _ in 0..50 {
        assert_eq!(alice.create_direct("bob").await.unwrap().id, conv);
    }
    let commits = tb.shared().store.commit_stats().commits() - before;
    assert!(commits < 5, "{commits} group commits for 50 openings");
    bob.block("alice", true).await.unwrap();
    let refused = alice.create_direct("bob").await.err().and_then(|e| e.code());
    assert_eq!(refused, Some(ErrorCode::FORBIDDEN));
}

/// A creation refused after its names were read spends the creation allowance too: a
/// group naming a user who blocks the caller is refused `FORBIDDEN` after every name
/// before it was read on the catalog thread (up to 255), and was refunded, so one
/// account could keep that thread busy at no cost (an attacker review). Opening an
/// existing direct conversation still costs nothing. A name that is no user name is
/// `NOT_FOUND` without being said back: quoted with `{:?}`, 64 KiB of control bytes made
/// a 390 KB answer where 1 KiB was reserved (another review).
#[tokio::test]
async fn refused_creations_spend_the_allowance_and_bad_names_are_not_said_back() {
    let tb = TestBroker::start().await;
    let (mallory, _) = tb.register("mallory").await;
    let (alice, _) = tb.register("alice").await;
    alice.block("mallory", true).await.unwrap();
    let conv = mallory.create_direct("bob").await.map(|_| ()).unwrap_err();
    assert_eq!(conv.code(), Some(ErrorCode::NOT_FOUND));
    let (_bob, _) = tb.register("bob").await;
    mallory.create_direct("bob").await.unwrap();
    // 2 spent (the unknown name, the creation): 18 refusals spend the burst of 20, plus
    // one for each second the test took; opening the existing direct conversation
    // between them spends nothing. Before, refusals never ran out.
    let started = std::time::Instant::now();
    let mut refused = 0u64;
    let code = loop {
        let code = mallory.create_group("g", &["bob".into(), "alice".into()]).await.unwrap_err().code();
        if code != Some(ErrorCode::FORBIDDEN) || refused == 60 {
            break code;
        }
        refused += 1;
        if refused == 9 {
            mallory.create_direct("bob").await.expect("opening an existing one is free");
        }
    };
    assert_eq!(code, Some(ErrorCode::RATE_LIMITED), "after {refused} refusals");
    assert!(refused <= 18 + started.elapsed().as_secs() + 1, "{refused} refusals");

    let (carol, _) = tb.register("carol").await;
    let long = "\u{7f}".repeat(60_000);
    let refused = carol.block(&long, true).await.unwrap_err();
    let ClientError::Server(body) = &refused else { panic!("{refused:?}") };
    assert_eq!(body.code, ErrorCode::NOT_FOUND);
    assert!(body.message.len() < 200, "{} bytes said back", body.message.len());
    let refused = carol.create_group("g", &["mallory".into(), long]).await.unwrap_err();
    let ClientError::Server(body) = &refused else { panic!("{refused:?}") };
    assert!(body.code == ErrorCode::NOT_FOUND && body.message.len() < 200, "{body:?}");
}
