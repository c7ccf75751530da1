//! The proxy's audit sink: events are queued and appended by one writer thread, so a request
//! never waits on the audit file's lock or disk.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::audit::{Audit, AuditEvent};
use crate::home::Home;
use crate::proxy::AuditSink;

/// Most events written with one lock and one write.
const MAX_BATCH: usize = 256;
/// How long the writer waits after the first event of a batch for more to arrive: the delay
/// before an event reaches the file (and before a broker with unwritten events exits).
const GATHER: Duration = Duration::from_millis(5);

pub struct AuditQueue {
    tx: Option<mpsc::Sender<AuditEvent>>,
    writer: Option<thread::JoinHandle<()>>,
}

impl AuditQueue {
    /// Start the writer thread for the audit log of `home`.
    pub fn start(home: Home) -> AuditQueue {
        let (tx, rx) = mpsc::channel::<AuditEvent>();
        let spawned = thread::Builder::new()
            .name("broker-audit".into())
            .spawn(move || {
                let audit = match Audit::open(&home) {
                    Ok(audit) => audit,
                    Err(err) => {
                        tracing::error!(%err, "cannot open the audit log; events will be lost");
                        return;
                    }
                };
                // Block for one event, wait a moment, then take whatever else is queued: under
                // load one wake-up, one lock, one stat and one write serve many events. Without
                // the wait each request woke this thread and paid those alone, on the cores the
                // broker shares with its agent (this thread was a fifth of the broker's CPU in
                // the keep-alive benchmark). While it sleeps, senders do not wake it.
                while let Ok(first) = rx.recv() {
                    thread::sleep(GATHER);
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter().take(MAX_BATCH - 1));
                    if let Err(err) = audit.append_all(batch) {
                        tracing::error!(%err, "cannot append to the audit log");
                    }
                }
            });
        let writer = match spawned {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::error!(%err, "cannot start the audit writer");
                None
            }
        };
        AuditQueue {
            tx: Some(tx),
            writer,
        }
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
}
