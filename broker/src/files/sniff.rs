//! The type check of PROTOCOL.md section 12: the declared content type of an upload
//! against what its first bytes show.
//!
//! Magic numbers come from the `infer` crate. Where infer alone would judge wrongly this
//! module adds to it, each place saying why:
//! - infer's two-byte signatures that plain text can start with (LLVM bitcode `BC`, DER
//!   `0\x82`, COFF objects, which infer even labels `application/x-executable`) are
//!   ignored: a CSV starting with "BC" is not bitcode.
//! - infer has no SVG: a declared `image/svg+xml` whose bytes are text starting with
//!   `<svg` or `<?xml` keeps its type instead of becoming `application/octet-stream`.
//! - infer tells container formats by their outer box only (zip, OLE2 compound files,
//!   ISO-BMFF, Ogg, Matroska; without its `std` feature every OLE2 file is `msword`), and
//!   guesses HTML and XML from a leading tag: a declared type in the same family as the
//!   found one is kept, since the declaration is the more precise of the two.
//! - Equivalent spellings (`image/jpg`, `audio/mp3`, `application/x-msdownload`, ...)
//!   are mapped to infer's names before comparing.
//!
//! Executables are ELF, PE (`MZ`), Mach-O (fat binaries included), `#!` scripts, Java
//! classes and WebAssembly modules. A `MZ` start is taken as PE without looking for the
//! `PE\0\0` header: DOS programs have none, and a text file starting with "MZ" declared
//! as text is a price worth paying.

// The Upload actor calls `check` once the first min(4096, size) bytes are durable.

/// What to do with an upload after looking at its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The declared type stands.
    Keep,
    /// Publish the file with this content type instead (lowercase, no parameters).
    Relabel(String),
    /// The bytes are an executable of this content type while the declared type is
    /// neither an executable nor `application/octet-stream`: fail with `TYPE_MISMATCH`.
    Refuse {
        /// The executable type the bytes show.
        found: &'static str,
    },
}

/// Bytes at the start of a file the type check looks at (all of a smaller file).
pub(crate) const HEAD_BYTES: u64 = 4096;

/// The generic type: executables may be declared as it, and unknown media become it.
pub(crate) const OCTET_STREAM: &str = "application/octet-stream";

/// Judges `declared` (a MIME type as the client sent it: any case, parameters allowed)
/// against `head`, the first bytes of the file (ideally 4 KiB or the whole file).
/// An empty `head` shows nothing and keeps the declared type.
pub(crate) fn check(declared: &str, head: &[u8]) -> Verdict {
    if head.is_empty() {
        return Verdict::Keep;
    }
    let declared = normalize(declared);
    let declared = declared.as_str();
    if let Some(found) = executable(head) {
        return if declared == found
            || declared == OCTET_STREAM
            || (found == SHELL_SCRIPT && SCRIPT_TYPES.contains(&declared))
        {
            Verdict::Keep
        } else if is_executable_type(declared) {
            Verdict::Relabel(found.to_owned())
        } else {
            Verdict::Refuse { found }
        };
    }
    match known(head) {
        Some(found) if found == declared || same_family(declared, found) => Verdict::Keep,
        Some(found) => Verdict::Relabel(found.to_owned()),
        None if declared == "image/svg+xml" && looks_like_svg(head) => Verdict::Keep,
        None if ["image/", "audio/", "video/"].iter().any(|media| declared.starts_with(media)) => {
            Verdict::Relabel(OCTET_STREAM.to_owned())
        }
        None => Verdict::Keep,
    }
}

/// infer's name for `#!` scripts.
const SHELL_SCRIPT: &str = "text/x-shellscript";

