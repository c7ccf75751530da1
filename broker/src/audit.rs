//! The audit log: append-only JSONL at `$BROKER_HOME/audit.jsonl`, hash-chained.
//!
//! One line per event:
//! `{"seq":N,"time":"<RFC 3339 UTC>","event":"credential_use",...fields...,"prev":"<hex>","hash":"<hex>"}`
//! - `prev` is the SHA-256 of the previous line's bytes (64 zeros on the first line);
//! - `hash` is the SHA-256 of this line's bytes up to, not including, `,"hash":...`, with the
//!   closing `}` appended: the line as it would read without its `hash` field.
//!
//! `broker audit verify` ([`verify`]) recomputes both and checks `seq` counts up by one, so an
//! edited, deleted, inserted or reordered line breaks the chain at that line. A chain without a
//! secret key cannot stop someone who rewrites every line after an edit, nor one who cuts the
//! end of the file; it catches edits, not a full forgery.
//!
//! **No secret ever goes into this log.** The API takes no secret value: events carry names
//! (provider, profile, host), request facts (method, path without its query, status, sizes) and
//! reasons. Callers pass the path as the agent sent it (with the placeholder, before the swap);
//! [`Audit::append`] still drops any query string or fragment.
//!
//! Appends are safe across threads (a mutex) and processes: the file is opened `O_APPEND`, and
//! an exclusive `flock` is held while the last line is read and the new one written.

