//! Message text the harness sends: the scheduled send time (16 hex digits of
//! nanoseconds on the harness clock) padded to the requested size. Messages to a server
//! that numbers nothing itself (NATS) also carry their sender and number.

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

/// Smallest numbered payload: timestamp, 4 hex digits of sender, 8 of number.
pub const MIN_NUMBERED_SIZE: usize = 28;

/// Writes a payload for `sched_ns` from sender `sender` (below 65,536), its message
/// number `number`, of `size` bytes (at least `MIN_NUMBERED_SIZE`) into `out`.
pub fn fill_numbered(out: &mut String, sched_ns: u64, sender: u16, number: u32, size: usize) {
    out.clear();
    let _ = write!(out, "{sched_ns:016x}{sender:04x}{number:08x}");
    while out.len() < size {
        out.push('.');
    }
}

/// (scheduled send time, sender, number) of a numbered payload, if it is one.
pub fn numbered(payload: &[u8]) -> Option<(u64, u16, u32)> {
    let text = std::str::from_utf8(payload.get(..MIN_NUMBERED_SIZE)?).ok()?;
    Some((
        u64::from_str_radix(&text[..16], 16).ok()?,
        u16::from_str_radix(&text[16..20], 16).ok()?,
        u32::from_str_radix(&text[20..28], 16).ok()?,
    ))
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

    #[test]
    fn numbered_round_trip() {
        let mut s = String::new();
        super::fill_numbered(&mut s, 0xdead_beef, 513, 70_000, 64);
        assert_eq!(s.len(), 64);
        assert_eq!(super::numbered(s.as_bytes()), Some((0xdead_beef, 513, 70_000)));
        assert_eq!(super::sched_ns(&s), Some(0xdead_beef), "the timestamp stays where the plain payload has it");
        assert_eq!(super::numbered(&s.as_bytes()[..27]), None, "too short");
        assert_eq!(super::numbered(b"0000000000000001zzzz00000001"), None, "sender not hex");
    }
}
