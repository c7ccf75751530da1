//! Approvals: a rule that says `approve = "each"` (or `"once-per-run"`) holds its request until
//! the user answers `broker approve` from another terminal, for a bounded time.
//!
//! Each broker (a `broker serve`, an embedded `broker run`) listens for `broker approve` on a
//! socket of its own, `$BROKER_HOME/run/approvals-<pid>.sock` (0600; the peer's uid is checked).
//! The agent must not answer for itself, so:
//! - a sandboxed agent cannot reach the socket: `$BROKER_HOME` is an empty directory in its
//!   sandbox;
//! - `broker approve` refuses to run inside a run (the run's variables, or an ancestor that is
//!   a `broker run` or the sandbox's init), like `--resolve`;
//! - the broker refuses an answer from a process that descends from the agent whose request it
//!   is (`SO_PEERCRED` and the kernel's process tree).
//!
//! An agent outside the sandbox (`--no-sandbox`, a bare preload) that drops the run's variables
//! and leaves the agent's process tree is not recognised (README, threat model).
//!
//! A desktop notification says a request waits, where one can be shown (`crate::notify`).
//!
//! The protocol is one line each way: `list`, `approve ID` or `deny ID`, answered by a JSON line.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;

use crate::home::Home;

/// Longest approval wait a policy may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The wait when a policy names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// From accept to a complete request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A request waiting for an answer, as `broker approve` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Waiting {
    /// `<broker pid>.<n>`: which broker holds it, and which request.
    pub id: String,
    pub run: String,
    pub command: String,
    pub method: String,
    pub host: String,
    pub path: String,
    /// The rule that asks for approval, with the file and table it is in.
    pub rule: String,
    /// Seconds it has waited, and may wait in all.
    pub waited: u64,
    pub timeout: u64,
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    Denied,
    TimedOut,
}

/// The requests waiting in one broker.
pub struct Approvals {
    pid: u32,
    next: AtomicU64,
    waiting: Mutex<Vec<Entry>>,
}

struct Entry {
    n: u64,
    view: Waiting,
    since: Instant,
    /// The agent of the request's run: an answer from its descendants is refused.
    agent: Option<u32>,
    answer: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// What the handler knows about the request it holds.
pub struct Ask {
    pub run: String,
    pub command: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub rule: String,
    pub agent: Option<u32>,
    pub timeout: Duration,
}

impl Approvals {
    pub fn new() -> Arc<Approvals> {
        Arc::new(Approvals {
            pid: std::process::id(),
            next: AtomicU64::new(1),
            waiting: Mutex::new(Vec::new()),
        })
    }

    /// Hold the request until it is approved, denied, or `ask.timeout` passes. A request whose
    /// agent hangs up is dropped from the list (this future is dropped with it).
    pub async fn ask(&self, ask: Ask) -> Outcome {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let timeout = ask.timeout.min(MAX_TIMEOUT);
        let view = Waiting {
            id: format!("{}.{n}", self.pid),
            run: ask.run,
            command: ask.command,
            method: ask.method,
            host: ask.host,
            path: ask.path,
            rule: ask.rule,
            waited: 0,
            timeout: timeout.as_secs(),
        };
        // Announced before it is listed: the notice starts on a thread of its own, so the
        // order makes no difference to the person, and the view needs no copy.
        crate::notify::approval_waiting(&view);
        self.lock().push(Entry {
            n,
            view,
            since: Instant::now(),
            agent: ask.agent,
            answer: Some(tx),
        });
        let _gone = Remove { approvals: self, n };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(true)) => Outcome::Granted,
            Ok(_) => Outcome::Denied,
            Err(_) => Outcome::TimedOut,
        }
    }

    pub fn list(&self) -> Vec<Waiting> {
        self.lock()
            .iter()
            .map(|e| Waiting {
                waited: e.since.elapsed().as_secs(),
                ..e.view.clone()
            })
            .collect()
    }

    /// Answer request `id` for the process `peer`.
    pub fn decide(&self, id: &str, approve: bool, peer: Option<u32>) -> Result<Waiting, String> {
        let mut waiting = self.lock();
        let entry = waiting
            .iter_mut()
            .find(|e| e.view.id == id)
            .ok_or_else(|| format!("no request {id} is waiting (see 'broker approve')"))?;
        if let (Some(agent), Some(peer)) = (entry.agent, peer) {
            if crate::procfs::descends_from(peer, agent) {
                return Err(format!(
                    "refused: process {peer} belongs to the agent whose request {id} is; an agent cannot answer for itself"
                ));
            }
        }
        let answer = entry
            .answer
            .take()
            .ok_or_else(|| format!("request {id} is already answered"))?;
        let _ = answer.send(approve);
        Ok(entry.view.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes an entry off the list when its wait ends, however it ends.
struct Remove<'a> {
    approvals: &'a Approvals,
    n: u64,
}

impl Drop for Remove<'_> {
    fn drop(&mut self) {
        self.approvals.lock().retain(|e| e.n != self.n);
    }
}