use std::fmt;
use std::fs;
use std::io::{self, BufRead as _, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::digest::{digest, SHA256};
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::home::Home;

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
    /// The TLS SNI or the `Host` header did not match the host the connection was made for.
    SniHostMismatch,
    CredentialAdded,
    CredentialRemoved,
    /// `broker rekey`: the vault's master key was moved or replaced.
    VaultRekeyed,
    /// Events the broker could not keep while its audit log could not be written (a count).
    EventsLost,
    /// A connection to a run's listener without that run's ticket (another run's process, or
    /// one outside any run): refused before anything of it was read. Never holds the ticket.
    TicketRefused,
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
            EventKind::EventsLost => "events_lost",
            EventKind::TicketRefused => "ticket_refused",
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
/// # use broker::audit::{AuditEvent, EventKind};
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

    /// Cut long fields and drop a query string or fragment from `path`.
    fn sanitized(mut self) -> AuditEvent {
        if let Some(path) = &mut self.path {
            if let Some(i) = path.find(['?', '#']) {
                path.truncate(i);
            }
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
            // A string has at least as many bytes as chars: most fields need no count.
            if field.len() > MAX_FIELD_LEN && field.chars().count() > MAX_FIELD_LEN {
                *field = field.chars().take(MAX_FIELD_LEN).chain(['…']).collect();
            }
        }
        self
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
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

/// The audit log failed to append.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("audit log: cannot encode an event: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Where and why the chain breaks. `line` is 1-based (0: the file could not be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at line {line}: {reason}")]
pub struct AuditBroken {
    pub line: usize,
    pub reason: String,
}

/// The audit log of one `BROKER_HOME`. `Send + Sync`: share one in an `Arc`.
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    file: Mutex<(fs::File, Option<Written>)>,
}

/// What this process last appended: while the file still ends there (no other process wrote
/// since), the next line chains to it without reading the file back.
#[derive(Debug)]
struct Written {
    len: u64,
    seq: u64,
    hash: String,
}

impl Audit {
    /// Open (creating 0600) the audit log of `home`.
    pub fn open(home: &Home) -> Result<Audit, AuditError> {
        home.ensure().map_err(|source| AuditError::Io {
            path: home.root().to_owned(),
            source,
        })?;
        Audit::open_path(&home.audit_path())
    }

    /// Open (creating 0600) the audit log at `path`.
    pub fn open_path(path: &Path) -> Result<Audit, AuditError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(Audit {
            path: path.to_owned(),
            file: Mutex::new((file, None)),
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
    /// cut short by a full disk may have left some of their lines at the end of the log: those
    /// appear twice once the retry lands, which is better than not at all.)
    pub fn try_append_all(
        &self,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<AuditRecord>, AppendFailed> {
        let io_err = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (file, written) = &mut *guard;
        // Threads are serialized by the mutex, processes by the lock (released on drop, or by
        // the kernel if the process dies).
        let locked =
            FileLock::exclusive(file).and_then(|lock| Ok((lock, chain_end(file, written.take())?)));
        let (_lock, end) = match locked {
            Ok(locked) => locked,
            Err(source) => {
                return Err(AppendFailed {
                    error: io_err(source),
                    events,
                })
            }
        };
        let (len, mut seq, mut prev) = (end.len, end.seq, end.prev);
        // A line torn by a crash is closed first so the new ones stay lines of their own;
        // `verify` reports the torn one.
        let mut out = String::new();
        if end.torn {
            out.push('\n');
        }
        let mut records = Vec::with_capacity(events.len());
        let give_back = |records: Vec<AuditRecord>, rest| {
            records.into_iter().map(|r| r.event).chain(rest).collect()
        };
        // The lines are written together, so they carry the same time.
        let time = now_rfc3339();
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            let record = AuditRecord {
                seq,
                time: time.clone(),
                event: event.sanitized(),
                prev: std::mem::take(&mut prev),
                hash: String::new(),
            };
            let (line, hash) = match encode_line(&record) {
                Ok(encoded) => encoded,
                Err(error) => {
                    records.push(record);
                    return Err(AppendFailed {
                        error: error.into(),
                        events: give_back(records, events),
                    });
                }
            };
            // The next line chains to this one: the hash of the line as written.
            prev = sha256_hex(line.as_bytes());
            out.push_str(&line);
            out.push('\n');
            records.push(AuditRecord { hash, ..record });
            seq += 1;
        }
        // One write(2) of all the lines: with O_APPEND they land at the end as a unit.
        if let Err(error) = (&*file).write_all(out.as_bytes()) {
            return Err(AppendFailed {
                error: io_err(error),
                events: give_back(records, events),
            });
        }
        *written = Some(Written {
            len: len + out.len() as u64,
            seq: seq - 1,
            hash: prev,
        });
        Ok(records)
    }
}

/// An append that did not happen, with the events it was given.
pub struct AppendFailed {
    pub error: AuditError,
    pub events: Vec<AuditEvent>,
}

/// Serialize `record` (its `hash` still empty) as one line (no newline) with its hash computed
/// and placed last. Returns the line and the hash.
fn encode_line(record: &AuditRecord) -> Result<(String, String), serde_json::Error> {
    debug_assert!(record.hash.is_empty(), "the hash is computed here");
    // Struct order (seq, time, event, fields, prev); the empty `hash` is skipped.
    let unhashed = serde_json::to_string(record)?;
    let hash = sha256_hex(unhashed.as_bytes());
    let body = unhashed.strip_suffix('}').unwrap_or(&unhashed);
    Ok((format!("{body},\"hash\":\"{hash}\"}}"), hash))
}

/// Check the whole chain at `path`. `Ok(number of lines)`; a missing file is an empty log.
pub fn verify(path: &Path) -> Result<usize, AuditBroken> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(AuditBroken {
                line: 0,
                reason: format!("{}: {e}", path.display()),
            })
        }
    };
    let mut reader = io::BufReader::new(file);
    let mut prev_hash = GENESIS.to_string();
    let mut expected_seq = 1u64;
    let mut n = 0usize;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| AuditBroken {
                line: n + 1,
                reason: format!("read error: {e}"),
            })?;
        if read == 0 {
            return Ok(n);
        }
        n += 1;
        let broken = |reason: String| AuditBroken { line: n, reason };
        let Some(line) = buf.strip_suffix(b"\n") else {
            return Err(broken(
                "the last line is incomplete (a write was cut off)".into(),
            ));
        };
        let text = std::str::from_utf8(line).map_err(|_| broken("not UTF-8".into()))?;
        let (seq, prev) = check_line(text).map_err(broken)?;
        if seq != expected_seq {
            return Err(broken(format!(
                "seq is {seq}, expected {expected_seq} (a line was deleted, inserted or moved)"
            )));
        }
        if prev != prev_hash {
            return Err(broken(
                "prev does not match the previous line (a line before it was edited, deleted or moved)"
                    .into(),
            ));
        }
        prev_hash = sha256_hex(line);
        expected_seq += 1;
    }
}

/// Parse one line and check its own hash. Returns `(seq, prev)`.
fn check_line(text: &str) -> Result<(u64, String), String> {
    let record: AuditRecord =
        serde_json::from_str(text).map_err(|e| format!("not a valid audit record: {e}"))?;
    let Some((body, tail)) = text.rsplit_once(",\"hash\":\"") else {
        return Err("no hash field at the end of the line".into());
    };
    if tail != format!("{}\"}}", record.hash) || record.hash.len() != 64 {
        return Err("the hash field is malformed".into());
    }
    if sha256_hex(format!("{body}}}").as_bytes()) != record.hash {
        return Err("the line's content does not match its hash (the line was edited)".into());
    }
    Ok((record.seq, record.prev))
}

