//! The proxy's audit sink: events are queued and appended by one writer thread, so a request
//! never waits on the audit file's lock or disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use crate::audit::{AppendFailed, Audit, AuditError, AuditEvent, AuditRecord};
use crate::home::Home;
use crate::proxy::AuditSink;

/// How long the writer waits after the first event of a batch for more to arrive: the delay
/// before an event reaches the file (and before a broker with unwritten events exits).
const GATHER: Duration = Duration::from_millis(5);
/// How often a write that failed (a full disk) is tried again.
const RETRY: Duration = Duration::from_secs(1);

pub struct AuditQueue {
    tx: Option<mpsc::Sender<AuditEvent>>,
    writer: Option<thread::JoinHandle<()>>,
    /// Set while the writer holds events it could not write.
    failing: Arc<AtomicBool>,
}

impl AuditQueue {
    /// Open the audit log of `home` and start its writer thread. A log that cannot be opened
    /// is an error here, before any request: the broker does not run unaudited.
    pub fn start(home: &Home) -> Result<AuditQueue, AuditError> {
        let audit = Audit::open(home)?;
        let (tx, rx) = mpsc::channel::<AuditEvent>();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = failing.clone();
        let writer = thread::Builder::new()
            .name("broker-audit".into())
            .spawn(move || write_until_closed(&rx, &flag, |events| audit.try_append_all(events)))
            .map_err(|source| AuditError::Io {
                path: home.audit_path(),
                source,
            })?;
        Ok(AuditQueue {
            tx: Some(tx),
            writer: Some(writer),
            failing,
        })
    }
}

/// The writer: block for one event, wait a moment, then write whatever else is queued, so
/// that under load one wake-up, one lock, one stat and one write serve many events. (Without
/// the wait each request woke this thread and paid those alone, on the cores the broker
/// shares with its agent: this thread was a fifth of the broker's CPU in the keep-alive
/// benchmark. While it sleeps, senders do not wake it.)
///
/// Events it cannot write are kept, in order, and tried again every [`RETRY`] with those that
/// arrive meanwhile; `failing` is set until they are written. When the channel closes, the
/// writer tries once more and then gives up, saying how many events are lost.
fn write_until_closed(
    rx: &mpsc::Receiver<AuditEvent>,
    failing: &AtomicBool,
    mut append: impl FnMut(Vec<AuditEvent>) -> Result<Vec<AuditRecord>, AppendFailed>,
) {
    let mut unwritten: Vec<AuditEvent> = Vec::new();
    let mut open = true;
    while open {
        if unwritten.is_empty() {
            match rx.recv() {
                Ok(first) => unwritten.push(first),
                Err(_) => return,
            }
            thread::sleep(GATHER);
        } else {
            thread::sleep(RETRY);
        }
        loop {
            match rx.try_recv() {
                Ok(event) => unwritten.push(event),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        match append(std::mem::take(&mut unwritten)) {
            Ok(_) => {
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!("the audit log is written again; credentials are used again");
                }
            }
            Err(AppendFailed { error, events }) => {
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(%error, "cannot append to the audit log; no credential is used until it can be (tried again every second)");
                }
                unwritten = events;
            }
        }
    }
    if !unwritten.is_empty() {
        tracing::error!(
            lost = unwritten.len(),
            "the broker is stopping with audit events it could not write"
        );
    }
}

impl Drop for AuditQueue {
    /// Write what is queued before the broker goes away: the last requests of a run that just
    /// ended must not be lost when `broker run` exits right after its agent.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl AuditSink for AuditQueue {
    fn record(&self, event: AuditEvent) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event);
        }
    }

    fn writable(&self) -> bool {
        !self.failing.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditError, EventKind};
    use std::sync::Mutex;

    fn numbered(i: u64) -> AuditEvent {
        AuditEvent {
            bytes: Some(i),
            ..AuditEvent::new(EventKind::CredentialUse)
        }
    }

    /// A log that refuses the first `failures` appends, and what reached it.
    struct FlakyLog {
        failures: usize,
        written: Mutex<Vec<u64>>,
    }

    impl FlakyLog {
        fn append(&mut self, events: Vec<AuditEvent>) -> Result<Vec<AuditRecord>, AppendFailed> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(AppendFailed {
                    error: AuditError::Io {
                        path: "audit.jsonl".into(),
                        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                    },
                    events,
                });
            }
            let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
            written.extend(events.iter().filter_map(|e| e.bytes));
            Ok(Vec::new())
        }
    }

    #[test]
    fn events_that_cannot_be_written_are_kept_and_written_later_in_order() {
        let (tx, rx) = mpsc::channel();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = failing.clone();
        let writer = thread::spawn(move || {
            let mut log = FlakyLog {
                failures: 2,
                written: Mutex::new(Vec::new()),
            };
            write_until_closed(&rx, &flag, |events| log.append(events));
            log.written.into_inner().unwrap_or_else(|p| p.into_inner())
        });
        tx.send(numbered(1)).unwrap_or_else(|_| panic!("send"));
        // The first write fails: the queue says so while it holds the event.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !failing.load(Ordering::Relaxed) {
            assert!(
                std::time::Instant::now() < deadline,
                "never reported failing"
            );
            thread::sleep(Duration::from_millis(1));
        }
        for i in 2..=4 {
            tx.send(numbered(i)).unwrap_or_else(|_| panic!("send"));
        }
        // Two failures, then every event lands, in the order sent.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while failing.load(Ordering::Relaxed) {
            assert!(std::time::Instant::now() < deadline, "still failing");
            thread::sleep(Duration::from_millis(5));
        }
        tx.send(numbered(5)).unwrap_or_else(|_| panic!("send"));
        drop(tx);
        let written = writer.join().unwrap_or_else(|_| panic!("writer"));
        assert_eq!(written, [1, 2, 3, 4, 5]);
        assert!(!failing.load(Ordering::Relaxed));
    }

    #[test]
    fn a_log_that_cannot_be_opened_stops_the_start() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let home = Home::at(dir.path().to_path_buf());
        std::fs::create_dir_all(home.audit_path()).unwrap_or_else(|e| panic!("{e}"));
        let Err(err) = AuditQueue::start(&home) else {
            panic!("started with a directory for a log");
        };
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
    }
}
