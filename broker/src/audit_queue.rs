//! The proxy's audit sink: events are queued and appended by one writer thread, so a request
//! never waits on the audit file's lock or disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::audit::{
    AppendFailed, Audit, AuditError, AuditEvent, EventKind, EventView, LineEvent, Settle,
};
use crate::home::Home;
use crate::proxy::{AuditSink, RequestEvent};
use crate::vault::Vault;

/// How long the writer waits after the first event of a batch for more to arrive: the delay
/// before an event reaches the file (and before a broker with unwritten events exits), and
/// what a crash of the broker's process can lose.
///
/// Short, so that each batch is short: under load the writer's bursts take a core from the
/// proxy, the agent and the upstream for their length, and the three stall each other behind
/// it. Measured (`h2load` keep-alive, h1, 8 connections, 2 cores; README, "Fifth round"):
/// 31-36k requests a second with 20 ms batches, 34-44k with 5 ms ones, 43-50k with the
/// writer writing nothing.
const GATHER: Duration = Duration::from_millis(5);
/// Batches are synced to the disk, and the vault's head moved to their last line, at most
/// this often (and before the writer idles or stops): each head move is a write to `vault.db`,
/// which also empties the proxy's key cache, and each sync a journal commit.
const SETTLE: Duration = Duration::from_millis(20);
/// How often a write that failed (a full disk) is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Most events kept while the log cannot be written (about 30 MB). No credential is used then,
/// so what arrives is denials and anomalies; past this many they are counted, not kept, and
/// the count is written as an `events_lost` line once the log takes writes again.
const MAX_UNWRITTEN: usize = 100_000;

/// What the proxy queues: an event, or a request's event, which the writer encodes from what
/// the request holds.
enum Queued {
    Event(AuditEvent),
    Request(RequestEvent),
}

impl Queued {
    /// The same line, holding nothing of the proxy's (its request's run).
    fn detached(self) -> Queued {
        match self {
            Queued::Request(request) => Queued::Event(request.into_event()),
            event => event,
        }
    }
}

impl LineEvent for Queued {
    fn view(&self) -> EventView<'_> {
        match self {
            Queued::Event(event) => event.view(),
            Queued::Request(request) => request.view(),
        }
    }
}

pub struct AuditQueue {
    tx: Option<mpsc::Sender<Queued>>,
    writer: Option<thread::JoinHandle<()>>,
    /// Set while the writer holds events it could not write.
    failing: Arc<AtomicBool>,
}

