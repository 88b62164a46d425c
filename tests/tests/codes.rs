//! Every error code is produced by some test. A code no test asserts is a behaviour
//! that can break unnoticed: this reads the workspace's test sources and names each
//! code of `ErrorCode::ALL` that none of them mentions as `ErrorCode::NAME` (comments
//! do not count).
//!
//! Test sources are `tests/tests`, `broker/tests` and `client/tests`, and the
//! `#[cfg(test)]` modules under each crate's `src` (inline, or in a file of their own).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use switchboard_protocol::ErrorCode;

#[test]
fn every_error_code_is_asserted_by_some_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let sources = test_sources(&root);
    let names: Vec<String> =
        sources.iter().map(|(p, _)| p.strip_prefix(&root).unwrap().display().to_string()).collect();
    assert!(names.iter().any(|n| n.ends_with("authz.rs")), "the scan found the test files: {names:?}");
    assert!(names.iter().any(|n| n.ends_with("harness.rs")), "the scan found test-only modules: {names:?}");
    let text: String = sources.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("\n");
    let missing: Vec<&str> = ErrorCode::ALL
        .iter()
        .map(|c| c.name())
        .filter(|name| !mentions(&text, &format!("ErrorCode::{name}")))
        .collect();
    assert!(missing.is_empty(), "no test asserts {missing:?}; scanned {names:?}");
}

#[test]
fn the_scan_sees_only_test_code() {
    let src = "fn f() { ErrorCode::INTERNAL }\n// ErrorCode::GOING_AWAY\n#[cfg(test)]\nmod tests {\n    \
               fn g() { let _ = \"}\"; ErrorCode::TIMEOUT }\n}\nfn h() { ErrorCode::OVERLOADED }\n";
    let modules = cfg_test_modules(src);
    assert_eq!(modules.len(), 1);
    let text = without_comments(&modules[0]);
    assert!(mentions(&text, "ErrorCode::TIMEOUT"));
    for outside in ["ErrorCode::INTERNAL", "ErrorCode::GOING_AWAY", "ErrorCode::OVERLOADED"] {
        assert!(!mentions(&text, outside), "{outside}");
    }
    assert!(!mentions("ErrorCode::INVALID_THING", "ErrorCode::INVALID"));
}

/// `(path, code without comments)` of every test source.
fn test_sources(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for dir in ["tests/tests", "broker/tests", "client/tests"] {
        for path in rust_files(&root.join(dir)) {
            // This file names no code on purpose.
            if path.ends_with("tests/tests/codes.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((path, without_comments(&text)));
        }
    }
    for krate in ["protocol", "storage", "broker", "client", "loadtest"] {
        for path in rust_files(&root.join(krate).join("src")) {
            let text = std::fs::read_to_string(&path).unwrap();
            for module in cfg_test_modules(&text) {
                out.push((path.clone(), without_comments(&module)));
            }
            for name in cfg_test_module_files(&text) {
                let dir = module_dir(&path);
                let file = [dir.join(format!("{name}.rs")), dir.join(&name).join("mod.rs")]
                    .into_iter()
                    .find(|p| p.exists())
                    .unwrap_or_else(|| panic!("test module {name} of {}", path.display()));
                let text = std::fs::read_to_string(&file).unwrap();
                out.push((file, without_comments(&text)));
            }
        }
    }
    // A file included whole need not also be counted for its inline test module.
    out.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
    out.dedup_by(|later, kept| later.0 == kept.0 && kept.1.contains(later.1.as_str()));
    out
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The directory a file's child modules live in.
fn module_dir(file: &Path) -> PathBuf {
    let parent = file.parent().unwrap();
    match file.file_stem().and_then(|s| s.to_str()) {
        Some("lib" | "main" | "mod") => parent.to_path_buf(),
        Some(stem) => parent.join(stem),
        None => parent.to_path_buf(),
    }
}

/// The lines after each `#[cfg(test)]` attribute, if the item it is on is a module.
fn after_cfg_test(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        rest = &rest[at + "#[cfg(test)]".len()..];
        let item = rest.trim_start();
        let item = item.strip_prefix("pub(crate) ").or_else(|| item.strip_prefix("pub ")).unwrap_or(item);
        if item.starts_with("mod ") {
            out.push(item);
        }
    }
    out
}

/// Names of test-only modules declared as `mod name;` (their code is in another file).
fn cfg_test_module_files(text: &str) -> Vec<String> {
    after_cfg_test(text)
        .into_iter()
        .filter_map(|item| {
            let decl = item.lines().next()?.strip_prefix("mod ")?;
            decl.strip_suffix(';').map(|name| name.trim().to_owned())
        })
        .collect()
}

/// The bodies of inline test-only modules (`#[cfg(test)] mod name { .. }`), found by
/// matching braces outside strings, characters and comments.
fn cfg_test_modules(text: &str) -> Vec<String> {
    after_cfg_test(text)
        .into_iter()
        .filter(|item| !item.lines().next().unwrap_or("").trim_end().ends_with(';'))
        .map(|item| {
            let b = item.as_bytes();
            let mut depth = 0usize;
            let mut i = 0;
            while i < b.len() {
                match b[i] {
                    b'/' if b.get(i + 1) == Some(&b'/') => {
                        while i < b.len() && b[i] != b'\n' {
                            i += 1;
                        }
                    }
                    b'"' => {
                        i += 1;
                        while i < b.len() && b[i] != b'"' {
                            i += if b[i] == b'\\' { 2 } else { 1 };
                        }
                    }
                    b'\'' if b.get(i + 2) == Some(&b'\'') => i += 2,
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            return item[..=i].to_owned();
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            item.to_owned()
        })
        .collect()
}

/// `text` without `//` comments (doc comments included): a code named in prose is not
/// a code asserted. Strings are kept.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| {
            let mut in_string = false;
            let b = line.as_bytes();
            let mut i = 0;
            while i < b.len() {
                match b[i] {
                    b'\\' if in_string => i += 1,
                    b'"' => in_string = !in_string,
                    b'/' if !in_string && b.get(i + 1) == Some(&b'/') => return &line[..i],
                    _ => {}
                }
                i += 1;
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `text` names `path` as a whole identifier (`ErrorCode::INVALID` is not in
/// `ErrorCode::INVALID_THING`).
fn mentions(text: &str, path: &str) -> bool {
    text.match_indices(path).any(|(at, _)| {
        let next = text[at + path.len()..].chars().next();
        !next.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}