/// Read every record of the log at `path` that parses, in order, with its 1-based line number.
/// Unparseable lines are skipped (`verify` reports them). A missing file is an empty log.
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

/// The end of the log, as `append` needs it.
/// Where the chain stands, read under the lock: the file's length, whether its last line is
/// torn, and the next line's `seq` and `prev`.
struct ChainEnd {
    len: u64,
    torn: bool,
    seq: u64,
    prev: String,
}

/// What this process wrote last is trusted while the file has not changed length since;
/// otherwise the tail is read.
fn chain_end(file: &fs::File, written: Option<Written>) -> io::Result<ChainEnd> {
    let len = file.metadata()?.len();
    if let Some(ours) = written.filter(|w| w.len == len) {
        return Ok(ChainEnd {
            len,
            torn: false,
            seq: ours.seq + 1,
            prev: ours.hash,
        });
    }
    Ok(match read_tail(file)? {
        Some(tail) => ChainEnd {
            len,
            torn: !tail.ends_with_newline,
            seq: tail.last_seq.map_or(1, |s| s + 1),
            prev: sha256_hex(&tail.last_line),
        },
        None => ChainEnd {
            len,
            torn: false,
            seq: 1,
            prev: GENESIS.to_string(),
        },
    })
}

struct Tail {
    last_line: Vec<u8>,
    /// `seq` of the last line that parses (a torn last line does not).
    last_seq: Option<u64>,
    ends_with_newline: bool,
}

/// Read the last line (and the last parseable `seq`) without reading the whole file.
fn read_tail(file: &fs::File) -> io::Result<Option<Tail>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut chunk = 8 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = vec![0u8; (len - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        let ends_with_newline = buf.last() == Some(&b'\n');
        let body = if ends_with_newline {
            &buf[..buf.len() - 1]
        } else {
            &buf[..]
        };
        // Lines wholly inside the chunk: everything after the first newline (or all of it
        // when the chunk starts the file).
        let complete = if start == 0 {
            Some(body)
        } else {
            body.iter()
                .position(|b| *b == b'\n')
                .map(|i| &body[i + 1..])
        };
        if let Some(complete) = complete {
            let mut lines = complete.rsplit(|b| *b == b'\n');
            if let Some(last) = lines.next() {
                let last_seq = std::iter::once(last)
                    .chain(lines)
                    .find_map(|l| serde_json::from_slice::<SeqOnly>(l).ok())
                    .map(|s| s.seq);
                if last_seq.is_some() || start == 0 {
                    return Ok(Some(Tail {
                        last_line: last.to_vec(),
                        last_seq,
                        ends_with_newline,
                    }));
                }
            }
        }
        if start == 0 {
            return Ok(Some(Tail {
                last_line: body.to_vec(),
                last_seq: None,
                ends_with_newline,
            }));
        }
        chunk *= 4;
    }
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// An exclusive `flock` on a file, released on drop.
struct FileLock<'a>(&'a fs::File);

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a fs::File) -> io::Result<FileLock<'a>> {
        flock(file, FlockOperation::LockExclusive)?;
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0, FlockOperation::Unlock);
    }
}

