//! The shim's request to `broker serve` when an agent started with a bare
//! `LD_PRELOAD=libbroker.so` holds a real key in a managed environment variable (a shell that
//! sourced a `.env`).
//!
//! The shim sends the keys over the daemon's control socket and gets back the shim config of a
//! new run of its own: the keys are that run's credentials (never stored), so other agents of
//! the same user cannot use them. The run lasts as long as the connection, which the shim keeps
//! open and lets its children inherit.
//!
//! A plain line format rather than JSON so the shim needs no parser:
//!
//! ```text
//! broker-handover 1
//! key OPENAI_API_KEY sk-...
//! end
//! ```
//!
//! and the answer is one line: `ok <shim config path>` or `refused <why>`.

use std::fmt::Write as _;
use std::path::PathBuf;

/// First line of a handover request; the number is the format version.
pub const HANDOVER_MAGIC: &str = "broker-handover 1";
/// Last line of a handover request.
pub const HANDOVER_END: &str = "end";

/// Keys the shim found in the agent's environment: `(variable, value)`.
#[derive(Default, PartialEq, Eq)]
pub struct Handover {
    pub keys: Vec<(String, String)>,
}

// Never print the values.
impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vars: Vec<&str> = self.keys.iter().map(|(var, _)| var.as_str()).collect();
        f.debug_struct("Handover").field("vars", &vars).finish()
    }
}

/// Whether `value` can travel in a handover line: printable ASCII, no spaces. Real API keys
/// always can; anything else stays hidden but is not handed over.
pub fn value_fits(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Whether `var` is a plausible environment variable name.
fn name_fits(var: &str) -> bool {
    !var.is_empty() && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A malformed handover request. Never carries the text of the line (it may hold a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandoverError {
    pub line: usize,
    pub what: &'static str,
}

impl std::fmt::Display for HandoverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "handover request line {}: {}", self.line, self.what)
    }
}

impl std::error::Error for HandoverError {}

impl Handover {
    /// The request text. Keys whose name or value cannot be expressed are left out (the
    /// caller checks with [`value_fits`] first).
    pub fn render(&self) -> String {
        // Sized up front: a reallocation would leave a copy of the keys in freed memory
        // that the caller's zeroizing of the result cannot reach.
        let size = HANDOVER_MAGIC.len()
            + HANDOVER_END.len()
            + 2
            + self
                .keys
                .iter()
                .map(|(var, value)| "key ".len() + var.len() + value.len() + 2)
                .sum::<usize>();
        let mut out = String::with_capacity(size);
        let _ = writeln!(out, "{HANDOVER_MAGIC}");
        for (var, value) in &self.keys {
            if name_fits(var) && value_fits(value.as_bytes()) {
                let _ = writeln!(out, "key {var} {value}");
            }
        }
        let _ = writeln!(out, "{HANDOVER_END}");
        out
    }

    /// Parse a whole request (magic line to `end`).
    pub fn parse(text: &str) -> Result<Handover, HandoverError> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, first)) if first == HANDOVER_MAGIC => {}
            _ => {
                return Err(HandoverError {
                    line: 1,
                    what: "missing 'broker-handover 1' header",
                })
            }
        }
        let mut keys = Vec::new();
        for (i, line) in lines {
            let err = |what| HandoverError { line: i + 1, what };
            if line == HANDOVER_END {
                return Ok(Handover { keys });
            }
            let rest = line
                .strip_prefix("key ")
                .ok_or(err("expected 'key' or 'end'"))?;
            let (var, value) = rest.split_once(' ').ok_or(err("bad key line"))?;
            if !name_fits(var) || !value_fits(value.as_bytes()) {
                return Err(err("bad key line"));
            }
            keys.push((var.to_string(), value.to_string()));
        }
        Err(HandoverError {
            line: text.lines().count(),
            what: "missing 'end'",
        })
    }
}

/// The daemon's answer to a handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverReply {
    /// The run is open; its shim config is at this path.
    Ok(PathBuf),
    /// Why the daemon did not open a run (safe to show: never contains a key).
    Refused(String),
}

impl HandoverReply {
    /// One line, ending in a newline.
    pub fn render(&self) -> String {
        match self {
            HandoverReply::Ok(path) => format!("ok {}\n", path.display()),
            HandoverReply::Refused(why) => format!("refused {}\n", why.replace('\n', " ")),
        }
    }

    /// Parse the answer line; `None` when it is not one.
    pub fn parse(line: &str) -> Option<HandoverReply> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        if let Some(path) = line.strip_prefix("ok ") {
            return (!path.is_empty()).then(|| HandoverReply::Ok(PathBuf::from(path)));
        }
        line.strip_prefix("refused ")
            .map(|why| HandoverReply::Refused(why.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_skips_what_cannot_travel() {
        let request = Handover {
            keys: vec![
                ("OPENAI_API_KEY".into(), "sk-abc_123".into()),
                ("BAD VAR".into(), "x".into()),
                ("SPACED".into(), "a b".into()),
                ("ANTHROPIC_API_KEY".into(), "sk-ant-1".into()),
            ],
        };
        let text = request.render();
        assert_eq!(
            text,
            "broker-handover 1\nkey OPENAI_API_KEY sk-abc_123\nkey ANTHROPIC_API_KEY sk-ant-1\nend\n"
        );
        let parsed = Handover::parse(&text).expect("parses");
        assert_eq!(
            parsed.keys,
            vec![
                ("OPENAI_API_KEY".to_string(), "sk-abc_123".to_string()),
                ("ANTHROPIC_API_KEY".to_string(), "sk-ant-1".to_string()),
            ]
        );
    }

    #[test]
    fn render_never_reallocates() {
        let request = Handover {
            keys: vec![("OPENAI_API_KEY".into(), "sk-".repeat(300))],
        };
        let text = request.render();
        assert_eq!(text.len(), text.capacity(), "sized exactly, so never grown");
    }

    #[test]
    fn malformed_requests_name_the_line_not_the_key() {
        let err = Handover::parse("hello\n").expect_err("no header");
        assert_eq!(err.line, 1);
        let err = Handover::parse("broker-handover 1\nkey A sk-secret\n").expect_err("no end");
        assert_eq!(err.what, "missing 'end'");
        let err = Handover::parse("broker-handover 1\nkey A sk-secret extra\nend\n")
            .expect_err("extra field");
        assert_eq!(err.line, 2);
        assert!(!err.to_string().contains("sk-secret"));
        assert!(!format!(
            "{:?}",
            Handover::parse("broker-handover 1\nkey A sk-s\nend\n")
        )
        .contains("sk-s"));
    }

    #[test]
    fn reply_round_trips() {
        let ok = HandoverReply::Ok(PathBuf::from("/h/run/serve-run-2-7/shim.conf"));
        assert_eq!(HandoverReply::parse(&ok.render()), Some(ok));
        let refused = HandoverReply::Refused("too many runs\nreally".into());
        assert_eq!(
            HandoverReply::parse(&refused.render()),
            Some(HandoverReply::Refused("too many runs really".into()))
        );
        assert_eq!(HandoverReply::parse("ok \n"), None);
        assert_eq!(HandoverReply::parse("{\"result\":\"ok\"}\n"), None);
    }
}
