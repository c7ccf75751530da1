//! The audit phase: what a credential use records, and the response body that writes the
//! record when the response ends (or the agent hangs up).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;

use super::{BoxError, ConnInfo, Proxy, ProxyBody};
use crate::audit::{AuditEvent, EventKind};

/// What the audit needs to know about a request once its response is done.
pub(super) struct Pending {
    pub(super) kind: EventKind,
    pub(super) provider: String,
    pub(super) profile: String,
    pub(super) method: http::Method,
    /// As the agent sent it (shares its bytes); the audit keeps the path.
    pub(super) uri: http::Uri,
    pub(super) started: Instant,
    /// The credential put on the request, to redact from the response.
    pub(super) secret: zeroize::Zeroizing<String>,
}

impl Pending {
    /// The audit line for this credential use, once the response status and size are known.
    pub(super) fn event(
        self,
        conn: &ConnInfo,
        status: u16,
        bytes: u64,
        reason: Option<String>,
    ) -> AuditEvent {
        event(
            conn,
            self.kind,
            Some(self.provider),
            Some(self.profile),
            self.method.as_str(),
            self.uri.path(),
            status,
            bytes,
            self.started,
            reason,
        )
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn event(
    conn: &ConnInfo,
    kind: EventKind,
    provider: Option<String>,
    profile: Option<String>,
    method: &str,
    path: &str,
    status: u16,
    bytes: u64,
    started: Instant,
    reason: Option<String>,
) -> AuditEvent {
    AuditEvent {
        run_id: Some(conn.run.id.clone()),
        pid: conn.run.pid.get(),
        command: Some(conn.run.command.clone()),
        uid: conn.audit_uid(),
        provider,
        profile,
        host: Some(conn.sni.clone()),
        sni: Some(conn.sni.clone()),
        method: Some(method.to_string()),
        path: Some(path.to_string()),
        status: (status != 0).then_some(status),
        bytes: Some(bytes),
        latency_ms: Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
        reason,
        ..AuditEvent::new(kind)
    }
}

/// A response body that counts bytes as they stream and writes the audit line when the
/// body ends (or is dropped: an agent that hangs up still leaves a record).
pub(super) struct AuditedBody {
    inner: ProxyBody,
    bytes: u64,
    record: Option<(Arc<Proxy>, Arc<ConnInfo>, Pending, u16)>,
}

impl AuditedBody {
    pub(super) fn wrap(
        inner: ProxyBody,
        proxy: Arc<Proxy>,
        conn: Arc<ConnInfo>,
        pending: Pending,
        status: u16,
    ) -> ProxyBody {
        AuditedBody {
            inner,
            bytes: 0,
            record: Some((proxy, conn, pending, status)),
        }
        .boxed()
    }

    fn finish(&mut self) {
        if let Some((proxy, conn, p, status)) = self.record.take() {
            proxy.audit.record(p.event(&conn, status, self.bytes, None));
        }
    }
}

impl Body for AuditedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AuditedBody {
    fn drop(&mut self) {
        self.finish();
    }
}
