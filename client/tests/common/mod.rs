//! Helpers shared by the client's integration tests (`mod common;` in each).

/// Pseudo-random bytes (xorshift; no known file type), `len` of them, the same for the
/// same `seed`.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A broker configuration for these tests: `Config::ephemeral` with the overload rules
/// that time queues off. Debug builds sharing two cores with other tests wait past
/// their 20 ms targets now and then, and the calls tested here do not retry
/// `OVERLOADED` (the rules are tested in the broker's `overload` module).
pub fn test_config(data_dir: std::path::PathBuf) -> switchboard_broker::Config {
    let mut config = switchboard_broker::Config::ephemeral(data_dir);
    config.send_delay_target_ms = 0;
    config.socket_backlog_target_ms = 0;
    config
}

/// Starts a broker on `addr`, which a broker just shut down was using, with the data in
/// `data_dir` (a restart as clients see it). The old socket is released when its
/// endpoint's last connection is gone, which may be a moment after `shutdown` returned
/// (a client reconnecting meanwhile holds one in its handshake), so a bind refused with
/// `AddrInUse` is tried again, for up to 30 s.
pub async fn restart_on(addr: std::net::SocketAddr, data_dir: std::path::PathBuf) -> switchboard_broker::Broker {
    let config = switchboard_broker::Config { listen: addr, ..test_config(data_dir) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match switchboard_broker::Broker::start(config.clone()).await {
            Ok(broker) => return broker,
            Err(switchboard_broker::error::Error::Io { error, .. })
                if error.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("the broker did not start again on {addr}: {e}"),
        }
    }
}
