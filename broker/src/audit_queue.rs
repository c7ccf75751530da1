//! The proxy's audit sink: events are queued and appended by one writer thread, so a request
//! never waits on the audit file's lock or disk.

use std::sync::mpsc;
use std::thread;

use crate::audit::{Audit, AuditEvent};
use crate::home::Home;
use crate::proxy::AuditSink;

/// Most events written with one lock and one write.
const MAX_BATCH: usize = 256;

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
                // Block for one event, then take whatever else is queued: under load one
                // lock and one write serve many events.
                while let Ok(first) = rx.recv() {
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
