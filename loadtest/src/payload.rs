//! Message text the harness sends: the scheduled send time (16 hex digits of
//! nanoseconds on the harness clock) padded to the requested size.

use std::fmt::Write as _;

/// Smallest payload: the timestamp itself.
pub const MIN_SIZE: usize = 16;

/// Writes a payload for `sched_ns` of `size` bytes into `out` (reusing its buffer).
pub fn fill(out: &mut String, sched_ns: u64, size: usize) {
    out.clear();
    let _ = write!(out, "{sched_ns:016x}");
    while out.len() < size {
        out.push('.');
    }
}

/// The scheduled send time in a payload, if it is one.
pub fn sched_ns(text: &str) -> Option<u64> {
    u64::from_str_radix(text.get(..16)?, 16).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let mut s = String::new();
        super::fill(&mut s, 0xdead_beef, 256);
        assert_eq!(s.len(), 256);
        assert_eq!(super::sched_ns(&s), Some(0xdead_beef));
        assert_eq!(super::sched_ns("hello"), None);
    }
}
