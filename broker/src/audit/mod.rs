//! The audit log: append-only JSONL at `$BROKER_HOME/audit.jsonl`, chained under a key.
//!
//! One line per event (format 2, "keyed"):
//! `{"seq":N,"time":"<RFC 3339 UTC>","event":"credential_use",...fields...,"prev":"<hex>","mac":"<hex>"}`
//! - `mac` is HMAC-SHA256, under a key derived from the vault's data key ([`AUDIT_KEY_LABEL`]),
//!   of this line's bytes up to, not including, `,"mac":...`, with the closing `}` appended;
//! - `prev` is the previous line's `mac` (64 zeros on the first line of a chain).
//!
//! Forging or re-chaining a line needs the data key, so the master key. What a MAC chain alone
//! cannot show, lines cut from its end or the file replaced by an older copy, the vault shows:
//! it keeps the **head** (`seq`, `mac` and offset of the last line written, see
//! [`crate::vault::AuditHead`]), updated after every write. The head is a lower bound: the log
//! is written and synced first, so after a crash the log may run past the head by lines that
//! carry valid MACs, but never stop short of it or differ from it. [`Audit::open`] (so
//! `broker serve` and `broker run` at start) and every append check the log from the head on;
//! [`verify`] checks all of it. The file is opened `O_NOFOLLOW` and must be a regular file, and
//! a broker that finds the path replaced under it stops writing (and using credentials) until
//! the path holds a log that matches the head again. The only way past a log that does not
//! match is [`reset`]: the old file is kept beside it and a new chain starts with a line that
//! records the reset.
//!
//! Format 1 (before the key): the same lines with `"hash"` instead of `"mac"`: the SHA-256 of
//! the line up to `,"hash":...` plus `}`, and `prev` the SHA-256 of the previous line's bytes.
//! A format-1 log is kept as it is: the first keyed line (`audit_keyed`) continues its `seq`
//! and has as `prev` the SHA-256 of its last line, so the MAC of that line pins every line
//! before it. No format-1 line may follow a keyed one.
//!
//! **No secret ever goes into this log.** The API takes no secret value: events carry names
//! (provider, profile, host), request facts (method, path without its query, status, sizes) and
//! reasons. Callers pass the path as the agent sent it (with the placeholder, before the swap);
//! [`Audit::append`] still drops any query string or fragment.
//!
//! Appends are safe across threads (a mutex) and processes: the file is opened `O_APPEND`, and
//! an exclusive `flock` is held while the end is checked, the lines written and the head moved.

use std::fmt;
use std::fs;
use std::io::{self, BufRead as _, Read as _, Seek as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::hmac;
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod cost;
mod line;

use crate::hex;
use crate::home::Home;
use crate::vault::{AuditHead, AuditHeadStore, Vault, VaultError};

/// The label under which the audit chain's key is derived from the data key.
pub const AUDIT_KEY_LABEL: &str = "broker audit v2";
/// What to do when the log does not match the vault's head.
pub const RECOVERY: &str =
    "run `broker audit verify` to see where, then `broker audit reset --yes` \
     to start a new chain (the old log is kept beside it, and the reset is audited)";
/// Why a log is refused that is empty while the vault has credentials and no head.
const LOST_WITH_HEAD: &str =
    "it is empty or missing, the vault holds credentials, and the vault's \
     head is gone too: the log was deleted together with the head (or before the broker kept one)";
/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest value kept for a free-text field (longer ones are cut, marked with `…`).
const MAX_FIELD_LEN: usize = 512;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A request went out with a real credential swapped in.
    CredentialUse,
    Login,
    Refresh,
    Logout,
    /// A request or connection refused by policy (`--deny-unlisted`, no credential, ...).
    Denial,
    /// A placeholder was sent to a host its credential does not belong to (not swapped).
    PlaceholderToForeignHost,
    /// The TLS SNI is not a host the run manages (on its fake address or `[::1]`), or not the
    /// CONNECT target; or the `Host` header is not the SNI.
    SniHostMismatch,
    CredentialAdded,
    CredentialRemoved,
    /// `broker rekey`: the vault's master key was moved or replaced.
    VaultRekeyed,
    /// `broker providers trust` (or `broker add`/`login`): a provider definition's hosts were
    /// accepted for its credentials.
    ProviderTrusted,
    /// Events the broker could not keep while its audit log could not be written (a count).
    EventsLost,
    /// The first keyed (format 2) line after a format-1 log: it anchors the old chain.
    AuditKeyed,
    /// `broker audit reset`: the first line of a new chain, with what happened to the old one.
    AuditReset,
    /// A connection to a run's listener without that run's ticket (another run's process, or
    /// one outside any run): refused before anything of it was read. Never holds the ticket.
    TicketRefused,
    /// Connections refused because their run (or the broker) held as many as it may: one
    /// line per burst of refusals, not one per connection.
    ConnectionLimit,
    /// A request refused by the run's method/path rules or `require_placeholder` (one line
    /// per burst of refusals).
    PolicyDenied,
    /// Under `--policy-mode audit`: a request the policy would have refused, let through.
    PolicyWouldDeny,
    /// A request over a budget of the run's policy (requests a minute, in all, body size).
    BudgetExceeded,
    /// A request to a managed host carrying, where the key goes, a real-looking key instead of
    /// the placeholder: refused. The value itself is never recorded.
    RealKeyFromAgent,
    /// The broker refused to connect a provider host resolving to a loopback, private,
    /// link-local or metadata address (the SSRF guard).
    UpstreamAddressRefused,
    /// The upstream proxy (`upstream_proxy`, `HTTPS_PROXY`) could not be reached, or refused
    /// the broker's credentials or CONNECT: nothing was sent.
    UpstreamProxyFailed,
    /// A request whose rule asks for approval was approved (`broker approve`).
    ApprovalGranted,
    /// A request whose rule asks for approval was denied, or not answered in time.
    ApprovalRefused,
    /// A system broker refused a uid not on its access list (or not the uid that opened the
    /// run it reached): one line per uid per burst, with the count of the others.
    UidRefused,
    /// A system broker's admin request (add, remove) was refused: not an admin uid.
    AdminRefused,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::CredentialUse => "credential_use",
            EventKind::Login => "login",
            EventKind::Refresh => "refresh",
            EventKind::Logout => "logout",
            EventKind::Denial => "denial",
            EventKind::PlaceholderToForeignHost => "placeholder_to_foreign_host",
            EventKind::SniHostMismatch => "sni_host_mismatch",
            EventKind::CredentialAdded => "credential_added",
            EventKind::CredentialRemoved => "credential_removed",
            EventKind::VaultRekeyed => "vault_rekeyed",
            EventKind::ProviderTrusted => "provider_trusted",
            EventKind::EventsLost => "events_lost",
            EventKind::AuditKeyed => "audit_keyed",
            EventKind::AuditReset => "audit_reset",
            EventKind::TicketRefused => "ticket_refused",
            EventKind::ConnectionLimit => "connection_limit",
            EventKind::PolicyDenied => "policy_denied",
            EventKind::PolicyWouldDeny => "policy_would_deny",
            EventKind::BudgetExceeded => "budget_exceeded",
            EventKind::RealKeyFromAgent => "real_key_from_agent",
            EventKind::UpstreamAddressRefused => "upstream_address_refused",
            EventKind::UpstreamProxyFailed => "upstream_proxy_failed",
            EventKind::ApprovalGranted => "approval_granted",
            EventKind::ApprovalRefused => "approval_refused",
            EventKind::UidRefused => "uid_refused",
            EventKind::AdminRefused => "admin_refused",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One event. Fill the fields that apply and leave the others `None`:
///
/// ```
/// # use broker_cli::audit::{AuditEvent, EventKind};
/// let ev = AuditEvent {
///     provider: Some("openai".into()),
///     host: Some("api.openai.com".into()),
///     status: Some(200),
///     ..AuditEvent::new(EventKind::CredentialUse)
/// };
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub event: EventKind,
    /// The `broker run` (or daemon client) the event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Process id of the agent process, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The agent's command (program name and arguments as launched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The client's uid, as the kernel reported it (a system broker, which several users share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The destination host (the managed hostname, or the foreign host for a denial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// SNI the client sent, for `sni_host_mismatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Request path **without** query string (it is dropped on append anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP status returned to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Response body bytes sent to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Why (denials, mismatches, failed refreshes): a fixed phrase, never request data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AuditEvent {
    pub fn new(event: EventKind) -> AuditEvent {
        AuditEvent {
            event,
            run_id: None,
            pid: None,
            command: None,
            uid: None,
            provider: None,
            profile: None,
            host: None,
            sni: None,
            method: None,
            path: None,
            status: None,
            bytes: None,
            latency_ms: None,
            reason: None,
        }
    }

    /// Cut long fields and drop a query string or fragment from `path`: the event as its line
    /// says it (`line` writes any event so).
    fn sanitized(mut self) -> AuditEvent {
        if let Some(path) = &mut self.path {
            path.truncate(line::without_query(path).len());
        }
        for field in [
            &mut self.run_id,
            &mut self.command,
            &mut self.provider,
            &mut self.profile,
            &mut self.host,
            &mut self.sni,
            &mut self.method,
            &mut self.path,
            &mut self.reason,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(i) = line::cut_at(field) {
                field.truncate(i);
                field.push('…');
            }
        }
        self
    }
}

