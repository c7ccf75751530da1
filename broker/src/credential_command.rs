//! Credentials sourced from a command (`broker add <provider> --from-command '...'`), like git
//! credential helpers and AWS `credential_process`: the vault keeps the command (sealed), the
//! broker runs it with `sh -c` when the key is needed, caches the output for a TTL, and runs it
//! again when the TTL is over or the upstream rejected the cached key.
//!
//! The output is the key: standard output, surrounding whitespace trimmed. It is never logged;
//! a failing command's message carries its exit status and the first line of its stderr.

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

/// Run `command` and return what it printed, trimmed.
pub fn run(command: &str) -> Result<Zeroizing<String>, String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the credential command: {e}"))?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the credential command did not finish within {}s",
                    RUN_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let mut out = Zeroizing::new(Vec::new());
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_OUTPUT + 1).read_to_end(&mut out);
    }
    if !status.success() {
        let mut err = String::new();
        if let Some(stderr) = child.stderr.take() {
            let _ = stderr.take(4096).read_to_string(&mut err);
        }
        let first = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        let code = status
            .code()
            .map_or_else(|| "killed".to_string(), |c| format!("exit {c}"));
        return Err(if first.is_empty() {
            format!("the credential command failed ({code})")
        } else {
            format!(
                "the credential command failed ({code}): {}",
                first.chars().take(200).collect::<String>()
            )
        });
    }
    if out.len() as u64 > MAX_OUTPUT {
        return Err("the credential command printed more than 16 KiB: that is not a key".into());
    }
    let text = std::str::from_utf8(&out)
        .map_err(|_| "the credential command printed non-UTF-8 output".to_string())?;
    let key = text.trim();
    if key.is_empty() {
        return Err("the credential command printed nothing".into());
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
    /// The cached key, or the command's fresh output (cached for `ttl`).
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
        let value = run(command)?;
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
            err,
            "the credential command failed (exit 3): op: not signed in"
        );
        assert_eq!(
            run("true").expect_err("empty"),
            "the credential command printed nothing"
        );
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