impl AuditQueue {
    /// Open the audit log of `home`, keyed by `vault`, and start its writer thread. A log that
    /// cannot be opened, or that does not match the vault's head (cut, replaced, a symlink),
    /// is an error here, before any request: the broker does not run unaudited.
    pub fn start(home: &Home, vault: &Vault) -> Result<AuditQueue, AuditError> {
        let audit = Audit::open(home, vault)?;
        // A format-1 (unkeyed) log is pinned now, by its first keyed line, not at the first
        // event: from here on cutting it is detected, and starts need not read all of it.
        audit.append_all(Vec::new())?;
        let (tx, rx) = mpsc::channel::<Queued>();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = failing.clone();
        let writer = thread::Builder::new()
            .name("broker-audit".into())
            .spawn(move || {
                write_until_closed(&rx, &flag, MAX_UNWRITTEN, SETTLE, |events, settle| {
                    audit.try_append(events, settle).map(drop)
                })
            })
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
/// benchmark. While it sleeps, senders do not wake it.) Batches are settled (synced, the head
/// moved) every `settle_every`, and always before the writer waits for an event or returns.
///
/// Events it cannot write are kept, in order, and tried again every [`RETRY`] with those that
/// arrive meanwhile; `failing` is set until they are written. Past `cap` kept events, new ones
/// are counted instead, and the count goes to the log as one `events_lost` line. When the
/// channel closes, the writer tries once more and then gives up, saying how many are lost.
fn write_until_closed(
    rx: &mpsc::Receiver<Queued>,
    failing: &AtomicBool,
    cap: usize,
    settle_every: Duration,
    mut append: impl FnMut(Vec<Queued>, Settle) -> Result<(), AppendFailed<Queued>>,
) {
    let mut unwritten: Vec<Queued> = Vec::new();
    let mut dropped: u64 = 0;
    let keep = |unwritten: &mut Vec<Queued>, dropped: &mut u64, queued: Queued| {
        if unwritten.len() < cap {
            unwritten.push(queued);
        } else {
            *dropped += 1;
        }
    };
    let mut open = true;
    // When lines were last settled (`None`: not yet), and whether some written since are not.
    let mut last_settle: Option<Instant> = None;
    let mut unsettled = false;
    let due = |last: Option<Instant>| {
        last.map_or(Duration::ZERO, |at| {
            settle_every.saturating_sub(at.elapsed())
        })
    };
    while open {
        if unwritten.is_empty() {
            let first = if unsettled {
                match rx.recv_timeout(due(last_settle)) {
                    Ok(first) => first,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        // Quiet for a while: settle what was written, then wait without a
                        // deadline. A failure (the log replaced, say) is reported by the next
                        // batch's append.
                        let _ = append(Vec::new(), Settle::Now);
                        (last_settle, unsettled) = (Some(Instant::now()), false);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(first) => first,
                    Err(_) => break,
                }
            };
            keep(&mut unwritten, &mut dropped, first);
            thread::sleep(GATHER);
        } else {
            thread::sleep(RETRY);
        }
        loop {
            match rx.try_recv() {
                Ok(event) => keep(&mut unwritten, &mut dropped, event),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let mut batch = std::mem::take(&mut unwritten);
        let gap = dropped > 0;
        if gap {
            batch.push(Queued::Event(AuditEvent {
                reason: Some(format!(
                    "{dropped} events were not kept while the audit log could not be written"
                )),
                ..AuditEvent::new(EventKind::EventsLost)
            }));
        }
        let settle = match open && due(last_settle) > Duration::ZERO {
            true => Settle::Later,
            false => Settle::Now,
        };
        match append(batch, settle) {
            Ok(_) => {
                dropped = 0;
                match settle {
                    Settle::Now => (last_settle, unsettled) = (Some(Instant::now()), false),
                    Settle::Later => unsettled = true,
                }
                if failing.swap(false, Ordering::Relaxed) {
                    tracing::warn!("the audit log is written again; credentials are used again");
                }
            }
            Err(AppendFailed { error, mut events }) => {
                if !failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(%error, "cannot append to the audit log; no credential is used until it can be (tried again every second)");
                }
                if gap {
                    // Written afresh, with the count at that time, by the next attempt.
                    events.pop();
                }
                // Kept until the log takes writes again, which may be long: as events of their
                // own, so that they do not keep their runs (and what a run holds) alive.
                unwritten = events.into_iter().map(Queued::detached).collect();
            }
        }
    }
    if unsettled {
        // Lines written but not settled when the queue closed (or before a last batch that
        // failed). If this fails the head stays behind them, which the next start and
        // `verify` accept.
        if let Err(failed) = append(Vec::new(), Settle::Now) {
            tracing::warn!(error = %failed.error, "cannot sync the audit log before stopping; its last lines are written, the vault's head stays before them");
        }
    }
    if !unwritten.is_empty() || dropped > 0 {
        tracing::error!(
            lost = unwritten.len() as u64 + dropped,
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
            let _ = tx.send(Queued::Event(event));
        }
    }

    fn record_request(&self, event: RequestEvent) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Queued::Request(event));
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
        written: Mutex<Vec<AuditEvent>>,
    }

    impl FlakyLog {
        fn append(&mut self, events: Vec<Queued>, _: Settle) -> Result<(), AppendFailed<Queued>> {
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
            written.extend(events.iter().map(|queued| queued.view().to_event()));
            Ok(())
        }
    }

    /// Run the writer against a log that refuses its first `failures` appends; `drive` sends
    /// the events. What reached the log, in order.
    fn with_flaky_log(
        failures: usize,
        cap: usize,
        drive: impl FnOnce(&mpsc::Sender<Queued>, &AtomicBool),
    ) -> Vec<AuditEvent> {
        let (tx, rx) = mpsc::channel();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = failing.clone();
        let writer = thread::spawn(move || {
            let mut log = FlakyLog {
                failures,
                written: Mutex::new(Vec::new()),
            };
            write_until_closed(&rx, &flag, cap, SETTLE, |events, settle| {
                log.append(events, settle)
            });
            log.written.into_inner().unwrap_or_else(|p| p.into_inner())
        });
        drive(&tx, &failing);
        drop(tx);
        let written = writer.join().unwrap_or_else(|_| panic!("writer"));
        assert!(!failing.load(Ordering::Relaxed));
        written
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn send(tx: &mpsc::Sender<Queued>, i: u64) {
        tx.send(Queued::Event(numbered(i)))
            .unwrap_or_else(|_| panic!("send"));
    }

    #[test]
    fn events_that_cannot_be_written_are_kept_and_written_later_in_order() {
        let written = with_flaky_log(2, 100, |tx, failing| {
            send(tx, 1);
            // The first write fails: the queue says so while it holds the event.
            wait_until("never reported failing", || failing.load(Ordering::Relaxed));
            (2..=4).for_each(|i| send(tx, i));
            // Two failures, then every event lands.
            wait_until("still failing", || !failing.load(Ordering::Relaxed));
            send(tx, 5);
        });
        let numbers: Vec<Option<u64>> = written.iter().map(|e| e.bytes).collect();
        assert_eq!(
            numbers,
            [1, 2, 3, 4, 5].map(Some),
            "all of them, in the order sent"
        );
    }

    #[test]
    fn past_the_cap_events_are_counted_and_the_count_is_written() {
        let written = with_flaky_log(2, 3, |tx, failing| {
            send(tx, 1);
            wait_until("never reported failing", || failing.load(Ordering::Relaxed));
            (2..=10).for_each(|i| send(tx, i));
            wait_until("still failing", || !failing.load(Ordering::Relaxed));
        });
        let kept: Vec<Option<u64>> = written.iter().take(3).map(|e| e.bytes).collect();
        assert_eq!(kept, [1, 2, 3].map(Some));
        assert_eq!(written.len(), 4, "{written:?}");
        assert_eq!(written[3].event, EventKind::EventsLost);
        assert_eq!(
            written[3].reason.as_deref(),
            Some("7 events were not kept while the audit log could not be written"),
            "one count line, with the count at the time of the write"
        );
    }

    /// Run the writer with `settle_every`, recording each append as (events, settle); `drive`
    /// sends the events and sees the calls so far.
    fn settles(
        settle_every: Duration,
        drive: impl FnOnce(&mpsc::Sender<Queued>, &Mutex<Vec<(usize, Settle)>>),
    ) -> Vec<(usize, Settle)> {
        let (tx, rx) = mpsc::channel();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let writer = thread::spawn(move || {
            let failing = AtomicBool::new(false);
            write_until_closed(&rx, &failing, 100, settle_every, |events, settle| {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.push((events.len(), settle));
                Ok(())
            });
        });
        drive(&tx, &calls);
        drop(tx);
        writer.join().unwrap_or_else(|_| panic!("writer"));
        let calls = calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.clone()
    }

    fn calls_so_far(calls: &Mutex<Vec<(usize, Settle)>>) -> usize {
        calls.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    #[test]
    fn batches_between_settles_are_settled_before_the_writer_stops() {
        // Settling at most once an hour: the second batch can only be settled by the stop.
        let calls = settles(Duration::from_secs(3600), |tx, calls| {
            send(tx, 1);
            wait_until("first batch not written", || calls_so_far(calls) == 1);
            send(tx, 2);
            send(tx, 3);
            wait_until("second batch not written", || calls_so_far(calls) == 2);
        });
        assert_eq!(
            calls,
            [(1, Settle::Now), (2, Settle::Later), (0, Settle::Now)],
            "the first batch settles (none had), the second waits, the stop settles it"
        );
    }

    #[test]
    fn a_quiet_writer_settles_what_it_wrote_without_a_new_event() {
        let calls = settles(Duration::from_millis(50), |tx, calls| {
            send(tx, 1);
            wait_until("first batch not written", || calls_so_far(calls) == 1);
            send(tx, 2);
            // No more events: the settle comes from the writer's own deadline.
            wait_until("never settled", || calls_so_far(calls) == 3);
        });
        assert_eq!(calls[0], (1, Settle::Now));
        assert_eq!(
            calls[2],
            (0, Settle::Now),
            "a settle with no events: {calls:?}"
        );
        // The second batch came within 50 ms of the first settle unless this machine stalled;
        // either way nothing written is left unsettled.
        assert!(
            calls[1] == (1, Settle::Later) || calls[1] == (1, Settle::Now),
            "{calls:?}"
        );
    }

    #[test]
    fn a_log_that_cannot_be_opened_stops_the_start() {
        let (_dir, home, vault) = crate::vault::test_vault();
        std::fs::create_dir_all(home.audit_path()).unwrap_or_else(|e| panic!("{e}"));
        let Err(err) = AuditQueue::start(&home, &vault) else {
            panic!("started with a directory for a log");
        };
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
    }
}