/// An event as its audit line says it, borrowed: what the line's JSON is written from. An
/// [`AuditEvent`] gives one; so does the proxy's event of a request, from what the request
/// holds, so that the audit writer makes no strings for a request's line. Strings are given
/// as they are: the line drops the path's query and cuts long values.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub event: EventKind,
    pub run_id: Option<&'a str>,
    pub pid: Option<u32>,
    pub command: Option<&'a str>,
    pub uid: Option<u32>,
    pub provider: Option<&'a str>,
    pub profile: Option<&'a str>,
    pub host: Option<&'a str>,
    pub sni: Option<&'a str>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub status: Option<u16>,
    pub bytes: Option<u64>,
    pub latency_ms: Option<u64>,
    pub reason: Option<&'a str>,
}

impl EventView<'_> {
    /// The event, owning its strings (as given: not sanitized).
    pub fn to_event(&self) -> AuditEvent {
        let owned = |s: Option<&str>| s.map(str::to_owned);
        AuditEvent {
            event: self.event,
            run_id: owned(self.run_id),
            pid: self.pid,
            command: owned(self.command),
            uid: self.uid,
            provider: owned(self.provider),
            profile: owned(self.profile),
            host: owned(self.host),
            sni: owned(self.sni),
            method: owned(self.method),
            path: owned(self.path),
            status: self.status,
            bytes: self.bytes,
            latency_ms: self.latency_ms,
            reason: owned(self.reason),
        }
    }
}

/// What can be appended as an audit line.
pub trait LineEvent {
    fn view(&self) -> EventView<'_>;
}

impl LineEvent for AuditEvent {
    fn view(&self) -> EventView<'_> {
        EventView {
            event: self.event,
            run_id: self.run_id.as_deref(),
            pid: self.pid,
            command: self.command.as_deref(),
            uid: self.uid,
            provider: self.provider.as_deref(),
            profile: self.profile.as_deref(),
            host: self.host.as_deref(),
            sni: self.sni.as_deref(),
            method: self.method.as_deref(),
            path: self.path.as_deref(),
            status: self.status,
            bytes: self.bytes,
            latency_ms: self.latency_ms,
            reason: self.reason.as_deref(),
        }
    }
}

/// A line of the log as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// RFC 3339 UTC with milliseconds, e.g. `2025-01-31T12:00:00.123Z`.
    pub time: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    pub prev: String,
    /// Format 1 only: the line's SHA-256.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    /// Format 2: the line's HMAC-SHA256 under the audit key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
}

/// The audit log failed to open or append.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The log is not what the broker wrote: cut, replaced, a symlink, edited.
    #[error("the audit log {path} cannot be trusted: {reason}. No credential is used until this is resolved: {RECOVERY}")]
    Untrusted { path: PathBuf, reason: String },
    /// The vault's head could not be read or written.
    #[error("audit log {path}: {source}")]
    Head { path: PathBuf, source: VaultError },
}

/// Where and why the chain breaks. `line` is 1-based (0: the file could not be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at line {line}: {reason}")]
pub struct AuditBroken {
    pub line: usize,
    pub reason: String,
}

/// What [`verify`] found in an intact log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Lines in all.
    pub lines: usize,
    /// Format-1 (unkeyed) lines at its start, pinned by the first keyed line if there is one.
    pub unkeyed: usize,
    /// Keyed (format 2) lines.
    pub keyed: usize,
    /// The `seq` of the vault's head, which the log reaches.
    pub head: Option<u64>,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.lines == 1 { "" } else { "s" };
        write!(f, "{} line{plural}", self.lines)?;
        match (self.unkeyed, self.keyed) {
            (0, _) => write!(f, ", MAC chain intact")?,
            (u, 0) => write!(f, ", {u} unkeyed (format 1), hash chain intact; the keyed chain starts with the next line written")?,
            (u, k) => write!(f, ": {u} unkeyed (format 1) pinned by the first of {k} keyed lines, chain intact")?,
        }
        match self.head {
            Some(seq) => write!(f, "; reaches the vault's head (line {seq})"),
            None => Ok(()),
        }
    }
}

/// The audit log of one `BROKER_HOME`. `Send + Sync`: share one in an `Arc`.
pub struct Audit {
    path: PathBuf,
    key: hmac::Key,
    state: Mutex<State>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

struct State {
    file: fs::File,
    /// (device, inode) of `file`: the path must still name it when a batch is written.
    id: (u64, u64),
    head: AuditHeadStore,
    written: Option<Written>,
    /// Lines this process wrote with [`Settle::Later`] and has not yet synced and named in the
    /// head, and how long the file was after them.
    unsettled: Option<(AuditHead, u64)>,
}

/// Whether an append syncs its lines to the disk and moves the vault's head to the last of
/// them before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Now,
    /// Not yet: a later append with [`Settle::Now`] (with or without events) does it. The
    /// proxy's writer writes small batches often and settles them less often, since every head
    /// move is a write to `vault.db` and a sync a journal commit.
    Later,
}

/// What this process last appended: while the file still ends there (no other process wrote
/// since), the next line chains to it without reading the file back.
#[derive(Debug)]
struct Written {
    len: u64,
    seq: u64,
    mac: String,
}

impl Audit {
    /// Open the audit log of `home` (creating it 0600 if the vault has no head yet), keyed by
    /// `vault`, and check it against the vault's head: a log that was cut, replaced, deleted or
    /// made a symlink is [`AuditError::Untrusted`].
    pub fn open(home: &Home, vault: &Vault) -> Result<Audit, AuditError> {
        home.ensure().map_err(|source| AuditError::Io {
            path: home.root().to_owned(),
            source,
        })?;
        Audit::open_path(&home.audit_path(), vault)
    }

