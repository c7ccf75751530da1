//! Credentials sourced from a command (`broker add <provider> --from-command '...'`), like git
//! credential helpers and AWS `credential_process`: the vault keeps the command (sealed), the
//! broker runs it with `sh -c` when the key is needed, caches the output for a TTL, and runs it
//! again when the TTL is over or the upstream rejected the cached key.
//!
//! The output is the key: standard output, surrounding whitespace trimmed. It is never logged.
//! A failing command's message (what the agent and the user see) carries its exit status and a
//! generic reason only, nothing the command printed: its stderr may quote the key or the
//! command (a secret too: it may hold a token). The stderr goes to the broker's log, after
//! every form of the command, of each of its longer words and of what it printed on stdout
//! is overwritten ([`crate::proxy::redact_text`]).

use std::collections::HashMap;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// How long a command's output is used before it runs again, unless `--ttl` says otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// A secrets manager that has not answered by then (a locked 1Password, an expired SSO) is
/// reported as failed instead of hanging every request.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// More than any key or token; a command printing more is not printing a key.
const MAX_OUTPUT: u64 = 16 * 1024;

/// The metadata stored with the command.
pub fn metadata(ttl: Duration) -> String {
    serde_json::json!({ "ttl_secs": ttl.as_secs() }).to_string()
}

/// The TTL in stored metadata (the default when absent).
pub fn ttl_from(metadata: &str) -> Duration {
    serde_json::from_str::<serde_json::Value>(metadata)
        .ok()
        .and_then(|v| v["ttl_secs"].as_u64())
        .map_or(DEFAULT_TTL, Duration::from_secs)
}

/// Words of a command at least this long are redacted from its stderr on their own (a token
/// passed as an argument); shorter ones are ordinary words.
const MIN_REDACTED_WORD: usize = 12;

/// A credential command that gave no key.
#[derive(Debug)]
pub struct CommandFailure {
    /// Exit status and a generic reason, with nothing the command printed: safe to show.
    pub message: String,
    /// The first lines of its stderr, redacted; empty if it printed none.
    pub stderr: String,
}

impl std::fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl CommandFailure {
    fn plain(message: impl Into<String>) -> CommandFailure {
        CommandFailure {
            message: message.into(),
            stderr: String::new(),
        }
    }

    /// Put the redacted stderr in the broker's log.
    pub fn log(&self, provider: &str, profile: &str) {
        if !self.stderr.is_empty() {
            tracing::warn!(provider, profile, stderr = %self.stderr, "{} (its stderr, redacted)", self.message);
        }
    }
}

/// `stderr` with every form of `command`, of its words of [`MIN_REDACTED_WORD`] bytes or more,
/// and of `stdout` overwritten; at most 5 lines of 200 characters.
fn redacted_stderr(stderr: &[u8], command: &str, stdout: &[u8]) -> String {
    let mut secrets: Vec<&[u8]> = vec![command.as_bytes(), command.trim().as_bytes()];
    secrets.extend(
        command
            .split(|c: char| {
                c.is_whitespace() || matches!(c, '\'' | '"' | ';' | '|' | '&' | '=' | '(' | ')')
            })
            .filter(|w| w.len() >= MIN_REDACTED_WORD)
            .map(str::as_bytes),
    );
    let out = String::from_utf8_lossy(stdout);
    secrets.push(stdout);
    secrets.push(out.trim().as_bytes());
    let text = crate::proxy::redact_text(stderr, &secrets);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(5)
        .map(|l| l.trim().chars().take(200).collect::<String>())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Run `command` and return what it printed, trimmed.
pub fn run(command: &str) -> Result<Zeroizing<String>, CommandFailure> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CommandFailure::plain(format!("cannot start the credential command: {e}")))?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandFailure::plain(format!(
                    "the credential command did not finish within {}s",
                    RUN_TIMEOUT.as_secs()
                )));
            }
        }
    };
    let mut out = Zeroizing::new(Vec::new());
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_OUTPUT + 1).read_to_end(&mut out);
    }
    if !status.success() {
        let mut err = Zeroizing::new(Vec::new());
        if let Some(stderr) = child.stderr.take() {
            let _ = stderr.take(4096).read_to_end(&mut err);
        }
        let code = status
            .code()
            .map_or_else(|| "killed by a signal".to_string(), |c| format!("exit {c}"));
        let stderr = redacted_stderr(&err, command, &out);
        let message = if stderr.is_empty() {
            format!("the credential command failed ({code})")
        } else {
            format!(
                "the credential command failed ({code}); its error output is in the broker's log"
            )
        };
        return Err(CommandFailure { message, stderr });
    }
    if out.len() as u64 > MAX_OUTPUT {
        return Err(CommandFailure::plain(
            "the credential command printed more than 16 KiB: that is not a key",
        ));
    }
    let text = std::str::from_utf8(&out)
        .map_err(|_| CommandFailure::plain("the credential command printed non-UTF-8 output"))?;
    let key = text.trim();
    if key.is_empty() {
        return Err(CommandFailure::plain(
            "the credential command printed nothing",
        ));
    }
    Ok(Zeroizing::new(key.to_string()))
}

