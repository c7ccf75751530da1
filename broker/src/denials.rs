//! Connections the shim refused under `--deny-unlisted`, moved into the audit log.
//!
//! The shim cannot talk to the broker from inside `connect` (it must not block), so it appends
//! one line per refusal (`<pid> <destination>`) to a file in the run's private directory; the
//! broker reads new lines every second and when the run ends. The lines come from the agent's
//! process, so they are audited as the agent reported them, and capped so a hostile agent
//! cannot flood the audit log through this file.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit::{AuditEvent, EventKind};
use crate::proxy::AuditSink;

/// How often new lines are picked up while the run lasts.
const POLL: Duration = Duration::from_secs(1);
/// At most this many denials are audited per run; the rest are counted in one last line.
const MAX_AUDITED: u64 = 1000;
/// Longest line read; a real one is a pid and an address.
const MAX_LINE: usize = 96;

/// The denial log of one run; dropping it audits what is left and stops watching.
pub struct DenialLog {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

struct Inner {
    path: PathBuf,
    run_id: String,
    command: String,
    audit: Arc<dyn AuditSink>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    offset: u64,
    audited: u64,
    dropped: u64,
}

impl DenialLog {
    /// Create the (empty, 0600) log at `path` and start watching it.
    pub fn start(
        path: &Path,
        run_id: &str,
        command: &str,
        audit: Arc<dyn AuditSink>,
    ) -> std::io::Result<DenialLog> {
        crate::home::write_private_file(path, b"")?;
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            run_id: run_id.to_string(),
            command: command.to_string(),
            audit,
            state: Mutex::new(State::default()),
        });
        let watcher = inner.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            loop {
                tick.tick().await;
                let inner = watcher.clone();
                let _ = tokio::task::spawn_blocking(move || inner.drain()).await;
            }
        });
        Ok(DenialLog { inner, task })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

impl Drop for DenialLog {
    fn drop(&mut self) {
        self.task.abort();
        self.inner.drain();
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.dropped > 0 {
            self.inner.audit.record(AuditEvent {
                run_id: Some(self.inner.run_id.clone()),
                reason: Some(format!(
                    "{} more refused connections were not audited one by one",
                    state.dropped
                )),
                ..AuditEvent::new(EventKind::Denial)
            });
        }
    }
}

impl Inner {
    /// Audit the complete lines added since the last call.
    fn drain(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // The file sits in the run's directory, which a sandboxed agent can write: a symlink
        // put in its place must not make the broker read a file the agent cannot (the vault).
        use std::os::unix::fs::OpenOptionsExt as _;
        let Ok(mut file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
        else {
            return;
        };
        if file.seek(SeekFrom::Start(state.offset)).is_err() {
            return;
        }
        let mut text = Vec::new();
        if file.take(1 << 20).read_to_end(&mut text).is_err() {
            return;
        }
        let Some(end) = text.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        state.offset += end as u64 + 1;
        for line in text[..end].split(|b| *b == b'\n') {
            let Some((pid, dest)) = parse(line) else {
                continue;
            };
            if state.audited >= MAX_AUDITED {
                state.dropped += 1;
                continue;
            }
            state.audited += 1;
            self.audit.record(AuditEvent {
                run_id: Some(self.run_id.clone()),
                pid: Some(pid),
                command: Some(self.command.clone()),
                host: Some(dest),
                reason: Some(
                    "refused by libbroker.so: not one of the run's providers (--deny-unlisted)"
                        .into(),
                ),
                ..AuditEvent::new(EventKind::Denial)
            });
        }
    }
}

/// `<pid> <destination>`, the destination limited to address characters.
fn parse(line: &[u8]) -> Option<(u32, String)> {
    if line.len() > MAX_LINE {
        return None;
    }
    let text = std::str::from_utf8(line).ok()?;
    let (pid, dest) = text.split_once(' ')?;
    let ok = |c: char| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']' | '%' | '?');
    (!dest.is_empty() && dest.chars().all(ok))
        .then(|| (pid.parse().ok(), dest.to_string()))
        .and_then(|(p, d)| Some((p?, d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<AuditEvent>>);
    impl AuditSink for Collect {
        fn record(&self, event: AuditEvent) {
            self.0.lock().expect("lock").push(event);
        }
    }

    /// The agent can write the run's directory: a symlink in the log's place (to a file the
    /// sandbox hides from it) is not followed.
    #[test]
    fn a_symlink_in_place_of_the_log_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("denials.log");
        let elsewhere = dir.path().join("hidden-from-the-agent");
        std::fs::write(&elsewhere, "4242 192.0.2.10:443\n").expect("write");
        let sink = Arc::new(Collect::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let _guard = rt.enter();
        let log = DenialLog::start(&path, "run-1", "curl x", sink.clone()).expect("start");
        std::fs::remove_file(&path).expect("remove");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        log.inner.drain();
        assert!(
            sink.0.lock().expect("lock").is_empty(),
            "the symlink was followed"
        );
    }

    #[test]
    fn lines_become_denials_once_and_junk_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("denials.log");
        let sink = Arc::new(Collect::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let _guard = rt.enter();
        let log = DenialLog::start(&path, "run-1", "curl x", sink.clone()).expect("start");
        std::fs::write(
            &path,
            "4242 192.0.2.10:443\nnot a line\n77 [2001:db8::1]:80\n99 partial",
        )
        .expect("write");
        log.inner.drain();
        log.inner.drain();
        let events = sink.0.lock().expect("lock").clone();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].pid, Some(4242));
        assert_eq!(events[0].host.as_deref(), Some("192.0.2.10:443"));
        assert_eq!(events[1].host.as_deref(), Some("[2001:db8::1]:80"));
        assert!(parse(b"1 evil\"json").is_none());
    }
}