    /// [`Audit::open`] for the log at `path`.
    pub fn open_path(path: &Path, vault: &Vault) -> Result<Audit, AuditError> {
        let key = vault.derived_key(AUDIT_KEY_LABEL);
        let head = vault
            .audit_head_store()
            .map_err(|source| AuditError::Head {
                path: path.to_owned(),
                source,
            })?;
        let (file, id) = open_checked(path, &key, &head)?;
        Ok(Audit {
            path: path.to_owned(),
            key,
            state: Mutex::new(State {
                file,
                id,
                head,
                written: None,
                unsettled: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event, chained to the current last line. Blocking (file lock and a small
    /// write); async callers use `spawn_blocking`. Returns the stored record.
    pub fn append(&self, event: AuditEvent) -> Result<AuditRecord, AuditError> {
        let mut records = self.append_all(vec![event])?;
        records.pop().ok_or_else(|| AuditError::Io {
            path: self.path.clone(),
            source: io::Error::other("nothing appended"),
        })
    }

    /// Append several events, chained in order, under one file lock and with one write (the
    /// broker's audit writer drains its queue this way under load).
    pub fn append_all(&self, events: Vec<AuditEvent>) -> Result<Vec<AuditRecord>, AuditError> {
        self.try_append_all(events).map_err(|failed| failed.error)
    }

    /// [`Audit::append_all`], and when it fails, the events back, to be tried again. (A write
    /// cut short by a full disk leaves a torn last line, removed before the retry writes.)
    ///
    /// Under the file lock: the path must still name the open file (else the log at the path
    /// is opened and checked against the head, as at start); the end of the log is checked
    /// from the vault's head on, unless this process wrote last; the lines are written with
    /// one `write`, synced, and then the head is moved to the last of them.
    pub fn try_append_all(
        &self,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<AuditRecord>, AppendFailed> {
        let events = events.into_iter().map(AuditEvent::sanitized).collect();
        self.try_append(events, Settle::Now)
            .map(Appended::into_records)
    }

    /// [`Audit::try_append_all`] for any [`LineEvent`], settling now or later. With
    /// [`Settle::Now`] and no events, settles what an earlier [`Settle::Later`] left, if the
    /// log still ends with it (if another process appended since, its append moved the head
    /// past those lines, or will).
    pub fn try_append<E: LineEvent>(
        &self,
        events: Vec<E>,
        settle: Settle,
    ) -> Result<Appended<E>, AppendFailed<E>> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let (_lock, end) = match self.lock_end(state) {
            Ok(locked) => locked,
            Err(error) => return Err(AppendFailed { error, events }),
        };
        let io_err = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        if let Some(torn) = end.torn {
            // A line cut short (a crash, a full disk) is not part of the chain: drop it.
            tracing::warn!(path = %self.path.display(), offset = torn, "removing an incomplete last line from the audit log");
            if let Err(error) = state.file.set_len(torn) {
                return Err(AppendFailed {
                    error: io_err(error),
                    events,
                });
            }
        }
        let (len, mut seq) = (end.len, end.seq);
        // The lines are written together, so they carry the same time.
        let time = now_rfc3339();
        // About 560 bytes a line for a proxied request.
        let mut out: Vec<u8> = Vec::with_capacity(events.len().saturating_add(1) * 640);
        // Each line's `prev` is the MAC of the line before, as hex.
        let mut prev = Mac::from_hex(&end.prev);
        let mut last_start = len;
        if end.needs_anchor {
            // The anchor of a format-1 log: not one of the caller's events, never given back.
            let anchor = AuditEvent {
                reason: Some(
                    "the keyed chain (format 2) starts here; the lines before are format 1 (unkeyed), pinned by this line's prev".into(),
                ),
                ..AuditEvent::new(EventKind::AuditKeyed)
            };
            prev = encode_line_into(seq, &time, &anchor.view(), &prev, &self.key, &mut out);
            out.push(b'\n');
            seq += 1;
        }
        let first_seq = seq;
        let first_prev = prev;
        let mut macs = Vec::with_capacity(events.len());
        for event in &events {
            let line_start = out.len();
            prev = encode_line_into(seq, &time, &event.view(), &prev, &self.key, &mut out);
            last_start = len + line_start as u64;
            out.push(b'\n');
            macs.push(prev);
            seq += 1;
        }
        if out.is_empty() {
            if let (Settle::Now, Some((head, end))) = (settle, state.unsettled.take()) {
                if end == len {
                    settle_to(state, &head);
                }
            }
            // Nothing to write; where the chain ends is known now, so the next write need not
            // read it again.
            state.written = Some(Written {
                len,
                seq: seq - 1,
                mac: prev.as_str().to_owned(),
            });
            return Ok(Appended {
                events,
                first_seq,
                time,
                first_prev,
                macs,
            });
        }
        // One write(2) of all the lines: with O_APPEND they land at the end as a unit.
        if let Err(error) = (&state.file).write_all(&out) {
            return Err(AppendFailed {
                error: io_err(error),
                events,
            });
        }
        let head = AuditHead {
            seq: seq - 1,
            mac: prev.as_str().to_owned(),
            line_start: last_start,
        };
        let end = len + out.len() as u64;
        match settle {
            Settle::Now => {
                state.unsettled = None;
                settle_to(state, &head);
            }
            Settle::Later => state.unsettled = Some((head, end)),
        }
        state.written = Some(Written {
            len: end,
            seq: seq - 1,
            mac: prev.as_str().to_owned(),
        });
        Ok(Appended {
            events,
            first_seq,
            time,
            first_prev,
            macs,
        })
    }

    /// Lock the file the path names (reopening and checking it if it changed) and find the
    /// end of the chain.
    fn lock_end(&self, state: &mut State) -> Result<(FileLock, ChainEnd), AuditError> {
        let io_err = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        // Another process may have reset the log (renamed it away under its lock) between our
        // check and our lock: check again, under the lock, a few times.
        for _ in 0..3 {
            let current = match fs::symlink_metadata(&self.path) {
                Ok(meta) => Some((meta.dev(), meta.ino())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(e)),
            };
            if current != Some(state.id) {
                let (file, id) = open_checked(&self.path, &self.key, &state.head).map_err(
                    |error| match error {
                        AuditError::Untrusted { path, reason } => AuditError::Untrusted {
                            path,
                            reason: format!(
                                "it was removed or replaced while the broker ran ({reason})"
                            ),
                        },
                        other => other,
                    },
                )?;
                tracing::warn!(path = %self.path.display(), "the audit log was replaced by one that matches the vault's head (a reset): writing there");
                state.file = file;
                state.id = id;
                state.written = None;
                // Those lines are in the file that was replaced: the head must not name them.
                state.unsettled = None;
            }
            let lock = FileLock::exclusive(&state.file).map_err(io_err)?;
            let now = fs::symlink_metadata(&self.path)
                .ok()
                .map(|m| (m.dev(), m.ino()));
            if now != Some(state.id) {
                drop(lock);
                continue;
            }
            let len = state.file.metadata().map_err(io_err)?.len();
            let end = match state.written.take().filter(|w| w.len == len) {
                Some(ours) => ChainEnd {
                    len,
                    torn: None,
                    seq: ours.seq + 1,
                    prev: ours.mac,
                    needs_anchor: false,
                },
                None => {
                    let head = state.head.read().map_err(|source| AuditError::Head {
                        path: self.path.clone(),
                        source,
                    })?;
                    chain_end(&state.file, &self.path, &self.key, head.as_ref())?
                }
            };
            return Ok((lock, end));
        }
        Err(AuditError::Untrusted {
            path: self.path.clone(),
            reason: "it keeps being replaced while the broker writes to it".into(),
        })
    }
}

/// An append that did not happen, with the events it was given.
pub struct AppendFailed<E = AuditEvent> {
    pub error: AuditError,
    pub events: Vec<E>,
}

/// The lines an append wrote: its events, in order, with what chains them.
#[derive(Debug)]
pub struct Appended<E> {
    pub events: Vec<E>,
    first_seq: u64,
    time: String,
    /// The `prev` of the first event's line.
    first_prev: Mac,
    /// Each event's line's MAC.
    macs: Vec<Mac>,
}

impl Appended<AuditEvent> {
    /// The lines as records (the events were sanitized before they were written, so each
    /// record says what its line says).
    fn into_records(self) -> Vec<AuditRecord> {
        let prevs = std::iter::once(self.first_prev).chain(self.macs.iter().copied());
        self.events
            .into_iter()
            .zip(prevs.zip(&self.macs))
            .zip(self.first_seq..)
            .map(|((event, (prev, mac)), seq)| AuditRecord {
                seq,
                time: self.time.clone(),
                event,
                prev: prev.as_str().to_owned(),
                hash: String::new(),
                mac: mac.as_str().to_owned(),
            })
            .collect()
    }
}

/// A line's HMAC-SHA256 as lowercase hex, kept without an allocation: the audit writer makes
/// one per proxied request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mac([u8; 64]);

impl Mac {
    fn of(tag: &hmac::Tag) -> Mac {
        let mut hex = [b'0'; 64];
        hex::lower_into(tag.as_ref(), &mut hex);
        Mac(hex)
    }

    /// `text` as a `prev`: the chain's end as read back (64 hex digits, or a format-1 line's
    /// SHA-256, also 64). Anything else (never read back so: the walker checks lengths)
    /// is kept as far as it goes.
    fn from_hex(text: &str) -> Mac {
        debug_assert_eq!(text.len(), 64, "a prev of another length: {text:?}");
        let mut hex = [b'0'; 64];
        let n = text.len().min(64);
        hex[..n].copy_from_slice(&text.as_bytes()[..n]);
        Mac(hex)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn as_str(&self) -> &str {
        // Hex digits only, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Open the log at `path` for appending, `O_NOFOLLOW`, as a regular file, and check it against
/// the head under its lock. Created (0600) only while the vault has no head.
fn open_checked(
    path: &Path,
    key: &hmac::Key,
    head: &AuditHeadStore,
) -> Result<(fs::File, (u64, u64)), AuditError> {
    let head_err = |source| AuditError::Head {
        path: path.to_owned(),
        source,
    };
    let recorded = head.read().map_err(head_err)?;
    let file = match open_no_follow(path, false) {
        Err(AuditError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            if let Some(h) = recorded.as_ref().filter(|h| h.seq > 0) {
                return Err(AuditError::Untrusted {
                    path: path.to_owned(),
                    reason: format!(
                        "it is missing, but the vault's head says {} lines were written",
                        h.seq
                    ),
                });
            }
            open_no_follow(path, true)?
        }
        other => other?,
    };
    let meta = file.metadata().map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let lock = FileLock::exclusive(&file).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    // Read again under the lock: another process may have written since.
    let recorded = head.read().map_err(head_err)?;
    let end = chain_end(&file, path, key, recorded.as_ref())?;
    // No head at all is a vault made before the head existed. Its log is format 1, or there
    // is none: and a vault that holds credentials had a log (their adding was audited).
    if recorded.is_none() && end.seq == 1 && head.vault_has_credentials().map_err(head_err)? {
        return Err(AuditError::Untrusted {
            path: path.to_owned(),
            reason: LOST_WITH_HEAD.into(),
        });
    }
    drop(lock);
    Ok((file, (meta.dev(), meta.ino())))
}

/// Open `path` read + append without following a symlink; only a regular file will do.
fn open_no_follow(path: &Path, create: bool) -> Result<fs::File, AuditError> {
    let untrusted = |reason: &str| AuditError::Untrusted {
        path: path.to_owned(),
        reason: reason.into(),
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(create)
        .mode(0o600)
        // O_NONBLOCK: a FIFO put in its place must not hang the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => {
                untrusted("it is a symbolic link (the broker writes only to a regular file)")
            }
            _ => AuditError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(untrusted("it is not a regular file"));
    }
    Ok(file)
}

/// Append the line of `event` (`seq`, `time`, chained to `prev`) to `out`, without its
/// newline, with its MAC computed and placed last; return the MAC. Written straight into the
/// batch's buffer: the audit writer encodes one line per proxied request (see `line` for the
/// JSON itself).
fn encode_line_into(
    seq: u64,
    time: &str,
    event: &EventView<'_>,
    prev: &Mac,
    key: &hmac::Key,
    out: &mut Vec<u8>,
) -> Mac {
    let start = out.len();
    // The MAC covers the line up to `,"mac"` with the closing `}` appended; the `}` then moves
    // after the MAC.
    line::write_open_line(seq, time, event, prev.as_bytes(), out);
    out.push(b'}');
    let mac = Mac::of(&hmac::sign(key, &out[start..]));
    out.pop();
    out.extend_from_slice(b",\"mac\":\"");
    out.extend_from_slice(mac.as_bytes());
    out.extend_from_slice(b"\"}");
    mac
}

/// Check the whole log at `path`: format-1 lines by their hashes, keyed lines by their MACs
/// under `key`, `seq` counting up by one, and that it reaches `head` (the vault's). A missing
/// file is an empty log, unless there is a head. Without a key, keyed lines cannot be checked
/// and are reported as such.
pub fn verify(
    path: &Path,
    key: Option<&hmac::Key>,
    head: Option<&AuditHead>,
) -> Result<VerifyReport, AuditBroken> {
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return match head.filter(|h| h.seq > 0) {
                None => Ok(VerifyReport::default()),
                Some(h) => Err(AuditBroken {
                    line: 0,
                    reason: format!(
                        "{} is missing, but the vault's head says {} lines were written",
                        path.display(),
                        h.seq
                    ),
                }),
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(AuditBroken {
                line: 0,
                reason: format!(
                    "{} is a symbolic link, not the broker's log",
                    path.display()
                ),
            })
        }
        Err(e) => {
            return Err(AuditBroken {
                line: 0,
                reason: format!("{}: {e}", path.display()),
            })
        }
    };
    if !file.metadata().is_ok_and(|m| m.file_type().is_file()) {
        return Err(AuditBroken {
            line: 0,
            reason: format!("{} is not a regular file", path.display()),
        });
    }
    verify_reader(io::BufReader::new(file), key, head)
}

/// [`verify`] over the log's bytes from `reader` (the file, opened and checked by `verify`).
pub fn verify_reader(
    reader: impl io::BufRead,
    key: Option<&hmac::Key>,
    head: Option<&AuditHead>,
) -> Result<VerifyReport, AuditBroken> {
    // A head at seq 0 is a new vault's: no line needs to be there.
    let head = head.filter(|h| h.seq > 0);
    let mut walker = Walker::from_start(key, head.cloned());
    let end = walker.walk(reader)?;
    if end.torn.is_some() {
        return Err(AuditBroken {
            line: walker.line + 1,
            reason: "the last line is incomplete (a write was cut off; the next write removes it)"
                .into(),
        });
    }
    walker.finish()?;
    Ok(VerifyReport {
        lines: walker.line,
        unkeyed: walker.unkeyed,
        keyed: walker.keyed,
        head: head.map(|h| h.seq),
    })
}

/// [`verify`] with the key and head of `vault`.
pub fn verify_with(path: &Path, vault: &Vault) -> Result<VerifyReport, AuditBroken> {
    let vault_err = |e: VaultError| AuditBroken {
        line: 0,
        reason: e.to_string(),
    };
    let store = vault.audit_head_store().map_err(vault_err)?;
    let head = store.read().map_err(vault_err)?;
    let report = verify(
        path,
        Some(&vault.derived_key(AUDIT_KEY_LABEL)),
        head.as_ref(),
    )?;
    if head.is_none() && report.lines == 0 && store.vault_has_credentials().map_err(vault_err)? {
        return Err(AuditBroken {
            line: 0,
            reason: format!("{}: {LOST_WITH_HEAD}", path.display()),
        });
    }
    Ok(report)
}

/// Checks lines one after another.
struct Walker<'k> {
    key: Option<&'k hmac::Key>,
    /// Lines read so far (1-based number of the last one) when walking from the start.
    line: usize,
    /// Byte offset where the next line starts.
    offset: u64,
    /// `seq` the next line must have.
    next_seq: u64,
    /// What the next line's `prev` must be (`None`: the head's line, whose `prev` was checked
    /// when it was written).
    prev: Option<String>,
    /// The vault's head: the walk must meet it.
    head: Option<AuditHead>,
    head_met: bool,
    /// From the head on (`chain_end`): the first line must be the head's own.
    from_head: bool,
    unkeyed: usize,
    keyed: usize,
}

struct WalkEnd {
    /// Offset of an incomplete last line.
    torn: Option<u64>,
}

impl<'k> Walker<'k> {
    fn from_start(key: Option<&'k hmac::Key>, head: Option<AuditHead>) -> Walker<'k> {
        Walker {
            key,
            line: 0,
            offset: 0,
            next_seq: 1,
            prev: Some(GENESIS.to_string()),
            head,
            head_met: false,
            from_head: false,
            unkeyed: 0,
            keyed: 0,
        }
    }

    fn from_head(key: &'k hmac::Key, head: AuditHead) -> Walker<'k> {
        Walker {
            offset: head.line_start,
            next_seq: head.seq,
            prev: None,
            from_head: true,
            ..Walker::from_start(Some(key), Some(head))
        }
    }

    fn walk(&mut self, mut reader: impl io::BufRead) -> Result<WalkEnd, AuditBroken> {
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let read = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| self.broken(format!("read error: {e}")))?;
            if read == 0 {
                return Ok(WalkEnd { torn: None });
            }
            let Some(line) = buf.strip_suffix(b"\n") else {
                return Ok(WalkEnd {
                    torn: Some(self.offset),
                });
            };
            self.line += 1;
            self.step(line).map_err(|reason| AuditBroken {
                line: self.line_number(),
                reason,
            })?;
            self.offset += read as u64;
        }
    }

    /// The line being checked: its number from the start, or its `seq` when walking from the
    /// head (then they are the same in an intact log).
    fn line_number(&self) -> usize {
        match self.from_head {
            true => usize::try_from(self.next_seq).unwrap_or(usize::MAX),
            false => self.line,
        }
    }

    fn broken(&self, reason: String) -> AuditBroken {
        AuditBroken {
            line: self.line_number() + usize::from(!self.from_head),
            reason,
        }
    }

    fn step(&mut self, line: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
        let record: AuditRecord =
            serde_json::from_str(text).map_err(|e| format!("not a valid audit record: {e}"))?;
        let at_head = self.from_head && self.prev.is_none();
        if at_head {
            let head = self.head.as_ref().map(|h| (h.seq, h.mac.as_str()));
            if head != Some((record.seq, record.mac.as_str())) {
                return Err(format!(
                    "the line at byte {}, where the vault's head (line {}) starts, is another line: \
                     the log was replaced, or cut and written again",
                    self.offset, self.next_seq
                ));
            }
        }
        let this_link = if !record.mac.is_empty() {
            let key = self.key.ok_or(
                "a keyed (format 2) line, which only the vault's key can check: \
                 unlock the vault (BROKER_PASSPHRASE, the key file or the keyring)",
            )?;
            check_mac(text, &record.mac, key)?;
            self.keyed += 1;
            record.mac.clone()
        } else if !record.hash.is_empty() {
            if self.keyed > 0 {
                return Err(
                    "an unkeyed (format 1) line after the keyed chain began: it was not written by the broker"
                        .into(),
                );
            }
            check_hash(text, &record.hash)?;
            self.unkeyed += 1;
            hex::sha256(line)
        } else {
            return Err("the line has neither a mac nor a hash field".into());
        };
        if record.seq != self.next_seq {
            return Err(format!(
                "seq is {}, expected {} (a line was deleted, inserted or moved)",
                record.seq, self.next_seq
            ));
        }
        if let Some(prev) = &self.prev {
            if record.prev != *prev {
                return Err(
                    "prev does not match the previous line (a line before it was edited, deleted or moved)"
                        .into(),
                );
            }
        }
        if let Some(head) = &self.head {
            if record.seq == head.seq {
                if record.mac != head.mac {
                    return Err(format!(
                        "this is not the line the vault recorded as line {} (the log was replaced)",
                        head.seq
                    ));
                }
                self.head_met = true;
            }
        }
        self.prev = Some(if record.mac.is_empty() {
            this_link
        } else {
            record.mac
        });
        self.next_seq += 1;
        Ok(())
    }

    /// The log must have reached the vault's head.
    fn finish(&self) -> Result<(), AuditBroken> {
        match &self.head {
            Some(head) if !self.head_met => Err(AuditBroken {
                line: self.line_number() + 1,
                reason: format!(
                    "the log ends at line {}, but the vault's head says {} lines were written: \
                     lines were cut from its end, or it was replaced by an older copy",
                    self.next_seq - 1,
                    head.seq
                ),
            }),
            _ => Ok(()),
        }
    }
}

/// A format-2 line's MAC: over the line up to `,"mac":"`, with `}` appended.
fn check_mac(text: &str, mac: &str, key: &hmac::Key) -> Result<(), String> {
    let Some((body, tail)) = text.rsplit_once(",\"mac\":\"") else {
        return Err("no mac field at the end of the line".into());
    };
    let tag = from_hex(mac).filter(|t| t.len() == 32);
    let (true, Some(tag)) = (tail == format!("{mac}\"}}"), tag) else {
        return Err("the mac field is malformed".into());
    };
    hmac::verify(key, format!("{body}}}").as_bytes(), &tag).map_err(|_| {
        "the line's MAC does not match: it was edited, or written without the vault's key"
            .to_string()
    })
}

/// A format-1 line's own hash.
fn check_hash(text: &str, hash: &str) -> Result<(), String> {
    let Some((body, tail)) = text.rsplit_once(",\"hash\":\"") else {
        return Err("no hash field at the end of the line".into());
    };
    if tail != format!("{hash}\"}}") || hash.len() != 64 {
        return Err("the hash field is malformed".into());
    }
    if hex::sha256(format!("{body}}}").as_bytes()) != hash {
        return Err("the line's content does not match its hash (the line was edited)".into());
    }
    Ok(())
}

/// Read every record of the log at `path` that parses, in order, with its 1-based line number.
/// Unparseable lines are skipped (`verify` reports them). A missing file is an empty log.
/// Needs no key: nothing is checked.
pub fn read_records(path: &Path) -> io::Result<Vec<(usize, AuditRecord)>> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (i, line) in io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        if let Ok(record) = serde_json::from_slice::<AuditRecord>(&line) {
            out.push((i + 1, record));
        }
    }
    Ok(out)
}

/// Sync the log and move the vault's head to `head`, under the caller's file lock. The head only
/// ever names lines that are on the disk: synced first.
fn settle_to(state: &State, head: &AuditHead) {
    match state.file.sync_data() {
        Ok(()) => {
            if let Err(error) = state.head.write(head) {
                tracing::warn!(%error, "cannot move the audit head in the vault; the lines are written, and the head is moved by the next write");
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot sync the audit log; the vault's head stays where it was")
        }
    }
}

/// Where the chain stands, read under the lock: the length of its complete lines, an
/// incomplete last line, the next line's `seq` and `prev`, and whether the next line must
/// anchor a format-1 log.
struct ChainEnd {
    len: u64,
    torn: Option<u64>,
    seq: u64,
    prev: String,
    needs_anchor: bool,
}

/// Check the log from the vault's head to its end (from its start while there is no head) and
/// say where the chain stands. Anything that does not match is [`AuditError::Untrusted`].
fn chain_end(
    file: &fs::File,
    path: &Path,
    key: &hmac::Key,
    head: Option<&AuditHead>,
) -> Result<ChainEnd, AuditError> {
    let untrusted = |reason: String| AuditError::Untrusted {
        path: path.to_owned(),
        reason,
    };
    let io_err = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    let mut walker = match head.filter(|h| h.seq > 0) {
        Some(h) if h.line_start >= len => {
            return Err(untrusted(format!(
                "it has {len} bytes, but the vault's head says line {} starts at byte {}: \
                 lines were cut from its end, or it was replaced by an older copy",
                h.seq, h.line_start
            )))
        }
        Some(h) => Walker::from_head(key, h.clone()),
        None => Walker::from_start(Some(key), None),
    };
    let mut reader = file;
    reader
        .seek(io::SeekFrom::Start(walker.offset))
        .map_err(io_err)?;
    let end = walker
        .walk(io::BufReader::new(reader.take(len - walker.offset)))
        .map_err(|broken| untrusted(broken.to_string()))?;
    walker
        .finish()
        .map_err(|broken| untrusted(broken.to_string()))?;
    let prev = walker.prev.unwrap_or_else(|| GENESIS.to_string());
    Ok(ChainEnd {
        len: end.torn.unwrap_or(len),
        torn: end.torn,
        seq: walker.next_seq,
        needs_anchor: walker.keyed == 0 && walker.unkeyed > 0,
        prev,
    })
}

/// What [`reset`] did.
#[derive(Debug)]
pub struct ResetOutcome {
    /// Where the old log went (`None`: there was none).
    pub kept_as: Option<PathBuf>,
    /// What `verify` said of the old log.
    pub old_state: Result<VerifyReport, AuditBroken>,
    /// The first line of the new chain.
    pub record: AuditRecord,
}

/// Start a new chain: the log at the path (whatever it is: a cut log, a symlink) is renamed
/// to `audit.jsonl.<time>.old`, and a new log starts with one `audit_reset` line made of
/// `event` (who, which command) and a reason that records the vault's old head and what
/// `verify` said of the old log. The vault's head then names that line. A broker running
/// against the old log moves to the new one at its next write.
pub fn reset(home: &Home, vault: &Vault, event: AuditEvent) -> Result<ResetOutcome, AuditError> {
    let path = home.audit_path();
    home.ensure().map_err(|source| AuditError::Io {
        path: home.root().to_owned(),
        source,
    })?;
    let io_err = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let key = vault.derived_key(AUDIT_KEY_LABEL);
    let store = vault
        .audit_head_store()
        .map_err(|source| AuditError::Head {
            path: path.clone(),
            source,
        })?;
    // Writers hold the old file's lock while they check and write: hold it too, if it is one.
    let old = open_no_follow(&path, false).ok();
    let _old_lock = old.as_ref().and_then(|f| FileLock::exclusive(f).ok());
    let old_head = store.read();
    let old_state = match &old_head {
        Ok(head) => verify(&path, Some(&key), head.as_ref()),
        Err(e) => Err(AuditBroken {
            line: 0,
            reason: e.to_string(),
        }),
    };
    let stamp: String = now_rfc3339()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let kept_as = path.with_file_name(format!("audit.jsonl.{stamp}.old"));
    let kept_as = match fs::rename(&path, &kept_as) {
        Ok(()) => Some(kept_as),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(e)),
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err)?;
    let _lock = FileLock::exclusive(&file).map_err(io_err)?;
    let head_text = match &old_head {
        Ok(Some(h)) if h.seq > 0 => {
            format!("line {} (mac {}…)", h.seq, h.mac.get(..16).unwrap_or(""))
        }
        Ok(Some(_)) => "at the start (no line written yet)".into(),
        Ok(None) => "missing".into(),
        Err(_) => "unreadable (edited without the key)".into(),
    };
    let state_text = match &old_state {
        Ok(report) => format!("intact, {} lines", report.lines),
        Err(broken) => broken.to_string(),
    };
    let kept_text = kept_as
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| format!("kept as {}", n.to_string_lossy()))
        .unwrap_or_else(|| "missing".into());
    let reason = [
        event.reason.clone().unwrap_or_default(),
        format!("the vault's head was {head_text}"),
        format!("the old log ({kept_text}): {state_text}"),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join("; ");
    let record = AuditRecord {
        seq: 1,
        time: now_rfc3339(),
        event: AuditEvent {
            reason: Some(reason),
            ..AuditEvent {
                event: EventKind::AuditReset,
                ..event
            }
        }
        .sanitized(),
        prev: GENESIS.to_string(),
        hash: String::new(),
        mac: String::new(),
    };
    let mut line = Vec::new();
    let mac = encode_line_into(
        record.seq,
        &record.time,
        &record.event.view(),
        &Mac::from_hex(&record.prev),
        &key,
        &mut line,
    )
    .as_str()
    .to_owned();
    line.push(b'\n');
    (&file).write_all(&line).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    if let Some(dir) = path.parent() {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    store
        .write(&AuditHead {
            seq: 1,
            mac: mac.clone(),
            line_start: 0,
        })
        .map_err(|source| AuditError::Head {
            path: path.clone(),
            source,
        })?;
    Ok(ResetOutcome {
        kept_as,
        old_state,
        record: AuditRecord { mac, ..record },
    })
}

/// An exclusive `flock` on a file, released on drop. It holds a duplicate of the file's
/// descriptor (the same open file, so the same lock), so the file itself stays free to use.
struct FileLock(fs::File);

impl FileLock {
    fn exclusive(file: &fs::File) -> io::Result<FileLock> {
        let dup = file.try_clone()?;
        flock(&dup, FlockOperation::LockExclusive)?;
        Ok(FileLock(dup))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = flock(&self.0, FlockOperation::Unlock);
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let pairs = text.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    pairs
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Now, as RFC 3339 UTC with milliseconds: fixed width, so these strings sort by time.
pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

/// `t` in UTC as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn use_event(i: u64) -> AuditEvent {
        AuditEvent {
            provider: Some("openai".into()),
            profile: Some("default".into()),
            host: Some("api.openai.com".into()),
            method: Some("GET".into()),
            path: Some(format!("/v1/models/{i}")),
            status: Some(200),
            bytes: Some(i),
            latency_ms: Some(3),
            run_id: Some("run-1".into()),
            pid: Some(42),
            command: Some("python3 agent.py".into()),
            ..AuditEvent::new(EventKind::CredentialUse)
        }
    }

    /// A home with a vault (key file) and its audit log path.
    struct Fixture {
        _dir: tempfile::TempDir,
        home: Home,
        vault: Vault,
        path: PathBuf,
    }

    impl Fixture {
        fn new() -> Fixture {
            let (dir, home, vault) = crate::vault::test_vault();
            let path = home.audit_path();
            Fixture {
                _dir: dir,
                home,
                vault,
                path,
            }
        }

        fn with(n: u64) -> Fixture {
            let f = Fixture::new();
            let audit = f.open().unwrap();
            for i in 0..n {
                audit.append(use_event(i)).unwrap();
            }
            f
        }

        fn open(&self) -> Result<Audit, AuditError> {
            Audit::open(&self.home, &self.vault)
        }

        fn verify(&self) -> Result<VerifyReport, AuditBroken> {
            verify_with(&self.path, &self.vault)
        }

        fn lines(&self) -> Vec<String> {
            fs::read_to_string(&self.path)
                .unwrap()
                .lines()
                .map(String::from)
                .collect()
        }

        fn write_lines(&self, lines: &[String]) {
            fs::write(
                &self.path,
                lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
            )
            .unwrap();
        }

        fn head(&self) -> Option<AuditHead> {
            self.vault.audit_head_store().unwrap().read().unwrap()
        }
    }

    /// The error `open` gives, as text (it must be `Untrusted`).
    fn untrusted(result: Result<Audit, AuditError>) -> String {
        match result {
            Err(err @ AuditError::Untrusted { .. }) => {
                let text = err.to_string();
                assert!(text.contains("broker audit reset --yes"), "{text}");
                assert!(text.contains("broker audit verify"), "{text}");
                text
            }
            Err(other) => panic!("not Untrusted: {other}"),
            Ok(_) => panic!("opened a log that does not match the vault's head"),
        }
    }

    /// A format-1 (unkeyed) line, as the broker wrote them before the key.
    fn v1_line(seq: u64, prev: &str, event: AuditEvent) -> String {
        let record = AuditRecord {
            seq,
            time: now_rfc3339(),
            event,
            prev: prev.to_string(),
            hash: String::new(),
            mac: String::new(),
        };
        let unhashed = serde_json::to_string(&record).unwrap();
        let hash = hex::sha256(unhashed.as_bytes());
        format!(
            "{},\"hash\":\"{hash}\"}}",
            unhashed.strip_suffix('}').unwrap()
        )
    }

    /// What someone without the key can do: chain lines with plain SHA-256 in the mac field.
    fn rechain_without_key(lines: &[String], from: usize) -> Vec<String> {
        let mut out: Vec<String> = lines[..from].to_vec();
        let mut prev = match from {
            0 => GENESIS.to_string(),
            _ => {
                serde_json::from_str::<AuditRecord>(&lines[from - 1])
                    .unwrap()
                    .mac
            }
        };
        for line in &lines[from..] {
            let mut record: AuditRecord = serde_json::from_str(line).unwrap();
            record.seq = out.len() as u64 + 1;
            record.prev = prev.clone();
            record.mac.clear();
            let body = serde_json::to_string(&record).unwrap();
            let forged = hex::sha256(body.as_bytes());
            out.push(format!(
                "{},\"mac\":\"{forged}\"}}",
                body.strip_suffix('}').unwrap()
            ));
            prev = forged;
        }
        out
    }

    #[test]
    fn audit_chain_is_keyed_verifies_and_keeps_the_head() {
        let f = Fixture::with(3);
        let report = f.verify().unwrap();
        assert_eq!((report.lines, report.keyed, report.head), (3, 3, Some(3)));
        let lines = f.lines();
        assert!(
            lines[0].starts_with("{\"seq\":1,\"time\":\""),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("\"event\":\"credential_use\""));
        assert!(lines[0].contains(&format!("\"prev\":\"{GENESIS}\"")));
        assert!(!lines[0].contains("\"hash\""), "{}", lines[0]);
        let second: AuditRecord = serde_json::from_str(&lines[1]).unwrap();
        assert!(lines[2].contains(&format!("\"prev\":\"{}\"", second.mac)));
        // The mac is not a plain hash of the line: it needs the key.
        let body = lines[2].rsplit_once(",\"mac\":\"").unwrap().0;
        assert!(!lines[2].contains(&hex::sha256(format!("{body}}}").as_bytes())));
        let head = f.head().unwrap();
        let third: AuditRecord = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!((head.seq, head.mac.as_str()), (3, third.mac.as_str()));
        let records = read_records(&f.path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].1.event, use_event(2));
        // Another process (another handle) opens it and continues the chain.
        f.open().unwrap().append(use_event(3)).unwrap();
        assert_eq!(f.verify().unwrap().head, Some(4));
    }

    #[test]
    fn audit_missing_and_empty_logs_verify_before_the_first_line() {
        let f = Fixture::new();
        assert_eq!(f.verify().unwrap().lines, 0);
        f.open().unwrap();
        assert_eq!(f.verify().unwrap().lines, 0);
    }

    #[test]
    fn audit_edited_line_is_detected() {
        let f = Fixture::with(4);
        let mut l = f.lines();
        l[1] = l[1].replace("\"status\":200", "\"status\":201");
        f.write_lines(&l);
        let err = f.verify().unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.reason.contains("MAC"), "{err}");
    }

    #[test]
    fn audit_deleted_line_rechained_without_the_key_fails_at_that_line() {
        let f = Fixture::with(5);
        let mut l = f.lines();
        l.remove(2);
        // Every seq, prev and "mac" after it made consistent again, with SHA-256.
        f.write_lines(&rechain_without_key(&l, 2));
        let err = f.verify().unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.reason.contains("without the vault's key"), "{err}");
        // The whole log forged from the start fails at line 1.
        f.write_lines(&rechain_without_key(&f.lines(), 0));
        assert_eq!(f.verify().unwrap_err().line, 1);
    }

    #[test]
    fn audit_deleted_and_reordered_lines_are_detected() {
        let f = Fixture::with(4);
        let l = f.lines();
        let mut deleted = l.clone();
        deleted.remove(1);
        f.write_lines(&deleted);
        assert_eq!(f.verify().unwrap_err().line, 2);
        let mut swapped = l.clone();
        swapped.swap(1, 2);
        f.write_lines(&swapped);
        assert_eq!(f.verify().unwrap_err().line, 2);
    }

    #[test]
    fn audit_truncated_log_is_detected_by_verify_and_open() {
        let f = Fixture::with(4);
        let l = f.lines();
        f.write_lines(&l[..2]);
        let err = f.verify().unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.reason.contains("head says 4 lines"), "{err}");
        assert!(untrusted(f.open()).contains("cut"));
        // Emptied.
        fs::write(&f.path, "").unwrap();
        assert!(f.verify().is_err());
        untrusted(f.open());
    }

    #[test]
    fn audit_replaced_by_an_older_copy_is_detected() {
        let f = Fixture::with(2);
        let older = fs::read(&f.path).unwrap();
        let audit = f.open().unwrap();
        audit.append(use_event(7)).unwrap();
        audit.append(use_event(8)).unwrap();
        drop(audit);
        fs::write(&f.path, &older).unwrap();
        assert!(f.verify().unwrap_err().reason.contains("older copy"));
        untrusted(f.open());
        // An older copy with lines forged on to the old length: the head's line differs.
        let mut l = f.lines();
        l.push(l[1].clone());
        l.push(l[1].clone());
        f.write_lines(&rechain_without_key(&l, 2));
        assert_eq!(f.verify().unwrap_err().line, 3);
        untrusted(f.open());
    }

    #[test]
    fn audit_symlink_and_deleted_log_are_detected() {
        let f = Fixture::with(2);
        fs::remove_file(&f.path).unwrap();
        assert!(untrusted(f.open()).contains("missing"));
        assert!(f.verify().unwrap_err().reason.contains("missing"));
        std::os::unix::fs::symlink("/dev/null", &f.path).unwrap();
        assert!(untrusted(f.open()).contains("symbolic link"));
        assert!(f.verify().unwrap_err().reason.contains("symbolic link"));
        assert_eq!(fs::read("/dev/null").unwrap(), b"", "nothing went through");
    }

    #[test]
    fn audit_only_a_regular_file_is_opened() {
        let f = Fixture::new();
        let made = std::process::Command::new("mkfifo")
            .arg(&f.path)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(untrusted(f.open()).contains("not a regular file"));
        assert!(f
            .verify()
            .unwrap_err()
            .reason
            .contains("not a regular file"));
    }

    #[test]
    fn audit_a_log_replaced_while_open_stops_the_writes_until_a_reset() {
        let f = Fixture::with(1);
        let audit = f.open().unwrap();
        audit.append(use_event(1)).unwrap();
        fs::rename(&f.path, f.path.with_extension("moved")).unwrap();
        std::os::unix::fs::symlink("/dev/null", &f.path).unwrap();
        let Err(failed) = audit.try_append_all(vec![use_event(2), use_event(3)]) else {
            panic!("wrote through a symlink put in place of the log");
        };
        assert!(
            failed
                .error
                .to_string()
                .contains("replaced while the broker ran"),
            "{}",
            failed.error
        );
        let back: Vec<Option<u64>> = failed.events.iter().map(|e| e.bytes).collect();
        assert_eq!(back, [Some(2), Some(3)], "all of them, in order");
        // The reset puts a log that matches the head there: the writer moves to it.
        let outcome = reset(&f.home, &f.vault, AuditEvent::new(EventKind::AuditReset)).unwrap();
        assert!(outcome.kept_as.is_some());
        let rec = audit.append_all(failed.events).unwrap();
        assert_eq!(rec.last().unwrap().seq, 3);
        let report = f.verify().unwrap();
        assert_eq!((report.lines, report.head), (3, Some(3)));
    }

    #[test]
    fn audit_reset_starts_a_new_chain_that_records_the_old_head() {
        let f = Fixture::with(4);
        let l = f.lines();
        f.write_lines(&l[..1]);
        untrusted(f.open());
        let event = AuditEvent {
            command: Some("broker audit reset --yes".into()),
            reason: Some("reset by tester".into()),
            ..AuditEvent::new(EventKind::AuditReset)
        };
        let outcome = reset(&f.home, &f.vault, event).unwrap();
        let kept = outcome.kept_as.unwrap();
        assert_eq!(fs::read_to_string(&kept).unwrap(), format!("{}\n", l[0]));
        assert!(outcome.old_state.is_err());
        let lines = f.lines();
        assert_eq!(lines.len(), 1);
        let first: AuditRecord = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!((first.seq, first.event.event), (1, EventKind::AuditReset));
        let reason = first.event.reason.unwrap();
        assert!(reason.starts_with("reset by tester"), "{reason}");
        assert!(reason.contains("the vault's head was line 4"), "{reason}");
        assert!(reason.contains("broken at line 2"), "{reason}");
        // The new chain opens, continues and verifies.
        f.open().unwrap().append(use_event(9)).unwrap();
        let report = f.verify().unwrap();
        assert_eq!((report.lines, report.head), (2, Some(2)));
    }

    #[test]
    fn audit_the_head_is_a_lower_bound() {
        let f = Fixture::with(2);
        let behind = f.head().unwrap();
        f.open().unwrap().append(use_event(3)).unwrap();
        // As if the broker died after writing the line and before moving the head.
        f.vault.audit_head_store().unwrap().write(&behind).unwrap();
        let audit = f.open().unwrap();
        assert_eq!(audit.append(use_event(4)).unwrap().seq, 4);
        assert_eq!(f.verify().unwrap().head, Some(4));
    }

    #[test]
    fn audit_an_edited_head_is_refused() {
        let f = Fixture::with(3);
        let l = f.lines();
        f.write_lines(&l[..1]);
        // Moving the head back to match the cut needs the key: an untagged row fails.
        let store = f.vault.audit_head_store().unwrap();
        let rec: AuditRecord = serde_json::from_str(&l[0]).unwrap();
        let conn = rusqlite::Connection::open(f.vault.path()).unwrap();
        conn.execute(
            "UPDATE audit_head SET seq = 1, line_start = 0, mac = ?1",
            [&rec.mac],
        )
        .unwrap();
        assert!(store.read().is_err());
        assert!(matches!(f.open(), Err(AuditError::Head { .. })));
        assert!(f.verify().is_err());
    }

    #[test]
    fn audit_a_log_deleted_with_the_head_row_is_detected_while_the_vault_holds_credentials() {
        let f = Fixture::with(2);
        let conn = rusqlite::Connection::open(f.vault.path()).unwrap();
        conn.execute("DELETE FROM audit_head", []).unwrap();
        fs::remove_file(&f.path).unwrap();
        // Without credentials there is nothing the log was protecting: a fresh start.
        f.open().unwrap();
        assert_eq!(f.verify().unwrap().lines, 0);
        fs::remove_file(&f.path).unwrap();
        f.vault
            .put(
                "openai",
                "default",
                "sk-test-audit-unit-0000",
                crate::vault::CredentialKind::ApiKey,
            )
            .unwrap();
        assert!(untrusted(f.open()).contains("deleted together with the head"));
        assert!(f.verify().unwrap_err().reason.contains("head"));
        // A vault from before the head, with its format-1 log: the migration goes on.
        f.write_lines(&[v1_line(1, GENESIS, use_event(1))]);
        f.open().unwrap().append(use_event(2)).unwrap();
        assert_eq!(f.verify().unwrap().head, Some(3));
    }

    #[test]
    fn audit_format_1_log_is_kept_and_anchored_by_the_first_keyed_line() {
        let f = Fixture::new();
        let first = v1_line(1, GENESIS, use_event(1));
        let second = v1_line(2, &hex::sha256(first.as_bytes()), use_event(2));
        f.write_lines(&[first.clone(), second.clone()]);
        assert_eq!(f.verify().unwrap().unkeyed, 2);
        // What `broker serve` and `broker run` do at start: the anchor alone.
        let anchored = f.open().unwrap().append_all(Vec::new()).unwrap();
        assert!(
            anchored.is_empty(),
            "the anchor is not one of the caller's events"
        );
        assert_eq!(f.head().unwrap().seq, 3, "the anchor is written");
        // Nothing more to anchor: an empty append writes nothing.
        assert!(f.open().unwrap().append_all(Vec::new()).unwrap().is_empty());
        let rec = f.open().unwrap().append(use_event(3)).unwrap();
        assert_eq!(rec.seq, 4, "after the anchor");
        let lines = f.lines();
        let anchor: AuditRecord = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(anchor.event.event, EventKind::AuditKeyed);
        assert_eq!(anchor.seq, 3);
        assert_eq!(anchor.prev, hex::sha256(second.as_bytes()));
        let report = f.verify().unwrap();
        assert_eq!((report.unkeyed, report.keyed), (2, 2));
        // A format-1 line edited and its hashes recomputed: the anchor no longer matches.
        let edited = v1_line(1, GENESIS, use_event(99));
        let rehashed = v1_line(2, &hex::sha256(edited.as_bytes()), use_event(2));
        let mut l = lines.clone();
        l[0] = edited;
        l[1] = rehashed;
        f.write_lines(&l);
        assert_eq!(f.verify().unwrap_err().line, 3);
        // No unkeyed line may follow a keyed one.
        let mut l = lines;
        l.push(v1_line(5, GENESIS, use_event(5)));
        f.write_lines(&l);
        assert!(f.verify().unwrap_err().reason.contains("format 1"));
    }

    #[test]
    fn audit_torn_last_line_is_reported_then_dropped_by_the_next_write() {
        let f = Fixture::with(2);
        let mut text = fs::read_to_string(&f.path).unwrap();
        text.push_str("{\"seq\":3,\"time\":\"20");
        fs::write(&f.path, &text).unwrap();
        assert_eq!(f.verify().unwrap_err().line, 3);
        let rec = f.open().unwrap().append(use_event(9)).unwrap();
        assert_eq!(rec.seq, 3);
        assert_eq!(f.lines().len(), 3);
        assert_eq!(f.verify().unwrap().lines, 3);
    }

    #[test]
    fn audit_keyed_lines_cannot_be_checked_without_the_key() {
        let f = Fixture::with(1);
        let err = verify(&f.path, None, None).unwrap_err();
        assert!(err.reason.contains("vault's key"), "{err}");
    }

    #[test]
    fn query_strings_never_reach_the_log() {
        let f = Fixture::new();
        let audit = f.open().unwrap();
        let ev = AuditEvent {
            path: Some("/v1/search?key=PLACEHOLDER&q=x#frag".into()),
            ..AuditEvent::new(EventKind::CredentialUse)
        };
        let rec = audit.append(ev).unwrap();
        assert_eq!(rec.event.path.as_deref(), Some("/v1/search"));
        assert!(!fs::read_to_string(&f.path).unwrap().contains("key="));
    }

    #[test]
    fn a_batch_chains_like_single_appends() {
        let f = Fixture::new();
        let audit = f.open().unwrap();
        audit.append(use_event(1)).unwrap();
        let records = audit.append_all((2..6).map(use_event).collect()).unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
        audit.append(use_event(6)).unwrap();
        // Another handle (another process) continues the chain from the file.
        f.open()
            .unwrap()
            .append_all(vec![use_event(7), use_event(8)])
            .unwrap();
        audit.append(use_event(9)).unwrap();
        assert_eq!(f.verify().unwrap().head, Some(9));
    }

    /// `audit.try_append`, which must succeed.
    fn append(audit: &Audit, events: Vec<AuditEvent>, settle: Settle) {
        audit
            .try_append(events, settle)
            .map_err(|f| f.error)
            .unwrap();
    }

    #[test]
    fn lines_written_to_settle_later_move_the_head_only_when_settled() {
        let f = Fixture::with(1);
        let audit = f.open().unwrap();
        let seq = |h: Option<AuditHead>| h.map(|h| h.seq);
        append(&audit, vec![use_event(1), use_event(2)], Settle::Later);
        assert_eq!(f.lines().len(), 3, "the lines are written at once");
        assert_eq!(seq(f.head()), Some(1), "the head has not moved yet");
        assert_eq!(f.verify().unwrap().lines, 3, "lines past the head verify");
        append(&audit, Vec::new(), Settle::Now);
        assert_eq!(
            seq(f.head()),
            Some(3),
            "settled: the head names the last line"
        );

        // Another writer appends (and settles) after lines left to settle later: settling them
        // afterwards must not move the head back.
        append(&audit, vec![use_event(4)], Settle::Later);
        f.open().unwrap().append(use_event(5)).unwrap();
        assert_eq!(seq(f.head()), Some(5));
        append(&audit, Vec::new(), Settle::Now);
        assert_eq!(seq(f.head()), Some(5), "the head did not go back to line 4");
        audit.append(use_event(6)).unwrap();
        assert_eq!(f.verify().unwrap().head, Some(6));
    }

    #[test]
    fn settling_after_a_reset_names_no_line_of_the_replaced_log() {
        let f = Fixture::with(2);
        let audit = f.open().unwrap();
        let saved = fs::read(&f.path).unwrap();
        append(&audit, vec![use_event(2)], Settle::Later);
        let ours = f.lines()[2].clone();
        // A reset puts back a log that matches the head (here: the copy from before the line
        // left to settle), under a new inode; another writer then appends a line of the same
        // length, so the new log ends where the one left to settle ended.
        let copy = f.path.with_extension("copy");
        fs::write(&copy, &saved).unwrap();
        fs::rename(&copy, &f.path).unwrap();
        f.open().unwrap().append(use_event(7)).unwrap();
        let theirs = f.lines()[2].clone();
        assert_eq!(
            theirs.len(),
            ours.len(),
            "the two lines have the same length"
        );
        assert_ne!(theirs, ours);
        append(&audit, Vec::new(), Settle::Now);
        assert_eq!(
            f.verify().unwrap().head,
            Some(3),
            "the head names the other writer's line 3, not the replaced log's"
        );
        audit.append(use_event(3)).unwrap();
        assert_eq!(f.verify().unwrap().head, Some(4));
    }

    #[test]
    fn concurrent_appends_from_threads_keep_the_chain() {
        let f = Fixture::new();
        let audit = std::sync::Arc::new(f.open().unwrap());
        std::thread::scope(|s| {
            for t in 0..4 {
                // Half share one handle, half open their own: both must serialize.
                let shared = audit.clone();
                let f = &f;
                s.spawn(move || {
                    let own = f.open().unwrap();
                    for i in 0..25 {
                        let a = if t % 2 == 0 { &*shared } else { &own };
                        a.append(use_event(t * 1000 + i)).unwrap();
                    }
                });
            }
        });
        assert_eq!(f.verify().unwrap().head, Some(100));
    }

    #[test]
    fn long_fields_are_cut() {
        let ev = AuditEvent {
            command: Some("x".repeat(5000)),
            ..AuditEvent::new(EventKind::Login)
        };
        assert_eq!(
            ev.sanitized().command.unwrap().chars().count(),
            MAX_FIELD_LEN + 1
        );
    }

    #[test]
    fn time_format_is_fixed_width() {
        let t = time::OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(format_rfc3339(t), "1970-01-01T00:00:00.000Z");
        assert_eq!(now_rfc3339().len(), 24);
    }
}
