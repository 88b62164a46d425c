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
