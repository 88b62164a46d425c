//! Stable numeric error codes. They appear in `ErrorBody::code` of a failed response and
//! as the QUIC application error code when the broker closes a connection. Codes are
//! never renumbered; a client must treat an unknown code as a generic failure.

use serde::{Deserialize, Serialize};

/// A stable error code. A newtype rather than an enum so an older client still decodes
/// codes a newer broker adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

macro_rules! codes {
    ($($(#[doc = $doc:literal])* $name:ident = $value:literal,)*) => {
        impl ErrorCode {
            $($(#[doc = $doc])* pub const $name: ErrorCode = ErrorCode($value);)*

            /// Every defined code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The code's stable name, or `UNKNOWN` for a code this version does not know.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($value => stringify!($name),)*
                    _ => "UNKNOWN",
                }
            }
        }
    };
}

codes! {
    /// Connection closed without error (client or broker done).
    NO_ERROR = 0,
    /// A frame could not be decoded: garbage bytes, unknown request, bad varint, a
    /// string that is not UTF-8.
    BAD_FRAME = 1,
    /// A frame declared a length above the announced limit.
    FRAME_TOO_LARGE = 2,
    /// The client's hello names a protocol version the broker does not speak.
    UNSUPPORTED_VERSION = 3,
    /// A request other than register/login/authenticate came before authentication.
    NOT_AUTHENTICATED = 4,
    /// Wrong user, password, device or signature. Deliberately does not say which.
    AUTH_FAILED = 5,
    /// Too many attempts; try again later.
    RATE_LIMITED = 6,
    /// The caller may not do this (not a member, not the sender, not an admin).
    FORBIDDEN = 7,
    /// No such conversation, user, message or device.
    NOT_FOUND = 8,
    /// The name is taken, or the entity already exists in a conflicting form.
    CONFLICT = 9,
    /// A decoded field is out of range or malformed (too long, empty, bad characters,
    /// bad key). Invalid UTF-8 never decodes: that is `BAD_FRAME`.
    INVALID = 10,
    /// Registration is closed on this broker.
    REGISTRATION_CLOSED = 11,
    /// The device did not read its events fast enough; reconnect and catch up.
    SLOW_CONSUMER = 12,
    /// The broker is over a capacity bound; retry with backoff.
    OVERLOADED = 13,
    /// The device was revoked.
    DEVICE_REVOKED = 14,
    /// Authentication did not complete in time.
    TIMEOUT = 15,
    /// The broker is shutting down; reconnect later.
    GOING_AWAY = 16,
    /// An internal error (storage failure). Nothing unacknowledged can be assumed done.
    INTERNAL = 17,
    /// An upload chunk or stream did not start at the durable offset; the reply carries
    /// the offset to resume from.
    WRONG_OFFSET = 18,
    /// An upload chunk's data does not match its CRC-32; it was not stored.
    CHUNK_CORRUPT = 19,
    /// A complete upload's bytes do not match its declared whole-file BLAKE3; nothing was
    /// published and the upload is gone.
    HASH_MISMATCH = 20,
    /// The declared file size is above the broker's `max_file_bytes`.
    FILE_TOO_LARGE = 21,
    /// The upload would take the user past its quota of stored bytes.
    QUOTA_EXCEEDED = 22,
    /// The file's first bytes show a type that may not be published under the declared
    /// one (an executable declared as an image or document).
    TYPE_MISMATCH = 23,
    /// The user has the most uploads in progress the broker allows; finish or cancel one.
    TOO_MANY_UPLOADS = 24,
    /// The broker keeps a disk reserve and has no room for the upload; try later.
    STORAGE_FULL = 25,
    /// The file exists but its upload is not complete yet; it cannot be read.
    NOT_READY = 26,
    /// An upload chunk arrived slower than the broker's minimum rate while other uploads
    /// waited for its buffer, or a download's reader left a 128 KiB piece untaken for
    /// over 4 s while other downloads waited for a blob file: its stream is reset; resume (an upload from
    /// the durable offset, with smaller chunks; a download from the bytes received).
    CHUNK_TOO_SLOW = 27,
    /// The account is disabled by the broker's operator (`switchboard user disable`):
    /// none of its devices may sign in, and its connections were closed, until the
    /// operator enables it again.
    ACCOUNT_DISABLED = 28,
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // "NAME (n)", as sb prints a code (a trial read two forms as two things).
        write!(f, "{} ({})", self.name(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol document whose error-code table this module keeps true.
    const DOC: &str = include_str!("../../docs/PROTOCOL.md");

    /// Section 9's table lists exactly `ErrorCode::ALL`: every code once, by number and
    /// name, in numeric order, and no code the enum lacks.
    #[test]
    fn documented_codes_match() {
        let (_, section) = DOC.split_once("\n## 9. Error codes\n").expect("PROTOCOL.md has section 9");
        let section = section.split_once("\n## ").map_or(section, |(s, _)| s);
        let documented: Vec<(u16, &str)> = section
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let code = cells.get(1)?.parse().ok()?;
                let name = cells.get(2).and_then(|c| c.strip_prefix('`')?.strip_suffix('`'));
                Some((code, name.unwrap_or_else(|| panic!("row of code {code} has no `NAME`: {line:?}"))))
            })
            .collect();
        let expected: Vec<(u16, &str)> = ErrorCode::ALL.iter().map(|c| (c.0, c.name())).collect();
        assert_eq!(documented, expected, "PROTOCOL.md section 9 must list exactly ErrorCode::ALL, in order");
    }

    #[test]
    fn codes_are_dense_and_named() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.0 as usize, i);
            assert_ne!(code.name(), "UNKNOWN");
        }
        assert_eq!(ErrorCode(999).name(), "UNKNOWN");
    }
}