/// Where the broker of process `pid` listens for `broker approve`.
pub fn socket_path(home: &Home, pid: u32) -> PathBuf {
    home.daemon_dir().join(format!("approvals-{pid}.sock"))
}

/// The sockets of the brokers of `home` (some may be stale).
pub fn sockets(home: &Home) -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(home.daemon_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("approvals-")?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            Some((pid, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// A running approvals socket; dropping it stops serving and removes the socket.
pub struct Listener {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind this broker's socket and serve `broker approve` on it.
pub fn listen(home: &Home, approvals: Arc<Approvals>) -> std::io::Result<Listener> {
    use std::os::unix::fs::PermissionsExt as _;
    crate::home::ensure_private_dir(&home.daemon_dir())?;
    let path = socket_path(home, std::process::id());
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let task = tokio::spawn(serve(listener, approvals));
    Ok(Listener { path, task })
}

async fn serve(listener: UnixListener, approvals: Arc<Approvals>) {
    let ours = rustix::process::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let peer = match stream.peer_cred() {
            Ok(cred) if cred.uid() == ours => cred.pid().and_then(|p| u32::try_from(p).ok()),
            _ => continue,
        };
        let approvals = approvals.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = tokio::io::BufReader::new(read.take(256));
            let mut line = String::new();
            if !matches!(
                tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let reply = answer(&approvals, line.trim_end(), peer);
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let _ = write.write_all(&out).await;
        });
    }
}

/// What the socket answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Waiting { waiting: Vec<Waiting> },
    Answered { request: Waiting },
    Error { error: String },
}

fn answer(approvals: &Approvals, line: &str, peer: Option<u32>) -> Reply {
    let decided = |id: &str, approve| match approvals.decide(id, approve, peer) {
        Ok(request) => Reply::Answered { request },
        Err(error) => Reply::Error { error },
    };
    match line.split_once(' ') {
        None if line == "list" => Reply::Waiting {
            waiting: approvals.list(),
        },
        Some(("approve", id)) => decided(id, true),
        Some(("deny", id)) => decided(id, false),
        _ => Reply::Error {
            error: "expected 'list', 'approve ID' or 'deny ID'".into(),
        },
    }
}

/// Send one request line to the broker at `path` (blocking, for the CLI).
pub fn request(path: &Path, line: &str) -> std::io::Result<Reply> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    writeln!(stream, "{line}")?;
    let mut text = String::new();
    std::io::BufReader::new(stream).read_line(&mut text)?;
    serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(timeout: Duration) -> Ask {
        Ask {
            run: "run-1".into(),
            command: "curl".into(),
            method: "DELETE".into(),
            host: "api.openai.com".into(),
            path: "/v1/files/f".into(),
            rule: "DELETE /v1/files/*".into(),
            agent: None,
            timeout,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn approve_deny_and_time_out() {
        let approvals = Approvals::new();
        for (approve, want) in [(true, Outcome::Granted), (false, Outcome::Denied)] {
            let waiter = {
                let approvals = approvals.clone();
                tokio::spawn(async move { approvals.ask(ask(Duration::from_secs(30))).await })
            };
            let id = loop {
                if let Some(w) = approvals.list().first() {
                    break w.id.clone();
                }
                tokio::task::yield_now().await;
            };
            assert!(approvals.decide(&id, approve, None).is_ok());
            assert!(
                approvals.decide(&id, approve, None).is_err(),
                "answered once"
            );
            assert_eq!(waiter.await.expect("join"), want);
            assert!(approvals.list().is_empty());
        }
        assert_eq!(
            approvals.ask(ask(Duration::from_millis(10))).await,
            Outcome::TimedOut
        );
        assert!(approvals.list().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_agent_cannot_answer_for_itself() {
        let approvals = Approvals::new();
        let mut own = ask(Duration::from_secs(30));
        // This test process plays the agent: its own pid descends from itself.
        own.agent = Some(std::process::id());
        let waiter = {
            let approvals = approvals.clone();
            tokio::spawn(async move { approvals.ask(own).await })
        };
        let id = loop {
            if let Some(w) = approvals.list().first() {
                break w.id.clone();
            }
            tokio::task::yield_now().await;
        };
        let refused = approvals.decide(&id, true, Some(std::process::id()));
        assert!(refused.is_err_and(|e| e.contains("cannot answer for itself")));
        assert!(approvals.decide(&id, false, Some(1)).is_ok());
        assert_eq!(waiter.await.expect("join"), Outcome::Denied);
    }
}
