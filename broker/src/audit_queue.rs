//! The proxy's audit sink: events are queued and appended by one writer thread, so a request
//! never waits on the audit file's lock or disk.

use std::sync::mpsc;
use std::thread;

use crate::audit::{Audit, AuditEvent};
use crate::home::Home;
use crate::proxy::AuditSink;

pub struct AuditQueue {
    tx: mpsc::Sender<AuditEvent>,
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
                for event in rx {
                    if let Err(err) = audit.append(event) {
                        tracing::error!(%err, "cannot append to the audit log");
                    }
                }
            });
        if let Err(err) = spawned {
            tracing::error!(%err, "cannot start the audit writer");
        }
        AuditQueue { tx }
    }
}

impl AuditSink for AuditQueue {
    fn record(&self, event: AuditEvent) {
        let _ = self.tx.send(event);
    }
}