/// A command's output and when it ran, per (provider, profile).
type Entries = HashMap<(String, String), (Instant, Zeroizing<String>)>;

/// Outputs of credential commands, per provider and profile, until their TTL runs out.
#[derive(Default)]
pub struct CommandCache {
    entries: Mutex<Entries>,
}

impl CommandCache {
    /// The cached key, or the command's fresh output (cached for `ttl`). A failure's redacted
    /// stderr is logged; the message returned carries none of it.
    pub fn get_or_run(
        &self,
        provider: &str,
        profile: &str,
        command: &str,
        ttl: Duration,
    ) -> Result<Zeroizing<String>, String> {
        let key = (provider.to_string(), profile.to_string());
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = entries.get(&key) {
            if at.elapsed() < ttl {
                return Ok(value.clone());
            }
        }
        // Holding the lock while the command runs: concurrent requests wait for one run
        // instead of each starting the secrets manager.
        let value = run(command).map_err(|failure| {
            failure.log(provider, profile);
            failure.message
        })?;
        entries.insert(key, (Instant::now(), value.clone()));
        Ok(value)
    }

    /// Forget the cached key (the upstream rejected it).
    pub fn forget(&self, provider: &str, profile: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.remove(&(provider.to_string(), profile.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_trimmed_and_failures_are_clear() {
        assert_eq!(
            run("printf '  key-123\\n'").expect("runs").as_str(),
            "key-123"
        );
        let err = run("echo 'op: not signed in' >&2; exit 3").expect_err("fails");
        assert_eq!(
            err.message,
            "the credential command failed (exit 3); its error output is in the broker's log"
        );
        assert_eq!(err.stderr, "op: not signed in");
        let err = run("exit 4").expect_err("fails");
        assert_eq!(err.message, "the credential command failed (exit 4)");
        assert_eq!(err.stderr, "");
        assert_eq!(
            run("true").expect_err("empty").message,
            "the credential command printed nothing"
        );
    }

    #[test]
    fn a_failure_says_nothing_the_command_printed_and_logs_stderr_redacted() {
        let key = "sk-proj-cmdfail-0123456789abcdefABCDEF";
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
        // The key printed on stderr (as is and in base64) and on stdout, then a failure.
        let cmd = format!("printf '{key}'; echo 'denied for {key}' >&2; echo '{b64}' >&2; exit 1");
        let err = run(&cmd).expect_err("fails");
        assert_eq!(
            err.message,
            "the credential command failed (exit 1); its error output is in the broker's log"
        );
        assert!(
            err.stderr.contains("denied for"),
            "the rest of stderr is kept"
        );
        for text in [&err.message, &err.stderr, &format!("{err:?}")] {
            assert!(!text.contains(key), "the key leaked into a failure");
            assert!(
                !text.contains(&b64[..40]),
                "the key's base64 leaked into a failure"
            );
            assert!(!text.contains("0123456789abcdef"), "part of the key leaked");
        }
        // A key run as a command (a row whose kind was edited, before rows were authenticated):
        // the shell's "not found" quotes the command, which is the key.
        let err = run(key).expect_err("not a command");
        assert!(err
            .message
            .starts_with("the credential command failed (exit 127)"));
        assert!(!err.stderr.contains(key) && !err.message.contains(key));
        assert!(
            !err.stderr.is_empty(),
            "sh said something: {:?}",
            err.message
        );
        // A token passed as an argument is redacted on its own.
        let err = run("sh -c 'echo \"bad token $0\" >&2; exit 2' ghp_argtoken0123456789")
            .expect_err("fails");
        assert!(err.stderr.contains("bad token"), "{}", err.message);
        assert!(!err.stderr.contains("ghp_argtoken0123456789"));
    }

    #[test]
    fn cache_runs_once_per_ttl_and_forgets_on_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let counter = dir.path().join("n");
        let cmd = format!("echo x >> {0}; wc -l < {0}", counter.display());
        let cache = CommandCache::default();
        let ttl = Duration::from_secs(60);
        assert_eq!(
            cache.get_or_run("p", "d", &cmd, ttl).expect("run").as_str(),
            "1"
        );
        assert_eq!(
            cache
                .get_or_run("p", "d", &cmd, ttl)
                .expect("cached")
                .as_str(),
            "1"
        );
        cache.forget("p", "d");
        assert_eq!(
            cache
                .get_or_run("p", "d", &cmd, ttl)
                .expect("rerun")
                .as_str(),
            "2"
        );
        assert_eq!(
            cache
                .get_or_run("p", "d", &cmd, Duration::ZERO)
                .expect("expired")
                .as_str(),
            "3"
        );
    }

    #[test]
    fn ttl_round_trips_through_metadata() {
        assert_eq!(
            ttl_from(&metadata(Duration::from_secs(42))),
            Duration::from_secs(42)
        );
        assert_eq!(ttl_from("{}"), DEFAULT_TTL);
        assert_eq!(ttl_from("not json"), DEFAULT_TTL);
    }
}