/// The executable type `head` shows, in infer's names.
fn executable(head: &[u8]) -> Option<&'static str> {
    use infer::{app, text};
    // Java classes before Mach-O: both start with CAFEBABE and infer's two tests split
    // them on the version field, so the order does not matter for correctness.
    let found = [
        (app::is_elf as fn(&[u8]) -> bool, "application/x-executable"),
        (app::is_exe, "application/vnd.microsoft.portable-executable"),
        (app::is_java, "application/java"),
        (app::is_mach, "application/x-mach-binary"),
        (app::is_wasm, "application/wasm"),
        (text::is_shellscript, SHELL_SCRIPT),
    ];
    found.into_iter().find(|(test, _)| test(head)).map(|(_, mime)| mime)
}

/// The declared types that count as executables (after `normalize`).
fn is_executable_type(declared: &str) -> bool {
    matches!(
        declared,
        "application/x-executable"
            | "application/vnd.microsoft.portable-executable"
            | "application/java"
            | "application/x-mach-binary"
            | "application/wasm"
            | SHELL_SCRIPT
    ) || SCRIPT_TYPES.contains(&declared)
}

/// Script languages whose files may start with `#!`.
const SCRIPT_TYPES: &[&str] = &[
    SHELL_SCRIPT,
    "text/x-python",
    "text/x-script.python",
    "text/x-perl",
    "application/x-perl",
    "text/x-ruby",
    "application/x-ruby",
    "text/javascript",
    "application/javascript",
    "application/x-php",
    "text/x-php",
    "text/x-lua",
    "text/x-tcl",
    "application/x-awk",
];

/// The non-executable type `head` shows, ignoring infer's weak signatures.
fn known(head: &[u8]) -> Option<&'static str> {
    let kind = infer::get(head)?;
    // Two-byte magic numbers that text starts with too (see the module doc).
    if matches!(kind.extension(), "bc" | "der" | "obj") {
        return None;
    }
    Some(kind.mime_type())
}

/// Families of types that infer cannot tell apart by their first bytes (see the module
/// doc). Text formats are one family: infer's HTML and XML guesses never relabel text.
fn same_family(declared: &str, found: &str) -> bool {
    let family = |mime: &str| -> Option<u8> {
        match mime {
            "application/zip"
            | "application/epub+zip"
            | "application/java-archive"
            | "application/vnd.android.package-archive"
            | "application/x-xpinstall" => Some(0),
            _ if mime.ends_with("+zip")
                || mime.starts_with("application/vnd.openxmlformats-officedocument.")
                || mime.starts_with("application/vnd.oasis.opendocument.") =>
            {
                Some(0)
            }
            "application/x-ole-storage"
            | "application/msword"
            | "application/vnd.ms-excel"
            | "application/vnd.ms-powerpoint"
            | "application/vnd.ms-outlook"
            | "application/x-msi" => Some(1),
            "video/mp4" | "video/x-m4v" | "video/quicktime" | "video/3gpp" | "audio/mp4" | "audio/m4a"
            | "audio/3gpp" | "image/heif" | "image/heic" | "image/avif" => Some(2),
            "audio/ogg" | "audio/opus" | "video/ogg" | "application/ogg" | "audio/vorbis" => Some(3),
            "video/x-matroska" | "video/webm" | "audio/webm" | "audio/x-matroska" => Some(4),
            "application/xml" | "application/xhtml+xml" | "application/json" => Some(5),
            _ if mime.starts_with("text/") || mime.ends_with("+xml") => Some(5),
            _ => None,
        }
    };
    family(declared).is_some_and(|f| family(found) == Some(f))
}

/// Whether a text head is an SVG document (infer knows no SVG).
fn looks_like_svg(head: &[u8]) -> bool {
    let text = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let text = text.trim_ascii_start();
    let lower: Vec<u8> = text.iter().take(256).map(u8::to_ascii_lowercase).collect();
    lower.starts_with(b"<svg") || lower.starts_with(b"<?xml") || lower.starts_with(b"<!doctype svg")
}

