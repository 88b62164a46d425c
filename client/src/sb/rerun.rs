//! Commands sb prints for the user to run next (a send's retry, an upload's
//! continuation), written as they are to be pasted into a shell: this run's home and
//! broker flags first, so the command reaches the same broker as the same device (and
//! finds this home's saved uploads), then each word shell-quoted, or a placeholder
//! where it would not print as it is, named with what it stands for.

use std::ffi::OsStr;

use super::{BrokerFlags, is_terminal_unsafe};

/// A command to print and the placeholders in it (`("TEXT", "the same text")`).
#[derive(Clone, Debug)]
pub struct Rerun {
    command: String,
    placeholders: Vec<(&'static str, &'static str)>,
}

impl Rerun {
    /// `[SWITCHBOARD_HOME=HOME] sb [--server S] [--ca CA] [--pin PIN]`: `home` (the
    /// variable's value, when set) made absolute, so the command works from any
    /// directory, and the broker flags as this run was given them (`--ca` made absolute).
    pub fn sb(home: Option<&OsStr>, flags: &BrokerFlags) -> Rerun {
        let mut rerun = Rerun { command: String::new(), placeholders: Vec::new() };
        if let Some(home) = home {
            let home = std::path::absolute(home).unwrap_or_else(|_| home.into());
            rerun.command.push_str("SWITCHBOARD_HOME=");
            rerun.push(home.to_str(), "HOME_DIR", "this run's SWITCHBOARD_HOME");
            rerun.command.push(' ');
        }
        rerun.command.push_str("sb");
        if let Some(server) = &flags.server {
            rerun = rerun.then("--server").word(server, "SERVER", "the --server given");
        }
        if let Some(ca) = flags.ca_path() {
            rerun = rerun.then("--ca").os_word(ca.as_os_str(), "CA_FILE", "the --ca given");
        }
        if let Some(pin) = &flags.pin {
            rerun = rerun.then("--pin").word(pin, "PIN", "the --pin given");
        }
        rerun
    }

    /// With `words` as they are: sb's own (a subcommand, a flag, hex), never a user's.
    pub fn then(mut self, words: &str) -> Rerun {
        self.command.push(' ');
        self.command.push_str(words);
        self
    }

    /// With `word`, shell-quoted, or `placeholder` (standing for `meaning`) if it
    /// would not print as it is.
    pub fn word(mut self, word: &str, placeholder: &'static str, meaning: &'static str) -> Rerun {
        self.command.push(' ');
        self.push(Some(word), placeholder, meaning);
        self
    }

    /// `word` for a path or an environment value: a placeholder if it is not UTF-8 (a
    /// lossy rendering would name another file).
    pub fn os_word(mut self, word: &OsStr, placeholder: &'static str, meaning: &'static str) -> Rerun {
        self.command.push(' ');
        self.push(word.to_str(), placeholder, meaning);
        self
    }

    /// With `placeholder` for the user to fill in (standing for `meaning`).
    pub fn blank(mut self, placeholder: &'static str, meaning: &'static str) -> Rerun {
        self.command.push(' ');
        self.push(None, placeholder, meaning);
        self
    }

    fn push(&mut self, word: Option<&str>, placeholder: &'static str, meaning: &'static str) {
        match word.filter(|w| !w.chars().any(|c| c == '\\' || is_terminal_unsafe(c))) {
            Some(word) => self.command.push_str(&shell_quote(word)),
            None => {
                self.command.push_str(placeholder);
                if !self.placeholders.iter().any(|(p, _)| *p == placeholder) {
                    self.placeholders.push((placeholder, meaning));
                }
            }
        }
    }
}

impl std::fmt::Display for Rerun {
    /// The command in backquotes, then what its placeholders stand for, if any:
    /// "`sb send -- CONV TEXT` (CONV: the same conversation; TEXT: the same text)".
    /// Prints as it is (`terminal_safe` leaves it alone).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`", self.command)?;
        if !self.placeholders.is_empty() {
            let named: Vec<String> = self.placeholders.iter().map(|(p, meaning)| format!("{p}: {meaning}")).collect();
            write!(f, " ({})", named.join("; "))?;
        }
        Ok(())
    }
}

/// `s` as one POSIX shell word: unchanged if every character is plainly safe, else in
/// single quotes (a `'` inside as `'"'"'`: no backslash, which `terminal_safe` doubles).
fn shell_quote(s: &str) -> String {
    // Not `=`: zsh expands a word starting with it (`=ls`).
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:@%+,".contains(c);
    if !s.is_empty() && s.chars().all(safe) { s.to_owned() } else { format!("'{}'", s.replace('\'', r#"'"'"'"#)) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    fn flags(server: Option<&str>, ca: Option<&OsStr>) -> BrokerFlags {
        BrokerFlags { server: server.map(str::to_owned), ca: ca.map(Into::into), pin: None }
    }

    #[test]
    fn shell_quote_gives_back_the_same_word_through_a_shell() {
        assert_eq!(shell_quote("plain-1.0"), "plain-1.0");
        for word in ["", "it's", "$HOME `id` \"x\" ; | & *", "a'b'c", "ünïcode ✓", "=ls", "!!"] {
            let quoted = shell_quote(word);
            assert!(!quoted.contains('\\'), "{quoted}");
            for shell in ["sh", "bash"] {
                let out =
                    std::process::Command::new(shell).args(["-c", &format!("printf %s {quoted}")]).output().unwrap();
                assert_eq!(String::from_utf8(out.stdout).unwrap(), word, "{shell}: {quoted}");
            }
        }
    }

    #[test]
    fn a_rerun_prints_as_it_runs_or_names_what_to_fill_in() {
        let id = "ab".repeat(16);
        let send = |rerun: Rerun, conv: &str, text: &str| {
            rerun.then(&format!("send --client-id {id} --")).word(conv, "CONV", "the same conversation").word(
                text,
                "TEXT",
                "the same text",
            )
        };
        let plain = send(Rerun::sb(None, &flags(Some("h:1"), None)), "7", "-x y");
        assert_eq!(plain.to_string(), format!("`sb --server h:1 send --client-id {id} -- 7 '-x y'`"));
        // What `terminal_safe` would change is not printed as if it were the word, nor
        // is what is not UTF-8 (a home, a certificate's path).
        let odd = OsStr::from_bytes(b"/h/\xff");
        let home = Some(OsStr::new("/h/a b"));
        let shown = send(Rerun::sb(home, &flags(None, Some(odd))), "ti\u{1b}tle", "a\\b").to_string();
        assert!(shown.starts_with("`SWITCHBOARD_HOME='/h/a b' sb --ca CA_FILE send"), "{shown}");
        assert!(
            shown
                .ends_with("-- CONV TEXT` (CA_FILE: the --ca given; CONV: the same conversation; TEXT: the same text)")
        );
        assert_eq!(super::super::terminal_safe(&shown), shown);
        let shown = Rerun::sb(Some(odd), &flags(None, None)).then("upload").to_string();
        assert_eq!(shown, "`SWITCHBOARD_HOME=HOME_DIR sb upload` (HOME_DIR: this run's SWITCHBOARD_HOME)");
        // A relative home is made absolute: the command works from anywhere.
        let shown = Rerun::sb(Some(OsStr::new("rel")), &flags(None, None)).to_string();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(shown, format!("`SWITCHBOARD_HOME={} sb`", shell_quote(cwd.join("rel").to_str().unwrap())));
    }
}
