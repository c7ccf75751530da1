//! The audit phase: what a credential use records, and the response body that writes the
//! record when the response ends (or the agent hangs up).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;

use super::{BoxError, ConnInfo, Proxy, ProxyBody, RunContext};
use crate::audit::{AuditEvent, EventKind, EventView, LineEvent};

/// What the audit needs to know about a request once its response is done.
pub(super) struct Pending {
    pub(super) kind: EventKind,
    pub(super) provider: String,
    pub(super) profile: String,
    pub(super) method: http::Method,
    /// The request's path, copied (the audit line keeps only the path). Not the `Uri`: that
    /// shares the agent connection's 8 KiB read buffer, which the queued audit event would
    /// keep alive until the writer's next batch (up to 5 ms of requests' buffers).
    pub(super) path: String,
    pub(super) started: Instant,
    /// The credential put on the request, to redact from the response.
    pub(super) secret: zeroize::Zeroizing<String>,
}

impl Pending {
    /// The audit record of this credential use, once the response status and size are known.
    /// The credential stays here, and is zeroized when `self` drops.
    pub(super) fn into_request_event(
        self,
        conn: &ConnInfo,
        status: u16,
        bytes: u64,
        reason: Option<String>,
    ) -> RequestEvent {
        RequestEvent::new(
            conn,
            self.kind,
            Some(self.provider),
            Some(self.profile),
            self.method,
            self.path,
            status,
            bytes,
            self.started,
            reason,
        )
    }
}

/// What the audit line of one request holds, as the proxy has it when the request ends. Making
/// one copies no string but the SNI (the path was copied when the request was swapped, see
/// `Pending::path`), and the audit writer encodes the line from it
/// ([`LineEvent::view`]) without making the line's strings: a request does not pay for those
/// allocations (each a likely cache miss on two cores the agent and the upstream share), and
/// the writer neither for them nor for their frees.
///
/// It holds the run until then (a few milliseconds, or up to a second while the log fails
/// writes), not the connection: a connection's place under the caps is freed when it closes.
pub struct RequestEvent {
    run: Arc<RunContext>,
    pid: Option<u32>,
    uid: Option<u32>,
    sni: String,
    kind: EventKind,
    provider: Option<String>,
    profile: Option<String>,
    method: http::Method,
    path: String,
    status: u16,
    bytes: u64,
    latency_ms: u64,
    reason: Option<String>,
}

impl RequestEvent {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        conn: &ConnInfo,
        kind: EventKind,
        provider: Option<String>,
        profile: Option<String>,
        method: http::Method,
        path: String,
        status: u16,
        bytes: u64,
        started: Instant,
        reason: Option<String>,
    ) -> RequestEvent {
        RequestEvent {
            run: conn.run.clone(),
            pid: conn.run.pid.get(),
            uid: conn.audit_uid(),
            sni: conn.sni.clone(),
            kind,
            provider,
            profile,
            method,
            path,
            status,
            bytes,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            reason,
        }
    }

    /// The audit line as an event of its own (for a line written at once).
    pub fn into_event(self) -> AuditEvent {
        self.view().to_event()
    }
}

impl LineEvent for RequestEvent {
    fn view(&self) -> EventView<'_> {
        EventView {
            event: self.kind,
            run_id: Some(&self.run.id),
            pid: self.pid,
            command: Some(&self.run.command),
            uid: self.uid,
            provider: self.provider.as_deref(),
            profile: self.profile.as_deref(),
            host: Some(&self.sni),
            sni: Some(&self.sni),
            method: Some(self.method.as_str()),
            path: Some(&self.path),
            status: (self.status != 0).then_some(self.status),
            bytes: Some(self.bytes),
            latency_ms: Some(self.latency_ms),
            reason: self.reason.as_deref(),
        }
    }
}

/// The audit line of a request the proxy answers itself (a refusal, an error), made at once.
#[allow(clippy::too_many_arguments)]
pub(super) fn event(
    conn: &ConnInfo,
    kind: EventKind,
    provider: Option<String>,
    profile: Option<String>,
    method: &http::Method,
    uri: &http::Uri,
    status: u16,
    bytes: u64,
    started: Instant,
    reason: Option<String>,
) -> AuditEvent {
    RequestEvent::new(
        conn,
        kind,
        provider,
        profile,
        method.clone(),
        uri.path().to_owned(),
        status,
        bytes,
        started,
        reason,
    )
    .into_event()
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
            let event = p.into_request_event(&conn, status, self.bytes, None);
            proxy.audit.record_request(event);
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