/// A content type in infer's spelling: lowercase, without parameters or spaces, common
/// aliases mapped to the name infer reports.
fn normalize(content_type: &str) -> String {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let canonical = match essence.as_str() {
        "image/jpg" | "image/pjpeg" => "image/jpeg",
        "image/x-png" => "image/png",
        "image/x-icon" | "image/ico" => "image/vnd.microsoft.icon",
        "image/x-ms-bmp" | "image/x-bmp" => "image/bmp",
        "audio/mp3" | "audio/x-mp3" | "audio/mpeg3" | "audio/x-mpeg" => "audio/mpeg",
        "audio/wav" | "audio/wave" | "audio/vnd.wave" => "audio/x-wav",
        "audio/flac" => "audio/x-flac",
        "audio/x-midi" | "audio/mid" => "audio/midi",
        "audio/x-m4a" => "audio/m4a",
        "audio/aiff" => "audio/x-aiff",
        "video/avi" | "video/msvideo" => "video/x-msvideo",
        "application/x-pdf" => "application/pdf",
        "application/x-zip-compressed" | "application/x-zip" => "application/zip",
        "application/x-gzip" => "application/gzip",
        "application/x-rar-compressed" | "application/x-rar" => "application/vnd.rar",
        "application/x-sqlite3" => "application/vnd.sqlite3",
        "font/woff" | "font/woff2" => "application/font-woff",
        "font/ttf" | "font/otf" | "font/sfnt" | "application/x-font-ttf" => "application/font-sfnt",
        "application/x-msdownload"
        | "application/x-dosexec"
        | "application/x-msdos-program"
        | "application/x-ms-dos-executable"
        | "application/vnd.microsoft.portable-executable" => "application/vnd.microsoft.portable-executable",
        "application/x-elf" | "application/x-sharedlib" | "application/x-pie-executable" => "application/x-executable",
        "application/x-mach-o-executable" | "application/x-mach-o" => "application/x-mach-binary",
        "application/x-sh" | "text/x-sh" | "application/x-shellscript" => SHELL_SCRIPT,
        "application/java-vm" | "application/x-java-class" | "application/java-byte-code" => "application/java",
        "application/x-wasm" => "application/wasm",
        _ => return essence,
    };
    canonical.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real PNG start: signature and IHDR of a 1x1 RGBA image.
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89";

    /// The first 64 bytes of an x86-64 ELF executable header.
    fn elf() -> Vec<u8> {
        let mut head = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x3e\0\x01\0\0\0".to_vec();
        head.resize(64, 0);
        head
    }

    /// A PE start: DOS header with `e_lfanew` = 0x80 and the `PE\0\0` header there.
    fn pe() -> Vec<u8> {
        let mut head = vec![0u8; 0x98];
        head[..2].copy_from_slice(b"MZ");
        head[0x3c] = 0x80;
        head[0x80..0x84].copy_from_slice(b"PE\0\0");
        head[0x84..0x86].copy_from_slice(&[0x64, 0x86]);
        head
    }

    fn check_case(declared: &str, head: &[u8], expected: Verdict) {
        assert_eq!(check(declared, head), expected, "{declared} with {:02x?}", &head[..head.len().min(16)]);
    }

    fn relabel(to: &str) -> Verdict {
        Verdict::Relabel(to.to_owned())
    }

    #[test]
    fn matching_types_are_kept() {
        check_case("image/png", PNG, Verdict::Keep);
        check_case("IMAGE/PNG; charset=binary", PNG, Verdict::Keep);
        check_case("image/jpg", b"\xff\xd8\xff\xe0\0\x10JFIF\0", Verdict::Keep);
        check_case("text/plain", b"hello, this is just text\n", Verdict::Keep);
        check_case("text/plain; charset=utf-8", "grüße\n".as_bytes(), Verdict::Keep);
        check_case("application/pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", Verdict::Keep);
    }

    #[test]
    fn another_known_type_is_relabelled() {
        check_case("image/jpeg", PNG, relabel("image/png"));
        check_case("application/octet-stream", PNG, relabel("image/png"));
        check_case("application/pdf", b"GIF89a\x01\0\x01\0\0\0\0", relabel("image/gif"));
    }

    #[test]
    fn executables_are_refused_unless_declared_as_such() {
        check_case("image/png", &elf(), Verdict::Refuse { found: "application/x-executable" });
        check_case(
            "application/pdf",
            &pe(),
            Verdict::Refuse { found: "application/vnd.microsoft.portable-executable" },
        );
        check_case("text/plain", b"#!/bin/sh\nrm -rf ~\n", Verdict::Refuse { found: "text/x-shellscript" });
        let mach_o = b"\xcf\xfa\xed\xfe\x07\0\0\x01\x03\0\0\0";
        check_case("image/gif", mach_o, Verdict::Refuse { found: "application/x-mach-binary" });
        let fat_mach_o = b"\xca\xfe\xba\xbe\0\0\0\x02\x01\0\0\x07";
        check_case("text/plain", fat_mach_o, Verdict::Refuse { found: "application/x-mach-binary" });
        let java_class = b"\xca\xfe\xba\xbe\0\0\0\x41\0\x1d\x0a\0";
        check_case("image/png", java_class, Verdict::Refuse { found: "application/java" });
        check_case("text/html", b"\0asm\x01\0\0\0\x01\x04", Verdict::Refuse { found: "application/wasm" });
    }

    #[test]
    fn executables_declared_as_executables_or_octet_stream_are_kept() {
        check_case("application/octet-stream", &elf(), Verdict::Keep);
        check_case("Application/Octet-Stream", &pe(), Verdict::Keep);
        check_case("application/x-executable", &elf(), Verdict::Keep);
        check_case("application/x-msdownload", &pe(), Verdict::Keep);
        check_case("application/x-sh", b"#!/bin/sh\necho hi\n", Verdict::Keep);
        check_case("text/x-python", b"#!/usr/bin/env python3\nprint(1)\n", Verdict::Keep);
        check_case("application/x-executable", &pe(), relabel("application/vnd.microsoft.portable-executable"));
    }

    #[test]
    fn media_without_a_known_type_become_octet_stream() {
        let random = [0x3a, 0x91, 0x07, 0xee, 0x52, 0x6b, 0xc4, 0x18, 0xd9, 0x2f, 0x80, 0x44, 0x5e, 0xa7];
        check_case("image/png", &random, relabel(OCTET_STREAM));
        check_case("audio/mpeg", b"just some words", relabel(OCTET_STREAM));
        check_case("video/mp4", &random, relabel(OCTET_STREAM));
        // Other declared types are not judged when nothing is known.
        check_case("application/x-custom", &random, Verdict::Keep);
    }

    #[test]
    fn weak_signatures_and_container_families_do_not_relabel() {
        check_case("text/csv", b"BC Hydro,2024,17.50\n", Verdict::Keep);
        check_case("text/plain", b"<html><body>hi</body></html>", Verdict::Keep);
        check_case(
            "image/svg+xml",
            b"<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
            Verdict::Keep,
        );
        check_case("image/svg+xml", b"\xef\xbb\xbf  <svg viewBox=\"0 0 1 1\"/>", Verdict::Keep);
        let ole2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\0\0\0\0\0\0\0\0";
        check_case("application/vnd.ms-excel", ole2, Verdict::Keep);
        let zip = b"PK\x03\x04\x14\0\0\0\x08\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x08\0\0\0manifest";
        check_case("application/java-archive", zip, Verdict::Keep);
        check_case("application/zip", zip, Verdict::Keep);
        check_case("image/png", zip, relabel("application/zip"));
        let mp4 = b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom";
        check_case("video/quicktime", mp4, Verdict::Keep);
        check_case("video/mp4", mp4, Verdict::Keep);
    }

    #[test]
    fn an_empty_head_keeps_the_declared_type() {
        check_case("image/png", b"", Verdict::Keep);
        check_case("text/plain", b"", Verdict::Keep);
    }
}
