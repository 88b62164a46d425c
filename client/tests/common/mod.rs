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