fn sha256_hex(data: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = digest(&SHA256, data);
    // By table, not `format!` per byte: two hashes per audit line, one line per request.
    let mut out = String::with_capacity(64);
    for b in d.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
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

    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open_path(&path).unwrap();
        for i in 0..n {
            audit.append(use_event(i)).unwrap();
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    #[test]
    fn chain_verifies_and_lines_look_right() {
        let (_dir, path) = log_with(3);
        assert_eq!(verify(&path), Ok(3));
        let lines = lines(&path);
        assert!(
            lines[0].starts_with("{\"seq\":1,\"time\":\""),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("\"event\":\"credential_use\""));
        assert!(lines[0].contains(&format!("\"prev\":\"{GENESIS}\"")));
        assert!(lines[2].contains(&format!("\"prev\":\"{}\"", sha256_hex(lines[1].as_bytes()))));
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].1.seq, 3);
        assert_eq!(records[2].1.event, use_event(2));
    }

    #[test]
    fn missing_and_empty_logs_verify() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(verify(&dir.path().join("none.jsonl")), Ok(0));
        let (_d, path) = log_with(0);
        assert_eq!(verify(&path), Ok(0));
    }

    #[test]
    fn edited_line_is_detected() {
        let (_dir, path) = log_with(4);
        let mut l = lines(&path);
        l[1] = l[1].replace("\"status\":200", "\"status\":201");
        write_lines(&path, &l);
        let err = verify(&path).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.reason.contains("edited"), "{err}");
    }

    #[test]
    fn edited_line_with_recomputed_hash_breaks_the_next_line() {
        let (_dir, path) = log_with(4);
        let mut l = lines(&path);
        let mut record: AuditRecord = serde_json::from_str(&l[1]).unwrap();
        record.event.status = Some(500);
        record.hash.clear();
        l[1] = encode_line(&record).unwrap().0;
        write_lines(&path, &l);
        assert_eq!(verify(&path).unwrap_err().line, 3);
    }

    #[test]
    fn deleted_line_is_detected() {
        let (_dir, path) = log_with(4);
        let mut l = lines(&path);
        l.remove(1);
        write_lines(&path, &l);
        assert_eq!(verify(&path).unwrap_err().line, 2);
    }

    #[test]
    fn reordered_lines_are_detected() {
        let (_dir, path) = log_with(4);
        let mut l = lines(&path);
        l.swap(1, 2);
        write_lines(&path, &l);
        assert_eq!(verify(&path).unwrap_err().line, 2);
    }

    #[test]
    fn torn_last_line_is_reported_and_appends_go_on() {
        let (_dir, path) = log_with(2);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{\"seq\":3,\"time\":\"20");
        fs::write(&path, &text).unwrap();
        assert_eq!(verify(&path).unwrap_err().line, 3);
        let rec = Audit::open_path(&path)
            .unwrap()
            .append(use_event(9))
            .unwrap();
        assert_eq!(rec.seq, 3);
        // The torn line stays visible to verify; the new one is a line of its own.
        assert_eq!(lines(&path).len(), 4);
        assert_eq!(verify(&path).unwrap_err().line, 3);
    }

    #[test]
    fn query_strings_never_reach_the_log() {
        let (_dir, path) = log_with(0);
        let audit = Audit::open_path(&path).unwrap();
        let ev = AuditEvent {
            path: Some("/v1/search?key=PLACEHOLDER&q=x#frag".into()),
            ..AuditEvent::new(EventKind::CredentialUse)
        };
        let rec = audit.append(ev).unwrap();
        assert_eq!(rec.event.path.as_deref(), Some("/v1/search"));
        assert!(!fs::read_to_string(&path).unwrap().contains("key="));
    }

    #[test]
    fn a_batch_chains_like_single_appends() {
        let (_dir, path) = log_with(0);
        let audit = Audit::open_path(&path).unwrap();
        audit.append(use_event(1)).unwrap();
        let records = audit.append_all((2..6).map(use_event).collect()).unwrap();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
        audit.append(use_event(6)).unwrap();
        // Another handle (another process) continues the chain from the file.
        Audit::open_path(&path)
            .unwrap()
            .append_all(vec![use_event(7), use_event(8)])
            .unwrap();
        assert_eq!(verify(&path), Ok(8));
    }

    #[test]
    fn concurrent_appends_from_threads_keep_the_chain() {
        let (_dir, path) = log_with(0);
        let audit = std::sync::Arc::new(Audit::open_path(&path).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                // Half share one handle, half open their own: both must serialize.
                let shared = audit.clone();
                let path = path.clone();
                std::thread::spawn(move || {
                    let own = Audit::open_path(&path).unwrap();
                    for i in 0..50 {
                        let a = if t % 2 == 0 { &*shared } else { &own };
                        a.append(use_event(t * 1000 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(verify(&path), Ok(400));
    }

    #[test]
    fn a_failed_write_gives_the_events_back() {
        // /dev/full takes the lock and answers every write with ENOSPC, as a full disk does.
        let audit = Audit::open_path(Path::new("/dev/full")).unwrap();
        let events: Vec<AuditEvent> = (1..=3).map(use_event).collect();
        let Err(failed) = audit.try_append_all(events) else {
            panic!("a write to /dev/full succeeded");
        };
        assert!(
            failed.error.to_string().contains("No space left"),
            "{}",
            failed.error
        );
        let back: Vec<Option<u64>> = failed.events.iter().map(|e| e.bytes).collect();
        assert_eq!(back, [Some(1), Some(2), Some(3)], "all of them, in order");
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
